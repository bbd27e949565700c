/* image.c: stb_image decoding to 8-bit RGB with limits, stb_image_write PNG encoding (see image.h).
 *
 * The only translation unit that compiles stb_image and stb_image_write: both STATIC (internal
 * linkage), stdio off (files are read by tk_read_file, so the size check and the error come from
 * one place), and only the five supported decoders built.
 */
#include "image.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* stb declares static functions it only defines for formats left out (HDR), reported at the end of
 * the translation unit, so this one stays off for the whole file. */
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#define STBI_ONLY_PNM
#define STBI_MAX_DIMENSIONS (1 << 24)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

const char *tk_image_format_name(tk_image_format f) {
    switch (f) {
    case TK_IMAGE_FORMAT_JPEG: return "JPEG";
    case TK_IMAGE_FORMAT_PNG: return "PNG";
    case TK_IMAGE_FORMAT_BMP: return "BMP";
    case TK_IMAGE_FORMAT_GIF: return "GIF";
    case TK_IMAGE_FORMAT_PNM: return "PNM";
    default: return "unknown";
    }
}

tk_image_format tk_image_sniff(const void *data, size_t len) {
    const uint8_t *p = data;
    if (len >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) return TK_IMAGE_FORMAT_JPEG;
    if (len >= 8 && memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0) return TK_IMAGE_FORMAT_PNG;
    if (len >= 2 && p[0] == 'B' && p[1] == 'M') return TK_IMAGE_FORMAT_BMP;
    if (len >= 6 && (memcmp(p, "GIF87a", 6) == 0 || memcmp(p, "GIF89a", 6) == 0)) return TK_IMAGE_FORMAT_GIF;
    if (len >= 2 && p[0] == 'P' && (p[1] == '5' || p[1] == '6')) return TK_IMAGE_FORMAT_PNM;
    return TK_IMAGE_FORMAT_UNKNOWN;
}

tk_image *tk_image_alloc(size_t w, size_t h, tk_err *err) {
    size_t n;
    if (w == 0 || h == 0) {
        tk_fail(err, "image of %zu x %zu pixels: both sides must be >= 1", w, h);
        return NULL;
    }
    if (tk_mul_size(w, h, &n) != 0 || tk_mul_size(n, 3, &n) != 0) {
        tk_fail(err, "image of %zu x %zu pixels: size overflows", w, h);
        return NULL;
    }
    tk_image *img = calloc(1, sizeof *img);
    uint8_t *rgb = calloc(n, 1);
    if (!img || !rgb) {
        free(img);
        free(rgb);
        tk_fail(err, "image of %zu x %zu pixels: out of memory (%zu bytes)", w, h, n);
        return NULL;
    }
    img->w = w;
    img->h = h;
    img->rgb = rgb;
    return img;
}

void tk_image_free(tk_image *img) {
    if (!img) return;
    free(img->rgb);
    free(img);
}

/* Offset just past the first start-of-scan segment header, or 0 when the marker walk does not reach
 * one (stb then reports the problem itself). */
static size_t jpeg_first_scan(const uint8_t *p, size_t len) {
    size_t pos = 2;
    while (pos + 4 <= len) {
        if (p[pos] != 0xFF) return 0;
        uint8_t m = p[pos + 1];
        if (m == 0xFF) { /* fill byte */
            pos++;
            continue;
        }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD9)) { /* markers without a length */
            pos += 2;
            continue;
        }
        size_t seg = ((size_t)p[pos + 2] << 8) | p[pos + 3];
        if (seg < 2) return 0;
        if (m == 0xDA) return pos + 2 + seg <= len ? pos + 2 + seg : 0;
        pos += 2 + seg;
    }
    return 0;
}

/* 1 when an EOI marker (FF D9) follows the first scan: entropy-coded data never holds FF D9 (FF is
 * stuffed as FF 00 or starts a restart marker), so a file cut anywhere in its scans has none. */
static int jpeg_has_eoi(const uint8_t *p, size_t len) {
    size_t s = jpeg_first_scan(p, len);
    if (s == 0) return 1; /* leave the verdict to stb */
    for (size_t i = s; i + 1 < len; i++)
        if (p[i] == 0xFF && p[i + 1] == 0xD9) return 1;
    return 0;
}

static int check_len(const char *name, size_t len, tk_err *err) {
    if (len == 0) return tk_fail(err, "%s: empty file, expected an image", name);
    if (len > (size_t)INT_MAX)
        return tk_fail(err, "%s: %zu bytes: images of 2 GiB or more are not supported", name, len);
    return 0;
}

int tk_image_info(tk_image_format *fmt, size_t *w, size_t *h, const void *data, size_t len, const char *name,
                  size_t max_pixels, tk_err *err) {
    if (!name) name = "image";
    if (max_pixels == 0) max_pixels = TK_IMAGE_DEFAULT_MAX_PIXELS;
    if (check_len(name, len, err) != 0) return -1;
    tk_image_format f = tk_image_sniff(data, len);
    if (f == TK_IMAGE_FORMAT_UNKNOWN) {
        const uint8_t *p = data;
        return tk_fail(err,
                       "%s: not a supported image (first bytes %02x %02x %02x %02x; expected JPEG, PNG, BMP, GIF "
                       "or binary PNM P5/P6)",
                       name, p[0], len > 1 ? p[1] : 0, len > 2 ? p[2] : 0, len > 3 ? p[3] : 0);
    }
    int x = 0, y = 0, comp = 0;
    if (!stbi_info_from_memory(data, (int)len, &x, &y, &comp)) {
        const char *why = stbi_failure_reason();
        return tk_fail(err, "%s: cannot read %s header (truncated or corrupt; stb_image: %s)", name,
                       tk_image_format_name(f), why ? why : "unknown error");
    }
    if (x <= 0 || y <= 0)
        return tk_fail(err, "%s: %s header gives %d x %d pixels, expected both >= 1", name, tk_image_format_name(f), x,
                       y);
    if ((size_t)x > TK_IMAGE_MAX_SIDE || (size_t)y > TK_IMAGE_MAX_SIDE)
        return tk_fail(err, "%s: %s image of %d x %d pixels: a side exceeds %zu", name, tk_image_format_name(f), x, y,
                       TK_IMAGE_MAX_SIDE);
    if ((size_t)x * (size_t)y > max_pixels)
        return tk_fail(err, "%s: %s image of %d x %d pixels: more than the limit of %zu pixels", name,
                       tk_image_format_name(f), x, y, max_pixels);
    if (fmt) *fmt = f;
    if (w) *w = (size_t)x;
    if (h) *h = (size_t)y;
    return 0;
}

tk_image *tk_image_decode(const void *data, size_t len, const char *name, size_t max_pixels, tk_err *err) {
    if (!name) name = "image";
    tk_image_format f;
    size_t w, h;
    if (tk_image_info(&f, &w, &h, data, len, name, max_pixels, err) != 0) return NULL;
    const char *fn = tk_image_format_name(f);
    if (f == TK_IMAGE_FORMAT_JPEG && !jpeg_has_eoi(data, len)) {
        tk_fail(err, "%s: cannot decode JPEG image (%zu x %zu): truncated (no end-of-image marker after the scan)", name,
                w, h);
        return NULL;
    }
    int x = 0, y = 0, comp = 0;
    uint8_t *pix = stbi_load_from_memory(data, (int)len, &x, &y, &comp, 3);
    if (!pix) {
        const char *why = stbi_failure_reason();
        tk_fail(err, "%s: cannot decode %s image (%zu x %zu): truncated or corrupt (stb_image: %s)", name, fn, w, h,
                why ? why : "unknown error");
        return NULL;
    }
    if ((size_t)x != w || (size_t)y != h) {
        stbi_image_free(pix);
        tk_fail(err, "%s: %s image decoded as %d x %d pixels but its header says %zu x %zu", name, fn, x, y, w, h);
        return NULL;
    }
    tk_image *img = calloc(1, sizeof *img);
    if (!img) {
        stbi_image_free(pix);
        tk_fail(err, "%s: out of memory", name);
        return NULL;
    }
    /* stb's allocator is malloc (STBI_MALLOC is not overridden), so the buffer is freed with free(). */
    img->w = w;
    img->h = h;
    img->rgb = pix;
    return img;
}

tk_image *tk_image_load(const char *path, size_t max_pixels, tk_err *err) {
    size_t len = 0;
    char *data = tk_read_file(path, &len, err);
    if (!data) return NULL;
    tk_image *img = tk_image_decode(data, len, path, max_pixels, err);
    free(data);
    return img;
}

/* ---- PNG writing ---- */

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    int oom;
} png_sink;

static void png_sink_write(void *ctx, void *data, int size) {
    png_sink *s = ctx;
    if (s->oom || size <= 0) return;
    if (s->len + (size_t)size > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + (size_t)size) cap *= 2;
        uint8_t *nb = realloc(s->buf, cap);
        if (!nb) {
            s->oom = 1;
            return;
        }
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, data, (size_t)size);
    s->len += (size_t)size;
}

uint8_t *tk_image_encode_png(size_t *len, const uint8_t *pixels, size_t w, size_t h, int channels, tk_err *err) {
    if (channels != 1 && channels != 3 && channels != 4) {
        tk_fail(err, "PNG encoding: %d channels, expected 1, 3 or 4", channels);
        return NULL;
    }
    size_t stride;
    if (w == 0 || h == 0 || w > TK_IMAGE_MAX_SIDE || h > TK_IMAGE_MAX_SIDE ||
        tk_mul_size(w, (size_t)channels, &stride) != 0 || stride > (size_t)INT_MAX / 2 ||
        h > (size_t)INT_MAX / stride) {
        tk_fail(err, "PNG encoding: %zu x %zu x %d pixels: size out of range", w, h, channels);
        return NULL;
    }
    png_sink s = {0};
    int ok = stbi_write_png_to_func(png_sink_write, &s, (int)w, (int)h, channels, pixels, (int)stride);
    if (!ok || s.oom) {
        free(s.buf);
        tk_fail(err, "PNG encoding: %zu x %zu x %d pixels: %s", w, h, channels, s.oom ? "out of memory" : "failed");
        return NULL;
    }
    *len = s.len;
    return s.buf;
}

int tk_image_write_png(const char *path, const uint8_t *pixels, size_t w, size_t h, int channels, tk_err *err) {
    size_t len = 0;
    uint8_t *png = tk_image_encode_png(&len, pixels, w, h, channels, err);
    if (!png) return tk_err_prefix(err, path);
    int rc = tk_write_file_atomic(path, png, len, err);
    free(png);
    return rc;
}
