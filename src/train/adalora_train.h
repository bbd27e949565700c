/* adalora_train.h: AdaLoRA inside `tspeft train` (docs/adalora.md): the orthogonal regulariser added
 * to each step's loss and gradients, and the rank allocator run after each optimizer step, as PEFT's
 * AdaLoraModel.forward and update_and_allocate(global_step) do.
 *
 *   tk_adalora_run *ar = NULL;
 *   tk_adalora_run_open(&ar, m, steps, dump_dir, &err);   // ar stays NULL for other adapters
 *   ... backward, gradients summed over ranks ...
 *   double reg;  tk_adalora_run_reg(ar, step, &reg, &err);  loss += reg;   // w * R, gradients added
 *   ... clip, AdamW ...
 *   tk_adalora_run_step(ar, m, step, &err);               // scores, budget, masks, rank_pattern
 *   tk_adalora_run_free(ar);
 *
 * With a dump directory, each of the first TK_ADALORA_DUMP_STEPS steps writes
 * DIR/adalora-step<k>.safetensors (the parity test reads it): per module <key>.lora_{A,B,E} (after the
 * optimizer step, before masking), .grad (the gradient the scores saw), .lora_{A,B}.orth_grad (w dR),
 * .lora_{A,B,E}.ipt and .unc (the smoothed scores after the update), .score (triplet scores of a
 * masking step), .keep (I64 pattern) and .lora_E.masked; and orth_reg (R), budget and masked (I64).
 */
#ifndef TK_TRAIN_ADALORA_TRAIN_H
#define TK_TRAIN_ADALORA_TRAIN_H

#include "../common.h"
#include "../model/llama.h"
#include "../peft/adalora.h"

#define TK_ADALORA_DUMP_STEPS 4

typedef struct tk_adalora_run tk_adalora_run;

/* For an AdaLoRA model: sets total_step (when unset) to steps, checks the schedule, and makes the
 * allocator (*out; NULL for any other adapter). An adapter whose ranks are already allocated (it came
 * with a rank_pattern, each module holding its kept triplets only) keeps them: the regulariser still
 * applies, the allocator does not run. dump_dir may be NULL. */
int tk_adalora_run_open(tk_adalora_run **out, tk_llama *m, int steps, const char *dump_dir, tk_err *err);
void tk_adalora_run_free(tk_adalora_run *ar);
/* Adds orth_reg_weight * dR into the adapters' gradients; *reg = orth_reg_weight * R. */
int tk_adalora_run_reg(tk_adalora_run *ar, int step, double *reg, tk_err *err);
/* update_and_allocate(step - 1) after the optimizer step of 1-based `step`. */
int tk_adalora_run_step(tk_adalora_run *ar, tk_llama *m, int step, tk_err *err);

#endif
