/* convert_fashion_mnist.c: Fashion-MNIST idx (gzip'd or raw) -> PNGs + LLaVA JSON (see the header). */
#include "convert_fashion_mnist.h"

#include "../vision/image.h"

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

const char *const tk_fmnist_classes[TK_FMNIST_N_CLASSES] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
};

const char *const tk_fmnist_folders[TK_FMNIST_N_CLASSES] = {
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
};

const char *const tk_fmnist_questions[TK_FMNIST_N_QUESTIONS] = {
    "What item of clothing is this?",
    "What is shown in this picture?",
    "Which kind of fashion item does this image show?",
    "Name the piece of clothing or accessory in the image.",
    "What type of garment or accessory is this?",
};

/* An idx file opened through zlib (gzread reads plain files unchanged). */
typedef struct {
    gzFile f;
    char path[4096];
    size_t pos; /* bytes consumed (uncompressed) */
} idx_file;

static int idx_open(idx_file *x, const char *dir, const char *stem, tk_err *err) {
    memset(x, 0, sizeof *x);
    struct stat sb;
    if (tk_pathf(x->path, sizeof x->path, err, "%s/%s.gz", dir, stem) != 0) return -1;
    if (stat(x->path, &sb) != 0 && tk_pathf(x->path, sizeof x->path, err, "%s/%s", dir, stem) != 0) return -1;
    if (stat(x->path, &sb) != 0)
        return tk_fail(err, "%s/%s(.gz): cannot open: %s (expected the Fashion-MNIST idx files in %s)", dir, stem,
                       strerror(errno), dir);
    if (!S_ISREG(sb.st_mode)) return tk_fail(err, "%s: not a regular file", x->path);
    x->f = gzopen(x->path, "rb");
    if (!x->f) return tk_fail(err, "%s: cannot open: %s", x->path, errno ? strerror(errno) : "out of memory");
    return 0;
}

static void idx_close(idx_file *x) {
    if (x->f) gzclose(x->f);
    x->f = NULL;
}

/* zlib's message for the stream's error state, without the "PATH: " zlib puts before it. */
static const char *gz_msg(idx_file *x, int *code) {
    const char *m = gzerror(x->f, code);
    size_t n = strlen(x->path);
    if (m && strncmp(m, x->path, n) == 0 && m[n] == ':' && m[n + 1] == ' ') m += n + 2;
    return m ? m : "unknown error";
}

/* Reads exactly n bytes; what = what they are, for the message. */
static int idx_read(idx_file *x, void *buf, size_t n, const char *what, tk_err *err) {
    size_t got = 0;
    while (got < n) {
        unsigned chunk = n - got > (1u << 30) ? (1u << 30) : (unsigned)(n - got);
        int r = gzread(x->f, (char *)buf + got, chunk);
        if (r < 0) {
            int code;
            const char *msg = gz_msg(x, &code);
            return tk_fail(err, "%s: corrupt gzip data at uncompressed byte %zu: %s", x->path, x->pos + got, msg);
        }
        if (r == 0) {
            int code;
            const char *msg = gz_msg(x, &code);
            if (code != Z_OK && code != Z_STREAM_END)
                return tk_fail(err, "%s: corrupt gzip data at uncompressed byte %zu: %s", x->path, x->pos + got, msg);
            return tk_fail(err, "%s: truncated: the data ends at byte %zu, inside %s (expected %zu more bytes)",
                           x->path, x->pos + got, what, n - got);
        }
        got += (size_t)r;
    }
    x->pos += n;
    return 0;
}

/* 1 when the stream is at its end, 0 when bytes remain, -1 on a read error. */
static int idx_at_end(idx_file *x, tk_err *err) {
    char c;
    int r = gzread(x->f, &c, 1);
    if (r == 0) {
        int code;
        const char *msg = gz_msg(x, &code);
        if (code != Z_OK && code != Z_STREAM_END)
            return tk_fail(err, "%s: corrupt gzip data at uncompressed byte %zu: %s", x->path, x->pos, msg);
        return 1;
    }
    if (r < 0) return tk_fail(err, "%s: corrupt gzip data at uncompressed byte %zu", x->path, x->pos);
    return 0;
}

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* Header: magic 0x0000 08 <ndim>, then ndim big-endian u32 sizes. */
static int idx_header(idx_file *x, uint32_t ndim, uint32_t *dims, tk_err *err) {
    uint8_t h[16];
    if (idx_read(x, h, 4 + 4 * (size_t)ndim, "the idx header", err) != 0) return -1;
    uint32_t magic = be32(h);
    if (magic != (0x800u | ndim))
        return tk_fail(err, "%s: bad idx magic 0x%08x (expected 0x%08x: unsigned bytes, %u dimension%s)", x->path,
                       magic, 0x800u | ndim, ndim, ndim == 1 ? "" : "s");
    for (uint32_t i = 0; i < ndim; i++) dims[i] = be32(h + 4 + 4 * i);
    return 0;
}

/* Plain write (no fsync: tens of thousands of small files; the JSON, written last, is the commit). */
static int write_plain(const char *path, const void *data, size_t len, tk_err *err) {
    FILE *f = fopen(path, "wb");
    if (!f) return tk_fail(err, "%s: cannot create: %s", path, strerror(errno));
    int ok = fwrite(data, 1, len, f) == len;
    int e = errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (!ok) {
        remove(path);
        return tk_fail(err, "%s: write failed: %s", path, strerror(e));
    }
    return 0;
}

int tk_convert_fashion_mnist(const tk_fmnist_opts *o, tk_fmnist_stats *st, tk_err *err) {
    tk_fmnist_stats s;
    memset(&s, 0, sizeof s);
    if (st) *st = s;
    if (!o || !o->input_dir || !o->out_dir) return tk_fail(err, "fashion-mnist: --input and --out are required");
    const char *split = o->split ? o->split : "train";
    const char *stem;
    if (strcmp(split, "train") == 0) stem = "train";
    else if (strcmp(split, "test") == 0) stem = "t10k";
    else return tk_fail(err, "fashion-mnist: unknown split '%s' (expected train or test)", split);
    char img_stem[64], lbl_stem[64];
    snprintf(img_stem, sizeof img_stem, "%s-images-idx3-ubyte", stem);
    snprintf(lbl_stem, sizeof lbl_stem, "%s-labels-idx1-ubyte", stem);

    idx_file fi, fl;
    if (idx_open(&fi, o->input_dir, img_stem, err) != 0) return -1;
    if (idx_open(&fl, o->input_dir, lbl_stem, err) != 0) {
        idx_close(&fi);
        return -1;
    }
    int rc = -1, out_existed = 1;
    uint8_t *pix = NULL, *labels = NULL;
    cJSON *root = NULL;
    char *json = NULL;
    uint32_t di[3], dl[1];
    if (idx_header(&fi, 3, di, err) != 0 || idx_header(&fl, 1, dl, err) != 0) goto done;
    if (di[1] == 0 || di[2] == 0 || di[1] > TK_FMNIST_MAX_SIDE || di[2] > TK_FMNIST_MAX_SIDE) {
        tk_fail(err, "%s: images of %u x %u pixels (expected rows and columns 1..%d)", fi.path, di[1], di[2],
                TK_FMNIST_MAX_SIDE);
        goto done;
    }
    if (di[0] != dl[0]) {
        tk_fail(err, "%s: %u labels but %s has %u images", fl.path, dl[0], fi.path, di[0]);
        goto done;
    }
    if (di[0] == 0) {
        tk_fail(err, "%s: no images (the idx header says 0)", fi.path);
        goto done;
    }
    s.available = di[0];
    s.rows = di[1];
    s.cols = di[2];
    size_t n = o->limit > 0 && o->limit < s.available ? o->limit : s.available;
    size_t npix = s.rows * s.cols;

    char dir[4096];
    struct stat osb;
    out_existed = stat(o->out_dir, &osb) == 0;
    if (tk_mkdir_p(o->out_dir, err) != 0) goto done;
    if (o->image_folder) {
        for (int c = 0; c < TK_FMNIST_N_CLASSES; c++) {
            if (tk_pathf(dir, sizeof dir, err, "%s/%s", o->out_dir, tk_fmnist_folders[c]) != 0 ||
                tk_mkdir_p(dir, err) != 0)
                goto done;
        }
    } else if (tk_pathf(dir, sizeof dir, err, "%s/images", o->out_dir) != 0 || tk_mkdir_p(dir, err) != 0) {
        goto done;
    }

    labels = malloc(n);
    pix = malloc(npix);
    root = cJSON_CreateArray();
    if (!labels || !pix || !root) {
        tk_fail(err, "fashion-mnist: out of memory");
        goto done;
    }
    if (idx_read(&fl, labels, n, "the labels", err) != 0) goto done;
    for (size_t i = 0; i < n; i++) {
        if (labels[i] >= TK_FMNIST_N_CLASSES) {
            tk_fail(err, "%s: label %zu is %u (expected 0..%d)", fl.path, i, labels[i], TK_FMNIST_N_CLASSES - 1);
            goto done;
        }
    }
    size_t every = o->progress_every ? o->progress_every : 1000;
    for (size_t i = 0; i < n; i++) {
        char what[64], name[96], path[4200], id[96], q[256];
        snprintf(what, sizeof what, "image %zu", i);
        if (idx_read(&fi, pix, npix, what, err) != 0) goto done;
        size_t len = 0;
        uint8_t *png = tk_image_encode_png(&len, pix, s.cols, s.rows, 1, err);
        if (!png) goto done;
        if (o->image_folder) snprintf(name, sizeof name, "%s/%s_%05zu.png", tk_fmnist_folders[labels[i]], split, i);
        else snprintf(name, sizeof name, "images/%s_%05zu.png", split, i);
        int wr = tk_pathf(path, sizeof path, err, "%s/%s", o->out_dir, name);
        if (wr == 0) wr = write_plain(path, png, len, err);
        free(png);
        if (wr != 0) goto done;
        if (o->image_folder) { /* no JSON: one image is one file; it counts once written */
            s.per_class[labels[i]]++;
            s.items++;
            if (o->progress && (s.items % every == 0 || s.items == n)) o->progress(o->progress_ctx, s.items, n);
            continue;
        }
        snprintf(id, sizeof id, "fashion-mnist-%s-%05zu", split, i);
        snprintf(q, sizeof q, "<image>\n%s", tk_fmnist_questions[i % TK_FMNIST_N_QUESTIONS]);
        cJSON *rec = cJSON_CreateObject(), *conv = cJSON_CreateArray(), *h = cJSON_CreateObject(),
              *g = cJSON_CreateObject();
        int ok = rec && conv && h && g && cJSON_AddStringToObject(h, "from", "human") &&
                 cJSON_AddStringToObject(h, "value", q) && cJSON_AddStringToObject(g, "from", "gpt") &&
                 cJSON_AddStringToObject(g, "value", tk_fmnist_classes[labels[i]]);
        if (ok) {
            cJSON_AddItemToArray(conv, h);
            cJSON_AddItemToArray(conv, g);
            h = g = NULL;
            ok = cJSON_AddStringToObject(rec, "id", id) && cJSON_AddStringToObject(rec, "image", name);
            cJSON_AddItemToObject(rec, "conversations", conv);
            conv = NULL;
            cJSON_AddItemToArray(root, rec);
            rec = NULL;
        }
        cJSON_Delete(rec);
        cJSON_Delete(conv);
        cJSON_Delete(h);
        cJSON_Delete(g);
        if (!ok) {
            tk_fail(err, "fashion-mnist: out of memory building the JSON");
            goto done;
        }
        s.per_class[labels[i]]++;
        s.items++;
        if (o->progress && (s.items % every == 0 || s.items == n)) o->progress(o->progress_ctx, s.items, n);
    }
    if (n == s.available) { /* the whole file was read: nothing may follow */
        int e1 = idx_at_end(&fi, err);
        if (e1 < 0) goto done;
        if (e1 == 0) {
            tk_fail(err, "%s: data continues after the %zu images the idx header declares", fi.path, n);
            goto done;
        }
        int e2 = idx_at_end(&fl, err);
        if (e2 < 0) goto done;
        if (e2 == 0) {
            tk_fail(err, "%s: data continues after the %zu labels the idx header declares", fl.path, n);
            goto done;
        }
    }
    if (o->image_folder) {
        rc = 0;
        goto done;
    }
    json = cJSON_Print(root);
    if (!json) {
        tk_fail(err, "fashion-mnist: out of memory printing the JSON");
        goto done;
    }
    char jpath[4200];
    if (tk_pathf(jpath, sizeof jpath, err, "%s/%s.json", o->out_dir, split) != 0) goto done;
    if (tk_write_file_atomic(jpath, json, strlen(json), err) != 0) goto done;
    rc = 0;
done:
    if (rc != 0 && o->image_folder && labels) { /* take back what this run wrote */
        char path[4200];
        for (size_t i = 0; i < s.items; i++)
            if (tk_pathf(path, sizeof path, NULL, "%s/%s/%s_%05zu.png", o->out_dir, tk_fmnist_folders[labels[i]], split,
                         i) == 0)
                remove(path);
        for (int c = 0; c < TK_FMNIST_N_CLASSES; c++)
            if (tk_pathf(path, sizeof path, NULL, "%s/%s", o->out_dir, tk_fmnist_folders[c]) == 0) rmdir(path);
        if (!out_existed) rmdir(o->out_dir);
    }
    if (st) *st = s;
    idx_close(&fi);
    idx_close(&fl);
    free(pix);
    free(labels);
    cJSON_Delete(root);
    free(json);
    return rc;
}
