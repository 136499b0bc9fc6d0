/* Assembling one output partition block from rows of opened segments,
 * without re-encoding: the 1-bit codes are unpacked from their FastScan
 * blocks and repacked with their factors for the new row count, every other
 * per-row array (corr included: it depends on the row's code and the shared
 * centroids only) is copied. Shared by merge and remap, which differ only in which rows go
 * where; the block goes to the one segment writer (format.c). Internal. */
#ifndef BS_REPACK_H
#define BS_REPACK_H

#include "format.h"
#include "segment.h"

typedef struct bs_repack {
    uint32_t D, B;
    uint8_t *buf;    /* one block of the largest output partition */
    uint8_t *codes;  /* that partition's 1-bit codes, row-major */
    uint8_t *ext;    /* its extra codes, row-major (B > 1) */
    float *f;        /* its norm2, s1, corr, s_full: 4 arrays of max_count */
    uint32_t *ord;   /* its ordinals */
    size_t max_count;
    bs_part_layout pl;
    uint32_t count;  /* rows of the partition being assembled */
    uint32_t at;     /* rows put so far */
} bs_repack;

/* Buffers for output partitions of at most max_count rows. */
bs_status bs_repack_init(bs_repack *r, uint32_t D, uint32_t B,
                         uint64_t max_count, bs_error *err);
/* Starts a partition of count (<= max_count) rows: the block is zeroed. */
void bs_repack_begin(bs_repack *r, uint32_t count);
/* Appends row j of the input partition v under output ordinal `ordinal`.
 * Rows must be put in increasing ordinal order (the format's rule). */
void bs_repack_put(bs_repack *r, const bs_partition_view *v, size_t j,
                   uint32_t ordinal);
/* Packs the codes and hands the block to the writer. */
bs_status bs_repack_write(bs_repack *r, bs_seg_writer *w, bs_error *err);
void bs_repack_free(bs_repack *r);

/* Writer parameters for an output in the code space of seg (dimension,
 * bits, metric, rotation, centroids, column, fingerprints) with a new uuid
 * and fragment table (identities not recorded: the caller may set
 * out->fragment_identity). The pointers are borrowed. */
void bs_repack_params(const bs_segment *seg, const uint8_t uuid[16],
                      const uint64_t *fragment_ids,
                      const uint64_t *fragment_rows, uint32_t num_fragments,
                      bs_seg_params *out);

#endif
