/* linear.c: y = x w^T through cblas_sgemm, its backward, and plain-loop references of both.
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), I  input width, O  output width
 *
 * Row-major throughout: x [N,I], w [O,I] (one output unit per row, as in HF nn.Linear), y [N,O].
 * The sgemm calls are made from serial code; OpenBLAS threads them internally.
 */
#include "ops/ops.h"

#include "blas.h"
#include <limits.h>

#include "common.h"



/* y [N,O] = x [N,I] w [O,I]^T + beta * y. beta 0 overwrites y (its old contents are never read). */
void tk_linear_forward(float *y, const float *x, const float *w, size_t N, size_t I, size_t O,
                       float beta) {
    if (N == 0 || O == 0) return;
    if (I == 0) { /* empty sum: y = beta * y; sgemm would reject lda = 0 */
        for (size_t i = 0; i < N * O; i++) y[i] = beta == 0.0f ? 0.0f : beta * y[i];
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(N), tk_blas_dim(O), tk_blas_dim(I), 1.0f,
                x, tk_blas_dim(I), w, tk_blas_dim(I), beta, y, tk_blas_dim(O));
}

/* dx [N,I] = dy [N,O] w [O,I] + beta * dx (beta 0: dx is overwritten, never read). */
void tk_linear_backward_dx(float *dx, const float *dy, const float *w, size_t N, size_t I, size_t O, float beta) {
    if (N == 0 || I == 0) return;
    if (O == 0) { /* empty sum */
        for (size_t i = 0; i < N * I; i++) dx[i] = beta == 0.0f ? 0.0f : beta * dx[i];
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(N), tk_blas_dim(I), tk_blas_dim(O), 1.0f,
                dy, tk_blas_dim(O), w, tk_blas_dim(I), beta, dx, tk_blas_dim(I));
}

/* forward: y = x w^T.  dx [N,I] += dy [N,O] w [O,I];  dw [O,I] += dy^T x [N,I]. */
void tk_linear_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                        size_t N, size_t I, size_t O) {
    if (N == 0 || I == 0 || O == 0) return;
    if (dx) tk_linear_backward_dx(dx, dy, w, N, I, O, 1.0f);
    if (dw) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(O), tk_blas_dim(I), tk_blas_dim(N),
                    1.0f, dy, tk_blas_dim(O), x, tk_blas_dim(I), 1.0f, dw, tk_blas_dim(I));
    }
}

/* Reference of tk_linear_forward: one dot product per output, accumulated in float. */
void tk_linear_forward_ref(float *y, const float *x, const float *w, size_t N, size_t I, size_t O,
                           float beta) {
    for (size_t n = 0; n < N; n++) {
        for (size_t o = 0; o < O; o++) {
            float acc = 0.0f;
            for (size_t i = 0; i < I; i++) acc += x[n * I + i] * w[o * I + i];
            float *yo = &y[n * O + o];
            *yo = beta == 0.0f ? acc : acc + beta * *yo;
        }
    }
}

/* forward: y = x w^T.  Reference of tk_linear_backward: dx += dy w;  dw += dy^T x. */
void tk_linear_backward_ref(float *dx, float *dw, const float *dy, const float *x, const float *w,
                            size_t N, size_t I, size_t O) {
    if (dx) {
        for (size_t n = 0; n < N; n++) {
            for (size_t i = 0; i < I; i++) {
                float acc = 0.0f;
                for (size_t o = 0; o < O; o++) acc += dy[n * O + o] * w[o * I + i];
                dx[n * I + i] += acc;
            }
        }
    }
    if (dw) {
        for (size_t o = 0; o < O; o++) {
            for (size_t i = 0; i < I; i++) {
                float acc = 0.0f;
                for (size_t n = 0; n < N; n++) acc += dy[n * O + o] * x[n * I + i];
                dw[o * I + i] += acc;
            }
        }
    }
}
