/* trainer.c: see trainer.h. */
#include "trainer.h"

#include "../../datasets/jsonl.h"
#include "../io/safetensors.h"
#include "../model/llama.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
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

/* Row order: file order, wrapping; with shuffle, a fresh seeded permutation per epoch. */
typedef struct {
    size_t n, epoch; /* epoch whose permutation perm holds (SIZE_MAX: none yet) */
    size_t *perm;
    uint64_t seed;
    int shuffle;
} row_order;

static size_t row_at(row_order *ro, size_t k) {
    size_t epoch = k / ro->n, i = k % ro->n;
    if (!ro->shuffle) return i;
    if (epoch != ro->epoch) { /* Fisher-Yates from a seed of (run seed, epoch) */
        tk_rng rng;
        tk_rng_seed(&rng, ro->seed * 0x9e3779b97f4a7c15ull + epoch);
        for (size_t j = 0; j < ro->n; j++) ro->perm[j] = j;
        for (size_t j = ro->n - 1; j > 0; j--) {
            size_t r = (size_t)(tk_rng_u64(&rng) % (j + 1)), t = ro->perm[j];
            ro->perm[j] = ro->perm[r];
            ro->perm[r] = t;
        }
        ro->epoch = epoch;
    }
    return ro->perm[i];
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

/* Gradients, keep counts, r, c and the new thresholds, once the step's tau update is done. */
static int dump_step(dump_list *d, tk_llama *m, float loss, tk_err *err) {
    int64_t one[1] = {1};
    if (dump_add(d, "loss", TK_DT_F32, 1, one, &loss, sizeof loss, err)) return -1;
    for (size_t i = 0; i < m->params.n; i++) {
        const tk_param *p = &m->params.items[i];
        char nm[TK_NAME_MAX + 8];
        snprintf(nm, sizeof nm, "%s.grad", p->name);
        if (dump_add(d, nm, TK_DT_F32, p->ndim, p->shape, m->params.grad + p->offset, p->numel * sizeof(float), err))
            return -1;
    }
    FOR_EACH_ADAPTED(m, L, l, p) {
        if (!L->gated) continue;
        char key[TK_NAME_MAX], nm[TK_NAME_MAX + 32];
        tk_module_key(key, sizeof key, l, p);
        int64_t kept = (int64_t)L->stats.kept, nn[1] = {(int64_t)L->stats.n};
        snprintf(nm, sizeof nm, "%s.keep", key);
        if (dump_add(d, nm, TK_DT_I64, 1, one, &kept, sizeof kept, err)) return -1;
        snprintf(nm, sizeof nm, "%s.ts_tau.next", key);
        if (dump_add(d, nm, TK_DT_F32, 1, one, &L->tau, sizeof(float), err)) return -1;
        snprintf(nm, sizeof nm, "%s.ts_r", key);
        if (dump_add(d, nm, TK_DT_F32, 1, nn, L->stats.r, L->stats.n * sizeof(float), err)) return -1;
        snprintf(nm, sizeof nm, "%s.ts_c", key);
        if (dump_add(d, nm, TK_DT_F32, 1, nn, L->stats.c, L->stats.n * sizeof(float), err)) return -1;
        if (m->peft.gate.target_keep > 0.0f) {
            snprintf(nm, sizeof nm, "%s.ts_lambda.next", key);
            if (dump_add(d, nm, TK_DT_F32, 1, one, &L->lambda, sizeof(float), err)) return -1;
        }
    }
    return 0;
}

/* ---- outputs ---------------------------------------------------------------------------------- */

static int write_summary(const tk_train_opts *o, const char *dir, const tk_llama *m, double final_loss, double first_loss,
                         double last_loss, double secs, double tokens, tk_err *err) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return tk_fail(err, "out of memory");
    cJSON_AddStringToObject(root, "model", o->model_dir);
    cJSON_AddStringToObject(root, "data", o->data_path);
    if (o->adapter_dir) cJSON_AddStringToObject(root, "adapter_init", o->adapter_dir);
    cJSON_AddNumberToObject(root, "steps", o->steps);
    cJSON_AddNumberToObject(root, "batch_size", o->batch_size);
    cJSON_AddNumberToObject(root, "grad_accum", o->grad_accum);
    cJSON_AddNumberToObject(root, "lr", o->lr);
    cJSON_AddStringToObject(root, "lr_scheduler", tk_sched_name(o->sched));
    cJSON_AddNumberToObject(root, "warmup_steps", o->warmup_steps);
    cJSON_AddNumberToObject(root, "weight_decay", o->weight_decay);
    cJSON_AddNumberToObject(root, "max_grad_norm", o->max_grad_norm);
    cJSON_AddNumberToObject(root, "seed", (double)o->seed);
    cJSON_AddNumberToObject(root, "threads", o->threads);
    cJSON_AddNumberToObject(root, "trainable_parameters", (double)m->params.total);
    cJSON_AddNumberToObject(root, "first_step_loss", first_loss);
    cJSON_AddNumberToObject(root, "last_step_loss", last_loss);
    /* Loss of step 1's micro-batches under the final parameters: reloading the saved adapter and
     * running one step with --lr 0 --dump must reproduce it exactly. */
    cJSON_AddNumberToObject(root, "final_loss_step1_batches", final_loss);
    cJSON_AddNumberToObject(root, "seconds", secs);
    cJSON_AddNumberToObject(root, "tokens_per_second", secs > 0 ? tokens / secs : 0);
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
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return tk_fail(err, "out of memory");
    char path[4200];
    snprintf(path, sizeof path, "%s/train_summary.json", dir);
    int rc = tk_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return rc;
}

/* Writes the adapter and the summary into out_dir as one unit: every file goes to a staging directory
 * inside out_dir first and is renamed into place only when all were written, so a failure leaves an
 * earlier adapter in out_dir untouched (never new weights beside an old config). */
static int save_outputs(const tk_train_opts *o, const tk_llama *m, double final_loss, double first_loss,
                        double last_loss, double secs, double tokens, tk_err *err) {
    static const char *const names[] = {"adapter_model.safetensors", "adapter_config.json", "train_summary.json"};
    const size_t n_names = sizeof names / sizeof names[0];
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
    int rc = tk_llama_save_adapter(m, stage, err) ||
             write_summary(o, stage, m, final_loss, first_loss, last_loss, secs, tokens, err);
    for (size_t i = 0; i < n_names && rc == 0; i++) {
        snprintf(from, sizeof from, "%s/%s", stage, names[i]);
        snprintf(to, sizeof to, "%s/%s", o->out_dir, names[i]);
        if (rename(from, to) != 0) rc = tk_fail(err, "%s: cannot rename into place: %s", to, strerror(errno));
    }
    for (size_t i = 0; i < n_names; i++) { /* leftovers after a failure */
        snprintf(from, sizeof from, "%s/%s", stage, names[i]);
        remove(from);
    }
    rmdir(stage);
    return rc ? -1 : 0;
}

/* ---- the loop --------------------------------------------------------------------------------- */

typedef struct {
    tk_batch *mb; /* [grad_accum] */
    size_t targets, tokens;
} step_batches;

static int build_step(step_batches *sb, const tk_jsonl_data *d, row_order *ro, int step, int B, int K,
                      size_t *rows, tk_err *err) {
    sb->targets = sb->tokens = 0;
    for (int k = 0; k < K; k++) {
        size_t first = ((size_t)(step - 1) * K + k) * B;
        for (int b = 0; b < B; b++) rows[b] = row_at(ro, first + b);
        if (tk_batch_make(&sb->mb[k], d, rows, (size_t)B, err)) return -1;
        sb->targets += tk_batch_count_targets(&sb->mb[k]);
        for (size_t i = 0; i < sb->mb[k].B * sb->mb[k].T; i++) sb->tokens += sb->mb[k].attention_mask[i];
    }
    return 0;
}

int tk_train_run(const tk_train_opts *o, tk_err *err) {
    int rc = -1;
    tk_llama *m = NULL;
    tk_jsonl_data *data = NULL;
    tk_llama_acts *acts = NULL;
    step_batches sb = {0};
    size_t *rows = NULL;
    row_order ro = {0};
    dump_list dump = {0};
    if (o->steps < 1 || o->batch_size < 1 || o->grad_accum < 1 || o->log_every < 1)
        return tk_fail(err, "--steps, --batch-size, --grad-accum and --log-every must be >= 1");
    if (!(o->lr >= 0.0f) || !(o->weight_decay >= 0.0f) || !(o->max_grad_norm >= 0.0f))
        return tk_fail(err, "--lr, --weight-decay and --max-grad-norm must be >= 0");
    if (o->warmup_steps < 0 || o->max_seq_len < 0 || o->threads < 0 || o->threads > 1024)
        return tk_fail(err, "--warmup-steps and --max-seq-len must be >= 0, --threads in [0, 1024]");
    int threads = tk_set_threads(o->threads);

    if (!(m = tk_llama_open(o->model_dir, err))) goto done;
    tk_peft_config pc = o->peft;
    if (tk_llama_attach(m, &pc, o->adapter_dir, o->seed, err)) goto done;
    snprintf(m->peft.base_model, sizeof m->peft.base_model, "%s", o->model_dir);
    size_t max_len = o->max_seq_len > 0 ? (size_t)o->max_seq_len : (size_t)m->cfg.max_seq_len;
    if (!(data = tk_jsonl_load(o->data_path, m->cfg.vocab_size, max_len, err))) goto done;
    if (!(acts = tk_llama_acts_alloc(m, (size_t)o->batch_size, data->max_len, err))) goto done;
    sb.mb = calloc((size_t)o->grad_accum, sizeof *sb.mb);
    rows = calloc((size_t)o->batch_size, sizeof *rows);
    ro.n = data->n_rows;
    ro.shuffle = o->shuffle;
    ro.perm = calloc(data->n_rows, sizeof *ro.perm);
    if (!sb.mb || !rows || !ro.perm) {
        tk_fail(err, "out of memory");
        goto done;
    }
    ro.epoch = SIZE_MAX;
    ro.seed = o->seed;
    tk_rng rng;
    tk_rng_seed(&rng, o->seed ^ 0xd40u);
    tk_sched sch = {o->sched, o->lr, o->warmup_steps, o->steps};
    if (!o->quiet)
        fprintf(stderr, "tspeft train: %s adapter (%s), %zu trainable parameters, %zu rows, %d steps x %d x %d, %d threads\n",
                tk_adapter_kind_name(m->peft.kind), m->peft.gate.enabled ? "TS-gated" : "dense",
                m->params.total, data->n_rows, o->steps, o->grad_accum, o->batch_size, threads);
    if (m->params.total == 0) {
        tk_fail(err, "nothing to train: no adapter targets and no modules_to_save");
        goto done;
    }

    double t0 = tk_time(), tokens_done = 0, first_loss = 0, last_loss = 0;
    for (int step = 1; step <= o->steps; step++) {
        double ts = tk_time();
        if (build_step(&sb, data, &ro, step, o->batch_size, o->grad_accum, rows, err)) goto done;
        if (sb.targets == 0) {
            tk_fail(err, "%s: step %d has no target positions (every shifted label is -100)", o->data_path, step);
            goto done;
        }
        tk_params_zero_grad(&m->params);
        FOR_EACH_ADAPTED(m, L, l, p) tk_gate_stats_reset(&L->stats);
        int dumping = o->dump_dir && step == 1;
        double loss_sum = 0.0;
        float scale = 1.0f / (float)sb.targets;
        for (int k = 0; k < o->grad_accum; k++) {
            tk_batch *b = &sb.mb[k];
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
        }
        double loss = loss_sum / (double)sb.targets;
        if (!isfinite(loss)) {
            tk_fail(err, "step %d: the loss is not finite (%g); stopping", step, loss);
            goto done;
        }
        size_t kept = 0, seen = 0;
        FOR_EACH_ADAPTED(m, L, l, p) {
            kept += L->stats.kept;
            seen += L->stats.n;
            if (L->gated && tk_gate_update(&m->peft.gate, &L->stats, step, &L->tau, &L->lambda)) {
                tk_fail(err, "out of memory in the threshold step");
                goto done;
            }
        }
        if (dumping) {
            char path[4096];
            if (make_dir(o->dump_dir, err) || dump_step(&dump, m, (float)loss, err)) goto done;
            snprintf(path, sizeof path, "%s/step1.safetensors", o->dump_dir);
            const char *meta[] = {"format", "pt", NULL};
            if (tk_st_write(path, dump.e, dump.n, meta, err)) goto done;
        }
        double gnorm = tk_clip_grad_norm(m->params.grad, m->params.total, o->max_grad_norm);
        if (!isfinite(gnorm)) {
            tk_fail(err, "step %d: the gradient norm is not finite; stopping", step);
            goto done;
        }
        float lr = tk_sched_lr(&sch, step - 1);
        for (size_t i = 0; i < m->params.n; i++) {
            const tk_param *p = &m->params.items[i];
            size_t off = p->offset;
            tk_adamw_update(m->params.data + off, m->params.grad + off, m->params.m + off, m->params.v + off,
                            p->numel, lr, 0.9f, 0.999f, 1e-8f, p->decay ? o->weight_decay : 0.0f, step);
        }
        tokens_done += (double)sb.tokens;
        if (step == 1) first_loss = loss;
        last_loss = loss;
        double now = tk_time(), el = now - t0;
        if (!o->quiet && (step % o->log_every == 0 || step == o->steps || step == 1))
            fprintf(stderr, "step %d/%d  loss %.4f  lr %.2e  gnorm %.3f  keep %.3f  %.0f tok/s  step %.2fs  eta %.0fs\n",
                    step, o->steps, loss, lr, gnorm, seen ? (double)kept / (double)seen : 1.0,
                    (double)sb.tokens / (now - ts), now - ts, el / step * (o->steps - step));
    }
    double secs = tk_time() - t0;

    if (o->out_dir) {
        /* the loss of step 1's micro-batches under the final parameters (no dropout) */
        if (build_step(&sb, data, &ro, 1, o->batch_size, o->grad_accum, rows, err)) goto done;
        double s = 0.0;
        for (int k = 0; k < o->grad_accum; k++) {
            tk_batch *b = &sb.mb[k];
            if (tk_llama_forward(m, acts, b->input_ids, b->attention_mask, b->B, b->T, 0, NULL, err)) goto done;
            s += tk_llama_loss(m, acts, b->labels, b->B, b->T, 0.0f, NULL);
        }
        if (save_outputs(o, m, s / (double)sb.targets, first_loss, last_loss, secs, tokens_done, err)) goto done;
        if (!o->quiet) fprintf(stderr, "tspeft train: adapter written to %s\n", o->out_dir);
    }
    rc = 0;
done:
    if (sb.mb)
        for (int k = 0; k < o->grad_accum; k++) tk_batch_free(&sb.mb[k]);
    free(sb.mb);
    free(rows);
    free(ro.perm);
    dump_free(&dump);
    tk_llama_acts_free(m, acts);
    tk_jsonl_free(data);
    tk_llama_close(m);
    return rc;
}
