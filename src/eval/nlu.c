/* nlu.c: see nlu.h. */
#include "nlu.h"


#include "metrics.h"
#include "prompt.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STSB_STEPS 50 /* candidate scores k / 10, k = 0..50 */

typedef struct {
    int K;          /* candidates */
    char **text;    /* [K] continuation texts */
    double *value;  /* [K] label index (classification) or mean score (STS-B) */
} cands;

static void cands_free(cands *c) {
    if (c->text)
        for (int k = 0; k < c->K; k++) free(c->text[k]);
    free(c->text);
    free(c->value);
    *c = (cands){0};
}

/* The candidate continuations of one example (the converter's response per label / score). */
static int make_cands(cands *c, const tk_glue_task *t, const tk_glue_example *e, tk_err *err) {
    int regression = t->n_labels == 0, cap = regression ? STSB_STEPS + 1 : t->n_labels;
    double *count = calloc((size_t)cap, sizeof *count);
    c->text = calloc((size_t)cap, sizeof *c->text);
    c->value = calloc((size_t)cap, sizeof *c->value);
    c->K = 0;
    if (!count || !c->text || !c->value) {
        free(count);
        return tk_fail(err, "out of memory");
    }
    for (int j = 0; j < cap; j++) {
        tk_glue_example x = *e;
        if (regression) x.score = (float)j / 10.0f;
        else x.label = j;
        char *s = tk_glue_response(t, &x);
        if (!s) {
            free(count);
            return tk_fail(err, "out of memory");
        }
        int k = 0;
        while (k < c->K && strcmp(c->text[k], s) != 0) k++;
        if (k < c->K) free(s); /* same text as an earlier score: merged */
        else c->text[c->K++] = s;
        c->value[k] += regression ? (double)j / 10.0 : (double)j;
        count[k] += 1.0;
    }
    for (int k = 0; k < c->K; k++) c->value[k] /= count[k];
    free(count);
    return 0;
}

static int emit(tk_strbuf *out, cJSON *o, tk_err *err) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!s) return tk_fail(err, "out of memory");
    int rc = tk_strbuf_append(out, s, strlen(s), err) || tk_strbuf_append(out, "\n", 1, err);
    free(s);
    return rc ? -1 : 0;
}

/* Scores one example's candidates: lp [K]. */
static int score(const tk_eval_ctx *ctx, const char *instruction, const cands *c, double *lp, tk_err *err) {
    int K = c->K, rc = -1;
    tk_example *ex = calloc((size_t)K, sizeof *ex);
    size_t *begins = calloc((size_t)K, sizeof *begins), *lens = calloc((size_t)K, sizeof *lens);
    const int32_t **seqs = calloc((size_t)K, sizeof *seqs);
    if (!ex || !begins || !lens || !seqs) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (int k = 0; k < K; k++) {
        if (tk_eval_prompt_continuation(&ex[k], &begins[k], ctx->tok, instruction, NULL, c->text[k], err)) goto done;
        seqs[k] = ex[k].input_ids;
        lens[k] = ex[k].n;
    }
    for (int k0 = 0; k0 < K; k0 += (int)ctx->ll_batch) {
        size_t nb = (size_t)(K - k0) < ctx->ll_batch ? (size_t)(K - k0) : ctx->ll_batch;
        if (tk_loglik_score(ctx->scorer, seqs + k0, lens + k0, begins + k0, nb, lp + k0, NULL, err)) goto done;
    }
    rc = 0;
done:
    if (ex)
        for (int k = 0; k < K; k++) tk_example_free(&ex[k]);
    free(ex);
    free(begins);
    free(lens);
    free(seqs);
    return rc;
}

int tk_eval_glue(const tk_eval_ctx *ctx, const tk_glue_task *task, const char *path, tk_eval_result *res,
                 tk_strbuf *samples, tk_err *err) {
    tk_glue_example *exs = NULL;
    size_t n_all = 0, n;
    int regression = task->n_labels == 0, rc = -1;
    int *pred = NULL, *gold = NULL;
    double *ps = NULL, *gs = NULL, *lp = NULL;
    char *instruction = NULL, *prompt = NULL;
    cands c = {0};
    tk_example pex = {0};
    double t0 = tk_time();
    TK_ASSERT(ctx->scorer && ctx->ll_batch >= 1);
    if (tk_glue_load(task, path, &exs, &n_all, err)) return -1;
    n = ctx->limit && ctx->limit < n_all ? ctx->limit : n_all;
    if (n == 0) {
        tk_fail(err, "%s: no examples to evaluate", path);
        goto done;
    }
    pred = calloc(n, sizeof *pred);
    gold = calloc(n, sizeof *gold);
    ps = calloc(n, sizeof *ps);
    gs = calloc(n, sizeof *gs);
    lp = calloc(STSB_STEPS + 1 + (size_t)task->n_labels, sizeof *lp);
    if (!pred || !gold || !ps || !gs || !lp) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        const tk_glue_example *e = &exs[i];
        if (!regression && (e->label < 0 || e->label >= task->n_labels)) {
            tk_fail(err, "%s: example %zu has no gold label (an unlabeled test split?)", path, i);
            goto done;
        }
        free(instruction);
        free(prompt);
        prompt = NULL;
        cands_free(&c);
        if (!(instruction = tk_glue_instruction(task, e))) {
            tk_fail(err, "out of memory");
            goto done;
        }
        if (make_cands(&c, task, e, err) || tk_eval_prompt(&pex, &prompt, ctx->tok, instruction, NULL, err) ||
            score(ctx, instruction, &c, lp, err)) {
            char where[4200];
            snprintf(where, sizeof where, "%s: example %zu", path, i);
            tk_err_prefix(err, where);
            goto done;
        }
        int best = 0;
        for (int k = 1; k < c.K; k++)
            if (lp[k] > lp[best]) best = k;
        cJSON *o = cJSON_CreateObject();
        char idbuf[64];
        snprintf(idbuf, sizeof idbuf, "%s-%zu", task->name, i);
        cJSON_AddStringToObject(o, "task", task->name);
        cJSON_AddStringToObject(o, "id", e->id && e->id[0] ? e->id : idbuf);
        cJSON_AddStringToObject(o, "protocol", "ll");
        cJSON_AddStringToObject(o, "prompt", prompt);
        cJSON_AddStringToObject(o, "generation", c.text[best]);
        if (regression) {
            double mx = lp[0], z = 0.0, m = 0.0;
            for (int k = 1; k < c.K; k++) mx = lp[k] > mx ? lp[k] : mx;
            for (int k = 0; k < c.K; k++) {
                double w = exp(lp[k] - mx);
                z += w;
                m += w * c.value[k];
            }
            ps[i] = m / z;
            gs[i] = (double)e->score;
            char buf[32];
            snprintf(buf, sizeof buf, "%.4f", ps[i]);
            cJSON_AddStringToObject(o, "extracted", buf);
            snprintf(buf, sizeof buf, "%g", (double)e->score);
            cJSON_AddStringToObject(o, "gold", buf);
            cJSON_AddNullToObject(o, "correct");
            cJSON_AddNumberToObject(o, "gold_score", gs[i]);
            cJSON_AddNumberToObject(o, "pred_score", ps[i]);
        } else {
            pred[i] = (int)c.value[best];
            gold[i] = e->label;
            ok += pred[i] == gold[i];
            cJSON_AddStringToObject(o, "extracted", task->verbalizers[pred[i]]);
            cJSON_AddStringToObject(o, "gold", task->verbalizers[gold[i]]);
            cJSON_AddBoolToObject(o, "correct", pred[i] == gold[i]);
            cJSON_AddNumberToObject(o, "label", gold[i]);
            cJSON_AddNumberToObject(o, "pred", pred[i]);
        }
        cJSON *a = cJSON_AddArrayToObject(o, "loglik");
        for (int k = 0; k < c.K; k++) cJSON_AddItemToArray(a, cJSON_CreateNumber(lp[k]));
        if (emit(samples, o, err)) goto done;
        if (ctx->progress) {
            char running[96];
            if (regression) snprintf(running, sizeof running, "pearson %.2f", 100.0 * tk_metric_pearson(ps, gs, i + 1));
            else snprintf(running, sizeof running, "acc %.2f", 100.0 * (double)ok / (double)(i + 1));
            tk_eval_progress p = {task->name, i + 1, n, running, tk_time() - t0};
            ctx->progress(ctx->user, &p);
        }
    }
    snprintf(res->task, sizeof res->task, "%s", task->name);
    res->kind = "glue";
    res->data = path;
    res->n = n;
    switch (task->metric) {
    case TK_GLUE_MCC: tk_eval_result_add(res, "nlu_mcc", tk_metric_mcc(pred, gold, n)); break;
    case TK_GLUE_ACC_F1:
        tk_eval_result_add(res, "nlu_acc", tk_metric_accuracy(pred, gold, n));
        tk_eval_result_add(res, "nlu_f1", tk_metric_f1(pred, gold, n));
        break;
    case TK_GLUE_PEARSON_SPEARMAN: {
        double rho;
        if (tk_metric_spearman(&rho, ps, gs, n, err)) goto done;
        tk_eval_result_add(res, "nlu_pearson", tk_metric_pearson(ps, gs, n));
        tk_eval_result_add(res, "nlu_spearman", rho);
        break;
    }
    default: tk_eval_result_add(res, "nlu_acc", tk_metric_accuracy(pred, gold, n)); break;
    }
    res->seconds = tk_time() - t0;
    rc = 0;
done:
    free(instruction);
    free(prompt);
    cands_free(&c);
    tk_example_free(&pex);
    free(pred);
    free(gold);
    free(ps);
    free(gs);
    free(lp);
    tk_glue_free(exs, n_all);
    return rc;
}

