/* params.h: the trainable block. Every trainable tensor (adapter matrices, DoRA magnitudes, base
 * tensors made trainable) is registered once by name and shape; tk_params_alloc then lays parameters,
 * gradients and both AdamW moments out identically in four flat arrays, and points each registered
 * binding at its slice, so the optimizer, clipping and checkpointing are flat loops.
 *
 *   tk_params P = {0};
 *   tk_params_add(&P, "base_model.model....lora_A.weight", 2, (int64_t[]){r, in}, 1, &L->A, &L->dA, &err);
 *   tk_params_alloc(&P, &err);          // L->A, L->dA now point into P.data / P.grad
 *   ...
 *   tk_params_free(&P);
 */
#ifndef TK_MODEL_PARAMS_H
#define TK_MODEL_PARAMS_H

#include "../common.h"

#include <stddef.h>
#include <stdint.h>

#define TK_NAME_MAX 192

typedef struct {
    char name[TK_NAME_MAX]; /* PEFT key */
    int ndim;
    int64_t shape[2];
    size_t offset, numel; /* slice of the flat arrays */
    int decay;            /* AdamW weight decay applies */
    float lr_mult;        /* this tensor's learning rate is the step's times lr_mult (0: 1) */
    int external;         /* saved and read by its owner (a tuned vision tower's directory), not in
                           * adapter files */
    float **bind_data, **bind_grad;
    const float *init; /* optional initial values (copied at alloc), else zeros */
} tk_param;

typedef struct tk_params {
    tk_param *items;
    size_t n, cap;
    size_t total;
    float *data, *grad, *m, *v; /* [total] each */
} tk_params;

int tk_params_add(tk_params *P, const char *name, int ndim, const int64_t *shape, int decay,
                  float **bind_data, float **bind_grad, const float *init, tk_err *err);
int tk_params_alloc(tk_params *P, tk_err *err);
const tk_param *tk_params_find(const tk_params *P, const char *name);
void tk_params_zero_grad(tk_params *P);
void tk_params_free(tk_params *P);

#endif
