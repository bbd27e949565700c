/* test_vit.c: vision/vit.c (the CLIP / SigLIP encoders) against a plain double-precision reference.
 *
 * The reference below is written with loops only (direct conv indexing instead of im2col, attention
 * as explicit sums, no BLAS), from the architecture in vit.h. For tiny random towers of both kinds
 * (random norms and biases so every tensor matters) it checks: every hidden_states index (negative and
 * positive), both feature selections, post_layernorm; that running the images in chunks (workspace
 * Bmax 1 and 2) gives the same features as one pass; that a model large enough for the OpenMP paths
 * agrees too; tk_vit_run_images; and the documented errors (layer out of range, bad configs).
 * Tolerance: max abs error <= 1e-4 * max(1, max|ref|). Exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "vision/vit.h"

#define TOL 1e-4

static int g_failures;
static uint64_t g_rng = 0xa4093822299f31d0ull;

static float rnd(float lo, float hi) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return lo + (hi - lo) * (float)((double)(z >> 40) / (double)(1ull << 24));
}

static void *xalloc(size_t n) {
    void *p = tk_calloc(n ? n : 1, 1);
    if (!p) {
        fprintf(stderr, "test_vit: out of memory\n");
        exit(1);
    }
    return p;
}

static void report(const char *name, double err, double tol) {
    int ok = err <= tol;
    printf("%-66s max err %.3e (tol %.1e)  %s\n", name, err, tol, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

static void report_bool(const char *name, int ok) {
    printf("%-66s %s\n", name, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

/* ---- the reference (double, loops) ------------------------------------------------------------- */

static void ln_ref(double *y, const double *x, const float *w, const float *b, size_t C, double eps) {
    double mu = 0.0, var = 0.0;
    for (size_t c = 0; c < C; c++) mu += x[c];
    mu /= (double)C;
    for (size_t c = 0; c < C; c++) var += (x[c] - mu) * (x[c] - mu);
    var /= (double)C;
    for (size_t c = 0; c < C; c++) y[c] = (x[c] - mu) / sqrt(var + eps) * w[c] + b[c];
}

static double act_ref(double x, tk_gelu_kind k) {
    if (k == TK_GELU_QUICK) return x / (1.0 + exp(-1.702 * x));
    if (k == TK_GELU_ERF) return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

/* y [O] = W [O,I] x [I] + b */
static void lin_ref(double *y, const double *x, const float *W, const float *b, size_t I, size_t O) {
    for (size_t o = 0; o < O; o++) {
        double s = b[o];
        for (size_t i = 0; i < I; i++) s += (double)W[o * I + i] * x[i];
        y[o] = s;
    }
}

/* hs [(L+1), T, C]: every hidden state of one image pixels [ch,S,S]. */
static void vit_ref(double *hs, const tk_vit *m, const float *pixels) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, N = m->n_patches;
    size_t P = (size_t)c->patch_size, S = (size_t)c->image_size, side = S / P, ch = (size_t)c->channels;
    size_t H = (size_t)c->n_heads, D = C / H, off = T - N;
    double *x = hs, *tmp = xalloc(T * C * 8), *q = xalloc(T * C * 8), *k = xalloc(T * C * 8);
    double *v = xalloc(T * C * 8), *a = xalloc(T * C * 8), *h = xalloc(F * 8), *h2 = xalloc(C * 8);
    double *sc = xalloc(T * 8);
    for (size_t t = 0; t < T; t++)
        for (size_t o = 0; o < C; o++) {
            double s;
            if (t < off) {
                s = m->cls[o];
            } else {
                size_t p = t - off, py = p / side, px = p % side;
                s = m->patch_b ? m->patch_b[o] : 0.0;
                for (size_t cc = 0; cc < ch; cc++)
                    for (size_t ky = 0; ky < P; ky++)
                        for (size_t kx = 0; kx < P; kx++)
                            s += (double)m->patch_w[((o * ch + cc) * P + ky) * P + kx] *
                                 pixels[(cc * S + py * P + ky) * S + px * P + kx];
            }
            x[t * C + o] = s + m->pos[t * C + o];
        }
    if (m->pre_w)
        for (size_t t = 0; t < T; t++) {
            memcpy(tmp, &x[t * C], C * 8);
            ln_ref(&x[t * C], tmp, m->pre_w, m->pre_b, C, c->eps);
        }
    for (int l = 0; l < c->n_layers; l++) {
        const tk_vit_layer *L = &m->layers[l];
        double *y = x + T * C; /* hidden state l+1 */
        for (size_t t = 0; t < T; t++) {
            ln_ref(&tmp[t * C], &x[t * C], L->ln1_w, L->ln1_b, C, c->eps);
            lin_ref(&q[t * C], &tmp[t * C], L->q_w, L->q_b, C, C);
            lin_ref(&k[t * C], &tmp[t * C], L->k_w, L->k_b, C, C);
            lin_ref(&v[t * C], &tmp[t * C], L->v_w, L->v_b, C, C);
        }
        for (size_t hh = 0; hh < H; hh++)
            for (size_t i = 0; i < T; i++) {
                double mx = -INFINITY, sum = 0.0;
                for (size_t j = 0; j < T; j++) {
                    double s = 0.0;
                    for (size_t d = 0; d < D; d++) s += q[i * C + hh * D + d] * k[j * C + hh * D + d];
                    sc[j] = s / sqrt((double)D);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (size_t j = 0; j < T; j++) sum += (sc[j] = exp(sc[j] - mx));
                for (size_t d = 0; d < D; d++) {
                    double s = 0.0;
                    for (size_t j = 0; j < T; j++) s += sc[j] / sum * v[j * C + hh * D + d];
                    a[i * C + hh * D + d] = s;
                }
            }
        for (size_t t = 0; t < T; t++) {
            lin_ref(h2, &a[t * C], L->o_w, L->o_b, C, C);
            for (size_t o = 0; o < C; o++) y[t * C + o] = x[t * C + o] + h2[o];
            ln_ref(tmp, &y[t * C], L->ln2_w, L->ln2_b, C, c->eps);
            lin_ref(h, tmp, L->fc1_w, L->fc1_b, C, F);
            for (size_t f = 0; f < F; f++) h[f] = act_ref(h[f], c->act);
            lin_ref(h2, h, L->fc2_w, L->fc2_b, F, C);
            for (size_t o = 0; o < C; o++) y[t * C + o] += h2[o];
        }
        x = y;
    }
    tk_free(tmp), tk_free(q), tk_free(k), tk_free(v), tk_free(a), tk_free(h), tk_free(h2), tk_free(sc);
}

/* Random norms and biases (tk_vit_random leaves them 1 and 0) and larger weights. */
static void perturb(tk_vit *m) {
    size_t ns = tk_vit_slot_capacity(&m->cfg);
    tk_vit_slot *s = xalloc(ns * sizeof *s);
    ns = tk_vit_slots(m, s);
    for (size_t i = 0; i < ns; i++) {
        size_t n = 1;
        for (int d = 0; d < s[i].ndim; d++) n *= (size_t)s[i].shape[d];
        float *w = *s[i].data;
        int norm = strstr(s[i].name, "norm") && strstr(s[i].name, ".weight");
        for (size_t j = 0; j < n; j++) w[j] = norm ? 1.0f + rnd(-0.2f, 0.2f) : rnd(-0.25f, 0.25f);
    }
    tk_free(s);
}

static double max_err(const float *got, const double *ref, size_t n) {
    double e = 0.0, mr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        double d = fabs(got[i] - ref[i]);
        e = d > e ? d : e;
        mr = fabs(ref[i]) > mr ? fabs(ref[i]) : mr;
    }
    return e / (mr > 1.0 ? mr : 1.0);
}

static void test_model(tk_vit_kind kind, int hidden, int heads, int inter, int layers, int image,
                       int patch, tk_gelu_kind act, size_t B) {
    char name[200];
    tk_err err = {0};
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, kind);
    cfg.hidden = hidden, cfg.n_heads = heads, cfg.inter = inter, cfg.n_layers = layers;
    cfg.image_size = image, cfg.patch_size = patch, cfg.act = act;
    tk_vit *m = tk_vit_random(&cfg, 3, &err);
    if (!m) {
        printf("tk_vit_random: %s\n", err.msg);
        g_failures++;
        return;
    }
    perturb(m);
    const char *kn = kind == TK_VIT_CLIP ? "clip" : "siglip";
    size_t C = (size_t)hidden, T = m->n_tokens, N = m->n_patches, per = 3 * (size_t)image * image;
    size_t L1 = (size_t)layers + 1;
    float *pix = xalloc(B * per * 4), *out = xalloc(B * T * C * 4), *out2 = xalloc(B * T * C * 4);
    for (size_t i = 0; i < B * per; i++) pix[i] = rnd(-1.5f, 1.5f);
    double *hs = xalloc(B * L1 * T * C * 8), *ref = xalloc(B * T * C * 8), *row = xalloc(C * 8);
    for (size_t b = 0; b < B; b++) vit_ref(hs + b * L1 * T * C, m, pix + b * per);
    tk_vit_ws *ws = tk_vit_ws_alloc(m, B, &err), *ws1 = tk_vit_ws_alloc(m, 1, &err);
    tk_vit_ws *ws2 = tk_vit_ws_alloc(m, 2, &err);
    TK_ASSERT(ws && ws1 && ws2);
    for (int layer = -layers - 1; layer <= layers; layer++)
        for (int f = 0; f < 2; f++)
            for (int post = 0; post < 2; post++) {
                if (post && layer != -1 && layer != 0) continue;
                tk_vit_select sel = {.layer = layer, .feature = f ? TK_VIT_FEATURE_CLS_PATCH : TK_VIT_FEATURE_PATCH,
                                     .post_norm = post};
                size_t li = (size_t)(layer < 0 ? layers + 1 + layer : layer);
                size_t To = tk_vit_out_tokens(m, sel.feature), skip = T - To;
                for (size_t b = 0; b < B; b++)
                    for (size_t t = 0; t < To; t++) {
                        const double *src = hs + ((b * L1 + li) * T + skip + t) * C;
                        double *dst = ref + (b * To + t) * C;
                        if (post) ln_ref(dst, src, m->post_w, m->post_b, C, cfg.eps);
                        else memcpy(dst, src, C * 8);
                    }
                int rc = tk_vit_forward(m, ws, out, pix, B, &sel, &err);
                snprintf(name, sizeof name, "%s L=%d layer %d %s%s vs reference", kn, layers, layer,
                         f ? "cls_patch" : "patch", post ? " post_norm" : "");
                report(name, rc ? INFINITY : max_err(out, ref, B * To * C), TOL);
                if (layer == -2 && !post) { /* chunked passes give the same features */
                    tk_vit_forward(m, ws1, out2, pix, B, &sel, &err);
                    double e1 = max_err(out2, ref, B * To * C);
                    tk_vit_forward(m, ws2, out2, pix, B, &sel, &err);
                    double e2 = max_err(out2, ref, B * To * C);
                    snprintf(name, sizeof name, "%s layer -2 %s in chunks of 1 and 2 images", kn,
                             f ? "cls_patch" : "patch");
                    report(name, e1 > e2 ? e1 : e2, TOL);
                }
            }
    if (kind == TK_VIT_SIGLIP)
        report_bool("siglip: patch and cls_patch both give N tokens",
                    tk_vit_out_tokens(m, TK_VIT_FEATURE_PATCH) == N && tk_vit_out_tokens(m, TK_VIT_FEATURE_CLS_PATCH) == N);
    else
        report_bool("clip: patch gives N tokens, cls_patch N + 1",
                    tk_vit_out_tokens(m, TK_VIT_FEATURE_PATCH) == N && tk_vit_out_tokens(m, TK_VIT_FEATURE_CLS_PATCH) == N + 1);
    tk_vit_select bad = {.layer = layers + 1};
    err.msg[0] = 0;
    report_bool("layer L+1 is refused with a message",
                tk_vit_forward(m, ws, out, pix, B, &bad, &err) != 0 && strstr(err.msg, "out of range"));
    bad.layer = -layers - 2;
    report_bool("layer -(L+2) is refused", tk_vit_forward(m, ws, out, pix, B, &bad, &err) != 0);
    double sec = -1.0;
    tk_vit_select llava = {.layer = -2};
    report_bool("tk_vit_run_images runs and times 3 images",
                tk_vit_run_images(m, 3, 2, &llava, 1, &sec, &err) == 0 && sec >= 0.0);
    tk_vit_ws_free(ws), tk_vit_ws_free(ws1), tk_vit_ws_free(ws2);
    tk_free(pix), tk_free(out), tk_free(out2), tk_free(hs), tk_free(ref), tk_free(row);
    tk_vit_close(m);
}

static void test_config_errors(void) {
    tk_err err = {0};
    tk_vit_config c;
    tk_vit_config_default(&c, TK_VIT_CLIP);
    report_bool("default CLIP config is valid", tk_vit_config_check(&c, "x", &err) == 0);
    c.n_heads = 5;
    report_bool("heads not dividing hidden refused", tk_vit_config_check(&c, "x", &err) != 0 &&
                                                       strstr(err.msg, "num_attention_heads"));
    tk_vit_config_default(&c, TK_VIT_SIGLIP);
    c.image_size = 100; /* not a multiple of 16 */
    report_bool("image_size not a multiple of patch_size refused", tk_vit_random(&c, 1, &err) == NULL &&
                                                                     strstr(err.msg, "image_size"));
    tk_vit_feature f1, f2, f3, f4, f5;
    int ok = tk_vit_feature_parse("patch", &f1) == 0 && f1 == TK_VIT_FEATURE_PATCH &&
             tk_vit_feature_parse("default", &f2) == 0 && f2 == TK_VIT_FEATURE_PATCH &&
             tk_vit_feature_parse("cls_patch", &f3) == 0 && f3 == TK_VIT_FEATURE_CLS_PATCH &&
             tk_vit_feature_parse("full", &f4) == 0 && f4 == TK_VIT_FEATURE_CLS_PATCH &&
             tk_vit_feature_parse("cls", &f5) != 0;
    report_bool("feature names parse (patch, default, cls_patch, full; not cls)", ok);
}

int main(void) {
    tk_set_threads(2);
    test_config_errors();
    test_model(TK_VIT_CLIP, 16, 2, 24, 2, 8, 4, TK_GELU_QUICK, 3);
    test_model(TK_VIT_SIGLIP, 16, 4, 20, 2, 12, 4, TK_GELU_TANH, 3);
    /* wide enough that the layernorm/GELU/softmax loops take their OpenMP paths */
    test_model(TK_VIT_CLIP, 128, 4, 256, 1, 48, 4, TK_GELU_ERF, 2);
    if (g_failures) {
        printf("test_vit: %d FAILED\n", g_failures);
        return 1;
    }
    printf("test_vit: all passed\n");
    return 0;
}
