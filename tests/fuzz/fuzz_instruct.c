/* fuzz_instruct.c: tk_instruct_load (datasets/instruct.h) on an arbitrary LLM-Adapters / Alpaca file: a
 * JSON array or JSON lines, told apart by the first non-space byte. Accepted records have their four
 * strings (instruction, input, output, answer) non-NULL and NUL-terminated, and at least one record.
 */
#include "datasets/instruct.h"
#include "fuzz_common.h"

#include <string.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("train.json");
    tkf_write(path, data, size);
    tk_instruct *r = NULL;
    size_t n = 0;
    if (tk_instruct_load(path, &r, &n, err) != 0) {
        TKF_REQUIRE(r == NULL || n == 0);
        return -1;
    }
    TKF_REQUIRE(r != NULL && n >= 1);
    volatile size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        TKF_REQUIRE(r[i].instruction && r[i].input && r[i].output && r[i].answer);
        total += strlen(r[i].instruction) + strlen(r[i].input) + strlen(r[i].output) + strlen(r[i].answer);
    }
    (void)total;
    tk_instruct_free(r, n);
    return 0;
}
