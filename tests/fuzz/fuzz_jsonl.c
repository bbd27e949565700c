/* fuzz_jsonl.c: tk_jsonl_load on an arbitrary pre-tokenized JSONL file (vocabulary 32, rows
 * truncated to 8 tokens); when it loads, every row goes through tk_batch_make and the target count.
 */
#include "datasets/jsonl.h"
#include "fuzz_common.h"

#include <stdlib.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("data.jsonl");
    tkf_write(path, data, size);
    tk_jsonl_data *d = tk_jsonl_load(path, 32, 8, err);
    if (!d) return -1;
    TKF_REQUIRE(d->n_rows >= 1 && d->max_len >= 1 && d->max_len <= 8);
    size_t *rows = malloc(d->n_rows * sizeof *rows);
    TKF_REQUIRE(rows != NULL);
    for (size_t i = 0; i < d->n_rows; i++) {
        const tk_row *r = &d->rows[i];
        TKF_REQUIRE(r->len >= 1 && r->len <= 8);
        for (size_t t = 0; t < r->len; t++) {
            TKF_REQUIRE(r->input_ids[t] >= 0 && r->input_ids[t] < 32);
            TKF_REQUIRE(r->labels[t] == -100 || (r->labels[t] >= 0 && r->labels[t] < 32));
            TKF_REQUIRE(r->attention_mask[t] <= 1);
        }
        rows[i] = i;
    }
    tk_batch b = {0};
    int rc = tk_batch_make(&b, d, rows, d->n_rows, err);
    if (rc == 0) TKF_REQUIRE(tk_batch_count_targets(&b) <= b.B * b.T);
    tk_batch_free(&b);
    free(rows);
    tk_jsonl_free(d);
    return rc;
}
