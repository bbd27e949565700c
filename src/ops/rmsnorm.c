/* rmsnorm.c: HF LlamaRMSNorm in fp32, y = w * (x * rsqrt(mean(x^2) + eps)), and its backward.
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), C  model width
 */
#include "ops/ops.h"

#include "common.h"

#include <math.h>

/* Columns per OpenMP task in the dw reduction: each task owns a disjoint column range of dw. */
#define TK_RMSNORM_COL_BLOCK 64

/* y [N,C], rstd [N] (cached for backward), x [N,C], w [C]. The mean of squares is summed in double
 * and rounded once to float; the scaling is float, in HF's order: w * (x * rstd). */
void tk_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, size_t N, size_t C,
                        float eps) {
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        const float *xr = &x[n * C];
        float *yr = &y[n * C];
        double ss = 0.0;
#pragma omp simd reduction(+ : ss) /* vectorised double sum (a plain loop stays scalar) */
        for (size_t c = 0; c < C; c++) ss += (double)xr[c] * (double)xr[c];
        float ms = (float)(ss / (double)C);
        float r = 1.0f / sqrtf(ms + eps);
        rstd[n] = r;
        for (size_t c = 0; c < C; c++) yr[c] = w[c] * (xr[c] * r);
    }
}

/* forward: y = w * x * rstd, rstd = (mean(x^2) + eps)^(-1/2).
 *   dx [N,C] += rstd * w * dy - x * rstd^3 / C * sum_c(dy * w * x)
 *   dw [C]   += sum_n dy * x * rstd */
void tk_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         const float *rstd, size_t N, size_t C) {
    if (dx) {
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
        for (size_t n = 0; n < N; n++) {
            const float *xr = &x[n * C];
            const float *gr = &dy[n * C];
            float *dxr = &dx[n * C];
            double dot = 0.0;
#pragma omp simd reduction(+ : dot)
            for (size_t c = 0; c < C; c++) dot += (double)gr[c] * (double)w[c] * (double)xr[c];
            float r = rstd[n];
            float coef = (float)(dot * (double)r * (double)r * (double)r / (double)C);
            for (size_t c = 0; c < C; c++) dxr[c] += r * w[c] * gr[c] - coef * xr[c];
        }
    }
    if (dw) {
        size_t nblocks = (C + TK_RMSNORM_COL_BLOCK - 1) / TK_RMSNORM_COL_BLOCK;
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
        for (size_t blk = 0; blk < nblocks; blk++) {
            size_t c0 = blk * TK_RMSNORM_COL_BLOCK;
            size_t c1 = c0 + TK_RMSNORM_COL_BLOCK < C ? c0 + TK_RMSNORM_COL_BLOCK : C;
            for (size_t n = 0; n < N; n++) {
                const float *xr = &x[n * C];
                const float *gr = &dy[n * C];
                float r = rstd[n];
                for (size_t c = c0; c < c1; c++) dw[c] += gr[c] * xr[c] * r;
            }
        }
    }
}
