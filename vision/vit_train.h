/* vit_train.h: the training forward and the backward of the CLIP / SigLIP towers (vit.h).
 *
 *   tk_vit_act *a = tk_vit_act_alloc(m, Bmax, &err);         // activations of up to Bmax images
 *   tk_vit *g = tk_vit_zeros(&m->cfg, &err);                  // gradients, same layout as m (or NULL)
 *   tk_vit_select sel = {.pooled = 1};                        // or a hidden-state selection
 *   tk_vit_train_forward(m, a, out, pixels, B, &sel, &err);   // out [B, C] pooled
 *   tk_vit_train_backward(m, a, g, dpixels, dout, &err);      // g +=, dpixels += (either may be NULL)
 *
 * The forward is tk_vit_forward's arithmetic (the same kernels in the same order, so the same
 * numbers) with every activation the backward needs kept, layer by layer:
 *   per layer  x (its input), layer_norm1 out/mean/rstd, q, k, v, softmax probabilities [B,H,T,T],
 *              the attention output, x after attention, layer_norm2 out/mean/rstd, fc1 output, act
 *   embedding  the im2col patches and (CLIP) the pre_layrnorm input with its mean/rstd
 * so (8 C + 2 F + H T) floats per token per layer. Only the layers the selection needs run.
 *
 * Outputs (tk_vit_select):
 *   .pooled = 0  the selected hidden state [B, To, C] as tk_vit_forward (layer, feature, post_norm)
 *   .pooled = 1  pooler_output [B, C], as transformers: CLIP post_layernorm(last hidden state)[:, 0]
 *                (the class token); SigLIP with its head, head(post_layernorm(last)); SigLIP without
 *                a head, the mean over the patches of post_layernorm(last) (SiglipForImageClassification).
 *
 * At another image size (tk_vit_set_image_size with interpolation) the forward adds m->pos_run and the
 * backward maps d(pos_run) back to g->pos through the map's transpose (pos_interp.h); after changing
 * m->pos (an optimizer step) call tk_vit_pos_refresh. g has the checkpoint's layout (tk_vit_zeros(&m->cfg)).
 *
 * Backward: gradients ADD (ops.h convention) into g's tensors (g NULL: no parameter gradients, the
 * frozen tower of an adapter run, only the input-side flow) and into dpixels [B,3,S,S] (NULL: not
 * wanted; the patch-embedding input gradient is then skipped). dout has out's shape.
 *
 * Adapters: tk_vit_act_set_adapters gives each projection (q, k, v, out_proj, fc1, fc2 of every
 * layer) an optional tk_adapted_linear (peft/adapter.h) whose base weight is the tower's; the
 * projection then runs through it (gate, dropout, statistics and the adapter's own gradients as in
 * the LLM) and the tower's bias is added after it, so the gate's base output b_i is W0 x without the
 * bias. A module's base-weight gradient goes where the module says (its dw0) when it has one,
 * otherwise into g.
 *
 * Threads: as vit.c (sgemm for every product, OpenMP row loops). One act per concurrent caller.
 */
#ifndef TK_VISION_VIT_TRAIN_H
#define TK_VISION_VIT_TRAIN_H

#include "common.h"
#include "model/params.h"
#include "peft/adapter.h"
#include "vision/vit.h"

#include <stddef.h>

/* The projections of one layer, in this order (tk_vit_act_set_adapters' table is [L][6]). */
enum { TK_VIT_Q, TK_VIT_K, TK_VIT_V, TK_VIT_O, TK_VIT_FC1, TK_VIT_FC2, TK_VIT_N_PROJ };
/* PEFT's module name of projection j of a layer ("self_attn.q_proj", ..., "mlp.fc2"). */
const char *tk_vit_proj_name(int j);

typedef struct tk_vit_act tk_vit_act;
tk_vit_act *tk_vit_act_alloc(const tk_vit *m, size_t Bmax, tk_err *err);
void tk_vit_act_free(tk_vit_act *a); /* NULL is fine */

/* mods: [n_layers * TK_VIT_N_PROJ] (NULL entries: plain projection), or NULL for none; ws: the
 * adapters' shared scratch (sized for Bmax * T rows); train/rng as tk_adapted_forward's. The table is
 * borrowed: it must outlive the act's use. Every module must be allocated for Bmax * T rows. */
void tk_vit_act_set_adapters(tk_vit_act *a, tk_adapted_linear **mods, tk_adapter_ws *ws, int train,
                             tk_rng *rng);

/* Output tokens per image of sel (1 when pooled). */
size_t tk_vit_train_out_tokens(const tk_vit *m, const tk_vit_select *sel);

/* out [B, tk_vit_train_out_tokens, C]. B <= the act's Bmax (no chunking: the activations of one pass
 * are what the backward uses). -1 with err on a bad selection or B. */
int tk_vit_train_forward(const tk_vit *m, tk_vit_act *a, float *out, const float *pixels, size_t B,
                         const tk_vit_select *sel, tk_err *err);
/* The backward of the last tk_vit_train_forward on a. */
int tk_vit_train_backward(const tk_vit *m, tk_vit_act *a, tk_vit *g, float *dpixels, const float *dout,
                          tk_err *err);

/* Registers every tensor of m in P (a trainable block) as prefix + its name ("vision_model." ->
 * "vision_model.encoder.layers.0.mlp.fc1.weight"): shape [rows, rest] for matrices and convolutions,
 * AdamW's weight decay on those but the position embeddings and SigLIP's probe, bound to m's tensor
 * (its current values are the initial ones) and to g's (gradients: g = tk_vit_zeros(&m->cfg));
 * external as params.h. After tk_params_alloc(P) m's tensors live in P's block. */
int tk_vit_register_params(tk_vit *m, tk_vit *g, tk_params *P, const char *prefix, int external, tk_err *err);

/* ---- the kernels, exposed for the finite-difference tests ------------------------------------ */
/* the forward, tk_vit_attention_forward, is in vit.h */
/* forward: att = softmax(q k^T / sqrt(D)) v.  dq, dk, dv [T,C] +=; scratch [T*T]. */
void tk_vit_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *datt,
                               const float *probs, const float *q, const float *k, const float *v,
                               size_t T, size_t H, size_t D);
/* The backward of tk_vit_im2col (vit.h): adds patch gradients back into dpixels (the patches do not
 * overlap: a scatter). */
void tk_vit_col2im_add(float *dpixels, const float *dpatches, size_t B, size_t ch, size_t S, size_t P);

#endif
