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
 * weight panel and 6 broadcasts per k). Threads take the output's 64-column panels in turn and share
 * the last ones by row blocks (share_block below); each output element is summed in k order, blocks
 * in order, so results do not depend on the thread count or on who ran which rows.
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
#include <stdint.h>
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
 * [768, 64] block, 192 KiB. Measured on the 85 frozen products of the reference bench step against
 * 768/384 and 384/384 (docs/performance.md); -D overrides them, for tuning. */
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

/* Memory to bring into L2 while a pass computes: chunks of `lines` 64-byte lines, chunk c at
 * base + c * stride bytes (the backward's next block of panels; a prefetch never faults, so a
 * partial last panel's chunk may reach past it). A pass fetches the plan's lines lo .. hi-1. */
typedef struct {
    const char *base;
    size_t stride, lines, lo, hi;
} prefetch_plan;

/* C [N, cols] (+)= A [N, kc] B [kc, cols] over all N rows, cols <= 64; pf's lines (or none, NULL)
 * are prefetched in even slices between the row tiles. */
static void rows_pass(size_t N, size_t cols, size_t kc, const float *A, size_t lda, const float *B, size_t ldb,
                      float *C, size_t ldc, int acc_c, const prefetch_plan *pf) {
    int nv = (int)((cols + 15) / 16);
    size_t tail = cols - 16 * (size_t)(nv - 1);
    __mmask16 last = (__mmask16)(tail == 16 ? 0xffffu : (1u << tail) - 1u);
    size_t n_tiles = (N + TK_PK_MR - 1) / TK_PK_MR;
    /* the prefetch walk: line l_done of the plan is line l_in of the chunk at `chunk`, at address at
     * (no division per line: a tile's share is a few lines, and two divisions each cost more) */
    size_t lo = pf ? pf->lo : 0, lines = pf ? pf->hi - pf->lo : 0, l_done = 0, l_in = pf ? lo % pf->lines : 0;
    const char *chunk = pf ? pf->base + lo / pf->lines * pf->stride : NULL, *at = chunk ? chunk + 64 * l_in : NULL;
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

/* ---- sharing a depth block of a product between the threads ----------------------------------
 * A depth block's work is np units (one 64-wide panel of the output, all N rows), each run in row
 * blocks. Threads take units in turn from a shared counter and run their unit's row blocks from the
 * first; a thread that finds no unit left takes row blocks from the ends of the units the others are
 * still running. Why: on a shared host the two vCPUs' speeds differ from moment to moment, and the
 * static split of the panels that this replaced made every product wait on the slower thread (perf:
 * each thread spent about 5% of a step spinning in libgomp's barrier). Who runs a row block does not
 * change its sums (each element is summed in k order, depth blocks in order), so the results stay
 * bitwise the same for any thread count and any split. */
#define TK_PK_RB 48          /* rows per row block: 8 row tiles */
#define TK_PK_MAX_THREADS 64 /* threads that share a product (more are not used) */

/* A thread's running unit: unit << 32 | back << 16 | front. Its row blocks front .. back-1 are not
 * taken yet; the owner takes the front one, others the back one, each with a compare-and-swap. */
typedef struct {
    uint64_t v __attribute__((aligned(64)));
} unit_slot;

typedef struct {
    uint64_t next[2] __attribute__((aligned(64))); /* the next unit to take, of even and odd depth blocks */
    unit_slot slot[TK_PK_MAX_THREADS];
} work_share;

/* Row block *rb of s's unit, taken from the front (thief 0) or the back; 0 when none is left. */
static int take_row_block(unit_slot *s, int thief, size_t *unit, size_t *rb) {
    uint64_t cur = __atomic_load_n(&s->v, __ATOMIC_RELAXED);
    for (;;) {
        uint64_t front = cur & 0xffff, back = (cur >> 16) & 0xffff;
        if (front >= back) return 0;
        uint64_t next = thief ? cur - ((uint64_t)1 << 16) : cur + 1;
        if (__atomic_compare_exchange_n(&s->v, &cur, next, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *unit = (size_t)(cur >> 32), *rb = (size_t)(thief ? back - 1 : front);
            return 1;
        }
    }
}

/* Runs row block rb of unit u of the current depth block on the calling thread; own: the thread's
 * own unit (its row blocks come in order from 0), else a block taken from another thread's. */
typedef void (*row_block_fn)(void *ctx, size_t u, size_t rb, int own);

/* One depth block (number b) of np units of nrb row blocks each, on the whole team: every thread of
 * the region calls it with the same arguments. Consecutive blocks need a barrier between them when
 * the second adds to what the first wrote. */
static void share_block(work_share *ws, size_t b, size_t np, size_t nrb, row_block_fn run, void *ctx) {
    size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
    unit_slot *mine = &ws->slot[id];
    /* the other parity's counter was last used by block b-1, which every thread has left (the
     * caller's barrier), and is next used by block b+1, after the next barrier */
    if (id == 0) __atomic_store_n(&ws->next[(b + 1) & 1], 0, __ATOMIC_RELAXED);
    size_t u, rb;
    for (;;) {
        uint64_t mine_u = __atomic_fetch_add(&ws->next[b & 1], 1, __ATOMIC_RELAXED);
        if (mine_u >= np) break;
        __atomic_store_n(&mine->v, mine_u << 32 | (uint64_t)nrb << 16, __ATOMIC_RELAXED);
        while (take_row_block(mine, 0, &u, &rb)) run(ctx, u, rb, 1);
    }
    for (size_t k = 1; k < nt; k++) /* no unit left: the ends of the others' */
        while (take_row_block(&ws->slot[(id + k) % nt], 1, &u, &rb)) run(ctx, u, rb, 0);
}

/* Rows per row block for N rows: TK_PK_RB, or more where N would need over 65535 blocks. */
static size_t row_block_rows(size_t N) {
    size_t r = TK_PK_RB;
    while ((N + r - 1) / r > 0xffff) r *= 2;
    return r;
}

/* Threads for a product of N I O multiply-adds: one below TK_PK_MIN_WORK. */
static int product_threads(size_t N, size_t I, size_t O) {
    int nt = omp_get_max_threads();
    if (nt > TK_PK_MAX_THREADS) nt = TK_PK_MAX_THREADS;
    return N * I * O >= TK_PK_MIN_WORK ? nt : 1;
}

/* A thread's view of the forward: y [N,O] (+)= x [N, k0 .. k0+kc-1] w^T for the panels it runs. */
typedef struct {
    float *y;
    const float *x;
    packed_src w;
    size_t N, I, O, rows, k0, kc;
    float *buf;  /* BF16 only: the panel block converted to fp32 */
    size_t held; /* the panel buf holds (SIZE_MAX: none) */
} fwd_job;

static void fwd_row_block(void *ctx, size_t p, size_t rb, int own) {
    (void)own;
    fwd_job *j = ctx;
    size_t w_ = panel_width(j->O, p), r0 = rb * j->rows, nr = j->N - r0 < j->rows ? j->N - r0 : j->rows;
    size_t off = p * TK_PANEL * j->I + j->k0 * w_;
    const float *B = j->w.f ? j->w.f + off : j->buf;
    if (!j->w.f && j->held != p) src_floats(j->w, off, j->kc * w_, j->buf), j->held = p;
    rows_pass(nr, w_, j->kc, j->x + r0 * j->I + j->k0, j->I, B, w_, j->y + r0 * j->O + p * TK_PANEL, j->O,
              j->k0 > 0, NULL);
}
#endif

static void packed_forward(float *y, const float *x, packed_src w, size_t N, size_t I, size_t O) {
    if (N == 0 || O == 0) return;
    if (I == 0) {
        memset(y, 0, N * O * sizeof(float));
        return;
    }
#ifdef TK_PACKED_AVX512
    size_t np = (O + TK_PANEL - 1) / TK_PANEL, rows = row_block_rows(N), nrb = (N + rows - 1) / rows;
    work_share ws;
    memset(&ws, 0, sizeof ws);
#pragma omp parallel num_threads(product_threads(N, I, O))
    {
        /* BF16 only: a [1024, 64] panel block converted to fp32, 256 KiB on each thread's stack (the
         * same k blocks as fp32, so the sums and results are the fp32 kernel's on the same values) */
        float buf[TK_PK_KC * TK_PANEL] __attribute__((aligned(64)));
        fwd_job j = {y, x, w, N, I, O, rows, 0, 0, buf, SIZE_MAX};
        for (size_t k0 = 0, b = 0; k0 < I; k0 += TK_PK_KC, b++) {
            if (b > 0) { /* the k block adds to what the one before wrote */
#pragma omp barrier
            }
            j.k0 = k0, j.kc = I - k0 < TK_PK_KC ? I - k0 : TK_PK_KC, j.held = SIZE_MAX;
            share_block(&ws, b, np, nrb, fwd_row_block, &j);
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

#ifdef TK_PACKED_AVX512
/* A thread's view of the backward: dx [N, I] (+)= dy [N, o0 .. o0+oc-1] w for the column blocks q it
 * runs. */
typedef struct {
    float *dx;
    const float *dy;
    packed_src w;
    const char *base; /* the packed weight's bytes */
    size_t N, I, O, rows, nrb, nq, nt, o0, oc, elem;
    int acc;      /* add to dx (a depth block after the first, or beta 1) */
    float *buf;   /* the transposed [oc, 64] block of w */
    size_t held;  /* the column block buf holds (SIZE_MAX: none) */
} bwd_job;

static void bwd_row_block(void *ctx, size_t q, size_t rb, int own) {
    bwd_job *j = ctx;
    size_t kw = panel_width(j->I, q), r0 = rb * j->rows, nr = j->N - r0 < j->rows ? j->N - r0 : j->rows;
    if (j->held != q) transpose_block(j->buf, j->w, j->I, j->O, j->o0, j->oc, q, kw), j->held = q;
    /* the transpose alone would wait on memory: while its own unit's rows run, a thread fetches the
     * panels of the unit it will most likely take next (nt units on, in this depth block or the next) */
    prefetch_plan pf, *ppf = NULL;
    size_t un = q + j->nt, on = j->o0;
    if (un >= j->nq) un -= j->nq, on += TK_PK_OC;
    if (own && un < j->nq && on < j->O) {
        size_t ocn = j->O - on < TK_PK_OC ? j->O - on : TK_PK_OC, lines = TK_PANEL * TK_PANEL * j->elem / 64;
        size_t all = (ocn + TK_PANEL - 1) / TK_PANEL * lines;
        pf = (prefetch_plan){j->base + (on * j->I + un * TK_PANEL * TK_PANEL) * j->elem, TK_PANEL * j->I * j->elem,
                             lines, all * rb / j->nrb, all * (rb + 1) / j->nrb};
        ppf = &pf;
    }
    rows_pass(nr, kw, j->oc, j->dy + r0 * j->O + j->o0, j->O, j->buf, TK_PANEL, j->dx + r0 * j->I + q * TK_PANEL,
              j->I, j->acc, ppf);
}
#endif

static void packed_backward(float *dx, const float *dy, packed_src w, size_t N, size_t I, size_t O, float beta) {
    TK_ASSERT(beta == 0.0f || beta == 1.0f);
    if (N == 0 || I == 0) return;
    if (O == 0) {
        if (beta == 0.0f) memset(dx, 0, N * I * sizeof(float));
        return;
    }
#ifdef TK_PACKED_AVX512
    size_t nq = (I + TK_PANEL - 1) / TK_PANEL, rows = row_block_rows(N), nrb = (N + rows - 1) / rows;
    work_share ws;
    memset(&ws, 0, sizeof ws);
#pragma omp parallel num_threads(product_threads(N, I, O))
    {
        /* 192 KiB on each thread's stack: the transposed [oc, 64] block of w */
        float buf[TK_PK_OC * TK_PANEL] __attribute__((aligned(64)));
        bwd_job j = {dx, dy, w, w.f ? (const char *)w.f : (const char *)w.h, N, I, O, rows, nrb, nq,
                     (size_t)omp_get_num_threads(), 0, 0, src_elem(w), 0, buf, SIZE_MAX};
        for (size_t o0 = 0, b = 0; o0 < O; o0 += TK_PK_OC, b++) {
            if (b > 0) { /* the depth block adds to what the one before wrote */
#pragma omp barrier
            }
            j.o0 = o0, j.oc = O - o0 < TK_PK_OC ? O - o0 : TK_PK_OC, j.held = SIZE_MAX;
            j.acc = o0 > 0 || beta != 0.0f;
            share_block(&ws, b, nq, nrb, bwd_row_block, &j);
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
