/* optim.h: AdamW, learning-rate schedules and global-norm clipping, as flat loops over the trainable
 * block (parameters, gradients and both moments laid out identically).
 *
 *   tk_sched sch = {TK_SCHED_COSINE, 2e-4f, 100, 1000};
 *   float lr = tk_sched_lr(&sch, step);                     // step counts from 0, as HF does
 *   float norm = tk_clip_grad_norm(grad, n, 1.0f);          // returns the norm before clipping
 *   tk_adamw_update(p, g, m, v, n, lr, 0.9f, 0.999f, 1e-8f, wd, step + 1);
 *
 * Semantics follow torch.optim.AdamW and the Hugging Face schedulers exactly, so runs can be compared
 * with a PyTorch reference step by step.
 */
#ifndef TK_OPTIM_H
#define TK_OPTIM_H

#include <stddef.h>
#include <stdint.h>

typedef enum { TK_SCHED_CONSTANT, TK_SCHED_LINEAR, TK_SCHED_COSINE } tk_sched_kind;

typedef struct {
    tk_sched_kind kind;
    float lr;          /* peak learning rate */
    int warmup_steps;  /* linear ramp from 0 over this many optimizer steps */
    int total_steps;   /* decay horizon for linear and cosine */
} tk_sched;

/* Learning rate for optimizer step `step` (0-based), as transformers' get_*_schedule_with_warmup:
 * warm-up lr*step/max(1,warmup); then constant, linear to 0 at total_steps, or half-cosine to 0. */
float tk_sched_lr(const tk_sched *s, int step);
/* Parses "constant", "linear", "cosine"; returns -1 for anything else. */
int tk_sched_parse(const char *name, tk_sched_kind *out);
const char *tk_sched_name(tk_sched_kind k);

/* One torch.optim.AdamW update of n parameters at 1-based step t:
 *   p -= lr*wd*p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps). */
void tk_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                     float b2, float eps, float wd, int t);

/* tk_adamw_update on every tensor of P (weight decay wd where the tensor's decay flag is set, else
 * 0; learning rate lr times the tensor's lr_mult where that is set), tensors shared out over the threads. */
struct tk_params;
void tk_params_adamw(struct tk_params *P, float lr, float b1, float b2, float eps, float wd, int t);

/* Global L2 norm of g [n] (accumulated in double). */
double tk_grad_norm(const float *g, size_t n);
/* torch.nn.utils.clip_grad_norm_: when norm > max_norm, scales g by max_norm / (norm + 1e-6).
 * max_norm <= 0 disables clipping. Returns the norm before clipping. */
double tk_clip_grad_norm(float *g, size_t n, double max_norm);
/* The same scaling with the norm already computed (tk_grad_norm): g is read once, not twice. */
void tk_clip_grad_to(float *g, size_t n, double norm, double max_norm);

/* Deterministic RNG (splitmix64-seeded xoshiro128+ style), state is plain data so it checkpoints. */
typedef struct {
    uint64_t s[2];
} tk_rng;
void tk_rng_seed(tk_rng *r, uint64_t seed);
uint64_t tk_rng_u64(tk_rng *r);
float tk_rng_uniform(tk_rng *r); /* [0, 1) with 24 random bits */

#endif
