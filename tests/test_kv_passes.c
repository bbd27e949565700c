/* test_kv_passes.c: KV-cached steps of many tokens (model/llama.c): a step runs in passes of at most
 * 512 tokens, on the full attention kernel or, for a tiled cache (tk_llama_kv_alloc_ex), on the tiled
 * one (no [n,S] matrix per head). Every step's next-token logits must match the training forward
 * (full attention, one pass) of the same prefix at its last position, to 1e-4 of the largest logit
 * (at least 1):
 *   * a tiled cache (1103 positions): a 1100-token prompt in one step (passes of 512, 512, 76), then
 *     three single tokens (the full kernel, one probs row per head);
 *   * the same cache filled by steps of 300 and 800 tokens (passes that start past position 0);
 *   * an AUTO cache (702 positions: the full kernel at this size): a 600-token prompt (passes of 512
 *     and 88), then two single tokens;
 * and a step past the cache's max_chunk or its length is refused with the cache unchanged. AUTO
 * chooses the full kernel while a pass's softmax weights fit in 128 MiB (702 positions here) and the
 * tiled one beyond (16400 positions, 4 heads, passes of 512: 33.6M floats).
 * The model: 2 layers, grouped-query heads, LoRA on every projection with a random state (no gate).
 * Exit status 1 on any mismatch, with the largest error printed.
 */
#include "model/llama.h"
#include "tiny_llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NMAX 1103

static int fails = 0;

/* 2 layers, no dropout, no gate; positions up to 16400 (the AUTO check allocates a cache this long) */
static tk_llama *make_model(tk_err *err) { return tiny_llama(2, 16400, 0, 5, 0.0f, 0, err); }

/* The training forward's logits at position n-1 of ids[0..n), full attention, into ref [V]. */
static int forward_last(tk_llama *m, const int32_t *ids, size_t n, float *ref, tk_err *err) {
    tk_llama_mem_opts mo = {TK_ATTN_FULL, 0};
    tk_llama_acts *a = tk_llama_acts_alloc_ex(m, 1, n, &mo, err);
    if (!a || tk_llama_forward(m, a, ids, NULL, 1, n, 0, NULL, err)) {
        tk_llama_acts_free(m, a);
        return -1;
    }
    size_t V = (size_t)m->cfg.vocab_size;
    memcpy(ref, a->logits + (n - 1) * V, V * sizeof(float));
    tk_llama_acts_free(m, a);
    return 0;
}

/* One step of ids[len..len+n) on kv, checked against the forward of ids[0..len+n). */
static void step_and_check(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, size_t n, const char *what) {
    tk_err err = {0};
    size_t V = (size_t)m->cfg.vocab_size, len = tk_llama_kv_len(kv);
    float got[64], ref[64];
    if (tk_llama_step(m, kv, ids + len, n, got, &err) || forward_last(m, ids, len + n, ref, &err)) {
        printf("FAIL %s: %s\n", what, err.msg);
        fails++;
        return;
    }
    double e = 0.0, big = 0.0;
    for (size_t v = 0; v < V; v++) {
        double d = fabs((double)got[v] - ref[v]);
        e = d > e || d != d ? d : e;
        big = fabs(ref[v]) > big ? fabs(ref[v]) : big;
    }
    int ok = e <= 1e-4 * (big > 1.0 ? big : 1.0) && tk_llama_kv_len(kv) == len + n;
    printf("%s %-52s positions %4zu..%4zu  max |logit error| %.2g (largest logit %.3g)\n", ok ? "ok  " : "FAIL", what,
           len, len + n - 1, e, big);
    fails += !ok;
}

int main(void) {
    tk_err err = {0};
    tk_llama *m = make_model(&err);
    if (!m) {
        printf("FAIL model: %s\n", err.msg);
        return 1;
    }
    int32_t ids[NMAX];
    tk_rng rng;
    tk_rng_seed(&rng, 8);
    for (size_t i = 0; i < NMAX; i++) ids[i] = (int32_t)(tk_rng_u64(&rng) % 64u);

    tk_llama_kv *kv = tk_llama_kv_alloc_ex(m, NMAX, 1100, TK_ATTN_TILED, &err);
    if (!kv) {
        printf("FAIL kv alloc: %s\n", err.msg);
        return 1;
    }
    if (!tk_llama_kv_tiled(kv)) {
        printf("FAIL a TK_ATTN_TILED cache does not say tiled\n");
        fails++;
    }
    step_and_check(m, kv, ids, 1100, "tiled cache, 1100-token prompt (tiled, 3 passes)");
    for (int i = 0; i < 3; i++) step_and_check(m, kv, ids, 1, "tiled cache, one token (full kernel)");

    /* refusals leave the cache as it was */
    float lg[64];
    size_t len = tk_llama_kv_len(kv);
    int refused = tk_llama_step(m, kv, ids, 1, lg, &err) != 0 && tk_llama_kv_len(kv) == len; /* full */
    tk_llama_kv_reset(kv);
    refused &= tk_llama_step(m, kv, ids, 1101, lg, &err) != 0 && tk_llama_kv_len(kv) == 0; /* > max_chunk */
    printf("%s steps past the cache's length or max_chunk refused, cache unchanged (%s)\n", refused ? "ok  " : "FAIL",
           err.msg);
    fails += !refused;

    step_and_check(m, kv, ids, 300, "tiled cache, a 300-token step");
    step_and_check(m, kv, ids, 800, "tiled cache, then 800 (passes from position 300)");
    tk_llama_kv_free(kv);

    if (!(kv = tk_llama_kv_alloc(m, 702, 600, &err))) {
        printf("FAIL kv alloc: %s\n", err.msg);
        return 1;
    }
    step_and_check(m, kv, ids, 600, "auto cache, 600-token prompt (full, 2 passes)");
    for (int i = 0; i < 2; i++) step_and_check(m, kv, ids, 1, "auto cache, one token");
    int small_full = !tk_llama_kv_tiled(kv);
    tk_llama_kv_free(kv);
    tk_llama_kv *big = tk_llama_kv_alloc(m, 16400, 16400, &err), *one = tk_llama_kv_alloc(m, 16400, 1, &err);
    int ok = small_full && big && tk_llama_kv_tiled(big) && one && !tk_llama_kv_tiled(one);
    printf("%s AUTO: full kernel at 702 positions, tiled at 16400 (passes of 512), full for one-token steps\n",
           ok ? "ok  " : "FAIL");
    fails += !ok;
    tk_llama_kv_free(big);
    tk_llama_kv_free(one);
    tk_llama_close(m);
    printf(fails ? "FAILED (%d)\n" : "all passed\n", fails);
    return fails ? 1 : 0;
}
