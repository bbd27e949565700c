/* gatereport.c: reading the gate logs, the summary and the pictures (gatereport.h).
 *
 * Shapes: S logged steps, M modules, K = TK_GATELOG_NKIND token kinds, NB = TK_GATELOG_NBIN bins.
 */
#include "gatereport.h"

#include "../peft/peft_config.h"
#include "svg.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define K TK_GATELOG_NKIND
#define NB TK_GATELOG_NBIN

const char *const tk_gate_kind_names[K] = {"prompt", "response", "image", "other"};

void tk_gaterun_free(tk_gaterun *r) {
    if (!r) return;
    for (size_t i = 0; i < r->M && r->names; i++) free(r->names[i]);
    free(r->names);
    free(r->layer);
    free(r->proj);
    free(r->step);
    free(r->n);
    free(r->n_tower);
    free(r->tau);
    free(r->lambda);
    free(r->kept);
    free(r->q);
    free(r->hist);
    free(r->train);
    free(r->view_ids);
    free(r->view_kept);
    free(r->view_kind);
    free(r);
}

/* ---- reading ---------------------------------------------------------------------------------- */

typedef struct {
    const char *path;
    size_t line;
    tk_err *err;
} where;

static int bad(where *w, const char *what) { return tk_fail(w->err, "%s: line %zu: %s", w->path, w->line, what); }

/* A JSON array of exactly n numbers (null -> NAN when allow_null) into out[n]. */
static int num_array(where *w, const cJSON *a, size_t n, double *out, int allow_null, const char *key) {
    char msg[160];
    if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != n) {
        snprintf(msg, sizeof msg, "\"%s\" must be a list of %zu numbers", key, n);
        return bad(w, msg);
    }
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (cJSON_IsNumber(e) && isfinite(e->valuedouble)) out[i++] = e->valuedouble;
        else if (allow_null && cJSON_IsNull(e)) out[i++] = NAN;
        else {
            snprintf(msg, sizeof msg, "\"%s\" entry %zu is not a number", key, i);
            return bad(w, msg);
        }
    }
    return 0;
}

/* A list of M lists of n numbers (an entry may be null when allow_null: n NANs). */
static int nested(where *w, const cJSON *a, size_t M, size_t n, double *out, int allow_null, const char *key) {
    char msg[160];
    if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != M) {
        snprintf(msg, sizeof msg, "\"%s\" must be a list of %zu entries (one per module)", key, M);
        return bad(w, msg);
    }
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (allow_null && cJSON_IsNull(e)) {
            for (size_t j = 0; j < n; j++) out[i * n + j] = NAN;
        } else if (num_array(w, e, n, out + i * n, 0, key)) {
            return -1;
        }
        i++;
    }
    return 0;
}

static const cJSON *get(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

/* Calls fn on every non-empty line of path; a missing file is not an error when optional (*found 0). */
static int each_line(const char *path, int optional, int *found, int (*fn)(void *, where *, const cJSON *), void *ctx,
                     tk_err *err) {
    struct stat st;
    *found = 0;
    if (optional && stat(path, &st) != 0 && errno == ENOENT) return 0;
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    *found = 1;
    where w = {path, 0, err};
    int rc = 0;
    for (char *line = text, *next; line && rc == 0; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        w.line++;
        if (!*line) continue;
        if (!next) break; /* an unterminated last line is a write cut short by a kill: skipped */
        cJSON *o = cJSON_Parse(line);
        if (!o || !cJSON_IsObject(o)) rc = bad(&w, "not a JSON object");
        else rc = fn(ctx, &w, o);
        cJSON_Delete(o);
    }
    free(text);
    return rc;
}

typedef struct {
    tk_gaterun *r;
    size_t cap;
    int have_header;
} gates_ctx;

static int grow(void **p, size_t elems, size_t size) {
    void *q = realloc(*p, elems * size);
    if (!q) return -1;
    *p = q;
    return 0;
}

const char *tk_gaterun_proj_name(int p) {
    static const char *const tower[TK_VIT_NPROJ] = {"v.q_proj", "v.k_proj", "v.v_proj", "v.out_proj", "v.fc1", "v.fc2"};
    if (p >= 0 && p < TK_NPROJ) return tk_proj_short[p];
    if (p >= TK_NPROJ && p < TK_NPROJ + TK_VIT_NPROJ) return tower[p - TK_NPROJ];
    return "?";
}

/* A vision tower module name (gatelog.h): 1 with *layer, *proj = TK_NPROJ + j. */
static int tower_module(const char *name, int *layer, int *proj) {
    int j;
    if (!tk_gatelog_tower_module(name, layer, &j)) return 0;
    *proj = TK_NPROJ + j;
    return 1;
}

const double *tk_gaterun_seen(const tk_gaterun *r, size_t s, size_t m) {
    return (r->proj[m] >= TK_NPROJ ? r->n_tower : r->n) + s * K;
}

static int gates_line(void *vc, where *w, const cJSON *o) {
    gates_ctx *c = vc;
    tk_gaterun *r = c->r;
    const cJSON *fmt = get(o, "format");
    if (fmt) {
        if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "tspeft-gates") != 0)
            return bad(w, "\"format\" is not \"tspeft-gates\"");
        if (c->have_header) return 0; /* a resumed run may repeat the header: it must be the same run */
        const cJSON *ver = get(o, "version"), *mods = get(o, "modules"), *nl = get(o, "n_layers");
        if (!cJSON_IsNumber(ver) || ver->valueint != TK_GATELOG_VERSION) return bad(w, "unsupported \"version\"");
        if (!cJSON_IsArray(mods) || cJSON_GetArraySize(mods) < 1 || (size_t)cJSON_GetArraySize(mods) > TK_GATELOG_MAX_MODULES)
            return bad(w, "\"modules\" must be a non-empty list of module names");
        const cJSON *tl = get(o, "tower_layers");
        if (tl && (!cJSON_IsNumber(tl) || tl->valuedouble < 0 || tl->valuedouble > TK_MAX_LAYERS))
            return bad(w, "\"tower_layers\" must be a layer count");
        r->tower_layers = tl ? tl->valueint : 0;
        if (!cJSON_IsNumber(nl) || nl->valuedouble < (r->tower_layers ? 0 : 1) || nl->valuedouble > TK_MAX_LAYERS)
            return bad(w, "\"n_layers\" must be a layer count");
        r->n_layers = nl->valueint;
        r->M = (size_t)cJSON_GetArraySize(mods);
        r->names = calloc(r->M, sizeof *r->names);
        r->layer = calloc(r->M, sizeof *r->layer);
        r->proj = calloc(r->M, sizeof *r->proj);
        if (!r->names || !r->layer || !r->proj) return tk_fail(w->err, "out of memory");
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, mods) {
            int l = -1, p = -1;
            char blk[16], pr[16];
            if (cJSON_IsString(e) && tower_module(e->valuestring, &l, &p)) {
                if (l >= (r->tower_layers ? r->tower_layers : r->n_layers))
                    return bad(w, "a vision tower module's layer is past \"tower_layers\"");
            } else if (!cJSON_IsString(e) ||
                       sscanf(e->valuestring, "model.layers.%d.%15[a-z_].%15[a-z_]", &l, blk, pr) != 3 ||
                       (p = tk_proj_parse(pr)) < 0 || l < 0 || l >= r->n_layers)
                return bad(w, "a \"modules\" entry is not model.layers.L.<block>.<proj> (or a vision tower module, "
                              "vision_model.encoder.layers.L.<block>.<proj>) of this model");
            r->layer[i] = l;
            r->proj[i] = p;
            r->M_tower += p >= TK_NPROJ;
            if (!(r->names[i] = strdup(e->valuestring))) return tk_fail(w->err, "out of memory");
            i++;
        }
        const cJSON *g = get(o, "gated"), *tk = get(o, "target_keep");
        r->gated = cJSON_IsTrue(g);
        r->target_keep = cJSON_IsNumber(tk) ? tk->valuedouble : 0.0;
        r->with_lambda = r->target_keep > 0.0;
        c->have_header = 1;
        return 0;
    }
    if (!c->have_header) return bad(w, "a step line before the header line");
    const cJSON *st = get(o, "step");
    if (!cJSON_IsNumber(st) || st->valuedouble < 0 || st->valuedouble > 2e9) return bad(w, "\"step\" must be a step number");
    size_t M = r->M;
    if (r->S == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 64;
        if (grow((void **)&r->step, cap, sizeof(int)) || grow((void **)&r->n, cap * K, sizeof(double)) ||
            grow((void **)&r->n_tower, cap * K, sizeof(double)) ||
            grow((void **)&r->tau, cap * M, sizeof(double)) || grow((void **)&r->lambda, cap * M, sizeof(double)) ||
            grow((void **)&r->kept, cap * M * K, sizeof(double)) || grow((void **)&r->q, cap * M * 3, sizeof(double)) ||
            grow((void **)&r->hist, cap * M * NB, sizeof(double)))
            return tk_fail(w->err, "out of memory");
        c->cap = cap;
    }
    size_t s = r->S;
    r->step[s] = st->valueint;
    const cJSON *ntw = get(o, "n_tower");
    if (ntw && !r->M_tower) return bad(w, "\"n_tower\" in a log without vision tower modules");
    if (num_array(w, get(o, "n"), K, r->n + s * K, 0, "n") ||
        (ntw && num_array(w, ntw, K, r->n_tower + s * K, 0, "n_tower")) ||
        num_array(w, get(o, "tau"), M, r->tau + s * M, 0, "tau") ||
        nested(w, get(o, "kept"), M, K, r->kept + s * M * K, 0, "kept") ||
        nested(w, get(o, "q"), M, 3, r->q + s * M * 3, 1, "q") ||
        nested(w, get(o, "hist"), M, NB, r->hist + s * M * NB, 0, "hist"))
        return -1;
    if (r->with_lambda) {
        if (num_array(w, get(o, "lambda"), M, r->lambda + s * M, 0, "lambda")) return -1;
    } else {
        for (size_t k = 0; k < M; k++) r->lambda[s * M + k] = NAN;
    }
    if (ntw) {
        for (int j = 0; j < K; j++)
            if (r->n_tower[s * K + j] < 0) return bad(w, "\"n_tower\" entries must be token counts");
        r->has_n_tower = 1;
    } else { /* every module counts "n" (a log without tower modules, or a tower-only one) */
        memcpy(r->n_tower + s * K, r->n + s * K, K * sizeof(double));
    }
    for (size_t k = 0; k < M; k++) {
        const double *seen = tk_gaterun_seen(r, s, k);
        for (int j = 0; j < K; j++)
            if (r->kept[(s * M + k) * K + j] > seen[j] || r->kept[(s * M + k) * K + j] < 0)
                return bad(w, ntw && r->proj[k] >= TK_NPROJ
                                  ? "a vision tower module's \"kept\" count exceeds the step's \"n_tower\""
                                  : "a \"kept\" count exceeds the step's token count");
    }
    r->S++;
    return 0;
}

typedef struct {
    tk_gaterun *r;
    size_t cap;
} train_ctx;

static int train_line(void *vc, where *w, const cJSON *o) {
    train_ctx *c = vc;
    tk_gaterun *r = c->r;
    if (r->n_train == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 64;
        if (grow((void **)&r->train, c->cap, sizeof *r->train)) return tk_fail(w->err, "out of memory");
    }
    static const char *const keys[6] = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "keep"};
    double v[6];
    for (int i = 0; i < 6; i++) {
        const cJSON *e = get(o, keys[i]);
        if (!cJSON_IsNumber(e)) {
            char msg[96];
            snprintf(msg, sizeof msg, "\"%s\" must be a number", keys[i]);
            return bad(w, msg);
        }
        v[i] = e->valuedouble;
    }
    tk_train_rec *t = &r->train[r->n_train++];
    t->step = (int)v[0];
    t->loss = v[1];
    t->lr = v[2];
    t->grad_norm = v[3];
    t->tokens_per_s = v[4];
    t->keep = v[5];
    return 0;
}

static int tokens_line(void *vc, where *w, const cJSON *o) {
    tk_gaterun *r = vc;
    const cJSON *ids = get(o, "ids"), *kept = get(o, "kept"), *kinds = get(o, "kinds"), *st = get(o, "step"),
                *nm = get(o, "n_modules");
    if (!cJSON_IsArray(ids) || !cJSON_IsArray(kept) || cJSON_GetArraySize(ids) != cJSON_GetArraySize(kept) ||
        !cJSON_IsNumber(st) || !cJSON_IsNumber(nm) || nm->valuedouble < 0)
        return bad(w, "expected step, n_modules and lists \"ids\" and \"kept\" of one length");
    size_t n = (size_t)cJSON_GetArraySize(ids);
    if (kinds && !cJSON_IsNull(kinds) && (!cJSON_IsArray(kinds) || (size_t)cJSON_GetArraySize(kinds) != n))
        return bad(w, "\"kinds\" must be null or a list as long as \"ids\"");
    int *a = malloc((n ? n : 1) * sizeof(int)), *b = malloc((n ? n : 1) * sizeof(int)), *c = malloc((n ? n : 1) * sizeof(int));
    if (!a || !b || !c) {
        free(a);
        free(b);
        free(c);
        return tk_fail(w->err, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        const cJSON *x = cJSON_GetArrayItem(ids, (int)i), *y = cJSON_GetArrayItem(kept, (int)i);
        const cJSON *z = kinds && cJSON_IsArray(kinds) ? cJSON_GetArrayItem(kinds, (int)i) : NULL;
        if (!cJSON_IsNumber(x) || !cJSON_IsNumber(y) || y->valuedouble < 0 || y->valuedouble > nm->valuedouble) {
            free(a);
            free(b);
            free(c);
            return bad(w, "\"ids\" and \"kept\" entries must be numbers (kept <= n_modules)");
        }
        a[i] = x->valueint;
        b[i] = y->valueint;
        c[i] = -1;
        for (int j = 0; z && cJSON_IsString(z) && j < K; j++)
            if (strcmp(z->valuestring, tk_gate_kind_names[j]) == 0) c[i] = j;
    }
    free(r->view_ids);
    free(r->view_kept);
    free(r->view_kind);
    r->view_ids = a;
    r->view_kept = b;
    r->view_kind = c;
    r->view_len = n;
    r->view_step = st->valueint;
    r->view_modules = (size_t)nm->valuedouble;
    return 0;
}

/* Rows [S, w] of a: the rows listed in idx[0..n), in that order (a new block replaces *a). */
static int pick_rows(double **a, size_t w, const size_t *idx, size_t n) {
    double *b = malloc((n ? n : 1) * w * sizeof(double));
    if (!b) return -1;
    for (size_t i = 0; i < n; i++) memcpy(b + i * w, *a + idx[i] * w, w * sizeof(double));
    free(*a);
    *a = b;
    return 0;
}

/* Keeps the last line of each step (a resumed run re-logs steps after its checkpoint), in ascending
 * step order. */
static int dedupe_steps(tk_gaterun *r, tk_err *err) {
    size_t M = r->M, n = 0;
    size_t *idx = malloc((r->S ? r->S : 1) * sizeof *idx);
    int *steps = malloc((r->S ? r->S : 1) * sizeof *steps);
    if (!idx || !steps) {
        free(idx);
        free(steps);
        return tk_fail(err, "out of memory");
    }
    for (size_t s = 0; s < r->S; s++) {
        int later = 0;
        for (size_t t = s + 1; t < r->S && !later; t++) later = r->step[t] == r->step[s];
        if (later) continue;
        size_t pos = n++; /* insertion by step */
        while (pos > 0 && r->step[idx[pos - 1]] > r->step[s]) {
            idx[pos] = idx[pos - 1];
            pos--;
        }
        idx[pos] = s;
    }
    for (size_t i = 0; i < n; i++) steps[i] = r->step[idx[i]];
    int rc = pick_rows(&r->n, K, idx, n) || pick_rows(&r->n_tower, K, idx, n) || pick_rows(&r->tau, M, idx, n) || pick_rows(&r->lambda, M, idx, n) ||
             pick_rows(&r->kept, M * K, idx, n) || pick_rows(&r->q, M * 3, idx, n) || pick_rows(&r->hist, M * NB, idx, n);
    free(idx);
    free(r->step);
    r->step = steps;
    r->S = n;
    if (rc) return tk_fail(err, "out of memory");
    size_t nt = 0; /* the training log the same way */
    for (size_t i = 0; i < r->n_train; i++) {
        int later = 0;
        for (size_t j = i + 1; j < r->n_train && !later; j++) later = r->train[j].step == r->train[i].step;
        if (later) continue;
        tk_train_rec t = r->train[i];
        size_t pos = nt++;
        while (pos > 0 && r->train[pos - 1].step > t.step) {
            r->train[pos] = r->train[pos - 1];
            pos--;
        }
        r->train[pos] = t;
    }
    r->n_train = nt;
    return 0;
}

tk_gaterun *tk_gaterun_load(const char *run_dir, tk_err *err) {
    tk_gaterun *r = calloc(1, sizeof *r);
    if (!r) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    char path[4200];
    int found;
    gates_ctx gc = {r, 0, 0};
    train_ctx tc = {r, 0};
    if (tk_pathf(path, sizeof path, err, "%s/gates.jsonl", run_dir) || each_line(path, 0, &found, gates_line, &gc, err))
        goto fail;
    if (!gc.have_header) {
        tk_fail(err, "%s: empty (no header line): was the run trained with --gate-log off or without adapters?", path);
        goto fail;
    }
    if (tk_pathf(path, sizeof path, err, "%s/train_log.jsonl", run_dir) || each_line(path, 1, &found, train_line, &tc, err))
        goto fail;
    if (tk_pathf(path, sizeof path, err, "%s/tokens.jsonl", run_dir) || each_line(path, 1, &found, tokens_line, r, err))
        goto fail;
    if (dedupe_steps(r, err)) goto fail;
    return r;
fail:
    tk_gaterun_free(r);
    return NULL;
}

/* ---- the summary ------------------------------------------------------------------------------ */

void tk_gatesum_free(tk_gatesum *s) {
    if (!s) return;
    free(s->keep);
    free(s->keep_kind);
    free(s->tau);
    free(s->q);
    free(s->order);
    free(s->kind_spread);
    memset(s, 0, sizeof *s);
}

int tk_gatesum_compute(tk_gatesum *s, const tk_gaterun *r, int window, tk_err *err) {
    memset(s, 0, sizeof *s);
    size_t M = r->M, S = r->S;
    s->keep = calloc(M, sizeof(double));
    s->keep_kind = calloc(M * K, sizeof(double));
    s->tau = calloc(M, sizeof(double));
    s->q = calloc(M * 3, sizeof(double));
    s->order = calloc(M, sizeof(size_t));
    s->kind_spread = calloc(M, sizeof(double));
    double *kept_win = calloc(M * K, sizeof(double)); /* [M,K] window sums */
    double *seen_win = calloc(M * K, sizeof(double)); /* [M,K] the tokens each module saw in the window */
    if (!s->keep || !s->keep_kind || !s->tau || !s->q || !s->order || !s->kind_spread || !kept_win || !seen_win) {
        free(kept_win);
        free(seen_win);
        tk_gatesum_free(s);
        return tk_fail(err, "out of memory");
    }
    size_t w = window <= 0 || (size_t)window > S ? S : (size_t)window, s0 = S - w;
    s->window = (int)w;
    s->first_step = S ? r->step[s0] : 0;
    s->last_step = S ? r->step[S - 1] : 0;
    for (size_t t = s0; t < S; t++)
        for (int j = 0; j < K; j++) {
            s->kind_tokens[j] += r->n[t * K + j];
            if (r->has_n_tower) s->tower_tokens[j] += r->n_tower[t * K + j];
        }
    /* every module with its own tokens: kept / seen sums over modules and kinds */
    double kept_all = 0, seen_all = 0, kept_w = 0, seen_w = 0;
    double kk[K] = {0}, kn[K] = {0}, tk[K] = {0}, tn[K] = {0}; /* by kind: modules counting "n", the tower's */
    for (size_t m = 0; m < M; m++) {
        int own = r->has_n_tower && r->proj[m] >= TK_NPROJ;
        double kept = 0, seen = 0, *kj = kept_win + m * K, *nj = seen_win + m * K;
        for (size_t t = 0; t < S; t++) {
            const double *n = tk_gaterun_seen(r, t, m);
            for (int j = 0; j < K; j++) {
                double v = r->kept[(t * M + m) * K + j];
                kept_all += v;
                seen_all += n[j];
                if (t >= s0) {
                    kept += v;
                    seen += n[j];
                    kj[j] += v;
                    nj[j] += n[j];
                }
            }
        }
        kept_w += kept;
        seen_w += seen;
        for (int j = 0; j < K; j++) {
            *(own ? &tk[j] : &kk[j]) += kj[j];
            *(own ? &tn[j] : &kn[j]) += nj[j];
        }
        s->keep[m] = seen > 0 ? kept / seen : NAN;
        for (int j = 0; j < K; j++) s->keep_kind[m * K + j] = nj[j] > 0 ? kj[j] / nj[j] : NAN;
        s->tau[m] = S ? r->tau[(S - 1) * M + m] : NAN;
        for (int j = 0; j < 3; j++) s->q[m * 3 + j] = S ? r->q[((S - 1) * M + m) * 3 + j] : NAN;
        s->order[m] = m;
    }
    for (int j = 0; j < K; j++) {
        s->kind_keep[j] = kn[j] > 0 ? kk[j] / kn[j] : NAN;
        s->tower_keep[j] = tn[j] > 0 ? tk[j] / tn[j] : NAN;
    }
    s->keep_window = seen_w > 0 ? kept_w / seen_w : NAN;
    s->discarded_run = seen_all > 0 ? 1.0 - kept_all / seen_all : NAN;
    s->discarded_window = seen_w > 0 ? 1.0 - kept_w / seen_w : NAN;
    tk_gatesel_compute_own(&s->sel, seen_win, kept_win, M, s->kind_spread);
    free(kept_win);
    free(seen_win);
    s->sel.gated = r->gated;
    s->sel.steps = s->window;
    s->sel.first_step = s->first_step;
    s->sel.last_step = s->last_step;
    for (size_t i = 1; i < M; i++) { /* by keep, descending; ties in module order (insertion sort: stable) */
        size_t m = s->order[i], pos = i;
        double km = isnan(s->keep[m]) ? -1.0 : s->keep[m];
        while (pos > 0) {
            size_t o = s->order[pos - 1];
            if ((isnan(s->keep[o]) ? -1.0 : s->keep[o]) >= km) break;
            s->order[pos] = o;
            pos--;
        }
        s->order[pos] = m;
    }
    return 0;
}

/* ---- pictures --------------------------------------------------------------------------------- */

static int save(tk_svg *svg, const char *dir, const char *name, int *n_written, tk_err *err) {
    char path[4200];
    if (tk_pathf(path, sizeof path, err, "%s/%s", dir, name)) {
        tk_svg_free(svg);
        return -1;
    }
    if (tk_svg_save(svg, path, err)) return -1;
    (*n_written)++;
    return 0;
}

static const char *short_name(const tk_gaterun *r, size_t m) {
    return strncmp(r->names[m], "model.", 6) == 0 ? r->names[m] + strlen("model.") : r->names[m];
}

/* The pictures' grids: the LLaMA's (layer x projection) and, under it, the vision tower's (tower layer
 * x tower projection) when the log has tower modules. A log of tower modules only has the tower's. */
typedef struct {
    int p0, np;   /* projections p0 .. p0 + np - 1 (tk_gaterun's proj numbering) */
    int rows;     /* layers */
    int tower;
} grid;

static int grids(const tk_gaterun *r, grid g[2]) {
    int n = 0, tower_rows = r->tower_layers;
    for (size_t m = 0; m < r->M; m++)
        if (r->proj[m] >= TK_NPROJ && r->layer[m] >= tower_rows && !r->tower_layers) tower_rows = r->layer[m] + 1;
    if (r->M_tower < r->M || !r->M_tower) g[n++] = (grid){0, TK_NPROJ, r->n_layers, 0};
    if (r->M_tower) g[n++] = (grid){TK_NPROJ, TK_VIT_NPROJ, tower_rows, 1};
    return n;
}

/* The grid of module m (0 or 1 of grids()'s). */
static int grid_of(const tk_gaterun *r, const grid *g, int n, size_t m) {
    return n > 1 && r->proj[m] >= TK_NPROJ ? 1 : 0;
}

/* The tower's projection labels ("q_proj", ..., "fc2") above its grid. */
static const char *grid_proj_label(const grid *g, int i) {
    return g->tower ? strchr(tk_vit_proj_full[i], '.') + 1 : tk_proj_short[g->p0 + i];
}

/* Layer x projection grid of keep ratios for kind column j (-1: all tokens); the tower's grid under
 * the LLaMA's. */
static int plot_heatmap(const tk_gaterun *r, const tk_gatesum *s, int j, const char *dir, int *nw, tk_err *err) {
    grid g[2];
    int ng = grids(r, g), rows = 0;
    for (int i = 0; i < ng; i++) rows += g[i].rows;
    const double cw = 64, ch = rows > 24 ? 16 : 22, left = 70, top = 72, block_gap = 48;
    double y0[2] = {top, top};
    if (ng > 1) y0[1] = top + g[0].rows * ch + block_gap;
    double bottom = y0[ng - 1] + g[ng - 1].rows * ch;
    double W = left + TK_NPROJ * cw + 110, H = bottom + 50;
    tk_svg *svg = tk_svg_open(W, H);
    tk_svg_text(svg, W / 2, 22, 15, "middle", "Keep ratio per module, %s tokens", j < 0 ? "all" : tk_gate_kind_names[j]);
    tk_svg_text(svg, W / 2, 40, 11, "middle", "mean over logged steps %d-%d (%d steps)", s->first_step, s->last_step,
                s->window);
    for (int i = 0; i < ng; i++) {
        if (g[i].tower)
            tk_svg_text(svg, left, y0[i] - 22, 12, "start", "vision tower (%d layers)%s", g[i].rows,
                        r->has_n_tower ? ": keep of its own image tokens" : "");
        for (int p = 0; p < g[i].np; p++)
            tk_svg_text(svg, left + (p + 0.5) * cw, y0[i] - 6, 11, "middle", "%s", grid_proj_label(&g[i], p));
        for (int l = 0; l < g[i].rows; l++) {
            tk_svg_text(svg, left - 8, y0[i] + (l + 0.5) * ch + 4, 11, "end", "layer %d", l);
            for (int p = 0; p < g[i].np; p++)
                tk_svg_rect(svg, left + p * cw + 1, y0[i] + l * ch + 1, cw - 2, ch - 2, "#f0f0f0", "empty", NULL);
        }
    }
    for (size_t m = 0; m < r->M; m++) {
        int gi = grid_of(r, g, ng, m);
        if (r->proj[m] < g[gi].p0 || r->proj[m] >= g[gi].p0 + g[gi].np) continue;
        double v = j < 0 ? s->keep[m] : s->keep_kind[m * K + j];
        char col[8], title[160];
        tk_svg_color(isnan(v) ? 0 : v, col);
        snprintf(title, sizeof title, "%s: keep %.3f, tau %.4g", short_name(r, m), v, s->tau[m]);
        double x = left + (r->proj[m] - g[gi].p0) * cw + 1, y = y0[gi] + r->layer[m] * ch + 1;
        tk_svg_rect(svg, x, y, cw - 2, ch - 2, isnan(v) ? "#f0f0f0" : col, "cell", title);
        if (ch >= 18 && !isnan(v)) {
            char txt[400];
            snprintf(txt, sizeof txt, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"middle\" fill=\"%s\">%.2f</text>\n",
                     x + (cw - 2) / 2, y + (ch - 2) / 2 + 3.5, v > 0.6 ? "#000000" : "#ffffff", v);
            tk_svg_raw(svg, txt);
        }
    }
    /* colour bar */
    double bx = left + TK_NPROJ * cw + 30, by = top, bh = bottom - top;
    for (int i = 0; i < 50; i++) {
        char col[8];
        tk_svg_color(1.0 - (i + 0.5) / 50.0, col);
        tk_svg_rect(svg, bx, by + i * bh / 50.0, 16, bh / 50.0 + 0.5, col, "legend", NULL);
    }
    tk_svg_text(svg, bx + 22, by + 8, 10, "start", "1.0");
    tk_svg_text(svg, bx + 22, by + bh / 2 + 3, 10, "start", "0.5");
    tk_svg_text(svg, bx + 22, by + bh, 10, "start", "0.0");
    tk_svg_text(svg, left + TK_NPROJ * cw / 2, H - 16, 11, "middle", "grey: no adapter, or no tokens of this kind");
    char name[64];
    snprintf(name, sizeof name, j < 0 ? "keep_heatmap.svg" : "keep_heatmap_%s.svg", j < 0 ? "" : tk_gate_kind_names[j]);
    return save(svg, dir, name, nw, err);
}

/* tau over the logged steps, one line per module, coloured by projection. */
static int plot_tau(const tk_gaterun *r, const char *dir, int *nw, tk_err *err) {
    double W = 760, H = 420;
    tk_svg_box b = {80, 50, 520, 310, 0, 1, 0, 1, 0};
    double tmax = 0;
    for (size_t i = 0; i < r->S * r->M; i++) tmax = fmax(tmax, r->tau[i]);
    b.x0 = r->S ? r->step[0] : 0;
    b.x1 = r->S ? r->step[r->S - 1] : 1;
    if (b.x1 <= b.x0) b.x1 = b.x0 + 1;
    b.y1 = tmax > 0 ? tmax * 1.05 : 1.0;
    tk_svg *svg = tk_svg_open(W, H);
    tk_svg_text(svg, W / 2, 24, 15, "middle", "Threshold tau per module over training (%zu modules)", r->M);
    tk_svg_axes(svg, &b, "optimizer step", "tau");
    double *xs = malloc((r->S ? r->S : 1) * sizeof(double)), *ys = malloc((r->S ? r->S : 1) * sizeof(double));
    if (!xs || !ys) {
        free(xs);
        free(ys);
        tk_svg_free(svg);
        return tk_fail(err, "out of memory");
    }
    for (size_t m = 0; m < r->M; m++) {
        for (size_t t = 0; t < r->S; t++) {
            xs[t] = tk_svg_px(&b, r->step[t]);
            ys[t] = tk_svg_py(&b, r->tau[t * r->M + m]);
        }
        char title[160];
        snprintf(title, sizeof title, "%s (final tau %.4g)", short_name(r, m), r->S ? r->tau[(r->S - 1) * r->M + m] : 0.0);
        if (r->proj[m] < TK_NPROJ)
            tk_svg_polyline(svg, xs, ys, r->S, tk_svg_series_color((size_t)r->proj[m]), 1.2, "series", title);
        else /* the tower's: dashed, coloured by the tower projection */
            tk_svg_polyline_dashed(svg, xs, ys, r->S, tk_svg_series_color((size_t)(r->proj[m] - TK_NPROJ)), 1.2, "5,3",
                                   "series", title);
    }
    free(xs);
    free(ys);
    double ly = b.y + 10; /* legend: the LLaMA's projections, then the tower's */
    if (r->M_tower < r->M || !r->M_tower)
        for (int p = 0; p < TK_NPROJ; p++, ly += 18) {
            tk_svg_line(svg, b.x + b.w + 20, ly, b.x + b.w + 44, ly, tk_svg_series_color((size_t)p), 2.5, "legend");
            tk_svg_text(svg, b.x + b.w + 50, ly + 4, 11, "start", "%s", tk_proj_short[p]);
        }
    if (r->M_tower) {
        tk_svg_text(svg, b.x + b.w + 20, ly + 4, 11, "start", "vision tower (dashed):");
        ly += 18;
        for (int j = 0; j < TK_VIT_NPROJ; j++, ly += 18) {
            double lx[2] = {b.x + b.w + 20, b.x + b.w + 44}, lyy[2] = {ly, ly};
            tk_svg_polyline_dashed(svg, lx, lyy, 2, tk_svg_series_color((size_t)j), 2.5, "5,3", "legend", NULL);
            tk_svg_text(svg, b.x + b.w + 50, ly + 4, 11, "start", "%s", strchr(tk_vit_proj_full[j], '.') + 1);
        }
    }
    tk_svg_text(svg, b.x + b.w + 20, ly + 8, 10, "start", "one line per layer");
    return save(svg, dir, "tau.svg", nw, err);
}

/* Small multiples: the window's histogram of r per module (log x), final tau marked. */
static int plot_hist(const tk_gaterun *r, const tk_gatesum *s, const char *dir, int *nw, tk_err *err) {
    const double pw = 150, ph = 70, gap = 14, left = 70, top = 60, block_gap = 44;
    grid g[2];
    int ng = grids(r, g);
    double y0[2] = {top, top};
    if (ng > 1) y0[1] = top + g[0].rows * (ph + gap) + block_gap;
    double W = left + TK_NPROJ * (pw + gap) + 20, H = y0[ng - 1] + g[ng - 1].rows * (ph + gap) + 50;
    tk_svg *svg = tk_svg_open(W, H);
    tk_svg_text(svg, W / 2, 22, 15, "middle", "Relative update size r = |m| / |W0 x| per module (log scale), tau in red");
    tk_svg_text(svg, W / 2, 40, 11, "middle",
                "token counts over logged steps %d-%d; x from 1e-5 to 1e3, first bar r < 1e-4, last r >= 100",
                s->first_step, s->last_step);
    for (int i = 0; i < ng; i++) {
        if (g[i].tower) tk_svg_text(svg, left, y0[i] - 22, 12, "start", "vision tower (%d layers)", g[i].rows);
        for (int p = 0; p < g[i].np; p++)
            tk_svg_text(svg, left + p * (pw + gap) + pw / 2, y0[i] - 6, 11, "middle", "%s", grid_proj_label(&g[i], p));
        for (int l = 0; l < g[i].rows; l++)
            tk_svg_text(svg, left - 8, y0[i] + l * (ph + gap) + ph / 2 + 4, 11, "end", "layer %d", l);
    }
    size_t s0 = r->S - (size_t)s->window;
    for (size_t m = 0; m < r->M; m++) {
        int gi = grid_of(r, g, ng, m), rows = g[gi].rows;
        if (r->proj[m] < g[gi].p0 || r->proj[m] >= g[gi].p0 + g[gi].np) continue;
        tk_svg_box b = {left + (r->proj[m] - g[gi].p0) * (pw + gap), y0[gi] + r->layer[m] * (ph + gap), pw, ph, 1e-5, 1e3,
                        0, 1, 1};
        double h[NB] = {0}, hmax = 0;
        for (size_t t = s0; t < r->S; t++)
            for (int j = 0; j < NB; j++) h[j] += r->hist[(t * r->M + m) * NB + j];
        for (int j = 0; j < NB; j++) hmax = fmax(hmax, h[j]);
        tk_svg_rect(svg, b.x, b.y, b.w, b.h, "#fafafa", "panel", NULL);
        for (int j = 0; j < NB; j++) {
            double lo = j == 0 ? 1e-5 : tk_gatelog_bin_lo(j), hi = j == NB - 1 ? 1e3 : tk_gatelog_bin_lo(j + 1);
            double x0 = tk_svg_px(&b, lo), x1 = tk_svg_px(&b, hi), bh = hmax > 0 ? h[j] / hmax * (ph - 4) : 0;
            char title[160];
            snprintf(title, sizeof title, "%s: %.0f tokens with r in [%.3g, %.3g)", short_name(r, m), h[j], lo, hi);
            tk_svg_rect(svg, x0 + 0.3, b.y + ph - bh, x1 - x0 - 0.6, bh, "#4c78a8", "bar", title);
        }
        double tau = s->tau[m], tx = tau > 0 ? tk_svg_px(&b, tau < 1e-5 ? 1e-5 : tau > 1e3 ? 1e3 : tau) : b.x;
        for (int d = -4; d <= 2; d += 2) { /* decade ticks; labels under the last row */
            double px = tk_svg_px(&b, pow(10.0, d));
            tk_svg_line(svg, px, b.y + ph, px, b.y + ph + 3, "#888888", 1, "tick");
            if (r->layer[m] == rows - 1) tk_svg_text(svg, px, b.y + ph + 13, 9, "middle", "%s", d == 0 ? "1" : d == -4 ? "1e-4" : d == -2 ? "0.01" : "100");
        }
        tk_svg_line(svg, tx, b.y, tx, b.y + ph, "#d62728", 1.5, "tau");
        tk_svg_text(svg, b.x + pw - 2, b.y + 10, 9, "end", "keep %.2f", s->keep[m]);
    }
    return save(svg, dir, "r_hist.svg", nw, err);
}

/* The training loss and the overall keep ratio over the steps. */
static int plot_loss(const tk_gaterun *r, const char *dir, int *nw, tk_err *err) {
    double W = 760, H = 520;
    size_t n = r->n_train;
    tk_svg_box b = {80, 50, 620, 250, r->train[0].step, r->train[n - 1].step, 0, 1, 0};
    tk_svg_box k = {80, 360, 620, 110, b.x0, b.x1, 0, 1, 0};
    if (b.x1 <= b.x0) b.x1 = k.x1 = b.x0 + 1;
    double lmax = 0;
    for (size_t i = 0; i < n; i++) lmax = fmax(lmax, r->train[i].loss);
    b.y1 = lmax > 0 ? lmax * 1.05 : 1.0;
    tk_svg *svg = tk_svg_open(W, H);
    tk_svg_text(svg, W / 2, 24, 15, "middle", "Training loss and kept fraction of token updates");
    tk_svg_axes(svg, &b, NULL, "loss (mean over target tokens)");
    tk_svg_axes(svg, &k, "optimizer step", "keep");
    double *xs = malloc(n * sizeof(double)), *ys = malloc(n * sizeof(double)), *ks = malloc(n * sizeof(double));
    if (!xs || !ys || !ks) {
        free(xs);
        free(ys);
        free(ks);
        tk_svg_free(svg);
        return tk_fail(err, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        xs[i] = tk_svg_px(&b, r->train[i].step);
        ys[i] = tk_svg_py(&b, r->train[i].loss);
        ks[i] = tk_svg_py(&k, r->train[i].keep);
    }
    tk_svg_polyline(svg, xs, ys, n, "#1f77b4", 1.5, "loss", "loss");
    tk_svg_polyline(svg, xs, ks, n, "#2ca02c", 1.5, "keep", "kept fraction over all gated modules");
    free(xs);
    free(ys);
    free(ks);
    return save(svg, dir, "loss.svg", nw, err);
}

static void html_escape(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

/* One sample's tokens, each coloured by how many gated modules applied their update to it. */
static int write_tokens_html(const tk_gaterun *r, const char *dir, tk_piece_fn decode, void *ctx, int *nw, tk_err *err) {
    char path[4200], tmp[4300];
    if (tk_pathf(path, sizeof path, err, "%s/tokens.html", dir) || tk_pathf(tmp, sizeof tmp, err, "%s.tmp", path)) return -1;
    FILE *f = fopen(tmp, "w");
    if (!f) return tk_fail(err, "%s: cannot write: %s", tmp, strerror(errno));
    fprintf(f, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tspeft token view</title>\n<style>"
               "body{font-family:sans-serif;margin:2em;max-width:60em}"
               ".tok{display:inline-block;margin:2px;padding:2px 4px;border-radius:3px;font-family:monospace;"
               "border-bottom:3px solid transparent}"
               ".k-prompt{border-bottom-color:#999}.k-response{border-bottom-color:#d62728}.k-image{border-bottom-color:#9467bd}"
               "</style></head><body>\n<h2>Token view, step %d</h2>\n<p>Row 0 of the step's first micro-batch. "
               "Each token is coloured by the fraction of the %zu gated modules that applied their update to it "
               "(dark: few, yellow: all); hover for the count. Underline: grey prompt, red response, purple image.</p>\n<p>",
            r->view_step, r->view_modules);
    for (size_t i = 0; i < r->view_len; i++) {
        double frac = r->view_modules ? (double)r->view_kept[i] / (double)r->view_modules : 0;
        char col[8];
        tk_svg_color(frac, col);
        int kind = r->view_kind[i];
        fprintf(f, "<span class=\"tok%s%s\" style=\"background:%s;color:%s\" title=\"id %d: kept by %d of %zu modules%s%s\">",
                kind >= 0 ? " k-" : "", kind >= 0 ? tk_gate_kind_names[kind] : "", col, frac > 0.6 ? "#000" : "#fff",
                r->view_ids[i], r->view_kept[i], r->view_modules, kind >= 0 ? ", " : "",
                kind >= 0 ? tk_gate_kind_names[kind] : "");
        const char *piece = decode ? decode(ctx, r->view_ids[i]) : NULL;
        if (piece) html_escape(f, piece);
        else fprintf(f, "%d", r->view_ids[i]);
        fputs("</span>", f);
    }
    fputs("</p>\n<p>Scale: ", f);
    for (int i = 0; i <= 4; i++) {
        char col[8];
        tk_svg_color(i / 4.0, col);
        fprintf(f, "<span class=\"tok\" style=\"background:%s;color:%s\">%.0f%%</span>", col, i > 2 ? "#000" : "#fff", i * 25.0);
    }
    fputs("</p>\n</body></html>\n", f);
    int bad_write = ferror(f) != 0;
    if (fclose(f) != 0 || bad_write || rename(tmp, path) != 0) {
        remove(tmp);
        return tk_fail(err, "%s: write failed: %s", path, strerror(errno));
    }
    (*nw)++;
    return 0;
}

int tk_gaterun_plots(const tk_gaterun *r, const tk_gatesum *s, const char *out_dir, tk_piece_fn decode, void *ctx,
                     int *n_written, tk_err *err) {
    *n_written = 0;
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST) return tk_fail(err, "%s: cannot create directory: %s", out_dir, strerror(errno));
    if (plot_heatmap(r, s, -1, out_dir, n_written, err)) return -1;
    int kinds_present = 0;
    for (int j = 0; j < K; j++) kinds_present += s->kind_tokens[j] > 0;
    for (int j = 0; j < K && kinds_present > 1; j++)
        if (s->kind_tokens[j] > 0 && plot_heatmap(r, s, j, out_dir, n_written, err)) return -1;
    if (plot_tau(r, out_dir, n_written, err) || plot_hist(r, s, out_dir, n_written, err)) return -1;
    if (r->n_train > 0 && plot_loss(r, out_dir, n_written, err)) return -1;
    if (r->view_ids && write_tokens_html(r, out_dir, decode, ctx, n_written, err)) return -1;
    return 0;
}
