/* Merging segments: partition p of the output is partition p of every
 * input in input order, with ordinals shifted past the rows of the earlier
 * inputs' fragments. Inputs hold their ordinals sorted, so the concatenation
 * is sorted too and the output is byte for byte the segment a builder would
 * write for the union of the rows (docs/format.md, "Merging"). */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "format.h"
#include "repack.h"
#include "segment.h"

typedef unsigned long long ull;

typedef struct frag_owner {
    uint64_t id;
    uint64_t seg; /* input index */
} frag_owner;

static int cmp_owner(const void *a, const void *b) {
    const frag_owner *x = a, *y = b;
    if (x->id != y->id) return (x->id > y->id) - (x->id < y->id);
    return (x->seg > y->seg) - (x->seg < y->seg);
}

/* Checks fragment disjointness and fills the output fragment table and
 * each input's ordinal base. */
static bs_status plan_fragments(const bs_segment *const *in, size_t n,
                                uint64_t *ids, uint64_t *rows, uint8_t *ident,
                                uint64_t *base, bs_error *err) {
    size_t total_f = 0;
    uint64_t total_rows = 0;
    for (size_t i = 0; i < n; i++) {
        bs_segment_info info;
        bs_segment_get_info(in[i], &info);
        base[i] = total_rows;
        for (uint32_t f = 0; f < info.num_fragments; f++) {
            bs_segment_fragment(in[i], f, &ids[total_f], &rows[total_f]);
            bs_segment_fragment_identity(in[i], f, ident + total_f * 16);
            total_rows += rows[total_f];
            total_f++;
        }
        if (total_rows > BS_SEG_MAX_ROWS)
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                           "the merged segment would cover %llu rows, more "
                           "than 2^32 - 1 (at segment %zu): merge fewer "
                           "segments",
                           (ull)total_rows, i);
    }
    if (total_f < 2) return BS_OK;
    frag_owner *own = bs_alloc(total_f, sizeof *own);
    if (own == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        bs_segment_info info;
        bs_segment_get_info(in[i], &info);
        for (uint32_t f = 0; f < info.num_fragments; f++, k++) {
            own[k].id = ids[k];
            own[k].seg = i;
        }
    }
    qsort(own, total_f, sizeof *own, cmp_owner);
    bs_status st = BS_OK;
    for (size_t i = 1; i < total_f; i++) {
        if (own[i].id == own[i - 1].id) {
            st = bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                         "fragment %llu is in segments %llu and %llu",
                         (ull)own[i].id, (ull)own[i - 1].seg,
                         (ull)own[i].seg);
            break;
        }
    }
    free(own);
    return st;
}

/* NULL arguments, and inputs that do not share one code space. */
static bs_status check_merge_args(const bs_segment *const *inputs, size_t n,
                                  const uint8_t uuid[16], const char *path,
                                  bs_error *err) {
    if (inputs == NULL || n == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "merge needs at least one segment");
    if (uuid == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "uuid is NULL");
    if (path == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "path is NULL");
    for (size_t i = 0; i < n; i++)
        if (inputs[i] == NULL)
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment %zu is NULL",
                           i);
    for (size_t i = 1; i < n; i++) {
        bs_error sub;
        if (bs_segment_check_compatible(inputs[0], inputs[i], &sub) != BS_OK)
            return bs_fail(err, sub.code, "cannot merge segment %zu: %s", i,
                           sub.message);
    }
    /* The output's checksums would vouch for whatever the inputs hold:
     * every input is checked whole first (partitions are otherwise checked
     * only when a search touches them). */
    for (size_t i = 0; i < n; i++) {
        bs_error sub;
        bs_status st = bs_segment_verify(inputs[i], &sub);
        if (st != BS_OK)
            return bs_fail(err, st, "cannot merge segment %zu: %s", i, sub.message);
    }
    return BS_OK;
}

/* Rows of partition p over all inputs. */
static uint64_t merged_count(const bs_segment *const *in, size_t n, uint32_t p) {
    uint64_t c = 0;
    for (size_t i = 0; i < n; i++) {
        bs_partition_view v;
        bs_segment_partition(in[i], p, &v);
        c += v.count;
    }
    return c;
}

/* One merge: the inputs, the output's fragment table, and the buffers one
 * output partition is assembled in. */
typedef struct merge_state {
    const bs_segment *const *in;
    size_t n;
    bs_segment_info info; /* of inputs[0]; the others are compatible */
    uint64_t num_fragments;
    uint64_t *ids, *rows; /* output fragment table */
    uint8_t *ident;       /* its identities, 16 bytes each */
    uint64_t *base;       /* per input: ordinal of its first row in the output */
    bs_repack rp;         /* one partition block, as the writer takes it */
    uint64_t *done;       /* per input: bytes read through (bs_segment_release_through) */
} merge_state;

static void merge_state_free(merge_state *m) {
    bs_repack_free(&m->rp);
    BS_FREE(m->ident);
    BS_FREE(m->ids);
    BS_FREE(m->rows);
    BS_FREE(m->base);
    BS_FREE(m->done);
}

/* The fragment table (its size checked against the format's limit) and
 * the ordinal bases. */
static bs_status merge_plan(merge_state *m, bs_error *err) {
    bs_segment_get_info(m->in[0], &m->info);
    uint64_t total_f = 0;
    for (size_t i = 0; i < m->n; i++) {
        bs_segment_info ii;
        bs_segment_get_info(m->in[i], &ii);
        total_f += ii.num_fragments;
    }
    if (total_f > UINT32_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "the merged segment would have %llu fragments, more "
                       "than 2^32 - 1",
                       (ull)total_f);
    m->num_fragments = total_f;
    m->ids = bs_alloc((size_t)total_f, sizeof *m->ids);
    m->rows = bs_alloc((size_t)total_f, sizeof *m->rows);
    m->ident = bs_zalloc((size_t)total_f + 1, 16);
    m->base = bs_alloc(m->n, sizeof *m->base);
    m->done = bs_zalloc(m->n, sizeof *m->done);
    if (!m->ids || !m->rows || !m->ident || !m->base || !m->done)
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    return plan_fragments(m->in, m->n, m->ids, m->rows, m->ident, m->base, err);
}

/* Buffers for the largest output partition. */
static bs_status merge_buffers(merge_state *m, bs_error *err) {
    uint64_t max_count = 0;
    for (uint32_t p = 0; p < m->info.num_partitions; p++) {
        uint64_t c = merged_count(m->in, m->n, p);
        if (c > max_count) max_count = c;
    }
    /* Disjoint fragments and unique ordinals per input bound this by
     * the 2^32 - 1 rows checked above. */
    return bs_repack_init(&m->rp, m->info.padded_dim, m->info.num_bits,
                          max_count, err);
}

/* The output's header: inputs[0]'s code space, the new uuid, the merged
 * fragment table. */
static bs_status merge_open(const merge_state *m, const uint8_t uuid[16],
                            const char *path, uint32_t flags, bs_seg_writer *w,
                            bs_error *err) {
    bs_seg_params prm;
    bs_repack_params(m->in[0], uuid, m->ids, m->rows,
                     (uint32_t)m->num_fragments, &prm);
    prm.fragment_identity = m->ident;
    prm.flags = flags;
    return bs_seg_writer_open(w, path, &prm, err);
}

/* Output partition p: the inputs' partition p one after another, ordinals
 * shifted by each input's base, codes repacked into blocks of the new
 * count. */
static bs_status merge_partition(merge_state *m, uint32_t p, bs_seg_writer *w,
                                 bs_error *err) {
    /* <= the 2^32 - 1 rows plan_fragments allows */
    bs_repack_begin(&m->rp, (uint32_t)merged_count(m->in, m->n, p));
    for (size_t i = 0; i < m->n; i++) {
        bs_partition_view v;
        bs_segment_partition(m->in[i], p, &v);
        uint32_t shift = (uint32_t)m->base[i];
        for (size_t j = 0; j < v.count; j++)
            bs_repack_put(&m->rp, &v, j, v.ordinals[j] + shift);
        /* Read through: a mapped input's pages leave the process, so a
         * merge holds a window of each input, not the inputs. */
        bs_segment_release_through(m->in[i], p, &m->done[i]);
    }
    return bs_repack_write(&m->rp, w, err);
}

bs_status bs_segment_merge(const bs_segment *const *inputs, size_t n,
                           const uint8_t uuid[16], const char *path,
                           bs_error *err) {
    return bs_segment_merge_flags(inputs, n, uuid, path, 0, err);
}

bs_status bs_segment_merge_flags(const bs_segment *const *inputs, size_t n,
                                 const uint8_t uuid[16], const char *path,
                                 uint32_t flags, bs_error *err) {
    bs_error_clear(err);
    BS_TRY(bs_check_write_flags(flags, err));
    BS_TRY(check_merge_args(inputs, n, uuid, path, err));
    merge_state m;
    memset(&m, 0, sizeof m);
    m.in = inputs;
    m.n = n;
    bs_seg_writer w;
    memset(&w, 0, sizeof w);
    bs_status st = merge_plan(&m, err);
    if (st == BS_OK) st = merge_buffers(&m, err);
    if (st == BS_OK) st = merge_open(&m, uuid, path, flags, &w, err);
    for (uint32_t p = 0; p < m.info.num_partitions && st == BS_OK; p++)
        st = merge_partition(&m, p, &w, err);
    if (st == BS_OK)
        st = bs_seg_writer_finish(&w, err);
    else
        bs_seg_writer_abort(&w);
    merge_state_free(&m);
    return st;
}
