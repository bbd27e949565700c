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

/* Elements per task: the loops below run span by span so that each span can be a function built for
 * AVX2 as well as the baseline (TK_HOT_CLONES, common.h): tk_expf then runs 8 wide. */
#define TK_SWIGLU_SPAN 16384

TK_HOT_CLONES static void forward_span(float *out, const float *gate, const float *up, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + tk_expf(-g)) * up[i];
    }
}

/* One loop per case, so that none has a branch inside (which would keep it scalar). write: both
 * gradients are written (tk_swiglu_backward_into), else added to. */
TK_HOT_CLONES static void backward_span(float *dgate, float *dup, const float *dout, const float *gate,
                                        const float *up, size_t n, int write) {
    if (write) {
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dgate[i] = dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
            dup[i] = dout[i] * g * sig;
        }
    } else if (dgate && dup) {
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
            dup[i] += dout[i] * g * sig;
        }
    } else if (dgate) {
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        }
    } else if (dup) {
#pragma omp simd
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            float sig = 1.0f / (1.0f + tk_expf(-g));
            dup[i] += dout[i] * g * sig;
        }
    }
}

/* out, gate, up [n] (flat N*F). */
void tk_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
    size_t spans = (n + TK_SWIGLU_SPAN - 1) / TK_SWIGLU_SPAN;
#pragma omp parallel for if (n >= TK_OMP_MIN_WORK)
    for (size_t b = 0; b < spans; b++) {
        size_t a = b * TK_SWIGLU_SPAN, len = n - a < TK_SWIGLU_SPAN ? n - a : TK_SWIGLU_SPAN;
        forward_span(out + a, gate + a, up + a, len);
    }
}

/* forward: out = silu(gate) * up.
 *   dgate [n] += dout * up * silu'(gate);  dup [n] += dout * silu(gate). */
static void backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n,
                     int write) {
    size_t spans = (n + TK_SWIGLU_SPAN - 1) / TK_SWIGLU_SPAN;
#pragma omp parallel for if (n >= TK_OMP_MIN_WORK)
    for (size_t b = 0; b < spans; b++) {
        size_t a = b * TK_SWIGLU_SPAN, len = n - a < TK_SWIGLU_SPAN ? n - a : TK_SWIGLU_SPAN;
        backward_span(dgate ? dgate + a : NULL, dup ? dup + a : NULL, dout + a, gate + a, up + a, len, write);
    }
}

void tk_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n) {
    backward(dgate, dup, dout, gate, up, n, 0);
}

void tk_swiglu_backward_into(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                             size_t n) {
    backward(dgate, dup, dout, gate, up, n, 1);
}
