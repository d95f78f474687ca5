#include "moesim/comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

void comm_init(Comm *c, int *argc, char ***argv) {
    if (MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "moesim: error: MPI_Init failed; run under mpirun or srun --mpi=pmix\n");
        exit(1);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->world_size);
}

void comm_finalize(Comm *c) {
    (void)c;
    MPI_Finalize();
}

int comm_all_ok(const Comm *c, int ok) {
    (void)c;
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all;
}

int comm_first_failed_rank(const Comm *c, int ok) {
    int mine = ok ? INT_MAX : c->rank, first = INT_MAX;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return first == INT_MAX ? -1 : first;
}

void comm_share_error(const Comm *c, int root, char *err, size_t errlen) {
    (void)c;
    MPI_Bcast(err, (int)errlen, MPI_CHAR, root, MPI_COMM_WORLD);
    err[errlen - 1] = '\0';
}

void comm_sum_doubles(const Comm *c, double *values, int n) {
    if (c->world_size == 1) return;
    MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

void comm_sum_longs(const Comm *c, long *values, int n) {
    if (c->world_size == 1) return;
    MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
}

void comm_average_floats(const Comm *c, float *values, size_t n) {
    if (c->world_size == 1) return;
    const size_t chunk = (size_t)INT_MAX / 2; /* MPI counts are int */
    for (size_t off = 0; off < n; off += chunk) {
        int count = (int)(n - off < chunk ? n - off : chunk);
        MPI_Allreduce(MPI_IN_PLACE, values + off, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
    float inv = 1.0f / c->world_size;
    for (size_t i = 0; i < n; i++) values[i] *= inv;
}

void comm_barrier(const Comm *c) {
    (void)c;
    MPI_Barrier(MPI_COMM_WORLD);
}

double comm_wtime(void) { return MPI_Wtime(); }
