/* report.h: the outputs of `tspeft eval`: a terminal table and the results JSON.
 *
 *   tk_strbuf table = {0};
 *   tk_eval_table(&table, results, n, &err);            // fixed-width text, footer included
 *   char *json = tk_eval_results_json(&run, results, n, &err);   // caller free()s
 *
 * Table: one row per evaluated dataset (task, n, then every metric that any row has, as percentages
 * with two decimals, "-" where a row lacks it or it is undefined), and a footer explaining the
 * metric families: csr_gen_acc (generation + answer extraction, LLM-Adapters) and csr_ll_acc /
 * csr_ll_acc_norm (log-likelihood multiple choice, lm-evaluation-harness) are different protocols and
 * are NOT comparable with each other.
 * Results JSON: {"tspeft_eval": 1, "model", "adapter", "tokenizer", "protocol": {every setting that
 * changes a number}, "tasks": [{"task", "kind", "data", "n", "seconds", "metrics": {name: value}}]}
 * (values as fractions, null where undefined).
 *
 * Ownership: results and run are borrowed. Failure: -1 / NULL with err (out of memory).
 */
#ifndef TK_EVAL_REPORT_H
#define TK_EVAL_REPORT_H

#include "eval.h"

/* The run settings that go into the results JSON. */
typedef struct {
    const char *model, *adapter, *tokenizer; /* adapter NULL: none */
    const char *mode;                        /* "gen", "ll" or "both" */
    size_t beams, max_new, limit, ll_batch;
    int32_t eos;
    int bf16_weights;
    int compute_bf16; /* frozen products in BF16 (--compute bf16 on a CPU that has AVX512-BF16) */
    int gated;                               /* the adapter has TS gates */
} tk_eval_run;

int tk_eval_table(tk_strbuf *out, const tk_eval_result *r, size_t n, tk_err *err);
char *tk_eval_results_json(const tk_eval_run *run, const tk_eval_result *r, size_t n, tk_err *err);

#endif
