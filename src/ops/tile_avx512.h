/* tile_avx512.h: the AVX-512 register tile under tk_gemm_small (gemm_small.c) and the packed frozen
 * weights (linear_packed.c).
 *
 *   C [mr, 16 nv] (= or +=) alpha * A [mr, K] B [K, 16 nv]
 *
 * A's element (i, k) is A[i lda + k] and is broadcast; B's row k is loaded as nv vectors (the last
 * masked by `last`) from Bp[k] + off (rows = 1: rows given by pointer, as gathered kept tokens are) or
 * from B + k ldb (rows = 0); C's row i is Cp[i] + off or C + i ldc the same way. Inline, with mr, nv,
 * rows and alpha constant at every use, so the loops unroll and the mr x nv accumulators stay in zmm
 * registers (mr <= 12, nv <= 4, mr nv <= 24). Each element of C is summed in k order.
 */
#ifndef TK_OPS_TILE_AVX512_H
#define TK_OPS_TILE_AVX512_H

#include <immintrin.h>
#include <stddef.h>

__attribute__((target("avx512f"), always_inline)) static inline void
tk_tile_avx512(int rows, size_t mr, size_t nv, __mmask16 last, size_t K, float alpha, const float *A, size_t lda,
               const float *const *Bp, const float *B, size_t ldb, float *const *Cp, float *C, size_t ldc,
               size_t off, int acc_c) {
    __m512 acc[12][4];
#pragma GCC unroll 12
    for (size_t i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++) acc[i][v] = _mm512_setzero_ps();
    /* two k steps per loop iteration: the loads of the second are issued beside the first's FMAs
     * (the packed frozen products ran 4-5% faster than one step per iteration, alternated calls) */
#pragma GCC unroll 2
    for (size_t k = 0; k < K; k++) {
        const float *b = rows ? Bp[k] + off : B + k * ldb;
        __m512 bv[4];
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++)
            bv[v] = v + 1 == nv ? _mm512_maskz_loadu_ps(last, b + 16 * v) : _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 12
        for (size_t i = 0; i < mr; i++) {
            __m512 a = _mm512_set1_ps(A[i * lda + k]);
#pragma GCC unroll 4
            for (size_t v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, bv[v], acc[i][v]);
        }
    }
    __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 12
    for (size_t i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (size_t v = 0; v < nv; v++) {
            __mmask16 m = v + 1 == nv ? last : (__mmask16)0xffff;
            float *c = (rows ? Cp[i] + off : C + i * ldc) + 16 * v;
            __m512 r = alpha == 1.0f ? acc[i][v] : _mm512_mul_ps(al, acc[i][v]);
            if (acc_c) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), r);
            _mm512_mask_storeu_ps(c, m, r);
        }
}

#endif
