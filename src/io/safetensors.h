/* safetensors.h: memory-mapped reading and atomic writing of Hugging Face safetensors files,
 * including sharded checkpoints described by model.safetensors.index.json.
 *
 *   tk_err err = {0};
 *   tk_st_file *f = tk_st_open("model.safetensors", &err);          // validates the whole header
 *   const tk_st_tensor *t = tk_st_find(f, "model.norm.weight");
 *   float *w = malloc(t->numel * sizeof(float));
 *   tk_st_read_f32(f, t, w, t->numel, &err);                         // F32/F16/BF16 -> fp32
 *   tk_st_close(f);
 *
 * Ownership: tk_st_open returns a handle the caller closes; tensor descriptors and tk_st_data pointers
 * live until the close. Failure: NULL / -1 with err naming the file and tensor.
 * Validation at open: header length within the file, header is a JSON object, every entry has a known
 * dtype, a shape of at most 8 non-negative dims whose product fits, and data_offsets [begin, end) with
 * begin <= end <= data size and end - begin == numel * dtype size; overlapping tensors are rejected.
 */
#ifndef TK_SAFETENSORS_H
#define TK_SAFETENSORS_H

#include "../common.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    TK_DT_F32,
    TK_DT_F16,
    TK_DT_BF16,
    TK_DT_I64,
    TK_DT_I32,
    TK_DT_U8,
    TK_DT_F64,
    TK_DT_BOOL,
} tk_dtype;

#define TK_ST_MAX_DIMS 8

typedef struct {
    char *name;
    tk_dtype dtype;
    int ndim;
    int64_t shape[TK_ST_MAX_DIMS];
    size_t numel;
    size_t offset; /* byte offset of the data relative to the start of the data section */
    size_t nbytes;
} tk_st_tensor;

typedef struct tk_st_file tk_st_file;

tk_st_file *tk_st_open(const char *path, tk_err *err);
void tk_st_close(tk_st_file *f); /* accepts NULL */

const char *tk_st_path(const tk_st_file *f);
size_t tk_st_count(const tk_st_file *f);
const tk_st_tensor *tk_st_at(const tk_st_file *f, size_t i);
const tk_st_tensor *tk_st_find(const tk_st_file *f, const char *name); /* NULL when absent */
/* The "__metadata__" string value for key, or NULL. */
const char *tk_st_metadata(const tk_st_file *f, const char *key);
/* Raw bytes of a tensor inside the mapping (read-only). */
const void *tk_st_data(const tk_st_file *f, const tk_st_tensor *t);

size_t tk_dtype_size(tk_dtype dt);
const char *tk_dtype_name(tk_dtype dt);

/* Converts a floating tensor (F32, F16, BF16, F64) to fp32. n must equal t->numel. */
int tk_st_read_f32(const tk_st_file *f, const tk_st_tensor *t, float *out, size_t n, tk_err *err);
/* Checks that t has exactly the given shape; the error names the file, tensor, found and expected. */
int tk_st_check_shape(const tk_st_file *f, const tk_st_tensor *t, int ndim, const int64_t *shape,
                      tk_err *err);

/* ---- a checkpoint that may be one file or several shards ------------------------------------- */
/* Opens DIR/model.safetensors, or DIR/model.safetensors.index.json and every shard its weight_map
 * names (each shard opened once; every mapped name must exist in its shard). */
typedef struct tk_st_set tk_st_set;
tk_st_set *tk_st_set_open(const char *dir, tk_err *err);
void tk_st_set_close(tk_st_set *s);
/* Finds a tensor by name; *file receives the shard holding it. NULL when absent. */
const tk_st_tensor *tk_st_set_find(const tk_st_set *s, const char *name, const tk_st_file **file);

/* ---- writing ---------------------------------------------------------------------------------- */
/* Describes one tensor to write; data is host memory of numel * dtype size bytes. */
typedef struct {
    const char *name;
    tk_dtype dtype;
    int ndim;
    int64_t shape[TK_ST_MAX_DIMS];
    const void *data;
} tk_st_entry;

/* Writes path atomically: to path.tmp.<pid>, fsync, rename. Tensors are written in the given order;
 * the header is padded with spaces to a multiple of 8 bytes. metadata: NULL or pairs of strings
 * (key, value, key, value, ..., NULL) for "__metadata__". An existing file at path is untouched on
 * failure. */
int tk_st_write(const char *path, const tk_st_entry *entries, size_t n, const char *const *metadata,
                tk_err *err);

#endif
