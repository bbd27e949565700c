/* test_safetensors.c: safetensors reading, writing, sharded sets and malformed files.
 *
 * Every case prints its name and "ok" or "FAIL"; malformed-file cases also print the error message,
 * which must name the file and must not contain a newline. Exits non-zero if any check fails.
 * Files live in a mkdtemp directory under /tmp that is removed at the end.
 */
#include "io/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static int g_failures;   /* checks failed, over all cases */
static int g_case_fails; /* checks failed in the current case */
static char g_dir[64];   /* the mkdtemp directory */

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("    FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                             \
            g_failures++;                                                                          \
            g_case_fails++;                                                                        \
        }                                                                                          \
    } while (0)

static void case_begin(const char *name) {
    g_case_fails = 0;
    printf("case %-44s ", name);
    fflush(stdout);
}

static void case_end(const char *msg) {
    printf("%s", g_case_fails ? "FAIL" : "ok");
    if (msg && *msg) printf("  [%s]", msg);
    printf("\n");
}

/* g_dir/name into out */
static char *P(char out[512], const char *name) {
    snprintf(out, 512, "%s/%s", g_dir, name);
    return out;
}

static int write_bytes(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    int rc = fclose(f);
    return w == len && rc == 0 ? 0 : -1;
}

/* Writes a safetensors file by hand: u64 hlen, hlen_bytes of header, then data_len zero bytes
 * (or the bytes of data when it is not NULL). */
static int write_raw(const char *path, uint64_t hlen, const char *header, size_t header_bytes,
                     const void *data, size_t data_len) {
    size_t len = 8 + header_bytes + data_len;
    unsigned char *buf = calloc(1, len);
    if (!buf) return -1;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + 8, header, header_bytes);
    if (data) memcpy(buf + 8 + header_bytes, data, data_len);
    int rc = write_bytes(path, buf, len);
    free(buf);
    return rc;
}

static int write_header(const char *path, const char *header, size_t data_len) {
    return write_raw(path, strlen(header), header, strlen(header), NULL, data_len);
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* The message names the file and the finding, on one line. */
static void check_msg(const char *msg, const char *path, const char *expect) {
    CHECK(msg[0] != '\0');
    CHECK(strstr(msg, base_name(path)) != NULL);
    if (expect) CHECK(strstr(msg, expect) != NULL);
    CHECK(strchr(msg, '\n') == NULL);
}

static void expect_open_fail(const char *name, const char *path, const char *expect) {
    case_begin(name);
    tk_err err = {0};
    tk_st_file *f = tk_st_open(path, &err);
    CHECK(f == NULL);
    tk_st_close(f);
    check_msg(err.msg, path, expect);
    if (g_case_fails) printf("\n    expected '%s'", expect ? expect : "");
    case_end(err.msg);
}

static int count_entries(const char *dir, const char *containing) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (!containing || strstr(e->d_name, containing)) n++;
    }
    closedir(d);
    return n;
}

static void rm_rf(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            char sub[1024];
            while ((e = readdir(d)) != NULL) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
                rm_rf(sub);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

static int same_float(float a, float b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return a == b && signbit(a) == signbit(b);
}

/* ---- round trip --------------------------------------------------------------------------------- */

static void test_round_trip(void) {
    case_begin("round trip F32/F16/BF16/F64/I64/I32/U8/BOOL");
    char path[512];
    P(path, "rt.safetensors");
    const float f32[6] = {1.0f, -2.5f, 3.25f, 0.0f, 1e-8f, -1e30f};
    const uint16_t f16[6] = {0x3C00, 0x0001, 0xC000, 0x7BFF, 0x8000, 0x3555};
    const float f16_want[6] = {1.0f, 0x1p-24f, -2.0f, 65504.0f, -0.0f, 0.333251953125f};
    const uint16_t bf16[4] = {0x3F80, 0xC040, 0x3E20, 0x7F80};
    const float bf16_want[4] = {1.0f, -3.0f, 0.15625f, INFINITY};
    const double f64[2] = {0.5, -1e10};
    const int64_t i64[3] = {(int64_t)1 << 40, -7, 0};
    const int32_t i32[2] = {-123456, 7};
    const uint8_t u8[3] = {0, 127, 255};
    const uint8_t bl[2] = {1, 0};
    const float scalar = 3.25f;
    const char *weird = "we\"ird\\ name\n\t\xc3\xbc";
    tk_st_entry e[] = {
        {"w.f32", TK_DT_F32, 2, {2, 3}, f32},
        {"w.f16", TK_DT_F16, 1, {6}, f16},
        {"w.bf16", TK_DT_BF16, 1, {4}, bf16},
        {"w.f64", TK_DT_F64, 1, {2}, f64},
        {"ids", TK_DT_I64, 1, {3}, i64},
        {"i32", TK_DT_I32, 2, {1, 2}, i32},
        {"u8", TK_DT_U8, 1, {3}, u8},
        {"mask", TK_DT_BOOL, 1, {2}, bl},
        {"scalar", TK_DT_F32, 0, {0}, &scalar},
        {"empty", TK_DT_F32, 2, {0, 4}, NULL},
        {weird, TK_DT_F32, 1, {1}, &scalar},
    };
    size_t n = sizeof e / sizeof e[0];
    const char *meta[] = {"format", "pt", "note", "quote \" backslash \\ newline \n tab \t", NULL};
    tk_err err = {0};
    CHECK(tk_st_write(path, e, n, meta, &err) == 0);
    if (err.msg[0]) printf("\n    %s\n", err.msg);
    CHECK(count_entries(g_dir, ".tmp.") == 0);

    /* layout: header length a multiple of 8, data section right after, nothing else */
    size_t flen = 0;
    tk_err rerr = {0};
    unsigned char *raw = (unsigned char *)tk_read_file(path, &flen, &rerr);
    CHECK(raw != NULL);
    if (raw) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
        size_t data = 24 + 12 + 8 + 16 + 24 + 8 + 3 + 2 + 4 + 0 + 4;
        CHECK(hlen % 8 == 0);
        CHECK(flen == 8 + hlen + data);
        CHECK(raw[8] == '{');
        free(raw);
    }

    tk_st_file *f = tk_st_open(path, &err);
    CHECK(f != NULL);
    if (!f) {
        case_end(err.msg);
        return;
    }
    CHECK(strcmp(tk_st_path(f), path) == 0);
    CHECK(tk_st_count(f) == n);
    for (size_t i = 0; i < n && i < tk_st_count(f); i++)
        CHECK(strcmp(tk_st_at(f, i)->name, e[i].name) == 0); /* header order = write order */
    CHECK(tk_st_at(f, n) == NULL);
    CHECK(tk_st_find(f, "absent") == NULL);
    CHECK(tk_st_metadata(f, "format") && strcmp(tk_st_metadata(f, "format"), "pt") == 0);
    CHECK(tk_st_metadata(f, "note") && strcmp(tk_st_metadata(f, "note"), meta[3]) == 0);
    CHECK(tk_st_metadata(f, "absent") == NULL);

    float out[8];
    const tk_st_tensor *t = tk_st_find(f, "w.f32");
    CHECK(t && t->dtype == TK_DT_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 &&
          t->numel == 6 && t->nbytes == 24);
    if (t) {
        CHECK(tk_st_read_f32(f, t, out, 6, &err) == 0);
        for (int i = 0; i < 6; i++) CHECK(same_float(out[i], f32[i]));
        const int64_t good[2] = {2, 3}, bad[2] = {3, 2};
        CHECK(tk_st_check_shape(f, t, 2, good, &err) == 0);
        CHECK(tk_st_check_shape(f, t, 2, bad, &err) != 0);
        check_msg(err.msg, path, "tensor 'w.f32': shape [2, 3] but expected [3, 2]");
        CHECK(tk_st_check_shape(f, t, 1, good, &err) != 0);
        CHECK(tk_st_read_f32(f, t, out, 5, &err) != 0);
        check_msg(err.msg, path, "6 elements");
    }
    t = tk_st_find(f, "w.f16");
    CHECK(t && t->dtype == TK_DT_F16 && t->numel == 6 && t->nbytes == 12);
    if (t) {
        CHECK(tk_st_read_f32(f, t, out, 6, &err) == 0);
        for (int i = 0; i < 6; i++) CHECK(same_float(out[i], f16_want[i]));
        CHECK(out[1] == ldexpf(1.0f, -24)); /* the smallest f16 subnormal */
    }
    t = tk_st_find(f, "w.bf16");
    CHECK(t && t->dtype == TK_DT_BF16 && t->numel == 4);
    if (t) {
        CHECK(tk_st_read_f32(f, t, out, 4, &err) == 0);
        for (int i = 0; i < 4; i++) CHECK(same_float(out[i], bf16_want[i]));
    }
    t = tk_st_find(f, "w.f64");
    CHECK(t && t->dtype == TK_DT_F64);
    if (t) {
        CHECK(tk_st_read_f32(f, t, out, 2, &err) == 0);
        CHECK(out[0] == 0.5f && out[1] == (float)-1e10);
    }
    t = tk_st_find(f, "ids");
    CHECK(t && t->dtype == TK_DT_I64 && t->numel == 3 && t->nbytes == 24);
    if (t) {
        int64_t got[3];
        memcpy(got, tk_st_data(f, t), sizeof got);
        CHECK(got[0] == ((int64_t)1 << 40) && got[1] == -7 && got[2] == 0);
        memset(err.msg, 0, sizeof err.msg);
        CHECK(tk_st_read_f32(f, t, out, 3, &err) != 0);
        check_msg(err.msg, path, "tensor 'ids': dtype I64 is not floating point");
    }
    t = tk_st_find(f, "i32");
    CHECK(t && t->dtype == TK_DT_I32 && t->ndim == 2 && memcmp(tk_st_data(f, t), i32, 8) == 0);
    t = tk_st_find(f, "u8");
    CHECK(t && t->dtype == TK_DT_U8 && memcmp(tk_st_data(f, t), u8, 3) == 0);
    t = tk_st_find(f, "mask");
    CHECK(t && t->dtype == TK_DT_BOOL && memcmp(tk_st_data(f, t), bl, 2) == 0);
    t = tk_st_find(f, "scalar");
    CHECK(t && t->ndim == 0 && t->numel == 1 && t->nbytes == 4);
    if (t) {
        CHECK(tk_st_read_f32(f, t, out, 1, &err) == 0 && out[0] == 3.25f);
        CHECK(tk_st_check_shape(f, t, 0, NULL, &err) == 0);
    }
    t = tk_st_find(f, "empty");
    CHECK(t && t->ndim == 2 && t->shape[0] == 0 && t->numel == 0 && t->nbytes == 0);
    if (t) CHECK(tk_st_read_f32(f, t, out, 0, &err) == 0);
    t = tk_st_find(f, weird);
    CHECK(t != NULL);
    if (t) CHECK(tk_st_read_f32(f, t, out, 1, &err) == 0 && out[0] == 3.25f);
    tk_st_close(f);
    tk_st_close(NULL);
    case_end(NULL);
}

static void test_empty_and_unaligned(void) {
    case_begin("zero tensors; unaligned offsets; padding");
    char path[512];
    tk_err err = {0};
    /* writer with no tensors and no metadata */
    P(path, "none.safetensors");
    CHECK(tk_st_write(path, NULL, 0, NULL, &err) == 0);
    tk_st_file *f = tk_st_open(path, &err);
    CHECK(f && tk_st_count(f) == 0 && tk_st_find(f, "x") == NULL && tk_st_at(f, 0) == NULL);
    tk_st_close(f);

    /* hand-made: F32 at offset 1 and F16 at offset 9 (unaligned), trailing tab/newline padding,
     * a zero-byte tensor inside another tensor's range, unknown extra fields ignored */
    P(path, "unaligned.safetensors");
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9],\"x\":1},"
                    "\"b\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[9,11]},"
                    "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}} \t\n";
    unsigned char data[12] = {0};
    const float av[2] = {1.5f, -7.0f};
    memcpy(data + 1, av, 8);
    data[9] = 0x00, data[10] = 0x3C; /* f16 1.0, little-endian */
    CHECK(write_raw(path, strlen(h), h, strlen(h), data, sizeof data) == 0);
    f = tk_st_open(path, &err);
    CHECK(f != NULL);
    if (f) {
        float out[2];
        const tk_st_tensor *t = tk_st_find(f, "a");
        CHECK(t && t->offset == 1 && tk_st_read_f32(f, t, out, 2, &err) == 0);
        CHECK(out[0] == 1.5f && out[1] == -7.0f);
        t = tk_st_find(f, "b");
        CHECK(t && tk_st_read_f32(f, t, out, 1, &err) == 0 && out[0] == 1.0f);
        t = tk_st_find(f, "z");
        CHECK(t && t->numel == 0);
    } else {
        printf("\n    %s\n", err.msg);
    }
    tk_st_close(f);
    case_end(NULL);
}

/* Every 16-bit pattern as F16 and BF16 (131072 elements each with a repeat: past the parallel
 * threshold), converted and compared with the scalar reference conversions. */
static void test_large_conversion(void) {
    case_begin("F16/BF16 all 65536 patterns, parallel path");
    char path[512];
    P(path, "large.safetensors");
    size_t n = 131072;
    uint16_t *bits = malloc(n * sizeof *bits);
    float *out = malloc(n * sizeof *out);
    CHECK(bits && out);
    if (bits && out) {
        for (size_t i = 0; i < n; i++) bits[i] = (uint16_t)(i * 40503u); /* odd: a permutation */
        tk_st_entry e[2] = {{"h", TK_DT_F16, 2, {256, 512}, bits},
                            {"b", TK_DT_BF16, 2, {512, 256}, bits}};
        tk_err err = {0};
        CHECK(tk_st_write(path, e, 2, NULL, &err) == 0);
        tk_st_file *f = tk_st_open(path, &err);
        CHECK(f != NULL);
        const tk_st_tensor *t = f ? tk_st_find(f, "h") : NULL;
        CHECK(t && tk_st_read_f32(f, t, out, n, &err) == 0);
        size_t bad = 0;
        for (size_t i = 0; t && i < n; i++) bad += !same_float(out[i], tk_f16_to_f32(bits[i]));
        t = f ? tk_st_find(f, "b") : NULL;
        CHECK(t && tk_st_read_f32(f, t, out, n, &err) == 0);
        for (size_t i = 0; t && i < n; i++) bad += !same_float(out[i], tk_bf16_to_f32(bits[i]));
        CHECK(bad == 0);
        tk_st_close(f);
    }
    free(bits);
    free(out);
    unlink(path);
    case_end(NULL);
}

/* ---- writer: validation and atomicity ------------------------------------------------------------ */

static int file_equals(const char *path, const void *want, size_t want_len) {
    size_t len = 0;
    tk_err err = {0};
    char *got = tk_read_file(path, &len, &err);
    int same = got && len == want_len && memcmp(got, want, len) == 0;
    free(got);
    return same;
}

static void test_write_atomic(void) {
    char path[512], path2[512];
    tk_err err = {0};
    const float one = 1.0f;
    const float two[2] = {2.0f, 3.0f};

    case_begin("write: into a missing directory");
    int before = count_entries(g_dir, NULL);
    P(path, "nodir/x.safetensors");
    tk_st_entry e1 = {"a", TK_DT_F32, 1, {1}, &one};
    CHECK(tk_st_write(path, &e1, 1, NULL, &err) != 0);
    check_msg(err.msg, path, "No such file or directory");
    struct stat st;
    CHECK(stat(P(path2, "nodir"), &st) != 0 && errno == ENOENT);
    CHECK(count_entries(g_dir, NULL) == before);
    case_end(err.msg);

    case_begin("write: overwrite replaces the file");
    P(path, "over.safetensors");
    CHECK(tk_st_write(path, &e1, 1, NULL, &err) == 0);
    tk_st_entry e2[2] = {{"b", TK_DT_F32, 1, {2}, two}, {"c", TK_DT_F32, 0, {0}, &one}};
    CHECK(tk_st_write(path, e2, 2, NULL, &err) == 0);
    tk_st_file *f = tk_st_open(path, &err);
    CHECK(f && tk_st_count(f) == 2 && tk_st_find(f, "a") == NULL);
    if (f) {
        float out[2] = {0};
        const tk_st_tensor *t = tk_st_find(f, "b");
        CHECK(t && tk_st_read_f32(f, t, out, 2, &err) == 0 && out[0] == 2.0f && out[1] == 3.0f);
    }
    tk_st_close(f);
    CHECK(count_entries(g_dir, ".tmp.") == 0);
    case_end(NULL);

    /* invalid requests fail before touching anything */
    size_t old_len = 0;
    char *old = tk_read_file(path, &old_len, &err);
    CHECK(old != NULL);
    struct {
        const char *name;
        tk_st_entry e[2];
        size_t n;
        const char *const *meta;
        const char *expect;
    } bad[] = {
        {"write: duplicate names rejected",
         {{"d", TK_DT_F32, 1, {1}, &one}, {"d", TK_DT_F32, 1, {1}, &one}}, 2, NULL, "'d' given twice"},
        {"write: bad dtype rejected", {{"d", (tk_dtype)99, 1, {1}, &one}}, 1, NULL, "dtype 99"},
        {"write: negative dim rejected", {{"d", TK_DT_F32, 1, {-1}, &one}}, 1, NULL, "shape[0] is -1"},
        {"write: ndim 9 rejected", {{"d", TK_DT_F32, 9, {1}, &one}}, 1, NULL, "ndim 9"},
        {"write: NULL data rejected", {{"d", TK_DT_F32, 1, {1}, NULL}}, 1, NULL, "data is NULL"},
        {"write: __metadata__ name rejected", {{"__metadata__", TK_DT_F32, 1, {1}, &one}}, 1, NULL,
         "reserved"},
        {"write: invalid UTF-8 name rejected", {{"\xff", TK_DT_F32, 1, {1}, &one}}, 1, NULL,
         "tensor '\\xff': name is not valid UTF-8"},
        {"write: metadata without value", {{"d", TK_DT_F32, 1, {1}, &one}}, 1,
         (const char *const[]){"k", NULL, NULL}, "no value"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        case_begin(bad[i].name);
        memset(err.msg, 0, sizeof err.msg);
        CHECK(tk_st_write(path, bad[i].e, bad[i].n, bad[i].meta, &err) != 0);
        check_msg(err.msg, path, bad[i].expect);
        CHECK(old && file_equals(path, old, old_len));
        CHECK(count_entries(g_dir, ".tmp.") == 0);
        case_end(err.msg);
    }

    /* a failure in the middle of writing data (file size limit: EFBIG) */
    case_begin("write: failure mid-write leaves old file");
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_FSIZE, &saved) == 0);
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    size_t big_n = 16384;
    float *big = calloc(big_n, sizeof *big);
    CHECK(big != NULL);
    struct rlimit lim = saved;
    lim.rlim_cur = 4096;
    int limited = big && (saved.rlim_cur == RLIM_INFINITY || saved.rlim_cur > 4096) &&
                  setrlimit(RLIMIT_FSIZE, &lim) == 0;
    CHECK(limited);
    if (limited) {
        tk_st_entry eb = {"big", TK_DT_F32, 1, {(int64_t)big_n}, big};
        memset(err.msg, 0, sizeof err.msg);
        int rc = tk_st_write(path, &eb, 1, NULL, &err);
        CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);
        CHECK(rc != 0);
        check_msg(err.msg, path, "File too large");
        CHECK(old && file_equals(path, old, old_len));
        CHECK(count_entries(g_dir, ".tmp.") == 0);
    }
    signal(SIGXFSZ, old_handler);
    free(big);
    case_end(err.msg);
    free(old);

    case_begin("write: path is a directory");
    P(path, "adir");
    CHECK(mkdir(path, 0755) == 0);
    memset(err.msg, 0, sizeof err.msg);
    CHECK(tk_st_write(path, &e1, 1, NULL, &err) != 0);
    check_msg(err.msg, path, "adir");
    CHECK(stat(path, &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(count_entries(g_dir, ".tmp.") == 0);
    case_end(err.msg);
}

/* ---- malformed files ------------------------------------------------------------------------------ */

static void test_malformed(void) {
    char path[512];
    static const struct {
        const char *name;
        const char *header;
        size_t data_len;
        const char *expect;
    } cases[] = {
        {"bad: header too short", "{", 0, "header length 1"},
        {"bad: non-JSON header", "this is not json", 0, "not valid JSON"},
        {"bad: JSON array header", "[1, 2, 3]", 0, "header is a JSON array but expected an object"},
        {"bad: JSON string header", "\"x\"", 0, "JSON string"},
        {"bad: trailing garbage", "{} x", 0, "after the JSON object"},
        {"bad: entry not an object", "{\"a\": 5}", 0, "tensor 'a': entry is a JSON number"},
        {"bad: unknown dtype",
         "{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8,
         "tensor 'a': unknown dtype 'Q4'"},
        {"bad: dtype not a string",
         "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "dtype is 4"},
        {"bad: dtype missing", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 8,
         "dtype is missing"},
        {"bad: dtype case", "{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
         8, "unknown dtype 'f32'"},
        {"bad: duplicate field",
         "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8,
         "field 'dtype' appears twice"},
        {"bad: shape not an array",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", 16, "shape is 4"},
        {"bad: shape missing", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}", 16,
         "shape is missing"},
        {"bad: negative shape",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 8,
         "tensor 'a': shape[0] is -1 but expected a non-negative integer"},
        {"bad: non-integer shape",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 8,
         "shape[0] is 1.5"},
        {"bad: string in shape",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8,
         "shape[0] is a JSON string"},
        {"bad: shape above 2^53",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e17],\"data_offsets\":[0,4]}}", 8,
         "shape[0] is 1e+17"},
        {"bad: shape product overflow",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,4]}}",
         8, "more elements than fit"},
        {"bad: shape bytes overflow",
         "{\"a\":{\"dtype\":\"I64\",\"shape\":[9007199254740992,1024],\"data_offsets\":[0,8]}}", 8,
         "needs more bytes than fit"},
        {"bad: nine dims",
         "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 8,
         "9 dims but at most 8"},
        {"bad: data_offsets missing", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 8,
         "data_offsets is missing"},
        {"bad: data_offsets wrong length",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 8, "wrong length"},
        {"bad: data_offsets negative",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-4,4]}}", 8,
         "data_offsets [-4, 4]"},
        {"bad: data_offsets out of range",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[250],\"data_offsets\":[0,1000]}}", 16,
         "data_offsets [0, 1000] end past the 16-byte data section"},
        {"bad: data_offsets begin > end",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16, "begin <= end"},
        {"bad: offsets/shape size mismatch",
         "{\"model.norm.weight\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,12]}}", 16,
         "tensor 'model.norm.weight': data_offsets [0, 12] hold 12 bytes but shape [4] of F16 "
         "needs 8"},
        {"bad: overlapping tensors",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
         24, "tensor 'b' data_offsets [8, 24] overlap tensor 'a' [0, 16]"},
        {"bad: identical ranges",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
         "\"b\":{\"dtype\":\"I32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
         16, "overlap"},
        {"bad: truncated data section",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]}}", 32,
         "end past the 32-byte data section (file truncated?)"},
        {"bad: duplicate tensor names",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
         8, "tensor 'a' appears twice"},
        {"bad: metadata not an object", "{\"__metadata__\":[1]}", 0,
         "__metadata__ is a JSON array"},
        {"bad: metadata value not a string", "{\"__metadata__\":{\"k\":1}}", 0,
         "__metadata__ key 'k' has a JSON number value"},
        {"bad: metadata twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
         "__metadata__ appears twice"},
        {"bad: name with newline stays one line",
         "{\"a\\nb\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8,
         "tensor 'a\\x0ab'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char file[64];
        snprintf(file, sizeof file, "bad%02zu.safetensors", i);
        P(path, file);
        if (write_header(path, cases[i].header, cases[i].data_len) != 0) {
            printf("cannot write %s\n", path);
            g_failures++;
            continue;
        }
        expect_open_fail(cases[i].name, path, cases[i].expect);
    }

    P(path, "empty.safetensors");
    CHECK(write_bytes(path, "", 0) == 0);
    expect_open_fail("bad: empty file", path, "file is 0 bytes but expected at least 8");

    P(path, "four.safetensors");
    CHECK(write_bytes(path, "\x10\0\0\0", 4) == 0);
    expect_open_fail("bad: 4-byte file", path, "file is 4 bytes");

    P(path, "hlen_big.safetensors");
    CHECK(write_raw(path, 1000, "{}        ", 10, NULL, 0) == 0);
    expect_open_fail("bad: header length larger than file", path,
                     "header length 1000 exceeds the 10 bytes");

    P(path, "hlen_huge.safetensors");
    CHECK(write_raw(path, (uint64_t)1 << 63, "{}        ", 10, NULL, 0) == 0);
    expect_open_fail("bad: header length 2^63", path, "header length 9223372036854775808");

    P(path, "hlen_max.safetensors");
    CHECK(write_raw(path, UINT64_MAX, "{}", 2, NULL, 0) == 0);
    expect_open_fail("bad: header length 2^64-1", path, "header length 18446744073709551615");

    /* a 101 MB header (sparse file: costs no disk) is over the 100 MB cap */
    P(path, "hlen_cap.safetensors");
    {
        uint64_t h = (uint64_t)101 << 20;
        int ok = write_raw(path, h, "{", 1, NULL, 0) == 0 && truncate(path, (off_t)(8 + h)) == 0;
        CHECK(ok);
        expect_open_fail("bad: header over the 100 MB cap", path, "exceeds the 104857600-byte limit");
        unlink(path); /* do not keep 101 MB around, even sparse */
    }

    /* 5000 nested arrays: well-formed, but past cJSON's nesting limit; must fail, not recurse away */
    P(path, "deep.safetensors");
    {
        size_t depth = 5000, len = 0;
        char *h = malloc(2 * depth + 16);
        CHECK(h != NULL);
        if (h) {
            len += (size_t)sprintf(h, "{\"a\":");
            for (size_t i = 0; i < depth; i++) h[len++] = '[';
            for (size_t i = 0; i < depth; i++) h[len++] = ']';
            h[len++] = '}';
            CHECK(write_raw(path, len, h, len, NULL, 0) == 0);
            free(h);
            expect_open_fail("bad: 5000-deep nesting", path, "not valid JSON");
        }
    }

    P(path, "utf8.safetensors");
    {
        const char h[] = "{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        CHECK(write_raw(path, sizeof h - 1, h, sizeof h - 1, NULL, 8) == 0);
        expect_open_fail("bad: invalid UTF-8 in header", path, "is 0xff but expected UTF-8");
    }
    P(path, "overlong.safetensors");
    {
        const char h[] = "{\"\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        CHECK(write_raw(path, sizeof h - 1, h, sizeof h - 1, NULL, 8) == 0);
        expect_open_fail("bad: overlong UTF-8 in header", path, "header byte 2 (file offset 10)");
    }
    P(path, "cut_utf8.safetensors");
    {
        /* a 3-byte sequence cut off by the header's end; the data section follows */
        const char h[] = "{}   \xe2\x82";
        CHECK(write_raw(path, sizeof h - 1, h, sizeof h - 1, "\xac\0\0\0", 4) == 0);
        expect_open_fail("bad: UTF-8 cut at header end", path, "header byte 5 (file offset 13) is 0xe2");
    }
    P(path, "nul.safetensors");
    {
        const char h[] = "{\"a\0b\":{}}   ";
        CHECK(write_raw(path, sizeof h - 1, h, sizeof h - 1, NULL, 0) == 0);
        expect_open_fail("bad: NUL byte in header", path, "header byte 3 (file offset 11) is 0x00");
    }

    P(path, "adir_open");
    CHECK(mkdir(path, 0755) == 0);
    expect_open_fail("bad: directory instead of file", path, "not a regular file");

    P(path, "does_not_exist.safetensors");
    expect_open_fail("bad: missing file", path, "cannot open: No such file or directory");
}

/* ---- sharded sets --------------------------------------------------------------------------------- */

static const float g_a[2] = {1.0f, -1.0f};
static const uint16_t g_b[2] = {0x3F80, 0x4000}; /* bf16 1.0, 2.0 */
static const uint16_t g_c[1] = {0x3C00};         /* f16 1.0 */

/* Writes the two standard shards into dir/sub. */
static int write_shards(const char *sub, tk_err *err) {
    char d[512], p[600];
    P(d, sub);
    if (mkdir(d, 0755) != 0) return -1;
    tk_st_entry s1[3] = {{"a", TK_DT_F32, 1, {2}, g_a},
                         {"b", TK_DT_BF16, 1, {2}, g_b},
                         {"unlisted", TK_DT_F32, 1, {2}, g_a}};
    tk_st_entry s2[1] = {{"c", TK_DT_F16, 1, {1}, g_c}};
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", d);
    if (tk_st_write(p, s1, 3, NULL, err) != 0) return -1;
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", d);
    return tk_st_write(p, s2, 1, NULL, err);
}

static int write_index(const char *sub, const char *json) {
    char p[512], name[300];
    snprintf(name, sizeof name, "%s/model.safetensors.index.json", sub);
    return write_bytes(P(p, name), json, strlen(json));
}

static void expect_set_fail(const char *name, const char *sub, const char *must1, const char *must2) {
    case_begin(name);
    char d[512];
    P(d, sub);
    tk_err err = {0};
    tk_st_set *s = tk_st_set_open(d, &err);
    CHECK(s == NULL);
    tk_st_set_close(s);
    CHECK(err.msg[0] != '\0' && strchr(err.msg, '\n') == NULL);
    CHECK(strstr(err.msg, sub) != NULL);
    if (must1) CHECK(strstr(err.msg, must1) != NULL);
    if (must2) CHECK(strstr(err.msg, must2) != NULL);
    case_end(err.msg);
}

static void test_sets(void) {
    char d[512], p[600];
    tk_err err = {0};

    case_begin("set: sharded checkpoint");
    CHECK(write_shards("sharded", &err) == 0);
    CHECK(write_index("sharded",
                      "{\"metadata\":{\"total_size\":20},\"weight_map\":{"
                      "\"a\":\"model-00001-of-00002.safetensors\","
                      "\"c\":\"model-00002-of-00002.safetensors\","
                      "\"b\":\"model-00001-of-00002.safetensors\"}}") == 0);
    tk_st_set *s = tk_st_set_open(P(d, "sharded"), &err);
    CHECK(s != NULL);
    if (s) {
        const tk_st_file *fa = NULL, *fb = NULL, *fc = NULL, *fx = (const tk_st_file *)s;
        const tk_st_tensor *ta = tk_st_set_find(s, "a", &fa);
        const tk_st_tensor *tb = tk_st_set_find(s, "b", &fb);
        const tk_st_tensor *tc = tk_st_set_find(s, "c", &fc);
        CHECK(ta && tb && tc && fa && fa == fb && fc && fc != fa);
        CHECK(fa && strstr(tk_st_path(fa), "model-00001-of-00002.safetensors"));
        CHECK(fc && strstr(tk_st_path(fc), "model-00002-of-00002.safetensors"));
        float out[2];
        if (ta && fa) CHECK(tk_st_read_f32(fa, ta, out, 2, &err) == 0 && out[0] == 1.0f && out[1] == -1.0f);
        if (tb && fb) CHECK(tk_st_read_f32(fb, tb, out, 2, &err) == 0 && out[0] == 1.0f && out[1] == 2.0f);
        if (tc && fc) CHECK(tk_st_read_f32(fc, tc, out, 1, &err) == 0 && out[0] == 1.0f);
        CHECK(tk_st_set_find(s, "zzz", &fx) == NULL && fx == NULL);
        CHECK(tk_st_set_find(s, "unlisted", NULL) == NULL); /* the weight_map is authoritative */
        CHECK(tk_st_set_find(s, "a", NULL) == ta);
    } else {
        printf("\n    %s\n", err.msg);
    }
    tk_st_set_close(s);
    tk_st_set_close(NULL);
    case_end(NULL);

    case_begin("set: single model.safetensors");
    P(d, "single");
    CHECK(mkdir(d, 0755) == 0);
    snprintf(p, sizeof p, "%s/model.safetensors", d);
    tk_st_entry e = {"a", TK_DT_F32, 1, {2}, g_a};
    CHECK(tk_st_write(p, &e, 1, NULL, &err) == 0);
    s = tk_st_set_open(d, &err);
    CHECK(s != NULL);
    if (s) {
        const tk_st_file *f = NULL;
        const tk_st_tensor *t = tk_st_set_find(s, "a", &f);
        CHECK(t && f && strcmp(tk_st_path(f), p) == 0);
        CHECK(tk_st_set_find(s, "b", &f) == NULL && f == NULL);
    }
    tk_st_set_close(s);
    case_end(NULL);

    P(d, "emptydir");
    CHECK(mkdir(d, 0755) == 0);
    expect_set_fail("set bad: empty directory", "emptydir",
                    "no model.safetensors or model.safetensors.index.json", NULL);
    expect_set_fail("set bad: missing directory", "nosuchdir", "cannot open checkpoint directory",
                    NULL);

    CHECK(write_shards("missing_shard", &err) == 0);
    CHECK(write_index("missing_shard", "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                                       "\"c\":\"model-00009-of-00009.safetensors\"}}") == 0);
    expect_set_fail("set bad: index names a missing shard", "missing_shard",
                    "model-00009-of-00009.safetensors: cannot open", "index.json");

    CHECK(write_shards("ghost", &err) == 0);
    CHECK(write_index("ghost", "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                               "\"ghost\":\"model-00002-of-00002.safetensors\"}}") == 0);
    expect_set_fail("set bad: tensor absent from its shard", "ghost",
                    "model-00002-of-00002.safetensors: tensor 'ghost' is listed in", "index.json");

    CHECK(write_shards("dotdot", &err) == 0);
    CHECK(write_index("dotdot", "{\"weight_map\":{\"a\":\"../dotdot/model-00001-of-00002.safetensors\"}}") == 0);
    expect_set_fail("set bad: shard name with ../", "dotdot", "no '/' or '..'", "index.json");

    CHECK(write_shards("slash", &err) == 0);
    CHECK(write_index("slash", "{\"weight_map\":{\"a\":\"/etc/passwd\"}}") == 0);
    expect_set_fail("set bad: shard name with /", "slash", "names shard '/etc/passwd'", NULL);

    CHECK(write_shards("notjson", &err) == 0);
    CHECK(write_index("notjson", "{\"weight_map\": ") == 0);
    expect_set_fail("set bad: index not JSON", "notjson", "index.json: not valid JSON", NULL);

    CHECK(write_shards("nomap", &err) == 0);
    CHECK(write_index("nomap", "{\"metadata\":{}}") == 0);
    expect_set_fail("set bad: index without weight_map", "nomap", "\"weight_map\" is missing", NULL);

    CHECK(write_shards("mapnum", &err) == 0);
    CHECK(write_index("mapnum", "{\"weight_map\":{\"a\":3}}") == 0);
    expect_set_fail("set bad: weight_map value not a string", "mapnum",
                    "weight_map entry 'a' is a JSON number", NULL);

    CHECK(write_shards("mapdup", &err) == 0);
    CHECK(write_index("mapdup", "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                                "\"a\":\"model-00002-of-00002.safetensors\"}}") == 0);
    expect_set_fail("set bad: weight_map names a tensor twice", "mapdup", "tensor 'a' twice", NULL);

    P(d, "badsingle");
    CHECK(mkdir(d, 0755) == 0);
    snprintf(p, sizeof p, "%s/model.safetensors", d);
    CHECK(write_bytes(p, "abc", 3) == 0);
    expect_set_fail("set bad: malformed model.safetensors", "badsingle",
                    "model.safetensors: file is 3 bytes", NULL);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_st_test_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_round_trip();
    test_empty_and_unaligned();
    test_large_conversion();
    test_write_atomic();
    test_malformed();
    test_sets();
    rm_rf(g_dir);
    if (g_failures) {
        printf("test_safetensors: %d check(s) FAILED\n", g_failures);
        return 1;
    }
    printf("test_safetensors: all passed\n");
    return 0;
}
