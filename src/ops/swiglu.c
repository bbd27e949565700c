/* swiglu.c: the LLaMA MLP gate, out = silu(gate) * up, and its backward.
 *
 * Shape legend (outermost first):
 *   N  tokens, F  MLP width; the kernels see the flat n = N*F elements
 *
 * silu(g) = g / (1 + exp(-g)) = g * sigmoid(g)
 * silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
 */
#include "ops/ops.h"

#include "common.h"
#include "fastmath.h"

#include <math.h>

/* out, gate, up [n] (flat N*F). `parallel for simd`: without it gcc -O2 leaves these loops scalar. */
void tk_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
#pragma omp parallel for simd if (n >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + tk_expf(-g)) * up[i];
    }
}

/* forward: out = silu(gate) * up.
 *   dgate [n] += dout * up * silu'(gate);  dup [n] += dout * silu(gate).
 * One loop per case, so that none has a branch inside (which would keep it scalar). */
void tk_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n) {
    if (dgate && dup) {
#pragma omp parallel for simd if (n >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
            dup[i] += dout[i] * g * sig;
        }
    } else if (dgate) {
#pragma omp parallel for simd if (n >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        }
    } else if (dup) {
#pragma omp parallel for simd if (n >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dup[i] += dout[i] * g * sig;
        }
    }
}
