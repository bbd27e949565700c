/* blas_core.h: OpenBLAS's kernel choice (blas_core.c). */
#ifndef TK_CLI_BLAS_CORE_H
#define TK_CLI_BLAS_CORE_H

/* First thing in main: when OpenBLAS fell back to pre-AVX2 kernels on a CPU with AVX2+FMA or
 * AVX-512 (a CPU model newer than the library) and OPENBLAS_CORETYPE is unset, set it from the CPU's
 * features and execv the program again with argv. Returns (doing nothing) otherwise or on failure. */
void tk_blas_core_fix(char **argv);
/* The kernels OpenBLAS runs ("Cooperlake", "SkylakeX", "Haswell", "Prescott", ...). */
const char *tk_blas_core_name(void);
/* What OpenBLAS had chosen by itself when tk_blas_core_fix replaced it, or NULL. */
const char *tk_blas_core_detected(void);

#endif
