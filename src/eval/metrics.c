/* metrics.c: see metrics.h. */
#include "metrics.h"

#include <math.h>
#include <stdlib.h>

double tk_metric_accuracy(const int *pred, const int *gold, size_t n) {
    if (n == 0) return NAN;
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) ok += pred[i] == gold[i];
    return (double)ok / (double)n;
}

/* confusion counts of binary labels (non-zero = positive) */
static void confusion(const int *pred, const int *gold, size_t n, double *tp, double *tn, double *fp, double *fn) {
    *tp = *tn = *fp = *fn = 0.0;
    for (size_t i = 0; i < n; i++) {
        int p = pred[i] != 0, g = gold[i] != 0;
        if (p && g) *tp += 1.0;
        else if (!p && !g) *tn += 1.0;
        else if (p) *fp += 1.0;
        else *fn += 1.0;
    }
}

double tk_metric_f1(const int *pred, const int *gold, size_t n) {
    if (n == 0) return NAN;
    double tp, tn, fp, fn;
    confusion(pred, gold, n, &tp, &tn, &fp, &fn);
    double den = 2.0 * tp + fp + fn;
    return den > 0.0 ? 2.0 * tp / den : 0.0;
}

double tk_metric_mcc(const int *pred, const int *gold, size_t n) {
    if (n == 0) return NAN;
    double tp, tn, fp, fn;
    confusion(pred, gold, n, &tp, &tn, &fp, &fn);
    double den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn);
    return den > 0.0 ? (tp * tn - fp * fn) / sqrt(den) : 0.0;
}

double tk_metric_pearson(const double *x, const double *y, size_t n) {
    if (n == 0) return NAN;
    double mx = 0.0, my = 0.0;
    for (size_t i = 0; i < n; i++) {
        mx += x[i];
        my += y[i];
    }
    mx /= (double)n;
    my /= (double)n;
    double sxy = 0.0, sxx = 0.0, syy = 0.0;
    for (size_t i = 0; i < n; i++) {
        double dx = x[i] - mx, dy = y[i] - my;
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if (sxx == 0.0 || syy == 0.0) return NAN;
    double r = sxy / sqrt(sxx * syy);
    return r > 1.0 ? 1.0 : r < -1.0 ? -1.0 : r;
}

/* Heap sort of indices by (key, index): no allocation, no global state, O(n log n). */
static int less_idx(const double *x, size_t a, size_t b) { return x[a] < x[b] || (x[a] == x[b] && a < b); }

static void sift_down(size_t *h, const double *x, size_t root, size_t n) {
    while (2 * root + 1 < n) {
        size_t child = 2 * root + 1;
        if (child + 1 < n && less_idx(x, h[child], h[child + 1])) child++;
        if (!less_idx(x, h[root], h[child])) return;
        size_t t = h[root];
        h[root] = h[child];
        h[child] = t;
        root = child;
    }
}

void tk_metric_ranks(double *ranks, size_t *idx, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) idx[i] = i;
    for (size_t i = n / 2; i-- > 0;) sift_down(idx, x, i, n);
    for (size_t end = n; end > 1; end--) {
        size_t t = idx[0];
        idx[0] = idx[end - 1];
        idx[end - 1] = t;
        sift_down(idx, x, 0, end - 1);
    }
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && x[idx[j]] == x[idx[i]]) j++;
        double r = 0.5 * (double)(i + 1 + j); /* mean of ranks i+1 .. j */
        for (size_t k = i; k < j; k++) ranks[idx[k]] = r;
        i = j;
    }
}

int tk_metric_spearman(double *out, const double *x, const double *y, size_t n, tk_err *err) {
    if (n == 0) {
        *out = NAN;
        return 0;
    }
    double *rx = malloc(n * sizeof *rx), *ry = malloc(n * sizeof *ry);
    size_t *idx = malloc(n * sizeof *idx);
    if (!rx || !ry || !idx) {
        free(rx);
        free(ry);
        free(idx);
        return tk_fail(err, "out of memory ranking %zu values", n);
    }
    tk_metric_ranks(rx, idx, x, n);
    tk_metric_ranks(ry, idx, y, n);
    *out = tk_metric_pearson(rx, ry, n);
    free(rx);
    free(ry);
    free(idx);
    return 0;
}
