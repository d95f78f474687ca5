/* comm: the MPI context and every collective moesim makes. Nothing else
 * calls MPI, so the whole communication pattern of a run reads in one file.
 *
 * Groups: ranks g*EP .. g*EP+EP-1 form expert-parallel (EP) group g and
 * together hold every expert once; ranks at the same position of every EP
 * group form an expert-data-parallel group (size world/EP) that holds the
 * same experts and all-reduces their gradients. */
#ifndef MOESIM_COMM_H
#define MOESIM_COMM_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct Comm {
    int rank;
    int world_size;
    int ep_size;  /* ranks per expert-parallel group */
    int ep_rank;  /* position inside the EP group */
    int edp_size; /* world_size / ep_size */
    MPI_Comm world;
    MPI_Comm ep;  /* this rank's EP group */
    MPI_Comm edp; /* this rank's expert-data-parallel group */
    /* Nodes (comm_split_nodes; until then every rank is a node of its own) */
    int node;         /* this rank's node, numbered by its lowest world rank's order */
    int num_nodes;    /* nodes of the world */
    int ep_node_size; /* ranks of this EP group on this node */
    int ep_node_rank; /* position among them (0 = the node's leader for the group) */
    MPI_Comm ep_node;    /* this EP group's ranks on this node */
    MPI_Comm ep_leaders; /* the leaders of this EP group's nodes; MPI_COMM_NULL elsewhere */
} Comm;

/* Which ranks a collective spans. */
typedef enum CommScope {
    COMM_SCOPE_WORLD,
    COMM_SCOPE_EP,  /* this rank's expert-parallel group */
    COMM_SCOPE_EDP, /* this rank's expert-data-parallel group */
} CommScope;

/* MPI_Init, then comm_attach_world; aborts the process if MPI cannot start. */
void comm_init(Comm *c, int *argc, char ***argv);
/* A context over MPI_COMM_WORLD (MPI already initialised), every rank its own
 * expert-parallel group until comm_split_groups. */
void comm_attach_world(Comm *c);
/* A one-rank context over MPI_COMM_SELF, for tools and tests. */
void comm_attach_self(Comm *c);
/* Builds the EP and expert-data-parallel groups; ep_size must divide the
 * world size (validated before). Collective. */
void comm_split_groups(Comm *c, int ep_size);
/* Learns the node layout: ranks that share memory (MPI_COMM_TYPE_SHARED),
 * or with ranks_per_node > 0 the blocks of that many consecutive ranks (to
 * study a cluster on one host; it must divide the world size). Builds the
 * intra-node and leader communicators of this rank's EP group. Call after
 * comm_split_groups. Collective. */
void comm_split_nodes(Comm *c, int ranks_per_node);
/* Frees the groups of comm_split_groups and comm_split_nodes (back to the
 * attached layout). */
void comm_free_groups(Comm *c);
void comm_finalize(Comm *c);

/* Collective agreement: returns 1 on every rank when every rank passes ok=1. */
int comm_all_ok(const Comm *c, int ok);
/* The largest of every rank's value. */
int comm_max_int(const Comm *c, int value);
/* The lowest rank whose ok is 0, or -1 when all are ok. */
int comm_first_failed_rank(const Comm *c, int ok);
/* Rank `root` shares its error text, so every rank can report the same cause. */
void comm_share_error(const Comm *c, int root, char *err, size_t errlen);

/* Integer sums only: a float sum across ranks goes through reduce.h, whose
 * result does not depend on the layout. */
void comm_sum_longs(const Comm *c, long *values, int n);
/* The primitives of reduce.h: in-place element-wise max and sum over scope,
 * an all-gather in rank order, and the number of ranks in a scope. */
int comm_scope_size(const Comm *c, CommScope scope);
void comm_max_bytes(const Comm *c, CommScope scope, uint8_t *values, size_t n);
void comm_sum_int64(const Comm *c, CommScope scope, int64_t *values, size_t n);
/* This rank's index in the scope. */
int comm_scope_rank(const Comm *c, CommScope scope);
/* all[r] <- rank r's `mine`, for every rank r of the scope. */
void comm_allgather_int(const Comm *c, CommScope scope, int mine, int *all);
/* The reduce-scatter half of an exact sum: slice r (elements begin[r] ..
 * begin[r+1]-1) of each of this rank's n_partials partials goes to rank r of
 * the scope; this rank's slice of every other rank's partials arrives in
 * recv, packed in rank order, each rank's partials in order (held[r] of
 * them). Blocking: the partials may be overwritten on return. */
void comm_scatter_slices(const Comm *c, CommScope scope, float *const *partials, int n_partials,
                         const int *begin, const int *held, float *recv);
/* Slice r of values (elements begin[r] .. begin[r+1]-1) from rank r to every
 * rank of the scope, in place. */
void comm_allgather_slices(const Comm *c, CommScope scope, float *values, const int *begin);
/* The same two without blocking (overlapped gradient reduction). The
 * scatter's messages go into *requests (allocated here, *count of them, freed
 * by the caller once complete); the gather's counts[ranks] must stay, with
 * begin, until its request completes. */
void comm_iscatter_slices(const Comm *c, CommScope scope, float *const *partials, int n_partials,
                          const int *begin, const int *held, float *recv, MPI_Request **requests,
                          int *count);
void comm_iallgather_slices(const Comm *c, CommScope scope, float *values, const int *begin,
                            int *counts, MPI_Request *request);
void comm_wait_all(MPI_Request *requests, int n);
/* The same max and sum without blocking (overlapped gradient reduction);
 * n <= INT_MAX, scope of more than one rank; values must live, untouched,
 * until the request completes. */
void comm_imax_bytes(const Comm *c, CommScope scope, uint8_t *values, size_t n,
                     MPI_Request *request);
void comm_isum_int64(const Comm *c, CommScope scope, int64_t *values, size_t n,
                     MPI_Request *request);
void comm_allgather_doubles(const Comm *c, CommScope scope, const double *mine, double *all, int n);
/* The float MPI_Allreduce moesim used before its gradient sums were exact,
 * kept only as `moesim bench`'s baseline for pricing them; nothing reads the
 * result. */
void comm_float_allreduce_baseline(const Comm *c, CommScope scope, float *values, size_t n);
/* Rank 0 receives n values from every rank, rank-major ([world][n]). */
void comm_gather_doubles(const Comm *c, const double *mine, double *all, int n);
void comm_gather_longs(const Comm *c, const long *mine, long *all, int n);
#define MOESIM_HOSTNAME_MAX MPI_MAX_PROCESSOR_NAME
/* Rank 0 receives every rank's host name, [world][MOESIM_HOSTNAME_MAX]. */
void comm_gather_hostnames(const Comm *c, char *all);

/* The token exchange of expert parallelism, within the EP group. */
void comm_ep_alltoall_ints(const Comm *c, const int *send, int *recv, int per_rank);
void comm_ep_alltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                              const int *send_displs, float *recv, const int *recv_counts,
                              const int *recv_displs);

/* The same exchange without blocking (for overlap with expert work); the
 * argument arrays must live until the request completes. */
void comm_ep_ialltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                               const int *send_displs, float *recv, const int *recv_counts,
                               const int *recv_displs, MPI_Request *request);
/* Waits for one request; tests a set of them so they keep moving. A
 * request that completed is set to MPI_REQUEST_NULL. */
void comm_wait(MPI_Request *request);
void comm_test_all(MPI_Request *requests, int n);
/* 1 once the request has completed (and is freed), else 0; never blocks. */
int comm_test(MPI_Request *request);

/* The hierarchical exchange's steps, within the EP group: every rank's n
 * ints to every rank; the rows of this EP group's ranks on a node gathered
 * on (and scattered from) its leader; and the leaders' exchange. Counts and
 * displacements in floats. */
void comm_ep_allgather_ints(const Comm *c, const int *mine, int *all, int n);
/* Point-to-point within the EP group (expert shadowing, moe.c): n floats
 * to or from EP position `peer` without blocking; messages of one tag
 * between two ranks match in the order they were started. */
void comm_ep_isend_floats(const Comm *c, const float *values, int n, int peer, int tag,
                          MPI_Request *request);
void comm_ep_irecv_floats(const Comm *c, float *values, int n, int peer, int tag,
                          MPI_Request *request);
void comm_ep_node_gatherv_floats(const Comm *c, const float *send, int count, float *recv,
                                 const int *counts, const int *displs);
void comm_ep_node_scatterv_floats(const Comm *c, const float *send, const int *counts,
                                  const int *displs, float *recv, int count);
void comm_ep_leaders_alltoallv_floats(const Comm *c, const float *send, const int *send_counts,
                                      const int *send_displs, float *recv,
                                      const int *recv_counts, const int *recv_displs);

/* Ranks of the world that share this rank's node (MPI_COMM_TYPE_SHARED),
 * and this rank's position among them. Collective. */
void comm_node_ranks(const Comm *c, int *ranks_on_node, int *node_rank);

/* Rank 0's n longs to every rank. */
void comm_broadcast_longs(const Comm *c, long *values, int n);
void comm_barrier(const Comm *c);
double comm_wtime(void);

#ifdef __cplusplus
}
#endif
#endif
