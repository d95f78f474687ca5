// platform.c: the OpenBLAS kernel-choice rule as a table, the sgemm
// self-check, and flush-to-zero / denormals-are-zero on and off.
#include <gtest/gtest.h>

#include <cblas.h>
#include <xmmintrin.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

#include "moesim/platform.h"

namespace {

CpuFeatures SseOnly() {
    return CpuFeatures{};
}

CpuFeatures AvxOnly() {
    CpuFeatures cpu{};
    cpu.avx = 1;
    return cpu;
}

CpuFeatures Avx2Fma() {  // Haswell .. Zen 3
    CpuFeatures cpu = AvxOnly();
    cpu.avx2 = cpu.fma = 1;
    return cpu;
}

CpuFeatures Avx512() {  // Skylake-SP, Zen 4
    CpuFeatures cpu = Avx2Fma();
    cpu.avx512f = cpu.avx512bw = cpu.avx512dq = cpu.avx512vl = 1;
    return cpu;
}

CpuFeatures SapphireRapids() {
    CpuFeatures cpu = Avx512();
    cpu.avx512_bf16 = cpu.amx_bf16 = 1;
    return cpu;
}

CpuFeatures Avx512FoundationOnly() {  // Knights Landing: F without BW/DQ/VL
    CpuFeatures cpu = Avx2Fma();
    cpu.avx512f = 1;
    return cpu;
}

struct KernelCase {
    const char *cpu_name;
    CpuFeatures cpu;
    const char *reported;
    const char *decision;  // kernel to re-execute with, nullptr = keep
};

TEST(PlatformKernelRule, TableOfCpuFeaturesAndReportedKernels) {
    const KernelCase cases[] = {
        // The case that motivates the rule: OpenBLAS 0.3.21 does not know
        // Sapphire Rapids and falls back to its generic kernels.
        {"sapphire rapids", SapphireRapids(), "Prescott", "SkylakeX"},
        {"sapphire rapids", SapphireRapids(), "prescott", "SkylakeX"},
        {"sapphire rapids", SapphireRapids(), "Haswell", "SkylakeX"},
        {"sapphire rapids", SapphireRapids(), "SkylakeX", nullptr},
        {"sapphire rapids", SapphireRapids(), "Cooperlake", nullptr},
        // A name newer than the table is never replaced by an older guess.
        {"sapphire rapids", SapphireRapids(), "SapphireRapids", nullptr},
        {"zen 4", Avx512(), "Zen", "SkylakeX"},
        {"zen 4", Avx512(), "SkylakeX", nullptr},
        {"zen 3", Avx2Fma(), "Zen", nullptr},
        {"zen 3", Avx2Fma(), "Haswell", nullptr},
        {"zen 3", Avx2Fma(), "Prescott", "Haswell"},
        {"zen 3", Avx2Fma(), "Sandybridge", "Haswell"},
        {"zen 3", Avx2Fma(), "Nehalem", "Haswell"},
        {"knights landing", Avx512FoundationOnly(), "Haswell", nullptr},
        {"knights landing", Avx512FoundationOnly(), "Core2", "Haswell"},
        {"sandy bridge", AvxOnly(), "Sandybridge", nullptr},
        {"sandy bridge", AvxOnly(), "Prescott", "Sandybridge"},
        {"sse only", SseOnly(), "Prescott", nullptr},
        {"sse only", SseOnly(), "Core2", nullptr},
    };
    for (const KernelCase &c : cases) {
        const char *got = blas_kernel_upgrade(&c.cpu, c.reported);
        std::string where = std::string(c.cpu_name) + " reporting " + c.reported;
        if (c.decision == nullptr)
            EXPECT_EQ(got, nullptr) << where << ": should keep, got " << got;
        else
            EXPECT_STREQ(got, c.decision) << where;
    }
}

TEST(PlatformKernelRule, BestKernelPerFeatureLevel) {
    CpuFeatures none = SseOnly(), avx = AvxOnly(), avx2 = Avx2Fma(), avx512 = Avx512();
    EXPECT_EQ(blas_best_kernel(&none), nullptr);
    EXPECT_STREQ(blas_best_kernel(&avx), "Sandybridge");
    EXPECT_STREQ(blas_best_kernel(&avx2), "Haswell");
    EXPECT_STREQ(blas_best_kernel(&avx512), "SkylakeX");
    CpuFeatures avx2_without_fma = Avx2Fma();
    avx2_without_fma.fma = 0;  // Haswell's kernels are FMA3 code
    EXPECT_STREQ(blas_best_kernel(&avx2_without_fma), "Sandybridge");
}

TEST(PlatformKernelRule, LevelsOfKnownAndUnknownNames) {
    EXPECT_EQ(blas_kernel_level("SkylakeX"), 3);
    EXPECT_EQ(blas_kernel_level("COOPERLAKE"), 3);
    EXPECT_EQ(blas_kernel_level("Zen"), 2);
    EXPECT_EQ(blas_kernel_level("Haswell"), 2);
    EXPECT_EQ(blas_kernel_level("Sandybridge"), 1);
    EXPECT_EQ(blas_kernel_level("Prescott"), 0);
    EXPECT_EQ(blas_kernel_level("NoSuchCore"), -1);
}

// The kernel this process runs gives products within rounding of a
// double-precision reference; the check itself can fail (a NaN or a wrong
// product is reported as a large error), tested through the same entry.
TEST(PlatformSelfCheck, KernelInUsePasses) {
    double err = blas_sgemm_self_check_error();
    EXPECT_LE(err, BLAS_SELF_CHECK_TOLERANCE);
    EXPECT_GT(err, 0.0) << "float32 products should show some rounding against double";
}

TEST(PlatformCpu, DescribesFeatures) {
    char buf[256];
    CpuFeatures spr = SapphireRapids();
    cpu_features_describe(&spr, buf, sizeof buf);
    EXPECT_NE(std::string(buf).find("avx512f"), std::string::npos) << buf;
    EXPECT_NE(std::string(buf).find("amx_bf16"), std::string::npos) << buf;
    CpuFeatures none = SseOnly();
    cpu_features_describe(&none, buf, sizeof buf);
    EXPECT_STREQ(buf, "none");
}

// Restores the caller's MXCSR so other tests keep their float mode.
class PlatformDenormals : public ::testing::Test {
  protected:
    void SetUp() override { saved_ = _mm_getcsr(); }
    void TearDown() override { _mm_setcsr(saved_); }
    unsigned saved_ = 0;
};

float Product(float a, float b) {
    volatile float x = a, y = b;
    return x * y;
}

float SgemmOneByOne(float a, float b) {
    float c = -1.0f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, 1, 1, 1.0f, &a, 1, &b, 1, 0.0f, &c,
                1);
    return c;
}

TEST_F(PlatformDenormals, FlushOnMakesDenormalResultsAndInputsZero) {
    Platform p{};
    platform_set_flush_denormals(&p, 1);
    EXPECT_EQ(p.flush_denormals, 1);
    EXPECT_EQ(platform_denormals_flushed(), 1);
    EXPECT_EQ(Product(1e-30f, 1e-10f), 0.0f) << "FTZ: a denormal result becomes zero";
    EXPECT_EQ(Product(1e-40f, 1e10f), 0.0f) << "DAZ: a denormal input counts as zero";
    EXPECT_EQ(SgemmOneByOne(1e-30f, 1e-10f), 0.0f) << "the BLAS kernel runs in the same mode";
}

TEST_F(PlatformDenormals, FlushOffKeepsIeeeDenormals) {
    Platform p{};
    platform_set_flush_denormals(&p, 1);
    platform_set_flush_denormals(&p, 0);
    EXPECT_EQ(p.flush_denormals, 0);
    EXPECT_EQ(platform_denormals_flushed(), 0);
    float tiny = Product(1e-30f, 1e-10f);
    EXPECT_GT(tiny, 0.0f);
    EXPECT_EQ(std::fpclassify(tiny), FP_SUBNORMAL);
    EXPECT_NEAR(Product(1e-40f, 1e10f), 1e-30f, 1e-33f);
    EXPECT_EQ(std::fpclassify(SgemmOneByOne(1e-30f, 1e-10f)), FP_SUBNORMAL);
}

TEST(PlatformDescribe, NamesLibraryKernelOriginThreadsAndDenormals) {
    Platform p{};
    snprintf(p.blas_library, sizeof p.blas_library, "OpenBLAS 0.3.21");
    snprintf(p.blas_kernel, sizeof p.blas_kernel, "SkylakeX");
    snprintf(p.blas_detected, sizeof p.blas_detected, "Prescott");
    snprintf(p.blas_best, sizeof p.blas_best, "SkylakeX");
    p.kernel_source = BLAS_KERNEL_BY_MOESIM;
    p.blas_threads = 1;
    p.flush_denormals = 1;
    char line[512];
    platform_describe(&p, line, sizeof line);
    std::string text(line);
    for (const char *part : {"OpenBLAS 0.3.21", "kernel SkylakeX", "chosen by moesim",
                             "detected Prescott", "1 BLAS thread", "flushed"})
        EXPECT_NE(text.find(part), std::string::npos) << part << " missing from: " << text;
    EXPECT_EQ(platform_faster_kernel_exists(&p), 0);
    snprintf(p.blas_kernel, sizeof p.blas_kernel, "Prescott");
    p.kernel_source = BLAS_KERNEL_BY_USER;
    EXPECT_EQ(platform_faster_kernel_exists(&p), 1);
}

}  // namespace

// ---------------------------------------------------------------------------
// Available memory: MemAvailable, lowered to a cgroup's limit minus usage.

namespace {

class FakeFiles : public ::testing::Test {
  protected:
    void SetUp() override {
        char name[] = "/tmp/moesim_test_memory_XXXXXX";
        ASSERT_NE(mkdtemp(name), nullptr);
        dir_ = name;
    }
    void TearDown() override {
        for (const std::string &f : written_) unlink(f.c_str());
        rmdir(dir_.c_str());
    }
    std::string Write(const std::string &name, const std::string &text) {
        std::string path = dir_ + "/" + name;
        FILE *f = fopen(path.c_str(), "w");
        EXPECT_NE(f, nullptr);
        if (f) {
            fputs(text.c_str(), f);
            fclose(f);
        }
        written_.push_back(path);
        return path;
    }
    std::string dir_;
    std::vector<std::string> written_;
};

const char kMeminfo[] =
    "MemTotal:       25165824 kB\nMemFree:         1000000 kB\n"
    "MemAvailable:   20000000 kB\nBuffers:           12345 kB\n";

}  // namespace

TEST_F(FakeFiles, MemAvailableWithoutACgroupLimit) {
    std::string meminfo = Write("meminfo", kMeminfo);
    EXPECT_EQ(platform_available_memory_from(meminfo.c_str(), nullptr, nullptr), 20000000LL * 1024);
    // cgroup v2 "max" and v1's 2^63 rounded to a page both mean no limit
    std::string max = Write("memory.max", "max\n"), used = Write("memory.current", "5000\n");
    EXPECT_EQ(platform_available_memory_from(meminfo.c_str(), max.c_str(), used.c_str()),
              20000000LL * 1024);
    std::string v1 = Write("memory.limit_in_bytes", "9223372036854771712\n");
    EXPECT_EQ(platform_available_memory_from(meminfo.c_str(), v1.c_str(), used.c_str()),
              20000000LL * 1024);
}

TEST_F(FakeFiles, CgroupLimitBelowMemAvailableWins) {
    std::string meminfo = Write("meminfo", kMeminfo);
    std::string max = Write("memory.max", "4000000000\n");
    std::string used = Write("memory.current", "1000000000\n");
    EXPECT_EQ(platform_available_memory_from(meminfo.c_str(), max.c_str(), used.c_str()),
              3000000000LL);
    std::string full = Write("full", "5000000000\n");
    EXPECT_EQ(platform_available_memory_from(meminfo.c_str(), max.c_str(), full.c_str()), 0);
}

TEST_F(FakeFiles, UnreadableMeminfoMeansUnknown) {
    EXPECT_EQ(platform_available_memory_from((dir_ + "/none").c_str(), nullptr, nullptr), 0);
}

TEST(PlatformMemory, ThisMachineReportsSomeMemory) {
    long long available = platform_available_memory();
    EXPECT_GT(available, 0);
    EXPECT_LT(available, 1LL << 50);
}
