/* optim: AdamW with decoupled weight decay, global-norm gradient clipping,
 * and the learning-rate schedule (linear warmup, cosine decay to min-lr). */
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
/* Scales every gradient by clip/norm when norm exceeds clip (clip > 0). */
void clip_gradients(float *g, size_t n, double norm, double clip);

/* One AdamW update of every parameter; weight decay only where the tensor
 * table says so. */
void adamw_step(AdamW *opt, Model *m, double lr);

#ifdef __cplusplus
}
#endif
#endif
