/* adalora_train.c: see adalora_train.h. */
#include "adalora_train.h"

#include "../io/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tk_adalora_run {
    tk_adalora *alloc;
    float w;               /* orth_reg_weight */
    double reg;            /* R of the current step */
    const char *dump_dir;  /* or NULL */
    int fixed;             /* the adapter came with a rank_pattern: its ranks stay as they are */
    /* the dump of the current step (dumping steps only): per module, in allocator order */
    float **orth_a, **orth_b; /* [n][R*I], [n][O*R] */
    float **snap;             /* [n][R*I + O*R + R] A, B, E after the optimizer step, before masking */
};

static int dumping(const tk_adalora_run *ar, int step) { return ar->dump_dir && step <= TK_ADALORA_DUMP_STEPS; }

void tk_adalora_run_free(tk_adalora_run *ar) {
    if (!ar) return;
    size_t n = ar->alloc ? ar->alloc->n : 0;
    for (size_t i = 0; i < n; i++) {
        if (ar->orth_a) tk_free(ar->orth_a[i]);
        if (ar->orth_b) tk_free(ar->orth_b[i]);
        if (ar->snap) tk_free(ar->snap[i]);
    }
    free(ar->orth_a);
    free(ar->orth_b);
    free(ar->snap);
    tk_adalora_free(ar->alloc);
    free(ar);
}

int tk_adalora_run_open(tk_adalora_run **out, tk_llama *m, int steps, const char *dump_dir, tk_err *err) {
    *out = NULL;
    tk_peft_config *pc = &m->peft;
    if (pc->kind != TK_ADAPTER_ADALORA) return 0;
    if (pc->ada.total_step <= 0) pc->ada.total_step = steps;
    if (tk_adalora_check_schedule(&pc->ada, err)) return -1;
    size_t n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) n += m->layers[l].proj[p].kind == TK_ADAPTER_ADALORA;
    tk_adalora_run *ar = calloc(1, sizeof *ar);
    tk_adapted_linear **mods = calloc(n + 1, sizeof *mods);
    int *layer = calloc(n + 1, sizeof *layer), *proj = calloc(n + 1, sizeof *proj);
    int rc = -1;
    if (!ar || !mods || !layer || !proj) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t k = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (m->layers[l].proj[p].kind == TK_ADAPTER_ADALORA) {
                mods[k] = &m->layers[l].proj[p];
                layer[k] = l;
                proj[k++] = p;
            }
    if (!(ar->alloc = tk_adalora_new(&pc->ada, mods, layer, proj, n, err))) goto done;
    ar->w = pc->ada.orth_reg_weight;
    ar->dump_dir = dump_dir;
    ar->fixed = pc->ada.n_rank > 0;
    if (dump_dir) {
        ar->orth_a = calloc(n + 1, sizeof(float *));
        ar->orth_b = calloc(n + 1, sizeof(float *));
        ar->snap = calloc(n + 1, sizeof(float *));
        if (!ar->orth_a || !ar->orth_b || !ar->snap) {
            tk_fail(err, "out of memory");
            goto done;
        }
        for (size_t i = 0; i < n; i++) {
            const tk_adapted_linear *L = mods[i];
            ar->orth_a[i] = tk_calloc(L->r * L->in, sizeof(float));
            ar->orth_b[i] = tk_calloc(L->out * L->r, sizeof(float));
            ar->snap[i] = tk_calloc(L->r * L->in + L->out * L->r + L->r, sizeof(float));
            if (!ar->orth_a[i] || !ar->orth_b[i] || !ar->snap[i]) {
                tk_fail(err, "out of memory");
                goto done;
            }
        }
    }
    *out = ar;
    ar = NULL;
    rc = 0;
done:
    tk_adalora_run_free(ar);
    free(mods);
    free(layer);
    free(proj);
    return rc;
}

int tk_adalora_run_reg(tk_adalora_run *ar, int step, double *reg, tk_err *err) {
    (void)err;
    *reg = 0.0;
    if (!ar) return 0;
    tk_adalora *a = ar->alloc;
    size_t n = a->n;
    float **gA = calloc(n + 1, sizeof *gA), **gB = calloc(n + 1, sizeof *gB);
    if (!gA || !gB) {
        free(gA);
        free(gB);
        return tk_fail(err, "out of memory");
    }
    int d = dumping(ar, step);
    for (size_t i = 0; i < n; i++) {
        const tk_adapted_linear *L = a->mod[i].L;
        if (d) { /* the regulariser's gradient alone, kept for the dump, then added */
            memset(ar->orth_a[i], 0, L->r * L->in * sizeof(float));
            memset(ar->orth_b[i], 0, L->out * L->r * sizeof(float));
        }
        gA[i] = d ? ar->orth_a[i] : L->dA;
        gB[i] = d ? ar->orth_b[i] : L->dB;
    }
    ar->reg = tk_adalora_orth(a, ar->w, gA, gB);
    if (d)
        for (size_t i = 0; i < n; i++) {
            tk_adapted_linear *L = a->mod[i].L;
            for (size_t j = 0; j < L->r * L->in; j++) L->dA[j] += ar->orth_a[i][j];
            for (size_t j = 0; j < L->out * L->r; j++) L->dB[j] += ar->orth_b[i][j];
        }
    free(gA);
    free(gB);
    *reg = (double)ar->w * ar->reg;
    return 0;
}

/* ---- the dump --------------------------------------------------------------------------------- */

typedef struct {
    tk_st_entry *e;
    char (*names)[TK_NAME_MAX + 32];
    int64_t *ints;
    size_t n, cap;
} entries;

static void add(entries *d, const char *key, const char *suffix, tk_dtype dt, int ndim, int64_t d0, int64_t d1,
                const void *data) {
    TK_ASSERT(d->n < d->cap);
    snprintf(d->names[d->n], sizeof d->names[d->n], "%s%s", key, suffix);
    d->e[d->n] = (tk_st_entry){.name = d->names[d->n], .dtype = dt, .ndim = ndim, .shape = {d0, d1}, .data = data};
    d->n++;
}

static int write_dump(tk_adalora_run *ar, int step, tk_err *err) {
    const tk_adalora *a = ar->alloc;
    size_t n = a->n, cap = 3 + 20 * n;
    entries d = {calloc(cap, sizeof(tk_st_entry)), calloc(cap, sizeof *d.names), calloc(3 + 2 * n * TK_ADALORA_MAX_R, sizeof(int64_t)), 0, cap};
    int rc = -1;
    if (!d.e || !d.names || !d.ints) {
        tk_fail(err, "out of memory for the AdaLoRA dump");
        goto out;
    }
    float reg = (float)ar->reg;
    d.ints[0] = a->budget;
    d.ints[1] = a->masked;
    add(&d, "orth_reg", "", TK_DT_F32, 1, 1, 0, &reg);
    add(&d, "budget", "", TK_DT_I64, 1, 1, 0, &d.ints[0]);
    add(&d, "masked", "", TK_DT_I64, 1, 1, 0, &d.ints[1]);
    int64_t *keep = d.ints + 3;
    for (size_t i = 0; i < n; i++) {
        const tk_adalora_module *mo = &a->mod[i];
        const tk_adapted_linear *L = mo->L;
        int64_t R = (int64_t)L->r, I = (int64_t)L->in, O = (int64_t)L->out;
        char key[TK_NAME_MAX];
        tk_module_key(key, sizeof key, mo->layer, mo->proj);
        const float *s = ar->snap[i];
        add(&d, key, ".lora_A", TK_DT_F32, 2, R, I, s);
        add(&d, key, ".lora_B", TK_DT_F32, 2, O, R, s + R * I);
        add(&d, key, ".lora_E", TK_DT_F32, 2, R, 1, s + R * I + O * R);
        add(&d, key, ".lora_A.grad", TK_DT_F32, 2, R, I, L->dA);
        add(&d, key, ".lora_B.grad", TK_DT_F32, 2, O, R, L->dB);
        add(&d, key, ".lora_E.grad", TK_DT_F32, 2, R, 1, L->dE);
        add(&d, key, ".lora_A.orth_grad", TK_DT_F32, 2, R, I, ar->orth_a[i]);
        add(&d, key, ".lora_B.orth_grad", TK_DT_F32, 2, O, R, ar->orth_b[i]);
        add(&d, key, ".lora_A.ipt", TK_DT_F32, 2, R, I, mo->ipt_a);
        add(&d, key, ".lora_A.unc", TK_DT_F32, 2, R, I, mo->unc_a);
        add(&d, key, ".lora_B.ipt", TK_DT_F32, 2, O, R, mo->ipt_b);
        add(&d, key, ".lora_B.unc", TK_DT_F32, 2, O, R, mo->unc_b);
        add(&d, key, ".lora_E.ipt", TK_DT_F32, 2, R, 1, mo->ipt_e);
        add(&d, key, ".lora_E.unc", TK_DT_F32, 2, R, 1, mo->unc_e);
        if (a->masked) add(&d, key, ".score", TK_DT_F32, 1, R, 0, mo->score);
        for (int64_t j = 0; j < R; j++) keep[j] = mo->keep[j];
        add(&d, key, ".keep", TK_DT_I64, 1, R, 0, keep);
        keep += R;
        add(&d, key, ".lora_E.masked", TK_DT_F32, 2, R, 1, L->E);
    }
    char path[4200];
    const char *meta[] = {"format", "pt", NULL};
    if (tk_pathf(path, sizeof path, err, "%s/adalora-step%d.safetensors", ar->dump_dir, step)) goto out;
    rc = tk_st_write(path, d.e, d.n, meta, err);
out:
    free(d.e);
    free(d.names);
    free(d.ints);
    return rc;
}

int tk_adalora_run_step(tk_adalora_run *ar, tk_llama *m, int step, tk_err *err) {
    (void)m;
    if (!ar) return 0;
    tk_adalora *a = ar->alloc;
    int d = dumping(ar, step);
    if (d)
        for (size_t i = 0; i < a->n; i++) {
            const tk_adapted_linear *L = a->mod[i].L;
            float *s = ar->snap[i];
            memcpy(s, L->A, L->r * L->in * sizeof(float));
            memcpy(s + L->r * L->in, L->B, L->out * L->r * sizeof(float));
            memcpy(s + L->r * L->in + L->out * L->r, L->E, L->r * sizeof(float));
        }
    if (!ar->fixed && tk_adalora_update(a, step - 1, &m->peft, err)) return -1;
    return d ? write_dump(ar, step, err) : 0;
}
