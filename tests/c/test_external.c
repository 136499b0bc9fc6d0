/* External centroids (header flags bit 0, docs/format.md): a segment
 * written without its centroids opens only with the index's centroids,
 * matched by the IVF fingerprint, answers exactly as the self-contained
 * file of the same rows, merges and remaps both ways, and is byte for
 * byte the self-contained file with the artifacts section emptied. */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "format.h"
#include "hash.h"
#include "testing.h"

#define D_ 72
#define K_ 6
#define N_ 300

static char g_dir[256];
static float g_cent[K_ * D_], g_x[N_ * D_], g_q[D_];
static const uint8_t UUID[16] = {7, 7, 7, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

#define tpath(name) test_path(g_dir, name)

static void make_data(void) {
    uint64_t st = 99;
    for (size_t i = 0; i < K_ * D_; i++) g_cent[i] = (float)(2.0 * test_rand_normal(&st));
    for (size_t i = 0; i < N_; i++) {
        size_t c = (size_t)(test_rand_u64(&st) % K_);
        for (size_t j = 0; j < D_; j++)
            g_x[i * D_ + j] = g_cent[c * D_ + j] + (float)test_rand_normal(&st);
    }
    for (size_t j = 0; j < D_; j++) g_q[j] = (float)test_rand_normal(&st);
}

/* Two fragments (ids 3 and 8, 150 rows each); flags for the writer. */
static bs_status build(uint32_t bits, uint32_t flags, const char *path, bs_error *err) {
    static const uint64_t ids[2] = {3, 8}, rows[2] = {150, 150};
    bs_segment_spec s = test_segment_spec(D_, bits, BS_METRIC_L2, 4242, g_cent, K_, UUID,
                                          ids, rows, 2);
    bs_segment_builder *b = NULL;
    bs_status st = bs_builder_create(&s, &b, err);
    if (st != BS_OK) return st;
    uint32_t offs[150];
    for (uint32_t i = 0; i < 150; i++) offs[i] = i;
    st = bs_builder_set_write_flags(b, flags, err);
    if (st == BS_OK) st = bs_builder_add(b, g_x, 150, 0, offs, err);
    if (st == BS_OK) st = bs_builder_add(b, g_x + 150 * D_, 150, 1, offs, err);
    if (st == BS_OK) st = bs_builder_write(b, path, err);
    bs_builder_free(b);
    return st;
}


/* The answer (row ids and estimates, in order) of one search. */
static size_t answer(const bs_segment *seg, uint64_t *ids, float *est) {
    bs_searcher *s = NULL;
    bs_error err;
    const bs_segment *segs[1] = {seg};
    CHECK(bs_searcher_create(segs, 1, &s, &err) == BS_OK);
    bs_search_params p = test_search_params(10, 3);
    bs_candidates *c = bs_candidates_new();
    CHECK(bs_search(s, g_q, &p, c, NULL, &err) == BS_OK);
    size_t n = bs_candidates_size(c);
    if (n > 64) n = 64;
    memcpy(ids, bs_candidates_rowids(c), n * sizeof *ids);
    memcpy(est, bs_candidates_estimates(c), n * sizeof *est);
    bs_candidates_free(c);
    bs_searcher_free(s);
    return n;
}

static void test_bits(uint32_t bits) {
    bs_error err;
    const char *self = tpath("self.bsseg"), *ext = tpath("ext.bsseg");
    CHECK(build(bits, 0, self, &err) == BS_OK);
    CHECK(build(bits, BS_WRITE_EXTERNAL_CENTROIDS, ext, &err) == BS_OK);
    size_t ls = 0, le = 0;
    uint8_t *bs = test_read_file(self, &ls), *be = test_read_file(ext, &le);
    CHECK(bs && be);
    if (!bs || !be) return;
    /* The external file is the self-contained one without the centroids'
     * bytes: same header fields but the flag and the section table. */
    uint64_t art = bs_load_u64(bs + BS_HDR_ARTIFACTS + 8);
    CHECK(art == 64 * ((K_ * D_ * 4 + 63) / 64));
    CHECK(le == ls - art);
    CHECK(bs_load_u32(be + BS_HDR_FLAGS) == 1u);
    CHECK(bs_load_u64(be + BS_HDR_ARTIFACTS + 8) == 0);
    CHECK(bs_load_u64(be + BS_HDR_ARTIFACTS + 16) == 0xef46db3751d8e999ull);
    CHECK(memcmp(bs + BS_HDR_IVF_FP, be + BS_HDR_IVF_FP, 16) == 0);
    uint32_t hs = bs_load_u32(bs + BS_HDR_HEADER_SIZE);
    /* Fragment table onwards: the same bytes, shifted. The directory's
     * offsets shift too, so compare from the first partition block. */
    uint64_t first_s = bs_load_u64(bs + BS_HDR_DIRECTORY) + bs_load_u64(bs + BS_HDR_DIRECTORY + 8);
    uint64_t first_e = bs_load_u64(be + BS_HDR_DIRECTORY) + bs_load_u64(be + BS_HDR_DIRECTORY + 8);
    CHECK(first_s - first_e == art);
    CHECK(memcmp(bs + first_s, be + first_e, ls - first_s) == 0);
    CHECK(memcmp(bs + hs + art, be + hs, bs_load_u64(bs + BS_HDR_FRAGMENTS + 8)) == 0);

    /* Without centroids: refused, naming the fingerprint it needs. */
    bs_segment *seg = NULL;
    char want[33];
    bs_fingerprint fp = bs_ivf_fingerprint(g_cent, K_, D_, BS_METRIC_L2);
    bs_seg_fingerprint_hex(&fp, want);
    CHECK(bs_segment_open(be, le, &seg, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(seg == NULL);
    char msg[256];
    snprintf(msg, sizeof msg,
             "segment has external centroids (IVF fingerprint %s): open it with its "
             "index's centroids (bs_segment_open_with_centroids)", want);
    CHECK_MSG(strcmp(err.message, msg) == 0, "%s", err.message);

    /* Other centroids: ARTIFACT_MISMATCH naming both fingerprints. */
    float other[K_ * D_];
    memcpy(other, g_cent, sizeof other);
    other[5] += 1.0f;
    bs_fingerprint ofp = bs_ivf_fingerprint(other, K_, D_, BS_METRIC_L2);
    char got[33];
    bs_seg_fingerprint_hex(&ofp, got);
    snprintf(msg, sizeof msg,
             "centroids given do not match the segment's: IVF fingerprint %s given, %s in "
             "the segment", got, want);
    CHECK(bs_segment_open_with_centroids(be, le, other, K_ * D_, &seg, &err) ==
          BS_ERR_ARTIFACT_MISMATCH);
    CHECK_MSG(strcmp(err.message, msg) == 0, "%s", err.message);
    /* ... and for a self-contained file given the wrong ones. */
    CHECK(bs_segment_open_with_centroids(bs, ls, other, K_ * D_, &seg, &err) ==
          BS_ERR_ARTIFACT_MISMATCH);
    CHECK_MSG(strcmp(err.message, msg) == 0, "%s", err.message);
    CHECK(bs_segment_open_with_centroids(be, le, g_cent, K_ * D_ - 1, &seg, &err) ==
          BS_ERR_ARTIFACT_MISMATCH);
    snprintf(msg, sizeof msg,
             "centroids given hold %d floats, the segment's are %d x %d (IVF fingerprint "
             "%s)", K_ * D_ - 1, K_, D_, want);
    CHECK_MSG(strcmp(err.message, msg) == 0, "%s", err.message);

    /* With them: the same answers, bit for bit, as the self-contained file. */
    bs_segment *se = NULL, *ss = NULL;
    CHECK(bs_segment_open_with_centroids(be, le, g_cent, K_ * D_, &se, &err) == BS_OK);
    CHECK(bs_segment_open_with_centroids(bs, ls, g_cent, K_ * D_, &ss, &err) == BS_OK);
    if (!se || !ss) return;
    CHECK(bs_segment_verify(se, &err) == BS_OK);
    bs_segment_info ie, is;
    bs_segment_get_info(se, &ie);
    bs_segment_get_info(ss, &is);
    CHECK(ie.external_centroids == 1 && is.external_centroids == 0);
    CHECK(bs_segment_centroids(se) == g_cent);
    uint64_t ids_e[64], ids_s[64];
    float est_e[64], est_s[64];
    size_t ne = answer(se, ids_e, est_e), ns = answer(ss, ids_s, est_s);
    CHECK(ne == ns && ne > 0);
    CHECK(memcmp(ids_e, ids_s, ne * sizeof *ids_e) == 0);
    CHECK(memcmp(est_e, est_s, ne * sizeof *est_e) == 0);
    CHECK(bs_segment_check_compatible(se, ss, &err) == BS_OK);

    /* Merge and remap: flags 0 exports a self-contained file equal to the
     * one built so; the flag keeps them out, equal to the external build. */
    const bs_segment *in[1] = {se};
    CHECK(bs_segment_merge(in, 1, UUID, tpath("m0.bsseg"), &err) == BS_OK);
    CHECK(test_files_equal(tpath("m0.bsseg"), self));
    CHECK(bs_segment_merge_flags(in, 1, UUID, tpath("m1.bsseg"), BS_WRITE_EXTERNAL_CENTROIDS,
                                 &err) == BS_OK);
    CHECK(test_files_equal(tpath("m1.bsseg"), ext));
    const bs_segment *in_s[1] = {ss};
    CHECK(bs_segment_merge_flags(in_s, 1, UUID, tpath("m2.bsseg"),
                                 BS_WRITE_EXTERNAL_CENTROIDS, &err) == BS_OK);
    CHECK(test_files_equal(tpath("m2.bsseg"), ext));
    CHECK(bs_segment_merge_flags(in, 1, UUID, tpath("m3.bsseg"), 6, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "write flags 0x6 has unknown bits 0x6") == 0, "%s",
              err.message);
    uint64_t map[300];
    for (uint64_t i = 0; i < 300; i++) map[i] = i < 150 ? (3ull << 32) | i : (8ull << 32) | (i - 150);
    static const uint64_t ids[2] = {3, 8}, rows[2] = {150, 150};
    bs_remap_input ri = {se, map, 300};
    CHECK(bs_segment_remap_flags(&ri, 1, ids, rows, 2, NULL, UUID, tpath("r1.bsseg"),
                                 BS_WRITE_EXTERNAL_CENTROIDS, &err) == BS_OK);
    CHECK(test_files_equal(tpath("r1.bsseg"), ext));

    /* The flag in a version 2 file (which had no flags) is corruption; an
     * unknown bit stays reserved. */
    bs_segment *bad = NULL;
    void *al = NULL;
    CHECK(posix_memalign(&al, 64, le) == 0);
    memcpy(al, be, le);
    bs_store_u32((uint8_t *)al + BS_HDR_FLAGS, 3);
    bs_store_u64((uint8_t *)al + hs - 8, bs_hash64(al, hs - 8, 0));
    CHECK(bs_segment_open_with_centroids(al, le, g_cent, K_ * D_, &bad, &err) ==
          BS_ERR_CORRUPT);
    CHECK_MSG(strcmp(err.message, "reserved flag bits 0x2 are set") == 0, "%s", err.message);
    /* A self-contained file whose flag is set but whose artifacts are
     * still there: the section's size is wrong. */
    free(al);
    al = NULL;
    CHECK(posix_memalign(&al, 64, ls) == 0);
    memcpy(al, bs, ls);
    bs_store_u32((uint8_t *)al + BS_HDR_FLAGS, 1);
    bs_store_u64((uint8_t *)al + hs - 8, bs_hash64(al, hs - 8, 0));
    CHECK(bs_segment_open_with_centroids(al, ls, g_cent, K_ * D_, &bad, &err) ==
          BS_ERR_CORRUPT);
    snprintf(msg, sizeof msg, "artifacts section is %llu bytes, expected 0",
             (unsigned long long)art);
    CHECK_MSG(strcmp(err.message, msg) == 0, "%s", err.message);
    free(al);

    bs_segment_free(se);
    bs_segment_free(ss);
    free(bs);
    free(be);
}

int main(void) {
    if (test_make_dir(g_dir, sizeof g_dir, "external") != 0) return 2;
    make_data();
    test_bits(1);
    test_bits(4);
    test_bits(9);
    bs_error err;
    CHECK(bs_builder_set_write_flags(NULL, 0, &err) == BS_ERR_INVALID_ARGUMENT);
    if (test_remove_dir(g_dir) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    if (!bs_test_failures) printf("test_external: all checks passed\n");
    TEST_MAIN_END();
}
