/* router: the MoE gate. Linear scores without bias, softmax over experts,
 * top-k selection, optional renormalisation of the k selected probabilities,
 * capacity per routing group with drop-by-position, and the two auxiliary
 * losses (Switch load balancing, ST-MoE z-loss) with their gradients. */
#ifndef MOESIM_ROUTER_H
#define MOESIM_ROUTER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct RouterShape {
    int N; /* tokens in this micro-batch */
    int C; /* hidden size */
    int E; /* experts (all of them: routing is replicated) */
    int K; /* top-k */
    int G; /* tokens per routing group; divides N */
    int norm_topk_prob;
    double capacity_factor;
    double aux_loss_coeff;
    double z_loss_coeff;
} RouterShape;

/* Everything one MoE layer's router decides for one micro-batch. Buffers are
 * sized once for N tokens and reused every step. */
typedef struct Routing {
    float *logits;              /* [N,E] */
    float *probs;               /* [N,E] softmax over all experts */
    float *lse;                 /* [N] log-sum-exp of the logits, for the z-loss */
    int *choice_expert;         /* [N,K] selected experts, best first */
    float *choice_gate;         /* [N,K] combine weights */
    unsigned char *choice_kept; /* [N,K] 0 when capacity dropped the assignment */
    float *group_fraction;      /* [N/G, E] share of the group's N*K assignments per expert */
    long *tokens_per_expert;    /* [E] assignments chosen, before capacity */
    long *dropped_per_expert;   /* [E] assignments dropped by capacity */
    float *dprobs;              /* [N,E] backward scratch */
    int *group_load;            /* [E] scratch: kept assignments so far in a group */
    int capacity;               /* per expert per group */
    double aux_loss;            /* with its coefficient, as added to the loss */
    double z_loss;              /* with its coefficient */
    /* statistics for the record, summed over this micro-batch's tokens */
    double *gate_sum;           /* [E] combine gates of the assignments to each expert */
    double *prob_sum;           /* [E] router probabilities */
    double entropy_sum;         /* router entropy, nats */
} Routing;

int router_capacity(double capacity_factor, int G, int K, int E);

int routing_init(Routing *r, const RouterShape *s);
/* Bytes routing_init allocates. */
size_t routing_bytes(const RouterShape *s);
void routing_free(Routing *r);

/* x[N,C], w[E,C]. Fills every field of r. */
void router_forward(Routing *r, const float *x, const float *w, const RouterShape *s);

/* dgate[N,K]: loss gradient w.r.t. each combine weight (0 for dropped).
 * Adds the gate, aux-loss and z-loss gradients: dw[E,C] +=, dx[N,C] +=. */
void router_backward(float *dx, float *dw, const float *dgate, const float *x, const float *w,
                     Routing *r, const RouterShape *s);

#ifdef __cplusplus
}
#endif
#endif
