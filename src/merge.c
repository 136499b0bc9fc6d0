/* Merging segments: partition p of the output is partition p of every
 * input in input order, with ordinals shifted past the rows of the earlier
 * inputs' fragments. Inputs hold their ordinals sorted, so the concatenation
 * is sorted too and the output is byte for byte the segment a builder would
 * write for the union of the rows (docs/format.md, "Merging"). */
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "format.h"
#include "rabitq.h"
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
                                uint64_t *ids, uint64_t *rows, uint64_t *base,
                                bs_error *err) {
    size_t total_f = 0;
    uint64_t total_rows = 0;
    for (size_t i = 0; i < n; i++) {
        bs_segment_info info;
        bs_segment_get_info(in[i], &info);
        base[i] = total_rows;
        for (uint32_t f = 0; f < info.num_fragments; f++) {
            bs_segment_fragment(in[i], f, &ids[total_f], &rows[total_f]);
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
    frag_owner *own = malloc(total_f * sizeof *own);
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

bs_status bs_segment_merge(const bs_segment *const *inputs, size_t n,
                           const uint8_t uuid[16], const char *path,
                           bs_error *err) {
    bs_error_clear(err);
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

    bs_segment_info info;
    bs_segment_get_info(inputs[0], &info);
    uint64_t total_f = 0;
    for (size_t i = 0; i < n; i++) {
        bs_segment_info ii;
        bs_segment_get_info(inputs[i], &ii);
        total_f += ii.num_fragments;
    }
    if (total_f > UINT32_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "the merged segment would have %llu fragments, more "
                       "than 2^32 - 1",
                       (ull)total_f);
    uint64_t *ids = malloc((size_t)total_f * sizeof *ids + 1);
    uint64_t *rows = malloc((size_t)total_f * sizeof *rows + 1);
    uint64_t *base = malloc(n * sizeof *base);
    if (!ids || !rows || !base) {
        free(ids);
        free(rows);
        free(base);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    bs_status st = plan_fragments(inputs, n, ids, rows, base, err);

    const uint32_t D = info.padded_dim, B = info.num_bits;
    const uint32_t k = info.num_partitions;
    const size_t cb = bs_code_bytes(D), eb = bs_ext_bytes(D, B);
    uint8_t *buf = NULL, *codes = NULL;
    uint64_t max_count = 0;
    if (st == BS_OK) {
        for (uint32_t p = 0; p < k; p++) {
            uint64_t c = 0;
            for (size_t i = 0; i < n; i++) {
                bs_partition_view v;
                bs_segment_partition(inputs[i], p, &v);
                c += v.count;
            }
            if (c > max_count) max_count = c;
        }
        /* Disjoint fragments and unique ordinals per input bound this by
         * the 2^32 - 1 rows checked above. */
        bs_part_layout L;
        if (!bs_part_layout_compute(max_count, D, B, &L) || L.size > SIZE_MAX)
            st = bs_fail(err, BS_ERR_NO_MEMORY, "partition too large");
        else {
            buf = malloc((size_t)L.size + 1);
            codes = malloc((size_t)max_count * cb + 1);
            if (!buf || !codes)
                st = bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
        }
    }

    bs_seg_writer w;
    memset(&w, 0, sizeof w);
    if (st == BS_OK) {
        bs_seg_params prm;
        memset(&prm, 0, sizeof prm);
        prm.dim = info.dim;
        prm.padded_dim = D;
        prm.num_bits = B;
        prm.metric = info.metric;
        prm.rotation_kind = info.rotation_kind;
        prm.rotation_seed = info.rotation_seed;
        prm.num_partitions = k;
        memcpy(prm.uuid, uuid, 16);
        prm.rotation_fp = info.rotation_fingerprint;
        prm.ivf_fp = info.ivf_fingerprint;
        prm.column = info.column;
        prm.column_len = (uint32_t)strlen(info.column);
        prm.centroids = bs_segment_centroids(inputs[0]);
        prm.fragment_ids = ids;
        prm.fragment_rows = rows;
        prm.num_fragments = (uint32_t)total_f;
        st = bs_seg_writer_open(&w, path, &prm, err);
    }

    for (uint32_t p = 0; p < k && st == BS_OK; p++) {
        uint32_t count = 0;
        for (size_t i = 0; i < n; i++) {
            bs_partition_view v;
            bs_segment_partition(inputs[i], p, &v);
            count += v.count;
        }
        bs_part_layout pl;
        bs_part_layout_compute(count, D, B, &pl);
        memset(buf, 0, (size_t)pl.size);
        size_t at = 0;
        for (size_t i = 0; i < n; i++) {
            bs_partition_view v;
            bs_segment_partition(inputs[i], p, &v);
            size_t m = v.count;
            for (size_t j = 0; j < m; j++)
                bs_fastscan_unpack_one(v.blocks, j, D, codes + (at + j) * cb);
            uint32_t shift = (uint32_t)base[i];
            for (size_t j = 0; j < m; j++) {
                uint32_t o = v.ordinals[j] + shift;
                memcpy(buf + pl.ordinals + (at + j) * 4, &o, 4);
            }
            memcpy(buf + pl.norm2 + at * 4, v.norm2, m * 4);
            memcpy(buf + pl.s1 + at * 4, v.s1, m * 4);
            if (B > 1) {
                memcpy(buf + pl.ext + at * eb, v.ext, m * eb);
                memcpy(buf + pl.s_full + at * 4, v.s_full, m * 4);
            }
            at += m;
        }
        if (count) bs_fastscan_pack(codes, count, D, buf + pl.blocks);
        st = bs_seg_writer_partition(&w, count, buf, pl.size, err);
    }
    if (st == BS_OK)
        st = bs_seg_writer_finish(&w, err);
    else
        bs_seg_writer_abort(&w);
    free(buf);
    free(codes);
    free(ids);
    free(rows);
    free(base);
    return st;
}
