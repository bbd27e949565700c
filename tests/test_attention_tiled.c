/* test_attention_tiled.c: the tiled (memory-efficient) attention of src/ops/attention_tiled.c against
 * the plain kernel of attention.c, which stores the full softmax matrix.
 *
 * For every shape (one element, several query and key blocks, KV cache S > T, GQA and MQA, padding
 * masks with rows that see no key, a left padding that hides a whole key block, D = 16 and 64):
 *   forward out vs tk_attention_forward, lse vs log(sum exp) of double-precision reference scores,
 *   backward dq, dk, dv vs tk_attention_backward, rows that see no key give out 0, lse -inf, dq 0,
 *   the backward adds (called twice gives double), NULL gradients skip exactly their own work, and
 *   neither kernel writes past tk_attention_tiled_scratch floats of scratch.
 * Tiny shapes (and one that spans key blocks) are checked against central differences of
 * L = sum(out * R). The error measure is max|a - ref| / max(max|ref|, 1e-3) after a NaN/inf check.
 * Timings of both kernels at B=1 H=12 T=S=512 D=64 are printed for information, never asserted.
 * Exits 1 on any failure.
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

#define TEST_NAME "test_attention_tiled"
#define TEST_SEED 0x2545f4914f6cdd1dull
#define TEST_COL 66
#include "test_util.h"

/* Tolerances. FWD_TOL: the same fp32 softmax-weighted sum in two orders (online rescaling against
 * normalize-then-multiply); BWD_TOL: the same for the gradients (Di from dout*out instead of P*dP).
 * FD_EPS / FD_TOL as in test_ops_grad.c. */
#define FWD_TOL 2e-6
#define BWD_TOL 1e-5
#define FD_EPS 1e-3f
#define FD_TOL 5e-3
#define GUARD 64 /* sentinel floats after the scratch */

/* ---- helpers ---------------------------------------------------------------------------------- */

/* second [n] must be exactly twice first [n] up to one rounding: the backward added twice. */
static void check_adds(const char *name, const float *first, const float *second, size_t n) {
    double maxd = 0.0, maxr = 0.0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(first[i]) || !isfinite(second[i])) finite = 0;
        double d = fabs((double)second[i] - 2.0 * (double)first[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs((double)first[i]) > maxr ? fabs((double)first[i]) : maxr;
    }
    double err = finite ? maxd / (maxr > 1e-3 ? maxr : 1e-3) : INFINITY;
    report(name, err, 1e-6);
    if (maxr == 0.0) report_bool("  (gradient above is not identically zero)", 0);
}

/* scratch of n floats followed by GUARD sentinels (NaN payload that no kernel produces). */
static const uint32_t SENTINEL = 0x7fc0beefu;

static float *scratch_alloc(size_t n) {
    float *s = falloc(n + GUARD);
    fill(s, n, -1e30f, 1e30f); /* garbage: the kernels must not read scratch they did not write */
    for (size_t i = 0; i < GUARD; i++) memcpy(&s[n + i], &SENTINEL, sizeof SENTINEL);
    return s;
}

static int guard_intact(const float *s, size_t n) {
    for (size_t i = 0; i < GUARD; i++)
        if (memcmp(&s[n + i], &SENTINEL, sizeof SENTINEL) != 0) return 0;
    return 1;
}

/* ---- the checker itself must be able to fail --------------------------------------------------- */

static void test_checker_detects_error(void) {
    float a[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    double n[4] = {1.0, -2.0, 0.5, 3.0};
    int ok = rel_err_d(a, n, 4) == 0.0;
    a[2] += 3e-5f; /* a 1e-5 error of the max: must exceed FWD_TOL */
    ok = ok && rel_err_d(a, n, 4) > FWD_TOL;
    a[2] = NAN;
    ok = ok && !(rel_err_d(a, n, 4) <= BWD_TOL);
    report_bool("checker: rejects a 1e-5 error and a NaN", ok);
}

/* ---- shapes ------------------------------------------------------------------------------------ */

typedef struct {
    const char *label;
    size_t B, T, S, H, G, D;
    const uint8_t *mask; /* [B,S] or NULL */
} attn_case;

/* lse_ref [B,H,T] = log sum_j exp(scaled score) over visible keys, from double scores; -inf for a
 * row with no visible key. */
static void lse_reference(double *lse_ref, const float *q, const float *k, const attn_case *c) {
    size_t B = c->B, T = c->T, S = c->S, H = c->H, G = c->G, D = c->D;
    double *row = dalloc(S);
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            size_t g = h / (H / G);
            for (size_t t = 0; t < T; t++) {
                double m = -INFINITY;
                for (size_t j = 0; j < S; j++) {
                    int visible = j <= S - T + t && (!c->mask || c->mask[b * S + j]);
                    double s = 0.0;
                    for (size_t d = 0; d < D; d++)
                        s += (double)q[(b * T + t) * H * D + h * D + d] *
                             (double)k[(b * S + j) * G * D + g * D + d];
                    row[j] = visible ? s / sqrt((double)D) : -INFINITY;
                    m = row[j] > m ? row[j] : m;
                }
                double sum = 0.0;
                if (m != -INFINITY)
                    for (size_t j = 0; j < S; j++) sum += exp(row[j] - m);
                lse_ref[(b * H + h) * T + t] = m == -INFINITY ? -INFINITY : m + log(sum);
            }
        }
    }
    tk_free(row);
}

/* lse [n] vs lse_ref [n]: -inf exactly where the reference has -inf, elsewhere
 * max|diff| / max(max|ref|, 1). */
static double lse_err(const float *lse, const double *ref, size_t n) {
    double maxd = 0.0, maxr = 1.0;
    for (size_t i = 0; i < n; i++) {
        if (ref[i] == -INFINITY) {
            if (lse[i] != -INFINITY) return INFINITY;
            continue;
        }
        if (!isfinite(lse[i])) return INFINITY;
        double d = fabs((double)lse[i] - ref[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs(ref[i]) > maxr ? fabs(ref[i]) : maxr;
    }
    return maxd / maxr;
}

static void test_case(const attn_case *c, double *worst) {
    char name[192];
    size_t B = c->B, T = c->T, S = c->S, H = c->H, G = c->G, D = c->D;
    size_t nq = B * T * H * D, nk = B * S * G * D, np = B * H * T * S, nl = B * H * T;
    size_t ns = tk_attention_tiled_scratch(T, S, D);
    float *q = falloc(nq), *k = falloc(nk), *v = falloc(nk), *dout = falloc(nq);
    float *out = falloc(nq), *lse = falloc(nl), *scr = scratch_alloc(ns);
    float *out_ref = falloc(nq), *probs = falloc(np), *scr_ref = falloc(T * S);
    float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk);
    float *dq_ref = falloc(nq), *dk_ref = falloc(nk), *dv_ref = falloc(nk);
    float *dq2 = falloc(nq), *dk2 = falloc(nk), *dv2 = falloc(nk);
    double *lse_ref = dalloc(nl);
    fill(q, nq, -1.5f, 1.5f);
    fill(k, nk, -1.5f, 1.5f);
    fill(v, nk, -1, 1);
    fill(dout, nq, -1, 1);

    /* forward: out and lse must be overwritten (start from NaN) */
    for (size_t i = 0; i < nq; i++) out[i] = NAN;
    for (size_t i = 0; i < nl; i++) lse[i] = NAN;
    tk_attention_tiled_forward(out, lse, q, k, v, c->mask, B, T, S, H, G, D, scr);
    tk_attention_forward(out_ref, probs, q, k, v, c->mask, B, T, S, H, G, D);
    lse_reference(lse_ref, q, k, c);
    double e;
    snprintf(name, sizeof name, "tiled %s: forward out vs tk_attention_forward", c->label);
    report(name, e = rel_err_f(out, out_ref, nq), FWD_TOL);
    worst[0] = e > worst[0] ? e : worst[0];
    snprintf(name, sizeof name, "tiled %s: lse vs double log-sum-exp", c->label);
    report(name, e = lse_err(lse, lse_ref, nl), FWD_TOL);
    worst[1] = e > worst[1] ? e : worst[1];

    /* backward onto zero gradients, against the reference from its own probs */
    tk_attention_tiled_backward(dq, dk, dv, scr, dout, out, lse, q, k, v, c->mask, B, T, S, H, G, D);
    tk_attention_backward(dq_ref, dk_ref, dv_ref, scr_ref, dout, probs, q, k, v, B, T, S, H, G, D);
    /* With one key (S = 1) out = v whatever q and k are, so dq and dk vanish: the reference gets
     * exact zeros (P * (dP - P dP) with P = 1), the tiled kernel the rounding of dP - rowsum(dO * O);
     * a relative measure is meaningless there, an absolute bound is used instead. */
    int one_key = S == 1;
    if (!one_key) {
        snprintf(name, sizeof name, "tiled %s: backward dq vs tk_attention_backward", c->label);
        report(name, e = rel_err_f(dq, dq_ref, nq), BWD_TOL);
        worst[2] = e > worst[2] ? e : worst[2];
        snprintf(name, sizeof name, "tiled %s: backward dk vs tk_attention_backward", c->label);
        report(name, e = rel_err_f(dk, dk_ref, nk), BWD_TOL);
        worst[3] = e > worst[3] ? e : worst[3];
    } else {
        double mx = 0.0;
        for (size_t i = 0; i < nq; i++) mx = fabs(dq[i]) > mx || !isfinite(dq[i]) ? fabs(dq[i]) : mx;
        for (size_t i = 0; i < nk; i++) mx = fabs(dk[i]) > mx || !isfinite(dk[i]) ? fabs(dk[i]) : mx;
        snprintf(name, sizeof name, "tiled %s: S=1, dq and dk vanish (max |.|)", c->label);
        report(name, mx, 1e-6);
    }
    snprintf(name, sizeof name, "tiled %s: backward dv vs tk_attention_backward", c->label);
    report(name, e = rel_err_f(dv, dv_ref, nk), BWD_TOL);
    worst[4] = e > worst[4] ? e : worst[4];

    /* rows that see no key: out exactly 0, lse -inf, dq exactly 0 */
    size_t dead = 0;
    int zero = 1;
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            for (size_t t = 0; t < T; t++) {
                if (lse_ref[(b * H + h) * T + t] != -INFINITY) continue;
                dead++;
                zero &= lse[(b * H + h) * T + t] == -INFINITY;
                for (size_t d = 0; d < D; d++) {
                    zero &= out[(b * T + t) * H * D + h * D + d] == 0.0f;
                    zero &= dq[(b * T + t) * H * D + h * D + d] == 0.0f;
                }
            }
        }
    }
    if (dead) {
        snprintf(name, sizeof name, "tiled %s: %zu rows see no key: out 0, lse -inf, dq 0",
                 c->label, dead);
        report_bool(name, zero);
    }

    /* the backward adds: a second call doubles every gradient */
    memcpy(dq2, dq, nq * sizeof(float));
    memcpy(dk2, dk, nk * sizeof(float));
    memcpy(dv2, dv, nk * sizeof(float));
    tk_attention_tiled_backward(dq2, dk2, dv2, scr, dout, out, lse, q, k, v, c->mask, B, T, S, H, G,
                                D);
    if (!one_key) {
        snprintf(name, sizeof name, "tiled %s: backward adds (dq twice)", c->label);
        check_adds(name, dq, dq2, nq);
        snprintf(name, sizeof name, "tiled %s: backward adds (dk twice)", c->label);
        check_adds(name, dk, dk2, nk);
    }
    snprintf(name, sizeof name, "tiled %s: backward adds (dv twice)", c->label);
    check_adds(name, dv, dv2, nk);

    /* NULL gradients: each alone gives bit-identical values to the full call (same sgemm inputs) */
    memset(dq2, 0, nq * sizeof(float));
    memset(dk2, 0, nk * sizeof(float));
    memset(dv2, 0, nk * sizeof(float));
    tk_attention_tiled_backward(dq2, NULL, NULL, scr, dout, out, lse, q, k, v, c->mask, B, T, S, H,
                                G, D);
    tk_attention_tiled_backward(NULL, dk2, NULL, scr, dout, out, lse, q, k, v, c->mask, B, T, S, H,
                                G, D);
    tk_attention_tiled_backward(NULL, NULL, dv2, scr, dout, out, lse, q, k, v, c->mask, B, T, S, H,
                                G, D);
    snprintf(name, sizeof name, "tiled %s: dq / dk / dv alone (others NULL) identical", c->label);
    report_bool(name, memcmp(dq2, dq, nq * sizeof(float)) == 0 &&
                          memcmp(dk2, dk, nk * sizeof(float)) == 0 &&
                          memcmp(dv2, dv, nk * sizeof(float)) == 0);

    snprintf(name, sizeof name, "tiled %s: scratch of %zu floats not overrun", c->label, ns);
    report_bool(name, guard_intact(scr, ns));

    tk_free(q), tk_free(k), tk_free(v), tk_free(dout), tk_free(out), tk_free(lse), tk_free(scr);
    tk_free(out_ref), tk_free(probs), tk_free(scr_ref), tk_free(dq), tk_free(dk), tk_free(dv);
    tk_free(dq_ref), tk_free(dk_ref), tk_free(dv_ref), tk_free(dq2), tk_free(dk2), tk_free(dv2);
    tk_free(lse_ref);
}

/* ---- finite differences ------------------------------------------------------------------------ */

typedef struct {
    float *q, *k, *v, *out, *lse, *scratch, *R;
    const uint8_t *mask;
    size_t B, T, S, H, G, D;
} fd_ctx;

/* L = sum(out * R) in double over the tiled forward. */
static double fd_loss(fd_ctx *c) {
    tk_attention_tiled_forward(c->out, c->lse, c->q, c->k, c->v, c->mask, c->B, c->T, c->S, c->H,
                               c->G, c->D, c->scratch);
    double s = 0.0;
    for (size_t i = 0; i < c->B * c->T * c->H * c->D; i++) s += (double)c->out[i] * (double)c->R[i];
    return s;
}

/* Analytic vs central differences for param [n]. The step is the float spacing actually taken. */
static void check_fd(const char *name, const float *analytic, float *param, size_t n, fd_ctx *c) {
    double *num = dalloc(n);
    for (size_t i = 0; i < n; i++) {
        float orig = param[i];
        param[i] = orig + FD_EPS;
        double xp = param[i], lp = fd_loss(c);
        param[i] = orig - FD_EPS;
        double xm = param[i], lm = fd_loss(c);
        param[i] = orig;
        num[i] = (lp - lm) / (xp - xm);
    }
    report(name, rel_err_d(analytic, num, n), FD_TOL);
    tk_free(num);
}

static void test_fd(const attn_case *ac) {
    char name[192];
    fd_ctx c = {.mask = ac->mask, .B = ac->B, .T = ac->T, .S = ac->S, .H = ac->H, .G = ac->G,
                .D = ac->D};
    size_t nq = c.B * c.T * c.H * c.D, nk = c.B * c.S * c.G * c.D;
    c.q = falloc(nq), c.k = falloc(nk), c.v = falloc(nk), c.out = falloc(nq), c.R = falloc(nq);
    c.lse = falloc(c.B * c.H * c.T), c.scratch = falloc(tk_attention_tiled_scratch(c.T, c.S, c.D));
    float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk);
    fill(c.q, nq, -1.5f, 1.5f);
    fill(c.k, nk, -1.5f, 1.5f);
    fill(c.v, nk, -1, 1);
    fill(c.R, nq, -1, 1);

    fd_loss(&c); /* out, lse for the backward */
    tk_attention_tiled_backward(dq, dk, dv, c.scratch, c.R, c.out, c.lse, c.q, c.k, c.v, c.mask, c.B,
                                c.T, c.S, c.H, c.G, c.D);
    snprintf(name, sizeof name, "tiled %s: dq vs finite differences", ac->label);
    check_fd(name, dq, c.q, nq, &c);
    snprintf(name, sizeof name, "tiled %s: dk vs finite differences", ac->label);
    check_fd(name, dk, c.k, nk, &c);
    snprintf(name, sizeof name, "tiled %s: dv vs finite differences", ac->label);
    check_fd(name, dv, c.v, nk, &c);

    tk_free(c.q), tk_free(c.k), tk_free(c.v), tk_free(c.out), tk_free(c.R), tk_free(c.lse);
    tk_free(c.scratch), tk_free(dq), tk_free(dk), tk_free(dv);
}

/* ---- scratch size -------------------------------------------------------------------------------- */

static void test_scratch_size(void) {
    size_t n4k = tk_attention_tiled_scratch(4096, 4096, 64);
    char name[192];
    snprintf(name, sizeof name, "scratch T=S=4096 D=64: %zu floats < 1%% of T*S (%zu)", n4k,
             (size_t)4096 * 4096 / 100);
    report_bool(name, n4k * 100 < (size_t)4096 * 4096);
    report_bool("scratch does not grow with T, S (T=S=65536 needs the same as 4096)",
                tk_attention_tiled_scratch(65536, 65536, 64) == n4k &&
                    tk_attention_tiled_scratch(65536, 65536, 128) == n4k);
    report_bool("scratch T=S=1 is small (<= 8 floats)", tk_attention_tiled_scratch(1, 1, 64) <= 8);
}

/* ---- timing (informational) ---------------------------------------------------------------------- */

static double best_of(int reps, double *t) {
    double m = t[0];
    for (int i = 1; i < reps; i++) m = t[i] < m ? t[i] : m;
    return m;
}

static void time_kernels(void) {
    enum { REPS = 5 };
    size_t B = 1, H = 12, G = 12, T = 512, S = 512, D = 64;
    size_t nq = B * T * H * D, nk = B * S * G * D;
    float *q = falloc(nq), *k = falloc(nk), *v = falloc(nk), *dout = falloc(nq), *out = falloc(nq);
    float *lse = falloc(B * H * T), *scr = falloc(tk_attention_tiled_scratch(T, S, D));
    float *probs = falloc(B * H * T * S), *scr_ref = falloc(T * S);
    float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk);
    fill(q, nq, -1.5f, 1.5f);
    fill(k, nk, -1.5f, 1.5f);
    fill(v, nk, -1, 1);
    fill(dout, nq, -1, 1);
    double tf[REPS], tb[REPS], rf[REPS], rb[REPS];
    for (int r = 0; r < REPS; r++) {
        double t0 = tk_time();
        tk_attention_forward(out, probs, q, k, v, NULL, B, T, S, H, G, D);
        double t1 = tk_time();
        tk_attention_backward(dq, dk, dv, scr_ref, dout, probs, q, k, v, B, T, S, H, G, D);
        double t2 = tk_time();
        tk_attention_tiled_forward(out, lse, q, k, v, NULL, B, T, S, H, G, D, scr);
        double t3 = tk_time();
        tk_attention_tiled_backward(dq, dk, dv, scr, dout, out, lse, q, k, v, NULL, B, T, S, H, G, D);
        double t4 = tk_time();
        rf[r] = t1 - t0, rb[r] = t2 - t1, tf[r] = t3 - t2, tb[r] = t4 - t3;
    }
    printf("timing B=1 H=12 T=S=512 D=64 (best of %d, informational):\n", REPS);
    printf("  tk_attention_forward        %7.2f ms   tk_attention_backward        %7.2f ms"
           "   (probs %zu floats)\n",
           1e3 * best_of(REPS, rf), 1e3 * best_of(REPS, rb), B * H * T * S);
    printf("  tk_attention_tiled_forward  %7.2f ms   tk_attention_tiled_backward  %7.2f ms"
           "   (lse %zu + scratch %zu floats)\n",
           1e3 * best_of(REPS, tf), 1e3 * best_of(REPS, tb), B * H * T,
           tk_attention_tiled_scratch(T, S, D));
    tk_free(q), tk_free(k), tk_free(v), tk_free(dout), tk_free(out), tk_free(lse), tk_free(scr);
    tk_free(probs), tk_free(scr_ref), tk_free(dq), tk_free(dk), tk_free(dv);
}

/* ---- main --------------------------------------------------------------------------------------- */

/* mask [B,S]: batch b pads its first left[b] and its last right[b] keys. Caller frees. */
static uint8_t *pad_mask(size_t B, size_t S, const size_t *left, const size_t *right) {
    uint8_t *m = xalloc(B * S, 1);
    for (size_t b = 0; b < B; b++)
        for (size_t j = 0; j < S; j++) m[b * S + j] = j >= left[b] && j + right[b] < S;
    return m;
}

int main(void) {
    tk_set_threads(2);
    double t0 = tk_time();

    test_checker_detects_error();
    test_scratch_size();

    /* masks: batch 0 right-padded, batch 1 left-padded (its first queries see no key) */
    static const size_t l7[2] = {0, 3}, r7[2] = {2, 0};
    uint8_t *m7 = pad_mask(2, 7, l7, r7);
    /* T=S=300: batch 1 hides its first 260 keys, so rows < 260 see nothing, and the rows after
     * see nothing in key block 0 but keys in block 1 (the online max starts at -inf) */
    static const size_t l300[2] = {0, 260}, r300[2] = {17, 0};
    uint8_t *m300 = pad_mask(2, 300, l300, r300);
    /* KV cache, S - T = 5: batch 1 pads the 8 cached-and-first keys, so query 0..2 see nothing */
    static const size_t l45[2] = {0, 8}, r45[2] = {3, 0};
    uint8_t *m45 = pad_mask(2, 45, l45, r45);
    static const size_t l305[2] = {2, 140}, r305[2] = {0, 0};
    uint8_t *m305 = pad_mask(2, 305, l305, r305);

    const attn_case cases[] = {
        {"T=S=1 H=G=1 D=16", 1, 1, 1, 1, 1, 16, NULL},
        {"T=S=1 H=4 G=1 D=64", 2, 1, 1, 4, 1, 64, NULL},
        {"T=S=7 H=G=2 D=16", 1, 7, 7, 2, 2, 16, NULL},
        {"T=S=7 H=4 G=2 D=16 mask", 2, 7, 7, 4, 2, 16, m7},
        {"T=S=300 H=G=2 D=64", 1, 300, 300, 2, 2, 64, NULL},
        {"T=S=300 H=4 G=1 D=16", 1, 300, 300, 4, 1, 16, NULL},
        {"T=S=300 H=4 G=2 D=64 mask", 2, 300, 300, 4, 2, 64, m300},
        {"T=40 S=45 H=4 G=2 D=16 mask", 2, 40, 45, 4, 2, 16, m45},
        {"T=300 S=305 H=4 G=1 D=64 mask", 2, 300, 305, 4, 1, 64, m305},
        {"T=1 S=6 H=4 G=2 D=16", 1, 1, 6, 4, 2, 16, NULL},
        {"T=513 S=518 H=2 G=1 D=64", 1, 513, 518, 2, 1, 64, NULL},
    };
    double worst[5] = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_case(&cases[i], worst);
    printf("worst over shapes: out %.3e  lse %.3e  dq %.3e  dk %.3e  dv %.3e\n", worst[0], worst[1],
           worst[2], worst[3], worst[4]);

    static const uint8_t mfd[2 * 5] = {1, 1, 1, 1, 0, 0, 0, 0, 1, 1};
    const attn_case fd_cases[] = {
        {"FD T=S=4 H=G=2 D=4", 1, 4, 4, 2, 2, 4, NULL},
        {"FD T=3 S=5 H=4 G=2 D=4 mask", 2, 3, 5, 4, 2, 4, mfd},
        {"FD T=S=300 H=G=1 D=2 (5 query, 2 key blocks)", 1, 300, 300, 1, 1, 2, NULL},
    };
    for (size_t i = 0; i < sizeof fd_cases / sizeof fd_cases[0]; i++) test_fd(&fd_cases[i]);

    time_kernels();

    tk_free(m7), tk_free(m300), tk_free(m45), tk_free(m305);
    printf("test_attention_tiled: %d failure(s), %.2f s\n", g_failures, tk_time() - t0);
    return g_failures ? 1 : 0;
}
