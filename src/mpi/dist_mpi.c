/* dist_mpi.c: see dist_mpi.h. Large buffers go in chunks below INT_MAX elements (MPI counts are int). */
#include "dist_mpi.h"

#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK ((size_t)1 << 28)

static int mpi_fail(tk_err *err, const char *what, int rc) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return tk_fail(err, "MPI %s failed: %.*s", what, len, msg);
}

static int sum_f32(tk_dist *d, float *buf, size_t n, tk_err *err) {
    for (size_t o = 0; o < n; o += CHUNK) {
        int k = (int)(n - o < CHUNK ? n - o : CHUNK);
        int rc = MPI_Allreduce(MPI_IN_PLACE, buf + o, k, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS) return mpi_fail(err, "Allreduce", rc);
        d->bytes_sent += (uint64_t)k * sizeof(float);
    }
    return 0;
}

static int sum_f64(tk_dist *d, double *buf, size_t n, tk_err *err) {
    for (size_t o = 0; o < n; o += CHUNK) {
        int k = (int)(n - o < CHUNK ? n - o : CHUNK);
        int rc = MPI_Allreduce(MPI_IN_PLACE, buf + o, k, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS) return mpi_fail(err, "Allreduce", rc);
        d->bytes_sent += (uint64_t)k * sizeof(double);
    }
    return 0;
}

static int gather_count(tk_dist *d, uint64_t n, uint64_t *counts, tk_err *err) {
    int rc = MPI_Allgather(&n, 1, MPI_UINT64_T, counts, 1, MPI_UINT64_T, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) return mpi_fail(err, "Allgather", rc);
    d->bytes_sent += sizeof n;
    return 0;
}

static int gather_f32(tk_dist *d, const float *in, size_t n, float *out, uint64_t *counts, tk_err *err) {
    if (gather_count(d, n, counts, err)) return -1;
    int *cnt = malloc((size_t)d->size * sizeof *cnt), *disp = malloc((size_t)d->size * sizeof *disp);
    if (!cnt || !disp) {
        free(cnt);
        free(disp);
        return tk_fail(err, "out of memory");
    }
    uint64_t total = 0;
    int too_big = 0;
    for (int r = 0; r < d->size; r++) {
        if (counts[r] > INT_MAX || total > INT_MAX) too_big = 1;
        cnt[r] = (int)counts[r];
        disp[r] = (int)total;
        total += counts[r];
    }
    int rc = MPI_SUCCESS;
    if (!too_big && total <= INT_MAX)
        rc = MPI_Allgatherv(in, (int)n, MPI_FLOAT, out, cnt, disp, MPI_FLOAT, MPI_COMM_WORLD);
    free(cnt);
    free(disp);
    if (too_big || total > INT_MAX) return tk_fail(err, "MPI gather of %llu values: over the int limit", (unsigned long long)total);
    if (rc != MPI_SUCCESS) return mpi_fail(err, "Allgatherv", rc);
    d->bytes_sent += (uint64_t)n * sizeof(float);
    return 0;
}

int tk_dist_mpi_init(int *argc, char ***argv, tk_dist *d, tk_err *err) {
    memset(d, 0, sizeof *d);
    int rc = MPI_Init(argc, argv);
    if (rc != MPI_SUCCESS) return mpi_fail(err, "Init", rc);
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->size);
    d->sum_f32 = sum_f32;
    d->sum_f64 = sum_f64;
    d->gather_f32 = gather_f32;
    d->gather_count = gather_count;
    return 0;
}

void tk_dist_mpi_finalize(tk_dist *d) {
    (void)d;
    MPI_Finalize();
}

void tk_dist_mpi_abort(tk_dist *d, int code) {
    (void)d;
    MPI_Abort(MPI_COMM_WORLD, code);
}
