/* Float dot products of the search: probe selection (query x centroids)
 * and the 9-bit extra code's estimate (u8 x float). Each has one fixed
 * summation order, the contract every variant keeps bit for bit:
 *  - bs_dot: eight partial sums, lane j over i = j mod 8 (i < n - n % 8)
 *    in increasing i, combined ((0+1)+(2+3))+((4+5)+(6+7)), plus the tail
 *    summed in order;
 *  - u8 dot: sixteen partial sums, lane j over i = j mod 16 in increasing
 *    i (D is a multiple of 64), h_j = lane j + lane j + 8, combined like
 *    bs_dot's eight.
 *  - sum: bs_dot's order with x_i in place of the products;
 *  - residual: out = a - b (or a copy of a), then its bs_dot with itself
 *    and its sum, each in its own order above, in one pass;
 *  - nibble tables: entry m of group g is the sum of x[4g + j] over the
 *    set bits j of m, added from the highest bit down to +0.0f
 *    (bs_nibble_tables_ref).
 * No FMA anywhere (products are rounded, then added), so the scalar
 * reference, SSE2 and AVX2 give the same bits; test_dot checks it. */
#ifndef BS_DOT_H
#define BS_DOT_H

#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

typedef struct bs_dot_kernels {
    /* out[r] = bs_dot(q, rows[r], n) for four rows */
    void (*dot4)(const float *q, const float *const rows[4], uint32_t n, float out[4]);
    /* <e, x> for e: D bytes, x: D floats */
    float (*u8_dot)(const uint8_t *e, const float *x, uint32_t D);
    /* Approximate only (any order, FMA allowed; NULL where the CPU has no
     * F16C): the float16 copy of n floats (round to nearest even; finite
     * inputs below 65520 stay finite), and dots of q with four float16
     * rows. Probe selection uses them as a pre-pass with an error bound
     * (probe.c), never for a value it returns. */
    /* out[i] = a[i] - b[i] (a[i] when b is NULL) for i < n, *norm2 =
     * bs_dot(out, out, n), *sum = bs_sum(out, n): a probed partition's
     * q' = Pq - Pc, |q'|^2 and sum(q'). out must not overlap a or b. */
    void (*residual)(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                     float *sum);
    /* Stage 2's tables of x (D floats): t[16 g + m] for group g < D / 4
     * and m < 16, as bs_nibble_tables_ref. */
    void (*nibble_tables)(const float *x, uint32_t D, float *t);
    void (*to_f16)(const float *x, size_t n, uint16_t *out);
    void (*dot4_f16)(const float *q, const uint16_t *const rows[4], uint32_t n, float out[4]);
} bs_dot_kernels;

/* The kernels of a SIMD level (the scalar level uses SSE2 where the
 * compiler targets it: every x86-64 CPU has it). */
void bs_dot_kernels_get(bs_simd_level level, bs_dot_kernels *out);

/* bs_dot in SSE2 where available (one dot, the order above). */
float bs_dot(const float *a, const float *b, uint32_t n);

/* sum_i x_i in bs_dot's order (the reference). */
float bs_sum(const float *x, uint32_t n);

/* The variants, for the tests. */
void bs_residual_ref(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                     float *sum);
void bs_residual_sse2(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                      float *sum);
void bs_residual_avx2(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                      float *sum);
float bs_dot_ref(const float *a, const float *b, uint32_t n);
void bs_dot4_ref(const float *q, const float *const rows[4], uint32_t n, float out[4]);
float bs_u8_dot_ref(const uint8_t *e, const float *x, uint32_t D);
void bs_nibble_tables_ref(const float *x, uint32_t D, float *t);
void bs_nibble_tables_avx2(const float *x, uint32_t D, float *t);
void bs_dot4_sse2(const float *q, const float *const rows[4], uint32_t n, float out[4]);
float bs_u8_dot_sse2(const uint8_t *e, const float *x, uint32_t D);
void bs_dot4_avx2(const float *q, const float *const rows[4], uint32_t n, float out[4]);
float bs_u8_dot_avx2(const uint8_t *e, const float *x, uint32_t D);
void bs_to_f16_avx2(const float *x, size_t n, uint16_t *out);
void bs_dot4_f16_avx2(const float *q, const uint16_t *const rows[4], uint32_t n, float out[4]);

#endif
