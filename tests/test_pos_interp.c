/* test_pos_interp.c: the bicubic position-embedding map (vision/pos_interp.c).
 *
 * Properties any correct map has, on grids up, down, one side only and 1 x 1: every row of the 1-D
 * weights sums to 1 (so a constant field stays constant), the same grid is the identity, CLIP's class
 * row passes through untouched; the weights of one hand-computed case (2 -> 4: taps and Keys' kernel
 * with a = -0.75, border taps clamped); the backward is the forward's adjoint (<M x, y> = <x, M^T y>)
 * and accumulates; and a central finite-difference check of the backward against the forward through
 * the loss sum(w * forward(x)). The tower hook (tk_vit_set_image_size) on small random CLIP and SigLIP
 * towers: a different size refused without interpolation (one line naming --interpolate-pos), sizes
 * that are no multiple of the patch refused, the token counts of the new grid, pos_run = M pos with the
 * class row kept, tk_vit_pos_refresh following a change of pos, the forward at the new size, and the
 * checkpoint's own size restoring the original grid. Parity with torch's F.interpolate and a tower run
 * at another size: tests/parity/test_pos_interp_parity.py.
 * Exits 1 if any check fails.
 */
#include "common.h"
#include "vision/pos_interp.h"
#include "vision/vit.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_fail = 0, n_pass = 0;

static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("  %-84s %s\n", buf, ok ? "ok" : "FAIL");
    if (ok) n_pass++;
    else n_fail++;
}

static uint64_t g_seed = 12345;
static float frand(void) {
    g_seed = g_seed * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_seed >> 40) / (double)(1 << 24)) * 2.0f - 1.0f;
}

/* The 1-D weights of 2 -> 4 by hand: src = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25. */
static void check_hand_case(void) {
    double w[4 * 2];
    tk_pos_interp_weights_1d(w, 2, 4);
    const double A = -0.75;
    double want[4 * 2] = {0};
    double srcs[4] = {-0.25, 0.25, 0.75, 1.25};
    for (int i = 0; i < 4; i++) {
        double f = floor(srcs[i]), t = srcs[i] - f;
        for (int k = 0; k < 4; k++) {
            double d = fabs(t - (k - 1)); /* distance from the tap floor(src) - 1 + k */
            double c = d <= 1 ? ((A + 2) * d - (A + 3)) * d * d + 1 : ((A * d - 5 * A) * d + 8 * A) * d - 4 * A;
            long j = (long)f - 1 + k;
            j = j < 0 ? 0 : j > 1 ? 1 : j;
            want[i * 2 + j] += c;
        }
    }
    double err = 0;
    for (int i = 0; i < 8; i++) err = fmax(err, fabs(w[i] - want[i]));
    /* and a value worked out on paper: output 1 (src 0.25) takes 1 at t = .25 from tap 0 ... */
    double c0 = ((A * 1.25 - 5 * A) * 1.25 + 8 * A) * 1.25 - 4 * A; /* tap -1 -> 0 */
    double c1 = ((A + 2) * 0.25 - (A + 3)) * 0.25 * 0.25 + 1;      /* tap 0 */
    report(err < 1e-15 && fabs(w[1 * 2 + 0] - (c0 + c1)) < 1e-15, "2 -> 4: weights equal Keys' kernel, borders clamped");
}

static void check_rows_sum(size_t in, size_t out) {
    double *w = malloc(in * out * sizeof *w);
    tk_pos_interp_weights_1d(w, in, out);
    double worst = 0;
    for (size_t i = 0; i < out; i++) {
        double s = 0;
        for (size_t j = 0; j < in; j++) s += w[i * in + j];
        worst = fmax(worst, fabs(s - 1));
    }
    report(worst < 1e-12, "1-D %zu -> %zu: every row sums to 1 (max |sum - 1| %.1e)", in, out, worst);
    free(w);
}

/* adjoint, accumulation, finite differences and a constant field for one map */
static void check_map(size_t ho, size_t wo, size_t hn, size_t wn, size_t pre, size_t C) {
    tk_err err = {0};
    tk_pos_interp *pi = tk_pos_interp_new(ho, wo, hn, wn, pre, &err);
    if (!pi) {
        report(0, "map %zux%zu -> %zux%zu: %s", ho, wo, hn, wn, err.msg);
        return;
    }
    size_t no = pi->n_old, nn = pi->n_new;
    float *x = malloc(no * C * sizeof *x), *y = malloc(nn * C * sizeof *y), *fx = malloc(nn * C * sizeof *fx);
    float *g = malloc(no * C * sizeof *g), *g2 = malloc(no * C * sizeof *g2);
    for (size_t i = 0; i < no * C; i++) x[i] = frand();
    for (size_t i = 0; i < nn * C; i++) y[i] = frand();
    tk_pos_interp_forward(pi, fx, x, C);
    memset(g, 0, no * C * sizeof *g);
    tk_pos_interp_backward(pi, g, y, C);
    double lhs = 0, rhs = 0, mag = 0;
    for (size_t i = 0; i < nn * C; i++) lhs += (double)fx[i] * y[i], mag += fabs((double)fx[i] * y[i]);
    for (size_t i = 0; i < no * C; i++) rhs += (double)x[i] * g[i];
    report(fabs(lhs - rhs) <= 1e-5 * (mag + 1), "%zux%zu -> %zux%zu (prefix %zu): <Mx, y> = <x, M^T y> (%.6g vs %.6g)", ho,
           wo, hn, wn, pre, lhs, rhs);
    /* backward accumulates: twice from zero is 2x once */
    memcpy(g2, g, no * C * sizeof *g2);
    tk_pos_interp_backward(pi, g2, y, C);
    double acc = 0;
    for (size_t i = 0; i < no * C; i++) acc = fmax(acc, fabs(g2[i] - 2 * g[i]));
    report(acc < 1e-5, "  backward adds into d_pos (max |2g - g2| %.1e)", acc);
    /* finite differences of L(x) = sum(y * forward(x)) at a few entries (central, h = 1e-2) */
    double worst = 0;
    for (int k = 0; k < 12; k++) {
        size_t i = (size_t)(k * 7919) % (no * C);
        float keep = x[i];
        double lp = 0, lm = 0;
        x[i] = keep + 1e-2f;
        tk_pos_interp_forward(pi, fx, x, C);
        for (size_t j = 0; j < nn * C; j++) lp += (double)fx[j] * y[j];
        x[i] = keep - 1e-2f;
        tk_pos_interp_forward(pi, fx, x, C);
        for (size_t j = 0; j < nn * C; j++) lm += (double)fx[j] * y[j];
        x[i] = keep;
        double fd = (lp - lm) / 2e-2;
        worst = fmax(worst, fabs(fd - g[i]) / fmax(1.0, fabs(g[i])));
    }
    report(worst < 2e-3, "  finite differences match the backward (max rel err %.1e)", worst);
    /* a constant field stays constant; the class row passes through */
    for (size_t i = 0; i < no * C; i++) x[i] = 0.375f;
    if (pre) for (size_t c = 0; c < C; c++) x[c] = (float)c - 7.0f;
    tk_pos_interp_forward(pi, fx, x, C);
    double cerr = 0;
    for (size_t i = pre * C; i < nn * C; i++) cerr = fmax(cerr, fabs(fx[i] - 0.375));
    for (size_t c = 0; pre && c < C; c++) cerr = fmax(cerr, fabs(fx[c] - ((double)c - 7.0)));
    report(cerr < 1e-5, "  a constant grid stays constant%s (max err %.1e)", pre ? ", class row unchanged" : "", cerr);
    free(x);
    free(y);
    free(fx);
    free(g);
    free(g2);
    tk_pos_interp_free(pi);
}

static void check_tower(tk_vit_kind kind) {
    const char *kn = kind == TK_VIT_CLIP ? "CLIP" : "SigLIP";
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, kind);
    cfg.hidden = 8, cfg.inter = 16, cfg.n_layers = 1, cfg.n_heads = 2, cfg.image_size = 16, cfg.patch_size = 4;
    tk_err err = {0};
    tk_vit *m = tk_vit_random(&cfg, 7, &err);
    TK_ASSERT(m);
    size_t pre = kind == TK_VIT_CLIP ? 1 : 0, C = 8;
    int rc = tk_vit_set_image_size(m, 24, 0, &err);
    report(rc != 0 && strstr(err.msg, "--interpolate-pos") && strstr(err.msg, "4 x 4") && strstr(err.msg, "6 x 6") &&
               !strchr(err.msg, '\n') && m->image_size == 16 && m->n_tokens == pre + 16,
           "%s: 24 px without interpolation refused, names --interpolate-pos; the tower unchanged", kn);
    rc = tk_vit_set_image_size(m, 26, 1, &err);
    report(rc != 0 && strstr(err.msg, "multiple"), "%s: 26 px (no multiple of the patch 4) refused", kn);
    rc = tk_vit_set_image_size(m, 24, 1, &err);
    report(rc == 0 && m->image_size == 24 && m->n_patches == 36 && m->n_tokens == pre + 36 && m->n_pos == pre + 16 &&
               m->cfg.image_size == 16 && m->pos_map && m->pos_run,
           "%s: 24 px with interpolation: 6 x 6 patches, pos keeps the checkpoint's %zu rows", kn, pre + 16);
    float *want = malloc((pre + 36) * C * sizeof *want);
    tk_pos_interp_forward(m->pos_map, want, m->pos, C);
    int same = memcmp(want, m->pos_run, (pre + 36) * C * sizeof *want) == 0;
    for (size_t c = 0; pre && c < C; c++) same = same && m->pos_run[c] == m->pos[c];
    report(same, "%s: pos_run = M pos%s", kn, pre ? ", class row unchanged" : "");
    m->pos[pre * C + 3] += 1.0f; /* a step on one position embedding */
    tk_vit_pos_refresh(m);
    tk_pos_interp_forward(m->pos_map, want, m->pos, C);
    report(memcmp(want, m->pos_run, (pre + 36) * C * sizeof *want) == 0, "%s: tk_vit_pos_refresh follows pos", kn);
    tk_vit_ws *ws = tk_vit_ws_alloc(m, 2, &err);
    float *px = malloc(2 * 3 * 24 * 24 * sizeof *px), *out = malloc(2 * (pre + 36) * C * sizeof *out);
    for (size_t i = 0; i < 2 * 3 * 24 * 24; i++) px[i] = frand();
    tk_vit_select sel = {.layer = -1, .feature = TK_VIT_FEATURE_CLS_PATCH};
    rc = ws ? tk_vit_forward(m, ws, out, px, 2, &sel, &err) : -1;
    int finite = rc == 0;
    for (size_t i = 0; finite && i < 2 * (pre + 36) * C; i++) finite = isfinite(out[i]);
    report(finite && tk_vit_out_tokens(m, sel.feature) == pre + 36, "%s: forward at 24 px gives %zu finite tokens", kn,
           pre + 36);
    tk_vit_ws_free(ws);
    rc = tk_vit_set_image_size(m, 16, 0, &err);
    report(rc == 0 && !m->pos_map && !m->pos_run && m->image_size == 16 && m->n_tokens == pre + 16,
           "%s: the checkpoint's 16 px restores its own grid (no map)", kn);
    free(want);
    free(px);
    free(out);
    tk_vit_close(m);
}

int main(void) {
    printf("== 1-D weights\n");
    check_hand_case();
    size_t sizes[][2] = {{2, 4}, {24, 32}, {32, 24}, {7, 7}, {1, 5}, {5, 1}, {3, 10}, {16, 9}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) check_rows_sum(sizes[i][0], sizes[i][1]);
    printf("== maps\n");
    tk_err err = {0};
    tk_pos_interp *id = tk_pos_interp_new(5, 6, 5, 6, 1, &err);
    double ierr = 0;
    for (size_t r = 0; id && r < id->n_new; r++)
        for (size_t c = 0; c < id->n_old; c++) ierr = fmax(ierr, fabs(id->m[r * id->n_old + c] - (r == c ? 1.0 : 0.0)));
    report(id && ierr == 0.0, "the same grid (5 x 6, class row) is exactly the identity");
    tk_pos_interp_free(id);
    check_map(4, 4, 6, 6, 1, 5);   /* CLIP up */
    check_map(6, 6, 4, 4, 0, 3);   /* SigLIP down */
    check_map(3, 5, 7, 2, 1, 4);   /* rectangular, one side down */
    check_map(1, 1, 3, 3, 0, 2);   /* a 1 x 1 grid */
    check_map(24, 24, 32, 32, 1, 8); /* 336 px -> 448 px at patch 14 */
    tk_pos_interp *bad = tk_pos_interp_new(0, 4, 4, 4, 0, &err);
    report(!bad && strstr(err.msg, "out of range") && !strchr(err.msg, '\n'), "a zero side is refused, one line");
    bad = tk_pos_interp_new(4, 4, 4, 4, 2, &err);
    report(!bad && strstr(err.msg, "prefix"), "a prefix of 2 is refused");
    printf("== the tower at another image size\n");
    check_tower(TK_VIT_CLIP);
    check_tower(TK_VIT_SIGLIP);
    printf("test_pos_interp: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
