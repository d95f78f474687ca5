// The expert-parallel MoE layer across ranks (run under mpirun -n 2; skipped
// on one rank): gradients by finite differences through the token exchange,
// and each rank holding exactly its shard of the experts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "gradcheck.h"
#include "moesim/comm.h"
#include "moesim/model.h"
#include "moesim/moe.h"
#include "moesim/reduce.h"
#include "router_shapes.h"

namespace {

// The sum of one value over the ranks, in rank order.
double sum_over_ranks(const Comm *comm, double value) {
    std::vector<double> gathered(comm->world_size);
    double sum = 0.0;
    ordered_sum_doubles(comm, COMM_SCOPE_WORLD, &value, 1, 1, gathered.data(), &sum);
    return sum;
}

constexpr double kTolerance = 1e-2;  // float32 central differences, as in test_grad.cpp

class Distributed : public ::testing::Test {
  protected:
    void SetUp() override {
        comm_attach_world(&comm);
        if (comm.world_size != 2) GTEST_SKIP() << "needs mpirun -n 2";
        comm_split_groups(&comm, 2);
    }
    void TearDown() override { comm_free_groups(&comm); }
    Comm comm{};
};

// Every rank routes its own 12 tokens over 4 experts; rank r owns experts
// 2r and 2r+1. Capacity 0.5 makes both ranks drop assignments.
struct ShardedMoe {
    static constexpr int N = 12, C = 6, E = 4, K = 2, G = 6, F = 5;
    MoeShape shape{};
    MoeLayer layer{};
    MoeScratch scratch{};
    const Comm *comm;
    std::vector<float> x, router_w, w1, w2, r, out;
    std::vector<int> base_experts;
    std::vector<unsigned char> base_kept;

    explicit ShardedMoe(const Comm *c) : comm(c) {
        shape.router = classic_router(N, C, E, K, G, 1, 0.5, 0.3, 0.05);
        shape.F = F;
        shape.ep_size = c->ep_size;
        shape.E_local = E / c->ep_size;
        EXPECT_EQ(moe_layer_init(&layer, &shape), 0);
        EXPECT_EQ(moe_scratch_init(&scratch, &shape), 0);
        x = random_vector(N * C, 100 + c->rank);   // different tokens per rank
        router_w = random_vector(E * C, 31, 1.5);  // replicated
        auto all_w1 = random_vector(E * F * C, 32, 0.7), all_w2 = random_vector(E * C * F, 33, 0.7);
        size_t shard = (size_t)shape.E_local * F * C, first = (size_t)c->ep_rank * shard;
        w1.assign(all_w1.begin() + first, all_w1.begin() + first + shard);
        w2.assign(all_w2.begin() + first, all_w2.begin() + first + shard);
        r = random_vector(N * C, 200 + c->rank);
        out.resize(N * C);
        global_loss();
        base_experts.assign(layer.routing.choice_expert, layer.routing.choice_expert + N * K);
        base_kept.assign(layer.routing.choice_kept, layer.routing.choice_kept + N * K);
    }
    ~ShardedMoe() {
        moe_layer_free(&layer);
        moe_scratch_free(&scratch);
    }
    // Sum over ranks of each rank's weighted output plus its auxiliary losses.
    double global_loss() {
        MoeWeights w = {{router_w.data(), nullptr, nullptr, nullptr}, w1.data(), w2.data()};
        RouterContext ctx = training_context(shape.router, 0, (long)comm->rank * N);
        moe_forward(out.data(), &layer, x.data(), &w, &shape, &ctx, comm, nullptr, nullptr);
        double loss = weighted_sum(out.data(), r) + layer.routing.aux_loss + layer.routing.z_loss;
        loss = sum_over_ranks(comm, loss);
        return loss;
    }
    bool routing_unchanged_everywhere() const {
        bool same =
            std::equal(base_experts.begin(), base_experts.end(), layer.routing.choice_expert) &&
            std::equal(base_kept.begin(), base_kept.end(), layer.routing.choice_kept);
        return comm_all_ok(comm, same);
    }
    long dropped_everywhere() const {
        double d = 0;
        for (int e = 0; e < E; e++) d += (double)layer.routing.dropped_per_expert[e];
        d = sum_over_ranks(comm, d);
        return (long)d;
    }
};

// Central differences where only `owner` perturbs its copy (or every rank,
// for a replicated tensor, when owner < 0); every rank evaluates the global
// loss in lockstep. `grad` on the owner is the analytic derivative.
GradCheck check_owned(ShardedMoe &f, std::vector<float> &param, const std::vector<float> &grad,
                      int owner, int samples, uint64_t seed) {
    GradCheck res;
    bool mine = owner < 0 || owner == f.comm->rank;
    double max_grad = 0.0;
    for (float g : grad) max_grad = std::fmax(max_grad, std::fabs(g));
    max_grad = sum_over_ranks(f.comm, max_grad);
    Rng rng = {rng_mix64(seed)};
    const float eps = 2e-3f;
    for (int s = 0; s < samples; s++) {
        size_t i = (size_t)(rng_next(&rng) % param.size());
        float saved = param[i];
        if (mine) param[i] = saved + eps;
        double plus = f.global_loss();
        bool stable = f.routing_unchanged_everywhere();
        if (mine) param[i] = saved - eps;
        double minus = f.global_loss();
        stable = f.routing_unchanged_everywhere() && stable;
        if (mine) param[i] = saved;
        double analytic = mine ? grad[i] : 0.0;
        analytic = sum_over_ranks(f.comm, analytic);  // one owner, or the replicas' sum
        if (!stable) {
            res.skipped++;
            continue;
        }
        double numeric = (plus - minus) / (2.0 * eps);
        double err = std::fabs(analytic - numeric) /
                     std::fmax(std::fabs(analytic) + std::fabs(numeric), 1e-3 * max_grad + 1e-12);
        res.checked++;
        if (err > res.max_error) {
            res.max_error = err;
            res.worst_index = i;
            res.worst_analytic = analytic;
            res.worst_numeric = numeric;
        }
    }
    return res;
}

TEST_F(Distributed, MoeGradientsThroughTheExchange) {
    ShardedMoe f(&comm);
    ASSERT_GT(f.dropped_everywhere(), 0) << "the layer must exercise capacity drops";
    // Tokens of both ranks reach experts on both ranks.
    long sent_away = f.layer.dispatch.num_send_rows -
                     (f.layer.dispatch.send_row_begin[(comm.ep_rank + 1) * f.shape.E_local] -
                      f.layer.dispatch.send_row_begin[comm.ep_rank * f.shape.E_local]);
    EXPECT_TRUE(comm_all_ok(&comm, sent_away > 0)) << "no rows crossed ranks";
    // The traffic this rank reports adds up to the rows it dispatched.
    std::vector<long> bytes(comm.ep_size, 0);
    dispatch_add_bytes_to_ranks(&f.layer.dispatch, f.C, bytes.data());
    long total = 0;
    for (long b : bytes) total += b;
    EXPECT_EQ(total, (long)f.layer.dispatch.num_send_rows * f.C * (long)sizeof(float));

    std::vector<float> dx(f.x.size()), drw(f.router_w.size(), 0.0f), dw1(f.w1.size(), 0.0f),
        dw2(f.w2.size(), 0.0f);
    f.global_loss();
    MoeWeights w = {{f.router_w.data(), nullptr, nullptr, nullptr}, f.w1.data(), f.w2.data()};
    MoeGrads g = {{drw.data(), nullptr, nullptr, nullptr}, dw1.data(), dw2.data(), nullptr, nullptr};
    moe_backward(dx.data(), &g, f.r.data(), f.x.data(), &w, &f.layer, &f.scratch, &f.shape, &comm,
                 nullptr, nullptr);
    struct Case {
        std::vector<float> *p;
        std::vector<float> *g;
        int owner;
        const char *name;
    };
    for (auto c : {Case{&f.x, &dx, 0, "x on rank 0"}, Case{&f.x, &dx, 1, "x on rank 1"},
                   Case{&f.router_w, &drw, -1, "router_w (replicated)"},
                   Case{&f.w1, &dw1, 0, "w1 of rank 0's experts"},
                   Case{&f.w1, &dw1, 1, "w1 of rank 1's experts"},
                   Case{&f.w2, &dw2, 0, "w2 of rank 0's experts"},
                   Case{&f.w2, &dw2, 1, "w2 of rank 1's experts"}}) {
        GradCheck res = check_owned(f, *c.p, *c.g, c.owner, 60, 300 + c.owner);
        EXPECT_LT(res.max_error, kTolerance) << c.name << ": " << describe(res);
        EXPECT_GT(res.checked, res.skipped * 5) << c.name << ": too many routing flips";
    }
}

// One forward and one backward: each exchange hands MPI the rows it moves
// (sent_bytes: out to q in each dispatch, q's rows back in each combine)
// and times itself; blocking, all of it is waited for, overlapped, in
// flight at least as long as waited for, and every request seen complete.
TEST_F(Distributed, ExchangesMeasureTheirBytesAndTimes) {
    for (int chunks : {1, 2}) {
        ShardedMoe f(&comm);
        f.shape.overlap_chunks = chunks;
        moe_layer_free(&f.layer);
        ASSERT_EQ(moe_layer_init(&f.layer, &f.shape), 0);
        ASSERT_EQ(f.layer.dispatch.overlap, chunks > 1);
        dispatch_reset_measures(&f.layer.dispatch);
        f.global_loss();
        std::vector<float> dx(f.x.size()), drw(f.router_w.size(), 0.0f), dw1(f.w1.size(), 0.0f),
            dw2(f.w2.size(), 0.0f);
        MoeWeights w = {{f.router_w.data(), nullptr, nullptr, nullptr}, f.w1.data(), f.w2.data()};
        MoeGrads g = {{drw.data(), nullptr, nullptr, nullptr}, dw1.data(), dw2.data(), nullptr, nullptr};
        moe_backward(dx.data(), &g, f.r.data(), f.x.data(), &w, &f.layer, &f.scratch, &f.shape,
                     &comm, nullptr, nullptr);
        const Dispatch &d = f.layer.dispatch;
        std::vector<long> to(comm.ep_size, 0);
        dispatch_add_bytes_to_ranks(&d, f.C, to.data());
        for (int q = 0; q < comm.ep_size; q++) {
            long from = 0;
            for (int j = 0; j < d.E_local; j++) from += d.recv_counts[q * d.E_local + j];
            from *= f.C * (long)sizeof(float);
            EXPECT_EQ(d.sent_bytes[q], 2 * (to[q] + from)) << "to EP rank " << q;
        }
        for (int kind : {COMM_KIND_DISPATCH, COMM_KIND_COMBINE}) {
            EXPECT_GT(d.times.exposed_s[kind], 0.0) << comm_kind_names[kind];
            if (chunks == 1)
                EXPECT_EQ(d.times.in_flight_s[kind], d.times.exposed_s[kind]);
            else
                EXPECT_GE(d.times.in_flight_s[kind], d.times.exposed_s[kind]);
        }
        EXPECT_EQ(d.outstanding[0] + d.outstanding[1], 0);
        for (int stage = 0; stage < HIER_STAGE_COUNT; stage++)
            EXPECT_EQ(d.times.hierarchical_s[0][stage] + d.times.hierarchical_s[1][stage], 0.0);
    }
}

TEST_F(Distributed, EachRankHoldsExactlyItsExperts) {
    ModelShape s{};
    s.V = 17;
    s.T = 4;
    s.C = 8;
    s.NH = 2;
    s.L = 2;
    s.F = 12;
    s.E = 4;
    s.K = 2;
    s.Fe = 6;
    s.B = 2;
    s.G = 8;
    s.moe_layer_freq = 1;
    s.tied = 1;
    s.norm_topk_prob = 1;
    s.capacity_factor = 1.0;
    s.ep_size = 1;
    Comm self;
    comm_attach_self(&self);
    Model whole, shard;
    ASSERT_EQ(model_init(&whole, &s, 11, &self), 0);
    ModelShape sharded = s;
    sharded.ep_size = comm.ep_size;
    sharded.ep_rank = comm.ep_rank;
    ASSERT_EQ(model_init(&shard, &sharded, 11, &comm), 0);

    size_t expert_params_whole = whole.num_params - whole.num_dense_params;
    EXPECT_EQ(shard.num_dense_params, whole.num_dense_params);
    EXPECT_EQ(shard.num_params - shard.num_dense_params, expert_params_whole / 2);
    EXPECT_EQ(model_param_bytes(&shard), 4 * (whole.num_dense_params + expert_params_whole / 2));
    ASSERT_EQ(shard.num_tensors, whole.num_tensors);
    for (int i = 0; i < whole.num_tensors; i++) {
        const ParamTensor &a = whole.tensors[i], &b = shard.tensors[i];
        ASSERT_STREQ(a.name, b.name);
        const float *mine = shard.params + b.offset;
        const float *ref = whole.params + a.offset;
        if (a.is_expert) {
            ASSERT_EQ(b.shape[0], 2) << b.name;
            ref += (size_t)comm.ep_rank * b.numel;  // experts 2r, 2r+1 of the whole model
        }
        EXPECT_EQ(0, std::memcmp(mine, ref, sizeof(float) * b.numel)) << b.name;
    }
    model_free(&whole);
    model_free(&shard);
}

}  // namespace
