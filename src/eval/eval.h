/* eval.h: what the benchmark evaluations of `tspeft eval` share (src/eval/csr.c, src/eval/nlu.c):
 * the run context, one task's result, progress reporting and the per-sample output buffer.
 *
 *   tk_eval_ctx ctx = {.m = m, .tok = tok, .gen = 1, .ll = 1, .beams = 1, .max_new = 32,
 *                      .ll_batch = 8, .scorer = tk_loglik_new(m, &err)};
 *   tk_eval_result res = {0};
 *   tk_strbuf samples = {0};                  // per-sample JSONL lines are appended here
 *   if (tk_eval_csr(&ctx, task, "boolq/test.json", &res, &samples, &err) != 0) ...
 *   tk_strbuf_free(&samples);
 *
 * Metric values are fractions (accuracy in [0, 1], correlations in [-1, 1]); NaN where undefined
 * (an empty set, a constant side of a correlation). Ownership: the context borrows the model,
 * tokenizer and scorer; strbufs own their bytes (tk_strbuf_free). Failure: -1 with err set.
 */
#ifndef TK_EVAL_EVAL_H
#define TK_EVAL_EVAL_H

#include "../../text/tokenizer.h"
#include "../common.h"
#include "../model/llama.h"
#include "loglik.h"

#include <stddef.h>

/* A growable byte buffer (always NUL-terminated after the first append). */
typedef struct {
    char *buf;
    size_t len, cap;
} tk_strbuf;

int tk_strbuf_append(tk_strbuf *s, const char *p, size_t n, tk_err *err);
int tk_strbuf_printf(tk_strbuf *s, tk_err *err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void tk_strbuf_free(tk_strbuf *s);

typedef struct {
    const char *task;    /* task name */
    size_t done, total;  /* examples */
    const char *running; /* running metrics, e.g. "gen 62.50  ll 50.00  ll_norm 50.00" (percent) */
    double seconds;      /* since the task started */
} tk_eval_progress;
typedef void (*tk_eval_progress_fn)(void *user, const tk_eval_progress *p);

typedef struct {
    tk_llama *m;
    const tk_tokenizer *tok;
    int gen, ll;            /* commonsense protocols to run (GLUE always runs log-likelihood) */
    size_t beams;           /* 1: greedy decoding; > 1: beam search (src/eval/beam.h) */
    size_t max_new;         /* new tokens per generation */
    size_t limit;           /* > 0: only the first `limit` examples of each dataset */
    size_t ll_batch;        /* candidate sequences per forward (memory bound), >= 1 */
    size_t eval_batch;      /* > 1: greedy generation decodes up to this many records together
                               (tk_greedy_batch; at most TK_EVAL_BATCH_MAX, and TK_EVAL_KV_BYTES of caches) and beam search runs a record's beams as one
                               batch; 0 or 1: one record, one beam at a time. Identical results. */
    int32_t eos;            /* generation stops after it; < 0: none */
    tk_eval_progress_fn progress; /* optional, called after every example */
    void *user;
    tk_loglik *scorer;      /* required when log-likelihoods are computed */
} tk_eval_ctx;

/* Records per batch at most (--eval-batch). */
#define TK_EVAL_BATCH_MAX 64
/* A batch holds at most about this many bytes of KV caches (fewer rows for larger models and longer
 * prompts; the last row may pass it). */
#define TK_EVAL_KV_BYTES ((size_t)1 << 30)

#define TK_EVAL_MAX_METRICS 6
typedef struct {
    char task[32];
    const char *kind;       /* "csr" or "glue" (static) */
    const char *data;       /* the dataset path (borrowed) */
    size_t n;               /* examples evaluated */
    int n_metrics;
    char names[TK_EVAL_MAX_METRICS][24];
    double values[TK_EVAL_MAX_METRICS];
    double seconds;
} tk_eval_result;

/* Appends (name, value) to r's metrics (at most TK_EVAL_MAX_METRICS, asserted). */
void tk_eval_result_add(tk_eval_result *r, const char *name, double value);

#endif
