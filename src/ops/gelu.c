/* gelu.c: the GELU family of the vision encoders and the LLaVA projector, forward and backward.
 *
 *   TK_GELU_ERF    torch GELU / HF "gelu":            y = 0.5 x (1 + erf(x / sqrt 2))
 *   TK_GELU_TANH   HF "gelu_pytorch_tanh"/"gelu_new": y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),
 *                                                     k = sqrt(2 / pi)
 *   TK_GELU_QUICK  HF "quick_gelu" (CLIP):            y = x sigmoid(1.702 x)
 *
 * Shape legend: n  elements (flat; any [N,F] activation).
 */
#include "ops/ops.h"

#include "common.h"

#include <math.h>

#define TK_SQRT1_2 0.70710678118654752f
#define TK_GELU_K 0.79788456080286536f /* sqrt(2 / pi) */
#define TK_INV_SQRT_2PI 0.39894228040143268f

static inline float gelu1(float x, tk_gelu_kind kind) {
    switch (kind) {
    case TK_GELU_ERF: return 0.5f * x * (1.0f + erff(x * TK_SQRT1_2));
    case TK_GELU_TANH: return 0.5f * x * (1.0f + tanhf(TK_GELU_K * (x + 0.044715f * x * x * x)));
    case TK_GELU_QUICK: return x / (1.0f + expf(-1.702f * x));
    }
    return 0.0f;
}

/* d gelu(x) / dx. */
static inline float dgelu1(float x, tk_gelu_kind kind) {
    switch (kind) {
    case TK_GELU_ERF:
        return 0.5f * (1.0f + erff(x * TK_SQRT1_2)) + x * TK_INV_SQRT_2PI * expf(-0.5f * x * x);
    case TK_GELU_TANH: {
        float u = TK_GELU_K * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * TK_GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case TK_GELU_QUICK: {
        float s = 1.0f / (1.0f + expf(-1.702f * x));
        return s + 1.702f * x * s * (1.0f - s);
    }
    }
    return 0.0f;
}

/* y [n] = gelu(x [n]); y may alias x. */
void tk_gelu_forward(float *y, const float *x, size_t n, tk_gelu_kind kind) {
#pragma omp parallel for if (n >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < n; i++) y[i] = gelu1(x[i], kind);
}

/* forward: y = gelu(x).  dx [n] += dy * gelu'(x). */
void tk_gelu_backward(float *dx, const float *dy, const float *x, size_t n, tk_gelu_kind kind) {
#pragma omp parallel for if (n >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < n; i++) dx[i] += dy[i] * dgelu1(x[i], kind);
}

const char *tk_gelu_name(tk_gelu_kind kind) {
    switch (kind) {
    case TK_GELU_ERF: return "gelu";
    case TK_GELU_TANH: return "gelu_pytorch_tanh";
    case TK_GELU_QUICK: return "quick_gelu";
    }
    return "?";
}
