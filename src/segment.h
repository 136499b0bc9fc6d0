/* Internal view of an opened segment's partitions, for search and merge. */
#ifndef BS_SEGMENT_H
#define BS_SEGMENT_H

#include "bitshard.h"
#include "rabitq.h"

/* Pointers into one partition's bytes (format version 3, docs/format.md):
 * block j of the stage-1 region starts at blocks + j * stride and holds
 * the FastScan codes of rows 32j..32j+31 (4 * D bytes), then their
 * norm2[32], s1[32] and corr[32]. Arrays are aligned to their element size
 * when the segment buffer is 64-byte aligned (mmap). The bytes are only
 * trustworthy after bs_segment_check_partition (or bs_segment_verify). */
typedef struct bs_partition_view {
    uint32_t count;
    uint32_t padded_dim;       /* D */
    size_t stride;             /* 4 * D + 384 */
    const uint8_t *blocks;     /* bs_fastscan_num_blocks(count) blocks */
    const uint32_t *ordinals;  /* count: segment-local row ordinals */
    const uint8_t *ext;        /* count * bs_ext_bytes(D, B); NULL if B==1 */
    const float *s_full;       /* count; NULL if B == 1 (s_full = s1) */
} bs_partition_view;

/* Block j's codes and its three factor arrays of 32. */
static inline const uint8_t *bs_pv_block(const bs_partition_view *v, size_t j) {
    return v->blocks + j * v->stride;
}
static inline const float *bs_pv_norm2_block(const bs_partition_view *v, size_t j) {
    return (const float *)(const void *)(bs_pv_block(v, j) + (size_t)v->padded_dim * 4);
}
static inline const float *bs_pv_s1_block(const bs_partition_view *v, size_t j) {
    return bs_pv_norm2_block(v, j) + 32;
}
static inline const float *bs_pv_corr_block(const bs_partition_view *v, size_t j) {
    return bs_pv_norm2_block(v, j) + 64;
}
static inline float bs_pv_norm2(const bs_partition_view *v, size_t i) {
    return bs_pv_norm2_block(v, i / 32)[i % 32];
}
static inline float bs_pv_s1(const bs_partition_view *v, size_t i) {
    return bs_pv_s1_block(v, i / 32)[i % 32];
}
static inline float bs_pv_corr(const bs_partition_view *v, size_t i) {
    return bs_pv_corr_block(v, i / 32)[i % 32];
}
static inline float bs_pv_s_full(const bs_partition_view *v, size_t i) {
    return v->s_full ? v->s_full[i] : bs_pv_s1(v, i);
}

/* The view of partition p (zero count when p is out of range). Does not
 * check the bytes: see bs_segment_check_partition. */
void bs_segment_partition(const bs_segment *seg, uint32_t p,
                          bs_partition_view *out);

/* A pass that reads a segment's partitions in order (verify, merge) and is
 * done with partition p calls this with its own *done (0 at the start).
 * When the segment was declared mapped (bs_segment_set_mapped) and at
 * least BS_RELEASE_WINDOW bytes were read since the last drop, or p is the
 * last partition, the pages from *done to the one holding the partition's
 * end leave the process and *done moves there. So a pass keeps at most a
 * window of each mapped input resident, with one madvise per window rather
 * than per partition. Reads stay valid: a dropped page faults back in from
 * the page cache. */
#define BS_RELEASE_WINDOW ((uint64_t)4 << 20)
void bs_segment_release_through(const bs_segment *seg, uint32_t p, uint64_t *done);

/* Checks partition p the first time it is asked (its two checksums and
 * the per-partition rules of docs/format.md, "Validation") and remembers
 * the result; later calls cost one atomic load. Thread-safe: two threads
 * racing on an unchecked partition both check it. BS_ERR_CORRUPT names
 * the partition (not the segment: callers add that). */
bs_status bs_segment_check_partition(const bs_segment *seg, uint32_t p,
                                     bs_error *err);

/* Row id of a segment-local ordinal: ordinals number the physical rows of
 * the segment's fragments in fragment-table order. */
uint64_t bs_segment_rowid(const bs_segment *seg, uint32_t ordinal);

#endif
