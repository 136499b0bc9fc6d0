/* Throughput of the FastScan kernels in codes per second, one thread.
 * For D = 128, 768, 1536 and every kernel this CPU supports:
 *   - "L2": ~192 KiB of packed codes scanned again and again (a partition
 *     that stays in the core's L2);
 *   - "DRAM": 512 MiB of packed codes, far beyond L3, streamed once per
 *     pass.
 * Rates are codes per second of thread CPU time, best of 5 rounds.
 * Usage: bench_fastscan [seconds per measurement, default 1]. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rabitq.h"

/* Thread CPU time: the machines that run this are shared, and wall time
 * would charge other processes' time slices to the kernel. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Codes per second of kernel over nblocks blocks: the best of 5 rounds,
 * each repeating the scan for at least seconds / 5 (at least one pass), so
 * that a round disturbed by a neighbour does not count. The clock is read
 * every few calls only: reading it is a system call. The checksum keeps
 * the work observable. */
static double measure(bs_fastscan_fn kernel, const uint8_t *blocks,
                      size_t nblocks, const uint8_t *lut, uint32_t D,
                      uint32_t *out, double seconds, uint64_t *checksum) {
    const size_t batch = nblocks >= 1024 ? 1 : 16;
    double best = 0.0;
    for (int round = 0; round < 5; round++) {
        size_t passes = 0;
        double t0 = now_s(), dt;
        do {
            for (size_t b = 0; b < batch; b++) kernel(blocks, nblocks, lut, D, out);
            *checksum += out[passes % (nblocks * 32)];
            passes += batch;
            dt = now_s() - t0;
        } while (dt < seconds / 5);
        double rate = (double)passes * (double)nblocks * 32.0 / dt;
        if (rate > best) best = rate;
    }
    return best;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    if (!(seconds > 0.0)) seconds = 1.0;
    const uint32_t dims[] = {128, 768, 1536};
    const size_t l2_bytes = 192u << 10, dram_bytes = (size_t)512 << 20;
    const bs_simd_level levels[] = {BS_SIMD_SCALAR, BS_SIMD_AVX2,
                                    BS_SIMD_AVX512};
    uint64_t seed = 7, checksum = 0;

    uint8_t *big = malloc(dram_bytes);
    if (big == NULL) return 1;
    /* Random bytes are valid packed codes (any nibble is a code). */
    for (size_t i = 0; i < dram_bytes / 8; i++) {
        uint64_t v = next_u64(&seed);
        memcpy(big + 8 * i, &v, 8);
    }
    printf("%-8s %6s %-6s %14s\n", "kernel", "D", "codes", "M codes/s");
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const uint32_t D = dims[di];
        const size_t bb = bs_fastscan_block_bytes(D);
        uint8_t *lut = malloc((size_t)D / 4 * 16);
        float *x = malloc(D * sizeof *x);
        const size_t nb_l2 = l2_bytes / bb, nb_dram = dram_bytes / bb;
        uint32_t *out = malloc(nb_dram * 32 * sizeof *out);
        if (!lut || !x || !out) return 1;
        for (uint32_t i = 0; i < D; i++)
            x[i] = (float)((double)(next_u64(&seed) >> 11) / 9007199254740992.0 - 0.5);
        bs_query_lut lq = {lut, 0, 0, 0};
        bs_query_lut_build(x, D, &lq);
        for (size_t li = 0; li < sizeof levels / sizeof levels[0]; li++) {
            if (!bs_simd_supported(levels[li])) {
                printf("%-8s %6u (not supported by this CPU)\n",
                       bs_simd_name(levels[li]), D);
                continue;
            }
            bs_fastscan_fn k = bs_fastscan_kernel(levels[li]);
            /* Warm the L2 working set before timing it. */
            k(big, nb_l2, lut, D, out);
            double l2 = measure(k, big, nb_l2, lut, D, out, seconds, &checksum);
            double dram = measure(k, big, nb_dram, lut, D, out, seconds, &checksum);
            printf("%-8s %6u %-6s %14.1f\n", bs_simd_name(levels[li]), D, "L2",
                   l2 / 1e6);
            printf("%-8s %6u %-6s %14.1f\n", bs_simd_name(levels[li]), D, "DRAM",
                   dram / 1e6);
        }
        free(lut);
        free(x);
        free(out);
    }
    printf("(checksum %llu)\n", (unsigned long long)checksum);
    free(big);
    return 0;
}
