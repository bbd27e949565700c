/* dist_mpi.h: a tk_dist (src/train/dist.h) over MPI_COMM_WORLD. Only `tspeft-mpi` links this.
 *
 *   tk_dist d;  if (tk_dist_mpi_init(&argc, &argv, &d, &err)) exit(1);
 *   ... collective use ...
 *   tk_dist_mpi_finalize(&d);
 */
#ifndef TK_MPI_DIST_MPI_H
#define TK_MPI_DIST_MPI_H

#include "train/dist.h"

int tk_dist_mpi_init(int *argc, char ***argv, tk_dist *d, tk_err *err);
void tk_dist_mpi_finalize(tk_dist *d);
/* Aborts every rank (after one rank failed, so the others do not wait forever in a collective). */
void tk_dist_mpi_abort(tk_dist *d, int code);

#endif
