/* Search: recall against brute force, independence from how rows are split
 * into segments (and from segment order and SIMD level), output order,
 * allow/deny lists, and argument checks. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "bounds.h"
#include "exact.h"
#include "search_internal.h"
#include "testing.h"
#include "values.h"

enum { D = 48, NFRAG = 4, FRAG_ROWS = 500, N = NFRAG * FRAG_ROWS, K = 16, NQ = 30 };

static char g_dir[128];
static float g_x[N * D];
static float g_q[NQ * D];
static float g_cent[K * D];
static const uint8_t UUID[16] = {7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7};

typedef struct {
    uint8_t *buf;
    bs_segment *seg;
} opened;

static void make_data(void) {
    uint64_t st = 12345;
    float centres[20 * D];
    for (int i = 0; i < 20 * D; i++) centres[i] = (float)test_rand_normal(&st) * 3.0f;
    for (int i = 0; i < N; i++) {
        int c = (int)(test_rand_u64(&st) % 20);
        for (int j = 0; j < D; j++)
            g_x[i * D + j] = centres[c * D + j] + (float)test_rand_normal(&st);
    }
    for (int i = 0; i < NQ; i++)
        for (int j = 0; j < D; j++)
            g_q[i * D + j] = g_x[(i * 37) * D + j] + 0.3f * (float)test_rand_normal(&st);
}

/* Writes the builder's segment to g_dir/name, frees the builder, reads the
 * file back into a 64-byte aligned buffer and opens it. */
static opened write_and_open(bs_segment_builder *b, const char *name) {
    opened o = {NULL, NULL};
    bs_error err;
    char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    CHECK(bs_builder_write(b, path, &err) == BS_OK);
    bs_builder_free(b);
    FILE *fp = fopen(path, "rb");
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    void *p = NULL;
    CHECK(posix_memalign(&p, 64, (size_t)n) == 0);
    CHECK(fread(p, 1, (size_t)n, fp) == (size_t)n);
    fclose(fp);
    o.buf = p;
    CHECK(bs_segment_open(o.buf, (size_t)n, &o.seg, &err) == BS_OK);
    unlink(path);
    return o;
}

/* Builds a segment over fragments [f0, f1) and opens it. */
static opened build(uint32_t f0, uint32_t f1, uint32_t bits, bs_metric metric,
                    const char *name) {
    uint64_t ids[NFRAG], rows[NFRAG];
    for (uint32_t f = f0; f < f1; f++) {
        ids[f - f0] = f;
        rows[f - f0] = FRAG_ROWS;
    }
    bs_segment_spec spec = test_segment_spec(D, bits, metric, 99, g_cent, K,
                                             UUID, ids, rows, f1 - f0);
    bs_error err;
    bs_segment_builder *b = NULL;
    CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
    uint32_t offs[FRAG_ROWS];
    for (uint32_t i = 0; i < FRAG_ROWS; i++) offs[i] = i;
    for (uint32_t f = f0; f < f1; f++)
        CHECK(bs_builder_add(b, g_x + (size_t)f * FRAG_ROWS * D, FRAG_ROWS, f - f0, offs,
                             &err) == BS_OK);
    return write_and_open(b, name);
}

static void release(opened *o) {
    bs_segment_free(o->seg);
    free(o->buf);
}

/* Search all queries; returns a flat copy of (rowid, estimate bits) for
 * comparison. */
typedef struct {
    size_t n[NQ];
    uint64_t rows[NQ][4096];
    float est[NQ][4096];
    float lb[NQ][4096];
} results;

static void run(const bs_segment *const *segs, size_t nseg, const bs_search_params *p,
                results *out) {
    bs_searcher *s = NULL;
    bs_error err;
    CHECK_MSG(bs_searcher_create(segs, nseg, &s, &err) == BS_OK, "%s", err.message);
    bs_candidates *c = bs_candidates_new();
    for (int qi = 0; qi < NQ; qi++) {
        bs_search_stats st;
        CHECK(bs_search(s, g_q + qi * D, p, c, &st, &err) == BS_OK);
        size_t n = bs_candidates_size(c);
        CHECK(n <= 4096);
        out->n[qi] = test_copy_candidates(c, 4096, out->rows[qi], out->est[qi], out->lb[qi]);
    }
    bs_candidates_free(c);
    bs_searcher_free(s);
}

static int same(const results *a, const results *b) {
    for (int qi = 0; qi < NQ; qi++) {
        if (a->n[qi] != b->n[qi]) return 0;
        if (memcmp(a->rows[qi], b->rows[qi], a->n[qi] * 8)) return 0;
        if (memcmp(a->est[qi], b->est[qi], a->n[qi] * 4)) return 0;
        if (memcmp(a->lb[qi], b->lb[qi], a->n[qi] * 4)) return 0;
    }
    return 1;
}

static uint32_t pos_of(uint64_t rowid) {
    return (uint32_t)(rowid >> 32) * FRAG_ROWS + (uint32_t)(rowid & 0xffffffffu);
}

/* recall@10 of the final answers against brute force (l2). For 1-bit the
 * candidates are reranked with exact distances through bs_rerank_gate. */
static double recall(const results *r, uint32_t bits) {
    double hit = 0;
    for (int qi = 0; qi < NQ; qi++) {
        float d[N];
        bs_error err;
        CHECK(bs_exact_distances(BS_METRIC_L2, g_q + qi * D, g_x, N, D, d, &err) == BS_OK);
        uint32_t truth[10];
        for (int t = 0; t < 10; t++) {
            uint32_t best = 0;
            for (uint32_t i = 1; i < N; i++)
                if (d[i] < d[best]) best = i;
            truth[t] = best;
            d[best] = INFINITY;
        }
        uint32_t got[10];
        size_t ng = 0;
        if (bits == 1) {
            size_t n = r->n[qi];
            float *ex = malloc((n ? n : 1) * sizeof(float));
            float *vec = malloc((n ? n : 1) * D * sizeof(float));
            for (size_t i = 0; i < n; i++)
                memcpy(vec + i * D, g_x + (size_t)pos_of(r->rows[qi][i]) * D, D * 4);
            CHECK(bs_exact_distances(BS_METRIC_L2, g_q + qi * D, vec, n, D, ex, &err) == BS_OK);
            float heap[10];
            uint32_t hn = 0;
            size_t stop = bs_rerank_gate(r->lb[qi], ex, n, 10, heap, &hn);
            CHECK(stop <= n && hn == (n < 10 ? n : 10));
            for (int t = 0; t < 10 && t < (int)stop; t++) {
                size_t best = 0;
                for (size_t i = 1; i < stop; i++)
                    if (ex[i] < ex[best]) best = i;
                got[ng++] = pos_of(r->rows[qi][best]);
                ex[best] = INFINITY;
            }
            free(ex);
            free(vec);
        } else {
            for (size_t i = 0; i < r->n[qi] && i < 10; i++) got[ng++] = pos_of(r->rows[qi][i]);
        }
        for (int t = 0; t < 10; t++)
            for (size_t g = 0; g < ng; g++)
                if (got[g] == truth[t]) hit++;
    }
    return hit / (NQ * 10.0);
}

static void test_bits(uint32_t bits) {
    opened full = build(0, NFRAG, bits, BS_METRIC_L2, "full");
    opened a = build(0, 1, bits, BS_METRIC_L2, "a");
    opened b = build(1, NFRAG, bits, BS_METRIC_L2, "b");
    bs_search_params p = test_search_params(10, 6);
    static results r_full, r_ab, r_ba, r_scalar;
    const bs_segment *one[1] = {full.seg};
    const bs_segment *ab[2] = {a.seg, b.seg};
    const bs_segment *ba[2] = {b.seg, a.seg};
    run(one, 1, &p, &r_full);
    run(ab, 2, &p, &r_ab);
    run(ba, 2, &p, &r_ba);
    CHECK_MSG(same(&r_full, &r_ab), "bits %u: split segments answer differently", bits);
    CHECK_MSG(same(&r_full, &r_ba), "bits %u: segment order changes the answer", bits);
    /* The scalar kernel gives identical integers, so identical answers. */
    setenv("BITSHARD_SIMD", "scalar", 1);
    run(one, 1, &p, &r_scalar);
    unsetenv("BITSHARD_SIMD");
    CHECK_MSG(same(&r_full, &r_scalar), "bits %u: scalar and SIMD kernels disagree", bits);
    /* And each SIMD level this CPU has, named explicitly: stage 1's one
     * table per query and its corr terms are the same floats for all. */
    static const bs_simd_level simd_ids[2] = {BS_SIMD_AVX2, BS_SIMD_AVX512};
    for (int l = 0; l < 2; l++) {
        if (!bs_simd_supported(simd_ids[l])) continue;
        setenv("BITSHARD_SIMD", l == 0 ? "avx2" : "avx512", 1);
        run(one, 1, &p, &r_scalar);
        unsetenv("BITSHARD_SIMD");
        CHECK_MSG(same(&r_full, &r_scalar), "bits %u: scalar and %s kernels disagree", bits,
                  l == 0 ? "avx2" : "avx512");
    }
    /* Output order: (lower bound, row id) for the gated 1-bit rerank,
     * (estimate, row id) otherwise; multi-bit returns k. */
    for (int qi = 0; qi < NQ; qi++) {
        const float *key = bits == 1 ? r_full.lb[qi] : r_full.est[qi];
        for (size_t i = 1; i < r_full.n[qi]; i++)
            CHECK(key[i - 1] < key[i] ||
                  (key[i - 1] == key[i] && r_full.rows[qi][i - 1] < r_full.rows[qi][i]));
        if (bits > 1) CHECK(r_full.n[qi] == 10);
        if (bits == 1) /* stage 2 may land below the 1-bit bound */
            for (size_t i = 0; i < r_full.n[qi]; i++)
                CHECK(r_full.lb[qi][i] <= r_full.est[qi][i]);
    }
    double rec = recall(&r_full, bits);
    CHECK_MSG(rec >= (bits == 1 ? 0.95 : 0.9), "bits %u recall %.3f", bits, rec);

    /* Allow- and deny-lists: the only allowed fragment is 2; row 2:0 denied. */
    uint64_t frag2[1] = {2};
    uint64_t deny[1] = {(uint64_t)2 << 32};
    p.allowed_fragments = frag2;
    p.num_allowed_fragments = 1;
    p.denied_rowids = deny;
    p.num_denied = 1;
    static results r_f;
    run(one, 1, &p, &r_f);
    for (int qi = 0; qi < NQ; qi++)
        for (size_t i = 0; i < r_f.n[qi]; i++) {
            CHECK((r_f.rows[qi][i] >> 32) == 2);
            CHECK(r_f.rows[qi][i] != deny[0]);
        }
    /* Segment mask: searching only segment b never returns fragment 0. */
    p = test_search_params(10, 6);
    uint8_t mask[2] = {0, 1};
    p.segment_mask = mask;
    run(ab, 2, &p, &r_f);
    for (int qi = 0; qi < NQ; qi++)
        for (size_t i = 0; i < r_f.n[qi]; i++) CHECK((r_f.rows[qi][i] >> 32) != 0);
    release(&full);
    release(&a);
    release(&b);
}

static void test_errors(void) {
    opened full = build(0, NFRAG, 1, BS_METRIC_L2, "e1");
    opened other = build(0, 1, 2, BS_METRIC_L2, "e2");
    bs_error err;
    bs_searcher *s = NULL;
    const bs_segment *mixed[2] = {full.seg, other.seg};
    CHECK(bs_searcher_create(mixed, 2, &s, &err) == BS_ERR_ARTIFACT_MISMATCH);
    CHECK(strstr(err.message, "num_bits differs") != NULL);
    CHECK(bs_searcher_create(mixed, 0, &s, &err) == BS_ERR_INVALID_ARGUMENT);
    const bs_segment *one[1] = {full.seg};
    CHECK(bs_searcher_create(one, 1, &s, &err) == BS_OK);
    bs_candidates *c = bs_candidates_new();
    bs_search_params p = test_search_params(0, 4);
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "k must be >= 1, got 0") != NULL);
    p.k = 5;
    p.eps0 = NAN;
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    p.eps0 = 1.9f;
    float bad[D];
    memcpy(bad, g_q, sizeof bad);
    bad[7] = INFINITY;
    CHECK(bs_search(s, bad, &p, c, NULL, &err) == BS_ERR_INVALID_DATA);
    CHECK(strstr(err.message, "dimension 7") != NULL);
    /* the accepted-values rule: |v| <= 2^40, the bound itself included */
    bad[7] = 3e19f;
    CHECK(bs_search(s, bad, &p, c, NULL, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strcmp(err.message, "query: value 3e+19 at dimension 7 is too large (accepted: "
                                  "finite, |value| <= 2**40 = 1099511627776.0)") == 0,
              "%s", err.message);
    bad[7] = nextafterf((float)-BS_MAX_ABS_VALUE, -INFINITY);
    CHECK(bs_search(s, bad, &p, c, NULL, &err) == BS_ERR_INVALID_DATA);
    CHECK(strstr(err.message, "value -1.09951e+12 at dimension 7") != NULL);
    bad[7] = (float)-BS_MAX_ABS_VALUE;
    CHECK(bs_search(s, bad, &p, c, NULL, &err) == BS_OK);
    /* eps0 is capped so that the bound terms stay finite */
    p.eps0 = nextafterf(BS_MAX_EPS0, INFINITY);
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "eps0 must be finite and in [0, 1000], got 1000") != NULL,
              "%s", err.message);
    p.eps0 = BS_MAX_EPS0;
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_OK);
    p.eps0 = 1.9f;
    /* nprobes beyond the partition count is capped, not an error */
    p.nprobes = 1000;
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_OK);
    bs_candidates_free(c);
    bs_searcher_free(s);
    release(&full);
    release(&other);

    /* exact distances: metrics and the zero-vector convention for cosine */
    float q[3] = {1, 0, 0}, x[6] = {0, 0, 0, 2, 0, 0}, out[2];
    CHECK(bs_exact_distances(BS_METRIC_COSINE, q, x, 2, 3, out, &err) == BS_OK);
    CHECK(out[0] == 1.0f && out[1] == 0.0f);
    CHECK(bs_exact_distances(BS_METRIC_DOT, q, x, 2, 3, out, &err) == BS_OK);
    CHECK(out[0] == 1.0f && out[1] == -1.0f);
    CHECK(bs_exact_distances(BS_METRIC_L2, q, x, 2, 3, out, &err) == BS_OK);
    CHECK(out[0] == 1.0f && out[1] == 1.0f);
    CHECK(bs_exact_distances((bs_metric)9, q, x, 2, 3, out, &err) == BS_ERR_INVALID_ARGUMENT);
}

static void test_gate(void) {
    /* lower bounds ascending; exact distances arbitrary */
    float lb[6] = {0, 1, 2, 3, 4, 5}, d[6] = {2.5f, 1.5f, 9, 0.5f, 7, 0.1f};
    float heap[2];
    uint32_t hn = 0;
    /* best two after 0..2: 1.5, 2.5 -> candidate 3 (lb 3 > 2.5) stops */
    CHECK(bs_rerank_gate(lb, d, 6, 2, heap, &hn) == 3);
    CHECK(hn == 2);
    /* resumable across chunks: same stop point */
    hn = 0;
    CHECK(bs_rerank_gate(lb, d, 2, 2, heap, &hn) == 2);
    CHECK(bs_rerank_gate(lb + 2, d + 2, 4, 2, heap, &hn) == 1);
}

/* The exact distances bs_exact_distances computes (SSE2 on x86-64) have
 * the reference's bits for every metric: random rows, every tail length,
 * a wide row, and input built to expose another summation order (huge and
 * tiny terms that cancel, denormals, zero rows, values whose squares
 * overflow float but not double). */
static void test_exact_distances_sse2(void) {
    enum { NR = 5, DMAX = 800 };
    static float q[DMAX], x[NR * DMAX];
    uint64_t st = 4242;
    int bad = 0, cases = 0;
    const bs_metric metrics[3] = {BS_METRIC_L2, BS_METRIC_COSINE, BS_METRIC_DOT};
    for (int kind = 0; kind < 5; kind++) {
        for (uint32_t dim = 1; dim <= DMAX; dim = dim < 70 ? dim + 1 : dim + 365) {
            for (uint32_t j = 0; j < dim; j++) {
                for (int r = -1; r < NR; r++) {
                    double u = test_rand_normal(&st);
                    float val;
                    switch (kind) {
                    case 1: val = (float)(j % 4 == 0 ? u * 1e20 : u * 1e-3); break;
                    case 2: val = j % 3 == 0 ? 1e-42f : (float)(u * 1e-30); break;
                    case 3: val = r == 1 ? 0.0f : (float)(u * 3e30); break;
                    case 4: val = (float)(u * 0x1p40); break;
                    default: val = (float)u;
                    }
                    if (r < 0)
                        q[j] = val;
                    else
                        x[(size_t)r * dim + j] = val;
                }
            }
            for (int m = 0; m < 3; m++) {
                float want[NR], got[NR], api[NR];
                bs_error err;
                bs_exact_distances_ref(metrics[m], q, x, NR, dim, want);
                bs_exact_distances_sse2(metrics[m], q, x, NR, dim, got);
                CHECK(bs_exact_distances(metrics[m], q, x, NR, dim, api, &err) == BS_OK);
                bad += memcmp(want, got, sizeof want) != 0 || memcmp(want, api, sizeof want) != 0;
                cases++;
            }
        }
    }
    CHECK_MSG(bad == 0, "%d of %d exact-distance cases differ from the reference", bad, cases);
    /* The reference is the documented order, not merely some order. l2:
     * 1 + 2^-24 is a float tie (rounds to 1) and each (1.25 2^-27)^2 is
     * below half a double ulp there, so added one at a time they vanish;
     * summed in any pairs first they push the result past the tie. dot:
     * 2^40 - 2^40 cancels before the 2^-14 terms, which 2^40 absorbs. */
    float qz[18] = {0}, vl[18], ones[8], vd[8], out;
    bs_error err;
    vl[0] = 1.0f;
    vl[1] = 0x1p-12f;
    for (int j = 2; j < 18; j++) vl[j] = 1.25f * 0x1p-27f;
    for (int j = 0; j < 8; j++) ones[j] = 1.0f, vd[j] = 0x1p-14f;
    vd[0] = 0x1p40f;
    vd[1] = -0x1p40f;
    bs_exact_distances_ref(BS_METRIC_L2, qz, vl, 1, 18, &out);
    CHECK(out == 1.0f);
    CHECK(bs_exact_distances(BS_METRIC_L2, qz, vl, 1, 18, &out, &err) == BS_OK && out == 1.0f);
    const float want_dot = (float)(1.0 - 6 * 0x1p-14);
    bs_exact_distances_ref(BS_METRIC_DOT, ones, vd, 1, 8, &out);
    CHECK(out == want_dot);
    CHECK(bs_exact_distances(BS_METRIC_DOT, ones, vd, 1, 8, &out, &err) == BS_OK &&
          out == want_dot);
}

/* Same bits from the vector stage-1 bounds as from the reference, on
 * random factors (corr included) and on the awkward ones: zero, -0,
 * denormal, huge, inf and NaN factors, s1 of either sign, r parallel to y1 (t < 0 before the
 * clamp), sums up to 2^31 - 1, every tail length, and in place. */
static int same_or_both_nan(float a, float b) {
    return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof a) == 0;
}

static void test_lower_bounds_kernel(void) {
    uint64_t st = 99;
    enum { M = 67 };
    uint32_t sums[M], inplace[M];
    float norm2[M], s1[M], corr[M], a[M], b[M];
    const float odd[] = {0.0f, -0.0f, 1e-42f, 3e38f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f};
    int bad = 0, bad_mask = 0, mask_cases = 0;
    for (int round = 0; round < 400; round++) {
        bs_bound_params p = {(float)test_rand_normal(&st), (float)test_rand_normal(&st) * 50.0f,
                             (float)test_rand_normal(&st) * 10.0f, round % 2 ? 1.0f : 0.0f,
                             (float)fabs(test_rand_normal(&st)) * 30.0f, round % 2 ? 2.0f : 1.0f,
                             (float)fabs(test_rand_normal(&st)), (float)fabs(test_rand_normal(&st)),
                             32.0f, 0.0887f};
        for (int i = 0; i < M; i++) {
            uint64_t r = test_rand_u64(&st);
            sums[i] = r % 5 == 0 ? 0x7fffffffu - (uint32_t)(r % 3) : (uint32_t)(r % 70000);
            norm2[i] = (float)fabs(test_rand_normal(&st)) * 20.0f;
            s1[i] = (float)test_rand_normal(&st) * 3.0f;
            corr[i] = (float)test_rand_normal(&st) * 5.0f;
            if (round >= 200) { /* adversarial factors */
                if (r % 17 == 0) corr[i] = odd[(r >> 24) % 9];
                if (r % 7 == 0) norm2[i] = odd[(r >> 8) % 9];
                if (r % 11 == 0) s1[i] = odd[(r >> 16) % 9];
                /* t = D/4 s1^2 - |r|^2 at or below zero */
                if (r % 13 == 0) norm2[i] = 32.0f * s1[i] * s1[i] * (r % 2 ? 1.0f : 1.0001f);
            }
        }
        size_t n = (size_t)round % (M + 1);
        bs_lower_bounds_ref(sums, norm2, s1, corr, n, &p, a);
        bs_lower_bounds_sse2(sums, norm2, s1, corr, n, &p, b);
        memcpy(inplace, sums, sizeof sums);
        bs_lower_bounds(inplace, norm2, s1, corr, n, &p, (float *)(void *)inplace);
        for (size_t i = 0; i < n; i++) {
            float c;
            memcpy(&c, &inplace[i], sizeof c);
            bad += !same_or_both_nan(a[i], b[i]) || !same_or_both_nan(a[i], c);
        }
        /* the bounds with the filter mask, at every level this CPU runs,
         * against the reference's bounds and the scalar test */
        const float thresholds[5] = {(float)test_rand_normal(&st) * 40.0f, INFINITY, -INFINITY,
                                     NAN, n > 0 ? a[n / 2] : 0.0f};
        const bs_simd_level levels[3] = {BS_SIMD_SCALAR, BS_SIMD_AVX2, BS_SIMD_AVX512};
        for (int t = 0; t < 5; t++) {
            const float thr = thresholds[t];
            uint32_t want[(M + 31) / 32] = {0};
            for (size_t i = 0; i < n; i++) want[i / 32] |= (uint32_t)!(a[i] > thr) << (i % 32);
            for (int v = -1; v < 3; v++) {
                if (v >= 0 && !bs_simd_supported(levels[v])) continue;
                bs_bounds_fn fn = v < 0 ? bs_lower_bounds_mask_ref : bs_lower_bounds_kernel(levels[v]);
                uint32_t mask[(M + 31) / 32 + 1];
                memset(mask, 0xA5, sizeof mask);
                memcpy(inplace, sums, sizeof sums);
                fn(inplace, norm2, s1, corr, n, &p, thr, (float *)(void *)inplace, mask);
                for (size_t i = 0; i < n; i++) {
                    float c;
                    memcpy(&c, &inplace[i], sizeof c);
                    bad_mask += !same_or_both_nan(a[i], c);
                }
                bad_mask += memcmp(mask, want, (n + 31) / 32 * sizeof(uint32_t)) != 0;
                /* the word past the last is not written, nor out past n */
                bad_mask += mask[(n + 31) / 32] != 0xA5A5A5A5u;
                bad_mask += memcmp(inplace + n, sums + n, (M - n) * sizeof *sums) != 0;
                mask_cases++;
            }
        }
    }
    CHECK_MSG(bad == 0, "%d stage-1 bounds differ from the reference", bad);
    printf("stage-1 bounds with mask: %d cases (avx2 %s, avx512 %s)\n", mask_cases,
           bs_simd_supported(BS_SIMD_AVX2) ? "checked" : "not on this CPU",
           bs_simd_supported(BS_SIMD_AVX512) ? "checked" : "not on this CPU");
    CHECK_MSG(bad_mask == 0, "%d stage-1 bounds or masks differ from the reference", bad_mask);
}

/* A one-fragment segment of FRAG_ROWS rows x of dimension dim with the
 * given centroids (the probe tests need many partitions, most of them
 * empty). */
static opened build_with(const float *x, uint32_t dim, const float *cent, uint32_t k,
                         bs_metric metric) {
    uint64_t ids[1] = {0}, rows[1] = {FRAG_ROWS};
    bs_segment_spec spec = test_segment_spec(dim, 1, metric, 5, cent, k, UUID, ids, rows, 1);
    bs_error err;
    bs_segment_builder *b = NULL;
    CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
    uint32_t offs[FRAG_ROWS];
    for (uint32_t i = 0; i < FRAG_ROWS; i++) offs[i] = i;
    CHECK(bs_builder_add(b, x, FRAG_ROWS, 0, offs, &err) == BS_OK);
    return write_and_open(b, "probes");
}

/* The float16 probe pre-pass must pick exactly the probes (and order) of
 * the float scan: on spread centroids, under heavy cancellation (a common
 * offset of 1000, spread 0.01), with duplicated centroids (exact ties, to
 * the lowest id), with float16-subnormal coordinates, with queries equal
 * to centroids, for each metric and several nprobe. A coordinate beyond
 * float16's range turns the pre-pass off (same probes, scanned in float). */
static void test_probe_prepass(void) {
    /* the pre-pass needs >= 256 dimensions; 264 also leaves a tail of 8 */
    enum { KP = 300, DP = 264 };
    static float cent[KP * DP], rows[FRAG_ROWS * DP];
    float q[DP];
    uint32_t a[64], b[64];
    const uint32_t nprobes[] = {1, 2, 5, 17, 37};
    uint64_t st = 4242;
    int bad = 0, used = 0;
    for (int i = 0; i < FRAG_ROWS * DP; i++) rows[i] = 3.0f * (float)test_rand_normal(&st);
    for (int kind = 0; kind < 5; kind++) {
        for (int i = 0; i < KP * DP; i++) {
            double g = test_rand_normal(&st);
            cent[i] = kind == 1 ? 1000.0f + 0.01f * (float)g
                    : kind == 3 ? 1e-6f * (float)g
                                : 3.0f * (float)g;
        }
        if (kind == 2) /* pairs of equal centroids, and a triple */
            for (int j = 0; j + 1 < KP; j += 2)
                memcpy(cent + (j + 1) * DP, cent + j * DP, DP * sizeof(float));
        if (kind == 4) cent[7 * DP + 3] = 70000.0f;
        for (int metric = 0; metric < 3; metric++) {
            if (kind == 3 && metric == BS_METRIC_COSINE) continue; /* unit rows */
            opened o = build_with(rows, DP, cent, KP, (bs_metric)metric);
            bs_searcher *s = NULL;
            bs_error err;
            CHECK(bs_searcher_create((const bs_segment *const *)&o.seg, 1, &s, &err) == BS_OK);
            if (!s) continue;
            if (kind == 4) CHECK(!bs_searcher_has_prepass(s));
            used += bs_searcher_has_prepass(s);
            bs_candidates *c = bs_candidates_new();
            for (int qi = 0; qi < 40; qi++) {
                const float *at = cent + (size_t)((qi * 7) % KP) * DP;
                for (int j = 0; j < DP; j++) {
                    double g = test_rand_normal(&st);
                    q[j] = qi % 4 == 0 ? at[j] /* exactly a centroid */
                         : qi % 4 == 1 ? at[j] + (kind == 1 ? 0.003f : kind == 3 ? 3e-7f : 0.5f) *
                                                     (float)g
                                       : (kind == 1 ? 1000.0f : 0.0f) + (kind == 3 ? 1e-6f : 3.0f) *
                                                     (float)g;
                }
                if (metric == BS_METRIC_COSINE) {
                    float n2 = 0.0f;
                    for (int j = 0; j < DP; j++) n2 += q[j] * q[j];
                    for (int j = 0; j < DP; j++) q[j] /= sqrtf(n2);
                }
                for (size_t t = 0; t < sizeof nprobes / sizeof nprobes[0]; t++) {
                    uint32_t np = nprobes[t];
                    CHECK(bs_searcher_probes(s, c, q, np, 1, a, &err) == BS_OK);
                    CHECK(bs_searcher_probes(s, c, q, np, 0, b, &err) == BS_OK);
                    bad += memcmp(a, b, np * sizeof(uint32_t)) != 0;
                }
            }
            bs_candidates_free(c);
            bs_searcher_free(s);
            release(&o);
        }
    }
    CHECK_MSG(bad == 0, "%d probe lists differ between the pre-pass and the float scan", bad);
    if (bs_simd_supported(BS_SIMD_AVX2) && getenv("BITSHARD_SIMD") == NULL)
        CHECK_MSG(used >= 10, "the pre-pass ran for %d of the searchers", used);
}

/* Equal estimates are ordered by row id, whatever the ordinals: two
 * fragments hold the same 500 vectors (ids 5 then 3, so the copies with
 * the smaller row ids have the larger ordinals). Every returned copy from
 * fragment 5 must come with its twin from fragment 3, for multi-bit codes
 * (row ids looked up after stage 2) and the 1-bit gated list. */
static void test_ties_by_rowid(void) {
    uint64_t ids[2] = {5, 3}, rows[2] = {FRAG_ROWS, FRAG_ROWS};
    const uint32_t bits_list[2] = {9, 4};
    for (int bi = 0; bi < 2; bi++) {
        bs_segment_spec spec = test_segment_spec(D, bits_list[bi], BS_METRIC_L2, 3, g_cent, K,
                                                 UUID, ids, rows, 2);
        bs_error err;
        bs_segment_builder *b = NULL;
        CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
        if (!b) return;
        uint32_t offs[FRAG_ROWS];
        for (uint32_t i = 0; i < FRAG_ROWS; i++) offs[i] = i;
        CHECK(bs_builder_add(b, g_x, FRAG_ROWS, 0, offs, &err) == BS_OK);
        CHECK(bs_builder_add(b, g_x, FRAG_ROWS, 1, offs, &err) == BS_OK);
        opened o = write_and_open(b, "ties");
        bs_segment *seg = o.seg;
        bs_searcher *s = NULL;
        CHECK(bs_searcher_create((const bs_segment *const *)&seg, 1, &s, &err) == BS_OK);
        bs_candidates *c = bs_candidates_new();
        bs_search_params p = test_search_params(5, 4);
        int bad = 0;
        for (int qi = 0; qi < NQ; qi++) {
            CHECK(bs_search(s, g_q + qi * D, &p, c, NULL, &err) == BS_OK);
            size_t m = bs_candidates_size(c);
            const uint64_t *r = bs_candidates_rowids(c);
            bad += m != 5;
            for (size_t i = 0; i < m; i++) {
                if ((r[i] >> 32) != 5) continue;
                uint64_t twin = ((uint64_t)3 << 32) | (r[i] & 0xFFFFFFFFu);
                int found = 0;
                for (size_t j = 0; j < m; j++) found |= r[j] == twin;
                bad += !found;
            }
        }
        CHECK_MSG(bad == 0, "bits %u: %d results break the row-id tie order", bits_list[bi], bad);
        bs_candidates_free(c);
        bs_searcher_free(s);
        release(&o);
    }
}

/* Searches that find nothing, again and again on one candidate list: no
 * fragment allowed, rows outside the probed partitions, every segment
 * masked out, an empty segment; then k above the row count, and the same
 * list still answers an ordinary query exactly as a fresh one. Each empty
 * result once shrank the scratch to realloc(p, 0), which freed it; the
 * next search failed "out of memory" and the one after freed it again. */
static void check_empty(const bs_searcher *s, bs_candidates *c, const bs_search_params *p,
                        const char *what) {
    bs_error err;
    for (int rep = 0; rep < 4; rep++) {
        bs_search_stats st;
        bs_status status = bs_search(s, g_q, p, c, &st, &err);
        CHECK_MSG(status == BS_OK, "%s, round %d: %s", what, rep, err.message);
        CHECK_MSG(bs_candidates_size(c) == 0, "%s: %zu candidates", what,
                  bs_candidates_size(c));
        CHECK(bs_candidates_rowids(c) != NULL && bs_candidates_estimates(c) != NULL &&
              bs_candidates_lower_bounds(c) != NULL);
        CHECK(st.candidates == 0);
    }
}

static void test_empty_results(void) {
    for (uint32_t bits = 1; bits <= 9; bits += 4) {
        opened full = build(0, NFRAG, bits, BS_METRIC_L2, "z1");
        /* a segment whose fragment holds rows, none of them added */
        uint64_t ids[1] = {NFRAG}, rows[1] = {FRAG_ROWS};
        bs_segment_spec spec = test_segment_spec(D, bits, BS_METRIC_L2, 99, g_cent, K,
                                                 UUID, ids, rows, 1);
        bs_error err;
        bs_segment_builder *b = NULL;
        CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
        opened empty = write_and_open(b, "z2");

        bs_searcher *s = NULL;
        const bs_segment *both[2] = {full.seg, empty.seg};
        CHECK(bs_searcher_create(both, 2, &s, &err) == BS_OK);
        bs_candidates *c = bs_candidates_new();
        for (uint32_t refine = 0; refine <= 2; refine += 2) {
            bs_search_params p = test_search_params(10, 2);
            p.refine_factor = refine;
            const uint64_t nofrag[1] = {77};
            p.allowed_fragments = nofrag;
            p.num_allowed_fragments = 1;
            check_empty(s, c, &p, "no fragment allowed");
            p.allowed_fragments = NULL;
            p.num_allowed_fragments = 0;
            /* an allowed row in a partition the query does not probe */
            uint32_t probes[2];
            CHECK(bs_searcher_probes(s, c, g_q, 2, 1, probes, &err) == BS_OK);
            uint64_t far = UINT64_MAX;
            uint32_t assign[N];
            CHECK(bs_ivf_assign(g_cent, K, D, BS_METRIC_L2, g_x, N, assign, NULL, &err) == BS_OK);
            for (uint32_t i = 0; i < N && far == UINT64_MAX; i++)
                if (assign[i] != probes[0] && assign[i] != probes[1])
                    far = ((uint64_t)(i / FRAG_ROWS) << 32) | (i % FRAG_ROWS);
            CHECK(far != UINT64_MAX);
            p.allowed_rowids = &far;
            p.num_allowed = 1;
            check_empty(s, c, &p, "allowed row outside the probes");
            p.allowed_rowids = NULL;
            p.num_allowed = 0;
            const uint8_t none[2] = {0, 0}, only_empty[2] = {0, 1};
            p.segment_mask = none;
            check_empty(s, c, &p, "every segment masked out");
            p.segment_mask = only_empty;
            check_empty(s, c, &p, "only the empty segment");
            p.nprobes = K;
            check_empty(s, c, &p, "the empty segment, every partition");
            /* k above the row count: every row once, no more */
            p.segment_mask = NULL;
            p.k = 5 * N;
            CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_OK);
            CHECK_MSG(bs_candidates_size(c) <= N, "%zu candidates", bs_candidates_size(c));
            if (bits > 1 && refine == 0) CHECK(bs_candidates_size(c) == N);
            /* the reused list answers like a fresh one */
            p.k = 10;
            p.nprobes = 4;
            bs_candidates *fresh = bs_candidates_new();
            CHECK(bs_search(s, g_q + D, &p, c, NULL, &err) == BS_OK);
            CHECK(bs_search(s, g_q + D, &p, fresh, NULL, &err) == BS_OK);
            size_t n = bs_candidates_size(c);
            CHECK(n > 0 && n == bs_candidates_size(fresh));
            if (n == bs_candidates_size(fresh)) {
                CHECK(memcmp(bs_candidates_rowids(c), bs_candidates_rowids(fresh), n * 8) == 0);
                CHECK(memcmp(bs_candidates_estimates(c), bs_candidates_estimates(fresh),
                             n * 4) == 0);
            }
            bs_candidates_free(fresh);
        }
        /* zero probes is refused, by search and by the probe choice */
        bs_search_params p = test_search_params(1, 0);
        CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
        CHECK(strstr(err.message, "nprobes must be >= 1, got 0") != NULL);
        uint32_t probe;
        CHECK(bs_searcher_probes(s, c, g_q, 0, 0, &probe, &err) == BS_ERR_INVALID_ARGUMENT);
        /* a fresh list that only ever saw empty results, freed */
        bs_candidates *once = bs_candidates_new();
        CHECK(bs_candidates_size(once) == 0);
        bs_candidates_free(once);
        bs_candidates_free(c);
        bs_candidates_free(NULL);
        bs_searcher_free(s);
        bs_searcher_free(NULL);
        release(&full);
        release(&empty);
    }
}

/* The bit test of values.h is the documented rule, |v| <= 2^40 and finite. */
static void test_value_rule(void) {
    const float m = (float)BS_MAX_ABS_VALUE;
    CHECK((double)m == 1099511627776.0);
    const float ok[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 1.0f, m, -m, nextafterf(m, 0.0f)};
    const float no[] = {nextafterf(m, INFINITY), -nextafterf(m, INFINITY), 3e19f, -3e38f,
                        INFINITY, -INFINITY, NAN, -NAN};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        CHECK_MSG(!bs_value_refused(ok[i]), "%g refused", (double)ok[i]);
    for (size_t i = 0; i < sizeof no / sizeof no[0]; i++)
        CHECK_MSG(bs_value_refused(no[i]), "%g accepted", (double)no[i]);
    float row[70];
    for (uint32_t n = 0; n <= 70; n++) {
        for (uint32_t j = 0; j < 70; j++) row[j] = j % 2 ? m : -m;
        CHECK(bs_row_accepted(row, n) && bs_first_refused(row, n) == n);
        if (n == 0) continue;
        row[n - 1] = NAN;
        CHECK(!bs_row_accepted(row, n) && bs_first_refused(row, n) == n - 1);
    }
}


/* Partition shares (bs_search_params.partition_mask and share): three
 * shares searched apart and merged the way bitshard.serve's front does
 * (the k-th smallest upper bound over all shares, the candidates within it,
 * ranked by (key, row id)) give the single search's answer bit for bit. */
typedef struct {
    uint64_t row;
    float key, est, lb;
} share_cand;

static int share_cand_less(const void *a, const void *b) {
    const share_cand *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

static int float_cmp(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void check_shares(const bs_segment *const *segs, size_t nseg, bs_search_params p,
                         uint32_t bits, const char *what, const char *simd) {
    enum { NSHARE = 3, CAP = 8192 };
    static results r_full;
    run(segs, nseg, &p, &r_full);
    bs_searcher *s = NULL;
    bs_error err;
    /* the shares on another kernel than the single search, when asked */
    if (simd != NULL) setenv("BITSHARD_SIMD", simd, 1);
    CHECK(bs_searcher_create(segs, nseg, &s, &err) == BS_OK);
    if (simd != NULL) unsetenv("BITSHARD_SIMD");
    bs_candidates *c = bs_candidates_new();
    uint8_t masks[NSHARE][K];
    for (int sh = 0; sh < NSHARE; sh++)
        for (int part = 0; part < K; part++) masks[sh][part] = part % NSHARE == sh;
    static share_cand all[CAP];
    float ubs[NSHARE * 64];
    const int by_lb = bits == 1 && p.refine_factor == 0;
    for (int qi = 0; qi < NQ; qi++) {
        size_t n = 0, nub = 0;
        for (int sh = 0; sh < NSHARE; sh++) {
            bs_search_params ps = p;
            ps.partition_mask = masks[sh];
            ps.share = 1;
            CHECK(bs_search(s, g_q + qi * D, &ps, c, NULL, &err) == BS_OK);
            const float *u;
            size_t m = bs_candidates_upper_bounds(c, &u);
            CHECK(m <= p.k);
            for (size_t i = 1; i < m; i++) CHECK(u[i - 1] <= u[i]);
            memcpy(ubs + nub, u, m * sizeof(float));
            nub += m;
            size_t nc = bs_candidates_size(c);
            CHECK(n + nc <= CAP);
            for (size_t i = 0; i < nc && n < CAP; i++, n++) {
                all[n].row = bs_candidates_rowids(c)[i];
                all[n].est = bs_candidates_estimates(c)[i];
                all[n].lb = bs_candidates_lower_bounds(c)[i];
                all[n].key = by_lb ? all[n].lb : all[n].est;
            }
        }
        qsort(ubs, nub, sizeof(float), float_cmp);
        const float t = nub >= p.k ? ubs[p.k - 1] : INFINITY;
        size_t kept = 0;
        for (size_t i = 0; i < n; i++)
            if (all[i].lb <= t) all[kept++] = all[i];
        qsort(all, kept, sizeof *all, share_cand_less);
        size_t nout = kept;
        if (p.refine_factor > 0 && nout > (size_t)p.k * p.refine_factor)
            nout = (size_t)p.k * p.refine_factor;
        else if (p.refine_factor == 0 && bits > 1 && nout > p.k)
            nout = p.k;
        CHECK_MSG(nout == r_full.n[qi], "%s bits %u query %d: %zu shared, %zu single", what,
                  bits, qi, nout, r_full.n[qi]);
        for (size_t i = 0; i < nout && i < r_full.n[qi]; i++) {
            CHECK(all[i].row == r_full.rows[qi][i]);
            CHECK(memcmp(&all[i].est, &r_full.est[qi][i], 4) == 0);
            CHECK(memcmp(&all[i].lb, &r_full.lb[qi][i], 4) == 0);
        }
    }
    /* any other search reports no upper bounds */
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_OK);
    CHECK(bs_candidates_upper_bounds(c, NULL) == 0);
    bs_candidates_free(c);
    bs_searcher_free(s);
}

static void test_partition_shares(uint32_t bits) {
    opened full = build(0, NFRAG, bits, BS_METRIC_L2, "sh_full");
    opened a = build(0, 1, bits, BS_METRIC_L2, "sh_a");
    opened b = build(1, NFRAG, bits, BS_METRIC_L2, "sh_b");
    const bs_segment *one[1] = {full.seg};
    const bs_segment *ab[2] = {a.seg, b.seg};
    bs_search_params p = test_search_params(10, 6);
    check_shares(one, 1, p, bits, "one segment", NULL);
    check_shares(ab, 2, p, bits, "two segments", NULL);
    check_shares(ab, 2, p, bits, "scalar shares", "scalar");
    if (bs_simd_supported(BS_SIMD_AVX2)) check_shares(ab, 2, p, bits, "avx2 shares", "avx2");
    if (bs_simd_supported(BS_SIMD_AVX512))
        check_shares(ab, 2, p, bits, "avx512 shares", "avx512");
    p.refine_factor = 3;
    check_shares(ab, 2, p, bits, "refine 3", NULL);
    p.refine_factor = 0;
    uint64_t deny[2] = {(uint64_t)1 << 32, ((uint64_t)1 << 32) | 7};
    p.denied_rowids = deny;
    p.num_denied = 2;
    p.k = 25;
    check_shares(ab, 2, p, bits, "denied rows", NULL);
    release(&full);
    release(&a);
    release(&b);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/bs_test_search_XXXXXX");
    if (mkdtemp(g_dir) == NULL) return 1;
    make_data();
    bs_error err;
    CHECK(bs_kmeans_train(g_x, N, D, K, BS_METRIC_L2, 20, 1, g_cent, &err) == BS_OK);
    test_bits(1);
    test_bits(4);
    test_partition_shares(1);
    test_partition_shares(4);
    test_partition_shares(9);
    test_errors();
    test_gate();
    test_lower_bounds_kernel();
    test_exact_distances_sse2();
    test_probe_prepass();
    test_ties_by_rowid();
    test_empty_results();
    test_value_rule();
    rmdir(g_dir);
    TEST_MAIN_END();
}
