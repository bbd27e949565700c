/* multimodal.c: see multimodal.h. */
#include "multimodal.h"

#include "../../vision/image.h"
#include "../../vision/pos_interp.h"
#include "../../vision/preprocess.h"
#include "../../vision/projector.h"
#include "../../vision/vit.h"

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
};

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

int tk_mm_register(void *ctx, tk_params *P, tk_err *err) {
    tk_mm *mm = ctx;
    return tk_projector_register(&mm->proj, P, NULL, err);
}

int tk_mm_init_weights(tk_mm *mm, const char *file, uint64_t seed, tk_err *err) {
    if (file) return tk_projector_load(&mm->proj, file, err);
    tk_projector_random(&mm->proj, seed);
    return 0;
}

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
        mm->img_cap = n;
        if (!mm->pix || !mm->feat || !mm->out || !mm->cache || !mm->dst || !(mm->ws = tk_vit_ws_alloc(mm->vit, n, err))) {
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

int tk_mm_forward(tk_mm *mm, const tk_loader_batch *b, size_t B, size_t T, tk_llama_acts *a, size_t llm_dim,
                  const char *where, tk_err *err) {
    TK_ASSERT(llm_dim == mm->cl);
    a->image_embeds = NULL;
    a->d_image_embeds = NULL;
    mm->n_img = 0;
    size_t n = b ? b->n_images : 0;
    if (n == 0) return 0;
    if (reserve(mm, n, B * T, err)) return -1;
    size_t S = tk_preproc_numel(&mm->pre), nt = mm->n_tok, cv = mm->cv;
    /* pixels of encoded images (compacted), features of cached ones */
    size_t n_enc = 0, *enc_of = calloc(n, sizeof *enc_of);
    if (!enc_of) return tk_fail(err, "out of memory");
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        const tk_shard_image *im = &b->images[i].image;
        char name[256];
        snprintf(name, sizeof name, "%s: image %zu of the batch", where, i);
        if (im->kind == TK_IMAGE_ENCODED) {
            if (load_pixels(mm, mm->pix + n_enc * S, im->data, im->nbytes, name, err)) goto done;
            enc_of[i] = ++n_enc; /* 1-based slot */
        } else if (im->kind == TK_IMAGE_F16_FEATURES) {
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
        if (tk_vit_forward(mm->vit, mm->ws, tmp, mm->pix, n_enc, &mm->sel, err)) {
            if (tmp != mm->feat) free(tmp);
            goto done;
        }
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
    free(enc_of);
    return rc;
}

void tk_mm_backward(tk_mm *mm) {
    size_t n = mm->n_img, nt = mm->n_tok;
    if (!n) return;
    /* d(projections) = the image rows of d(embeddings); the encoder is frozen: no dx */
    for (size_t i = 0; i < n; i++)
        memcpy(mm->out + i * nt * mm->cl, mm->d_embeds + mm->dst[i] * mm->cl, nt * mm->cl * sizeof(float));
    tk_projector_backward(&mm->proj, NULL, mm->cache, mm->out, mm->feat, n * nt);
}

int tk_mm_embed_image(tk_mm *mm, const uint8_t *bytes, size_t n, const char *name, float *out, tk_err *err) {
    if (reserve(mm, 1, 1, err) || load_pixels(mm, mm->pix, bytes, n, name, err) ||
        tk_vit_forward(mm->vit, mm->ws, mm->feat, mm->pix, 1, &mm->sel, err))
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
