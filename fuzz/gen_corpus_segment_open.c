/* Writes the seed corpus of fuzz_segment_open: a few small valid segments
 * covering every metric, rotation kind and the 1-bit / multi-bit layouts,
 * a merged one, an empty one, and truncated and byte-flipped copies. Run it
 * again after a format change (see docs/format.md, "Fuzzing"):
 *   gen_corpus_segment_open fuzz/corpus/segment_open
 * Deterministic: the same library writes the same files. The *_v2_* files
 * of the corpus are not written here: they are the format 2 seeds this
 * program wrote before format 3 (kept to test reading and upgrading format
 * 2; valid_v2_<name> must upgrade to valid_<name>, tests/c/test_fuzz_corpus.c),
 * so the valid_ builds below must keep their data and zero identities. */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"
#include "fuzz_given_centroids.h"

static const char *g_out;

static uint64_t rnd(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float rndf(uint64_t *s) {
    return (float)((double)(rnd(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static uint8_t *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void spit(const char *name, const uint8_t *b, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", g_out, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b, 1, len, f) != len) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

static void die(const char *what, const bs_error *err) {
    fprintf(stderr, "%s: %s\n", what, err->message);
    exit(1);
}

/* Builds a segment of nf fragments (ids[i], rows[i]), adding every row.
 * external: written with external centroids, which are then the fuzz
 * target's given ones (bs_fuzz_given_value), not random. */
static void build_ext(const char *name, uint32_t dim, uint32_t bits, bs_metric m,
                      bs_rotation_kind kind, uint32_t k, const uint64_t *ids,
                      const uint64_t *rows, uint32_t nf, uint64_t seed, int external) {
    uint64_t s = seed;
    float *cent = malloc((size_t)k * dim * sizeof(float));
    for (size_t i = 0; i < (size_t)k * dim; i++)
        cent[i] = external ? bs_fuzz_given_value(i) : 4.0f * rndf(&s);
    uint8_t uuid[16];
    for (int i = 0; i < 16; i++) uuid[i] = (uint8_t)rnd(&s);
    bs_segment_spec spec = {dim, bits, m, kind, 7, cent, k, "vec", uuid,
                            ids, rows, nf};
    bs_segment_builder *b = NULL;
    bs_error err;
    if (bs_builder_create(&spec, &b, &err) != BS_OK) die("create", &err);
    if (bs_builder_set_write_flags(b, external ? BS_WRITE_EXTERNAL_CENTROIDS : 0, &err) != BS_OK)
        die("flags", &err);
    for (uint32_t f = 0; f < nf; f++) {
        for (uint64_t o = 0; o < rows[f]; o++) {
            float *x = malloc(dim * sizeof(float));
            uint32_t c = (uint32_t)(rnd(&s) % k), off = (uint32_t)o;
            for (uint32_t j = 0; j < dim; j++)
                x[j] = cent[(size_t)c * dim + j] + rndf(&s);
            if (bs_builder_add(b, x, 1, f, &off, &err) != BS_OK) die("add", &err);
            free(x);
        }
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", g_out, name);
    if (bs_builder_write(b, path, &err) != BS_OK) die("write", &err);
    bs_builder_free(b);
    free(cent);
}

static void build(const char *name, uint32_t dim, uint32_t bits, bs_metric m,
                  bs_rotation_kind kind, uint32_t k, const uint64_t *ids,
                  const uint64_t *rows, uint32_t nf, uint64_t seed) {
    build_ext(name, dim, bits, m, kind, k, ids, rows, nf, seed, 0);
}

/* Truncated and byte-flipped copies of one valid file. */
static void damage(const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/valid_%s", g_out, name);
    size_t len = 0;
    uint8_t *b = slurp(path, &len);
    if (!b) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(1);
    }
    size_t cuts[] = {0, 7, 16, 100, 255, 256, 300, len / 2, len - 64, len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        if (cuts[i] >= len) continue;
        char out[256];
        snprintf(out, sizeof out, "trunc_%s_%zu", name, cuts[i]);
        spit(out, b, cuts[i]);
    }
    /* One flip in each region: version, header field, header checksum,
     * artifacts, directory, last partition. */
    size_t flips[] = {8, 24, 248, 260, len / 2, len - 1};
    for (size_t i = 0; i < sizeof flips / sizeof flips[0]; i++) {
        if (flips[i] >= len) continue;
        b[flips[i]] ^= 0x10;
        char out[256];
        snprintf(out, sizeof out, "flip_%s_%zu", name, flips[i]);
        spit(out, b, len);
        b[flips[i]] ^= 0x10;
    }
    free(b);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
        return 2;
    }
    g_out = argv[1];
    uint64_t ids_a[2] = {3, 1}, rows_a[2] = {20, 15};
    uint64_t ids_b[1] = {9}, rows_b[1] = {40};
    uint64_t ids_c[3] = {4, 5, 6}, rows_c[3] = {6, 0, 4};
    uint64_t ids_d[1] = {2}, rows_d[1] = {12};
    build("valid_l2_b1_fast", 8, 1, BS_METRIC_L2, BS_ROTATION_FAST, 3, ids_a,
          rows_a, 2, 1);
    build("valid_cos_b3_matrix", 8, 3, BS_METRIC_COSINE, BS_ROTATION_MATRIX, 2,
          ids_b, rows_b, 1, 2);
    build("valid_dot_b9_fast", 70, 9, BS_METRIC_DOT, BS_ROTATION_FAST, 4, ids_c,
          rows_c, 3, 3);
    build("valid_empty", 8, 2, BS_METRIC_L2, BS_ROTATION_FAST, 2, NULL, NULL, 0,
          4);
    /* Two segments of one code space (same seed, so same centroids), then
     * their merge. */
    build("part_a", 8, 2, BS_METRIC_L2, BS_ROTATION_FAST, 3, ids_a, rows_a, 2, 5);
    build("part_b", 8, 2, BS_METRIC_L2, BS_ROTATION_FAST, 3, ids_d, rows_d, 1, 5);
    {
        char pa[4096], pb[4096], pm[4096];
        snprintf(pa, sizeof pa, "%s/part_a", g_out);
        snprintf(pb, sizeof pb, "%s/part_b", g_out);
        snprintf(pm, sizeof pm, "%s/valid_merged", g_out);
        size_t la, lb;
        uint8_t *a = slurp(pa, &la), *b = slurp(pb, &lb);
        void *ba = NULL, *bb = NULL;
        if (!a || !b || posix_memalign(&ba, 64, la) || posix_memalign(&bb, 64, lb))
            return 1;
        memcpy(ba, a, la);
        memcpy(bb, b, lb);
        bs_segment *sa = NULL, *sb = NULL;
        bs_error err;
        if (bs_segment_open(ba, la, &sa, &err) != BS_OK) die("open a", &err);
        if (bs_segment_open(bb, lb, &sb, &err) != BS_OK) die("open b", &err);
        const bs_segment *in[2] = {sa, sb};
        uint8_t uuid[16] = {0};
        if (bs_segment_merge(in, 2, uuid, pm, &err) != BS_OK) die("merge", &err);
        bs_segment_free(sa);
        bs_segment_free(sb);
        free(a);
        free(b);
        free(ba);
        free(bb);
        remove(pa);
        remove(pb);
    }
    /* External centroids (header flags bit 0): ext_* seeds open with the
     * fuzz target's given centroids (tests/c/test_fuzz_corpus.c). */
    build_ext("ext_l2_b2_fast", 8, 2, BS_METRIC_L2, BS_ROTATION_FAST, 3, ids_a, rows_a, 2, 6, 1);
    build_ext("ext_cos_b1_matrix", 70, 1, BS_METRIC_COSINE, BS_ROTATION_MATRIX, 2, ids_b, rows_b,
              1, 7, 1);
    damage("l2_b1_fast");
    damage("cos_b3_matrix");
    damage("dot_b9_fast");
    damage("merged");
    return 0;
}
