/* multimodal.c: see multimodal.h. */
#include "multimodal.h"

#include "../../vision/image.h"
#include "../../vision/pos_interp.h"
#include "../../vision/preprocess.h"
#include "../../vision/projector.h"
#include "../../vision/vit.h"
#include "../../vision/vit_peft.h"
#include "../../vision/vit_train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tk_mm {
    tk_vit *vit;
    tk_vit_ws *ws;
    tk_vit_select sel;
    tk_preproc pre;
    tk_projector proj;
    size_t n_tok, cv, cl; /* tokens per image, vision width, LLM width */
    size_t img_cap, rows_cap;
    float *pix;      /* [img_cap, 3 S S] preprocessed images (encoded ones, compacted) */
    float *feat;     /* [img_cap * n_tok, cv] encoder features */
    float *out;      /* [img_cap * n_tok, cl] projections (backward: their gradient) */
    float *cache;    /* projector cache */
    float *embeds, *d_embeds; /* [rows_cap, cl] rows of the batch (only image runs are used) */
    size_t *dst;     /* [img_cap] first batch row (b*T + t) of each image's run */
    size_t n_img;
    /* a trained tower (adapters on its projections and/or every tensor): the training forward keeps
     * the activations the backward needs (vit_train.h) */
    tk_vit_peft *vp;     /* adapters on the tower, or NULL */
    int tune;            /* every tower tensor trains (--tune-vision-tower) */
    float tower_lr_mult; /* the tower's tensors and adapters step at this times the schedule (0: 1) */
    tk_vit *g;           /* the tower's gradients (tune) */
    tk_vit_act *act;     /* activations of act_cap images */
    size_t act_cap;
    float *dfeat;        /* [img_cap * n_tok, cv] d(features), then compacted to the encoded images */
    size_t *enc_of;      /* [img_cap] 1-based slot of each image among the encoded ones (0: cached) */
    size_t n_enc;        /* images the tower ran on in the last forward */
    int mode;            /* TK_FWD_TRAIN or TK_FWD_EVAL for the tower's adapters */
    tk_rng rng;          /* the tower adapters' dropout, seeded per micro-batch (tk_mm_set_train) */
    uint64_t seed;
};

static int tower_trains(const tk_mm *mm) { return mm->tune || mm->vp != NULL; }

/* Layers the selected hidden state needs (vit.h: hidden state k is the output of layer k - 1; the
 * later layers never run, so their adapters see no token). */
static int layers_run(const tk_mm *mm) {
    int L = mm->vit->cfg.n_layers;
    return mm->sel.layer < 0 ? L + 1 + mm->sel.layer : mm->sel.layer;
}

size_t tk_mm_tokens(const tk_mm *mm) { return mm->n_tok; }

tk_mm *tk_mm_open(const tk_mm_opts *o, size_t llm_dim, tk_err *err) {
    tk_mm *mm = calloc(1, sizeof *mm);
    if (!mm) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    tk_proj_kind pk = TK_PROJ_MLP2X_GELU;
    tk_vit_feature feat = TK_VIT_FEATURE_PATCH;
    tk_preproc_mode pm = TK_PREPROC_CLIP;
    if (o->projector_type && tk_proj_kind_parse(o->projector_type, &pk)) {
        tk_fail(err, "--projector-type must be linear or mlp2x_gelu, not \"%s\"", o->projector_type);
        goto fail;
    }
    if (o->projector && tk_projector_kind_of(o->projector, o->projector_type, &pk, err)) goto fail;
    if (o->feature && tk_vit_feature_parse(o->feature, &feat)) {
        tk_fail(err, "--vision-feature must be patch or cls_patch, not \"%s\"", o->feature);
        goto fail;
    }
    if (o->preprocess && tk_preproc_mode_from_name(o->preprocess, &pm, err)) goto fail;
    if (!(mm->vit = tk_vit_open(o->tower, o->prefix, err))) goto fail;
    if (o->image_size < 0) {
        tk_fail(err, "--image-size %d: expected a positive number of pixels", o->image_size);
        goto fail;
    }
    if (o->image_size && tk_vit_set_image_size(mm->vit, o->image_size, o->interpolate_pos, err)) {
        tk_err_prefix(err, o->tower);
        goto fail;
    }
    mm->sel.layer = o->layer ? o->layer : -2;
    mm->sel.feature = feat;
    mm->sel.post_norm = 0;
    tk_preproc_init(&mm->pre, pm, (size_t)mm->vit->image_size);
    mm->n_tok = tk_vit_out_tokens(mm->vit, feat);
    mm->cv = (size_t)mm->vit->cfg.hidden;
    mm->cl = llm_dim;
    if (tk_projector_init(&mm->proj, pk, mm->cv, mm->cl, err)) goto fail;
    return mm;
fail:
    tk_mm_free(mm);
    return NULL;
}

void tk_mm_free(tk_mm *mm) {
    if (!mm) return;
    tk_vit_act_free(mm->act);
    tk_vit_peft_free(mm->vp);
    tk_vit_close(mm->g);
    free(mm->dfeat);
    free(mm->enc_of);
    tk_vit_ws_free(mm->ws);
    tk_vit_close(mm->vit);
    tk_projector_free(&mm->proj);
    free(mm->pix);
    free(mm->feat);
    free(mm->out);
    free(mm->cache);
    free(mm->embeds);
    free(mm->d_embeds);
    free(mm->dst);
    free(mm);
}

int tk_mm_set_tower_training(tk_mm *mm, const tk_peft_config *pc, int tune, float lr_mult, uint64_t seed,
                             tk_err *err) {
    TK_ASSERT(!mm->vp && !mm->g);
    mm->tune = tune;
    mm->tower_lr_mult = lr_mult;
    mm->seed = seed;
    if (pc && pc->kind != TK_ADAPTER_NONE && tk_peft_has_vit(pc)) {
        char prefix[96];
        snprintf(prefix, sizeof prefix, "base_model.model.%s", pc->vit_prefix);
        if (!(mm->vp = tk_vit_peft_new(mm->vit, pc, prefix, err))) return -1;
    }
    if (tune && !(mm->g = tk_vit_zeros(&mm->vit->cfg, err))) return -1;
    return 0;
}

int tk_mm_register(void *ctx, tk_params *P, tk_err *err) {
    tk_mm *mm = ctx;
    if (tk_projector_register(&mm->proj, P, NULL, err)) return -1;
    size_t first = P->n;
    /* the tower's tensors ("vision_tower.vision_model.<name>", external: the tuned tower is saved as its
     * own directory by tk_mm_save_tower) before its adapters, which take their base weights from the block */
    if (mm->tune && tk_vit_register_params(mm->vit, mm->g, P, "vision_tower.vision_model.", 1, err)) return -1;
    if (mm->vp && tk_vit_peft_register(mm->vp, P, err)) return -1;
    for (size_t i = first; i < P->n && mm->tower_lr_mult > 0.0f; i++) P->items[i].lr_mult = mm->tower_lr_mult;
    return 0;
}

/* tk_llama.extra_init: the block is allocated (the tower's tensors may have moved into it). */
static void mm_init(void *ctx, uint64_t seed) {
    tk_mm *mm = ctx;
    if (!mm->vp) return;
    tk_vit_peft_bind_base(mm->vp);
    tk_vit_peft_init(mm->vp, seed ^ 0x7157u);
}

static size_t mm_entries(void *ctx, tk_st_entry *e) {
    tk_mm *mm = ctx;
    if (!mm->vp) return 0;
    if (!e) return 2 * tk_vit_peft_count(mm->vp);
    return tk_vit_peft_gate_entries(mm->vp, e);
}

static int mm_load(void *ctx, const tk_st_file *f, tk_err *err) {
    tk_mm *mm = ctx;
    return mm->vp ? tk_vit_peft_load_gates(mm->vp, f, err) : 0;
}

void tk_mm_hook(tk_mm *mm, tk_llama *m) {
    m->extra_params = tk_mm_register;
    m->extra_init = mm_init;
    m->extra_entries = mm_entries;
    m->extra_load = mm_load;
    m->extra_ctx = mm;
    m->vit_targets = TK_VIT_EXTRA;
}

int tk_mm_init_weights(tk_mm *mm, const char *file, uint64_t seed, tk_err *err) {
    if (file) return tk_projector_load(&mm->proj, file, err);
    tk_projector_random(&mm->proj, seed);
    return 0;
}

void tk_mm_set_train(tk_mm *mm, int train, uint64_t key) {
    mm->mode = train ? TK_FWD_TRAIN : TK_FWD_EVAL;
    if (train) tk_rng_seed(&mm->rng, mm->seed ^ 0x70e3u ^ (key * 0x9e3779b97f4a7c15ull));
}

void tk_mm_reset_gate_stats(tk_mm *mm) {
    if (mm->vp) tk_vit_peft_reset_stats(mm->vp);
}

int tk_mm_update_gates(tk_mm *mm, int step, tk_err *err) {
    return mm->vp ? tk_vit_peft_update_gates(mm->vp, step, err) : 0;
}

void tk_mm_after_optimizer(tk_mm *mm) {
    if (mm->tune && mm->vit->pos_map) tk_vit_pos_refresh(mm->vit);
}

size_t tk_mm_tower_modules(tk_mm *mm, tk_adapted_linear **mods, int *layer, int *proj) {
    size_t n = mm->vp ? tk_vit_peft_count(mm->vp) : 0, k = 0;
    for (size_t i = 0; i < n; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(mm->vp, i, &l, &j);
        if (l >= layers_run(mm)) continue;
        if (mods) {
            mods[k] = L;
            layer[k] = l;
            proj[k] = j;
        }
        k++;
    }
    return k;
}

void tk_mm_tower_key(const tk_mm *mm, int layer, int proj, char *buf, size_t n) {
    tk_vit_peft_key(mm->vp, layer, proj, buf, n);
}

int tk_mm_tower_layers(const tk_mm *mm) { return mm->vit->cfg.n_layers; }

size_t tk_mm_tower_rows(const tk_mm *mm) { return mm->n_enc * (size_t)mm->vit->n_tokens; }

int tk_mm_save_tower(const tk_mm *mm, const char *dir, tk_err *err) { return tk_vit_save(mm->vit, dir, err); }

int tk_mm_save(const tk_mm *mm, const char *path, tk_err *err) { return tk_projector_save(&mm->proj, path, err); }

/* Buffers for n images and R batch rows. */
static int reserve(tk_mm *mm, size_t n, size_t R, tk_err *err) {
    if (n > mm->img_cap) {
        size_t S = tk_preproc_numel(&mm->pre), nt = n * mm->n_tok;
        free(mm->pix);
        free(mm->feat);
        free(mm->out);
        free(mm->cache);
        free(mm->dst);
        tk_vit_ws_free(mm->ws);
        mm->ws = NULL;
        mm->pix = malloc(n * S * sizeof(float));
        mm->feat = malloc(nt * mm->cv * sizeof(float));
        mm->out = malloc(nt * mm->cl * sizeof(float));
        size_t cf = tk_projector_cache_floats(&mm->proj, nt);
        mm->cache = malloc((cf ? cf : 1) * sizeof(float));
        mm->dst = malloc(n * sizeof *mm->dst);
        free(mm->dfeat);
        free(mm->enc_of);
        mm->dfeat = tower_trains(mm) ? malloc(nt * mm->cv * sizeof(float)) : NULL;
        mm->enc_of = calloc(n, sizeof *mm->enc_of);
        mm->img_cap = n;
        if (!mm->pix || !mm->feat || !mm->out || !mm->cache || !mm->dst || !mm->enc_of ||
            (tower_trains(mm) && !mm->dfeat) || !(mm->ws = tk_vit_ws_alloc(mm->vit, n, err))) {
            mm->img_cap = 0;
            return tk_fail(err, "out of memory for %zu images", n);
        }
    }
    if (R > mm->rows_cap) {
        free(mm->embeds);
        free(mm->d_embeds);
        mm->embeds = malloc(R * mm->cl * sizeof(float));
        mm->d_embeds = malloc(R * mm->cl * sizeof(float));
        mm->rows_cap = R;
        if (!mm->embeds || !mm->d_embeds) {
            mm->rows_cap = 0;
            return tk_fail(err, "out of memory");
        }
    }
    return 0;
}

/* Decodes and preprocesses one encoded image into px. */
static int load_pixels(tk_mm *mm, float *px, const uint8_t *bytes, size_t n, const char *name, tk_err *err) {
    tk_image *img = tk_image_decode(bytes, n, name, 0, err);
    if (!img) return -1;
    int rc = tk_preprocess(px, img, &mm->pre, err);
    tk_image_free(img);
    return rc;
}

/* out [n, n_tok, cv] = the selected features of mm->pix's first n images: the inference forward for a
 * frozen tower, the training forward (activations kept for tk_mm_backward; adapters applied) else. */
static int tower_forward(tk_mm *mm, float *out, size_t n, tk_err *err) {
    if (!tower_trains(mm)) return tk_vit_forward(mm->vit, mm->ws, out, mm->pix, n, &mm->sel, err);
    if (n > mm->act_cap) {
        tk_vit_act_free(mm->act);
        mm->act_cap = 0;
        if (!(mm->act = tk_vit_act_alloc(mm->vit, n, err))) return -1;
        mm->act_cap = n;
    }
    if (mm->vp) {
        if (tk_vit_peft_alloc(mm->vp, n * mm->vit->n_tokens, err)) return -1;
        tk_vit_act_set_adapters(mm->act, tk_vit_peft_table(mm->vp), tk_vit_peft_ws(mm->vp), mm->mode, &mm->rng);
    }
    return tk_vit_train_forward(mm->vit, mm->act, out, mm->pix, n, &mm->sel, err);
}

int tk_mm_forward(tk_mm *mm, const tk_loader_batch *b, size_t B, size_t T, tk_llama_acts *a, size_t llm_dim,
                  const char *where, tk_err *err) {
    TK_ASSERT(llm_dim == mm->cl);
    a->image_embeds = NULL;
    a->d_image_embeds = NULL;
    mm->n_img = 0;
    mm->n_enc = 0;
    size_t n = b ? b->n_images : 0;
    if (n == 0) return 0;
    if (reserve(mm, n, B * T, err)) return -1;
    size_t S = tk_preproc_numel(&mm->pre), nt = mm->n_tok, cv = mm->cv;
    /* pixels of encoded images (compacted), features of cached ones */
    size_t n_enc = 0, *enc_of = mm->enc_of;
    memset(enc_of, 0, n * sizeof *enc_of);
    mm->n_enc = 0;
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        const tk_shard_image *im = &b->images[i].image;
        char name[256];
        snprintf(name, sizeof name, "%s: image %zu of the batch", where, i);
        if (im->kind == TK_IMAGE_ENCODED) {
            if (load_pixels(mm, mm->pix + n_enc * S, im->data, im->nbytes, name, err)) goto done;
            enc_of[i] = ++n_enc; /* 1-based slot */
        } else if (im->kind == TK_IMAGE_F16_FEATURES) {
            if (tower_trains(mm)) {
                tk_fail(err, "%s holds cached encoder features, but the vision tower trains (adapters on it or "
                             "--tune-vision-tower): convert the images without --encoder", name);
                goto done;
            }
            if (im->ndim != 2 || im->shape[0] != nt || im->shape[1] != cv || im->nbytes != 2 * nt * cv) {
                tk_fail(err, "%s: cached features of shape [%llu, %llu], but the encoder gives [%zu, %zu]", name,
                        (unsigned long long)im->shape[0], (unsigned long long)(im->ndim > 1 ? im->shape[1] : 0), nt, cv);
                goto done;
            }
            float *f = mm->feat + i * nt * cv;
            for (size_t k = 0; k < nt * cv; k++) {
                uint16_t h;
                memcpy(&h, im->data + 2 * k, 2);
                f[k] = tk_f16_to_f32(h);
            }
        } else {
            tk_fail(err, "%s: unknown image payload kind %u", name, (unsigned)im->kind);
            goto done;
        }
    }
    if (n_enc) { /* the frozen encoder, batched; then scatter to the images' feature rows */
        float *tmp = n_enc == n ? mm->feat : malloc(n_enc * nt * cv * sizeof(float));
        if (!tmp) {
            tk_fail(err, "out of memory");
            goto done;
        }
        if (tower_forward(mm, tmp, n_enc, err)) {
            if (tmp != mm->feat) free(tmp);
            goto done;
        }
        mm->n_enc = n_enc;
        if (tmp != mm->feat) {
            for (size_t i = 0; i < n; i++)
                if (enc_of[i]) memcpy(mm->feat + i * nt * cv, tmp + (enc_of[i] - 1) * nt * cv, nt * cv * sizeof(float));
            free(tmp);
        }
    }
    /* where each image goes: the k-th image of a sample fills the sample's k-th run of image tokens */
    for (size_t i = 0; i < n; i++) {
        const tk_loader_image *li = &b->images[i];
        const tk_loader_sample *sm = &b->samples[li->sample];
        size_t k = 0;
        for (size_t j = i; j > 0 && b->images[j - 1].sample == li->sample; j--) k++;
        const uint8_t *kd = b->kinds + (size_t)sm->row * T;
        size_t t = sm->start, end = (size_t)sm->start + sm->len, run = 0, found = 0;
        while (t < end) {
            if (kd[t] != TK_KIND_IMAGE) {
                t++;
                continue;
            }
            size_t s0 = t;
            while (t < end && kd[t] == TK_KIND_IMAGE) t++;
            if (run++ == k) {
                if (t - s0 != nt) {
                    tk_fail(err, "%s: record %llu: image run %zu holds %zu tokens but the encoder gives %zu features "
                                 "(convert with --image-tokens %zu; or the record was cut by --max-seq-len)",
                            where, (unsigned long long)sm->record, k, t - s0, nt, nt);
                    goto done;
                }
                mm->dst[i] = (size_t)sm->row * T + s0;
                found = 1;
                break;
            }
        }
        if (!found) {
            tk_fail(err, "%s: record %llu has %zu image(s) but fewer runs of image tokens (cut by --max-seq-len?)", where,
                    (unsigned long long)sm->record, k + 1);
            goto done;
        }
    }
    tk_projector_forward(&mm->proj, mm->out, mm->cache, mm->feat, n * nt);
    for (size_t i = 0; i < n; i++)
        memcpy(mm->embeds + mm->dst[i] * mm->cl, mm->out + i * nt * mm->cl, nt * mm->cl * sizeof(float));
    mm->n_img = n;
    a->image_embeds = mm->embeds;
    a->d_image_embeds = mm->d_embeds;
    rc = 0;
done:
    return rc;
}

int tk_mm_backward(tk_mm *mm, tk_err *err) {
    size_t n = mm->n_img, nt = mm->n_tok, cv = mm->cv;
    if (!n) return 0;
    /* d(projections) = the image rows of d(embeddings) */
    for (size_t i = 0; i < n; i++)
        memcpy(mm->out + i * nt * mm->cl, mm->d_embeds + mm->dst[i] * mm->cl, nt * mm->cl * sizeof(float));
    if (!tower_trains(mm) || !mm->n_enc) { /* a frozen encoder: no d(features) */
        tk_projector_backward(&mm->proj, NULL, mm->cache, mm->out, mm->feat, n * nt);
        return 0;
    }
    memset(mm->dfeat, 0, n * nt * cv * sizeof(float));
    tk_projector_backward(&mm->proj, mm->dfeat, mm->cache, mm->out, mm->feat, n * nt);
    TK_ASSERT(mm->n_enc == n); /* a trained tower refuses cached features: image i is the tower's image i */
    return tk_vit_train_backward(mm->vit, mm->act, mm->g, NULL, mm->dfeat, err);
}

int tk_mm_embed_image(tk_mm *mm, const uint8_t *bytes, size_t n, const char *name, float *out, tk_err *err) {
    mm->mode = TK_FWD_EVAL;
    if (reserve(mm, 1, 1, err) || load_pixels(mm, mm->pix, bytes, n, name, err) ||
        tower_forward(mm, mm->feat, 1, err))
        return -1;
    tk_projector_forward(&mm->proj, out, mm->cache, mm->feat, mm->n_tok);
    return 0;
}

size_t tk_mm_feature_dim(const tk_mm *mm) { return mm->cv; }

int tk_mm_image_features(void *ctx, const void *img, float *out, size_t *dim, tk_err *err) {
    tk_mm *mm = ctx;
    if (reserve(mm, 1, 1, err) || tk_preprocess(mm->pix, (const tk_image *)img, &mm->pre, err) ||
        tk_vit_forward(mm->vit, mm->ws, out, mm->pix, 1, &mm->sel, err))
        return -1;
    *dim = mm->cv;
    return 0;
}
