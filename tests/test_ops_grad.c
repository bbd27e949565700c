/* test_ops_grad.c: per-kernel checks of src/ops against finite differences and plain references.
 *
 * Every backward is checked against central differences of a scalar loss L = sum(out * R) with a fixed
 * random R (L summed in double over the fp32 forward), at tiny shapes. The error measure is
 *   max|analytic - numeric| / max(max|numeric|, 1e-3),
 * after a NaN/inf check. Optimized kernels are also compared with plain loops (linear: sgemm vs _ref;
 * attention, rmsnorm, rope, cross-entropy: double-precision reference forwards written here), and each
 * accumulating backward is called twice to confirm that it adds. Exits 1 on any failure.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "ops/ops.h"

#define TEST_NAME "test_ops_grad"
#define TEST_SEED 0x9e3779b97f4a7c15ull
#define TEST_COL 58
#include "test_util.h"
#include "attention_ref.h"

/* Tolerances. FD_TOL: fp32 forward differenced with step FD_EPS (rounding noise ~1e-7*|L|/FD_EPS,
 * truncation ~FD_EPS^2); measured errors are ~3e-4 or below. Cross-entropy differences a loss of
 * size ~40 (one large logit), so it takes the larger step FD_EPS_CE to keep the rounding noise down.
 * TIGHT_TOL: two fp32 evaluations of the same sum in different orders (or fp32 against double). */
#define FD_EPS 1e-3f
#define FD_EPS_CE 1e-2f
#define FD_TOL 5e-3
#define TIGHT_TOL 1e-5

/* ---- helpers ---------------------------------------------------------------------------------- */

/* sum(out * R) in double. */
static double dot_r(const float *out, const float *R, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * (double)R[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* num [n] = central differences of f with respect to param [n] (restored exactly afterwards). The
 * step is the float spacing actually taken, so rounding of param +- eps does not bias the quotient. */
static void numeric_grad(double *num, float *param, size_t n, loss_fn f, void *ctx, float eps) {
    for (size_t i = 0; i < n; i++) {
        float orig = param[i];
        param[i] = orig + eps;
        double xp = param[i], lp = f(ctx);
        param[i] = orig - eps;
        double xm = param[i], lm = f(ctx);
        param[i] = orig;
        num[i] = (lp - lm) / (xp - xm);
    }
}

/* Analytic vs numeric (step eps) for one gradient, reported under name. */
static double check_grad_eps(const char *name, const float *analytic, float *param, size_t n,
                             loss_fn f, void *ctx, float eps) {
    double *num = dalloc(n);
    numeric_grad(num, param, n, f, ctx, eps);
    double err = rel_err_d(analytic, num, n);
    report(name, err, FD_TOL);
    tk_free(num);
    return err;
}

static double check_grad(const char *name, const float *analytic, float *param, size_t n, loss_fn f,
                         void *ctx) {
    return check_grad_eps(name, analytic, param, n, f, ctx, FD_EPS);
}

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
    /* a backward that writes instead of adding gives err ~ 1, one that adds garbage is caught too */
    report(name, err, 1e-6);
    if (maxr == 0.0) report_bool("  (gradient above is not identically zero)", 0);
}

/* ---- the checker itself must be able to fail --------------------------------------------------- */

static void test_checker_detects_error(void) {
    float a[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    double n[4] = {1.0, -2.0, 0.5, 3.0};
    int ok = rel_err_d(a, n, 4) == 0.0;
    a[2] += 0.05f; /* a 1.7% error of the max: must exceed FD_TOL */
    ok = ok && rel_err_d(a, n, 4) > FD_TOL;
    a[2] = NAN;
    ok = ok && !(rel_err_d(a, n, 4) <= FD_TOL);
    report_bool("checker: rejects a 1.7% error and a NaN", ok);
}

/* ---- linear ----------------------------------------------------------------------------------- */

typedef struct {
    float *x, *w, *y, *R;
    size_t N, I, O;
} linear_ctx;

static double linear_loss(void *p) {
    linear_ctx *c = p;
    tk_linear_forward(c->y, c->x, c->w, c->N, c->I, c->O, 0.0f);
    return dot_r(c->y, c->R, c->N * c->O);
}

static void test_linear_vs_ref(size_t N, size_t I, size_t O) {
    char name[128];
    float *x = falloc(N * I), *w = falloc(O * I), *y = falloc(N * O), *yr = falloc(N * O);
    float *dy = falloc(N * O), *dx = falloc(N * I), *dxr = falloc(N * I);
    float *dw = falloc(O * I), *dwr = falloc(O * I);
    fill(x, N * I, -1, 1);
    fill(w, O * I, -1, 1);
    fill(dy, N * O, -1, 1);

    /* beta 0 must overwrite: start from NaN */
    for (size_t i = 0; i < N * O; i++) y[i] = yr[i] = NAN;
    tk_linear_forward(y, x, w, N, I, O, 0.0f);
    tk_linear_forward_ref(yr, x, w, N, I, O, 0.0f);
    snprintf(name, sizeof name, "linear %zux%zux%zu: forward beta=0, sgemm vs ref", N, I, O);
    report(name, rel_err_f(y, yr, N * O), TIGHT_TOL);

    /* beta 1 accumulates onto an existing y */
    fill(y, N * O, -1, 1);
    memcpy(yr, y, N * O * sizeof(float));
    tk_linear_forward(y, x, w, N, I, O, 1.0f);
    tk_linear_forward_ref(yr, x, w, N, I, O, 1.0f);
    snprintf(name, sizeof name, "linear %zux%zux%zu: forward beta=1, sgemm vs ref", N, I, O);
    report(name, rel_err_f(y, yr, N * O), TIGHT_TOL);

    /* backward accumulates onto existing gradients (the beta = 1 convention) */
    fill(dx, N * I, -1, 1);
    fill(dw, O * I, -1, 1);
    memcpy(dxr, dx, N * I * sizeof(float));
    memcpy(dwr, dw, O * I * sizeof(float));
    tk_linear_backward(dx, dw, dy, x, w, N, I, O);
    tk_linear_backward_ref(dxr, dwr, dy, x, w, N, I, O);
    snprintf(name, sizeof name, "linear %zux%zux%zu: backward dx (+=), sgemm vs ref", N, I, O);
    report(name, rel_err_f(dx, dxr, N * I), TIGHT_TOL);
    snprintf(name, sizeof name, "linear %zux%zux%zu: backward dw (+=), sgemm vs ref", N, I, O);
    report(name, rel_err_f(dw, dwr, O * I), TIGHT_TOL);

    /* NULL dw: dx alone, same values as with dw */
    memcpy(dx, dxr, N * I * sizeof(float));
    tk_linear_backward(dx, NULL, dy, x, w, N, I, O);
    tk_linear_backward_ref(dxr, NULL, dy, x, w, N, I, O);
    snprintf(name, sizeof name, "linear %zux%zux%zu: backward dw=NULL, sgemm vs ref", N, I, O);
    report(name, rel_err_f(dx, dxr, N * I), TIGHT_TOL);

    tk_free(x), tk_free(w), tk_free(y), tk_free(yr), tk_free(dy);
    tk_free(dx), tk_free(dxr), tk_free(dw), tk_free(dwr);
}

static void test_linear_grad(void) {
    linear_ctx c = {.N = 5, .I = 7, .O = 6};
    size_t N = c.N, I = c.I, O = c.O;
    c.x = falloc(N * I), c.w = falloc(O * I), c.y = falloc(N * O), c.R = falloc(N * O);
    float *dx = falloc(N * I), *dw = falloc(O * I), *dx2 = falloc(N * I), *dw2 = falloc(O * I);
    fill(c.x, N * I, -1, 1);
    fill(c.w, O * I, -1, 1);
    fill(c.R, N * O, -1, 1);

    tk_linear_backward(dx, dw, c.R, c.x, c.w, N, I, O);
    check_grad("linear: dx vs finite differences", dx, c.x, N * I, linear_loss, &c);
    check_grad("linear: dw vs finite differences", dw, c.w, O * I, linear_loss, &c);

    memcpy(dx2, dx, N * I * sizeof(float));
    memcpy(dw2, dw, O * I * sizeof(float));
    tk_linear_backward(dx2, dw2, c.R, c.x, c.w, N, I, O);
    check_adds("linear: backward adds (dx twice)", dx, dx2, N * I);
    check_adds("linear: backward adds (dw twice)", dw, dw2, O * I);

    tk_free(c.x), tk_free(c.w), tk_free(c.y), tk_free(c.R);
    tk_free(dx), tk_free(dw), tk_free(dx2), tk_free(dw2);
}

/* ---- embedding -------------------------------------------------------------------------------- */

typedef struct {
    float *table, *out, *R;
    const int32_t *ids;
    size_t N, C;
} embedding_ctx;

static double embedding_loss(void *p) {
    embedding_ctx *c = p;
    tk_embedding_forward(c->out, c->ids, c->table, c->N, c->C);
    return dot_r(c->out, c->R, c->N * c->C);
}

static void test_embedding(void) {
    static const int32_t ids[6] = {3, 1, 3, 0, 6, 3}; /* repeats; rows 2, 4, 5 unused */
    size_t V = 7;
    embedding_ctx c = {.ids = ids, .N = 6, .C = 5};
    size_t N = c.N, C = c.C;
    c.table = falloc(V * C), c.out = falloc(N * C), c.R = falloc(N * C);
    float *dt = falloc(V * C), *dt2 = falloc(V * C);
    fill(c.table, V * C, -1, 1);
    fill(c.R, N * C, -1, 1);

    tk_embedding_forward(c.out, ids, c.table, N, C);
    int same = 1;
    for (size_t n = 0; n < N; n++)
        same &= memcmp(&c.out[n * C], &c.table[(size_t)ids[n] * C], C * sizeof(float)) == 0;
    report_bool("embedding: forward copies table rows", same);

    tk_embedding_backward(dt, c.R, ids, N, C);
    check_grad("embedding: dtable (repeated ids) vs finite differences", dt, c.table, V * C,
               embedding_loss, &c);
    memcpy(dt2, dt, V * C * sizeof(float));
    tk_embedding_backward(dt2, c.R, ids, N, C);
    check_adds("embedding: backward adds (dtable twice)", dt, dt2, V * C);

    tk_free(c.table), tk_free(c.out), tk_free(c.R), tk_free(dt), tk_free(dt2);
}

/* ---- rmsnorm ---------------------------------------------------------------------------------- */

typedef struct {
    float *x, *w, *y, *rstd, *R;
    size_t N, C;
    float eps;
} rmsnorm_ctx;

static double rmsnorm_loss(void *p) {
    rmsnorm_ctx *c = p;
    tk_rmsnorm_forward(c->y, c->rstd, c->x, c->w, c->N, c->C, c->eps);
    return dot_r(c->y, c->R, c->N * c->C);
}

static void test_rmsnorm(void) {
    rmsnorm_ctx c = {.N = 4, .C = 8, .eps = 1e-5f};
    size_t N = c.N, C = c.C;
    c.x = falloc(N * C), c.w = falloc(C), c.y = falloc(N * C), c.rstd = falloc(N);
    c.R = falloc(N * C);
    float *dx = falloc(N * C), *dw = falloc(C), *dx2 = falloc(N * C), *dw2 = falloc(C);
    double *yref = dalloc(N * C);
    fill(c.x, N * C, -1, 1);
    fill(c.w, C, 0.5f, 1.5f);
    fill(c.R, N * C, -1, 1);

    tk_rmsnorm_forward(c.y, c.rstd, c.x, c.w, N, C, c.eps);
    for (size_t n = 0; n < N; n++) {
        double ss = 0.0;
        for (size_t i = 0; i < C; i++) ss += (double)c.x[n * C + i] * c.x[n * C + i];
        double r = 1.0 / sqrt(ss / (double)C + (double)c.eps);
        for (size_t i = 0; i < C; i++) yref[n * C + i] = (double)c.w[i] * c.x[n * C + i] * r;
    }
    report("rmsnorm: forward vs double reference", rel_err_d(c.y, yref, N * C), TIGHT_TOL);

    tk_rmsnorm_backward(dx, dw, c.R, c.x, c.w, c.rstd, N, C);
    check_grad("rmsnorm: dx vs finite differences", dx, c.x, N * C, rmsnorm_loss, &c);
    check_grad("rmsnorm: dw vs finite differences", dw, c.w, C, rmsnorm_loss, &c);

    tk_rmsnorm_forward(c.y, c.rstd, c.x, c.w, N, C, c.eps);
    memcpy(dx2, dx, N * C * sizeof(float));
    memcpy(dw2, dw, C * sizeof(float));
    tk_rmsnorm_backward(dx2, dw2, c.R, c.x, c.w, c.rstd, N, C);
    check_adds("rmsnorm: backward adds (dx twice)", dx, dx2, N * C);
    check_adds("rmsnorm: backward adds (dw twice)", dw, dw2, C);

    tk_free(c.x), tk_free(c.w), tk_free(c.y), tk_free(c.rstd), tk_free(c.R);
    tk_free(dx), tk_free(dw), tk_free(dx2), tk_free(dw2), tk_free(yref);
}

/* ---- rope ------------------------------------------------------------------------------------- */

typedef struct {
    float *x, *work, *cos_t, *sin_t, *R;
    size_t B, T, H, D, pos0;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    size_t n = c->B * c->T * c->H * c->D;
    memcpy(c->work, c->x, n * sizeof(float));
    tk_rope_forward(c->work, c->cos_t, c->sin_t, c->B, c->T, c->H, c->D, c->pos0);
    return dot_r(c->work, c->R, n);
}

static void test_rope(void) {
    rope_ctx c = {.B = 2, .T = 4, .H = 3, .D = 8, .pos0 = 5};
    size_t B = c.B, T = c.T, H = c.H, D = c.D, half = D / 2, P = 12, n = B * T * H * D;
    float inv_freq[4];
    for (size_t j = 0; j < half; j++)
        inv_freq[j] = 1.0f / powf(10000.0f, (float)(2 * j) / (float)D);
    c.cos_t = falloc(P * half), c.sin_t = falloc(P * half);
    c.x = falloc(n), c.work = falloc(n), c.R = falloc(n);
    float *g = falloc(n);
    double *yref = dalloc(n);
    fill(c.x, n, -1, 1);
    fill(c.R, n, -1, 1);

    /* table: cos/sin of the fp32 angle (float)p * inv_freq */
    tk_rope_table(c.cos_t, c.sin_t, inv_freq, P, D);
    double terr = 0.0;
    for (size_t p = 0; p < P; p++) {
        for (size_t j = 0; j < half; j++) {
            double a = (double)((float)p * inv_freq[j]);
            float ct = c.cos_t[p * half + j], st = c.sin_t[p * half + j];
            double e1 = fabs(ct - cos(a)), e2 = fabs(st - sin(a));
            terr = e1 > terr ? e1 : terr;
            terr = e2 > terr ? e2 : terr;
            if (!isfinite(ct) || !isfinite(st)) terr = INFINITY;
        }
    }
    report("rope: table vs cos/sin of the fp32 angle", terr, 1e-6);

    /* forward: HF q*cos + rotate_half(q)*sin with cos, sin = cat(freqs, freqs), in double */
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < T; t++) {
            size_t p = c.pos0 + t;
            for (size_t h = 0; h < H; h++) {
                const float *xh = &c.x[((b * T + t) * H + h) * D];
                double *yh = &yref[((b * T + t) * H + h) * D];
                for (size_t i = 0; i < D; i++) {
                    double a = (double)((float)p * inv_freq[i % half]);
                    double rot = i < half ? -(double)xh[i + half] : (double)xh[i - half];
                    yh[i] = xh[i] * cos(a) + rot * sin(a);
                }
            }
        }
    }
    memcpy(c.work, c.x, n * sizeof(float));
    tk_rope_forward(c.work, c.cos_t, c.sin_t, B, T, H, D, c.pos0);
    report("rope: forward (pos0=5) vs double rotate_half reference", rel_err_d(c.work, yref, n),
           TIGHT_TOL);

    memcpy(g, c.R, n * sizeof(float));
    tk_rope_backward(g, c.cos_t, c.sin_t, B, T, H, D, c.pos0);
    check_grad("rope: dx (pos0=5, in place) vs finite differences", g, c.x, n, rope_loss, &c);

    tk_free(c.cos_t), tk_free(c.sin_t), tk_free(c.x), tk_free(c.work), tk_free(c.R);
    tk_free(g), tk_free(yref);
}

/* ---- attention -------------------------------------------------------------------------------- */

typedef struct {
    float *q, *k, *v, *out, *probs, *R;
    const uint8_t *mask;
    size_t B, T, S, H, G, D;
} attn_ctx;

static double attn_loss(void *p) {
    attn_ctx *c = p;
    tk_attention_forward(c->out, c->probs, c->q, c->k, c->v, c->mask, c->B, c->T, c->S, c->H, c->G,
                         c->D);
    return dot_r(c->out, c->R, c->B * c->T * c->H * c->D);
}

/* dead_b, dead_t: a (b, t) whose query sees no real key (SIZE_MAX when the case has none). */
static void test_attention(const char *label, size_t B, size_t T, size_t S, size_t H, size_t G,
                           size_t D, const uint8_t *mask, size_t dead_b, size_t dead_t) {
    char name[160];
    attn_ctx c = {.mask = mask, .B = B, .T = T, .S = S, .H = H, .G = G, .D = D};
    size_t nq = B * T * H * D, nk = B * S * G * D, np = B * H * T * S;
    c.q = falloc(nq), c.k = falloc(nk), c.v = falloc(nk), c.out = falloc(nq), c.probs = falloc(np);
    c.R = falloc(nq);
    float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk), *scratch = falloc(T * S);
    float *dq2 = falloc(nq), *dk2 = falloc(nk), *dv2 = falloc(nk);
    double *oref = dalloc(nq), *pref = dalloc(np);
    fill(c.q, nq, -1.5f, 1.5f);
    fill(c.k, nk, -1.5f, 1.5f);
    fill(c.v, nk, -1, 1);
    fill(c.R, nq, -1, 1);

    for (size_t i = 0; i < nq; i++) c.out[i] = NAN; /* forward must overwrite out */
    tk_attention_forward(c.out, c.probs, c.q, c.k, c.v, mask, B, T, S, H, G, D);
    attention_ref(c.q, c.k, c.v, c.mask, B, T, S, H, G, D, oref, pref, NULL, NULL, NULL, NULL);
    snprintf(name, sizeof name, "attention %s: forward out vs double reference", label);
    report(name, rel_err_d(c.out, oref, nq), TIGHT_TOL);
    float *pfull = probs_expand(c.probs, B * H, T, S);
    snprintf(name, sizeof name, "attention %s: forward probs vs double reference", label);
    report(name, rel_err_d(pfull, pref, np), TIGHT_TOL);

    tk_attention_backward(dq, dk, dv, scratch, c.R, c.probs, c.q, c.k, c.v, B, T, S, H, G, D);

    if (dead_b != SIZE_MAX) {
        int zero = 1;
        for (size_t h = 0; h < H; h++) {
            const float *pr = &pfull[((dead_b * H + h) * T + dead_t) * S];
            for (size_t j = 0; j < S; j++) zero &= pr[j] == 0.0f;
        }
        for (size_t i = 0; i < H * D; i++) {
            zero &= c.out[(dead_b * T + dead_t) * H * D + i] == 0.0f;
            zero &= dq[(dead_b * T + dead_t) * H * D + i] == 0.0f;
        }
        snprintf(name, sizeof name, "attention %s: fully masked row: probs, out, dq are 0", label);
        report_bool(name, zero);
    }

    snprintf(name, sizeof name, "attention %s: dq vs finite differences", label);
    check_grad(name, dq, c.q, nq, attn_loss, &c);
    snprintf(name, sizeof name, "attention %s: dk vs finite differences", label);
    check_grad(name, dk, c.k, nk, attn_loss, &c);
    snprintf(name, sizeof name, "attention %s: dv vs finite differences", label);
    check_grad(name, dv, c.v, nk, attn_loss, &c);

    /* call twice: probs from a fresh forward (the FD loop left the same values behind) */
    tk_attention_forward(c.out, c.probs, c.q, c.k, c.v, mask, B, T, S, H, G, D);
    memcpy(dq2, dq, nq * sizeof(float));
    memcpy(dk2, dk, nk * sizeof(float));
    memcpy(dv2, dv, nk * sizeof(float));
    tk_attention_backward(dq2, dk2, dv2, scratch, c.R, c.probs, c.q, c.k, c.v, B, T, S, H, G, D);
    snprintf(name, sizeof name, "attention %s: backward adds (dq twice)", label);
    check_adds(name, dq, dq2, nq);
    snprintf(name, sizeof name, "attention %s: backward adds (dk twice)", label);
    check_adds(name, dk, dk2, nk);
    snprintf(name, sizeof name, "attention %s: backward adds (dv twice)", label);
    check_adds(name, dv, dv2, nk);

    /* NULL gradients are skipped; the others are unchanged by the skip */
    memcpy(dq2, dq, nq * sizeof(float));
    tk_attention_backward(dq2, NULL, NULL, scratch, c.R, c.probs, c.q, c.k, c.v, B, T, S, H, G, D);
    snprintf(name, sizeof name, "attention %s: dk=dv=NULL, dq still adds", label);
    check_adds(name, dq, dq2, nq);

    tk_free(c.q), tk_free(c.k), tk_free(c.v), tk_free(c.out), tk_free(c.probs), tk_free(c.R), tk_free(pfull);
    tk_free(dq), tk_free(dk), tk_free(dv), tk_free(scratch);
    tk_free(dq2), tk_free(dk2), tk_free(dv2);
    tk_free(oref), tk_free(pref);
}

/* ---- swiglu ----------------------------------------------------------------------------------- */

typedef struct {
    float *gate, *up, *out, *R;
    size_t n;
} swiglu_ctx;

static double swiglu_loss(void *p) {
    swiglu_ctx *c = p;
    tk_swiglu_forward(c->out, c->gate, c->up, c->n);
    return dot_r(c->out, c->R, c->n);
}

static void test_swiglu(void) {
    swiglu_ctx c = {.n = 24};
    size_t n = c.n;
    c.gate = falloc(n), c.up = falloc(n), c.out = falloc(n), c.R = falloc(n);
    float *dg = falloc(n), *du = falloc(n), *dg2 = falloc(n), *du2 = falloc(n);
    double *ref = dalloc(n);
    fill(c.gate, n, -4, 4);
    fill(c.up, n, -1, 1);
    fill(c.R, n, -1, 1);

    tk_swiglu_forward(c.out, c.gate, c.up, n);
    for (size_t i = 0; i < n; i++) ref[i] = c.gate[i] / (1.0 + exp(-(double)c.gate[i])) * c.up[i];
    report("swiglu: forward vs double reference", rel_err_d(c.out, ref, n), TIGHT_TOL);

    tk_swiglu_backward(dg, du, c.R, c.gate, c.up, n);
    check_grad("swiglu: dgate vs finite differences", dg, c.gate, n, swiglu_loss, &c);
    check_grad("swiglu: dup vs finite differences", du, c.up, n, swiglu_loss, &c);
    memcpy(dg2, dg, n * sizeof(float));
    memcpy(du2, du, n * sizeof(float));
    tk_swiglu_backward(dg2, du2, c.R, c.gate, c.up, n);
    check_adds("swiglu: backward adds (dgate twice)", dg, dg2, n);
    check_adds("swiglu: backward adds (dup twice)", du, du2, n);
    /* _into writes: from NaN it gives what the accumulating call gave from zero (dg, du above) */
    for (size_t i = 0; i < n; i++) dg2[i] = du2[i] = NAN;
    tk_swiglu_backward_into(dg2, du2, c.R, c.gate, c.up, n);
    report_bool("swiglu: backward_into writes (= the += result from zero, bitwise)",
                memcmp(dg2, dg, n * sizeof(float)) == 0 && memcmp(du2, du, n * sizeof(float)) == 0);

    tk_free(c.gate), tk_free(c.up), tk_free(c.out), tk_free(c.R);
    tk_free(dg), tk_free(du), tk_free(dg2), tk_free(du2), tk_free(ref);
}

/* ---- cross-entropy ---------------------------------------------------------------------------- */

typedef struct {
    float *logits, *losses;
    const int32_t *targets;
    size_t N, V;
    float scale;
} ce_ctx;

static double ce_loss(void *p) {
    ce_ctx *c = p;
    return c->scale * tk_cross_entropy_forward(c->losses, c->logits, c->targets, c->N, c->V);
}

/* Runs the forward with one bad target in a child process; 1 when the child aborted. */
static int ce_bad_target_aborts(int32_t bad) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 0;
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stderr)) _exit(3);
        alarm(5);
        float logits[3] = {0}, losses[1];
        int32_t t[1] = {bad};
        tk_cross_entropy_forward(losses, logits, t, 1, 3);
        _exit(0);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return 0;
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

static void test_cross_entropy(void) {
    static const int32_t targets[6] = {3, -100, 0, 10, -100, 7};
    ce_ctx c = {.targets = targets, .N = 6, .V = 11, .scale = 0.37f};
    size_t N = c.N, V = c.V;
    c.logits = falloc(N * V), c.losses = falloc(N);
    float *dl = falloc(N * V), *alias = falloc(N * V);
    double *lref = dalloc(N);
    fill(c.logits, N * V, -3, 3);
    c.logits[2 * V + 5] = 40.0f; /* a large logit: the max subtraction must keep this finite */

    double total = tk_cross_entropy_forward(c.losses, c.logits, targets, N, V);
    double tref = 0.0;
    for (size_t n = 0; n < N; n++) {
        lref[n] = 0.0;
        if (targets[n] == -100) continue;
        double m = -INFINITY, s = 0.0;
        for (size_t v = 0; v < V; v++) m = c.logits[n * V + v] > m ? c.logits[n * V + v] : m;
        for (size_t v = 0; v < V; v++) s += exp(c.logits[n * V + v] - m);
        lref[n] = m + log(s) - c.logits[n * V + (size_t)targets[n]];
        tref += lref[n];
    }
    report("cross-entropy: losses vs double reference (-100 rows 0)", rel_err_d(c.losses, lref, N),
           TIGHT_TOL);
    float tf = (float)total;
    report("cross-entropy: returned sum vs double reference", rel_err_d(&tf, &tref, 1), TIGHT_TOL);
    report_bool("cross-entropy: ignored rows have loss exactly 0",
                c.losses[1] == 0.0f && c.losses[4] == 0.0f);

    for (size_t i = 0; i < N * V; i++) dl[i] = NAN; /* backward writes, it does not add */
    tk_cross_entropy_backward(dl, c.logits, targets, N, V, c.scale);
    check_grad_eps("cross-entropy: dlogits (scale 0.37) vs finite differences", dl, c.logits, N * V,
                   ce_loss, &c, FD_EPS_CE);
    int zero = 1;
    for (size_t v = 0; v < V; v++) zero &= dl[1 * V + v] == 0.0f && dl[4 * V + v] == 0.0f;
    report_bool("cross-entropy: ignored rows have gradient exactly 0", zero);

    memcpy(alias, c.logits, N * V * sizeof(float));
    tk_cross_entropy_backward(alias, alias, targets, N, V, c.scale);
    report_bool("cross-entropy: dlogits == logits (aliased) gives identical bits",
                memcmp(alias, dl, N * V * sizeof(float)) == 0);

    /* the fused kernel (what the model calls) agrees with forward then backward (the same formulas;
     * the vectorised sums may associate differently, so not bit for bit) */
    float *lf = falloc(N), *lp = falloc(N);
    double tplain = tk_cross_entropy_forward(lp, c.logits, targets, N, V); /* c.losses: last FD probe */
    memcpy(alias, c.logits, N * V * sizeof(float));
    double tfused = tk_cross_entropy_fused(lf, alias, alias, targets, N, V, c.scale);
    report("cross-entropy: fused losses (aliased) vs forward", rel_err_f(lf, lp, N), 1e-6);
    report("cross-entropy: fused dlogits (aliased) vs backward", rel_err_f(alias, dl, N * V), 1e-6);
    report_bool("cross-entropy: fused sum vs forward (1e-6 relative)", fabs(tfused - tplain) <= 1e-6 * fabs(tplain));
    tk_free(lf), tk_free(lp);

    report_bool("cross-entropy: target == V aborts (TK_ASSERT)", ce_bad_target_aborts(3));
    report_bool("cross-entropy: target == -1 aborts (TK_ASSERT)", ce_bad_target_aborts(-1));

    tk_free(c.logits), tk_free(c.losses), tk_free(dl), tk_free(alias), tk_free(lref);
}

/* ---- main ------------------------------------------------------------------------------------- */

int main(void) {
    tk_set_threads(2);
    double t0 = tk_time();

    test_checker_detects_error();

    test_linear_vs_ref(5, 7, 6);
    test_linear_vs_ref(37, 70, 19); /* past the sgemm kernel's register blocks */
    test_linear_grad();
    test_embedding();
    test_rmsnorm();
    test_rope();

    /* plain multi-head, T == S, no mask */
    test_attention("MHA H=G=2 T=S=4", 1, 4, 4, 2, 2, 4, NULL, SIZE_MAX, SIZE_MAX);
    /* GQA with a KV cache (S-T = 2 prior positions) and padding: batch 0 pads its last key (right
     * padding); batch 1 pads its first three keys, so query 0 (position 2) sees no real key. */
    static const uint8_t mask_kv[2 * 5] = {1, 1, 1, 1, 0, 0, 0, 0, 1, 1};
    test_attention("GQA H=4 G=2 T=3 S=5 mask", 2, 3, 5, 4, 2, 4, mask_kv, 1, 0);
    /* MQA (G=1), T == S, left padding in batch 1: its first two queries see nothing */
    static const uint8_t mask_left[2 * 4] = {1, 1, 1, 1, 0, 0, 1, 1};
    test_attention("MQA H=4 G=1 T=S=4 left pad", 2, 4, 4, 4, 1, 2, mask_left, 1, 1);

    test_swiglu();
    test_cross_entropy();

    printf("test_ops_grad: %d failure(s), %.2f s\n", g_failures, tk_time() - t0);
    return g_failures ? 1 : 0;
}
