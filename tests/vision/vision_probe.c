/* vision_probe.c: the C side of tests/parity/test_vision_parity.py, and a timing tool for the encoder.
 *
 *   vision_probe encode  --model DIR [--prefix P] --input IN.safetensors --out OUT.safetensors
 *                        [--layer L] [--feature patch|cls_patch] [--post-norm] [--batch B]
 *   vision_probe grad    --model DIR [--prefix P] --input IN.safetensors --out OUT.safetensors
 *                        [--layer L] [--feature patch|cls_patch] [--post-norm] [--pooled]
 *   vision_probe project --proj PATH --kind linear|mlp2x_gelu --input IN.safetensors
 *                        --out OUT.safetensors [--save mm_projector.safetensors]
 *   vision_probe bench   [--kind clip|siglip] [--hidden 768] [--inter 3072] [--layers 12] [--heads 12]
 *                        [--image 224] [--patch 16] [--images 4] [--batch 2] [--layer -2]
 *   common: [--threads N] (default 2)
 *
 * encode: IN holds "pixels" [B,3,S,S]; OUT gets "features" [B, tokens, C] (tk_vit_forward with the
 *   given selection; --batch sets the workspace's images per pass, default all).
 * grad: IN holds "pixels" [B,3,S,S] and "dout" (the output's shape); OUT gets "out" (the training
 *   forward: the selection, or pooler_output [B,C] with --pooled), "dpixels" and "grad.<name>" for every
 *   tensor of the tower (unprefixed HF names), from one backward into zeroed gradients.
 * project: IN holds "x" [N,I] and "dy" [N,O]; OUT gets "y" [N,O], "dx" [N,I] and "grad.<name>" for
 *   every projector tensor (one forward, one backward from zeroed gradients). --save writes the
 *   projector back in the original LLaVA layout.
 * bench: a random encoder of the given shape, `--images` random images; prints images/s.
 * Errors: one line "vision_probe: ..." on stderr, exit 1; bad usage exits 2.
 */
#include "common.h"
#include "io/safetensors.h"
#include "vision/projector.h"
#include "vision/vit.h"
#include "vision/vit_train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(const char *msg) {
    fprintf(stderr, "vision_probe: %s (see the header of tests/vision/vision_probe.c)\n", msg);
    return 2;
}

static int fail(tk_err *err) {
    tk_err_one_line(err);
    fprintf(stderr, "vision_probe: %s\n", err->msg);
    return 1;
}

/* Reads a whole F32/F16/BF16 tensor of file f into a new buffer; *t receives its descriptor. */
static float *read_all(tk_st_file *f, const char *name, const tk_st_tensor **t, tk_err *err) {
    *t = tk_st_find(f, name);
    if (!*t) {
        tk_fail(err, "%s: tensor %s missing", tk_st_path(f), name);
        return NULL;
    }
    float *p = tk_calloc((*t)->numel ? (*t)->numel : 1, sizeof(float));
    if (!p) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    if (tk_st_read_f32(f, *t, p, (*t)->numel, err)) {
        tk_free(p);
        return NULL;
    }
    return p;
}

typedef struct {
    const char *model, *prefix, *input, *out, *proj, *kind, *save, *feature;
    int layer, post_norm, pooled, threads, batch, images;
    int hidden, inter, layers, heads, image, patch;
} opts;

static int parse(opts *o, int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--post-norm") == 0) {
            o->post_norm = 1;
            continue;
        }
        if (strcmp(a, "--pooled") == 0) {
            o->pooled = 1;
            continue;
        }
        if (i + 1 >= argc) return -1;
        const char *v = argv[++i];
        const char **s = strcmp(a, "--model") == 0 ? &o->model : strcmp(a, "--prefix") == 0 ? &o->prefix
                       : strcmp(a, "--input") == 0 ? &o->input : strcmp(a, "--out") == 0 ? &o->out
                       : strcmp(a, "--proj") == 0 ? &o->proj : strcmp(a, "--kind") == 0 ? &o->kind
                       : strcmp(a, "--save") == 0 ? &o->save : strcmp(a, "--feature") == 0 ? &o->feature
                       : NULL;
        if (s) {
            *s = v;
            continue;
        }
        int *n = strcmp(a, "--layer") == 0 ? &o->layer : strcmp(a, "--threads") == 0 ? &o->threads
               : strcmp(a, "--batch") == 0 ? &o->batch : strcmp(a, "--images") == 0 ? &o->images
               : strcmp(a, "--hidden") == 0 ? &o->hidden : strcmp(a, "--inter") == 0 ? &o->inter
               : strcmp(a, "--layers") == 0 ? &o->layers : strcmp(a, "--heads") == 0 ? &o->heads
               : strcmp(a, "--image") == 0 ? &o->image : strcmp(a, "--patch") == 0 ? &o->patch
               : NULL;
        if (!n) return -1;
        char *end;
        long x = strtol(v, &end, 10);
        if (*end || x < -100000 || x > 100000) return -1;
        *n = (int)x;
    }
    return 0;
}

static int cmd_encode(const opts *o) {
    tk_err err = {0};
    if (!o->model || !o->input || !o->out) return usage("encode needs --model, --input and --out");
    tk_vit_select sel = {.layer = o->layer, .feature = TK_VIT_FEATURE_PATCH, .post_norm = o->post_norm};
    if (o->feature && tk_vit_feature_parse(o->feature, &sel.feature)) return usage("bad --feature");
    tk_vit *m = tk_vit_open(o->model, o->prefix, &err);
    if (!m) return fail(&err);
    int rc = 1;
    tk_st_file *in = tk_st_open(o->input, &err);
    const tk_st_tensor *t = NULL;
    float *pix = in ? read_all(in, "pixels", &t, &err) : NULL, *out = NULL;
    tk_vit_ws *ws = NULL;
    if (!pix) goto done;
    int64_t S = m->cfg.image_size, ch = m->cfg.channels;
    if (t->ndim != 4 || t->shape[0] < 1 || t->shape[1] != ch || t->shape[2] != S || t->shape[3] != S) {
        tk_fail(&err, "%s: pixels must be [B,%lld,%lld,%lld]", o->input, (long long)ch, (long long)S,
                (long long)S);
        goto done;
    }
    size_t B = (size_t)t->shape[0], To = tk_vit_out_tokens(m, sel.feature), C = (size_t)m->cfg.hidden;
    ws = tk_vit_ws_alloc(m, o->batch > 0 ? (size_t)o->batch : B, &err);
    out = tk_calloc(B * To * C, sizeof(float));
    if (!ws || !out) goto done;
    if (tk_vit_forward(m, ws, out, pix, B, &sel, &err)) goto done;
    tk_st_entry e = {"features", TK_DT_F32, 3, {(int64_t)B, (int64_t)To, (int64_t)C}, out};
    if (tk_st_write(o->out, &e, 1, NULL, &err)) goto done;
    rc = 0;
done:
    tk_vit_ws_free(ws);
    tk_free(out);
    tk_free(pix);
    tk_st_close(in);
    tk_vit_close(m);
    return rc ? fail(&err) : 0;
}

static int cmd_grad(const opts *o) {
    tk_err err = {0};
    if (!o->model || !o->input || !o->out) return usage("grad needs --model, --input and --out");
    tk_vit_select sel = {.layer = o->layer, .feature = TK_VIT_FEATURE_PATCH, .post_norm = o->post_norm,
                         .pooled = o->pooled};
    if (o->feature && tk_vit_feature_parse(o->feature, &sel.feature)) return usage("bad --feature");
    tk_vit *m = tk_vit_open(o->model, o->prefix, &err), *g = NULL;
    if (!m) return fail(&err);
    int rc = 1;
    tk_st_file *in = tk_st_open(o->input, &err);
    const tk_st_tensor *t = NULL, *td = NULL;
    float *pix = in ? read_all(in, "pixels", &t, &err) : NULL, *dout = NULL, *out = NULL, *dpix = NULL;
    tk_vit_act *act = NULL;
    tk_vit_slot *sl = NULL;
    tk_st_entry *e = NULL;
    char (*names)[TK_NAME_MAX + 8] = NULL;
    if (!pix || !(dout = read_all(in, "dout", &td, &err))) goto done;
    int64_t S = m->image_size, ch = m->cfg.channels;
    if (t->ndim != 4 || t->shape[0] < 1 || t->shape[1] != ch || t->shape[2] != S || t->shape[3] != S) {
        tk_fail(&err, "%s: pixels must be [B,%lld,%lld,%lld]", o->input, (long long)ch, (long long)S,
                (long long)S);
        goto done;
    }
    size_t B = (size_t)t->shape[0], To = tk_vit_train_out_tokens(m, &sel), C = (size_t)m->cfg.hidden;
    size_t np = B * (size_t)(ch * S * S);
    if (td->numel != B * To * C) {
        tk_fail(&err, "%s: dout must hold %zu x %zu x %zu values", o->input, B, To, C);
        goto done;
    }
    size_t cap = tk_vit_slot_capacity(&m->cfg);
    if (!(g = tk_vit_zeros(&m->cfg, &err)) || !(act = tk_vit_act_alloc(m, B, &err))) goto done;
    out = tk_calloc(B * To * C, sizeof(float));
    dpix = tk_calloc(np, sizeof(float));
    sl = calloc(cap, sizeof *sl);
    e = calloc(cap + 2, sizeof *e);
    names = calloc(cap, sizeof *names);
    if (!out || !dpix || !sl || !e || !names) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    if (tk_vit_train_forward(m, act, out, pix, B, &sel, &err) ||
        tk_vit_train_backward(m, act, g, dpix, dout, &err))
        goto done;
    size_t ns = tk_vit_slots(g, sl);
    e[0] = (tk_st_entry){"out", TK_DT_F32, 3, {(int64_t)B, (int64_t)To, (int64_t)C}, out};
    e[1] = (tk_st_entry){"dpixels", TK_DT_F32, 4, {(int64_t)B, ch, S, S}, dpix};
    for (size_t i = 0; i < ns; i++) {
        snprintf(names[i], sizeof names[i], "grad.%s", sl[i].name);
        e[2 + i] = (tk_st_entry){names[i], TK_DT_F32, sl[i].ndim, {0}, *sl[i].data};
        for (int d = 0; d < sl[i].ndim; d++) e[2 + i].shape[d] = sl[i].shape[d];
    }
    if (tk_st_write(o->out, e, 2 + ns, NULL, &err)) goto done;
    rc = 0;
done:
    tk_vit_act_free(act);
    tk_free(out), tk_free(dpix), tk_free(pix), tk_free(dout);
    free(sl), free(e), free(names);
    tk_st_close(in);
    tk_vit_close(g);
    tk_vit_close(m);
    return rc ? fail(&err) : 0;
}

static int cmd_project(const opts *o) {
    tk_err err = {0};
    if (!o->proj || !o->kind || !o->input || !o->out) return usage("project needs --proj, --kind, --input, --out");
    tk_proj_kind kind;
    if (tk_proj_kind_parse(o->kind, &kind)) return usage("bad --kind");
    tk_projector p;
    memset(&p, 0, sizeof p);
    tk_st_file *in = NULL;
    float *x = NULL, *dy = NULL, *y = NULL, *dx = NULL, *cache = NULL;
    tk_st_entry *e = NULL;
    char (*names)[TK_NAME_MAX + 8] = NULL;
    int rc = 1;
    tk_proj_kind fk;
    size_t I, O;
    if (tk_projector_detect(o->proj, &fk, &I, &O, &err) || tk_projector_init(&p, kind, I, O, &err) ||
        tk_projector_alloc_own(&p, &err) || tk_projector_load(&p, o->proj, &err))
        goto done;
    const tk_st_tensor *tx, *tdy;
    if (!(in = tk_st_open(o->input, &err)) || !(x = read_all(in, "x", &tx, &err)) ||
        !(dy = read_all(in, "dy", &tdy, &err)))
        goto done;
    if (tx->ndim != 2 || tx->shape[1] != (int64_t)I || tdy->ndim != 2 || tdy->shape[0] != tx->shape[0] ||
        tdy->shape[1] != (int64_t)O) {
        tk_fail(&err, "%s: x must be [N,%zu] and dy [N,%zu]", o->input, I, O);
        goto done;
    }
    size_t N = (size_t)tx->shape[0];
    y = tk_calloc(N * O, sizeof(float));
    dx = tk_calloc(N * I, sizeof(float));
    cache = tk_calloc(tk_projector_cache_floats(&p, N) + 1, sizeof(float));
    e = calloc(2 + p.own.n, sizeof *e);
    names = calloc(p.own.n, sizeof *names);
    if (!y || !dx || !cache || !e || !names) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    tk_params_zero_grad(&p.own);
    tk_projector_forward(&p, y, cache, x, N);
    tk_projector_backward(&p, dx, cache, dy, x, N);
    e[0] = (tk_st_entry){"y", TK_DT_F32, 2, {(int64_t)N, (int64_t)O}, y};
    e[1] = (tk_st_entry){"dx", TK_DT_F32, 2, {(int64_t)N, (int64_t)I}, dx};
    for (size_t i = 0; i < p.own.n; i++) {
        const tk_param *q = &p.own.items[i];
        snprintf(names[i], sizeof names[i], "grad.%s", q->name);
        e[2 + i] = (tk_st_entry){names[i], TK_DT_F32, q->ndim, {q->shape[0], q->shape[1]}, p.own.grad + q->offset};
    }
    if (tk_st_write(o->out, e, 2 + p.own.n, NULL, &err)) goto done;
    if (o->save && tk_projector_save(&p, o->save, &err)) goto done;
    rc = 0;
done:
    tk_st_close(in);
    tk_free(x), tk_free(dy), tk_free(y), tk_free(dx), tk_free(cache);
    free(e);
    free(names);
    tk_projector_free(&p);
    return rc ? fail(&err) : 0;
}

static int cmd_bench(const opts *o) {
    tk_err err = {0};
    tk_vit_kind kind = TK_VIT_CLIP;
    if (o->kind && strcmp(o->kind, "siglip") == 0) kind = TK_VIT_SIGLIP;
    else if (o->kind && strcmp(o->kind, "clip") != 0) return usage("bench --kind is clip or siglip");
    tk_vit_config cfg;
    tk_vit_config_default(&cfg, kind);
    cfg.patch_size = 16;
    if (o->hidden) cfg.hidden = o->hidden;
    if (o->inter) cfg.inter = o->inter;
    if (o->layers) cfg.n_layers = o->layers;
    if (o->heads) cfg.n_heads = o->heads;
    if (o->image) cfg.image_size = o->image;
    if (o->patch) cfg.patch_size = o->patch;
    tk_vit *m = tk_vit_random(&cfg, 1, &err);
    if (!m) return fail(&err);
    size_t n = o->images > 0 ? (size_t)o->images : 4, b = o->batch > 0 ? (size_t)o->batch : 2;
    tk_vit_select sel = {.layer = o->layer, .feature = TK_VIT_FEATURE_PATCH};
    double sec = 0.0;
    int rc = tk_vit_run_images(m, n, b, &sel, 7, &sec, &err);
    if (rc == 0) {
        int upto = sel.layer < 0 ? cfg.n_layers + 1 + sel.layer : sel.layer;
        printf("vision encoder %s C=%d F=%d L=%d (ran %d) H=%d %dpx/%d: %zu images, batch %zu, %d threads: "
               "%.3f s, %.2f images/s\n", kind == TK_VIT_CLIP ? "clip" : "siglip", cfg.hidden, cfg.inter,
               cfg.n_layers, upto, cfg.n_heads, cfg.image_size, cfg.patch_size, n, b, o->threads, sec,
               (double)n / sec);
    }
    tk_vit_close(m);
    return rc ? fail(&err) : 0;
}

int main(int argc, char **argv) {
    opts o = {.layer = -2, .threads = 2};
    if (argc < 2) return usage("missing command (encode, grad, project or bench)");
    if (parse(&o, argc, argv)) return usage("bad or incomplete option");
    tk_set_threads(o.threads);
    if (strcmp(argv[1], "encode") == 0) return cmd_encode(&o);
    if (strcmp(argv[1], "grad") == 0) return cmd_grad(&o);
    if (strcmp(argv[1], "project") == 0) return cmd_project(&o);
    if (strcmp(argv[1], "bench") == 0) return cmd_bench(&o);
    return usage("unknown command");
}
