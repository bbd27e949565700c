/* linear_frozen.c: the products of a frozen weight w [O,I] in whichever form the model holds it, so
 * that callers (the adapted projections, the lm_head) do not each choose between the kernels.
 *
 *   natural fp32  -> cblas_sgemm (linear.c)
 *   natural BF16  -> blockwise conversion into scratch, then cblas_sgemm (linear_bf16.c)
 *   packed fp32 or BF16 (tk_llama_pack_frozen) -> the AVX-512 panel kernel (linear_packed.c)
 *   BF16 compute (--compute bf16)  -> the AVX512-BF16 kernel (linear_bf16dot.c)
 */
#include "ops/ops.h"

#include "common.h"

void tk_frozen_forward(float *y, const float *x, tk_frozen w, size_t N, size_t I, size_t O, float *scratch,
                       size_t scratch_n) {
    if (w.pd) tk_bf16dot_forward(y, x, w.pd, N, I, O);
    else if (w.f) tk_linear_forward(y, x, w.f, N, I, O, 0.0f);
    else if (w.pf) tk_linear_packed_forward(y, x, w.pf, N, I, O);
    else if (w.ph) tk_linear_packed_forward_bf16(y, x, w.ph, N, I, O);
    else tk_linear_bf16_forward(y, x, w.h, N, I, O, 0.0f, scratch, scratch_n);
}

void tk_frozen_backward(float *dx, const float *dy, tk_frozen w, size_t N, size_t I, size_t O, float beta,
                        float *scratch, size_t scratch_n) {
    TK_ASSERT(beta == 0.0f || beta == 1.0f);
    if (w.pd) {
        tk_bf16dot_backward(dx, dy, w.pd, N, I, O, beta);
    } else if (w.f) {
        tk_linear_backward_dx(dx, dy, w.f, N, I, O, beta);
    } else if (w.pf) {
        tk_linear_packed_backward(dx, dy, w.pf, N, I, O, beta);
    } else if (w.ph) {
        tk_linear_packed_backward_bf16(dx, dy, w.ph, N, I, O, beta);
    } else { /* the blockwise BF16 path accumulates */
        if (beta == 0.0f) tk_zero_floats(dx, N * I);
        tk_linear_bf16_backward(dx, dy, w.h, N, I, O, scratch, scratch_n);
    }
}

int tk_frozen_rows_alone(tk_frozen w) { return w.pf != NULL || w.ph != NULL || w.pd != NULL; }
