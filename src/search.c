/* Search over one or more compatible segments: the staged scan of
 * docs/rabitq.md, one query at a time. bs_search is a driver over the
 * stages below, which share one per-query context (query_ctx); probe
 * selection is in probe.c and the candidate ordering in topk.c.
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
 *
 * Names follow docs/rabitq.md: D is the padded dimension (the searcher's
 * padded_dim), B the bits per dimension, q' the query as partition p's
 * codes see it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "bounds.h"
#include "dot.h"
#include "error.h"
#include "format.h"
#include "probe.h"
#include "rabitq.h"
#include "scratch.h"
#include "search_internal.h"
#include "segment.h"
#include "topk.h"
#include "values.h"

struct bs_searcher {
    const bs_segment **segs;
    size_t num_segments;
    uint32_t dim;
    uint32_t padded_dim; /* D */
    uint32_t num_bits;   /* B */
    uint32_t num_partitions;
    bs_metric metric;
    bs_rotation *rot;
    const float *centroids; /* num_partitions * dim, owned by segs[0] */
    float *rot_centroids;   /* num_partitions * D: P c */
    float *rot_mean;        /* D: P m, m the centroids' mean (stage 1's table origin) */
    bs_simd_level level;
    bs_fastscan_fn kernel;
    bs_bounds_fn bounds;
    bs_dot_kernels dots;
    bs_probe_index probe;
};

/* The terms of a probed partition's estimates that depend on the query
 * and the partition only (docs/rabitq.md, "The estimator"). */
typedef struct probe_terms {
    float qsum;   /* sum_i q'_i */
    float qnorm2; /* |q'|^2 */
    float ip_cq;  /* <c, q> for dot and cosine; 0 for l2 */
} probe_terms;

struct bs_candidates {
    /* results */
    uint64_t *rowids;
    float *estimates;
    float *lower_bounds;
    size_t size;
    size_t cap_out; /* of all three */
    /* scratch reused across queries */
    bs_cand *cands;
    size_t ncands;
    size_t cap_cands;
    float *heap; /* the k smallest upper bounds (stage 1), estimates (late row ids) */
    size_t cap_heap;
    size_t num_ubs; /* a share's search: the heap, sorted, holds its upper bounds */
    uint32_t *sums; /* one partition's FastScan sums, then its lower bounds */
    size_t cap_sums;
    uint32_t *lb_mask; /* one bit per code of the partition: may pass the threshold */
    size_t cap_lb_mask;
    /* (nprobes + 2) rows of D floats: the normalised query (dim used), Pq,
     * then q' of each probe */
    float *query_rows;
    size_t cap_query_rows;
    uint8_t *lut_tables; /* the query's D/4 tables of 16 (bs_query_lut) */
    size_t cap_lut;
    bs_probe_scratch probe;
    probe_terms *terms; /* per probe */
    size_t cap_terms;
    /* the partition view of probe pi in segment si at pi * num_segments
     * + si, set when stage 1 scans it: stage 2 reads its candidates'
     * partitions from here rather than working each view out again */
    bs_partition_view *views;
    size_t cap_views;
    /* stage 2: per probe, D/4 float tables of 16 (the nibble tables of
     * dot.h), built when a survivor of that probe first needs them */
    float *nibble_tabs;
    size_t cap_nibble_tabs;
    uint8_t *nibble_ready; /* per probe */
    size_t cap_nibble_ready;
};

/* One query's state between the stages of bs_search. */
typedef struct query_ctx {
    const bs_searcher *s;
    const bs_search_params *params;
    bs_candidates *c;
    uint32_t nprobe; /* params->nprobes capped at num_partitions */
    size_t k;
    int filtered;    /* any of the row filters is set */
    /* Multi-bit answers without reranking need row ids only for the k best
     * estimates (and ties): they are looked up after stage 2. */
    int late_rowids;
    size_t nheap;    /* entries in c->heap */
    /* Stage 1's one table, of qt = Pq - Pm, shared by every probe
     * (docs/rabitq.md, "The estimator"), and 0.5 * sum_i qt_i. */
    bs_query_lut lut;
    float half_qtsum;
    /* dot and cosine: q' = Pq for every probe, so |q'|^2 and sum_i q'_i
     * are the query's. */
    float pq_norm2, pq_sum;
    bs_search_stats stats;
} query_ctx;

/* ---------------------------------------------------------- small helpers */

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

static inline void prefetch_read(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
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
    s->num_segments = n;
    s->dim = info.dim;
    s->padded_dim = info.padded_dim;
    s->num_bits = info.num_bits;
    s->num_partitions = info.num_partitions;
    s->metric = info.metric;
    s->centroids = bs_segment_centroids(segs[0]);
    s->level = level;
    s->kernel = bs_fastscan_kernel(level);
    s->bounds = bs_lower_bounds_kernel(level);
    bs_dot_kernels_get(level, &s->dots);
    s->rot_centroids = bs_alloc2(s->num_partitions, s->padded_dim, sizeof(float));
    s->rot_mean = bs_alloc(s->padded_dim, sizeof(float));
    if (s->segs == NULL || s->rot_centroids == NULL || s->rot_mean == NULL) {
        bs_searcher_free(s);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    memcpy(s->segs, segs, n * sizeof *s->segs);
    bs_status st = bs_rotation_create(info.rotation_kind, info.dim,
                                      info.rotation_seed, &s->rot, err);
    if (st == BS_OK)
        st = bs_rotation_apply(s->rot, s->centroids, s->num_partitions, s->dim,
                               s->rot_centroids, err);
    /* Pm exactly as the writers computed it for corr (format.c) */
    if (st == BS_OK)
        st = bs_centroid_mean_rotated(s->rot, s->centroids, s->num_partitions, s->dim,
                                      s->rot_mean, err);
    if (st == BS_OK)
        st = bs_probe_index_init(&s->probe, s->centroids, s->num_partitions, s->dim,
                                 s->metric, &s->dots, err);
    if (st != BS_OK) {
        bs_searcher_free(s);
        return st;
    }
    *out = s;
    return BS_OK;
}

void bs_searcher_free(bs_searcher *s) {
    if (s == NULL) return;
    bs_rotation_free(s->rot);
    free(s->rot_centroids);
    free(s->rot_mean);
    bs_probe_index_free(&s->probe);
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
    free(c->lb_mask);
    free(c->query_rows);
    free(c->lut_tables);
    bs_probe_scratch_free(&c->probe);
    free(c->terms);
    free(c->views);
    free(c->nibble_tabs);
    free(c->nibble_ready);
    free(c);
}

size_t bs_candidates_size(const bs_candidates *c) { return c ? c->size : 0; }
const uint64_t *bs_candidates_rowids(const bs_candidates *c) { return c->rowids; }
const float *bs_candidates_estimates(const bs_candidates *c) { return c->estimates; }
const float *bs_candidates_lower_bounds(const bs_candidates *c) {
    return c->lower_bounds;
}
size_t bs_candidates_upper_bounds(const bs_candidates *c, const float **ubs) {
    if (ubs != NULL) *ubs = c != NULL ? c->heap : NULL;
    return c != NULL ? c->num_ubs : 0;
}

/* ------------------------------------------------------- probe selection */

bs_status bs_searcher_probes(const bs_searcher *s, bs_candidates *c, const float *q,
                             uint32_t nprobe, int exact, uint32_t *out, bs_error *err) {
    if (s == NULL || c == NULL || q == NULL || out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "NULL argument");
    if (nprobe == 0 || nprobe > s->num_partitions)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "nprobe %u is not in [1, %u]", nprobe,
                       s->num_partitions);
    if (!bs_probe_scratch_reserve(&c->probe, &s->probe, nprobe))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    if (exact)
        bs_choose_probes_exact(&s->probe, &c->probe, q, nprobe);
    else
        bs_choose_probes(&s->probe, &c->probe, q, nprobe);
    memcpy(out, c->probe.probes, nprobe * sizeof(uint32_t));
    return BS_OK;
}

int bs_searcher_has_prepass(const bs_searcher *s) {
    return s != NULL && s->probe.centroids_f16 != NULL;
}

/* ------------------------------------------------------ the search stages */

static bs_status check_search_args(const bs_searcher *s, const float *q_in,
                                   const bs_search_params *params, const bs_candidates *c,
                                   bs_error *err) {
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
    return BS_OK;
}

/* q (dim floats) as the probes and the rotation see it: normalised to unit
 * length for cosine (an all-zero query stays zero), else copied. */
static void normalized_query(const bs_searcher *s, const float *q_in, float *q) {
    const uint32_t dim = s->dim;
    memcpy(q, q_in, dim * sizeof(float));
    if (s->metric == BS_METRIC_COSINE) {
        float n2 = bs_dot(q, q, dim);
        if (n2 > 0.0f) {
            float inv = 1.0f / sqrtf(n2);
            for (uint32_t i = 0; i < dim; i++) q[i] *= inv;
        }
    }
}

bs_status bs_search_probes(const bs_searcher *s, const float *q, uint32_t nprobes,
                           bs_candidates *c, uint32_t *out, uint32_t *n_out,
                           bs_error *err) {
    bs_error_clear(err);
    if (out == NULL || n_out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "NULL argument");
    /* The checks of bs_search that concern the probes (k and eps0 do not). */
    bs_search_params p;
    memset(&p, 0, sizeof p);
    p.k = 1;
    p.nprobes = nprobes;
    BS_TRY(check_search_args(s, q, &p, c, err));
    const uint32_t n = nprobes < s->num_partitions ? nprobes : s->num_partitions;
    if (!bs_grow((void **)&c->query_rows, &c->cap_query_rows, s->padded_dim,
                 sizeof(float)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    normalized_query(s, q, c->query_rows);
    BS_TRY(bs_searcher_probes(s, c, c->query_rows, n, 0, out, err));
    *n_out = n;
    return BS_OK;
}

static void query_ctx_init(query_ctx *x, const bs_searcher *s,
                           const bs_search_params *params, bs_candidates *c) {
    memset(x, 0, sizeof *x);
    x->s = s;
    x->params = params;
    x->c = c;
    x->nprobe = params->nprobes < s->num_partitions ? params->nprobes : s->num_partitions;
    x->k = params->k;
    x->filtered = params->allowed_fragments != NULL || params->denied_rowids != NULL ||
                  params->allowed_rowids != NULL;
    x->late_rowids = !x->filtered && s->num_bits > 1 && params->refine_factor == 0 &&
                     !params->share;
    c->ncands = 0;
    c->num_ubs = 0;
}

/* Row r of c->query_rows: 0 the normalised query, 1 Pq, 2 qt = Pq - Pm,
 * 3 + pi q' of probe pi (l2 only: for dot and cosine q' is Pq). */
static inline float *query_row(const query_ctx *x, size_t r) {
    return x->c->query_rows + r * x->s->padded_dim;
}

/* The buffers whose size the query fixes up front. */
static bs_status reserve_scratch(query_ctx *x, bs_error *err) {
    bs_candidates *c = x->c;
    const size_t D = x->s->padded_dim, nprobe = x->nprobe;
    size_t nviews;
    if (!bs_mul_ok(nprobe, x->s->num_segments, &nviews) ||
        !bs_grow((void **)&c->views, &c->cap_views, nviews, sizeof(bs_partition_view)) ||
        !bs_grow((void **)&c->query_rows, &c->cap_query_rows, (nprobe + 3) * D,
                 sizeof(float)) ||
        !bs_grow((void **)&c->lut_tables, &c->cap_lut, D * 4, 1) ||
        !bs_grow((void **)&c->heap, &c->cap_heap, x->k, sizeof(float)) ||
        !bs_grow((void **)&c->terms, &c->cap_terms, nprobe, sizeof(probe_terms)) ||
        !bs_grow((void **)&c->nibble_ready, &c->cap_nibble_ready, nprobe, 1) ||
        !bs_probe_scratch_reserve(&c->probe, &x->s->probe, x->nprobe))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    return BS_OK;
}

/* The query normalised (cosine), rotated once, and its probes. */
static bs_status prepare_query(query_ctx *x, const float *q_in, bs_error *err) {
    const bs_searcher *s = x->s;
    const uint32_t dim = s->dim;
    float *q = query_row(x, 0);
    normalized_query(s, q_in, q);
    BS_TRY(bs_rotation_apply(s->rot, q, 1, dim, query_row(x, 1), err));
    bs_choose_probes(&s->probe, &x->c->probe, q, x->nprobe);
    const uint32_t D = s->padded_dim;
    const float *pq = query_row(x, 1);
    float *qt = query_row(x, 2);
    float unused;
    /* dot and cosine: |q'|^2 and sum(q') of q' = Pq, once (row 2 is a
     * scratch copy until qt overwrites it) */
    if (s->metric != BS_METRIC_L2) s->dots.residual(pq, NULL, D, qt, &x->pq_norm2, &x->pq_sum);
    /* One table for every probe, of qt: each code's stored corr turns
     * <y1, qt> into <y1, q'> of its own partition. */
    s->dots.residual(pq, s->rot_mean, D, qt, &unused, &x->half_qtsum);
    x->half_qtsum *= 0.5f;
    x->lut.tables = x->c->lut_tables;
    bs_query_lut_build_simd(qt, D, s->level, &x->lut);
    return BS_OK;
}

/* q' of probe pi: its own row for l2, Pq for dot and cosine. */
static inline const float *probe_query(const query_ctx *x, uint32_t pi) {
    return query_row(x, x->s->metric == BS_METRIC_L2 ? 3 + (size_t)pi : 1);
}

/* Probe pi's terms, and for l2 its q' (row 3 + pi): stage 1 needs |q'|,
 * stage 2 q' and sum(q'). */
static void probe_prepare(query_ctx *x, uint32_t pi) {
    const bs_searcher *s = x->s;
    const uint32_t D = s->padded_dim, dim = s->dim;
    const uint32_t p = x->c->probe.probes[pi];
    probe_terms *t = &x->c->terms[pi];
    t->ip_cq = 0.0f;
    if (s->metric == BS_METRIC_L2) {
        /* q', |q'|^2 = bs_dot(q', q') and sum(q') = bs_sum(q') in one pass */
        s->dots.residual(query_row(x, 1), s->rot_centroids + (size_t)p * D, D,
                         query_row(x, 3 + (size_t)pi), &t->qnorm2, &t->qsum);
    } else {
        t->ip_cq = bs_dot(query_row(x, 0), s->centroids + (size_t)p * dim, dim);
        t->qnorm2 = x->pq_norm2;
        t->qsum = x->pq_sum;
    }
}

/* Stage 1's estimate and bound parameters for probe pi (docs/rabitq.md,
 * "The error bound"): the query's one table, the probe's own terms. */
static bs_bound_params probe_tables(const query_ctx *x, uint32_t pi) {
    const bs_searcher *s = x->s;
    const uint32_t D = s->padded_dim;
    const probe_terms *t = &x->c->terms[pi];
    const bs_query_lut lut = x->lut;
    const float eps0 = x->params->eps0;
    /* LUT rounding errors are independent and uniform in +-delta/2 per
     * group: their sum has sd delta * sqrt(groups / 12). Widen the bound
     * by eps0 of those sds, like the code's own error. */
    const float groups = (float)(D / 4);
    const float lut_err = eps0 * lut.delta * sqrtf(groups / 12.0f);
    const int l2 = s->metric == BS_METRIC_L2;
    const float qterm = l2 ? t->qnorm2 : 1.0f - t->ip_cq;
    const float scale = l2 ? 2.0f : 1.0f;
    const bs_bound_params bp = {lut.delta,
                                lut.offset,
                                x->half_qtsum,
                                l2 ? 1.0f : 0.0f,
                                qterm,
                                scale,
                                scale * eps0 * sqrtf(t->qnorm2),
                                scale * lut_err,
                                0.25f * (float)D,
                                1.0f / sqrtf((float)(D - 1))};
    return bp;
}

/* Partition p of segment seg is checked the first time a search touches
 * it (docs/format.md, "Validation"); a corrupt one fails the search with
 * the segment named. */
static bs_status touch_partition(const bs_segment *seg, uint32_t p, bs_error *err) {
    bs_error sub;
    bs_status st = bs_segment_check_partition(seg, p, &sub);
    if (st == BS_OK) return BS_OK;
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    bs_fingerprint u;
    memcpy(u.bytes, info.uuid, 16);
    char hex[33];
    bs_seg_fingerprint_hex(&u, hex);
    return bs_fail(err, st, "segment %s: %s", hex, sub.message);
}

/* Stage 1 over probe pi's partition in segment si: every code's lower
 * bound, and the codes that may still enter the top k admitted as
 * candidates (docs/rabitq.md, "The staged scan", step 4). */
static bs_status scan_partition(query_ctx *x, uint32_t pi, size_t si,
                                const bs_bound_params *bp, bs_error *err) {
    const bs_searcher *s = x->s;
    bs_candidates *c = x->c;
    BS_TRY(touch_partition(s->segs[si], c->probe.probes[pi], err));
    bs_partition_view *vp = &c->views[(size_t)pi * s->num_segments + si];
    bs_segment_partition(s->segs[si], c->probe.probes[pi], vp);
    const bs_partition_view v = *vp;
    x->stats.partitions_probed++;
    if (v.count == 0) return BS_OK;
    size_t nblocks = bs_fastscan_num_blocks(v.count);
    if (!bs_grow((void **)&c->sums, &c->cap_sums, nblocks * 32, sizeof(uint32_t)) ||
        !bs_grow((void **)&c->lb_mask, &c->cap_lb_mask, nblocks, sizeof(uint32_t)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    x->stats.codes_scanned += v.count;
    /* One pass per block (a block's codes and factors are adjacent): the
     * kernel's sums, then every code's estimate and lower bound, written
     * over the sums, and a bit per code whose bound is not above the
     * threshold as the partition starts. Then the few with the bit set, in
     * order. */
    float *lbs = (float *)c->sums;
    const size_t k = x->k;
    size_t nheap = x->nheap;
    const float threshold0 = nheap == k ? c->heap[0] : INFINITY;
    for (size_t j = 0; j < nblocks; j++) {
        const size_t n = v.count - 32 * j < 32 ? v.count - 32 * j : 32;
        s->kernel(bs_pv_block(&v, j), 1, c->lut_tables, s->padded_dim, c->sums + 32 * j);
        s->bounds(c->sums + 32 * j, bs_pv_norm2_block(&v, j), bs_pv_s1_block(&v, j),
                  bs_pv_corr_block(&v, j), n, bp, threshold0, lbs + 32 * j, c->lb_mask + j);
    }
    /* The threshold only falls while the partition is scanned, so a code
     * whose bit is clear could not pass the exact test below; a set bit
     * (the threshold may have fallen since) only lets it reach that test. */
    for (uint32_t w = 0; w < (uint32_t)nblocks; w++) {
        uint32_t live = c->lb_mask[w];
        while (live) {
            uint32_t i = 32 * w + (uint32_t)__builtin_ctz(live);
            live &= live - 1u;
            float lb = lbs[i];
            if (nheap == k && lb > c->heap[0]) continue;
            /* Without filters the row id waits until the final
             * threshold has dropped most candidates. */
            uint64_t rowid = 0;
            if (x->filtered) {
                rowid = bs_segment_rowid(s->segs[si], v.ordinals[i]);
                if (!rowid_allowed(x->params, rowid)) continue;
            }
            const float n2 = bs_pv_norm2(&v, i), s1 = bs_pv_s1(&v, i);
            float f1 = bs_f1_from(n2, s1, bp->quarter_d, bp->inv_sqrt_dm1);
            float bound = bp->ferr * f1 + bp->lerr * fabsf(s1);
            float est = lb + bound;
            float ub = est + bound;
            bs_heap_push_bounded(c->heap, &nheap, k, ub);
            if (!bs_grow((void **)&c->cands, &c->cap_cands, c->ncands + 1, sizeof(bs_cand)))
                return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
            bs_cand *cd = &c->cands[c->ncands++];
            cd->rowid = rowid;
            cd->est = est;
            cd->lb = lb;
            cd->ordinal = v.ordinals[i];
            cd->seg = (uint32_t)si;
            cd->probe = pi;
            cd->index = i;
        }
    }
    x->nheap = nheap;
    return BS_OK;
}

/* Stage 1 for probe pi: its terms and tables, then its partition in every
 * segment the mask selects. */
static bs_status scan_probe(query_ctx *x, uint32_t pi, bs_error *err) {
    const uint8_t *share = x->params->partition_mask;
    if (share != NULL && !share[x->c->probe.probes[pi]]) return BS_OK;
    probe_prepare(x, pi);
    const bs_bound_params bp = probe_tables(x, pi);
    for (size_t si = 0; si < x->s->num_segments; si++) {
        if (x->params->segment_mask && !x->params->segment_mask[si]) continue;
        BS_TRY(scan_partition(x, pi, si, &bp, err));
    }
    return BS_OK;
}

/* Keeps exactly the codes whose lower bound is within the final k-th
 * smallest upper bound (see the comment at the top). */
static void keep_under_threshold(query_ctx *x) {
    bs_candidates *c = x->c;
    const float threshold = x->nheap == x->k ? c->heap[0] : INFINITY;
    size_t kept = 0;
    for (size_t i = 0; i < c->ncands; i++)
        if (c->cands[i].lb <= threshold) c->cands[kept++] = c->cands[i];
    c->ncands = kept;
}

static inline void resolve_rowid(const query_ctx *x, bs_cand *cd) {
    cd->rowid = bs_segment_rowid(x->s->segs[cd->seg], cd->ordinal);
}

/* The partition view of candidate cd's partition (stage 1 set it). */
static inline const bs_partition_view *cand_partition(const query_ctx *x, const bs_cand *cd) {
    return &x->c->views[(size_t)cd->probe * x->s->num_segments + cd->seg];
}

/* Survivors sit here and there in the segment, so stage 2 waits on
 * memory, not arithmetic: fetch a candidate's extra code and factor a few
 * candidates ahead. */
static inline void prefetch_extra(const query_ctx *x, const bs_cand *cd, size_t ext_bytes) {
    const bs_partition_view *av = cand_partition(x, cd);
    const uint8_t *e = av->ext + (size_t)cd->index * ext_bytes;
    for (size_t off = 0; off < ext_bytes; off += 64) prefetch_read(e + off);
    prefetch_read(e + ext_bytes - 1);
    prefetch_read(&av->s_full[cd->index]);
}

/* The full B-bit code's estimate of candidate cd (docs/rabitq.md, "The
 * estimator", stage 2). */
static inline float full_estimate(query_ctx *x, const bs_cand *cd) {
    const bs_searcher *s = x->s;
    bs_candidates *c = x->c;
    const uint32_t D = s->padded_dim, B = s->num_bits;
    const size_t plane_bytes = bs_code_bytes(D), ext_bytes = bs_ext_bytes(D, B);
    const float top = (float)(1u << (B - 1));
    const float half_levels = (float)((1u << B) - 1) * 0.5f;
    const bs_partition_view *v = cand_partition(x, cd);
    const probe_terms *t = &c->terms[cd->probe];
    const float *qp = probe_query(x, cd->probe);
    /* dot and cosine: every probe's q' is Pq, so one set of tables */
    const size_t slot = s->metric == BS_METRIC_L2 ? cd->probe : 0;
    float *tab = c->nibble_tabs + slot * ((size_t)D * 4);
    if (!c->nibble_ready[slot]) {
        s->dots.nibble_tables(qp, D, tab); /* dot.h: 16 floats per group */
        c->nibble_ready[slot] = 1;
    }
    const uint8_t *block = bs_pv_block(v, cd->index / 32);
    const uint8_t *ext = v->ext + (size_t)cd->index * ext_bytes;
    float ip_e = 0.0f;
    if (B == 9)
        ip_e = s->dots.u8_dot(ext, qp, D);
    else
        for (uint32_t j = 0; j + 1 < B; j++)
            ip_e += (float)(1u << j) * plane_dot(ext + j * plane_bytes, D, tab);
    float ip_u = top * fastscan_code_dot(block, cd->index % 32, D, tab) + ip_e;
    float ip_y = ip_u - half_levels * t->qsum;
    float s_full = v->s_full[cd->index]; /* B > 1 here */
    if (s->metric == BS_METRIC_L2)
        return bs_pv_norm2(v, cd->index) + t->qnorm2 - 2.0f * s_full * ip_y;
    return 1.0f - (s_full * ip_y + t->ip_cq);
}

/* Stage 2: every survivor of stage 1 gets the full code's estimate. They
 * are few (the threshold is the k-th smallest upper bound), and visiting
 * all of them needs no order, so no sort by lower bound; the answer is the
 * k (k * refine_factor) best by (estimate, row id), which no segment
 * layout can change. */
static bs_status refine_extra_bits(query_ctx *x, bs_error *err) {
    bs_candidates *c = x->c;
    const uint32_t D = x->s->padded_dim;
    if (!bs_grow((void **)&c->nibble_tabs, &c->cap_nibble_tabs,
                 (size_t)x->nprobe * ((size_t)D * 4), sizeof(float)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    memset(c->nibble_ready, 0, x->nprobe);
    const size_t ext_bytes = bs_ext_bytes(D, x->s->num_bits);
    const size_t ext_lines = (ext_bytes + 63) / 64;
    const size_t ahead_n = ext_lines >= STAGE2_PREFETCH_LINES / 2
                               ? 1
                               : STAGE2_PREFETCH_LINES / (ext_lines + 1);
    for (size_t i = 0; i < c->ncands; i++) {
        if (i + ahead_n < c->ncands) prefetch_extra(x, &c->cands[i + ahead_n], ext_bytes);
        c->cands[i].est = full_estimate(x, &c->cands[i]);
    }
    x->stats.codes_stage2 = c->ncands;
    return BS_OK;
}

/* Keeps the codes whose estimate is within the k-th smallest (ties
 * included, NaN kept as the sort below would see it), and looks up their
 * row ids: the top k by (estimate, row id) is among them whatever the row
 * ids. */
static void keep_top_estimates(query_ctx *x) {
    bs_candidates *c = x->c;
    size_t nh = 0;
    for (size_t i = 0; i < c->ncands; i++)
        bs_heap_push_bounded(c->heap, &nh, x->k, c->cands[i].est);
    const float t = nh == x->k ? c->heap[0] : INFINITY;
    size_t m = 0;
    for (size_t i = 0; i < c->ncands; i++) {
        if (c->cands[i].est > t) continue;
        c->cands[m] = c->cands[i];
        resolve_rowid(x, &c->cands[m]);
        m++;
    }
    c->ncands = m;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* A share's answer (bs_search_params.share): its upper bounds sorted in
 * the heap's place, every candidate as it is. Ranking and removing repeats
 * wait for the caller, who holds every share's candidates. */
static bs_status emit_share(query_ctx *x, bs_error *err) {
    bs_candidates *c = x->c;
    qsort(c->heap, x->nheap, sizeof *c->heap, cmp_float);
    c->num_ubs = x->nheap;
    c->size = 0;
    const size_t n = c->ncands;
    if (!bs_grow((void **)&c->rowids, &c->cap_out, n, sizeof(uint64_t)) ||
        !bs_match_cap((void **)&c->estimates, c->cap_out, sizeof(float)) ||
        !bs_match_cap((void **)&c->lower_bounds, c->cap_out, sizeof(float)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    for (size_t i = 0; i < n; i++) {
        c->rowids[i] = c->cands[i].rowid;
        c->estimates[i] = c->cands[i].est;
        c->lower_bounds[i] = c->cands[i].lb;
    }
    c->size = n;
    x->stats.candidates = n;
    return BS_OK;
}

static int cmp_rowid(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Position of the first of a[0..n) whose row id an earlier one has, or n.
 * Short answers compare pairs; longer ones sort a copy of the row ids
 * first and search only when it holds a repeat (a crafted file). */
static size_t first_repeated_rowid(const bs_cand *a, size_t n) {
    if (n > 32) {
        uint64_t *ids = bs_alloc(n, sizeof *ids);
        if (ids != NULL) {
            for (size_t i = 0; i < n; i++) ids[i] = a[i].rowid;
            qsort(ids, n, sizeof *ids, cmp_rowid);
            int repeat = 0;
            for (size_t i = 1; i < n && !repeat; i++) repeat = ids[i] == ids[i - 1];
            free(ids);
            if (!repeat) return n;
        }
    }
    for (size_t i = 1; i < n; i++)
        for (size_t j = 0; j < i; j++)
            if (a[j].rowid == a[i].rowid) return i;
    return n;
}

/* The answer into c's result arrays, in the order bitshard.h documents. */
static bs_status emit(query_ctx *x, bs_error *err) {
    bs_candidates *c = x->c;
    const bs_search_params *params = x->params;
    /* The gated 1-bit rerank reads candidates in lower-bound order and stops
     * early (see bs_search in bitshard.h); everything else is ranked by
     * estimate. */
    int by_lb = x->s->num_bits == 1 && params->refine_factor == 0;
    size_t nout = c->ncands;
    if (params->refine_factor > 0) {
        size_t lim;
        if (!bs_mul_ok(x->k, params->refine_factor, &lim)) lim = SIZE_MAX;
        if (nout > lim) nout = lim;
    } else if (x->s->num_bits > 1 && nout > x->k) {
        nout = x->k;
    }
    bs_sort_best(c->cands, c->ncands, nout, by_lb);
    /* A row id twice in the answer needs an ordinal in two partitions,
     * which only a crafted file has (bs_segment_verify refuses it; a
     * search does not read the whole file): the worse-ranked copy goes,
     * and the rest are ranked again. */
    for (size_t dup; nout > 1 && (dup = first_repeated_rowid(c->cands, nout)) < nout;) {
        memmove(&c->cands[dup], &c->cands[dup + 1], (c->ncands - dup - 1) * sizeof *c->cands);
        c->ncands--;
        if (nout > c->ncands) nout = c->ncands;
        bs_sort_best(c->cands, c->ncands, nout, by_lb);
    }
    /* estimates and lower_bounds share cap_out: resized alongside. The
     * result is empty (size 0) until all three succeed, so a failure here
     * leaves no stale rows behind. */
    c->size = 0;
    if (!bs_grow((void **)&c->rowids, &c->cap_out, nout, sizeof(uint64_t)) ||
        !bs_match_cap((void **)&c->estimates, c->cap_out, sizeof(float)) ||
        !bs_match_cap((void **)&c->lower_bounds, c->cap_out, sizeof(float)))
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    for (size_t i = 0; i < nout; i++) {
        c->rowids[i] = c->cands[i].rowid;
        c->estimates[i] = c->cands[i].est;
        c->lower_bounds[i] = c->cands[i].lb;
    }
    c->size = nout;
    x->stats.candidates = nout;
    return BS_OK;
}

bs_status bs_search(const bs_searcher *s, const float *q_in,
                    const bs_search_params *params, bs_candidates *c,
                    bs_search_stats *stats, bs_error *err) {
    BS_TRY(check_search_args(s, q_in, params, c, err));
    query_ctx x;
    query_ctx_init(&x, s, params, c);
    BS_TRY(reserve_scratch(&x, err));
    BS_TRY(prepare_query(&x, q_in, err));
    for (uint32_t pi = 0; pi < x.nprobe; pi++) BS_TRY(scan_probe(&x, pi, err));
    keep_under_threshold(&x);
    if (!x.filtered && !x.late_rowids)
        for (size_t i = 0; i < c->ncands; i++) resolve_rowid(&x, &c->cands[i]);
    if (s->num_bits > 1) BS_TRY(refine_extra_bits(&x, err));
    if (x.late_rowids) keep_top_estimates(&x);
    BS_TRY(params->share ? emit_share(&x, err) : emit(&x, err));
    if (stats) *stats = x.stats;
    return BS_OK;
}
