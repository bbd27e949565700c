/* common.c: see common.h. */
#include "common.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int tk_fail(tk_err *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        tk_err_one_line(err);
    }
    return -1;
}

/* Strings quoted from input files (a JSON name with a newline, say) must not split the one-line
 * error: control bytes become '?'. */
void tk_err_one_line(tk_err *err) {
    for (char *c = err->msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
}

int tk_err_prefix(tk_err *err, const char *prefix) {
    if (!err || strncmp(err->msg, prefix, strlen(prefix)) == 0) return -1;
    char tmp[sizeof err->msg];
    size_t n = strlen(prefix);
    if (n > sizeof tmp - 3) n = sizeof tmp - 3;
    memcpy(tmp, prefix, n);
    memcpy(tmp + n, ": ", 2);
    size_t room = sizeof tmp - n - 2;
    size_t m = strnlen(err->msg, room - 1);
    memcpy(tmp + n + 2, err->msg, m);
    tmp[n + 2 + m] = '\0';
    memcpy(err->msg, tmp, sizeof tmp);
    tk_err_one_line(err);
    return -1;
}

void tk_assert_fail(const char *cond, const char *file, int line) {
    fprintf(stderr, "tspeft: internal error: %s:%d: assertion failed: %s\n", file, line, cond);
    abort();
}

/* Blocks from this size up are 2 MiB aligned and asked to be backed by transparent huge pages. The
 * frozen weights are read once per matmul by OpenBLAS's packing, whose strided reads across weight
 * rows each touch another 4 KiB page: with huge pages the same cold-weight sgemm ran 8-10% faster
 * (2048 x 768 weights cycled through, 2 threads: 198-240 -> 237-273 GFLOP/s). The advice is made
 * before the zero-fill faults the pages in; where THP is off it does nothing. */
#define TK_HUGE_MIN ((size_t)4 << 20)
#define TK_HUGE_ALIGN ((size_t)2 << 20)

void *tk_calloc(size_t n, size_t size) {
    size_t bytes;
    if (n == 0 || size == 0 || tk_mul_size(n, size, &bytes) != 0) return NULL;
    size_t align = bytes >= TK_HUGE_MIN ? TK_HUGE_ALIGN : 64;
    size_t rounded = (bytes + align - 1) & ~(align - 1);
    if (rounded < bytes) return NULL;
    void *p = aligned_alloc(align, rounded);
    if (!p) return NULL;
#ifdef MADV_HUGEPAGE
    if (align == TK_HUGE_ALIGN) (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
    memset(p, 0, rounded);
    return p;
}

void tk_free(void *p) { free(p); }

void tk_zero_floats(float *p, size_t n) {
    if (n < ((size_t)1 << 18)) { /* 1 MiB: below it, waking the pool costs more than it saves */
        memset(p, 0, n * sizeof *p);
        return;
    }
#pragma omp parallel
    {
        size_t t = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
        size_t a = n * t / nt, b = n * (t + 1) / nt;
        memset(p + a, 0, (b - a) * sizeof *p);
    }
}

int tk_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

float tk_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t tk_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float tk_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t tk_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow to inf */
    if (a < 0x38800000u) {                                  /* subnormal or zero */
        float af;
        memcpy(&af, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return (uint16_t)(sign | (r >> 13));
}

int tk_set_threads(int t) {
    if (t <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        t = n > 0 ? (int)n : 1;
    }
    omp_set_num_threads(t);
    openblas_set_num_threads(t);
    return t;
}

char *tk_read_file(const char *path, size_t *len, tk_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        tk_fail(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        tk_fail(err, "%s: cannot stat: %s", path, strerror(errno));
        fclose(f);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        fclose(f);
        tk_fail(err, "%s: not a regular file%s", path, S_ISDIR(st.st_mode) ? " (it is a directory)" : "");
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        tk_fail(err, "%s: cannot seek", path);
        return NULL;
    }
    long n = ftell(f);
    if (n < 0) {
        fclose(f);
        tk_fail(err, "%s: cannot tell size", path);
        return NULL;
    }
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) {
        fclose(f);
        tk_fail(err, "%s: out of memory reading %ld bytes", path, n);
        return NULL;
    }
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    if (got != (size_t)n) {
        free(buf);
        tk_fail(err, "%s: short read (%zu of %ld bytes)", path, got, n);
        return NULL;
    }
    buf[n] = '\0';
    if (len) *len = (size_t)n;
    return buf;
}

double tk_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int tk_write_file_atomic(const char *path, const void *data, size_t len, tk_err *err) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return tk_fail(err, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return tk_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    int ok = fwrite(data, 1, len, f) == len;
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int saved = errno;
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        remove(tmp);
        return tk_fail(err, "%s: write failed: %s", path, strerror(saved ? saved : errno));
    }
    if (rename(tmp, path) != 0) {
        saved = errno;
        remove(tmp);
        return tk_fail(err, "%s: cannot rename into place: %s", path, strerror(saved));
    }
    return 0;
}

int tk_pathf(char *out, size_t n, tk_err *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= n) return tk_fail(err, "path too long: %.200s...", out);
    return 0;
}

int tk_mkdir_p(const char *dir, tk_err *err) {
    char buf[4096];
    if (tk_pathf(buf, sizeof buf, err, "%s", dir) != 0) return -1;
    if (!buf[0]) return 0;
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return tk_fail(err, "%s: cannot create directory: %s", buf, strerror(errno));
            struct stat sb;
            if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode)) return tk_fail(err, "%s: exists and is not a directory", buf);
            *p = c;
            if (c == '\0') break;
        }
    }
    return 0;
}

int tk_mkdir_parent(const char *path, tk_err *err) {
    char buf[4096];
    if (tk_pathf(buf, sizeof buf, err, "%s", path) != 0) return -1;
    char *slash = strrchr(buf, '/');
    if (!slash || slash == buf) return 0;
    *slash = '\0';
    return tk_mkdir_p(buf, err);
}

int tk_avx512_allowed(const char *env, const char *off) {
    const char *v = getenv(env);
    if (v && strcmp(v, off) == 0) return 0;
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}
