/* Partition blocks rebuilt from opened segments' rows (see repack.h). */
#include "repack.h"

#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "rabitq.h"

bs_status bs_repack_init(bs_repack *r, uint32_t D, uint32_t B,
                         uint64_t max_count, bs_error *err) {
    memset(r, 0, sizeof *r);
    r->D = D;
    r->B = B;
    bs_part_layout L;
    if (max_count > BS_SEG_MAX_ROWS || !bs_part_layout_compute(max_count, D, B, &L) ||
        L.size > SIZE_MAX)
        return bs_fail(err, BS_ERR_NO_MEMORY, "partition too large (%llu rows)",
                       (unsigned long long)max_count);
    r->buf = bs_alloc((size_t)L.size, 1);
    r->codes = bs_alloc((size_t)max_count, bs_code_bytes(D));
    if (!r->buf || !r->codes) {
        bs_repack_free(r);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    return BS_OK;
}

void bs_repack_begin(bs_repack *r, uint32_t count) {
    bs_part_layout_compute(count, r->D, r->B, &r->pl);
    memset(r->buf, 0, (size_t)r->pl.size);
    r->count = count;
    r->at = 0;
}

void bs_repack_put(bs_repack *r, const bs_partition_view *v, size_t j,
                   uint32_t ordinal) {
    const size_t cb = bs_code_bytes(r->D), eb = bs_ext_bytes(r->D, r->B);
    const size_t at = r->at++;
    uint8_t *buf = r->buf;
    const bs_part_layout *pl = &r->pl;
    bs_fastscan_unpack_one(v->blocks, j, r->D, r->codes + at * cb);
    memcpy(buf + pl->ordinals + at * 4, &ordinal, 4);
    memcpy(buf + pl->norm2 + at * 4, &v->norm2[j], 4);
    memcpy(buf + pl->s1 + at * 4, &v->s1[j], 4);
    if (r->B > 1) {
        memcpy(buf + pl->ext + at * eb, v->ext + j * eb, eb);
        memcpy(buf + pl->s_full + at * 4, &v->s_full[j], 4);
    }
}

bs_status bs_repack_write(bs_repack *r, bs_seg_writer *w, bs_error *err) {
    if (r->at != r->count)
        return bs_fail(err, BS_ERR_INTERNAL,
                       "partition assembly: %u of %u rows put", r->at, r->count);
    if (r->count) bs_fastscan_pack(r->codes, r->count, r->D, r->buf + r->pl.blocks);
    return bs_seg_writer_partition(w, r->count, r->buf, r->pl.size, err);
}

void bs_repack_free(bs_repack *r) {
    BS_FREE(r->buf);
    BS_FREE(r->codes);
}

void bs_repack_params(const bs_segment *seg, const uint8_t uuid[16],
                      const uint64_t *fragment_ids,
                      const uint64_t *fragment_rows, uint32_t num_fragments,
                      bs_seg_params *out) {
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    memset(out, 0, sizeof *out);
    out->dim = info.dim;
    out->padded_dim = info.padded_dim;
    out->num_bits = info.num_bits;
    out->metric = info.metric;
    out->rotation_kind = info.rotation_kind;
    out->rotation_seed = info.rotation_seed;
    out->num_partitions = info.num_partitions;
    memcpy(out->uuid, uuid, 16);
    out->rotation_fp = info.rotation_fingerprint;
    out->ivf_fp = info.ivf_fingerprint;
    out->column = info.column;
    out->column_len = (uint32_t)strlen(info.column);
    out->centroids = bs_segment_centroids(seg);
    out->fragment_ids = fragment_ids;
    out->fragment_rows = fragment_rows;
    out->num_fragments = num_fragments;
}
