/* test_step_rows.c: batched decoding (tk_llama_step_rows, model/llama.c) against one sequence at a
 * time (tk_llama_step). B sequences with prompts of different lengths are prefilled one by one; then
 * each decoding step runs the B rows together, and a copy of every row's cache takes the same token
 * alone. The logits and the cache contents must be bit-identical (memcmp), step after step, for
 * B = 1, 2, 5, 7, 16 and 20 (16 rows and more take the LoRA branch's other kernel), with rows that
 * leave the batch on the way (a shrinking batch, the rows in a new order).
 * Models: the tiny LoRA model of tiny_llama.h with the gate on, and a wider one (dim 128, ffn 256,
 * vocabulary 320, LoRA r 8 on every projection, gate on: several 64-wide panels, threaded products)
 * with its frozen matrices packed, fp32 and BF16-resident, and in BF16 compute (--compute bf16, on CPUs
 * with AVX512-BF16). ctest also runs it with TSPEFT_PACKED=0 and
 * TSPEFT_GEMM_SMALL=blas (cblas_sgemm everywhere). A bad step (too many rows, a full cache, a token
 * outside the vocabulary) is refused with the caches unchanged.
 * Exit status 1 on any mismatch.
 */
#include "model/llama.h"
#include "ops/ops.h"
#include "tiny_llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BMAX 20
#define PMAX 23
#define STEPS 6

static int fails = 0;

static tk_llama *wide_llama(int bf16, int compute_bf16, tk_err *err) {
    tk_llama_config c = {0};
    c.dim = 128;
    c.hidden_dim = 256;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 32;
    c.vocab_size = 320;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.max_seq_len = 64;
    tk_llama *m = tk_llama_random(&c, 11, bf16, err);
    if (!m) return NULL;
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_LORA;
    pc.r = 8;
    pc.alpha = 16.0f;
    pc.target_mask = (1u << TK_NPROJ) - 1;
    pc.gate.enabled = 1;
    int rc = tk_llama_attach(m, &pc, NULL, 15, err);
    tk_peft_config_free(&pc);
    m->compute_bf16 = compute_bf16;
    if (rc || tk_llama_pack_frozen(m, err) < 0) {
        tk_llama_close(m);
        return NULL;
    }
    tk_rng rng;
    tk_rng_seed(&rng, 7);
    for (size_t i = 0; i < m->params.total; i++) m->params.data[i] += 0.05f * (2.0f * tk_rng_uniform(&rng) - 1.0f);
    return m;
}

/* B rows through STEPS batched steps against the same rows alone; returns the mismatches. */
static int run(tk_llama *m, size_t B, uint64_t seed, const char *what) {
    tk_err err = {0};
    size_t V = (size_t)m->cfg.vocab_size, S = PMAX + STEPS + 1;
    tk_llama_kv *kv[BMAX] = {0}, *solo[BMAX] = {0}, *act[BMAX];
    tk_llama_rows *rows = tk_llama_rows_alloc(m, B, S, &err);
    float *got = malloc(BMAX * V * sizeof *got), *ref = malloc(V * sizeof *ref);
    int32_t prompt[PMAX], next[BMAX];
    size_t idx[BMAX];
    int bad = 0;
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    if (!rows || !got || !ref) {
        printf("FAIL %s B=%zu: %s\n", what, B, rows ? "out of memory" : err.msg);
        bad = 1;
        goto done;
    }
    for (size_t b = 0; b < B; b++) {
        size_t P = 1 + (size_t)(tk_rng_uniform(&rng) * (PMAX - 1)); /* 1 .. PMAX-1 */
        for (size_t t = 0; t < P; t++) prompt[t] = (int32_t)(tk_rng_uniform(&rng) * (float)V) % (int32_t)V;
        if (!(kv[b] = tk_llama_kv_alloc(m, S, P, &err)) || !(solo[b] = tk_llama_kv_alloc(m, S, P, &err)) ||
            tk_llama_step(m, kv[b], prompt, P, ref, &err) || tk_llama_kv_copy(solo[b], kv[b], 0, &err)) {
            printf("FAIL %s B=%zu prefill: %s\n", what, B, err.msg);
            bad = 1;
            goto done;
        }
        next[b] = (int32_t)(tk_rng_uniform(&rng) * (float)V) % (int32_t)V;
        idx[b] = b;
    }
    size_t n = B;
    for (int s = 0; s < STEPS && n > 0; s++) {
        int32_t ids[BMAX];
        for (size_t i = 0; i < n; i++) act[i] = kv[idx[i]], ids[i] = next[idx[i]];
        if (tk_llama_step_rows(m, rows, act, ids, n, got, &err)) {
            printf("FAIL %s B=%zu step %d: %s\n", what, B, s, err.msg);
            bad = 1;
            goto done;
        }
        for (size_t i = 0; i < n; i++) {
            size_t b = idx[i];
            if (tk_llama_step(m, solo[b], &ids[i], 1, ref, &err)) {
                printf("FAIL %s B=%zu step %d solo: %s\n", what, B, s, err.msg);
                bad = 1;
                goto done;
            }
            if (memcmp(got + i * V, ref, V * sizeof *ref) != 0 || tk_llama_kv_len(kv[b]) != tk_llama_kv_len(solo[b])) {
                size_t v = 0;
                while (v < V && got[i * V + v] == ref[v]) v++;
                printf("FAIL %s B=%zu step %d row %zu (sequence %zu): logit %zu %.9g != %.9g alone\n", what, B, s, i, b,
                       v, v < V ? got[i * V + v] : 0.0, v < V ? ref[v] : 0.0);
                bad = 1;
            }
            next[b] = (int32_t)(tk_rng_uniform(&rng) * (float)V) % (int32_t)V;
        }
        /* rows leave: every third step drops the first row, every other step reverses the order */
        if (s % 3 == 1) memmove(idx, idx + 1, --n * sizeof *idx);
        if (s % 2 == 0)
            for (size_t i = 0; i < n / 2; i++) {
                size_t t = idx[i];
                idx[i] = idx[n - 1 - i], idx[n - 1 - i] = t;
            }
    }
    /* the caches themselves: one more solo step on each pair gives identical logits only if every
     * key and value row matches */
    for (size_t b = 0; b < B && !bad; b++) {
        int32_t t = 1;
        if (tk_llama_step(m, kv[b], &t, 1, got, &err) || tk_llama_step(m, solo[b], &t, 1, ref, &err)) {
            printf("FAIL %s B=%zu final: %s\n", what, B, err.msg);
            bad = 1;
        } else if (memcmp(got, ref, V * sizeof *ref) != 0) {
            printf("FAIL %s B=%zu: the cache of sequence %zu differs\n", what, B, b);
            bad = 1;
        }
    }
    if (!bad) printf("ok   %s B=%zu: %d steps bit-identical\n", what, B, STEPS);
done:
    for (size_t b = 0; b < BMAX; b++) {
        tk_llama_kv_free(kv[b]);
        tk_llama_kv_free(solo[b]);
    }
    tk_llama_rows_free(rows);
    free(got);
    free(ref);
    return bad;
}

/* Refusals: too many rows, a full cache, an id outside the vocabulary; the caches are unchanged. */
static void refusals(tk_llama *m) {
    tk_err err = {0};
    size_t V = (size_t)m->cfg.vocab_size;
    tk_llama_rows *rows = tk_llama_rows_alloc(m, 2, 8, &err);
    tk_llama_kv *a = tk_llama_kv_alloc(m, 4, 3, &err), *b = tk_llama_kv_alloc(m, 8, 3, &err);
    float *lg = malloc(3 * V * sizeof *lg);
    int32_t p[3] = {1, 2, 3}, ids[3] = {4, 5, 6}, badid[2] = {4, (int32_t)V};
    int ok = rows && a && b && lg && !tk_llama_step(m, a, p, 3, lg, &err) && !tk_llama_step(m, b, p, 3, lg, &err);
    tk_llama_kv *two[3] = {a, b, b};
    ok = ok && tk_llama_step_rows(m, rows, two, ids, 3, lg, &err) != 0;          /* 3 rows > 2 */
    ok = ok && tk_llama_step_rows(m, rows, two, badid, 2, lg, &err) != 0;        /* id V */
    ok = ok && tk_llama_kv_len(a) == 3 && tk_llama_kv_len(b) == 3;
    ok = ok && !tk_llama_step_rows(m, rows, two, ids, 2, lg, &err);              /* a reaches 4 of 4 */
    ok = ok && tk_llama_step_rows(m, rows, two, ids, 2, lg, &err) != 0;          /* a is full */
    ok = ok && tk_llama_kv_len(a) == 4 && tk_llama_kv_len(b) == 4;
    if (!ok) {
        printf("FAIL refusals (%s)\n", err.msg);
        fails++;
    } else {
        printf("ok   refusals (last: %s)\n", err.msg);
    }
    free(lg);
    tk_llama_kv_free(a);
    tk_llama_kv_free(b);
    tk_llama_rows_free(rows);
}

int main(void) {
    tk_err err = {0};
    static const size_t Bs[] = {1, 2, 5, 7, 16, 20};
    struct {
        const char *name;
        tk_llama *m;
    } models[4] = {{"tiny gated LoRA", tiny_llama(2, 64, 0, 3, 0.0f, 1, &err)},
                   {"wide gated LoRA, packed fp32", wide_llama(0, 0, &err)},
                   {"wide gated LoRA, packed BF16", wide_llama(1, 0, &err)},
                   {"wide gated LoRA, BF16 compute", tk_bf16dot_available() ? wide_llama(0, 1, &err) : NULL}};
    int nm = models[3].m ? 4 : 3;
    if (nm == 4 && !models[3].m->layers[0].proj[TK_PROJ_Q].w0_dot) {
        printf("FAIL BF16 compute: the frozen weights were not put into the BF16 kernel's panels\n");
        return 1;
    }
    if (nm == 3) printf("skip BF16 compute: this CPU has no AVX512-BF16 (or TSPEFT_BF16DOT=0)\n");
    for (int k = 0; k < nm; k++) {
        if (!models[k].m) {
            printf("FAIL %s: %s\n", models[k].name, err.msg);
            return 1;
        }
        for (size_t i = 0; i < sizeof Bs / sizeof Bs[0]; i++) fails += run(models[k].m, Bs[i], 100 + i, models[k].name);
    }
    refusals(models[0].m);
    for (int k = 0; k < nm; k++) tk_llama_close(models[k].m);
    printf(fails ? "test_step_rows: %d FAILED\n" : "test_step_rows: all passed\n", fails);
    return fails ? 1 : 0;
}
