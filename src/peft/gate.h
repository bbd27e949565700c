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
 *
 *   tk_gate_stats st = {0};
 *   tk_gate_stats_push_r(&st, r, kept, &err) during forward, tk_gate_stats_push_c(&st, c, &err)
 *   during backward, then tk_gate_update(&cfg, &st, &tau, &lambda, step), tk_gate_stats_reset(&st).
 */
#ifndef TK_PEFT_GATE_H
#define TK_PEFT_GATE_H

#include "../common.h"

#include <stddef.h>

typedef enum { TK_GATE_PROX, TK_GATE_SURROGATE } tk_gate_rule;

typedef struct {
    int enabled;        /* 0: dense adapter (S = 1 everywhere, tau never moves) */
    tk_gate_rule rule;  /* prox (default) or surrogate */
    float lambda;       /* sparsity weight (start value of the dual with target_keep) */
    float eta_tau;      /* proximal step size */
    float tau0;         /* initial threshold */
    float target_keep;  /* rho in (0,1]; 0 = fixed lambda */
    float eta_lambda;   /* dual step */
    float beta;         /* surrogate temperature */
    int warmup_steps;   /* optimizer steps with tau frozen at tau0 */
} tk_gate_config;

/* Defaults of docs/TSPEFT.md: prox, lambda 0.05, eta_tau 0.05, tau0 0, no target, eta_lambda 0.05,
 * beta 0.01, warm-up 0; enabled = 0. */
tk_gate_config tk_gate_config_default(void);
const char *tk_gate_rule_name(tk_gate_rule r);
int tk_gate_rule_parse(const char *s, tk_gate_rule *out);

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

/* Applies one optimizer step's update to tau (and lambda with a target keep ratio).
 * step is 1-based. Requires st->n_c == st->n. Returns -1 on allocation failure. */
int tk_gate_update(const tk_gate_config *cfg, const tk_gate_stats *st, int step, float *tau,
                   float *lambda);

#endif
