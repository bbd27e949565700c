/* test_transpose.c: tk_transpose (src/ops/transpose.c) is an exact copy into the transposed place.
 *
 * Shapes around the 16 x 16 register blocks (1, 15, 16, 17, 33, 64 rows and columns), strides wider
 * than the rows; every out[c][r] must equal in[r][c] bit for bit, and cells of out outside
 * [cols, rows] must keep their sentinel. Exits 1 on any failure.
 */
#define TEST_NAME "test_transpose"
#define TEST_SEED 0x7a2b05e5ull
#include "test_util.h"

#include "ops/ops.h"

#include <string.h>

#define SENTINEL -777.0f

int main(void) {
    const size_t dims[] = {1, 15, 16, 17, 33, 64};
    size_t nd = sizeof dims / sizeof *dims;
    for (size_t a = 0; a < nd; a++)
        for (size_t b = 0; b < nd; b++) {
            size_t rows = dims[a], cols = dims[b], ldi = cols + 3, ldo = rows + 5;
            float *in = falloc(rows * ldi), *out = falloc((cols + 1) * ldo);
            fill(in, rows * ldi, -1.0f, 1.0f);
            for (size_t i = 0; i < (cols + 1) * ldo; i++) out[i] = SENTINEL;
            tk_transpose(out, ldo, in, ldi, rows, cols);
            size_t wrong = 0, touched = 0;
            for (size_t c = 0; c < cols + 1; c++)
                for (size_t r = 0; r < ldo; r++) {
                    float v = out[c * ldo + r];
                    if (c < cols && r < rows) wrong += memcmp(&v, &in[r * ldi + c], sizeof v) != 0;
                    else touched += v != SENTINEL;
                }
            char name[80];
            snprintf(name, sizeof name, "%2zu x %2zu: out = in^T exactly, nothing else written", rows, cols);
            report_bool(name, wrong == 0 && touched == 0);
            tk_free(in), tk_free(out);
        }
    printf("%s: %s\n", TEST_NAME, g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
