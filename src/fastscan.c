/* FastScan layout, query lookup tables, the scalar reference kernel, the
 * kernel dispatch and CPU detection. Compiled for the baseline ISA: the
 * AVX2 and AVX-512 kernels live in their own files (fastscan_avx2.c,
 * fastscan_avx512.c), and nothing here may execute a wide instruction
 * before the checks below have passed. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* SSE2 is part of the x86-64 baseline: the lookup-table builder uses it
 * directly; no wider instruction appears in this file. */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

/* Sum of the group's negative entries (the least table entry) and of its
 * absolute values (the table's range), pairing (x0, x1) and (x2, x3) as the
 * table entries do, so that the least entry minus lo is exactly 0. */
static float bs_group_lo(const float *x) {
    return ((x[0] < 0.0f ? x[0] : 0.0f) + (x[1] < 0.0f ? x[1] : 0.0f)) +
           ((x[2] < 0.0f ? x[2] : 0.0f) + (x[3] < 0.0f ? x[3] : 0.0f));
}

/* Entry m = i + 4k of table g is A[i] + Bk[k] - lo with A = (0, x0, x1,
 * x0 + x1), Bk = (0, x2, x3, x2 + x3), rounded half up to a multiple of
 * delta (times inv = 1 / delta) and clamped to [0, 255]. */
void bs_lut_fill_ref(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    for (uint32_t g = 0; g < groups; g++) {
        const float *xg = x + 4 * g;
        const float lo = bs_group_lo(xg);
        const float a[4] = {0.0f, xg[0], xg[1], xg[0] + xg[1]};
        const float bk[4] = {0.0f, xg[2], xg[3], xg[2] + xg[3]};
        for (unsigned m = 0; m < 16; m++) {
            float d = (a[m & 3] + bk[m >> 2]) - lo;
            float t = d * inv + 0.5f;
            t = t < 255.0f ? t : 255.0f;
            t = t > 0.0f ? t : 0.0f;
            tables[(size_t)g * 16 + m] = (uint8_t)(int32_t)t;
        }
    }
}

#if defined(__SSE2__)
/* The same bytes, four groups at a time: after a 4x4 transpose each
 * register holds one coordinate of four groups, so every entry is the same
 * few operations on whole registers (the per-group version spent most of
 * its time building its operands one float at a time), and the 16 entries
 * x 4 groups are transposed back to group-major bytes with unpacks. minps
 * (t, c) is t < c ? t : c and maxps(t, c) is t > c ? t : c, the reference's
 * expressions; min(x, 0) is its x < 0 ? x : 0 (x is finite). Groups past
 * a multiple of 4 (none when D is a multiple of 64) go to the reference. */
void bs_lut_fill_sse2(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    const __m128 vinv = _mm_set1_ps(inv), vhalf = _mm_set1_ps(0.5f);
    const __m128 v255 = _mm_set1_ps(255.0f), vzero = _mm_setzero_ps();
    uint32_t g = 0;
    for (; g + 4 <= groups; g += 4) {
        __m128 x0 = _mm_loadu_ps(x + 4 * g), x1 = _mm_loadu_ps(x + 4 * g + 4);
        __m128 x2 = _mm_loadu_ps(x + 4 * g + 8), x3 = _mm_loadu_ps(x + 4 * g + 12);
        _MM_TRANSPOSE4_PS(x0, x1, x2, x3); /* xi: coordinate i of 4 groups */
        const __m128 lo = _mm_add_ps(_mm_add_ps(_mm_min_ps(x0, vzero), _mm_min_ps(x1, vzero)),
                                     _mm_add_ps(_mm_min_ps(x2, vzero), _mm_min_ps(x3, vzero)));
        const __m128 a[4] = {vzero, x0, x1, _mm_add_ps(x0, x1)};
        const __m128 bk[4] = {vzero, x2, x3, _mm_add_ps(x2, x3)};
        __m128i q[16];
        for (unsigned m = 0; m < 16; m++) {
            __m128 d = _mm_sub_ps(_mm_add_ps(a[m & 3], bk[m >> 2]), lo);
            __m128 t = _mm_add_ps(_mm_mul_ps(d, vinv), vhalf);
            t = _mm_max_ps(_mm_min_ps(t, v255), vzero);
            q[m] = _mm_cvttps_epi32(t);
        }
        /* bm: entries 4m'..4m'+3, each as 4 bytes (one per group) */
        __m128i bm[4];
        for (unsigned k = 0; k < 4; k++)
            bm[k] = _mm_packus_epi16(_mm_packs_epi32(q[4 * k], q[4 * k + 1]),
                                     _mm_packs_epi32(q[4 * k + 2], q[4 * k + 3]));
        /* unit g of vr: entries r, r + 4, r + 8, r + 12 of group g */
        const __m128i l01 = _mm_unpacklo_epi8(bm[0], bm[1]), h01 = _mm_unpackhi_epi8(bm[0], bm[1]);
        const __m128i l23 = _mm_unpacklo_epi8(bm[2], bm[3]), h23 = _mm_unpackhi_epi8(bm[2], bm[3]);
        const __m128i v0 = _mm_unpacklo_epi16(l01, l23), v1 = _mm_unpackhi_epi16(l01, l23);
        const __m128i v2 = _mm_unpacklo_epi16(h01, h23), v3 = _mm_unpackhi_epi16(h01, h23);
        const __m128i lo01 = _mm_unpacklo_epi8(v0, v1), lo23 = _mm_unpacklo_epi8(v2, v3);
        const __m128i hi01 = _mm_unpackhi_epi8(v0, v1), hi23 = _mm_unpackhi_epi8(v2, v3);
        __m128i *out = (__m128i *)(void *)(tables + (size_t)g * 16);
        _mm_storeu_si128(out, _mm_unpacklo_epi16(lo01, lo23));
        _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(lo01, lo23));
        _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(hi01, hi23));
        _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(hi01, hi23));
    }
    bs_lut_fill_ref(x + 4 * g, groups - g, inv, tables + (size_t)g * 16);
}
#else
void bs_lut_fill_sse2(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    bs_lut_fill_ref(x, groups, inv, tables);
}
#endif

static float bs_round_up_float(double v) {
    float f = (float)v;
    if ((double)f < v) f = nextafterf(f, INFINITY);
    return f;
}

/* The first pass (rabitq.h): the reference, one group at a time. */
void bs_lut_sums_ref(const float *x, uint32_t groups, bs_lut_sums *acc) {
    for (uint32_t g = 0; g < groups; g++) {
        const float *xg = x + 4 * g;
        const float range = (fabsf(xg[0]) + fabsf(xg[1])) +
                            (fabsf(xg[2]) + fabsf(xg[3]));
        acc->range_max = range > acc->range_max ? range : acc->range_max;
        acc->offset += bs_group_lo(xg);
        acc->abs_total += range;
    }
}

#if defined(__SSE2__)
/* bs_group_lo's four sign tests are coin flips on real queries; as
 * branches they cost more than everything else here. minps(x, 0) is
 * x < 0 ? x : 0 for finite x (ties return the 0), and the sums run in
 * the reference's order, so the bits are the same. */
void bs_lut_sums_sse2(const float *x, uint32_t groups, bs_lut_sums *acc) {
    float range_max = acc->range_max;
    double offset = acc->offset, abs_total = acc->abs_total;
    const __m128 vzero = _mm_setzero_ps(), sign = _mm_set1_ps(-0.0f);
    uint32_t g = 0;
    for (; g + 4 <= groups; g += 4) {
        __m128 x0 = _mm_loadu_ps(x + 4 * g), x1 = _mm_loadu_ps(x + 4 * g + 4);
        __m128 x2 = _mm_loadu_ps(x + 4 * g + 8), x3 = _mm_loadu_ps(x + 4 * g + 12);
        _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
        float lo[4], range[4];
        _mm_storeu_ps(lo, _mm_add_ps(_mm_add_ps(_mm_min_ps(x0, vzero), _mm_min_ps(x1, vzero)),
                                     _mm_add_ps(_mm_min_ps(x2, vzero), _mm_min_ps(x3, vzero))));
        _mm_storeu_ps(range, _mm_add_ps(_mm_add_ps(_mm_andnot_ps(sign, x0),
                                                   _mm_andnot_ps(sign, x1)),
                                        _mm_add_ps(_mm_andnot_ps(sign, x2),
                                                   _mm_andnot_ps(sign, x3))));
        for (int j = 0; j < 4; j++) {
            range_max = range[j] > range_max ? range[j] : range_max;
            offset += lo[j];
            abs_total += range[j];
        }
    }
    acc->range_max = range_max;
    acc->offset = offset;
    acc->abs_total = abs_total;
    bs_lut_sums_ref(x + 4 * g, groups - g, acc);
}
#else
void bs_lut_sums_sse2(const float *x, uint32_t groups, bs_lut_sums *acc) {
    bs_lut_sums_ref(x, groups, acc);
}
#endif

/* delta * lut + lo approximates each table's sums; one delta is shared by
 * all tables so that the kernel's integer total is a single affine image
 * of the float sum (delta * total + offset). Built once per query and
 * probed partition, so it must cost about as much as scanning a
 * partition: float arithmetic, no division in the loop, vector code for
 * the level (SSE2 is the x86-64 baseline) computing the reference's bits.
 * See docs/algorithms.md for the error. x must be finite. */
void bs_query_lut_build_simd(const float *x, uint32_t D, bs_simd_level level,
                             bs_query_lut *lut) {
    const uint32_t groups = D / 4;
    uint8_t *tables = lut->tables;
    const int wide = level == BS_SIMD_AVX2 || level == BS_SIMD_AVX512;
    bs_lut_sums sums = {0.0f, 0.0, 0.0};
    if (wide)
        bs_lut_sums_avx2(x, groups, &sums);
    else
        bs_lut_sums_sse2(x, groups, &sums);
    const float range_max = sums.range_max;
    const double offset = sums.offset, abs_total = sums.abs_total;
    const float delta = range_max / 255.0f;
    const float offset_f = (float)offset;
    const double offset_err = fabs(offset - (double)offset_f);
    if (!(delta >= FLT_MIN)) {
        /* x == 0, or ranges so small that 1 / delta would overflow: every
         * table collapses to 0 and a code's error is at most the sum of
         * the ranges (0 for x == 0). */
        memset(tables, 0, (size_t)groups * 16);
        lut->delta = 0.0f;
        lut->offset = offset_f;
        lut->max_error = bs_round_up_float(abs_total + offset_err);
        return;
    }
    const float inv = 1.0f / delta;
    if (level == BS_SIMD_AVX512)
        bs_lut_fill_avx512(x, groups, inv, tables);
    else if (level == BS_SIMD_AVX2)
        bs_lut_fill_avx2(x, groups, inv, tables);
    else
        bs_lut_fill_sse2(x, groups, inv, tables);
    lut->delta = delta;
    lut->offset = offset_f;
    /* A code picks one entry per table, each off by at most delta / 2 (the
     * 2^-12 covers inv and the product rounding to float), plus the float
     * rounding of the table sums (a few ulp of each table's range: 2^-21
     * of the absolute sum is generous) and of offset. */
    lut->max_error = bs_round_up_float((double)groups * delta * 0.5 *
                                           (1.0 + 0x1p-12) +
                                       0x1p-21 * abs_total + offset_err);
}

void bs_query_lut_build(const float *x, uint32_t D, bs_query_lut *lut) {
    bs_query_lut_build_simd(x, D, BS_SIMD_SCALAR, lut);
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
    const int fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx || !fma || !f16c) return 0;
    const uint64_t xcr0 = bs_xgetbv0();
    if ((xcr0 & 0x6u) != 0x6u) return 0; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, bmi2 = (b >> 8) & 1;
    /* the *_avx2.c files are built with -mavx2 -mfma -mbmi2 -mf16c: the
     * compiler may use any of them, so all are required (every AVX2 CPU
     * has F16C). */
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
