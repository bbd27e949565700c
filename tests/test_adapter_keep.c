/* test_adapter_keep.c: how the adapter backward skips gated-off tokens (peft/adapter.c). LoRA runs
 * the fused branch (rows in TK_BRANCH_LANES lanes of TK_BRANCH_CHUNK-row chunks, gated-off rows
 * dropped per chunk); the bottleneck zeroes the rank-R rows of gated-off tokens when half or more
 * are kept and gathers the kept rows below that. N = 300 gives each lane a full and a partial chunk.
 * At keep ratios 1, 0.9, 0.7, 0.6, 0.5, 0.48, 0.3, 1/N and 0, dA, dB, dx and every c_i are compared
 * with plain double loops of
 *   dB += s sum_{i kept} g_i code_i^T,   dA += sum_{i kept} (a_scale * d code_i) x_i^T,
 *   dx_i += W0^T g_i + S_i (dM/dx_i)^T g_i,   c_i = <g_i, m_i> for every token
 * (code = A x for LoRA, act(A x) for the bottleneck); LoRA also with dropout 0.3 (dx through the
 * mask). dA, dB and every c_i must be bitwise the same with 1 and 2 threads (the lanes and chunks do
 * not depend on the thread count); dx within 1e-6 of its largest value, as its W0^T g part is
 * cblas_sgemm's, and some OpenBLAS kernels split rows by thread count with different rounding (the
 * SSE3 "Prescott" kernels that OpenBLAS 0.3.21 falls back to on CPU models newer than itself).
 * Exit status 1 on any error above 1e-5 (relative to the largest reference value).
 */
#include "peft/adapter.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { NN = 300, II = 24, OO = 40, RR = 4 };

static int fails = 0;

static double max_rel(const float *got, const double *ref, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (d != d) return INFINITY;
        num = d > num ? d : num;
        den = fabs(ref[i]) > den ? fabs(ref[i]) : den;
    }
    return num / (den > 1e-12 ? den : 1e-12);
}

/* What one run produced, to compare across thread counts. */
typedef struct {
    float dA[RR * II], dB[OO * RR], dx[NN * II], c[NN];
} result;

static void check(tk_adapter_kind kind, size_t nkeep, float dropout, int threads, result *out) {
    tk_err err = {0};
    tk_rng rng;
    tk_rng_seed(&rng, 17 + nkeep);
    tk_set_threads(threads);
    tk_adapter_ws ws;
    if (tk_adapter_ws_alloc(&ws, NN, OO, RR, 0, &err)) {
        printf("FAIL %s\n", err.msg);
        fails++;
        return;
    }
    static float w0[OO * II], A[RR * II], Bm[OO * RR], dA[RR * II], dB[OO * RR];
    static float x[NN * II], y[NN * OO], dy[NN * OO], dx[NN * II];
    static double rdA[RR * II], rdB[OO * RR], rdx[NN * II];
#define U(a) ((2.0f * tk_rng_uniform(&rng) - 1.0f) * (a))
    for (size_t i = 0; i < OO * II; i++) w0[i] = U(0.3f);
    for (size_t i = 0; i < RR * II; i++) A[i] = U(0.4f);
    for (size_t i = 0; i < OO * RR; i++) Bm[i] = U(0.4f);
    for (size_t i = 0; i < NN * II; i++) x[i] = U(1.0f);
    for (size_t i = 0; i < NN * OO; i++) dy[i] = U(1.0f);
    memset(dA, 0, sizeof dA);
    memset(dB, 0, sizeof dB);
    memset(dx, 0, sizeof dx);
    tk_adapted_linear L;
    memset(&L, 0, sizeof L);
    L.kind = kind;
    L.gated = 1;
    L.in = II;
    L.out = OO;
    L.r = RR;
    L.scale = 0.7f;
    L.act = TK_ACT_TANH;
    L.w0 = w0;
    L.A = A;
    L.B = Bm;
    L.dA = dA;
    L.dB = dB;
    L.dropout = dropout;
    if (tk_adapted_alloc(&L, NN, &err) || tk_adapted_forward(&L, &ws, y, x, NULL, NN, 1, &rng, &err)) {
        printf("FAIL %s\n", err.msg);
        fails++;
        return;
    }
    /* the gate as a fixed pattern: nkeep tokens kept, spread over the sequence */
    for (size_t i = 0; i < NN; i++) L.S[i] = 0;
    for (size_t k = 0; k < nkeep; k++) L.S[(k * 7 + 3) % NN] = 1; /* 7 is coprime with 300 */
    size_t kept = 0;
    for (size_t i = 0; i < NN; i++) kept += L.S[i];
    if (tk_adapted_backward(&L, &ws, dx, dy, x, NULL, NN, &err)) {
        printf("FAIL %s\n", err.msg);
        fails++;
        return;
    }
    /* reference in double */
    memset(rdA, 0, sizeof rdA);
    memset(rdB, 0, sizeof rdB);
    memset(rdx, 0, sizeof rdx);
    double s = L.scale;
    static double rc[NN];
    float inv = dropout > 0.0f ? 1.0f / (1.0f - dropout) : 1.0f;
    for (size_t i = 0; i < NN; i++) {
        float xi[II]; /* x~_i: the dropped-out input the branch saw */
        for (size_t j = 0; j < II; j++) xi[j] = dropout > 0.0f ? L.xd[i * II + j] : x[i * II + j];
        const float *gi = dy + i * OO;
        for (size_t j = 0; j < II; j++)
            for (size_t o = 0; o < OO; o++) rdx[i * II + j] += (double)gi[o] * w0[o * II + j];
        double u[RR], code[RR], gr[RR], du[RR];
        rc[i] = 0.0;
        for (size_t r = 0; r < RR; r++) {
            u[r] = 0.0;
            for (size_t j = 0; j < II; j++) u[r] += (double)A[r * II + j] * xi[j];
            code[r] = kind == TK_ADAPTER_BOTTLENECK ? tanh(u[r]) : u[r];
            gr[r] = 0.0;
            for (size_t o = 0; o < OO; o++) gr[r] += (double)gi[o] * Bm[o * RR + r];
            double dact = kind == TK_ADAPTER_BOTTLENECK ? 1.0 - code[r] * code[r] : 1.0;
            du[r] = s * gr[r] * dact;
            rc[i] += s * gr[r] * code[r]; /* <g_i, m_i> = s <B^T g_i, code_i> */
        }
        if (!L.S[i]) continue;
        for (size_t o = 0; o < OO; o++)
            for (size_t r = 0; r < RR; r++) rdB[o * RR + r] += s * gi[o] * code[r];
        for (size_t r = 0; r < RR; r++)
            for (size_t j = 0; j < II; j++) {
                rdA[r * II + j] += du[r] * xi[j];
                double mask = dropout > 0.0f ? (L.keepx[i * II + j] ? inv : 0.0) : 1.0;
                rdx[i * II + j] += du[r] * A[r * II + j] * mask;
            }
    }
    double eA = max_rel(dA, rdA, RR * II), eB = max_rel(dB, rdB, OO * RR), ex = max_rel(dx, rdx, NN * II);
    double ec = L.stats.n_c == NN ? max_rel(L.stats.c, rc, NN) : INFINITY;
    int ok = eA <= 1e-5 && eB <= 1e-5 && ex <= 1e-5 && ec <= 1e-5;
    const char *how = kind == TK_ADAPTER_LORA ? (kept == 0 ? "c only" : "fused chunks")
                      : kept == 0 ? "branch skipped" : 2 * kept >= NN ? "zeroed rows" : "gathered rows";
    printf("%s %-10s dropout %.1f keep %3zu/%d (%s, %d threads)  dA %.2g  dB %.2g  dx %.2g  c %.2g (%zu pushed)\n",
           ok ? "ok  " : "FAIL", kind == TK_ADAPTER_LORA ? "lora" : "bottleneck", dropout, kept, NN, how, threads,
           eA, eB, ex, ec, L.stats.n_c);
    fails += !ok;
    memcpy(out->dA, dA, sizeof dA);
    memcpy(out->dB, dB, sizeof dB);
    memcpy(out->dx, dx, sizeof dx);
    for (size_t i = 0; i < NN; i++) out->c[i] = i < L.stats.n_c ? L.stats.c[i] : NAN;
    tk_adapted_free(&L);
    tk_adapter_ws_free(&ws);
}

/* Runs one case with 1 and 2 threads: dA, dB and c must agree bit for bit, dx to 1e-6. */
static void check_threads(tk_adapter_kind kind, size_t nkeep, float dropout) {
    static result r1, r2;
    static double dx1[NN * II];
    check(kind, nkeep, dropout, 1, &r1);
    check(kind, nkeep, dropout, 2, &r2);
    for (size_t i = 0; i < NN * II; i++) dx1[i] = r1.dx[i];
    double e_dx = max_rel(r2.dx, dx1, NN * II);
    int dA = memcmp(r1.dA, r2.dA, sizeof r1.dA) != 0, dB = memcmp(r1.dB, r2.dB, sizeof r1.dB) != 0;
    int dc = memcmp(r1.c, r2.c, sizeof r1.c) != 0;
    if (dA || dB || dc || !(e_dx <= 1e-6)) {
        printf("FAIL results differ between 1 and 2 threads (dA %s, dB %s, c %s, dx by %.2g)\n",
               dA ? "differs" : "same", dB ? "differs" : "same", dc ? "differ" : "same", e_dx);
        fails++;
    }
}

int main(void) {
    const size_t keeps[] = {NN, NN * 9 / 10, NN * 7 / 10, NN * 6 / 10, NN / 2, NN / 2 - 1, NN * 3 / 10, 1, 0};
    for (size_t k = 0; k < sizeof keeps / sizeof keeps[0]; k++) {
        check_threads(TK_ADAPTER_LORA, keeps[k], 0.0f);
        check_threads(TK_ADAPTER_LORA, keeps[k], 0.3f);
        check_threads(TK_ADAPTER_BOTTLENECK, keeps[k], 0.0f);
    }
    printf("%s\n", fails ? "FAILED" : "all passed");
    return fails ? 1 : 0;
}
