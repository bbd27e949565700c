/* adalora.c: AdaLoRA's orthogonal regulariser and rank allocator. Formulas in adalora.h.
 *
 * Shapes: M modules; per module R rank (init_r), I input width, O output width.
 */
#include "adalora.h"

#include "../ops/blas.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

tk_adalora *tk_adalora_new(const tk_adalora_config *cfg, tk_adapted_linear *const *mods, const int *layer,
                           const int *proj, size_t n, tk_err *err) {
    tk_adalora *a = calloc(1, sizeof *a);
    if (!a || !(a->mod = calloc(n ? n : 1, sizeof *a->mod))) {
        free(a);
        tk_fail(err, "out of memory for the AdaLoRA allocator");
        return NULL;
    }
    a->cfg = *cfg;
    a->cfg.rank = NULL;
    a->cfg.n_rank = 0;
    a->n = n;
    for (size_t i = 0; i < n; i++) {
        tk_adalora_module *m = &a->mod[i];
        tk_adapted_linear *L = mods[i];
        TK_ASSERT(L->kind == TK_ADAPTER_ADALORA);
        size_t R = L->r, nA = R * L->in, nB = L->out * R;
        m->L = L;
        m->layer = layer[i];
        m->proj = proj[i];
        m->ipt_a = tk_calloc(nA, sizeof(float));
        m->unc_a = tk_calloc(nA, sizeof(float));
        m->ipt_b = tk_calloc(nB, sizeof(float));
        m->unc_b = tk_calloc(nB, sizeof(float));
        m->ipt_e = tk_calloc(R, sizeof(float));
        m->unc_e = tk_calloc(R, sizeof(float));
        m->score = tk_calloc(R, sizeof(float));
        m->keep = tk_calloc(R, 1);
        if (!m->ipt_a || !m->unc_a || !m->ipt_b || !m->unc_b || !m->ipt_e || !m->unc_e || !m->score || !m->keep) {
            tk_adalora_free(a);
            tk_fail(err, "out of memory for the AdaLoRA allocator");
            return NULL;
        }
        memset(m->keep, 1, R);
        a->init_bgt += (long)R;
    }
    a->target_bgt = (long)cfg->target_r * (long)n;
    a->budget = a->init_bgt;
    return a;
}

void tk_adalora_free(tk_adalora *a) {
    if (!a) return;
    for (size_t i = 0; i < a->n; i++) {
        tk_adalora_module *m = &a->mod[i];
        tk_free(m->ipt_a);
        tk_free(m->unc_a);
        tk_free(m->ipt_b);
        tk_free(m->unc_b);
        tk_free(m->ipt_e);
        tk_free(m->unc_e);
        tk_free(m->score);
        tk_free(m->keep);
    }
    free(a->mod);
    free(a);
}

/* ---- the orthogonal regulariser ----------------------------------------------------------------- */

/* f = ||P - I||_F for P [R,R] (in place: P becomes P - I). */
static double minus_eye_norm(float *P, size_t R) {
    double ss = 0.0;
    for (size_t j = 0; j < R; j++) P[j * R + j] -= 1.0f;
    for (size_t j = 0; j < R * R; j++) ss += (double)P[j] * P[j];
    return sqrt(ss);
}

double tk_adalora_orth(const tk_adalora *a, float w, float *const *gA, float *const *gB) {
    if (a->n == 0) return 0.0;
    size_t rmax = 1;
    for (size_t i = 0; i < a->n; i++)
        if (a->mod[i].L->r > rmax) rmax = a->mod[i].L->r;
    float *P = tk_calloc(rmax * rmax, sizeof(float));
    TK_ASSERT(P); /* R x R floats, R <= TK_ADALORA_MAX_R */
    const float c = w / (float)(2 * a->n); /* w / num_param: every A and every B counts */
    double sum = 0.0;
    for (size_t i = 0; i < a->n; i++) {
        const tk_adapted_linear *L = a->mod[i].L;
        int R = (int)L->r, I = (int)L->in, O = (int)L->out;
        /* A: P = A A^T, f = ||P - I||_F;  df/dA = 2 (P - I) A / f */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, R, I, 1.0f, L->A, I, L->A, I, 0.0f, P, R);
        double f = minus_eye_norm(P, (size_t)R);
        sum += f;
        if (gA && f > 0.0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, I, R, (float)(2.0 * c / f), P, R, L->A, I,
                        1.0f, gA[i], I);
        /* B: P = B^T B, f = ||P - I||_F;  df/dB = 2 B (P - I) / f */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, R, O, 1.0f, L->B, R, L->B, R, 0.0f, P, R);
        f = minus_eye_norm(P, (size_t)R);
        sum += f;
        if (gB && f > 0.0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, O, R, R, (float)(2.0 * c / f), L->B, R, P, R,
                        1.0f, gB[i], R);
    }
    tk_free(P);
    return sum / (double)(2 * a->n);
}

/* ---- the rank allocator ------------------------------------------------------------------------- */

long tk_adalora_budget(const tk_adalora *a, int t, int *mask) {
    const tk_adalora_config *c = &a->cfg;
    if (t <= c->tinit) {
        *mask = 0;
        return a->init_bgt;
    }
    if (t > c->total_step - c->tfinal) {
        *mask = 1;
        return a->target_bgt;
    }
    /* Python's float arithmetic, then int() (truncation; the value is >= target_bgt >= 0) */
    double mul = 1.0 - (double)(t - c->tinit) / (double)(c->total_step - c->tfinal - c->tinit);
    *mask = t % c->delta_t == 0;
    return (long)((double)(a->init_bgt - a->target_bgt) * (mul * mul * mul) + (double)a->target_bgt);
}

/* ipt = |w g|; ipt_bar = b1 ipt_bar + (1-b1) ipt; unc_bar = b2 unc_bar + (1-b2) |ipt - ipt_bar|. */
static void smooth(float *ipt_bar, float *unc_bar, const float *w, const float *g, size_t n, float b1, float b2) {
    for (size_t j = 0; j < n; j++) {
        float ipt = fabsf(w[j] * g[j]);
        ipt_bar[j] = b1 * ipt_bar[j] + (1.0f - b1) * ipt;
        unc_bar[j] = b2 * unc_bar[j] + (1.0f - b2) * fabsf(ipt - ipt_bar[j]);
    }
}

static void update_scores(tk_adalora *a) {
    float b1 = a->cfg.beta1, b2 = a->cfg.beta2;
    for (size_t i = 0; i < a->n; i++) {
        tk_adalora_module *m = &a->mod[i];
        const tk_adapted_linear *L = m->L;
        smooth(m->ipt_a, m->unc_a, L->A, L->dA, L->r * L->in, b1, b2);
        smooth(m->ipt_b, m->unc_b, L->B, L->dB, L->out * L->r, b1, b2);
        smooth(m->ipt_e, m->unc_e, L->E, L->dE, L->r, b1, b2);
    }
}

static void clear_scores(tk_adalora *a) {
    for (size_t i = 0; i < a->n; i++) {
        tk_adalora_module *m = &a->mod[i];
        const tk_adapted_linear *L = m->L;
        size_t nA = L->r * L->in, nB = L->out * L->r;
        memset(m->ipt_a, 0, nA * sizeof(float));
        memset(m->unc_a, 0, nA * sizeof(float));
        memset(m->ipt_b, 0, nB * sizeof(float));
        memset(m->unc_b, 0, nB * sizeof(float));
        memset(m->ipt_e, 0, L->r * sizeof(float));
        memset(m->unc_e, 0, L->r * sizeof(float));
    }
}

/* S_j = s(E_j) + (mean_i s(A_ji) + mean_o s(B_oj)), s = ipt_bar . unc_bar (fp32 entries, the means
 * summed in double). */
static void triplet_scores(tk_adalora_module *m) {
    const tk_adapted_linear *L = m->L;
    size_t R = L->r, I = L->in, O = L->out;
    for (size_t j = 0; j < R; j++) {
        double sa = 0.0, sb = 0.0;
        for (size_t i = 0; i < I; i++) sa += (double)(m->ipt_a[j * I + i] * m->unc_a[j * I + i]);
        for (size_t o = 0; o < O; o++) sb += (double)(m->ipt_b[o * R + j] * m->unc_b[o * R + j]);
        float ma = (float)(sa / (double)I), mb = (float)(sb / (double)O);
        m->score[j] = m->ipt_e[j] * m->unc_e[j] + (ma + mb);
    }
}

static int cmp_float(const void *x, const void *y) {
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* mask_to_budget: E_j = 0 for every triplet scoring <= the k-th smallest score, k = init_bgt - budget
 * (k <= 0: nothing is masked). Sets every module's keep pattern. */
static int mask_to_budget(tk_adalora *a, long budget, tk_err *err) {
    long k = a->init_bgt - budget;
    float thr = -INFINITY;
    for (size_t i = 0; i < a->n; i++) triplet_scores(&a->mod[i]);
    if (k > 0) {
        float *all = malloc((size_t)a->init_bgt * sizeof(float));
        if (!all) return tk_fail(err, "out of memory in the AdaLoRA budget step");
        size_t q = 0;
        for (size_t i = 0; i < a->n; i++)
            for (size_t j = 0; j < a->mod[i].L->r; j++) all[q++] = a->mod[i].score[j];
        qsort(all, q, sizeof(float), cmp_float);
        thr = all[k - 1];
        free(all);
    }
    for (size_t i = 0; i < a->n; i++) {
        tk_adalora_module *m = &a->mod[i];
        for (size_t j = 0; j < m->L->r; j++) {
            m->keep[j] = !(k > 0 && m->score[j] <= thr);
            if (!m->keep[j]) m->L->E[j] = 0.0f;
        }
    }
    return 0;
}

static int write_pattern(const tk_adalora *a, tk_peft_config *pc, tk_err *err) {
    for (size_t i = 0; i < a->n; i++) {
        const tk_adalora_module *m = &a->mod[i];
        if (tk_peft_rank_set(pc, m->layer, m->proj, m->keep, (int)m->L->r, err)) return -1;
    }
    return 0;
}

int tk_adalora_update(tk_adalora *a, int t, tk_peft_config *pc, tk_err *err) {
    const tk_adalora_config *c = &a->cfg;
    int mask = 0, final_t = c->total_step - c->tfinal;
    a->masked = 0;
    if (t < final_t) {
        update_scores(a);
        a->budget = tk_adalora_budget(a, t, &mask);
        if (!mask) return 0;
    } else if (t == final_t) { /* the final budget, forced; the scores are no longer needed */
        a->budget = tk_adalora_budget(a, t, &mask);
        mask = 1;
    } else { /* the final pattern, re-applied every step */
        for (size_t i = 0; i < a->n; i++)
            for (size_t j = 0; j < a->mod[i].L->r; j++)
                if (!a->mod[i].keep[j]) a->mod[i].L->E[j] = 0.0f;
        return 0;
    }
    if (mask_to_budget(a, a->budget, err) || write_pattern(a, pc, err)) return -1;
    a->masked = 1;
    if (t == final_t) {
        clear_scores(a);
        a->final_set = 1;
    }
    return 0;
}
