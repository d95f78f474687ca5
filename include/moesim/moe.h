/* moe: one Mixture-of-Experts layer with expert parallelism — route every
 * local token over all E experts, lay the kept assignments out by (global
 * expert, source token), dispatch them to the ranks owning those experts, run
 * each local expert's FFN over its contiguous block, send the outputs back
 * and combine them gate-weighted per token. Dropped assignments contribute
 * nothing: the residual stream carries the token. */
#ifndef MOESIM_MOE_H
#define MOESIM_MOE_H

#include "moesim/comm.h"
#include "moesim/dispatch.h"
#include "moesim/ffn.h"
#include "moesim/router.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct MoeShape {
    RouterShape router;
    int F;       /* expert FFN hidden size */
    int ep_size; /* ranks sharing the experts */
    int E_local; /* experts held by this rank: router.E / ep_size */
    int hierarchical; /* dispatch through node leaders (dispatch.h) */
    int overlap_chunks; /* > 1: expert work overlaps the exchange, in this many chunks */
    FfnActivation activation;
    double expert_dropout; /* rate on the experts' hidden units in training (Switch) */
    /* > 0: shadow blocks that take at least this many rows off the busiest
     * rank (placement_plan_shadows; alltoall without overlap); 0: never */
    int shadow_min_gain;
} MoeShape;

/* Most rows a rank sends and most it receives in one layer: from capacity,
 * or every slot when dropless. */
long moe_max_send_rows(const MoeShape *s);
long moe_max_recv_rows(const MoeShape *s);

/* Switch's expert dropout factors [F] (0 or 1 / (1 - rate)) of the row-th
 * kept assignment of global expert `expert` among the tokens of global grain
 * `grain`, in token order: what training multiplies that row's hidden units
 * by. For checks from outside (the PyTorch reference); the layer computes
 * the same factors in place. */
void moe_expert_dropout_mask(float *mask, int F, double rate, const RouterContext *ctx,
                             long expert, long grain, long row);

/* Per-layer state kept from forward to backward. */
typedef struct MoeLayer {
    Routing routing;
    RouterContext ctx;   /* of the last forward, reused by its backward */
    int first_local_expert;  /* global index of local expert 0 (of the last forward) */
    int ep_group_first_rank; /* world rank of position 0 of this rank's EP group */
    long *global_demand; /* [E] router demand of the global batch (global_aux_loss) */
    Dispatch dispatch;
    int *rows_per_expert; /* [E * grains] kept assignments per (global expert, grain) */
    int *expert_cursor;   /* [E] scratch for filling the sender layout */
    int *row_choice;      /* [send rows] slot t*slots+k of each sender row */
    int *choice_row;      /* [N*slots] sender row of each slot, -1 when not kept */
    float *send_x;        /* [send rows, C] inputs, sender layout */
    float *send_y;        /* [send rows, C] expert outputs back, sender layout */
    float *expert_in;     /* [recv rows, C] owner layout */
    float *h_pre;         /* [recv rows, F * w1 rows per unit] */
    float *h_act;         /* [recv rows, F] */
    float *expert_out;    /* [recv rows, C] */
    /* Shadowing (NULL when off): h_pre and h_act hold the shadowed rows
     * after the received ones, which the plan keeps within recv rows. */
    float *shadow_w;              /* [E_local][w1 | w2] the shadowed experts', in expert order */
    int *shadow_split;            /* [grains + 1] one shadowed block's rows per grain */
    MPI_Request *shadow_requests; /* weights in flight, then gradients */
} MoeLayer;

/* Backward scratch shared by every MoE layer. */
typedef struct MoeScratch {
    float *dy_send;   /* [send rows, C] gate-weighted output gradients */
    float *dy_expert; /* [recv rows, C] */
    float *dh;        /* [recv rows, F * w1 rows per unit] */
    float *dx_expert; /* [recv rows, C] */
    float *dx_back;   /* [send rows, C] */
    float *dgate;     /* [N * slots] */
    float *shadow_grads;     /* [E_local][grains][w1 | w2] when shadowing: the
                                shadowed blocks' weight gradients, per grain */
    float **shadow_partials; /* [grains] pointers into one block's of them */
} MoeScratch;

int moe_layer_init(MoeLayer *m, const MoeShape *s);
/* Expert rows this rank computed in the last forward: received and shadowed. */
long moe_computed_rows(const MoeLayer *m);
void moe_layer_free(MoeLayer *m);
int moe_scratch_init(MoeScratch *sc, const MoeShape *s);
void moe_scratch_free(MoeScratch *sc);
/* Bytes moe_layer_init and moe_scratch_init allocate. */
size_t moe_layer_bytes(const MoeShape *s);
size_t moe_scratch_bytes(const MoeShape *s);

/* Router weights, and the local experts': w1[E_local, F*rows, C], w2[E_local, C, F]. */
typedef struct MoeWeights {
    RouterWeights router;
    const float *w1, *w2;
} MoeWeights;

/* The experts' weight gradients go to one partial per (source rank, grain)
 * split of each expert's rows: partials[ep_size * grains], laid out like
 * `grads`, the buffer w1 and w2 point into (NULL: straight into w1, w2). */
typedef struct MoeGrads {
    RouterGrads router;
    float *w1, *w2;
    const float *grads;
    float *const *partials;
} MoeGrads;

/* out[N,C] from x[N,C]. Collective over the EP group (and the world, for
 * global_aux_loss). phase_s (may be NULL) accumulates seconds per phase. The
 * experts' products run at mm's precision (NULL: float32), the router's at
 * ctx->matmul's. */
void moe_forward(float *out, MoeLayer *m, const float *x, const MoeWeights *w, const MoeShape *s,
                 const RouterContext *ctx, const Comm *comm, double *phase_s, const Matmul *mm);

/* dx[N,C] overwritten; weight gradients accumulated. Collective. */
void moe_backward(float *dx, const MoeGrads *g, const float *dout, const float *x,
                  const MoeWeights *w, MoeLayer *m, MoeScratch *sc, const MoeShape *s,
                  const Comm *comm, double *phase_s, const Matmul *mm);

#ifdef __cplusplus
}
#endif
#endif
