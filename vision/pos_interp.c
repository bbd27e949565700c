/* pos_interp.c: the bicubic position-embedding map (see pos_interp.h). */
#include "pos_interp.h"

#include "../src/ops/blas.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Keys' cubic convolution, a = TK_POS_INTERP_A: |t| <= 1 and 1 < |t| < 2 (torch's
 * cubic_convolution1 / cubic_convolution2). */
static double cubic1(double t) { return ((TK_POS_INTERP_A + 2) * t - (TK_POS_INTERP_A + 3)) * t * t + 1; }
static double cubic2(double t) {
    return ((TK_POS_INTERP_A * t - 5 * TK_POS_INTERP_A) * t + 8 * TK_POS_INTERP_A) * t - 4 * TK_POS_INTERP_A;
}

void tk_pos_interp_weights_1d(double *w, size_t in, size_t out) {
    memset(w, 0, in * out * sizeof *w);
    double scale = (double)in / (double)out; /* size given, no scale_factor: in / out */
    for (size_t i = 0; i < out; i++) {
        double src = ((double)i + 0.5) * scale - 0.5; /* align_corners=False, cubic: not clamped */
        double f = floor(src), t = src - f;
        double c[4] = {cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t)};
        for (int k = 0; k < 4; k++) {
            long j = (long)f - 1 + k;
            if (j < 0) j = 0;
            if (j > (long)in - 1) j = (long)in - 1; /* border taps clamped */
            w[i * in + (size_t)j] += c[k];
        }
    }
}

tk_pos_interp *tk_pos_interp_new(size_t h_old, size_t w_old, size_t h_new, size_t w_new, size_t n_prefix,
                                 tk_err *err) {
    if (!h_old || !w_old || !h_new || !w_new || h_old > 4096 || w_old > 4096 || h_new > 4096 || w_new > 4096 ||
        n_prefix > 1) {
        tk_fail(err, "position interpolation: grid %zu x %zu -> %zu x %zu (prefix %zu) out of range (sides 1..4096, "
                "prefix 0 or 1)", h_old, w_old, h_new, w_new, n_prefix);
        return NULL;
    }
    size_t n_old = n_prefix + h_old * w_old, n_new = n_prefix + h_new * w_new;
    tk_pos_interp *pi = calloc(1, sizeof *pi);
    double *wy = malloc(h_new * h_old * sizeof *wy), *wx = malloc(w_new * w_old * sizeof *wx);
    float *m = NULL;
    if (pi && wy && wx && n_new <= SIZE_MAX / sizeof(float) / n_old) m = calloc(n_new * n_old, sizeof *m);
    if (!m) {
        tk_fail(err, "position interpolation: out of memory for a %zu x %zu map", n_new, n_old);
        free(pi);
        free(wy);
        free(wx);
        return NULL;
    }
    tk_pos_interp_weights_1d(wy, h_old, h_new);
    tk_pos_interp_weights_1d(wx, w_old, w_new);
    for (size_t p = 0; p < n_prefix; p++) m[p * n_old + p] = 1.0f;
    for (size_t y = 0; y < h_new; y++)
        for (size_t x = 0; x < w_new; x++) {
            float *row = &m[(n_prefix + y * w_new + x) * n_old + n_prefix];
            for (size_t yo = 0; yo < h_old; yo++) {
                double a = wy[y * h_old + yo];
                if (a == 0.0) continue;
                for (size_t xo = 0; xo < w_old; xo++) row[yo * w_old + xo] = (float)(a * wx[x * w_old + xo]);
            }
        }
    free(wy);
    free(wx);
    pi->h_old = h_old, pi->w_old = w_old, pi->h_new = h_new, pi->w_new = w_new, pi->n_prefix = n_prefix;
    pi->n_old = n_old, pi->n_new = n_new;
    pi->m = m;
    return pi;
}

void tk_pos_interp_free(tk_pos_interp *pi) {
    if (!pi) return;
    free(pi->m);
    free(pi);
}

void tk_pos_interp_forward(const tk_pos_interp *pi, float *out, const float *x, size_t C) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tk_blas_dim(pi->n_new), tk_blas_dim(C),
                tk_blas_dim(pi->n_old), 1.0f, pi->m, tk_blas_dim(pi->n_old), x, tk_blas_dim(C), 0.0f, out,
                tk_blas_dim(C));
}

void tk_pos_interp_backward(const tk_pos_interp *pi, float *dx, const float *dout, size_t C) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(pi->n_old), tk_blas_dim(C),
                tk_blas_dim(pi->n_new), 1.0f, pi->m, tk_blas_dim(pi->n_old), dout, tk_blas_dim(C), 1.0f, dx,
                tk_blas_dim(C));
}

/* ---- the tower at another image size ---- */

int tk_vit_set_image_size(tk_vit *m, int size, int interpolate, tk_err *err) {
    const tk_vit_config *c = &m->cfg;
    int P = c->patch_size;
    if (size < P || size > 65536 || size % P)
        return tk_fail(err, "image size %d is not a positive multiple of the tower's patch size %d (at most 65536)", size,
                       P);
    size_t side0 = (size_t)(c->image_size / P), side = (size_t)(size / P), pre = c->kind == TK_VIT_CLIP ? 1 : 0;
    if (size != c->image_size && !interpolate)
        return tk_fail(err, "image size %d differs from the tower's image_size %d (position embeddings for %zu x %zu "
                       "patches, %zu x %zu needed): pass --interpolate-pos to interpolate them (bicubic)", size,
                       c->image_size, side0, side0, side, side);
    tk_pos_interp *pi = NULL;
    float *run = NULL;
    if (size != c->image_size) {
        if (!(pi = tk_pos_interp_new(side0, side0, side, side, pre, err))) return -1;
        if (!(run = tk_calloc(pi->n_new * (size_t)c->hidden, sizeof(float)))) {
            tk_pos_interp_free(pi);
            return tk_fail(err, "image size %d: out of memory for the interpolated position embeddings", size);
        }
    }
    tk_pos_interp_free(m->pos_map);
    tk_free(m->pos_run);
    m->pos_map = pi;
    m->pos_run = run;
    m->image_size = size;
    m->n_patches = side * side;
    m->n_tokens = m->n_patches + pre;
    tk_vit_pos_refresh(m);
    return 0;
}

void tk_vit_pos_refresh(tk_vit *m) {
    if (m->pos_map) tk_pos_interp_forward(m->pos_map, m->pos_run, m->pos, (size_t)m->cfg.hidden);
}
