/* optim.c: see optim.h.
 *
 * Legend: n = number of trainable scalars (the flat trainable block); p, g, m, v are all [n].
 *
 * Everything here mirrors a Python reference so a run can be compared with PyTorch step by step:
 *   schedules  transformers.optimization.get_{constant,linear,cosine}_schedule_with_warmup (LambdaLR)
 *   AdamW      torch.optim.adamw._single_tensor_adamw (torch 1.13, amsgrad=False, maximize=False)
 *   clipping   torch.nn.utils.clip_grad_norm_ (norm_type 2)
 */
#include "train/optim.h"

#include "common.h"
#include "model/params.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846 /* Python's math.pi */
#endif

/* Below this many elements the update runs on one thread: forking costs more than it saves. */
#define TK_OPTIM_PARALLEL_MIN 65536

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* ---- learning-rate schedules ------------------------------------------------------------------ */

/* The LambdaLR multiplier of transformers' schedulers, in double as Python computes it:
 *   step < warmup:  step / max(1, warmup)
 *   constant:       1
 *   linear:         max(0, (total - step) / max(1, total - warmup))
 *   cosine:         progress = (step - warmup) / max(1, total - warmup)
 *                   max(0, 0.5 * (1 + cos(pi * num_cycles * 2 * progress))), num_cycles = 0.5
 * Differences of ints are taken in int64 so that no combination of int arguments overflows. */
static double sched_factor(const tk_sched *s, int step) {
    int64_t st = step, warm = s->warmup_steps, total = s->total_steps;
    if (st < warm) return (double)st / (double)(warm > 1 ? warm : 1);
    int64_t span = total - warm;
    double denom = (double)(span > 1 ? span : 1);
    switch (s->kind) {
    case TK_SCHED_CONSTANT:
        return 1.0;
    case TK_SCHED_LINEAR: {
        double f = (double)(total - st) / denom;
        return f > 0.0 ? f : 0.0;
    }
    case TK_SCHED_COSINE: {
        const double num_cycles = 0.5;
        double progress = (double)(st - warm) / denom;
        double f = 0.5 * (1.0 + cos(M_PI * num_cycles * 2.0 * progress));
        return f > 0.0 ? f : 0.0;
    }
    }
    TK_ASSERT(!"unknown tk_sched_kind");
    return 0.0;
}

float tk_sched_lr(const tk_sched *s, int step) {
    TK_ASSERT(s != NULL);
    return (float)((double)s->lr * sched_factor(s, step));
}

int tk_sched_parse(const char *name, tk_sched_kind *out) {
    static const struct {
        const char *name;
        tk_sched_kind kind;
    } table[] = {
        {"constant", TK_SCHED_CONSTANT},
        {"linear", TK_SCHED_LINEAR},
        {"cosine", TK_SCHED_COSINE},
    };
    if (name == NULL || out == NULL) return -1;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(name, table[i].name) == 0) {
            *out = table[i].kind;
            return 0;
        }
    }
    return -1;
}

const char *tk_sched_name(tk_sched_kind k) {
    switch (k) {
    case TK_SCHED_CONSTANT:
        return "constant";
    case TK_SCHED_LINEAR:
        return "linear";
    case TK_SCHED_COSINE:
        return "cosine";
    }
    return "unknown";
}

/* ---- AdamW ------------------------------------------------------------------------------------ */

/* torch 1.13 _single_tensor_adamw, one element at a time, in the same order and precision:
 *   param.mul_(1 - lr * weight_decay)                        scalar in double, applied as float
 *   exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)          m = m*b1 + (1-b1)*g
 *   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-b2)  v = v*b2 + ((1-b2)*g)*g
 *   bias_correction1 = 1 - beta1 ** step                     double
 *   bias_correction2 = 1 - beta2 ** step                     double
 *   step_size = lr / bias_correction1                        double
 *   denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
 *   param.addcdiv_(exp_avg, denom, value=-step_size)         p = p + ((-step_size)*m) / denom
 * Python-float scalars reach the float kernels rounded to float, as they do here. (torch's
 * vectorised CPU add may fuse m*b1 + (1-b1)*g into one FMA; that is the only source of differences,
 * at most an ulp of m.) Later torch versions write the first moment as exp_avg.lerp_(grad, 1-beta1),
 * which differs from this by rounding only. */
void tk_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                     float b2, float eps, float wd, int t) {
    TK_ASSERT(t >= 1);
    if (n == 0) return;
    TK_ASSERT(p != NULL && g != NULL && m != NULL && v != NULL);
    const double bias_correction1 = 1.0 - pow((double)b1, (double)t);
    const double bias_correction2 = 1.0 - pow((double)b2, (double)t);
    const float decay = (float)(1.0 - (double)lr * (double)wd);
    const float one_minus_b1 = (float)(1.0 - (double)b1);
    const float one_minus_b2 = (float)(1.0 - (double)b2);
    const float neg_step_size = (float)(-((double)lr / bias_correction1));
    const float bc2_sqrt = (float)sqrt(bias_correction2);

#pragma omp parallel for schedule(static) if (n >= TK_OPTIM_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        float pi = p[i] * decay;
        float mi = m[i] * b1;
        mi = mi + one_minus_b1 * gi;
        float vi = v[i] * b2;
        vi = vi + one_minus_b2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + neg_step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/* Every tensor of P: tensors below TK_OPTIM_PARALLEL_MIN (every LoRA tensor) one per task, since one
 * call each would run them all on one thread; larger ones (full fine-tuning) each over all threads
 * with tk_adamw_update's own loop. The update is element-wise, so the result does not depend on how
 * the work is shared out. */
void tk_params_adamw(tk_params *P, float lr, float b1, float b2, float eps, float wd, int t) {
#pragma omp parallel for schedule(dynamic, 1) if (P->total >= TK_OPTIM_PARALLEL_MIN)
    for (size_t i = 0; i < P->n; i++) {
        const tk_param *p = &P->items[i];
        if (p->numel < TK_OPTIM_PARALLEL_MIN)
            tk_adamw_update(P->data + p->offset, P->grad + p->offset, P->m + p->offset, P->v + p->offset,
                            p->numel, p->lr_mult > 0.0f ? lr * p->lr_mult : lr, b1, b2, eps, p->decay ? wd : 0.0f, t);
    }
    for (size_t i = 0; i < P->n; i++) {
        const tk_param *p = &P->items[i];
        if (p->numel >= TK_OPTIM_PARALLEL_MIN)
            tk_adamw_update(P->data + p->offset, P->grad + p->offset, P->m + p->offset, P->v + p->offset,
                            p->numel, p->lr_mult > 0.0f ? lr * p->lr_mult : lr, b1, b2, eps, p->decay ? wd : 0.0f, t);
    }
}

/* ---- gradient clipping ------------------------------------------------------------------------ */

/* Fixed blocks of TK_NORM_BLOCK values, each summed in TK_NORM_LANES interleaved lanes (independent
 * chains the compiler keeps in vector registers), and the block sums added in block order: the order
 * depends on n only, so the norm (and every clipped step) is the same for any thread count. */
#define TK_NORM_BLOCK 16384
#define TK_NORM_LANES 8
#define TK_NORM_GROUP 64 /* block sums held at once */

static double block_sumsq(const float *g, size_t n) {
    double lane[TK_NORM_LANES] = {0};
    size_t i = 0;
    for (; i + TK_NORM_LANES <= n; i += TK_NORM_LANES)
        for (size_t l = 0; l < TK_NORM_LANES; l++) lane[l] += (double)g[i + l] * (double)g[i + l];
    double sum = 0.0;
    for (; i < n; i++) sum += (double)g[i] * (double)g[i];
    for (size_t l = 0; l < TK_NORM_LANES; l++) sum += lane[l];
    return sum;
}

double tk_grad_norm(const float *g, size_t n) {
    size_t nb = (n + TK_NORM_BLOCK - 1) / TK_NORM_BLOCK;
    double sum = 0.0;
    for (size_t b0 = 0; b0 < nb; b0 += TK_NORM_GROUP) { /* a group of blocks at a time: no allocation */
        size_t cnt = min_size(TK_NORM_GROUP, nb - b0);
        double part[TK_NORM_GROUP];
#pragma omp parallel for schedule(static) if (n >= TK_OPTIM_PARALLEL_MIN)
        for (size_t b = b0; b < b0 + cnt; b++)
            part[b - b0] = block_sumsq(&g[b * TK_NORM_BLOCK], min_size(TK_NORM_BLOCK, n - b * TK_NORM_BLOCK));
        for (size_t j = 0; j < cnt; j++) sum += part[j];
    }
    return sqrt(sum);
}

/* torch: clip_coef = max_norm / (total_norm + 1e-6); g *= clamp(clip_coef, max=1). Multiplying by
 * exactly 1 changes nothing, so the scaling is skipped when clip_coef >= 1. A NaN or infinite norm
 * leaves g unscaled and is returned for the caller to report. */
void tk_clip_grad_to(float *g, size_t n, double norm, double max_norm) {
    if (!(max_norm > 0.0) || !isfinite(norm)) return;
    double clip_coef = max_norm / (norm + 1e-6);
    if (clip_coef < 1.0) {
        const float c = (float)clip_coef;
#pragma omp parallel for schedule(static) if (n >= TK_OPTIM_PARALLEL_MIN)
        for (size_t i = 0; i < n; i++) g[i] *= c;
    }
}

double tk_clip_grad_norm(float *g, size_t n, double max_norm) {
    double norm = tk_grad_norm(g, n);
    tk_clip_grad_to(g, n, norm, max_norm);
    return norm;
}

/* ---- RNG -------------------------------------------------------------------------------------- */

/* splitmix64 (Steele, Lea, Flood 2014): expands one 64-bit seed into well-mixed state words. */
static uint64_t splitmix64_next(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* The two words are consecutive splitmix64 outputs; splitmix64 is a bijection of its counter, so at
 * most one of them is zero and the xoroshiro state is never all-zero. */
void tk_rng_seed(tk_rng *r, uint64_t seed) {
    TK_ASSERT(r != NULL);
    uint64_t x = seed;
    r->s[0] = splitmix64_next(&x);
    r->s[1] = splitmix64_next(&x);
}

/* xoroshiro128+ (Blackman and Vigna, 2018 constants a=24, b=16, c=37). */
uint64_t tk_rng_u64(tk_rng *r) {
    uint64_t s0 = r->s[0], s1 = r->s[1];
    uint64_t result = s0 + s1;
    s1 ^= s0;
    r->s[0] = rotl64(s0, 24) ^ s1 ^ (s1 << 16);
    r->s[1] = rotl64(s1, 37);
    return result;
}

/* The top 24 bits (the best ones of a "+" generator) scaled by 2^-24: exact in float, in [0, 1). */
float tk_rng_uniform(tk_rng *r) { return (float)(tk_rng_u64(r) >> 40) * 0x1p-24f; }
