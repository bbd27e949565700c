/* beam.c: see beam.h. Shapes: nb beams, V vocabulary, P prompt tokens, M = max_new. */
#include "beam.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double score;  /* sum of log-probs + beam score */
    size_t beam;   /* the beam it extends */
    int32_t token;
    size_t flat;   /* beam * V + token: the tie-break */
} cand;

typedef struct {
    double score;   /* normalised */
    int32_t *toks;  /* [M] new tokens (no eos) */
    size_t n;
} hyp;

typedef struct {
    hyp *h;       /* [nb] in insertion order (Python list semantics) */
    size_t n, cap;
    double worst; /* 1e9 while empty, as HF */
} hyp_list;

/* BeamHypotheses.add */
static void hyps_add(hyp_list *L, const int32_t *toks, size_t n, double sum_logprobs, size_t len, double lp) {
    double score = sum_logprobs / pow((double)len, lp);
    if (!(L->n < L->cap || score > L->worst)) return;
    if (L->n == L->cap) {
        /* append, then drop the minimum under (score, index) order, i.e. the first minimal old entry
         * (the new one beat worst, the minimum); worst = the smallest score left */
        size_t lo = 0;
        for (size_t i = 1; i < L->n; i++)
            if (L->h[i].score < L->h[lo].score) lo = i;
        double second = score; /* the appended one is at index n, after all others */
        int have = 0;
        for (size_t i = 0; i <= L->n; i++) {
            if (i == lo) continue;
            double s = i < L->n ? L->h[i].score : score;
            /* second smallest of the list with lo removed, under (score, idx) ordering */
            if (!have || s < second) {
                second = s;
                have = 1;
            }
        }
        int32_t *buf = L->h[lo].toks;
        memmove(L->h + lo, L->h + lo + 1, (L->n - lo - 1) * sizeof *L->h);
        L->h[L->n - 1].toks = buf;
        L->n--;
        L->worst = second;
    } else {
        L->worst = score < L->worst ? score : L->worst;
    }
    hyp *d = &L->h[L->n++];
    d->score = score;
    d->n = n;
    if (n) memcpy(d->toks, toks, n * sizeof *toks);
}

/* BeamHypotheses.is_done with early_stopping=False */
static int hyps_done(const hyp_list *L, double best_sum, size_t cur_len, double lp) {
    if (L->n < L->cap) return 0;
    return L->worst >= best_sum / pow((double)cur_len, lp);
}

/* c sorted best first: higher score, then smaller flat index */
static int cand_before(const cand *a, const cand *b) {
    return a->score > b->score || (a->score == b->score && a->flat < b->flat);
}

/* log_softmax of logits [V] into lp [V], in double */
static void log_softmax(double *lp, const float *logits, size_t V) {
    float mx = logits[0];
    for (size_t v = 1; v < V; v++)
        if (logits[v] > mx) mx = logits[v];
    double s = 0.0;
    for (size_t v = 0; v < V; v++) s += exp((double)logits[v] - mx);
    double lse = (double)mx + log(s);
    for (size_t v = 0; v < V; v++) lp[v] = (double)logits[v] - lse;
}

long tk_beam_search(tk_llama *m, const int32_t *prompt, size_t P, const tk_beam_opts *o, int32_t *out,
                    double *score_out, tk_err *err) {
    size_t nb = o->beams, M = o->max_new, V = (size_t)m->cfg.vocab_size, K = 2 * nb;
    double lpen = o->length_penalty;
    if (nb < 1 || M < 1) return tk_fail(err, "beam search needs beams >= 1 and max_new >= 1");
    if (P == 0) return tk_fail(err, "the prompt is empty");
    if (V < K) return tk_fail(err, "beam search with %zu beams needs a vocabulary of at least %zu", nb, K);
    long result = -1;
    tk_llama_kv **kv = calloc(nb, sizeof *kv);
    tk_llama_kv **act = NULL;
    tk_llama_rows *rows = NULL;
    size_t *phys = calloc(nb, sizeof *phys), *nphys = calloc(nb, sizeof *nphys);
    unsigned char *claimed = calloc(nb, 1), *owned = calloc(nb, 1);
    float *logits = malloc(nb * V * sizeof *logits);
    double *lp = malloc(V * sizeof *lp), *bscore = calloc(nb, sizeof *bscore), *nscore = calloc(nb, sizeof *nscore);
    int32_t *seq = calloc(nb * M, sizeof *seq), *nseq = calloc(nb * M, sizeof *nseq), *ntok = calloc(nb, sizeof *ntok);
    size_t *parent = calloc(nb, sizeof *parent);
    cand *top = malloc(K * sizeof *top);
    hyp_list H = {.h = calloc(nb, sizeof(hyp)), .n = 0, .cap = nb, .worst = 1e9};
    int32_t *hbuf = calloc(nb * M, sizeof *hbuf);
    if (!kv || !phys || !nphys || !claimed || !owned || !logits || !lp || !bscore || !nscore || !seq || !nseq ||
        !ntok || !parent || !top || !H.h || !hbuf) {
        tk_fail(err, "out of memory for beam search");
        goto done;
    }
    for (size_t i = 0; i < nb; i++) H.h[i].toks = hbuf + i * M;
    for (size_t b = 0; b < nb; b++)
        if (!(kv[b] = tk_llama_kv_alloc(m, P + M, b == 0 ? P : 1, err))) goto done;
    if (o->batch && nb > 1 && (!(act = calloc(nb, sizeof *act)) || !(rows = tk_llama_rows_alloc(m, nb, P + M, err)))) {
        if (!act) tk_fail(err, "out of memory for beam search");
        goto done;
    }
    /* the prompt once, then every cache holds it (the shared rows [0, P)) */
    if (tk_llama_step(m, kv[0], prompt, P, logits, err)) goto done;
    for (size_t b = 1; b < nb; b++) {
        tk_llama_kv_reset(kv[b]);
        if (tk_llama_kv_copy(kv[b], kv[0], 0, err)) goto done;
        memcpy(logits + b * V, logits, V * sizeof *logits);
    }
    for (size_t b = 0; b < nb; b++) {
        phys[b] = b;
        bscore[b] = b == 0 ? 0.0 : -1e9;
    }
    int done = 0;
    size_t t = 0; /* tokens in every running beam */
    for (;;) {
        /* top 2*nb candidates over (beam, token), best first */
        size_t nt = 0;
        for (size_t b = 0; b < nb; b++) {
            log_softmax(lp, logits + b * V, V);
            for (size_t v = 0; v < V; v++) {
                cand c = {bscore[b] + lp[v], b, (int32_t)v, b * V + v};
                if (nt == K && !cand_before(&c, &top[K - 1])) continue;
                size_t i = nt < K ? nt++ : K - 1;
                while (i > 0 && cand_before(&c, &top[i - 1])) {
                    top[i] = top[i - 1];
                    i--;
                }
                top[i] = c;
            }
        }
        /* BeamSearchScorer.process */
        size_t cur_len = P + t, nn = 0;
        for (size_t r = 0; r < nt && nn < nb; r++) {
            if (o->eos >= 0 && top[r].token == o->eos) {
                if (r >= nb) continue;
                hyps_add(&H, seq + top[r].beam * M, t, top[r].score, cur_len, lpen);
            } else {
                nscore[nn] = top[r].score;
                ntok[nn] = top[r].token;
                parent[nn] = top[r].beam;
                nn++;
            }
        }
        TK_ASSERT(nn == nb); /* at most nb eos candidates among 2*nb */
        done = done || hyps_done(&H, top[0].score, cur_len, lpen);
        /* the next beams: tokens, scores, caches (the first child of a beam takes over its cache, the
         * others get the cache of a beam without children and copy the generated rows) */
        for (size_t i = 0; i < nb; i++) {
            memcpy(nseq + i * M, seq + parent[i] * M, t * sizeof *seq);
            nseq[i * M + t] = ntok[i];
        }
        memcpy(seq, nseq, nb * M * sizeof *seq);
        memcpy(bscore, nscore, nb * sizeof *bscore);
        t++;
        if (done || t == M) break;
        memset(claimed, 0, nb);
        memset(owned, 0, nb);
        for (size_t i = 0; i < nb; i++) nphys[i] = (size_t)-1;
        for (size_t i = 0; i < nb; i++)
            if (!claimed[parent[i]]) {
                claimed[parent[i]] = 1;
                nphys[i] = phys[parent[i]];
                owned[phys[parent[i]]] = 1;
            }
        for (size_t i = 0, f = 0; i < nb; i++) {
            if (nphys[i] != (size_t)-1) continue;
            while (owned[f]) f++;
            owned[f] = 1;
            nphys[i] = f;
            if (tk_llama_kv_copy(kv[f], kv[phys[parent[i]]], P, err)) goto done;
        }
        memcpy(phys, nphys, nb * sizeof *phys);
        if (rows) { /* the beams as one batch: row i is beam i on its cache */
            for (size_t i = 0; i < nb; i++) act[i] = kv[phys[i]];
            if (tk_llama_step_rows(m, rows, act, ntok, nb, logits, err)) goto done;
        } else {
            for (size_t i = 0; i < nb; i++)
                if (tk_llama_step(m, kv[phys[i]], &ntok[i], 1, logits + i * V, err)) goto done;
        }
    }
    /* BeamSearchScorer.finalize */
    if (!done)
        for (size_t b = 0; b < nb; b++) hyps_add(&H, seq + b * M, t, bscore[b], P + t, lpen);
    size_t best = 0;
    for (size_t i = 1; i < H.n; i++)
        if (H.h[i].score >= H.h[best].score) best = i;
    TK_ASSERT(H.n > 0);
    memcpy(out, H.h[best].toks, H.h[best].n * sizeof *out);
    if (score_out) *score_out = H.h[best].score;
    result = (long)H.h[best].n;
done:
    if (kv)
        for (size_t b = 0; b < nb; b++) tk_llama_kv_free(kv[b]);
    free(kv);
    free(act);
    tk_llama_rows_free(rows);
    free(phys);
    free(nphys);
    free(claimed);
    free(owned);
    free(logits);
    free(lp);
    free(bscore);
    free(nscore);
    free(seq);
    free(nseq);
    free(ntok);
    free(parent);
    free(top);
    free(H.h);
    free(hbuf);
    return result;
}
