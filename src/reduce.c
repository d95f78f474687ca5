#include "moesim/reduce.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fixed point puts an element's largest term just below 2^FIXED_BITS. */
#define FIXED_BITS 48
#define NON_FINITE 0xff /* the biased exponent of inf and NaN */

int exact_sum_init(ExactSum *x, size_t capacity) {
    memset(x, 0, sizeof *x);
    x->capacity = capacity ? capacity : 1; /* a chunk of 0 would never advance */
    x->exponent = malloc(x->capacity);
    x->fixed = malloc(sizeof(int64_t) * x->capacity);
    if (!x->exponent || !x->fixed) {
        exact_sum_free(x);
        return -1;
    }
    return 0;
}

void exact_sum_free(ExactSum *x) {
    free(x->exponent);
    free(x->fixed);
    memset(x, 0, sizeof *x);
}

size_t exact_sum_bytes(size_t capacity) {
    return capacity * (1 + sizeof(int64_t));
}

/* Four elements at a time: four floats, their exponents and shifts in
 * 32-bit lanes, the fixed-point sums in 64-bit lanes (one AVX register).
 * Unsigned 64-bit lanes: a non-finite term's bits are added before the
 * exponent masks them out, and unsigned wrap-around is defined where signed
 * overflow is not; two's complement makes the unsigned sum the signed one. */
#define LANES 4
typedef float f4 __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t u4 __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef int32_t i4 __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef double d4 __attribute__((vector_size(LANES * sizeof(double))));
typedef uint64_t ul4 __attribute__((vector_size(LANES * sizeof(uint64_t))));
typedef int64_t l4 __attribute__((vector_size(LANES * sizeof(int64_t))));

/* Round to the nearest integer by adding 1.5 * 2^52, which pushes the
 * fraction out of the mantissa; exact for |y| < 2^51, as here. The same
 * constant turns an integer below 2^51 into a double: add it to the bits. */
#define ROUNDING_MAGIC 6755399441055744.0 /* 1.5 * 2^52 */
#define ROUNDING_MAGIC_BITS 0x4338000000000000ull

/* The shift k that puts a float below 2^(e-126) (biased exponent e; zero
 * and denormals count as the smallest normal) just below 2^FIXED_BITS. */
static inline int fixed_shift(int biased) {
    return FIXED_BITS + 126 - (biased < 1 ? 1 : biased);
}

/* 2^k for |k| < 1000, from its bits: ldexp is a library call per element. */
static inline double pow2(int k) {
    uint64_t bits = (uint64_t)(1023 + k) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static inline int64_t to_fixed(float x, double scale) {
    double rounded = (double)x * scale + ROUNDING_MAGIC;
    uint64_t bits;
    memcpy(&bits, &rounded, sizeof bits);
    return (int64_t)(bits - ROUNDING_MAGIC_BITS);
}

static inline f4 load4(const float *p) {
    f4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The largest biased exponent of each lane over the partials at i. */
static inline u4 lane_exponents(float *const *partials, int n_partials, size_t i) {
    u4 e = {0};
    for (int p = 0; p < n_partials; p++) {
        u4 ep = ((u4)load4(partials[p] + i) >> 23) & 0xffu;
        u4 larger = (u4)(ep > e);
        e = (larger & ep) | (~larger & e);
    }
    return e;
}

/* 2^(sign * k) per lane, k the fixed-point shift of exponent e. */
static inline void lane_pow2(u4 e, int sign, d4 *out) {
    u4 small = (u4)(e < 1u);
    i4 biased = (i4)((small & 1u) | (~small & e));
    i4 k = (FIXED_BITS + 126) - biased;
    l4 exponent = __builtin_convertvector(1023 + sign * k, l4);
    *out = (d4)((ul4)exponent << 52);
}

static inline void lanes_to_fixed(float *const *partials, int n_partials, size_t i, const d4 *scale,
                                  ul4 *out) {
    const d4 magic = (d4){0} + ROUNDING_MAGIC;
    ul4 sum = {0};
    for (int p = 0; p < n_partials; p++)
        sum += (ul4)(__builtin_convertvector(load4(partials[p] + i), d4) * *scale + magic) -
               ROUNDING_MAGIC_BITS;
    *out = sum;
}

/* fixed * 2^-k to float per lane, NaN where a term was not finite. The
 * int64 goes to double as (hi - 2^31) * 2^32 + lo with hi and lo unsigned
 * 32-bit halves of fixed + 2^63, each exact, so the one rounding is the
 * last add's: the double a scalar conversion gives. */
static inline f4 lanes_from_fixed(const ul4 *fixed_in, const d4 *inverse, u4 e) {
    ul4 fixed = *fixed_in;
    const d4 magic = (d4){0} + ROUNDING_MAGIC;
    ul4 hi = ((fixed ^ 0x8000000000000000ull) >> 32) + ROUNDING_MAGIC_BITS;
    ul4 lo = (fixed & 0xffffffffu) + ROUNDING_MAGIC_BITS;
    d4 value = ((d4)hi - magic - 2147483648.0) * 4294967296.0 + ((d4)lo - magic);
    f4 out = __builtin_convertvector(value * *inverse, f4);
    u4 non_finite = (u4)(e == 0xffu);
    return (f4)((non_finite & (u4)((f4){0} + NAN)) | (~non_finite & (u4)out));
}

/* One element, scalar: the exponent, the fixed-point sum, the result. */
static int element_exponent(float *const *partials, int n_partials, size_t i) {
    uint32_t e = 0;
    for (int p = 0; p < n_partials; p++) {
        uint32_t u;
        memcpy(&u, &partials[p][i], sizeof u);
        uint32_t ep = (u >> 23) & 0xffu;
        e = e > ep ? e : ep;
    }
    return (int)e;
}

static int64_t element_fixed(float *const *partials, int n_partials, size_t i, int e) {
    if (e == NON_FINITE) return 0;
    double scale = pow2(fixed_shift(e));
    int64_t sum = 0;
    for (int p = 0; p < n_partials; p++) sum += to_fixed(partials[p][i], scale);
    return sum;
}

static float element_from_fixed(int64_t fixed, int e) {
    return e == NON_FINITE ? NAN : (float)((double)fixed * pow2(-fixed_shift(e)));
}

/* One rank holds every partial: the three steps per vector, in registers. */
static void sum_local_fixed(float *const *partials, int n_partials, size_t n, float *out) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        u4 e = lane_exponents(partials, n_partials, i);
        d4 scale, inverse;
        ul4 fixed;
        lane_pow2(e, 1, &scale);
        lane_pow2(e, -1, &inverse);
        lanes_to_fixed(partials, n_partials, i, &scale, &fixed);
        f4 result = lanes_from_fixed(&fixed, &inverse, e);
        memcpy(out + i, &result, sizeof result);
    }
    for (; i < n; i++) {
        int e = element_exponent(partials, n_partials, i);
        out[i] = element_from_fixed(element_fixed(partials, n_partials, i, e), e);
    }
}

/* Up to this many terms, each at most 2^FIXED_BITS in fixed point, sum to at
 * most 2^53: a double holds every partial sum exactly, so the sum can stay in
 * double, the same integer the int64 path forms, without its conversions. */
#define DOUBLE_SUM_MAX_TERMS (1 << (53 - FIXED_BITS))

/* Elements [i, i + LANES) of the sum in double. Inlined with a constant
 * count of partials, the loops over them unroll. */
static inline __attribute__((always_inline)) void sum_lanes_double(float *const *partials,
                                                                   int n_partials, size_t i,
                                                                   float *out) {
    const d4 magic = (d4){0} + ROUNDING_MAGIC;
    u4 e = lane_exponents(partials, n_partials, i);
    d4 scale, inverse;
    lane_pow2(e, 1, &scale);
    lane_pow2(e, -1, &inverse);
    d4 sum = {0};
    for (int p = 0; p < n_partials; p++)
        sum += (__builtin_convertvector(load4(partials[p] + i), d4) * scale + magic) - magic;
    f4 result = __builtin_convertvector(sum * inverse, f4);
    u4 non_finite = (u4)(e == 0xffu);
    result = (f4)((non_finite & (u4)((f4){0} + NAN)) | (~non_finite & (u4)result));
    memcpy(out + i, &result, sizeof result);
}

static void sum_local_double(float *const *partials, int n_partials, size_t n, float *out) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) sum_lanes_double(partials, n_partials, i, out);
    if (i < n) {
        float *tail[n_partials];
        for (int p = 0; p < n_partials; p++) tail[p] = partials[p] + i;
        sum_local_fixed(tail, n_partials, n - i, out + i);
    }
}

/* Two terms, eight elements at a time. Where each term is a normal float or
 * zero and their exponents are at most 24 apart, both terms are exact in
 * fixed point, and the one rounding of their exact sum to float is what
 * IEEE addition gives (flush-to-zero included: both flush a tiny sum with its
 * sign); two zeros sum to +0 in fixed point, so a float sum's -0 is cleared.
 * A vector with any other lane (a denormal, infinity or NaN, exponents
 * further apart, where fixed point rounds a term) takes the double path. */
#define TWO_LANES 8
typedef float f8 __attribute__((vector_size(TWO_LANES * sizeof(float))));
typedef uint32_t u8 __attribute__((vector_size(TWO_LANES * sizeof(uint32_t))));
typedef int32_t i8 __attribute__((vector_size(TWO_LANES * sizeof(int32_t))));

static void sum_two(float *const *partials, size_t n, float *out) {
    const float *a = partials[0], *b = partials[1];
    size_t i = 0;
    for (; i + TWO_LANES <= n; i += TWO_LANES) {
        f8 x, y; /* memcpy, not a helper returning f8: without AVX that changes the ABI */
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        u8 ux = (u8)x, uy = (u8)y;
        i8 ex = (i8)((ux >> 23) & 0xffu), ey = (i8)((uy >> 23) & 0xffu);
        i8 zero_x = (i8)((ux << 1) == 0), zero_y = (i8)((uy << 1) == 0);
        i8 normal_x = (ex >= 1) & (ex <= 254), normal_y = (ey >= 1) & (ey <= 254);
        i8 close = (ex - ey <= 24) & (ey - ex <= 24);
        i8 exact =
            (normal_x & normal_y & close) | (zero_x & (normal_y | zero_y)) | (zero_y & normal_x);
        int all = 1;
        for (int l = 0; l < TWO_LANES; l++) all &= exact[l] != 0;
        if (!all) {
            sum_lanes_double(partials, 2, i, out);
            sum_lanes_double(partials, 2, i + LANES, out);
            continue;
        }
        f8 sum = x + y;
        sum = (f8)((u8)sum & ~((u8)(zero_x & zero_y) & 0x80000000u));
        memcpy(out + i, &sum, sizeof sum);
    }
    float *rest[2] = {partials[0] + i, partials[1] + i};
    sum_local_double(rest, 2, n - i, out + i);
}

static void sum_local(float *const *partials, int n_partials, size_t n, float *out) {
    if (n_partials == 2)
        sum_two(partials, n, out);
    else if (n_partials <= DOUBLE_SUM_MAX_TERMS)
        sum_local_double(partials, n_partials, n, out);
    else
        sum_local_fixed(partials, n_partials, n, out);
}

static void max_exponents(uint8_t *exponent, float *const *partials, int n_partials, size_t n) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        u4 e = lane_exponents(partials, n_partials, i);
        for (int l = 0; l < LANES; l++) exponent[i + l] = (uint8_t)e[l];
    }
    for (; i < n; i++) exponent[i] = (uint8_t)element_exponent(partials, n_partials, i);
}

static inline u4 load_exponents(const uint8_t *exponent, size_t i) {
    return (u4){exponent[i], exponent[i + 1], exponent[i + 2], exponent[i + 3]};
}

static void add_fixed(int64_t *fixed, const uint8_t *exponent, float *const *partials,
                      int n_partials, size_t n) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        u4 e = load_exponents(exponent, i);
        d4 scale;
        ul4 sum;
        lane_pow2(e, 1, &scale);
        lanes_to_fixed(partials, n_partials, i, &scale, &sum);
        /* a non-finite term converts to garbage; the exponent flags it */
        sum &= (ul4) __builtin_convertvector((i4)(e != 0xffu), l4);
        memcpy(fixed + i, &sum, sizeof sum);
    }
    for (; i < n; i++) fixed[i] = element_fixed(partials, n_partials, i, exponent[i]);
}

static void from_fixed(float *out, const int64_t *fixed, const uint8_t *exponent, size_t n) {
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        u4 e = load_exponents(exponent, i);
        ul4 sum;
        memcpy(&sum, fixed + i, sizeof sum);
        d4 inverse;
        lane_pow2(e, -1, &inverse);
        f4 result = lanes_from_fixed(&sum, &inverse, e);
        memcpy(out + i, &result, sizeof result);
    }
    for (; i < n; i++) out[i] = element_from_fixed(fixed[i], exponent[i]);
}

static void check_partials(long total_partials) {
    if (total_partials > EXACT_SUM_MAX_PARTIALS) {
        fprintf(stderr,
                "moesim: internal error: an exact sum of %ld partials exceeds the %ld its "
                "fixed point holds (the trainer checks the grain count first)\n",
                total_partials, EXACT_SUM_MAX_PARTIALS);
        abort();
    }
}

/* A one-rank scope needs no collective: the sum at once. Returns 0 when the
 * scope has more ranks. */
static int sum_without_comm(const Comm *c, CommScope scope, float *const *partials,
                            int n_partials, long total_partials, size_t n, float *out) {
    if (comm_scope_size(c, scope) > 1) return 0;
    if (total_partials == 1) {
        if (n_partials == 1 && out != partials[0]) memcpy(out, partials[0], sizeof(float) * n);
    } else
        sum_local(partials, n_partials, n, out);
    return 1;
}

/* begin[r] .. begin[r+1]-1: rank r's slice of len elements. */
static void cut_slices(int *begin, size_t len, int ranks) {
    for (int r = 0; r <= ranks; r++) begin[r] = (int)(len * (size_t)r / (size_t)ranks);
}

/* out[first .. first+mine-1] <- the sum of this rank's n_own partials there
 * and the total - n_own received slices of `mine` elements each in recv. */
static void sum_slice(float *const *own, int n_own, int total, int first, int mine, float *recv,
                      float *out) {
    float *terms[DOUBLE_SUM_MAX_TERMS];
    int count = 0;
    for (int p = 0; p < n_own; p++) terms[count++] = own[p] + first;
    for (int p = 0; p < total - n_own; p++) terms[count++] = recv + (size_t)p * mine;
    if (mine > 0) sum_local(terms, count, (size_t)mine, out + first);
}

/* Largest chunk the sliced sum walks: its slice offsets are MPI's int. */
#define SLICED_CHUNK_MAX ((size_t)1 << 30)

/* The exact sum as a reduce-scatter of the partials themselves: each rank
 * receives every partial of its 1/R slice of a chunk, sums them locally (the
 * same function of the same terms, so the same bits as the fixed-point
 * all-reduce) and the slices are gathered. Floats cross the network once
 * each way, against a byte and an int64 all-reduce per element. The
 * received slices use the int64 scratch as floats: a chunk holds as many
 * elements as the scratch takes of every partial's share. Returns 0, having
 * summed nothing, beyond DOUBLE_SUM_MAX_TERMS partials or when the scratch
 * cannot hold one element of every partial per rank. */
static int sliced_sum(ExactSum *x, const Comm *c, CommScope scope, float *const *partials,
                      int n_partials, size_t n, float *out) {
    int ranks = comm_scope_size(c, scope), me = comm_scope_rank(c, scope), total = 0;
    int held[ranks], begin[ranks + 1]; /* on the stack: a failed malloc would split the ranks */
    comm_allgather_int(c, scope, n_partials, held);
    for (int r = 0; r < ranks; r++) total += held[r];
    size_t per_rank = 2 * x->capacity / (size_t)(total > 0 ? total : 1);
    size_t chunk = per_rank * (size_t)ranks;
    if (chunk > SLICED_CHUNK_MAX) chunk = SLICED_CHUNK_MAX;
    if (total == 0 || per_rank == 0 || total > DOUBLE_SUM_MAX_TERMS)
        return 0; /* shared values: every rank decides alike */
    float *recv = (float *)x->fixed;
    for (size_t off = 0; off < n; off += chunk) {
        size_t len = n - off < chunk ? n - off : chunk;
        cut_slices(begin, len, ranks);
        float *chunk_partials[n_partials > 0 ? n_partials : 1];
        for (int p = 0; p < n_partials; p++) chunk_partials[p] = partials[p] + off;
        comm_scatter_slices(c, scope, chunk_partials, n_partials, begin, held, recv);
        sum_slice(chunk_partials, n_partials, total, begin[me], begin[me + 1] - begin[me], recv,
                  out + off);
        comm_allgather_slices(c, scope, out + off, begin);
    }
    return 1;
}

void exact_sum_floats(ExactSum *x, const Comm *c, CommScope scope, float *const *partials,
                      int n_partials, long total_partials, size_t n, float *out) {
    check_partials(total_partials);
    if (sum_without_comm(c, scope, partials, n_partials, total_partials, n, out)) return;
    if (sliced_sum(x, c, scope, partials, n_partials, n, out)) return;
    /* Chunks bound the scratch; every rank walks the same chunks. */
    for (size_t off = 0; off < n; off += x->capacity) {
        size_t len = n - off < x->capacity ? n - off : x->capacity;
        float *chunk[n_partials > 0 ? n_partials : 1];
        for (int p = 0; p < n_partials; p++) chunk[p] = partials[p] + off;
        max_exponents(x->exponent, chunk, n_partials, len);
        comm_max_bytes(c, scope, x->exponent, len);
        add_fixed(x->fixed, x->exponent, chunk, n_partials, len);
        comm_sum_int64(c, scope, x->fixed, len);
        from_fixed(out + off, x->fixed, x->exponent, len);
    }
}

/* The bucket's partials, each from the bucket's first element. */
static void bucket_partials(const ExactSumAsync *a, float **bucket) {
    for (int p = 0; p < a->n_partials; p++) bucket[p] = a->partials[p] + a->offset;
}

/* The sliced steps for a bucket, when held is given, every partial fits the
 * double path and the received slices fit the int64 scratch (2n floats):
 * decided from values every rank shares. Returns 0 when not. */
static int start_sliced(ExactSumAsync *a, float *const *bucket) {
    int ranks = comm_scope_size(a->comm, a->scope);
    if (!a->held) return 0;
    for (int r = 0; r < ranks; r++) a->total += a->held[r];
    size_t widest = (a->n + (size_t)ranks - 1) / (size_t)ranks;
    if (a->total == 0 || a->total > DOUBLE_SUM_MAX_TERMS || (size_t)a->total * widest > 2 * a->n)
        return 0;
    a->slices = malloc(sizeof(int) * (size_t)(2 * ranks + 1));
    if (!a->slices) {
        fprintf(stderr, "moesim: out of memory for the slices of an exact sum\n");
        abort(); /* every rank must take the same steps: none may fall back alone */
    }
    cut_slices(a->slices, a->n, ranks);
    comm_iscatter_slices(a->comm, a->scope, bucket, a->n_partials, a->slices, a->held,
                         (float *)a->fixed, &a->messages, &a->n_messages);
    a->stage = EXACT_SUM_SLICES;
    return 1;
}

void exact_sum_start(ExactSumAsync *a, const Comm *c, CommScope scope, float *const *partials,
                     int n_partials, long total_partials, size_t offset, size_t n, float *out,
                     uint8_t *exponent, int64_t *fixed, const int *held) {
    check_partials(total_partials);
    *a = (ExactSumAsync){.comm = c,
                         .scope = scope,
                         .partials = partials,
                         .n_partials = n_partials,
                         .offset = offset,
                         .n = n,
                         .out = out,
                         .exponent = exponent,
                         .fixed = fixed,
                         .stage = EXACT_SUM_DONE,
                         .request = MPI_REQUEST_NULL,
                         .held = held};
    float *bucket[n_partials > 0 ? n_partials : 1];
    bucket_partials(a, bucket);
    if (sum_without_comm(c, scope, bucket, n_partials, total_partials, n, out)) return;
    if (start_sliced(a, bucket)) return;
    max_exponents(exponent, bucket, n_partials, n);
    comm_imax_bytes(c, scope, exponent, n, &a->request);
    a->stage = EXACT_SUM_EXPONENTS;
}

static int messages_done(const ExactSumAsync *a) {
    for (int i = 0; i < a->n_messages; i++)
        if (a->messages[i] != MPI_REQUEST_NULL) return 0;
    return 1;
}

int exact_sum_test(ExactSumAsync *a) {
    if (!a->arrived && a->stage == EXACT_SUM_SLICES) {
        comm_test_all(a->messages, a->n_messages);
        a->arrived = messages_done(a);
    } else if (!a->arrived && a->stage != EXACT_SUM_DONE) {
        a->arrived = comm_test(&a->request);
    }
    return a->arrived || a->stage == EXACT_SUM_DONE;
}

static void wait_for_stage(ExactSumAsync *a) {
    if (a->stage == EXACT_SUM_SLICES)
        comm_wait_all(a->messages, a->n_messages);
    else if (!a->arrived)
        comm_wait(&a->request);
    a->arrived = 0;
}

/* Every partial of this rank's slice is here: its sum, then the gather. */
static void continue_sliced(ExactSumAsync *a) {
    wait_for_stage(a);
    free(a->messages);
    a->messages = NULL;
    a->n_messages = 0;
    int ranks = comm_scope_size(a->comm, a->scope), me = comm_scope_rank(a->comm, a->scope);
    float *bucket[a->n_partials > 0 ? a->n_partials : 1];
    bucket_partials(a, bucket);
    sum_slice(bucket, a->n_partials, a->total, a->slices[me], a->slices[me + 1] - a->slices[me],
              (float *)a->fixed, a->out);
    comm_iallgather_slices(a->comm, a->scope, a->out, a->slices, a->slices + ranks + 1,
                           &a->request);
    a->stage = EXACT_SUM_GATHER;
}

void exact_sum_continue(ExactSumAsync *a) {
    if (a->stage == EXACT_SUM_SLICES) {
        continue_sliced(a);
        return;
    }
    if (a->stage != EXACT_SUM_EXPONENTS) return;
    wait_for_stage(a);
    float *bucket[a->n_partials > 0 ? a->n_partials : 1];
    bucket_partials(a, bucket);
    add_fixed(a->fixed, a->exponent, bucket, a->n_partials, a->n);
    comm_isum_int64(a->comm, a->scope, a->fixed, a->n, &a->request);
    a->stage = EXACT_SUM_FIXED;
}

void exact_sum_complete(ExactSumAsync *a) {
    exact_sum_continue(a);
    if (exact_sum_last_stage(a)) wait_for_stage(a);
    if (a->stage == EXACT_SUM_FIXED) from_fixed(a->out, a->fixed, a->exponent, a->n);
    free(a->slices);
    a->slices = NULL;
    a->stage = EXACT_SUM_DONE;
}

void ordered_sum_doubles(const Comm *c, CommScope scope, const double *mine, int rows, int n,
                         double *scratch, double *out) {
    int ranks = comm_scope_size(c, scope);
    if (ranks > 1)
        comm_allgather_doubles(c, scope, mine, scratch, rows * n);
    else
        memcpy(scratch, mine, sizeof(double) * (size_t)rows * n);
    for (int j = 0; j < n; j++) out[j] = 0.0;
    for (long g = 0; g < (long)ranks * rows; g++)
        for (int j = 0; j < n; j++) out[j] += scratch[g * n + j];
}
