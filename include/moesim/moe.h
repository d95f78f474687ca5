/* moe: one Mixture-of-Experts layer — route, dispatch the kept assignments
 * into one contiguous block of rows per expert (ordered by expert, then
 * source token), run each expert's FFN over its block, and combine the
 * gate-weighted outputs back per token. Dropped assignments contribute
 * nothing: the residual stream carries the token. */
#ifndef MOESIM_MOE_H
#define MOESIM_MOE_H

#include "moesim/router.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct MoeShape {
    RouterShape router;
    int F; /* expert FFN hidden size */
} MoeShape;

/* Per-layer state kept from forward to backward. */
typedef struct MoeLayer {
    Routing routing;
    int *expert_row_begin; /* [E+1] first row of each expert's block */
    int *expert_cursor;    /* [E] scratch for filling the blocks */
    int *row_token;        /* [N*K] source token of each row */
    int *row_choice;       /* [N*K] assignment t*K+k of each row */
    int *choice_row;       /* [N*K] row of each assignment, -1 when dropped */
    int num_rows;          /* kept assignments this step */
    float *x_rows;         /* [N*K, C] expert inputs */
    float *h_pre;          /* [N*K, F] */
    float *h_act;          /* [N*K, F] */
    float *y_rows;         /* [N*K, C] expert outputs */
} MoeLayer;

/* Backward scratch shared by every MoE layer. */
typedef struct MoeScratch {
    float *dy_rows; /* [N*K, C] */
    float *dh;      /* [N*K, F] */
    float *dx_rows; /* [N*K, C] */
    float *dgate;   /* [N*K] */
} MoeScratch;

int moe_layer_init(MoeLayer *m, const MoeShape *s);
void moe_layer_free(MoeLayer *m);
int moe_scratch_init(MoeScratch *sc, const MoeShape *s);
void moe_scratch_free(MoeScratch *sc);

/* out[N,C] from x[N,C]; router_w[E,C], w1[E,F,C], w2[E,C,F]. */
void moe_forward(float *out, MoeLayer *m, const float *x, const float *router_w, const float *w1,
                 const float *w2, const MoeShape *s);

/* dx[N,C] overwritten; weight gradients accumulated. */
void moe_backward(float *dx, float *drouter_w, float *dw1, float *dw2, const float *dout,
                  const float *x, const float *router_w, const float *w1, const float *w2,
                  MoeLayer *m, MoeScratch *sc, const MoeShape *s);

#ifdef __cplusplus
}
#endif
#endif
