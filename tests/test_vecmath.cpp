// The double-lane sums behind the gradient norm, RMSNorm and softmax: the
// order of their additions is part of every result, so it is pinned here
// against the order vecmath.h documents.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "moesim/optim.h"
#include "moesim/vecmath.h"

namespace {

// Lane l sums the squares at l, l + VEC_LANES, ...; then the lanes in
// order (or, swapped_halves, the upper half of the lanes first), then the
// tail, each in double.
double SumOfSquaresInOrder(const std::vector<float> &g, bool swapped_halves = false) {
    std::vector<double> lanes(VEC_LANES, 0.0);
    size_t i = 0;
    for (; i + VEC_LANES <= g.size(); i += VEC_LANES)
        for (int l = 0; l < VEC_LANES; l++) lanes[l] += (double)g[i + l] * (double)g[i + l];
    double sum = 0.0;
    for (int k = 0; k < VEC_LANES; k++)
        sum += lanes[swapped_halves ? (k + VEC_LANES / 2) % VEC_LANES : k];
    for (; i < g.size(); i++) sum += (double)g[i] * (double)g[i];
    return sum;
}

TEST(VecMath, SumOfSquaresAddsInTheDocumentedOrder) {
    // Magnitudes from 2^-30 to 2^30; 1003 values leave a tail.
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    std::uniform_int_distribution<int> exponent(-30, 30);
    std::vector<float> g(1003);
    for (float &v : g) v = std::ldexp(mantissa(rng), exponent(rng)) * (rng() % 2 ? 1.0f : -1.0f);
    EXPECT_EQ(grad_sum_squares(g.data(), g.size()), SumOfSquaresInOrder(g));
}

TEST(VecMath, SumOfSquaresTellsTheLaneOrderApart) {
    // Lane 0 holds 2^60, every other lane 100, the tail 100 three times.
    // In order, each 100 meets 2^60 alone and is lost (half its spacing of
    // 256 is 128). Upper half first, its lanes add up exactly to at least
    // 200, which rounds to 2^60 + 256 or more.
    std::vector<float> g(2 * VEC_LANES + 3, 0.0f);
    g[0] = std::ldexp(1.0f, 30);
    for (int l = 1; l < VEC_LANES; l++) g[l] = 10.0f;
    for (size_t i = 2 * VEC_LANES; i < g.size(); i++) g[i] = 10.0f;
    EXPECT_EQ(grad_sum_squares(g.data(), g.size()), std::ldexp(1.0, 60));
    EXPECT_EQ(SumOfSquaresInOrder(g), std::ldexp(1.0, 60));
    EXPECT_GT(SumOfSquaresInOrder(g, true), std::ldexp(1.0, 60));
}

}  // namespace
