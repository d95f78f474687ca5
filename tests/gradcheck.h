// Finite-difference gradient checking shared by the backward tests.
#ifndef MOESIM_TESTS_GRADCHECK_H
#define MOESIM_TESTS_GRADCHECK_H

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moesim/model.h"
#include "moesim/rng.h"

struct GradCheck {
    double max_error = 0.0;  // worst |analytic - numeric| / max(|analytic| + |numeric|, floor)
    size_t worst_index = 0;
    double worst_analytic = 0.0, worst_numeric = 0.0;
    int checked = 0, skipped = 0;
};

// Random values in [-scale, scale), deterministic from seed.
inline std::vector<float> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
    Rng rng = {rng_mix64(seed)};
    std::vector<float> v(n);
    for (auto &x : v) x = (float)(scale * (2.0 * rng_uniform(&rng) - 1.0));
    return v;
}

// Central differences of `loss` with respect to x[i] for up to `samples`
// coordinates (all when n <= samples), against grad[i]. `stable` may veto a
// coordinate whose perturbation changed a discrete decision (routing): the
// derivative does not exist there. The floor keeps near-zero components from
// dominating: it is 1e-3 of the largest analytic component.
inline GradCheck check_gradient(float *x, size_t n, const float *grad,
                                const std::function<double()> &loss, int samples, float eps,
                                uint64_t seed, const std::function<bool()> &stable = nullptr) {
    GradCheck r;
    double max_grad = 0.0;
    for (size_t i = 0; i < n; i++) max_grad = std::fmax(max_grad, std::fabs(grad[i]));
    double floor = 1e-3 * max_grad + 1e-12;
    Rng rng = {rng_mix64(seed)};
    size_t count = n <= (size_t)samples ? n : (size_t)samples;
    for (size_t s = 0; s < count; s++) {
        size_t i = n <= (size_t)samples ? s : (size_t)(rng_next(&rng) % n);
        float saved = x[i];
        x[i] = saved + eps;
        double plus = loss();
        bool ok = !stable || stable();
        x[i] = saved - eps;
        double minus = loss();
        ok = ok && (!stable || stable());
        x[i] = saved;
        if (!ok) {
            r.skipped++;
            continue;
        }
        double numeric = (plus - minus) / (2.0 * (double)eps);
        double err = std::fabs(grad[i] - numeric) /
                     std::fmax(std::fabs(grad[i]) + std::fabs(numeric), floor);
        r.checked++;
        if (err > r.max_error) {
            r.max_error = err;
            r.worst_index = i;
            r.worst_analytic = grad[i];
            r.worst_numeric = numeric;
        }
    }
    return r;
}

// Directional derivatives of `loss` along the gradient itself and along random
// sign vectors, each a unit vector times eps: every coordinate contributes, so
// the signal is the gradient's norm rather than one small component, and
// float32 rounding of the loss stays far below it. Error of a direction:
// |analytic - numeric| / max(|analytic| + |numeric|, 1e-2 * ||grad||).
inline GradCheck check_directions(float *x, size_t n, const float *grad,
                                  const std::function<double()> &loss, int random_directions,
                                  float eps, uint64_t seed,
                                  const std::function<bool()> &stable = nullptr) {
    GradCheck r;
    double norm = 0.0;
    for (size_t i = 0; i < n; i++) norm += (double)grad[i] * grad[i];
    norm = std::sqrt(norm);
    if (norm == 0.0) return r;
    std::vector<float> saved(x, x + n), dir(n);
    Rng rng = {rng_mix64(seed)};
    for (int d = 0; d <= random_directions; d++) {
        for (size_t i = 0; i < n; i++)
            dir[i] = d == 0 ? (float)(grad[i] / norm)
                            : (float)((rng_next(&rng) & 1 ? 1.0 : -1.0) / std::sqrt((double)n));
        double analytic = 0.0;
        for (size_t i = 0; i < n; i++) analytic += (double)grad[i] * dir[i];
        for (size_t i = 0; i < n; i++) x[i] = saved[i] + eps * dir[i];
        double plus = loss();
        bool ok = !stable || stable();
        for (size_t i = 0; i < n; i++) x[i] = saved[i] - eps * dir[i];
        double minus = loss();
        ok = ok && (!stable || stable());
        std::copy(saved.begin(), saved.end(), x);
        if (!ok) {
            r.skipped++;
            continue;
        }
        double numeric = (plus - minus) / (2.0 * (double)eps);
        double err = std::fabs(analytic - numeric) /
                     std::fmax(std::fabs(analytic) + std::fabs(numeric), 1e-2 * norm);
        r.checked++;
        if (err > r.max_error) {
            r.max_error = err;
            r.worst_index = (size_t)d;
            r.worst_analytic = analytic;
            r.worst_numeric = numeric;
        }
    }
    return r;
}

inline std::string describe(const GradCheck &r) {
    return "max error " + std::to_string(r.max_error) + " at index " +
           std::to_string(r.worst_index) + " (analytic " + std::to_string(r.worst_analytic) +
           ", numeric " + std::to_string(r.worst_numeric) + "), " + std::to_string(r.checked) +
           " checked, " + std::to_string(r.skipped) + " skipped";
}

// sum_i out[i] * weights[i] in double: a scalar loss whose gradient is `weights`.
inline double weighted_sum(const float *out, const std::vector<float> &weights) {
    double s = 0.0;
    for (size_t i = 0; i < weights.size(); i++) s += (double)out[i] * weights[i];
    return s;
}

// The whole-model gradient checks' tiny MoE: two blocks (dense, then MoE),
// 4 experts top-2 in groups of 6 tokens at capacity factor 0.75, so
// assignments drop, with the aux, z and importance losses on. The caller sets
// the activation, shared expert, router and precision on top.
inline void tiny_model_shape(ModelShape *s) {
    s->V = 13;
    s->T = 6;
    s->C = 8;
    s->NH = 2;
    s->L = 2;
    s->F = 10;
    s->E = 4;
    s->K = 2;
    s->Fe = 6;
    s->B = 2;
    s->G = 6;
    s->moe_layer_freq = 2;
    s->tied = 1;
    s->norm_topk_prob = 1;
    s->ep_size = 1;
    s->capacity_factor = 0.75;
    s->aux_loss_coeff = 0.1;
    s->z_loss_coeff = 0.01;
    s->importance_loss_coeff = 0.1;
    s->load_loss_coeff = s->router_type == ROUTER_NOISY_TOPK ? 0.1 : 0.0;
}

// Weights 20x the 0.02 init so every path carries signal (norm weights, at
// 1, stay), and a fixed batch of B*T tokens.
inline void tiny_model_amplify_and_batch(Model *m, std::vector<int> *inputs,
                                         std::vector<int> *targets) {
    for (size_t i = 0; i < m->num_params; i++)
        if (m->params[i] != 1.0f) m->params[i] *= 20.0f;
    int N = m->shape.B * m->shape.T, V = m->shape.V;
    inputs->resize(N);
    targets->resize(N);
    for (int i = 0; i < N; i++) (*inputs)[i] = (i * 5 + 1) % V, (*targets)[i] = (i * 3 + 2) % V;
}

#endif
