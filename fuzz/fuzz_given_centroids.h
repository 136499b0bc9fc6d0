/* The centroids the segment reader's fuzz target hands to
 * bs_segment_open_with_centroids for a file with external centroids
 * (docs/format.md, "External centroids"): value i of a k x dim array, the
 * same in the target, the corpus generator (the ext_* seeds are built with
 * them) and tests/c/test_fuzz_corpus.c. */
#ifndef BS_FUZZ_GIVEN_CENTROIDS_H
#define BS_FUZZ_GIVEN_CENTROIDS_H

#include <stddef.h>

/* The target gives no centroids when the header asks for more floats than
 * this (a fuzzed k x dim can be 2^64; the reader refuses such a header
 * before it reads any centroid). */
#define BS_FUZZ_MAX_GIVEN ((size_t)1 << 20)

static inline float bs_fuzz_given_value(size_t i) {
    return (float)((int)(i % 13) - 6) * 0.375f;
}

#endif
