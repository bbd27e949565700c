/* projector.h: LLaVA's multimodal projector (mm_projector), vision features -> LLM embeddings,
 * forward and backward in fp32.
 *
 *   linear:      y = x W1^T + b1
 *   mlp2x_gelu:  y = gelu(x W1^T + b1) W2^T + b2      (exact erf GELU, LLaVA-1.5)
 *
 *   tk_err err = {0};
 *   tk_projector pj;
 *   tk_projector_init(&pj, TK_PROJ_MLP2X_GELU, 1024, 4096, &err);   // shapes only
 *   tk_projector_register(&pj, &model->params, NULL, &err);          // into the trainable block
 *   tk_params_alloc(&model->params, &err);                            // binds pj.w1, pj.dw1, ...
 *   tk_projector_load(&pj, "llava-dir" or "mm_projector.safetensors", &err);  // or _random
 *   float *cache = malloc(tk_projector_cache_floats(&pj, N) * sizeof(float));
 *   tk_projector_forward(&pj, y, cache, x, N);                        // y [N,O], x [N,I]
 *   tk_projector_backward(&pj, dx, cache, dy, x, N);                  // grads ADD into pj.dw1 ...
 *   tk_projector_save(&pj, "out/mm_projector.safetensors", &err);
 *
 * Standalone (tests, tools): tk_projector_alloc_own registers into pj.own and allocates it; then
 * tk_projector_free releases that block. With an external block the block's owner frees it and
 * tk_projector_free does nothing.
 *
 * Tensor names read (first layout found wins; the kind must match the one given to init):
 *   original LLaVA: model.mm_projector.{0,2}.{weight,bias} (mlp2x_gelu), model.mm_projector.{weight,bias}
 *                   (linear); also without the leading "model."
 *   llava-hf:       multi_modal_projector.linear_{1,2}.{weight,bias} (mlp2x_gelu; also under "model.")
 * Saving writes the original names (LLaVA's mm_projector.bin is a torch pickle; tspeft writes the same
 * keys as safetensors, F32). Failure: -1 with err naming the file and tensor.
 */
#ifndef TK_VISION_PROJECTOR_H
#define TK_VISION_PROJECTOR_H

#include "common.h"
#include "io/safetensors.h"
#include "model/params.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { TK_PROJ_LINEAR, TK_PROJ_MLP2X_GELU } tk_proj_kind;

typedef struct {
    tk_proj_kind kind;
    size_t in, out;         /* I: vision width, O: LLM width */
    float *w1, *b1;         /* [O,I], [O] */
    float *w2, *b2;         /* [O,O], [O]; NULL for linear */
    float *dw1, *db1;       /* gradients, same shapes (bound by the trainable block) */
    float *dw2, *db2;
    tk_params own;          /* the block when tk_projector_alloc_own was used */
} tk_projector;

/* "linear" or "mlp2x_gelu" (LLaVA's mm_projector_type); -1 otherwise. */
int tk_proj_kind_parse(const char *s, tk_proj_kind *out);
const char *tk_proj_kind_name(tk_proj_kind kind);

/* Sets kind and shapes; pointers NULL until registered and allocated. */
int tk_projector_init(tk_projector *p, tk_proj_kind kind, size_t in, size_t out, tk_err *err);
/* Registers the projector's tensors in P (AdamW weight decay on the weights, not the biases) under
 * prefix ("model.mm_projector" when NULL; names prefix.0.weight ... or prefix.weight for linear).
 * The pointers are bound when P is allocated. */
int tk_projector_register(tk_projector *p, tk_params *P, const char *prefix, tk_err *err);
/* Registers into p->own and allocates it. */
int tk_projector_alloc_own(tk_projector *p, tk_err *err);
void tk_projector_free(tk_projector *p); /* frees p->own only; NULL is fine */

/* nn.Linear's default initialisation (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))). */
void tk_projector_random(tk_projector *p, uint64_t seed);

/* Finds the projector in path (a .safetensors file, or a directory with model.safetensors or a
 * sharded index) and reports its kind and shapes without loading. -1 when absent. */
int tk_projector_detect(const char *path, tk_proj_kind *kind, size_t *in, size_t *out, tk_err *err);
/* The kind of the projector in path; given (a kind's name, or NULL) must agree with it, else an error
 * naming path and both kinds. */
int tk_projector_kind_of(const char *path, const char *given, tk_proj_kind *kind, tk_err *err);
/* Reads the weights into the bound pointers; kind and every shape must match. */
int tk_projector_load(tk_projector *p, const char *path, tk_err *err);
/* Writes path (conventionally mm_projector.safetensors) with the original LLaVA key names, F32. */
int tk_projector_save(const tk_projector *p, const char *path, tk_err *err);

/* Floats of cache tk_projector_forward/backward need for N rows (0 for linear: cache may be NULL). */
size_t tk_projector_cache_floats(const tk_projector *p, size_t N);
/* y [N,O] = projector(x [N,I]); cache [cache_floats(N)] keeps what the backward needs. */
void tk_projector_forward(const tk_projector *p, float *y, float *cache, const float *x, size_t N);
/* forward: y = (gelu(x W1^T + b1)) W2^T + b2  (linear: y = x W1^T + b1).
 * dx [N,I] += (NULL: not needed); p->dw1, db1, dw2, db2 += (skipped where NULL). cache: the
 * forward's (its second half is scratch here; the forward values are kept, so the backward may run
 * again). */
void tk_projector_backward(tk_projector *p, float *dx, float *cache, const float *dy, const float *x,
                           size_t N);

#endif
