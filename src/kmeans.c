/* k-means training of IVF centroids: k-means++ seeding on a subsample, then
 * Lloyd iterations over every row. Choices and their reasons are in
 * docs/algorithms.md, "IVF training and assignment".
 *
 * Reproducibility: every random draw comes from bs_rng seeded by `seed`,
 * seeding distances use bs_l2sq_f32_fixed, assignments come from
 * bs_ivf_assign_rows (exact argmin, independent of BLAS bits) and centroid
 * sums are accumulated in double in row order. So the same (x, seed, k,
 * metric, max_iters) gives the same centroids whatever the BLAS thread
 * count or CPU kernel. */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "ivf_internal.h"
#include "parallel.h"
#include "rng.h"

/* Seeding sample: k-means++ costs O(m k d) sequential, memory-bound work
 * (each new centre needs one pass over the m sample rows), which over all n
 * rows is far too slow for k = 1024, n = 262144, d = 768. Eight sample rows
 * per centroid give every cluster holding >= 1/k of the data ~8 chances to
 * be drawn, enough for D^2 sampling to place a seed in it; Lloyd on all n
 * rows then does the fine placement. Measured at k = 1024, d = 768 (one
 * core): 16 rows per centroid cost ~7 s of seeding against ~3 s for 8,
 * while a Lloyd iteration costs ~5.5 s, so 8 keeps seeding under one
 * iteration.
 * The floor keeps small-k seeding from looking at a handful of points. */
#ifndef BS_SEED_ROWS_PER_CENTROID
#define BS_SEED_ROWS_PER_CENTROID 8
#endif
#define BS_SEED_MIN_ROWS 4096

/* Stop when fewer than 1 in 1000 rows changed partition: past that point an
 * iteration moves centroids by a negligible amount for IVF purposes (the
 * partitions are only a coarse filter) while costing a full pass. */
#define BS_SETTLED_PER_MILLE 1

/* A row whose nearest centre c lies at distance r from it cannot get
 * closer to a new centre c' with |c - c'| >= 2r (triangle inequality), so
 * the distance to c' is skipped. Squared: |c - c'|^2 >= 4 r^2. The extra
 * 0.25% keeps the skip on the safe side of float rounding (~d 2^-24
 * relative) for any sensible d; skipping changes no result, only work. */
#define BS_PRUNE_FACTOR 4.01

static size_t pick_uniform(bs_rng *rng, const unsigned char *elig, size_t m,
                           size_t n_elig) {
    if (n_elig == 0) return (size_t)bs_rng_below(rng, m);
    size_t want = (size_t)bs_rng_below(rng, n_elig);
    for (size_t i = 0; i < m; i++) {
        if (elig[i] && want-- == 0) return i;
    }
    return 0; /* unreachable: n_elig counts elig */
}

/* k-means++ (D^2 sampling) over a uniform subsample of the rows, written
 * into centroids[k * d]. In cosine mode zero rows are not eligible: they
 * sit at distance 1 from every unit centroid, so they say nothing about
 * where centres belong, and a zero centroid could not be unit length. */
static bs_status seed_kmeanspp(const float *data, size_t n, uint32_t d,
                               uint32_t k, int cosine, bs_rng *rng,
                               float *centroids, bs_error *err) {
    size_t m = (size_t)k * BS_SEED_ROWS_PER_CENTROID;
    if (m < BS_SEED_MIN_ROWS) m = BS_SEED_MIN_ROWS;
    if (m > n) m = n;

    /* A contiguous copy: the pass per centre then streams through memory
     * instead of hopping across all n rows (TLB and prefetch friendly). */
    float *sample = bs_alloc2(m, d, sizeof(float));
    double *dist = bs_alloc(m, sizeof(double));
    uint32_t *near = bs_alloc(m, sizeof(uint32_t));
    unsigned char *elig = bs_alloc(m, 1);
    double *cc = bs_alloc(k, sizeof(double));
    bs_status st = BS_OK;
    if (!sample || !dist || !near || !elig || !cc) {
        st = bs_fail(err, BS_ERR_NO_MEMORY,
                     "out of memory for k-means++ seeding over %zu rows", m);
        goto done;
    }

    /* Selection sampling (Knuth's Algorithm S): a uniform m-subset in row
     * order in one pass, with no index array. */
    size_t got = 0;
    for (size_t i = 0; i < n && got < m; i++) {
        if (m == n ||
            bs_rng_uniform(rng) * (double)(n - i) < (double)(m - got)) {
            memcpy(sample + got * d, data + i * d, (size_t)d * sizeof(float));
            got++;
        }
    }
    /* Rounding in the test above could in theory leave the sample short;
     * it is then filled from the last rows, so it always has m rows. */
    for (size_t i = n; got < m; i--, got++)
        memcpy(sample + got * d, data + (i - 1) * d, (size_t)d * sizeof(float));

    size_t n_elig = 0;
    for (size_t i = 0; i < m; i++) {
        elig[i] = !cosine || bs_norm2_fixed(sample + i * d, d) > 0.0;
        n_elig += elig[i];
        dist[i] = INFINITY;
        near[i] = 0;
    }

    for (uint32_t t = 0; t < k; t++) {
        size_t pick = 0;
        int have = 0;
        if (t > 0) {
            double total = 0.0;
            for (size_t i = 0; i < m; i++)
                if (elig[i]) total += dist[i];
            if (total > 0.0 && isfinite(total)) {
                double target = bs_rng_uniform(rng) * total, cum = 0.0;
                for (size_t i = 0; i < m; i++) {
                    if (!elig[i] || dist[i] <= 0.0) continue;
                    /* If rounding leaves cum <= target at the end, the last
                     * row with mass is taken. */
                    pick = i;
                    have = 1;
                    cum += dist[i];
                    if (cum > target) break;
                }
            }
        }
        /* The first centre, or no D^2 mass left (every eligible row equals
         * a chosen centre, e.g. all rows identical): uniform. */
        if (!have) pick = pick_uniform(rng, elig, m, n_elig);

        float *c = centroids + (size_t)t * d;
        memcpy(c, sample + pick * d, (size_t)d * sizeof(float));
        if (t + 1 == k) break;

        for (uint32_t s = 0; s < t; s++)
            cc[s] = bs_l2sq_f32_fixed(c, centroids + (size_t)s * d, d);
        for (size_t i = 0; i < m; i++) {
            if (!elig[i]) continue;
            if (t > 0 && cc[near[i]] >= BS_PRUNE_FACTOR * dist[i]) continue;
            double e = bs_l2sq_f32_fixed(sample + i * d, c, d);
            if (e < dist[i]) {
                dist[i] = e;
                near[i] = t;
            }
        }
    }

done:
    free(sample);
    free(dist);
    free(near);
    free(elig);
    free(cc);
    return st;
}

/* Keeps a perturbed coordinate of a split centroid within reach of its
 * base: inside the accepted range (|v| <= 2^40, bitshard.h) when the base is
 * inside it, so accepted data never trains a centroid that the builder then
 * refuses; otherwise (the C API takes any finite value) merely finite. */
static float to_float_clamped(double v, double base) {
    const double limit = fabs(base) <= BS_MAX_ABS_VALUE ? BS_MAX_ABS_VALUE : FLT_MAX;
    if (v > limit) return (float)limit;
    if (v < -limit) return (float)-limit;
    return (float)v;
}

static void normalize_centroid(float *c, uint32_t d) {
    if (bs_norm2_fixed(c, d) > 0.0) bs_normalize_row(c, d, c);
}

/* Splits the largest cluster to refill each empty one: the two halves are
 * the old centre plus and minus a small random sign vector, so the
 * hyperplane between them passes through the cluster's mean and the next
 * assignment divides its rows. The step is a fraction of the cluster's
 * per-dimension spread (large enough to survive float rounding of the
 * centre, small enough not to throw the centre out of its cluster).
 * counts and inertia are updated as estimates so that several empties in
 * one pass spread over several large clusters. */
static void repair_by_split(float *centroids, uint32_t k, uint32_t d,
                            int cosine, size_t *counts, double *inertia,
                            bs_rng *rng) {
    for (uint32_t j = 0; j < k; j++) {
        if (counts[j] != 0) continue;
        uint32_t big = 0;
        for (uint32_t i = 1; i < k; i++)
            if (counts[i] > counts[big]) big = i;
        if (counts[big] < 2) return; /* only when n < k, excluded above */

        float *cb = centroids + (size_t)big * d;
        float *cj = centroids + (size_t)j * d;
        double rms = sqrt(inertia[big] / ((double)counts[big] * d));
        double maxabs = 0.0;
        for (uint32_t i = 0; i < d; i++)
            if (fabs((double)cb[i]) > maxabs) maxabs = fabs((double)cb[i]);
        /* rms is infinite when squared distances overflowed float. */
        double step = isfinite(rms) ? rms / 16.0 : 0.0;
        if (step < maxabs * 0x1p-13) step = maxabs * 0x1p-13;
        if (step == 0.0) step = 0x1p-13;

        uint64_t bits = 0;
        for (uint32_t i = 0; i < d; i++) {
            if ((i & 63) == 0) bits = bs_rng_next(rng);
            double delta = ((bits >> (i & 63)) & 1) ? step : -step;
            double base = (double)cb[i];
            cj[i] = to_float_clamped(base + delta, base);
            cb[i] = to_float_clamped(base - delta, base);
        }
        if (cosine) {
            normalize_centroid(cj, d);
            normalize_centroid(cb, d);
        }
        counts[j] = counts[big] / 2;
        counts[big] -= counts[j];
        inertia[big] *= 0.5;
        inertia[j] = inertia[big];
    }
}

/* After the last iteration a split centroid may still own no row. Giving it
 * the row farthest from its own centroid (taken from a cluster that keeps
 * at least one other row) makes it own that row: with distinct rows it is
 * strictly nearer to its copy than to anything else. Returns the number of
 * empties it could not fill (only possible with duplicate rows). */
static uint32_t repair_with_rows(const float *data, size_t n, uint32_t d,
                                 uint32_t k, int cosine, float *centroids,
                                 uint32_t *assign, float *dist2,
                                 size_t *counts) {
    uint32_t unfilled = 0;
    for (uint32_t j = 0; j < k; j++) {
        if (counts[j] != 0) continue;
        size_t best = SIZE_MAX;
        for (size_t i = 0; i < n; i++) {
            if (counts[assign[i]] < 2 || !(dist2[i] > 0.0f)) continue;
            if (best != SIZE_MAX && !(dist2[i] > dist2[best])) continue;
            /* Only rows that would become the best pay for this test. */
            if (cosine && bs_norm2_fixed(data + i * d, d) == 0.0) continue;
            best = i;
        }
        if (best == SIZE_MAX) {
            unfilled++;
            continue;
        }
        memcpy(centroids + (size_t)j * d, data + best * d,
               (size_t)d * sizeof(float));
        counts[assign[best]]--;
        counts[j] = 1;
        assign[best] = j;
        dist2[best] = 0.0f;
    }
    return unfilled;
}

static uint32_t count_empty(const size_t *counts, uint32_t k) {
    uint32_t e = 0;
    for (uint32_t j = 0; j < k; j++) e += counts[j] == 0;
    return e;
}

bs_status bs_kmeans_train(const float *x, size_t n, uint32_t d, uint32_t k,
                          bs_metric metric, uint32_t max_iters, uint64_t seed,
                          float *centroids, bs_error *err) {
    return bs_kmeans_train_impl(x, n, d, k, metric, max_iters, seed, centroids, 1, 1, err);
}

bs_status bs_kmeans_train_mt(const float *x, size_t n, uint32_t d, uint32_t k,
                             bs_metric metric, uint32_t max_iters, uint64_t seed,
                             uint32_t num_threads, float *centroids, bs_error *err) {
    return bs_kmeans_train_impl(x, n, d, k, metric, max_iters, seed, centroids, 1,
                                num_threads, err);
}

/* Rows per batch of re-assigned rows (gathered into a contiguous copy for
 * the BLAS pass): bounds each worker's copy at 2^20 floats whatever n is. */
#define BS_REDO_FLOATS ((size_t)1 << 20)

/* Rows per unit of the workers' shares of the bound check. */
#define BS_PRUNE_BLOCK 1024

/* One iteration's assignment over a worker's share of the rows (see
 * assign_pruned). */
typedef struct prune_job {
    const float *data, *centroids;
    size_t n;
    uint32_t d, k;
    const uint32_t *prev;
    uint32_t *assign;
    float *dist2;
    double *lbd;
    size_t *redo;
    float **gather;
    uint32_t **g_assign;
    float **g_dist2;
    double **g_second;
    size_t gbatch;
    const bs_l2_kernels *kn;
    bs_status *st;
    bs_error *errs;
} prune_job;

static void prune_worker(void *arg, uint32_t w, uint32_t nw) {
    const prune_job *j = arg;
    const uint32_t d = j->d;
    size_t begin, end, nredo = 0;
    bs_parallel_share(j->n, BS_PRUNE_BLOCK, w, nw, &begin, &end);
    size_t *redo = j->redo + begin; /* this share's slice of the index list */
    for (size_t i = begin; i < end; i++) {
        const uint32_t a = j->prev[i];
        const double e = j->kn->l2sq(j->data + i * d, j->centroids + (size_t)a * d, d);
        /* The relative margin covers the double rounding of e, of the
         * square roots and of the bound updates (~1e-15 each). */
        if (sqrt(e) < j->lbd[i] * (1.0 - 1e-9)) {
            j->assign[i] = a;
            j->dist2[i] = bs_dist_to_float(e);
        } else {
            redo[nredo++] = i;
        }
    }
    float *gather = j->gather[w];
    j->st[w] = BS_OK;
    for (size_t b0 = 0; b0 < nredo; b0 += j->gbatch) {
        size_t m = nredo - b0 < j->gbatch ? nredo - b0 : j->gbatch;
        for (size_t t = 0; t < m; t++)
            memcpy(gather + t * d, j->data + redo[b0 + t] * d, d * sizeof(float));
        j->st[w] = bs_ivf_assign_rows_lb(j->centroids, j->k, d, 0, 0, gather, m,
                                         j->g_assign[w], j->g_dist2[w], j->g_second[w],
                                         1, &j->errs[w]);
        if (j->st[w] != BS_OK) return;
        for (size_t t = 0; t < m; t++) {
            size_t i = redo[b0 + t];
            j->assign[i] = j->g_assign[w][t];
            j->dist2[i] = j->g_dist2[w][t];
            j->lbd[i] = sqrt(j->g_second[w][t]);
        }
    }
}

/* Per-worker buffers of assign_pruned. */
typedef struct prune_bufs {
    uint32_t nw;
    size_t gbatch;
    float *gather[BS_MAX_THREADS], *g_dist2[BS_MAX_THREADS];
    uint32_t *g_assign[BS_MAX_THREADS];
    double *g_second[BS_MAX_THREADS];
} prune_bufs;

static int prune_bufs_init(prune_bufs *pb, uint32_t nw, size_t gbatch, uint32_t d) {
    memset(pb, 0, sizeof *pb);
    pb->nw = nw;
    pb->gbatch = gbatch;
    for (uint32_t w = 0; w < nw; w++) {
        pb->gather[w] = bs_alloc2(gbatch, d, sizeof(float));
        pb->g_assign[w] = bs_alloc(gbatch, sizeof(uint32_t));
        pb->g_dist2[w] = bs_alloc(gbatch, sizeof(float));
        pb->g_second[w] = bs_alloc(gbatch, sizeof(double));
        if (!pb->gather[w] || !pb->g_assign[w] || !pb->g_dist2[w] || !pb->g_second[w])
            return 0;
    }
    return 1;
}

static void prune_bufs_free(prune_bufs *pb) {
    for (uint32_t w = 0; w < pb->nw; w++) {
        BS_FREE(pb->gather[w]);
        BS_FREE(pb->g_assign[w]);
        BS_FREE(pb->g_dist2[w]);
        BS_FREE(pb->g_second[w]);
    }
}

/* Assigns every row: directly, or (prune, once bounds exist) only the rows
 * whose bounds allow another centroid to be nearest, in gathered batches.
 * A skipped row keeps prev[i], which is still its exact argmin: its exact
 * distance to that centroid is below a lower bound on the distance to every
 * other one. Its dist2 is computed exactly like the full pass computes it,
 * so the result is the full pass's, bit for bit. lbd[i] (a lower bound on
 * the distance, not squared, to every centroid but assign[i]) is refreshed
 * for every re-assigned row. Every row's result depends on that row alone,
 * so the workers' split cannot change it. */
static bs_status assign_pruned(const float *data, size_t n, uint32_t d, uint32_t k,
                               const float *centroids, int have_bounds,
                               const uint32_t *prev, uint32_t *assign, float *dist2,
                               double *lbd, size_t *redo, prune_bufs *pb,
                               const bs_l2_kernels *kn, uint32_t threads, bs_error *err) {
    if (!have_bounds) {
        BS_TRY(bs_ivf_assign_rows_lb(centroids, k, d, 0, 0, data, n, assign, dist2, lbd,
                                     threads, err));
        for (size_t i = 0; i < n; i++) lbd[i] = sqrt(lbd[i]);
        return BS_OK;
    }
    bs_status wst[BS_MAX_THREADS];
    bs_error werr[BS_MAX_THREADS];
    prune_job job = {data, centroids, n, d, k, prev, assign, dist2, lbd, redo,
                     pb->gather, pb->g_assign, pb->g_dist2, pb->g_second, pb->gbatch,
                     kn, wst, werr};
    bs_parallel_run(pb->nw, prune_worker, &job);
    for (uint32_t w = 0; w < pb->nw; w++) {
        if (wst[w] != BS_OK) {
            if (err) *err = werr[w];
            return wst[w];
        }
    }
    return BS_OK;
}

/* Centroid sums of a worker's range of centroids: every row is visited in
 * row order, so each sum adds its rows in the order a single thread would
 * and the result does not depend on the split. */
typedef struct sums_job {
    const float *data;
    size_t n;
    uint32_t d, k;
    const uint32_t *assign;
    const float *dist2;
    double *sums, *inertia;
} sums_job;

static void sums_worker(void *arg, uint32_t w, uint32_t nw) {
    const sums_job *j = arg;
    const uint32_t lo = (uint32_t)((uint64_t)j->k * w / nw);
    const uint32_t hi = (uint32_t)((uint64_t)j->k * (w + 1) / nw);
    const uint32_t d = j->d;
    memset(j->sums + (size_t)lo * d, 0, (size_t)(hi - lo) * d * sizeof(double));
    memset(j->inertia + lo, 0, (size_t)(hi - lo) * sizeof(double));
    for (size_t i = 0; i < j->n; i++) {
        const uint32_t a = j->assign[i];
        if (a < lo || a >= hi) continue;
        const float *row = j->data + i * d;
        double *s = j->sums + (size_t)a * d;
        for (uint32_t t = 0; t < d; t++) s[t] += (double)row[t];
        j->inertia[a] += (double)j->dist2[i];
    }
}

/* The arguments bs_kmeans_train documents as invalid, each named with its
 * value; then every row must be finite. */
static bs_status check_train_args(const float *x, size_t n, uint32_t d, uint32_t k,
                                  bs_metric metric, const float *centroids,
                                  bs_error *err) {
    if (x == NULL) return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "x is NULL");
    if (centroids == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "centroids is NULL");
    if (d == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "dimension must be >= 1 (got 0)");
    if (k == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions must be >= 1 (got 0)");
    if ((int)metric < 0 || (int)metric > 2)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "metric (%d) is not a bs_metric", (int)metric);
    if (n < k)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions (%u) exceeds the number of training "
                       "rows (%zu)",
                       k, n);
    if (k > INT_MAX || d > INT_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "num_partitions (%u) or dimension (%u) exceeds the "
                       "BLAS limit (%d)",
                       k, d, INT_MAX);
    size_t cells, bytes;
    if (!bs_mul_ok(n, d, &cells) || !bs_mul_ok(cells, sizeof(double), &bytes))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "rows (%zu) x dimension (%u) overflows", n, d);
    return bs_check_finite_rows(x, n, d, "training row", 0, err);
}

/* Everything one training run holds between its steps. assign and prev
 * trade places after every iteration; the bounds (lbd, redo, old_c, pb) exist
 * only when prune is on. */
typedef struct km_state {
    const float *data; /* the rows trained on: x, or normed for cosine */
    size_t n;
    uint32_t d, k;
    int cosine, prune;
    uint32_t nw; /* worker threads, in [1, BS_MAX_THREADS] */
    bs_rng rng;
    bs_l2_kernels kn;
    float *normed;     /* n * d unit rows (cosine only) */
    uint32_t *assign;  /* n: this iteration's partition of each row */
    uint32_t *prev;    /* n: the previous iteration's */
    float *dist2;      /* n: squared distance to the assigned centroid */
    size_t *counts;    /* k: rows per partition */
    double *inertia;   /* k: summed dist2 per partition */
    double *sums;      /* k * d: coordinate sums per partition */
    uint32_t empties;  /* partitions with no row after the last assignment */
    /* Bound-based skipping (prune) */
    int have_bounds;
    double *lbd;       /* n: lower bound on the distance to every other centroid */
    size_t *redo;      /* n: rows whose bound does not rule out a change */
    float *old_c;      /* k * d: centroids before the update */
    prune_bufs pb;
} km_state;

static void km_state_free(km_state *s) {
    BS_FREE(s->lbd);
    BS_FREE(s->redo);
    prune_bufs_free(&s->pb);
    BS_FREE(s->old_c);
    BS_FREE(s->normed);
    BS_FREE(s->assign);
    BS_FREE(s->prev);
    BS_FREE(s->dist2);
    BS_FREE(s->counts);
    BS_FREE(s->inertia);
    BS_FREE(s->sums);
}

/* The per-row and per-partition buffers, and the rows to train on
 * (normalised first for cosine). No row is assigned yet (prev = none). */
static bs_status km_state_init(km_state *s, const float *x, size_t n, uint32_t d,
                               uint32_t k, bs_metric metric, uint64_t seed, int prune,
                               uint32_t threads, bs_error *err) {
    memset(s, 0, sizeof *s);
    s->n = n;
    s->d = d;
    s->k = k;
    s->cosine = metric == BS_METRIC_COSINE;
    s->prune = prune;
    s->nw = threads < 1 ? 1 : threads > BS_MAX_THREADS ? BS_MAX_THREADS : threads;
    bs_rng_seed(&s->rng, seed);
    s->assign = bs_alloc(n, sizeof(uint32_t));
    s->prev = bs_alloc(n, sizeof(uint32_t));
    s->dist2 = bs_alloc(n, sizeof(float));
    s->counts = bs_alloc(k, sizeof(size_t));
    s->inertia = bs_alloc(k, sizeof(double));
    s->sums = bs_alloc2(k, d, sizeof(double));
    if (s->cosine) s->normed = bs_alloc2(n, d, sizeof(float));
    if (!s->assign || !s->prev || !s->dist2 || !s->counts || !s->inertia || !s->sums ||
        (s->cosine && !s->normed))
        return bs_fail(err, BS_ERR_NO_MEMORY,
                       "out of memory for k-means over %zu rows x %u "
                       "dimensions, %u partitions",
                       n, d, k);
    s->data = x;
    if (s->cosine) {
        for (size_t i = 0; i < n; i++)
            bs_normalize_row(x + i * d, d, s->normed + i * d);
        s->data = s->normed;
    }
    for (size_t i = 0; i < n; i++) s->prev[i] = UINT32_MAX;
    return BS_OK;
}

/* Bound-based skipping (Hamerly's): after an update, a row's distance
 * to any centroid other than its own can shrink by at most the largest
 * distance such a centroid moved. Late iterations move centroids little,
 * so most rows keep their partition after one exact distance instead of
 * a pass over all k. These are its buffers. */
static bs_status km_bounds_init(km_state *s, bs_error *err) {
    const size_t n = s->n;
    const uint32_t d = s->d;
    size_t gbatch = BS_REDO_FLOATS / d ? BS_REDO_FLOATS / d : 1;
    if (gbatch > n) gbatch = n;
    s->lbd = bs_alloc(n, sizeof(double));
    s->redo = bs_alloc(n, sizeof(size_t));
    s->old_c = bs_alloc2(s->k, d, sizeof(float));
    int bufs = prune_bufs_init(&s->pb, s->nw, gbatch, d);
    if (!s->lbd || !s->redo || !s->old_c || !bufs)
        return bs_fail(err, BS_ERR_NO_MEMORY,
                       "out of memory for k-means bounds over %zu rows", n);
    return BS_OK;
}

/* assign and dist2 for every row against the current centroids. */
static bs_status km_assign(km_state *s, const float *centroids, bs_error *err) {
    if (!s->prune)
        return bs_ivf_assign_rows(centroids, s->k, s->d, 0, 0, s->data, s->n, s->assign,
                                  s->dist2, s->nw, err);
    bs_status st = assign_pruned(s->data, s->n, s->d, s->k, centroids, s->have_bounds,
                                 s->prev, s->assign, s->dist2, s->lbd, s->redo, &s->pb,
                                 &s->kn, s->nw, err);
    s->have_bounds = 1;
    return st;
}

/* counts and empties from assign; returns how many rows changed partition
 * since the previous iteration. */
static size_t km_count(km_state *s) {
    size_t changes = 0;
    memset(s->counts, 0, (size_t)s->k * sizeof(size_t));
    for (size_t i = 0; i < s->n; i++) {
        changes += s->assign[i] != s->prev[i];
        s->counts[s->assign[i]]++;
    }
    s->empties = count_empty(s->counts, s->k);
    return changes;
}

/* Each non-empty partition's centroid becomes the mean of its rows (for
 * cosine, the mean's direction). */
static void km_update_means(km_state *s, float *centroids) {
    const uint32_t d = s->d, k = s->k;
    sums_job sj = {s->data, s->n, d, k, s->assign, s->dist2, s->sums, s->inertia};
    bs_parallel_run(s->nw < k ? s->nw : k, sums_worker, &sj);
    for (uint32_t j = 0; j < k; j++) {
        if (s->counts[j] == 0) continue;
        float *c = centroids + (size_t)j * d;
        const double *sum = s->sums + (size_t)j * d;
        if (s->cosine) {
            double n2 = 0.0;
            for (uint32_t t = 0; t < d; t++) n2 += sum[t] * sum[t];
            /* Rows that cancel out (or are all zero) leave no
             * direction: keep the previous unit centroid. */
            if (n2 > 0.0) {
                double nrm = sqrt(n2);
                for (uint32_t t = 0; t < d; t++)
                    c[t] = (float)(sum[t] / nrm);
            }
        } else {
            double inv = 1.0 / (double)s->counts[j];
            for (uint32_t t = 0; t < d; t++) c[t] = (float)(sum[t] * inv);
        }
    }
}

/* How far each centroid moved (repairs included); every row's bound drops
 * by the largest move among the other centroids. */
static void km_shrink_bounds(km_state *s, const float *centroids) {
    const uint32_t d = s->d;
    double m1 = 0.0, m2 = 0.0;
    uint32_t a1 = 0;
    for (uint32_t j = 0; j < s->k; j++) {
        const double mv = sqrt(s->kn.l2sq(s->old_c + (size_t)j * d,
                                          centroids + (size_t)j * d, d));
        if (mv > m1) {
            m2 = m1;
            m1 = mv;
            a1 = j;
        } else if (mv > m2) {
            m2 = mv;
        }
    }
    for (size_t i = 0; i < s->n; i++) s->lbd[i] -= s->assign[i] == a1 ? m2 : m1;
}

/* Lloyd iterations from the seeded centroids until settled or max_iters. */
static bs_status km_lloyd(km_state *s, float *centroids, uint32_t max_iters,
                          bs_error *err) {
    double prev_total = 0.0;
    for (uint32_t iter = 0;; iter++) {
        /* Assign first and decide after: the returned centroids are always
         * ones whose assignment was seen, so "no empty partition" is
         * checked, not hoped for. */
        BS_TRY(km_assign(s, centroids, err));
        const size_t changes = km_count(s);
        double total = 0.0;
        for (size_t i = 0; i < s->n; i++) total += (double)s->dist2[i];
        if (iter == max_iters) break;
        if (iter > 0 && s->empties == 0 &&
            changes * 1000 < (size_t)BS_SETTLED_PER_MILLE * s->n)
            break;
        /* Lloyd only lowers the inertia; once an iteration gains less than
         * 1e-4 of it the partitions no longer change in any way that matters
         * to search, while each further iteration costs a full assignment
         * (the build's largest cost in the benchmark). */
        if (iter > 0 && s->empties == 0 && prev_total - total < 1e-4 * prev_total) break;
        prev_total = total;

        if (s->prune) memcpy(s->old_c, centroids, (size_t)s->k * s->d * sizeof(float));
        km_update_means(s, centroids);
        if (s->empties)
            repair_by_split(centroids, s->k, s->d, s->cosine, s->counts, s->inertia,
                            &s->rng);
        if (s->prune) km_shrink_bounds(s, centroids);
        uint32_t *tmp = s->prev;
        s->prev = s->assign;
        s->assign = tmp;
    }
    return BS_OK;
}

/* Bounded: each pass fills every empty partition it can; a second pass
 * is needed only if a copied row pulled all rows away from a cluster,
 * which the mean property (the centroid minimises its rows' summed
 * squared distance) makes rare. */
static bs_status km_fill_empties(km_state *s, float *centroids, bs_error *err) {
    for (int pass = 0; pass < 4 && s->empties > 0; pass++) {
        if (repair_with_rows(s->data, s->n, s->d, s->k, s->cosine, centroids, s->assign,
                             s->dist2, s->counts) == s->empties)
            break; /* nothing fillable: duplicate rows */
        BS_TRY(bs_ivf_assign_rows(centroids, s->k, s->d, 0, 0, s->data, s->n, s->assign,
                                  s->dist2, s->nw, err));
        memset(s->counts, 0, (size_t)s->k * sizeof(size_t));
        for (size_t i = 0; i < s->n; i++) s->counts[s->assign[i]]++;
        s->empties = count_empty(s->counts, s->k);
    }
    return BS_OK;
}

bs_status bs_kmeans_train_impl(const float *x, size_t n, uint32_t d, uint32_t k,
                               bs_metric metric, uint32_t max_iters, uint64_t seed,
                               float *centroids, int prune, uint32_t threads,
                               bs_error *err) {
    bs_error_clear(err);
    BS_TRY(check_train_args(x, n, d, k, metric, centroids, err));
    km_state s;
    bs_status st = km_state_init(&s, x, n, d, k, metric, seed, prune, threads, err);
    if (st == BS_OK)
        st = seed_kmeanspp(s.data, n, d, k, s.cosine, &s.rng, centroids, err);
    if (st == BS_OK) st = bs_l2_kernels_select(&s.kn, err);
    if (st == BS_OK && prune) st = km_bounds_init(&s, err);
    if (st == BS_OK) st = km_lloyd(&s, centroids, max_iters, err);
    if (st == BS_OK) st = km_fill_empties(&s, centroids, err);
    km_state_free(&s);
    return st;
}
