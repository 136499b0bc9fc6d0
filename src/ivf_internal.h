/* Internal helpers shared by IVF assignment (ivf.c) and k-means training
 * (kmeans.c). See docs/algorithms.md, "IVF training and assignment". */
#ifndef BS_IVF_INTERNAL_H
#define BS_IVF_INTERNAL_H

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

/* |a|^2 in double, same fixed order as bs_l2sq_fixed. */
double bs_norm2_fixed(const float *a, uint32_t d);

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
 * dist2 may be NULL. Requires 1 <= k, d <= INT_MAX; centroids finite. */
bs_status bs_ivf_assign_rows(const float *centroids, uint32_t k, uint32_t d,
                             int normalize, int check_finite, const float *x,
                             size_t n, uint32_t *assign, float *dist2,
                             bs_error *err);

#endif
