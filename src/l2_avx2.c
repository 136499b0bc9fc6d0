/* AVX2 versions of ivf.c's fixed-order double sums (built with -mavx2; run
 * only after bs_simd_supported(BS_SIMD_AVX2)). Lane l of the two registers
 * is partial sum l of bs_l2sq_fixed / bs_norm2_fixed (element i + l of each
 * step of 8), accumulated in the same order and combined by the same
 * expression, without FMA: the same bits, half the instructions. */
#include "ivf_internal.h"

#if !defined(__AVX2__)
#error "l2_avx2.c must be compiled with -mavx2"
#endif

#include <immintrin.h>

/* The lanes of term(i) for i in [i, i + 4) as doubles: a - b, or a alone
 * when b is NULL (constant in each inlined caller). */
static inline __m256d term4(const float *a, const float *b, uint32_t i) {
    __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(a + i));
    return b ? _mm256_sub_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(b + i))) : x;
}

static inline double sumsq_fixed_avx2(const float *a, const float *b, uint32_t d) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    uint32_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256d t0 = term4(a, b, i), t1 = term4(a, b, i + 4);
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(t0, t0));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(t1, t1));
    }
    double acc[8];
    _mm256_storeu_pd(acc, s0);
    _mm256_storeu_pd(acc + 4, s1);
    double s = bs_combine8(acc);
    for (; i < d; i++) {
        double t = b ? (double)a[i] - (double)b[i] : (double)a[i];
        s += t * t;
    }
    return s;
}

double bs_l2sq_fixed_avx2(const float *a, const float *b, uint32_t d) {
    return sumsq_fixed_avx2(a, b, d);
}

double bs_norm2_fixed_avx2(const float *a, uint32_t d) { return sumsq_fixed_avx2(a, NULL, d); }
