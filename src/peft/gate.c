/* gate.c: TS-PEFT threshold learning. Formulas in gate.h (from docs/TSPEFT.md section 4). */
#include "gate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

tk_gate_config tk_gate_config_default(void) {
    tk_gate_config g = {0};
    g.enabled = 0;
    g.rule = TK_GATE_PROX;
    g.lambda = 0.05f;
    g.eta_tau = 0.05f;
    g.tau0 = 0.0f;
    g.target_keep = 0.0f;
    g.eta_lambda = 0.05f;
    g.beta = 0.01f;
    g.warmup_steps = 0;
    g.scope = TK_TAU_MODULE;
    g.trust = 0.0f;
    g.keep = 1.0f;
    return g;
}

static const char *const RULE_NAMES[] = {"prox", "surrogate", "importance", "scaled", "random", "energy"};

const char *tk_gate_rule_name(tk_gate_rule r) {
    return (unsigned)r < sizeof RULE_NAMES / sizeof RULE_NAMES[0] ? RULE_NAMES[r] : "prox";
}

int tk_gate_rule_parse(const char *s, tk_gate_rule *out) {
    for (size_t k = 0; k < sizeof RULE_NAMES / sizeof RULE_NAMES[0]; k++)
        if (strcmp(s, RULE_NAMES[k]) == 0) {
            *out = (tk_gate_rule)k;
            return 0;
        }
    return -1;
}

const char *tk_tau_scope_name(tk_tau_scope s) { return s == TK_TAU_LAYER ? "layer" : "module"; }

int tk_tau_scope_parse(const char *s, tk_tau_scope *out) {
    if (strcmp(s, "module") == 0) *out = TK_TAU_MODULE;
    else if (strcmp(s, "layer") == 0) *out = TK_TAU_LAYER;
    else return -1;
    return 0;
}

static int stats_reserve(tk_gate_stats *st, size_t need, tk_err *err) {
    if (need <= st->cap) return 0;
    size_t cap = st->cap ? st->cap : 1024;
    while (cap < need) cap *= 2;
    float *r = realloc(st->r, cap * sizeof(float));
    if (!r) return tk_fail(err, "out of memory for gate statistics (%zu tokens)", cap);
    st->r = r;
    float *c = realloc(st->c, cap * sizeof(float));
    if (!c) return tk_fail(err, "out of memory for gate statistics (%zu tokens)", cap);
    st->c = c;
    st->cap = cap;
    return 0;
}

int tk_gate_stats_push_r(tk_gate_stats *st, float r, int kept, tk_err *err) {
    if (stats_reserve(st, st->n + 1, err)) return -1;
    st->r[st->n++] = r;
    st->kept += kept != 0;
    return 0;
}

int tk_gate_stats_push_c(tk_gate_stats *st, float c, tk_err *err) {
    if (stats_reserve(st, st->n_c + 1, err)) return -1;
    st->c[st->n_c++] = c;
    return 0;
}

void tk_gate_stats_reset(tk_gate_stats *st) { st->n = st->n_c = st->kept = 0; }

void tk_gate_stats_free(tk_gate_stats *st) {
    if (!st) return;
    free(st->r);
    free(st->c);
    memset(st, 0, sizeof *st);
}

typedef struct {
    float r;
    double w;
} rw_pair;

static int cmp_r(const void *a, const void *b) {
    float x = ((const rw_pair *)a)->r, y = ((const rw_pair *)b)->r;
    return (x > y) - (x < y);
}

/* Is candidate (obj, t) better than the best so far? Lower objective, then t nearer tau, then
 * smaller t. */
static int better(double obj, float t, double best_obj, float best_t, float tau) {
    if (obj != best_obj) return obj < best_obj;
    double dt = fabs((double)t - tau), db = fabs((double)best_t - tau);
    if (dt != db) return dt < db;
    return t < best_t;
}

static float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

int tk_gate_prox_weighted(const float *r, const double *w, size_t n, float tau, float eta, size_t drop_min,
                          size_t drop_max, float *tau_out) {
    *tau_out = tau;
    if (n == 0) return 0;
    rw_pair *p = malloc(n * sizeof *p);
    if (!p) return -1;
    for (size_t i = 0; i < n; i++) p[i] = (rw_pair){r[i], w[i]};
    qsort(p, n, sizeof *p, cmp_r);

    /* Phi of "keep every token with r >= t" is the suffix sum of w from the first token with r >= t.
     * Walk the distinct values upward, peeling groups off the kept set; i counts the dropped tokens. */
    double phi = 0.0;
    for (size_t i = 0; i < n; i++) phi += p[i].w;
    double inv2eta = 1.0 / (2.0 * (double)eta);

    /* Interval below the smallest r: t in [0, r_min] keeps everything. */
    int have = 0;
    float best_t = tau;
    double best_obj = 0.0;
    if (drop_min == 0) {
        best_t = clampf(tau, 0.0f, p[0].r > 0.0f ? p[0].r : 0.0f);
        best_obj = phi + ((double)best_t - tau) * ((double)best_t - tau) * inv2eta;
        have = 1;
    }
    size_t i = 0;
    while (i < n && i < drop_max) {
        float u = p[i].r;
        while (i < n && p[i].r == u) { /* drop the whole group of value u */
            phi -= p[i].w;
            i++;
        }
        if (i < drop_min || i > drop_max) continue; /* outside the trust region */
        /* To drop r = u the threshold must exceed it: the next float above u. */
        float lo = nextafterf(u, INFINITY);
        float hi = i < n ? p[i].r : INFINITY;
        if (lo < 0.0f) lo = 0.0f;
        if (hi < lo) continue; /* only possible for u < 0, which r never is */
        float t = clampf(tau, lo, hi);
        double obj = phi + ((double)t - tau) * ((double)t - tau) * inv2eta;
        if (!have || better(obj, t, best_obj, best_t, tau)) {
            best_obj = obj;
            best_t = t;
            have = 1;
        }
    }
    free(p);
    *tau_out = best_t;
    return 0;
}

int tk_gate_prox(const float *r, const float *c, size_t n, float tau, float lambda, float eta,
                 float *tau_out) {
    *tau_out = tau;
    if (n == 0) return 0;
    double *w = malloc(n * sizeof *w);
    if (!w) return -1;
    double price = (double)lambda / (double)n;
    for (size_t i = 0; i < n; i++) w[i] = (double)c[i] + price;
    int rc = tk_gate_prox_weighted(r, w, n, tau, eta, 0, n, tau_out);
    free(w);
    return rc;
}

float tk_gate_surrogate(const float *r, const float *c, size_t n, float tau, float lambda, float eta,
                        float beta) {
    if (n == 0) return tau;
    double sum_c = 0.0, sum_d = 0.0;
    for (size_t i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + exp(-((double)r[i] - tau) / beta));
        double ds = -s * (1.0 - s) / beta; /* dS~_i / dtau */
        sum_c += (double)c[i] * ds;
        sum_d += ds;
    }
    double grad = sum_c + (double)lambda * sum_d / (double)n;
    double t = (double)tau - (double)eta * grad;
    return t > 0.0 ? (float)t : 0.0f;
}

/* The per-token weights w_i of a prox-type rule (see gate.h); returns 0 when the step carries no
 * information for the rule (importance with every c_i = 0, energy with every r_i = 0: a fresh LoRA),
 * so tau must stay. */
static int rule_weights(tk_gate_rule rule, const float *r, const float *c, size_t n, float lambda, double *w) {
    double price = (double)lambda / (double)n;
    if (rule == TK_GATE_ENERGY) {
        double e = 0.0;
        for (size_t i = 0; i < n; i++) e += (double)r[i] * r[i];
        if (!(e > 0.0)) return 0;
        for (size_t i = 0; i < n; i++) w[i] = price - (double)r[i] * r[i] / e;
    } else if (rule == TK_GATE_IMPORTANCE) {
        double a = 0.0;
        for (size_t i = 0; i < n; i++) a += fabs((double)c[i]);
        if (!(a > 0.0)) return 0;
        for (size_t i = 0; i < n; i++) w[i] = price - fabs((double)c[i]) / a;
    } else if (rule == TK_GATE_SCALED) {
        double mean = 0.0, var = 0.0;
        for (size_t i = 0; i < n; i++) mean += c[i];
        mean /= (double)n;
        for (size_t i = 0; i < n; i++) var += ((double)c[i] - mean) * ((double)c[i] - mean);
        double sd = sqrt(var / (double)n), p = (double)lambda * sd / sqrt((double)n);
        for (size_t i = 0; i < n; i++) w[i] = (double)c[i] + p;
    } else {
        for (size_t i = 0; i < n; i++) w[i] = (double)c[i] + price;
    }
    return 1;
}

/* The trust region in dropped-token counts around the share tau drops now: [lo, hi]. */
static void trust_bounds(const float *r, size_t n, float tau, float delta, size_t *lo, size_t *hi) {
    *lo = 0;
    *hi = n;
    if (!(delta > 0.0f)) return;
    size_t dropped = 0;
    for (size_t i = 0; i < n; i++) dropped += r[i] < tau;
    double d = (double)delta * (double)n;
    double a = (double)dropped - d, b = (double)dropped + d;
    *lo = a > 0.0 ? (size_t)ceil(a) : 0;
    *hi = b < (double)n ? (size_t)floor(b) : n;
}

int tk_gate_update(const tk_gate_config *cfg, const tk_gate_stats *st, int step, float *tau,
                   float *lambda) {
    TK_ASSERT(st->n_c == st->n);
    if (!cfg->enabled || cfg->rule == TK_GATE_RANDOM || step <= cfg->warmup_steps || st->n == 0) return 0;
    float t = *tau;
    if (cfg->rule == TK_GATE_SURROGATE) {
        t = tk_gate_surrogate(st->r, st->c, st->n, *tau, *lambda, cfg->eta_tau, cfg->beta);
    } else if (cfg->rule == TK_GATE_PROX && !(cfg->trust > 0.0f)) { /* the reference, exactly */
        if (tk_gate_prox(st->r, st->c, st->n, *tau, *lambda, cfg->eta_tau, &t) != 0) return -1;
    } else {
        double *w = malloc(st->n * sizeof *w);
        if (!w) return -1;
        size_t lo, hi;
        trust_bounds(st->r, st->n, *tau, cfg->trust, &lo, &hi);
        int rc = rule_weights(cfg->rule, st->r, st->c, st->n, *lambda, w)
                     ? tk_gate_prox_weighted(st->r, w, st->n, *tau, cfg->eta_tau, lo, hi, &t)
                     : 0;
        free(w);
        if (rc) return -1;
    }
    *tau = t;
    if (cfg->target_keep > 0.0f) {
        double keep = (double)st->kept / (double)st->n;
        double l = (double)*lambda + (double)cfg->eta_lambda * (keep - (double)cfg->target_keep);
        *lambda = l > 0.0 ? (float)l : 0.0f;
    }
    return 0;
}
