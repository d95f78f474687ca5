// /specialization/counts: routing_count_by_category counts the router's real
// selections (routed slots, before capacity) for every router type, against
// an independent count and the router's own tokens_per_expert; a hand-worked
// expert-choice case; and the proof that the old K-at-a-time reading of
// choice_expert got expert choice and soft routing wrong.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "gradcheck.h"
#include "moesim/router.h"
#include "moesim/train.h"
#include "router_shapes.h"

namespace {

constexpr int kCategories = 3;

const char *const kRouterNames[] = {"topk",          "switch",   "noisy_topk", "gshard_top2",
                                    "expert_choice", "sinkhorn", "soft"};

std::vector<long> count_by_category(const Routing &r, int N, const std::vector<int> &categories,
                                    int num_categories, int E) {
    std::vector<long> counts((size_t)E * num_categories, 0);
    routing_count_by_category(&r, N, categories.data(), num_categories, counts.data());
    return counts;
}

// What count_specialization did before: K choices per token, whatever the
// router's slots. Reads past a K-slot layout's meaning for E-slot routers.
std::vector<long> k_stride_counts(const Routing &r, int N, int K, const std::vector<int> &cats,
                                  int num_categories, int E) {
    std::vector<long> counts((size_t)E * num_categories, 0);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            counts[(size_t)r.choice_expert[n * K + k] * num_categories + cats[n]]++;
    return counts;
}

long total(const std::vector<long> &v) {
    long s = 0;
    for (long x : v) s += x;
    return s;
}

// A router of any type on random inputs, in training so that GShard leaves
// some second choices unrouted and noisy top-k draws its noise.
struct RandomRouter {
    RouterShape shape;
    RouterContext ctx;
    Routing routing{};
    std::vector<float> x, router_w, noise_w;
    std::vector<int> categories;

    RandomRouter(RouterType type, double capacity_factor, int training) {
        int K = type == ROUTER_SWITCH ? 1 : 2;
        shape = classic_router(48, 8, 4, K, 12, 0, capacity_factor, 0.01, 0.0);
        shape.type = type;
        ctx = training_context(shape);
        ctx.training = training;
        EXPECT_EQ(routing_init(&routing, &shape), 0);
        x = random_vector((size_t)shape.N * shape.C, 90);
        router_w = random_vector((size_t)shape.E * shape.C, 91, 1.5);
        noise_w = random_vector((size_t)shape.E * shape.C, 92, 0.7);
        RouterWeights w = {router_w.data(), noise_w.data(), nullptr, nullptr};
        router_forward(&routing, x.data(), &w, &shape, &ctx);
        for (int n = 0; n < shape.N; n++) categories.push_back((n * 7 + n / 5) % kCategories);
    }
    ~RandomRouter() { routing_free(&routing); }
    RandomRouter(const RandomRouter &) = delete;
    RandomRouter &operator=(const RandomRouter &) = delete;

    std::vector<long> counts() const {
        return count_by_category(routing, shape.N, categories, kCategories, shape.E);
    }
    long slots_total() const { return (long)shape.N * routing.slots; }
    long routed() const {
        long n = 0;
        for (long a = 0; a < slots_total(); a++) n += routing.choice_routed[a];
        return n;
    }
    long kept() const {
        long n = 0;
        for (long a = 0; a < slots_total(); a++) n += routing.choice_kept[a];
        return n;
    }
};

TEST(SpecializationRouterNames, TheListCoversEveryRouterType) {
    std::vector<bool> seen(ROUTER_SOFT + 1, false);
    for (const char *name : kRouterNames) {
        RouterType type = router_type_from_name(name);
        EXPECT_FALSE(seen[type]) << name << " maps to a type already listed";
        seen[type] = true;
    }
    for (int t = 0; t <= ROUTER_SOFT; t++) EXPECT_TRUE(seen[t]) << "router type " << t;
}

class SpecializationEveryRouter : public ::testing::TestWithParam<const char *> {};

TEST_P(SpecializationEveryRouter, CountsAreTheRoutedSlotsOfEachToken) {
    RandomRouter r(router_type_from_name(GetParam()), 1.0, 1);
    const RouterShape &s = r.shape;
    const Routing &routing = r.routing;
    std::vector<long> expected((size_t)s.E * kCategories, 0);
    for (int n = 0; n < s.N; n++)
        for (int slot = 0; slot < routing.slots; slot++) {
            long a = (long)n * routing.slots + slot;
            if (routing.choice_routed[a])
                expected[(size_t)routing.choice_expert[a] * kCategories + r.categories[n]]++;
        }
    std::vector<long> counts = r.counts();
    EXPECT_EQ(counts, expected);
    EXPECT_EQ(total(counts), r.routed());
    // The same router demand /routing/tokens_per_expert records, split by category.
    for (int e = 0; e < s.E; e++) {
        long per_expert = 0;
        for (int c = 0; c < kCategories; c++) per_expert += counts[(size_t)e * kCategories + c];
        EXPECT_EQ(per_expert, routing.tokens_per_expert[e]) << "expert " << e;
    }
}

TEST_P(SpecializationEveryRouter, CountsAddToWhatIsThere) {
    // Evaluation sums its batches into one buffer.
    RandomRouter r(router_type_from_name(GetParam()), 1.0, 1);
    std::vector<long> once = r.counts(), twice = once;
    routing_count_by_category(&r.routing, r.shape.N, r.categories.data(), kCategories,
                              twice.data());
    for (size_t i = 0; i < once.size(); i++) EXPECT_EQ(twice[i], 2 * once[i]) << "cell " << i;
}

INSTANTIATE_TEST_SUITE_P(EveryRouterType, SpecializationEveryRouter,
                         ::testing::ValuesIn(kRouterNames),
                         [](const ::testing::TestParamInfo<const char *> &info) {
                             return std::string(info.param);
                         });

TEST(Specialization, CountsAssignmentsBeforeCapacity) {
    RandomRouter r(ROUTER_TOPK, 0.5, 0);
    ASSERT_LT(r.kept(), r.routed()) << "capacity must drop assignments here";
    EXPECT_EQ(total(r.counts()), (long)r.shape.N * r.shape.K) << "dropped ones count too";
}

TEST(Specialization, GShardCountsOnlyTheDispatchedSecondChoices) {
    RandomRouter r(ROUTER_GSHARD_TOP2, 1.0, 1);
    ASSERT_LT(r.routed(), r.slots_total()) << "some second choices must go unrouted here";
    EXPECT_EQ(total(r.counts()), r.routed());
}

TEST(Specialization, TopKFamilyInEvaluationIsUnchangedFromKChoicesPerToken) {
    // Every slot is routed at evaluation, so these routers' counts were right.
    for (RouterType type :
         {ROUTER_TOPK, ROUTER_SWITCH, ROUTER_NOISY_TOPK, ROUTER_GSHARD_TOP2, ROUTER_SINKHORN}) {
        RandomRouter r(type, 1.0, 0);
        EXPECT_EQ(r.counts(), k_stride_counts(r.routing, r.shape.N, r.shape.K, r.categories,
                                              kCategories, r.shape.E))
            << "router type " << type;
    }
}

TEST(Specialization, SoftCountsEveryTokenAtEveryExpert) {
    RandomRouter r(ROUTER_SOFT, 1.0, 0);
    std::vector<long> counts = r.counts();
    std::vector<long> per_category(kCategories, 0);
    for (int c : r.categories) per_category[c]++;
    for (int e = 0; e < r.shape.E; e++)
        for (int c = 0; c < kCategories; c++)
            EXPECT_EQ(counts[(size_t)e * kCategories + c], per_category[c])
                << "expert " << e << " category " << c;
    long k_stride = total(
        k_stride_counts(r.routing, r.shape.N, r.shape.K, r.categories, kCategories, r.shape.E));
    EXPECT_EQ(k_stride, (long)r.shape.N * r.shape.K);
    EXPECT_EQ(total(counts), (long)r.shape.N * r.shape.E);
}

TEST(Specialization, ExpertChoiceRandomBatchDiffersFromKChoicesPerToken) {
    RandomRouter r(ROUTER_EXPERT_CHOICE, 1.5, 0);
    std::vector<long> counts = r.counts();
    // Each expert takes cf * G * k / E = 9 of the 12 tokens of each group.
    EXPECT_EQ(r.routing.capacity, 9);
    EXPECT_EQ(total(counts), 9L * r.shape.E * (r.shape.N / r.shape.G));
    std::vector<long> k_stride =
        k_stride_counts(r.routing, r.shape.N, r.shape.K, r.categories, kCategories, r.shape.E);
    EXPECT_EQ(total(k_stride), (long)r.shape.N * r.shape.K);
    EXPECT_NE(counts, k_stride);
}

TEST(Specialization, ExpertChoiceCountsEachExpertsChosenTokens) {
    // G = N = 6, E = 3, k = 1, cf = 1: each expert takes 2 tokens. C = E and
    // identity router weights make the inputs the logits. Experts 0 and 1
    // both take tokens 0 and 1 (probabilities ~0.49 against 1/3 elsewhere),
    // expert 2 takes tokens 2 and 3, and nobody takes tokens 4 and 5.
    RouterShape s = classic_router(6, 3, 3, 1, 6, 0, 1.0, 0.0, 0.0);
    s.type = ROUTER_EXPERT_CHOICE;
    RouterContext ctx = training_context(s);
    ctx.training = 0;
    Routing routing{};
    ASSERT_EQ(routing_init(&routing, &s), 0);
    std::vector<float> w = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    std::vector<float> logits = {4, 4, 0, 3, 3, 0, 0, 0, 4, 0, 0, 3, 0, 0, 0, 0, 0, 0};
    RouterWeights weights = {w.data(), nullptr, nullptr, nullptr};
    router_forward(&routing, logits.data(), &weights, &s, &ctx);
    ASSERT_EQ(routing.capacity, 2);
    std::vector<int> categories = {0, 0, 1, 1, 0, 1};

    std::vector<long> counts = count_by_category(routing, 6, categories, 2, 3);
    // [expert][category]: tokens 0, 1 are category 0; tokens 2, 3 category 1.
    EXPECT_EQ(counts, (std::vector<long>{2, 0, 2, 0, 0, 2}));
    for (int e = 0; e < 3; e++)
        EXPECT_EQ(counts[e * 2] + counts[e * 2 + 1], routing.capacity) << "expert " << e;
    // Reading choice_expert one slot per token sees experts 0, 1, 2, 0, 1, 2:
    // the slot layout, not a selection.
    std::vector<long> k_stride = k_stride_counts(routing, 6, 1, categories, 2, 3);
    EXPECT_EQ(k_stride, (std::vector<long>{1, 1, 2, 0, 0, 2}));
    EXPECT_NE(counts, k_stride);
    routing_free(&routing);
}

}  // namespace
