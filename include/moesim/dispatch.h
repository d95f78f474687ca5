/* dispatch: moving token rows to the ranks that own their experts and back.
 *
 * The sender lays its kept assignments out sorted by global expert, then
 * source token. Because each rank of the EP group owns E/EP consecutive
 * experts, that order is (destination rank, local expert, source token).
 * Per-expert row counts go out with one MPI_Alltoall; the rows then travel
 * with one MPI_Alltoallv per local expert, each receiving straight into that
 * expert's block (sources in rank order), so no copy reorders them. Combine
 * is the same exchange in reverse, landing rows back in the sender's order.
 * With shadowing every rank's counts are all-gathered instead, and the
 * blocks the plan leaves with their sources travel as zero rows.
 *
 * The hierarchical dispatcher moves the same rows to the same places in
 * three steps, so results are bit-identical: each node's leader (for this EP
 * group) gathers its ranks' whole send buffers, the leaders exchange one
 * aggregated message per pair of nodes, and each leader scatters to its
 * ranks their rows already in the owner layout. Every rank knows every
 * rank's counts (one all-gather), so each block's place is computed, never
 * sent. */
#ifndef MOESIM_DISPATCH_H
#define MOESIM_DISPATCH_H

#include "moesim/comm.h"
#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The hierarchical exchange's tables and buffers (dispatch.c). */
typedef struct Hierarchy {
    int parts;          /* nodes this EP group spans */
    int *part_of;       /* [ep_size] node of each EP position, numbered by first position */
    int *part_begin;    /* [parts+1] into members */
    int *members;       /* [ep_size] EP positions grouped by node, ascending in each */
    int *all_counts;    /* [ep_size][E * grains] every rank's rows per (expert, grain) */
    int *block_rows;    /* [ep_size][ep_size][E_local] rows rank p sends to local expert k of q */
    int *send_offset;   /* [p][q][k] that block's first row in p's send buffer */
    int *recv_offset;   /* [q][p][k] its first row in q's owner buffer */
    int *args;          /* MPI counts and displacements, 4 x max(ep_size, parts) */
    float *gathered, *packed, *arrived, *outgoing; /* leader scratch, grown as needed */
    size_t capacity;    /* floats in each scratch buffer */
} Hierarchy;

typedef struct Dispatch {
    int E, E_local, ep_size;
    int hierarchical;       /* the three-step exchange instead of all-to-all */
    int overlap;            /* per-expert non-blocking exchanges (dispatch_expert_start) */
    int *async_args;        /* [2][E_local][4 * ep_size]: each request's MPI arguments */
    MPI_Request *requests;  /* [2][E_local]: expert j's dispatch, then its combine */
    /* The caller's progress hook (gradient buckets in flight), which
     * dispatch_progress calls too; NULL: none. */
    void (*outer_progress)(void *arg);
    void *outer_progress_arg;
    Hierarchy h;
    int grains;             /* per source rank: the finest split of an expert's rows */
    int *rows_per_expert;   /* [E] rows this rank sends to each global expert */
    int *send_row_begin;    /* [E+1] sender layout: first row of each global expert */
    int *recv_counts;       /* [ep_size * E_local] rows from source s for local expert j */
    int *expert_row_begin;  /* [E_local+1] owner layout: first row of each local expert */
    int *recv_grain_counts; /* [ep_size * E_local * grains] rows of (source, local expert, grain) */
    int *split_begin;       /* [E_local][ep_size * grains + 1] within each local expert's block:
                               first row of each (source rank, grain), the expert's RowSplit */
    int num_send_rows, num_recv_rows;
    /* Shadowing (placement_plan_shadows; alltoall without overlap only): a
     * shadowed block stays with its source, which computes it with a copy
     * of the expert's weights; both layouts keep its place, with no rows. */
    int shadowing;         /* plan shadows at every dispatch_plan */
    int shadow_min_gain;   /* rows a shadow must take off the busiest rank */
    int shadow_max_rows;   /* most rows a rank may compute */
    int ep_rank;           /* of the last plan */
    int *every_count;      /* [ep_size][E * grains] every rank's rows per (expert, grain) */
    int *source_rows;      /* [ep_size][E] every rank's rows per expert */
    int *load;             /* [ep_size] rows each rank computes, shadows included */
    unsigned char *shadow; /* [ep_size][E] 1: that source computes its rows of that expert */
    int num_shadows;       /* blocks this rank shadows */
    int num_shadow_rows;   /* rows in them */
    /* MPI argument scratch of the blocking exchange, in floats: send counts,
     * send displacements, receive counts, receive displacements, ep_size each */
    int *args;
    /* Measured since dispatch_reset_measures: the exchanges' times, and the
     * token-row bytes this rank handed the exchanges for each EP position
     * (all-to-all: every rank, itself included; hierarchical: only a
     * leader sends, one message to each node's leader, its own included).
     * Count exchanges are timed but not counted in bytes. */
    CommTimes times;
    long *sent_bytes;     /* [ep_size] */
    int outstanding[2];   /* non-blocking dispatch, combine requests not yet seen complete */
    double busy_since[2]; /* when the outstanding ones' first started */
} Dispatch;

int dispatch_init(Dispatch *d, int E, int ep_size, int grains, int hierarchical, int overlap);
void dispatch_free(Dispatch *d);
/* Turns shadowing on (ep_size > 1, alltoall, no overlap; else a no-op
 * returning 0): min_gain rows at least, max_rows per rank at most, E_local
 * shadows per rank at most. 0, or -1 when out of memory. */
int dispatch_enable_shadowing(Dispatch *d, int min_gain, int max_rows);
/* Whether EP position `source` computes its own rows of global expert e. */
int dispatch_shadowed(const Dispatch *d, int source, int e);

/* From the sender's row counts per (global expert, grain) [E * grains]:
 * exchanges them and fills both layouts and the experts' splits. Collective
 * over the EP group. */
void dispatch_plan(Dispatch *d, const int *rows_per_expert_grain, const Comm *comm);
/* Local expert j's splits: ep_size * grains of them, begin[0..count]. */
const int *dispatch_expert_splits(const Dispatch *d, int j, int *count);

/* sender rows [num_send_rows, width] -> owner rows [num_recv_rows, width] */
void dispatch_rows(Dispatch *d, const float *send, float *recv, int width, const Comm *comm);
/* owner rows [num_recv_rows, width] -> sender rows [num_send_rows, width] */
void combine_rows(Dispatch *d, const float *owner, float *back, int width, const Comm *comm);

/* Overlap (alltoall only, ep_size > 1, dispatch_init with overlap): the same
 * exchanges one local expert at a time without blocking, so expert work on
 * arrived rows hides the rest in flight; the rows land exactly where
 * dispatch_rows / combine_rows put them. Every rank starts them in the same
 * order. */
void dispatch_expert_start(Dispatch *d, int j, const float *send, float *recv, int width,
                           const Comm *comm);
void dispatch_expert_wait(Dispatch *d, int j);
void combine_expert_start(Dispatch *d, int j, const float *owner, float *back, int width,
                          const Comm *comm);
void combine_wait_all(Dispatch *d);
/* Tests every outstanding request, then calls the outer hook (a Matmul
 * progress hook; arg is the Dispatch). */
void dispatch_progress(void *arg);

/* Zeroes times and sent_bytes (a step's start). */
void dispatch_reset_measures(Dispatch *d);

/* Rows this rank sends EP position s in the last plan (shadowed blocks stay). */
int dispatch_rows_to(const Dispatch *d, int s);
/* Adds the bytes of `width`-float rows this rank sends to each EP rank to
 * bytes[ep_size]. */
void dispatch_add_bytes_to_ranks(const Dispatch *d, int width, long *bytes);

#ifdef __cplusplus
}
#endif
#endif
