/* multimodal.h: visual tokens for the LLaMA: images of a batch -> CLIP/SigLIP encoder (frozen, or
 * trained: adapters on its projections and/or every tensor) -> projector (trainable) -> the embeddings
 * spliced at the image-token runs (llama.h image_embeds), and the backward from their gradient
 * (docs/vision.md "Training").
 *
 *   tk_mm_opts o = {.tower = "clip-dir", .projector_type = "mlp2x_gelu", .layer = -2};
 *   tk_mm *mm = tk_mm_open(&o, llm_dim, &err);
 *   tk_mm_set_tower_training(mm, &pc, tune, lr_mult, seed, &err);  // optional: a trained tower
 *   tk_mm_hook(mm, m);                                       // before tk_llama_attach
 *   tk_llama_attach(...);  tk_mm_init_weights(mm, projector_file or NULL, seed, &err);
 *   per step:  tk_mm_reset_gate_stats(mm);
 *     per micro-batch:  tk_mm_set_train(mm, 1, key);  tk_mm_forward(mm, batch, B, T, acts, ...);
 *                       forward/backward;  tk_mm_backward(mm, &err);
 *     tk_mm_update_gates(mm, step, &err);  optimizer step;  tk_mm_after_optimizer(mm);
 *   tk_mm_save(mm, "out/mm_projector.safetensors", &err);  tk_mm_save_tower(mm, "out/vision_tower", &err);
 *   tk_mm_free(mm);
 *
 * The i-th image of a sample fills the sample's i-th run of TK_KIND_IMAGE tokens; a run must hold
 * exactly tk_mm_tokens(mm) tokens (the encoder's selected features), else an error naming the record.
 * Images stored encoded (PNG/JPEG/...) are decoded and preprocessed (CLIP resize/crop by default,
 * LLaVA's pad-to-square, or SigLIP's square resize); images stored as F16 features [N, C_vision]
 * skip the encoder (a trained tower refuses them). Failure: -1 with one line in err.
 *
 * A trained tower: the adapters (vision/vit_peft.h) are the tower targets of the adapter config
 * (target_modules "vision_tower.vision_model.q_proj", ...), keyed "base_model.model.<that prefix>
 * encoder.layers.L.self_attn.q_proj" in adapter files, TS-gated with the config's gate and a threshold
 * per module; the whole tower's tensors join the block as "vision_tower.vision_model.<name>", marked
 * external (saved as a tower directory by tk_mm_save_tower, not in adapter files). Both step at
 * lr_mult times the schedule (LLaVA's mm_vision_tower_lr; 0: the schedule's). The tower runs only the
 * layers the selected hidden state needs: adapters on later layers (LLaVA's -2 leaves the last one
 * out) see no token and keep their initial values.
 */
#ifndef TK_TRAIN_MULTIMODAL_H
#define TK_TRAIN_MULTIMODAL_H

#include "../../datasets/loader.h"
#include "../model/llama.h"

typedef struct {
    const char *tower;          /* HF CLIP/SigLIP vision tower directory (or a checkpoint holding one) */
    const char *prefix;         /* tensor name prefix; NULL: found (vit.h) */
    const char *projector;      /* the file the projector's weights will come from, or NULL: its type is
                                 * read from its tensors (a projector_type given too must agree) */
    const char *projector_type; /* "linear" | "mlp2x_gelu" (NULL: from projector, else mlp2x_gelu) */
    int layer;                  /* hidden-state index (LLaVA's mm_vision_select_layer; 0 = -2) */
    const char *feature;        /* "patch" (default) | "cls_patch" */
    const char *preprocess;     /* "clip" (default) | "llava-pad" | "siglip" */
    int image_size;             /* > 0: preprocess to this size; another than the tower's image_size needs */
    int interpolate_pos;        /* 1: its position embeddings interpolated (vision/pos_interp.h) */
} tk_mm_opts;

typedef struct tk_mm tk_mm;

tk_mm *tk_mm_open(const tk_mm_opts *o, size_t llm_dim, tk_err *err);
void tk_mm_free(tk_mm *mm);
/* The visual tokens one image becomes. */
size_t tk_mm_tokens(const tk_mm *mm);
/* Before tk_mm_hook: pc's tower targets get adapters (pc NULL or without tower targets: none); tune:
 * every tower tensor trains; lr_mult: their learning rate over the schedule's (0: 1); seed: the
 * adapters' dropout. Also for inference (eval, generate) of an adapter with tower modules. */
int tk_mm_set_tower_training(tk_mm *mm, const tk_peft_config *pc, int tune, float lr_mult, uint64_t seed,
                             tk_err *err);
/* Installs mm as m's extra part (tk_llama.extra_*: the projector, the tower's tensors and adapters in
 * the block; the adapters' thresholds in adapter files; the config's tower targets taken). */
void tk_mm_hook(tk_mm *mm, tk_llama *m);
/* tk_llama.extra_params: registers the projector (and a trained tower) in the trainable block. */
int tk_mm_register(void *mm, tk_params *P, tk_err *err);
/* After allocation: the projector from file (mm_projector.safetensors, or a LLaVA checkpoint of either
 * layout), or nn.Linear's initialisation from seed when file is NULL. */
int tk_mm_init_weights(tk_mm *mm, const char *file, uint64_t seed, tk_err *err);
/* Encodes the batch's images and points a->image_embeds at their projections (NULL when the batch has
 * none); a->d_image_embeds receives the gradient in backward. where names the data in errors. */
int tk_mm_forward(tk_mm *mm, const tk_loader_batch *b, size_t B, size_t T, tk_llama_acts *a, size_t llm_dim,
                  const char *where, tk_err *err);
/* Projector (and trained tower) gradients, adding into the trainable block, from the last forward's
 * d_image_embeds. */
int tk_mm_backward(tk_mm *mm, tk_err *err);
/* The tower adapters' mode in the next tk_mm_forward calls: train 1 (dropout, gate statistics; the
 * dropout stream seeded from the run's seed and key, e.g. the micro-batch's place in the run, so a
 * resumed run draws the same masks) or 0 (evaluation). */
void tk_mm_set_train(tk_mm *mm, int train, uint64_t key);
void tk_mm_reset_gate_stats(tk_mm *mm);
/* The tower adapters' threshold step from the step's statistics (tk_gate_update per module; step
 * 1-based). */
int tk_mm_update_gates(tk_mm *mm, int step, tk_err *err);
/* After the optimizer changed the tower's tensors: a tuned tower at an interpolated size recomputes
 * its position table. */
void tk_mm_after_optimizer(tk_mm *mm);
/* The tower's adapted modules that run (in layer, projection order): fills mods/layer/proj when
 * mods is not NULL and returns their count. */
size_t tk_mm_tower_modules(tk_mm *mm, tk_adapted_linear **mods, int *layer, int *proj);
/* A tower module's adapter-file key ("base_model.model.vision_tower.vision_model.encoder.layers.L...."). */
void tk_mm_tower_key(const tk_mm *mm, int layer, int proj, char *buf, size_t n);
int tk_mm_tower_layers(const tk_mm *mm);
/* Rows the tower's last forward ran (images x tokens per image; 0 for cached features). */
size_t tk_mm_tower_rows(const tk_mm *mm);
/* The (tuned) tower as an HF directory (vit.h tk_vit_save). */
int tk_mm_save_tower(const tk_mm *mm, const char *dir, tk_err *err);
/* Projections of one preprocessed-or-encoded image for inference: out [tk_mm_tokens, llm_dim]. */
int tk_mm_embed_image(tk_mm *mm, const uint8_t *bytes, size_t n, const char *name, float *out, tk_err *err);
int tk_mm_save(const tk_mm *mm, const char *path, tk_err *err);
/* The frozen encoder's selected features of one decoded image (a tk_image *): out [tk_mm_tokens,
 * *dim]. The signature is convert_llava.h's feature-cache callback (ctx = the tk_mm). */
int tk_mm_image_features(void *mm, const void *img, float *out, size_t *dim, tk_err *err);
size_t tk_mm_feature_dim(const tk_mm *mm);

#endif
