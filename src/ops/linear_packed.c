/* linear_packed.c: the frozen linear layers on an AVX-512 kernel, with each frozen weight w [O,I] kept
 * in the layout that kernel reads (tk_llama_pack_frozen), so that no call packs it again.
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), I  input width, O  output width
 *
 * Layout: panels of 64 output rows. Panel p holds rows 64p .. 64p+w-1 of w (w = min(64, O - 64p)),
 * transposed to [I][w], at the offset where those rows were: wp[64p I + k w + j] = w[64p + j][k].
 * It is the same O I floats, so tk_linear_pack works in place.
 *
 * Why: cblas_sgemm packs both operands on every call. At 512 rows, packing every weight for only
 * 512 uses (the transposed weight copy of y = x w^T above all) and zero-filling y for beta 0 cost
 * OpenBLAS about 13% of a LoRA training step (docs/performance.md). Here the forward reads the
 * panels as they are and broadcasts x from its rows; the backward (dx (+)= dy w) transposes one
 * [768, 64] block of panels at a time into a per-thread buffer, L2-resident while every row of dy
 * passes over it, and broadcasts dy from its rows. Neither x nor dy is copied.
 *
 * The register tile is 6 rows x 64 columns of the output (24 zmm accumulators, 4 loads of the
 * weight panel and 6 broadcasts per k). Threads split the output's 64-column panels; each output
 * element is summed in k order, blocks in order, so results do not depend on the thread count.
 * BF16-resident weights use the same panels of BF16 values: each block is converted (exactly) into an
 * fp32 buffer before the same kernel reads it, with the same blocks, so the results are those of the
 * fp32 kernel on the converted weight.
 * Each row tile also prefetches the next tile's rows of the output (cold on every pass). Neither
 * product zero-fills: the forward overwrites y, and the backward overwrites dx on its first depth
 * block when beta is 0.
 * Only for machines with AVX-512F: tk_linear_packed_available says whether to pack at all.
 */
#include "ops/ops.h"

#include "common.h"
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define TK_PACKED_AVX512 1
#include "ops/tile_avx512.h"
#endif

#define TK_PANEL 64  /* output columns per panel (4 zmm) */
#define TK_PK_MR 6   /* rows per register tile */
/* Forward k block: a [1024, 64] panel block is 256 KiB, L2-resident while all rows pass (K = 768 in
 * one block, 2048 in two). Backward depth block (a multiple of TK_PANEL): the thread's transposed
 * [768, 64] block, 192 KiB. Measured on the issue-7 sequence against 384/384 and 256/256 (docs/
 * performance.md); -D overrides them, for tuning. */
#ifndef TK_PK_KC
#define TK_PK_KC 1024
#endif
#ifndef TK_PK_OC
#define TK_PK_OC 768
#endif
#define TK_PK_MIN_WORK 65536 /* N I O below this: one thread */

int tk_linear_packed_available(void) {
    static int state = -1;
    if (state < 0) state = tk_avx512_allowed("TSPEFT_PACKED", "0");
    return state;
}

/* Width of 64-wide panel (or column block) p of n: 64, or what is left for the last one. */
static size_t panel_width(size_t n, size_t p) { return n - p * TK_PANEL < TK_PANEL ? n - p * TK_PANEL : TK_PANEL; }

/* This thread's share [*lo, *hi) of n items split evenly over the team, in order. */
static void thread_share(size_t n, size_t *lo, size_t *hi) {
    size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
    *lo = n * id / nt, *hi = n * (id + 1) / nt;
}

/* The panel rearrangement, for 4-byte (fp32) or 2-byte (BF16) elements. */
static int pack_panels(void *w, size_t elem, size_t O, size_t I) {
    size_t np = (O + TK_PANEL - 1) / TK_PANEL;
    int rc = 0;
#pragma omp parallel reduction(| : rc) if (O * I >= TK_PK_MIN_WORK)
    {
        void *tmp = malloc(TK_PANEL * I * elem);
        if (!tmp) rc = 1;
#pragma omp for schedule(static)
        for (size_t p = 0; p < np; p++) {
            if (!tmp) continue;
            size_t w_ = panel_width(O, p);
            char *blk = (char *)w + p * TK_PANEL * I * elem;
            memcpy(tmp, blk, w_ * I * elem);
            if (elem == sizeof(float)) {
                const float *t = tmp;
                float *b = (float *)blk;
                for (size_t j = 0; j < w_; j++)
                    for (size_t k = 0; k < I; k++) b[k * w_ + j] = t[j * I + k];
            } else {
                const uint16_t *t = tmp;
                uint16_t *b = (uint16_t *)blk;
                for (size_t j = 0; j < w_; j++)
                    for (size_t k = 0; k < I; k++) b[k * w_ + j] = t[j * I + k];
            }
        }
        free(tmp);
    }
    return rc ? -1 : 0;
}

int tk_linear_pack(float *w, size_t O, size_t I) { return pack_panels(w, sizeof(float), O, I); }
int tk_linear_pack_bf16(uint16_t *w, size_t O, size_t I) { return pack_panels(w, sizeof(uint16_t), O, I); }

/* The packed weight: fp32 (f) or BF16 (h), the other NULL. BF16 blocks are converted (exactly) into
 * an fp32 buffer before the same kernel reads them. */
typedef struct {
    const float *f;
    const uint16_t *h;
} packed_src;

static size_t src_elem(packed_src w) { return w.f ? sizeof(float) : sizeof(uint16_t); }

/* n values of the packed weight from element off, as fp32: in place, or converted into tmp. */
static const float *src_floats(packed_src w, size_t off, size_t n, float *tmp) {
    if (w.f) return w.f + off;
    const uint16_t *h = w.h + off;
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h[i] << 16;
        memcpy(&tmp[i], &u, 4);
    }
    return tmp;
}

#ifdef TK_PACKED_AVX512
/* C rows 0..mr-1 (cols 0..16 nv - 1, the last vector masked by `last`) = or += A [mr, kc] B [kc, 16 nv];
 * A's rows at stride lda (broadcast), B's rows at stride ldb, C's at stride ldc (tile_avx512.h). */
__attribute__((target("avx512f"), always_inline)) static inline void
tile(int mr, int nv, __mmask16 last, size_t kc, const float *A, size_t lda, const float *B, size_t ldb,
     float *C, size_t ldc, int acc_c) {
    tk_tile_avx512(0, (size_t)mr, (size_t)nv, last, kc, 1.0f, A, lda, NULL, B, ldb, NULL, C, ldc, 0, acc_c);
}

typedef void (*tile_fn)(__mmask16, size_t, const float *, size_t, const float *, size_t, float *, size_t, int);
#define TK_PK_TILE(MR, NV)                                                                                 \
    __attribute__((target("avx512f"))) static void tile_##MR##_##NV(__mmask16 last, size_t kc, const float *A, \
                                                                   size_t lda, const float *B, size_t ldb,  \
                                                                   float *C, size_t ldc, int acc_c) {      \
        tile(MR, NV, last, kc, A, lda, B, ldb, C, ldc, acc_c);                                             \
    }
#define TK_PK_TILES(MR) TK_PK_TILE(MR, 1) TK_PK_TILE(MR, 2) TK_PK_TILE(MR, 3) TK_PK_TILE(MR, 4)
TK_PK_TILES(1)
TK_PK_TILES(2)
TK_PK_TILES(3)
TK_PK_TILES(4)
TK_PK_TILES(5)
TK_PK_TILES(6)
#define TK_PK_ROW(MR) {tile_##MR##_1, tile_##MR##_2, tile_##MR##_3, tile_##MR##_4}
static const tile_fn tiles[TK_PK_MR][4] = {TK_PK_ROW(1), TK_PK_ROW(2), TK_PK_ROW(3),
                                           TK_PK_ROW(4), TK_PK_ROW(5), TK_PK_ROW(6)};

/* Memory to bring into L2 while a pass computes: n_chunks chunks of `lines` 64-byte lines, chunk c
 * at base + c * stride bytes (the backward's next block of panels; a prefetch never faults, so a
 * partial last panel's chunk may reach past it). */
typedef struct {
    const char *base;
    size_t stride, n_chunks, lines;
} prefetch_plan;

/* C [N, cols] (+)= A [N, kc] B [kc, cols] over all N rows, cols <= 64; pf (or NULL) is prefetched
 * in even slices between the row tiles. */
static void rows_pass(size_t N, size_t cols, size_t kc, const float *A, size_t lda, const float *B, size_t ldb,
                      float *C, size_t ldc, int acc_c, const prefetch_plan *pf) {
    int nv = (int)((cols + 15) / 16);
    size_t tail = cols - 16 * (size_t)(nv - 1);
    __mmask16 last = (__mmask16)(tail == 16 ? 0xffffu : (1u << tail) - 1u);
    size_t n_tiles = (N + TK_PK_MR - 1) / TK_PK_MR, lines = pf ? pf->n_chunks * pf->lines : 0;
    /* the prefetch walk: line l_done of the plan is line l_in of chunk `chunk`, at address at (no
     * division per line: a tile's share is a few lines, and two divisions each cost more) */
    size_t l_done = 0, l_in = 0;
    const char *at = pf ? pf->base : NULL, *chunk = at;
    for (size_t i = 0, t = 0; t < N; i++, t += TK_PK_MR) {
        int mr = N - t < TK_PK_MR ? (int)(N - t) : TK_PK_MR;
        /* the next tile's rows of C (cold: written or read once per pass) are requested now */
        for (size_t r = t + TK_PK_MR; r < t + 2 * TK_PK_MR && r < N; r++)
            for (size_t v = 0; v < (size_t)nv; v++) _mm_prefetch((const char *)(C + r * ldc + 16 * v), _MM_HINT_T0);
        tiles[mr - 1][nv - 1](last, kc, A + t * lda, lda, B, ldb, C + t * ldc, ldc, acc_c);
        for (size_t l_end = lines * (i + 1) / n_tiles; l_done < l_end; l_done++) {
            _mm_prefetch(at, _MM_HINT_T1);
            at += 64;
            if (++l_in == pf->lines) chunk += pf->stride, at = chunk, l_in = 0;
        }
    }
}

/* buf [oc, 64] (row o - o0, column kk) = w [o][64 q + kk] for o in o0 .. o0+oc-1, kk < kw, read from
 * the panels; columns kw..63 are left as they are (the tile never stores them). */
static void transpose_block(float *buf, packed_src w, size_t I, size_t O, size_t o0, size_t oc, size_t q,
                            size_t kw) {
    float tmp[TK_PANEL * TK_PANEL] __attribute__((aligned(64))); /* one BF16 block as fp32 */
    for (size_t ob = 0; ob < oc; ob += TK_PANEL) {
        size_t p = (o0 + ob) / TK_PANEL, w_ = panel_width(O, p);
        /* [kw rows, stride w_] */
        const float *src = src_floats(w, p * TK_PANEL * I + q * TK_PANEL * w_, kw * w_, tmp);
        tk_transpose(buf + ob * TK_PANEL, TK_PANEL, src, w_, kw, w_);
    }
}
#endif


static void packed_forward(float *y, const float *x, packed_src w, size_t N, size_t I, size_t O) {
    if (N == 0 || O == 0) return;
    if (I == 0) {
        memset(y, 0, N * O * sizeof(float));
        return;
    }
#ifdef TK_PACKED_AVX512
    size_t np = (O + TK_PANEL - 1) / TK_PANEL, KC = TK_PK_KC;
#pragma omp parallel if (N * I * O >= TK_PK_MIN_WORK)
    {
        /* BF16 only: a [1024, 64] panel block converted to fp32, 256 KiB on each thread's stack (the
         * same k blocks as fp32, so the sums and results are the fp32 kernel's on the same values) */
        float buf[TK_PK_KC * TK_PANEL] __attribute__((aligned(64)));
        size_t p0, p1;
        thread_share(np, &p0, &p1);
        for (size_t k0 = 0; k0 < I; k0 += KC) {
            size_t kc = I - k0 < KC ? I - k0 : KC;
            for (size_t p = p0; p < p1; p++) {
                size_t w_ = panel_width(O, p);
                const float *B = src_floats(w, p * TK_PANEL * I + k0 * w_, kc * w_, buf);
                rows_pass(N, w_, kc, x + k0, I, B, w_, y + p * TK_PANEL, O, k0 > 0, NULL);
            }
        }
    }
#endif
}

void tk_linear_packed_forward(float *y, const float *x, const float *wp, size_t N, size_t I, size_t O) {
    TK_ASSERT(tk_linear_packed_available());
    packed_forward(y, x, (packed_src){wp, NULL}, N, I, O);
}

void tk_linear_packed_forward_bf16(float *y, const float *x, const uint16_t *wp, size_t N, size_t I, size_t O) {
    TK_ASSERT(tk_linear_packed_available());
    packed_forward(y, x, (packed_src){NULL, wp}, N, I, O);
}

static void packed_backward(float *dx, const float *dy, packed_src w, size_t N, size_t I, size_t O, float beta) {
    TK_ASSERT(beta == 0.0f || beta == 1.0f);
    if (N == 0 || I == 0) return;
    if (O == 0) {
        if (beta == 0.0f) memset(dx, 0, N * I * sizeof(float));
        return;
    }
#ifdef TK_PACKED_AVX512
    size_t nq = (I + TK_PANEL - 1) / TK_PANEL, elem = src_elem(w);
    const char *base = w.f ? (const char *)w.f : (const char *)w.h;
#pragma omp parallel if (N * I * O >= TK_PK_MIN_WORK)
    {
        /* 192 KiB on each thread's stack: the transposed [oc, 64] block of w */
        float buf[TK_PK_OC * TK_PANEL] __attribute__((aligned(64)));
        size_t q0, q1;
        thread_share(nq, &q0, &q1);
        for (size_t o0 = 0; o0 < O; o0 += TK_PK_OC) {
            size_t oc = O - o0 < TK_PK_OC ? O - o0 : TK_PK_OC;
            for (size_t q = q0; q < q1; q++) {
                size_t kw = panel_width(I, q);
                transpose_block(buf, w, I, O, o0, oc, q, kw);
                /* the transpose alone would wait on memory: the next block's panels are fetched
                 * while this one's rows run (next q, else the first q of the next depth block) */
                size_t on = q + 1 < q1 ? o0 : o0 + TK_PK_OC, qn = q + 1 < q1 ? q + 1 : q0;
                size_t ocn = on < O ? (O - on < TK_PK_OC ? O - on : TK_PK_OC) : 0;
                prefetch_plan pf = {base + (on * I + qn * TK_PANEL * TK_PANEL) * elem, TK_PANEL * I * elem,
                                    (ocn + TK_PANEL - 1) / TK_PANEL, TK_PANEL * TK_PANEL * elem / 64};
                rows_pass(N, kw, oc, dy + o0, O, buf, TK_PANEL, dx + q * TK_PANEL, I, o0 > 0 || beta != 0.0f,
                          ocn ? &pf : NULL);
            }
        }
    }
#endif
}

void tk_linear_packed_backward(float *dx, const float *dy, const float *wp, size_t N, size_t I, size_t O,
                               float beta) {
    TK_ASSERT(tk_linear_packed_available());
    packed_backward(dx, dy, (packed_src){wp, NULL}, N, I, O, beta);
}

void tk_linear_packed_backward_bf16(float *dx, const float *dy, const uint16_t *wp, size_t N, size_t I, size_t O,
                                    float beta) {
    TK_ASSERT(tk_linear_packed_available());
    packed_backward(dx, dy, (packed_src){NULL, wp}, N, I, O, beta);
}
