/* Stage 1's bounds and filter mask with AVX2 (bounds.h; built with -mavx2
 * -mfma -mbmi2 -mf16c and -ffp-contract=off, run only after
 * bs_simd_supported(BS_SIMD_AVX2)). bs_lower_bounds_sse2 on eight lanes:
 * every lane computes the reference's operations in its order (no FMA:
 * products and sums are separate instructions), so the same bits. */
#include "bounds.h"

#if !defined(__AVX2__)
#error "bounds_avx2.c must be compiled with -mavx2"
#endif

#include <immintrin.h>

/* The lower bounds of eight codes (bs_lower_bounds_sse2's lanes). */
typedef struct bs_bounds8 {
    __m256 delta, offset, half_qsum, base, qterm, scale, ferr, lerr, qd, isd, zero, abs_mask;
} bs_bounds8;

static inline __m256 bs_lb8(const bs_bounds8 *c, __m256i sums, __m256 nr, __m256 s,
                            __m256 corr) {
    /* sums < 2^31: the signed conversion is the unsigned one */
    const __m256 sum = _mm256_cvtepi32_ps(sums);
    const __m256 ip_y = _mm256_add_ps(
        _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(c->delta, sum), c->offset), c->half_qsum), corr);
    const __m256 est = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(c->base, nr), c->qterm),
                                     _mm256_mul_ps(_mm256_mul_ps(c->scale, s), ip_y));
    /* bs_f1_from: maxps(t, 0) is t > 0 ? t : 0 for every t, NaN and -0 too */
    const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(c->qd, s), s), nr);
    const __m256 f1 = _mm256_mul_ps(_mm256_sqrt_ps(_mm256_max_ps(t, c->zero)), c->isd);
    const __m256 bound = _mm256_add_ps(_mm256_mul_ps(c->ferr, f1),
                                       _mm256_mul_ps(c->lerr, _mm256_and_ps(s, c->abs_mask)));
    return _mm256_sub_ps(est, bound);
}

/* Eight codes at a time; the last few (a partition's last block is
 * rarely full) through masked loads and stores, which touch nothing past
 * n. The mask: not greater, unordered true, i.e. !(lb > threshold) with
 * NaN passing. */
void bs_lower_bounds_mask_avx2(const uint32_t *sums, const float *norm2, const float *s1,
                               const float *corr, size_t n, const bs_bound_params *p,
                               float threshold, float *out, uint32_t *mask) {
    const bs_bounds8 c = {_mm256_set1_ps(p->delta),     _mm256_set1_ps(p->offset),
                          _mm256_set1_ps(p->half_qsum), _mm256_set1_ps(p->base),
                          _mm256_set1_ps(p->qterm),     _mm256_set1_ps(p->scale),
                          _mm256_set1_ps(p->ferr),      _mm256_set1_ps(p->lerr),
                          _mm256_set1_ps(p->quarter_d), _mm256_set1_ps(p->inv_sqrt_dm1),
                          _mm256_setzero_ps(),
                          _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))};
    const __m256 thr = _mm256_set1_ps(threshold);
    const size_t words = (n + 31) / 32;
    for (size_t w = 0; w < words; w++) {
        uint32_t m = 0;
        for (unsigned j = 0; j < 4; j++) {
            const size_t i = 32 * w + 8 * j;
            if (i >= n) break;
            if (i + 8 <= n) {
                const __m256 lb = bs_lb8(
                    &c, _mm256_loadu_si256((const __m256i *)(const void *)(sums + i)),
                    _mm256_loadu_ps(norm2 + i), _mm256_loadu_ps(s1 + i), _mm256_loadu_ps(corr + i));
                _mm256_storeu_ps(out + i, lb);
                m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(lb, thr, _CMP_NGT_UQ)) << (8 * j);
            } else {
                const int rem = (int)(n - i);
                const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem),
                                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                const __m256 lb = bs_lb8(
                    &c, _mm256_maskload_epi32((const int *)(const void *)(sums + i), live),
                    _mm256_maskload_ps(norm2 + i, live), _mm256_maskload_ps(s1 + i, live),
                    _mm256_maskload_ps(corr + i, live));
                _mm256_maskstore_ps(out + i, live, lb);
                const uint32_t pass =
                    (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(lb, thr, _CMP_NGT_UQ));
                m |= (pass & ((1u << rem) - 1u)) << (8 * j);
            }
        }
        mask[w] = m;
    }
}
