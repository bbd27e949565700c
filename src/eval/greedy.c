/* greedy.c: see greedy.h. Shapes: B rows, P_b prompt tokens of row b, M = max_new, V vocabulary. */
#include "greedy.h"

#include <stdlib.h>
#include <string.h>

/* The first largest logit, as tk_llama_generate. */
static int32_t argmax(const float *logits, size_t V) {
    size_t best = 0;
    for (size_t v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;
    return (int32_t)best;
}

/* Row b's prompt through a cache of its own (tk_llama_generate's), copied into kv (keys and values
 * only); the first new token's logits in logits [V]. */
static int prefill(tk_llama *m, tk_llama_kv *kv, const int32_t *prompt, size_t P, size_t M, float *logits,
                   tk_err *err) {
    tk_llama_kv *pre = tk_llama_kv_alloc(m, P + M, P, err);
    int rc = !pre || tk_llama_step(m, pre, prompt, P, logits, err) || tk_llama_kv_copy(kv, pre, 0, err) ? -1 : 0;
    tk_llama_kv_free(pre);
    return rc;
}

int tk_greedy_batch(tk_llama *m, const int32_t *const *prompts, const size_t *lens, size_t B, size_t max_new,
                    int32_t eos, int32_t *const *outs, long *got, size_t *bad_row, tk_err *err) {
    size_t V = (size_t)m->cfg.vocab_size, M = max_new, S = 0;
    *bad_row = B;
    for (size_t b = 0; b < B; b++) {
        got[b] = 0;
        *bad_row = b;
        if (lens[b] == 0) return tk_fail(err, "the prompt is empty");
        for (size_t i = 0; i < lens[b]; i++)
            if (prompts[b][i] < 0 || (size_t)prompts[b][i] >= V)
                return tk_fail(err, "prompt id %d at position %zu is outside the vocabulary [0, %zu)", prompts[b][i], i,
                               V);
        S = lens[b] + M > S ? lens[b] + M : S;
    }
    *bad_row = B;
    if (B == 0 || M == 0) return 0;
    int rc = -1;
    tk_llama_kv **kv = calloc(B, sizeof *kv), **act = calloc(B, sizeof *act);
    size_t *row = calloc(B, sizeof *row);
    int32_t *next = calloc(B, sizeof *next);
    float *logits = malloc(B * V * sizeof *logits);
    tk_llama_rows *rows = NULL;
    if (!kv || !act || !row || !next || !logits) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t n = 0; /* rows still going: row[0..n) */
    for (size_t b = 0; b < B; b++) {
        *bad_row = b;
        if (!(kv[b] = tk_llama_kv_alloc(m, lens[b] + M, 1, err)) || prefill(m, kv[b], prompts[b], lens[b], M, logits, err))
            goto done;
        int32_t t = argmax(logits, V);
        outs[b][got[b]++] = t;
        if ((size_t)got[b] < M && t != eos) row[n++] = b;
    }
    *bad_row = B; /* the prompts fit (their caches were allocated): S positions do too */
    if (n > 0 && !(rows = tk_llama_rows_alloc(m, n, S, err))) goto done;
    while (n > 0) {
        for (size_t i = 0; i < n; i++) act[i] = kv[row[i]], next[i] = outs[row[i]][got[row[i]] - 1];
        if (tk_llama_step_rows(m, rows, act, next, n, logits, err)) goto done;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            size_t b = row[i];
            int32_t t = argmax(logits + i * V, V);
            outs[b][got[b]++] = t;
            if ((size_t)got[b] < M && t != eos) row[k++] = b; /* finished rows leave the batch */
        }
        n = k;
    }
    rc = 0;
done:
    if (kv)
        for (size_t b = 0; b < B; b++) tk_llama_kv_free(kv[b]);
    free(kv);
    free(act);
    free(row);
    free(next);
    free(logits);
    tk_llama_rows_free(rows);
    return rc;
}
