// trainer_step's guard against NaN and Inf: a step whose loss or gradient is
// not finite changes nothing (parameters, Adam state and step, expert biases)
// and names the first tensor whose gradient is not finite, the same on every
// rank. The Distributed* test runs under mpirun -n 2 (skipped on one rank).
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
    TinyTrainer(const Comm *comm, int ep_size) {
        config_defaults(&cfg_);
        std::istringstream settings(
            "num-layers 2 hidden-size 32 num-attention-heads 2 seq-length 16 num-experts 4 "
            "moe-ffn-hidden-size 32 ffn-hidden-size 64 micro-batch-size 2 data-format synthetic "
            "synthetic-tokens 20000 moe-router-enable-expert-bias 1");
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
