/* pos_interp.h: position-embedding interpolation for a vision tower run at another image size, as a
 * precomputed linear map (transformers' interpolate_pos_encoding for CLIP and SigLIP).
 *
 *   tk_pos_interp *pi = tk_pos_interp_new(24, 24, 32, 32, 1, &err);    // CLIP 336 px -> 448 px, patch 14
 *   tk_pos_interp_forward(pi, pos_new, pos, C);      // pos_new [1 + 32*32, C] = M pos [1 + 24*24, C]
 *   tk_pos_interp_backward(pi, d_pos, d_pos_new, C); // d_pos [1 + 24*24, C] += M^T d_pos_new
 *   tk_pos_interp_free(pi);
 *
 * The map is what HF does: the first n_prefix rows (CLIP's class position; SigLIP has none) pass
 * through unchanged, and the h_old x w_old grid of the others (row-major, as the patches) is resized
 * to h_new x w_new by torch.nn.functional.interpolate(mode="bicubic", align_corners=False): for each
 * output index i of a side, the source coordinate is (i + 0.5) * in / out - 0.5 (not clamped), the
 * four taps floor(src) - 1 .. floor(src) + 2 get Keys' cubic convolution weights with a = -0.75, and
 * taps outside the grid are clamped to its border (their weights add to the edge row or column). The
 * 2-D map is the product of the two 1-D ones, M[(y,x),(y',x')] = Wy[y,y'] Wx[x,x'], built once, in
 * double and stored as float: N_new x N_old, N = n_prefix + h * w. Forward is one sgemm, backward its
 * transpose; the map is exact for any size (an up- or downscale, or the same grid, which is the
 * identity).
 *
 * Ownership: tk_pos_interp_new's result is the caller's (tk_pos_interp_free; NULL is fine). Read-only
 * after construction: several threads may use one map. Failure: NULL with err set (sizes out of
 * range, out of memory).
 */
#ifndef TK_VISION_POS_INTERP_H
#define TK_VISION_POS_INTERP_H

#include "../src/common.h"
#include "vit.h"

#include <stddef.h>

#define TK_POS_INTERP_A (-0.75) /* torch's bicubic kernel parameter */

typedef struct tk_pos_interp {
    size_t h_old, w_old, h_new, w_new, n_prefix;
    size_t n_old, n_new; /* n_prefix + h * w */
    float *m;            /* [n_new, n_old] row-major */
} tk_pos_interp;

/* The map for grid (h_old, w_old) -> (h_new, w_new) with n_prefix leading rows passed through. Sides
 * 1..4096, n_prefix 0 or 1. */
tk_pos_interp *tk_pos_interp_new(size_t h_old, size_t w_old, size_t h_new, size_t w_new, size_t n_prefix,
                                 tk_err *err);
void tk_pos_interp_free(tk_pos_interp *pi);

/* The 1-D weights of one side: w [out, in] row-major (zeroed here first). */
void tk_pos_interp_weights_1d(double *w, size_t in, size_t out);

/* out [n_new, C] = M x [n_old, C]. */
void tk_pos_interp_forward(const tk_pos_interp *pi, float *out, const float *x, size_t C);
/* dx [n_old, C] += M^T dout [n_new, C]. */
void tk_pos_interp_backward(const tk_pos_interp *pi, float *dx, const float *dout, size_t C);

/* ---- the tower at another image size ---- */

/* Makes m run on size x size images (call before tk_vit_ws_alloc: the workspace is sized by the
 * tokens). size == cfg.image_size: the checkpoint's own grid, no map. Otherwise, with interpolate,
 * m->pos_map becomes the map from the checkpoint's (S/P)^2 grid to (size/P)^2 (CLIP's class row
 * passed through), m->pos_run = the map applied to m->pos, and m->image_size, n_patches and n_tokens
 * the new grid's; m->pos and cfg stay the checkpoint's. Without interpolate such a size is refused,
 * as transformers refuses it without interpolate_pos_encoding=True. -1 with one line in err: a size
 * that is not a positive multiple of the patch size, or a different size without interpolate
 * (naming --interpolate-pos). */
int tk_vit_set_image_size(tk_vit *m, int size, int interpolate, tk_err *err);
/* Recomputes m->pos_run from m->pos (after the position embeddings changed, e.g. an optimizer step);
 * nothing when m has no map. The gradient of m->pos is tk_pos_interp_backward(m->pos_map, d_pos,
 * d_pos_run, C). */
void tk_vit_pos_refresh(tk_vit *m);

#endif
