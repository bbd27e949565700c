/* classify.c: image classification on a CLIP / SigLIP tower (see classify.h).
 *
 * Shape legend: B images of a batch, S image side, C tower width, K classes, T tokens per image.
 */
#include "vision/classify.h"

#include "analysis/gatelog.h"
#include "datasets/shard.h"
#include "io/safetensors.h"
#include "model/params.h"
#include "ops/blas.h"
#include "ops/ops.h"
#include "vision/image.h"
#include "vision/preprocess.h"
#include "vision/vit.h"
#include "vision/vit_peft.h"
#include "vision/vit_train.h"

#include <cJSON.h>
#include <dirent.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void tk_cls_opts_default(tk_cls_opts *o) {
    memset(o, 0, sizeof *o);
    o->steps = 100;
    o->batch_size = 16;
    o->log_every = 10;
    o->lr = 1e-3f;
    o->max_grad_norm = 1.0f;
    o->sched = TK_SCHED_CONSTANT;
    o->seed = 42;
    tk_peft_config_default(&o->peft);
}

/* ---- data ------------------------------------------------------------------------------------ */

typedef struct {
    uint8_t *bytes; /* encoded image */
    size_t n;
    int label;
} cls_item;

typedef struct {
    cls_item *items;
    size_t n, cap;
    int n_classes;
    char where[4200]; /* the first shard, for messages */
} cls_data;

static void data_free(cls_data *d) {
    for (size_t i = 0; i < d->n; i++) free(d->items[i].bytes);
    free(d->items);
    memset(d, 0, sizeof *d);
}

static int meta_int(const cJSON *m, const char *key, int *out) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(m, key);
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || fabs(it->valuedouble) > 1e9) return -1;
    *out = (int)it->valuedouble;
    return 0;
}

static int read_shard(cls_data *d, const char *path, size_t limit, tk_err *err) {
    tk_shard_reader *r = tk_shard_reader_open(path, err);
    if (!r) return -1;
    int rc = -1;
    uint64_t n = tk_shard_reader_count(r);
    for (uint64_t i = 0; i < n && (!limit || d->n < limit); i++) {
        tk_shard_record rec;
        if (tk_shard_reader_get(r, i, &rec, err)) goto done;
        if (rec.n_images != 1 || rec.images[0].kind != TK_IMAGE_ENCODED) {
            tk_fail(err, "%s: record %llu: an image-classification record holds one encoded image (found %zu "
                    "image payloads)", path, (unsigned long long)i, rec.n_images);
            goto done;
        }
        cJSON *m = rec.meta_len ? cJSON_ParseWithLength(rec.meta, rec.meta_len) : NULL;
        int label = -1, nc = -1;
        int ok = m && !meta_int(m, "label", &label) && !meta_int(m, "n_classes", &nc);
        cJSON_Delete(m);
        if (!ok) {
            tk_fail(err, "%s: record %llu: meta must hold integers \"label\" and \"n_classes\" (tspeft convert "
                    "--format image-folder writes them)", path, (unsigned long long)i);
            goto done;
        }
        if (nc < 2 || nc > 1000000 || label < 0 || label >= nc) {
            tk_fail(err, "%s: record %llu: label %d with n_classes %d (need n_classes >= 2, 0 <= label < n_classes)",
                    path, (unsigned long long)i, label, nc);
            goto done;
        }
        if (d->n_classes && nc != d->n_classes) {
            tk_fail(err, "%s: record %llu: n_classes %d, but %s says %d", path, (unsigned long long)i, nc, d->where,
                    d->n_classes);
            goto done;
        }
        if (!d->n_classes) {
            d->n_classes = nc;
            snprintf(d->where, sizeof d->where, "%s", path);
        }
        if (d->n == d->cap) {
            size_t cap = d->cap ? 2 * d->cap : 256;
            cls_item *p = realloc(d->items, cap * sizeof *p);
            if (!p) goto oom;
            d->items = p;
            d->cap = cap;
        }
        cls_item *it = &d->items[d->n];
        it->n = rec.images[0].nbytes;
        if (!(it->bytes = malloc(it->n ? it->n : 1))) goto oom;
        memcpy(it->bytes, rec.images[0].data, it->n);
        it->label = label;
        d->n++;
    }
    rc = 0;
    goto done;
oom:
    tk_fail(err, "%s: out of memory", path);
done:
    tk_shard_reader_free(r);
    return rc;
}

/* Every spec: a shard file, a directory (its regular files, sorted) or a glob. */
static int load_data(cls_data *d, const char *const *specs, int n_specs, size_t limit, tk_err *err) {
    memset(d, 0, sizeof *d);
    for (int s = 0; s < n_specs; s++) {
        struct stat st;
        char pat[4200];
        if (stat(specs[s], &st) == 0 && S_ISDIR(st.st_mode)) snprintf(pat, sizeof pat, "%s/*", specs[s]);
        else snprintf(pat, sizeof pat, "%s", specs[s]);
        glob_t g;
        int gr = glob(pat, 0, NULL, &g);
        if (gr != 0 || g.gl_pathc == 0) {
            if (gr == 0) globfree(&g);
            return tk_fail(err, "--data %s: no such shard", specs[s]);
        }
        int rc = 0;
        for (size_t i = 0; i < g.gl_pathc && rc == 0; i++) {
            if (stat(g.gl_pathv[i], &st) != 0 || !S_ISREG(st.st_mode)) continue;
            rc = read_shard(d, g.gl_pathv[i], limit, err);
        }
        globfree(&g);
        if (rc) return -1;
    }
    if (d->n == 0) return tk_fail(err, "--data %s: no records", specs[0]);
    return 0;
}

/* pixels [n, 3, S, S] of items idx[0..n). */
static int make_pixels(float *pix, const cls_data *d, const size_t *idx, size_t n, const tk_preproc *pp,
                       tk_err *err) {
    size_t per = tk_preproc_numel(pp);
    for (size_t b = 0; b < n; b++) {
        const cls_item *it = &d->items[idx[b]];
        char name[64];
        snprintf(name, sizeof name, "image %zu", idx[b]);
        tk_image *img = tk_image_decode(it->bytes, it->n, name, 0, err);
        if (!img) return tk_err_prefix(err, d->where);
        int rc = tk_preprocess(pix + b * per, img, pp, err);
        tk_image_free(img);
        if (rc) return -1;
    }
    return 0;
}

/* ---- the model: tower (+ adapters) + classifier ---------------------------------------------- */

typedef struct {
    tk_vit *m;
    tk_vit *g;              /* tower gradients (tune_tower) or NULL */
    tk_vit_peft *vp;        /* NULL without adapters */
    tk_vit_act *act;
    tk_params P;            /* classifier + adapters */
    tk_params PT;           /* the tower (tune_tower) */
    float *cw, *cb, *dcw, *dcb; /* classifier [K,C], [K] */
    int K;
    size_t Bmax;
    tk_preproc pp;
    float *pix, *feat, *dfeat, *logits, *losses;
    int32_t *targets;
} cls_model;

static void model_free(cls_model *cm) {
    tk_vit_act_free(cm->act);
    tk_vit_peft_free(cm->vp);
    tk_params_free(&cm->P);
    tk_params_free(&cm->PT);
    tk_vit_close(cm->g);
    tk_vit_close(cm->m);
    tk_free(cm->pix), tk_free(cm->feat), tk_free(cm->dfeat), tk_free(cm->logits), tk_free(cm->losses);
    free(cm->targets);
    memset(cm, 0, sizeof *cm);
}

/* Every tower tensor in cm->PT, bound to the tower (data) and cm->g (gradients). */
static int register_tower(cls_model *cm, tk_err *err) {
    if (!(cm->g = tk_vit_zeros(&cm->m->cfg, err))) return -1;
    return tk_vit_register_params(cm->m, cm->g, &cm->PT, "vision_model.", 0, err) || tk_params_alloc(&cm->PT, err) ? -1 : 0;
}

static int model_open(cls_model *cm, const tk_cls_opts *o, int K, size_t Bmax, int train, tk_err *err) {
    memset(cm, 0, sizeof *cm);
    if (!(cm->m = tk_vit_open(o->model_dir, NULL, err))) return -1;
    const tk_vit_config *c = &cm->m->cfg;
    if (c->channels != 3)
        return tk_fail(err, "%s: num_channels %d: images are preprocessed to 3 channels", o->model_dir, c->channels);
    tk_preproc_mode mode = c->kind == TK_VIT_SIGLIP ? TK_PREPROC_SIGLIP : TK_PREPROC_CLIP;
    if (o->preprocess && tk_preproc_mode_from_name(o->preprocess, &mode, err)) return tk_err_prefix(err, "--image-preprocess");
    tk_preproc_init(&cm->pp, mode, (size_t)c->image_size);
    size_t C = (size_t)c->hidden, S = (size_t)c->image_size;
    cm->K = K;
    cm->Bmax = Bmax;
    /* the whole tower first: its tensors move into cm->PT, and the adapters must take their base weights
     * from there */
    if (train && o->tune_tower && register_tower(cm, err)) return -1;
    if (o->peft.kind != TK_ADAPTER_NONE && tk_peft_has_vit(&o->peft)) {
        if (!(cm->vp = tk_vit_peft_new(cm->m, &o->peft, "base_model.model.vision_model.", err))) return -1;
    }
    int64_t sw[2] = {K, (int64_t)C}, sb[1] = {K};
    if (tk_params_add(&cm->P, "base_model.model.classifier.weight", 2, sw, 1, &cm->cw, &cm->dcw, NULL, err) ||
        tk_params_add(&cm->P, "base_model.model.classifier.bias", 1, sb, 0, &cm->cb, &cm->dcb, NULL, err) ||
        (cm->vp && tk_vit_peft_register(cm->vp, &cm->P, err)) || tk_params_alloc(&cm->P, err))
        return -1;
    if (!(cm->act = tk_vit_act_alloc(cm->m, Bmax, err))) return -1;
    if (cm->vp && tk_vit_peft_alloc(cm->vp, Bmax * cm->m->n_tokens, err)) return -1;
    cm->pix = tk_calloc(Bmax * 3 * S * S, sizeof(float));
    cm->feat = tk_calloc(Bmax * C, sizeof(float));
    cm->dfeat = tk_calloc(Bmax * C, sizeof(float));
    cm->logits = tk_calloc(Bmax * (size_t)K, sizeof(float));
    cm->losses = tk_calloc(Bmax, sizeof(float));
    cm->targets = calloc(Bmax, sizeof(int32_t));
    if (!cm->pix || !cm->feat || !cm->dfeat || !cm->logits || !cm->losses || !cm->targets)
        return tk_fail(err, "out of memory");
    return 0;
}

/* nn.Linear's initialisation of the classifier, and PEFT's of the adapters. */
static void model_init(cls_model *cm, uint64_t seed) {
    tk_rng rng;
    tk_rng_seed(&rng, seed ^ 0xc1a55ull);
    size_t C = (size_t)cm->m->cfg.hidden;
    float bound = 1.0f / sqrtf((float)C);
    for (size_t i = 0; i < (size_t)cm->K * C; i++) cm->cw[i] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * bound;
    for (int k = 0; k < cm->K; k++) cm->cb[k] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * bound;
    if (cm->vp) tk_vit_peft_init(cm->vp, seed);
}

/* logits [n, K] of the images in cm->pix. */
static int model_forward(cls_model *cm, size_t n, int mode, tk_rng *rng, tk_err *err) {
    if (cm->vp) tk_vit_act_set_adapters(cm->act, tk_vit_peft_table(cm->vp), tk_vit_peft_ws(cm->vp), mode, rng);
    tk_vit_select sel = {.pooled = 1};
    if (tk_vit_train_forward(cm->m, cm->act, cm->feat, cm->pix, n, &sel, err)) return -1;
    size_t C = (size_t)cm->m->cfg.hidden, K = (size_t)cm->K;
    for (size_t b = 0; b < n; b++) memcpy(cm->logits + b * K, cm->cb, K * sizeof(float));
    tk_linear_forward(cm->logits, cm->feat, cm->cw, n, C, K, 1.0f);
    return 0;
}

/* ---- outputs ----------------------------------------------------------------------------------- */

/* Every tensor of P as PEFT keys, plus the gates. */
static int save_adapter(cls_model *cm, const tk_cls_opts *o, tk_err *err) {
    size_t nm = cm->vp ? tk_vit_peft_count(cm->vp) : 0;
    tk_st_entry *e = calloc(cm->P.n + 2 * nm + 1, sizeof *e);
    if (!e) return tk_fail(err, "out of memory");
    size_t n = 0;
    for (size_t i = 0; i < cm->P.n; i++) {
        const tk_param *p = &cm->P.items[i];
        e[n] = (tk_st_entry){.name = p->name, .dtype = TK_DT_F32, .ndim = p->ndim, .data = cm->P.data + p->offset};
        for (int d = 0; d < p->ndim; d++) e[n].shape[d] = p->shape[d];
        n++;
    }
    if (cm->vp) n += tk_vit_peft_gate_entries(cm->vp, e + n);
    char path[4200];
    const char *meta[] = {"format", "pt", NULL};
    int rc = tk_pathf(path, sizeof path, err, "%s/adapter_model.safetensors", o->out_dir) ||
             tk_st_write(path, e, n, meta, err);
    free(e);
    if (rc) return -1;
    tk_peft_config pc = o->peft;
    pc.save = NULL;
    pc.n_save = 0;
    pc.vit_layers = cm->m->cfg.n_layers;
    pc.no_task_type = 1;
    if (!cm->vp) pc.kind = TK_ADAPTER_NONE;
    if (cm->vp && !pc.vit_prefix[0]) snprintf(pc.vit_prefix, sizeof pc.vit_prefix, "vision_model.");
    snprintf(pc.base_model, sizeof pc.base_model, "%s", o->model_dir);
    rc = tk_peft_parse_save(&pc, "classifier", err) || tk_pathf(path, sizeof path, err, "%s/adapter_config.json", o->out_dir) ||
         tk_peft_config_save(&pc, path, err);
    tk_peft_config_free_save(&pc);
    return rc ? -1 : 0;
}

/* gates.jsonl in gatelog.h's format: the header, then one line per step (image tokens only). */
typedef struct {
    FILE *f;
    char path[4200];
    size_t M;
    int *hist;   /* [M, NB] */
    float *tmp;
} gate_log;

static int glog_open(gate_log *g, cls_model *cm, const tk_cls_opts *o, tk_err *err) {
    memset(g, 0, sizeof *g);
    if (!cm->vp || !tk_vit_peft_count(cm->vp)) return 0;
    g->M = tk_vit_peft_count(cm->vp);
    if (tk_pathf(g->path, sizeof g->path, err, "%s/gates.jsonl.part", o->out_dir)) return -1;
    if (!(g->hist = calloc(g->M * TK_GATELOG_NBIN, sizeof *g->hist)) ||
        !(g->tmp = malloc(cm->Bmax * cm->m->n_tokens * sizeof(float))))
        return tk_fail(err, "out of memory");
    if (!(g->f = fopen(g->path, "w"))) return tk_fail(err, "%s: cannot write", g->path);
    const tk_gate_config *gc = &o->peft.gate;
    fprintf(g->f, "{\"format\":\"tspeft-gates\",\"version\":%d,\"adapter\":\"%s\",\"gated\":%s,\"rule\":\"%s\","
               "\"lambda\":%.9g,\"eta_tau\":%.9g,\"target_keep\":", TK_GATELOG_VERSION,
            tk_adapter_kind_name(o->peft.kind), gc->enabled ? "true" : "false", tk_gate_rule_name(gc->rule),
            gc->lambda, gc->eta_tau);
    if (gc->target_keep > 0.0f) fprintf(g->f, "%.9g", gc->target_keep);
    else fputs("null", g->f);
    fprintf(g->f, ",\"warmup_steps\":%d,\"n_layers\":0,\"tower_layers\":%d,\"kinds\":[\"prompt\",\"response\","
               "\"image\",\"other\"],\"hist_lo\":[", gc->warmup_steps, cm->m->cfg.n_layers);
    for (int j = 0; j < TK_GATELOG_NBIN; j++) fprintf(g->f, "%s%.9g", j ? "," : "", tk_gatelog_bin_lo(j));
    fputs("],\"modules\":[", g->f);
    for (size_t i = 0; i < g->M; i++) {
        int l = 0, p = 0;
        tk_vit_peft_module(cm->vp, i, &l, &p);
        char key[TK_NAME_MAX];
        tk_vit_module_name(key, sizeof key, "vision_model.", l, p);
        fprintf(g->f, "%s\"%s\"", i ? "," : "", key);
    }
    fputs("]}\n", g->f);
    return fflush(g->f) ? tk_fail(err, "%s: cannot write", g->path) : 0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* One step line from the modules' statistics (the tau applied in the step: before the update). */
static int glog_step(gate_log *g, cls_model *cm, int step, const float *tau_applied, tk_err *err) {
    if (!g->f) return 0;
    size_t n = 0;
    for (size_t i = 0; i < g->M; i++) {
        int l = 0, p = 0;
        n = tk_vit_peft_module(cm->vp, i, &l, &p)->stats.n;
        break;
    }
    fprintf(g->f, "{\"step\":%d,\"n\":[0,0,%zu,0],\"tau\":[", step, n);
    for (size_t i = 0; i < g->M; i++) fprintf(g->f, "%s%.9g", i ? "," : "", tau_applied[i]);
    fputs("],\"kept\":[", g->f);
    for (size_t i = 0; i < g->M; i++) {
        int l = 0, p = 0;
        fprintf(g->f, "%s[0,0,%zu,0]", i ? "," : "", tk_vit_peft_module(cm->vp, i, &l, &p)->stats.kept);
    }
    fputs("],\"q\":[", g->f);
    for (size_t i = 0; i < g->M; i++) {
        int l = 0, p = 0;
        const tk_gate_stats *st = &tk_vit_peft_module(cm->vp, i, &l, &p)->stats;
        if (!st->n) {
            fprintf(g->f, "%snull", i ? "," : "");
            continue;
        }
        memcpy(g->tmp, st->r, st->n * sizeof(float));
        qsort(g->tmp, st->n, sizeof(float), cmp_float);
        const double qs[3] = {0.1, 0.5, 0.9};
        fprintf(g->f, "%s[", i ? "," : "");
        for (int k = 0; k < 3; k++)
            fprintf(g->f, "%s%.9g", k ? "," : "", g->tmp[(size_t)floor(qs[k] * (double)(st->n - 1))]);
        fputs("]", g->f);
    }
    fputs("],\"hist\":[", g->f);
    for (size_t i = 0; i < g->M; i++) {
        int l = 0, p = 0;
        const tk_gate_stats *st = &tk_vit_peft_module(cm->vp, i, &l, &p)->stats;
        int *h = &g->hist[i * TK_GATELOG_NBIN];
        memset(h, 0, TK_GATELOG_NBIN * sizeof *h);
        for (size_t t = 0; t < st->n; t++) h[tk_gatelog_bin(st->r[t])]++;
        fprintf(g->f, "%s[", i ? "," : "");
        for (int j = 0; j < TK_GATELOG_NBIN; j++) fprintf(g->f, "%s%d", j ? "," : "", h[j]);
        fputs("]", g->f);
    }
    fputs("]}\n", g->f);
    return fflush(g->f) ? tk_fail(err, "%s: cannot write", g->path) : 0;
}

static void glog_close(gate_log *g, int keep) {
    if (g->f) {
        fclose(g->f);
        if (!keep) remove(g->path);
    }
    free(g->hist);
    free(g->tmp);
}

/* ---- training ------------------------------------------------------------------------------------ */

static void shuffle(size_t *a, size_t n, tk_rng *rng) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(tk_rng_u64(rng) % i), t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

int tk_cls_train(const tk_cls_opts *o, tk_err *err) {
    if (o->steps < 1 || o->batch_size < 1 || o->batch_size > 65536)
        return tk_fail(err, "--steps and --batch-size must be >= 1 (batch at most 65536)");
    if (!(o->lr >= 0.0f) || !(o->tower_lr >= 0.0f))
        return tk_fail(err, "learning rates must be >= 0");
    if (o->threads > 0) tk_set_threads(o->threads);
    cls_data d;
    cls_model cm;
    memset(&cm, 0, sizeof cm);
    gate_log gl = {0};
    size_t *order = NULL;
    float *tau_applied = NULL;
    FILE *tlog = NULL;
    char tpath[4200] = "";
    int rc = -1, ok = 0;
    if (load_data(&d, o->data, o->n_data, (size_t)o->limit, err)) goto done;
    size_t B = (size_t)o->batch_size;
    if (B > d.n) B = d.n;
    if (model_open(&cm, o, d.n_classes, B, 1, err)) goto done;
    model_init(&cm, o->seed);
    if (o->out_dir) {
        if (tk_mkdir_p(o->out_dir, err) || glog_open(&gl, &cm, o, err) ||
            tk_pathf(tpath, sizeof tpath, err, "%s/train_log.jsonl.part", o->out_dir))
            goto done;
        if (!(tlog = fopen(tpath, "w"))) {
            tk_fail(err, "%s: cannot write", tpath);
            goto done;
        }
    }
    size_t nm = cm.vp ? tk_vit_peft_count(cm.vp) : 0;
    order = malloc(d.n * sizeof *order);
    tau_applied = calloc(nm + 1, sizeof *tau_applied);
    if (!order || !tau_applied) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < d.n; i++) order[i] = i;
    tk_rng rng, drop_rng;
    tk_rng_seed(&rng, o->seed);
    tk_rng_seed(&drop_rng, o->seed ^ 0x9e3779b97f4a7c15ull);
    shuffle(order, d.n, &rng);
    size_t pos = 0, K = (size_t)d.n_classes, C = (size_t)cm.m->cfg.hidden;
    tk_sched sch = {o->sched, o->lr, o->warmup_steps, o->steps};
    tk_sched sch_t = {o->sched, o->tower_lr > 0.0f ? o->tower_lr : o->lr, o->warmup_steps, o->steps};
    if (!o->quiet)
        printf("image classification: %s tower, %zu images, %d classes, %zu adapted tower modules (%s%s), "
               "classifier%s; batch %zu, %d steps\n", cm.m->cfg.kind == TK_VIT_CLIP ? "CLIP" : "SigLIP", d.n,
               d.n_classes, nm, nm ? tk_adapter_kind_name(o->peft.kind) : "none",
               nm && o->peft.gate.enabled ? ", TS-gated" : "", o->tune_tower ? " + the whole tower" : "", B,
               o->steps);
    double t_start = tk_time(), loss_acc = 0.0;
    size_t correct_acc = 0, seen_acc = 0;
    for (int step = 1; step <= o->steps; step++) {
        double ts = tk_time();
        size_t *bi = order + pos;
        if (pos + B > d.n) { /* a new epoch: reshuffle */
            shuffle(order, d.n, &rng);
            pos = 0;
            bi = order;
        }
        pos += B;
        if (make_pixels(cm.pix, &d, bi, B, &cm.pp, err)) goto done;
        for (size_t b = 0; b < B; b++) cm.targets[b] = d.items[bi[b]].label;
        tk_params_zero_grad(&cm.P);
        if (o->tune_tower) tk_params_zero_grad(&cm.PT);
        if (cm.vp) tk_vit_peft_reset_stats(cm.vp);
        for (size_t i = 0; i < nm; i++) {
            int l = 0, p = 0;
            tau_applied[i] = tk_vit_peft_module(cm.vp, i, &l, &p)->tau;
        }
        if (model_forward(&cm, B, TK_FWD_TRAIN, &drop_rng, err)) goto done;
        for (size_t b = 0; b < B; b++) { /* accuracy of the step's batch, before the update */
            size_t best = 0;
            for (size_t k = 1; k < K; k++)
                if (cm.logits[b * K + k] > cm.logits[b * K + best]) best = k;
            correct_acc += best == (size_t)cm.targets[b];
        }
        seen_acc += B;
        double loss = tk_cross_entropy_fused(cm.losses, cm.logits, cm.logits, cm.targets, B, K, 1.0f / (float)B) / (double)B;
        if (!isfinite(loss)) {
            tk_fail(err, "step %d: the loss is not finite", step);
            goto done;
        }
        /* classifier: dW += dlogits^T feat, db += colsum; dfeat = dlogits W */
        tk_linear_backward(NULL, cm.dcw, cm.logits, cm.feat, cm.cw, B, C, K);
        for (size_t b = 0; b < B; b++)
            for (size_t k = 0; k < K; k++) cm.dcb[k] += cm.logits[b * K + k];
        tk_linear_backward_dx(cm.dfeat, cm.logits, cm.cw, B, C, K, 0.0f);
        if (tk_vit_train_backward(cm.m, cm.act, o->tune_tower ? cm.g : NULL, NULL, cm.dfeat, err)) goto done;
        if (cm.vp && tk_vit_peft_update_gates(cm.vp, step, err)) goto done;
        double n1 = tk_grad_norm(cm.P.grad, cm.P.total), n2 = o->tune_tower ? tk_grad_norm(cm.PT.grad, cm.PT.total) : 0.0;
        double gnorm = sqrt(n1 * n1 + n2 * n2);
        if (!isfinite(gnorm)) {
            tk_fail(err, "step %d: the gradient is not finite", step);
            goto done;
        }
        tk_clip_grad_to(cm.P.grad, cm.P.total, gnorm, o->max_grad_norm);
        if (o->tune_tower) tk_clip_grad_to(cm.PT.grad, cm.PT.total, gnorm, o->max_grad_norm);
        float lr = tk_sched_lr(&sch, step - 1);
        tk_params_adamw(&cm.P, lr, 0.9f, 0.999f, 1e-8f, o->weight_decay, step);
        if (o->tune_tower) tk_params_adamw(&cm.PT, tk_sched_lr(&sch_t, step - 1), 0.9f, 0.999f, 1e-8f, o->weight_decay, step);
        double keep = 1.0;
        if (nm && o->peft.gate.enabled) {
            size_t kept = 0, seen = 0;
            for (size_t i = 0; i < nm; i++) {
                int l = 0, p = 0;
                const tk_gate_stats *st = &tk_vit_peft_module(cm.vp, i, &l, &p)->stats;
                kept += st->kept;
                seen += st->n;
            }
            keep = seen ? (double)kept / (double)seen : 1.0;
        }
        if (glog_step(&gl, &cm, step, tau_applied, err)) goto done;
        double now = tk_time();
        if (tlog) {
            size_t tok = B * cm.m->n_tokens;
            fprintf(tlog, "{\"step\":%d,\"loss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens\":%zu,\"seconds\":%.6g,"
                          "\"tokens_per_s\":%.6g,\"keep\":%.6g}\n", step, loss, (double)lr, gnorm, tok, now - ts,
                    now > ts ? (double)tok / (now - ts) : 0.0, keep);
            if (fflush(tlog)) {
                tk_fail(err, "%s: cannot write", tpath);
                goto done;
            }
        }
        loss_acc += loss;
        if (!o->quiet && (step % (o->log_every > 0 ? o->log_every : 1) == 0 || step == o->steps)) {
            int span = step % (o->log_every > 0 ? o->log_every : 1);
            span = span ? span : (o->log_every > 0 ? o->log_every : 1);
            printf("step %d/%d  loss %.4f  train acc %.3f  lr %.3g  grad %.3f  keep %.3f  %.1f s\n", step, o->steps,
                   loss_acc / span, (double)correct_acc / (double)seen_acc, (double)lr, gnorm, keep, now - t_start);
            fflush(stdout);
            loss_acc = 0.0;
            correct_acc = seen_acc = 0;
        }
    }
    if (o->out_dir) {
        if (save_adapter(&cm, o, err)) goto done;
        if (o->tune_tower) {
            char dir[4200];
            if (tk_pathf(dir, sizeof dir, err, "%s/vision_tower", o->out_dir) || tk_vit_save(cm.m, dir, err)) goto done;
        }
        char fin[4200];
        if (tlog) {
            fclose(tlog);
            tlog = NULL;
            if (tk_pathf(fin, sizeof fin, err, "%s/train_log.jsonl", o->out_dir)) goto done;
            if (rename(tpath, fin)) {
                tk_fail(err, "%s: cannot rename", tpath);
                goto done;
            }
        }
        if (gl.f) {
            fclose(gl.f);
            gl.f = NULL;
            if (tk_pathf(fin, sizeof fin, err, "%s/gates.jsonl", o->out_dir)) goto done;
            if (rename(gl.path, fin)) {
                tk_fail(err, "%s: cannot rename", gl.path);
                goto done;
            }
        }
        if (!o->quiet) printf("wrote %s\n", o->out_dir);
    }
    ok = 1;
    rc = 0;
done:
    glog_close(&gl, ok);
    if (tlog) {
        fclose(tlog);
        remove(tpath);
    }
    free(order);
    free(tau_applied);
    model_free(&cm);
    data_free(&d);
    return rc;
}

/* ---- evaluation ---------------------------------------------------------------------------------- */

/* Reads every tensor of P from dir/adapter_model.safetensors (shapes checked) and the gates. */
static int load_adapter(cls_model *cm, const char *dir, tk_err *err) {
    char path[4200];
    if (tk_pathf(path, sizeof path, err, "%s/adapter_model.safetensors", dir)) return -1;
    tk_st_file *f = tk_st_open(path, err);
    if (!f) return -1;
    int rc = -1;
    for (size_t i = 0; i < cm->P.n; i++) {
        const tk_param *p = &cm->P.items[i];
        const tk_st_tensor *t = tk_st_find(f, p->name);
        if (!t) {
            tk_fail(err, "%s: tensor %s missing", path, p->name);
            goto done;
        }
        if (strcmp(p->name, "base_model.model.classifier.weight") == 0 && t->ndim == 2 && t->shape[0] != p->shape[0]) {
            tk_fail(err, "%s: the classifier has %lld classes, the data %lld (n_classes in its meta)", path,
                    (long long)t->shape[0], (long long)p->shape[0]);
            goto done;
        }
        if (tk_st_check_shape(f, t, p->ndim, p->shape, err) || tk_st_read_f32(f, t, cm->P.data + p->offset, p->numel, err))
            goto done;
    }
    if (cm->vp && tk_vit_peft_load_gates(cm->vp, f, err)) goto done;
    rc = 0;
done:
    tk_st_close(f);
    return rc;
}

int tk_cls_eval(const tk_cls_opts *o, tk_cls_eval_result *res, tk_err *err) {
    memset(res, 0, sizeof *res);
    if (!o->adapter_dir) return tk_fail(err, "eval --task image-classification needs --adapter DIR");
    if (o->threads > 0) tk_set_threads(o->threads);
    tk_cls_opts oo = *o;
    char path[4200];
    if (tk_pathf(path, sizeof path, err, "%s/adapter_config.json", o->adapter_dir) ||
        tk_peft_config_load(&oo.peft, path, err))
        return -1;
    tk_peft_config_free_save(&oo.peft);
    oo.tune_tower = 0;
    cls_data d;
    cls_model cm;
    memset(&cm, 0, sizeof cm);
    size_t *idx = NULL;
    int rc = -1;
    double t0 = tk_time();
    if (load_data(&d, o->data, o->n_data, (size_t)o->limit, err)) goto done;
    size_t B = o->batch_size > 0 ? (size_t)o->batch_size : 32;
    if (B > d.n) B = d.n;
    if (model_open(&cm, &oo, d.n_classes, B, 0, err) || load_adapter(&cm, o->adapter_dir, err)) goto done;
    size_t K = (size_t)d.n_classes, nm = cm.vp ? tk_vit_peft_count(cm.vp) : 0, kept = 0, seen = 0;
    size_t T = cm.m->n_tokens;
    if (!(idx = malloc(B * sizeof *idx)) || !(res->samples = calloc(d.n, sizeof *res->samples))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t i0 = 0; i0 < d.n; i0 += B) {
        size_t n = d.n - i0 < B ? d.n - i0 : B;
        for (size_t b = 0; b < n; b++) idx[b] = i0 + b;
        if (make_pixels(cm.pix, &d, idx, n, &cm.pp, err) || model_forward(&cm, n, TK_FWD_EVAL, NULL, err)) goto done;
        for (size_t b = 0; b < n; b++) {
            size_t best = 0;
            for (size_t k = 1; k < K; k++)
                if (cm.logits[b * K + k] > cm.logits[b * K + best]) best = k;
            res->correct += best == (size_t)d.items[i0 + b].label;
            res->samples[i0 + b] = (tk_cls_sample){.label = d.items[i0 + b].label, .pred = (int)best, .keep = 1.0f};
        }
        for (size_t b = 0; b < n && nm; b++) { /* the gate decisions of each image: tokens b*T .. b*T+T-1 */
            size_t kb = 0;
            for (size_t i = 0; i < nm; i++) {
                int l = 0, p = 0;
                const tk_adapted_linear *L = tk_vit_peft_module(cm.vp, i, &l, &p);
                if (!L->gated) kb += T;
                else
                    for (size_t t = b * T; t < (b + 1) * T; t++) kb += L->S[t];
            }
            res->samples[i0 + b].keep = (float)((double)kb / (double)(nm * T));
            kept += kb;
            seen += nm * T;
        }
    }
    res->n = d.n;
    res->n_classes = d.n_classes;
    res->top1 = (double)res->correct / (double)d.n;
    res->keep = seen ? (double)kept / (double)seen : 1.0;
    res->seconds = tk_time() - t0;
    rc = 0;
done:
    if (rc) tk_cls_eval_result_free(res);
    free(idx);
    model_free(&cm);
    data_free(&d);
    tk_peft_config_free(&oo.peft);
    return rc;
}

void tk_cls_eval_result_free(tk_cls_eval_result *r) {
    free(r->samples);
    r->samples = NULL;
}
