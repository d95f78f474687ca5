// Mixed precision (--precision, --moe-router-precision, --bf16-gemm): bfloat16
// rounding of hand-picked values, emulated bf16 matmuls equal to float32
// matmuls of rounded inputs, oneDNN's native bf16 GEMM equal to the emulation
// up to accumulation order, Switch's selective precision (the router stays
// float32, bit for bit, while every other product is bf16), and the bf16
// model's gradients against the float32 model's, on both GEMMs.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gradcheck.h"
#include "moesim/comm.h"
#include "moesim/model.h"
#include "moesim/ops.h"

namespace {

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

uint32_t rounded_bits(uint32_t u) { return bits(bf16_round(from_bits(u))); }

TEST(Bf16Round, ExactValuesStay) {
    for (float v : {0.0f, 1.0f, -2.5f, 0.15625f, 65280.0f, -1.0f / 1024})
        EXPECT_EQ(bits(bf16_round(v)), bits(v)) << v;
    EXPECT_TRUE(std::signbit(bf16_round(-0.0f)));
}

TEST(Bf16Round, NearestWithTiesToEven) {
    // 1 + 2^-8 lies halfway between 1 (even last bit) and 1 + 2^-7.
    EXPECT_EQ(rounded_bits(0x3F808000u), 0x3F800000u);
    // halfway between 0x3F81 (odd) and 0x3F82: up to the even one
    EXPECT_EQ(rounded_bits(0x3F818000u), 0x3F820000u);
    EXPECT_EQ(rounded_bits(0x3F808001u), 0x3F810000u) << "just above halfway rounds up";
    EXPECT_EQ(rounded_bits(0x3F807FFFu), 0x3F800000u) << "just below halfway rounds down";
    EXPECT_EQ(rounded_bits(0xBF818000u), 0xBF820000u) << "negative ties to even too";
    EXPECT_EQ(rounded_bits(0x3FFFFFFFu), 0x40000000u) << "the carry moves into the exponent";
    EXPECT_EQ(bf16_round(1.00390625f), 1.0f);  // 1 + 2^-8
    EXPECT_EQ(bf16_round(3.14159265f), 3.140625f);
}

TEST(Bf16Round, InfinityNanAndOverflow) {
    EXPECT_EQ(bf16_round(INFINITY), INFINITY);
    EXPECT_EQ(bf16_round(-INFINITY), -INFINITY);
    EXPECT_TRUE(std::isnan(bf16_round(NAN)));
    // A NaN whose payload is only in the dropped bits must not become infinity.
    EXPECT_TRUE(std::isnan(from_bits(rounded_bits(0x7F800001u))));
    EXPECT_TRUE(std::isnan(from_bits(rounded_bits(0xFF800001u))));
    EXPECT_TRUE(std::signbit(from_bits(rounded_bits(0xFF800001u)))) << "NaN keeps its sign";
    EXPECT_TRUE(std::isnan(from_bits(rounded_bits(0x7FFFFFFFu))));
    // Beyond bf16's largest finite value (0x7F7F) rounding overflows to infinity.
    EXPECT_EQ(bf16_round(FLT_MAX), INFINITY);
    EXPECT_EQ(bf16_round(-FLT_MAX), -INFINITY);
    EXPECT_EQ(rounded_bits(0x7F7F7FFFu), 0x7F7F0000u);
    EXPECT_EQ(rounded_bits(0x7F7F8000u), 0x7F800000u) << "a tie above an odd max goes to inf";
}

TEST(Bf16Round, Denormals) {
    EXPECT_EQ(rounded_bits(0x00000001u), 0u) << "the smallest float denormal rounds to zero";
    EXPECT_EQ(rounded_bits(0x80000001u), 0x80000000u) << "to -0";
    EXPECT_EQ(rounded_bits(0x00008000u), 0u) << "tie to the even zero";
    EXPECT_EQ(rounded_bits(0x00008001u), 0x00010000u) << "bf16's smallest denormal";
    EXPECT_EQ(rounded_bits(0x00018000u), 0x00020000u) << "tie to even";
    EXPECT_EQ(rounded_bits(0x00010000u), 0x00010000u) << "bf16 denormals are exact";
    EXPECT_EQ(bf16_round(from_bits(0x007FFFFFu)), FLT_MIN) << "largest denormal rounds up";
}

// An 8-bit significand (7 stored + the implicit 1): half an ulp is at most
// 2^-8 of the value, bf16's unit roundoff.
TEST(Bf16Round, RelativeErrorIsAtMostTheUnitRoundoff) {
    auto v = random_vector(10000, 77, 1e3);
    for (float x : v) {
        if (x == 0.0f) continue;
        EXPECT_LE(std::fabs(bf16_round(x) - x), std::ldexp(std::fabs(x), -8)) << x;
        EXPECT_EQ(bits(bf16_round(x)) & 0xFFFFu, 0u) << "low half must be zero: " << x;
    }
}

std::vector<float> rounded(std::vector<float> v) {
    for (float &x : v) x = bf16_round(x);
    return v;
}

bool bit_equal(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

struct Bf16Matmul {
    Matmul mm{};
    explicit Bf16Matmul(size_t floats, Bf16GemmChoice gemm = BF16_GEMM_EMULATED) {
        EXPECT_EQ(matmul_init(&mm, MATMUL_BF16, floats, gemm), 0);
    }
    ~Bf16Matmul() { matmul_free(&mm); }
};

// Empty when oneDNN's native bf16 GEMM runs here, else why not.
std::string native_bf16_missing() {
    char problem[512] = "";
    Bf16Gemm *g = bf16_gemm_create(problem, sizeof problem);
    bf16_gemm_free(g);
    return g ? "" : problem;
}

#define SKIP_WITHOUT_NATIVE_BF16()                                                \
    do {                                                                          \
        std::string missing = native_bf16_missing();                              \
        if (!missing.empty()) GTEST_SKIP() << "no native bf16 GEMM: " << missing; \
    } while (0)

// bf16 is "round the inputs, multiply in float32": exactly the float32
// products of the rounded inputs, for every operand including incoming
// gradients, and different from the float32 products of the raw inputs.
TEST(MatmulBf16, IsFloat32OfRoundedInputs) {
    const int N = 9, I = 13, O = 7;
    auto x = random_vector(N * I, 1), w = random_vector(O * I, 2), dout = random_vector(N * O, 3);
    Bf16Matmul bf(N * I);
    std::vector<float> out(N * O), want(N * O), raw(N * O);
    matmul_forward(out.data(), x.data(), w.data(), N, I, O, &bf.mm);
    matmul_forward(want.data(), rounded(x).data(), rounded(w).data(), N, I, O, nullptr);
    matmul_forward(raw.data(), x.data(), w.data(), N, I, O, nullptr);
    EXPECT_TRUE(bit_equal(out, want));
    EXPECT_FALSE(bit_equal(out, raw)) << "nothing was rounded";

    auto dw = random_vector(O * I, 4), dw_want = dw;  // accumulates onto what is there
    std::vector<float> dx(N * I), dx_want(N * I);
    matmul_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), N, I, O, &bf.mm);
    matmul_backward(dx_want.data(), dw_want.data(), rounded(dout).data(), rounded(x).data(),
                    rounded(w).data(), N, I, O, nullptr);
    EXPECT_TRUE(bit_equal(dx, dx_want));
    EXPECT_TRUE(bit_equal(dw, dw_want));
    for (float v : x) EXPECT_EQ(v, v) << "inputs are not modified";
}

// The general product, with transposes and strided operands like attention's
// heads inside a packed qkv row.
TEST(MatmulBf16, GemmWithTransposesAndLeadingDimensions) {
    const int M = 6, N = 5, K = 4, ld = 11;
    Bf16Matmul bf(M * K > N * K ? M * K : N * K);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            auto a = random_vector((size_t)(ta ? K : M) * ld, 10 + ta);
            auto b = random_vector((size_t)(tb ? N : K) * ld, 20 + tb);
            auto c = random_vector(M * N, 30), c_want = c;
            matmul_gemm(ta, tb, M, N, K, 0.5f, a.data(), ld, b.data(), ld, 1.0f, c.data(), N,
                        &bf.mm);
            matmul_gemm(ta, tb, M, N, K, 0.5f, rounded(a).data(), ld, rounded(b).data(), ld, 1.0f,
                        c_want.data(), N, nullptr);
            EXPECT_TRUE(bit_equal(c, c_want)) << "transpose a " << ta << ", b " << tb;
        }
}

// The operand rounding runs in vector lanes with a scalar tail; a row times
// the identity returns each rounded value exactly, so both must agree with
// bf16_round on ties, carries into the exponent, the largest finite values
// and denormals (an infinity would turn the identity's zeros into NaN).
TEST(MatmulBf16, VectorAndTailRoundingAgreeWithBf16Round) {
    const uint32_t cases[] = {0x3F808000u, 0x3F818000u, 0x3F808001u, 0x3F807FFFu, 0xBF818000u,
                              0x3FFFFFFFu, 0x7F7F7FFFu, 0x00018000u, 0x80028000u, 0x40490FDBu};
    const int n = 27;  // more than two vector widths, then a tail
    std::vector<float> row(n), identity((size_t)n * n, 0.0f), out(n);
    for (int j = 0; j < n; j++) {
        row[j] = from_bits(cases[j % 10] ^ ((j / 10) % 2 ? 0x80000000u : 0u));  // both signs
        identity[(size_t)j * n + j] = 1.0f;
    }
    Bf16Matmul bf((size_t)n * n);
    matmul_forward(out.data(), row.data(), identity.data(), 1, n, n, &bf.mm);
    for (int j = 0; j < n; j++)
        EXPECT_EQ(bits(out[j]), bits(bf16_round(row[j]))) << "value " << j;
}

TEST(MatmulBf16, Float32ContextAndViewsShareOneScratch) {
    Matmul fp{};
    ASSERT_EQ(matmul_init(&fp, MATMUL_FP32, 0, BF16_GEMM_AUTO), 0);
    EXPECT_EQ(fp.rounded[0], nullptr) << "float32 needs no scratch";
    EXPECT_STREQ(matmul_bf16_gemm(&fp), "none");
    matmul_free(&fp);
    Bf16Matmul bf(100);
    EXPECT_STREQ(matmul_bf16_gemm(&bf.mm), "emulated");
    Matmul view = matmul_view(&bf.mm, MATMUL_FP32);
    EXPECT_EQ(view.rounded[0], bf.mm.rounded[0]);
    EXPECT_EQ(view.precision, MATMUL_FP32);
    EXPECT_EQ(matmul_bytes(100), 2 * 100 * sizeof(float));
    matmul_free(&view);  // a view releases nothing; bf.mm frees the scratch
}

// ---- oneDNN's native bf16 GEMM ------------------------------------------------------

// Values of 3 significant bits times 2^-2..2^0 (exact in bf16), each nudged
// by 10% to 45% of the smaller of the bf16 ulps on either side (a power of
// two has a finer one below), either way. Rounding to nearest even brings
// every one back to its grid value; products of grid values are multiples of
// 2^-4 below 49, so every partial sum over K <= 1024 products is exact in
// float32 and any accumulation order gives the same bits. An operand left
// unrounded, or truncated instead of rounded, does not.
std::vector<float> nudged_grid(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> significand(-7, 7), exponent(-2, 0);
    std::uniform_real_distribution<double> nudge(0.10, 0.45);
    std::vector<float> v(n);
    for (float &x : v) {
        double grid = std::ldexp(significand(rng), exponent(rng));
        if (grid == 0.0) {
            x = 0.0f;
            continue;
        }
        double ulp = std::ldexp(1.0, std::ilogb(grid) - 8);
        x = (float)(grid + (rng() % 2 ? 1 : -1) * nudge(rng) * ulp);
    }
    return v;
}

// The native GEMM for every product, however small, beside the emulation.
struct Backends {
    Bf16Matmul native, emulated;
    explicit Backends(size_t floats)
        : native(floats, BF16_GEMM_ONEDNN), emulated(floats, BF16_GEMM_EMULATED) {
        if (native.mm.gemm) bf16_gemm_set_min_macs(native.mm.gemm, 0);
    }
};

struct Shape {
    int rows, in, out;
};

class NativeBf16 : public ::testing::TestWithParam<Shape> {};

// A linear layer forward and backward (dinp overwritten and accumulated,
// dw accumulated), over uneven row splits: the oneDNN path and the emulation
// give the same bits on exactly summable inputs. Row counts are not
// multiples of any kernel's block.
TEST_P(NativeBf16, LinearLayerEqualsTheEmulationBitForBit) {
    SKIP_WITHOUT_NATIVE_BF16();
    const Shape sh = GetParam();
    const int N = sh.rows, I = sh.in, O = sh.out;
    Backends b((size_t)std::max(N, O) * std::max(I, O));
    ASSERT_NE(b.native.mm.gemm, nullptr);
    EXPECT_EQ(std::string(matmul_bf16_gemm(&b.native.mm)).rfind("onednn (", 0), 0u)
        << matmul_bf16_gemm(&b.native.mm);
    const int begin[] = {0, N / 3, N / 3, N};  // one split empty
    RowSplit split{3, 0, begin, nullptr, nullptr};
    b.native.mm.split = b.emulated.mm.split = &split;
    auto x = nudged_grid((size_t)N * I, 1), w = nudged_grid((size_t)O * I, 2);
    auto dout = nudged_grid((size_t)N * O, 3);
    std::vector<float> out_n(N * O), out_e(N * O);
    matmul_forward(out_n.data(), x.data(), w.data(), N, I, O, &b.native.mm);
    matmul_forward(out_e.data(), x.data(), w.data(), N, I, O, &b.emulated.mm);
    EXPECT_TRUE(bit_equal(out_n, out_e)) << "forward";
    for (float beta : {0.0f, 1.0f}) {
        auto dx_n = nudged_grid((size_t)N * I, 4), dx_e = dx_n;
        auto dw_n = nudged_grid((size_t)O * I, 5), dw_e = dw_n;
        for (float &v : dx_n) v = bf16_round(v);  // summable starting values
        for (float &v : dw_n) v = bf16_round(v);
        dx_e = dx_n;
        dw_e = dw_n;
        matmul_backward_into(dx_n.data(), beta, dw_n.data(), dout.data(), x.data(), w.data(), N, I,
                             O, &b.native.mm);
        matmul_backward_into(dx_e.data(), beta, dw_e.data(), dout.data(), x.data(), w.data(), N, I,
                             O, &b.emulated.mm);
        EXPECT_TRUE(bit_equal(dx_n, dx_e)) << "dinp, beta " << beta;
        EXPECT_TRUE(bit_equal(dw_n, dw_e)) << "dw, beta " << beta;
    }
}

// matmul_gemm with every transpose pattern, strided operands and output
// (attention's heads), alpha a power of two and beta 0 or 1.
TEST_P(NativeBf16, GemmEqualsTheEmulationBitForBit) {
    SKIP_WITHOUT_NATIVE_BF16();
    const Shape sh = GetParam();
    const int M = sh.rows, N = sh.out, K = sh.in, ld = std::max({M, N, K}) + 3, ldc = N + 2;
    Backends b((size_t)std::max(M, N) * K + (size_t)M * N);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (float beta : {0.0f, 1.0f})
                for (float alpha : {1.0f, 0.25f}) {
                    auto a = nudged_grid((size_t)(ta ? K : M) * ld, 10 + ta);
                    auto bm = nudged_grid((size_t)(tb ? N : K) * ld, 20 + tb);
                    auto c_n = nudged_grid((size_t)M * ldc, 30);
                    for (float &v : c_n) v = bf16_round(v);
                    auto c_e = c_n;
                    matmul_gemm(ta, tb, M, N, K, alpha, a.data(), ld, bm.data(), ld, beta,
                                c_n.data(), ldc, &b.native.mm);
                    matmul_gemm(ta, tb, M, N, K, alpha, a.data(), ld, bm.data(), ld, beta,
                                c_e.data(), ldc, &b.emulated.mm);
                    EXPECT_TRUE(bit_equal(c_n, c_e)) << "transpose a " << ta << ", b " << tb
                                                     << ", alpha " << alpha << ", beta " << beta;
                }
}

// On random inputs the two differ by accumulation order only: within
// 2 K 2^-24 of the sum of |products| (each GEMM's float32 summation error
// bound) per element, with attention's non-power-of-two scale.
TEST_P(NativeBf16, RandomProductsAgreeUpToAccumulationOrder) {
    SKIP_WITHOUT_NATIVE_BF16();
    const Shape sh = GetParam();
    const int M = sh.rows, N = sh.out, K = sh.in;
    const float alpha = 1.0f / std::sqrt(8.0f);
    Backends b((size_t)std::max(M, N) * K);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            auto a = random_vector((size_t)M * K, 40 + ta), bm = random_vector((size_t)K * N, 50);
            std::vector<float> c_n(M * N), c_e(M * N);
            int lda = ta ? M : K, ldb = tb ? K : N;
            matmul_gemm(ta, tb, M, N, K, alpha, a.data(), lda, bm.data(), ldb, 0.0f, c_n.data(), N,
                        &b.native.mm);
            matmul_gemm(ta, tb, M, N, K, alpha, a.data(), lda, bm.data(), ldb, 0.0f, c_e.data(), N,
                        &b.emulated.mm);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) {
                    double magnitude = 0.0;
                    for (int k = 0; k < K; k++) {
                        float av = a[ta ? (size_t)k * lda + i : (size_t)i * lda + k];
                        float bv = bm[tb ? (size_t)j * ldb + k : (size_t)k * ldb + j];
                        magnitude += std::fabs((double)bf16_round(av) * bf16_round(bv));
                    }
                    double bound = 2.0 * K * std::ldexp(1.0, -24) * alpha * magnitude;
                    ASSERT_LE(std::fabs(c_n[i * N + j] - c_e[i * N + j]), bound)
                        << "transpose a " << ta << ", b " << tb << " at " << i << "," << j;
                }
        }
}

INSTANTIATE_TEST_SUITE_P(Shapes, NativeBf16,
                         ::testing::Values(Shape{1, 5, 3}, Shape{37, 67, 33}, Shape{100, 300, 17},
                                           Shape{33, 1000, 64}),
                         [](const ::testing::TestParamInfo<Shape> &info) {
                             const Shape &s = info.param;
                             return std::to_string(s.rows) + "x" + std::to_string(s.in) + "x" +
                                    std::to_string(s.out);
                         });

// Products below BF16_GEMM_MIN_MACS multiply-adds (attention's 32-row blocks
// at head size 32) run emulated, bit for bit, on the native Matmul too, and
// the description says so; larger ones do not.
TEST(NativeBf16Choice, SmallProductsRunEmulated) {
    SKIP_WITHOUT_NATIVE_BF16();
    Bf16Matmul native(64 * 64, BF16_GEMM_ONEDNN), emulated(64 * 64, BF16_GEMM_EMULATED);
    EXPECT_NE(std::string(matmul_bf16_gemm(&native.mm)).find("emulated under 524288"),
              std::string::npos)
        << matmul_bf16_gemm(&native.mm);
    auto a = random_vector(32 * 64, 60), b = random_vector(64 * 64, 61);
    std::vector<float> c_n(32 * 64), c_e(32 * 64);
    for (int K : {32, 64}) {  // 2^15, then 2^16 multiply-adds: below the threshold
        matmul_gemm(0, 1, 32, 32, K, 1.0f, a.data(), K, b.data(), K, 0.0f, c_n.data(), 32,
                    &native.mm);
        matmul_gemm(0, 1, 32, 32, K, 1.0f, a.data(), K, b.data(), K, 0.0f, c_e.data(), 32,
                    &emulated.mm);
        EXPECT_TRUE(bit_equal(c_n, c_e)) << "K " << K;
    }
    // A linear layer of 128 x 128 (2^19 at a nominal 32-row split) runs natively
    // whatever its rows: one row differs from the emulation somewhere.
    auto x = random_vector(128 * 128, 62), w = random_vector(128 * 128, 63);
    Bf16Matmul wide(128 * 128, BF16_GEMM_ONEDNN), wide_e(128 * 128, BF16_GEMM_EMULATED);
    std::vector<float> y_n(3 * 128), y_e(3 * 128);
    matmul_forward(y_n.data(), x.data(), w.data(), 3, 128, 128, &wide.mm);
    matmul_forward(y_e.data(), x.data(), w.data(), 3, 128, 128, &wide_e.mm);
    EXPECT_FALSE(bit_equal(y_n, y_e)) << "the 128 x 128 layer ran emulated";
}

// AVX512-BF16's dot products treat denormal inputs and results as zero
// whatever MXCSR says, as --flush-denormals 1 (the default) makes sgemm do:
// with --flush-denormals 0 the two GEMMs differ there (README).
TEST(NativeBf16Choice, DenormalsAreFlushed) {
    SKIP_WITHOUT_NATIVE_BF16();
    Bf16Matmul native(4, BF16_GEMM_ONEDNN);
    bf16_gemm_set_min_macs(native.mm.gemm, 0);
    const float one = 1.0f, tiny = 1e-20f;
    const float smallest = from_bits(0x00010000u);  // bf16's smallest denormal
    float c = -1.0f;
    matmul_gemm(0, 1, 1, 1, 1, 1.0f, &smallest, 1, &one, 1, 0.0f, &c, 1, &native.mm);
    EXPECT_EQ(c, 0.0f) << "a denormal input";
    matmul_gemm(0, 1, 1, 1, 1, 1.0f, &tiny, 1, &tiny, 1, 0.0f, &c, 1, &native.mm);
    EXPECT_EQ(c, 0.0f) << "a denormal product";
    matmul_gemm(0, 1, 1, 1, 1, 1.0f, &one, 1, &one, 1, 0.0f, &c, 1, &native.mm);
    EXPECT_EQ(c, 1.0f);
}

// --bf16-gemm emulated never builds the native GEMM; auto does where it runs.
TEST(NativeBf16Choice, EmulatedAndAutoChooseAsAsked) {
    Bf16Matmul emulated(16, BF16_GEMM_EMULATED), automatic(16, BF16_GEMM_AUTO);
    EXPECT_EQ(emulated.mm.gemm, nullptr);
    EXPECT_EQ(automatic.mm.gemm != nullptr, native_bf16_missing().empty());
    Matmul view = matmul_view(&automatic.mm, MATMUL_FP32);
    EXPECT_EQ(view.gemm, automatic.mm.gemm) << "views share the owner's GEMM";
}

// ---- the model ---------------------------------------------------------------------

struct SmallModel {
    Model m{};
    Comm self{};
    ModelShape s{};
    std::vector<int> inputs, targets;

    SmallModel(MatmulPrecision precision, MatmulPrecision router_precision,
               FfnActivation act = FFN_GELU, int shared_F = 0, RouterType router = ROUTER_TOPK,
               Bf16GemmChoice gemm = BF16_GEMM_EMULATED) {
        s.precision = precision;
        s.bf16_gemm = gemm;
        s.router_precision = router_precision;
        s.expert_activation = act;
        s.shared_F = shared_F;
        s.router_type = router;
        tiny_model_shape(&s);
        comm_attach_self(&self);
        EXPECT_EQ(model_init(&m, &s, 7, &self), 0);
        // This model's products are far below BF16_GEMM_MIN_MACS: run them
        // all on the native GEMM, or it would not be tested here.
        if (m.matmul.gemm) bf16_gemm_set_min_macs(m.matmul.gemm, 0);
        m.router_ctx.training = 1;
        tiny_model_amplify_and_batch(&m, &inputs, &targets);
    }
    ~SmallModel() { model_free(&m); }
    double step() {
        model_zero_grad(&m);
        double loss = model_forward(&m, inputs.data(), targets.data());
        model_backward(&m);
        return loss;
    }
    int N() const { return s.B * s.T; }
};

// The products of one MoE layer's router and of one attention input
// projection, recomputed from the model's saved inputs at a given precision.
struct Recomputed {
    std::vector<float> logits, router_grad, qkv;
};

Recomputed recompute(SmallModel &f, int l, const Matmul *mm) {
    const ModelShape &s = f.s;
    int N = f.N(), C = s.C, E = s.E;
    const LayerActs &a = f.m.acts[l];
    const Routing &r = f.m.moe[l].routing;
    Recomputed out{std::vector<float>(N * E), std::vector<float>(E * C, 0.0f),
                   std::vector<float>(N * 3 * C)};
    matmul_forward(out.logits.data(), a.ln2, f.m.w.layers[l].router_w, N, C, E, mm);
    // dWg += dlogits^T · x, onto zeroed gradients, as the router's backward does
    matmul_gemm(1, 0, E, C, N, 1.0f, r.dh, E, a.ln2, C, 1.0f, out.router_grad.data(), C, mm);
    matmul_forward(out.qkv.data(), a.ln1, f.m.w.layers[l].qkv_w, N, C, 3 * C, mm);
    return out;
}

struct PrecisionCase {
    const char *name;
    MatmulPrecision precision, router_precision;
    Bf16GemmChoice gemm;
};

class SelectivePrecision : public ::testing::TestWithParam<PrecisionCase> {};

// The router's products (forward logits and the weight gradient) are exactly
// those of its own precision, and every other product (here the attention
// input projection) exactly those of --precision: bit for bit, with the
// other precision differing.
TEST_P(SelectivePrecision, RouterAndOtherMatmulsEachAtTheirOwnPrecision) {
    const PrecisionCase c = GetParam();
    if (c.gemm == BF16_GEMM_ONEDNN) SKIP_WITHOUT_NATIVE_BF16();
    SmallModel f(c.precision, c.router_precision, FFN_GELU, 0, ROUTER_TOPK, c.gemm);
    f.step();
    int l = 1;  // the MoE layer (moe_layer_freq 2)
    ASSERT_TRUE(model_is_moe_layer(&f.s, l));
    Bf16Matmul bf((size_t)f.N() * 3 * f.s.C, c.gemm);
    if (bf.mm.gemm) bf16_gemm_set_min_macs(bf.mm.gemm, 0);
    Recomputed fp32 = recompute(f, l, nullptr), bf16 = recompute(f, l, &bf.mm);
    const Routing &r = f.m.moe[l].routing;
    int N = f.N(), C = f.s.C, E = f.s.E;
    std::vector<float> logits(r.logits, r.logits + N * E);
    std::vector<float> router_grad(f.m.dw.layers[l].router_w, f.m.dw.layers[l].router_w + E * C);
    std::vector<float> qkv(f.m.acts[l].qkv, f.m.acts[l].qkv + N * 3 * C);
    const Recomputed &router_want = c.router_precision == MATMUL_BF16 ? bf16 : fp32;
    const Recomputed &router_other = c.router_precision == MATMUL_BF16 ? fp32 : bf16;
    const Recomputed &rest_want = c.precision == MATMUL_BF16 ? bf16 : fp32;
    const Recomputed &rest_other = c.precision == MATMUL_BF16 ? fp32 : bf16;
    EXPECT_TRUE(bit_equal(logits, router_want.logits));
    EXPECT_FALSE(bit_equal(logits, router_other.logits));
    EXPECT_TRUE(bit_equal(router_grad, router_want.router_grad));
    EXPECT_FALSE(bit_equal(router_grad, router_other.router_grad));
    EXPECT_TRUE(bit_equal(qkv, rest_want.qkv));
    EXPECT_FALSE(bit_equal(qkv, rest_other.qkv));
}

INSTANTIATE_TEST_SUITE_P(
    Pairings, SelectivePrecision,
    ::testing::Values(
        PrecisionCase{"fp32", MATMUL_FP32, MATMUL_FP32, BF16_GEMM_EMULATED},
        PrecisionCase{"bf16_router_fp32", MATMUL_BF16, MATMUL_FP32, BF16_GEMM_EMULATED},
        PrecisionCase{"bf16", MATMUL_BF16, MATMUL_BF16, BF16_GEMM_EMULATED},
        PrecisionCase{"fp32_router_bf16", MATMUL_FP32, MATMUL_BF16, BF16_GEMM_EMULATED},
        PrecisionCase{"bf16_router_fp32_onednn", MATMUL_BF16, MATMUL_FP32, BF16_GEMM_ONEDNN},
        PrecisionCase{"bf16_onednn", MATMUL_BF16, MATMUL_BF16, BF16_GEMM_ONEDNN},
        PrecisionCase{"fp32_router_bf16_onednn", MATMUL_FP32, MATMUL_BF16, BF16_GEMM_ONEDNN}),
    [](const ::testing::TestParamInfo<PrecisionCase> &info) { return info.param.name; });

TEST(SelectivePrecision, RoundingScratchIsCountedInModelMemory) {
    SmallModel fp(MATMUL_FP32, MATMUL_FP32), bf(MATMUL_BF16, MATMUL_FP32),
        router_only(MATMUL_FP32, MATMUL_BF16);
    EXPECT_GT(bf.m.matmul.capacity, 0u);
    EXPECT_EQ(router_only.m.matmul.capacity, bf.m.matmul.capacity)
        << "a bf16 router alone needs the same scratch";
    EXPECT_EQ(model_memory_bytes(&bf.m) - model_memory_bytes(&fp.m),
              matmul_bytes(bf.m.matmul.capacity));
    EXPECT_EQ(bf.m.router_matmul.rounded[0], bf.m.matmul.rounded[0]) << "one shared scratch";
}

struct GradVariant {
    const char *name;
    FfnActivation act;
    int shared_F;
    RouterType router;
    MatmulPrecision router_precision;
    Bf16GemmChoice gemm;
};

// The bf16 model's analytic gradient is the gradient of the computation with
// rounded matmul inputs; against the float32 model's (same weights, same
// routing) each tensor's gradient may differ by the rounding carried through
// the products between it and the loss. bf16's unit roundoff is u = 2^-8
// (Bf16Round above); a product of two rounded inputs is off by up to 2u at
// first order, and in this 2-layer model about four such products in series
// (forward and back through a block, plus the LM head) lie between a tensor
// and the loss without averaging out, so the bound is 8u = 2^-5 relative in
// the L2 norm. Measured here: 0.3% to 1.8% (1u to 4.5u). A wrong or missing
// gradient term, or a stale rounding buffer, is O(1).
constexpr double kBf16UnitRoundoff = 1.0 / 256;
constexpr double kBf16GradTolerance = 8 * kBf16UnitRoundoff;

class Bf16Gradients : public ::testing::TestWithParam<GradVariant> {};

TEST_P(Bf16Gradients, CloseToTheFloat32Model) {
    const GradVariant v = GetParam();
    if (v.gemm == BF16_GEMM_ONEDNN) SKIP_WITHOUT_NATIVE_BF16();
    SmallModel fp(MATMUL_FP32, MATMUL_FP32, v.act, v.shared_F, v.router);
    SmallModel bf(MATMUL_BF16, v.router_precision, v.act, v.shared_F, v.router, v.gemm);
    double fp_loss = fp.step(), bf_loss = bf.step();
    const Routing &rf = fp.m.moe[1].routing, &rb = bf.m.moe[1].routing;
    int slots = fp.N() * rf.slots;
    ASSERT_TRUE(std::equal(rf.choice_expert, rf.choice_expert + slots, rb.choice_expert) &&
                std::equal(rf.choice_kept, rf.choice_kept + slots, rb.choice_kept))
        << "routing must agree for the gradients to be comparable";
    EXPECT_LT(std::fabs(bf_loss - fp_loss) / fp_loss, kBf16GradTolerance);
    double largest = 0.0;
    for (int i = 0; i < fp.m.num_tensors; i++) {
        const ParamTensor &t = fp.m.tensors[i];
        double diff = 0.0, norm = 0.0;
        for (size_t j = 0; j < t.numel; j++) {
            double a = fp.m.grads[t.offset + j], b = bf.m.grads[t.offset + j];
            diff += (a - b) * (a - b);
            norm += a * a;
        }
        ASSERT_GT(norm, 0.0) << t.name << " has no gradient to compare";
        double rel = std::sqrt(diff / norm);
        EXPECT_LT(rel, kBf16GradTolerance) << t.name;
        largest = std::fmax(largest, rel);
    }
    EXPECT_GT(largest, kBf16UnitRoundoff / 16) << "the bf16 model computed in float32";
}

INSTANTIATE_TEST_SUITE_P(
    Variants, Bf16Gradients,
    ::testing::Values(
        GradVariant{"gelu", FFN_GELU, 0, ROUTER_TOPK, MATMUL_FP32, BF16_GEMM_EMULATED},
        GradVariant{"gelu_router_bf16", FFN_GELU, 0, ROUTER_TOPK, MATMUL_BF16, BF16_GEMM_EMULATED},
        GradVariant{"swiglu_shared", FFN_SWIGLU, 5, ROUTER_TOPK, MATMUL_FP32, BF16_GEMM_EMULATED},
        GradVariant{"noisy_topk", FFN_GELU, 0, ROUTER_NOISY_TOPK, MATMUL_FP32, BF16_GEMM_EMULATED},
        GradVariant{"gelu_onednn", FFN_GELU, 0, ROUTER_TOPK, MATMUL_FP32, BF16_GEMM_ONEDNN},
        GradVariant{"gelu_router_bf16_onednn", FFN_GELU, 0, ROUTER_TOPK, MATMUL_BF16,
                    BF16_GEMM_ONEDNN},
        GradVariant{"swiglu_shared_onednn", FFN_SWIGLU, 5, ROUTER_TOPK, MATMUL_FP32,
                    BF16_GEMM_ONEDNN},
        GradVariant{"noisy_topk_onednn", FFN_GELU, 0, ROUTER_NOISY_TOPK, MATMUL_FP32,
                    BF16_GEMM_ONEDNN}),
    [](const ::testing::TestParamInfo<GradVariant> &info) { return info.param.name; });

}  // namespace
