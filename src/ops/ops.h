/* ops.h: the fp32 kernels of the LLaMA decoder, each a forward/backward pair.
 *
 * Shape legend (outermost first):
 *   N  tokens in a batch (B*T, rows of every activation matrix)
 *   B  sequences, T positions per sequence (queries), S key positions (S >= T with a KV cache)
 *   C  model width, F MLP width, V vocabulary
 *   H  query heads, G key/value heads (H % G == 0), D head width (C = H*D for LLaMA)
 *   I, O  input and output width of a linear layer
 *
 * Gradient convention: every backward ADDS into its gradient buffers (dx, dw, ...). The trainer zeroes
 * the flat gradient block once per optimizer step and activation gradients once per use. The one
 * exception is tk_cross_entropy_backward, which seeds the backward pass and so writes.
 * Any gradient pointer may be NULL when that gradient is not needed.
 *
 * Threads: kernels use OpenMP on outer loops with disjoint writes; matmuls call cblas_sgemm from
 * outside any parallel region, except tk_attention_forward/backward, which run one head (or
 * key/value group) per thread with single-threaded products inside the region (tk_gemm_small, or
 * cblas_sgemm, which runs single-threaded there: attention.c says why; the fused LoRA branch in
 * peft/adapter.c does the same with row lanes). Thread counts are set by tk_set_threads (common.h).
 */
#ifndef TK_OPS_H
#define TK_OPS_H

#include <stddef.h>
#include <stdint.h>

/* ---- linear: y = x w^T (+ beta*y) through cblas_sgemm ---------------------------------------- */
/* y [N,O], x [N,I], w [O,I]. beta 0 overwrites y, 1 accumulates. */
void tk_linear_forward(float *y, const float *x, const float *w, size_t N, size_t I, size_t O,
                       float beta);
/* forward: y = x w^T.  dx [N,I] += dy w;  dw [O,I] += dy^T x. */
void tk_linear_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                        size_t N, size_t I, size_t O);
/* dx [N,I] = dy [N,O] w + beta * dx; beta 0 overwrites dx (its old contents are never read). */
void tk_linear_backward_dx(float *dx, const float *dy, const float *w, size_t N, size_t I, size_t O, float beta);
/* Plain-loop references of the two above, for tests. */
void tk_linear_forward_ref(float *y, const float *x, const float *w, size_t N, size_t I, size_t O,
                           float beta);
void tk_linear_backward_ref(float *dx, float *dw, const float *dy, const float *x, const float *w,
                            size_t N, size_t I, size_t O);

/* ---- embedding ------------------------------------------------------------------------------- */
/* out [N,C] = table[ids[n]]; table [V,C]. ids must be validated (0 <= id < V) by the caller. */
void tk_embedding_forward(float *out, const int32_t *ids, const float *table, size_t N, size_t C);
/* forward: out[n] = table[ids[n]].  dtable [V,C] += scatter of dout [N,C]. */
void tk_embedding_backward(float *dtable, const float *dout, const int32_t *ids, size_t N, size_t C);

/* ---- RMSNorm (HF LlamaRMSNorm: y = w * x / sqrt(mean(x^2) + eps)) ------------------------------ */
/* y [N,C], rstd [N] (cached 1/sqrt(mean(x^2)+eps)), x [N,C], w [C]. */
void tk_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, size_t N, size_t C,
                        float eps);
/* forward: y = w * x * rstd.  dx [N,C] +=, dw [C] +=. */
void tk_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         const float *rstd, size_t N, size_t C);

/* ---- RoPE (HF rotate_half: pairs (j, j+D/2) within each head) --------------------------------- */
/* inv_freq [D/2] (from the config, including llama3 scaling). cos/sin [P, D/2] for positions 0..P-1. */
void tk_rope_table(float *cos_t, float *sin_t, const float *inv_freq, size_t P, size_t D);
/* In place on x [B,T,H,D]; token (b,t) has position pos0 + t. cos/sin tables cover pos0+T. */
void tk_rope_forward(float *x, const float *cos_t, const float *sin_t, size_t B, size_t T, size_t H,
                     size_t D, size_t pos0);
/* forward: y = x*cos + rotate_half(x)*sin.  In place: dx (on entry dy) becomes dL/dx. This is the
 * one kernel whose backward transforms in place rather than adds (the rotation is orthogonal). */
void tk_rope_backward(float *dx, const float *cos_t, const float *sin_t, size_t B, size_t T, size_t H,
                      size_t D, size_t pos0);

/* ---- small single-thread products (attention's pieces) ------------------------------------------ */
/* C [M,N] = alpha * A B (+ C when acc), A [M rows, stride lda], B [K rows, stride ldb], C [M rows,
 * stride ldc], row-major. An AVX-512 kernel where the CPU has it, else cblas_sgemm
 * (also with TSPEFT_GEMM_SMALL=blas); either way one thread, results independent of the thread count.
 * tk_gemm_small_avx512 says which: 1 for the AVX-512 kernel, 0 for cblas_sgemm. gemm_small.c */
void tk_gemm_small(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda, const float *B,
                   size_t ldb, int acc, float *C, size_t ldc);
int tk_gemm_small_avx512(void);
/* The same product with B's row k at Brows[k] and C's row m at Crows[m] (N columns each): rows
 * gathered by pointer instead of copied. AVX-512 kernel only (call when tk_gemm_small_avx512()). */
void tk_gemm_small_rows(size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                        const float *const *Brows, int acc, float *const *Crows);

/* ---- causal self-attention with grouped-query heads and a key padding mask --------------------- */
/* out [B,T,H*D], probs [B*H, tk_attention_probs_head(T,S)] (softmax weights cached for backward),
 * q [B,T,H*D], k,v [B,S,G*D], key_mask [B,S] (1 = real token, NULL = all real). Query t sits at
 * absolute position (S - T) + t and sees keys 0..(S-T)+t that are real. A query that sees no real key
 * outputs zeros. Scores are scaled by 1/sqrt(D). probs holds the raw scores in between (no scratch
 * needed). */
/* probs of one (b, h) holds only the keys each block of query rows can see: row t starts at the
 * returned offset and holds *width (>= its own S-T+t+1) probabilities of keys 0..*width-1, those
 * past the row's causal limit 0; tk_attention_probs_head is its size (<= T*S). */
size_t tk_attention_probs_row(size_t T, size_t S, size_t t, size_t *width);
size_t tk_attention_probs_head(size_t T, size_t S);
void tk_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                          const uint8_t *key_mask, size_t B, size_t T, size_t S, size_t H, size_t G,
                          size_t D);
/* forward: out = softmax(q k^T / sqrt(D) + mask) v.  dq [B,T,H*D] +=, dk, dv [B,S,G*D] +=.
 * scratch: at least T*S floats (split into one slab per thread). Results do not depend on the
 * thread count. */
void tk_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *probs, const float *q, const float *k, const float *v,
                           size_t B, size_t T, size_t S, size_t H, size_t G, size_t D);

/* ---- SwiGLU: out = silu(gate) * up -------------------------------------------------------------- */
/* out, gate, up [N*F] (flat). */
void tk_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
/* forward: out = silu(gate) * up.  dgate +=, dup +=. */
void tk_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);
/* As tk_swiglu_backward, with dgate and dup (both non-NULL) written instead of added to: their old
 * contents are never read, so they need no zero-fill. */
void tk_swiglu_backward_into(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                             size_t n);

/* ---- shifted cross-entropy -------------------------------------------------------------------- */
/* targets [N]: the label each row predicts, -100 = ignored (the model shifts labels beforehand).
 * losses [N] = -log softmax(logits[n])[targets[n]] (0 where ignored). logits [N,V].
 * Returns the sum of losses over non-ignored rows, in double. */
double tk_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets,
                                size_t N, size_t V);
/* forward: loss = scale * sum_n -log softmax(logits[n])[targets[n]].
 * WRITES dlogits [N,V] = scale * (softmax(logits) - onehot(target)), zero rows where ignored.
 * dlogits may alias logits. */
void tk_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               size_t N, size_t V, float scale);
/* Both at once (one exponential per logit): losses [N] as the forward (returns their sum), dlogits
 * [N,V] as the backward (may alias logits). Equal to calling the two up to the order of the sums. */
double tk_cross_entropy_fused(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                              size_t N, size_t V, float scale);

/* ---- memory-efficient (tiled, FlashAttention-2 style) attention -------------------------------- */
/* Same semantics as tk_attention_forward, without the [B,H,T,S] probs: query and key blocks are
 * visited with an online softmax and only the row log-sum-exp is kept for the backward.
 * out [B,T,H*D] (overwritten), lse [B,H,T] (overwritten: log sum_j exp(scaled masked score), -INFINITY
 * for a row that sees no key), q [B,T,H*D], k, v [B,S,G*D], key_mask [B,S] or NULL,
 * scratch [tk_attention_tiled_scratch(T, S, D)]. */
void tk_attention_tiled_forward(float *out, float *lse, const float *q, const float *k,
                                const float *v, const uint8_t *key_mask, size_t B, size_t T,
                                size_t S, size_t H, size_t G, size_t D, float *scratch);
/* forward: out = softmax(q k^T / sqrt(D) + mask) v.  dq [B,T,H*D] +=, dk, dv [B,S,G*D] += (or NULL).
 * out and lse are the forward's outputs, key_mask its mask; scratch as for the forward. Rows that see
 * no key get zero gradients. */
void tk_attention_tiled_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                                 const float *out, const float *lse, const float *q, const float *k,
                                 const float *v, const uint8_t *key_mask, size_t B, size_t T,
                                 size_t S, size_t H, size_t G, size_t D);
/* Floats of scratch either tiled kernel needs: 2*bq*bk + 2*bq with bq = min(64, T), bk = min(256, S),
 * so at most 32896 whatever T and S (D is not used). */
size_t tk_attention_tiled_scratch(size_t T, size_t S, size_t D);

/* ---- BF16-resident frozen weights (linear_bf16.c) ---------------------------------------------- */
/* As tk_linear_forward / the dx half of tk_linear_backward, with w [O,I] stored as BF16 and converted
 * block by block into scratch (scratch_n floats, at least I). */
void tk_linear_bf16_forward(float *y, const float *x, const uint16_t *w, size_t N, size_t I, size_t O, float beta,
                            float *scratch, size_t scratch_n);
void tk_linear_bf16_backward(float *dx, const float *dy, const uint16_t *w, size_t N, size_t I, size_t O,
                             float *scratch, size_t scratch_n);
/* out [N,C] = fp32(table[ids[n]]), table [V,C] BF16. */
void tk_embedding_bf16_forward(float *out, const int32_t *ids, const uint16_t *table, size_t N, size_t C);

/* ---- a frozen weight in whichever form the model holds it (linear_frozen.c) -------------------- */
/* w [O,I]: pd, when set, is used (the model may keep its fp32 copy too: a tied lm_head); else exactly
 * one of the other four is set. f: fp32; h: BF16 (converted block by block into scratch of scratch_n
 * floats, at least I); pf / ph: fp32 / BF16 in tk_linear_pack's panels; pd: BF16 in tk_bf16dot_pack's
 * panels, computed in BF16 with fp32 accumulation (--compute bf16). */
typedef struct {
    const float *f;
    const uint16_t *h;
    const float *pf;
    const uint16_t *ph;
    const uint16_t *pd;
} tk_frozen;
/* y [N,O] = x [N,I] w^T (y is overwritten). */
void tk_frozen_forward(float *y, const float *x, tk_frozen w, size_t N, size_t I, size_t O, float *scratch,
                       size_t scratch_n);
/* forward: y = x w^T.  dx [N,I] = dy [N,O] w + beta * dx, beta 0 (dx overwritten, never read) or 1. */
void tk_frozen_backward(float *dx, const float *dy, tk_frozen w, size_t N, size_t I, size_t O, float beta,
                        float *scratch, size_t scratch_n);
/* 1 when tk_frozen_forward computes every row of x exactly as a call with that row alone would (the
 * packed fp32 and BF16-compute kernels: each output summed in k order, whatever the rows around it); 0
 * for cblas_sgemm, whose results for a row change with the number of rows (its kernels differ by row
 * tile). */
int tk_frozen_rows_alone(tk_frozen w);

/* ---- transpose (transpose.c) ------------------------------------------------------------------ */
/* out [cols rows, stride ldo] = in [rows rows, stride ldi]^T: out[c ldo + r] = in[r ldi + c]. */
void tk_transpose(float *out, size_t ldo, const float *in, size_t ldi, size_t rows, size_t cols);

/* ---- frozen weights in panels for an AVX-512 kernel (linear_packed.c) ------------------------- */
/* 1 where the packed kernel runs (AVX-512F, and TSPEFT_PACKED is not 0): only then pack weights. */
int tk_linear_packed_available(void);
/* w [O,I] -> the same O I floats in panels of 64 rows, each transposed: w[64p I + k w_p + j] = old
 * w[64p + j][k], w_p = min(64, O - 64p). In place; -1 when out of memory (w then unchanged). */
int tk_linear_pack(float *w, size_t O, size_t I);
/* y [N,O] = x [N,I] w^T, w packed by tk_linear_pack (y is overwritten, never read). */
void tk_linear_packed_forward(float *y, const float *x, const float *wp, size_t N, size_t I, size_t O);
/* forward: y = x w^T.  dx [N,I] = dy [N,O] w + beta * dx, w packed; beta 0 or 1 (0: dx is overwritten,
 * never read). */
void tk_linear_packed_backward(float *dx, const float *dy, const float *wp, size_t N, size_t I, size_t O,
                               float beta);
/* The same three for a BF16-resident weight (the panels hold BF16; blocks are converted exactly to
 * fp32 before the kernel reads them, so the results equal the fp32 kernel's on the converted weight). */
int tk_linear_pack_bf16(uint16_t *w, size_t O, size_t I);
void tk_linear_packed_forward_bf16(float *y, const float *x, const uint16_t *wp, size_t N, size_t I, size_t O);
void tk_linear_packed_backward_bf16(float *dx, const float *dy, const uint16_t *wp, size_t N, size_t I, size_t O,
                                    float beta);

/* ---- frozen weights computed in BF16 with fp32 accumulation (linear_bf16dot.c) ---------------- */
/* 1 where the CPU has AVX-512F, AVX-512BW and AVX512-BF16 (cpuid, at run time) and TSPEFT_BF16DOT is not
 * 0: only then may the three below run. */
int tk_bf16dot_available(void);
/* BF16 values of w [O,I] in the kernel's layout: O rounded up to 64 times I rounded up to even. */
size_t tk_bf16dot_size(size_t O, size_t I);
/* wd [tk_bf16dot_size(O, I)] = w [O,I] (fp32 w rounded to nearest even, or BF16 wh as it is; the other
 * NULL) in panels of 64 rows holding pairs along I: wd[64p Ip + 128 kp + 2j + e] = w[64p + j][2kp + e],
 * zero past w's rows and columns (Ip = I rounded up to even). Any CPU. */
void tk_bf16dot_pack(uint16_t *wd, const float *w, const uint16_t *wh, size_t O, size_t I);
/* y [N,O] = bf16(x [N,I]) w^T, products of BF16 values summed in fp32 (y is overwritten). */
void tk_bf16dot_forward(float *y, const float *x, const uint16_t *wd, size_t N, size_t I, size_t O);
/* forward: y = x w^T.  dx [N,I] = bf16(dy [N,O]) w + beta * dx, beta 0 (dx overwritten) or 1.
 * Both round the activations into one buffer kept between calls: call from serial code. */
void tk_bf16dot_backward(float *dx, const float *dy, const uint16_t *wd, size_t N, size_t I, size_t O, float beta);

/* ---- LayerNorm (torch.nn.LayerNorm over the last dimension; layernorm.c) ---------------------- */
/* y [N,C] = (x - mean) * rstd * w + b; mean, rstd [N] cached for backward (NULL when not needed),
 * x [N,C], w [C], b [C] or NULL. y may alias x. */
void tk_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *w,
                          const float *b, size_t N, size_t C, float eps);
/* forward: y = (x - mean) * rstd * w + b.  dx [N,C] +=, dw [C] +=, db [C] += (each may be NULL). */
void tk_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, const float *mean, const float *rstd, size_t N, size_t C);

/* ---- GELU family (gelu.c) ---------------------------------------------------------------------- */
typedef enum {
    TK_GELU_ERF,   /* exact: 0.5 x (1 + erf(x / sqrt 2)); HF "gelu", LLaVA's mlp2x_gelu */
    TK_GELU_TANH,  /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); "gelu_pytorch_tanh" (SigLIP) */
    TK_GELU_QUICK, /* x sigmoid(1.702 x); "quick_gelu" (CLIP) */
} tk_gelu_kind;
/* y [n] = gelu(x [n]); y may alias x. */
void tk_gelu_forward(float *y, const float *x, size_t n, tk_gelu_kind kind);
/* forward: y = gelu(x).  dx [n] += dy * gelu'(x). */
void tk_gelu_backward(float *dx, const float *dy, const float *x, size_t n, tk_gelu_kind kind);
/* HF's name of the variant ("gelu", "gelu_pytorch_tanh", "quick_gelu"). */
const char *tk_gelu_name(tk_gelu_kind kind);

#endif
