/* See bounds.h. SSE2 is the x86-64 baseline: its loop is what every
 * x86-64 build runs at the scalar level; the AVX2 and AVX-512 versions are
 * in bounds_avx2.c and bounds_avx512.c; the reference is the definition. */
#include "bounds.h"

#include <math.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "rabitq.h"

static inline float lower_bound_one(uint32_t sum, float norm2, float s1, float corr,
                                    const bs_bound_params *p) {
    float ip_y = ((p->delta * (float)sum + p->offset) - p->half_qsum) + corr;
    float est = p->base * norm2 + p->qterm - p->scale * s1 * ip_y;
    float f1 = bs_f1_from(norm2, s1, p->quarter_d, p->inv_sqrt_dm1);
    float bound = p->ferr * f1 + p->lerr * fabsf(s1);
    return est - bound;
}

void bs_lower_bounds_ref(const uint32_t *sums, const float *norm2, const float *s1,
                         const float *corr, size_t n, const bs_bound_params *p, float *out) {
    for (size_t i = 0; i < n; i++)
        out[i] = lower_bound_one(sums[i], norm2[i], s1[i], corr[i], p);
}

void bs_lower_bounds_sse2(const uint32_t *sums, const float *norm2, const float *s1,
                          const float *corr, size_t n, const bs_bound_params *p, float *out) {
    size_t i = 0;
#if defined(__SSE2__)
    const __m128 delta = _mm_set1_ps(p->delta), offset = _mm_set1_ps(p->offset);
    const __m128 half_qsum = _mm_set1_ps(p->half_qsum), base = _mm_set1_ps(p->base);
    const __m128 qterm = _mm_set1_ps(p->qterm), scale = _mm_set1_ps(p->scale);
    const __m128 ferr = _mm_set1_ps(p->ferr), lerr = _mm_set1_ps(p->lerr);
    const __m128 qd = _mm_set1_ps(p->quarter_d), isd = _mm_set1_ps(p->inv_sqrt_dm1);
    const __m128 zero = _mm_setzero_ps();
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (; i + 4 <= n; i += 4) {
        /* sums < 2^31: the signed conversion is the unsigned one */
        __m128 sum = _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)(const void *)(sums + i)));
        __m128 nr = _mm_loadu_ps(norm2 + i), s = _mm_loadu_ps(s1 + i);
        __m128 ip_y = _mm_add_ps(_mm_sub_ps(_mm_add_ps(_mm_mul_ps(delta, sum), offset), half_qsum),
                                 _mm_loadu_ps(corr + i));
        __m128 est = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(base, nr), qterm),
                                _mm_mul_ps(_mm_mul_ps(scale, s), ip_y));
        /* bs_f1_from: t > 0 ? t : 0 is max(t, 0) for every t, NaN and -0
         * included (maxps returns its second operand unless t > 0). */
        __m128 t = _mm_sub_ps(_mm_mul_ps(_mm_mul_ps(qd, s), s), nr);
        __m128 f1 = _mm_mul_ps(_mm_sqrt_ps(_mm_max_ps(t, zero)), isd);
        __m128 bound = _mm_add_ps(_mm_mul_ps(ferr, f1), _mm_mul_ps(lerr, _mm_and_ps(s, abs_mask)));
        _mm_storeu_ps(out + i, _mm_sub_ps(est, bound));
    }
#endif
    for (; i < n; i++) out[i] = lower_bound_one(sums[i], norm2[i], s1[i], corr[i], p);
}

void bs_lower_bounds(const uint32_t *sums, const float *norm2, const float *s1,
                     const float *corr, size_t n, const bs_bound_params *p, float *out) {
    bs_lower_bounds_sse2(sums, norm2, s1, corr, n, p, out);
}

void bs_lower_bounds_mask_ref(const uint32_t *sums, const float *norm2, const float *s1,
                              const float *corr, size_t n, const bs_bound_params *p,
                              float threshold, float *out, uint32_t *mask) {
    memset(mask, 0, (n + 31) / 32 * sizeof *mask);
    for (size_t i = 0; i < n; i++) {
        out[i] = lower_bound_one(sums[i], norm2[i], s1[i], corr[i], p);
        mask[i / 32] |= (uint32_t)!(out[i] > threshold) << (i % 32);
    }
}

/* bs_lower_bounds_sse2's lanes, and cmpngtps for the mask: not greater
 * (NaN included) is the reference's !(lb > threshold). */
void bs_lower_bounds_mask_sse2(const uint32_t *sums, const float *norm2, const float *s1,
                               const float *corr, size_t n, const bs_bound_params *p,
                               float threshold, float *out, uint32_t *mask) {
#if defined(__SSE2__)
    const size_t whole = n / 32 * 32;
    bs_lower_bounds_sse2(sums, norm2, s1, corr, whole, p, out);
    const __m128 thr = _mm_set1_ps(threshold);
    for (size_t w = 0; w < whole / 32; w++) {
        uint32_t m = 0;
        for (unsigned j = 0; j < 8; j++)
            m |= (uint32_t)_mm_movemask_ps(_mm_cmpngt_ps(_mm_loadu_ps(out + 32 * w + 4 * j),
                                                         thr))
                 << (4 * j);
        mask[w] = m;
    }
    bs_lower_bounds_mask_ref(sums + whole, norm2 + whole, s1 + whole, corr + whole, n - whole, p,
                             threshold, out + whole, mask + whole / 32);
#else
    bs_lower_bounds_mask_ref(sums, norm2, s1, corr, n, p, threshold, out, mask);
#endif
}

bs_bounds_fn bs_lower_bounds_kernel(bs_simd_level level) {
    switch (level) {
    case BS_SIMD_AVX2: return bs_lower_bounds_mask_avx2;
    case BS_SIMD_AVX512: return bs_lower_bounds_mask_avx512;
    case BS_SIMD_SCALAR: break;
    }
    return bs_lower_bounds_mask_sse2;
}
