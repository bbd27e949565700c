/* test_fastmath.c: tk_expf against libm's expf over its whole range, special values included. */
#include "ops/fastmath.h"

#include <math.h>
#include <stdio.h>

int main(void) {
    double worst = 0.0;
    float worst_x = 0.0f;
    int fails = 0;
    /* every 97th float between -87 and 88 (about 22 million values) */
    for (float x = -87.0f; x <= 88.0f;) {
        double want = exp((double)x), got = tk_expf(x);
        double rel = fabs(got - want) / want;
        if (rel > worst) {
            worst = rel;
            worst_x = x;
        }
        float nx = x;
        for (int k = 0; k < 97; k++) nx = nextafterf(nx, INFINITY);
        x = nx;
    }
    printf("tk_expf max relative error %.3g at x = %.9g (%.2f ulp of 2^-24)\n", worst, worst_x, worst / 5.96e-8);
    if (!(worst < 3.0e-7)) fails++;
    if (tk_expf(0.0f) != 1.0f) fails++, printf("FAIL: exp(0) = %.9g\n", tk_expf(0.0f));
    if (!isnan(tk_expf(NAN))) fails++, printf("FAIL: exp(NaN) is not NaN\n");
    if (!(tk_expf(-1000.0f) >= 0.0f && tk_expf(-1000.0f) < 2e-38f)) fails++, printf("FAIL: exp(-1000)\n");
    if (!(tk_expf(-INFINITY) < 2e-38f)) fails++, printf("FAIL: exp(-inf)\n");
    if (!(tk_expf(1000.0f) > 1e38f)) fails++, printf("FAIL: exp(1000)\n");
    printf("%s\n", fails ? "FAILED" : "ok");
    return fails != 0;
}
