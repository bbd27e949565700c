/* attention_ref.h: causal grouped-query attention in double, straight from the formulas of
 * src/ops/attention.c, for the kernel tests (test_attention_full, test_ops_grad).
 *
 *   q [B,T,H*D], k, v [B,S,G*D] (float), mask [B,S] or NULL: query t sits at absolute position
 *   S-T+t and sees key j iff j <= S-T+t and mask[b*S+j] != 0; a row that sees no key is all 0.
 *   out [B,T,H*D], probs [B,H,T,S] (double, written).
 *   With dout [B,T,H*D] given, also the backward, added to dq [B,T,H*D], dk, dv [B,S,G*D] (double):
 *   dP_j = dO . V_j, dS = P (dP - P.dP) scale, dV += P^T dO, dQ += dS K, dK += dS^T Q.
 *
 * probs_expand lays tk_attention_forward's probs out as [B,H,T,S], the reference's layout.
 * Static (one copy per test program); include after test_util.h (xalloc) and ops/ops.h.
 */
#ifndef TK_TEST_ATTENTION_REF_H
#define TK_TEST_ATTENTION_REF_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* probs as tk_attention_forward stores them (tk_attention_probs_row's blocks, BH heads) ->
 * full [BH,T,S] with 0 past each row's stored width, to compare with the reference's probs. */
static float *probs_expand(const float *probs, size_t BH, size_t T, size_t S) {
    float *full = xalloc(BH * T * S, sizeof(float));
    size_t ph = tk_attention_probs_head(T, S);
    for (size_t i = 0; i < BH; i++)
        for (size_t t = 0; t < T; t++) {
            size_t w, at = tk_attention_probs_row(T, S, t, &w);
            for (size_t j = 0; j < S; j++) full[(i * T + t) * S + j] = j < w ? probs[i * ph + at + j] : 0.0f;
        }
    return full;
}

static void attention_ref(const float *q, const float *k, const float *v, const uint8_t *mask, size_t B, size_t T,
                          size_t S, size_t H, size_t G, size_t D, double *out, double *probs, const float *dout,
                          double *dq, double *dk, double *dv) {
    size_t qs = H * D, ks = G * D;
    double scale = 1.0 / sqrt((double)D);
    double *dp = xalloc(S, sizeof(double));
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < H; h++) {
            size_t g = h / (H / G);
            for (size_t t = 0; t < T; t++) {
                const float *qt = &q[(b * T + t) * qs + h * D];
                double *pr = &probs[((b * H + h) * T + t) * S];
                double m = -INFINITY, sum = 0.0;
                for (size_t j = 0; j < S; j++) {
                    const float *kj = &k[(b * S + j) * ks + g * D];
                    int visible = j <= S - T + t && (!mask || mask[b * S + j]);
                    double s = 0.0;
                    for (size_t d = 0; d < D; d++) s += (double)qt[d] * kj[d];
                    pr[j] = visible ? s * scale : -INFINITY;
                    m = pr[j] > m ? pr[j] : m;
                }
                for (size_t j = 0; j < S; j++) {
                    pr[j] = m == -INFINITY ? 0.0 : exp(pr[j] - m);
                    sum += pr[j];
                }
                for (size_t j = 0; j < S; j++) pr[j] = sum > 0.0 ? pr[j] / sum : 0.0;
                for (size_t d = 0; d < D; d++) {
                    double o = 0.0;
                    for (size_t j = 0; j < S; j++) o += pr[j] * v[(b * S + j) * ks + g * D + d];
                    out[(b * T + t) * qs + h * D + d] = o;
                }
                if (!dout) continue;
                const float *dOt = &dout[(b * T + t) * qs + h * D];
                double pdp = 0.0;
                for (size_t j = 0; j < S; j++) {
                    const float *vj = &v[(b * S + j) * ks + g * D];
                    double s = 0.0;
                    for (size_t d = 0; d < D; d++) s += (double)dOt[d] * vj[d];
                    dp[j] = s;
                    pdp += pr[j] * s;
                }
                for (size_t j = 0; j < S; j++) {
                    double ds = pr[j] * (dp[j] - pdp) * scale;
                    for (size_t d = 0; d < D; d++) {
                        dv[(b * S + j) * ks + g * D + d] += pr[j] * dOt[d];
                        dq[(b * T + t) * qs + h * D + d] += ds * k[(b * S + j) * ks + g * D + d];
                        dk[(b * S + j) * ks + g * D + d] += ds * qt[d];
                    }
                }
            }
        }
    tk_free(dp);
}

#endif
