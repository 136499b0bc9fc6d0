/* A tiny test harness: CHECK records a failure and continues; main returns
 * the failure count. */
#ifndef BS_TESTING_H
#define BS_TESTING_H

#include <stdint.h>
#include <stdio.h>

extern int bs_test_failures;

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,   \
                    #cond);                                                    \
            bs_test_failures++;                                                \
        }                                                                      \
    } while (0)

#define CHECK_MSG(cond, ...)                                                   \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__,   \
                    #cond);                                                    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
            bs_test_failures++;                                                \
        }                                                                      \
    } while (0)

/* Deterministic test randomness (splitmix64). */
uint64_t test_rand_u64(uint64_t *state);
/* Uniform in [0, 1). */
double test_rand_uniform(uint64_t *state);
/* Standard normal. */
double test_rand_normal(uint64_t *state);

#define TEST_MAIN_END()                                                        \
    do {                                                                       \
        if (bs_test_failures)                                                  \
            fprintf(stderr, "%d check(s) failed\n", bs_test_failures);         \
        return bs_test_failures ? 1 : 0;                                       \
    } while (0)

#endif
