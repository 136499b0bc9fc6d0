/* The portable and SSE2 float dot products of dot.h, and the dispatch. */
#include "dot.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static float combine8(const float acc[8], float tail) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) +
           tail;
}

float bs_dot_ref(const float *a, const float *b, uint32_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (uint32_t j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return combine8(acc, tail);
}

/* Stage 2 reads a handful of codes per probed partition. Rather than
 * walking bits, it sums these tables per 4-dimension group. Each entry
 * adds the set bits' values to the entry without its lowest bit, so entry
 * m is ((+0 + x[top bit]) + ...) + x[lowest bit]: the order every variant
 * keeps. */
void bs_nibble_tables_ref(const float *x, uint32_t D, float *t) {
    for (uint32_t g = 0; g < D / 4; g++) {
        const float *q = x + 4 * g;
        float *tg = t + 16 * g;
        tg[0] = 0.0f;
        for (uint32_t m = 1; m < 16; m++)
            tg[m] = tg[m & (m - 1)] + q[__builtin_ctz(m)];
    }
}

float bs_sum(const float *x, uint32_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (uint32_t j = 0; j < 8; j++) acc[j] += x[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += x[i];
    return combine8(acc, tail);
}

void bs_residual_ref(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                     float *sum) {
    for (uint32_t i = 0; i < n; i++) out[i] = b != NULL ? a[i] - b[i] : a[i];
    *norm2 = bs_dot_ref(out, out, n);
    *sum = bs_sum(out, n);
}

void bs_dot4_ref(const float *q, const float *const rows[4], uint32_t n, float out[4]) {
    for (int r = 0; r < 4; r++) out[r] = bs_dot_ref(q, rows[r], n);
}

float bs_u8_dot_ref(const uint8_t *e, const float *x, uint32_t D) {
    float acc[16] = {0};
    for (uint32_t i = 0; i < D; i++) acc[i % 16] += (float)e[i] * x[i];
    float h[8];
    for (int j = 0; j < 8; j++) h[j] = acc[j] + acc[j + 8];
    return combine8(h, 0.0f);
}

#if defined(__SSE2__)
float bs_dot(const float *a, const float *b, uint32_t n) {
    __m128 lo = _mm_setzero_ps(), hi = _mm_setzero_ps();
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        lo = _mm_add_ps(lo, _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
        hi = _mm_add_ps(hi, _mm_mul_ps(_mm_loadu_ps(a + i + 4), _mm_loadu_ps(b + i + 4)));
    }
    float acc[8];
    _mm_storeu_ps(acc, lo);
    _mm_storeu_ps(acc + 4, hi);
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return combine8(acc, tail);
}

/* Four rows at once: one dot is a chain of dependent adds, four
 * interleaved keep the adder busy. */
void bs_dot4_sse2(const float *q, const float *const rows[4], uint32_t n, float out[4]) {
    const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    __m128 lo0 = _mm_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0,
           lo3 = lo0, hi3 = lo0;
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128 qa = _mm_loadu_ps(q + i), qb = _mm_loadu_ps(q + i + 4);
        lo0 = _mm_add_ps(lo0, _mm_mul_ps(qa, _mm_loadu_ps(r0 + i)));
        hi0 = _mm_add_ps(hi0, _mm_mul_ps(qb, _mm_loadu_ps(r0 + i + 4)));
        lo1 = _mm_add_ps(lo1, _mm_mul_ps(qa, _mm_loadu_ps(r1 + i)));
        hi1 = _mm_add_ps(hi1, _mm_mul_ps(qb, _mm_loadu_ps(r1 + i + 4)));
        lo2 = _mm_add_ps(lo2, _mm_mul_ps(qa, _mm_loadu_ps(r2 + i)));
        hi2 = _mm_add_ps(hi2, _mm_mul_ps(qb, _mm_loadu_ps(r2 + i + 4)));
        lo3 = _mm_add_ps(lo3, _mm_mul_ps(qa, _mm_loadu_ps(r3 + i)));
        hi3 = _mm_add_ps(hi3, _mm_mul_ps(qb, _mm_loadu_ps(r3 + i + 4)));
    }
    const __m128 lo[4] = {lo0, lo1, lo2, lo3}, hi[4] = {hi0, hi1, hi2, hi3};
    for (int r = 0; r < 4; r++) {
        float acc[8];
        _mm_storeu_ps(acc, lo[r]);
        _mm_storeu_ps(acc + 4, hi[r]);
        float tail = 0.0f;
        for (uint32_t j = i; j < n; j++) tail += q[j] * rows[r][j];
        out[r] = combine8(acc, tail);
    }
}

/* The three passes of bs_residual_ref in one: eight lanes in two
 * registers for each sum. */
void bs_residual_sse2(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                      float *sum) {
    __m128 n0 = _mm_setzero_ps(), n1 = n0, s0 = n0, s1 = n0;
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128 v0 = _mm_loadu_ps(a + i), v1 = _mm_loadu_ps(a + i + 4);
        if (b != NULL) {
            v0 = _mm_sub_ps(v0, _mm_loadu_ps(b + i));
            v1 = _mm_sub_ps(v1, _mm_loadu_ps(b + i + 4));
        }
        _mm_storeu_ps(out + i, v0);
        _mm_storeu_ps(out + i + 4, v1);
        n0 = _mm_add_ps(n0, _mm_mul_ps(v0, v0));
        n1 = _mm_add_ps(n1, _mm_mul_ps(v1, v1));
        s0 = _mm_add_ps(s0, v0);
        s1 = _mm_add_ps(s1, v1);
    }
    float accn[8], accs[8];
    _mm_storeu_ps(accn, n0);
    _mm_storeu_ps(accn + 4, n1);
    _mm_storeu_ps(accs, s0);
    _mm_storeu_ps(accs + 4, s1);
    float tn = 0.0f, ts = 0.0f;
    for (; i < n; i++) {
        const float v = b != NULL ? a[i] - b[i] : a[i];
        out[i] = v;
        tn += v * v;
        ts += v;
    }
    *norm2 = combine8(accn, tn);
    *sum = combine8(accs, ts);
}

/* Sixteen lanes are four SSE registers, so the adds do not queue on one. */
float bs_u8_dot_sse2(const uint8_t *e, const float *x, uint32_t D) {
    const __m128i zero = _mm_setzero_si128();
    __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (uint32_t i = 0; i + 16 <= D; i += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(e + i));
        const __m128i w0 = _mm_unpacklo_epi8(b, zero), w1 = _mm_unpackhi_epi8(b, zero);
        a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_cvtepi32_ps(_mm_unpacklo_epi16(w0, zero)),
                                       _mm_loadu_ps(x + i)));
        a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_cvtepi32_ps(_mm_unpackhi_epi16(w0, zero)),
                                       _mm_loadu_ps(x + i + 4)));
        a2 = _mm_add_ps(a2, _mm_mul_ps(_mm_cvtepi32_ps(_mm_unpacklo_epi16(w1, zero)),
                                       _mm_loadu_ps(x + i + 8)));
        a3 = _mm_add_ps(a3, _mm_mul_ps(_mm_cvtepi32_ps(_mm_unpackhi_epi16(w1, zero)),
                                       _mm_loadu_ps(x + i + 12)));
    }
    float acc[16];
    _mm_storeu_ps(acc, a0);
    _mm_storeu_ps(acc + 4, a1);
    _mm_storeu_ps(acc + 8, a2);
    _mm_storeu_ps(acc + 12, a3);
    float h[8];
    for (int j = 0; j < 8; j++) h[j] = acc[j] + acc[j + 8];
    return combine8(h, 0.0f);
}
#else
float bs_dot(const float *a, const float *b, uint32_t n) { return bs_dot_ref(a, b, n); }
void bs_dot4_sse2(const float *q, const float *const rows[4], uint32_t n, float out[4]) {
    bs_dot4_ref(q, rows, n, out);
}
float bs_u8_dot_sse2(const uint8_t *e, const float *x, uint32_t D) {
    return bs_u8_dot_ref(e, x, D);
}
void bs_residual_sse2(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                      float *sum) {
    bs_residual_ref(a, b, n, out, norm2, sum);
}
#endif

void bs_dot_kernels_get(bs_simd_level level, bs_dot_kernels *out) {
    if (level == BS_SIMD_AVX2 || level == BS_SIMD_AVX512) {
        out->dot4 = bs_dot4_avx2;
        out->u8_dot = bs_u8_dot_avx2;
        out->residual = bs_residual_avx2;
        out->nibble_tables = bs_nibble_tables_avx2;
        out->to_f16 = bs_to_f16_avx2;
        out->dot4_f16 = bs_dot4_f16_avx2;
    } else {
        out->dot4 = bs_dot4_sse2;
        out->u8_dot = bs_u8_dot_sse2;
        out->residual = bs_residual_sse2;
        out->nibble_tables = bs_nibble_tables_ref;
        out->to_f16 = NULL;
        out->dot4_f16 = NULL;
    }
}
