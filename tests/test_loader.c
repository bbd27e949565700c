/* test_loader.c: the shard loader (datasets/loader.c).
 *
 * Shards are written with generated records whose tokens encode (source, record, position), so every
 * cell of every batch can be checked against the record the batch says it holds. Checked: each epoch
 * of a source is a permutation, different per epoch and per seed, reproducible for a seed (uniform
 * and frame-block shuffling, and file order without shuffle); mixing ratios within tolerance;
 * padding and packing layouts cell by cell (packing keeps the sample order, is greedy, truncates,
 * resets positions, masks the first label of each record); images travel with their samples; a
 * cursor saved as JSON (and as a file) restores the identical continuation, in a fresh loader and in
 * the same one; prefetch off and on give identical batches; damaged shards, foreign cursors and bad
 * options give errors naming the shard (and frame). Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/loader.h"
#include "datasets/shard.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* ---- generated records: source s, record i ---- */

/* Length 1..40, every 17th record 70 tokens (longer than the rows used below). */
static size_t rec_len(size_t s, size_t i) { return i % 17 == 5 ? 70 : 1 + (i * 13 + s * 5) % 40; }
static int32_t rec_id(size_t s, size_t i, size_t t) { return (int32_t)((s + 1) * 100000 + i * 100 + t % 100); }
static int32_t rec_label(size_t s, size_t i, size_t t) { return t % 3 == 1 ? -100 : rec_id(s, i, t); }
static uint8_t rec_kind(size_t s, size_t i, size_t t) {
    (void)s;
    if (i % 9 == 0 && t == 0) return TK_KIND_IMAGE;
    return t < rec_len(s, i) / 2 ? TK_KIND_PROMPT : TK_KIND_RESPONSE;
}
static int rec_has_image(size_t i) { return i % 9 == 0; }
static size_t rec_image_bytes(size_t s, size_t i) { return 10 + (s * 7 + i) % 30; }
static uint8_t rec_image_byte(size_t s, size_t i, size_t k) { return (uint8_t)(s * 31 + i * 7 + k); }

/* Writes source s with records [first, first + n) of its numbering into path. */
static void write_source(const char *path, size_t s, size_t first, size_t n) {
    tk_err err = {0};
    tk_shard_writer_opts o = {.frame_target = 1024};
    tk_shard_writer *w = tk_shard_writer_open(path, &o, &err);
    TK_ASSERT(w != NULL);
    for (size_t i = first; i < first + n; i++) {
        size_t len = rec_len(s, i);
        int32_t ids[80], labels[80];
        uint8_t kinds[80], img[64];
        for (size_t t = 0; t < len; t++) {
            ids[t] = rec_id(s, i, t);
            labels[t] = rec_label(s, i, t);
            kinds[t] = rec_kind(s, i, t);
        }
        char meta[64];
        snprintf(meta, sizeof meta, "{\"source\": %zu, \"id\": %zu}", s, i);
        tk_shard_image im = {.kind = TK_IMAGE_ENCODED, .nbytes = rec_image_bytes(s, i), .data = img};
        for (size_t k = 0; k < im.nbytes; k++) img[k] = rec_image_byte(s, i, k);
        tk_shard_record r = {.n_tokens = len, .input_ids = ids, .labels = labels, .kinds = kinds,
                             .meta_len = strlen(meta), .meta = meta, .n_images = rec_has_image(i) ? 1 : 0,
                             .images = &im};
        if (tk_shard_writer_add(w, &r, &err) != 0) {
            printf("write: %s\n", err.msg);
            exit(1);
        }
    }
    if (tk_shard_writer_close(w, NULL, &err) != 0) {
        printf("close: %s\n", err.msg);
        exit(1);
    }
}

/* Source 0: 103 records in two shards (60 + 43); source 1: 57 records; source 2: 29 records. */
static char g_a0[256], g_a1[256], g_b[256], g_c[256], g_bad[256];
static const char *g_src0[2], *g_src1[1], *g_src2[1];
#define N0 103
#define N1 57
#define N2 29

static tk_loader *open_loader(size_t n_src, const double *w, const tk_loader_opts *o, tk_err *err) {
    tk_loader_source src[3] = {{g_src0, 2, w ? w[0] : 1}, {g_src1, 1, w ? w[1] : 1}, {g_src2, 1, w ? w[2] : 1}};
    return tk_loader_open(src, n_src, o, err);
}

/* ---- checking a batch against the records it names ---- */

/* Every cell of b equals the layout its samples describe. */
static int batch_consistent(const tk_loader_batch *b, const tk_loader_opts *o, int verbose) {
    size_t B = b->text.B, T = b->text.T;
    if (B != o->batch_size || T == 0 || T > o->max_len || (o->pack && T != o->max_len)) return 0;
    size_t BT = B * T;
    int32_t *ids = malloc(BT * 4), *lab = malloc(BT * 4), *pos = malloc(BT * 4), *seg = malloc(BT * 4);
    uint8_t *mask = malloc(BT), *kind = malloc(BT);
    for (size_t k = 0; k < BT; k++) {
        ids[k] = 0;
        lab[k] = -100;
        pos[k] = 0;
        seg[k] = 0;
        mask[k] = 0;
        kind[k] = 0;
    }
    int ok = 1;
    int32_t segment = 0;
    size_t last_row = SIZE_MAX, img = 0;
    for (size_t j = 0; j < b->n_samples; j++) {
        const tk_loader_sample *sm = &b->samples[j];
        size_t full = rec_len(sm->source, sm->record);
        ok &= sm->len + sm->truncated == full && sm->len == (full < o->max_len ? full : o->max_len);
        ok &= sm->row < B && sm->start + sm->len <= T;
        if (!o->pack) ok &= sm->row == j && sm->start == 0;
        segment = sm->row == last_row ? segment + 1 : 1;
        last_row = sm->row;
        for (size_t t = 0; t < sm->len && ok; t++) {
            size_t at = sm->row * T + sm->start + t;
            ids[at] = rec_id(sm->source, sm->record, t);
            lab[at] = (o->pack && t == 0) ? -100 : rec_label(sm->source, sm->record, t);
            kind[at] = rec_kind(sm->source, sm->record, t);
            mask[at] = 1;
            pos[at] = (int32_t)t;
            seg[at] = segment;
        }
        if (rec_has_image(sm->record)) {
            const tk_loader_image *im = img < b->n_images ? &b->images[img] : NULL;
            ok &= im != NULL && im->sample == j && im->row == sm->row && im->image.kind == TK_IMAGE_ENCODED &&
                  im->image.nbytes == rec_image_bytes(sm->source, sm->record);
            for (size_t k = 0; ok && k < im->image.nbytes; k++)
                ok &= im->image.data[k] == rec_image_byte(sm->source, sm->record, k);
            img++;
        }
    }
    ok &= img == b->n_images;
    if (ok) {
        ok = !memcmp(ids, b->text.input_ids, BT * 4) && !memcmp(lab, b->text.labels, BT * 4) &&
             !memcmp(pos, b->position_ids, BT * 4) && !memcmp(seg, b->segment_ids, BT * 4) &&
             !memcmp(mask, b->text.attention_mask, BT) && !memcmp(kind, b->kinds, BT);
        if (!ok && verbose) printf("    -> cell mismatch\n");
    }
    if (!o->pack && ok) { /* T is the longest row */
        size_t longest = 0;
        for (size_t j = 0; j < b->n_samples; j++) longest = b->samples[j].len > longest ? b->samples[j].len : longest;
        ok &= longest == T;
    }
    free(ids);
    free(lab);
    free(pos);
    free(seg);
    free(mask);
    free(kind);
    return ok;
}

static int cursor_equal(const tk_loader_cursor *a, const tk_loader_cursor *b) {
    if (a->fingerprint != b->fingerprint || a->epoch != b->epoch || a->position != b->position ||
        a->samples != b->samples || a->batches != b->batches || a->rng != b->rng || a->n_sources != b->n_sources)
        return 0;
    for (uint32_t s = 0; s < a->n_sources; s++)
        if (a->source[s].epoch != b->source[s].epoch || a->source[s].position != b->source[s].position) return 0;
    return 1;
}

static int batch_equal(const tk_loader_batch *a, const tk_loader_batch *b) {
    size_t BT = a->text.B * a->text.T;
    if (a->text.B != b->text.B || a->text.T != b->text.T || a->n_samples != b->n_samples || a->n_images != b->n_images)
        return 0;
    if (memcmp(a->text.input_ids, b->text.input_ids, BT * 4) || memcmp(a->text.labels, b->text.labels, BT * 4) ||
        memcmp(a->text.attention_mask, b->text.attention_mask, BT) || memcmp(a->kinds, b->kinds, BT) ||
        memcmp(a->position_ids, b->position_ids, BT * 4) || memcmp(a->segment_ids, b->segment_ids, BT * 4))
        return 0;
    for (size_t j = 0; j < a->n_samples; j++) {
        const tk_loader_sample *x = &a->samples[j], *y = &b->samples[j];
        if (x->source != y->source || x->record != y->record || x->epoch != y->epoch || x->row != y->row ||
            x->start != y->start || x->len != y->len || x->truncated != y->truncated)
            return 0;
    }
    for (size_t j = 0; j < a->n_images; j++) {
        const tk_loader_image *x = &a->images[j], *y = &b->images[j];
        if (x->sample != y->sample || x->row != y->row || x->image.nbytes != y->image.nbytes ||
            memcmp(x->image.data, y->image.data, x->image.nbytes))
            return 0;
    }
    return cursor_equal(&a->cursor, &b->cursor);
}

/* Keeps copies of batches (a batch from next() is reused by the following call). */
typedef struct {
    tk_loader_batch *b;
    size_t n;
} batch_list;

static void copy_batch(tk_loader_batch *dst, const tk_loader_batch *src) {
    memset(dst, 0, sizeof *dst);
    size_t BT = src->text.B * src->text.T;
    dst->text.B = src->text.B;
    dst->text.T = src->text.T;
    dst->text.cap = BT;
    dst->text.input_ids = tk_calloc(BT, 4);
    dst->text.labels = tk_calloc(BT, 4);
    dst->text.attention_mask = tk_calloc(BT, 1);
    dst->kinds = tk_calloc(BT, 1);
    dst->position_ids = tk_calloc(BT, 4);
    dst->segment_ids = tk_calloc(BT, 4);
    memcpy(dst->text.input_ids, src->text.input_ids, BT * 4);
    memcpy(dst->text.labels, src->text.labels, BT * 4);
    memcpy(dst->text.attention_mask, src->text.attention_mask, BT);
    memcpy(dst->kinds, src->kinds, BT);
    memcpy(dst->position_ids, src->position_ids, BT * 4);
    memcpy(dst->segment_ids, src->segment_ids, BT * 4);
    dst->n_samples = dst->samples_cap = src->n_samples;
    dst->samples = tk_calloc(src->n_samples, sizeof(tk_loader_sample));
    memcpy(dst->samples, src->samples, src->n_samples * sizeof(tk_loader_sample));
    dst->n_images = dst->images_cap = src->n_images;
    dst->images = src->n_images ? tk_calloc(src->n_images, sizeof(tk_loader_image)) : NULL;
    dst->arena_len = dst->arena_cap = src->arena_len;
    dst->arena = src->arena_len ? tk_calloc(src->arena_len, 1) : NULL;
    if (src->arena_len) memcpy(dst->arena, src->arena, src->arena_len);
    for (size_t j = 0; j < src->n_images; j++) {
        dst->images[j] = src->images[j];
        dst->images[j].image.data = dst->arena + (src->images[j].image.data - src->arena);
    }
    dst->cursor = src->cursor;
}

/* Takes n batches from L; NULL on error (message printed). */
static tk_loader_batch *take(tk_loader *L, size_t n) {
    tk_loader_batch *out = calloc(n, sizeof *out), b = {0};
    tk_err err = {0};
    for (size_t k = 0; k < n; k++) {
        if (tk_loader_next(L, &b, &err) != 0) {
            printf("    -> batch %zu: %s\n", k, err.msg);
            for (size_t j = 0; j < k; j++) tk_loader_batch_free(&out[j]);
            free(out);
            tk_loader_batch_free(&b);
            return NULL;
        }
        copy_batch(&out[k], &b);
    }
    tk_loader_batch_free(&b);
    return out;
}

static void free_batches(tk_loader_batch *v, size_t n) {
    if (v == NULL) return;
    for (size_t k = 0; k < n; k++) tk_loader_batch_free(&v[k]);
    free(v);
}

/* The samples of v as a flat list. */
static tk_loader_sample *flatten(const tk_loader_batch *v, size_t n, size_t *count) {
    size_t total = 0;
    for (size_t k = 0; k < n; k++) total += v[k].n_samples;
    tk_loader_sample *s = malloc(total * sizeof *s), *p = s;
    for (size_t k = 0; k < n; k++) {
        memcpy(p, v[k].samples, v[k].n_samples * sizeof *s);
        p += v[k].n_samples;
    }
    *count = total;
    return s;
}

/* samples[a..a+n) of source src are exactly the records 0..n-1, each once. */
static int is_permutation(const tk_loader_sample *s, size_t a, size_t n) {
    char *seen = calloc(n, 1);
    int ok = 1;
    for (size_t k = a; k < a + n; k++) {
        if (s[k].record >= n || seen[s[k].record]) ok = 0;
        if (s[k].record < n) seen[s[k].record] = 1;
    }
    free(seen);
    return ok;
}

static int same_order(const tk_loader_sample *x, const tk_loader_sample *y, size_t n) {
    for (size_t k = 0; k < n; k++)
        if (x[k].record != y[k].record || x[k].source != y[k].source) return 0;
    return 1;
}

/* ---- tests ---- */

static void test_shuffle(void) {
    printf("shuffling: one permutation per epoch, differing by epoch and seed\n");
    tk_err err = {0};
    tk_loader_opts o = {.batch_size = 7, .max_len = 64, .shuffle = 1, .seed = 1};
    tk_loader *L = open_loader(1, NULL, &o, &err);
    check(L != NULL && tk_loader_source_records(L, 0) == N0 && tk_loader_epoch_samples(L) == N0,
          "opens two shards as one source of 103 records");
    if (L == NULL) {
        printf("    -> %s\n", err.msg);
        return;
    }
    size_t nb = 45; /* 315 samples: 3 epochs and 6 */
    tk_loader_batch *v = take(L, nb);
    size_t n;
    tk_loader_sample *s = flatten(v, nb, &n);
    int cells = 1;
    for (size_t k = 0; k < nb; k++) cells &= batch_consistent(&v[k], &o, 1);
    check(cells, "every cell of 45 padded batches matches its records");
    check(is_permutation(s, 0, N0) && is_permutation(s, N0, N0) && is_permutation(s, 2 * N0, N0),
          "epochs 0, 1, 2 are each a permutation of the 103 records");
    int ep = 1;
    for (size_t k = 0; k < n; k++) ep &= s[k].epoch == k / N0;
    check(ep, "samples carry their epoch");
    check(!same_order(s, s + N0, N0) && !same_order(s + N0, s + 2 * N0, N0), "epoch orders differ");
    int ident = 1;
    for (size_t k = 0; k < N0; k++) ident &= s[k].record == k;
    check(!ident, "epoch 0 is not the file order");
    tk_loader_cursor c;
    tk_loader_get_cursor(L, &c);
    check(c.epoch == 3 && c.position == 315 - 3 * N0 && c.samples == 315 && c.batches == 45 &&
              c.source[0].epoch == 3 && c.source[0].position == 6,
          "cursor after 45 batches: epoch 3, position 6");
    tk_loader_free(L);

    L = open_loader(1, NULL, &o, &err);
    tk_loader_batch *v2 = take(L, nb);
    size_t n2;
    tk_loader_sample *s2 = flatten(v2, nb, &n2);
    check(n2 == n && same_order(s, s2, n), "same seed: the same order");
    tk_loader_free(L);
    free_batches(v2, nb);
    free(s2);

    o.seed = 2;
    L = open_loader(1, NULL, &o, &err);
    v2 = take(L, nb);
    s2 = flatten(v2, nb, &n2);
    check(is_permutation(s2, 0, N0) && !same_order(s, s2, N0), "seed 2: another permutation");
    tk_loader_free(L);
    free_batches(v2, nb);
    free(s2);

    o.shuffle = 0;
    L = open_loader(1, NULL, &o, &err);
    v2 = take(L, nb);
    s2 = flatten(v2, nb, &n2);
    ident = 1;
    for (size_t k = 0; k < n2; k++) ident &= s2[k].record == k % N0;
    check(ident, "shuffle off: file order, epoch after epoch");
    tk_loader_free(L);
    free_batches(v2, nb);
    free(s2);

    o.shuffle = 1;
    o.shuffle_window = 2;
    L = open_loader(1, NULL, &o, &err);
    v2 = take(L, nb);
    s2 = flatten(v2, nb, &n2);
    cells = 1;
    for (size_t k = 0; k < nb; k++) cells &= batch_consistent(&v2[k], &o, 1);
    check(cells && is_permutation(s2, 0, N0) && is_permutation(s2, N0, N0) && is_permutation(s2, 2 * N0, N0) &&
              !same_order(s2, s2 + N0, N0),
          "frame-block shuffle (window 2): permutations, differing by epoch");
    size_t runs = 0;
    for (size_t k = 0; k + 1 < N0; k++) runs += s2[k + 1].record == s2[k].record + 1;
    check(runs < N0 / 4, "frame-block shuffle: records within a block are shuffled too (few file-order neighbours)");
    size_t moved = 0;
    for (size_t k = 0; k < N0; k++) {
        size_t d = s2[k].record > k ? (size_t)s2[k].record - k : k - (size_t)s2[k].record;
        moved = d > moved ? d : moved;
    }
    check(moved > N0 / 3, "frame-block shuffle: frames move far (a record travels > 1/3 of the source)");
    tk_loader_free(L);
    free_batches(v2, nb);
    free(s2);
    free_batches(v, nb);
    free(s);
}

static void test_mixing(void) {
    printf("weighted mixing\n");
    tk_err err = {0};
    tk_loader_opts o = {.batch_size = 16, .max_len = 80, .shuffle = 1, .seed = 7, .prefetch = 2};
    double w[3] = {3, 1, 0};
    tk_loader *L = open_loader(2, w, &o, &err);
    check(L != NULL && tk_loader_epoch_samples(L) == N0 + N1, "opens 2 sources, epoch of 160 samples");
    if (L == NULL) {
        printf("    -> %s\n", err.msg);
        return;
    }
    size_t nb = 250, n;
    tk_loader_batch *v = take(L, nb);
    tk_loader_sample *s = flatten(v, nb, &n);
    size_t count[2] = {0, 0};
    for (size_t k = 0; k < n; k++) count[s[k].source]++;
    double frac = (double)count[0] / (double)n;
    printf("    source 0: %zu of %zu samples (%.4f, weight share 0.75)\n", count[0], n, frac);
    check(frac > 0.73 && frac < 0.77, "3:1 weights give 0.75 +- 0.02 of the samples to source 0 (4000 samples)");
    /* Within each source, every complete source epoch is a permutation. */
    int perm_ok = 1;
    for (uint32_t src = 0; src < 2; src++) {
        size_t nrec = src == 0 ? N0 : N1;
        tk_loader_sample *mine = malloc(n * sizeof *mine);
        size_t m = 0;
        for (size_t k = 0; k < n; k++)
            if (s[k].source == src) mine[m++] = s[k];
        for (size_t e = 0; (e + 1) * nrec <= m; e++) {
            perm_ok &= is_permutation(mine, e * nrec, nrec);
            for (size_t k = e * nrec; k < (e + 1) * nrec; k++) perm_ok &= mine[k].epoch == e;
        }
        free(mine);
    }
    check(perm_ok, "each source's complete epochs are permutations (source 1 wraps ~18 times)");
    int cells = 1;
    for (size_t k = 0; k < nb; k++) cells &= batch_consistent(&v[k], &o, 1);
    check(cells, "every cell of 250 mixed batches matches its records");
    tk_loader_cursor c;
    tk_loader_get_cursor(L, &c);
    check(c.samples == n && c.source[0].epoch * N0 + c.source[0].position == count[0] &&
              c.source[1].epoch * N1 + c.source[1].position == count[1] && c.epoch == n / (N0 + N1),
          "cursor counts per source add up");
    tk_loader_free(L);
    free_batches(v, nb);
    free(s);

    double w2[3] = {1, 1, 2};
    L = open_loader(3, w2, &o, &err);
    v = take(L, nb);
    s = flatten(v, nb, &n);
    size_t c3[3] = {0, 0, 0};
    for (size_t k = 0; k < n; k++) c3[s[k].source]++;
    printf("    1:1:2 -> %.4f %.4f %.4f\n", c3[0] / (double)n, c3[1] / (double)n, c3[2] / (double)n);
    check(c3[0] / (double)n > 0.23 && c3[0] / (double)n < 0.27 && c3[1] / (double)n > 0.23 &&
              c3[1] / (double)n < 0.27 && c3[2] / (double)n > 0.48 && c3[2] / (double)n < 0.52,
          "1:1:2 weights: 0.25 / 0.25 / 0.5 +- 0.02");
    tk_loader_free(L);
    free_batches(v, nb);
    free(s);

    /* The same shard as two sources: each gets its own permutations. */
    tk_loader_source twice[2] = {{g_src1, 1, 1.0}, {g_src1, 1, 1.0}};
    L = tk_loader_open(twice, 2, &o, &err);
    v = L ? take(L, 20) : NULL;
    int differ = 0;
    if (v != NULL) {
        s = flatten(v, 20, &n);
        uint64_t first[2][N1];
        size_t m[2] = {0, 0};
        for (size_t k = 0; k < n; k++)
            if (m[s[k].source] < N1) first[s[k].source][m[s[k].source]++] = s[k].record;
        differ = m[0] == N1 && m[1] == N1 && memcmp(first[0], first[1], sizeof first[0]) != 0;
        free(s);
    }
    check(differ, "one shard given as two sources: the two orders differ");
    free_batches(v, 20);
    tk_loader_free(L);
}

static void test_packing(void) {
    printf("sequence packing\n");
    tk_err err = {0};
    tk_loader_opts pad = {.batch_size = 5, .max_len = 48, .shuffle = 1, .seed = 3};
    tk_loader_opts pk = pad;
    pk.pack = 1;
    pk.batch_size = 4;
    double w[3] = {2, 1, 1};
    tk_loader *L = open_loader(3, w, &pk, &err);
    if (L == NULL) {
        check(0, "opens");
        printf("    -> %s\n", err.msg);
        return;
    }
    size_t nb = 60, n;
    tk_loader_batch *v = take(L, nb);
    tk_loader_sample *s = flatten(v, nb, &n);
    int cells = 1;
    for (size_t k = 0; k < nb; k++) cells &= batch_consistent(&v[k], &pk, 1);
    check(cells, "every cell of 60 packed batches: ids, labels (first -100), kinds, positions, segments");
    /* The same sample stream as padding (batch shape never changes the order). */
    tk_loader *P = open_loader(3, w, &pad, &err);
    size_t pnb = n / pad.batch_size + 1, pn;
    tk_loader_batch *pv = take(P, pnb);
    tk_loader_sample *ps = flatten(pv, pnb, &pn);
    check(pn >= n && same_order(s, ps, n), "packed samples follow the padded sample order exactly (none dropped)");
    tk_loader_free(P);
    free_batches(pv, pnb);
    free(ps);
    /* Greedy: a sample starts a new row (or batch) only when it does not fit after the previous. */
    int greedy = 1, truncated = 0, multi = 0;
    for (size_t k = 0; k < nb; k++) {
        const tk_loader_batch *b = &v[k];
        for (size_t j = 0; j < b->n_samples; j++) {
            const tk_loader_sample *x = &b->samples[j];
            truncated += x->truncated > 0;
            if (j + 1 < b->n_samples) {
                const tk_loader_sample *y = &b->samples[j + 1];
                if (y->row == x->row) {
                    greedy &= y->start == x->start + x->len;
                    multi++;
                } else {
                    greedy &= y->row == x->row + 1 && y->start == 0 && x->start + x->len + y->len > pk.max_len;
                }
            } else if (k + 1 < nb) {
                const tk_loader_sample *y = &v[k + 1].samples[0];
                greedy &= x->row == pk.batch_size - 1 && x->start + x->len + y->len > pk.max_len;
            }
        }
    }
    check(greedy, "greedy in-order packing: each row break is forced by the next record's length");
    check(multi > 50 && truncated > 0, "rows hold several records; records longer than 48 are truncated");
    double fill = 0;
    for (size_t k = 0; k < nb; k++)
        for (size_t c = 0; c < 4 * 48; c++) fill += v[k].text.attention_mask[c];
    printf("    %zu samples in %zu rows, fill %.3f\n", n, nb * 4, fill / (nb * 4.0 * 48));
    tk_loader_free(L);
    free_batches(v, nb);
    free(s);
}

static void test_cursor(int pack, size_t prefetch_a, size_t prefetch_b) {
    printf("cursor save / restore (%s, prefetch %zu then %zu)\n", pack ? "packed" : "padded", prefetch_a, prefetch_b);
    tk_err err = {0};
    tk_loader_opts o = {.batch_size = 6, .max_len = 40, .pack = pack, .shuffle = 1, .seed = 11, .prefetch = prefetch_a};
    double w[3] = {1, 2, 1};
    tk_loader *L = open_loader(3, w, &o, &err);
    if (L == NULL) {
        check(0, "opens");
        printf("    -> %s\n", err.msg);
        return;
    }
    tk_loader_batch *head = take(L, 23); /* crosses epoch 0 of source 2 and more */
    tk_loader_cursor c, c2;
    tk_loader_get_cursor(L, &c);
    check(cursor_equal(&c, &head[22].cursor), "the cursor is the one stored in the last batch taken");
    char *json = tk_loader_cursor_to_json(&c, &err);
    check(json != NULL && tk_loader_cursor_from_json(&c2, json, strlen(json), "mem", &err) == 0 && cursor_equal(&c, &c2),
          "JSON round trip of the cursor");
    char path[256];
    snprintf(path, sizeof path, "%s/cursor.json", g_dir);
    tk_loader_cursor c3;
    check(tk_loader_cursor_save(&c, path, &err) == 0 && tk_loader_cursor_load(&c3, path, &err) == 0 && cursor_equal(&c, &c3),
          "file round trip of the cursor");
    size_t nb = 30;
    tk_loader_batch *tail = take(L, nb);
    /* A fresh loader (other prefetch depth, other batch buffers) resumes from the JSON. */
    o.prefetch = prefetch_b;
    tk_loader *R = open_loader(3, w, &o, &err);
    int ok = R != NULL && tk_loader_set_cursor(R, &c2, &err) == 0;
    tk_loader_batch *again = ok ? take(R, nb) : NULL;
    ok = again != NULL;
    for (size_t k = 0; ok && k < nb; k++) ok &= batch_equal(&tail[k], &again[k]);
    check(ok, "a fresh loader restored from the JSON gives the identical next 30 batches");
    free_batches(again, nb);
    /* The same loader rewound. */
    ok = tk_loader_set_cursor(L, &c, &err) == 0;
    again = ok ? take(L, nb) : NULL;
    ok = again != NULL;
    for (size_t k = 0; ok && k < nb; k++) ok &= batch_equal(&tail[k], &again[k]);
    check(ok, "the same loader rewound to the cursor repeats them");
    free_batches(again, nb);
    /* Restoring the start reproduces the head. */
    tk_loader_cursor start;
    tk_loader_free(R);
    R = open_loader(3, w, &o, &err);
    tk_loader_get_cursor(R, &start);
    tk_loader_batch *h2 = take(R, 23);
    ok = h2 != NULL;
    for (size_t k = 0; ok && k < 23; k++) ok &= batch_equal(&head[k], &h2[k]);
    check(ok, "the starting cursor's loader gives the same first 23 batches");
    ok = tk_loader_set_cursor(R, &start, &err) == 0;
    tk_loader_batch *h3 = ok ? take(R, 1) : NULL;
    check(h3 != NULL && batch_equal(&head[0], &h3[0]), "set_cursor(start) goes back to batch 0");
    free_batches(h2, 23);
    free_batches(h3, 1);
    tk_loader_free(R);

    /* Cursors that must be refused. */
    o.seed = 12;
    R = open_loader(3, w, &o, &err);
    check(tk_loader_set_cursor(R, &c, &err) != 0 && strstr(err.msg, "another data mix"), "another seed: refused");
    tk_loader_free(R);
    o.seed = 11;
    R = open_loader(2, w, &o, &err);
    check(tk_loader_set_cursor(R, &c, &err) != 0, "another set of sources: refused");
    tk_loader_free(R);
    tk_loader_cursor bad = c;
    bad.source[1].position = N1;
    check(tk_loader_set_cursor(L, &bad, &err) != 0 && strstr(err.msg, "source 1"), "source position past its records: refused");
    bad = c;
    bad.position++;
    check(tk_loader_set_cursor(L, &bad, &err) != 0, "position inconsistent with samples: refused");
    const char *texts[] = {"", "[]", "{\"format\": \"x\", \"version\": 1}",
                           "{\"format\": \"tspeft-loader-cursor\", \"version\": 2}",
                           "{\"format\": \"tspeft-loader-cursor\", \"version\": 1, \"fingerprint\": \"12\"}"};
    int refused = 1;
    for (size_t k = 0; k < sizeof texts / sizeof texts[0]; k++)
        refused &= tk_loader_cursor_from_json(&c3, texts[k], strlen(texts[k]), "x.json", &err) != 0 &&
                   strstr(err.msg, "x.json") != NULL;
    if (json) {
        char *neg = strdup(json);
        char *p = strstr(neg, "\"samples\":");
        if (p) p[10] = '-';
        refused &= p != NULL && tk_loader_cursor_from_json(&c3, neg, strlen(neg), "x.json", &err) != 0;
        free(neg);
    }
    check(refused, "malformed cursor JSON: refused, naming the file");
    free(json);
    tk_loader_free(L);
    free_batches(head, 23);
    free_batches(tail, nb);
}

static void test_prefetch(void) {
    printf("prefetch on and off give identical batches\n");
    tk_err err = {0};
    double w[3] = {2, 1, 1};
    size_t nb = 50;
    for (int pack = 0; pack <= 1; pack++) {
        tk_loader_opts o = {.batch_size = 5, .max_len = 50, .pack = pack, .shuffle = 1, .seed = 5, .shuffle_window = pack};
        tk_loader *A = open_loader(3, w, &o, &err);
        tk_loader_batch *va = take(A, nb);
        int ok = va != NULL;
        size_t depths[3] = {1, 3, 64};
        for (size_t d = 0; d < 3 && ok; d++) {
            o.prefetch = depths[d];
            o.cache_bytes = d == 2 ? (size_t)1 << 20 : 0; /* a cache of every frame changes nothing */
            tk_loader *Bl = open_loader(3, w, &o, &err);
            /* Let the thread run ahead (or not) at random moments. */
            if (d == 1) usleep(20000);
            tk_loader_batch *vb = take(Bl, nb);
            ok = vb != NULL;
            for (size_t k = 0; ok && k < nb; k++) ok &= batch_equal(&va[k], &vb[k]);
            free_batches(vb, nb);
            tk_loader_free(Bl);
        }
        char what[128];
        snprintf(what, sizeof what, "%s: prefetch 0, 1, 3, 64 (+ large frame cache) give the same 50 batches", pack ? "packed" : "padded");
        check(ok, what);
        free_batches(va, nb);
        tk_loader_free(A);
    }
    /* Freeing a loader whose thread is blocked on a full queue. */
    tk_loader_opts o = {.batch_size = 2, .max_len = 10, .shuffle = 1, .prefetch = 4};
    tk_loader *L = open_loader(1, NULL, &o, &err);
    usleep(10000);
    tk_loader_free(L);
    check(1, "free with a full prefetch queue returns");
}

static void test_errors(void) {
    printf("errors\n");
    tk_err err = {0};
    tk_loader_opts o = {.batch_size = 4, .max_len = 32, .shuffle = 1, .seed = 1};
    const char *missing[1] = {"/nonexistent/x.shard"};
    tk_loader_source src = {missing, 1, 1.0};
    check(tk_loader_open(&src, 1, &o, &err) == NULL && strstr(err.msg, "/nonexistent/x.shard"), "missing shard: named");
    src.paths = g_src1;
    src.weight = 0;
    check(tk_loader_open(&src, 1, &o, &err) == NULL && strstr(err.msg, "weight"), "weight 0: refused");
    src.weight = 1;
    tk_loader_opts z = o;
    z.batch_size = 0;
    check(tk_loader_open(&src, 1, &z, &err) == NULL, "batch size 0: refused");
    z = o;
    z.max_len = 0;
    check(tk_loader_open(&src, 1, &z, &err) == NULL, "max_len 0: refused");
    z = o;
    z.vocab_size = 1000;
    tk_loader *L = tk_loader_open(&src, 1, &z, &err);
    tk_loader_batch b = {0};
    check(L != NULL && tk_loader_next(L, &b, &err) != 0 && strstr(err.msg, g_b) && strstr(err.msg, "vocab"),
          "ids beyond the model's vocabulary: batch refused, shard named");
    tk_loader_free(L);

    /* A bit flip in the last frame of a shard: the batch that needs it fails, at the same batch with
     * and without prefetch, and keeps failing. */
    size_t n;
    FILE *f = fopen(g_b, "rb");
    fseek(f, 0, SEEK_END);
    n = (size_t)ftell(f);
    rewind(f);
    uint8_t *buf = malloc(n);
    TK_ASSERT(fread(buf, 1, n, f) == n);
    fclose(f);
    uint64_t frames = 0, index = 0;
    for (int i = 0; i < 8; i++) frames |= (uint64_t)buf[32 + i] << (8 * i);
    for (int i = 0; i < 8; i++) index |= (uint64_t)buf[56 + i] << (8 * i);
    uint64_t off = 0;
    for (int i = 0; i < 8; i++) off |= (uint64_t)buf[index + 48 * (frames - 1) + i] << (8 * i);
    buf[off + 5] ^= 0x20;
    f = fopen(g_bad, "wb");
    TK_ASSERT(fwrite(buf, 1, n, f) == n);
    fclose(f);
    free(buf);
    const char *badp[1] = {g_bad};
    tk_loader_source bs = {badp, 1, 1.0};
    size_t fail_at[2] = {0, 0};
    int named = 1, sticky = 1;
    for (int pf = 0; pf < 2; pf++) {
        tk_loader_opts e = o;
        e.prefetch = pf ? 3 : 0;
        L = tk_loader_open(&bs, 1, &e, &err);
        TK_ASSERT(L != NULL);
        size_t k = 0;
        while (k < 1000 && tk_loader_next(L, &b, &err) == 0) k++;
        fail_at[pf] = k;
        char fr[32];
        snprintf(fr, sizeof fr, "frame %llu", (unsigned long long)(frames - 1));
        named &= strstr(err.msg, g_bad) != NULL && strstr(err.msg, fr) != NULL;
        char first[1024];
        snprintf(first, sizeof first, "%s", err.msg);
        sticky &= tk_loader_next(L, &b, &err) != 0 && strcmp(first, err.msg) == 0;
        tk_loader_free(L);
    }
    printf("    fails at batch %zu (no prefetch) and %zu (prefetch 3)\n", fail_at[0], fail_at[1]);
    check(fail_at[0] < 1000 && fail_at[0] == fail_at[1], "damaged frame: fails at the same batch with and without prefetch");
    check(named, "the message names the shard and the frame");
    check(sticky, "later calls report the same error");
    tk_loader_batch_free(&b);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_test_loader_XXXXXX");
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    double t0 = tk_time();
    snprintf(g_a0, sizeof g_a0, "%s/a0.shard", g_dir);
    snprintf(g_a1, sizeof g_a1, "%s/a1.shard", g_dir);
    snprintf(g_b, sizeof g_b, "%s/b.shard", g_dir);
    snprintf(g_c, sizeof g_c, "%s/c.shard", g_dir);
    snprintf(g_bad, sizeof g_bad, "%s/bad.shard", g_dir);
    write_source(g_a0, 0, 0, 60);
    write_source(g_a1, 0, 60, N0 - 60);
    write_source(g_b, 1, 0, N1);
    write_source(g_c, 2, 0, N2);
    g_src0[0] = g_a0;
    g_src0[1] = g_a1;
    g_src1[0] = g_b;
    g_src2[0] = g_c;
    test_shuffle();
    test_mixing();
    test_packing();
    test_cursor(0, 0, 3);
    test_cursor(1, 2, 0);
    test_prefetch();
    test_errors();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) printf("note: could not remove %s\n", g_dir);
    printf("%d passed, %d failed (%.2f s)\n", n_pass, n_fail, tk_time() - t0);
    return n_fail == 0 ? 0 : 1;
}
