/* FastScan layout, query lookup tables, the scalar reference kernel, the
 * kernel dispatch and CPU detection. Compiled for the baseline ISA: the
 * AVX2 and AVX-512 kernels live in their own files (fastscan_avx2.c,
 * fastscan_avx512.c), and nothing here may execute a wide instruction
 * before the checks below have passed. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "rabitq.h"

#if defined(__x86_64__) || defined(__i386__)
#define BS_X86 1
#include <cpuid.h>
#else
#define BS_X86 0
#endif

/* ------------------------------------------------------------- layout */

/* Nibble g of a row-major 1-bit code: dims 4g..4g+3, dim 4g+j in bit j. */
static unsigned bs_code_nibble(const uint8_t *code, uint32_t g) {
    return (code[g >> 1] >> ((g & 1u) * 4)) & 0xFu;
}

void bs_fastscan_pack(const uint8_t *codes, size_t n, uint32_t D,
                      uint8_t *blocks) {
    const size_t code_bytes = bs_code_bytes(D);
    const size_t block_bytes = bs_fastscan_block_bytes(D);
    const size_t nblocks = bs_fastscan_num_blocks(n);
    const uint32_t groups = D / 4;
    for (size_t blk = 0; blk < nblocks; blk++) {
        uint8_t *out = blocks + blk * block_bytes;
        for (uint32_t j = 0; j < 16; j++) {
            size_t v0 = blk * 32 + j, v1 = v0 + 16;
            const uint8_t *c0 = v0 < n ? codes + v0 * code_bytes : NULL;
            const uint8_t *c1 = v1 < n ? codes + v1 * code_bytes : NULL;
            for (uint32_t g = 0; g < groups; g++) {
                unsigned lo = c0 ? bs_code_nibble(c0, g) : 0u;
                unsigned hi = c1 ? bs_code_nibble(c1, g) : 0u;
                out[(size_t)g * 16 + j] = (uint8_t)(lo | hi << 4);
            }
        }
    }
}

void bs_fastscan_unpack_one(const uint8_t *blocks, size_t i, uint32_t D,
                            uint8_t *code) {
    const uint8_t *blk = blocks + (i / 32) * bs_fastscan_block_bytes(D);
    const unsigned v = (unsigned)(i % 32);
    const unsigned j = v & 15u, shift = v >= 16 ? 4u : 0u;
    const uint32_t groups = D / 4;
    for (uint32_t g = 0; g < groups; g += 2) {
        unsigned lo = (blk[(size_t)g * 16 + j] >> shift) & 0xFu;
        unsigned hi = (blk[(size_t)(g + 1) * 16 + j] >> shift) & 0xFu;
        code[g >> 1] = (uint8_t)(lo | hi << 4);
    }
}

/* ------------------------------------------------------------- tables */

/* delta * lut + lo approximates each table's sums; one delta is shared by
 * all tables so that the kernel's integer total is a single affine image
 * of the float sum (delta * total + offset). See docs/algorithms.md for
 * the error. x must be finite (the searcher rotates finite queries). */
void bs_query_lut_build(const float *x, uint32_t D, bs_query_lut *lut) {
    const uint32_t groups = D / 4;
    double range_max = 0.0, offset = 0.0;
    /* Pass 1: the spread of each table and their common delta. raw[m] is
     * built from raw[m without its lowest bit], in double, so every table
     * entry is an exactly rounded function of the same few additions. */
    for (uint32_t g = 0; g < groups; g++) {
        double raw[16], lo, hi;
        raw[0] = 0.0;
        for (unsigned m = 1; m < 16; m++) {
            unsigned low = (unsigned)__builtin_ctz(m);
            raw[m] = raw[m & (m - 1)] + (double)x[4 * g + low];
        }
        lo = hi = raw[0];
        for (unsigned m = 1; m < 16; m++) {
            if (raw[m] < lo) lo = raw[m];
            if (raw[m] > hi) hi = raw[m];
        }
        offset += lo;
        if (hi - lo > range_max) range_max = hi - lo;
    }
    const float delta = (float)(range_max / 255.0);
    const float offset_f = (float)offset;
    uint8_t *tables = lut->tables;
    if (!(delta > 0.0f)) {
        /* Every group sums to 0 (x == 0) or delta underflowed: any code's
         * sum is offset, up to the ranges that are below a float ulp. */
        memset(tables, 0, (size_t)groups * 16);
        lut->delta = 0.0f;
        lut->offset = offset_f;
        lut->max_error = (float)(groups * range_max +
                                 fabs(offset - (double)offset_f));
        return;
    }
    /* Pass 2: quantize with the float delta the caller will multiply by,
     * and record each table's worst rounding error. Codes pick one entry
     * per table independently, so the worst case over all codes is the sum
     * of the per-table worst cases: at most groups * delta / 2. */
    const double dd = (double)delta;
    double worst = 0.0;
    for (uint32_t g = 0; g < groups; g++) {
        double raw[16], lo;
        raw[0] = 0.0;
        for (unsigned m = 1; m < 16; m++) {
            unsigned low = (unsigned)__builtin_ctz(m);
            raw[m] = raw[m & (m - 1)] + (double)x[4 * g + low];
        }
        lo = raw[0];
        for (unsigned m = 1; m < 16; m++)
            if (raw[m] < lo) lo = raw[m];
        double table_worst = 0.0;
        for (unsigned m = 0; m < 16; m++) {
            double q = floor((raw[m] - lo) / dd + 0.5);
            if (q < 0.0) q = 0.0;
            if (q > 255.0) q = 255.0; /* delta rounded down to a float */
            tables[(size_t)g * 16 + m] = (uint8_t)q;
            double err = fabs(raw[m] - lo - dd * q);
            if (err > table_worst) table_worst = err;
        }
        worst += table_worst;
    }
    lut->delta = delta;
    lut->offset = offset_f;
    /* Plus the rounding of offset to a float; rounded up so that the float
     * bound is not below the double one. */
    double bound = worst + fabs(offset - (double)offset_f);
    float bound_f = (float)bound;
    if ((double)bound_f < bound) bound_f = nextafterf(bound_f, INFINITY);
    lut->max_error = bound_f;
}

/* ------------------------------------------------------------- kernels */

/* The reference: what every SIMD kernel must reproduce bit for bit. One
 * vector pair (j, j + 16) at a time keeps both sums in registers: this
 * order ran 3x faster than sweeping all 32 sums per group, which gcc
 * vectorized into byte gathers. */
void bs_fastscan_scalar(const uint8_t *blocks, size_t nblocks,
                        const uint8_t *lut, uint32_t D, uint32_t *out) {
    const uint32_t groups = D / 4;
    const size_t block_bytes = bs_fastscan_block_bytes(D);
    for (size_t blk = 0; blk < nblocks; blk++) {
        const uint8_t *codes = blocks + blk * block_bytes;
        for (unsigned j = 0; j < 16; j++) {
            uint32_t lo = 0, hi = 0;
            for (uint32_t g = 0; g < groups; g++) {
                const unsigned c = codes[(size_t)g * 16 + j];
                lo += lut[(size_t)g * 16 + (c & 0xFu)];
                hi += lut[(size_t)g * 16 + (c >> 4)];
            }
            out[blk * 32 + j] = lo;
            out[blk * 32 + j + 16] = hi;
        }
    }
}

bs_fastscan_fn bs_fastscan_kernel(bs_simd_level level) {
    switch (level) {
    case BS_SIMD_AVX2: return bs_fastscan_avx2;
    case BS_SIMD_AVX512: return bs_fastscan_avx512;
    case BS_SIMD_SCALAR: break;
    }
    /* An out-of-range level gets the kernel that runs everywhere. */
    return bs_fastscan_scalar;
}

/* ------------------------------------------------------- CPU detection */

#if BS_X86
/* XCR0 through xgetbv: which register states the OS saves on a context
 * switch. A CPU with AVX under an OS that does not save YMM must not run
 * AVX code. Inline assembly because _xgetbv needs -mxsave. */
static uint64_t bs_xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}
#endif

/* Detected on every call: cpuid costs well under a microsecond and callers
 * select once per searcher, so a cache (global mutable state) buys
 * nothing. */
int bs_simd_supported(bs_simd_level level) {
    if (level == BS_SIMD_SCALAR) return 1;
    if (level != BS_SIMD_AVX2 && level != BS_SIMD_AVX512) return 0;
#if BS_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    const int fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma) return 0;
    const uint64_t xcr0 = bs_xgetbv0();
    if ((xcr0 & 0x6u) != 0x6u) return 0; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, bmi2 = (b >> 8) & 1;
    /* fastscan_avx2.c is built with -mavx2 -mfma -mbmi2: the compiler may
     * use any of them, so all are required. */
    if (!avx2 || !bmi2) return 0;
    if (level == BS_SIMD_AVX2) return 1;
    /* AVX-512: opmask, ZMM_Hi256 and Hi16_ZMM state, then the subsets
     * fastscan_avx512.c is compiled for. VPOPCNTDQ is not required: that
     * kernel contains no population count for the compiler to turn into
     * one, and requiring it would exclude Skylake-SP. */
    if ((xcr0 & 0xE0u) != 0xE0u) return 0;
    const int f = (b >> 16) & 1, dq = (b >> 17) & 1;
    const int bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    return f && dq && bw && vl;
#else
    return 0;
#endif
}

const char *bs_simd_name(bs_simd_level level) {
    switch (level) {
    case BS_SIMD_SCALAR: return "scalar";
    case BS_SIMD_AVX2: return "avx2";
    case BS_SIMD_AVX512: return "avx512";
    }
    return "unknown";
}

bs_status bs_simd_select(bs_simd_level *out, bs_error *err) {
    if (out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "bs_simd_select: out is NULL");
    /* The override exists for tests and bug reports; an empty value counts
     * as unset so that `BITSHARD_SIMD= cmd` restores the default. */
    const char *name = getenv("BITSHARD_SIMD");
    if (name != NULL && name[0] != '\0') {
        static const bs_simd_level levels[] = {BS_SIMD_SCALAR, BS_SIMD_AVX2,
                                               BS_SIMD_AVX512};
        for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++) {
            if (strcmp(name, bs_simd_name(levels[i])) != 0) continue;
            if (!bs_simd_supported(levels[i]))
                return bs_fail(err, BS_ERR_UNSUPPORTED_CPU,
                               "BITSHARD_SIMD=%s: this CPU (or OS) does not "
                               "support %s",
                               name, bs_simd_name(levels[i]));
            *out = levels[i];
            bs_error_clear(err);
            return BS_OK;
        }
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "BITSHARD_SIMD=\"%.200s\" is not one of \"scalar\", "
                       "\"avx2\", \"avx512\"",
                       name);
    }
    if (bs_simd_supported(BS_SIMD_AVX512))
        *out = BS_SIMD_AVX512;
    else if (bs_simd_supported(BS_SIMD_AVX2))
        *out = BS_SIMD_AVX2;
    else
        *out = BS_SIMD_SCALAR;
    bs_error_clear(err);
    return BS_OK;
}
