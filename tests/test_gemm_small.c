/* test_gemm_small.c: tk_gemm_small (src/ops/gemm_small.c) against a double reference.
 *
 * Shapes cover every row tail (M % 4) and column tail (N % 16, N % 64), K across several k blocks,
 * strides wider than the rows, overwrite and accumulate, alpha != 1.
 * C sits inside a larger buffer whose other cells hold a sentinel that must survive. Also
 * tk_gemm_small_rows (rows of B and C by pointer) where the AVX-512 kernel runs. ctest runs this
 * twice: as is (the AVX-512 kernel where the CPU has it, which is then required) and with
 * TSPEFT_GEMM_SMALL=blas (the cblas_sgemm path). Exits 1 on any failure.
 */
#define TEST_NAME "test_gemm_small"
#define TEST_SEED 0x5eed5a11ull
#include "test_util.h"

#include "ops/ops.h"

#include <string.h>

#define SENTINEL 12345.0f

static void one_case(size_t M, size_t N, size_t K, int acc, float alpha) {
    size_t lda = K + 3, ldb = N + 5, ldc = N + 7;
    float *A = falloc(M * lda + 1), *B = falloc(K * ldb + 1);
    float *C = falloc((M + 1) * ldc), *C0 = falloc((M + 1) * ldc);
    double *ref = dalloc(M * N);
    fill(A, M * lda, -1.0f, 1.0f);
    fill(B, K * ldb, -1.0f, 1.0f);
    for (size_t i = 0; i < (M + 1) * ldc; i++) C0[i] = SENTINEL;
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) C0[m * ldc + n] = rnd(-1.0f, 1.0f);
    memcpy(C, C0, (M + 1) * ldc * sizeof(float));
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double s = 0.0;
            for (size_t k = 0; k < K; k++) s += (double)A[m * lda + k] * (double)B[k * ldb + n];
            ref[m * N + n] = (double)alpha * s + (acc ? (double)C0[m * ldc + n] : 0.0);
        }
    tk_gemm_small(M, N, K, alpha, A, lda, B, ldb, acc, C, ldc);

    double maxd = 0.0, maxr = 1e-3;
    size_t touched = 0;
    for (size_t m = 0; m < M + 1; m++)
        for (size_t n = 0; n < ldc; n++) {
            float c = C[m * ldc + n];
            if (m < M && n < N) {
                double d = fabs((double)c - ref[m * N + n]);
                if (!isfinite(c)) d = INFINITY;
                maxd = d > maxd ? d : maxd;
                maxr = fabs(ref[m * N + n]) > maxr ? fabs(ref[m * N + n]) : maxr;
            } else {
                touched += c != SENTINEL;
            }
        }
    char name[96];
    snprintf(name, sizeof name, "M %3zu N %3zu K %3zu %s alpha %.3g", M, N, K, acc ? "+=" : "= ",
             (double)alpha);
    /* fp32 sums of K products of values in [-1, 1]: a few ulps of sqrt(K)-sized partial sums */
    report(name, maxd / maxr, 2e-6);
    if (touched) {
        printf("  %zu cells outside C [M,N] changed\n", touched);
        g_failures++;
    }
    tk_free(A), tk_free(B), tk_free(C), tk_free(C0), tk_free(ref);
}

int main(void) {
    const char *kernel = tk_gemm_small_avx512() ? "avx512" : "blas";
    const char *force = getenv("TSPEFT_GEMM_SMALL");
    int forced_blas = force && strcmp(force, "blas") == 0;
    printf("kernel: %s%s\n", kernel, forced_blas ? " (forced by TSPEFT_GEMM_SMALL=blas)" : "");
#if defined(__x86_64__) && defined(__GNUC__)
    const char *want = forced_blas || !__builtin_cpu_supports("avx512f") ? "blas" : "avx512";
    report_bool("the path taken is the one this CPU and environment call for", strcmp(kernel, want) == 0);
#endif

    const size_t Ms[] = {1, 3, 4, 7, 13, 64};
    const size_t Ns[] = {1, 15, 16, 17, 64, 70, 130};
    const size_t Ks[] = {1, 5, 64, 129, 300};
    for (size_t i = 0; i < sizeof Ms / sizeof *Ms; i++)
        for (size_t j = 0; j < sizeof Ns / sizeof *Ns; j++)
            for (size_t k = 0; k < sizeof Ks / sizeof *Ks; k++) {
                one_case(Ms[i], Ns[j], Ks[k], (int)((i + j + k) % 2), k % 2 ? 0.125f : 1.0f);
            }
    /* attention's own shapes at T = S = 512, D = 64 (block of 64 query rows, E = 512 keys) */
    one_case(64, 512, 64, 0, 0.125f); /* scores = scale Q K^T (K^T stored) */
    one_case(64, 64, 512, 0, 1.0f);   /* O = P V */
    one_case(64, 64, 512, 1, 1.0f);   /* dQ += dS K */
    /* LoRA's rank-16 pieces on a 64-row chunk (r = 16, width 768 or 2048) */
    one_case(64, 16, 768, 0, 1.0f);    /* u = x A^T (A^T stored) */
    one_case(64, 768, 16, 0, 2.0f);    /* m = s u B^T (B^T stored) */
    one_case(64, 16, 2048, 0, 1.0f);   /* gr = dy B */
    one_case(16, 2048, 64, 1, 2.0f);   /* dA += s gr^T x (gr^T stored) */
    one_case(64, 2048, 16, 1, 2.0f);   /* dx += s gr A */

    /* tk_gemm_small_rows: B's and C's rows by pointer (gathered, out of order), AVX-512 only */
    if (tk_gemm_small_avx512()) {
        const size_t M = 13, N = 70, K = 37, ldb = 80, ldc = 75;
        float *A = falloc(M * K), *B = falloc(2 * K * ldb), *C = falloc(2 * M * ldc), *C0 = falloc(2 * M * ldc);
        fill(A, M * K, -1.0f, 1.0f);
        fill(B, 2 * K * ldb, -1.0f, 1.0f);
        fill(C0, 2 * M * ldc, -1.0f, 1.0f);
        memcpy(C, C0, 2 * M * ldc * sizeof(float));
        const float *brows[37];
        float *crows[13];
        for (size_t k = 0; k < K; k++) brows[k] = B + ((k * 7) % (2 * K)) * ldb; /* every 7th row, wrapped */
        for (size_t m = 0; m < M; m++) crows[m] = C + ((m * 5 + 3) % (2 * M)) * ldc;
        tk_gemm_small_rows(M, N, K, 0.5f, A, K, brows, 1, crows);
        double maxd = 0.0, maxr = 1e-3;
        size_t touched = 0;
        for (size_t m = 0; m < M; m++)
            for (size_t n = 0; n < N; n++) {
                double ref = C0[crows[m] - C + n];
                for (size_t k = 0; k < K; k++) ref += 0.5 * (double)A[m * K + k] * (double)brows[k][n];
                double d = fabs((double)crows[m][n] - ref);
                maxd = d > maxd ? d : maxd;
                maxr = fabs(ref) > maxr ? fabs(ref) : maxr;
            }
        for (size_t i = 0; i < 2 * M * ldc; i++) {
            size_t row = i / ldc, col = i % ldc;
            int target = 0;
            for (size_t m = 0; m < M; m++) target |= (size_t)(crows[m] - C) == row * ldc && col < N;
            touched += !target && C[i] != C0[i];
        }
        report("rows by pointer: M 13 N 70 K 37, += , alpha 0.5", maxd / maxr, 2e-6);
        report_bool("rows by pointer: nothing else in C changed", touched == 0);
        tk_free(A), tk_free(B), tk_free(C), tk_free(C0);
    } else {
        printf("tk_gemm_small_rows: not run (no AVX-512 kernel on this path)\n");
    }

    /* K = 0: an empty sum */
    float c[4] = {1, 2, 3, 4};
    tk_gemm_small(2, 2, 0, 1.0f, c, 2, c, 2, 1, c, 2);
    report_bool("K = 0, accumulate: C unchanged", c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4);
    tk_gemm_small(2, 2, 0, 1.0f, c, 2, c, 2, 0, c, 2);
    report_bool("K = 0, overwrite: C = 0", c[0] == 0 && c[1] == 0 && c[2] == 0 && c[3] == 0);

    printf("%s: %s\n", TEST_NAME, g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
