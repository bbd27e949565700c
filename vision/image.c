/* image.c: stb_image decoding to 8-bit RGB with limits, stb_image_write PNG encoding (see image.h).
 *
 * The only translation unit that compiles stb_image and stb_image_write: both STATIC (internal
 * linkage), stdio off (files are read by tk_read_file, so the size check and the error come from
 * one place), and only the supported decoders built. Binary PNM is decoded here (stb 2.27 reads
 * 16-bit samples in host byte order and does not scale maxval != 255; PIL does both).
 */
#include "image.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

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

/* Walks a JPEG's markers (entropy-coded bytes between them skipped: inside them FF is always followed
 * by 00 or a restart marker) and checks what stb_image 2.27 does not:
 *  - every Huffman table (DHT) holds at most 256 codes and lies inside its segment: stb's
 *    stbi__build_huffman writes past its size[257] array otherwise (a crash found by tests/fuzz;
 *    a short segment makes stb read the counts from the next one);
 *  - an end-of-image marker follows the first scan: stb pads a truncated JPEG with zeros and reports
 *    success.
 * Structure it cannot follow (bad segment lengths) is left to stb. 0, or -1 with err set. */
static int jpeg_check(const uint8_t *p, size_t len, const char *name, tk_err *err) {
    size_t pos = 2;
    char size[48] = "before its frame header"; /* the frame size once an SOF segment was passed */
    int scan = 0, progressive = 0;
    uint8_t defined[2][16] = {{0}}; /* Huffman tables [DC/AC][id] defined so far: stb decodes a scan with
                                       whatever uninitialised memory an undefined table holds */
    while (pos + 2 <= len) {
        if (p[pos] != 0xFF) { /* entropy-coded data (or junk stb will judge) */
            pos++;
            continue;
        }
        uint8_t m = p[pos + 1];
        if (m == 0xFF) { /* fill byte */
            pos++;
            continue;
        }
        if (m == 0xD9) return 0; /* EOI */
        if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) { /* stuffed FF, markers without a length */
            pos += 2;
            continue;
        }
        if (pos + 4 > len) break;
        size_t seg = ((size_t)p[pos + 2] << 8) | p[pos + 3];
        if (m == 0xC4 && seg >= 2 && pos + 2 + seg > len) {
            /* a DHT running past the end: stb still reads every table of it (bytes past the end as 0) */
            size_t off = pos + 4, end = pos + 2 + seg;
            while (off + 17 <= end) {
                size_t sum = 0;
                for (size_t i = 1; i <= 16; i++) sum += off + i < len ? p[off + i] : 0;
                if (sum > 256)
                    return tk_fail(err, "%s: cannot decode JPEG image (%s): corrupt (the Huffman table at byte "
                                   "%zu has %zu codes, at most 256)", name, size, off, sum);
                off += 17 + sum;
            }
        }
        if (seg < 2 || pos + 2 + seg > len) {
            if (!scan) return 0; /* a broken header: stb reports it */
            break;
        }
        if (m == 0xC4) { /* DHT: tables of [class/id][16 counts][sum values] */
            size_t off = pos + 4, end = pos + 2 + seg;
            while (off + 17 <= end) {
                size_t sum = 0;
                for (size_t i = 1; i <= 16; i++) sum += p[off + i];
                if (sum > 256)
                    return tk_fail(err, "%s: cannot decode JPEG image (%s): corrupt (the Huffman table at byte "
                                   "%zu has %zu codes, at most 256)", name, size, off, sum);
                if (off + 17 + sum > end) break;
                defined[(p[off] >> 4) & 1][p[off] & 15] = 1;
                off += 17 + sum;
            }
            if (off != end) /* stb would read the rest of a table from the next segment */
                return tk_fail(err, "%s: cannot decode JPEG image (%s): corrupt (the Huffman table at byte %zu "
                               "runs past the end of its DHT segment at byte %zu)", name, size, off, end);
        }
        if (m == 0xC2) progressive = 1;
        if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC && seg >= 7) /* SOFn: P, Y, X */
            snprintf(size, sizeof size, "%u x %u", (unsigned)p[pos + 7] << 8 | p[pos + 8],
                     (unsigned)p[pos + 5] << 8 | p[pos + 6]);
        if (m == 0xDA && seg >= 6) { /* SOS: Ns, Ns x (component, Td << 4 | Ta), Ss, Se, Ah << 4 | Al */
            size_t ns = p[pos + 4];
            if (ns >= 1 && 2 * ns + 6 <= seg) {
                size_t ss = p[pos + 5 + 2 * ns], ah = p[pos + 7 + 2 * ns] >> 4;
                int dc = !progressive || (ss == 0 && ah == 0), ac = !progressive || ss > 0;
                for (size_t i = 0; i < ns; i++) {
                    uint8_t t = p[pos + 6 + 2 * i];
                    if ((dc && !defined[0][t >> 4]) || (ac && !defined[1][t & 15]))
                        return tk_fail(err, "%s: cannot decode JPEG image (%s): corrupt (the scan at byte %zu "
                                       "uses a Huffman table that was never defined)", name, size, pos);
                }
            }
        }
        if (m == 0xDA) scan = 1;
        pos += 2 + seg;
    }
    if (!scan) return 0; /* no scan found: stb reports it */
    return tk_fail(err, "%s: cannot decode JPEG image (%s): truncated (no end-of-image marker after the scan)",
                   name, size);
}

/* Binary PNM header, parsed as stb_image parses it (whitespace, '#' comments to end of line, decimal
 * fields, one byte after maxval), but refusing fields over 8 digits before stb's int parser can
 * overflow. Returns 0 and the fields and the offset of the first sample, -1 with err set. */
static int pnm_header(const uint8_t *p, size_t len, size_t *w, size_t *h, size_t *maxv, size_t *data_off,
                      const char *name, tk_err *err) {
    size_t pos = 2, vals[3];
    static const char *what[3] = {"width", "height", "maxval"};
    for (int f = 0; f < 3; f++) {
        for (;;) { /* whitespace and comments */
            while (pos < len && (p[pos] == ' ' || (p[pos] >= '\t' && p[pos] <= '\r'))) pos++;
            if (pos < len && p[pos] == '#') {
                while (pos < len && p[pos] != '\n' && p[pos] != '\r') pos++;
                continue;
            }
            break;
        }
        size_t v = 0, nd = 0;
        while (pos < len && p[pos] >= '0' && p[pos] <= '9') {
            if (++nd > 8) return tk_fail(err, "%s: PNM header: %s has more than 8 digits", name, what[f]);
            v = v * 10 + (size_t)(p[pos++] - '0');
        }
        if (nd == 0)
            return tk_fail(err, "%s: PNM header: %s at byte %zu (%s)", name,
                           pos >= len ? "truncated" : "expected a decimal number", pos, what[f]);
        vals[f] = v;
    }
    if (vals[2] == 0 || vals[2] > 65535)
        return tk_fail(err, "%s: PNM header: maxval %zu, expected 1..65535", name, vals[2]);
    *w = vals[0];
    *h = vals[1];
    *maxv = vals[2];
    *data_off = pos + 1; /* the single whitespace byte after maxval */
    return 0;
}

/* End offset of the first image's LZW data in a GIF (just past its block terminator), or 0 when the
 * file ends before it; (size_t)-1 when the block structure is not understood (stb decides then). */
static size_t gif_first_image_end(const uint8_t *p, size_t len) {
    size_t pos = 13;
    if (len < 13) return 0;
    if (p[10] & 0x80) pos += 3 * ((size_t)2 << (p[10] & 7));
    for (;;) {
        if (pos >= len) return 0;
        uint8_t b = p[pos];
        int image = b == 0x2C;
        if (b == 0x21) {
            pos += 2;
        } else if (image) {
            if (pos + 10 > len) return 0;
            uint8_t flags = p[pos + 9];
            pos += 10;
            if (flags & 0x80) pos += 3 * ((size_t)2 << (flags & 7));
            pos += 1; /* LZW minimum code size */
        } else {
            return (size_t)-1;
        }
        for (;;) { /* data sub-blocks up to the zero-length terminator */
            if (pos >= len) return 0;
            size_t n = p[pos];
            pos += 1 + n;
            if (n == 0) break;
        }
        if (pos > len) return 0;
        if (image) return pos;
    }
}

/* A PNG's chunks (length (4, big-endian), type (4), data, CRC-32 (4)) up to and including IEND, checked
 * for what stb_image 2.27 skips: every chunk's CRC-32 over its type and data, and the zlib stream of
 * the IDAT chunks, inflated here by zlib to its end (stb reads the deflate blocks but neither the
 * Adler-32 after them nor whether the stream ends): libpng and PIL refuse all three. The inflated
 * bytes go to a small scratch buffer and are dropped; stb decodes the pixels. A file that ends before
 * IEND is truncated. 0, or -1 with err set naming the chunk and its byte offset. */
static int png_check(const uint8_t *p, size_t len, const char *name, size_t w, size_t h, tk_err *err) {
    size_t pos = 8;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    int z_open = 0, z_done = 0, rc = -1;
    size_t z_at = 0; /* the IDAT chunk where the stream went wrong */
    uint8_t scratch[16384];
    for (;;) {
        if (pos + 12 > len) break;
        size_t clen = (size_t)p[pos] << 24 | (size_t)p[pos + 1] << 16 | (size_t)p[pos + 2] << 8 | p[pos + 3];
        if (clen > 0x7FFFFFFFu) {
            tk_fail(err, "%s: cannot decode PNG image (%zu x %zu): corrupt (chunk at byte %zu has length %zu)", name,
                    w, h, pos, clen);
            goto done;
        }
        if (clen > len - pos - 12) break;
        const uint8_t *type = p + pos + 4, *c = p + pos + 8 + clen;
        char tname[5];
        for (int i = 0; i < 4; i++) tname[i] = type[i] >= 0x20 && type[i] < 0x7F ? (char)type[i] : '?';
        tname[4] = 0;
        uint32_t stored = (uint32_t)c[0] << 24 | (uint32_t)c[1] << 16 | (uint32_t)c[2] << 8 | c[3];
        uint32_t crc = (uint32_t)crc32(crc32(0L, Z_NULL, 0), type, (uInt)(clen + 4));
        if (crc != stored) {
            tk_fail(err, "%s: corrupt PNG image: the CRC-32 of the %s chunk at byte %zu does not match its data "
                    "(stored %08x, computed %08x)", name, tname, pos, stored, crc);
            goto done;
        }
        if (memcmp(type, "IDAT", 4) == 0 && !z_done) {
            if (!z_open) {
                if (inflateInit(&zs) != Z_OK) {
                    tk_fail(err, "%s: cannot decode PNG image: zlib inflateInit failed (out of memory?)", name);
                    goto done;
                }
                z_open = 1;
            }
            zs.next_in = (Bytef *)(uintptr_t)(type + 4);
            zs.avail_in = (uInt)clen;
            while (zs.avail_in > 0 && !z_done) {
                zs.next_out = scratch;
                zs.avail_out = sizeof scratch;
                int zr = inflate(&zs, Z_NO_FLUSH);
                if (zr == Z_STREAM_END) {
                    z_done = 1;
                } else if (zr == Z_DATA_ERROR || zr == Z_NEED_DICT) {
                    const char *why = zr == Z_NEED_DICT ? "a preset dictionary" : zs.msg ? zs.msg : "data error";
                    if (strcmp(why, "incorrect data check") == 0) why = "Adler-32 mismatch: incorrect data check";
                    tk_fail(err, "%s: corrupt PNG image: the zlib stream of the IDAT chunk at byte %zu is invalid "
                            "(%s)", name, pos, why);
                    goto done;
                } else if (zr == Z_MEM_ERROR) {
                    tk_fail(err, "%s: cannot decode PNG image: out of memory in zlib", name);
                    goto done;
                } else if (zr == Z_BUF_ERROR && zs.avail_out != 0) {
                    break; /* needs the next chunk's bytes */
                }
            }
            z_at = pos;
        }
        if (memcmp(type, "IEND", 4) == 0) {
            if (z_open && !z_done) {
                tk_fail(err, "%s: corrupt PNG image: the zlib stream of the IDAT chunks ends early (the last IDAT is "
                        "at byte %zu; no end of stream and Adler-32 before IEND)", name, z_at);
                goto done;
            }
            rc = 0; /* no IDAT at all: stb refuses it */
            goto done;
        }
        pos += 12 + clen;
    }
    tk_fail(err, "%s: cannot decode PNG image (%zu x %zu): truncated (the file ends inside the chunk at byte %zu, "
            "before IEND)", name, w, h, pos);
done:
    if (z_open) inflateEnd(&zs);
    return rc;
}

/* stb_image reads past the end of a truncated BMP, PNM or GIF as zeros (or, for PNM, leaves the
 * buffer uninitialized) and a truncated JPEG as zero padding, reporting success: the sizes its
 * headers imply are checked here first. 0 when complete (or for stb to judge), -1 with err. */
static int check_complete(tk_image_format f, const uint8_t *p, size_t len, size_t w, size_t h, const char *name,
                          tk_err *err) {
    const char *fn = tk_image_format_name(f);
    size_t need = 0;
    if (f == TK_IMAGE_FORMAT_JPEG) return 0; /* jpeg_check ran in tk_image_info */
    if (f == TK_IMAGE_FORMAT_GIF) {
        size_t end = gif_first_image_end(p, len);
        if (end == 0)
            return tk_fail(err, "%s: cannot decode GIF image (%zu x %zu): truncated (the file ends inside the first "
                           "frame)", name, w, h);
        return 0;
    }
    if (f == TK_IMAGE_FORMAT_PNG) return png_check(p, len, name, w, h, err);
    if (f == TK_IMAGE_FORMAT_PNM) {
        size_t pw, ph, maxv, off;
        if (pnm_header(p, len, &pw, &ph, &maxv, &off, name, err) != 0) return -1;
        need = off + w * h * (p[1] == '6' ? 3 : 1) * (maxv > 255 ? 2 : 1); /* w * h <= max_pixels */
    } else if (f == TK_IMAGE_FORMAT_BMP && len >= 30) {
        size_t off = (size_t)p[10] | (size_t)p[11] << 8 | (size_t)p[12] << 16 | (size_t)p[13] << 24;
        size_t hsz = (size_t)p[14] | (size_t)p[15] << 8 | (size_t)p[16] << 16 | (size_t)p[17] << 24;
        size_t bpp = hsz == 12 ? ((size_t)p[24] | (size_t)p[25] << 8) : ((size_t)p[28] | (size_t)p[29] << 8);
        size_t comp = hsz == 12 || len < 34 ? 0 : ((size_t)p[30] | (size_t)p[31] << 8);
        if (comp != 0 && comp != 3) return 0; /* RLE and others: stb refuses them itself */
        if (bpp == 0 || bpp > 32) return 0;
        size_t row = (w * bpp + 31) / 32 * 4;
        need = off + row * h;
    } else {
        return 0;
    }
    if (need > len)
        return tk_fail(err, "%s: cannot decode %s image (%zu x %zu): truncated (%zu bytes, the header implies %zu)",
                       name, fn, w, h, len, need);
    return 0;
}

/* Binary PGM/PPM samples to RGB as PIL 9.4 reads them: maxval 255 raw; otherwise (16-bit samples
 * big-endian) min(255, round(v / maxval * 255)) with Python's round (half to even). PIL reads a
 * PGM with maxval > 255 as mode "I" instead, which convert("RGB") then clips: not reproduced. */
static tk_image *pnm_decode(const uint8_t *p, size_t len, size_t w, size_t h, const char *name, tk_err *err) {
    size_t pw, ph, maxv, off;
    if (pnm_header(p, len, &pw, &ph, &maxv, &off, name, err) != 0) return NULL;
    size_t ch = p[1] == '6' ? 3 : 1, bytes = maxv > 255 ? 2 : 1;
    tk_image *img = tk_image_alloc(w, h, err);
    if (!img) {
        tk_err_prefix(err, name);
        return NULL;
    }
    const uint8_t *s = p + off; /* check_complete: off + w * h * ch * bytes <= len */
    for (size_t i = 0; i < w * h; i++) {
        for (size_t c = 0; c < ch; c++, s += bytes) {
            unsigned v = bytes == 2 ? (unsigned)s[0] << 8 | s[1] : s[0];
            uint8_t o;
            if (maxv == 255) {
                o = (uint8_t)v;
            } else {
                double r = nearbyint((double)v / (double)maxv * 255.0);
                o = (uint8_t)(r > 255.0 ? 255.0 : r);
            }
            if (ch == 1) img->rgb[i * 3] = img->rgb[i * 3 + 1] = img->rgb[i * 3 + 2] = o;
            else img->rgb[i * 3 + c] = o;
        }
    }
    return img;
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
    const uint8_t *p = data;
    int x = 0, y = 0, comp = 0;
    /* stbi_info already builds the Huffman tables that come before the frame header: walk the markers
     * first (a DHT of more than 256 codes overflows stb's table; found by the image fuzz target) */
    if (f == TK_IMAGE_FORMAT_JPEG && jpeg_check(p, len, name, err) != 0) return -1;
    if (f == TK_IMAGE_FORMAT_PNM) {
        size_t pw, ph, maxv, off;
        if (pnm_header(p, len, &pw, &ph, &maxv, &off, name, err) != 0) return -1;
        x = (int)pw; /* at most 8 digits */
        y = (int)ph;
    } else if (f == TK_IMAGE_FORMAT_PNG && len >= 24 && memcmp(p + 12, "IHDR", 4) == 0 &&
               ((p[16] | p[20]) & 0x80)) {
        /* a side of 2^31 or more: stb would say only "unknown image type" */
        return tk_fail(err, "%s: PNG image of %u x %u pixels: a side exceeds %zu", name,
                       (unsigned)p[16] << 24 | (unsigned)p[17] << 16 | (unsigned)p[18] << 8 | p[19],
                       (unsigned)p[20] << 24 | (unsigned)p[21] << 16 | (unsigned)p[22] << 8 | p[23], TK_IMAGE_MAX_SIDE);
    } else if (f == TK_IMAGE_FORMAT_PNG && len >= 24 && memcmp(p + 12, "IHDR", 4) == 0) {
        /* read here: stb refuses sizes over 2^30 bytes with "unknown image type", before our limit */
        x = (int)((unsigned)p[16] << 24 | (unsigned)p[17] << 16 | (unsigned)p[18] << 8 | p[19]);
        y = (int)((unsigned)p[20] << 24 | (unsigned)p[21] << 16 | (unsigned)p[22] << 8 | p[23]);
    } else if (!stbi_info_from_memory(data, (int)len, &x, &y, &comp)) {
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
    if (check_complete(f, data, len, w, h, name, err) != 0) return NULL;
    if (f == TK_IMAGE_FORMAT_PNM) return pnm_decode(data, len, w, h, name, err);
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
