/* train: the training loop — one step reads like the list in ARCHITECTURE.md
 * (batch, forward, backward, gradient all-reduce, clip, AdamW, record) —
 * plus evaluation, the progress line and the final summary. */
#ifndef MOESIM_TRAIN_H
#define MOESIM_TRAIN_H

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/data.h"
#include "moesim/model.h"
#include "moesim/optim.h"
#include "moesim/platform.h"
#include "moesim/reduce.h"
#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StepStats {
    double loss, ce_loss, aux_loss, z_loss; /* of the global batch */
    double importance_loss, load_loss;
    double lr, grad_norm, seconds, flops; /* flops: summed over ranks */
    long tokens, dropped, assignments;    /* global */
    /* global expert rows computed, and of them those computed by their
     * source rank with a shadow of the expert (moe.h) */
    long expert_rows, shadowed_rows;
    double phase_s[PHASE_COUNT];          /* this rank's time per phase */
    CommTimes comm_times;                 /* this rank's communication times */
    /* A NaN/Inf loss or gradient norm on any rank: the step made no update
     * (parameters, Adam state and expert biases unchanged). The tensor is an
     * index into Model.tensors, -1 when every gradient is finite. */
    int nonfinite, nonfinite_tensor, nonfinite_tensors;
} StepStats;

/* Routing statistics of the last step (or evaluation), global: summed over
 * ranks. L = MoE layers, E = experts. */
typedef struct RoutingStats {
    long *tokens_per_expert, *dropped_per_expert; /* [L*E] */
    double *importance, *mean_prob;               /* [L*E] */
    double *entropy, *aux_loss, *z_loss;          /* [L]; entropy in nats per token */
    double *importance_loss, *load_loss;          /* [L] */
    double *mean_abs_logit, *logsumexp_sq;        /* [L]; means over tokens (and experts) */
    double *sums;                                 /* one block behind the nine above */
    double *expert_bias;  /* [L*E] selection bias of the step (identical on every rank) */
    long *specialization; /* [L*E*categories] assignments at the last evaluation */
    /* [L] expert rows computed by their source rank with a shadow of the
     * expert (--moe-expert-shadowing); depends on the layout, like traffic */
    long *shadowed_rows;
    long *expert_rows; /* [1] expert rows computed, shadows included */
    long *counts;      /* one block behind the four above, summed over ranks in one call */
    long num_counts;
} RoutingStats;

typedef struct Trainer {
    const Config *cfg;
    const Dataset *ds;
    const Comm *comm;
    Model model;
    AdamW opt;
    int *inputs, *targets, *categories; /* [B*T] */
    RoutingStats routing;
    long *dispatch_bytes; /* [world] bytes this rank sent to each rank last step */
    /* [world] token-row bytes this rank handed the MoE exchanges for each
     * rank in the last step: forward and backward, dispatch and combine
     * (Dispatch.sent_bytes) */
    long *exchange_bytes;
    /* kept, then dropped, assignments of this rank's routing groups last
     * step, [2][moe_layers][local_groups][E]: what `moesim project` replays */
    int local_groups;
    long *group_counts;
    int moe_layers;
    /* The exact reductions of statistics (reduce.h): this rank's per-grain
     * rows [grains][grain_width] (cross-entropy, then each MoE layer's
     * routing_grain_width sums), their global sums, and every rank's rows. */
    int grain_width;
    double *grain_rows, *grain_totals, *gathered;
    uint8_t *nonfinite_flags; /* [num_tensors] scratch of trainer_find_nonfinite_gradients */
} Trainer;

int trainer_init(Trainer *t, const Config *cfg, const Dataset *ds, const Comm *comm, char *err,
                 size_t errlen);
void trainer_free(Trainer *t);
/* One optimisation step on global batch `step`. */
void trainer_step(Trainer *t, long step, StepStats *stats);
/* The first tensor (Model.tensors order) whose gradient holds a NaN or Inf
 * on any rank, or -1; *count gets how many do. Collective. */
int trainer_find_nonfinite_gradients(Trainer *t, int *count);
/* Mean validation cross-entropy over eval_iters batches and all ranks. */
double trainer_evaluate(Trainer *t);

/* What /specialization/counts records: adds every routed slot of the N tokens
 * (router demand, before capacity, as tokens_per_expert) to
 * counts[expert * num_categories + categories[token]]. */
void routing_count_by_category(const Routing *r, int N, const int *categories, int num_categories,
                               long *counts);

/* The whole run: training, evals, progress, the HDF5 record at cfg->out.
 * Returns 0; MOESIM_EXIT_INTERRUPTED (preempt.h) when a signal stopped it at
 * a step boundary (checkpoint saved, record "interrupted"); or -1 with err
 * (the same on every rank). */
int train_run(const Config *cfg, const Dataset *ds, const Comm *comm, const Platform *platform,
              char *err, size_t errlen);

/* `moesim bench`: tokens/s and model-FLOP utilisation against the sgemm rate
 * of the kernel in use, measured in the same run. */
/* `moesim calibrate --out CLUSTER.ini`: measures this machine for `moesim
 * project` (calibrate.c); 0, or -1 with err on every rank. Needs 2+ ranks. */
int calibrate_run(const Config *cfg, const Dataset *ds, const Comm *comm, char *err,
                  size_t errlen);
int bench_run(const Config *cfg, const Dataset *ds, const Comm *comm, const Platform *platform,
              char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
