/* gatelog.c: the gate recorder (gatelog.h, docs/gates.md).
 *
 * Shapes: M adapted modules (the LLaMA's M_llm, then the vision tower's), K = TK_GATELOG_NKIND token
 * kinds, NB = TK_GATELOG_NBIN bins, B rows, T positions.
 */
#include "gatelog.h"

#include "../../datasets/shard.h"

#include <errno.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct tk_gatelog {
    FILE *gates, *train, *tokens;
    char dir[4096];
    size_t M;            /* every recorded module: the LLaMA's [0, M_llm), then the tower's */
    size_t M_llm;
    int *layer, *proj;   /* [M_llm] */
    tk_gatelog_tower tower; /* tower.n = M - M_llm modules (arrays borrowed from the caller) */
    int with_lambda;     /* target keep ratio: lambda is a dual variable worth logging */
    tk_gatelog_opts o;
    /* the step being accumulated */
    int step, open;
    int llm_seen;                   /* tk_gatelog_batch ran in the step (the LLaMA's tau were read) */
    uint64_t n[TK_GATELOG_NKIND];   /* [K] tokens seen per kind by the LLaMA's modules */
    uint64_t n_tower[TK_GATELOG_NKIND]; /* [K] rows seen by the tower's modules (all image) */
    uint64_t *kept;                 /* [M,K] */
    uint64_t *hist;                 /* [M,NB] */
    float *tau, *lambda;            /* [M] values applied in the step */
    float *scratch;                 /* [cap] selection buffer for the quantiles */
    size_t scratch_cap;
    uint16_t *view;                 /* [T] modules that kept each position of the token-view row */
    size_t view_cap;
    uint32_t *tok;                  /* [tok_cap] valid positions of the micro-batch */
    uint8_t *col;                   /* [tok_cap] their kind column */
    size_t tok_cap;
    char *line;                     /* [line_cap] the step line being built */
    size_t line_n, line_cap;
    int line_oom;
    double secs;                    /* time spent in the recorder */
    int finished;
};

static const char *const kind_names[TK_GATELOG_NKIND] = {"prompt", "response", "image", "other"};

static int kind_col(const uint8_t *kinds, size_t i) {
    if (!kinds) return 3;
    switch (kinds[i]) {
    case TK_KIND_PROMPT: return 0;
    case TK_KIND_RESPONSE: return 1;
    case TK_KIND_IMAGE: return 2;
    default: return 3;
    }
}

/* Lower edges of the bins: bin_lo[j] = 10^(-4 + (j-1)/4) for j >= 1 (bin j holds lo[j] <= r < lo[j+1]). */
static const double bin_lo[TK_GATELOG_NBIN] = {
    0, 0.0001, 0.00017782794100389227, 0.00031622776601683794, 0.0005623413251903491, 0.001, 0.0017782794100389228, 0.0031622776601683794, 0.005623413251903491,
    0.01, 0.017782794100389229, 0.031622776601683791, 0.056234132519034911, 0.10000000000000001, 0.17782794100389229, 0.31622776601683794, 0.56234132519034907,
    1, 1.7782794100389228, 3.1622776601683795, 5.6234132519034912, 10, 17.782794100389228, 31.622776601683793, 56.234132519034908, 100};
static const float bin_lo_f[TK_GATELOG_NBIN] = { /* the same edges as floats */
    0.0f, 0.0001f, 0.000177827941f, 0.000316227766f, 0.000562341325f, 0.001f, 0.00177827941f, 0.00316227766f, 0.00562341325f,
    0.01f, 0.0177827941f, 0.0316227766f, 0.0562341325f, 0.1f, 0.177827941f, 0.316227766f, 0.562341325f, 1.0f,
    1.77827941f, 3.16227766f, 5.62341325f, 10.0f, 17.7827941f, 31.6227766f, 56.2341325f, 100.0f};

/* A first guess from the float's exponent and mantissa (log2 r ~ e + f, off by < 0.09), then
 * corrected against the exact edges: no log10 per token. */
int tk_gatelog_bin(float r) {
    if (!(r >= bin_lo_f[1])) return 0; /* also NaN */
    if (r >= bin_lo_f[TK_GATELOG_NBIN - 1]) return TK_GATELOG_NBIN - 1;
    uint32_t u;
    memcpy(&u, &r, sizeof u);
    float l2 = (float)((int)((u >> 23) & 255) - 127) + (float)(u & 0x7fffff) * (1.0f / 8388608.0f);
    int j = 1 + (int)(4.0f * (l2 * 0.30103f + 4.0f));
    if (j < 1) j = 1;
    if (j > TK_GATELOG_NBIN - 2) j = TK_GATELOG_NBIN - 2;
    while (j < TK_GATELOG_NBIN - 2 && r >= bin_lo_f[j + 1]) j++;
    while (j > 1 && r < bin_lo_f[j]) j--;
    return j;
}

double tk_gatelog_bin_lo(int j) { return j <= 0 ? 0.0 : j >= TK_GATELOG_NBIN ? INFINITY : bin_lo[j]; }

/* Logs are written as NAME.part while the run goes on and renamed to NAME by tk_gatelog_finish, so a
 * run that fails leaves the logs of an earlier run in the directory untouched. With append (a resumed
 * run), NAME.part continues where it stopped, or starts as a copy of NAME. */
static FILE *open_log(tk_gatelog *g, const char *name, int *fresh, tk_err *err) {
    char path[4200], final[4200];
    if (tk_pathf(path, sizeof path, err, "%s/%s.part", g->dir, name) ||
        tk_pathf(final, sizeof final, err, "%s/%s", g->dir, name))
        return NULL;
    *fresh = 1;
    if (g->o.append) {
        struct stat st;
        if (stat(path, &st) == 0 && st.st_size > 0) {
            *fresh = 0;
        } else if (stat(final, &st) == 0 && st.st_size > 0) {
            size_t len;
            char *text = tk_read_file(final, &len, err);
            if (!text) return NULL;
            FILE *f = fopen(path, "w");
            int ok = f && fwrite(text, 1, len, f) == len;
            if (f && fclose(f) != 0) ok = 0;
            free(text);
            if (!ok) {
                tk_fail(err, "%s: cannot write: %s", path, strerror(errno));
                return NULL;
            }
            *fresh = 0;
        }
    }
    FILE *f = fopen(path, *fresh ? "w" : "a");
    if (!f) tk_fail(err, "%s: cannot open for writing: %s", path, strerror(errno));
    return f;
}

static const char *const log_names[3] = {"gates.jsonl", "train_log.jsonl", "tokens.jsonl"};

int tk_gatelog_finish(tk_gatelog *g, tk_err *err) {
    FILE **fs[3] = {&g->gates, &g->train, &g->tokens};
    int rc = 0;
    for (int i = 0; i < 3; i++) {
        if (!*fs[i]) continue;
        /* durable before the rename (a crash must not leave a renamed but empty log) */
        int bad_close = fflush(*fs[i]) != 0 || fsync(fileno(*fs[i])) != 0;
        bad_close |= fclose(*fs[i]) != 0;
        *fs[i] = NULL;
        char from[4200], to[4200];
        snprintf(from, sizeof from, "%s/%s.part", g->dir, log_names[i]);
        snprintf(to, sizeof to, "%s/%s", g->dir, log_names[i]);
        if (rc == 0 && (bad_close || rename(from, to) != 0))
            rc = tk_fail(err, "%s: cannot finish the log: %s", to, strerror(errno));
    }
    g->finished = rc == 0;
    return rc;
}

/* The step line is built in memory and written with one fwrite (fprintf per number cost ~10x more,
 * and a line holds M x (4 + 26) counts). */
static void line_reserve(tk_gatelog *g, size_t extra) {
    if (g->line_n + extra <= g->line_cap) return;
    size_t cap = g->line_cap ? g->line_cap : 4096;
    while (cap < g->line_n + extra) cap *= 2;
    char *p = realloc(g->line, cap);
    if (!p) {
        g->line_oom = 1;
        return;
    }
    g->line = p;
    g->line_cap = cap;
}

static void put_s(tk_gatelog *g, const char *s) {
    size_t n = strlen(s);
    line_reserve(g, n);
    if (g->line_oom) return;
    memcpy(g->line + g->line_n, s, n);
    g->line_n += n;
}

static void put_u64(tk_gatelog *g, char sep, uint64_t v) {
    char buf[24];
    size_t n = sizeof buf;
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (sep) buf[--n] = sep;
    line_reserve(g, sizeof buf - n);
    if (g->line_oom) return;
    memcpy(g->line + g->line_n, buf + n, sizeof buf - n);
    g->line_n += sizeof buf - n;
}

/* v with 7 significant digits as a JSON number, "d.dddddde-X" (JSON null when not finite). Written
 * by hand: printf's float conversion cost ~1 us per number, most of the recorder's time. */
static void put_g(tk_gatelog *g, char sep, double v) {
    char buf[40];
    size_t o = 0;
    if (sep) buf[o++] = sep;
    if (!isfinite(v)) {
        memcpy(buf + o, "null", 5);
    } else if (v == 0.0) {
        memcpy(buf + o, "0", 2);
    } else {
        if (v < 0) {
            buf[o++] = '-';
            v = -v;
        }
        int e = (int)floor(log10(v));
        double scale = 1.0; /* 10^(6 - e) by squaring: exact for the powers that matter, no pow() */
        for (int p = 6 - e < 0 ? e - 6 : 6 - e, i = 0; p; p >>= 1, i++) {
            double t = 10.0;
            for (int k = 0; k < i; k++) t *= t;
            if (p & 1) scale *= t;
        }
        long long mant = llround(6 - e >= 0 ? v * scale : v / scale); /* 7 digits: 10^6 <= mant < 10^7 */
        if (mant >= 10000000LL) {
            mant /= 10;
            e++;
        } else if (mant < 1000000LL) {
            mant *= 10;
            e--;
        }
        char d[8];
        for (int i = 6; i >= 0; i--) {
            d[i] = (char)('0' + mant % 10);
            mant /= 10;
        }
        int last = 6;
        while (last > 0 && d[last] == '0') last--;
        buf[o++] = d[0];
        if (last > 0) {
            buf[o++] = '.';
            for (int i = 1; i <= last; i++) buf[o++] = d[i];
        }
        if (e != 0) {
            buf[o++] = 'e';
            if (e < 0) {
                buf[o++] = '-';
                e = -e;
            }
            if (e >= 100) buf[o++] = (char)('0' + e / 100);
            if (e >= 10) buf[o++] = (char)('0' + e / 10 % 10);
            buf[o++] = (char)('0' + e % 10);
        }
        buf[o] = 0;
    }
    put_s(g, buf);
}

static int check_write(tk_gatelog *g, FILE *f, const char *name, tk_err *err) {
    if (fflush(f) != 0 || ferror(f)) return tk_fail(err, "%s/%s: write failed: %s", g->dir, name, strerror(errno));
    return 0;
}

static const char *const tower_prefixes[] = {"vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                             "vision_model."};

int tk_gatelog_tower_module(const char *name, int *layer, int *proj) {
    for (size_t i = 0; i < sizeof tower_prefixes / sizeof *tower_prefixes; i++) {
        size_t n = strlen(tower_prefixes[i]);
        if (strncmp(name, tower_prefixes[i], n) != 0) continue;
        int l = -1, off = 0;
        if (sscanf(name + n, "encoder.layers.%d.%n", &l, &off) != 1 || off == 0 || l < 0) return 0;
        for (int j = 0; j < TK_VIT_NPROJ; j++)
            if (strcmp(name + n + off, tk_vit_proj_full[j]) == 0) {
                *layer = l;
                *proj = j;
                return 1;
            }
        return 0;
    }
    return 0;
}

/* The tower's modules must be named so that the readers find them again. */
static int check_tower(const tk_gatelog_tower *t, tk_err *err) {
    if (!t->n) return 0;
    if (!t->mods || !t->layer || !t->proj || !t->prefix || t->n_layers < 1 || t->n_layers > TK_MAX_LAYERS)
        return tk_fail(err, "gate log: the vision tower's module list is incomplete");
    for (size_t k = 0; k < t->n; k++) {
        char name[TK_NAME_MAX];
        int l, p;
        if (!t->mods[k] || t->layer[k] < 0 || t->layer[k] >= t->n_layers || t->proj[k] < 0 || t->proj[k] >= TK_VIT_NPROJ)
            return tk_fail(err, "gate log: vision tower module %zu: no module, or layer %d / projection %d out of range",
                           k, t->layer[k], t->proj[k]);
        tk_vit_module_name(name, sizeof name, t->prefix, t->layer[k], t->proj[k]);
        if (!tk_gatelog_tower_module(name, &l, &p))
            return tk_fail(err, "gate log: vision tower prefix \"%s\" is not vision_tower.vision_model., "
                                "model.vision_tower.vision_model. or vision_model.", t->prefix);
    }
    return 0;
}

tk_gatelog *tk_gatelog_open(const char *run_dir, const tk_llama *m, const tk_gatelog_opts *o, tk_err *err) {
    tk_gatelog *g = calloc(1, sizeof *g);
    if (!g) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    g->o = *o;
    snprintf(g->dir, sizeof g->dir, "%s", run_dir);
    if (o->tower) g->tower = *o->tower;
    g->o.tower = NULL;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) g->M_llm += m->layers[l].proj[p].kind != TK_ADAPTER_NONE;
    g->M = g->M_llm + g->tower.n;
    if (check_tower(&g->tower, err)) goto fail;
    size_t M = g->M ? g->M : 1;
    g->layer = calloc(M, sizeof(int));
    g->proj = calloc(M, sizeof(int));
    g->kept = calloc(M * TK_GATELOG_NKIND, sizeof(uint64_t));
    g->hist = calloc(M * TK_GATELOG_NBIN, sizeof(uint64_t));
    g->tau = calloc(M, sizeof(float));
    g->lambda = calloc(M, sizeof(float));
    if (!g->layer || !g->proj || !g->kept || !g->hist || !g->tau || !g->lambda) {
        tk_fail(err, "out of memory");
        goto fail;
    }
    size_t k = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (m->layers[l].proj[p].kind != TK_ADAPTER_NONE) {
                g->layer[k] = l;
                g->proj[k++] = p;
            }
    g->with_lambda = m->peft.gate.target_keep > 0.0f;
    int fresh;
    if (!(g->train = open_log(g, "train_log.jsonl", &fresh, err))) goto fail;
    if (!(g->tokens = open_log(g, "tokens.jsonl", &fresh, err))) goto fail;
    if (g->M) {
        if (!(g->gates = open_log(g, "gates.jsonl", &fresh, err))) goto fail;
        if (fresh) { /* the header line: what the columns of every step line mean */
            const tk_gate_config *gc = &m->peft.gate;
            tk_adapter_kind kind = m->peft.kind;
            int gated = gc->enabled;
            if (kind == TK_ADAPTER_NONE && g->tower.n) { /* no LLaMA adapter config: the tower's modules say */
                kind = g->tower.mods[0]->kind;
                gated = g->tower.mods[0]->gated;
            }
            FILE *f = g->gates;
            fprintf(f, "{\"format\":\"tspeft-gates\",\"version\":%d,\"adapter\":\"%s\",\"gated\":%s,"
                       "\"rule\":\"%s\",\"lambda\":%.9g,\"eta_tau\":%.9g,\"target_keep\":",
                    TK_GATELOG_VERSION, tk_adapter_kind_name(kind), gated ? "true" : "false",
                    tk_gate_rule_name(gc->rule), gc->lambda, gc->eta_tau);
            if (gc->target_keep > 0.0f) fprintf(f, "%.9g", gc->target_keep);
            else fputs("null", f);
            fprintf(f, ",\"warmup_steps\":%d,\"n_layers\":%d,", gc->warmup_steps, m->cfg.n_layers);
            if (g->tower.n) fprintf(f, "\"tower_layers\":%d,", g->tower.n_layers);
            fputs("\"kinds\":[", f);
            for (int j = 0; j < TK_GATELOG_NKIND; j++) fprintf(f, "%s\"%s\"", j ? "," : "", kind_names[j]);
            fputs("],\"hist_lo\":[", f);
            for (int j = 0; j < TK_GATELOG_NBIN; j++) fprintf(f, "%s%.9g", j ? "," : "", tk_gatelog_bin_lo(j));
            fputs("],\"modules\":[", f);
            for (size_t i = 0; i < g->M_llm; i++)
                fprintf(f, "%s\"model.layers.%d.%s.%s\"", i ? "," : "", g->layer[i], tk_proj_block[g->proj[i]],
                        tk_proj_short[g->proj[i]]);
            for (size_t i = 0; i < g->tower.n; i++) {
                char name[TK_NAME_MAX];
                tk_vit_module_name(name, sizeof name, g->tower.prefix, g->tower.layer[i], g->tower.proj[i]);
                fprintf(f, "%s\"%s\"", g->M_llm + i ? "," : "", name);
            }
            fputs("]}\n", f);
            if (check_write(g, f, "gates.jsonl", err)) goto fail;
        }
    }
    return g;
fail:
    tk_gatelog_close(g, 0);
    return NULL;
}

void tk_gatelog_close(tk_gatelog *g, int keep_partial) {
    if (!g) return;
    FILE *fs[3] = {g->gates, g->train, g->tokens};
    for (int i = 0; i < 3; i++) {
        if (!fs[i]) continue;
        fclose(fs[i]);
        if (!keep_partial) {
            char path[4200];
            snprintf(path, sizeof path, "%s/%s.part", g->dir, log_names[i]);
            remove(path);
        }
    }
    free(g->layer);
    free(g->proj);
    free(g->kept);
    free(g->hist);
    free(g->tau);
    free(g->lambda);
    free(g->scratch);
    free(g->view);
    free(g->tok);
    free(g->col);
    free(g->line);
    free(g);
}

static int batch(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t B, size_t T, int step,
                 tk_err *err);
static int step_lines(tk_gatelog *g, const tk_llama *m, const tk_gatelog_step_info *s, tk_err *err);

double tk_gatelog_seconds(const tk_gatelog *g) { return g ? g->secs : 0.0; }

/* The LLaMA's thresholds applied in the step (read before the step's update). */
static void read_llm_tau(tk_gatelog *g, const tk_llama *m) {
    for (size_t k = 0; k < g->M_llm; k++) {
        const tk_adapted_linear *L = &m->layers[g->layer[k]].proj[g->proj[k]];
        g->tau[k] = L->tau;
        g->lambda[k] = L->lambda;
    }
    g->llm_seen = 1;
}

/* New counts for `step`; the LLaMA's thresholds are read when m is given (else by the step's first
 * tk_gatelog_batch), the tower's here. */
static void start_step(tk_gatelog *g, const tk_llama *m, int step) {
    g->step = step;
    g->open = 1;
    g->llm_seen = 0;
    memset(g->n, 0, sizeof g->n);
    memset(g->n_tower, 0, sizeof g->n_tower);
    memset(g->kept, 0, g->M * TK_GATELOG_NKIND * sizeof(uint64_t));
    memset(g->hist, 0, g->M * TK_GATELOG_NBIN * sizeof(uint64_t));
    if (m) read_llm_tau(g, m);
    for (size_t k = 0; k < g->tower.n; k++) {
        g->tau[g->M_llm + k] = g->tower.mods[k]->tau;
        g->lambda[g->M_llm + k] = g->tower.mods[k]->lambda;
    }
}

static int view_step(const tk_gatelog *g, int step) {
    return (g->o.last_step > 0 && step == g->o.last_step) ||
           (g->o.token_view_every > 0 && step % g->o.token_view_every == 0);
}

/* tokens.jsonl: row 0 of the micro-batch: its ids, kinds and how many modules kept each token. */
static int write_view(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t T, tk_err *err) {
    if (T > g->view_cap) {
        uint16_t *v = realloc(g->view, T * sizeof *v);
        if (!v) return tk_fail(err, "out of memory");
        g->view = v;
        g->view_cap = T;
    }
    size_t len = 0; /* rows are right-padded: the valid prefix */
    while (len < T && a->valid[len]) len++;
    memset(g->view, 0, T * sizeof *g->view);
    for (size_t k = 0; k < g->M_llm; k++) {
        const uint8_t *S = m->layers[g->layer[k]].proj[g->proj[k]].S;
        for (size_t t = 0; t < len; t++) g->view[t] += S[t];
    }
    FILE *f = g->tokens;
    fprintf(f, "{\"step\":%d,\"row\":0,\"n_modules\":%zu,\"ids\":[", g->step, g->M_llm);
    for (size_t t = 0; t < len; t++) fprintf(f, "%s%d", t ? "," : "", (int)a->ids[t]);
    fputs("],\"kinds\":", f);
    if (a->kinds) {
        fputc('[', f);
        for (size_t t = 0; t < len; t++) fprintf(f, "%s\"%s\"", t ? "," : "", kind_names[kind_col(a->kinds, t)]);
        fputc(']', f);
    } else {
        fputs("null", f);
    }
    fputs(",\"kept\":[", f);
    for (size_t t = 0; t < len; t++) fprintf(f, "%s%u", t ? "," : "", (unsigned)g->view[t]);
    fputs("]}\n", f);
    return check_write(g, f, "tokens.jsonl", err);
}

int tk_gatelog_batch(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t B, size_t T, int step,
                     tk_err *err) {
    double t0 = tk_time();
    int rc = batch(g, m, a, B, T, step, err);
    g->secs += tk_time() - t0;
    return rc;
}

static int batch(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t B, size_t T, int step,
                 tk_err *err) {
    int first = !g->open || step != g->step || !g->llm_seen; /* the step's first LLaMA micro-batch */
    if (!g->open || step != g->step) start_step(g, m, step);
    else if (!g->llm_seen) read_llm_tau(g, m); /* the tower's batch came first */
    size_t N = B * T, nv = 0;
    const uint8_t *valid = a->valid, *kinds = a->kinds;
    if (N > g->tok_cap) {
        free(g->tok);
        free(g->col);
        g->tok = malloc(N * sizeof *g->tok);
        g->col = malloc(N);
        g->tok_cap = g->tok && g->col ? N : 0;
        if (!g->tok_cap) return tk_fail(err, "out of memory");
    }
    for (size_t i = 0; i < N; i++)
        if (valid[i]) {
            g->tok[nv] = (uint32_t)i;
            g->col[nv] = (uint8_t)kind_col(kinds, i);
            g->n[g->col[nv++]]++;
        }
    for (size_t k = 0; k < g->M_llm; k++) {
        const tk_adapted_linear *L = &m->layers[g->layer[k]].proj[g->proj[k]];
        uint64_t *kept = g->kept + k * TK_GATELOG_NKIND, *hist = g->hist + k * TK_GATELOG_NBIN;
        TK_ASSERT(N <= L->cap);
        for (size_t v = 0; v < nv; v++) {
            size_t i = g->tok[v];
            kept[g->col[v]] += L->S[i];
            hist[tk_gatelog_bin(L->rr[i])]++;
        }
    }
    if (first && g->M_llm && a->ids && view_step(g, step)) return write_view(g, m, a, T, err);
    return 0;
}

int tk_gatelog_tower_batch(tk_gatelog *g, size_t rows, int step, tk_err *err) {
    (void)err;
    double t0 = tk_time();
    if (!g->open || step != g->step) start_step(g, NULL, step);
    const int img = 2; /* kind column of image tokens: every row of the tower is one */
    g->n_tower[img] += rows;
    for (size_t k = 0; k < g->tower.n; k++) {
        const tk_adapted_linear *L = g->tower.mods[k];
        uint64_t *kept = g->kept + (g->M_llm + k) * TK_GATELOG_NKIND, *hist = g->hist + (g->M_llm + k) * TK_GATELOG_NBIN;
        TK_ASSERT(rows <= L->cap);
        uint64_t kk = 0;
        for (size_t i = 0; i < rows; i++) {
            kk += L->S[i];
            hist[tk_gatelog_bin(L->rr[i])]++;
        }
        kept[img] += kk;
    }
    g->secs += tk_time() - t0;
    return 0;
}

float tk_select_rank(float *x, size_t n, size_t k) {
    ptrdiff_t l = 0, r = (ptrdiff_t)n - 1, kk = (ptrdiff_t)k;
    while (l < r) {
        float pivot = x[kk];
        ptrdiff_t i = l, j = r;
        do {
            while (x[i] < pivot) i++;
            while (pivot < x[j]) j--;
            if (i <= j) {
                float t = x[i];
                x[i] = x[j];
                x[j] = t;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < kk) l = i;
        if (kk < i) r = j;
    }
    return x[kk];
}

/* [p10, p50, p90] of the step's r_i (the values of ranks floor(q (n - 1)) in sorted order), or null.
 * hist [NB] counts the same values by bin, so each rank's bin and its rank inside the bin are known:
 * one pass gathers the values of those (at most 3) bins and the selection runs on them only. */
static int put_quantiles(tk_gatelog *g, const tk_gate_stats *st, const uint64_t *hist, tk_err *err) {
    size_t n = st->n;
    if (n == 0) {
        put_s(g, "null");
        return 0;
    }
    if (n > g->scratch_cap) {
        float *s = realloc(g->scratch, n * sizeof *s);
        if (!s) return tk_fail(err, "out of memory");
        g->scratch = s;
        g->scratch_cap = n;
    }
    static const double qs[3] = {0.1, 0.5, 0.9};
    size_t rank[3];
    for (int j = 0; j < 3; j++) rank[j] = (size_t)floor(qs[j] * (double)(n - 1));
    uint64_t total = 0;
    for (int b = 0; b < TK_GATELOG_NBIN; b++) total += hist[b];
    float v[3];
    if (total != n) { /* the histogram saw other tokens (a caller mixing evaluation and training) */
        memcpy(g->scratch, st->r, n * sizeof(float));
        size_t from = 0;
        for (int j = 0; j < 3; j++) { /* a selection leaves every larger value above its rank */
            v[j] = tk_select_rank(g->scratch + from, n - from, rank[j] - from);
            from = rank[j];
        }
    } else {
        int bin[3], nb = 0, which[3];
        size_t within[3], start[3], fill[3];
        for (int j = 0; j < 3; j++) {
            uint64_t below = 0;
            int b = 0;
            while (below + hist[b] <= rank[j]) below += hist[b++];
            within[j] = rank[j] - (size_t)below;
            int w = -1;
            for (int i = 0; i < nb; i++)
                if (bin[i] == b) w = i;
            if (w < 0) {
                start[nb] = nb ? start[nb - 1] + (size_t)hist[bin[nb - 1]] : 0;
                fill[nb] = start[nb];
                bin[nb] = b;
                w = nb++;
            }
            which[j] = w;
        }
        float lo[3], hi[3];
        for (int k = 0; k < nb; k++) { /* bin b holds lo_b <= r < lo_{b+1} (bin 0 also NaN: never here) */
            lo[k] = bin[k] == 0 ? -INFINITY : bin_lo_f[bin[k]];
            hi[k] = bin[k] == TK_GATELOG_NBIN - 1 ? INFINITY : bin_lo_f[bin[k] + 1];
        }
        for (size_t i = 0; i < n; i++) {
            float r = st->r[i];
            for (int k = 0; k < nb; k++)
                if (r >= lo[k] && r < hi[k]) g->scratch[fill[k]++] = r;
        }
        for (int j = 0; j < 3; j++) {
            int w = which[j];
            v[j] = tk_select_rank(g->scratch + start[w], (size_t)hist[bin[w]], within[j]);
        }
    }
    put_s(g, "[");
    for (int j = 0; j < 3; j++) put_g(g, j ? ',' : 0, v[j]);
    put_s(g, "]");
    return 0;
}

int tk_gatelog_step(tk_gatelog *g, const tk_llama *m, const tk_gatelog_step_info *s, tk_err *err) {
    double t0 = tk_time();
    int rc = step_lines(g, m, s, err);
    g->secs += tk_time() - t0;
    return rc;
}

static int step_lines(tk_gatelog *g, const tk_llama *m, const tk_gatelog_step_info *s, tk_err *err) {
    if (!g->open || g->step != s->step) start_step(g, m, s->step); /* no micro-batch seen: zero counts */
    else if (!g->llm_seen) read_llm_tau(g, m);                       /* only the tower's batches were seen */
    uint64_t seen = 0, seen_tower = 0, kept = 0;
    for (int j = 0; j < TK_GATELOG_NKIND; j++) {
        seen += g->n[j];
        seen_tower += g->n_tower[j];
    }
    for (size_t k = 0; k < g->M * TK_GATELOG_NKIND; k++) kept += g->kept[k];
    /* token decisions of every module: the LLaMA's see `seen` tokens each, the tower's `seen_tower` */
    double decisions = (double)seen * (double)g->M_llm + (double)seen_tower * (double)g->tower.n;
    double keep = decisions > 0 ? (double)kept / decisions : 1.0;
    fprintf(g->train, "{\"step\":%d,\"loss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens\":%.0f,\"seconds\":%.6g,"
                      "\"tokens_per_s\":%.6g,\"keep\":%.9g,\"log_seconds\":%.6g}\n",
            s->step, s->loss, s->lr, s->grad_norm, s->tokens, s->seconds, s->seconds > 0 ? s->tokens / s->seconds : 0.0,
            keep, g->secs);
    if (check_write(g, g->train, "train_log.jsonl", err)) return -1;
    if (g->M) {
        g->line_n = 0;
        g->line_oom = 0;
        char head[64];
        snprintf(head, sizeof head, "{\"step\":%d,\"n\":[", s->step);
        put_s(g, head);
        for (int j = 0; j < TK_GATELOG_NKIND; j++) put_u64(g, j ? ',' : 0, g->n[j]);
        if (g->tower.n) {
            put_s(g, "],\"n_tower\":[");
            for (int j = 0; j < TK_GATELOG_NKIND; j++) put_u64(g, j ? ',' : 0, g->n_tower[j]);
        }
        put_s(g, "],\"tau\":[");
        for (size_t k = 0; k < g->M; k++) put_g(g, k ? ',' : 0, g->tau[k]);
        if (g->with_lambda) {
            put_s(g, "],\"lambda\":[");
            for (size_t k = 0; k < g->M; k++) put_g(g, k ? ',' : 0, g->lambda[k]);
        }
        put_s(g, "],\"kept\":[");
        for (size_t k = 0; k < g->M; k++) {
            const uint64_t *c = g->kept + k * TK_GATELOG_NKIND;
            put_s(g, k ? ",[" : "[");
            for (int j = 0; j < TK_GATELOG_NKIND; j++) put_u64(g, j ? ',' : 0, c[j]);
            put_s(g, "]");
        }
        put_s(g, "],\"q\":[");
        for (size_t k = 0; k < g->M; k++) {
            if (k) put_s(g, ",");
            const tk_gate_stats *st = k < g->M_llm ? &m->layers[g->layer[k]].proj[g->proj[k]].stats
                                                   : &g->tower.mods[k - g->M_llm]->stats;
            if (put_quantiles(g, st, g->hist + k * TK_GATELOG_NBIN, err)) return -1;
        }
        put_s(g, "],\"hist\":[");
        for (size_t k = 0; k < g->M; k++) {
            const uint64_t *h = g->hist + k * TK_GATELOG_NBIN;
            put_s(g, k ? ",[" : "[");
            for (int j = 0; j < TK_GATELOG_NBIN; j++) put_u64(g, j ? ',' : 0, h[j]);
            put_s(g, "]");
        }
        put_s(g, "]}\n");
        if (g->line_oom) return tk_fail(err, "out of memory for the gate log line");
        fwrite(g->line, 1, g->line_n, g->gates);
        if (check_write(g, g->gates, "gates.jsonl", err)) return -1;
    }
    g->open = 0;
    return 0;
}

/* ---- selectivity ------------------------------------------------------------------------------ */

/* n [M,K] with stride n_step per module (0: one n [K] shared by every module). */
static void gatesel(tk_gatesel *s, const double *n, size_t n_step, const double *kept, size_t M, double *spread) {
    const int K = TK_GATELOG_NKIND;
    s->modules = M;
    s->interior_modules = s->modules_open = s->modules_closed = 0;
    s->kinds = 0;
    double w_all = 0.0, w_in = 0.0, w_spread = 0.0, spread_max = NAN, kind_lo = INFINITY, kind_hi = -INFINITY;
    double kind_kept[TK_GATELOG_NKIND] = {0}, kind_seen[TK_GATELOG_NKIND] = {0};
    for (size_t m = 0; m < M; m++) {
        const double *km = kept + m * (size_t)K, *nm = n + m * n_step;
        double sm = NAN, tokens = 0.0;
        for (int j = 0; j < K; j++) {
            tokens += nm[j];
            if (nm[j] > 0) s->kinds |= 1u << j;
            kind_kept[j] += km[j];
            kind_seen[j] += nm[j];
        }
        if (tokens > 0) { /* a module's decisions are weighted by the tokens it saw */
            double all = 0.0, lo = INFINITY, hi = -INFINITY;
            for (int j = 0; j < K; j++) {
                all += km[j];
                if (nm[j] > 0) {
                    double v = km[j] / nm[j];
                    lo = v < lo ? v : lo;
                    hi = v > hi ? v : hi;
                }
            }
            double keep = all / tokens;
            if (keep < TK_GATESEL_LO) s->modules_closed++;
            else if (keep > TK_GATESEL_HI) s->modules_open++;
            else {
                s->interior_modules++;
                w_in += tokens;
            }
            w_all += tokens;
            sm = hi - lo;
            w_spread += tokens * sm;
            spread_max = isnan(spread_max) || sm > spread_max ? sm : spread_max;
        }
        if (spread) spread[m] = sm;
    }
    for (int j = 0; j < K; j++) {
        if (!(kind_seen[j] > 0)) continue;
        double v = kind_kept[j] / kind_seen[j];
        kind_lo = v < kind_lo ? v : kind_lo;
        kind_hi = v > kind_hi ? v : kind_hi;
    }
    s->interior_share = w_all > 0 ? w_in / w_all : NAN;
    s->kind_spread_mean = w_all > 0 ? w_spread / w_all : NAN;
    s->kind_spread_max = spread_max;
    s->kind_spread_overall = kind_hi >= kind_lo ? kind_hi - kind_lo : NAN;
}

void tk_gatesel_compute(tk_gatesel *s, const double *n, const double *kept, size_t M, double *spread) {
    gatesel(s, n, 0, kept, M, spread);
}

void tk_gatesel_compute_own(tk_gatesel *s, const double *n, const double *kept, size_t M, double *spread) {
    gatesel(s, n, TK_GATELOG_NKIND, kept, M, spread);
}

static cJSON *add_num_or_null(cJSON *o, const char *key, double v) {
    return isfinite(v) ? cJSON_AddNumberToObject(o, key, v) : cJSON_AddNullToObject(o, key);
}

cJSON *tk_gatesel_json(const tk_gatesel *s) {
    cJSON *o = cJSON_CreateObject(), *w = cJSON_CreateObject(), *range = cJSON_CreateArray(), *kinds = cJSON_CreateArray();
    int ok = o && w && range && kinds;
    if (ok) {
        ok &= cJSON_AddNumberToObject(w, "steps", s->steps) && cJSON_AddNumberToObject(w, "first_step", s->first_step) &&
              cJSON_AddNumberToObject(w, "last_step", s->last_step);
        ok &= cJSON_AddItemToObject(o, "window", w);
        w = NULL;
        ok &= cJSON_AddBoolToObject(o, "gated", s->gated) != NULL;
        ok &= cJSON_AddItemToArray(range, cJSON_CreateNumber(TK_GATESEL_LO)) &&
              cJSON_AddItemToArray(range, cJSON_CreateNumber(TK_GATESEL_HI));
        ok &= cJSON_AddItemToObject(o, "interior_range", range);
        range = NULL;
        ok &= add_num_or_null(o, "interior_share", s->interior_share) &&
              cJSON_AddNumberToObject(o, "interior_modules", (double)s->interior_modules) &&
              cJSON_AddNumberToObject(o, "modules_open", (double)s->modules_open) &&
              cJSON_AddNumberToObject(o, "modules_closed", (double)s->modules_closed) &&
              cJSON_AddNumberToObject(o, "modules", (double)s->modules) &&
              add_num_or_null(o, "kind_spread_mean", s->kind_spread_mean) &&
              add_num_or_null(o, "kind_spread_max", s->kind_spread_max) &&
              add_num_or_null(o, "kind_spread_overall", s->kind_spread_overall);
        for (int j = 0; j < TK_GATELOG_NKIND && ok; j++)
            if (s->kinds & (1u << j)) ok &= cJSON_AddItemToArray(kinds, cJSON_CreateString(kind_names[j]));
        ok &= cJSON_AddItemToObject(o, "kinds", kinds);
        kinds = NULL;
    }
    cJSON_Delete(w);
    cJSON_Delete(range);
    cJSON_Delete(kinds);
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* A list of 4 token counts into out[K]; 0, or -1 with *what set. */
static int sel_counts(const cJSON *a, double *out, const char **what, const char *shape, const char *entries) {
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != TK_GATELOG_NKIND) return *what = shape, -1;
    for (int j = 0; j < TK_GATELOG_NKIND; j++) {
        const cJSON *e = cJSON_GetArrayItem(a, j);
        if (!cJSON_IsNumber(e) || !(e->valuedouble >= 0) || !isfinite(e->valuedouble)) return *what = entries, -1;
        out[j] = e->valuedouble;
    }
    return 0;
}

/* The counts of one step line added into the window sums: n [K] (the tokens of modules counting "n"),
 * nt [K] (those of the tower's modules, tower[m] = 1: "n_tower", or "n" in a line without it) and
 * kept [M,K]. */
static int sel_add_line(const cJSON *o, size_t M, const unsigned char *tower, double *n, double *nt, double *kept,
                        int *step, const char **what) {
    const int K = TK_GATELOG_NKIND;
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(o, "step"), *nn = cJSON_GetObjectItemCaseSensitive(o, "n"),
                *ntw = cJSON_GetObjectItemCaseSensitive(o, "n_tower"), *kk = cJSON_GetObjectItemCaseSensitive(o, "kept");
    double nl[TK_GATELOG_NKIND], ntl[TK_GATELOG_NKIND];
    if (!cJSON_IsNumber(st) || st->valuedouble < 0 || st->valuedouble > 2e9) return *what = "\"step\" must be a step number", -1;
    if (sel_counts(nn, nl, what, "\"n\" must be a list of 4 counts", "\"n\" entries must be counts")) return -1;
    int any_tower = 0;
    for (size_t m = 0; m < M; m++) any_tower |= tower[m];
    if (ntw) {
        if (!any_tower) return *what = "\"n_tower\" in a log without vision tower modules", -1;
        if (sel_counts(ntw, ntl, what, "\"n_tower\" must be a list of 4 counts", "\"n_tower\" entries must be counts"))
            return -1;
    } else {
        memcpy(ntl, nl, sizeof ntl);
    }
    if (!cJSON_IsArray(kk) || (size_t)cJSON_GetArraySize(kk) != M) return *what = "\"kept\" must hold one list per module", -1;
    size_t m = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, kk) { /* validated before anything is added */
        if (!cJSON_IsArray(row) || cJSON_GetArraySize(row) != K) return *what = "a \"kept\" entry must be a list of 4 counts", -1;
        const double *own = tower[m] ? ntl : nl;
        for (int j = 0; j < K; j++) {
            const cJSON *e = cJSON_GetArrayItem(row, j);
            if (!cJSON_IsNumber(e) || !(e->valuedouble >= 0) || e->valuedouble > own[j])
                return *what = tower[m] && ntw ? "a vision tower module's \"kept\" count is not a count within the "
                                                 "step's \"n_tower\""
                                               : "a \"kept\" count is not a count within the step's tokens",
                       -1;
        }
        m++;
    }
    m = 0;
    cJSON_ArrayForEach(row, kk) {
        for (int j = 0; j < K; j++) kept[m * (size_t)K + j] += cJSON_GetArrayItem(row, j)->valuedouble;
        m++;
    }
    for (int j = 0; j < K; j++) {
        n[j] += nl[j];
        nt[j] += ntl[j];
    }
    *step = st->valueint;
    return 0;
}

int tk_gatesel_read(tk_gatesel *s, const char *path, int window, int *found, tk_err *err) {
    const int K = TK_GATELOG_NKIND;
    memset(s, 0, sizeof *s);
    *found = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return errno == ENOENT ? 0 : tk_fail(err, "%s: cannot open: %s", path, strerror(errno));
    int rc = -1;
    char *head = NULL, *buf = NULL;
    double *kept = NULL, *n_mod = NULL;
    unsigned char *tower = NULL;
    int *steps = NULL;
    cJSON *h = NULL;
    size_t head_cap = 0;
    ssize_t hl = getline(&head, &head_cap, f);
    if (hl <= 0 || head[hl - 1] != '\n') { /* no complete header line yet: nothing logged */
        rc = 0;
        goto done;
    }
    h = cJSON_Parse(head);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(h, "format"), *mods = cJSON_GetObjectItemCaseSensitive(h, "modules");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "tspeft-gates") != 0 || !cJSON_IsArray(mods) ||
        cJSON_GetArraySize(mods) < 1 || (size_t)cJSON_GetArraySize(mods) > TK_GATELOG_MAX_MODULES) {
        tk_fail(err, "%s: line 1: not a tspeft-gates header with a list of modules", path);
        goto done;
    }
    size_t M = (size_t)cJSON_GetArraySize(mods);
    if (!(tower = calloc(M, 1)) || !(n_mod = calloc(M * (size_t)K, sizeof *n_mod))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    {
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, mods) {
            int l, p;
            if (!cJSON_IsString(e)) {
                tk_fail(err, "%s: line 1: a \"modules\" entry is not a module name", path);
                goto done;
            }
            tower[i++] = (unsigned char)tk_gatelog_tower_module(e->valuestring, &l, &p);
        }
    }
    int gated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(h, "gated"));
    off_t body = (off_t)hl, size;
    if (fseeko(f, 0, SEEK_END) != 0 || (size = ftello(f)) < body) {
        tk_fail(err, "%s: cannot seek: %s", path, strerror(errno));
        goto done;
    }
    kept = calloc(M * (size_t)K, sizeof *kept);
    if (!kept) {
        tk_fail(err, "out of memory");
        goto done;
    }
    /* Read the tail [start, size) and walk its complete lines from the end, keeping the last line of
     * each step, until `window` steps are found; when the tail runs out first, read 4x more. */
    size_t cap_steps = 0;
    for (off_t block = (off_t)1 << 16;; block *= 4) {
        off_t start = size - body > block ? size - block : body;
        size_t len = (size_t)(size - start);
        char *nb = realloc(buf, len + 1);
        if (!nb) {
            tk_fail(err, "out of memory");
            goto done;
        }
        buf = nb;
        if (fseeko(f, start, SEEK_SET) != 0 || fread(buf, 1, len, f) != len) {
            tk_fail(err, "%s: read failed: %s", path, strerror(errno));
            goto done;
        }
        buf[len] = 0;
        double n[TK_GATELOG_NKIND] = {0}, nt[TK_GATELOG_NKIND] = {0};
        memset(kept, 0, M * (size_t)K * sizeof *kept);
        int count = 0, first = 0, last = 0, done_window = 0;
        size_t end = len;
        while (end > 0 && buf[end - 1] != '\n') end--; /* an unterminated last line (a cut write): skipped */
        while (end > 0 && !done_window) {
            size_t b = end - 1; /* buf[end - 1] is the line's '\n' */
            while (b > 0 && buf[b - 1] != '\n') b--;
            if (b == 0 && start > body) break; /* possibly a partial line: read more */
            buf[end - 1] = 0;
            char *line = buf + b;
            end = b;
            if (!*line) continue;
            cJSON *o = cJSON_Parse(line);
            const char *what = NULL;
            int step = 0;
            if (!o || !cJSON_IsObject(o)) what = "not a JSON object";
            else if (cJSON_GetObjectItemCaseSensitive(o, "format")) { /* a repeated header */
                cJSON_Delete(o);
                continue;
            } else {
                const cJSON *st = cJSON_GetObjectItemCaseSensitive(o, "step");
                int dup = 0;
                for (int i = 0; i < count && cJSON_IsNumber(st) && !dup; i++) dup = steps[i] == st->valueint;
                if (dup) { /* an earlier line of a step logged again (resumed run): the last one counts */
                    cJSON_Delete(o);
                    continue;
                }
                sel_add_line(o, M, tower, n, nt, kept, &step, &what);
            }
            cJSON_Delete(o);
            if (what) {
                tk_fail(err, "%s: byte %lld: %s", path, (long long)(start + (off_t)b), what);
                goto done;
            }
            if ((size_t)count == cap_steps) {
                cap_steps = cap_steps ? 2 * cap_steps : 64;
                int *ns = realloc(steps, cap_steps * sizeof *ns);
                if (!ns) {
                    tk_fail(err, "out of memory");
                    goto done;
                }
                steps = ns;
            }
            steps[count++] = step;
            first = count == 1 || step < first ? step : first;
            last = count == 1 || step > last ? step : last;
            done_window = window > 0 && count == window;
        }
        if (done_window || start == body) {
            if (count > 0) {
                for (size_t m = 0; m < M; m++) memcpy(n_mod + m * (size_t)K, tower[m] ? nt : n, sizeof n);
                tk_gatesel_compute_own(s, n_mod, kept, M, NULL);
                s->gated = gated;
                s->steps = count;
                s->first_step = first;
                s->last_step = last;
                *found = 1;
            }
            rc = 0;
            goto done;
        }
    }
done:
    cJSON_Delete(h);
    free(head);
    free(buf);
    free(kept);
    free(n_mod);
    free(tower);
    free(steps);
    fclose(f);
    return rc;
}
