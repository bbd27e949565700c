/* projector.c: LLaVA's mm_projector (see projector.h): registration, loading/saving, forward, backward.
 *
 * Shape legend (outermost first):
 *   N  rows (visual tokens), I  vision width (input), O  LLM width (output)
 */
#include "vision/projector.h"

#include "ops/ops.h"
#include "train/optim.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int tk_proj_kind_parse(const char *s, tk_proj_kind *out) {
    if (strcmp(s, "linear") == 0) *out = TK_PROJ_LINEAR;
    else if (strcmp(s, "mlp2x_gelu") == 0) *out = TK_PROJ_MLP2X_GELU;
    else return -1;
    return 0;
}

const char *tk_proj_kind_name(tk_proj_kind kind) {
    return kind == TK_PROJ_LINEAR ? "linear" : "mlp2x_gelu";
}

int tk_projector_init(tk_projector *p, tk_proj_kind kind, size_t in, size_t out, tk_err *err) {
    memset(p, 0, sizeof *p);
    if (in < 1 || out < 1 || in > (1u << 20) || out > (1u << 20))
        return tk_fail(err, "projector: widths %zu -> %zu out of range [1, %u]", in, out, 1u << 20);
    p->kind = kind;
    p->in = in;
    p->out = out;
    return 0;
}

int tk_projector_register(tk_projector *p, tk_params *P, const char *prefix, tk_err *err) {
    char name[TK_NAME_MAX];
    if (!prefix) prefix = "model.mm_projector";
    if (strlen(prefix) > TK_NAME_MAX - 16) return tk_fail(err, "projector: name prefix too long");
    int64_t w1[2] = {(int64_t)p->out, (int64_t)p->in}, w2[2] = {(int64_t)p->out, (int64_t)p->out};
    int64_t b[1] = {(int64_t)p->out};
    int mlp = p->kind == TK_PROJ_MLP2X_GELU;
    snprintf(name, sizeof name, mlp ? "%s.0.weight" : "%s.weight", prefix);
    if (tk_params_add(P, name, 2, w1, 1, &p->w1, &p->dw1, NULL, err)) return -1;
    snprintf(name, sizeof name, mlp ? "%s.0.bias" : "%s.bias", prefix);
    if (tk_params_add(P, name, 1, b, 0, &p->b1, &p->db1, NULL, err)) return -1;
    if (!mlp) return 0;
    snprintf(name, sizeof name, "%s.2.weight", prefix);
    if (tk_params_add(P, name, 2, w2, 1, &p->w2, &p->dw2, NULL, err)) return -1;
    snprintf(name, sizeof name, "%s.2.bias", prefix);
    return tk_params_add(P, name, 1, b, 0, &p->b2, &p->db2, NULL, err);
}

int tk_projector_alloc_own(tk_projector *p, tk_err *err) {
    if (tk_projector_register(p, &p->own, NULL, err) || tk_params_alloc(&p->own, err)) {
        tk_params_free(&p->own);
        return -1;
    }
    return 0;
}

void tk_projector_free(tk_projector *p) {
    if (!p || p->own.n == 0) return; /* an external block belongs to its owner */
    tk_params_free(&p->own);
    p->w1 = p->b1 = p->w2 = p->b2 = NULL;
    p->dw1 = p->db1 = p->dw2 = p->db2 = NULL;
}

void tk_projector_random(tk_projector *p, uint64_t seed) {
    tk_rng rng;
    tk_rng_seed(&rng, seed);
    float a1 = 1.0f / sqrtf((float)p->in), a2 = 1.0f / sqrtf((float)p->out);
    for (size_t i = 0; i < p->out * p->in; i++) p->w1[i] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * a1;
    for (size_t i = 0; i < p->out; i++) p->b1[i] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * a1;
    if (p->kind != TK_PROJ_MLP2X_GELU) return;
    for (size_t i = 0; i < p->out * p->out; i++) p->w2[i] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * a2;
    for (size_t i = 0; i < p->out; i++) p->b2[i] = (2.0f * tk_rng_uniform(&rng) - 1.0f) * a2;
}

/* ---- files ----------------------------------------------------------------------------------- */

typedef struct {
    const char *w1, *b1, *w2, *b2; /* tensor names; w2, b2 NULL for linear */
    tk_proj_kind kind;
} layout;

static const layout k_layouts[] = {
    {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
     "model.mm_projector.2.bias", TK_PROJ_MLP2X_GELU},
    {"mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias",
     TK_PROJ_MLP2X_GELU},
    {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
     "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias", TK_PROJ_MLP2X_GELU},
    {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
     "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias",
     TK_PROJ_MLP2X_GELU},
    {"model.mm_projector.weight", "model.mm_projector.bias", NULL, NULL, TK_PROJ_LINEAR},
    {"mm_projector.weight", "mm_projector.bias", NULL, NULL, TK_PROJ_LINEAR},
};

/* A single safetensors file or a checkpoint directory, searched by name. */
typedef struct {
    tk_st_file *file;
    tk_st_set *set;
} source;

static int source_open(source *s, const char *path, tk_err *err) {
    struct stat st;
    memset(s, 0, sizeof *s);
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) s->set = tk_st_set_open(path, err);
    else s->file = tk_st_open(path, err);
    return s->set || s->file ? 0 : -1;
}

static void source_close(source *s) {
    tk_st_close(s->file);
    tk_st_set_close(s->set);
}

static const tk_st_tensor *source_find(const source *s, const char *name, const tk_st_file **f) {
    if (s->file) {
        *f = s->file;
        return tk_st_find(s->file, name);
    }
    return tk_st_set_find(s->set, name, f);
}

/* The first layout whose first weight exists; its kind and shapes (shape-checked). NULL when none. */
static const layout *find_layout(const source *s, const char *path, size_t *in, size_t *out,
                                 tk_err *err) {
    for (size_t i = 0; i < sizeof k_layouts / sizeof *k_layouts; i++) {
        const layout *L = &k_layouts[i];
        const tk_st_file *f;
        const tk_st_tensor *t = source_find(s, L->w1, &f);
        if (!t) continue;
        if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1) {
            tk_fail(err, "%s: tensor %s has %d dims, expected a matrix [out, in]", path, L->w1, t->ndim);
            return NULL;
        }
        *out = (size_t)t->shape[0];
        *in = (size_t)t->shape[1];
        return L;
    }
    tk_fail(err, "%s: no projector found (expected model.mm_projector.* or multi_modal_projector.*)", path);
    return NULL;
}

int tk_projector_detect(const char *path, tk_proj_kind *kind, size_t *in, size_t *out, tk_err *err) {
    source s;
    if (source_open(&s, path, err)) return -1;
    const layout *L = find_layout(&s, path, in, out, err);
    if (L) *kind = L->kind;
    source_close(&s);
    return L ? 0 : -1;
}

int tk_projector_kind_of(const char *path, const char *given, tk_proj_kind *kind, tk_err *err) {
    size_t in, out;
    if (tk_projector_detect(path, kind, &in, &out, err)) return -1;
    if (given && strcmp(given, tk_proj_kind_name(*kind)) != 0)
        return tk_fail(err, "%s: holds a %s projector, not the --projector-type %s", path, tk_proj_kind_name(*kind),
                       given);
    return 0;
}

static int read_tensor(const source *s, const char *path, const char *name, int ndim, int64_t d0,
                       int64_t d1, float *dst, tk_err *err) {
    const tk_st_file *f;
    const tk_st_tensor *t = source_find(s, name, &f);
    int64_t shape[2] = {d0, d1};
    if (!t) return tk_fail(err, "%s: tensor %s missing", path, name);
    if (tk_st_check_shape(f, t, ndim, shape, err)) return -1;
    return tk_st_read_f32(f, t, dst, t->numel, err);
}

int tk_projector_load(tk_projector *p, const char *path, tk_err *err) {
    TK_ASSERT(p->w1 && p->b1);
    source s;
    if (source_open(&s, path, err)) return -1;
    size_t in = 0, out = 0;
    int rc = -1;
    const layout *L = find_layout(&s, path, &in, &out, err);
    if (!L) goto done;
    if (L->kind != p->kind) {
        tk_fail(err, "%s: projector is %s (%s), expected %s", path, tk_proj_kind_name(L->kind), L->w1,
                tk_proj_kind_name(p->kind));
        goto done;
    }
    int64_t I = (int64_t)p->in, O = (int64_t)p->out;
    if (read_tensor(&s, path, L->w1, 2, O, I, p->w1, err) || read_tensor(&s, path, L->b1, 1, O, 0, p->b1, err))
        goto done;
    if (p->kind == TK_PROJ_MLP2X_GELU &&
        (read_tensor(&s, path, L->w2, 2, O, O, p->w2, err) || read_tensor(&s, path, L->b2, 1, O, 0, p->b2, err)))
        goto done;
    rc = 0;
done:
    source_close(&s);
    return rc;
}

int tk_projector_save(const tk_projector *p, const char *path, tk_err *err) {
    const layout *L = p->kind == TK_PROJ_MLP2X_GELU ? &k_layouts[0] : &k_layouts[4];
    int64_t I = (int64_t)p->in, O = (int64_t)p->out;
    tk_st_entry e[4] = {
        {L->w1, TK_DT_F32, 2, {O, I}, p->w1},
        {L->b1, TK_DT_F32, 1, {O}, p->b1},
        {L->w2, TK_DT_F32, 2, {O, O}, p->w2},
        {L->b2, TK_DT_F32, 1, {O}, p->b2},
    };
    const char *meta[] = {"format", "pt", "mm_projector_type", tk_proj_kind_name(p->kind), NULL};
    return tk_st_write(path, e, p->kind == TK_PROJ_MLP2X_GELU ? 4 : 2, meta, err);
}

/* ---- forward / backward ---------------------------------------------------------------------- */

size_t tk_projector_cache_floats(const tk_projector *p, size_t N) {
    return p->kind == TK_PROJ_MLP2X_GELU ? 4 * N * p->out : 0;
}

/* y [N,O] = x [N,I] w [O,I]^T + b [O]. */
static void linear_bias(float *y, const float *x, const float *w, const float *b, size_t N, size_t I,
                        size_t O) {
#pragma omp parallel for if (N * O >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++)
        for (size_t o = 0; o < O; o++) y[n * O + o] = b[o];
    tk_linear_forward(y, x, w, N, I, O, 1.0f);
}

/* db [O] += sum_n dy [N,O]. */
static void bias_backward(float *db, const float *dy, size_t N, size_t O) {
    const size_t blk = 64, nblocks = (O + blk - 1) / blk;
#pragma omp parallel for if (N * O >= TK_OMP_MIN_WORK)
    for (size_t k = 0; k < nblocks; k++) {
        size_t o0 = k * blk, o1 = o0 + blk < O ? o0 + blk : O;
        for (size_t n = 0; n < N; n++)
            for (size_t o = o0; o < o1; o++) db[o] += dy[n * O + o];
    }
}

void tk_projector_forward(const tk_projector *p, float *y, float *cache, const float *x, size_t N) {
    size_t I = p->in, O = p->out;
    if (p->kind == TK_PROJ_LINEAR) {
        linear_bias(y, x, p->w1, p->b1, N, I, O);
        return;
    }
    float *h1 = cache, *a = cache + N * O;
    linear_bias(h1, x, p->w1, p->b1, N, I, O);
    tk_gelu_forward(a, h1, N * O, TK_GELU_ERF);
    linear_bias(y, a, p->w2, p->b2, N, O, O);
}

/* forward: h1 = x W1^T + b1;  a = gelu(h1);  y = a W2^T + b2   (linear: y = x W1^T + b1).
 *   dW2 += dy^T a;  db2 += sum_n dy;  da = dy W2;  dh1 = da * gelu'(h1)
 *   dW1 += dh1^T x;  db1 += sum_n dh1;  dx += dh1 W1 */
void tk_projector_backward(tk_projector *p, float *dx, float *cache, const float *dy, const float *x,
                           size_t N) {
    size_t I = p->in, O = p->out;
    const float *dh1 = dy;
    if (p->kind == TK_PROJ_MLP2X_GELU) {
        const float *h1 = cache, *a = cache + N * O;
        float *da = cache + 2 * N * O, *dh = cache + 3 * N * O;
        if (p->db2) bias_backward(p->db2, dy, N, O);
        memset(da, 0, N * O * sizeof(float));
        tk_linear_backward(da, p->dw2, dy, a, p->w2, N, O, O);
        memset(dh, 0, N * O * sizeof(float));
        tk_gelu_backward(dh, da, h1, N * O, TK_GELU_ERF);
        dh1 = dh;
    }
    if (p->db1) bias_backward(p->db1, dh1, N, O);
    tk_linear_backward(dx, p->dw1, dh1, x, p->w1, N, I, O);
}
