/* csr.c: see csr.h. */
#include "csr.h"


#include "../../datasets/instruct.h"
#include "answer.h"
#include "beam.h"
#include "greedy.h"
#include "prompt.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char CONT_PREFIX[] = "the correct answer is ";

/* Unicode code points of a UTF-8 string (Python's len of the decoded text). */
static size_t utf8_chars(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* Appends one JSON object as a line; takes ownership of o. */
static int emit(tk_strbuf *out, cJSON *o, tk_err *err) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!s) return tk_fail(err, "out of memory");
    int rc = tk_strbuf_append(out, s, strlen(s), err) || tk_strbuf_append(out, "\n", 1, err);
    free(s);
    return rc ? -1 : 0;
}

static cJSON *sample_base(const char *task, size_t i, const char *protocol, const char *prompt, const char *gold) {
    cJSON *o = cJSON_CreateObject();
    char id[64];
    snprintf(id, sizeof id, "%s-%zu", task, i);
    cJSON_AddStringToObject(o, "task", task);
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "protocol", protocol);
    cJSON_AddStringToObject(o, "prompt", prompt);
    cJSON_AddStringToObject(o, "gold", gold);
    return o;
}

/* text[0..n) for a JSON string: NUL bytes (a generated <0x00> byte piece) become U+2400 "␀", since
 * JSON strings here are NUL-terminated. malloc'd. */
static char *json_text(const char *text, size_t n) {
    size_t nul = 0;
    for (size_t i = 0; i < n; i++) nul += text[i] == '\0';
    char *out = malloc(n + 2 * nul + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (text[i]) *o++ = text[i];
        else {
            memcpy(o, "\xe2\x90\x80", 3);
            o += 3;
        }
    }
    *o = '\0';
    return out;
}

/* Decoded prompt + generation: ids the tokenizer does not know (a model vocabulary padded beyond the
 * tokenizer's, e.g. an added pad token) decode to nothing, like skip_special_tokens. */
static char *decode_all(const tk_tokenizer *tok, const int32_t *ids, size_t n, size_t *len, tk_err *err) {
    int32_t *keep = malloc((n ? n : 1) * sizeof *keep);
    if (!keep) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    size_t k = 0, V = (size_t)tk_tok_vocab_size(tok);
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && (size_t)ids[i] < V) keep[k++] = ids[i];
    char *s = tk_tok_decode(tok, keep, k, len, err);
    free(keep);
    return s;
}

/* Generation protocol for one example: *correct, and the JSONL line. gen: the new tokens when they
 * were decoded already (a batch of records, tk_greedy_batch), else NULL: decoded here. */
static int run_gen(const tk_eval_ctx *ctx, const tk_csr_task *task, size_t i, const tk_example *ex,
                   const char *prompt, const char *gold, const int32_t *gen, long n_gen, int *correct,
                   tk_strbuf *samples, tk_err *err) {
    size_t P = ex->n, M = ctx->max_new;
    int32_t *all = malloc((P + M) * sizeof *all);
    char *text = NULL, *resp = NULL, *shown = NULL;
    int rc = -1;
    if (!all) return tk_fail(err, "out of memory");
    memcpy(all, ex->input_ids, P * sizeof *all);
    long got;
    if (gen) {
        got = n_gen;
        memcpy(all + P, gen, (size_t)n_gen * sizeof *all);
    } else if (ctx->beams > 1) {
        tk_beam_opts o = {.beams = ctx->beams, .max_new = M, .eos = ctx->eos, .length_penalty = 1.0,
                         .batch = ctx->eval_batch > 1};
        got = tk_beam_search(ctx->m, ex->input_ids, P, &o, all + P, NULL, err);
    } else {
        got = tk_llama_generate(ctx->m, ex->input_ids, P, M, ctx->eos, all + P, err);
    }
    if (got < 0) goto done;
    size_t len;
    if (!(text = decode_all(ctx->tok, all, P + (size_t)got, &len, err))) goto done;
    size_t rlen;
    if (!(resp = tk_answer_response(text, len, &rlen, err))) goto done;
    const char *alts[16];
    int na = tk_answer_pattern(alts, 16, task->choices, task->n_choices);
    size_t ml;
    const char *hit = tk_answer_extract(resp, rlen, alts, na, &ml);
    char extracted[64] = "";
    if (hit) snprintf(extracted, sizeof extracted, "%.*s", (int)ml, hit);
    *correct = strcmp(extracted, gold) == 0;
    if (!(shown = json_text(resp, rlen))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    cJSON *o = sample_base(task->name, i, "gen", prompt, gold);
    cJSON_AddStringToObject(o, "generation", shown);
    cJSON_AddStringToObject(o, "extracted", extracted);
    cJSON_AddBoolToObject(o, "correct", *correct);
    cJSON_AddNumberToObject(o, "new_tokens", (double)got);
    rc = emit(samples, o, err);
done:
    free(all);
    free(text);
    free(resp);
    free(shown);
    return rc;
}

/* Log-likelihood protocol for one example. */
static int run_ll(const tk_eval_ctx *ctx, const tk_csr_task *task, size_t i, const tk_instruct *r,
                  const char *prompt, int gold_idx, int *correct, int *correct_norm, tk_strbuf *samples,
                  tk_err *err) {
    int K = task->n_choices, rc = -1;
    tk_example *ex = calloc((size_t)K, sizeof *ex);
    size_t *begins = calloc((size_t)K, sizeof *begins), *lens = calloc((size_t)K, sizeof *lens);
    const int32_t **seqs = calloc((size_t)K, sizeof *seqs);
    double *lp = calloc((size_t)K, sizeof *lp), *chars = calloc((size_t)K, sizeof *chars);
    char **conts = calloc((size_t)K, sizeof *conts);
    if (!ex || !begins || !lens || !seqs || !lp || !chars || !conts) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (int k = 0; k < K; k++) {
        size_t n = sizeof CONT_PREFIX + strlen(task->choices[k]);
        if (!(conts[k] = malloc(n))) {
            tk_fail(err, "out of memory");
            goto done;
        }
        snprintf(conts[k], n, "%s%s", CONT_PREFIX, task->choices[k]);
        chars[k] = (double)utf8_chars(conts[k]);
        if (tk_eval_prompt_continuation(&ex[k], &begins[k], ctx->tok, r->instruction, r->input, conts[k], err))
            goto done;
        seqs[k] = ex[k].input_ids;
        lens[k] = ex[k].n;
    }
    for (int k0 = 0; k0 < K; k0 += (int)ctx->ll_batch) {
        size_t nb = (size_t)(K - k0) < ctx->ll_batch ? (size_t)(K - k0) : ctx->ll_batch;
        if (tk_loglik_score(ctx->scorer, seqs + k0, lens + k0, begins + k0, nb, lp + k0, NULL, err)) goto done;
    }
    int best = 0, best_norm = 0; /* first maximum, as numpy's argmax */
    for (int k = 1; k < K; k++) {
        if (lp[k] > lp[best]) best = k;
        if (lp[k] / chars[k] > lp[best_norm] / chars[best_norm]) best_norm = k;
    }
    *correct = best == gold_idx;
    *correct_norm = best_norm == gold_idx;
    cJSON *o = sample_base(task->name, i, "ll", prompt, task->choices[gold_idx]);
    cJSON_AddStringToObject(o, "generation", conts[best]);
    cJSON_AddStringToObject(o, "extracted", task->choices[best]);
    cJSON_AddBoolToObject(o, "correct", *correct);
    cJSON_AddStringToObject(o, "choice_norm", task->choices[best_norm]);
    cJSON_AddBoolToObject(o, "correct_norm", *correct_norm);
    cJSON *a = cJSON_AddArrayToObject(o, "loglik");
    for (int k = 0; k < K; k++) cJSON_AddItemToArray(a, cJSON_CreateNumber(lp[k]));
    rc = emit(samples, o, err);
done:
    if (ex)
        for (int k = 0; k < K; k++) tk_example_free(&ex[k]);
    if (conts)
        for (int k = 0; k < K; k++) free(conts[k]);
    free(ex);
    free(begins);
    free(lens);
    free(seqs);
    free(lp);
    free(chars);
    free(conts);
    return rc;
}

/* Greedy generations of records i0..i0+n-1 (their prompts in ex[]) as one batch: gen[k] [max_new],
 * got[k]. An error names its record. */
static int gen_batch(const tk_eval_ctx *ctx, const char *path, size_t i0, const tk_example *ex, size_t n,
                     int32_t *gen, long *got, tk_err *err) {
    const int32_t *prompts[TK_EVAL_BATCH_MAX];
    size_t lens[TK_EVAL_BATCH_MAX], bad;
    int32_t *outs[TK_EVAL_BATCH_MAX];
    for (size_t k = 0; k < n; k++) {
        prompts[k] = ex[k].input_ids;
        lens[k] = ex[k].n;
        outs[k] = gen + k * ctx->max_new;
    }
    if (tk_greedy_batch(ctx->m, prompts, lens, n, ctx->max_new, ctx->eos, outs, got, &bad, err) == 0) return 0;
    if (bad < n) {
        char where[4200];
        snprintf(where, sizeof where, "%s: record %zu", path, i0 + bad);
        tk_err_prefix(err, where);
    }
    return -1;
}

int tk_eval_csr(const tk_eval_ctx *ctx, const tk_csr_task *task, const char *path, tk_eval_result *res,
                tk_strbuf *samples, tk_err *err) {
    tk_instruct *recs = NULL;
    size_t n = 0, n_all = 0;
    size_t E = ctx->eval_batch > 1 && ctx->gen && ctx->beams == 1 ? ctx->eval_batch : 1; /* records per batch */
    tk_example ex[TK_EVAL_BATCH_MAX] = {0};
    char *prompt[TK_EVAL_BATCH_MAX] = {0};
    int32_t *gen = NULL;
    long got[TK_EVAL_BATCH_MAX];
    int rc = -1;
    double t0 = tk_time();
    TK_ASSERT(ctx->gen || ctx->ll);
    TK_ASSERT(!ctx->ll || (ctx->scorer && ctx->ll_batch >= 1));
    TK_ASSERT(E <= TK_EVAL_BATCH_MAX);
    if (tk_instruct_load(path, &recs, &n_all, err)) return -1;
    n = n_all;
    if (ctx->limit && ctx->limit < n) n = ctx->limit;
    if (n == 0) {
        tk_fail(err, "%s: no records to evaluate", path);
        goto done;
    }
    if (E > 1 && !(gen = malloc(E * ctx->max_new * sizeof *gen))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t ok_gen = 0, ok_ll = 0, ok_norm = 0, i = 0;
    int gold_idx[TK_EVAL_BATCH_MAX];
    /* KV cache bytes per position: a batch stops growing at TK_EVAL_KV_BYTES of caches */
    size_t per_pos = 2 * (size_t)ctx->m->cfg.n_layers * (size_t)ctx->m->cfg.n_kv_heads * (size_t)ctx->m->cfg.head_dim *
                     sizeof(float);
    for (size_t i0 = 0, nb = 0; i0 < n; i0 += nb) {
        size_t bytes = 0;
        nb = n - i0 < E ? n - i0 : E;
        for (size_t k = 0; k < nb; k++) {
            i = i0 + k;
            const tk_instruct *r = &recs[i];
            const char *gold = r->answer ? r->answer : "";
            gold_idx[k] = -1;
            for (int c = 0; c < task->n_choices; c++)
                if (strcmp(task->choices[c], gold) == 0) gold_idx[k] = c;
            if (gold_idx[k] < 0) {
                tk_fail(err, "%s: record %zu: answer \"%.40s\" is not one of the %s choices (%s ... %s)", path, i, gold,
                        task->name, task->choices[0], task->choices[task->n_choices - 1]);
                goto done;
            }
            free(prompt[k]);
            prompt[k] = NULL;
            if (tk_eval_prompt(&ex[k], &prompt[k], ctx->tok, r->instruction, r->input, err)) goto record_err;
            bytes += (ex[k].n + ctx->max_new) * per_pos;
            if (bytes >= TK_EVAL_KV_BYTES) nb = k + 1;
        }
        if (E > 1 && gen_batch(ctx, path, i0, ex, nb, gen, got, err)) goto done;
        for (size_t k = 0; k < nb; k++) {
            i = i0 + k;
            const tk_instruct *r = &recs[i];
            const char *gold = r->answer ? r->answer : "";
            if (ctx->gen) {
                int c = 0;
                if (run_gen(ctx, task, i, &ex[k], prompt[k], gold, E > 1 ? gen + k * ctx->max_new : NULL, got[k], &c,
                            samples, err))
                    goto record_err;
                ok_gen += (size_t)c;
            }
            if (ctx->ll) {
                int c = 0, cn = 0;
                if (run_ll(ctx, task, i, r, prompt[k], gold_idx[k], &c, &cn, samples, err)) goto record_err;
                ok_ll += (size_t)c;
                ok_norm += (size_t)cn;
            }
            if (ctx->progress) {
                char running[128] = "";
                size_t d = i + 1;
                int w = 0;
                if (ctx->gen) w += snprintf(running + w, sizeof running - (size_t)w, "gen %.2f", 100.0 * ok_gen / d);
                if (ctx->ll)
                    snprintf(running + w, sizeof running - (size_t)w, "%sll %.2f  ll_norm %.2f", w ? "  " : "",
                             100.0 * ok_ll / d, 100.0 * ok_norm / d);
                tk_eval_progress p = {task->name, d, n, running, tk_time() - t0};
                ctx->progress(ctx->user, &p);
            }
        }
    }
    snprintf(res->task, sizeof res->task, "%s", task->name);
    res->kind = "csr";
    res->data = path;
    res->n = n;
    if (ctx->gen) tk_eval_result_add(res, "csr_gen_acc", (double)ok_gen / (double)n);
    if (ctx->ll) {
        tk_eval_result_add(res, "csr_ll_acc", (double)ok_ll / (double)n);
        tk_eval_result_add(res, "csr_ll_acc_norm", (double)ok_norm / (double)n);
    }
    res->seconds = tk_time() - t0;
    rc = 0;
    goto done;
record_err:
    if (!strstr(err->msg, path)) {
        char where[4200];
        snprintf(where, sizeof where, "%s: record %zu", path, i);
        tk_err_prefix(err, where);
    }
done:
    for (size_t k = 0; k < TK_EVAL_BATCH_MAX; k++) {
        free(prompt[k]);
        tk_example_free(&ex[k]);
    }
    free(gen);
    tk_instruct_free(recs, n_all);
    return rc;
}
