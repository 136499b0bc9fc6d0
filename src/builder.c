/* The segment builder: encodes rows as they arrive and keeps only their
 * codes and factors, grouped by partition; write() sorts each partition by
 * ordinal so the file depends only on the set of rows added. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "bitshard.h"
#include "error.h"
#include "format.h"
#include "ivf_internal.h"
#include "parallel.h"
#include "rabitq.h"
#include "values.h"

/* Rows encoded per internal batch: bounds the scratch memory of one add()
 * call whatever n the caller passes. */
#define BS_BUILD_CHUNK 1024

typedef struct bs_build_part {
    uint32_t count, cap;
    uint8_t *codes;   /* cap * D/8, row-major 1-bit codes */
    uint8_t *ext;     /* cap * ext bytes; NULL when B == 1 */
    bs_factors *f;
    uint32_t *ord;
} bs_build_part;

struct bs_segment_builder {
    uint32_t dim, D, B, k;
    bs_metric metric;
    bs_rotation_kind kind;
    uint64_t seed;
    char *column;
    uint32_t column_len;
    uint8_t uuid[16];
    float *centroids; /* k * dim */
    float *pc;        /* k * D: rotated centroids */
    float *pm;        /* D: the rotated mean of the centroids (corr) */
    uint8_t *frag_identity; /* nf * 16 */
    bs_rotation *rot;
    bs_fingerprint rot_fp, ivf_fp;
    uint32_t nf;
    uint64_t *frag_ids, *frag_rows, *prefix;
    uint8_t **seen; /* per fragment, a bitmap of added offsets (lazy) */
    bs_build_part *parts;
    uint32_t threads; /* workers per add() chunk, >= 1 */
    uint32_t write_flags; /* BS_WRITE_* of bs_builder_write */
};

typedef unsigned long long ull;

#define INVALID(...) bs_fail(err, BS_ERR_INVALID_ARGUMENT, __VA_ARGS__)
#define NOMEM() bs_fail(err, BS_ERR_NO_MEMORY, "out of memory")

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static bs_status validate_spec(const bs_segment_spec *s, bs_error *err) {
    if (s->dim == 0) return INVALID("dim must be >= 1, got 0");
    if (bs_padded_dim(s->dim) == 0 || s->dim > 0x7FFFFFFFu)
        return INVALID("dim %u is too large", s->dim);
    if (s->num_bits < 1 || s->num_bits > 9)
        return INVALID("num_bits must be in 1..9, got %u", s->num_bits);
    if ((unsigned)s->metric > BS_METRIC_DOT)
        return INVALID("metric must be 0 (l2), 1 (cosine) or 2 (dot), got %u",
                       (unsigned)s->metric);
    if ((unsigned)s->rotation_kind > BS_ROTATION_MATRIX)
        return INVALID("rotation_kind must be 0 (fast) or 1 (matrix), got %u",
                       (unsigned)s->rotation_kind);
    if (s->num_partitions == 0)
        return INVALID("num_partitions must be >= 1, got 0");
    if (s->num_partitions > 0x7FFFFFFFu)
        return INVALID("num_partitions %u is too large", s->num_partitions);
    if (s->centroids == NULL) return INVALID("centroids is NULL");
    size_t n = (size_t)s->num_partitions * s->dim;
    for (size_t i = 0; i < n; i++) {
        if (!bs_value_refused(s->centroids[i])) continue;
        if (!isfinite(s->centroids[i]))
            return INVALID("centroids has a non-finite value (%g) at "
                           "partition %zu, dimension %zu",
                           (double)s->centroids[i], i / s->dim, i % s->dim);
        return INVALID("centroids has a value too large (%g) at partition %zu, "
                       "dimension %zu " BS_ACCEPTED_VALUES,
                       (double)s->centroids[i], i / s->dim, i % s->dim);
    }
    if (s->column == NULL) return INVALID("column is NULL");
    size_t clen = strlen(s->column);
    if (clen == 0) return INVALID("column must not be empty");
    if (clen > BS_SEG_MAX_COLUMN)
        return INVALID("column name is %zu bytes, more than %u", clen,
                       BS_SEG_MAX_COLUMN);
    if (!bs_seg_utf8_valid((const uint8_t *)s->column, clen))
        return INVALID("column name is not valid UTF-8");
    if (s->uuid == NULL) return INVALID("uuid is NULL");
    return bs_seg_check_fragment_table(s->fragment_ids, s->fragment_rows,
                                       s->num_fragments, err);
}

void bs_builder_free(bs_segment_builder *b) {
    if (b == NULL) return;
    if (b->parts) {
        for (uint32_t p = 0; p < b->k; p++) {
            free(b->parts[p].codes);
            free(b->parts[p].ext);
            free(b->parts[p].f);
            free(b->parts[p].ord);
        }
        free(b->parts);
    }
    if (b->seen) {
        for (uint32_t i = 0; i < b->nf; i++) free(b->seen[i]);
        free(b->seen);
    }
    bs_rotation_free(b->rot);
    free(b->column);
    free(b->centroids);
    free(b->pc);
    free(b->pm);
    free(b->frag_identity);
    free(b->frag_ids);
    free(b->frag_rows);
    free(b->prefix);
    free(b);
}

/* The dense rotation goes through BLAS, whose rounding may depend on a
 * row's batch and place in it (rotation.c, matrix_apply). One row per call
 * keeps every row's code a function of the row alone, so the file does not
 * depend on how rows were batched, and a merge equals a single build. */
/* Both rotation kinds give each row the same bits whatever the batch
 * (rotation.c sums in a fixed order, no BLAS), so a batch is rotated at once
 * and a merged segment still equals a single build byte for byte. */
static bs_status rotate_rows(const bs_segment_builder *b, const float *x,
                             size_t n, float *out, bs_error *err) {
    return bs_rotation_apply(b->rot, x, n, b->dim, out, err);
}

bs_status bs_builder_create(const bs_segment_spec *spec,
                            bs_segment_builder **out, bs_error *err) {
    bs_error_clear(err);
    if (out == NULL) return INVALID("out is NULL");
    *out = NULL;
    if (spec == NULL) return INVALID("spec is NULL");
    BS_TRY(validate_spec(spec, err));

    bs_segment_builder *b = bs_zalloc(1, sizeof *b);
    if (b == NULL) return NOMEM();
    b->threads = 1;
    b->dim = spec->dim;
    b->B = spec->num_bits;
    b->k = spec->num_partitions;
    b->metric = spec->metric;
    b->kind = spec->rotation_kind;
    b->seed = spec->rotation_seed;
    b->nf = spec->num_fragments;
    memcpy(b->uuid, spec->uuid, 16);
    b->column_len = (uint32_t)strlen(spec->column);

    bs_status st = bs_rotation_create(b->kind, b->dim, b->seed, &b->rot, err);
    if (st != BS_OK) {
        bs_builder_free(b);
        return st;
    }
    b->D = bs_rotation_padded_dim(b->rot);
    size_t ncent = (size_t)b->k * b->dim;
    size_t nf1 = (size_t)b->nf + 1;
    b->column = bs_alloc((size_t)b->column_len + 1, 1);
    b->centroids = bs_alloc(ncent, sizeof(float));
    b->pc = bs_alloc2(b->k, b->D, sizeof(float));
    b->pm = bs_alloc(b->D, sizeof(float));
    b->frag_identity = bs_zalloc(nf1, 16);
    b->frag_ids = bs_alloc(nf1, sizeof(uint64_t));
    b->frag_rows = bs_alloc(nf1, sizeof(uint64_t));
    b->prefix = bs_alloc(nf1, sizeof(uint64_t));
    b->seen = bs_zalloc(nf1, sizeof(uint8_t *));
    b->parts = bs_zalloc(b->k, sizeof *b->parts);
    if (!b->column || !b->centroids || !b->pc || !b->pm || !b->frag_identity ||
        !b->frag_ids ||
        !b->frag_rows || !b->prefix || !b->seen || !b->parts) {
        bs_builder_free(b);
        return NOMEM();
    }
    memcpy(b->column, spec->column, b->column_len + 1);
    memcpy(b->centroids, spec->centroids, ncent * sizeof(float));
    b->prefix[0] = 0;
    for (uint32_t i = 0; i < b->nf; i++) {
        b->frag_ids[i] = spec->fragment_ids[i];
        b->frag_rows[i] = spec->fragment_rows[i];
        b->prefix[i + 1] = b->prefix[i] + spec->fragment_rows[i];
    }
    st = rotate_rows(b, b->centroids, b->k, b->pc, err);
    if (st == BS_OK)
        st = bs_centroid_mean_rotated(b->rot, b->centroids, b->k, b->dim, b->pm, err);
    if (st != BS_OK) {
        bs_builder_free(b);
        return st;
    }
    b->rot_fp = bs_rotation_fingerprint(b->rot);
    b->ivf_fp = bs_ivf_fingerprint(b->centroids, b->k, b->dim, b->metric);
    *out = b;
    return BS_OK;
}

/* 1 when every value is finite. No early exit, so the loop vectorises:
 * the common all-finite row costs one pass. */
static int row_finite(const float *x, uint32_t n) {
    uint32_t bad = 0;
    for (uint32_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, &x[j], sizeof bits);
        bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
}

static int bit_get(const uint8_t *m, uint32_t i) {
    return (m[i >> 3] >> (i & 7)) & 1;
}
static void bit_set(uint8_t *m, uint32_t i) {
    m[i >> 3] |= (uint8_t)(1u << (i & 7));
}
static void bit_clear(uint8_t *m, uint32_t i) {
    m[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static int part_reserve(bs_build_part *pt, uint32_t need, size_t code_bytes,
                        size_t ext_bytes) {
    if (need <= pt->cap) return 1;
    uint64_t cap = pt->cap ? (uint64_t)pt->cap * 2 : 64;
    while (cap < need) cap *= 2;
    if (cap > UINT32_MAX) cap = UINT32_MAX;
    uint8_t *codes = bs_realloc(pt->codes, (size_t)cap, code_bytes);
    if (codes == NULL) return 0;
    pt->codes = codes;
    if (ext_bytes) {
        uint8_t *ext = bs_realloc(pt->ext, (size_t)cap, ext_bytes);
        if (ext == NULL) return 0;
        pt->ext = ext;
    }
    bs_factors *f = bs_realloc(pt->f, (size_t)cap, sizeof *f);
    if (f == NULL) return 0;
    pt->f = f;
    uint32_t *ord = bs_realloc(pt->ord, (size_t)cap, sizeof *ord);
    if (ord == NULL) return 0;
    pt->ord = ord;
    pt->cap = (uint32_t)cap;
    return 1;
}

/* One chunk of an add() call, shared by its workers. Rows are split in
 * contiguous ranges by worker index; each row's codes depend on the row
 * alone, and their slots in the partitions are handed out in row order
 * between the two phases, so the builder's state is the same for every
 * thread count. */
typedef struct chunk_job {
    bs_segment_builder *b;
    const float *x;   /* n * dim input rows (normalised for cosine) */
    size_t n, row_base;
    uint32_t fi;
    const uint32_t *offsets, *ords;
    float *xn, *po;   /* normalised rows, rotated rows: n * dim, n * D */
    uint32_t *assign, *slot;
    float **scratch;  /* per worker: D * 3 floats */
    bs_status *st;
    bs_error *errs;
} chunk_job;

/* Phase 1: normalise (cosine) and assign a worker's rows. */
static void chunk_assign(void *arg, uint32_t w, uint32_t nw) {
    const chunk_job *j = arg;
    const bs_segment_builder *b = j->b;
    const uint32_t dim = b->dim;
    size_t i0, i1;
    bs_parallel_share(j->n, 16, w, nw, &i0, &i1);
    const float *x = j->x;
    if (b->metric == BS_METRIC_COSINE) {
        for (size_t i = i0; i < i1; i++)
            bs_normalize_row(j->x + i * dim, dim, j->xn + i * dim);
        x = j->xn;
    }
    j->st[w] = i1 > i0 ? bs_ivf_assign_rows(b->centroids, b->k, dim, 0, 0, x + i0 * dim,
                                            i1 - i0, j->assign + i0, NULL, 1, &j->errs[w])
                       : BS_OK;
}

/* Phase 2: rotate a worker's rows and encode each into its slot. */
static void chunk_encode(void *arg, uint32_t w, uint32_t nw) {
    const chunk_job *j = arg;
    const bs_segment_builder *b = j->b;
    const uint32_t dim = b->dim, D = b->D;
    size_t i0, i1;
    bs_parallel_share(j->n, 16, w, nw, &i0, &i1);
    j->st[w] = BS_OK;
    if (i1 == i0) return;
    const float *x = b->metric == BS_METRIC_COSINE ? j->xn : j->x;
    j->st[w] = rotate_rows(b, x + i0 * dim, i1 - i0, j->po + i0 * D, &j->errs[w]);
    if (j->st[w] != BS_OK) return;
    const size_t cb = bs_code_bytes(D), eb = bs_ext_bytes(D, b->B);
    float *r = j->scratch[w];
    for (size_t i = i0; i < i1; i++) {
        const float *pc = b->pc + (size_t)j->assign[i] * D;
        const float *row = j->po + i * D;
        for (uint32_t t = 0; t < D; t++) r[t] = row[t] - pc[t];
        if (!row_finite(r, D)) {
            j->st[w] = bs_fail(&j->errs[w], BS_ERR_INVALID_DATA,
                               "row %zu (fragment %llu, offset %u) is too large "
                               "to encode: its rotated residual overflows float",
                               j->row_base + i, (ull)b->frag_ids[j->fi],
                               j->offsets[j->row_base + i]);
            return;
        }
        bs_build_part *pt = &b->parts[j->assign[i]];
        uint32_t c = j->slot[i];
        bs_rabitq_encode(r, D, b->B, pt->codes + (size_t)c * cb,
                         eb ? pt->ext + (size_t)c * eb : NULL, &pt->f[c], r + D);
        pt->ord[c] = j->ords[i];
    }
}

/* The first failing worker's error: workers hold rows in order, so it
 * names the row a single thread would have named. */
static bs_status first_failure(const chunk_job *j, uint32_t nw, bs_error *err) {
    for (uint32_t w = 0; w < nw; w++) {
        if (j->st[w] != BS_OK) {
            if (err) *err = j->errs[w];
            return j->st[w];
        }
    }
    return BS_OK;
}

/* Normalises (cosine), assigns, rotates and encodes rows [0, n) of one
 * chunk, appending them to their partitions. */
static bs_status encode_chunk(chunk_job *j, uint32_t nw, bs_error *err) {
    bs_segment_builder *b = j->b;
    const uint32_t D = b->D;
    const size_t cb = bs_code_bytes(D), eb = bs_ext_bytes(D, b->B);
    bs_parallel_run(nw, chunk_assign, j);
    BS_TRY(first_failure(j, nw, err));
    for (size_t i = 0; i < j->n; i++) {
        bs_build_part *pt = &b->parts[j->assign[i]];
        if (!part_reserve(pt, pt->count + 1, cb, eb)) return NOMEM();
        j->slot[i] = pt->count++;
    }
    bs_parallel_run(nw, chunk_encode, j);
    return first_failure(j, nw, err);
}

bs_status bs_builder_set_fragment_identity(bs_segment_builder *b,
                                           uint64_t fragment_id,
                                           const uint8_t fp[16], bs_error *err) {
    bs_error_clear(err);
    if (b == NULL) return INVALID("builder is NULL");
    if (fp == NULL) return INVALID("fp is NULL");
    for (uint32_t i = 0; i < b->nf; i++) {
        if (b->frag_ids[i] == fragment_id) {
            memcpy(b->frag_identity + (size_t)i * 16, fp, 16);
            return BS_OK;
        }
    }
    return INVALID("fragment_id %llu is not one of the segment's %u fragments",
                   (ull)fragment_id, b->nf);
}

bs_status bs_builder_set_write_flags(bs_segment_builder *b, uint32_t flags,
                                     bs_error *err) {
    bs_error_clear(err);
    if (b == NULL) return INVALID("builder is NULL");
    BS_TRY(bs_check_write_flags(flags, err));
    b->write_flags = flags;
    return BS_OK;
}

void bs_builder_set_threads(bs_segment_builder *b, uint32_t num_threads) {
    if (b == NULL) return;
    b->threads = num_threads < 1 ? 1 : num_threads > BS_MAX_THREADS ? BS_MAX_THREADS
                                                                     : num_threads;
}

bs_status bs_builder_add(bs_segment_builder *b, const float *x, size_t n,
                         uint32_t fragment_index, const uint32_t *offsets,
                         bs_error *err) {
    bs_error_clear(err);
    if (b == NULL) return INVALID("builder is NULL");
    if (n == 0) return BS_OK;
    if (x == NULL) return INVALID("x is NULL");
    if (offsets == NULL) return INVALID("offsets is NULL");
    if (fragment_index >= b->nf)
        return INVALID("fragment_index %u is out of range: the segment has "
                       "%u fragments",
                       fragment_index, b->nf);
    const uint32_t fi = fragment_index, dim = b->dim;
    const ull fid = b->frag_ids[fi];
    const uint64_t rows = b->frag_rows[fi];

    /* Every row is checked before any is encoded, so a refused call adds
     * nothing. */
    for (size_t i = 0; i < n; i++) {
        if (offsets[i] >= rows)
            return INVALID("row %zu: offset %u is out of range for fragment "
                           "%llu with %llu rows",
                           i, offsets[i], fid, (ull)rows);
        /* The accepted-values rule (values.h): within it no quantity of
         * the encoder or of a search overflows float. */
        const float *row = x + i * dim;
        if (bs_row_accepted(row, dim)) continue;
        const uint32_t j = bs_first_refused(row, dim);
        if (!isfinite(row[j]))
            return bs_fail(err, BS_ERR_INVALID_DATA,
                           "row %zu (fragment %llu, offset %u) has a "
                           "non-finite value at dimension %u",
                           i, fid, offsets[i], j);
        return bs_fail(err, BS_ERR_INVALID_DATA,
                       "row %zu (fragment %llu, offset %u) is too large: value %g at "
                       "dimension %u " BS_ACCEPTED_VALUES,
                       i, fid, offsets[i], (double)row[j], j);
    }
    if (b->seen[fi] == NULL) {
        b->seen[fi] = bs_zalloc((size_t)(rows / 8 + 1), 1);
        if (b->seen[fi] == NULL) return NOMEM();
    }
    uint8_t *seen = b->seen[fi];
    for (size_t i = 0; i < n; i++) {
        if (bit_get(seen, offsets[i])) {
            for (size_t j = 0; j < i; j++) bit_clear(seen, offsets[j]);
            return INVALID("row %zu: fragment %llu offset %u was already "
                           "added",
                           i, fid, offsets[i]);
        }
        bit_set(seen, offsets[i]);
    }

    /* Partition counts before the call, to undo a failure midway. */
    const uint32_t nw = b->threads;
    uint32_t *old = bs_alloc(b->k, sizeof *old);
    size_t chunk = BS_BUILD_CHUNK * (size_t)nw;
    if (n < chunk) chunk = n;
    const uint32_t D = b->D;
    float *xn = b->metric == BS_METRIC_COSINE
                    ? bs_alloc2(chunk, dim, sizeof(float))
                    : NULL;
    float *po = bs_alloc2(chunk, D, sizeof(float));
    uint32_t *assign = bs_alloc(chunk, sizeof *assign);
    uint32_t *slot = bs_alloc(chunk, sizeof *slot);
    uint32_t *ords = bs_alloc(chunk, sizeof *ords);
    float *scratch[BS_MAX_THREADS] = {0};
    bs_status wst[BS_MAX_THREADS];
    bs_error *werr = bs_alloc(nw, sizeof *werr);
    int ok = old && po && assign && slot && ords && werr &&
             (b->metric != BS_METRIC_COSINE || xn);
    for (uint32_t w = 0; w < nw && ok; w++)
        ok = (scratch[w] = bs_alloc2(D, 3, sizeof(float))) != NULL;
    bs_status st = BS_OK;
    if (!ok) {
        st = NOMEM();
    } else {
        for (uint32_t p = 0; p < b->k; p++) old[p] = b->parts[p].count;
        for (size_t s = 0; s < n && st == BS_OK; s += chunk) {
            size_t m = n - s < chunk ? n - s : chunk;
            for (size_t i = 0; i < m; i++)
                ords[i] = (uint32_t)(b->prefix[fi] + offsets[s + i]);
            chunk_job job = {b, x + s * dim, m, s, fi, offsets, ords, xn, po,
                             assign, slot, scratch, wst, werr};
            st = encode_chunk(&job, nw, err);
        }
        if (st != BS_OK)
            for (uint32_t p = 0; p < b->k; p++) b->parts[p].count = old[p];
    }
    if (st != BS_OK)
        for (size_t i = 0; i < n; i++) bit_clear(seen, offsets[i]);
    for (uint32_t w = 0; w < nw; w++) free(scratch[w]);
    free(werr);
    free(old);
    free(xn);
    free(po);
    free(assign);
    free(slot);
    free(ords);
    return st;
}

/* The buffers one partition is assembled in, for up to n rows. */
typedef struct write_bufs {
    uint8_t *block, *codes, *ext;
    float *norm2, *s1, *corr, *s_full, *dir;
    uint32_t *ord;
    uint64_t *order;
} write_bufs;

static void write_bufs_free(write_bufs *w) {
    free(w->block);
    free(w->codes);
    free(w->ext);
    free(w->norm2);
    free(w->s1);
    free(w->corr);
    free(w->s_full);
    free(w->dir);
    free(w->ord);
    free(w->order);
}

static int write_bufs_alloc(write_bufs *w, uint32_t n, uint64_t block_size,
                            uint32_t D, size_t cb, size_t eb) {
    memset(w, 0, sizeof *w);
    if (block_size > SIZE_MAX) return 0;
    w->block = bs_alloc((size_t)block_size, 1);
    w->codes = bs_alloc(n, cb);
    w->ext = bs_alloc(n, eb ? eb : 1);
    w->norm2 = bs_alloc(n, sizeof(float));
    w->s1 = bs_alloc(n, sizeof(float));
    w->corr = bs_alloc(n, sizeof(float));
    w->s_full = bs_alloc(n, sizeof(float));
    w->dir = bs_alloc(D, sizeof(float));
    w->ord = bs_alloc(n, sizeof(uint32_t));
    w->order = bs_alloc(n, sizeof(uint64_t));
    return w->block && w->codes && w->ext && w->norm2 && w->s1 && w->corr &&
           w->s_full && w->dir && w->ord && w->order;
}

bs_status bs_builder_write(bs_segment_builder *b, const char *path,
                           bs_error *err) {
    bs_error_clear(err);
    if (b == NULL) return INVALID("builder is NULL");
    if (path == NULL) return INVALID("path is NULL");
    const uint32_t D = b->D, B = b->B;
    const size_t cb = bs_code_bytes(D), eb = bs_ext_bytes(D, B);

    uint32_t max_count = 0;
    for (uint32_t p = 0; p < b->k; p++)
        if (b->parts[p].count > max_count) max_count = b->parts[p].count;
    bs_part_layout L;
    if (!bs_part_layout_compute(max_count, D, B, &L)) return NOMEM();
    write_bufs wb;
    if (!write_bufs_alloc(&wb, max_count, L.size, D, cb, eb)) {
        write_bufs_free(&wb);
        return NOMEM();
    }

    bs_seg_params prm;
    memset(&prm, 0, sizeof prm);
    prm.dim = b->dim;
    prm.padded_dim = D;
    prm.num_bits = B;
    prm.metric = b->metric;
    prm.rotation_kind = b->kind;
    prm.rotation_seed = b->seed;
    prm.num_partitions = b->k;
    memcpy(prm.uuid, b->uuid, 16);
    prm.rotation_fp = b->rot_fp;
    prm.ivf_fp = b->ivf_fp;
    prm.column = b->column;
    prm.column_len = b->column_len;
    prm.centroids = b->centroids;
    prm.flags = b->write_flags;
    prm.fragment_ids = b->frag_ids;
    prm.fragment_rows = b->frag_rows;
    prm.fragment_identity = b->frag_identity;
    prm.num_fragments = b->nf;

    bs_seg_writer w;
    bs_status st = bs_seg_writer_open(&w, path, &prm, err);
    for (uint32_t p = 0; p < b->k && st == BS_OK; p++) {
        const bs_build_part *pt = &b->parts[p];
        uint32_t n = pt->count;
        /* Ordinals are unique, so (ordinal, index) keys sort by ordinal
         * alone and the result does not depend on the order of add(). */
        for (uint32_t i = 0; i < n; i++)
            wb.order[i] = ((uint64_t)pt->ord[i] << 32) | i;
        qsort(wb.order, n, sizeof *wb.order, cmp_u64);
        /* corr comes from the stored code and the artifacts only, as a
         * version 2 upgrade computes it (docs/format.md, "The factors"). */
        bs_corr_direction(b->metric, b->pm, b->pc + (size_t)p * D, D, wb.dir);
        for (uint32_t i = 0; i < n; i++) {
            size_t src = (size_t)(wb.order[i] & 0xFFFFFFFFu);
            uint8_t *code = wb.codes + (size_t)i * cb;
            memcpy(code, pt->codes + src * cb, cb);
            wb.ord[i] = (uint32_t)(wb.order[i] >> 32);
            if (eb) memcpy(wb.ext + (size_t)i * eb, pt->ext + src * eb, eb);
            wb.norm2[i] = pt->f[src].norm2;
            wb.s1[i] = pt->f[src].s1;
            wb.s_full[i] = pt->f[src].s_full;
            wb.corr[i] = bs_corr_from_code(code, wb.dir, D);
        }
        bs_part_layout pl;
        bs_part_layout_compute(n, D, B, &pl);
        bs_part_rows rows = {wb.codes, wb.norm2, wb.s1, wb.corr, wb.ord,
                             eb ? wb.ext : NULL, B > 1 ? wb.s_full : NULL};
        bs_part_fill(wb.block, &pl, n, D, B, &rows);
        st = bs_seg_writer_partition(&w, n, wb.block, &pl, err);
    }
    if (st == BS_OK)
        st = bs_seg_writer_finish(&w, err);
    else
        bs_seg_writer_abort(&w);
    write_bufs_free(&wb);
    return st;
}
