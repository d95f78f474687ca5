// Row splits (ops.h RowSplit): a grain's rows must come out of a product, and
// its weight gradient out of the backward, with the same bits whatever else
// shares the call — on the BLAS kernel this machine runs. This is what lets
// a rank holding several grains match ranks holding one each.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "gradcheck.h"
#include "moesim/comm.h"
#include "moesim/model.h"
#include "moesim/ops.h"

namespace {

std::vector<float> random_floats(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> v(n);
    for (float &x : v) x = d(rng);
    return v;
}

bool same_bits(const float *a, const float *b, size_t n) {
    return std::memcmp(a, b, n * sizeof(float)) == 0;
}

struct Shape {
    int rows, in, out;
};

class RowSplitKernel : public ::testing::TestWithParam<Shape> {};

// Each grain of a k-grain call equals the same grain computed alone: forward
// rows, input-gradient rows and the grain's weight-gradient partial. Grains
// of 40 rows put rows in the short tail panels where the Haswell and Zen
// kernels round differently from a full panel.
TEST_P(RowSplitKernel, AGrainDoesNotDependOnTheOtherGrainsOfItsCall) {
    const Shape sh = GetParam();
    const int k = 5, N = k * sh.rows;
    std::vector<float> x = random_floats((size_t)N * sh.in, 1),
                       w = random_floats((size_t)sh.out * sh.in, 2);
    std::vector<float> dy = random_floats((size_t)N * sh.out, 3);
    std::vector<float> y((size_t)N * sh.out), dx((size_t)N * sh.in), grads((size_t)sh.out * sh.in);
    std::vector<std::vector<float>> partial_store(k, std::vector<float>(grads.size(), 0.0f));
    std::vector<float *> partials(k);
    for (int g = 0; g < k; g++) partials[g] = partial_store[g].data();
    RowSplit split = {k, sh.rows, nullptr, grads.data(), partials.data()};
    Matmul mm{};
    mm.split = &split;
    matmul_forward(y.data(), x.data(), w.data(), N, sh.in, sh.out, &mm);
    matmul_backward(dx.data(), grads.data(), dy.data(), x.data(), w.data(), N, sh.in, sh.out, &mm);
    for (int g = 0; g < k; g++) {
        const long first = (long)g * sh.rows;
        std::vector<float> y1((size_t)sh.rows * sh.out), dx1((size_t)sh.rows * sh.in),
            dw1(grads.size(), 0.0f);
        matmul_forward(y1.data(), x.data() + first * sh.in, w.data(), sh.rows, sh.in, sh.out,
                       nullptr);
        matmul_backward(dx1.data(), dw1.data(), dy.data() + first * sh.out,
                        x.data() + first * sh.in, w.data(), sh.rows, sh.in, sh.out, nullptr);
        EXPECT_TRUE(same_bits(y1.data(), y.data() + first * sh.out, y1.size()))
            << "forward, grain " << g;
        EXPECT_TRUE(same_bits(dx1.data(), dx.data() + first * sh.in, dx1.size()))
            << "dx, grain " << g;
        EXPECT_TRUE(same_bits(dw1.data(), partials[g], dw1.size())) << "dw, grain " << g;
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, RowSplitKernel,
                         ::testing::Values(Shape{64, 128, 512}, Shape{40, 128, 384},
                                           Shape{40, 512, 128}, Shape{17, 32, 96}));

// Explicit split boundaries (an expert's rows per source grain, some empty)
// behave like uniform ones.
TEST(RowSplit, ExplicitBoundariesWithEmptySplits) {
    const int in = 64, out = 96;
    const int begin[] = {0, 30, 30, 71, 71, 100};
    const int count = 5, N = begin[count];
    std::vector<float> x = random_floats((size_t)N * in, 4), w = random_floats((size_t)out * in, 5);
    std::vector<float> y((size_t)N * out);
    RowSplit split = {count, 0, begin, nullptr, nullptr};
    Matmul mm{};
    mm.split = &split;
    matmul_forward(y.data(), x.data(), w.data(), N, in, out, &mm);
    EXPECT_EQ(row_split_count(&split, N), count);
    for (int i = 0; i < count; i++) {
        int rows = begin[i + 1] - begin[i];
        if (rows == 0) continue;
        std::vector<float> y1((size_t)rows * out);
        matmul_forward(y1.data(), x.data() + (long)begin[i] * in, w.data(), rows, in, out, nullptr);
        EXPECT_TRUE(same_bits(y1.data(), y.data() + (long)begin[i] * out, y1.size()))
            << "split " << i;
    }
}

// The whole model: a micro-batch of four one-sequence grains gives, per
// grain, the bits of a one-sequence model run on that sequence alone (its
// loss scaled by the same global token count): logits, cross-entropy,
// routing statistics and every weight-gradient partial, dense and expert.
TEST(RowSplit, ModelGrainsMatchOneSequenceModels) {
    const int grains = 4;
    Comm self{};
    comm_attach_self(&self);
    ModelShape wide{};
    tiny_model_shape(&wide);
    wide.B = grains;
    wide.G = wide.T;
    wide.grain = wide.T;
    Model m{};
    ASSERT_EQ(model_init(&m, &wide, 7, &self), 0);
    std::vector<int> inputs, targets;
    tiny_model_amplify_and_batch(&m, &inputs, &targets);
    m.router_ctx = RouterContext{};
    m.router_ctx.training = 1;
    model_zero_grad(&m);
    model_forward(&m, inputs.data(), targets.data());
    model_backward(&m);
    const int T = wide.T;
    const size_t expert_n = m.num_params - m.num_dense_params;

    ModelShape narrow = wide;
    narrow.B = 1;
    narrow.world = grains;  // the same global batch, hence the same loss scale
    for (int g = 0; g < grains; g++) {
        Model one{};
        ASSERT_EQ(model_init(&one, &narrow, 7, &self), 0);
        std::memcpy(one.params, m.params, sizeof(float) * m.num_params);
        one.router_ctx = RouterContext{};
        one.router_ctx.training = 1;
        one.router_ctx.first_token = (long)g * T;
        model_zero_grad(&one);
        model_forward(&one, inputs.data() + g * T, targets.data() + g * T);
        model_backward(&one);
        EXPECT_EQ(one.grain_ce[0], m.grain_ce[g]) << "cross-entropy, grain " << g;
        EXPECT_TRUE(same_bits(one.dense_partials[0], m.dense_partials[g], m.num_dense_params))
            << "dense gradient partial, grain " << g;
        EXPECT_TRUE(same_bits(one.expert_partials[0], m.expert_partials[g], expert_n))
            << "expert gradient partial, grain " << g;
        for (int l = 0; l < wide.L; l++) {
            if (!model_is_moe_layer(&wide, l)) continue;
            int width = routing_grain_width(wide.E);
            const double *mine = one.moe[l].routing.grain_stats;
            const double *theirs = m.moe[l].routing.grain_stats + (long)g * width;
            EXPECT_EQ(0, std::memcmp(mine, theirs, sizeof(double) * width))
                << "routing statistics, layer " << l << ", grain " << g;
        }
        model_free(&one);
    }
    model_free(&m);
}

}  // namespace
