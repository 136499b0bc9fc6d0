/* Replays every file of fuzz/corpus/segment_open through the fuzz target's
 * own function, without libFuzzer, so plain ctest keeps the corpus as a
 * regression suite. Files named valid_* must open and verify; trunc_* and
 * flip_* must be refused by the open or, for a format 3 partition, by
 * bs_segment_verify. valid_v2_X (format 2, written before format 3) must
 * upgrade to valid_X byte for byte. ext_* files (external centroids) are
 * refused alone and open and verify with the fuzz target's given centroids.
 * The corpus is located through
 * BS_SOURCE_DIR (set by CMake). */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testing.h"

#include "../../fuzz/fuzz_segment_open.c"

static int starts(const char *s, const char *p) {
    return strncmp(s, p, strlen(p)) == 0;
}

typedef struct counts {
    int valid, refused;
} counts;

static void replay(const char *name, const uint8_t *data, size_t len, void *ctx) {
    counts *c = ctx;
    LLVMFuzzerTestOneInput(data, len);
    bs_segment *seg = NULL;
    bs_error err;
    bs_status st = bs_segment_open(data, len, &seg, &err);
    if (st == BS_OK) st = bs_segment_verify(seg, &err);
    if (starts(name, "valid_")) {
        CHECK_MSG(st == BS_OK, "%s: %s", name, err.message);
        c->valid++;
    } else if (starts(name, "ext_")) {
        /* External centroids: refused alone, opened with the given ones. */
        CHECK_MSG(st == BS_ERR_INVALID_ARGUMENT, "%s opened alone with %s", name,
                  bs_status_name(st));
        bs_segment_info info;
        size_t n = 0;
        float *given = NULL;
        if (len >= 128) {
            n = (size_t)bs_load_u32(data + 44) * bs_load_u32(data + 24);
            given = malloc((n ? n : 1) * sizeof *given);
            for (size_t i = 0; given && i < n; i++) given[i] = bs_fuzz_given_value(i);
        }
        bs_segment *ext = NULL;
        st = bs_segment_open_with_centroids(data, len, given, n, &ext, &err);
        if (st == BS_OK) st = bs_segment_verify(ext, &err);
        CHECK_MSG(st == BS_OK, "%s: %s", name, err.message);
        if (ext) {
            bs_segment_get_info(ext, &info);
            CHECK(info.external_centroids == 1);
        }
        bs_segment_free(ext);
        free(given);
        c->valid++;
    } else if (starts(name, "trunc_") || starts(name, "flip_")) {
        CHECK_MSG(st == BS_ERR_CORRUPT || st == BS_ERR_UNSUPPORTED_VERSION,
                  "%s opened with %s", name, bs_status_name(st));
        c->refused++;
    }
    bs_segment_free(seg);
}

#ifdef BS_SOURCE_DIR
#define CORPUS BS_SOURCE_DIR "/fuzz/corpus/segment_open/"

/* Format 2 seed valid_v2_<name>, opened (converted at open) and written
 * again by a one-input merge under its own uuid, equals the format 3 seed
 * valid_<name> that the same builder calls wrote: an upgrade without
 * re-encoding is byte-identical to a format 3 build of the same rows. */
static void check_upgrade(const char *name) {
    char p2[512], p3[512], out[512];
    snprintf(p2, sizeof p2, CORPUS "valid_v2_%s", name);
    snprintf(p3, sizeof p3, CORPUS "valid_%s", name);
    snprintf(out, sizeof out, "test_fuzz_corpus_upgrade_%s.bsseg", name);
    size_t l2 = 0, l3 = 0, lo = 0;
    uint8_t *b2 = test_read_file(p2, &l2), *b3 = test_read_file(p3, &l3);
    CHECK_MSG(b2 != NULL && b3 != NULL, "%s: seeds missing", name);
    bs_segment *seg = NULL;
    bs_error err;
    if (b2 != NULL && b3 != NULL) {
        CHECK_MSG(bs_segment_open(b2, l2, &seg, &err) == BS_OK, "%s: %s", name, err.message);
        bs_segment_info info;
        if (seg != NULL) {
            bs_segment_get_info(seg, &info);
            CHECK(info.format_version == 2);
            const bs_segment *in[1] = {seg};
            CHECK_MSG(bs_segment_merge(in, 1, info.uuid, out, &err) == BS_OK, "%s: %s", name,
                      err.message);
            uint8_t *bo = test_read_file(out, &lo);
            CHECK_MSG(bo != NULL && lo == l3 && memcmp(bo, b3, l3) == 0,
                      "%s: the upgrade (%zu bytes) differs from the format 3 build (%zu)",
                      name, lo, l3);
            free(bo);
            remove(out);
        }
    }
    bs_segment_free(seg);
    free(b2);
    free(b3);
}
#endif

int main(void) {
#ifndef BS_SOURCE_DIR
    printf("test_fuzz_corpus: skipped: BS_SOURCE_DIR is not defined\n");
    return 77;
#else
    counts c = {0, 0};
    int files = test_replay_dir(BS_SOURCE_DIR "/fuzz/corpus/segment_open", replay, &c);
    if (files < 0) TEST_MAIN_END();
    CHECK_MSG(c.valid > 0 && c.refused > 0, "corpus has %d valid and %d refused files",
              c.valid, c.refused);
    const char *upgraded[] = {"l2_b1_fast", "cos_b3_matrix", "dot_b9_fast", "empty", "merged"};
    for (size_t i = 0; i < sizeof upgraded / sizeof upgraded[0]; i++) check_upgrade(upgraded[i]);
    printf("test_fuzz_corpus: %d files (%d valid, %d refused, the rest fuzzer "
           "finds)\n",
           files, c.valid, c.refused);
    TEST_MAIN_END();
#endif
}
