// Router cases computed by hand: capacities, which assignment is dropped,
// gate weights with and without renormalisation, the auxiliary losses.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moesim/moe.h"
#include "moesim/router.h"
#include "router_shapes.h"

namespace {

TEST(RouterCapacity, HandComputed) {
    EXPECT_EQ(router_capacity(1.25, 2048, 2, 8), 640);
    EXPECT_EQ(router_capacity(1.0, 10, 1, 4), 3);     // ceil(2.5)
    EXPECT_EQ(router_capacity(1.1, 100, 1, 10), 11);  // 11.000000000000002 in doubles
    EXPECT_EQ(router_capacity(0.01, 10, 1, 4), 1);    // never below one slot
    EXPECT_EQ(router_capacity(2.0, 6, 2, 4), 6);
    EXPECT_EQ(router_capacity(0.5, 6, 1, 3), 1);
}

// With w = identity and C = E, the router logits are the inputs themselves.
struct HandRouter {
    RouterShape shape{};
    Routing routing{};
    std::vector<float> w;
    HandRouter(int N, int E, int K, int G, double cf, int norm_topk_prob, double aux = 0.0,
               double z = 0.0) {
        shape = classic_router(N, E, E, K, G, norm_topk_prob, cf, aux, z);
        EXPECT_EQ(routing_init(&routing, &shape), 0);
        w.assign(E * E, 0.0f);
        for (int e = 0; e < E; e++) w[e * E + e] = 1.0f;
    }
    ~HandRouter() { routing_free(&routing); }
    void route(const std::vector<float> &logits) {
        RouterWeights weights = {w.data(), nullptr, nullptr, nullptr};
        RouterContext ctx = training_context(shape);
        router_forward(&routing, logits.data(), &weights, &shape, &ctx);
    }
};

// One-hot-ish logits: token t prefers expert prefs[t] by a wide margin.
std::vector<float> preferring(const std::vector<int> &prefs, int E) {
    std::vector<float> logits(prefs.size() * E, 0.0f);
    for (size_t t = 0; t < prefs.size(); t++) logits[t * E + prefs[t]] = 3.0f;
    return logits;
}

TEST(RouterDrops, FirstComeFirstServedPerExpert) {
    HandRouter r(6, 3, 1, 6, 0.5, 0);  // capacity ceil(0.5*6*1/3) = 1
    r.route(preferring({0, 0, 1, 0, 2, 1}, 3));
    EXPECT_EQ(r.routing.capacity, 1);
    std::vector<int> kept(r.routing.choice_kept, r.routing.choice_kept + 6);
    EXPECT_EQ(kept, (std::vector<int>{1, 0, 1, 0, 1, 0}));
    EXPECT_EQ(std::vector<long>(r.routing.tokens_per_expert, r.routing.tokens_per_expert + 3),
              (std::vector<long>{3, 2, 1}));
    EXPECT_EQ(std::vector<long>(r.routing.dropped_per_expert, r.routing.dropped_per_expert + 3),
              (std::vector<long>{2, 1, 0}));
}

TEST(RouterDrops, CapacityIsPerGroup) {
    HandRouter r(6, 3, 1, 3, 1.0, 0);  // two groups of 3, capacity ceil(1*3*1/3) = 1
    r.route(preferring({0, 0, 1, 0, 2, 1}, 3));
    std::vector<int> kept(r.routing.choice_kept, r.routing.choice_kept + 6);
    // Group 0: the second token for expert 0 is dropped. Group 1 starts afresh.
    EXPECT_EQ(kept, (std::vector<int>{1, 0, 1, 1, 1, 1}));
}

TEST(RouterDrops, SecondChoicesCompeteByTokenPosition) {
    // Top-2 over 3 experts, capacity ceil(0.5*4*2/3) = 2. Every token ranks
    // experts 0 > 1 > 2, so expert 0 and 1 each get 4 requests, keep the first 2.
    HandRouter r(4, 3, 2, 4, 0.5, 1);
    std::vector<float> logits;
    for (int t = 0; t < 4; t++) logits.insert(logits.end(), {2.0f, 1.0f, 0.0f});
    r.route(logits);
    EXPECT_EQ(r.routing.capacity, 2);
    std::vector<int> kept(r.routing.choice_kept, r.routing.choice_kept + 8);
    EXPECT_EQ(kept, (std::vector<int>{1, 1, 1, 1, 0, 0, 0, 0}));
    EXPECT_EQ(r.routing.dropped_per_expert[0], 2);
    EXPECT_EQ(r.routing.dropped_per_expert[1], 2);
}

TEST(RouterGates, RenormalisedAndRaw) {
    std::vector<float> logits = {std::log(4.0f), std::log(3.0f), std::log(1.0f)};
    HandRouter renorm(1, 3, 2, 1, 4.0, 1), raw(1, 3, 2, 1, 4.0, 0);
    renorm.route(logits);
    raw.route(logits);
    EXPECT_EQ(renorm.routing.choice_expert[0], 0);
    EXPECT_EQ(renorm.routing.choice_expert[1], 1);
    EXPECT_NEAR(renorm.routing.choice_gate[0], 4.0 / 7.0, 1e-6);
    EXPECT_NEAR(renorm.routing.choice_gate[1], 3.0 / 7.0, 1e-6);
    EXPECT_NEAR(raw.routing.choice_gate[0], 0.5, 1e-6);
    EXPECT_NEAR(raw.routing.choice_gate[1], 0.375, 1e-6);
}

TEST(RouterGates, TiesGoToTheLowerExpert) {
    HandRouter r(1, 4, 2, 1, 4.0, 1);
    r.route({0.0f, 1.0f, 0.0f, 1.0f});
    EXPECT_EQ(r.routing.choice_expert[0], 1);
    EXPECT_EQ(r.routing.choice_expert[1], 3);
}

TEST(RouterLosses, SwitchAuxAndZLossByHand) {
    const double aux_coeff = 0.1, z_coeff = 0.01;
    HandRouter r(4, 2, 1, 4, 2.0, 0, aux_coeff, z_coeff);
    std::vector<float> logits = {1.0f, 0.0f, 2.0f, 0.0f, 0.0f, 1.0f, 0.5f, -1.0f};
    r.route(logits);
    // Experts chosen: 0, 0, 1, 0 -> f = (3/4, 1/4).
    double P[2] = {0, 0}, z = 0;
    for (int t = 0; t < 4; t++) {
        double a = logits[2 * t], b = logits[2 * t + 1];
        double lse = std::log(std::exp(a) + std::exp(b));
        P[0] += std::exp(a - lse) / 4;
        P[1] += std::exp(b - lse) / 4;
        z += lse * lse / 4;
    }
    double aux = aux_coeff * 2 * (0.75 * P[0] + 0.25 * P[1]);
    EXPECT_NEAR(r.routing.aux_loss, aux, 1e-7);
    EXPECT_NEAR(r.routing.z_loss, z_coeff * z, 1e-7);
    // the record's logit statistics, before their means over tokens
    EXPECT_NEAR(r.routing.abs_logit_sum, 5.5, 1e-6);
    EXPECT_NEAR(r.routing.lse_sq_sum, 4 * z, 1e-6);
}

TEST(MoeCombine, DroppedTokenOutputIsZeroAndKeptIsGateTimesExpert) {
    // 3 tokens all preferring expert 0 with capacity 1: tokens 1 and 2 drop.
    MoeShape s{};
    s.router = classic_router(3, 2, 2, 1, 3, 0, 0.5, 0.0, 0.0);
    s.F = 2;
    s.ep_size = 1;
    s.E_local = 2;
    Comm self;
    comm_attach_self(&self);
    MoeLayer m;
    ASSERT_EQ(moe_layer_init(&m, &s), 0);
    std::vector<float> x = {3.0f, 0.0f, 2.0f, 0.0f, 4.0f, 0.0f};
    std::vector<float> router_w = {1.0f, 0.0f, 0.0f, 1.0f};
    std::vector<float> w1 = {1.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f, 1.0f};
    std::vector<float> w2 = w1, out(6, -1.0f);
    MoeWeights w = {{router_w.data(), nullptr, nullptr, nullptr}, w1.data(), w2.data()};
    RouterContext ctx = training_context(s.router);
    moe_forward(out.data(), &m, x.data(), &w, &s, &ctx, &self, nullptr, nullptr);
    EXPECT_EQ(m.dispatch.num_send_rows, 1);
    double p0 = 1.0 / (1.0 + std::exp(-3.0));
    double gelu3 = 0.5 * 3.0 * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (3.0 + 0.044715 * 27.0)));
    EXPECT_NEAR(out[0], p0 * gelu3, 1e-5);
    EXPECT_EQ(out[1], 0.0f);
    for (int i = 2; i < 6; i++) EXPECT_EQ(out[i], 0.0f) << "dropped token got output";
    moe_layer_free(&m);
}

}  // namespace

namespace {

// GShard gives every token's first choice priority over any second choice;
// top-k (Megatron's position policy) goes token by token.
TEST(RouterDrops, GshardFillsFirstChoicesBeforeSecondChoices) {
    const int N = 4, E = 3, K = 2;
    std::vector<float> logits = {2, 3, 0,   // token 0: expert 1, then 0
                                 2, 3, 0,   // token 1: expert 1, then 0
                                 3, 0, 2,   // token 2: expert 0, then 2
                                 3, 2, 0};  // token 3: expert 0, then 1
    std::vector<float> w(E * E, 0.0f);
    for (int e = 0; e < E; e++) w[e * E + e] = 1.0f;
    auto kept_for = [&](RouterType type) {
        RouterShape s = classic_router(N, E, E, K, N, 1, 0.75, 0.0, 0.0);  // capacity 2
        s.type = type;
        Routing r;
        EXPECT_EQ(routing_init(&r, &s), 0);
        RouterContext ctx = training_context(s);
        ctx.training = 0;  // GShard's second expert is then always dispatched
        RouterWeights weights = {w.data(), nullptr, nullptr, nullptr};
        router_forward(&r, logits.data(), &weights, &s, &ctx);
        std::vector<int> kept(r.choice_kept, r.choice_kept + N * K);
        EXPECT_EQ(r.capacity, 2);
        routing_free(&r);
        return kept;
    };
    EXPECT_EQ(kept_for(ROUTER_GSHARD_TOP2), (std::vector<int>{1, 0, 1, 0, 1, 1, 1, 0}));
    EXPECT_EQ(kept_for(ROUTER_TOPK), (std::vector<int>{1, 1, 1, 1, 0, 1, 0, 0}));
}

}  // namespace
