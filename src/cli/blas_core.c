/* blas_core.c: make OpenBLAS use the kernels this CPU can run.
 *
 * OpenBLAS built with DYNAMIC_ARCH (Debian's) picks its kernels from the CPU model number when the
 * library loads. A model newer than the library (Debian 12's 0.3.21 on Emerald Rapids, model 207)
 * falls back to "Prescott", its SSE3 kernels: cblas_sgemm then reads 60 GFLOP/s on two cores that
 * give 300 with the AVX-512 kernels. OPENBLAS_CORETYPE chooses the kernels instead, but OpenBLAS reads
 * it only as it loads, before main; so when the library chose a pre-AVX2 core on a CPU that has AVX2
 * and FMA (or AVX-512), tspeft sets it from the CPU's features and runs itself again (execv of
 * /proc/self/exe, same arguments). A user's own OPENBLAS_CORETYPE is always left as it is.
 */
#include "blas_core.h"

#include "ops/blas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *openblas_get_corename(void);

/* OpenBLAS's names for cores older than AVX2: what its DYNAMIC_ARCH detection falls back to. */
static int pre_avx2_core(const char *name) {
    static const char *const old[] = {"Unknown", "Katmai",  "Coppermine", "Northwood", "Prescott", "Banias",
                                      "Atom",    "Core2",   "Penryn",     "Dunnington", "Nehalem", "Sandybridge",
                                      "Opteron", "Opteron(SSE3)", "Barcelona", "Nano",  "Bobcat",  "Bulldozer"};
    for (size_t i = 0; i < sizeof old / sizeof old[0]; i++)
        if (strcmp(name, old[i]) == 0) return 1;
    return 0;
}

/* The OpenBLAS core type this CPU's features allow, or NULL. */
static const char *core_for_cpu(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512cd"))
        return __builtin_cpu_supports("avx512bf16") ? "Cooperlake" : "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return NULL;
}

const char *tk_blas_core_name(void) { return openblas_get_corename(); }

const char *tk_blas_core_detected(void) { return getenv("TSPEFT_BLAS_CORE_DETECTED"); }

void tk_blas_core_fix(char **argv) {
    if (getenv("OPENBLAS_CORETYPE")) return; /* the user's choice, or this function's in the run before */
    const char *have = openblas_get_corename(), *want = core_for_cpu();
    if (!have || !want || !pre_avx2_core(have)) return;
    /* what OpenBLAS chose by itself, for `tspeft bench` to report after the exec */
    if (setenv("TSPEFT_BLAS_CORE_DETECTED", have, 1) != 0 || setenv("OPENBLAS_CORETYPE", want, 1) != 0) return;
    fflush(NULL);
    execv("/proc/self/exe", argv);
    /* still here: carry on with the slow kernels, and say so once */
    fprintf(stderr, "tspeft: warning: OpenBLAS chose its %s kernels for this CPU and restarting with "
                    "OPENBLAS_CORETYPE=%s failed; set OPENBLAS_CORETYPE=%s for full speed\n", have, want, want);
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv("TSPEFT_BLAS_CORE_DETECTED");
}
