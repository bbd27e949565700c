/* fuzz_safetensors.c: tk_st_open on arbitrary bytes (the file header: length prefix, JSON, offsets).
 *
 * Input: a whole .safetensors file. When it opens, every tensor is looked up by name, checked
 * against its own shape and read back (floating dtypes converted to fp32, others copied), so any
 * descriptor that points outside the mapping is touched and caught.
 */
#include "fuzz_common.h"
#include "io/safetensors.h"

#include <stdlib.h>
#include <string.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("model.safetensors");
    tkf_write(path, data, size);
    tk_st_file *f = tk_st_open(path, err);
    if (!f) return -1;
    (void)tk_st_metadata(f, "format");
    int rc = 0;
    for (size_t i = 0; i < tk_st_count(f) && rc == 0; i++) {
        const tk_st_tensor *t = tk_st_at(f, i);
        TKF_REQUIRE(t != NULL && t->name != NULL);
        TKF_REQUIRE(tk_st_find(f, t->name) == t);
        TKF_REQUIRE(t->nbytes == t->numel * tk_dtype_size(t->dtype));
        TKF_REQUIRE(tk_st_check_shape(f, t, t->ndim, t->shape, err) == 0);
        if (t->nbytes == 0) continue;
        const void *raw = tk_st_data(f, t);
        if (t->dtype == TK_DT_F32 || t->dtype == TK_DT_F16 || t->dtype == TK_DT_BF16 ||
            t->dtype == TK_DT_F64) {
            float *out = malloc(t->numel * sizeof *out);
            TKF_REQUIRE(out != NULL);
            rc = tk_st_read_f32(f, t, out, t->numel, err);
            free(out);
        } else {
            unsigned char *copy = malloc(t->nbytes);
            TKF_REQUIRE(copy != NULL);
            memcpy(copy, raw, t->nbytes);
            free(copy);
        }
    }
    tk_st_close(f);
    return rc;
}
