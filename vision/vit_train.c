/* vit_train.c: the CLIP / SigLIP towers' training forward (activations kept) and backward (see
 * vit_train.h).
 *
 * Shape legend (outermost first), as vit.c:
 *   B  images in the pass, S  image side, P  patch side, N  patches per image, K = ch*P*P
 *   T  tokens per image (N + 1 with CLIP's class token), R = B*T rows
 *   C  hidden width, F  MLP width, H  heads, D = C/H, L  layers run (upto)
 */
#include "vision/vit_train.h"

#include "ops/blas.h"
#include "ops/fastmath.h"
#include "peft/peft_config.h"
#include "vision/pos_interp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *tk_vit_proj_name(int j) { return j >= 0 && j < TK_VIT_N_PROJ ? tk_vit_proj_full[j] : "?"; }

/* Activations of one layer for Bmax images; hs[l] (its input) lives in the act. */
typedef struct {
    float *xn1, *mean1, *rstd1; /* layer_norm1: [R,C], [R], [R] */
    float *q, *k, *v, *att;     /* [R,C] */
    float *probs;               /* [B,H,T,T] */
    float *xm;                  /* [R,C] x after the attention residual */
    float *xn2, *mean2, *rstd2; /* layer_norm2 */
    float *hpre, *hact;         /* [R,F] fc1 output, after the activation */
} layer_act;

struct tk_vit_act {
    const tk_vit *m;
    size_t Bmax;
    float *buf;
    float **hs;             /* [L+1] x [R,C]: hidden_states */
    layer_act *la;          /* [L] */
    float *patches;         /* [Bmax*N, K] */
    float *pre_in, *pre_mean, *pre_rstd; /* CLIP: pre_layrnorm's input [R,C] and statistics [R] */
    float *post, *post_mean, *post_rstd; /* post_layernorm output [R,C] and statistics [R] */
    /* SigLIP head */
    float *hq;              /* [C] the probe's query */
    float *hk, *hv;         /* [R,C] */
    float *hprobs;          /* [B,H,T] */
    float *ho, *ha, *hln;   /* [B,C] attention output, after out_proj, after layernorm */
    float *hmean, *hrstd;   /* [B] */
    float *hfpre, *hfact;   /* [B,F] */
    /* backward scratch */
    float *dx, *dxn, *dq, *dk, *dv, *datt; /* [R,C] */
    float *dh, *dhp;        /* [R,max(C,F)] (dh is also the forward's adapter output scratch) */
    float *dsc;             /* [T*max(T,H)] */
    float *dpatch;          /* [Bmax*N, C] (also the forward's conv output) */
    float *dpatches;        /* [Bmax*N, K] */
    float *hd1, *hd2, *hd3; /* [B,C] head: d(a), d(o), d(layernorm out) */
    float *hdf1, *hdf2;     /* [B,F] */
    float *hdq;             /* [C] */
    float *ones;            /* [R] for bias gradients (sgemv) */
    /* state of the last forward */
    size_t B;
    tk_vit_select sel;
    int upto;
    /* adapters */
    tk_adapted_linear **mods;
    tk_adapter_ws *aws;
    int train;
    tk_rng *rng;
};

void tk_vit_act_free(tk_vit_act *a) {
    if (!a) return;
    tk_free(a->buf);
    free(a->hs);
    free(a->la);
    free(a);
}

tk_vit_act *tk_vit_act_alloc(const tk_vit *m, size_t Bmax, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, H = (size_t)c->n_heads;
    size_t N = m->n_patches, K = (size_t)c->channels * (size_t)c->patch_size * (size_t)c->patch_size;
    size_t L = (size_t)c->n_layers, CF = C > F ? C : F;
    if (Bmax < 1 || Bmax > 65536) {
        tk_fail(err, "vision training activations: batch %zu out of range [1, 65536]", Bmax);
        return NULL;
    }
    size_t R = Bmax * T;
    tk_vit_act *a = calloc(1, sizeof *a);
    if (!a || !(a->hs = calloc(L + 1, sizeof *a->hs)) || !(a->la = calloc(L, sizeof *a->la))) {
        tk_vit_act_free(a);
        tk_fail(err, "vision training activations: out of memory");
        return NULL;
    }
    a->m = m;
    a->Bmax = Bmax;
    /* two passes over the same list: sizes, then pointers */
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
#define TAKE(ptr, n)                                                                   \
    do {                                                                               \
        if (pass) (ptr) = a->buf + off;                                                \
        off += ((n) + 15) & ~(size_t)15;                                               \
    } while (0)
        for (size_t l = 0; l <= L; l++) TAKE(a->hs[l], R * C);
        for (size_t l = 0; l < L; l++) {
            layer_act *x = &a->la[l];
            TAKE(x->xn1, R * C); TAKE(x->mean1, R); TAKE(x->rstd1, R);
            TAKE(x->q, R * C); TAKE(x->k, R * C); TAKE(x->v, R * C); TAKE(x->att, R * C);
            TAKE(x->probs, Bmax * H * T * T);
            TAKE(x->xm, R * C); TAKE(x->xn2, R * C); TAKE(x->mean2, R); TAKE(x->rstd2, R);
            TAKE(x->hpre, R * F); TAKE(x->hact, R * F);
        }
        TAKE(a->patches, Bmax * N * K);
        if (m->pre_w) {
            TAKE(a->pre_in, R * C); TAKE(a->pre_mean, R); TAKE(a->pre_rstd, R);
        }
        TAKE(a->post, R * C); TAKE(a->post_mean, R); TAKE(a->post_rstd, R);
        if (m->head_probe) {
            TAKE(a->hq, C); TAKE(a->hk, R * C); TAKE(a->hv, R * C); TAKE(a->hprobs, Bmax * H * T);
            TAKE(a->ho, Bmax * C); TAKE(a->ha, Bmax * C); TAKE(a->hln, Bmax * C);
            TAKE(a->hmean, Bmax); TAKE(a->hrstd, Bmax); TAKE(a->hfpre, Bmax * F); TAKE(a->hfact, Bmax * F);
            TAKE(a->hd1, Bmax * C); TAKE(a->hd2, Bmax * C); TAKE(a->hd3, Bmax * C);
            TAKE(a->hdf1, Bmax * F); TAKE(a->hdf2, Bmax * F); TAKE(a->hdq, C);
        }
        TAKE(a->dx, R * C); TAKE(a->dxn, R * C); TAKE(a->dq, R * C); TAKE(a->dk, R * C);
        TAKE(a->dv, R * C); TAKE(a->datt, R * C); TAKE(a->dh, R * CF); TAKE(a->dhp, R * CF);
        TAKE(a->dsc, T * (T > H ? T : H)); TAKE(a->dpatch, Bmax * N * C); TAKE(a->dpatches, Bmax * N * K);
        TAKE(a->ones, R);
#undef TAKE
        if (!pass && !(a->buf = tk_calloc(off, sizeof(float)))) {
            tk_fail(err, "vision training activations: out of memory (%.1f MiB for %zu images)",
                    off * 4.0 / (1 << 20), Bmax);
            tk_vit_act_free(a);
            return NULL;
        }
    }
    for (size_t r = 0; r < R; r++) a->ones[r] = 1.0f;
    return a;
}

void tk_vit_act_set_adapters(tk_vit_act *a, tk_adapted_linear **mods, tk_adapter_ws *ws, int train,
                             tk_rng *rng) {
    a->mods = mods;
    a->aws = ws;
    a->train = train;
    a->rng = rng;
}

size_t tk_vit_train_out_tokens(const tk_vit *m, const tk_vit_select *sel) {
    return sel->pooled ? 1 : tk_vit_out_tokens(m, sel->feature);
}

/* ---- kernels --------------------------------------------------------------------------------- */

void tk_vit_col2im_add(float *dpixels, const float *dpatches, size_t B, size_t ch, size_t S, size_t P) {
    size_t side = S / P, N = side * side, K = ch * P * P;
#pragma omp parallel for if (B * N * K >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < B * N; r++) { /* patches do not overlap: each pixel has one writer */
        size_t b = r / N, p = r % N, py = p / side, px = p % side;
        const float *src = &dpatches[r * K];
        for (size_t c = 0; c < ch; c++)
            for (size_t ky = 0; ky < P; ky++) {
                float *d = &dpixels[((b * ch + c) * S + py * P + ky) * S + px * P];
                const float *s = &src[(c * P + ky) * P];
                for (size_t kx = 0; kx < P; kx++) d[kx] += s[kx];
            }
    }
}

/* Per head: dP = datt v^T; dv += P^T datt; dS = P (dP - rowsum(P dP)); dq += s dS k; dk += s dS^T q. */
void tk_vit_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *datt,
                               const float *probs, const float *q, const float *k, const float *v,
                               size_t T, size_t H, size_t D) {
    size_t C = H * D;
    float scale = 1.0f / sqrtf((float)D);
    int t = tk_blas_dim(T), d = tk_blas_dim(D), c = tk_blas_dim(C);
    for (size_t h = 0; h < H; h++) {
        const float *P = probs + h * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, d, 1.0f, datt + h * D, c, v + h * D, c,
                    0.0f, scratch, t);
        if (dv)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, 1.0f, P, t, datt + h * D, c, 1.0f,
                        dv + h * D, c);
#pragma omp parallel for if (T * T >= TK_OMP_MIN_WORK)
        for (size_t i = 0; i < T; i++) {
            const float *p = &P[i * T];
            float *s = &scratch[i * T];
            double dot = 0.0;
            for (size_t j = 0; j < T; j++) dot += (double)p[j] * (double)s[j];
            float fd = (float)dot;
            for (size_t j = 0; j < T; j++) s[j] = p[j] * (s[j] - fd);
        }
        if (dq)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, d, t, scale, scratch, t, k + h * D, c,
                        1.0f, dq + h * D, c);
        if (dk)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, scale, scratch, t, q + h * D, c,
                        1.0f, dk + h * D, c);
    }
}

/* db [O] += column sums of dy [R,O]. */
static void bias_grad(float *db, const float *dy, const float *ones, size_t R, size_t O) {
    if (!db) return;
    cblas_sgemv(CblasRowMajor, CblasTrans, tk_blas_dim(R), tk_blas_dim(O), 1.0f, dy, tk_blas_dim(O), ones, 1,
                1.0f, db, 1);
}

static tk_adapted_linear *mod_of(const tk_vit_act *a, int l, int j) {
    return a->mods ? a->mods[(size_t)l * TK_VIT_N_PROJ + (size_t)j] : NULL;
}

/* Projection j of layer l: y = x w^T + b (acc: y +=), through its adapter where it has one. */
static int proj_forward(tk_vit_act *a, int l, int j, float *y, const float *x, const float *w,
                        const float *b, size_t R, size_t I, size_t O, int acc, tk_err *err) {
    tk_adapted_linear *mod = mod_of(a, l, j);
    if (!mod) {
        tk_vit_linear_bias(y, x, w, b, R, I, O, acc);
        return 0;
    }
    float *t = acc ? a->dh : y;
    if (tk_adapted_forward(mod, a->aws, t, x, NULL, R, a->train, a->rng, err)) return -1;
#pragma omp parallel for if (R * O >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < R; r++) {
        float *yr = &y[r * O];
        const float *tr = &t[r * O];
        if (acc) {
            for (size_t o = 0; o < O; o++) yr[o] += tr[o] + b[o];
        } else {
            for (size_t o = 0; o < O; o++) yr[o] += b[o];
        }
    }
    return 0;
}

/* forward: y = x w^T + b.  dx [R,I] +=, dw, db += (NULL: not wanted). */
static int proj_backward(tk_vit_act *a, int l, int j, float *dx, float *dw, float *db, const float *dy,
                         const float *x, const float *w, size_t R, size_t I, size_t O, tk_err *err) {
    tk_adapted_linear *mod = mod_of(a, l, j);
    if (!mod) {
        tk_linear_backward(dx, dw, dy, x, w, R, I, O);
    } else {
        if (tk_adapted_backward(mod, a->aws, dx, dy, x, NULL, R, err)) return -1;
        if (dw && !mod->dw0) tk_linear_backward(NULL, dw, dy, x, w, R, I, O);
    }
    bias_grad(db, dy, a->ones, R, O);
    return 0;
}

/* ---- forward --------------------------------------------------------------------------------- */

static void embed(const tk_vit *m, tk_vit_act *a, const float *pixels, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches, P = (size_t)c->patch_size;
    size_t K = (size_t)c->channels * P * P, off = T - N;
    tk_vit_im2col(a->patches, pixels, B, (size_t)c->channels, (size_t)m->image_size, P);
    tk_linear_forward(a->dpatch, a->patches, m->patch_w, B * N, K, C, 0.0f);
    float *e = m->pre_w ? a->pre_in : a->hs[0];
    const float *pos = m->pos_run ? m->pos_run : m->pos; /* interpolated: pos_interp.h */
#pragma omp parallel for if (B * T * C >= TK_OMP_MIN_WORK)
    for (size_t r = 0; r < B * T; r++) {
        size_t b = r / T, t = r % T;
        float *xr = &e[r * C];
        const float *pr = &pos[t * C];
        if (t < off) {
            for (size_t j = 0; j < C; j++) xr[j] = m->cls[j] + pr[j];
        } else {
            const float *er = &a->dpatch[(b * N + t - off) * C];
            if (m->patch_b) {
                for (size_t j = 0; j < C; j++) xr[j] = (er[j] + m->patch_b[j]) + pr[j];
            } else {
                for (size_t j = 0; j < C; j++) xr[j] = er[j] + pr[j];
            }
        }
    }
    if (m->pre_w)
        tk_layernorm_forward(a->hs[0], a->pre_mean, a->pre_rstd, a->pre_in, m->pre_w, m->pre_b, B * T, C,
                             c->eps);
}

static int layer_forward(const tk_vit *m, tk_vit_act *a, int l, size_t B, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    const tk_vit_layer *W = &m->layers[l];
    layer_act *x = &a->la[l];
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, R = B * T;
    size_t H = (size_t)c->n_heads, D = C / H;
    const float *in = a->hs[l];
    float *out = a->hs[l + 1];
    tk_layernorm_forward(x->xn1, x->mean1, x->rstd1, in, W->ln1_w, W->ln1_b, R, C, c->eps);
    if (proj_forward(a, l, TK_VIT_Q, x->q, x->xn1, W->q_w, W->q_b, R, C, C, 0, err) ||
        proj_forward(a, l, TK_VIT_K, x->k, x->xn1, W->k_w, W->k_b, R, C, C, 0, err) ||
        proj_forward(a, l, TK_VIT_V, x->v, x->xn1, W->v_w, W->v_b, R, C, C, 0, err))
        return -1;
    for (size_t b = 0; b < B; b++)
        tk_vit_attention_forward(x->att + b * T * C, x->probs + b * H * T * T, x->q + b * T * C,
                                 x->k + b * T * C, x->v + b * T * C, T, H, D);
    memcpy(x->xm, in, R * C * sizeof(float));
    if (proj_forward(a, l, TK_VIT_O, x->xm, x->att, W->o_w, W->o_b, R, C, C, 1, err)) return -1;
    tk_layernorm_forward(x->xn2, x->mean2, x->rstd2, x->xm, W->ln2_w, W->ln2_b, R, C, c->eps);
    if (proj_forward(a, l, TK_VIT_FC1, x->hpre, x->xn2, W->fc1_w, W->fc1_b, R, C, F, 0, err)) return -1;
    tk_gelu_forward(x->hact, x->hpre, R * F, c->act);
    memcpy(out, x->xm, R * C * sizeof(float));
    return proj_forward(a, l, TK_VIT_FC2, out, x->hact, W->fc2_w, W->fc2_b, R, F, C, 1, err);
}

/* SigLIP's head on a->post [R,C] -> out [B,C]. */
static void head_forward(const tk_vit *m, tk_vit_act *a, float *out, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, R = B * T;
    size_t H = (size_t)c->n_heads, D = C / H;
    float scale = 1.0f / sqrtf((float)D);
    tk_vit_linear_bias(a->hq, m->head_probe, m->head_in_w, m->head_in_b, 1, C, C, 0);
    tk_vit_linear_bias(a->hk, a->post, m->head_in_w + C * C, m->head_in_b + C, R, C, C, 0);
    tk_vit_linear_bias(a->hv, a->post, m->head_in_w + 2 * C * C, m->head_in_b + 2 * C, R, C, C, 0);
#pragma omp parallel for if (B * H * T * D >= TK_OMP_MIN_WORK)
    for (size_t bh = 0; bh < B * H; bh++) {
        size_t b = bh / H, h = bh % H;
        float *p = &a->hprobs[bh * T];
        const float *qh = &a->hq[h * D];
        float mx = -INFINITY;
        for (size_t t = 0; t < T; t++) {
            const float *kr = &a->hk[(b * T + t) * C + h * D];
            float s = 0.0f;
            for (size_t d = 0; d < D; d++) s += qh[d] * kr[d];
            p[t] = s * scale;
            mx = p[t] > mx ? p[t] : mx;
        }
        double sum = 0.0;
        for (size_t t = 0; t < T; t++) sum += (double)(p[t] = tk_expf(p[t] - mx));
        float inv = (float)(1.0 / sum);
        float *o = &a->ho[b * C + h * D];
        for (size_t d = 0; d < D; d++) o[d] = 0.0f;
        for (size_t t = 0; t < T; t++) {
            p[t] *= inv;
            const float *vr = &a->hv[(b * T + t) * C + h * D];
            for (size_t d = 0; d < D; d++) o[d] += p[t] * vr[d];
        }
    }
    tk_vit_linear_bias(a->ha, a->ho, m->head_out_w, m->head_out_b, B, C, C, 0);
    tk_layernorm_forward(a->hln, a->hmean, a->hrstd, a->ha, m->head_ln_w, m->head_ln_b, B, C, c->eps);
    tk_vit_linear_bias(a->hfpre, a->hln, m->head_fc1_w, m->head_fc1_b, B, C, F, 0);
    tk_gelu_forward(a->hfact, a->hfpre, B * F, c->act);
    memcpy(out, a->ha, B * C * sizeof(float));
    tk_vit_linear_bias(out, a->hfact, m->head_fc2_w, m->head_fc2_b, B, F, C, 1);
}

int tk_vit_train_forward(const tk_vit *m, tk_vit_act *a, float *out, const float *pixels, size_t B,
                         const tk_vit_select *sel, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    TK_ASSERT(a->m == m);
    int L = c->n_layers;
    if (B < 1 || B > a->Bmax)
        return tk_fail(err, "vision training forward: %zu images, the activations hold 1 to %zu", B, a->Bmax);
    int upto = L;
    if (!sel->pooled) {
        if (sel->layer < -(L + 1) || sel->layer > L)
            return tk_fail(err, "vision feature layer %d out of range [%d, %d] (%d layers)", sel->layer,
                           -(L + 1), L, L);
        upto = sel->layer < 0 ? L + 1 + sel->layer : sel->layer;
    }
    size_t C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches, R = B * T;
    a->B = B;
    a->sel = *sel;
    a->upto = upto;
    embed(m, a, pixels, B);
    for (int l = 0; l < upto; l++)
        if (layer_forward(m, a, l, B, err)) return -1;
    const float *last = a->hs[upto];
    if (!sel->pooled) {
        size_t skip = sel->feature == TK_VIT_FEATURE_PATCH ? T - N : 0, To = T - skip;
        for (size_t b = 0; b < B; b++) {
            const float *src = last + (b * T + skip) * C;
            float *dst = out + b * To * C;
            if (sel->post_norm)
                tk_layernorm_forward(dst, a->post_mean + b * To, a->post_rstd + b * To, src, m->post_w,
                                     m->post_b, To, C, c->eps);
            else
                memcpy(dst, src, To * C * sizeof(float));
        }
    } else if (c->kind == TK_VIT_CLIP) { /* the class token after post_layernorm */
        for (size_t b = 0; b < B; b++)
            tk_layernorm_forward(out + b * C, a->post_mean + b, a->post_rstd + b, last + b * T * C, m->post_w,
                                 m->post_b, 1, C, c->eps);
    } else {
        tk_layernorm_forward(a->post, a->post_mean, a->post_rstd, last, m->post_w, m->post_b, R, C, c->eps);
        if (m->head_probe) {
            head_forward(m, a, out, B);
        } else { /* mean over the patches */
            for (size_t b = 0; b < B; b++) {
                float *o = out + b * C;
                for (size_t j = 0; j < C; j++) {
                    double s = 0.0;
                    for (size_t t = 0; t < T; t++) s += (double)a->post[(b * T + t) * C + j];
                    o[j] = (float)(s / (double)T);
                }
            }
        }
    }
    return 0;
}

/* ---- backward -------------------------------------------------------------------------------- */

#define G(field) (g ? g->field : NULL)

/* dout [B,C] -> a->dxn [R,C] = d(post_layernorm output), through the head. */
static void head_backward(const tk_vit *m, tk_vit_act *a, tk_vit *g, const float *dout, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, R = B * T;
    size_t H = (size_t)c->n_heads, D = C / H;
    float scale = 1.0f / sqrtf((float)D);
    float *dha = a->hd1, *dho = a->hd2, *dhln = a->hd3;
    memcpy(dha, dout, B * C * sizeof(float));
    memset(a->hdf1, 0, B * F * sizeof(float));
    tk_linear_backward(a->hdf1, G(head_fc2_w), dout, a->hfact, m->head_fc2_w, B, F, C);
    bias_grad(G(head_fc2_b), dout, a->ones, B, C);
    memset(a->hdf2, 0, B * F * sizeof(float));
    tk_gelu_backward(a->hdf2, a->hdf1, a->hfpre, B * F, c->act);
    memset(dhln, 0, B * C * sizeof(float));
    tk_linear_backward(dhln, G(head_fc1_w), a->hdf2, a->hln, m->head_fc1_w, B, C, F);
    bias_grad(G(head_fc1_b), a->hdf2, a->ones, B, F);
    tk_layernorm_backward(dha, G(head_ln_w), G(head_ln_b), dhln, a->ha, m->head_ln_w, a->hmean, a->hrstd, B, C);
    memset(dho, 0, B * C * sizeof(float));
    tk_linear_backward(dho, G(head_out_w), dha, a->ho, m->head_out_w, B, C, C);
    bias_grad(G(head_out_b), dha, a->ones, B, C);
    /* attention of the one query: dk, dv [R,C] rows, dq [C] summed over images */
    float *dk = a->dk, *dv = a->dv, *dq = a->hdq;
    memset(dk, 0, R * C * sizeof(float));
    memset(dv, 0, R * C * sizeof(float));
    memset(dq, 0, C * sizeof(float));
    for (size_t b = 0; b < B; b++) {
#pragma omp parallel for if (H * T * D >= TK_OMP_MIN_WORK)
        for (size_t h = 0; h < H; h++) {
            const float *p = &a->hprobs[(b * H + h) * T];
            const float *go = &dho[b * C + h * D], *qh = &a->hq[h * D];
            float *ds = &a->dsc[h * T];
            double dot = 0.0;
            for (size_t t = 0; t < T; t++) {
                const float *vr = &a->hv[(b * T + t) * C + h * D];
                float *dvr = &dv[(b * T + t) * C + h * D];
                float s = 0.0f;
                for (size_t d = 0; d < D; d++) {
                    s += go[d] * vr[d];
                    dvr[d] += p[t] * go[d];
                }
                ds[t] = s;
                dot += (double)p[t] * (double)s;
            }
            for (size_t t = 0; t < T; t++) {
                float st = p[t] * (ds[t] - (float)dot) * scale;
                const float *kr = &a->hk[(b * T + t) * C + h * D];
                float *dkr = &dk[(b * T + t) * C + h * D];
                for (size_t d = 0; d < D; d++) {
                    dkr[d] += st * qh[d];
                    dq[h * D + d] += st * kr[d];
                }
            }
        }
    }
    memset(a->dxn, 0, R * C * sizeof(float));
    tk_linear_backward(a->dxn, G(head_in_w) ? g->head_in_w + C * C : NULL, dk, a->post, m->head_in_w + C * C,
                       R, C, C);
    tk_linear_backward(a->dxn, G(head_in_w) ? g->head_in_w + 2 * C * C : NULL, dv, a->post,
                       m->head_in_w + 2 * C * C, R, C, C);
    if (g) {
        bias_grad(g->head_in_b + C, dk, a->ones, R, C);
        bias_grad(g->head_in_b + 2 * C, dv, a->ones, R, C);
        tk_linear_backward(g->head_probe, g->head_in_w, dq, m->head_probe, m->head_in_w, 1, C, C);
        for (size_t j = 0; j < C; j++) g->head_in_b[j] += dq[j];
    }
}

/* a->dx = d hs[l+1] on entry, d hs[l] on return. */
static int layer_backward(const tk_vit *m, tk_vit_act *a, tk_vit *g, int l, size_t B, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    const tk_vit_layer *W = &m->layers[l];
    tk_vit_layer *GL = g ? &g->layers[l] : NULL;
    layer_act *x = &a->la[l];
    size_t C = (size_t)c->hidden, F = (size_t)c->inter, T = m->n_tokens, R = B * T;
    size_t H = (size_t)c->n_heads, D = C / H;
#define GW(field) (GL ? GL->field : NULL)
    memset(a->dh, 0, R * F * sizeof(float));
    if (proj_backward(a, l, TK_VIT_FC2, a->dh, GW(fc2_w), GW(fc2_b), a->dx, x->hact, W->fc2_w, R, F, C, err))
        return -1;
    memset(a->dhp, 0, R * F * sizeof(float));
    tk_gelu_backward(a->dhp, a->dh, x->hpre, R * F, c->act);
    memset(a->dxn, 0, R * C * sizeof(float));
    if (proj_backward(a, l, TK_VIT_FC1, a->dxn, GW(fc1_w), GW(fc1_b), a->dhp, x->xn2, W->fc1_w, R, C, F, err))
        return -1;
    tk_layernorm_backward(a->dx, GW(ln2_w), GW(ln2_b), a->dxn, x->xm, W->ln2_w, x->mean2, x->rstd2, R, C);
    memset(a->datt, 0, R * C * sizeof(float));
    if (proj_backward(a, l, TK_VIT_O, a->datt, GW(o_w), GW(o_b), a->dx, x->att, W->o_w, R, C, C, err))
        return -1;
    memset(a->dq, 0, R * C * sizeof(float));
    memset(a->dk, 0, R * C * sizeof(float));
    memset(a->dv, 0, R * C * sizeof(float));
    for (size_t b = 0; b < B; b++)
        tk_vit_attention_backward(a->dq + b * T * C, a->dk + b * T * C, a->dv + b * T * C, a->dsc,
                                  a->datt + b * T * C, x->probs + b * H * T * T, x->q + b * T * C,
                                  x->k + b * T * C, x->v + b * T * C, T, H, D);
    memset(a->dxn, 0, R * C * sizeof(float));
    if (proj_backward(a, l, TK_VIT_Q, a->dxn, GW(q_w), GW(q_b), a->dq, x->xn1, W->q_w, R, C, C, err) ||
        proj_backward(a, l, TK_VIT_K, a->dxn, GW(k_w), GW(k_b), a->dk, x->xn1, W->k_w, R, C, C, err) ||
        proj_backward(a, l, TK_VIT_V, a->dxn, GW(v_w), GW(v_b), a->dv, x->xn1, W->v_w, R, C, C, err))
        return -1;
    tk_layernorm_backward(a->dx, GW(ln1_w), GW(ln1_b), a->dxn, a->hs[l], W->ln1_w, x->mean1, x->rstd1, R, C);
#undef GW
    return 0;
}

/* a->dx = d hs[0] -> embeddings, patch conv and pixels. */
static void embed_backward(const tk_vit *m, tk_vit_act *a, tk_vit *g, float *dpixels, size_t B) {
    const tk_vit_config *c = &m->cfg;
    size_t C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches, P = (size_t)c->patch_size;
    size_t K = (size_t)c->channels * P * P, off = T - N, R = B * T;
    const float *de = a->dx;
    if (m->pre_w) {
        memset(a->dxn, 0, R * C * sizeof(float));
        tk_layernorm_backward(a->dxn, G(pre_w), G(pre_b), a->dx, a->pre_in, m->pre_w, a->pre_mean, a->pre_rstd,
                              R, C);
        de = a->dxn;
    }
    if (g) { /* with an interpolated grid, d(pos_run) first (a->dq is free here), then M^T into g->pos */
        float *dpos = m->pos_map ? a->dq : g->pos;
        if (m->pos_map) memset(dpos, 0, T * C * sizeof(float));
        for (size_t b = 0; b < B; b++)
            for (size_t t = 0; t < T; t++) {
                const float *dr = &de[(b * T + t) * C];
                float *gp = &dpos[t * C];
                for (size_t j = 0; j < C; j++) gp[j] += dr[j];
                if (t < off)
                    for (size_t j = 0; j < C; j++) g->cls[j] += dr[j];
            }
        if (m->pos_map) tk_pos_interp_backward(m->pos_map, g->pos, dpos, C);
    }
    for (size_t b = 0; b < B; b++)
        memcpy(a->dpatch + b * N * C, de + (b * T + off) * C, N * C * sizeof(float));
    if (g && g->patch_b) bias_grad(g->patch_b, a->dpatch, a->ones, B * N, C);
    if (dpixels) memset(a->dpatches, 0, B * N * K * sizeof(float));
    tk_linear_backward(dpixels ? a->dpatches : NULL, G(patch_w), a->dpatch, a->patches, m->patch_w, B * N, K, C);
    if (dpixels) tk_vit_col2im_add(dpixels, a->dpatches, B, (size_t)c->channels, (size_t)m->image_size, P);
}

int tk_vit_train_backward(const tk_vit *m, tk_vit_act *a, tk_vit *g, float *dpixels, const float *dout,
                          tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    TK_ASSERT(a->m == m && a->B > 0);
    size_t B = a->B, C = (size_t)c->hidden, T = m->n_tokens, N = m->n_patches, R = B * T;
    const tk_vit_select *sel = &a->sel;
    const float *last = a->hs[a->upto];
    memset(a->dx, 0, R * C * sizeof(float));
    if (!sel->pooled) {
        size_t skip = sel->feature == TK_VIT_FEATURE_PATCH ? T - N : 0, To = T - skip;
        for (size_t b = 0; b < B; b++) {
            float *dst = a->dx + (b * T + skip) * C;
            const float *src = dout + b * To * C;
            if (sel->post_norm)
                tk_layernorm_backward(dst, G(post_w), G(post_b), src, last + (b * T + skip) * C, m->post_w,
                                      a->post_mean + b * To, a->post_rstd + b * To, To, C);
            else
                for (size_t i = 0; i < To * C; i++) dst[i] += src[i];
        }
    } else if (c->kind == TK_VIT_CLIP) {
        for (size_t b = 0; b < B; b++)
            tk_layernorm_backward(a->dx + b * T * C, G(post_w), G(post_b), dout + b * C, last + b * T * C,
                                  m->post_w, a->post_mean + b, a->post_rstd + b, 1, C);
    } else {
        if (m->head_probe) {
            head_backward(m, a, g, dout, B);
        } else {
            float inv = 1.0f / (float)T;
            for (size_t r = 0; r < R; r++)
                for (size_t j = 0; j < C; j++) a->dxn[r * C + j] = dout[(r / T) * C + j] * inv;
        }
        tk_layernorm_backward(a->dx, G(post_w), G(post_b), a->dxn, last, m->post_w, a->post_mean, a->post_rstd,
                              R, C);
    }
    for (int l = a->upto - 1; l >= 0; l--)
        if (layer_backward(m, a, g, l, B, err)) return -1;
    embed_backward(m, a, g, dpixels, B);
    return 0;
}

int tk_vit_register_params(tk_vit *m, tk_vit *g, tk_params *P, const char *prefix, int external, tk_err *err) {
    size_t cap = tk_vit_slot_capacity(&m->cfg);
    tk_vit_slot *sm = calloc(cap, sizeof *sm), *sg = calloc(cap, sizeof *sg);
    int rc = -1;
    if (!sm || !sg) {
        tk_fail(err, "out of memory");
        goto done;
    }
    size_t ns = tk_vit_slots(m, sm);
    tk_vit_slots(g, sg);
    for (size_t i = 0; i < ns; i++) {
        char nm[TK_NAME_MAX];
        snprintf(nm, sizeof nm, "%s%s", prefix, sm[i].name);
        size_t n = 1;
        for (int d = 0; d < sm[i].ndim; d++) n *= (size_t)sm[i].shape[d];
        int64_t shape[2] = {sm[i].ndim >= 2 ? sm[i].shape[0] : (int64_t)n, 0};
        if (sm[i].ndim >= 2) shape[1] = (int64_t)(n / (size_t)sm[i].shape[0]);
        int decay = sm[i].ndim >= 2 && !strstr(nm, "position_embedding") && !strstr(nm, "probe");
        if (tk_params_add(P, nm, sm[i].ndim >= 2 ? 2 : 1, shape, decay, sm[i].data, sg[i].data, *sm[i].data, err))
            goto done;
        P->items[P->n - 1].external = external;
    }
    rc = 0;
done:
    free(sm);
    free(sg);
    return rc;
}
