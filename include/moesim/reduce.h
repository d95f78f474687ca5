/* reduce: sums over ranks whose bits never depend on the layout.
 *
 * Floating-point addition is not associative, so an MPI_Allreduce of floats
 * gives bits that depend on how the terms are spread over ranks and on the
 * reduction tree. moesim forms every such sum per grain (a unit of tokens
 * that every layout keeps on one rank, in the same order) and combines the
 * grains here, in one of two ways:
 *
 * - exact_sum_floats, for large vectors (gradients): each partial is
 *   converted to int64 fixed point with an exponent shared by every partial
 *   of that element on every rank (one small max-reduction first), and the
 *   integers are summed. Integer addition is associative, so the result is
 *   the same bits however the partials are split over ranks and buffers.
 *   Each term keeps 48 bits below the element's largest term. Up to 32
 *   partials over the scope, the partials' slices travel instead (a
 *   reduce-scatter) and each rank sums its slice locally, the same function
 *   of the same terms; the slices are then gathered.
 * - ordered_sum_doubles, for small vectors (losses, routing statistics):
 *   every rank's per-grain rows are gathered in global grain order and summed
 *   in that order on every rank, the same order a 1-rank run uses.
 *
 * No other code sums floats across ranks. */
#ifndef MOESIM_REDUCE_H
#define MOESIM_REDUCE_H

#include <stddef.h>
#include <stdint.h>

#include "moesim/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most partials one exact sum may combine over all ranks: each term is
 * below 2^48 in fixed point, so 2^14 of them stay inside an int64. */
#define EXACT_SUM_MAX_PARTIALS (1L << 14)

typedef struct ExactSum {
    size_t capacity;   /* elements */
    uint8_t *exponent; /* [capacity] largest biased float exponent of each element */
    int64_t *fixed;    /* [capacity] fixed-point sums */
} ExactSum;

int exact_sum_init(ExactSum *x, size_t capacity);
void exact_sum_free(ExactSum *x);
size_t exact_sum_bytes(size_t capacity);

/* out[i] = sum over every rank of `scope` and every one of its n_partials
 * buffers of partials[p][i], n elements each. total_partials is the number of
 * partial buffers over the whole scope (at most EXACT_SUM_MAX_PARTIALS). A
 * non-finite term makes the element NaN, except that a lone partial on a
 * one-rank scope is the sum and is copied unchanged (inf stays inf, -0 stays
 * -0). out may alias partials[0]. Collective over `scope`; every rank passes
 * the same n and total_partials. */
void exact_sum_floats(ExactSum *x, const Comm *c, CommScope scope, float *const *partials,
                      int n_partials, long total_partials, size_t n, float *out);

/* exact_sum_floats without blocking, for one bucket (a contiguous element
 * range) of the partials, so that the reduction of gradients already final
 * overlaps the rest of the backward pass. The same three steps per element,
 * so the same bits as exact_sum_floats over any split into buckets:
 *   exact_sum_start     local exponents, then a non-blocking MAX;
 *   exact_sum_continue  (MAX done, waited for if not) fixed point, then a
 *                       non-blocking SUM;
 *   exact_sum_complete  (SUM done, waited for if not) back to floats.
 * Given every rank's partial count (held) and at most 32
 * partials in all, the steps are the sliced sum's instead: start sends the
 * bucket's slices, continue sums this rank's slice and starts gathering the
 * slices, complete waits for them.
 * exact_sum_test only tests the outstanding collective (cheap; for progress
 * hooks, as Open MPI has no progress thread) and never issues one: every
 * rank must start and continue its buckets in the same order at the same
 * points of its program, since collectives on a communicator match by
 * order. With a one-rank scope, start computes the sum at once. */
typedef enum ExactSumStage {
    EXACT_SUM_DONE,      /* out written (or nothing started) */
    EXACT_SUM_EXPONENTS, /* MAX of the exponents in flight */
    EXACT_SUM_FIXED,     /* SUM of the fixed-point terms in flight */
    EXACT_SUM_SLICES,    /* sliced: the partials' slices in flight */
    EXACT_SUM_GATHER,    /* sliced: the summed slices in flight */
} ExactSumStage;

typedef struct ExactSumAsync {
    const Comm *comm;
    CommScope scope;
    float *const *partials; /* [n_partials] whole buffers; the bucket starts at offset */
    int n_partials;
    size_t offset, n; /* the bucket: elements offset .. offset+n-1 of each partial */
    float *out;       /* [n] the bucket's result; may alias partials[0] + offset */
    uint8_t *exponent; /* [n] scratch, untouched by anything else until complete */
    int64_t *fixed;    /* [n] scratch, likewise */
    ExactSumStage stage;
    int arrived; /* the stage's collective completed (exact_sum_test saw it) */
    MPI_Request request;
    const int *held;       /* sliced: [ranks] partials each rank of the scope holds */
    int total;             /* sliced: their sum */
    int *slices;           /* sliced: [ranks + 1] slice offsets in the bucket, [ranks] counts */
    MPI_Request *messages; /* sliced: the slices' sends and receives, n_messages of them */
    int n_messages;
} ExactSumAsync;

/* The last step's collective is in flight (complete would wait for it). */
static inline int exact_sum_last_stage(const ExactSumAsync *a) {
    return a->stage == EXACT_SUM_FIXED || a->stage == EXACT_SUM_GATHER;
}

/* Arguments as exact_sum_floats, plus the bucket, its scratch and held
 * ([ranks] partials per rank of the scope, the same array on every rank; it
 * must stay until complete), or NULL for the fixed-point steps; n must fit an
 * int (EXACT_SUM_MAX_BUCKET). Collective over scope (non-blocking). */
#define EXACT_SUM_MAX_BUCKET ((size_t)1 << 30)
void exact_sum_start(ExactSumAsync *a, const Comm *c, CommScope scope, float *const *partials,
                     int n_partials, long total_partials, size_t offset, size_t n, float *out,
                     uint8_t *exponent, int64_t *fixed, const int *held);
/* Returns 1 when the outstanding step has completed (or none is). */
int exact_sum_test(ExactSumAsync *a);
/* Issues the last step when the first is in flight; else nothing. */
void exact_sum_continue(ExactSumAsync *a);
/* Continues if needed, waits for the last step and writes out. */
void exact_sum_complete(ExactSumAsync *a);

/* out[j] = sum over the scope's grains g, in global grain order, of
 * grain g's value j. Rank r holds grains r*rows .. r*rows+rows-1 of the scope,
 * as mine[rows][n]. Collective; every rank passes the same rows and n.
 * scratch holds ranks_in_scope * rows * n doubles. */
void ordered_sum_doubles(const Comm *c, CommScope scope, const double *mine, int rows, int n,
                         double *scratch, double *out);

#ifdef __cplusplus
}
#endif
#endif
