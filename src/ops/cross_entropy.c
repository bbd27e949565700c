/* cross_entropy.c: per-row softmax cross-entropy on logits, with ignored rows, and its backward.
 *
 * Shape legend (outermost first):
 *   N  rows (tokens), V  vocabulary
 *
 * loss[n] = logsumexp(logits[n]) - logits[n][target], log-sum-exp taken with the row max subtracted:
 * the exponentials are float, their sum double (the same in forward and backward). A target of
 * TK_CE_IGNORE contributes no loss and a zero gradient row; any other target must be in [0, V).
 */
#include "ops/ops.h"

#include <math.h>

#include "common.h"
#include "fastmath.h"

#define TK_CE_IGNORE (-100)

/* Serial check before any parallel loop, so a bad label stops the run on the calling thread. */
static void check_targets(const int32_t *targets, size_t N, size_t V) {
    for (size_t n = 0; n < N; n++) {
        int32_t t = targets[n];
        TK_ASSERT(t == TK_CE_IGNORE || (t >= 0 && (size_t)t < V));
    }
}

/* Row max and sum of exp(logit - max) of one row [V]. */
static float row_max_sum(const float *row, size_t V, double *sum) {
    float m = -INFINITY;
    #pragma omp simd reduction(max : m)
    for (size_t v = 0; v < V; v++) m = row[v] > m ? row[v] : m;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t v = 0; v < V; v++) s += (double)tk_expf(row[v] - m);
    *sum = s;
    return m;
}

/* losses [N] (0 where ignored), logits [N,V], targets [N]. Returns the sum of losses in double,
 * added in row order (deterministic for any thread count). */
double tk_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets,
                                size_t N, size_t V) {
    TK_ASSERT(V > 0);
    check_targets(targets, N, V);
#pragma omp parallel for if (N * V >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        int32_t t = targets[n];
        if (t == TK_CE_IGNORE) {
            losses[n] = 0.0f;
            continue;
        }
        const float *row = &logits[n * V];
        double sum;
        float m = row_max_sum(row, V, &sum);
        losses[n] = (float)((double)m + log(sum) - (double)row[t]);
    }
    double total = 0.0;
    for (size_t n = 0; n < N; n++) total += (double)losses[n];
    return total;
}

/* forward: loss = scale * sum_n -log softmax(logits[n])[targets[n]].
 * WRITES dlogits [N,V] = scale * (softmax(logits[n]) - onehot(targets[n])), zero rows where ignored.
 * dlogits may alias logits: each element is read before it is written. */
void tk_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               size_t N, size_t V, float scale) {
    TK_ASSERT(V > 0);
    check_targets(targets, N, V);
#pragma omp parallel for if (N * V >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        int32_t t = targets[n];
        const float *row = &logits[n * V];
        float *drow = &dlogits[n * V];
        if (t == TK_CE_IGNORE) {
            for (size_t v = 0; v < V; v++) drow[v] = 0.0f;
            continue;
        }
        double sum;
        float m = row_max_sum(row, V, &sum);
        float inv = (float)(1.0 / sum);
        float p_t = tk_expf(row[t] - m) * inv; /* row may alias drow: read the target first */
#pragma omp simd
        for (size_t v = 0; v < V; v++) drow[v] = scale * (tk_expf(row[v] - m) * inv);
        drow[t] = scale * (p_t - 1.0f);
    }
}

/* Loss and gradient together, one sweep per row: the row max, then exp(logit - max) written into
 * dlogits while summing, then the scaling in place (the row is still in cache). The same arithmetic as
 * tk_cross_entropy_forward followed by tk_cross_entropy_backward (bit-identical results) with one
 * exponential per logit instead of three and no second max pass.
 * losses [N], dlogits [N,V] (may alias logits), logits [N,V], targets [N]. Returns the loss sum. */
/* One row of tk_cross_entropy_fused: drow (may be row) gets the gradient, returns the loss. Built for
 * AVX2 as well as the baseline (TK_HOT_CLONES, common.h). */
TK_HOT_CLONES static float fused_row(float *drow, const float *row, size_t t, size_t V, float scale) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (size_t v = 0; v < V; v++) m = row[v] > m ? row[v] : m;
    float lt = row[t]; /* read before drow (which may be row) is overwritten */
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (size_t v = 0; v < V; v++) {
        float e = tk_expf(row[v] - m);
        drow[v] = e;
        sum += (double)e;
    }
    float inv = (float)(1.0 / sum);
    float p_t = drow[t] * inv;
#pragma omp simd
    for (size_t v = 0; v < V; v++) drow[v] = scale * (drow[v] * inv);
    drow[t] = scale * (p_t - 1.0f);
    return (float)((double)m + log(sum) - (double)lt);
}

double tk_cross_entropy_fused(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                              size_t N, size_t V, float scale) {
    TK_ASSERT(V > 0);
    check_targets(targets, N, V);
#pragma omp parallel for if (N * V >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        int32_t t = targets[n];
        const float *row = &logits[n * V];
        float *drow = &dlogits[n * V];
        if (t == TK_CE_IGNORE) {
            losses[n] = 0.0f;
            for (size_t v = 0; v < V; v++) drow[v] = 0.0f;
            continue;
        }
        losses[n] = fused_row(drow, row, (size_t)t, V, scale);
    }
    double total = 0.0;
    for (size_t n = 0; n < N; n++) total += (double)losses[n];
    return total;
}
