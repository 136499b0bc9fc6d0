/* Fork-join over a fixed number of workers, for the build's loops (k-means,
 * assignment). Work is split by worker index, never by which thread happens
 * to be free, so a result cannot depend on scheduling or on how many
 * threads the system let us start. */
#ifndef BS_PARALLEL_H
#define BS_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

/* fn(ctx, w, n) for every w in [0, n): w = 0 on the calling thread, the
 * others on threads started for the call and joined before the return. A
 * share whose thread cannot be started runs on the caller after its own,
 * so every w runs exactly once whatever happens. n == 0 is taken as 1. */
typedef void (*bs_worker_fn)(void *ctx, uint32_t w, uint32_t n);
void bs_parallel_run(uint32_t n, bs_worker_fn fn, void *ctx);

/* Rows [*begin, *end) of worker w of n over `rows` rows in units of
 * `block` rows: contiguous, in worker order, sizes differing by at most one
 * block. */
void bs_parallel_share(size_t rows, size_t block, uint32_t w, uint32_t n,
                       size_t *begin, size_t *end);

/* The most workers a build loop uses (a guard against absurd requests). */
#define BS_MAX_THREADS 256u

#endif
