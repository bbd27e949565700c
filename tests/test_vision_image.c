/* test_vision_image.c: image decoding (vision/image.c) on files this test writes, and malformed input.
 *
 * Valid files in every supported format (PNG gray/RGB/RGBA, BMP, binary PGM/PPM 8 and 16 bit, GIF
 * written by a tiny LZW encoder below, JPEG from stb_image_write) decode to the expected RGB (exactly,
 * JPEG within its loss). Then the malformed cases, each of which must give -1/NULL and one line
 * naming the file: every truncation of every file, an empty file, unknown bytes, headers claiming
 * huge sizes (over the pixel limit, over stb's side limit, PNM fields with too many digits), a
 * configurable pixel limit; and a few thousand seeded byte corruptions, which may decode (pixel data
 * is just data) but must never crash and, when refused, refuse with one line naming the file.
 * PNG integrity, which stb_image does not check: a flipped bit in the CRC or the data of each chunk,
 * a wrong Adler-32 and a zlib stream cut before its end (CRCs recomputed) are refused naming the
 * chunk; the same stream split over two IDAT chunks decodes.
 * Also: PIL-style resize invariants (constant images stay constant, identity is a copy), center crop
 * and expand2square on small hand-checked cases. Writes into a fresh mkdtemp directory.
 * Exits 1 if any check fails. (Pixel parity with PIL: tests/parity/test_vision_pil.py.)
 */
#include "common.h"
#include "vision/image.h"
#include "vision/preprocess.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

static int n_fail = 0, n_pass = 0;

static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("  %-80s %s\n", buf, ok ? "ok" : "FAIL");
    if (ok) n_pass++;
    else n_fail++;
}

static char g_dir[64];

/* ---- byte buffers ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        TK_ASSERT(b->p);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put8(buf *b, unsigned v) {
    uint8_t c = (uint8_t)v;
    put(b, &c, 1);
}
static void put16le(buf *b, unsigned v) {
    put8(b, v & 0xFF);
    put8(b, v >> 8);
}
static void sink(void *ctx, void *data, int size) { put(ctx, data, (size_t)size); }

/* ---- test pixels ---- */

enum { W = 13, H = 7 };

static uint8_t pix_at(size_t x, size_t y, int c) { return (uint8_t)((x * 37 + y * 91 + (size_t)c * 53 + x * y) & 0xFF); }

/* [H][W][ch] */
static uint8_t *make_pixels(int ch) {
    uint8_t *p = malloc((size_t)W * H * (size_t)ch);
    for (size_t y = 0; y < H; y++)
        for (size_t x = 0; x < W; x++)
            for (int c = 0; c < ch; c++) p[(y * W + x) * (size_t)ch + (size_t)c] = pix_at(x, y, c);
    return p;
}

/* The RGB an 8-bit image of ch channels must decode to (gray replicated, alpha dropped). */
static void expect_rgb(uint8_t *rgb, const uint8_t *src, int ch) {
    for (size_t i = 0; i < (size_t)W * H; i++)
        for (int c = 0; c < 3; c++) rgb[i * 3 + (size_t)c] = src[i * (size_t)ch + (size_t)(ch >= 3 ? c : 0)];
}

/* ---- file writers ---- */

static buf make_png(const uint8_t *pix, int ch) {
    buf b = {0};
    TK_ASSERT(stbi_write_png_to_func(sink, &b, W, H, ch, pix, W * ch));
    return b;
}
static buf make_bmp(const uint8_t *pix, int ch) {
    buf b = {0};
    TK_ASSERT(stbi_write_bmp_to_func(sink, &b, W, H, ch, pix));
    return b;
}
static buf make_jpg(const uint8_t *pix, int ch) {
    buf b = {0};
    TK_ASSERT(stbi_write_jpg_to_func(sink, &b, W, H, ch, pix, 95));
    return b;
}
static buf make_pnm(const uint8_t *pix, int ch, int sixteen) {
    buf b = {0};
    char hdr[64];
    int n = snprintf(hdr, sizeof hdr, "P%c\n# a comment\n%d %d\n%d\n", ch == 3 ? '6' : '5', W, H,
                     sixteen ? 65535 : 255);
    put(&b, hdr, (size_t)n);
    for (size_t i = 0; i < (size_t)W * H * (size_t)ch; i++) {
        put8(&b, pix[i]);
        if (sixteen) put8(&b, 0xA5); /* low byte: dropped */
    }
    return b;
}

/* GIF87a with a 256-entry global palette (entry i = (i, 255 - i, i / 2)) and pixel p = palette
 * index. LZW with minimum code size 8: codes are 9 bits; a clear code after every two literals keeps
 * the table from ever reaching 512 entries, so every decoder reads 9-bit codes throughout. */
static buf make_gif(const uint8_t *idx) {
    buf b = {0};
    put(&b, "GIF87a", 6);
    put16le(&b, W);
    put16le(&b, H);
    put8(&b, 0xF7); /* global table, 256 entries */
    put8(&b, 0);
    put8(&b, 0);
    for (unsigned i = 0; i < 256; i++) {
        put8(&b, i);
        put8(&b, 255 - i);
        put8(&b, i / 2);
    }
    put8(&b, 0x2C);
    put16le(&b, 0);
    put16le(&b, 0);
    put16le(&b, W);
    put16le(&b, H);
    put8(&b, 0);
    put8(&b, 8);
    buf codes = {0};
    uint32_t acc = 0;
    int nbits = 0;
    size_t n = (size_t)W * H;
#define EMIT(code)                                  \
    do {                                            \
        acc |= (uint32_t)(code) << nbits;           \
        nbits += 9;                                 \
        while (nbits >= 8) {                        \
            put8(&codes, acc & 0xFF);               \
            acc >>= 8;                              \
            nbits -= 8;                             \
        }                                           \
    } while (0)
    for (size_t i = 0; i < n; i++) {
        if (i % 2 == 0) EMIT(256);
        EMIT(idx[i]);
    }
    EMIT(257);
    if (nbits > 0) put8(&codes, acc & 0xFF);
#undef EMIT
    for (size_t off = 0; off < codes.n; off += 255) {
        size_t k = codes.n - off < 255 ? codes.n - off : 255;
        put8(&b, (unsigned)k);
        put(&b, codes.p + off, k);
    }
    put8(&b, 0);
    put8(&b, 0x3B);
    free(codes.p);
    return b;
}

static void write_file(const char *path, const uint8_t *p, size_t n) {
    FILE *f = fopen(path, "wb");
    TK_ASSERT(f);
    TK_ASSERT(n == 0 || fwrite(p, 1, n, f) == n);
    TK_ASSERT(fclose(f) == 0);
}

/* ---- cases ---- */

typedef struct {
    const char *name;
    buf data;
    uint8_t *want;  /* [H][W][3] expected RGB */
    int lossy;      /* JPEG: mean abs error bound instead of exact */
    size_t min_ok;  /* truncations at or beyond this length may decode (GIF: the first frame is complete) */
} vcase;

static int one_line_naming(const tk_err *e, const char *name) {
    return strstr(e->msg, name) != NULL && strchr(e->msg, '\n') == NULL && e->msg[0] != 0;
}

static double mean_abs(const uint8_t *a, const uint8_t *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += abs((int)a[i] - (int)b[i]);
    return s / (double)n;
}

static void test_valid(vcase *c) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, c->name);
    write_file(path, c->data.p, c->data.n);
    tk_err err = {0};
    tk_image *img = tk_image_load(path, 0, &err);
    if (!img) {
        report(0, "%s decodes: %s", c->name, err.msg);
        return;
    }
    int size_ok = img->w == W && img->h == H;
    if (!size_ok) {
        report(0, "%s decodes to %zu x %zu, expected %d x %d", c->name, img->w, img->h, W, H);
    } else if (c->lossy) {
        double m = mean_abs(img->rgb, c->want, (size_t)W * H * 3);
        report(m < 4.0, "%-22s decodes %d x %d, mean |diff| %.2f < 4 (lossy)", c->name, W, H, m);
    } else {
        report(memcmp(img->rgb, c->want, (size_t)W * H * 3) == 0, "%-22s decodes %d x %d exactly", c->name, W, H);
    }
    tk_image_free(img);
    tk_image_format f = TK_IMAGE_FORMAT_UNKNOWN;
    size_t w = 0, h = 0;
    int rc = tk_image_info(&f, &w, &h, c->data.p, c->data.n, c->name, 0, &err);
    report(rc == 0 && w == W && h == H && f != TK_IMAGE_FORMAT_UNKNOWN, "%-22s info: %s %zu x %zu", c->name,
           tk_image_format_name(f), w, h);
}

static void test_truncations(vcase *c) {
    int bad = 0;
    size_t first_bad = 0;
    tk_err err;
    for (size_t len = 0; len < c->data.n; len++) {
        memset(&err, 0, sizeof err);
        tk_image *img = tk_image_decode(c->data.p, len, c->name, 0, &err);
        int ok;
        if (len >= c->min_ok && img) ok = memcmp(img->rgb, c->want, (size_t)W * H * 3) == 0 || c->lossy;
        else ok = img == NULL && one_line_naming(&err, c->name);
        if (!ok && !bad++) first_bad = len;
        tk_image_free(img);
    }
    report(bad == 0, "%-22s every truncation (%zu lengths) refused, one line%s", c->name, c->data.n,
           bad ? " (first bad length below)" : "");
    if (bad) printf("    first bad length %zu of %zu\n", first_bad, c->data.n);
}

static uint64_t lcg(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

static void test_corruptions(vcase *c, uint64_t seed) {
    int bad = 0, refused = 0, trials = 400;
    uint8_t *p = malloc(c->data.n);
    for (int t = 0; t < trials; t++) {
        memcpy(p, c->data.p, c->data.n);
        int nflip = 1 + (int)(lcg(&seed) % 4);
        for (int k = 0; k < nflip; k++) {
            size_t at = (size_t)(lcg(&seed) % (t < trials / 2 && c->data.n > 64 ? 64 : c->data.n)); /* headers often */
            p[at] = (uint8_t)lcg(&seed);
        }
        tk_err err = {0};
        tk_image *img = tk_image_decode(p, c->data.n, c->name, 0, &err);
        if (img) {
            if (img->w == 0 || img->h == 0 || img->w * img->h > TK_IMAGE_DEFAULT_MAX_PIXELS) bad++;
            tk_image_free(img);
        } else {
            refused++;
            if (!one_line_naming(&err, c->name)) {
                if (!bad) printf("    bad message: '%s'\n", err.msg);
                bad++;
            }
        }
    }
    free(p);
    report(bad == 0, "%-22s %d corruptions: no crash, %d refused with one line", c->name, trials, refused);
}

static void expect_refused(const char *what, const uint8_t *p, size_t n, size_t max_pixels, const char *needle) {
    tk_err err = {0};
    tk_image *img = tk_image_decode(p, n, what, max_pixels, &err);
    int ok = img == NULL && one_line_naming(&err, what) && (!needle || strstr(err.msg, needle));
    report(ok, "%s: refused%s%s", what, needle ? " with " : "", needle ? needle : "");
    if (!ok) printf("    got: %s\n", img ? "an image" : err.msg);
    tk_image_free(img);
}

static void test_huge_headers(const vcase *png, const vcase *bmp, const vcase *gif, const vcase *jpeg) {
    /* PNG IHDR width/height at bytes 16..23: the header check refuses them before the CRC is read. */
    uint8_t *p = malloc(png->data.n);
    memcpy(p, png->data.p, png->data.n);
    p[16] = 0, p[17] = 1, p[18] = 0x86, p[19] = 0xA0; /* 100000 */
    p[20] = 0, p[21] = 1, p[22] = 0x86, p[23] = 0xA0;
    expect_refused("png 100000x100000", p, png->data.n, 0, "limit");
    p[16] = 1, p[17] = 0, p[18] = 0, p[19] = 1; /* 2^24 + 1 */
    p[20] = 0, p[21] = 0, p[22] = 0, p[23] = 1;
    expect_refused("png 16777217x1", p, png->data.n, 0, NULL);
    free(p);
    p = malloc(bmp->data.n);
    memcpy(p, bmp->data.p, bmp->data.n);
    p[18] = 0x70, p[19] = 0x11, p[20] = 0x01, p[21] = 0; /* 70000 */
    p[22] = 0x70, p[23] = 0x11, p[24] = 0x01, p[25] = 0;
    expect_refused("bmp 70000x70000", p, bmp->data.n, 0, "limit");
    free(p);
    p = malloc(gif->data.n);
    memcpy(p, gif->data.p, gif->data.n);
    p[6] = 0xFF, p[7] = 0xFF, p[8] = 0xFF, p[9] = 0xFF;
    expect_refused("gif 65535x65535", p, gif->data.n, 0, "limit");
    free(p);
    const char *pnm_big = "P6\n100000 100000\n255\n\x01\x02\x03";
    expect_refused("ppm 100000x100000", (const uint8_t *)pnm_big, strlen(pnm_big), 0, "limit");
    const char *pnm_digits = "P6\n99999999999999999999 1\n255\n\x01\x02\x03";
    expect_refused("ppm width of 20 digits", (const uint8_t *)pnm_digits, strlen(pnm_digits), 0, "digits");
    const char *pnm_max = "P5\n1 1\n70000\n\x01\x02";
    expect_refused("pgm maxval 70000", (const uint8_t *)pnm_max, strlen(pnm_max), 0, "maxval");
    const char *pnm_nohdr = "P5\n1 \n";
    expect_refused("pgm without height", (const uint8_t *)pnm_nohdr, strlen(pnm_nohdr), 0, "PNM header");
    /* JPEG SOF0 claiming 65500 x 65500 */
    static const uint8_t jpg[] = {0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0xFF, 0xDC, 0xFF, 0xDC, 0x03, 0x01, 0x22,
                                  0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01, 0xFF, 0xD9};
    expect_refused("jpeg 65500x65500", jpg, sizeof jpg, 0, "limit");
    /* a DHT whose 16 code counts add up to 16 x 255 (stb 2.27 would overflow its Huffman table) */
    p = malloc(jpeg->data.n);
    memcpy(p, jpeg->data.p, jpeg->data.n);
    size_t at = 0;
    for (size_t i = 2; i + 1 < jpeg->data.n && !at; i++)
        if (p[i] == 0xFF && p[i + 1] == 0xC4) at = i;
    TK_ASSERT(at > 0 && at + 21 < jpeg->data.n);
    memset(p + at + 5, 0xFF, 16);
    expect_refused("jpeg DHT with 4080 codes", p, jpeg->data.n, 0, "Huffman table");
    memcpy(p, jpeg->data.p, jpeg->data.n);
    p[at + 2] = 0, p[at + 3] = 10; /* DHT segment length 10: its 16 counts would come from the next segment */
    expect_refused("jpeg DHT segment shorter than its counts", p, jpeg->data.n, 0, "runs past");
    /* the messages give the frame header's size once it was read (stb_image_write puts SOF0 first) */
    char size[32];
    snprintf(size, sizeof size, "(%d x %d)", W, H);
    memcpy(p, jpeg->data.p, jpeg->data.n);
    memset(p + at + 5, 0xFF, 16);
    expect_refused("jpeg DHT with 4080 codes after SOF0, the size", p, jpeg->data.n, 0, size);
    expect_refused("jpeg without its end-of-image marker, the size", jpeg->data.p, jpeg->data.n - 2, 0, size);
    free(p);
    /* the configurable limit */
    expect_refused("png over max_pixels 90", png->data.p, png->data.n, 90, "limit of 90");
    tk_err err = {0};
    tk_image *img = tk_image_decode(png->data.p, png->data.n, "png", (size_t)W * H, &err);
    report(img != NULL, "png at max_pixels = w * h decodes");
    tk_image_free(img);
}

/* ---- PNG integrity: chunk CRC-32 and the IDAT zlib stream's end and Adler-32 ---- */

static uint32_t be32(const uint8_t *q) { return (uint32_t)q[0] << 24 | (uint32_t)q[1] << 16 | (uint32_t)q[2] << 8 | q[3]; }

/* Offset of the first chunk of this type (its length field), 0 when absent. */
static size_t png_chunk_at(const uint8_t *p, size_t n, const char *type) {
    for (size_t pos = 8; pos + 12 <= n; pos += 12 + be32(p + pos))
        if (memcmp(p + pos + 4, type, 4) == 0) return pos;
    return 0;
}

/* Recomputes the CRC-32 of the chunk at pos (zlib's crc32, independent of vision/image.c's walk). */
static void png_fix_crc(uint8_t *p, size_t pos) {
    size_t clen = be32(p + pos);
    uint32_t c = (uint32_t)crc32(0L, p + pos + 4, (uInt)(clen + 4));
    uint8_t *q = p + pos + 8 + clen;
    q[0] = (uint8_t)(c >> 24), q[1] = (uint8_t)(c >> 16), q[2] = (uint8_t)(c >> 8), q[3] = (uint8_t)c;
}

static void test_png_integrity(const vcase *png) {
    size_t n = png->data.n;
    uint8_t *p = malloc(n + 64);
    const char *types[] = {"IHDR", "IDAT", "IEND"};
    for (int t = 0; t < 3; t++) { /* one flipped bit in the stored CRC, then in the chunk's data */
        size_t at = png_chunk_at(png->data.p, n, types[t]);
        TK_ASSERT(at > 0);
        size_t clen = be32(png->data.p + at);
        char what[64], needle[64];
        snprintf(needle, sizeof needle, "CRC-32 of the %s chunk at byte %zu", types[t], at);
        memcpy(p, png->data.p, n);
        p[at + 8 + clen + 3] ^= 0x01;
        snprintf(what, sizeof what, "png %s CRC flipped", types[t]);
        expect_refused(what, p, n, 0, needle);
        if (clen > 0) {
            memcpy(p, png->data.p, n);
            p[at + 8 + clen - 1] ^= 0x80;
            snprintf(what, sizeof what, "png %s data flipped", types[t]);
            expect_refused(what, p, n, 0, needle);
        }
    }
    /* the Adler-32 (last 4 bytes of the zlib stream) wrong, every CRC right: stb_image alone accepts it */
    size_t idat = png_chunk_at(png->data.p, n, "IDAT");
    size_t ilen = be32(png->data.p + idat);
    memcpy(p, png->data.p, n);
    p[idat + 8 + ilen - 1] ^= 0x01;
    png_fix_crc(p, idat);
    expect_refused("png Adler-32 wrong", p, n, 0, "Adler-32");
    /* the zlib stream cut before its end (the IDAT shortened by its 4 Adler-32 bytes, CRC right) */
    memcpy(p, png->data.p, idat + 8 + ilen - 4);
    size_t m = idat + 8 + ilen - 4;
    uint32_t nl = (uint32_t)(ilen - 4);
    p[idat] = (uint8_t)(nl >> 24), p[idat + 1] = (uint8_t)(nl >> 16), p[idat + 2] = (uint8_t)(nl >> 8), p[idat + 3] = (uint8_t)nl;
    memcpy(p + m, png->data.p + idat + 8 + ilen, n - (idat + 8 + ilen)); /* CRC placeholder, IEND */
    png_fix_crc(p, idat);
    expect_refused("png zlib stream without its end", p, n - 4, 0, "ends early");
    /* the IDAT split in two chunks (valid PNG): the stream is followed across chunks */
    size_t half = ilen / 2;
    memcpy(p, png->data.p, idat);
    size_t o = idat;
    for (int k = 0; k < 2; k++) {
        size_t part = k == 0 ? half : ilen - half, from = idat + 8 + (k == 0 ? 0 : half);
        p[o] = (uint8_t)(part >> 24), p[o + 1] = (uint8_t)(part >> 16), p[o + 2] = (uint8_t)(part >> 8), p[o + 3] = (uint8_t)part;
        memcpy(p + o + 4, "IDAT", 4);
        memcpy(p + o + 8, png->data.p + from, part);
        png_fix_crc(p, o);
        o += 12 + part;
    }
    memcpy(p + o, png->data.p + idat + 12 + ilen, n - (idat + 12 + ilen));
    o += n - (idat + 12 + ilen);
    tk_err err = {0};
    tk_image *img = tk_image_decode(p, o, "png in two IDAT chunks", 0, &err);
    report(img && memcmp(img->rgb, png->want, (size_t)W * H * 3) == 0, "png in two IDAT chunks decodes exactly%s%s",
           img ? "" : ": ", img ? "" : err.msg);
    tk_image_free(img);
    free(p);
}

static void test_misc_errors(void) {
    static const uint8_t junk[] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07};
    expect_refused("junk bytes", junk, sizeof junk, 0, "not a supported image");
    static const uint8_t tga[] = {0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 24, 0, 1, 2, 3};
    expect_refused("a TGA file", tga, sizeof tga, 0, "not a supported image");
    expect_refused("empty", junk, 0, 0, "empty");
    char path[256];
    snprintf(path, sizeof path, "%s/missing.png", g_dir);
    tk_err err = {0};
    tk_image *img = tk_image_load(path, 0, &err);
    report(!img && one_line_naming(&err, path), "a missing file: one line naming it");
    tk_image_free(img);
    snprintf(path, sizeof path, "%s/empty.jpg", g_dir);
    write_file(path, junk, 0);
    img = tk_image_load(path, 0, &err);
    report(!img && one_line_naming(&err, path) && strstr(err.msg, "empty"), "an empty file: one line naming it");
    tk_image_free(img);
    img = tk_image_load(g_dir, 0, &err);
    report(!img && one_line_naming(&err, g_dir), "a directory: one line naming it");
    tk_image_free(img);
}

/* ---- preprocessing invariants ---- */

static void test_preprocess(void) {
    tk_err err = {0};
    tk_image *c = tk_image_alloc(37, 23, &err);
    for (size_t i = 0; i < 37 * 23; i++) c->rgb[i * 3] = 200, c->rgb[i * 3 + 1] = 0, c->rgb[i * 3 + 2] = 255;
    static const size_t sizes[][2] = {{1, 1}, {5, 40}, {336, 336}, {37, 12}, {100, 23}, {18, 11}};
    int ok = 1;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        tk_image *r = tk_image_resize_bicubic(c, sizes[k][0], sizes[k][1], &err);
        ok = ok && r && r->w == sizes[k][0] && r->h == sizes[k][1];
        for (size_t i = 0; ok && i < r->w * r->h; i++)
            ok = r->rgb[i * 3] == 200 && r->rgb[i * 3 + 1] == 0 && r->rgb[i * 3 + 2] == 255;
        tk_image_free(r);
    }
    report(ok, "bicubic resize keeps a constant image constant (6 sizes, up and down)");
    uint8_t *pix = make_pixels(3);
    tk_image *img = tk_image_alloc(W, H, &err);
    memcpy(img->rgb, pix, (size_t)W * H * 3);
    tk_image *same = tk_image_resize_bicubic(img, W, H, &err);
    report(same && memcmp(same->rgb, pix, (size_t)W * H * 3) == 0, "resize to the same size is a copy");
    tk_image_free(same);
    /* center crop 13x7 -> 4x4: top = (7-4)//2 = 1, left = (13-4)//2 = 4 */
    tk_image *cr = tk_image_center_crop(img, 4, 4, &err);
    ok = cr != NULL;
    for (size_t y = 0; ok && y < 4; y++)
        for (size_t x = 0; x < 4; x++) ok = ok && memcmp(cr->rgb + (y * 4 + x) * 3, pix + ((y + 1) * W + x + 4) * 3, 3) == 0;
    report(ok, "center crop 13x7 -> 4x4 at (top 1, left 4)");
    tk_image_free(cr);
    /* crop larger than the image: zero padding, image at ceil((9-7)/2) = 1 row, ceil((16-13)/2) = 2 cols */
    cr = tk_image_center_crop(img, 16, 9, &err);
    ok = cr != NULL && cr->rgb[0] == 0 && memcmp(cr->rgb + (1 * 16 + 2) * 3, pix, 3) == 0 &&
         memcmp(cr->rgb + (7 * 16 + 14) * 3, pix + ((size_t)(H - 1) * W + W - 1) * 3, 3) == 0 &&
         cr->rgb[(8 * 16 + 15) * 3] == 0;
    report(ok, "center crop 13x7 -> 16x9 pads with zeros (image at row 1, col 2)");
    tk_image_free(cr);
    tk_preproc p;
    tk_preproc_init(&p, TK_PREPROC_LLAVA_PAD, 336);
    report(p.pad[0] == 122 && p.pad[1] == 116 && p.pad[2] == 104, "LLaVA pad colour (122, 116, 104)");
    tk_image *sq = tk_image_expand2square(img, p.pad, &err);
    ok = sq && sq->w == 13 && sq->h == 13 && sq->rgb[0] == 122 && sq->rgb[1] == 116 && sq->rgb[2] == 104 &&
         memcmp(sq->rgb + (3 * 13) * 3, pix, 3) == 0 && memcmp(sq->rgb + (12 * 13 + 12) * 3, sq->rgb, 3) == 0;
    report(ok, "expand2square 13x7 -> 13x13, image at row (13-7)//2 = 3");
    tk_image_free(sq);
    float *t = malloc(tk_preproc_numel(&p) * sizeof *t);
    int rc = tk_preprocess(t, img, &p, &err);
    /* the top-left pixel is pad colour after the resize: (122/255 - mean) / std */
    float want = ((float)(122 * (1.0 / 255)) - (float)tk_clip_mean[0]) / (float)tk_clip_std[0];
    report(rc == 0 && t[0] == want, "llava-pad 336 tensor: corner = normalized pad colour (%g)", (double)want);
    free(t);
    tk_preproc_init(&p, TK_PREPROC_CLIP, 0);
    t = malloc(16);
    rc = tk_preprocess(t, img, &p, &err);
    report(rc != 0 && strchr(err.msg, '\n') == NULL, "size 0 refused: %s", err.msg);
    free(t);
    tk_preproc_mode m;
    report(tk_preproc_mode_from_name("clip", &m, &err) == 0 && m == TK_PREPROC_CLIP &&
               tk_preproc_mode_from_name("bogus", &m, &err) != 0,
           "preprocessing mode names");
    tk_image_free(img);
    tk_image_free(c);
    free(pix);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_vision_img_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    uint8_t *g1 = make_pixels(1), *c3 = make_pixels(3), *c4 = make_pixels(4);
    uint8_t want_g[W * H * 3], want_c[W * H * 3], want_gif[W * H * 3], want_16[W * H * 3];
    expect_rgb(want_g, g1, 1);
    expect_rgb(want_c, c3, 3);
    /* 16-bit samples v * 256 + 0xA5 scaled as PIL does: round(s / 65535 * 255) (0 -> 1, 255 -> 255) */
    for (size_t i = 0; i < (size_t)W * H * 3; i++) want_16[i] = (uint8_t)nearbyint((want_c[i] * 256.0 + 0xA5) / 65535 * 255);
    for (size_t i = 0; i < (size_t)W * H; i++) {
        want_gif[i * 3] = g1[i], want_gif[i * 3 + 1] = (uint8_t)(255 - g1[i]), want_gif[i * 3 + 2] = g1[i] / 2;
    }
    vcase cases[] = {
        {"gray.png", make_png(g1, 1), want_g, 0, SIZE_MAX},
        {"rgb.png", make_png(c3, 3), want_c, 0, SIZE_MAX},
        {"rgba.png", make_png(c4, 4), want_c, 0, SIZE_MAX},
        {"rgb.bmp", make_bmp(c3, 3), want_c, 0, SIZE_MAX},
        {"gray.pgm", make_pnm(g1, 1, 0), want_g, 0, SIZE_MAX},
        {"rgb.ppm", make_pnm(c3, 3, 0), want_c, 0, SIZE_MAX},
        {"rgb16.ppm", make_pnm(c3, 3, 1), want_16, 0, SIZE_MAX},
        {"palette.gif", make_gif(g1), want_gif, 0, 0},
        {"rgb.jpg", make_jpg(c3, 3), want_c, 1, SIZE_MAX},
        {"gray.jpg", make_jpg(g1, 1), want_g, 1, SIZE_MAX},
    };
    size_t n_cases = sizeof cases / sizeof cases[0];
    cases[7].min_ok = cases[7].data.n - 1; /* only the trailer may be missing: the first frame is whole */
    printf("== valid files\n");
    for (size_t i = 0; i < n_cases; i++) test_valid(&cases[i]);
    printf("== truncations\n");
    for (size_t i = 0; i < n_cases; i++) test_truncations(&cases[i]);
    printf("== corruptions\n");
    for (size_t i = 0; i < n_cases; i++) test_corruptions(&cases[i], 1000 + i);
    printf("== huge headers, limits, other errors\n");
    test_huge_headers(&cases[1], &cases[3], &cases[7], &cases[8]);
    test_misc_errors();
    printf("== PNG integrity (CRC-32, zlib stream)\n");
    test_png_integrity(&cases[1]);
    printf("== preprocessing\n");
    test_preprocess();
    for (size_t i = 0; i < n_cases; i++) free(cases[i].data.p);
    free(g1);
    free(c3);
    free(c4);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    printf("test_vision_image: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
