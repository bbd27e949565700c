/* vit_peft.c: adapters on a vision tower's projections (see vit_peft.h). */
#include "vision/vit_peft.h"

#include "vision/vit_train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tk_vit_peft {
    const tk_vit *m;
    tk_peft_config pc;        /* modules_to_save dropped: the caller handles base tensors */
    char prefix[96];
    size_t n_mod;
    tk_adapted_linear *mods;  /* [L * TK_VIT_N_PROJ] (kind NONE where not adapted) */
    tk_adapted_linear **table;/* [L * TK_VIT_N_PROJ] */
    tk_adapter_ws ws;
    char (*names)[TK_NAME_MAX + 16]; /* [2 * n_mod] gate entry names */
};

/* The base weight of projection j of layer l, and its shape [out, in]. */
static float *base_weight(const tk_vit *m, int l, int j, size_t *out, size_t *in) {
    const tk_vit_layer *L = &m->layers[l];
    size_t C = (size_t)m->cfg.hidden, F = (size_t)m->cfg.inter;
    *out = j == TK_VIT_FC1 ? F : C;
    *in = j == TK_VIT_FC2 ? F : C;
    float *w[TK_VIT_N_PROJ] = {L->q_w, L->k_w, L->v_w, L->o_w, L->fc1_w, L->fc2_w};
    return w[j];
}

tk_vit_peft *tk_vit_peft_new(const tk_vit *m, const tk_peft_config *pc, const char *key_prefix, tk_err *err) {
    int NL = m->cfg.n_layers;
    if (pc->kind != TK_ADAPTER_LORA && pc->kind != TK_ADAPTER_DORA && pc->kind != TK_ADAPTER_BOTTLENECK) {
        tk_fail(err, "vision tower adapters are LoRA, DoRA or bottleneck, not %s", tk_adapter_kind_name(pc->kind));
        return NULL;
    }
    for (int l = NL; l < TK_MAX_LAYERS; l++)
        if (pc->vit_module_mask[l]) {
            int j = 0;
            while (!(pc->vit_module_mask[l] & (1u << j))) j++;
            char nm[160];
            tk_vit_module_name(nm, sizeof nm, pc->vit_prefix, l, j);
            tk_fail(err, "target module %s: layer %d does not exist (the vision tower has %d)", nm, l, NL);
            return NULL;
        }
    tk_vit_peft *vp = calloc(1, sizeof *vp);
    size_t n = (size_t)NL * TK_VIT_N_PROJ;
    if (!vp || !(vp->mods = calloc(n, sizeof *vp->mods)) || !(vp->table = calloc(n, sizeof *vp->table))) {
        tk_vit_peft_free(vp);
        tk_fail(err, "out of memory");
        return NULL;
    }
    vp->m = m;
    vp->pc = *pc;
    vp->pc.save = NULL;
    vp->pc.n_save = 0;
    snprintf(vp->prefix, sizeof vp->prefix, "%s", key_prefix);
    float scale = tk_peft_scale(pc);
    for (int l = 0; l < NL; l++)
        for (int j = 0; j < TK_VIT_N_PROJ; j++) {
            if (!tk_peft_vit_targets(pc, l, j)) continue;
            tk_adapted_linear *L = &vp->mods[(size_t)l * TK_VIT_N_PROJ + (size_t)j];
            L->w0 = base_weight(m, l, j, &L->out, &L->in);
            tk_peft_module_init(L, pc, (size_t)pc->r, scale,
                                0x5851f42d4c957f2dull * (uint64_t)(l * TK_VIT_N_PROJ + j + 1));
            vp->table[(size_t)l * TK_VIT_N_PROJ + (size_t)j] = L;
            vp->n_mod++;
        }
    if (vp->n_mod && !(vp->names = calloc(2 * vp->n_mod, sizeof *vp->names))) {
        tk_vit_peft_free(vp);
        tk_fail(err, "out of memory");
        return NULL;
    }
    return vp;
}

void tk_vit_peft_free(tk_vit_peft *vp) {
    if (!vp) return;
    size_t n = vp->mods ? (size_t)vp->m->cfg.n_layers * TK_VIT_N_PROJ : 0;
    for (size_t i = 0; i < n; i++) {
        tk_gate_stats_free(&vp->mods[i].stats);
        tk_adapted_free(&vp->mods[i]);
    }
    tk_adapter_ws_free(&vp->ws);
    free(vp->mods);
    free(vp->table);
    free(vp->names);
    free(vp);
}

size_t tk_vit_peft_count(const tk_vit_peft *vp) { return vp->n_mod; }

tk_adapted_linear *tk_vit_peft_module(tk_vit_peft *vp, size_t i, int *layer, int *proj) {
    size_t n = (size_t)vp->m->cfg.n_layers * TK_VIT_N_PROJ, k = 0;
    for (size_t t = 0; t < n; t++) {
        if (!vp->table[t]) continue;
        if (k++ == i) {
            *layer = (int)(t / TK_VIT_N_PROJ);
            *proj = (int)(t % TK_VIT_N_PROJ);
            return vp->table[t];
        }
    }
    return NULL;
}

void tk_vit_peft_key(const tk_vit_peft *vp, int layer, int proj, char *buf, size_t n) {
    tk_vit_module_name(buf, n, vp->prefix, layer, proj);
}

tk_adapted_linear **tk_vit_peft_table(tk_vit_peft *vp) { return vp->table; }
tk_adapter_ws *tk_vit_peft_ws(tk_vit_peft *vp) { return &vp->ws; }

int tk_vit_peft_register(tk_vit_peft *vp, tk_params *P, tk_err *err) {
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        char key[TK_NAME_MAX], nm[TK_NAME_MAX + 64];
        tk_vit_peft_key(vp, l, j, key, sizeof key);
        int bn = L->kind == TK_ADAPTER_BOTTLENECK;
        int64_t sa[2] = {(int64_t)L->r, (int64_t)L->in}, sb[2] = {(int64_t)L->out, (int64_t)L->r};
        snprintf(nm, sizeof nm, "%s.%s", key, bn ? "adapter_down.weight" : "lora_A.weight");
        if (tk_params_add(P, nm, 2, sa, 1, &L->A, &L->dA, NULL, err)) return -1;
        snprintf(nm, sizeof nm, "%s.%s", key, bn ? "adapter_up.weight" : "lora_B.weight");
        if (tk_params_add(P, nm, 2, sb, 1, &L->B, &L->dB, NULL, err)) return -1;
        if (L->kind == TK_ADAPTER_DORA) {
            int64_t sm[1] = {(int64_t)L->out};
            snprintf(nm, sizeof nm, "%s.lora_magnitude_vector", key);
            if (tk_params_add(P, nm, 1, sm, 1, &L->mag, &L->dmag, NULL, err)) return -1;
        }
    }
    return 0;
}

void tk_vit_peft_bind_base(tk_vit_peft *vp) {
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        L->w0 = base_weight(vp->m, l, j, &L->out, &L->in);
    }
}

void tk_vit_peft_init(tk_vit_peft *vp, uint64_t seed) {
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_peft_module_init_weights(tk_vit_peft_module(vp, i, &l, &j), &rng);
    }
}

int tk_vit_peft_alloc(tk_vit_peft *vp, size_t n_tok, tk_err *err) {
    size_t width = 0, rank = 1, ba = 0;
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        if (L->out > width) width = L->out;
        if (L->in > width) width = L->in;
        if (L->r > rank) rank = L->r;
        if (L->kind == TK_ADAPTER_DORA && L->out * L->in > ba) ba = L->out * L->in;
        if (L->cap >= n_tok) continue;
        tk_gate_stats keep = L->stats; /* statistics survive a re-allocation */
        L->stats = (tk_gate_stats){0};
        tk_adapted_free(L);
        L->stats = keep;
        if (tk_adapted_alloc(L, n_tok, err)) return -1;
    }
    if (vp->n_mod && vp->ws.n_tok < n_tok) {
        tk_adapter_ws_free(&vp->ws);
        if (tk_adapter_ws_alloc(&vp->ws, n_tok, width, rank, ba, err)) return -1;
    }
    return 0;
}

void tk_vit_peft_reset_stats(tk_vit_peft *vp) {
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_gate_stats_reset(&tk_vit_peft_module(vp, i, &l, &j)->stats);
    }
}

int tk_vit_peft_update_gates(tk_vit_peft *vp, int step, tk_err *err) {
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        if (L->gated && tk_gate_update(&vp->pc.gate, &L->stats, step, &L->tau, &L->lambda))
            return tk_fail(err, "out of memory in the threshold step");
    }
    return 0;
}

size_t tk_vit_peft_gate_entries(tk_vit_peft *vp, tk_st_entry *e) {
    size_t n = 0, k = 0;
    for (size_t i = 0; i < vp->n_mod && vp->pc.gate.enabled; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        char key[TK_NAME_MAX];
        tk_vit_peft_key(vp, l, j, key, sizeof key);
        snprintf(vp->names[k], sizeof vp->names[k], "%s.ts_tau", key);
        e[n++] = (tk_st_entry){.name = vp->names[k++], .dtype = TK_DT_F32, .ndim = 1, .shape = {1}, .data = &L->tau};
        if (vp->pc.gate.target_keep > 0.0f) {
            snprintf(vp->names[k], sizeof vp->names[k], "%s.ts_lambda", key);
            e[n++] = (tk_st_entry){.name = vp->names[k++], .dtype = TK_DT_F32, .ndim = 1, .shape = {1},
                                   .data = &L->lambda};
        }
    }
    return n;
}


int tk_vit_peft_load_gates(tk_vit_peft *vp, const tk_st_file *f, tk_err *err) {
    for (size_t i = 0; i < vp->n_mod; i++) {
        int l = 0, j = 0;
        tk_adapted_linear *L = tk_vit_peft_module(vp, i, &l, &j);
        char key[TK_NAME_MAX];
        tk_vit_peft_key(vp, l, j, key, sizeof key);
        if (tk_peft_load_gate(L, f, key, err)) return -1;
    }
    return 0;
}
