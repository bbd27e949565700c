/* test_gatelog_tower.c: the gate recorder with vision tower modules (analysis/gatelog.h, docs/gates.md).
 *
 * A tiny gated LLaMA (1 layer, LoRA on its 7 projections) and 3 tower modules (tk_adapted_linear with
 * hand-set gate decisions S, ratios r and statistics: layer 0 q_proj, layer 1 fc1 and fc2) are
 * recorded for two optimizer steps, step 1 of two micro-batches (9 tower rows), step 2 of one (4 rows).
 * Checked against counts recomputed here from the modules' S and r after each micro-batch:
 * (1) the header lists the LLaMA's modules, then the tower's under the config's prefix, with
 *     "tower_layers"; each step line's "n" (the LLaMA's valid tokens by kind) and "n_tower" ([0,0,N,0]),
 *     kept counts, tau applied in the step, r quantiles and histograms of every module;
 *     train_log.jsonl's keep weighs each module by its own tokens; the token view counts the
 *     LLaMA's modules only.
 * (2) the report (tk_gaterun_load + tk_gatesum_compute) and tk_gatesel_read give every module's keep
 *     over its own tokens, and the selectivity recomputed here with per-module token counts.
 * (3) a recorder with tower modules only (a bare LLaMA), whose tower batch comes without a LLaMA
 *     batch: "n" is zero, "n_tower" holds the rows, the report reads it.
 * (4) tk_gatesel_read refuses an "n_tower" of the wrong length and a tower kept count above "n_tower",
 *     naming the file.
 * Exits 1 if any check fails.
 */
#define TEST_NAME "test_gatelog_tower"
#define TEST_SEED 0x70be71a6ull
#include "test_util.h"

#include "../datasets/shard.h"
#include "analysis/gatelog.h"
#include "analysis/gatereport.h"
#include "tiny_llama.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define K TK_GATELOG_NKIND
#define NB TK_GATELOG_NBIN
#define NT 3            /* tower modules */
#define ML TK_NPROJ     /* the LLaMA's modules (1 layer) */
#define MM (ML + NT)
#define B 2
#define T 6

static const int t_layer[NT] = {0, 1, 1}, t_proj[NT] = {0, 4, 5}; /* q_proj, fc1, fc2 */
static const char *const t_names[NT] = {"vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
                                        "vision_tower.vision_model.encoder.layers.1.mlp.fc1",
                                        "vision_tower.vision_model.encoder.layers.1.mlp.fc2"};

/* What the recorder should have written for one step, recomputed here. */
typedef struct {
    double n[K], n_tower[K];
    double kept[MM][K];
    double hist[MM][NB];
    float tau[MM];
} expect;

static int kind_col(uint8_t k) {
    return k == TK_KIND_PROMPT ? 0 : k == TK_KIND_RESPONSE ? 1 : k == TK_KIND_IMAGE ? 2 : 3;
}

/* A fake tower module that holds up to cap rows. */
static void tower_init(tk_adapted_linear *L, size_t cap) {
    memset(L, 0, sizeof *L);
    L->kind = TK_ADAPTER_LORA;
    L->gated = 1;
    L->cap = cap;
    L->S = xalloc(cap, 1);
    L->rr = falloc(cap);
}

static void tower_free(tk_adapted_linear *L) {
    free(L->S);
    free(L->rr);
    tk_gate_stats_free(&L->stats);
}

/* The tower's forward over `rows` rows, as the recorder sees it: r_i, S_i = [r_i >= tau] (module 2
 * keeps nothing in step 2: its tau is above every r), statistics pushed. */
static void tower_forward(tk_adapted_linear *tw, size_t rows, expect *e) {
    tk_err err = {0};
    for (int k = 0; k < NT; k++) {
        tk_adapted_linear *L = &tw[k];
        for (size_t i = 0; i < rows; i++) {
            L->rr[i] = rnd(0.0f, 1.0f) * (k == 1 ? 20.0f : 0.5f); /* module 1's r spread over more bins */
            L->S[i] = L->rr[i] >= L->tau;
            TK_ASSERT(tk_gate_stats_push_r(&L->stats, L->rr[i], L->S[i], &err) == 0);
            e->kept[ML + k][2] += L->S[i];
            e->hist[ML + k][tk_gatelog_bin(L->rr[i])]++;
        }
    }
    e->n_tower[2] += (double)rows;
}

/* One LLaMA micro-batch: ids, a padded second row, prompt / response kinds; counts from S and r. */
static void llm_forward(tk_llama *m, tk_llama_acts *a, int32_t *ids, uint8_t *mask, uint8_t *kinds, tk_rng *rng,
                        expect *e) {
    tk_err err = {0};
    for (size_t i = 0; i < B * T; i++) {
        ids[i] = (int32_t)(rnd(0.0f, 1.0f) * 63.0f) + 1;
        mask[i] = !(i >= T && i % T >= 4); /* row 1 has 4 real tokens */
        kinds[i] = mask[i] ? (i % T < 2 ? TK_KIND_PROMPT : TK_KIND_RESPONSE) : TK_KIND_PAD;
    }
    a->kinds = kinds;
    TK_ASSERT(tk_llama_forward(m, a, ids, mask, B, T, 1, rng, &err) == 0);
    for (size_t i = 0; i < B * T; i++)
        if (mask[i]) e->n[kind_col(kinds[i])]++;
    for (int p = 0; p < ML; p++) {
        const tk_adapted_linear *L = &m->layers[0].proj[p];
        for (size_t i = 0; i < B * T; i++)
            if (mask[i]) {
                e->kept[p][kind_col(kinds[i])] += L->S[i];
                e->hist[p][tk_gatelog_bin(L->rr[i])]++;
            }
    }
}

static int same_list(const cJSON *a, const double *want, size_t n) {
    if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != n) return 0;
    for (size_t i = 0; i < n; i++) {
        const cJSON *x = cJSON_GetArrayItem(a, (int)i);
        if (!cJSON_IsNumber(x) || x->valuedouble != want[i]) return 0;
    }
    return 1;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* p10 / p50 / p90 of a module's statistics (ranks floor(q (n-1))) equal the line's "q" entry. */
static int same_quantiles(const cJSON *q, const tk_gate_stats *st) {
    if (!cJSON_IsArray(q) || cJSON_GetArraySize(q) != 3 || st->n == 0) return 0;
    float *v = falloc(st->n);
    memcpy(v, st->r, st->n * sizeof(float));
    qsort(v, st->n, sizeof(float), cmp_float);
    const double qs[3] = {0.1, 0.5, 0.9};
    int ok = 1;
    for (int j = 0; j < 3; j++) {
        double want = v[(size_t)floor(qs[j] * (double)(st->n - 1))];
        ok &= fabs(cJSON_GetArrayItem(q, j)->valuedouble - want) <= 1e-6 * fabs(want) + 1e-12;
    }
    free(v);
    return ok;
}

static char *read_text(const char *path) {
    size_t len;
    tk_err err = {0};
    char *t = tk_read_file(path, &len, &err);
    TK_ASSERT(t != NULL);
    return t;
}

/* Line i (0-based) of text as a cJSON object (NULL past the end). */
static cJSON *line_json(const char *text, int i) {
    const char *p = text;
    for (int k = 0; k < i && p; k++) {
        p = strchr(p, '\n');
        if (p) p++;
    }
    if (!p || !*p) return NULL;
    const char *e = strchr(p, '\n');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    char *s = xalloc(n + 1, 1);
    memcpy(s, p, n);
    cJSON *o = cJSON_Parse(s);
    free(s);
    return o;
}

static double sum(const double *x, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += x[i];
    return s;
}

/* The step line against the expectation. */
static void check_line(const cJSON *o, const expect *e, tk_adapted_linear *const *mods, int step) {
    char name[128];
    snprintf(name, sizeof name, "step %d: \"n\" (the LLaMA's valid tokens by kind)", step);
    report_bool(name, same_list(cJSON_GetObjectItem(o, "n"), e->n, K));
    snprintf(name, sizeof name, "step %d: \"n_tower\" == [0,0,%.0f,0]", step, e->n_tower[2]);
    report_bool(name, same_list(cJSON_GetObjectItem(o, "n_tower"), e->n_tower, K));
    const cJSON *kept = cJSON_GetObjectItem(o, "kept"), *hist = cJSON_GetObjectItem(o, "hist"),
                *tau = cJSON_GetObjectItem(o, "tau"), *q = cJSON_GetObjectItem(o, "q");
    int ok_k = cJSON_GetArraySize(kept) == MM, ok_h = cJSON_GetArraySize(hist) == MM, ok_t = cJSON_GetArraySize(tau) == MM;
    int ok_q = cJSON_GetArraySize(q) == MM;
    for (int m = 0; m < MM && ok_k && ok_h && ok_t && ok_q; m++) {
        ok_k &= same_list(cJSON_GetArrayItem(kept, m), e->kept[m], K);
        ok_h &= same_list(cJSON_GetArrayItem(hist, m), e->hist[m], NB);
        ok_t &= fabs(cJSON_GetArrayItem(tau, m)->valuedouble - e->tau[m]) <= 1e-6 * fabs(e->tau[m]);
        ok_q &= same_quantiles(cJSON_GetArrayItem(q, m), &mods[m]->stats);
    }
    snprintf(name, sizeof name, "step %d: kept counts of all %d modules (tower: image column)", step, MM);
    report_bool(name, ok_k);
    snprintf(name, sizeof name, "step %d: histograms (tower modules: of their own rows)", step);
    report_bool(name, ok_h);
    snprintf(name, sizeof name, "step %d: tau applied in the step", step);
    report_bool(name, ok_t);
    snprintf(name, sizeof name, "step %d: r quantiles from each module's statistics", step);
    report_bool(name, ok_q);
}

/* The selectivity of window sums, recomputed here: per-module token counts own[M,K]. */
static void want_selectivity(tk_gatesel *s, const double own[MM][K], const double kept[MM][K]) {
    double w_all = 0, w_in = 0, w_sp = 0, kk[K] = {0}, kn[K] = {0};
    memset(s, 0, sizeof *s);
    s->kind_spread_max = -1;
    for (int m = 0; m < MM; m++) {
        double tok = sum(own[m], K), keep = sum(kept[m], K) / tok, lo = 2, hi = -1;
        for (int j = 0; j < K; j++) {
            kk[j] += kept[m][j];
            kn[j] += own[m][j];
            if (own[m][j] > 0) {
                lo = fmin(lo, kept[m][j] / own[m][j]);
                hi = fmax(hi, kept[m][j] / own[m][j]);
            }
        }
        if (keep < TK_GATESEL_LO) s->modules_closed++;
        else if (keep > TK_GATESEL_HI) s->modules_open++;
        else {
            s->interior_modules++;
            w_in += tok;
        }
        w_all += tok;
        w_sp += tok * (hi - lo);
        s->kind_spread_max = fmax(s->kind_spread_max, hi - lo);
    }
    double lo = 2, hi = -1;
    for (int j = 0; j < K; j++)
        if (kn[j] > 0) {
            lo = fmin(lo, kk[j] / kn[j]);
            hi = fmax(hi, kk[j] / kn[j]);
            s->kinds |= 1u << j;
        }
    s->modules = MM;
    s->interior_share = w_in / w_all;
    s->kind_spread_mean = w_sp / w_all;
    s->kind_spread_overall = hi - lo;
}

static int close_sel(const tk_gatesel *a, const tk_gatesel *b) {
    return a->modules == b->modules && a->interior_modules == b->interior_modules &&
           a->modules_open == b->modules_open && a->modules_closed == b->modules_closed && a->kinds == b->kinds &&
           fabs(a->interior_share - b->interior_share) <= 1e-12 &&
           fabs(a->kind_spread_mean - b->kind_spread_mean) <= 1e-12 &&
           fabs(a->kind_spread_max - b->kind_spread_max) <= 1e-12 &&
           fabs(a->kind_spread_overall - b->kind_spread_overall) <= 1e-12;
}

static void rm_run(const char *dir) {
    static const char *const files[] = {"gates.jsonl", "train_log.jsonl", "tokens.jsonl", "bad.jsonl"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        remove(p);
    }
}

static void check_llava(const char *dir) {
    tk_err err = {0};
    tk_llama *m = tiny_llama(1, T, 0, 0x7a11, 0.0f, 1, &err);
    TK_ASSERT(m != NULL);
    tk_llama_acts *a = tk_llama_acts_alloc(m, B, T, &err);
    TK_ASSERT(a != NULL);
    int32_t ids[B * T];
    uint8_t mask[B * T], kinds[B * T];
    tk_rng rng;
    tk_rng_seed(&rng, 5);
    /* thresholds that split each module's tokens: r of a probe forward's first token */
    expect probe = {0};
    llm_forward(m, a, ids, mask, kinds, &rng, &probe);
    for (int p = 0; p < ML; p++) {
        tk_adapted_linear *L = &m->layers[0].proj[p];
        L->tau = p == 3 ? 0.0f : L->rr[p % 4]; /* o_proj: tau 0 keeps all */
        tk_gate_stats_reset(&L->stats);
    }
    tk_adapted_linear tw[NT];
    tk_adapted_linear *tmods[NT];
    for (int k = 0; k < NT; k++) {
        tower_init(&tw[k], 16);
        tw[k].tau = 0.2f;
        tmods[k] = &tw[k];
    }
    tk_adapted_linear *mods[MM];
    for (int p = 0; p < ML; p++) mods[p] = &m->layers[0].proj[p];
    for (int k = 0; k < NT; k++) mods[ML + k] = &tw[k];
    tk_gatelog_tower tower = {NT, tmods, t_layer, t_proj, 2, "vision_tower.vision_model."};
    tk_gatelog_opts go = {.token_view_every = 0, .last_step = 2, .append = 0, .tower = &tower};
    tk_gatelog *g = tk_gatelog_open(dir, m, &go, &err);
    TK_ASSERT(g != NULL);

    expect e[2];
    memset(e, 0, sizeof e);
    double keep_log[2];
    for (int step = 1; step <= 2; step++) {
        expect *x = &e[step - 1];
        if (step == 2) tw[2].tau = 100.0f; /* module 2 keeps nothing in step 2 */
        for (int k = 0; k < MM; k++) x->tau[k] = mods[k]->tau;
        int micro = step == 1 ? 2 : 1;
        for (int mb = 0; mb < micro; mb++) {
            llm_forward(m, a, ids, mask, kinds, &rng, x);
            TK_ASSERT(tk_gatelog_batch(g, m, a, B, T, step, &err) == 0);
            tower_forward(tw, step == 1 ? (mb ? 3 : 6) : 4, x);
            TK_ASSERT(tk_gatelog_tower_batch(g, step == 1 ? (mb ? 3 : 6) : 4, step, &err) == 0);
        }
        double kept = 0;
        for (int k = 0; k < MM; k++) kept += sum(x->kept[k], K);
        keep_log[step - 1] = kept / (sum(x->n, K) * ML + sum(x->n_tower, K) * NT);
        TK_ASSERT(tk_gatelog_step(g, m, &(tk_gatelog_step_info){step, 1.0, 1e-3, 1.0, sum(x->n, K), 0.01}, &err) == 0);
        if (step == 1) { /* checked here: the statistics are reset for the next step, as the trainer does */
            char path[512];
            snprintf(path, sizeof path, "%s/gates.jsonl.part", dir);
            char *text = read_text(path);
            cJSON *o = line_json(text, 1);
            TK_ASSERT(o != NULL);
            check_line(o, x, mods, 1);
            cJSON_Delete(o);
            free(text);
        }
        if (step == 2) break;
        for (int k = 0; k < MM; k++) tk_gate_stats_reset(&mods[k]->stats);
        for (int k = 0; k < NT; k++) tw[k].tau += 0.05f; /* a threshold update */
        m->layers[0].proj[0].tau *= 0.5f;
    }
    char path[512];
    snprintf(path, sizeof path, "%s/gates.jsonl", dir);
    TK_ASSERT(tk_gatelog_finish(g, &err) == 0);
    char *text = read_text(path);
    cJSON *h = line_json(text, 0), *o2 = line_json(text, 2);
    TK_ASSERT(h && o2);
    const cJSON *mods_j = cJSON_GetObjectItem(h, "modules");
    int ok = cJSON_GetArraySize(mods_j) == MM &&
             strcmp(cJSON_GetArrayItem(mods_j, 0)->valuestring, "model.layers.0.self_attn.q_proj") == 0 &&
             strcmp(cJSON_GetArrayItem(mods_j, ML - 1)->valuestring, "model.layers.0.mlp.down_proj") == 0;
    for (int k = 0; k < NT && ok; k++) ok &= strcmp(cJSON_GetArrayItem(mods_j, ML + k)->valuestring, t_names[k]) == 0;
    report_bool("header: the LLaMA's 7 modules, then the tower's 3 under the config's prefix", ok);
    report_bool("header: n_layers 1, tower_layers 2",
                cJSON_GetObjectItem(h, "n_layers")->valueint == 1 && cJSON_GetObjectItem(h, "tower_layers") &&
                    cJSON_GetObjectItem(h, "tower_layers")->valueint == 2);
    check_line(o2, &e[1], mods, 2);
    report_bool("step 2: fc2 (tau above every r) kept 0 of 4 rows; step 1: q_proj kept some of 9",
                e[1].kept[ML + 2][2] == 0 && e[1].n_tower[2] == 4 && e[0].kept[ML][2] > 0 && e[0].kept[ML][2] < 9);
    cJSON_Delete(h);
    cJSON_Delete(o2);
    free(text);

    snprintf(path, sizeof path, "%s/train_log.jsonl", dir);
    text = read_text(path);
    ok = 1;
    for (int s = 0; s < 2; s++) {
        cJSON *o = line_json(text, s);
        ok &= o && fabs(cJSON_GetObjectItem(o, "keep")->valuedouble - keep_log[s]) <= 1e-8;
        cJSON_Delete(o);
    }
    printf("  train_log keep %.6f, %.6f\n", keep_log[0], keep_log[1]);
    report_bool("train_log keep = kept / (n x 7 + n_tower x 3): each module over its own tokens", ok);
    free(text);
    snprintf(path, sizeof path, "%s/tokens.jsonl", dir);
    text = read_text(path);
    cJSON *v = line_json(text, 0);
    report_bool("token view at the last step counts the LLaMA's 7 modules only",
                v && cJSON_GetObjectItem(v, "n_modules")->valueint == ML && cJSON_GetObjectItem(v, "step")->valueint == 2);
    cJSON_Delete(v);
    free(text);

    /* (2) the readers */
    double own[MM][K], kept[MM][K];
    for (int k = 0; k < MM; k++)
        for (int j = 0; j < K; j++) {
            own[k][j] = k < ML ? e[0].n[j] + e[1].n[j] : e[0].n_tower[j] + e[1].n_tower[j];
            kept[k][j] = e[0].kept[k][j] + e[1].kept[k][j];
        }
    tk_gaterun *r = tk_gaterun_load(dir, &err);
    if (!r) printf("  (%s)\n", err.msg);
    TK_ASSERT(r != NULL);
    report_bool("report: 10 modules, 3 of them the tower's, 2 steps, n_tower read",
                r->M == MM && r->M_tower == NT && r->S == 2 && r->has_n_tower && r->tower_layers == 2 &&
                    r->proj[ML] == TK_NPROJ + 0 && r->proj[ML + 2] == TK_NPROJ + 5 && r->layer[ML + 1] == 1);
    tk_gatesum sum_;
    TK_ASSERT(tk_gatesum_compute(&sum_, r, 0, &err) == 0);
    ok = 1;
    double kept_all = 0, seen_all = 0;
    for (int k = 0; k < MM; k++) {
        ok &= fabs(sum_.keep[k] - sum(kept[k], K) / sum(own[k], K)) <= 1e-12;
        for (int j = 0; j < K; j++)
            ok &= own[k][j] > 0 ? fabs(sum_.keep_kind[k * K + j] - kept[k][j] / own[k][j]) <= 1e-12
                                : isnan(sum_.keep_kind[k * K + j]);
        kept_all += sum(kept[k], K);
        seen_all += sum(own[k], K);
    }
    report_bool("report: every module's keep (and by kind) over its own tokens", ok);
    report_bool("report: discarded fraction over every module's own tokens; tower tokens 13 image",
                fabs(sum_.discarded_window - (1 - kept_all / seen_all)) <= 1e-12 && sum_.tower_tokens[2] == 13 &&
                    sum_.tower_tokens[0] == 0 && sum_.kind_tokens[2] == 0 &&
                    fabs(sum_.tower_keep[2] - (kept[ML][2] + kept[ML + 1][2] + kept[ML + 2][2]) / 39.0) <= 1e-12);
    tk_gatesel want, got;
    want_selectivity(&want, own, kept);
    int found = 0;
    snprintf(path, sizeof path, "%s/gates.jsonl", dir);
    int rc = tk_gatesel_read(&got, path, 0, &found, &err);
    printf("  selectivity: interior share %.4f (%zu of %zu interior, %zu open, %zu closed), spread mean %.4f\n",
           want.interior_share, want.interior_modules, want.modules, want.modules_open, want.modules_closed,
           want.kind_spread_mean);
    report_bool("report's selectivity == recomputed with per-module token counts", close_sel(&sum_.sel, &want));
    report_bool("tk_gatesel_read == the report's selectivity", rc == 0 && found && close_sel(&got, &sum_.sel) &&
                                                                   got.steps == 2 && got.last_step == 2);
    tk_gatesum_free(&sum_);
    tk_gaterun_free(r);

    for (int k = 0; k < NT; k++) tower_free(&tw[k]);
    tk_gatelog_close(g, 0);
    tk_llama_acts_free(m, a);
    tk_llama_close(m);
    rm_run(dir);
}

/* (3) tower modules only: a LLaMA without adapters, no LLaMA micro-batch recorded. */
static void check_tower_only(const char *dir) {
    tk_err err = {0};
    tk_llama_config c = {0};
    c.dim = 32, c.hidden_dim = 48, c.n_layers = 1, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 8, c.vocab_size = 64;
    c.norm_eps = 1e-5f, c.rope_theta = 10000.0f, c.max_seq_len = T;
    tk_llama *m = tk_llama_random(&c, 3, 0, &err);
    TK_ASSERT(m != NULL);
    tk_adapted_linear tw[NT];
    tk_adapted_linear *tmods[NT];
    for (int k = 0; k < NT; k++) {
        tower_init(&tw[k], 16);
        tw[k].tau = 0.1f;
        tmods[k] = &tw[k];
    }
    tk_gatelog_tower tower = {NT, tmods, t_layer, t_proj, 2, "vision_model."};
    tk_gatelog *g = tk_gatelog_open(dir, m, &(tk_gatelog_opts){.last_step = 1, .tower = &tower}, &err);
    TK_ASSERT(g != NULL);
    expect e = {0};
    tower_forward(tw, 10, &e);
    TK_ASSERT(tk_gatelog_tower_batch(g, 10, 1, &err) == 0);
    TK_ASSERT(tk_gatelog_step(g, m, &(tk_gatelog_step_info){1, 1.0, 1e-3, 1.0, 0, 0.01}, &err) == 0);
    TK_ASSERT(tk_gatelog_finish(g, &err) == 0);
    tk_gatelog_close(g, 0);
    char path[512];
    snprintf(path, sizeof path, "%s/gates.jsonl", dir);
    char *text = read_text(path);
    cJSON *h = line_json(text, 0), *o = line_json(text, 1);
    TK_ASSERT(h && o);
    const double zero[K] = {0, 0, 0, 0}, rows[K] = {0, 0, 10, 0};
    int ok = cJSON_GetArraySize(cJSON_GetObjectItem(h, "modules")) == NT && cJSON_IsTrue(cJSON_GetObjectItem(h, "gated")) &&
             strcmp(cJSON_GetObjectItem(h, "adapter")->valuestring, "lora") == 0 &&
             same_list(cJSON_GetObjectItem(o, "n"), zero, K) && same_list(cJSON_GetObjectItem(o, "n_tower"), rows, K);
    const cJSON *kept = cJSON_GetObjectItem(o, "kept");
    for (int k = 0; k < NT && ok; k++) ok &= same_list(cJSON_GetArrayItem(kept, k), e.kept[ML + k], K);
    report_bool("tower only: 3 modules (adapter and gate from them), n 0, n_tower [0,0,10,0], kept", ok);
    cJSON_Delete(h);
    cJSON_Delete(o);
    free(text);
    tk_gaterun *r = tk_gaterun_load(dir, &err);
    tk_gatesum s;
    ok = r && tk_gatesum_compute(&s, r, 0, &err) == 0;
    for (int k = 0; k < NT && ok; k++) ok &= fabs(s.keep[k] - e.kept[ML + k][2] / 10.0) <= 1e-12;
    report_bool("tower only: the report's keep per module over the 10 rows", ok);
    if (r) tk_gatesum_free(&s);
    tk_gaterun_free(r);
    for (int k = 0; k < NT; k++) tower_free(&tw[k]);
    tk_llama_close(m);

    /* (4) bad lines: tk_gatesel_read names the file */
    snprintf(path, sizeof path, "%s/bad.jsonl", dir);
    static const char *const bad[2] = {
        "{\"step\":1,\"n\":[4,0,0,0],\"n_tower\":[0,0,9],\"tau\":[0,0],\"kept\":[[4,0,0,0],[0,0,9,0]]}\n",
        "{\"step\":1,\"n\":[4,0,0,0],\"n_tower\":[0,0,9,0],\"tau\":[0,0],\"kept\":[[4,0,0,0],[0,0,10,0]]}\n"};
    static const char *const what[2] = {"\"n_tower\" must be a list of 4 counts", "n_tower"};
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(path, "w");
        TK_ASSERT(f != NULL);
        fputs("{\"format\":\"tspeft-gates\",\"version\":1,\"gated\":true,\"n_layers\":1,\"tower_layers\":1,"
              "\"modules\":[\"model.layers.0.self_attn.q_proj\",\"vision_tower.vision_model.encoder.layers.0.mlp.fc1\"]}\n",
              f);
        fputs(bad[i], f);
        TK_ASSERT(fclose(f) == 0);
        tk_gatesel sel;
        int found = 0;
        int rc = tk_gatesel_read(&sel, path, 10, &found, &err);
        printf("  (%s)\n", rc ? err.msg : "accepted");
        report_bool(i ? "read: a tower kept count above n_tower is refused, naming the file"
                      : "read: an n_tower of 3 counts is refused, naming the file",
                    rc == -1 && strstr(err.msg, "bad.jsonl") && strstr(err.msg, what[i]));
    }
    rm_run(dir);
}

int main(void) {
    char dir[] = "/tmp/tk_gatelog_tower_XXXXXX";
    TK_ASSERT(mkdtemp(dir) != NULL);
    check_llava(dir);
    check_tower_only(dir);
    rmdir(dir);
    if (g_failures) printf("%s: %d checks FAILED\n", TEST_NAME, g_failures);
    return g_failures ? 1 : 0;
}
