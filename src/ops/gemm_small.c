/* gemm_small.c: the small products inside attention and the fused LoRA branch, one thread each.
 *
 *   C [M,N] = alpha * A B  (+ C when acc),  A [M rows, stride lda],  B [K rows, stride ldb],
 *   C [M rows, stride ldc], all row-major; tk_gemm_small_rows takes B's and C's rows by pointer
 *   (the LoRA backward's kept tokens, used where they are instead of copied).
 *
 * Why not cblas_sgemm: inside attention each call is one thread's [64,64] x [64,E] or [64,E] x
 * [E,64] piece (E <= S keys), and OpenBLAS packs both operands for every such call. Measured on one
 * thread, the per-block products of one head at T = S = 512, D = 64 (docs/performance.md):
 * scores (K^T stored) 118 -> 178 GFLOP/s, dP = dO V^T (V^T stored) 115 -> 174, dQ += dS K 137 -> 156.
 * The products that read an operand down its columns (dV += P^T dO, dK += dS^T Q) stay with
 * cblas_sgemm, which packs such operands faster than a copy here did (150-163 against 99-106).
 * In the LoRA branch (64-row chunks, r = 16): m = s u B^T 89 -> 139, gr = dy B 88 -> 127 GFLOP/s.
 *
 * The AVX-512 kernel (the tile of tile_avx512.h) keeps a 6 x 64 tile of C in 24 zmm registers: per k
 * it loads 4 vectors of B's row k and broadcasts 6 values of A (10 loads for 24 FMAs; a 4 x 64 tile,
 * 8 loads for 16 FMAs, ran the one-thread products up to 7-13% slower); row tails take 4-row tiles;
 * where C is one vector wide (N <= 16) the tile is 12 x 16 (13 loads for 12 FMAs). K runs in blocks of
 * TK_GEMM_KB so that
 * B's [KB, 64] panel stays in L1 across the row tiles. Column tails use masked loads and stores, so
 * nothing outside C [M,N] is read from C or written. Each element of C is summed in k order within
 * a block, blocks in order: the result depends on the shapes only, never on the thread count.
 *
 * Machines without AVX-512F (checked once, at the first call) take cblas_sgemm instead;
 * TSPEFT_GEMM_SMALL=blas forces that path (tests/test_gemm_small.c runs both).
 */
#include "ops/ops.h"

#include "blas.h"
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define TK_GEMM_AVX512 1
#include "ops/tile_avx512.h"
#endif

#define TK_GEMM_KB 128 /* k block: B's [128, 64] panel is 32 KiB, L1-resident across the row tiles */

static void gemm_blas(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                      const float *B, size_t ldb, int acc, float *C, size_t ldc) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(M), tk_blas_dim(N), tk_blas_dim(K),
                alpha, A, tk_blas_dim(lda), B, tk_blas_dim(ldb), acc ? 1.0f : 0.0f, C, tk_blas_dim(ldc));
}

#ifdef TK_GEMM_AVX512
/* One tile (tile_avx512.h) with B's rows and C's rows by pointer: the strided form builds these
 * pointers per block; tk_gemm_small_rows passes gathered rows. */
__attribute__((target("avx512f"), always_inline)) static inline void
tile(size_t mr, size_t nv, __mmask16 last, size_t K, float alpha, const float *A, size_t lda,
     const float *const *Bp, float *const *Cp, size_t off, int acc_c) {
    tk_tile_avx512(1, mr, nv, last, K, alpha, A, lda, Bp, NULL, 0, Cp, NULL, 0, off, acc_c);
}

typedef void (*tile_fn)(__mmask16, size_t, float, const float *, size_t, const float *const *, float *const *,
                        size_t, int);
#define TK_TILE(MR, NV)                                                                                      \
    __attribute__((target("avx512f"))) static void tile_##MR##_##NV(                                       \
        __mmask16 last, size_t K, float alpha, const float *A, size_t lda, const float *const *Bp,           \
        float *const *Cp, size_t off, int acc) {                                                             \
        tile(MR, NV, last, K, alpha, A, lda, Bp, Cp, off, acc);                                              \
    }
TK_TILE(1, 1) TK_TILE(1, 2) TK_TILE(1, 3) TK_TILE(1, 4)
TK_TILE(2, 1) TK_TILE(2, 2) TK_TILE(2, 3) TK_TILE(2, 4)
TK_TILE(3, 1) TK_TILE(3, 2) TK_TILE(3, 3) TK_TILE(3, 4)
TK_TILE(4, 1) TK_TILE(4, 2) TK_TILE(4, 3) TK_TILE(4, 4)
TK_TILE(6, 1) TK_TILE(6, 2) TK_TILE(6, 3) TK_TILE(6, 4)
TK_TILE(12, 1)
static const tile_fn tiles6[4] = {tile_6_1, tile_6_2, tile_6_3, tile_6_4};
static const tile_fn tiles[4][4] = {{tile_1_1, tile_1_2, tile_1_3, tile_1_4},
                                    {tile_2_1, tile_2_2, tile_2_3, tile_2_4},
                                    {tile_3_1, tile_3_2, tile_3_3, tile_3_4},
                                    {tile_4_1, tile_4_2, tile_4_3, tile_4_4}};

/* C rows Cp[0..M-1] (= or +=) alpha * A B over one k block of kb rows of B (Bp[0..kb-1]), all N
 * columns. */
static void kblock_avx512(size_t M, size_t N, size_t kb, float alpha, const float *A, size_t lda,
                          const float *const *Bp, float *const *Cp, int acc_c) {
    for (size_t n0 = 0; n0 < N; n0 += 64) {
        size_t nn = N - n0 < 64 ? N - n0 : 64, nv = (nn + 15) / 16, rem = nn - 16 * (nv - 1);
        __mmask16 last = (__mmask16)((1u << rem) - 1u);
        size_t m0 = 0;
        if (nv == 1) /* one vector wide (rank-16 LoRA products): 12 rows a tile, 13 loads per 12 FMAs */
            for (; m0 + 12 <= M; m0 += 12) tile_12_1(last, kb, alpha, A + m0 * lda, lda, Bp, Cp + m0, n0, acc_c);
        for (; m0 + 6 <= M; m0 += 6) tiles6[nv - 1](last, kb, alpha, A + m0 * lda, lda, Bp, Cp + m0, n0, acc_c);
        for (; m0 < M; m0 += 4) {
            size_t mr = M - m0 < 4 ? M - m0 : 4;
            tiles[mr - 1][nv - 1](last, kb, alpha, A + m0 * lda, lda, Bp, Cp + m0, n0, acc_c);
        }
    }
}

/* Rows per C-pointer block of the strided form (its pointers live on the stack). */
#define TK_GEMM_MB 256

static void gemm_avx512(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                        const float *B, size_t ldb, int acc, float *C, size_t ldc) {
    const float *bp[TK_GEMM_KB];
    float *cp[TK_GEMM_MB];
    for (size_t m0 = 0; m0 < M; m0 += TK_GEMM_MB) {
        size_t mb = M - m0 < TK_GEMM_MB ? M - m0 : TK_GEMM_MB;
        for (size_t i = 0; i < mb; i++) cp[i] = C + (m0 + i) * ldc;
        for (size_t k0 = 0; k0 < K; k0 += TK_GEMM_KB) {
            size_t kb = K - k0 < TK_GEMM_KB ? K - k0 : TK_GEMM_KB;
            for (size_t k = 0; k < kb; k++) bp[k] = B + (k0 + k) * ldb;
            kblock_avx512(mb, N, kb, alpha, A + m0 * lda + k0, lda, bp, cp, acc || k0 > 0);
        }
    }
}

static void gemm_rows_avx512(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                             const float *const *Brows, int acc, float *const *Crows) {
    for (size_t k0 = 0; k0 < K; k0 += TK_GEMM_KB) {
        size_t kb = K - k0 < TK_GEMM_KB ? K - k0 : TK_GEMM_KB;
        kblock_avx512(M, N, kb, alpha, A + k0, lda, Brows + k0, Crows, acc || k0 > 0);
    }
}
#endif

/* 1: AVX-512 kernel, 0: cblas_sgemm; decided once (racing first calls decide the same). */
static int use_avx512(void) {
#ifdef TK_GEMM_AVX512
    static int state = -1;
    if (state < 0) state = tk_avx512_allowed("TSPEFT_GEMM_SMALL", "blas");
    return state;
#else
    return 0;
#endif
}

int tk_gemm_small_avx512(void) { return use_avx512(); }

void tk_gemm_small_rows(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                        const float *const *Brows, int acc, float *const *Crows) {
    TK_ASSERT(use_avx512());
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (!acc)
            for (size_t m = 0; m < M; m++) memset(Crows[m], 0, N * sizeof(float));
        return;
    }
#ifdef TK_GEMM_AVX512
    gemm_rows_avx512(M, N, K, alpha, A, lda, Brows, acc, Crows);
#endif
}

void tk_gemm_small(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda, const float *B,
                   size_t ldb, int acc, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) { /* an empty sum: C = 0, or C unchanged */
        if (!acc)
            for (size_t m = 0; m < M; m++) memset(&C[m * ldc], 0, N * sizeof(float));
        return;
    }
#ifdef TK_GEMM_AVX512
    if (use_avx512()) {
        gemm_avx512(M, N, K, alpha, A, lda, B, ldb, acc, C, ldc);
        return;
    }
#endif
    gemm_blas(M, N, K, alpha, A, lda, B, ldb, acc, C, ldc);
}
