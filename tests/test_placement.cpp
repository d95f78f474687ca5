// placement: the load imbalance `moesim bench` reports, on hand-computed
// counts.
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

}  // namespace
