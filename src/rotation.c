/* The shared random orthogonal rotation P of the RaBitQ code space.
 *
 * Two kinds, both of size D = bs_padded_dim(dim) (docs/algorithms.md,
 * "Rotation", is the specification; this file is its reference):
 *  - FAST: rounds of random sign flips and normalised fast Walsh-Hadamard
 *    transforms, O(D log D) per vector, D floats of state per pass.
 *  - MATRIX: a dense Haar-distributed orthogonal D x D matrix, O(D^2) per
 *    vector.
 *
 * Determinism: the transform is a function of (kind, dim, seed) only. Every
 * random draw comes from bs_rng seeded with `seed`. Building and applying
 * either kind use only IEEE add, subtract, multiply, divide and sqrt in a
 * fixed order, which this library is compiled to keep (-std=c11 implies
 * -ffp-contract=off in GCC, and the baseline x86-64 ISA has no FMA to
 * contract into), so no thread count, batch size, alignment or CPU feature
 * changes a bit of the output: a row's rotation depends on the row alone.
 * The one outside input is libm: the MATRIX kind's normals come from log
 * and cos (rng.h), which glibc computes identically in its SSE2, AVX and
 * FMA variants (checked), but another libm might not. */
#if defined(__clang__)
/* GCC does not know this pragma (and warns); -std=c11 already turns
 * contraction off there. */
#pragma STDC FP_CONTRACT OFF
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) && !defined(BS_ROTATION_NO_SSE2)
#include <emmintrin.h>
#endif

#include "alloc.h"
#include "bitshard.h"
#include "error.h"
#include "hash.h"
#include "rng.h"
#include "rotation_fast.h"
#include "vec.h"

/* BS_ROTATION_MAX_DIM and BS_ROTATION_MATRIX_MAX_DIM: see bitshard.h. */

/* Why 4 rounds. For D a power of two, one round maps e_1 to a vector of
 * equal magnitudes +-1/sqrt(D) (coordinate kurtosis 1, far from the
 * Gaussian 3); a second round makes each coordinate a signed sum of D
 * terms, and three rounds are the usual choice for structured orthogonal
 * transforms (HD3 HD2 HD1 in the structured random feature and
 * cross-polytope LSH literature). For other D a round is two overlapping
 * power-of-two blocks joined by a half-swap butterfly, so it mixes a little
 * less than one full-size Hadamard round; a fourth round covers that.
 * Measured on the rotated e_1, e_D and a 16-sparse vector over 300 seeds at
 * D = 192, 448, 768, 960, 1984 and 4032: coordinate kurtosis 2.98..3.01 and
 * per-coordinate variance D * E[y_i^2] within sampling noise of 1, so the
 * rotated coordinates behave like N(0, 1/D) as RaBitQ's bound assumes. The
 * cost is 4 (or 8) in-cache passes of D log D adds per vector, still far
 * cheaper than a D x D product. */
#define BS_FAST_ROUNDS 4

/* Householder reflectors per compact-WY block in the MATRIX construction.
 * Part of the definition of the matrix (it fixes the rounding), not a
 * tuning knob. */
#define BS_MATRIX_BLOCK 32

struct bs_rotation {
    bs_rotation_kind kind;
    uint32_t dim;
    uint32_t padded_dim; /* D */
    uint64_t seed;
    bs_fingerprint fingerprint;
    /* FAST: W = largest power of two <= D; num_passes sign diagonals of D
     * floats, each with its normalisation folded in (see fast_build). */
    uint32_t hadamard_size;
    uint32_t num_passes;
    float *diag;
    bs_fast_row_fn row; /* the SSE2 or AVX2 version: the same bits */
    /* MATRIX: P transposed, D x D row-major: matrix_t[j * D + i] is P[i][j]
     * (y_i = sum_j P[i][j] x_j), so that a fixed j meets consecutive
     * outputs. */
    float *matrix_t;
};

/* -------------------------------------------------------------- FAST kind */

#if defined(__SSE2__) && !defined(BS_ROTATION_NO_SSE2)
/* Levels 1 and 2 of the transform inside one register of 4 floats.
 * a + (b with its sign bit flipped) is exactly a - b. */
static inline __m128 hadamard4(__m128 v) {
    const __m128 neg13 = _mm_castsi128_ps(
        _mm_set_epi32((int)0x80000000u, 0, (int)0x80000000u, 0));
    const __m128 neg23 = _mm_castsi128_ps(
        _mm_set_epi32((int)0x80000000u, (int)0x80000000u, 0, 0));
    __m128 even = _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 2, 0, 0));
    __m128 odd = _mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 3, 1, 1));
    v = _mm_add_ps(even, _mm_xor_ps(odd, neg13));
    __m128 lo = _mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 1, 0));
    __m128 hi = _mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 2, 3, 2));
    return _mm_add_ps(lo, _mm_xor_ps(hi, neg23));
}
#endif

/* One butterfly level over n pairs: (lo[j], hi[j]) <- (lo[j] + hi[j],
 * lo[j] - hi[j]). */
static inline void butterfly(float *restrict lo, float *restrict hi, uint32_t n) {
    for (uint32_t j = 0; j < n; j++) {
        float a = lo[j], b = hi[j];
        lo[j] = a + b;
        hi[j] = a - b;
    }
}

/* x[i] *= d[i], then the unnormalised in-place Walsh-Hadamard transform of
 * x[0, n), n a power of two >= 8. The rounding is defined by the textbook
 * order: levels h = 1, 2, 4, ..., n/2, each replacing every pair
 * (x[j], x[j + h]) with j mod 2h < h by (x[j] + x[j + h], x[j] - x[j + h]).
 * Fusing the products and levels 1, 2, 4 into one pass, and later levels in
 * pairs, only saves loads and stores: every value is the same expression,
 * so both paths below give the same bits. */
static void signed_fwht(float *restrict x, const float *restrict d,
                        uint32_t n) {
#if defined(__SSE2__) && !defined(BS_ROTATION_NO_SSE2)
    /* Levels 1 and 2 pair lanes of one register, which the compiler does
     * not vectorise well from plain C; SSE2 is in the x86-64 baseline. */
    for (uint32_t i = 0; i < n; i += 8) {
        __m128 v0 = _mm_mul_ps(_mm_loadu_ps(x + i), _mm_loadu_ps(d + i));
        __m128 v1 =
            _mm_mul_ps(_mm_loadu_ps(x + i + 4), _mm_loadu_ps(d + i + 4));
        v0 = hadamard4(v0);
        v1 = hadamard4(v1);
        _mm_storeu_ps(x + i, _mm_add_ps(v0, v1));
        _mm_storeu_ps(x + i + 4, _mm_sub_ps(v0, v1));
    }
#else
    for (uint32_t i = 0; i < n; i += 8) {
        float g[8];
        for (int q = 0; q < 8; q++) g[q] = x[i + q] * d[i + q];
        float a0 = g[0] + g[1], a1 = g[0] - g[1];
        float a2 = g[2] + g[3], a3 = g[2] - g[3];
        float a4 = g[4] + g[5], a5 = g[4] - g[5];
        float a6 = g[6] + g[7], a7 = g[6] - g[7];
        float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
        float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
        x[i + 0] = b0 + b4;
        x[i + 4] = b0 - b4;
        x[i + 1] = b1 + b5;
        x[i + 5] = b1 - b5;
        x[i + 2] = b2 + b6;
        x[i + 6] = b2 - b6;
        x[i + 3] = b3 + b7;
        x[i + 7] = b3 - b7;
    }
#endif
    /* Two levels (h and 2h) per pass over the data. */
    uint32_t h = 8;
    for (; 4 * h <= n; h *= 4) {
        for (uint32_t i = 0; i < n; i += 4 * h) {
            float *restrict p0 = x + i;
            float *restrict p1 = p0 + h;
            float *restrict p2 = p1 + h;
            float *restrict p3 = p2 + h;
            for (uint32_t j = 0; j < h; j++) {
                float a = p0[j] + p1[j], b = p0[j] - p1[j];
                float c = p2[j] + p3[j], e = p2[j] - p3[j];
                p0[j] = a + c;
                p2[j] = a - c;
                p1[j] = b + e;
                p3[j] = b - e;
            }
        }
    }
    if (2 * h == n) butterfly(x, x + h, h);
}

static void mul_diag(float *restrict x, const float *restrict d, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) x[i] *= d[i];
}

/* The normalisations are folded into the sign diagonals: a diagonal scale
 * in front of a linear map equals the same scale after it, and it saves a
 * pass. Per round r (passes 2r and 2r + 1 when W < D, else pass r):
 *   first diagonal:  +-1/sqrt(W) on [0, W),  +-1 on [W, D)
 *   second diagonal: +-1/sqrt(2W) on [D - W, D), +-1/sqrt(2) on [0, D - W)
 * The 1/sqrt(2) belongs to the half butterfly that ends the round. */
static bs_status fast_build(bs_rotation *rot) {
    const uint32_t D = rot->padded_dim;
    uint32_t W = 1;
    while (2 * W <= D) W *= 2;
    rot->hadamard_size = W;
    rot->num_passes = (W == D) ? BS_FAST_ROUNDS : 2 * BS_FAST_ROUNDS;
    /* The level BITSHARD_SIMD and the CPU allow (an invalid BITSHARD_SIMD
     * keeps the baseline here; the searcher reports it). */
    bs_simd_level level = BS_SIMD_SCALAR;
    bs_error ignored;
    if (bs_simd_select(&level, &ignored) != BS_OK) level = BS_SIMD_SCALAR;
    rot->row = level == BS_SIMD_SCALAR ? bs_fast_row_sse2 : bs_fast_row_avx2;
    rot->diag = bs_alloc2(rot->num_passes, D, sizeof(float));
    if (rot->diag == NULL) return BS_ERR_NO_MEMORY;

    const float inv_w = (float)(1.0 / sqrt((double)W));
    const float inv_2w = (float)(1.0 / sqrt(2.0 * (double)W));
    const float inv_2 = (float)(1.0 / sqrt(2.0));
    bs_rng rng;
    bs_rng_seed(&rng, rot->seed);
    for (uint32_t p = 0; p < rot->num_passes; p++) {
        const int second = (W < D) && (p % 2 == 1);
        float *d = rot->diag + (size_t)p * D;
        /* D is a multiple of 64: bit (i mod 64) of word i / 64 is the sign
         * of coordinate i (1 = negate). */
        for (uint32_t w = 0; w < D / 64; w++) {
            uint64_t bits = bs_rng_next(&rng);
            for (uint32_t b = 0; b < 64; b++) {
                uint32_t i = 64 * w + b;
                float mag;
                if (!second)
                    mag = (i < W) ? inv_w : 1.0f;
                else
                    mag = (i >= D - W) ? inv_2w : inv_2;
                d[i] = ((bits >> b) & 1u) ? -mag : mag;
            }
        }
    }
    return BS_OK;
}

/* One row in place: x holds D floats (rotation_fast.h). */
void bs_fast_row_sse2(const float *diag, uint32_t D, uint32_t W, int rounds, float *x) {
    const float *d = diag;
    if (W == D) {
        for (int r = 0; r < rounds; r++, d += D) signed_fwht(x, d, W);
        return;
    }
    /* D = W + m with 0 < m < W. The blocks [0, W) and [D - W, D) overlap in
     * 2W - D coordinates, which can be as few as 64 (D = 960, 1984, ...):
     * through so narrow a channel the two ends of the vector would take
     * dozens of rounds to share their energy. The butterfly between the
     * halves [0, D/2) and [D/2, D) mixes them directly in one O(D) pass. */
    const uint32_t half = D / 2, m = D - W;
    for (int r = 0; r < rounds; r++) {
        signed_fwht(x, d, W);
        mul_diag(x + W, d + W, m);
        d += D;
        mul_diag(x, d, m);
        signed_fwht(x + m, d + m, W);
        d += D;
        butterfly(x, x + half, half);
    }
}

static void fast_apply(const bs_rotation *rot, const float *x, size_t n,
                       uint32_t in_dim, float *out) {
    const uint32_t D = rot->padded_dim;
    for (size_t i = 0; i < n; i++) {
        float *y = out + i * D;
        memcpy(y, x + i * in_dim, (size_t)in_dim * sizeof(float));
        if (in_dim < D)
            memset(y + in_dim, 0, (size_t)(D - in_dim) * sizeof(float));
        rot->row(rot->diag, D, rot->hadamard_size, BS_FAST_ROUNDS, y);
    }
}

/* ------------------------------------------------------------ MATRIX kind
 *
 * P = Q, the orthogonal factor of the QR decomposition of a D x D matrix of
 * independent standard normals, with the columns of Q multiplied by the
 * signs of diag(R) so that Q is Haar distributed (the QR with a positive
 * diagonal is unique). Householder QR writes Q = H_0 H_1 ... H_{D-2} S,
 * where H_k reflects coordinates k..D-1 and S = diag(sign R_kk). Column k
 * of the Gaussian matrix, once H_0..H_{k-1} have been applied, is again a
 * vector of independent standard normals on coordinates k..D-1 (orthogonal
 * maps keep an isotropic Gaussian isotropic), so each reflector is built
 * from freshly drawn normals and R is never formed (Stewart, 1980). That
 * halves the work of a full QR and gives the same distribution.
 *
 * Draw order (part of the definition): one normal g whose sign is
 * S_{D-1,D-1} (g >= 0 gives +1); then for k = D-2 down to 0, the D - k
 * normals x_0..x_{D-k-1} of reflector k. With s = +1 if x_0 >= 0 else -1:
 * v = x + s |x| e_0, tau = 2 / <v, v> (0 if v = 0), H_k = I - tau v v^T,
 * and S_kk = -s (H_k x = -s |x| e_0, so R_kk = -s |x|).
 *
 * Q is accumulated backwards from the identity, A <- H_k A for
 * k = D-2 .. 0, which keeps the active part of A to rows and columns
 * k..D-1. Reflectors are grouped in blocks [k0, k1) with k0 a multiple of
 * BS_MATRIX_BLOCK and applied at once as H_k0 ... H_{k1-1} = I - V T V^T
 * (compact WY), so each block costs two cache-friendly passes over A
 * instead of one pass per reflector. */

/* Pairs of doubles (vec.h): plain loops here were vectorised across the
 * wrong index. */

typedef struct matrix_work {
    uint32_t n;
    /* Row stride of a: n + 8, since a power-of-two stride (n = 1024,
     * 2048, ...) maps a column strip onto one cache set and thrashes. */
    size_t lda;
    double *a;   /* n x lda, row-major: Q being accumulated */
    /* m x bb, row-major: reflector j is column j, zero above row j. */
    double *v;
    double *vt;  /* bb x m: v transposed, for the streaming dot products */
    double *y;   /* bb x m: V^T A_sub, then T V^T A_sub in place */
    double t[BS_MATRIX_BLOCK * BS_MATRIX_BLOCK];
    double tau[BS_MATRIX_BLOCK];
    double *sign; /* n: the column signs S */
} matrix_work;

static void matrix_work_free(matrix_work *w) {
    BS_FREE(w->a);
    BS_FREE(w->v);
    BS_FREE(w->vt);
    BS_FREE(w->y);
    BS_FREE(w->sign);
}

/* y[j][c] = sum_r vt[j][r] * a[r][c] over r = 0, 1, ..., m-1 in turn.
 * Terms with r < j are exact zeros (+0 accumulators stay +0), so whether a
 * loop starts at row 0 or j changes no bit; neither does splitting the rows
 * into blocks, since each block continues the same running sums. The row
 * blocks keep an 8-column strip of a in L1 while all bb reflectors pass
 * over it. */
#define WY_ROWS 64
static void wy_project(const matrix_work *w, uint32_t m, uint32_t bb,
                       const double *asub) {
    const size_t n = w->lda;
    memset(w->y, 0, (size_t)bb * m * sizeof(double));
    for (uint32_t c = 0; c < m; c += 8) {
        const uint32_t cw = (m - c < 8) ? m - c : 8;
        for (uint32_t r0 = 0; r0 < m; r0 += WY_ROWS) {
            const uint32_t r1 = (m - r0 < WY_ROWS) ? m : r0 + WY_ROWS;
            uint32_t j = 0;
            if (cw == 8) {
                for (; j + 2 <= bb; j += 2) {
                    const double *v0 = w->vt + (size_t)j * m;
                    const double *v1 = v0 + m;
                    double *y0 = w->y + (size_t)j * m + c;
                    double *y1 = y0 + m;
                    bs_v2d a0[4], a1[4];
                    for (int q = 0; q < 4; q++) {
                        a0[q] = bs_v2d_load(y0 + 2 * q);
                        a1[q] = bs_v2d_load(y1 + 2 * q);
                    }
                    for (uint32_t r = r0; r < r1; r++) {
                        const double *ar = asub + (size_t)r * n + c;
                        const bs_v2d s0 = {v0[r], v0[r]}, s1 = {v1[r], v1[r]};
                        for (int q = 0; q < 4; q++) {
                            const bs_v2d x = bs_v2d_load(ar + 2 * q);
                            a0[q] += s0 * x;
                            a1[q] += s1 * x;
                        }
                    }
                    for (int q = 0; q < 4; q++) {
                        bs_v2d_store(y0 + 2 * q, a0[q]);
                        bs_v2d_store(y1 + 2 * q, a1[q]);
                    }
                }
            }
            for (; j < bb; j++) {
                const double *v0 = w->vt + (size_t)j * m;
                double *y0 = w->y + (size_t)j * m + c;
                for (uint32_t q = 0; q < cw; q++) {
                    double acc = y0[q];
                    for (uint32_t r = r0; r < r1; r++)
                        acc += v0[r] * asub[(size_t)r * n + c + q];
                    y0[q] = acc;
                }
            }
        }
    }
}

/* a[r][c] -= v[r][j] * z[j][c] for j = 0, 1, ..., bb-1 in turn. Row
 * blocks keep their rows of v in L1 across the column tiles. */
static void wy_update(const matrix_work *w, uint32_t m, uint32_t bb,
                      double *asub) {
    const size_t n = w->lda;
    for (uint32_t r0 = 0; r0 < m; r0 += WY_ROWS) {
        const uint32_t r1 = (m - r0 < WY_ROWS) ? m : r0 + WY_ROWS;
        uint32_t c = 0;
        for (; c + 8 <= m; c += 8) {
            uint32_t r = r0;
            /* Two rows share each load of z. */
            for (; r + 2 <= r1; r += 2) {
                double *ar0 = asub + (size_t)r * n + c;
                double *ar1 = ar0 + n;
                const double *vr0 = w->v + (size_t)r * bb;
                const double *vr1 = vr0 + bb;
                bs_v2d acc0[4], acc1[4];
                for (int q = 0; q < 4; q++) {
                    acc0[q] = bs_v2d_load(ar0 + 2 * q);
                    acc1[q] = bs_v2d_load(ar1 + 2 * q);
                }
                for (uint32_t j = 0; j < bb; j++) {
                    const bs_v2d s0 = {vr0[j], vr0[j]}, s1 = {vr1[j], vr1[j]};
                    const double *zj = w->y + (size_t)j * m + c;
                    for (int q = 0; q < 4; q++) {
                        const bs_v2d z = bs_v2d_load(zj + 2 * q);
                        acc0[q] -= s0 * z;
                        acc1[q] -= s1 * z;
                    }
                }
                for (int q = 0; q < 4; q++) {
                    bs_v2d_store(ar0 + 2 * q, acc0[q]);
                    bs_v2d_store(ar1 + 2 * q, acc1[q]);
                }
            }
            for (; r < r1; r++) {
                double *ar = asub + (size_t)r * n + c;
                const double *vr = w->v + (size_t)r * bb;
                bs_v2d acc[4];
                for (int q = 0; q < 4; q++) acc[q] = bs_v2d_load(ar + 2 * q);
                for (uint32_t j = 0; j < bb; j++) {
                    const bs_v2d sj = {vr[j], vr[j]};
                    const double *zj = w->y + (size_t)j * m + c;
                    for (int q = 0; q < 4; q++)
                        acc[q] -= sj * bs_v2d_load(zj + 2 * q);
                }
                for (int q = 0; q < 4; q++) bs_v2d_store(ar + 2 * q, acc[q]);
            }
        }
        for (; c < m; c++) {
            for (uint32_t r = r0; r < r1; r++) {
                double acc = asub[(size_t)r * n + c];
                for (uint32_t j = 0; j < bb; j++)
                    acc -= w->v[(size_t)r * bb + j] * w->y[(size_t)j * m + c];
                asub[(size_t)r * n + c] = acc;
            }
        }
    }
}

/* Draws the reflectors k1-1 down to k0 into v (rows relative to k0). */
static void wy_draw(matrix_work *w, bs_rng *rng, uint32_t k0, uint32_t k1) {
    const uint32_t n = w->n, m = n - k0, bb = k1 - k0;
    memset(w->v, 0, (size_t)m * bb * sizeof(double));
    for (uint32_t k = k1; k-- > k0;) {
        const uint32_t j = k - k0, len = n - k;
        double norm2 = 0;
        for (uint32_t t = 0; t < len; t++) {
            double g = bs_rng_normal(rng);
            w->v[(size_t)(j + t) * bb + j] = g;
            norm2 += g * g;
        }
        double *v0 = &w->v[(size_t)j * bb + j];
        const double s = (*v0 >= 0) ? 1.0 : -1.0;
        *v0 += s * sqrt(norm2);
        double vtv = 0;
        for (uint32_t t = 0; t < len; t++) {
            double e = w->v[(size_t)(j + t) * bb + j];
            vtv += e * e;
        }
        w->tau[j] = (vtv > 0) ? 2.0 / vtv : 0.0;
        w->sign[k] = -s;
    }
}

/* T upper triangular with H_k0 ... H_{k1-1} = I - V T V^T: appending H_j
 * on the right gives T[0:j, j] = -tau_j T[0:j, 0:j] V[:, 0:j]^T v_j. */
static void wy_build_t(matrix_work *w, uint32_t m, uint32_t bb) {
    double *t = w->t;
    const uint32_t ld = BS_MATRIX_BLOCK;
    double u[BS_MATRIX_BLOCK];
    for (uint32_t j = 0; j < bb; j++) {
        for (uint32_t i = 0; i < j; i++) {
            double s = 0;
            for (uint32_t r = j; r < m; r++)
                s += w->v[(size_t)r * bb + i] * w->v[(size_t)r * bb + j];
            u[i] = s;
        }
        for (uint32_t i = 0; i < j; i++) {
            double s = 0;
            for (uint32_t l = i; l < j; l++) s += t[i * ld + l] * u[l];
            t[i * ld + j] = -w->tau[j] * s;
        }
        for (uint32_t i = j + 1; i < bb; i++) t[i * ld + j] = 0;
        t[j * ld + j] = w->tau[j];
    }
}

/* y <- T y in place: row j of the product only reads rows l >= j. */
static void wy_apply_t(matrix_work *w, uint32_t m, uint32_t bb) {
    const uint32_t ld = BS_MATRIX_BLOCK;
    for (uint32_t j = 0; j < bb; j++) {
        double *yj = w->y + (size_t)j * m;
        const double tjj = w->t[j * ld + j];
        for (uint32_t c = 0; c < m; c++) yj[c] *= tjj;
        for (uint32_t l = j + 1; l < bb; l++) {
            const double tjl = w->t[j * ld + l];
            const double *yl = w->y + (size_t)l * m;
            for (uint32_t c = 0; c < m; c++) yj[c] += tjl * yl[c];
        }
    }
}

static bs_status matrix_build(bs_rotation *rot) {
    const uint32_t n = rot->padded_dim;
    const size_t nn = (size_t)n * n;
    matrix_work w;
    memset(&w, 0, sizeof w);
    w.n = n;
    w.lda = (size_t)n + 8;
    w.a = bs_zalloc2((size_t)n, w.lda, sizeof(double));
    w.v = bs_alloc2(n, BS_MATRIX_BLOCK, sizeof(double));
    w.vt = bs_alloc2(n, BS_MATRIX_BLOCK, sizeof(double));
    w.y = bs_alloc2(n, BS_MATRIX_BLOCK, sizeof(double));
    w.sign = bs_alloc(n, sizeof(double));
    rot->matrix_t = bs_alloc(nn, sizeof(float));
    if (!w.a || !w.v || !w.vt || !w.y || !w.sign || !rot->matrix_t) {
        matrix_work_free(&w);
        return BS_ERR_NO_MEMORY;
    }
    for (uint32_t i = 0; i < n; i++) w.a[(size_t)i * w.lda + i] = 1.0;

    bs_rng rng;
    bs_rng_seed(&rng, rot->seed);
    w.sign[n - 1] = (bs_rng_normal(&rng) >= 0) ? 1.0 : -1.0;
    for (uint32_t k1 = n - 1; k1 > 0;) {
        const uint32_t k0 = (k1 - 1) / BS_MATRIX_BLOCK * BS_MATRIX_BLOCK;
        const uint32_t m = n - k0, bb = k1 - k0;
        wy_draw(&w, &rng, k0, k1);
        for (uint32_t r = 0; r < m; r++)
            for (uint32_t j = 0; j < bb; j++)
                w.vt[(size_t)j * m + r] = w.v[(size_t)r * bb + j];
        wy_build_t(&w, m, bb);
        double *asub = w.a + (size_t)k0 * w.lda + k0;
        wy_project(&w, m, bb, asub);
        wy_apply_t(&w, m, bb);
        wy_update(&w, m, bb, asub);
        k1 = k0;
    }
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = 0; c < n; c++)
            rot->matrix_t[(size_t)c * n + i] =
                (float)(w.a[(size_t)i * w.lda + c] * w.sign[c]);
    matrix_work_free(&w);
    return BS_OK;
}

/* out = x P^T, computed here rather than by BLAS so that it is a function
 * of the row alone. OpenBLAS's sgemm gives a row different last bits
 * depending on the batch's size, the row's place in it, K, the thread count
 * and the CPU's kernel (measured: Haswell, Sandybridge and Prescott kernels
 * disagree even one row at a time), which would make a segment built in
 * pieces on mixed machines differ from a single build. Here every output is
 *   y[r][i] = ((0 + x[r][0] P[i][0]) + x[r][1] P[i][1]) + ...
 *             + x[r][K-1] P[i][K-1]
 * in float, j ascending, whatever the blocking; K = in_dim, and when in_dim
 * is dim the skipped padding terms are exact zeros (adding 0 to a sum that
 * started at +0 changes no bit), so padded and unpadded input agree too.
 * Speed (D = 768, one core, measured against the same OpenBLAS): 4x slower
 * than a batched AVX2 sgemm, but 2x faster than sgemm called one row at a
 * time (4x in batches), which is how a batch-independent caller would have
 * had to use BLAS. */

/* Rows per block: their inputs stay in L2 while every 8-column strip of
 * P^T streams past them. */
#define MATRIX_APPLY_ROWS 64

static void matrix_apply(const bs_rotation *rot, const float *x, size_t n,
                         uint32_t in_dim, float *out) {
    const uint32_t D = rot->padded_dim, K = in_dim;
    const float *pt = rot->matrix_t;
    for (size_t r0 = 0; r0 < n; r0 += MATRIX_APPLY_ROWS) {
        const size_t r1 =
            (n - r0 < MATRIX_APPLY_ROWS) ? n : r0 + MATRIX_APPLY_ROWS;
        for (uint32_t c = 0; c < D; c += 8) {
            for (size_t r = r0; r + 4 <= r1; r += 4) {
                const float *xr = x + r * K;
                bs_v4f acc[4][2];
                memset(acc, 0, sizeof acc);
                for (uint32_t j = 0; j < K; j++) {
                    const float *pj = pt + (size_t)j * D + c;
                    const bs_v4f p0 = bs_v4f_load(pj), p1 = bs_v4f_load(pj + 4);
                    for (int q = 0; q < 4; q++) {
                        const float s = xr[(size_t)q * K + j];
                        const bs_v4f b = {s, s, s, s};
                        acc[q][0] += b * p0;
                        acc[q][1] += b * p1;
                    }
                }
                for (int q = 0; q < 4; q++) {
                    bs_v4f_store(out + (r + q) * D + c, acc[q][0]);
                    bs_v4f_store(out + (r + q) * D + c + 4, acc[q][1]);
                }
            }
        }
        /* Leftover rows (all of a single-row call, such as a query): the
         * same sums with j outermost, so that P^T streams through once in
         * order while the output row stays in L1. */
        for (size_t r = r0 + (r1 - r0) / 4 * 4; r < r1; r++) {
            const float *xr = x + r * K;
            float *yr = out + r * D;
            memset(yr, 0, (size_t)D * sizeof(float));
            for (uint32_t j = 0; j < K; j++) {
                const float *pj = pt + (size_t)j * D;
                const bs_v4f b = {xr[j], xr[j], xr[j], xr[j]};
                for (uint32_t c = 0; c < D; c += 4)
                    bs_v4f_store(yr + c,
                               bs_v4f_load(yr + c) + b * bs_v4f_load(pj + c));
            }
        }
    }
}

/* ------------------------------------------------------------- public API */

static const char *kind_name(bs_rotation_kind kind) {
    return kind == BS_ROTATION_FAST ? "fast" : "matrix";
}

bs_status bs_rotation_create(bs_rotation_kind kind, uint32_t dim,
                             uint64_t seed, bs_rotation **out,
                             bs_error *err) {
    if (out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation: out must not be NULL");
    *out = NULL;
    if (kind != BS_ROTATION_FAST && kind != BS_ROTATION_MATRIX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation kind must be %d (fast) or %d (matrix), got %d",
                       (int)BS_ROTATION_FAST, (int)BS_ROTATION_MATRIX,
                       (int)kind);
    if (dim == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation dimension must be >= 1, got 0");
    if (dim > BS_ROTATION_MAX_DIM)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation dimension must be <= %u, got %u",
                       BS_ROTATION_MAX_DIM, dim);
    const uint32_t D = bs_padded_dim(dim);
    if (kind == BS_ROTATION_MATRIX && D > BS_ROTATION_MATRIX_MAX_DIM)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "matrix rotation dimension must be <= %u (padded "
                       "dimension %u for dimension %u is too large; use the "
                       "fast rotation)",
                       BS_ROTATION_MATRIX_MAX_DIM, D, dim);

    bs_rotation *rot = bs_zalloc(1, sizeof *rot);
    if (rot == NULL)
        return bs_fail(err, BS_ERR_NO_MEMORY,
                       "rotation: out of memory for the handle");
    rot->kind = kind;
    rot->dim = dim;
    rot->padded_dim = D;
    rot->seed = seed;
    rot->fingerprint = bs_rotation_fingerprint_params(kind, dim, D, seed);
    bs_status st = (kind == BS_ROTATION_FAST) ? fast_build(rot)
                                              : matrix_build(rot);
    if (st != BS_OK) {
        bs_rotation_free(rot);
        return bs_fail(err, st,
                       "rotation: out of memory building the %s rotation "
                       "of padded dimension %u",
                       kind_name(kind), D);
    }
    bs_error_clear(err);
    *out = rot;
    return BS_OK;
}

void bs_rotation_free(bs_rotation *rot) {
    if (rot == NULL) return;
    free(rot->diag);
    free(rot->matrix_t);
    free(rot);
}

uint32_t bs_rotation_dim(const bs_rotation *rot) {
    return rot ? rot->dim : 0;
}

uint32_t bs_rotation_padded_dim(const bs_rotation *rot) {
    return rot ? rot->padded_dim : 0;
}

bs_rotation_kind bs_rotation_kind_of(const bs_rotation *rot) {
    return rot ? rot->kind : BS_ROTATION_FAST;
}

uint64_t bs_rotation_seed(const bs_rotation *rot) {
    return rot ? rot->seed : 0;
}

bs_fingerprint bs_rotation_fingerprint(const bs_rotation *rot) {
    if (rot == NULL) {
        bs_fingerprint zero;
        memset(&zero, 0, sizeof zero);
        return zero;
    }
    return rot->fingerprint;
}

/* 1 when [a, a + na) and [b, b + nb) (bytes) share a byte. */
static int ranges_overlap(const void *a, size_t na, const void *b, size_t nb) {
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return pa < pb + nb && pb < pa + na;
}

bs_status bs_rotation_apply(const bs_rotation *rot, const float *x, size_t n,
                            uint32_t in_dim, float *out, bs_error *err) {
    if (rot == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation must not be NULL");
    const uint32_t D = rot->padded_dim;
    if (in_dim != rot->dim && in_dim != D)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "input dimension must be %u (dim) or %u (padded "
                       "dim), got %u",
                       rot->dim, D, in_dim);
    if (n == 0) {
        bs_error_clear(err);
        return BS_OK;
    }
    if (x == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation input x must not be NULL (n = %zu)", n);
    if (out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation output must not be NULL (n = %zu)", n);
    size_t in_elems, out_elems, in_bytes, out_bytes;
    if (!bs_mul_ok(n, in_dim, &in_elems) || !bs_mul_ok(n, D, &out_elems) ||
        !bs_mul_ok(in_elems, sizeof(float), &in_bytes) ||
        !bs_mul_ok(out_elems, sizeof(float), &out_bytes))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation: n = %zu rows of %u floats overflow size_t",
                       n, D);
    /* Rows are written before later rows are read, and BLAS forbids
     * aliasing: an overlap would silently corrupt the input. */
    if (ranges_overlap(x, in_bytes, out, out_bytes))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rotation input and output buffers overlap");

    if (rot->kind == BS_ROTATION_FAST)
        fast_apply(rot, x, n, in_dim, out);
    else
        matrix_apply(rot, x, n, in_dim, out);
    bs_error_clear(err);
    return BS_OK;
}
