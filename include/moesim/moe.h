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
#include "moesim/router.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct MoeShape {
    RouterShape router;
    int F;       /* expert FFN hidden size */
    int ep_size; /* ranks sharing the experts */
    int E_local; /* experts held by this rank: router.E / ep_size */
} MoeShape;

/* Most rows a rank sends and most it receives in one layer, from capacity. */
long moe_max_send_rows(const MoeShape *s);
long moe_max_recv_rows(const MoeShape *s);

/* Per-layer state kept from forward to backward. */
typedef struct MoeLayer {
    Routing routing;
    Dispatch dispatch;
    int *rows_per_expert; /* [E] kept assignments per global expert */
    int *expert_cursor;   /* [E] scratch for filling the sender layout */
    int *row_choice;      /* [send rows] assignment t*K+k of each sender row */
    int *choice_row;      /* [N*K] sender row of each assignment, -1 when dropped */
    float *send_x;        /* [send rows, C] inputs, sender layout */
    float *send_y;        /* [send rows, C] expert outputs back, sender layout */
    float *expert_in;     /* [recv rows, C] owner layout */
    float *h_pre, *h_act; /* [recv rows, F] */
    float *expert_out;    /* [recv rows, C] */
} MoeLayer;

/* Backward scratch shared by every MoE layer. */
typedef struct MoeScratch {
    float *dy_send;   /* [send rows, C] gate-weighted output gradients */
    float *dy_expert; /* [recv rows, C] */
    float *dh;        /* [recv rows, F] */
    float *dx_expert; /* [recv rows, C] */
    float *dx_back;   /* [send rows, C] */
    float *dgate;     /* [N*K] */
} MoeScratch;

int moe_layer_init(MoeLayer *m, const MoeShape *s);
/* Bytes moe_layer_init and moe_scratch_init allocate. */
size_t moe_layer_bytes(const MoeShape *s);
size_t moe_scratch_bytes(const MoeShape *s);
void moe_layer_free(MoeLayer *m);
int moe_scratch_init(MoeScratch *sc, const MoeShape *s);
void moe_scratch_free(MoeScratch *sc);

/* Weights of the local experts: w1[E_local,F,C], w2[E_local,C,F]. */
typedef struct MoeWeights {
    const float *router_w; /* [E, C] */
    const float *w1, *w2;
} MoeWeights;

typedef struct MoeGrads {
    float *router_w, *w1, *w2;
} MoeGrads;

/* out[N,C] from x[N,C]. Collective over the EP group. phase_s (may be NULL)
 * accumulates seconds per timing phase. */
void moe_forward(float *out, MoeLayer *m, const float *x, const MoeWeights *w, const MoeShape *s,
                 const Comm *comm, double *phase_s);

/* dx[N,C] overwritten; weight gradients accumulated. Collective. */
void moe_backward(float *dx, const MoeGrads *g, const float *dout, const float *x,
                  const MoeWeights *w, MoeLayer *m, MoeScratch *sc, const MoeShape *s,
                  const Comm *comm, double *phase_s);

#ifdef __cplusplus
}
#endif
#endif
