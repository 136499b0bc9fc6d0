/* Remapping segments: the encoded rows of one or more segments written
 * under new row ids (after the source moved its rows, e.g. a compaction),
 * without reading or encoding a vector. Row ids become output ordinals
 * through the new fragment table; partition p of the output is every
 * input's partition p, minus dropped rows, sorted by new ordinal and
 * repacked (docs/format.md, "Remapping"). */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "format.h"
#include "repack.h"
#include "segment.h"

typedef unsigned long long ull;

#define INVALID(...) bs_fail(err, BS_ERR_INVALID_ARGUMENT, __VA_ARGS__)
#define NOMEM() bs_fail(err, BS_ERR_NO_MEMORY, "out of memory")
/* Map entries looked up ahead of their use in remap_partition. */
#define PREFETCH_AHEAD 16
/* A new ordinal meaning "dropped": ordinals are below 2^32 - 1. */
#define DROPPED UINT32_MAX

/* An output fragment: its id and table position, sorted by id for lookup. */
typedef struct frag_pos {
    uint64_t id;
    uint32_t pos;
} frag_pos;

/* A row of an output partition: its new ordinal and where it comes from. */
typedef struct src_row {
    uint32_t ordinal;
    uint32_t input;
    uint32_t j; /* row index in the input's partition */
} src_row;

typedef struct remap_state {
    const bs_remap_input *in;
    size_t n;
    uint32_t nf;
    frag_pos *by_id;   /* nf, sorted by id */
    uint64_t *prefix;  /* nf + 1: first ordinal of each table entry */
    uint32_t **newo;   /* per input, per ordinal: new ordinal or DROPPED */
    uint8_t *seen;     /* bitmap over output ordinals */
    src_row *rows;     /* one output partition */
    src_row *tmp;      /* as rows: the merge of sorted runs */
    size_t *run_end;   /* n: end of each input's run in rows */
    bs_partition_view *views; /* n: the inputs' views of one partition */
    bs_repack rp;
} remap_state;

static int cmp_frag_pos(const void *a, const void *b) {
    const frag_pos *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

static int cmp_src_row(const void *a, const void *b) {
    const src_row *x = a, *y = b;
    return (x->ordinal > y->ordinal) - (x->ordinal < y->ordinal);
}

static void remap_state_free(remap_state *m) {
    if (m->newo)
        for (size_t i = 0; i < m->n; i++) BS_FREE(m->newo[i]);
    BS_FREE(m->newo);
    BS_FREE(m->by_id);
    BS_FREE(m->prefix);
    BS_FREE(m->seen);
    BS_FREE(m->rows);
    BS_FREE(m->tmp);
    BS_FREE(m->run_end);
    BS_FREE(m->views);
    bs_repack_free(&m->rp);
}

static bs_status check_args(const bs_remap_input *in, size_t n,
                            const uint8_t uuid[16], const char *path,
                            bs_error *err) {
    if (in == NULL || n == 0) return INVALID("remap needs at least one segment");
    if (n > UINT32_MAX) return INVALID("remap of %zu segments, at most 2^32 - 1", n);
    if (uuid == NULL) return INVALID("uuid is NULL");
    if (path == NULL) return INVALID("path is NULL");
    for (size_t i = 0; i < n; i++) {
        if (in[i].segment == NULL) return INVALID("input %zu: segment is NULL", i);
        if (in[i].row_map == NULL && in[i].map_len > 0)
            return INVALID("input %zu: row_map is NULL", i);
    }
    for (size_t i = 1; i < n; i++) {
        bs_error sub;
        if (bs_segment_check_compatible(in[0].segment, in[i].segment, &sub) != BS_OK)
            return bs_fail(err, sub.code, "cannot remap segment %zu: %s", i,
                           sub.message);
    }
    /* As merge: every input is checked whole before its rows are vouched
     * for by the output's checksums. */
    for (size_t i = 0; i < n; i++) {
        bs_error sub;
        bs_status st = bs_segment_verify(in[i].segment, &sub);
        if (st != BS_OK)
            return bs_fail(err, st, "cannot remap segment %zu: %s", i, sub.message);
    }
    return BS_OK;
}

/* The output table sorted by id, and its ordinal prefix sums. */
static bs_status plan_table(remap_state *m, const uint64_t *ids,
                            const uint64_t *rows, bs_error *err) {
    m->by_id = bs_alloc(m->nf, sizeof *m->by_id);
    m->prefix = bs_alloc((size_t)m->nf + 1, sizeof *m->prefix);
    if (!m->by_id || !m->prefix) return NOMEM();
    m->prefix[0] = 0;
    for (uint32_t f = 0; f < m->nf; f++) {
        m->by_id[f].id = ids[f];
        m->by_id[f].pos = f;
        m->prefix[f + 1] = m->prefix[f] + rows[f];
    }
    qsort(m->by_id, m->nf, sizeof *m->by_id, cmp_frag_pos);
    /* One bit per output ordinal: at most 2^32 - 1 of them (checked). */
    m->seen = bs_zalloc((size_t)(m->prefix[m->nf] / 8 + 1), 1);
    return m->seen ? BS_OK : NOMEM();
}

/* The table position of fragment id, or -1. */
static int64_t find_fragment(const remap_state *m, uint64_t id) {
    size_t lo = 0, hi = m->nf;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (m->by_id[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < m->nf && m->by_id[lo].id == id ? (int64_t)m->by_id[lo].pos : -1;
}

/* Ordinals of segment seg: the rows of its fragments. */
static uint64_t ordinal_count(const bs_segment *seg) {
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    uint64_t total = 0;
    for (uint32_t f = 0; f < info.num_fragments; f++) {
        uint64_t id, rows;
        bs_segment_fragment(seg, f, &id, &rows);
        total += rows;
    }
    return total;
}

/* Names the entry mapped to output ordinal o before entry (cur_i, cur_k),
 * for the message about the second one: only entries already translated
 * are looked at. */
static void first_with(const remap_state *m, uint32_t o, size_t cur_i,
                       uint64_t cur_k, size_t *in_out, uint64_t *ord_out) {
    for (size_t i = 0; i <= cur_i; i++)
        for (uint64_t k = 0; k < (i == cur_i ? cur_k : m->in[i].map_len); k++)
            if (m->newo[i][k] == o) {
                *in_out = i;
                *ord_out = k;
                return;
            }
}

/* Input i's map as new ordinals, every entry checked. */
static bs_status translate(remap_state *m, size_t i, bs_error *err) {
    const bs_remap_input *in = &m->in[i];
    uint64_t want = ordinal_count(in->segment);
    if (in->map_len != want)
        return INVALID("input %zu: row_map has %llu entries, the segment has "
                       "%llu ordinals (the rows of its fragments)",
                       i, (ull)in->map_len, (ull)want);
    uint32_t *out = bs_alloc((size_t)want, sizeof *out);
    if (out == NULL) return NOMEM();
    m->newo[i] = out;
    for (uint64_t k = 0; k < want; k++) {
        uint64_t v = in->row_map[k];
        if (v == BS_REMAP_DROP) {
            out[k] = DROPPED;
            continue;
        }
        uint64_t fid = v >> 32, off = v & 0xFFFFFFFFu;
        int64_t pos = find_fragment(m, fid);
        if (pos < 0)
            return INVALID("input %zu ordinal %llu maps to row id %llu: "
                           "fragment %llu is not in the output fragment table",
                           i, (ull)k, (ull)v, (ull)fid);
        uint64_t rows = m->prefix[pos + 1] - m->prefix[pos];
        if (off >= rows)
            return INVALID("input %zu ordinal %llu maps to row id %llu: offset "
                           "%llu is out of range for fragment %llu (%llu rows)",
                           i, (ull)k, (ull)v, (ull)off, (ull)fid, (ull)rows);
        uint32_t o = (uint32_t)(m->prefix[pos] + off);
        if (m->seen[o >> 3] & (1u << (o & 7))) {
            size_t fi = 0;
            uint64_t fk = 0;
            first_with(m, o, i, k, &fi, &fk);
            return INVALID("input %zu ordinal %llu and input %zu ordinal %llu "
                           "both map to row id %llu (fragment %llu offset %llu)",
                           fi, (ull)fk, i, (ull)k, (ull)v, (ull)fid, (ull)off);
        }
        m->seen[o >> 3] |= (uint8_t)(1u << (o & 7));
        out[k] = o;
    }
    return BS_OK;
}

/* Rows of partition p over all inputs, kept or not: a bound on the kept
 * ones that needs no lookup in the maps. */
static uint64_t input_count(const remap_state *m, uint32_t p) {
    uint64_t c = 0;
    for (size_t i = 0; i < m->n; i++) {
        bs_partition_view v;
        bs_segment_partition(m->in[i].segment, p, &v);
        c += v.count;
    }
    return c;
}

/* Kept rows of partition p over all inputs (exact). */
static uint64_t kept_count(const remap_state *m, uint32_t p) {
    uint64_t c = 0;
    for (size_t i = 0; i < m->n; i++) {
        bs_partition_view v;
        bs_segment_partition(m->in[i].segment, p, &v);
        for (size_t j = 0; j < v.count; j++)
            c += m->newo[i][v.ordinals[j]] != DROPPED;
    }
    return c;
}

static int run_sorted(const src_row *r, size_t lo, size_t hi) {
    for (size_t k = lo + 1; k < hi; k++)
        if (r[k - 1].ordinal > r[k].ordinal) return 0;
    return 1;
}

/* m->rows[0, c) by ordinal. Each input's rows come in its partition order,
 * and a remap keeps the order of rows within a fragment (a compaction does),
 * so the runs are usually sorted already: they are then merged in linear
 * time, one after the other (a few inputs); otherwise, or with many
 * inputs, qsort. Ordinals are unique (checked), so the order is total and
 * every way gives the same rows. */
static void sort_rows(remap_state *m, size_t c) {
    size_t runs = 0, lo = 0;
    int sorted = 1;
    for (size_t i = 0; i < m->n; i++) {
        size_t hi = m->run_end[i];
        if (hi > lo) {
            runs++;
            sorted = sorted && run_sorted(m->rows, lo, hi);
        }
        lo = hi;
    }
    if (!sorted || runs > 8) {
        qsort(m->rows, c, sizeof *m->rows, cmp_src_row);
        return;
    }
    /* Merge [0, done) with each next run, through tmp. */
    size_t done = 0;
    for (size_t i = 0; i < m->n; i++) {
        size_t a = 0, b = done, end = m->run_end[i], k = 0;
        if (end == done) continue;
        if (done == 0 || m->rows[done - 1].ordinal < m->rows[done].ordinal) {
            done = end; /* already in order after what came before */
            continue;
        }
        while (a < done && b < end)
            m->tmp[k++] = m->rows[a].ordinal < m->rows[b].ordinal ? m->rows[a++]
                                                                  : m->rows[b++];
        while (a < done) m->tmp[k++] = m->rows[a++];
        while (b < end) m->tmp[k++] = m->rows[b++];
        memcpy(m->rows, m->tmp, end * sizeof *m->rows);
        done = end;
    }
}

static bs_status remap_partition(remap_state *m, uint32_t p, bs_seg_writer *w,
                                 bs_error *err) {
    size_t c = 0;
    for (size_t i = 0; i < m->n; i++) {
        const bs_partition_view *v = &m->views[i];
        bs_segment_partition(m->in[i].segment, p, &m->views[i]);
        const uint32_t *newo = m->newo[i];
        for (size_t j = 0; j < v->count; j++) {
            /* The ordinals of a partition are scattered over the map: its
             * entries are fetched ahead, or each one waits on memory. */
            if (j + PREFETCH_AHEAD < v->count)
                __builtin_prefetch(&newo[v->ordinals[j + PREFETCH_AHEAD]]);
            uint32_t o = newo[v->ordinals[j]];
            if (o == DROPPED) continue;
            m->rows[c].ordinal = o;
            m->rows[c].input = (uint32_t)i;
            m->rows[c].j = (uint32_t)j;
            c++;
        }
        m->run_end[i] = c;
    }
    sort_rows(m, c);
    bs_repack_begin(&m->rp, (uint32_t)c);
    for (size_t r = 0; r < c; r++)
        bs_repack_put(&m->rp, &m->views[m->rows[r].input], m->rows[r].j,
                      m->rows[r].ordinal);
    return bs_repack_write(&m->rp, w, err);
}

bs_status bs_segment_remap(const bs_remap_input *inputs, size_t n,
                           const uint64_t *fragment_ids,
                           const uint64_t *fragment_rows,
                           uint32_t num_fragments,
                           const uint8_t *fragment_identities,
                           const uint8_t uuid[16], const char *path, bs_error *err) {
    return bs_segment_remap_flags(inputs, n, fragment_ids, fragment_rows,
                                  num_fragments, fragment_identities, uuid, path, 0,
                                  err);
}

bs_status bs_segment_remap_flags(const bs_remap_input *inputs, size_t n,
                                 const uint64_t *fragment_ids,
                                 const uint64_t *fragment_rows,
                                 uint32_t num_fragments,
                                 const uint8_t *fragment_identities,
                                 const uint8_t uuid[16], const char *path,
                                 uint32_t flags, bs_error *err) {
    bs_error_clear(err);
    BS_TRY(bs_check_write_flags(flags, err));
    BS_TRY(check_args(inputs, n, uuid, path, err));
    BS_TRY(bs_seg_check_fragment_table(fragment_ids, fragment_rows,
                                       num_fragments, err));
    remap_state m;
    memset(&m, 0, sizeof m);
    m.in = inputs;
    m.n = n;
    m.nf = num_fragments;
    bs_seg_writer w;
    memset(&w, 0, sizeof w);
    bs_status st = plan_table(&m, fragment_ids, fragment_rows, err);
    if (st == BS_OK) {
        m.newo = bs_zalloc(n, sizeof *m.newo);
        if (m.newo == NULL) st = NOMEM();
    }
    for (size_t i = 0; i < n && st == BS_OK; i++) st = translate(&m, i, err);
    bs_segment_info info;
    bs_segment_get_info(inputs[0].segment, &info);
    /* The buffers are sized by the largest partition's input rows (a bound
     * on its kept rows); if that bound passes the row limit, by the exact
     * kept counts, which cost a lookup per row. */
    uint64_t max_count = 0;
    for (uint32_t p = 0; p < info.num_partitions && st == BS_OK; p++) {
        uint64_t c = input_count(&m, p);
        if (c > max_count) max_count = c;
    }
    if (st == BS_OK && max_count > BS_SEG_MAX_ROWS) {
        max_count = 0;
        for (uint32_t p = 0; p < info.num_partitions; p++) {
            uint64_t c = kept_count(&m, p);
            if (c > max_count) max_count = c;
        }
    }
    if (st == BS_OK) {
        m.rows = bs_alloc((size_t)max_count, sizeof *m.rows);
        m.tmp = bs_alloc((size_t)max_count, sizeof *m.tmp);
        m.run_end = bs_alloc(n, sizeof *m.run_end);
        m.views = bs_alloc(n, sizeof *m.views);
        st = (m.rows && m.tmp && m.run_end && m.views) ? BS_OK : NOMEM();
    }
    /* Unique ordinals below the table's <= 2^32 - 1 rows bound max_count. */
    if (st == BS_OK)
        st = bs_repack_init(&m.rp, info.padded_dim, info.num_bits, max_count, err);
    if (st == BS_OK) {
        bs_seg_params prm;
        bs_repack_params(inputs[0].segment, uuid, fragment_ids, fragment_rows,
                         num_fragments, &prm);
        prm.flags = flags;
        /* The new table's identities are the caller's (the library does
         * not interpret them); NULL records zeros, as a builder told none. */
        prm.fragment_identity = fragment_identities;
        st = bs_seg_writer_open(&w, path, &prm, err);
    }
    for (uint32_t p = 0; p < info.num_partitions && st == BS_OK; p++)
        st = remap_partition(&m, p, &w, err);
    if (st == BS_OK)
        st = bs_seg_writer_finish(&w, err);
    else
        bs_seg_writer_abort(&w);
    remap_state_free(&m);
    return st;
}
