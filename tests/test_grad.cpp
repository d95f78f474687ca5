// Finite-difference checks of every backward pass: ops, attention, FFN,
// router (with aux and z losses), the MoE layer with drops, the whole model.
#include <gtest/gtest.h>

#include <cmath>

#include <cstring>
#include <vector>

#include "gradcheck.h"
#include "moesim/attention.h"
#include "moesim/ffn.h"
#include "moesim/model.h"
#include "moesim/moe.h"
#include "moesim/ops.h"
#include "moesim/router.h"
#include "router_shapes.h"

namespace {

// Float32 forward passes with central differences at eps ~1e-2..1e-3 leave
// about 1e-3 relative noise; a wrong gradient term shows up at O(1).
constexpr double kTolerance = 1e-2;

TEST(GradMatmul, InputAndWeight) {
    const int N = 5, I = 7, O = 3;
    auto x = random_vector(N * I, 1), w = random_vector(O * I, 2), r = random_vector(N * O, 3);
    std::vector<float> out(N * O), dx(N * I), dw(O * I, 0.0f);
    auto loss = [&] {
        matmul_forward(out.data(), x.data(), w.data(), N, I, O, nullptr);
        return weighted_sum(out.data(), r);
    };
    matmul_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), N, I, O, nullptr);
    auto gx = check_gradient(x.data(), x.size(), dx.data(), loss, 100, 1e-2f, 4);
    auto gw = check_gradient(w.data(), w.size(), dw.data(), loss, 100, 1e-2f, 5);
    EXPECT_LT(gx.max_error, kTolerance) << describe(gx);
    EXPECT_LT(gw.max_error, kTolerance) << describe(gw);
}

TEST(GradRmsnorm, InputAndWeight) {
    const int N = 4, C = 16;
    auto x = random_vector(N * C, 6, 2.0), w = random_vector(N * C, 7), r = random_vector(N * C, 8);
    w.resize(C);
    for (auto &v : w) v += 1.0f;
    std::vector<float> out(N * C), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f);
    auto loss = [&] {
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C);
        return weighted_sum(out.data(), r);
    };
    loss();
    rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), N, C);
    auto gx = check_gradient(x.data(), x.size(), dx.data(), loss, 100, 1e-2f, 9);
    auto gw = check_gradient(w.data(), w.size(), dw.data(), loss, 100, 1e-2f, 10);
    EXPECT_LT(gx.max_error, kTolerance) << describe(gx);
    EXPECT_LT(gw.max_error, kTolerance) << describe(gw);
}

TEST(GradGelu, Elementwise) {
    const int n = 64;
    auto x = random_vector(n, 11, 4.0), r = random_vector(n, 12);
    std::vector<float> out(n), dx(n);
    auto loss = [&] {
        gelu_forward(out.data(), x.data(), n);
        return weighted_sum(out.data(), r);
    };
    gelu_backward(dx.data(), x.data(), r.data(), n);
    auto g = check_gradient(x.data(), n, dx.data(), loss, n, 1e-2f, 13);
    EXPECT_LT(g.max_error, kTolerance) << describe(g);
}

TEST(GradGelu, MatchesTanhFormulaAtKnownPoints) {
    const float x[4] = {-3.0f, -0.5f, 0.0f, 2.0f};
    float y[4];
    gelu_forward(y, x, 4);
    for (int i = 0; i < 4; i++) {
        double u = std::sqrt(2.0 / M_PI) * (x[i] + 0.044715 * std::pow(x[i], 3));
        EXPECT_NEAR(y[i], 0.5 * x[i] * (1.0 + std::tanh(u)), 1e-6) << "x = " << x[i];
    }
}

TEST(GradSoftmaxCrossEntropy, Logits) {
    const int N = 6, V = 11;
    auto logits = random_vector(N * V, 14, 3.0);
    std::vector<int> targets = {0, 3, 10, 5, 5, 7};
    std::vector<float> work(N * V);
    auto loss = [&] {
        work = logits;
        return softmax_cross_entropy_forward(work.data(), targets.data(), N, V);
    };
    loss();
    std::vector<float> dlogits = work;
    softmax_cross_entropy_backward(dlogits.data(), targets.data(), N, V, N);
    auto g = check_gradient(logits.data(), logits.size(), dlogits.data(), loss, 200, 1e-2f, 15);
    EXPECT_LT(g.max_error, kTolerance) << describe(g);
}

TEST(GradSoftmaxCrossEntropy, KnownValue) {
    float logits[3] = {0.0f, 0.0f, 0.0f};
    int target = 1;
    EXPECT_NEAR(softmax_cross_entropy_forward(logits, &target, 1, 3), std::log(3.0), 1e-6);
}

TEST(GradAttention, Qkv) {
    const int B = 2, T = 5, C = 8, NH = 2;
    auto qkv = random_vector(B * T * 3 * C, 16, 1.5), r = random_vector(B * T * C, 17);
    std::vector<float> out(B * T * C), att(B * NH * T * T), dqkv(qkv.size()), scratch(T * T);
    auto loss = [&] {
        attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH, nullptr);
        return weighted_sum(out.data(), r);
    };
    loss();
    attention_backward(dqkv.data(), scratch.data(), r.data(), qkv.data(), att.data(), B, T, C, NH,
                       nullptr);
    auto g = check_gradient(qkv.data(), qkv.size(), dqkv.data(), loss, 240, 1e-2f, 18);
    EXPECT_LT(g.max_error, kTolerance) << describe(g);
}

TEST(GradAttention, IsCausal) {
    const int B = 1, T = 4, C = 4, NH = 1;
    auto qkv = random_vector(B * T * 3 * C, 19);
    std::vector<float> out(T * C), out2(T * C), att(T * T);
    attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH, nullptr);
    for (int c = 0; c < 3 * C; c++) qkv[(T - 1) * 3 * C + c] += 1.0f;  // change the last token
    attention_forward(out2.data(), att.data(), qkv.data(), B, T, C, NH, nullptr);
    for (int i = 0; i < (T - 1) * C; i++)
        EXPECT_EQ(out[i], out2[i]) << "earlier rows saw the future";
    for (int t = 0; t < T; t++)
        for (int j = t + 1; j < T; j++) EXPECT_EQ(att[t * T + j], 0.0f);
}

// Causal attention of one (sequence, head) written out in double: the
// probabilities p[t][j], the output o[t], and the gradients of q, k, v for
// an output gradient dout.
struct AttentionDouble {
    std::vector<double> o, dq, dk, dv;
};

static AttentionDouble attention_double(const float *qkv, const float *dout, int T, int C,
                                        int hs, int h) {
    auto at = [&](int t, int part, int c) { return (double)qkv[(size_t)t * 3 * C + part * C + h * hs + c]; };
    auto dO = [&](int t, int c) { return (double)dout[(size_t)t * C + h * hs + c]; };
    double scale = 1.0 / std::sqrt((double)hs);
    std::vector<double> p((size_t)T * T, 0.0), dp((size_t)T * T, 0.0);
    AttentionDouble r{std::vector<double>((size_t)T * hs, 0.0), std::vector<double>((size_t)T * hs, 0.0),
                      std::vector<double>((size_t)T * hs, 0.0), std::vector<double>((size_t)T * hs, 0.0)};
    for (int t = 0; t < T; t++) {
        double max = -1e300, sum = 0.0, dot_pd = 0.0;
        for (int j = 0; j <= t; j++) {
            double s = 0.0;
            for (int c = 0; c < hs; c++) s += at(t, 0, c) * at(j, 1, c);
            p[(size_t)t * T + j] = s * scale;
            max = std::max(max, s * scale);
        }
        for (int j = 0; j <= t; j++) sum += (p[(size_t)t * T + j] = std::exp(p[(size_t)t * T + j] - max));
        for (int j = 0; j <= t; j++) {
            double pj = (p[(size_t)t * T + j] /= sum), d = 0.0;
            for (int c = 0; c < hs; c++) {
                r.o[(size_t)t * hs + c] += pj * at(j, 2, c);
                r.dv[(size_t)j * hs + c] += pj * dO(t, c);
                d += dO(t, c) * at(j, 2, c);
            }
            dp[(size_t)t * T + j] = d;
            dot_pd += pj * d;
        }
        for (int j = 0; j <= t; j++) {
            double ds = p[(size_t)t * T + j] * (dp[(size_t)t * T + j] - dot_pd) * scale;
            for (int c = 0; c < hs; c++) {
                r.dq[(size_t)t * hs + c] += ds * at(j, 1, c);
                r.dk[(size_t)j * hs + c] += ds * at(t, 0, c);
            }
        }
    }
    return r;
}

// Sequences longer than one query block, the last block short: the later
// blocks multiply keys of the earlier ones, and dk/dv gather rows from
// several blocks. Forward and backward against attention_double.
TEST(GradAttention, MatchesDoubleAcrossQueryBlocks) {
    const int B = 2, T = 2 * ATTENTION_QUERY_BLOCK + 3, C = 8, NH = 2, hs = C / NH;
    auto qkv = random_vector(B * T * 3 * C, 27, 1.5), dout = random_vector(B * T * C, 28);
    std::vector<float> out(B * T * C), att(B * NH * T * T), dqkv(qkv.size()), scratch(T * T);
    attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH, nullptr);
    attention_backward(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att.data(), B, T, C,
                       NH, nullptr);
    double out_error = 0.0, grad_error = 0.0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *seq_qkv = &qkv[(size_t)b * T * 3 * C];
            AttentionDouble ref = attention_double(seq_qkv, &dout[(size_t)b * T * C], T, C, hs, h);
            for (int t = 0; t < T; t++) {
                const float *g = &dqkv[((size_t)b * T + t) * 3 * C + h * hs];
                for (int c = 0; c < hs; c++) {
                    size_t i = (size_t)t * hs + c;
                    out_error = std::max(out_error, std::fabs(ref.o[i] - out[((size_t)b * T + t) * C + h * hs + c]));
                    grad_error = std::max({grad_error, std::fabs(ref.dq[i] - g[c]),
                                           std::fabs(ref.dk[i] - g[C + c]),
                                           std::fabs(ref.dv[i] - g[2 * C + c])});
                }
                const float *a = &att[(((size_t)b * NH + h) * T + t) * T];
                for (int j = t + 1; j < T; j++) EXPECT_EQ(a[j], 0.0f);
            }
        }
    EXPECT_LT(out_error, 1e-5);
    EXPECT_LT(grad_error, 1e-5);
}

class GradFfn : public ::testing::TestWithParam<FfnActivation> {};

TEST_P(GradFfn, InputAndWeights) {
    const FfnActivation act = GetParam();
    const int n = 6, C = 8, F = 12, W = F * ffn_w1_rows_per_unit(act);
    auto x = random_vector(n * C, 20), w1 = random_vector(W * C, 21, 0.5),
         w2 = random_vector(C * F, 22, 0.5), r = random_vector(n * C, 23);
    std::vector<float> out(n * C), h_pre(n * W), h_act(n * F), dh(n * W), dx(n * C);
    std::vector<float> dw1(W * C, 0.0f), dw2(C * F, 0.0f);
    auto loss = [&] {
        ffn_forward(out.data(), h_pre.data(), h_act.data(), x.data(), w1.data(), w2.data(), n, C,
                    F, act, nullptr, nullptr);
        return weighted_sum(out.data(), r);
    };
    loss();
    ffn_backward(dx.data(), dw1.data(), dw2.data(), dh.data(), r.data(), x.data(), h_pre.data(),
                 h_act.data(), w1.data(), w2.data(), n, C, F, act, nullptr, nullptr);
    for (auto [p, g, name] : {std::tuple{&x, &dx, "x"}, {&w1, &dw1, "w1"}, {&w2, &dw2, "w2"}}) {
        auto res = check_gradient(p->data(), p->size(), g->data(), loss, 150, 1e-2f, 24);
        EXPECT_LT(res.max_error, kTolerance) << name << ": " << describe(res);
    }
}

INSTANTIATE_TEST_SUITE_P(GradActivation, GradFfn, ::testing::Values(FFN_GELU, FFN_SWIGLU));

TEST(GradFfn, SwigluIsSiluGateTimesUp) {
    const int C = 2, F = 1;
    float x[2] = {1.0f, -2.0f}, w1[4] = {0.5f, 0.25f, -1.0f, 0.5f}, w2[2] = {2.0f, -1.0f};
    float h_pre[2], h_act[1], out[2];
    ffn_forward(out, h_pre, h_act, x, w1, w2, 1, C, F, FFN_SWIGLU, nullptr, nullptr);
    double gate = 0.5 * 1 + 0.25 * -2, up = -1.0 * 1 + 0.5 * -2;
    double act = gate / (1 + std::exp(-gate)) * up;
    EXPECT_NEAR(out[0], 2.0 * act, 1e-6);
    EXPECT_NEAR(out[1], -1.0 * act, 1e-6);
}

// Router and MoE tests share a small layer where capacity really drops.
struct MoeFixture {
    MoeShape shape{};
    MoeLayer layer{};
    MoeScratch scratch{};
    Comm comm{};
    std::vector<float> x, router_w, w1, w2, r, out;
    std::vector<int> base_experts;
    std::vector<unsigned char> base_kept;

    MoeFixture(int norm_topk_prob, double capacity_factor) {
        const int N = 12, C = 6, E = 4, K = 2, G = 6, F = 5;
        shape.router = classic_router(N, C, E, K, G, norm_topk_prob, capacity_factor, 0.3, 0.05);
        shape.F = F;
        shape.ep_size = 1;
        shape.E_local = E;
        comm_attach_self(&comm);
        EXPECT_EQ(moe_layer_init(&layer, &shape), 0);
        EXPECT_EQ(moe_scratch_init(&scratch, &shape), 0);
        x = random_vector(N * C, 30);
        router_w = random_vector(E * C, 31, 1.5);
        w1 = random_vector(E * F * C, 32, 0.7);
        w2 = random_vector(E * C * F, 33, 0.7);
        r = random_vector(N * C, 34);
        out.resize(N * C);
        loss();
        const Routing &rt = layer.routing;
        base_experts.assign(rt.choice_expert, rt.choice_expert + N * K);
        base_kept.assign(rt.choice_kept, rt.choice_kept + N * K);
    }
    ~MoeFixture() {
        moe_layer_free(&layer);
        moe_scratch_free(&scratch);
    }
    double loss() {
        MoeWeights w = {{router_w.data(), nullptr, nullptr, nullptr}, w1.data(), w2.data()};
        RouterContext ctx = training_context(shape.router);
        moe_forward(out.data(), &layer, x.data(), &w, &shape, &ctx, &comm, nullptr, nullptr);
        return weighted_sum(out.data(), r) + layer.routing.aux_loss + layer.routing.z_loss;
    }
    bool routing_unchanged() const {
        const Routing &rt = layer.routing;
        size_t n = base_experts.size();
        return std::equal(base_experts.begin(), base_experts.end(), rt.choice_expert) &&
               std::equal(base_kept.begin(), base_kept.end(), rt.choice_kept, rt.choice_kept + n);
    }
    long dropped() const {
        long d = 0;
        for (int e = 0; e < shape.router.E; e++) d += layer.routing.dropped_per_expert[e];
        return d;
    }
};

class GradMoe : public ::testing::TestWithParam<int> {};

TEST_P(GradMoe, LayerWithDropsAndAuxLosses) {
    MoeFixture f(GetParam(), 0.5);
    ASSERT_GT(f.dropped(), 0) << "the fixture must exercise capacity drops";
    const RouterShape &rs = f.shape.router;
    std::vector<float> dx(rs.N * rs.C), drw(f.router_w.size(), 0.0f), dw1(f.w1.size(), 0.0f),
        dw2(f.w2.size(), 0.0f);
    f.loss();
    MoeWeights w = {{f.router_w.data(), nullptr, nullptr, nullptr}, f.w1.data(), f.w2.data()};
    MoeGrads g = {{drw.data(), nullptr, nullptr, nullptr}, dw1.data(), dw2.data(), nullptr, nullptr};
    moe_backward(dx.data(), &g, f.r.data(), f.x.data(), &w, &f.layer, &f.scratch, &f.shape, &f.comm,
                 nullptr, nullptr);
    auto loss = [&] { return f.loss(); };
    auto stable = [&] { return f.routing_unchanged(); };
    struct Case {
        std::vector<float> *p;
        std::vector<float> *g;
        const char *name;
    };
    for (auto c : {Case{&f.x, &dx, "x"}, Case{&f.router_w, &drw, "router_w"},
                   Case{&f.w1, &dw1, "w1"}, Case{&f.w2, &dw2, "w2"}}) {
        auto res =
            check_gradient(c.p->data(), c.p->size(), c.g->data(), loss, 200, 2e-3f, 35, stable);
        EXPECT_LT(res.max_error, kTolerance) << c.name << ": " << describe(res);
        EXPECT_GT(res.checked, res.skipped * 10) << c.name << ": too many routing flips";
    }
}

TEST_P(GradMoe, RouterAloneThroughGatesAuxAndZ) {
    MoeFixture f(GetParam(), 1.0);
    const RouterShape &rs = f.shape.router;
    auto gate_weights = random_vector(rs.N * rs.K, 36);
    auto loss = [&] {
        RouterWeights w = {f.router_w.data(), nullptr, nullptr, nullptr};
        RouterContext ctx = training_context(rs);
        router_forward(&f.layer.routing, f.x.data(), &w, &rs, &ctx);
        double s = f.layer.routing.aux_loss + f.layer.routing.z_loss;
        for (int a = 0; a < rs.N * rs.K; a++)
            if (f.layer.routing.choice_kept[a])
                s += (double)gate_weights[a] * f.layer.routing.choice_gate[a];
        return s;
    };
    loss();
    std::vector<float> dgate(rs.N * rs.K), dx(rs.N * rs.C, 0.0f), dw(f.router_w.size(), 0.0f);
    for (int a = 0; a < rs.N * rs.K; a++)
        dgate[a] = f.layer.routing.choice_kept[a] ? gate_weights[a] : 0.0f;
    RouterWeights rw = {f.router_w.data(), nullptr, nullptr, nullptr};
    RouterGrads rg = {dw.data(), nullptr, nullptr, nullptr};
    RouterContext ctx = training_context(rs);
    router_backward(dx.data(), &rg, dgate.data(), f.x.data(), &rw, &f.layer.routing, &rs, &ctx);
    auto stable = [&] { return f.routing_unchanged(); };
    auto gx = check_gradient(f.x.data(), f.x.size(), dx.data(), loss, 200, 2e-3f, 37, stable);
    auto gw = check_gradient(f.router_w.data(), f.router_w.size(), dw.data(), loss, 200, 2e-3f, 38,
                             stable);
    EXPECT_LT(gx.max_error, kTolerance) << describe(gx);
    EXPECT_LT(gw.max_error, kTolerance) << describe(gw);
}

INSTANTIATE_TEST_SUITE_P(GradNormTopkProb, GradMoe, ::testing::Values(0, 1));

// The whole model: every tensor of a small MoE transformer with a dense layer,
// drops, and both auxiliary losses. Per-coordinate differences drown in the
// float32 rounding of a loss of ~3 nats, so this checks directional
// derivatives of each tensor (the layer tests above check coordinates).
struct ModelVariant {
    const char *name;
    FfnActivation expert_activation;
    int shared_F;
    RouterType router;
    int router_groups = 0, router_group_topk = 0;
    double expert_dropout = 0.0;
};

class GradModel : public ::testing::TestWithParam<ModelVariant> {};

TEST_P(GradModel, EveryTensor) {
    const ModelVariant v = GetParam();
    ModelShape s{};
    s.expert_activation = v.expert_activation;
    s.shared_F = v.shared_F;
    s.router_type = v.router;
    s.router_groups = v.router_groups;
    s.router_group_topk = v.router_group_topk;
    s.expert_dropout = v.expert_dropout;
    tiny_model_shape(&s);
    Model m;
    Comm self;
    comm_attach_self(&self);
    ASSERT_EQ(model_init(&m, &s, 7, &self), 0);
    m.router_ctx.training = 1;
    std::vector<int> inputs, targets;
    tiny_model_amplify_and_batch(&m, &inputs, &targets);
    int N = s.B * s.T;
    model_zero_grad(&m);
    model_forward(&m, inputs.data(), targets.data());
    const Routing &rt = m.moe[1].routing;
    std::vector<int> base_experts(rt.choice_expert, rt.choice_expert + N * s.K);
    std::vector<unsigned char> base_kept(rt.choice_kept, rt.choice_kept + N * s.K);
    long dropped = 0;
    for (int e = 0; e < s.E; e++) dropped += rt.dropped_per_expert[e];
    EXPECT_GT(dropped, 0) << "the test must exercise capacity drops";
    model_backward(&m);
    std::vector<float> grads(m.grads, m.grads + m.num_params);
    auto loss = [&] { return model_forward(&m, inputs.data(), targets.data()); };
    auto stable = [&] {
        return std::equal(base_experts.begin(), base_experts.end(), rt.choice_expert) &&
               std::equal(base_kept.begin(), base_kept.end(), rt.choice_kept);
    };
    for (int i = 0; i < m.num_tensors; i++) {
        const ParamTensor &t = m.tensors[i];
        auto res = check_directions(m.params + t.offset, t.numel, grads.data() + t.offset, loss, 16,
                                    1e-2f, 40 + i, stable);
        EXPECT_LT(res.max_error, kTolerance) << t.name << ": " << describe(res);
        EXPECT_GE(res.checked, 6) << t.name << ": too many routing flips";
    }
    model_free(&m);
}

// --init-method-std scales every normally initialised tensor (Switch's
// reduced initialisation is one value of it) and leaves the norms' ones and
// the noise weights' zeros alone; residual projections keep their 1/sqrt(2L).
TEST(ModelInit, InitMethodStdScalesEveryNormalTensorOnly) {
    Comm self;
    comm_attach_self(&self);
    Model models[2];
    const double stds[2] = {0.0, 0.02 * std::sqrt(0.1)};  // default 0.02, Switch's reduced
    for (int i = 0; i < 2; i++) {
        ModelShape s{};
        s.router_type = ROUTER_NOISY_TOPK;
        s.init_std = stds[i];
        tiny_model_shape(&s);
        ASSERT_EQ(model_init(&models[i], &s, 7, &self), 0);
    }
    int normal = 0;
    for (int i = 0; i < models[0].num_tensors; i++) {
        const ParamTensor &t = models[0].tensors[i];
        const float *a = models[0].params + t.offset, *b = models[1].params + t.offset;
        if (t.init != PARAM_INIT_NORMAL) {
            EXPECT_TRUE(std::equal(a, a + t.numel, b)) << t.name << " is not drawn at random";
            continue;
        }
        normal++;
        EXPECT_NEAR(models[1].tensors[i].init_std / t.init_std, std::sqrt(0.1), 1e-12) << t.name;
        double sum_sq = 0.0;
        for (size_t j = 0; j < t.numel; j++) {
            EXPECT_NEAR(b[j], a[j] * std::sqrt(0.1), 1e-6 * std::fabs(a[j]) + 1e-12) << t.name;
            sum_sq += (double)b[j] * b[j];
        }
        double sample_std = std::sqrt(sum_sq / t.numel);
        if (t.numel >= 1000) {
            EXPECT_NEAR(sample_std / models[1].tensors[i].init_std, 1.0, 0.1) << t.name;
        }
    }
    EXPECT_GE(normal, 8) << "embeddings, attention, router, FFNs, experts";
    for (Model &m : models) model_free(&m);
}

// Switch's expert dropout: in training each expert hidden unit is zeroed
// with the given rate and the rest scaled by 1/(1 - rate), the same units in
// the forward and in a repeated forward; at evaluation nothing is dropped.
TEST(ModelExpertDropout, DropsHiddenUnitsInTrainingOnly) {
    const double rate = 0.3;
    ModelShape s{};
    s.expert_dropout = rate;
    tiny_model_shape(&s);
    s.Fe = 64;  // enough hidden units to count the dropped share
    s.B = 8;
    s.capacity_factor = 0.0;
    Model m;
    Comm self;
    comm_attach_self(&self);
    ASSERT_EQ(model_init(&m, &s, 7, &self), 0);
    std::vector<int> inputs, targets;
    tiny_model_amplify_and_batch(&m, &inputs, &targets);
    auto gelu = [](double v) {
        return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    };
    const MoeLayer &layer = m.moe[1];
    for (int training = 1; training >= 0; training--) {
        m.router_ctx.training = training;
        model_forward(&m, inputs.data(), targets.data());
        long n = (long)layer.dispatch.expert_row_begin[model_local_experts(&s)] * s.Fe;
        ASSERT_GT(n, 1000);
        std::vector<float> first(layer.h_act, layer.h_act + n);
        long dropped = 0;
        for (long i = 0; i < n; i++) {
            double plain = gelu(layer.h_pre[i]), got = layer.h_act[i];
            if (got == 0.0 && plain != 0.0) {
                dropped++;
            } else {
                double want = training ? plain / (1.0 - rate) : plain;
                EXPECT_NEAR(got, want, 1e-5 * std::fabs(want) + 1e-6) << "unit " << i;  // vector GELU
            }
        }
        if (training) {
            double share = (double)dropped / n;
            EXPECT_NEAR(share, rate, 4.0 * std::sqrt(rate * (1 - rate) / n)) << dropped << "/" << n;
            model_forward(&m, inputs.data(), targets.data());
            EXPECT_TRUE(std::equal(first.begin(), first.end(), layer.h_act)) << "same mask again";
            m.router_ctx.step = 1;
            model_forward(&m, inputs.data(), targets.data());
            EXPECT_FALSE(std::equal(first.begin(), first.end(), layer.h_act)) << "new step, new mask";
            m.router_ctx.step = 0;
        } else {
            EXPECT_EQ(dropped, 0) << "evaluation drops nothing";
        }
    }
    model_free(&m);
}

INSTANTIATE_TEST_SUITE_P(
    GradVariants, GradModel,
    ::testing::Values(ModelVariant{"gelu", FFN_GELU, 0, ROUTER_TOPK},
                      ModelVariant{"swiglu_shared", FFN_SWIGLU, 5, ROUTER_TOPK},
                      ModelVariant{"noisy_topk", FFN_GELU, 0, ROUTER_NOISY_TOPK},
                      ModelVariant{"group_limited", FFN_GELU, 0, ROUTER_TOPK, 2, 1},
                      ModelVariant{"expert_dropout", FFN_GELU, 0, ROUTER_TOPK, 0, 0, 0.3},
                      ModelVariant{"expert_dropout_swiglu", FFN_SWIGLU, 5, ROUTER_TOPK, 0, 0, 0.5}),
    [](const ::testing::TestParamInfo<ModelVariant> &info) { return info.param.name; });

}  // namespace
