/* fuzz_shard.c: tk_shard_reader_open on an arbitrary shard file (datasets/shard.h, format in
 * docs/shards.md), then tk_shard_reader_get of every record in order, the last and the first again
 * (a cached frame, then an evicted one), and one index past the end (must fail with a message).
 * Accepted records are held to the reader's promises: at least one token, ids >= 0 and below the
 * recorded vocabulary, labels -100 or like ids, kinds 0..3, metadata NUL-terminated at meta_len, at
 * most 256 images each of a known kind with nbytes matching its shape.
 *
 * The status returned is the reader's on the bytes as given. Every shard is protected by CRC-32C
 * checksums (header, index, each frame compressed and decompressed), which a mutating fuzzer rarely
 * gets right, so the same input is read a second time with all four checksums recomputed ("repaired":
 * the frame's zstd bytes decompressed here to checksum them); that second outcome is not returned but
 * held to the same invariants (accepted records valid; a rejection is one non-empty line naming the
 * file). That lets the fuzzer reach the index, zstd and record checks behind the checksums.
 */
#include "datasets/crc32c.h"
#include "datasets/shard.h"
#include "fuzz_common.h"

#include <stdlib.h>
#include <string.h>
#include <zstd.h>

enum { HDR = 96, HDR_CRC_AT = 92, ENTRY = 48 };

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* The reader's outcome on path; checks what an accepted shard promises. */
static int read_all(const char *path, tk_err *err) {
    tk_shard_reader *r = tk_shard_reader_open(path, err);
    if (!r) return -1;
    uint64_t n = tk_shard_reader_count(r);
    uint32_t vocab = tk_shard_reader_vocab_size(r);
    TKF_REQUIRE(vocab <= (uint32_t)INT32_MAX);
    TKF_REQUIRE((n == 0) == (tk_shard_reader_frame_count(r) == 0));
    uint64_t order[3] = {n ? n - 1 : 0, 0, n};
    int rc = 0;
    for (uint64_t k = 0; k < n + 3 && rc == 0; k++) {
        uint64_t i = k < n ? k : order[k - n];
        tk_shard_record rec;
        int got = tk_shard_reader_get(r, i, &rec, err);
        if (i >= n) {
            TKF_REQUIRE(got == -1 && err->msg[0] != '\0'); /* out of range: refused, explained */
            memset(err, 0, sizeof *err);
            continue;
        }
        if (got != 0) {
            rc = -1; /* a frame's contents were refused: the shard is bad */
            break;
        }
        TKF_REQUIRE(rec.n_tokens >= 1 && rec.input_ids && rec.labels && rec.kinds && rec.meta);
        for (size_t t = 0; t < rec.n_tokens; t++) {
            int32_t id = rec.input_ids[t], lab = rec.labels[t];
            TKF_REQUIRE(id >= 0 && (vocab == 0 || (uint32_t)id < vocab));
            TKF_REQUIRE(lab == TK_SHARD_LABEL_IGNORE || (lab >= 0 && (vocab == 0 || (uint32_t)lab < vocab)));
            TKF_REQUIRE(rec.kinds[t] <= TK_KIND_IMAGE);
        }
        TKF_REQUIRE(rec.meta_len <= TK_SHARD_MAX_META_BYTES && rec.meta[rec.meta_len] == '\0');
        TKF_REQUIRE(memchr(rec.meta, '\0', rec.meta_len) == NULL);
        TKF_REQUIRE(rec.n_images <= TK_SHARD_MAX_IMAGES && (rec.n_images == 0) == (rec.images == NULL));
        for (size_t m = 0; m < rec.n_images; m++) {
            const tk_shard_image *im = &rec.images[m];
            TKF_REQUIRE(im->data != NULL && im->nbytes >= 1);
            if (im->kind == TK_IMAGE_ENCODED) {
                TKF_REQUIRE(im->ndim == 0);
            } else {
                TKF_REQUIRE(im->kind == TK_IMAGE_F16_FEATURES);
                TKF_REQUIRE(im->ndim >= 1 && im->ndim <= TK_SHARD_MAX_IMAGE_DIMS);
                uint64_t b = 2;
                for (uint32_t d = 0; d < im->ndim; d++) b *= im->shape[d]; /* <= 1 GiB: checked */
                TKF_REQUIRE(b == (uint64_t)im->nbytes);
            }
            /* touch every payload byte (ASan: it lies inside the frame buffer) */
            volatile uint8_t sum = 0;
            for (size_t b = 0; b < im->nbytes; b++) sum ^= im->data[b];
            (void)sum;
        }
    }
    tk_shard_reader_free(r);
    return rc;
}

/* Recomputes the header, index and frame checksums of a shard-like buffer in place, as far as the
 * header's counts and the index entries allow. Frames decompress here (up to 16 MiB each) for
 * their uncompressed checksum. */
static void repair(uint8_t *b, size_t n) {
    if (n < HDR) return;
    uint64_t frames = get64(b + 32), index_offset = get64(b + 56);
    if (frames <= (n - HDR) / ENTRY && index_offset <= n && n - index_offset >= frames * ENTRY) {
        for (uint64_t f = 0; f < frames; f++) {
            uint8_t *e = b + index_offset + f * ENTRY;
            uint64_t off = get64(e), csize = get64(e + 8), usize = get64(e + 16);
            if (off > n || csize > n - off) continue;
            put32(e + 40, tk_crc32c(0, b + off, (size_t)csize));
            if (usize > ((size_t)16 << 20)) continue;
            uint8_t *u = malloc(usize ? (size_t)usize : 1);
            TKF_REQUIRE(u != NULL);
            size_t got = ZSTD_decompress(u, (size_t)usize, b + off, (size_t)csize);
            if (!ZSTD_isError(got) && got == usize) put32(e + 44, tk_crc32c(0, u, (size_t)usize));
            free(u);
        }
        put32(b + 80, tk_crc32c(0, b + index_offset, (size_t)(frames * ENTRY)));
    }
    put32(b + HDR_CRC_AT, tk_crc32c(0, b, HDR_CRC_AT));
}

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("data.shard");
    tkf_write(path, data, size);
    int rc = read_all(path, err);

    uint8_t *copy = malloc(size ? size : 1);
    TKF_REQUIRE(copy != NULL);
    memcpy(copy, data, size);
    repair(copy, size);
    tkf_write(path, copy, size);
    free(copy);
    tk_err rerr = {0};
    if (read_all(path, &rerr) != 0) {
        TKF_REQUIRE(rerr.msg[0] != '\0' && strchr(rerr.msg, '\n') == NULL);
        TKF_REQUIRE(strstr(rerr.msg, path) != NULL);
    }
    return rc;
}
