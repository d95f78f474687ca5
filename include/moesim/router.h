/* router: the MoE gate and every routing scheme moesim compares.
 *
 * A token's assignments live in `slots` (k for the top-k family, E for
 * expert choice and soft routing). Each slot names an expert, a combine gate,
 * whether it is routed (counts as router demand) and whether it is kept (its
 * expert computes it: routed and within capacity).
 *
 * Types: topk (softmax, or sigmoid scores with an optional selection bias),
 * switch (top-1 scaled by its probability), noisy_topk (Shazeer 2017),
 * gshard_top2 (random second expert), expert_choice (Zhou 2022), sinkhorn
 * (balanced selection in training), soft (every expert, weighted).
 * Capacity per routing group with drop by position or by probability, or
 * dropless. Losses: Switch load balancing (per group, per sequence or with
 * global counts), Shazeer's importance and load losses, ST-MoE's z-loss —
 * each with its gradient. All randomness is a pure function of (seed, step,
 * layer, global token index), so every layout routes identically. */
#ifndef MOESIM_ROUTER_H
#define MOESIM_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "moesim/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum RouterType {
    ROUTER_TOPK,
    ROUTER_SWITCH,
    ROUTER_NOISY_TOPK,
    ROUTER_GSHARD_TOP2,
    ROUTER_EXPERT_CHOICE,
    ROUTER_SINKHORN,
    ROUTER_SOFT
} RouterType;

typedef enum BalancingType {
    BALANCE_AUX_LOSS,        /* Switch loss per routing group */
    BALANCE_SEQ_AUX_LOSS,    /* per sequence */
    BALANCE_GLOBAL_AUX_LOSS, /* expert counts of the whole global batch */
    BALANCE_NONE
} BalancingType;

/* Fields after z_loss_coeff default to the classic top-k router when zero. */
typedef struct RouterShape {
    int N;                  /* tokens in this micro-batch */
    int C;                  /* hidden size */
    int E;                  /* experts (all of them: routing is replicated) */
    int K;                  /* top-k; for expert_choice the k of C = cf*G*k/E */
    int G;                  /* tokens per routing group; divides N */
    int norm_topk_prob;     /* renormalise the selected gates to sum to 1 */
    double capacity_factor; /* largest in use (training or eval), sizes buffers; <= 0 dropless */
    double aux_loss_coeff;
    double z_loss_coeff;
    RouterType type;
    int sigmoid_scores;        /* sigmoid instead of softmax scores (topk only) */
    int softmax_over_selected; /* Mixtral: gates are a softmax over the k selected logits */
    int drop_by_prob;          /* on overflow keep the highest gates, not the earliest */
    int min_capacity;
    BalancingType balancing;
    int T; /* tokens per sequence, for seq_aux_loss */
    double importance_loss_coeff, load_loss_coeff;
    double jitter_eps; /* multiplicative router-input jitter in training */
    /* Group-limited routing (DeepSeek-V3): the experts form num_groups groups
     * of consecutive experts; a token selects only among those of its
     * group_topk best groups. 0 = off. Top-k family only. */
    int num_groups, group_topk;
    /* Hierarchical MoE (Shazeer et al. 2017, appendix B): a primary router
     * [hier_groups, C] picks the token's hier_group_topk best groups of
     * E / hier_groups consecutive experts; within each, the group's rows of
     * router_w pick the K / hier_group_topk best experts. The score of expert
     * j of group i is softmax(primary)_i * softmax(group i's logits)_j, a
     * distribution over all E experts. 0 = off. Top-k family only. With
     * noisy_topk both levels are noisy, the gates are G_primary_i * G_i_j and
     * the load loss is the paper's Load_H. */
    int hier_groups, hier_group_topk;
    /* Layout invariance (reduce.h): the loss is a mean over the global batch,
     * world micro-batches of N tokens (0 counts as 1), and statistics are
     * kept per grain of `grain` tokens (0: the whole micro-batch), a multiple
     * of G and T that every layout keeps on one rank. */
    int world;
    int grain;
} RouterShape;

/* One grain's statistics, Routing.grain_stats: the combine gates [E] and
 * router scores [E] summed over its tokens, then these sums. */
enum RoutingGrainScalar {
    GRAIN_ENTROPY,    /* of the softmax over h, nats */
    GRAIN_ABS_LOGIT,  /* |x·Wg| over tokens and experts */
    GRAIN_LSE_SQ,     /* logsumexp(h)^2: the z-loss before coefficient and mean */
    GRAIN_AUX,        /* sum_units sum_e f_e * (sum of the unit's scores for e) */
    GRAIN_IMPORTANCE, /* sum over the grain's groups of CV^2 of importance */
    GRAIN_LOAD,       /* sum over the grain's groups of CV^2 of smooth load */
    GRAIN_SCALARS
};
int routing_grain_width(int E); /* 2E + GRAIN_SCALARS */
int routing_grains(const RouterShape *s);
int routing_grain_tokens(const RouterShape *s);
/* The layer's losses over the global batch (coefficients included) from the
 * grain statistics summed over every grain of it: aux, z, importance, load. */
void routing_global_losses(const RouterShape *s, const double *summed_grain_stats,
                           double losses[4]);

/* What changes from call to call. */
typedef struct RouterContext {
    int training;           /* noise, jitter, sinkhorn and random routing only in training */
    double capacity_factor; /* in effect for this call; <= 0 dropless */
    uint64_t seed;
    long step;
    int layer;
    long first_token;         /* global index of this micro-batch's first token */
    const float *expert_bias; /* [E] selection bias, or NULL */
    const Matmul *matmul;     /* the router's products (x·Wg, x·Wnoise and their backward):
                                 --moe-router-precision; NULL = float32 */
} RouterContext;

typedef struct RouterWeights {
    const float *router_w; /* [E, C] */
    const float *noise_w;  /* [E, C], noisy_topk only */
    const float *group_w;  /* [hier_groups, C], hierarchical only */
    const float *group_noise_w; /* [hier_groups, C], hierarchical noisy_topk only: the
                                   primary router's noise weights */
} RouterWeights;

typedef struct RouterGrads {
    float *router_w, *noise_w, *group_w, *group_noise_w;
} RouterGrads;

/* Everything one MoE layer's router decides for one micro-batch. Buffers are
 * sized once and reused every step. */
typedef struct Routing {
    int slots;                    /* per token: K, or E for expert_choice and soft */
    float *x_in;                  /* [N,C] jittered input (jitter only) */
    float *jitter;                /* [N,C] jitter factors */
    float *logits;                /* [N,E] x·Wg^T */
    float *noise_pre;             /* [N,E] x·Wnoise^T (noisy_topk) */
    float *noise_std;             /* [N,E] softplus(noise_pre) */
    float *noise;                 /* [N,E] standard normal draws, 0 outside training */
    float *h;                     /* [N,E] logits + noise * std: what scores are made of */
    float *probs;                 /* [N,E] softmax(h), or sigmoid(h) for sigmoid scores */
    float *group_logits;          /* [N,hier_groups] x·Wgroup^T (hierarchical) */
    float *group_h;               /* [N,hier_groups] group_logits + primary noise * std */
    float *group_probs;           /* [N,hier_groups] softmax(group_h) */
    float *dgroup;                /* [N,hier_groups] d group_h */
    /* Hierarchical noisy_topk: the primary router's noise, as noise_pre..dnoise */
    float *group_noise_pre, *group_noise_std, *group_noise, *dgroup_noise; /* [N,hier_groups] */
    /* Shazeer 2017's hierarchical load (appendix B), per routing group:
     * Load_H[i*b+j] = load_primary[i] * load_within[i*b+j] / group_tokens[i],
     * kept in `load`; the d loss / d of the two factors for the backward. */
    double *load_primary, *dload_primary; /* [groups, hier_groups] */
    double *load_within, *dload_within;   /* [groups, E] over the tokens that picked group i */
    double *group_tokens;                 /* [groups, hier_groups] |X^(i)| */
    float *group_load_z;                  /* [N,hier_groups] the primary's load_z */
    int *group_load_threshold;            /* [N,hier_groups] the primary's load_threshold */
    float *lse;                   /* [N] log-sum-exp of h, for the z-loss */
    float *select_scores;         /* [N,E] what selection ranks (bias, sinkhorn) */
    int *choice_expert;           /* [N,slots] */
    float *choice_gate;           /* [N,slots] combine weights */
    unsigned char *choice_routed; /* [N,slots] counts as router demand */
    unsigned char *choice_kept;   /* [N,slots] routed and within capacity */
    float *unit_fraction;         /* [units, E] assignments share per balancing unit */
    double *unit_prob;            /* [units, E] mean score per balancing unit */
    double *importance;           /* [groups, E] sum of gates (importance loss) */
    double *load;                 /* [groups, E] smooth load (load loss) */
    float *load_z;                /* [N,E] standardised margin of the load estimator */
    int *load_threshold;          /* [N,E] expert whose noisy logit is the threshold; -1
                                     when the load has no gradient there (hierarchical: a
                                     group the token did not pick, or one it takes whole) */
    double *second_draw;          /* [N] gshard_top2: the uniform draw that decides whether
                                     the second expert gets the token (training) */
    long *tokens_per_expert;      /* [E] routed assignments, before capacity */
    long *balanced_demand;        /* [E] the routed assignments the balancing loss counts:
                                     all, or the first choices for gshard_top2 */
    long *dropped_per_expert;     /* [E] routed assignments dropped by capacity */
    float *dprobs, *dh, *dnoise;  /* [N,E] backward scratch */
    float *dx_in;                 /* [N,C] backward scratch (jitter) */
    int *group_load;              /* [E] scratch */
    int *order;                   /* [max(N*slots, E)] scratch for sorting */
    float *slot_scratch;          /* [slots] */
    double *sinkhorn_d;           /* [G+E] scratch */
    float *group_score;           /* [E] scratch: group-limited routing's group scores */
    int *group_rank;              /* [E] scratch */
    int capacity;                 /* per expert per group; 0 when dropless */
    double aux_loss, z_loss, importance_loss, load_loss; /* coefficients included */
    /* statistics for the record, summed over this micro-batch's tokens */
    double *gate_sum;     /* [E] combine gates of the routed assignments */
    double *prob_sum;     /* [E] router scores */
    double entropy_sum;   /* of the softmax over h, nats */
    double abs_logit_sum; /* |x·Wg| over tokens and experts (ST-MoE watches their size) */
    double lse_sq_sum;    /* logsumexp(h)^2 over tokens: the z-loss before its coefficient */
    double *grain_stats;  /* [grains][routing_grain_width]: the same sums per grain */
} Routing;

/* The names used by --moe-router-type and --moe-router-load-balancing-type
 * (validated by config; unknown names give ROUTER_TOPK / BALANCE_AUX_LOSS). */
RouterType router_type_from_name(const char *name);
BalancingType balancing_type_from_name(const char *name);

int router_slots(const RouterShape *s);
int router_capacity(double capacity_factor, int G, int K, int E);

int routing_init(Routing *r, const RouterShape *s);
void routing_free(Routing *r);
/* Bytes routing_init allocates. */
size_t routing_bytes(const RouterShape *s);

/* Scores, selection, gates, capacity and statistics: everything but the
 * losses. x[N,C]. */
void router_route(Routing *r, const float *x, const RouterWeights *w, const RouterShape *s,
                  const RouterContext *ctx);
/* The auxiliary losses. global_tokens_per_expert/global_tokens: balanced_demand
 * and tokens of the whole global batch, for global_aux_loss (else NULL/0). */
void router_losses(Routing *r, const RouterShape *s, const RouterContext *ctx,
                   const long *global_tokens_per_expert, long global_tokens);
/* route + losses, for a router that needs no global counts. */
void router_forward(Routing *r, const float *x, const RouterWeights *w, const RouterShape *s,
                    const RouterContext *ctx);

/* dgate[N,slots]: loss gradient w.r.t. each kept combine weight (0 elsewhere).
 * Adds the gate, auxiliary-loss and z-loss gradients: weights +=, dx[N,C] +=. */
void router_backward(float *dx, const RouterGrads *g, const float *dgate, const float *x,
                     const RouterWeights *w, Routing *r, const RouterShape *s,
                     const RouterContext *ctx);

/* DeepSeek-V3's aux-loss-free balancing: bias_e += rate * sign(mean load -
 * load_e), from the global batch's router demand. */
void router_update_expert_bias(float *bias, const long *tokens_per_expert, int E, double rate);

#ifdef __cplusplus
}
#endif
#endif
