/* Internal entry points of search.c, for the tests. */
#ifndef BS_SEARCH_INTERNAL_H
#define BS_SEARCH_INTERNAL_H

#include "bitshard.h"

/* The nprobe partitions bs_search would scan for the (already normalised,
 * for cosine) query q, in scan order: through the float16 pre-pass where
 * the searcher has it (exact = 0) or by the full float scan (exact = 1).
 * out: nprobe ids (nprobe <= num_partitions). */
bs_status bs_searcher_probes(const bs_searcher *s, bs_candidates *c, const float *q,
                             uint32_t nprobe, int exact, uint32_t *out, bs_error *err);

/* 1 when the searcher has the float16 pre-pass. */
int bs_searcher_has_prepass(const bs_searcher *s);

#endif
