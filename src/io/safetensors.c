/* safetensors.c: see safetensors.h.
 *
 * File layout: u64 little-endian header length N | N bytes of UTF-8 JSON | data section.
 * Every number read from the file is validated before it is used to allocate or index: the header
 * length against the file size and a 100 MB cap, every shape and offset against 2^53 (the exact
 * integer range of the JSON doubles cJSON gives us), products with tk_mul_size, and every tensor's
 * [begin, end) against the data section. The header is copied out of the mapping (plus a NUL)
 * before cJSON sees it, so no parser bug can read past the mapping.
 */
#include "safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

#define ST_MAX_HEADER ((size_t)100 * 1024 * 1024) /* bytes of JSON header we accept */
#define ST_MAX_INT 9007199254740992.0             /* 2^53: largest exact JSON integer */
#define ST_SHOW 200                               /* buffer for a name shown in a message */
#define ST_SHAPE_STR 256                          /* buffer for "[d0, d1, ...]" */
#define ST_PAR_MIN ((size_t)1 << 16)              /* elements before conversion goes parallel */

/* ---- dtypes ----------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} st_dtypes[] = {
    [TK_DT_F32] = {"F32", 4}, [TK_DT_F16] = {"F16", 2}, [TK_DT_BF16] = {"BF16", 2},
    [TK_DT_I64] = {"I64", 8}, [TK_DT_I32] = {"I32", 4}, [TK_DT_U8] = {"U8", 1},
    [TK_DT_F64] = {"F64", 8}, [TK_DT_BOOL] = {"BOOL", 1},
};
#define ST_NDTYPES (sizeof st_dtypes / sizeof st_dtypes[0])

static int st_dtype_valid(tk_dtype dt) { return (unsigned)dt < ST_NDTYPES; }

size_t tk_dtype_size(tk_dtype dt) { return st_dtype_valid(dt) ? st_dtypes[dt].size : 0; }

const char *tk_dtype_name(tk_dtype dt) { return st_dtype_valid(dt) ? st_dtypes[dt].name : "?"; }

static int st_dtype_parse(const char *s, tk_dtype *out) {
    for (size_t i = 0; i < ST_NDTYPES; i++) {
        if (strcmp(s, st_dtypes[i].name) == 0) {
            *out = (tk_dtype)i;
            return 0;
        }
    }
    return -1;
}

/* ---- message helpers -------------------------------------------------------------------------- */

/* Copies s into buf for display inside a one-line message: control bytes (and, when ascii is set,
 * every byte >= 0x80) become \xNN; long strings are cut at a character boundary with "...". */
static const char *st_show_bytes(char buf[ST_SHOW], const char *s, int ascii) {
    if (!s) return "(null)";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (o + 8 >= ST_SHOW && (*p & 0xC0) != 0x80) {
            memcpy(buf + o, "...", 4);
            return buf;
        }
        if (o + 5 >= ST_SHOW) break; /* inside a long multi-byte run: stop */
        if (*p < 0x20 || *p == 0x7f || (ascii && *p >= 0x80)) {
            o += (size_t)snprintf(buf + o, ST_SHOW - o, "\\x%02x", *p);
        } else {
            buf[o++] = (char)*p;
        }
    }
    buf[o] = '\0';
    return buf;
}

/* For names already known to be UTF-8 (everything parsed from a validated header). */
static const char *st_show(char buf[ST_SHOW], const char *s) { return st_show_bytes(buf, s, 0); }

static const char *st_shape_str(char buf[ST_SHAPE_STR], int ndim, const int64_t *shape) {
    size_t o = 0;
    buf[o++] = '[';
    for (int d = 0; d < ndim && o < ST_SHAPE_STR - 24; d++)
        o += (size_t)snprintf(buf + o, ST_SHAPE_STR - o, "%s%" PRId64, d ? ", " : "", shape[d]);
    snprintf(buf + o, ST_SHAPE_STR - o, "]");
    return buf;
}

static const char *st_json_type(const cJSON *v) {
    if (!v) return "missing value";
    if (cJSON_IsObject(v)) return "object";
    if (cJSON_IsArray(v)) return "array";
    if (cJSON_IsString(v)) return "string";
    if (cJSON_IsNumber(v)) return "number";
    if (cJSON_IsBool(v)) return "boolean";
    if (cJSON_IsNull(v)) return "null";
    return "invalid value";
}

/* "a JSON string", or the number itself for numbers ("-1", "1.5") */
static const char *st_describe(char buf[64], const cJSON *v) {
    if (v && cJSON_IsNumber(v))
        snprintf(buf, 64, "%.17g", v->valuedouble);
    else
        snprintf(buf, 64, "a JSON %s", st_json_type(v));
    return buf;
}

/* A JSON number that is an integer in [0, 2^53]. */
static int st_json_uint(const cJSON *v, uint64_t *out) {
    if (!v || !cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0.0) || d > ST_MAX_INT || d != floor(d)) return -1;
    *out = (uint64_t)d;
    return 0;
}

/* Checks that s[0..n) is UTF-8 (no overlongs, surrogates or code points past U+10FFFF) and, when
 * ctrl_ok is 0, that it holds no control bytes other than JSON whitespace. Returns the offset of the
 * first bad byte, or n. */
static size_t st_utf8_check(const unsigned char *s, size_t n, int ctrl_ok) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            if (!ctrl_ok && c < 0x20 && c != '\t' && c != '\n' && c != '\r') return i;
            i++;
            continue;
        }
        size_t len;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (n - i < len) return i;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += len;
    }
    return n;
}

static char *st_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* dir + "/" + name, malloc'd; NULL on overflow or out of memory. */
static char *st_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    if (a > SIZE_MAX - b - 2) return NULL;
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    if (slash) p[a++] = '/';
    memcpy(p + a, name, b + 1);
    return p;
}

/* ---- reading ---------------------------------------------------------------------------------- */

struct tk_st_file {
    char *path;
    void *map;                 /* the whole file, read-only */
    size_t map_size;           /* file size in bytes */
    const unsigned char *data; /* start of the data section inside map */
    size_t data_size;          /* bytes in the data section */
    tk_st_tensor *tensors;     /* n, in header order */
    size_t n;
    tk_st_tensor **by_name; /* n, sorted by name for tk_st_find */
    char **meta;            /* 2 * n_meta: key, value, ... sorted by key */
    size_t n_meta;
};

static int st_cmp_name(const void *a, const void *b) {
    const tk_st_tensor *x = *(const tk_st_tensor *const *)a, *y = *(const tk_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int st_cmp_offset(const void *a, const void *b) {
    const tk_st_tensor *x = *(const tk_st_tensor *const *)a, *y = *(const tk_st_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

static int st_cmp_meta(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Parses one header entry into t; t->name is set last, on success. */
static int st_parse_entry(const char *path, const cJSON *e, size_t data_size, tk_st_tensor *t,
                          tk_err *err) {
    char nm[ST_SHOW], val[ST_SHOW], shp[ST_SHAPE_STR], d1[64];
    const char *name = st_show(nm, e->string);
    if (!cJSON_IsObject(e))
        return tk_fail(err,
                       "%s: tensor '%s': entry is a JSON %s but expected an object with dtype, "
                       "shape and data_offsets",
                       path, name, st_json_type(e));
    const cJSON *dt = NULL, *sh = NULL, *off = NULL;
    for (const cJSON *c = e->child; c; c = c->next) {
        const cJSON **slot = NULL;
        if (strcmp(c->string, "dtype") == 0) slot = &dt;
        if (strcmp(c->string, "shape") == 0) slot = &sh;
        if (strcmp(c->string, "data_offsets") == 0) slot = &off;
        if (!slot) continue; /* unknown fields are ignored, as the reference reader does */
        if (*slot)
            return tk_fail(err, "%s: tensor '%s': field '%s' appears twice (expected once)", path,
                           name, c->string);
        *slot = c;
    }

    /* dtype */
    if (!dt || !cJSON_IsString(dt))
        return tk_fail(err, "%s: tensor '%s': dtype is %s but expected a string such as \"F32\"",
                       path, name, dt ? st_describe(d1, dt) : "missing");
    if (st_dtype_parse(dt->valuestring, &t->dtype) != 0)
        return tk_fail(err,
                       "%s: tensor '%s': unknown dtype '%s' (expected F32, F16, BF16, F64, I64, "
                       "I32, U8 or BOOL)",
                       path, name, st_show(val, dt->valuestring));

    /* shape */
    if (!sh || !cJSON_IsArray(sh))
        return tk_fail(err,
                       "%s: tensor '%s': shape is %s but expected an array of non-negative "
                       "integers",
                       path, name, sh ? st_describe(d1, sh) : "missing");
    size_t ndim = 0;
    for (const cJSON *c = sh->child; c; c = c->next) ndim++;
    if (ndim > TK_ST_MAX_DIMS)
        return tk_fail(err, "%s: tensor '%s': shape has %zu dims but at most %d are supported",
                       path, name, ndim, TK_ST_MAX_DIMS);
    t->ndim = (int)ndim;
    size_t numel = 1, d = 0;
    int overflow = 0;
    for (const cJSON *c = sh->child; c; c = c->next, d++) {
        uint64_t v;
        if (st_json_uint(c, &v) != 0)
            return tk_fail(err,
                           "%s: tensor '%s': shape[%zu] is %s but expected a non-negative "
                           "integer <= 2^53",
                           path, name, d, st_describe(d1, c));
        t->shape[d] = (int64_t)v;
        if ((uint64_t)(size_t)v != v || tk_mul_size(numel, (size_t)v, &numel) != 0) overflow = 1;
    }
    /* a zero dim makes any product fit; otherwise an overflow anywhere is fatal */
    for (d = 0; d < ndim; d++)
        if (t->shape[d] == 0) overflow = 0, numel = 0;
    if (overflow)
        return tk_fail(err, "%s: tensor '%s': shape %s has more elements than fit in size_t", path,
                       name, st_shape_str(shp, t->ndim, t->shape));
    t->numel = numel;
    size_t need;
    if (tk_mul_size(numel, tk_dtype_size(t->dtype), &need) != 0)
        return tk_fail(err, "%s: tensor '%s': shape %s of %s needs more bytes than fit in size_t",
                       path, name, st_shape_str(shp, t->ndim, t->shape), tk_dtype_name(t->dtype));

    /* data_offsets */
    uint64_t begin, end;
    if (!off || !cJSON_IsArray(off) || !off->child || !off->child->next || off->child->next->next)
        return tk_fail(err, "%s: tensor '%s': data_offsets is %s but expected an array [begin, end]",
                       path, name,
                       !off ? "missing"
                       : cJSON_IsArray(off) ? "an array of the wrong length"
                                            : st_describe(d1, off));
    if (st_json_uint(off->child, &begin) != 0 || st_json_uint(off->child->next, &end) != 0)
        return tk_fail(err,
                       "%s: tensor '%s': data_offsets [%s, %s] but expected two non-negative "
                       "integers <= 2^53",
                       path, name, st_describe(d1, off->child), st_describe(val, off->child->next));
    if (begin > end)
        return tk_fail(err,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] but expected begin <= end",
                       path, name, begin, end);
    if (end > (uint64_t)data_size)
        return tk_fail(err,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] end past the %zu-byte data section (file truncated?)",
                       path, name, begin, end, data_size);
    if (end - begin != (uint64_t)need)
        return tk_fail(err,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
                       " bytes but shape %s of %s needs %zu",
                       path, name, begin, end, end - begin,
                       st_shape_str(shp, t->ndim, t->shape), tk_dtype_name(t->dtype), need);
    t->offset = (size_t)begin;
    t->nbytes = need;
    t->name = st_strdup(e->string);
    if (!t->name) return tk_fail(err, "%s: tensor '%s': out of memory", path, name);
    return 0;
}

static int st_parse_metadata(tk_st_file *f, const cJSON *m, tk_err *err) {
    char k[ST_SHOW];
    if (!cJSON_IsObject(m))
        return tk_fail(err, "%s: __metadata__ is a JSON %s but expected an object of strings",
                       f->path, st_json_type(m));
    size_t n = 0;
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return tk_fail(err,
                           "%s: __metadata__ key '%s' has a JSON %s value but expected a string",
                           f->path, st_show(k, c->string), st_json_type(c));
        n++;
    }
    if (n == 0) return 0;
    f->meta = calloc(n, 2 * sizeof(char *));
    if (!f->meta) return tk_fail(err, "%s: out of memory for %zu metadata entries", f->path, n);
    f->n_meta = n;
    size_t i = 0;
    for (const cJSON *c = m->child; c; c = c->next, i++) {
        f->meta[2 * i] = st_strdup(c->string);
        f->meta[2 * i + 1] = st_strdup(c->valuestring);
        if (!f->meta[2 * i] || !f->meta[2 * i + 1])
            return tk_fail(err, "%s: out of memory for metadata", f->path);
    }
    qsort(f->meta, n, 2 * sizeof(char *), st_cmp_meta);
    for (i = 1; i < n; i++)
        if (strcmp(f->meta[2 * i - 2], f->meta[2 * i]) == 0)
            return tk_fail(err, "%s: __metadata__ key '%s' appears twice (expected once)", f->path,
                           st_show(k, f->meta[2 * i]));
    return 0;
}

/* Validates the header of the mapped file and fills f's tables. */
static int st_parse_header(tk_st_file *f, tk_err *err) {
    const unsigned char *m = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | m[i];
    size_t avail = f->map_size - 8;
    if (hlen > (uint64_t)avail)
        return tk_fail(err,
                       "%s: header length %" PRIu64
                       " exceeds the %zu bytes after the 8-byte length prefix (file is %zu bytes)",
                       f->path, hlen, avail, f->map_size);
    if (hlen > (uint64_t)ST_MAX_HEADER)
        return tk_fail(err, "%s: header length %" PRIu64 " exceeds the %zu-byte limit", f->path,
                       hlen, ST_MAX_HEADER);
    size_t n = (size_t)hlen;
    if (n < 2)
        return tk_fail(err, "%s: header length %zu but expected at least 2 (a JSON object)",
                       f->path, n);
    const unsigned char *h = m + 8;
    size_t bad = st_utf8_check(h, n, 0);
    if (bad < n)
        return tk_fail(err,
                       "%s: header byte %zu (file offset %zu) is 0x%02x but expected UTF-8 JSON "
                       "text (no control bytes, no malformed sequences)",
                       f->path, bad, bad + 8, h[bad]);
    f->data = h + n;
    f->data_size = avail - n;

    /* cJSON parses a private NUL-terminated copy, never the mapping itself */
    char *buf = malloc(n + 1);
    if (!buf) return tk_fail(err, "%s: out of memory for a %zu-byte header", f->path, n);
    memcpy(buf, h, n);
    buf[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, n, &end, 0);
    int rc = -1;
    if (!root) {
        size_t pos = end ? (size_t)(end - buf) : 0;
        tk_fail(err, "%s: header is not valid JSON (error near header byte %zu of %zu)", f->path,
                pos, n);
        goto done;
    }
    for (const char *p = end; p < buf + n; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            tk_fail(err,
                    "%s: unexpected '%c' at header byte %zu after the JSON object (expected only "
                    "space padding)",
                    f->path, *p, (size_t)(p - buf));
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        tk_fail(err, "%s: header is a JSON %s but expected an object mapping tensor names to entries",
                f->path, st_json_type(root));
        goto done;
    }

    size_t count = 0;
    const cJSON *meta = NULL;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            if (meta) {
                tk_fail(err, "%s: __metadata__ appears twice (expected at most once)", f->path);
                goto done;
            }
            meta = c;
        } else {
            count++;
        }
    }
    if (meta && st_parse_metadata(f, meta, err) != 0) goto done;
    if (count > 0) {
        f->tensors = calloc(count, sizeof *f->tensors);
        f->by_name = calloc(count, sizeof *f->by_name);
        if (!f->tensors || !f->by_name) {
            tk_fail(err, "%s: out of memory for %zu tensor descriptors", f->path, count);
            goto done;
        }
    }
    f->n = count; /* names are NULL until parsed; close frees what was set */
    size_t k = 0;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (c == meta) continue;
        if (st_parse_entry(f->path, c, f->data_size, &f->tensors[k], err) != 0) goto done;
        f->by_name[k] = &f->tensors[k];
        k++;
    }
    TK_ASSERT(k == count);

    char nm[ST_SHOW];
    if (count > 1) {
        qsort(f->by_name, count, sizeof *f->by_name, st_cmp_name);
        for (size_t i = 1; i < count; i++) {
            if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0) {
                tk_fail(err, "%s: tensor '%s' appears twice in the header (expected unique names)",
                        f->path, st_show(nm, f->by_name[i]->name));
                goto done;
            }
        }
        /* overlap check on a scratch order; zero-byte tensors occupy nothing */
        tk_st_tensor **ord = malloc(count * sizeof *ord);
        if (!ord) {
            tk_fail(err, "%s: out of memory checking %zu tensors", f->path, count);
            goto done;
        }
        for (size_t i = 0; i < count; i++) ord[i] = &f->tensors[i];
        qsort(ord, count, sizeof *ord, st_cmp_offset);
        const tk_st_tensor *prev = NULL;
        for (size_t i = 0; i < count; i++) {
            const tk_st_tensor *t = ord[i];
            if (t->nbytes == 0) continue;
            if (prev && t->offset < prev->offset + prev->nbytes) {
                char nm2[ST_SHOW];
                tk_fail(err,
                        "%s: tensor '%s' data_offsets [%zu, %zu] overlap tensor '%s' [%zu, %zu] "
                        "(expected disjoint byte ranges)",
                        f->path, st_show(nm, t->name), t->offset, t->offset + t->nbytes,
                        st_show(nm2, prev->name), prev->offset, prev->offset + prev->nbytes);
                free(ord);
                goto done;
            }
            prev = t;
        }
        free(ord);
    }
    rc = 0;
done:
    cJSON_Delete(root);
    free(buf);
    return rc;
}

tk_st_file *tk_st_open(const char *path, tk_err *err) {
    if (!path) {
        tk_fail(err, "tk_st_open: path is NULL");
        return NULL;
    }
    tk_st_file *f = calloc(1, sizeof *f);
    if (f) f->path = st_strdup(path);
    if (!f || !f->path) {
        free(f);
        tk_fail(err, "%s: out of memory", path);
        return NULL;
    }
    /* O_NONBLOCK so a FIFO does not hang the open; it is rejected below as not a regular file */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        tk_fail(err, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        tk_fail(err, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        tk_fail(err, "%s: not a regular file (expected a safetensors file)", path);
        close(fd);
        goto fail;
    }
    if (st.st_size < 8) {
        tk_fail(err,
                "%s: file is %lld bytes but expected at least 8 (the u64 header length) followed "
                "by a JSON header%s",
                path, (long long)st.st_size, st.st_size == 0 ? " (the file is empty)" : "");
        close(fd);
        goto fail;
    }
    if ((uintmax_t)st.st_size > (uintmax_t)SIZE_MAX) {
        tk_fail(err, "%s: file is %lld bytes, too large to map", path, (long long)st.st_size);
        close(fd);
        goto fail;
    }
    f->map_size = (size_t)st.st_size;
    void *map = mmap(NULL, f->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        tk_fail(err, "%s: cannot mmap %zu bytes: %s", path, f->map_size, strerror(map_errno));
        goto fail;
    }
    f->map = map;
    if (st_parse_header(f, err) != 0) goto fail;
    return f;
fail:
    tk_st_close(f);
    return NULL;
}

void tk_st_close(tk_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_size);
    for (size_t i = 0; i < f->n; i++) free(f->tensors ? f->tensors[i].name : NULL);
    for (size_t i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->meta);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

const char *tk_st_path(const tk_st_file *f) { return f ? f->path : NULL; }

size_t tk_st_count(const tk_st_file *f) { return f ? f->n : 0; }

const tk_st_tensor *tk_st_at(const tk_st_file *f, size_t i) {
    return f && i < f->n ? &f->tensors[i] : NULL;
}

const tk_st_tensor *tk_st_find(const tk_st_file *f, const char *name) {
    if (!f || !name || f->n == 0) return NULL;
    tk_st_tensor key = {.name = (char *)name};
    tk_st_tensor *kp = &key;
    tk_st_tensor **hit = bsearch(&kp, f->by_name, f->n, sizeof *f->by_name, st_cmp_name);
    return hit ? *hit : NULL;
}

const char *tk_st_metadata(const tk_st_file *f, const char *key) {
    if (!f || !key || f->n_meta == 0) return NULL;
    char **hit = bsearch(&key, f->meta, f->n_meta, 2 * sizeof(char *), st_cmp_meta);
    return hit ? hit[1] : NULL;
}

/* Whether t is one of f's descriptors (compared as integers: they may come from another file). */
static int st_owns(const tk_st_file *f, const tk_st_tensor *t) {
    if (!f || !t || f->n == 0) return 0;
    uintptr_t a = (uintptr_t)f->tensors, p = (uintptr_t)t;
    return p >= a && p - a < f->n * sizeof *t && (p - a) % sizeof *t == 0;
}

const void *tk_st_data(const tk_st_file *f, const tk_st_tensor *t) {
    TK_ASSERT(st_owns(f, t)); /* a descriptor from another file is a caller bug */
    return f->data + t->offset;
}

int tk_st_read_f32(const tk_st_file *f, const tk_st_tensor *t, float *out, size_t n, tk_err *err) {
    char nm[ST_SHOW], shp[ST_SHAPE_STR];
    if (!st_owns(f, t))
        return tk_fail(err, "%s: tk_st_read_f32: tensor descriptor does not belong to this file",
                       f ? f->path : "(null file)");
    const char *name = st_show(nm, t->name);
    if (n != t->numel)
        return tk_fail(err,
                       "%s: tensor '%s': output holds %zu floats but shape %s has %zu elements",
                       f->path, name, n, st_shape_str(shp, t->ndim, t->shape), t->numel);
    if (n > 0 && !out)
        return tk_fail(err, "%s: tensor '%s': output buffer is NULL", f->path, name);
    const unsigned char *src = f->data + t->offset;
    switch (t->dtype) {
    case TK_DT_F32:
        if (n > 0) memcpy(out, src, t->nbytes);
        return 0;
    case TK_DT_F16:
#pragma omp parallel for schedule(static) if (n >= ST_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            out[i] = tk_f16_to_f32(h);
        }
        return 0;
    case TK_DT_BF16:
#pragma omp parallel for schedule(static) if (n >= ST_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            out[i] = tk_bf16_to_f32(h);
        }
        return 0;
    case TK_DT_F64:
#pragma omp parallel for schedule(static) if (n >= ST_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            double v;
            memcpy(&v, src + 8 * i, 8);
            out[i] = (float)v;
        }
        return 0;
    default:
        return tk_fail(err,
                       "%s: tensor '%s': dtype %s is not floating point (expected F32, F16, BF16 "
                       "or F64; read integers with tk_st_data)",
                       f->path, name, tk_dtype_name(t->dtype));
    }
}

int tk_st_check_shape(const tk_st_file *f, const tk_st_tensor *t, int ndim, const int64_t *shape,
                      tk_err *err) {
    char nm[ST_SHOW], s1[ST_SHAPE_STR], s2[ST_SHAPE_STR];
    const char *path = f ? f->path : "(null file)";
    if (!t) return tk_fail(err, "%s: tk_st_check_shape: tensor is NULL", path);
    if (ndim < 0 || ndim > TK_ST_MAX_DIMS || (ndim > 0 && !shape))
        return tk_fail(err, "%s: tensor '%s': expected shape has %d dims (must be 0..%d)", path,
                       st_show(nm, t->name), ndim, TK_ST_MAX_DIMS);
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same)
        return tk_fail(err, "%s: tensor '%s': shape %s but expected %s", path, st_show(nm, t->name),
                       st_shape_str(s1, t->ndim, t->shape), st_shape_str(s2, ndim, shape));
    return 0;
}

/* ---- sharded sets ----------------------------------------------------------------------------- */

typedef struct {
    char *name;  /* tensor name from weight_map */
    size_t file; /* index into files */
} st_map_entry;

struct tk_st_set {
    tk_st_file **files; /* nfiles; one file when not sharded */
    size_t nfiles;
    st_map_entry *map; /* nmap, sorted by name; NULL when not sharded */
    size_t nmap;
};

static int st_cmp_map(const void *a, const void *b) {
    return strcmp(((const st_map_entry *)a)->name, ((const st_map_entry *)b)->name);
}

static int st_cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* 1 if path exists, 0 if not, -1 (err set) when it cannot be told. */
static int st_exists(const char *path, tk_err *err) {
    struct stat st;
    if (stat(path, &st) == 0) return 1;
    if (errno == ENOENT || errno == ENOTDIR) return 0;
    return tk_fail(err, "%s: cannot stat: %s", path, strerror(errno));
}

void tk_st_set_close(tk_st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->nfiles; i++) tk_st_close(s->files[i]);
    for (size_t i = 0; i < s->nmap; i++) free(s->map[i].name);
    free(s->files);
    free(s->map);
    free(s);
}

/* Opens the shards an index names; fills s. */
static int st_set_open_index(tk_st_set *s, const char *dir, const char *index, tk_err *err) {
    char nm[ST_SHOW], sh[ST_SHOW];
    struct stat st;
    if (stat(index, &st) != 0) return tk_fail(err, "%s: cannot stat: %s", index, strerror(errno));
    if ((uintmax_t)st.st_size > (uintmax_t)ST_MAX_HEADER)
        return tk_fail(err, "%s: file is %lld bytes, over the %zu-byte limit for an index", index,
                       (long long)st.st_size, ST_MAX_HEADER);
    size_t len = 0;
    char *text = tk_read_file(index, &len, err);
    if (!text) return -1;
    int rc = -1;
    const char **shards = NULL; /* distinct shard names, pointing into root */
    const char **entry_shard = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        tk_fail(err, "%s: not valid JSON (error near byte %zu of %zu)", index,
                end ? (size_t)(end - text) : (size_t)0, len);
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        tk_fail(err, "%s: top level is a JSON %s but expected an object with \"weight_map\"", index,
                st_json_type(root));
        goto done;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!wm || !cJSON_IsObject(wm)) {
        tk_fail(err,
                "%s: \"weight_map\" is %s but expected an object mapping tensor names to shard "
                "files",
                index, wm ? st_json_type(wm) : "missing");
        goto done;
    }
    size_t n = 0;
    for (const cJSON *c = wm->child; c; c = c->next) {
        if (!cJSON_IsString(c)) {
            tk_fail(err, "%s: weight_map entry '%s' is a JSON %s but expected a shard file name",
                    index, st_show(nm, c->string), st_json_type(c));
            goto done;
        }
        const char *v = c->valuestring;
        if (v[0] == '\0' || strchr(v, '/') || strchr(v, '\\') || strstr(v, "..")) {
            tk_fail(err,
                    "%s: weight_map entry '%s' names shard '%s' but expected a plain file name in "
                    "the same directory (no '/' or '..')",
                    index, st_show(nm, c->string), st_show(sh, v));
            goto done;
        }
        n++;
    }
    if (n == 0) {
        tk_fail(err, "%s: weight_map is empty but expected at least one tensor", index);
        goto done;
    }
    s->map = calloc(n, sizeof *s->map);
    shards = calloc(n, sizeof *shards);
    entry_shard = calloc(n, sizeof *entry_shard);
    if (!s->map || !shards || !entry_shard) {
        tk_fail(err, "%s: out of memory for %zu entries", index, n);
        goto done;
    }
    s->nmap = n;
    size_t i = 0;
    for (const cJSON *c = wm->child; c; c = c->next, i++) {
        s->map[i].name = st_strdup(c->string);
        if (!s->map[i].name) {
            tk_fail(err, "%s: out of memory", index);
            goto done;
        }
        shards[i] = c->valuestring;
        entry_shard[i] = c->valuestring;
    }
    /* distinct shards; then each entry (still in weight_map order) gets its shard's index */
    qsort(shards, n, sizeof *shards, st_cmp_str);
    size_t ns = 0;
    for (i = 0; i < n; i++)
        if (ns == 0 || strcmp(shards[ns - 1], shards[i]) != 0) shards[ns++] = shards[i];
    for (i = 0; i < n; i++) {
        const char **hit = bsearch(&entry_shard[i], shards, ns, sizeof *shards, st_cmp_str);
        TK_ASSERT(hit != NULL);
        s->map[i].file = (size_t)(hit - shards);
    }
    qsort(s->map, n, sizeof *s->map, st_cmp_map);
    for (i = 1; i < n; i++) {
        if (strcmp(s->map[i - 1].name, s->map[i].name) == 0) {
            tk_fail(err, "%s: weight_map names tensor '%s' twice (expected once)", index,
                    st_show(nm, s->map[i].name));
            goto done;
        }
    }
    /* open each shard once */
    s->files = calloc(ns, sizeof *s->files);
    if (!s->files) {
        tk_fail(err, "%s: out of memory for %zu shards", index, ns);
        goto done;
    }
    s->nfiles = ns;
    for (i = 0; i < ns; i++) {
        char *p = st_join(dir, shards[i]);
        if (!p) {
            tk_fail(err, "%s: out of memory", index);
            goto done;
        }
        s->files[i] = tk_st_open(p, err);
        free(p);
        if (!s->files[i]) {
            if (err) {
                char inner[sizeof err->msg];
                memcpy(inner, err->msg, sizeof inner);
                tk_fail(err, "%s (shard named by %s)", inner, index);
            }
            goto done;
        }
    }
    for (i = 0; i < n; i++) {
        const tk_st_file *f = s->files[s->map[i].file];
        if (!tk_st_find(f, s->map[i].name)) {
            tk_fail(err, "%s: tensor '%s' is listed in %s but absent from this shard", f->path,
                    st_show(nm, s->map[i].name), index);
            goto done;
        }
    }
    rc = 0;
done:
    free(shards);
    free(entry_shard);
    cJSON_Delete(root);
    free(text);
    return rc;
}

tk_st_set *tk_st_set_open(const char *dir, tk_err *err) {
    if (!dir) {
        tk_fail(err, "tk_st_set_open: directory is NULL");
        return NULL;
    }
    struct stat st;
    if (stat(dir, &st) != 0) {
        tk_fail(err, "%s: cannot open checkpoint directory: %s", dir, strerror(errno));
        return NULL;
    }
    if (!S_ISDIR(st.st_mode)) {
        tk_fail(err, "%s: not a directory (expected a checkpoint directory)", dir);
        return NULL;
    }
    tk_st_set *s = calloc(1, sizeof *s);
    char *single = st_join(dir, "model.safetensors");
    char *index = st_join(dir, "model.safetensors.index.json");
    if (!s || !single || !index) {
        tk_fail(err, "%s: out of memory", dir);
        goto fail;
    }
    int have = st_exists(single, err);
    if (have < 0) goto fail;
    if (have) {
        s->files = calloc(1, sizeof *s->files);
        if (!s->files) {
            tk_fail(err, "%s: out of memory", dir);
            goto fail;
        }
        s->files[0] = tk_st_open(single, err);
        if (!s->files[0]) goto fail;
        s->nfiles = 1;
    } else {
        have = st_exists(index, err);
        if (have < 0) goto fail;
        if (!have) {
            tk_fail(err, "%s: no model.safetensors or model.safetensors.index.json", dir);
            goto fail;
        }
        if (st_set_open_index(s, dir, index, err) != 0) goto fail;
    }
    free(single);
    free(index);
    return s;
fail:
    free(single);
    free(index);
    tk_st_set_close(s);
    return NULL;
}

const tk_st_tensor *tk_st_set_find(const tk_st_set *s, const char *name, const tk_st_file **file) {
    const tk_st_file *f = NULL;
    const tk_st_tensor *t = NULL;
    if (s && name) {
        if (!s->map) {
            if (s->nfiles == 1) f = s->files[0];
        } else {
            st_map_entry key = {.name = (char *)name};
            const st_map_entry *hit = bsearch(&key, s->map, s->nmap, sizeof *s->map, st_cmp_map);
            if (hit) f = s->files[hit->file];
        }
        t = f ? tk_st_find(f, name) : NULL;
    }
    if (file) *file = t ? f : NULL;
    return t;
}

/* ---- writing ---------------------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} st_buf;

static void st_put(st_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (n > SIZE_MAX - b->len - 1) {
        b->oom = 1;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) {
            if (cap > SIZE_MAX / 2) {
                cap = b->len + n + 1;
                break;
            }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void st_puts(st_buf *b, const char *s) { st_put(b, s, strlen(s)); }

/* Appends s as a JSON string literal (s is valid UTF-8). */
static void st_put_json_str(st_buf *b, const char *s) {
    st_put(b, "\"", 1);
    const char *run = s;
    for (const char *p = s;; p++) {
        unsigned char c = (unsigned char)*p;
        if (c != '\0' && c != '"' && c != '\\' && c >= 0x20) continue;
        st_put(b, run, (size_t)(p - run));
        if (c == '\0') break;
        char esc[8];
        switch (c) {
        case '"': st_puts(b, "\\\""); break;
        case '\\': st_puts(b, "\\\\"); break;
        case '\n': st_puts(b, "\\n"); break;
        case '\r': st_puts(b, "\\r"); break;
        case '\t': st_puts(b, "\\t"); break;
        case '\b': st_puts(b, "\\b"); break;
        case '\f': st_puts(b, "\\f"); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            st_puts(b, esc);
        }
        run = p + 1;
    }
    st_put(b, "\"", 1);
}

static int st_write_all(int fd, const void *data, size_t n, size_t *done) {
    const unsigned char *p = data;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        *done += (size_t)w;
    }
    return 0;
}

static int st_valid_text(const char *s) {
    size_t n = strlen(s);
    return st_utf8_check((const unsigned char *)s, n, 1) == n;
}

/* Builds the padded header for the entries; sizes[i] receives entry i's byte count. */
static int st_build_header(const char *path, const tk_st_entry *entries, size_t n,
                           const char *const *metadata, size_t *sizes, size_t *total, st_buf *b,
                           tk_err *err) {
    char nm[ST_SHOW], num[64];
    /* metadata pairs */
    size_t nmeta = 0;
    if (metadata) {
        while (metadata[2 * nmeta]) {
            const char *k = metadata[2 * nmeta], *v = metadata[2 * nmeta + 1];
            if (!v)
                return tk_fail(err,
                               "%s: metadata key '%s' has no value (expected key, value pairs "
                               "ending in NULL)",
                               path, st_show_bytes(nm, k, 1));
            if (!st_valid_text(k) || !st_valid_text(v))
                return tk_fail(err, "%s: metadata key '%s' or its value is not valid UTF-8", path,
                               st_show_bytes(nm, k, 1));
            for (size_t j = 0; j < nmeta; j++)
                if (strcmp(metadata[2 * j], k) == 0)
                    return tk_fail(err, "%s: metadata key '%s' given twice (expected once)", path,
                                   st_show_bytes(nm, k, 1));
            nmeta++;
        }
    }
    st_put(b, "{", 1);
    if (nmeta > 0) {
        st_puts(b, "\"__metadata__\":{");
        for (size_t j = 0; j < nmeta; j++) {
            if (j) st_put(b, ",", 1);
            st_put_json_str(b, metadata[2 * j]);
            st_put(b, ":", 1);
            st_put_json_str(b, metadata[2 * j + 1]);
        }
        st_put(b, "}", 1);
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const tk_st_entry *e = &entries[i];
        if (!e->name) return tk_fail(err, "%s: entry %zu has a NULL name", path, i);
        const char *name = st_show_bytes(nm, e->name, 1);
        if (!st_valid_text(e->name))
            return tk_fail(err, "%s: tensor '%s': name is not valid UTF-8", path, name);
        if (strcmp(e->name, "__metadata__") == 0)
            return tk_fail(err, "%s: tensor name '__metadata__' is reserved for metadata", path);
        if (!st_dtype_valid(e->dtype))
            return tk_fail(err, "%s: tensor '%s': dtype %d is not a tk_dtype", path, name,
                           (int)e->dtype);
        if (e->ndim < 0 || e->ndim > TK_ST_MAX_DIMS)
            return tk_fail(err, "%s: tensor '%s': ndim %d but expected 0..%d", path, name, e->ndim,
                           TK_ST_MAX_DIMS);
        size_t numel = 1;
        int overflow = 0, zero = 0;
        for (int d = 0; d < e->ndim; d++) {
            int64_t v = e->shape[d];
            if (v < 0 || (double)v > ST_MAX_INT)
                return tk_fail(err,
                               "%s: tensor '%s': shape[%d] is %" PRId64
                               " but expected 0..2^53",
                               path, name, d, v);
            if (v == 0) zero = 1;
            if ((uint64_t)(size_t)v != (uint64_t)v || tk_mul_size(numel, (size_t)v, &numel) != 0)
                overflow = 1;
        }
        if (zero) numel = 0, overflow = 0;
        size_t bytes;
        if (overflow || tk_mul_size(numel, tk_dtype_size(e->dtype), &bytes) != 0 ||
            bytes > SIZE_MAX - off || (double)(off + bytes) > ST_MAX_INT)
            return tk_fail(err, "%s: tensor '%s': total data size overflows", path, name);
        if (bytes > 0 && !e->data)
            return tk_fail(err, "%s: tensor '%s': data is NULL but %zu bytes are needed", path,
                           name, bytes);
        sizes[i] = bytes;
        if (nmeta > 0 || i > 0) st_put(b, ",", 1);
        st_put_json_str(b, e->name);
        st_puts(b, ":{\"dtype\":\"");
        st_puts(b, tk_dtype_name(e->dtype));
        st_puts(b, "\",\"shape\":[");
        for (int d = 0; d < e->ndim; d++) {
            snprintf(num, sizeof num, "%s%" PRId64, d ? "," : "", e->shape[d]);
            st_puts(b, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%zu,%zu]}", off, off + bytes);
        st_puts(b, num);
        off += bytes;
    }
    st_put(b, "}", 1);
    /* duplicate names would make the file unreadable */
    if (n > 1) {
        const char **names = malloc(n * sizeof *names);
        if (!names) return tk_fail(err, "%s: out of memory", path);
        for (size_t i = 0; i < n; i++) names[i] = entries[i].name;
        qsort(names, n, sizeof *names, st_cmp_str);
        for (size_t i = 1; i < n; i++) {
            if (strcmp(names[i - 1], names[i]) == 0) {
                tk_fail(err, "%s: tensor '%s' given twice (expected unique names)", path,
                        st_show_bytes(nm, names[i], 1));
                free(names);
                return -1;
            }
        }
        free(names);
    }
    while (!b->oom && b->len % 8 != 0) st_put(b, " ", 1);
    if (b->oom) return tk_fail(err, "%s: out of memory building the header", path);
    if (b->len > ST_MAX_HEADER)
        return tk_fail(err, "%s: header of %zu bytes exceeds the %zu-byte limit", path, b->len,
                       ST_MAX_HEADER);
    *total = off;
    return 0;
}

/* fsyncs the directory holding path, so the rename is durable; best effort. */
static void st_sync_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? malloc((size_t)(slash - path) + 2) : NULL;
    if (slash && !dir) return;
    if (dir) {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir ? dir : ".", O_RDONLY | O_CLOEXEC | O_DIRECTORY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

int tk_st_write(const char *path, const tk_st_entry *entries, size_t n, const char *const *metadata,
                tk_err *err) {
    if (!path || !*path) return tk_fail(err, "tk_st_write: path is empty");
    if (n > 0 && !entries)
        return tk_fail(err, "%s: %zu entries but the entry array is NULL", path, n);
    size_t *sizes = n ? calloc(n, sizeof *sizes) : NULL;
    if (n && !sizes) return tk_fail(err, "%s: out of memory for %zu entries", path, n);
    st_buf b = {0};
    size_t total = 0;
    char *tmp = NULL;
    int fd = -1, rc = -1;
    if (st_build_header(path, entries, n, metadata, sizes, &total, &b, err) != 0) goto done;

    size_t plen = strlen(path);
    tmp = plen < SIZE_MAX - 32 ? malloc(plen + 32) : NULL;
    if (!tmp) {
        tk_fail(err, "%s: out of memory", path);
        goto done;
    }
    snprintf(tmp, plen + 32, "%s.tmp.%ld", path, (long)getpid());
    /* O_NOFOLLOW: never write through a symlink planted at the temporary name */
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
        tk_fail(err, "%s: cannot create temporary file %s: %s", path, tmp, strerror(errno));
        free(tmp);
        tmp = NULL; /* nothing to remove */
        goto done;
    }
    unsigned char prefix[8];
    uint64_t hlen = b.len;
    for (int i = 0; i < 8; i++) prefix[i] = (unsigned char)(hlen >> (8 * i));
    size_t done_bytes = 0, want = 8 + b.len + total;
    int ok = st_write_all(fd, prefix, 8, &done_bytes) == 0 &&
             st_write_all(fd, b.p, b.len, &done_bytes) == 0;
    for (size_t i = 0; ok && i < n; i++)
        ok = st_write_all(fd, entries[i].data, sizes[i], &done_bytes) == 0;
    if (!ok) {
        tk_fail(err, "%s: writing %s failed after %zu of %zu bytes: %s", path, tmp, done_bytes,
                want, strerror(errno));
        goto done;
    }
    if (fsync(fd) != 0) {
        tk_fail(err, "%s: fsync of %s failed: %s", path, tmp, strerror(errno));
        goto done;
    }
    int cfd = fd;
    fd = -1;
    if (close(cfd) != 0) {
        tk_fail(err, "%s: closing %s failed: %s", path, tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, path) != 0) {
        tk_fail(err, "%s: cannot rename %s over it: %s", path, tmp, strerror(errno));
        goto done;
    }
    free(tmp);
    tmp = NULL; /* renamed: nothing to remove */
    st_sync_dir(path);
    rc = 0;
done:
    if (fd >= 0) close(fd);
    if (tmp) {
        unlink(tmp);
        free(tmp);
    }
    free(b.p);
    free(sizes);
    return rc;
}
