/* test_util.h: what the C kernel tests share: a seeded splitmix64 stream, allocation that exits on
 * failure, relative errors against a reference, and ok/FAIL lines counted in g_failures.
 *
 *   #define TEST_NAME "test_ops_grad"       // named in the out-of-memory message
 *   #define TEST_SEED 0x9e3779b97f4a7c15ull  // the stream's start (each test keeps its own data)
 *   #define TEST_COL 58                      // width of the name column (default 58)
 *   #include "test_util.h"
 *
 * Everything is static (one copy per test program); unused helpers cost nothing.
 */
#ifndef TK_TEST_UTIL_H
#define TK_TEST_UTIL_H

#include "common.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#if !defined(TEST_NAME) || !defined(TEST_SEED)
#error "define TEST_NAME and TEST_SEED before including test_util.h"
#endif
#ifndef TEST_COL
#define TEST_COL 58
#endif

static int g_failures;
static uint64_t g_rng = TEST_SEED;

/* splitmix64 -> uniform float in [lo, hi). */
static inline float rnd(float lo, float hi) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return lo + (hi - lo) * (float)((double)(z >> 40) / (double)(1ull << 24));
}

static inline void fill(float *a, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) a[i] = rnd(lo, hi);
}

/* Zeroed, 64-byte aligned; exits the test when out of memory. */
static inline void *xalloc(size_t n, size_t size) {
    void *p = tk_calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "%s: out of memory (%zu x %zu bytes)\n", TEST_NAME, n, size);
        exit(1);
    }
    return p;
}
static inline float *falloc(size_t n) { return (float *)xalloc(n, sizeof(float)); }
static inline double *dalloc(size_t n) { return (double *)xalloc(n, sizeof(double)); }

static inline void report(const char *name, double err, double tol) {
    int ok = err <= tol; /* false for NaN */
    printf("%-*s max err %.3e  (tol %.0e)  %s\n", TEST_COL, name, err, tol, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

static inline void report_bool(const char *name, int ok) {
    printf("%-*s %s\n", TEST_COL, name, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

/* max|a - ref| / max(max|ref|, 1e-3); +inf when either holds a NaN or inf. */
static inline double rel_err_d(const float *a, const double *ref, size_t n) {
    double maxd = 0.0, maxr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        double d = fabs((double)a[i] - ref[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs(ref[i]) > maxr ? fabs(ref[i]) : maxr;
    }
    return maxd / (maxr > 1e-3 ? maxr : 1e-3);
}

/* Central differences of loss(ctx) over param[0..n) with step eps, reported against analytic as
 * rel_err_d under tol. */
static inline void fd_central(const char *name, const float *analytic, float *param, size_t n, float eps, double tol,
                              double (*loss)(void *ctx), void *ctx) {
    double *num = dalloc(n);
    for (size_t i = 0; i < n; i++) {
        float o = param[i];
        param[i] = o + eps;
        double lp = loss(ctx);
        param[i] = o - eps;
        double lm = loss(ctx);
        param[i] = o;
        num[i] = (lp - lm) / (2.0 * eps);
    }
    report(name, rel_err_d(analytic, num, n), tol);
    free(num);
}

static inline double rel_err_f(const float *a, const float *ref, size_t n) {
    double maxd = 0.0, maxr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        double d = fabs((double)a[i] - (double)ref[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs((double)ref[i]) > maxr ? fabs((double)ref[i]) : maxr;
    }
    return maxd / (maxr > 1e-3 ? maxr : 1e-3);
}

#endif
