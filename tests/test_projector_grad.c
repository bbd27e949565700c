/* test_projector_grad.c: vision/projector.c (LLaVA's mm_projector, linear and mlp2x_gelu).
 *
 * Checks, for both kinds: the forward against a double-precision reference; dx, dW1, db1 (and dW2,
 * db2) against central differences of L = sum(y * R) (error max|analytic - numeric| /
 * max(max|numeric|, 1e-3), NaN check first); that the backward adds and can run twice from one cache;
 * that registering into an external trainable block binds into its data and grad arrays; a save/load
 * round trip (bit-exact, original LLaVA key names) and the documented errors (kind mismatch, shape
 * mismatch naming the tensor). Exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "io/safetensors.h"
#include "vision/projector.h"

#define TEST_NAME "test_projector_grad"
#define TEST_SEED 0x13198a2e03707344ull
#define TEST_COL 62
#include "test_util.h"

#define FD_EPS 1e-3f
#define FD_TOL 5e-3
#define TIGHT_TOL 1e-5

typedef struct {
    tk_projector *p;
    float *x, *y, *R, *cache;
    size_t N;
} ctx;

static double loss(void *v) {
    ctx *c = v;
    tk_projector_forward(c->p, c->y, c->cache, c->x, c->N);
    double s = 0.0;
    for (size_t i = 0; i < c->N * c->p->out; i++) s += (double)c->y[i] * (double)c->R[i];
    return s;
}

static void check_grad(const char *name, const float *analytic, float *param, size_t n, ctx *c) {
    double *num = tk_calloc(n, sizeof(double));
    if (!num) exit(1);
    for (size_t i = 0; i < n; i++) {
        float orig = param[i];
        param[i] = orig + FD_EPS;
        double xp = param[i], lp = loss(c);
        param[i] = orig - FD_EPS;
        double xm = param[i], lm = loss(c);
        param[i] = orig;
        num[i] = (lp - lm) / (xp - xm);
    }
    report(name, rel_err_d(analytic, num, n), FD_TOL);
    tk_free(num);
}

static double gelu_d(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static void test_kind(tk_proj_kind kind, size_t N, size_t I, size_t O) {
    char name[160];
    const char *kn = tk_proj_kind_name(kind);
    tk_err err = {0};
    tk_projector p;
    if (tk_projector_init(&p, kind, I, O, &err) || tk_projector_alloc_own(&p, &err)) {
        printf("projector init: %s\n", err.msg);
        g_failures++;
        return;
    }
    tk_projector_random(&p, 7);
    /* non-zero biases of a useful size so their gradients are exercised */
    fill(p.b1, O, -0.5f, 0.5f);
    if (p.b2) fill(p.b2, O, -0.5f, 0.5f);
    ctx c = {.p = &p, .N = N};
    c.x = falloc(N * I), c.y = falloc(N * O), c.R = falloc(N * O);
    c.cache = falloc(tk_projector_cache_floats(&p, N));
    fill(c.x, N * I, -2, 2);
    fill(c.R, N * O, -1, 1);

    /* forward vs double reference */
    double *ref = tk_calloc(N * O, sizeof(double)), *h = tk_calloc(O, sizeof(double));
    for (size_t n = 0; n < N; n++) {
        for (size_t o = 0; o < O; o++) {
            double s = p.b1[o];
            for (size_t i = 0; i < I; i++) s += (double)c.x[n * I + i] * p.w1[o * I + i];
            h[o] = kind == TK_PROJ_MLP2X_GELU ? gelu_d(s) : s;
        }
        for (size_t o = 0; o < O; o++) {
            if (kind == TK_PROJ_LINEAR) {
                ref[n * O + o] = h[o];
                continue;
            }
            double s = p.b2[o];
            for (size_t j = 0; j < O; j++) s += h[j] * p.w2[o * O + j];
            ref[n * O + o] = s;
        }
    }
    loss(&c);
    snprintf(name, sizeof name, "%s %zux%zu->%zu: forward vs double", kn, N, I, O);
    report(name, rel_err_d(c.y, ref, N * O), TIGHT_TOL);

    /* backward with dy = R, then the finite differences */
    tk_params_zero_grad(&p.own);
    float *dx = falloc(N * I);
    loss(&c);
    tk_projector_backward(&p, dx, c.cache, c.R, c.x, N);
    float *g1 = falloc(p.own.total), *dx1 = falloc(N * I);
    memcpy(g1, p.own.grad, p.own.total * sizeof(float));
    memcpy(dx1, dx, N * I * sizeof(float));
    snprintf(name, sizeof name, "%s: dx vs finite differences", kn);
    check_grad(name, dx1, c.x, N * I, &c);
    snprintf(name, sizeof name, "%s: dW1 vs finite differences", kn);
    check_grad(name, p.dw1, p.w1, O * I, &c);
    snprintf(name, sizeof name, "%s: db1 vs finite differences", kn);
    check_grad(name, p.db1, p.b1, O, &c);
    if (kind == TK_PROJ_MLP2X_GELU) {
        check_grad("mlp2x_gelu: dW2 vs finite differences", p.dw2, p.w2, O * O, &c);
        check_grad("mlp2x_gelu: db2 vs finite differences", p.db2, p.b2, O, &c);
    }

    /* a second backward from the same cache adds the same amount again */
    loss(&c);
    tk_projector_backward(&p, dx, c.cache, c.R, c.x, N);
    double maxd = 0.0, maxr = 0.0;
    for (size_t i = 0; i < p.own.total; i++) {
        double d = fabs((double)p.own.grad[i] - 2.0 * (double)g1[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs((double)g1[i]) > maxr ? fabs((double)g1[i]) : maxr;
    }
    for (size_t i = 0; i < N * I; i++) {
        double d = fabs((double)dx[i] - 2.0 * (double)dx1[i]);
        maxd = d > maxd ? d : maxd;
    }
    snprintf(name, sizeof name, "%s: backward adds (grads and dx doubled)", kn);
    report(name, maxr > 0 ? maxd / maxr : INFINITY, 1e-6);

    /* dx NULL (a frozen input) is allowed and leaves the weight gradients the same */
    tk_params_zero_grad(&p.own);
    tk_projector_backward(&p, NULL, c.cache, c.R, c.x, N);
    snprintf(name, sizeof name, "%s: backward with dx NULL gives the same weight grads", kn);
    report_bool(name, memcmp(p.own.grad, g1, p.own.total * sizeof(float)) == 0);

    /* save / load round trip and the errors */
    char path[256];
    snprintf(path, sizeof path, "/tmp/test_projector_grad.%d.%s.safetensors", (int)getpid(), kn);
    tk_projector q;
    int ok = tk_projector_save(&p, path, &err) == 0;
    tk_proj_kind k2;
    size_t i2 = 0, o2 = 0;
    ok = ok && tk_projector_detect(path, &k2, &i2, &o2, &err) == 0 && k2 == kind && i2 == I && o2 == O;
    ok = ok && tk_projector_init(&q, kind, I, O, &err) == 0 && tk_projector_alloc_own(&q, &err) == 0;
    ok = ok && tk_projector_load(&q, path, &err) == 0;
    ok = ok && memcmp(q.own.data, p.own.data, p.own.total * sizeof(float)) == 0;
    tk_st_file *f = ok ? tk_st_open(path, &err) : NULL;
    ok = ok && f && tk_st_find(f, kind == TK_PROJ_MLP2X_GELU ? "model.mm_projector.2.bias" : "model.mm_projector.bias");
    tk_st_close(f);
    snprintf(name, sizeof name, "%s: save/detect/load round trip is bit-exact", kn);
    report_bool(name, ok);
    if (!ok) printf("  %s\n", err.msg);
    tk_projector_free(&q);

    tk_projector other;
    tk_proj_kind wrong = kind == TK_PROJ_LINEAR ? TK_PROJ_MLP2X_GELU : TK_PROJ_LINEAR;
    tk_projector_init(&other, wrong, I, O, &err);
    tk_projector_alloc_own(&other, &err);
    err.msg[0] = 0;
    ok = tk_projector_load(&other, path, &err) != 0 && strstr(err.msg, "expected") != NULL;
    snprintf(name, sizeof name, "%s: loading as the other kind fails (%s)", kn, err.msg);
    report_bool(name, ok);
    tk_projector_free(&other);
    tk_projector_init(&other, kind, I + 1, O, &err);
    tk_projector_alloc_own(&other, &err);
    err.msg[0] = 0;
    ok = tk_projector_load(&other, path, &err) != 0 && strstr(err.msg, "mm_projector") != NULL &&
         strstr(err.msg, path) != NULL;
    snprintf(name, sizeof name, "%s: a shape mismatch names file and tensor", kn);
    report_bool(name, ok);
    printf("  (%s)\n", err.msg);
    tk_projector_free(&other);
    unlink(path);

    tk_free(ref), tk_free(h), tk_free(dx), tk_free(dx1), tk_free(g1);
    tk_free(c.x), tk_free(c.y), tk_free(c.R), tk_free(c.cache);
    tk_projector_free(&p);
}

/* Registered into an external block beside another tensor, as a model's trainables. */
static void test_external_block(void) {
    tk_err err = {0};
    tk_params P = {0};
    float *other = NULL, *dother = NULL;
    tk_projector p;
    int ok = tk_params_add(&P, "base_model.model.x.lora_A.weight", 2, (int64_t[]){2, 3}, 1, &other,
                           &dother, NULL, &err) == 0;
    ok = ok && tk_projector_init(&p, TK_PROJ_MLP2X_GELU, 4, 6, &err) == 0;
    ok = ok && tk_projector_register(&p, &P, NULL, &err) == 0 && tk_params_alloc(&P, &err) == 0;
    ok = ok && p.w1 == P.data + 6 && p.dw1 == P.grad + 6 && p.b2 + 6 == P.data + P.total;
    ok = ok && tk_params_find(&P, "model.mm_projector.0.weight") && tk_params_find(&P, "model.mm_projector.2.bias");
    ok = ok && P.total == 6 + 4 * 6 + 6 + 6 * 6 + 6;
    const tk_param *b = tk_params_find(&P, "model.mm_projector.0.bias");
    ok = ok && b && b->decay == 0;
    report_bool("projector registers into an external trainable block", ok);
    if (!ok) printf("  %s\n", err.msg);
    tk_projector_free(&p); /* must not touch P */
    report_bool("tk_projector_free leaves an external block alone", P.data != NULL && p.w1 != NULL);
    tk_params_free(&P);
}

int main(void) {
    tk_set_threads(2);
    test_kind(TK_PROJ_LINEAR, 5, 7, 6);
    test_kind(TK_PROJ_MLP2X_GELU, 5, 7, 6);
    test_external_block();
    if (g_failures) {
        printf("test_projector_grad: %d FAILED\n", g_failures);
        return 1;
    }
    printf("test_projector_grad: all passed\n");
    return 0;
}
