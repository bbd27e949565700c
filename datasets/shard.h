/* shard.h: zstd-compressed record shards (format: docs/shards.md), a writer and a random-access reader.
 *
 * A shard holds records: input ids, labels (-100 ignored), one token kind per token (pad / prompt /
 * response / image), any number of image payloads (encoded image bytes, or cached encoder features
 * as F16 with a shape) and a small JSON metadata object (task, id, gold answer, choices, ...).
 *
 *   tk_err err = {0};
 *   tk_shard_writer *w = tk_shard_writer_open("train.shard", NULL, &err);   // NULL: defaults
 *   tk_shard_record rec = {.n_tokens = n, .input_ids = ids, .labels = labels, .kinds = kinds,
 *                          .meta = "{\"task\":\"boolq\"}", .meta_len = 16};
 *   if (!w || tk_shard_writer_add(w, &rec, &err) != 0) ...;
 *   tk_shard_stats st;
 *   if (tk_shard_writer_close(w, &st, &err) != 0) ...;    // the file appears only now
 *
 *   tk_shard_reader *r = tk_shard_reader_open("train.shard", &err);       // validates the layout
 *   tk_shard_record got;
 *   if (tk_shard_reader_get(r, 17, &got, &err) != 0) ...;   // decompresses + verifies one frame
 *   ...
 *   tk_shard_reader_free(r);
 *
 * Ownership: the writer copies what add() is given. The reader owns everything a record it returns
 * points to; the pointers stay valid until the next tk_shard_reader_get or tk_shard_reader_free on
 * that reader. Neither object is thread-safe; use one per thread.
 * Failure: NULL / -1 with err set to one line naming the shard (and the frame, for frame contents),
 * what was found and what was expected. A failed or abandoned write never touches an existing file at
 * the destination: records go to PATH.tmp.<pid>, which is fsynced and renamed over PATH on close.
 */
#ifndef TK_DATASETS_SHARD_H
#define TK_DATASETS_SHARD_H

#include "../src/common.h"

#include <stddef.h>
#include <stdint.h>

#define TK_SHARD_VERSION 1
#define TK_SHARD_LABEL_IGNORE (-100)

/* Per-token kinds (one byte each in a record): TK_KIND_PAD / PROMPT / RESPONSE / IMAGE. */
#include "../src/token_kind.h"

/* Image payload kinds. */
enum { TK_IMAGE_ENCODED = 1, TK_IMAGE_F16_FEATURES = 2 };

#define TK_SHARD_MAX_IMAGE_DIMS 4
#define TK_SHARD_DEFAULT_FRAME_TARGET ((size_t)1 << 20) /* uncompressed bytes per frame */
#define TK_SHARD_DEFAULT_LEVEL 3                         /* zstd level */
#define TK_SHARD_MAX_FRAME_BYTES ((uint64_t)1 << 30)     /* largest uncompressed frame (and record) */
#define TK_SHARD_MAX_META_BYTES ((size_t)1 << 20)
#define TK_SHARD_MAX_IMAGES 256                          /* per record */

typedef struct {
    uint32_t kind;                            /* TK_IMAGE_ENCODED or TK_IMAGE_F16_FEATURES */
    uint32_t ndim;                            /* 0 for encoded bytes; 1..4 for features */
    uint64_t shape[TK_SHARD_MAX_IMAGE_DIMS];  /* [ndim], outermost first, e.g. [patches, channels] */
    size_t nbytes;                            /* features: 2 * product(shape) */
    const uint8_t *data;                      /* [nbytes]: PNG/JPEG/... bytes, or little-endian F16 */
} tk_shard_image;

typedef struct {
    size_t n_tokens;                /* >= 1 */
    const int32_t *input_ids;       /* [n_tokens], >= 0 (< vocab_size when the shard records one) */
    const int32_t *labels;          /* [n_tokens], -100 = ignored, else like input_ids */
    const uint8_t *kinds;           /* [n_tokens], TK_KIND_* */
    size_t meta_len;                /* bytes of meta; 0 = no metadata */
    const char *meta;               /* [meta_len] a JSON object; NUL-terminated when read back */
    size_t n_images;                /* <= TK_SHARD_MAX_IMAGES */
    const tk_shard_image *images;   /* [n_images]; the i-th goes with the i-th run of image tokens */
} tk_shard_record;

/* Totals, updated as records are written (writer) or taken from the header and index (reader). */
typedef struct {
    uint64_t records, frames, tokens, images;
    uint64_t max_tokens;       /* longest record (writer only; 0 from a reader) */
    uint64_t raw_bytes;        /* uncompressed frame bytes */
    uint64_t compressed_bytes; /* compressed frame bytes */
    uint64_t file_bytes;       /* whole file, header and index included (after close / at open) */
} tk_shard_stats;

/* raw_bytes / compressed_bytes (0 when nothing has been compressed). */
double tk_shard_stats_ratio(const tk_shard_stats *s);
/* acc += s, field by field (max_tokens: the larger). */
void tk_shard_stats_add(tk_shard_stats *acc, const tk_shard_stats *s);

/* ---- writer ---- */

typedef struct {
    int level;            /* zstd level 1..ZSTD_maxCLevel(); 0 = TK_SHARD_DEFAULT_LEVEL */
    size_t frame_target;  /* uncompressed bytes per frame; 0 = TK_SHARD_DEFAULT_FRAME_TARGET */
    uint32_t vocab_size;  /* > 0: recorded in the header; every id and label must lie below it */
} tk_shard_writer_opts;

typedef struct tk_shard_writer tk_shard_writer;

/* Creates PATH.tmp.<pid>; opts may be NULL. Returns NULL on failure. */
tk_shard_writer *tk_shard_writer_open(const char *path, const tk_shard_writer_opts *opts, tk_err *err);

/* Validates rec and appends it (copied). An invalid record is refused with -1 and the writer stays
 * usable; an I/O or compression failure makes every later add and close fail. */
int tk_shard_writer_add(tk_shard_writer *w, const tk_shard_record *rec, tk_err *err);

/* Statistics so far (frames still being filled count in records/tokens/raw_bytes only). */
void tk_shard_writer_stats(const tk_shard_writer *w, tk_shard_stats *out);

/* Flushes the last frame, writes the index and header, fsyncs and renames the file into place;
 * fills *final (may be NULL) with the shard's totals. Always frees w (NULL is fine: returns 0). On
 * failure the temp file is removed and PATH is untouched. */
int tk_shard_writer_close(tk_shard_writer *w, tk_shard_stats *final, tk_err *err);

/* Gives up: removes the temp file and frees w. NULL is fine. */
void tk_shard_writer_abort(tk_shard_writer *w);

/* ---- reader ---- */

typedef struct tk_shard_reader tk_shard_reader;

/* Opens and validates the header and the whole frame index (magic, version, sizes, checksums of
 * header and index, every frame inside the file and contiguous, counts adding up). Frame contents
 * are verified when a frame is first decompressed. Returns NULL on failure. */
tk_shard_reader *tk_shard_reader_open(const char *path, tk_err *err);
void tk_shard_reader_free(tk_shard_reader *r);

const char *tk_shard_reader_path(const tk_shard_reader *r);
uint64_t tk_shard_reader_count(const tk_shard_reader *r);        /* records */
uint64_t tk_shard_reader_frame_count(const tk_shard_reader *r);
uint32_t tk_shard_reader_vocab_size(const tk_shard_reader *r);   /* 0 = not recorded */
void tk_shard_reader_stats(const tk_shard_reader *r, tk_shard_stats *out);

/* Records [*first, *first + *count) live in frame f (f < frame count). */
void tk_shard_reader_frame_records(const tk_shard_reader *r, uint64_t f, uint64_t *first, uint64_t *count);
/* The frame holding record index (index < count). */
uint64_t tk_shard_reader_frame_of(const tk_shard_reader *r, uint64_t index);

/* Decompressed frames kept (least recently used evicted); default 1, clamped to 1..frame count
 * (memory: up to that many uncompressed frames). Returns -1 with err
 * set when the cache cannot be allocated. */
int tk_shard_reader_set_cache(tk_shard_reader *r, size_t frames, tk_err *err);

/* Reads record index into *out (pointers owned by r: see above). Decompresses its frame unless
 * cached, checking both frame checksums and every record of the frame. */
int tk_shard_reader_get(tk_shard_reader *r, uint64_t index, tk_shard_record *out, tk_err *err);

#endif
