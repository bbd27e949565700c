/* peft_config.h: which modules carry which adapter, as Hugging Face PEFT's adapter_config.json
 * describes it (LoRA / DoRA, or LLM-Adapters' bottleneck), plus the TS-PEFT "ts_peft" object.
 * The file layout is documented in docs/formats.md.
 *
 *   tk_peft_config pc;
 *   tk_peft_config_default(&pc);                     // LoRA r=8 alpha=16 on q_proj,v_proj, no gate
 *   tk_peft_config_load(&pc, "adapter/adapter_config.json", &err);
 *   if (tk_peft_targets(&pc, layer, TK_PROJ_Q)) ...
 *   tk_peft_config_save(&pc, n_layers, "out/adapter_config.json", &err);
 *   tk_peft_config_free(&pc);
 */
#ifndef TK_PEFT_CONFIG_H
#define TK_PEFT_CONFIG_H

#include "../common.h"
#include "adapter.h"
#include "gate.h"

#include <stdint.h>

enum { TK_PROJ_Q, TK_PROJ_K, TK_PROJ_V, TK_PROJ_O, TK_PROJ_GATE, TK_PROJ_UP, TK_PROJ_DOWN, TK_NPROJ };
/* "q_proj", ..., and their parent blocks "self_attn" / "mlp". */
extern const char *const tk_proj_short[TK_NPROJ];
extern const char *const tk_proj_block[TK_NPROJ];
int tk_proj_parse(const char *short_name); /* -1 when not a projection name */

#define TK_MAX_LAYERS 4096

/* The vision tower's adapted projections (CLIP / SigLIP encoder layers), in vision/vit_train.h's
 * order: "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
 * "mlp.fc1", "mlp.fc2". */
#define TK_VIT_NPROJ 6
extern const char *const tk_vit_proj_full[TK_VIT_NPROJ];

/* AdaLoRA (PEFT's AdaLoraConfig; docs/adalora.md). rank_pattern: for a module, which of its init_r
 * triplets (rows of lora_A, entries of lora_E, columns of lora_B) are kept; a module it does not name
 * keeps all init_r. */
#define TK_ADALORA_MAX_R 256
typedef struct {
    int layer, proj;
    uint64_t keep[TK_ADALORA_MAX_R / 64]; /* bit j: triplet j kept */
} tk_rank_entry;

typedef struct {
    int init_r, target_r;   /* initial rank of every module; target average rank */
    int tinit, tfinal;      /* steps before the budget starts to shrink; steps at the final budget */
    int delta_t;            /* deltaT: steps between two maskings while the budget shrinks */
    int total_step;         /* the schedule's length (0: not set; a training run uses its --steps) */
    float beta1, beta2;     /* EMA factors of the sensitivity and of its uncertainty */
    float orth_reg_weight;  /* weight of the orthogonal regulariser */
    int n_rank;             /* rank_pattern entries (0: none, every module at init_r) */
    tk_rank_entry *rank;    /* [n_rank], owned */
} tk_adalora_config;

typedef struct {
    tk_adapter_kind kind; /* LORA, DORA, BOTTLENECK or ADALORA */
    int r;                /* rank or bottleneck_size (AdaLoRA: init_r) */
    float alpha;          /* lora_alpha */
    float dropout;
    int use_rslora;
    float bottleneck_scaling;
    tk_act act;
    unsigned target_mask;  /* bit p set: projection p is adapted (in the layers of layer_sel) */
    int n_modules;         /* explicit full module names given ("model.layers.3.self_attn.q_proj") */
    uint8_t module_mask[TK_MAX_LAYERS]; /* bit p of [l]: layer l's projection p, named in full (PEFT: an
                                           exact name is adapted whatever layers_to_transform says) */
    int n_layer_sel;       /* 0: every layer; else the listed layers */
    int layer_sel[TK_MAX_LAYERS];
    int n_save;            /* modules_to_save: base tensors trained in full */
    char **save;
    tk_gate_config gate;
    char base_model[512];  /* base_model_name_or_path */
    tk_adalora_config ada; /* kind ADALORA only */
    /* vision tower targets: names under a tower prefix ("vision_tower.vision_model." in a LLaVA
     * model, "vision_model." for a tower alone; "model.vision_tower.vision_model." accepted). A plain
     * short name or "all" never selects them. */
    unsigned vit_proj_mask; /* bit j: tower projection j in every tower layer ("<prefix>q_proj", "<prefix>all") */
    int n_vit_modules;      /* explicit tower modules ("<prefix>encoder.layers.3.self_attn.q_proj") */
    uint8_t vit_module_mask[TK_MAX_LAYERS];
    char vit_prefix[48];    /* the prefix the tower names used ("" when there are none) */
    int vit_layers;         /* the tower's layer count when known (set before saving: the all-layer
                               targets are then written as full names) */
    int no_task_type;       /* write task_type null (a tower alone) instead of CAUSAL_LM */
} tk_peft_config;

void tk_peft_config_default(tk_peft_config *pc);
/* On failure pc owns nothing (tk_peft_config_free is still allowed). */
int tk_peft_config_load(tk_peft_config *pc, const char *path, tk_err *err);
int tk_peft_config_save(const tk_peft_config *pc, const char *path, tk_err *err);
void tk_peft_config_free(tk_peft_config *pc);
/* Empties modules_to_save. */
void tk_peft_config_free_save(tk_peft_config *pc);
/* A deep copy (modules_to_save and rank_pattern owned by dst). */
int tk_peft_config_copy(tk_peft_config *dst, const tk_peft_config *src, tk_err *err);

/* AdaLoRA's rank_pattern: the entry of layer l's projection p, or NULL. */
const tk_rank_entry *tk_peft_rank_find(const tk_peft_config *pc, int layer, int proj);
/* Sets (adds or replaces) the entry of layer l's projection p from keep [n] (n = init_r). */
int tk_peft_rank_set(tk_peft_config *pc, int layer, int proj, const uint8_t *keep, int n, tk_err *err);
/* The number of kept triplets of an entry (of n). */
int tk_rank_count(const tk_rank_entry *e, int n);
static inline int tk_rank_kept(const tk_rank_entry *e, int j) { return (int)((e->keep[j >> 6] >> (j & 63)) & 1u); }
/* Fails when a rank_pattern entry names a module the model (n_layers) does not adapt. */
int tk_peft_check_rank_pattern(const tk_peft_config *pc, int n_layers, tk_err *err);
/* Fails when AdaLoRA's schedule cannot run total_step steps (tinit + tfinal >= total_step, ...). */
int tk_adalora_check_schedule(const tk_adalora_config *a, tk_err *err);

/* Parses a comma-separated list of projection short names ("q_proj,v_proj", or "all"). */
int tk_peft_parse_targets(const char *list, unsigned *mask, tk_err *err);
/* Sets the targets from a list of short names and/or full module names ("q_proj,model.layers.3.mlp.up_proj"),
 * "all", or "@FILE": a file of names (one per line or comma-separated, # comments) or a JSON list, or a
 * JSON object with a "target_modules" list (what `tspeft select` writes). Replaces target_mask and the
 * explicit modules. */
int tk_peft_parse_target_list(tk_peft_config *pc, const char *list, tk_err *err);
/* Adds one target name: a projection short name (or a dotted name ending in one) or a full module
 * name "model.layers.L.<self_attn|mlp>.<proj>". */
int tk_peft_add_target(tk_peft_config *pc, const char *name, tk_err *err);
/* Fails when an explicit module names a layer the model (n_layers) does not have. */
int tk_peft_check_layers(const tk_peft_config *pc, int n_layers, tk_err *err);
/* The full module name of layer l's projection p: "model.layers.3.self_attn.q_proj". */
void tk_module_name(char *buf, size_t n, int layer, int proj);
/* Parses "0,1,5" or "0-3" into the layer selection. */
int tk_peft_parse_layers(tk_peft_config *pc, const char *list, tk_err *err);
/* Parses a comma-separated list of base tensor names into modules_to_save (appends); "all" alone
 * means every base tensor without an adapter. */
int tk_peft_parse_save(tk_peft_config *pc, const char *list, tk_err *err);

/* Is tower projection j (TK_VIT_*) of tower layer l adapted? */
int tk_peft_vit_targets(const tk_peft_config *pc, int layer, int j);
/* 1 when any tower module is targeted. */
int tk_peft_has_vit(const tk_peft_config *pc);
/* "<prefix>encoder.layers.3.self_attn.q_proj". */
void tk_vit_module_name(char *buf, size_t n, const char *prefix, int layer, int j);

/* Is projection p of layer l adapted? */
int tk_peft_targets(const tk_peft_config *pc, int layer, int proj);
/* Sets one adapted module's settings from the config: kind, rank r, scale, dropout, activation and
 * the gate's (enabled, tau0, lambda, random keep, straight-through); rand_seed keys its random gate. */
void tk_peft_module_init(tk_adapted_linear *L, const tk_peft_config *pc, size_t r, float scale, uint64_t rand_seed);
/* The module's tensors as HF PEFT initialises them, drawing from rng: A (and adapter_down)
 * Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B (adapter_up) zero; DoRA
 * magnitude ||W0 + s B A||_row = ||W0||_row (needs w0); AdaLoRA (AdaLoraLayer.reset_lora_parameters):
 * E zero, A and B N(0, 0.02). */
void tk_peft_module_init_weights(tk_adapted_linear *L, tk_rng *rng);
/* The module's saved gate state from an adapter file: KEY.ts_tau and KEY.ts_lambda when present (each
 * one finite value >= 0; absent: unchanged). -1 with err naming the file. */
struct tk_st_file;
int tk_peft_load_gate(tk_adapted_linear *L, const struct tk_st_file *f, const char *key, tk_err *err);
/* LoRA scale s = alpha / r (rsLoRA: alpha / sqrt(r)); bottleneck: its scaling; AdaLoRA:
 * alpha / (ranknum + 1e-5) with ranknum = init_r (alpha 0: init_r / (init_r + 1e-5)), as PEFT. */
float tk_peft_scale(const tk_peft_config *pc);
const char *tk_adapter_kind_name(tk_adapter_kind k);

#endif
