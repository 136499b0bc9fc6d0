/* Encoding throughput of bs_rabitq_encode on Gaussian residuals, one core.
 * Usage: bench_encode [n] [D]   (defaults 100000 768); prints vectors/s for
 * B = 1, 2, 4, 6, 9 and the time 1M vectors would take. */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "rabitq.h"
#include "rng.h"

/* Thread CPU time: shared machines would otherwise charge other
 * processes' time slices to the encoder. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 100000;
    uint32_t D = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 768;
    if (n == 0 || D == 0 || D % 64 != 0) {
        fprintf(stderr, "usage: bench_encode [n >= 1] [D multiple of 64]\n");
        return 2;
    }
    /* A pool of distinct residuals reused cyclically: encoding cost does not
     * depend on which Gaussian vector it sees, and the pool stays small. */
    const size_t pool = 1024;
    float *r = malloc(pool * D * sizeof *r);
    float *scratch = malloc(2 * (size_t)D * sizeof *scratch);
    uint8_t *bits = malloc(bs_code_bytes(D));
    uint8_t *ext = malloc(bs_ext_bytes(D, 9));
    if (!r || !scratch || !bits || !ext) return 1;
    bs_rng rng;
    bs_rng_seed(&rng, 1);
    for (size_t i = 0; i < pool * D; i++) r[i] = (float)bs_rng_normal(&rng);
    const uint32_t Bs[] = {1, 2, 4, 6, 9};
    for (size_t bi = 0; bi < sizeof Bs / sizeof Bs[0]; bi++) {
        uint32_t B = Bs[bi];
        bs_factors f;
        double sink = 0.0;
        double t0 = now_s();
        for (size_t i = 0; i < n; i++) {
            bs_rabitq_encode(r + (i % pool) * D, D, B, bits, ext, &f, scratch);
            sink += f.s_full;
        }
        double dt = now_s() - t0;
        printf("encode D=%u B=%u: %.0f vectors/s (%.1f s per 1M) [%g]\n", D, B,
               (double)n / dt, dt * 1e6 / (double)n, sink > 0 ? 0.0 : 1.0);
    }
    free(r);
    free(scratch);
    free(bits);
    free(ext);
    return 0;
}
