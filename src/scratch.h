/* Growable scratch buffers, reused across calls (search and probe
 * selection keep theirs in the caller's bs_candidates). Allocation follows
 * alloc.h. Internal. */
#ifndef BS_SCRATCH_H
#define BS_SCRATCH_H

#include <stdint.h>

#include "alloc.h"

/* Grows *ptr to hold at least need elements (doubling from 64, so a
 * buffer reused across queries settles at its largest size). *cap only
 * ever grows: a query that needs 0 elements keeps the buffer it has. On
 * failure (0) *ptr and *cap are unchanged and still valid. */
static inline int bs_grow(void **ptr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap && *ptr != NULL) return 1;
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        if (n > SIZE_MAX / 2) {
            n = need;
            break;
        }
        n *= 2;
    }
    void *p = bs_realloc(*ptr, n, elem);
    if (p == NULL) return 0;
    *ptr = p;
    *cap = n;
    return 1;
}

/* *ptr resized to cap elements: a buffer sized alongside another one's
 * capacity (cap >= 1 after a successful bs_grow). 0 when out of memory,
 * *ptr then unchanged. */
static inline int bs_match_cap(void **ptr, size_t cap, size_t elem) {
    void *p = bs_realloc(*ptr, cap, elem);
    if (p == NULL) return 0;
    *ptr = p;
    return 1;
}

#endif
