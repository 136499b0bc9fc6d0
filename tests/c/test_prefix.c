/* Opening a segment from its prefix and attaching partitions one by one
 * (docs/format.md, "Opening from a prefix"): the prefix is exactly the
 * header, artifacts, fragment table and directory; a search over attached
 * partitions answers bit for bit as over the whole file; an unattached
 * probe, a corrupt range, a wrong length and a format 2 file in part are
 * refused with their statuses and messages. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "format.h"
#include "testing.h"

enum { D = 40, K = 12, N = 900, NQ = 25 };

static char g_dir[128];
static float g_x[N * D];
static float g_q[NQ * D];
static float g_cent[K * D];
static const uint8_t UUID[16] = {0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xcd};
static const char *UUID_HEX = "ab0102030405060708090a0b0c0d0ecd";

static void make_data(void) {
    uint64_t st = 777;
    for (int i = 0; i < N * D; i++) g_x[i] = (float)test_rand_normal(&st);
    for (int i = 0; i < K; i++) memcpy(g_cent + i * D, g_x + (i * 61) * D, D * sizeof(float));
    for (int i = 0; i < NQ * D; i++) g_q[i] = (float)test_rand_normal(&st);
}

/* A segment of N rows in two fragments, written and read back whole. */
static uint8_t *build(uint32_t bits, bs_metric metric, size_t *len) {
    uint64_t ids[2] = {3, 8}, rows[2] = {N / 2, N / 2};
    bs_segment_spec spec = test_segment_spec(D, bits, metric, 5, g_cent, K, UUID, ids, rows, 2);
    bs_segment_builder *b = NULL;
    bs_error err;
    CHECK(bs_builder_create(&spec, &b, &err) == BS_OK);
    uint32_t offs[N / 2];
    for (uint32_t i = 0; i < N / 2; i++) offs[i] = i;
    for (uint32_t f = 0; f < 2; f++)
        CHECK(bs_builder_add(b, g_x + (size_t)f * (N / 2) * D, N / 2, f, offs, &err) == BS_OK);
    char path[256];
    snprintf(path, sizeof path, "%s/seg_%u_%d", g_dir, bits, (int)metric);
    CHECK(bs_builder_write(b, path, &err) == BS_OK);
    bs_builder_free(b);
    uint8_t *buf = test_read_file(path, len);
    unlink(path);
    return buf;
}


/* The candidates of every query, flattened, for a bitwise comparison. */
typedef struct {
    size_t n[NQ];
    uint64_t rows[NQ][N];
    float est[NQ][N], lb[NQ][N];
} results;

static bs_status run(const bs_segment *seg, const bs_search_params *p, results *out,
                     bs_error *err) {
    bs_searcher *s = NULL;
    bs_status st = bs_searcher_create(&seg, 1, &s, err);
    if (st != BS_OK) return st;
    bs_candidates *c = bs_candidates_new();
    for (int qi = 0; qi < NQ && st == BS_OK; qi++) {
        st = bs_search(s, g_q + qi * D, p, c, NULL, err);
        if (st != BS_OK) break;
        size_t n = bs_candidates_size(c);
        CHECK(n <= N);
        out->n[qi] = test_copy_candidates(c, N, out->rows[qi], out->est[qi], out->lb[qi]);
    }
    bs_candidates_free(c);
    bs_searcher_free(s);
    return st;
}

static int same(const results *a, const results *b) {
    for (int qi = 0; qi < NQ; qi++)
        if (a->n[qi] != b->n[qi] || memcmp(a->rows[qi], b->rows[qi], a->n[qi] * 8) ||
            memcmp(a->est[qi], b->est[qi], a->n[qi] * 4) ||
            memcmp(a->lb[qi], b->lb[qi], a->n[qi] * 4))
            return 0;
    return 1;
}

static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Partition bytes copied out of the file into their own aligned buffers:
 * what a ranged GET gives. */
typedef struct {
    uint8_t *bytes[K];
} parts;

static void attach_probed(bs_segment *seg, const uint8_t *file, parts *pp, uint32_t nprobes) {
    bs_searcher *s = NULL;
    bs_error err;
    const bs_segment *one = seg;
    CHECK(bs_searcher_create(&one, 1, &s, &err) == BS_OK);
    bs_candidates *c = bs_candidates_new();
    for (int qi = 0; qi < NQ; qi++) {
        uint32_t probes[K], n = 0;
        CHECK(bs_search_probes(s, g_q + qi * D, nprobes, c, probes, &n, &err) == BS_OK);
        CHECK(n == (nprobes < K ? nprobes : K));
        for (uint32_t i = 0; i < n; i++) {
            uint32_t p = probes[i];
            if (bs_segment_partition_attached(seg, p)) continue;
            uint64_t off = 0, size = 0;
            CHECK(bs_segment_partition_range(seg, p, &off, &size, &err) == BS_OK);
            pp->bytes[p] = test_aligned_copy(file + off, (size_t)size);
            CHECK_MSG(bs_segment_attach(seg, p, pp->bytes[p], (size_t)size, &err) == BS_OK,
                      "%s", err.message);
        }
    }
    bs_candidates_free(c);
    bs_searcher_free(s);
}

static void free_parts(parts *pp) {
    for (int p = 0; p < K; p++) free(pp->bytes[p]);
    memset(pp, 0, sizeof *pp);
}

/* The prefix: its size from the first bytes, then an open of exactly it. */
static bs_segment *open_prefix(const uint8_t *file, size_t len, uint8_t **prefix_out) {
    bs_error err;
    uint64_t need = 0;
    /* Asked with too few bytes, it names the smallest header first. */
    CHECK(bs_segment_prefix_size(file, 10, &need, &err) == BS_OK);
    CHECK(need == 256);
    CHECK(bs_segment_prefix_size(file, (size_t)need, &need, &err) == BS_OK);
    uint64_t dir_end = bs_load_u64(file + BS_HDR_DIRECTORY) + bs_load_u64(file + BS_HDR_DIRECTORY + 8);
    CHECK(need == dir_end);
    CHECK(need < len);
    uint64_t again = 0;
    CHECK(bs_segment_prefix_size(file, len, &again, &err) == BS_OK && again == need);
    uint8_t *prefix = test_aligned_copy(file, (size_t)need);
    bs_segment *seg = NULL;
    CHECK_MSG(bs_segment_open_prefix(prefix, (size_t)need, len, &seg, &err) == BS_OK, "%s",
              err.message);
    *prefix_out = prefix;
    return seg;
}

static void test_same_answers(uint32_t bits, bs_metric metric) {
    size_t len = 0;
    uint8_t *file = build(bits, metric, &len);
    bs_error err;
    bs_segment *whole = NULL;
    CHECK(bs_segment_open(file, len, &whole, &err) == BS_OK);
    uint8_t *prefix = NULL;
    bs_segment *seg = open_prefix(file, len, &prefix);
    bs_segment_info a, b;
    bs_segment_get_info(whole, &a);
    bs_segment_get_info(seg, &b);
    CHECK(a.num_rows == b.num_rows && a.num_partitions == b.num_partitions);
    for (uint32_t p = 0; p < K; p++) {
        CHECK(!bs_segment_partition_attached(seg, p));
        CHECK(bs_segment_partition_attached(whole, p));
    }
    /* Ranges tile the file after the prefix. */
    uint64_t pos = bs_load_u64(file + BS_HDR_DIRECTORY) + bs_load_u64(file + BS_HDR_DIRECTORY + 8);
    for (uint32_t p = 0; p < K; p++) {
        uint64_t off = 0, size = 0;
        CHECK(bs_segment_partition_range(seg, p, &off, &size, &err) == BS_OK);
        CHECK(off == pos && off % 64 == 0 && size % 64 == 0);
        pos = off + size;
    }
    CHECK(pos == len);
    uint64_t o, z;
    CHECK(bs_segment_partition_range(seg, K, &o, &z, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "partition 12 is out of range: the segment has 12") == 0);

    bs_search_params sp = test_search_params(10, 3);
    results *r1 = calloc(1, sizeof *r1), *r2 = calloc(1, sizeof *r2);
    /* Nothing attached: the first probe is refused, naming segment and
     * partition. */
    CHECK(run(seg, &sp, r2, &err) == BS_ERR_INVALID_ARGUMENT);
    char want[160];
    snprintf(want, sizeof want, "segment %s: partition ", UUID_HEX);
    CHECK_MSG(starts_with(err.message, want) &&
                  strstr(err.message, " is not attached (the segment was opened from its "
                                      "prefix: attach the partition's bytes before a search "
                                      "probes it)") != NULL,
              "%s", err.message);
    CHECK(bs_segment_verify(seg, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(isnan(bs_segment_residual_sum(seg)));

    parts pp;
    memset(&pp, 0, sizeof pp);
    attach_probed(seg, file, &pp, sp.nprobes);
    CHECK(run(whole, &sp, r1, &err) == BS_OK);
    CHECK_MSG(run(seg, &sp, r2, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(same(r1, r2), "bits %u metric %d: prefix answers differ", bits, (int)metric);

    /* Detach one, the search fails again; re-attach, same answers. */
    uint32_t first = 0;
    while (first < K && !bs_segment_partition_attached(seg, first)) first++;
    CHECK(first < K);
    CHECK(bs_segment_detach(seg, first, &err) == BS_OK);
    CHECK(!bs_segment_partition_attached(seg, first));
    CHECK(bs_segment_detach(seg, first, &err) == BS_ERR_INVALID_ARGUMENT);
    uint64_t off = 0, size = 0;
    CHECK(bs_segment_partition_range(seg, first, &off, &size, &err) == BS_OK);
    CHECK(bs_segment_attach(seg, first, pp.bytes[first], (size_t)size, &err) == BS_OK);
    CHECK(bs_segment_attach(seg, first, pp.bytes[first], (size_t)size, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(
          strstr(err.message, "is already attached") != NULL);
    CHECK(run(seg, &sp, r2, &err) == BS_OK && same(r1, r2));

    /* Everything attached: verify passes, residual sums agree, and a full
     * probe search answers as the whole file. */
    for (uint32_t p = 0; p < K; p++) {
        if (bs_segment_partition_attached(seg, p)) continue;
        CHECK(bs_segment_partition_range(seg, p, &off, &size, &err) == BS_OK);
        pp.bytes[p] = test_aligned_copy(file + off, (size_t)size);
        CHECK(bs_segment_attach(seg, p, pp.bytes[p], (size_t)size, &err) == BS_OK);
    }
    CHECK_MSG(bs_segment_verify(seg, &err) == BS_OK, "%s", err.message);
    CHECK(bs_segment_residual_sum(seg) == bs_segment_residual_sum(whole));
    sp.nprobes = K;
    CHECK(run(whole, &sp, r1, &err) == BS_OK);
    CHECK(run(seg, &sp, r2, &err) == BS_OK && same(r1, r2));

    free(r1);
    free(r2);
    bs_segment_free(seg);
    free_parts(&pp);
    bs_segment_free(whole);
    free(prefix);
    free(file);
}

static void test_refusals(void) {
    size_t len = 0;
    uint8_t *file = build(4, BS_METRIC_L2, &len);
    bs_error err;
    uint8_t *prefix = NULL;
    bs_segment *seg = open_prefix(file, len, &prefix);
    uint64_t need = bs_load_u64(file + BS_HDR_DIRECTORY) + bs_load_u64(file + BS_HDR_DIRECTORY + 8);

    /* The busiest partition, with a flipped byte in each region. */
    uint32_t p = 0;
    uint64_t off = 0, size = 0, best = 0;
    for (uint32_t i = 0; i < K; i++) {
        CHECK(bs_segment_partition_range(seg, i, &off, &size, &err) == BS_OK);
        if (size > best) {
            best = size;
            p = i;
        }
    }
    CHECK(bs_segment_partition_range(seg, p, &off, &size, &err) == BS_OK);
    uint8_t *bytes = test_aligned_copy(file + off, (size_t)size);
    bytes[100] ^= 1;
    char want[200];
    snprintf(want, sizeof want,
             "segment %s: partition %u checksum mismatch (stage-1 region: stored ", UUID_HEX, p);
    CHECK(bs_segment_attach(seg, p, bytes, (size_t)size, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, want), "%s", err.message);
    CHECK(!bs_segment_partition_attached(seg, p));
    bytes[100] ^= 1;
    bytes[size - 1] ^= 0x80; /* the end of s_full, in the extra region */
    snprintf(want, sizeof want,
             "segment %s: partition %u checksum mismatch (extra region: stored ", UUID_HEX, p);
    CHECK(bs_segment_attach(seg, p, bytes, (size_t)size, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, want), "%s", err.message);
    bytes[size - 1] ^= 0x80;
    /* Wrong length, unaligned, out of range. */
    CHECK(bs_segment_attach(seg, p, bytes, (size_t)size - 64, &err) == BS_ERR_INVALID_ARGUMENT);
    snprintf(want, sizeof want, "partition %u is %llu bytes, %llu given", p,
             (unsigned long long)size, (unsigned long long)size - 64);
    CHECK_MSG(strcmp(err.message, want) == 0, "%s", err.message);
    uint8_t *shifted = NULL;
    CHECK(posix_memalign((void **)&shifted, 64, (size_t)size + 64) == 0);
    memcpy(shifted + 8, bytes, (size_t)size);
    CHECK(bs_segment_attach(seg, p, shifted + 8, (size_t)size, &err) == BS_ERR_INVALID_ARGUMENT);
    snprintf(want, sizeof want, "partition %u: bytes must be 64-byte aligned", p);
    CHECK(strcmp(err.message, want) == 0);
    free(shifted);
    CHECK(bs_segment_attach(seg, K, bytes, (size_t)size, &err) == BS_ERR_INVALID_ARGUMENT);
    /* The good bytes attach. */
    CHECK(bs_segment_attach(seg, p, bytes, (size_t)size, &err) == BS_OK);
    bs_segment_free(seg);
    free(bytes);

    /* A prefix one section short; a prefix longer than the file. */
    bs_segment *bad = NULL;
    CHECK(bs_segment_open_prefix(prefix, (size_t)need - 64, len, &bad, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, "prefix too short: partition directory needs "),
              "%s", err.message);
    CHECK(bad == NULL);
    CHECK(bs_segment_open_prefix(prefix, (size_t)need, need - 1, &bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    /* The file size must be the header's. */
    CHECK(bs_segment_open_prefix(prefix, (size_t)need, len + 64, &bad, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, "64 unexpected bytes after the segment's end"), "%s",
              err.message);
    /* A damaged header: its checksum, before any offset is believed. */
    prefix[BS_HDR_DIRECTORY] ^= 1;
    uint64_t n = 0;
    CHECK(bs_segment_prefix_size(prefix, (size_t)need, &n, &err) == BS_ERR_CORRUPT);
    CHECK(starts_with(err.message, "header checksum mismatch"));
    prefix[BS_HDR_DIRECTORY] ^= 1;
    prefix[0] = 'X';
    CHECK(bs_segment_prefix_size(prefix, (size_t)need, &n, &err) == BS_ERR_CORRUPT);
    CHECK(strcmp(err.message, "bad magic at offset 0: not a bitshard segment") == 0);
    prefix[0] = 'B';

    /* A whole open has nothing to attach or detach. */
    bs_segment *whole = NULL;
    CHECK(bs_segment_open(file, len, &whole, &err) == BS_OK);
    CHECK(bs_segment_attach(whole, 0, file, 64, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "the segment was opened whole: its partitions are in its "
                              "buffer, nothing to attach") == 0);
    CHECK(bs_segment_detach(whole, 0, &err) == BS_ERR_INVALID_ARGUMENT);
    bs_segment_free(whole);
    free(prefix);
    free(file);
}

/* A format 2 file's prefix is the whole file; a part of it is refused. */
static void test_format2(void) {
#ifdef BS_SOURCE_DIR
    size_t len = 0;
    uint8_t *file = test_read_file(BS_SOURCE_DIR "/fuzz/corpus/segment_open/valid_v2_dot_b9_fast",
                                   &len);
    CHECK(file != NULL);
    if (file == NULL) return;
    bs_error err;
    uint64_t need = 0;
    CHECK(bs_segment_prefix_size(file, len, &need, &err) == BS_OK);
    CHECK(need == len);
    bs_segment *seg = NULL;
    CHECK(bs_segment_open_prefix(file, len, len, &seg, &err) == BS_OK);
    CHECK(seg != NULL && bs_segment_partition_attached(seg, 0));
    bs_segment_free(seg);
    CHECK(bs_segment_open_prefix(file, len - 64, len, &seg, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(strstr(err.message, "cannot be opened from a prefix") != NULL ||
                  starts_with(err.message, "prefix too short"),
              "%s", err.message);
    free(file);
#endif
}

int main(void) {
    if (test_make_dir(g_dir, sizeof g_dir, "prefix") != 0) return 1;
    make_data();
    const bs_metric metrics[3] = {BS_METRIC_L2, BS_METRIC_COSINE, BS_METRIC_DOT};
    const uint32_t bits[3] = {1, 4, 9};
    for (int m = 0; m < 3; m++)
        for (int b = 0; b < 3; b++) test_same_answers(bits[b], metrics[m]);
    test_refusals();
    test_format2();
    if (test_remove_dir(g_dir) != 0) bs_test_failures++;
    printf("test_prefix: %d failures\n", bs_test_failures);
    return bs_test_failures != 0;
}
