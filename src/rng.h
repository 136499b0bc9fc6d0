/* Deterministic random numbers: xoshiro256** seeded by splitmix64. Every
 * artifact drawn from a seed (rotations, k-means seeding) uses this, so the
 * same seed gives the same artifact on every machine. State lives in the
 * caller; nothing global. */
#ifndef BS_RNG_H
#define BS_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct bs_rng {
    uint64_t s[4];
} bs_rng;

static inline uint64_t bs_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline void bs_rng_seed(bs_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = bs_splitmix64(&seed);
}

static inline uint64_t bs_rotl64(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t bs_rng_next(bs_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = bs_rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = bs_rotl64(s[3], 45);
    return result;
}

/* Uniform double in [0, 1) with 53 random bits. */
static inline double bs_rng_uniform(bs_rng *r) {
    return (double)(bs_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform integer in [0, n), n >= 1 (Lemire's method without bias). */
static inline uint64_t bs_rng_below(bs_rng *r, uint64_t n) {
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = bs_rng_next(r);
        if (x >= threshold) return x % n;
    }
}

/* Standard normal by Box-Muller (one value per call; the pair's twin is
 * dropped so the stream does not depend on call parity). */
static inline double bs_rng_normal(bs_rng *r) {
    double u1 = bs_rng_uniform(r), u2 = bs_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925 * u2);
}

#endif
