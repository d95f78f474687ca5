#include "moesim/reduce.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/vecmath.h"

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

typedef uint32_t vec_u __attribute__((vector_size(VEC_LANES * sizeof(uint32_t))));
/* Unsigned lanes: a non-finite term's bits are added before the exponent
 * masks them out, and unsigned wrap-around is defined where signed overflow
 * is not. Two's complement makes the unsigned sum the signed one. */
typedef uint64_t vec_ul __attribute__((vector_size(VEC_LANES * sizeof(uint64_t))));

static inline vec_u biased_exponent(vec_f v) {
    return ((vec_u)v >> 23) & 0xffu;
}

/* exponent[i] = the largest biased exponent of element i over the partials. */
static void max_exponents(uint8_t *exponent, float *const *partials, int n_partials, size_t n) {
    size_t i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) {
        vec_u e = {0};
        for (int p = 0; p < n_partials; p++) {
            vec_u ep = biased_exponent(vec_load(partials[p] + i));
            vec_u larger = (vec_u)(ep > e);
            e = (larger & ep) | (~larger & e);
        }
        for (int l = 0; l < VEC_LANES; l++) exponent[i + l] = (uint8_t)e[l];
    }
    for (; i < n; i++) {
        uint32_t e = 0;
        for (int p = 0; p < n_partials; p++) {
            uint32_t u;
            memcpy(&u, &partials[p][i], sizeof u);
            uint32_t ep = (u >> 23) & 0xffu;
            e = e > ep ? e : ep;
        }
        exponent[i] = (uint8_t)e;
    }
}

/* Round to the nearest integer by adding 1.5 * 2^52, which pushes the
 * fraction out of the mantissa; exact for |y| < 2^51, as here. */
#define ROUNDING_MAGIC 6755399441055744.0 /* 1.5 * 2^52 */

/* The scale 2^k that puts a float below 2^(e-126) (biased exponent e; zero
 * and denormals count as the smallest normal) just below 2^FIXED_BITS. */
static double fixed_scale(int biased) {
    return ldexp(1.0, FIXED_BITS + 126 - (biased < 1 ? 1 : biased));
}

static void add_fixed(int64_t *fixed, const uint8_t *exponent, float *const *partials,
                      int n_partials, size_t n) {
    size_t i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) {
        vec_d scale;
        for (int l = 0; l < VEC_LANES; l++) scale[l] = fixed_scale(exponent[i + l]);
        const vec_d magic = (vec_d){0} + ROUNDING_MAGIC;
        vec_ul sum = {0};
        for (int p = 0; p < n_partials; p++)
            sum +=
                (vec_ul)(vec_to_double(vec_load(partials[p] + i)) * scale + magic) - (vec_ul)magic;
        /* a non-finite term would convert to garbage; the exponent flags it */
        for (int l = 0; l < VEC_LANES; l++)
            fixed[i + l] = exponent[i + l] == NON_FINITE ? 0 : (int64_t)sum[l];
    }
    for (; i < n; i++) {
        if (exponent[i] == NON_FINITE) {
            fixed[i] = 0;
            continue;
        }
        double scale = fixed_scale(exponent[i]);
        int64_t sum = 0;
        for (int p = 0; p < n_partials; p++) {
            double rounded = (double)partials[p][i] * scale + ROUNDING_MAGIC;
            int64_t bits, magic_bits;
            double magic = ROUNDING_MAGIC;
            memcpy(&bits, &rounded, sizeof bits);
            memcpy(&magic_bits, &magic, sizeof magic_bits);
            sum += bits - magic_bits;
        }
        fixed[i] = sum;
    }
}

static void from_fixed(float *out, const int64_t *fixed, const uint8_t *exponent, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (exponent[i] == NON_FINITE) {
            out[i] = NAN;
            continue;
        }
        out[i] = (float)((double)fixed[i] / fixed_scale(exponent[i]));
    }
}

void exact_sum_floats(ExactSum *x, const Comm *c, CommScope scope, float *const *partials,
                      int n_partials, long total_partials, size_t n, float *out) {
    if (total_partials > EXACT_SUM_MAX_PARTIALS) {
        fprintf(stderr,
                "moesim: internal error: an exact sum of %ld partials exceeds the %ld its "
                "fixed point holds (the trainer checks the grain count first)\n",
                total_partials, EXACT_SUM_MAX_PARTIALS);
        abort();
    }
    if (total_partials == 1 && comm_scope_size(c, scope) == 1) {
        if (n_partials == 1 && out != partials[0]) memcpy(out, partials[0], sizeof(float) * n);
        return;
    }
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
