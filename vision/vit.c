/* vit.c: CLIP / SigLIP vision transformers (see vit.h): config, loading, random weights, forward.
 *
 * Shape legend (outermost first):
 *   B  images in a pass, S  image side in pixels, P  patch side, N  patches per image (S/P)^2
 *   T  tokens per image (N + 1 with CLIP's class token, N for SigLIP), R = B*T rows
 *   C  hidden width, F  MLP width, H  heads, D = C/H head width, K = 3*P*P values per patch
 */
#include "vision/vit.h"
#include "vision/pos_interp.h"

#include "ops/blas.h"
#include "ops/fastmath.h"
#include "train/optim.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- config ---------------------------------------------------------------------------------- */

void tk_vit_config_default(tk_vit_config *cfg, tk_vit_kind kind) {
    memset(cfg, 0, sizeof *cfg);
    cfg->kind = kind;
    cfg->hidden = 768;
    cfg->inter = 3072;
    cfg->n_layers = 12;
    cfg->n_heads = 12;
    cfg->image_size = 224;
    cfg->channels = 3;
    if (kind == TK_VIT_CLIP) {
        cfg->patch_size = 32;
        cfg->eps = 1e-5f;
        cfg->act = TK_GELU_QUICK;
    } else {
        cfg->patch_size = 16;
        cfg->eps = 1e-6f;
        cfg->act = TK_GELU_TANH;
    }
}

int tk_vit_config_check(const tk_vit_config *c, const char *where, tk_err *err) {
    const int big = 1 << 20;
    if (c->hidden < 1 || c->hidden > big || c->inter < 1 || c->inter > big)
        return tk_fail(err, "%s: hidden_size and intermediate_size must be in [1, %d]", where, big);
    if (c->n_layers < 1 || c->n_layers > 4096)
        return tk_fail(err, "%s: num_hidden_layers must be in [1, 4096]", where);
    if (c->n_heads < 1 || c->hidden % c->n_heads)
        return tk_fail(err, "%s: num_attention_heads %d must divide hidden_size %d", where,
                       c->n_heads, c->hidden);
    if (c->patch_size < 1 || c->image_size < c->patch_size || c->image_size > 65536 ||
        c->image_size % c->patch_size)
        return tk_fail(err, "%s: image_size %d must be a positive multiple of patch_size %d", where,
                       c->image_size, c->patch_size);
    if (c->channels < 1 || c->channels > 16)
        return tk_fail(err, "%s: num_channels must be in [1, 16]", where);
    if (!(c->eps > 0.0f && c->eps < 1.0f))
        return tk_fail(err, "%s: layer_norm_eps must be in (0, 1)", where);
    return 0;
}

static int json_int(const cJSON *o, const char *key, int *out, const char *path, tk_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!it || cJSON_IsNull(it)) return 0; /* keeps the default */
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < 0 ||
        it->valuedouble > 1e9)
        return tk_fail(err, "%s: \"%s\" must be a non-negative integer", path, key);
    *out = (int)it->valuedouble;
    return 0;
}

int tk_vit_config_load(tk_vit_config *cfg, const char *path, tk_err *err) {
    size_t len = 0;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    int rc = -1;
    if (!root || !cJSON_IsObject(root)) {
        tk_fail(err, "%s: not a JSON object", path);
        goto done;
    }
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "vision_config");
    if (v && !cJSON_IsNull(v) && !cJSON_IsObject(v)) {
        tk_fail(err, "%s: \"vision_config\" must be an object", path);
        goto done;
    }
    if (!v || cJSON_IsNull(v)) {
        const cJSON *tower = cJSON_GetObjectItemCaseSensitive(root, "mm_vision_tower");
        if (cJSON_IsString(tower)) {
            tk_fail(err, "%s: an original LLaVA config names its vision tower (mm_vision_tower = \"%s\") "
                    "instead of describing it: open the tower's own directory", path, tower->valuestring);
            goto done;
        }
        v = root;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(v, "model_type");
    if (!cJSON_IsString(mt) && v != root) mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const char *t = cJSON_IsString(mt) ? mt->valuestring : "";
    tk_vit_kind kind;
    if (strcmp(t, "clip_vision_model") == 0 || strcmp(t, "clip") == 0) {
        kind = TK_VIT_CLIP;
    } else if (strcmp(t, "siglip_vision_model") == 0 || strcmp(t, "siglip") == 0) {
        kind = TK_VIT_SIGLIP;
    } else {
        tk_fail(err, "%s: vision model_type \"%s\" is not supported (expected clip_vision_model or "
                "siglip_vision_model)", path, t);
        goto done;
    }
    tk_vit_config_default(cfg, kind);
    if (json_int(v, "hidden_size", &cfg->hidden, path, err) ||
        json_int(v, "intermediate_size", &cfg->inter, path, err) ||
        json_int(v, "num_hidden_layers", &cfg->n_layers, path, err) ||
        json_int(v, "num_attention_heads", &cfg->n_heads, path, err) ||
        json_int(v, "image_size", &cfg->image_size, path, err) ||
        json_int(v, "patch_size", &cfg->patch_size, path, err) ||
        json_int(v, "num_channels", &cfg->channels, path, err))
        goto done;
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(v, "layer_norm_eps");
    if (eps && !cJSON_IsNull(eps)) {
        if (!cJSON_IsNumber(eps)) {
            tk_fail(err, "%s: \"layer_norm_eps\" must be a number", path);
            goto done;
        }
        cfg->eps = (float)eps->valuedouble;
    }
    if (kind == TK_VIT_SIGLIP) { /* SiglipVisionConfig.vision_use_head, default true */
        const cJSON *uh = cJSON_GetObjectItemCaseSensitive(v, "vision_use_head");
        cfg->use_head = !(uh && cJSON_IsFalse(uh));
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(v, "hidden_act");
    if (act && !cJSON_IsNull(act)) {
        const char *a = cJSON_IsString(act) ? act->valuestring : "";
        if (strcmp(a, "quick_gelu") == 0) cfg->act = TK_GELU_QUICK;
        else if (strcmp(a, "gelu") == 0) cfg->act = TK_GELU_ERF;
        else if (strcmp(a, "gelu_pytorch_tanh") == 0 || strcmp(a, "gelu_new") == 0) cfg->act = TK_GELU_TANH;
        else {
            tk_fail(err, "%s: hidden_act \"%s\" is not supported (expected quick_gelu, gelu, "
                    "gelu_pytorch_tanh or gelu_new)", path, a);
            goto done;
        }
    }
    rc = tk_vit_config_check(cfg, path, err);
done:
    cJSON_Delete(root);
    return rc;
}

/* ---- the parameter table --------------------------------------------------------------------- */

size_t tk_vit_slot_capacity(const tk_vit_config *cfg) { return 21 + 16 * (size_t)cfg->n_layers; }

static void slot(tk_vit_slot *s, size_t *n, float **data, int ndim, int64_t d0, int64_t d1,
                 int64_t d2, int64_t d3, const char *fmt, int layer) {
    tk_vit_slot *e = &s[(*n)++];
    snprintf(e->name, sizeof e->name, fmt, layer);
    e->data = data;
    e->ndim = ndim;
    e->shape[0] = d0;
    e->shape[1] = d1;
    e->shape[2] = d2;
    e->shape[3] = d3;
}

size_t tk_vit_slots(tk_vit *m, tk_vit_slot *s) {
    const tk_vit_config *c = &m->cfg;
    int64_t C = c->hidden, F = c->inter, P = c->patch_size, T = (int64_t)m->n_pos;
    size_t n = 0;
    slot(s, &n, &m->patch_w, 4, C, c->channels, P, P, "embeddings.patch_embedding.weight", 0);
    if (c->kind == TK_VIT_SIGLIP) slot(s, &n, &m->patch_b, 1, C, 0, 0, 0, "embeddings.patch_embedding.bias", 0);
    if (c->kind == TK_VIT_CLIP) slot(s, &n, &m->cls, 1, C, 0, 0, 0, "embeddings.class_embedding", 0);
    slot(s, &n, &m->pos, 2, T, C, 0, 0, "embeddings.position_embedding.weight", 0);
    if (c->kind == TK_VIT_CLIP) {
        slot(s, &n, &m->pre_w, 1, C, 0, 0, 0, "pre_layrnorm.weight", 0);
        slot(s, &n, &m->pre_b, 1, C, 0, 0, 0, "pre_layrnorm.bias", 0);
    }
    for (int l = 0; l < c->n_layers; l++) {
        tk_vit_layer *L = &m->layers[l];
        slot(s, &n, &L->ln1_w, 1, C, 0, 0, 0, "encoder.layers.%d.layer_norm1.weight", l);
        slot(s, &n, &L->ln1_b, 1, C, 0, 0, 0, "encoder.layers.%d.layer_norm1.bias", l);
        slot(s, &n, &L->q_w, 2, C, C, 0, 0, "encoder.layers.%d.self_attn.q_proj.weight", l);
        slot(s, &n, &L->q_b, 1, C, 0, 0, 0, "encoder.layers.%d.self_attn.q_proj.bias", l);
        slot(s, &n, &L->k_w, 2, C, C, 0, 0, "encoder.layers.%d.self_attn.k_proj.weight", l);
        slot(s, &n, &L->k_b, 1, C, 0, 0, 0, "encoder.layers.%d.self_attn.k_proj.bias", l);
        slot(s, &n, &L->v_w, 2, C, C, 0, 0, "encoder.layers.%d.self_attn.v_proj.weight", l);
        slot(s, &n, &L->v_b, 1, C, 0, 0, 0, "encoder.layers.%d.self_attn.v_proj.bias", l);
        slot(s, &n, &L->o_w, 2, C, C, 0, 0, "encoder.layers.%d.self_attn.out_proj.weight", l);
        slot(s, &n, &L->o_b, 1, C, 0, 0, 0, "encoder.layers.%d.self_attn.out_proj.bias", l);
        slot(s, &n, &L->ln2_w, 1, C, 0, 0, 0, "encoder.layers.%d.layer_norm2.weight", l);
        slot(s, &n, &L->ln2_b, 1, C, 0, 0, 0, "encoder.layers.%d.layer_norm2.bias", l);
        slot(s, &n, &L->fc1_w, 2, F, C, 0, 0, "encoder.layers.%d.mlp.fc1.weight", l);
        slot(s, &n, &L->fc1_b, 1, F, 0, 0, 0, "encoder.layers.%d.mlp.fc1.bias", l);
        slot(s, &n, &L->fc2_w, 2, C, F, 0, 0, "encoder.layers.%d.mlp.fc2.weight", l);
        slot(s, &n, &L->fc2_b, 1, C, 0, 0, 0, "encoder.layers.%d.mlp.fc2.bias", l);
    }
    slot(s, &n, &m->post_w, 1, C, 0, 0, 0, "post_layernorm.weight", 0);
    slot(s, &n, &m->post_b, 1, C, 0, 0, 0, "post_layernorm.bias", 0);
    if (c->use_head) {
        slot(s, &n, &m->head_probe, 3, 1, 1, C, 0, "head.probe", 0);
        slot(s, &n, &m->head_in_w, 2, 3 * C, C, 0, 0, "head.attention.in_proj_weight", 0);
        slot(s, &n, &m->head_in_b, 1, 3 * C, 0, 0, 0, "head.attention.in_proj_bias", 0);
        slot(s, &n, &m->head_out_w, 2, C, C, 0, 0, "head.attention.out_proj.weight", 0);
        slot(s, &n, &m->head_out_b, 1, C, 0, 0, 0, "head.attention.out_proj.bias", 0);
        slot(s, &n, &m->head_ln_w, 1, C, 0, 0, 0, "head.layernorm.weight", 0);
        slot(s, &n, &m->head_ln_b, 1, C, 0, 0, 0, "head.layernorm.bias", 0);
        slot(s, &n, &m->head_fc1_w, 2, F, C, 0, 0, "head.mlp.fc1.weight", 0);
        slot(s, &n, &m->head_fc1_b, 1, F, 0, 0, 0, "head.mlp.fc1.bias", 0);
        slot(s, &n, &m->head_fc2_w, 2, C, F, 0, 0, "head.mlp.fc2.weight", 0);
        slot(s, &n, &m->head_fc2_b, 1, C, 0, 0, 0, "head.mlp.fc2.bias", 0);
    }
    TK_ASSERT(n <= tk_vit_slot_capacity(c));
    return n;
}

static size_t slot_numel(const tk_vit_slot *s) {
    size_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= (size_t)s->shape[d];
    return n;
}

/* Allocates the model shell, the slot table and the weight block; points every slot into the block. */
static tk_vit *vit_alloc(const tk_vit_config *cfg, const char *where, tk_vit_slot **slots_out,
                         size_t *ns_out, tk_err *err) {
    if (tk_vit_config_check(cfg, where, err)) return NULL;
    tk_vit *m = calloc(1, sizeof *m);
    tk_vit_slot *slots = NULL;
    if (!m) goto oom;
    m->cfg = *cfg;
    size_t side = (size_t)(cfg->image_size / cfg->patch_size);
    m->n_patches = side * side;
    m->n_tokens = m->n_patches + (cfg->kind == TK_VIT_CLIP ? 1 : 0);
    m->image_size = cfg->image_size;
    m->n_pos = m->n_tokens;
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    slots = calloc(tk_vit_slot_capacity(cfg), sizeof *slots);
    if (!m->layers || !slots) goto oom;
    size_t ns = tk_vit_slots(m, slots), total = 0;
    for (size_t i = 0; i < ns; i++) {
        size_t k = slot_numel(&slots[i]);
        total += (k + 15) & ~(size_t)15; /* 64-byte aligned tensors */
    }
    if (!(m->block = tk_calloc(total, sizeof(float)))) {
        tk_fail(err, "%s: out of memory for %.1f MiB of vision weights", where, total * 4.0 / (1 << 20));
        goto fail;
    }
    size_t off = 0;
    for (size_t i = 0; i < ns; i++) {
        *slots[i].data = m->block + off;
        off += (slot_numel(&slots[i]) + 15) & ~(size_t)15;
    }
    *slots_out = slots;
    *ns_out = ns;
    return m;
oom:
    tk_fail(err, "%s: out of memory", where);
fail:
    free(slots);
    tk_vit_close(m);
    return NULL;
}

void tk_vit_close(tk_vit *m) {
    if (!m) return;
    tk_free(m->block);
    free(m->layers);
    tk_pos_interp_free(m->pos_map);
    tk_free(m->pos_run);
    free(m);
}

/* standalone tower; llava-hf (transformers < 4.52); llava-hf (>= 4.52); original LLaVA with the tower
 * saved inside (unfrozen-tower fine-tunes) */
static const char *const k_prefixes[] = {"vision_model.", "vision_tower.vision_model.",
                                         "model.vision_tower.vision_model.",
                                         "model.vision_tower.vision_tower.vision_model."};

tk_vit *tk_vit_open_set(const tk_vit_config *cfg, const tk_st_set *set, const char *where,
                        const char *prefix, tk_err *err) {
    char name[TK_NAME_MAX + 128];
    const tk_st_file *f = NULL;
    if (!prefix) { /* the first known prefix under which the patch embedding exists */
        for (size_t i = 0; i < sizeof k_prefixes / sizeof *k_prefixes && !prefix; i++) {
            snprintf(name, sizeof name, "%sembeddings.patch_embedding.weight", k_prefixes[i]);
            if (tk_st_set_find(set, name, &f)) prefix = k_prefixes[i];
        }
        if (!prefix) {
            tk_fail(err, "%s: no vision tower found (no embeddings.patch_embedding.weight under "
                    "\"vision_model.\", \"vision_tower.vision_model.\", \"model.vision_tower.vision_model.\" "
                    "or \"model.vision_tower.vision_tower.vision_model.\")", where);
            return NULL;
        }
    }
    if (strlen(prefix) > 120) {
        tk_fail(err, "%s: tensor name prefix too long", where);
        return NULL;
    }
    tk_vit_config c2 = *cfg;
    snprintf(name, sizeof name, "%shead.probe", prefix);
    if (c2.kind != TK_VIT_SIGLIP || !tk_st_set_find(set, name, &f)) c2.use_head = 0; /* where present */
    tk_vit_slot *slots = NULL;
    size_t ns = 0;
    tk_vit *m = vit_alloc(&c2, where, &slots, &ns, err);
    if (!m) return NULL;
    if (cfg->kind == TK_VIT_SIGLIP) { /* a CLIP tower read with a SigLIP config (or the reverse) */
        snprintf(name, sizeof name, "%sembeddings.class_embedding", prefix);
        if (tk_st_set_find(set, name, &f)) {
            tk_fail(err, "%s: tensor %s exists but the config says SigLIP (no class token): wrong "
                    "model_type?", where, name);
            goto fail;
        }
    }
    for (size_t i = 0; i < ns; i++) {
        snprintf(name, sizeof name, "%s%s", prefix, slots[i].name);
        const tk_st_tensor *t = tk_st_set_find(set, name, &f);
        if (!t) {
            tk_fail(err, "%s: tensor %s missing (%s vision tower, %d layers)", where, name,
                    cfg->kind == TK_VIT_CLIP ? "CLIP" : "SigLIP", cfg->n_layers);
            goto fail;
        }
        if (tk_st_check_shape(f, t, slots[i].ndim, slots[i].shape, err) ||
            tk_st_read_f32(f, t, *slots[i].data, slot_numel(&slots[i]), err))
            goto fail;
    }
    free(slots);
    return m;
fail:
    free(slots);
    tk_vit_close(m);
    return NULL;
}

tk_vit *tk_vit_open(const char *dir, const char *prefix, tk_err *err) {
    char path[4096];
    tk_vit_config cfg;
    if (tk_pathf(path, sizeof path, err, "%s/config.json", dir) || tk_vit_config_load(&cfg, path, err))
        return NULL;
    tk_st_set *set = tk_st_set_open(dir, err);
    if (!set) return NULL;
    tk_vit *m = tk_vit_open_set(&cfg, set, dir, prefix, err);
    tk_st_set_close(set);
    return m;
}

tk_vit *tk_vit_zeros(const tk_vit_config *cfg, tk_err *err) {
    tk_vit_slot *slots = NULL;
    size_t ns = 0;
    tk_vit *m = vit_alloc(cfg, "vision gradients", &slots, &ns, err);
    free(slots);
    return m;
}

int tk_vit_save(const tk_vit *m, const char *dir, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    char path[4096];
    size_t cap = tk_vit_slot_capacity(c);
    tk_vit_slot *slots = calloc(cap, sizeof *slots);
    tk_st_entry *e = calloc(cap, sizeof *e);
    char (*names)[TK_NAME_MAX + 16] = calloc(cap, sizeof *names);
    cJSON *j = cJSON_CreateObject();
    char *text = NULL;
    int rc = -1;
    if (!slots || !e || !names || !j) {
        tk_fail(err, "%s: out of memory", dir);
        goto done;
    }
    size_t ns = tk_vit_slots((tk_vit *)m, slots); /* reads the pointers, writes only the table */
    for (size_t i = 0; i < ns; i++) {
        snprintf(names[i], sizeof names[i], "vision_model.%s", slots[i].name);
        e[i].name = names[i];
        e[i].dtype = TK_DT_F32;
        e[i].ndim = slots[i].ndim;
        for (int d = 0; d < slots[i].ndim; d++) e[i].shape[d] = slots[i].shape[d];
        e[i].data = *slots[i].data;
    }
    int clip = c->kind == TK_VIT_CLIP;
    cJSON_AddStringToObject(j, "model_type", clip ? "clip_vision_model" : "siglip_vision_model");
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(clip ? "CLIPVisionModel" : "SiglipVisionModel"));
    cJSON_AddNumberToObject(j, "hidden_size", c->hidden);
    cJSON_AddNumberToObject(j, "intermediate_size", c->inter);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(j, "num_channels", c->channels);
    cJSON_AddNumberToObject(j, "image_size", c->image_size);
    cJSON_AddNumberToObject(j, "patch_size", c->patch_size);
    cJSON_AddStringToObject(j, "hidden_act", tk_gelu_name(c->act));
    cJSON_AddNumberToObject(j, "layer_norm_eps", c->eps);
    if (!clip) cJSON_AddBoolToObject(j, "vision_use_head", c->use_head);
    if (!(text = cJSON_Print(j))) {
        tk_fail(err, "%s: out of memory", dir);
        goto done;
    }
    if (tk_mkdir_p(dir, err) || tk_pathf(path, sizeof path, err, "%s/model.safetensors", dir)) goto done;
    const char *meta[] = {"format", "pt", NULL};
    if (tk_st_write(path, e, ns, meta, err)) goto done;
    size_t len = strlen(text);
    char *nl = realloc(text, len + 2); /* the file ends with a newline */
    if (!nl) {
        tk_fail(err, "%s: out of memory", dir);
        goto done;
    }
    text = nl;
    memcpy(text + len, "\n", 2);
    if (tk_pathf(path, sizeof path, err, "%s/config.json", dir) || tk_write_file_atomic(path, text, len + 1, err))
        goto done;
    rc = 0;
done:
    free(text);
    cJSON_Delete(j);
    free(names);
    free(e);
    free(slots);
    return rc;
}

tk_vit *tk_vit_random(const tk_vit_config *cfg, uint64_t seed, tk_err *err) {
    tk_vit_slot *slots = NULL;
    size_t ns = 0;
    tk_vit *m = vit_alloc(cfg, "random vision encoder", &slots, &ns, err);
    if (!m) return NULL;
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    const float a = 0.02f * 1.7320508f; /* U(-a, a) has std 0.02 */
    for (size_t i = 0; i < ns; i++) {
        float *w = *slots[i].data;
        size_t n = slot_numel(&slots[i]);
        const char *nm = slots[i].name;
        size_t len = strlen(nm);
        int is_bias = len > 5 && strcmp(nm + len - 4, "bias") == 0;
        int is_norm = strstr(nm, "norm") != NULL;
        if (is_norm && !is_bias) {
            for (size_t j = 0; j < n; j++) w[j] = 1.0f;
        } else if (!is_bias) {
            for (size_t j = 0; j < n; j++) w[j] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * a;
        } /* biases stay 0 */
    }
    free(slots);
    return m;
}

/* ---- selection ------------------------------------------------------------------------------- */

int tk_vit_feature_parse(const char *s, tk_vit_feature *out) {
    if (strcmp(s, "patch") == 0 || strcmp(s, "default") == 0) *out = TK_VIT_FEATURE_PATCH;
    else if (strcmp(s, "cls_patch") == 0 || strcmp(s, "full") == 0) *out = TK_VIT_FEATURE_CLS_PATCH;
    else return -1;
    return 0;
}

size_t tk_vit_out_tokens(const tk_vit *m, tk_vit_feature feature) {
    return feature == TK_VIT_FEATURE_PATCH ? m->n_patches : m->n_tokens;
}

/* ---- workspace ------------------------------------------------------------------------------- */

struct tk_vit_ws {
    const tk_vit *m;
    size_t Bmax;
    float *buf;
    float *x;       /* [Bmax*T, C] residual stream */
    float *xn;      /* [Bmax*T, C] normalized input of a sublayer (also the patch embeddings) */
    float *q, *k, *v, *att; /* [Bmax*T, C] */
    float *h;       /* [Bmax*T, F] MLP hidden */
    float *patches; /* [Bmax*N, K] im2col of the pixels */
    float *scores;  /* [H, T, T] attention of one image */
};

tk_vit_ws *tk_vit_ws_alloc(const tk_vit *m, size_t Bmax, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, H = (size_t)c->n_heads;
    size_t K = (size_t)c->channels * (size_t)c->patch_size * (size_t)c->patch_size;
    if (Bmax < 1 || Bmax > 65536) {
        tk_fail(err, "vision workspace: batch %zu out of range [1, 65536]", Bmax);
        return NULL;
    }
    size_t R = Bmax * T;
    size_t sizes[8] = {R * C, R * C, R * C, R * C, R * C, R * C, R * F, Bmax * m->n_patches * K};
    size_t total = H * T * T;
    for (int i = 0; i < 8; i++) total += (sizes[i] + 15) & ~(size_t)15;
    tk_vit_ws *ws = calloc(1, sizeof *ws);
    if (!ws || !(ws->buf = tk_calloc(total, sizeof(float)))) {
        tk_fail(err, "vision workspace: out of memory (%.1f MiB for %zu images)", total * 4.0 / (1 << 20), Bmax);
        free(ws);
        return NULL;
    }
    ws->m = m;
    ws->Bmax = Bmax;
    float **ptrs[8] = {&ws->x, &ws->xn, &ws->q, &ws->k, &ws->v, &ws->att, &ws->h, &ws->patches};
    size_t off = 0;
    for (int i = 0; i < 8; i++) {
        *ptrs[i] = ws->buf + off;
        off += (sizes[i] + 15) & ~(size_t)15;
    }
    ws->scores = ws->buf + off;
    return ws;
}

void tk_vit_ws_free(tk_vit_ws *ws) {
    if (!ws) return;
    tk_free(ws->buf);
    free(ws);
}

/* ---- forward kernels ------------------------------------------------------------------------- */

void tk_vit_linear_bias(float *y, const float *x, const float *w, const float *b, size_t R, size_t I,
                        size_t O, int accumulate) {
#pragma omp parallel for if (R * O >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < R; r++) {
        float *yr = &y[r * O];
        if (accumulate) {
            for (size_t o = 0; o < O; o++) yr[o] += b[o];
        } else {
            for (size_t o = 0; o < O; o++) yr[o] = b[o];
        }
    }
    tk_linear_forward(y, x, w, R, I, O, 1.0f);
}

void tk_vit_im2col(float *patches, const float *pixels, size_t B, size_t ch, size_t S, size_t P) {
    size_t side = S / P, N = side * side, K = ch * P * P;
#pragma omp parallel for if (B * N * K >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < B * N; r++) {
        size_t b = r / N, p = r % N, py = p / side, px = p % side;
        float *dst = &patches[r * K];
        for (size_t c = 0; c < ch; c++)
            for (size_t ky = 0; ky < P; ky++) {
                const float *src = &pixels[((b * ch + c) * S + py * P + ky) * S + px * P];
                memcpy(&dst[(c * P + ky) * P], src, P * sizeof(float));
            }
    }
}

void tk_vit_attention_forward(float *att, float *probs, const float *q, const float *k, const float *v,
                              size_t T, size_t H, size_t D) {
    size_t C = H * D;
    float scale = 1.0f / sqrtf((float)D);
    for (size_t h = 0; h < H; h++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(T), tk_blas_dim(T),
                    tk_blas_dim(D), scale, q + h * D, tk_blas_dim(C), k + h * D, tk_blas_dim(C), 0.0f,
                    probs + h * T * T, tk_blas_dim(T));
#pragma omp parallel for if (H * T * T >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < H * T; r++) {
        float *s = &probs[r * T];
        float mx = s[0];
        for (size_t j = 1; j < T; j++) mx = s[j] > mx ? s[j] : mx;
        for (size_t j = 0; j < T; j++) s[j] = tk_expf(s[j] - mx);
        double sum = 0.0;
        for (size_t j = 0; j < T; j++) sum += (double)s[j];
        float inv = (float)(1.0 / sum);
        for (size_t j = 0; j < T; j++) s[j] *= inv;
    }
    for (size_t h = 0; h < H; h++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(T), tk_blas_dim(D),
                    tk_blas_dim(T), 1.0f, probs + h * T * T, tk_blas_dim(T), v + h * D,
                    tk_blas_dim(C), 0.0f, att + h * D, tk_blas_dim(C));
}

/* One encoder layer on x [B*T, C] in place. */
static void layer_forward(const tk_vit *m, tk_vit_ws *ws, const tk_vit_layer *L, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, R = B * T;
    size_t H = (size_t)c->n_heads, D = C / H;
    tk_layernorm_forward(ws->xn, NULL, NULL, ws->x, L->ln1_w, L->ln1_b, R, C, c->eps);
    tk_vit_linear_bias(ws->q, ws->xn, L->q_w, L->q_b, R, C, C, 0);
    tk_vit_linear_bias(ws->k, ws->xn, L->k_w, L->k_b, R, C, C, 0);
    tk_vit_linear_bias(ws->v, ws->xn, L->v_w, L->v_b, R, C, C, 0);
    for (size_t b = 0; b < B; b++)
        tk_vit_attention_forward(ws->att + b * T * C, ws->scores, ws->q + b * T * C, ws->k + b * T * C,
                        ws->v + b * T * C, T, H, D);
    tk_vit_linear_bias(ws->x, ws->att, L->o_w, L->o_b, R, C, C, 1);
    tk_layernorm_forward(ws->xn, NULL, NULL, ws->x, L->ln2_w, L->ln2_b, R, C, c->eps);
    tk_vit_linear_bias(ws->h, ws->xn, L->fc1_w, L->fc1_b, R, C, F, 0);
    tk_gelu_forward(ws->h, ws->h, R * F, c->act);
    tk_vit_linear_bias(ws->x, ws->h, L->fc2_w, L->fc2_b, R, F, C, 1);
}

/* hidden_states[0] of B images into ws->x. */
static void embed(const tk_vit *m, tk_vit_ws *ws, const float *pixels, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches, P = (size_t)c->patch_size;
    size_t K = (size_t)c->channels * P * P, off = T - N; /* 1 with a class token */
    tk_vit_im2col(ws->patches, pixels, B, (size_t)c->channels, (size_t)m->image_size, P);
    tk_linear_forward(ws->xn, ws->patches, m->patch_w, B * N, K, C, 0.0f); /* [B*N, C] */
#pragma omp parallel for if (B * T * C >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < B * T; r++) {
        size_t b = r / T, t = r % T;
        float *xr = &ws->x[r * C];
        const float *pr = &(m->pos_run ? m->pos_run : m->pos)[t * C]; /* interpolated: pos_interp.h */
        if (t < off) {
            for (size_t j = 0; j < C; j++) xr[j] = m->cls[j] + pr[j];
        } else {
            const float *er = &ws->xn[(b * N + t - off) * C];
            if (m->patch_b) {
                for (size_t j = 0; j < C; j++) xr[j] = (er[j] + m->patch_b[j]) + pr[j];
            } else {
                for (size_t j = 0; j < C; j++) xr[j] = er[j] + pr[j];
            }
        }
    }
    if (m->pre_w) tk_layernorm_forward(ws->x, NULL, NULL, ws->x, m->pre_w, m->pre_b, B * T, C, c->eps);
}

int tk_vit_forward(const tk_vit *m, tk_vit_ws *ws, float *out, const float *pixels, size_t B,
                   const tk_vit_select *sel, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    TK_ASSERT(ws->m == m);
    int L = c->n_layers;
    if (sel->layer < -(L + 1) || sel->layer > L)
        return tk_fail(err, "vision feature layer %d out of range [%d, %d] (%d layers)", sel->layer,
                       -(L + 1), L, L);
    if (sel->pooled) return tk_fail(err, "vision forward: the pooled output is the training forward's");
    int upto = sel->layer < 0 ? L + 1 + sel->layer : sel->layer; /* layers to run */
    size_t C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches;
    size_t S = (size_t)m->image_size, ch = (size_t)c->channels;
    size_t skip = sel->feature == TK_VIT_FEATURE_PATCH ? T - N : 0, To = T - skip;
    for (size_t b0 = 0; b0 < B; b0 += ws->Bmax) {
        size_t nb = B - b0 < ws->Bmax ? B - b0 : ws->Bmax;
        embed(m, ws, pixels + b0 * ch * S * S, nb);
        for (int l = 0; l < upto; l++) layer_forward(m, ws, &m->layers[l], nb);
        for (size_t b = 0; b < nb; b++) {
            const float *src = ws->x + (b * T + skip) * C;
            float *dst = out + (b0 + b) * To * C;
            if (sel->post_norm)
                tk_layernorm_forward(dst, NULL, NULL, src, m->post_w, m->post_b, To, C, c->eps);
            else
                memcpy(dst, src, To * C * sizeof(float));
        }
    }
    return 0;
}

int tk_vit_run_images(const tk_vit *m, size_t n_images, size_t batch, const tk_vit_select *sel,
                      uint64_t seed, double *seconds, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    if (batch < 1) batch = 1;
    if (batch > n_images && n_images > 0) batch = n_images;
    size_t per = (size_t)c->channels * (size_t)m->image_size * (size_t)m->image_size;
    size_t outn = tk_vit_out_tokens(m, sel->feature) * (size_t)c->hidden;
    tk_vit_ws *ws = tk_vit_ws_alloc(m, batch, err);
    float *pix = tk_calloc(batch * per, sizeof(float));
    float *out = tk_calloc(batch * outn, sizeof(float));
    int rc = -1;
    if (!ws) goto done;
    if (!pix || !out) {
        tk_fail(err, "vision benchmark: out of memory");
        goto done;
    }
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    for (size_t i = 0; i < batch * per; i++) pix[i] = 2.0f * tk_rng_uniform(&rng) - 1.0f;
    double t0 = tk_time();
    for (size_t done_n = 0; done_n < n_images; done_n += batch) {
        size_t nb = n_images - done_n < batch ? n_images - done_n : batch;
        if (tk_vit_forward(m, ws, out, pix, nb, sel, err)) goto done;
    }
    *seconds = tk_time() - t0;
    rc = 0;
done:
    tk_vit_ws_free(ws);
    tk_free(pix);
    tk_free(out);
    return rc;
}
