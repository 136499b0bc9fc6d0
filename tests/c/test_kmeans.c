/* k-means training and IVF assignment: recovery of clustered data,
 * reproducibility, the exactness and batch-independence of assignment, and
 * the statuses and messages of bad input. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"
#include "ivf_internal.h"
#include "testing.h"

static float *alloc_f(size_t n) { return malloc((n ? n : 1) * sizeof(float)); }

/* Independent reference: argmin over centroids of the fixed-order exact
 * distance, ties to the lowest id, with no BLAS involved. */
static void brute_assign(const float *c, uint32_t k, uint32_t d, int cosine,
                         const float *x, size_t n, uint32_t *assign,
                         float *dist2) {
    float *row = alloc_f(d);
    for (size_t i = 0; i < n; i++) {
        if (cosine)
            bs_normalize_row(x + i * d, d, row);
        else
            memcpy(row, x + i * d, d * sizeof(float));
        uint32_t best = 0;
        double bd = 0;
        for (uint32_t j = 0; j < k; j++) {
            double e = bs_l2sq_fixed(row, c + (size_t)j * d, d);
            if (j == 0 || e < bd) {
                bd = e;
                best = j;
            }
        }
        assign[i] = best;
        dist2[i] = (float)bd;
    }
    free(row);
}

/* nb blobs of `per` rows, noise 1 per dimension. Plain k-means++ puts two
 * seeds in one blob with probability about (within-blob / between-blob
 * squared distance) x 40 for 16 blobs, and Lloyd cannot undo that, so the
 * centres are drawn (by rejection) at least 100 sqrt(2d) apart: a ratio
 * of 1e-4 between the two. */
static void make_blobs(uint64_t *st, uint32_t nb, size_t per, uint32_t d,
                       float *centres, float *x, uint32_t *label) {
    double min_d2 = 1e4 * 2.0 * d, half = 20.0 * sqrt(min_d2);
    for (uint32_t b = 0; b < nb;) {
        float *cb = centres + (size_t)b * d;
        for (uint32_t t = 0; t < d; t++)
            cb[t] = (float)(half * (2.0 * test_rand_uniform(st) - 1.0));
        int ok = 1;
        for (uint32_t o = 0; o < b && ok; o++)
            ok = bs_l2sq_fixed(cb, centres + (size_t)o * d, d) >= min_d2;
        b += ok;
    }
    for (size_t i = 0; i < (size_t)nb * per; i++) {
        uint32_t b = (uint32_t)(i % nb);
        label[i] = b;
        for (uint32_t t = 0; t < d; t++)
            x[i * d + t] =
                centres[(size_t)b * d + t] + (float)test_rand_normal(st);
    }
}

static double inertia_of(const float *c, uint32_t k, uint32_t d,
                         const float *x, size_t n) {
    uint32_t *a = malloc(n * sizeof(uint32_t));
    float *d2 = alloc_f(n);
    double s = 0;
    CHECK(bs_ivf_assign(c, k, d, BS_METRIC_L2, x, n, a, d2, NULL) == BS_OK);
    for (size_t i = 0; i < n; i++) s += d2[i];
    free(a);
    free(d2);
    return s;
}

static void test_blobs_recovered(uint32_t d, size_t per, uint64_t seed) {
    const uint32_t nb = 16;
    const size_t n = nb * per;
    uint64_t st = 1000 + d;
    float *centres = alloc_f((size_t)nb * d), *x = alloc_f(n * d);
    uint32_t *label = malloc(n * sizeof(uint32_t));
    make_blobs(&st, nb, per, d, centres, x, label);

    float *c = alloc_f((size_t)nb * d);
    bs_error err;
    CHECK(bs_kmeans_train(x, n, d, nb, BS_METRIC_L2, 25, seed, c, &err) ==
          BS_OK);
    uint32_t *a = malloc(n * sizeof(uint32_t));
    float *d2 = alloc_f(n);
    CHECK(bs_ivf_assign(c, nb, d, BS_METRIC_L2, x, n, a, d2, &err) == BS_OK);

    /* Every blob lands in exactly one partition, and distinct blobs in
     * distinct partitions. */
    uint32_t map[16], used[16] = {0};
    for (uint32_t b = 0; b < nb; b++) map[b] = UINT32_MAX;
    int consistent = 1;
    for (size_t i = 0; i < n; i++) {
        if (map[label[i]] == UINT32_MAX) map[label[i]] = a[i];
        if (map[label[i]] != a[i]) consistent = 0;
    }
    for (uint32_t b = 0; b < nb; b++)
        if (map[b] < nb) used[map[b]]++;
    for (uint32_t j = 0; j < nb; j++) consistent &= used[j] == 1;
    CHECK_MSG(consistent, "blobs not recovered (d=%u seed=%llu)", d,
              (unsigned long long)seed);

    double got = inertia_of(c, nb, d, x, n);
    double truth = inertia_of(centres, nb, d, x, n);
    CHECK_MSG(got <= truth * 1.01, "inertia %g vs true centres %g (d=%u)",
              got, truth, d);
    free(centres);
    free(x);
    free(label);
    free(c);
    free(a);
    free(d2);
}

static void test_deterministic_training(void) {
    const size_t n = 3000;
    const uint32_t d = 24, k = 40;
    uint64_t st = 77;
    float *x = alloc_f(n * d);
    for (size_t i = 0; i < n * d; i++) x[i] = (float)test_rand_normal(&st);
    float *c1 = alloc_f((size_t)k * d), *c2 = alloc_f((size_t)k * d),
          *c3 = alloc_f((size_t)k * d);
    int threads = scipy_openblas_get_num_threads();
    for (int metric = 0; metric < 3; metric++) {
        scipy_openblas_set_num_threads(1);
        CHECK(bs_kmeans_train(x, n, d, k, (bs_metric)metric, 20, 5, c1,
                              NULL) == BS_OK);
        scipy_openblas_set_num_threads(2);
        CHECK(bs_kmeans_train(x, n, d, k, (bs_metric)metric, 20, 5, c2,
                              NULL) == BS_OK);
        CHECK_MSG(memcmp(c1, c2, (size_t)k * d * sizeof(float)) == 0,
                  "training differs with the BLAS thread count (metric %d)",
                  metric);
        CHECK(bs_kmeans_train(x, n, d, k, (bs_metric)metric, 20, 6, c3,
                              NULL) == BS_OK);
        CHECK(memcmp(c1, c3, (size_t)k * d * sizeof(float)) != 0);
    }
    scipy_openblas_set_num_threads(threads);
    free(x);
    free(c1);
    free(c2);
    free(c3);
}

static void check_no_empty(const float *x, size_t n, uint32_t d, uint32_t k,
                           bs_metric metric, uint64_t seed, uint32_t iters) {
    float *c = alloc_f((size_t)k * d);
    uint32_t *a = malloc(n * sizeof(uint32_t));
    size_t *cnt = calloc(k, sizeof(size_t));
    bs_error err;
    CHECK(bs_kmeans_train(x, n, d, k, metric, iters, seed, c, &err) == BS_OK);
    int finite = 1;
    for (size_t i = 0; i < (size_t)k * d; i++) finite &= isfinite(c[i]) != 0;
    CHECK(finite);
    CHECK(bs_ivf_assign(c, k, d, metric, x, n, a, NULL, &err) == BS_OK);
    for (size_t i = 0; i < n; i++) cnt[a[i]]++;
    uint32_t empty = 0;
    for (uint32_t j = 0; j < k; j++) empty += cnt[j] == 0;
    CHECK_MSG(empty == 0,
              "%u empty partitions (n=%zu d=%u k=%u metric=%d iters=%u)",
              empty, n, d, k, (int)metric, iters);
    free(c);
    free(a);
    free(cnt);
}

static void test_no_empty_partitions(void) {
    uint64_t st = 4242;
    const uint32_t dims[] = {1, 2, 3, 8, 65};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        uint32_t d = dims[di];
        /* Gaussian data, heavy-tailed data (cubes: a few far outliers and
         * a dense core, which empties partitions during Lloyd), and a tight
         * n close to k. */
        size_t n = 1500;
        float *x = alloc_f(n * d);
        for (size_t i = 0; i < n * d; i++) x[i] = (float)test_rand_normal(&st);
        check_no_empty(x, n, d, 64, BS_METRIC_L2, 1, 25);
        check_no_empty(x, n, d, 200, BS_METRIC_L2, 2, 3);
        check_no_empty(x, 70, d, 64, BS_METRIC_L2, 3, 25);
        if (d >= 2) check_no_empty(x, n, d, 64, BS_METRIC_COSINE, 4, 25);
        for (size_t i = 0; i < n * d; i++) {
            double g = test_rand_normal(&st);
            x[i] = (float)(g * g * g);
        }
        check_no_empty(x, n, d, 100, BS_METRIC_L2, 5, 25);
        check_no_empty(x, n, d, 100, BS_METRIC_DOT, 6, 0);
        free(x);
    }
}

static void test_duplicates(void) {
    const size_t n = 200;
    const uint32_t d = 5;
    float *x = alloc_f(n * d), *c = alloc_f(16 * d);
    for (int zero = 0; zero < 2; zero++) {
        for (size_t i = 0; i < n; i++)
            for (uint32_t t = 0; t < d; t++)
                x[i * d + t] = zero ? 0.0f : (float)(t + 1) * 0.5f;
        for (int metric = 0; metric < 3; metric++) {
            bs_error err;
            CHECK(bs_kmeans_train(x, n, d, 16, (bs_metric)metric, 10, 9, c,
                                  &err) == BS_OK);
            int finite = 1;
            for (size_t i = 0; i < 16 * (size_t)d; i++)
                finite &= isfinite(c[i]) != 0;
            CHECK_MSG(finite, "non-finite centroid (zero=%d metric=%d)", zero,
                      metric);
        }
    }
    /* Three distinct points, each repeated: k = 3 finds exactly them. */
    for (size_t i = 0; i < n; i++)
        for (uint32_t t = 0; t < d; t++)
            x[i * d + t] = (float)((i % 3) * 10 + t);
    CHECK(bs_kmeans_train(x, n, d, 3, BS_METRIC_L2, 10, 1, c, NULL) == BS_OK);
    int seen[3] = {0, 0, 0};
    for (uint32_t j = 0; j < 3; j++)
        for (int p = 0; p < 3; p++)
            if (memcmp(c + j * d, x + p * d, d * sizeof(float)) == 0)
                seen[p]++;
    CHECK(seen[0] == 1 && seen[1] == 1 && seen[2] == 1);
    CHECK(bs_kmeans_train(x, n, d, 7, BS_METRIC_L2, 10, 1, c, NULL) == BS_OK);
    free(x);
    free(c);
}

/* Values near the top of the float range: squared distances overflow
 * float, norms take the exhaustive path; centroids stay finite. */
static void test_extreme_values(void) {
    const size_t n = 300;
    const uint32_t d = 6;
    uint64_t st = 17;
    float *x = alloc_f(n * d), *c = alloc_f(12 * d);
    for (size_t i = 0; i < n * d; i++)
        x[i] = (float)(1e37 * test_rand_normal(&st));
    for (size_t i = 0; i < 40 * d; i++) x[i] = 3.0e38f; /* duplicates */
    for (int metric = 0; metric < 3; metric++) {
        CHECK(bs_kmeans_train(x, n, d, 12, (bs_metric)metric, 10, 4, c,
                              NULL) == BS_OK);
        int finite = 1;
        for (size_t i = 0; i < 12 * (size_t)d; i++)
            finite &= isfinite(c[i]) != 0;
        CHECK_MSG(finite, "non-finite centroid from extreme values (metric %d)",
                  metric);
    }
    free(x);
    free(c);
}

static void test_n_equals_k(void) {
    const uint32_t k = 50, d = 7;
    uint64_t st = 9;
    float *x = alloc_f((size_t)k * d), *c = alloc_f((size_t)k * d),
          *d2 = alloc_f(k);
    uint32_t *a = malloc(k * sizeof(uint32_t));
    for (size_t i = 0; i < (size_t)k * d; i++)
        x[i] = (float)test_rand_normal(&st);
    CHECK(bs_kmeans_train(x, k, d, k, BS_METRIC_L2, 10, 3, c, NULL) == BS_OK);
    CHECK(bs_ivf_assign(c, k, d, BS_METRIC_L2, x, k, a, d2, NULL) == BS_OK);
    int seen[50] = {0}, zero = 1;
    for (uint32_t i = 0; i < k; i++) {
        seen[a[i]]++;
        zero &= d2[i] == 0.0f;
    }
    int perm = 1;
    for (uint32_t j = 0; j < k; j++) perm &= seen[j] == 1;
    CHECK_MSG(perm && zero, "n == k must give every row its own centroid");
    free(x);
    free(c);
    free(d2);
    free(a);
}

static void test_cosine_unit(void) {
    const size_t n = 2000;
    const uint32_t d = 33, k = 20;
    uint64_t st = 31;
    float *x = alloc_f(n * d), *c = alloc_f((size_t)k * d);
    for (size_t i = 0; i < n * d; i++)
        x[i] = (float)(test_rand_normal(&st) + (i % d == 0 ? 3.0 : 0.0));
    /* Zero rows and wildly different norms are part of the input. */
    for (size_t i = 0; i < n; i += 97) memset(x + i * d, 0, d * sizeof(float));
    for (size_t i = 1; i < n; i += 13)
        for (uint32_t t = 0; t < d; t++) x[i * d + t] *= 1e4f;
    CHECK(bs_kmeans_train(x, n, d, k, BS_METRIC_COSINE, 25, 2, c, NULL) ==
          BS_OK);
    for (uint32_t j = 0; j < k; j++) {
        double n2 = bs_norm2_fixed(c + (size_t)j * d, d);
        CHECK_MSG(fabs(n2 - 1.0) < 1e-5, "centroid %u has |c|^2 = %.9g", j,
                  n2);
    }
    free(x);
    free(c);
}

static int same_bits(const void *a, const void *b, size_t bytes) {
    return memcmp(a, b, bytes) == 0;
}

/* The assignment of a row depends on (row, centroids) only: one batch,
 * single rows, shuffled batches of odd sizes and different BLAS thread
 * counts all agree bit for bit, and with the BLAS-free reference. */
static void check_assign_invariance(const float *c, uint32_t k, uint32_t d,
                                    bs_metric metric, const float *x, size_t n,
                                    uint64_t *st) {
    int cosine = metric == BS_METRIC_COSINE;
    uint32_t *a_all = malloc(n * sizeof(uint32_t)),
             *a_one = malloc(n * sizeof(uint32_t)),
             *a_shuf = malloc(n * sizeof(uint32_t)),
             *a_ref = malloc(n * sizeof(uint32_t)),
             *a_tmp = malloc(n * sizeof(uint32_t));
    float *d_all = alloc_f(n), *d_one = alloc_f(n), *d_shuf = alloc_f(n),
          *d_ref = alloc_f(n), *d_tmp = alloc_f(n), *xs = alloc_f(n * d);
    size_t *perm = malloc(n * sizeof(size_t));

    int threads = scipy_openblas_get_num_threads();
    scipy_openblas_set_num_threads(2);
    CHECK(bs_ivf_assign(c, k, d, metric, x, n, a_all, d_all, NULL) == BS_OK);
    scipy_openblas_set_num_threads(1);
    for (size_t i = 0; i < n; i++)
        CHECK(bs_ivf_assign(c, k, d, metric, x + i * d, 1, a_one + i,
                            d_one + i, NULL) == BS_OK);
    scipy_openblas_set_num_threads(threads);

    for (size_t i = 0; i < n; i++) perm[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(test_rand_u64(st) % i);
        size_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
    for (size_t i = 0; i < n; i++)
        memcpy(xs + i * d, x + perm[i] * d, d * sizeof(float));
    for (size_t s = 0; s < n;) {
        size_t len = 1 + (size_t)(test_rand_u64(st) % 700);
        if (len > n - s) len = n - s;
        CHECK(bs_ivf_assign(c, k, d, metric, xs + s * d, len, a_tmp + s,
                            d_tmp + s, NULL) == BS_OK);
        s += len;
    }
    for (size_t i = 0; i < n; i++) {
        a_shuf[perm[i]] = a_tmp[i];
        d_shuf[perm[i]] = d_tmp[i];
    }
    brute_assign(c, k, d, cosine, x, n, a_ref, d_ref);

    CHECK_MSG(same_bits(a_all, a_one, n * 4) && same_bits(d_all, d_one, n * 4),
              "batch vs single rows differ (k=%u d=%u metric=%d)", k, d,
              (int)metric);
    CHECK_MSG(same_bits(a_all, a_shuf, n * 4) &&
                  same_bits(d_all, d_shuf, n * 4),
              "batch vs shuffled batches differ (k=%u d=%u metric=%d)", k, d,
              (int)metric);
    CHECK_MSG(same_bits(a_all, a_ref, n * 4) && same_bits(d_all, d_ref, n * 4),
              "batch vs brute force differ (k=%u d=%u metric=%d)", k, d,
              (int)metric);
    /* dist2 may be NULL and changes nothing else. */
    CHECK(bs_ivf_assign(c, k, d, metric, x, n, a_tmp, NULL, NULL) == BS_OK);
    CHECK(same_bits(a_all, a_tmp, n * 4));

    free(a_all);
    free(a_one);
    free(a_shuf);
    free(a_ref);
    free(a_tmp);
    free(d_all);
    free(d_one);
    free(d_shuf);
    free(d_ref);
    free(d_tmp);
    free(xs);
    free(perm);
}

static void test_assign_determinism(void) {
    uint64_t st = 123;
    const uint32_t dims[] = {1, 3, 65, 128};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        uint32_t d = dims[di], k = 100;
        size_t n = 3000;
        float *x = alloc_f(n * d), *c = alloc_f((size_t)k * d);
        for (size_t i = 0; i < n * d; i++) x[i] = (float)test_rand_normal(&st);
        CHECK(bs_kmeans_train(x, n, d, k, BS_METRIC_L2, 5, 1, c, NULL) ==
              BS_OK);
        check_assign_invariance(c, k, d, BS_METRIC_L2, x, n, &st);
        check_assign_invariance(c, k, d, BS_METRIC_COSINE, x, n, &st);

        /* Near ties under heavy cancellation: a common offset of 1000 makes
         * |x|^2 ~ 1e6 d while distances are ~1e-2 d, so the BLAS error is
         * far larger than the gaps between candidates. Centroids are close
         * copies of each other and rows sit among them; some rows are
         * exact copies of centroids and some centroids are exact ties. */
        for (size_t i = 0; i < (size_t)k * d; i++)
            c[i] = 1000.0f + (float)(0.05 * test_rand_normal(&st));
        memcpy(c + 7 * (size_t)d, c + 3 * (size_t)d, d * sizeof(float));
        for (size_t i = 0; i < n; i++) {
            uint32_t j = (uint32_t)(i % k);
            for (uint32_t t = 0; t < d; t++)
                x[i * d + t] =
                    c[(size_t)j * d + t] +
                    (i % 5 == 0 ? 0.0f : (float)(0.05 * test_rand_normal(&st)));
        }
        check_assign_invariance(c, k, d, BS_METRIC_L2, x, n, &st);
        /* Norms too large for float products take the exhaustive path:
         * per row (huge rows, ordinary centroids), then for every row (a
         * huge centroid). */
        for (size_t i = 0; i < 100 * (size_t)d; i++) x[i] *= 1e18f;
        check_assign_invariance(c, k, d, BS_METRIC_L2, x, 200, &st);
        for (size_t i = 0; i < (size_t)k * d; i++) c[i] *= 1e18f;
        check_assign_invariance(c, k, d, BS_METRIC_L2, x, 200, &st);
        free(x);
        free(c);
    }
}

/* The vector paths of the fixed-order sums must give the bits of the
 * documented scalar order, for every tail length. */
static double ref_l2sq(const float *a, const float *b, uint32_t d, int sq_b) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; l++) {
            double t = (double)a[i + l] - (sq_b ? (double)b[i + l] : 0.0);
            acc[l] += t * t;
        }
    double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) +
               ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < d; i++) {
        double t = (double)a[i] - (sq_b ? (double)b[i] : 0.0);
        s += t * t;
    }
    return s;
}

static float ref_l2sq_f32(const float *a, const float *b, uint32_t d) {
    float acc[16] = {0};
    uint32_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int l = 0; l < 16; l++) {
            float t = a[i + l] - b[i + l];
            acc[l] += t * t;
        }
    float s = 0.0f;
    for (int l = 0; l < 4; l++)
        s += (acc[l] + acc[l + 8]) + (acc[l + 4] + acc[l + 12]);
    for (; i < d; i++) {
        float t = a[i] - b[i];
        s += t * t;
    }
    return s;
}

static void test_fixed_order_sums(void) {
    uint64_t st = 99;
    float a[200], b[200];
    for (int i = 0; i < 200; i++) {
        a[i] = (float)(test_rand_normal(&st) * exp(4 * test_rand_normal(&st)));
        b[i] = (float)(test_rand_normal(&st) * exp(4 * test_rand_normal(&st)));
    }
    int ok = 1;
    for (uint32_t d = 1; d <= 200; d++) {
        double e1 = bs_l2sq_fixed(a, b, d), r1 = ref_l2sq(a, b, d, 1);
        double e2 = bs_norm2_fixed(a, d), r2 = ref_l2sq(a, b, d, 0);
        float e3 = bs_l2sq_f32_fixed(a, b, d), r3 = ref_l2sq_f32(a, b, d);
        ok &= memcmp(&e1, &r1, sizeof e1) == 0;
        ok &= memcmp(&e2, &r2, sizeof e2) == 0;
        ok &= memcmp(&e3, &r3, sizeof e3) == 0;
    }
    CHECK_MSG(ok, "fixed-order sums differ from their scalar definition");
}

static void test_cosine_assign_zero_row(void) {
    const uint32_t d = 4, k = 3;
    const float c[] = {3, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0};
    const float x[] = {0, 0, 0, 0, 0, 5, 0, 0};
    uint32_t a[2];
    float d2[2];
    CHECK(bs_ivf_assign(c, k, d, BS_METRIC_COSINE, x, 2, a, d2, NULL) ==
          BS_OK);
    /* The zero row stays zero: nearest is the shortest centroid. */
    CHECK(a[0] == 1 && d2[0] == 1.0f);
    CHECK(a[1] == 1 && d2[1] == 0.0f);
}

static void test_errors(void) {
    const uint32_t d = 4;
    float x[40], c[16];
    uint32_t a[10];
    for (int i = 0; i < 40; i++) x[i] = (float)i;
    for (int i = 0; i < 16; i++) c[i] = (float)i;
    bs_error err;

#define EXPECT(call, status, text)                                             \
    do {                                                                       \
        memset(&err, 0, sizeof err);                                           \
        bs_status s_ = (call);                                                 \
        CHECK_MSG(s_ == (status) && err.code == (status) &&                    \
                      strstr(err.message, (text)) != NULL,                     \
                  "got %s \"%s\", want %s containing \"%s\"",                  \
                  bs_status_name(s_), err.message, bs_status_name(status),     \
                  (text));                                                     \
    } while (0)

    EXPECT(bs_kmeans_train(x, 10, d, 0, BS_METRIC_L2, 5, 1, c, &err),
           BS_ERR_INVALID_ARGUMENT, "num_partitions must be >= 1 (got 0)");
    EXPECT(bs_kmeans_train(x, 10, 0, 2, BS_METRIC_L2, 5, 1, c, &err),
           BS_ERR_INVALID_ARGUMENT, "dimension must be >= 1 (got 0)");
    EXPECT(bs_kmeans_train(NULL, 10, d, 2, BS_METRIC_L2, 5, 1, c, &err),
           BS_ERR_INVALID_ARGUMENT, "x is NULL");
    EXPECT(bs_kmeans_train(x, 10, d, 2, BS_METRIC_L2, 5, 1, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "centroids is NULL");
    EXPECT(bs_kmeans_train(x, 3, d, 4, BS_METRIC_L2, 5, 1, c, &err),
           BS_ERR_INVALID_ARGUMENT,
           "num_partitions (4) exceeds the number of training rows (3)");
    EXPECT(bs_kmeans_train(x, 10, d, 2, (bs_metric)7, 5, 1, c, &err),
           BS_ERR_INVALID_ARGUMENT, "metric (7)");
    x[7 * d + 3] = NAN;
    EXPECT(bs_kmeans_train(x, 10, d, 2, BS_METRIC_L2, 5, 1, c, &err),
           BS_ERR_INVALID_DATA, "row 7 has a non-finite value (");
    CHECK(strstr(err.message, "nan) at dimension 3") != NULL);
    EXPECT(bs_ivf_assign(c, 4, d, BS_METRIC_COSINE, x, 10, a, NULL, &err),
           BS_ERR_INVALID_DATA, "row 7 has a non-finite value (");
    CHECK(strstr(err.message, "nan) at dimension 3") != NULL);
    x[7 * d + 3] = -INFINITY;
    EXPECT(bs_ivf_assign(c, 4, d, BS_METRIC_L2, x, 10, a, NULL, &err),
           BS_ERR_INVALID_DATA,
           "row 7 has a non-finite value (-inf) at dimension 3");
    x[7 * d + 3] = 1.0f;
    c[2 * d + 1] = INFINITY;
    EXPECT(bs_ivf_assign(c, 4, d, BS_METRIC_L2, x, 10, a, NULL, &err),
           BS_ERR_INVALID_DATA,
           "centroid 2 has a non-finite value (inf) at dimension 1");
    c[2 * d + 1] = 0.0f;
    EXPECT(bs_ivf_assign(c, 0, d, BS_METRIC_L2, x, 10, a, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "num_partitions must be >= 1 (got 0)");
    EXPECT(bs_ivf_assign(c, 4, 0, BS_METRIC_L2, x, 10, a, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "dimension must be >= 1 (got 0)");
    EXPECT(bs_ivf_assign(NULL, 4, d, BS_METRIC_L2, x, 10, a, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "centroids is NULL");
    EXPECT(bs_ivf_assign(c, 4, d, BS_METRIC_L2, NULL, 10, a, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "x is NULL with n = 10 rows");
    EXPECT(bs_ivf_assign(c, 4, d, BS_METRIC_L2, x, 10, NULL, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "assign is NULL with n = 10 rows");
    EXPECT(bs_ivf_assign(c, 4, d, (bs_metric)-1, x, 10, a, NULL, &err),
           BS_ERR_INVALID_ARGUMENT, "metric (-1)");
    /* n == 0 is a no-op, and err may be NULL. */
    CHECK(bs_ivf_assign(c, 4, d, BS_METRIC_L2, NULL, 0, NULL, NULL, &err) ==
          BS_OK);
    CHECK(err.code == BS_OK);
    CHECK(bs_ivf_assign(c, 0, d, BS_METRIC_L2, x, 1, a, NULL, NULL) ==
          BS_ERR_INVALID_ARGUMENT);
#undef EXPECT
}

/* The AVX2 fixed-order sums are the portable ones bit for bit: every
 * length 1..70, random rows, rows that cancel within a lane, huge values. */
static void test_l2_avx2_same_bits(void) {
    if (!bs_simd_supported(BS_SIMD_AVX2)) return;
    uint64_t st = 77;
    float a[70], b[70];
    int bad = 0;
    for (int kind = 0; kind < 3; kind++) {
        for (uint32_t d = 1; d <= 70; d++) {
            for (uint32_t i = 0; i < d; i++) {
                double u = test_rand_normal(&st);
                a[i] = kind == 2 ? (float)(u * 1e30) : (float)u;
                b[i] = kind == 1 && i % 8 == 0 ? -a[i] * 1e7f : (float)test_rand_normal(&st);
            }
            double x = bs_l2sq_fixed(a, b, d), y = bs_l2sq_fixed_avx2(a, b, d);
            double n1 = bs_norm2_fixed(a, d), n2 = bs_norm2_fixed_avx2(a, d);
            bad += memcmp(&x, &y, sizeof x) != 0 || memcmp(&n1, &n2, sizeof n1) != 0;
        }
    }
    CHECK_MSG(bad == 0, "%d AVX2 fixed-order sums differ", bad);
}

/* Skipping rows by bounds must not change a single bit: the pruned and
 * the plain Lloyd give the same centroids, on overlapping Gaussian blobs
 * (many rows near boundaries), with each metric, duplicate rows (ties and
 * empty partitions) and k close to n. */
static void check_pruning_exact(const float *x, size_t n, uint32_t d, uint32_t k,
                                bs_metric metric, uint32_t iters, const char *what) {
    float *a = alloc_f((size_t)k * d), *b = alloc_f((size_t)k * d);
    bs_error err;
    CHECK(bs_kmeans_train_impl(x, n, d, k, metric, iters, 5, a, 0, 1, &err) == BS_OK);
    CHECK(bs_kmeans_train_impl(x, n, d, k, metric, iters, 5, b, 1, 1, &err) == BS_OK);
    CHECK_MSG(same_bits(a, b, (size_t)k * d * sizeof(float)),
              "pruned k-means differs (%s, metric %d, k %u)", what, (int)metric, k);
    free(a);
    free(b);
}

static void test_pruning_is_exact(void) {
    uint64_t st = 21;
    const uint32_t d = 24, nb = 12;
    const size_t per = 300, n = (size_t)nb * per;
    float *x = alloc_f(n * d), *centres = alloc_f((size_t)nb * d);
    uint32_t *label = malloc(n * sizeof(uint32_t));
    /* overlapping: centres one standard deviation apart in each dimension */
    for (uint32_t bl = 0; bl < nb; bl++)
        for (uint32_t t = 0; t < d; t++)
            centres[(size_t)bl * d + t] = (float)test_rand_normal(&st);
    for (size_t i = 0; i < n; i++) {
        label[i] = (uint32_t)(i % nb);
        for (uint32_t t = 0; t < d; t++)
            x[i * d + t] = centres[(size_t)label[i] * d + t] + (float)test_rand_normal(&st);
    }
    for (int metric = 0; metric < 3; metric++) {
        check_pruning_exact(x, n, d, 16, (bs_metric)metric, 50, "overlapping blobs");
        check_pruning_exact(x, n, d, 64, (bs_metric)metric, 7, "overlapping blobs");
    }
    /* a quarter of the rows are copies of one row */
    for (size_t i = 0; i < n / 4; i++) memcpy(x + i * d, x, d * sizeof(float));
    check_pruning_exact(x, n, d, 40, BS_METRIC_L2, 30, "duplicates");
    check_pruning_exact(x, 48, d, 40, BS_METRIC_L2, 30, "k close to n");
    free(x);
    free(centres);
    free(label);
}

/* Threads split rows (assignment, bound checks) and centroids (sums) by
 * worker index; no split may change a bit: centroids, assignments and
 * distances match one thread for 2, 3 and 7 workers (7 leaves some without
 * rows), pruned and plain, each metric. The rows span several assignment
 * blocks (4096 rows) so the assignment itself is split. The BLAS runs
 * single-threaded as the API asks, and once with its own threads too. */
static void test_threads_are_exact(void) {
    uint64_t st = 77;
    const uint32_t d = 8, k = 24, nb = 30;
    const size_t n = 20000;
    float *x = alloc_f(n * d), *centres = alloc_f((size_t)nb * d);
    for (size_t i = 0; i < (size_t)nb * d; i++) centres[i] = (float)test_rand_normal(&st);
    for (size_t i = 0; i < n; i++)
        for (uint32_t t = 0; t < d; t++)
            x[i * d + t] = centres[(i % nb) * d + t] + 0.7f * (float)test_rand_normal(&st);
    float *c1 = alloc_f((size_t)k * d), *cn = alloc_f((size_t)k * d);
    uint32_t *a1 = malloc(n * sizeof(uint32_t)), *an = malloc(n * sizeof(uint32_t));
    float *d1 = alloc_f(n), *dn = alloc_f(n);
    const uint32_t counts[] = {2, 3, 7};
    bs_error err;
    int blas = scipy_openblas_get_num_threads();
    for (int metric = 0; metric < 3; metric++) {
        for (int prune = 0; prune < 2; prune++) {
            scipy_openblas_set_num_threads(1);
            CHECK(bs_kmeans_train_impl(x, n, d, k, (bs_metric)metric, 12, 3, c1, prune, 1,
                                       &err) == BS_OK);
            for (int t = 0; t < 3; t++) {
                scipy_openblas_set_num_threads(t == 2 ? 2 : 1);
                CHECK(bs_kmeans_train_impl(x, n, d, k, (bs_metric)metric, 12, 3, cn, prune,
                                           counts[t], &err) == BS_OK);
                CHECK_MSG(same_bits(c1, cn, (size_t)k * d * sizeof(float)),
                          "k-means on %u threads differs (metric %d, prune %d)", counts[t],
                          metric, prune);
            }
        }
        scipy_openblas_set_num_threads(1);
        CHECK(bs_ivf_assign_rows(c1, k, d, metric == BS_METRIC_COSINE, 1, x, n, a1, d1, 1,
                                 &err) == BS_OK);
        for (int t = 0; t < 3; t++) {
            CHECK(bs_ivf_assign_rows(c1, k, d, metric == BS_METRIC_COSINE, 1, x, n, an, dn,
                                     counts[t], &err) == BS_OK);
            CHECK_MSG(memcmp(a1, an, n * sizeof(uint32_t)) == 0 &&
                          same_bits(d1, dn, n * sizeof(float)),
                      "assignment on %u threads differs (metric %d)", counts[t], metric);
        }
    }
    CHECK(bs_kmeans_train_mt(x, n, d, k, BS_METRIC_L2, 12, 3, 2, cn, &err) == BS_OK);
    CHECK(bs_kmeans_train(x, n, d, k, BS_METRIC_L2, 12, 3, c1, &err) == BS_OK);
    CHECK(same_bits(c1, cn, (size_t)k * d * sizeof(float)));
    /* A bad row in a later worker's share is named as one thread names it;
     * so is the first of two. */
    x[17001 * d + 5] = NAN;
    CHECK(bs_ivf_assign_rows(c1, k, d, 0, 1, x, n, an, NULL, 3, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strstr(err.message, "row 17001 ") != NULL, "got \"%s\"", err.message);
    x[9000 * d + 2] = INFINITY;
    CHECK(bs_ivf_assign_rows(c1, k, d, 0, 1, x, n, an, NULL, 3, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strstr(err.message, "row 9000 ") != NULL, "got \"%s\"", err.message);
    scipy_openblas_set_num_threads(blas);
    free(x);
    free(centres);
    free(c1);
    free(cn);
    free(a1);
    free(an);
    free(d1);
    free(dn);
}

int main(void) {
    test_errors();
    test_fixed_order_sums();
    const uint32_t blob_dims[] = {1, 3, 32, 65};
    for (int i = 0; i < 4; i++)
        for (uint64_t seed = 1; seed <= 3; seed++)
            test_blobs_recovered(blob_dims[i], 150, seed);
    /* More rows than the seeding sample (max(8 k, 4096)): subsampled. */
    test_blobs_recovered(32, 600, 7);
    test_deterministic_training();
    test_no_empty_partitions();
    test_duplicates();
    test_n_equals_k();
    test_extreme_values();
    test_cosine_unit();
    test_cosine_assign_zero_row();
    test_assign_determinism();
    test_pruning_is_exact();
    test_threads_are_exact();
    test_l2_avx2_same_bits();
    TEST_MAIN_END();
}
