/* multimodal.h: visual tokens for the LLaMA: images of a batch -> CLIP/SigLIP encoder (frozen) ->
 * projector (trainable) -> the embeddings spliced at the image-token runs (llama.h image_embeds), and
 * the projector's backward from their gradient (docs/vision.md "Training").
 *
 *   tk_mm_opts o = {.tower = "clip-dir", .projector_type = "mlp2x_gelu", .layer = -2};
 *   tk_mm *mm = tk_mm_open(&o, llm_dim, &err);
 *   m->extra_params = tk_mm_register; m->extra_ctx = mm;    // before tk_llama_attach
 *   tk_llama_attach(...);  tk_mm_init_weights(mm, projector_file or NULL, seed, &err);
 *   per micro-batch:  tk_mm_forward(mm, batch, kinds, B, T, acts, &err);  forward/backward;
 *                     tk_mm_backward(mm);
 *   tk_mm_save(mm, "out/mm_projector.safetensors", &err);  tk_mm_free(mm);
 *
 * The i-th image of a sample fills the sample's i-th run of TK_KIND_IMAGE tokens; a run must hold
 * exactly tk_mm_tokens(mm) tokens (the encoder's selected features), else an error naming the record.
 * Images stored encoded (PNG/JPEG/...) are decoded and preprocessed (CLIP resize/crop by default,
 * LLaVA's pad-to-square, or SigLIP's square resize); images stored as F16 features [N, C_vision]
 * skip the encoder. Failure: -1 with one line in err.
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
/* tk_llama.extra_params: registers the projector in the trainable block. */
int tk_mm_register(void *mm, tk_params *P, tk_err *err);
/* After allocation: the projector from file (mm_projector.safetensors, or a LLaVA checkpoint of either
 * layout), or nn.Linear's initialisation from seed when file is NULL. */
int tk_mm_init_weights(tk_mm *mm, const char *file, uint64_t seed, tk_err *err);
/* Encodes the batch's images and points a->image_embeds at their projections (NULL when the batch has
 * none); a->d_image_embeds receives the gradient in backward. where names the data in errors. */
int tk_mm_forward(tk_mm *mm, const tk_loader_batch *b, size_t B, size_t T, tk_llama_acts *a, size_t llm_dim,
                  const char *where, tk_err *err);
/* Projector gradients (adding into the trainable block) from the last forward's d_image_embeds. */
void tk_mm_backward(tk_mm *mm);
/* Projections of one preprocessed-or-encoded image for inference: out [tk_mm_tokens, llm_dim]. */
int tk_mm_embed_image(tk_mm *mm, const uint8_t *bytes, size_t n, const char *name, float *out, tk_err *err);
int tk_mm_save(const tk_mm *mm, const char *path, tk_err *err);
/* The frozen encoder's selected features of one decoded image (a tk_image *): out [tk_mm_tokens,
 * *dim]. The signature is convert_llava.h's feature-cache callback (ctx = the tk_mm). */
int tk_mm_image_features(void *mm, const void *img, float *out, size_t *dim, tk_err *err);
size_t tk_mm_feature_dim(const tk_mm *mm);

#endif
