/* main_mpi.c: `mpirun -np P tspeft-mpi train [options]`: the train verb of tspeft, data-parallel over
 * P ranks (docs/distributed.md). Each optimizer step's grad-accum micro-batches are split across the
 * ranks; only rank 0 prints progress and writes checkpoints, logs and the adapter. */
#include "cli/blas_core.h"
#include "cli/cli.h"
#include "dist_mpi.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    tk_blas_core_fix(argv); /* before MPI_Init: it may restart the program (blas_core.h) */
    signal(SIGXFSZ, SIG_IGN);
    tk_err err = {0};
    tk_dist d;
    if (tk_dist_mpi_init(&argc, &argv, &d, &err)) {
        fprintf(stderr, "tspeft-mpi: %s\n", err.msg);
        return 1;
    }
    int rc;
    if (argc >= 2 && strcmp(argv[1], "train") == 0) {
        rc = tk_cmd_train_dist(argc - 2, argv + 2, &d);
    } else {
        if (d.rank == 0)
            fprintf(stderr, "usage: mpirun -np P tspeft-mpi train [options]   (the options of `tspeft train`; "
                            "other verbs: use tspeft)\n");
        rc = 2;
    }
    /* A rank that failed alone would leave the others waiting in a collective: abort them all. */
    if (rc == 1) {
        fflush(stderr);
        tk_dist_mpi_abort(&d, rc);
    }
    tk_dist_mpi_finalize(&d);
    return rc;
}
