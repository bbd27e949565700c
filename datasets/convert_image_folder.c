/* convert_image_folder.c: class folders of images -> image-classification shards (see the header). */
#include "convert_image_folder.h"

#include "../vision/image.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* A growable array of malloc'd strings. */
typedef struct {
    char **v;
    size_t n, cap;
} strvec;

static int sv_push(strvec *s, const char *str, tk_err *err) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        char **nv = realloc(s->v, cap * sizeof *nv);
        if (!nv) return tk_fail(err, "image-folder: out of memory");
        s->v = nv;
        s->cap = cap;
    }
    if (!(s->v[s->n] = strdup(str))) return tk_fail(err, "image-folder: out of memory");
    s->n++;
    return 0;
}

static void sv_free(strvec *s) {
    for (size_t i = 0; i < s->n; i++) free(s->v[i]);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static void sv_sort(strvec *s) {
    if (s->n > 1) qsort(s->v, s->n, sizeof *s->v, cmp_str);
}

/* What a file's extension makes of it. */
enum { EXT_OTHER = 0, EXT_IMAGE = 1, EXT_UNSUPPORTED = 2 };
static int ext_kind(const char *name) {
    static const char *const take[] = {"png", "jpg", "jpeg", "bmp", "gif", "ppm", "pgm", "pnm"};
    static const char *const refuse[] = {"tif", "tiff", "webp"};
    const char *dot = strrchr(name, '.');
    if (!dot || dot == name) return EXT_OTHER;
    for (size_t i = 0; i < sizeof take / sizeof take[0]; i++)
        if (strcasecmp(dot + 1, take[i]) == 0) return EXT_IMAGE;
    for (size_t i = 0; i < sizeof refuse / sizeof refuse[0]; i++)
        if (strcasecmp(dot + 1, refuse[i]) == 0) return EXT_UNSUPPORTED;
    return EXT_OTHER;
}

/* The non-hidden entries of root/rel (rel "" = root itself), sorted, split into directories and
 * regular files (symbolic links followed). */
static int list_dir(const char *root, const char *rel, strvec *dirs, strvec *files, tk_err *err) {
    char path[4096], sub[4096];
    if (tk_pathf(path, sizeof path, err, "%s%s%s", root, rel[0] ? "/" : "", rel) != 0) return -1;
    DIR *d = opendir(path);
    if (!d) return tk_fail(err, "%s: cannot open the folder: %s", path, strerror(errno));
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue; /* ".", "..", hidden */
        struct stat sb;
        if (tk_pathf(sub, sizeof sub, err, "%s/%s", path, e->d_name) != 0) {
            rc = -1;
            break;
        }
        if (stat(sub, &sb) != 0) {
            rc = tk_fail(err, "%s: cannot stat: %s", sub, strerror(errno));
            break;
        }
        if (S_ISDIR(sb.st_mode)) rc = dirs ? sv_push(dirs, e->d_name, err) : 0;
        else if (S_ISREG(sb.st_mode)) rc = files ? sv_push(files, e->d_name, err) : 0;
    }
    closedir(d);
    if (rc == 0) {
        if (dirs) sv_sort(dirs);
        if (files) sv_sort(files);
    }
    return rc;
}

/* Every folder under root/rel, rel included, as paths relative to root (unsorted). */
static int walk_dirs(const char *root, const char *rel, int depth, strvec *out, tk_err *err) {
    if (depth > TK_IMGFOLDER_MAX_DEPTH)
        return tk_fail(err, "%s/%s: folders nested more than %d levels below the class folder (a symbolic link loop?)",
                       root, rel, TK_IMGFOLDER_MAX_DEPTH);
    if (sv_push(out, rel, err) != 0) return -1;
    strvec subs = {0};
    if (list_dir(root, rel, &subs, NULL, err) != 0) {
        sv_free(&subs);
        return -1;
    }
    int rc = 0;
    char child[4096];
    for (size_t i = 0; rc == 0 && i < subs.n; i++) {
        rc = tk_pathf(child, sizeof child, err, "%s/%s", rel, subs.v[i]);
        if (rc == 0) rc = walk_dirs(root, child, depth + 1, out, err);
    }
    sv_free(&subs);
    return rc;
}

/* The images of class folder root/cls (paths relative to root, ImageFolder's order), at most limit
 * when limit > 0. Non-image files are counted in *skipped. */
static int class_images(const char *root, const char *cls, size_t limit, strvec *out, size_t *skipped, tk_err *err) {
    strvec dirs = {0};
    int rc = walk_dirs(root, cls, 0, &dirs, err);
    if (rc == 0) sv_sort(&dirs); /* as sorted(os.walk(...)): by the folder's whole path */
    char rel[4096];
    for (size_t i = 0; rc == 0 && i < dirs.n && !(limit && out->n >= limit); i++) {
        strvec files = {0};
        rc = list_dir(root, dirs.v[i], NULL, &files, err);
        for (size_t k = 0; rc == 0 && k < files.n && !(limit && out->n >= limit); k++) {
            int kind = ext_kind(files.v[k]);
            rc = tk_pathf(rel, sizeof rel, err, "%s/%s", dirs.v[i], files.v[k]);
            if (rc != 0) break;
            if (kind == EXT_UNSUPPORTED)
                rc = tk_fail(err, "%s/%s: TIFF and WebP images are not supported (convert it to PNG or remove it)", root,
                             rel);
            else if (kind == EXT_IMAGE) rc = sv_push(out, rel, err);
            else (*skipped)++;
        }
        sv_free(&files);
    }
    sv_free(&dirs);
    return rc;
}

/* The record's meta JSON (malloc'd, unformatted), NULL when out of memory. */
static char *make_meta(const char *id, size_t label, const char *cls, size_t n_classes) {
    cJSON *m = cJSON_CreateObject();
    char *s = NULL;
    if (m && cJSON_AddStringToObject(m, "task", TK_IMGFOLDER_TASK) && cJSON_AddStringToObject(m, "id", id) &&
        cJSON_AddNumberToObject(m, "label", (double)label) && cJSON_AddStringToObject(m, "answer", cls) &&
        cJSON_AddNumberToObject(m, "n_classes", (double)n_classes))
        s = cJSON_PrintUnformatted(m);
    cJSON_Delete(m);
    return s;
}

int tk_convert_image_folder(const tk_imgfolder_opts *o, tk_convert_stats *st, tk_err *err) {
    tk_convert_stats s;
    memset(&s, 0, sizeof s);
    if (st) *st = s;
    if (!o || !o->input_dir || !o->out) return tk_fail(err, "image-folder: --input and --out are required");
    struct stat sb;
    if (stat(o->input_dir, &sb) != 0) return tk_fail(err, "%s: cannot open: %s", o->input_dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return tk_fail(err, "%s: not a folder (expected a folder with one sub-folder of images per class)", o->input_dir);

    strvec classes = {0}, *images = NULL;
    tk_shard_sink sink;
    int sink_open = 0, rc = -1;
    if (list_dir(o->input_dir, "", &classes, NULL, err) != 0) goto done;
    if (classes.n == 0) {
        tk_fail(err, "%s: no class folders (expected one sub-folder of images per class, as torchvision's "
                "ImageFolder)", o->input_dir);
        goto done;
    }
    images = calloc(classes.n, sizeof *images);
    if (!images) {
        tk_fail(err, "image-folder: out of memory");
        goto done;
    }
    size_t total = 0;
    for (size_t c = 0; c < classes.n; c++) {
        if (class_images(o->input_dir, classes.v[c], o->limit, &images[c], &s.skipped, err) != 0) goto done;
        if (images[c].n == 0) {
            tk_fail(err, "%s/%s: class folder with no image (expected .png, .jpg, .jpeg, .bmp, .gif, .ppm, .pgm or "
                    ".pnm files)", o->input_dir, classes.v[c]);
            goto done;
        }
        total += images[c].n;
    }
    s.records = total;
    s.classes = classes.n;

    tk_shard_sink_init(&sink, o->out, o->records_per_shard, 0, &s);
    sink_open = 1;
    size_t done_n = 0;
    for (size_t c = 0; c < classes.n; c++) {
        for (size_t i = 0; i < images[c].n; i++, done_n++) {
            char path[4200];
            if (tk_pathf(path, sizeof path, err, "%s/%s", o->input_dir, images[c].v[i]) != 0) goto done;
            size_t nbytes = 0;
            tk_err ierr = {0};
            char *bytes = tk_read_file(path, &nbytes, &ierr);
            tk_image *img = bytes ? tk_image_decode(bytes, nbytes, path, o->max_pixels, &ierr) : NULL;
            if (!img) {
                free(bytes);
                if (o->skip_bad_images) {
                    s.dropped++;
                    continue;
                }
                tk_err_one_line(&ierr);
                tk_fail(err, "%s (use --skip-bad-images to skip such images)", ierr.msg);
                goto done;
            }
            tk_image_free(img);
            char *meta = make_meta(images[c].v[i], c, classes.v[c], classes.n);
            if (!meta) {
                free(bytes);
                tk_fail(err, "image-folder: out of memory");
                goto done;
            }
            int32_t id = 0, label = TK_SHARD_LABEL_IGNORE;
            uint8_t kind = TK_KIND_IMAGE;
            tk_shard_image pay = {.kind = TK_IMAGE_ENCODED, .nbytes = nbytes, .data = (const uint8_t *)bytes};
            tk_shard_record rec = {.n_tokens = 1, .input_ids = &id, .labels = &label, .kinds = &kind,
                                   .meta = meta, .meta_len = strlen(meta), .n_images = 1, .images = &pay};
            int ar = tk_shard_sink_add(&sink, &rec, err);
            free(meta);
            free(bytes);
            if (ar != 0) {
                tk_err_prefix(err, path);
                goto done;
            }
            s.images++;
            if (o->progress && (done_n % 1000 == 999 || done_n + 1 == total)) o->progress(o->progress_ctx, done_n + 1, total);
        }
    }
    if (s.written == 0) {
        tk_fail(err, "%s: no image decoded (all %zu skipped as bad)", o->input_dir, s.dropped);
        goto done;
    }
    sink_open = 0;
    if (tk_shard_sink_close(&sink, err) != 0) goto done;
    rc = 0;
done:
    if (sink_open) tk_shard_sink_abort(&sink);
    for (size_t c = 0; images && c < classes.n; c++) sv_free(&images[c]);
    free(images);
    sv_free(&classes);
    if (st) *st = s;
    return rc;
}
