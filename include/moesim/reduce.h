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
 *   Each term keeps 48 bits below the element's largest term.
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
