// grad_overlap: buckets are the contiguous runs of one ready point, capped
// in size; the buckets, readied in backward order with progress tests in
// between and finished, give exact_sum_floats's bits over the whole
// gradient buffer (dense part over the world, expert part over the EDP
// group). DistributedGradOverlap needs mpirun -n 2 and skips otherwise.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "moesim/comm.h"
#include "moesim/grad_overlap.h"
#include "moesim/reduce.h"

namespace {

// A gradient buffer of `dense` + `expert` elements in `count` partials
// (partial 0 is the buffer itself, as in the model).
struct Grads {
    std::vector<std::vector<float>> partials;
    std::vector<float *> dense, expert;
    size_t num_dense;
    Grads(std::mt19937 &rng, int count, size_t num_dense_, size_t num_expert)
        : num_dense(num_dense_) {
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        std::uniform_int_distribution<int> decade(-30, 10);
        partials.assign(count, std::vector<float>(num_dense + num_expert));
        for (auto &p : partials)
            for (float &v : p) v = u(rng) * std::ldexp(1.0f, decade(rng));
        partials[0][3] = -0.0f;
        partials[count - 1][num_dense + 1] = INFINITY;
        for (auto &p : partials) {
            dense.push_back(p.data());
            expert.push_back(p.data() + num_dense);
        }
    }
    GradSources sources(const Comm *c, long total) {
        return GradSources{c, partials[0].data(), num_dense, dense.data(), expert.data(),
                           (int)dense.size(), (int)expert.size(), total};
    }
};

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// The blocking reduction of model_reduce_gradients, into a fresh buffer.
std::vector<float> blocking(const Comm *c, Grads &g, long total) {
    size_t n = g.partials[0].size();
    std::vector<float> out(n);
    ExactSum x;
    EXPECT_EQ(exact_sum_init(&x, 64), 0);
    exact_sum_floats(&x, c, COMM_SCOPE_WORLD, g.dense.data(), (int)g.dense.size(), total,
                     g.num_dense, out.data());
    exact_sum_floats(&x, c, COMM_SCOPE_EDP, g.expert.data(), (int)g.expert.size(), total,
                     n - g.num_dense, out.data() + g.num_dense);
    exact_sum_free(&x);
    return out;
}

size_t first_difference(const std::vector<float> &a, const float *b) {
    for (size_t i = 0; i < a.size(); i++)
        if (bits(a[i]) != bits(b[i])) return i;
    return a.size();
}

// Layout of a 2-layer model: head (ready 2) after the layers' dense runs,
// expert runs at the end, embeddings (ready -1) first.
void add_model_layout(GradOverlap *g) {
    ASSERT_EQ(grad_overlap_add(g, -1, 0, 0, 40), 0);    // wte
    ASSERT_EQ(grad_overlap_add(g, -1, 0, 40, 9), 0);    // wpe
    ASSERT_EQ(grad_overlap_add(g, 0, 0, 49, 30), 0);    // layer 0
    ASSERT_EQ(grad_overlap_add(g, 0, 0, 79, 21), 0);
    ASSERT_EQ(grad_overlap_add(g, 1, 0, 100, 51), 0);   // layer 1
    ASSERT_EQ(grad_overlap_add(g, 2, 0, 151, 5), 0);    // final norm
    ASSERT_EQ(grad_overlap_add(g, 0, 1, 156, 70), 0);   // layer 0 experts
    ASSERT_EQ(grad_overlap_add(g, 1, 1, 226, 33), 0);   // layer 1 experts
}

// Protects the bucket plan: one bucket per contiguous run of the same ready
// point and kind; a gap or another kind starts a new one.
TEST(GradOverlap, BucketsAreContiguousRunsOfOneReadyPoint) {
    Comm self;
    comm_attach_self(&self);
    std::mt19937 rng(1);
    Grads grads(rng, 1, 156, 103);
    GradSources src = grads.sources(&self, 1);
    GradOverlap g;
    ASSERT_EQ(grad_overlap_init(&g, &src, 259), 0);
    add_model_layout(&g);
    ASSERT_EQ(g.count, 6);
    const size_t offsets[] = {0, 49, 100, 151, 156, 226}, sizes[] = {49, 51, 51, 5, 70, 33};
    for (int b = 0; b < g.count; b++) {
        EXPECT_EQ(g.buckets[b].offset, offsets[b]) << b;
        EXPECT_EQ(g.buckets[b].n, sizes[b]) << b;
    }
    ASSERT_EQ(grad_overlap_add(&g, 1, 1, 300, 2), 0);  // not contiguous
    EXPECT_EQ(g.count, 7);
    grad_overlap_free(&g);
}

// Protects the size cap: a run longer than GRAD_BUCKET_MAX_ELEMENTS spans
// several buckets, none above the cap (no memory is touched: no sum runs).
TEST(GradOverlap, LongRunsSplitAtTheCap) {
    Comm self;
    comm_attach_self(&self);
    GradSources src{};
    src.comm = &self;
    GradOverlap g;
    ASSERT_EQ(grad_overlap_init(&g, &src, 1), 0);
    const size_t cap = GRAD_BUCKET_MAX_ELEMENTS;
    ASSERT_EQ(grad_overlap_add(&g, 0, 0, 0, cap - 5), 0);
    ASSERT_EQ(grad_overlap_add(&g, 0, 0, cap - 5, 2 * cap + 10), 0);
    ASSERT_EQ(g.count, 4);  // 3 * cap + 5 elements
    for (int b = 0; b < 3; b++) {
        EXPECT_EQ(g.buckets[b].offset, b * cap);
        EXPECT_EQ(g.buckets[b].n, cap);
    }
    EXPECT_EQ(g.buckets[3].n, (size_t)5);
    grad_overlap_free(&g);
}

// Runs the ready points of a 2-layer backward (head, layer 1 experts and
// dense, layer 0 experts and dense, embeddings), testing between them as
// the sgemms would, then finishes; or, with ready = false, finishes alone.
void reduce_in_buckets(GradOverlap *g, bool ready) {
    if (ready) {
        grad_overlap_ready(g, 2, 0);
        for (int l = 1; l >= 0; l--) {
            grad_overlap_progress(g);
            grad_overlap_ready(g, l, 1);
            grad_overlap_progress(g);
            grad_overlap_ready(g, l, 0);
        }
        grad_overlap_progress(g);
        grad_overlap_ready(g, -1, 0);
    }
    grad_overlap_finish(g);
}

void expect_blocking_bits(const Comm *c, long total, int partials_here) {
    std::mt19937 rng(2 + c->rank);  // each rank its own partials
    for (bool ready : {true, false, true}) {
        Grads grads(rng, partials_here, 156, 103);
        std::vector<float> want = blocking(c, grads, total);
        GradSources src = grads.sources(c, total);
        GradOverlap g;
        ASSERT_EQ(grad_overlap_init(&g, &src, 259), 0);
        add_model_layout(&g);
        reduce_in_buckets(&g, ready);
        size_t at = first_difference(want, grads.partials[0].data());
        EXPECT_EQ(at, want.size()) << "rank " << c->rank << ", ready points " << ready
                                   << ": first difference at element " << at;
        grad_overlap_free(&g);
    }
}

// Protects the one-rank path: every scope of one rank sums at once.
TEST(GradOverlap, OneRankGivesTheBlockingBits) {
    Comm self;
    comm_attach_self(&self);
    expect_blocking_bits(&self, 3, 3);
}

class DistributedGradOverlap : public ::testing::Test {
  protected:
    void SetUp() override {
        comm_attach_world(&comm);
        if (comm.world_size != 2) GTEST_SKIP() << "needs mpirun -n 2";
    }
    void TearDown() override { comm_free_groups(&comm); }
    Comm comm{};
};

// Protects the overlapped reduction across ranks: with the expert part over
// both ranks (EP 1) or over each rank alone (EP 2), the model's ready points
// and progress tests give the blocking bits, and so does a finish alone.
TEST_F(DistributedGradOverlap, ReadyPointsGiveTheBlockingBits) {
    for (int ep_size : {1, 2}) {
        comm_split_groups(&comm, ep_size);
        expect_blocking_bits(&comm, 6, 3);
        comm_free_groups(&comm);
    }
}

}  // namespace
