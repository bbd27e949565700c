/* adapter.h: one adapted linear layer, h = W0 x + S * M(x), with M a LoRA, DoRA or parallel
 * bottleneck Adapter branch gated per token by TS-PEFT (docs/TSPEFT.md sections 1-3).
 *
 *   b_i = W0 x_i                       base output (LLaMA has no bias)
 *   LoRA:       m_i = s B A x~_i                       s = alpha/r (rsLoRA: alpha/sqrt(r))
 *   DoRA:       m_i = (c - 1) * (W0 x~_i) + c * (s B A x~_i),  c = mag / ||W0 + s B A||_row (detached)
 *   Bottleneck: m_i = s Up act(Down x~_i)                 s = the adapter's scaling
 *   AdaLoRA:    m_i = s B (E . A) x~_i   E [R] scales A's rows; s = alpha / (ranknum + 1e-5) (PEFT's
 *               SVDLinear): LoRA on the effective A' = diag(E) A, so it runs LoRA's fused branch
 *   r_i = ||m_i|| / max(||b_i||, 1e-6);  S_i = [r_i >= tau] when gated, else 1
 *   h_i = b_i + S_i m_i,  x~ = dropout(x)
 * Backward: the branch's parameters and dx see only tokens with S_i = 1 (the others are skipped,
 * so the adapter's matmuls shrink with the keep ratio: LoRA drops them chunk by chunk in the fused
 * branch, the others zero or gather rows); c_i = <g_i, m_i> is computed for every token, kept or
 * not, because the threshold step needs it.
 *
 *   tk_adapted_linear L = {...};                // shapes, kind, parameter views set by the model
 *   tk_adapted_alloc(&L, N, &err);              // activations for N tokens
 *   tk_adapted_forward(&L, ws, y, x, valid, N, train, rng);
 *   tk_adapted_backward(&L, ws, dx, dy, x, valid, N);
 *
 * Gradients ADD into dx, dA, dB, dmag, dw0 (ops.h convention).
 */
#ifndef TK_PEFT_ADAPTER_H
#define TK_PEFT_ADAPTER_H

#include "../common.h"
#include "../train/optim.h"
#include "gate.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { TK_ADAPTER_NONE, TK_ADAPTER_LORA, TK_ADAPTER_DORA, TK_ADAPTER_BOTTLENECK, TK_ADAPTER_ADALORA } tk_adapter_kind;
typedef enum { TK_ACT_RELU, TK_ACT_TANH } tk_act;

/* Scratch shared by all modules of a model: sized for N tokens by tk_adapter_workspace_alloc. */
typedef struct {
    size_t n_tok, width, rank;
    float *m;      /* [N, W]   the update m, or gathered dy rows */
    float *t1;     /* [N, W]   gathered / intermediate rows */
    float *t2;     /* [N, W]   */
    float *t3;     /* [N, W]   */
    float *r1;     /* [N, R]   */
    float *r2;     /* [N, R]   */
    int32_t *idx;  /* [N]      kept rows */
    float *ba;     /* [W, W]   DoRA's B A product, O x I (allocated only when DoRA is used) */
    size_t ba_cap;
    /* Time spent (benchmarks read these): in the adapter branches; in the frozen matmuls (the base
     * weights' sgemm, and the model's lm_head); in attention (the model adds it). */
    double secs_branch_fwd, secs_branch_bwd;
    double secs_base_fwd, secs_base_bwd;
    double secs_attn_fwd, secs_attn_bwd;
    float *wconv;  /* [wconv_n] BF16 -> fp32 conversion block for BF16-resident base weights */
    size_t wconv_n;
    float *lane;   /* [TK_BRANCH_LANES, lane_n] the fused LoRA branch's per-lane buffers (adapter.c) */
    size_t lane_n;
    int32_t *lane_idx; /* [TK_BRANCH_LANES, TK_BRANCH_CHUNK] kept rows of a lane's current chunk */
    float *cval;   /* [N]      c_i of the fused backward, pushed to the statistics in token order */
    float *bt;     /* [R, W]   B^T of the module whose fused LoRA forward is running */
    int rows_alone; /* set by tk_adapted_forward_rows: the LoRA branch computes row by row */
} tk_adapter_ws;

/* The fused LoRA branch splits the N rows into this many lanes of consecutive rows, run in parallel,
 * each in chunks of TK_BRANCH_CHUNK rows. Fixed (not the thread count) so that the lanes' partial
 * gradient sums, and so every result, are the same for any number of threads. */
#define TK_BRANCH_LANES 4
#define TK_BRANCH_CHUNK 64

int tk_adapter_ws_alloc(tk_adapter_ws *ws, size_t n_tok, size_t width, size_t rank, size_t ba_numel,
                        tk_err *err);
void tk_adapter_ws_free(tk_adapter_ws *ws);

typedef struct {
    tk_adapter_kind kind;
    int gated;
    size_t in, out, r; /* I, O, R */
    float scale;
    float dropout;
    tk_act act;
    /* base weight */
    float *w0;       /* [O,I] (read-only unless the base weight is trainable); NULL when BF16-resident or packed */
    const uint16_t *w0_bf16; /* [O,I] the base weight kept as BF16 (LoRA and bottleneck only) */
    const float *w0_packed;  /* [O,I] the frozen base weight in tk_linear_pack's panels (tk_llama_pack_frozen) */
    const uint16_t *w0_packed_bf16; /* [O,I] the same panels of a BF16-resident base weight */
    const uint16_t *w0_dot;  /* [O,I] in tk_bf16dot_pack's panels, computed in BF16 (--compute bf16) */
    float *dw0;      /* [O,I], NULL when frozen */
    /* branch parameters: views into the trainable block (NULL for kind NONE) */
    float *A, *dA;     /* [R,I]  lora_A, or adapter_down */
    float *B, *dB;     /* [O,R]  lora_B, or adapter_up */
    float *mag, *dmag; /* [O]    DoRA magnitude */
    float *E, *dE;     /* [R]    AdaLoRA's lora_E (PEFT stores it [R,1]) */
    /* threshold state */
    float tau;
    float lambda;
    /* the random rule (the chance control): S_i ~ Bernoulli(rand_keep) instead of [r_i >= tau] when
     * rand_keep > 0; a training forward draws rand_key from its rng (a replay reuses it), other forwards
     * derive it from rand_seed and a count of calls */
    float rand_keep;
    uint64_t rand_seed, rand_calls, rand_key;
    int straight_through; /* backward as if every token were kept (gate.h, straight_through) */
    tk_gate_stats stats;
    /* activations of one micro-batch (tk_adapted_alloc) */
    size_t cap;
    float *xd;      /* [N,I] dropout(x), only when dropout > 0 */
    uint8_t *keepx; /* [N,I] dropout keep mask, only when dropout > 0 */
    float *u;       /* [N,R] A x~, or the bottleneck pre-activation */
    float *base;    /* [N,O] W0 x~ (DoRA) */
    float *rr;      /* [N]   r_i */
    uint8_t *S;     /* [N]   gate */
    uint8_t *S_bwd; /* [N]   all ones: the gate the backward sees with straight_through */
    float *dora_c;  /* [O]   mag / ||W0 + s B A||_row */
    float *dora_wn; /* [O]   ||W0 + s B A||_row */
    float *ae;      /* [R,I] AdaLoRA: diag(E) A, the effective lora_A of the last forward */
    float *dae;     /* [R,I] AdaLoRA: the gradient reaching diag(E) A in backward */
} tk_adapted_linear;

int tk_adapted_alloc(tk_adapted_linear *L, size_t n_tok, tk_err *err);
void tk_adapted_free(tk_adapted_linear *L);

/* The train argument of tk_adapted_forward. REPLAY recomputes a TRAIN forward exactly (activation
 * recomputation): the dropout mask sampled then is reused and no statistics are recorded again. */
enum { TK_FWD_EVAL = 0, TK_FWD_TRAIN = 1, TK_FWD_REPLAY = 2 };

/* y [N,O] = W0 x + S * m. x [N,I]. valid [N] (1 = real token; NULL = all). With train == TK_FWD_TRAIN
 * the dropout is sampled from rng and r_i of valid tokens are pushed to L->stats; with train == 0
 * dropout is off and statistics are not recorded (the gate still applies); TK_FWD_REPLAY: above.
 * Returns -1 only on allocation failure of the statistics. */
int tk_adapted_forward(tk_adapted_linear *L, tk_adapter_ws *ws, float *y, const float *x,
                       const uint8_t *valid, size_t N, int train, tk_rng *rng, tk_err *err);
/* tk_adapted_forward with train 0 over N rows, each row's result bit-identical to a call with that row
 * alone (N = 1): batched decoding, whose rows are separate sequences. A packed frozen weight runs all
 * rows in one product (tk_frozen_rows_alone) and the LoRA branch then runs its rank-R products row by
 * row; other forms (cblas_sgemm frozen weights, DoRA, bottleneck, the random gate rule) run one call
 * per row. */
int tk_adapted_forward_rows(tk_adapted_linear *L, tk_adapter_ws *ws, float *y, const float *x, size_t N,
                            tk_err *err);
/* forward: h = W0 x + S * M(x).  dx [N,I] += dh W0 + S (dM/dx)^T dh; parameter gradients +=;
 * c_i of valid tokens pushed to L->stats. dy is not modified. */
int tk_adapted_backward(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy,
                        const float *x, const uint8_t *valid, size_t N, tk_err *err);
/* As tk_adapted_backward, with dx written (dh W0 + the branch's part) instead of added to: its old
 * contents are never read, so the first module that feeds a gradient needs no zero-fill before it. */
int tk_adapted_backward_into(tk_adapted_linear *L, tk_adapter_ws *ws, float *dx, const float *dy,
                             const float *x, const uint8_t *valid, size_t N, tk_err *err);

/* The number of parameters of the branch (A, B, and DoRA's magnitude or AdaLoRA's E). */
size_t tk_adapted_numel(const tk_adapted_linear *L);

#endif
