/* A tiny test harness: CHECK records a failure and continues; main returns
 * the failure count. */
#ifndef BS_TESTING_H
#define BS_TESTING_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "bitshard.h"

extern int bs_test_failures;

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,   \
                    #cond);                                                    \
            bs_test_failures++;                                                \
        }                                                                      \
    } while (0)

#define CHECK_MSG(cond, ...)                                                   \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__,   \
                    #cond);                                                    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
            bs_test_failures++;                                                \
        }                                                                      \
    } while (0)

/* Deterministic test randomness (splitmix64). */
uint64_t test_rand_u64(uint64_t *state);
/* Uniform in [0, 1). */
double test_rand_uniform(uint64_t *state);
/* Standard normal. */
double test_rand_normal(uint64_t *state);

/* The whole file in a 64-byte aligned buffer (as the segment reader wants
 * it; free() it), or NULL. An empty file gives a 1-byte buffer and len 0. */
uint8_t *test_read_file(const char *path, size_t *len);

/* Calls each(name, data, len, ctx) for every file of dir not starting with
 * '.', the bytes 64-byte aligned and freed after the call (a corpus replay
 * without libFuzzer). Returns the number of files, or -1 (with a failed
 * CHECK) when dir cannot be opened. */
int test_replay_dir(const char *dir,
                    void (*each)(const char *name, const uint8_t *data, size_t len, void *ctx),
                    void *ctx);

/* Makes the directory /tmp/bs_test_<name>_<pid> (mkdir -p) and writes its
 * path to dir (cap bytes); 0 on success. */
int test_make_dir(char *dir, size_t cap, const char *name);
/* Removes dir and everything in it (rm -rf); 0 on success. */
int test_remove_dir(const char *dir);

/* dir/name in one of 8 rotating static buffers (so a call can take a few
 * paths at once). */
const char *test_path(const char *dir, const char *name);

/* 1 when both files can be read and hold the same bytes; when they differ,
 * prints both sizes and the first differing offset. */
int test_files_equal(const char *a, const char *b);

/* An exactly sized 64-byte-aligned copy of src (free() it), or NULL: ASan
 * then catches any read past len, which a rounded-up allocation would hide. */
uint8_t *test_aligned_copy(const uint8_t *src, size_t len);

/* A segment file read whole into a 64-byte aligned buffer and opened over
 * it: the bytes must outlive the handle. */
typedef struct test_loaded {
    uint8_t *data;
    size_t len;
    bs_segment *seg;
} test_loaded;

/* Reads path and opens it (err may be NULL): BS_ERR_IO when the file cannot
 * be read, else bs_segment_open's status. Release with test_unload, whatever
 * the status. */
bs_status test_load(const char *path, test_loaded *out, bs_error *err);
/* Frees the handle and the bytes, and clears both. */
void test_unload(test_loaded *l);

/* A segment spec with the fields every test sets (the fast rotation, column
 * "vec"); the arrays are borrowed, not copied. */
bs_segment_spec test_segment_spec(uint32_t dim, uint32_t bits, bs_metric metric,
                                  uint64_t rotation_seed, const float *centroids,
                                  uint32_t num_partitions, const uint8_t *uuid,
                                  const uint64_t *fragment_ids,
                                  const uint64_t *fragment_rows, uint32_t num_fragments);

/* Search parameters: k, nprobes, eps0 1.9 (the library's documented
 * bound width) and every other field zero. */
bs_search_params test_search_params(uint32_t k, uint32_t nprobes);

/* Copies the first min(bs_candidates_size(c), cap) candidates of c (row
 * ids, estimates, lower bounds) into the arrays; returns how many. */
size_t test_copy_candidates(const bs_candidates *c, size_t cap, uint64_t *rows, float *est,
                            float *lb);

#define TEST_MAIN_END()                                                        \
    do {                                                                       \
        if (bs_test_failures)                                                  \
            fprintf(stderr, "%d check(s) failed\n", bs_test_failures);         \
        return bs_test_failures ? 1 : 0;                                       \
    } while (0)

#endif
