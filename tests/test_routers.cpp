// Every routing scheme pinned down: finite-difference checks of
// router_forward/router_backward for each router type, balancing type, input
// jitter, drop policy and dropless capacity; then the behaviour that defines
// each scheme, checked by hand (switch, expert choice, soft, capacity and drop
// policies, GShard's random second expert, noisy top-k, Sinkhorn, the expert
// bias, jitter, the auxiliary losses) and that the z-loss lowers the logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <string>
#include <vector>

#include "gradcheck.h"
#include "moesim/ops.h"
#include "moesim/router.h"
#include "router_shapes.h"

namespace {

// Float32 forwards with central differences leave ~1e-3 relative noise; a
// wrong gradient term shows up at O(1). As in test_grad.cpp.
constexpr double kTolerance = 1e-2;
// The routers' losses are smooth between routing flips (truncation error
// ~1e-4 here), while float32 rounding of the loss reaches 2% on components
// 200x below the largest at eps 2e-3: a larger step is the more exact one.
constexpr float kEps = 1e-2f;

long sum_longs(const long *v, int n) {
    long s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return s;
}

std::vector<double> softmax(const float *logits, int E) {
    double max = logits[0], sum = 0.0;
    for (int e = 1; e < E; e++) max = std::max(max, (double)logits[e]);
    std::vector<double> p(E);
    for (int e = 0; e < E; e++) sum += p[e] = std::exp(logits[e] - max);
    for (auto &v : p) v /= sum;
    return p;
}

double sigmoid(double v) {
    return 1.0 / (1.0 + std::exp(-v));
}

// Population coefficient of variation of v.
double coefficient_of_variation(const std::vector<double> &v) {
    double mean = 0.0, var = 0.0;
    for (double x : v) mean += x / v.size();
    for (double x : v) var += (x - mean) * (x - mean) / v.size();
    return std::sqrt(var) / mean;
}

// ---- A. gradients by finite differences -----------------------------------

struct GradCase {
    const char *name;
    void (*configure)(RouterShape &s, RouterContext &ctx);
    bool bias;   // pass an expert bias in the context
    bool drops;  // capacity must drop assignments (else: none dropped)
};

void PrintTo(const GradCase &c, std::ostream *os) {
    *os << c.name;
}

// N=12 tokens of C=6 in two groups of G=6, E=4 experts; router weights large
// enough that capacity drops where it applies. Loss = sum of slot weight *
// gate over kept slots + every auxiliary loss.
struct GradRouter {
    RouterShape shape;
    RouterContext ctx;
    Routing routing{};
    std::vector<float> x, router_w, noise_w, group_w, group_noise_w, bias, slot_weights;
    std::vector<int> base_expert, base_threshold, base_group_threshold;
    std::vector<unsigned char> base_routed, base_kept;

    explicit GradRouter(const GradCase &c) {
        shape = classic_router(12, 6, 4, 2, 6, 0, 1.0, 0.3, 0.05);
        shape.importance_loss_coeff = 0.2;
        ctx = training_context(shape);
        c.configure(shape, ctx);
        bias = {0.12f, -0.08f, 0.05f, -0.1f};
        if (c.bias) ctx.expert_bias = bias.data();
        EXPECT_EQ(routing_init(&routing, &shape), 0);
        x = random_vector((size_t)shape.N * shape.C, 60);
        router_w = random_vector((size_t)shape.E * shape.C, 61, 1.5);
        noise_w = random_vector((size_t)shape.E * shape.C, 62, 0.7);
        group_w = random_vector((size_t)shape.hier_groups * shape.C, 64, 1.5);
        group_noise_w = random_vector((size_t)shape.hier_groups * shape.C, 65, 0.7);
        slot_weights = random_vector(assignments(), 63);
        loss();
        base_expert.assign(routing.choice_expert, routing.choice_expert + assignments());
        base_routed.assign(routing.choice_routed, routing.choice_routed + assignments());
        base_kept.assign(routing.choice_kept, routing.choice_kept + assignments());
        if (noisy()) base_threshold = thresholds();
        if (noisy_groups()) base_group_threshold = group_thresholds();
    }
    ~GradRouter() { routing_free(&routing); }
    GradRouter(const GradRouter &) = delete;
    GradRouter &operator=(const GradRouter &) = delete;

    bool noisy() const { return shape.type == ROUTER_NOISY_TOPK; }
    bool hierarchical() const { return shape.hier_groups > 0; }
    bool noisy_groups() const { return noisy() && hierarchical(); }
    std::vector<int> group_thresholds() const {
        return std::vector<int>(routing.group_load_threshold,
                                routing.group_load_threshold + (size_t)shape.N * shape.hier_groups);
    }
    size_t assignments() const { return (size_t)shape.N * router_slots(&shape); }
    std::vector<int> thresholds() const {
        return std::vector<int>(routing.load_threshold,
                                routing.load_threshold + (size_t)shape.N * shape.E);
    }
    RouterWeights weights() const {
        return RouterWeights{router_w.data(), noisy() ? noise_w.data() : nullptr,
                             hierarchical() ? group_w.data() : nullptr,
                             noisy_groups() ? group_noise_w.data() : nullptr};
    }
    double loss() {
        RouterWeights w = weights();
        router_route(&routing, x.data(), &w, &shape, &ctx);
        // One rank: this router's demand is the whole global batch's.
        router_losses(&routing, &shape, &ctx, routing.balanced_demand, shape.N);
        double s = routing.aux_loss + routing.z_loss + routing.importance_loss + routing.load_loss;
        for (size_t a = 0; a < assignments(); a++)
            if (routing.choice_kept[a]) s += (double)slot_weights[a] * routing.choice_gate[a];
        return s;
    }
    // A perturbation that changes a discrete decision has no derivative.
    bool stable() const {
        size_t n = assignments();
        return std::equal(base_expert.begin(), base_expert.end(), routing.choice_expert) &&
               std::equal(base_routed.begin(), base_routed.end(), routing.choice_routed,
                          routing.choice_routed + n) &&
               std::equal(base_kept.begin(), base_kept.end(), routing.choice_kept,
                          routing.choice_kept + n) &&
               (!noisy() || thresholds() == base_threshold) &&
               (!noisy_groups() || group_thresholds() == base_group_threshold);
    }
    long dropped() const { return sum_longs(routing.dropped_per_expert, shape.E); }
    // Gradients at the current point: dx, d router_w, d noise_w, d group_w,
    // d group_noise_w.
    void backward(std::vector<float> &dx, std::vector<float> &dw, std::vector<float> &dnw,
                  std::vector<float> &dgw, std::vector<float> &dgnw) {
        loss();
        std::vector<float> dgate(assignments());
        for (size_t a = 0; a < assignments(); a++)
            dgate[a] = routing.choice_kept[a] ? slot_weights[a] : 0.0f;
        dx.assign(x.size(), 0.0f);
        dw.assign(router_w.size(), 0.0f);
        dnw.assign(noise_w.size(), 0.0f);
        dgw.assign(group_w.size(), 0.0f);
        dgnw.assign(group_noise_w.size(), 0.0f);
        RouterWeights w = weights();
        RouterGrads g = {dw.data(), noisy() ? dnw.data() : nullptr,
                         hierarchical() ? dgw.data() : nullptr,
                         noisy_groups() ? dgnw.data() : nullptr};
        router_backward(dx.data(), &g, dgate.data(), x.data(), &w, &routing, &shape, &ctx);
    }
};

class RoutersGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(RoutersGrad, MatchesFiniteDifferences) {
    const GradCase &c = GetParam();
    GradRouter f(c);
    const RouterShape &s = f.shape;
    if (c.drops) {
        ASSERT_GT(f.dropped(), 0) << "the case must exercise capacity drops";
    } else {
        ASSERT_EQ(f.dropped(), 0);
    }
    // Every loss term must be live, or its gradient goes unchecked.
    if (s.balancing != BALANCE_NONE) {
        EXPECT_GT(f.routing.aux_loss, 0.0);
    }
    EXPECT_GT(f.routing.z_loss, 0.0);
    EXPECT_GT(f.routing.importance_loss, 0.0);
    if (s.load_loss_coeff > 0) {
        EXPECT_GT(f.routing.load_loss, 0.0);
    }

    std::vector<float> dx, dw, dnw, dgw, dgnw;
    f.backward(dx, dw, dnw, dgw, dgnw);
    auto loss = [&] { return f.loss(); };
    auto stable = [&] { return f.stable(); };
    struct Tensor {
        std::vector<float> *p, *g;
        const char *name;
    };
    std::vector<Tensor> tensors = {{&f.x, &dx, "x"}, {&f.router_w, &dw, "router_w"}};
    if (f.noisy()) tensors.push_back({&f.noise_w, &dnw, "noise_w"});
    if (f.hierarchical()) tensors.push_back({&f.group_w, &dgw, "group_w"});
    if (f.noisy_groups()) tensors.push_back({&f.group_noise_w, &dgnw, "group_noise_w"});
    for (const Tensor &t : tensors) {
        auto res =
            check_gradient(t.p->data(), t.p->size(), t.g->data(), loss, 200, kEps, 64, stable);
        EXPECT_LT(res.max_error, kTolerance) << t.name << ": " << describe(res);
        EXPECT_GE(2 * res.checked, (int)t.p->size()) << t.name << ": too many routing flips";
    }
}

const GradCase kGradCases[] = {
    {"topk_softmax_norm0", [](RouterShape &, RouterContext &) {}, false, true},
    {"topk_softmax_norm1", [](RouterShape &s, RouterContext &) { s.norm_topk_prob = 1; }, false,
     true},
    {"topk_sigmoid_bias",
     [](RouterShape &s, RouterContext &) {
         s.sigmoid_scores = 1;
         s.norm_topk_prob = 1;
     },
     true, true},
    {"switch",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_SWITCH;
         s.K = 1;
     },
     false, true},
    {"noisy_topk",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_NOISY_TOPK;
         s.load_loss_coeff = 0.2;
     },
     false, true},
    {"gshard_top2", [](RouterShape &s, RouterContext &) { s.type = ROUTER_GSHARD_TOP2; }, false,
     true},
    {"expert_choice", [](RouterShape &s, RouterContext &) { s.type = ROUTER_EXPERT_CHOICE; }, false,
     false},
    {"sinkhorn", [](RouterShape &s, RouterContext &) { s.type = ROUTER_SINKHORN; }, false, true},
    {"soft", [](RouterShape &s, RouterContext &) { s.type = ROUTER_SOFT; }, false, false},
    {"seq_aux_loss",
     [](RouterShape &s, RouterContext &) {
         s.balancing = BALANCE_SEQ_AUX_LOSS;
         s.T = 3;
     },
     false, true},
    {"global_aux_loss",
     [](RouterShape &s, RouterContext &) { s.balancing = BALANCE_GLOBAL_AUX_LOSS; }, false, true},
    {"balancing_none", [](RouterShape &s, RouterContext &) { s.balancing = BALANCE_NONE; }, false,
     true},
    {"jitter", [](RouterShape &s, RouterContext &) { s.jitter_eps = 0.3; }, false, true},
    {"drop_by_prob",
     [](RouterShape &s, RouterContext &) {
         s.drop_by_prob = 1;
         s.norm_topk_prob = 1;
     },
     false, true},
    {"dropless", [](RouterShape &, RouterContext &ctx) { ctx.capacity_factor = 0.0; }, false,
     false},
    {"group_limited",
     [](RouterShape &s, RouterContext &ctx) {
         ctx.capacity_factor = 0.5;
         s.num_groups = 2;
         s.group_topk = 1;
     },
     false, true},
    {"group_limited_sigmoid_bias",
     [](RouterShape &s, RouterContext &) {
         s.sigmoid_scores = 1;
         s.norm_topk_prob = 1;
         s.num_groups = 4;
         s.group_topk = 2;
     },
     true, true},
    // Shazeer 2017's hierarchical MoE, 2 groups of 2 experts: k_1 = 1 group,
    // k_2 = 2 experts, gates P_i * q_j (the primary router learns from the
    // gates) and renormalised (it learns from the balancing loss only).
    {"hierarchical",
     [](RouterShape &s, RouterContext &ctx) {
         ctx.capacity_factor = 0.5;
         s.hier_groups = 2;
         s.hier_group_topk = 1;
     },
     false, true},
    {"hierarchical_norm_switch",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_SWITCH;
         s.K = 1;
         s.norm_topk_prob = 1;
         s.hier_groups = 2;
         s.hier_group_topk = 1;
     },
     false, true},
    {"hierarchical_four_groups_pick_two",
     [](RouterShape &s, RouterContext &) {
         s.hier_groups = 4;
         s.hier_group_topk = 2;
     },
     false, true},
    // Noisy at both levels with the paper's Load_H: 8 experts, so that each
    // level's smooth load has a threshold (k_1 < groups, k_2 < group size);
    // a load weight large enough that its gradients into the primary router
    // stand above the float32 rounding of the loss.
    {"hierarchical_noisy_load_one_group",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_NOISY_TOPK;
         s.load_loss_coeff = 2.0;
         s.E = 8;
         s.hier_groups = 2;
         s.hier_group_topk = 1;
     },
     false, true},
    {"hierarchical_noisy_load_two_of_four_groups",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_NOISY_TOPK;
         s.load_loss_coeff = 2.0;
         s.E = 8;
         s.hier_groups = 4;
         s.hier_group_topk = 2;
     },
     false, true},
    // both groups, 2 of 4 experts in each: the gates' two softmaxes over kept
    // logits both live, and the primary's load certain (no threshold)
    {"hierarchical_noisy_load_both_groups_top4",
     [](RouterShape &s, RouterContext &) {
         s.type = ROUTER_NOISY_TOPK;
         s.load_loss_coeff = 2.0;
         s.E = 8;
         s.K = 4;
         s.hier_groups = 2;
         s.hier_group_topk = 2;
     },
     false, true},
};

INSTANTIATE_TEST_SUITE_P(RoutersEveryScheme, RoutersGrad, ::testing::ValuesIn(kGradCases),
                         [](const ::testing::TestParamInfo<GradCase> &info) {
                             return std::string(info.param.name);
                         });

// ---- B. defining behaviours ----------------------------------------------

// C = E and router_w = identity: the inputs are the router logits.
struct LogitRouter {
    RouterShape shape;
    RouterContext ctx;
    Routing routing{};
    std::vector<float> w, noise_w;

    explicit LogitRouter(const RouterShape &s) : shape(s) {
        ctx = training_context(shape);
        EXPECT_EQ(routing_init(&routing, &shape), 0);
        w.assign((size_t)shape.E * shape.E, 0.0f);
        for (int e = 0; e < shape.E; e++) w[(size_t)e * shape.E + e] = 1.0f;
        noise_w = random_vector(w.size(), 70, 0.5);
    }
    ~LogitRouter() { routing_free(&routing); }
    LogitRouter(const LogitRouter &) = delete;
    LogitRouter &operator=(const LogitRouter &) = delete;

    void route(const std::vector<float> &logits) {
        RouterWeights weights = {w.data(), noise_w.data(), nullptr, nullptr};
        router_forward(&routing, logits.data(), &weights, &shape, &ctx);
    }
    int slots() const { return routing.slots; }
    std::vector<int> kept() const {
        return std::vector<int>(routing.choice_kept,
                                routing.choice_kept + (size_t)shape.N * slots());
    }
};

RouterShape logit_shape(int N, int E, int K, int G, double capacity_factor) {
    return classic_router(N, E, E, K, G, 0, capacity_factor, 0.0, 0.0);
}

TEST(RoutersSwitch, OneRoutedSlotGatedByItsProbability) {
    RouterShape s = logit_shape(16, 4, 1, 16, 4.0);
    s.type = ROUTER_SWITCH;
    LogitRouter r(s);
    auto logits = random_vector(16 * 4, 71, 3.0);
    r.route(logits);
    ASSERT_EQ(r.slots(), 1);
    for (int t = 0; t < 16; t++) {
        auto p = softmax(&logits[t * 4], 4);
        int best = (int)(std::max_element(p.begin(), p.end()) - p.begin());
        EXPECT_EQ(r.routing.choice_routed[t], 1) << "token " << t;
        EXPECT_EQ(r.routing.choice_expert[t], best) << "token " << t;
        EXPECT_NEAR(r.routing.choice_gate[t], p[best], 1e-6) << "token " << t;
    }
    EXPECT_EQ(sum_longs(r.routing.tokens_per_expert, 4), 16);
}

TEST(RoutersExpertChoice, EveryExpertTakesExactlyItsCapacityPerGroup) {
    const int N = 24, E = 4, K = 2, G = 8;
    RouterShape s = logit_shape(N, E, K, G, 1.0);
    s.type = ROUTER_EXPERT_CHOICE;
    LogitRouter r(s);
    auto logits = random_vector(N * E, 72, 2.0);
    r.route(logits);
    const int capacity = 4;  // ceil(1.0 * 8 * 2 / 4)
    EXPECT_EQ(r.routing.capacity, capacity);
    ASSERT_EQ(r.slots(), E);
    for (int g = 0; g < N / G; g++)
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int t = g * G; t < (g + 1) * G; t++) {
                int a = t * E + e;
                EXPECT_EQ(r.routing.choice_expert[a], e);
                taken += r.routing.choice_routed[a];
            }
            EXPECT_EQ(taken, capacity) << "group " << g << " expert " << e;
            // The expert took its highest-probability tokens.
            float lowest_taken = 2.0f, highest_left = -1.0f;
            for (int t = g * G; t < (g + 1) * G; t++) {
                float p = r.routing.probs[t * E + e];
                if (r.routing.choice_routed[t * E + e])
                    lowest_taken = std::min(lowest_taken, p);
                else
                    highest_left = std::max(highest_left, p);
            }
            EXPECT_GE(lowest_taken, highest_left) << "group " << g << " expert " << e;
        }
    for (int a = 0; a < N * E; a++) {
        EXPECT_EQ(r.routing.choice_kept[a], r.routing.choice_routed[a]) << "nothing is dropped";
        EXPECT_NEAR(r.routing.choice_gate[a], softmax(&logits[a / E * E], E)[a % E], 1e-6);
    }
    for (int e = 0; e < E; e++) EXPECT_EQ(r.routing.dropped_per_expert[e], 0);
}

TEST(RoutersExpertChoice, CapacityIsCappedByTheGroup) {
    RouterShape s = logit_shape(8, 2, 2, 4, 2.0);  // ceil(2 * 4 * 2 / 2) = 8 > G = 4
    s.type = ROUTER_EXPERT_CHOICE;
    LogitRouter r(s);
    r.route(random_vector(8 * 2, 73));
    for (int a = 0; a < 16; a++) EXPECT_EQ(r.routing.choice_kept[a], 1) << "assignment " << a;
    EXPECT_EQ(r.routing.tokens_per_expert[0], 8);
    EXPECT_EQ(r.routing.tokens_per_expert[1], 8);
}

TEST(RoutersExpertChoice, ATokenGetsZeroToManyExperts) {
    // G = 6, E = 3, k = 1, cf = 1: each expert takes 2 tokens. Experts 0 and 1
    // both want tokens 0 and 1; expert 2 wants tokens 3 and 4 over 5; token 2
    // is lukewarm everywhere.
    RouterShape s = logit_shape(6, 3, 1, 6, 1.0);
    s.type = ROUTER_EXPERT_CHOICE;
    LogitRouter r(s);
    r.route({3, 3, -3, 3, 3, -3, 0, 0, 0, -3, -3, 3, -3, -3, 3, -3, -3, 2.5});
    EXPECT_EQ(r.routing.capacity, 2);
    std::vector<int> experts_per_token(6, 0);
    for (int a = 0; a < 18; a++) experts_per_token[a / 3] += r.routing.choice_kept[a];
    EXPECT_EQ(experts_per_token, (std::vector<int>{2, 2, 0, 1, 1, 0}));
    EXPECT_EQ(sum_longs(r.routing.dropped_per_expert, 3), 0);
}

TEST(RoutersSoft, EveryTokenReachesEveryExpertWithItsProbability) {
    const int N = 10, E = 4;
    RouterShape s = logit_shape(N, E, 2, 5, 1.0);
    s.type = ROUTER_SOFT;
    LogitRouter r(s);
    auto logits = random_vector(N * E, 74, 3.0);
    r.route(logits);
    ASSERT_EQ(r.slots(), E);
    for (int t = 0; t < N; t++) {
        auto p = softmax(&logits[t * E], E);
        double sum = 0.0;
        for (int e = 0; e < E; e++) {
            int a = t * E + e;
            EXPECT_EQ(r.routing.choice_expert[a], e);
            EXPECT_EQ(r.routing.choice_routed[a], 1);
            EXPECT_EQ(r.routing.choice_kept[a], 1);
            EXPECT_NEAR(r.routing.choice_gate[a], p[e], 1e-6);
            sum += r.routing.choice_gate[a];
        }
        EXPECT_NEAR(sum, 1.0, 1e-6) << "token " << t;
    }
    EXPECT_EQ(sum_longs(r.routing.dropped_per_expert, E), 0);
    for (int e = 0; e < E; e++) EXPECT_EQ(r.routing.tokens_per_expert[e], N);
}

// Every token prefers expert 0, then expert 1, by a wide margin.
std::vector<float> all_prefer_expert_0(int N, int E) {
    auto logits = random_vector((size_t)N * E, 75, 0.2);
    for (int t = 0; t < N; t++) logits[t * E] += 3.0f, logits[t * E + 1] += 1.5f;
    return logits;
}

TEST(RoutersDropless, NothingDroppedWhenEveryTokenPrefersOneExpert) {
    const int N = 12, E = 4, K = 2;
    RouterShape s = logit_shape(N, E, K, N, 1.0);
    LogitRouter r(s);
    auto logits = all_prefer_expert_0(N, E);
    r.route(logits);
    ASSERT_GT(sum_longs(r.routing.dropped_per_expert, E), 0) << "capacity 6 must drop here";
    r.ctx.capacity_factor = 0.0;
    r.route(logits);
    EXPECT_EQ(r.routing.capacity, 0);
    EXPECT_EQ(r.routing.tokens_per_expert[0], N);
    EXPECT_EQ(r.routing.tokens_per_expert[1], N);
    EXPECT_EQ(sum_longs(r.routing.dropped_per_expert, E), 0);
    for (int a = 0; a < N * K; a++) EXPECT_EQ(r.routing.choice_kept[a], 1) << "assignment " << a;
}

TEST(RoutersDropPolicy, ProbabilityKeepsHighestGatesPositionKeepsEarliest) {
    // G = 6, E = 2, top-1, cf = 1: capacity 3. Tokens 0-4 want expert 0 with
    // logits 0.5, 2, 1, 3, 0.8 against 0; token 5 wants expert 1.
    std::vector<float> logits = {0.5f, 0, 2, 0, 1, 0, 3, 0, 0.8f, 0, -1, 0};
    RouterShape s = logit_shape(6, 2, 1, 6, 1.0);
    LogitRouter by_position(s);
    s.drop_by_prob = 1;
    LogitRouter by_prob(s);
    by_position.route(logits);
    by_prob.route(logits);
    EXPECT_EQ(by_position.routing.capacity, 3);
    EXPECT_EQ(by_position.kept(), (std::vector<int>{1, 1, 1, 0, 0, 1}));
    EXPECT_EQ(by_prob.kept(), (std::vector<int>{0, 1, 1, 1, 0, 1}));
    EXPECT_EQ(by_prob.routing.dropped_per_expert[0], 2);
    EXPECT_EQ(by_prob.routing.dropped_per_expert[1], 0);
}

TEST(RoutersDropPolicy, ProbabilityComparesFirstAndSecondChoices) {
    // Top-2 over E = 3, G = 3, cf = 0.5: capacity ceil(0.5 * 3 * 2 / 3) = 1.
    // Raw softmax gates: token 0 picks (0, 1) with (0.525, 0.475), token 1
    // picks (1, 0) with (0.6, 0.4), token 2 picks (2, 0) with (1, ~0).
    const float ln_1_5 = std::log(1.5f);
    std::vector<float> logits = {0.1f, 0, -100, -ln_1_5, 0, -100, -100, -100, 0};
    RouterShape s = logit_shape(3, 3, 2, 3, 0.5);
    LogitRouter by_position(s);
    s.drop_by_prob = 1;
    LogitRouter by_prob(s);
    by_position.route(logits);
    by_prob.route(logits);
    ASSERT_EQ(by_prob.routing.capacity, 1);
    ASSERT_EQ(by_prob.routing.choice_expert[0], 0);
    ASSERT_EQ(by_prob.routing.choice_expert[1], 1);
    ASSERT_EQ(by_prob.routing.choice_expert[2], 1);
    ASSERT_EQ(by_prob.routing.choice_expert[3], 0);
    // Expert 1: token 0's second slot (gate ~0.475) vs token 1's first (0.6).
    EXPECT_EQ(by_prob.routing.choice_kept[1], 0);
    EXPECT_EQ(by_prob.routing.choice_kept[2], 1);
    EXPECT_EQ(by_position.routing.choice_kept[1], 1);
    EXPECT_EQ(by_position.routing.choice_kept[2], 0);
    // Expert 0: token 0's first slot (~0.525) vs token 1's second (0.4).
    EXPECT_EQ(by_prob.routing.choice_kept[0], 1);
    EXPECT_EQ(by_prob.routing.choice_kept[3], 0);
}

TEST(RoutersCapacity, MinCapacityIsAFloor) {
    const int N = 8, E = 4;
    RouterShape s = logit_shape(N, E, 1, N, 0.25);  // ceil(0.25 * 8 / 4) = 1
    s.min_capacity = 3;
    LogitRouter floored(s);
    auto logits = all_prefer_expert_0(N, E);
    floored.route(logits);
    EXPECT_EQ(floored.routing.capacity, 3);
    EXPECT_EQ(floored.kept(), (std::vector<int>{1, 1, 1, 0, 0, 0, 0, 0}));
    EXPECT_EQ(floored.routing.dropped_per_expert[0], 5);

    s.capacity_factor = 1.0;  // ceil(1 * 8 / 4) = 2 is above the floor of 1
    s.min_capacity = 1;
    LogitRouter above(s);
    above.route(logits);
    EXPECT_EQ(above.routing.capacity, 2);
    EXPECT_EQ(above.routing.dropped_per_expert[0], 6);
}

// N tokens of C through random router weights, one routing group.
struct RandomRouter {
    RouterShape shape;
    RouterContext ctx;
    Routing routing{};
    std::vector<float> x, router_w, noise_w;

    RandomRouter(const RouterShape &s, uint64_t seed) : shape(s) {
        ctx = training_context(shape);
        EXPECT_EQ(routing_init(&routing, &shape), 0);
        x = random_vector((size_t)shape.N * shape.C, seed);
        router_w = random_vector((size_t)shape.E * shape.C, seed + 1);
        noise_w = random_vector((size_t)shape.E * shape.C, seed + 2, 0.5);
    }
    ~RandomRouter() { routing_free(&routing); }
    RandomRouter(const RandomRouter &) = delete;
    RandomRouter &operator=(const RandomRouter &) = delete;

    void route(const float *tokens = nullptr) {
        RouterWeights w = {router_w.data(), noise_w.data(), nullptr, nullptr};
        router_forward(&routing, tokens ? tokens : x.data(), &w, &shape, &ctx);
    }
    std::vector<unsigned char> routed() const {
        return std::vector<unsigned char>(routing.choice_routed,
                                          routing.choice_routed + (size_t)shape.N * routing.slots);
    }
};

RouterShape gshard_shape(int N) {
    RouterShape s = classic_router(N, 8, 4, 2, N, 0, 0.0, 0.0, 0.0);
    s.type = ROUTER_GSHARD_TOP2;
    return s;
}

TEST(RoutersGshard, SecondExpertRoutedWithProbabilityTwiceItsGate) {
    const int N = 20000;
    RandomRouter r(gshard_shape(N), 80);
    r.route();
    double expected = 0.0, variance = 0.0;
    long routed_second = 0;
    for (int t = 0; t < N; t++) {
        EXPECT_EQ(r.routing.choice_routed[2 * t], 1) << "first slot of token " << t;
        double p = std::min(1.0, 2.0 * r.routing.choice_gate[2 * t + 1]);
        expected += p;
        variance += p * (1.0 - p);
        routed_second += r.routing.choice_routed[2 * t + 1];
    }
    ASSERT_GT(variance, 100.0) << "the second expert must be a real coin flip";
    EXPECT_LT(std::fabs(routed_second - expected), 4.0 * std::sqrt(variance))
        << routed_second << " second slots routed, " << expected << " expected";
}

TEST(RoutersGshard, EvaluationRoutesBothExperts) {
    RandomRouter r(gshard_shape(200), 81);
    r.ctx.training = 0;
    r.route();
    for (auto routed : r.routed()) EXPECT_EQ(routed, 1);
}

TEST(RoutersGshard, DecisionsAreAFunctionOfContextAndGlobalTokenIndex) {
    const int N = 400;
    RandomRouter r(gshard_shape(N), 82);
    r.route();
    auto first = r.routed();
    r.route();
    EXPECT_EQ(r.routed(), first) << "same context, same decisions";
    r.ctx.first_token = 7;
    r.route();
    EXPECT_NE(r.routed(), first) << "another first_token must draw other coins";

    // The second half routed alone, as another rank would, decides the same.
    RandomRouter half(gshard_shape(N / 2), 82);
    half.router_w = r.router_w;
    half.ctx.first_token = N / 2;
    half.route(r.x.data() + (size_t)(N / 2) * r.shape.C);
    EXPECT_TRUE(std::equal(first.begin() + N, first.end(), half.routed().begin()));
}

TEST(RoutersGshard, BalancingLossCountsFirstChoicesOnly) {
    // GShard's Algorithm 1: l_aux = mean_e (c_e / S) * m_e with c_e the
    // tokens whose first choice is e; in our coeff * E * sum_e f_e P_e form,
    // f_e = first choices of e / S, whatever happens to the second choices.
    const int N = 64, E = 4;
    RouterShape s = gshard_shape(N);
    s.aux_loss_coeff = 0.5;
    RandomRouter r(s, 83);
    r.route();
    router_losses(&r.routing, &s, &r.ctx, r.routing.balanced_demand, N);
    std::vector<double> first(E, 0.0), mean_prob(E, 0.0);
    long second_routed = 0;
    for (int t = 0; t < N; t++) {
        first[r.routing.choice_expert[2 * t]] += 1.0 / N;
        second_routed += r.routing.choice_routed[2 * t + 1];
        for (int e = 0; e < E; e++) mean_prob[e] += r.routing.probs[t * E + e] / N;
    }
    ASSERT_GT(second_routed, 0) << "some second choices must be routed";
    double expected = 0.0;
    for (int e = 0; e < E; e++) {
        expected += 0.5 * E * first[e] * mean_prob[e];
        EXPECT_EQ(r.routing.balanced_demand[e], std::lround(first[e] * N)) << "expert " << e;
    }
    EXPECT_NEAR(r.routing.aux_loss, expected, 1e-6);
}

// Shazeer 2017's hierarchical MoE, by hand: one token, C = 1, x = 1, so the
// weights are the logits. Primary logits [0, ln 1.5]: P = [0.4, 0.6]. Group
// 0's logits [ln 9, 0]: q = [0.9, 0.1]; group 1's [0, 0]: q = [0.5, 0.5].
// Scores P_i * q_j = [0.36, 0.04, 0.3, 0.3]: flat top-1 would take expert
// 0, the hierarchical router takes group 1 and in it expert 2 (the tie goes
// to the lower expert).
struct HandRouted {
    std::vector<int> experts;
    std::vector<float> gates, probs;
};

HandRouted route_by_hand(int K, int group_topk, int norm_topk_prob) {
    RouterShape s = classic_router(1, 1, 4, K, 1, norm_topk_prob, 0.0, 0.0, 0.0);
    s.T = 1;
    s.hier_groups = 2;
    s.hier_group_topk = group_topk;
    std::vector<float> x = {1.0f}, router_w = {logf(9.0f), 0.0f, 0.0f, 0.0f},
                       group_w = {0.0f, logf(1.5f)};
    RouterWeights w = {router_w.data(), nullptr, group_w.data(), nullptr};
    RouterContext ctx = training_context(s);
    Routing r;
    EXPECT_EQ(routing_init(&r, &s), 0);
    router_forward(&r, x.data(), &w, &s, &ctx);
    HandRouted out{std::vector<int>(r.choice_expert, r.choice_expert + K),
                   std::vector<float>(r.choice_gate, r.choice_gate + K),
                   std::vector<float>(r.probs, r.probs + 4)};
    routing_free(&r);
    return out;
}

TEST(RoutersHierarchical, HandComputedRouting) {
    HandRouted top1 = route_by_hand(1, 1, 0);
    const float expected_probs[] = {0.36f, 0.04f, 0.3f, 0.3f};
    for (int e = 0; e < 4; e++) EXPECT_NEAR(top1.probs[e], expected_probs[e], 1e-6) << e;
    EXPECT_EQ(top1.experts, std::vector<int>({2}));
    EXPECT_NEAR(top1.gates[0], 0.3f, 1e-6);

    // k_1 = 1, k_2 = 2: both experts of group 1, gates P_1 * q_j ...
    HandRouted top2 = route_by_hand(2, 1, 0);
    EXPECT_EQ(top2.experts, std::vector<int>({2, 3}));
    EXPECT_NEAR(top2.gates[0], 0.3f, 1e-6);
    EXPECT_NEAR(top2.gates[1], 0.3f, 1e-6);
    // ... or renormalised over the token's k: Softmax(KeepTopK) in the group
    HandRouted renormalised = route_by_hand(2, 1, 1);
    EXPECT_EQ(renormalised.experts, std::vector<int>({2, 3}));
    EXPECT_NEAR(renormalised.gates[0], 0.5f, 1e-6);
    EXPECT_NEAR(renormalised.gates[1], 0.5f, 1e-6);

    // k_1 = 2 groups, k_2 = 1 each: the better group's expert first
    HandRouted both = route_by_hand(2, 2, 0);
    EXPECT_EQ(both.experts, std::vector<int>({2, 0}));
    EXPECT_NEAR(both.gates[0], 0.3f, 1e-6);
    EXPECT_NEAR(both.gates[1], 0.36f, 1e-6);
}

// DeepSeek-V3's group-limited routing: every token's experts lie in its
// group_topk best groups, a group scoring the sum of its top k/group_topk
// expert scores, and within them the choice is plain top-k.
TEST(RoutersGroupLimited, ExpertsComeFromTheBestGroupsOnly) {
    const int N = 256, E = 8, K = 4, groups = 4, M = 2, per_group = E / groups;
    RouterShape s = classic_router(N, 8, E, K, N, 0, 0.0, 0.0, 0.0);
    RandomRouter plain(s, 84);
    s.num_groups = groups;
    s.group_topk = M;
    RandomRouter limited(s, 84);
    plain.route();
    limited.route();
    int changed = 0;
    for (int t = 0; t < N; t++) {
        const float *p = limited.routing.probs + (size_t)t * E;
        std::vector<double> score(groups);
        for (int g = 0; g < groups; g++) {
            std::vector<float> members(p + g * per_group, p + (g + 1) * per_group);
            std::sort(members.rbegin(), members.rend());
            score[g] = members[0] + members[1];  // top k / M = 2
        }
        std::vector<int> order(groups);
        for (int g = 0; g < groups; g++) order[g] = g;
        std::stable_sort(order.begin(), order.end(),
                         [&](int a, int b) { return score[a] > score[b]; });
        std::vector<int> allowed;
        for (int e = 0; e < E; e++)
            if (e / per_group == order[0] || e / per_group == order[1]) allowed.push_back(e);
        std::stable_sort(allowed.begin(), allowed.end(),
                         [&](int a, int b) { return p[a] > p[b]; });
        for (int k = 0; k < K; k++)
            EXPECT_EQ(limited.routing.choice_expert[t * K + k], allowed[k])
                << "token " << t << " slot " << k;
        changed += !std::equal(plain.routing.choice_expert + t * K,
                               plain.routing.choice_expert + (t + 1) * K,
                               limited.routing.choice_expert + t * K);
    }
    EXPECT_GT(changed, N / 4) << "the group limit must change many selections";
}

// Groups = EP ranks (placement: consecutive experts per rank) and one group
// per token: every token's k rows go to one rank.
TEST(RoutersGroupLimited, OneGroupPerTokenReachesOneRank) {
    const int N = 128, E = 8, K = 3, ranks = 2;
    RouterShape s = classic_router(N, 8, E, K, N, 0, 0.0, 0.0, 0.0);
    s.num_groups = ranks;
    s.group_topk = 1;
    RandomRouter r(s, 85);
    r.route();
    int split = 0;
    for (int t = 0; t < N; t++) {
        std::vector<int> owners;
        for (int k = 0; k < K; k++) owners.push_back(r.routing.choice_expert[t * K + k] / (E / ranks));
        split += std::count(owners.begin(), owners.end(), owners[0]) != K;
    }
    EXPECT_EQ(split, 0);
}

RouterShape noisy_shape(int N) {
    RouterShape s = classic_router(N, 6, 4, 2, N, 0, 0.0, 0.0, 0.0);
    s.type = ROUTER_NOISY_TOPK;
    return s;
}

TEST(RoutersNoisyTopk, CleanTopKOutsideTraining) {
    const int N = 64;
    RandomRouter noisy(noisy_shape(N), 90);
    RouterShape clean_shape = classic_router(N, 6, 4, 2, N, 1, 0.0, 0.0, 0.0);
    RandomRouter clean(clean_shape, 90);
    noisy.ctx.training = 0;
    clean.ctx.training = 0;
    noisy.route();
    clean.route();
    for (int i = 0; i < N * 4; i++) {
        EXPECT_EQ(noisy.routing.noise[i], 0.0f);
        EXPECT_EQ(noisy.routing.h[i], noisy.routing.logits[i]);
    }
    for (int a = 0; a < N * 2; a++) {
        EXPECT_EQ(noisy.routing.choice_expert[a], clean.routing.choice_expert[a]);
        EXPECT_NEAR(noisy.routing.choice_gate[a], clean.routing.choice_gate[a], 1e-6);
    }
}

TEST(RoutersNoisyTopk, TrainingNoiseIsStdNormalTimesSoftplus) {
    const int N = 4096, C = 6, E = 4;
    RandomRouter r(noisy_shape(N), 91);
    r.route();
    double mean = 0.0, square = 0.0;
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) {
            double pre = 0.0;
            for (int c = 0; c < C; c++) pre += (double)r.x[t * C + c] * r.noise_w[e * C + c];
            int i = t * E + e;
            EXPECT_NEAR(r.routing.noise_std[i], std::log1p(std::exp(pre)), 1e-5);
            EXPECT_NEAR(r.routing.h[i],
                        r.routing.logits[i] + r.routing.noise[i] * r.routing.noise_std[i], 1e-5);
            mean += r.routing.noise[i] / (N * E);
            square += (double)r.routing.noise[i] * r.routing.noise[i] / (N * E);
        }
    EXPECT_NEAR(mean, 0.0, 0.05);
    EXPECT_NEAR(square - mean * mean, 1.0, 0.05);

    // Noise changes some decisions, is the same for the same context and is
    // keyed by the global token index.
    std::vector<int> noisy_choice(r.routing.choice_expert, r.routing.choice_expert + N * 2);
    std::vector<float> noise(r.routing.noise, r.routing.noise + N * E);
    r.route();
    EXPECT_TRUE(std::equal(noise.begin(), noise.end(), r.routing.noise));
    RandomRouter half(noisy_shape(N / 2), 91);
    half.router_w = r.router_w;
    half.noise_w = r.noise_w;
    half.ctx.first_token = N / 2;
    half.route(r.x.data() + (size_t)(N / 2) * C);
    EXPECT_TRUE(std::equal(noise.begin() + N / 2 * E, noise.end(), half.routing.noise));
    r.ctx.training = 0;
    r.route();
    int differ = 0;
    for (int a = 0; a < N * 2; a++) differ += noisy_choice[a] != r.routing.choice_expert[a];
    EXPECT_GT(differ, 0);
}

TEST(RoutersSinkhorn, BalancesSkewedScoresInTraining) {
    const int N = 256, E = 4;
    RouterShape s = logit_shape(N, E, 1, N, 0.0);
    auto logits = random_vector((size_t)N * E, 100, 0.5);
    for (int t = 0; t < N; t++) logits[t * E] += 4.0f;
    LogitRouter topk(s);
    topk.ctx.capacity_factor = 0.0;
    topk.route(logits);
    EXPECT_GE(topk.routing.tokens_per_expert[0], N * 9 / 10) << "the scores must be skewed";

    s.type = ROUTER_SINKHORN;
    LogitRouter sinkhorn(s);
    sinkhorn.ctx.capacity_factor = 0.0;
    sinkhorn.route(logits);
    long max_load = *std::max_element(sinkhorn.routing.tokens_per_expert,
                                      sinkhorn.routing.tokens_per_expert + E);
    EXPECT_LE(max_load, 1.25 * N / E)
        << "loads " << sinkhorn.routing.tokens_per_expert[0] << " "
        << sinkhorn.routing.tokens_per_expert[1] << " " << sinkhorn.routing.tokens_per_expert[2]
        << " " << sinkhorn.routing.tokens_per_expert[3];
    // Selection ranks the Sinkhorn fixed point: every token's row carries
    // 1/G of the mass and every expert's column 1/E.
    for (int t = 0; t < N; t++) {
        double row = 0.0;
        for (int e = 0; e < E; e++) row += sinkhorn.routing.select_scores[t * E + e];
        EXPECT_NEAR(row, 1.0 / N, 1e-2 / N) << "token " << t;
    }
    for (int e = 0; e < E; e++) {
        double column = 0.0;
        for (int t = 0; t < N; t++) column += sinkhorn.routing.select_scores[t * E + e];
        EXPECT_NEAR(column, 1.0 / E, 1e-2 / E) << "expert " << e;
    }
    // Gates stay the softmax probabilities of the chosen experts.
    for (int t = 0; t < N; t++)
        EXPECT_NEAR(sinkhorn.routing.choice_gate[t],
                    softmax(&logits[t * E], E)[sinkhorn.routing.choice_expert[t]], 1e-6);

    sinkhorn.ctx.training = 0;  // evaluation selects like top-k
    sinkhorn.route(logits);
    EXPECT_TRUE(std::equal(topk.routing.choice_expert, topk.routing.choice_expert + N,
                           sinkhorn.routing.choice_expert));
}

// Sigmoid scores favouring expert 0 by 2 on average.
std::vector<float> skewed_logits(int N, int E) {
    auto logits = random_vector((size_t)N * E, 110, 1.0);
    for (int t = 0; t < N; t++) logits[t * E] += 2.0f;
    return logits;
}

double load_cv(const Routing &r, int E) {
    return coefficient_of_variation(
        std::vector<double>(r.tokens_per_expert, r.tokens_per_expert + E));
}

TEST(RoutersExpertBias, UpdatesBalanceAnAdversarialRouter) {
    const int N = 128, E = 4, K = 2;
    RouterShape s = logit_shape(N, E, K, N, 0.0);
    s.sigmoid_scores = 1;
    s.norm_topk_prob = 1;
    LogitRouter r(s);
    r.ctx.capacity_factor = 0.0;
    std::vector<float> bias(E, 0.0f);
    r.ctx.expert_bias = bias.data();
    auto logits = skewed_logits(N, E);
    r.route(logits);
    double initial = load_cv(r.routing, E);
    ASSERT_GT(initial, 0.4) << "the router must start skewed";
    for (int step = 0; step < 200; step++) {
        router_update_expert_bias(bias.data(), r.routing.tokens_per_expert, E, 1e-2);
        r.route(logits);
    }
    EXPECT_LT(load_cv(r.routing, E), 0.3 * initial)
        << "initial CV " << initial << ", bias " << bias[0] << " " << bias[1] << " " << bias[2]
        << " " << bias[3];
}

TEST(RoutersExpertBias, UpdateIsSignOfMeanLoadMinusLoad) {
    std::vector<float> bias = {0.0f, 1.0f, -1.0f, 0.5f};
    std::vector<long> load = {10, 2, 4, 4};  // mean 5
    router_update_expert_bias(bias.data(), load.data(), 4, 0.25);
    EXPECT_EQ(bias, (std::vector<float>{-0.25f, 1.25f, -0.75f, 0.75f}));
    std::vector<long> even = {3, 3, 3, 3};
    router_update_expert_bias(bias.data(), even.data(), 4, 0.25);
    EXPECT_EQ(bias, (std::vector<float>{-0.25f, 1.25f, -0.75f, 0.75f}));
}

TEST(RoutersExpertBias, SelectsButNeverChangesTheGates) {
    const int N = 32, E = 4, K = 2;
    for (int norm = 0; norm <= 1; norm++) {
        RouterShape s = logit_shape(N, E, K, N, 0.0);
        s.sigmoid_scores = 1;
        s.norm_topk_prob = norm;
        LogitRouter r(s);
        r.ctx.capacity_factor = 0.0;
        std::vector<float> bias = {-0.3f, 0.0f, 0.0f, 0.4f};
        r.ctx.expert_bias = bias.data();
        auto logits = skewed_logits(N, E);
        r.route(logits);
        int favoured = 0;
        for (int t = 0; t < N; t++) {
            std::vector<double> p(E), biased(E);
            for (int e = 0; e < E; e++) {
                p[e] = sigmoid(logits[t * E + e]);
                biased[e] = p[e] + bias[e];
            }
            std::vector<int> order = {0, 1, 2, 3};
            std::stable_sort(order.begin(), order.end(),
                             [&](int a, int b) { return biased[a] > biased[b]; });
            const int *chosen = r.routing.choice_expert + t * K;
            EXPECT_EQ(chosen[0], order[0]) << "token " << t;
            EXPECT_EQ(chosen[1], order[1]) << "token " << t;
            double sum = p[chosen[0]] + p[chosen[1]];
            for (int k = 0; k < K; k++)
                EXPECT_NEAR(r.routing.choice_gate[t * K + k],
                            norm ? p[chosen[k]] / sum : p[chosen[k]], 1e-6)
                    << "token " << t << " slot " << k;
            favoured += chosen[0] == 3 || chosen[1] == 3;
        }
        EXPECT_GT(favoured, N / 2) << "the bias must change selections";
    }
}

TEST(RoutersExpertBias, LeavesGradientsUnchanged) {
    // A bias too small to change any decision must leave the gradient bit for bit.
    GradCase c = {"sigmoid", [](RouterShape &s, RouterContext &) { s.sigmoid_scores = 1; }, false,
                  true};
    GradRouter plain(c), biased(c);
    std::vector<float> small_bias = {1e-5f, -1e-5f, 2e-5f, 0.0f};
    biased.ctx.expert_bias = small_bias.data();
    std::vector<float> dx[2], dw[2], dnw[2], dgw[2], dgnw[2];
    plain.backward(dx[0], dw[0], dnw[0], dgw[0], dgnw[0]);
    biased.backward(dx[1], dw[1], dnw[1], dgw[1], dgnw[1]);
    ASSERT_TRUE(biased.stable()) << "the bias must be too small to change a decision";
    EXPECT_EQ(dx[0], dx[1]);
    EXPECT_EQ(dw[0], dw[1]);
}

TEST(RoutersJitter, NoneOutsideTraining) {
    RouterShape s = classic_router(8, 6, 4, 2, 8, 0, 0.0, 0.0, 0.0);
    RandomRouter plain(s, 120);
    s.jitter_eps = 0.3;
    RandomRouter jittered(s, 120);
    plain.ctx.training = jittered.ctx.training = 0;
    plain.route();
    jittered.route();
    EXPECT_TRUE(
        std::equal(plain.routing.logits, plain.routing.logits + 8 * 4, jittered.routing.logits));
}

TEST(RoutersJitter, TrainingScalesTheInputByUniformFactors) {
    const int N = 64, C = 6, E = 4;
    const double eps = 0.3;
    RouterShape s = classic_router(N, C, E, 2, N, 0, 0.0, 0.0, 0.0);
    s.jitter_eps = eps;
    RandomRouter r(s, 121);
    r.route();
    float low = 2.0f, high = 0.0f;
    for (int i = 0; i < N * C; i++) {
        float u = r.routing.jitter[i];
        EXPECT_GE(u, 1.0 - eps - 1e-6);
        EXPECT_LE(u, 1.0 + eps + 1e-6);
        EXPECT_EQ(r.routing.x_in[i], r.x[i] * u);
        low = std::min(low, u), high = std::max(high, u);
    }
    EXPECT_LT(low, 1.0 - 0.9 * eps);
    EXPECT_GT(high, 1.0 + 0.9 * eps);
    std::vector<float> logits(N * E);
    matmul_forward(logits.data(), r.routing.x_in, r.router_w.data(), N, C, E, nullptr);
    for (int i = 0; i < N * E; i++) EXPECT_NEAR(r.routing.logits[i], logits[i], 1e-5);

    // Deterministic in the context, and keyed by the global token index.
    std::vector<float> jitter(r.routing.jitter, r.routing.jitter + N * C);
    r.route();
    EXPECT_TRUE(std::equal(jitter.begin(), jitter.end(), r.routing.jitter));
    s.N = s.G = N / 2;
    RandomRouter half(s, 121);
    half.router_w = r.router_w;
    half.ctx.first_token = N / 2;
    half.route(r.x.data() + (size_t)(N / 2) * C);
    EXPECT_TRUE(std::equal(jitter.begin() + N / 2 * C, jitter.end(), half.routing.jitter));
    r.ctx.step = 1;
    r.route();
    EXPECT_FALSE(std::equal(jitter.begin(), jitter.end(), r.routing.jitter));
}

// Aux-loss values for one set of logits under several balancing settings.
double aux_loss_with(RouterShape s, const std::vector<float> &logits) {
    LogitRouter r(s);
    r.route(logits);
    return r.routing.aux_loss;
}

TEST(RoutersBalancing, SeqAndGlobalReduceToPerGroupAux) {
    const int N = 12, E = 4, K = 2;
    auto logits = random_vector(N * E, 130, 2.0);
    RouterShape s = logit_shape(N, E, K, 6, 1.0);
    s.aux_loss_coeff = 0.1;
    double per_group = aux_loss_with(s, logits);
    EXPECT_GT(per_group, 0.0);
    s.balancing = BALANCE_SEQ_AUX_LOSS;
    s.T = 6;
    EXPECT_NEAR(aux_loss_with(s, logits), per_group, 1e-7);
    s.balancing = BALANCE_NONE;
    EXPECT_EQ(aux_loss_with(s, logits), 0.0);

    s.G = s.T = N;
    s.balancing = BALANCE_AUX_LOSS;
    double one_group = aux_loss_with(s, logits);
    s.balancing = BALANCE_GLOBAL_AUX_LOSS;
    EXPECT_NEAR(aux_loss_with(s, logits), one_group, 1e-7);
}

TEST(RoutersBalancing, SeqAuxByHand) {
    // Sequences of T = 2 inside one group of 4; top-1 over E = 2.
    const int N = 4, E = 2, T = 2;
    const double coeff = 0.5;
    std::vector<float> logits = {1.0f, 0.0f, 0.5f, 0.0f, 0.0f, 2.0f, 0.3f, 0.0f};
    RouterShape s = logit_shape(N, E, 1, N, 0.0);
    s.aux_loss_coeff = coeff;
    s.balancing = BALANCE_SEQ_AUX_LOSS;
    s.T = T;
    LogitRouter r(s);
    r.route(logits);
    // Sequence 0 sends both tokens to expert 0; sequence 1 one to each.
    double f[2][2] = {{1.0, 0.0}, {0.5, 0.5}}, total = 0.0;
    for (int u = 0; u < 2; u++)
        for (int e = 0; e < E; e++) {
            double P = 0.0;
            for (int t = u * T; t < (u + 1) * T; t++) P += softmax(&logits[t * E], E)[e] / T;
            total += f[u][e] * P;
        }
    EXPECT_NEAR(r.routing.aux_loss, coeff * E * total / 2, 1e-7);
}

TEST(RoutersBalancing, GlobalUsesTheGlobalCounts) {
    const int N = 6, E = 3, K = 1;
    const double coeff = 0.2;
    auto logits = random_vector(N * E, 131, 2.0);
    RouterShape s = logit_shape(N, E, K, N, 0.0);
    s.aux_loss_coeff = coeff;
    s.balancing = BALANCE_GLOBAL_AUX_LOSS;
    LogitRouter r(s);
    RouterWeights w = {r.w.data(), nullptr, nullptr, nullptr};
    router_route(&r.routing, logits.data(), &w, &s, &r.ctx);
    // As if three ranks routed 18 tokens: 12 to expert 0, 5 to 1, 1 to 2.
    std::vector<long> global = {12, 5, 1};
    router_losses(&r.routing, &s, &r.ctx, global.data(), 18);
    double total = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < N; t++) P += softmax(&logits[t * E], E)[e] / N;
        total += global[e] / 18.0 * P;
    }
    EXPECT_NEAR(r.routing.aux_loss, coeff * E * total, 1e-7);
}

TEST(RoutersImportance, SquaredCvOfGateSumsAveragedOverGroups) {
    // Two groups of 3 tokens, top-1 over E = 3, raw softmax gates.
    const int N = 6, E = 3;
    const double coeff = 0.5;
    std::vector<float> logits = {2, 0, 0, 1, 0, 0, 0, 0, 1.5f,  // group 0: experts 0, 0, 2
                                 0, 3, 0, 0, 0, 1, 1, 0, 0};    // group 1: experts 1, 2, 0
    RouterShape s = logit_shape(N, E, 1, 3, 0.0);
    s.importance_loss_coeff = coeff;
    LogitRouter r(s);
    r.ctx.capacity_factor = 0.0;
    r.route(logits);
    const int expert[N] = {0, 0, 2, 1, 2, 0};
    double total = 0.0;
    for (int g = 0; g < 2; g++) {
        std::vector<double> importance(E, 0.0);
        for (int t = 3 * g; t < 3 * g + 3; t++) {
            EXPECT_EQ(r.routing.choice_expert[t], expert[t]);
            importance[expert[t]] += softmax(&logits[t * E], E)[expert[t]];
        }
        double cv = coefficient_of_variation(importance);
        total += cv * cv;
    }
    EXPECT_NEAR(r.routing.importance_loss, coeff * total / 2, 1e-6);
}

TEST(RoutersLoad, ShazeerSmoothLoadByHand) {
    // P(t picks e) = Phi((clean logit - k-th largest noisy logit of the
    // other experts) / noise std), summed per group, loss = coeff * CV^2.
    const int N = 8, E = 4, K = 2;
    const double coeff = 0.3;
    RouterShape s = classic_router(N, 6, E, K, N, 0, 0.0, 0.0, 0.0);
    s.type = ROUTER_NOISY_TOPK;
    s.load_loss_coeff = coeff;
    RandomRouter r(s, 140);
    r.route();
    std::vector<double> load(E, 0.0);
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) {
            std::vector<double> others;
            for (int f = 0; f < E; f++)
                if (f != e) others.push_back(r.routing.h[t * E + f]);
            std::sort(others.rbegin(), others.rend());
            double z =
                (r.routing.logits[t * E + e] - others[K - 1]) / r.routing.noise_std[t * E + e];
            load[e] += 0.5 * std::erfc(-z / std::sqrt(2.0));
        }
    double cv = coefficient_of_variation(load);
    EXPECT_GT(cv, 0.0);
    EXPECT_NEAR(r.routing.load_loss, coeff * cv * cv, 1e-5 * (1.0 + coeff * cv * cv));
}

// ---- C. the z-loss keeps logits small ---------------------------------------

struct LogitSize {
    double mean_abs_logit, mean_lse_squared;
};

// After 50 steps of gradient descent on router_w alone, for a fixed gate
// objective (which sharpens the scores) plus the z-loss.
LogitSize logits_after_descent(double z_loss_coeff) {
    const int N = 12, C = 6, E = 4, K = 2, steps = 50;
    const float lr = 0.5f;
    RouterShape s = classic_router(N, C, E, K, N, 0, 0.0, 0.0, z_loss_coeff);
    RandomRouter r(s, 150);
    r.ctx.capacity_factor = 0.0;
    auto slot_weights = random_vector((size_t)N * K, 151);
    std::vector<float> dgate(N * K), dx(N * C), dw(E * C);
    RouterWeights w = {r.router_w.data(), nullptr, nullptr, nullptr};
    RouterGrads g = {dw.data(), nullptr, nullptr, nullptr};
    for (int step = 0; step < steps; step++) {
        r.route();
        for (int a = 0; a < N * K; a++) dgate[a] = r.routing.choice_kept[a] ? slot_weights[a] : 0;
        std::fill(dx.begin(), dx.end(), 0.0f);
        std::fill(dw.begin(), dw.end(), 0.0f);
        router_backward(dx.data(), &g, dgate.data(), r.x.data(), &w, &r.routing, &s, &r.ctx);
        for (int i = 0; i < E * C; i++) r.router_w[i] -= lr * dw[i];
    }
    r.route();
    LogitSize size = {0.0, 0.0};
    for (int i = 0; i < N * E; i++) size.mean_abs_logit += std::fabs(r.routing.logits[i]) / (N * E);
    for (int t = 0; t < N; t++) size.mean_lse_squared += r.routing.lse[t] * r.routing.lse[t] / N;
    return size;
}

TEST(RoutersZLoss, LowersTheLogits) {
    // A large coefficient, so 50 steps show it: ST-MoE's 1e-3 acts over a run.
    LogitSize without = logits_after_descent(0.0), with = logits_after_descent(0.1);
    EXPECT_LT(with.mean_abs_logit, 0.9 * without.mean_abs_logit)
        << "with z-loss " << with.mean_abs_logit << ", without " << without.mean_abs_logit;
    EXPECT_LT(with.mean_lse_squared, 0.5 * without.mean_lse_squared)
        << "with z-loss " << with.mean_lse_squared << ", without " << without.mean_lse_squared;
}

}  // namespace
