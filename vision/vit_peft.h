/* vit_peft.h: PEFT adapters (LoRA, DoRA, bottleneck; TS-gated or not) on a vision tower's
 * projections: which modules, their tensors in the trainable block under PEFT's names, their
 * initialisation, the threshold step, and their place in a saved adapter.
 *
 *   tk_vit_peft *vp = tk_vit_peft_new(m, &pc, "base_model.model.vision_model.", &err);
 *   tk_vit_peft_register(vp, &P, &err);   // lora_A / lora_B (/ magnitude) into the trainable block
 *   tk_params_alloc(&P, &err);  tk_vit_peft_init(vp, seed);  tk_vit_peft_alloc(vp, B * T, &err);
 *   tk_vit_act_set_adapters(act, tk_vit_peft_table(vp), tk_vit_peft_ws(vp), TK_FWD_TRAIN, &rng);
 *   per step: tk_vit_peft_reset_stats(vp); forward/backward ...; tk_vit_peft_update_gates(vp, step, &err);
 *   tk_vit_peft_free(vp);
 *
 * Modules: tower projection j of layer l is adapted when tk_peft_vit_targets(pc, l, j). Its PEFT key is
 * key_prefix + "encoder.layers.L." + "self_attn.q_proj" (...): "base_model.model.vision_model." for a
 * tower alone (transformers' CLIPForImageClassification / SiglipForImageClassification name their
 * tower vision_model), "base_model.model.vision_tower.vision_model." in a LLaVA model. Tensors:
 * KEY.lora_A.weight [r, in], KEY.lora_B.weight [out, r], KEY.lora_magnitude_vector [out] (DoRA),
 * or KEY.adapter_down.weight / KEY.adapter_up.weight; gated modules add KEY.ts_tau (and KEY.ts_lambda
 * with a target keep ratio) when saved. Initialisation as PEFT: A U(-1/sqrt(in), 1/sqrt(in)), B 0,
 * magnitude ||W0||_row. The threshold step is tk_gate_update per module (the tau scope is always the
 * module). The base weights stay the tower's (frozen unless the caller gives modules a dw0).
 *
 * Ownership: vp borrows m and copies pc; its modules' parameter pointers point into the trainable
 * block the caller allocates. Failure: NULL / -1 with err.
 */
#ifndef TK_VISION_VIT_PEFT_H
#define TK_VISION_VIT_PEFT_H

#include "common.h"
#include "model/params.h"
#include "peft/adapter.h"
#include "peft/peft_config.h"
#include "vision/vit.h"

typedef struct tk_vit_peft tk_vit_peft;

tk_vit_peft *tk_vit_peft_new(const tk_vit *m, const tk_peft_config *pc, const char *key_prefix, tk_err *err);
void tk_vit_peft_free(tk_vit_peft *vp); /* NULL is fine */
/* Adapted modules. */
size_t tk_vit_peft_count(const tk_vit_peft *vp);
/* Module i (0 <= i < count) in (layer, projection) order: its layer, projection and module. */
tk_adapted_linear *tk_vit_peft_module(tk_vit_peft *vp, size_t i, int *layer, int *proj);
/* Its PEFT module key (key_prefix + "encoder.layers.L.self_attn.q_proj"). */
void tk_vit_peft_key(const tk_vit_peft *vp, int layer, int proj, char *buf, size_t n);
/* The table tk_vit_act_set_adapters takes ([n_layers * TK_VIT_N_PROJ], NULL where not adapted). */
tk_adapted_linear **tk_vit_peft_table(tk_vit_peft *vp);
tk_adapter_ws *tk_vit_peft_ws(tk_vit_peft *vp);

int tk_vit_peft_register(tk_vit_peft *vp, tk_params *P, tk_err *err);
/* Re-reads the modules' base weights from the tower (after its tensors moved into a trainable block). */
void tk_vit_peft_bind_base(tk_vit_peft *vp);
void tk_vit_peft_init(tk_vit_peft *vp, uint64_t seed);
/* Activations of n_tok rows (B * T) for every module, and the shared scratch. */
int tk_vit_peft_alloc(tk_vit_peft *vp, size_t n_tok, tk_err *err);
void tk_vit_peft_reset_stats(tk_vit_peft *vp);
/* tk_gate_update of every gated module (step 1-based). */
int tk_vit_peft_update_gates(tk_vit_peft *vp, int step, tk_err *err);
/* Entries ts_tau (/ ts_lambda) of the gated modules for tk_st_write: fills e[0..) (names kept inside vp
 * until the next call) and returns the count (at most 2 * count). */
size_t tk_vit_peft_gate_entries(tk_vit_peft *vp, tk_st_entry *e);
/* Reads ts_tau (/ ts_lambda) of the gated modules from an adapter file (absent: tau0). */
int tk_vit_peft_load_gates(tk_vit_peft *vp, const tk_st_file *f, tk_err *err);

#endif
