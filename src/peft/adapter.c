/* adapter.c: gated LoRA / DoRA / bottleneck Adapter on one linear layer. Formulas in adapter.h.
 *
 * Shapes: N tokens, I input width, O output width, R rank (or bottleneck size), nk kept tokens.
 */
#include "adapter.h"

#include "../ops/ops.h"

#include "../ops/blas.h"
#include <math.h>
#include <string.h>

int tk_adapter_ws_alloc(tk_adapter_ws *ws, size_t n_tok, size_t width, size_t rank, size_t ba_numel,
                        tk_err *err) {
    memset(ws, 0, sizeof *ws);
    ws->n_tok = n_tok;
    ws->width = width;
    ws->rank = rank ? rank : 1;
    size_t nw, nr;
    if (tk_mul_size(n_tok, width, &nw) || tk_mul_size(n_tok, ws->rank, &nr))
        return tk_fail(err, "adapter workspace size overflows");
    ws->m = tk_calloc(nw, sizeof(float));
    ws->t1 = tk_calloc(nw, sizeof(float));
    ws->t2 = tk_calloc(nw, sizeof(float));
    ws->t3 = tk_calloc(nw, sizeof(float));
    ws->r1 = tk_calloc(nr, sizeof(float));
    ws->r2 = tk_calloc(nr, sizeof(float));
    ws->idx = tk_calloc(n_tok, sizeof(int32_t));
    if (ba_numel) ws->ba = tk_calloc(ba_numel, sizeof(float));
    ws->ba_cap = ba_numel;
    /* per lane: two [CH,W] row blocks, two [CH,R] code blocks, the partial dA [R,W] and dB [W,R] */
    size_t ch = TK_BRANCH_CHUNK, R = ws->rank;
    ws->lane_n = 2 * ch * width + 2 * ch * R + 2 * R * width;
    ws->lane = tk_calloc(TK_BRANCH_LANES * ws->lane_n, sizeof(float));
    ws->lane_idx = tk_calloc(TK_BRANCH_LANES * ch, sizeof(int32_t));
    ws->cval = tk_calloc(n_tok ? n_tok : 1, sizeof(float));
    ws->bt = tk_calloc(R * (width ? width : 1), sizeof(float));
    if (!ws->bt || !ws->m || !ws->t1 || !ws->t2 || !ws->t3 || !ws->r1 || !ws->r2 || !ws->idx ||
        (ba_numel && !ws->ba) || !ws->lane || !ws->lane_idx || !ws->cval) {
        tk_adapter_ws_free(ws);
        return tk_fail(err, "out of memory for the adapter workspace (%zu tokens x %zu)", n_tok,
                       width);
    }
    return 0;
}

void tk_adapter_ws_free(tk_adapter_ws *ws) {
    if (!ws) return;
    tk_free(ws->m);
    tk_free(ws->t1);
    tk_free(ws->t2);
    tk_free(ws->t3);
    tk_free(ws->r1);
    tk_free(ws->r2);
    tk_free(ws->idx);
    tk_free(ws->ba);
    tk_free(ws->wconv);
    tk_free(ws->lane);
    tk_free(ws->lane_idx);
    tk_free(ws->cval);
    tk_free(ws->bt);
    memset(ws, 0, sizeof *ws);
}

int tk_adapted_alloc(tk_adapted_linear *L, size_t n_tok, tk_err *err) {
    if (L->kind == TK_ADAPTER_NONE) return 0;
    size_t nI, nO, nR;
    if (tk_mul_size(n_tok, L->in, &nI) || tk_mul_size(n_tok, L->out, &nO) ||
        tk_mul_size(n_tok, L->r, &nR))
        return tk_fail(err, "adapter activation size overflows");
    L->cap = n_tok;
    L->u = tk_calloc(nR, sizeof(float));
    L->rr = tk_calloc(n_tok, sizeof(float));
    L->S = tk_calloc(n_tok, 1);
    int ok = L->u && L->rr && L->S;
    if (L->straight_through) {
        L->S_bwd = tk_calloc(n_tok, 1);
        ok = ok && L->S_bwd;
        if (L->S_bwd) memset(L->S_bwd, 1, n_tok);
    }
    if (L->dropout > 0.0f) {
        L->xd = tk_calloc(nI, sizeof(float));
        L->keepx = tk_calloc(nI, 1);
        ok = ok && L->xd && L->keepx;
    }
    if (L->kind == TK_ADAPTER_ADALORA) {
        size_t nae = L->r * L->in;
        L->ae = tk_calloc(nae ? nae : 1, sizeof(float));
        L->dae = tk_calloc(nae ? nae : 1, sizeof(float));
        ok = ok && L->ae && L->dae;
    }
    if (L->kind == TK_ADAPTER_DORA) {
        L->base = tk_calloc(nO, sizeof(float));
        L->dora_c = tk_calloc(L->out, sizeof(float));
        L->dora_wn = tk_calloc(L->out, sizeof(float));
        ok = ok && L->base && L->dora_c && L->dora_wn;
    }
    if (!ok) {
        tk_adapted_free(L);
        return tk_fail(err, "out of memory for adapter activations (%zu tokens)", n_tok);
    }
    return 0;
}

void tk_adapted_free(tk_adapted_linear *L) {
    if (!L) return;
    tk_free(L->xd);
    tk_free(L->keepx);
    tk_free(L->u);
    tk_free(L->base);
    tk_free(L->rr);
    tk_free(L->S);
    tk_free(L->S_bwd);
    tk_free(L->dora_c);
    tk_free(L->dora_wn);
    tk_free(L->ae);
    tk_free(L->dae);
    L->xd = L->u = L->base = L->rr = L->dora_c = L->dora_wn = L->ae = L->dae = NULL;
    L->keepx = L->S = L->S_bwd = NULL;
    L->cap = 0;
    tk_gate_stats_free(&L->stats);
}

size_t tk_adapted_numel(const tk_adapted_linear *L) {
    if (L->kind == TK_ADAPTER_NONE) return 0;
    size_t n = L->r * L->in + L->out * L->r;
    if (L->kind == TK_ADAPTER_DORA) n += L->out;
    if (L->kind == TK_ADAPTER_ADALORA) n += L->r;
    return n;
}

/* C [M,N] = alpha * op(A) op(B) + beta * C, row-major. */
static void gemm(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
                 size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                tk_blas_dim(M), tk_blas_dim(N), tk_blas_dim(K), alpha, A, tk_blas_dim(lda), B,
                tk_blas_dim(ldb), beta, C, tk_blas_dim(ldc));
}

static float act_f(tk_act a, float u) { return a == TK_ACT_TANH ? tanhf(u) : (u > 0.0f ? u : 0.0f); }
static float act_df(tk_act a, float u) {
    if (a == TK_ACT_TANH) {
        float t = tanhf(u);
        return 1.0f - t * t;
    }
    return u > 0.0f ? 1.0f : 0.0f;
}

/* dst [nk,W] = src rows idx[0..nk) of a [*,W] matrix.
 * Serial on purpose, like scatter_dx: a row copy is bound by memory bandwidth, and an OpenMP region
 * opened between two sgemm calls made the next sgemm wait on the pool (measured on 2 threads, r = 16,
 * N = 512: the branch backward took 36-64 ms per layer at keep 0.5-0.75 against 6 ms at keep 1, and
 * 6.5 ms with serial copies; docs/performance.md). */
static void gather_rows(float *dst, const float *src, const int32_t *idx, size_t nk, size_t W) {
    for (size_t k = 0; k < nk; k++)
        memcpy(dst + k * W, src + (size_t)idx[k] * W, W * sizeof(float));
}

/* Writes the dropout input x~ = x * keep / (1 - p) and its mask. */
static void dropout_sample(tk_adapted_linear *L, const float *x, size_t N, tk_rng *rng) {
    size_t n = N * L->in;
    float p = L->dropout, inv = 1.0f / (1.0f - p);
    for (size_t j = 0; j < n; j++) { /* serial: the RNG stream must not depend on threads */
        uint8_t k = tk_rng_uniform(rng) >= p;
        L->keepx[j] = k;
        L->xd[j] = k ? x[j] * inv : 0.0f;
    }
}

/* DoRA's column of constants: wn_o = ||W0_o + s (B A)_o||, c_o = mag_o / wn_o. */
static void dora_scale(tk_adapted_linear *L, tk_adapter_ws *ws) {
    size_t I = L->in, O = L->out;
    TK_ASSERT(ws->ba && ws->ba_cap >= O * I);
    gemm(0, 0, O, I, L->r, 1.0f, L->B, L->r, L->A, I, 0.0f, ws->ba, I);
#pragma omp parallel for schedule(static) if (O * I >= TK_OMP_MIN_WORK)
    for (size_t o = 0; o < O; o++) {
        const float *w = L->w0 + o * I, *ba = ws->ba + o * I;
        double ss = 0.0;
        for (size_t i = 0; i < I; i++) {
            float v = w[i] + L->scale * ba[i];
            ss += (double)v * v;
        }
        L->dora_wn[o] = (float)sqrt(ss);
        L->dora_c[o] = L->mag[o] / L->dora_wn[o];
    }
}

/* The gate on token i: r_i = ||m_i|| / max(||b_i||, 1e-6), S_i = [r_i >= tau]; y_i (holding b_i)
 * becomes b_i + S_i m_i. The two norms are double sums, vectorised by `omp simd` (a plain loop stays
 * scalar). */
TK_HOT_CLONES static void gate_row(tk_adapted_linear *L, float *yi, const float *mi, size_t O, size_t i, float tau,
                                  int gated) {
    double nm = 0.0, nb = 0.0;
#pragma omp simd reduction(+ : nm, nb)
    for (size_t o = 0; o < O; o++) {
        nm += (double)mi[o] * mi[o];
        nb += (double)yi[o] * yi[o];
    }
    double den = sqrt(nb);
    float r = (float)(sqrt(nm) / (den > 1e-6 ? den : 1e-6));
    uint8_t keep = !gated ? 1
                   : L->rand_keep > 0.0f ? (uint8_t)tk_gate_random_keep(L->rand_key, i, L->rand_keep)
                                         : (uint8_t)(r >= tau);
    L->rr[i] = r;
    L->S[i] = keep;
    if (keep)
        for (size_t o = 0; o < O; o++) yi[o] += mi[o];
}

/* dx rows idx[k] += d [nk,I] (times the dropout mask / (1-p) when dropout was used). */
static void scatter_dx(const tk_adapted_linear *L, float *dx, const float *d, const int32_t *idx,
                       size_t nk) {
    size_t I = L->in;
    float inv = L->dropout > 0.0f ? 1.0f / (1.0f - L->dropout) : 1.0f;
    for (size_t k = 0; k < nk; k++) { /* serial: see gather_rows */
        size_t i = (size_t)idx[k];
        float *dxi = dx + i * I;
        const float *dk = d + k * I;
        if (L->dropout > 0.0f) {
            const uint8_t *kp = L->keepx + i * I;
            for (size_t j = 0; j < I; j++) dxi[j] += kp[j] ? dk[j] * inv : 0.0f;
        } else {
            for (size_t j = 0; j < I; j++) dxi[j] += dk[j];
        }
    }
}

/* After a branch forward: r_i and S_i of the valid tokens to the statistics (training only). */
static int record_r(tk_adapted_linear *L, tk_adapter_ws *ws, const uint8_t *valid, size_t N, int train,
                    double t0, tk_err *err) {
    if (train == TK_FWD_TRAIN)
        for (size_t i = 0; i < N; i++)
            if (!valid || valid[i])
                if (tk_gate_stats_push_r(&L->stats, L->rr[i], L->S[i], err)) return -1;
    ws->secs_branch_fwd += tk_time() - t0;
    return 0;
}

/* ---- the fused LoRA branch ----------------------------------------------------------------------
 * LoRA's branch is two rank-R products around the gate. Run as whole-matrix sgemm calls they are
 * memory-bound and each is a threaded call with its own barrier (5 per module forward, 4 backward);
 * m [N,O] also makes a round trip through memory. Here the N rows are split into TK_BRANCH_LANES
 * lanes that run in parallel; each lane walks its rows in chunks of TK_BRANCH_CHUNK and calls
 * cblas_sgemm from inside the parallel region, where OpenBLAS (OpenMP build) runs single-threaded,
 * except for m = s u B^T and gr = dy B, which run on tk_gemm_small's AVX-512 kernel (ops/gemm_small.c;
 * 89 -> 139 and 88 -> 127 GFLOP/s on one thread at width 2048).
 * A chunk's m, dy and x rows stay in the core's cache between the products that read them, and in
 * the backward a chunk's gated-off rows are dropped before the products (compacted in the cache, not
 * gathered through memory), so they cost only the c_i that the threshold step needs. */

/* A lane's buffers (see tk_adapter_ws_alloc). */
typedef struct {
    float *rows_a, *rows_b; /* [CH,W] */
    float *gr, *code;       /* [CH,R] */
    float *dA, *dB;         /* [R,W], [W,R] partial sums */
    int32_t *idx;           /* [CH] */
} lane_bufs;

static lane_bufs lane_get(const tk_adapter_ws *ws, size_t l) {
    size_t ch = TK_BRANCH_CHUNK, W = ws->width, R = ws->rank;
    float *p = ws->lane + l * ws->lane_n;
    lane_bufs b = {p, p + ch * W, p + 2 * ch * W, p + 2 * ch * W + ch * R,
                   p + 2 * ch * W + 2 * ch * R, p + 2 * ch * W + 2 * ch * R + R * W, ws->lane_idx + l * ch};
    return b;
}

/* Chunk j of lane l of N rows (the lane holds rows N*l/LANES .. N*(l+1)/LANES - 1): rows
 * [*c0, *c0 + *n); 0 when the lane has no chunk j. */
static int lane_chunk(size_t l, size_t N, size_t j, size_t *c0, size_t *n) {
    size_t r0 = N * l / TK_BRANCH_LANES, r1 = N * (l + 1) / TK_BRANCH_LANES;
    *c0 = r0 + j * TK_BRANCH_CHUNK;
    if (*c0 >= r1) return 0;
    *n = r1 - *c0 < TK_BRANCH_CHUNK ? r1 - *c0 : TK_BRANCH_CHUNK;
    return 1;
}

/* Below this many rows (decoding a token or a few) the fused forward does not transpose B: the copy
 * costs O*R per module call, the product N*O*R. */
#define TK_BT_MIN_ROWS 16

/* u = x~ A^T, m = s u B^T, and the gate on y (which holds b = W0 x): h_i = b_i + S_i m_i.
 * With the AVX-512 kernel and enough rows, m's product runs on B^T [R,O] (ws->bt, transposed here),
 * so that tk_gemm_small reads its B row-major; otherwise cblas_sgemm reads B transposed itself. */
static void lora_forward_fused(tk_adapted_linear *L, tk_adapter_ws *ws, float *y, const float *xt, size_t N) {
    size_t I = L->in, O = L->out, R = L->r;
    float tau = L->tau, s = L->scale;
    int gated = L->gated;
    int use_bt = !ws->rows_alone && tk_gemm_small_avx512() && N >= TK_BT_MIN_ROWS;
    if (use_bt)
        for (size_t o = 0; o < O; o++)
            for (size_t j = 0; j < R; j++) ws->bt[j * O + o] = L->B[o * R + j];
#pragma omp parallel for schedule(static) if (N * O >= TK_OMP_MIN_WORK)
    for (size_t l = 0; l < TK_BRANCH_LANES; l++) {
        lane_bufs lb = lane_get(ws, l);
        size_t c0, n;
        for (size_t ci = 0; lane_chunk(l, N, ci, &c0, &n); ci++) {
            float *m = lb.rows_a; /* [n,O] */
            if (ws->rows_alone) { /* the products of a call of one row, for each row */
                for (size_t k = 0; k < n; k++) {
                    float *uk = L->u + (c0 + k) * R;
                    gemm(0, 1, 1, R, I, 1.0f, xt + (c0 + k) * I, I, L->A, I, 0.0f, uk, R);
                    gemm(0, 1, 1, O, R, s, uk, R, L->B, R, 0.0f, m + k * O, O);
                }
            } else {
                gemm(0, 1, n, R, I, 1.0f, xt + c0 * I, I, L->A, I, 0.0f, L->u + c0 * R, R);
                if (use_bt) tk_gemm_small(n, O, R, s, L->u + c0 * R, R, ws->bt, O, 0, m, O);
                else gemm(0, 1, n, O, R, s, L->u + c0 * R, R, L->B, R, 0.0f, m, O);
            }
            for (size_t k = 0; k < n; k++) gate_row(L, y + (c0 + k) * O, m + k * O, O, c0 + k, tau, gated);
        }
    }
}

/* A chunk's dB, dA and dx from its nk kept rows (lb->idx, absolute row numbers), on tk_gemm_small's
 * AVX-512 kernel with the rows of dy, x~ and dx read and written in place through row pointers: a
 * partly kept chunk costs no copies of its O- and I-wide rows (only the R-wide gr and u are
 * rearranged). The lane's dB partial is kept transposed: dB^T [R,O] += s u_k^T dy_k. acc: the lane's
 * partials already hold something (else they are written). gr [n,R] in lb->gr is compacted in place. */
static void kept_rows_backward(const tk_adapted_linear *L, const lane_bufs *lb, float *dx, const float *dyc,
                               const float *xc, const float *uc, size_t c0, size_t nk, int acc) {
    size_t I = L->in, O = L->out, R = L->r;
    float s = L->scale;
    const float *dyr[TK_BRANCH_CHUNK], *xr[TK_BRANCH_CHUNK], *ar[TK_BRANCH_CHUNK];
    float *dxr[TK_BRANCH_CHUNK], *dbr[TK_BRANCH_CHUNK], *dar[TK_BRANCH_CHUNK];
    float *uT = lb->code, *grT = lb->rows_b; /* [R,nk] each (R <= width, checked by the caller) */
    for (size_t j = 0; j < nk; j++) {
        size_t k = (size_t)lb->idx[j] - c0;
        dyr[j] = dyc + k * O, xr[j] = xc + k * I, dxr[j] = dx + (c0 + k) * I;
        for (size_t r = 0; r < R; r++) {
            uT[r * nk + j] = uc[k * R + r];
            grT[r * nk + j] = lb->gr[k * R + r];
        }
        if (k != j) memmove(lb->gr + j * R, lb->gr + k * R, R * sizeof(float)); /* idx[j] - c0 >= j */
    }
    for (size_t r = 0; r < R; r++) dbr[r] = lb->dB + r * O, dar[r] = lb->dA + r * I, ar[r] = L->A + r * I;
    tk_gemm_small_rows(R, O, nk, s, uT, nk, dyr, acc, dbr); /* dB^T += s u_k^T dy_k */
    tk_gemm_small_rows(R, I, nk, s, grT, nk, xr, acc, dar); /* dA += s gr_k^T x~_k */
    if (L->dropout == 0.0f) { /* dx_k += s gr_k A, straight into the kept rows */
        tk_gemm_small_rows(nk, I, R, s, lb->gr, R, ar, 1, dxr);
    } else { /* through the dropout mask */
        float *dxk = lb->rows_a;
        tk_gemm_small(nk, I, R, s, lb->gr, R, L->A, I, 0, dxk, I);
        scatter_dx(L, dx, dxk, lb->idx, nk);
    }
}

/* The LoRA branch's backward: c_i for every row; dB, dA and dx from the kept rows only. */
static void lora_backward_fused(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy,
                                const float *xt, size_t N) {
    size_t I = L->in, O = L->out, R = L->r;
    float s = L->scale;
    int used[TK_BRANCH_LANES] = {0}; /* lanes whose partial dA, dB hold something (the first product
                                      * writes them with beta 0: no zero-fill) */
    /* With the AVX-512 kernel the kept rows of dy, x~ and dx are used in place through row pointers
     * (kept_rows_backward) and the lanes' dB partials are kept transposed, [R,O]. */
    int gathered = tk_gemm_small_avx512() && R <= ws->width && R <= TK_BRANCH_CHUNK;
#pragma omp parallel for schedule(static) if (N * O >= TK_OMP_MIN_WORK)
    for (size_t l = 0; l < TK_BRANCH_LANES; l++) {
        lane_bufs lb = lane_get(ws, l);
        size_t c0, n;
        for (size_t ci = 0; lane_chunk(l, N, ci, &c0, &n); ci++) {
            const float *dyc = dy + c0 * O, *xc = xt + c0 * I, *uc = L->u + c0 * R;
            tk_gemm_small(n, R, O, 1.0f, dyc, O, L->B, R, 0, lb.gr, R); /* gr = dy B */
            size_t nk = 0;
            for (size_t k = 0; k < n; k++) {
                const float *g = lb.gr + k * R, *u = uc + k * R;
                double c = 0.0;
                for (size_t j = 0; j < R; j++) c += (double)g[j] * u[j];
                ws->cval[c0 + k] = (float)(c * s);
                if (L->S[c0 + k]) lb.idx[nk++] = (int32_t)(c0 + k);
            }
            if (nk == 0) continue;
            if (gathered) {
                kept_rows_backward(L, &lb, dx, dyc, xc, uc, c0, nk, used[l]);
                used[l] = 1;
                continue;
            }
            const float *dyk = dyc, *xk = xc, *uk = uc;
            if (nk < n) { /* compact the kept rows; gr in place (idx[j] - c0 >= j) */
                for (size_t j = 0; j < nk; j++) {
                    size_t k = (size_t)lb.idx[j] - c0;
                    memcpy(lb.rows_a + j * O, dyc + k * O, O * sizeof(float));
                    memcpy(lb.rows_b + j * I, xc + k * I, I * sizeof(float));
                    memcpy(lb.code + j * R, uc + k * R, R * sizeof(float));
                    memmove(lb.gr + j * R, lb.gr + k * R, R * sizeof(float));
                }
                dyk = lb.rows_a, xk = lb.rows_b, uk = lb.code;
            }
            float beta = used[l] ? 1.0f : 0.0f;
            used[l] = 1;
            gemm(1, 0, O, R, nk, s, dyk, O, uk, R, beta, lb.dB, R); /* dB += s dy_k^T u_k */
            gemm(1, 0, R, I, nk, s, lb.gr, R, xk, I, beta, lb.dA, I); /* dA += s gr_k^T x~_k */
            if (nk == n && L->dropout == 0.0f) { /* dx += s gr A, straight into the chunk's rows */
                gemm(0, 0, n, I, R, s, lb.gr, R, L->A, I, 1.0f, dx + c0 * I, I);
                continue;
            }
            float *dxk = lb.rows_b; /* x~_k is no longer needed */
            gemm(0, 0, nk, I, R, s, lb.gr, R, L->A, I, 0.0f, dxk, I);
            scatter_dx(L, dx, dxk, lb.idx, nk);
        }
    }
    /* the lanes' partial sums, added in lane order (serial: a few thousand values, and a parallel
     * region here measured slower) */
    for (size_t l = 0; l < TK_BRANCH_LANES; l++) {
        if (!used[l]) continue;
        lane_bufs lb = lane_get(ws, l);
        for (size_t j = 0; j < R * I; j++) L->dA[j] += lb.dA[j];
        if (gathered)
            for (size_t o = 0; o < O; o++)
                for (size_t j = 0; j < R; j++) L->dB[o * R + j] += lb.dB[j * O + o];
        else
            for (size_t j = 0; j < O * R; j++) L->dB[j] += lb.dB[j];
    }
}

/* AdaLoRA's effective A: ae [R,I] = diag(E) A. */
static void adalora_effective_a(tk_adapted_linear *L) {
    size_t I = L->in;
    for (size_t j = 0; j < L->r; j++)
        for (size_t i = 0; i < I; i++) L->ae[j * I + i] = L->E[j] * L->A[j * I + i];
}

/* forward: A' = diag(E) A.  dA += diag(E) dA';  dE_j += <dA'_j, A_j> (dA' in dae). */
static void adalora_chain_e(tk_adapted_linear *L) {
    size_t I = L->in;
    for (size_t j = 0; j < L->r; j++) {
        const float *g = L->dae + j * I, *a = L->A + j * I;
        float *da = L->dA + j * I, e = L->E[j];
        double de = 0.0;
        for (size_t i = 0; i < I; i++) {
            da[i] += e * g[i];
            de += (double)g[i] * a[i];
        }
        L->dE[j] += (float)de;
    }
}

/* The base weight W0 in the form it is held (natural or packed, fp32 or BF16, or for BF16 compute). */
static tk_frozen base_weight(const tk_adapted_linear *L) {
    return (tk_frozen){L->w0, L->w0_bf16, L->w0_packed, L->w0_packed_bf16, L->w0_dot};
}

int tk_adapted_forward(tk_adapted_linear *L, tk_adapter_ws *ws, float *y, const float *x,
                       const uint8_t *valid, size_t N, int train, tk_rng *rng, tk_err *err) {
    size_t I = L->in, O = L->out, R = L->r;
    double tb = tk_time();
    tk_frozen_forward(y, x, base_weight(L), N, I, O, ws->wconv, ws->wconv_n);
    ws->secs_base_fwd += tk_time() - tb;
    if (L->kind == TK_ADAPTER_NONE) return 0;
    TK_ASSERT(N <= L->cap && N <= ws->n_tok && O <= ws->width && I <= ws->width && R <= ws->rank);
    double t0 = tk_time();

    if (L->gated && L->rand_keep > 0.0f && train != TK_FWD_REPLAY) /* the random rule's draw for this call */
        L->rand_key = train && rng ? tk_rng_u64(rng) : L->rand_seed + 0x632be59bd9b4e019ull * ++L->rand_calls;
    const float *xt = x;
    if (train && L->dropout > 0.0f) {
        if (train != TK_FWD_REPLAY) dropout_sample(L, x, N, rng); /* a replay reuses the mask */
        xt = L->xd;
    }
    if (L->kind == TK_ADAPTER_LORA) {
        lora_forward_fused(L, ws, y, xt, N);
        return record_r(L, ws, valid, N, train, t0, err);
    }
    if (L->kind == TK_ADAPTER_ADALORA) { /* LoRA's branch on A' = diag(E) A */
        adalora_effective_a(L);
        float *A = L->A;
        L->A = L->ae;
        lora_forward_fused(L, ws, y, xt, N);
        L->A = A;
        return record_r(L, ws, valid, N, train, t0, err);
    }
    float *m = ws->m; /* [N,O] */
    gemm(0, 1, N, R, I, 1.0f, xt, I, L->A, I, 0.0f, L->u, R); /* u = x~ A^T */
    if (L->kind == TK_ADAPTER_BOTTLENECK) {
        float *a = ws->r1;
        for (size_t j = 0; j < N * R; j++) a[j] = act_f(L->act, L->u[j]);
        gemm(0, 1, N, O, R, L->scale, a, R, L->B, R, 0.0f, m, O); /* m = s act(u) Up^T */
    } else { /* DoRA */
        if (xt == x) memcpy(L->base, y, N * O * sizeof(float));
        else gemm(0, 1, N, O, I, 1.0f, xt, I, L->w0, I, 0.0f, L->base, O);
        dora_scale(L, ws);
        gemm(0, 1, N, O, R, L->scale, L->u, R, L->B, R, 0.0f, m, O); /* s B A x~ */
#pragma omp parallel for schedule(static) if (N * O >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < N; i++) {
            float *mi = m + i * O;
            const float *bi = L->base + i * O;
            for (size_t o = 0; o < O; o++)
                mi[o] = (L->dora_c[o] - 1.0f) * bi[o] + L->dora_c[o] * mi[o];
        }
    }

    /* The gate: r_i = ||m_i|| / max(||b_i||, 1e-6), S_i = [r_i >= tau]; h_i = b_i + S_i m_i. */
    float tau = L->tau;
    int gated = L->gated;
#pragma omp parallel for schedule(static) if (N * O >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < N; i++) gate_row(L, y + i * O, m + i * O, O, i, tau, gated);
    return record_r(L, ws, valid, N, train, t0, err);
}

int tk_adapted_forward_rows(tk_adapted_linear *L, tk_adapter_ws *ws, float *y, const float *x, size_t N,
                            tk_err *err) {
    int whole = tk_frozen_rows_alone(base_weight(L)) &&
                (L->kind == TK_ADAPTER_NONE || ((L->kind == TK_ADAPTER_LORA || L->kind == TK_ADAPTER_ADALORA) &&
                                                 !(L->gated && L->rand_keep > 0.0f)));
    if (whole) {
        ws->rows_alone = 1;
        int rc = tk_adapted_forward(L, ws, y, x, NULL, N, TK_FWD_EVAL, NULL, err);
        ws->rows_alone = 0;
        return rc;
    }
    for (size_t i = 0; i < N; i++)
        if (tk_adapted_forward(L, ws, y + i * L->out, x + i * L->in, NULL, 1, TK_FWD_EVAL, NULL, err)) return -1;
    return 0;
}

static int branch_backward(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy, const float *x,
                           const uint8_t *valid, size_t N, tk_err *err);

/* write: dx is overwritten by the base weight's product (tk_adapted_backward_into), else added to. */
static int adapted_backward(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy, const float *x,
                            const uint8_t *valid, size_t N, int write, tk_err *err) {
    size_t I = L->in, O = L->out;
    /* forward: b = x W0^T.  dx (+)= dy W0;  dW0 += dy^T x */
    double tb = tk_time();
    tk_frozen_backward(dx, dy, base_weight(L), N, I, O, write ? 0.0f : 1.0f, ws->wconv, ws->wconv_n);
    if (L->dw0) { /* trainable base weights are natural fp32 copies (never BF16-resident or packed) */
        TK_ASSERT(L->w0);
        tk_linear_backward(NULL, L->dw0, dy, x, L->w0, N, I, O);
    }
    ws->secs_base_bwd += tk_time() - tb;
    if (L->kind == TK_ADAPTER_NONE) return 0;
    TK_ASSERT(N <= L->cap && N <= ws->n_tok);
    double t0 = tk_time();
    int rc = 0;
    /* Straight-through (a study rule's option): the backward sees an all-ones gate, so a gated-off
     * token still trains the branch and passes its gradient on; the forward's S stays as it was for
     * the gate log. */
    uint8_t *S_fwd = L->S;
    if (L->straight_through) L->S = L->S_bwd;
    if (L->kind == TK_ADAPTER_LORA) {
        lora_backward_fused(L, ws, dx, dy, L->dropout > 0.0f ? L->xd : x, N);
        for (size_t i = 0; i < N && !rc; i++)
            if (!valid || valid[i]) rc = tk_gate_stats_push_c(&L->stats, ws->cval[i], err);
    } else if (L->kind == TK_ADAPTER_ADALORA) {
        /* LoRA's backward on A' = diag(E) A (ae, computed by the forward) gives dA' into dae; then
         * A' = E . A:  dA += E . dA',  dE_j += sum_i dA'_ji A_ji */
        float *A = L->A, *dA = L->dA;
        memset(L->dae, 0, L->r * L->in * sizeof(float));
        L->A = L->ae;
        L->dA = L->dae;
        lora_backward_fused(L, ws, dx, dy, L->dropout > 0.0f ? L->xd : x, N);
        L->A = A;
        L->dA = dA;
        adalora_chain_e(L);
        for (size_t i = 0; i < N && !rc; i++)
            if (!valid || valid[i]) rc = tk_gate_stats_push_c(&L->stats, ws->cval[i], err);
    } else {
        rc = branch_backward(L, ws, dx, dy, x, valid, N, err);
    }
    L->S = S_fwd;
    ws->secs_branch_bwd += tk_time() - t0;
    return rc;
}

int tk_adapted_backward(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy,
                        const float *x, const uint8_t *valid, size_t N, tk_err *err) {
    return adapted_backward(L, ws, dx, dy, x, valid, N, 0, err);
}

int tk_adapted_backward_into(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy,
                             const float *x, const uint8_t *valid, size_t N, tk_err *err) {
    return adapted_backward(L, ws, dx, dy, x, valid, N, 1, err);
}

/* The branch's share of the backward for DoRA and the bottleneck adapter (LoRA runs lora_backward_fused). */
static int branch_backward(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy, const float *x,
                           const uint8_t *valid, size_t N, tk_err *err) {
    size_t I = L->in, O = L->out, R = L->r;

    const float *xt = L->dropout > 0.0f ? L->xd : x;
    const float s = L->scale;
    size_t nk = 0;
    for (size_t i = 0; i < N; i++)
        if (L->S[i]) ws->idx[nk++] = (int32_t)i;
    int all = nk == N;

    /* gr [N,R]: the gradient arriving at the rank-R code: dy B (bottleneck) or (dy*c) B (DoRA).
     * c_i = <g_i, m_i> for every token, from the same products. */
    float *gr = ws->r1;
    float *gc = ws->m; /* DoRA: g * c [N,O] */
    const float *gin = dy;
    if (L->kind == TK_ADAPTER_DORA) {
#pragma omp parallel for schedule(static) if (N * O >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < N; i++)
            for (size_t o = 0; o < O; o++) gc[i * O + o] = dy[i * O + o] * L->dora_c[o];
        gin = gc;
    }
    gemm(0, 0, N, R, O, 1.0f, gin, O, L->B, R, 0.0f, gr, R);
    float *a = ws->r2; /* bottleneck: act(u) [N,R] */
    if (L->kind == TK_ADAPTER_BOTTLENECK)
        for (size_t j = 0; j < N * R; j++) a[j] = act_f(L->act, L->u[j]);
    const float *code = L->kind == TK_ADAPTER_BOTTLENECK ? a : L->u; /* what B multiplies */
    for (size_t i = 0; i < N; i++) {
        double c = 0.0;
        const float *gi = gr + i * R, *ci = code + i * R;
        for (size_t j = 0; j < R; j++) c += (double)gi[j] * ci[j];
        c *= s;
        if (L->kind == TK_ADAPTER_DORA) { /* + <g_i, (c - 1) * base_i> */
            const float *bi = L->base + i * O, *g = dy + i * O;
            for (size_t o = 0; o < O; o++) c += (double)g[o] * (L->dora_c[o] - 1.0f) * bi[o];
        }
        if (!valid || valid[i])
            if (tk_gate_stats_push_c(&L->stats, (float)c, err)) return -1;
    }
    if (nk == 0) return 0;

    /* Half the rows kept or more (bottleneck, no dropout): zero the rank-R rows of the gated-off
     * tokens (the code and gr, R wide) instead of gathering the wide ones (dy, x, dx). The products then
     * run over all N rows, reading dy and x once and copying nothing. Gated-off rows contribute exact
     * zeros to dB, dA and dx. Measured at r = 16, N = 512 (one module repeated, one thread, per layer of
     * the 134M bench model): gathering cost 12.7 ms at keep 0.9, 11 at 0.75, 7.7 at 0.5; zeroing 8.3-8.6
     * at any keep (8.5 with every row kept). Inside the model (dy and x no longer in cache) gathering at
     * keep 0.56 cost 0.11-0.21 s per step against 0.095 for zeroing and 0.097 at keep 1: the gathers'
     * memory traffic outweighs the FLOPs they save down to about half (docs/performance.md). */
    if (!all && 2 * nk >= N && L->kind == TK_ADAPTER_BOTTLENECK && L->dropout == 0.0f) {
        float *cm = ws->r2; /* act(u), computed above */
        for (size_t i = 0; i < N; i++)
            if (!L->S[i]) {
                memset(cm + i * R, 0, R * sizeof(float));
                memset(gr + i * R, 0, R * sizeof(float));
            }
        code = cm;
        all = 1;
        nk = N;
    }

    /* Kept rows only from here on: gather them (unless every row is kept). */
    const int32_t *idx = ws->idx;
    const float *gk = gin, *codek = code, *xk = xt;
    float *grk = gr;
    if (!all) {
        gather_rows(ws->t1, gin, idx, nk, O);
        gk = ws->t1;
        if (L->kind == TK_ADAPTER_BOTTLENECK) {
            for (size_t k = 0; k < nk; k++) /* compact in place: idx[k] >= k */
                memmove(a + k * R, a + (size_t)idx[k] * R, R * sizeof(float));
            codek = a;
        } else {
            gather_rows(ws->r2, L->u, idx, nk, R);
            codek = ws->r2;
        }
        for (size_t k = 0; k < nk; k++) memmove(gr + k * R, gr + (size_t)idx[k] * R, R * sizeof(float));
        gather_rows(ws->t2, xt, idx, nk, I);
        xk = ws->t2;
    }

    /* B (lora_B / adapter_up):  m = s B code  =>  dB += s gk^T code_k */
    gemm(1, 0, O, R, nk, s, gk, O, codek, R, 1.0f, L->dB, R);
    float a_scale = s;
    if (L->kind == TK_ADAPTER_BOTTLENECK) {
        /* code = act(u): d u = s * gr * act'(u) */
        for (size_t k = 0; k < nk; k++) {
            size_t i = all ? k : (size_t)idx[k];
            for (size_t j = 0; j < R; j++) grk[k * R + j] *= s * act_df(L->act, L->u[i * R + j]);
        }
        a_scale = 1.0f;
    }
    if (L->kind == TK_ADAPTER_DORA) {
        /* m = (c-1) base + c s B A x~, c = mag/wn  =>  dmag_o += sum_k g_ko (base_ko + s (BAx~)_ko) / wn_o */
        float *lk = ws->t3;
        gemm(0, 1, nk, O, R, s, codek, R, L->B, R, 0.0f, lk, O);
        for (size_t k = 0; k < nk; k++) {
            size_t i = all ? k : (size_t)idx[k];
            const float *g = dy + i * O, *bi = L->base + i * O;
            for (size_t o = 0; o < O; o++) L->dmag[o] += g[o] * (bi[o] + lk[k * O + o]) / L->dora_wn[o];
        }
    }
    /* A (lora_A / adapter_down): u = A x~  =>  dA += a_scale grk^T x~_k */
    gemm(1, 0, R, I, nk, a_scale, grk, R, xk, I, 1.0f, L->dA, I);

    /* dx~_k = a_scale grk A (+ ((c-1) g)_k W0 for DoRA) */
    int direct = all && L->dropout == 0.0f && L->kind != TK_ADAPTER_DORA;
    if (direct) {
        gemm(0, 0, N, I, R, a_scale, grk, R, L->A, I, 1.0f, dx, I);
        return 0;
    }
    float *dxk = ws->t2; /* x~_k is no longer needed */
    gemm(0, 0, nk, I, R, a_scale, grk, R, L->A, I, 0.0f, dxk, I);
    if (L->kind == TK_ADAPTER_DORA) {
        float *gm = ws->t3; /* ((c - 1) g)_k [nk,O] */
        for (size_t k = 0; k < nk; k++) {
            size_t i = all ? k : (size_t)idx[k];
            for (size_t o = 0; o < O; o++) gm[k * O + o] = (L->dora_c[o] - 1.0f) * dy[i * O + o];
        }
        gemm(0, 0, nk, I, O, 1.0f, gm, O, L->w0, I, 1.0f, dxk, I);
    }
    scatter_dx(L, dx, dxk, idx, nk);
    return 0;
}
