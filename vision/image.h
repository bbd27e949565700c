/* image.h: decoding JPEG, PNG, BMP, GIF (first frame) and PNM to 8-bit RGB, and writing PNG.
 *
 *   tk_err err = {0};
 *   tk_image *img = tk_image_load("cat.jpg", 0, &err);          // 0: TK_IMAGE_DEFAULT_MAX_PIXELS
 *   if (!img) { fprintf(stderr, "tspeft: %s\n", err.msg); return 1; }
 *   uint8_t r = img->rgb[(y * img->w + x) * 3 + 0];
 *   tk_image_free(img);
 *
 * Decoding is stb_image's (Debian libstb-dev, v2.27; compiled into image.c with STB_IMAGE_STATIC, so
 * its symbols never clash with another copy): only the five formats above are enabled, so no other
 * bytes are guessed at (TGA, which has no magic number, is off). Whatever the file holds (grayscale,
 * gray+alpha, RGB, RGBA, palette, 16-bit samples) comes out as 8-bit RGB, as PIL's
 * Image.open(f).convert("RGB") gives it: alpha is dropped (not composited), gray is replicated,
 * 16-bit samples keep their high byte. docs/vision.md lists where stb and PIL differ (JPEG IDCT and
 * chroma upsampling, GIF transparency).
 *
 * Limits: at most max_pixels pixels (w * h, checked from the header before any pixel is decoded;
 * 0 = TK_IMAGE_DEFAULT_MAX_PIXELS), each side at most 2^24 (stb's own limit), files under 2 GiB.
 * A JPEG must contain its end-of-image marker after the first scan: stb_image pads a truncated JPEG
 * with zeros and reports success, so a missing EOI is reported here as truncation.
 * A PNG is checked before stb decodes it, as libpng and PIL check it (stb skips all three): every
 * chunk's CRC-32 (zlib's crc32; ancillary chunks too), and the IDAT chunks' zlib stream inflated by
 * zlib to its end, Adler-32 included; a mismatch is refused naming the chunk and its byte offset.
 *
 * Ownership: every returned tk_image is the caller's (tk_image_free; NULL is fine). tk_image_encode_png
 * returns a malloc'd buffer the caller free()s.
 * Failure: NULL / -1 with one line in err naming the file (or the name passed to tk_image_decode),
 * the format when known, and what was wrong, e.g.
 *   "a.png: cannot decode PNG image (1 x 2): corrupt PNG (stb_image: ...)".
 * Threads: all functions may run on several threads at once (stb's failure reason is thread-local).
 */
#ifndef TK_VISION_IMAGE_H
#define TK_VISION_IMAGE_H

#include "../src/common.h"

#include <stddef.h>
#include <stdint.h>

#define TK_IMAGE_DEFAULT_MAX_PIXELS ((size_t)64 << 20) /* 64 Mpx (e.g. 8192 x 8192) */
#define TK_IMAGE_MAX_SIDE ((size_t)1 << 24)            /* stb_image's STBI_MAX_DIMENSIONS */

typedef struct {
    size_t w, h;   /* width and height in pixels, both >= 1 */
    uint8_t *rgb;  /* [h][w][3] row-major RGB, owned by the image */
} tk_image;

/* Image formats (tk_image_sniff). */
typedef enum {
    TK_IMAGE_FORMAT_UNKNOWN = 0,
    TK_IMAGE_FORMAT_JPEG = 1,
    TK_IMAGE_FORMAT_PNG = 2,
    TK_IMAGE_FORMAT_BMP = 3,
    TK_IMAGE_FORMAT_GIF = 4,
    TK_IMAGE_FORMAT_PNM = 5,
} tk_image_format;

/* "JPEG", "PNG", "BMP", "GIF", "PNM", or "unknown". */
const char *tk_image_format_name(tk_image_format f);
/* The format named by the first bytes (magic numbers), TK_IMAGE_FORMAT_UNKNOWN when none matches. */
tk_image_format tk_image_sniff(const void *data, size_t len);

/* A w x h image with zeroed pixels (w, h >= 1, w * h * 3 must fit in size_t). NULL with err set. */
tk_image *tk_image_alloc(size_t w, size_t h, tk_err *err);
void tk_image_free(tk_image *img);

/* Decodes len bytes; name is used in messages only (e.g. the file or "record 7 image 0"). */
tk_image *tk_image_decode(const void *data, size_t len, const char *name, size_t max_pixels, tk_err *err);

/* Reads path and decodes it (tk_image_decode with name = path). */
tk_image *tk_image_load(const char *path, size_t max_pixels, tk_err *err);

/* Header only: the format and size, without decoding pixels. -1 with err set for an unknown or
 * unreadable header, or more than max_pixels pixels. */
int tk_image_info(tk_image_format *fmt, size_t *w, size_t *h, const void *data, size_t len, const char *name,
                  size_t max_pixels, tk_err *err);

/* PNG bytes of pixels [h][w][channels] (channels 1 = gray, 3 = RGB, 4 = RGBA); *len receives their
 * count. Returns a malloc'd buffer the caller free()s, or NULL with err set. */
uint8_t *tk_image_encode_png(size_t *len, const uint8_t *pixels, size_t w, size_t h, int channels, tk_err *err);

/* tk_image_encode_png written atomically to path (tk_write_file_atomic). */
int tk_image_write_png(const char *path, const uint8_t *pixels, size_t w, size_t h, int channels, tk_err *err);

#endif
