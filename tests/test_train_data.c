/* test_train_data.c: the trainer's data module (src/train/train_data.c).
 *
 * Checked: format detection by magic (a shard named .jsonl, JSONL named .shard); JSONL micro-batches
 * equal tk_batch_make's rows and their kinds are PROMPT / RESPONSE / PAD by label and mask; shard
 * micro-batches carry the records' own kinds; specs PATH:WEIGHT, globs (sorted, one dataset) and
 * directories (shards only, other files skipped); tk_train_data_first_step gives step 1's batches
 * again and leaves the stream where it was; a cursor restores the continuation; a batch with images
 * is an error naming the shard and record; bad specs give errors naming the spec. Exits 1 if any
 * check fails.
 */
#include "common.h"
#include "datasets/shard.h"
#include "train/train_data.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int n_fail = 0, n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-76s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) n_pass++;
    else n_fail++;
}

static char g_dir[64];

static void path_of(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", g_dir, name); }

/* Record i of dataset s: length 3 + (i % 5), ids 10*s + i + t (below 64), label -100 on the first
 * token, kinds 1 on the first half and 2 after (a shard's own kinds, not derived from labels). */
static size_t rlen(size_t i) { return 3 + i % 5; }
static int32_t rid(size_t s, size_t i, size_t t) { return (int32_t)((10 * s + i + t) % 60 + 1); }

static void write_shard(const char *name, size_t s, size_t first, size_t n, int image_at) {
    char path[128];
    path_of(path, sizeof path, name);
    tk_err err = {0};
    tk_shard_writer_opts o = {.frame_target = 64};
    tk_shard_writer *w = tk_shard_writer_open(path, &o, &err);
    TK_ASSERT(w != NULL);
    static const uint8_t img[4] = {1, 2, 3, 4};
    tk_shard_image im = {.kind = TK_IMAGE_ENCODED, .nbytes = sizeof img, .data = img};
    for (size_t i = first; i < first + n; i++) {
        int32_t ids[16], labels[16];
        uint8_t kinds[16];
        size_t len = rlen(i);
        for (size_t t = 0; t < len; t++) {
            ids[t] = rid(s, i, t);
            labels[t] = t == 0 ? -100 : ids[t];
            kinds[t] = t < len / 2 ? TK_KIND_PROMPT : TK_KIND_RESPONSE;
        }
        tk_shard_record r = {.n_tokens = len, .input_ids = ids, .labels = labels, .kinds = kinds,
                             .n_images = (int)i == image_at ? 1 : 0, .images = &im};
        TK_ASSERT(tk_shard_writer_add(w, &r, &err) == 0);
    }
    TK_ASSERT(tk_shard_writer_close(w, NULL, &err) == 0);
}

static void write_text(const char *name, const char *text) {
    char path[128];
    path_of(path, sizeof path, name);
    tk_err err = {0};
    TK_ASSERT(tk_write_file_atomic(path, text, strlen(text), &err) == 0);
}

static tk_train_data_opts opts(const char *const *specs, size_t n) {
    tk_train_data_opts o = {.specs = specs, .n_specs = n, .batch_size = 2, .grad_accum = 2, .max_len = 16,
                            .shuffle = 1, .seed = 7, .prefetch = 1, .vocab_size = 64};
    return o;
}

/* A copy of the current step's micro-batches' ids (for comparing steps). */
static void snapshot(const tk_train_data *d, size_t K, int32_t *out, size_t cap) {
    size_t j = 0;
    memset(out, 0, cap * sizeof *out);
    for (size_t k = 0; k < K; k++) {
        const tk_batch *b = tk_train_data_mb(d, k)->text;
        for (size_t i = 0; i < b->B * b->T && j < cap; i++) out[j++] = b->input_ids[i];
        if (j < cap) out[j++] = -1;
    }
}

static void test_jsonl(void) {
    printf("JSONL\n");
    /* named .shard on purpose: detection is by magic */
    write_text("rows.shard", "{\"input_ids\": [5, 6, 7, 8], \"labels\": [-100, -100, 7, 8]}\n"
                             "{\"input_ids\": [9, 10], \"labels\": [-100, 10]}\n"
                             "{\"input_ids\": [11, 12, 13], \"labels\": [11, 12, 13]}\n");
    char p[128];
    path_of(p, sizeof p, "rows.shard");
    const char *specs[] = {p};
    tk_train_data_opts o = opts(specs, 1);
    o.shuffle = 0;
    tk_err err = {0};
    tk_train_data *d = tk_train_data_open(&o, &err);
    check(d != NULL && !tk_train_data_is_shards(d), "a JSONL file named .shard is read as JSONL");
    if (!d) {
        printf("    %s\n", err.msg);
        return;
    }
    check(tk_train_data_step(d, 1, &err) == 0, "step 1 of a JSONL file");
    const tk_train_mb *mb = tk_train_data_mb(d, 0);
    const tk_batch *b = mb->text;
    /* rows 0 and 1, T = 4: row 1 padded */
    static const uint8_t want0[8] = {1, 1, 2, 2, 1, 2, 0, 0};
    check(b->B == 2 && b->T == 4 && memcmp(mb->kinds, want0, 8) == 0,
          "kinds: PROMPT on -100 labels, RESPONSE on targets, PAD on padding");
    const tk_batch *b1 = tk_train_data_mb(d, 1)->text;
    check(b1->input_ids[0] == 11 && b1->input_ids[b1->T] == 5, "micro-batch 2 holds rows 2 and 0 (file order, wrapping)");
    check(tk_train_data_targets(d) == tk_batch_count_targets(b) + tk_batch_count_targets(b1),
          "targets are the sum over the step's micro-batches");
    tk_train_data_free(d);

    o.pack = 1;
    d = tk_train_data_open(&o, &err);
    check(d == NULL && strstr(err.msg, "shards only") != NULL, "--pack on JSONL is refused");
    tk_train_data_free(d);
}

static void test_shards(void) {
    printf("shards\n");
    write_shard("a.jsonl", 0, 0, 12, -1); /* named .jsonl on purpose */
    mkdir(g_dir, 0755);
    char sub[128];
    path_of(sub, sizeof sub, "b");
    mkdir(sub, 0755);
    write_shard("b/part-1.bin", 1, 6, 6, -1);
    write_shard("b/part-0.bin", 1, 0, 6, -1);
    write_text("b/notes.txt", "not a shard\n");
    char a[128], bglob[128], bdir[128];
    path_of(a, sizeof a, "a.jsonl");
    snprintf(bglob, sizeof bglob, "%s/b/part-*.bin:3", g_dir);
    snprintf(bdir, sizeof bdir, "%s/b:3", g_dir);
    tk_err err = {0};

    const char *one[] = {a};
    tk_train_data_opts o = opts(one, 1);
    o.shuffle = 0;
    tk_train_data *d = tk_train_data_open(&o, &err);
    check(d && tk_train_data_is_shards(d), "a shard named .jsonl is read as a shard");
    if (!d) {
        printf("    %s\n", err.msg);
        return;
    }
    check(tk_train_data_step(d, 1, &err) == 0, "step 1 of a shard");
    const tk_train_mb *mb = tk_train_data_mb(d, 0);
    const tk_batch *b = mb->text;
    int ok = b->B == 2 && b->T == rlen(1);
    for (size_t t = 0; ok && t < rlen(1); t++) {
        ok = b->input_ids[b->T + t] == rid(0, 1, t) && mb->kinds[b->T + t] == (t < rlen(1) / 2 ? 1 : 2);
    }
    for (size_t t = rlen(0); ok && t < b->T; t++) ok = mb->kinds[t] == TK_KIND_PAD;
    check(ok, "shard micro-batch: the records in file order with the shard's own kinds (PAD on padding)");
    tk_train_data_free(d);

    /* glob and directory: the same dataset (sorted: part-0 then part-1, notes.txt skipped) */
    int32_t s1[256], s2[256], s3[256], s4[256];
    const char *g[] = {a, bglob}, *dd[] = {a, bdir};
    tk_train_data_opts og = opts(g, 2), od = opts(dd, 2);
    tk_train_data *dg = tk_train_data_open(&og, &err), *dr = tk_train_data_open(&od, &err);
    check(dg && dr, "a glob and a directory of shards open (the directory's other file skipped)");
    if (!dg || !dr) {
        printf("    %s\n", err.msg);
        tk_train_data_free(dg);
        tk_train_data_free(dr);
        return;
    }
    check(strstr(tk_train_data_describe(dg), "2 datasets, 3 shards, 24 records") != NULL, tk_train_data_describe(dg));
    ok = 1;
    for (int step = 1; step <= 5 && ok; step++) {
        ok = tk_train_data_step(dg, step, &err) == 0 && tk_train_data_step(dr, step, &err) == 0;
        snapshot(dg, 2, s1, 256);
        snapshot(dr, 2, s2, 256);
        ok = ok && memcmp(s1, s2, sizeof s1) == 0;
    }
    check(ok, "glob and directory give the same stream (5 steps)");

    /* first_step: step 1 again, the stream unchanged */
    tk_loader_cursor before, after;
    tk_train_data_get_cursor(dg, &before);
    tk_train_data_opts o2 = opts(g, 2);
    tk_train_data *fresh = tk_train_data_open(&o2, &err);
    TK_ASSERT(fresh && tk_train_data_step(fresh, 1, &err) == 0);
    snapshot(fresh, 2, s3, 256);
    check(tk_train_data_first_step(dg, &err) == 0, "first_step after 5 steps");
    snapshot(dg, 2, s4, 256);
    tk_train_data_get_cursor(dg, &after);
    check(memcmp(s3, s4, sizeof s3) == 0, "first_step gives step 1's micro-batches");
    check(memcmp(&before, &after, sizeof before) == 0, "first_step leaves the cursor where it was");
    /* continuation: dg's step 6 == a fresh loader set to the cursor */
    TK_ASSERT(tk_train_data_step(dg, 6, &err) == 0);
    snapshot(dg, 2, s1, 256);
    check(tk_train_data_set_cursor(fresh, &before, &err) == 0 && tk_train_data_step(fresh, 6, &err) == 0,
          "a fresh data object takes the cursor");
    snapshot(fresh, 2, s2, 256);
    check(memcmp(s1, s2, sizeof s1) == 0, "and continues with the identical step 6");
    check(tk_train_data_epoch(dg, 6) > 0.9 && tk_train_data_epoch(dg, 6) < 1.1,
          "epoch after 6 steps of 4 samples over 24 records is 1");
    /* the weight matters: 3:1 versus 1:1 draw differently */
    const char *g1[] = {a, bglob + 0};
    char bglob1[128];
    snprintf(bglob1, sizeof bglob1, "%s/b/part-*.bin", g_dir);
    g1[1] = bglob1;
    tk_train_data_opts o3 = opts(g1, 2);
    tk_train_data *w1 = tk_train_data_open(&o3, &err);
    TK_ASSERT(w1 != NULL);
    check(tk_train_data_set_cursor(w1, &before, &err) != 0 && strstr(err.msg, "another data mix") != NULL,
          "a cursor from another weight is refused");
    tk_train_data_free(w1);
    tk_train_data_free(fresh);
    tk_train_data_free(dg);
    tk_train_data_free(dr);
}

static void test_errors(void) {
    printf("errors\n");
    write_shard("img.shard", 2, 0, 6, -1);
    write_shard("img-1.shard", 2, 6, 6, 8); /* record 8 of the dataset, record 2 of img-1.shard */
    char p[128], spec[160], pg[160];
    path_of(p, sizeof p, "img.shard");
    snprintf(pg, sizeof pg, "%s/img*.shard", g_dir);
    const char *specs[] = {pg};
    tk_train_data_opts o = opts(specs, 1);
    o.shuffle = 0;
    tk_err err = {0};
    tk_train_data *d = tk_train_data_open(&o, &err);
    TK_ASSERT(d != NULL);
    int rc = 0;
    for (int step = 1; step <= 3 && rc == 0; step++) rc = tk_train_data_step(d, step, &err);
    check(rc != 0 && strstr(err.msg, "img-1.shard: record 2 ") && strstr(err.msg, "text-only"),
          "a batch with images: error naming the shard (the glob's second) and its record");
    printf("    %s\n", err.msg);
    tk_train_data_free(d);

    struct {
        const char *spec, *want;
    } bad[] = {{"%s/nothing-*.shard", "no file matches"},
               {"%s/missing.shard", "cannot open"},
               {"%s/img.shard:0", "weight 0"},
               {"%s/img.shard:-2", "weight -2"},
               {"%s/rows.shard:2", "JSONL is one dataset"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(spec, sizeof spec, bad[i].spec, g_dir);
        const char *s1[] = {spec};
        tk_train_data_opts ob = opts(s1, 1);
        tk_train_data *x = tk_train_data_open(&ob, &err);
        char what[200];
        snprintf(what, sizeof what, "--data %s: \"%s\"", strrchr(spec, '/') + 1, bad[i].want);
        check(x == NULL && strstr(err.msg, bad[i].want) != NULL, what);
        if (x || !strstr(err.msg, bad[i].want)) printf("    got: %s\n", err.msg);
        tk_train_data_free(x);
    }
    const char *two[] = {p, p};
    snprintf(spec, sizeof spec, "%s/rows.shard", g_dir);
    two[1] = spec;
    tk_train_data_opts o2 = opts(two, 2);
    tk_train_data *x = tk_train_data_open(&o2, &err);
    check(x == NULL && strstr(err.msg, "rows.shard") && strstr(err.msg, "JSONL"), "JSONL mixed with shards is refused");
    tk_train_data_free(x);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_train_data_%ld", (long)getpid());
    mkdir(g_dir, 0755);
    test_jsonl();
    test_shards();
    test_errors();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", g_dir);
    printf("test_train_data: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
