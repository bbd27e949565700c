/* test_linear_bf16dot.c: the BF16-compute frozen products (src/ops/linear_bf16dot.c) against double
 * references of the BF16-rounded inputs.
 *
 * tk_bf16dot_pack must place bf16(w[64p + j][2kp + e]) at wd[64p Ip + 128 kp + 2j + e] (nearest even,
 * as tk_f32_to_bf16) with zeros in the padding, and give the same from a BF16 source. The forward must
 * give y = bf16(x) bf16(w)^T and the backward dx (+)= bf16(dy) bf16(w), each element within 1e-6 of the
 * sum of |terms| (fp32 accumulation of exact BF16 products: the only error is fp32 rounding of partial
 * sums; a wrongly rounded input alone would be off by ~4e-3 of a term). Shapes cover every row tail
 * (N % 6), odd I and O, partial panels on both sides, several forward k blocks (I > 2048) and backward
 * depth blocks (O > 768). Results must match for 1 and 2 threads bit for bit, and the backward must be
 * the forward's adjoint on the rounded values.
 * Skipped (77) where the CPU has no AVX512-BF16 (or TSPEFT_BF16DOT=0): the kernel never runs there.
 */
#define TEST_NAME "test_linear_bf16dot"
#define TEST_SEED 0xbf16d07ull
#include "test_util.h"

#include "common.h"
#include "ops/ops.h"

#include <omp.h>
#include <string.h>

static double bf(float f) { return (double)tk_bf16_to_f32(tk_f32_to_bf16(f)); }

/* max over elements of |a - ref| / (sum of |terms| + 1e-30) */
static double term_err(const float *a, const double *ref, const double *mag, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        double d = fabs((double)a[i] - ref[i]) / (mag[i] + 1e-30);
        e = d > e ? d : e;
    }
    return e;
}

static void one_case(size_t N, size_t I, size_t O) {
    size_t Ip = I + (I & 1), Op = (O + 63) / 64 * 64;
    float *w = falloc(O * I), *x = falloc(N * I), *dy = falloc(N * O), *dx0 = falloc(N * I);
    float *y = falloc(N * O), *y1 = falloc(N * O), *dx = falloc(N * I), *dx1 = falloc(N * I), *dxw = falloc(N * I);
    uint16_t *wh = xalloc(O * I, sizeof(uint16_t));
    uint16_t *wd = xalloc(tk_bf16dot_size(O, I), sizeof(uint16_t)), *wd2 = xalloc(tk_bf16dot_size(O, I), sizeof(uint16_t));
    double *yr = dalloc(N * O), *ym = dalloc(N * O), *dxr = dalloc(N * I), *dxm = dalloc(N * I);
    fill(w, O * I, -1.0f, 1.0f);
    fill(x, N * I, -2.0f, 2.0f);
    fill(dy, N * O, -1e-3f, 1e-3f);
    fill(dx0, N * I, -1.0f, 1.0f);
    for (size_t i = 0; i < O * I; i++) wh[i] = tk_f32_to_bf16(w[i]);
    tk_bf16dot_pack(wd, w, NULL, O, I);
    tk_bf16dot_pack(wd2, NULL, wh, O, I);
    size_t misplaced = tk_bf16dot_size(O, I) != Op * Ip;
    for (size_t p = 0; p < Op / 64; p++)
        for (size_t kp = 0; kp < Ip / 2; kp++)
            for (size_t j = 0; j < 64; j++)
                for (size_t e = 0; e < 2; e++) {
                    size_t o = 64 * p + j, k = 2 * kp + e;
                    uint16_t want = o < O && k < I ? tk_f32_to_bf16(w[o * I + k]) : 0;
                    misplaced += wd[64 * p * Ip + 128 * kp + 2 * j + e] != want;
                }
    int same_src = memcmp(wd, wd2, tk_bf16dot_size(O, I) * sizeof(uint16_t)) == 0;

    for (size_t n = 0; n < N; n++) {
        for (size_t o = 0; o < O; o++) {
            double s = 0.0, a = 0.0;
            for (size_t k = 0; k < I; k++) {
                double t = bf(x[n * I + k]) * bf(w[o * I + k]);
                s += t, a += fabs(t);
            }
            yr[n * O + o] = s, ym[n * O + o] = a;
        }
        for (size_t k = 0; k < I; k++) {
            double s = 0.0, a = 0.0;
            for (size_t o = 0; o < O; o++) {
                double t = bf(dy[n * O + o]) * bf(w[o * I + k]);
                s += t, a += fabs(t);
            }
            dxr[n * I + k] = s, dxm[n * I + k] = a;
        }
    }
    for (size_t i = 0; i < N * O; i++) y[i] = y1[i] = NAN; /* overwritten, never read */
    for (size_t i = 0; i < N * I; i++) dxw[i] = NAN;        /* beta 0: never read */
    memcpy(dx, dx0, N * I * sizeof(float));
    memcpy(dx1, dx0, N * I * sizeof(float));
    omp_set_num_threads(2);
    tk_bf16dot_forward(y, x, wd, N, I, O);
    tk_bf16dot_backward(dx, dy, wd, N, I, O, 1.0f);
    tk_bf16dot_backward(dxw, dy, wd, N, I, O, 0.0f);
    omp_set_num_threads(1);
    tk_bf16dot_forward(y1, x, wd, N, I, O);
    tk_bf16dot_backward(dx1, dy, wd, N, I, O, 1.0f);
    omp_set_num_threads(2);

    /* beta 1 adds dy w to dx0: compare dx - dx0 (exact in fp32 only up to dx0's rounding, so against
     * the sum of |terms| plus |dx0|) */
    double *dxa = dalloc(N * I), *dxam = dalloc(N * I);
    for (size_t i = 0; i < N * I; i++) dxa[i] = dxr[i] + dx0[i], dxam[i] = dxm[i] + fabs((double)dx0[i]);
    /* adjoint on the rounded values: <bf16(dy), y> against <dx (beta 0), bf16(x)> */
    double lhs = 0.0, rhs = 0.0, scale = 1e-30;
    for (size_t i = 0; i < N * O; i++) lhs += bf(dy[i]) * y[i], scale += fabs(bf(dy[i]) * ym[i]);
    for (size_t i = 0; i < N * I; i++) rhs += (double)dxw[i] * bf(x[i]);

    char name[112];
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu pack layout (fp32 and BF16 sources)", N, I, O);
    report_bool(name, misplaced == 0 && same_src);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu y = bf16(x) w^T", N, I, O);
    report(name, term_err(y, yr, ym, N * O), 1e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu dx = bf16(dy) w (beta 0)", N, I, O);
    report(name, term_err(dxw, dxr, dxm, N * I), 1e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu dx = dx + bf16(dy) w (beta 1)", N, I, O);
    report(name, term_err(dx, dxa, dxam, N * I), 1e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu adjoint <dy, x w^T> = <dy w, x>", N, I, O);
    report(name, fabs(lhs - rhs) / scale, 1e-5);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu 2 threads = 1 thread", N, I, O);
    report_bool(name, memcmp(y, y1, N * O * sizeof(float)) == 0 && memcmp(dx, dx1, N * I * sizeof(float)) == 0);
    tk_free(w), tk_free(x), tk_free(dy), tk_free(dx0), tk_free(y), tk_free(y1), tk_free(dx), tk_free(dx1);
    tk_free(dxw), tk_free(wh), tk_free(wd), tk_free(wd2), tk_free(yr), tk_free(ym), tk_free(dxr), tk_free(dxm);
    tk_free(dxa), tk_free(dxam);
}

int main(void) {
    if (!tk_bf16dot_available()) {
        printf("SKIP: no AVX512-BF16 on this CPU (or TSPEFT_BF16DOT=0): --compute bf16 runs in fp32 there\n");
        return 77;
    }
    const size_t Ns[] = {1, 5, 13};
    const size_t Is[] = {1, 16, 71, 400};
    const size_t Os[] = {3, 64, 101, 450};
    for (size_t a = 0; a < sizeof Ns / sizeof *Ns; a++)
        for (size_t b = 0; b < sizeof Is / sizeof *Is; b++)
            for (size_t c = 0; c < sizeof Os / sizeof *Os; c++) one_case(Ns[a], Is[b], Os[c]);
    one_case(200, 768, 768);  /* several row units each way */
    one_case(7, 2100, 100);   /* a partial second forward k block (1050 pairs) */
    one_case(7, 100, 1601);   /* three backward depth blocks, the last partial, odd O */
    one_case(37, 765, 130);   /* odd I with a partial last panel each way */
    printf("%s: %s\n", TEST_NAME, g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
