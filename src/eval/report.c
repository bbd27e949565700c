/* report.c: see report.h. */
#include "report.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Metric names in order of first appearance over the rows; returns the count. */
static int metric_columns(const tk_eval_result *r, size_t n, const char **cols, int cap) {
    int nc = 0;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < r[i].n_metrics; k++) {
            int seen = 0;
            for (int c = 0; c < nc; c++) seen |= strcmp(cols[c], r[i].names[k]) == 0;
            if (!seen && nc < cap) cols[nc++] = r[i].names[k];
        }
    return nc;
}

int tk_eval_table(tk_strbuf *out, const tk_eval_result *r, size_t n, tk_err *err) {
    const char *cols[32];
    int nc = metric_columns(r, n, cols, 32), has_gen = 0, has_ll = 0, has_glue = 0;
    size_t tw = 4;
    for (size_t i = 0; i < n; i++)
        if (strlen(r[i].task) > tw) tw = strlen(r[i].task);
    if (tk_strbuf_printf(out, err, "%-*s %7s", (int)tw, "task", "n")) return -1;
    for (int c = 0; c < nc; c++) {
        if (tk_strbuf_printf(out, err, "  %*s", (int)(strlen(cols[c]) > 7 ? strlen(cols[c]) : 7), cols[c])) return -1;
        has_gen |= strncmp(cols[c], "csr_gen", 7) == 0;
        has_ll |= strncmp(cols[c], "csr_ll", 6) == 0;
        has_glue |= strncmp(cols[c], "nlu_", 4) == 0;
    }
    if (tk_strbuf_printf(out, err, "\n")) return -1;
    for (size_t i = 0; i < n; i++) {
        if (tk_strbuf_printf(out, err, "%-*s %7zu", (int)tw, r[i].task, r[i].n)) return -1;
        for (int c = 0; c < nc; c++) {
            int w = (int)(strlen(cols[c]) > 7 ? strlen(cols[c]) : 7);
            double v = NAN;
            for (int k = 0; k < r[i].n_metrics; k++)
                if (strcmp(r[i].names[k], cols[c]) == 0) v = r[i].values[k];
            if (isnan(v) ? tk_strbuf_printf(out, err, "  %*s", w, "-") : tk_strbuf_printf(out, err, "  %*.2f", w, 100.0 * v))
                return -1;
        }
        if (tk_strbuf_printf(out, err, "\n")) return -1;
    }
    if (tk_strbuf_printf(out, err, "(values in %%)\n")) return -1;
    if (has_gen && tk_strbuf_printf(out, err, "csr_gen_acc: generation + first match of the answer pattern "
                                              "(LLM-Adapters commonsense_evaluate.py protocol).\n"))
        return -1;
    if (has_ll && tk_strbuf_printf(out, err, "csr_ll_acc / csr_ll_acc_norm: log-likelihood multiple choice over "
                                             "\"the correct answer is <choice>\" (lm-evaluation-harness acc / "
                                             "acc_norm).\n"))
        return -1;
    if (has_gen && has_ll &&
        tk_strbuf_printf(out, err, "csr_gen_* and csr_ll_* are different protocols: their numbers are NOT "
                                   "comparable with each other (only with published numbers of the same protocol).\n"))
        return -1;
    if (has_glue && tk_strbuf_printf(out, err, "nlu_*: GLUE by log-likelihood over the label verbalizers "
                                               "(not fine-tuned classifier heads; see docs/evaluation.md).\n"))
        return -1;
    return 0;
}

static cJSON *num_or_null(double v) { return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull(); }

char *tk_eval_results_json(const tk_eval_run *run, const tk_eval_result *r, size_t n, tk_err *err) {
    cJSON *root = cJSON_CreateObject();
    if (!root) goto oom;
    cJSON_AddNumberToObject(root, "tspeft_eval", 1);
    cJSON_AddStringToObject(root, "model", run->model);
    if (run->adapter) cJSON_AddStringToObject(root, "adapter", run->adapter);
    else cJSON_AddNullToObject(root, "adapter");
    cJSON_AddStringToObject(root, "tokenizer", run->tokenizer);
    cJSON *p = cJSON_AddObjectToObject(root, "protocol");
    if (!p) goto oom;
    cJSON_AddStringToObject(p, "mode", run->mode);
    cJSON_AddStringToObject(p, "prompt", "CSR and GLUE generation: LLM-Adapters commonsense_evaluate.py "
                                         "generate_prompt (template alpaca, EVAL), ids [bos] + encode(prompt)");
    int has_vqa = 0;
    for (size_t i = 0; i < n; i++) has_vqa |= strcmp(r[i].kind, "vqa") == 0;
    if (has_vqa)
        cJSON_AddStringToObject(p, "vqa_prompt", "each shard record's own prompt: its tokens up to the first response "
                                                 "token, as `convert` wrote them with the conversation template, the "
                                                 "image placeholders replaced by the projector's embeddings");
    cJSON_AddStringToObject(p, "decoding", run->beams > 1 ? "beam search (Hugging Face transformers 4.28 semantics)"
                                                          : "greedy");
    cJSON_AddNumberToObject(p, "beams", (double)run->beams);
    cJSON_AddNumberToObject(p, "length_penalty", 1.0);
    cJSON_AddNumberToObject(p, "max_new_tokens", (double)run->max_new);
    cJSON_AddNumberToObject(p, "eos_id", run->eos);
    cJSON_AddStringToObject(p, "extraction", "first match (leftmost, then first alternative) of the task's answer "
                                             "pattern in decode(prompt + generation).split(\"### Response:\")[1].strip()");
    cJSON_AddStringToObject(p, "ll_continuation", "the correct answer is <choice> (CSR); the converter's response "
                                                  "text per label (GLUE)");
    cJSON_AddStringToObject(p, "ll_acc", "argmax of the summed continuation log-probability");
    cJSON_AddStringToObject(p, "ll_acc_norm", "argmax of the summed log-probability / continuation length in "
                                              "characters (lm-evaluation-harness acc_norm)");
    cJSON_AddStringToObject(p, "stsb", "prediction = probability-weighted mean of the candidate scores (softmax "
                                       "over the candidates' summed log-probabilities)");
    cJSON_AddNumberToObject(p, "ll_batch", (double)run->ll_batch);
    if (run->limit) cJSON_AddNumberToObject(p, "limit", (double)run->limit);
    else cJSON_AddNullToObject(p, "limit");
    cJSON_AddBoolToObject(p, "ts_gate_applied", run->gated);
    cJSON_AddStringToObject(p, "weights", run->bf16_weights ? "bf16-resident (exact fp32 compute)" : "fp32");
    cJSON_AddStringToObject(p, "compute", run->compute_bf16 ? "bf16 (fp32 accumulation)" : "fp32");
    cJSON *tasks = cJSON_AddArrayToObject(root, "tasks");
    if (!tasks) goto oom;
    for (size_t i = 0; i < n; i++) {
        cJSON *t = cJSON_CreateObject();
        if (!t) goto oom;
        cJSON_AddItemToArray(tasks, t);
        cJSON_AddStringToObject(t, "task", r[i].task);
        cJSON_AddStringToObject(t, "kind", r[i].kind);
        cJSON_AddStringToObject(t, "data", r[i].data ? r[i].data : "");
        cJSON_AddNumberToObject(t, "n", (double)r[i].n);
        cJSON_AddNumberToObject(t, "seconds", r[i].seconds);
        cJSON *m = cJSON_AddObjectToObject(t, "metrics");
        if (!m) goto oom;
        for (int k = 0; k < r[i].n_metrics; k++) cJSON_AddItemToObject(m, r[i].names[k], num_or_null(r[i].values[k]));
    }
    char *s = cJSON_Print(root);
    cJSON_Delete(root);
    if (!s) tk_fail(err, "out of memory");
    return s;
oom:
    cJSON_Delete(root);
    tk_fail(err, "out of memory");
    return NULL;
}
