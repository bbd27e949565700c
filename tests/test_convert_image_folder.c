/* test_convert_image_folder.c: the image-folder converter (datasets/convert_image_folder.c), called as a
 * function on folders this test writes.
 *
 * A folder of three classes whose names sort differently by bytes than by letters ("Zeta" < "a_cls" <
 * "b_cls"), with a nested sub-folder, an upper-case extension, a binary PPM, hidden entries, a text
 * file inside a class and a plain file beside the classes: the records come in ImageFolder's order
 * (classes sorted; within a class, folders by path and files by name), each T = 1 with id 0, label
 * -100, kind IMAGE, the file's bytes as its one encoded payload, and meta {task, id, label, answer,
 * n_classes}; the text file is skipped and counted. Then --limit (per class), shard rollover, and bad
 * input, each refused with one line naming the folder or file and nothing written: no classes, a class
 * without images, a PNG with a flipped CRC bit (--skip-bad-images skips and counts it instead), a
 * TIFF, an input that is a file, a missing input.
 * Writes into a fresh mkdtemp directory. Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/convert_image_folder.h"
#include "datasets/shard.h"
#include "vision/image.h"

#include <cJSON.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    TK_ASSERT(f);
    TK_ASSERT(n == 0 || fwrite(p, 1, n, f) == n);
    TK_ASSERT(fclose(f) == 0);
}

static void mkdirf(const char *fmt, const char *a, const char *b) {
    char p[512];
    pathf(p, sizeof p, fmt, a, b);
    TK_ASSERT(mkdir(p, 0777) == 0);
}

/* A small RGB PNG (each file different), written at root/rel. */
static void png_at(const char *root, const char *rel, unsigned seed) {
    uint8_t px[6 * 4 * 3];
    for (size_t i = 0; i < sizeof px; i++) px[i] = (uint8_t)(i * 11 + seed * 37);
    char p[512];
    pathf(p, sizeof p, "%s/%s", root, rel);
    tk_err err = {0};
    TK_ASSERT(tk_image_write_png(p, px, 6, 4, 3, &err) == 0);
}

static int one_line_naming(const tk_err *e, const char *name) {
    return e->msg[0] && strstr(e->msg, name) && !strchr(e->msg, '\n');
}

/* 1 when dir holds no entry whose name starts with prefix. */
static int nothing_named(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    TK_ASSERT(d);
    struct dirent *e;
    int none = 1;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0 || (e->d_name[0] == '.' && strstr(e->d_name, prefix)))
            none = 0;
    closedir(d);
    return none;
}

/* The expected records of the good folder, in order. */
typedef struct {
    const char *id, *cls;
    int label;
} want_rec;

static const want_rec WANT[] = {
    {"Zeta/z1.png", "Zeta", 0},
    {"a_cls/B.PNG", "a_cls", 1},         /* upper-case extension; "B" < "a" by bytes */
    {"a_cls/a.ppm", "a_cls", 1},         /* binary PPM */
    {"a_cls/c.png", "a_cls", 1},
    {"a_cls/sub/a.png", "a_cls", 1},     /* folder "a_cls/sub" after "a_cls" (sorted(os.walk)) */
    {"a_cls/sub/deeper/x.png", "a_cls", 1},
    {"b_cls/0.png", "b_cls", 2},
    {"b_cls/1.png", "b_cls", 2},
};
enum { N_WANT = sizeof WANT / sizeof WANT[0] };

static void make_good(const char *root) {
    TK_ASSERT(mkdir(root, 0777) == 0);
    mkdirf("%s/%s", root, "b_cls");
    mkdirf("%s/%s", root, "a_cls");
    mkdirf("%s/%s", root, "Zeta");
    mkdirf("%s/%s", root, "a_cls/sub");
    mkdirf("%s/%s", root, "a_cls/sub/deeper");
    mkdirf("%s/%s", root, ".hidden_class"); /* hidden: not a class */
    unsigned seed = 1;
    for (size_t i = 0; i < N_WANT; i++)
        if (!strstr(WANT[i].id, ".ppm")) png_at(root, WANT[i].id, seed++);
    static const char ppm[] = "P6\n2 1\n255\n\x10\x20\x30\x40\x50\x60";
    char p[512];
    pathf(p, sizeof p, "%s/a_cls/a.ppm", root);
    write_bytes(p, ppm, sizeof ppm - 1);
    png_at(root, ".hidden_class/h.png", 90);
    png_at(root, "a_cls/.hidden.png", 91);
    pathf(p, sizeof p, "%s/a_cls/README.txt", root);
    write_bytes(p, "not an image\n", 13);
    pathf(p, sizeof p, "%s/b_cls/notes", root);
    write_bytes(p, "no extension\n", 13);
    pathf(p, sizeof p, "%s/labels.csv", root); /* beside the classes: ignored */
    write_bytes(p, "a,b\n", 4);
}

/* Every record of the shards at paths[n] against WANT[first..], checking payload bytes and meta. */
static size_t check_records(const char *root, const char *const *paths, size_t n, size_t first, size_t n_classes,
                            int *ok_out) {
    size_t k = first;
    int ok = 1;
    for (size_t s = 0; s < n; s++) {
        tk_err err = {0};
        tk_shard_reader *r = tk_shard_reader_open(paths[s], &err);
        if (!r) {
            printf("    %s\n", err.msg);
            ok = 0;
            continue;
        }
        for (uint64_t i = 0; ok && i < tk_shard_reader_count(r); i++, k++) {
            tk_shard_record rec;
            ok = tk_shard_reader_get(r, i, &rec, &err) == 0 && k < N_WANT;
            if (!ok) break;
            ok = rec.n_tokens == 1 && rec.input_ids[0] == 0 && rec.labels[0] == TK_SHARD_LABEL_IGNORE &&
                 rec.kinds[0] == TK_KIND_IMAGE && rec.n_images == 1 && rec.images[0].kind == TK_IMAGE_ENCODED &&
                 rec.images[0].ndim == 0;
            char p[512];
            pathf(p, sizeof p, "%s/%s", root, WANT[k].id);
            size_t len = 0;
            char *bytes = tk_read_file(p, &len, &err);
            ok = ok && bytes && len == rec.images[0].nbytes && memcmp(bytes, rec.images[0].data, len) == 0;
            free(bytes);
            cJSON *m = cJSON_Parse(rec.meta);
            cJSON *task = cJSON_GetObjectItem(m, "task"), *id = cJSON_GetObjectItem(m, "id"),
                  *lab = cJSON_GetObjectItem(m, "label"), *ans = cJSON_GetObjectItem(m, "answer"),
                  *nc = cJSON_GetObjectItem(m, "n_classes");
            ok = ok && cJSON_GetArraySize(m) == 5 && cJSON_IsString(task) &&
                 strcmp(task->valuestring, "image-classification") == 0 && cJSON_IsString(id) &&
                 strcmp(id->valuestring, WANT[k].id) == 0 && cJSON_IsNumber(lab) && lab->valueint == WANT[k].label &&
                 cJSON_IsString(ans) && strcmp(ans->valuestring, WANT[k].cls) == 0 && cJSON_IsNumber(nc) &&
                 (size_t)nc->valueint == n_classes;
            if (!ok) printf("    record %zu: meta %s (want id %s)\n", k, rec.meta ? rec.meta : "(none)", WANT[k].id);
            cJSON_Delete(m);
        }
        tk_shard_reader_free(r);
    }
    *ok_out = ok;
    return k - first;
}

static void expect_refused(const char *what, const char *input, const char *name, const char *needle) {
    static int k = 0;
    char out[256];
    pathf(out, sizeof out, "%s/refused%d.shard", g_dir, k++);
    tk_imgfolder_opts o = {.input_dir = input, .out = out};
    tk_err err = {0};
    tk_convert_stats st;
    int rc = tk_convert_image_folder(&o, &st, &err);
    int ok = rc != 0 && one_line_naming(&err, name) && strstr(err.msg, needle) && access(out, F_OK) != 0 &&
             nothing_named(g_dir, "refused");
    report(ok, "%s: refused (%s), nothing written", what, needle);
    if (!ok) printf("    got rc %d: %s\n", rc, err.msg);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_imgfolder_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    char root[256], out[256];
    pathf(root, sizeof root, "%s/good", g_dir);
    make_good(root);

    printf("== a folder of three classes\n");
    pathf(out, sizeof out, "%s/all.shard", g_dir);
    tk_imgfolder_opts o = {.input_dir = root, .out = out};
    tk_convert_stats st;
    tk_err err = {0};
    int rc = tk_convert_image_folder(&o, &st, &err);
    if (!report(rc == 0 && st.written == N_WANT && st.records == N_WANT && st.images == N_WANT && st.classes == 3 &&
                    st.skipped == 2 && st.shards == 1,
                "%d images in 3 classes, 2 other files skipped, one shard", N_WANT))
        printf("    rc %d: %s (written %zu, classes %zu, skipped %zu)\n", rc, err.msg, st.written, st.classes,
               st.skipped);
    const char *paths[8] = {out};
    int ok = 0;
    size_t n = check_records(root, paths, 1, 0, 3, &ok);
    report(ok && n == N_WANT, "ImageFolder order; T = 1, id 0, label -100, kind image; payload = the file; meta");

    printf("== options\n");
    pathf(out, sizeof out, "%s/lim.shard", g_dir);
    tk_imgfolder_opts ol = {.input_dir = root, .out = out, .limit = 1};
    rc = tk_convert_image_folder(&ol, &st, &err);
    int lim_ok = rc == 0 && st.written == 3;
    tk_shard_reader *r = lim_ok ? tk_shard_reader_open(out, &err) : NULL;
    for (uint64_t i = 0; r && lim_ok && i < 3; i++) { /* the first image of each class */
        tk_shard_record rec;
        static const char *first[3] = {"Zeta/z1.png", "a_cls/B.PNG", "b_cls/0.png"};
        lim_ok = tk_shard_reader_get(r, i, &rec, &err) == 0 && strstr(rec.meta, first[i]) != NULL;
    }
    tk_shard_reader_free(r);
    report(lim_ok, "--limit 1: the first image of each class (3 records)");

    char prefix[256], p0[300], p1[300], p2[300], p3[300];
    pathf(prefix, sizeof prefix, "%s/rolled", g_dir);
    tk_imgfolder_opts orr = {.input_dir = root, .out = prefix, .records_per_shard = 3};
    rc = tk_convert_image_folder(&orr, &st, &err);
    pathf(p0, sizeof p0, "%s-00000.shard", prefix);
    pathf(p1, sizeof p1, "%s-00001.shard", prefix);
    pathf(p2, sizeof p2, "%s-00002.shard", prefix);
    pathf(p3, sizeof p3, "%s-00003.shard", prefix);
    const char *rolled[3] = {p0, p1, p2};
    n = rc == 0 ? check_records(root, rolled, 3, 0, 3, &ok) : 0;
    report(rc == 0 && st.shards == 3 && ok && n == N_WANT && access(p3, F_OK) != 0,
           "--records-per-shard 3: 3 shards holding the %d records in order", N_WANT);

    printf("== bad input\n");
    char dir[256], p[512];
    pathf(dir, sizeof dir, "%s/empty", g_dir);
    TK_ASSERT(mkdir(dir, 0777) == 0);
    pathf(p, sizeof p, "%s/loose.png", dir); /* a plain file beside where classes would be */
    png_at(dir, "loose.png", 3);
    expect_refused("a folder with no class folder", dir, dir, "no class folders");

    pathf(dir, sizeof dir, "%s/noimg", g_dir);
    TK_ASSERT(mkdir(dir, 0777) == 0);
    mkdirf("%s/%s", dir, "cat");
    mkdirf("%s/%s", dir, "dog");
    png_at(dir, "cat/1.png", 4);
    pathf(p, sizeof p, "%s/dog/readme.txt", dir);
    write_bytes(p, "x\n", 2);
    pathf(p, sizeof p, "%s/dog", dir);
    expect_refused("a class folder with no image", dir, p, "no image");

    pathf(dir, sizeof dir, "%s/badcrc", g_dir);
    TK_ASSERT(mkdir(dir, 0777) == 0);
    mkdirf("%s/%s", dir, "cat");
    mkdirf("%s/%s", dir, "dog");
    png_at(dir, "cat/1.png", 5);
    png_at(dir, "dog/1.png", 6);
    png_at(dir, "dog/2.png", 7);
    pathf(p, sizeof p, "%s/dog/1.png", dir);
    size_t len = 0;
    char *b = tk_read_file(p, &len, &err);
    TK_ASSERT(b && len > 40);
    b[29] ^= 0x04; /* the IHDR chunk's CRC (bytes 29..32) */
    write_bytes(p, b, len);
    free(b);
    expect_refused("a PNG with a flipped CRC bit", dir, p, "CRC-32 of the IHDR chunk");
    pathf(out, sizeof out, "%s/skipped.shard", g_dir);
    tk_imgfolder_opts os = {.input_dir = dir, .out = out, .skip_bad_images = 1};
    rc = tk_convert_image_folder(&os, &st, &err);
    report(rc == 0 && st.written == 2 && st.dropped == 1 && st.classes == 2,
           "--skip-bad-images: the corrupt PNG skipped and counted, 2 written");

    pathf(dir, sizeof dir, "%s/tiff", g_dir);
    TK_ASSERT(mkdir(dir, 0777) == 0);
    mkdirf("%s/%s", dir, "cat");
    png_at(dir, "cat/1.png", 8);
    pathf(p, sizeof p, "%s/cat/2.TIFF", dir);
    write_bytes(p, "II*\0\x08\0\0\0", 8);
    expect_refused("a TIFF in a class", dir, p, "not supported");

    pathf(p, sizeof p, "%s/good/b_cls/0.png", g_dir);
    expect_refused("--input is a file", p, p, "not a folder");
    pathf(p, sizeof p, "%s/no_such_folder", g_dir);
    expect_refused("--input missing", p, p, "cannot open");

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    printf("test_convert_image_folder: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
