/* test_gatesel.c: the selectivity figures (analysis/gatelog.h, docs/gates.md "Selectivity").
 *
 * (1) tk_gatesel_compute on hand-made window counts: 5 modules with keeps 1, 0, .5, .3 and .95 (the
 *     interior's upper edge) and kind-dependent kept counts give interior share 3/5, spreads mean
 *     .18, max .5, overall .02; a window without tokens gives NAN figures.
 * (2) tk_gatesel_read, which reads a gates log from its end, equals the report's selectivity
 *     (tk_gaterun_load + tk_gatesum_compute) for windows of 1 to all steps, on a log of 70 modules
 *     whose lines are ~6 KB (a window of 25 steps needs more than the first 64 KB read), with a
 *     resumed run's steps logged twice and an unterminated last line.
 * (3) a missing log and a header-only log: found 0; a malformed line in the window: an error naming
 *     the file and the byte offset.
 * Exits 1 if any check fails.
 */
#define TEST_NAME "test_gatesel"
#define TEST_SEED 0x5e1ec7171e5ull
#include "test_util.h"

#include "analysis/gatelog.h"
#include "analysis/gatereport.h"
#include "peft/peft_config.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define K TK_GATELOG_NKIND

static int close_to(double a, double b) { return fabs(a - b) <= 1e-12; }

static void check_compute(void) {
    /* window sums: 40 prompt and 40 response tokens */
    const double n[K] = {40, 40, 0, 0};
    const double kept[5 * K] = {40, 40, 0, 0, /* keep 1: a module switched on */
                                0,  0,  0, 0, /* keep 0: switched off */
                                10, 30, 0, 0, /* keep .5: prompt .25, response .75 */
                                20, 4,  0, 0, /* keep .3: prompt .5, response .1 */
                                38, 38, 0, 0}; /* keep .95: on the edge, interior */
    double spread[5];
    tk_gatesel s;
    memset(&s, 0, sizeof s);
    tk_gatesel_compute(&s, n, kept, 5, spread);
    report_bool("compute: 3 of 5 modules interior, 1 open, 1 closed",
                s.modules == 5 && s.interior_modules == 3 && s.modules_open == 1 && s.modules_closed == 1);
    report_bool("compute: interior share 0.6", close_to(s.interior_share, 0.6));
    report_bool("compute: per-module spreads 0, 0, 0.5, 0.4, 0",
                spread[0] == 0 && spread[1] == 0 && close_to(spread[2], 0.5) && close_to(spread[3], 0.4) && spread[4] == 0);
    report_bool("compute: kind spread mean 0.18, max 0.5, overall 108/200 vs 112/200 = 0.02",
                close_to(s.kind_spread_mean, 0.18) && close_to(s.kind_spread_max, 0.5) &&
                    close_to(s.kind_spread_overall, 0.02));
    report_bool("compute: kinds present are prompt and response", s.kinds == 3u);
    const double zero[K] = {0, 0, 0, 0};
    tk_gatesel_compute(&s, zero, kept, 5, spread);
    report_bool("compute: no tokens in the window gives NAN figures",
                isnan(s.interior_share) && isnan(s.kind_spread_mean) && isnan(s.kind_spread_max) &&
                    isnan(s.kind_spread_overall) && isnan(spread[0]) && s.interior_modules == 0);
}

/* uniform in 0..hi */
static unsigned urand(unsigned hi) {
    unsigned v = (unsigned)(rnd(0.0f, 1.0f) * (float)(hi + 1));
    return v > hi ? hi : v;
}

/* One step line of M modules with random counts; module m % 4 keeps all, none, some or most tokens. */
static void write_step(FILE *f, int step, size_t M) {
    unsigned n[K] = {urand(60), urand(60), 0, urand(5)};
    fprintf(f, "{\"step\":%d,\"n\":[%u,%u,%u,%u],\"tau\":[", step, n[0], n[1], n[2], n[3]);
    for (size_t m = 0; m < M; m++) fprintf(f, "%s0.125", m ? "," : "");
    fputs("],\"kept\":[", f);
    for (size_t m = 0; m < M; m++) {
        unsigned mode = (unsigned)(m % 4); /* all, none, some, most */
        fputs(m ? ",[" : "[", f);
        for (int j = 0; j < K; j++) {
            unsigned k = mode == 0 ? n[j] : mode == 1 ? 0 : mode == 2 ? urand(n[j]) : n[j] - urand(n[j] / 8);
            fprintf(f, "%s%u", j ? "," : "", k);
        }
        fputc(']', f);
    }
    fputs("],\"q\":[", f);
    for (size_t m = 0; m < M; m++) fprintf(f, "%snull", m ? "," : "");
    fputs("],\"hist\":[", f);
    for (size_t m = 0; m < M; m++) {
        fputs(m ? ",[" : "[", f);
        for (int j = 0; j < TK_GATELOG_NBIN; j++) fprintf(f, "%s%u", j ? "," : "", j == 5 ? 100000u : 0u);
        fputc(']', f);
    }
    fputs("]}\n", f);
}

static void write_header(FILE *f, int n_layers) {
    fprintf(f, "{\"format\":\"tspeft-gates\",\"version\":1,\"gated\":true,\"n_layers\":%d,\"modules\":[", n_layers);
    for (int l = 0; l < n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            fprintf(f, "%s\"model.layers.%d.%s.%s\"", l || p ? "," : "", l, tk_proj_block[p], tk_proj_short[p]);
    fputs("]}\n", f);
}

static int same(const tk_gatesel *a, const tk_gatesel *b) {
    return a->gated == b->gated && a->steps == b->steps && a->first_step == b->first_step &&
           a->last_step == b->last_step && a->modules == b->modules && a->interior_modules == b->interior_modules &&
           a->modules_open == b->modules_open && a->modules_closed == b->modules_closed &&
           a->interior_share == b->interior_share && a->kind_spread_mean == b->kind_spread_mean &&
           a->kind_spread_max == b->kind_spread_max && a->kind_spread_overall == b->kind_spread_overall &&
           a->kinds == b->kinds;
}

static void check_read(const char *dir) {
    const int n_layers = 10;
    const size_t M = (size_t)n_layers * TK_NPROJ;
    char path[512];
    snprintf(path, sizeof path, "%s/gates.jsonl", dir);
    FILE *f = fopen(path, "w");
    TK_ASSERT(f != NULL);
    write_header(f, n_layers);
    for (int s = 1; s <= 30; s++) write_step(f, s, M);
    for (int s = 21; s <= 40; s++) write_step(f, s, M); /* a resumed run logs 21..30 again */
    long body = ftell(f);
    fputs("{\"step\":41,\"n\":[1,", f);                    /* a write cut short */
    TK_ASSERT(fclose(f) == 0);
    printf("log: %zu modules, 50 step lines of ~%ld bytes\n", M, body / 51);
    tk_err err = {0};
    tk_gaterun *r = tk_gaterun_load(dir, &err);
    TK_ASSERT(r != NULL && r->S == 40);
    static const int windows[] = {1, 5, 10, 25, 40, 0, 100};
    for (size_t i = 0; i < sizeof windows / sizeof windows[0]; i++) {
        tk_gatesum sum;
        tk_gatesel got;
        int found = 0;
        TK_ASSERT(tk_gatesum_compute(&sum, r, windows[i], &err) == 0);
        int rc = tk_gatesel_read(&got, path, windows[i], &found, &err);
        char name[96];
        snprintf(name, sizeof name, "read window %d == the report's selectivity (steps %d-%d)", windows[i],
                 sum.sel.first_step, sum.sel.last_step);
        report_bool(name, rc == 0 && found && same(&got, &sum.sel) && sum.sel.interior_modules > 0 &&
                              sum.sel.modules_open > 0 && sum.sel.modules_closed > 0);
        tk_gatesum_free(&sum);
    }
    tk_gaterun_free(r);

    tk_gatesel s;
    int found = 1;
    snprintf(path, sizeof path, "%s/missing.jsonl", dir);
    report_bool("a missing log: found 0, no error", tk_gatesel_read(&s, path, 10, &found, &err) == 0 && !found);
    snprintf(path, sizeof path, "%s/head.jsonl", dir);
    f = fopen(path, "w");
    TK_ASSERT(f != NULL);
    write_header(f, 1);
    TK_ASSERT(fclose(f) == 0);
    found = 1;
    report_bool("a header-only log: found 0, no error", tk_gatesel_read(&s, path, 10, &found, &err) == 0 && !found);
    snprintf(path, sizeof path, "%s/bad.jsonl", dir);
    f = fopen(path, "w");
    TK_ASSERT(f != NULL);
    write_header(f, 1);
    write_step(f, 1, TK_NPROJ);
    long at = ftell(f);
    fputs("{\"step\":2,\"n\":[1,0,0,0],\"kept\":[[2,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,0]]}\n", f);
    write_step(f, 3, TK_NPROJ);
    TK_ASSERT(fclose(f) == 0);
    char where[64];
    snprintf(where, sizeof where, "byte %ld:", at);
    int rc = tk_gatesel_read(&s, path, 10, &found, &err);
    report_bool("a kept count above the step's tokens: error naming the file and byte offset",
                rc == -1 && strstr(err.msg, "bad.jsonl") && strstr(err.msg, where) && strstr(err.msg, "kept"));
    printf("  (%s)\n", err.msg);
    rc = tk_gatesel_read(&s, path, 1, &found, &err);
    report_bool("the same log, window 1: the bad line is outside it", rc == 0 && found && s.last_step == 3 && s.steps == 1);
}

int main(void) {
    char dir[] = "/tmp/tk_gatesel_XXXXXX";
    TK_ASSERT(mkdtemp(dir) != NULL);
    check_compute();
    check_read(dir);
    static const char *const files[] = {"gates.jsonl", "head.jsonl", "bad.jsonl"};
    for (size_t i = 0; i < 3; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        remove(p);
    }
    rmdir(dir);
    if (g_failures) printf("%s: %d checks FAILED\n", TEST_NAME, g_failures);
    return g_failures ? 1 : 0;
}
