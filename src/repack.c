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
    r->max_count = (size_t)max_count;
    r->buf = bs_alloc((size_t)L.size, 1);
    r->codes = bs_alloc((size_t)max_count, bs_code_bytes(D));
    r->ext = bs_alloc((size_t)max_count, B > 1 ? bs_ext_bytes(D, B) : 1);
    r->f = bs_alloc2(4, (size_t)max_count, sizeof(float));
    r->ord = bs_alloc((size_t)max_count, sizeof(uint32_t));
    if (!r->buf || !r->codes || !r->ext || !r->f || !r->ord) {
        bs_repack_free(r);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    return BS_OK;
}

void bs_repack_begin(bs_repack *r, uint32_t count) {
    bs_part_layout_compute(count, r->D, r->B, &r->pl);
    r->count = count;
    r->at = 0;
}

void bs_repack_put(bs_repack *r, const bs_partition_view *v, size_t j,
                   uint32_t ordinal) {
    const size_t cb = bs_code_bytes(r->D), eb = bs_ext_bytes(r->D, r->B);
    const size_t at = r->at++, mc = r->max_count;
    bs_fastscan_unpack_one(bs_pv_block(v, j / 32), j % 32, r->D, r->codes + at * cb);
    r->ord[at] = ordinal;
    r->f[at] = bs_pv_norm2(v, j);
    r->f[mc + at] = bs_pv_s1(v, j);
    r->f[2 * mc + at] = bs_pv_corr(v, j);
    r->f[3 * mc + at] = bs_pv_s_full(v, j);
    if (r->B > 1) memcpy(r->ext + at * eb, v->ext + j * eb, eb);
}

bs_status bs_repack_write(bs_repack *r, bs_seg_writer *w, bs_error *err) {
    if (r->at != r->count)
        return bs_fail(err, BS_ERR_INTERNAL,
                       "partition assembly: %u of %u rows put", r->at, r->count);
    const size_t mc = r->max_count;
    const bs_part_rows rows = {r->codes, r->f, r->f + mc, r->f + 2 * mc, r->ord,
                               r->B > 1 ? r->ext : NULL, r->B > 1 ? r->f + 3 * mc : NULL};
    bs_part_fill(r->buf, &r->pl, r->count, r->D, r->B, &rows);
    return bs_seg_writer_partition(w, r->count, r->buf, &r->pl, err);
}

void bs_repack_free(bs_repack *r) {
    BS_FREE(r->buf);
    BS_FREE(r->codes);
    BS_FREE(r->ext);
    BS_FREE(r->f);
    BS_FREE(r->ord);
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
