/* Stage 1's bounds and filter mask with AVX-512 (bounds.h; built with the
 * AVX-512 flags of CMakeLists.txt and -ffp-contract=off, run only after
 * bs_simd_supported(BS_SIMD_AVX512)). bs_lower_bounds_mask_avx2 on sixteen
 * lanes, with the comparison straight into a mask register: the same
 * operations per lane in the same order, so the same bits. */
#include "bounds.h"

#if !defined(__AVX512F__) || !defined(__AVX512DQ__)
#error "bounds_avx512.c must be compiled with -mavx512f -mavx512dq"
#endif

#include <immintrin.h>

/* Sixteen codes at a time; the last few through masked loads and stores,
 * which touch nothing past n. */
void bs_lower_bounds_mask_avx512(const uint32_t *sums, const float *norm2, const float *s1,
                                 const float *corr, size_t n, const bs_bound_params *p,
                                 float threshold, float *out, uint32_t *mask) {
    const __m512 delta = _mm512_set1_ps(p->delta), offset = _mm512_set1_ps(p->offset);
    const __m512 half_qsum = _mm512_set1_ps(p->half_qsum), base = _mm512_set1_ps(p->base);
    const __m512 qterm = _mm512_set1_ps(p->qterm), scale = _mm512_set1_ps(p->scale);
    const __m512 ferr = _mm512_set1_ps(p->ferr), lerr = _mm512_set1_ps(p->lerr);
    const __m512 qd = _mm512_set1_ps(p->quarter_d), isd = _mm512_set1_ps(p->inv_sqrt_dm1);
    const __m512 zero = _mm512_setzero_ps(), thr = _mm512_set1_ps(threshold);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const size_t words = (n + 31) / 32;
    for (size_t w = 0; w < words; w++) {
        uint32_t m = 0;
        for (unsigned j = 0; j < 2; j++) {
            const size_t i = 32 * w + 16 * j;
            if (i >= n) break;
            const __mmask16 live =
                i + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            /* sums < 2^31: the signed conversion is the unsigned one */
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, sums + i));
            const __m512 nr = _mm512_maskz_loadu_ps(live, norm2 + i);
            const __m512 s = _mm512_maskz_loadu_ps(live, s1 + i);
            const __m512 ip_y = _mm512_add_ps(
                _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(delta, sum), offset), half_qsum),
                _mm512_maskz_loadu_ps(live, corr + i));
            const __m512 est = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(base, nr), qterm),
                                             _mm512_mul_ps(_mm512_mul_ps(scale, s), ip_y));
            /* bs_f1_from: maxps(t, 0) is t > 0 ? t : 0 for every t, NaN and -0 too */
            const __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(qd, s), s), nr);
            const __m512 f1 = _mm512_mul_ps(_mm512_sqrt_ps(_mm512_max_ps(t, zero)), isd);
            const __m512 bound = _mm512_add_ps(_mm512_mul_ps(ferr, f1),
                                               _mm512_mul_ps(lerr, _mm512_and_ps(s, abs_mask)));
            const __m512 lb = _mm512_sub_ps(est, bound);
            _mm512_mask_storeu_ps(out + i, live, lb);
            /* not greater, unordered true: !(lb > threshold), NaN passing */
            m |= (uint32_t)_mm512_mask_cmp_ps_mask(live, lb, thr, _CMP_NGT_UQ) << (16 * j);
        }
        mask[w] = m;
    }
}
