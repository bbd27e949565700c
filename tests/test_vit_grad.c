/* test_vit_grad.c: vision/vit_train.c, the backward of the CLIP / SigLIP towers.
 *
 * Checks, each against central differences of L = sum(out * R) (error max|analytic - numeric| /
 * max(max|numeric|, 1e-3)):
 *   - the bidirectional attention kernel: dq, dk, dv;
 *   - im2col / col2im: col2im is im2col's adjoint (<im2col x, y> = <x, col2im y>);
 *   - whole tiny towers, every parameter tensor and the pixels: CLIP pooled (class token after
 *     post_layernorm), CLIP layer -2 patch features with post_norm, SigLIP with its attention-pooling
 *     head, SigLIP without a head (mean pooling), SigLIP cls_patch features of layer 1;
 *   - the same at another image size (interpolated position embeddings, pos_interp.h: d pos through
 *     the map's transpose), CLIP 8 -> 12 px and SigLIP 8 -> 4 px;
 *   - the training forward equals tk_vit_forward on the same selection (the same arithmetic);
 *   - LoRA and bottleneck adapters on every projection (vit_peft.h, ungated; DoRA detaches its norm,
 *     which central differences cannot): every adapter
 *     tensor and the pixels;
 *   - tk_vit_save round trip through tk_vit_open;
 *   - the backward adds (two backwards from one forward give twice the gradients);
 *   - k_proj.bias has a zero gradient (a shift shared by all scores of a softmax row), checked as such:
 *     central differences would only measure rounding there.
 * Exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "vision/vit.h"
#include "vision/pos_interp.h"
#include "vision/vit_peft.h"
#include "vision/vit_train.h"

#define TEST_NAME "test_vit_grad"
#define TEST_SEED 0x5be0cd19137e2179ull
#define TEST_COL 66
#include "test_util.h"

#define FD_EPS 4e-3f
#define FD_TOL 1e-2

/* ---- attention kernel ---------------------------------------------------------------------------- */

typedef struct {
    float *q, *k, *v, *att, *probs, *R;
    size_t T, H, D;
} att_ctx;

static double att_loss(att_ctx *c) {
    tk_vit_attention_forward(c->att, c->probs, c->q, c->k, c->v, c->T, c->H, c->D);
    double s = 0.0;
    for (size_t i = 0; i < c->T * c->H * c->D; i++) s += (double)c->att[i] * (double)c->R[i];
    return s;
}

static double att_loss_cb(void *c) { return att_loss(c); }

static void fd_att(const char *name, const float *analytic, float *param, att_ctx *c) {
    fd_central(name, analytic, param, c->T * c->H * c->D, FD_EPS, FD_TOL, att_loss_cb, c);
}

static void test_attention(void) {
    att_ctx c = {.T = 6, .H = 3, .D = 4};
    size_t n = c.T * c.H * c.D;
    c.q = falloc(n), c.k = falloc(n), c.v = falloc(n), c.att = falloc(n), c.R = falloc(n);
    c.probs = falloc(c.H * c.T * c.T);
    fill(c.q, n, -1.5f, 1.5f), fill(c.k, n, -1.5f, 1.5f), fill(c.v, n, -1, 1), fill(c.R, n, -1, 1);
    float *dq = falloc(n), *dk = falloc(n), *dv = falloc(n), *scr = falloc(c.T * c.T);
    att_loss(&c);
    tk_vit_attention_backward(dq, dk, dv, scr, c.R, c.probs, c.q, c.k, c.v, c.T, c.H, c.D);
    fd_att("attention (T 6, H 3, D 4): dq", dq, c.q, &c);
    fd_att("attention: dk", dk, c.k, &c);
    fd_att("attention: dv", dv, c.v, &c);
    tk_free(c.q), tk_free(c.k), tk_free(c.v), tk_free(c.att), tk_free(c.R), tk_free(c.probs);
    tk_free(dq), tk_free(dk), tk_free(dv), tk_free(scr);
}

static void test_col2im(void) {
    size_t B = 2, ch = 3, S = 12, P = 4, N = 9, K = ch * P * P;
    float *x = falloc(B * ch * S * S), *y = falloc(B * N * K), *px = falloc(B * N * K), *cy = falloc(B * ch * S * S);
    fill(x, B * ch * S * S, -1, 1), fill(y, B * N * K, -1, 1);
    tk_vit_im2col(px, x, B, ch, S, P);
    tk_vit_col2im_add(cy, y, B, ch, S, P);
    double a = 0.0, b = 0.0;
    for (size_t i = 0; i < B * N * K; i++) a += (double)px[i] * (double)y[i];
    for (size_t i = 0; i < B * ch * S * S; i++) b += (double)x[i] * (double)cy[i];
    report("col2im is the adjoint of im2col", fabs(a - b) / fabs(a), 1e-5);
    tk_free(x), tk_free(y), tk_free(px), tk_free(cy);
}

/* ---- whole towers -------------------------------------------------------------------------------- */

typedef struct {
    tk_vit *m;
    tk_vit_act *act;
    tk_vit_select sel;
    float *pix, *out, *R;
    size_t B, nout;
} vit_ctx;

static double vit_loss(vit_ctx *c) {
    tk_err err = {0};
    tk_vit_pos_refresh(c->m); /* an interpolated grid follows pos (a no-op without one) */
    if (tk_vit_train_forward(c->m, c->act, c->out, c->pix, c->B, &c->sel, &err)) {
        printf("forward: %s\n", err.msg);
        exit(1);
    }
    double s = 0.0;
    for (size_t i = 0; i < c->nout; i++) s += (double)c->out[i] * (double)c->R[i];
    return s;
}

static double vit_loss_cb(void *c) { return vit_loss(c); }

static void fd_vec(const char *name, const float *analytic, float *param, size_t n, vit_ctx *c) {
    fd_central(name, analytic, param, n, FD_EPS, FD_TOL, vit_loss_cb, c);
}

static size_t numel(const tk_vit_slot *s) {
    size_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= (size_t)s->shape[d];
    return n;
}

static void test_tower(const char *label, tk_vit_kind kind, int use_head, tk_vit_select sel, int run_size) {
    tk_err err = {0};
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, kind);
    cfg.hidden = 8, cfg.inter = 12, cfg.n_layers = 2, cfg.n_heads = 2, cfg.image_size = 8, cfg.patch_size = 4;
    cfg.use_head = use_head;
    tk_vit *m = tk_vit_random(&cfg, 3, &err), *g = tk_vit_zeros(&cfg, &err), *g2 = tk_vit_zeros(&cfg, &err);
    if (!m || !g || !g2) {
        printf("%s: %s\n", label, err.msg);
        g_failures++;
        return;
    }
    size_t cap = tk_vit_slot_capacity(&cfg);
    tk_vit_slot *sl = calloc(cap, sizeof *sl), *sg = calloc(cap, sizeof *sg), *sg2 = calloc(cap, sizeof *sg2);
    size_t ns = tk_vit_slots(m, sl);
    tk_vit_slots(g, sg);
    tk_vit_slots(g2, sg2);
    for (size_t i = 0; i < ns; i++) { /* every tensor non-trivial: norms near 1, the rest O(0.3) */
        size_t n = numel(&sl[i]);
        int norm_w = strstr(sl[i].name, "norm") && strstr(sl[i].name, "weight");
        if (norm_w) fill(*sl[i].data, n, 0.8f, 1.2f);
        else fill(*sl[i].data, n, -0.4f, 0.4f);
    }
    if (run_size && tk_vit_set_image_size(m, run_size, 1, &err)) {
        printf("%s: %s\n", label, err.msg);
        g_failures++;
        return;
    }
    vit_ctx c = {.m = m, .sel = sel, .B = 2};
    c.act = tk_vit_act_alloc(m, c.B, &err);
    size_t S = (size_t)m->image_size, C = (size_t)cfg.hidden;
    c.nout = c.B * tk_vit_train_out_tokens(m, &sel) * C;
    c.pix = falloc(c.B * 3 * S * S), c.out = falloc(c.nout), c.R = falloc(c.nout);
    fill(c.pix, c.B * 3 * S * S, -1, 1), fill(c.R, c.nout, -1, 1);
    float *dpix = falloc(c.B * 3 * S * S), *dpix2 = falloc(c.B * 3 * S * S);
    vit_loss(&c);
    char name[200];
    if (!sel.pooled) { /* the training forward is the inference forward */
        tk_vit_ws *ws = tk_vit_ws_alloc(m, c.B, &err);
        float *ref = falloc(c.nout);
        tk_vit_forward(m, ws, ref, c.pix, c.B, &sel, &err);
        snprintf(name, sizeof name, "%s: training forward == tk_vit_forward", label);
        report(name, rel_err_f(c.out, ref, c.nout), 0.0);
        tk_free(ref);
        tk_vit_ws_free(ws);
    }
    if (tk_vit_train_backward(m, c.act, g, dpix, c.R, &err) ||
        tk_vit_train_backward(m, c.act, g2, dpix2, c.R, &err) ||
        tk_vit_train_backward(m, c.act, g2, dpix2, c.R, &err)) {
        printf("%s: backward: %s\n", label, err.msg);
        g_failures++;
    }
    int adds = 1;
    for (size_t i = 0; i < ns; i++)
        for (size_t j = 0; j < numel(&sg[i]); j++)
            if (fabsf((*sg2[i].data)[j] - 2.0f * (*sg[i].data)[j]) > 1e-5f * (1.0f + fabsf((*sg[i].data)[j])))
                adds = 0;
    snprintf(name, sizeof name, "%s: the backward adds", label);
    report_bool(name, adds);
    snprintf(name, sizeof name, "%s: d pixels", label);
    fd_vec(name, dpix, c.pix, c.B * 3 * S * S, &c);
    for (size_t i = 0; i < ns; i++) {
        snprintf(name, sizeof name, "%s: %s", label, sl[i].name);
        if (strstr(sl[i].name, "k_proj.bias")) { /* softmax ignores a shift shared by a row's scores */
            float mx = 0.0f;
            for (size_t j = 0; j < numel(&sg[i]); j++) mx = fmaxf(mx, fabsf((*sg[i].data)[j]));
            strncat(name, " (exactly 0)", sizeof name - strlen(name) - 1);
            report(name, mx, 1e-5);
            continue;
        }
        fd_vec(name, *sg[i].data, *sl[i].data, numel(&sl[i]), &c);
    }
    free(sl), free(sg), free(sg2);
    tk_free(c.pix), tk_free(c.out), tk_free(c.R), tk_free(dpix), tk_free(dpix2);
    tk_vit_act_free(c.act);
    tk_vit_close(m), tk_vit_close(g), tk_vit_close(g2);
}

/* Adapters on every projection of a tiny tower (ungated, so the loss is smooth; B non-zero): the
 * adapters' gradients and the pixels' against central differences, through vit_peft's modules. */
static void test_tower_adapters(const char *label, tk_vit_kind kind, tk_adapter_kind ak) {
    tk_err err = {0};
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, kind);
    cfg.hidden = 8, cfg.inter = 12, cfg.n_layers = 2, cfg.n_heads = 2, cfg.image_size = 8, cfg.patch_size = 4;
    tk_vit *m = tk_vit_random(&cfg, 9, &err);
    size_t cap = tk_vit_slot_capacity(&cfg);
    tk_vit_slot *sl = calloc(cap, sizeof *sl);
    size_t ns = tk_vit_slots(m, sl);
    for (size_t i = 0; i < ns; i++) {
        int norm_w = strstr(sl[i].name, "norm") && strstr(sl[i].name, "weight");
        fill(*sl[i].data, numel(&sl[i]), norm_w ? 0.8f : -0.4f, norm_w ? 1.2f : 0.4f);
    }
    free(sl);
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = ak;
    pc.r = 3;
    pc.alpha = 6.0f;
    pc.gate.enabled = 0;
    tk_peft_add_target(&pc, "vision_model.all", &err);
    tk_params P = {0};
    tk_vit_peft *vp = tk_vit_peft_new(m, &pc, "base_model.model.vision_model.", &err);
    vit_ctx c = {.m = m, .sel = {.pooled = 1}, .B = 2};
    if (!vp || tk_vit_peft_register(vp, &P, &err) || tk_params_alloc(&P, &err) ||
        tk_vit_peft_alloc(vp, c.B * m->n_tokens, &err) || !(c.act = tk_vit_act_alloc(m, c.B, &err))) {
        printf("%s: %s\n", label, err.msg);
        g_failures++;
        return;
    }
    tk_vit_peft_init(vp, 4);
    fill(P.data, P.total, -0.5f, 0.5f); /* B non-zero too, so every path carries gradient */
    for (size_t i = 0; i < P.n; i++)
        if (strstr(P.items[i].name, "magnitude")) fill(P.data + P.items[i].offset, P.items[i].numel, 0.5f, 1.5f);
    tk_vit_act_set_adapters(c.act, tk_vit_peft_table(vp), tk_vit_peft_ws(vp), TK_FWD_EVAL, NULL);
    size_t S = (size_t)cfg.image_size, C = (size_t)cfg.hidden;
    c.nout = c.B * C;
    c.pix = falloc(c.B * 3 * S * S), c.out = falloc(c.nout), c.R = falloc(c.nout);
    fill(c.pix, c.B * 3 * S * S, -1, 1), fill(c.R, c.nout, -1, 1);
    float *dpix = falloc(c.B * 3 * S * S);
    vit_loss(&c);
    tk_params_zero_grad(&P);
    if (tk_vit_train_backward(m, c.act, NULL, dpix, c.R, &err)) {
        printf("%s: backward: %s\n", label, err.msg);
        g_failures++;
    }
    char name[200];
    snprintf(name, sizeof name, "%s: d pixels", label);
    fd_vec(name, dpix, c.pix, c.B * 3 * S * S, &c);
    float *ana = falloc(P.total);
    memcpy(ana, P.grad, P.total * sizeof(float));
    for (size_t i = 0; i < P.n; i++) {
        const tk_param *p = &P.items[i];
        snprintf(name, sizeof name, "%s: %s", label, p->name + strlen("base_model.model.vision_model.encoder."));
        fd_vec(name, ana + p->offset, P.data + p->offset, p->numel, &c);
    }
    tk_free(ana), tk_free(dpix), tk_free(c.pix), tk_free(c.out), tk_free(c.R);
    tk_vit_act_free(c.act);
    tk_vit_peft_free(vp);
    tk_params_free(&P);
    tk_peft_config_free(&pc);
    tk_vit_close(m);
}

/* tk_vit_save then tk_vit_open: the same tensors, bit for bit, the head included. */
static void test_save_roundtrip(void) {
    tk_err err = {0};
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, TK_VIT_SIGLIP);
    cfg.hidden = 8, cfg.inter = 12, cfg.n_layers = 1, cfg.n_heads = 2, cfg.image_size = 8, cfg.patch_size = 4;
    cfg.use_head = 1;
    char dir[] = "/tmp/test_vit_grad_XXXXXX";
    tk_vit *m = tk_vit_random(&cfg, 5, &err), *r = NULL;
    int ok = m && mkdtemp(dir) && tk_vit_save(m, dir, &err) == 0 && (r = tk_vit_open(dir, NULL, &err)) != NULL;
    if (ok) {
        size_t cap = tk_vit_slot_capacity(&cfg);
        tk_vit_slot *a = calloc(cap, sizeof *a), *b = calloc(cap, sizeof *b);
        size_t na = tk_vit_slots(m, a), nb = tk_vit_slots(r, b);
        ok = na == nb && r->cfg.use_head && r->cfg.act == cfg.act && r->cfg.eps == cfg.eps;
        for (size_t i = 0; ok && i < na; i++)
            ok = strcmp(a[i].name, b[i].name) == 0 && memcmp(*a[i].data, *b[i].data, numel(&a[i]) * 4) == 0;
        free(a), free(b);
    } else {
        printf("save/open: %s\n", err.msg);
    }
    report_bool("tk_vit_save -> tk_vit_open: same tensors (SigLIP with head)", ok);
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir), remove(path);
    snprintf(path, sizeof path, "%s/config.json", dir), remove(path);
    rmdir(dir);
    tk_vit_close(m), tk_vit_close(r);
}

int main(void) {
    tk_set_threads(2);
    test_attention();
    test_col2im();
    test_save_roundtrip();
    test_tower("clip pooled", TK_VIT_CLIP, 0, (tk_vit_select){.pooled = 1}, 0);
    test_tower("clip pooled at 12 px (interpolated)", TK_VIT_CLIP, 0, (tk_vit_select){.pooled = 1}, 12);
    test_tower("clip -2 patch post_norm", TK_VIT_CLIP, 0,
               (tk_vit_select){.layer = -2, .feature = TK_VIT_FEATURE_PATCH, .post_norm = 1}, 0);
    test_tower("siglip head", TK_VIT_SIGLIP, 1, (tk_vit_select){.pooled = 1}, 0);
    test_tower("siglip mean", TK_VIT_SIGLIP, 0, (tk_vit_select){.pooled = 1}, 0);
    test_tower("siglip head at 4 px (interpolated)", TK_VIT_SIGLIP, 1, (tk_vit_select){.pooled = 1}, 4);
    test_tower("siglip 1 cls_patch", TK_VIT_SIGLIP, 0,
               (tk_vit_select){.layer = 1, .feature = TK_VIT_FEATURE_CLS_PATCH}, 0);
    test_tower_adapters("clip + lora", TK_VIT_CLIP, TK_ADAPTER_LORA);
    test_tower_adapters("siglip + lora", TK_VIT_SIGLIP, TK_ADAPTER_LORA);
    test_tower_adapters("clip + bottleneck", TK_VIT_CLIP, TK_ADAPTER_BOTTLENECK);
    if (g_failures) printf("%s: %d FAILED\n", TEST_NAME, g_failures);
    else printf("%s: all passed\n", TEST_NAME);
    return g_failures ? 1 : 0;
}
