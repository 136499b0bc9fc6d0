/* Ordering of the candidate list (topk.h): a quicksort (insertion sort
 * for short runs), a bounded heap for the m best of many, and the gate of
 * the 1-bit rerank. */
#include "topk.h"

#include "bitshard.h"

/* An in-place sort specialised to candidates (qsort's indirect calls cost
 * more than the comparisons). Keys are unique (row ids are), so any correct
 * sort gives the same order. */
static int cand_less(const bs_cand *x, const bs_cand *y, int by_lb) {
    float kx = by_lb ? x->lb : x->est, ky = by_lb ? y->lb : y->est;
    if (kx != ky) return kx < ky;
    return x->rowid < y->rowid;
}

static void sort_cands(bs_cand *a, size_t n, int by_lb) {
    while (n > 16) {
        bs_cand *m = a + n / 2, *last = a + n - 1, t;
        /* median of three into a[0] */
        if (cand_less(m, a, by_lb)) { t = *m; *m = *a; *a = t; }
        if (cand_less(last, a, by_lb)) { t = *last; *last = *a; *a = t; }
        if (cand_less(last, m, by_lb)) { t = *last; *last = *m; *m = t; }
        t = *m; *m = *a; *a = t;
        size_t i = 1, j = n - 1;
        for (;;) {
            while (i < n && cand_less(&a[i], &a[0], by_lb)) i++;
            while (cand_less(&a[0], &a[j], by_lb)) j--;
            if (i >= j) break;
            t = a[i]; a[i] = a[j]; a[j] = t;
            i++;
            j--;
        }
        t = a[0]; a[0] = a[j]; a[j] = t;
        /* recurse into the smaller side, loop on the larger */
        if (j < n - j - 1) {
            sort_cands(a, j, by_lb);
            a += j + 1;
            n -= j + 1;
        } else {
            sort_cands(a + j + 1, n - j - 1, by_lb);
            n = j;
        }
    }
    for (size_t i = 1; i < n; i++) {
        bs_cand x = a[i];
        size_t j = i;
        while (j > 0 && cand_less(&x, &a[j - 1], by_lb)) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

/* Sift-down in a max-heap of candidates (the worst on top). */
static void cand_sift(bs_cand *h, size_t n, size_t i, int by_lb) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && cand_less(&h[m], &h[l], by_lb)) m = l;
        if (r < n && cand_less(&h[m], &h[r], by_lb)) m = r;
        if (m == i) return;
        bs_cand t = h[m];
        h[m] = h[i];
        h[i] = t;
        i = m;
    }
}

/* Puts the m best of a[0..n) first, sorted; the rest are left in any
 * order. When m is small against n a bounded heap beats a full sort: most
 * candidates fail one comparison with the heap's top. Keys are unique, so
 * the m best and their order are the same either way. */
void bs_sort_best(bs_cand *a, size_t n, size_t m, int by_lb) {
    if (m == 0) return;
    if (m >= n || m * 4 > n) {
        sort_cands(a, n, by_lb);
        return;
    }
    for (size_t i = m / 2; i-- > 0;) cand_sift(a, m, i, by_lb);
    for (size_t i = m; i < n; i++) {
        if (!cand_less(&a[i], &a[0], by_lb)) continue;
        bs_cand t = a[0];
        a[0] = a[i];
        a[i] = t;
        cand_sift(a, m, 0, by_lb);
    }
    sort_cands(a, m, by_lb);
}

/* ------------------------------------------------------- the 1-bit rerank */

size_t bs_rerank_gate(const float *lb, const float *d, size_t n, uint32_t k,
                      float *heap, uint32_t *heap_n) {
    size_t nh = *heap_n;
    for (size_t i = 0; i < n; i++) {
        if (nh == k && lb[i] > heap[0]) {
            *heap_n = (uint32_t)nh;
            return i;
        }
        bs_heap_push_bounded(heap, &nh, k, d[i]);
    }
    *heap_n = (uint32_t)nh;
    return n;
}
