/* preprocess.h: image -> encoder input tensor, as Hugging Face's CLIPImageProcessor, LLaVA-1.5's
 * pad-to-square and SiglipImageProcessor compute it (with PIL resampling), bit for bit where possible.
 *
 *   tk_preproc p;
 *   tk_preproc_init(&p, TK_PREPROC_LLAVA_PAD, 336);          // LLaVA-1.5 with CLIP ViT-L/14-336
 *   float *x = malloc(tk_preproc_numel(&p) * sizeof *x);      // [3][336][336]
 *   if (tk_preprocess(x, img, &p, &err) != 0) ...
 *
 * Modes:
 *   TK_PREPROC_CLIP       CLIPImageProcessor: convert to RGB; resize so the SHORTER side is
 *                         p.resize, the longer int(resize * long / short) (HF's
 *                         get_resize_output_image_size, default_to_square=False), with PIL's
 *                         BICUBIC; center crop p.crop x p.crop at top = (h - crop) // 2, left =
 *                         (w - crop) // 2 (HF's center_crop; zero-padded if the image is smaller);
 *                         rescale by 1/255 (in double, then cast to float32); normalize (x - mean) /
 *                         std in float32 with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std
 *                         (0.26862954, 0.26130258, 0.27577711); channels first.
 *   TK_PREPROC_LLAVA_PAD  LLaVA-1.5's image_aspect_ratio "pad": expand2square first, a square of the
 *                         longer side filled with tuple(int(m * 255) for m in mean) = (122, 116, 104),
 *                         the image pasted at ((s - w) // 2, (s - h) // 2); then the CLIP steps.
 *   TK_PREPROC_SIGLIP     SiglipImageProcessor: resize to resize x resize (BICUBIC, aspect ratio not
 *                         kept), rescale 1/255, normalize with mean 0.5, std 0.5 -> [-1, 1]. No crop.
 *
 * The resize is Pillow's (libImaging/Resample.c, Pillow 9.4) reproduced: a separable convolution
 * with the bicubic kernel (a = -0.5) whose support is scaled by the downscale factor (antialiasing),
 * coefficients normalized per output pixel and quantized to 22-bit fixed point, the horizontal pass
 * first (over the rows the vertical pass needs), rounded and clipped to uint8, then the vertical
 * pass; a pass whose size does not change is skipped, as Pillow skips it. The uint8 output equals
 * PIL's Image.resize(..., Image.BICUBIC) exactly (tests/parity/test_vision_pil.py).
 *
 * Ownership: functions returning tk_image* give the caller a new image (tk_image_free); the input
 * is never modified. tk_preprocess writes into the caller's buffer.
 * Failure: NULL / -1 with one line in err (sizes out of range, out of memory).
 */
#ifndef TK_VISION_PREPROCESS_H
#define TK_VISION_PREPROCESS_H

#include "image.h"

#include <stddef.h>
#include <stdint.h>

#define TK_PREPROC_MAX_SIZE ((size_t)1 << 14) /* largest resize / crop side accepted */

/* CLIP's normalization constants (OpenAI CLIP, HF OPENAI_CLIP_MEAN / OPENAI_CLIP_STD). */
extern const double tk_clip_mean[3];
extern const double tk_clip_std[3];

typedef enum {
    TK_PREPROC_CLIP = 0,
    TK_PREPROC_LLAVA_PAD = 1,
    TK_PREPROC_SIGLIP = 2,
} tk_preproc_mode;

typedef struct {
    tk_preproc_mode mode;
    size_t resize;   /* CLIP/LLAVA_PAD: the shortest edge after resizing; SIGLIP: the square side */
    size_t crop;     /* CLIP/LLAVA_PAD: the center crop side (the output side); SIGLIP: = resize */
    double mean[3];  /* per channel, on the [0, 1] scale (cast to float32 for normalizing) */
    double std[3];
    uint8_t pad[3];  /* LLAVA_PAD background: (uint8)(mean * 255), truncated as Python's int() */
} tk_preproc;

/* Defaults for a mode at side `size` (resize = crop = size; CLIP mean/std or 0.5/0.5). */
void tk_preproc_init(tk_preproc *p, tk_preproc_mode mode, size_t size);
/* "clip", "llava-pad", "siglip" -> mode; -1 with err when unknown. */
int tk_preproc_mode_from_name(const char *name, tk_preproc_mode *out, tk_err *err);
const char *tk_preproc_mode_name(tk_preproc_mode m);

/* Output side (crop, or resize for SigLIP) and element count 3 * side * side. */
size_t tk_preproc_side(const tk_preproc *p);
size_t tk_preproc_numel(const tk_preproc *p);

/* PIL Image.resize((out_w, out_h), Image.BICUBIC) of an RGB image. */
tk_image *tk_image_resize_bicubic(const tk_image *src, size_t out_w, size_t out_h, tk_err *err);

/* HF center_crop to crop_w x crop_h (zero padding where the image is smaller). */
tk_image *tk_image_center_crop(const tk_image *src, size_t crop_w, size_t crop_h, tk_err *err);

/* LLaVA's expand2square: a copy when already square. */
tk_image *tk_image_expand2square(const tk_image *src, const uint8_t bg[3], tk_err *err);

/* The uint8 image just before rescaling: pad (LLAVA_PAD), resize, crop (CLIP) as p says. */
tk_image *tk_preprocess_pixels(const tk_image *img, const tk_preproc *p, tk_err *err);

/* out[c][y][x] = ((float)(v * (1/255.0)) - (float)mean[c]) / (float)std[c] of img's pixels
 * (out: [3][img->h][img->w]). */
void tk_image_normalize(float *out, const tk_image *img, const double mean[3], const double std[3]);

/* The whole pipeline: out [3][side][side] with side = tk_preproc_side(p). */
int tk_preprocess(float *out, const tk_image *img, const tk_preproc *p, tk_err *err);

#endif
