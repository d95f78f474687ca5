// trainer_step's guard against NaN and Inf: a step whose loss or gradient is
// not finite changes nothing (parameters, Adam state and step, expert biases)
// and names the first tensor whose gradient is not finite, the same on every
// rank. --freeze: a frozen tensor keeps its parameters and Adam moments
// through training steps while the rest trains, and the clipping norm leaves
// it out. The Distributed* tests run under mpirun -n 2 (skipped on one rank).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "moesim/train.h"

namespace {

// A tiny MoE model with DeepSeek's expert bias, so that the bias update is
// covered too, trained on the synthetic source.
class TinyTrainer {
  public:
    // extra: more "key value" settings, applied after the tiny model's.
    TinyTrainer(const Comm *comm, int ep_size, const std::string &extra = "") {
        config_defaults(&cfg_);
        std::istringstream settings(
            "num-layers 2 hidden-size 32 num-attention-heads 2 seq-length 16 num-experts 4 "
            "moe-ffn-hidden-size 32 ffn-hidden-size 64 micro-batch-size 2 data-format synthetic "
            "synthetic-tokens 20000 moe-router-enable-expert-bias 1 " +
            extra);
        char err[MOESIM_ERR_MAX] = "";
        for (std::string key, value; settings >> key >> value;)
            EXPECT_EQ(config_set(&cfg_, key.c_str(), value.c_str(), err, sizeof err), 0) << err;
        cfg_.expert_model_parallel_size = ep_size;
        config_resolve(&cfg_);
        EXPECT_EQ(dataset_load(&ds_, &cfg_, err, sizeof err), 0) << err;
        ok_ = trainer_init(&trainer_, &cfg_, &ds_, comm, err, sizeof err) == 0;
        EXPECT_TRUE(ok_) << err;
    }
    ~TinyTrainer() {
        if (ok_) trainer_free(&trainer_);
        dataset_free(&ds_);
    }
    bool ok() const { return ok_; }
    Trainer *get() { return &trainer_; }

    int TensorIndex(const std::string &name) const {
        for (int i = 0; i < trainer_.model.num_tensors; i++)
            if (name == trainer_.model.tensors[i].name) return i;
        ADD_FAILURE() << "no tensor " << name;
        return -1;
    }

  private:
    Config cfg_{};
    Dataset ds_{};
    Trainer trainer_{};
    bool ok_ = false;
};

// Everything a step may change.
struct TrainingState {
    std::vector<float> params, adam_m, adam_v, bias;
    long adam_step;

    explicit TrainingState(const Trainer &t) {
        const Model &m = t.model;
        params.assign(m.params, m.params + m.num_params);
        adam_m.assign(m.adam_m, m.adam_m + m.num_params);
        adam_v.assign(m.adam_v, m.adam_v + m.num_params);
        for (int l = 0; l < m.shape.L; l++)
            if (m.expert_bias && m.expert_bias[l])
                bias.insert(bias.end(), m.expert_bias[l], m.expert_bias[l] + m.shape.E);
        adam_step = (long)t.opt.t;
    }
    // Bitwise, so that a NaN left in place compares equal to itself.
    bool operator==(const TrainingState &o) const {
        auto same = [](const std::vector<float> &a, const std::vector<float> &b) {
            return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * 4) == 0;
        };
        return same(params, o.params) && same(adam_m, o.adam_m) && same(adam_v, o.adam_v) &&
               same(bias, o.bias) && adam_step == o.adam_step;
    }
};

class NonFiniteStep : public ::testing::Test {
  protected:
    void SetUp() override {
        comm_attach_self(&comm_);
        comm_split_groups(&comm_, 1);
    }
    void TearDown() override { comm_free_groups(&comm_); }
    Comm comm_{};
};

TEST_F(NonFiniteStep, AFiniteStepUpdatesAndReportsNothing) {
    TinyTrainer tiny(&comm_, 1);
    ASSERT_TRUE(tiny.ok());
    TrainingState before(*tiny.get());
    StepStats stats{};
    trainer_step(tiny.get(), 0, &stats);
    EXPECT_EQ(stats.nonfinite, 0);
    EXPECT_EQ(stats.nonfinite_tensor, -1);
    EXPECT_TRUE(std::isfinite(stats.ce_loss));
    EXPECT_FALSE(TrainingState(*tiny.get()) == before) << "a finite step must update";
}

// A NaN weight makes the loss and every gradient NaN: the step is reported
// and nothing moves, not even Adam's step count or the expert biases.
TEST_F(NonFiniteStep, ChangesNothingAndNamesATensor) {
    TinyTrainer tiny(&comm_, 1);
    ASSERT_TRUE(tiny.ok());
    StepStats stats{};
    trainer_step(tiny.get(), 0, &stats);
    ASSERT_EQ(stats.nonfinite, 0);
    Model &m = tiny.get()->model;
    m.params[m.tensors[tiny.TensorIndex("lnf_w")].offset] = NAN;
    TrainingState before(*tiny.get());
    trainer_step(tiny.get(), 1, &stats);
    EXPECT_EQ(stats.nonfinite, 1);
    EXPECT_TRUE(std::isnan(stats.ce_loss) || !std::isfinite(stats.grad_norm));
    ASSERT_GE(stats.nonfinite_tensor, 0);
    EXPECT_GE(stats.nonfinite_tensors, 1);
    EXPECT_TRUE(TrainingState(*tiny.get()) == before) << "a non-finite step changed the state";
}

TEST_F(NonFiniteStep, FindsTheFirstTensorInModelOrder) {
    TinyTrainer tiny(&comm_, 1);
    ASSERT_TRUE(tiny.ok());
    StepStats stats{};
    trainer_step(tiny.get(), 0, &stats);
    Model &m = tiny.get()->model;
    int count = -1;
    EXPECT_EQ(trainer_find_nonfinite_gradients(tiny.get(), &count), -1);
    EXPECT_EQ(count, 0);
    int expert = tiny.TensorIndex("layers.1.experts.fc2_w");
    const ParamTensor &fc2 = m.tensors[expert];
    m.grads[fc2.offset + fc2.numel - 1] = INFINITY;  // the very last gradient
    EXPECT_EQ(trainer_find_nonfinite_gradients(tiny.get(), &count), expert);
    EXPECT_EQ(count, 1);
    int qkv = tiny.TensorIndex("layers.0.qkv_w");
    m.grads[m.tensors[qkv].offset + 5] = -NAN;
    EXPECT_EQ(trainer_find_nonfinite_gradients(tiny.get(), &count), qkv);
    EXPECT_EQ(count, 2);
}

// ---------------------------------------------------------------------------
// --freeze

// The groups by tensor name, written out here rather than taken from
// model.c, so a tensor put in the wrong group fails the test.
bool EndsWith(const std::string &name, const std::string &suffix) {
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool IsAttention(const std::string &n) {
    return EndsWith(n, ".ln1_w") || EndsWith(n, ".qkv_w") || EndsWith(n, ".proj_w");
}
bool IsRouter(const std::string &n) {
    return EndsWith(n, ".router_w") || EndsWith(n, ".noise_w") || EndsWith(n, ".router_group_w") ||
           EndsWith(n, ".router_group_noise_w");
}
bool IsExpert(const std::string &n) {
    return n.find(".experts.") != std::string::npos || n.find(".shared_fc") != std::string::npos;
}
bool ExpectedFrozen(const std::string &freeze, const std::string &n) {
    if (freeze == "attention") return IsAttention(n);
    if (freeze == "router") return IsRouter(n);
    if (freeze == "experts") return IsExpert(n);
    if (freeze == "moe") return IsRouter(n) || IsExpert(n);
    if (freeze == "non-moe") return !IsRouter(n) && !IsExpert(n);
    ADD_FAILURE() << "unknown group " << freeze;
    return false;
}

bool SameBits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

// Every kind of tensor: a dense layer (0) and an MoE layer (1) with a shared
// expert, an untied head; the DeepSeek bias with topk, noise_w with
// noisy_topk.
const char *const kEveryTensor =
    "moe-layer-freq 2 moe-shared-expert-intermediate-size 16 "
    "untie-embeddings-and-output-weights 1 ";
const char *const kNoisy = "moe-router-type noisy_topk moe-router-enable-expert-bias 0 ";
const char *const kHierarchical =
    "moe-hierarchical-groups 2 moe-router-pre-softmax 1 moe-router-enable-expert-bias 0 ";

class TrainFreeze : public ::testing::TestWithParam<const char *> {
  protected:
    void SetUp() override {
        comm_attach_self(&comm_);
        comm_split_groups(&comm_, 1);
    }
    void TearDown() override { comm_free_groups(&comm_); }

    // Starts from non-zero Adam moments (as a loaded checkpoint would), trains
    // three steps, and holds every tensor to its group: frozen ones
    // bit-unchanged with their moments, the others moved.
    void CheckThreeSteps(const std::string &settings) {
        const std::string freeze = GetParam();
        TinyTrainer tiny(&comm_, 1, settings + "freeze " + freeze);
        ASSERT_TRUE(tiny.ok());
        Model &m = tiny.get()->model;
        for (size_t i = 0; i < m.num_params; i++) {
            m.adam_m[i] = 1e-3f * (float)(i % 7) - 3e-3f;
            m.adam_v[i] = 1e-6f * (float)(1 + i % 5);
        }
        TrainingState before(*tiny.get());
        StepStats stats{};
        for (long step = 0; step < 3; step++) {
            trainer_step(tiny.get(), step, &stats);
            ASSERT_EQ(stats.nonfinite, 0);
        }
        TrainingState after(*tiny.get());
        EXPECT_EQ(after.adam_step, before.adam_step + 3) << "the step count is the run's";
        int frozen = 0, trained = 0;
        for (int i = 0; i < m.num_tensors; i++) {
            const ParamTensor &t = m.tensors[i];
            const std::string name = t.name;
            bool expect_frozen = ExpectedFrozen(freeze, name);
            EXPECT_EQ(t.frozen != 0, expect_frozen) << name << " in the wrong group";
            const size_t o = t.offset;
            bool same_p = SameBits(&before.params[o], &after.params[o], t.numel);
            bool same_m = SameBits(&before.adam_m[o], &after.adam_m[o], t.numel);
            bool same_v = SameBits(&before.adam_v[o], &after.adam_v[o], t.numel);
            if (expect_frozen) {
                frozen++;
                EXPECT_TRUE(same_p && same_m && same_v) << name << " is frozen but changed";
            } else {
                trained++;
                EXPECT_FALSE(same_p) << name << " trains but kept its values";
                EXPECT_FALSE(same_m || same_v) << name << " trains but kept its moments";
            }
        }
        EXPECT_GT(frozen, 0);
        EXPECT_GT(trained, 0);
        if (!before.bias.empty()) {
            bool router_frozen = ExpectedFrozen(freeze, "layers.1.router_w");
            EXPECT_EQ(before.bias == after.bias, router_frozen)
                << "the expert bias moves exactly when the router trains";
        }
    }
    Comm comm_{};
};

TEST_P(TrainFreeze, FrozenTensorsAndTheirMomentsStayBitForBit) {
    CheckThreeSteps(kEveryTensor);
}

TEST_P(TrainFreeze, NoisyRouterWeightsFollowTheRouter) {
    CheckThreeSteps(std::string(kEveryTensor) + kNoisy);
}

TEST_P(TrainFreeze, HierarchicalPrimaryRouterFollowsTheRouter) {
    CheckThreeSteps(std::string(kEveryTensor) + kHierarchical);
    // the primary router is a named tensor of the MoE layer only: [groups, C]
    TinyTrainer tiny(&comm_, 1, std::string(kEveryTensor) + kHierarchical);
    ASSERT_TRUE(tiny.ok());
    const Model &m = tiny.get()->model;
    std::vector<std::string> primary;
    for (int i = 0; i < m.num_tensors; i++)
        if (EndsWith(m.tensors[i].name, ".router_group_w")) {
            primary.push_back(m.tensors[i].name);
            EXPECT_EQ(m.tensors[i].numel, 2u * 32u);
        }
    EXPECT_EQ(primary, std::vector<std::string>({"layers.1.router_group_w"}));
}

TEST_P(TrainFreeze, HierarchicalNoisyPrimaryFollowsTheRouter) {
    std::string flags = std::string(kEveryTensor) + kHierarchical + kNoisy +
                        "moe-importance-loss-coeff 0.01 moe-load-loss-coeff 0.01 ";
    CheckThreeSteps(flags);
    // the primary's noise weights: [groups, C], only with noisy_topk
    TinyTrainer tiny(&comm_, 1, flags);
    ASSERT_TRUE(tiny.ok());
    const Model &m = tiny.get()->model;
    std::vector<std::string> noise;
    for (int i = 0; i < m.num_tensors; i++)
        if (EndsWith(m.tensors[i].name, ".router_group_noise_w")) {
            noise.push_back(m.tensors[i].name);
            EXPECT_EQ(m.tensors[i].numel, 2u * 32u);
        }
    EXPECT_EQ(noise, std::vector<std::string>({"layers.1.router_group_noise_w"}));
}

INSTANTIATE_TEST_SUITE_P(TrainFreezeGroups, TrainFreeze,
                         ::testing::Values("attention", "router", "experts", "moe", "non-moe"),
                         [](const ::testing::TestParamInfo<const char *> &info) {
                             std::string name = info.param;
                             for (char &c : name)
                                 if (c == '-') c = '_';
                             return name;
                         });

class TrainFreezeNorm : public NonFiniteStep {};

// sqrt of the sum of squares of the gradients of the tensors that train,
// summed tensor by tensor in double (another order than the trainer's).
double TrainableNorm(const Model &m) {
    double sum = 0.0;
    for (int i = 0; i < m.num_tensors; i++) {
        if (m.tensors[i].frozen) continue;
        const float *g = m.grads + m.tensors[i].offset;
        for (size_t j = 0; j < m.tensors[i].numel; j++) sum += (double)g[j] * g[j];
    }
    return std::sqrt(sum);
}

// clip-grad 0 leaves the gradients as the norm saw them. Frozen tensors
// still get gradients (backward passes through them), but the norm that
// clipping uses leaves them out.
TEST_F(TrainFreezeNorm, ClipNormCoversOnlyTheTrainableGradients) {
    for (const char *freeze : {"experts", "attention", "non-moe"}) {
        TinyTrainer tiny(&comm_, 1, std::string(kEveryTensor) + "clip-grad 0 freeze " + freeze);
        ASSERT_TRUE(tiny.ok());
        StepStats stats{};
        trainer_step(tiny.get(), 0, &stats);
        const Model &m = tiny.get()->model;
        double frozen_sum = 0.0;
        for (int i = 0; i < m.num_tensors; i++) {
            if (!m.tensors[i].frozen) continue;
            const float *g = m.grads + m.tensors[i].offset;
            for (size_t j = 0; j < m.tensors[i].numel; j++) frozen_sum += (double)g[j] * g[j];
        }
        EXPECT_GT(frozen_sum, 0.0) << freeze << ": frozen tensors still get gradients";
        EXPECT_NEAR(stats.grad_norm, TrainableNorm(m), 1e-9 * stats.grad_norm) << freeze;
    }
}

// With nothing frozen the dense part of the norm is the one sum over the
// dense gradients it was before freezing existed: the same bits.
TEST_F(TrainFreezeNorm, NothingFrozenKeepsTheSingleDenseSum) {
    TinyTrainer tiny(&comm_, 1, kEveryTensor);
    ASSERT_TRUE(tiny.ok());
    StepStats stats{};
    trainer_step(tiny.get(), 0, &stats);
    Model &m = tiny.get()->model;
    for (int i = 0; i < m.num_tensors; i++) EXPECT_EQ(m.tensors[i].frozen, 0);
    EXPECT_EQ(trainable_dense_grad_sum_squares(&m), grad_sum_squares(m.grads, m.num_dense_params));
    model_freeze(&m, FREEZE_ROUTER);
    EXPECT_LT(trainable_dense_grad_sum_squares(&m), grad_sum_squares(m.grads, m.num_dense_params));
}

// Only rank 1 holds the bad expert gradient; both ranks must name it, or
// they would disagree on stopping.
TEST(DistributedNonFinite, AnExpertShardOnOneRankIsFoundOnEvery) {
    Comm comm{};
    comm_attach_world(&comm);
    if (comm.world_size != 2) GTEST_SKIP() << "needs mpirun -n 2";
    comm_split_groups(&comm, 2);
    {
        TinyTrainer tiny(&comm, 2);
        ASSERT_TRUE(tiny.ok());
        StepStats stats{};
        trainer_step(tiny.get(), 0, &stats);
        ASSERT_EQ(stats.nonfinite, 0);
        Model &m = tiny.get()->model;
        int expert = tiny.TensorIndex("layers.0.experts.fc1_w");
        if (comm.rank == 1) m.grads[m.tensors[expert].offset] = NAN;
        int count = 0;
        EXPECT_EQ(trainer_find_nonfinite_gradients(tiny.get(), &count), expert);
        EXPECT_EQ(count, 1);
    }
    comm_free_groups(&comm);
}

}  // namespace
