/* The FAST rotation's row transform in AVX2 (rotation_fast.h; built with
 * -mavx2, run only after bs_simd_supported(BS_SIMD_AVX2)). Each element
 * goes through the same product, adds and subtracts as bs_fast_row_sse2
 * (rotation.c), in the same order: the levels of a Walsh-Hadamard
 * transform pair fixed elements, and doing eight pairs per instruction
 * instead of four changes no value. The build has -ffp-contract=off, so
 * no product is fused into a sum. */
#include "rotation_fast.h"

#if !defined(__AVX2__)
#error "rotation_avx2.c must be compiled with -mavx2"
#endif

#include <immintrin.h>

/* Levels 1 and 2 inside each 128-bit half (rotation.c's hadamard4 on two
 * groups of four). a + (b with its sign bit flipped) is exactly a - b. */
static inline __m256 hadamard4x2(__m256 v) {
    const __m256 neg13 = _mm256_castsi256_ps(_mm256_setr_epi32(
        0, (int)0x80000000u, 0, (int)0x80000000u, 0, (int)0x80000000u, 0, (int)0x80000000u));
    const __m256 neg23 = _mm256_castsi256_ps(_mm256_setr_epi32(
        0, 0, (int)0x80000000u, (int)0x80000000u, 0, 0, (int)0x80000000u, (int)0x80000000u));
    __m256 even = _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 2, 0, 0));
    __m256 odd = _mm256_shuffle_ps(v, v, _MM_SHUFFLE(3, 3, 1, 1));
    v = _mm256_add_ps(even, _mm256_xor_ps(odd, neg13));
    __m256 lo = _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 hi = _mm256_shuffle_ps(v, v, _MM_SHUFFLE(3, 2, 3, 2));
    return _mm256_add_ps(lo, _mm256_xor_ps(hi, neg23));
}

/* (lo[j], hi[j]) <- (lo[j] + hi[j], lo[j] - hi[j]), n a multiple of 8. */
static inline void butterfly8(float *lo, float *hi, uint32_t n) {
    for (uint32_t j = 0; j < n; j += 8) {
        const __m256 a = _mm256_loadu_ps(lo + j), b = _mm256_loadu_ps(hi + j);
        _mm256_storeu_ps(lo + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(hi + j, _mm256_sub_ps(a, b));
    }
}

/* x[i] *= d[i], n a multiple of 8. */
static inline void mul_diag8(float *x, const float *d, uint32_t n) {
    for (uint32_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
}

/* rotation.c's signed_fwht: the products and levels 1, 2, 4 in one pass,
 * then levels h and 2h per pass, then the last level alone when the count
 * of levels is odd. n is a power of two >= 16. */
static void signed_fwht8(float *x, const float *d, uint32_t n) {
    for (uint32_t i = 0; i < n; i += 8) {
        __m256 v = hadamard4x2(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
        /* level 4: halves A, B -> A + B, A - B */
        const __m256 sw = _mm256_permute2f128_ps(v, v, 0x01);
        const __m256 sum = _mm256_add_ps(v, sw), dif = _mm256_sub_ps(v, sw);
        _mm256_storeu_ps(x + i, _mm256_permute2f128_ps(sum, dif, 0x20));
    }
    uint32_t h = 8;
    for (; 4 * h <= n; h *= 4) {
        for (uint32_t i = 0; i < n; i += 4 * h) {
            float *p0 = x + i, *p1 = p0 + h, *p2 = p1 + h, *p3 = p2 + h;
            for (uint32_t j = 0; j < h; j += 8) {
                const __m256 v0 = _mm256_loadu_ps(p0 + j), v1 = _mm256_loadu_ps(p1 + j);
                const __m256 v2 = _mm256_loadu_ps(p2 + j), v3 = _mm256_loadu_ps(p3 + j);
                const __m256 a = _mm256_add_ps(v0, v1), b = _mm256_sub_ps(v0, v1);
                const __m256 c = _mm256_add_ps(v2, v3), e = _mm256_sub_ps(v2, v3);
                _mm256_storeu_ps(p0 + j, _mm256_add_ps(a, c));
                _mm256_storeu_ps(p2 + j, _mm256_sub_ps(a, c));
                _mm256_storeu_ps(p1 + j, _mm256_add_ps(b, e));
                _mm256_storeu_ps(p3 + j, _mm256_sub_ps(b, e));
            }
        }
    }
    if (2 * h == n) butterfly8(x, x + h, h);
}

/* bs_fast_row_sse2, step for step. D is a multiple of 64 (so W >= 64, and
 * D - W and D / 2 are multiples of 8). */
void bs_fast_row_avx2(const float *diag, uint32_t D, uint32_t W, int rounds, float *x) {
    const float *d = diag;
    if (W == D) {
        for (int r = 0; r < rounds; r++, d += D) signed_fwht8(x, d, W);
        return;
    }
    const uint32_t half = D / 2, m = D - W;
    for (int r = 0; r < rounds; r++) {
        signed_fwht8(x, d, W);
        mul_diag8(x + W, d + W, m);
        d += D;
        mul_diag8(x, d, m);
        signed_fwht8(x + m, d + m, W);
        d += D;
        butterfly8(x, x + half, half);
    }
}
