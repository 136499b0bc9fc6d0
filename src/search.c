/* Search over one or more compatible segments: the staged scan of
 * docs/rabitq.md.
 *
 * Determinism is the design constraint here. A distributed build's
 * segments, merged or not, must answer bit for bit like one segment built
 * from the same rows. So nothing below may depend on the order in which
 * partitions or segments are visited:
 *  - every per-vector quantity comes from the vector's own code and the
 *    query (the kernels return exact integer sums);
 *  - the threshold that gates stage 2 is the k-th smallest *upper* bound
 *    over all scanned codes, which a running heap reaches whatever the visit
 *    order (a code pruned early had lb > running threshold >= final one, so
 *    it could not have been kept anyway);
 *  - the survivors are exactly {lb <= final threshold}, sorted by
 *    (estimate, row id).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "alloc.h"
#include "bounds.h"
#include "dot.h"
#include "error.h"
#include "rabitq.h"
#include "search_internal.h"
#include "segment.h"
#include "values.h"

struct bs_searcher {
    const bs_segment **segs;
    size_t nseg;
    uint32_t dim;
    uint32_t D;
    uint32_t bits;
    uint32_t nlist;
    bs_metric metric;
    bs_rotation *rot;
    const float *centroids;  /* nlist * dim, owned by segs[0] */
    float *rot_centroids;    /* nlist * D: P c */
    float *centroid_norm2;   /* nlist */
    bs_fastscan_fn kernel;
    bs_dot_kernels dots;
    /* Probe pre-pass (choose_probes): float16 centroids, half the bytes of
     * the scan that dominates a high-dimensional query, and |c_j|; NULL
     * when the CPU lacks F16C or a centroid does not fit float16. */
    uint16_t *c16;
    float *centroid_norm;
};

typedef struct bs_cand {
    uint64_t rowid;
    float est;
    float lb;
    float ub;
    uint32_t seg;
    uint32_t probe; /* index into the probed partition list */
    uint32_t index; /* position inside the partition */
} bs_cand;

struct bs_candidates {
    /* results */
    uint64_t *rowids;
    float *estimates;
    float *lower_bounds;
    size_t size;
    size_t cap_out;
    /* scratch reused across queries */
    bs_cand *cands;
    size_t ncands;
    size_t cap_cands;
    float *heap;
    size_t cap_heap;
    uint32_t *sums;
    size_t cap_sums;
    float *qbuf; /* (nprobes + 2) * D floats */
    size_t cap_qbuf;
    uint8_t *lut;
    size_t cap_lut;
    uint32_t *probes;
    float *probe_keys;
    size_t cap_probes;
    float *approx;     /* per centroid: pre-pass key, its error bound */
    float *approx_err;
    uint32_t *near;    /* centroids the pre-pass could not rule out */
    size_t cap_approx;
    uint8_t *code;
    size_t cap_code;
    float *pinfo; /* per probe: sum(q'), |q'|^2, <c, q> */
    size_t cap_pinfo;
    float *ntab;  /* per probe, built on first use: D/4 nibble tables of 16 */
    size_t cap_ntab;
    uint8_t *ntab_ready;
    size_t cap_ready;
};

/* ---------------------------------------------------------- small helpers */

/* Grows *ptr to hold at least need elements (doubling from 64, so a
 * buffer reused across queries settles at its largest size). *cap only
 * ever grows: a query that needs 0 elements keeps the buffer it has. On
 * failure *ptr and *cap are unchanged and still valid. */
static int grow(void **ptr, size_t *cap, size_t need, size_t elem) {
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
 * capacity (cap >= 1 after a successful grow). */
static int match_cap(void **ptr, size_t cap, size_t elem) {
    void *p = bs_realloc(*ptr, cap, elem);
    if (p == NULL) return 0;
    *ptr = p;
    return 1;
}

/* Max-heap of the k smallest upper bounds seen so far. */
static void heap_push_bounded(float *heap, size_t *n, size_t k, float v) {
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
static void sort_best(bs_cand *a, size_t n, size_t m, int by_lb) {
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

static int sorted_contains(const uint64_t *arr, size_t n, uint64_t v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (arr[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && arr[lo] == v;
}

static int rowid_allowed(const bs_search_params *p, uint64_t rowid) {
    if (p->allowed_fragments != NULL &&
        !sorted_contains(p->allowed_fragments, p->num_allowed_fragments, rowid >> 32))
        return 0;
    if (p->denied_rowids != NULL && sorted_contains(p->denied_rowids, p->num_denied, rowid))
        return 0;
    return p->allowed_rowids == NULL ||
           sorted_contains(p->allowed_rowids, p->num_allowed, rowid);
}

static float sum_f(const float *a, uint32_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (uint32_t j = 0; j < 8; j++) acc[j] += a[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
           ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/* Stage 2 reads a handful of codes per probed partition. Rather than
 * walking bits, it sums 16-entry float tables per 4-dimension group: entry m
 * of group g is the sum of x over the bits of m. Built once per partition
 * that stage 2 reaches (4 * D floats). */
static void nibble_tables(const float *x, uint32_t D, float *t) {
    for (uint32_t g = 0; g < D / 4; g++) {
        const float *q = x + 4 * g;
        float *tg = t + 16 * g;
        tg[0] = 0.0f;
        for (uint32_t m = 1; m < 16; m++)
            tg[m] = tg[m & (m - 1)] + q[__builtin_ctz(m)];
    }
}

/* <b, x> for the 1-bit code of vector v of a FastScan block: group g's
 * nibble sits in byte 16 g + (v mod 16), low half for v < 16. Four
 * accumulators in a fixed order (D/4 is a multiple of 16). */
static float fastscan_code_dot(const uint8_t *block, uint32_t v, uint32_t D,
                               const float *t) {
    const uint8_t *p = block + (v & 15);
    const unsigned shift = v < 16 ? 0 : 4;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (uint32_t g = 0; g < D / 4; g += 4, p += 64, t += 64) {
        a0 += t[(p[0] >> shift) & 15];
        a1 += t[16 + ((p[16] >> shift) & 15)];
        a2 += t[32 + ((p[32] >> shift) & 15)];
        a3 += t[48 + ((p[48] >> shift) & 15)];
    }
    return (a0 + a1) + (a2 + a3);
}

/* <plane, x> for one bit plane laid out like a 1-bit code: byte j holds
 * groups 2j (low nibble) and 2j + 1 (high nibble), so nibble n of a
 * little-endian 64-bit word is group n. Reading words rather than bytes
 * keeps gcc from round-tripping each byte through the stack (a store-
 * forwarding stall that cost ~40 cycles per byte). Group g goes to
 * accumulator g mod 4, in increasing g (D/8 is a multiple of 8). */
static float plane_dot(const uint8_t *plane, uint32_t D, const float *t) {
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (uint32_t j = 0; j < D / 8; j += 8) {
        uint64_t w;
        memcpy(&w, plane + j, sizeof w);
        for (int n = 0; n < 16; n += 4, t += 64, w >>= 16) {
            a0 += t[w & 15];
            a1 += t[16 + ((w >> 4) & 15)];
            a2 += t[32 + ((w >> 8) & 15)];
            a3 += t[48 + ((w >> 12) & 15)];
        }
    }
    return (a0 + a1) + (a2 + a3);
}

/* How many cache lines stage 2 keeps in flight: about what a core's fill
 * buffers hold. Candidates with short extra codes are fetched several
 * ahead (their arithmetic is short too); a 9-bit 768-d code is 12 lines,
 * one candidate ahead. More only stalls on the prefetches themselves. */
#define STAGE2_PREFETCH_LINES 16

/* The float16 probe pre-pass runs for at least this many centroids and
 * when at most 1 / PREPASS_MAX_FRACTION of them are probed (else most
 * would need their exact key anyway) ... */
#define PREPASS_MIN_LIST 64
#define PREPASS_MAX_FRACTION 8
/* ... and for at least this many dimensions: below, the float centroids
 * (256 x 128 x 4 = 128 KB) stay in L2 and the pre-pass's bookkeeping ate
 * its gain (measured at d = 128: 1% slower; at d = 768: 3-5% faster). */
#define PREPASS_MIN_DIM 256

static inline void prefetch_read(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}

/* Bit i set when lbs[i] is not above the threshold (NaN counts as not
 * above, like the scalar test it stands for). lbs must have 4 readable
 * floats. */
static inline unsigned pass_mask(const float *lbs, float threshold) {
#if defined(__SSE2__)
    return (unsigned)_mm_movemask_ps(
        _mm_cmpngt_ps(_mm_loadu_ps(lbs), _mm_set1_ps(threshold)));
#else
    unsigned m = 0;
    for (unsigned j = 0; j < 4; j++) m |= (unsigned)!(lbs[j] > threshold) << j;
    return m;
#endif
}

/* ------------------------------------------------------------- searcher */

bs_status bs_searcher_create(const bs_segment *const *segs, size_t n,
                             bs_searcher **out, bs_error *err) {
    if (out == NULL || (segs == NULL && n > 0))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "NULL argument");
    *out = NULL;
    if (n == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "a searcher needs at least one segment");
    for (size_t i = 0; i < n; i++)
        if (segs[i] == NULL)
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment %zu is NULL",
                           i);
    for (size_t i = 1; i < n; i++) {
        bs_error sub;
        bs_error_clear(&sub);
        if (bs_segment_check_compatible(segs[0], segs[i], &sub) != BS_OK)
            return bs_fail(err, sub.code, "cannot search segment %zu with segment 0: %s",
                           i, sub.message);
    }
    bs_simd_level level;
    BS_TRY(bs_simd_select(&level, err));

    bs_segment_info info;
    bs_segment_get_info(segs[0], &info);
    bs_searcher *s = bs_zalloc(1, sizeof *s);
    if (s == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    s->segs = bs_alloc(n, sizeof *s->segs);
    s->nseg = n;
    s->dim = info.dim;
    s->D = info.padded_dim;
    s->bits = info.num_bits;
    s->nlist = info.num_partitions;
    s->metric = info.metric;
    s->centroids = bs_segment_centroids(segs[0]);
    s->kernel = bs_fastscan_kernel(level);
    bs_dot_kernels_get(level, &s->dots);
    s->rot_centroids = bs_alloc2(s->nlist, s->D, sizeof(float));
    s->centroid_norm2 = bs_alloc(s->nlist, sizeof(float));
    if (s->segs == NULL || s->rot_centroids == NULL || s->centroid_norm2 == NULL) {
        bs_searcher_free(s);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    memcpy(s->segs, segs, n * sizeof *s->segs);
    bs_status st = bs_rotation_create(info.rotation_kind, info.dim,
                                      info.rotation_seed, &s->rot, err);
    if (st == BS_OK)
        st = bs_rotation_apply(s->rot, s->centroids, s->nlist, s->dim,
                               s->rot_centroids, err);
    if (st != BS_OK) {
        bs_searcher_free(s);
        return st;
    }
    for (uint32_t c = 0; c < s->nlist; c++) {
        const float *v = s->centroids + (size_t)c * s->dim;
        s->centroid_norm2[c] = bs_dot(v, v, s->dim);
    }
    /* The float16 copy exists where it pays: a CPU with F16C, enough
     * centroids to skip most of, and every coordinate inside float16's
     * range (|x| < 65504; the bound below assumes no overflow). Without it
     * probe selection scans the float centroids, with the same result. */
    if (s->dots.to_f16 != NULL && s->nlist >= PREPASS_MIN_LIST && s->dim >= PREPASS_MIN_DIM) {
        const size_t cells = (size_t)s->nlist * s->dim;
        int fits = 1;
        for (size_t i = 0; i < cells && fits; i++) fits = fabsf(s->centroids[i]) < 65504.0f;
        if (fits) {
            s->c16 = bs_alloc(cells, sizeof(uint16_t));
            s->centroid_norm = bs_alloc(s->nlist, sizeof(float));
            if (s->c16 == NULL || s->centroid_norm == NULL) {
                bs_searcher_free(s);
                return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
            }
            s->dots.to_f16(s->centroids, cells, s->c16);
            for (uint32_t c = 0; c < s->nlist; c++) {
                /* |c| from above: the bound needs no smaller value */
                const float *v = s->centroids + (size_t)c * s->dim;
                double n2 = 0.0;
                for (uint32_t i = 0; i < s->dim; i++) n2 += (double)v[i] * (double)v[i];
                s->centroid_norm[c] = (float)(sqrt(n2) * (1.0 + 0x1p-20));
            }
        }
    }
    *out = s;
    return BS_OK;
}

void bs_searcher_free(bs_searcher *s) {
    if (s == NULL) return;
    bs_rotation_free(s->rot);
    free(s->rot_centroids);
    free(s->centroid_norm2);
    free(s->c16);
    free(s->centroid_norm);
    free((void *)s->segs);
    free(s);
}

/* ----------------------------------------------------------- candidates */

bs_candidates *bs_candidates_new(void) { return bs_zalloc(1, sizeof(bs_candidates)); }

void bs_candidates_free(bs_candidates *c) {
    if (c == NULL) return;
    free(c->rowids);
    free(c->estimates);
    free(c->lower_bounds);
    free(c->cands);
    free(c->heap);
    free(c->sums);
    free(c->qbuf);
    free(c->lut);
    free(c->probes);
    free(c->probe_keys);
    free(c->approx);
    free(c->approx_err);
    free(c->near);
    free(c->code);
    free(c->pinfo);
    free(c->ntab);
    free(c->ntab_ready);
    free(c);
}

size_t bs_candidates_size(const bs_candidates *c) { return c ? c->size : 0; }
const uint64_t *bs_candidates_rowids(const bs_candidates *c) { return c->rowids; }
const float *bs_candidates_estimates(const bs_candidates *c) { return c->estimates; }
const float *bs_candidates_lower_bounds(const bs_candidates *c) {
    return c->lower_bounds;
}

/* ---------------------------------------------------------------- search */

/* Chooses the nprobe partitions nearest the query: smallest |q - c|^2 for
 * l2, largest <q, c> for dot and cosine (which search by inner product on
 * unit vectors). Ties go to the lower partition id. */
/* Keeps the nprobe smallest keys seen, in order; a key equal to a kept
 * one goes after it, so among equal keys the centroid offered first wins.
 * Offered in increasing centroid order, that is the lowest id. */
static void offer_probe(uint32_t *probes, float *keys, uint32_t *have, uint32_t nprobe,
                        uint32_t c, float key) {
    if (*have == nprobe && key >= keys[*have - 1]) return;
    uint32_t pos = *have < nprobe ? (*have)++ : nprobe - 1;
    while (pos > 0 && keys[pos - 1] > key) {
        keys[pos] = keys[pos - 1];
        probes[pos] = probes[pos - 1];
        pos--;
    }
    keys[pos] = key;
    probes[pos] = c;
}

static float probe_key(const bs_searcher *s, float qn, float ip, uint32_t c) {
    return s->metric == BS_METRIC_L2 ? qn - 2.0f * ip + s->centroid_norm2[c] : -ip;
}

/* The nprobe centroids with the smallest keys (squared distance, or -<q, c>
 * for dot-like metrics), ties to the lowest id: an insertion list over one
 * pass, O(nlist) typically. */
static void choose_probes_exact(const bs_searcher *s, const float *q, uint32_t nprobe,
                                uint32_t *probes, float *keys) {
    const float qn = bs_dot(q, q, s->dim);
    const size_t d = s->dim;
    const float *cen = s->centroids;
    uint32_t have = 0;
    float ips[4];
    for (uint32_t c = 0; c < s->nlist; c++) {
        if (c % 4 == 0) {
            if (c + 4 <= s->nlist) {
                const float *const rows[4] = {cen + c * d, cen + (c + 1) * d,
                                              cen + (c + 2) * d, cen + (c + 3) * d};
                s->dots.dot4(q, rows, s->dim, ips);
            } else {
                for (uint32_t j = c; j < s->nlist; j++)
                    ips[j - c] = bs_dot(q, cen + j * d, s->dim);
            }
        }
        offer_probe(probes, keys, &have, nprobe, c, probe_key(s, qn, ips[c % 4], c));
    }
}

/* The same probes through the float16 pre-pass. Each centroid's key from
 * its float16 copy, a_j, is within e_j of the exact key; U, the nprobe-th
 * smallest a_j + e_j, bounds the exact nprobe-th smallest key from above.
 * A centroid with a_j - e_j > U has an exact key > U, so the exact scan
 * could not have picked it (not even on a tie). The others ("near", in
 * increasing id) get their exact keys, computed exactly as the full scan
 * computes them (dot4 and bs_dot give a row the same bits whatever rows
 * accompany it), and go through the same insertion list: the same probes,
 * in the same order, as choose_probes_exact. tests/c/test_search.c checks
 * it on adversarial centroids.
 *
 * e_j: float16 rounding moves each coordinate by at most 2^-11 of itself
 * or 2^-25 (subnormals), so |<q, c - c16>| <= 2^-11 |q||c| + 2^-25 sum|q_i|;
 * each float dot is within gamma_d |q||c| (Higham 3.1, any order, FMA or
 * not), with |c16| <= (1 + 2^-11)|c| + 2^-25 sqrt(d); the key's two outer
 * operations round by 2^-24 (|q| + |c|)^2 each, in either computation.
 * All of it is doubled: rounding of this bound and of a_j +- e_j. */
static void choose_probes(const bs_searcher *s, const bs_candidates *cc, const float *q,
                          uint32_t nprobe, uint32_t *probes, float *keys) {
    if (s->c16 == NULL || (size_t)nprobe * PREPASS_MAX_FRACTION > s->nlist) {
        choose_probes_exact(s, q, nprobe, probes, keys);
        return;
    }
    const uint32_t nlist = s->nlist;
    const size_t d = s->dim;
    const float qn = bs_dot(q, q, s->dim);
    float qabs = 0.0f;
    for (size_t i = 0; i < d; i++) qabs += fabsf(q[i]);
    /* e_j = (A + B |c_j|) |c_j| + C: the bound above with |q| and the
     * query's terms folded into per-query constants (rounded up: doubled
     * again, which also covers evaluating e_j in float). */
    const double u = 0x1p-24, gamma = (double)d * u / (1.0 - (double)d * u);
    const double qnorm = sqrt((double)qn) * (1.0 + 4.0 * u);
    const double qabs_up = (double)qabs * (1.0 + gamma) + 1e-30;
    const double l2 = s->metric == BS_METRIC_L2 ? 1.0 : 0.0;
    /* 2 ip_err = 2 [(2^-11 + gamma (2 + 2^-11)) |q||c| + 2^-25 sum|q_i|
     *               + gamma |q| 2^-25 sqrt(d)]; outer = 4u (|q| + |c|)^2 */
    const double ka = 2.0 * (0x1p-11 + gamma * (2.0 + 0x1p-11)) * qnorm * (1.0 + 4.0 * u);
    const float A = (float)(4.0 * (ka + l2 * 8.0 * u * qnorm));
    const float B = (float)(4.0 * l2 * 4.0 * u);
    const float C = (float)(4.0 * (2.0 * (0x1p-25 * qabs_up +
                                          gamma * qnorm * 0x1p-25 * sqrt((double)d)) +
                                   l2 * 4.0 * u * qnorm * qnorm) +
                            1e-30);
    float *a = cc->approx, *e = cc->approx_err;
    float ips[4];
    for (uint32_t c = 0; c < nlist; c += 4) {
        if (c + 4 <= nlist) {
            const uint16_t *const rows[4] = {s->c16 + c * d, s->c16 + (c + 1) * d,
                                             s->c16 + (c + 2) * d, s->c16 + (c + 3) * d};
            s->dots.dot4_f16(q, rows, s->dim, ips);
        } else {
            for (uint32_t j = c; j < nlist; j++) {
                const uint16_t *const rows[4] = {s->c16 + j * d, s->c16 + j * d,
                                                 s->c16 + j * d, s->c16 + j * d};
                float t[4];
                s->dots.dot4_f16(q, rows, s->dim, t);
                ips[j - c] = t[0];
            }
        }
        for (uint32_t j = c; j < nlist && j < c + 4; j++) {
            const float cn = s->centroid_norm[j];
            a[j] = probe_key(s, qn, ips[j - c], j);
            e[j] = (A + B * cn) * cn + C;
        }
    }
    /* U: the nprobe-th smallest a_j + e_j (an insertion list again). */
    uint32_t have = 0;
    for (uint32_t c = 0; c < nlist; c++)
        offer_probe(probes, keys, &have, nprobe, c, a[c] + e[c]);
    const float U = keys[nprobe - 1];
    uint32_t nnear = 0;
    for (uint32_t c = 0; c < nlist; c++)
        if (!(a[c] - e[c] > U)) cc->near[nnear++] = c;
    /* exact keys of the near ones, in increasing id */
    const float *cen = s->centroids;
    have = 0;
    for (uint32_t t = 0; t < nnear; t += 4) {
        float exact[4];
        if (t + 4 <= nnear) {
            const float *const rows[4] = {cen + cc->near[t] * d, cen + cc->near[t + 1] * d,
                                          cen + cc->near[t + 2] * d, cen + cc->near[t + 3] * d};
            s->dots.dot4(q, rows, s->dim, exact);
        } else {
            for (uint32_t j = t; j < nnear; j++)
                exact[j - t] = bs_dot(q, cen + cc->near[j] * d, s->dim);
        }
        for (uint32_t j = t; j < nnear && j < t + 4; j++)
            offer_probe(probes, keys, &have, nprobe, cc->near[j],
                        probe_key(s, qn, exact[j - t], cc->near[j]));
    }
}

/* Scratch for the probe choice of up to nprobe of the searcher's
 * centroids. */
static int probe_scratch(const bs_searcher *s, bs_candidates *c, uint32_t nprobe) {
    return grow((void **)&c->probes, &c->cap_probes, nprobe, sizeof(uint32_t)) &&
           match_cap((void **)&c->probe_keys, c->cap_probes, sizeof(float)) &&
           grow((void **)&c->approx, &c->cap_approx, s->nlist, sizeof(float)) &&
           match_cap((void **)&c->approx_err, c->cap_approx, sizeof(float)) &&
           match_cap((void **)&c->near, c->cap_approx, sizeof(uint32_t));
}

bs_status bs_searcher_probes(const bs_searcher *s, bs_candidates *c, const float *q,
                             uint32_t nprobe, int exact, uint32_t *out, bs_error *err) {
    if (s == NULL || c == NULL || q == NULL || out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "NULL argument");
    if (nprobe == 0 || nprobe > s->nlist)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "nprobe %u is not in [1, %u]", nprobe,
                       s->nlist);
    if (!probe_scratch(s, c, nprobe)) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    if (exact)
        choose_probes_exact(s, q, nprobe, c->probes, c->probe_keys);
    else
        choose_probes(s, c, q, nprobe, c->probes, c->probe_keys);
    memcpy(out, c->probes, nprobe * sizeof(uint32_t));
    return BS_OK;
}

int bs_searcher_has_prepass(const bs_searcher *s) { return s != NULL && s->c16 != NULL; }

bs_status bs_search(const bs_searcher *s, const float *q_in,
                    const bs_search_params *params, bs_candidates *c,
                    bs_search_stats *stats, bs_error *err) {
    if (s == NULL || q_in == NULL || params == NULL || c == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "NULL argument");
    if (params->k == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "k must be >= 1, got 0");
    if (params->nprobes == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "nprobes must be >= 1, got 0");
    /* The result holds up to k x refine_factor candidates: that count must
     * fit size_t, and its buffers too, or the request is refused rather
     * than wrapped (both are 32-bit, so on 64-bit builds it always fits). */
    size_t topk;
    if (!bs_mul_ok(params->k, params->refine_factor ? params->refine_factor : 1u, &topk) ||
        topk > SIZE_MAX / sizeof(bs_cand))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "k (%u) x refine_factor (%u) is too large", params->k,
                       params->refine_factor);
    /* eps0 scales the bound terms: capped so that they stay finite. */
    if (!(params->eps0 >= 0.0f) || !(params->eps0 <= BS_MAX_EPS0))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "eps0 must be finite and in [0, %g], got %g", (double)BS_MAX_EPS0,
                       (double)params->eps0);
    /* The accepted-values rule (values.h), as for the data. */
    if (!bs_row_accepted(q_in, s->dim)) {
        const uint32_t i = bs_first_refused(q_in, s->dim);
        if (!isfinite(q_in[i]))
            return bs_fail(err, BS_ERR_INVALID_DATA,
                           "query has a non-finite value at dimension %u", i);
        return bs_fail(err, BS_ERR_INVALID_DATA,
                       "query: value %g at dimension %u is too large " BS_ACCEPTED_VALUES,
                       (double)q_in[i], i);
    }

    const uint32_t D = s->D, dim = s->dim, B = s->bits;
    const uint32_t nprobe = params->nprobes < s->nlist ? params->nprobes : s->nlist;
    const size_t k = params->k;
    bs_search_stats st;
    memset(&st, 0, sizeof st);

    /* qbuf layout: [0, D) normalised query (dim used), [D, 2D) P q,
     * then one D-row per probe: q' for that partition. */
    size_t qlen = ((size_t)nprobe + 2) * D;
    if (!grow((void **)&c->qbuf, &c->cap_qbuf, qlen, sizeof(float)) ||
        !grow((void **)&c->lut, &c->cap_lut, (size_t)D * 4, 1) ||
        !grow((void **)&c->probes, &c->cap_probes, nprobe, sizeof(uint32_t)) ||
        !grow((void **)&c->heap, &c->cap_heap, k, sizeof(float)) ||
        !grow((void **)&c->code, &c->cap_code, bs_code_bytes(D), 1) ||
        !grow((void **)&c->pinfo, &c->cap_pinfo, (size_t)nprobe * 3, sizeof(float)) ||
        !grow((void **)&c->ntab_ready, &c->cap_ready, nprobe, 1))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    float *q = c->qbuf;
    float *pq = c->qbuf + D;
    memcpy(q, q_in, dim * sizeof(float));
    if (s->metric == BS_METRIC_COSINE) {
        float n2 = bs_dot(q, q, dim);
        if (n2 > 0.0f) {
            float inv = 1.0f / sqrtf(n2);
            for (uint32_t i = 0; i < dim; i++) q[i] *= inv;
        }
    }
    BS_TRY(bs_rotation_apply(s->rot, q, 1, dim, pq, err));
    if (!probe_scratch(s, c, nprobe)) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    choose_probes(s, c, q, nprobe, c->probes, c->probe_keys);

    size_t nheap = 0;
    c->ncands = 0;
    const int filtered = params->allowed_fragments != NULL ||
                         params->denied_rowids != NULL || params->allowed_rowids != NULL;
    const float half_levels = (float)((1u << B) - 1) * 0.5f;
    const float quarter_d = 0.25f * (float)D, inv_sqrt_dm1 = 1.0f / sqrtf((float)(D - 1));
    const float groups = (float)(D / 4);

    for (uint32_t pi = 0; pi < nprobe; pi++) {
        uint32_t p = c->probes[pi];
        float *qp = c->qbuf + (size_t)(pi + 2) * D;
        float ip_cq = 0.0f; /* <c, q> for dot-like metrics */
        if (s->metric == BS_METRIC_L2) {
            const float *pc = s->rot_centroids + (size_t)p * D;
            for (uint32_t i = 0; i < D; i++) qp[i] = pq[i] - pc[i];
        } else {
            memcpy(qp, pq, D * sizeof(float));
            ip_cq = bs_dot(q, s->centroids + (size_t)p * dim, dim);
        }
        float qnorm2 = bs_dot(qp, qp, D);
        float qnorm = sqrtf(qnorm2);
        float qsum = sum_f(qp, D);
        c->pinfo[(size_t)pi * 3 + 0] = qsum;
        c->pinfo[(size_t)pi * 3 + 1] = qnorm2;
        c->pinfo[(size_t)pi * 3 + 2] = ip_cq;
        bs_query_lut lut;
        lut.tables = c->lut;
        bs_query_lut_build(qp, D, &lut);
        /* LUT rounding errors are independent and uniform in +-delta/2 per
         * group: their sum has sd delta * sqrt(groups / 12). Widen the bound
         * by eps0 of those sds, like the code's own error. */
        float lut_err = params->eps0 * lut.delta * sqrtf(groups / 12.0f);

        for (size_t si = 0; si < s->nseg; si++) {
            if (params->segment_mask && !params->segment_mask[si]) continue;
            bs_partition_view v;
            bs_segment_partition(s->segs[si], p, &v);
            st.partitions_probed++;
            if (v.count == 0) continue;
            size_t nblocks = bs_fastscan_num_blocks(v.count);
            if (!grow((void **)&c->sums, &c->cap_sums, nblocks * 32, sizeof(uint32_t)))
                return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
            s->kernel(v.blocks, nblocks, c->lut, D, c->sums);
            st.codes_scanned += v.count;
            /* Pass 1 (vectorisable): estimate and lower bound of every code,
             * written over the sums. Pass 2: the few below the threshold. */
            float *lbs = (float *)c->sums;
            const float qterm = s->metric == BS_METRIC_L2 ? qnorm2 : 1.0f - ip_cq;
            const float scale = s->metric == BS_METRIC_L2 ? 2.0f : 1.0f;
            const float ferr = scale * params->eps0 * qnorm;
            const float lerr = scale * lut_err;
            const float base = s->metric == BS_METRIC_L2 ? 1.0f : 0.0f;
            const bs_bound_params bp = {lut.delta, lut.offset, 0.5f * qsum, base, qterm,
                                        scale, ferr, lerr, quarter_d, inv_sqrt_dm1};
            bs_lower_bounds(c->sums, v.norm2, v.s1, v.count, &bp, lbs);
            /* Most codes fail the threshold: test four at a time and visit
             * only the survivors. The threshold read per group may be stale
             * (larger), which only lets a code reach the exact test below. */
            for (uint32_t i0 = 0; i0 < v.count; i0 += 4) {
                unsigned live = pass_mask(lbs + i0, nheap == k ? c->heap[0] : INFINITY);
                if (v.count - i0 < 4) live &= (1u << (v.count - i0)) - 1u;
                while (live) {
                    uint32_t i = i0 + (uint32_t)__builtin_ctz(live);
                    live &= live - 1u;
                    float lb = lbs[i];
                    if (nheap == k && lb > c->heap[0]) continue;
                    /* Without filters the row id waits until the final
                     * threshold has dropped most candidates. */
                    uint64_t rowid = v.ordinals[i];
                    if (filtered) {
                        rowid = bs_segment_rowid(s->segs[si], v.ordinals[i]);
                        if (!rowid_allowed(params, rowid)) continue;
                    }
                    float f1 = bs_f1_from(v.norm2[i], v.s1[i], quarter_d, inv_sqrt_dm1);
                    float bound = ferr * f1 + lerr * fabsf(v.s1[i]);
                    float est = lb + bound;
                    float ub = est + bound;
                    heap_push_bounded(c->heap, &nheap, k, ub);
                    if (!grow((void **)&c->cands, &c->cap_cands, c->ncands + 1,
                              sizeof(bs_cand)))
                        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
                    bs_cand *cd = &c->cands[c->ncands++];
                    cd->rowid = rowid;
                    cd->est = est;
                    cd->lb = lb;
                    cd->ub = ub;
                    cd->seg = (uint32_t)si;
                    cd->probe = pi;
                    cd->index = i;
                }
            }
        }
    }

    /* Keep exactly the codes whose lower bound is within the final k-th
     * smallest upper bound (see the comment at the top). */
    float threshold = nheap == k ? c->heap[0] : INFINITY;
    size_t kept = 0;
    for (size_t i = 0; i < c->ncands; i++)
        if (c->cands[i].lb <= threshold) c->cands[kept++] = c->cands[i];
    c->ncands = kept;
    /* Multi-bit answers without reranking need row ids only for the k best
     * estimates (and ties): they are looked up after stage 2. */
    const int late_rowids = !filtered && B > 1 && params->refine_factor == 0;
    if (!filtered && !late_rowids)
        for (size_t i = 0; i < kept; i++)
            c->cands[i].rowid = bs_segment_rowid(s->segs[c->cands[i].seg],
                                                 (uint32_t)c->cands[i].rowid);

    if (B > 1) {
        /* Stage 2: every survivor of stage 1 gets the full code's estimate.
         * They are few (the threshold is the k-th smallest upper bound), and
         * visiting all of them needs no order, so no sort by lower bound;
         * the answer is the k (k * refine_factor) best by (estimate, row
         * id), which no segment layout can change. */
        const float top = (float)(1u << (B - 1));
        const size_t tab_len = (size_t)D * 4;
        if (!grow((void **)&c->ntab, &c->cap_ntab, (size_t)nprobe * tab_len, sizeof(float)))
            return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
        memset(c->ntab_ready, 0, nprobe);
        const size_t plane_bytes = bs_code_bytes(D);
        const size_t ext_bytes = bs_ext_bytes(D, B);
        const size_t ext_lines = (ext_bytes + 63) / 64;
        const size_t ahead_n = ext_lines >= STAGE2_PREFETCH_LINES / 2
                                   ? 1
                                   : STAGE2_PREFETCH_LINES / (ext_lines + 1);
        for (size_t i = 0; i < c->ncands; i++) {
            bs_cand *cd = &c->cands[i];
            /* Survivors sit here and there in the segment, so stage 2 waits
             * on memory, not arithmetic: fetch a few candidates ahead. */
            if (i + ahead_n < c->ncands) {
                const bs_cand *ahead = &c->cands[i + ahead_n];
                bs_partition_view av;
                bs_segment_partition(s->segs[ahead->seg], c->probes[ahead->probe], &av);
                const uint8_t *e = av.ext + (size_t)ahead->index * ext_bytes;
                for (size_t off = 0; off < ext_bytes; off += 64) prefetch_read(e + off);
                prefetch_read(e + ext_bytes - 1);
                prefetch_read(av.s_full + ahead->index);
            }
        bs_partition_view v;
            bs_segment_partition(s->segs[cd->seg], c->probes[cd->probe], &v);
            const float *pi = c->pinfo + (size_t)cd->probe * 3;
            float *tab = c->ntab + (size_t)cd->probe * tab_len;
            if (!c->ntab_ready[cd->probe]) {
                nibble_tables(c->qbuf + (size_t)(cd->probe + 2) * D, D, tab);
                c->ntab_ready[cd->probe] = 1;
            }
            const uint8_t *block =
                v.blocks + (size_t)(cd->index / 32) * bs_fastscan_block_bytes(D);
            const uint8_t *ext = v.ext + (size_t)cd->index * ext_bytes;
            float ip_e = 0.0f;
            if (B == 9)
                ip_e = s->dots.u8_dot(ext, c->qbuf + (size_t)(cd->probe + 2) * D, D);
            else
                for (uint32_t j = 0; j + 1 < B; j++)
                    ip_e += (float)(1u << j) * plane_dot(ext + j * plane_bytes, D, tab);
            float ip_u = top * fastscan_code_dot(block, cd->index % 32, D, tab) + ip_e;
            float ip_y = ip_u - half_levels * pi[0];
            float s_full = v.s_full[cd->index];
            if (s->metric == BS_METRIC_L2)
                cd->est = v.norm2[cd->index] + pi[1] - 2.0f * s_full * ip_y;
            else
                cd->est = 1.0f - (s_full * ip_y + pi[2]);
        }
        st.codes_stage2 = c->ncands;
    }

    if (late_rowids) {
        /* Keep the codes whose estimate is within the k-th smallest (ties
         * included, NaN kept as the sort below would see it): the top k by
         * (estimate, row id) is among them whatever the row ids. */
        size_t nh = 0;
        for (size_t i = 0; i < c->ncands; i++) heap_push_bounded(c->heap, &nh, k, c->cands[i].est);
        const float t = nh == k ? c->heap[0] : INFINITY;
        size_t m = 0;
        for (size_t i = 0; i < c->ncands; i++) {
            if (c->cands[i].est > t) continue;
            c->cands[m] = c->cands[i];
            c->cands[m].rowid = bs_segment_rowid(s->segs[c->cands[m].seg],
                                                 (uint32_t)c->cands[m].rowid);
            m++;
        }
        c->ncands = m;
    }

    /* The gated 1-bit rerank reads candidates in lower-bound order and stops
     * early (see bs_search in bitshard.h); everything else is ranked by
     * estimate. */
    int by_lb = B == 1 && params->refine_factor == 0;
    size_t nout = c->ncands;
    if (params->refine_factor > 0) {
        size_t lim;
        if (!bs_mul_ok(k, params->refine_factor, &lim)) lim = SIZE_MAX;
        if (nout > lim) nout = lim;
    } else if (B > 1 && nout > k) {
        nout = k;
    }
    sort_best(c->cands, c->ncands, nout, by_lb);
    /* estimates and lower_bounds share cap_out: resized alongside. The
     * result is empty (size 0) until all three succeed, so a failure here
     * leaves no stale rows behind. */
    c->size = 0;
    if (!grow((void **)&c->rowids, &c->cap_out, nout, sizeof(uint64_t)) ||
        !match_cap((void **)&c->estimates, c->cap_out, sizeof(float)) ||
        !match_cap((void **)&c->lower_bounds, c->cap_out, sizeof(float)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    for (size_t i = 0; i < nout; i++) {
        c->rowids[i] = c->cands[i].rowid;
        c->estimates[i] = c->cands[i].est;
        c->lower_bounds[i] = c->cands[i].lb;
    }
    c->size = nout;
    st.candidates = nout;
    if (stats) *stats = st;
    return BS_OK;
}

size_t bs_rerank_gate(const float *lb, const float *d, size_t n, uint32_t k,
                      float *heap, uint32_t *heap_n) {
    size_t nh = *heap_n;
    for (size_t i = 0; i < n; i++) {
        if (nh == k && lb[i] > heap[0]) {
            *heap_n = (uint32_t)nh;
            return i;
        }
        heap_push_bounded(heap, &nh, k, d[i]);
    }
    *heap_n = (uint32_t)nh;
    return n;
}

/* ------------------------------------------------------- exact distances */

bs_status bs_exact_distances(bs_metric metric, const float *q, const float *x,
                             size_t n, uint32_t dim, float *out, bs_error *err) {
    if ((n > 0 && (q == NULL || x == NULL || out == NULL)) || dim == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "bad arguments to exact distances");
    if (metric != BS_METRIC_L2 && metric != BS_METRIC_COSINE && metric != BS_METRIC_DOT)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "unknown metric %d", (int)metric);
    double qn = 0.0;
    for (uint32_t j = 0; j < dim; j++) qn += (double)q[j] * q[j];
    for (size_t i = 0; i < n; i++) {
        const float *v = x + i * dim;
        double acc = 0.0, vn = 0.0;
        if (metric == BS_METRIC_L2) {
            for (uint32_t j = 0; j < dim; j++) {
                double d = (double)q[j] - (double)v[j];
                acc += d * d;
            }
            out[i] = (float)acc;
            continue;
        }
        for (uint32_t j = 0; j < dim; j++) {
            acc += (double)q[j] * v[j];
            vn += (double)v[j] * v[j];
        }
        if (metric == BS_METRIC_DOT) {
            out[i] = (float)(1.0 - acc);
        } else if (qn == 0.0 || vn == 0.0) {
            out[i] = 1.0f; /* a zero vector has no direction: cos taken as 0 */
        } else {
            out[i] = (float)(1.0 - acc / (sqrt(qn) * sqrt(vn)));
        }
    }
    return BS_OK;
}
