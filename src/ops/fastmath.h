/* fastmath.h: an expf that the compiler can vectorise.
 *
 * glibc's expf is a scalar call, and it dominated softmax, cross-entropy and SiLU loops; its vector
 * variants are only declared under -ffast-math, which this project does not use. tk_expf is inline
 * (a function body in a header, on purpose: loops must see it to vectorise) and accurate to about
 * 2 ulp on [-87, 88] (tests/test_fastmath.c measures it against expf). Inputs below -87 give
 * exp(-87) ~ 1.6e-38 instead of a subnormal; above 88 give exp(88); NaN gives NaN.
 *
 *   for (size_t j = 0; j < n; j++) y[j] = tk_expf(x[j] - m);
 */
#ifndef TK_OPS_FASTMATH_H
#define TK_OPS_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* x clamped to [lo, hi] with bit masks: gcc keeps `x < lo ? lo : x` on floats as a branch (it may
 * not treat it as a min/max without -ffast-math), and a branch stops the loop from vectorising.
 * NaN compares false both times and passes through. */
static inline float tk_clampf(float x, float lo, float hi) {
    uint32_t xi, li, hi_i;
    memcpy(&xi, &x, 4);
    memcpy(&li, &lo, 4);
    memcpy(&hi_i, &hi, 4);
    uint32_t below = 0u - (uint32_t)(x < lo), above = 0u - (uint32_t)(x > hi);
    xi = (xi & ~below) | (li & below);
    xi = (xi & ~above) | (hi_i & above);
    memcpy(&x, &xi, 4);
    return x;
}

static inline float tk_expf(float x) {
    x = tk_clampf(x, -87.0f, 88.0f);
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f; /* Cody-Waite: |r| <= ln2/2 */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t ti, mi, si;
    memcpy(&ti, &t, 4);
    memcpy(&mi, &magic, 4);
    si = (ti - mi + 127u) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &si, 4);
    return p * scale;
}

#endif
