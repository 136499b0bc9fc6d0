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

static double combine8(const double acc[8]) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

double bs_l2sq_fixed_avx2(const float *a, const float *b, uint32_t d) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    uint32_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256d t0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)),
                                   _mm256_cvtps_pd(_mm_loadu_ps(b + i)));
        __m256d t1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i + 4)),
                                   _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4)));
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(t0, t0));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(t1, t1));
    }
    double acc[8];
    _mm256_storeu_pd(acc, s0);
    _mm256_storeu_pd(acc + 4, s1);
    double s = combine8(acc);
    for (; i < d; i++) {
        double t = (double)a[i] - (double)b[i];
        s += t * t;
    }
    return s;
}

double bs_norm2_fixed_avx2(const float *a, uint32_t d) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    uint32_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256d t0 = _mm256_cvtps_pd(_mm_loadu_ps(a + i));
        __m256d t1 = _mm256_cvtps_pd(_mm_loadu_ps(a + i + 4));
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(t0, t0));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(t1, t1));
    }
    double acc[8];
    _mm256_storeu_pd(acc, s0);
    _mm256_storeu_pd(acc + 4, s1);
    double s = combine8(acc);
    for (; i < d; i++) {
        double t = (double)a[i];
        s += t * t;
    }
    return s;
}
