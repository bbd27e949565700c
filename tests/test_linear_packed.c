/* test_linear_packed.c: frozen weights in panels (src/ops/linear_packed.c) against double references.
 *
 * tk_linear_pack must place w[64p + j][k] at w[64p I + k w_p + j]; tk_linear_packed_forward must give
 * y = x w^T and tk_linear_packed_backward dx += dy w, for shapes that cover every row tail (N % 6),
 * partial panels on both sides (O % 64, I % 64, widths under 16), several forward k blocks (I > 1024)
 * and backward depth blocks (O > 768), each also with a partial last block and panel, single-threaded
 * sizes and the reference bench model's shapes at N = 512. The backward must be
 * the forward's adjoint: <dy, x w^T> = <dy w, x>. Both must match for 1 and 2 threads bit for bit, and
 * BF16 panels (tk_linear_pack_bf16) must give exactly the fp32 kernel's results on the same values.
 * Threads share a product by units and row blocks, idle threads taking row blocks from the others'
 * units (sharing_case): with 2, 3 and 5 threads, more threads than units included, repeated so that the
 * splits differ from run to run, every result must equal the one-thread result bit for bit.
 * Skipped (77) where the CPU has no AVX-512F or TSPEFT_PACKED=0, since then nothing is packed.
 */
#define TEST_NAME "test_linear_packed"
#define TEST_SEED 0x9ac4edull
#include "test_util.h"

#include "common.h"
#include "ops/ops.h"

#include <omp.h>
#include <string.h>

static void one_case(size_t N, size_t I, size_t O) {
    float *w = falloc(O * I), *wp = falloc(O * I), *x = falloc(N * I), *dy = falloc(N * O);
    float *y = falloc(N * O), *y1 = falloc(N * O), *dx = falloc(N * I), *dx1 = falloc(N * I), *dx0 = falloc(N * I);
    float *dxw = falloc(N * I);
    double *yr = dalloc(N * O), *dxr = dalloc(N * I);
    fill(w, O * I, -1.0f, 1.0f);
    fill(x, N * I, -1.0f, 1.0f);
    fill(dy, N * O, -1.0f, 1.0f);
    fill(dx0, N * I, -1.0f, 1.0f);
    memcpy(wp, w, O * I * sizeof(float));
    if (tk_linear_pack(wp, O, I)) {
        report_bool("tk_linear_pack allocates its panel buffer", 0);
        return;
    }
    size_t misplaced = 0;
    for (size_t o = 0; o < O; o++) {
        size_t p = o / 64, wdt = O - 64 * p < 64 ? O - 64 * p : 64;
        for (size_t k = 0; k < I; k++) misplaced += wp[64 * p * I + k * wdt + o % 64] != w[o * I + k];
    }
    for (size_t n = 0; n < N; n++) {
        for (size_t o = 0; o < O; o++) {
            double s = 0.0;
            for (size_t k = 0; k < I; k++) s += (double)x[n * I + k] * w[o * I + k];
            yr[n * O + o] = s;
        }
        for (size_t k = 0; k < I; k++) {
            double s = dx0[n * I + k];
            for (size_t o = 0; o < O; o++) s += (double)dy[n * O + o] * w[o * I + k];
            dxr[n * I + k] = s;
        }
    }
    for (size_t i = 0; i < N * O; i++) y[i] = y1[i] = NAN; /* beta 0: the old contents are never read */
    memcpy(dx, dx0, N * I * sizeof(float));
    memcpy(dx1, dx0, N * I * sizeof(float));
    omp_set_num_threads(2);
    tk_linear_packed_forward(y, x, wp, N, I, O);
    tk_linear_packed_backward(dx, dy, wp, N, I, O, 1.0f);
    for (size_t i = 0; i < N * I; i++) dxw[i] = NAN; /* beta 0: the old contents are never read */
    tk_linear_packed_backward(dxw, dy, wp, N, I, O, 0.0f);
    omp_set_num_threads(1);
    tk_linear_packed_forward(y1, x, wp, N, I, O);
    tk_linear_packed_backward(dx1, dy, wp, N, I, O, 1.0f);
    /* beta 0 gives dy w alone: dx - dx0 from the accumulating call, to the same reference */
    double *dwr = dalloc(N * I);
    for (size_t i = 0; i < N * I; i++) dwr[i] = dxr[i] - dx0[i];

    /* adjoint: <dy, y> against <dx - dx0, x>, both in double from the kernels' float outputs */
    double lhs = 0.0, rhs = 0.0, scale = 1e-3;
    for (size_t i = 0; i < N * O; i++) lhs += (double)dy[i] * y[i], scale += fabs((double)dy[i] * y[i]);
    for (size_t i = 0; i < N * I; i++) rhs += ((double)dx[i] - dx0[i]) * x[i];

    char name[96];
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu pack layout", N, I, O);
    report_bool(name, misplaced == 0);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu y = x w^T", N, I, O);
    report(name, rel_err_d(y, yr, N * O), 2e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu dx += dy w", N, I, O);
    report(name, rel_err_d(dx, dxr, N * I), 2e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu dx = dy w (beta 0, dx NaN before)", N, I, O);
    report(name, rel_err_d(dxw, dwr, N * I), 2e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu <dy, x w^T> = <dy w, x>", N, I, O);
    report(name, fabs(lhs - rhs) / scale, 1e-6);
    snprintf(name, sizeof name, "N %3zu I %4zu O %5zu 1 thread = 2 threads", N, I, O);
    report_bool(name, memcmp(y, y1, N * O * sizeof(float)) == 0 && memcmp(dx, dx1, N * I * sizeof(float)) == 0);
    /* BF16-resident: the weight rounded to BF16 and packed as BF16 must give exactly what the fp32
     * kernel gives on the same values (blocks are converted exactly before the same kernel) */
    uint16_t *wh = xalloc(O * I, sizeof(uint16_t));
    float *whf = falloc(O * I), *yh = falloc(N * O), *yf = falloc(N * O), *dxh = falloc(N * I), *dxf = falloc(N * I);
    for (size_t i = 0; i < O * I; i++) wh[i] = tk_f32_to_bf16(w[i]), whf[i] = tk_bf16_to_f32(wh[i]);
    if (tk_linear_pack_bf16(wh, O, I) || tk_linear_pack(whf, O, I)) {
        report_bool("tk_linear_pack_bf16 allocates its panel buffer", 0);
    } else {
        omp_set_num_threads(2);
        tk_linear_packed_forward_bf16(yh, x, wh, N, I, O);
        tk_linear_packed_forward(yf, x, whf, N, I, O);
        memcpy(dxh, dx0, N * I * sizeof(float));
        memcpy(dxf, dx0, N * I * sizeof(float));
        tk_linear_packed_backward_bf16(dxh, dy, wh, N, I, O, 1.0f);
        tk_linear_packed_backward(dxf, dy, whf, N, I, O, 1.0f);
        int same = memcmp(yh, yf, N * O * sizeof(float)) == 0 && memcmp(dxh, dxf, N * I * sizeof(float)) == 0;
        for (size_t i = 0; i < N * I; i++) dxh[i] = NAN;
        tk_linear_packed_backward_bf16(dxh, dy, wh, N, I, O, 0.0f);
        tk_linear_packed_backward(dxf, dy, whf, N, I, O, 0.0f);
        same = same && memcmp(dxh, dxf, N * I * sizeof(float)) == 0;
        snprintf(name, sizeof name, "N %3zu I %4zu O %5zu BF16 panels = fp32 kernel, bitwise", N, I, O);
        report_bool(name, same);
    }
    tk_free(wh), tk_free(whf), tk_free(yh), tk_free(yf), tk_free(dxh), tk_free(dxf);
    tk_free(w), tk_free(wp), tk_free(x), tk_free(dy), tk_free(y), tk_free(y1);
    tk_free(dx), tk_free(dx1), tk_free(dx0), tk_free(yr), tk_free(dxr), tk_free(dxw), tk_free(dwr);
}

/* The work sharing of linear_packed.c: units (64-wide panels) taken in turn, row blocks of 48 rows
 * taken from the ends of other threads' units, depth blocks separated by a barrier. With few units
 * and more threads than units, threads without a unit of their own start by taking row blocks of the
 * others'. The split changes from run to run; the results must not. */
static void sharing_case(size_t N, size_t I, size_t O) {
    float *w = falloc(O * I), *x = falloc(N * I), *dy = falloc(N * O), *dx0 = falloc(N * I);
    float *y1 = falloc(N * O), *dx1 = falloc(N * I), *y = falloc(N * O), *dx = falloc(N * I);
    uint16_t *wh = xalloc(O * I, sizeof(uint16_t));
    float *yh1 = falloc(N * O), *dxh1 = falloc(N * I);
    fill(w, O * I, -1.0f, 1.0f);
    fill(x, N * I, -1.0f, 1.0f);
    fill(dy, N * O, -1.0f, 1.0f);
    fill(dx0, N * I, -1.0f, 1.0f);
    for (size_t i = 0; i < O * I; i++) wh[i] = tk_f32_to_bf16(w[i]);
    if (tk_linear_pack(w, O, I) || tk_linear_pack_bf16(wh, O, I)) {
        report_bool("tk_linear_pack allocates its panel buffer", 0);
        return;
    }
    omp_set_num_threads(1);
    tk_linear_packed_forward(y1, x, w, N, I, O);
    memcpy(dx1, dx0, N * I * sizeof(float));
    tk_linear_packed_backward(dx1, dy, w, N, I, O, 1.0f);
    tk_linear_packed_forward_bf16(yh1, x, wh, N, I, O);
    memcpy(dxh1, dx0, N * I * sizeof(float));
    tk_linear_packed_backward_bf16(dxh1, dy, wh, N, I, O, 1.0f);
    const int threads[] = {2, 3, 5};
    for (size_t t = 0; t < sizeof threads / sizeof *threads; t++) {
        omp_set_num_threads(threads[t]);
        int same = 1, same_h = 1;
        for (int rep = 0; rep < 8; rep++) {
            for (size_t i = 0; i < N * O; i++) y[i] = NAN;
            tk_linear_packed_forward(y, x, w, N, I, O);
            memcpy(dx, dx0, N * I * sizeof(float));
            tk_linear_packed_backward(dx, dy, w, N, I, O, 1.0f);
            same = same && memcmp(y, y1, N * O * sizeof(float)) == 0 && memcmp(dx, dx1, N * I * sizeof(float)) == 0;
            tk_linear_packed_forward_bf16(y, x, wh, N, I, O);
            memcpy(dx, dx0, N * I * sizeof(float));
            tk_linear_packed_backward_bf16(dx, dy, wh, N, I, O, 1.0f);
            same_h = same_h && memcmp(y, yh1, N * O * sizeof(float)) == 0 &&
                     memcmp(dx, dxh1, N * I * sizeof(float)) == 0;
        }
        char name[112];
        snprintf(name, sizeof name, "N %3zu I %4zu O %5zu shared by %d threads = 1 thread (fp32, 8 runs)", N, I, O,
                 threads[t]);
        report_bool(name, same);
        snprintf(name, sizeof name, "N %3zu I %4zu O %5zu shared by %d threads = 1 thread (BF16, 8 runs)", N, I, O,
                 threads[t]);
        report_bool(name, same_h);
    }
    omp_set_num_threads(2);
    tk_free(w), tk_free(x), tk_free(dy), tk_free(dx0), tk_free(y1), tk_free(dx1), tk_free(y), tk_free(dx);
    tk_free(wh), tk_free(yh1), tk_free(dxh1);
}

int main(void) {
    if (!tk_linear_packed_available()) {
        printf("SKIP: no AVX-512F on this CPU, or TSPEFT_PACKED=0: weights are never packed\n");
        return 77;
    }
    const size_t Ns[] = {1, 5, 6, 13};
    const size_t Is[] = {1, 16, 70, 400};
    const size_t Os[] = {3, 64, 100, 450};
    for (size_t a = 0; a < sizeof Ns / sizeof *Ns; a++)
        for (size_t b = 0; b < sizeof Is / sizeof *Is; b++)
            for (size_t c = 0; c < sizeof Os / sizeof *Os; c++) one_case(Ns[a], Is[b], Os[c]);
    /* the benchmark's shapes (dim 768, ffn 2048) at 512 tokens, and a short lm_head */
    one_case(512, 768, 768);
    one_case(512, 768, 2048);
    one_case(512, 2048, 768);
    one_case(37, 768, 5000);
    one_case(13, 1100, 100); /* a partial second k block, a partial panel */
    one_case(7, 100, 900);   /* a partial second depth block ending in a 4-row panel */
    sharing_case(500, 1100, 70); /* forward: 2 units, 2 k blocks; backward: 18 units */
    sharing_case(500, 70, 1600); /* forward: 25 units; backward: 2 units, 3 depth blocks */
    sharing_case(301, 64, 64);   /* one unit each way, 7 row blocks */
    printf("%s: %s\n", TEST_NAME, g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
