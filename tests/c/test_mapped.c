/* Segments declared as file mappings (bs_segment_set_mapped): verify and
 * merge drop each partition's pages once read, so the process keeps a few
 * pages of each input resident instead of the whole file (measured from
 * /proc/self/smaps on Linux), and the bytes they produce are the same as
 * without the declaration (a merge of mapped inputs equals the single build
 * of the union). The declaration is refused on a NULL segment, a buffer off
 * a page boundary and a prefix open, each with its message, and accepted
 * (changing nothing) on a version 2 file, which is converted at open. */
#define _DEFAULT_SOURCE 1

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bitshard.h"
#include "testing.h"

/* 8 partitions of about 2,500 rows at 4 bits and 128 dims: about 200 KB
 * (50 pages) each, so a resident partition shows in the counts. */
enum { D = 128, K = 8, N = 20000, BITS = 4 };

static char g_dir[128];
static float *g_x;
static float g_cent[K * D];
static const uint8_t UUID_IN[16] = {7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
static const uint8_t UUID_OUT[16] = {9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2};

static void make_data(void) {
    uint64_t st = 4242;
    g_x = malloc((size_t)N * D * sizeof(float));
    for (int i = 0; i < K * D; i++) g_cent[i] = (float)(3.0 * test_rand_normal(&st));
    for (size_t i = 0; i < (size_t)N; i++) {
        uint32_t c = (uint32_t)(test_rand_u64(&st) % K);
        for (uint32_t j = 0; j < D; j++)
            g_x[i * D + j] = g_cent[c * D + j] + (float)test_rand_normal(&st);
    }
}

/* Fragments [f0, f1) of two fragments of N/2 rows each (ids 5 and 6),
 * written to path with uuid. */
static void build(uint32_t f0, uint32_t f1, const uint8_t *uuid, const char *path) {
    uint64_t ids[2] = {5, 6}, rows[2] = {N / 2, N / 2};
    bs_segment_spec spec =
        test_segment_spec(D, BITS, BS_METRIC_L2, 11, g_cent, K, uuid, ids + f0, rows + f0,
                          f1 - f0);
    bs_segment_builder *b = NULL;
    bs_error err;
    CHECK_MSG(bs_builder_create(&spec, &b, &err) == BS_OK, "%s", err.message);
    if (b == NULL) return;
    uint32_t *offs = malloc((N / 2) * sizeof *offs);
    for (uint32_t i = 0; i < N / 2; i++) offs[i] = i;
    for (uint32_t f = f0; f < f1; f++)
        CHECK(bs_builder_add(b, g_x + (size_t)f * (N / 2) * D, N / 2, f - f0, offs, &err) ==
              BS_OK);
    CHECK_MSG(bs_builder_write(b, path, &err) == BS_OK, "%s", err.message);
    bs_builder_free(b);
    free(offs);
}

typedef struct mapped {
    uint8_t *data;
    size_t len;
    bs_segment *seg;
} mapped;

/* path mapped shared and read-only, and opened. */
static int map_open(const char *path, mapped *m) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        return -1;
    }
    m->len = (size_t)sb.st_size;
    void *p = mmap(NULL, m->len, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return -1;
    m->data = p;
    bs_error err;
    if (bs_segment_open(m->data, m->len, &m->seg, &err) != BS_OK) {
        fprintf(stderr, "open %s: %s\n", path, err.message);
        return -1;
    }
    return 0;
}

static void unmap(mapped *m) {
    bs_segment_free(m->seg);
    if (m->data) munmap(m->data, m->len);
    memset(m, 0, sizeof *m);
}

/* The resident bytes of the mapping starting at addr (Linux: the Rss line
 * of its /proc/self/smaps entry), or -1 where that cannot be read. */
static long long resident(const void *addr) {
#ifdef __linux__
    FILE *f = fopen("/proc/self/smaps", "r");
    if (f == NULL) return -1;
    char line[512];
    int in = 0;
    long long out = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi;
        char dash;
        if (sscanf(line, "%llx%c%llx", &lo, &dash, &hi) == 3 && dash == '-') {
            in = (uintptr_t)lo == (uintptr_t)addr;
            continue;
        }
        long long kb;
        if (in && sscanf(line, "Rss: %lld kB", &kb) == 1) {
            out = kb * 1024;
            break;
        }
    }
    fclose(f);
    return out;
#else
    (void)addr;
    return -1;
#endif
}

static const long long PAGE_SLACK = 4 * 4096;

/* Verify of a mapped file: all of it resident without the declaration,
 * about what the open read with it. */
static void test_verify(const char *path) {
    bs_error err;
    mapped m;
    CHECK(map_open(path, &m) == 0);
    if (m.seg == NULL) return;
    CHECK_MSG(bs_segment_verify(m.seg, &err) == BS_OK, "%s", err.message);
    long long whole = resident(m.data);
    unmap(&m);

    CHECK(map_open(path, &m) == 0);
    if (m.seg == NULL) return;
    long long opened = resident(m.data);
    CHECK_MSG(bs_segment_set_mapped(m.seg, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(bs_segment_verify(m.seg, &err) == BS_OK, "%s", err.message);
    long long after = resident(m.data);
    if (whole >= 0) {
        CHECK_MSG(whole >= (long long)m.len * 9 / 10, "undeclared verify: %lld of %zu resident",
                  whole, m.len);
        CHECK_MSG(after <= opened + PAGE_SLACK,
                  "declared verify: %lld resident after, %lld after the open (file %zu)", after,
                  opened, m.len);
    }
    /* A second verify reads the dropped pages back: same answer. */
    CHECK_MSG(bs_segment_verify(m.seg, &err) == BS_OK, "%s", err.message);
    unmap(&m);
}

/* A merge of two mapped, declared inputs: the file of the single build,
 * each input left with about what its open read. */
static void test_merge(const char *pa, const char *pb, const char *single) {
    bs_error err;
    mapped a, b;
    CHECK(map_open(pa, &a) == 0);
    CHECK(map_open(pb, &b) == 0);
    if (a.seg == NULL || b.seg == NULL) return;
    long long oa = resident(a.data), ob = resident(b.data);
    CHECK(bs_segment_set_mapped(a.seg, &err) == BS_OK);
    CHECK(bs_segment_set_mapped(b.seg, &err) == BS_OK);
    const char *out = test_path(g_dir, "merged.bsseg");
    const bs_segment *in[2] = {a.seg, b.seg};
    CHECK_MSG(bs_segment_merge(in, 2, UUID_OUT, out, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(test_files_equal(out, single), "merge of mapped inputs != single build");
    long long ra = resident(a.data), rb = resident(b.data);
    if (ra >= 0) {
        CHECK_MSG(ra <= oa + PAGE_SLACK, "input a: %lld resident after the merge, %lld after "
                  "the open (file %zu)", ra, oa, a.len);
        CHECK_MSG(rb <= ob + PAGE_SLACK, "input b: %lld resident after the merge, %lld after "
                  "the open (file %zu)", rb, ob, b.len);
    }
    unmap(&a);
    unmap(&b);
}

static void test_refused(const char *path) {
    bs_error err;
    CHECK(bs_segment_set_mapped(NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "segment is NULL") == 0);

    size_t len;
    uint8_t *whole = test_read_file(path, &len);
    CHECK(whole != NULL);
    if (whole == NULL) return;
    /* 64-byte aligned (the reader takes it) but off a page boundary. */
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint8_t *raw = aligned_alloc(page, (len + 64 + page - 1) / page * page);
    memcpy(raw + 64, whole, len);
    bs_segment *seg = NULL;
    CHECK(bs_segment_open(raw + 64, len, &seg, &err) == BS_OK);
    if (seg != NULL) {
        CHECK(bs_segment_set_mapped(seg, &err) == BS_ERR_INVALID_ARGUMENT);
        char want[160];
        snprintf(want, sizeof want,
                 "the segment's buffer at %p does not start on a page boundary (%zu bytes): "
                 "not a file mapping",
                 (void *)(raw + 64), page);
        CHECK_MSG(strcmp(err.message, want) == 0, "%s", err.message);
        /* Refused: verify still works on the caller's memory. */
        CHECK(bs_segment_verify(seg, &err) == BS_OK);
        bs_segment_free(seg);
    }

    uint64_t plen = 0;
    CHECK(bs_segment_prefix_size(whole, len, &plen, &err) == BS_OK);
    bs_segment *pre = NULL;
    CHECK_MSG(bs_segment_open_prefix(whole, (size_t)plen, len, &pre, &err) == BS_OK, "%s",
              err.message);
    if (pre != NULL) {
        CHECK(bs_segment_set_mapped(pre, &err) == BS_ERR_INVALID_ARGUMENT);
        CHECK(strcmp(err.message, "a prefix open holds no mapping of the file: its "
                                  "partitions are the caller's attached buffers") == 0);
        bs_segment_free(pre);
    }
    free(raw);
    free(whole);
}

/* A version 2 file is converted at open into the library's own memory:
 * the declaration is accepted and changes nothing (its verify and its
 * bytes are those of the undeclared open). */
static void test_version2(void) {
    const char *path = BS_SOURCE_DIR "/fuzz/corpus/segment_open/valid_v2_dot_b9_fast";
    mapped m;
    CHECK_MSG(map_open(path, &m) == 0, "%s", path);
    if (m.seg == NULL) return;
    bs_error err;
    CHECK_MSG(bs_segment_set_mapped(m.seg, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(bs_segment_verify(m.seg, &err) == BS_OK, "%s", err.message);
    unmap(&m);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/bs_test_mapped_%d", (int)getpid());
    char cmd[200];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", g_dir);
    if (system(cmd) != 0) return 2;
    make_data();
    const char *pa = test_path(g_dir, "a.bsseg"), *pb = test_path(g_dir, "b.bsseg"),
               *pab = test_path(g_dir, "ab.bsseg");
    build(0, 1, UUID_IN, pa);
    build(1, 2, UUID_IN, pb);
    build(0, 2, UUID_OUT, pab);
    test_verify(pab);
    test_merge(pa, pb, pab);
    test_refused(pab);
    test_version2();
    free(g_x);
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    if (!bs_test_failures) printf("test_mapped: all checks passed\n");
    TEST_MAIN_END();
}
