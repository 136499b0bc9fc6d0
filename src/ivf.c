/* Nearest-centroid assignment for IVF partitions.
 *
 * Distributed workers encode disjoint subsets of rows and their segments are
 * merged, so the partition of a row must be a function of (row, centroids)
 * alone. A BLAS product is needed for speed, but its last bits depend on
 * tiling, kernel choice (M == 1 may take a gemv path), CPU and thread count.
 * So BLAS only narrows the search: every centroid that could be the exact
 * nearest one under a rigorous error bound is kept, and those few are
 * re-ranked with bs_l2sq_fixed, whose summation order is fixed. The answer
 * is the exact argmin of bs_l2sq_fixed (ties to the lowest id) whatever the
 * candidate set, as long as the set contains it; the bound guarantees that.
 */
#include <cblas.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "ivf_internal.h"
#include "parallel.h"

/* Vector types through GCC/Clang vector extensions: SSE2 at the x86-64
 * baseline, NEON on arm64, scalar code elsewhere; no -m flags, so nothing
 * here needs CPU dispatch. Every vector loop computes exactly what its
 * scalar twin below it computes (same lanes, same order), so results do not
 * depend on which one a compiler builds (-DBS_NO_VEC forces the scalar
 * twins, for testing). */
#if defined(__GNUC__) && defined(__has_builtin) && !defined(BS_NO_VEC)
#if __has_builtin(__builtin_convertvector)
#define BS_HAVE_VEC 1
#endif
#endif

#ifdef BS_HAVE_VEC
#include "vec.h"
static inline bs_v2d load2d(const float *p) {
    bs_v2f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, bs_v2d);
}
/* Exact min for finite inputs. */
static inline bs_v4f vmin4(bs_v4f a, bs_v4f b) {
    bs_v4i lt = a < b;
    return (bs_v4f)(((bs_v4i)a & lt) | ((bs_v4i)b & ~lt));
}
#endif

/* The fixed order: eight strided partial sums (lane l takes elements
 * i = l mod 8 of the leading multiple of 8), combined as
 * ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)) (bs_combine8), then the
 * tail added in sequence. ISO C mode never contracts t * t + acc into an fma and never
 * reassociates, so the source fixes the bits. */
/* (a_i - b_i) as doubles, or a_i alone when b is NULL: the one term of the
 * two sums below. sumsq_fixed is inlined into each caller with b constant,
 * so the test folds away. */
static inline double term(const float *a, const float *b, uint32_t i) {
    return b ? (double)a[i] - (double)b[i] : (double)a[i];
}

#ifdef BS_HAVE_VEC
static inline bs_v2d term2d(const float *a, const float *b, uint32_t i) {
    return b ? load2d(a + i) - load2d(b + i) : load2d(a + i);
}
#endif

/* sum_i term(i)^2 in the fixed order above. */
static inline double sumsq_fixed(const float *a, const float *b, uint32_t d) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t i = 0;
#ifdef BS_HAVE_VEC
    bs_v2d s0 = {0, 0}, s1 = s0, s2 = s0, s3 = s0;
    for (; i + 8 <= d; i += 8) {
        bs_v2d t0 = term2d(a, b, i), t1 = term2d(a, b, i + 2);
        bs_v2d t2 = term2d(a, b, i + 4), t3 = term2d(a, b, i + 6);
        s0 += t0 * t0;
        s1 += t1 * t1;
        s2 += t2 * t2;
        s3 += t3 * t3;
    }
    acc[0] = s0[0], acc[1] = s0[1], acc[2] = s1[0], acc[3] = s1[1];
    acc[4] = s2[0], acc[5] = s2[1], acc[6] = s3[0], acc[7] = s3[1];
#else
    for (; i + 8 <= d; i += 8) {
        for (int l = 0; l < 8; l++) {
            double t = term(a, b, i + l);
            acc[l] += t * t;
        }
    }
#endif
    double s = bs_combine8(acc);
    for (; i < d; i++) {
        double t = term(a, b, i);
        s += t * t;
    }
    return s;
}

double bs_l2sq_fixed(const float *a, const float *b, uint32_t d) {
    return sumsq_fixed(a, b, d);
}

bs_status bs_l2_kernels_select(bs_l2_kernels *out, bs_error *err) {
    bs_simd_level level;
    BS_TRY(bs_simd_select(&level, err));
    if (level == BS_SIMD_AVX2 || level == BS_SIMD_AVX512) {
        out->l2sq = bs_l2sq_fixed_avx2;
        out->norm2 = bs_norm2_fixed_avx2;
    } else {
        out->l2sq = bs_l2sq_fixed;
        out->norm2 = bs_norm2_fixed;
    }
    return BS_OK;
}

double bs_norm2_fixed(const float *a, uint32_t d) { return sumsq_fixed(a, NULL, d); }

float bs_l2sq_f32_fixed(const float *a, const float *b, uint32_t d) {
    float acc[16];
    for (int l = 0; l < 16; l++) acc[l] = 0.0f;
    uint32_t i = 0;
#ifdef BS_HAVE_VEC
    bs_v4f s0 = {0, 0, 0, 0}, s1 = s0, s2 = s0, s3 = s0;
    for (; i + 16 <= d; i += 16) {
        bs_v4f t0 = bs_v4f_load(a + i) - bs_v4f_load(b + i);
        bs_v4f t1 = bs_v4f_load(a + i + 4) - bs_v4f_load(b + i + 4);
        bs_v4f t2 = bs_v4f_load(a + i + 8) - bs_v4f_load(b + i + 8);
        bs_v4f t3 = bs_v4f_load(a + i + 12) - bs_v4f_load(b + i + 12);
        s0 += t0 * t0;
        s1 += t1 * t1;
        s2 += t2 * t2;
        s3 += t3 * t3;
    }
    memcpy(acc, &s0, sizeof s0);
    memcpy(acc + 4, &s1, sizeof s1);
    memcpy(acc + 8, &s2, sizeof s2);
    memcpy(acc + 12, &s3, sizeof s3);
#else
    for (; i + 16 <= d; i += 16) {
        for (int l = 0; l < 16; l++) {
            float t = a[i + l] - b[i + l];
            acc[l] += t * t;
        }
    }
#endif
    float s = 0.0f;
    for (int l = 0; l < 4; l++)
        s += (acc[l] + acc[l + 8]) + (acc[l + 4] + acc[l + 12]);
    for (; i < d; i++) {
        float t = a[i] - b[i];
        s += t * t;
    }
    return s;
}

void bs_normalize_row(const float *x, uint32_t d, float *out) {
    double n2 = bs_norm2_fixed(x, d);
    if (n2 > 0.0) {
        /* Dividing by the norm (rather than multiplying by its inverse)
         * keeps every |out_i| <= 1 and the result as close as float allows. */
        double norm = sqrt(n2);
        for (uint32_t i = 0; i < d; i++) out[i] = (float)((double)x[i] / norm);
    } else {
        for (uint32_t i = 0; i < d; i++) out[i] = 0.0f;
    }
}

bs_status bs_check_finite_rows(const float *x, size_t n, uint32_t d,
                               const char *what, size_t row_base,
                               bs_error *err) {
    for (size_t r = 0; r < n; r++) {
        const float *row = x + r * (size_t)d;
        /* Exponent bits all ones means NaN or Inf. An OR over the row
         * vectorises, so the common all-finite case costs one fast pass;
         * only a bad row is scanned again to name the dimension. */
        uint32_t bad = 0;
        for (uint32_t j = 0; j < d; j++) {
            uint32_t bits;
            memcpy(&bits, &row[j], sizeof bits);
            bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
        }
        if (!bad) continue;
        for (uint32_t j = 0; j < d; j++) {
            if (!isfinite(row[j])) {
                return bs_fail(err, BS_ERR_INVALID_DATA,
                               "%s %zu has a non-finite value (%g) at "
                               "dimension %u",
                               what, row_base + r, (double)row[j], j);
            }
        }
    }
    return BS_OK;
}

/* ------------------------------------------------------------ the bound
 *
 * Let dot_j be BLAS's float result for -2 <x, c_j>. Whatever order and
 * blocking the BLAS uses, a float dot product of length d (with or without
 * fma) satisfies |fl(s) - s| <= gamma_d * sum |x_i c_ji|, gamma_d =
 * d u / (1 - d u), u = 2^-24 (Higham, Accuracy and Stability, 3.1). Since
 * sum |x_i c_ji| <= |x| |c_j| <= (|x|^2 + |c_j|^2) / 2 and the factor -2 is
 * exact, |dot_j + 2 <x, c_j>| <= gamma_d (|x|^2 + |c_j|^2). Products that
 * underflow add at most 2^-149 each, covered by the absolute slack.
 *
 * With S_j = |x|^2 + |c_j|^2 and tau >= gamma_d plus room for our own
 * rounding, every exact distance e_j (bs_l2sq_fixed) lies in [lo_j, hi_j]:
 *   lo_j = S_j - tau S_j - slack + dot_j,
 *   hi_j = S_j + tau S_j + slack + dot_j.
 * The exact argmin j* has lo_j* <= e_j* <= e_i <= hi_i for every i, so it is
 * among {j : lo_j <= min_i hi_i}; so are all centroids tied with it.
 *
 * tau = 2 gamma_d + 64 u: the factor 2 is headroom beyond the textbook
 * bound (a BLAS that splits the d products into panels adds one more
 * rounding per panel when it accumulates into C, and the -2 applied as
 * alpha or to a packed operand is exact only barring overflow); 64 u
 * covers the float arithmetic of the scan below (a handful of roundings,
 * each at most u times a value bounded by 3 S_j), the rounding
 * of |c_j|^2 to float and the (double, ~d 2^-53) error of e_j itself.
 * The window is 2 tau S wide: ~4e-5 S for d = 128, ~2e-4 S for d = 768.
 * On clustered data that leaves 1.00 candidates per row on average.
 *
 * Norms above 2^100 could overflow the float products, and for d >= 2^20
 * the bound is too loose to help; those rows are ranked exhaustively with
 * bs_l2sq_fixed, which gives the same answer, only slower. */
#define BS_ASSIGN_U (1.0 / 16777216.0)
#define BS_ASSIGN_MAX_D (1u << 20)
#define BS_ASSIGN_MAX_NORM2 1.2676506002282294e30 /* 2^100 */

/* Working set per block: the k products of up to 4096 rows, capped at
 * 2^21 floats (8 MB; 2048 rows at k = 1024) so memory stays bounded
 * whatever n is. Each block is one sgemm call, and with BLAS threads every
 * call is a fork/join: when the machine is oversubscribed (several worker
 * processes, each with its own BLAS threads) a join can wait a scheduler
 * slice, so fewer, larger calls matter far more than cache residency.
 * Measured for 1M x 128 rows, k = 1024, on a loaded 2-core box: 2^18
 * floats per block took 38 s, 2^21 13 s; single-threaded all sizes from
 * 2^18 to 2^22 cost the same ~4.3 s of CPU. The copy of normalised rows
 * (cosine) is bounded the same way.
 * Without BLAS threads (our own workers, or a BLAS set to one thread) there
 * is no join to amortise and a block whose products stay in L2 for the scan
 * wins: 2^17 floats ran k-means (65,536 x 128, k = 256, two workers)
 * ~10-20% faster than 2^21 here. */
#ifndef BS_ASSIGN_BLOCK_FLOATS
#define BS_ASSIGN_BLOCK_FLOATS ((size_t)1 << 21)
#endif
#ifndef BS_ASSIGN_BLOCK_FLOATS_1T
#define BS_ASSIGN_BLOCK_FLOATS_1T ((size_t)1 << 17)
#endif
extern int scipy_openblas_get_num_threads(void);
static size_t block_rows(uint32_t k, uint32_t d, uint32_t threads) {
    const size_t floats = threads <= 1 && scipy_openblas_get_num_threads() > 1
                              ? BS_ASSIGN_BLOCK_FLOATS
                              : BS_ASSIGN_BLOCK_FLOATS_1T;
    size_t b = 4096;
    if (floats / k < b) b = floats / k;
    if (floats / d < b) b = floats / d;
    if (b < 16) b = 16; /* a thin sgemm is slow; k * 16 floats is small */
    return b;
}

/* The two scans over a row's k products run once per (row, centroid), as
 * often as the sgemm's inner loops, hence the vector paths.
 * min over j of a_j + b_j: */
static float min_of_sum(const float *a, const float *b, uint32_t k) {
    float m = FLT_MAX;
    uint32_t j = 0;
#ifdef BS_HAVE_VEC
    if (k >= 8) {
        bs_v4f m0 = {FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX}, m1 = m0;
        for (; j + 8 <= k; j += 8) {
            m0 = vmin4(bs_v4f_load(a + j) + bs_v4f_load(b + j), m0);
            m1 = vmin4(bs_v4f_load(a + j + 4) + bs_v4f_load(b + j + 4), m1);
        }
        m0 = vmin4(m0, m1);
        for (int l = 0; l < 4; l++) m = m0[l] < m ? m0[l] : m;
    }
#endif
    for (; j < k; j++) {
        float t = a[j] + b[j];
        m = t < m ? t : m;
    }
    return m;
}

/* The ids j (ascending) with a_j + b_j <= thr; returns their count. */
static uint32_t collect_below(const float *a, const float *b, uint32_t k,
                              float thr, uint32_t *out) {
    uint32_t cnt = 0, j = 0;
#ifdef BS_HAVE_VEC
    bs_v4f tv = {thr, thr, thr, thr};
    for (; j + 8 <= k; j += 8) {
        bs_v4i le = ((bs_v4f_load(a + j) + bs_v4f_load(b + j)) <= tv) |
                    ((bs_v4f_load(a + j + 4) + bs_v4f_load(b + j + 4)) <= tv);
        uint64_t w[2];
        memcpy(w, &le, sizeof w);
        if ((w[0] | w[1]) == 0) continue;
        for (uint32_t t = j; t < j + 8; t++)
            if (a[t] + b[t] <= thr) out[cnt++] = t;
    }
#endif
    for (; j < k; j++)
        if (a[j] + b[j] <= thr) out[cnt++] = j;
    return cnt;
}

/* second: the second smallest distance among those evaluated (inf if only
 * one was). */
static void exact_best(const bs_l2_kernels *kn, const float *row, const float *centroids,
                       uint32_t d, const uint32_t *cand, uint32_t ncand, uint32_t k,
                       uint32_t *best_id, double *best_dist, double *second) {
    uint32_t bj = 0;
    double bd = INFINITY, sd = INFINITY;
    /* cand == NULL: all centroids. Candidates ascend, so a strict < keeps
     * the lowest id among ties. */
    uint32_t cnt = cand ? ncand : k;
    for (uint32_t t = 0; t < cnt; t++) {
        uint32_t j = cand ? cand[t] : t;
        double e = kn->l2sq(row, centroids + (size_t)j * d, d);
        if (e < bd || t == 0) {
            sd = bd;
            bd = e;
            bj = j;
        } else if (e < sd) {
            sd = e;
        }
    }
    *best_id = bj;
    *best_dist = bd;
    *second = sd;
}

bs_status bs_ivf_assign_rows(const float *centroids, uint32_t k, uint32_t d,
                             int normalize, int check_finite, const float *x,
                             size_t n, uint32_t *assign, float *dist2,
                             uint32_t threads, bs_error *err) {
    return bs_ivf_assign_rows_lb(centroids, k, d, normalize, check_finite, x, n,
                                 assign, dist2, NULL, threads, err);
}

/* One block's rows after the BLAS product. */
typedef struct scan_ctx {
    const float *centroids, *src, *dots, *c_hi, *c_lo;
    uint32_t k, d;
    int exhaustive_all;
    double tau;
    size_t r0; /* first row of the block */
    uint32_t *assign;
    float *dist2;
    double *second_lb;
    const bs_l2_kernels *kn;
} scan_ctx;

static void scan_rows(const scan_ctx *c, size_t begin, size_t end, uint32_t *cand) {
    const uint32_t k = c->k, d = c->d;
    for (size_t r = begin; r < end; r++) {
        const float *row = c->src + r * d;
        const float *dr = c->dots + r * k;
        uint32_t bj = 0, ncand = 0;
        double bd = 0.0, xn = 0.0;
        int full = c->exhaustive_all;
        if (!full) {
            xn = c->kn->norm2(row, d);
            if (xn > BS_ASSIGN_MAX_NORM2) {
                full = 1;
            } else {
                float thr = min_of_sum(c->c_hi, dr, k) + (float)(2.0 * c->tau * xn);
                ncand = collect_below(c->c_lo, dr, k, thr, cand);
                /* The argmin of hi is always kept (lo <= hi <= thr), so an
                 * empty set can only mean a broken BLAS result. */
                if (ncand == 0) full = 1;
            }
        }
        double second = INFINITY;
        if (full) {
            exact_best(c->kn, row, c->centroids, d, NULL, 0, k, &bj, &bd, &second);
        } else if (ncand == 1 && c->dist2 == NULL && c->second_lb == NULL) {
            bj = cand[0]; /* nothing to re-rank, no distance wanted */
        } else {
            exact_best(c->kn, row, c->centroids, d, cand, ncand, k, &bj, &bd, &second);
        }
        c->assign[c->r0 + r] = bj;
        if (c->dist2) c->dist2[c->r0 + r] = bs_dist_to_float(bd);
        if (c->second_lb) {
            /* Every other centroid j has e_j >= lo_j (the bound above); a
             * candidate's exact distance is no smaller than its lo_j, so
             * the least lo_j over j != bj bounds them all. Twice tau keeps
             * the double arithmetic here on the safe side. */
            if (!full) {
                float m = FLT_MAX;
                if (bj > 0) m = min_of_sum(c->c_lo, dr, bj);
                if (bj + 1 < k) {
                    float m2 = min_of_sum(c->c_lo + bj + 1, dr + bj + 1, k - bj - 1);
                    m = m2 < m ? m2 : m;
                }
                /* the float sum rounds by at most u of its magnitude */
                double lo = (double)m - fabs((double)m) * BS_ASSIGN_U * 2.0 +
                            xn * (1.0 - 2.0 * c->tau);
                if (k > 1 && lo < second) second = lo;
            }
            c->second_lb[c->r0 + r] = second > 0.0 ? second : 0.0;
        }
    }
}

/* One worker's share of the blocks: its own product and candidate
 * buffers, the shared bounds. */
typedef struct assign_job {
    const float *centroids, *x, *c_hi, *c_lo;
    uint32_t k, d;
    int normalize, check_finite, exhaustive_all;
    double tau;
    size_t n, brows;
    uint32_t *assign;
    float *dist2;
    double *second_lb;
    const bs_l2_kernels *kn;
    float **dots, **xbuf;
    uint32_t **cand;
    bs_status *st;
    bs_error *errs;
} assign_job;

static void assign_worker(void *arg, uint32_t w, uint32_t nw) {
    const assign_job *j = arg;
    const uint32_t k = j->k, d = j->d;
    size_t begin, end;
    bs_parallel_share(j->n, j->brows, w, nw, &begin, &end);
    j->st[w] = BS_OK;
    for (size_t r0 = begin; r0 < end; r0 += j->brows) {
        size_t b = end - r0 < j->brows ? end - r0 : j->brows;
        const float *src = j->x + r0 * d;
        if (j->check_finite) {
            j->st[w] = bs_check_finite_rows(src, b, d, "row", r0, &j->errs[w]);
            if (j->st[w] != BS_OK) return;
        }
        if (j->normalize) {
            for (size_t r = 0; r < b; r++)
                bs_normalize_row(src + r * d, d, j->xbuf[w] + r * d);
            src = j->xbuf[w];
        }
        if (!j->exhaustive_all) {
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)b,
                              (int)k, (int)d, -2.0f, src, (int)d, j->centroids,
                              (int)d, 0.0f, j->dots[w], (int)k);
        }
        scan_ctx ctx = {j->centroids, src, j->dots[w], j->c_hi, j->c_lo, k, d,
                        j->exhaustive_all, j->tau, r0, j->assign, j->dist2,
                        j->second_lb, j->kn};
        scan_rows(&ctx, 0, b, j->cand[w]);
    }
}

bs_status bs_ivf_assign_rows_lb(const float *centroids, uint32_t k, uint32_t d,
                                int normalize, int check_finite, const float *x,
                                size_t n, uint32_t *assign, float *dist2,
                                double *second_lb, uint32_t threads, bs_error *err) {
    if (n == 0) return BS_OK;
    bs_l2_kernels kn;
    BS_TRY(bs_l2_kernels_select(&kn, err));
    size_t brows = block_rows(k, d, threads);
    if (brows > n) brows = n;
    /* No more workers than blocks: a worker without rows would still cost
     * its buffers. */
    size_t nblocks = n / brows + (n % brows != 0);
    uint32_t nw = threads < 1 ? 1 : threads > BS_MAX_THREADS ? BS_MAX_THREADS : threads;
    if (nw > nblocks) nw = (uint32_t)nblocks;

    float *dots[BS_MAX_THREADS] = {0}, *xbuf[BS_MAX_THREADS] = {0};
    uint32_t *cand[BS_MAX_THREADS] = {0};
    bs_status wst[BS_MAX_THREADS];
    bs_error *werr = bs_alloc(nw, sizeof *werr);
    float *c_hi = bs_alloc(k, sizeof(float));
    float *c_lo = bs_alloc(k, sizeof(float));
    int ok = werr && c_hi && c_lo;
    for (uint32_t w = 0; w < nw && ok; w++) {
        dots[w] = bs_alloc2(brows, k, sizeof(float));
        cand[w] = bs_alloc(k, sizeof(uint32_t));
        xbuf[w] = normalize ? bs_alloc2(brows, d, sizeof(float)) : NULL;
        ok = dots[w] && cand[w] && (!normalize || xbuf[w]);
    }
    bs_status st = BS_OK;
    if (!ok) {
        st = bs_fail(err, BS_ERR_NO_MEMORY,
                     "out of memory for %u assignment blocks of %zu rows x "
                     "%u centroids",
                     nw, brows, k);
        goto done;
    }

    int exhaustive_all = d >= BS_ASSIGN_MAX_D;
    double tau = 0.0, slack = 0.0;
    if (!exhaustive_all) {
        double du = (double)d * BS_ASSIGN_U;
        tau = 2.0 * du / (1.0 - du) + 64.0 * BS_ASSIGN_U;
        slack = ((double)d + 16.0) * 0x1p-100;
        for (uint32_t j = 0; j < k; j++) {
            double cn = bs_norm2_fixed(centroids + (size_t)j * d, d);
            if (cn > BS_ASSIGN_MAX_NORM2) {
                exhaustive_all = 1;
                break;
            }
            c_hi[j] = (float)(cn * (1.0 + tau) + slack);
            c_lo[j] = (float)(cn * (1.0 - tau) - slack);
        }
    }

    assign_job job = {centroids, x, c_hi, c_lo, k, d, normalize, check_finite,
                      exhaustive_all, tau, n, brows, assign, dist2, second_lb,
                      &kn, dots, xbuf, cand, wst, werr};
    bs_parallel_run(nw, assign_worker, &job);
    /* Workers hold rows in order: the first failing worker has the first
     * bad row, the one a single thread would have named. */
    for (uint32_t w = 0; w < nw; w++) {
        if (wst[w] != BS_OK) {
            st = wst[w];
            if (err) *err = werr[w];
            break;
        }
    }

done:
    for (uint32_t w = 0; w < nw; w++) {
        free(dots[w]);
        free(cand[w]);
        free(xbuf[w]);
    }
    free(werr);
    free(c_hi);
    free(c_lo);
    return st;
}

bs_status bs_ivf_assign(const float *centroids, uint32_t k, uint32_t d,
                        bs_metric metric, const float *x, size_t n,
                        uint32_t *assign, float *dist2, bs_error *err) {
    bs_error_clear(err);
    if (centroids == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "centroids is NULL");
    if (k == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions must be >= 1 (got 0)");
    if (d == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "dimension must be >= 1 (got 0)");
    if (k > INT_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions (%u) exceeds the BLAS limit (%d)", k,
                       INT_MAX);
    if (d > INT_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "dimension (%u) exceeds the BLAS limit (%d)", d,
                       INT_MAX);
    if ((int)metric < 0 || (int)metric > 2)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "metric (%d) is not a bs_metric", (int)metric);
    if (n > 0 && x == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "x is NULL with n = %zu rows", n);
    if (n > 0 && assign == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "assign is NULL with n = %zu rows", n);
    size_t cells, bytes;
    if (!bs_mul_ok((size_t)k, d, &cells) ||
        !bs_mul_ok(cells, sizeof(float), &bytes))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions (%u) x dimension (%u) overflows", k, d);
    if (!bs_mul_ok(n, d, &cells) || !bs_mul_ok(cells, sizeof(float), &bytes))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "n (%zu) x dimension (%u) overflows", n, d);
    BS_TRY(bs_check_finite_rows(centroids, k, d, "centroid", 0, err));
    return bs_ivf_assign_rows(centroids, k, d, metric == BS_METRIC_COSINE, 1,
                              x, n, assign, dist2, 1, err);
}
