/* Leaks: build, write, open, search and close in a loop, through the
 * ordinary paths and the refused ones (bad values, truncated and corrupt
 * files, empty results, searcher errors). This test runs with LeakSanitizer
 * on (CMakeLists.txt sets detect_leaks=1 for it alone), so any block an
 * error path forgets fails it at exit; the loop makes a leak per call show
 * as many objects, and a growing one as a large total. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "search_internal.h"
#include "testing.h"

enum { D = 40, K = 6, N = 300, ROUNDS = 25 };

static char g_dir[128];
static float g_x[N * D];
static float g_cent[K * D];
static const uint8_t UUID[16] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3};

/* Builds a segment of fragments [f0, f1) (100 rows each) into path; also
 * tries the refused inputs on the same builder first. */
static void build(uint32_t bits, bs_metric metric, uint32_t f0, uint32_t f1,
                  const char *path) {
    uint64_t ids[3], rows[3];
    for (uint32_t f = f0; f < f1; f++) {
        ids[f - f0] = f;
        rows[f - f0] = 100;
    }
    bs_segment_spec spec = test_segment_spec(D, bits, metric, 5, g_cent, K, UUID, ids, rows,
                                             f1 - f0);
    bs_error err;
    bs_segment_builder *b = NULL;
    /* refused specs allocate nothing that outlives the call */
    float bad_cent[K * D];
    memcpy(bad_cent, g_cent, sizeof bad_cent);
    bad_cent[7] = 3e19f;
    bs_segment_spec bad = spec;
    bad.centroids = bad_cent;
    CHECK(bs_builder_create(&bad, &b, &err) == BS_ERR_INVALID_ARGUMENT && b == NULL);
    CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
    uint32_t offs[100];
    for (uint32_t i = 0; i < 100; i++) offs[i] = i;
    float row[D];
    memcpy(row, g_x, sizeof row);
    row[3] = NAN;
    CHECK(bs_builder_add(b, row, 1, 0, offs, &err) == BS_ERR_INVALID_DATA);
    row[3] = -3e19f;
    CHECK(bs_builder_add(b, row, 1, 0, offs, &err) == BS_ERR_INVALID_DATA);
    for (uint32_t f = f0; f < f1; f++)
        CHECK(bs_builder_add(b, g_x + (size_t)f * 100 * D, 100, f - f0, offs, &err) == BS_OK);
    CHECK(bs_builder_add(b, g_x, 1, 0, offs, &err) == BS_ERR_INVALID_ARGUMENT); /* again */
    CHECK(bs_builder_write(b, "/nonexistent-dir/x.bsseg", &err) == BS_ERR_IO);
    CHECK(bs_builder_write(b, path, &err) == BS_OK);
    bs_builder_free(b);
}

static void search_all(const bs_segment *const *segs, size_t n) {
    bs_error err;
    bs_searcher *s = NULL;
    CHECK(bs_searcher_create(segs, n, &s, &err) == BS_OK);
    if (s == NULL) return;
    bs_candidates *c = bs_candidates_new();
    /* every partition: the cosine rounds leave some empty */
    bs_search_params p = test_search_params(10, K);
    for (uint32_t r = 0; r <= 2; r++) {
        p.refine_factor = r;
        CHECK(bs_search(s, g_x + r * D, &p, c, NULL, &err) == BS_OK);
        CHECK(bs_candidates_size(c) > 0);
        const uint64_t none[1] = {99};
        p.allowed_fragments = none; /* no candidate at all */
        p.num_allowed_fragments = 1;
        CHECK(bs_search(s, g_x, &p, c, NULL, &err) == BS_OK && bs_candidates_size(c) == 0);
        CHECK(bs_search(s, g_x, &p, c, NULL, &err) == BS_OK && bs_candidates_size(c) == 0);
        p.allowed_fragments = NULL;
        p.num_allowed_fragments = 0;
        p.k = 5000; /* above the row count */
        CHECK(bs_search(s, g_x, &p, c, NULL, &err) == BS_OK);
        p.k = 10;
    }
    float q[D];
    memcpy(q, g_x, sizeof q);
    q[0] = 1e13f;
    CHECK(bs_search(s, q, &p, c, NULL, &err) == BS_ERR_INVALID_DATA);
    p.eps0 = -1.0f;
    CHECK(bs_search(s, g_x, &p, c, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    uint32_t probes[K];
    CHECK(bs_searcher_probes(s, c, g_x, K, 0, probes, &err) == BS_OK);
    bs_candidates_free(c);
    bs_searcher_free(s);
}

static void test_loop(void) {
    char p1[256], p2[256], pm[256];
    snprintf(p1, sizeof p1, "%s/a.bsseg", g_dir);
    snprintf(p2, sizeof p2, "%s/b.bsseg", g_dir);
    snprintf(pm, sizeof pm, "%s/m.bsseg", g_dir);
    bs_error err;
    for (int round = 0; round < ROUNDS; round++) {
        uint32_t bits = 1 + 4 * (uint32_t)(round % 3);
        bs_metric metric = (bs_metric)(round % 3);
        build(bits, metric, 0, 2, p1);
        build(bits, metric, 2, 3, p2);
        size_t l1 = 0, l2 = 0;
        uint8_t *b1 = test_read_file(p1, &l1), *b2 = test_read_file(p2, &l2);
        CHECK(b1 != NULL && b2 != NULL);
        if (b1 == NULL || b2 == NULL) {
            free(b1);
            free(b2);
            return;
        }
        bs_segment *s1 = NULL, *s2 = NULL, *sm = NULL, *bad = NULL;
        CHECK(bs_segment_open(b1, l1, &s1, &err) == BS_OK);
        CHECK(bs_segment_open(b2, l2, &s2, &err) == BS_OK);
        /* refused files: truncated (by the open), and one flipped byte in
         * the codes (format 3 opens without reading the partitions: by
         * bs_segment_verify) */
        CHECK(bs_segment_open(b1, l1 / 2, &bad, &err) != BS_OK && bad == NULL);
        b1[l1 - 100] ^= 0x40;
        CHECK(bs_segment_open(b1, l1, &bad, &err) == BS_OK &&
              bs_segment_verify(bad, &err) == BS_ERR_CORRUPT);
        bs_segment_free(bad);
        bad = NULL;
        b1[l1 - 100] ^= 0x40;
        const bs_segment *both[2] = {s1, s2};
        search_all(both, 2);
        CHECK(bs_segment_merge(both, 2, UUID, pm, &err) == BS_OK);
        const bs_segment *twice[2] = {s1, s1};
        CHECK(bs_segment_merge(twice, 2, UUID, pm, &err) == BS_ERR_INVALID_ARGUMENT);
        size_t lm = 0;
        uint8_t *bm = test_read_file(pm, &lm);
        CHECK(bm != NULL && bs_segment_open(bm, lm, &sm, &err) == BS_OK);
        const bs_segment *merged[1] = {sm};
        if (sm) search_all(merged, 1);
        bs_segment_free(sm);
        bs_segment_free(s2);
        bs_segment_free(s1);
        free(bm);
        free(b2);
        free(b1);
    }
    unlink(p1);
    unlink(p2);
    unlink(pm);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/bs_test_leaks_XXXXXX");
    if (mkdtemp(g_dir) == NULL) return 1;
    uint64_t st = 2024;
    float centres[K * D];
    for (int i = 0; i < K * D; i++) centres[i] = (float)test_rand_normal(&st) * 4.0f;
    for (int i = 0; i < N; i++) {
        int c = (int)(test_rand_u64(&st) % K);
        for (int j = 0; j < D; j++)
            g_x[i * D + j] = centres[c * D + j] + (float)test_rand_normal(&st);
    }
    bs_error err;
    CHECK(bs_kmeans_train(g_x, N, D, K, BS_METRIC_L2, 10, 1, g_cent, &err) == BS_OK);
    test_loop();
    rmdir(g_dir);
    TEST_MAIN_END();
}
