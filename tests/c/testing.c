#define _POSIX_C_SOURCE 200809L /* posix_memalign */
#include "testing.h"

#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int bs_test_failures = 0;

uint64_t test_rand_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double test_rand_uniform(uint64_t *state) {
    return (double)(test_rand_u64(state) >> 11) * (1.0 / 9007199254740992.0);
}

double test_rand_normal(uint64_t *state) {
    double u1 = test_rand_uniform(state), u2 = test_rand_uniform(state);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint8_t *test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = NULL;
    if (n < 0 || posix_memalign(&p, 64, n ? (size_t)n : 1) != 0) {
        fclose(f);
        return NULL;
    }
    if (fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return p;
}

int test_make_dir(char *dir, size_t cap, const char *name) {
    snprintf(dir, cap, "/tmp/bs_test_%s_%d", name, (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    return system(cmd) != 0;
}

int test_remove_dir(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) != 0;
}

const char *test_path(const char *dir, const char *name) {
    static char buf[8][512];
    static int slot = 0;
    slot = (slot + 1) % 8;
    snprintf(buf[slot], sizeof buf[slot], "%s/%s", dir, name);
    return buf[slot];
}

int test_files_equal(const char *a, const char *b) {
    size_t la = 0, lb = 0;
    uint8_t *x = test_read_file(a, &la), *y = test_read_file(b, &lb);
    int eq = x && y && la == lb && memcmp(x, y, la) == 0;
    if (x && y && !eq) {
        size_t i = 0;
        while (i < la && i < lb && x[i] == y[i]) i++;
        fprintf(stderr, "  %s (%zu bytes) and %s (%zu bytes) differ at %zu\n",
                a, la, b, lb, i);
    }
    free(x);
    free(y);
    return eq;
}

uint8_t *test_aligned_copy(const uint8_t *src, size_t len) {
    void *p = NULL;
    if (posix_memalign(&p, 64, len ? len : 1) != 0) return NULL;
    if (len) memcpy(p, src, len);
    return p;
}

bs_status test_load(const char *path, test_loaded *out, bs_error *err) {
    out->seg = NULL;
    out->data = test_read_file(path, &out->len);
    if (out->data == NULL) return BS_ERR_IO;
    return bs_segment_open(out->data, out->len, &out->seg, err);
}

void test_unload(test_loaded *l) {
    bs_segment_free(l->seg);
    free(l->data);
    l->seg = NULL;
    l->data = NULL;
}

bs_segment_spec test_segment_spec(uint32_t dim, uint32_t bits, bs_metric metric,
                                  uint64_t rotation_seed, const float *centroids,
                                  uint32_t num_partitions, const uint8_t *uuid,
                                  const uint64_t *fragment_ids,
                                  const uint64_t *fragment_rows, uint32_t num_fragments) {
    bs_segment_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.dim = dim;
    spec.num_bits = bits;
    spec.metric = metric;
    spec.rotation_kind = BS_ROTATION_FAST;
    spec.rotation_seed = rotation_seed;
    spec.centroids = centroids;
    spec.num_partitions = num_partitions;
    spec.column = "vec";
    spec.uuid = uuid;
    spec.fragment_ids = fragment_ids;
    spec.fragment_rows = fragment_rows;
    spec.num_fragments = num_fragments;
    return spec;
}

bs_search_params test_search_params(uint32_t k, uint32_t nprobes) {
    bs_search_params p;
    memset(&p, 0, sizeof p);
    p.k = k;
    p.nprobes = nprobes;
    p.eps0 = 1.9f;
    return p;
}

size_t test_copy_candidates(const bs_candidates *c, size_t cap, uint64_t *rows, float *est,
                            float *lb) {
    size_t n = bs_candidates_size(c);
    if (n > cap) n = cap;
    memcpy(rows, bs_candidates_rowids(c), n * sizeof *rows);
    memcpy(est, bs_candidates_estimates(c), n * sizeof *est);
    memcpy(lb, bs_candidates_lower_bounds(c), n * sizeof *lb);
    return n;
}

int test_replay_dir(const char *dir,
                    void (*each)(const char *name, const uint8_t *data, size_t len, void *ctx),
                    void *ctx) {
    DIR *d = opendir(dir);
    CHECK_MSG(d != NULL, "cannot open %s", dir);
    if (d == NULL) return -1;
    int files = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        size_t len = 0;
        uint8_t *data = test_read_file(path, &len);
        CHECK_MSG(data != NULL, "cannot read %s", path);
        if (data == NULL) continue;
        files++;
        each(e->d_name, data, len, ctx);
        free(data);
    }
    closedir(d);
    return files;
}
