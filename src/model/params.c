/* params.c: see params.h. */
#include "params.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tk_params_add(tk_params *P, const char *name, int ndim, const int64_t *shape, int decay,
                  float **bind_data, float **bind_grad, const float *init, tk_err *err) {
    if (strlen(name) >= TK_NAME_MAX) return tk_fail(err, "parameter name too long: %s", name);
    if (tk_params_find(P, name)) return tk_fail(err, "parameter %s registered twice", name);
    if (P->n == P->cap) {
        size_t cap = P->cap ? 2 * P->cap : 64;
        tk_param *it = realloc(P->items, cap * sizeof *it);
        if (!it) return tk_fail(err, "out of memory registering %s", name);
        P->items = it;
        P->cap = cap;
    }
    tk_param *p = &P->items[P->n];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->numel = 1;
    for (int d = 0; d < ndim; d++) {
        p->shape[d] = shape[d];
        if (tk_mul_size(p->numel, (size_t)shape[d], &p->numel))
            return tk_fail(err, "parameter %s: size overflows", name);
    }
    p->offset = P->total;
    if (P->total + p->numel < P->total) return tk_fail(err, "trainable block overflows");
    P->total += p->numel;
    p->decay = decay;
    p->bind_data = bind_data;
    p->bind_grad = bind_grad;
    p->init = init;
    P->n++;
    return 0;
}

int tk_params_alloc(tk_params *P, tk_err *err) {
    if (P->total == 0) return 0;
    P->data = tk_calloc(P->total, sizeof(float));
    P->grad = tk_calloc(P->total, sizeof(float));
    P->m = tk_calloc(P->total, sizeof(float));
    P->v = tk_calloc(P->total, sizeof(float));
    if (!P->data || !P->grad || !P->m || !P->v)
        return tk_fail(err, "out of memory for %zu trainable parameters", P->total);
    for (size_t i = 0; i < P->n; i++) {
        tk_param *p = &P->items[i];
        if (p->init) memcpy(P->data + p->offset, p->init, p->numel * sizeof(float));
        p->init = NULL;
        if (p->bind_data) *p->bind_data = P->data + p->offset;
        if (p->bind_grad) *p->bind_grad = P->grad + p->offset;
    }
    return 0;
}

const tk_param *tk_params_find(const tk_params *P, const char *name) {
    for (size_t i = 0; i < P->n; i++)
        if (strcmp(P->items[i].name, name) == 0) return &P->items[i];
    return NULL;
}

void tk_params_zero_grad(tk_params *P) {
    if (P->grad) tk_zero_floats(P->grad, P->total);
}

void tk_params_free(tk_params *P) {
    if (!P) return;
    free(P->items);
    tk_free(P->data);
    tk_free(P->grad);
    tk_free(P->m);
    tk_free(P->v);
    memset(P, 0, sizeof *P);
}
