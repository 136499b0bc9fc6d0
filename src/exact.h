/* The exact distances of bs_exact_distances (bitshard.h), for the tests:
 * the reference (one element at a time) and the SSE2 version the library
 * runs on x86-64, which must give the same bits. Neither checks its
 * arguments. */
#ifndef BS_EXACT_H
#define BS_EXACT_H

#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

void bs_exact_distances_ref(bs_metric metric, const float *q, const float *x, size_t n,
                            uint32_t dim, float *out);
void bs_exact_distances_sse2(bs_metric metric, const float *q, const float *x, size_t n,
                             uint32_t dim, float *out);

#endif
