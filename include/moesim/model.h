/* model: the decoder-only MoE transformer. Parameters, gradients and both
 * Adam moments each live in one buffer with the same layout (dense tensors
 * first, then expert tensors, so expert gradients are one contiguous tail);
 * named views point into them. Forward and backward for one micro-batch. */
#ifndef MOESIM_MODEL_H
#define MOESIM_MODEL_H

#include <stddef.h>

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/grad_overlap.h"
#include "moesim/moe.h"
#include "moesim/placement.h"
#include "moesim/reduce.h"
#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ModelShape {
    int V, T, C, NH, L, F; /* vocab, seq length, hidden, heads, layers, dense FFN */
    int E, K, Fe, G;       /* experts, top-k, expert FFN, routing group */
    int B;                 /* sequences per micro-batch */
    int ep_size, ep_rank;
    int hierarchical_dispatch; /* --moe-token-dispatcher-type hierarchical */
    int overlap_chunks;        /* --moe-overlap-chunks */
    int expert_shadowing;      /* --moe-expert-shadowing */
    int shadow_min_rows;       /* --moe-shadow-min-rows */
    int overlap_grad_reduce;   /* --overlap-grad-reduce: buckets reduce during backward */
    int moe_layer_freq;
    int tied; /* LM head shares the token embedding */
    int norm_topk_prob;
    double capacity_factor, aux_loss_coeff, z_loss_coeff; /* capacity factor of training */
    double eval_capacity_factor;
    RouterType router_type;
    int sigmoid_scores, softmax_over_selected, drop_by_prob, min_capacity;
    BalancingType balancing;
    double importance_loss_coeff, load_loss_coeff, jitter_eps;
    int expert_bias; /* DeepSeek-V3 selection bias per expert */
    FfnActivation expert_activation;
    int shared_F;                     /* shared expert hidden size; 0 = none */
    int router_groups, router_group_topk; /* group-limited routing; 0 = off */
    int hier_groups, hier_group_topk;     /* hierarchical MoE (router.h); 0 = off */
    double init_std;                      /* --init-method-std; 0 (hand-built shapes) = 0.02 */
    double expert_dropout;                /* --moe-expert-dropout */
    MatmulPrecision precision;        /* inputs of every matmul but the router's */
    MatmulPrecision router_precision; /* the router's (Switch's selective precision) */
    Bf16GemmChoice bf16_gemm;         /* how bf16 products run (0: auto) */
    /* Layout invariance (reduce.h): grain = tokens every layout keeps on one
     * rank in the same order, lcm(G, T); world = micro-batches in the global
     * batch, whose mean the loss is (1 until the trainer sets it). */
    int grain, world;
} ModelShape;

/* Grains in this rank's micro-batch. */
int model_grains(const ModelShape *s);
/* Rows an expert shadow must take off the busiest rank; 0: no shadowing. */
int model_shadow_min_gain(const ModelShape *s);

/* ep_size/ep_rank place this rank's expert shard (1/0 for the whole model). */
void model_shape_from_config(ModelShape *s, const Config *cfg, int vocab_size, int ep_size,
                             int ep_rank);
/* Which experts this rank holds (placement.h). */
Placement model_placement(const ModelShape *s);
int model_local_experts(const ModelShape *s);
int model_is_moe_layer(const ModelShape *s, int layer);

typedef struct LayerWeights {
    float *ln1_w;        /* [C] */
    float *qkv_w;        /* [3C, C] */
    float *proj_w;       /* [C, C] */
    float *ln2_w;        /* [C] */
    float *fc1_w;        /* [F, C]   dense layers */
    float *fc2_w;        /* [C, F]   dense layers */
    float *router_w;     /* [E, C]   MoE layers */
    float *noise_w;      /* [E, C]   noisy_topk MoE layers */
    float *router_group_w; /* [hier_groups, C] hierarchical MoE layers: the primary router */
    float *router_group_noise_w; /* [hier_groups, C] hierarchical noisy_topk: its noise weights */
    float *shared_fc1_w; /* [shared_F * rows, C] MoE layers with a shared expert */
    float *shared_fc2_w; /* [C, shared_F] */
    float *expert_fc1_w; /* [E_local, Fe, C] MoE layers, this rank's experts */
    float *expert_fc2_w; /* [E_local, C, Fe] MoE layers */
} LayerWeights;

typedef struct Weights {
    float *wte;           /* [V, C] */
    float *wpe;           /* [T, C] */
    float *lnf_w;         /* [C] */
    float *lm_head_w;     /* [V, C], the same memory as wte when tied */
    LayerWeights *layers; /* [L] */
} Weights;

typedef enum ParamInit { PARAM_INIT_NORMAL, PARAM_INIT_ONES, PARAM_INIT_ZEROS } ParamInit;

/* What a tensor is for: the --freeze groups (config.h) are sets of roles. */
typedef enum ParamRole {
    PARAM_ROLE_EMBEDDING,     /* wte, wpe */
    PARAM_ROLE_ATTENTION,     /* ln1 (it feeds only attention), qkv, proj */
    PARAM_ROLE_NORM,          /* ln2 (before the FFN or MoE layer), lnf */
    PARAM_ROLE_DENSE_FFN,     /* fc1, fc2 of dense layers */
    PARAM_ROLE_HEAD,          /* lm_head when untied */
    PARAM_ROLE_ROUTER,        /* router_w, noise_w, router_group_w, router_group_noise_w */
    PARAM_ROLE_SHARED_EXPERT, /* the always-on expert of an MoE layer */
    PARAM_ROLE_EXPERT         /* routed experts (is_expert) */
} ParamRole;

typedef struct ParamTensor {
    char name[48];
    size_t offset, numel;
    int ndim, shape[3];
    int is_expert;
    int decay; /* weight decay applies (matrices, not norms) */
    ParamRole role;
    int frozen; /* --freeze: AdamW leaves it and its moments alone (model_freeze) */
    ParamInit init;
    double init_std; /* for PARAM_INIT_NORMAL */
} ParamTensor;

typedef struct LayerActs {
    float *resid_in;       /* [N, C] */
    float *ln1, *ln1_rstd; /* [N, C], [N] */
    float *qkv;            /* [N, 3C] */
    float *att;            /* [B, NH, T, T] */
    float *att_out;        /* [N, C] */
    float *resid_mid;      /* [N, C] */
    float *ln2, *ln2_rstd;
    float *h_pre, *h_act;               /* [N, F] dense layers */
    float *shared_h_pre, *shared_h_act; /* [N, shared_F * rows], [N, shared_F] */
} LayerActs;

typedef struct Model {
    ModelShape shape;
    const Comm *comm; /* the EP group carries the token exchange */
    size_t num_params, num_dense_params;
    float *params, *grads, *adam_m, *adam_v;
    Weights w, dw;
    ParamTensor *tensors;
    int num_tensors;
    unsigned frozen_groups; /* FREEZE_* bits of model_freeze; 0 = everything trains */
    /* activations for one micro-batch of N = B*T tokens */
    LayerActs *acts;
    MoeLayer *moe; /* [L], initialised for MoE layers only */
    MoeShape moe_shape;
    MoeScratch moe_scratch;
    float *resid_out, *lnf, *lnf_rstd, *probs; /* [N,C], [N,C], [N], [N,V] */
    float *tmp;                                /* [N, C] */
    int *inputs, *targets;                     /* [N] copies of the current batch */
    /* backward scratch */
    float *dresid, *dln, *dtmp, *dqkv, *datt, *dh; /* [N,C] x3, [N,3C], [T,T], [N,F] */
    float *shared_dh;                              /* [N, shared_F * rows] */
    float **expert_bias;      /* [L] -> [E], MoE layers with a selection bias */
    RouterContext router_ctx; /* set by the trainer before each forward: training, step,
                                 seed, first_token; layer, bias, capacity and matmul
                                 filled here */
    Matmul matmul;            /* every product at shape.precision; owns the bf16 scratch */
    Matmul router_matmul;     /* the router's, at shape.router_precision: a view of matmul */
    /* Weight gradients per grain, for the exact reduction: dense_partials
     * [grains] of num_dense_params (the first is grads itself), and
     * expert_partials [ep_size * grains] of the expert tail (the first is
     * grads + num_dense_params), one per (source rank, grain) of the rows an
     * expert receives. dense_split routes the token-row products. */
    float **dense_partials, **expert_partials;
    RowSplit dense_split;
    double *grain_ce; /* [grains] mean cross-entropy of each grain, last forward */
    ExactSum exact;   /* scratch of model_reduce_gradients */
    /* --overlap-grad-reduce: the buckets model_backward starts and
     * model_reduce_gradients finishes (grad_overlap.h). */
    GradOverlap grad_overlap;
    /* --overlap-grad-reduce: when the backward pass reached its first ready
     * point this step (timer_now_s), or -1. From then until the reduction
     * ends, buckets are in flight: the trainer's in_flight/grad_reduce. */
    double grad_reduce_start_s;
    /* results of the last forward */
    double ce_loss, aux_loss, z_loss, importance_loss, load_loss;
    double phase_s[PHASE_COUNT]; /* seconds per phase, accumulated until reset */
    /* Communication times of the step beside phase_s (timing.h): the
     * trainer fills the gradient reduction's and adds each MoE layer's
     * exchanges (Dispatch.times) at the step's end. */
    CommTimes comm_times;
} Model;

/* Allocates everything and initialises the weights from seed: each expert's
 * weights depend on its global index only, so a shard equals the same
 * experts of the 1-rank model. Returns 0, or -1 when memory runs out. */
int model_init(Model *m, const ModelShape *s, long seed, const Comm *comm);
void model_free(Model *m);

/* The FREEZE_* group (config.h) a role belongs to. */
unsigned model_role_freeze_group(ParamRole role);
/* Marks every tensor in the FREEZE_* groups frozen (and the rest trainable);
 * the same on every rank, so layouts agree. */
void model_freeze(Model *m, unsigned groups);

/* Runs the forward pass on inputs/targets [B*T] (collective over the EP
 * group when experts are sharded); returns the total loss
 * (cross-entropy + auxiliary + z-loss) and sets ce_loss, aux_loss, z_loss. */
double model_forward(Model *m, const int *inputs, const int *targets);
/* Accumulates the gradient of the last forward's total loss into grads.
 * With shape.overlap_grad_reduce it also starts the reduction of each
 * layer's gradients as soon as they are final (collective); then
 * model_reduce_gradients must follow, before grads are read and before the
 * next backward. */
void model_backward(Model *m);
void model_zero_grad(Model *m);
/* grads <- the gradient of the global batch's loss: every grain's partial
 * summed exactly, dense ones over the world and expert ones over the
 * expert-data-parallel group, whose ranks together hold one partial per
 * grain for each expert. The same bits in every layout. Collective. */
void model_reduce_gradients(Model *m);
/* With --overlap-grad-reduce it finishes what model_backward started (and
 * model_zero_grad reset grad_reduce_start_s): the same bits. Without a backward pass
 * before it, it reduces every bucket now. */

/* Matmul FLOPs this rank did in the last forward + backward (6 per
 * multiply-add over forward and backward), counting the expert rows it
 * actually processed. */
double model_step_flops(const Model *m);

/* Bytes of parameters this rank holds (its dense replica + its experts). */
size_t model_param_bytes(const Model *m);
/* Every byte model_init allocates: parameters, gradients, both Adam moments,
 * activations, MoE exchange buffers and backward scratch. */
size_t model_memory_bytes(const Model *m);
/* model_memory_bytes of the model model_init would build from s, without
 * building it (0 when even planning it runs out of memory). */
size_t model_planned_bytes(const ModelShape *s);

#ifdef __cplusplus
}
#endif
#endif
