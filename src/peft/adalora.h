/* adalora.h: AdaLoRA's training machinery, as Hugging Face PEFT's AdaLoraModel and RankAllocator do it
 * (docs/adalora.md): the orthogonal regulariser, the importance scores, the cubic budget schedule and
 * the masking of the least important triplets. The adaptation itself (m = s B (E . A) x) is a kind of
 * adapted linear (adapter.h).
 *
 * Per module, with A [R,I] (lora_A), E [R] (lora_E), B [O,R] (lora_B), s = alpha / (init_r + 1e-5):
 *   orthogonal regulariser   R = (1 / 2M) sum_modules ( ||A A^T - I||_F + ||B^T B - I||_F ),
 *                            loss += orth_reg_weight * R  (M modules)
 *   sensitivity (per entry)  ipt = |w . g|       (w after the optimizer step, g its gradient)
 *   smoothed                 ipt_bar = beta1 ipt_bar + (1 - beta1) ipt
 *   uncertainty              unc_bar = beta2 unc_bar + (1 - beta2) |ipt - ipt_bar|
 *   entry score              ipt_bar . unc_bar
 *   triplet j's score        S_j = score(E_j) + (mean_i score(A_ji) + mean_o score(B_oj))
 *   budget at step t         b(t) = init_bgt                           t <= tinit
 *                                 = target_bgt                         t >  T - tfinal
 *                                 = floor((init_bgt - target_bgt) (1 - (t - tinit) / (T - tfinal - tinit))^3
 *                                         + target_bgt)                otherwise
 *   masking                  the (init_bgt - b) lowest triplet scores over all modules: E_j = 0 where
 *                            S_j <= the k-th smallest score (torch.kthvalue), so ties mask together
 * init_bgt = the modules' ranks summed; target_bgt = target_r * M. Steps t count from 0 (PEFT's
 * update_and_allocate(global_step) after optimizer.step()). At t < T - tfinal the scores are updated
 * and, when t > tinit and t % deltaT == 0, the budget is applied; at t = T - tfinal the final budget is
 * applied and the scores are cleared; after it, every step re-applies that final pattern.
 *
 *   tk_adalora *a = tk_adalora_new(&pc->ada, mods, layer, proj, n, &err);   // mods stay owned by caller
 *   double reg = tk_adalora_orth(a, w, dA, dB);        // after backward: adds w dR into dA[i], dB[i]
 *   ... clip, optimizer step ...
 *   tk_adalora_update(a, step - 1, pc, &err);          // scores, budget, masks; pc->ada.rank updated
 *   tk_adalora_free(a);
 */
#ifndef TK_PEFT_ADALORA_H
#define TK_PEFT_ADALORA_H

#include "../common.h"
#include "adapter.h"
#include "peft_config.h"

#include <stddef.h>
#include <stdint.h>

/* One module's allocator state (read-only to callers). */
typedef struct {
    tk_adapted_linear *L;
    int layer, proj;
    float *ipt_a, *unc_a; /* [R,I] smoothed sensitivity and uncertainty of lora_A */
    float *ipt_b, *unc_b; /* [O,R] of lora_B */
    float *ipt_e, *unc_e; /* [R]   of lora_E */
    float *score;         /* [R]   triplet scores of the last masking by budget */
    uint8_t *keep;        /* [R]   the current pattern (1 = kept) */
} tk_adalora_module;

typedef struct {
    tk_adalora_config cfg;   /* rank entries not used (NULL) */
    size_t n;
    tk_adalora_module *mod;  /* [n] */
    long init_bgt, target_bgt;
    long budget;             /* of the last update */
    int masked;              /* the last update applied a mask */
    int final_set;           /* the final pattern is fixed (t >= T - tfinal) */
} tk_adalora;

/* mods [n] (AdaLoRA modules, all with rank init_r), with their layer and projection indices. cfg's
 * total_step must be set. Returns NULL with err set on allocation failure. */
tk_adalora *tk_adalora_new(const tk_adalora_config *cfg, tk_adapted_linear *const *mods, const int *layer,
                           const int *proj, size_t n, tk_err *err);
void tk_adalora_free(tk_adalora *a);

/* The orthogonal regulariser R (formula above). Adds w * dR/dA into gA[i] [R,I] and w * dR/dB into
 * gB[i] [O,R] for module i (NULL arrays: value only). Returns R (not times w). */
double tk_adalora_orth(const tk_adalora *a, float w, float *const *gA, float *const *gB);

/* The budget b(t) and whether step t masks (mask_ind of PEFT's budget_schedule). */
long tk_adalora_budget(const tk_adalora *a, int t, int *mask);

/* PEFT's update_and_allocate(t) after the optimizer step of 0-based step t, the modules' gradients
 * still in place: updates the scores, masks lora_E, and writes the pattern into pc's rank_pattern
 * whenever a mask was computed. */
int tk_adalora_update(tk_adalora *a, int t, tk_peft_config *pc, tk_err *err);

#endif
