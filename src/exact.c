/* Exact distances for reranking (bitshard.h, bs_exact_distances): summed
 * in double in one fixed order, so every caller gets the same bits. The
 * order is the reference's: element by element in increasing j, each
 * difference or product rounded to double, then added to the running sum
 * (and, for cosine, |v|^2 likewise, alongside). The SSE2 version converts
 * and multiplies two elements per instruction but still adds them one at a
 * time in that order, so its bits are the reference's
 * (tests/c/test_search.c checks it). */
#include "exact.h"

#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "error.h"

/* The distance from the row's sums: acc is |q - v|^2 for l2, <q, v>
 * otherwise; qn and vn are |q|^2 and |v|^2 (cosine only). */
static float finish(bs_metric metric, double acc, double qn, double vn) {
    if (metric == BS_METRIC_L2) return (float)acc;
    if (metric == BS_METRIC_DOT) return (float)(1.0 - acc);
    if (qn == 0.0 || vn == 0.0) return 1.0f; /* a zero vector has no direction: cos taken as 0 */
    return (float)(1.0 - acc / (sqrt(qn) * sqrt(vn)));
}

static double norm2_ref(const float *v, uint32_t dim) {
    double n = 0.0;
    for (uint32_t j = 0; j < dim; j++) n += (double)v[j] * v[j];
    return n;
}

void bs_exact_distances_ref(bs_metric metric, const float *q, const float *x, size_t n,
                            uint32_t dim, float *out) {
    /* |q|^2 only where the distance uses it */
    const double qn = metric == BS_METRIC_COSINE ? norm2_ref(q, dim) : 0.0;
    for (size_t i = 0; i < n; i++) {
        const float *v = x + i * dim;
        double acc = 0.0, vn = 0.0;
        if (metric == BS_METRIC_L2) {
            for (uint32_t j = 0; j < dim; j++) {
                double d = (double)q[j] - (double)v[j];
                acc += d * d;
            }
        } else {
            for (uint32_t j = 0; j < dim; j++) {
                acc += (double)q[j] * v[j];
                vn += (double)v[j] * v[j];
            }
        }
        out[i] = finish(metric, acc, qn, vn);
    }
}

#if defined(__SSE2__)
/* acc += lo(p); acc += hi(p): two terms in order. */
static inline double add2(double acc, __m128d p) {
    acc += _mm_cvtsd_f64(p);
    return acc + _mm_cvtsd_f64(_mm_unpackhi_pd(p, p));
}

void bs_exact_distances_sse2(bs_metric metric, const float *q, const float *x, size_t n,
                             uint32_t dim, float *out) {
    const double qn = metric == BS_METRIC_COSINE ? norm2_ref(q, dim) : 0.0;
    const uint32_t whole = dim / 4 * 4;
    for (size_t i = 0; i < n; i++) {
        const float *v = x + i * dim;
        double acc = 0.0, vn = 0.0;
        uint32_t j = 0;
        if (metric == BS_METRIC_L2) {
            for (; j < whole; j += 4) {
                const __m128 qf = _mm_loadu_ps(q + j), vf = _mm_loadu_ps(v + j);
                const __m128d d01 = _mm_sub_pd(_mm_cvtps_pd(qf), _mm_cvtps_pd(vf));
                const __m128d d23 = _mm_sub_pd(_mm_cvtps_pd(_mm_movehl_ps(qf, qf)),
                                               _mm_cvtps_pd(_mm_movehl_ps(vf, vf)));
                acc = add2(acc, _mm_mul_pd(d01, d01));
                acc = add2(acc, _mm_mul_pd(d23, d23));
            }
            for (; j < dim; j++) {
                double d = (double)q[j] - (double)v[j];
                acc += d * d;
            }
        } else {
            for (; j < whole; j += 4) {
                const __m128 qf = _mm_loadu_ps(q + j), vf = _mm_loadu_ps(v + j);
                const __m128d q01 = _mm_cvtps_pd(qf), q23 = _mm_cvtps_pd(_mm_movehl_ps(qf, qf));
                const __m128d v01 = _mm_cvtps_pd(vf), v23 = _mm_cvtps_pd(_mm_movehl_ps(vf, vf));
                const __m128d p01 = _mm_mul_pd(q01, v01), n01 = _mm_mul_pd(v01, v01);
                const __m128d p23 = _mm_mul_pd(q23, v23), n23 = _mm_mul_pd(v23, v23);
                acc = add2(add2(acc, p01), p23);
                vn = add2(add2(vn, n01), n23);
            }
            for (; j < dim; j++) {
                acc += (double)q[j] * v[j];
                vn += (double)v[j] * v[j];
            }
        }
        out[i] = finish(metric, acc, qn, vn);
    }
}
#else
void bs_exact_distances_sse2(bs_metric metric, const float *q, const float *x, size_t n,
                             uint32_t dim, float *out) {
    bs_exact_distances_ref(metric, q, x, n, dim, out);
}
#endif

bs_status bs_exact_distances(bs_metric metric, const float *q, const float *x,
                             size_t n, uint32_t dim, float *out, bs_error *err) {
    if ((n > 0 && (q == NULL || x == NULL || out == NULL)) || dim == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "bad arguments to exact distances");
    if (metric != BS_METRIC_L2 && metric != BS_METRIC_COSINE && metric != BS_METRIC_DOT)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "unknown metric %d", (int)metric);
    if (n > 0) bs_exact_distances_sse2(metric, q, x, n, dim, out);
    return BS_OK;
}
