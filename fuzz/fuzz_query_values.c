/* libFuzzer target for build and search with adversarial float values.
 *
 * The input draws a small index (dimension, bits, metric, rotation, rows,
 * partitions), its centroids, rows and one query, value by value, from a
 * table of hard cases (NaN, +-Inf, +-0.0, 2^40 and the floats either side
 * of it, FLT_MAX, subnormals) or from raw float bits; the layout is in
 * fuzz_draw_value and fuzz/gen_corpus_query_values.py. The segment is built,
 * written, opened and searched once per SIMD level this CPU has (through
 * the BITSHARD_SIMD override), and the target requires:
 *  - each call either succeeds or refuses with the status the accepted-
 *    values rule (finite, |v| <= 2^40) names for exactly that input;
 *  - the segment bytes, statuses, messages and answers are identical for
 *    every kernel (scalar, AVX2, AVX-512);
 *  - an answer is finite, sorted as bitshard.h documents, holds only row
 *    ids that were added, each once, and as many as the parameters promise.
 * tests/c/test_fuzz_query.c replays fuzz/corpus/query_values through this
 * same function without libFuzzer, under ASan and UBSan. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A failed requirement prints what and where, then aborts so that both
 * libFuzzer and the ctest replay report it. */
#define FUZZ_REQUIRE(cond, ...)                                               \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "fuzz_query_values:%d: %s: ", __LINE__, #cond);  \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
            abort();                                                          \
        }                                                                     \
    } while (0)

enum { FUZZ_MAX_ROWS = 32, FUZZ_MAX_PARTS = 4, FUZZ_MAX_DIM = 100 };

static const uint32_t fuzz_dims[10] = {1, 2, 3, 5, 8, 16, 31, 64, 65, 100};

/* Reads the input front to back; past its end every byte is 0. */
typedef struct fuzz_reader {
    const uint8_t *p;
    size_t n, at;
} fuzz_reader;

static uint8_t fuzz_byte(fuzz_reader *r) {
    return r->at < r->n ? r->p[r->at++] : 0;
}

/* One value. Selector s < 16: a hard case; s < 32: the next 4 bytes as
 * float bits (any NaN payload, any exponent); otherwise a small ordinary
 * value (s - 144) / 16 in [-7, 6.9375], which keeps most inputs short. */
static float fuzz_draw_value(fuzz_reader *r) {
    const uint8_t s = fuzz_byte(r);
    switch (s) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return 1.0f;
    case 3: return -1.0f;
    case 4: return NAN;
    case 5: return INFINITY;
    case 6: return -INFINITY;
    case 7: return 0x1p40f;                       /* the largest accepted */
    case 8: return -0x1p40f;
    case 9: return nextafterf(0x1p40f, INFINITY); /* just above: refused */
    case 10: return nextafterf(0x1p40f, 0.0f);    /* just below */
    case 11: return FLT_MAX;
    case 12: return FLT_TRUE_MIN;                 /* smallest subnormal */
    case 13: return -1e-40f;                      /* a subnormal */
    case 14: return FLT_MIN;                      /* smallest normal */
    case 15: return -1e20f;
    default: break;
    }
    if (s < 32) {
        uint32_t bits = 0;
        for (int i = 0; i < 4; i++) bits |= (uint32_t)fuzz_byte(r) << (8 * i);
        float v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    return (float)((int)s - 144) / 16.0f;
}

static int fuzz_accepted(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(isfinite(x[i]) && fabsf(x[i]) <= 0x1p40f)) return 0;
    return 1;
}

/* The decoded case: everything a build and a search need. */
typedef struct fuzz_case {
    uint32_t dim, bits, rows, parts;
    bs_metric metric;
    bs_rotation_kind kind;
    bs_search_params params;
    float cent[FUZZ_MAX_PARTS * FUZZ_MAX_DIM];
    float x[FUZZ_MAX_ROWS * FUZZ_MAX_DIM];
    float q[FUZZ_MAX_DIM];
} fuzz_case;

static const float fuzz_eps0[8] = {1.9f, 0.0f, 1000.0f, 0.5f,
                                   /* refused: */ 1000.5f, -1.0f, NAN, INFINITY};

static void fuzz_decode(const uint8_t *data, size_t size, fuzz_case *c) {
    fuzz_reader r = {data, size, 0};
    c->dim = fuzz_dims[fuzz_byte(&r) % 10];
    c->bits = 1u + fuzz_byte(&r) % 9u;
    const uint8_t m = fuzz_byte(&r);
    c->metric = (bs_metric)(m % 3u);
    c->kind = (m >> 2) & 1u ? BS_ROTATION_MATRIX : BS_ROTATION_FAST;
    /* mode 1: every row equals row 0; 2: every row is zero; 3: the query
     * equals row 0 (an exact tie at distance 0). */
    const unsigned mode = (m >> 3) & 3u;
    c->rows = 1u + fuzz_byte(&r) % FUZZ_MAX_ROWS;
    c->parts = 1u + fuzz_byte(&r) % FUZZ_MAX_PARTS;
    memset(&c->params, 0, sizeof c->params);
    c->params.k = 1u + fuzz_byte(&r) % 16u;
    c->params.nprobes = 1u + fuzz_byte(&r) % FUZZ_MAX_PARTS;
    c->params.refine_factor = fuzz_byte(&r) % 4u;
    c->params.eps0 = fuzz_eps0[fuzz_byte(&r) % 8u];
    for (uint32_t i = 0; i < c->parts * c->dim; i++) c->cent[i] = fuzz_draw_value(&r);
    for (uint32_t i = 0; i < c->rows * c->dim; i++) {
        const uint32_t row = i / c->dim, j = i % c->dim;
        if (mode == 2) c->x[i] = 0.0f;
        else if (mode == 1 && row > 0) c->x[i] = c->x[j];
        else c->x[i] = fuzz_draw_value(&r);
    }
    for (uint32_t j = 0; j < c->dim; j++)
        c->q[j] = mode == 3 ? c->x[j] : fuzz_draw_value(&r);
}

/* What one kernel produced: statuses, messages, segment bytes, answer. */
typedef struct fuzz_run {
    bs_status st_create, st_add, st_write, st_open, st_searcher, st_search;
    char msg[BS_ERROR_MESSAGE_MAX];
    uint8_t *seg;
    size_t seg_len;
    size_t n;
    uint64_t rows[FUZZ_MAX_ROWS];
    float est[FUZZ_MAX_ROWS], lb[FUZZ_MAX_ROWS];
} fuzz_run;

static uint8_t *fuzz_slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    uint8_t *b = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        /* 64-byte aligned, exactly n bytes: the reader requires the
         * alignment and ASan then sees a read one byte past the end. */
        if (n > 0 && fseek(f, 0, SEEK_SET) == 0 &&
            posix_memalign((void **)&b, 64, (size_t)n) == 0) {
            if (fread(b, 1, (size_t)n, f) != (size_t)n) {
                free(b);
                b = NULL;
            } else {
                *len = (size_t)n;
            }
        }
    }
    fclose(f);
    return b;
}

static void fuzz_set_level(const char *name) {
    if (name) setenv("BITSHARD_SIMD", name, 1);
    else unsetenv("BITSHARD_SIMD");
}

/* Build, write, open and search under the kernel BITSHARD_SIMD names. */
static void fuzz_build_and_search(const fuzz_case *c, const char *path,
                                  fuzz_run *out) {
    memset(out, 0, sizeof *out);
    out->st_add = out->st_write = out->st_open = out->st_searcher =
        out->st_search = BS_ERR_INTERNAL; /* "not reached" */
    static const uint8_t uuid[16] = {1, 2, 3, 4, 5, 6, 7, 8,
                                     9, 10, 11, 12, 13, 14, 15, 16};
    const uint64_t frag_id = 7, frag_rows = c->rows;
    bs_segment_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.dim = c->dim;
    spec.num_bits = c->bits;
    spec.metric = c->metric;
    spec.rotation_kind = c->kind;
    spec.rotation_seed = 11;
    spec.centroids = c->cent;
    spec.num_partitions = c->parts;
    spec.column = "vec";
    spec.uuid = uuid;
    spec.fragment_ids = &frag_id;
    spec.fragment_rows = &frag_rows;
    spec.num_fragments = 1;
    bs_error err;
    memset(&err, 0, sizeof err);
    bs_segment_builder *b = NULL;
    bs_segment *seg = NULL;
    bs_searcher *s = NULL;
    bs_candidates *cand = NULL;

    out->st_create = bs_builder_create(&spec, &b, &err);
    if (out->st_create != BS_OK) goto done;
    uint32_t offs[FUZZ_MAX_ROWS];
    for (uint32_t i = 0; i < c->rows; i++) offs[i] = c->rows - 1 - i;
    /* Rows added in reverse offset order: ordinals must not depend on it. */
    float xr[FUZZ_MAX_ROWS * FUZZ_MAX_DIM];
    for (uint32_t i = 0; i < c->rows; i++)
        memcpy(xr + (size_t)i * c->dim, c->x + (size_t)offs[i] * c->dim,
               c->dim * sizeof(float));
    out->st_add = bs_builder_add(b, xr, c->rows, 0, offs, &err);
    if (out->st_add != BS_OK) goto done;
    out->st_write = bs_builder_write(b, path, &err);
    if (out->st_write != BS_OK) goto done;
    out->seg = fuzz_slurp(path, &out->seg_len);
    unlink(path);
    FUZZ_REQUIRE(out->seg != NULL, "cannot read back %s", path);
    out->st_open = bs_segment_open(out->seg, out->seg_len, &seg, &err);
    if (out->st_open != BS_OK) goto done;
    const bs_segment *segs[1] = {seg};
    out->st_searcher = bs_searcher_create(segs, 1, &s, &err);
    if (out->st_searcher != BS_OK) goto done;
    cand = bs_candidates_new();
    FUZZ_REQUIRE(cand != NULL, "bs_candidates_new failed");
    bs_search_stats stats;
    out->st_search = bs_search(s, c->q, &c->params, cand, &stats, &err);
    if (out->st_search != BS_OK) goto done;
    out->n = bs_candidates_size(cand);
    FUZZ_REQUIRE(out->n <= c->rows, "%zu candidates from %u rows", out->n, c->rows);
    memcpy(out->rows, bs_candidates_rowids(cand), out->n * sizeof(uint64_t));
    memcpy(out->est, bs_candidates_estimates(cand), out->n * sizeof(float));
    memcpy(out->lb, bs_candidates_lower_bounds(cand), out->n * sizeof(float));
done:
    if (err.message[0] != '\0') memcpy(out->msg, err.message, sizeof out->msg);
    bs_candidates_free(cand);
    bs_searcher_free(s);
    bs_segment_free(seg);
    bs_builder_free(b);
    unlink(path);
}

/* The requirements on one run, from the case alone. */
static void fuzz_check_run(const fuzz_case *c, const fuzz_run *r) {
    const int cent_ok = fuzz_accepted(c->cent, (size_t)c->parts * c->dim);
    const int rows_ok = fuzz_accepted(c->x, (size_t)c->rows * c->dim);
    const int q_ok = fuzz_accepted(c->q, c->dim);
    const float e = c->params.eps0;
    const int eps_ok = e >= 0.0f && e <= BS_MAX_EPS0;
    if (!cent_ok) {
        FUZZ_REQUIRE(r->st_create == BS_ERR_INVALID_ARGUMENT,
                     "refused centroids gave %s: %s", bs_status_name(r->st_create), r->msg);
        return;
    }
    FUZZ_REQUIRE(r->st_create == BS_OK, "%s: %s", bs_status_name(r->st_create), r->msg);
    if (!rows_ok) {
        FUZZ_REQUIRE(r->st_add == BS_ERR_INVALID_DATA, "refused rows gave %s: %s",
                     bs_status_name(r->st_add), r->msg);
        return;
    }
    FUZZ_REQUIRE(r->st_add == BS_OK, "%s: %s", bs_status_name(r->st_add), r->msg);
    FUZZ_REQUIRE(r->st_write == BS_OK, "%s: %s", bs_status_name(r->st_write), r->msg);
    FUZZ_REQUIRE(r->st_open == BS_OK, "%s: %s", bs_status_name(r->st_open), r->msg);
    FUZZ_REQUIRE(r->st_searcher == BS_OK, "%s: %s", bs_status_name(r->st_searcher), r->msg);
    if (!eps_ok) {
        FUZZ_REQUIRE(r->st_search == BS_ERR_INVALID_ARGUMENT, "eps0 %g gave %s: %s",
                     (double)e, bs_status_name(r->st_search), r->msg);
        return;
    }
    if (!q_ok) {
        FUZZ_REQUIRE(r->st_search == BS_ERR_INVALID_DATA, "refused query gave %s: %s",
                     bs_status_name(r->st_search), r->msg);
        return;
    }
    FUZZ_REQUIRE(r->st_search == BS_OK, "%s: %s", bs_status_name(r->st_search), r->msg);

    /* Every candidate: a row that was added, once; finite numbers. */
    uint8_t seen[FUZZ_MAX_ROWS] = {0};
    for (size_t i = 0; i < r->n; i++) {
        const uint64_t id = r->rows[i];
        FUZZ_REQUIRE(id >> 32 == 7 && (id & 0xFFFFFFFFu) < c->rows,
                     "row id %#llx was never added", (unsigned long long)id);
        FUZZ_REQUIRE(!seen[id & 0xFFFFFFFFu], "row id %#llx returned twice",
                     (unsigned long long)id);
        seen[id & 0xFFFFFFFFu] = 1;
        FUZZ_REQUIRE(isfinite(r->est[i]) && isfinite(r->lb[i]),
                     "candidate %zu: estimate %g, lower bound %g", i,
                     (double)r->est[i], (double)r->lb[i]);
    }
    /* Order: (lower bound, row id) for the gated 1-bit rerank, (estimate,
     * row id) otherwise. */
    const float *key = c->bits == 1 && c->params.refine_factor == 0 ? r->lb : r->est;
    for (size_t i = 1; i < r->n; i++)
        FUZZ_REQUIRE(key[i - 1] < key[i] ||
                         (key[i - 1] == key[i] && r->rows[i - 1] < r->rows[i]),
                     "candidates %zu and %zu out of order (%g, %g)", i - 1, i,
                     (double)key[i - 1], (double)key[i]);
    /* With every partition probed, every row is a candidate: at least k
     * come back (or all rows), and the multi-bit top k is exactly k. */
    if (c->params.nprobes >= c->parts) {
        const size_t want = c->params.k < c->rows ? c->params.k : c->rows;
        FUZZ_REQUIRE(r->n >= want, "%zu candidates, k %u, %u rows", r->n,
                     c->params.k, c->rows);
        if (c->bits > 1 && c->params.refine_factor == 0)
            FUZZ_REQUIRE(r->n == want, "%zu answers, want %zu", r->n, want);
    }
    /* Exact distances of accepted values are finite. */
    for (size_t i = 0; i < r->n; i++) {
        float d = NAN;
        bs_error err;
        const float *row = c->x + (size_t)(r->rows[i] & 0xFFFFFFFFu) * c->dim;
        FUZZ_REQUIRE(bs_exact_distances(c->metric, c->q, row, 1, c->dim, &d, &err) == BS_OK,
                     "%s", err.message);
        FUZZ_REQUIRE(isfinite(d), "exact distance %g of row %zu", (double)d, i);
    }
}

static void fuzz_same_runs(const fuzz_run *a, const fuzz_run *b, const char *name) {
    FUZZ_REQUIRE(a->st_create == b->st_create && a->st_add == b->st_add &&
                     a->st_write == b->st_write && a->st_open == b->st_open &&
                     a->st_searcher == b->st_searcher && a->st_search == b->st_search,
                 "statuses differ between scalar and %s", name);
    FUZZ_REQUIRE(strcmp(a->msg, b->msg) == 0, "messages differ: scalar \"%s\", %s \"%s\"",
                 a->msg, name, b->msg);
    FUZZ_REQUIRE(a->seg_len == b->seg_len &&
                     (a->seg_len == 0 || memcmp(a->seg, b->seg, a->seg_len) == 0),
                 "segment bytes differ between scalar and %s", name);
    FUZZ_REQUIRE(a->n == b->n, "%zu candidates with scalar, %zu with %s", a->n, b->n, name);
    FUZZ_REQUIRE(memcmp(a->rows, b->rows, a->n * sizeof(uint64_t)) == 0 &&
                     memcmp(a->est, b->est, a->n * sizeof(float)) == 0 &&
                     memcmp(a->lb, b->lb, a->n * sizeof(float)) == 0,
                 "answers differ between scalar and %s", name);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static fuzz_case c;
    static fuzz_run runs[3];
    static char path[256];
    if (path[0] == '\0') {
        /* tmpfs when there is one: the writer fsyncs. */
        const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(path, sizeof path, "%s/bs_fuzz_query_%ld.bsseg", dir, (long)getpid());
    }
    fuzz_decode(data, size, &c);
    const char *saved = getenv("BITSHARD_SIMD");
    char saved_copy[64] = "";
    if (saved) snprintf(saved_copy, sizeof saved_copy, "%s", saved);
    static const bs_simd_level levels[3] = {BS_SIMD_SCALAR, BS_SIMD_AVX2, BS_SIMD_AVX512};
    for (int i = 0; i < 3; i++) {
        if (!bs_simd_supported(levels[i])) continue;
        fuzz_set_level(bs_simd_name(levels[i]));
        fuzz_build_and_search(&c, path, &runs[i]);
        fuzz_check_run(&c, &runs[i]);
        if (i > 0) fuzz_same_runs(&runs[0], &runs[i], bs_simd_name(levels[i]));
    }
    fuzz_set_level(saved ? saved_copy : NULL);
    for (int i = 0; i < 3; i++) {
        free(runs[i].seg);
        runs[i].seg = NULL;
    }
    return 0;
}
