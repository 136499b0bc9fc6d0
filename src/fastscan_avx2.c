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

/* The first pass of bs_query_lut_build (rabitq.h), eight groups at a time.
 * Loads r0..r3 hold groups (g, g+1), (g+2, g+3), (g+4, g+5), (g+6, g+7);
 * the in-lane 4x4 transpose leaves coordinate i of groups g, g+2, g+4, g+6
 * in lane 0 of ci and of g+1, g+3, g+5, g+7 in lane 1. Per lane the float
 * sums are the reference's expressions in its order (minps(x, 0) is
 * x < 0 ? x : 0 for finite x, ties returning the 0; andnot of -0 is
 * fabsf); the double sums then run one group at a time in increasing g,
 * through ORDER, so the bits are the reference's. max is exact and does not
 * depend on the order. */
void bs_lut_sums_avx2(const float *x, uint32_t groups, bs_lut_sums *acc) {
    static const int ORDER[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_set1_ps(acc->range_max);
    double offset = acc->offset, abs_total = acc->abs_total;
    uint32_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        const float *xg = x + 4 * g;
        const __m256 r0 = _mm256_loadu_ps(xg), r1 = _mm256_loadu_ps(xg + 8);
        const __m256 r2 = _mm256_loadu_ps(xg + 16), r3 = _mm256_loadu_ps(xg + 24);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpacklo_ps(r2, r3);
        const __m256 t2 = _mm256_unpackhi_ps(r0, r1), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 c0 = _mm256_shuffle_ps(t0, t1, 0x44), c1 = _mm256_shuffle_ps(t0, t1, 0xEE);
        const __m256 c2 = _mm256_shuffle_ps(t2, t3, 0x44), c3 = _mm256_shuffle_ps(t2, t3, 0xEE);
        const __m256 lo = _mm256_add_ps(
            _mm256_add_ps(_mm256_min_ps(c0, zero), _mm256_min_ps(c1, zero)),
            _mm256_add_ps(_mm256_min_ps(c2, zero), _mm256_min_ps(c3, zero)));
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

/* One table entry per lane for two groups (lane L: group g + L): entry
 * m = i + 4k is ((a_i + bk_k) - lo) * inv + 0.5 with a = (0, x0, x1,
 * x0 + x1), bk = (0, x2, x3, x2 + x3), as in bs_lut_fill_ref. Register
 * e_k holds entries 4k..4k+3 of each group, so the two saturating packs
 * put entries 0..15 of a group in order into its 16 bytes. Same values:
 * x1 + x0 is x0 + x1 (addition commutes bit for bit), so the pairwise sums
 * may come from either lane; lo is the reference's ((m0 + m1) + (m2 + m3))
 * in every lane. minps(t, 255) is the reference's t < 255 ? t : 255 (NaN
 * gives 255). The reference's max(t, 0) is left to the packs: cvttps of
 * any t < 0 (or below -2^31) is 0 or negative, which packs to 0, exactly
 * what the clamp gives, and t <= 255 after the min converts unchanged. */
void bs_lut_fill_avx2(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    const __m256 vinv = _mm256_set1_ps(inv), vhalf = _mm256_set1_ps(0.5f);
    const __m256 v255 = _mm256_set1_ps(255.0f), zero = _mm256_setzero_ps();
    size_t g = 0; /* size_t: no zero extension in the address arithmetic */
    for (; g + 2 <= groups; g += 2) {
        const __m256 X = _mm256_loadu_ps(x + 4 * g); /* (x0 x1 x2 x3) per lane */
        const __m256 M = _mm256_min_ps(X, zero);
        const __m256 P = _mm256_add_ps(M, _mm256_permute_ps(M, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m256 lo = _mm256_add_ps(P, _mm256_permute_ps(P, _MM_SHUFFLE(1, 0, 3, 2)));
        /* S = (x0 + x1, x1 + x0, x2 + x3, x3 + x2); T = (x0, x1, x0 + x1, x2 + x3) */
        const __m256 S = _mm256_add_ps(X, _mm256_permute_ps(X, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m256 T = _mm256_shuffle_ps(X, S, _MM_SHUFFLE(2, 0, 1, 0));
        const __m256 A =
            _mm256_blend_ps(_mm256_permute_ps(T, _MM_SHUFFLE(2, 1, 0, 0)), zero, 0x11);
        const __m256 Bk[4] = {zero, _mm256_permute_ps(X, _MM_SHUFFLE(2, 2, 2, 2)),
                              _mm256_permute_ps(X, _MM_SHUFFLE(3, 3, 3, 3)),
                              _mm256_permute_ps(T, _MM_SHUFFLE(3, 3, 3, 3))};
        __m256i e[4];
        for (int k = 0; k < 4; k++) {
            const __m256 d = _mm256_sub_ps(_mm256_add_ps(A, Bk[k]), lo);
            const __m256 t = _mm256_add_ps(_mm256_mul_ps(d, vinv), vhalf);
            e[k] = _mm256_cvttps_epi32(_mm256_min_ps(t, v255));
        }
        const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(e[0], e[1]),
                                              _mm256_packs_epi32(e[2], e[3]));
        _mm256_storeu_si256((__m256i *)(void *)(tables + g * 16), b);
    }
    bs_lut_fill_ref(x + 4 * g, (uint32_t)(groups - g), inv, tables + g * 16);
}
