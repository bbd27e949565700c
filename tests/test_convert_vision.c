/* test_convert_vision.c: the Fashion-MNIST and LLaVA-JSON converters (datasets/convert_fashion_mnist.c,
 * datasets/convert_llava.c), called as functions.
 *
 * Fashion-MNIST: idx files this test writes (gzip'd and raw, 4 x 5 images so rows and columns cannot
 * be swapped unnoticed): every PNG decodes to the idx bytes, the JSON has LLaVA's schema with the
 * right class names and rotating questions, --limit; then bad idx files (magic, label range, count
 * mismatch, zero rows, truncated raw and gzip data, trailing data, corrupt gzip, missing files), each
 * refused with one line naming the file. With Debian's dataset-fashion-mnist installed, the first 50
 * test items are converted and compared with the idx bytes read here through zlib. The image-folder
 * layout (OUT/<class>/<split>_<i>.png) is read back by the image-folder converter, and a failed run
 * leaves no folder behind.
 * LLaVA: a LLaMA-style tokenizer trained by spm_train (tests/text/spm_fixture.c), PNG images and a
 * JSON of records (image + two rounds, text-only, a leading gpt turn, a numeric id): the shard's ids
 * around the image run equal separate encodes of the text before and after <image> (as LLaVA's
 * tokenizer_image_token), the run has N image tokens with the unk id and label -100, the trained
 * tokens decode to the answers, the payload is the image file's bytes, meta is right; shard rollover;
 * errors: missing and truncated images (named with the record; --skip-bad-images counts them),
 * placeholder counts, roles, invalid JSON, --max-len cutting the image run.
 * Writes into fresh mkdtemp directories. Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/convert_fashion_mnist.h"
#include "datasets/convert_image_folder.h"
#include "datasets/convert_llava.h"
#include "tests/text/spm_fixture.h"
#include "text/template.h"
#include "text/tokenizer.h"
#include "vision/image.h"
#include "datasets/shard.h"

#include <cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

static int n_fail = 0, n_pass = 0;

static int report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int report(int ok, const char *fmt, ...) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("  %-84s %s\n", buf, ok ? "ok" : "FAIL");
    if (ok) n_pass++;
    else n_fail++;
    return ok;
}

static char g_dir[64];

static void pathf(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void pathf(char *out, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    TK_ASSERT(k > 0 && (size_t)k < n);
}

static void write_bytes(const char *path, const void *p, size_t n, int gz) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        TK_ASSERT(f);
        TK_ASSERT(n == 0 || gzwrite(f, p, (unsigned)n) == (int)n);
        TK_ASSERT(gzclose(f) == Z_OK);
    } else {
        FILE *f = fopen(path, "wb");
        TK_ASSERT(f);
        TK_ASSERT(n == 0 || fwrite(p, 1, n, f) == n);
        TK_ASSERT(fclose(f) == 0);
    }
}

static int one_line_naming(const tk_err *e, const char *name) {
    return e->msg[0] && strstr(e->msg, name) && !strchr(e->msg, '\n');
}

/* ---- Fashion-MNIST ---- */

enum { FR = 4, FC = 5, FN = 12 };

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static uint8_t fm_pix(size_t i, size_t k) { return (uint8_t)(i * 29 + k * 13 + (k % FC) * (k / FC)); }

/* images file: header + FN images [FR][FC]; labels: header + FN labels (i % 10). Options damage them. */
typedef struct {
    uint32_t img_magic, lbl_magic, img_n, lbl_n, rows;
    size_t cut_img;      /* bytes removed from the end of the image data */
    size_t extra_img;    /* bytes added after it */
    int bad_label;       /* label 3 becomes 10 */
} fm_spec;

static void fm_write(const char *dir, const char *stem, const fm_spec *s, int gz) {
    size_t n_img = 16 + (size_t)FN * FR * FC + s->extra_img - s->cut_img;
    uint8_t *img = calloc(16 + (size_t)FN * FR * FC + s->extra_img, 1);
    put_be32(img, s->img_magic);
    put_be32(img + 4, s->img_n);
    put_be32(img + 8, s->rows);
    put_be32(img + 12, FC);
    for (size_t i = 0; i < FN; i++)
        for (size_t k = 0; k < (size_t)FR * FC; k++) img[16 + i * FR * FC + k] = fm_pix(i, k);
    uint8_t lbl[8 + FN];
    put_be32(lbl, s->lbl_magic);
    put_be32(lbl + 4, s->lbl_n);
    for (size_t i = 0; i < FN; i++) lbl[8 + i] = (uint8_t)(i % 10);
    if (s->bad_label) lbl[8 + 3] = 10;
    char p[512];
    pathf(p, sizeof p, "%s/%s-images-idx3-ubyte%s", dir, stem, gz ? ".gz" : "");
    write_bytes(p, img, n_img, gz);
    pathf(p, sizeof p, "%s/%s-labels-idx1-ubyte%s", dir, stem, gz ? ".gz" : "");
    write_bytes(p, lbl, sizeof lbl, gz);
    free(img);
}

static fm_spec fm_good(void) {
    fm_spec s = {0x803, 0x801, FN, FN, FR, 0, 0, 0};
    return s;
}

/* Checks OUT/<split>.json and the PNGs against the generated pixels (n records). */
static void fm_check_output(const char *out, const char *split, size_t n, const char *what) {
    char p[600];
    pathf(p, sizeof p, "%s/%s.json", out, split);
    tk_err err = {0};
    size_t len;
    char *text = tk_read_file(p, &len, &err);
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    free(text);
    int ok = cJSON_IsArray(root) && (size_t)cJSON_GetArraySize(root) == n;
    int schema = ok, pixels = ok;
    for (size_t i = 0; ok && i < n; i++) {
        cJSON *r = cJSON_GetArrayItem(root, (int)i);
        cJSON *id = cJSON_GetObjectItem(r, "id"), *im = cJSON_GetObjectItem(r, "image");
        cJSON *cv = cJSON_GetObjectItem(r, "conversations");
        char want_id[64], want_im[64], want_q[256];
        snprintf(want_id, sizeof want_id, "fashion-mnist-%s-%05zu", split, i);
        snprintf(want_im, sizeof want_im, "images/%s_%05zu.png", split, i);
        snprintf(want_q, sizeof want_q, "<image>\n%s", tk_fmnist_questions[i % TK_FMNIST_N_QUESTIONS]);
        cJSON *h = cJSON_GetArrayItem(cv, 0), *g = cJSON_GetArrayItem(cv, 1);
        schema = schema && cJSON_IsString(id) && strcmp(id->valuestring, want_id) == 0 && cJSON_IsString(im) &&
                 strcmp(im->valuestring, want_im) == 0 && cJSON_GetArraySize(cv) == 2 &&
                 strcmp(cJSON_GetObjectItem(h, "from")->valuestring, "human") == 0 &&
                 strcmp(cJSON_GetObjectItem(h, "value")->valuestring, want_q) == 0 &&
                 strcmp(cJSON_GetObjectItem(g, "from")->valuestring, "gpt") == 0 &&
                 strcmp(cJSON_GetObjectItem(g, "value")->valuestring, tk_fmnist_classes[i % 10]) == 0;
        pathf(p, sizeof p, "%s/%s", out, want_im);
        tk_image *img = tk_image_load(p, 0, &err);
        int same = img && img->w == FC && img->h == FR;
        for (size_t k = 0; same && k < (size_t)FR * FC; k++)
            same = img->rgb[k * 3] == fm_pix(i, k) && img->rgb[k * 3 + 1] == fm_pix(i, k) &&
                   img->rgb[k * 3 + 2] == fm_pix(i, k);
        pixels = pixels && same;
        tk_image_free(img);
    }
    cJSON_Delete(root);
    report(ok, "%s: %s.json holds %zu records", what, split, n);
    report(schema, "%s: ids, image paths, questions, class names", what);
    report(pixels, "%s: every PNG decodes to its idx bytes (%d x %d)", what, FC, FR);
}

static void fm_expect_error(const char *what, const fm_spec *s, int gz, const char *needle, const char *file_part) {
    char dir[256], out[300];
    static int k = 0;
    pathf(dir, sizeof dir, "%s/fm_bad%d", g_dir, k);
    pathf(out, sizeof out, "%s/fm_bad_out%d", g_dir, k++);
    mkdir(dir, 0777);
    fm_write(dir, "t10k", s, gz);
    tk_fmnist_opts o = {.input_dir = dir, .out_dir = out, .split = "test"};
    tk_err err = {0};
    int rc = tk_convert_fashion_mnist(&o, NULL, &err);
    int ok = rc != 0 && one_line_naming(&err, file_part) && strstr(err.msg, needle);
    report(ok, "fashion-mnist %s: refused (%s)", what, needle);
    if (!ok) printf("    got rc %d: %s\n", rc, err.msg);
    char p[400];
    pathf(p, sizeof p, "%s/test.json", out);
    if (access(p, F_OK) == 0) report(0, "fashion-mnist %s: no JSON written", what);
}

/* The image-folder layout: OUT/<class folder>/<split>_<index>.png, no JSON, then read back by the
 * image-folder converter (classes in sorted folder order); a failed run leaves nothing behind. */
static void test_fm_image_folder(const char *in_gz) {
    char out[256], p[600], shard[300];
    pathf(out, sizeof out, "%s/fm_if", g_dir);
    tk_fmnist_opts o = {.input_dir = in_gz, .out_dir = out, .split = "test", .image_folder = 1};
    tk_fmnist_stats st;
    tk_err err = {0};
    int rc = tk_convert_fashion_mnist(&o, &st, &err);
    if (!report(rc == 0 && st.items == FN, "layout image-folder: %d items written", FN)) printf("    %s\n", err.msg);
    int pixels = 1;
    for (size_t i = 0; i < FN; i++) {
        pathf(p, sizeof p, "%s/%s/test_%05zu.png", out, tk_fmnist_folders[i % 10], i);
        tk_image *img = tk_image_load(p, 0, &err);
        int same = img && img->w == FC && img->h == FR;
        for (size_t k = 0; same && k < (size_t)FR * FC; k++) same = img->rgb[k * 3] == fm_pix(i, k);
        if (!same) printf("    %s: %s\n", p, img ? "pixels differ" : err.msg);
        pixels = pixels && same;
        tk_image_free(img);
    }
    report(pixels, "layout image-folder: OUT/<class>/test_<i>.png decode to the idx bytes");
    pathf(p, sizeof p, "%s/test.json", out);
    char p2[600];
    pathf(p2, sizeof p2, "%s/images", out);
    report(access(p, F_OK) != 0 && access(p2, F_OK) != 0, "layout image-folder: no JSON, no images/ folder");
    report(strcmp(tk_fmnist_folders[0], "T-shirt_top") == 0 && strchr(tk_fmnist_folders[0], '/') == NULL,
           "class 0's folder is T-shirt_top (no '/')");

    /* the image-folder converter takes it: 10 classes in byte-wise sorted folder order */
    pathf(shard, sizeof shard, "%s/fm_if.shard", g_dir);
    tk_imgfolder_opts io = {.input_dir = out, .out = shard};
    tk_convert_stats cs;
    rc = tk_convert_image_folder(&io, &cs, &err);
    if (!report(rc == 0 && cs.written == FN && cs.classes == 10, "convert --format image-folder on it: %d records, "
                "10 classes", FN))
        printf("    %s\n", err.msg);
    const char *sorted[10];
    for (int c = 0; c < 10; c++) sorted[c] = tk_fmnist_folders[c];
    for (int a = 0; a < 10; a++) /* insertion sort by strcmp: the expected class order */
        for (int b = a; b > 0 && strcmp(sorted[b - 1], sorted[b]) > 0; b--) {
            const char *t = sorted[b];
            sorted[b] = sorted[b - 1];
            sorted[b - 1] = t;
        }
    tk_shard_reader *r = rc == 0 ? tk_shard_reader_open(shard, &err) : NULL;
    int ok = r && tk_shard_reader_count(r) == FN;
    size_t seen = 0;
    for (uint64_t i = 0; ok && i < FN; i++) {
        tk_shard_record rec;
        ok = tk_shard_reader_get(r, i, &rec, &err) == 0;
        cJSON *m = ok ? cJSON_Parse(rec.meta) : NULL;
        cJSON *lab = cJSON_GetObjectItem(m, "label"), *ans = cJSON_GetObjectItem(m, "answer");
        cJSON *id = cJSON_GetObjectItem(m, "id");
        ok = ok && cJSON_IsNumber(lab) && cJSON_IsString(ans) && cJSON_IsString(id) && lab->valueint >= 0 &&
             lab->valueint < 10 && strcmp(sorted[lab->valueint], ans->valuestring) == 0;
        /* the item's Fashion-MNIST label (index % 10) names the folder its id starts with */
        size_t idx = ok ? (size_t)atoi(strrchr(id->valuestring, '_') + 1) : 0;
        ok = ok && strncmp(id->valuestring, tk_fmnist_folders[idx % 10], strlen(tk_fmnist_folders[idx % 10])) == 0 &&
             strcmp(ans->valuestring, tk_fmnist_folders[idx % 10]) == 0;
        seen += ok;
        cJSON_Delete(m);
    }
    report(ok && seen == FN, "its records: label = sorted folder index, answer = the item's Fashion-MNIST class");
    tk_shard_reader_free(r);

    /* a run that fails midway (raw image data cut by 7 bytes) takes back every image it wrote */
    char dir[256];
    pathf(dir, sizeof dir, "%s/fm_if_cut", g_dir);
    mkdir(dir, 0777);
    fm_spec s = fm_good();
    s.cut_img = 7;
    fm_write(dir, "t10k", &s, 0);
    pathf(out, sizeof out, "%s/fm_if_cut_out", g_dir);
    tk_fmnist_opts o2 = {.input_dir = dir, .out_dir = out, .split = "test", .image_folder = 1};
    rc = tk_convert_fashion_mnist(&o2, &st, &err);
    report(rc != 0 && one_line_naming(&err, "t10k-images") && access(out, F_OK) != 0,
           "layout image-folder, data cut: refused, OUT not left behind");
}

static void test_fashion_mnist(void) {
    printf("== Fashion-MNIST converter\n");
    char in_gz[256], in_raw[256], out[256];
    pathf(in_gz, sizeof in_gz, "%s/fm_gz", g_dir);
    pathf(in_raw, sizeof in_raw, "%s/fm_raw", g_dir);
    mkdir(in_gz, 0777);
    mkdir(in_raw, 0777);
    fm_spec good = fm_good();
    fm_write(in_gz, "t10k", &good, 1);
    fm_write(in_raw, "train", &good, 0);
    tk_err err = {0};
    tk_fmnist_stats st;
    pathf(out, sizeof out, "%s/fm_out/nested", g_dir);
    tk_fmnist_opts o = {.input_dir = in_gz, .out_dir = out, .split = "test"};
    int rc = tk_convert_fashion_mnist(&o, &st, &err);
    if (!report(rc == 0 && st.items == FN && st.rows == FR && st.cols == FC && st.per_class[0] == 2 &&
                    st.per_class[9] == 1,
                "gzip'd t10k files: %d items of %d x %d, classes counted", FN, FR, FC))
        printf("    %s\n", err.msg);
    fm_check_output(out, "test", FN, "gz");
    pathf(out, sizeof out, "%s/fm_out_raw", g_dir);
    tk_fmnist_opts o2 = {.input_dir = in_raw, .out_dir = out, .split = "train", .limit = 3};
    rc = tk_convert_fashion_mnist(&o2, &st, &err);
    if (!report(rc == 0 && st.items == 3 && st.available == FN, "raw train files, --limit 3: 3 of %d items", FN))
        printf("    %s\n", err.msg);
    fm_check_output(out, "train", 3, "raw, limit 3");
    test_fm_image_folder(in_gz);

    fm_spec s = fm_good();
    s.img_magic = 0x801;
    fm_expect_error("image magic 0x801", &s, 1, "magic", "t10k-images");
    s = fm_good();
    s.lbl_magic = 0x803;
    fm_expect_error("label magic 0x803", &s, 0, "magic", "t10k-labels");
    s = fm_good();
    s.bad_label = 1;
    fm_expect_error("label 10", &s, 1, "label 3 is 10", "t10k-labels");
    s = fm_good();
    s.lbl_n = FN - 1;
    fm_expect_error("11 labels for 12 images", &s, 0, "11 labels", "t10k-labels");
    s = fm_good();
    s.rows = 0;
    fm_expect_error("0 rows", &s, 1, "0 x 5", "t10k-images");
    s = fm_good();
    s.cut_img = 7;
    fm_expect_error("raw image data cut by 7 bytes", &s, 0, "truncated", "t10k-images");
    fm_expect_error("gzip'd image data cut by 7 bytes", &s, 1, "truncated", "t10k-images");
    s = fm_good();
    s.extra_img = 3;
    fm_expect_error("3 bytes after the images", &s, 0, "continues after", "t10k-images");
    s = fm_good();
    s.img_n = 1000000;
    s.lbl_n = 1000000;
    fm_expect_error("header claims 1000000 images", &s, 1, "truncated", "t10k-labels");

    /* corrupt gzip: flip bytes inside the deflate stream of a valid file */
    char dir[256], p[400];
    pathf(dir, sizeof dir, "%s/fm_corrupt", g_dir);
    mkdir(dir, 0777);
    fm_write(dir, "t10k", &good, 1);
    pathf(p, sizeof p, "%s/t10k-images-idx3-ubyte.gz", dir);
    size_t len;
    char *gzb = tk_read_file(p, &len, &err);
    TK_ASSERT(gzb && len > 40);
    for (size_t i = 12; i < len - 10; i += 3) gzb[i] ^= 0x5A;
    write_bytes(p, gzb, len, 0);
    free(gzb);
    pathf(out, sizeof out, "%s/fm_corrupt_out", g_dir);
    tk_fmnist_opts o3 = {.input_dir = dir, .out_dir = out, .split = "test"};
    rc = tk_convert_fashion_mnist(&o3, NULL, &err);
    report(rc != 0 && one_line_naming(&err, "t10k-images-idx3-ubyte.gz"), "corrupt gzip stream: refused, one line: %s",
           err.msg);
    tk_fmnist_opts o4 = {.input_dir = g_dir, .out_dir = out, .split = "test"};
    rc = tk_convert_fashion_mnist(&o4, NULL, &err);
    report(rc != 0 && one_line_naming(&err, "t10k-images-idx3-ubyte"), "missing idx files: refused, one line");
    tk_fmnist_opts o5 = {.input_dir = in_gz, .out_dir = out, .split = "validation"};
    rc = tk_convert_fashion_mnist(&o5, NULL, &err);
    report(rc != 0 && strstr(err.msg, "validation"), "unknown split: refused");

    /* Debian's dataset-fashion-mnist, when installed */
    const char *deb = "/usr/share/datasets/fashion-mnist";
    pathf(p, sizeof p, "%s/t10k-images-idx3-ubyte.gz", deb);
    if (access(p, R_OK) != 0) {
        printf("  skip  %s absent (apt-get install dataset-fashion-mnist)\n", deb);
        return;
    }
    pathf(out, sizeof out, "%s/fm_debian", g_dir);
    tk_fmnist_opts o6 = {.input_dir = deb, .out_dir = out, .split = "test", .limit = 50};
    rc = tk_convert_fashion_mnist(&o6, &st, &err);
    report(rc == 0 && st.items == 50 && st.available == 10000 && st.rows == 28 && st.cols == 28,
           "Debian's t10k files: 50 of 10000 items, 28 x 28");
    gzFile gi = gzopen(p, "rb");
    pathf(p, sizeof p, "%s/t10k-labels-idx1-ubyte.gz", deb);
    gzFile gl = gzopen(p, "rb");
    uint8_t hi[16], hl[8], px[784], lab[50];
    int ok = gi && gl && gzread(gi, hi, 16) == 16 && gzread(gl, hl, 8) == 8 && gzread(gl, lab, 50) == 50;
    pathf(p, sizeof p, "%s/test.json", out);
    char *text = tk_read_file(p, &len, &err);
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    free(text);
    for (size_t i = 0; ok && i < 50; i++) {
        ok = gzread(gi, px, 784) == 784;
        pathf(p, sizeof p, "%s/images/test_%05zu.png", out, i);
        tk_image *img = tk_image_load(p, 0, &err);
        ok = ok && img && img->w == 28 && img->h == 28;
        for (size_t k = 0; ok && k < 784; k++) ok = img->rgb[k * 3] == px[k];
        tk_image_free(img);
        cJSON *g = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(root, (int)i), "conversations"), 1);
        ok = ok && g && strcmp(cJSON_GetObjectItem(g, "value")->valuestring, tk_fmnist_classes[lab[i]]) == 0;
    }
    report(ok, "Debian's data: 50 PNGs equal the idx pixels, answers the idx labels' names");
    cJSON_Delete(root);
    if (gi) gzclose(gi);
    if (gl) gzclose(gl);
}

/* ---- LLaVA ---- */

enum { NTOK = 7 };

static const char *SYS = "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                         "helpful, detailed, and polite answers to the user's questions.";

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s), 0); }

static void write_png(const char *path, size_t w, size_t h, unsigned seed) {
    uint8_t *px = malloc(w * h * 3);
    for (size_t i = 0; i < w * h * 3; i++) px[i] = (uint8_t)(i * 7 + seed * 31);
    tk_err err = {0};
    TK_ASSERT(tk_image_write_png(path, px, w, h, 3, &err) == 0);
    free(px);
}

/* ids of encode(text) (with BOS when bos) */
static size_t enc(const tk_tokenizer *tok, const char *text, int bos, int32_t *out, size_t cap) {
    tk_ids ids = {0};
    tk_err err = {0};
    TK_ASSERT(tk_tok_encode(tok, text, strlen(text), bos, 0, &ids, &err) == 0);
    size_t n = ids.n < cap ? ids.n : cap;
    memcpy(out, ids.ids, n * sizeof *out);
    tk_ids_free(&ids);
    return n;
}

static int llava_convert(const char *json_path, const char *out, size_t max_len, int skip, size_t shard_bytes,
                         const char *model, tk_llava_convert_stats *st, tk_err *err) {
    char folder[256];
    pathf(folder, sizeof folder, "%s/llava_img", g_dir);
    tk_llava_convert_opts o = {.input = json_path, .image_folder = folder, .tokenizer = model,
                               .image_tokens = NTOK, .out = out, .max_len = max_len, .skip_bad_images = skip,
                               .shard_bytes = shard_bytes};
    return tk_convert_llava(&o, st, err);
}

static void llava_expect_error(const char *what, const char *json, const char *model, size_t max_len,
                               const char *needle) {
    static int k = 0;
    char jp[256], out[256];
    pathf(jp, sizeof jp, "%s/bad%d.json", g_dir, k);
    pathf(out, sizeof out, "%s/llava_bad%d", g_dir, k++);
    write_text(jp, json);
    tk_err err = {0};
    int rc = llava_convert(jp, out, max_len, 0, 0, model, NULL, &err);
    int ok = rc != 0 && one_line_naming(&err, jp) && strstr(err.msg, needle);
    report(ok, "llava %s: refused (%s)", what, needle);
    if (!ok) printf("    got rc %d: %s\n", rc, err.msg);
}

static void test_llava(const char *model) {
    printf("== LLaVA converter\n");
    char folder[256], p[400], jp[256], out[256];
    pathf(folder, sizeof folder, "%s/llava_img", g_dir);
    mkdir(folder, 0777);
    pathf(p, sizeof p, "%s/sub", folder);
    mkdir(p, 0777);
    pathf(p, sizeof p, "%s/sub/a.png", folder);
    write_png(p, 9, 6, 1);
    pathf(p, sizeof p, "%s/b.png", folder);
    write_png(p, 5, 5, 2);
    /* a truncated PNG */
    size_t blen;
    tk_err err = {0};
    char *b = tk_read_file(p, &blen, &err);
    pathf(p, sizeof p, "%s/cut.png", folder);
    write_bytes(p, b, blen / 2, 0);
    free(b);
    const char *json =
        "[{\"id\": \"r0\", \"image\": \"sub/a.png\", \"conversations\": ["
        "{\"from\": \"human\", \"value\": \"What is this?\\n<image>  \"},"
        "{\"from\": \"gpt\", \"value\": \"A red square.\"},"
        "{\"from\": \"human\", \"value\": \"And the colour?\"},"
        "{\"from\": \"gpt\", \"value\": \"Red.\"}]},"
        "{\"id\": \"r1\", \"conversations\": ["
        "{\"from\": \"human\", \"value\": \"Say hi.\"}, {\"from\": \"gpt\", \"value\": \"hi\"}]},"
        "{\"id\": 42, \"image\": \"b.png\", \"conversations\": ["
        "{\"from\": \"gpt\", \"value\": \"skipped\"},"
        "{\"from\": \"human\", \"value\": \"<image>\\nDescribe.\"}, {\"from\": \"gpt\", \"value\": \"Squares.\"}]}]";
    pathf(jp, sizeof jp, "%s/train.json", g_dir);
    write_text(jp, json);
    pathf(out, sizeof out, "%s/shards/llava", g_dir);
    tk_llava_convert_stats st;
    int rc = llava_convert(jp, out, 0, 0, 0, model, &st, &err);
    if (!report(rc == 0 && st.records == 3 && st.written == 3 && st.with_image == 2 && st.shards == 1,
                "3 records (2 with images) into one shard"))
        printf("    rc %d: %s\n", rc, err.msg);
    pathf(p, sizeof p, "%s-00000.shard", out);
    tk_shard_reader *r = tk_shard_reader_open(p, &err);
    tk_tokenizer *tok = tk_tok_open(model, &err);
    TK_ASSERT(tok);
    if (!report(r && tk_shard_reader_count(r) == 3, "shard %s reads back 3 records", "llava-00000.shard")) {
        printf("    %s\n", err.msg);
        tk_shard_reader_free(r);
        tk_tok_free(tok);
        return;
    }
    tk_shard_record rec;
    TK_ASSERT(tk_shard_reader_get(r, 0, &rec, &err) == 0);
    /* expected: [bos] enc(SYS + " USER: ") | NTOK image | enc("\nWhat is this? ASSISTANT:") ... */
    int32_t before[256], after[256];
    char txt[512];
    snprintf(txt, sizeof txt, "%s USER: ", SYS);
    size_t nb = enc(tok, txt, 1, before, 256);
    size_t na = enc(tok, "\nWhat is this? ASSISTANT:", 0, after, 256);
    int ok = rec.n_tokens > nb + NTOK + na;
    for (size_t i = 0; ok && i < nb; i++) ok = rec.input_ids[i] == before[i] && rec.kinds[i] == TK_KIND_PROMPT;
    report(ok, "record 0: the ids before <image> are one encode of the system prompt + \"USER: \"");
    ok = 1;
    for (size_t i = nb; ok && i < nb + NTOK; i++)
        ok = rec.input_ids[i] == tk_tok_unk_id(tok) && rec.labels[i] == TK_SHARD_LABEL_IGNORE &&
             rec.kinds[i] == TK_KIND_IMAGE;
    size_t n_img = 0;
    for (size_t i = 0; i < rec.n_tokens; i++) n_img += rec.kinds[i] == TK_KIND_IMAGE;
    report(ok && n_img == NTOK, "record 0: %d image tokens (unk id %d, label -100, kind image), no others", NTOK,
           tk_tok_unk_id(tok));
    ok = 1;
    for (size_t i = 0; ok && i < na; i++) ok = rec.input_ids[nb + NTOK + i] == after[i];
    report(ok, "record 0: then a fresh encode of \"\\n\" + the question (<image> moved first, stripped)");
    /* trained tokens decode to the two answers (each with its </s>) */
    int32_t trained[512];
    size_t nt = 0, n_eos = 0;
    int mask_ok = 1;
    for (size_t i = 0; i < rec.n_tokens; i++) {
        if (rec.labels[i] != TK_SHARD_LABEL_IGNORE) {
            mask_ok = mask_ok && rec.labels[i] == rec.input_ids[i] && rec.kinds[i] == TK_KIND_RESPONSE;
            trained[nt++] = rec.labels[i];
            n_eos += rec.labels[i] == tk_tok_eos_id(tok);
        } else {
            mask_ok = mask_ok && rec.kinds[i] != TK_KIND_RESPONSE;
        }
    }
    char *dec = tk_tok_decode(tok, trained, nt, NULL, &err);
    report(mask_ok && n_eos == 2 && dec && strstr(dec, "A red square.") && strstr(dec, "Red.") && !strstr(dec, "colour"),
           "record 0: loss on the gpt turns only (decoded: \"%s\"), 2 EOS", dec ? dec : "?");
    free(dec);
    pathf(p, sizeof p, "%s/sub/a.png", folder);
    size_t flen;
    char *fbytes = tk_read_file(p, &flen, &err);
    report(rec.n_images == 1 && rec.images[0].kind == TK_IMAGE_ENCODED && rec.images[0].nbytes == flen &&
               memcmp(rec.images[0].data, fbytes, flen) == 0,
           "record 0: the payload is the image file's bytes (%zu)", flen);
    free(fbytes);
    cJSON *meta = cJSON_Parse(rec.meta);
    report(meta && strcmp(cJSON_GetObjectItem(meta, "id")->valuestring, "r0") == 0 &&
               strcmp(cJSON_GetObjectItem(meta, "answer")->valuestring, "Red.") == 0 &&
               strcmp(cJSON_GetObjectItem(meta, "task")->valuestring, "llava") == 0,
           "record 0: meta %s", rec.meta);
    cJSON_Delete(meta);
    TK_ASSERT(tk_shard_reader_get(r, 1, &rec, &err) == 0);
    n_img = 0;
    for (size_t i = 0; i < rec.n_tokens; i++) n_img += rec.kinds[i] == TK_KIND_IMAGE;
    report(rec.n_images == 0 && n_img == 0, "record 1: text only, no image tokens or payload");
    TK_ASSERT(tk_shard_reader_get(r, 2, &rec, &err) == 0);
    meta = cJSON_Parse(rec.meta);
    dec = tk_tok_decode(tok, rec.input_ids, rec.n_tokens, NULL, &err);
    report(meta && cJSON_IsNumber(cJSON_GetObjectItem(meta, "id")) && cJSON_GetObjectItem(meta, "id")->valueint == 42 &&
               dec && !strstr(dec, "skipped") && rec.n_images == 1,
           "record 2: numeric id kept, the leading gpt turn dropped");
    free(dec);
    cJSON_Delete(meta);
    tk_shard_reader_free(r);

    /* rollover: one record per shard */
    pathf(out, sizeof out, "%s/shards/roll", g_dir);
    rc = llava_convert(jp, out, 0, 0, 1, model, &st, &err);
    pathf(p, sizeof p, "%s-00002.shard", out);
    report(rc == 0 && st.shards == 3 && access(p, R_OK) == 0, "shard_bytes 1: 3 shards roll-00000..00002");
    /* a single .shard file */
    pathf(out, sizeof out, "%s/shards/one.shard", g_dir);
    rc = llava_convert(jp, out, 0, 0, 1, model, &st, &err);
    report(rc == 0 && st.shards == 1 && access(out, R_OK) == 0, "--out X.shard: exactly that file");

    /* bad images */
    const char *bad_json =
        "[{\"id\": \"ok\", \"image\": \"b.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nQ\"},"
        "{\"from\": \"gpt\", \"value\": \"A\"}]},"
        "{\"id\": \"cut\", \"image\": \"cut.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nQ\"},"
        "{\"from\": \"gpt\", \"value\": \"A\"}]},"
        "{\"id\": \"gone\", \"image\": \"gone.jpg\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nQ\"},"
        "{\"from\": \"gpt\", \"value\": \"A\"}]}]";
    pathf(jp, sizeof jp, "%s/badimg.json", g_dir);
    write_text(jp, bad_json);
    pathf(out, sizeof out, "%s/shards/badimg", g_dir);
    rc = llava_convert(jp, out, 0, 0, 0, model, &st, &err);
    report(rc != 0 && one_line_naming(&err, "cut.png") && strstr(err.msg, "record 1 (id cut)") &&
               strstr(err.msg, "truncated"),
           "a truncated image: refused naming the image and the record");
    if (!strstr(err.msg, "cut.png")) printf("    %s\n", err.msg);
    rc = llava_convert(jp, out, 0, 1, 0, model, &st, &err);
    report(rc == 0 && st.written == 1 && st.bad_images == 2, "--skip-bad-images: 1 written, 2 skipped and counted");
    const char *gone_json =
        "[{\"id\": \"gone\", \"image\": \"gone.jpg\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\"},"
        "{\"from\": \"gpt\", \"value\": \"A\"}]}]";
    pathf(jp, sizeof jp, "%s/gone.json", g_dir);
    write_text(jp, gone_json);
    rc = llava_convert(jp, out, 0, 0, 0, model, &st, &err);
    report(rc != 0 && strstr(err.msg, "gone.jpg") && strstr(err.msg, "record 0 (id gone)") && !strchr(err.msg, '\n'),
           "a missing image: refused naming the image and the record");

    llava_expect_error("two <image>", "[{\"id\":\"x\",\"image\":\"b.png\",\"conversations\":[{\"from\":\"human\","
                       "\"value\":\"<image><image>\"},{\"from\":\"gpt\",\"value\":\"A\"}]}]", model, 0, "2 <image>");
    llava_expect_error("image without <image>", "[{\"id\":\"x\",\"image\":\"b.png\",\"conversations\":[{\"from\":"
                       "\"human\",\"value\":\"Q\"},{\"from\":\"gpt\",\"value\":\"A\"}]}]", model, 0, "0 <image>");
    llava_expect_error("<image> without image", "[{\"id\":\"x\",\"conversations\":[{\"from\":\"human\",\"value\":"
                       "\"<image>Q\"},{\"from\":\"gpt\",\"value\":\"A\"}]}]", model, 0, "no \"image\"");
    llava_expect_error("bad role", "[{\"id\":\"x\",\"conversations\":[{\"from\":\"human\",\"value\":\"Q\"},"
                       "{\"from\":\"bot\",\"value\":\"A\"}]}]", model, 0, "\"bot\"");
    llava_expect_error("ends with human", "[{\"id\":\"x\",\"conversations\":[{\"from\":\"human\",\"value\":\"Q\"}]}]",
                       model, 0, "ends with a human turn");
    llava_expect_error("two gpt turns", "[{\"id\":\"x\",\"conversations\":[{\"from\":\"human\",\"value\":\"Q\"},"
                       "{\"from\":\"gpt\",\"value\":\"A\"},{\"from\":\"gpt\",\"value\":\"B\"}]}]", model, 0, "two gpt");
    llava_expect_error("invalid JSON", "[{\"id\": \"x\", \"conversations\": [}", model, 0, "invalid JSON near byte");
    llava_expect_error("not an array", "{\"id\": 1}", model, 0, "JSON array");
    llava_expect_error("no conversations", "[{\"id\":\"x\"}]", model, 0, "\"conversations\"");
    llava_expect_error("--max-len cutting the image run",
                       "[{\"id\":\"x\",\"image\":\"b.png\",\"conversations\":[{\"from\":\"human\",\"value\":\"<image>\"},"
                       "{\"from\":\"gpt\",\"value\":\"A\"}]}]", model, 5, "cuts the record");
    tk_tok_free(tok);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_convert_vision_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_fashion_mnist();
    char sdir[64], model[256];
    const char *args[16];
    size_t k = 0;
    for (; SPM_FIXTURE_LLAMA_ARGS[k]; k++) args[k] = SPM_FIXTURE_LLAMA_ARGS[k];
    args[k++] = "--vocab_size=400";
    args[k] = NULL;
    if (spm_fixture_dir(sdir, sizeof sdir) != 0 || spm_fixture_train(sdir, "llama", args, model, sizeof model) != 0) {
        report(0, "train the test tokenizer (spm_train)");
    } else {
        test_llava(model);
        spm_fixture_cleanup(sdir);
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    printf("test_convert_vision: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
