/* test_attention_full.c: the full (non-tiled) attention of src/ops/attention.c, which works in
 * causal blocks of query rows and runs one (b, h) or (b, g) task per thread, against plain loops.
 *
 * For every shape (query counts that are not a multiple of the 64-row block, including a last block
 * of one row; a KV cache S > T; MHA, GQA H=4 G=2 and MQA; a key padding mask with rows that see no
 * key; a one-token decode step):
 *   forward out and probs (laid out as [T,S] by probs_expand: the zeros past each row's causal limit,
 *   stored or not, included) and the
 *   backward's dq, dk, dv (added onto random starting values) vs a double-precision reference;
 *   rows that see no key have out 0, probs 0 and an unchanged dq;
 *   the backward with some gradients NULL gives the others bitwise unchanged;
 *   nothing is written past T*S floats of scratch;
 *   every output is bitwise identical with 1 and with 2 OpenMP threads (the larger shapes take the
 *   threaded path: at least TK_OMP_MIN_WORK score entries and two tasks).
 * The error measure is max|a - ref| / max(max|ref|, 1e-3) after a NaN/inf check. Exits 1 on any
 * failure.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops/ops.h"

#define TEST_NAME "test_attention_full"
#define TEST_SEED 0x6a09e667f3bcc909ull
#define TEST_COL 78
#include "test_util.h"

#include "attention_ref.h"

/* TOL: fp32 kernel against double loops over sums of up to 200 terms (measured 0.5-4e-7). */
#define TOL 2e-6
#define GUARD 256 /* sentinel floats after the scratch (more than one row of S) */
#define SENTINEL 12345.0f

/* ---- helpers ---------------------------------------------------------------------------------- */

static int same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* ---- plain double reference -------------------------------------------------------------------- */

typedef struct {
    const char *label;
    size_t B, T, S, H, G, D;
    const uint8_t *mask; /* [B,S] or NULL */
} shape;

typedef struct {
    float *q, *k, *v, *dout;       /* inputs: [B,T,H*D], [B,S,G*D] x2, [B,T,H*D] */
    float *dq0, *dk0, *dv0;        /* starting values of the gradients (the backward adds) */
    double *out, *probs;           /* reference forward: [B,T,H*D], [B,H,T,S] */
    double *dq, *dk, *dv;          /* reference gradients, starting values included */
} problem;

static int visible(const shape *c, size_t b, size_t t, size_t j) {
    return j <= c->S - c->T + t && (!c->mask || c->mask[b * c->S + j]);
}

/* The double reference (attention_ref.h), gradients starting from the same values as the kernel's. */
static void reference(problem *p, const shape *c) {
    size_t B = c->B, T = c->T, S = c->S, H = c->H, G = c->G, D = c->D;
    for (size_t i = 0; i < B * T * H * D; i++) p->dq[i] = p->dq0[i];
    for (size_t i = 0; i < B * S * G * D; i++) p->dk[i] = p->dk0[i], p->dv[i] = p->dv0[i];
    attention_ref(p->q, p->k, p->v, c->mask, B, T, S, H, G, D, p->out, p->probs, p->dout, p->dq, p->dk, p->dv);
}

/* ---- one shape --------------------------------------------------------------------------------- */

typedef struct {
    float *out, *probs, *dq, *dk, *dv, *scratch; /* scratch [T*S + GUARD] */
} result;

static void result_alloc(result *r, const shape *c) {
    size_t nq = c->B * c->T * c->H * c->D, nk = c->B * c->S * c->G * c->D;
    r->out = xalloc(nq, sizeof(float)), r->probs = xalloc(c->B * c->H * c->T * c->S, sizeof(float));
    r->dq = xalloc(nq, sizeof(float)), r->dk = xalloc(nk, sizeof(float)), r->dv = xalloc(nk, sizeof(float));
    r->scratch = xalloc(c->T * c->S + GUARD, sizeof(float));
}

static void result_free(result *r) {
    tk_free(r->out), tk_free(r->probs), tk_free(r->dq), tk_free(r->dk), tk_free(r->dv), tk_free(r->scratch);
}

/* Forward and backward on `threads` threads; the gradients start from p's starting values, outputs
 * and probs from NaN (the forward must overwrite them), the scratch from NaN with a sentinel guard.
 * Returns whether the guard survived. */
static int run(result *r, const problem *p, const shape *c, int threads) {
    size_t B = c->B, T = c->T, S = c->S, H = c->H, G = c->G, D = c->D;
    size_t nq = B * T * H * D, nk = B * S * G * D, np = B * H * T * S;
    tk_set_threads(threads);
    for (size_t i = 0; i < nq; i++) r->out[i] = NAN;
    for (size_t i = 0; i < np; i++) r->probs[i] = NAN;
    for (size_t i = 0; i < T * S; i++) r->scratch[i] = NAN;
    for (size_t i = 0; i < GUARD; i++) r->scratch[T * S + i] = SENTINEL;
    memcpy(r->dq, p->dq0, nq * sizeof(float));
    memcpy(r->dk, p->dk0, nk * sizeof(float));
    memcpy(r->dv, p->dv0, nk * sizeof(float));
    tk_attention_forward(r->out, r->probs, p->q, p->k, p->v, c->mask, B, T, S, H, G, D);
    tk_attention_backward(r->dq, r->dk, r->dv, r->scratch, p->dout, r->probs, p->q, p->k, p->v, B, T, S, H,
                          G, D);
    int guard_ok = 1;
    for (size_t i = 0; i < GUARD; i++) guard_ok &= r->scratch[T * S + i] == SENTINEL;
    return guard_ok;
}

static void test_shape(const shape *c) {
    char name[200];
    size_t B = c->B, T = c->T, S = c->S, H = c->H, G = c->G, D = c->D;
    size_t nq = B * T * H * D, nk = B * S * G * D, np = B * H * T * S;
    problem p;
    p.q = xalloc(nq, sizeof(float)), p.dout = xalloc(nq, sizeof(float)), p.dq0 = xalloc(nq, sizeof(float));
    p.k = xalloc(nk, sizeof(float)), p.v = xalloc(nk, sizeof(float));
    p.dk0 = xalloc(nk, sizeof(float)), p.dv0 = xalloc(nk, sizeof(float));
    p.out = xalloc(nq, sizeof(double)), p.probs = xalloc(np, sizeof(double));
    p.dq = xalloc(nq, sizeof(double)), p.dk = xalloc(nk, sizeof(double)), p.dv = xalloc(nk, sizeof(double));
    fill(p.q, nq, -1.5f, 1.5f);
    fill(p.k, nk, -1.5f, 1.5f);
    fill(p.v, nk, -1, 1);
    fill(p.dout, nq, -1, 1);
    fill(p.dq0, nq, -0.1f, 0.1f);
    fill(p.dk0, nk, -0.1f, 0.1f);
    fill(p.dv0, nk, -0.1f, 0.1f);
    reference(&p, c);

    result r1, r2;
    result_alloc(&r1, c);
    result_alloc(&r2, c);
    int guard1 = run(&r1, &p, c, 1);
    int guard2 = run(&r2, &p, c, 2);

    snprintf(name, sizeof name, "%s: forward out vs double reference", c->label);
    report(name, rel_err_d(r2.out, p.out, nq), TOL);
    float *pfull = probs_expand(r2.probs, B * H, T, S);
    snprintf(name, sizeof name, "%s: forward probs (all T x S) vs double reference", c->label);
    report(name, rel_err_d(pfull, p.probs, np), TOL);
    snprintf(name, sizeof name, "%s: backward dq vs double reference", c->label);
    report(name, rel_err_d(r2.dq, p.dq, nq), TOL);
    snprintf(name, sizeof name, "%s: backward dk vs double reference", c->label);
    report(name, rel_err_d(r2.dk, p.dk, nk), TOL);
    snprintf(name, sizeof name, "%s: backward dv vs double reference", c->label);
    report(name, rel_err_d(r2.dv, p.dv, nk), TOL);

    /* rows that see no key: out 0, probs 0, dq untouched */
    size_t dead = 0;
    int dead_ok = 1;
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < T; t++) {
            int any = 0;
            for (size_t j = 0; j < S; j++) any |= visible(c, b, t, j);
            if (any) continue;
            dead++;
            for (size_t i = 0; i < H * D; i++) {
                size_t at = (b * T + t) * H * D + i;
                dead_ok &= r2.out[at] == 0.0f && r2.dq[at] == p.dq0[at];
            }
            for (size_t h = 0; h < H; h++)
                for (size_t j = 0; j < S; j++) dead_ok &= pfull[((b * H + h) * T + t) * S + j] == 0.0f;
        }
    if (dead) {
        snprintf(name, sizeof name, "%s: %zu rows see no key: out 0, probs 0, dq unchanged", c->label, dead);
        report_bool(name, dead_ok);
    }

    snprintf(name, sizeof name, "%s: nothing written past T*S floats of scratch (1, 2 threads)", c->label);
    report_bool(name, guard1 && guard2);
    snprintf(name, sizeof name, "%s: out, probs, dq, dk, dv bitwise equal on 1 and 2 threads", c->label);
    report_bool(name, same_bits(r1.out, r2.out, nq) && same_bits(r1.probs, r2.probs, B * H * tk_attention_probs_head(T, S)) &&
                          same_bits(r1.dq, r2.dq, nq) && same_bits(r1.dk, r2.dk, nk) &&
                          same_bits(r1.dv, r2.dv, nk));

    /* NULL gradients: each one alone equals its value from the full call (2 threads) */
    memcpy(r1.dq, p.dq0, nq * sizeof(float));
    memcpy(r1.dk, p.dk0, nk * sizeof(float));
    memcpy(r1.dv, p.dv0, nk * sizeof(float));
    tk_attention_backward(r1.dq, NULL, NULL, r1.scratch, p.dout, r2.probs, p.q, p.k, p.v, B, T, S, H, G, D);
    tk_attention_backward(NULL, r1.dk, NULL, r1.scratch, p.dout, r2.probs, p.q, p.k, p.v, B, T, S, H, G, D);
    tk_attention_backward(NULL, NULL, r1.dv, r1.scratch, p.dout, r2.probs, p.q, p.k, p.v, B, T, S, H, G, D);
    snprintf(name, sizeof name, "%s: dq, dk, dv alone (others NULL) equal the full call", c->label);
    report_bool(name,
                same_bits(r1.dq, r2.dq, nq) && same_bits(r1.dk, r2.dk, nk) && same_bits(r1.dv, r2.dv, nk));

    tk_free(pfull);
    result_free(&r1);
    result_free(&r2);
    tk_free(p.q), tk_free(p.dout), tk_free(p.dq0), tk_free(p.k), tk_free(p.v), tk_free(p.dk0), tk_free(p.dv0);
    tk_free(p.out), tk_free(p.probs), tk_free(p.dq), tk_free(p.dk), tk_free(p.dv);
}

/* ---- main ------------------------------------------------------------------------------------- */

int main(void) {
    double t0 = tk_time();

    /* GQA with a 20-position KV cache, 150 queries (blocks of 64, 64, 22); batch 0 has scattered
     * padded keys, batch 1 pads its first 40 keys, so its queries 0..19 (positions 20..39) see no
     * key. Threaded in both directions (4 (b, g) tasks, two 64-row scratch slabs). */
    enum { S1 = 170 };
    static uint8_t mask1[2 * S1];
    for (size_t j = 0; j < S1; j++) {
        mask1[j] = j % 17 != 3 && j != S1 - 1;
        mask1[S1 + j] = j >= 40;
    }
    shape gqa = {"GQA H=4 G=2 B=2 T=150 S=170 D=16 mask", 2, 150, S1, 4, 2, 16, mask1};
    test_shape(&gqa);

    /* MHA, T = 128 queries after one cached position: the two 64-row scratch slabs fill T*S exactly,
     * so a slab placed too far runs into the guard (when both threads take a task) */
    shape mha = {"MHA H=G=2 B=1 T=128 S=129 D=8", 1, 128, 129, 2, 2, 8, NULL};
    test_shape(&mha);

    /* MQA: one (b, g) task, so the backward runs serially (BLAS threads each call) */
    enum { S3 = 200 };
    static uint8_t mask3[S3];
    for (size_t j = 0; j < S3; j++) mask3[j] = j < S3 - 7; /* right padding */
    shape mqa = {"MQA H=4 G=1 B=1 T=S=200 D=16 right pad", 1, 200, S3, 4, 1, 16, mask3};
    test_shape(&mqa);

    /* small: below the threading threshold; a last block of one row */
    shape small = {"MHA H=G=3 B=1 T=S=65 D=8 (serial)", 1, 65, 65, 3, 3, 8, NULL};
    test_shape(&small);

    /* a decode step of the KV cache: one query, 77 keys */
    shape step = {"decode H=4 G=2 B=1 T=1 S=77 D=16", 1, 1, 77, 4, 2, 16, NULL};
    test_shape(&step);

    printf("test_attention_full: %d failure(s), %.2f s\n", g_failures, tk_time() - t0);
    return g_failures ? 1 : 0;
}
