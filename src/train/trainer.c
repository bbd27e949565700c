/* trainer.c: see trainer.h. */
#include "trainer.h"

#include "../../datasets/jsonl.h"
#include "../io/safetensors.h"
#include "../model/llama.h"
#include "../analysis/gatelog.h"
#include "adalora_train.h"
#include "checkpoint.h"
#include "multimodal.h"
#include "train_data.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void tk_train_opts_default(tk_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->steps = 100;
    o->batch_size = 1;
    o->grad_accum = 1;
    o->threads = 0;
    o->log_every = 1;
    o->keep_checkpoints = 3;
    o->prefetch = 2;
    o->gate_log = 1;
    o->seed = 42;
    o->lr = 2e-4f;
    o->weight_decay = 0.0f;
    o->max_grad_norm = 1.0f;
    o->sched = TK_SCHED_CONSTANT;
    tk_peft_config_default(&o->peft);
}

/* Every gated module, visited in (layer, projection) order. */
#define FOR_EACH_ADAPTED(m, L, l, p)                                                               \
    for (int l = 0; l < (m)->cfg.n_layers; l++)                                                    \
        for (int p = 0; p < TK_NPROJ; p++)                                                         \
            for (tk_adapted_linear *L = &(m)->layers[l].proj[p]; L; L = NULL)                      \
                if (L->kind != TK_ADAPTER_NONE)

static int make_dir(const char *dir, tk_err *err) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return tk_fail(err, "%s: cannot create directory: %s", dir, strerror(errno));
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return tk_fail(err, "%s: not a directory", dir);
    return 0;
}

/* The threshold step of every gated module (tk_gate_update). With --ts-tau-scope layer, a layer's gated
 * modules share one threshold: their statistics are pooled (r and c of every module's tokens, so N is
 * the layer's token decisions) and the one new tau (and dual lambda) is given to each of them. */
static int update_thresholds(tk_llama *m, int step, tk_gate_stats *pool, tk_err *err) {
    const tk_gate_config *g = &m->peft.gate;
    if (g->scope != TK_TAU_LAYER) {
        FOR_EACH_ADAPTED(m, L, l, p)
            if (L->gated && tk_gate_update(g, &L->stats, step, &L->tau, &L->lambda)) return tk_fail(err, "out of memory in the threshold step");
        return 0;
    }
    for (int l = 0; l < m->cfg.n_layers; l++) {
        tk_adapted_linear *first = NULL;
        tk_gate_stats_reset(pool);
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind == TK_ADAPTER_NONE || !L->gated) continue;
            if (!first) first = L;
            for (size_t i = 0; i < L->stats.n; i++)
                if (tk_gate_stats_push_r(pool, L->stats.r[i], 0, err) || tk_gate_stats_push_c(pool, L->stats.c[i], err))
                    return -1;
            pool->kept += L->stats.kept;
        }
        if (!first) continue;
        float tau = first->tau, lambda = first->lambda;
        if (tk_gate_update(g, pool, step, &tau, &lambda)) return tk_fail(err, "out of memory in the threshold step");
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind == TK_ADAPTER_NONE || !L->gated) continue;
            L->tau = tau;
            L->lambda = lambda;
        }
    }
    return 0;
}

/* ---- the first-step dump ---------------------------------------------------------------------- */

typedef struct {
    tk_st_entry *e;
    char **names;
    void **owned;
    size_t n, cap;
} dump_list;

static int dump_add(dump_list *d, const char *name, tk_dtype dt, int ndim, const int64_t *shape,
                    const void *data, size_t bytes, tk_err *err) {
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        tk_st_entry *e = realloc(d->e, cap * sizeof *e);
        if (e) d->e = e;
        char **nm = realloc(d->names, cap * sizeof *nm);
        if (nm) d->names = nm;
        void **ow = realloc(d->owned, cap * sizeof *ow);
        if (ow) d->owned = ow;
        if (!e || !nm || !ow) return tk_fail(err, "out of memory for the dump");
        d->cap = cap;
    }
    d->names[d->n] = strdup(name);
    d->owned[d->n] = malloc(bytes ? bytes : 1);
    if (!d->names[d->n] || !d->owned[d->n]) return tk_fail(err, "out of memory for the dump");
    memcpy(d->owned[d->n], data, bytes);
    tk_st_entry *e = &d->e[d->n];
    memset(e, 0, sizeof *e);
    e->name = d->names[d->n];
    e->dtype = dt;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->data = d->owned[d->n];
    d->n++;
    return 0;
}

static void dump_free(dump_list *d) {
    for (size_t i = 0; i < d->n; i++) {
        free(d->names[i]);
        free(d->owned[i]);
    }
    free(d->e);
    free(d->names);
    free(d->owned);
}

/* One gated module's keep count, next threshold (and lambda), r and c under its key. */
static int dump_gate(dump_list *d, const char *key, const tk_adapted_linear *L, int with_lambda, tk_err *err) {
    char nm[TK_NAME_MAX + 32];
    int64_t one[1] = {1}, kept = (int64_t)L->stats.kept, nn[1] = {(int64_t)L->stats.n};
    snprintf(nm, sizeof nm, "%s.keep", key);
    if (dump_add(d, nm, TK_DT_I64, 1, one, &kept, sizeof kept, err)) return -1;
    snprintf(nm, sizeof nm, "%s.ts_tau.next", key);
    if (dump_add(d, nm, TK_DT_F32, 1, one, &L->tau, sizeof(float), err)) return -1;
    snprintf(nm, sizeof nm, "%s.ts_r", key);
    if (dump_add(d, nm, TK_DT_F32, 1, nn, L->stats.r, L->stats.n * sizeof(float), err)) return -1;
    snprintf(nm, sizeof nm, "%s.ts_c", key);
    if (dump_add(d, nm, TK_DT_F32, 1, nn, L->stats.c, L->stats.n * sizeof(float), err)) return -1;
    if (with_lambda) {
        snprintf(nm, sizeof nm, "%s.ts_lambda.next", key);
        if (dump_add(d, nm, TK_DT_F32, 1, one, &L->lambda, sizeof(float), err)) return -1;
    }
    return 0;
}

/* Gradients, keep counts, r, c and the new thresholds (the LLaMA's and the tower's gated modules,
 * under their adapter-file keys), once the step's tau update is done. */
static int dump_step(dump_list *d, tk_llama *m, tk_mm *mm, tk_adapted_linear *const *tower, const int *tl,
                     const int *tp, size_t n_tower, float loss, tk_err *err) {
    int64_t one[1] = {1};
    int with_lambda = m->peft.gate.target_keep > 0.0f;
    if (dump_add(d, "loss", TK_DT_F32, 1, one, &loss, sizeof loss, err)) return -1;
    for (size_t i = 0; i < m->params.n; i++) {
        const tk_param *p = &m->params.items[i];
        char nm[TK_NAME_MAX + 8];
        snprintf(nm, sizeof nm, "%s.grad", p->name);
        if (dump_add(d, nm, TK_DT_F32, p->ndim, p->shape, m->params.grad + p->offset, p->numel * sizeof(float), err))
            return -1;
    }
    char key[TK_NAME_MAX];
    FOR_EACH_ADAPTED(m, L, l, p) {
        if (!L->gated) continue;
        tk_module_key(key, sizeof key, l, p);
        if (dump_gate(d, key, L, with_lambda, err)) return -1;
    }
    for (size_t i = 0; i < n_tower; i++) {
        if (!tower[i]->gated) continue;
        tk_mm_tower_key(mm, tl[i], tp[i], key, sizeof key);
        if (dump_gate(d, key, tower[i], with_lambda, err)) return -1;
    }
    return 0;
}

/* ---- outputs ---------------------------------------------------------------------------------- */

/* The effective configuration of a run: saved in every checkpoint and in the summary, and compared
 * on --resume. */
static cJSON *options_json(const tk_train_opts *o) {
    cJSON *c = cJSON_CreateObject();
    if (!c) return NULL;
    cJSON_AddStringToObject(c, "model", o->model_dir);
    if (o->n_data > 1) { /* several datasets (shards): the specs as given */
        cJSON *a = cJSON_AddArrayToObject(c, "data");
        for (int i = 0; i < o->n_data; i++) cJSON_AddItemToArray(a, cJSON_CreateString(o->data_specs[i]));
    } else {
        cJSON_AddStringToObject(c, "data", o->n_data == 1 ? o->data_specs[0] : o->data_path);
    }
    if (o->resume_dir) cJSON_AddStringToObject(c, "resumed_from", o->resume_dir);
    else if (o->adapter_dir) cJSON_AddStringToObject(c, "adapter_init", o->adapter_dir);
    cJSON_AddNumberToObject(c, "steps", o->steps);
    cJSON_AddNumberToObject(c, "batch_size", o->batch_size);
    cJSON_AddNumberToObject(c, "grad_accum", o->grad_accum);
    cJSON_AddNumberToObject(c, "world_size", o->dist ? o->dist->size : 1); /* data-parallel ranks */
    cJSON_AddNumberToObject(c, "max_seq_len", o->max_seq_len);
    cJSON_AddBoolToObject(c, "shuffle", o->shuffle);
    cJSON_AddNumberToObject(c, "shuffle_window", o->shuffle_window);
    cJSON_AddBoolToObject(c, "pack", o->pack);
    cJSON_AddNumberToObject(c, "lr", o->lr);
    cJSON_AddStringToObject(c, "lr_scheduler", tk_sched_name(o->sched));
    cJSON_AddNumberToObject(c, "warmup_steps", o->warmup_steps);
    cJSON_AddNumberToObject(c, "weight_decay", o->weight_decay);
    cJSON_AddNumberToObject(c, "max_grad_norm", o->max_grad_norm);
    if (o->seed <= (1ull << 53)) { /* exact as a JSON number; larger seeds are written as strings */
        cJSON_AddNumberToObject(c, "seed", (double)o->seed);
    } else {
        char seed[32];
        snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
        cJSON_AddStringToObject(c, "seed", seed);
    }
    cJSON_AddNumberToObject(c, "threads", o->threads);
    cJSON_AddStringToObject(c, "compute", o->compute_bf16 ? "bf16" : "fp32");
    cJSON_AddStringToObject(c, "nonfinite", o->skip_nonfinite ? "skip" : "stop");
    if (o->vision_tower) {
        cJSON_AddStringToObject(c, "vision_tower", o->vision_tower);
        cJSON_AddNumberToObject(c, "stage", o->stage ? o->stage : 2);
        cJSON_AddBoolToObject(c, "tune_vision_tower", o->tune_vision_tower);
        if (o->vision_tower_lr > 0.0f) cJSON_AddNumberToObject(c, "vision_tower_lr", o->vision_tower_lr);
        if (o->mm_projector_lr > 0.0f) cJSON_AddNumberToObject(c, "mm_projector_lr", o->mm_projector_lr);
    }
    return c;
}

/* A resumed run must read the same rows in the same order: these keys must match the checkpoint's.
 * JSONL rows are a function of (step, batch size, accumulation, seed); a shard stream only of the
 * data, seed and shuffle options (its cursor continues it under any batch size, length or packing). */
static int check_resume_config(const cJSON *saved, const cJSON *now, const char *dir, int shards, tk_err *err) {
    /* JSONL row order depends on the rows per step (batch x grad-accum x ranks); a shard stream simply
     * continues from its cursor */
    static const char *const jsonl_keys[] = {"data", "batch_size", "grad_accum", "world_size", "max_seq_len", "shuffle", "seed"};
    static const char *const shard_keys[] = {"data", "shuffle", "shuffle_window", "seed"};
    const char *const *must = shards ? shard_keys : jsonl_keys;
    size_t n_must = shards ? sizeof shard_keys / sizeof *shard_keys : sizeof jsonl_keys / sizeof *jsonl_keys;
    for (size_t i = 0; i < n_must; i++) {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(saved, must[i]);
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(now, must[i]);
        if (!a || !b || !cJSON_Compare(a, b, 1)) {
            char *sa = a ? cJSON_PrintUnformatted(a) : NULL, *sb = b ? cJSON_PrintUnformatted(b) : NULL;
            tk_fail(err, "--resume %s: %s is %s in the checkpoint but %s now; resume with the same value", dir,
                    must[i], sa ? sa : "missing", sb ? sb : "missing");
            free(sa);
            free(sb);
            return -1;
        }
    }
    return 0;
}

static int write_summary(const tk_train_opts *o, const char *dir, const tk_llama *m, double final_loss,
                         const tk_train_state *st, tk_err *err) {
    cJSON *root = options_json(o);
    if (!root) return tk_fail(err, "out of memory");
    double first_loss = st->first_loss, last_loss = st->last_loss, secs = st->seconds, tokens = st->tokens;
    cJSON_AddNumberToObject(root, "trainable_parameters", (double)m->params.total);
    cJSON_AddNumberToObject(root, "first_step_loss", first_loss);
    cJSON_AddNumberToObject(root, "last_step_loss", last_loss);
    /* Loss of step 1's micro-batches under the final parameters: reloading the saved adapter and
     * running one step with --lr 0 --dump must reproduce it exactly. */
    cJSON_AddNumberToObject(root, "final_loss_step1_batches", final_loss);
    cJSON_AddNumberToObject(root, "seconds", secs);
    cJSON_AddNumberToObject(root, "tokens_per_second", secs > 0 ? tokens / secs : 0);
    cJSON_AddNumberToObject(root, "skipped_steps", st->skipped);
    cJSON *mods = cJSON_AddArrayToObject(root, "gates");
    FOR_EACH_ADAPTED(m, L, l, p) {
        if (!L->gated) continue;
        char key[TK_NAME_MAX];
        tk_module_key(key, sizeof key, l, p);
        cJSON *g = cJSON_CreateObject();
        cJSON_AddStringToObject(g, "module", key + strlen("base_model.model."));
        cJSON_AddNumberToObject(g, "tau", L->tau);
        cJSON_AddNumberToObject(g, "lambda", L->lambda);
        cJSON_AddItemToArray(mods, g);
    }
    /* Selectivity over the run's last logged steps (docs/gates.md "Selectivity"), from the gate
     * recorder's log: still gates.jsonl.part here (the recorder finishes after the outputs). null
     * without a gate log (--gate-log off, no adapted modules). */
    cJSON *sel = NULL;
    size_t n_adapted = 0;
    FOR_EACH_ADAPTED(m, L, l, p) n_adapted++;
    if (o->gate_log && o->out_dir && n_adapted > 0) {
        char gpath[4200];
        tk_gatesel gs;
        int found = 0;
        snprintf(gpath, sizeof gpath, "%s/gates.jsonl.part", o->out_dir);
        if (tk_gatesel_read(&gs, gpath, TK_GATELOG_WINDOW, &found, err)) {
            cJSON_Delete(root);
            return -1;
        }
        if (found && gs.modules == n_adapted && !(sel = tk_gatesel_json(&gs))) {
            cJSON_Delete(root);
            return tk_fail(err, "out of memory");
        }
    }
    if (sel) cJSON_AddItemToObject(root, "selectivity", sel);
    else cJSON_AddNullToObject(root, "selectivity");
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return tk_fail(err, "out of memory");
    char path[4200];
    snprintf(path, sizeof path, "%s/train_summary.json", dir);
    int rc = tk_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return rc;
}

/* The tuned tower as out_dir/vision_tower (config.json, model.safetensors): written in the staging
 * directory, then swapped in for an earlier one. */
static int save_tower(const tk_train_opts *o, const tk_mm *mm, const char *stage, tk_err *err) {
    static const char *const files[] = {"config.json", "model.safetensors"};
    char dir[4200], to[4200], old[4200], f[4300];
    snprintf(dir, sizeof dir, "%s/vision_tower", stage);
    snprintf(to, sizeof to, "%s/vision_tower", o->out_dir);
    snprintf(old, sizeof old, "%s/vision_tower.old", stage);
    int rc = tk_mm_save_tower(mm, dir, err), moved = 0;
    struct stat st;
    if (rc == 0 && stat(to, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) rc = tk_fail(err, "%s: exists and is not a directory", to);
        else if (rename(to, old) != 0) rc = tk_fail(err, "%s: cannot move aside: %s", to, strerror(errno));
        else moved = 1;
    }
    if (rc == 0 && rename(dir, to) != 0) {
        rc = tk_fail(err, "%s: cannot rename into place: %s", to, strerror(errno));
        if (moved) rename(old, to);
        moved = 0;
    }
    for (int pass = 0; pass < 2; pass++) { /* the replaced tower, or a failed new one */
        const char *d = pass ? old : dir;
        if (pass && !moved) continue;
        for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
            snprintf(f, sizeof f, "%s/%s", d, files[i]);
            remove(f);
        }
        rmdir(d);
    }
    return rc;
}

/* Writes the adapter and the summary into out_dir as one unit: every file goes to a staging directory
 * inside out_dir first and is renamed into place only when all were written, so a failure leaves an
 * earlier adapter in out_dir untouched (never new weights beside an old config). */
static int save_outputs(const tk_train_opts *o, const tk_llama *m, const tk_mm *mm, double final_loss,
                        const tk_train_state *state, tk_err *err) {
    static const char *const names[] = {"adapter_model.safetensors", "adapter_config.json", "train_summary.json",
                                        "mm_projector.safetensors"};
    const size_t n_names = mm ? 4 : 3;
    char stage[4096], from[4200], to[4200];
    struct stat st;
    if (make_dir(o->out_dir, err)) return -1;
    for (size_t i = 0; i < n_names; i++) {
        snprintf(to, sizeof to, "%s/%s", o->out_dir, names[i]);
        if (stat(to, &st) == 0 && !S_ISREG(st.st_mode))
            return tk_fail(err, "%s: exists and is not a regular file; nothing was written", to);
    }
    snprintf(stage, sizeof stage, "%s/.staging.%ld", o->out_dir, (long)getpid());
    if (mkdir(stage, 0755) != 0) return tk_fail(err, "%s: cannot create: %s", stage, strerror(errno));
    char proj[4200];
    snprintf(proj, sizeof proj, "%s/%s", stage, names[3]);
    int rc = tk_llama_save_adapter(m, stage, err) || write_summary(o, stage, m, final_loss, state, err) ||
             (mm && tk_mm_save(mm, proj, err));
    for (size_t i = 0; i < n_names && rc == 0; i++) {
        snprintf(from, sizeof from, "%s/%s", stage, names[i]);
        snprintf(to, sizeof to, "%s/%s", o->out_dir, names[i]);
        if (rename(from, to) != 0) rc = tk_fail(err, "%s: cannot rename into place: %s", to, strerror(errno));
    }
    if (rc == 0 && o->tune_vision_tower) rc = save_tower(o, mm, stage, err);
    for (size_t i = 0; i < n_names; i++) { /* leftovers after a failure */
        snprintf(from, sizeof from, "%s/%s", stage, names[i]);
        remove(from);
    }
    rmdir(stage);
    return rc ? -1 : 0;
}

/* ---- signals ---------------------------------------------------------------------------------- */

/* The one piece of process-wide state: a signal handler can only reach a global. SIGINT/SIGTERM set
 * it; the loop finishes the step in flight, saves a checkpoint and stops. */
static volatile sig_atomic_t tk_stop_signal;

static void on_stop_signal(int sig) { tk_stop_signal = sig; }

static void install_signal_handlers(int on) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on ? on_stop_signal : SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---- the loop --------------------------------------------------------------------------------- */

/* The current step's figures (its micro-batches are in the tk_train_data). */
typedef struct {
    size_t targets, tokens;
} step_batches;

/* Dropout masks come from a stream per (step, micro-batch of the whole step), so a micro-batch draws
 * the same masks whichever rank runs it: P ranks x K equals one process with grad-accum P*K. */
static void microbatch_rng(tk_rng *r, uint64_t seed, int step, size_t global_k) {
    tk_rng_seed(r, seed ^ 0xd40u ^ ((uint64_t)(unsigned)step << 20) ^ ((uint64_t)global_k * 0x9e3779b97f4a7c15ull));
}

/* Data parallel: the step's gate statistics of every rank, in rank order, replace each gated module's
 * local ones, so the threshold step sees exactly the tokens one process would (same r_i, c_i, order).
 * Each rank packs, per module of mods [G] in their order, [kept, r_0..r_n-1, c_0..c_n-1]; n (the
 * rank's tokens through these modules) is the same for every module of the list (the LLaMA's
 * modules see the non-pad tokens, the tower's the image patches: one call per list). */
static int gather_stats(tk_dist *d, tk_adapted_linear *const *mods, size_t G, tk_err *err) {
    size_t n = G ? mods[0]->stats.n : 0;
    for (size_t g = 0; g < G; g++) TK_ASSERT(mods[g]->stats.n == n && mods[g]->stats.n_c == n);
    size_t local = G * (1 + 2 * n);
    uint64_t *counts = calloc((size_t)d->size, sizeof *counts);
    if (!counts || d->gather_count(d, local, counts, err)) {
        free(counts);
        return counts ? -1 : tk_fail(err, "out of memory");
    }
    uint64_t total = 0;
    for (int r = 0; r < d->size; r++) total += counts[r];
    float *send = malloc((local ? local : 1) * sizeof *send), *recv = malloc((size_t)(total ? total : 1) * sizeof *recv);
    int rc = -1;
    if (!send || !recv) {
        tk_fail(err, "out of memory");
        goto out;
    }
    float *w = send;
    for (size_t g = 0; g < G; g++) {
        const tk_adapted_linear *L = mods[g];
        TK_ASSERT(L->stats.kept < (1u << 24)); /* exact as a float */
        *w++ = (float)L->stats.kept;
        memcpy(w, L->stats.r, n * sizeof *w);
        memcpy(w + n, L->stats.c, n * sizeof *w);
        w += 2 * n;
    }
    if (d->gather_f32(d, send, local, recv, counts, err)) goto out;
    for (size_t g = 0; g < G; g++) tk_gate_stats_reset(&mods[g]->stats);
    const float *blk = recv;
    for (int r = 0; r < d->size; r++) {
        size_t nr = G ? (size_t)((counts[r] / G - 1) / 2) : 0;
        const float *q = blk;
        for (size_t g = 0; g < G; g++) {
            tk_adapted_linear *L = mods[g];
            size_t kept = (size_t)q[0];
            for (size_t i = 0; i < nr; i++)
                if (tk_gate_stats_push_r(&L->stats, q[1 + i], 0, err) || tk_gate_stats_push_c(&L->stats, q[1 + nr + i], err))
                    goto out;
            L->stats.kept += kept;
            q += 1 + 2 * nr;
        }
        blk += counts[r];
    }
    rc = 0;
out:
    free(counts);
    free(send);
    free(recv);
    return rc;
}

/* gather_stats over the LLaMA's gated modules, then the tower's (tw [nt]). */
static int gather_gate_stats(tk_dist *d, tk_llama *m, tk_adapted_linear *const *tw, size_t nt, tk_err *err) {
    size_t G = 0;
    FOR_EACH_ADAPTED(m, L, l, p) G += L->gated != 0;
    tk_adapted_linear **mods = malloc((G ? G : 1) * sizeof *mods);
    if (!mods) return tk_fail(err, "out of memory");
    G = 0;
    FOR_EACH_ADAPTED(m, L, l, p) if (L->gated) mods[G++] = L;
    size_t gt = 0;
    for (size_t i = 0; i < nt; i++) gt += tw[i]->gated != 0;
    int rc = (G && gather_stats(d, mods, G, err)) || (gt && gather_stats(d, tw, nt, err)) ? -1 : 0;
    free(mods);
    return rc;
}

int tk_train_run(const tk_train_opts *o, tk_err *err) {
    int rc = -1;
    tk_llama *m = NULL;
    tk_train_data *data = NULL;
    tk_llama_acts *acts = NULL;
    step_batches sb = {0};
    dump_list dump = {0};
    cJSON *config = NULL;
    tk_gatelog *glog = NULL;
    tk_mm *mm = NULL;
    tk_gate_stats pool = {0}; /* pooled statistics of a layer (--ts-tau-scope layer) */
    tk_adalora_run *ada = NULL; /* AdaLoRA's regulariser and rank allocator (adalora_train.h) */
    tk_adapted_linear **tower = NULL; /* the tower's adapted modules that run (multimodal.h) */
    int *tower_layer = NULL, *tower_proj = NULL;
    size_t n_tower = 0;
    if (o->save_every < 0 || o->keep_checkpoints < 0)
        return tk_fail(err, "--save-every and --keep-checkpoints must be >= 0");
    if ((o->save_every > 0 || o->resume_dir) && !o->out_dir)
        return tk_fail(err, "--save-every and --resume need --out DIR (checkpoints go to DIR/checkpoint-<step>)");
    if (o->steps < 1 || o->batch_size < 1 || o->grad_accum < 1 || o->log_every < 1)
        return tk_fail(err, "--steps, --batch-size, --grad-accum and --log-every must be >= 1");
    if (!(o->lr >= 0.0f) || !(o->weight_decay >= 0.0f) || !(o->max_grad_norm >= 0.0f))
        return tk_fail(err, "--lr, --weight-decay and --max-grad-norm must be >= 0");
    if (o->warmup_steps < 0 || o->max_seq_len < 0 || o->threads < 0 || o->threads > 1024)
        return tk_fail(err, "--warmup-steps and --max-seq-len must be >= 0, --threads in [0, 1024]");
    tk_dist *dist = o->dist;
    const int P = dist ? dist->size : 1, rank = dist ? dist->rank : 0, lead = rank == 0;
    const int quiet = o->quiet || !lead;
    int threads = tk_set_threads(o->threads);
    if (o->out_dir && lead) { /* fail before training, not after; clear what killed runs left behind */
        if (make_dir(o->out_dir, err)) return -1;
        tk_checkpoint_clean_stale(o->out_dir);
    }

    if (!(m = tk_llama_open_ex(o->model_dir, o->bf16_weights, err))) goto done;
    tk_peft_config pc = o->peft;
    if (o->stage != 0 && o->stage != 1 && o->stage != 2) {
        tk_fail(err, "--stage must be 1 (projector only) or 2 (projector and adapter)");
        goto done;
    }
    /* the projector's weights (and type): a resumed run continues from the checkpoint's projector, saved
     * with the adapter, not from --projector */
    char ck_proj[4200];
    if (o->resume_dir) snprintf(ck_proj, sizeof ck_proj, "%s/adapter_model.safetensors", o->resume_dir);
    const char *proj_file = o->resume_dir ? ck_proj : o->projector;
    if (o->vision_tower) {
        tk_mm_opts mo = {o->vision_tower, NULL, proj_file, o->projector_type, o->vision_layer, o->vision_feature,
                         o->image_preprocess, o->image_size, o->interpolate_pos};
        if (!(mm = tk_mm_open(&mo, (size_t)m->cfg.dim, err))) goto done;
        if (o->stage == 1 && pc.kind != TK_ADAPTER_NONE && tk_peft_has_vit(&pc)) {
            tk_fail(err, "--stage 1 trains the projector (and with --tune-vision-tower the tower) alone: tower "
                         "adapters (target modules %s...) belong to stage 2", pc.vit_prefix);
            goto done;
        }
        if (o->stage == 1) { /* LLaVA stage 1: only the projector (and a tuned tower) learns */
            pc.kind = TK_ADAPTER_NONE;
            pc.target_mask = 0;
            pc.n_save = 0;
        }
        if (o->vision_tower_lr > 0.0f && !(o->lr > 0.0f)) {
            tk_fail(err, "--vision-tower-lr needs --lr > 0 (it scales the schedule)");
            goto done;
        }
        if (tk_mm_set_tower_training(mm, &pc, o->tune_vision_tower, o->vision_tower_lr > 0.0f ? o->vision_tower_lr / o->lr : 0.0f,
                                     o->seed, err))
            goto done;
        if (o->vision_tower_lr > 0.0f && !o->tune_vision_tower && !tk_mm_tower_modules(mm, NULL, NULL, NULL)) {
            tk_fail(err, "--vision-tower-lr: nothing of the tower trains (adapt its modules with --target-modules "
                         "vision_tower.vision_model.*, or --tune-vision-tower)");
            goto done;
        }
        tk_mm_hook(mm, m);
    } else if (o->stage == 1 || o->projector || o->tune_vision_tower || o->vision_tower_lr > 0.0f) {
        tk_fail(err, "--stage 1, --projector, --tune-vision-tower and --vision-tower-lr need --vision-tower DIR");
        goto done;
    }
    if (o->tune_vision_tower && (o->save_every > 0 || o->resume_dir)) {
        tk_fail(err, "--tune-vision-tower: checkpoints (--save-every, --resume) do not hold the tower's weights yet");
        goto done;
    }
    /* a stage-1 checkpoint holds no adapter (its config has no targets): only the projector, loaded below */
    const char *attach_dir = mm && o->stage == 1 && o->resume_dir ? NULL : o->adapter_dir;
    if (tk_llama_attach(m, &pc, attach_dir, o->seed, err)) goto done;
    if (mm) m->peft.vit_layers = tk_mm_tower_layers(mm); /* the saved config names every tower module */
    m->compute_bf16 = o->compute_bf16;
    int n_packed = tk_llama_pack_frozen(m, err);
    if (n_packed < 0) goto done;
    if (mm && tk_mm_init_weights(mm, proj_file, o->seed ^ 0x9e0u, err)) goto done;
    if (mm && (n_tower = tk_mm_tower_modules(mm, NULL, NULL, NULL)) > 0) {
        tower = malloc(n_tower * sizeof *tower);
        tower_layer = malloc(n_tower * sizeof *tower_layer);
        tower_proj = malloc(n_tower * sizeof *tower_proj);
        if (!tower || !tower_layer || !tower_proj) {
            tk_fail(err, "out of memory");
            goto done;
        }
        tk_mm_tower_modules(mm, tower, tower_layer, tower_proj);
    }
    if (o->mm_projector_lr > 0.0f) { /* the projector's tensors step at mm_projector_lr / lr of the schedule */
        if (!mm || !(o->lr > 0.0f)) {
            tk_fail(err, "--mm-projector-lr needs --vision-tower and --lr > 0 (it scales the schedule)");
            goto done;
        }
        for (size_t i = 0; i < m->params.n; i++)
            if (strncmp(m->params.items[i].name, "model.mm_projector.", 19) == 0)
                m->params.items[i].lr_mult = o->mm_projector_lr / o->lr;
    }
    snprintf(m->peft.base_model, sizeof m->peft.base_model, "%s", o->model_dir);
    size_t max_len = o->max_seq_len > 0 ? (size_t)o->max_seq_len : (size_t)m->cfg.max_seq_len;
    if (o->shuffle_window < 0 || o->prefetch < 0) {
        tk_fail(err, "--shuffle-window and --prefetch must be >= 0");
        goto done;
    }
    const char *one_spec[1] = {o->data_path};
    tk_train_data_opts dop = {.specs = o->n_data > 0 ? o->data_specs : one_spec,
                              .n_specs = o->n_data > 0 ? (size_t)o->n_data : 1,
                              .batch_size = (size_t)o->batch_size,
                              .grad_accum = (size_t)o->grad_accum * (size_t)P, /* the whole step */
                              .max_len = max_len,
                              .shuffle = o->shuffle,
                              .shuffle_window = (size_t)o->shuffle_window,
                              .pack = o->pack,
                              .prefetch = (size_t)o->prefetch,
                              .seed = o->seed,
                              .vocab_size = (uint32_t)m->cfg.vocab_size,
                              .allow_images = mm != NULL};
    if (!(data = tk_train_data_open(&dop, err))) goto done;
    const int shards = tk_train_data_is_shards(data);
    tk_llama_mem_opts mo = {(tk_attn_mode)o->attention, o->recompute};
    if (!(acts = tk_llama_acts_alloc_ex(m, (size_t)o->batch_size, tk_train_data_max_T(data), &mo, err))) goto done;
    tk_rng rng;
    tk_rng_seed(&rng, o->seed ^ 0xd40u);
    tk_sched sch = {o->sched, o->lr, o->warmup_steps, o->steps};
    if (!quiet)
        fprintf(stderr, "tspeft train: %s adapter (%s)%s%s%s, %zu trainable parameters, %s, %d steps x %d x %d, %d threads%s\n",
                tk_adapter_kind_name(m->peft.kind),
                m->peft.kind == TK_ADAPTER_NONE ? "no gate" : m->peft.gate.enabled ? "TS-gated" : "dense",
                mm ? " + projector" : "", n_tower ? " + vision tower adapters" : "",
                o->tune_vision_tower ? " + the whole vision tower" : "",
                m->params.total, tk_train_data_describe(data), o->steps, o->grad_accum, o->batch_size, threads,
                n_packed <= 0 ? "" : o->compute_bf16 ? ", frozen products in BF16 (AVX512-BF16)"
                                                     : ", frozen weights packed for the AVX-512 kernel");
    if (m->params.total == 0) {
        tk_fail(err, "nothing to train: no adapter targets and no modules_to_save");
        goto done;
    }

    if (m->peft.kind == TK_ADAPTER_ADALORA && (o->save_every > 0 || o->resume_dir)) {
        tk_fail(err, "AdaLoRA: checkpoints (--save-every, --resume) do not hold the rank allocator's state yet");
        goto done;
    }
    if (tk_adalora_run_open(&ada, m, o->steps, lead ? o->dump_dir : NULL, err)) goto done;
    tk_train_state st = {0};
    if (!(config = options_json(o))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    if (o->resume_dir) {
        cJSON *saved = NULL;
        if (tk_checkpoint_load(o->resume_dir, m, &st, &saved, err)) goto done;
        int bad = check_resume_config(saved, config, o->resume_dir, shards, err);
        cJSON_Delete(saved);
        if (bad) goto done;
        if (st.step >= o->steps) {
            tk_fail(err, "--resume %s: the checkpoint is at step %d and --steps is %d; nothing left to do", o->resume_dir,
                    st.step, o->steps);
            goto done;
        }
        if (shards != st.has_cursor) {
            tk_fail(err, "--resume %s: the checkpoint was trained from %s but --data is %s", o->resume_dir,
                    st.has_cursor ? "shards (it holds a loader cursor)" : "JSONL (no loader cursor)", shards ? "shards" : "JSONL");
            goto done;
        }
        if (shards && tk_train_data_set_cursor(data, &st.cursor, err)) {
            char pre[4200];
            snprintf(pre, sizeof pre, "--resume %s", o->resume_dir);
            tk_err_prefix(err, pre);
            goto done;
        }
        rng.s[0] = st.rng[0];
        rng.s[1] = st.rng[1];
        if (!quiet) fprintf(stderr, "tspeft train: resuming %s at step %d\n", o->resume_dir, st.step + 1);
    }
    if (!quiet && P > 1)
        fprintf(stderr, "tspeft train: data parallel over %d ranks: %d micro-batches of %d rows per step\n", P,
                P * o->grad_accum, o->batch_size);
    if (o->out_dir && lead && o->gate_log && /* gate and training logs, docs/gates.md */
        !(glog = tk_gatelog_open(o->out_dir, m,
                                 &(tk_gatelog_opts){o->token_view_every, o->steps, o->resume_dir != NULL,
                                                    n_tower ? &(tk_gatelog_tower){n_tower, tower, tower_layer, tower_proj,
                                                                                  tk_mm_tower_layers(mm), m->peft.vit_prefix}
                                                            : NULL},
                                 err)))
        goto done;
    tk_stop_signal = 0;
    install_signal_handlers(1);
    double t0 = tk_time() - st.seconds;
    const int first_step = st.step + 1;
    for (int step = first_step; step <= o->steps; step++) {
        double ts = tk_time();
        if (tk_train_data_step(data, step, err)) goto done;
        sb.targets = tk_train_data_targets(data);
        sb.tokens = tk_train_data_tokens(data);
        if (sb.targets == 0) {
            tk_fail(err, "%s: step %d has no target positions (every shifted label is -100)", tk_train_data_name(data), step);
            goto done;
        }
        tk_params_zero_grad(&m->params);
        FOR_EACH_ADAPTED(m, L, l, p) tk_gate_stats_reset(&L->stats);
        if (mm) tk_mm_reset_gate_stats(mm);
        int dumping = o->dump_dir && step == 1;
        double loss_sum = 0.0;
        float scale = 1.0f / (float)sb.targets;
        for (int k = 0; k < o->grad_accum; k++) {
            size_t gk = (size_t)rank * (size_t)o->grad_accum + (size_t)k; /* index in the whole step */
            const tk_train_mb *mb = tk_train_data_mb(data, gk);
            const tk_batch *b = mb->text;
            acts->kinds = mb->kinds; /* [B*T] TK_KIND_* for gate statistics */
            microbatch_rng(&rng, o->seed, step, gk);
            if (mm) tk_mm_set_train(mm, 1, ((uint64_t)(unsigned)step << 24) ^ (uint64_t)gk);
            if (mm && tk_mm_forward(mm, mb->batch, b->B, b->T, acts, (size_t)m->cfg.dim, tk_train_data_name(data), err))
                goto done;
            if (tk_llama_forward(m, acts, b->input_ids, b->attention_mask, b->B, b->T, 1, &rng, err)) goto done;
            if (dumping) {
                char nm[32];
                int64_t shape[3] = {(int64_t)b->B, (int64_t)b->T, m->cfg.vocab_size};
                snprintf(nm, sizeof nm, "logits.%d", k);
                if (dump_add(&dump, nm, TK_DT_F32, 3, shape, acts->logits,
                             b->B * b->T * (size_t)m->cfg.vocab_size * sizeof(float), err))
                    goto done;
            }
            loss_sum += tk_llama_loss(m, acts, b->labels, b->B, b->T, scale, NULL);
            if (tk_llama_backward(m, acts, b->B, b->T, err)) goto done;
            if (mm && tk_mm_backward(mm, err)) goto done;
            if (glog && tk_gatelog_batch(glog, m, acts, b->B, b->T, step, err)) goto done;
            if (glog && n_tower && tk_gatelog_tower_batch(glog, tk_mm_tower_rows(mm), step, err)) goto done;
        }
        if (dist) { /* the step's sums over every rank's micro-batches (counts are already global) */
            if (dist->sum_f64(dist, &loss_sum, 1, err) ||
                dist->sum_f32(dist, m->params.grad, m->params.total, err) || gather_gate_stats(dist, m, tower, n_tower, err))
                goto done;
        }
        double loss = loss_sum / (double)sb.targets, reg = 0.0;
        if (tk_adalora_run_reg(ada, step, &reg, err)) goto done; /* AdaLoRA: loss += w R, and its gradient */
        loss += reg;
        st.rows_used = (uint64_t)step * (uint64_t)o->grad_accum * (uint64_t)o->batch_size;
        if (shards) { /* the stream position after this step, for checkpoints */
            st.has_cursor = 1;
            tk_train_data_get_cursor(data, &st.cursor);
        }
        st.epoch = tk_train_data_epoch(data, step);
        /* Non-finite loss or gradient: stop (default) or skip the step (no parameter, tau or moment
         * changes), by policy; reported either way. */
        double gnorm = tk_grad_norm(m->params.grad, m->params.total);
        if (!isfinite(loss) || !isfinite(gnorm)) {
            const char *what = !isfinite(loss) ? "loss" : "gradient norm";
            if (!o->skip_nonfinite) {
                tk_fail(err, "step %d: the %s is not finite (loss %g, gradient norm %g); stopping "
                             "(--nonfinite skip would skip such steps)", step, what, loss, gnorm);
                goto done;
            }
            st.skipped++;
            fprintf(stderr, "step %d/%d  the %s is not finite: step skipped (%d so far)\n", step, o->steps, what,
                    st.skipped);
        } else {
            size_t kept = 0, seen = 0, tkept = 0, tseen = 0;
            FOR_EACH_ADAPTED(m, L, l, p) {
                kept += L->stats.kept;
                seen += L->stats.n;
            }
            for (size_t i = 0; i < n_tower; i++) {
                tkept += tower[i]->stats.kept;
                tseen += tower[i]->stats.n;
            }
            char tkeep[40] = ""; /* the tower's modules see image patches: their own figure */
            if (n_tower && tower[0]->gated) snprintf(tkeep, sizeof tkeep, "  tower keep %.3f", tseen ? (double)tkept / (double)tseen : 1.0);
            if (update_thresholds(m, step, &pool, err) || (mm && tk_mm_update_gates(mm, step, err))) goto done;
            if (dumping && lead) {
                char path[4200];
                const char *meta[] = {"format", "pt", NULL};
                if (make_dir(o->dump_dir, err) || dump_step(&dump, m, mm, tower, tower_layer, tower_proj, n_tower, (float)loss, err) ||
                    tk_pathf(path, sizeof path, err, "%s/step1.safetensors", o->dump_dir) ||
                    tk_st_write(path, dump.e, dump.n, meta, err))
                    goto done;
            }
            tk_clip_grad_to(m->params.grad, m->params.total, gnorm, o->max_grad_norm);
            float lr = tk_sched_lr(&sch, step - 1);
            tk_params_adamw(&m->params, lr, 0.9f, 0.999f, 1e-8f, o->weight_decay, step);
            if (mm) tk_mm_after_optimizer(mm);
            if (tk_adalora_run_step(ada, m, step, err)) goto done; /* scores, budget, masks */
            st.tokens += (double)sb.tokens;
            if (step == 1) st.first_loss = loss;
            st.last_loss = loss;
            double now = tk_time(), el = now - t0;
            char epoch[40] = ""; /* shards: loader epochs so far */
            if (shards) snprintf(epoch, sizeof epoch, "  epoch %.3f", st.epoch);
            if (!quiet && (step % o->log_every == 0 || step == o->steps || step == first_step))
                fprintf(stderr, "step %d/%d  loss %.4f  lr %.2e  gnorm %.3f  keep %.3f%s%s  %.0f tok/s  step %.2fs  eta %.0fs\n",
                        step, o->steps, loss, lr, gnorm, seen ? (double)kept / (double)seen : 1.0, tkeep, epoch,
                        (double)sb.tokens / (now - ts), now - ts, el / step * (o->steps - step));
            if (glog && tk_gatelog_step(glog, m, &(tk_gatelog_step_info){step, loss, lr, gnorm, (double)sb.tokens, now - ts}, err))
                goto done;
        }
        int last_done = step;
        st.step = step;
        st.rng[0] = rng.s[0];
        st.rng[1] = rng.s[1];
        st.seconds = tk_time() - t0;
        int stopping = tk_stop_signal != 0 && step < o->steps; /* on the last step: finish and save */
        if (dist) { /* every rank stops after the same step, or none does */
            double sig[2] = {stopping ? 1.0 : 0.0, stopping ? (double)tk_stop_signal : 0.0};
            if (dist->sum_f64(dist, sig, 2, err)) goto done;
            stopping = sig[0] > 0.0;
            if (stopping && !tk_stop_signal) tk_stop_signal = (int)(sig[1] / sig[0]);
        }
        if (o->out_dir && lead && (stopping || (o->save_every > 0 && step % o->save_every == 0 && step < o->steps))) {
            if (tk_checkpoint_save(o->out_dir, o->keep_checkpoints, m, &st, config, err)) goto done;
            if (!quiet) fprintf(stderr, "tspeft train: checkpoint %s/checkpoint-%d saved\n", o->out_dir, step);
        }
        if (stopping) {
            tk_fail(err, "stopped by signal %d after step %d%s%s", (int)tk_stop_signal, last_done,
                    o->out_dir ? "; checkpoint saved, continue with --resume " : " (no --out: nothing saved)",
                    o->out_dir ? o->out_dir : "");
            rc = 128 + (int)tk_stop_signal;
            goto done;
        }
    }
    if (dist && !quiet && o->steps >= first_step) /* what data parallelism cost on the wire */
        fprintf(stderr, "tspeft train: data parallel: rank 0 sent %.0f bytes per optimizer step (%zu trainable values)\n",
                (double)dist->bytes_sent / (double)(o->steps - first_step + 1), m->params.total);
    if (o->out_dir && lead) {
        /* the loss of step 1's micro-batches under the final parameters (no dropout) */
        if (tk_train_data_first_step(data, err)) goto done;
        sb.targets = tk_train_data_targets(data);
        double s = 0.0;
        if (mm) tk_mm_set_train(mm, 0, 0);
        for (int k = 0; k < o->grad_accum * P; k++) {
            const tk_train_mb *mb = tk_train_data_mb(data, (size_t)k);
            const tk_batch *b = mb->text;
            acts->kinds = mb->kinds;
            if (mm && tk_mm_forward(mm, mb->batch, b->B, b->T, acts, (size_t)m->cfg.dim, tk_train_data_name(data), err))
                goto done;
            if (tk_llama_forward(m, acts, b->input_ids, b->attention_mask, b->B, b->T, 0, NULL, err)) goto done;
            s += tk_llama_loss(m, acts, b->labels, b->B, b->T, 0.0f, NULL);
        }
        if (save_outputs(o, m, mm, s / (double)sb.targets, &st, err)) goto done;
        if (glog && tk_gatelog_finish(glog, err)) goto done;
        if (!quiet) fprintf(stderr, "tspeft train: adapter written to %s\n", o->out_dir);
    }
    rc = 0;
done:
    install_signal_handlers(0);
    tk_gatelog_close(glog, rc > 128); /* a signal stop keeps the partial logs for --resume */
    tk_gate_stats_free(&pool);
    tk_adalora_run_free(ada);
    free(tower);
    free(tower_layer);
    free(tower_proj);
    cJSON_Delete(config);
    dump_free(&dump);
    tk_llama_acts_free(m, acts);
    tk_train_data_free(data);
    tk_llama_close(m);
    tk_mm_free(mm);
    return rc;
}
