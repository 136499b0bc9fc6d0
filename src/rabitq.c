/* RaBitQ encoding (1 to 9 bits a dimension) and the float dot products of
 * the second stage. The arithmetic is the one of docs/rabitq.md; the scale
 * search for the extra bits is described in docs/algorithms.md. */
#include "rabitq.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* SSE2 is part of the x86-64 baseline, so this is not an ISA-specific
 * kernel: it only spells out the vectorization that gcc -O2 would not do
 * for the scale search. The portable branch computes bit-identical
 * results (same lanes, same IEEE operations in the same order). */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Lanes of the partial sums. A fixed lane count fixes the summation order,
 * so results do not depend on the compiler or on vectorization. */
#define BS_LANES 8

/* Points of the coarse and of the fine scale grid, each an interval split
 * into 2^BS_GRID_LOG2 geometric steps. Ratios come from repeated square
 * roots (correctly rounded in IEEE arithmetic, unlike pow), so the chosen
 * scale, and therefore every code, is the same on every machine. */
#define BS_GRID_LOG2 4
#define BS_GRID_STEPS (1u << BS_GRID_LOG2)

/* Saturates instead of producing inf: |r|^2 of a vector with entries near
 * 1e19 or more does not fit a float. The builder rejects non-finite input,
 * but a finite input must still give finite factors. */
static float bs_sat_float(double v) {
    if (v > (double)FLT_MAX) return FLT_MAX;
    if (v < -(double)FLT_MAX) return -FLT_MAX;
    return (float)v;
}

static double bs_root_pow2(double x, unsigned log2n) {
    for (unsigned i = 0; i < log2n; i++) x = sqrt(x);
    return x;
}

/* Transposes an 8x8 bit matrix held in a word, bit 8i+j <-> bit 8j+i: turns
 * eight 8-bit values into their eight bit planes and back. */
static uint64_t bs_transpose8x8(uint64_t x) {
    uint64_t t;
    t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
    x = x ^ t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
    x = x ^ t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
    x = x ^ t ^ (t << 28);
    return x;
}

/* s and f of docs/rabitq.md from <y, r>, |y|^2 and |r|^2 (all in double). */
static void bs_make_factors(double ip, double yy, double norm2, uint32_t D,
                            float *s, float *f) {
    /* ip > 0 whenever r != 0 because every y_i has the sign of r_i; the
     * test also catches underflow to 0 so that no 0/0 is ever formed. */
    if (!(norm2 > 0.0) || !(ip > 0.0) || !(yy > 0.0)) {
        *s = 0.0f;
        *f = 0.0f;
        return;
    }
    /* 1/cos^2 - 1 = (|y|^2 |r|^2 - <y,r>^2) / <y,r>^2; rounding can make
     * it slightly negative when y is parallel to r. */
    double t = (yy * norm2) / (ip * ip) - 1.0;
    if (t < 0.0) t = 0.0;
    *s = bs_sat_float(norm2 / ip);
    *f = bs_sat_float(sqrt(norm2) * sqrt(t) / sqrt((double)(D - 1)));
}

/* ip^2 / yy for the levels y_i = min(floor(t a_i), kmax) + 1/2, i.e. cos^2
 * up to the constant |a|^2: the quantity the scale search maximises. Float
 * lanes rank scales well enough (relative error ~1e-6), and this loop is
 * the whole cost of encoding. floor is a truncation because t a_i >= 0; a
 * NaN (non-finite input, a precondition violation) becomes kmax in both
 * branches instead of an undefined conversion. */
static double bs_scale_score(const float *a, uint32_t D, float t, float kmax) {
    float acc_ip[BS_LANES], acc_yy[BS_LANES];
#if defined(__SSE2__)
    const __m128 vt = _mm_set1_ps(t), vk = _mm_set1_ps(kmax);
    const __m128 half = _mm_set1_ps(0.5f);
    __m128 ip0 = _mm_setzero_ps(), ip1 = _mm_setzero_ps();
    __m128 yy0 = _mm_setzero_ps(), yy1 = _mm_setzero_ps();
    for (uint32_t i = 0; i < D; i += BS_LANES) {
        __m128 a0 = _mm_loadu_ps(a + i), a1 = _mm_loadu_ps(a + i + 4);
        /* minps(x, k) is x < k ? x : k, the scalar expression below. */
        __m128 v0 = _mm_min_ps(_mm_mul_ps(vt, a0), vk);
        __m128 v1 = _mm_min_ps(_mm_mul_ps(vt, a1), vk);
        __m128 y0 = _mm_add_ps(_mm_cvtepi32_ps(_mm_cvttps_epi32(v0)), half);
        __m128 y1 = _mm_add_ps(_mm_cvtepi32_ps(_mm_cvttps_epi32(v1)), half);
        ip0 = _mm_add_ps(ip0, _mm_mul_ps(y0, a0));
        ip1 = _mm_add_ps(ip1, _mm_mul_ps(y1, a1));
        yy0 = _mm_add_ps(yy0, _mm_mul_ps(y0, y0));
        yy1 = _mm_add_ps(yy1, _mm_mul_ps(y1, y1));
    }
    _mm_storeu_ps(acc_ip, ip0);
    _mm_storeu_ps(acc_ip + 4, ip1);
    _mm_storeu_ps(acc_yy, yy0);
    _mm_storeu_ps(acc_yy + 4, yy1);
#else
    for (uint32_t l = 0; l < BS_LANES; l++) acc_ip[l] = acc_yy[l] = 0.0f;
    for (uint32_t i = 0; i < D; i += BS_LANES) {
        for (uint32_t l = 0; l < BS_LANES; l++) {
            float v = t * a[i + l];
            v = v < kmax ? v : kmax;
            float y = (float)(int32_t)v + 0.5f;
            acc_ip[l] += y * a[i + l];
            acc_yy[l] += y * y;
        }
    }
#endif
    double ip = 0.0, yy = 0.0;
    for (uint32_t l = 0; l < BS_LANES; l++) {
        ip += acc_ip[l];
        yy += acc_yy[l];
    }
    return yy > 0.0 ? ip * ip / yy : 0.0;
}

/* Best of BS_GRID_STEPS + 1 scales t0 * ratio^j; returns its index and
 * stores the scale. Ties keep the smallest scale, deterministically. */
static unsigned bs_grid_search(const float *a, uint32_t D, float kmax,
                               double t0, double ratio, double *best_t) {
    double t = t0, best = -1.0;
    unsigned best_j = 0;
    *best_t = t0;
    for (unsigned j = 0; j <= BS_GRID_STEPS; j++, t *= ratio) {
        double sc = bs_scale_score(a, D, (float)t, kmax);
        if (sc > best) {
            best = sc;
            best_j = j;
            *best_t = t;
        }
    }
    return best_j;
}

/* The scale t of the normalised magnitudes a (max a_i = 1, root mean
 * square rms) for levels 0..kmax: a geometric grid, then a finer one around its best point
 * (docs/algorithms.md). */
static float bs_choose_scale(const float *a, uint32_t D, uint32_t kmax,
                             double rms) {
    /* Below t = kmax / 2 the largest coordinates use fewer than half of the
     * levels; above (kmax + 1) / rms a typical coordinate is clipped to the
     * top level. The optimum lies well inside (for Gaussian residuals it is
     * near t = kmax + 1: docs/algorithms.md). rms >= 1/sqrt(D) because
     * max a_i = 1, so t_hi is finite and at least 2 t_lo. */
    double t_lo = 0.5 * kmax;
    if (t_lo < 1.0) t_lo = 1.0;
    double t_hi = (kmax + 1.0) / rms;
    if (!(t_hi > t_lo)) return (float)t_lo;
    double ratio = bs_root_pow2(t_hi / t_lo, BS_GRID_LOG2);
    double t_best;
    unsigned j = bs_grid_search(a, D, (float)kmax, t_lo, ratio, &t_best);
    /* The optimum lies within one coarse step of the best coarse point. */
    double lo = j > 0 ? t_best / ratio : t_best;
    double span = (j > 0 && j < BS_GRID_STEPS) ? ratio * ratio : ratio;
    double fine = bs_root_pow2(span, BS_GRID_LOG2);
    bs_grid_search(a, D, (float)kmax, lo, fine, &t_best);
    return (float)t_best;
}

void bs_rabitq_encode(const float *r, uint32_t D, uint32_t B, uint8_t *bits,
                      uint8_t *ext, bs_factors *f, float *scratch) {
    const size_t nbytes = bs_code_bytes(D);
    double n2[BS_LANES] = {0}, sa[BS_LANES] = {0};
    float max_abs = 0.0f;
    for (size_t byte = 0; byte < nbytes; byte++) {
        unsigned code = 0;
#pragma GCC unroll 8
        for (unsigned l = 0; l < 8; l++) {
            float v = r[byte * 8 + l];
            float av = fabsf(v);
            /* r_i == 0 takes bit 0 (y_i = -1/2): any fixed choice is as
             * good, the coordinate adds nothing to <y, r>. */
            code |= (unsigned)(v > 0.0f) << l;
            n2[l] += (double)v * v;
            sa[l] += av;
            max_abs = av > max_abs ? av : max_abs;
        }
        bits[byte] = (uint8_t)code;
    }
    double norm2 = 0.0, sum_abs = 0.0;
    for (unsigned l = 0; l < BS_LANES; l++) {
        norm2 += n2[l];
        sum_abs += sa[l];
    }

    /* 1 bit: y1_i = +-1/2, so <y1, r> = sum|r_i| / 2 and |y1|^2 = D / 4. */
    bs_make_factors(0.5 * sum_abs, 0.25 * D, norm2, D, &f->s1, &f->f1);
    f->norm2 = bs_sat_float(norm2);
    if (B <= 1) {
        f->s_full = f->s1;
        f->f_full = f->f1;
        return;
    }

    const uint32_t kmax = (1u << (B - 1)) - 1;
    const float kf = (float)kmax;
    float *a = scratch;
    float t = 0.0f;
    if (max_abs > 0.0f) {
        /* Normalising in double keeps denormal and huge inputs finite (the
         * float reciprocal of a denormal overflows). */
        const double inv = 1.0 / max_abs;
        for (uint32_t i = 0; i < D; i++) a[i] = (float)(fabsf(r[i]) * inv);
        t = bs_choose_scale(a, D, kmax, sqrt(norm2 / D) * inv);
    } else {
        for (uint32_t i = 0; i < D; i++) a[i] = 0.0f;
    }

    /* e_i = k_i on the positive side and kmax - k_i on the other, so that
     * y_i = u_i - (2^B - 1)/2 = +-(k_i + 1/2). k_i uses the float
     * expression of bs_scale_score, so the codes are the ones scored. */
    double ip[BS_LANES] = {0};
    uint64_t sum_k = 0, sum_k2 = 0;
    for (size_t byte = 0; byte < nbytes; byte++) {
        uint64_t word = 0;
#pragma GCC unroll 8
        for (unsigned l = 0; l < 8; l++) {
            float v = t * a[byte * 8 + l];
            v = v < kf ? v : kf;
            uint32_t k = (uint32_t)(int32_t)v;
            uint32_t e = ((bits[byte] >> l) & 1u) ? k : kmax - k;
            word |= (uint64_t)e << (8 * l);
            ip[l] += (k + 0.5) * fabsf(r[byte * 8 + l]);
            sum_k += k;
            sum_k2 += (uint64_t)k * k;
        }
        if (B == 9) {
            for (unsigned l = 0; l < 8; l++) ext[byte * 8 + l] = (uint8_t)(word >> (8 * l));
            continue;
        }
        /* e < 256 for B <= 9: after the transpose byte j is plane j. */
        word = bs_transpose8x8(word);
        for (uint32_t j = 0; j + 1 < B; j++)
            ext[j * nbytes + byte] = (uint8_t)(word >> (8 * j));
    }
    double ip_sum = 0.0;
    for (unsigned l = 0; l < BS_LANES; l++) ip_sum += ip[l];
    /* |y|^2 = sum (k + 1/2)^2, exact in integers. */
    double yy = (double)sum_k2 + (double)sum_k + 0.25 * D;
    bs_make_factors(ip_sum, yy, norm2, D, &f->s_full, &f->f_full);
}

float bs_ext_dot(const uint8_t *ext, uint32_t D, uint32_t B, const float *x) {
    if (B <= 1) return 0.0f;
    const size_t nbytes = bs_code_bytes(D);
    float acc[BS_LANES] = {0};
    for (size_t byte = 0; byte < nbytes; byte++) {
        uint64_t word = 0;
        if (B == 9) {
            for (unsigned l = 0; l < 8; l++) /* byte l is e of dim 8 byte + l */
                word |= (uint64_t)ext[byte * 8 + l] << (8 * l);
        } else {
            for (uint32_t j = 0; j + 1 < B; j++)
                word |= (uint64_t)ext[j * nbytes + byte] << (8 * j);
            word = bs_transpose8x8(word); /* byte l is now e of dim 8 byte + l */
        }
        for (unsigned l = 0; l < 8; l++)
            acc[l] += (float)((word >> (8 * l)) & 0xFFu) * x[byte * 8 + l];
    }
    float s = 0.0f;
    for (unsigned l = 0; l < BS_LANES; l++) s += acc[l];
    return s;
}

float bs_bits_dot(const uint8_t *bits, uint32_t D, const float *x) {
    const size_t nbytes = bs_code_bytes(D);
    float acc[BS_LANES] = {0};
    for (size_t byte = 0; byte < nbytes; byte++) {
        unsigned p = bits[byte];
        for (unsigned l = 0; l < 8; l++)
            if ((p >> l) & 1u) acc[l] += x[byte * 8 + l];
    }
    float s = 0.0f;
    for (unsigned l = 0; l < BS_LANES; l++) s += acc[l];
    return s;
}
