/* attention_tiled.c: memory-efficient causal attention (FlashAttention-2 style tiling) with
 * grouped-query heads and a key padding mask. Same semantics as tk_attention_forward/backward
 * (attention.c, the plain reference it is tested against), but no [T,S] matrix is ever held: the
 * forward keeps only the row log-sum-exp, the backward recomputes the softmax weights block by block.
 *
 * Shape legend (outermost first):
 *   B  sequences, T  query positions, S  key positions (S >= T; the first S-T are a KV cache)
 *   H  query heads, G  key/value heads (H % G == 0), D  head width
 *   BQ query rows per block, BK key columns per block (bq = min(BQ, T), bk = min(BK, S) in scratch)
 *
 * Per (b, h), with g = h / (H/G), Q = q[b, :, h, :] [T,D] (row stride H*D), K, V = k, v[b, :, g, :]
 * [S,D] (row stride G*D), scale = 1/sqrt(D), and the mask of attention.c (query t sees key j iff
 * j <= S-T+t and key_mask[b*S+j] != 0):
 *   forward, per query block Qi and key block Kj (j up to the block's causal limit):
 *     Sij = scale Qi Kj^T (masked entries -inf);  m' = max(m, rowmax Sij);  P = exp(Sij - m')
 *     l = l exp(m - m') + rowsum P;  Oi = Oi exp(m - m') + P Vj;  m = m'
 *   then Oi /= l and lse = m + log l. A row with no visible key keeps m = -inf: out 0, lse -inf.
 *   backward: Di = rowsum(dO * O); P = exp(scale Qi Kj^T - lse) (0 where masked);
 *     dVj += P^T dOi;  dP = dOi Vj^T;  dS = P * (dP - Di);  dQi += scale dS Kj;  dKj += scale dS^T Qi.
 * Key blocks wholly beyond the causal limit of a query block are skipped.
 *
 * Threads: the block matmuls are cblas_sgemm calls on strided views, made from serial code (BLAS
 * threads them); the per-row softmax loops of a block carry the usual TK_OMP_MIN_WORK if-clause,
 * which at BQ x BK = 16384 keeps them on one thread. Measured on the 2-core dev VM (Xeon with
 * AVX-512, OpenBLAS 0.3.21 openmp, this build's -O2 -march=x86-64-v2), B=1 H=12 T=S=512 D=64,
 * best of 60 runs, forward / backward in ms (tk_attention_forward/backward for comparison, before
 * its causal blocks and one-head-per-thread layout: 9.5-13 / 12.6-55; after: 4.6-4.9 / 5.6-5.7, so
 * at these lengths this kernel buys memory, not speed):
 *   BQ x BK =  64 x 256: 11.1 / 16.0     32 x 256: 11.7 / 16.7     64 x 128: 11.6 / 16.8
 *             128 x 256:  9.6 / 17.3    256 x 256:  9.9 / 17.9   (these two run the row loops on
 *                                                                  both threads)
 * Threading the row loops of each block wins 1.5 ms in the forward on an idle machine, but every
 * block then opens a parallel region, and on a loaded machine (other jobs on the 2 cores) those
 * regions cost 5-15x (forward 24-143 ms, backward 59-251 ms, against 13-31 / 18-48 ms for 64 x 256),
 * so the blocks are kept below the threshold.
 * The other layout, an omp parallel over (b, h) pairs with each thread running its own blocked
 * matmul loops (no BLAS; K transposed per block, axpy inner loops that vectorize without fast-math),
 * took 45 ms for the same forward on 2 threads against 10-11 ms for serial sgemm calls: OpenBLAS's
 * AVX-512 kernels are far faster per core than what the compiler makes of plain loops at x86-64-v2
 * (SSE, no FMA), more than the 2x that (b, h) parallelism wins back, so the BLAS layout is kept.
 */
#include "ops/ops.h"

#include "blas.h"
#include <math.h>

#include "common.h"
#include "fastmath.h"

/* Block sizes (see the measurements above). Scores and dP blocks of [BQ,BK] take 64 KiB each. */
#define TK_ATTN_BQ 64
#define TK_ATTN_BK 256

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* Floats of scratch for either direction: two [bq,bk] blocks (scores/P and dP/dS) and two [bq]
 * row vectors (running max and sum in the forward, Di in the backward). */
size_t tk_attention_tiled_scratch(size_t T, size_t S, size_t D) {
    (void)D; /* the output and gradient accumulators are the caller's out/dq/dk/dv */
    size_t bq = min_sz(TK_ATTN_BQ, T), bk = min_sz(TK_ATTN_BK, S);
    return 2 * bq * bk + 2 * bq;
}

/* Keys 0..(return value - 1) are visible to at least one query of the block of rows t0..t0+nq-1 (the
 * causal limit of its last row, S-T+t0+nq-1). */
static size_t causal_end(size_t T, size_t S, size_t t0, size_t nq) { return S - T + t0 + nq; }

/* Number of leading columns of a key block starting at j0 (nk columns) that query row position
 * `last` (its last visible key, S-T+t) may see causally. */
static size_t causal_cols(size_t last, size_t j0, size_t nk) {
    return last < j0 ? 0 : min_sz(nk, last - j0 + 1);
}

/* One online-softmax step for the rows of a block.
 * s [nq,nk] (scaled scores in, unnormalized P out, 0 where masked), m, l [nq] running row max and
 * sum, o [nq rows, stride os] the partial output rows (rescaled in place), mask_b [S] or NULL,
 * last0 = S-T+t0 (last visible key of the block's first row), j0 the block's first key. */
static void online_softmax_block(float *s, float *m, float *l, float *o, size_t os,
                                 const uint8_t *mask_b, size_t last0, size_t j0, size_t nq,
                                 size_t nk, size_t D) {
#pragma omp parallel for if (nq * nk >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < nq; i++) {
        float *sr = &s[i * nk];
        size_t nc = causal_cols(last0 + i, j0, nk);
        float bm = -INFINITY;
        for (size_t c = 0; c < nc; c++) {
            if (mask_b && !mask_b[j0 + c]) continue;
            bm = sr[c] > bm ? sr[c] : bm;
        }
        float mnew = bm > m[i] ? bm : m[i];
        if (mnew == -INFINITY) { /* nothing visible in this row so far */
            for (size_t c = 0; c < nk; c++) sr[c] = 0.0f;
            continue;
        }
        double sum = 0.0;
        for (size_t c = 0; c < nc; c++) {
            float p = (mask_b && !mask_b[j0 + c]) ? 0.0f : tk_expf(sr[c] - mnew);
            sr[c] = p;
            sum += (double)p;
        }
        for (size_t c = nc; c < nk; c++) sr[c] = 0.0f;
        float alpha = expf(m[i] - mnew); /* 0 when m was -inf (o is then still 0) */
        if (alpha != 1.0f) {
            float *orow = &o[i * os];
            for (size_t d = 0; d < D; d++) orow[d] *= alpha;
        }
        l[i] = (float)((double)l[i] * (double)alpha + sum);
        m[i] = mnew;
    }
}

/* out [B,T,H*D] (overwritten), lse [B,H,T] (overwritten), q [B,T,H*D], k, v [B,S,G*D],
 * key_mask [B,S] or NULL, scratch [tk_attention_tiled_scratch(T, S, D)]. */
void tk_attention_tiled_forward(float *out, float *lse, const float *q, const float *k,
                                const float *v, const uint8_t *key_mask, size_t B, size_t T,
                                size_t S, size_t H, size_t G, size_t D, float *scratch) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D; /* row strides of q/out and of k/v */
    size_t bq = min_sz(TK_ATTN_BQ, T), bk = min_sz(TK_ATTN_BK, S);
    float scale = (float)(1.0 / sqrt((double)D));
    float *sblk = scratch;           /* [bq,bk] scores, then P */
    float *m = &scratch[2 * bq * bk]; /* [bq] running row max */
    float *l = &m[bq];                /* [bq] running row sum */

    for (size_t b = 0; b < B; b++) {
        const uint8_t *mask_b = key_mask ? &key_mask[b * S] : NULL;
        for (size_t h = 0; h < H; h++) {
            size_t g = h / rep;
            const float *K = &k[b * S * ks + g * D], *V = &v[b * S * ks + g * D];
            for (size_t t0 = 0; t0 < T; t0 += bq) {
                size_t nq = min_sz(bq, T - t0);
                const float *Qi = &q[(b * T + t0) * qs + h * D];
                float *Oi = &out[(b * T + t0) * qs + h * D];
                for (size_t i = 0; i < nq; i++) {
                    m[i] = -INFINITY;
                    l[i] = 0.0f;
                    for (size_t d = 0; d < D; d++) Oi[i * qs + d] = 0.0f;
                }
                size_t kend = causal_end(T, S, t0, nq);
                for (size_t j0 = 0; j0 < kend; j0 += bk) {
                    size_t nk = min_sz(bk, kend - j0);
                    /* Sij [nq,nk] = scale Qi [nq,D] Kj^T */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(nq),
                                tk_blas_dim(nk), tk_blas_dim(D), scale, Qi, tk_blas_dim(qs),
                                &K[j0 * ks], tk_blas_dim(ks), 0.0f, sblk, tk_blas_dim(nk));
                    online_softmax_block(sblk, m, l, Oi, qs, mask_b, S - T + t0, j0, nq, nk, D);
                    /* Oi [nq,D] += P [nq,nk] Vj [nk,D] */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(nq),
                                tk_blas_dim(D), tk_blas_dim(nk), 1.0f, sblk, tk_blas_dim(nk),
                                &V[j0 * ks], tk_blas_dim(ks), 1.0f, Oi, tk_blas_dim(qs));
                }
                float *lse_i = &lse[(b * H + h) * T + t0];
                for (size_t i = 0; i < nq; i++) {
                    if (m[i] == -INFINITY) { /* no visible key: out stays 0 */
                        lse_i[i] = -INFINITY;
                        continue;
                    }
                    float inv = 1.0f / l[i];
                    for (size_t d = 0; d < D; d++) Oi[i * qs + d] *= inv;
                    lse_i[i] = m[i] + logf(l[i]);
                }
            }
        }
    }
}

/* For the rows of a block: s [nq,nk] (scaled scores in) becomes P = exp(s - lse) (0 where masked or
 * where the row sees no key); dp [nq,nk] (dO V^T in; NULL when only P is needed) becomes
 * dS = P * (dP - Di) (unscaled).
 * lse_i, di [nq]; mask_b, last0, j0 as in online_softmax_block. */
static void softmax_grad_block(float *s, float *dp, const float *lse_i, const float *di,
                               const uint8_t *mask_b, size_t last0, size_t j0, size_t nq,
                               size_t nk) {
#pragma omp parallel for if (nq * nk >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < nq; i++) {
        float *sr = &s[i * nk];
        size_t nc = lse_i[i] == -INFINITY ? 0 : causal_cols(last0 + i, j0, nk);
        float L = lse_i[i];
        for (size_t c = 0; c < nc; c++)
            sr[c] = (mask_b && !mask_b[j0 + c]) ? 0.0f : tk_expf(sr[c] - L);
        for (size_t c = nc; c < nk; c++) sr[c] = 0.0f;
        if (dp) {
            float *dr = &dp[i * nk], Di = di[i];
            for (size_t c = 0; c < nk; c++) dr[c] = sr[c] * (dr[c] - Di);
        }
    }
}

/* forward: out = softmax(q k^T / sqrt(D) + mask) v, i.e. per (b, h): P = exp(scale Q K^T - lse),
 * O = P V.
 *   Di = rowsum(dO * O);  dV [S,D] += P^T dO;  dS = P * (dO V^T - Di);
 *   dQ [T,D] += scale dS K;  dK [S,D] += scale dS^T Q.
 * dq [B,T,H*D], dk, dv [B,S,G*D] (each += or NULL), scratch [tk_attention_tiled_scratch(T, S, D)],
 * dout [B,T,H*D], out [B,T,H*D] and lse [B,H,T] from tk_attention_tiled_forward, q [B,T,H*D],
 * k, v [B,S,G*D], key_mask [B,S] or NULL (the forward's). */
void tk_attention_tiled_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                                 const float *out, const float *lse, const float *q, const float *k,
                                 const float *v, const uint8_t *key_mask, size_t B, size_t T,
                                 size_t S, size_t H, size_t G, size_t D) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0 || (!dq && !dk && !dv)) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D;
    size_t bq = min_sz(TK_ATTN_BQ, T), bk = min_sz(TK_ATTN_BK, S);
    float scale = (float)(1.0 / sqrt((double)D));
    float *pblk = scratch;            /* [bq,bk] scores, then P */
    float *dsblk = &scratch[bq * bk]; /* [bq,bk] dP, then dS */
    float *di = &scratch[2 * bq * bk]; /* [bq] rowsum(dO * O) */
    int need_ds = dq || dk;

    for (size_t b = 0; b < B; b++) {
        const uint8_t *mask_b = key_mask ? &key_mask[b * S] : NULL;
        for (size_t h = 0; h < H; h++) {
            size_t g = h / rep;
            const float *K = &k[b * S * ks + g * D], *V = &v[b * S * ks + g * D];
            for (size_t t0 = 0; t0 < T; t0 += bq) {
                size_t nq = min_sz(bq, T - t0);
                size_t row0 = (b * T + t0) * qs + h * D;
                const float *Qi = &q[row0], *dOi = &dout[row0], *Oi = &out[row0];
                const float *lse_i = &lse[(b * H + h) * T + t0];
                for (size_t i = 0; i < nq; i++) {
                    double acc = 0.0;
                    for (size_t d = 0; d < D; d++)
                        acc += (double)dOi[i * qs + d] * (double)Oi[i * qs + d];
                    di[i] = (float)acc;
                }
                size_t kend = causal_end(T, S, t0, nq);
                for (size_t j0 = 0; j0 < kend; j0 += bk) {
                    size_t nk = min_sz(bk, kend - j0);
                    /* scores [nq,nk] = scale Qi Kj^T;  dP [nq,nk] = dOi Vj^T */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(nq),
                                tk_blas_dim(nk), tk_blas_dim(D), scale, Qi, tk_blas_dim(qs),
                                &K[j0 * ks], tk_blas_dim(ks), 0.0f, pblk, tk_blas_dim(nk));
                    if (need_ds) {
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(nq),
                                    tk_blas_dim(nk), tk_blas_dim(D), 1.0f, dOi, tk_blas_dim(qs),
                                    &V[j0 * ks], tk_blas_dim(ks), 0.0f, dsblk, tk_blas_dim(nk));
                    }
                    softmax_grad_block(pblk, need_ds ? dsblk : NULL, lse_i, di, mask_b, S - T + t0, j0, nq, nk);
                    if (dv) { /* dVj [nk,D] += P^T [nk,nq] dOi [nq,D] */
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(nk),
                                    tk_blas_dim(D), tk_blas_dim(nq), 1.0f, pblk, tk_blas_dim(nk),
                                    dOi, tk_blas_dim(qs), 1.0f, &dv[(b * S + j0) * ks + g * D],
                                    tk_blas_dim(ks));
                    }
                    if (dq) { /* dQi [nq,D] += scale dS [nq,nk] Kj [nk,D] */
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(nq),
                                    tk_blas_dim(D), tk_blas_dim(nk), scale, dsblk, tk_blas_dim(nk),
                                    &K[j0 * ks], tk_blas_dim(ks), 1.0f, &dq[row0], tk_blas_dim(qs));
                    }
                    if (dk) { /* dKj [nk,D] += scale dS^T [nk,nq] Qi [nq,D] */
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(nk),
                                    tk_blas_dim(D), tk_blas_dim(nq), scale, dsblk, tk_blas_dim(nk),
                                    Qi, tk_blas_dim(qs), 1.0f, &dk[(b * S + j0) * ks + g * D],
                                    tk_blas_dim(ks));
                    }
                }
            }
        }
    }
}
