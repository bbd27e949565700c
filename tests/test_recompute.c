/* test_recompute.c: activation recomputation and the attention kernel choice of the LLaMA training
 * step (tk_llama_mem_opts, llama.h).
 *
 * One random model (3 layers, grouped-query heads, padding in the batch, LoRA with dropout on every
 * projection, TS gate with thresholds that drop some tokens) runs forward, loss and backward:
 *   * with the first 1, 2 and all layers recomputed: every gradient, the loss, the logits and the gate
 *     statistics (r, c, kept) must be BIT-identical to the run that stores everything (the replayed
 *     forward reuses the dropout masks and records no statistics twice);
 *   * with tiled instead of full attention: the same to 2e-5 relative (a different summation order);
 *   * the activation block must shrink with recomputation and with the tiled kernel;
 *   * with the frozen weights packed (tk_llama_pack_frozen, AVX-512 only), fp32 and BF16-resident: the
 *     same step to 2e-5, recomputation still bit-identical, and merging refused.
 * Exit status 1 on any mismatch, with the largest error printed.
 */
#include "model/llama.h"
#include "ops/ops.h"
#include "tiny_llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NB 2  /* sequences */
#define NT 40 /* positions */

typedef struct {
    double loss;
    float *grad;   /* [params.total] */
    float *logits; /* [NB*NT, V] */
    float *rc;     /* every module's r then c, concatenated */
    size_t n_rc;
    size_t kept, n;
} run_out;

static int fails = 0;

/* 3 layers, LoRA with dropout and the gate on (thresholds that drop tokens: set_thresholds) */
static tk_llama *make_model(int bf16, tk_err *err) { return tiny_llama(3, NT, bf16, 7, 0.1f, 1, err); }

/* Thresholds at the 30% quantile of each module's r (midway between two of them, so that a kernel with
 * another summation order keeps the same tokens) (measured by an ungated forward) on two modules
 * out of three, so the gate drops some tokens. */
static int set_thresholds(tk_llama *m, const int32_t *ids, const uint8_t *mask, tk_err *err) {
    tk_llama_acts *a = tk_llama_acts_alloc(m, NB, NT, err);
    if (!a || tk_llama_forward(m, a, ids, mask, NB, NT, 0, NULL, err)) {
        tk_llama_acts_free(m, a);
        return -1;
    }
    float r[NB * NT];
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if ((l * TK_NPROJ + p) % 3 == 0) continue;
            memcpy(r, L->rr, sizeof r);
            for (size_t i = 1; i < NB * NT; i++)
                for (size_t j = i; j > 0 && r[j - 1] > r[j]; j--) {
                    float t = r[j];
                    r[j] = r[j - 1];
                    r[j - 1] = t;
                }
            size_t q = NB * NT * 3 / 10; /* midway between two r values: no r sits on the threshold */
            L->tau = 0.5f * (r[q - 1] + r[q]);
        }
    tk_llama_acts_free(m, a);
    return 0;
}

/* One forward/loss/backward with the given options; the outputs are copied into o. */
static int run(tk_llama *m, const tk_llama_mem_opts *mo, const int32_t *ids, const uint8_t *mask, run_out *o,
               tk_err *err) {
    size_t N = (size_t)NB * NT, V = (size_t)m->cfg.vocab_size;
    tk_llama_acts *a = tk_llama_acts_alloc_ex(m, NB, NT, mo, err);
    if (!a) return -1;
    tk_params_zero_grad(&m->params);
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) tk_gate_stats_reset(&m->layers[l].proj[p].stats);
    tk_rng rng;
    tk_rng_seed(&rng, 99); /* the same dropout masks in every run */
    size_t count = 0;
    if (tk_llama_forward(m, a, ids, mask, NB, NT, 1, &rng, err)) goto fail;
    memcpy(o->logits, a->logits, N * V * sizeof(float));
    o->loss = tk_llama_loss(m, a, ids, NB, NT, 1.0f / (float)N, &count);
    if (tk_llama_backward(m, a, NB, NT, err)) goto fail;
    memcpy(o->grad, m->params.grad, m->params.total * sizeof(float));
    o->n_rc = o->kept = o->n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_gate_stats *st = &m->layers[l].proj[p].stats;
            if (st->n_c != st->n) {
                tk_fail(err, "layer %d proj %d: %zu r values but %zu c values", l, p, st->n, st->n_c);
                goto fail;
            }
            memcpy(o->rc + o->n_rc, st->r, st->n * sizeof(float));
            memcpy(o->rc + o->n_rc + st->n, st->c, st->n * sizeof(float));
            o->n_rc += 2 * st->n;
            o->kept += st->kept;
            o->n += st->n;
        }
    tk_llama_acts_free(m, a);
    return 0;
fail:
    tk_llama_acts_free(m, a);
    return -1;
}

/* Largest |a-b| / max|b| over n values (NaN -> inf). */
static double rel(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d != d) return INFINITY;
        num = d > num ? d : num;
        den = fabs((double)b[i]) > den ? fabs((double)b[i]) : den;
    }
    return den > 0.0 ? num / den : num;
}

static void compare(const char *what, const run_out *got, const run_out *ref, size_t n_grad, size_t n_logits,
                    int exact, double tol) {
    int ok;
    double eg = rel(got->grad, ref->grad, n_grad), el = rel(got->logits, ref->logits, n_logits);
    double er = got->n_rc == ref->n_rc ? rel(got->rc, ref->rc, ref->n_rc) : INFINITY;
    double eloss = fabs(got->loss - ref->loss) / fabs(ref->loss);
    if (exact)
        ok = got->loss == ref->loss && memcmp(got->grad, ref->grad, n_grad * sizeof(float)) == 0 &&
             memcmp(got->logits, ref->logits, n_logits * sizeof(float)) == 0 && got->n_rc == ref->n_rc &&
             memcmp(got->rc, ref->rc, ref->n_rc * sizeof(float)) == 0;
    else
        ok = eg <= tol && el <= tol && er <= 10 * tol && eloss <= tol;
    ok = ok && got->kept == ref->kept && got->n == ref->n;
    printf("%s %-34s grad %.2g logits %.2g r,c %.2g loss %.2g kept %zu/%zu (ref %zu/%zu)%s\n", ok ? "ok  " : "FAIL",
           what, eg, el, er, eloss, got->kept, got->n, ref->kept, ref->n, exact ? " [bitwise]" : "");
    if (!ok) fails++;
}

int main(void) {
    tk_set_threads(2);
    tk_err err = {0};
    tk_llama *m = make_model(0, &err);
    if (!m) {
        fprintf(stderr, "test_recompute: %s\n", err.msg);
        return 1;
    }
    size_t N = (size_t)NB * NT, V = (size_t)m->cfg.vocab_size;
    int32_t ids[NB * NT];
    uint8_t mask[NB * NT];
    tk_rng rng;
    tk_rng_seed(&rng, 5);
    for (size_t i = 0; i < N; i++) {
        ids[i] = (int32_t)(tk_rng_u64(&rng) % V);
        mask[i] = !(i >= NT && i % NT >= 29); /* the second row is padded after 29 positions */
    }
    if (set_thresholds(m, ids, mask, &err)) {
        fprintf(stderr, "test_recompute: %s\n", err.msg);
        return 1;
    }
    size_t n_rc = 2 * N * 3 * TK_NPROJ;
    run_out r[6];
    for (int i = 0; i < 6; i++) {
        r[i].grad = calloc(m->params.total, sizeof(float));
        r[i].logits = calloc(N * V, sizeof(float));
        r[i].rc = calloc(n_rc, sizeof(float));
        if (!r[i].grad || !r[i].logits || !r[i].rc) {
            fprintf(stderr, "test_recompute: out of memory\n");
            return 1;
        }
    }
    const tk_llama_mem_opts opts[6] = {
        {TK_ATTN_FULL, 0}, {TK_ATTN_FULL, 1}, {TK_ATTN_FULL, 2}, {TK_ATTN_FULL, -1}, {TK_ATTN_TILED, 0}, {TK_ATTN_TILED, -1},
    };
    for (int i = 0; i < 6; i++)
        if (run(m, &opts[i], ids, mask, &r[i], &err)) {
            fprintf(stderr, "test_recompute: run %d: %s\n", i, err.msg);
            return 1;
        }
    if (r[0].kept == r[0].n || r[0].kept == 0) {
        printf("FAIL the thresholds should drop some but not all tokens (kept %zu of %zu)\n", r[0].kept, r[0].n);
        fails++;
    }
    size_t ng = m->params.total, nl = N * V;
    compare("recompute 1 (full attention)", &r[1], &r[0], ng, nl, 1, 0);
    compare("recompute 2 (full attention)", &r[2], &r[0], ng, nl, 1, 0);
    compare("recompute all (full attention)", &r[3], &r[0], ng, nl, 1, 0);
    compare("tiled attention", &r[4], &r[0], ng, nl, 0, 2e-5);
    compare("recompute all, tiled attention", &r[5], &r[4], ng, nl, 1, 0);

    /* the activation block shrinks: recomputation keeps one layer's set, tiling drops [B,H,T,T] */
    size_t full = tk_llama_acts_bytes(m, NB, NT, &opts[0]), rec = tk_llama_acts_bytes(m, NB, NT, &opts[3]);
    size_t tiled = tk_llama_acts_bytes(m, NB, NT, &opts[4]);
    int shrink = rec < full && tiled < full && rec > 0;
    printf("%s activation bytes: stored %zu, recompute all %zu, tiled %zu\n", shrink ? "ok  " : "FAIL", full, rec, tiled);
    fails += !shrink;

    tk_err e2 = {0};
    int v;
    tk_attn_mode am;
    int parse_ok = tk_recompute_parse("all", &v, &e2) == 0 && v == -1 && tk_recompute_parse("3", &v, &e2) == 0 &&
                   v == 3 && tk_recompute_parse("x", &v, &e2) == -1 && tk_recompute_parse("-2", &v, &e2) == -1 &&
                   tk_attn_mode_parse("tiled", &am, &e2) == 0 && am == TK_ATTN_TILED &&
                   tk_attn_mode_parse("flash", &am, &e2) == -1 && strstr(e2.msg, "--attention");
    printf("%s option parsing\n", parse_ok ? "ok  " : "FAIL");
    fails += !parse_ok;

    /* frozen weights in the packed kernel's layout (AVX-512 only): the same step to 2e-5 (another
     * summation order), recomputation still bit-identical, and merging refused */
    if (tk_linear_packed_available()) {
        int np = tk_llama_pack_frozen(m, &err);
        int n_expect = 3 * TK_NPROJ + 1; /* every projection and the untied lm_head */
        printf("%s packed %d frozen matrices (expect %d)\n", np == n_expect ? "ok  " : "FAIL", np, n_expect);
        fails += np != n_expect;
        if (np > 0 && (run(m, &opts[0], ids, mask, &r[1], &err) || run(m, &opts[3], ids, mask, &r[2], &err))) {
            fprintf(stderr, "test_recompute: packed run: %s\n", err.msg);
            return 1;
        }
        compare("packed frozen weights", &r[1], &r[0], ng, nl, 0, 2e-5);
        compare("packed, recompute all", &r[2], &r[1], ng, nl, 1, 0);
        tk_err me = {0};
        int refused = tk_llama_merge(m, ".", "/nonexistent", &me) == -1 && strstr(me.msg, "layout");
        printf("%s merge refused after packing: %s\n", refused ? "ok  " : "FAIL", me.msg);
        fails += !refused;
        /* BF16-resident weights packed as BF16: the same step as the unpacked BF16 path, to 2e-5 */
        tk_llama *mb = make_model(1, &err);
        if (!mb || set_thresholds(mb, ids, mask, &err) || run(mb, &opts[0], ids, mask, &r[3], &err)) {
            fprintf(stderr, "test_recompute: BF16 model: %s\n", err.msg);
            return 1;
        }
        int nb = tk_llama_pack_frozen(mb, &err);
        printf("%s packed %d frozen BF16 matrices (expect %d)\n", nb == n_expect ? "ok  " : "FAIL", nb, n_expect);
        fails += nb != n_expect;
        if (nb > 0 && run(mb, &opts[0], ids, mask, &r[4], &err)) {
            fprintf(stderr, "test_recompute: packed BF16 run: %s\n", err.msg);
            return 1;
        }
        compare("packed BF16 frozen weights", &r[4], &r[3], ng, nl, 0, 2e-5);
        tk_llama_close(mb);
    } else {
        printf("skip packed frozen weights: no AVX-512F or TSPEFT_PACKED=0\n");
    }

    for (int i = 0; i < 6; i++) {
        free(r[i].grad);
        free(r[i].logits);
        free(r[i].rc);
    }
    tk_llama_close(m);
    printf("%s\n", fails ? "FAILED" : "all passed");
    return fails ? 1 : 0;
}
