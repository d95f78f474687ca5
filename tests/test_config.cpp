// Pins down src/config.c: defaults, config_set, --flags, INI files,
// config_to_ini, derived quantities and config_validate, including that every
// error message names the key, the value and the fix.
#include <gtest/gtest.h>

#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "moesim/config.h"

namespace {

void ExpectMentions(const std::string &message, std::initializer_list<const char *> parts) {
    for (const char *part : parts)
        EXPECT_NE(message.find(part), std::string::npos)
            << "message should mention '" << part << "':\n  " << message;
}

// Owns argv strings for config_parse_args; argv[0] is the subcommand.
class Argv {
  public:
    Argv(std::initializer_list<std::string> args) : strings_(args) {
        for (std::string &s : strings_) pointers_.push_back(&s[0]);
        pointers_.push_back(nullptr);
    }
    int argc() const { return static_cast<int>(strings_.size()); }
    char **argv() { return pointers_.data(); }

  private:
    std::vector<std::string> strings_;
    std::vector<char *> pointers_;
};

// A uniquely named file under /tmp, removed when the test ends.
class TempIni {
  public:
    explicit TempIni(const std::string &text) {
        char name[] = "/tmp/moesim_test_config_XXXXXX.ini";
        int fd = mkstemps(name, 4);
        if (fd < 0) {
            ADD_FAILURE() << "mkstemps failed: " << strerror(errno);
            return;
        }
        path_ = name;
        ssize_t written = write(fd, text.data(), text.size());
        EXPECT_EQ(written, static_cast<ssize_t>(text.size())) << strerror(errno);
        EXPECT_EQ(close(fd), 0);
    }
    ~TempIni() {
        if (!path_.empty()) unlink(path_.c_str());
    }
    const std::string &path() const { return path_; }

  private:
    std::string path_;
};

// A fresh empty directory under /tmp, removed (with its files) at the end.
class TempDir {
  public:
    TempDir() {
        char name[] = "/tmp/moesim_test_dir_XXXXXX";
        if (!mkdtemp(name)) {
            ADD_FAILURE() << "mkdtemp failed: " << strerror(errno);
            return;
        }
        path_ = name;
    }
    ~TempDir() {
        for (const std::string &entry : Entries()) unlink((path_ + "/" + entry).c_str());
        rmdir(path_.c_str());
    }
    const std::string &path() const { return path_; }
    std::vector<std::string> Entries() const {
        std::vector<std::string> names;
        DIR *dir = opendir(path_.c_str());
        if (!dir) return names;
        while (struct dirent *entry = readdir(dir))
            if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0)
                names.push_back(entry->d_name);
        closedir(dir);
        return names;
    }

  private:
    std::string path_;
};

bool PathExists(const std::string &path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

// Defaults plus settings that let config_validate pass on any machine.
Config ValidConfig(const std::string &out) {
    Config cfg;
    config_defaults(&cfg);
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_set(&cfg, "data-format", "synthetic", err, sizeof(err)), 0) << err;
    EXPECT_EQ(config_set(&cfg, "out", out.c_str(), err, sizeof(err)), 0) << err;
    return cfg;
}

struct SetResult {
    int rc;
    std::string err;
};

SetResult Set(Config *cfg, const char *key, const char *value) {
    char err[MOESIM_ERR_MAX] = "";
    int rc = config_set(cfg, key, value, err, sizeof(err));
    return {rc, err};
}

SetResult Parse(Config *cfg, Argv args) {
    char err[MOESIM_ERR_MAX] = "";
    int rc = config_parse_args(cfg, args.argc(), args.argv(), err, sizeof(err));
    return {rc, err};
}

SetResult Validate(const Config &cfg) {
    char err[MOESIM_ERR_MAX] = "";
    int rc = config_validate(&cfg, err, sizeof(err));
    return {rc, err};
}

// Every "key = value" line of config_to_ini, in order.
std::vector<std::string> IniKeys(const Config &cfg) {
    char *text = config_to_ini(&cfg);
    EXPECT_NE(text, nullptr);
    std::vector<std::string> keys;
    if (!text) return keys;
    std::string ini(text);
    free(text);
    size_t start = 0;
    while (start < ini.size()) {
        size_t end = ini.find('\n', start);
        std::string line = ini.substr(start, end - start);
        size_t eq = line.find(" = ");
        EXPECT_NE(eq, std::string::npos) << "not a key = value line: " << line;
        keys.push_back(line.substr(0, eq));
        start = end == std::string::npos ? ini.size() : end + 1;
    }
    return keys;
}

}  // namespace

// ---------------------------------------------------------------------------
// Defaults

TEST(ConfigDefaults, MatchTheDocumentedSmallModel) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(cfg.num_layers, 4);
    EXPECT_EQ(cfg.hidden_size, 128);
    EXPECT_EQ(cfg.num_attention_heads, 4);
    EXPECT_EQ(cfg.ffn_hidden_size, 512);
    EXPECT_EQ(cfg.seq_length, 128);
    EXPECT_EQ(cfg.untie_embeddings_and_output_weights, 0);
    EXPECT_EQ(cfg.num_experts, 8);
    EXPECT_EQ(cfg.moe_router_topk, 2);
    EXPECT_EQ(cfg.moe_layer_freq, 1);
    EXPECT_EQ(cfg.moe_ffn_hidden_size, 256);
    EXPECT_EQ(cfg.moe_group_size, 0);
    EXPECT_EQ(cfg.moe_router_norm_topk_prob, 1);
    EXPECT_DOUBLE_EQ(cfg.moe_expert_capacity_factor, 1.25);
    EXPECT_DOUBLE_EQ(cfg.moe_aux_loss_coeff, 0.01);
    EXPECT_DOUBLE_EQ(cfg.moe_z_loss_coeff, 0.001);
    EXPECT_STREQ(cfg.moe_token_drop_policy, "position");
    EXPECT_EQ(cfg.micro_batch_size, 16);
    EXPECT_EQ(cfg.train_iters, 500);
    EXPECT_EQ(cfg.lr_warmup_iters, 50);
    EXPECT_EQ(cfg.eval_interval, 100);
    EXPECT_EQ(cfg.eval_iters, 8);
    EXPECT_EQ(cfg.log_interval, 1);
    EXPECT_EQ(cfg.record_group_counts_interval, 1);
    EXPECT_EQ(cfg.progress_interval, 10);
    EXPECT_DOUBLE_EQ(cfg.lr, 3e-3);
    EXPECT_DOUBLE_EQ(cfg.min_lr, 3e-4);
    EXPECT_DOUBLE_EQ(cfg.weight_decay, 0.1);
    EXPECT_DOUBLE_EQ(cfg.clip_grad, 1.0);
    EXPECT_DOUBLE_EQ(cfg.adam_beta1, 0.9);
    EXPECT_DOUBLE_EQ(cfg.adam_beta2, 0.95);
    EXPECT_DOUBLE_EQ(cfg.adam_eps, 1e-8);
    EXPECT_EQ(cfg.seed, 1234);
    EXPECT_STREQ(cfg.data_path, "/usr/share/games/fortunes");
    EXPECT_STREQ(cfg.data_format, "auto");
    EXPECT_DOUBLE_EQ(cfg.val_fraction, 0.1);
    EXPECT_EQ(cfg.synthetic_clusters, 8);
    EXPECT_EQ(cfg.synthetic_tokens, 1000000);
    EXPECT_STREQ(cfg.out, "runs/moesim.h5");
}

// The routing-scheme keys default to plain top-k softmax routing, so a
// config written before they existed trains exactly as it did.
TEST(ConfigDefaults, RoutingSchemeKeysMeanPlainTopk) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_STREQ(cfg.moe_router_type, "topk");
    EXPECT_EQ(cfg.moe_router_pre_softmax, 1);
    EXPECT_STREQ(cfg.moe_router_score_function, "softmax");
    EXPECT_EQ(cfg.moe_router_enable_expert_bias, 0);
    EXPECT_EQ(cfg.moe_router_bias_update_rate, 1e-3) << "Megatron's and DeepSeek-V3's";
    EXPECT_EQ(cfg.moe_input_jitter_eps, 0.0);
    EXPECT_EQ(cfg.moe_eval_capacity_factor, -1.0);
    EXPECT_EQ(cfg.moe_min_capacity, 4);
    EXPECT_STREQ(cfg.moe_router_load_balancing_type, "aux_loss");
    EXPECT_EQ(cfg.moe_importance_loss_coeff, 0.0);
    EXPECT_EQ(cfg.moe_load_loss_coeff, 0.0);
    EXPECT_STREQ(cfg.moe_expert_activation, "gelu");
    EXPECT_EQ(cfg.moe_shared_expert_intermediate_size, 0);
}

// Mixed precision: float32 unless asked; every pairing of the two keys is a
// valid run (bf16 with a float32 router is Switch's selective precision, a
// bf16 router alone is an ablation); anything else names key, value, choices.
TEST(ConfigPrecision, DefaultsAreFloat32AndEveryPairingIsValid) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_STREQ(cfg.precision, "fp32");
    EXPECT_STREQ(cfg.moe_router_precision, "fp32");
    TempDir dir;
    for (const char *precision : {"fp32", "bf16"})
        for (const char *router : {"fp32", "bf16"}) {
            Config c = ValidConfig(dir.path() + "/run.h5");
            ASSERT_EQ(Set(&c, "precision", precision).rc, 0);
            ASSERT_EQ(Set(&c, "moe_router_precision", router).rc, 0);
            EXPECT_STREQ(c.precision, precision);
            EXPECT_STREQ(c.moe_router_precision, router);
            SetResult r = Validate(c);
            EXPECT_EQ(r.rc, 0) << precision << " / " << router << ": " << r.err;
        }
}

TEST(ConfigPrecision, UnknownValueNamesKeyValueAndChoices) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "precision", "fp16");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--precision", "\"fp16\"", "fp32|bf16"});
    r = Set(&cfg, "moe-router-precision", "BF16");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-precision", "\"BF16\"", "did you mean \"bf16\"",
                           "fp32|bf16"});
    EXPECT_STREQ(cfg.precision, "fp32") << "a refused value must not stick";
    EXPECT_STREQ(cfg.moe_router_precision, "fp32");
    r = Parse(&cfg, {"train", "--precision", "float32"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--precision", "\"float32\"", "fp32|bf16"});
}

// --bf16-gemm: auto unless asked (onednn where it runs natively); an unknown
// value names the key, the value and the choices, in a flag and in an INI key.
TEST(ConfigPrecision, Bf16GemmDefaultsToAutoAndRefusesUnknownValues) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_STREQ(cfg.bf16_gemm, "auto");
    for (const char *gemm : {"auto", "onednn", "emulated"}) {
        ASSERT_EQ(Set(&cfg, "bf16-gemm", gemm).rc, 0) << gemm;
        EXPECT_STREQ(cfg.bf16_gemm, gemm);
    }
    SetResult r = Set(&cfg, "bf16-gemm", "mkl");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--bf16-gemm", "\"mkl\"", "auto|onednn|emulated"});
    EXPECT_STREQ(cfg.bf16_gemm, "emulated") << "a refused value must not stick";
    r = Parse(&cfg, {"train", "--bf16-gemm", "OneDNN"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--bf16-gemm", "\"OneDNN\"", "did you mean \"onednn\""});
    r = Parse(&cfg, {"train", "--bf16-gemm"});
    EXPECT_EQ(r.rc, -1) << "a flag without its value";
}

TEST(ConfigDefaults, PassValidation) {
    TempDir dir;
    Config cfg = ValidConfig(dir.path() + "/run.h5");
    SetResult r = Validate(cfg);
    EXPECT_EQ(r.rc, 0) << r.err;
}

// ---------------------------------------------------------------------------
// config_set

TEST(ConfigSet, AcceptsDashAndUnderscoreSpellings) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(Set(&cfg, "hidden-size", "256").rc, 0);
    EXPECT_EQ(cfg.hidden_size, 256);
    EXPECT_EQ(Set(&cfg, "hidden_size", "64").rc, 0);
    EXPECT_EQ(cfg.hidden_size, 64);
    EXPECT_EQ(Set(&cfg, "moe_expert-capacity_factor", "2.5").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.moe_expert_capacity_factor, 2.5);
}

TEST(ConfigSet, ParsesEveryType) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(Set(&cfg, "seed", "4000000000").rc, 0);
    EXPECT_EQ(cfg.seed, 4000000000L);
    EXPECT_EQ(Set(&cfg, "lr", "1.5e-4").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.lr, 1.5e-4);
    EXPECT_EQ(Set(&cfg, "data-path", "/some/where.tok").rc, 0);
    EXPECT_STREQ(cfg.data_path, "/some/where.tok");
    EXPECT_EQ(Set(&cfg, "data-format", "tokens").rc, 0);
    EXPECT_STREQ(cfg.data_format, "tokens");
    EXPECT_EQ(Set(&cfg, "moe-group-size", "0").rc, 0);
    EXPECT_EQ(cfg.moe_group_size, 0);
    EXPECT_EQ(Set(&cfg, "lr-warmup-iters", "0").rc, 0);
    EXPECT_EQ(cfg.lr_warmup_iters, 0);
}

TEST(ConfigSet, AcceptsEveryBooleanSpelling) {
    Config cfg;
    config_defaults(&cfg);
    const char *truthy[] = {"1", "true", "TRUE", "yes", "on", "On"};
    const char *falsy[] = {"0", "false", "no", "off", "OFF"};
    for (const char *text : truthy) {
        cfg.untie_embeddings_and_output_weights = 0;
        EXPECT_EQ(Set(&cfg, "untie-embeddings-and-output-weights", text).rc, 0) << text;
        EXPECT_EQ(cfg.untie_embeddings_and_output_weights, 1) << text;
    }
    for (const char *text : falsy) {
        cfg.moe_router_norm_topk_prob = 1;
        EXPECT_EQ(Set(&cfg, "moe-router-norm-topk-prob", text).rc, 0) << text;
        EXPECT_EQ(cfg.moe_router_norm_topk_prob, 0) << text;
    }
}

TEST(ConfigSet, RejectsNonIntegerAndKeepsTheOldValue) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "hidden-size", "12x");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--hidden-size", "\"12x\"", "not an integer", "whole number"});
    EXPECT_EQ(cfg.hidden_size, 128);
    for (const char *bad : {"", "1.5", "1e3", "0x10", "twelve"})
        EXPECT_EQ(Set(&cfg, "num-layers", bad).rc, -1) << bad;
    EXPECT_EQ(cfg.num_layers, 4);
}

TEST(ConfigSet, RejectsNonNumber) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "lr", "fast");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--lr", "\"fast\"", "not a finite number", "such as"});
    EXPECT_EQ(Set(&cfg, "lr", "nan").rc, -1);
    EXPECT_EQ(Set(&cfg, "lr", "inf").rc, -1);
    EXPECT_EQ(Set(&cfg, "lr", "1e999").rc, -1);
    EXPECT_DOUBLE_EQ(cfg.lr, 3e-3);
}

TEST(ConfigSet, RejectsOutOfRangeNamingTheBound) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "lr", "-1");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, "--lr: -1 is out of range; it must be > 0");
    ExpectMentions(Set(&cfg, "lr", "0").err, {"--lr", "0", "> 0"});
    ExpectMentions(Set(&cfg, "adam-beta2", "1").err, {"--adam-beta2", "1", "< 1"});
    ExpectMentions(Set(&cfg, "adam-beta1", "-0.1").err, {"--adam-beta1", "-0.1", ">= 0"});
    ExpectMentions(Set(&cfg, "hidden-size", "1000000").err,
                   {"--hidden-size", "1000000", "<= 65536"});
    ExpectMentions(Set(&cfg, "num-experts", "0").err, {"--num-experts", "0", ">= 1"});
    ExpectMentions(Set(&cfg, "moe-group-size", "-1").err, {"--moe-group-size", ">= 0"});
    ExpectMentions(Set(&cfg, "val-fraction", "0").err, {"--val-fraction", "> 0"});
    ExpectMentions(Set(&cfg, "val-fraction", "0.6").err, {"--val-fraction", "0.6", "<= 0.5"});
    ExpectMentions(Set(&cfg, "synthetic-clusters", "257").err, {"257", "<= 256"});
    ExpectMentions(Set(&cfg, "synthetic-tokens", "999").err, {"999", ">= 1000"});
    ExpectMentions(Set(&cfg, "adam-eps", "0").err, {"--adam-eps", "> 0"});
    ExpectMentions(Set(&cfg, "weight-decay", "-0.5").err, {"--weight-decay", ">= 0"});
    ExpectMentions(Set(&cfg, "bench-iters", "0").err, {"--bench-iters", "0", ">= 1"});
    ExpectMentions(Set(&cfg, "bench-warmup-iters", "-1").err, {"--bench-warmup-iters", ">= 0"});
    ExpectMentions(Set(&cfg, "seq-length", "99999999999999999999999").err,
                   {"--seq-length", "99999999999999999999999", "out of range"});
    EXPECT_DOUBLE_EQ(cfg.lr, 3e-3);
    EXPECT_EQ(cfg.hidden_size, 128);
    EXPECT_DOUBLE_EQ(cfg.val_fraction, 0.1);
    EXPECT_EQ(Set(&cfg, "val-fraction", "0.5").rc, 0);
    EXPECT_EQ(Set(&cfg, "adam-beta1", "0").rc, 0);
}

TEST(ConfigSet, RejectsBadBoolean) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "moe-router-norm-topk-prob", "maybe");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-norm-topk-prob", "\"maybe\"", "true/false"});
    EXPECT_EQ(cfg.moe_router_norm_topk_prob, 1);
}

TEST(ConfigSet, RejectsUnknownChoices) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "data-format", "csv");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--data-format", "\"csv\"", "auto", "text", "tokens", "synthetic"});
    EXPECT_EQ(r.err.find("did you mean"), std::string::npos) << r.err;
    r = Set(&cfg, "moe-token-drop-policy", "random");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-token-drop-policy", "\"random\"", "position|probs"});
    EXPECT_STREQ(cfg.data_format, "auto");
    EXPECT_STREQ(cfg.moe_token_drop_policy, "position");
}

TEST(ConfigSet, UnknownChoiceSuggestsTheNearestChoice) {
    Config cfg;
    config_defaults(&cfg);
    const char *types = "topk|switch|noisy_topk|gshard_top2|expert_choice|sinkhorn|soft";
    SetResult r = Set(&cfg, "moe-router-type", "topK");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, std::string("--moe-router-type: \"topK\" is not a valid choice; did you "
                                 "mean \"topk\"? (one of ") +
                         types + ")");
    ExpectMentions(Set(&cfg, "moe-router-type", "noisy-topk").err,
                   {"\"noisy-topk\"", "did you mean \"noisy_topk\"", types});
    ExpectMentions(Set(&cfg, "moe-router-type", "expert-choice").err,
                   {"did you mean \"expert_choice\""});
    ExpectMentions(Set(&cfg, "moe-router-load-balancing-type", "seq-aux-loss").err,
                   {"--moe-router-load-balancing-type", "did you mean \"seq_aux_loss\"",
                    "aux_loss|seq_aux_loss|global_aux_loss|none"});
    ExpectMentions(Set(&cfg, "moe-router-score-function", "sigmod").err,
                   {"did you mean \"sigmoid\"", "softmax|sigmoid"});
    ExpectMentions(Set(&cfg, "moe-expert-activation", "swish").err,
                   {"--moe-expert-activation", "\"swish\"", "gelu|swiglu"});
    r = Set(&cfg, "moe-router-type", "hash");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err.find("did you mean"), std::string::npos) << r.err;
    ExpectMentions(r.err, {"\"hash\"", "use one of", types});
    EXPECT_STREQ(cfg.moe_router_type, "topk");
}

// --freeze: a comma list of groups; each group is a set of FREEZE_* bits.
TEST(ConfigFreeze, DefaultIsNothingAndEveryGroupNamesItsBits) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_STREQ(cfg.freeze, "");
    EXPECT_EQ(config_freeze_groups(&cfg), 0u);
    const struct {
        const char *value;
        unsigned groups;
    } cases[] = {
        {"attention", FREEZE_ATTENTION},
        {"router", FREEZE_ROUTER},
        {"experts", FREEZE_EXPERTS},
        {"moe", FREEZE_ROUTER | FREEZE_EXPERTS},
        {"non-moe", FREEZE_ATTENTION | FREEZE_NON_MOE_REST},
        {"router,experts", FREEZE_ROUTER | FREEZE_EXPERTS},
        {"experts,attention", FREEZE_EXPERTS | FREEZE_ATTENTION},
        {"moe,router", FREEZE_ROUTER | FREEZE_EXPERTS},  // overlap and repeats are harmless
        {"attention,attention", FREEZE_ATTENTION},
        {"", 0u},
    };
    for (const auto &c : cases) {
        SetResult r = Set(&cfg, "freeze", c.value);
        ASSERT_EQ(r.rc, 0) << c.value << ": " << r.err;
        EXPECT_STREQ(cfg.freeze, c.value);
        EXPECT_EQ(config_freeze_groups(&cfg), c.groups) << c.value;
    }
}

TEST(ConfigFreeze, BadItemsNameTheFlagTheItemAndTheChoices) {
    const char *groups = "attention|router|experts|non-moe|moe";
    Config cfg;
    config_defaults(&cfg);
    ASSERT_EQ(Set(&cfg, "freeze", "experts").rc, 0);
    SetResult r = Set(&cfg, "freeze", "router,expert");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, std::string("--freeze: \"expert\" is not a valid choice; did you mean "
                                 "\"experts\"? (a comma list of ") +
                         groups + ")");
    r = Set(&cfg, "freeze", "all");
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--freeze", "\"all\"", "use a comma list of", groups});
    ExpectMentions(Set(&cfg, "freeze", "non_moe").err, {"did you mean \"non-moe\""});
    ExpectMentions(Set(&cfg, "freeze", "router, experts").err,
                   {"\" experts\" is not a valid choice", "did you mean \"experts\""});
    for (const char *value : {"router,,experts", "router,", ",router", ","}) {
        r = Set(&cfg, "freeze", value);
        EXPECT_EQ(r.rc, -1) << value;
        ExpectMentions(
            r.err, {"--freeze", (std::string("\"") + value + "\"").c_str(), "empty item", groups});
    }
    r = Set(&cfg, "freeze", (std::string("router,") + std::string(100, 'x')).c_str());
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--freeze", "is not a valid choice"});
    EXPECT_STREQ(cfg.freeze, "experts") << "a rejected value must keep the old one";
}

TEST(ConfigFreeze, FlagAndIniSpellings) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--freeze", "non-moe"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_STREQ(cfg.freeze, "non-moe");
    EXPECT_TRUE(config_key_given(&cfg, "freeze"));
    r = Parse(&cfg, {"train", "--freeze=attention,router"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_STREQ(cfg.freeze, "attention,router");
    r = Parse(&cfg, {"train", "--freeze", "routers"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--freeze", "\"routers\"", "did you mean \"router\""});
    TempIni ini("[training]\nfreeze = moe\n");
    config_defaults(&cfg);
    r = Parse(&cfg, {"train", "--config", ini.path()});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(config_freeze_groups(&cfg), unsigned(FREEZE_ROUTER | FREEZE_EXPERTS));
    TempIni bad("freeze = moe,,\n");
    config_defaults(&cfg);
    r = Parse(&cfg, {"train", "--config", bad.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {(bad.path() + ":1:").c_str(), "freeze", "empty item"});
}

TEST(ConfigSet, ParsesTheRoutingSchemeKeys) {
    Config cfg;
    config_defaults(&cfg);
    for (const char *type :
         {"topk", "switch", "noisy_topk", "gshard_top2", "expert_choice", "sinkhorn", "soft"}) {
        SetResult r = Set(&cfg, "moe-router-type", type);
        EXPECT_EQ(r.rc, 0) << r.err;
        EXPECT_STREQ(cfg.moe_router_type, type);
    }
    for (const char *type : {"aux_loss", "seq_aux_loss", "global_aux_loss", "none"}) {
        SetResult r = Set(&cfg, "moe_router_load_balancing_type", type);
        EXPECT_EQ(r.rc, 0) << r.err;
        EXPECT_STREQ(cfg.moe_router_load_balancing_type, type);
    }
    EXPECT_EQ(Set(&cfg, "moe-token-drop-policy", "probs").rc, 0);
    EXPECT_STREQ(cfg.moe_token_drop_policy, "probs");
    EXPECT_EQ(Set(&cfg, "moe-router-pre-softmax", "off").rc, 0);
    EXPECT_EQ(cfg.moe_router_pre_softmax, 0);
    EXPECT_EQ(Set(&cfg, "moe-router-score-function", "sigmoid").rc, 0);
    EXPECT_STREQ(cfg.moe_router_score_function, "sigmoid");
    EXPECT_EQ(Set(&cfg, "moe-router-enable-expert-bias", "yes").rc, 0);
    EXPECT_EQ(cfg.moe_router_enable_expert_bias, 1);
    EXPECT_EQ(Set(&cfg, "moe-router-bias-update-rate", "1e-3").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.moe_router_bias_update_rate, 1e-3);
    EXPECT_EQ(Set(&cfg, "moe-input-jitter-eps", "0.01").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.moe_input_jitter_eps, 0.01);
    EXPECT_EQ(Set(&cfg, "moe-min-capacity", "0").rc, 0);
    EXPECT_EQ(cfg.moe_min_capacity, 0);
    EXPECT_EQ(Set(&cfg, "moe-importance-loss-coeff", "0.1").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.moe_importance_loss_coeff, 0.1);
    EXPECT_EQ(Set(&cfg, "moe-load-loss-coeff", "0.2").rc, 0);
    EXPECT_DOUBLE_EQ(cfg.moe_load_loss_coeff, 0.2);
    EXPECT_EQ(Set(&cfg, "moe-expert-activation", "swiglu").rc, 0);
    EXPECT_STREQ(cfg.moe_expert_activation, "swiglu");
    EXPECT_EQ(Set(&cfg, "moe-shared-expert-intermediate-size", "512").rc, 0);
    EXPECT_EQ(cfg.moe_shared_expert_intermediate_size, 512);
}

// -1 (the training factor) and 0 (dropless) sit outside the (0, 1000]
// range of an actual factor; anything else below it is a typo.
TEST(ConfigSet, CapacityFactorsAcceptTheirSpecialValuesOnly) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(Set(&cfg, "moe-expert-capacity-factor", "0").rc, 0);
    EXPECT_EQ(cfg.moe_expert_capacity_factor, 0.0);
    SetResult r = Set(&cfg, "moe-expert-capacity-factor", "-1");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "--moe-expert-capacity-factor: -1 is out of range; it must be > 0, or 0 for "
              "dropless (no capacity, nothing dropped)");
    ExpectMentions(Set(&cfg, "moe-expert-capacity-factor", "-0.5").err, {"-0.5", "> 0"});
    ExpectMentions(Set(&cfg, "moe-expert-capacity-factor", "1001").err, {"1001", "<= 1000"});
    EXPECT_EQ(cfg.moe_expert_capacity_factor, 0.0);

    for (const char *ok : {"-1", "0", "0.5", "2"}) {
        SetResult accepted = Set(&cfg, "moe-eval-capacity-factor", ok);
        EXPECT_EQ(accepted.rc, 0) << ok << ": " << accepted.err;
        EXPECT_EQ(cfg.moe_eval_capacity_factor, atof(ok));
    }
    for (const char *bad : {"-0.5", "-2", "-1.5", "1e9"}) {
        r = Set(&cfg, "moe-eval-capacity-factor", bad);
        EXPECT_EQ(r.rc, -1) << bad;
        ExpectMentions(r.err, {"--moe-eval-capacity-factor", bad, "out of range"});
    }
    EXPECT_EQ(Set(&cfg, "moe-eval-capacity-factor", "-0.5").err,
              "--moe-eval-capacity-factor: -0.5 is out of range; it must be > 0, or -1 for the "
              "training factor, or 0 for dropless");
    EXPECT_EQ(cfg.moe_eval_capacity_factor, 2.0);
}

TEST(ConfigSet, RejectsOutOfRangeRoutingSchemeValues) {
    Config cfg;
    config_defaults(&cfg);
    ExpectMentions(Set(&cfg, "moe-router-bias-update-rate", "-1e-3").err,
                   {"--moe-router-bias-update-rate", "-1e-3", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-input-jitter-eps", "1").err,
                   {"--moe-input-jitter-eps", "1", "< 1"});
    ExpectMentions(Set(&cfg, "moe-input-jitter-eps", "-0.01").err,
                   {"--moe-input-jitter-eps", "-0.01", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-min-capacity", "-1").err, {"--moe-min-capacity", "-1", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-importance-loss-coeff", "-0.1").err,
                   {"--moe-importance-loss-coeff", "-0.1", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-load-loss-coeff", "-0.1").err,
                   {"--moe-load-loss-coeff", "-0.1", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-shared-expert-intermediate-size", "-4").err,
                   {"--moe-shared-expert-intermediate-size", "-4", ">= 0"});
    ExpectMentions(Set(&cfg, "moe-router-pre-softmax", "2").err,
                   {"--moe-router-pre-softmax", "\"2\"", "not a boolean"});
    EXPECT_EQ(Set(&cfg, "moe-input-jitter-eps", "0.999").rc, 0);
    Config defaults;
    config_defaults(&defaults);
    EXPECT_EQ(cfg.moe_router_bias_update_rate, defaults.moe_router_bias_update_rate);
    EXPECT_EQ(cfg.moe_min_capacity, defaults.moe_min_capacity);
    EXPECT_EQ(cfg.moe_importance_loss_coeff, defaults.moe_importance_loss_coeff);
    EXPECT_EQ(cfg.moe_load_loss_coeff, defaults.moe_load_loss_coeff);
    EXPECT_EQ(cfg.moe_shared_expert_intermediate_size,
              defaults.moe_shared_expert_intermediate_size);
    EXPECT_EQ(cfg.moe_router_pre_softmax, 1);
}

TEST(ConfigSet, RejectsEmptyAndOverlongStrings) {
    Config cfg;
    config_defaults(&cfg);
    ExpectMentions(Set(&cfg, "out", "").err, {"--out", "empty", "runs/moesim.h5"});
    std::string long_path(MOESIM_PATH_MAX, 'a');
    SetResult r = Set(&cfg, "data-path", long_path.c_str());
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--data-path", "4096 characters", "limit is 4095"});
    EXPECT_STREQ(cfg.data_path, "/usr/share/games/fortunes");
    std::string longest(MOESIM_PATH_MAX - 1, 'b');
    EXPECT_EQ(Set(&cfg, "data-path", longest.c_str()).rc, 0);
    EXPECT_EQ(std::string(cfg.data_path), longest);
}

TEST(ConfigSet, UnknownKeySuggestsTheNearestName) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Set(&cfg, "hiden-size", "64");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "unknown key \"hiden-size\"; did you mean \"hidden-size\"? "
              "(moesim --help lists every key)");
    ExpectMentions(Set(&cfg, "num_expert", "4").err, {"\"num_expert\"", "\"num-experts\""});
    ExpectMentions(Set(&cfg, "layers", "4").err, {"\"num-layers\""});
    ExpectMentions(Set(&cfg, "moe-router-top-k", "1").err, {"\"moe-router-topk\""});
    r = Set(&cfg, "xyz", "1");
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err.find("did you mean"), std::string::npos) << r.err;
    ExpectMentions(r.err, {"\"xyz\"", "moesim --help"});
}

// ---------------------------------------------------------------------------
// Command line

TEST(ConfigArgs, AcceptsSpaceAndEqualsForms) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--num-layers", "2", "--lr=1e-3", "--data-path=a=b",
                               "--untie-embeddings-and-output-weights", "yes", "--seed", "-0"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.num_layers, 2);
    EXPECT_DOUBLE_EQ(cfg.lr, 1e-3);
    EXPECT_STREQ(cfg.data_path, "a=b");
    EXPECT_EQ(cfg.untie_embeddings_and_output_weights, 1);
    EXPECT_EQ(cfg.seed, 0);
}

TEST(ConfigArgs, NoFlagsKeepsDefaults) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train"});
    EXPECT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.num_layers, 4);
}

TEST(ConfigArgs, ReportsBadValuesWithTheFlagName) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--hidden-size", "12x"});
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, "--hidden-size: \"12x\" is not an integer; give a whole number such as 128");
    r = Parse(&cfg, {"train", "--lr=-1"});
    EXPECT_EQ(r.err, "--lr: -1 is out of range; it must be > 0");
}

TEST(ConfigArgs, UnknownFlagSuggestsTheNearestFlag) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--hiden-size", "64"});
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "unknown flag \"--hiden-size\"; did you mean \"--hidden-size\"? "
              "(moesim --help lists every key)");
    ExpectMentions(Parse(&cfg, {"train", "--num-expert=4"}).err,
                   {"\"--num-expert\"", "\"--num-experts\""});
    ExpectMentions(Parse(&cfg, {"train", "--confg", "x.ini"}).err, {"\"--config\""});
    ExpectMentions(Parse(&cfg, {"train", "-h"}).err, {"unknown flag \"-h\""});
    EXPECT_EQ(cfg.hidden_size, 128);
}

// getopt_long would take "--hidden" as "--hidden-size"; a key added later
// could silently change such a command line, so only full names count.
TEST(ConfigArgs, RejectsAbbreviatedFlags) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--hidden", "64"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"unknown flag \"--hidden\"", "did you mean \"--hidden-size\""});
    EXPECT_EQ(cfg.hidden_size, 128);
}

TEST(ConfigArgs, FlagWithoutValueIsAnError) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--num-layers", "2", "--lr"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--lr needs a value", "--lr 3e-3", "but the 0|1 switches"});
    r = Parse(&cfg, {"train", "--hidden-size", "--num-layers", "2"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--hidden-size needs a value but got the flag --num-layers",
                           "every flag but the 0|1 switches takes one"});
}

// As in Megatron, a 0|1 switch alone turns it on, before another flag or at
// the end; it still takes 0/1 (or true/false, ...) as the next argument or
// after '='.
TEST(ConfigArgs, BareSwitchMeansOne) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--untie-embeddings-and-output-weights", "--num-layers",
                               "2", "--moe-router-enable-expert-bias"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.untie_embeddings_and_output_weights, 1);
    EXPECT_EQ(cfg.moe_router_enable_expert_bias, 1);
    EXPECT_EQ(cfg.num_layers, 2);
    EXPECT_TRUE(config_key_given(&cfg, "moe-router-enable-expert-bias"));

    config_defaults(&cfg);
    r = Parse(&cfg, {"train", "--moe-router-norm-topk-prob", "0", "--flush-denormals=0",
                     "--untie-embeddings-and-output-weights=1", "--moe-router-pre-softmax", "off"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.moe_router_norm_topk_prob, 0);
    EXPECT_EQ(cfg.flush_denormals, 0);
    EXPECT_EQ(cfg.untie_embeddings_and_output_weights, 1);
    EXPECT_EQ(cfg.moe_router_pre_softmax, 0);
}

TEST(ConfigArgs, SwitchWithAWrongValueNamesIt) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--moe-router-enable-expert-bias", "2"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-enable-expert-bias", "\"2\"", "not a boolean"});
    r = Parse(&cfg, {"train", "--flush-denormals="});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--flush-denormals", "not a boolean"});
    r = Parse(&cfg, {"train", "--overlap-grad-reduce", "2"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--overlap-grad-reduce", "\"2\"", "not a boolean"});
}

// --overlap-grad-reduce (Megatron's name) is off unless asked for, with any
// dispatcher and overlap setting.
TEST(ConfigArgs, OverlapGradReduceIsAnOptInSwitch) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(cfg.overlap_grad_reduce, 0);
    SetResult r = Parse(&cfg, {"train", "--overlap-grad-reduce", "1", "--moe-overlap-chunks", "2"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.overlap_grad_reduce, 1);
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), 0) << err;
}

// Flags, INI lines and config_set mark a key as given, even at its default
// value; defaults and values set in code do not.
TEST(ConfigArgs, RemembersWhichKeysWereGiven) {
    TempIni ini("moe-expert-capacity-factor = 1.25\n");
    Config cfg;
    config_defaults(&cfg);
    EXPECT_FALSE(config_key_given(&cfg, "moe-expert-capacity-factor"));
    SetResult r = Parse(&cfg, {"train", "--config", ini.path(), "--lr", "3e-3"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(config_key_given(&cfg, "moe-expert-capacity-factor"));
    EXPECT_TRUE(config_key_given(&cfg, "lr"));
    EXPECT_FALSE(config_key_given(&cfg, "min-lr"));
    EXPECT_FALSE(config_key_given(&cfg, "no-such-key"));
    ASSERT_EQ(Set(&cfg, "moe_z_loss_coeff", "0.001").rc, 0);
    EXPECT_TRUE(config_key_given(&cfg, "moe-z-loss-coeff"));
    cfg.moe_aux_loss_coeff = 0.5;
    EXPECT_FALSE(config_key_given(&cfg, "moe-aux-loss-coeff"));
}

TEST(ConfigArgs, PositionalArgumentIsAnError) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--num-layers", "2", "extra"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"unexpected argument \"extra\"", "--key value"});
    EXPECT_EQ(Parse(&cfg, {"train", "--", "x"}).rc, -1);
}

// GNU getopt permutes argv by default; the caller's argv must stay as given.
TEST(ConfigArgs, LeavesArgvInItsOriginalOrder) {
    Config cfg;
    config_defaults(&cfg);
    Argv args{"train", "extra", "--num-layers", "2"};
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_parse_args(&cfg, args.argc(), args.argv(), err, sizeof(err)), -1);
    ExpectMentions(err, {"unexpected argument \"extra\""});
    EXPECT_STREQ(args.argv()[1], "extra");
    EXPECT_STREQ(args.argv()[2], "--num-layers");
}

// getopt keeps state between calls; an error in the middle of "-ab" leaves it
// pointing into an argv that no longer exists unless parsing resets it.
TEST(ConfigArgs, CanParseRepeatedlyInOneProcess) {
    for (int round = 0; round < 3; round++) {
        Config cfg;
        config_defaults(&cfg);
        SetResult bad = Parse(&cfg, {"train", "--num-layers", "2", "--bogus", "1"});
        EXPECT_EQ(bad.rc, -1);
        EXPECT_EQ(Parse(&cfg, {"train", "-ab"}).rc, -1);
        Config fresh;
        config_defaults(&fresh);
        SetResult good = Parse(&fresh, {"train", "--num-layers", "3", "--seed", "7"});
        ASSERT_EQ(good.rc, 0) << "round " << round << ": " << good.err;
        EXPECT_EQ(fresh.num_layers, 3);
        EXPECT_EQ(fresh.seed, 7);
    }
}

// ---------------------------------------------------------------------------
// INI files

TEST(ConfigIni, AppliesKeysFromEverySectionInBothSpellings) {
    TempIni ini(
        "; a comment\n"
        "# another comment\n"
        "num-layers = 2\n"
        "[model]\n"
        "hidden_size = 64   ; inline comment\n"
        "[moe]\n"
        "num-experts=4\n"
        "moe_router_topk = 1\n"
        "\n"
        "[data]\n"
        "data-path = /tmp/some corpus.txt\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(cfg.num_layers, 2);
    EXPECT_EQ(cfg.hidden_size, 64);
    EXPECT_EQ(cfg.num_experts, 4);
    EXPECT_EQ(cfg.moe_router_topk, 1);
    EXPECT_STREQ(cfg.data_path, "/tmp/some corpus.txt");
    EXPECT_EQ(cfg.seq_length, 128);
}

TEST(ConfigIni, FlagsOverrideTheFileRegardlessOfOrder) {
    TempIni ini("[model]\nnum-layers = 2\nhidden-size = 64\n");
    Config before;
    config_defaults(&before);
    SetResult r = Parse(&before, {"train", "--num-layers", "6", "--config", ini.path()});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(before.num_layers, 6);
    EXPECT_EQ(before.hidden_size, 64);

    Config after;
    config_defaults(&after);
    r = Parse(&after, {"train", "--config=" + ini.path(), "--num-layers=6"});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(after.num_layers, 6);
    EXPECT_EQ(after.hidden_size, 64);
}

TEST(ConfigIni, MissingFileNamesThePathAndReason) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", "/nonexistent-moesim/run.ini"});
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "cannot read config file /nonexistent-moesim/run.ini: No such file or directory; "
              "check the path");
}

TEST(ConfigIni, DirectoryInsteadOfFileIsUnreadable) {
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", "/tmp"});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"cannot read config file /tmp", "Is a directory"});
}

TEST(ConfigIni, SyntaxErrorReportsFileAndLine) {
    TempIni ini("num-layers = 2\n[model]\nthis line has no equals sign\nhidden-size = 64\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {(ini.path() + ":3:").c_str(), "syntax error", "key = value"});
}

TEST(ConfigIni, BadValueReportsFileLineKeyAndValue) {
    TempIni ini("[model]\nnum-layers = 2\n\nhidden_size = 12x\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, ini.path() +
                         ":4: hidden-size: \"12x\" is not an integer; give a whole number "
                         "such as 128");
}

TEST(ConfigIni, UnknownKeyReportsFileLineAndSuggestion) {
    TempIni ini("num-layers = 2\nnum_expert = 4\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {(ini.path() + ":2:").c_str(), "unknown key \"num_expert\"",
                           "did you mean \"num-experts\""});
}

TEST(ConfigIni, FirstErrorWinsWhenSeveralLinesAreBad) {
    TempIni ini("num-layers = 2\nlr = -5\nnot a pair\nhidden-size = x\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {(ini.path() + ":2: lr: -5").c_str(), "> 0"});

    TempIni syntax_first("[model\nlr = -5\n");
    r = Parse(&cfg, {"train", "--config", syntax_first.path()});
    ExpectMentions(r.err, {(syntax_first.path() + ":1:").c_str(), "syntax error"});
}

TEST(ConfigIni, OverlongLineIsAnErrorNotATruncatedValue) {
    TempIni ini("num-layers = 2\ndata-path = /" + std::string(300, 'x') + "\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", ini.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {(ini.path() + ":2:").c_str(), "longer than", "--flag"});
}

TEST(ConfigIni, ConfigGivenTwiceIsAnError) {
    TempIni a("num-layers = 2\n");
    TempIni b("num-layers = 3\n");
    Config cfg;
    config_defaults(&cfg);
    SetResult r = Parse(&cfg, {"train", "--config", a.path(), "--config", b.path()});
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--config given twice", a.path().c_str(), b.path().c_str()});
}

// ---------------------------------------------------------------------------
// config_to_ini

TEST(ConfigToIni, ListsEveryKeyOnceInTableOrder) {
    Config cfg;
    config_defaults(&cfg);
    std::vector<std::string> keys = IniKeys(cfg);
    ASSERT_EQ(keys.size(), 81u);
    ASSERT_EQ(static_cast<int>(keys.size()), config_entry_count());
    EXPECT_EQ(keys.front(), "num-layers");
    EXPECT_EQ(keys.back(), "bench-iters");
    for (size_t i = 0; i < keys.size(); i++)
        for (size_t j = i + 1; j < keys.size(); j++) EXPECT_NE(keys[i], keys[j]) << "twice";
    const std::vector<std::string> routing_keys = {
        "moe-token-drop-policy",
        "moe-router-type",
        "moe-router-pre-softmax",
        "moe-router-score-function",
        "moe-router-enable-expert-bias",
        "moe-router-bias-update-rate",
        "moe-input-jitter-eps",
        "moe-eval-capacity-factor",
        "moe-min-capacity",
        "moe-router-load-balancing-type",
        "moe-importance-loss-coeff",
        "moe-load-loss-coeff",
        "moe-expert-activation",
        "moe-shared-expert-intermediate-size",
        "moe-expert-dropout",
        "init-method-std",
        "moe-router-num-groups",
        "moe-router-group-topk",
        "moe-hierarchical-groups",
        "moe-hierarchical-group-topk",
        "micro-batch-size",
    };
    auto at = std::find(keys.begin(), keys.end(), routing_keys.front());
    ASSERT_NE(at, keys.end());
    ASSERT_LE(routing_keys.size(), static_cast<size_t>(keys.end() - at));
    EXPECT_EQ(std::vector<std::string>(at, at + routing_keys.size()), routing_keys);
    char *text = config_to_ini(&cfg);
    ASSERT_NE(text, nullptr);
    std::string ini(text);
    free(text);
    ExpectMentions(
        ini, {"num-layers = 4\n", "lr = 0.003\n", "adam-eps = 1e-08\n", "seed = 1234\n",
              "data-format = auto\n", "out = runs/moesim.h5\n", "moe-router-norm-topk-prob = 1\n",
              "moe-router-type = topk\n", "moe-eval-capacity-factor = -1\n",
              "moe-router-bias-update-rate = 0.001\n", "moe-expert-activation = gelu\n",
              "overwrite = 0\n", "skip-nonfinite-steps = 0\n", "freeze = \n"});
}

TEST(ConfigToIni, RoundTripsEveryFieldThroughAFile) {
    Config cfg;
    config_defaults(&cfg);
    const char *changes[][2] = {
        {"num-layers", "6"},
        {"hidden-size", "96"},
        {"num-attention-heads", "3"},
        {"ffn-hidden-size", "384"},
        {"seq-length", "64"},
        {"dense", "1"},
        {"untie-embeddings-and-output-weights", "on"},
        {"precision", "bf16"},
        {"moe-router-precision", "bf16"},
        {"num-experts", "16"},
        {"moe-router-topk", "4"},
        {"moe-layer-freq", "2"},
        {"moe-ffn-hidden-size", "192"},
        {"moe-group-size", "256"},
        {"moe-router-norm-topk-prob", "off"},
        {"moe-expert-capacity-factor", "1.3333333333333333"},
        {"moe-aux-loss-coeff", "0.1"},
        {"moe-z-loss-coeff", "1e-5"},
        {"micro-batch-size", "8"},
        {"train-iters", "1234"},
        {"lr-warmup-iters", "7"},
        {"eval-interval", "33"},
        {"eval-iters", "3"},
        {"log-interval", "5"},
        {"record-group-counts-interval", "3"},
        {"progress-interval", "11"},
        {"lr", "0.00123456789012345678"},
        {"min-lr", "0"},
        {"weight-decay", "0.30000000000000004"},
        {"clip-grad", "0.5"},
        {"skip-nonfinite-steps", "3"},
        {"adam-beta1", "0.85"},
        {"adam-beta2", "0.999"},
        {"adam-eps", "2.5e-9"},
        {"seed", "4294967295"},
        {"freeze", "router,experts"},
        {"data-path", "/data/my corpus"},
        {"data-format", "text"},
        {"val-fraction", "0.25"},
        {"synthetic-clusters", "17"},
        {"synthetic-tokens", "123456"},
        {"out", "/tmp/round/trip.h5"},
        {"overwrite", "1"},
        {"expert-model-parallel-size", "4"},
        {"moe-token-dispatcher-type", "hierarchical"},
        {"ranks-per-node", "2"},
        {"moe-overlap-chunks", "3"},
        {"moe-expert-shadowing", "1"},
        {"moe-shadow-min-rows", "17"},
        {"overlap-grad-reduce", "1"},
        {"save", "/tmp/round/checkpoints"},
        {"save-interval", "25"},
        {"save-keep", "3"},
        {"load", "/tmp/round/earlier"},
        {"finetune", "1"},
        {"no-load-optim", "1"},
        {"record-flush-interval", "7"},
        {"moe-token-drop-policy", "probs"},
        {"moe-router-type", "noisy_topk"},
        {"moe-router-pre-softmax", "0"},
        {"moe-router-score-function", "sigmoid"},
        {"moe-router-enable-expert-bias", "1"},
        {"moe-router-bias-update-rate", "0.01"},
        {"moe-input-jitter-eps", "0.01"},
        {"moe-eval-capacity-factor", "0"},
        {"moe-min-capacity", "9"},
        {"moe-router-load-balancing-type", "seq_aux_loss"},
        {"moe-importance-loss-coeff", "0.05"},
        {"moe-load-loss-coeff", "0.07"},
        {"moe-expert-activation", "swiglu"},
        {"moe-shared-expert-intermediate-size", "64"},
        {"moe-expert-dropout", "0.4"},
        {"init-method-std", "0.0063"},
        {"moe-router-num-groups", "2"},
        {"moe-router-group-topk", "1"},
        {"moe-hierarchical-groups", "4"},
        {"moe-hierarchical-group-topk", "2"},
        {"flush-denormals", "0"},
        {"bf16-gemm", "emulated"},
        {"bench-warmup-iters", "40"},
        {"bench-iters", "12"},
    };
    for (auto &change : changes) {
        SetResult r = Set(&cfg, change[0], change[1]);
        ASSERT_EQ(r.rc, 0) << r.err;
    }
    // Every key is changed from its default, so a key that config_to_ini
    // drops or mangles cannot pass by coincidence.
    Config defaults;
    config_defaults(&defaults);
    ASSERT_EQ(sizeof(changes) / sizeof(changes[0]), static_cast<size_t>(config_entry_count()));
    for (int i = 0; i < config_entry_count(); i++) {
        ConfigEntry changed, original;
        config_entry(&cfg, i, &changed);
        config_entry(&defaults, i, &original);
        bool same = changed.int_value == original.int_value &&
                    changed.double_value == original.double_value &&
                    (changed.type != CONFIG_VALUE_STRING ||
                     strcmp(changed.string_value, original.string_value) == 0);
        EXPECT_FALSE(same) << changed.key << " keeps its default in this test";
    }
    char *text = config_to_ini(&cfg);
    ASSERT_NE(text, nullptr);
    TempIni ini(text);
    free(text);

    Config back;
    config_defaults(&back);
    SetResult r = Parse(&back, {"train", "--config", ini.path()});
    ASSERT_EQ(r.rc, 0) << r.err;
#define EXPECT_SAME(field) EXPECT_EQ(back.field, cfg.field) << #field
#define EXPECT_SAME_STR(field) EXPECT_STREQ(back.field, cfg.field) << #field
    EXPECT_SAME(num_layers);
    EXPECT_SAME(hidden_size);
    EXPECT_SAME(num_attention_heads);
    EXPECT_SAME(ffn_hidden_size);
    EXPECT_SAME(seq_length);
    EXPECT_SAME(expert_model_parallel_size);
    EXPECT_SAME_STR(moe_token_dispatcher_type);
    EXPECT_SAME(ranks_per_node);
    EXPECT_SAME(moe_overlap_chunks);
    EXPECT_SAME(overlap_grad_reduce);
    EXPECT_SAME_STR(save);
    EXPECT_SAME(record_flush_interval);
    EXPECT_SAME(untie_embeddings_and_output_weights);
    EXPECT_SAME_STR(precision);
    EXPECT_SAME_STR(moe_router_precision);
    EXPECT_SAME(num_experts);
    EXPECT_SAME(moe_router_topk);
    EXPECT_SAME(moe_layer_freq);
    EXPECT_SAME(moe_ffn_hidden_size);
    EXPECT_SAME(moe_group_size);
    EXPECT_SAME(moe_router_norm_topk_prob);
    EXPECT_SAME(moe_expert_capacity_factor);
    EXPECT_SAME(moe_aux_loss_coeff);
    EXPECT_SAME(moe_z_loss_coeff);
    EXPECT_SAME_STR(moe_token_drop_policy);
    EXPECT_SAME(micro_batch_size);
    EXPECT_SAME(train_iters);
    EXPECT_SAME(lr_warmup_iters);
    EXPECT_SAME(eval_interval);
    EXPECT_SAME(eval_iters);
    EXPECT_SAME(log_interval);
    EXPECT_SAME(record_group_counts_interval);
    EXPECT_SAME(progress_interval);
    EXPECT_SAME(lr);
    EXPECT_SAME(min_lr);
    EXPECT_SAME(weight_decay);
    EXPECT_SAME(clip_grad);
    EXPECT_SAME(skip_nonfinite_steps);
    EXPECT_SAME(adam_beta1);
    EXPECT_SAME(adam_beta2);
    EXPECT_SAME(adam_eps);
    EXPECT_SAME(seed);
    EXPECT_SAME_STR(freeze);
    EXPECT_SAME_STR(data_path);
    EXPECT_SAME_STR(data_format);
    EXPECT_SAME(val_fraction);
    EXPECT_SAME(synthetic_clusters);
    EXPECT_SAME(synthetic_tokens);
    EXPECT_SAME_STR(out);
    EXPECT_SAME(overwrite);
    EXPECT_SAME_STR(moe_router_type);
    EXPECT_SAME(moe_router_pre_softmax);
    EXPECT_SAME_STR(moe_router_score_function);
    EXPECT_SAME(moe_router_enable_expert_bias);
    EXPECT_SAME(moe_router_bias_update_rate);
    EXPECT_SAME(moe_input_jitter_eps);
    EXPECT_SAME(moe_eval_capacity_factor);
    EXPECT_SAME(moe_min_capacity);
    EXPECT_SAME_STR(moe_router_load_balancing_type);
    EXPECT_SAME(moe_importance_loss_coeff);
    EXPECT_SAME(moe_load_loss_coeff);
    EXPECT_SAME_STR(moe_expert_activation);
    EXPECT_SAME(moe_shared_expert_intermediate_size);
    for (int i = 0; i < config_entry_count(); i++) {
        ConfigEntry sent, received;
        config_entry(&cfg, i, &sent);
        config_entry(&back, i, &received);
        EXPECT_EQ(received.int_value, sent.int_value) << sent.key;
        EXPECT_EQ(received.double_value, sent.double_value) << sent.key;
        if (sent.type == CONFIG_VALUE_STRING) {
            EXPECT_STREQ(received.string_value, sent.string_value) << sent.key;
        }
    }
#undef EXPECT_SAME
#undef EXPECT_SAME_STR
}

// ---------------------------------------------------------------------------
// Derived quantities

TEST(ConfigDerived, MoeLayerFrequencyCountsFromTheFirstLayer) {
    Config cfg;
    config_defaults(&cfg);
    cfg.num_layers = 4;
    cfg.moe_layer_freq = 1;
    for (int layer = 0; layer < 4; layer++) EXPECT_TRUE(config_is_moe_layer(&cfg, layer)) << layer;
    EXPECT_EQ(config_num_moe_layers(&cfg), 4);

    cfg.moe_layer_freq = 2;
    EXPECT_FALSE(config_is_moe_layer(&cfg, 0));
    EXPECT_TRUE(config_is_moe_layer(&cfg, 1));
    EXPECT_FALSE(config_is_moe_layer(&cfg, 2));
    EXPECT_TRUE(config_is_moe_layer(&cfg, 3));
    EXPECT_EQ(config_num_moe_layers(&cfg), 2);

    cfg.moe_layer_freq = 3;
    EXPECT_TRUE(config_is_moe_layer(&cfg, 2));
    EXPECT_EQ(config_num_moe_layers(&cfg), 1);

    cfg.moe_layer_freq = 5;
    EXPECT_EQ(config_num_moe_layers(&cfg), 0);
}

TEST(ConfigDerived, DenseHasNoMoeLayerBeforeAndAfterResolving) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(cfg.dense, 0);
    ASSERT_EQ(Set(&cfg, "dense", "1").rc, 0);
    EXPECT_EQ(config_num_moe_layers(&cfg), 0);
    for (int layer = 0; layer < cfg.num_layers; layer++) EXPECT_FALSE(config_is_moe_layer(&cfg, layer));
    config_resolve(&cfg);
    EXPECT_EQ(cfg.moe_layer_freq, cfg.num_layers + 1) << "the record and model read the frequency";
    EXPECT_EQ(config_num_moe_layers(&cfg), 0);
    cfg.dense = 0;
    EXPECT_EQ(config_num_moe_layers(&cfg), 0);
}

TEST(ConfigDerived, GroupSizeZeroMeansOneMicroBatch) {
    Config cfg;
    config_defaults(&cfg);
    EXPECT_EQ(config_group_size(&cfg), 16 * 128);
    cfg.micro_batch_size = 3;
    cfg.seq_length = 10;
    EXPECT_EQ(config_group_size(&cfg), 30);
    cfg.moe_group_size = 15;
    EXPECT_EQ(config_group_size(&cfg), 15);
}

// ---------------------------------------------------------------------------
// config_validate

class ConfigValidate : public ::testing::Test {
  protected:
    void SetUp() override { cfg_ = ValidConfig(dir_.path() + "/run.h5"); }
    void TearDown() override {
        EXPECT_TRUE(dir_.Entries().empty()) << "config_validate must not create files";
    }
    TempDir dir_;
    Config cfg_;
};

TEST_F(ConfigValidate, TopkLargerThanExperts) {
    cfg_.num_experts = 2;
    cfg_.moe_router_topk = 4;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-topk 4", "--num-experts 2", "lower", "raise"});
    cfg_.moe_router_topk = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0);
}

TEST_F(ConfigValidate, GroupLimitedRouting) {
    cfg_.num_experts = 8;
    cfg_.moe_router_topk = 2;
    cfg_.moe_router_num_groups = 4;
    cfg_.moe_router_group_topk = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;

    cfg_.moe_router_group_topk = 0;
    ExpectMentions(Validate(cfg_).err, {"--moe-router-num-groups 4", "--moe-router-group-topk 0",
                                        "needs both"});
    cfg_.moe_router_num_groups = 3;
    cfg_.moe_router_group_topk = 1;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-num-groups 3", "does not divide", "--num-experts 8"});
    cfg_.moe_router_num_groups = 4;
    cfg_.moe_router_group_topk = 5;
    ExpectMentions(Validate(cfg_).err, {"--moe-router-group-topk 5", "larger than",
                                        "--moe-router-num-groups 4", "at most 4"});
    cfg_.moe_router_group_topk = 1;
    cfg_.moe_router_topk = 3;
    ExpectMentions(Validate(cfg_).err, {"leaves 2 experts per token", "fewer than the 3"});
    cfg_.moe_router_topk = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    for (const char *type : {"expert_choice", "soft", "noisy_topk"}) {
        strcpy(cfg_.moe_router_type, type);
        if (strcmp(type, "soft") == 0) cfg_.moe_expert_capacity_factor = 0;
        r = Validate(cfg_);
        EXPECT_EQ(r.rc, -1) << type;
        std::string named = std::string("--moe-router-type ") + type;
        ExpectMentions(r.err, {"--moe-router-num-groups", named.c_str()});
    }
}

TEST_F(ConfigValidate, HierarchicalMoe) {
    cfg_.num_experts = 8;
    cfg_.moe_router_topk = 2;
    cfg_.moe_hierarchical_groups = 4;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    cfg_.moe_hierarchical_group_topk = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;

    cfg_.moe_hierarchical_groups = 3;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-hierarchical-groups 3", "does not divide", "--num-experts 8"});
    cfg_.moe_hierarchical_groups = 2;
    cfg_.moe_hierarchical_group_topk = 3;
    ExpectMentions(Validate(cfg_).err, {"--moe-hierarchical-group-topk 3", "larger than",
                                        "--moe-hierarchical-groups 2", "at most 2"});
    // 4 groups of 2 experts: k_1 = 1 leaves k_2 = 3 > 2; k_1 = 2 does not divide k = 3
    cfg_.moe_hierarchical_groups = 4;
    cfg_.moe_hierarchical_group_topk = 1;
    cfg_.moe_router_topk = 3;
    ExpectMentions(Validate(cfg_).err, {"--moe-hierarchical-group-topk 1", "top-k 3",
                                        "2 experts per group", "at most 2"});
    cfg_.moe_hierarchical_group_topk = 2;
    ExpectMentions(Validate(cfg_).err, {"--moe-hierarchical-group-topk 2", "must divide k"});
    cfg_.moe_router_topk = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    for (const char *type : {"expert_choice", "soft", "gshard_top2", "sinkhorn"}) {
        strcpy(cfg_.moe_router_type, type);
        cfg_.moe_expert_capacity_factor = strcmp(type, "soft") == 0 ? 0 : 1.25;
        r = Validate(cfg_);
        EXPECT_EQ(r.rc, -1) << type;
        std::string named = std::string("not ") + type;
        ExpectMentions(r.err, {"--moe-hierarchical-groups", named.c_str()});
    }
    // Shazeer 2017's own hierarchical router: noisy at both levels, with Load_H
    strcpy(cfg_.moe_router_type, "noisy_topk");
    cfg_.moe_expert_capacity_factor = 1.25;
    cfg_.moe_load_loss_coeff = 0.01;
    cfg_.moe_importance_loss_coeff = 0.01;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    // ... while the load loss still needs the noisy router
    strcpy(cfg_.moe_router_type, "topk");
    ExpectMentions(Validate(cfg_).err, {"--moe-load-loss-coeff", "noisy_topk"});
    cfg_.moe_load_loss_coeff = cfg_.moe_importance_loss_coeff = 0;
    cfg_.moe_router_num_groups = 2;
    cfg_.moe_router_group_topk = 1;
    ExpectMentions(Validate(cfg_).err, {"--moe-hierarchical-groups", "--moe-router-num-groups",
                                        "use one of them"});
    cfg_.moe_router_num_groups = cfg_.moe_router_group_topk = 0;
    strcpy(cfg_.moe_router_score_function, "sigmoid");
    ExpectMentions(Validate(cfg_).err, {"--moe-hierarchical-groups", "sigmoid", "use softmax"});
    strcpy(cfg_.moe_router_score_function, "softmax");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, HiddenSizeNotDivisibleByHeads) {
    cfg_.hidden_size = 130;
    cfg_.num_attention_heads = 4;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--hidden-size 130", "--num-attention-heads 4", "--hidden-size 128"});
    cfg_.hidden_size = 3;
    ExpectMentions(Validate(cfg_).err, {"--hidden-size 4"});
}

TEST_F(ConfigValidate, ZeroCapacityFactorIsDroplessAndNegativeIsRejected) {
    cfg_.moe_expert_capacity_factor = 0;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, 0) << r.err;
    cfg_.moe_expert_capacity_factor = -1;
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "--moe-expert-capacity-factor: -1 is out of range; it must be > 0, or 0 for "
              "dropless (no capacity, nothing dropped)");
}

// config_validate re-checks every value against the table, so a Config set
// up in code cannot bypass the checks config_set makes.
TEST_F(ConfigValidate, RechecksValuesSetInCode) {
    cfg_.moe_eval_capacity_factor = -0.5;
    ExpectMentions(Validate(cfg_).err, {"--moe-eval-capacity-factor", "-0.5", "> 0", "-1", "0"});
    cfg_.moe_eval_capacity_factor = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0);
    cfg_.moe_load_loss_coeff = -1;
    ExpectMentions(Validate(cfg_).err, {"--moe-load-loss-coeff", "-1", ">= 0"});
    cfg_.moe_load_loss_coeff = 0;
    strcpy(cfg_.moe_router_type, "hash");
    ExpectMentions(Validate(cfg_).err, {"--moe-router-type", "\"hash\"", "expert_choice"});
    strcpy(cfg_.moe_router_type, "topk");
    cfg_.moe_router_enable_expert_bias = 2;
    ExpectMentions(Validate(cfg_).err, {"--moe-router-enable-expert-bias", "\"2\""});
    cfg_.moe_router_enable_expert_bias = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

// Switch, GShard and soft routing fix k themselves; --moe-router-topk (2 by
// default) must not make them fail.
TEST_F(ConfigValidate, RouterTypesThatFixKIgnoreTopk) {
    cfg_.num_experts = 1;
    EXPECT_EQ(Validate(cfg_).rc, -1) << "topk 2 of 1 expert";
    strcpy(cfg_.moe_router_type, "switch");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, 0) << r.err;
    cfg_.moe_router_topk = 4;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;

    strcpy(cfg_.moe_router_type, "gshard_top2");
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "--moe-router-type gshard_top2 routes each token to 2 experts but --num-experts is "
              "1; raise --num-experts to at least 2 or choose another router type");
    cfg_.num_experts = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;

    strcpy(cfg_.moe_router_type, "soft");
    cfg_.moe_expert_capacity_factor = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, RouterTypesThatKeepTopkStillNeedEnoughExperts) {
    cfg_.num_experts = 4;
    cfg_.moe_router_topk = 5;
    for (const char *type : {"topk", "noisy_topk", "expert_choice", "sinkhorn"}) {
        strcpy(cfg_.moe_router_type, type);
        SetResult r = Validate(cfg_);
        EXPECT_EQ(r.rc, -1) << type;
        ExpectMentions(r.err, {"--moe-router-topk 5", "--num-experts 4"});
    }
    cfg_.moe_router_topk = 4;
    for (const char *type : {"topk", "noisy_topk", "expert_choice", "sinkhorn"}) {
        strcpy(cfg_.moe_router_type, type);
        EXPECT_EQ(Validate(cfg_).rc, 0) << type << ": " << Validate(cfg_).err;
    }
}

TEST_F(ConfigValidate, ExpertChoiceHasNoDropPolicy) {
    strcpy(cfg_.moe_router_type, "expert_choice");
    EXPECT_EQ(Validate(cfg_).rc, 0) << "the default policy, position, is fine";
    strcpy(cfg_.moe_token_drop_policy, "probs");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-token-drop-policy probs", "--moe-router-type expert_choice",
                           "nothing to drop", "position"});
    strcpy(cfg_.moe_router_type, "topk");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, ExpertChoiceNeedsACapacity) {
    strcpy(cfg_.moe_router_type, "expert_choice");
    cfg_.moe_expert_capacity_factor = 0;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-type expert_choice", "--moe-expert-capacity-factor 0",
                           "needs a capacity", "1.25"});
    cfg_.moe_expert_capacity_factor = 1.25;
    cfg_.moe_eval_capacity_factor = 0;
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-type expert_choice", "--moe-eval-capacity-factor 0",
                           "-1 (the training factor)"});
    cfg_.moe_eval_capacity_factor = 2;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    strcpy(cfg_.moe_router_type, "topk");
    cfg_.moe_expert_capacity_factor = 0;
    cfg_.moe_eval_capacity_factor = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0) << "dropless top-k: " << Validate(cfg_).err;
}

// The default capacity factor gives way to dropless soft routing
// (config_resolve); one the user chose, even the default value, is an error.
TEST_F(ConfigValidate, SoftRoutingAloneIsDroplessAndAChosenCapacityIsAnError) {
    strcpy(cfg_.moe_router_type, "soft");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, 0) << r.err;
    Config resolved = cfg_;
    config_resolve(&resolved);
    EXPECT_EQ(resolved.moe_expert_capacity_factor, 0.0);

    ASSERT_EQ(Set(&cfg_, "moe-expert-capacity-factor", "1.25").rc, 0);
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "--moe-router-type soft with --moe-expert-capacity-factor 1.25: soft routing sends "
              "every token to every expert and has no capacity: pass "
              "--moe-expert-capacity-factor 0 or leave it out");
    Config in_code = ValidConfig(dir_.path() + "/run.h5");
    strcpy(in_code.moe_router_type, "soft");
    in_code.moe_expert_capacity_factor = 2;
    ExpectMentions(Validate(in_code).err, {"--moe-expert-capacity-factor 2"});
    cfg_.moe_expert_capacity_factor = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0) << "eval -1 follows training: " << Validate(cfg_).err;
    cfg_.moe_eval_capacity_factor = 1.5;
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-type soft", "--moe-eval-capacity-factor 1.5",
                           "pass --moe-eval-capacity-factor 0 or -1"});
    cfg_.moe_eval_capacity_factor = 0;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, SigmoidScoresNeedTheTopkRouter) {
    strcpy(cfg_.moe_router_score_function, "sigmoid");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    strcpy(cfg_.moe_router_type, "switch");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-score-function sigmoid", "--moe-router-type topk",
                           "not switch", "--moe-router-score-function softmax"});
    strcpy(cfg_.moe_router_type, "sinkhorn");
    ExpectMentions(Validate(cfg_).err, {"sigmoid", "not sinkhorn"});
}

TEST_F(ConfigValidate, ExpertBiasNeedsTheTopkRouterAndARate) {
    cfg_.moe_router_enable_expert_bias = 1;
    EXPECT_EQ(Validate(cfg_).rc, 0) << "the default rate, 1e-3: " << Validate(cfg_).err;
    ASSERT_EQ(Set(&cfg_, "moe-router-bias-update-rate", "0").rc, 0);
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-enable-expert-bias 1", "--moe-router-bias-update-rate 0",
                           "--moe-router-bias-update-rate 1e-3"});
    cfg_.moe_router_bias_update_rate = 1e-3;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    strcpy(cfg_.moe_router_score_function, "sigmoid");
    EXPECT_EQ(Validate(cfg_).rc, 0) << "DeepSeek-V3's combination: " << Validate(cfg_).err;
    strcpy(cfg_.moe_router_score_function, "softmax");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;

    strcpy(cfg_.moe_router_type, "noisy_topk");
    r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-router-enable-expert-bias 1", "--moe-router-type topk",
                           "not noisy_topk", "--moe-router-enable-expert-bias 0"});
}

// The default rate without the bias is no choice of the user's; a rate the
// user gave, even the default one, is.
TEST_F(ConfigValidate, DenseRefusesAFrequencyThatPlacesMoeLayers) {
    ASSERT_EQ(Set(&cfg_, "dense", "1").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    ASSERT_EQ(Set(&cfg_, "moe-layer-freq", "1").rc, 0);
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--dense 1", "--moe-layer-freq 1", "leave --moe-layer-freq out",
                           "drop --dense"});
    ASSERT_EQ(Set(&cfg_, "moe-layer-freq", "4").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, -1) << "layer 3 would be an MoE layer";
    ASSERT_EQ(Set(&cfg_, "moe-layer-freq", "1000").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << "a frequency past the layers says dense too";
    ASSERT_EQ(Set(&cfg_, "dense", "0").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, WarmupTheUserGaveMustBeShorterThanTheRun) {
    ASSERT_EQ(Set(&cfg_, "train-iters", "20").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << "the default warm-up gives way: " << Validate(cfg_).err;
    ASSERT_EQ(Set(&cfg_, "lr-warmup-iters", "100").rc, 0);
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--lr-warmup-iters 100", "--train-iters 20", "never reaches --lr",
                           "below 20", "e.g. 2", "raise --train-iters above 100"});
    ASSERT_EQ(Set(&cfg_, "lr-warmup-iters", "20").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, -1) << "a warm-up as long as the run never reaches --lr either";
    ASSERT_EQ(Set(&cfg_, "lr-warmup-iters", "19").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    ASSERT_EQ(Set(&cfg_, "lr-warmup-iters", "0").rc, 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, BiasRateWithoutTheBiasIsAnError) {
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    cfg_.moe_router_bias_update_rate = 0.01;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err,
                   {"--moe-router-bias-update-rate 0.01", "--moe-router-enable-expert-bias 0",
                    "add --moe-router-enable-expert-bias", "leave the rate out"});
    ASSERT_EQ(Set(&cfg_, "moe-router-bias-update-rate", "1e-3").rc, 0);
    ExpectMentions(Validate(cfg_).err, {"--moe-router-bias-update-rate 0.001"});
    cfg_.moe_router_enable_expert_bias = 1;
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, LoadLossNeedsNoisyTopk) {
    cfg_.moe_load_loss_coeff = 0.01;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--moe-load-loss-coeff 0.01", "--moe-router-type noisy_topk", "not topk",
                           "noise", "--moe-load-loss-coeff 0"});
    strcpy(cfg_.moe_router_type, "noisy_topk");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    cfg_.moe_load_loss_coeff = 0;
    cfg_.moe_importance_loss_coeff = 0.01;
    strcpy(cfg_.moe_router_type, "topk");
    EXPECT_EQ(Validate(cfg_).rc, 0) << "importance needs no noise: " << Validate(cfg_).err;
}

TEST_F(ConfigValidate, SharedExpertWithoutMoeLayersIsFine) {
    cfg_.moe_shared_expert_intermediate_size = 64;
    cfg_.num_layers = 1;
    cfg_.moe_layer_freq = 2;
    ASSERT_EQ(config_num_moe_layers(&cfg_), 0);
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

// A run in which no tensor can train is refused; any group left trainable
// passes, and "everything" depends on whether the model has MoE layers.
TEST_F(ConfigValidate, FreezingEveryParameterIsAnError) {
    for (const char *value : {"non-moe,moe", "attention,moe,non-moe", "moe,non-moe,router"}) {
        strcpy(cfg_.freeze, value);
        SetResult r = Validate(cfg_);
        EXPECT_EQ(r.rc, -1) << value;
        ExpectMentions(r.err, {"--freeze", value, "every parameter", "nothing would train"});
    }
    for (const char *value : {"", "attention", "router", "experts", "moe", "non-moe",
                              "attention,moe", "non-moe,router", "non-moe,experts"}) {
        strcpy(cfg_.freeze, value);
        EXPECT_EQ(Validate(cfg_).rc, 0) << value << ": " << Validate(cfg_).err;
    }
    cfg_.num_layers = 1;
    cfg_.moe_layer_freq = 2;
    ASSERT_EQ(config_num_moe_layers(&cfg_), 0);
    strcpy(cfg_.freeze, "non-moe");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--freeze non-moe", "no MoE layers", "nothing would train"});
    strcpy(cfg_.freeze, "attention,moe");
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
}

TEST_F(ConfigValidate, FreezeSetInCodeIsRechecked) {
    strcpy(cfg_.freeze, "router;experts");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--freeze", "\"router;experts\"", "not a valid choice"});
}

TEST_F(ConfigValidate, GroupSizeMustDivideTheMicroBatch) {
    cfg_.micro_batch_size = 4;
    cfg_.seq_length = 32;
    cfg_.moe_group_size = 48;
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    // 3 sequences of 32 hold two groups of 48: the smallest micro-batch that works
    ExpectMentions(r.err, {"--moe-group-size 48", "128 tokens", "--micro-batch-size 4",
                           "--seq-length 32", "split across ranks", "--micro-batch-size 3, 6",
                           "dividing 128"});
    cfg_.moe_group_size = 64;
    EXPECT_EQ(Validate(cfg_).rc, 0);
    cfg_.moe_group_size = 256;
    EXPECT_EQ(Validate(cfg_).rc, -1);
}

TEST_F(ConfigValidate, MissingDataPathNamesPathAndReason) {
    strcpy(cfg_.data_format, "auto");
    strcpy(cfg_.data_path, "/nonexistent-moesim/corpus.txt");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err,
              "--data-path /nonexistent-moesim/corpus.txt: No such file or directory; point it "
              "at a text file, a directory of text files, or a .tok token file (or use "
              "--data-format synthetic)");
    strcpy(cfg_.data_format, "text");
    EXPECT_EQ(Validate(cfg_).rc, -1);
}

TEST_F(ConfigValidate, SyntheticDataNeedsNoPath) {
    strcpy(cfg_.data_path, "/nonexistent-moesim/corpus.txt");
    strcpy(cfg_.data_format, "synthetic");
    EXPECT_EQ(Validate(cfg_).rc, 0);
    strcpy(cfg_.data_path, "synthetic");
    strcpy(cfg_.data_format, "auto");
    EXPECT_EQ(Validate(cfg_).rc, 0);
    strcpy(cfg_.data_format, "tokens");
    EXPECT_EQ(Validate(cfg_).rc, -1);
}

TEST_F(ConfigValidate, ExistingDataFileAndDirectoryPass) {
    TempIni file("hello\n");
    strcpy(cfg_.data_format, "auto");
    strcpy(cfg_.data_path, file.path().c_str());
    EXPECT_EQ(Validate(cfg_).rc, 0);
    strcpy(cfg_.data_path, "/tmp");
    EXPECT_EQ(Validate(cfg_).rc, 0);
}

// A missing directory of --out is made when the run starts (output.h), so
// validation passes it without creating anything. A --save directory is made at validation.
TEST_F(ConfigValidate, MissingOutputDirectoryIsCreatedLater) {
    std::string nested = dir_.path() + "/new/deeper/run.h5";
    strcpy(cfg_.out, nested.c_str());
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    EXPECT_FALSE(PathExists(dir_.path() + "/new"));
}

TEST_F(ConfigValidate, CheckpointDirectoryIsMadeAndMustBeADirectory) {
    std::string save = dir_.path() + "/missing/checkpoints";
    strcpy(cfg_.save, save.c_str());
    EXPECT_EQ(Validate(cfg_).rc, 0) << Validate(cfg_).err;
    EXPECT_TRUE(PathExists(save));
    rmdir(save.c_str()); /* the fixture checks that nothing else was made */
    rmdir((dir_.path() + "/missing").c_str());
    TempIni file("not a directory\n");
    strcpy(cfg_.save, (file.path() + "/sub").c_str());
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--save", file.path().c_str(), "choose another --save"});
}

TEST_F(ConfigValidate, OutputDirectoryUnderAFileIsRejected) {
    TempIni file("not a directory\n");
    strcpy(cfg_.out, (file.path() + "/sub/x.h5").c_str());
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {"--out", file.path().c_str(), "is not a directory"});
}

TEST_F(ConfigValidate, OutputParentMustBeADirectory) {
    TempIni file("not a directory\n");
    strcpy(cfg_.out, (file.path() + "/x.h5").c_str());
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    ExpectMentions(r.err, {file.path().c_str(), "--out"});
}

TEST_F(ConfigValidate, OutputMustNotBeADirectory) {
    strcpy(cfg_.out, "/tmp");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(r.rc, -1);
    EXPECT_EQ(r.err, "--out /tmp is a directory; give a file path such as /tmp/moesim.h5");
    strcpy(cfg_.out, (dir_.path() + "/new-subdir/").c_str());
    ExpectMentions(Validate(cfg_).err, {"names a directory", "new-subdir/moesim.h5"});
}

TEST_F(ConfigValidate, RelativeOutputInTheWorkingDirectoryPasses) {
    char cwd[MOESIM_PATH_MAX];
    ASSERT_NE(getcwd(cwd, sizeof(cwd)), nullptr);
    ASSERT_EQ(chdir(dir_.path().c_str()), 0);
    strcpy(cfg_.out, "run.h5");
    SetResult r = Validate(cfg_);
    EXPECT_EQ(chdir(cwd), 0);
    EXPECT_EQ(r.rc, 0) << r.err;
}

TEST_F(ConfigValidate, ExistingOutputFileIsLeftAlone) {
    std::string out = dir_.path() + "/run.h5";
    FILE *f = fopen(out.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fputs("previous run", f);
    fclose(f);
    strcpy(cfg_.out, out.c_str());
    EXPECT_EQ(Validate(cfg_).rc, 0);
    f = fopen(out.c_str(), "r");
    ASSERT_NE(f, nullptr);
    char content[64] = "";
    ASSERT_NE(fgets(content, sizeof(content), f), nullptr);
    fclose(f);
    EXPECT_STREQ(content, "previous run");
    unlink(out.c_str());
}

// ---------------------------------------------------------------------------
// config_resolve

namespace {

struct Resolved {
    int topk, norm_topk_prob, pre_softmax;
};

// Resolves a config with 8 experts, k = 3, and both flags the opposite of
// what switch and soft imply.
Resolved ResolveRouter(const char *type) {
    Config cfg;
    config_defaults(&cfg);
    cfg.num_experts = 8;
    cfg.moe_router_topk = 3;
    cfg.moe_router_norm_topk_prob = 1;
    cfg.moe_router_pre_softmax = 0;
    EXPECT_EQ(Set(&cfg, "moe-router-type", type).rc, 0) << type;
    config_resolve(&cfg);
    EXPECT_STREQ(cfg.moe_router_type, type);
    return {cfg.moe_router_topk, cfg.moe_router_norm_topk_prob, cfg.moe_router_pre_softmax};
}

}  // namespace

TEST(ConfigResolve, SwitchIsTopOneScaledByItsProbability) {
    Resolved r = ResolveRouter("switch");
    EXPECT_EQ(r.topk, 1);
    EXPECT_EQ(r.norm_topk_prob, 0);
    EXPECT_EQ(r.pre_softmax, 1);
}

TEST(ConfigResolve, GshardIsTopTwo) {
    Resolved r = ResolveRouter("gshard_top2");
    EXPECT_EQ(r.topk, 2);
    EXPECT_EQ(r.norm_topk_prob, 1);
    EXPECT_EQ(r.pre_softmax, 0);
}

TEST(ConfigResolve, SoftUsesEveryExpertWithRawProbabilities) {
    Resolved r = ResolveRouter("soft");
    EXPECT_EQ(r.topk, 8);
    EXPECT_EQ(r.norm_topk_prob, 0);
    EXPECT_EQ(r.pre_softmax, 1);
}

TEST(ConfigResolve, OtherRoutersKeepTheirSettings) {
    for (const char *type : {"topk", "noisy_topk", "expert_choice", "sinkhorn"}) {
        Resolved r = ResolveRouter(type);
        EXPECT_EQ(r.topk, 3) << type;
        EXPECT_EQ(r.norm_topk_prob, 1) << type;
        EXPECT_EQ(r.pre_softmax, 0) << type;
    }
}

TEST(ConfigResolve, IsIdempotentAndShowsInTheIni) {
    Config cfg;
    config_defaults(&cfg);
    ASSERT_EQ(Set(&cfg, "moe-router-type", "switch").rc, 0);
    config_resolve(&cfg);
    Config again = cfg;
    config_resolve(&again);
    EXPECT_EQ(memcmp(&cfg, &again, sizeof cfg), 0);
    char *text = config_to_ini(&cfg);
    ASSERT_NE(text, nullptr);
    std::string ini(text);
    free(text);
    ExpectMentions(ini, {"moe-router-type = switch\n", "moe-router-topk = 1\n",
                         "moe-router-norm-topk-prob = 0\n"});
}

// ---------------------------------------------------------------------------
// Help

TEST(ConfigHelp, ListsEveryKeyWithItsDefault) {
    Config cfg;
    config_defaults(&cfg);
    testing::internal::CaptureStdout();
    config_print_help();
    std::string help = testing::internal::GetCapturedStdout();
    for (const std::string &key : IniKeys(cfg))
        EXPECT_NE(help.find("--" + key + " "), std::string::npos) << key;
    ExpectMentions(help, {"--config FILE", "--num-experts N", "(default 8)",
                          "model:", "mixture of experts:", "auto|text|tokens|synthetic",
                          "(default runs/moesim.h5)", "--moe-router-type TYPE",
                          "Switch Transformer", "Shazeer 2017", "GShard", "Zhou 2022", "Sinkhorn",
                          "--moe-token-drop-policy position|probs", "--moe-eval-capacity-factor X",
                          "(default -1)"});
    EXPECT_EQ(help.find("arrives with"), std::string::npos) << "stale note:\n" << help;
    // Every choice of a TYPE key is named in its help, since the placeholder
    // does not list them.
    for (const char *choice :
         {"topk", "switch", "noisy_topk", "gshard_top2", "expert_choice", "sinkhorn", "soft",
          "aux_loss", "seq_aux_loss", "global_aux_loss", "none"})
        EXPECT_NE(help.find(std::string(choice) + " ("), std::string::npos) << choice;
}

namespace {

TEST(ConfigLayout, ExpertParallelSizeMustFitTheRanksAndExperts) {
    Config cfg;
    config_defaults(&cfg);  // 8 experts
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_ep_size(&cfg, 4), 4) << "0 means the world size";
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), 0) << err;

    cfg.expert_model_parallel_size = 3;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
    EXPECT_NE(std::string(err).find("--expert-model-parallel-size 3 does not divide the 4 ranks"),
              std::string::npos)
        << err;

    cfg.expert_model_parallel_size = 4;
    cfg.num_experts = 6;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
    EXPECT_NE(std::string(err).find("--num-experts 6 is not divisible by "
                                    "--expert-model-parallel-size 4"),
              std::string::npos)
        << err;

    cfg.num_experts = 2;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
    EXPECT_NE(std::string(err).find("larger than --num-experts 2"), std::string::npos) << err;

    cfg.num_experts = 8;
    cfg.expert_model_parallel_size = 2;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), 0) << err;
    EXPECT_EQ(config_ep_size(&cfg, 4), 2);
}

TEST(ConfigLayout, ADenseModelHasNoExpertsToShareOut) {
    Config cfg;
    config_defaults(&cfg);
    cfg.num_experts = 3;  // what --num-experts says is unused without MoE layers
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), -1) << "the MoE model is refused";
    cfg.dense = 1;
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), 0) << err;
    cfg.expert_model_parallel_size = 4;  // larger than the experts: still irrelevant
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), 0) << err;
    cfg.expert_model_parallel_size = 3;  // but the ranks must still divide into EP groups
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
}

TEST(ConfigLayout, RanksPerNodeMustMakeWholeNodes) {
    Config cfg;
    config_defaults(&cfg);
    char err[MOESIM_ERR_MAX] = "";
    cfg.ranks_per_node = 2;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), 0) << err;
    cfg.ranks_per_node = 3;
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
    ExpectMentions(err, {"--ranks-per-node 3", "4 ranks", "whole nodes"});
    cfg.ranks_per_node = 2;
    cfg.moe_overlap_chunks = 2;
    strcpy(cfg.moe_token_dispatcher_type, "hierarchical");
    EXPECT_EQ(config_validate_layout(&cfg, 4, err, sizeof err), -1);
    ExpectMentions(err, {"--moe-overlap-chunks 2", "alltoall"});
}

// Shadowing needs the blocking alltoall exchange: asked for with overlap or
// the hierarchical dispatcher, it is refused, not silently dropped.
TEST(ConfigLayout, ShadowingNeedsTheBlockingAlltoall) {
    Config cfg;
    config_defaults(&cfg);
    char err[MOESIM_ERR_MAX] = "";
    cfg.moe_expert_shadowing = 1;
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), 0) << err;
    cfg.moe_overlap_chunks = 2;
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), -1);
    ExpectMentions(err, {"--moe-expert-shadowing 1", "--moe-overlap-chunks 1"});
    cfg.moe_overlap_chunks = 1;
    strcpy(cfg.moe_token_dispatcher_type, "hierarchical");
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), -1);
    ExpectMentions(err, {"--moe-expert-shadowing 1", "alltoall"});
    cfg.moe_expert_shadowing = 0;
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), 0) << err;
}

// With the default --expert-model-parallel-size 0 the EP size is the rank
// count, a number the user never typed: the message says where it came from
// and which size would work.
TEST(ConfigLayout, EpSizeTakenFromTheRankCountSaysSo) {
    Config cfg;
    config_defaults(&cfg);  // 8 experts, EP 0
    char err[MOESIM_ERR_MAX] = "";
    EXPECT_EQ(config_validate_layout(&cfg, 3, err, sizeof err), -1);
    ExpectMentions(err, {"taken from the rank count", "3 ranks", "--num-experts 8",
                         "--expert-model-parallel-size 1", "divides 8"});
    EXPECT_EQ(config_validate_layout(&cfg, 6, err, sizeof err), -1);
    ExpectMentions(err, {"taken from the rank count", "6 ranks", "--expert-model-parallel-size 2"});
    EXPECT_EQ(config_validate_layout(&cfg, 16, err, sizeof err), -1);
    ExpectMentions(err, {"taken from the rank count", "16 ranks", "own at least one expert",
                         "--expert-model-parallel-size 8"});
    EXPECT_EQ(config_validate_layout(&cfg, 2, err, sizeof err), 0) << err;
}

}  // namespace
