#include "moesim/optim.h"

#include <math.h>

#include "moesim/vecmath.h"

double lr_at_step(long step, long total, long warmup, double lr, double min_lr) {
    if (step < warmup) return lr * (double)(step + 1) / warmup;
    long decay_steps = total - warmup - 1;
    if (decay_steps <= 0) return lr;
    double progress = (double)(step - warmup) / decay_steps;
    if (progress > 1.0) progress = 1.0;
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(M_PI * progress));
}

double grad_sum_squares(const float *g, size_t n) {
    return dot_double(g, g, n);
}

/* One call per run of adjacent trainable tensors, so that with nothing frozen
 * this is the single sum over the dense gradients it always was, bit for bit.
 * Dense tensors fill [0, num_dense_params) in table order. */
double trainable_dense_grad_sum_squares(const Model *m) {
    double sum = 0.0;
    size_t run = 0; /* where the current run of trainable tensors starts */
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->is_expert || !t->frozen) continue;
        sum += grad_sum_squares(m->grads + run, t->offset - run);
        run = t->offset + t->numel;
    }
    return sum + grad_sum_squares(m->grads + run, m->num_dense_params - run);
}

float grad_clip_scale(double norm, double clip) {
    return clip > 0.0 && norm > clip ? (float)(clip / norm) : 1.0f;
}

typedef struct AdamCoefficients {
    float b1, b2, eps, bias1, bias2, step, decay, grad_scale;
} AdamCoefficients;

/* The update of n values. Vector lanes and the scalar tail do the same
 * IEEE operations in the same order (no contraction in ISO C mode), so a
 * value's update does not depend on where it sits in the buffer. */
static void adamw_update(float *p, float *mo, float *v, const float *g, size_t n,
                         const AdamCoefficients *c) {
    size_t j = 0;
    for (; j + VEC_LANES <= n; j += VEC_LANES) {
        vec_f gj = vec_load(g + j) * c->grad_scale, pj = vec_load(p + j);
        vec_f mj = c->b1 * vec_load(mo + j) + (1.0f - c->b1) * gj;
        vec_f vj = c->b2 * vec_load(v + j) + (1.0f - c->b2) * gj * gj;
        vec_f m_hat = mj / c->bias1, v_hat = vj / c->bias2;
        vec_store(mo + j, mj);
        vec_store(v + j, vj);
        vec_store(p + j, pj - (c->step * m_hat / (vec_sqrt(v_hat) + c->eps) + c->decay * pj));
    }
    for (; j < n; j++) {
        float gj = g[j] * c->grad_scale;
        mo[j] = c->b1 * mo[j] + (1.0f - c->b1) * gj;
        v[j] = c->b2 * v[j] + (1.0f - c->b2) * gj * gj;
        float m_hat = mo[j] / c->bias1, v_hat = v[j] / c->bias2;
        p[j] -= c->step * m_hat / (sqrtf(v_hat) + c->eps) + c->decay * p[j];
    }
}

void adamw_step(AdamW *opt, Model *m, double lr, float grad_scale) {
    opt->t++;
    AdamCoefficients c = {.b1 = (float)opt->beta1,
                          .b2 = (float)opt->beta2,
                          .eps = (float)opt->eps,
                          .bias1 = (float)(1.0 - pow(opt->beta1, (double)opt->t)),
                          .bias2 = (float)(1.0 - pow(opt->beta2, (double)opt->t)),
                          .step = (float)lr,
                          .grad_scale = grad_scale};
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        /* Frozen: no update, no decay, moments as they were (loaded or zero).
         * opt->t still counts the run's steps; a tensor unfrozen later sees
         * that bias correction, which by then is near 1 anyway. */
        if (t->frozen) continue;
        c.decay = t->decay ? (float)(lr * opt->weight_decay) : 0.0f;
        adamw_update(m->params + t->offset, m->adam_m + t->offset, m->adam_v + t->offset,
                     m->grads + t->offset, t->numel, &c);
    }
}
