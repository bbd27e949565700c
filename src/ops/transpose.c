/* transpose.c: out = in^T for row-major float blocks, 16 x 16 at a time in AVX-512 registers.
 *
 * Used where a product needs an operand the other way round: the backward of the packed frozen
 * weights (linear_packed.c, one [64, 64] block of a panel at a time) and attention's K^T and V^T
 * copies (attention.c). A scalar loop over a 16 x 16 block reads 16 rows and writes 16 lines per
 * element column; the register transpose loads 16 rows, shuffles them in 24 + 16 + 16 instructions
 * and stores 16 rows. Edges (a dimension not a multiple of 16), and CPUs without AVX-512F, take the
 * scalar loop. The result is the same on either path (a copy).
 */
#include "ops/ops.h"

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define TK_TRANSPOSE_AVX512 1
#include <immintrin.h>
#endif

#ifdef TK_TRANSPOSE_AVX512
/* out [16 rows, stride lout] = in [16 rows, stride lin]^T */
__attribute__((target("avx512f"))) static void transpose16(const float *in, size_t lin, float *out, size_t lout) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(in + i * lin);
    for (int i = 0; i < 8; i++) { /* pairs of rows, interleaved by element */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* quads of rows: r[4i + c] holds columns c, c+4, c+8, c+12 of rows 4i..4i+3 */
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) { /* gather the 128-bit lanes of the four quads */
        __m512 a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
        __m512 d = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), e = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
        t[c] = _mm512_shuffle_f32x4(a, d, 0x88);
        t[c + 8] = _mm512_shuffle_f32x4(a, d, 0xdd);
        t[c + 4] = _mm512_shuffle_f32x4(b, e, 0x88);
        t[c + 12] = _mm512_shuffle_f32x4(b, e, 0xdd);
    }
    for (int j = 0; j < 16; j++) _mm512_storeu_ps(out + j * lout, t[j]);
}

#endif

/* out [c][r] = in [r][c] for r < rows, c < cols, scalar, in 16-row strips (the source rows of a strip
 * stay in L1 while each output row gets up to 16 contiguous values). */
static void transpose_scalar(float *out, size_t ldo, const float *in, size_t ldi, size_t r0, size_t rows,
                             size_t c0, size_t cols) {
    for (size_t rs = r0; rs < rows; rs += 16) {
        size_t re = rows - rs < 16 ? rows : rs + 16;
        for (size_t c = c0; c < cols; c++)
            for (size_t r = rs; r < re; r++) out[c * ldo + r] = in[r * ldi + c];
    }
}

void tk_transpose(float *out, size_t ldo, const float *in, size_t ldi, size_t rows, size_t cols) {
    size_t r16 = 0, c16 = 0;
#ifdef TK_TRANSPOSE_AVX512
    if (__builtin_cpu_supports("avx512f")) {
        r16 = rows & ~(size_t)15, c16 = cols & ~(size_t)15;
        for (size_t r = 0; r < r16; r += 16)
            for (size_t c = 0; c < c16; c += 16) transpose16(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
    }
#endif
    transpose_scalar(out, ldo, in, ldi, 0, r16, c16, cols); /* right edge of the 16-row strips */
    transpose_scalar(out, ldo, in, ldi, r16, rows, 0, cols); /* bottom rows */
}
