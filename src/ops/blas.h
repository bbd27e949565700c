/* blas.h: cblas.h without its side effect. OpenBLAS's cblas.h includes <complex.h>, which defines
 * the macro I; kernel code names input widths I, so the macro is removed here once. */
#ifndef TK_OPS_BLAS_H
#define TK_OPS_BLAS_H
#include <cblas.h>
#ifdef I
#undef I
#endif
#include <limits.h>
#include <stddef.h>
#include "../common.h"
/* A size as a BLAS dimension (32-bit int in the LP64 OpenBLAS interface). */
static inline blasint tk_blas_dim(size_t n) { TK_ASSERT(n <= (size_t)INT_MAX); return (blasint)n; }
#endif
