/* test_adalora.c: AdaLoRA's adapted linear (src/peft/adapter.c, kind TK_ADAPTER_ADALORA) and its
 * training machinery (src/peft/adalora.c) against finite differences and double references.
 *
 *   m_i = s B (E . A) x_i,  s = alpha / (init_r + 1e-5)   (PEFT: scaling / (ranknum + 1e-5))
 *   y_i = W0 x_i + S_i m_i,  S_i = [r_i >= tau] (1 when ungated),  L = sum(y . G)  (so dL/dy = G)
 *   R_orth = (1 / 2M) sum ( ||A A^T - I||_F + ||B^T B - I||_F )
 *
 * Checked: y and r against a double reference; dx, dA, dB, dE against central differences of the
 * fp32 forward (the gate held: a perturbation that flips a decision fails the check), with the gate
 * off and on (tau in the widest gap of the r values, some tokens off); c_i = <G_i, m_i>; the backward
 * adds; the scale's ranknum term; the regulariser's value against a double reference and its gradient
 * against central differences; the budget schedule against hand-computed values of PEFT's formula;
 * one masking step: the number of masked triplets, lora_E zeroed there, the pattern in the config,
 * and the final phase re-applying it. Exits 1 on failure.
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
#include "peft/adalora.h"
#include "peft/adapter.h"
#include "peft/peft_config.h"

#define TEST_NAME "test_adalora"
#define TEST_SEED 0x13198a2e03707344ull
#define TEST_COL 64
#include "test_util.h"

#define N_TOK 24
#define IN 10
#define OUT 7
#define RANK 4

static double max_rel(const double *a, const double *ref, size_t n) {
    double md = 0.0, mr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        double d = fabs(a[i] - ref[i]);
        md = d > md ? d : md;
        mr = fabs(ref[i]) > mr ? fabs(ref[i]) : mr;
    }
    return md / (mr > 1e-3 ? mr : 1e-3);
}

typedef struct {
    tk_adapted_linear L;
    tk_adapter_ws ws;
    float *w0, *A, *B, *E, *dA, *dB, *dE, *x, *G, *y, *dx;
} layer;

static void layer_init(layer *t, int gated, float tau) {
    memset(t, 0, sizeof *t);
    t->w0 = falloc(OUT * IN), t->A = falloc(RANK * IN), t->B = falloc(OUT * RANK), t->E = falloc(RANK);
    t->dA = falloc(RANK * IN), t->dB = falloc(OUT * RANK), t->dE = falloc(RANK);
    t->x = falloc(N_TOK * IN), t->G = falloc(N_TOK * OUT), t->y = falloc(N_TOK * OUT), t->dx = falloc(N_TOK * IN);
    fill(t->w0, OUT * IN, -0.5f, 0.5f);
    fill(t->A, RANK * IN, -0.6f, 0.6f);
    fill(t->B, OUT * RANK, -0.6f, 0.6f);
    fill(t->E, RANK, -1.0f, 1.0f);
    fill(t->x, N_TOK * IN, -1.0f, 1.0f);
    fill(t->G, N_TOK * OUT, -1.0f, 1.0f);
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_ADALORA;
    pc.r = RANK;
    pc.alpha = 3.0f;
    tk_adapted_linear *L = &t->L;
    L->kind = TK_ADAPTER_ADALORA;
    L->gated = gated;
    L->tau = tau;
    L->in = IN, L->out = OUT, L->r = RANK;
    L->scale = tk_peft_scale(&pc);
    L->w0 = t->w0, L->A = t->A, L->B = t->B, L->E = t->E, L->dA = t->dA, L->dB = t->dB, L->dE = t->dE;
    tk_err err = {0};
    if (tk_adapted_alloc(L, N_TOK, &err) || tk_adapter_ws_alloc(&t->ws, N_TOK, IN > OUT ? IN : OUT, RANK, 0, &err)) {
        fprintf(stderr, "%s: %s\n", TEST_NAME, err.msg);
        exit(1);
    }
}

static void layer_free(layer *t) {
    tk_adapted_free(&t->L);
    tk_adapter_ws_free(&t->ws);
    float *f[] = {t->w0, t->A, t->B, t->E, t->dA, t->dB, t->dE, t->x, t->G, t->y, t->dx};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) tk_free(f[i]);
}

/* L = sum(y . G) in double, after a forward (train: statistics recorded). S copied to Sout. */
static double loss_of(layer *t, uint8_t *Sout, int train) {
    tk_err err = {0};
    tk_gate_stats_reset(&t->L.stats);
    if (tk_adapted_forward(&t->L, &t->ws, t->y, t->x, NULL, N_TOK, train, NULL, &err)) exit(1);
    double s = 0.0;
    for (size_t j = 0; j < N_TOK * OUT; j++) s += (double)t->y[j] * t->G[j];
    if (Sout) memcpy(Sout, t->L.S, N_TOK);
    return s;
}

/* Central differences of loss_of in each element of p [n] (eps relative to 1e-3), the gate held. */
static double fd_check(layer *t, float *p, const float *grad, size_t n, const uint8_t *S0, int *flips) {
    double *fd = dalloc(n), *g = dalloc(n);
    uint8_t S[N_TOK];
    for (size_t j = 0; j < n; j++) {
        float keep = p[j], eps = 1e-3f;
        p[j] = keep + eps;
        double lp = loss_of(t, S, 0);
        *flips += memcmp(S, S0, N_TOK) != 0;
        p[j] = keep - eps;
        double lm = loss_of(t, S, 0);
        *flips += memcmp(S, S0, N_TOK) != 0;
        p[j] = keep;
        fd[j] = (lp - lm) / (2.0 * eps);
        g[j] = grad[j];
    }
    double e = max_rel(g, fd, n);
    tk_free(fd);
    tk_free(g);
    return e;
}

static void check_layer(int gated) {
    layer t;
    layer_init(&t, 0, 0.0f);
    /* tau: the middle of the widest gap between adjacent sorted r (two tokens on each side at least) */
    float tau = 0.0f;
    if (gated) {
        loss_of(&t, NULL, 0);
        float r[N_TOK];
        memcpy(r, t.L.rr, sizeof r);
        for (int i = 1; i < N_TOK; i++)
            for (int j = i; j > 0 && r[j - 1] > r[j]; j--) {
                float q = r[j];
                r[j] = r[j - 1];
                r[j - 1] = q;
            }
        float best = 0.0f;
        for (int i = 2; i < N_TOK - 2; i++)
            if ((r[i + 1] - r[i]) / r[i + 1] > best) best = (r[i + 1] - r[i]) / r[i + 1], tau = 0.5f * (r[i] + r[i + 1]);
        t.L.gated = 1;
        t.L.tau = tau;
    }
    const char *tag = gated ? "gated" : "dense";
    char nm[128];
    /* forward against the double reference: m = s B (E . A) x, s = alpha / (init_r + 1e-5) */
    uint8_t S0[N_TOK];
    tk_err err = {0};
    double L0 = loss_of(&t, S0, 1);
    (void)L0;
    double s = 3.0 / ((double)(float)((float)RANK + 1e-5f));
    double *yref = dalloc(N_TOK * OUT), *ygot = dalloc(N_TOK * OUT), *cref = dalloc(N_TOK), *cgot = dalloc(N_TOK);
    int nkept = 0, sbad = 0;
    for (size_t i = 0; i < N_TOK; i++) {
        double m[OUT], b[OUT], nm2 = 0.0, nb2 = 0.0;
        for (size_t o = 0; o < OUT; o++) {
            double bb = 0.0, mm = 0.0;
            for (size_t k = 0; k < IN; k++) bb += (double)t.w0[o * IN + k] * t.x[i * IN + k];
            for (size_t j = 0; j < RANK; j++) {
                double u = 0.0;
                for (size_t k = 0; k < IN; k++) u += (double)t.E[j] * t.A[j * IN + k] * t.x[i * IN + k];
                mm += (double)t.B[o * RANK + j] * u;
            }
            m[o] = s * mm, b[o] = bb;
            nm2 += m[o] * m[o], nb2 += bb * bb;
        }
        double r = sqrt(nm2) / (sqrt(nb2) > 1e-6 ? sqrt(nb2) : 1e-6);
        int keep = !gated || r >= tau;
        sbad += keep != S0[i];
        nkept += keep;
        cref[i] = 0.0;
        for (size_t o = 0; o < OUT; o++) {
            yref[i * OUT + o] = b[o] + (keep ? m[o] : 0.0);
            ygot[i * OUT + o] = t.y[i * OUT + o];
            cref[i] += (double)t.G[i * OUT + o] * m[o];
        }
    }
    snprintf(nm, sizeof nm, "%s: y = W0 x + S s B (E . A) x (double reference)", tag);
    report(nm, max_rel(ygot, yref, N_TOK * OUT), 1e-5);
    snprintf(nm, sizeof nm, "%s: gate decisions equal the reference's (%d of %d kept)", tag, nkept, N_TOK);
    report_bool(nm, sbad == 0 && (!gated || (nkept > 2 && nkept < N_TOK - 2)));
    /* backward */
    if (tk_adapted_backward(&t.L, &t.ws, t.dx, t.G, t.x, NULL, N_TOK, &err)) exit(1);
    for (size_t i = 0; i < N_TOK; i++) cgot[i] = t.L.stats.c[i];
    snprintf(nm, sizeof nm, "%s: c_i = <G_i, m_i> for every token", tag);
    report(nm, max_rel(cgot, cref, N_TOK), 1e-5);
    float *dA1 = falloc(RANK * IN), *dE1 = falloc(RANK), *dB1 = falloc(OUT * RANK), *dx1 = falloc(N_TOK * IN);
    memcpy(dA1, t.dA, RANK * IN * sizeof(float));
    memcpy(dB1, t.dB, OUT * RANK * sizeof(float));
    memcpy(dE1, t.dE, RANK * sizeof(float));
    memcpy(dx1, t.dx, N_TOK * IN * sizeof(float));
    int flips = 0;
    snprintf(nm, sizeof nm, "%s: dx vs central differences", tag);
    report(nm, fd_check(&t, t.x, dx1, N_TOK * IN, S0, &flips), 5e-3);
    snprintf(nm, sizeof nm, "%s: d lora_A vs central differences", tag);
    report(nm, fd_check(&t, t.A, dA1, RANK * IN, S0, &flips), 5e-3);
    snprintf(nm, sizeof nm, "%s: d lora_B vs central differences", tag);
    report(nm, fd_check(&t, t.B, dB1, OUT * RANK, S0, &flips), 5e-3);
    snprintf(nm, sizeof nm, "%s: d lora_E vs central differences", tag);
    report(nm, fd_check(&t, t.E, dE1, RANK, S0, &flips), 5e-3);
    snprintf(nm, sizeof nm, "%s: no perturbation flipped a gate decision", tag);
    report_bool(nm, flips == 0);
    /* every backward adds */
    loss_of(&t, NULL, 1);
    if (tk_adapted_backward(&t.L, &t.ws, t.dx, t.G, t.x, NULL, N_TOK, &err)) exit(1);
    double md = 0.0;
    for (size_t j = 0; j < RANK; j++) md = fmax(md, fabs(t.dE[j] - 2.0 * dE1[j]));
    for (size_t j = 0; j < RANK * IN; j++) md = fmax(md, fabs(t.dA[j] - 2.0 * dA1[j]));
    snprintf(nm, sizeof nm, "%s: a second backward adds into dA and dE", tag);
    report(nm, md, 1e-5);
    tk_free(dA1), tk_free(dB1), tk_free(dE1), tk_free(dx1);
    tk_free(yref), tk_free(ygot), tk_free(cref), tk_free(cgot);
    layer_free(&t);
}

/* ---- the orthogonal regulariser --------------------------------------------------------------- */

static double orth_ref(tk_adapted_linear *const *m, size_t n) {
    double sum = 0.0;
    for (size_t q = 0; q < n; q++) {
        const tk_adapted_linear *L = m[q];
        size_t R = L->r, I = L->in, O = L->out;
        double fa = 0.0, fb = 0.0;
        for (size_t i = 0; i < R; i++)
            for (size_t j = 0; j < R; j++) {
                double pa = 0.0, pb = 0.0;
                for (size_t k = 0; k < I; k++) pa += (double)L->A[i * I + k] * L->A[j * I + k];
                for (size_t o = 0; o < O; o++) pb += (double)L->B[o * R + i] * L->B[o * R + j];
                pa -= i == j, pb -= i == j;
                fa += pa * pa, fb += pb * pb;
            }
        sum += sqrt(fa) + sqrt(fb);
    }
    return sum / (double)(2 * n);
}

static void check_orth(void) {
    layer t[2];
    layer_init(&t[0], 0, 0.0f);
    layer_init(&t[1], 0, 0.0f);
    tk_adapted_linear *mods[2] = {&t[0].L, &t[1].L};
    int lay[2] = {0, 1}, proj[2] = {0, 0};
    tk_adalora_config cfg = {.init_r = RANK, .target_r = 2, .delta_t = 1, .total_step = 10, .beta1 = 0.85f, .beta2 = 0.85f};
    tk_err err = {0};
    tk_adalora *a = tk_adalora_new(&cfg, mods, lay, proj, 2, &err);
    if (!a) exit(1);
    float w = 0.7f;
    float *gA[2] = {t[0].dA, t[1].dA}, *gB[2] = {t[0].dB, t[1].dB};
    double R0 = tk_adalora_orth(a, w, gA, gB);
    double want = orth_ref(mods, 2);
    report("orth: R = (1/2M) sum ||AA^T - I||_F + ||B^TB - I||_F (double ref)", fabs(R0 - want) / want, 1e-5);
    float *gAc = falloc(RANK * IN), *gBc = falloc(OUT * RANK);
    memcpy(gAc, t[1].dA, RANK * IN * sizeof(float));
    memcpy(gBc, t[1].dB, OUT * RANK * sizeof(float));
    double *fd = dalloc(RANK * IN + OUT * RANK), *g = dalloc(RANK * IN + OUT * RANK);
    size_t q = 0;
    float *ps[2] = {t[1].A, t[1].B};
    const float *gs[2] = {gAc, gBc};
    size_t ns[2] = {RANK * IN, OUT * RANK};
    for (int k = 0; k < 2; k++)
        for (size_t j = 0; j < ns[k]; j++, q++) {
            float keep = ps[k][j], eps = 1e-3f;
            ps[k][j] = keep + eps;
            double fp = orth_ref(mods, 2);
            ps[k][j] = keep - eps;
            double fm = orth_ref(mods, 2);
            ps[k][j] = keep;
            fd[q] = w * (fp - fm) / (2.0 * eps);
            g[q] = gs[k][j];
        }
    report("orth: w dR/dA, w dR/dB vs central differences", max_rel(g, fd, q), 1e-4);
    /* an orthonormal A (rows of the identity) and B (columns of the identity) contribute 0 and no gradient */
    for (int k = 0; k < 2; k++) {
        memset(t[k].A, 0, RANK * IN * sizeof(float));
        memset(t[k].B, 0, OUT * RANK * sizeof(float));
        memset(t[k].dA, 0, RANK * IN * sizeof(float));
        for (size_t j = 0; j < RANK; j++) t[k].A[j * IN + j] = 1.0f, t[k].B[j * RANK + j] = 1.0f;
    }
    double Rz = tk_adalora_orth(a, w, gA, gB);
    double gz = 0.0;
    for (size_t j = 0; j < RANK * IN; j++) gz = fmax(gz, fabs(t[0].dA[j]));
    report("orth: orthonormal A and B give R = 0 and a zero gradient", fabs(Rz) + gz, 0.0);
    tk_free(gAc), tk_free(gBc), tk_free(fd), tk_free(g);
    tk_adalora_free(a);
    layer_free(&t[0]);
    layer_free(&t[1]);
}

/* ---- the budget schedule and one masking step ------------------------------------------------- */

static void check_allocator(void) {
    enum { M = 4 };
    layer t[M];
    tk_adapted_linear *mods[M];
    int lay[M], proj[M];
    for (int k = 0; k < M; k++) {
        layer_init(&t[k], 0, 0.0f);
        mods[k] = &t[k].L;
        lay[k] = k / 2, proj[k] = k % 2 ? TK_PROJ_V : TK_PROJ_Q;
    }
    /* init_bgt 16, target_bgt 8; tinit 2, tfinal 3, T 20: the cubic phase is t = 3..16, t = 17 forced */
    tk_adalora_config cfg = {.init_r = RANK, .target_r = 2, .tinit = 2, .tfinal = 3, .delta_t = 2, .total_step = 20,
                             .beta1 = 0.85f, .beta2 = 0.85f};
    tk_err err = {0};
    tk_adalora *a = tk_adalora_new(&cfg, mods, lay, proj, M, &err);
    if (!a) exit(1);
    /* PEFT: int((16 - 8) * (1 - (t - 2) / 15)^3 + 8): t=3 (14/15)^3*8 = 6.50 -> 14; t=10: 8*(7/15)^3 = 0.81 -> 8 */
    static const struct { int t; long b; int mask; } want[] = {
        {0, 16, 0}, {2, 16, 0}, {3, 14, 0}, {4, 13, 1}, {10, 8, 1}, {11, 8, 0}, {17, 8, 0}, {18, 8, 1}, {19, 8, 1}};
    int bad = 0;
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int mk = -1;
        long b = tk_adalora_budget(a, want[i].t, &mk);
        if (b != want[i].b || mk != want[i].mask) {
            printf("  budget(%d) = %ld mask %d, want %ld mask %d\n", want[i].t, b, mk, want[i].b, want[i].mask);
            bad++;
        }
    }
    report_bool("schedule: budget and masking steps equal PEFT's formula (hand values)", bad == 0);
    /* gradients as if after a backward; t = 4 masks 16 - 13 = 3 triplets */
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_ADALORA;
    pc.r = RANK;
    for (int k = 0; k < M; k++) {
        fill(t[k].dA, RANK * IN, -1.0f, 1.0f);
        fill(t[k].dB, OUT * RANK, -1.0f, 1.0f);
        fill(t[k].dE, RANK, -1.0f, 1.0f);
    }
    if (tk_adalora_update(a, 4, &pc, &err)) exit(1);
    int masked = 0, zero_ok = 1, pattern_ok = pc.ada.n_rank == M;
    for (int k = 0; k < M; k++) {
        const tk_rank_entry *e = tk_peft_rank_find(&pc, lay[k], proj[k]);
        for (int j = 0; j < RANK; j++) {
            masked += !a->mod[k].keep[j];
            if (!a->mod[k].keep[j] && t[k].E[j] != 0.0f) zero_ok = 0;
            if (a->mod[k].keep[j] && t[k].E[j] == 0.0f) zero_ok = 0;
            if (!e || tk_rank_kept(e, j) != a->mod[k].keep[j]) pattern_ok = 0;
        }
    }
    report_bool("mask: init_bgt - budget = 3 triplets masked at t = 4", masked == 3 && a->masked);
    report_bool("mask: lora_E zero exactly at the masked triplets", zero_ok);
    report_bool("mask: the pattern is the config's rank_pattern", pattern_ok);
    /* the lowest scores are the masked ones */
    float hi_masked = -INFINITY, lo_kept = INFINITY;
    for (int k = 0; k < M; k++)
        for (int j = 0; j < RANK; j++) {
            float s = a->mod[k].score[j];
            if (a->mod[k].keep[j]) lo_kept = fminf(lo_kept, s);
            else hi_masked = fmaxf(hi_masked, s);
        }
    report_bool("mask: every masked score is below every kept one", hi_masked < lo_kept);
    /* t = 17 = T - tfinal: the final budget (8) forced, scores cleared; t = 18 re-applies it */
    if (tk_adalora_update(a, 17, &pc, &err)) exit(1);
    int kept = 0;
    for (int k = 0; k < M; k++)
        for (int j = 0; j < RANK; j++) kept += a->mod[k].keep[j];
    report_bool("final: t = T - tfinal keeps target_bgt = 8 triplets, scores cleared",
                kept == 8 && a->mod[0].ipt_a[0] == 0.0f && a->final_set);
    for (int k = 0; k < M; k++) fill(t[k].E, RANK, 0.5f, 1.0f);
    if (tk_adalora_update(a, 18, &pc, &err)) exit(1);
    int reapplied = 1;
    for (int k = 0; k < M; k++)
        for (int j = 0; j < RANK; j++)
            if ((t[k].E[j] == 0.0f) != !a->mod[k].keep[j]) reapplied = 0;
    report_bool("final: after it, every step zeroes lora_E by the final pattern", reapplied);
    /* the schedule check */
    tk_adalora_config bad_cfg = cfg;
    bad_cfg.tinit = 10, bad_cfg.tfinal = 10;
    report_bool("schedule: tinit + tfinal >= total_step is refused", tk_adalora_check_schedule(&bad_cfg, &err) != 0);
    bad_cfg = cfg;
    bad_cfg.target_r = RANK + 1;
    report_bool("schedule: target_r > init_r is refused", tk_adalora_check_schedule(&bad_cfg, &err) != 0);
    tk_peft_config_free(&pc);
    tk_adalora_free(a);
    for (int k = 0; k < M; k++) layer_free(&t[k]);
}

int main(void) {
    tk_set_threads(1);
    check_layer(0);
    check_layer(1);
    check_orth();
    check_allocator();
    printf("%s: %s\n", TEST_NAME, g_failures ? "FAILED" : "all ok");
    return g_failures ? 1 : 0;
}
