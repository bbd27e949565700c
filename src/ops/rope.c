/* rope.c: rotary position embedding, HF rotate_half layout, and its (in-place) backward.
 *
 * Shape legend (outermost first):
 *   B  sequences, T  positions per sequence, H  heads, D  head width (even), P  table positions
 *
 * Within each head the pairs are (j, j + D/2) for j < D/2, rotated by angle pos * inv_freq[j]:
 *   y[j]       = x[j] * cos - x[j + D/2] * sin
 *   y[j + D/2] = x[j + D/2] * cos + x[j] * sin
 */
#include "ops/ops.h"

#include <math.h>

#include "common.h"

/* cos_t, sin_t [P, D/2] = cos, sin of (float)p * inv_freq [D/2]; the angle is rounded to float before
 * cosf/sinf, as HF computes freqs = inv_freq @ position_ids in fp32. */
void tk_rope_table(float *cos_t, float *sin_t, const float *inv_freq, size_t P, size_t D) {
    TK_ASSERT(D % 2 == 0);
    size_t half = D / 2;
#pragma omp parallel for if (P * D >= TK_OMP_MIN_WORK)
    for (size_t p = 0; p < P; p++) {
        for (size_t j = 0; j < half; j++) {
            float angle = (float)p * inv_freq[j];
            cos_t[p * half + j] = cosf(angle);
            sin_t[p * half + j] = sinf(angle);
        }
    }
}

/* In place on x [B,T,H,D]; token (b,t) uses table row pos0 + t of cos_t, sin_t [P, D/2]. */
void tk_rope_forward(float *x, const float *cos_t, const float *sin_t, size_t B, size_t T, size_t H,
                     size_t D, size_t pos0) {
    TK_ASSERT(D % 2 == 0);
    size_t half = D / 2;
#pragma omp parallel for if (B * T * H * D >= TK_OMP_MIN_WORK)
    for (size_t bt = 0; bt < B * T; bt++) {
        size_t p = pos0 + bt % T;
        const float *cr = &cos_t[p * half];
        const float *sr = &sin_t[p * half];
        for (size_t h = 0; h < H; h++) {
            float *xh = &x[(bt * H + h) * D];
            for (size_t j = 0; j < half; j++) {
                float x1 = xh[j], x2 = xh[j + half];
                xh[j] = x1 * cr[j] - x2 * sr[j];
                xh[j + half] = x2 * cr[j] + x1 * sr[j];
            }
        }
    }
}

/* forward: y = x*cos + rotate_half(x)*sin, a rotation of each pair (x1, x2) by +angle.
 * Backward applies the transpose (rotation by -angle) in place: dx [B,T,H,D] (on entry dy):
 *   dx1 = dy1 * cos + dy2 * sin;  dx2 = dy2 * cos - dy1 * sin. */
void tk_rope_backward(float *dx, const float *cos_t, const float *sin_t, size_t B, size_t T, size_t H,
                      size_t D, size_t pos0) {
    TK_ASSERT(D % 2 == 0);
    size_t half = D / 2;
#pragma omp parallel for if (B * T * H * D >= TK_OMP_MIN_WORK)
    for (size_t bt = 0; bt < B * T; bt++) {
        size_t p = pos0 + bt % T;
        const float *cr = &cos_t[p * half];
        const float *sr = &sin_t[p * half];
        for (size_t h = 0; h < H; h++) {
            float *gh = &dx[(bt * H + h) * D];
            for (size_t j = 0; j < half; j++) {
                float g1 = gh[j], g2 = gh[j + half];
                gh[j] = g1 * cr[j] + g2 * sr[j];
                gh[j + half] = g2 * cr[j] - g1 * sr[j];
            }
        }
    }
}
