/* The AVX2 dot products of dot.h (built with -mavx2 -mfma -mbmi2 -mf16c; run only
 * after bs_simd_supported(BS_SIMD_AVX2)). One 256-bit register is bs_dot's
 * eight lanes; products and sums stay separate instructions (the build has
 * -ffp-contract=off and no FMA intrinsic is used), so the bits are the
 * scalar reference's. */
#include "dot.h"

#if !defined(__AVX2__)
#error "dot_avx2.c must be compiled with -mavx2"
#endif

#include <immintrin.h>

static float combine8(const float acc[8], float tail) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) +
           tail;
}

void bs_dot4_avx2(const float *q, const float *const rows[4], uint32_t n, float out[4]) {
    const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(qv, _mm256_loadu_ps(r0 + i)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(qv, _mm256_loadu_ps(r1 + i)));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(qv, _mm256_loadu_ps(r2 + i)));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(qv, _mm256_loadu_ps(r3 + i)));
    }
    const __m256 a[4] = {a0, a1, a2, a3};
    for (int r = 0; r < 4; r++) {
        float acc[8];
        _mm256_storeu_ps(acc, a[r]);
        float tail = 0.0f;
        for (uint32_t j = i; j < n; j++) tail += q[j] * rows[r][j];
        out[r] = combine8(acc, tail);
    }
}

/* Two registers are the sixteen lanes: bytes i..i+7 widen into the first,
 * i+8..i+15 into the second. */
float bs_u8_dot_avx2(const uint8_t *e, const float *x, uint32_t D) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (uint32_t i = 0; i + 16 <= D; i += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(e + i));
        const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
        lo = _mm256_add_ps(lo, _mm256_mul_ps(f0, _mm256_loadu_ps(x + i)));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(f1, _mm256_loadu_ps(x + i + 8)));
    }
    float acc[16];
    _mm256_storeu_ps(acc, lo);
    _mm256_storeu_ps(acc + 8, hi);
    float h[8];
    for (int j = 0; j < 8; j++) h[j] = acc[j] + acc[j + 8];
    return combine8(h, 0.0f);
}

/* bs_residual_ref in one pass: one register is each sum's eight lanes. */
void bs_residual_avx2(const float *a, const float *b, uint32_t n, float *out, float *norm2,
                      float *sum) {
    __m256 vn = _mm256_setzero_ps(), vs = vn;
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(a + i);
        if (b != NULL) v = _mm256_sub_ps(v, _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(out + i, v);
        vn = _mm256_add_ps(vn, _mm256_mul_ps(v, v));
        vs = _mm256_add_ps(vs, v);
    }
    float accn[8], accs[8];
    _mm256_storeu_ps(accn, vn);
    _mm256_storeu_ps(accs, vs);
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

/* bs_nibble_tables_ref with one group's sixteen entries in two registers
 * (entries 0..7, then 8..15). Entry m takes x_j through a lane mask that
 * is all ones where bit j of m is set, zeros elsewhere, so a clear bit
 * adds +0.0f. That changes no bit: the running sum starts at +0.0f, and
 * +0.0f + y is never -0.0f, nor is any later sum of it (a float sum is
 * -0.0f only from two -0.0f), so x + +0.0f = x at every step. A set bit
 * adds exactly what the reference adds, in its order (bit 3 first). */
void bs_nibble_tables_avx2(const float *x, uint32_t D, float *t) {
    const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
    const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
    const __m256 zero = _mm256_setzero_ps();
    for (uint32_t g = 0; g < D / 4; g++) {
        const float *q = x + 4 * g;
        const __m256 s2 = _mm256_and_ps(m2, _mm256_broadcast_ss(q + 2));
        const __m256 s1 = _mm256_and_ps(m1, _mm256_broadcast_ss(q + 1));
        const __m256 s0 = _mm256_and_ps(m0, _mm256_broadcast_ss(q));
        __m256 lo = _mm256_add_ps(zero, s2);
        __m256 hi = _mm256_add_ps(_mm256_add_ps(zero, _mm256_broadcast_ss(q + 3)), s2);
        lo = _mm256_add_ps(_mm256_add_ps(lo, s1), s0);
        hi = _mm256_add_ps(_mm256_add_ps(hi, s1), s0);
        _mm256_storeu_ps(t + 16 * g, lo);
        _mm256_storeu_ps(t + 16 * g + 8, hi);
    }
}

/* The float16 pre-pass kernels: approximations, so FMA is welcome here. */
void bs_to_f16_avx2(const float *x, size_t n, uint16_t *out) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(void *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) {
        const __m128i h = _mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT);
        out[i] = (uint16_t)_mm_extract_epi16(h, 0);
    }
}

static float f16_to_float(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

void bs_dot4_f16_avx2(const float *q, const uint16_t *const rows[4], uint32_t n, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    uint32_t i = 0;
#define BS_LOAD_F16(r) \
    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(rows[r] + i)))
#define BS_LOAD_F16_8(r) \
    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(rows[r] + i + 8)))
    /* eight chains: an FMA's latency is four cycles, two issue per cycle */
    for (; i + 16 <= n; i += 16) {
        const __m256 qv = _mm256_loadu_ps(q + i), qw = _mm256_loadu_ps(q + i + 8);
        a0 = _mm256_fmadd_ps(qv, BS_LOAD_F16(0), a0);
        a1 = _mm256_fmadd_ps(qv, BS_LOAD_F16(1), a1);
        a2 = _mm256_fmadd_ps(qv, BS_LOAD_F16(2), a2);
        a3 = _mm256_fmadd_ps(qv, BS_LOAD_F16(3), a3);
        b0 = _mm256_fmadd_ps(qw, BS_LOAD_F16_8(0), b0);
        b1 = _mm256_fmadd_ps(qw, BS_LOAD_F16_8(1), b1);
        b2 = _mm256_fmadd_ps(qw, BS_LOAD_F16_8(2), b2);
        b3 = _mm256_fmadd_ps(qw, BS_LOAD_F16_8(3), b3);
    }
#undef BS_LOAD_F16_8
    a0 = _mm256_add_ps(a0, b0);
    a1 = _mm256_add_ps(a1, b1);
    a2 = _mm256_add_ps(a2, b2);
    a3 = _mm256_add_ps(a3, b3);
    for (; i + 8 <= n; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, BS_LOAD_F16(0), a0);
        a1 = _mm256_fmadd_ps(qv, BS_LOAD_F16(1), a1);
        a2 = _mm256_fmadd_ps(qv, BS_LOAD_F16(2), a2);
        a3 = _mm256_fmadd_ps(qv, BS_LOAD_F16(3), a3);
    }
#undef BS_LOAD_F16
    const __m256 a[4] = {a0, a1, a2, a3};
    for (int r = 0; r < 4; r++) {
        float acc[8];
        _mm256_storeu_ps(acc, a[r]);
        float tail = 0.0f;
        for (uint32_t j = i; j < n; j++) tail += q[j] * f16_to_float(rows[r][j]);
        out[r] = combine8(acc, tail);
    }
}
