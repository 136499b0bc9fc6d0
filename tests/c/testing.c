#include "testing.h"

#include <math.h>

int bs_test_failures = 0;

uint64_t test_rand_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double test_rand_uniform(uint64_t *state) {
    return (double)(test_rand_u64(state) >> 11) * (1.0 / 9007199254740992.0);
}

double test_rand_normal(uint64_t *state) {
    double u1 = test_rand_uniform(state), u2 = test_rand_uniform(state);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
