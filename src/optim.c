#include "moesim/optim.h"

#include <math.h>

double lr_at_step(long step, long total, long warmup, double lr, double min_lr) {
    if (step < warmup) return lr * (double)(step + 1) / warmup;
    long decay_steps = total - warmup - 1;
    if (decay_steps <= 0) return lr;
    double progress = (double)(step - warmup) / decay_steps;
    if (progress > 1.0) progress = 1.0;
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(M_PI * progress));
}

double grad_sum_squares(const float *g, size_t n) {
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += (double)g[i] * g[i];
    return sum;
}

void clip_gradients(float *g, size_t n, double norm, double clip) {
    if (clip <= 0.0 || norm <= clip) return;
    float scale = (float)(clip / norm);
    for (size_t i = 0; i < n; i++) g[i] *= scale;
}

void adamw_step(AdamW *opt, Model *m, double lr) {
    opt->t++;
    float b1 = (float)opt->beta1, b2 = (float)opt->beta2, eps = (float)opt->eps;
    float bias1 = (float)(1.0 - pow(opt->beta1, (double)opt->t));
    float bias2 = (float)(1.0 - pow(opt->beta2, (double)opt->t));
    float step = (float)lr;
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        float decay = t->decay ? (float)(lr * opt->weight_decay) : 0.0f;
        float *p = m->params + t->offset, *g = m->grads + t->offset;
        float *mo = m->adam_m + t->offset, *v = m->adam_v + t->offset;
        for (size_t j = 0; j < t->numel; j++) {
            mo[j] = b1 * mo[j] + (1.0f - b1) * g[j];
            v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
            float m_hat = mo[j] / bias1, v_hat = v[j] / bias2;
            p[j] -= step * m_hat / (sqrtf(v_hat) + eps) + decay * p[j];
        }
    }
}
