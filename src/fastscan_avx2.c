/* The AVX2 FastScan kernel (built with -mavx2 -mfma -mbmi2; run only after
 * bs_simd_supported(BS_SIMD_AVX2)). Output equals bs_fastscan_scalar
 * exactly: every step is integer arithmetic without overflow.
 *
 * One 256-bit load takes two consecutive groups of a block: lane 0 holds
 * group g, lane 1 group g + 1, and tables g, g + 1 sit the same way in one
 * 256-bit LUT load. VPSHUFB looks the low nibbles (vectors 0..15) and the
 * high nibbles (vectors 16..31) up in their lane's table. Design and
 * measurements: docs/algorithms.md. */
#include "rabitq.h"

#if !defined(__AVX2__)
#error "fastscan_avx2.c must be compiled with -mavx2 -mfma -mbmi2"
#endif

#include <immintrin.h>

/* Group pairs accumulated in uint16 before a flush into uint32. A pair adds
 * at most 255 to each uint16 word, and 256 * 255 = 65280 < 65536, so no
 * true sum exceeds 16 bits for any D (which the even/odd recovery below
 * relies on). */
#define BS_AVX2_CHUNK 256u

/* Keeps gcc 12 from copying every accumulator once per iteration: its
 * partial-redundancy pass otherwise keeps the pre-add value alive for the
 * flush and inserts a register move per accumulator into the hot loop.
 * An empty asm changes no value. */
#define BS_PIN4(a, b, c, d) __asm__("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d))

/* The odd bytes of each 16-bit word, as VPMULHUW by 256 (= a right shift
 * by 8): on Zen the multiplier pipes are idle here while shifts compete
 * with the shuffles for the same two pipes. */
static inline __m256i bs_odd_bytes(__m256i x) {
    return _mm256_mulhi_epu16(x, _mm256_set1_epi16(256));
}

/* 16 uint16 words (lane 0: 8 words of even groups, lane 1: 8 words of odd
 * groups) -> 8 uint32 sums of both lanes. */
static inline __m256i bs_lanes_to_u32(__m256i v) {
    __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
    __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1));
    return _mm256_add_epi32(lo, hi);
}

/* uint32 sums of one block: even / odd vectors of the low half (0..15),
 * even / odd of the high half (16..31); word k is vector 2k (+1). */
typedef struct bs_avx2_sums {
    __m256i s[4];
} bs_avx2_sums;

/* acc0: all words of the low-nibble lookups, i.e. even byte + 256 * odd
 * byte modulo 2^16; acc1: the odd bytes alone. even = acc0 - 256 acc1
 * (mod 2^16) is then exact because the true even sum fits 16 bits. Same
 * for the high nibbles in acc2, acc3. One multiply and two adds per lookup
 * instead of separate masks for even and odd bytes. */
static inline void bs_flush(bs_avx2_sums *sum, __m256i acc0, __m256i acc1,
                            __m256i acc2, __m256i acc3) {
    const __m256i even_lo = _mm256_sub_epi16(acc0, _mm256_slli_epi16(acc1, 8));
    const __m256i even_hi = _mm256_sub_epi16(acc2, _mm256_slli_epi16(acc3, 8));
    sum->s[0] = _mm256_add_epi32(sum->s[0], bs_lanes_to_u32(even_lo));
    sum->s[1] = _mm256_add_epi32(sum->s[1], bs_lanes_to_u32(acc1));
    sum->s[2] = _mm256_add_epi32(sum->s[2], bs_lanes_to_u32(even_hi));
    sum->s[3] = _mm256_add_epi32(sum->s[3], bs_lanes_to_u32(acc3));
}

/* Interleaves even and odd into vector order and stores the 32 sums:
 * unpack gives (E0 O0 E1 O1 | E4 O4 E5 O5) and (E2 O2 E3 O3 | E6 O6 E7 O7);
 * the lane permutes put vectors 0..7 and 8..15 in order. */
static inline void bs_store_sums(const bs_avx2_sums *sum, uint32_t *out) {
    for (int h = 0; h < 2; h++) {
        const __m256i e = sum->s[2 * h], o = sum->s[2 * h + 1];
        const __m256i t0 = _mm256_unpacklo_epi32(e, o);
        const __m256i t1 = _mm256_unpackhi_epi32(e, o);
        _mm256_storeu_si256((__m256i *)(out + 16 * h),
                            _mm256_permute2x128_si256(t0, t1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 16 * h + 8),
                            _mm256_permute2x128_si256(t0, t1, 0x31));
    }
}

/* One pair of groups of one block into its four uint16 accumulators. */
#define BS_AVX2_STEP(cptr, tab, a0, a1, a2, a3)                                \
    do {                                                                       \
        const __m256i c_ = _mm256_loadu_si256((const __m256i *)(cptr));        \
        const __m256i lo_ = _mm256_and_si256(c_, m0f);                         \
        const __m256i hi_ = _mm256_and_si256(_mm256_srli_epi16(c_, 4), m0f);   \
        const __m256i rl_ = _mm256_shuffle_epi8(tab, lo_);                     \
        const __m256i rh_ = _mm256_shuffle_epi8(tab, hi_);                     \
        a0 = _mm256_add_epi16(a0, rl_);                                        \
        a1 = _mm256_add_epi16(a1, bs_odd_bytes(rl_));                          \
        a2 = _mm256_add_epi16(a2, rh_);                                        \
        a3 = _mm256_add_epi16(a3, bs_odd_bytes(rh_));                          \
    } while (0)

/* One block: 32 sums into out. */
static void bs_scan1(const uint8_t *codes, const uint8_t *lut, uint32_t pairs,
                     uint32_t *out) {
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    bs_avx2_sums sum;
    for (int k = 0; k < 4; k++) sum.s[k] = _mm256_setzero_si256();
    for (uint32_t p0 = 0; p0 < pairs; p0 += BS_AVX2_CHUNK) {
        const uint32_t p1 =
            pairs - p0 < BS_AVX2_CHUNK ? pairs : p0 + BS_AVX2_CHUNK;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (uint32_t p = p0; p < p1; p++) {
            const __m256i tab =
                _mm256_loadu_si256((const __m256i *)(lut + (size_t)p * 32));
            BS_AVX2_STEP(codes + (size_t)p * 32, tab, a0, a1, a2, a3);
        }
        BS_PIN4(a0, a1, a2, a3);
        bs_flush(&sum, a0, a1, a2, a3);
    }
    bs_store_sums(&sum, out);
}

/* Two blocks, codes + stride apart: 64 sums into out. The blocks share
 * each LUT load, and their independent chains hide the shuffle and
 * multiply latencies. next (two blocks, same stride) is prefetched in step
 * with the scan: from DRAM this measured 1.5x faster than leaving the
 * streams to the hardware prefetcher, and costs nothing in L2. */
static void bs_scan2(const uint8_t *codes, size_t stride, const uint8_t *lut,
                     uint32_t pairs, uint32_t *out, const uint8_t *next) {
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    bs_avx2_sums sa, sb;
    for (int k = 0; k < 4; k++) sa.s[k] = sb.s[k] = _mm256_setzero_si256();
    for (uint32_t p0 = 0; p0 < pairs; p0 += BS_AVX2_CHUNK) {
        const uint32_t p1 =
            pairs - p0 < BS_AVX2_CHUNK ? pairs : p0 + BS_AVX2_CHUNK;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (uint32_t p = p0; p < p1; p++) {
            const __m256i tab =
                _mm256_loadu_si256((const __m256i *)(lut + (size_t)p * 32));
            BS_AVX2_STEP(codes + (size_t)p * 32, tab, a0, a1, a2, a3);
            BS_AVX2_STEP(codes + stride + (size_t)p * 32, tab, b0, b1, b2, b3);
            _mm_prefetch((const char *)(next + (size_t)p * 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(next + stride + (size_t)p * 32),
                         _MM_HINT_T0);
        }
        BS_PIN4(a0, a1, a2, a3);
        BS_PIN4(b0, b1, b2, b3);
        bs_flush(&sa, a0, a1, a2, a3);
        bs_flush(&sb, b0, b1, b2, b3);
    }
    bs_store_sums(&sa, out);
    bs_store_sums(&sb, out + 32);
}

void bs_fastscan_avx2(const uint8_t *blocks, size_t nblocks,
                      const uint8_t *lut, uint32_t D, uint32_t *out) {
    /* D is a multiple of 64, so its D / 4 groups form D / 8 whole pairs. */
    const uint32_t pairs = D / 8;
    const size_t stride = bs_fastscan_block_bytes(D);
    size_t blk = 0;
    for (; blk + 2 <= nblocks; blk += 2) {
        const uint8_t *cur = blocks + blk * stride;
        /* The last pair prefetches itself: no address past the buffer. */
        const uint8_t *next = blk + 4 <= nblocks ? cur + 2 * stride : cur;
        bs_scan2(cur, stride, lut, pairs, out + blk * 32, next);
    }
    for (; blk < nblocks; blk++)
        bs_scan1(blocks + blk * stride, lut, pairs, out + blk * 32);
}

/* ------------------------------------------------------ lookup tables */

/* Eight groups of four floats at xg, transposed in lane: loads r0..r3 hold
 * groups (g, g+1), (g+2, g+3), (g+4, g+5), (g+6, g+7), and coordinate i of
 * groups g, g+2, g+4, g+6 ends in lane 0 of *ci, of g+1, g+3, g+5, g+7 in
 * lane 1. Both table passes read the groups this way. */
static inline void transpose_groups8(const float *xg, __m256 *c0, __m256 *c1,
                                     __m256 *c2, __m256 *c3) {
    const __m256 r0 = _mm256_loadu_ps(xg), r1 = _mm256_loadu_ps(xg + 8);
    const __m256 r2 = _mm256_loadu_ps(xg + 16), r3 = _mm256_loadu_ps(xg + 24);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpacklo_ps(r2, r3);
    const __m256 t2 = _mm256_unpackhi_ps(r0, r1), t3 = _mm256_unpackhi_ps(r2, r3);
    *c0 = _mm256_shuffle_ps(t0, t1, 0x44);
    *c1 = _mm256_shuffle_ps(t0, t1, 0xEE);
    *c2 = _mm256_shuffle_ps(t2, t3, 0x44);
    *c3 = _mm256_shuffle_ps(t2, t3, 0xEE);
}

/* (min(c0, 0) + min(c1, 0)) + (min(c2, 0) + min(c3, 0)), the reference's
 * order: each group's smallest table entry. */
static inline __m256 sum_min0(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_add_ps(_mm256_add_ps(_mm256_min_ps(c0, zero), _mm256_min_ps(c1, zero)),
                         _mm256_add_ps(_mm256_min_ps(c2, zero), _mm256_min_ps(c3, zero)));
}

/* The first pass of bs_query_lut_build (rabitq.h), eight groups at a time.
 * After transpose_groups8, per lane the float
 * sums are the reference's expressions in its order (minps(x, 0) is
 * x < 0 ? x : 0 for finite x, ties returning the 0; andnot of -0 is
 * fabsf); the double sums then run one group at a time in increasing g,
 * through ORDER, so the bits are the reference's. max is exact and does not
 * depend on the order. */
void bs_lut_sums_avx2(const float *x, uint32_t groups, bs_lut_sums *acc) {
    static const int ORDER[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_set1_ps(acc->range_max);
    double offset = acc->offset, abs_total = acc->abs_total;
    uint32_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256 c0, c1, c2, c3;
        transpose_groups8(x + 4 * g, &c0, &c1, &c2, &c3);
        const __m256 lo = sum_min0(c0, c1, c2, c3);
        const __m256 range = _mm256_add_ps(
            _mm256_add_ps(_mm256_andnot_ps(sign, c0), _mm256_andnot_ps(sign, c1)),
            _mm256_add_ps(_mm256_andnot_ps(sign, c2), _mm256_andnot_ps(sign, c3)));
        vmax = _mm256_max_ps(vmax, range);
        float l[8], r[8];
        _mm256_storeu_ps(l, lo);
        _mm256_storeu_ps(r, range);
        for (int j = 0; j < 8; j++) {
            offset += l[ORDER[j]];
            abs_total += r[ORDER[j]];
        }
    }
    float m[8];
    _mm256_storeu_ps(m, vmax);
    float range_max = m[0];
    for (int j = 1; j < 8; j++) range_max = m[j] > range_max ? m[j] : range_max;
    acc->range_max = range_max;
    acc->offset = offset;
    acc->abs_total = abs_total;
    bs_lut_sums_ref(x + 4 * g, groups - g, acc);
}

/* The table fill, eight groups at a time, in bs_lut_fill_sse2's scheme:
 * after transpose_groups8, register ci holds
 * coordinate i of groups g, g+2, g+4, g+6 (lane 0) and g+1, g+3, g+5, g+7
 * (lane 1), so each entry m = i + 4k of eight groups is the reference's
 * ((a_i + bk_k) - lo) * inv + 0.5 on whole registers, with a = (0, x0, x1,
 * x0 + x1), bk = (0, x2, x3, x2 + x3) and lo = (min(x0, 0) + min(x1, 0)) +
 * (min(x2, 0) + min(x3, 0)) (minps(x, 0) is x < 0 ? x : 0 for finite x).
 * minps(t, 255) is the reference's t < 255 ? t : 255 (NaN gives 255). The
 * reference's max(t, 0) is left to the saturating packs: cvttps of any t < 0
 * (or below -2^31) is 0 or negative, which packs to 0, exactly what the
 * clamp gives, and t <= 255 after the min converts unchanged. The packs
 * and unpacks are SSE2's, lane by lane: they leave register r holding
 * group g + 2r in lane 0 and g + 2r + 1 in lane 1, i.e. 32 consecutive
 * table bytes. */
void bs_lut_fill_avx2(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    const __m256 vinv = _mm256_set1_ps(inv), vhalf = _mm256_set1_ps(0.5f);
    const __m256 v255 = _mm256_set1_ps(255.0f), zero = _mm256_setzero_ps();
    size_t g = 0; /* size_t: no zero extension in the address arithmetic */
    for (; g + 8 <= groups; g += 8) {
        __m256 c0, c1, c2, c3;
        transpose_groups8(x + 4 * g, &c0, &c1, &c2, &c3);
        const __m256 lo = sum_min0(c0, c1, c2, c3);
        const __m256 a[4] = {zero, c0, c1, _mm256_add_ps(c0, c1)};
        const __m256 bk[4] = {zero, c2, c3, _mm256_add_ps(c2, c3)};
        /* bm[k]: entries 4k..4k+3, packed as soon as they exist (sixteen
         * live entry registers would spill) */
        __m256i bm[4];
        for (unsigned k = 0; k < 4; k++) {
            __m256i q[4];
            for (unsigned i = 0; i < 4; i++) {
                const __m256 d = _mm256_sub_ps(_mm256_add_ps(a[i], bk[k]), lo);
                const __m256 t = _mm256_add_ps(_mm256_mul_ps(d, vinv), vhalf);
                q[i] = _mm256_cvttps_epi32(_mm256_min_ps(t, v255));
            }
            bm[k] = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]),
                                        _mm256_packs_epi32(q[2], q[3]));
        }
        const __m256i l01 = _mm256_unpacklo_epi8(bm[0], bm[1]);
        const __m256i h01 = _mm256_unpackhi_epi8(bm[0], bm[1]);
        const __m256i l23 = _mm256_unpacklo_epi8(bm[2], bm[3]);
        const __m256i h23 = _mm256_unpackhi_epi8(bm[2], bm[3]);
        const __m256i v0 = _mm256_unpacklo_epi16(l01, l23), v1 = _mm256_unpackhi_epi16(l01, l23);
        const __m256i v2 = _mm256_unpacklo_epi16(h01, h23), v3 = _mm256_unpackhi_epi16(h01, h23);
        const __m256i lo01 = _mm256_unpacklo_epi8(v0, v1), lo23 = _mm256_unpacklo_epi8(v2, v3);
        const __m256i hi01 = _mm256_unpackhi_epi8(v0, v1), hi23 = _mm256_unpackhi_epi8(v2, v3);
        __m256i *out = (__m256i *)(void *)(tables + g * 16);
        _mm256_storeu_si256(out, _mm256_unpacklo_epi16(lo01, lo23));
        _mm256_storeu_si256(out + 1, _mm256_unpackhi_epi16(lo01, lo23));
        _mm256_storeu_si256(out + 2, _mm256_unpacklo_epi16(hi01, hi23));
        _mm256_storeu_si256(out + 3, _mm256_unpackhi_epi16(hi01, hi23));
    }
    bs_lut_fill_ref(x + 4 * g, (uint32_t)(groups - g), inv, tables + g * 16);
}
