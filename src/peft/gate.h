/* gate.h: the TS-PEFT token gate's threshold learning (docs/TSPEFT.md sections 1 and 4).
 *
 * Per adapted module and token i (non-pad tokens of one optimizer step):
 *     r_i = ||m_i|| / max(||b_i||, 1e-6),  S_i = [r_i >= tau],  c_i = <dLoss/dh_i, m_i>
 *     Phi(t) = sum_i (c_i + lambda/N) [r_i >= t]
 *     prox:      tau <- argmin_{t >= 0} Phi(t) + (t - tau)^2 / (2 eta_tau)      (exact)
 *     surrogate: tau <- max(0, tau - eta_tau (sum_i c_i dS~_i/dtau + lambda mean_i dS~_i/dtau)),
 *                S~_i = sigmoid((r_i - tau) / beta)
 *     target keep rho: lambda <- max(0, lambda + eta_lambda (kept/N - rho)) after each step
 *     warm-up: tau stays at tau0 (and lambda at its start) for the first warmup_steps steps.
 * Study rules beside the reference (docs/tspeft.md "Threshold rules"), all exact proximal steps on a
 * weighted Phi(t) = sum_i w_i [r_i >= t]:
 *     importance: w_i = lambda/N - |c_i| / sum_j |c_j|   (the dropped share of first-order importance
 *                 plus lambda times the kept share; a step whose c are all 0 leaves tau alone)
 *     scaled:     w_i = c_i + lambda std(c) / sqrt(N)  (the price in units of the step's c spread)
 *     energy:     w_i = lambda/N - r_i^2 / sum_j r_j^2   (the dropped share of the module's relative
 *                 update energy plus lambda times the kept share; no c: all r = 0 leaves tau alone)
 *     random:     S_i ~ Bernoulli(keep), tau unused (the chance control)
 *     straight-through (any rule): the adapter's backward treats every token as kept, so an adapter
 *                 whose tokens are all gated off still learns; the forward is gated as always.
 *     trust region delta > 0 (any prox-type rule): the new tau keeps between k0 - delta and k0 + delta
 *                 of the step's tokens, k0 the share tau kept.
 *
 *   tk_gate_stats st = {0};
 *   tk_gate_stats_push_r(&st, r, kept, &err) during forward, tk_gate_stats_push_c(&st, c, &err)
 *   during backward, then tk_gate_update(&cfg, &st, &tau, &lambda, step), tk_gate_stats_reset(&st).
 */
#ifndef TK_PEFT_GATE_H
#define TK_PEFT_GATE_H

#include "../common.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { TK_GATE_PROX, TK_GATE_SURROGATE, TK_GATE_IMPORTANCE, TK_GATE_SCALED, TK_GATE_RANDOM, TK_GATE_ENERGY } tk_gate_rule;
/* Where one threshold applies: each module its own, or one shared by a layer's gated modules. */
typedef enum { TK_TAU_MODULE, TK_TAU_LAYER } tk_tau_scope;

typedef struct {
    int enabled;        /* 0: dense adapter (S = 1 everywhere, tau never moves) */
    tk_gate_rule rule;  /* prox (default), surrogate, importance, scaled, energy, random */
    tk_tau_scope scope; /* module (default) or layer */
    float lambda;       /* sparsity weight (start value of the dual with target_keep) */
    float eta_tau;      /* proximal step size */
    float tau0;         /* initial threshold */
    float target_keep;  /* rho in (0,1]; 0 = fixed lambda */
    float eta_lambda;   /* dual step */
    float beta;         /* surrogate temperature */
    int warmup_steps;   /* optimizer steps with tau frozen at tau0 */
    float trust;        /* quantile trust region delta in (0,1]; 0 = off */
    float keep;         /* random rule: the probability that a token's update is applied, in (0,1] */
    int straight_through; /* backward passes gradient through gated-off tokens as if kept (default 0) */
} tk_gate_config;

/* Defaults of docs/TSPEFT.md: prox, lambda 0.05, eta_tau 0.05, tau0 0, no target, eta_lambda 0.05,
 * beta 0.01, warm-up 0; enabled = 0. */
tk_gate_config tk_gate_config_default(void);
const char *tk_gate_rule_name(tk_gate_rule r);
int tk_gate_rule_parse(const char *s, tk_gate_rule *out);
const char *tk_tau_scope_name(tk_tau_scope s);
int tk_tau_scope_parse(const char *s, tk_tau_scope *out);
/* The rule names, for messages. */
#define TK_GATE_RULE_NAMES "prox, surrogate, importance, scaled, energy or random"

/* The random rule's decision for row i under key (a hash: the same key and row give the same answer
 * on any thread). */
static inline int tk_gate_random_keep(uint64_t key, size_t i, float keep) {
    uint64_t z = key + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1p-53 < (double)keep;
}

/* r_i and c_i of the non-pad tokens seen in one optimizer step, in token order. */
typedef struct {
    float *r;      /* [n] */
    float *c;      /* [n_c], filled by backward; n_c == n when the step is complete */
    size_t n, n_c, cap;
    size_t kept;   /* tokens with S = 1 among the n */
} tk_gate_stats;

int tk_gate_stats_push_r(tk_gate_stats *st, float r, int kept, tk_err *err);
int tk_gate_stats_push_c(tk_gate_stats *st, float c, tk_err *err);
void tk_gate_stats_reset(tk_gate_stats *st);
void tk_gate_stats_free(tk_gate_stats *st);

/* The exact proximal step: argmin_{t>=0} Phi(t) + (t - tau)^2/(2 eta). Ties go to the t nearest tau,
 * then to the smaller t. n == 0 leaves tau unchanged. Returns -1 only when out of memory. */
int tk_gate_prox(const float *r, const float *c, size_t n, float tau, float lambda, float eta,
                 float *tau_out);
/* The surrogate rule above; returns the new tau. */
float tk_gate_surrogate(const float *r, const float *c, size_t n, float tau, float lambda, float eta,
                        float beta);

/* The exact proximal step on Phi(t) = sum_i w_i [r_i >= t], with the number of dropped tokens held in
 * [drop_min, drop_max] (pass 0 and n for none). tk_gate_prox is this with w_i = c_i + lambda/n. */
int tk_gate_prox_weighted(const float *r, const double *w, size_t n, float tau, float eta, size_t drop_min,
                          size_t drop_max, float *tau_out);

/* Applies one optimizer step's update to tau (and lambda with a target keep ratio).
 * step is 1-based. Requires st->n_c == st->n. Returns -1 on allocation failure. */
int tk_gate_update(const tk_gate_config *cfg, const tk_gate_stats *st, int step, float *tau,
                   float *lambda);

#endif
