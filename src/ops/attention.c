/* attention.c: causal scaled-dot-product attention with grouped-query heads and a key padding mask.
 *
 * Shape legend (outermost first):
 *   B  sequences, T  query positions, S  key positions (S >= T; the first S-T are a KV cache)
 *   H  query heads, G  key/value heads (H % G == 0), D  head width
 *   R  query rows per block (TK_ATTN_ROWS, or T when T is smaller), E  keys a block sees
 *
 * Per (b, h), with g = h / (H/G) the key/value head that query head h reads:
 *   Q = q[b, :, h, :]  [T,D] (row stride H*D),   K, V = k, v[b, :, g, :]  [S,D] (row stride G*D)
 *   P = softmax(Q K^T / sqrt(D) + mask)  [T,S],   out[b, :, h, :] = P V
 * mask: query t sits at absolute position S-T+t and sees key j iff j <= S-T+t and
 * key_mask[b*S+j] != 0.
 * A row with no visible key has P = 0 and so outputs 0. Softmax rows subtract the row max; the
 * exponentials are float, their sum double.
 *
 * Causal blocks: the T queries of a head are taken R rows at a time. The block of rows t0..t0+R-1
 * sees keys 0..E-1 only, E = S-T+t0+R (the causal limit of its last row), so every product of the
 * block (scores, P V, and in the backward dV, dP, dQ, dK) runs over those E keys: at T = S the
 * masked upper triangle, half the work, is skipped except inside the R x R diagonal blocks. probs
 * is stored the same way: per (b, h), block after block, each block [nr, E] with row stride E
 * (tk_attention_probs_row says where row t is), entries past a row's own limit 0. At T = S = 512 that
 * is 56% of a [T,S] matrix: activation memory, not time (the step took as long with the full
 * layout; docs/performance.md).
 *
 * Threads: one OpenMP task per (b, h) in the forward and per (b, g) in the backward (all the query
 * heads of one key/value group, so that each dk and dv column is written by one thread only). A
 * thread runs its task's whole pipeline, products included: scores, P V, dP and dQ on tk_gemm_small
 * (gemm_small.c: an AVX-512 kernel over copies of K^T, V, V^T and K made once per task, or
 * cblas_sgemm without AVX-512), dV and dK on cblas_sgemm: BLAS inside a parallel region, on purpose
 * (the other such place is the fused LoRA branch, peft/adapter.c). The OpenMP build of OpenBLAS
 * (0.3.21) runs single-threaded while omp_in_parallel() (measured: a 512^3 sgemm takes 1.8 ms inside a
 * 2-thread region, the one-thread time, against 1.0 ms outside; two threads calling it at once each
 * take 1.8 ms and get identical results), so the 16 forward and 32 backward block products of a
 * head (T = 512) run with no pool barrier between them, on blocks hot in that core's L2. Each task
 * runs on one thread in a fixed order, so the results are bitwise the same for any thread count
 * (tests/test_attention_full.c checks 1 against 2). The backward's dP/dS block [R,E] lives in a
 * per-thread slab of R*S floats of the caller's T*S scratch, so at most T/R threads (8 at T = 512)
 * share the backward. Below TK_OMP_MIN_WORK score entries, or with a single task (B*G = 1 in the
 * backward), the if clause leaves the region inactive (one thread, omp_in_parallel() false): the
 * tasks run serially and BLAS threads each call itself.
 * B=1 T=S=512 H=G=12 D=64 on 2 threads, forward + backward: about 22 ms before this layout, 10 ms
 * after, 7.9 ms with tk_gemm_small (docs/performance.md, "How the kernels work").
 */
#include "ops/ops.h"

#include "blas.h"
#include <math.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "fastmath.h"

/* Query rows per block: a [64,S] block of scores (128 KiB at S = 512) stays in L2 between its
 * products. 32, 64 and 128 measured alike (forward + backward above, within noise), 256 about 5%
 * slower (more of the triangle computed, fewer threads' slabs in the scratch). */
#define TK_ATTN_ROWS 64

/* probs of one (b, h): blocks of R = min(TK_ATTN_ROWS, T) rows, block i holding nr rows of E keys. */
size_t tk_attention_probs_row(size_t T, size_t S, size_t t, size_t *width) {
    size_t R = T < TK_ATTN_ROWS ? T : TK_ATTN_ROWS, i = t / R, t0 = i * R, nr = T - t0 < R ? T - t0 : R;
    size_t E = S - T + t0 + nr;
    if (width) *width = E;
    /* blocks 0..i-1 are full (R rows) and see S-T+R, S-T+2R, ... keys */
    return R * (i * (S - T) + R * i * (i + 1) / 2) + (t - t0) * E;
}

size_t tk_attention_probs_head(size_t T, size_t S) {
    if (T == 0) return 0;
    size_t E;
    size_t last = tk_attention_probs_row(T, S, T - 1, &E);
    return last + E;
}

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* Without AVX-512, row_max keeps partial maxima in this many independent lanes, which the compiler
 * holds in vector registers (a plain reduction loop is not vectorised without -ffast-math, and an omp
 * simd max reduction kept its accumulator in memory: a store-to-load stall per vector). */
#define TK_ATTN_LANES 8

#ifdef __AVX512F__
/* row_max without a mask where the build has AVX-512: four independent zmm maxima (the 8-lane loop
 * below is one chain of dependent vmaxps, a fifth of the softmax's time). max(v, acc) keeps acc when v
 * is NaN, as the scalar `v > m ? v : m` does. */
static float row_max_avx512(const float *row, size_t n) {
    __m512 a0 = _mm512_set1_ps(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    size_t j = 0;
    for (; j + 64 <= n; j += 64) {
        a0 = _mm512_max_ps(_mm512_loadu_ps(row + j), a0);
        a1 = _mm512_max_ps(_mm512_loadu_ps(row + j + 16), a1);
        a2 = _mm512_max_ps(_mm512_loadu_ps(row + j + 32), a2);
        a3 = _mm512_max_ps(_mm512_loadu_ps(row + j + 48), a3);
    }
    for (; j + 16 <= n; j += 16) a0 = _mm512_max_ps(_mm512_loadu_ps(row + j), a0);
    if (j < n) a1 = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (n - j)) - 1u), row + j), a1);
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
}
#endif

/* max over the visible entries of row[0..n-1] (mask_b[j] != 0, mask_b [n] or NULL); -INFINITY if none.
 * Exact whatever the lane order (a max does not round). */
static float row_max(const float *row, const uint8_t *mask_b, size_t n) {
#ifdef __AVX512F__
    if (!mask_b) return row_max_avx512(row, n);
#endif
    float lane[TK_ATTN_LANES];
    for (size_t l = 0; l < TK_ATTN_LANES; l++) lane[l] = -INFINITY;
    size_t j = 0;
    if (mask_b) {
        for (; j + TK_ATTN_LANES <= n; j += TK_ATTN_LANES)
            for (size_t l = 0; l < TK_ATTN_LANES; l++) {
                float r = row[j + l], v = mask_b[j + l] ? r : -INFINITY; /* load first: branch-free */
                lane[l] = v > lane[l] ? v : lane[l];
            }
    } else {
        for (; j + TK_ATTN_LANES <= n; j += TK_ATTN_LANES)
            for (size_t l = 0; l < TK_ATTN_LANES; l++) lane[l] = row[j + l] > lane[l] ? row[j + l] : lane[l];
    }
    float m = -INFINITY;
    for (; j < n; j++) {
        float v = !mask_b || mask_b[j] ? row[j] : -INFINITY;
        m = v > m ? v : m;
    }
    for (size_t l = 0; l < TK_ATTN_LANES; l++) m = lane[l] > m ? lane[l] : m;
    return m;
}


/* sum over j < n of a[j] (b NULL) or of a[j] b[j], in double, in a fixed order for any thread count:
 * with AVX-512, four independent zmm sums of 8 doubles (a single vector sum made every add wait on the
 * one before), then the tail. Inlined with b constant at each use. */
__attribute__((always_inline)) static inline double dsum(const float *a, const float *b, size_t n) {
    size_t j = 0;
    double s = 0.0;
#ifdef __AVX512F__
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    for (; j + 32 <= n; j += 32)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(a + j + 8 * u));
            acc[u] = b ? _mm512_fmadd_pd(x, _mm512_cvtps_pd(_mm256_loadu_ps(b + j + 8 * u)), acc[u])
                       : _mm512_add_pd(acc[u], x);
        }
    s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
#endif
#pragma omp simd reduction(+ : s)
    for (size_t k = j; k < n; k++) s += b ? (double)a[k] * (double)b[k] : (double)a[k];
    return s;
}


/* x where keep != 0, else +0.0f, through a bit mask: `keep ? x : 0.0f` stays a branch around the
 * exponential that computes x, which keeps the loop scalar (the same cure as tk_clampf in
 * fastmath.h). */
static inline float masked_zero(float x, uint8_t keep) {
    uint32_t xi, m = 0u - (uint32_t)(keep != 0);
    memcpy(&xi, &x, 4);
    xi &= m;
    memcpy(&x, &xi, 4);
    return x;
}

/* One softmax row in place: scores [S] (already scaled; S is the row's stored width) become
 * probabilities over the visible keys (j <= last and mask_b[j] != 0, mask_b [S] or NULL), zero
 * elsewhere. The exponentials run over whole 16-float vectors up to last+1 rounded up (within S),
 * the entries past `last` masked to +0 (they hold scores the block's product computed; whatever exp
 * gives there, inf included, the bit mask clears): a scalar tail of up to 15 exponentials per row
 * cost more than the masked lanes. */
static void softmax_row(float *row, const uint8_t *mask_b, size_t S, size_t last) {
    size_t n = last + 1, nv = (n + 15) & ~(size_t)15;
    if (nv > S) nv = n;
    float m = row_max(row, mask_b, n);
    if (m == -INFINITY) { /* no visible key (or all scores -inf) */
        for (size_t j = 0; j < S; j++) row[j] = 0.0f;
        return;
    }
    if (mask_b) {
#pragma omp simd
        for (size_t j = 0; j < nv; j++) row[j] = masked_zero(tk_expf(row[j] - m), (uint8_t)(j < n && mask_b[j]));
    } else {
#pragma omp simd
        for (size_t j = 0; j < nv; j++) row[j] = masked_zero(tk_expf(row[j] - m), (uint8_t)(j < n));
    }
    float inv = (float)(1.0 / dsum(row, NULL, nv));
#pragma omp simd
    for (size_t j = 0; j < nv; j++) row[j] *= inv;
    for (size_t j = nv; j < S; j++) row[j] = 0.0f;
}


/* K [S rows, stride ks] -> Kc [S, D] without gaps: as the B of a product, rows 3 KiB apart (H*D =
 * 768) fell into a few L1 sets and did not stay in L1 between row tiles. */
static void pack_rows(float *Kc, const float *K, size_t S, size_t D, size_t ks) {
    for (size_t j = 0; j < S; j++) memcpy(&Kc[j * D], &K[j * ks], D * sizeof(float));
}

/* The forward of one (b, h), block by block.
 * O [T rows, stride qs] (overwritten), P this head's probs (overwritten), Q [T rows, stride qs],
 * K, V [S rows, stride ks], mask_b [S] or NULL, KT [D, ldt] and Vc [S, D] scratch for K^T and a
 * gapless V, or NULL: then the scores are one cblas_sgemm per block (Q K^T with K read transposed)
 * and V is read in place, the path without AVX-512. */
static void head_forward(float *O, float *P, const float *Q, const float *K, const float *V,
                         const uint8_t *mask_b, size_t T, size_t S, size_t D, size_t qs, size_t ks,
                         float scale, float *KT, float *Vc, size_t ldt) {
    size_t R = min_sz(TK_ATTN_ROWS, T);
    if (KT) {
        tk_transpose(KT, ldt, K, ks, S, D); /* K^T [D, ldt] */
        pack_rows(Vc, V, S, D, ks);
        V = Vc, ks = D;
    }
    for (size_t t0 = 0; t0 < T; t0 += R) {
        size_t nr = min_sz(R, T - t0), E;
        float *Pb = &P[tk_attention_probs_row(T, S, t0, &E)];
        /* scores [nr,E] = scale * Q_blk [nr,D] K_E^T */
        if (KT)
            tk_gemm_small(nr, E, D, scale, &Q[t0 * qs], qs, KT, ldt, 0, Pb, E);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(nr), tk_blas_dim(E),
                        tk_blas_dim(D), scale, &Q[t0 * qs], tk_blas_dim(qs), K, tk_blas_dim(ks), 0.0f, Pb,
                        tk_blas_dim(E));
        for (size_t r = 0; r < nr; r++) softmax_row(&Pb[r * E], mask_b, E, S - T + t0 + r);
        /* O_blk [nr,D] = P_blk [nr,E] V_E [E,D] (P is 0 past each row's limit) */
        tk_gemm_small(nr, D, E, 1.0f, Pb, E, V, ks, 0, &O[t0 * qs], qs);
    }
}

/* Row stride of the transposed K or V: S rounded up to 16, plus 16, so that the D rows of a panel do
 * not all fall in the same L1 sets (a stride of 2 KiB at S = 512 did: scores 98 -> 128 GFLOP/s). */
static size_t transposed_stride(size_t S) { return ((S + 15) & ~(size_t)15) + 16; }

/* The copies of K and V cost S*D per head, the products T*S*D: below this many query rows (decoding
 * a token or a few) the copies would cost as much as they save, and the products read K and V in
 * place. */
#define TK_ATTN_COPY_MIN_ROWS 16

/* Two [D, ldt] buffers per thread (a transposed K or V, and a gapless V or K) for the AVX-512
 * kernel, or NULL: no AVX-512, fewer than TK_ATTN_COPY_MIN_ROWS query rows, or no memory (the
 * cblas_sgemm form needs neither). */
static float *panel_buffers(size_t threads, size_t T, size_t D, size_t S) {
    if (!tk_gemm_small_avx512() || T < TK_ATTN_COPY_MIN_ROWS) return NULL;
    return malloc(threads * 2 * D * transposed_stride(S) * sizeof(float));
}

/* out [B,T,H*D] (overwritten), probs [B*H, tk_attention_probs_head(T, S)] (cached for backward; also
 * holds the raw scores in between), q [B,T,H*D], k, v [B,S,G*D], key_mask [B,S] or NULL. */
void tk_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                          const uint8_t *key_mask, size_t B, size_t T, size_t S, size_t H, size_t G,
                          size_t D) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D; /* row strides of q/out and of k/v */
    float scale = (float)(1.0 / sqrt((double)D));
    size_t tasks = B * H, ph = tk_attention_probs_head(T, S);
    int threaded = tasks > 1 && omp_get_max_threads() > 1 && B * H * T * S >= TK_OMP_MIN_WORK;
    size_t ldt = transposed_stride(S);
    float *kt = panel_buffers(threaded ? (size_t)omp_get_max_threads() : 1, T, D, S);

#pragma omp parallel for schedule(dynamic, 1) if (threaded)
    for (size_t i = 0; i < tasks; i++) {
        size_t b = i / H, h = i % H, g = h / rep;
        float *my_kt = kt ? &kt[(size_t)omp_get_thread_num() * 2 * D * ldt] : NULL;
        head_forward(&out[b * T * qs + h * D], &probs[i * ph], &q[b * T * qs + h * D],
                     &k[b * S * ks + g * D], &v[b * S * ks + g * D], key_mask ? &key_mask[b * S] : NULL,
                     T, S, D, qs, ks, scale, my_kt, my_kt ? my_kt + D * ldt : NULL, ldt);
    }
    free(kt);
}

/* The backward of the query heads h0..h0+rep-1 of one (b, g), block by block (see
 * tk_attention_backward for the formulas). dQ [T rows, stride qs] for head h0 (+= or NULL),
 * dK, dV [S rows, stride ks] (+= or NULL), slab [R*S] for dP then dS of one block, dO, Q [T rows,
 * stride qs] for head h0 (head h0+i starts i*D further), P the rep heads' probs (ph floats each), K, V
 * [S rows, stride ks],
 * VT [D, ldt] and Kc [S, D] scratch for V^T and a gapless K, or NULL (dP is then one cblas_sgemm
 * per block and K is read in place). */
static void group_backward(float *dQ, float *dK, float *dV, float *slab, const float *dO,
                           const float *P, size_t ph, const float *Q, const float *K, const float *V, size_t rep,
                           size_t T, size_t S, size_t D, size_t qs, size_t ks, float scale, float *VT,
                           float *Kc, size_t ldt) {
    size_t R = min_sz(TK_ATTN_ROWS, T);
    const float *Kq = K; /* the K that dQ reads, and its row stride */
    size_t kqs = ks;
    if (VT && (dQ || dK)) tk_transpose(VT, ldt, V, ks, S, D); /* V^T [D, ldt] */
    if (VT && dQ) {
        pack_rows(Kc, K, S, D, ks);
        Kq = Kc, kqs = D;
    }
    for (size_t i = 0; i < rep; i++) {
        const float *Ph = &P[i * ph], *dOh = &dO[i * D], *Qh = &Q[i * D];
        float *dQh = dQ ? &dQ[i * D] : NULL;
        for (size_t t0 = 0; t0 < T; t0 += R) {
            size_t nr = min_sz(R, T - t0), E;
            const float *Pb = &Ph[tk_attention_probs_row(T, S, t0, &E)], *dOb = &dOh[t0 * qs], *Qb = &Qh[t0 * qs];
            if (dV) { /* dV_E [E,D] += P_blk^T [E,nr] dO_blk [nr,D] (cblas: see gemm_small.c) */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(E), tk_blas_dim(D),
                            tk_blas_dim(nr), 1.0f, Pb, tk_blas_dim(E), dOb, tk_blas_dim(qs), 1.0f, dV,
                            tk_blas_dim(ks));
            }
            if (!dQh && !dK) continue;

            /* dP [nr,E] = dO_blk [nr,D] V_E^T, in the slab with row stride E */
            if (VT)
                tk_gemm_small(nr, E, D, 1.0f, dOb, qs, VT, ldt, 0, slab, E);
            else
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(nr), tk_blas_dim(E),
                            tk_blas_dim(D), 1.0f, dOb, tk_blas_dim(qs), V, tk_blas_dim(ks), 0.0f, slab,
                            tk_blas_dim(E));

            /* dS = P * (dP - sum_j P dP) * scale, row by row; 0 past the row's causal limit */
            for (size_t r = 0; r < nr; r++) {
                const float *pr = &Pb[r * E];
                float *sr = &slab[r * E];
                size_t n = S - T + t0 + r + 1; /* visible columns 0..n-1 */
                float fdot = (float)dsum(pr, sr, n);
#pragma omp simd
                for (size_t j = 0; j < n; j++) sr[j] = pr[j] * (sr[j] - fdot) * scale;
                for (size_t j = n; j < E; j++) sr[j] = 0.0f;
            }

            /* dQ_blk [nr,D] += dS [nr,E] K_E [E,D] */
            if (dQh) tk_gemm_small(nr, D, E, 1.0f, slab, E, Kq, kqs, 1, &dQh[t0 * qs], qs);
            if (dK) { /* dK_E [E,D] += dS^T [E,nr] Q_blk [nr,D] (cblas: see gemm_small.c) */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(E), tk_blas_dim(D),
                            tk_blas_dim(nr), 1.0f, slab, tk_blas_dim(E), Qb, tk_blas_dim(qs), 1.0f, dK,
                            tk_blas_dim(ks));
            }
        }
    }
}

/* forward: out = softmax(q k^T / sqrt(D) + mask) v, i.e. per (b, h): P = softmax(scale Q K^T),
 * O = P V.
 *   dV [S,D] += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP)) * scale (P = 0 where masked);
 *   dQ [T,D] += dS K;    dK [S,D] += dS^T Q.
 * dq [B,T,H*D], dk, dv [B,S,G*D] (each += or NULL), scratch [T,S] (slabs of R*S floats, one per
 * thread, for dP then dS of one block); dout [B,T,H*D], probs from the forward,
 * q [B,T,H*D], k, v [B,S,G*D]. */
void tk_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *probs, const float *q, const float *k, const float *v,
                           size_t B, size_t T, size_t S, size_t H, size_t G, size_t D) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D;
    float scale = (float)(1.0 / sqrt((double)D));
    size_t tasks = B * G, R = min_sz(TK_ATTN_ROWS, T), slab = R * S, ph = tk_attention_probs_head(T, S);
    size_t nthr = min_sz(min_sz((size_t)omp_get_max_threads(), tasks), T / R); /* slabs in scratch */
    int threaded = nthr > 1 && B * H * T * S >= TK_OMP_MIN_WORK;
    size_t ldt = transposed_stride(S);
    float *vt = panel_buffers(threaded ? nthr : 1, T, D, S);

#pragma omp parallel for schedule(dynamic, 1) num_threads(threaded ? (int)nthr : 1) if (threaded)
    for (size_t i = 0; i < tasks; i++) {
        size_t b = i / G, g = i % G, h0 = g * rep;
        float *my_slab = &scratch[(size_t)omp_get_thread_num() * slab];
        float *my_vt = vt ? &vt[(size_t)omp_get_thread_num() * 2 * D * ldt] : NULL;
        group_backward(dq ? &dq[b * T * qs + h0 * D] : NULL, dk ? &dk[b * S * ks + g * D] : NULL,
                       dv ? &dv[b * S * ks + g * D] : NULL, my_slab, &dout[b * T * qs + h0 * D],
                       &probs[(b * H + h0) * ph], ph, &q[b * T * qs + h0 * D], &k[b * S * ks + g * D],
                       &v[b * S * ks + g * D], rep, T, S, D, qs, ks, scale, my_vt, my_vt ? my_vt + D * ldt : NULL,
                       ldt);
    }
    free(vt);
}
