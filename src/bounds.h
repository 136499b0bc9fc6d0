/* Stage 1's per-code estimate and lower bound (docs/rabitq.md, "The
 * error bound"): from a FastScan sum and the code's stored factors, for a whole
 * partition at once. The vector version computes, lane by lane, the same
 * operations in the same order as the scalar reference (no FMA, no
 * reassociation), so both give the same bits; tests/c/test_search.c checks
 * it on random and adversarial input. */
#ifndef BS_BOUNDS_H
#define BS_BOUNDS_H

#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

typedef struct bs_bound_params {
    float delta, offset;  /* the query table's scale and offset */
    float half_qsum;      /* 0.5 * sum of qt, the vector the table holds */
    float base;           /* 1 for l2 (the code's norm2 enters), else 0 */
    float qterm;          /* |q'|^2 (l2) or 1 - <c, q> */
    float scale;          /* 2 (l2) or 1 */
    float ferr, lerr;     /* the bound's code and table terms */
    float quarter_d, inv_sqrt_dm1;
} bs_bound_params;

/* out[i] = est_i - bound_i for i < n, with
 *   ip_y  = ((delta * sums[i] + offset) - half_qsum) + corr[i]
 *   est   = (base * norm2[i] + qterm) - (scale * s1[i]) * ip_y
 *   bound = ferr * f1(norm2[i], s1[i]) + lerr * |s1[i]|
 * sums[i] < 2^31. out may be the same memory as sums (written in place). */
void bs_lower_bounds_ref(const uint32_t *sums, const float *norm2, const float *s1,
                         const float *corr, size_t n, const bs_bound_params *p, float *out);
void bs_lower_bounds_sse2(const uint32_t *sums, const float *norm2, const float *s1,
                          const float *corr, size_t n, const bs_bound_params *p, float *out);
/* The best of the two this build has (SSE2 on x86-64). */
void bs_lower_bounds(const uint32_t *sums, const float *norm2, const float *s1,
                     const float *corr, size_t n, const bs_bound_params *p, float *out);

/* Stage 1's filter in the same pass: out as bs_lower_bounds_ref, and, of
 * the (n + 31) / 32 words of mask, bit i % 32 of word i / 32 set exactly
 * when !(out[i] > threshold) (NaN passes, like the scalar test it stands
 * for), every bit past n clear. out may be sums, as above. The reference
 * and the SSE2, AVX2 and AVX-512 versions (the last two only where
 * bs_simd_supported says so) give the same bits and the same mask. */
typedef void (*bs_bounds_fn)(const uint32_t *sums, const float *norm2, const float *s1,
                             const float *corr, size_t n, const bs_bound_params *p,
                             float threshold, float *out, uint32_t *mask);
void bs_lower_bounds_mask_ref(const uint32_t *sums, const float *norm2, const float *s1,
                              const float *corr, size_t n, const bs_bound_params *p,
                              float threshold, float *out, uint32_t *mask);
void bs_lower_bounds_mask_sse2(const uint32_t *sums, const float *norm2, const float *s1,
                               const float *corr, size_t n, const bs_bound_params *p,
                               float threshold, float *out, uint32_t *mask);
void bs_lower_bounds_mask_avx2(const uint32_t *sums, const float *norm2, const float *s1,
                               const float *corr, size_t n, const bs_bound_params *p,
                               float threshold, float *out, uint32_t *mask);
void bs_lower_bounds_mask_avx512(const uint32_t *sums, const float *norm2, const float *s1,
                                 const float *corr, size_t n, const bs_bound_params *p,
                                 float threshold, float *out, uint32_t *mask);
/* The version for a level (SSE2, or the reference off x86-64, for
 * BS_SIMD_SCALAR). */
bs_bounds_fn bs_lower_bounds_kernel(bs_simd_level level);

#endif
