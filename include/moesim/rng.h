/* rng: counter-based randomness. Every random draw in moesim is a pure
 * function of (seed, purpose, indices), so results never depend on the order
 * in which ranks or loops ask for them. */
#ifndef MOESIM_RNG_H
#define MOESIM_RNG_H

#include <math.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* splitmix64's finaliser: a bijective, well-mixed 64-bit hash. */
static inline uint64_t rng_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t rng_hash3(uint64_t a, uint64_t b, uint64_t c) {
    return rng_mix64(rng_mix64(rng_mix64(a) ^ b) ^ c);
}

static inline uint64_t rng_hash_string(uint64_t seed, const char *s) {
    uint64_t h = rng_mix64(seed);
    for (; *s; s++) h = rng_mix64(h ^ (unsigned char)*s);
    return h;
}

/* A sequential stream: state advances by one per draw. */
typedef struct Rng {
    uint64_t state;
} Rng;

static inline uint64_t rng_next(Rng *r) {
    r->state += 0x9e3779b97f4a7c15ull;
    uint64_t x = r->state;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
static inline double rng_uniform(Rng *r) {
    return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Standard normal by Box-Muller (one value per call, the pair's partner dropped). */
static inline double rng_normal(Rng *r) {
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

#ifdef __cplusplus
}
#endif
#endif
