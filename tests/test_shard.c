/* test_shard.c: the shard writer and reader (datasets/shard.c, format in docs/shards.md).
 *
 * Round trip of a few thousand generated records (image payloads of both kinds, metadata, records
 * without metadata) over many frames, read back in order and at random; a record far larger than the
 * frame target; an empty shard; statistics; records the writer must refuse; a failed or abandoned
 * write leaving an existing file untouched; and damaged files: truncations at many lengths, header,
 * index and frame bit flips, and frames built by an independent writer of the documented layout
 * (below) whose checksums are right but whose contents are wrong. Every damaged shard must fail at
 * open or at read with one line naming the path (and the frame, for a frame's contents).
 * Writes into a fresh mkdtemp directory under /tmp. Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/crc32c.h"
#include "datasets/shard.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

static int n_fail = 0;
static int n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-72s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
    }
}

static char g_dir[64];

static void path_in(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", g_dir, name); }

/* ---- generated records ---- */

static uint64_t lcg(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

/* A record with its own storage. */
typedef struct {
    tk_shard_record rec;
    int32_t *ids, *labels;
    uint8_t *kinds;
    char meta[160];
    tk_shard_image images[2];
    uint8_t *img_data[2];
} owned_record;

/* Record i: length 1..300 (or n_big), prompt then response tokens, image tokens and payloads on some
 * records, metadata on most. */
static void make_record(owned_record *o, size_t i, size_t n_big) {
    memset(o, 0, sizeof *o);
    uint64_t s = i * 7919 + 17;
    size_t n = n_big ? n_big : 1 + (size_t)(lcg(&s) % 300);
    o->ids = malloc(n * sizeof(int32_t));
    o->labels = malloc(n * sizeof(int32_t));
    o->kinds = malloc(n);
    TK_ASSERT(o->ids && o->labels && o->kinds);
    size_t prompt = n / 2;
    for (size_t t = 0; t < n; t++) {
        o->ids[t] = (int32_t)((i * 131 + t * 7 + (lcg(&s) & 3)) % 32000);
        o->kinds[t] = t < prompt ? TK_KIND_PROMPT : TK_KIND_RESPONSE;
        o->labels[t] = t < prompt ? TK_SHARD_LABEL_IGNORE : o->ids[t];
    }
    size_t n_img = 0;
    if (i % 10 == 0 && n >= 4) { /* encoded bytes */
        size_t nb = 50 + i % 200;
        o->img_data[n_img] = malloc(nb);
        for (size_t k = 0; k < nb; k++) o->img_data[n_img][k] = (uint8_t)lcg(&s);
        o->images[n_img] = (tk_shard_image){.kind = TK_IMAGE_ENCODED, .nbytes = nb, .data = o->img_data[n_img]};
        n_img++;
    }
    if (i % 15 == 0 && n >= 4) { /* F16 features [4, 8 + i % 3] */
        uint64_t c = 8 + i % 3;
        size_t nb = (size_t)(2 * 4 * c);
        o->img_data[n_img] = malloc(nb);
        for (size_t k = 0; k < nb / 2; k++) {
            uint16_t h = tk_f32_to_f16((float)(k + i) * 0.25f);
            o->img_data[n_img][2 * k] = (uint8_t)h;
            o->img_data[n_img][2 * k + 1] = (uint8_t)(h >> 8);
        }
        o->images[n_img] = (tk_shard_image){.kind = TK_IMAGE_F16_FEATURES, .ndim = 2, .shape = {4, c}, .nbytes = nb,
                                            .data = o->img_data[n_img]};
        n_img++;
    }
    for (size_t k = 0; k < n_img; k++) o->kinds[k] = TK_KIND_IMAGE; /* one image token per image */
    if (i % 7 != 3) {
        snprintf(o->meta, sizeof o->meta, "{\"task\": \"boolq\", \"id\": \"r%zu\", \"answer\": \"%s\", \"choices\": [\"true\", \"false\"]}",
                 i, i % 2 ? "true" : "false");
    }
    o->rec = (tk_shard_record){.n_tokens = n, .input_ids = o->ids, .labels = o->labels, .kinds = o->kinds,
                               .meta_len = strlen(o->meta), .meta = o->meta, .n_images = n_img,
                               .images = n_img ? o->images : NULL};
}

static void free_record(owned_record *o) {
    free(o->ids);
    free(o->labels);
    free(o->kinds);
    free(o->img_data[0]);
    free(o->img_data[1]);
}

static int same_record(const tk_shard_record *a, const tk_shard_record *b) {
    if (a->n_tokens != b->n_tokens || a->meta_len != b->meta_len || a->n_images != b->n_images) return 0;
    if (memcmp(a->input_ids, b->input_ids, a->n_tokens * 4) || memcmp(a->labels, b->labels, a->n_tokens * 4) ||
        memcmp(a->kinds, b->kinds, a->n_tokens))
        return 0;
    if (a->meta_len && memcmp(a->meta, b->meta, a->meta_len)) return 0;
    for (size_t k = 0; k < a->n_images; k++) {
        const tk_shard_image *x = &a->images[k], *y = &b->images[k];
        if (x->kind != y->kind || x->ndim != y->ndim || x->nbytes != y->nbytes || memcmp(x->data, y->data, x->nbytes))
            return 0;
        for (uint32_t d = 0; d < x->ndim; d++)
            if (x->shape[d] != y->shape[d]) return 0;
    }
    return 1;
}

/* Writes records 0..n-1 (record big_at gets n_big tokens when n_big > 0). */
static int write_shard(const char *path, size_t n, size_t frame_target, size_t big_at, size_t n_big, tk_shard_stats *st,
                       tk_err *err) {
    tk_shard_writer_opts o = {.level = 3, .frame_target = frame_target, .vocab_size = 32000};
    tk_shard_writer *w = tk_shard_writer_open(path, &o, err);
    if (w == NULL) return -1;
    for (size_t i = 0; i < n; i++) {
        owned_record r;
        make_record(&r, i, n_big && i == big_at ? n_big : 0);
        int rc = tk_shard_writer_add(w, &r.rec, err);
        free_record(&r);
        if (rc != 0) {
            tk_shard_writer_abort(w);
            return -1;
        }
    }
    return tk_shard_writer_close(w, st, err);
}

/* ---- file surgery ---- */

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    TK_ASSERT(f != NULL);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    rewind(f);
    uint8_t *buf = malloc((size_t)len + 1);
    TK_ASSERT(buf && fread(buf, 1, (size_t)len, f) == (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static void spit(const char *path, const uint8_t *buf, size_t n) {
    FILE *f = fopen(path, "wb");
    TK_ASSERT(f != NULL && fwrite(buf, 1, n, f) == n && fclose(f) == 0);
}

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

/* Recomputes the index and header checksums of a shard image in memory (after deliberate edits). */
static void reseal(uint8_t *buf, size_t n) {
    uint64_t frames = get64(buf + 32), index = get64(buf + 56);
    if (index + frames * 48 <= n) put32(buf + 80, tk_crc32c(0, buf + index, (size_t)frames * 48));
    put32(buf + 92, tk_crc32c(0, buf, 92));
}

/* Opens path and, if that works, reads every record; returns the first error (0 if none). */
static int open_and_read_all(const char *path, tk_err *err, int *failed_at_open) {
    *failed_at_open = 0;
    tk_shard_reader *r = tk_shard_reader_open(path, err);
    if (r == NULL) {
        *failed_at_open = 1;
        return -1;
    }
    tk_shard_record rec;
    int rc = 0;
    for (uint64_t i = 0; i < tk_shard_reader_count(r) && rc == 0; i++) rc = tk_shard_reader_get(r, i, &rec, err);
    tk_shard_reader_free(r);
    return rc;
}

/* The damaged file at path must fail, with a message naming path (and "frame F" when frame >= 0). */
static void expect_failure(const char *path, long frame, const char *needle, const char *what) {
    tk_err err = {0};
    int at_open;
    int rc = open_and_read_all(path, &err, &at_open);
    int ok = rc != 0 && strstr(err.msg, path) != NULL && strchr(err.msg, '\n') == NULL;
    if (ok && frame >= 0) {
        char f[32];
        snprintf(f, sizeof f, "frame %ld", frame);
        ok = strstr(err.msg, f) != NULL;
    }
    if (ok && needle) ok = strstr(err.msg, needle) != NULL;
    check(ok, what);
    if (!ok || getenv("TK_TEST_VERBOSE")) printf("    -> (%s) %s\n", rc == 0 ? "no error" : at_open ? "open" : "read", err.msg);
}

/* ---- an independent writer of the documented layout, for crafted frames ---- */

/* Appends one record in the documented layout to buf (at *len); returns the record's byte size. */
static size_t raw_record(uint8_t *buf, size_t *len, uint32_t n, const int32_t *ids, const int32_t *labels,
                         const uint8_t *kinds, const char *meta) {
    uint8_t *p = buf + *len;
    uint32_t ml = (uint32_t)strlen(meta);
    uint32_t body = 12 + 9 * n + ml;
    put32(p, body);
    put32(p + 4, n);
    put32(p + 8, ml);
    put32(p + 12, 0);
    p += 16;
    for (uint32_t t = 0; t < n; t++, p += 4) put32(p, (uint32_t)ids[t]);
    for (uint32_t t = 0; t < n; t++, p += 4) put32(p, (uint32_t)labels[t]);
    memcpy(p, kinds, n);
    p += n;
    memcpy(p, meta, ml);
    *len += 4 + body;
    return 4 + body;
}

/* Writes a shard of the given uncompressed frames (records[f] records, tokens[f] tokens each). */
static void raw_shard(const char *path, uint8_t *const *frames, const size_t *usize, const uint32_t *records,
                      const uint32_t *tokens, size_t nf) {
    size_t cap = 96 + 48 * nf;
    for (size_t f = 0; f < nf; f++) cap += ZSTD_compressBound(usize[f]);
    uint8_t *out = calloc(1, cap);
    TK_ASSERT(out != NULL);
    uint8_t *index = calloc(nf ? nf : 1, 48);
    size_t at = 96;
    uint64_t first = 0, rec_total = 0, tok_total = 0;
    for (size_t f = 0; f < nf; f++) {
        size_t cs = ZSTD_compress(out + at, cap - at, frames[f], usize[f], 3);
        TK_ASSERT(!ZSTD_isError(cs));
        uint8_t *e = index + 48 * f;
        put64(e, at);
        put64(e + 8, cs);
        put64(e + 16, usize[f]);
        put64(e + 24, first);
        put32(e + 32, records[f]);
        put32(e + 36, tokens[f]);
        put32(e + 40, tk_crc32c(0, out + at, cs));
        put32(e + 44, tk_crc32c(0, frames[f], usize[f]));
        at += cs;
        first += records[f];
        rec_total += records[f];
        tok_total += tokens[f];
    }
    memcpy(out + at, index, 48 * nf);
    size_t size = at + 48 * nf;
    memcpy(out, "TKSHARD", 8);
    put32(out + 8, 1);
    put32(out + 12, 96);
    put64(out + 16, size);
    put64(out + 24, rec_total);
    put64(out + 32, nf);
    put64(out + 40, tok_total);
    put64(out + 48, 0);
    put64(out + 56, at);
    put32(out + 64, 0);
    put32(out + 68, 100);
    put32(out + 72, 1 << 20);
    put32(out + 76, 3);
    reseal(out, size);
    spit(path, out, size);
    free(out);
    free(index);
}

static void test_crafted(void) {
    printf("independent writer of the documented layout; crafted frame contents\n");
    char path[256];
    int32_t ids[3] = {5, 6, 7}, labels[3] = {-100, 6, 7};
    uint8_t kinds[3] = {1, 2, 2};
    uint8_t frame[2][512];
    size_t us[2] = {0, 0};
    uint32_t recs[2] = {2, 1}, toks[2] = {6, 3};
    raw_record(frame[0], &us[0], 3, ids, labels, kinds, "{\"id\": 1}");
    raw_record(frame[0], &us[0], 3, ids, labels, kinds, "");
    raw_record(frame[1], &us[1], 3, ids, labels, kinds, "{}");
    uint8_t *fr[2] = {frame[0], frame[1]};
    path_in(path, sizeof path, "raw_good.shard");
    raw_shard(path, fr, us, recs, toks, 2);
    tk_err err = {0};
    tk_shard_reader *r = tk_shard_reader_open(path, &err);
    check(r != NULL && tk_shard_reader_count(r) == 3 && tk_shard_reader_frame_count(r) == 2,
          "a shard written from the spec alone opens: 3 records, 2 frames");
    tk_shard_record rec;
    int ok = r != NULL && tk_shard_reader_get(r, 2, &rec, &err) == 0 && rec.n_tokens == 3 && rec.input_ids[2] == 7 &&
             rec.labels[0] == -100 && rec.kinds[1] == 2 && strcmp(rec.meta, "{}") == 0 &&
             tk_shard_reader_get(r, 1, &rec, &err) == 0 && rec.meta_len == 0 && rec.meta[0] == 0;
    check(ok, "its records read back field by field");
    tk_shard_reader_free(r);
    if (!ok) printf("    -> %s\n", err.msg);

    /* Each variant breaks frame 1 only; the checksums are computed over the broken bytes. */
    struct {
        const char *name, *needle, *what;
    } cases[] = {
        {"raw_kind.shard", "kind 9", "token kind 9 -> frame 1, record 2"},
        {"raw_label.shard", "label -5", "label -5 -> frame 1"},
        {"raw_id.shard", "input id 100", "id 100 >= vocab 100 recorded in the header -> frame 1"},
        {"raw_len.shard", "record length", "record length beyond the frame -> frame 1"},
        {"raw_ntok.shard", "tokens", "token count larger than the record -> frame 1"},
        {"raw_meta.shard", "metadata", "metadata not a JSON object -> frame 1"},
        {"raw_tail.shard", "after the last", "garbage after the last record -> frame 1"},
        {"raw_toksum.shard", "index says", "index token count differs from the records -> frame 1"},
        {"raw_nul.shard", "NUL", "metadata with a NUL byte -> frame 1"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint8_t bad[600];
        size_t n = 0;
        uint32_t brec[2] = {2, 1}, btok[2] = {6, 3};
        int32_t bids[3] = {5, 6, 7}, blab[3] = {-100, 6, 7};
        uint8_t bkind[3] = {1, 2, 2};
        const char *meta = "{}";
        if (c == 0) bkind[1] = 9;
        if (c == 1) blab[2] = -5;
        if (c == 2) bids[0] = 100;
        if (c == 5) meta = "[1, 2]";
        if (c == 8) meta = "{x}";
        raw_record(bad, &n, 3, bids, blab, bkind, meta);
        if (c == 8) bad[n - 2] = 0; /* "{x}" -> "{\0}" */
        if (c == 3) put32(bad, 400);
        if (c == 4) put32(bad + 4, 1000);
        if (c == 6) {
            memset(bad + n, 0, 20);
            n += 20;
        }
        if (c == 7) btok[1] = 2;
        uint8_t *bf[2] = {frame[0], bad};
        size_t bus[2] = {us[0], n};
        path_in(path, sizeof path, cases[c].name);
        raw_shard(path, bf, bus, brec, btok, 2);
        expect_failure(path, 1, cases[c].needle, cases[c].what);
    }

    /* Frame 0 replaced by bytes that are not zstd, checksums right. */
    {
        uint8_t *buf;
        size_t n;
        path_in(path, sizeof path, "raw_good.shard");
        buf = slurp(path, &n);
        uint64_t idx = get64(buf + 56);
        uint64_t off = get64(buf + idx); /* frame 0 */
        uint64_t cs = get64(buf + idx + 8);
        memset(buf + off, 0x41, (size_t)cs);
        put32(buf + idx + 40, tk_crc32c(0, buf + off, (size_t)cs));
        reseal(buf, n);
        path_in(path, sizeof path, "raw_notzstd.shard");
        spit(path, buf, n);
        free(buf);
        expect_failure(path, 0, "zstd", "frame 0 not zstd (checksum right) -> frame 0");
    }
    /* The checksum of the decompressed bytes alone is wrong (compressed checksum right). */
    {
        uint8_t *buf;
        size_t n;
        path_in(path, sizeof path, "raw_good.shard");
        buf = slurp(path, &n);
        uint64_t idx = get64(buf + 56);
        put32(buf + idx + 48 + 44, get32(buf + idx + 48 + 44) ^ 1u);
        reseal(buf, n);
        path_in(path, sizeof path, "raw_ucrc.shard");
        spit(path, buf, n);
        free(buf);
        expect_failure(path, 1, "checksum mismatch on the decompressed", "wrong checksum of frame 1's decompressed bytes -> frame 1");
    }
}

/* ---- tests ---- */

static void test_round_trip(void) {
    printf("round trip: 3000 records, 16 KiB frames, images and metadata\n");
    char path[256];
    path_in(path, sizeof path, "many.shard");
    tk_err err = {0};
    tk_shard_stats st = {0};
    size_t N = 3000;
    int rc = write_shard(path, N, 16 << 10, 0, 0, &st, &err);
    check(rc == 0, "writes");
    if (rc != 0) {
        printf("    -> %s\n", err.msg);
        return;
    }
    uint64_t tokens = 0, images = 0;
    for (size_t i = 0; i < N; i++) {
        owned_record o;
        make_record(&o, i, 0);
        tokens += o.rec.n_tokens;
        images += o.rec.n_images;
        free_record(&o);
    }
    check(st.records == N && st.tokens == tokens && st.images == images, "writer stats: records, tokens, images");
    check(st.frames > 20, "many frames");
    double ratio = tk_shard_stats_ratio(&st);
    check(ratio > 1.5 && st.file_bytes > st.compressed_bytes, "compression ratio > 1.5, file > frames");
    printf("    %llu records, %llu tokens, %llu frames, %.2f MB raw -> %.2f MB (ratio %.2f)\n", (unsigned long long)st.records,
           (unsigned long long)st.tokens, (unsigned long long)st.frames, st.raw_bytes / 1e6, st.compressed_bytes / 1e6, ratio);
    tk_shard_reader *r = tk_shard_reader_open(path, &err);
    check(r != NULL, "opens");
    if (r == NULL) {
        printf("    -> %s\n", err.msg);
        return;
    }
    tk_shard_stats rs;
    tk_shard_reader_stats(r, &rs);
    check(rs.records == st.records && rs.tokens == st.tokens && rs.images == st.images && rs.frames == st.frames &&
              rs.raw_bytes == st.raw_bytes && rs.compressed_bytes == st.compressed_bytes && rs.file_bytes == st.file_bytes,
          "reader stats == writer stats");
    check(tk_shard_reader_vocab_size(r) == 32000, "vocab size recorded");
    int seq_ok = 1;
    for (size_t i = 0; i < N; i++) {
        owned_record o;
        make_record(&o, i, 0);
        tk_shard_record got;
        seq_ok &= tk_shard_reader_get(r, i, &got, &err) == 0 && same_record(&got, &o.rec) &&
                  got.meta[got.meta_len] == 0;
        free_record(&o);
    }
    check(seq_ok, "every record equal, in order (meta NUL-terminated)");
    int rnd_ok = 1;
    uint64_t s = 99;
    for (size_t k = 0; k < 2000; k++) {
        size_t i = (size_t)(lcg(&s) % N);
        owned_record o;
        make_record(&o, i, 0);
        tk_shard_record got;
        rnd_ok &= tk_shard_reader_get(r, i, &got, &err) == 0 && same_record(&got, &o.rec);
        free_record(&o);
    }
    check(rnd_ok, "2000 random accesses equal");
    check(tk_shard_reader_set_cache(r, 4, &err) == 0, "cache of 4 frames");
    rnd_ok = 1;
    for (size_t k = 0; k < 500; k++) {
        size_t i = (size_t)(lcg(&s) % N);
        owned_record o;
        make_record(&o, i, 0);
        tk_shard_record got;
        rnd_ok &= tk_shard_reader_get(r, i, &got, &err) == 0 && same_record(&got, &o.rec);
        free_record(&o);
    }
    check(rnd_ok, "500 random accesses equal with the larger cache");
    uint64_t f0, c0, sum = 0;
    int frames_ok = 1;
    for (uint64_t f = 0; f < tk_shard_reader_frame_count(r); f++) {
        tk_shard_reader_frame_records(r, f, &f0, &c0);
        frames_ok &= f0 == sum && c0 >= 1 && tk_shard_reader_frame_of(r, f0) == f && tk_shard_reader_frame_of(r, f0 + c0 - 1) == f;
        sum += c0;
    }
    check(frames_ok && sum == N, "frame ranges tile the records; frame_of agrees");
    tk_shard_record got;
    rc = tk_shard_reader_get(r, N, &got, &err);
    check(rc != 0 && strstr(err.msg, path) && strstr(err.msg, "out of range"), "index == count refused");
    tk_shard_reader_free(r);
}

static void test_big_record(void) {
    printf("a record bigger than the frame target gets a frame of its own\n");
    char path[256];
    path_in(path, sizeof path, "big.shard");
    tk_err err = {0};
    tk_shard_stats st;
    size_t big = 60000; /* 540 KB against a 16 KiB target */
    int rc = write_shard(path, 40, 16 << 10, 20, big, &st, &err);
    check(rc == 0 && st.max_tokens == big, "writes (max_tokens recorded)");
    tk_shard_reader *r = rc == 0 ? tk_shard_reader_open(path, &err) : NULL;
    check(r != NULL, "opens");
    if (r == NULL) {
        printf("    -> %s\n", err.msg);
        return;
    }
    uint64_t f = tk_shard_reader_frame_of(r, 20), first, count;
    tk_shard_reader_frame_records(r, f, &first, &count);
    check(first == 20 && count == 1, "record 20 alone in its frame");
    int ok = 1;
    for (size_t i = 0; i < 40; i++) {
        owned_record o;
        make_record(&o, i, i == 20 ? big : 0);
        tk_shard_record got;
        ok &= tk_shard_reader_get(r, i, &got, &err) == 0 && same_record(&got, &o.rec);
        free_record(&o);
    }
    check(ok, "all 40 records equal");
    tk_shard_reader_free(r);
}

static void test_empty(void) {
    printf("an empty shard\n");
    char path[256];
    path_in(path, sizeof path, "empty.shard");
    tk_err err = {0};
    tk_shard_stats st;
    int rc = write_shard(path, 0, 0, 0, 0, &st, &err);
    tk_shard_reader *r = rc == 0 ? tk_shard_reader_open(path, &err) : NULL;
    check(r != NULL && tk_shard_reader_count(r) == 0 && tk_shard_reader_frame_count(r) == 0 && st.file_bytes == 96,
          "writes and opens: 0 records, 0 frames, 96 bytes");
    tk_shard_record got;
    check(r != NULL && tk_shard_reader_get(r, 0, &got, &err) != 0, "reading record 0 fails");
    tk_shard_reader_free(r);
}

static void test_refused(void) {
    printf("records the writer refuses (the writer stays usable)\n");
    char path[256];
    path_in(path, sizeof path, "refused.shard");
    tk_err err = {0};
    tk_shard_writer_opts o = {.vocab_size = 50};
    tk_shard_writer *w = tk_shard_writer_open(path, &o, &err);
    TK_ASSERT(w != NULL);
    int32_t ids[3] = {1, 2, 3}, labels[3] = {-100, 2, 3};
    uint8_t kinds[3] = {1, 2, 2};
    uint8_t bytes[8] = {0};
    tk_shard_record good = {.n_tokens = 3, .input_ids = ids, .labels = labels, .kinds = kinds};
    struct {
        const char *what;
        int field;
    } cases[] = {{"no tokens", 0},           {"negative id", 1},           {"id >= vocab", 2},
                 {"label -5", 3},            {"kind 4", 4},                {"metadata not JSON", 5},
                 {"metadata a JSON array", 6}, {"metadata with trailing text", 7}, {"F16 bytes != 2 x shape", 8},
                 {"image kind 7", 9},        {"encoded image with dims", 10}, {"features with 5 dims", 11}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int32_t bi[3] = {1, 2, 3}, bl[3] = {-100, 2, 3};
        uint8_t bk[3] = {1, 2, 2};
        tk_shard_image im = {.kind = TK_IMAGE_F16_FEATURES, .ndim = 2, .shape = {2, 2}, .nbytes = 8, .data = bytes};
        tk_shard_record rec = {.n_tokens = 3, .input_ids = bi, .labels = bl, .kinds = bk};
        switch (cases[c].field) {
        case 0: rec.n_tokens = 0; break;
        case 1: bi[1] = -1; break;
        case 2: bi[1] = 50; break;
        case 3: bl[1] = -5; break;
        case 4: bk[2] = 4; break;
        case 5: rec.meta = "{\"a\": "; rec.meta_len = 6; break;
        case 6: rec.meta = "[1]"; rec.meta_len = 3; break;
        case 7: rec.meta = "{} x"; rec.meta_len = 4; break;
        case 8: im.nbytes = 6; break;
        case 9: im.kind = 7; break;
        case 10: im.kind = TK_IMAGE_ENCODED; break;
        case 11: im.ndim = 5; break;
        }
        if (cases[c].field >= 8) {
            rec.n_images = 1;
            rec.images = &im;
        }
        err.msg[0] = 0;
        int rc = tk_shard_writer_add(w, &rec, &err);
        char what[128];
        snprintf(what, sizeof what, "refuses %s (message names the file)", cases[c].what);
        check(rc != 0 && strstr(err.msg, path) != NULL, what);
    }
    check(tk_shard_writer_add(w, &good, &err) == 0, "a good record is still accepted");
    tk_shard_stats st;
    check(tk_shard_writer_close(w, &st, &err) == 0 && st.records == 1, "closes with 1 record");
}

static void test_atomic(void) {
    printf("failed or abandoned writes leave an existing shard untouched\n");
    char path[256], tmp[300];
    path_in(path, sizeof path, "keep.shard");
    tk_err err = {0};
    tk_shard_stats st;
    TK_ASSERT(write_shard(path, 50, 4096, 0, 0, &st, &err) == 0);
    size_t n0;
    uint8_t *before = slurp(path, &n0);
    tk_shard_writer *w = tk_shard_writer_open(path, NULL, &err);
    owned_record o;
    make_record(&o, 1, 0);
    TK_ASSERT(w && tk_shard_writer_add(w, &o.rec, &err) == 0);
    free_record(&o);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    check(access(tmp, F_OK) == 0, "records go to PATH.tmp.<pid> while writing");
    tk_shard_writer_abort(w);
    size_t n1;
    uint8_t *after = slurp(path, &n1);
    check(n0 == n1 && memcmp(before, after, n0) == 0 && access(tmp, F_OK) != 0,
          "abort: original unchanged, temp file removed");
    free(after);
    /* A refused record does not spoil the file either: the shard is only replaced by close. */
    w = tk_shard_writer_open(path, NULL, &err);
    tk_shard_record bad = {0};
    check(w && tk_shard_writer_add(w, &bad, &err) != 0, "refused record");
    tk_shard_writer_abort(w);
    after = slurp(path, &n1);
    check(n0 == n1 && memcmp(before, after, n0) == 0, "original unchanged");
    free(after);
    free(before);
    char nodir[300];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/x.shard", g_dir);
    w = tk_shard_writer_open(nodir, NULL, &err);
    check(w == NULL && strstr(err.msg, nodir) != NULL, "unwritable destination: open fails naming the path");
    tk_shard_writer_opts badopt = {.level = 99};
    w = tk_shard_writer_open(path, &badopt, &err);
    check(w == NULL && strstr(err.msg, "level"), "zstd level 99 refused");
    check(tk_shard_writer_close(NULL, NULL, &err) == 0, "close(NULL) is a no-op");
}

static void test_damaged(void) {
    printf("damaged shards: truncation, bit flips, edited fields\n");
    char good[256], path[256];
    path_in(good, sizeof good, "good.shard");
    tk_err err = {0};
    tk_shard_stats st;
    TK_ASSERT(write_shard(good, 400, 8 << 10, 0, 0, &st, &err) == 0);
    size_t n;
    uint8_t *buf = slurp(good, &n);
    uint64_t frames = get64(buf + 32), index = get64(buf + 56);
    TK_ASSERT(frames >= 5);
    path_in(path, sizeof path, "bad.shard");

    /* Truncations at many lengths: all fail at open (the header records the file size). */
    size_t cuts[] = {0, 4, 8, 11, 50, 95, 96, 97, 200, (size_t)index / 2, (size_t)index, (size_t)index + 1, n - 48, n - 1};
    int all = 1;
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        spit(path, buf, cuts[c]);
        tk_err e = {0};
        int at_open;
        int rc = open_and_read_all(path, &e, &at_open);
        int ok = rc != 0 && at_open && strstr(e.msg, path) != NULL;
        if (!ok) printf("    -> cut at %zu: %s\n", cuts[c], rc ? e.msg : "no error");
        all &= ok;
    }
    check(all, "14 truncations (0 .. size-1 bytes): all fail at open, naming the shard");
    spit(path, buf, n - 1);
    expect_failure(path, -1, "truncated", "truncated by one byte: says \"truncated\"");

    /* Trailing bytes. */
    uint8_t *longer = malloc(n + 3);
    memcpy(longer, buf, n);
    memset(longer + n, 0, 3);
    spit(path, longer, n + 3);
    free(longer);
    expect_failure(path, -1, "trailing", "3 bytes appended: fails at open");

    uint8_t *b = malloc(n);
#define FRESH() memcpy(b, buf, n)
    FRESH();
    b[0] = 'X';
    spit(path, b, n);
    expect_failure(path, -1, "magic", "bad magic");
    FRESH();
    put32(b + 8, 2);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, -1, "version 2", "version 2: unsupported");
    FRESH();
    b[30] ^= 0x04; /* record count */
    spit(path, b, n);
    expect_failure(path, -1, "header checksum", "header bit flip: header checksum");
    FRESH();
    b[index + 10] ^= 0x01;
    spit(path, b, n);
    expect_failure(path, -1, "index checksum", "index bit flip: index checksum");
    FRESH();
    put32(b + 64, 0x80);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, -1, "flags", "unknown header flag");
    FRESH();
    put64(b + 24, get64(b + 24) + 1);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, -1, "records", "record count off by one (resealed)");
    FRESH();
    put64(b + 40, get64(b + 40) + 1);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, -1, "tokens", "token count off by one (resealed)");
    FRESH();
    put64(b + index + 48 * 2, get64(b + index + 48 * 2) + 1);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, 2, "back to back", "frame 2 offset moved (resealed): fails at open, names frame 2");
    FRESH();
    put64(b + index + 48 * 3 + 8, (uint64_t)1 << 40);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, 3, "compressed size", "frame 3 compressed size huge (resealed)");
    FRESH();
    put64(b + index + 48 * 1 + 16, (uint64_t)1 << 40);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, 1, "uncompressed size", "frame 1 uncompressed size 1 TiB (resealed)");
    FRESH();
    put32(b + index + 48 * 4 + 32, 0);
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, 4, "records", "frame 4 with 0 records (resealed)");
    FRESH();
    put64(b + 32, ((uint64_t)1 << 60) + frames); /* 48 x count wraps around to the real index size */
    reseal(b, n);
    spit(path, b, n);
    expect_failure(path, -1, "cannot fit", "frame count 2^60 + n (48 x count overflows; resealed): fails at open");

    /* Bit flips inside compressed frames: open succeeds, the frame's checksum catches it on read,
     * other frames still read. */
    int flips_ok = 1;
    for (uint64_t f = 0; f < frames; f += 2) {
        FRESH();
        uint64_t off = get64(b + index + 48 * f), cs = get64(b + index + 48 * f + 8);
        b[off + cs / 2] ^= (uint8_t)(1u << (f % 8));
        spit(path, b, n);
        tk_shard_reader *r = tk_shard_reader_open(path, &err);
        if (r == NULL) {
            flips_ok = 0;
            continue;
        }
        uint64_t first = get64(b + index + 48 * f + 24);
        tk_shard_record rec;
        int rc = tk_shard_reader_get(r, first, &rec, &err);
        char fr[32];
        snprintf(fr, sizeof fr, "frame %llu", (unsigned long long)f);
        int ok = rc != 0 && strstr(err.msg, path) && strstr(err.msg, fr) && strstr(err.msg, "checksum");
        if (!ok) printf("    -> flip in frame %llu: %s\n", (unsigned long long)f, rc ? err.msg : "no error");
        uint64_t other = f + 1 < frames ? get64(b + index + 48 * (f + 1) + 24) : 0;
        ok = ok && tk_shard_reader_get(r, other, &rec, &err) == 0;
        ok = ok && tk_shard_reader_get(r, first, &rec, &err) != 0; /* still refused: nothing cached */
        flips_ok &= ok;
        tk_shard_reader_free(r);
    }
    check(flips_ok, "a bit flip in every other compressed frame: that frame fails by checksum, named");
    FRESH();
    {
        uint64_t off = get64(b + index + 48 * 1);
        b[off + 3] ^= 0x80;
        spit(path, b, n);
        expect_failure(path, 1, "checksum", "bit flip in frame 1 found by reading everything");
    }
    free(b);
    free(buf);

    /* The header announces encoded images only, but frames hold F16 features too. */
    path_in(path, sizeof path, "flags.shard");
    TK_ASSERT(write_shard(path, 40, 4096, 0, 0, &st, &err) == 0);
    buf = slurp(path, &n);
    TK_ASSERT(get32(buf + 64) == 3);
    put32(buf + 64, 1);
    reseal(buf, n);
    spit(path, buf, n);
    free(buf);
    expect_failure(path, 0, "not announced", "F16 features in a shard whose flags say encoded only -> frame 0");
    check(open_and_read_all(good, &err, &(int){0}) == 0, "the undamaged shard still reads (control)");
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_test_shard_XXXXXX");
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    double t0 = tk_time();
    test_round_trip();
    test_big_record();
    test_empty();
    test_refused();
    test_atomic();
    test_damaged();
    test_crafted();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) printf("note: could not remove %s\n", g_dir);
    printf("%d passed, %d failed (%.2f s)\n", n_pass, n_fail, tk_time() - t0);
    return n_fail == 0 ? 0 : 1;
}
