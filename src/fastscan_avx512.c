/* The AVX-512 FastScan kernel (built with -mavx512f -mavx512bw -mavx512vl
 * -mavx512dq ...; run only after bs_simd_supported(BS_SIMD_AVX512)). The
 * AVX2 kernel widened: one 512-bit load takes four consecutive groups of a
 * block (lane l = group g + l) and the four matching tables, VPSHUFB
 * looks the low nibbles (vectors 0..15) and the high nibbles (vectors
 * 16..31) up in each lane's own table. Output equals bs_fastscan_scalar
 * exactly. Kept deliberately plain: the machines that develop bitshard
 * cannot run it, so it is checked against the scalar kernel only where
 * AVX-512 exists. */
#include "rabitq.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX2__)
#error "fastscan_avx512.c must be compiled with -mavx512f -mavx512bw -mavx2"
#endif

#include <immintrin.h>

/* Steps of four groups accumulated in uint16 before a flush into uint32:
 * each step adds at most 255 to a word, 256 * 255 < 65536. */
#define BS_AVX512_CHUNK 256u

/* 32 uint16 words (lane l: 8 words of groups g + l) -> 8 uint32 sums of
 * the four lanes. */
static inline __m256i bs_lanes4_to_u32(__m512i v) {
    __m256i s = _mm256_cvtepu16_epi32(_mm512_extracti32x4_epi32(v, 0));
    s = _mm256_add_epi32(s,
                         _mm256_cvtepu16_epi32(_mm512_extracti32x4_epi32(v, 1)));
    s = _mm256_add_epi32(s,
                         _mm256_cvtepu16_epi32(_mm512_extracti32x4_epi32(v, 2)));
    s = _mm256_add_epi32(s,
                         _mm256_cvtepu16_epi32(_mm512_extracti32x4_epi32(v, 3)));
    return s;
}

/* One block: 32 sums into out. */
static void bs_scan_avx512(const uint8_t *codes, const uint8_t *lut,
                           uint32_t quads, uint32_t *out) {
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    /* Even / odd vectors of the low half, even / odd of the high half. */
    __m256i s32[4];
    for (int k = 0; k < 4; k++) s32[k] = _mm256_setzero_si256();

    for (uint32_t q0 = 0; q0 < quads; q0 += BS_AVX512_CHUNK) {
        const uint32_t q1 =
            quads - q0 < BS_AVX512_CHUNK ? quads : q0 + BS_AVX512_CHUNK;
        /* As in the AVX2 kernel: acc0 = even + 256 odd (mod 2^16), acc1 =
         * odd, so even = acc0 - 256 acc1 exactly; likewise 2 and 3. */
        __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
        __m512i acc2 = _mm512_setzero_si512(), acc3 = _mm512_setzero_si512();
        for (uint32_t q = q0; q < q1; q++) {
            const __m512i tab = _mm512_loadu_si512(lut + (size_t)q * 64);
            const __m512i c = _mm512_loadu_si512(codes + (size_t)q * 64);
            const __m512i lo = _mm512_and_si512(c, m0f);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m0f);
            const __m512i rl = _mm512_shuffle_epi8(tab, lo);
            const __m512i rh = _mm512_shuffle_epi8(tab, hi);
            acc0 = _mm512_add_epi16(acc0, rl);
            acc1 = _mm512_add_epi16(acc1, _mm512_srli_epi16(rl, 8));
            acc2 = _mm512_add_epi16(acc2, rh);
            acc3 = _mm512_add_epi16(acc3, _mm512_srli_epi16(rh, 8));
        }
        const __m512i even_lo = _mm512_sub_epi16(acc0, _mm512_slli_epi16(acc1, 8));
        const __m512i even_hi = _mm512_sub_epi16(acc2, _mm512_slli_epi16(acc3, 8));
        s32[0] = _mm256_add_epi32(s32[0], bs_lanes4_to_u32(even_lo));
        s32[1] = _mm256_add_epi32(s32[1], bs_lanes4_to_u32(acc1));
        s32[2] = _mm256_add_epi32(s32[2], bs_lanes4_to_u32(even_hi));
        s32[3] = _mm256_add_epi32(s32[3], bs_lanes4_to_u32(acc3));
    }

    /* Word k of s32[2h] is vector 16h + 2k, of s32[2h + 1] vector
     * 16h + 2k + 1: interleave exactly as the AVX2 kernel does. */
    for (int h = 0; h < 2; h++) {
        const __m256i t0 = _mm256_unpacklo_epi32(s32[2 * h], s32[2 * h + 1]);
        const __m256i t1 = _mm256_unpackhi_epi32(s32[2 * h], s32[2 * h + 1]);
        _mm256_storeu_si256((__m256i *)(out + 16 * h),
                            _mm256_permute2x128_si256(t0, t1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 16 * h + 8),
                            _mm256_permute2x128_si256(t0, t1, 0x31));
    }
}

void bs_fastscan_avx512(const uint8_t *blocks, size_t nblocks,
                        const uint8_t *lut, uint32_t D, uint32_t *out) {
    /* D is a multiple of 64, so D / 4 groups form D / 16 whole quads. */
    const uint32_t quads = D / 16;
    const size_t stride = bs_fastscan_block_bytes(D);
    for (size_t blk = 0; blk < nblocks; blk++)
        bs_scan_avx512(blocks + blk * stride, lut, quads, out + blk * 32);
}

/* bs_lut_fill_avx2 widened to four groups per register (lane L: group
 * g + L); every entry is the same operations in the same order, so the
 * same bytes as bs_lut_fill_ref (see the AVX2 version for why). */
void bs_lut_fill_avx512(const float *x, uint32_t groups, float inv, uint8_t *tables) {
    const __m512 vinv = _mm512_set1_ps(inv), vhalf = _mm512_set1_ps(0.5f);
    const __m512 v255 = _mm512_set1_ps(255.0f), zero = _mm512_setzero_ps();
    size_t g = 0; /* size_t: no zero extension in the address arithmetic */
    for (; g + 4 <= groups; g += 4) {
        const __m512 X = _mm512_loadu_ps(x + 4 * g);
        const __m512 M = _mm512_min_ps(X, zero);
        const __m512 P = _mm512_add_ps(M, _mm512_permute_ps(M, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m512 lo = _mm512_add_ps(P, _mm512_permute_ps(P, _MM_SHUFFLE(1, 0, 3, 2)));
        const __m512 S = _mm512_add_ps(X, _mm512_permute_ps(X, _MM_SHUFFLE(2, 3, 0, 1)));
        const __m512 T = _mm512_shuffle_ps(X, S, _MM_SHUFFLE(2, 0, 1, 0));
        const __m512 A = _mm512_maskz_permute_ps(0xEEEE, T, _MM_SHUFFLE(2, 1, 0, 0));
        const __m512 Bk[4] = {zero, _mm512_permute_ps(X, _MM_SHUFFLE(2, 2, 2, 2)),
                              _mm512_permute_ps(X, _MM_SHUFFLE(3, 3, 3, 3)),
                              _mm512_permute_ps(T, _MM_SHUFFLE(3, 3, 3, 3))};
        __m512i e[4];
        for (int k = 0; k < 4; k++) {
            const __m512 d = _mm512_sub_ps(_mm512_add_ps(A, Bk[k]), lo);
            const __m512 t = _mm512_add_ps(_mm512_mul_ps(d, vinv), vhalf);
            e[k] = _mm512_cvttps_epi32(_mm512_min_ps(t, v255));
        }
        const __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(e[0], e[1]),
                                              _mm512_packs_epi32(e[2], e[3]));
        _mm512_storeu_si512((void *)(tables + g * 16), b);
    }
    bs_lut_fill_ref(x + 4 * g, (uint32_t)(groups - g), inv, tables + g * 16);
}
