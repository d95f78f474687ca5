// reduce: exact_sum_floats gives the same bits however the partials are
// ordered, chunked, split over ranks or into non-blocking buckets, and stays within 48 bits of each
// element's largest term; ordered_sum_doubles adds the grains in global grain
// order. The ExactSum and OrderedSum suites sum over MPI_COMM_SELF, so they
// pass under any mpirun; DistributedReduce needs mpirun -n 2 and skips
// otherwise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <random>
#include <set>
#include <vector>

#include "moesim/comm.h"
#include "moesim/platform.h"
#include "moesim/reduce.h"

namespace {

constexpr int kPartials = 12;
// A signalling-NaN pattern the outputs start as, so an element the sum never
// wrote shows up in a bitwise comparison.
constexpr uint32_t kUnwritten = 0x7fa5a5a5u;

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// a and b hold the same bits, zero signs and NaN payloads included.
::testing::AssertionResult SameBits(const std::vector<float> &a, const std::vector<float> &b) {
    if (a.size() != b.size())
        return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
    for (size_t i = 0; i < a.size(); i++) {
        if (bits(a[i]) == bits(b[i])) continue;
        char line[160];
        std::snprintf(line, sizeof line, "element %zu of %zu: %a (0x%08x) vs %a (0x%08x)", i,
                      a.size(), (double)a[i], bits(a[i]), (double)b[i], bits(b[i]));
        return ::testing::AssertionFailure() << line;
    }
    return ::testing::AssertionSuccess();
}

using Partials = std::vector<std::vector<float>>;

// Pointers to partials [begin, end) of p, in order, each offset by `offset`.
std::vector<float *> pointers(Partials &p, size_t begin, size_t end, size_t offset = 0) {
    std::vector<float *> ptrs;
    for (size_t k = begin; k < end; k++) ptrs.push_back(p[k].data() + offset);
    return ptrs;
}

std::vector<float *> pointers(Partials &p) {
    return pointers(p, 0, p.size());
}

// exact_sum_floats of `parts` (n floats each) over `scope` into a fresh
// output; capacity 0 means one chunk of n.
std::vector<float> exact_sum(const Comm *c, CommScope scope, std::vector<float *> parts, long total,
                             size_t n, size_t capacity = 0) {
    std::vector<float> out(n, from_bits(kUnwritten));
    ExactSum x;
    if (exact_sum_init(&x, capacity ? capacity : n) != 0) {
        ADD_FAILURE() << "exact_sum_init failed";
        return out;
    }
    exact_sum_floats(&x, c, scope, parts.empty() ? nullptr : parts.data(), (int)parts.size(), total,
                     n, out.data());
    exact_sum_free(&x);
    return out;
}

// The 1-rank sum of every partial in `parts`, the reference of any layout.
std::vector<float> self_sum(std::vector<float *> parts, size_t n, size_t capacity = 0) {
    Comm self;
    comm_attach_self(&self);
    return exact_sum(&self, COMM_SCOPE_WORLD, parts, (long)parts.size(), n, capacity);
}

// The exact sum of `parts` (n floats each) without blocking, in buckets of
// the given sizes (summing to n), into `out` (which may be parts[0]): every
// bucket started before any continues, as the backward pass interleaves them
// (the first continued while later ones start), tests polled in between.
// held (partials per rank) takes the sliced steps where they fit.
void bucketed_sum(const Comm *c, CommScope scope, std::vector<float *> parts, long total,
                  const std::vector<size_t> &sizes, float *out, const int *held = nullptr) {
    size_t n = 0;
    for (size_t len : sizes) n += len;
    std::vector<uint8_t> exponent(n);
    std::vector<int64_t> fixed(n);
    std::vector<ExactSumAsync> buckets(sizes.size());
    float *const *partials = parts.empty() ? nullptr : parts.data();
    size_t offset = 0;
    for (size_t b = 0; b < sizes.size(); b++) {
        exact_sum_start(&buckets[b], c, scope, partials, (int)parts.size(), total, offset, sizes[b],
                        out + offset, exponent.data() + offset, fixed.data() + offset, held);
        offset += sizes[b];
        for (size_t k = 0; k < b; k++) exact_sum_test(&buckets[k]);
        if (b > 0) exact_sum_continue(&buckets[b - 1]);
    }
    for (auto &bucket : buckets) exact_sum_continue(&bucket);
    for (auto &bucket : buckets) exact_sum_test(&bucket);
    for (size_t b = buckets.size(); b-- > 0;) exact_sum_complete(&buckets[b]);
    for (auto &bucket : buckets) EXPECT_EQ(bucket.stage, EXACT_SUM_DONE);
}

std::vector<float> bucketed_sum(const Comm *c, CommScope scope, std::vector<float *> parts,
                                long total, const std::vector<size_t> &sizes,
                                const int *held = nullptr) {
    size_t n = 0;
    for (size_t len : sizes) n += len;
    std::vector<float> out(n, from_bits(kUnwritten));
    bucketed_sum(c, scope, parts, total, sizes, out.data(), held);
    return out;
}

// Bucket sizes that put boundaries off the 4-lane grid and leave 1-element
// buckets, summing to n.
std::vector<size_t> ragged_buckets(size_t n) {
    std::vector<size_t> sizes;
    const size_t pattern[] = {1, 7, 13, 2, 50, 3};
    for (size_t left = n, k = 0; left > 0; k++) {
        size_t len = std::min(left, pattern[k % 6]);
        sizes.push_back(len);
        left -= len;
    }
    return sizes;
}

// Plain float summation of element i, in the order of `parts`.
float naive_sum(const std::vector<float *> &parts, size_t i) {
    float sum = 0.0f;
    for (const float *p : parts) sum += p[i];
    return sum;
}

float signed_denormal(std::mt19937 &rng) {
    uint32_t mantissa = std::uniform_int_distribution<uint32_t>(1, (1u << 23) - 1)(rng);
    return from_bits(mantissa | (rng() & 1 ? 0x80000000u : 0u));
}

// count partials of n elements. Each element has its own scale: its terms
// span up to 8 decades below a top decade drawn from [-22, 6], so terms range
// over 1e-30..1e6 with both signs; one term in ten is a signed zero and one in
// ten a denormal, and every 17th element holds only denormals and zeros.
// Every 5th element cancels: two of its terms are M and -M, the others 9 to
// 18 decades below M, so its sum shows the fixed-point rounding of each term.
Partials mixed_partials(std::mt19937 &rng, int count, size_t n) {
    Partials p(count, std::vector<float>(n));
    std::uniform_real_distribution<double> top(-22.0, 6.0), below(0.0, 8.0);
    std::uniform_real_distribution<double> cancel_top(-12.0, 6.0), far_below(9.0, 18.0);
    std::uniform_int_distribution<int> kind(0, 9);
    for (size_t i = 0; i < n; i++) {
        const bool cancels = i % 5 == 2 && count >= 3;
        const double decade = cancels ? cancel_top(rng) : top(rng);
        for (int k = 0; k < count; k++) {
            int what = i % 17 == 5 ? kind(rng) % 2 : kind(rng);
            float sign = rng() & 1 ? -1.0f : 1.0f;
            if (cancels)
                p[k][i] = sign * (float)std::pow(10.0, decade - far_below(rng));
            else if (what == 0)
                p[k][i] = sign * 0.0f;
            else if (what == 1)
                p[k][i] = signed_denormal(rng);
            else
                p[k][i] = sign * (float)std::pow(10.0, decade - below(rng));
        }
        if (cancels) {
            const size_t a = rng() % count, b = (a + 1 + rng() % (count - 1)) % count;
            p[a][i] = (float)std::pow(10.0, decade);
            p[b][i] = -p[a][i];
        }
    }
    return p;
}

// Cheap uniform partials for long vectors.
Partials uniform_partials(std::mt19937 &rng, int count, size_t n) {
    Partials p(count, std::vector<float>(n));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto &row : p)
        for (float &v : row) v = u(rng);
    return p;
}

// Spacing from |f| to the next float away from zero (2^-149 at zero).
long double ulp_up(float f) {
    float a = std::fabs(f);
    return (long double)std::nextafter(a, INFINITY) - a;
}

// Protects order independence: the bits do not depend on the order of the
// partials (on one rank, the only thing a different grouping of grains changes).
TEST(ExactSum, BitsIgnoreTheOrderOfPartials) {
    std::mt19937 rng(1);
    const size_t n = 203;  // whole vectors and a scalar tail at 4 or 8 lanes
    Partials p = mixed_partials(rng, kPartials, n);
    std::vector<float *> order = pointers(p);
    const std::vector<float> first = self_sum(order, n);
    std::vector<float> naive_first(n);
    for (size_t i = 0; i < n; i++) naive_first[i] = naive_sum(order, i);
    long naive_changed = 0;
    for (int trial = 0; trial < 300; trial++) {
        if (trial == 0)
            std::reverse(order.begin(), order.end());
        else
            std::shuffle(order.begin(), order.end(), rng);
        ASSERT_TRUE(SameBits(self_sum(order, n), first)) << "permutation " << trial;
        for (size_t i = 0; i < n; i++)
            naive_changed += bits(naive_sum(order, i)) != bits(naive_first[i]);
    }
    // The data is order sensitive: plain float sums of the same permutations differ.
    EXPECT_GT(naive_changed, 0);
}

// Protects the accuracy contract (48 bits below the element's largest term).
// Each term is rounded to a fixed-point unit of 2^(e-174) for the element's
// largest biased exponent e (e >= 1), and its largest term M is at least
// 2^(e-127), so a unit is at most 2^-47 M and each term is off by at most half
// a unit, 2^-48 M. 12 terms below 2^48 each sum below 2^52, so the integer
// converts to double exactly and the float result adds one rounding of at
// most half the spacing above |got|. The long double reference (64-bit
// mantissa, 11 additions of sums below 12 M) is off by at most 132 * 2^-64 M.
// Hence |got - ref| <= M * (12 * 2^-48 + 132 * 2^-64) + ulp_up(got) / 2.
TEST(ExactSum, WithinFortyEightBitsOfTheLargestTerm) {
    std::mt19937 rng(2);
    const size_t n = 4099;
    Partials p = mixed_partials(rng, kPartials, n);
    const std::vector<float> got = self_sum(pointers(p), n);
    const long double per_term = std::ldexp(1.0L, -48), reference_error = std::ldexp(132.0L, -64);
    for (size_t i = 0; i < n; i++) {
        long double ref = 0.0L, largest = 0.0L;
        for (int k = 0; k < kPartials; k++) {
            ref += p[k][i];
            largest = std::max(largest, (long double)std::fabs(p[k][i]));
        }
        long double bound = largest * (kPartials * per_term + reference_error) + ulp_up(got[i]) / 2;
        ASSERT_LE(std::fabs((long double)got[i] - ref), bound)
            << "element " << i << ": got " << got[i] << ", largest term " << (double)largest;
    }

    // Without cancellation (all terms positive) that is within an ulp of the sum.
    for (auto &row : p)
        for (float &v : row) v = std::fabs(v);
    const std::vector<float> positive = self_sum(pointers(p), n);
    for (size_t i = 0; i < n; i++) {
        long double ref = 0.0L;
        for (int k = 0; k < kPartials; k++) ref += p[k][i];
        ASSERT_LE(std::fabs((long double)positive[i] - ref), ulp_up(positive[i]))
            << "element " << i << ": got " << positive[i] << ", sum " << (double)ref;
    }
}

// Protects the equivalence of the one-rank sum's three paths: double
// accumulation, unrolled for two partials and general up to 32, and int64
// fixed point beyond. A zero partial adds nothing and never raises an
// exponent, so padding the same terms with zero partials moves the sum from
// one path to the next without changing a bit. The terms span 26 binary
// orders (rounded in fixed point), with denormals, zeros, infinities and NaN.
TEST(ExactSum, EveryPathGivesTheSameBits) {
    std::mt19937 rng(11);
    const size_t n = 4099;  // whole vectors and a scalar tail at 4 or 8 lanes
    for (int terms : {2, 3}) {
        Partials p = mixed_partials(rng, terms, n);
        p[0][17] = INFINITY;
        p[terms - 1][40] = NAN;
        p[0][41] = -INFINITY;
        std::vector<float> reference;
        for (int count : {terms, 3, 32, 33, 40}) {
            if (count < terms) continue;
            Partials padded = p;
            padded.resize(count, std::vector<float>(n, 0.0f));
            std::vector<float> got = self_sum(pointers(padded), n);
            if (reference.empty())
                reference = got;
            else
                EXPECT_TRUE(SameBits(got, reference)) << terms << " terms in " << count
                                                      << " partials";
        }
        EXPECT_TRUE(std::isnan(reference[17]) && std::isnan(reference[40]) &&
                    std::isnan(reference[41]));
    }
}

// Protects the two-partial shortcut (a float addition where it is exact in
// fixed point) against the int64 path, with and without flush-to-zero: every
// 8-lane block below is either eligible as a whole or holds one lane that is
// not. The cases: signed zeros alone and beside a term, exact cancellation,
// a sum below the smallest normal, an overflow, a tie, exponents 24 apart
// (exact) and 25 apart where fixed point rounds the smaller term onto a
// float midpoint (1 + 2^-23 and 2^-24 - 2^-48 sum to 1 + 2^-22 there, to
// 1 + 2^-23 in float), denormals, infinities and a NaN, beside terms of any
// exponent.
TEST(ExactSum, TwoPartialsShortcutGivesTheFixedPointBits) {
    std::mt19937 rng(12);
    std::uniform_real_distribution<float> u(0.5f, 1.0f);
    const std::vector<std::pair<float, float>> cases = {
        {-0.0f, -0.0f},
        {0.0f, -0.0f},
        {-0.0f, 3.0f},
        {-5.0f, 0.0f},
        {1.5f, -1.5f},
        {1.5f * FLT_MIN, -1.25f * FLT_MIN},
        {FLT_MAX, FLT_MAX},
        {1.0f, std::ldexp(1.0f, -24)},
        {1.0f + std::ldexp(1.0f, -23), std::ldexp(1.0f, -23) - std::ldexp(1.0f, -47)},
        {1.0f + std::ldexp(1.0f, -23), std::ldexp(1.0f, -24) - std::ldexp(1.0f, -48)},
        {1.0f, from_bits(0x00000005u)},
        {from_bits(0x80000005u), from_bits(0x80000003u)},  // -0 under DAZ in float
        {1.5f * FLT_MIN, from_bits(0x00000005u)},
        {INFINITY, 1.0f},
        {INFINITY, 3e38f},  // exponents one apart
        {-3e38f, NAN},
    };
    const size_t n = 2 * 8 * cases.size() + 5;  // a whole and a split block per case, a tail
    Partials p(2, std::vector<float>(n));
    for (size_t i = 0; i < n; i++) {
        p[0][i] = u(rng) * (rng() & 1 ? -1.0f : 1.0f);
        p[1][i] = u(rng) * std::ldexp(1.0f, (int)(rng() % 40) - 20);
    }
    for (size_t c = 0; c < cases.size(); c++) {
        p[0][16 * c + 3] = cases[c].first;
        p[1][16 * c + 3] = cases[c].second;
        p[0][16 * c + 12] = cases[c].second;  // swapped, in the other block
        p[1][16 * c + 12] = cases[c].first;
    }
    Platform platform{};
    for (int flush : {0, 1}) {
        platform_set_flush_denormals(&platform, flush);
        Partials padded = p;
        padded.resize(40, std::vector<float>(n, 0.0f));
        const std::vector<float> fixed = self_sum(pointers(padded), n);
        EXPECT_TRUE(SameBits(self_sum(pointers(p), n), fixed)) << "flush " << flush;
        const size_t midpoint = 16 * 9 + 3;
        EXPECT_EQ(fixed[midpoint], 1.0f + std::ldexp(1.0f, -22));
        EXPECT_EQ(bits(fixed[3]), 0u);  // -0 + -0 is +0 in fixed point
    }
    platform_set_flush_denormals(&platform, 0);
}

// Protects the lone-partial contract: with total_partials == 1 the partial is
// the sum, copied bit for bit. A finite float would survive the fixed-point
// path too (24 bits < 48); the copy is what keeps -0, infinities (not NaN)
// and NaN payloads.
TEST(ExactSum, LonePartialIsCopiedBitForBit) {
    std::mt19937 rng(3);
    std::vector<float> lone = mixed_partials(rng, 1, 45)[0];
    const uint32_t specials[] = {0x80000000u, 0x7f7fffffu, 0xff7fffffu, 0x00800000u,
                                 0x00000001u, 0x807fffffu, 0x7f800000u, 0xff800000u,
                                 0x7fc01234u, 0xffc00001u, 0x7f800001u, 0x3f800001u};
    for (size_t k = 0; k < sizeof specials / sizeof *specials; k++)
        lone[3 * k + 1] = from_bits(specials[k]);
    const size_t n = lone.size();
    std::vector<float *> parts = {lone.data()};
    for (size_t capacity : {n, (size_t)4}) {
        EXPECT_TRUE(SameBits(self_sum(parts, n, capacity), lone)) << "capacity " << capacity;
        // In place: out aliases partials[0].
        std::vector<float> in_place = lone;
        float *ptr = in_place.data();
        Comm self;
        comm_attach_self(&self);
        ExactSum x;
        ASSERT_EQ(exact_sum_init(&x, capacity), 0);
        exact_sum_floats(&x, &self, COMM_SCOPE_WORLD, &ptr, 1, 1, n, in_place.data());
        exact_sum_free(&x);
        EXPECT_TRUE(SameBits(in_place, lone)) << "in place, capacity " << capacity;
    }
}

// Protects non-finite handling: an inf or NaN in any partial makes that
// element NaN, in a vector lane or the tail, and leaves every other element
// (its lane neighbours included) with the bits of the clean sum.
TEST(ExactSum, NonFiniteTermPoisonsOnlyItsElement) {
    std::mt19937 rng(4);
    const size_t n = 29;  // lanes 0..23 or 0..27, then a scalar tail
    Partials p = mixed_partials(rng, kPartials, n);
    const std::vector<float> clean = self_sum(pointers(p), n);
    struct Poison {
        size_t element;
        int partial;
        float value;
    };
    const Poison poisons[] = {{0, 0, INFINITY},  {3, 5, NAN},        {4, 11, -INFINITY},
                              {10, 2, INFINITY}, {10, 9, -INFINITY}, {17, 6, INFINITY},
                              {25, 2, NAN},      {28, 7, -INFINITY}, {28, 8, -NAN}};
    std::set<size_t> poisoned;
    for (const Poison &q : poisons) {
        p[q.partial][q.element] = q.value;
        poisoned.insert(q.element);
    }
    p[3][17] = FLT_MAX;  // a huge finite term beside the inf changes nothing
    const std::vector<float> got = self_sum(pointers(p), n);
    for (size_t i = 0; i < n; i++) {
        if (poisoned.count(i))
            EXPECT_TRUE(std::isnan(got[i])) << "element " << i << " is " << got[i];
        else
            EXPECT_EQ(bits(got[i]), bits(clean[i])) << "element " << i;
    }
}

// Protects non-finite handling from undefined behaviour: elements whose every
// term is -inf or NaN, in vector lanes, come back NaN.
// (The vector loop adds the bit patterns of non-finite terms before masking
// them out; it must do so in unsigned lanes, or the sanitize build aborts.)
TEST(ExactSum, EveryTermNonFinite) {
    const size_t n = 16;
    Partials p(kPartials, std::vector<float>(n));
    for (auto &row : p)
        for (size_t i = 0; i < n; i++) row[i] = i % 2 ? NAN : -INFINITY;
    const std::vector<float> got = self_sum(pointers(p), n);
    for (size_t i = 0; i < n; i++) EXPECT_TRUE(std::isnan(got[i])) << "element " << i;
}

// Protects exactness that float summation lacks: 1e8 + 1 - 1e8 is 0 or 1 in
// float depending on the order (likewise 3e7 + 0.75 - 3e7), while the exact
// sum gives 1 (0.75) for all six orders; a regression to plain float
// summation in any fixed order fails here.
TEST(ExactSum, CancellationThatBreaksFloatSummation) {
    const size_t n = 11;  // even elements 1e8, 1, -1e8; odd ones 3e7, 0.75, -3e7
    Partials p(3, std::vector<float>(n));
    for (size_t i = 0; i < n; i++) {
        bool even = i % 2 == 0;
        p[0][i] = even ? 1e8f : 3e7f;
        p[1][i] = even ? 1.0f : 0.75f;
        p[2][i] = even ? -1e8f : -3e7f;
    }
    std::vector<float *> order = pointers(p);
    std::sort(order.begin(), order.end());
    std::set<uint32_t> naive_even, naive_odd;
    do {
        const std::vector<float> got = self_sum(order, n);
        for (size_t i = 0; i < n; i++) EXPECT_EQ(got[i], i % 2 == 0 ? 1.0f : 0.75f) << i;
        naive_even.insert(bits(naive_sum(order, 0)));
        naive_odd.insert(bits(naive_sum(order, 1)));
    } while (std::next_permutation(order.begin(), order.end()));
    EXPECT_GT(naive_even.size(), 1u);
    EXPECT_GT(naive_odd.size(), 1u);
}

// Protects against vector-lane, scalar-tail and chunking mismatches: an
// element's bits are the same at any length, at any alignment, alone, and in
// one chunk or many (with the output aliasing partials[0] or not).
TEST(ExactSum, LengthsAndChunksDoNotChangeAnElement) {
    std::mt19937 rng(6);
    for (size_t n : {(size_t)1, (size_t)7, (size_t)13, (size_t)1000003}) {
        const bool large = n > 1000;
        Partials p = large ? uniform_partials(rng, 3, n) : mixed_partials(rng, kPartials, n);
        const std::vector<float> whole = self_sum(pointers(p), n);
        // Alone: each element (or a sample of a long vector) summed as n = 1.
        std::vector<size_t> sample;
        for (size_t i = 0; i < n && i < 40; i++) sample.push_back(i);
        for (size_t i = n > 40 ? n - 40 : n; i < n; i++) sample.push_back(i);
        for (int s = 0; large && s < 1000; s++) sample.push_back(rng() % n);
        for (size_t i : sample)
            ASSERT_EQ(bits(self_sum(pointers(p, 0, p.size(), i), 1)[0]), bits(whole[i]))
                << "n " << n << ", element " << i;
        // Shifted windows put each element in another lane, or in the tail.
        for (size_t off = 1; off < 9 && off < n; off++) {
            size_t len = std::min(n - off, (size_t)67);
            std::vector<float> window = self_sum(pointers(p, 0, p.size(), off), len);
            ASSERT_TRUE(SameBits(
                window, std::vector<float>(whole.begin() + off, whole.begin() + off + len)))
                << "n " << n << ", offset " << off;
        }
        // Chunked, and chunked in place.
        const std::vector<size_t> capacities =
            large ? std::vector<size_t>{4099, n - 1} : std::vector<size_t>{1, 3, 8};
        for (size_t capacity : capacities) {
            ASSERT_TRUE(SameBits(self_sum(pointers(p), n, capacity), whole))
                << "n " << n << ", capacity " << capacity;
            if (large) continue;  // in place only where it is cheap
            Partials copy = p;
            std::vector<float *> parts = pointers(copy);
            Comm self;
            comm_attach_self(&self);
            ExactSum x;
            ASSERT_EQ(exact_sum_init(&x, capacity), 0);
            exact_sum_floats(&x, &self, COMM_SCOPE_WORLD, parts.data(), (int)parts.size(),
                             (long)parts.size(), n, copy[0].data());
            exact_sum_free(&x);
            ASSERT_TRUE(SameBits(copy[0], whole))
                << "in place, n " << n << ", capacity " << capacity;
        }
    }
}

// Protects the overlapped gradient reduction on one rank: buckets started
// and completed without blocking give exact_sum_floats's bits, out of place
// and in place, whatever the bucket boundaries.
TEST(ExactSumAsync, BucketsGiveTheBlockingBitsOnOneRank) {
    std::mt19937 rng(13);
    const size_t n = 203;
    Partials p = mixed_partials(rng, kPartials, n);
    p[4][10] = INFINITY;
    p[7][11] = NAN;
    const std::vector<float> whole = self_sum(pointers(p), n);
    Comm self;
    comm_attach_self(&self);
    for (const auto &sizes : {std::vector<size_t>{n}, ragged_buckets(n)}) {
        EXPECT_TRUE(SameBits(bucketed_sum(&self, COMM_SCOPE_WORLD, pointers(p), kPartials, sizes),
                             whole))
            << sizes.size() << " buckets";
        Partials copy = p;
        bucketed_sum(&self, COMM_SCOPE_WORLD, pointers(copy), kPartials, sizes, copy[0].data());
        EXPECT_TRUE(SameBits(copy[0], whole)) << "in place, " << sizes.size() << " buckets";
        // a lone partial is copied bit for bit, -0 and inf included
        Partials lone(1, p[1]);
        lone[0][3] = -0.0f;
        lone[0][4] = -INFINITY;
        EXPECT_TRUE(SameBits(bucketed_sum(&self, COMM_SCOPE_WORLD, pointers(lone), 1, sizes),
                             lone[0]));
    }
}

// 6 rows of n doubles. Column 0 is 1e16, 1, 1, -1e16, 1, 0.5: 1.5 summed in
// order, but 4 in reverse, 0 as rows 0-2 plus rows 3-5, and 3.5 in the order
// 0, 3, 1, 4, 2, 5. Other columns are random with mixed magnitudes.
std::vector<double> grain_rows(std::mt19937 &rng, int n) {
    const int rows = 6;
    const double column0[rows] = {1e16, 1.0, 1.0, -1e16, 1.0, 0.5};
    std::vector<double> v((size_t)rows * n);
    std::uniform_real_distribution<double> decade(-20.0, 20.0);
    for (int g = 0; g < rows; g++) {
        v[(size_t)g * n] = column0[g];
        for (int j = 1; j < n; j++)
            v[(size_t)g * n + j] = (rng() & 1 ? 1.0 : -1.0) * std::pow(10.0, decade(rng));
    }
    return v;
}

// Rows [begin, end) of v added one after another from 0.0.
std::vector<double> sequential_sum(const std::vector<double> &v, int begin, int end, int n) {
    std::vector<double> out(n, 0.0);
    for (int r = begin; r < end; r++)
        for (int j = 0; j < n; j++) out[j] += v[(size_t)r * n + j];
    return out;
}

// Column 0 of rows taken in `order`, added one after another from 0.0.
double column0_sum(const std::vector<double> &v, int n, std::initializer_list<int> order) {
    double sum = 0.0;
    for (int g : order) sum += v[(size_t)g * n];
    return sum;
}

// The 6 rows of grain_rows summed in another order, or grouped, would not
// give `in_order` (the ordered sum's column 0).
void expect_other_orders_differ(const std::vector<double> &v, int n, double in_order) {
    EXPECT_NE(column0_sum(v, n, {5, 4, 3, 2, 1, 0}), in_order) << "reversed";
    EXPECT_NE(column0_sum(v, n, {0, 1, 2}) + column0_sum(v, n, {3, 4, 5}), in_order) << "halves";
    EXPECT_NE(column0_sum(v, n, {0, 3, 1, 4, 2, 5}), in_order) << "interleaved";
}

// Protects grain order on one rank: ordered_sum_doubles equals the
// sequential sum of the rows in order (not in any other order).
TEST(OrderedSum, OneRankAddsRowsInOrder) {
    std::mt19937 rng(7);
    const int rows = 6, n = 5;
    std::vector<double> v = grain_rows(rng, n), scratch((size_t)rows * n), out(n);
    Comm self;
    comm_attach_self(&self);
    ordered_sum_doubles(&self, COMM_SCOPE_WORLD, v.data(), rows, n, scratch.data(), out.data());
    std::vector<double> expected = sequential_sum(v, 0, rows, n);
    EXPECT_EQ(std::memcmp(out.data(), expected.data(), sizeof(double) * n), 0)
        << out[0] << " vs " << expected[0];
    expect_other_orders_differ(v, n, expected[0]);
}

class DistributedReduce : public ::testing::Test {
  protected:
    void SetUp() override {
        comm_attach_world(&comm);
        if (comm.world_size != 2) GTEST_SKIP() << "needs mpirun -n 2";
    }
    void TearDown() override { comm_free_groups(&comm); }
    // This rank's share when rank 0 holds the first k partials in global order.
    std::vector<float *> share(Partials &p, int k) {
        return comm.rank == 0 ? pointers(p, 0, k) : pointers(p, k, p.size());
    }
    Comm comm{};
};

// Protects layout independence across ranks: 12 partials split 6+6, 3+9,
// 1+11 (and 11+1, 0+12), in one chunk or many, give the bits of a 1-rank sum.
TEST_F(DistributedReduce, SplitOverRanksGivesTheOneRankBits) {
    std::mt19937 rng(8);  // the same seed on both ranks: the same partials
    const size_t n = 203;
    Partials p = mixed_partials(rng, kPartials, n);
    const std::vector<float> reference = self_sum(pointers(p), n);
    for (int k : {6, 3, 1, 11, 0}) {
        for (size_t capacity : {n, (size_t)50}) {
            std::vector<float> got =
                exact_sum(&comm, COMM_SCOPE_WORLD, share(p, k), kPartials, n, capacity);
            EXPECT_TRUE(SameBits(got, reference)) << "rank " << comm.rank << ", split " << k << "+"
                                                  << kPartials - k << ", capacity " << capacity;
        }
    }
}

// Protects the group scopes: the scope spanning both ranks (EP with groups of
// 2, EDP with groups of 1) sums across them like the world; the one-rank
// scope sums only this rank's partials.
// Protects the choice between the two distributed algorithms: up to 32
// partials in all their slices travel and are summed where they land, beyond
// that the int64 all-reduce runs; either gives the one-rank bits, also when
// the scratch holds only a few elements of each partial per chunk.
TEST_F(DistributedReduce, ManyPartialsGiveTheOneRankBitsToo) {
    std::mt19937 rng(13);
    const size_t n = 301;
    for (int count : {32, 33, 40}) {
        Partials p = mixed_partials(rng, count, n);
        const std::vector<float> reference = self_sum(pointers(p), n);
        for (int k : {count / 2, 5}) {
            for (size_t capacity : {n, (size_t)20, (size_t)3}) {
                std::vector<float> got =
                    exact_sum(&comm, COMM_SCOPE_WORLD, share(p, k), count, n, capacity);
                EXPECT_TRUE(SameBits(got, reference))
                    << count << " partials, rank " << comm.rank << " holds "
                    << (comm.rank == 0 ? k : count - k) << ", capacity " << capacity;
            }
        }
    }
}

TEST_F(DistributedReduce, GroupScopesAfterSplit) {
    std::mt19937 rng(9);
    const size_t n = 75;
    Partials p = mixed_partials(rng, kPartials, n);
    const std::vector<float> reference = self_sum(pointers(p), n);
    for (int ep_size : {2, 1}) {
        comm_split_groups(&comm, ep_size);
        CommScope across = ep_size == 2 ? COMM_SCOPE_EP : COMM_SCOPE_EDP;
        CommScope alone = ep_size == 2 ? COMM_SCOPE_EDP : COMM_SCOPE_EP;
        ASSERT_EQ(comm_scope_size(&comm, across), 2);
        ASSERT_EQ(comm_scope_size(&comm, alone), 1);
        for (int k : {6, 3}) {
            std::vector<float *> mine = share(p, k);
            EXPECT_TRUE(SameBits(exact_sum(&comm, across, mine, kPartials, n), reference))
                << "ep_size " << ep_size << ", split " << k << ", rank " << comm.rank;
            EXPECT_TRUE(
                SameBits(exact_sum(&comm, alone, mine, (long)mine.size(), n), self_sum(mine, n)))
                << "ep_size " << ep_size << ", split " << k << ", rank " << comm.rank;
        }
        comm_free_groups(&comm);
    }
}

// Protects the shared non-finite flag: an inf or NaN held by one rank makes
// the element NaN on both ranks, and leaves the other elements alone.
TEST_F(DistributedReduce, NonFiniteOnOneRankPoisonsTheElementEverywhere) {
    std::mt19937 rng(10);
    const size_t n = 29;
    Partials p = mixed_partials(rng, kPartials, n);
    p[9][2] = INFINITY;  // rank 1's with a 6+6 split
    p[1][26] = NAN;      // rank 0's, in the scalar tail
    const std::vector<float> reference = self_sum(pointers(p), n);
    ASSERT_TRUE(std::isnan(reference[2]) && std::isnan(reference[26]));
    std::vector<float> got = exact_sum(&comm, COMM_SCOPE_WORLD, share(p, 6), kPartials, n);
    EXPECT_TRUE(SameBits(got, reference)) << "rank " << comm.rank;
}

// Protects the overlapped gradient reduction across ranks: non-blocking
// buckets in flight together (started, tested, continued and completed in
// the interleaved order of the backward pass) give the bits of the blocking
// sum and of the 1-rank sum, for splits of the partials over the ranks, in
// place as in the model, with inf and NaN on either rank, denormals and -0.
TEST_F(DistributedReduce, BucketsInFlightGiveTheBlockingBits) {
    std::mt19937 rng(14);
    const size_t n = 203;
    Partials p = mixed_partials(rng, kPartials, n);
    p[9][2] = INFINITY;  // rank 1's with a 6+6 split
    p[1][26] = NAN;      // rank 0's
    p[0][40] = -0.0f;
    const std::vector<float> reference = self_sum(pointers(p), n);
    for (int k : {6, 3, 11, 0}) {
        const std::vector<float> blocking =
            exact_sum(&comm, COMM_SCOPE_WORLD, share(p, k), kPartials, n);
        ASSERT_TRUE(SameBits(blocking, reference)) << "split " << k;
        for (const auto &sizes : {std::vector<size_t>{n}, ragged_buckets(n)}) {
            EXPECT_TRUE(SameBits(
                bucketed_sum(&comm, COMM_SCOPE_WORLD, share(p, k), kPartials, sizes), blocking))
                << "rank " << comm.rank << ", split " << k << ", " << sizes.size() << " buckets";
            Partials copy = p;
            std::vector<float *> mine = share(copy, k);
            std::vector<float> out(n);
            float *target = mine.empty() ? out.data() : mine[0];
            bucketed_sum(&comm, COMM_SCOPE_WORLD, mine, kPartials, sizes, target);
            EXPECT_TRUE(SameBits(std::vector<float>(target, target + n), blocking))
                << "in place, rank " << comm.rank << ", split " << k;
        }
    }
    // With every rank's partial count given, buckets of up to 32 partials in
    // all take the sliced steps (when the received slices fit the scratch):
    // the same bits, in place too. Even and uneven splits, 2 to 6 partials.
    for (int count : {2, 4, 6}) {
        Partials q = mixed_partials(rng, count, n);
        q[0][2] = INFINITY;
        q[count - 1][5] = -0.0f;
        const std::vector<float> one_rank = self_sum(pointers(q), n);
        for (int k : {count / 2, 1}) {
            const int held[2] = {k, count - k};
            for (const auto &sizes : {std::vector<size_t>{n}, ragged_buckets(n)}) {
                EXPECT_TRUE(
                    SameBits(bucketed_sum(&comm, COMM_SCOPE_WORLD, share(q, k), count, sizes, held),
                             one_rank))
                    << count << " partials, rank " << comm.rank << ", split " << k << ", "
                    << sizes.size() << " buckets";
                Partials copy = q;
                std::vector<float *> mine = share(copy, k);
                bucketed_sum(&comm, COMM_SCOPE_WORLD, mine, count, sizes, mine[0], held);
                EXPECT_TRUE(SameBits(std::vector<float>(mine[0], mine[0] + n), one_rank))
                    << "in place, " << count << " partials, rank " << comm.rank;
            }
        }
    }
    // a scope of one rank (EDP with EP 2) sums its own partials at once
    comm_split_groups(&comm, 2);
    std::vector<float *> mine = share(p, 6);
    EXPECT_TRUE(SameBits(bucketed_sum(&comm, COMM_SCOPE_EDP, mine, 6, ragged_buckets(n)),
                         self_sum(mine, n)));
}

// Protects grain order across ranks: 3 rows per rank sum, on every rank, to
// the bits of the 1-rank sum of the 6 rows in global order.
TEST_F(DistributedReduce, OrderedSumMatchesTheOneRankOrder) {
    std::mt19937 rng(11);
    const int rows = 3, n = 4;
    std::vector<double> all = grain_rows(rng, n), scratch((size_t)2 * rows * n);
    std::vector<double> expected = sequential_sum(all, 0, 2 * rows, n), out(n);
    const double *mine = all.data() + (size_t)comm.rank * rows * n;
    ordered_sum_doubles(&comm, COMM_SCOPE_WORLD, mine, rows, n, scratch.data(), out.data());
    EXPECT_EQ(std::memcmp(out.data(), expected.data(), sizeof(double) * n), 0)
        << "rank " << comm.rank << ": " << out[0] << " vs " << expected[0];
    expect_other_orders_differ(all, n, expected[0]);  // e.g. each rank's rows first
    comm_split_groups(&comm, 2);
    std::fill(out.begin(), out.end(), 0.0);
    ordered_sum_doubles(&comm, COMM_SCOPE_EP, mine, rows, n, scratch.data(), out.data());
    EXPECT_EQ(std::memcmp(out.data(), expected.data(), sizeof(double) * n), 0)
        << "EP scope, rank " << comm.rank;
}

// Protects the lone-partial contract across ranks: when the scope's only
// partial lives on rank 0, rank 1 (n_partials 0) must still get it as the sum.
// Across ranks it goes through fixed point, which holds any normal float
// exactly (24 bits in 48); -0, denormals under DAZ and inf do not survive,
// so the values here are normal.
TEST_F(DistributedReduce, LonePartialReachesEveryRank) {
    std::mt19937 rng(12);
    std::uniform_real_distribution<double> decade(-20.0, 6.0);
    const size_t n = 13;
    Partials p(1, std::vector<float>(n));
    for (size_t i = 0; i < n; i++)
        p[0][i] = (i % 2 ? -1.0f : 1.0f) * (float)std::pow(10.0, decade(rng));
    std::vector<float> got = exact_sum(&comm, COMM_SCOPE_WORLD, share(p, 1), 1, n);
    EXPECT_TRUE(SameBits(got, p[0])) << "rank " << comm.rank;
}

}  // namespace
