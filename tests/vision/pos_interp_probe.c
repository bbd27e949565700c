/* pos_interp_probe.c: the C side of tests/parity/test_pos_interp_parity.py.
 *
 *   pos_interp_probe map    --grid HO WO HN WN [--prefix 0|1] --input IN.safetensors --out OUT.safetensors
 *   pos_interp_probe encode --model DIR --image-size S --input IN.safetensors --out OUT.safetensors
 *                           [--layer L] [--feature patch|cls_patch] [--post-norm]
 *
 * map: IN holds "x" [n_old, C] and "dy" [n_new, C]; OUT gets "y" = M x and "dx" = M^T dy
 *   (vision/pos_interp.h, dx from zero).
 * encode: the tower of DIR set to run at S pixels (tk_vit_set_image_size: bicubic position
 *   embeddings when S is not the checkpoint's image_size); IN holds "pixels" [B,3,S,S], OUT gets
 *   "features" [B, tokens, C].
 * Errors: one line "pos_interp_probe: ..." on stderr, exit 1; bad usage exits 2. Two threads.
 */
#include "common.h"
#include "io/safetensors.h"
#include "vision/pos_interp.h"
#include "vision/vit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(const char *msg) {
    fprintf(stderr, "pos_interp_probe: %s (see the header of tests/vision/pos_interp_probe.c)\n", msg);
    return 2;
}

static int fail(tk_err *err) {
    tk_err_one_line(err);
    fprintf(stderr, "pos_interp_probe: %s\n", err->msg);
    return 1;
}

static float *read_all(tk_st_file *f, const char *name, const tk_st_tensor **t, tk_err *err) {
    *t = tk_st_find(f, name);
    if (!*t) {
        tk_fail(err, "%s: tensor %s missing", tk_st_path(f), name);
        return NULL;
    }
    float *p = tk_calloc((*t)->numel ? (*t)->numel : 1, sizeof(float));
    if (p && tk_st_read_f32(f, *t, p, (*t)->numel, err) == 0) return p;
    if (!p) tk_fail(err, "out of memory");
    tk_free(p);
    return NULL;
}

static long num(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    return *end ? -999999 : v;
}

static int cmd_map(int argc, char **argv) {
    long g[4] = {0}, pre = 0;
    const char *in = NULL, *outp = NULL;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--grid") == 0 && i + 4 < argc) {
            for (int k = 0; k < 4; k++) g[k] = num(argv[++i]);
        } else if (strcmp(argv[i], "--prefix") == 0 && i + 1 < argc) {
            pre = num(argv[++i]);
        } else if (strcmp(argv[i], "--input") == 0 && i + 1 < argc) {
            in = argv[++i];
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            outp = argv[++i];
        } else {
            return usage("bad map arguments");
        }
    }
    if (!in || !outp || g[0] < 1 || g[1] < 1 || g[2] < 1 || g[3] < 1 || pre < 0) return usage("map needs --grid, --input, --out");
    tk_err err = {0};
    tk_pos_interp *pi = tk_pos_interp_new((size_t)g[0], (size_t)g[1], (size_t)g[2], (size_t)g[3], (size_t)pre, &err);
    if (!pi) return fail(&err);
    tk_st_file *f = tk_st_open(in, &err);
    const tk_st_tensor *tx = NULL, *tdy = NULL;
    float *x = f ? read_all(f, "x", &tx, &err) : NULL, *dy = x ? read_all(f, "dy", &tdy, &err) : NULL;
    float *y = NULL, *dx = NULL;
    int rc = 1;
    if (!dy) goto done;
    size_t C = tx->ndim == 2 ? (size_t)tx->shape[1] : 0;
    if (tx->ndim != 2 || (size_t)tx->shape[0] != pi->n_old || tdy->ndim != 2 || (size_t)tdy->shape[0] != pi->n_new ||
        (size_t)tdy->shape[1] != C || C == 0) {
        tk_fail(&err, "%s: x must be [%zu, C] and dy [%zu, C]", in, pi->n_old, pi->n_new);
        goto done;
    }
    y = tk_calloc(pi->n_new * C, sizeof(float));
    dx = tk_calloc(pi->n_old * C, sizeof(float));
    if (!y || !dx) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    tk_pos_interp_forward(pi, y, x, C);
    tk_pos_interp_backward(pi, dx, dy, C);
    tk_st_entry outs[2] = {{"y", TK_DT_F32, 2, {(int64_t)pi->n_new, (int64_t)C}, y},
                           {"dx", TK_DT_F32, 2, {(int64_t)pi->n_old, (int64_t)C}, dx}};
    if (tk_st_write(outp, outs, 2, NULL, &err)) goto done;
    rc = 0;
done:
    if (rc) fail(&err);
    tk_free(x);
    tk_free(dy);
    tk_free(y);
    tk_free(dx);
    if (f) tk_st_close(f);
    tk_pos_interp_free(pi);
    return rc;
}

static int cmd_encode(int argc, char **argv) {
    const char *model = NULL, *in = NULL, *outp = NULL, *feature = NULL;
    long size = 0, layer = -1;
    int post = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--post-norm") == 0) post = 1;
        else if (i + 1 >= argc) return usage("bad encode arguments");
        else if (strcmp(a, "--model") == 0) model = argv[++i];
        else if (strcmp(a, "--input") == 0) in = argv[++i];
        else if (strcmp(a, "--out") == 0) outp = argv[++i];
        else if (strcmp(a, "--feature") == 0) feature = argv[++i];
        else if (strcmp(a, "--image-size") == 0) size = num(argv[++i]);
        else if (strcmp(a, "--layer") == 0) layer = num(argv[++i]);
        else return usage("bad encode arguments");
    }
    if (!model || !in || !outp || size < 1) return usage("encode needs --model, --image-size, --input, --out");
    tk_vit_select sel = {.layer = (int)layer, .feature = TK_VIT_FEATURE_PATCH, .post_norm = post};
    if (feature && tk_vit_feature_parse(feature, &sel.feature)) return usage("bad --feature");
    tk_err err = {0};
    tk_vit *m = tk_vit_open(model, NULL, &err);
    if (!m) return fail(&err);
    int rc = 1;
    tk_st_file *f = NULL;
    const tk_st_tensor *t = NULL;
    float *pix = NULL, *out = NULL;
    tk_vit_ws *ws = NULL;
    if (tk_vit_set_image_size(m, (int)size, 1, &err)) goto done;
    if (!(f = tk_st_open(in, &err)) || !(pix = read_all(f, "pixels", &t, &err))) goto done;
    int64_t S = m->image_size;
    if (t->ndim != 4 || t->shape[1] != 3 || t->shape[2] != S || t->shape[3] != S) {
        tk_fail(&err, "%s: pixels must be [B,3,%lld,%lld]", in, (long long)S, (long long)S);
        goto done;
    }
    size_t B = (size_t)t->shape[0], To = tk_vit_out_tokens(m, sel.feature), C = (size_t)m->cfg.hidden;
    ws = tk_vit_ws_alloc(m, B, &err);
    out = tk_calloc(B * To * C, sizeof(float));
    if (!ws || !out || tk_vit_forward(m, ws, out, pix, B, &sel, &err)) goto done;
    tk_st_entry o = {"features", TK_DT_F32, 3, {(int64_t)B, (int64_t)To, (int64_t)C}, out};
    if (tk_st_write(outp, &o, 1, NULL, &err)) goto done;
    rc = 0;
done:
    if (rc) fail(&err);
    tk_vit_ws_free(ws);
    tk_free(pix);
    tk_free(out);
    if (f) tk_st_close(f);
    tk_vit_close(m);
    return rc;
}

int main(int argc, char **argv) {
    tk_set_threads(2);
    if (argc < 2) return usage("missing command");
    if (strcmp(argv[1], "map") == 0) return cmd_map(argc, argv);
    if (strcmp(argv[1], "encode") == 0) return cmd_encode(argc, argv);
    return usage("unknown command");
}
