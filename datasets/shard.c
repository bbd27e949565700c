/* shard.c: see shard.h; the byte layout is specified in docs/shards.md.
 *
 * Every integer is read and written byte by byte as little-endian (never by dumping a struct), every
 * count or size read from the file is checked against the bytes actually available before it is used
 * to allocate, index or copy, and all size arithmetic is size_t / uint64_t with explicit overflow
 * checks. The reader trusts nothing it has not checked: the header and index at open, a frame's
 * bytes and every record in it when the frame is decompressed.
 *
 * Errors: "PATH: what (found X, expected Y)" for the header and index, and
 * "PATH: frame F (offset O): what" for anything inside a frame, "record R" added when one record is at
 * fault (R is the record's index in the shard).
 */
#include "datasets/shard.h"

#include "datasets/crc32c.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

/* ---- layout constants (docs/shards.md) ---- */

static const uint8_t SHARD_MAGIC[8] = {'T', 'K', 'S', 'H', 'A', 'R', 'D', 0};
#define HEADER_BYTES 96u
#define HEADER_CRC_AT 92u
#define INDEX_ENTRY_BYTES 48u
#define RECORD_FIXED_BYTES 16u /* record_bytes, n_tokens, meta_len, n_images */
#define TOKEN_BYTES 9u         /* input id (4) + label (4) + kind (1) */
#define FLAG_ENCODED 1u
#define FLAG_FEATURES 2u
#define FLAGS_KNOWN (FLAG_ENCODED | FLAG_FEATURES)

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

/* One frame index entry, decoded. */
typedef struct {
    uint64_t offset, csize, usize, first;
    uint32_t records, tokens, ccrc, ucrc;
} frame_entry;

static void entry_encode(uint8_t *p, const frame_entry *e) {
    put64(p, e->offset);
    put64(p + 8, e->csize);
    put64(p + 16, e->usize);
    put64(p + 24, e->first);
    put32(p + 32, e->records);
    put32(p + 36, e->tokens);
    put32(p + 40, e->ccrc);
    put32(p + 44, e->ucrc);
}

static void entry_decode(frame_entry *e, const uint8_t *p) {
    e->offset = get64(p);
    e->csize = get64(p + 8);
    e->usize = get64(p + 16);
    e->first = get64(p + 24);
    e->records = get32(p + 32);
    e->tokens = get32(p + 36);
    e->ccrc = get32(p + 40);
    e->ucrc = get32(p + 44);
}

/* Header fields, decoded. */
typedef struct {
    uint32_t version, header_size;
    uint64_t file_size, records, frames, tokens, images, index_offset;
    uint32_t flags, vocab_size, frame_target;
    int32_t level;
    uint32_t index_crc;
    uint64_t reserved;
} shard_header;

static void header_encode(uint8_t *p, const shard_header *h) {
    memset(p, 0, HEADER_BYTES);
    memcpy(p, SHARD_MAGIC, 8);
    put32(p + 8, h->version);
    put32(p + 12, h->header_size);
    put64(p + 16, h->file_size);
    put64(p + 24, h->records);
    put64(p + 32, h->frames);
    put64(p + 40, h->tokens);
    put64(p + 48, h->images);
    put64(p + 56, h->index_offset);
    put32(p + 64, h->flags);
    put32(p + 68, h->vocab_size);
    put32(p + 72, h->frame_target);
    put32(p + 76, (uint32_t)h->level);
    put32(p + 80, h->index_crc);
    put64(p + 84, 0);
    put32(p + HEADER_CRC_AT, tk_crc32c(0, p, HEADER_CRC_AT));
}

static void header_decode(shard_header *h, const uint8_t *p) {
    h->version = get32(p + 8);
    h->header_size = get32(p + 12);
    h->file_size = get64(p + 16);
    h->records = get64(p + 24);
    h->frames = get64(p + 32);
    h->tokens = get64(p + 40);
    h->images = get64(p + 48);
    h->index_offset = get64(p + 56);
    h->flags = get32(p + 64);
    h->vocab_size = get32(p + 68);
    h->frame_target = get32(p + 72);
    h->level = (int32_t)get32(p + 76);
    h->index_crc = get32(p + 80);
    h->reserved = get64(p + 84);
}

/* Grows *buf (tk_calloc'd) to hold at least need elements of size bytes; keeps the contents. */
static int grow(void **buf, size_t *cap, size_t need, size_t size) {
    if (need <= *cap && *buf != NULL) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        if (n > SIZE_MAX / 2) {
            n = need;
            break;
        }
        n *= 2;
    }
    size_t bytes;
    if (tk_mul_size(n, size, &bytes) != 0) return -1;
    void *p = tk_calloc(n, size);
    if (p == NULL) return -1;
    if (*buf != NULL && *cap > 0) memcpy(p, *buf, *cap * size);
    tk_free(*buf);
    *buf = p;
    *cap = n;
    return 0;
}

/* ---- statistics ---- */

double tk_shard_stats_ratio(const tk_shard_stats *s) {
    TK_ASSERT(s != NULL);
    if (s->compressed_bytes == 0) return 0.0;
    return (double)s->raw_bytes / (double)s->compressed_bytes;
}

void tk_shard_stats_add(tk_shard_stats *acc, const tk_shard_stats *s) {
    TK_ASSERT(acc != NULL && s != NULL);
    acc->records += s->records;
    acc->frames += s->frames;
    acc->tokens += s->tokens;
    acc->images += s->images;
    if (s->max_tokens > acc->max_tokens) acc->max_tokens = s->max_tokens;
    acc->raw_bytes += s->raw_bytes;
    acc->compressed_bytes += s->compressed_bytes;
    acc->file_bytes += s->file_bytes;
}

/* ---- record validation shared by writer and reader ---- */

/* Checks one image description; on failure writes the reason into why and returns -1. *bytes gets
 * the image's size in the record (kind, ndim, shape, nbytes, data). */
static int image_check(const tk_shard_image *im, size_t i, uint32_t *flags, uint64_t *bytes, char *why, size_t cap) {
    if (im->kind == TK_IMAGE_ENCODED) {
        if (im->ndim != 0) {
            snprintf(why, cap, "image %zu: encoded bytes with %u dims (expected 0)", i, im->ndim);
            return -1;
        }
        if (im->nbytes == 0) {
            snprintf(why, cap, "image %zu: empty encoded image (expected at least 1 byte)", i);
            return -1;
        }
        *flags |= FLAG_ENCODED;
    } else if (im->kind == TK_IMAGE_F16_FEATURES) {
        if (im->ndim < 1 || im->ndim > TK_SHARD_MAX_IMAGE_DIMS) {
            snprintf(why, cap, "image %zu: features with %u dims (expected 1..%d)", i, im->ndim,
                     TK_SHARD_MAX_IMAGE_DIMS);
            return -1;
        }
        uint64_t n = 2; /* bytes per F16 */
        for (uint32_t d = 0; d < im->ndim; d++) {
            if (im->shape[d] == 0 || n > TK_SHARD_MAX_FRAME_BYTES / im->shape[d]) {
                snprintf(why, cap, "image %zu: feature shape dim %u is %llu (expected 1.. and %llu bytes at most)",
                         i, d, (unsigned long long)im->shape[d], (unsigned long long)TK_SHARD_MAX_FRAME_BYTES);
                return -1;
            }
            n *= im->shape[d];
        }
        if ((uint64_t)im->nbytes != n) {
            snprintf(why, cap, "image %zu: %zu feature bytes (expected %llu = 2 x product of the shape)", i,
                     im->nbytes, (unsigned long long)n);
            return -1;
        }
        *flags |= FLAG_FEATURES;
    } else {
        snprintf(why, cap, "image %zu: unknown kind %u (expected %d encoded or %d F16 features)", i, im->kind,
                 TK_IMAGE_ENCODED, TK_IMAGE_F16_FEATURES);
        return -1;
    }
    if ((uint64_t)im->nbytes > TK_SHARD_MAX_FRAME_BYTES) {
        snprintf(why, cap, "image %zu: %zu bytes (expected at most %llu)", i, im->nbytes,
                 (unsigned long long)TK_SHARD_MAX_FRAME_BYTES);
        return -1;
    }
    *bytes = 8 + 8 * (uint64_t)im->ndim + 8 + im->nbytes;
    return 0;
}

/* Checks token values: ids >= 0 (and < vocab when vocab > 0), labels -100 or like ids, kinds 0..3.
 * ids and labels are given as little-endian bytes (reader) or int32 arrays (writer). */
static int token_check(int32_t id, int32_t label, uint8_t kind, size_t t, uint32_t vocab, char *why, size_t cap) {
    if (id < 0 || (vocab > 0 && (uint32_t)id >= vocab)) {
        snprintf(why, cap, "token %zu: input id %d (expected 0..%u)", t, id, vocab > 0 ? vocab - 1 : (uint32_t)INT32_MAX);
        return -1;
    }
    if (label != TK_SHARD_LABEL_IGNORE && (label < 0 || (vocab > 0 && (uint32_t)label >= vocab))) {
        snprintf(why, cap, "token %zu: label %d (expected -100 or 0..%u)", t, label,
                 vocab > 0 ? vocab - 1 : (uint32_t)INT32_MAX);
        return -1;
    }
    if (kind > TK_KIND_IMAGE) {
        snprintf(why, cap, "token %zu: kind %u (expected 0 pad, 1 prompt, 2 response or 3 image)", t, kind);
        return -1;
    }
    return 0;
}

/* Light check of a stored metadata blob: no NUL byte, first and last non-space characters '{' '}'.
 * The writer parsed it fully; the checksums protect it since. */
static int meta_check_light(const char *m, size_t n, char *why, size_t cap) {
    if (n == 0) return 0;
    if (memchr(m, 0, n) != NULL) {
        snprintf(why, cap, "metadata contains a NUL byte (expected a JSON object)");
        return -1;
    }
    size_t a = 0, b = n;
    while (a < b && (m[a] == ' ' || m[a] == '\t' || m[a] == '\n' || m[a] == '\r')) a++;
    while (b > a && (m[b - 1] == ' ' || m[b - 1] == '\t' || m[b - 1] == '\n' || m[b - 1] == '\r')) b--;
    if (b - a < 2 || m[a] != '{' || m[b - 1] != '}') {
        snprintf(why, cap, "metadata is not a JSON object (expected {...})");
        return -1;
    }
    return 0;
}

/* ---- writer ---- */

struct tk_shard_writer {
    char *path, *tmp;
    FILE *f;
    int level;
    size_t target;
    uint32_t vocab;
    ZSTD_CCtx *cctx;
    uint8_t *frame; /* [frame_cap] records being collected */
    size_t frame_len, frame_cap;
    uint32_t frame_records, frame_tokens;
    uint8_t *cbuf; /* [cbuf_cap] compressed frame */
    size_t cbuf_cap;
    frame_entry *index; /* [index_cap] */
    size_t index_cap;
    uint64_t offset; /* where the next frame goes */
    uint32_t flags;
    tk_shard_stats st;
    int failed;
    char fail_msg[512];
};

static void writer_free(tk_shard_writer *w) {
    if (w->f != NULL) fclose(w->f);
    ZSTD_freeCCtx(w->cctx);
    tk_free(w->frame);
    tk_free(w->cbuf);
    tk_free(w->index);
    free(w->path);
    free(w->tmp);
    free(w);
}

tk_shard_writer *tk_shard_writer_open(const char *path, const tk_shard_writer_opts *opts, tk_err *err) {
    TK_ASSERT(path != NULL);
    tk_shard_writer_opts o = {0};
    if (opts != NULL) o = *opts;
    if (o.level == 0) o.level = TK_SHARD_DEFAULT_LEVEL;
    if (o.frame_target == 0) o.frame_target = TK_SHARD_DEFAULT_FRAME_TARGET;
    if (o.level < 1 || o.level > ZSTD_maxCLevel()) {
        tk_fail(err, "%s: zstd level %d (expected 1..%d)", path, o.level, ZSTD_maxCLevel());
        return NULL;
    }
    if ((uint64_t)o.frame_target > TK_SHARD_MAX_FRAME_BYTES) {
        tk_fail(err, "%s: frame target %zu bytes (expected at most %llu)", path, o.frame_target,
                (unsigned long long)TK_SHARD_MAX_FRAME_BYTES);
        return NULL;
    }
    if (o.vocab_size > (uint32_t)INT32_MAX) {
        tk_fail(err, "%s: vocab size %u (expected at most %d)", path, o.vocab_size, INT32_MAX);
        return NULL;
    }
    tk_shard_writer *w = calloc(1, sizeof *w);
    size_t plen = strlen(path);
    if (w == NULL || (w->path = strdup(path)) == NULL || (w->tmp = malloc(plen + 32)) == NULL) {
        if (w) writer_free(w);
        tk_fail(err, "%s: out of memory", path);
        return NULL;
    }
    snprintf(w->tmp, plen + 32, "%s.tmp.%ld", path, (long)getpid());
    w->level = o.level;
    w->target = o.frame_target;
    w->vocab = o.vocab_size;
    w->offset = HEADER_BYTES;
    w->cctx = ZSTD_createCCtx();
    if (w->cctx == NULL || ZSTD_isError(ZSTD_CCtx_setParameter(w->cctx, ZSTD_c_compressionLevel, w->level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(w->cctx, ZSTD_c_contentSizeFlag, 1))) {
        writer_free(w);
        tk_fail(err, "%s: cannot set up the zstd compressor", path);
        return NULL;
    }
    w->f = fopen(w->tmp, "wb");
    if (w->f == NULL) {
        tk_fail(err, "%s: cannot create: %s", w->tmp, strerror(errno));
        writer_free(w);
        return NULL;
    }
    uint8_t zero[HEADER_BYTES] = {0}; /* placeholder; the real header is written by close */
    if (fwrite(zero, 1, HEADER_BYTES, w->f) != HEADER_BYTES) {
        tk_fail(err, "%s: write failed: %s", w->tmp, strerror(errno));
        tk_shard_writer_abort(w);
        return NULL;
    }
    return w;
}

static int writer_failed(tk_shard_writer *w, tk_err *err, const char *fmt, const char *detail) {
    w->failed = 1;
    snprintf(w->fail_msg, sizeof w->fail_msg, fmt, w->tmp, detail);
    return tk_fail(err, "%s", w->fail_msg);
}

/* Compresses and writes the collected records as one frame. */
static int writer_flush(tk_shard_writer *w, tk_err *err) {
    if (w->frame_records == 0) return 0;
    size_t bound = ZSTD_compressBound(w->frame_len);
    if (grow((void **)&w->cbuf, &w->cbuf_cap, bound, 1) != 0) return writer_failed(w, err, "%s: %s", "out of memory");
    size_t cs = ZSTD_compress2(w->cctx, w->cbuf, w->cbuf_cap, w->frame, w->frame_len);
    if (ZSTD_isError(cs)) return writer_failed(w, err, "%s: zstd compression failed: %s", ZSTD_getErrorName(cs));
    if (fwrite(w->cbuf, 1, cs, w->f) != cs) return writer_failed(w, err, "%s: write failed: %s", strerror(errno));
    if (grow((void **)&w->index, &w->index_cap, (size_t)w->st.frames + 1, sizeof(frame_entry)) != 0)
        return writer_failed(w, err, "%s: %s", "out of memory");
    frame_entry *e = &w->index[w->st.frames];
    e->offset = w->offset;
    e->csize = cs;
    e->usize = w->frame_len;
    e->first = w->st.records - w->frame_records;
    e->records = w->frame_records;
    e->tokens = w->frame_tokens;
    e->ccrc = tk_crc32c(0, w->cbuf, cs);
    e->ucrc = tk_crc32c(0, w->frame, w->frame_len);
    w->offset += cs;
    w->st.frames++;
    w->st.compressed_bytes += cs;
    w->frame_len = 0;
    w->frame_records = 0;
    w->frame_tokens = 0;
    return 0;
}

int tk_shard_writer_add(tk_shard_writer *w, const tk_shard_record *rec, tk_err *err) {
    TK_ASSERT(w != NULL && rec != NULL);
    if (w->failed) return tk_fail(err, "%s", w->fail_msg);
    char why[256];
    uint64_t index = w->st.records;
    /* Sizes first. */
    if (rec->n_tokens == 0 || rec->input_ids == NULL || rec->labels == NULL || rec->kinds == NULL)
        return tk_fail(err, "%s: record %llu: no tokens (expected n_tokens >= 1 with ids, labels and kinds)",
                       w->path, (unsigned long long)index);
    if ((uint64_t)rec->n_tokens > (TK_SHARD_MAX_FRAME_BYTES - RECORD_FIXED_BYTES) / TOKEN_BYTES)
        return tk_fail(err, "%s: record %llu: %zu tokens (expected at most %llu)", w->path,
                       (unsigned long long)index, rec->n_tokens,
                       (unsigned long long)((TK_SHARD_MAX_FRAME_BYTES - RECORD_FIXED_BYTES) / TOKEN_BYTES));
    if (rec->meta_len > TK_SHARD_MAX_META_BYTES || (rec->meta_len > 0 && rec->meta == NULL))
        return tk_fail(err, "%s: record %llu: metadata of %zu bytes (expected at most %zu)", w->path,
                       (unsigned long long)index, rec->meta_len, TK_SHARD_MAX_META_BYTES);
    if (rec->n_images > TK_SHARD_MAX_IMAGES || (rec->n_images > 0 && rec->images == NULL))
        return tk_fail(err, "%s: record %llu: %zu images (expected at most %d)", w->path,
                       (unsigned long long)index, rec->n_images, TK_SHARD_MAX_IMAGES);
    uint64_t size = RECORD_FIXED_BYTES + (uint64_t)rec->n_tokens * TOKEN_BYTES + rec->meta_len;
    uint32_t flags = 0;
    for (size_t i = 0; i < rec->n_images; i++) {
        uint64_t b;
        if (image_check(&rec->images[i], i, &flags, &b, why, sizeof why) != 0)
            return tk_fail(err, "%s: record %llu: %s", w->path, (unsigned long long)index, why);
        if (rec->images[i].data == NULL)
            return tk_fail(err, "%s: record %llu: image %zu has no data", w->path, (unsigned long long)index, i);
        size += b;
        if (size > TK_SHARD_MAX_FRAME_BYTES) break;
    }
    if (size > TK_SHARD_MAX_FRAME_BYTES)
        return tk_fail(err, "%s: record %llu: %llu bytes or more (expected at most %llu)", w->path,
                       (unsigned long long)index, (unsigned long long)size,
                       (unsigned long long)TK_SHARD_MAX_FRAME_BYTES);
    /* Values. */
    for (size_t t = 0; t < rec->n_tokens; t++) {
        if (token_check(rec->input_ids[t], rec->labels[t], rec->kinds[t], t, w->vocab, why, sizeof why) != 0)
            return tk_fail(err, "%s: record %llu: %s", w->path, (unsigned long long)index, why);
    }
    if (rec->meta_len > 0) {
        const char *end = NULL;
        cJSON *j = cJSON_ParseWithLengthOpts(rec->meta, rec->meta_len, &end, 0);
        int ok = j != NULL && cJSON_IsObject(j) && memchr(rec->meta, 0, rec->meta_len) == NULL;
        cJSON_Delete(j);
        if (ok) {
            for (const char *p = end; p < rec->meta + rec->meta_len; p++)
                if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') ok = 0;
        }
        if (!ok)
            return tk_fail(err, "%s: record %llu: metadata is not one JSON object: %.60s", w->path,
                           (unsigned long long)index, rec->meta);
    }
    /* A record that would overflow the frame target starts a new frame; one larger than the target
     * gets a frame of its own. */
    if (w->frame_len > 0 && (uint64_t)w->frame_len + size > w->target) {
        if (writer_flush(w, err) != 0) return -1;
    }
    if (grow((void **)&w->frame, &w->frame_cap, w->frame_len + (size_t)size, 1) != 0)
        return writer_failed(w, err, "%s: %s", "out of memory");
    uint8_t *p = w->frame + w->frame_len;
    put32(p, (uint32_t)(size - 4));
    put32(p + 4, (uint32_t)rec->n_tokens);
    put32(p + 8, (uint32_t)rec->meta_len);
    put32(p + 12, (uint32_t)rec->n_images);
    p += RECORD_FIXED_BYTES;
    for (size_t t = 0; t < rec->n_tokens; t++, p += 4) put32(p, (uint32_t)rec->input_ids[t]);
    for (size_t t = 0; t < rec->n_tokens; t++, p += 4) put32(p, (uint32_t)rec->labels[t]);
    memcpy(p, rec->kinds, rec->n_tokens);
    p += rec->n_tokens;
    if (rec->meta_len > 0) memcpy(p, rec->meta, rec->meta_len);
    p += rec->meta_len;
    for (size_t i = 0; i < rec->n_images; i++) {
        const tk_shard_image *im = &rec->images[i];
        put32(p, im->kind);
        put32(p + 4, im->ndim);
        p += 8;
        for (uint32_t d = 0; d < im->ndim; d++, p += 8) put64(p, im->shape[d]);
        put64(p, im->nbytes);
        p += 8;
        memcpy(p, im->data, im->nbytes);
        p += im->nbytes;
    }
    TK_ASSERT((size_t)(p - (w->frame + w->frame_len)) == size);
    w->frame_len += (size_t)size;
    w->frame_records++;
    w->frame_tokens += (uint32_t)rec->n_tokens;
    w->flags |= flags;
    w->st.records++;
    w->st.tokens += rec->n_tokens;
    w->st.images += rec->n_images;
    w->st.raw_bytes += size;
    if (rec->n_tokens > w->st.max_tokens) w->st.max_tokens = rec->n_tokens;
    if (w->frame_len >= w->target) return writer_flush(w, err);
    return 0;
}

void tk_shard_writer_stats(const tk_shard_writer *w, tk_shard_stats *out) {
    TK_ASSERT(w != NULL && out != NULL);
    *out = w->st;
    out->file_bytes = 0;
}

void tk_shard_writer_abort(tk_shard_writer *w) {
    if (w == NULL) return;
    if (w->f != NULL) {
        fclose(w->f);
        w->f = NULL;
    }
    remove(w->tmp);
    writer_free(w);
}

/* fsync of the directory holding path, so the rename itself is durable (best effort). */
static void sync_parent_dir(const char *path) {
    char *copy = strdup(path);
    if (copy == NULL) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(copy);
}

int tk_shard_writer_close(tk_shard_writer *w, tk_shard_stats *final, tk_err *err) {
    if (w == NULL) return 0;
    if (w->failed || writer_flush(w, err) != 0) {
        tk_fail(err, "%s", w->fail_msg);
        tk_shard_writer_abort(w);
        return -1;
    }
    size_t index_bytes;
    uint8_t *index = NULL;
    if (tk_mul_size((size_t)w->st.frames, INDEX_ENTRY_BYTES, &index_bytes) != 0 ||
        (index_bytes > 0 && (index = tk_calloc(index_bytes, 1)) == NULL)) {
        tk_fail(err, "%s: out of memory for the frame index", w->path);
        tk_shard_writer_abort(w);
        return -1;
    }
    for (uint64_t f = 0; f < w->st.frames; f++) entry_encode(index + f * INDEX_ENTRY_BYTES, &w->index[f]);
    shard_header h = {0};
    h.version = TK_SHARD_VERSION;
    h.header_size = HEADER_BYTES;
    h.index_offset = w->offset;
    h.file_size = w->offset + index_bytes;
    h.records = w->st.records;
    h.frames = w->st.frames;
    h.tokens = w->st.tokens;
    h.images = w->st.images;
    h.flags = w->flags;
    h.vocab_size = w->vocab;
    h.frame_target = (uint32_t)w->target;
    h.level = w->level;
    h.index_crc = tk_crc32c(0, index, index_bytes);
    uint8_t head[HEADER_BYTES];
    header_encode(head, &h);
    int ok = index_bytes == 0 || fwrite(index, 1, index_bytes, w->f) == index_bytes;
    tk_free(index);
    ok = ok && fseek(w->f, 0, SEEK_SET) == 0 && fwrite(head, 1, HEADER_BYTES, w->f) == HEADER_BYTES;
    ok = ok && fflush(w->f) == 0 && fsync(fileno(w->f)) == 0;
    int saved = errno;
    ok = (fclose(w->f) == 0) && ok;
    w->f = NULL;
    if (!ok) {
        tk_fail(err, "%s: write failed: %s", w->tmp, strerror(saved ? saved : errno));
        tk_shard_writer_abort(w);
        return -1;
    }
    if (rename(w->tmp, w->path) != 0) {
        tk_fail(err, "%s: cannot rename into place: %s", w->path, strerror(errno));
        tk_shard_writer_abort(w);
        return -1;
    }
    sync_parent_dir(w->path);
    if (final != NULL) {
        *final = w->st;
        final->file_bytes = h.file_size;
    }
    writer_free(w);
    return 0;
}

/* ---- reader ---- */

/* One decompressed frame. */
typedef struct {
    uint64_t frame; /* UINT64_MAX = empty */
    uint64_t used;  /* LRU tick */
    uint8_t *buf;   /* [cap] uncompressed frame */
    size_t cap;
    uint32_t *rec_off; /* [off_cap] byte offset of each record in buf */
    size_t off_cap;
} frame_slot;

struct tk_shard_reader {
    char *path;
    int fd;
    shard_header h;
    frame_entry *frames; /* [h.frames] */
    ZSTD_DCtx *dctx;
    uint8_t *cbuf; /* [cbuf_cap] compressed frame being read */
    size_t cbuf_cap;
    frame_slot *slots; /* [n_slots] */
    size_t n_slots;
    uint32_t *slot_of; /* [h.frames] the slot holding each frame, or UINT32_MAX */
    uint64_t tick;
    int32_t *ids, *labels; /* [tok_cap], [lab_cap] the decoded record */
    size_t tok_cap, lab_cap;
    char *meta; /* [meta_cap] NUL-terminated copy */
    size_t meta_cap;
    tk_shard_image images[TK_SHARD_MAX_IMAGES];
};

void tk_shard_reader_free(tk_shard_reader *r) {
    if (r == NULL) return;
    if (r->fd >= 0) close(r->fd);
    ZSTD_freeDCtx(r->dctx);
    tk_free(r->frames);
    tk_free(r->cbuf);
    for (size_t i = 0; i < r->n_slots; i++) {
        tk_free(r->slots[i].buf);
        tk_free(r->slots[i].rec_off);
    }
    free(r->slots);
    tk_free(r->slot_of);
    tk_free(r->ids);
    tk_free(r->labels);
    tk_free(r->meta);
    free(r->path);
    free(r);
}

/* pread of exactly n bytes at off; -1 on error or a short read. */
static int read_at(int fd, void *buf, size_t n, uint64_t off) {
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t k = pread(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

#define ULL(x) ((unsigned long long)(x))

static int reader_check_header(tk_shard_reader *r, uint64_t size, const uint8_t *head, tk_err *err) {
    const shard_header *h = &r->h;
    const char *p = r->path;
    uint32_t crc = tk_crc32c(0, head, HEADER_CRC_AT);
    if (crc != get32(head + HEADER_CRC_AT))
        return tk_fail(err, "%s: header checksum mismatch (found 0x%08x, expected 0x%08x): corrupt header", p,
                       get32(head + HEADER_CRC_AT), crc);
    if (h->header_size != HEADER_BYTES)
        return tk_fail(err, "%s: header size %u (expected %u for version 1)", p, h->header_size, HEADER_BYTES);
    if (h->reserved != 0) return tk_fail(err, "%s: reserved header bytes 84..91 are not zero", p);
    if (h->flags & ~FLAGS_KNOWN)
        return tk_fail(err, "%s: unknown flags 0x%x (expected only bits 0x%x)", p, h->flags, FLAGS_KNOWN);
    if (size < h->file_size)
        return tk_fail(err, "%s: truncated (file is %llu bytes, header says %llu)", p, ULL(size), ULL(h->file_size));
    if (size > h->file_size)
        return tk_fail(err, "%s: %llu trailing bytes after the end recorded in the header (file is %llu bytes, header says %llu)",
                       p, ULL(size - h->file_size), ULL(size), ULL(h->file_size));
    if (h->vocab_size > (uint32_t)INT32_MAX)
        return tk_fail(err, "%s: vocab size %u (expected at most %d)", p, h->vocab_size, INT32_MAX);
    if (h->frame_target == 0 || h->frame_target > TK_SHARD_MAX_FRAME_BYTES)
        return tk_fail(err, "%s: frame target %u (expected 1..%llu)", p, h->frame_target, ULL(TK_SHARD_MAX_FRAME_BYTES));
    if (h->level < ZSTD_minCLevel() || h->level > ZSTD_maxCLevel())
        return tk_fail(err, "%s: zstd level %d (expected %d..%d)", p, h->level, ZSTD_minCLevel(), ZSTD_maxCLevel());
    uint64_t room = size - HEADER_BYTES;
    if (h->frames > room / INDEX_ENTRY_BYTES)
        return tk_fail(err, "%s: %llu frames cannot fit in a %llu-byte file", p, ULL(h->frames), ULL(size));
    uint64_t index_bytes = h->frames * INDEX_ENTRY_BYTES;
    if (h->index_offset != size - index_bytes)
        return tk_fail(err, "%s: index offset %llu (expected %llu: %llu frames of %u bytes end the file)", p,
                       ULL(h->index_offset), ULL(size - index_bytes), ULL(h->frames), INDEX_ENTRY_BYTES);
    if ((h->records == 0) != (h->frames == 0) || h->records < h->frames)
        return tk_fail(err, "%s: %llu records in %llu frames (expected at least one record per frame)", p,
                       ULL(h->records), ULL(h->frames));
    if (h->frames == 0 && (h->tokens != 0 || h->images != 0 || h->flags != 0))
        return tk_fail(err, "%s: empty shard with %llu tokens, %llu images, flags 0x%x (expected none)", p,
                       ULL(h->tokens), ULL(h->images), h->flags);
    if ((h->images == 0) != ((h->flags & FLAGS_KNOWN) == 0))
        return tk_fail(err, "%s: %llu images but image flags 0x%x (expected flags set exactly when there are images)",
                       p, ULL(h->images), h->flags);
    return 0;
}

static int reader_check_index(tk_shard_reader *r, const uint8_t *index, tk_err *err) {
    const shard_header *h = &r->h;
    const char *p = r->path;
    size_t n = (size_t)h->frames * INDEX_ENTRY_BYTES;
    uint32_t crc = tk_crc32c(0, index, n);
    if (crc != h->index_crc)
        return tk_fail(err, "%s: frame index checksum mismatch (found 0x%08x, header says 0x%08x): corrupt index", p,
                       crc, h->index_crc);
    uint64_t offset = HEADER_BYTES, first = 0, tokens = 0;
    for (uint64_t f = 0; f < h->frames; f++) {
        frame_entry *e = &r->frames[f];
        entry_decode(e, index + f * INDEX_ENTRY_BYTES);
        if (e->offset != offset)
            return tk_fail(err, "%s: frame %llu: offset %llu (expected %llu: frames follow the header back to back)", p,
                           ULL(f), ULL(e->offset), ULL(offset));
        if (e->records == 0 || e->first != first)
            return tk_fail(err, "%s: frame %llu: %u records from record %llu (expected at least 1, from record %llu)",
                           p, ULL(f), e->records, ULL(e->first), ULL(first));
        if (e->usize > TK_SHARD_MAX_FRAME_BYTES ||
            e->usize < (uint64_t)e->records * RECORD_FIXED_BYTES + (uint64_t)e->tokens * TOKEN_BYTES)
            return tk_fail(err, "%s: frame %llu: uncompressed size %llu for %u records of %u tokens (expected %llu..%llu)",
                           p, ULL(f), ULL(e->usize), e->records, e->tokens,
                           ULL((uint64_t)e->records * RECORD_FIXED_BYTES + (uint64_t)e->tokens * TOKEN_BYTES),
                           ULL(TK_SHARD_MAX_FRAME_BYTES));
        if (e->tokens < e->records)
            return tk_fail(err, "%s: frame %llu: %u tokens in %u records (expected at least one token per record)", p,
                           ULL(f), e->tokens, e->records);
        uint64_t bound = ZSTD_compressBound((size_t)e->usize);
        if (e->csize == 0 || e->csize > bound || e->csize > h->index_offset - offset)
            return tk_fail(err, "%s: frame %llu: compressed size %llu (expected 1..%llu, within the %llu bytes left before the index)",
                           p, ULL(f), ULL(e->csize), ULL(bound), ULL(h->index_offset - offset));
        offset += e->csize;
        first += e->records;
        tokens += e->tokens;
    }
    if (offset != h->index_offset)
        return tk_fail(err, "%s: frames end at byte %llu but the index starts at %llu (expected equal)", p, ULL(offset),
                       ULL(h->index_offset));
    if (first != h->records)
        return tk_fail(err, "%s: frames hold %llu records, header says %llu", p, ULL(first), ULL(h->records));
    if (tokens != h->tokens)
        return tk_fail(err, "%s: frames hold %llu tokens, header says %llu", p, ULL(tokens), ULL(h->tokens));
    return 0;
}

tk_shard_reader *tk_shard_reader_open(const char *path, tk_err *err) {
    TK_ASSERT(path != NULL);
    tk_shard_reader *r = calloc(1, sizeof *r);
    if (r == NULL || (r->path = strdup(path)) == NULL) {
        free(r);
        tk_fail(err, "%s: out of memory", path);
        return NULL;
    }
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        tk_fail(err, "%s: cannot open: %s", path, strerror(errno));
        tk_shard_reader_free(r);
        return NULL;
    }
    struct stat sb;
    if (fstat(r->fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        tk_fail(err, "%s: not a regular file", path);
        tk_shard_reader_free(r);
        return NULL;
    }
    uint64_t size = (uint64_t)sb.st_size;
    uint8_t head[HEADER_BYTES] = {0};
    size_t got = size < HEADER_BYTES ? (size_t)size : HEADER_BYTES;
    if (read_at(r->fd, head, got, 0) != 0) {
        tk_fail(err, "%s: cannot read the header: %s", path, strerror(errno));
        tk_shard_reader_free(r);
        return NULL;
    }
    if (got < 8 || memcmp(head, SHARD_MAGIC, 8) != 0) {
        tk_fail(err, "%s: not a tspeft shard (bad magic at byte 0, expected \"TKSHARD\\0\")", path);
        tk_shard_reader_free(r);
        return NULL;
    }
    uint32_t version = got >= 12 ? get32(head + 8) : 0;
    if (got >= 12 && version != TK_SHARD_VERSION) {
        tk_fail(err, "%s: unsupported shard version %u (this build reads version %d)", path, version, TK_SHARD_VERSION);
        tk_shard_reader_free(r);
        return NULL;
    }
    if (got < HEADER_BYTES) {
        tk_fail(err, "%s: truncated (file is %llu bytes, the header alone is %u)", path, ULL(size), HEADER_BYTES);
        tk_shard_reader_free(r);
        return NULL;
    }
    header_decode(&r->h, head);
    if (reader_check_header(r, size, head, err) != 0) {
        tk_shard_reader_free(r);
        return NULL;
    }
    size_t index_bytes = (size_t)r->h.frames * INDEX_ENTRY_BYTES; /* <= file size: checked */
    uint8_t *index = index_bytes ? tk_calloc(index_bytes, 1) : NULL;
    r->frames = r->h.frames ? tk_calloc((size_t)r->h.frames, sizeof(frame_entry)) : NULL;
    r->dctx = ZSTD_createDCtx();
    r->slots = calloc(1, sizeof(frame_slot));
    r->slot_of = r->h.frames ? tk_calloc((size_t)r->h.frames, sizeof(uint32_t)) : NULL;
    if ((index_bytes && (index == NULL || r->frames == NULL || r->slot_of == NULL)) || r->dctx == NULL ||
        r->slots == NULL) {
        tk_free(index);
        tk_fail(err, "%s: out of memory for a %llu-frame index", path, ULL(r->h.frames));
        tk_shard_reader_free(r);
        return NULL;
    }
    r->n_slots = 1;
    r->slots[0].frame = UINT64_MAX;
    for (uint64_t f = 0; f < r->h.frames; f++) r->slot_of[f] = UINT32_MAX;
    if (index_bytes && read_at(r->fd, index, index_bytes, r->h.index_offset) != 0) {
        tk_free(index);
        tk_fail(err, "%s: cannot read the frame index at byte %llu", path, ULL(r->h.index_offset));
        tk_shard_reader_free(r);
        return NULL;
    }
    int rc = reader_check_index(r, index, err);
    tk_free(index);
    if (rc != 0) {
        tk_shard_reader_free(r);
        return NULL;
    }
    return r;
}

const char *tk_shard_reader_path(const tk_shard_reader *r) { return r->path; }
uint64_t tk_shard_reader_count(const tk_shard_reader *r) { return r->h.records; }
uint64_t tk_shard_reader_frame_count(const tk_shard_reader *r) { return r->h.frames; }
uint32_t tk_shard_reader_vocab_size(const tk_shard_reader *r) { return r->h.vocab_size; }

void tk_shard_reader_stats(const tk_shard_reader *r, tk_shard_stats *out) {
    TK_ASSERT(r != NULL && out != NULL);
    memset(out, 0, sizeof *out);
    out->records = r->h.records;
    out->frames = r->h.frames;
    out->tokens = r->h.tokens;
    out->images = r->h.images;
    for (uint64_t f = 0; f < r->h.frames; f++) {
        out->raw_bytes += r->frames[f].usize;
        out->compressed_bytes += r->frames[f].csize;
    }
    out->file_bytes = r->h.file_size;
}

void tk_shard_reader_frame_records(const tk_shard_reader *r, uint64_t f, uint64_t *first, uint64_t *count) {
    TK_ASSERT(r != NULL && f < r->h.frames);
    *first = r->frames[f].first;
    *count = r->frames[f].records;
}

uint64_t tk_shard_reader_frame_of(const tk_shard_reader *r, uint64_t index) {
    TK_ASSERT(r != NULL && index < r->h.records);
    uint64_t lo = 0, hi = r->h.frames; /* frames[lo].first <= index < frames[hi].first */
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (r->frames[mid].first <= index) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

int tk_shard_reader_set_cache(tk_shard_reader *r, size_t frames, tk_err *err) {
    TK_ASSERT(r != NULL);
    if (frames > r->h.frames) frames = (size_t)r->h.frames;
    if (frames >= UINT32_MAX) frames = UINT32_MAX - 1;
    if (frames == 0) frames = 1;
    if (frames == r->n_slots) return 0;
    frame_slot *s = calloc(frames, sizeof *s);
    if (s == NULL) return tk_fail(err, "%s: out of memory for a %zu-frame cache", r->path, frames);
    for (size_t i = 0; i < r->n_slots; i++) {
        tk_free(r->slots[i].buf);
        tk_free(r->slots[i].rec_off);
    }
    free(r->slots);
    for (size_t i = 0; i < frames; i++) s[i].frame = UINT64_MAX;
    for (uint64_t f = 0; f < r->h.frames; f++) r->slot_of[f] = UINT32_MAX;
    r->slots = s;
    r->n_slots = frames;
    return 0;
}

/* Parses the record at buf[0..avail) (avail: bytes left in the frame). Fills rec's sizes, kinds,
 * image descriptions (into r->images) and meta pointers (into buf); ids and labels are left NULL.
 * *ids_at is the offset of the input ids in buf. Returns the record's size including its length
 * prefix, or 0 with why set. */
static size_t record_parse(tk_shard_reader *r, const uint8_t *buf, size_t avail, tk_shard_record *rec,
                           size_t *ids_at, char *why, size_t cap) {
    if (avail < RECORD_FIXED_BYTES) {
        snprintf(why, cap, "%zu bytes left in the frame (expected a record of at least %u)", avail, RECORD_FIXED_BYTES);
        return 0;
    }
    uint64_t body = get32(buf);
    if (body > avail - 4 || body < RECORD_FIXED_BYTES - 4) {
        snprintf(why, cap, "record length %llu (expected %u..%zu, the bytes left in the frame)", ULL(body),
                 RECORD_FIXED_BYTES - 4, avail - 4);
        return 0;
    }
    size_t end = 4 + (size_t)body;
    uint64_t n = get32(buf + 4), meta_len = get32(buf + 8), n_images = get32(buf + 12);
    size_t at = RECORD_FIXED_BYTES;
    if (n == 0 || n > (end - at) / TOKEN_BYTES) {
        snprintf(why, cap, "%llu tokens (expected 1..%zu in a %zu-byte record)", ULL(n), (end - at) / TOKEN_BYTES, end);
        return 0;
    }
    at += (size_t)n * TOKEN_BYTES;
    if (meta_len > TK_SHARD_MAX_META_BYTES || meta_len > end - at) {
        snprintf(why, cap, "metadata length %llu (expected at most %zu)", ULL(meta_len),
                 end - at < TK_SHARD_MAX_META_BYTES ? end - at : TK_SHARD_MAX_META_BYTES);
        return 0;
    }
    *ids_at = RECORD_FIXED_BYTES;
    rec->n_tokens = (size_t)n;
    rec->input_ids = NULL;
    rec->labels = NULL;
    rec->kinds = buf + RECORD_FIXED_BYTES + 8 * (size_t)n;
    rec->meta = (const char *)buf + at;
    rec->meta_len = (size_t)meta_len;
    at += (size_t)meta_len;
    if (meta_check_light(rec->meta, rec->meta_len, why, cap) != 0) return 0;
    if (n_images > TK_SHARD_MAX_IMAGES) {
        snprintf(why, cap, "%llu images (expected at most %d)", ULL(n_images), TK_SHARD_MAX_IMAGES);
        return 0;
    }
    uint32_t flags = 0;
    for (size_t i = 0; i < (size_t)n_images; i++) {
        tk_shard_image *im = &r->images[i];
        memset(im, 0, sizeof *im);
        if (end - at < 8) {
            snprintf(why, cap, "image %zu: record ends inside the image header", i);
            return 0;
        }
        im->kind = get32(buf + at);
        im->ndim = get32(buf + at + 4);
        at += 8;
        if (im->ndim > TK_SHARD_MAX_IMAGE_DIMS || end - at < 8 * (size_t)im->ndim + 8) {
            snprintf(why, cap, "image %zu: %u dims (expected at most %d, inside the record)", i, im->ndim,
                     TK_SHARD_MAX_IMAGE_DIMS);
            return 0;
        }
        for (uint32_t d = 0; d < im->ndim; d++, at += 8) im->shape[d] = get64(buf + at);
        uint64_t nb = get64(buf + at);
        at += 8;
        if (nb > end - at) {
            snprintf(why, cap, "image %zu: %llu bytes (expected at most the %zu left in the record)", i, ULL(nb), end - at);
            return 0;
        }
        im->nbytes = (size_t)nb;
        im->data = buf + at;
        at += (size_t)nb;
        uint64_t b;
        if (image_check(im, i, &flags, &b, why, cap) != 0) return 0;
    }
    if ((flags & ~r->h.flags) != 0) {
        snprintf(why, cap, "image kinds 0x%x not announced by the header flags 0x%x", flags, r->h.flags);
        return 0;
    }
    if (at != end) {
        snprintf(why, cap, "record length %zu but its fields take %zu bytes", end, at);
        return 0;
    }
    rec->n_images = (size_t)n_images;
    rec->images = n_images ? r->images : NULL;
    const uint8_t *ids = buf + RECORD_FIXED_BYTES, *labels = ids + 4 * (size_t)n;
    for (size_t t = 0; t < (size_t)n; t++) {
        if (token_check((int32_t)get32(ids + 4 * t), (int32_t)get32(labels + 4 * t), rec->kinds[t], t, r->h.vocab_size,
                        why, cap) != 0)
            return 0;
    }
    return end;
}

/* Decompresses and verifies frame f into slot s. */
static int frame_load(tk_shard_reader *r, uint64_t f, frame_slot *s, tk_err *err) {
    const frame_entry *e = &r->frames[f];
    const char *p = r->path;
    s->frame = UINT64_MAX;
    if (grow((void **)&r->cbuf, &r->cbuf_cap, (size_t)e->csize, 1) != 0 ||
        grow((void **)&s->buf, &s->cap, (size_t)e->usize, 1) != 0 ||
        grow((void **)&s->rec_off, &s->off_cap, e->records, sizeof(uint32_t)) != 0)
        return tk_fail(err, "%s: frame %llu: out of memory for %llu bytes", p, ULL(f), ULL(e->usize));
    if (read_at(r->fd, r->cbuf, (size_t)e->csize, e->offset) != 0)
        return tk_fail(err, "%s: frame %llu (offset %llu): cannot read %llu bytes (file truncated since it was opened?)",
                       p, ULL(f), ULL(e->offset), ULL(e->csize));
    uint32_t crc = tk_crc32c(0, r->cbuf, (size_t)e->csize);
    if (crc != e->ccrc)
        return tk_fail(err, "%s: frame %llu (offset %llu): checksum mismatch on the compressed bytes (found 0x%08x, expected 0x%08x)",
                       p, ULL(f), ULL(e->offset), crc, e->ccrc);
    unsigned long long content = ZSTD_getFrameContentSize(r->cbuf, (size_t)e->csize);
    size_t whole = ZSTD_findFrameCompressedSize(r->cbuf, (size_t)e->csize);
    if (content != e->usize || ZSTD_isError(whole) || whole != e->csize)
        return tk_fail(err, "%s: frame %llu (offset %llu): not one zstd frame of %llu bytes decompressing to %llu", p, ULL(f),
                       ULL(e->offset), ULL(e->csize), ULL(e->usize));
    size_t got = ZSTD_decompressDCtx(r->dctx, s->buf, (size_t)e->usize, r->cbuf, (size_t)e->csize);
    if (ZSTD_isError(got) || got != e->usize)
        return tk_fail(err, "%s: frame %llu (offset %llu): zstd decompression failed: %s", p, ULL(f), ULL(e->offset),
                       ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short output");
    crc = tk_crc32c(0, s->buf, (size_t)e->usize);
    if (crc != e->ucrc)
        return tk_fail(err, "%s: frame %llu (offset %llu): checksum mismatch on the decompressed bytes (found 0x%08x, expected 0x%08x)",
                       p, ULL(f), ULL(e->offset), crc, e->ucrc);
    size_t at = 0;
    uint64_t tokens = 0;
    char why[300];
    for (uint32_t i = 0; i < e->records; i++) {
        tk_shard_record rec;
        size_t ids_at;
        size_t n = record_parse(r, s->buf + at, (size_t)e->usize - at, &rec, &ids_at, why, sizeof why);
        if (n == 0)
            return tk_fail(err, "%s: frame %llu (offset %llu): record %llu (frame byte %zu): %s", p, ULL(f),
                           ULL(e->offset), ULL(e->first + i), at, why);
        s->rec_off[i] = (uint32_t)at;
        at += n;
        tokens += rec.n_tokens;
    }
    if (at != e->usize)
        return tk_fail(err, "%s: frame %llu (offset %llu): %llu bytes after the last of its %u records", p, ULL(f),
                       ULL(e->offset), ULL(e->usize - at), e->records);
    if (tokens != e->tokens)
        return tk_fail(err, "%s: frame %llu (offset %llu): %llu tokens but the index says %u", p, ULL(f), ULL(e->offset),
                       ULL(tokens), e->tokens);
    s->frame = f;
    return 0;
}

int tk_shard_reader_get(tk_shard_reader *r, uint64_t index, tk_shard_record *out, tk_err *err) {
    TK_ASSERT(r != NULL && out != NULL);
    if (index >= r->h.records)
        return tk_fail(err, "%s: record %llu out of range (the shard has %llu)", r->path, ULL(index), ULL(r->h.records));
    uint64_t f = tk_shard_reader_frame_of(r, index);
    frame_slot *s = NULL;
    if (r->slot_of[f] != UINT32_MAX) {
        s = &r->slots[r->slot_of[f]];
        TK_ASSERT(s->frame == f);
    } else {
        s = &r->slots[0];
        for (size_t i = 1; i < r->n_slots; i++) {
            if (r->slots[i].used < s->used) s = &r->slots[i];
        }
        if (s->frame != UINT64_MAX) r->slot_of[s->frame] = UINT32_MAX;
        if (frame_load(r, f, s, err) != 0) return -1;
        r->slot_of[f] = (uint32_t)(s - r->slots);
    }
    s->used = ++r->tick;
    const frame_entry *e = &r->frames[f];
    size_t at = s->rec_off[index - e->first];
    char why[300];
    size_t ids_at;
    size_t n = record_parse(r, s->buf + at, (size_t)e->usize - at, out, &ids_at, why, sizeof why);
    TK_ASSERT(n != 0); /* the whole frame was checked by frame_load */
    size_t nt = out->n_tokens;
    if (grow((void **)&r->ids, &r->tok_cap, nt, sizeof(int32_t)) != 0 ||
        grow((void **)&r->labels, &r->lab_cap, nt, sizeof(int32_t)) != 0)
        return tk_fail(err, "%s: out of memory for a %zu-token record", r->path, nt);
    const uint8_t *ids = s->buf + at + ids_at, *labels = ids + 4 * nt;
    for (size_t t = 0; t < nt; t++) {
        r->ids[t] = (int32_t)get32(ids + 4 * t);
        r->labels[t] = (int32_t)get32(labels + 4 * t);
    }
    out->input_ids = r->ids;
    out->labels = r->labels;
    if (grow((void **)&r->meta, &r->meta_cap, out->meta_len + 1, 1) != 0)
        return tk_fail(err, "%s: out of memory for metadata", r->path);
    memcpy(r->meta, out->meta, out->meta_len);
    r->meta[out->meta_len] = 0;
    out->meta = r->meta;
    return 0;
}
