/* The k smallest of a stream, and the candidate list's ordering: a bounded
 * max-heap of floats for the search's thresholds, and a partial sort of
 * candidates by (estimate or lower bound, row id). Internal. */
#ifndef BS_TOPK_H
#define BS_TOPK_H

#include <stddef.h>
#include <stdint.h>

/* One code that passed stage 1. */
typedef struct bs_cand {
    uint64_t rowid;   /* valid once resolved (bs_search's last stages) */
    float est;        /* the estimate: stage 1's, then the full code's */
    float lb;         /* stage 1's lower bound */
    uint32_t ordinal; /* segment-local row ordinal (bs_segment_rowid) */
    uint32_t seg;     /* the searcher's segment */
    uint32_t probe;   /* index into the probed partition list */
    uint32_t index;   /* position inside the partition */
} bs_cand;

/* Max-heap of the k smallest values offered so far: heap[0] is the k-th
 * smallest once *n == k. Inline: the stage-1 scan offers one value per
 * admitted code. */
static inline void bs_heap_push_bounded(float *heap, size_t *n, size_t k, float v) {
    if (*n < k) {
        size_t i = (*n)++;
        heap[i] = v;
        while (i > 0) {
            size_t parent = (i - 1) / 2;
            if (heap[parent] >= heap[i]) break;
            float t = heap[parent];
            heap[parent] = heap[i];
            heap[i] = t;
            i = parent;
        }
        return;
    }
    if (v >= heap[0]) return;
    heap[0] = v;
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && heap[l] > heap[m]) m = l;
        if (r < *n && heap[r] > heap[m]) m = r;
        if (m == i) break;
        float t = heap[m];
        heap[m] = heap[i];
        heap[i] = t;
        i = m;
    }
}

/* Puts the m best of a[0..n) first, sorted by (lb if by_lb else est, row
 * id); the rest are left in any order. Row ids are unique, so the m best
 * and their order are the same whatever the algorithm. */
void bs_sort_best(bs_cand *a, size_t n, size_t m, int by_lb);

#endif
