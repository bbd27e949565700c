/* test_adapter_grad.c: the gated adapted linear layer (src/peft/adapter.c) against finite differences
 * and an independent double-precision reference, for LoRA, DoRA and the bottleneck Adapter (tanh and
 * relu), with the TS-PEFT gate on (some tokens gated off), on with tau = 0 (every token kept: the
 * backward's fast path) and off, without and with dropout.
 *
 * Formulas checked (docs/TSPEFT.md sections 1-3; x~ = dropout(x) = x * keep / (1 - p)):
 *   b_i = W0 x_i;  r_i = ||m_i|| / max(||b_i||, 1e-6);  S_i = [r_i >= tau] (1 when ungated)
 *   LoRA:       m_i = s B A x~_i
 *   DoRA:       m_i = (c - 1) * (W0 x~_i) + c * (s B A x~_i),  c = mag / ||W0 + s B A||_row
 *   Bottleneck: m_i = s B act(A x~_i)
 *   y_i = b_i + S_i m_i;  c_i (gate statistic) = <dL/dy_i, m_i> for every valid token
 * The scalar loss is L = sum(y * Rnd) (summed in double), so dL/dy = Rnd.
 *
 * The hard gate is piecewise constant: every finite difference holds S fixed. Each perturbed
 * evaluation compares the gate decisions with the unperturbed ones; a flip makes that element redo
 * with a smaller step (counted and printed), and an element that still flips fails the check.
 * tau is chosen as the midpoint of the widest relative gap between adjacent sorted r values (with at
 * least two tokens on each side), read from a first forward with tau = 0. A self-test puts tau exactly
 * on one r to confirm that the flip detector fires.
 *
 * DoRA's row norm ||W0 + s B A||_row is DETACHED in the defined gradient, so dA and dB cannot be
 * checked by differencing the library's forward (whose norm moves with A and B). They are checked
 * against central differences (in double, step 1e-6) of the double reference with c held fixed.
 * dx and dmag are differenced through the library as is: the norm depends on neither x nor mag.
 *
 * Also checked per configuration: y, r_i (rel 1e-5 per token) and S_i against the reference; the
 * statistics (r, kept, c_i of valid tokens only; padding still gated and applied); every backward
 * adds; the gathered backward (some rows gated off) equals the all-kept fast path run on the kept rows
 * alone, and gated-off rows get only dy W0; the tie r_i == tau keeps; dropout reads its mask from
 * L.keepx, train = 0 disables it; and the dropout rate over 3000 draws.
 *
 * Error measure: max|got - want| / max(max|want|, 1e-3) after a NaN/inf check. Exits 1 on failure.
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
#include "peft/adapter.h"

#define TEST_NAME "test_adapter_grad"
#define TEST_SEED 0x243f6a8885a308d3ull
#define TEST_COL 68
#include "test_util.h"

/* Tolerances. FD_TOL: the fp32 forward differenced with step FD_EPS (as in test_ops_grad.c).
 * TIGHT_TOL: fp32 library against the double reference (a few fp32 roundings of O(1) values).
 * REF_FD_TOL: the double reference's own formulas against its double central differences. */
#define FD_EPS 1e-3f
#define FD_TOL 5e-3
#define TIGHT_TOL 1e-5
#define REF_FD_EPS 1e-6
#define REF_FD_TOL 1e-7
#define FLIP_RETRIES 3 /* smaller steps (each /8) tried when a perturbation flips a gate decision */

/* ---- helpers ---------------------------------------------------------------------------------- */

#define FALLOC(n) ((float *)xalloc((n), sizeof(float)))
#define DALLOC(n) ((double *)xalloc((n), sizeof(double)))
#define BALLOC(n) ((uint8_t *)xalloc((n), 1))

static double rel_err_dd(const double *a, const double *ref, size_t n) {
    double maxd = 0.0, maxr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        double d = fabs(a[i] - ref[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs(ref[i]) > maxr ? fabs(ref[i]) : maxr;
    }
    return maxd / (maxr > 1e-3 ? maxr : 1e-3);
}

static void to_double(double *d, const float *f, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = f[i];
}

/* second must be twice first up to one rounding: the backward added twice. */
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

/* ---- the independent double-precision reference ---------------------------------------------- */

typedef struct {
    size_t N, I, O, R;
    tk_adapter_kind kind;
    tk_act act;
    double s, p;
    int gated;
    double tau;
    const uint8_t *keepx;  /* [N,I] dropout keep mask, or NULL (no dropout) */
    const double *cfix;    /* [O] DoRA c held fixed, or NULL: c = mag / ||W0 + s B A||_row */
    const uint8_t *Sforce; /* [N] gate held fixed, or NULL: S = gated ? [r >= tau] : 1 */
} ref_spec;

typedef struct {
    double *x;   /* [N,I] */
    double *w0;  /* [O,I] */
    double *A;   /* [R,I] */
    double *B;   /* [O,R] */
    double *mag; /* [O] */
} ref_params;

typedef struct {
    double *xt;             /* [N,I] x~ */
    double *b, *base, *m, *y; /* [N,O] W0 x, W0 x~, m, y */
    double *u, *a;          /* [N,R] A x~, act(u) */
    double *r;              /* [N] */
    uint8_t *S;             /* [N] */
    double *cc, *wn;        /* [O] DoRA c and row norm */
} ref_acts;

static void ref_acts_alloc(ref_acts *o, size_t N, size_t I, size_t O, size_t R) {
    o->xt = DALLOC(N * I);
    o->b = DALLOC(N * O), o->base = DALLOC(N * O), o->m = DALLOC(N * O), o->y = DALLOC(N * O);
    o->u = DALLOC(N * R), o->a = DALLOC(N * R);
    o->r = DALLOC(N);
    o->S = BALLOC(N);
    o->cc = DALLOC(O), o->wn = DALLOC(O);
}

static void ref_acts_free(ref_acts *o) {
    tk_free(o->xt), tk_free(o->b), tk_free(o->base), tk_free(o->m), tk_free(o->y);
    tk_free(o->u), tk_free(o->a), tk_free(o->r), tk_free(o->S), tk_free(o->cc), tk_free(o->wn);
}

static double ref_act(tk_act a, double u) { return a == TK_ACT_TANH ? tanh(u) : (u > 0.0 ? u : 0.0); }
static double ref_dact(tk_act a, double u) {
    if (a == TK_ACT_TANH) return 1.0 - tanh(u) * tanh(u);
    return u > 0.0 ? 1.0 : 0.0;
}

static void ref_forward(const ref_spec *sp, const ref_params *P, ref_acts *o) {
    size_t N = sp->N, I = sp->I, O = sp->O, R = sp->R;
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < I; j++) {
            double v = P->x[i * I + j];
            o->xt[i * I + j] = sp->keepx ? (sp->keepx[i * I + j] ? v / (1.0 - sp->p) : 0.0) : v;
        }
    if (sp->kind == TK_ADAPTER_DORA) {
        for (size_t q = 0; q < O; q++) {
            double ss = 0.0;
            for (size_t j = 0; j < I; j++) {
                double ba = 0.0;
                for (size_t k = 0; k < R; k++) ba += P->B[q * R + k] * P->A[k * I + j];
                double v = P->w0[q * I + j] + sp->s * ba;
                ss += v * v;
            }
            o->wn[q] = sqrt(ss);
            o->cc[q] = sp->cfix ? sp->cfix[q] : P->mag[q] / o->wn[q];
        }
    }
    for (size_t i = 0; i < N; i++) {
        const double *xi = P->x + i * I, *xti = o->xt + i * I;
        for (size_t k = 0; k < R; k++) {
            double u = 0.0;
            for (size_t j = 0; j < I; j++) u += P->A[k * I + j] * xti[j];
            o->u[i * R + k] = u;
            o->a[i * R + k] = ref_act(sp->act, u);
        }
        const double *code = sp->kind == TK_ADAPTER_BOTTLENECK ? o->a + i * R : o->u + i * R;
        double nm = 0.0, nb = 0.0;
        for (size_t q = 0; q < O; q++) {
            double b = 0.0, base = 0.0, lr = 0.0;
            for (size_t j = 0; j < I; j++) {
                b += P->w0[q * I + j] * xi[j];
                base += P->w0[q * I + j] * xti[j];
            }
            for (size_t k = 0; k < R; k++) lr += P->B[q * R + k] * code[k];
            lr *= sp->s;
            double m = sp->kind == TK_ADAPTER_DORA ? (o->cc[q] - 1.0) * base + o->cc[q] * lr : lr;
            o->b[i * O + q] = b;
            o->base[i * O + q] = base;
            o->m[i * O + q] = m;
            nm += m * m;
            nb += b * b;
        }
        double den = sqrt(nb);
        o->r[i] = sqrt(nm) / (den > 1e-6 ? den : 1e-6);
        o->S[i] = sp->Sforce ? sp->Sforce[i] : (sp->gated ? o->r[i] >= sp->tau : 1);
        for (size_t q = 0; q < O; q++)
            o->y[i * O + q] = o->b[i * O + q] + (o->S[i] ? o->m[i * O + q] : 0.0);
    }
}

static double ref_loss(const ref_spec *sp, const ref_params *P, ref_acts *o, const float *Rnd) {
    ref_forward(sp, P, o);
    double l = 0.0;
    for (size_t i = 0; i < sp->N * sp->O; i++) l += o->y[i] * (double)Rnd[i];
    return l;
}

/* The defined gradient, written from the formulas (not from adapter.c), with S from o->S:
 *   dx_i   = W0^T g_i + S_i keep_i/(1-p) * (dm_i/dx~_i)^T g_i
 *   LoRA:   dm/dx~^T g = s A^T B^T g;     dB += S s g u^T;        dA += S s (B^T g) x~^T
 *   Bottl.: dm/dx~^T g = s A^T (act'(u) * B^T g);  dB += S s g act(u)^T;  dA += S s (act'(u) * B^T g) x~^T
 *   DoRA:   dm/dx~^T g = W0^T ((c-1) g) + s A^T B^T (c g);  dB += S s (c g) u^T;  dA += S s (B^T (c g)) x~^T
 *           dmag_o += S g_o (base_o + s (B u)_o) / wn_o     (wn detached)
 *   ci_i   = <g_i, m_i>
 * Outputs are overwritten. */
static void ref_backward(const ref_spec *sp, const ref_params *P, const ref_acts *o, const float *g,
                         double *dx, double *dA, double *dB, double *dmag, double *ci) {
    size_t N = sp->N, I = sp->I, O = sp->O, R = sp->R;
    double s = sp->s;
    int dora = sp->kind == TK_ADAPTER_DORA, bn = sp->kind == TK_ADAPTER_BOTTLENECK;
    memset(dx, 0, N * I * sizeof(double));
    memset(dA, 0, R * I * sizeof(double));
    memset(dB, 0, O * R * sizeof(double));
    if (dmag) memset(dmag, 0, O * sizeof(double));
    double *ge = DALLOC(O), *gcode = DALLOC(R), *dxt = DALLOC(I);
    for (size_t i = 0; i < N; i++) {
        const float *gi = g + i * O;
        double c = 0.0;
        for (size_t q = 0; q < O; q++) c += (double)gi[q] * o->m[i * O + q];
        ci[i] = c;
        for (size_t j = 0; j < I; j++) {
            double v = 0.0;
            for (size_t q = 0; q < O; q++) v += P->w0[q * I + j] * gi[q];
            dx[i * I + j] = v; /* base path, every token */
        }
        if (!o->S[i]) continue;
        for (size_t q = 0; q < O; q++) ge[q] = dora ? o->cc[q] * gi[q] : gi[q]; /* gradient at s B code */
        const double *code = bn ? o->a + i * R : o->u + i * R;
        for (size_t q = 0; q < O; q++)
            for (size_t k = 0; k < R; k++) dB[q * R + k] += s * ge[q] * code[k];
        for (size_t k = 0; k < R; k++) {
            double v = 0.0;
            for (size_t q = 0; q < O; q++) v += P->B[q * R + k] * ge[q];
            gcode[k] = s * v * (bn ? ref_dact(sp->act, o->u[i * R + k]) : 1.0); /* gradient at u */
        }
        for (size_t k = 0; k < R; k++)
            for (size_t j = 0; j < I; j++) dA[k * I + j] += gcode[k] * o->xt[i * I + j];
        for (size_t j = 0; j < I; j++) {
            double v = 0.0;
            for (size_t k = 0; k < R; k++) v += P->A[k * I + j] * gcode[k];
            if (dora)
                for (size_t q = 0; q < O; q++) v += P->w0[q * I + j] * (o->cc[q] - 1.0) * gi[q];
            dxt[j] = v;
        }
        for (size_t j = 0; j < I; j++) {
            double scale = sp->keepx ? (sp->keepx[i * I + j] ? 1.0 / (1.0 - sp->p) : 0.0) : 1.0;
            dx[i * I + j] += scale * dxt[j];
        }
        if (dora && dmag)
            for (size_t q = 0; q < O; q++) {
                double lr = 0.0;
                for (size_t k = 0; k < R; k++) lr += P->B[q * R + k] * o->u[i * R + k];
                dmag[q] += gi[q] * (o->base[i * O + q] + s * lr) / o->wn[q];
            }
    }
    tk_free(ge), tk_free(gcode), tk_free(dxt);
}

/* Central differences of the double reference's loss (step REF_FD_EPS), param restored. */
static void ref_numeric_grad(double *num, double *param, size_t n, const ref_spec *sp,
                             const ref_params *P, ref_acts *o, const float *Rnd) {
    for (size_t i = 0; i < n; i++) {
        double orig = param[i];
        param[i] = orig + REF_FD_EPS;
        double lp = ref_loss(sp, P, o, Rnd);
        param[i] = orig - REF_FD_EPS;
        double lm = ref_loss(sp, P, o, Rnd);
        param[i] = orig;
        num[i] = (lp - lm) / (2.0 * REF_FD_EPS);
    }
}

/* ---- the library side ------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    tk_adapter_kind kind;
    tk_act act;
    int gate;      /* 0: ungated; 1: gated, tau between two r values; 2: gated with tau = 0 */
    float dropout; /* dropout probability */
    int use_valid; /* mark one kept and one gated-off token as padding (valid = 0) */
} case_cfg;

typedef struct {
    case_cfg cfg;
    size_t N, I, O, R;
    float *x, *Rnd;
    uint8_t *valid;
    tk_adapted_linear L;
    tk_adapter_ws ws;
    float *y;
    const uint8_t *S_hold; /* [N] gate decisions every perturbed evaluation must reproduce */
    int flipped;
    uint64_t seed;
    tk_rng rng;
} actx;

static void lib_forward(actx *c, size_t N, const float *x, const uint8_t *valid, float *y, int train) {
    tk_err err = {{0}};
    tk_rng_seed(&c->rng, c->seed); /* the same dropout mask on every evaluation */
    if (tk_adapted_forward(&c->L, &c->ws, y, x, valid, N, train, &c->rng, &err)) {
        fprintf(stderr, "test_adapter_grad: forward failed: %s\n", err.msg);
        exit(1);
    }
}

static void lib_backward(actx *c, size_t N, float *dx, const float *dy, const float *x,
                         const uint8_t *valid) {
    tk_err err = {{0}};
    if (tk_adapted_backward(&c->L, &c->ws, dx, dy, x, valid, N, &err)) {
        fprintf(stderr, "test_adapter_grad: backward failed: %s\n", err.msg);
        exit(1);
    }
}

/* L = sum(y * Rnd) of the library's fp32 forward; records a gate flip against S_hold. */
static double lib_loss(actx *c) {
    lib_forward(c, c->N, c->x, c->valid, c->y, 1);
    tk_gate_stats_reset(&c->L.stats);
    if (c->S_hold && memcmp(c->S_hold, c->L.S, c->N) != 0) c->flipped = 1;
    double l = 0.0;
    for (size_t i = 0; i < c->N * c->O; i++) l += (double)c->y[i] * (double)c->Rnd[i];
    return l;
}

/* Central differences of lib_loss over param [n] with the gate held: an element whose perturbed
 * evaluation flips a gate decision is redone with a step 8x smaller, up to FLIP_RETRIES times. */
static void lib_numeric_grad(double *num, float *param, size_t n, actx *c, int *redone,
                             int *unresolved) {
    for (size_t i = 0; i < n; i++) {
        float orig = param[i], eps = FD_EPS;
        for (int attempt = 0;; attempt++) {
            c->flipped = 0;
            param[i] = orig + eps;
            double xp = param[i], lp = lib_loss(c);
            param[i] = orig - eps;
            double xm = param[i], lm = lib_loss(c);
            param[i] = orig;
            num[i] = (lp - lm) / (xp - xm);
            if (!c->flipped) break;
            (*redone)++;
            if (attempt == FLIP_RETRIES) {
                (*unresolved)++;
                num[i] = NAN;
                break;
            }
            eps /= 8.0f;
        }
    }
}

static void check_fd(actx *c, const char *what, const float *analytic, float *param, size_t n) {
    char name[160];
    int redone = 0, unresolved = 0;
    double *num = DALLOC(n);
    lib_numeric_grad(num, param, n, c, &redone, &unresolved);
    snprintf(name, sizeof name, "%s: %s vs FD, S held (%d redone, %d flipped)", c->cfg.name, what,
             redone, unresolved);
    report(name, rel_err_d(analytic, num, n), FD_TOL);
    if (redone) printf("    note: %d element(s) of %s flipped a gate at step %.0e; redone smaller\n",
                       redone, what, (double)FD_EPS);
    tk_free(num);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* ---- one configuration ------------------------------------------------------------------------ */

static void run_case(case_cfg cfg) {
    char name[192];
    const size_t N = 7, I = 6, O = 5, R = 3;
    actx c = {.cfg = cfg, .N = N, .I = I, .O = O, .R = R, .seed = 0x5eedull + (uint64_t)cfg.kind};
    tk_adapted_linear *L = &c.L;
    int dora = cfg.kind == TK_ADAPTER_DORA;
    printf("%s\n", cfg.name);

    c.x = FALLOC(N * I), c.Rnd = FALLOC(N * O), c.y = FALLOC(N * O);
    L->kind = cfg.kind;
    L->gated = cfg.gate != 0;
    L->in = I, L->out = O, L->r = R;
    L->scale = 2.0f / (float)R;
    L->dropout = cfg.dropout;
    L->act = cfg.act;
    L->w0 = FALLOC(O * I), L->dw0 = NULL; /* frozen base (the model forbids adapter + trainable W0) */
    L->A = FALLOC(R * I), L->dA = FALLOC(R * I);
    L->B = FALLOC(O * R), L->dB = FALLOC(O * R);
    if (dora) L->mag = FALLOC(O), L->dmag = FALLOC(O);
    fill(c.x, N * I, -1, 1);
    fill(L->w0, O * I, -0.6f, 0.6f);
    fill(L->A, R * I, -0.8f, 0.8f);
    fill(L->B, O * R, -0.8f, 0.8f);
    fill(c.Rnd, N * O, -1, 1);
    /* spread the sizes of the updates so that r varies over tokens */
    for (size_t i = 0; i < N; i++) {
        float sc = 0.3f + 0.25f * (float)i;
        for (size_t j = 0; j < I; j++) c.x[i * I + j] *= (i % 2 ? sc : 1.0f / sc);
    }
    if (dora)
        for (size_t q = 0; q < O; q++) {
            double ss = 0.0;
            for (size_t j = 0; j < I; j++) ss += (double)L->w0[q * I + j] * L->w0[q * I + j];
            L->mag[q] = (float)sqrt(ss) * rnd(0.6f, 1.5f);
        }
    L->tau = 0.0f;
    tk_err err = {{0}};
    if (tk_adapted_alloc(L, N, &err) ||
        tk_adapter_ws_alloc(&c.ws, N, I > O ? I : O, R, O * I, &err)) {
        fprintf(stderr, "test_adapter_grad: %s\n", err.msg);
        exit(1);
    }

    /* Probe: r with tau = 0, then tau = midpoint of the widest gap leaving >= 2 tokens each side. */
    lib_forward(&c, N, c.x, NULL, c.y, 1);
    tk_gate_stats_reset(&L->stats);
    float *rs = FALLOC(N);
    memcpy(rs, L->rr, N * sizeof(float));
    qsort(rs, N, sizeof(float), cmp_float);
    if (cfg.gate == 1) {
        size_t best = 1;
        for (size_t k = 1; k + 2 < N; k++)
            if ((rs[k + 1] - rs[k]) / rs[k + 1] > (rs[best + 1] - rs[best]) / rs[best + 1]) best = k;
        L->tau = 0.5f * (rs[best] + rs[best + 1]);
        printf("  r sorted:");
        for (size_t k = 0; k < N; k++) printf(" %.4f", (double)rs[k]);
        printf("\n  tau = %.5f (between %.4f and %.4f; gap %.0f%% of r)\n", (double)L->tau,
               (double)rs[best], (double)rs[best + 1],
               100.0 * (rs[best + 1] - rs[best]) / rs[best + 1]);
    }
    if (cfg.use_valid) { /* padding: the first kept and the first gated-off token */
        c.valid = BALLOC(N);
        memset(c.valid, 1, N);
        int got_on = 0, got_off = 0;
        for (size_t i = 0; i < N; i++) {
            int on = L->rr[i] >= L->tau;
            if (on && !got_on) c.valid[i] = 0, got_on = 1;
            if (!on && !got_off) c.valid[i] = 0, got_off = 1;
        }
        report_bool("valid mask covers a kept and a gated-off padding token", got_on && got_off);
    }

    /* The real forward + backward. */
    lib_forward(&c, N, c.x, c.valid, c.y, 1);
    uint8_t *S = BALLOC(N);
    memcpy(S, L->S, N);
    float *rr = FALLOC(N);
    memcpy(rr, L->rr, N * sizeof(float));
    size_t nk = 0;
    for (size_t i = 0; i < N; i++) nk += S[i];
    float *dx = FALLOC(N * I), *dA = FALLOC(R * I), *dB = FALLOC(O * R), *dmag = FALLOC(O);
    lib_backward(&c, N, dx, c.Rnd, c.x, c.valid);
    memcpy(dA, L->dA, R * I * sizeof(float));
    memcpy(dB, L->dB, O * R * sizeof(float));
    if (dora) memcpy(dmag, L->dmag, O * sizeof(float));
    printf("  kept %zu of %zu tokens\n", nk, N);

    /* The reference at the same point (dropout mask read from L->keepx). */
    ref_spec sp = {.N = N, .I = I, .O = O, .R = R, .kind = cfg.kind, .act = cfg.act,
                   .s = L->scale, .p = cfg.dropout, .gated = L->gated, .tau = L->tau,
                   .keepx = cfg.dropout > 0.0f ? L->keepx : NULL};
    ref_params P = {DALLOC(N * I), DALLOC(O * I), DALLOC(R * I), DALLOC(O * R), DALLOC(O)};
    to_double(P.x, c.x, N * I), to_double(P.w0, L->w0, O * I), to_double(P.A, L->A, R * I);
    to_double(P.B, L->B, O * R);
    if (dora) to_double(P.mag, L->mag, O);
    ref_acts ra;
    ref_acts_alloc(&ra, N, I, O, R);
    ref_forward(&sp, &P, &ra);

    /* --- dropout mask sanity --- */
    if (cfg.dropout > 0.0f) {
        size_t kept = 0, bad = 0;
        float inv = 1.0f / (1.0f - cfg.dropout);
        for (size_t j = 0; j < N * I; j++) {
            kept += L->keepx[j];
            if (L->xd[j] != (L->keepx[j] ? c.x[j] * inv : 0.0f)) bad++;
        }
        snprintf(name, sizeof name, "%s: dropout drops some inputs (%zu of %zu kept), xd = x*keep/(1-p)",
                 cfg.name, kept, N * I);
        report_bool(name, kept > 0 && kept < N * I && bad == 0);
    }

    /* --- (g) forward, r, S --- */
    snprintf(name, sizeof name, "%s: forward y vs double reference", cfg.name);
    report(name, rel_err_d(c.y, ra.y, N * O), TIGHT_TOL);
    double rerr = 0.0;
    for (size_t i = 0; i < N; i++) {
        double e = isfinite(rr[i]) ? fabs((double)rr[i] - ra.r[i]) / ra.r[i] : INFINITY;
        rerr = e > rerr ? e : rerr;
    }
    snprintf(name, sizeof name, "%s: r_i vs ||m_i||/max(||b_i||,1e-6) (double), per token rel", cfg.name);
    report(name, rerr, 1e-5);
    int s_ok = 1;
    for (size_t i = 0; i < N; i++) s_ok &= S[i] == (L->gated ? rr[i] >= L->tau : 1) && S[i] == ra.S[i];
    snprintf(name, sizeof name, "%s: S_i == [r_i >= tau] (1 ungated), == reference S", cfg.name);
    report_bool(name, s_ok);
    if (cfg.gate == 1) {
        snprintf(name, sizeof name, "%s: some tokens gated off and some kept", cfg.name);
        report_bool(name, nk >= 2 && nk <= N - 2);
    } else {
        snprintf(name, sizeof name, "%s: every token kept", cfg.name);
        report_bool(name, nk == N);
    }

    /* --- (a), (e) statistics: r, kept, c of the valid tokens only, in token order --- */
    double *dxr = DALLOC(N * I), *dAr = DALLOC(R * I), *dBr = DALLOC(O * R), *dmagr = DALLOC(O);
    double *cir = DALLOC(N);
    ref_backward(&sp, &P, &ra, c.Rnd, dxr, dAr, dBr, dmagr, cir);
    {
        size_t nv = 0, kv = 0, k = 0;
        int r_ok = 1;
        float *cl = FALLOC(N);
        double *cw = DALLOC(N);
        for (size_t i = 0; i < N; i++) {
            if (c.valid && !c.valid[i]) continue;
            nv++;
            kv += S[i];
            if (k < L->stats.n) r_ok &= L->stats.r[k] == rr[i];
            if (k < L->stats.n_c) cl[k] = L->stats.c[k];
            cw[k++] = cir[i];
        }
        snprintf(name, sizeof name, "%s: stats n=%zu kept=%zu n_c=%zu (want n=n_c=%zu kept=%zu), r exact",
                 cfg.name, L->stats.n, L->stats.kept, L->stats.n_c, nv, kv);
        report_bool(name, L->stats.n == nv && L->stats.kept == kv && L->stats.n_c == nv && r_ok);
        snprintf(name, sizeof name, "%s: c_i pushed == <g_i, m_i> (double m), kept or not", cfg.name);
        report(name, L->stats.n_c == nv ? rel_err_d(cl, cw, nv) : INFINITY, TIGHT_TOL);
        tk_free(cl), tk_free(cw);
    }
    if (cfg.use_valid) {
        /* padding tokens are still gated and applied: their y rows equal b + S m of the reference */
        double e = 0.0;
        for (size_t i = 0; i < N; i++)
            if (!c.valid[i]) {
                double ei = rel_err_d(c.y + i * O, ra.y + i * O, O);
                e = ei > e ? ei : e;
            }
        snprintf(name, sizeof name, "%s: padding tokens still gated and applied (y rows)", cfg.name);
        report(name, e, TIGHT_TOL);
    }

    /* --- (b), (c), (d) analytic library gradients vs the dense double reference with the S mask --- */
    snprintf(name, sizeof name, "%s: dx vs double reference (S mask)", cfg.name);
    report(name, rel_err_d(dx, dxr, N * I), TIGHT_TOL);
    snprintf(name, sizeof name, "%s: dA vs double reference (S mask)", cfg.name);
    report(name, rel_err_d(dA, dAr, R * I), TIGHT_TOL);
    snprintf(name, sizeof name, "%s: dB vs double reference (S mask)", cfg.name);
    report(name, rel_err_d(dB, dBr, O * R), TIGHT_TOL);
    if (dora) {
        snprintf(name, sizeof name, "%s: dmag vs double reference (S mask)", cfg.name);
        report(name, rel_err_d(dmag, dmagr, O), TIGHT_TOL);
    }

    /* --- the reference's own formulas vs its double central differences (S held; DoRA: c held
     *     for A and B, free for mag and x, whose changes do not move the detached norm) --- */
    {
        ref_spec sf = sp;
        sf.Sforce = S;
        ref_acts rw;
        ref_acts_alloc(&rw, N, I, O, R);
        double *cfix = DALLOC(O);
        memcpy(cfix, ra.cc, O * sizeof(double));
        size_t nmax = N * I;
        if (R * I > nmax) nmax = R * I;
        if (O * R > nmax) nmax = O * R;
        double *num = DALLOC(nmax);
        double e = 0.0, ei;
        ref_numeric_grad(num, P.x, N * I, &sf, &P, &rw, c.Rnd);
        ei = rel_err_dd(dxr, num, N * I), e = ei > e ? ei : e;
        if (dora) sf.cfix = cfix;
        ref_numeric_grad(num, P.A, R * I, &sf, &P, &rw, c.Rnd);
        ei = rel_err_dd(dAr, num, R * I), e = ei > e ? ei : e;
        if (dora) { /* the library's dA against the c-held reference differences, directly */
            snprintf(name, sizeof name, "%s: dA vs double FD of reference with c held (detached norm)",
                     cfg.name);
            report(name, rel_err_d(dA, num, R * I), 1e-5);
        }
        ref_numeric_grad(num, P.B, O * R, &sf, &P, &rw, c.Rnd);
        ei = rel_err_dd(dBr, num, O * R), e = ei > e ? ei : e;
        if (dora) {
            snprintf(name, sizeof name, "%s: dB vs double FD of reference with c held (detached norm)",
                     cfg.name);
            report(name, rel_err_d(dB, num, O * R), 1e-5);
            sf.cfix = NULL;
            ref_numeric_grad(num, P.mag, O, &sf, &P, &rw, c.Rnd);
            ei = rel_err_dd(dmagr, num, O), e = ei > e ? ei : e;
        }
        snprintf(name, sizeof name, "%s: reference formulas vs reference double FD (all grads)", cfg.name);
        report(name, e, REF_FD_TOL);
        tk_free(num), tk_free(cfix);
        ref_acts_free(&rw);
    }

    /* --- (f) backward adds: a second call on the same activations doubles every gradient --- */
    {
        float *dx2 = FALLOC(N * I);
        memcpy(dx2, dx, N * I * sizeof(float));
        lib_backward(&c, N, dx2, c.Rnd, c.x, c.valid);
        snprintf(name, sizeof name, "%s: backward adds (dx twice)", cfg.name);
        check_adds(name, dx, dx2, N * I);
        snprintf(name, sizeof name, "%s: backward adds (dA twice)", cfg.name);
        check_adds(name, dA, L->dA, R * I);
        snprintf(name, sizeof name, "%s: backward adds (dB twice)", cfg.name);
        check_adds(name, dB, L->dB, O * R);
        if (dora) {
            snprintf(name, sizeof name, "%s: backward adds (dmag twice)", cfg.name);
            check_adds(name, dmag, L->dmag, O);
        }
        tk_free(dx2);
        tk_gate_stats_reset(&L->stats);
    }

    /* --- (g) backward_into writes dx: from NaN it gives the += result from zero, bit for bit --- */
    {
        float *dx3 = FALLOC(N * I);
        for (size_t i = 0; i < N * I; i++) dx3[i] = NAN;
        tk_err err = {{0}};
        if (tk_adapted_backward_into(L, &c.ws, dx3, c.Rnd, c.x, c.valid, N, &err)) {
            fprintf(stderr, "test_adapter_grad: backward_into failed: %s\n", err.msg);
            exit(1);
        }
        snprintf(name, sizeof name, "%s: backward_into writes dx (= the += result from zero)", cfg.name);
        report_bool(name, memcmp(dx3, dx, N * I * sizeof(float)) == 0);
        tk_free(dx3);
        tk_gate_stats_reset(&L->stats);
    }

    /* --- finite differences of the library forward with the gate held --- */
    c.S_hold = S;
    check_fd(&c, "dx", dx, c.x, N * I);
    if (!dora) {
        check_fd(&c, "dA", dA, L->A, R * I);
        check_fd(&c, "dB", dB, L->B, O * R);
    } else {
        check_fd(&c, "dmag", dmag, L->mag, O);
        /* The detached-norm checks above are discriminative only if differencing the library's
         * forward in A (whose row norm moves with A) gives something else than the defined dA. */
        int redone = 0, unresolved = 0;
        double *num = DALLOC(R * I);
        lib_numeric_grad(num, L->A, R * I, &c, &redone, &unresolved);
        double e = rel_err_d(dA, num, R * I);
        snprintf(name, sizeof name, "%s: FD of A through the moving norm differs from dA (%.2e)",
                 cfg.name, e);
        report_bool(name, unresolved == 0 && e > 10.0 * FD_TOL);
        tk_free(num);
    }
    c.S_hold = NULL;

    /* --- the flip detector itself: with tau == r_i0 (a kept token exactly at the threshold) any
     *     move of x_i0 that lowers r_i0 flips S_i0, even at the smallest retried step --- */
    if (cfg.gate == 1 && cfg.dropout == 0.0f && cfg.kind == TK_ADAPTER_LORA) {
        size_t i0 = 0;
        while (i0 < N && !S[i0]) i0++;
        float save = L->tau;
        L->tau = rr[i0];
        lib_forward(&c, N, c.x, c.valid, c.y, 0);
        uint8_t *S_tie = BALLOC(N);
        memcpy(S_tie, L->S, N);
        c.S_hold = S_tie;
        int redone = 0, unresolved = 0;
        double *num = DALLOC(N * I);
        lib_numeric_grad(num, c.x, N * I, &c, &redone, &unresolved);
        c.S_hold = NULL;
        L->tau = save;
        snprintf(name, sizeof name, "%s: flip detector: tau == r_i0 flips (%d redone, %d unresolved)",
                 cfg.name, redone, unresolved);
        report_bool(name, S_tie[i0] == 1 && redone > 0 && unresolved > 0);
        tk_free(num), tk_free(S_tie);
    }

    /* --- (c) the gathered path equals the fast path run on the kept rows alone --- */
    if (cfg.gate == 1 && cfg.dropout == 0.0f && nk > 0 && nk < N) {
        float *xk = FALLOC(nk * I), *gk = FALLOC(nk * O), *yk = FALLOC(nk * O), *dxk = FALLOC(nk * I);
        size_t k = 0;
        for (size_t i = 0; i < N; i++)
            if (S[i]) {
                memcpy(xk + k * I, c.x + i * I, I * sizeof(float));
                memcpy(gk + k * O, c.Rnd + i * O, O * sizeof(float));
                k++;
            }
        memset(L->dA, 0, R * I * sizeof(float));
        memset(L->dB, 0, O * R * sizeof(float));
        if (dora) memset(L->dmag, 0, O * sizeof(float));
        L->gated = 0; /* every one of the nk rows kept: the fast path */
        lib_forward(&c, nk, xk, NULL, yk, 1);
        lib_backward(&c, nk, dxk, gk, xk, NULL);
        L->gated = 1;
        tk_gate_stats_reset(&L->stats);
        double e = rel_err_f(dA, L->dA, R * I), ei;
        ei = rel_err_f(dB, L->dB, O * R), e = ei > e ? ei : e;
        if (dora) ei = rel_err_f(dmag, L->dmag, O), e = ei > e ? ei : e;
        k = 0;
        double edx = 0.0, eoff = 0.0;
        for (size_t i = 0; i < N; i++) {
            if (S[i]) {
                ei = rel_err_f(dx + i * I, dxk + k * I, I), edx = ei > edx ? ei : edx;
                k++;
            } else { /* gated off: only the base path, dy W0 */
                double want[16];
                for (size_t j = 0; j < I; j++) {
                    want[j] = 0.0;
                    for (size_t q = 0; q < O; q++) want[j] += (double)L->w0[q * I + j] * c.Rnd[i * O + q];
                }
                ei = rel_err_d(dx + i * I, want, I), eoff = ei > eoff ? ei : eoff;
            }
        }
        snprintf(name, sizeof name, "%s: gathered path == fast path on the kept rows (param grads)",
                 cfg.name);
        report(name, e, TIGHT_TOL);
        snprintf(name, sizeof name, "%s: gathered path == fast path on the kept rows (dx rows)", cfg.name);
        report(name, edx, TIGHT_TOL);
        snprintf(name, sizeof name, "%s: gated-off rows: dx == dy W0, nothing from the branch", cfg.name);
        report(name, eoff, TIGHT_TOL);
        tk_free(xk), tk_free(gk), tk_free(yk), tk_free(dxk);
    }

    /* --- the tie r_i == tau keeps the update; the next float above drops it --- */
    if (cfg.gate == 1 && cfg.dropout == 0.0f) {
        size_t i0 = 0;
        while (i0 < N && !S[i0]) i0++;
        float save = L->tau;
        L->tau = rr[i0];
        lib_forward(&c, N, c.x, NULL, c.y, 0);
        int keep = L->S[i0] == 1 && L->rr[i0] == rr[i0];
        L->tau = nextafterf(rr[i0], INFINITY);
        lib_forward(&c, N, c.x, NULL, c.y, 0);
        int drop = L->S[i0] == 0;
        L->tau = save;
        snprintf(name, sizeof name, "%s: tau == r_i keeps token i, nextafterf(r_i) drops it", cfg.name);
        report_bool(name, keep && drop);
    }

    /* --- dropout: train == 0 turns it off and records no statistics --- */
    if (cfg.dropout > 0.0f) {
        tk_gate_stats_reset(&L->stats);
        lib_forward(&c, N, c.x, c.valid, c.y, 0);
        ref_spec se = sp;
        se.keepx = NULL;
        ref_forward(&se, &P, &ra);
        snprintf(name, sizeof name, "%s: train=0: no dropout (y vs reference), no statistics", cfg.name);
        double e = rel_err_d(c.y, ra.y, N * O);
        report(name, L->stats.n == 0 ? e : INFINITY, TIGHT_TOL);
    }

    tk_free(rs), tk_free(S), tk_free(rr), tk_free(dx), tk_free(dA), tk_free(dB), tk_free(dmag);
    tk_free(dxr), tk_free(dAr), tk_free(dBr), tk_free(dmagr), tk_free(cir);
    tk_free(P.x), tk_free(P.w0), tk_free(P.A), tk_free(P.B), tk_free(P.mag);
    ref_acts_free(&ra);
    tk_free(c.x), tk_free(c.Rnd), tk_free(c.y), tk_free(c.valid);
    tk_free(L->w0), tk_free(L->A), tk_free(L->dA), tk_free(L->B), tk_free(L->dB);
    tk_free(L->mag), tk_free(L->dmag);
    tk_adapted_free(L);
    tk_adapter_ws_free(&c.ws);
}

/* ---- dropout rate ----------------------------------------------------------------------------- */

/* 500 tokens x 6 inputs = 3000 draws at p = 0.3: the kept fraction must be 0.7 within 0.03 (3.6
 * standard deviations of a binomial; the seed is fixed, so this is deterministic), the mask must
 * agree with xd, and two forwards from the same seed must draw the same mask. */
static void test_dropout_rate(void) {
    const size_t N = 500, I = 6, O = 5, R = 3;
    actx c = {.N = N, .I = I, .O = O, .R = R, .seed = 0xd20bull};
    tk_adapted_linear *L = &c.L;
    L->kind = TK_ADAPTER_LORA, L->in = I, L->out = O, L->r = R, L->scale = 1.0f, L->dropout = 0.3f;
    L->w0 = FALLOC(O * I), L->A = FALLOC(R * I), L->dA = FALLOC(R * I);
    L->B = FALLOC(O * R), L->dB = FALLOC(O * R);
    c.x = FALLOC(N * I), c.y = FALLOC(N * O);
    fill(c.x, N * I, -1, 1), fill(L->w0, O * I, -1, 1), fill(L->A, R * I, -1, 1), fill(L->B, O * R, -1, 1);
    tk_err err = {{0}};
    if (tk_adapted_alloc(L, N, &err) || tk_adapter_ws_alloc(&c.ws, N, I, R, 0, &err)) {
        fprintf(stderr, "test_adapter_grad: %s\n", err.msg);
        exit(1);
    }
    lib_forward(&c, N, c.x, NULL, c.y, 1);
    size_t kept = 0, bad = 0;
    uint8_t *k1 = BALLOC(N * I);
    memcpy(k1, L->keepx, N * I);
    for (size_t j = 0; j < N * I; j++) {
        kept += L->keepx[j];
        if (L->xd[j] != (L->keepx[j] ? c.x[j] * (1.0f / (1.0f - L->dropout)) : 0.0f)) bad++;
    }
    lib_forward(&c, N, c.x, NULL, c.y, 1);
    double frac = (double)kept / (double)(N * I);
    char name[160];
    snprintf(name, sizeof name, "dropout p=0.3: kept fraction %.4f of %zu draws vs 0.7", frac, N * I);
    report(name, fabs(frac - 0.7), 0.03);
    report_bool("dropout p=0.3: xd == x * keep / (1-p); same seed, same mask",
                bad == 0 && memcmp(k1, L->keepx, N * I) == 0);
    tk_free(k1), tk_free(c.x), tk_free(c.y);
    tk_free(L->w0), tk_free(L->A), tk_free(L->dA), tk_free(L->B), tk_free(L->dB);
    tk_adapted_free(L);
    tk_adapter_ws_free(&c.ws);
}

/* ---- the fused LoRA forward at many rows --------------------------------------------------------- */

/* From 16 rows on, with the AVX-512 kernel, the LoRA forward runs m's product on B^T (copied once
 * per call) in lanes of 64-row chunks; the cases above (7 rows) read B transposed through cblas.
 * 150 rows (4 lanes, chunks and a partial chunk), widths off the 16-float vectors, tau at the median
 * r so that half the rows are gated off: y, r and S against the double reference; then B = 0
 * (LoRA's initial state): r = 0 exactly and every row y = b. */
static void test_many_rows(void) {
    const size_t N = 150, I = 40, O = 70, R = 5;
    char name[192];
    actx c = {.N = N, .I = I, .O = O, .R = R, .seed = 0xf05eull};
    tk_adapted_linear *L = &c.L;
    L->kind = TK_ADAPTER_LORA, L->gated = 1, L->in = I, L->out = O, L->r = R, L->scale = 2.0f / (float)R;
    L->w0 = FALLOC(O * I), L->A = FALLOC(R * I), L->dA = FALLOC(R * I);
    L->B = FALLOC(O * R), L->dB = FALLOC(O * R);
    c.x = FALLOC(N * I), c.y = FALLOC(N * O);
    fill(c.x, N * I, -1, 1), fill(L->w0, O * I, -0.6f, 0.6f), fill(L->A, R * I, -0.8f, 0.8f);
    fill(L->B, O * R, -0.8f, 0.8f);
    for (size_t i = 0; i < N; i++) /* spread r over the rows */
        for (size_t j = 0; j < I; j++) c.x[i * I + j] *= 0.2f + 0.02f * (float)((i * 37) % N);
    tk_err err = {{0}};
    if (tk_adapted_alloc(L, N, &err) || tk_adapter_ws_alloc(&c.ws, N, I > O ? I : O, R, 0, &err)) {
        fprintf(stderr, "test_adapter_grad: %s\n", err.msg);
        exit(1);
    }
    printf("LoRA forward, %zu rows (kernel: %s)\n", N, tk_gemm_small_avx512() ? "avx512" : "blas");
    L->tau = 0.0f;
    lib_forward(&c, N, c.x, NULL, c.y, 0);
    float *rs = FALLOC(N);
    memcpy(rs, L->rr, N * sizeof(float));
    qsort(rs, N, sizeof(float), cmp_float);
    L->tau = 0.5f * (rs[N / 2 - 1] + rs[N / 2]);
    lib_forward(&c, N, c.x, NULL, c.y, 0);

    ref_spec sp = {.N = N, .I = I, .O = O, .R = R, .kind = TK_ADAPTER_LORA, .s = L->scale, .gated = 1,
                   .tau = L->tau};
    ref_params P = {DALLOC(N * I), DALLOC(O * I), DALLOC(R * I), DALLOC(O * R), DALLOC(O)};
    to_double(P.x, c.x, N * I), to_double(P.w0, L->w0, O * I), to_double(P.A, L->A, R * I);
    to_double(P.B, L->B, O * R);
    ref_acts ra;
    ref_acts_alloc(&ra, N, I, O, R);
    ref_forward(&sp, &P, &ra);
    double rerr = 0.0;
    size_t nk = 0, s_bad = 0;
    for (size_t i = 0; i < N; i++) {
        double e = isfinite(L->rr[i]) ? fabs((double)L->rr[i] - ra.r[i]) / ra.r[i] : INFINITY;
        rerr = e > rerr ? e : rerr;
        nk += L->S[i];
        s_bad += L->S[i] != (L->rr[i] >= L->tau) || L->S[i] != ra.S[i];
    }
    report("many rows: r_i vs ||m_i||/max(||b_i||,1e-6) (double), per token rel", rerr, 1e-5);
    snprintf(name, sizeof name, "many rows: S_i == [r_i >= tau] == reference S (%zu of %zu kept)", nk, N);
    report_bool(name, s_bad == 0 && nk > N / 4 && nk < 3 * N / 4);
    report("many rows: y = b + S m vs double reference", rel_err_d(c.y, ra.y, N * O), TIGHT_TOL);

    memset(L->B, 0, O * R * sizeof(float)); /* LoRA's initial B */
    L->tau = 1e-3f;
    lib_forward(&c, N, c.x, NULL, c.y, 0);
    int zero = 1;
    for (size_t i = 0; i < N; i++) zero &= L->rr[i] == 0.0f && L->S[i] == 0;
    float *b = FALLOC(N * O);
    tk_linear_forward(b, c.x, L->w0, N, I, O, 0.0f);
    report_bool("many rows, B = 0: r = 0 exactly, every row gated off, y == W0 x bitwise",
                zero && memcmp(b, c.y, N * O * sizeof(float)) == 0);

    tk_free(b), tk_free(rs);
    tk_free(P.x), tk_free(P.w0), tk_free(P.A), tk_free(P.B), tk_free(P.mag);
    ref_acts_free(&ra);
    tk_free(c.x), tk_free(c.y);
    tk_free(L->w0), tk_free(L->A), tk_free(L->dA), tk_free(L->B), tk_free(L->dB);
    tk_adapted_free(L);
    tk_adapter_ws_free(&c.ws);
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

int main(void) {
    tk_set_threads(2);
    double t0 = tk_time();
    test_checker_detects_error();

    static const case_cfg cases[] = {
        {"lora gated", TK_ADAPTER_LORA, TK_ACT_RELU, 1, 0.0f, 1},
        {"lora gated tau=0 (fast path)", TK_ADAPTER_LORA, TK_ACT_RELU, 2, 0.0f, 0},
        {"lora ungated", TK_ADAPTER_LORA, TK_ACT_RELU, 0, 0.0f, 0},
        {"lora gated dropout 0.3", TK_ADAPTER_LORA, TK_ACT_RELU, 1, 0.3f, 1},
        {"lora ungated dropout 0.3", TK_ADAPTER_LORA, TK_ACT_RELU, 0, 0.3f, 0},
        {"dora gated", TK_ADAPTER_DORA, TK_ACT_RELU, 1, 0.0f, 1},
        {"dora gated tau=0 (all kept)", TK_ADAPTER_DORA, TK_ACT_RELU, 2, 0.0f, 0},
        {"dora ungated", TK_ADAPTER_DORA, TK_ACT_RELU, 0, 0.0f, 0},
        {"dora gated dropout 0.3", TK_ADAPTER_DORA, TK_ACT_RELU, 1, 0.3f, 1},
        {"bottleneck tanh gated", TK_ADAPTER_BOTTLENECK, TK_ACT_TANH, 1, 0.0f, 1},
        {"bottleneck tanh gated tau=0 (fast path)", TK_ADAPTER_BOTTLENECK, TK_ACT_TANH, 2, 0.0f, 0},
        {"bottleneck tanh ungated", TK_ADAPTER_BOTTLENECK, TK_ACT_TANH, 0, 0.0f, 0},
        {"bottleneck tanh gated dropout 0.3", TK_ADAPTER_BOTTLENECK, TK_ACT_TANH, 1, 0.3f, 1},
        {"bottleneck relu gated", TK_ADAPTER_BOTTLENECK, TK_ACT_RELU, 1, 0.0f, 1},
        {"bottleneck relu ungated", TK_ADAPTER_BOTTLENECK, TK_ACT_RELU, 0, 0.0f, 0},
        {"bottleneck relu gated dropout 0.3", TK_ADAPTER_BOTTLENECK, TK_ACT_RELU, 1, 0.3f, 1},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) run_case(cases[k]);
    test_dropout_rate();
    test_many_rows();

    printf("test_adapter_grad: %d failure(s), %.2f s\n", g_failures, tk_time() - t0);
    return g_failures ? 1 : 0;
}
