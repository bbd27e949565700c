/* preprocess.c: PIL BICUBIC resampling, HF center crop, LLaVA expand2square, rescale + normalize
 * (see preprocess.h).
 *
 * Letters: W, H input width/height; w, h output width/height; K taps per output pixel (ksize).
 */
#include "preprocess.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const double tk_clip_mean[3] = {0.48145466, 0.4578275, 0.40821073};
const double tk_clip_std[3] = {0.26862954, 0.26130258, 0.27577711};

void tk_preproc_init(tk_preproc *p, tk_preproc_mode mode, size_t size) {
    memset(p, 0, sizeof *p);
    p->mode = mode;
    p->resize = size;
    p->crop = size;
    for (int c = 0; c < 3; c++) {
        p->mean[c] = mode == TK_PREPROC_SIGLIP ? 0.5 : tk_clip_mean[c];
        p->std[c] = mode == TK_PREPROC_SIGLIP ? 0.5 : tk_clip_std[c];
        p->pad[c] = (uint8_t)(int)(p->mean[c] * 255); /* Python int(): truncation */
    }
}

int tk_preproc_mode_from_name(const char *name, tk_preproc_mode *out, tk_err *err) {
    if (strcmp(name, "clip") == 0) *out = TK_PREPROC_CLIP;
    else if (strcmp(name, "llava-pad") == 0) *out = TK_PREPROC_LLAVA_PAD;
    else if (strcmp(name, "siglip") == 0) *out = TK_PREPROC_SIGLIP;
    else return tk_fail(err, "unknown image preprocessing '%s' (expected clip, llava-pad or siglip)", name);
    return 0;
}

const char *tk_preproc_mode_name(tk_preproc_mode m) {
    switch (m) {
    case TK_PREPROC_CLIP: return "clip";
    case TK_PREPROC_LLAVA_PAD: return "llava-pad";
    case TK_PREPROC_SIGLIP: return "siglip";
    default: return "?";
    }
}

size_t tk_preproc_side(const tk_preproc *p) { return p->mode == TK_PREPROC_SIGLIP ? p->resize : p->crop; }

size_t tk_preproc_numel(const tk_preproc *p) {
    size_t s = tk_preproc_side(p);
    return 3 * s * s;
}

/* ---- Pillow's resampling (libImaging/Resample.c) ---- */

#define PRECISION_BITS (32 - 8 - 2)

static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}
#define BICUBIC_SUPPORT 2.0

typedef struct {
    int ksize;
    int *bounds;  /* [out][2]: first input index, number of taps */
    int32_t *kk;  /* [out][ksize]: fixed-point weights (PRECISION_BITS) */
} coeffs;

static void coeffs_free(coeffs *c) {
    free(c->bounds);
    free(c->kk);
}

/* precompute_coeffs + normalize_coeffs_8bpc for the box [0, in_size) mapped onto out_size pixels. */
static int coeffs_init(coeffs *c, size_t in_size, size_t out_size, tk_err *err) {
    memset(c, 0, sizeof *c);
    float in0 = 0.0f, in1 = (float)in_size; /* Pillow's box is float */
    double scale = (double)(in1 - in0) / (double)out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = BICUBIC_SUPPORT * filterscale;
    double kd = ceil(support) * 2 + 1;
    if (kd > (double)(1 << 20)) return tk_fail(err, "resize %zu -> %zu: filter too large", in_size, out_size);
    int ksize = (int)kd;
    double *pre = malloc(out_size * (size_t)ksize * sizeof *pre);
    c->bounds = malloc(out_size * 2 * sizeof *c->bounds);
    c->kk = malloc(out_size * (size_t)ksize * sizeof *c->kk);
    if (!pre || !c->bounds || !c->kk) {
        free(pre);
        coeffs_free(c);
        return tk_fail(err, "resize %zu -> %zu: out of memory", in_size, out_size);
    }
    c->ksize = ksize;
    for (size_t xx = 0; xx < out_size; xx++) {
        double center = in0 + ((double)xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > (int)in_size) xmax = (int)in_size;
        xmax -= xmin;
        double *k = &pre[xx * (size_t)ksize];
        int x;
        for (x = 0; x < xmax; x++) {
            double w = bicubic_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++) k[x] = 0;
        c->bounds[xx * 2 + 0] = xmin;
        c->bounds[xx * 2 + 1] = xmax;
    }
    for (size_t i = 0; i < out_size * (size_t)ksize; i++) {
        double v = pre[i];
        c->kk[i] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS)) : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
    }
    free(pre);
    return 0;
}

static uint8_t clip8(int64_t in) {
    int64_t v = in >> PRECISION_BITS; /* arithmetic shift: floor, as Pillow's int shift */
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* out[y][x] (w wide, h_out rows) from in rows offset.. (W wide): the horizontal pass. */
static void resample_horizontal(uint8_t *out, size_t w, size_t h_out, const uint8_t *in, size_t W, size_t offset,
                                const coeffs *c) {
    for (size_t yy = 0; yy < h_out; yy++) {
        const uint8_t *row = in + (yy + offset) * W * 3;
        for (size_t xx = 0; xx < w; xx++) {
            int xmin = c->bounds[xx * 2], xmax = c->bounds[xx * 2 + 1];
            const int32_t *k = &c->kk[xx * (size_t)c->ksize];
            int64_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < xmax; x++) {
                const uint8_t *px = row + (size_t)(x + xmin) * 3;
                s0 += (int64_t)px[0] * k[x];
                s1 += (int64_t)px[1] * k[x];
                s2 += (int64_t)px[2] * k[x];
            }
            uint8_t *o = out + (yy * w + xx) * 3;
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
}

/* out[y][x] (w wide, h rows) from in (w wide): the vertical pass; bounds already shifted. */
static void resample_vertical(uint8_t *out, size_t w, size_t h, const uint8_t *in, const coeffs *c) {
    for (size_t yy = 0; yy < h; yy++) {
        int ymin = c->bounds[yy * 2], ymax = c->bounds[yy * 2 + 1];
        const int32_t *k = &c->kk[yy * (size_t)c->ksize];
        for (size_t xx = 0; xx < w; xx++) {
            int64_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int y = 0; y < ymax; y++) {
                const uint8_t *px = in + ((size_t)(y + ymin) * w + xx) * 3;
                s0 += (int64_t)px[0] * k[y];
                s1 += (int64_t)px[1] * k[y];
                s2 += (int64_t)px[2] * k[y];
            }
            uint8_t *o = out + (yy * w + xx) * 3;
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
}

static tk_image *image_copy(const tk_image *src, tk_err *err) {
    tk_image *out = tk_image_alloc(src->w, src->h, err);
    if (out) memcpy(out->rgb, src->rgb, src->w * src->h * 3);
    return out;
}

tk_image *tk_image_resize_bicubic(const tk_image *src, size_t out_w, size_t out_h, tk_err *err) {
    if (out_w == 0 || out_h == 0 || out_w > TK_IMAGE_MAX_SIDE || out_h > TK_IMAGE_MAX_SIDE) {
        tk_fail(err, "resize to %zu x %zu: sides must be 1..%zu", out_w, out_h, TK_IMAGE_MAX_SIDE);
        return NULL;
    }
    int need_h = out_w != src->w, need_v = out_h != src->h; /* the box is always the whole image */
    if (!need_h && !need_v) return image_copy(src, err);
    coeffs ch, cv;
    if (coeffs_init(&ch, src->w, out_w, err) != 0) return NULL;
    if (coeffs_init(&cv, src->h, out_h, err) != 0) {
        coeffs_free(&ch);
        return NULL;
    }
    /* first and one-past-last input rows the vertical pass reads */
    size_t ybox_first = (size_t)cv.bounds[0];
    size_t ybox_last = (size_t)cv.bounds[out_h * 2 - 2] + (size_t)cv.bounds[out_h * 2 - 1];
    tk_image *tmp = NULL, *out = NULL;
    const tk_image *cur = src;
    if (need_h) {
        for (size_t i = 0; i < out_h; i++) cv.bounds[i * 2] -= (int)ybox_first;
        tmp = tk_image_alloc(out_w, ybox_last - ybox_first, err);
        if (!tmp) goto done;
        resample_horizontal(tmp->rgb, out_w, tmp->h, src->rgb, src->w, ybox_first, &ch);
        cur = tmp;
    }
    if (need_v) {
        out = tk_image_alloc(cur->w, out_h, err);
        if (!out) goto done;
        resample_vertical(out->rgb, cur->w, out_h, cur->rgb, &cv);
    } else {
        out = tmp;
        tmp = NULL;
    }
done:
    tk_image_free(tmp);
    coeffs_free(&ch);
    coeffs_free(&cv);
    return out;
}

/* ---- crop, pad, normalize ---- */

tk_image *tk_image_center_crop(const tk_image *src, size_t crop_w, size_t crop_h, tk_err *err) {
    tk_image *out = tk_image_alloc(crop_w, crop_h, err);
    if (!out) return NULL;
    /* HF: top = (H - ch) // 2 (Python floor division, negative when the image is smaller, where HF
     * first pads to max(H, ch) with ceil((ch - H) / 2) zero rows above; the net offset of the source
     * inside the output is then ceil((ch - H) / 2)). */
    ptrdiff_t top, left;
    if (src->h >= crop_h) top = (ptrdiff_t)((src->h - crop_h) / 2);
    else top = -(ptrdiff_t)((crop_h - src->h + 1) / 2);
    if (src->w >= crop_w) left = (ptrdiff_t)((src->w - crop_w) / 2);
    else left = -(ptrdiff_t)((crop_w - src->w + 1) / 2);
    for (size_t y = 0; y < crop_h; y++) {
        ptrdiff_t sy = (ptrdiff_t)y + top;
        if (sy < 0 || sy >= (ptrdiff_t)src->h) continue;
        for (size_t x = 0; x < crop_w; x++) {
            ptrdiff_t sx = (ptrdiff_t)x + left;
            if (sx < 0 || sx >= (ptrdiff_t)src->w) continue;
            memcpy(out->rgb + (y * crop_w + x) * 3, src->rgb + ((size_t)sy * src->w + (size_t)sx) * 3, 3);
        }
    }
    return out;
}

tk_image *tk_image_expand2square(const tk_image *src, const uint8_t bg[3], tk_err *err) {
    if (src->w == src->h) return image_copy(src, err);
    size_t s = src->w > src->h ? src->w : src->h;
    tk_image *out = tk_image_alloc(s, s, err);
    if (!out) return NULL;
    for (size_t i = 0; i < s * s; i++) memcpy(out->rgb + i * 3, bg, 3);
    size_t x0 = (s - src->w) / 2, y0 = (s - src->h) / 2;
    for (size_t y = 0; y < src->h; y++)
        memcpy(out->rgb + ((y + y0) * s + x0) * 3, src->rgb + y * src->w * 3, src->w * 3);
    return out;
}

tk_image *tk_preprocess_pixels(const tk_image *img, const tk_preproc *p, tk_err *err) {
    if (p->resize == 0 || p->resize > TK_PREPROC_MAX_SIZE ||
        (p->mode != TK_PREPROC_SIGLIP && (p->crop == 0 || p->crop > TK_PREPROC_MAX_SIZE))) {
        tk_fail(err, "image preprocessing %s: resize %zu, crop %zu: expected 1..%zu", tk_preproc_mode_name(p->mode),
                p->resize, p->crop, TK_PREPROC_MAX_SIZE);
        return NULL;
    }
    if (p->mode == TK_PREPROC_SIGLIP) return tk_image_resize_bicubic(img, p->resize, p->resize, err);
    tk_image *sq = NULL;
    if (p->mode == TK_PREPROC_LLAVA_PAD) {
        sq = tk_image_expand2square(img, p->pad, err);
        if (!sq) return NULL;
        img = sq;
    }
    /* HF get_resize_output_image_size(default_to_square=False): short side -> resize, long side ->
     * int(resize * long / short) (Python float arithmetic, truncated). */
    size_t W = img->w, H = img->h;
    size_t s = W <= H ? W : H, l = W <= H ? H : W;
    double ld = (double)p->resize * (double)l / (double)s;
    if (ld > (double)TK_IMAGE_MAX_SIDE) {
        tk_image_free(sq);
        tk_fail(err, "image of %zu x %zu: resizing the short side to %zu makes the long side too large", W, H,
                p->resize);
        return NULL;
    }
    size_t nl = (size_t)ld;
    size_t nw = W <= H ? p->resize : nl, nh = W <= H ? nl : p->resize;
    tk_image *rs = tk_image_resize_bicubic(img, nw, nh, err);
    tk_image_free(sq);
    if (!rs) return NULL;
    tk_image *out = tk_image_center_crop(rs, p->crop, p->crop, err);
    tk_image_free(rs);
    return out;
}

void tk_image_normalize(float *out, const tk_image *img, const double mean[3], const double std[3]) {
    size_t n = img->w * img->h;
    for (int c = 0; c < 3; c++) {
        float m = (float)mean[c], sd = (float)std[c];
        float *o = out + (size_t)c * n;
        for (size_t i = 0; i < n; i++) {
            float x = (float)((double)img->rgb[i * 3 + (size_t)c] * (1.0 / 255.0)); /* HF rescale: f64 then f32 */
            o[i] = (x - m) / sd;                                                   /* HF normalize: f32 */
        }
    }
}

int tk_preprocess(float *out, const tk_image *img, const tk_preproc *p, tk_err *err) {
    tk_image *px = tk_preprocess_pixels(img, p, err);
    if (!px) return -1;
    tk_image_normalize(out, px, p->mean, p->std);
    tk_image_free(px);
    return 0;
}
