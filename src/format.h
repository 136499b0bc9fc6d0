/* The segment file format (docs/format.md): little-endian field access
 * (the reader checks a whole section against the buffer before reading
 * fields at fixed offsets in it), the layout arithmetic shared by the
 * reader and the writer, and the sequential writer used by both the builder and
 * merge (one writer, so a merged segment and a directly built one cannot
 * differ in layout). Internal to the library. */
#ifndef BS_FORMAT_H
#define BS_FORMAT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "bitshard.h"
#include "error.h"

/* ----------------------------------------------------------- constants */

#define BS_SEG_MAGIC "BSHRDSEG"
#define BS_SEG_MAGIC_LEN 8
/* The format version this code writes, and the newest read version it
 * understands. Version 2 files are still read: converted to the version 3
 * layout in memory at open (segment.c). */
#define BS_SEG_VERSION 3u
#define BS_SEG_VERSION_2 2u
#define BS_SEG_ALIGN 64u
/* Fixed header fields end here; the column name follows. */
#define BS_SEG_HEADER_FIXED 200u
#define BS_SEG_MAX_COLUMN 1024u
#define BS_SEG_FRAGMENT_ENTRY 32u
#define BS_SEG_DIR_ENTRY 64u
/* Version 2's entries: fragment (id, rows), directory (offset, size,
 * count, reserved, checksum). */
#define BS_SEG_V2_FRAGMENT_ENTRY 16u
#define BS_SEG_V2_DIR_ENTRY 32u
/* Bit 0, "external centroids": the artifacts section is empty and the
 * reader takes the centroids from its caller, matched by the header's IVF
 * fingerprint (segments of one index share them). It was reserved in
 * version 3 from the start, so defining it needs no version bump: a reader
 * that does not know it refuses the file. Other bits stay reserved. */
#define BS_SEG_FLAG_EXTERNAL_CENTROIDS 1u
#define BS_SEG_FLAGS_KNOWN BS_SEG_FLAG_EXTERNAL_CENTROIDS
/* Bytes of a stage-1 block's factors: norm2[32], s1[32], corr[32] (f32). */
#define BS_SEG_BLOCK_FACTORS 384u
/* Seed of bs_hash64 for every checksum in the file. */
#define BS_SEG_CHECKSUM_SEED 0u
/* Fragment ids must fit in 32 bits: row ids are (id << 32) | offset. */
#define BS_SEG_MAX_FRAGMENT_ID 0xFFFFFFFFull
/* Ordinals are u32, so a segment's fragments hold at most this many rows. */
#define BS_SEG_MAX_ROWS 0xFFFFFFFFull

/* Byte offsets of the fixed header fields. */
enum {
    BS_HDR_MAGIC = 0,
    BS_HDR_READ_VERSION = 8,
    BS_HDR_WRITE_VERSION = 12,
    BS_HDR_HEADER_SIZE = 16,
    BS_HDR_FLAGS = 20,
    BS_HDR_DIM = 24,
    BS_HDR_PADDED_DIM = 28,
    BS_HDR_NUM_BITS = 32,
    BS_HDR_METRIC = 36,
    BS_HDR_ROTATION_KIND = 40,
    BS_HDR_NUM_PARTITIONS = 44,
    BS_HDR_ROTATION_SEED = 48,
    BS_HDR_NUM_ROWS = 56,
    BS_HDR_FILE_SIZE = 64,
    BS_HDR_NUM_FRAGMENTS = 72,
    BS_HDR_COLUMN_LEN = 76,
    BS_HDR_UUID = 80,
    BS_HDR_ROTATION_FP = 96,
    BS_HDR_IVF_FP = 112,
    BS_HDR_ARTIFACTS = 128,  /* offset, size, checksum: 3 x u64 */
    BS_HDR_FRAGMENTS = 152,
    BS_HDR_DIRECTORY = 176,
    BS_HDR_COLUMN = BS_SEG_HEADER_FIXED
};

/* Byte offsets inside one 64-byte directory entry (version 3); version
 * 2's 32-byte entry shares the first four fields and keeps its one
 * checksum at BS_DIR2_CHECKSUM. */
enum {
    BS_DIR_OFFSET = 0,
    BS_DIR_SIZE = 8,
    BS_DIR_COUNT = 16,
    BS_DIR_RESERVED = 20,
    BS_DIR_STAGE1_SIZE = 24,
    BS_DIR_STAGE1_CHECKSUM = 32,
    BS_DIR_EXTRA_CHECKSUM = 40,
    BS_DIR_RESERVED2 = 48, /* 16 bytes, zero */
    BS_DIR2_CHECKSUM = 24
};

/* Byte offsets inside one 32-byte fragment table entry (version 3). */
enum {
    BS_FRAG_ID = 0,
    BS_FRAG_ROWS = 8,
    BS_FRAG_IDENTITY = 16 /* 16 bytes; all zero = not recorded */
};

/* ------------------------------------------------ little-endian access */

/* The host is little-endian (version_check.c refuses others), so a memcpy
 * is the little-endian load; memcpy also makes unaligned access defined. */
static inline uint32_t bs_load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline uint64_t bs_load_u64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline float bs_load_f32(const uint8_t *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void bs_store_u32(uint8_t *p, uint32_t v) {
    memcpy(p, &v, sizeof v);
}
static inline void bs_store_u64(uint8_t *p, uint64_t v) {
    memcpy(p, &v, sizeof v);
}

/* --------------------------------------------------------------- layout */

/* x rounded up to a multiple of 64; 0 on overflow. */
static inline int bs_align64_ok(uint64_t x, uint64_t *out) {
    if (x > UINT64_MAX - (BS_SEG_ALIGN - 1)) return 0;
    *out = (x + (BS_SEG_ALIGN - 1)) & ~(uint64_t)(BS_SEG_ALIGN - 1);
    return 1;
}

/* The header's size for a column name of column_len bytes: fixed fields,
 * the name, zero padding, and the 8-byte checksum ending on a multiple of
 * 64. */
static inline uint64_t bs_seg_header_size(uint32_t column_len) {
    uint64_t s = 0;
    bs_align64_ok((uint64_t)BS_SEG_HEADER_FIXED + column_len + 8, &s);
    return s;
}

/* A version 3 partition block, relative to its start. The stage-1 region
 * is nblocks blocks of `stride` bytes (4D bytes of FastScan codes, then
 * norm2[32], s1[32], corr[32]), then the ordinals; the extra region
 * (B > 1 only) is ext then s_full. Both regions are padded to 64. Arrays
 * absent for B == 1 have offset 0 and are not stored. */
typedef struct bs_part_layout {
    uint64_t nblocks;
    uint64_t stride;      /* 4 * D + BS_SEG_BLOCK_FACTORS */
    uint64_t ordinals;
    uint64_t stage1_size; /* padded to 64 */
    uint64_t ext, s_full; /* from the block start, inside the extra region */
    uint64_t size;        /* padded to 64; stage1_size when B == 1 */
} bs_part_layout;

/* 0 when the sizes overflow 64 bits. */
int bs_part_layout_compute(uint64_t count, uint32_t D, uint32_t B,
                           bs_part_layout *out);

/* A version 2 partition block: every array at the next multiple of 64. */
typedef struct bs_part_layout_v2 {
    uint64_t blocks, norm2, s1, ordinals, ext, s_full;
    uint64_t size; /* padded to 64 */
} bs_part_layout_v2;

int bs_part_layout_v2_compute(uint64_t count, uint32_t D, uint32_t B,
                              bs_part_layout_v2 *out);

/* One partition's rows in ordinal order, as the writers hold them before
 * laying them out: row-major 1-bit codes (count * D/8 bytes), factors,
 * ordinals, extra codes (count * bs_ext_bytes; NULL when B == 1) and
 * s_full (NULL when B == 1). */
typedef struct bs_part_rows {
    const uint8_t *codes;
    const float *norm2, *s1, *corr;
    const uint32_t *ordinals;
    const uint8_t *ext;
    const float *s_full;
} bs_part_rows;

/* Lays count rows out as a version 3 block into buf (L.size bytes, L from
 * bs_part_layout_compute(count, D, B)), padding zeroed. */
void bs_part_fill(uint8_t *buf, const bs_part_layout *L, uint32_t count,
                  uint32_t D, uint32_t B, const bs_part_rows *rows);

/* The stored corr factor of a row (docs/format.md, "The factors"): with
 * y1 = b - 1/2 from its row-major 1-bit code, sum over i = 0..D-1 in order
 * of (double)y1_i * (double)dir[i], rounded to float. dir is Pm - Pc (l2)
 * or Pm (dot, cosine): see bs_corr_direction. */
float bs_corr_from_code(const uint8_t *code, const float *dir, uint32_t D);

/* dir[i] = pm[i] - pc[i] in float for l2, pm[i] for dot and cosine. */
void bs_corr_direction(bs_metric metric, const float *pm, const float *pc,
                       uint32_t D, float *dir);

/* Pm: the mean of the k centroids (each coordinate summed in double over
 * p = 0..k-1 in order, divided by k in double, rounded to float), padded
 * to D and rotated with rot (bs_rotation_apply); out has D floats. */
bs_status bs_centroid_mean_rotated(const bs_rotation *rot,
                                   const float *centroids, uint32_t k,
                                   uint32_t dim, float *out, bs_error *err);

/* ------------------------------------------------------------- writing */

/* Everything the header, artifacts and fragment table say. Pointers are
 * read only by bs_seg_writer_open. */
typedef struct bs_seg_params {
    uint32_t dim;
    uint32_t padded_dim;
    uint32_t num_bits;
    bs_metric metric;
    bs_rotation_kind rotation_kind;
    uint64_t rotation_seed;
    uint32_t num_partitions;
    uint8_t uuid[16];
    bs_fingerprint rotation_fp;
    bs_fingerprint ivf_fp;
    const char *column;
    uint32_t column_len;
    const float *centroids; /* num_partitions * dim */
    /* BS_SEG_FLAG_EXTERNAL_CENTROIDS: the centroids are not written (an
     * empty artifacts section); they are still needed for ivf_fp. */
    uint32_t flags;
    const uint64_t *fragment_ids;
    const uint64_t *fragment_rows;
    /* 16 bytes per fragment, or NULL: every identity all zero. */
    const uint8_t *fragment_identity;
    uint32_t num_fragments;
} bs_seg_params;

/* Writes a segment front to back through a FILE*: header and directory are
 * reserved up front and rewritten by finish, so the partition blocks
 * stream out one at a time in partition order. */
typedef struct bs_seg_writer {
    FILE *f;
    char *path;
    char *tmp_path;
    uint8_t *header;
    uint64_t header_size;
    uint8_t *directory;
    uint64_t directory_offset;
    uint64_t directory_size;
    uint64_t pos;         /* bytes written so far */
    uint32_t num_partitions;
    uint32_t next_partition;
    uint64_t num_rows;
    /* Memory mode (bs_seg_writer_open_memory): the file is assembled in
     * mem (64-byte aligned, mem_cap bytes) instead of written. */
    uint8_t *mem;
    uint64_t mem_cap;
} bs_seg_writer;

/* Opens path + ".tmp" and writes the header placeholder, the artifacts, the
 * fragment table and the directory placeholder. On error nothing is left
 * on disk. */
bs_status bs_seg_writer_open(bs_seg_writer *w, const char *path,
                             const bs_seg_params *p, bs_error *err);
/* The same file assembled in memory: capacity is its exact size (the
 * caller knows every count); finish_memory hands the 64-byte aligned
 * buffer over (free() it). Used to convert a version 2 file at open. */
bs_status bs_seg_writer_open_memory(bs_seg_writer *w, uint64_t capacity,
                                    const bs_seg_params *p, bs_error *err);
bs_status bs_seg_writer_finish_memory(bs_seg_writer *w, uint8_t **out,
                                      uint64_t *len, bs_error *err);
/* Appends the next partition: block holds L.size bytes laid out by
 * bs_part_fill (L = bs_part_layout_compute(count, ...)); the directory
 * entry gets both region checksums. */
bs_status bs_seg_writer_partition(bs_seg_writer *w, uint32_t count,
                                  const uint8_t *block,
                                  const bs_part_layout *L, bs_error *err);
/* After the last partition: completes header and directory, fsyncs and
 * renames the file into place. The writer is closed either way. */
bs_status bs_seg_writer_finish(bs_seg_writer *w, bs_error *err);
/* Closes and removes the temporary file; safe after finish and on a
 * zeroed writer. */
void bs_seg_writer_abort(bs_seg_writer *w);

/* ------------------------------------------------------------- helpers */

/* A fragment table a writer may take: ids < 2^32 and unique, at most
 * 2^32 - 1 rows in all. BS_ERR_INVALID_ARGUMENT naming the fragment
 * otherwise (shared by the builder and remap). */
bs_status bs_seg_check_fragment_table(const uint64_t *ids, const uint64_t *rows,
                                      uint32_t n, bs_error *err);

/* BS_OK for write options made of known BS_WRITE_* bits;
 * BS_ERR_INVALID_ARGUMENT naming the others. BS_WRITE_EXTERNAL_CENTROIDS
 * is BS_SEG_FLAG_EXTERNAL_CENTROIDS: the option is the header bit. */
bs_status bs_check_write_flags(uint32_t flags, bs_error *err);

/* 1 when s[0..len) is valid UTF-8 without NUL bytes. */
int bs_seg_utf8_valid(const uint8_t *s, size_t len);

/* "l2", "cosine", "dot", or "?" */
const char *bs_seg_metric_name(bs_metric m);

/* 32 lowercase hex digits and a NUL into out[33]. */
void bs_seg_fingerprint_hex(const bs_fingerprint *fp, char out[33]);

#endif
