/* vecmath: short float vectors (GCC vector extensions) and an exp on them,
 * for the elementwise hot loops (activations, softmax rows, AdamW).
 *
 * Why not expf in a loop: glibc only offers its vector expf under
 * -ffast-math, and -O2 does not vectorise loops of unknown length, so the
 * activations ran one scalar expf call per value. Why vector extensions
 * rather than intrinsics: the sanitizer build has no -march, and the same
 * code then runs as SSE with 4 lanes instead of AVX with 8.
 *
 * Every lane computes exactly what a lone value would (no FMA contraction
 * in ISO C mode, no cross-lane arithmetic), so a result never depends on
 * how many values share a loop or where a value sits in it: per-token
 * results stay independent of the layout. Loop tails go through the same
 * vector code on a padded copy (vec_load_partial / vec_store_partial). */
#ifndef MOESIM_VECMATH_H
#define MOESIM_VECMATH_H

#include <immintrin.h>
#include <string.h>

#if defined(__AVX__)
#define VEC_LANES 8
#else
#define VEC_LANES 4
#endif

typedef float vec_f __attribute__((vector_size(VEC_LANES * sizeof(float))));
typedef int vec_i __attribute__((vector_size(VEC_LANES * sizeof(int))));

/* Double lanes for sums that stay in double, held as two halves: VEC_LANES
 * doubles are wider than any register of the build, and as one vector GCC
 * kept them on the stack, a store and reload per step (grad_sum_squares
 * took 5% of a step). Lane l is lo[l] below VEC_LANES / 2, else hi. */
typedef double vec_dh __attribute__((vector_size(VEC_LANES / 2 * sizeof(double))));
typedef float vec_fh __attribute__((vector_size(VEC_LANES / 2 * sizeof(float))));
typedef struct vec_d {
    vec_dh lo, hi;
} vec_d;

#if VEC_LANES == 8
#define VEC_LO(v) __builtin_shufflevector((v), (v), 0, 1, 2, 3)
#define VEC_HI(v) __builtin_shufflevector((v), (v), 4, 5, 6, 7)
#else
#define VEC_LO(v) __builtin_shufflevector((v), (v), 0, 1)
#define VEC_HI(v) __builtin_shufflevector((v), (v), 2, 3)
#endif
#define vec_half_to_double(h) __builtin_convertvector((vec_fh)(h), vec_dh)

/* acc += a, lane by lane, in double. */
static inline void vec_d_add(vec_d *acc, vec_f a) {
    acc->lo += vec_half_to_double(VEC_LO(a));
    acc->hi += vec_half_to_double(VEC_HI(a));
}

/* acc += a * b, lane by lane, the product in double. */
static inline void vec_d_add_product(vec_d *acc, vec_f a, vec_f b) {
    acc->lo += vec_half_to_double(VEC_LO(a)) * vec_half_to_double(VEC_LO(b));
    acc->hi += vec_half_to_double(VEC_HI(a)) * vec_half_to_double(VEC_HI(b));
}

/* acc += a * b * c, lane by lane, (a * b) * c in double. */
static inline void vec_d_add_product3(vec_d *acc, vec_f a, vec_f b, vec_f c) {
    acc->lo += vec_half_to_double(VEC_LO(a)) * vec_half_to_double(VEC_LO(b)) *
               vec_half_to_double(VEC_LO(c));
    acc->hi += vec_half_to_double(VEC_HI(a)) * vec_half_to_double(VEC_HI(b)) *
               vec_half_to_double(VEC_HI(c));
}

/* The lanes added in order. */
static inline double vec_d_sum(const vec_d *lanes) {
    double sum = 0.0;
    for (int i = 0; i < VEC_LANES / 2; i++) sum += lanes->lo[i];
    for (int i = 0; i < VEC_LANES / 2; i++) sum += lanes->hi[i];
    return sum;
}

static inline vec_f vec_splat(float x) {
    return (vec_f){0} + x;
}

static inline vec_f vec_load(const float *p) {
    vec_f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* sum a[i] * b[i] in double: lane l sums the products at l, l + VEC_LANES,
 * ..., then the lanes in order, then the tail. The order depends only on n.
 * With b = a it is the sum of squares. */
static inline double dot_double(const float *a, const float *b, size_t n) {
    vec_d lanes = {{0}, {0}};
    size_t i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES)
        vec_d_add_product(&lanes, vec_load(a + i), vec_load(b + i));
    double sum = vec_d_sum(&lanes);
    for (; i < n; i++) sum += (double)a[i] * b[i];
    return sum;
}

static inline void vec_store(float *p, vec_f v) {
    memcpy(p, &v, sizeof v);
}

/* The first n < VEC_LANES values of p, the other lanes set to fill. */
static inline vec_f vec_load_partial(const float *p, int n, float fill) {
    float buf[VEC_LANES];
    for (int i = 0; i < VEC_LANES; i++) buf[i] = i < n ? p[i] : fill;
    return vec_load(buf);
}

static inline void vec_store_partial(float *p, vec_f v, int n) {
    float buf[VEC_LANES];
    vec_store(buf, v);
    memcpy(p, buf, sizeof(float) * (size_t)n);
}

/* Lanes of yes where mask is set (all ones, as comparisons give), else of no. */
static inline vec_f vec_select(vec_i mask, vec_f yes, vec_f no) {
    return (vec_f)((mask & (vec_i)yes) | (~mask & (vec_i)no));
}

static inline vec_f vec_max(vec_f a, vec_f b) {
    return vec_select(a > b, a, b);
}

static inline float vec_hmax(vec_f v) {
    float m = v[0];
    for (int i = 1; i < VEC_LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline vec_f vec_abs(vec_f x) {
    return (vec_f)((vec_i)x & 0x7fffffff);
}

/* Correctly rounded like sqrtf. The instruction is named because a loop
 * of sqrtf does not vectorise (sqrtf may set errno). */
static inline vec_f vec_sqrt(vec_f x) {
#if defined(__AVX__)
    return (vec_f)_mm256_sqrt_ps((__m256)x);
#else
    return (vec_f)_mm_sqrt_ps((__m128)x);
#endif
}

/* x with the sign of s. */
static inline vec_f vec_copysign(vec_f x, vec_f s) {
    return (vec_f)(((vec_i)x & 0x7fffffff) | ((vec_i)s & ~0x7fffffff));
}

/* exp(x) lane by lane: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and
 * Cephes' degree-6 polynomial for exp(r); within 2 ulp of expf over the
 * normal range. Overflow gives +inf and NaN stays NaN like expf; results
 * below FLT_MIN (x < log FLT_MIN = -87.34) are flushed to 0. */
static inline vec_f vec_exp(vec_f x) {
    const float round_magic = 12582912.0f;    /* 1.5 * 2^23: adding it rounds to an integer */
    const float lowest = -87.33654f;          /* log(FLT_MIN) */
    const float highest = 88.72283935546875f; /* the largest x with a finite expf */
    vec_f xc = vec_select(x < lowest, vec_splat(lowest), x);
    xc = vec_select(xc > highest, vec_splat(highest), xc);
    vec_f t = xc * 1.44269504088896341f + round_magic;
    vec_f n = t - round_magic;
    vec_i ni = (vec_i)t - (vec_i)vec_splat(round_magic); /* n as an integer, -126..128 */
    /* ln2 in two parts; n * 0.693359375 is exact (9 + 8 significant bits). */
    vec_f r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec_f p = vec_splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    /* 2^128 has no float: the top lanes take 2^127 and double p instead. */
    vec_i top = ni > 127;
    p = vec_select(top, p * 2.0f, p);
    ni = ni + top;
    vec_f y = p * (vec_f)((ni + 127) << 23);
    y = vec_select(x < lowest, vec_splat(0.0f), y);
    y = vec_select(x > highest, vec_splat(__builtin_inff()), y);
    return vec_select(x != x, x, y);
}

/* 1 / (1 + exp(-x)) */
static inline vec_f vec_sigmoid(vec_f x) {
    return 1.0f / (1.0f + vec_exp(-x));
}

/* tanh through one exp of a non-positive argument (no overflow). */
static inline vec_f vec_tanh(vec_f u) {
    vec_f e = vec_exp(-2.0f * vec_abs(u));
    return vec_copysign((1.0f - e) / (1.0f + e), u);
}

#endif
