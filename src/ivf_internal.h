/* Internal helpers shared by IVF assignment (ivf.c) and k-means training
 * (kmeans.c). See docs/algorithms.md, "IVF training and assignment". */
#ifndef BS_IVF_INTERNAL_H
#define BS_IVF_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

/* Squared Euclidean distance in double, summed in one fixed order (eight
 * strided partial sums combined pairwise, then the tail). The order is part
 * of the contract: the same inputs give the same bits on every machine and
 * in every call, which is what makes assignment reproducible. */
double bs_l2sq_fixed(const float *a, const float *b, uint32_t d);

/* The same in float with sixteen strided partial sums: a few times faster,
 * for k-means++ seeding where only reproducibility matters, not the last
 * bits. Fixed order too (see ivf.c). */
float bs_l2sq_f32_fixed(const float *a, const float *b, uint32_t d);

/* How both fixed-order double sums (and their AVX2 versions) combine their
 * eight partial sums: ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7)). */
static inline double bs_combine8(const double acc[8]) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* AVX2 versions of the two fixed-order sums: the same bits (l2_avx2.c),
 * and the pair the assignment uses, chosen like the scan kernels
 * (bs_simd_select, so BITSHARD_SIMD applies). */
double bs_l2sq_fixed_avx2(const float *a, const float *b, uint32_t d);
double bs_norm2_fixed_avx2(const float *a, uint32_t d);
typedef struct bs_l2_kernels {
    double (*l2sq)(const float *a, const float *b, uint32_t d);
    double (*norm2)(const float *a, uint32_t d);
} bs_l2_kernels;
bs_status bs_l2_kernels_select(bs_l2_kernels *out, bs_error *err);

/* |a|^2 in double, same fixed order as bs_l2sq_fixed. */
double bs_norm2_fixed(const float *a, uint32_t d);

/* A distance beyond the float range becomes +inf, as IEEE rounding would
 * make it, without the out-of-range conversion C leaves undefined. The
 * cut-off is FLT_MAX plus half an ulp, where round-to-nearest goes to inf. */
static inline float bs_dist_to_float(double v) {
    return v >= 0x1.ffffffp127 ? (float)INFINITY : (float)v;
}

/* out = x / |x| rounded to float (a function of x alone); a zero row gives a
 * zero row. out may equal x. */
void bs_normalize_row(const float *x, uint32_t d, float *out);

/* BS_OK, or BS_ERR_INVALID_DATA naming the first non-finite element as
 * "<what> <row> ... dimension <j>". */
bs_status bs_check_finite_rows(const float *x, size_t n, uint32_t d,
                               const char *what, size_t row_base,
                               bs_error *err);

/* The assignment engine behind bs_ivf_assign, without argument checks.
 * Each row's result is the exact argmin of bs_l2sq_fixed over the
 * centroids (ties to the lowest id), so it depends only on (row,
 * centroids): never on n, on the row's position, on blocking or on BLAS
 * threading. normalize: L2-normalise each row first (cosine). check_finite:
 * reject NaN/Inf rows (checked block by block, before the BLAS call).
 * dist2 may be NULL. Requires 1 <= k, d <= INT_MAX; centroids finite.
 * threads: workers over blocks of rows (each calls the BLAS on its own
 * block, so the BLAS should be single-threaded when threads > 1); the
 * result is the same for every thread count. */
bs_status bs_ivf_assign_rows(const float *centroids, uint32_t k, uint32_t d,
                             int normalize, int check_finite, const float *x,
                             size_t n, uint32_t *assign, float *dist2,
                             uint32_t threads, bs_error *err);

/* The same, and second_lb[i] (if not NULL): a lower bound on the squared
 * distance from row i to every centroid other than assign[i] (exact when
 * the row was ranked exhaustively). k-means uses it to skip rows whose
 * assignment cannot change. */
bs_status bs_ivf_assign_rows_lb(const float *centroids, uint32_t k, uint32_t d,
                                int normalize, int check_finite, const float *x,
                                size_t n, uint32_t *assign, float *dist2,
                                double *second_lb, uint32_t threads, bs_error *err);

/* bs_kmeans_train with the bound-based skipping of rows switched on or off
 * (prune = 0 assigns every row every iteration): the two give the same
 * centroids bit for bit, which the tests check; so do all thread counts. */
bs_status bs_kmeans_train_impl(const float *x, size_t n, uint32_t d, uint32_t k,
                               bs_metric metric, uint32_t max_iters, uint64_t seed,
                               float *centroids, int prune, uint32_t threads,
                               bs_error *err);

#endif
