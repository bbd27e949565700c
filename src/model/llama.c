/* llama.c: LLaMA decoder: loading, forward, backward, generation. See llama.h.
 *
 * Shapes: B sequences, T positions, N = B*T tokens, C width, F MLP width, H query heads, G kv heads,
 * D head width, V vocabulary, L layers.
 *
 * One layer (HF LlamaDecoderLayer), every projection an adapted linear (peft/adapter.h):
 *   xn1 = rmsnorm(x);  q,k,v = proj(xn1);  q,k = rope(q,k);  att = attention(q,k,v)
 *   x2 = x + o_proj(att);  xn2 = rmsnorm(x2);  h = silu(gate_proj(xn2)) * up_proj(xn2)
 *   x' = x2 + down_proj(h)
 * then logits = rmsnorm(x_L) lm_head^T.
 */
#include "llama.h"

#include "../ops/blas.h"
#include "../ops/ops.h"
#include "../../datasets/shard.h" /* TK_KIND_IMAGE */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Saved tensors of one layer for backward. */
struct tk_llama_saved {
    float *x;     /* [N,C] layer input (residual) */
    float *xn1;   /* [N,C] */
    float *rstd1; /* [N] */
    float *q;     /* [N,H*D] after rope */
    float *k, *v; /* [N,G*D] (k after rope) */
    float *att;   /* [N,H*D] */
    float *probs; /* [B*H, tk_attention_probs_head(T,T)] (full attention) */
    float *lse;   /* [B,H,T] row log-sum-exp (tiled attention) */
    float *x2;    /* [N,C] */
    float *xn2;   /* [N,C] */
    float *rstd2; /* [N] */
    float *g, *u; /* [N,F] gate and up outputs */
    float *h;     /* [N,F] silu(g)*u */
};

/* ---- loading ---------------------------------------------------------------------------------- */

static size_t proj_in(const tk_llama_config *c, int p) {
    size_t HD = (size_t)c->n_heads * c->head_dim;
    if (p == TK_PROJ_O) return HD;
    if (p == TK_PROJ_DOWN) return (size_t)c->hidden_dim;
    return (size_t)c->dim;
}

static size_t proj_out(const tk_llama_config *c, int p) {
    size_t HD = (size_t)c->n_heads * c->head_dim, GD = (size_t)c->n_kv_heads * c->head_dim;
    switch (p) {
    case TK_PROJ_Q: return HD;
    case TK_PROJ_K:
    case TK_PROJ_V: return GD;
    case TK_PROJ_GATE:
    case TK_PROJ_UP: return (size_t)c->hidden_dim;
    default: return (size_t)c->dim;
    }
}

size_t tk_llama_slots(tk_llama *m, tk_llama_slot *s) {
    const tk_llama_config *c = &m->cfg;
    size_t n = 0, V = (size_t)c->vocab_size, C = (size_t)c->dim;
#define SLOT(nm, d, g, b, r, cl)                                                                    \
    do {                                                                                           \
        snprintf(s[n].name, TK_NAME_MAX, "%s", nm);                                                \
        s[n].data = (d);                                                                           \
        s[n].grad = (g);                                                                           \
        s[n].bf16 = (b);                                                                           \
        s[n].rows = (r);                                                                           \
        s[n].cols = (cl);                                                                          \
        n++;                                                                                       \
    } while (0)
    SLOT("model.embed_tokens.weight", &m->embed, &m->d_embed, &m->embed_bf16, V, C);
    for (int l = 0; l < c->n_layers; l++) {
        tk_llama_layer *ly = &m->layers[l];
        char nm[TK_NAME_MAX];
        snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", l);
        SLOT(nm, &ly->attn_norm, &ly->d_attn_norm, NULL, C, 0);
        for (int p = 0; p < TK_NPROJ; p++) {
            snprintf(nm, sizeof nm, "model.layers.%d.%s.%s.weight", l, tk_proj_block[p], tk_proj_short[p]);
            SLOT(nm, &ly->proj[p].w0, &ly->proj[p].dw0, &ly->proj[p].w0_bf16, proj_out(c, p), proj_in(c, p));
        }
        snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", l);
        SLOT(nm, &ly->ffn_norm, &ly->d_ffn_norm, NULL, C, 0);
    }
    SLOT("model.norm.weight", &m->final_norm, &m->d_final_norm, NULL, C, 0);
    if (!c->tie_embeddings) SLOT("lm_head.weight", &m->lm_head, &m->d_lm_head, &m->lm_head_bf16, V, C);
#undef SLOT
    return n;
}

static size_t slot_capacity(const tk_llama_config *c) { return 3 + 9 * (size_t)c->n_layers; }

tk_llama *tk_llama_open(const char *dir, tk_err *err) { return tk_llama_open_ex(dir, 0, err); }

/* A base tensor by its LLaMA name, or as LLaVA checkpoints store the language model: llava-hf before
 * transformers 4.52 ("language_model.model.layers...", "language_model.lm_head.weight") and after
 * ("model.language_model.layers...", "lm_head.weight"). The original LLaVA layout uses the plain names. */
static const tk_st_tensor *find_weight(const tk_st_set *set, const char *name, const tk_st_file **f) {
    const tk_st_tensor *t = tk_st_set_find(set, name, f);
    if (t) return t;
    char alt[TK_NAME_MAX + 32];
    snprintf(alt, sizeof alt, "language_model.%s", name);
    if ((t = tk_st_set_find(set, alt, f))) return t;
    if (strncmp(name, "model.", 6) == 0) {
        snprintf(alt, sizeof alt, "model.language_model.%s", name + 6);
        t = tk_st_set_find(set, alt, f);
    }
    return t;
}

tk_llama *tk_llama_open_ex(const char *dir, int keep_bf16, tk_err *err) {
    tk_llama *m = calloc(1, sizeof *m);
    tk_llama_slot *slots = NULL;
    const tk_st_tensor **ts = NULL;
    const tk_st_file **fs = NULL;
    char path[4096];
    if (!m) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (tk_llama_config_load(&m->cfg, path, err)) goto fail;
    const tk_llama_config *c = &m->cfg;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    slots = calloc(slot_capacity(c), sizeof *slots);
    m->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    ts = calloc(slot_capacity(c), sizeof *ts);
    fs = calloc(slot_capacity(c), sizeof *fs);
    if (!m->layers || !slots || !m->inv_freq || !ts || !fs) {
        tk_fail(err, "out of memory");
        goto fail;
    }
    tk_llama_inv_freq(c, m->inv_freq);
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            L->in = proj_in(c, p);
            L->out = proj_out(c, p);
        }
    tk_peft_config_default(&m->peft);
    m->peft.kind = TK_ADAPTER_NONE;
    if (!(m->files = tk_st_set_open(dir, err))) goto fail;

    /* Pass 1: validate every tensor and count what must be converted; pass 2: convert or map. */
    size_t ns = tk_llama_slots(m, slots), owned = 0;
    for (size_t i = 0; i < ns; i++) {
        ts[i] = find_weight(m->files, slots[i].name, &fs[i]);
        if (!ts[i]) {
            tk_fail(err, "%s: tensor '%s' is missing from the checkpoint", dir, slots[i].name);
            goto fail;
        }
        int64_t shape[2] = {(int64_t)slots[i].rows, (int64_t)slots[i].cols};
        if (tk_st_check_shape(fs[i], ts[i], slots[i].cols ? 2 : 1, shape, err)) goto fail;
        if (ts[i]->dtype != TK_DT_F32 && ts[i]->dtype != TK_DT_F16 && ts[i]->dtype != TK_DT_BF16) {
            tk_fail(err, "%s: tensor '%s' has dtype %s; expected F32, F16 or BF16", tk_st_path(fs[i]),
                    slots[i].name, tk_dtype_name(ts[i]->dtype));
            goto fail;
        }
        const void *p = tk_st_data(fs[i], ts[i]);
        if (keep_bf16 && slots[i].bf16 && ts[i]->dtype == TK_DT_BF16 && !((uintptr_t)p & 1u)) continue;
        if (ts[i]->dtype != TK_DT_F32 || ((uintptr_t)p & 3u)) owned += ts[i]->numel;
    }
    m->owned_n = owned;
    if (owned && !(m->owned = tk_calloc(owned, sizeof(float)))) {
        tk_fail(err, "%s: out of memory converting %zu weights to fp32", dir, owned);
        goto fail;
    }
    size_t off = 0;
    for (size_t i = 0; i < ns; i++) {
        const void *p = tk_st_data(fs[i], ts[i]);
        if (keep_bf16 && slots[i].bf16 && ts[i]->dtype == TK_DT_BF16 && !((uintptr_t)p & 1u)) {
            *slots[i].bf16 = (const uint16_t *)p; /* stays BF16, memory-mapped */
            *slots[i].data = NULL;
            m->bf16 = 1;
        } else if (ts[i]->dtype == TK_DT_F32 && !((uintptr_t)p & 3u)) {
            *slots[i].data = (float *)p; /* read-only mapping; trainable copies are made on attach */
        } else {
            *slots[i].data = m->owned + off;
            if (tk_st_read_f32(fs[i], ts[i], m->owned + off, ts[i]->numel, err)) goto fail;
            off += ts[i]->numel;
        }
    }
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
        m->lm_head_bf16 = m->embed_bf16;
    }
    free(slots);
    free(ts);
    free(fs);
    return m;
fail:
    free(slots);
    free(ts);
    free(fs);
    tk_llama_close(m);
    return NULL;
}

tk_llama *tk_llama_random(const tk_llama_config *cfg, uint64_t seed, int bf16, tk_err *err) {
    tk_llama *m = calloc(1, sizeof *m);
    tk_llama_slot *slots = NULL;
    if (!m) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    m->cfg = *cfg;
    const tk_llama_config *c = &m->cfg;
    if (c->dim < 1 || c->hidden_dim < 1 || c->n_layers < 1 || c->n_heads < 1 || c->n_kv_heads < 1 ||
        c->n_heads % c->n_kv_heads || c->head_dim < 2 || c->head_dim % 2 || c->vocab_size < 1) {
        tk_fail(err, "invalid model shape");
        goto fail;
    }
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    slots = calloc(slot_capacity(c), sizeof *slots);
    m->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    if (!m->layers || !slots || !m->inv_freq) {
        tk_fail(err, "out of memory");
        goto fail;
    }
    tk_llama_inv_freq(c, m->inv_freq);
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            m->layers[l].proj[p].in = proj_in(c, p);
            m->layers[l].proj[p].out = proj_out(c, p);
        }
    tk_peft_config_default(&m->peft);
    m->peft.kind = TK_ADAPTER_NONE;
    size_t ns = tk_llama_slots(m, slots), total = 0; /* in floats; BF16 matrices take half */
    for (size_t i = 0; i < ns; i++) {
        size_t n = slots[i].rows * (slots[i].cols ? slots[i].cols : 1);
        total += bf16 && slots[i].bf16 ? (n + 1) / 2 : n;
    }
    m->owned_n = total;
    if (!(m->owned = tk_calloc(total, sizeof(float)))) {
        tk_fail(err, "out of memory for random weights (%.1f GiB)", total * 4.0 / (1u << 30));
        goto fail;
    }
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    const float a = 0.02f * 1.7320508f; /* U(-a, a) has std 0.02 */
    size_t off = 0;
    for (size_t i = 0; i < ns; i++) {
        size_t n = slots[i].rows * (slots[i].cols ? slots[i].cols : 1);
        if (bf16 && slots[i].bf16) {
            uint16_t *w = (uint16_t *)(m->owned + off);
            for (size_t j = 0; j < n; j++) w[j] = tk_f32_to_bf16((2.0f * tk_rng_uniform(&rng) - 1.0f) * a);
            *slots[i].bf16 = w;
            *slots[i].data = NULL;
            m->bf16 = 1;
            off += (n + 1) / 2;
        } else {
            float *w = m->owned + off;
            for (size_t j = 0; j < n; j++) w[j] = slots[i].cols ? (2.0f * tk_rng_uniform(&rng) - 1.0f) * a : 1.0f;
            *slots[i].data = w;
            off += n;
        }
    }
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
        m->lm_head_bf16 = m->embed_bf16;
    }
    free(slots);
    return m;
fail:
    free(slots);
    tk_llama_close(m);
    return NULL;
}

void tk_llama_close(tk_llama *m) {
    if (!m) return;
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) tk_adapted_free(&m->layers[l].proj[p]);
    free(m->layers);
    tk_adapter_ws_free(&m->ws);
    tk_params_free(&m->params);
    tk_peft_config_free(&m->peft);
    tk_st_set_close(m->files);
    tk_free(m->owned);
    tk_free(m->packed_copies);
    tk_free(m->dot_copies);
    free(m->inv_freq);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m);
}

static int ensure_rope(tk_llama *m, size_t P, tk_err *err) {
    if (P <= m->rope_len) return 0;
    if (P > (size_t)m->cfg.max_seq_len)
        return tk_fail(err, "sequence of %zu positions exceeds max_position_embeddings %d", P,
                       m->cfg.max_seq_len);
    size_t half = (size_t)m->cfg.head_dim / 2;
    float *cs = realloc(m->rope_cos, P * half * sizeof(float));
    if (cs) m->rope_cos = cs;
    float *sn = realloc(m->rope_sin, P * half * sizeof(float));
    if (sn) m->rope_sin = sn;
    if (!cs || !sn) return tk_fail(err, "out of memory for rope tables");
    tk_rope_table(m->rope_cos, m->rope_sin, m->inv_freq, P, (size_t)m->cfg.head_dim);
    m->rope_len = P;
    return 0;
}

/* ---- adapters --------------------------------------------------------------------------------- */

void tk_module_key(char *buf, size_t n, int layer, int proj) {
    snprintf(buf, n, "base_model.model.model.layers.%d.%s.%s", layer, tk_proj_block[proj],
             tk_proj_short[proj]);
}

/* HF LayerNorm-style weights get no weight decay, like transformers' Trainer. */
static int slot_decays(const char *name) { return strstr(name, "norm") == NULL; }

static int copy_peft_config(tk_peft_config *dst, const tk_peft_config *src, tk_err *err) {
    return tk_peft_config_copy(dst, src, err);
}

static int register_adapters(tk_llama *m, tk_err *err) {
    const tk_peft_config *pc = &m->peft;
    float scale = tk_peft_scale(pc);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (pc->kind == TK_ADAPTER_NONE || !tk_peft_targets(pc, l, p)) continue;
            /* AdaLoRA: a module named in rank_pattern holds its kept triplets only (PEFT resizes it);
             * one with none kept carries no update and stays a plain linear */
            const tk_rank_entry *re = pc->kind == TK_ADAPTER_ADALORA ? tk_peft_rank_find(pc, l, p) : NULL;
            size_t rank = re ? (size_t)tk_rank_count(re, pc->r) : (size_t)pc->r;
            if (rank == 0) continue;
            tk_peft_module_init(L, pc, rank, scale, 0x8f1bbcdcca62c1d6ull * (uint64_t)(l * TK_NPROJ + p + 1));
            if (L->r > m->max_rank) m->max_rank = L->r;
            char key[TK_NAME_MAX], nm[TK_NAME_MAX + 64];
            tk_module_key(key, sizeof key, l, p);
            int bn = pc->kind == TK_ADAPTER_BOTTLENECK;
            int64_t sa[2] = {(int64_t)L->r, (int64_t)L->in}, sb[2] = {(int64_t)L->out, (int64_t)L->r};
            if (pc->kind == TK_ADAPTER_ADALORA) { /* PEFT's parameters (no ".weight"); E is [R,1] */
                int64_t se[2] = {(int64_t)L->r, 1};
                snprintf(nm, sizeof nm, "%s.lora_A", key);
                if (tk_params_add(&m->params, nm, 2, sa, 1, &L->A, &L->dA, NULL, err)) return -1;
                snprintf(nm, sizeof nm, "%s.lora_B", key);
                if (tk_params_add(&m->params, nm, 2, sb, 1, &L->B, &L->dB, NULL, err)) return -1;
                snprintf(nm, sizeof nm, "%s.lora_E", key);
                if (tk_params_add(&m->params, nm, 2, se, 1, &L->E, &L->dE, NULL, err)) return -1;
                continue;
            }
            snprintf(nm, sizeof nm, "%s.%s", key, bn ? "adapter_down.weight" : "lora_A.weight");
            if (tk_params_add(&m->params, nm, 2, sa, 1, &L->A, &L->dA, NULL, err)) return -1;
            snprintf(nm, sizeof nm, "%s.%s", key, bn ? "adapter_up.weight" : "lora_B.weight");
            if (tk_params_add(&m->params, nm, 2, sb, 1, &L->B, &L->dB, NULL, err)) return -1;
            if (pc->kind == TK_ADAPTER_DORA) {
                int64_t sm[1] = {(int64_t)L->out};
                snprintf(nm, sizeof nm, "%s.lora_magnitude_vector", key);
                if (tk_params_add(&m->params, nm, 1, sm, 1, &L->mag, &L->dmag, NULL, err)) return -1;
            }
        }
    }
    return 0;
}

static int is_adapted_weight(const tk_llama *m, const tk_llama_slot *s) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (s->data == &m->layers[l].proj[p].w0 && m->layers[l].proj[p].kind != TK_ADAPTER_NONE) return 1;
    return 0;
}

/* Trainable tensors that were BF16-resident: fp32 copies now live in the trainable block (the slot's
 * data pointer was bound to it); convert, and stop using the BF16 copy. */
static void fill_from_bf16(tk_llama_slot *slots, size_t ns) {
    for (size_t j = 0; j < ns; j++) {
        if (!slots[j].bf16 || !*slots[j].bf16 || !*slots[j].data) continue;
        size_t n = slots[j].rows * (slots[j].cols ? slots[j].cols : 1);
        for (size_t i = 0; i < n; i++) (*slots[j].data)[i] = tk_bf16_to_f32((*slots[j].bf16)[i]);
        *slots[j].bf16 = NULL;
    }
}

static int register_saved_tensors(tk_llama *m, tk_llama_slot *slots, size_t ns, tk_err *err) {
    /* "all": every base tensor that carries no adapter (full fine-tuning, or pretraining) */
    if (m->peft.n_save == 1 && strcmp(m->peft.save[0], "all") == 0) {
        tk_peft_config_free_save(&m->peft);
        for (size_t j = 0; j < ns; j++)
            if (!is_adapted_weight(m, &slots[j]) && tk_peft_parse_save(&m->peft, slots[j].name, err)) return -1;
    }
    for (int i = 0; i < m->peft.n_save; i++) {
        const char *want = m->peft.save[i];
        size_t j = 0;
        while (j < ns && strcmp(slots[j].name, want) != 0) j++;
        if (j == ns) {
            if (strcmp(want, "lm_head.weight") == 0 && m->cfg.tie_embeddings)
                return tk_fail(err, "modules_to_save: lm_head.weight is tied to model.embed_tokens.weight; "
                                    "train that instead");
            return tk_fail(err, "modules_to_save: \"%s\" is not a tensor of this model "
                                "(e.g. model.norm.weight, lm_head.weight, model.layers.0.mlp.up_proj.weight)",
                           want);
        }
        if (is_adapted_weight(m, &slots[j]))
            return tk_fail(err, "modules_to_save: \"%s\" also carries an adapter; train one or the other", want);
        char nm[TK_NAME_MAX + 32];
        snprintf(nm, sizeof nm, "base_model.model.%s", want);
        int64_t shape[2] = {(int64_t)slots[j].rows, (int64_t)slots[j].cols};
        /* a BF16-resident tensor gets its fp32 trainable copy in fill_from_bf16, after allocation */
        if (tk_params_add(&m->params, nm, slots[j].cols ? 2 : 1, shape, slot_decays(want),
                          slots[j].data, slots[j].grad, *slots[j].data, err))
            return -1;
    }
    return 0;
}

/* Every adapted module initialised as PEFT does (tk_peft_module_init_weights), in (layer, projection)
 * order from one stream. */
static void init_adapters(tk_llama *m, uint64_t seed) {
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (m->layers[l].proj[p].kind != TK_ADAPTER_NONE) tk_peft_module_init_weights(&m->layers[l].proj[p], &rng);
}


static int load_adapter_tensors(tk_llama *m, const char *dir, tk_err *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    tk_st_file *f = tk_st_open(path, err);
    if (!f) return -1;
    int rc = -1;
    for (size_t i = 0; i < m->params.n; i++) {
        const tk_param *p = &m->params.items[i];
        const tk_st_tensor *t = tk_st_find(f, p->name);
        if (!t && strstr(p->name, "lora_magnitude_vector")) {
            char alt[TK_NAME_MAX + 8];
            snprintf(alt, sizeof alt, "%s.weight", p->name);
            t = tk_st_find(f, alt);
        }
        if (!t && strncmp(p->name, "model.mm_projector.", 19) == 0) continue; /* a projector given apart */
        if (p->external) continue;
        if (!t) {
            tk_fail(err, "%s: tensor '%s' is missing (the adapter config targets this module)", path, p->name);
            goto done;
        }
        if (tk_st_check_shape(f, t, p->ndim, p->shape, err) ||
            tk_st_read_f32(f, t, m->params.data + p->offset, p->numel, err))
            goto done;
        for (size_t j = 0; j < p->numel; j++)
            if (!isfinite(m->params.data[p->offset + j])) {
                tk_fail(err, "%s: tensor '%s' holds a non-finite value at element %zu", path, p->name, j);
                goto done;
            }
    }
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int pj = 0; pj < TK_NPROJ; pj++) {
            tk_adapted_linear *L = &m->layers[l].proj[pj];
            if (L->kind == TK_ADAPTER_NONE) continue;
            char key[TK_NAME_MAX];
            tk_module_key(key, sizeof key, l, pj);
            if (tk_peft_load_gate(L, f, key, err)) goto done;
        }
    if (m->extra_load && m->extra_load(m->extra_ctx, f, err)) goto done;
    rc = 0;
done:
    tk_st_close(f);
    return rc;
}

static int attach(tk_llama *m, const tk_peft_config *pc, const char *adapter_dir, uint64_t seed,
                  tk_err *err);

/* Errors about an adapter directory's configuration name its adapter_config.json. */
int tk_llama_attach(tk_llama *m, const tk_peft_config *pc, const char *adapter_dir, uint64_t seed,
                    tk_err *err) {
    if (attach(m, pc, adapter_dir, seed, err) == 0) return 0;
    if (adapter_dir && err && !strstr(err->msg, adapter_dir)) {
        char where[1024];
        snprintf(where, sizeof where, "%s/adapter_config.json", adapter_dir);
        tk_err_prefix(err, where);
    }
    return -1;
}

static int attach(tk_llama *m, const tk_peft_config *pc, const char *adapter_dir, uint64_t seed,
                  tk_err *err) {
    TK_ASSERT(m->params.n == 0);
    if (copy_peft_config(&m->peft, pc, err)) return -1;
    for (int i = 0; i < pc->n_layer_sel; i++)
        if (pc->layer_sel[i] >= m->cfg.n_layers)
            return tk_fail(err, "layers_to_transform: layer %d does not exist (the model has %d)",
                           pc->layer_sel[i], m->cfg.n_layers);
    if (tk_peft_check_layers(pc, m->cfg.n_layers, err) || tk_peft_check_rank_pattern(pc, m->cfg.n_layers, err)) return -1;
    if (pc->kind != TK_ADAPTER_NONE && tk_peft_has_vit(pc) && m->vit_targets == TK_VIT_REFUSE) {
        char nm[160];
        int first = -1;
        for (int k = 0; k < TK_MAX_LAYERS * TK_VIT_NPROJ && first < 0; k++)
            if (tk_peft_vit_targets(pc, k / TK_VIT_NPROJ, k % TK_VIT_NPROJ)) first = k;
        tk_vit_module_name(nm, sizeof nm, pc->vit_prefix, first / TK_VIT_NPROJ, first % TK_VIT_NPROJ);
        return tk_fail(err, "target module %s is a vision tower module: train, eval and generate take the tower "
                            "with --vision-tower DIR (merge folds LLaMA modules only)", nm);
    }
    if (pc->kind != TK_ADAPTER_NONE && (pc->r < 1))
        return tk_fail(err, "adapter rank must be >= 1");
    tk_llama_slot *slots = calloc(slot_capacity(&m->cfg), sizeof *slots);
    if (!slots) return tk_fail(err, "out of memory");
    size_t ns = tk_llama_slots(m, slots);
    int rc = register_adapters(m, err) || register_saved_tensors(m, slots, ns, err) ||
             (m->extra_params && m->extra_params(m->extra_ctx, &m->params, err)) || tk_params_alloc(&m->params, err);
    if (rc == 0) fill_from_bf16(slots, ns);
    if (rc == 0 && m->extra_init) m->extra_init(m->extra_ctx, seed);
    free(slots);
    if (rc) return -1;
    if (m->cfg.tie_embeddings) {
        m->lm_head = m->embed;
        m->d_lm_head = m->d_embed;
        m->lm_head_bf16 = m->embed_bf16;
    }
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (m->layers[l].proj[p].kind == TK_ADAPTER_DORA && !m->layers[l].proj[p].w0)
                return tk_fail(err, "DoRA needs fp32 base weights (its magnitude uses ||W0 + s B A||): "
                                    "load the model without BF16-resident weights");
    if (adapter_dir) return load_adapter_tensors(m, adapter_dir, err);
    init_adapters(m, seed);
    return 0;
}

/* AdaLoRA as PEFT saves it (resize_state_dict_by_rank_pattern): a module that holds all init_r
 * triplets but has a rank_pattern entry is written with its kept ones only (rows of lora_A and
 * lora_E, columns of lora_B). Points e at a compacted copy (*owned, caller frees) when so; returns -1
 * only when out of memory. */
static int adalora_resized(const tk_llama *m, tk_st_entry *e, float **owned) {
    *owned = NULL;
    if (m->peft.kind != TK_ADAPTER_ADALORA) return 0;
    const int init_r = m->peft.r;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind != TK_ADAPTER_ADALORA || (e->data != L->A && e->data != L->B && e->data != L->E)) continue;
            const tk_rank_entry *re = tk_peft_rank_find(&m->peft, l, p);
            if (!re || L->r != (size_t)init_r) return 0;
            size_t k = (size_t)tk_rank_count(re, init_r), I = L->in, O = L->out, R = L->r, q = 0;
            if (k == R) return 0;
            float *c = tk_calloc(e->data == L->B ? O * k + 1 : k * I + 1, sizeof(float));
            if (!c) return -1;
            for (size_t j = 0; j < R; j++) {
                if (!tk_rank_kept(re, (int)j)) continue;
                if (e->data == L->A) memcpy(c + q * I, L->A + j * I, I * sizeof(float));
                else if (e->data == L->E) c[q] = L->E[j];
                else
                    for (size_t o = 0; o < O; o++) c[o * k + q] = L->B[o * R + j];
                q++;
            }
            if (e->data == L->B) e->shape[1] = (int64_t)k;
            else e->shape[0] = (int64_t)k;
            e->data = c;
            *owned = c;
            return 0;
        }
    return 0;
}

static int entry_name_cmp(const void *a, const void *b) {
    return strcmp(((const tk_st_entry *)a)->name, ((const tk_st_entry *)b)->name);
}

int tk_llama_save_adapter(const tk_llama *m, const char *out_dir, tk_err *err) {
    size_t n_mod = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) n_mod += m->layers[l].proj[p].kind != TK_ADAPTER_NONE;
    size_t n_extra = m->extra_entries ? m->extra_entries(m->extra_ctx, NULL) : 0;
    size_t cap = m->params.n + 2 * n_mod + n_extra;
    tk_st_entry *e = calloc(cap ? cap : 1, sizeof *e);
    char(*names)[TK_NAME_MAX + 16] = calloc(2 * n_mod + 1, sizeof *names);
    if (!e || !names) {
        free(e);
        free(names);
        return tk_fail(err, "out of memory");
    }
    size_t n = 0, k = 0;
    float **owned = calloc(m->params.n + 1, sizeof *owned);
    if (!owned) {
        free(e);
        free(names);
        return tk_fail(err, "out of memory");
    }
    for (size_t i = 0; i < m->params.n; i++) {
        const tk_param *p = &m->params.items[i];
        if (p->external) continue;
        e[n] = (tk_st_entry){.name = p->name, .dtype = TK_DT_F32, .ndim = p->ndim, .data = m->params.data + p->offset};
        for (int d = 0; d < p->ndim; d++) e[n].shape[d] = p->shape[d];
        if (adalora_resized(m, &e[n], &owned[i])) {
            for (size_t j = 0; j <= i; j++) tk_free(owned[j]);
            free(owned);
            free(e);
            free(names);
            return tk_fail(err, "out of memory");
        }
        n++;
    }
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind == TK_ADAPTER_NONE || !m->peft.gate.enabled) continue;
            char key[TK_NAME_MAX];
            tk_module_key(key, sizeof key, l, p);
            snprintf(names[k], sizeof names[k], "%s.ts_tau", key);
            e[n++] = (tk_st_entry){.name = names[k++], .dtype = TK_DT_F32, .ndim = 1, .shape = {1}, .data = &L->tau};
            if (m->peft.gate.target_keep > 0.0f) {
                snprintf(names[k], sizeof names[k], "%s.ts_lambda", key);
                e[n++] = (tk_st_entry){.name = names[k++], .dtype = TK_DT_F32, .ndim = 1, .shape = {1}, .data = &L->lambda};
            }
        }
    if (n_extra) n += m->extra_entries(m->extra_ctx, e + n);
    /* in name order, as the safetensors library writes (all entries are F32): the same tensors give
     * the same file as PEFT's save_pretrained */
    qsort(e, n, sizeof *e, entry_name_cmp);
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out_dir);
    const char *meta[] = {"format", "pt", NULL};
    int rc = tk_st_write(path, e, n, meta, err);
    for (size_t i = 0; i < m->params.n; i++) tk_free(owned[i]);
    free(owned);
    free(e);
    free(names);
    if (rc) return -1;
    snprintf(path, sizeof path, "%s/adapter_config.json", out_dir);
    return tk_peft_config_save(&m->peft, path, err);
}

/* ---- activations ------------------------------------------------------------------------------ */

/* Carves n floats from a block: counting pass when base is NULL. */
static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += (n + 15) & ~(size_t)15; /* keep every array 64-byte aligned */
    return p;
}

/* Everything a layer saves for backward except its input x: per layer, or once for all the layers
 * that are recomputed (they take turns in one set). */
static void carve_layer(const tk_llama *m, const tk_llama_acts *a, struct tk_llama_saved *s, float *base,
                        size_t *off) {
    const tk_llama_config *c = &m->cfg;
    size_t N = a->Bmax * a->Tmax, C = (size_t)c->dim, F = (size_t)c->hidden_dim;
    size_t HD = (size_t)c->n_heads * c->head_dim, GD = (size_t)c->n_kv_heads * c->head_dim;
    size_t BHT = a->Bmax * (size_t)c->n_heads * a->Tmax;
    s->xn1 = carve(base, off, N * C);
    s->rstd1 = carve(base, off, N);
    s->q = carve(base, off, N * HD);
    s->k = carve(base, off, N * GD);
    s->v = carve(base, off, N * GD);
    s->att = carve(base, off, N * HD);
    s->probs = a->tiled ? NULL : carve(base, off, a->Bmax * (size_t)c->n_heads * tk_attention_probs_head(a->Tmax, a->Tmax));
    s->lse = a->tiled ? carve(base, off, BHT) : NULL;
    s->x2 = carve(base, off, N * C);
    s->xn2 = carve(base, off, N * C);
    s->rstd2 = carve(base, off, N);
    s->g = carve(base, off, N * F);
    s->u = carve(base, off, N * F);
    s->h = carve(base, off, N * F);
}

static size_t layout_acts(tk_llama *m, tk_llama_acts *a, float *base) {
    const tk_llama_config *c = &m->cfg;
    size_t N = a->Bmax * a->Tmax, C = (size_t)c->dim, F = (size_t)c->hidden_dim;
    size_t HD = (size_t)c->n_heads * c->head_dim, GD = (size_t)c->n_kv_heads * c->head_dim;
    size_t V = (size_t)c->vocab_size, off = 0;
    struct tk_llama_saved shared = {0};
    if (a->recompute > 0) carve_layer(m, a, &shared, base, &off);
    for (int l = 0; l < c->n_layers; l++) {
        struct tk_llama_saved *s = &a->saved[l];
        if (l < a->recompute) *s = shared;
        else carve_layer(m, a, s, base, &off);
        s->x = carve(base, &off, N * C);
    }
    a->x_final = carve(base, &off, N * C);
    a->xn_final = carve(base, &off, N * C);
    a->rstd_final = carve(base, &off, N);
    a->logits = carve(base, &off, N * V);
    a->dres = carve(base, &off, N * C);
    a->dxn = carve(base, &off, N * C);
    a->datt = carve(base, &off, N * HD);
    a->dq = carve(base, &off, N * HD);
    a->dk = carve(base, &off, N * GD);
    a->dv = carve(base, &off, N * GD);
    a->dg = carve(base, &off, N * F);
    a->du = carve(base, &off, N * F);
    a->dh = carve(base, &off, N * F);
    a->tmp = carve(base, &off, N * C); /* o_proj / down_proj outputs [N,C], then the token losses [N] */
    a->attn_scratch = carve(base, &off, a->tiled ? tk_attention_tiled_scratch(a->Tmax, a->Tmax, (size_t)c->head_dim)
                                                 : a->Tmax * a->Tmax);
    return off;
}

/* Adapter activations for n tokens and the shared workspace. */
static int alloc_adapter_acts(tk_llama *m, size_t n, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t width = (size_t)c->dim, ba = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->out > width) width = L->out;
            if (L->in > width) width = L->in;
            if (L->kind == TK_ADAPTER_DORA && L->out * L->in > ba) ba = L->out * L->in;
            if (L->kind == TK_ADAPTER_NONE || L->cap >= n) continue;
            tk_gate_stats keep = L->stats; /* statistics survive a re-allocation */
            L->stats = (tk_gate_stats){0};
            tk_adapted_free(L);
            L->stats = keep;
            if (tk_adapted_alloc(L, n, err)) return -1;
        }
    if (m->ws.n_tok < n) {
        tk_adapter_ws_free(&m->ws);
        if (tk_adapter_ws_alloc(&m->ws, n, width, m->max_rank, ba, err)) return -1;
    }
    if (m->bf16 && !m->ws.wconv) { /* conversion block: 4M floats, at least one row of any matrix */
        size_t need = (size_t)1 << 22;
        if (need < width) need = width;
        if (need < (size_t)c->dim) need = (size_t)c->dim;
        if (!(m->ws.wconv = tk_calloc(need, sizeof(float)))) return tk_fail(err, "out of memory");
        m->ws.wconv_n = need;
    }
    return 0;
}

/* The choices of o (NULL: defaults) for B x T tokens, in a->tiled and a->recompute. */
static void apply_mem_opts(const tk_llama *m, tk_llama_acts *a, size_t T, const tk_llama_mem_opts *o) {
    tk_attn_mode mode = o ? o->attention : TK_ATTN_AUTO;
    a->tiled = mode == TK_ATTN_TILED || (mode == TK_ATTN_AUTO && T >= TK_ATTN_TILED_MIN_T);
    int rec = o ? o->recompute : 0;
    a->recompute = rec < 0 || rec > m->cfg.n_layers ? m->cfg.n_layers : rec;
}

size_t tk_llama_acts_bytes(tk_llama *m, size_t B, size_t T, const tk_llama_mem_opts *o) {
    tk_llama_acts a = {.Bmax = B, .Tmax = T};
    struct tk_llama_saved *saved = calloc((size_t)m->cfg.n_layers, sizeof *saved);
    if (!saved) return 0;
    a.saved = saved;
    apply_mem_opts(m, &a, T, o);
    size_t n = layout_acts(m, &a, NULL);
    free(saved);
    return n * sizeof(float);
}

int tk_attn_mode_parse(const char *s, tk_attn_mode *out, tk_err *err) {
    if (strcmp(s, "auto") == 0) *out = TK_ATTN_AUTO;
    else if (strcmp(s, "full") == 0) *out = TK_ATTN_FULL;
    else if (strcmp(s, "tiled") == 0) *out = TK_ATTN_TILED;
    else return tk_fail(err, "--attention: \"%s\" is not auto, full or tiled", s);
    return 0;
}

int tk_recompute_parse(const char *s, int *out, tk_err *err) {
    if (strcmp(s, "all") == 0) {
        *out = -1;
        return 0;
    }
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < 0 || v > 1000000)
        return tk_fail(err, "--recompute: \"%s\" is not a layer count >= 0 or all", s);
    *out = (int)v;
    return 0;
}

tk_llama_acts *tk_llama_acts_alloc(tk_llama *m, size_t B, size_t T, tk_err *err) {
    return tk_llama_acts_alloc_ex(m, B, T, NULL, err);
}

tk_llama_acts *tk_llama_acts_alloc_ex(tk_llama *m, size_t B, size_t T, const tk_llama_mem_opts *o, tk_err *err) {
    tk_llama_acts *a = calloc(1, sizeof *a);
    if (!a) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    a->Bmax = B;
    a->Tmax = T;
    apply_mem_opts(m, a, T, o);
    a->saved = calloc((size_t)m->cfg.n_layers, sizeof *a->saved);
    a->targets = calloc(B * T, sizeof(int32_t));
    a->valid = calloc(B * T, 1);
    size_t total = layout_acts(m, a, NULL);
    a->buf = tk_calloc(total, sizeof(float));
    if (!a->saved || !a->targets || !a->valid || !a->buf) {
        tk_fail(err, "out of memory for activations of %zu x %zu tokens (%.1f GiB)", B, T,
                (double)total * 4.0 / (1u << 30));
        tk_llama_acts_free(m, a);
        return NULL;
    }
    layout_acts(m, a, a->buf);
    if (ensure_rope(m, T, err) || alloc_adapter_acts(m, B * T, err)) {
        tk_llama_acts_free(m, a);
        return NULL;
    }
    return a;
}

void tk_llama_acts_free(tk_llama *m, tk_llama_acts *a) {
    (void)m;
    if (!a) return;
    free(a->saved);
    free(a->targets);
    free(a->valid);
    tk_free(a->buf);
    free(a);
}

/* ---- forward and backward --------------------------------------------------------------------- */

/* out [N,C] = embedding rows of ids, from the fp32 or the BF16-resident table. */
static void embed_rows(const tk_llama *m, float *out, const int32_t *ids, size_t N) {
    size_t C = (size_t)m->cfg.dim;
    if (m->embed) tk_embedding_forward(out, ids, m->embed, N, C);
    else tk_embedding_bf16_forward(out, ids, m->embed_bf16, N, C);
}

/* Visual tokens: rows whose kind is TK_KIND_IMAGE take the caller's embeddings (projector output)
 * instead of their placeholder ids' embedding rows. */
static void splice_image_rows(const tk_llama_acts *a, float *x, size_t N, size_t C) {
    if (!a->image_embeds || !a->kinds) return;
    for (size_t i = 0; i < N; i++)
        if (a->kinds[i] == TK_KIND_IMAGE) memcpy(x + i * C, a->image_embeds + i * C, C * sizeof(float));
}

/* The lm_head in the form it is held (natural or packed, fp32 or BF16, or for BF16 compute). */
static tk_frozen head_weight(const tk_llama *m) {
    return (tk_frozen){m->lm_head, m->lm_head_bf16, m->lm_head_packed, m->lm_head_packed_bf16, m->lm_head_dot};
}

/* logits [N,V] = xn lm_head^T */
static void head_forward(tk_llama *m, float *logits, const float *xn, size_t N) {
    size_t C = (size_t)m->cfg.dim, V = (size_t)m->cfg.vocab_size;
    double t0 = tk_time();
    tk_frozen_forward(logits, xn, head_weight(m), N, C, V, m->ws.wconv, m->ws.wconv_n);
    m->ws.secs_base_fwd += tk_time() - t0;
}

/* out [n] = x + y: the residual stream. */
static void residual_add(float *out, const float *x, const float *y, size_t n) {
#pragma omp parallel for simd if (n >= TK_OMP_MIN_WORK)
    for (size_t i = 0; i < n; i++) out[i] = x[i] + y[i];
}

/* Layer l from its saved input a->saved[l].x, filling what backward reads; out [N,C] receives the
 * layer's output (NULL: stop before the MLP's down projection, which backward does not need: a
 * recomputation). mode: TK_FWD_* (adapter.h), REPLAY when recomputing a training forward. */
static int layer_forward(tk_llama *m, tk_llama_acts *a, int l, float *out, size_t B, size_t T, int mode,
                         tk_rng *rng, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t N = B * T, C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim;
    size_t H = (size_t)c->n_heads, G = (size_t)c->n_kv_heads;
    tk_adapter_ws *ws = &m->ws;
    struct tk_llama_saved *s = &a->saved[l];
    tk_adapted_linear *P = m->layers[l].proj;
    tk_rmsnorm_forward(s->xn1, s->rstd1, s->x, m->layers[l].attn_norm, N, C, c->norm_eps);
    if (tk_adapted_forward(&P[TK_PROJ_Q], ws, s->q, s->xn1, a->valid, N, mode, rng, err) ||
        tk_adapted_forward(&P[TK_PROJ_K], ws, s->k, s->xn1, a->valid, N, mode, rng, err) ||
        tk_adapted_forward(&P[TK_PROJ_V], ws, s->v, s->xn1, a->valid, N, mode, rng, err))
        return -1;
    tk_rope_forward(s->q, m->rope_cos, m->rope_sin, B, T, H, D, 0);
    tk_rope_forward(s->k, m->rope_cos, m->rope_sin, B, T, G, D, 0);
    double t0 = tk_time();
    if (a->tiled)
        tk_attention_tiled_forward(s->att, s->lse, s->q, s->k, s->v, a->valid, B, T, T, H, G, D, a->attn_scratch);
    else
        tk_attention_forward(s->att, s->probs, s->q, s->k, s->v, a->valid, B, T, T, H, G, D);
    ws->secs_attn_fwd += tk_time() - t0;
    if (tk_adapted_forward(&P[TK_PROJ_O], ws, a->tmp, s->att, a->valid, N, mode, rng, err)) return -1;
    residual_add(s->x2, s->x, a->tmp, N * C);
    tk_rmsnorm_forward(s->xn2, s->rstd2, s->x2, m->layers[l].ffn_norm, N, C, c->norm_eps);
    if (tk_adapted_forward(&P[TK_PROJ_GATE], ws, s->g, s->xn2, a->valid, N, mode, rng, err) ||
        tk_adapted_forward(&P[TK_PROJ_UP], ws, s->u, s->xn2, a->valid, N, mode, rng, err))
        return -1;
    tk_swiglu_forward(s->h, s->g, s->u, N * F);
    if (!out) return 0;
    if (tk_adapted_forward(&P[TK_PROJ_DOWN], ws, a->tmp, s->h, a->valid, N, mode, rng, err)) return -1;
    residual_add(out, s->x2, a->tmp, N * C);
    return 0;
}

int tk_llama_forward(tk_llama *m, tk_llama_acts *a, const int32_t *ids, const uint8_t *mask, size_t B,
                     size_t T, int train, tk_rng *rng, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    TK_ASSERT(B <= a->Bmax && T <= a->Tmax);
    size_t N = B * T, C = (size_t)c->dim, V = (size_t)c->vocab_size;
    for (size_t i = 0; i < N; i++) {
        TK_ASSERT(ids[i] >= 0 && (size_t)ids[i] < V);
        a->valid[i] = mask ? mask[i] != 0 : 1;
    }
    a->ids = ids;
    embed_rows(m, a->saved[0].x, ids, N);
    splice_image_rows(a, a->saved[0].x, N, C);
    a->fwd_mode = train ? TK_FWD_TRAIN : TK_FWD_EVAL;
    for (int l = 0; l < c->n_layers; l++) {
        float *out = l + 1 < c->n_layers ? a->saved[l + 1].x : a->x_final;
        if (layer_forward(m, a, l, out, B, T, a->fwd_mode, rng, err)) return -1;
    }
    tk_rmsnorm_forward(a->xn_final, a->rstd_final, a->x_final, m->final_norm, N, C, c->norm_eps);
    head_forward(m, a->logits, a->xn_final, N);
    return 0;
}

double tk_llama_loss(tk_llama *m, tk_llama_acts *a, const int32_t *labels, size_t B, size_t T,
                     float scale, size_t *count) {
    size_t N = B * T, V = (size_t)m->cfg.vocab_size, n = 0;
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < T; t++) {
            int32_t y = t + 1 < T ? labels[b * T + t + 1] : -100;
            TK_ASSERT(y == -100 || (y >= 0 && (size_t)y < V));
            a->targets[b * T + t] = y;
            n += y != -100;
        }
    if (count) *count = n;
    if (scale != 0.0f) return tk_cross_entropy_fused(a->tmp, a->logits, a->logits, a->targets, N, V, scale);
    return tk_cross_entropy_forward(a->tmp, a->logits, a->targets, N, V);
}

int tk_llama_backward(tk_llama *m, tk_llama_acts *a, size_t B, size_t T, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t N = B * T, C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim;
    size_t H = (size_t)c->n_heads, G = (size_t)c->n_kv_heads, V = (size_t)c->vocab_size;
    size_t HD = H * D, GD = G * D;
    tk_adapter_ws *ws = &m->ws;
    /* logits = xn_f lm_head^T;  xn_f = rmsnorm(x_L). dxn is written, not added to (no zero-fill) */
    double t0 = tk_time();
    tk_frozen_backward(a->dxn, a->logits, head_weight(m), N, C, V, 0.0f, m->ws.wconv, m->ws.wconv_n);
    if (m->d_lm_head) tk_linear_backward(NULL, m->d_lm_head, a->logits, a->xn_final, m->lm_head, N, C, V);
    ws->secs_base_bwd += tk_time() - t0;
    tk_zero_floats(a->dres, N * C);
    tk_rmsnorm_backward(a->dres, m->d_final_norm, a->dxn, a->x_final, m->final_norm, a->rstd_final, N, C);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        struct tk_llama_saved *s = &a->saved[l];
        tk_llama_layer *ly = &m->layers[l];
        tk_adapted_linear *P = ly->proj;
        /* Recomputed layers share one set of saved tensors, which the forward left holding layer
         * recompute-1: every lower one runs its forward again (same inputs, same kernels: exact). */
        if (l + 1 < a->recompute && layer_forward(m, a, l, NULL, B, T, a->fwd_mode ? TK_FWD_REPLAY : TK_FWD_EVAL,
                                                  NULL, err))
            return -1;
        /* x' = x2 + down(h): dres is dx' and, through the residual, part of dx2. The first gradient
         * into each buffer writes it (the _into calls): no zero-fills. */
        if (tk_adapted_backward_into(&P[TK_PROJ_DOWN], ws, a->dh, a->dres, s->h, a->valid, N, err)) return -1;
        tk_swiglu_backward_into(a->dg, a->du, a->dh, s->g, s->u, N * F);
        if (tk_adapted_backward_into(&P[TK_PROJ_GATE], ws, a->dxn, a->dg, s->xn2, a->valid, N, err) ||
            tk_adapted_backward(&P[TK_PROJ_UP], ws, a->dxn, a->du, s->xn2, a->valid, N, err))
            return -1;
        tk_rmsnorm_backward(a->dres, ly->d_ffn_norm, a->dxn, s->x2, ly->ffn_norm, s->rstd2, N, C);
        /* x2 = x + o(att): dres is now dx2 */
        if (tk_adapted_backward_into(&P[TK_PROJ_O], ws, a->datt, a->dres, s->att, a->valid, N, err)) return -1;
        tk_zero_floats(a->dq, N * HD);
        tk_zero_floats(a->dk, N * GD);
        tk_zero_floats(a->dv, N * GD);
        t0 = tk_time();
        if (a->tiled)
            tk_attention_tiled_backward(a->dq, a->dk, a->dv, a->attn_scratch, a->datt, s->att, s->lse, s->q, s->k,
                                        s->v, a->valid, B, T, T, H, G, D);
        else
            tk_attention_backward(a->dq, a->dk, a->dv, a->attn_scratch, a->datt, s->probs, s->q, s->k, s->v,
                                  B, T, T, H, G, D);
        ws->secs_attn_bwd += tk_time() - t0;
        tk_rope_backward(a->dq, m->rope_cos, m->rope_sin, B, T, H, D, 0);
        tk_rope_backward(a->dk, m->rope_cos, m->rope_sin, B, T, G, D, 0);
        if (tk_adapted_backward_into(&P[TK_PROJ_Q], ws, a->dxn, a->dq, s->xn1, a->valid, N, err) ||
            tk_adapted_backward(&P[TK_PROJ_K], ws, a->dxn, a->dk, s->xn1, a->valid, N, err) ||
            tk_adapted_backward(&P[TK_PROJ_V], ws, a->dxn, a->dv, s->xn1, a->valid, N, err))
            return -1;
        tk_rmsnorm_backward(a->dres, ly->d_attn_norm, a->dxn, s->x, ly->attn_norm, s->rstd1, N, C);
    }
    if (a->image_embeds && a->kinds) /* spliced rows: their gradient goes to the projector, not the table */
        for (size_t i = 0; i < N; i++)
            if (a->kinds[i] == TK_KIND_IMAGE) {
                if (a->d_image_embeds) memcpy(a->d_image_embeds + i * C, a->dres + i * C, C * sizeof(float));
                memset(a->dres + i * C, 0, C * sizeof(float));
            }
    if (m->d_embed) tk_embedding_backward(m->d_embed, a->dres, a->ids, N, C);
    return 0;
}

/* ---- KV-cached inference ---------------------------------------------------------------------- */

/* Rows of one pass through the stack: a step of more new tokens (a long prompt) runs in passes of
 * this many, so that the step's scratch ([n,F] MLP rows and the attention's) stays bounded. Measured
 * on a 4-layer BF16 model (dim 1024, 16 heads, ffn 2816) with a 3000-token prompt: one pass 4.5 s and
 * 1667 MB peak RSS, passes of 512 on the full kernel 3.0-3.4 s and 954 MB, on the tiled kernel
 * 6.4-6.6 s and 853 MB (docs/performance.md). */
#define TK_KV_PASS_ROWS 512
/* TK_ATTN_AUTO: passes keep the full kernel while its probs, [n,S] per head, stay within this many
 * floats (128 MiB), and take the tiled kernel (no such matrix) beyond. */
#define TK_KV_FULL_PROBS_MAX ((size_t)32 << 20)

/* The keys and values of the positions run so far for one sequence, and the scratch of one pass of
 * up to n = min(max_chunk, TK_KV_PASS_ROWS) new tokens (S = max_len positions). A tiled cache runs
 * passes of several tokens on the tiled attention kernel; single tokens (decoding) always take the
 * full kernel, whose probs are then one row of S per head. */
struct tk_llama_kv {
    size_t max_len, max_chunk, len;
    size_t L, GD;
    size_t rows;                /* n: rows of one pass */
    int tiled;                  /* passes of more than one token use the tiled kernel */
    float *buf;                 /* one block holding everything below */
    float *kc, *vc;             /* [L, S, G*D] keys (after rope) and values */
    float *x, *xn, *tmp, *rstd; /* [n,C], [n,C], [n,C], [n] */
    float *q, *att;             /* [n,H*D] */
    float *g, *u, *h;           /* [n,F] */
    float *probs;               /* [H, n*S] (tiled: [H, S]): H * tk_attention_probs_head(T, S) used */
    float *lse, *tscratch;      /* tiled: [H, n] and tk_attention_tiled_scratch(n, S, D); else empty */
};

tk_llama_kv *tk_llama_kv_alloc(tk_llama *m, size_t max_len, size_t max_chunk, tk_err *err) {
    return tk_llama_kv_alloc_ex(m, max_len, max_chunk, TK_ATTN_AUTO, err);
}

tk_llama_kv *tk_llama_kv_alloc_ex(tk_llama *m, size_t max_len, size_t max_chunk, tk_attn_mode attention,
                                  tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim;
    size_t H = (size_t)c->n_heads, G = (size_t)c->n_kv_heads;
    size_t HD = H * D, GD = G * D, S = max_len, L = (size_t)c->n_layers, n = max_chunk;
    if (max_len == 0 || max_chunk == 0 || max_chunk > max_len) {
        tk_fail(err, "KV cache: need 1 <= max_chunk (%zu) <= max_len (%zu)", max_chunk, max_len);
        return NULL;
    }
    size_t chunk = n;
    n = n < TK_KV_PASS_ROWS ? n : TK_KV_PASS_ROWS;
    int tiled = attention == TK_ATTN_TILED || (attention == TK_ATTN_AUTO && n > 1 && H * n * S > TK_KV_FULL_PROBS_MAX);
    if (ensure_rope(m, S, err) || alloc_adapter_acts(m, n, err)) return NULL;
    tk_llama_kv *kv = calloc(1, sizeof *kv);
    if (!kv) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    kv->max_len = S;
    kv->max_chunk = chunk;
    kv->rows = n;
    kv->tiled = tiled;
    kv->L = L;
    kv->GD = GD;
    size_t n_probs = tiled ? H * S : H * n * S, n_lse = tiled ? H * n : 0;
    size_t n_tscr = tiled ? tk_attention_tiled_scratch(n, S, D) : 0;
    size_t total = 2 * L * S * GD + n * (3 * C + 1 + 2 * HD + 3 * F) + n_probs + n_lse + n_tscr;
    if (!(kv->buf = tk_calloc(total, sizeof(float)))) {
        tk_fail(err, "out of memory for a %zu-token KV cache", S);
        free(kv);
        return NULL;
    }
    kv->kc = kv->buf;
    kv->vc = kv->kc + L * S * GD;
    kv->x = kv->vc + L * S * GD;
    kv->xn = kv->x + n * C;
    kv->tmp = kv->xn + n * C;
    kv->rstd = kv->tmp + n * C;
    kv->q = kv->rstd + n;
    kv->att = kv->q + n * HD;
    kv->g = kv->att + n * HD;
    kv->u = kv->g + n * F;
    kv->h = kv->u + n * F;
    kv->probs = kv->h + n * F;
    kv->lse = kv->probs + n_probs;
    kv->tscratch = kv->lse + n_lse;
    return kv;
}

void tk_llama_kv_free(tk_llama_kv *kv) {
    if (!kv) return;
    tk_free(kv->buf);
    free(kv);
}

size_t tk_llama_kv_len(const tk_llama_kv *kv) { return kv->len; }

int tk_llama_kv_tiled(const tk_llama_kv *kv) { return kv->tiled; }

void tk_llama_kv_reset(tk_llama_kv *kv) { kv->len = 0; }

int tk_llama_kv_copy(tk_llama_kv *dst, const tk_llama_kv *src, size_t from, tk_err *err) {
    if (dst->L != src->L || dst->GD != src->GD)
        return tk_fail(err, "KV cache copy between caches of different models");
    if (src->len > dst->max_len)
        return tk_fail(err, "KV cache copy: %zu positions do not fit in a cache of %zu", src->len, dst->max_len);
    if (from > src->len || from > dst->len)
        return tk_fail(err, "KV cache copy from position %zu: the caches hold %zu and %zu", from, src->len, dst->len);
    if (dst == src) return 0;
    size_t off = from * src->GD, row = (src->len - from) * src->GD;
    for (size_t l = 0; l < src->L; l++) {
        memcpy(dst->kc + l * dst->max_len * dst->GD + off, src->kc + l * src->max_len * src->GD + off,
               row * sizeof(float));
        memcpy(dst->vc + l * dst->max_len * dst->GD + off, src->vc + l * src->max_len * src->GD + off,
               row * sizeof(float));
    }
    dst->len = src->len;
    return 0;
}

int tk_llama_step(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, size_t T, float *logits, tk_err *err) {
    return tk_llama_step_ex(m, kv, ids, NULL, NULL, T, logits, err);
}

/* One pass of T <= kv->rows new tokens at positions kv->len.. through the stack: fills the cache and
 * leaves the last layer's output rows in kv->x. */
static int kv_pass(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, const float *embeds, const uint8_t *kinds,
                   size_t T, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim;
    size_t H = (size_t)c->n_heads, G = (size_t)c->n_kv_heads;
    size_t GD = G * D, S = kv->max_len, L = (size_t)c->n_layers, pos = kv->len;
    float *x = kv->x, *xn = kv->xn, *tmp = kv->tmp, *rstd = kv->rstd, *q = kv->q, *att = kv->att;
    float *g = kv->g, *u = kv->u, *h = kv->h, *probs = kv->probs;
    tk_adapter_ws *ws = &m->ws;
    embed_rows(m, x, ids, T);
    if (embeds && kinds) /* visual tokens: the caller's embeddings (as splice_image_rows in training) */
        for (size_t i = 0; i < T; i++)
            if (kinds[i] == TK_KIND_IMAGE) memcpy(x + i * C, embeds + i * C, C * sizeof(float));
    for (size_t l = 0; l < L; l++) {
        tk_adapted_linear *P = m->layers[l].proj;
        float *kl = kv->kc + l * S * GD, *vl = kv->vc + l * S * GD;
        tk_rmsnorm_forward(xn, rstd, x, m->layers[l].attn_norm, T, C, c->norm_eps);
        if (tk_adapted_forward(&P[TK_PROJ_Q], ws, q, xn, NULL, T, 0, NULL, err) ||
            tk_adapted_forward(&P[TK_PROJ_K], ws, kl + pos * GD, xn, NULL, T, 0, NULL, err) ||
            tk_adapted_forward(&P[TK_PROJ_V], ws, vl + pos * GD, xn, NULL, T, 0, NULL, err))
            return -1;
        tk_rope_forward(q, m->rope_cos, m->rope_sin, 1, T, H, D, pos);
        tk_rope_forward(kl + pos * GD, m->rope_cos, m->rope_sin, 1, T, G, D, pos);
        if (kv->tiled && T > 1)
            tk_attention_tiled_forward(att, kv->lse, q, kl, vl, NULL, 1, T, pos + T, H, G, D, kv->tscratch);
        else
            tk_attention_forward(att, probs, q, kl, vl, NULL, 1, T, pos + T, H, G, D);
        if (tk_adapted_forward(&P[TK_PROJ_O], ws, tmp, att, NULL, T, 0, NULL, err)) return -1;
        for (size_t i = 0; i < T * C; i++) x[i] += tmp[i];
        tk_rmsnorm_forward(xn, rstd, x, m->layers[l].ffn_norm, T, C, c->norm_eps);
        if (tk_adapted_forward(&P[TK_PROJ_GATE], ws, g, xn, NULL, T, 0, NULL, err) ||
            tk_adapted_forward(&P[TK_PROJ_UP], ws, u, xn, NULL, T, 0, NULL, err))
            return -1;
        tk_swiglu_forward(h, g, u, T * F);
        if (tk_adapted_forward(&P[TK_PROJ_DOWN], ws, tmp, h, NULL, T, 0, NULL, err)) return -1;
        for (size_t i = 0; i < T * C; i++) x[i] += tmp[i];
    }
    kv->len = pos + T;
    return 0;
}

int tk_llama_step_ex(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, const float *embeds, const uint8_t *kinds,
                     size_t T, float *logits, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t C = (size_t)c->dim, V = (size_t)c->vocab_size, pos = kv->len;
    TK_ASSERT(kv->L == (size_t)c->n_layers && kv->GD == (size_t)c->n_kv_heads * (size_t)c->head_dim);
    if (T == 0 || T > kv->max_chunk)
        return tk_fail(err, "KV step of %zu tokens (this cache takes 1 to %zu at once)", T, kv->max_chunk);
    if (pos + T > kv->max_len)
        return tk_fail(err, "KV cache full: %zu + %zu positions exceed its %zu", pos, T, kv->max_len);
    for (size_t i = 0; i < T; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= V)
            return tk_fail(err, "token id %d at position %zu is outside the vocabulary [0, %zu)", ids[i],
                           pos + i, V);
    /* passes of at most kv->rows tokens; a failed one leaves the cache as it was */
    size_t n = 0;
    for (size_t i = 0; i < T; i += n) {
        n = T - i < kv->rows ? T - i : kv->rows;
        if (kv_pass(m, kv, ids + i, embeds ? embeds + i * C : NULL, kinds ? kinds + i : NULL, n, err)) {
            kv->len = pos;
            return -1;
        }
    }
    /* only the last position's logits are needed */
    float *xl = kv->x + (n - 1) * C;
    tk_rmsnorm_forward(kv->xn, kv->rstd, xl, m->final_norm, 1, C, c->norm_eps);
    head_forward(m, logits, kv->xn, 1);
    return 0;
}

/* ---- batched decoding: one token for each of several sequences ---------------------------------- */

/* The scratch of tk_llama_step_rows for up to `rows` sequences whose caches hold up to max_len
 * positions (S): one row per sequence through the projections, one probs row per head at a time. */
struct tk_llama_rows {
    size_t rows, max_len;
    float *buf;                 /* one block holding everything below */
    float *x, *xn, *tmp, *rstd; /* [n,C], [n,C], [n,C], [n] */
    float *q, *att;             /* [n,H*D] */
    float *k, *v;               /* [n,G*D] before they go into their caches */
    float *g, *u, *h;           /* [n,F] */
    float *probs;               /* [H, S]: one sequence's attention at a time */
};

tk_llama_rows *tk_llama_rows_alloc(tk_llama *m, size_t rows, size_t max_len, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim;
    size_t HD = (size_t)c->n_heads * D, GD = (size_t)c->n_kv_heads * D, n = rows, S = max_len;
    if (rows == 0 || max_len == 0) {
        tk_fail(err, "batched decoding needs rows >= 1 and max_len >= 1 (got %zu and %zu)", rows, max_len);
        return NULL;
    }
    if (ensure_rope(m, S, err) || alloc_adapter_acts(m, n, err)) return NULL;
    tk_llama_rows *r = calloc(1, sizeof *r);
    size_t total = n * (3 * C + 1 + 2 * HD + 2 * GD + 3 * F) + (size_t)c->n_heads * tk_attention_probs_head(1, S);
    if (!r || !(r->buf = tk_calloc(total, sizeof(float)))) {
        free(r);
        tk_fail(err, "out of memory for batched decoding of %zu rows", rows);
        return NULL;
    }
    r->rows = n;
    r->max_len = S;
    r->x = r->buf;
    r->xn = r->x + n * C;
    r->tmp = r->xn + n * C;
    r->rstd = r->tmp + n * C;
    r->q = r->rstd + n;
    r->att = r->q + n * HD;
    r->k = r->att + n * HD;
    r->v = r->k + n * GD;
    r->g = r->v + n * GD;
    r->u = r->g + n * F;
    r->h = r->u + n * F;
    r->probs = r->h + n * F;
    return r;
}

void tk_llama_rows_free(tk_llama_rows *r) {
    if (!r) return;
    tk_free(r->buf);
    free(r);
}

int tk_llama_step_rows(tk_llama *m, tk_llama_rows *r, tk_llama_kv *const *kv, const int32_t *ids, size_t B,
                       float *logits, tk_err *err) {
    const tk_llama_config *c = &m->cfg;
    size_t C = (size_t)c->dim, F = (size_t)c->hidden_dim, D = (size_t)c->head_dim, V = (size_t)c->vocab_size;
    size_t H = (size_t)c->n_heads, G = (size_t)c->n_kv_heads, HD = H * D, GD = G * D, L = (size_t)c->n_layers;
    if (B == 0 || B > r->rows) return tk_fail(err, "batched step of %zu rows (this scratch takes 1 to %zu)", B, r->rows);
    for (size_t b = 0; b < B; b++) {
        TK_ASSERT(kv[b]->L == L && kv[b]->GD == GD);
        if (kv[b]->len + 1 > kv[b]->max_len)
            return tk_fail(err, "KV cache of row %zu full: %zu + 1 positions exceed its %zu", b, kv[b]->len,
                           kv[b]->max_len);
        if (kv[b]->len + 1 > r->max_len)
            return tk_fail(err, "row %zu reaches position %zu; this scratch takes %zu", b, kv[b]->len + 1, r->max_len);
        if (ids[b] < 0 || (size_t)ids[b] >= V)
            return tk_fail(err, "token id %d of row %zu is outside the vocabulary [0, %zu)", ids[b], b, V);
    }
    float *x = r->x, *xn = r->xn, *tmp = r->tmp;
    tk_adapter_ws *ws = &m->ws;
    embed_rows(m, x, ids, B);
    for (size_t l = 0; l < L; l++) {
        tk_adapted_linear *P = m->layers[l].proj;
        tk_rmsnorm_forward(xn, r->rstd, x, m->layers[l].attn_norm, B, C, c->norm_eps);
        if (tk_adapted_forward_rows(&P[TK_PROJ_Q], ws, r->q, xn, B, err) ||
            tk_adapted_forward_rows(&P[TK_PROJ_K], ws, r->k, xn, B, err) ||
            tk_adapted_forward_rows(&P[TK_PROJ_V], ws, r->v, xn, B, err))
            return -1;
        /* each row at its own position, against its own cache: tk_llama_step's arithmetic for one token */
        for (size_t b = 0; b < B; b++) {
            size_t pos = kv[b]->len, S = kv[b]->max_len;
            float *kl = kv[b]->kc + l * S * GD, *vl = kv[b]->vc + l * S * GD;
            memcpy(kl + pos * GD, r->k + b * GD, GD * sizeof(float));
            memcpy(vl + pos * GD, r->v + b * GD, GD * sizeof(float));
            tk_rope_forward(r->q + b * HD, m->rope_cos, m->rope_sin, 1, 1, H, D, pos);
            tk_rope_forward(kl + pos * GD, m->rope_cos, m->rope_sin, 1, 1, G, D, pos);
            tk_attention_forward(r->att + b * HD, r->probs, r->q + b * HD, kl, vl, NULL, 1, 1, pos + 1, H, G, D);
        }
        if (tk_adapted_forward_rows(&P[TK_PROJ_O], ws, tmp, r->att, B, err)) return -1;
        for (size_t i = 0; i < B * C; i++) x[i] += tmp[i];
        tk_rmsnorm_forward(xn, r->rstd, x, m->layers[l].ffn_norm, B, C, c->norm_eps);
        if (tk_adapted_forward_rows(&P[TK_PROJ_GATE], ws, r->g, xn, B, err) ||
            tk_adapted_forward_rows(&P[TK_PROJ_UP], ws, r->u, xn, B, err))
            return -1;
        tk_swiglu_forward(r->h, r->g, r->u, B * F);
        if (tk_adapted_forward_rows(&P[TK_PROJ_DOWN], ws, tmp, r->h, B, err)) return -1;
        for (size_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    for (size_t b = 0; b < B; b++) kv[b]->len++;
    tk_rmsnorm_forward(xn, r->rstd, x, m->final_norm, B, C, c->norm_eps);
    if (tk_frozen_rows_alone(head_weight(m))) head_forward(m, logits, xn, B);
    else
        for (size_t b = 0; b < B; b++) head_forward(m, logits + b * V, xn + b * C, 1);
    return 0;
}

/* ---- generation ------------------------------------------------------------------------------- */

long tk_llama_generate(tk_llama *m, const int32_t *prompt, size_t n_prompt, size_t max_new,
                       int32_t eos, int32_t *out, tk_err *err) {
    size_t V = (size_t)m->cfg.vocab_size;
    if (n_prompt == 0) return tk_fail(err, "the prompt is empty");
    for (size_t i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || (size_t)prompt[i] >= V)
            return tk_fail(err, "prompt id %d at position %zu is outside the vocabulary [0, %zu)",
                           prompt[i], i, V);
    if (max_new == 0) return 0;
    tk_llama_kv *kv = tk_llama_kv_alloc(m, n_prompt + max_new, n_prompt, err);
    float *logits = malloc(V * sizeof(float));
    if (!kv || !logits) {
        if (kv) tk_fail(err, "out of memory");
        tk_llama_kv_free(kv);
        free(logits);
        return -1;
    }
    long produced = 0;
    const int32_t *chunk = prompt;
    size_t T = n_prompt;
    while (1) {
        if (tk_llama_step(m, kv, chunk, T, logits, err)) {
            produced = -1;
            break;
        }
        size_t best = 0;
        for (size_t v = 1; v < V; v++)
            if (logits[v] > logits[best]) best = v;
        int32_t next = (int32_t)best;
        out[produced++] = next;
        if ((size_t)produced >= max_new || next == eos) break;
        chunk = &out[produced - 1];
        T = 1;
    }
    tk_llama_kv_free(kv);
    free(logits);
    return produced;
}

/* ---- frozen weights in the packed kernel's layout -------------------------------------------- */

/* p lies in one of this model's own writable blocks (not a read-only mapping of a checkpoint). */
static int owns(const tk_llama *m, const void *p) {
    const char *c = p, *o = (const char *)m->owned;
    return m->owned && c >= o && c < o + m->owned_n * sizeof(float);
}

/* One matrix tk_llama_pack_frozen packs: its fp32 slot (f) or BF16 slot (h), where the packed
 * pointer goes (pf or ph; pd for BF16 compute), and its shape. */
typedef struct {
    float **f;
    const uint16_t **h;
    const float **pf;
    const uint16_t **ph;
    size_t rows, cols;
    const uint16_t **pd;
} pack_entry;

static size_t packable(tk_llama *m, pack_entry *e) {
    size_t n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->dw0 || L->kind == TK_ADAPTER_DORA) continue;
            if (L->w0) e[n++] = (pack_entry){&L->w0, NULL, &L->w0_packed, NULL, L->out, L->in, &L->w0_dot};
            else if (L->w0_bf16)
                e[n++] = (pack_entry){NULL, &L->w0_bf16, NULL, &L->w0_packed_bf16, L->out, L->in, &L->w0_dot};
        }
    size_t V = (size_t)m->cfg.vocab_size, C = (size_t)m->cfg.dim;
    if (!m->d_lm_head && m->lm_head && m->lm_head != m->embed)
        e[n++] = (pack_entry){&m->lm_head, NULL, &m->lm_head_packed, NULL, V, C, &m->lm_head_dot};
    else if (!m->d_lm_head && !m->lm_head && m->lm_head_bf16 && m->lm_head_bf16 != m->embed_bf16)
        e[n++] = (pack_entry){NULL, &m->lm_head_bf16, NULL, &m->lm_head_packed_bf16, V, C, &m->lm_head_dot};
    return n;
}

static size_t entry_bytes(const pack_entry *e) { return e->rows * e->cols * (e->f ? sizeof(float) : sizeof(uint16_t)); }

/* Its share of the block of copies: entry_bytes rounded up, so that the copies stay 64-byte aligned. */
static size_t entry_slot(const pack_entry *e) { return (entry_bytes(e) + 63) & ~(size_t)63; }

/* Drops the whole pages of a read-only mapping that a packed copy replaced from this process's
 * resident set (the file stays mapped; nothing reads those pages again). */
static void drop_mapped(const void *w, size_t bytes) {
    uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = ((uintptr_t)w + pg - 1) & ~(pg - 1);
    uintptr_t b = ((uintptr_t)w + bytes) & ~(pg - 1);
    if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

/* The frozen matrices (and a tied, frozen lm_head) into tk_bf16dot_pack's panels, in one block of
 * copies; the sources' whole pages are dropped (nothing reads them again), except a tied head's, which
 * is still the embedding. Returns how many, or -1 (err set) when out of memory. */
static int pack_dot(tk_llama *m, tk_err *err) {
    pack_entry *e = calloc(slot_capacity(&m->cfg) + 1, sizeof *e);
    if (!e) return tk_fail(err, "out of memory packing the frozen weights");
    size_t n = packable(m, e), V = (size_t)m->cfg.vocab_size, C = (size_t)m->cfg.dim;
    int tied = !m->d_lm_head && !m->d_embed && ((m->lm_head && m->lm_head == m->embed) ||
                                                (!m->lm_head && m->lm_head_bf16 && m->lm_head_bf16 == m->embed_bf16));
    if (tied) e[n++] = m->lm_head ? (pack_entry){&m->lm_head, NULL, NULL, NULL, V, C, &m->lm_head_dot}
                                 : (pack_entry){NULL, &m->lm_head_bf16, NULL, NULL, V, C, &m->lm_head_dot};
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += (tk_bf16dot_size(e[i].rows, e[i].cols) * sizeof(uint16_t) + 63) & ~(size_t)63;
    /* Not zero-filled (tk_calloc would make the whole block resident at once, beside every source: a
     * 7B model's 12.6 GiB twice): tk_bf16dot_pack writes every value of a copy, and each source is
     * dropped right after its copy is written, so the resident set grows by one matrix at a time. */
    size_t huge = (size_t)1 << 21, rounded = (total + huge - 1) & ~(huge - 1);
    if (n && !(m->dot_copies = aligned_alloc(huge, rounded))) {
        free(e);
        return tk_fail(err, "out of memory packing the frozen weights for BF16 compute (%.1f GiB)",
                       total / (double)(1u << 30));
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t *wd = (uint16_t *)((char *)m->dot_copies + off);
        off += (tk_bf16dot_size(e[i].rows, e[i].cols) * sizeof(uint16_t) + 63) & ~(size_t)63;
        const float *f = e[i].f ? *e[i].f : NULL;
        const uint16_t *h = e[i].h ? *e[i].h : NULL;
        tk_bf16dot_pack(wd, f, h, e[i].rows, e[i].cols);
        *e[i].pd = wd;
        if (tied && i + 1 == n) break; /* the embedding stays for the lookup */
        drop_mapped(f ? (const void *)f : (const void *)h, entry_bytes(&e[i]));
        if (e[i].f) *e[i].f = NULL;
        else *e[i].h = NULL;
    }
    free(e);
    return (int)n;
}

/* The frozen matrices into tk_linear_pack's panels (tk_llama_pack_frozen without BF16 compute). */
static int pack_panels(tk_llama *m, tk_err *err) {
    pack_entry *e = calloc(slot_capacity(&m->cfg), sizeof *e);
    if (!e) return tk_fail(err, "out of memory packing the frozen weights");
    int rc = -1;
    size_t n = packable(m, e), copied = 0;
    /* tensors read in place from a checkpoint's mapping are read-only: they get copies */
    for (size_t i = 0; i < n; i++)
        if (!owns(m, e[i].f ? (const void *)*e[i].f : (const void *)*e[i].h)) copied += entry_slot(&e[i]);
    if (copied && !(m->packed_copies = tk_calloc(copied, 1))) {
        tk_fail(err, "out of memory packing the frozen weights (%.1f GiB of copies)", copied / (double)(1u << 30));
        goto done;
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        void *w = e[i].f ? (void *)*e[i].f : (void *)(uintptr_t)*e[i].h; /* writable once owned */
        size_t bytes = entry_bytes(&e[i]);
        if (!owns(m, w)) {
            char *dst = (char *)m->packed_copies + off;
            memcpy(dst, w, bytes);
            drop_mapped(w, bytes);
            w = dst;
            off += entry_slot(&e[i]);
        }
        if (e[i].f ? tk_linear_pack(w, e[i].rows, e[i].cols) : tk_linear_pack_bf16(w, e[i].rows, e[i].cols)) {
            tk_fail(err, "out of memory packing the frozen weights");
            goto done;
        }
        if (e[i].f) *e[i].f = NULL, *e[i].pf = w;
        else *e[i].h = NULL, *e[i].ph = w;
        m->packed = 1;
    }
    rc = (int)n;
done:
    free(e);
    return rc;
}

int tk_llama_pack_frozen(tk_llama *m, tk_err *err) {
    if (m->packed) return 0;
    if (m->compute_bf16 && tk_bf16dot_available()) {
        int n = pack_dot(m, err);
        if (n > 0) m->packed = 1;
        return n; /* what pack_dot leaves (DoRA's, trainable ones) stays natural */
    }
    if (!tk_linear_packed_available()) return 0;
    return pack_panels(m, err);
}

int tk_compute_parse(const char *s, int *bf16, tk_err *err) {
    if (strcmp(s, "fp32") == 0) *bf16 = 0;
    else if (strcmp(s, "bf16") == 0) *bf16 = 1;
    else return tk_fail(err, "--compute: \"%s\" is not fp32 or bf16", s);
    return 0;
}

int tk_compute_resolve(int want_bf16, int quiet) {
    if (!want_bf16) return 0;
    if (tk_bf16dot_available()) return 1;
    if (!quiet) fprintf(stderr, "note: --compute bf16: this CPU has no AVX512-BF16 (or TSPEFT_BF16DOT=0); computing in fp32\n");
    return 0;
}

/* ---- merging ---------------------------------------------------------------------------------- */

void tk_llama_set_gated(tk_llama *m, int gated) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind != TK_ADAPTER_NONE) L->gated = gated && m->peft.gate.enabled;
        }
}

/* W = W0 + s B A, and for DoRA W = mag * W / ||W||_row (PEFT's merge); AdaLoRA: W0 + s B (E . A).
 * out [O,I]; ea [R,I] scratch for AdaLoRA's E . A. */
static void merged_weight(const tk_adapted_linear *L, float *out, float *ea) {
    size_t I = L->in, O = L->out;
    const float *A = L->A;
    if (L->kind == TK_ADAPTER_ADALORA) {
        for (size_t j = 0; j < L->r; j++)
            for (size_t i = 0; i < I; i++) ea[j * I + i] = L->E[j] * L->A[j * I + i];
        A = ea;
    }
    memcpy(out, L->w0, O * I * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(O), tk_blas_dim(I), tk_blas_dim(L->r),
                L->scale, L->B, tk_blas_dim(L->r), A, tk_blas_dim(I), 1.0f, out, tk_blas_dim(I));
    if (L->kind != TK_ADAPTER_DORA) return;
    for (size_t o = 0; o < O; o++) {
        double ss = 0.0;
        for (size_t i = 0; i < I; i++) ss += (double)out[o * I + i] * out[o * I + i];
        float c = L->mag[o] / (float)sqrt(ss);
        for (size_t i = 0; i < I; i++) out[o * I + i] *= c;
    }
}

int tk_llama_merge(const tk_llama *mc, const char *model_dir, const char *out_dir, tk_err *err) {
    tk_llama *m = (tk_llama *)mc; /* slots need non-const pointers; nothing is modified */
    if (m->peft.kind == TK_ADAPTER_BOTTLENECK)
        return tk_fail(err, "a bottleneck adapter adds a non-linear branch and cannot be merged into the weights");
    if (m->bf16) return tk_fail(err, "merging needs fp32 weights: load the model without BF16-resident weights");
    if (m->packed) return tk_fail(err, "merging needs the weights in their stored layout: merge a model that was not packed for training");
    size_t cap = slot_capacity(&m->cfg);
    tk_llama_slot *slots = calloc(cap, sizeof *slots);
    tk_st_entry *e = calloc(cap, sizeof *e);
    float **merged = calloc(cap, sizeof *merged);
    int rc = -1;
    if (!slots || !e || !merged) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t ns = tk_llama_slots(m, slots);
    for (size_t i = 0; i < ns; i++) {
        const float *data = *slots[i].data;
        for (int l = 0; l < m->cfg.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) {
                const tk_adapted_linear *L = &m->layers[l].proj[p];
                if (slots[i].data != &m->layers[l].proj[p].w0 || L->kind == TK_ADAPTER_NONE) continue;
                float *ea = tk_calloc(L->r * L->in, sizeof(float));
                if (!(merged[i] = tk_calloc(L->out * L->in, sizeof(float))) || !ea) {
                    tk_free(ea);
                    tk_fail(err, "out of memory merging %s", slots[i].name);
                    goto done;
                }
                merged_weight(L, merged[i], ea);
                tk_free(ea);
                data = merged[i];
            }
        e[i] = (tk_st_entry){.name = slots[i].name, .dtype = TK_DT_F32, .ndim = slots[i].cols ? 2 : 1,
                             .shape = {(int64_t)slots[i].rows, (int64_t)slots[i].cols}, .data = data};
    }
    char src[4096], dst[4096];
    snprintf(dst, sizeof dst, "%s/model.safetensors", out_dir);
    const char *meta[] = {"format", "pt", NULL};
    if (tk_st_write(dst, e, ns, meta, err)) goto done;
    snprintf(src, sizeof src, "%s/config.json", model_dir);
    snprintf(dst, sizeof dst, "%s/config.json", out_dir);
    size_t len;
    char *cfg = tk_read_file(src, &len, err);
    if (!cfg) goto done;
    rc = tk_write_file_atomic(dst, cfg, len, err);
    free(cfg);
done:
    if (merged)
        for (size_t i = 0; i < cap; i++) tk_free(merged[i]);
    free(merged);
    free(e);
    free(slots);
    return rc;
}
