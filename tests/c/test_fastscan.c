/* FastScan: block layout, query lookup tables, every kernel against the
 * scalar reference, SIMD selection and its environment override. */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rabitq.h"
#include "testing.h"

static const uint32_t DIMS[] = {64, 128, 192, 768, 1536};
#define NDIMS (sizeof DIMS / sizeof DIMS[0])

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static void random_bytes(uint8_t *p, size_t n, uint64_t *st) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(test_rand_u64(st) >> 56);
}

static unsigned nibble(const uint8_t *code, uint32_t g) {
    return (code[g / 2] >> (4 * (g % 2))) & 0xFu;
}

/* ------------------------------------------------------------- layout */

static void test_pack_roundtrip(void) {
    const size_t ns[] = {1, 3, 7, 8, 9, 15, 31, 32, 33, 63, 64, 65, 100};
    uint64_t st = 1;
    for (size_t di = 0; di < NDIMS; di++) {
        const uint32_t D = DIMS[di];
        const size_t cb = bs_code_bytes(D), bb = bs_fastscan_block_bytes(D);
        for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
            const size_t n = ns[ni], nb = bs_fastscan_num_blocks(n);
            uint8_t *codes = xmalloc(n * cb), *blocks = xmalloc(nb * bb);
            uint8_t *back = xmalloc(cb);
            random_bytes(codes, n * cb, &st);
            memset(blocks, 0xCD, nb * bb); /* pack must overwrite all of it */
            bs_fastscan_pack(codes, n, D, blocks);
            int bad = 0, bad_layout = 0, bad_pad = 0;
            for (size_t i = 0; i < n; i++) {
                bs_fastscan_unpack_one(blocks, i, D, back);
                bad += memcmp(back, codes + i * cb, cb) != 0;
            }
            /* The layout of rabitq.h, written out independently. */
            for (size_t blk = 0; blk < nb; blk++)
                for (uint32_t g = 0; g < D / 4; g++)
                    for (unsigned j = 0; j < 16; j++) {
                        size_t v0 = blk * 32 + j, v1 = v0 + 16;
                        unsigned lo = v0 < n ? nibble(codes + v0 * cb, g) : 0;
                        unsigned hi = v1 < n ? nibble(codes + v1 * cb, g) : 0;
                        bad_layout += blocks[blk * bb + (size_t)g * 16 + j] !=
                                      (uint8_t)(lo | hi << 4);
                    }
            /* Vectors past n read back as zero codes. */
            for (size_t i = n; i < nb * 32; i++) {
                bs_fastscan_unpack_one(blocks, i, D, back);
                for (size_t k = 0; k < cb; k++) bad_pad += back[k] != 0;
            }
            CHECK_MSG(bad == 0 && bad_layout == 0 && bad_pad == 0,
                      "D=%u n=%zu: %d round-trip, %d layout, %d padding errors",
                      D, n, bad, bad_layout, bad_pad);
            free(codes);
            free(blocks);
            free(back);
        }
    }
}

/* ------------------------------------------------------------- tables */

/* <b, x> in double for a 1-bit code b. */
static double code_dot(const uint8_t *code, const float *x, uint32_t D) {
    double s = 0;
    for (uint32_t i = 0; i < D; i++)
        if ((code[i >> 3] >> (i & 7)) & 1) s += x[i];
    return s;
}

/* The table total for a code, straight from the definition. */
static uint32_t lut_sum(const uint8_t *code, const uint8_t *tables, uint32_t D) {
    uint32_t s = 0;
    for (uint32_t g = 0; g < D / 4; g++) s += tables[g * 16 + nibble(code, g)];
    return s;
}

static void test_lut(void) {
    uint64_t st = 7;
    for (size_t di = 0; di < NDIMS; di++) {
        const uint32_t D = DIMS[di], groups = D / 4;
        float *x = xmalloc(D * sizeof *x);
        uint8_t *tables = xmalloc((size_t)groups * 16);
        uint8_t *tables2 = xmalloc((size_t)groups * 16);
        uint8_t *code = xmalloc(D / 8);
        for (uint32_t i = 0; i < D; i++) x[i] = (float)test_rand_normal(&st);
        bs_query_lut lut = {tables, 0, 0, 0};
        bs_query_lut_build(x, D, &lut);
        CHECK(lut.delta > 0 && isfinite(lut.offset));
        /* The worst case over codes is (D/4) delta/2, plus float rounding. */
        double abs_sum = 0;
        for (uint32_t i = 0; i < D; i++) abs_sum += fabs(x[i]);
        CHECK_MSG(lut.max_error >= groups * lut.delta / 2 &&
                      lut.max_error <= groups * lut.delta / 2 * 1.001 + 1e-5 * abs_sum,
                  "D=%u max_error %g vs (D/4) delta/2 = %g", D, lut.max_error,
                  groups * lut.delta / 2);
        /* Each table starts at 0; the widest one reaches 255. */
        int min_bad = 0, max_entry = 0;
        for (uint32_t g = 0; g < groups; g++) {
            int mn = 255;
            for (int m = 0; m < 16; m++) {
                int v = tables[g * 16 + m];
                if (v < mn) mn = v;
                if (v > max_entry) max_entry = v;
            }
            min_bad += mn != 0;
        }
        CHECK(min_bad == 0 && max_entry == 255);
        /* Random codes stay within the bound. */
        double worst = 0, sq = 0;
        const int ncodes = 2000;
        for (int c = 0; c < ncodes; c++) {
            random_bytes(code, D / 8, &st);
            double est = (double)lut.delta * lut_sum(code, tables, D) + lut.offset;
            double err = fabs(est - code_dot(code, x, D));
            if (err > worst) worst = err;
            sq += err * err;
        }
        CHECK_MSG(worst <= lut.max_error, "D=%u error %g > max_error %g", D,
                  worst, lut.max_error);
        /* Rounding errors are roughly independent uniforms: their sum has
         * sd delta sqrt(groups / 12), the statistical bound search uses. */
        double rms = sqrt(sq / ncodes), sd = lut.delta * sqrt(groups / 12.0);
        printf("LUT D=%u: delta %.3g, max_error %.3g, worst seen %.3g, "
               "rms %.3g (model %.3g)\n",
               D, lut.delta, lut.max_error, worst, rms, sd);
        CHECK(rms < 1.5 * sd);
        /* The code that takes each table's most positive rounding error
         * (in double, against the exact sums). */
        for (uint32_t g = 0; g < groups; g++) {
            double raw[16], best = -1e300;
            unsigned best_m = 0;
            raw[0] = 0;
            for (unsigned m = 1; m < 16; m++) {
                unsigned low = 0;
                while (!((m >> low) & 1)) low++;
                raw[m] = raw[m & (m - 1)] + x[4 * g + low];
            }
            double lo = 0;
            for (unsigned m = 0; m < 16; m++) lo = raw[m] < lo ? raw[m] : lo;
            for (unsigned m = 0; m < 16; m++) {
                double e = raw[m] - lo - (double)lut.delta * tables[g * 16 + m];
                if (e > best) best = e, best_m = m;
            }
            if (g % 2 == 0) code[g / 2] = (uint8_t)best_m;
            else code[g / 2] = (uint8_t)(code[g / 2] | best_m << 4);
        }
        double est = (double)lut.delta * lut_sum(code, tables, D) + lut.offset;
        CHECK(fabs(est - code_dot(code, x, D)) <= lut.max_error);
        /* Deterministic. */
        bs_query_lut lut2 = {tables2, 0, 0, 0};
        bs_query_lut_build(x, D, &lut2);
        CHECK(memcmp(tables, tables2, (size_t)groups * 16) == 0 &&
              lut.delta == lut2.delta && lut.offset == lut2.offset &&
              lut.max_error == lut2.max_error);

        /* x == 0: all-zero tables, zero delta, exact. */
        memset(x, 0, D * sizeof *x);
        memset(tables, 0x55, (size_t)groups * 16);
        bs_query_lut_build(x, D, &lut);
        int nonzero = 0;
        for (size_t k = 0; k < (size_t)groups * 16; k++) nonzero += tables[k] != 0;
        CHECK(nonzero == 0 && lut.delta == 0 && lut.offset == 0 &&
              lut.max_error == 0);
        /* One non-zero group: the others have zero range. */
        x[5] = -2.0f;
        bs_query_lut_build(x, D, &lut);
        CHECK(lut.offset == -2.0f && fabs(lut.delta - 2.0f / 255) < 1e-9);
        memset(code, 0xFF, D / 8);
        est = (double)lut.delta * lut_sum(code, tables, D) + lut.offset;
        CHECK(fabs(est - -2.0) <= lut.max_error + 1e-7);
        free(x);
        free(tables);
        free(tables2);
        free(code);
    }
}

/* ------------------------------------------------------------- kernels */

typedef struct level_kernel {
    bs_simd_level level;
    bs_fastscan_fn fn;
} level_kernel;

/* out has nblocks * 32 words plus a guard that no kernel may touch. */
#define GUARD 40
static int run_and_compare(const uint8_t *blocks, size_t nb, const uint8_t *lut,
                           uint32_t D, const uint32_t *ref, bs_fastscan_fn fn) {
    uint32_t *out = xmalloc((nb * 32 + GUARD) * sizeof *out);
    memset(out, 0xEE, (nb * 32 + GUARD) * sizeof *out);
    fn(blocks, nb, lut, D, out);
    int bad = memcmp(out, ref, nb * 32 * sizeof *out) != 0;
    for (size_t k = nb * 32; k < nb * 32 + GUARD; k++) bad |= out[k] != 0xEEEEEEEEu;
    free(out);
    return bad;
}

static void check_all_kernels(const uint8_t *blocks, size_t nb, const uint8_t *lut,
                              uint32_t D, const char *what) {
    uint32_t *ref = xmalloc(nb * 32 * sizeof *ref);
    bs_fastscan_scalar(blocks, nb, lut, D, ref);
    const bs_simd_level levels[] = {BS_SIMD_AVX2, BS_SIMD_AVX512};
    for (size_t li = 0; li < 2; li++) {
        if (!bs_simd_supported(levels[li])) continue;
        CHECK_MSG(!run_and_compare(blocks, nb, lut, D, ref,
                                   bs_fastscan_kernel(levels[li])),
                  "%s kernel differs from scalar: %s, D=%u, nblocks=%zu",
                  bs_simd_name(levels[li]), what, D, nb);
    }
    free(ref);
}

static void test_scalar_definition(void) {
    /* The reference kernel against the definition, from row-major codes. */
    uint64_t st = 17;
    const uint32_t D = 192;
    const size_t n = 70, nb = bs_fastscan_num_blocks(n);
    uint8_t *codes = xmalloc(n * D / 8), *blocks = xmalloc(nb * 4 * D);
    uint8_t *lut = xmalloc(D * 4);
    uint32_t *out = xmalloc(nb * 32 * sizeof *out);
    random_bytes(codes, n * D / 8, &st);
    random_bytes(lut, D * 4, &st);
    bs_fastscan_pack(codes, n, D, blocks);
    bs_fastscan_scalar(blocks, nb, lut, D, out);
    int bad = 0;
    for (size_t i = 0; i < nb * 32; i++) {
        uint32_t want = 0;
        for (uint32_t g = 0; g < D / 4; g++)
            want += lut[g * 16 + (i < n ? nibble(codes + i * D / 8, g) : 0)];
        bad += out[i] != want;
    }
    CHECK_MSG(bad == 0, "scalar kernel: %d sums differ from the definition", bad);
    free(codes);
    free(blocks);
    free(lut);
    free(out);
}

static void test_kernels_random(void) {
    uint64_t st = 29;
    /* Chunk edges: 2048 = 256 pairs (AVX2 flush), 4096 = 256 quads
     * (AVX-512 flush), and one group pair / quad past them. */
    const uint32_t dims[] = {64, 128, 192, 768, 1536, 2048, 2112, 4096, 4160};
    const size_t nbs[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const uint32_t D = dims[di];
        for (size_t ni = 0; ni < sizeof nbs / sizeof nbs[0]; ni++) {
            const size_t nb = nbs[ni];
            if (D >= 2048 && nb > 9) continue;
            uint8_t *blocks = xmalloc(nb * 4 * D), *lut = xmalloc(D * 4);
            random_bytes(blocks, nb * 4 * D, &st);
            random_bytes(lut, D * 4, &st);
            check_all_kernels(blocks, nb, lut, D, "random");
            /* Tables of real queries: built from floats. */
            float *x = xmalloc(D * sizeof *x);
            for (uint32_t i = 0; i < D; i++) x[i] = (float)test_rand_normal(&st);
            bs_query_lut q = {lut, 0, 0, 0};
            bs_query_lut_build(x, D, &q);
            check_all_kernels(blocks, nb, lut, D, "query tables");
            free(x);
            free(blocks);
            free(lut);
        }
    }
}

static void test_kernels_extreme(void) {
    /* All-0xFF tables and codes: every sum is 255 * D / 4, which overflows
     * any uint16 accumulator that is not flushed in time. */
    const uint32_t dims[] = {1536, 2048, 8192, 65536};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const uint32_t D = dims[di];
        for (size_t nb = 1; nb <= 3; nb++) {
            uint8_t *blocks = xmalloc(nb * 4 * (size_t)D), *lut = xmalloc(D * 4);
            uint32_t *out = xmalloc(nb * 32 * sizeof *out);
            memset(blocks, 0xFF, nb * 4 * (size_t)D);
            memset(lut, 0xFF, D * 4);
            bs_fastscan_scalar(blocks, nb, lut, D, out);
            int bad = 0;
            for (size_t i = 0; i < nb * 32; i++) bad += out[i] != 255u * (D / 4);
            CHECK_MSG(bad == 0, "scalar all-0xFF D=%u", D);
            check_all_kernels(blocks, nb, lut, D, "all 0xFF");
            /* Only the odd bytes (vectors 1, 3, ...) and only the even. */
            for (int parity = 0; parity < 2; parity++) {
                for (size_t k = 0; k < nb * 4 * (size_t)D; k++)
                    blocks[k] = (k % 2 == (size_t)parity) ? 0xFF : 0x00;
                memset(lut, 0, D * 4);
                for (uint32_t g = 0; g < D / 4; g++) lut[g * 16 + 15] = 0xFF;
                check_all_kernels(blocks, nb, lut, D, "alternating bytes");
            }
            /* Zero tables: all sums 0. */
            memset(lut, 0, D * 4);
            check_all_kernels(blocks, nb, lut, D, "zero tables");
            free(blocks);
            free(lut);
            free(out);
        }
    }
    /* Zero blocks is a no-op that must not touch out. */
    uint32_t sentinel = 0x12345678u;
    uint8_t lut[64 * 4] = {0};
    bs_fastscan_scalar(NULL, 0, lut, 64, &sentinel);
    if (bs_simd_supported(BS_SIMD_AVX2))
        bs_fastscan_avx2(NULL, 0, lut, 64, &sentinel);
    if (bs_simd_supported(BS_SIMD_AVX512))
        bs_fastscan_avx512(NULL, 0, lut, 64, &sentinel);
    CHECK(sentinel == 0x12345678u);
}

/* ------------------------------------------------------------- dispatch */

static void test_dispatch(void) {
    CHECK(bs_simd_supported(BS_SIMD_SCALAR) == 1);
    CHECK(bs_simd_supported((bs_simd_level)7) == 0);
    CHECK(strcmp(bs_simd_name(BS_SIMD_SCALAR), "scalar") == 0);
    CHECK(strcmp(bs_simd_name(BS_SIMD_AVX2), "avx2") == 0);
    CHECK(strcmp(bs_simd_name(BS_SIMD_AVX512), "avx512") == 0);
    CHECK(strcmp(bs_simd_name((bs_simd_level)7), "unknown") == 0);
    CHECK(bs_fastscan_kernel(BS_SIMD_SCALAR) == bs_fastscan_scalar);
    CHECK(bs_fastscan_kernel(BS_SIMD_AVX2) == bs_fastscan_avx2);
    CHECK(bs_fastscan_kernel(BS_SIMD_AVX512) == bs_fastscan_avx512);
    CHECK(bs_fastscan_kernel((bs_simd_level)7) == bs_fastscan_scalar);

    const int has_avx2 = bs_simd_supported(BS_SIMD_AVX2);
    const int has_avx512 = bs_simd_supported(BS_SIMD_AVX512);
    printf("SIMD: avx2 %s, avx512 %s\n", has_avx2 ? "supported" : "not supported",
           has_avx512 ? "supported" : "not supported");
    if (!has_avx512)
        printf("skipping the AVX-512 kernel: this CPU does not support it "
               "(compiled, not run)\n");
    if (!has_avx2)
        printf("skipping the AVX2 kernel: this CPU does not support it\n");
    CHECK(!has_avx512 || has_avx2);
#if defined(__x86_64__) && defined(__GNUC__)
    /* The compiler's own detection agrees (it also checks the OS state). */
    __builtin_cpu_init();
    CHECK(has_avx2 == (__builtin_cpu_supports("avx2") &&
                       __builtin_cpu_supports("fma") &&
                       __builtin_cpu_supports("bmi2")));
    CHECK(has_avx512 == (has_avx2 && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq")));
#endif

    bs_simd_level lv = (bs_simd_level)99;
    bs_error err;
    const char *saved = getenv("BITSHARD_SIMD");
    char *saved_copy = saved ? strcpy(xmalloc(strlen(saved) + 1), saved) : NULL;

    unsetenv("BITSHARD_SIMD");
    CHECK(bs_simd_select(&lv, &err) == BS_OK && err.code == BS_OK);
    CHECK(lv == (has_avx512 ? BS_SIMD_AVX512 : has_avx2 ? BS_SIMD_AVX2
                                                        : BS_SIMD_SCALAR));
    CHECK(bs_simd_select(&lv, NULL) == BS_OK);
    setenv("BITSHARD_SIMD", "", 1); /* empty counts as unset */
    CHECK(bs_simd_select(&lv, &err) == BS_OK);

    setenv("BITSHARD_SIMD", "scalar", 1);
    CHECK(bs_simd_select(&lv, &err) == BS_OK && lv == BS_SIMD_SCALAR);

    setenv("BITSHARD_SIMD", "avx2", 1);
    lv = (bs_simd_level)99;
    bs_status s = bs_simd_select(&lv, &err);
    if (has_avx2) {
        CHECK(s == BS_OK && lv == BS_SIMD_AVX2);
    } else {
        CHECK(s == BS_ERR_UNSUPPORTED_CPU && err.code == s &&
              strstr(err.message, "avx2") != NULL);
    }

    setenv("BITSHARD_SIMD", "avx512", 1);
    lv = (bs_simd_level)99;
    s = bs_simd_select(&lv, &err);
    if (has_avx512) {
        CHECK(s == BS_OK && lv == BS_SIMD_AVX512);
    } else {
        CHECK(s == BS_ERR_UNSUPPORTED_CPU && err.code == s &&
              strstr(err.message, "avx512") != NULL && lv == (bs_simd_level)99);
    }

    setenv("BITSHARD_SIMD", "bogus", 1);
    s = bs_simd_select(&lv, &err);
    CHECK(s == BS_ERR_INVALID_ARGUMENT && err.code == s &&
          strstr(err.message, "bogus") != NULL);
    setenv("BITSHARD_SIMD", "AVX2", 1); /* names are lower case */
    CHECK(bs_simd_select(&lv, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_simd_select(NULL, &err) == BS_ERR_INVALID_ARGUMENT);

    if (saved_copy) {
        setenv("BITSHARD_SIMD", saved_copy, 1);
        free(saved_copy);
    } else {
        unsetenv("BITSHARD_SIMD");
    }
}

/* The environment of a CI leg may force a level: the kernel it selects is
 * the one the search runs, so check that it is the forced one. */
static void test_forced_level_runs(void) {
    const char *forced = getenv("BITSHARD_SIMD");
    bs_simd_level lv;
    bs_error err;
    bs_status s = bs_simd_select(&lv, &err);
    if (forced && forced[0]) {
        printf("BITSHARD_SIMD=%s -> %s\n", forced,
               s == BS_OK ? bs_simd_name(lv) : bs_status_name(s));
        if (s == BS_OK) CHECK(strcmp(bs_simd_name(lv), forced) == 0);
    }
}

/* Every table fill (SSE2, AVX2, AVX-512 where the CPU has them) equals the
 * reference byte for byte, every first pass gives the reference's sums bit
 * for bit, and bs_query_lut_build_simd gives the baseline's tables, delta,
 * offset and max_error at every supported level: random coordinates,
 * all-negative and all-positive groups, zeros and -0, ties at the rounding
 * point, values near the accepted limit 2^40 and tiny ones, and scales
 * that clamp entries at 0 and 255 or make them NaN or infinite (the vector
 * fills leave the lower clamp to saturating packs). Group counts that are
 * not a multiple of the vector width go through the tails. */
static void test_lut_fill_levels(void) {
    uint64_t st = 99;
    int bad_fill[3] = {0, 0, 0}, bad_sums[3] = {0, 0, 0}, bad_build[3] = {0, 0, 0};
    int bad_delta = 0;
    const int have[3] = {1, bs_simd_supported(BS_SIMD_AVX2),
                         bs_simd_supported(BS_SIMD_AVX512)};
    const bs_simd_level levels[3] = {BS_SIMD_SCALAR, BS_SIMD_AVX2, BS_SIMD_AVX512};
    int cases = 0;
    for (size_t di = 0; di < NDIMS + 1; di++) {
        /* the last "dimension" is 4 * 13 groups: odd, past every width */
        const uint32_t D = di < NDIMS ? DIMS[di] : 52, groups = D / 4;
        float *x = xmalloc(D * sizeof *x);
        uint8_t *a = xmalloc((size_t)groups * 16), *b = xmalloc((size_t)groups * 16);
        for (int kind = 0; kind < 9; kind++) {
            for (uint32_t i = 0; i < D; i++) {
                double u = test_rand_normal(&st);
                switch (kind) {
                case 1: x[i] = -(float)fabs(u); break;
                case 2: x[i] = (float)fabs(u); break;
                case 3: x[i] = i % 3 == 0 ? 0.0f : (i % 3 == 1 ? -0.0f : (float)u); break;
                case 4: x[i] = (float)((int)(u * 4)) * 0.5f; break; /* exact halves */
                case 5: x[i] = (float)(u * 0x1p38); break;          /* near 2^40 */
                case 6: x[i] = (float)(u * 0x1p-120); break;        /* tiny */
                case 7: x[i] = i % 5 == 0 ? (float)(u * 1e6) : (float)(u * 1e-6); break;
                case 8: x[i] = i % 4 == 0 ? (float)u : -0.0f; break; /* one per group */
                default: x[i] = (float)u;
                }
            }
            /* delta and offset are the reference's sums, bit for bit */
            if (groups % 4 == 0) {
                float range_max = 0.0f;
                double offset = 0.0;
                for (uint32_t g = 0; g < groups; g++) {
                    const float *xg = x + 4 * g;
                    float range = (fabsf(xg[0]) + fabsf(xg[1])) + (fabsf(xg[2]) + fabsf(xg[3]));
                    range_max = range > range_max ? range : range_max;
                    offset += ((xg[0] < 0.0f ? xg[0] : 0.0f) + (xg[1] < 0.0f ? xg[1] : 0.0f)) +
                              ((xg[2] < 0.0f ? xg[2] : 0.0f) + (xg[3] < 0.0f ? xg[3] : 0.0f));
                }
                bs_query_lut q = {a, 0, 0, 0};
                bs_query_lut_build(x, D, &q);
                bad_delta += q.delta != range_max / 255.0f || q.offset != (float)offset;
            }
            bs_lut_sums ref = {0.0f, 0.0, 0.0};
            bs_lut_sums_ref(x, groups, &ref);
            for (int v = 0; v < 2; v++) {
                if (v == 1 && !have[1]) continue;
                bs_lut_sums got = {0.0f, 0.0, 0.0};
                if (v == 0)
                    bs_lut_sums_sse2(x, groups, &got);
                else
                    bs_lut_sums_avx2(x, groups, &got);
                bad_sums[v] += memcmp(&got.range_max, &ref.range_max, sizeof ref.range_max) ||
                               memcmp(&got.offset, &ref.offset, sizeof ref.offset) ||
                               memcmp(&got.abs_total, &ref.abs_total, sizeof ref.abs_total);
            }
            const float invs[8] = {255.0f / 4.0f, 1000.0f, 1.0f / 64.0f, 0x1p100f,
                                   -3.0f, INFINITY, -INFINITY, NAN};
            for (int t = 0; t < 8; t++) {
                bs_lut_fill_ref(x, groups, invs[t], a);
                for (int v = 0; v < 3; v++) {
                    if (!have[v]) continue;
                    memset(b, 0xA5, (size_t)groups * 16);
                    if (v == 0) bs_lut_fill_sse2(x, groups, invs[t], b);
                    if (v == 1) bs_lut_fill_avx2(x, groups, invs[t], b);
                    if (v == 2) bs_lut_fill_avx512(x, groups, invs[t], b);
                    bad_fill[v] += memcmp(a, b, (size_t)groups * 16) != 0;
                }
                cases++;
            }
            /* the whole build, at each level, against the baseline */
            if (groups % 4 == 0) {
                bs_query_lut base = {a, 0, 0, 0};
                bs_query_lut_build(x, D, &base);
                for (int v = 0; v < 3; v++) {
                    if (!have[v]) continue;
                    bs_query_lut got = {b, 0, 0, 0};
                    memset(b, 0xA5, (size_t)groups * 16);
                    bs_query_lut_build_simd(x, D, levels[v], &got);
                    bad_build[v] += memcmp(a, b, (size_t)groups * 16) != 0 ||
                                    memcmp(&base.delta, &got.delta, sizeof got.delta) ||
                                    memcmp(&base.offset, &got.offset, sizeof got.offset) ||
                                    memcmp(&base.max_error, &got.max_error,
                                           sizeof got.max_error);
                }
            }
        }
        free(x);
        free(a);
        free(b);
    }
    printf("table fills: %d cases; avx2 %s, avx512 %s\n", cases,
           have[1] ? "checked" : "not on this CPU", have[2] ? "checked" : "not on this CPU");
    CHECK_MSG(bad_delta == 0, "%d builds' delta or offset differ from the reference sums",
              bad_delta);
    for (int v = 0; v < 3; v++) {
        CHECK_MSG(bad_fill[v] == 0, "%d %s table fills differ from the reference",
                  bad_fill[v], v == 0 ? "SSE2" : bs_simd_name(levels[v]));
        CHECK_MSG(bad_sums[v] == 0, "%d %s first passes differ from the reference",
                  bad_sums[v], v == 0 ? "SSE2" : bs_simd_name(levels[v]));
        CHECK_MSG(bad_build[v] == 0, "%d %s builds differ from the baseline", bad_build[v],
                  bs_simd_name(levels[v]));
    }
}

int main(void) {
    test_pack_roundtrip();
    test_lut();
    test_lut_fill_levels();
    test_scalar_definition();
    test_kernels_random();
    test_kernels_extreme();
    test_dispatch();
    test_forced_level_runs();
    TEST_MAIN_END();
}
