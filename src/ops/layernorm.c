/* layernorm.c: torch.nn.LayerNorm over the last dimension in fp32, y = (x - mean) * rstd * w + b,
 * and its backward (the CLIP/SigLIP encoders and the projector's users need it).
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), C  normalized width
 */
#include "ops/ops.h"

#include "common.h"

#include <math.h>

/* Columns per OpenMP task in the dw/db reductions: each task owns a disjoint column range. */
#define TK_LAYERNORM_COL_BLOCK 64

/* y [N,C], mean [N] and rstd [N] (cached for backward, may be NULL), x [N,C], w [C], b [C] (NULL: no
 * bias). Mean and biased variance are summed in double and rounded once to float (torch computes them
 * in fp32 with a more accurate reduction than a naive float sum). y may alias x. */
void tk_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *w,
                          const float *b, size_t N, size_t C, float eps) {
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        const float *xr = &x[n * C];
        float *yr = &y[n * C];
        double s = 0.0;
        for (size_t c = 0; c < C; c++) s += (double)xr[c];
        double mu = s / (double)C;
        double ss = 0.0;
        for (size_t c = 0; c < C; c++) {
            double d = (double)xr[c] - mu;
            ss += d * d;
        }
        float m = (float)mu;
        float r = (float)(1.0 / sqrt(ss / (double)C + (double)eps));
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
        if (b) {
            for (size_t c = 0; c < C; c++) yr[c] = (xr[c] - m) * r * w[c] + b[c];
        } else {
            for (size_t c = 0; c < C; c++) yr[c] = (xr[c] - m) * r * w[c];
        }
    }
}

/* forward: y = xhat * w + b, xhat = (x - mean) * rstd, rstd = (var(x) + eps)^(-1/2).
 *   dx [N,C] += rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),  g = dy * w
 *   dw [C]   += sum_n dy * xhat
 *   db [C]   += sum_n dy
 * mean, rstd: the forward's caches. Any of dx, dw, db may be NULL. */
void tk_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, const float *mean, const float *rstd, size_t N, size_t C) {
    if (dx) {
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
        for (size_t n = 0; n < N; n++) {
            const float *xr = &x[n * C];
            const float *gr = &dy[n * C];
            float *dxr = &dx[n * C];
            float m = mean[n], r = rstd[n];
            double sg = 0.0, sgx = 0.0;
            for (size_t c = 0; c < C; c++) {
                double g = (double)gr[c] * (double)w[c];
                sg += g;
                sgx += g * (double)((xr[c] - m) * r);
            }
            float mg = (float)(sg / (double)C), mgx = (float)(sgx / (double)C);
            for (size_t c = 0; c < C; c++) {
                float xh = (xr[c] - m) * r;
                dxr[c] += r * (gr[c] * w[c] - mg - xh * mgx);
            }
        }
    }
    if (dw || db) {
        size_t nblocks = (C + TK_LAYERNORM_COL_BLOCK - 1) / TK_LAYERNORM_COL_BLOCK;
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
        for (size_t blk = 0; blk < nblocks; blk++) {
            size_t c0 = blk * TK_LAYERNORM_COL_BLOCK;
            size_t c1 = c0 + TK_LAYERNORM_COL_BLOCK < C ? c0 + TK_LAYERNORM_COL_BLOCK : C;
            for (size_t n = 0; n < N; n++) {
                const float *xr = &x[n * C];
                const float *gr = &dy[n * C];
                float m = mean[n], r = rstd[n];
                if (dw)
                    for (size_t c = c0; c < c1; c++) dw[c] += gr[c] * ((xr[c] - m) * r);
                if (db)
                    for (size_t c = c0; c < c1; c++) db[c] += gr[c];
            }
        }
    }
}
