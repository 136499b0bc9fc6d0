/* See parallel.h. Threads are started per call: the loops that use this run
 * for milliseconds to seconds, against ~20 us to start and join a thread,
 * and a pool would be process-wide state. */
#include "parallel.h"

#include <pthread.h>
#include <stddef.h>

typedef struct job {
    bs_worker_fn fn;
    void *ctx;
    uint32_t w, n;
} job;

static void *run_job(void *arg) {
    job *j = arg;
    j->fn(j->ctx, j->w, j->n);
    return NULL;
}

void bs_parallel_run(uint32_t n, bs_worker_fn fn, void *ctx) {
    if (n == 0) n = 1;
    if (n > BS_MAX_THREADS) n = BS_MAX_THREADS;
    job jobs[BS_MAX_THREADS];
    pthread_t tid[BS_MAX_THREADS];
    unsigned char started[BS_MAX_THREADS];
    for (uint32_t w = 1; w < n; w++) {
        jobs[w] = (job){fn, ctx, w, n};
        started[w] = pthread_create(&tid[w], NULL, run_job, &jobs[w]) == 0;
    }
    fn(ctx, 0, n);
    for (uint32_t w = 1; w < n; w++) {
        if (started[w])
            pthread_join(tid[w], NULL);
        else
            fn(ctx, w, n);
    }
}

void bs_parallel_share(size_t rows, size_t block, uint32_t w, uint32_t n,
                       size_t *begin, size_t *end) {
    if (block == 0) block = 1;
    if (n == 0) n = 1;
    size_t blocks = rows / block + (rows % block != 0);
    size_t q = blocks / n, r = blocks % n;
    size_t b0 = (size_t)w * q + (w < r ? w : r);
    size_t b1 = b0 + q + (w < r);
    *begin = b0 * block < rows ? b0 * block : rows;
    *end = b1 * block < rows ? b1 * block : rows;
}
