// Router shapes and contexts for tests: the classic top-k router unless a
// test changes a field.
#ifndef MOESIM_TESTS_ROUTER_SHAPES_H
#define MOESIM_TESTS_ROUTER_SHAPES_H

#include <cstring>

#include "moesim/router.h"

inline RouterShape classic_router(int N, int C, int E, int K, int G, int norm_topk_prob,
                                  double capacity_factor, double aux_loss_coeff,
                                  double z_loss_coeff) {
    RouterShape s;
    std::memset(&s, 0, sizeof s);
    s.N = N;
    s.C = C;
    s.E = E;
    s.K = K;
    s.G = G;
    s.norm_topk_prob = norm_topk_prob;
    s.capacity_factor = capacity_factor;
    s.aux_loss_coeff = aux_loss_coeff;
    s.z_loss_coeff = z_loss_coeff;
    s.T = G;
    return s;
}

// A training step's context with the shape's capacity factor in effect.
inline RouterContext training_context(const RouterShape &s, long step = 0, long first_token = 0) {
    RouterContext ctx;
    std::memset(&ctx, 0, sizeof ctx);
    ctx.training = 1;
    ctx.capacity_factor = s.capacity_factor;
    ctx.seed = 1234;
    ctx.step = step;
    ctx.first_token = first_token;
    return ctx;
}

#endif
