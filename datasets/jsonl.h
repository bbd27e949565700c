/* jsonl.h: pre-tokenized JSONL training data and right-padded batches.
 *
 * One JSON object per line: {"input_ids": [...], "labels": [...], "attention_mask": [...]}.
 * labels is optional (defaults to input_ids), attention_mask optional (defaults to all 1); when
 * present they must have the same length as input_ids. -100 in labels is ignored by the loss.
 * Blank lines are skipped. Ids are validated against the vocabulary at load.
 *
 *   tk_err err = {0};
 *   tk_jsonl_data *d = tk_jsonl_load("train.jsonl", 32000, 2048, &err);
 *   tk_batch b = {0};
 *   tk_batch_make(&b, d, rows, nrows, &err);        // rows: indices into d
 *   ...
 *   tk_batch_free(&b); tk_jsonl_free(d);
 *
 * Ownership: the dataset owns its rows; a batch owns its arrays and can be refilled.
 * Failure: NULL / -1 with err "FILE:LINE: what was wrong".
 */
#ifndef TK_DATASETS_JSONL_H
#define TK_DATASETS_JSONL_H

#include "../src/common.h"

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t len;
    int32_t *input_ids;      /* [len] */
    int32_t *labels;         /* [len], -100 = ignored */
    uint8_t *attention_mask; /* [len], 1 = real token */
} tk_row;

typedef struct {
    size_t n_rows;
    tk_row *rows;
    size_t max_len; /* longest row after truncation */
} tk_jsonl_data;

/* Loads path; every id must lie in [0, vocab_size); labels in [0, vocab_size) or -100. Rows longer
 * than max_len (> 0) are truncated from the right; max_len 0 means no limit. An empty file is an
 * error. */
tk_jsonl_data *tk_jsonl_load(const char *path, int vocab_size, size_t max_len, tk_err *err);
void tk_jsonl_free(tk_jsonl_data *d);

typedef struct {
    size_t B, T;             /* T = longest selected row */
    int32_t *input_ids;      /* [B,T], padding 0 */
    int32_t *labels;         /* [B,T], padding -100 */
    uint8_t *attention_mask; /* [B,T], padding 0 */
    size_t cap;              /* allocated B*T */
} tk_batch;

/* Fills b with rows[0..n) of d, right-padded to the longest. Reuses b's buffers when large enough. */
int tk_batch_make(tk_batch *b, const tk_jsonl_data *d, const size_t *rows, size_t n, tk_err *err);
void tk_batch_free(tk_batch *b);

/* Number of positions whose shifted label counts in the loss: t < T-1 with labels[b][t+1] != -100
 * Only -100 is ignored, as in Hugging Face (padding gets -100 from tk_batch_make). */
size_t tk_batch_count_targets(const tk_batch *b);

#endif
