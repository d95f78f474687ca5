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
// order, then the tail, each in double.
double SumOfSquaresInDocumentedOrder(const std::vector<float> &g) {
    std::vector<double> lanes(VEC_LANES, 0.0);
    size_t i = 0;
    for (; i + VEC_LANES <= g.size(); i += VEC_LANES)
        for (int l = 0; l < VEC_LANES; l++) lanes[l] += (double)g[i + l] * (double)g[i + l];
    double sum = 0.0;
    for (int l = 0; l < VEC_LANES; l++) sum += lanes[l];
    for (; i < g.size(); i++) sum += (double)g[i] * (double)g[i];
    return sum;
}

TEST(VecMath, SumOfSquaresAddsInTheDocumentedOrder) {
    // Magnitudes from 2^-30 to 2^30, so that another order rounds
    // differently; 1003 values leave a tail.
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    std::uniform_int_distribution<int> exponent(-30, 30);
    std::vector<float> g(1003);
    for (float &v : g) v = std::ldexp(mantissa(rng), exponent(rng)) * (rng() % 2 ? 1.0f : -1.0f);
    EXPECT_EQ(grad_sum_squares(g.data(), g.size()), SumOfSquaresInDocumentedOrder(g));
    // A sum whose lanes differ: reversed, the same values sum otherwise.
    std::vector<float> reversed(g.rbegin(), g.rend());
    EXPECT_NE(SumOfSquaresInDocumentedOrder(reversed), SumOfSquaresInDocumentedOrder(g));
}

}  // namespace
