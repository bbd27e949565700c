/* vqa.c: see vqa.h. */
#include "vqa.h"

#include "../../datasets/shard.h"
#include "../../text/tokenizer.h"

#include <cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Trimmed, lower-cased, one trailing '.' dropped; malloc'd. */
static char *normalise(const char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1])) n--;
    if (n > 0 && s[n - 1] == '.') n--;
    while (n > 0 && isspace((unsigned char)s[n - 1])) n--;
    char *o = malloc(n + 1);
    if (!o) return NULL;
    for (size_t i = 0; i < n; i++) o[i] = (char)tolower((unsigned char)s[i]);
    o[n] = '\0';
    return o;
}

/* log softmax(logits)[id] */
static double logprob(const float *logits, size_t V, int32_t id) {
    float mx = logits[0];
    for (size_t v = 1; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
    double z = 0.0;
    for (size_t v = 0; v < V; v++) z += exp((double)logits[v] - mx);
    return (double)logits[id] - mx - log(z);
}

typedef struct {
    char **text;
    size_t n, cap;
} strlist;

static int strlist_add_unique(strlist *l, const char *s) {
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->text[i], s) == 0) return 0;
    if (l->n == l->cap) {
        size_t nc = l->cap ? 2 * l->cap : 16;
        char **g = realloc(l->text, nc * sizeof *g);
        if (!g) return -1;
        l->text = g;
        l->cap = nc;
    }
    return (l->text[l->n] = strdup(s)) ? (int)(++l->n, 0) : -1;
}

static void strlist_free(strlist *l) {
    for (size_t i = 0; i < l->n; i++) free(l->text[i]);
    free(l->text);
}

/* meta "answer" (and "choices") of a record; answer malloc'd or NULL when absent. */
static char *meta_answer(const tk_shard_record *r, strlist *choices) {
    if (!r->meta_len) return NULL;
    cJSON *m = cJSON_ParseWithLength(r->meta, r->meta_len);
    const cJSON *a = m ? cJSON_GetObjectItemCaseSensitive(m, "answer") : NULL;
    char *ans = cJSON_IsString(a) ? strdup(a->valuestring) : NULL;
    const cJSON *c = m ? cJSON_GetObjectItemCaseSensitive(m, "choices") : NULL, *e;
    if (choices && cJSON_IsArray(c))
        cJSON_ArrayForEach(e, c) if (cJSON_IsString(e)) strlist_add_unique(choices, e->valuestring);
    cJSON_Delete(m);
    return ans;
}

/* The multiple-choice protocol with the candidates as batches of rows: each row a copy of the
 * prompt's cache kv (p positions, l0 the logits after it), one token per step (tk_llama_step_rows).
 * The scores, and so *best_c, are bit-identical to the candidates scored one at a time. */
static int mc_batched(const tk_eval_ctx *ctx, const strlist *choices, const char *gold, const tk_llama_kv *kv,
                      const float *l0, size_t p, size_t cap, size_t *best_c, size_t *gold_c, tk_err *err) {
    tk_llama *m = ctx->m;
    size_t V = (size_t)m->cfg.vocab_size, K = choices->n, Lmax = 1, R = 0;
    size_t GD = (size_t)m->cfg.n_kv_heads * (size_t)m->cfg.head_dim, L = (size_t)m->cfg.n_layers;
    tk_ids *cand = calloc(K, sizeof *cand);
    double *lp = calloc(K, sizeof *lp);
    tk_llama_kv **rk = NULL, **act = NULL;
    tk_llama_rows *rows = NULL;
    int32_t *ids = NULL;
    size_t *who = NULL;
    float *logits = NULL;
    int rc = -1;
    if (!cand || !lp) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t c = 0; c < K; c++) {
        if (strcmp(choices->text[c], gold) == 0) *gold_c = c;
        if (tk_tok_encode(ctx->tok, choices->text[c], strlen(choices->text[c]), 0, ctx->eos >= 0, &cand[c], err))
            goto done;
        if (p + cand[c].n > cap) cand[c].n = cap - p; /* what fits below the model's positions */
        Lmax = cand[c].n > Lmax ? cand[c].n : Lmax;
    }
    size_t S = p + Lmax, per = 2 * L * S * GD * sizeof(float);
    R = ctx->eval_batch;
    if (R > TK_EVAL_KV_BYTES / per) R = TK_EVAL_KV_BYTES / per > 0 ? TK_EVAL_KV_BYTES / per : 1;
    if (R > K) R = K;
    rk = calloc(R, sizeof *rk);
    act = calloc(R, sizeof *act);
    ids = calloc(R, sizeof *ids);
    who = calloc(R, sizeof *who);
    logits = malloc(R * V * sizeof *logits);
    if (!rk || !act || !ids || !who || !logits) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t r = 0; r < R; r++)
        if (!(rk[r] = tk_llama_kv_alloc(m, S, 1, err))) goto done;
    if (!(rows = tk_llama_rows_alloc(m, R, S, err))) goto done;
    for (size_t c0 = 0; c0 < K; c0 += R) {
        size_t nr = K - c0 < R ? K - c0 : R;
        for (size_t r = 0; r < nr; r++) {
            tk_llama_kv_reset(rk[r]);
            if (tk_llama_kv_copy(rk[r], kv, 0, err)) goto done;
            if (cand[c0 + r].n) lp[c0 + r] = logprob(l0, V, cand[c0 + r].ids[0]);
        }
        for (size_t t = 0; t + 1 < Lmax; t++) { /* rows whose candidate has a token t + 1 to score */
            size_t n = 0;
            for (size_t r = 0; r < nr; r++)
                if (t + 1 < cand[c0 + r].n) act[n] = rk[r], ids[n] = cand[c0 + r].ids[t], who[n++] = c0 + r;
            if (n == 0) break;
            if (tk_llama_step_rows(m, rows, act, ids, n, logits, err)) goto done;
            for (size_t i = 0; i < n; i++) lp[who[i]] += logprob(logits + i * V, V, cand[who[i]].ids[t + 1]);
        }
    }
    double best = -INFINITY;
    for (size_t c = 0; c < K; c++)
        if (lp[c] > best) best = lp[c], *best_c = c;
    rc = 0;
done:
    if (cand)
        for (size_t c = 0; c < K; c++) tk_ids_free(&cand[c]);
    if (rk)
        for (size_t r = 0; r < R; r++) tk_llama_kv_free(rk[r]);
    free(cand);
    free(lp);
    free(rk);
    free(act);
    free(ids);
    free(who);
    free(logits);
    tk_llama_rows_free(rows);
    return rc;
}

/* One record's sample line and progress report, after its generation (text) and choice. */
static int record_out(const tk_eval_ctx *ctx, tk_strbuf *samples, uint64_t i, uint64_t n, const char *gold,
                      const char *text, const strlist *choices, size_t best_c, size_t gold_c, size_t *hits_em,
                      size_t *hits_mc, double t0, tk_err *err) {
    char *ng_text = normalise(text), *ng_gold = normalise(gold);
    int em = ng_text && ng_gold && strcmp(ng_text, ng_gold) == 0;
    free(ng_text);
    free(ng_gold);
    *hits_em += (size_t)em;
    int mc = best_c == gold_c;
    *hits_mc += (size_t)mc;
    if (samples) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "task", "vqa");
        cJSON_AddNumberToObject(o, "record", (double)i);
        cJSON_AddStringToObject(o, "gold", gold);
        cJSON_AddStringToObject(o, "generation", text);
        cJSON_AddBoolToObject(o, "em", em);
        cJSON_AddStringToObject(o, "choice", choices->text[best_c]);
        cJSON_AddBoolToObject(o, "mc_correct", mc);
        char *s = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        if (!s) return tk_fail(err, "out of memory");
        int bad = tk_strbuf_append(samples, s, strlen(s), err) || tk_strbuf_append(samples, "\n", 1, err);
        free(s);
        if (bad) return -1;
    }
    if (ctx->progress) {
        char run[96];
        snprintf(run, sizeof run, "em %.2f  mc %.2f", 100.0 * *hits_em / (double)(i + 1),
                 100.0 * *hits_mc / (double)(i + 1));
        tk_eval_progress pg = {"vqa", (size_t)i + 1, (size_t)n, run, tk_time() - t0};
        ctx->progress(ctx->user, &pg);
    }
    return 0;
}

/* A record whose generation waits for its batch (--eval-batch > 1): its cache (the prompt, then the
 * generated tokens), the logits after its last position, and what its sample line needs. */
typedef struct {
    uint64_t i;
    char *gold;
    tk_llama_kv *kv;  /* p + max_new positions */
    float *logits;    /* [V] */
    int32_t *gen;     /* [max_new] */
    size_t max_new, ng, best_c, gold_c;
} vqa_row;

static void vqa_row_free(vqa_row *w) {
    free(w->gold);
    tk_llama_kv_free(w->kv);
    free(w->logits);
    free(w->gen);
    *w = (vqa_row){0};
}

/* The greedy generation of rows w[0..n) as one batch, each row exactly as the one-record loop decodes
 * it (argmax among the tokenizer's Vt ids, stop before an eos, at most max_new tokens). */
static int gen_rows(tk_llama *m, vqa_row *w, size_t n, size_t Vt, int32_t eos, tk_err *err) {
    size_t V = (size_t)m->cfg.vocab_size, S = 0;
    for (size_t k = 0; k < n; k++) S = tk_llama_kv_len(w[k].kv) + w[k].max_new > S ? tk_llama_kv_len(w[k].kv) + w[k].max_new : S;
    tk_llama_rows *rows = tk_llama_rows_alloc(m, n, S, err);
    tk_llama_kv **act = calloc(n, sizeof *act);
    size_t *who = calloc(n, sizeof *who);
    int32_t *ids = calloc(n, sizeof *ids);
    float *logits = malloc(n * V * sizeof *logits);
    int rc = -1;
    if (!rows || !act || !who || !ids || !logits) {
        if (rows) tk_fail(err, "out of memory");
        goto done;
    }
    for (;;) {
        size_t k = 0;
        for (size_t r = 0; r < n; r++) {
            if (w[r].ng == w[r].max_new) continue; /* finished (an eos sets ng = max_new below) */
            const float *lg = w[r].logits;
            int32_t best = 0;
            for (size_t v = 1; v < Vt; v++)
                if (lg[v] > lg[best]) best = (int32_t)v;
            if (eos >= 0 && best == eos) {
                w[r].max_new = w[r].ng;
                continue;
            }
            w[r].gen[w[r].ng++] = best;
            if (w[r].ng < w[r].max_new) act[k] = w[r].kv, ids[k] = best, who[k++] = r;
        }
        if (k == 0) break;
        if (tk_llama_step_rows(m, rows, act, ids, k, logits, err)) goto done;
        for (size_t j = 0; j < k; j++) memcpy(w[who[j]].logits, logits + j * V, V * sizeof *logits);
    }
    rc = 0;
done:
    tk_llama_rows_free(rows);
    free(act);
    free(who);
    free(ids);
    free(logits);
    return rc;
}

int tk_eval_vqa(const tk_eval_ctx *ctx, tk_mm *mm, const char *path, tk_eval_result *res, tk_strbuf *samples,
                tk_err *err) {
    tk_llama *m = ctx->m;
    size_t C = (size_t)m->cfg.dim, V = (size_t)m->cfg.vocab_size, nt = tk_mm_tokens(mm);
    size_t Vt = (size_t)tk_tok_vocab_size(ctx->tok) < V ? (size_t)tk_tok_vocab_size(ctx->tok) : V;
    tk_shard_reader *r = tk_shard_reader_open(path, err);
    if (!r) return -1;
    uint64_t n_all = tk_shard_reader_count(r), n = ctx->limit && ctx->limit < n_all ? ctx->limit : n_all;
    strlist choices = {0};
    tk_ids cand = {0};
    tk_llama_kv *kv = NULL, *kc = NULL;
    float *embeds = NULL, *logits = NULL, *l0 = NULL;
    int32_t *gen = NULL;
    char *gold = NULL, *text = NULL;
    vqa_row pend[TK_EVAL_BATCH_MAX]; /* records waiting for their batch's generation */
    size_t n_pend = 0, pend_bytes = 0;
    int rc = -1;
    double t0 = tk_time();
    /* candidates: every record's meta choices, else its distinct answers */
    for (uint64_t i = 0; i < n_all; i++) {
        tk_shard_record rec;
        if (tk_shard_reader_get(r, i, &rec, err)) goto done;
        strlist answers = {0};
        char *a = meta_answer(&rec, &answers);
        for (size_t k = 0; k < answers.n; k++) strlist_add_unique(&choices, answers.text[k]);
        if (a && answers.n == 0) strlist_add_unique(&choices, a);
        strlist_free(&answers);
        free(a);
    }
    if (choices.n < 2) {
        tk_fail(err, "%s: fewer than 2 distinct answers in the records' metadata: nothing to choose between", path);
        goto done;
    }
    if (!(logits = malloc(V * sizeof *logits)) || !(l0 = malloc(V * sizeof *l0)) ||
        !(gen = malloc((ctx->max_new + 1) * sizeof *gen))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t hits_em = 0, hits_mc = 0;
    for (uint64_t i = 0; i < n; i++) {
        tk_shard_record rec;
        if (tk_shard_reader_get(r, i, &rec, err)) goto done;
        free(gold);
        if (!(gold = meta_answer(&rec, NULL))) {
            tk_fail(err, "%s: record %llu has no \"answer\" in its metadata", path, (unsigned long long)i);
            goto done;
        }
        size_t p = 0;
        while (p < rec.n_tokens && rec.kinds[p] != TK_KIND_RESPONSE) p++;
        if (p == 0 || p == rec.n_tokens) {
            tk_fail(err, "%s: record %llu has no prompt or no response tokens", path, (unsigned long long)i);
            goto done;
        }
        /* visual tokens of the prompt: the k-th image fills the k-th run */
        free(embeds);
        if (!(embeds = calloc(p * C, sizeof *embeds))) {
            tk_fail(err, "out of memory");
            goto done;
        }
        size_t img = 0;
        for (size_t t = 0; t < p;) {
            if (rec.kinds[t] != TK_KIND_IMAGE) {
                t++;
                continue;
            }
            size_t s0 = t;
            while (t < p && rec.kinds[t] == TK_KIND_IMAGE) t++;
            if (img >= rec.n_images || t - s0 != nt || rec.images[img].kind != TK_IMAGE_ENCODED) {
                tk_fail(err, "%s: record %llu: image run %zu (%zu tokens) does not match its image payload or the "
                             "encoder's %zu features", path, (unsigned long long)i, img, t - s0, nt);
                goto done;
            }
            char name[512];
            snprintf(name, sizeof name, "%s: record %llu image %zu", path, (unsigned long long)i, img);
            if (tk_mm_embed_image(mm, rec.images[img].data, rec.images[img].nbytes, name, embeds + s0 * C, err))
                goto done;
            img++;
        }
        /* prefill once; generation and every candidate continue from copies of this cache */
        tk_llama_kv_free(kv);
        tk_llama_kv_free(kc);
        kc = NULL;
        size_t cap = (size_t)m->cfg.max_seq_len;
        if (p + 1 >= cap) {
            tk_fail(err, "%s: record %llu: its prompt of %zu positions leaves no room below the model's %zu", path,
                    (unsigned long long)i, p, cap);
            goto done;
        }
        size_t max_new = ctx->max_new < cap - p ? ctx->max_new : cap - p;
        if (!(kv = tk_llama_kv_alloc(m, cap, p, err)) ||
            (ctx->eval_batch <= 1 && !(kc = tk_llama_kv_alloc(m, cap, p, err))) ||
            tk_llama_step_ex(m, kv, rec.input_ids, embeds, rec.kinds, p, l0, err))
            goto done;
        if (ctx->eval_batch > 1) { /* the choice now; the generation with its batch */
            vqa_row *w = &pend[n_pend];
            size_t best_c = 0, gold_c = SIZE_MAX;
            if (mc_batched(ctx, &choices, gold, kv, l0, p, cap, &best_c, &gold_c, err)) goto done;
            *w = (vqa_row){.i = i, .max_new = max_new, .best_c = best_c, .gold_c = gold_c};
            n_pend++;
            if (!(w->gold = strdup(gold)) || !(w->logits = malloc(V * sizeof *w->logits)) ||
                !(w->gen = malloc(max_new * sizeof *w->gen))) {
                tk_fail(err, "out of memory");
                goto done;
            }
            memcpy(w->logits, l0, V * sizeof *l0);
            if (!(w->kv = tk_llama_kv_alloc(m, p + max_new, 1, err)) || tk_llama_kv_copy(w->kv, kv, 0, err)) goto done;
            pend_bytes += 2 * (size_t)m->cfg.n_layers * (p + max_new) * (size_t)m->cfg.n_kv_heads *
                           (size_t)m->cfg.head_dim * sizeof(float);
            if (n_pend < ctx->eval_batch && pend_bytes < TK_EVAL_KV_BYTES && i + 1 < n) continue;
            if (gen_rows(m, pend, n_pend, Vt, ctx->eos, err)) goto done;
            for (size_t k = 0; k < n_pend; k++) {
                free(text);
                if (!(text = tk_tok_decode(ctx->tok, pend[k].gen, pend[k].ng, NULL, err)) ||
                    record_out(ctx, samples, pend[k].i, n, pend[k].gold, text, &choices, pend[k].best_c, pend[k].gold_c,
                               &hits_em, &hits_mc, t0, err))
                    goto done;
            }
            for (size_t k = 0; k < n_pend; k++) vqa_row_free(&pend[k]);
            n_pend = 0;
            pend_bytes = 0;
            continue;
        }
        /* greedy generation */
        if (tk_llama_kv_copy(kc, kv, 0, err)) goto done;
        memcpy(logits, l0, V * sizeof *logits);
        size_t ng = 0;
        for (; ng < max_new; ng++) {
            int32_t best = 0; /* among the ids the tokenizer can decode (llava-hf pads its vocabulary) */
            for (size_t v = 1; v < Vt; v++)
                if (logits[v] > logits[best]) best = (int32_t)v;
            if (ctx->eos >= 0 && best == ctx->eos) break;
            gen[ng] = best;
            if (tk_llama_step(m, kc, &gen[ng], 1, logits, err)) goto done;
        }
        free(text);
        if (!(text = tk_tok_decode(ctx->tok, gen, ng, NULL, err))) goto done;
        /* multiple choice */
        double best_lp = -INFINITY;
        size_t best_c = 0, gold_c = SIZE_MAX;
        for (size_t c = 0; c < choices.n; c++) {
            if (strcmp(choices.text[c], gold) == 0) gold_c = c;
            cand.n = 0;
            if (tk_tok_encode(ctx->tok, choices.text[c], strlen(choices.text[c]), 0, ctx->eos >= 0, &cand, err) ||
                tk_llama_kv_copy(kc, kv, 0, err))
                goto done;
            double lp = 0.0;
            memcpy(logits, l0, V * sizeof *logits);
            if (p + cand.n > cap) cand.n = cap - p; /* what fits below the model's positions */
            for (size_t t = 0; t < cand.n; t++) {
                lp += logprob(logits, V, cand.ids[t]);
                if (t + 1 < cand.n && tk_llama_step(m, kc, &cand.ids[t], 1, logits, err)) goto done;
            }
            if (lp > best_lp) {
                best_lp = lp;
                best_c = c;
            }
        }
        if (record_out(ctx, samples, i, n, gold, text, &choices, best_c, gold_c, &hits_em, &hits_mc, t0, err))
            goto done;
    }
    memset(res, 0, sizeof *res);
    snprintf(res->task, sizeof res->task, "vqa");
    res->kind = "vqa";
    res->data = path;
    res->n = (size_t)n;
    tk_eval_result_add(res, "vqa_em", n ? (double)hits_em / (double)n : 0.0);
    tk_eval_result_add(res, "vqa_mc_acc", n ? (double)hits_mc / (double)n : 0.0);
    res->seconds = tk_time() - t0;
    rc = 0;
done:
    for (size_t k = 0; k < n_pend; k++) vqa_row_free(&pend[k]);
    tk_llama_kv_free(kv);
    tk_llama_kv_free(kc);
    tk_shard_reader_free(r);
    strlist_free(&choices);
    tk_ids_free(&cand);
    free(embeds);
    free(logits);
    free(l0);
    free(gen);
    free(gold);
    free(text);
    return rc;
}
