/* bs_rotation: both kinds preserve norms and inner products, are
 * deterministic and pinned across machines, mix well, and reject bad
 * arguments with a message naming the bad value; the FAST row transform's
 * AVX2 version gives the SSE2 reference's bits on adversarial rows. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <threads.h>

#include "bitshard.h"
#include "hash.h"
#include "rotation_fast.h"
#include "testing.h"

static const uint32_t kDims[] = {1, 3, 7, 63, 64, 65, 100, 128, 384, 768, 1000, 1536};
#define NUM_DIMS (sizeof kDims / sizeof kDims[0])

static const char *kind_str(bs_rotation_kind k) {
    return k == BS_ROTATION_FAST ? "fast" : "matrix";
}

static float *gaussian_rows(size_t n, uint32_t dim, uint64_t seed) {
    float *x = malloc(n * dim * sizeof(float));
    for (size_t i = 0; i < n * dim; i++) x[i] = (float)test_rand_normal(&seed);
    return x;
}

static double dot(const float *a, const float *b, uint32_t n) {
    double s = 0;
    for (uint32_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

static bs_rotation *make(bs_rotation_kind kind, uint32_t dim, uint64_t seed) {
    bs_rotation *rot = NULL;
    bs_error err;
    bs_status st = bs_rotation_create(kind, dim, seed, &rot, &err);
    CHECK_MSG(st == BS_OK, "create %s dim %u: %s", kind_str(kind), dim,
              err.message);
    return rot;
}

/* n rows rotated; NULL on failure. */
static float *rotate(const bs_rotation *rot, const float *x, size_t n,
                     uint32_t in_dim) {
    uint32_t D = bs_rotation_padded_dim(rot);
    float *y = malloc(n * D * sizeof(float));
    bs_error err;
    bs_status st = bs_rotation_apply(rot, x, n, in_dim, y, &err);
    CHECK_MSG(st == BS_OK, "apply: %s", err.message);
    if (st != BS_OK) {
        free(y);
        return NULL;
    }
    return y;
}

/* Norms, inner products, padding, determinism and seed sensitivity for
 * one (kind, dim). */
static void check_kind_dim(bs_rotation_kind kind, uint32_t dim) {
    enum { N = 6 };
    bs_rotation *rot = make(kind, dim, 1234);
    if (rot == NULL) return;
    const uint32_t D = bs_rotation_padded_dim(rot);
    CHECK(D == bs_padded_dim(dim));
    CHECK(bs_rotation_dim(rot) == dim);
    CHECK(bs_rotation_kind_of(rot) == kind);
    CHECK(bs_rotation_seed(rot) == 1234);
    bs_fingerprint fp = bs_rotation_fingerprint(rot);
    bs_fingerprint want = bs_rotation_fingerprint_params(kind, dim, D, 1234);
    CHECK(memcmp(fp.bytes, want.bytes, 16) == 0);

    float *x = gaussian_rows(N, dim, 77 + dim);
    float *y = rotate(rot, x, N, dim);
    if (y == NULL) goto done;

    double worst_norm = 0, worst_ip = 0;
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * dim, *yi = y + (size_t)i * D;
        double nx = dot(xi, xi, dim), ny = dot(yi, yi, D);
        double rel = fabs(ny - nx) / nx;
        if (rel > worst_norm) worst_norm = rel;
        for (int j = i + 1; j < N; j++) {
            const float *xj = x + (size_t)j * dim, *yj = y + (size_t)j * D;
            double scale = sqrt(nx * dot(xj, xj, dim));
            double e = fabs(dot(yi, yj, D) - dot(xi, xj, dim)) / scale;
            if (e > worst_ip) worst_ip = e;
        }
    }
    CHECK_MSG(worst_norm < 1e-5, "%s dim %u: norm error %.3g",
              kind_str(kind), dim, worst_norm);
    CHECK_MSG(worst_ip < 1e-5, "%s dim %u: inner product error %.3g",
              kind_str(kind), dim, worst_ip);

    /* Zero-padded input of D floats is the same input, to the bit. */
    float *xp = calloc((size_t)N * D, sizeof(float));
    for (int i = 0; i < N; i++)
        memcpy(xp + (size_t)i * D, x + (size_t)i * dim, dim * sizeof(float));
    float *yp = rotate(rot, xp, N, D);
    if (yp != NULL) {
        CHECK_MSG(memcmp(y, yp, (size_t)N * D * sizeof(float)) == 0,
                  "%s dim %u: padded input differs", kind_str(kind), dim);
        free(yp);
    }
    free(xp);

    /* A row's output does not depend on its batch: rows one at a time and
     * in uneven chunks give the same bits as the whole batch. */
    const size_t chunks[] = {1, 3, 5};
    for (size_t t = 0; t < 3; t++) {
        float *yc = malloc((size_t)N * D * sizeof(float));
        bs_error err;
        int ok = 1;
        for (size_t i = 0; i < N; i += chunks[t]) {
            size_t m = (N - i < chunks[t]) ? N - i : chunks[t];
            ok &= bs_rotation_apply(rot, x + i * dim, m, dim, yc + i * D,
                                    &err) == BS_OK;
        }
        CHECK(ok);
        CHECK_MSG(memcmp(y, yc, (size_t)N * D * sizeof(float)) == 0,
                  "%s dim %u: chunks of %zu differ from one batch",
                  kind_str(kind), dim, chunks[t]);
        free(yc);
    }

    /* Same (kind, dim, seed): the same bits. Another seed: another
     * transform. The dense kind is rebuilt only where that is cheap (its
     * build is O(D^3), slow under the sanitizers). */
    if (kind == BS_ROTATION_FAST || D <= 512) {
        bs_rotation *again = make(kind, dim, 1234);
        float *y2 = again ? rotate(again, x, N, dim) : NULL;
        if (y2 != NULL) {
            CHECK_MSG(memcmp(y, y2, (size_t)N * D * sizeof(float)) == 0,
                      "%s dim %u: not deterministic", kind_str(kind), dim);
            free(y2);
        }
        bs_rotation_free(again);

        bs_rotation *other = make(kind, dim, 1235);
        float *y3 = other ? rotate(other, x, N, dim) : NULL;
        if (y3 != NULL) {
            double md = 0;
            for (size_t i = 0; i < (size_t)N * D; i++)
                md = fmax(md, fabs((double)y[i] - y3[i]));
            CHECK_MSG(md > 0.1, "%s dim %u: seeds 1234 and 1235 agree",
                      kind_str(kind), dim);
            free(y3);
        }
        bs_rotation_free(other);
    }
    free(y);
done:
    free(x);
    bs_rotation_free(rot);
}

static void test_all_dims(void) {
    for (size_t i = 0; i < NUM_DIMS; i++) {
        check_kind_dim(BS_ROTATION_FAST, kDims[i]);
        check_kind_dim(BS_ROTATION_MATRIX, kDims[i]);
    }
}

/* P itself, from the identity: row i of the output is P e_i, column i of
 * P. Each output is one exact product plus exact zeros. */
static float *columns_of(const bs_rotation *rot) {
    uint32_t D = bs_rotation_padded_dim(rot);
    float *eye = calloc((size_t)D * D, sizeof(float));
    for (uint32_t i = 0; i < D; i++) eye[(size_t)i * D + i] = 1.0f;
    float *cols = rotate(rot, eye, D, D);
    free(eye);
    return cols;
}

static uint64_t fast_output_hash(uint32_t dim, uint64_t seed) {
    bs_rotation *rot = make(BS_ROTATION_FAST, dim, seed);
    if (rot == NULL) return 0;
    float *x = malloc(dim * sizeof(float));
    for (uint32_t i = 0; i < dim; i++) x[i] = (float)((i * 7u) % 13u) - 6.0f;
    float *y = rotate(rot, x, 1, dim);
    uint64_t h =
        y ? bs_hash64(y, bs_rotation_padded_dim(rot) * sizeof(float), 0) : 0;
    free(x);
    free(y);
    bs_rotation_free(rot);
    return h;
}

static uint64_t matrix_hash(uint32_t dim, uint64_t seed) {
    bs_rotation *rot = make(BS_ROTATION_MATRIX, dim, seed);
    if (rot == NULL) return 0;
    uint32_t D = bs_rotation_padded_dim(rot);
    float *cols = columns_of(rot);
    uint64_t h = cols ? bs_hash64(cols, (size_t)D * D * sizeof(float), 0) : 0;
    free(cols);
    bs_rotation_free(rot);
    return h;
}

/* The transforms' exact bits, computed once: any change to the draw order,
 * the normalisation or the operation order shows up here, and so would a
 * machine or compiler that rounds differently. */
static void test_pinned_outputs(void) {
    struct { uint32_t dim; uint64_t want; } fast[] = {
        {64, 0x3641655DCFB403DEull},
        {100, 0xCDE114E77109C158ull},
        {768, 0x0E9B5A7BD3794524ull},
        {960, 0x2087DBA0BCD04F25ull}};
    for (size_t i = 0; i < sizeof fast / sizeof fast[0]; i++) {
        uint64_t h = fast_output_hash(fast[i].dim, 42);
        CHECK_MSG(h == fast[i].want, "fast dim %u: output hash 0x%016llx",
                  fast[i].dim, (unsigned long long)h);
    }
    struct { uint32_t dim; uint64_t want; } mat[] = {
        {64, 0x79164EA3E65DC531ull}, {100, 0xF5481A735DFD9BB3ull}};
    for (size_t i = 0; i < sizeof mat / sizeof mat[0]; i++) {
        uint64_t h = matrix_hash(mat[i].dim, 42);
        CHECK_MSG(h == mat[i].want, "matrix dim %u: matrix hash 0x%016llx",
                  mat[i].dim, (unsigned long long)h);
    }
}

static void test_matrix_orthogonal(void) {
    const uint32_t dims[] = {64, 384};
    for (size_t t = 0; t < 2; t++) {
        bs_rotation *rot = make(BS_ROTATION_MATRIX, dims[t], 9);
        if (rot == NULL) continue;
        uint32_t D = bs_rotation_padded_dim(rot);
        float *c = columns_of(rot);
        double worst = 0;
        for (uint32_t i = 0; c && i < D; i++)
            for (uint32_t j = i; j < D; j++) {
                double g = dot(c + (size_t)i * D, c + (size_t)j * D, D);
                worst = fmax(worst, fabs(g - (i == j ? 1.0 : 0.0)));
            }
        CHECK_MSG(worst < 1e-5, "matrix D %u: |P^T P - I| = %g", D, worst);
        free(c);
        bs_rotation_free(rot);
    }
}

/* Haar, not just orthogonal: without the sign correction the Householder
 * Q has a negative (0, 0) entry for every seed. Here P[0][0] = x_0 / |x|
 * for a Gaussian x: mean 0, mean square 1/D. */
static void test_matrix_haar_signs(void) {
    enum { SEEDS = 200 };
    double s00 = 0, q00 = 0, slast = 0;
    int neg00 = 0, neglast = 0;
    for (int s = 0; s < SEEDS; s++) {
        bs_rotation *rot = make(BS_ROTATION_MATRIX, 64, 1000 + (uint64_t)s);
        if (rot == NULL) return;
        float e0[64] = {1.0f}, e63[64] = {0};
        e63[63] = 1.0f;
        float *y0 = rotate(rot, e0, 1, 64), *y63 = rotate(rot, e63, 1, 64);
        if (y0 && y63) {
            s00 += y0[0];
            q00 += (double)y0[0] * y0[0];
            neg00 += y0[0] < 0;
            slast += y63[63];
            neglast += y63[63] < 0;
        }
        free(y0);
        free(y63);
        bs_rotation_free(rot);
    }
    CHECK_MSG(fabs(s00 / SEEDS) < 0.05, "mean P[0][0] = %g", s00 / SEEDS);
    CHECK_MSG(fabs(slast / SEEDS) < 0.05, "mean P[63][63] = %g", slast / SEEDS);
    CHECK_MSG(fabs(q00 / SEEDS * 64 - 1) < 0.3, "64 E[P00^2] = %g",
              q00 / SEEDS * 64);
    CHECK(neg00 > 60 && neg00 < 140);
    CHECK(neglast > 60 && neglast < 140);
}

/* After the FAST rotation a fixed unit vector's coordinates should look
 * like N(0, 1/D). The hard cases are D just below a power of two, where
 * the two Hadamard blocks overlap in only 64 coordinates. */
static void test_fast_mixing(void) {
    /* e_1 at D = 768: no coordinate keeps a large share. */
    {
        bs_rotation *rot = make(BS_ROTATION_FAST, 768, 5);
        float e1[768] = {1.0f};
        float *y = rot ? rotate(rot, e1, 1, 768) : NULL;
        double mx = 0;
        for (int i = 0; y && i < 768; i++) mx = fmax(mx, fabs(y[i]));
        CHECK_MSG(mx < 5.0 / sqrt(768.0), "max |P e1| = %g", mx);
        free(y);
        bs_rotation_free(rot);
    }
    const uint32_t dims[] = {768, 960, 1984};
    for (size_t t = 0; t < 3; t++) {
        const uint32_t D = dims[t];
        enum { SEEDS = 48, STARTS = 3 };
        double quarter[STARTS][4] = {{0}};
        double m2 = 0, m4 = 0;
        size_t count = 0;
        float *x = calloc((size_t)STARTS * D, sizeof(float));
        x[0] = 1.0f;                         /* e_1 */
        x[(size_t)D + D - 1] = 1.0f;         /* e_D */
        for (int i = 0; i < 16; i++) x[2 * (size_t)D + i] = 0.25f; /* sparse */
        for (int s = 0; s < SEEDS; s++) {
            bs_rotation *rot = make(BS_ROTATION_FAST, D, 500 + (uint64_t)s);
            float *y = rot ? rotate(rot, x, STARTS, D) : NULL;
            for (int v = 0; y && v < STARTS; v++)
                for (uint32_t i = 0; i < D; i++) {
                    double z2 = (double)y[(size_t)v * D + i] *
                                y[(size_t)v * D + i] * D;
                    quarter[v][i / (D / 4)] += z2;
                    m2 += z2;
                    m4 += z2 * z2;
                    count++;
                }
            free(y);
            bs_rotation_free(rot);
        }
        free(x);
        for (int v = 0; v < STARTS; v++)
            for (int q = 0; q < 4; q++) {
                double mean = quarter[v][q] / (SEEDS * (D / 4.0));
                CHECK_MSG(fabs(mean - 1) < 0.1,
                          "D %u start %d quarter %d: D E[y^2] = %.3f", D, v,
                          q, mean);
            }
        double kurt = (m4 / count) / ((m2 / count) * (m2 / count));
        CHECK_MSG(fabs(kurt - 3) < 0.2, "D %u: kurtosis %.3f", D, kurt);
    }
}

static void test_bad_arguments(void) {
    bs_rotation *rot = (bs_rotation *)&rot; /* must be reset to NULL */
    bs_error err;

    CHECK(bs_rotation_create(BS_ROTATION_FAST, 0, 1, &rot, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(err.code == BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "got 0") != NULL);
    CHECK(rot == NULL);

    CHECK(bs_rotation_create(BS_ROTATION_FAST, 65537, 1, &rot, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "65537") != NULL);
    CHECK(strstr(err.message, "65536") != NULL);

    CHECK(bs_rotation_create((bs_rotation_kind)7, 64, 1, &rot, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "got 7") != NULL);

    CHECK(bs_rotation_create(BS_ROTATION_MATRIX, 4097, 1, &rot, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "4097") != NULL);
    CHECK(strstr(err.message, "fast") != NULL);

    CHECK(bs_rotation_create(BS_ROTATION_FAST, 64, 1, NULL, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "out") != NULL);
    /* err may be NULL. */
    CHECK(bs_rotation_create(BS_ROTATION_FAST, 0, 1, &rot, NULL) ==
          BS_ERR_INVALID_ARGUMENT);

    /* The largest dimension is accepted (65536 fast is 1 MiB of signs). */
    CHECK(bs_rotation_create(BS_ROTATION_FAST, 65536, 1, &rot, &err) == BS_OK);
    CHECK(err.code == BS_OK);
    bs_rotation_free(rot);
    bs_rotation_free(NULL);

    rot = make(BS_ROTATION_FAST, 100, 1);
    if (rot == NULL) return;
    float x[256] = {0}, y[256];
    CHECK(bs_rotation_apply(rot, x, 1, 99, y, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "got 99") != NULL);
    CHECK(strstr(err.message, "100") != NULL && strstr(err.message, "128"));
    CHECK(bs_rotation_apply(NULL, x, 1, 100, y, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_rotation_apply(rot, NULL, 1, 100, y, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "x") != NULL);
    CHECK(bs_rotation_apply(rot, x, 1, 100, NULL, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "output") != NULL);
    CHECK(bs_rotation_apply(rot, x, 1, 128, x + 64, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "overlap") != NULL);
    CHECK(bs_rotation_apply(rot, x, SIZE_MAX / 4, 128, y, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_rotation_apply(rot, NULL, 0, 100, NULL, &err) == BS_OK);
    CHECK(bs_rotation_apply(rot, x, 1, 100, y, NULL) == BS_OK);

    /* Accessors on NULL do not crash. */
    CHECK(bs_rotation_dim(NULL) == 0);
    CHECK(bs_rotation_padded_dim(NULL) == 0);
    bs_rotation_free(rot);
}

/* apply from several threads at once on one handle. */
typedef struct job {
    const bs_rotation *rot;
    const float *x;
    size_t n;
    uint32_t dim;
    float *y;
    int status;
} job;

static int run_job(void *arg) {
    job *j = arg;
    for (int rep = 0; rep < 20; rep++)
        j->status |= (int)bs_rotation_apply(j->rot, j->x, j->n, j->dim, j->y, NULL);
    return 0;
}

static void test_threads(void) {
    enum { T = 4, N = 16 };
    const bs_rotation_kind kinds[] = {BS_ROTATION_FAST, BS_ROTATION_MATRIX};
    for (int k = 0; k < 2; k++) {
        bs_rotation *rot = make(kinds[k], 300, 8);
        if (rot == NULL) continue;
        uint32_t D = bs_rotation_padded_dim(rot);
        float *x = gaussian_rows((size_t)T * N, 300, 4);
        float *serial = rotate(rot, x, (size_t)T * N, 300);
        float *par = malloc((size_t)T * N * D * sizeof(float));
        thrd_t th[T];
        job jobs[T];
        for (int t = 0; t < T; t++) {
            jobs[t] = (job){rot, x + (size_t)t * N * 300, N, 300,
                            par + (size_t)t * N * D, 0};
            CHECK(thrd_create(&th[t], run_job, &jobs[t]) == thrd_success);
        }
        for (int t = 0; t < T; t++) {
            thrd_join(th[t], NULL);
            CHECK(jobs[t].status == 0);
        }
        if (serial != NULL)
            CHECK(memcmp(serial, par, (size_t)T * N * D * sizeof(float)) == 0);
        free(x);
        free(serial);
        free(par);
        bs_rotation_free(rot);
    }
}

/* kind 0: normal; 1: +-1e30 and +-1 (order-sensitive sums); 2: denormals,
 * +-0.0f; 3: near FLT_MAX (sums overflow to inf, inf - inf is NaN). */
static float adversarial(uint64_t *st, int kind) {
    const double u = test_rand_uniform(st);
    const float sign = test_rand_uniform(st) < 0.5 ? -1.0f : 1.0f;
    switch (kind) {
    case 1: return sign * (u < 0.5 ? 1e30f : 1.0f);
    case 2: return u < 0.3 ? sign * 0.0f : sign * (float)(u * 1e-39);
    case 3: return u < 0.5 ? sign * 3e38f : (float)test_rand_normal(st);
    default: return (float)test_rand_normal(st);
    }
}

static void test_fast_row_levels(void) {
    if (!bs_simd_supported(BS_SIMD_AVX2)) return;
    static const uint32_t dims[] = {64, 128, 192, 256, 384, 448, 768, 960, 1024, 1984, 4096};
    uint64_t st = 99;
    int bad = 0;
    for (size_t t = 0; t < sizeof dims / sizeof dims[0]; t++) {
        const uint32_t D = dims[t];
        uint32_t W = 1;
        while (2 * W <= D) W *= 2;
        const int rounds = 4;
        const size_t passes = (W == D) ? 4 : 8;
        float *diag = malloc(passes * D * sizeof(float));
        float *a = malloc(D * sizeof(float)), *b = malloc(D * sizeof(float));
        for (int kind = 0; kind < 4; kind++) {
            for (size_t i = 0; i < passes * D; i++)
                diag[i] = kind == 3 ? adversarial(&st, 0) : adversarial(&st, kind);
            for (uint32_t i = 0; i < D; i++) a[i] = adversarial(&st, kind);
            memcpy(b, a, D * sizeof(float));
            bs_fast_row_sse2(diag, D, W, rounds, a);
            bs_fast_row_avx2(diag, D, W, rounds, b);
            bad += memcmp(a, b, D * sizeof(float)) != 0;
        }
        free(diag);
        free(a);
        free(b);
    }
    CHECK_MSG(bad == 0, "fast row: %d AVX2 rows differ from SSE2", bad);
}

int main(void) {
    test_fast_row_levels();
    test_bad_arguments();
    test_pinned_outputs();
    test_all_dims();
    test_matrix_orthogonal();
    test_matrix_haar_signs();
    test_fast_mixing();
    test_threads();
    TEST_MAIN_END();
}
