/* common.h: errors, asserts, allocation and number conversion shared by every tspeft module.
 *
 *   tk_err err = {0};
 *   if (tk_something(..., &err) != 0) { fprintf(stderr, "tspeft: %s\n", err.msg); return 1; }
 *
 * Failure rule: library functions return 0 on success and -1 on failure (or NULL), after writing one
 * line into err->msg naming the file, offset or tensor, what was found and what was expected. Only the
 * CLI prints. Internal invariants use TK_ASSERT, which stays on with NDEBUG.
 */
#ifndef TK_COMMON_H
#define TK_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    char msg[1024];
} tk_err;

/* Writes a printf-style message into err (when err is not NULL); returns -1 so callers can
 * `return tk_fail(err, ...)`. */
int tk_fail(tk_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Puts "prefix: " before the message unless it already starts with it; returns -1. */
int tk_err_prefix(tk_err *err, const char *prefix);
/* Replaces control bytes in the message so it prints on one line. */
void tk_err_one_line(tk_err *err);

/* Always-on assertion for internal invariants: prints file:line and aborts. */
#define TK_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) tk_assert_fail(#cond, __FILE__, __LINE__);                                    \
    } while (0)
void tk_assert_fail(const char *cond, const char *file, int line) __attribute__((noreturn));

/* 64-byte aligned allocation, zero-filled; NULL on failure (or on n == 0). Free with tk_free. */
void *tk_calloc(size_t n, size_t size);
void tk_free(void *p);
/* p[0..n) = 0, split over the OpenMP threads when n is large (the backward's zero-fills before it
 * accumulates, run as serial memsets, cost about 3% of a training step). */
void tk_zero_floats(float *p, size_t n);
/* 1 where this CPU has AVX-512F and the environment variable env is not set to off (the switch that
 * sends an AVX-512 kernel's work back to cblas_sgemm, for tests and comparisons). */
int tk_avx512_allowed(const char *env, const char *off);

/* Overflow-checked a*b: returns 0 and sets *out, or -1 when the product does not fit in size_t. */
int tk_mul_size(size_t a, size_t b, size_t *out);

/* IEEE half and bfloat16 to float (exact), float to bfloat16 (round to nearest even). */
float tk_f16_to_f32(uint16_t h);
float tk_bf16_to_f32(uint16_t b);
uint16_t tk_f32_to_bf16(float f);
uint16_t tk_f32_to_f16(float f);

/* On a hot element-wise function of the portable build (-DTSPEFT_NATIVE=OFF): gcc builds it for AVX2
 * and for the baseline (x86-64-v2) and picks one when the program loads (an ifunc). Its double sums
 * then run 4 lanes wide instead of 2 (gate norms, softmax rows). Results can differ in the last bits
 * between the two builds (the sums' order follows the vector width), never between runs on one
 * machine. Off in the native build (already built for this CPU), for clang and the sanitizers. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) &&             \
    !defined(TK_NATIVE_BUILD)
#define TK_HOT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TK_HOT_CLONES
#endif

/* Loops over fewer elements than this run on one thread: waking the OpenMP pool costs more than
 * the work (it dominated the step time of tiny models, and spinning threads hurt a loaded machine). */
#define TK_OMP_MIN_WORK 32768

/* Sets the thread count for both OpenMP and OpenBLAS (the OpenMP build of OpenBLAS shares our pool;
 * the two kernels that call BLAS inside a parallel region, attention and the fused LoRA branch, rely
 * on it running single-threaded there). t <= 0 means the number of online CPUs. Returns the count. */
int tk_set_threads(int t);

/* Reads a whole file into a NUL-terminated buffer; NULL with err set on failure. Caller frees. */
char *tk_read_file(const char *path, size_t *len, tk_err *err);
/* mkdir -p dir (each existing component must be a directory). */
int tk_mkdir_p(const char *dir, tk_err *err);
/* mkdir -p of the directory part of path (nothing when path has none). */
int tk_mkdir_parent(const char *path, tk_err *err);

/* Writes len bytes to path atomically: path.tmp.<pid>, fsync, rename. An existing file at path is
 * left untouched on failure. */
int tk_write_file_atomic(const char *path, const void *data, size_t len, tk_err *err);

/* snprintf for paths: -1 with err set when the result does not fit in n bytes. */
int tk_pathf(char *out, size_t n, tk_err *err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Wall clock in seconds (monotonic). */
double tk_time(void);

#endif
