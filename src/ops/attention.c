/* attention.c: causal scaled-dot-product attention with grouped-query heads and a key padding mask.
 *
 * Shape legend (outermost first):
 *   B  sequences, T  query positions, S  key positions (S >= T; the first S-T are a KV cache)
 *   H  query heads, G  key/value heads (H % G == 0), D  head width
 *
 * Per (b, h), with g = h / (H/G) the key/value head that query head h reads:
 *   Q = q[b, :, h, :]  [T,D] (row stride H*D),   K, V = k, v[b, :, g, :]  [S,D] (row stride G*D)
 *   P = softmax(Q K^T / sqrt(D) + mask)  [T,S],   out[b, :, h, :] = P V
 * mask: query t sits at absolute position S-T+t and sees key j iff j <= S-T+t and
 * key_mask[b*S+j] != 0.
 * A row with no visible key has P = 0 and so outputs 0. Softmax rows subtract the row max; the
 * exponentials are float, their sum double.
 *
 * The matmuls are cblas_sgemm calls on the strided head views, made from serial code; only the
 * softmax row loops run under OpenMP.
 */
#include "ops/ops.h"

#include "blas.h"
#include <limits.h>
#include <math.h>

#include "common.h"
#include "fastmath.h"

/* One softmax row in place: scores [S] (already scaled) become probabilities over the visible keys
 * (j <= last and mask_b[j] != 0, mask_b [S] or NULL), zero elsewhere. */
static void softmax_row(float *row, const uint8_t *mask_b, size_t S, size_t last) {
    float m = -INFINITY;
    if (mask_b) {
#pragma omp simd reduction(max : m) /* branch-free, so it vectorises */
        for (size_t j = 0; j <= last; j++) {
            float v = mask_b[j] ? row[j] : -INFINITY;
            m = v > m ? v : m;
        }
    } else {
#pragma omp simd reduction(max : m)
        for (size_t j = 0; j <= last; j++) m = row[j] > m ? row[j] : m;
    }
    if (m == -INFINITY) { /* no visible key (or all scores -inf) */
        for (size_t j = 0; j < S; j++) row[j] = 0.0f;
        return;
    }
    double sum = 0.0;
    if (mask_b) {
#pragma omp simd reduction(+ : sum)
        for (size_t j = 0; j <= last; j++) {
            float e = mask_b[j] ? tk_expf(row[j] - m) : 0.0f;
            row[j] = e;
            sum += (double)e;
        }
    } else {
#pragma omp simd reduction(+ : sum)
        for (size_t j = 0; j <= last; j++) {
            float e = tk_expf(row[j] - m);
            row[j] = e;
            sum += (double)e;
        }
    }
    float inv = (float)(1.0 / sum);
    for (size_t j = 0; j <= last; j++) row[j] *= inv;
    for (size_t j = last + 1; j < S; j++) row[j] = 0.0f;
}

/* out [B,T,H*D] (overwritten), probs [B,H,T,S] (cached for backward; also holds the raw scores in
 * between), q [B,T,H*D], k, v [B,S,G*D], key_mask [B,S] or NULL. */
void tk_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                          const uint8_t *key_mask, size_t B, size_t T, size_t S, size_t H, size_t G,
                          size_t D) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D; /* row strides of q/out and of k/v */
    float scale = (float)(1.0 / sqrt((double)D));

    /* scores: P_bh [T,S] = scale * Q [T,D] K^T */
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            size_t g = h / rep;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(T), tk_blas_dim(S),
                        tk_blas_dim(D), scale, &q[b * T * qs + h * D], tk_blas_dim(qs),
                        &k[b * S * ks + g * D], tk_blas_dim(ks), 0.0f, &probs[(b * H + h) * T * S],
                        tk_blas_dim(S));
        }
    }

    /* masked softmax over every row of every (b, h) */
#pragma omp parallel for if (B * H * T * S >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < B * H * T; r++) {
        size_t b = r / (H * T), t = r % T;
        softmax_row(&probs[r * S], key_mask ? &key_mask[b * S] : NULL, S, S - T + t);
    }

    /* out_bh [T,D] = P_bh [T,S] V [S,D] */
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            size_t g = h / rep;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(T), tk_blas_dim(D),
                        tk_blas_dim(S), 1.0f, &probs[(b * H + h) * T * S], tk_blas_dim(S),
                        &v[b * S * ks + g * D], tk_blas_dim(ks), 0.0f, &out[b * T * qs + h * D],
                        tk_blas_dim(qs));
        }
    }
}

/* forward: out = softmax(q k^T / sqrt(D) + mask) v, i.e. per (b, h): P = softmax(scale Q K^T),
 * O = P V.
 *   dV [S,D] += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP)) * scale (P = 0 where masked);
 *   dQ [T,D] += dS K;    dK [S,D] += dS^T Q.
 * dq [B,T,H*D], dk, dv [B,S,G*D] (each += or NULL), scratch [T,S] holds dP then dS for one (b, h);
 * dout [B,T,H*D], probs [B,H,T,S] from the forward, q [B,T,H*D], k, v [B,S,G*D]. */
void tk_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *probs, const float *q, const float *k, const float *v,
                           size_t B, size_t T, size_t S, size_t H, size_t G, size_t D) {
    TK_ASSERT(G > 0 && H % G == 0 && S >= T && D > 0);
    if (B == 0 || T == 0) return;
    size_t rep = H / G;
    size_t qs = H * D, ks = G * D;
    float scale = (float)(1.0 / sqrt((double)D));

    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            size_t g = h / rep;
            const float *P = &probs[(b * H + h) * T * S];
            const float *dO = &dout[b * T * qs + h * D];
            const float *Q = &q[b * T * qs + h * D];
            const float *K = &k[b * S * ks + g * D];
            const float *Vh = &v[b * S * ks + g * D];

            if (dv) { /* dV [S,D] += P^T [S,T] dO [T,D] */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(S), tk_blas_dim(D),
                            tk_blas_dim(T), 1.0f, P, tk_blas_dim(S), dO, tk_blas_dim(qs), 1.0f,
                            &dv[b * S * ks + g * D], tk_blas_dim(ks));
            }
            if (!dq && !dk) continue;

            /* dP [T,S] = dO [T,D] V^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(T), tk_blas_dim(S),
                        tk_blas_dim(D), 1.0f, dO, tk_blas_dim(qs), Vh, tk_blas_dim(ks), 0.0f, scratch,
                        tk_blas_dim(S));

            /* dS = P * (dP - sum_j P dP) * scale, row by row */
#pragma omp parallel for if (T * S >= TK_OMP_MIN_WORK)
            for (size_t t = 0; t < T; t++) {
                const float *pr = &P[t * S];
                float *sr = &scratch[t * S];
                double dot = 0.0;
                for (size_t j = 0; j < S; j++) dot += (double)pr[j] * (double)sr[j];
                float fdot = (float)dot;
                for (size_t j = 0; j < S; j++) sr[j] = pr[j] * (sr[j] - fdot) * scale;
            }

            if (dq) { /* dQ [T,D] += dS [T,S] K [S,D] */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(T), tk_blas_dim(D),
                            tk_blas_dim(S), 1.0f, scratch, tk_blas_dim(S), K, tk_blas_dim(ks), 1.0f,
                            &dq[b * T * qs + h * D], tk_blas_dim(qs));
            }
            if (dk) { /* dK [S,D] += dS^T [S,T] Q [T,D] */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(S), tk_blas_dim(D),
                            tk_blas_dim(T), 1.0f, scratch, tk_blas_dim(S), Q, tk_blas_dim(qs), 1.0f,
                            &dk[b * S * ks + g * D], tk_blas_dim(ks));
            }
        }
    }
}
