/* embedding.c: token embedding lookup and its scatter-add backward.
 *
 * Shape legend (outermost first):
 *   N  tokens, C  model width, V  vocabulary (rows of the table)
 */
#include "ops/ops.h"

#include "common.h"

#include <string.h>

/* Columns per OpenMP task in the backward: each task owns a disjoint column range of dtable. */
#define TK_EMBEDDING_COL_BLOCK 64

/* out [N,C] = table [V,C] row ids [N]. The caller has validated every id against V. */
void tk_embedding_forward(float *out, const int32_t *ids, const float *table, size_t N, size_t C) {
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        memcpy(&out[n * C], &table[(size_t)ids[n] * C], C * sizeof(float));
    }
}

/* forward: out[n] = table[ids[n]].  dtable [V,C] += scatter of dout [N,C] by ids [N].
 * Ids repeat, so rows of dtable are shared between tokens; the parallel split is over columns. */
void tk_embedding_backward(float *dtable, const float *dout, const int32_t *ids, size_t N, size_t C) {
    if (!dtable) return;
    size_t nblocks = (C + TK_EMBEDDING_COL_BLOCK - 1) / TK_EMBEDDING_COL_BLOCK;
#pragma omp parallel for if (N * C >= TK_OMP_MIN_WORK)
    for (size_t blk = 0; blk < nblocks; blk++) {
        size_t c0 = blk * TK_EMBEDDING_COL_BLOCK;
        size_t c1 = c0 + TK_EMBEDDING_COL_BLOCK < C ? c0 + TK_EMBEDDING_COL_BLOCK : C;
        for (size_t n = 0; n < N; n++) {
            float *drow = &dtable[(size_t)ids[n] * C];
            const float *grow = &dout[n * C];
            for (size_t c = c0; c < c1; c++) drow[c] += grow[c];
        }
    }
}
