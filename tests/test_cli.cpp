// Runs the real program ($MOESIM) and pins down what a user sees when the
// configuration is wrong: exit status 2, one "moesim: error:" line naming the
// key and the value, and no run record created; and what short real runs do
// (CliRun). No MPI here: the child is an MPI singleton started without
// mpirun, under timeout(1) so that no test can hang.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

extern char **environ;

namespace {

struct RunResult {
    int status;          // exit status, or -1 if the child did not exit normally
    std::string output;  // stdout and stderr interleaved
};

// Far above any run here (a few seconds); timeout(1) exits 124 when it hits.
constexpr int kTimeoutSeconds = 120;
constexpr int kTimedOut = 124;

// An OMPI_*/PMIX_* variable inherited from a surrounding mpirun would make the
// child believe it is a rank of that job and try to join it.
void ForgetParentMpiJob() {
    std::vector<std::string> names;
    for (char **entry = environ; *entry; entry++) {
        std::string text(*entry);
        if (text.rfind("OMPI_", 0) == 0 || text.rfind("PMIX_", 0) == 0)
            names.push_back(text.substr(0, text.find('=')));
    }
    for (const std::string &name : names) unsetenv(name.c_str());
}

std::string ShellQuote(const std::string &arg) {
    std::string quoted = "'";
    for (char c : arg) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return quoted + "'";
}

RunResult RunMoesim(const std::vector<std::string> &args) {
    const char *moesim = getenv("MOESIM");
    if (!moesim || !*moesim) {
        ADD_FAILURE() << "set MOESIM to the moesim binary, e.g. MOESIM=build/moesim";
        return {-1, ""};
    }
    ForgetParentMpiJob();
    std::string command =
        "timeout --kill-after=5 " + std::to_string(kTimeoutSeconds) + " " + ShellQuote(moesim);
    for (const std::string &arg : args) command += " " + ShellQuote(arg);
    command += " 2>&1";
    FILE *pipe = popen(command.c_str(), "r");
    if (!pipe) {
        ADD_FAILURE() << "popen(" << command << ") failed: " << strerror(errno);
        return {-1, ""};
    }
    std::string output;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
    int wait_status = pclose(pipe);
    int status = wait_status != -1 && WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
    EXPECT_NE(status, kTimedOut) << command << " ran for " << kTimeoutSeconds << " s:\n" << output;
    return {status, output};
}

size_t CountOccurrences(const std::string &text, const std::string &needle) {
    size_t count = 0;
    for (size_t at = text.find(needle); at != std::string::npos;
         at = text.find(needle, at + needle.size()))
        count++;
    return count;
}

bool PathExists(const std::string &path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

// Each test gets a fresh directory; --out points inside it, and the run
// record must not appear there when the configuration is rejected.
class CliConfigError : public ::testing::Test {
  protected:
    void SetUp() override {
        char name[] = "/tmp/moesim_cli_XXXXXX";
        ASSERT_NE(mkdtemp(name), nullptr) << strerror(errno);
        dir_ = name;
        out_ = dir_ + "/run.h5";
    }
    void TearDown() override {
        for (const std::string &file : files_) unlink(file.c_str());
        EXPECT_FALSE(PathExists(out_)) << "a rejected run created " << out_;
        unlink(out_.c_str());
        EXPECT_EQ(rmdir(dir_.c_str()), 0) << dir_ << " is not empty: " << strerror(errno);
    }

    // Synthetic data and one step keep a wrongly accepted run short and
    // independent of the machine's files.
    std::vector<std::string> TrainArgs(std::initializer_list<std::string> extra) const {
        std::vector<std::string> args = {"train", "--data-format", "synthetic", "--train-iters",
                                         "1",     "--out",         out_};
        args.insert(args.end(), extra.begin(), extra.end());
        return args;
    }

    std::string WriteFile(const std::string &name, const std::string &text) {
        std::string path = dir_ + "/" + name;
        FILE *f = fopen(path.c_str(), "w");
        EXPECT_NE(f, nullptr) << path << ": " << strerror(errno);
        if (f) {
            fwrite(text.data(), 1, text.size(), f);
            fclose(f);
        }
        files_.push_back(path);
        return path;
    }

    // Exit status 2, exactly one error line, and every part mentioned in it.
    void ExpectUsageError(const std::vector<std::string> &args,
                          std::initializer_list<std::string> parts) {
        RunResult r = RunMoesim(args);
        EXPECT_EQ(r.status, 2) << r.output;
        EXPECT_EQ(CountOccurrences(r.output, "moesim: error:"), 1u) << r.output;
        size_t at = r.output.find("moesim: error:");
        std::string line =
            at == std::string::npos ? r.output : r.output.substr(at, r.output.find('\n', at) - at);
        for (const std::string &part : parts)
            EXPECT_NE(line.find(part), std::string::npos)
                << "error line should mention '" << part << "':\n"
                << r.output;
    }

    std::string dir_;
    std::string out_;
    std::vector<std::string> files_;
};

TEST_F(CliConfigError, UnknownFlagSuggestsTheNearestOne) {
    ExpectUsageError(TrainArgs({"--hiden-size", "64"}),
                     {"unknown flag \"--hiden-size\"", "did you mean \"--hidden-size\""});
}

TEST_F(CliConfigError, NonNumericValue) {
    ExpectUsageError(TrainArgs({"--hidden-size", "12x"}),
                     {"--hidden-size", "\"12x\"", "whole number"});
}

TEST_F(CliConfigError, OutOfRangeValue) {
    ExpectUsageError(TrainArgs({"--lr", "-1"}), {"--lr", "-1", "out of range", "> 0"});
}

TEST_F(CliConfigError, FlagWithoutValue) {
    ExpectUsageError(TrainArgs({"--lr"}), {"--lr needs a value"});
}

TEST_F(CliConfigError, PositionalArgument) {
    ExpectUsageError(TrainArgs({"stray"}), {"unexpected argument \"stray\""});
}

TEST_F(CliConfigError, TopkLargerThanExperts) {
    ExpectUsageError(TrainArgs({"--num-experts", "2", "--moe-router-topk", "4"}),
                     {"--moe-router-topk 4", "--num-experts 2"});
}

TEST_F(CliConfigError, HiddenSizeNotDivisibleByHeads) {
    ExpectUsageError(TrainArgs({"--hidden-size", "130", "--num-attention-heads", "4"}),
                     {"--hidden-size 130", "--num-attention-heads 4"});
}

// 0 is dropless and passes config validation: with a missing corpus, the
// one error is about the corpus, not the factor.
TEST_F(CliConfigError, ZeroCapacityFactorIsDropless) {
    std::string missing = dir_ + "/no-such-corpus.txt";
    RunResult r = RunMoesim({"train", "--data-path", missing, "--moe-expert-capacity-factor", "0",
                             "--train-iters", "1", "--out", out_});
    EXPECT_EQ(r.status, 2) << r.output;
    EXPECT_NE(r.output.find("moesim: error: --data-path " + missing), std::string::npos)
        << r.output;
    EXPECT_EQ(r.output.find("capacity"), std::string::npos) << r.output;
}

TEST_F(CliConfigError, NegativeCapacityFactorExplainsDropless) {
    ExpectUsageError(
        TrainArgs({"--moe-expert-capacity-factor", "-1"}),
        {"--moe-expert-capacity-factor: -1 is out of range", "must be > 0", "or 0 for dropless"});
}

TEST_F(CliConfigError, BadEvalCapacityFactorNamesItsSpecialValues) {
    ExpectUsageError(
        TrainArgs({"--moe-eval-capacity-factor", "-0.5"}),
        {"--moe-eval-capacity-factor: -0.5", "-1 for the training factor", "0 for dropless"});
}

TEST_F(CliConfigError, UnknownRouterTypeSuggestsTheNearestChoice) {
    ExpectUsageError(TrainArgs({"--moe-router-type", "topK"}),
                     {"--moe-router-type", "\"topK\"", "did you mean \"topk\"",
                      "topk|switch|noisy_topk|gshard_top2|expert_choice|sinkhorn|soft"});
}

TEST_F(CliConfigError, UnknownRouterTypeInConfigFileSuggestsTheNearestChoice) {
    std::string ini = WriteFile("router.ini", "[moe]\nmoe_router_type = noisy-topk\n");
    ExpectUsageError(
        TrainArgs({"--config", ini}),
        {ini + ":2:", "\"noisy-topk\"", "did you mean \"noisy_topk\"", "expert_choice"});
}

TEST_F(CliConfigError, ExpertChoiceWithProbsDropPolicy) {
    ExpectUsageError(
        TrainArgs({"--moe-router-type", "expert_choice", "--moe-token-drop-policy", "probs"}),
        {"--moe-token-drop-policy probs", "--moe-router-type expert_choice", "position"});
}

// Soft routing alone is dropless (CliRun.SoftRoutingAloneRunsDropless); a capacity
// factor the user gives, even the default value, contradicts it.
TEST_F(CliConfigError, SoftRoutingWithAGivenCapacityFactor) {
    ExpectUsageError(
        TrainArgs({"--moe-router-type", "soft", "--moe-expert-capacity-factor", "1.25"}),
        {"--moe-router-type soft", "--moe-expert-capacity-factor 1.25",
         "pass --moe-expert-capacity-factor 0 or leave it out"});
}

TEST_F(CliConfigError, SigmoidScoresWithSwitchRouting) {
    ExpectUsageError(
        TrainArgs({"--moe-router-type", "switch", "--moe-router-score-function", "sigmoid"}),
        {"--moe-router-score-function sigmoid", "not switch", "--moe-router-type topk"});
}

TEST_F(CliConfigError, RouterGroupsNotDividingTheExperts) {
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-router-num-groups", "3",
                                "--moe-router-group-topk", "1"}),
                     {"--moe-router-num-groups 3", "does not divide", "--num-experts 8"});
}

TEST_F(CliConfigError, RouterGroupTopkLargerThanGroups) {
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-router-num-groups", "2",
                                "--moe-router-group-topk", "3"}),
                     {"--moe-router-group-topk 3", "--moe-router-num-groups 2", "at most 2"});
}

TEST_F(CliConfigError, HierarchicalGroupsNotDividingTheExperts) {
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-hierarchical-groups", "3"}),
                     {"--moe-hierarchical-groups 3", "does not divide", "--num-experts 8"});
}

TEST_F(CliConfigError, HierarchicalGroupTopkLargerThanGroups) {
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-hierarchical-groups", "2",
                                "--moe-hierarchical-group-topk", "3"}),
                     {"--moe-hierarchical-group-topk 3", "--moe-hierarchical-groups 2",
                      "at most 2"});
}

TEST_F(CliConfigError, HierarchicalGroupsWithExpertChoiceOrSoftRouting) {
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-hierarchical-groups", "2",
                                "--moe-router-type", "expert_choice"}),
                     {"--moe-hierarchical-groups", "not expert_choice", "choose topk"});
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-hierarchical-groups", "2",
                                "--moe-router-type", "soft", "--moe-expert-capacity-factor",
                                "0"}),
                     {"--moe-hierarchical-groups", "not soft", "choose topk"});
}

TEST_F(CliConfigError, HierarchicalLoadLossWithoutNoisyRouting) {
    // Load_H is built from the noisy gates' smooth load: topk has no noise
    ExpectUsageError(TrainArgs({"--num-experts", "8", "--moe-hierarchical-groups", "2",
                                "--moe-load-loss-coeff", "0.01"}),
                     {"--moe-load-loss-coeff 0.01", "--moe-router-type noisy_topk", "not topk"});
}

TEST_F(CliConfigError, BiasUpdateRateWithoutExpertBias) {
    ExpectUsageError(TrainArgs({"--moe-router-bias-update-rate", "1e-3"}),
                     {"--moe-router-bias-update-rate 0.001", "--moe-router-enable-expert-bias"});
}

TEST_F(CliConfigError, ExpertBiasWithAZeroUpdateRate) {
    ExpectUsageError(
        TrainArgs({"--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0"}),
        {"--moe-router-enable-expert-bias 1", "--moe-router-bias-update-rate 1e-3"});
}

TEST_F(CliConfigError, SwitchWithAWrongValue) {
    ExpectUsageError(TrainArgs({"--moe-router-enable-expert-bias", "maybe"}),
                     {"--moe-router-enable-expert-bias", "\"maybe\"", "not a boolean"});
}

TEST_F(CliConfigError, LoadLossWithTopkRouting) {
    ExpectUsageError(TrainArgs({"--moe-load-loss-coeff", "0.01"}),
                     {"--moe-load-loss-coeff 0.01", "--moe-router-type noisy_topk", "not topk"});
}

TEST_F(CliConfigError, DenseWithAnMoeLayerFrequency) {
    ExpectUsageError(TrainArgs({"--dense", "1", "--moe-layer-freq", "1"}),
                     {"--dense 1", "--moe-layer-freq 1", "leave --moe-layer-freq out"});
}

TEST_F(CliConfigError, WarmupLongerThanTheRun) {
    ExpectUsageError(TrainArgs({"--lr-warmup-iters", "100", "--train-iters", "20"}),
                     {"--lr-warmup-iters 100", "--train-iters 20", "never reaches --lr",
                      "below 20"});
}

TEST_F(CliConfigError, MissingDataPath) {
    std::string missing = dir_ + "/no-such-corpus.txt";
    ExpectUsageError({"train", "--data-path", missing, "--train-iters", "1", "--out", out_},
                     {"--data-path", missing, "No such file or directory", "point it at"});
}

// A missing directory is made (CliRun.MissingOutputDirectoryIsCreated), but
// not through a file.
TEST_F(CliConfigError, OutputDirectoryUnderAFile) {
    std::string file = WriteFile("plain.txt", "not a directory\n");
    ExpectUsageError(TrainArgs({"--out", file + "/sub/x.h5"}),
                     {"--out " + file + "/sub/x.h5", file + " is not a directory"});
}

TEST_F(CliConfigError, OutputIsADirectory) {
    ExpectUsageError(TrainArgs({"--out", dir_}), {"--out " + dir_, "is a directory"});
}

TEST_F(CliConfigError, MissingConfigFile) {
    std::string missing = dir_ + "/missing.ini";
    ExpectUsageError(TrainArgs({"--config", missing}),
                     {"cannot read config file " + missing, "No such file or directory"});
}

TEST_F(CliConfigError, BadValueInConfigFileNamesFileAndLine) {
    std::string ini = WriteFile("bad.ini", "[model]\nnum-layers = 2\nhidden_size = 12x\n");
    ExpectUsageError(TrainArgs({"--config", ini}), {ini + ":3:", "hidden-size", "\"12x\""});
}

TEST_F(CliConfigError, SyntaxErrorInConfigFileNamesFileAndLine) {
    std::string ini = WriteFile("syntax.ini", "num-layers = 2\nnot a key value pair\n");
    ExpectUsageError(TrainArgs({"--config", ini}), {ini + ":2:", "syntax error"});
}

TEST_F(CliConfigError, SeqLengthLargerThanTheData) {
    std::string text = WriteFile("tiny.txt", std::string(300, 'a'));
    ExpectUsageError({"train", "--data-path", text, "--seq-length", "128", "--out", out_},
                     {"--seq-length 128", "larger than the data", "lower --seq-length"});
}

TEST_F(CliConfigError, TokenFileWithWrongMagic) {
    std::string tok = WriteFile("wrong.tok", "this is plain text, not a token file at all.....");
    ExpectUsageError({"train", "--data-path", tok, "--out", out_},
                     {tok, "MOESIMTK", "--data-format text"});
}

TEST_F(CliConfigError, TruncatedTokenFile) {
    // Header promising 1000 tokens, followed by only 3 of them.
    std::string header("MOESIMTK", 8);
    const unsigned char rest[24] = {1, 0, 0, 0, 0, 1, 0, 0, 0xe8, 0x03};
    header.append(reinterpret_cast<const char *>(rest), sizeof rest);
    header.append(std::string(6, '\x01'));
    std::string tok = WriteFile("short.tok", header);
    ExpectUsageError({"train", "--data-path", tok, "--out", out_}, {tok, "truncated"});
}

// Short real runs of a tiny model on synthetic data, each in a fresh
// directory that is removed afterwards.
class CliRun : public ::testing::Test {
  protected:
    void SetUp() override {
        char name[] = "/tmp/moesim_cli_run_XXXXXX";
        ASSERT_NE(mkdtemp(name), nullptr) << strerror(errno);
        dir_ = name;
    }
    void TearDown() override { std::filesystem::remove_all(dir_); }

    static std::vector<std::string> Train(const std::string &out,
                                          std::initializer_list<std::string> extra) {
        std::vector<std::string> args;
        std::istringstream tiny(
            "train --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
            "--num-experts 4 --moe-ffn-hidden-size 32 --ffn-hidden-size 64 --eval-iters 1 "
            "--data-format synthetic --synthetic-tokens 20000 --micro-batch-size 2 "
            "--train-iters 2");
        for (std::string word; tiny >> word;) args.push_back(word);
        args.push_back("--out");
        args.push_back(out);
        args.insert(args.end(), extra.begin(), extra.end());
        return args;
    }

    static std::string ReadAll(const std::string &path) {
        std::ifstream in(path, std::ios::binary);
        return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }

    std::string dir_;
};

TEST_F(CliRun, MissingOutputDirectoryIsCreated) {
    std::string out = dir_ + "/new/deeper/run.h5";
    RunResult r = RunMoesim(Train(out, {}));
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_TRUE(PathExists(out)) << r.output;
    EXPECT_FALSE(PathExists(out + ".lock")) << "the run leaves its lock file behind";
}

TEST_F(CliRun, DefaultWarmupLongerThanTheRunIsNamed) {
    RunResult r = RunMoesim(Train(dir_ + "/short.h5", {}));
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "moesim: warning: the default learning-rate warm-up of "
                                         "50 steps is not shorter than --train-iters 2"),
              1u)
        << r.output;
    RunResult warmed = RunMoesim(Train(dir_ + "/warm.h5", {"--lr-warmup-iters", "1"}));
    EXPECT_EQ(warmed.status, 0) << warmed.output;
    EXPECT_EQ(CountOccurrences(warmed.output, "warm-up"), 0u) << warmed.output;
}

TEST_F(CliRun, ExistingRecordIsKeptUnlessOverwriteIsGiven) {
    std::string out = dir_ + "/run.h5";
    RunResult first = RunMoesim(Train(out, {}));
    ASSERT_EQ(first.status, 0) << first.output;
    std::string before = ReadAll(out);
    ASSERT_FALSE(before.empty());

    RunResult refused = RunMoesim(Train(out, {"--train-iters", "3"}));
    EXPECT_EQ(refused.status, 2) << refused.output;
    EXPECT_EQ(CountOccurrences(refused.output, "moesim: error:"), 1u) << refused.output;
    for (const std::string &part :
         {"--out " + out + " already exists", std::string("--overwrite 1"),
          std::string("choose another --out")})
        EXPECT_NE(refused.output.find(part), std::string::npos) << part << "\n" << refused.output;
    EXPECT_EQ(ReadAll(out), before) << "a refused run changed the record";

    RunResult replaced = RunMoesim(Train(out, {"--train-iters", "3", "--overwrite"}));
    EXPECT_EQ(replaced.status, 0) << replaced.output;
    EXPECT_NE(replaced.output.find("done: 3 steps"), std::string::npos) << replaced.output;
}

// The lock another run holds (here: this test, on the record's lock file)
// refuses a run at once and leaves the record alone, --overwrite or not.
TEST_F(CliRun, RecordLockedByAnotherRunIsRefused) {
    std::string out = dir_ + "/run.h5";
    ASSERT_EQ(RunMoesim(Train(out, {})).status, 0);
    std::string before = ReadAll(out);
    int fd = open((out + ".lock").c_str(), O_RDWR | O_CREAT, 0644);
    ASSERT_GE(fd, 0) << strerror(errno);
    ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0) << strerror(errno);
    ASSERT_EQ(write(fd, "pid 1 on testhost since then\n", 29), 29);
    RunResult refused = RunMoesim(Train(out, {"--overwrite", "1"}));
    close(fd);
    EXPECT_EQ(refused.status, 2) << refused.output;
    EXPECT_EQ(CountOccurrences(refused.output, "moesim: error:"), 1u) << refused.output;
    for (const char *part : {"another run (pid 1 on testhost since then) holds --out",
                             "wait for that run to finish or choose another --out"})
        EXPECT_NE(refused.output.find(part), std::string::npos) << part << "\n" << refused.output;
    EXPECT_EQ(ReadAll(out), before) << "a refused run changed the record";
    EXPECT_EQ(RunMoesim(Train(out, {"--overwrite", "1"})).status, 0) << "the lock was released";
}

// A model no node here can hold (about 19 TB per rank) is refused before
// anything is allocated or written, with the numbers and the fixes.
TEST_F(CliRun, ConfigLargerThanTheNodesMemoryIsRefused) {
    std::string out = dir_ + "/run.h5";
    RunResult r = RunMoesim(Train(out, {"--hidden-size", "16384", "--num-layers", "64",
                                        "--num-attention-heads", "64", "--ffn-hidden-size",
                                        "65536", "--moe-ffn-hidden-size", "65536"}));
    EXPECT_NE(r.status, 0) << r.output;
    for (const char *part : {"GB per rank", "x 1 rank(s) on this node", "GB available",
                             "--micro-batch-size", "--expert-model-parallel-size"})
        EXPECT_NE(r.output.find(part), std::string::npos) << "no '" << part << "' in\n"
                                                          << r.output;
    EXPECT_FALSE(PathExists(out)) << "a refused run wrote a record";
}

// --bf16-gemm onednn where oneDNN has no native bf16 GEMM is refused before
// anything is written, naming the problem and the fix; auto falls back to the
// emulation. oneDNN's own ONEDNN_MAX_CPU_ISA=AVX2 (a oneDNN setting, not a
// moesim one) hides the CPU's bf16 instructions from it, as on an AVX2 CPU;
// a build without oneDNN or a CPU without bf16 is refused the same way.
TEST_F(CliRun, Bf16GemmOnednnWithoutNativeBf16IsRefused) {
    std::string out = dir_ + "/run.h5";
    setenv("ONEDNN_MAX_CPU_ISA", "AVX2", 1);
    RunResult refused = RunMoesim(Train(out, {"--precision", "bf16", "--bf16-gemm", "onednn"}));
    bool wrote = PathExists(out);
    RunResult fallback = RunMoesim(Train(out, {"--precision", "bf16"}));
    unsetenv("ONEDNN_MAX_CPU_ISA");
    EXPECT_NE(refused.status, 0) << refused.output;
    EXPECT_EQ(CountOccurrences(refused.output, "moesim: error: --bf16-gemm onednn: "), 1u)
        << refused.output;
    EXPECT_NE(refused.output.find("use --bf16-gemm emulated"), std::string::npos) << refused.output;
    EXPECT_FALSE(wrote) << "a refused run wrote a record";
    EXPECT_EQ(fallback.status, 0) << fallback.output;
    EXPECT_NE(fallback.output.find("bf16 GEMM: emulated"), std::string::npos) << fallback.output;
}

TEST_F(CliRun, SoftRoutingAloneRunsDropless) {
    std::string out = dir_ + "/soft.h5";
    RunResult r = RunMoesim(Train(out, {"--moe-router-type", "soft"}));
    ASSERT_EQ(r.status, 0) << r.output;
    RunResult info = RunMoesim({"info", out});
    EXPECT_EQ(info.status, 0) << info.output;
    EXPECT_NE(info.output.find("4 experts top-4, capacity factor 0,"), std::string::npos)
        << info.output;
}

// The banner and `moesim info` say "dense", not the expert count no layer
// uses, whether --dense or a frequency past the layers made it so.
TEST_F(CliRun, DenseModelIsCalledDense) {
    for (const char *flag : {"--dense", "--moe-layer-freq"}) {
        std::string out = dir_ + "/dense" + flag + ".h5";
        RunResult r = RunMoesim(Train(out, {flag, std::string(flag) == "--dense" ? "1" : "1000"}));
        ASSERT_EQ(r.status, 0) << r.output;
        EXPECT_NE(r.output.find("2 layers (dense (no MoE layers), FFN 64)"), std::string::npos)
            << flag << "\n" << r.output;
        EXPECT_EQ(r.output.find("experts"), std::string::npos) << flag << "\n" << r.output;
        RunResult info = RunMoesim({"info", out});
        EXPECT_EQ(info.status, 0) << info.output;
        EXPECT_NE(info.output.find("2 layers, dense (no MoE layers), FFN 64"), std::string::npos)
            << info.output;
    }
    RunResult moe = RunMoesim(Train(dir_ + "/moe.h5", {}));
    ASSERT_EQ(moe.status, 0) << moe.output;
    EXPECT_NE(moe.output.find("2 layers (2 MoE, 4 experts, top-2)"), std::string::npos)
        << moe.output;
}

TEST_F(CliRun, BareExpertBiasSwitchRunsWithTheDefaultRate) {
    RunResult r = RunMoesim(Train(dir_ + "/bias.h5", {"--moe-router-enable-expert-bias"}));
    EXPECT_EQ(r.status, 0) << r.output;
}

// The diverging run, scaled down: weight decay of lr x 10 = 100 per
// step flips and grows every weight until the gradients overflow.
TEST_F(CliRun, DivergingRunStopsAtTheFirstNonFiniteStep) {
    std::string out = dir_ + "/diverged.h5";
    RunResult r =
        RunMoesim(Train(out, {"--train-iters", "200", "--lr", "10", "--clip-grad", "0",
                              "--lr-warmup-iters", "0", "--min-lr", "10", "--weight-decay", "10"}));
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "moesim: error:"), 1u) << r.output;
    for (const char *part : {"moesim: error: training diverged at step ",
                             "the first tensor with a non-finite gradient is ",
                             "is marked diverged", "--skip-nonfinite-steps"})
        EXPECT_NE(r.output.find(part), std::string::npos) << part << "\n" << r.output;
    EXPECT_EQ(r.output.find("done:"), std::string::npos) << r.output;
    RunResult info = RunMoesim({"info", out});
    EXPECT_EQ(info.status, 0) << info.output;
    EXPECT_NE(info.output.find("status diverged"), std::string::npos) << info.output;
}

TEST_F(CliRun, InfoOnACorruptRecordFails) {
    std::string out = dir_ + "/run.h5";
    ASSERT_EQ(RunMoesim(Train(out, {})).status, 0);
    std::string bytes = ReadAll(out);
    // Keep the superblock and root group, lose the rest of the file.
    std::ofstream(out, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() / 2);
    RunResult info = RunMoesim({"info", out});
    EXPECT_EQ(info.status, 1) << info.output;
    EXPECT_NE(info.output.find("moesim: error: " + out + " is corrupt"), std::string::npos)
        << info.output;
    EXPECT_EQ(info.output.find("moesim run record"), std::string::npos)
        << "info printed a summary before reading everything:\n"
        << info.output;
}

TEST(CliInfo, HelpListsEveryGroupOfFlags) {
    RunResult r = RunMoesim({"--help"});
    EXPECT_EQ(r.status, 0) << r.output;
    for (const char *part : {"moesim train", "--config FILE", "--num-experts", "--hidden-size",
                             "--moe-expert-capacity-factor", "--data-path", "--out",
                             "--moe-router-type", "--moe-eval-capacity-factor", "--dense [0|1]",
                             "no MoE layers"})
        EXPECT_NE(r.output.find(part), std::string::npos) << part << "\n" << r.output;
    EXPECT_EQ(r.output.find("error"), std::string::npos) << r.output;
}

TEST(CliInfo, VersionNamesTheProgram) {
    RunResult r = RunMoesim({"--version"});
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(r.output.rfind("moesim ", 0), 0u) << r.output;
}

}  // namespace
