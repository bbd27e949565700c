/* loglik.c: see loglik.h. Shapes: B sequences, T positions (the longest), V vocabulary. */
#include "loglik.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct tk_loglik {
    tk_llama *m;
    tk_llama_acts *a; /* for Bmax x Tmax */
    size_t Bmax, Tmax;
    int32_t *ids;     /* [Bmax*Tmax] */
    uint8_t *mask;    /* [Bmax*Tmax] */
};

tk_loglik *tk_loglik_new(tk_llama *m, tk_err *err) {
    tk_loglik *ll = calloc(1, sizeof *ll);
    if (!ll) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    ll->m = m;
    return ll;
}

void tk_loglik_free(tk_loglik *ll) {
    if (!ll) return;
    tk_llama_acts_free(ll->m, ll->a);
    free(ll->ids);
    free(ll->mask);
    free(ll);
}

static int grow(tk_loglik *ll, size_t B, size_t T, tk_err *err) {
    if (ll->a && B <= ll->Bmax && T <= ll->Tmax) return 0;
    size_t nB = B > ll->Bmax ? B : ll->Bmax, nT = T > ll->Tmax ? T : ll->Tmax;
    if (nT > (size_t)ll->m->cfg.max_seq_len)
        return tk_fail(err, "a sequence of %zu tokens exceeds max_position_embeddings %d", nT,
                       ll->m->cfg.max_seq_len);
    tk_llama_acts_free(ll->m, ll->a);
    free(ll->ids);
    free(ll->mask);
    ll->a = NULL;
    ll->ids = calloc(nB * nT, sizeof *ll->ids);
    ll->mask = calloc(nB * nT, 1);
    ll->Bmax = ll->Tmax = 0;
    if (!ll->ids || !ll->mask) return tk_fail(err, "out of memory");
    if (!(ll->a = tk_llama_acts_alloc(ll->m, nB, nT, err))) return -1;
    ll->Bmax = nB;
    ll->Tmax = nT;
    return 0;
}

int tk_loglik_score(tk_loglik *ll, const int32_t *const *seqs, const size_t *lens, const size_t *begins,
                    size_t B, double *out, int *greedy, tk_err *err) {
    size_t V = (size_t)ll->m->cfg.vocab_size, T = 0;
    if (B == 0) return 0;
    for (size_t b = 0; b < B; b++) {
        if (begins[b] < 1 || begins[b] >= lens[b])
            return tk_fail(err, "candidate %zu: continuation [%zu, %zu) is empty or has no context", b, begins[b],
                           lens[b]);
        for (size_t t = 0; t < lens[b]; t++)
            if (seqs[b][t] < 0 || (size_t)seqs[b][t] >= V)
                return tk_fail(err, "candidate %zu: token id %d at position %zu is outside the vocabulary [0, %zu)",
                               b, seqs[b][t], t, V);
        if (lens[b] > T) T = lens[b];
    }
    if (grow(ll, B, T, err)) return -1;
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < T; t++) {
            int real = t < lens[b];
            ll->ids[b * T + t] = real ? seqs[b][t] : 0;
            ll->mask[b * T + t] = (uint8_t)real;
        }
    if (tk_llama_forward(ll->m, ll->a, ll->ids, ll->mask, B, T, 0, NULL, err)) return -1;
    const float *logits = ll->a->logits; /* [B*T, V] */
    for (size_t b = 0; b < B; b++) {
        double sum = 0.0;
        int all_greedy = 1;
        for (size_t t = begins[b]; t < lens[b]; t++) {
            const float *row = logits + (b * T + t - 1) * V;
            size_t arg = 0;
            for (size_t v = 1; v < V; v++)
                if (row[v] > row[arg]) arg = v;
            double s = 0.0, mx = row[arg];
            for (size_t v = 0; v < V; v++) s += exp((double)row[v] - mx);
            sum += (double)row[seqs[b][t]] - (mx + log(s));
            all_greedy &= arg == (size_t)seqs[b][t];
        }
        out[b] = sum;
        if (greedy) greedy[b] = all_greedy;
    }
    return 0;
}
