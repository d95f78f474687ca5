/* grad_overlap: --overlap-grad-reduce (Megatron's name). The gradient
 * buffer is cut into buckets, each a contiguous range that one step of the
 * backward pass finishes (a layer's dense tensors, its expert tensors, the
 * final norm and LM head, the embeddings). As soon as that step is done, the
 * bucket's exact sum (reduce.h, exact_sum_start) goes out without blocking;
 * the backward of the layers below hides it, and the model's Matmul progress
 * hook tests the requests between sgemms, as Open MPI has no progress
 * thread. The results are the bits of model_reduce_gradients.
 *
 * Collectives match by order on a communicator, so every collective is
 * issued at the same program point on every rank: a bucket starts at its
 * ready point, and its last step (the SUM, or the gather of the summed
 * slices) is issued at the next ready point, waiting for the first there if
 * that has not arrived. The progress hook only tests. */
#ifndef MOESIM_GRAD_OVERLAP_H
#define MOESIM_GRAD_OVERLAP_H

#include <stddef.h>
#include <stdint.h>

#include "moesim/comm.h"
#include "moesim/reduce.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Buckets hold at most this many elements: MPI counts are int, and smaller
 * buckets start sooner (Megatron's --ddp-bucket-size is 40M by default). */
#define GRAD_BUCKET_MAX_ELEMENTS ((size_t)1 << 25)

typedef struct GradBucket {
    int layer;        /* the ready point that finishes it (grad_overlap_ready) */
    int is_expert;    /* expert tensors: summed over the EDP group; else over the world */
    size_t offset, n; /* elements offset .. offset+n-1 of the gradient buffer */
    int started_at;   /* ready point (this backward) it started at; -1: not yet */
    int arrived;      /* its SUM was seen complete */
    ExactSumAsync sum;
} GradBucket;

/* What the buckets sum: the model's partials and gradient buffer
 * (model_reduce_gradients's arguments). */
typedef struct GradSources {
    const Comm *comm;
    float *grads;
    size_t num_dense; /* expert tensors start here */
    float *const *dense_partials, *const *expert_partials;
    int dense_count, expert_count;
    long total_partials; /* over the world, and over each EDP group */
} GradSources;

typedef struct GradOverlap {
    GradSources src;
    GradBucket *buckets; /* in gradient-buffer order */
    int count;
    uint8_t *exponent; /* [num_params] scratch of every bucket, indexed like grads */
    int64_t *fixed;    /* [num_params] */
    int point;         /* ready points passed in this backward */
    /* Partials per rank of the world and of the EDP group (exact_sum_start's
     * held): every rank of a model holds as many as this one. */
    int *dense_held, *expert_held;
} GradOverlap;

/* Scratch for num_params gradients; buckets come from grad_overlap_add.
 * Returns 0, or -1 when memory runs out. */
int grad_overlap_init(GradOverlap *g, const GradSources *src, size_t num_params);
void grad_overlap_free(GradOverlap *g);
size_t grad_overlap_bytes(size_t num_params);
/* Adds gradient elements offset .. offset+n-1, finished at ready point
 * `layer`, called in buffer order: a range contiguous with the last one of
 * the same layer and kind extends its bucket (up to the cap). Returns 0, or
 * -1 when memory runs out. */
int grad_overlap_add(GradOverlap *g, int layer, int is_expert, size_t offset, size_t n);

/* The backward pass has finished the gradients of (layer, is_expert): issues
 * the SUM of buckets started at earlier points, starts this point's
 * buckets, and converts the sums that have arrived. Collective. */
void grad_overlap_ready(GradOverlap *g, int layer, int is_expert);
/* Tests the requests in flight (a Matmul progress hook; arg is the
 * GradOverlap). Issues nothing. */
void grad_overlap_progress(void *arg);
/* After the backward pass: every bucket started (those no ready point
 * started start now, so without a backward pass this is the whole
 * reduction), summed and written into grads; then ready for the next
 * backward. Collective. */
void grad_overlap_finish(GradOverlap *g);

#ifdef __cplusplus
}
#endif
#endif
