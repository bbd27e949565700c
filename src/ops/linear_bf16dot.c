/* linear_bf16dot.c: the frozen linear layers computed in BF16 with fp32 accumulation (--compute bf16),
 * on AVX512-BF16's vdpbf16ps, as torch.autocast("cpu", dtype=torch.bfloat16) computes a linear layer.
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), I  input width, O  output width; Ip = I rounded up to even, Op = O rounded up to 64
 *
 * vdpbf16ps multiplies 16 pairs of BF16 values by 16 pairs and adds each pair's two products to one fp32
 * lane, so both operands of a product hold consecutive depth (k) elements as pairs:
 *   - the weight, packed once (tk_bf16dot_pack): panels of 64 output rows, panel p holding pair rows
 *     kp = 0 .. Ip/2-1 of [64][2]: wd[64p Ip + 128 kp + 2j + e] = bf16(w[64p + j][2kp + e]), zero where
 *     the row or column is past w's (Op Ip values in all);
 *   - the activations (x forward, dy backward), rounded to BF16 (nearest even) once per call into rows of
 *     Ip (or Op) values, zero-padded, whose 32-bit pairs are broadcast.
 * Each element of y is summed over k pairs in order in fp32, k blocks in order, so results do not depend
 * on the thread count or on which thread ran which rows.
 *
 * The register tile is 6 rows x 64 columns (24 zmm accumulators, 4 loads of the panel and 6 broadcasts
 * per k pair), as in linear_packed.c. The forward reads the panels as packed; the backward (dx = dy w,
 * depth O) needs pairs along o instead, and builds them for one [768 o, 64 i] block at a time in a
 * per-thread buffer: a pair row of the panel holds (w[o][i], w[o][i+1], w[o+1][i], w[o+1][i+1]) in 64
 * bits, and the buffer wants (w[o][i], w[o+1][i], w[o][i+1], w[o+1][i+1]): a swap of the middle two
 * halves, so the block is built 64 bits at a time.
 *
 * Work is split in units of (one 64-wide panel of the output, a block of rows) taken dynamically by the
 * threads (a shared host's cores run at different speeds from moment to moment).
 * AMX-BF16 tiles are not used: CPUs with AMX also have AVX512-BF16 and run this kernel.
 * Only for CPUs with AVX-512F, AVX-512BW and AVX512-BF16 (tk_bf16dot_available, from cpuid at run time);
 * the code is compiled with per-function target attributes, so the rest of the build keeps its flags.
 */
#include "ops/ops.h"

#include "common.h"
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define TK_BF16DOT 1
#include <immintrin.h>
#define TK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif

#define DP_PANEL 64    /* output columns per panel (4 zmm) */
#define DP_MR 6        /* rows per register tile */
#define DP_KC 1024     /* forward k block, in pairs: a [1024, 64, 2] panel block is 256 KiB */
#define DP_OC 768      /* backward depth block, in o's (a multiple of 64): the [384, 64, 2] buffer, 96 KiB */
#define DP_UNITS 4     /* units per thread at least, where the rows allow */
#define DP_MIN_WORK 65536 /* N I O below this: one thread */

int tk_bf16dot_available(void) {
    static int state = -1;
    if (state < 0) {
        const char *v = getenv("TSPEFT_BF16DOT");
        state = 0;
#ifdef TK_BF16DOT
        if (!(v && strcmp(v, "0") == 0))
            state = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512bf16");
#else
        (void)v;
#endif
    }
    return state;
}

static size_t even_up(size_t n) { return n + (n & 1); }
static size_t panels_up(size_t n) { return (n + DP_PANEL - 1) / DP_PANEL * DP_PANEL; }

size_t tk_bf16dot_size(size_t O, size_t I) { return panels_up(O) * even_up(I); }

void tk_bf16dot_pack(uint16_t *wd, const float *w, const uint16_t *wh, size_t O, size_t I) {
    size_t Ip = even_up(I), np = panels_up(O) / DP_PANEL;
#pragma omp parallel for schedule(static) if (O * I >= DP_MIN_WORK)
    for (size_t p = 0; p < np; p++) {
        uint16_t *dst = wd + p * DP_PANEL * Ip;
        for (size_t kp = 0; kp < Ip / 2; kp++)
            for (size_t j = 0; j < DP_PANEL; j++)
                for (size_t e = 0; e < 2; e++) {
                    size_t o = p * DP_PANEL + j, k = 2 * kp + e;
                    uint16_t v = 0;
                    if (o < O && k < I) v = w ? tk_f32_to_bf16(w[o * I + k]) : wh[o * I + k];
                    dst[kp * 2 * DP_PANEL + 2 * j + e] = v;
                }
    }
}

#ifdef TK_BF16DOT
/* d [ldd] = bf16(s [cols]) rounded to nearest even (vcvtne2ps2bf16), d[cols .. ldd-1] zero. */
TK_BF16_TARGET static void round_row(uint16_t *d, size_t ldd, const float *s, size_t cols) {
    for (size_t j = 0; j < ldd; j += 32) {
        size_t left = cols > j ? cols - j : 0;
        __mmask16 mlo = (__mmask16)(left >= 16 ? 0xffffu : (1u << left) - 1u);
        __mmask16 mhi = (__mmask16)(left >= 32 ? 0xffffu : left > 16 ? (1u << (left - 16)) - 1u : 0u);
        __m512 lo = _mm512_maskz_loadu_ps(mlo, s + j), hi = _mm512_maskz_loadu_ps(mhi, s + j + 16);
        __m512i b = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        size_t n = ldd - j < 32 ? ldd - j : 32;
        __mmask32 ms = (__mmask32)(n == 32 ? 0xffffffffu : (1u << n) - 1u);
        _mm512_mask_storeu_epi16(d + j, ms, b);
    }
}

/* dst [rows, ldd] = bf16(src [rows, cols], stride lds), columns cols .. ldd-1 zero. */
static void round_rows(uint16_t *dst, size_t ldd, const float *src, size_t lds, size_t rows, size_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= DP_MIN_WORK)
    for (size_t r = 0; r < rows; r++) round_row(dst + r * ldd, ldd, src + r * lds, cols);
}

/* C [mr rows, stride ldc; columns where cmask[v] is set] (+)= A [mr, kp pairs] B [kp pairs, 64]: A's
 * pair (i, k) is the 32 bits at A[i lda + k], B's pair row k is B + 64 k (64 pairs). Inline, with mr
 * constant at every use, so the loops unroll and the accumulators stay in registers. */
TK_BF16_TARGET __attribute__((always_inline)) static inline void
dp_tile(size_t mr, size_t kp, const uint32_t *A, size_t lda, const uint32_t *B, float *C, size_t ldc,
        const __mmask16 *cmask, int acc_c) {
    __m512 acc[DP_MR][4];
#pragma GCC unroll 6
    for (size_t i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (size_t v = 0; v < 4; v++) acc[i][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (size_t k = 0; k < kp; k++) {
        const uint32_t *b = B + k * DP_PANEL;
        __m512i bv[4];
#pragma GCC unroll 4
        for (size_t v = 0; v < 4; v++) bv[v] = _mm512_loadu_si512((const void *)(b + 16 * v));
#pragma GCC unroll 6
        for (size_t i = 0; i < mr; i++) {
            __m512i a = _mm512_set1_epi32((int)A[i * lda + k]);
#pragma GCC unroll 4
            for (size_t v = 0; v < 4; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)a, (__m512bh)bv[v]);
        }
    }
#pragma GCC unroll 6
    for (size_t i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (size_t v = 0; v < 4; v++) {
            if (!cmask[v]) continue;
            float *c = C + i * ldc + 16 * v;
            __m512 r = acc[i][v];
            if (acc_c) r = _mm512_add_ps(_mm512_maskz_loadu_ps(cmask[v], c), r);
            _mm512_mask_storeu_ps(c, cmask[v], r);
        }
}

typedef void (*dp_tile_fn)(size_t, const uint32_t *, size_t, const uint32_t *, float *, size_t, const __mmask16 *,
                           int);
#define DP_TILE(MR)                                                                                          \
    TK_BF16_TARGET static void dp_tile_##MR(size_t kp, const uint32_t *A, size_t lda, const uint32_t *B,     \
                                            float *C, size_t ldc, const __mmask16 *cmask, int acc_c) {       \
        dp_tile(MR, kp, A, lda, B, C, ldc, cmask, acc_c);                                                    \
    }
DP_TILE(1)
DP_TILE(2)
DP_TILE(3)
DP_TILE(4)
DP_TILE(5)
DP_TILE(6)
static const dp_tile_fn dp_tiles[DP_MR] = {dp_tile_1, dp_tile_2, dp_tile_3, dp_tile_4, dp_tile_5, dp_tile_6};

/* C [N rows, stride ldc, `cols` <= 64 columns] (+)= A [N, kp pairs, stride lda pairs] B [kp, 64 pairs]. */
static void rows_pass(size_t N, size_t cols, size_t kp, const uint32_t *A, size_t lda, const uint32_t *B, float *C,
                      size_t ldc, int acc_c) {
    __mmask16 cmask[4];
    for (size_t v = 0; v < 4; v++) {
        size_t left = cols > 16 * v ? cols - 16 * v : 0;
        cmask[v] = (__mmask16)(left >= 16 ? 0xffffu : (1u << left) - 1u);
    }
    for (size_t t = 0; t < N; t += DP_MR) {
        size_t mr = N - t < DP_MR ? N - t : DP_MR;
        dp_tiles[mr - 1](kp, A + t * lda, lda, B, C + t * ldc, ldc, cmask, acc_c);
    }
}

/* The activations rounded to BF16: one buffer, grown as needed and kept (the products are called from
 * serial code, one at a time, never from inside a parallel region). */
static uint16_t *g_act;
static size_t g_act_n;

static uint16_t *act_buffer(size_t n) {
    if (n > g_act_n) {
        free(g_act);
        g_act_n = 0;
        if (!(g_act = aligned_alloc(64, (n * sizeof(uint16_t) + 63) / 64 * 64))) {
            fprintf(stderr, "error: out of memory (%zu MiB for the BF16 activations)\n", (n * 2) >> 20);
            exit(1);
        }
        g_act_n = n;
    }
    return g_act;
}

static int threads_for(size_t N, size_t I, size_t O) { return N * I * O >= DP_MIN_WORK ? omp_get_max_threads() : 1; }

/* Rows per unit for np panels of N rows on nt threads: all N rows (a unit reads its panel, or builds its
 * transposed blocks, once for all of them) unless that leaves fewer than DP_UNITS units per thread; then
 * N split into equal blocks, a multiple of the tile's rows. */
static size_t unit_rows(size_t N, size_t np, int nt) {
    size_t want = (DP_UNITS * (size_t)nt + np - 1) / np, tiles = (N + DP_MR - 1) / DP_MR;
    size_t nrb = want < tiles ? want : tiles;
    if (nrb < 1) nrb = 1;
    size_t rows = (N + nrb - 1) / nrb;
    return (rows + DP_MR - 1) / DP_MR * DP_MR;
}
#endif

void tk_bf16dot_forward(float *y, const float *x, const uint16_t *wd, size_t N, size_t I, size_t O) {
    TK_ASSERT(tk_bf16dot_available());
    if (N == 0 || O == 0) return;
#ifdef TK_BF16DOT
    int nt = threads_for(N, I, O);
    size_t Ip = even_up(I), np = panels_up(O) / DP_PANEL, rows = unit_rows(N, np, nt), nrb = (N + rows - 1) / rows;
    uint16_t *xb = act_buffer(N * Ip);
    round_rows(xb, Ip, x, I, N, I);
    const uint32_t *A = (const uint32_t *)xb;
    size_t lda = Ip / 2, kp_all = Ip / 2;
    if (kp_all == 0) { /* I = 0: an empty sum */
        memset(y, 0, N * O * sizeof(float));
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (size_t u = 0; u < np * nrb; u++) {
        size_t p = u / nrb, r0 = u % nrb * rows, nr = N - r0 < rows ? N - r0 : rows;
        size_t cols = O - p * DP_PANEL < DP_PANEL ? O - p * DP_PANEL : DP_PANEL;
        const uint32_t *panel = (const uint32_t *)(wd + p * DP_PANEL * Ip);
        for (size_t k0 = 0; k0 < kp_all; k0 += DP_KC) {
            size_t kc = kp_all - k0 < DP_KC ? kp_all - k0 : DP_KC;
            rows_pass(nr, cols, kc, A + r0 * lda + k0, lda, panel + k0 * DP_PANEL, y + r0 * O + p * DP_PANEL, O,
                      k0 > 0);
        }
    }
#else
    (void)y, (void)x, (void)wd, (void)I;
#endif
}

#ifdef TK_BF16DOT
/* buf [oc/2 pairs of o][64 i][2] = w[o0 .. o0+oc-1][64 q .. 64 q + 63] from the packed panels (oc a
 * multiple of 64; columns past Ip are left as they are: the tile never stores them). */
static void pair_block(uint64_t *buf, const uint16_t *wd, size_t Ip, size_t o0, size_t oc, size_t q) {
    size_t kw = Ip - 64 * q < 64 ? Ip - 64 * q : 64; /* even */
    for (size_t ob = 0; ob < oc; ob += DP_PANEL) {
        const uint16_t *panel = wd + (o0 + ob) / DP_PANEL * DP_PANEL * Ip;
        for (size_t c = 0; c < kw; c += 2) {
            const uint64_t *src = (const uint64_t *)(panel + (32 * q + c / 2) * 2 * DP_PANEL);
            uint64_t *dst = buf + ob / 2 * 32 + c / 2;
            for (size_t jp = 0; jp < DP_PANEL / 2; jp++) {
                uint64_t s = src[jp];
                dst[jp * 32] = (s & 0xffff00000000ffffull) | ((s >> 16) & 0x00000000ffff0000ull) |
                               ((s << 16) & 0x0000ffff00000000ull);
            }
        }
    }
}
#endif

void tk_bf16dot_backward(float *dx, const float *dy, const uint16_t *wd, size_t N, size_t I, size_t O, float beta) {
    TK_ASSERT(tk_bf16dot_available());
    TK_ASSERT(beta == 0.0f || beta == 1.0f);
    if (N == 0 || I == 0) return;
    if (O == 0) {
        if (beta == 0.0f) memset(dx, 0, N * I * sizeof(float));
        return;
    }
#ifdef TK_BF16DOT
    int nt = threads_for(N, I, O);
    size_t Ip = even_up(I), Op = panels_up(O), nq = (I + DP_PANEL - 1) / DP_PANEL;
    size_t rows = unit_rows(N, nq, nt), nrb = (N + rows - 1) / rows;
    uint16_t *db = act_buffer(N * Op);
    round_rows(db, Op, dy, O, N, O);
    const uint32_t *A = (const uint32_t *)db;
    size_t lda = Op / 2;
#pragma omp parallel num_threads(nt)
    {
        /* the thread's [384 pairs of o][64][2] block, 96 KiB */
        uint64_t buf[DP_OC / 2 * 32] __attribute__((aligned(64)));
        memset(buf, 0, sizeof buf);
#pragma omp for schedule(dynamic, 1)
        for (size_t u = 0; u < nq * nrb; u++) {
            size_t q = u / nrb, r0 = u % nrb * rows, nr = N - r0 < rows ? N - r0 : rows;
            size_t cols = I - q * DP_PANEL < DP_PANEL ? I - q * DP_PANEL : DP_PANEL;
            for (size_t o0 = 0; o0 < Op; o0 += DP_OC) {
                size_t oc = Op - o0 < DP_OC ? Op - o0 : DP_OC;
                pair_block(buf, wd, Ip, o0, oc, q);
                rows_pass(nr, cols, oc / 2, A + r0 * lda + o0 / 2, lda, (const uint32_t *)buf,
                          dx + r0 * I + q * DP_PANEL, I, o0 > 0 || beta != 0.0f);
            }
        }
    }
#else
    (void)dy, (void)wd;
#endif
}
