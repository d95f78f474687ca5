// placement: the load imbalance `moesim bench` reports, and the expert
// shadowing plan, on hand-computed counts.
#include <gtest/gtest.h>

#include <vector>

#include "moesim/placement.h"

namespace {

// 8 experts over 2 positions: experts 0-3 on position 0, 4-7 on position 1.
TEST(PlacementLoadImbalance, BusiestPositionOverTheMeanPerLayer) {
    const std::vector<long> rows = {
        10, 20, 30, 40, 5, 5, 5, 5,  // layer 0: 100 vs 20, mean 60 -> 100/60
        1,  1,  1,  1,  1, 1, 1, 1,  // layer 1: balanced -> 1
    };
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 1, 8, 2), 100.0 / 60.0);
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 2, 8, 2), (100.0 / 60.0 + 1.0) / 2);
    // 4 positions of 2 experts: 30, 70, 10, 10 -> 70 / 30.
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 1, 8, 4), 70.0 / 30.0);
    // Every expert on one position: nothing to wait for.
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 2, 8, 1), 1.0);
}

TEST(PlacementLoadImbalance, LayerWithoutRowsCountsAsBalanced) {
    const std::vector<long> rows = {0, 0, 0, 0, 0, 6, 0, 0};
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 1, 4, 2), 1.0);
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data() + 4, 1, 4, 2), 2.0);
    EXPECT_DOUBLE_EQ(placement_load_imbalance(rows.data(), 0, 4, 2), 1.0);
}

struct ShadowPlan {
    int taken;
    std::vector<int> load;
    std::vector<unsigned char> shadow;
};

ShadowPlan PlanShadows(const std::vector<int> &rows, int E, int P, int min_gain, int max_rows,
                       int max_per_rank) {
    ShadowPlan plan{0, std::vector<int>(P, -1), std::vector<unsigned char>(P * E, 7)};
    plan.taken = placement_plan_shadows(E, P, rows.data(), min_gain, max_rows, max_per_rank,
                                        plan.load.data(), plan.shadow.data());
    return plan;
}

// 4 experts over 2 positions: experts 0-1 on position 0, 2-3 on position 1.
// rows[q * E + e]: position 1 sends 30 and 40 rows to position 0's experts.
const std::vector<int> kTwoRanks = {10, 20, 5, 5,   // source 0
                                    30, 40, 1, 4};  // source 1

TEST(PlacementShadows, TakesTheBlockThatLowersTheBusiestRankMost) {
    // Loads 100 and 15. Shadowing (1, 1) gives max(60, 55): 40 off; (1, 0)
    // gives max(70, 45): 30 off. Then (1, 0) would give max(30, 85): worse.
    ShadowPlan plan = PlanShadows(kTwoRanks, 4, 2, 1, 1000, 2);
    EXPECT_EQ(plan.taken, 1);
    EXPECT_EQ(plan.load, (std::vector<int>{60, 55}));
    EXPECT_EQ(plan.shadow, (std::vector<unsigned char>{0, 0, 0, 0, 0, 1, 0, 0}));
}

TEST(PlacementShadows, NothingBelowTheMinimumGain) {
    ShadowPlan plan = PlanShadows(kTwoRanks, 4, 2, 41, 1000, 2);
    EXPECT_EQ(plan.taken, 0);
    EXPECT_EQ(plan.load, (std::vector<int>{100, 15}));
    EXPECT_EQ(plan.shadow, std::vector<unsigned char>(8, 0));
    // A minimum of 0 means 1: a shadow must save a row.
    std::vector<int> even = {5, 0, 0, 5};  // E 2, P 2: loads 5 and 5
    ShadowPlan none = PlanShadows(even, 2, 2, 0, 1000, 1);
    EXPECT_EQ(none.taken, 0);
    EXPECT_EQ(none.load, (std::vector<int>{5, 5}));
}

TEST(PlacementShadows, KeepsEveryRankWithinItsRows) {
    // (1, 1) would put 55 rows on position 1, over 50: (1, 0) instead, 45.
    ShadowPlan plan = PlanShadows(kTwoRanks, 4, 2, 1, 50, 2);
    EXPECT_EQ(plan.taken, 1);
    EXPECT_EQ(plan.load, (std::vector<int>{70, 45}));
    EXPECT_EQ(plan.shadow, (std::vector<unsigned char>{0, 0, 0, 0, 1, 0, 0, 0}));
}

// 3 experts over 3 positions, expert e on position e; every source sends
// only to expert 0: loads 60, 0, 0.
const std::vector<int> kThreeRanks = {10, 0, 0, 20, 0, 0, 30, 0, 0};

TEST(PlacementShadows, GoesOnWhileTheBusiestRankGetsLighter) {
    // (2, 0): max(30, 30), 30 off; then position 0 again (first of the tied
    // busiest): (1, 0): max(10, 20). Position 2, busiest at 30, owns an
    // expert nobody sends to: done.
    ShadowPlan plan = PlanShadows(kThreeRanks, 3, 3, 1, 1000, 1);
    EXPECT_EQ(plan.taken, 2);
    EXPECT_EQ(plan.load, (std::vector<int>{10, 20, 30}));
    EXPECT_EQ(plan.shadow, (std::vector<unsigned char>{0, 0, 0, 1, 0, 0, 1, 0, 0}));
    // The second shadow saves 10 rows: not with a minimum of 15.
    EXPECT_EQ(PlanShadows(kThreeRanks, 3, 3, 15, 1000, 1).taken, 1);
    // No shadows allowed per rank: none taken.
    EXPECT_EQ(PlanShadows(kThreeRanks, 3, 3, 1, 1000, 0).taken, 0);
}

}  // namespace
