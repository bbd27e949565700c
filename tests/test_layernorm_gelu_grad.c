/* test_layernorm_gelu_grad.c: src/ops/layernorm.c and src/ops/gelu.c against finite differences and
 * double-precision references.
 *
 * Each backward is checked against central differences of L = sum(out * R) with a fixed random R (L
 * summed in double over the fp32 forward) at tiny shapes; error = max|analytic - numeric| /
 * max(max|numeric|, 1e-3), after a NaN check. Forwards are compared with double references, each
 * accumulating backward is called twice to confirm that it adds, and the checker is shown to reject a
 * wrong gradient. Exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops/ops.h"

#define TEST_NAME "test_layernorm_gelu_grad"
#define TEST_SEED 0x243f6a8885a308d3ull
#define TEST_COL 58
#include "test_util.h"

#define FD_EPS 1e-3f
#define FD_TOL 5e-3
#define TIGHT_TOL 1e-5

static double dot_r(const float *out, const float *R, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * (double)R[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

static void check_grad(const char *name, const float *analytic, float *param, size_t n, loss_fn f,
                       void *ctx) {
    double *num = tk_calloc(n, sizeof(double));
    if (!num) exit(1);
    for (size_t i = 0; i < n; i++) {
        float orig = param[i];
        param[i] = orig + FD_EPS;
        double xp = param[i], lp = f(ctx);
        param[i] = orig - FD_EPS;
        double xm = param[i], lm = f(ctx);
        param[i] = orig;
        num[i] = (lp - lm) / (xp - xm);
    }
    report(name, rel_err_d(analytic, num, n), FD_TOL);
    tk_free(num);
}

/* second must equal 2 * first: the backward adds. */
static void check_adds(const char *name, const float *first, const float *second, size_t n) {
    double maxd = 0.0, maxr = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)second[i] - 2.0 * (double)first[i]);
        if (!isfinite(d)) d = INFINITY;
        maxd = d > maxd ? d : maxd;
        maxr = fabs((double)first[i]) > maxr ? fabs((double)first[i]) : maxr;
    }
    report(name, maxr > 0.0 ? maxd / maxr : INFINITY, 1e-6);
}

/* ---- layernorm -------------------------------------------------------------------------------- */

typedef struct {
    float *x, *w, *b, *y, *mean, *rstd, *R;
    size_t N, C;
    float eps;
} ln_ctx;

static double ln_loss(void *p) {
    ln_ctx *c = p;
    tk_layernorm_forward(c->y, c->mean, c->rstd, c->x, c->w, c->b, c->N, c->C, c->eps);
    return dot_r(c->y, c->R, c->N * c->C);
}

static void test_layernorm(size_t N, size_t C, float shift) {
    char name[128];
    ln_ctx c = {.N = N, .C = C, .eps = 1e-5f};
    c.x = falloc(N * C), c.w = falloc(C), c.b = falloc(C), c.y = falloc(N * C);
    c.mean = falloc(N), c.rstd = falloc(N), c.R = falloc(N * C);
    fill(c.x, N * C, -1.0f + shift, 1.0f + shift); /* shift: rows with a large mean */
    fill(c.w, C, 0.5f, 1.5f);
    fill(c.b, C, -0.5f, 0.5f);
    fill(c.R, N * C, -1, 1);

    /* forward vs a double reference */
    double *yref = tk_calloc(N * C, sizeof(double));
    for (size_t n = 0; n < N; n++) {
        double mu = 0.0, var = 0.0;
        for (size_t j = 0; j < C; j++) mu += c.x[n * C + j];
        mu /= (double)C;
        for (size_t j = 0; j < C; j++) var += (c.x[n * C + j] - mu) * (c.x[n * C + j] - mu);
        var /= (double)C;
        for (size_t j = 0; j < C; j++)
            yref[n * C + j] = (c.x[n * C + j] - mu) / sqrt(var + c.eps) * c.w[j] + c.b[j];
    }
    ln_loss(&c);
    snprintf(name, sizeof name, "layernorm %zux%zu (mean %.0f): forward vs double", N, C, shift);
    report(name, rel_err_d(c.y, yref, N * C), TIGHT_TOL);

    /* in place (y aliases x) gives the same values */
    float *xy = falloc(N * C);
    memcpy(xy, c.x, N * C * sizeof(float));
    tk_layernorm_forward(xy, NULL, NULL, xy, c.w, c.b, N, C, c.eps);
    snprintf(name, sizeof name, "layernorm %zux%zu: in place == out of place", N, C);
    report(name, memcmp(xy, c.y, N * C * sizeof(float)) == 0 ? 0.0 : 1.0, 0.0);

    /* backward: dy = R */
    float *dx = falloc(N * C), *dw = falloc(C), *db = falloc(C);
    float *dx2 = falloc(N * C), *dw2 = falloc(C), *db2 = falloc(C);
    ln_loss(&c);
    tk_layernorm_backward(dx, dw, db, c.R, c.x, c.w, c.mean, c.rstd, N, C);
    memcpy(dx2, dx, N * C * sizeof(float));
    memcpy(dw2, dw, C * sizeof(float));
    memcpy(db2, db, C * sizeof(float));
    tk_layernorm_backward(dx2, dw2, db2, c.R, c.x, c.w, c.mean, c.rstd, N, C);
    snprintf(name, sizeof name, "layernorm %zux%zu: dx vs finite differences", N, C);
    check_grad(name, dx, c.x, N * C, ln_loss, &c);
    snprintf(name, sizeof name, "layernorm %zux%zu: dw vs finite differences", N, C);
    check_grad(name, dw, c.w, C, ln_loss, &c);
    snprintf(name, sizeof name, "layernorm %zux%zu: db vs finite differences", N, C);
    check_grad(name, db, c.b, C, ln_loss, &c);
    check_adds("layernorm: dx, dw, db accumulate (dx)", dx, dx2, N * C);
    check_adds("layernorm: dx, dw, db accumulate (dw)", dw, dw2, C);
    check_adds("layernorm: dx, dw, db accumulate (db)", db, db2, C);

    /* the checker must be able to fail: a gradient with one wrong entry */
    dw[1] += 0.1f;
    double *num = tk_calloc(C, sizeof(double));
    for (size_t j = 0; j < C; j++) num[j] = dw[j];
    num[1] -= 0.1;
    int caught = rel_err_d(dw, num, C) > FD_TOL;
    printf("%-58s %s\n", "checker: rejects a perturbed dw", caught ? "ok" : "FAIL");
    if (!caught) g_failures++;

    tk_free(num), tk_free(yref), tk_free(xy);
    tk_free(dx), tk_free(dw), tk_free(db), tk_free(dx2), tk_free(dw2), tk_free(db2);
    tk_free(c.x), tk_free(c.w), tk_free(c.b), tk_free(c.y), tk_free(c.mean), tk_free(c.rstd), tk_free(c.R);
}

/* ---- gelu ------------------------------------------------------------------------------------- */

typedef struct {
    float *x, *y, *R;
    size_t n;
    tk_gelu_kind kind;
} gelu_ctx;

static double gelu_loss(void *p) {
    gelu_ctx *c = p;
    tk_gelu_forward(c->y, c->x, c->n, c->kind);
    return dot_r(c->y, c->R, c->n);
}

static double gelu_ref(double x, tk_gelu_kind kind) {
    switch (kind) {
    case TK_GELU_ERF: return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case TK_GELU_TANH: return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case TK_GELU_QUICK: return x / (1.0 + exp(-1.702 * x));
    }
    return NAN;
}

static void test_gelu(tk_gelu_kind kind) {
    char name[128];
    gelu_ctx c = {.n = 64, .kind = kind};
    c.x = falloc(c.n), c.y = falloc(c.n), c.R = falloc(c.n);
    fill(c.x, c.n, -4, 4);
    fill(c.R, c.n, -1, 1);
    double *ref = tk_calloc(c.n, sizeof(double));
    for (size_t i = 0; i < c.n; i++) ref[i] = gelu_ref(c.x[i], kind);
    gelu_loss(&c);
    snprintf(name, sizeof name, "gelu %s: forward vs double", tk_gelu_name(kind));
    report(name, rel_err_d(c.y, ref, c.n), TIGHT_TOL);
    float *dx = falloc(c.n), *dx2 = falloc(c.n);
    tk_gelu_backward(dx, c.R, c.x, c.n, kind);
    memcpy(dx2, dx, c.n * sizeof(float));
    tk_gelu_backward(dx2, c.R, c.x, c.n, kind);
    snprintf(name, sizeof name, "gelu %s: dx vs finite differences", tk_gelu_name(kind));
    check_grad(name, dx, c.x, c.n, gelu_loss, &c);
    snprintf(name, sizeof name, "gelu %s: backward accumulates", tk_gelu_name(kind));
    check_adds(name, dx, dx2, c.n);
    tk_free(ref), tk_free(dx), tk_free(dx2), tk_free(c.x), tk_free(c.y), tk_free(c.R);
}

int main(void) {
    tk_set_threads(2);
    test_layernorm(5, 12, 0.0f);
    test_layernorm(3, 33, 8.0f);
    /* large enough for the OpenMP paths (N*C >= TK_OMP_MIN_WORK), forward only against double */
    {
        size_t N = 70, C = 520;
        ln_ctx c = {.N = N, .C = C, .eps = 1e-6f};
        c.x = falloc(N * C), c.w = falloc(C), c.b = falloc(C), c.y = falloc(N * C);
        c.mean = falloc(N), c.rstd = falloc(N), c.R = falloc(N * C);
        fill(c.x, N * C, -2, 3), fill(c.w, C, 0.5f, 1.5f), fill(c.b, C, -1, 1), fill(c.R, N * C, -1, 1);
        ln_loss(&c);
        float *dw = falloc(C), *db = falloc(C);
        tk_layernorm_backward(NULL, dw, db, c.R, c.x, c.w, c.mean, c.rstd, N, C);
        double *dwr = tk_calloc(C, sizeof(double)), *dbr = tk_calloc(C, sizeof(double));
        for (size_t n = 0; n < N; n++)
            for (size_t j = 0; j < C; j++) {
                dwr[j] += (double)c.R[n * C + j] * ((c.x[n * C + j] - c.mean[n]) * c.rstd[n]);
                dbr[j] += c.R[n * C + j];
            }
        report("layernorm 70x520 (threaded): dw vs plain loop", rel_err_d(dw, dwr, C), TIGHT_TOL);
        report("layernorm 70x520 (threaded): db vs plain loop", rel_err_d(db, dbr, C), TIGHT_TOL);
        tk_free(dw), tk_free(db), tk_free(dwr), tk_free(dbr);
        tk_free(c.x), tk_free(c.w), tk_free(c.b), tk_free(c.y), tk_free(c.mean), tk_free(c.rstd), tk_free(c.R);
    }
    test_gelu(TK_GELU_ERF);
    test_gelu(TK_GELU_TANH);
    test_gelu(TK_GELU_QUICK);
    if (g_failures) {
        printf("test_layernorm_gelu_grad: %d FAILED\n", g_failures);
        return 1;
    }
    printf("test_layernorm_gelu_grad: all passed\n");
    return 0;
}
