/* dist.h: what data-parallel training needs from a communicator (docs/distributed.md).
 *
 * The trainer takes a tk_dist pointer; NULL means one process, and then no call below is made (the
 * single-process binary carries no MPI code at all). `tspeft-mpi` (built with -DTSPEFT_MPI=ON) fills
 * one from MPI_COMM_WORLD (src/mpi/dist_mpi.c):
 *
 *   tk_dist d;  if (tk_dist_mpi_init(&argc, &argv, &d, &err)) ...;   // rank, size, the calls
 *   opts.dist = &d;  tk_train_run(&opts, &err);
 *   tk_dist_mpi_finalize(&d);
 *
 * Every call is collective: each rank makes the same calls in the same order. Sums are reduced in a
 * fixed order (MPI's reduction is deterministic for a fixed rank count on one machine), so a run is
 * reproducible for a fixed P; it equals the single-process run up to floating-point reassociation of
 * the gradient sums. Failures return -1 with err set (MPI aborts the job on communication errors by
 * default: MPI_ERRORS_ARE_FATAL).
 */
#ifndef TK_TRAIN_DIST_H
#define TK_TRAIN_DIST_H

#include "../common.h"

#include <stddef.h>
#include <stdint.h>

typedef struct tk_dist tk_dist;
struct tk_dist {
    int rank, size;
    void *ctx;
    /* buf[0..n) <- the sum over ranks of buf[0..n), in place */
    int (*sum_f32)(tk_dist *d, float *buf, size_t n, tk_err *err);
    int (*sum_f64)(tk_dist *d, double *buf, size_t n, tk_err *err);
    /* out <- the concatenation of every rank's in[0..n) in rank order; counts[size] receives each
     * rank's n. out must hold the total (ask with tk_dist_gather_count first). */
    int (*gather_f32)(tk_dist *d, const float *in, size_t n, float *out, uint64_t *counts, tk_err *err);
    /* counts[size] <- every rank's n */
    int (*gather_count)(tk_dist *d, uint64_t n, uint64_t *counts, tk_err *err);
    /* bytes sent by this rank so far (for the benchmark's communication figure) */
    uint64_t bytes_sent;
};

#endif
