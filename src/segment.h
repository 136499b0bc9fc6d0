/* Internal view of an opened segment's partitions, for search and merge. */
#ifndef BS_SEGMENT_H
#define BS_SEGMENT_H

#include "bitshard.h"
#include "rabitq.h"

/* Pointers into the segment's (validated) bytes. Arrays are aligned to
 * their element size when the segment buffer is 64-byte aligned (mmap). */
typedef struct bs_partition_view {
    uint32_t count;
    const uint8_t *blocks;     /* bs_fastscan_num_blocks(count) blocks */
    const float *norm2;        /* count */
    const float *s1;           /* count */
    const uint32_t *ordinals;  /* count: segment-local row ordinals */
    const uint8_t *ext;        /* count * bs_ext_bytes(D, B); NULL if B==1 */
    const float *s_full;       /* count; == s1 when B == 1 */
} bs_partition_view;

void bs_segment_partition(const bs_segment *seg, uint32_t p,
                          bs_partition_view *out);

/* Row id of a segment-local ordinal: ordinals number the physical rows of
 * the segment's fragments in fragment-table order. */
uint64_t bs_segment_rowid(const bs_segment *seg, uint32_t ordinal);

#endif
