/* linear_bf16.c: linear layers and embedding lookups whose frozen weight stays BF16 in memory.
 *
 * Shape legend: N tokens, I input width, O output width (rows of W), ob rows converted per block.
 * A 7B model's weights take 13.5 GB as BF16 and 27 GB as fp32; keeping them BF16 and converting ob
 * rows at a time into an fp32 scratch block for cblas_sgemm costs O*I conversions per product,
 * small beside its 2*N*O*I FLOPs for any useful N.
 */
#include "ops/ops.h"

#include "blas.h"
#include "common.h"

#include <string.h>

/* dst [ob,I] = fp32(w rows o0..o0+ob) */
static void convert_rows(float *dst, const uint16_t *w, size_t o0, size_t ob, size_t I) {
    size_t n = ob * I;
    const uint16_t *src = w + o0 * I;
#pragma omp parallel for schedule(static) if (n >= TK_OMP_MIN_WORK)
    for (size_t j = 0; j < n; j++) {
        uint32_t u = (uint32_t)src[j] << 16;
        memcpy(&dst[j], &u, 4);
    }
}

static size_t block_rows(size_t I, size_t O, size_t scratch_n) {
    size_t ob = scratch_n / I;
    TK_ASSERT(ob >= 1);
    return ob < O ? ob : O;
}

void tk_linear_bf16_forward(float *y, const float *x, const uint16_t *w, size_t N, size_t I, size_t O, float beta,
                            float *scratch, size_t scratch_n) {
    size_t ob = block_rows(I, O, scratch_n);
    for (size_t o0 = 0; o0 < O; o0 += ob) {
        size_t nb = O - o0 < ob ? O - o0 : ob;
        convert_rows(scratch, w, o0, nb, I);
        /* y[:, o0:o0+nb] = x W[o0:o0+nb]^T (+ beta y) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(N), tk_blas_dim(nb), tk_blas_dim(I), 1.0f, x,
                    tk_blas_dim(I), scratch, tk_blas_dim(I), beta, y + o0, tk_blas_dim(O));
    }
}

/* forward: y = x W^T.  dx [N,I] += dy W, block by block of W's rows. */
void tk_linear_bf16_backward(float *dx, const float *dy, const uint16_t *w, size_t N, size_t I, size_t O,
                             float *scratch, size_t scratch_n) {
    size_t ob = block_rows(I, O, scratch_n);
    for (size_t o0 = 0; o0 < O; o0 += ob) {
        size_t nb = O - o0 < ob ? O - o0 : ob;
        convert_rows(scratch, w, o0, nb, I);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(N), tk_blas_dim(I), tk_blas_dim(nb), 1.0f,
                    dy + o0, tk_blas_dim(O), scratch, tk_blas_dim(I), 1.0f, dx, tk_blas_dim(I));
    }
}

void tk_embedding_bf16_forward(float *out, const int32_t *ids, const uint16_t *table, size_t N, size_t C) {
#pragma omp parallel for schedule(static) if (N * C >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        const uint16_t *src = table + (size_t)ids[n] * C;
        float *dst = out + n * C;
        for (size_t c = 0; c < C; c++) {
            uint32_t u = (uint32_t)src[c] << 16;
            memcpy(&dst[c], &u, 4);
        }
    }
}
