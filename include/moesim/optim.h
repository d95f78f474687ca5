/* optim: AdamW with decoupled weight decay, global-norm gradient clipping,
 * the learning-rate schedule (linear warmup, cosine decay to min-lr), and
 * freezing (--freeze: frozen tensors are skipped by the update and the norm). */
#ifndef MOESIM_OPTIM_H
#define MOESIM_OPTIM_H

#include "moesim/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct AdamW {
    double beta1, beta2, eps, weight_decay;
    long t; /* steps taken */
} AdamW;

/* Learning rate at 0-based step: warmup from lr/warmup to lr over `warmup`
 * steps, then cosine to min_lr at step total-1. */
double lr_at_step(long step, long total, long warmup, double lr, double min_lr);

/* Sum of squares of n gradient values (accumulated in double). */
double grad_sum_squares(const float *g, size_t n);
/* grad_sum_squares of the dense gradients (identical on every rank) of the
 * tensors that train: frozen ones are left out of the clipping norm, as
 * Megatron's norm covers only parameters with requires_grad. */
double trainable_dense_grad_sum_squares(const Model *m);
/* The factor on every gradient that clips their norm: clip/norm when norm
 * exceeds clip (clip > 0), else 1. */
float grad_clip_scale(double norm, double clip);

/* One AdamW update of every parameter that is not frozen, on the gradients
 * times grad_scale (the clipping, applied as they are read: the same float
 * product as scaling them in place, without a pass over them); weight decay
 * only where the tensor table says so. */
void adamw_step(AdamW *opt, Model *m, double lr, float grad_scale);

#ifdef __cplusplus
}
#endif
#endif
