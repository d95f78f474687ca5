#include "moesim/comm.h"

#include "moesim/placement.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

void comm_init(Comm *c, int *argc, char ***argv) {
    if (MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "moesim: error: MPI_Init failed; run under mpirun or srun --mpi=pmix\n");
        exit(1);
    }
    comm_attach_world(c);
}

static void attach(Comm *c, MPI_Comm world) {
    c->world = world;
    MPI_Comm_rank(world, &c->rank);
    MPI_Comm_size(world, &c->world_size);
    c->ep_size = 1;
    c->ep_rank = 0;
    c->edp_size = c->world_size;
    c->ep = MPI_COMM_SELF;
    c->edp = world;
    c->node = c->rank;
    c->num_nodes = c->world_size;
    c->ep_node_size = 1;
    c->ep_node_rank = 0;
    c->ep_node = MPI_COMM_SELF;
    c->ep_leaders = c->ep;
}

void comm_attach_world(Comm *c) {
    attach(c, MPI_COMM_WORLD);
}

void comm_attach_self(Comm *c) {
    attach(c, MPI_COMM_SELF);
}

void comm_split_groups(Comm *c, int ep_size) {
    c->ep_size = ep_size;
    c->ep_rank = placement_ep_position(ep_size, c->rank);
    c->edp_size = c->world_size / ep_size;
    MPI_Comm_split(c->world, placement_ep_group(ep_size, c->rank), c->ep_rank, &c->ep);
    MPI_Comm_split(c->world, c->ep_rank, c->rank, &c->edp);
    c->ep_leaders = c->ep;
}

/* This rank's node as the lowest world rank on it. */
static int node_key(const Comm *c, int ranks_per_node) {
    if (ranks_per_node > 0) return c->rank / ranks_per_node * ranks_per_node;
    MPI_Comm shared;
    MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &shared);
    int lowest = c->rank;
    MPI_Allreduce(MPI_IN_PLACE, &lowest, 1, MPI_INT, MPI_MIN, shared);
    MPI_Comm_free(&shared);
    return lowest;
}

void comm_split_nodes(Comm *c, int ranks_per_node) {
    int key = node_key(c, ranks_per_node);
    int *keys = malloc(sizeof(int) * (size_t)c->world_size);
    if (!keys) MPI_Abort(c->world, 1);
    MPI_Allgather(&key, 1, MPI_INT, keys, 1, MPI_INT, c->world);
    /* a node's lowest rank names it; nodes are numbered in that order */
    c->node = c->num_nodes = 0;
    for (int r = 0; r < c->world_size; r++) {
        if (keys[r] != r) continue;
        c->num_nodes++;
        if (r < key) c->node++;
    }
    free(keys);
    MPI_Comm_split(c->ep, c->node, c->ep_rank, &c->ep_node);
    MPI_Comm_size(c->ep_node, &c->ep_node_size);
    MPI_Comm_rank(c->ep_node, &c->ep_node_rank);
    MPI_Comm_split(c->ep, c->ep_node_rank == 0 ? 0 : MPI_UNDEFINED, c->ep_rank, &c->ep_leaders);
}

void comm_free_groups(Comm *c) {
    if (c->ep_leaders != c->ep && c->ep_leaders != MPI_COMM_NULL) MPI_Comm_free(&c->ep_leaders);
    if (c->ep_node != MPI_COMM_SELF) MPI_Comm_free(&c->ep_node);
    if (c->ep != MPI_COMM_SELF) MPI_Comm_free(&c->ep);
    if (c->edp != c->world) MPI_Comm_free(&c->edp);
    attach(c, c->world);
}

void comm_finalize(Comm *c) {
    comm_free_groups(c);
    MPI_Finalize();
}

int comm_all_ok(const Comm *c, int ok) {
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, c->world);
    return all;
}

int comm_max_int(const Comm *c, int value) {
    int max = value;
    MPI_Allreduce(&value, &max, 1, MPI_INT, MPI_MAX, c->world);
    return max;
}

int comm_first_failed_rank(const Comm *c, int ok) {
    int mine = ok ? INT_MAX : c->rank, first = INT_MAX;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, c->world);
    return first == INT_MAX ? -1 : first;
}

void comm_share_error(const Comm *c, int root, char *err, size_t errlen) {
    MPI_Bcast(err, (int)errlen, MPI_CHAR, root, c->world);
    err[errlen - 1] = '\0';
}

void comm_sum_longs(const Comm *c, long *values, int n) {
    if (c->world_size > 1) MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_LONG, MPI_SUM, c->world);
}

static MPI_Comm scope_comm(const Comm *c, CommScope scope) {
    return scope == COMM_SCOPE_EP ? c->ep : scope == COMM_SCOPE_EDP ? c->edp : c->world;
}

int comm_scope_size(const Comm *c, CommScope scope) {
    return scope == COMM_SCOPE_EP    ? c->ep_size
           : scope == COMM_SCOPE_EDP ? c->edp_size
                                     : c->world_size;
}

/* MPI counts are int: large buffers go in chunks. */
static void allreduce_in_chunks(void *values, size_t n, size_t elem_bytes, MPI_Datatype type,
                                MPI_Op op, MPI_Comm comm) {
    const size_t chunk = (size_t)INT_MAX / 2;
    for (size_t off = 0; off < n; off += chunk) {
        int count = (int)(n - off < chunk ? n - off : chunk);
        MPI_Allreduce(MPI_IN_PLACE, (char *)values + off * elem_bytes, count, type, op, comm);
    }
}

void comm_max_bytes(const Comm *c, CommScope scope, uint8_t *values, size_t n) {
    if (comm_scope_size(c, scope) > 1)
        allreduce_in_chunks(values, n, 1, MPI_UINT8_T, MPI_MAX, scope_comm(c, scope));
}

void comm_sum_int64(const Comm *c, CommScope scope, int64_t *values, size_t n) {
    if (comm_scope_size(c, scope) > 1)
        allreduce_in_chunks(values, n, sizeof(int64_t), MPI_INT64_T, MPI_SUM, scope_comm(c, scope));
}

int comm_scope_rank(const Comm *c, CommScope scope) {
    int rank = 0;
    if (comm_scope_size(c, scope) > 1) MPI_Comm_rank(scope_comm(c, scope), &rank);
    return rank;
}

void comm_allgather_int(const Comm *c, CommScope scope, int mine, int *all) {
    MPI_Allgather(&mine, 1, MPI_INT, all, 1, MPI_INT, scope_comm(c, scope));
}

/* One message per (partial, rank): the partials are separate buffers, and
 * packing them first would copy every slice once more. MPI keeps the
 * messages between two ranks in order, so the receiver needs no tags. */
void comm_iscatter_slices(const Comm *c, CommScope scope, float *const *partials, int n_partials,
                          const int *begin, const int *held, float *recv, MPI_Request **requests,
                          int *count) {
    MPI_Comm comm = scope_comm(c, scope);
    int ranks = comm_scope_size(c, scope), me = comm_scope_rank(c, scope), n = 0;
    for (int r = 0; r < ranks; r++) n += r == me ? 0 : n_partials + held[r];
    MPI_Request *req = malloc(sizeof(MPI_Request) * (size_t)(n > 0 ? n : 1));
    if (!req) {
        fprintf(stderr, "moesim: out of memory for %d requests of an exact sum\n", n);
        MPI_Abort(c->world, 1);
    }
    int mine = begin[me + 1] - begin[me];
    float *at = recv;
    n = 0;
    for (int r = 0; r < ranks; r++) {
        if (r == me) continue;
        for (int p = 0; p < held[r]; p++, at += mine)
            MPI_Irecv(at, mine, MPI_FLOAT, r, 0, comm, &req[n++]);
        for (int p = 0; p < n_partials; p++)
            MPI_Isend(partials[p] + begin[r], begin[r + 1] - begin[r], MPI_FLOAT, r, 0, comm,
                      &req[n++]);
    }
    *requests = req;
    *count = n;
}

void comm_scatter_slices(const Comm *c, CommScope scope, float *const *partials, int n_partials,
                         const int *begin, const int *held, float *recv) {
    MPI_Request *requests;
    int count;
    comm_iscatter_slices(c, scope, partials, n_partials, begin, held, recv, &requests, &count);
    comm_wait_all(requests, count);
    free(requests);
}

void comm_iallgather_slices(const Comm *c, CommScope scope, float *values, const int *begin,
                            int *counts, MPI_Request *request) {
    int ranks = comm_scope_size(c, scope);
    for (int r = 0; r < ranks; r++) counts[r] = begin[r + 1] - begin[r];
    MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, values, counts, begin, MPI_FLOAT,
                    scope_comm(c, scope), request);
}

void comm_allgather_slices(const Comm *c, CommScope scope, float *values, const int *begin) {
    int ranks = comm_scope_size(c, scope);
    int counts[ranks];
    for (int r = 0; r < ranks; r++) counts[r] = begin[r + 1] - begin[r];
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, values, counts, begin, MPI_FLOAT,
                   scope_comm(c, scope));
}

void comm_wait_all(MPI_Request *requests, int n) {
    MPI_Waitall(n, requests, MPI_STATUSES_IGNORE);
}

/* A count beyond int is the caller's bug: buckets are capped below it. */
static int checked_count(const Comm *c, size_t n) {
    if (n > (size_t)INT_MAX) {
        fprintf(stderr, "moesim: internal error: a non-blocking reduction of %zu elements exceeds "
                        "MPI's int count\n", n);
        MPI_Abort(c->world, 1);
    }
    return (int)n;
}

void comm_imax_bytes(const Comm *c, CommScope scope, uint8_t *values, size_t n,
                     MPI_Request *request) {
    MPI_Iallreduce(MPI_IN_PLACE, values, checked_count(c, n), MPI_UINT8_T, MPI_MAX,
                   scope_comm(c, scope), request);
}

void comm_isum_int64(const Comm *c, CommScope scope, int64_t *values, size_t n,
                     MPI_Request *request) {
    MPI_Iallreduce(MPI_IN_PLACE, values, checked_count(c, n), MPI_INT64_T, MPI_SUM,
                   scope_comm(c, scope), request);
}

void comm_float_allreduce_baseline(const Comm *c, CommScope scope, float *values, size_t n) {
    if (comm_scope_size(c, scope) > 1)
        allreduce_in_chunks(values, n, sizeof(float), MPI_FLOAT, MPI_SUM, scope_comm(c, scope));
}

void comm_allgather_doubles(const Comm *c, CommScope scope, const double *mine, double *all,
                            int n) {
    MPI_Allgather(mine, n, MPI_DOUBLE, all, n, MPI_DOUBLE, scope_comm(c, scope));
}

void comm_gather_doubles(const Comm *c, const double *mine, double *all, int n) {
    MPI_Gather(mine, n, MPI_DOUBLE, all, n, MPI_DOUBLE, 0, c->world);
}

void comm_gather_longs(const Comm *c, const long *mine, long *all, int n) {
    MPI_Gather(mine, n, MPI_LONG, all, n, MPI_LONG, 0, c->world);
}

void comm_gather_hostnames(const Comm *c, char *all) {
    char mine[MOESIM_HOSTNAME_MAX] = "";
    int len = 0;
    MPI_Get_processor_name(mine, &len);
    MPI_Gather(mine, MOESIM_HOSTNAME_MAX, MPI_CHAR, all, MOESIM_HOSTNAME_MAX, MPI_CHAR, 0,
               c->world);
}

void comm_ep_alltoall_ints(const Comm *c, const int *send, int *recv, int per_rank) {
    MPI_Alltoall(send, per_rank, MPI_INT, recv, per_rank, MPI_INT, c->ep);
}

void comm_ep_alltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                              const int *send_displs, float *recv, const int *recv_counts,
                              const int *recv_displs) {
    MPI_Alltoallv(send, send_counts, send_displs, MPI_FLOAT, recv, recv_counts, recv_displs,
                  MPI_FLOAT, c->ep);
}

void comm_broadcast_longs(const Comm *c, long *values, int n) {
    if (n > 0) MPI_Bcast(values, n, MPI_LONG, 0, c->world);
}

void comm_barrier(const Comm *c) {
    MPI_Barrier(c->world);
}

double comm_wtime(void) {
    return MPI_Wtime();
}

void comm_node_ranks(const Comm *c, int *ranks_on_node, int *node_rank) {
    MPI_Comm node;
    MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, ranks_on_node);
    MPI_Comm_rank(node, node_rank);
    MPI_Comm_free(&node);
}

void comm_ep_allgather_ints(const Comm *c, const int *mine, int *all, int n) {
    MPI_Allgather(mine, n, MPI_INT, all, n, MPI_INT, c->ep);
}

void comm_ep_isend_floats(const Comm *c, const float *values, int n, int peer, int tag,
                          MPI_Request *request) {
    MPI_Isend(values, n, MPI_FLOAT, peer, tag, c->ep, request);
}

void comm_ep_irecv_floats(const Comm *c, float *values, int n, int peer, int tag,
                          MPI_Request *request) {
    MPI_Irecv(values, n, MPI_FLOAT, peer, tag, c->ep, request);
}

void comm_ep_node_gatherv_floats(const Comm *c, const float *send, int count, float *recv,
                                 const int *counts, const int *displs) {
    MPI_Gatherv(send, count, MPI_FLOAT, recv, counts, displs, MPI_FLOAT, 0, c->ep_node);
}

void comm_ep_node_scatterv_floats(const Comm *c, const float *send, const int *counts,
                                  const int *displs, float *recv, int count) {
    MPI_Scatterv(send, counts, displs, MPI_FLOAT, recv, count, MPI_FLOAT, 0, c->ep_node);
}

void comm_ep_leaders_alltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                                      const int *send_displs, float *recv, const int *recv_counts,
                                      const int *recv_displs) {
    MPI_Alltoallv(send, send_counts, send_displs, MPI_FLOAT, recv, recv_counts, recv_displs,
                  MPI_FLOAT, c->ep_leaders);
}

void comm_ep_ialltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                               const int *send_displs, float *recv, const int *recv_counts,
                               const int *recv_displs, MPI_Request *request) {
    MPI_Ialltoallv(send, send_counts, send_displs, MPI_FLOAT, recv, recv_counts, recv_displs,
                   MPI_FLOAT, c->ep, request);
}

void comm_wait(MPI_Request *request) {
    MPI_Wait(request, MPI_STATUS_IGNORE);
}

void comm_test_all(MPI_Request *requests, int n) {
    /* One by one, not MPI_Testall: that frees nothing until all are done,
     * and a freed request is how its completion is seen (dispatch.c). */
    for (int i = 0; i < n; i++) {
        int done = 0;
        if (requests[i] != MPI_REQUEST_NULL) MPI_Test(&requests[i], &done, MPI_STATUS_IGNORE);
    }
}

int comm_test(MPI_Request *request) {
    int done = 0;
    MPI_Test(request, &done, MPI_STATUS_IGNORE);
    return done;
}
