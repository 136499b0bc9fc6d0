/*
 * bitshard: IVF_RQ (IVF partitions + RaBitQ codes) index segments that are
 * built in pieces, merged, and searched together.
 *
 * Conventions of this API:
 *  - Every fallible call returns a bs_status and, when err is not NULL, fills
 *    err->message with what was wrong and with which value. The library never
 *    prints, never exits and never aborts on bad input.
 *  - Handles are opaque; every *_free accepts NULL.
 *  - There is no global mutable state: handles may be used from several
 *    threads at once for reading (search); a builder is used by one thread.
 *  - All vectors are float32, row-major. All on-disk integers are
 *    little-endian (docs/format.md).
 *  - Accepted vector values: every element of a data row (bs_builder_add),
 *    of the centroids (bs_builder_create) and of a query (bs_search) is
 *    finite with magnitude at most BS_MAX_ABS_VALUE; anything else is
 *    refused, naming the row or dimension and the value. Within that range
 *    no norm, dot product, distance, code factor or error bound overflows
 *    float (docs/usage.md, "What values are accepted").
 *  - "Returns:" under a function lists every status it can return. Any
 *    function that picks a SIMD kernel (bs_simd_select) can also return
 *    what bs_simd_select returns when BITSHARD_SIMD is set; this is said
 *    where it applies. BS_ERR_INTERNAL means a bug in the library.
 */
#ifndef BITSHARD_H
#define BITSHARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BS_VERSION_MAJOR 0
#define BS_VERSION_MINOR 1
#define BS_VERSION_PATCH 0
#define BS_VERSION_NUMBER \
    (BS_VERSION_MAJOR * 10000 + BS_VERSION_MINOR * 100 + BS_VERSION_PATCH)

/* The largest accepted magnitude of a vector element, 2^40 (about 1.1e12).
 * With d <= 65536, |x|^2 <= 2^96 and |q - x|^2 <= 2^98 for any accepted
 * pair, 2^30 below FLT_MAX: room for the code factors and bounds. */
#define BS_MAX_ABS_VALUE 0x1p40
/* The largest accepted eps0 (bound width in standard deviations): the
 * bound terms stay finite for every accepted pair of vectors. */
#define BS_MAX_EPS0 1000.0f

/* Largest dimension of a rotation: bounds the fast transform's memory (8
 * passes of D floats) and keeps every D * D product of the matrix kind far
 * from overflow. */
#define BS_ROTATION_MAX_DIM 65536u
/* Largest padded dimension of the dense matrix rotation: it costs D^2 floats,
 * about (4/3) D^3 flops to build (D = 4096: about 11 s of one core and
 * 200 MiB at the peak) and D^2 multiply-adds per vector, so past 4096 the
 * fast kind is the only sensible choice and larger sizes are refused. */
#define BS_ROTATION_MATRIX_MAX_DIM 4096u

#if defined(__GNUC__)
#define BS_API __attribute__((visibility("default")))
#else
#define BS_API
#endif

BS_API unsigned bs_version_number(void);

/* ---------------------------------------------------------------- errors */

/* Fixed numbers: they are part of the ABI and mapped to Python exceptions. */
typedef enum bs_status {
    BS_OK = 0,
    BS_ERR_INVALID_ARGUMENT = 1,   /* a bad parameter (dimension 0, bits 12) */
    BS_ERR_INVALID_DATA = 2,       /* vectors with NaN / Inf */
    BS_ERR_NO_MEMORY = 3,
    BS_ERR_IO = 4,                 /* open / write / rename failed */
    BS_ERR_CORRUPT = 5,            /* truncated or corrupt bytes */
    BS_ERR_UNSUPPORTED_VERSION = 6,/* a newer format than this reader knows */
    BS_ERR_ARTIFACT_MISMATCH = 7,  /* segments from different code spaces */
    BS_ERR_UNSUPPORTED_CPU = 8,    /* a forced SIMD level this CPU lacks */
    BS_ERR_INTERNAL = 9
} bs_status;

#define BS_ERROR_MESSAGE_MAX 512

typedef struct bs_error {
    bs_status code;
    char message[BS_ERROR_MESSAGE_MAX];
} bs_error;

/* "BS_ERR_CORRUPT" etc.; never NULL. */
BS_API const char *bs_status_name(bs_status status);

/* ---------------------------------------------------------------- basics */

typedef enum bs_metric {
    BS_METRIC_L2 = 0,     /* squared Euclidean distance */
    BS_METRIC_COSINE = 1, /* 1 - cos(o, q); 1 when either vector is zero */
    BS_METRIC_DOT = 2     /* 1 - <o, q> */
} bs_metric;

typedef enum bs_rotation_kind {
    BS_ROTATION_FAST = 0,  /* sign flips + Walsh-Hadamard, O(D log D) */
    BS_ROTATION_MATRIX = 1 /* dense random orthogonal D x D */
} bs_rotation_kind;

/* A 128-bit fingerprint over an artifact's canonical bytes. */
typedef struct bs_fingerprint {
    uint8_t bytes[16];
} bs_fingerprint;

/* 64-bit non-cryptographic hash used for checksums and fingerprints
 * (algorithm in docs/format.md). Stable across machines. */
BS_API uint64_t bs_hash64(const void *data, size_t len, uint64_t seed);

/* The padded dimension D used for codes: dim rounded up to a multiple of 64. */
BS_API uint32_t bs_padded_dim(uint32_t dim);

/* -------------------------------------------------------------- rotation */

typedef struct bs_rotation bs_rotation;

/* dim >= 1. The same (kind, dim, seed) gives the same transform on any
 * machine.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out NULL, unknown kind, dim 0 or
 * too large, a matrix rotation above its size limit); BS_ERR_NO_MEMORY. */
BS_API bs_status bs_rotation_create(bs_rotation_kind kind, uint32_t dim,
                                    uint64_t seed, bs_rotation **out,
                                    bs_error *err);
BS_API void bs_rotation_free(bs_rotation *rot);
BS_API uint32_t bs_rotation_dim(const bs_rotation *rot);
BS_API uint32_t bs_rotation_padded_dim(const bs_rotation *rot);
BS_API bs_rotation_kind bs_rotation_kind_of(const bs_rotation *rot);
BS_API uint64_t bs_rotation_seed(const bs_rotation *rot);
/* Fingerprint over (kind, dim, padded dim, seed). */
BS_API bs_fingerprint bs_rotation_fingerprint(const bs_rotation *rot);
/* x: n rows of `in_dim` floats, where in_dim is dim or padded dim (zero
 * padded internally); out: n rows of padded dim floats. Thread-safe.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (rot, x or out NULL, in_dim
 * neither dim nor padded dim, sizes overflowing, x and out overlapping). */
BS_API bs_status bs_rotation_apply(const bs_rotation *rot, const float *x,
                                   size_t n, uint32_t in_dim, float *out,
                                   bs_error *err);

/* ------------------------------------------------------------------- IVF */

/* k-means on n sample rows of dimension d: k-means++ seeding, Lloyd
 * iterations (stopping early when assignments settle), empty partitions
 * repaired by splitting the largest. For BS_METRIC_COSINE the rows are
 * normalised first and centroids are kept unit length (spherical k-means);
 * l2 and dot both cluster by Euclidean distance. Requires n >= k >= 1.
 * centroids: k * d floats out.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (x or centroids NULL, d or k 0,
 * unknown metric, n < k, k or d above INT_MAX, n * d overflowing);
 * BS_ERR_INVALID_DATA (a non-finite value, naming row and dimension);
 * BS_ERR_NO_MEMORY; and bs_simd_select's errors. */
BS_API bs_status bs_kmeans_train(const float *x, size_t n, uint32_t d,
                                 uint32_t k, bs_metric metric,
                                 uint32_t max_iters, uint64_t seed,
                                 float *centroids, bs_error *err);

/* bs_kmeans_train on num_threads threads (0 or 1: the calling thread only):
 * the same centroids, bit for bit, for every thread count. Each thread calls
 * the BLAS on its own block of rows, so with num_threads > 1 the BLAS
 * should run single-threaded (OPENBLAS_NUM_THREADS=1; the Python package
 * sets it for the call) or the threads oversubscribe the cores.
 * Returns: as bs_kmeans_train. */
BS_API bs_status bs_kmeans_train_mt(const float *x, size_t n, uint32_t d,
                                    uint32_t k, bs_metric metric,
                                    uint32_t max_iters, uint64_t seed,
                                    uint32_t num_threads, float *centroids,
                                    bs_error *err);

/* Nearest centroid (Euclidean; for cosine, of the normalised row) of each
 * of n rows, through a BLAS matrix product. assign: n partition ids out;
 * dist2 (may be NULL): the squared distance to it.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (centroids NULL, x or assign NULL
 * with n > 0, k or d 0 or above the BLAS limit, unknown metric, sizes
 * overflowing); BS_ERR_INVALID_DATA (a non-finite centroid or row);
 * BS_ERR_NO_MEMORY; and bs_simd_select's errors. */
BS_API bs_status bs_ivf_assign(const float *centroids, uint32_t k, uint32_t d,
                               bs_metric metric, const float *x, size_t n,
                               uint32_t *assign, float *dist2, bs_error *err);

/* Fingerprint over (k, d, metric, centroids as little-endian float32). */
BS_API bs_fingerprint bs_ivf_fingerprint(const float *centroids, uint32_t k,
                                         uint32_t d, bs_metric metric);

/* ----------------------------------------------------------------- SIMD */

typedef enum bs_simd_level {
    BS_SIMD_SCALAR = 0,
    BS_SIMD_AVX2 = 1,
    BS_SIMD_AVX512 = 2
} bs_simd_level;

/* The best level this CPU (and OS) supports, or the one named by the
 * environment variable BITSHARD_SIMD ("scalar", "avx2", "avx512"). An
 * unknown name is BS_ERR_INVALID_ARGUMENT; a level the CPU lacks is
 * BS_ERR_UNSUPPORTED_CPU.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out NULL, an unknown name);
 * BS_ERR_UNSUPPORTED_CPU. */
BS_API bs_status bs_simd_select(bs_simd_level *out, bs_error *err);
BS_API int bs_simd_supported(bs_simd_level level);
BS_API const char *bs_simd_name(bs_simd_level level);

/* -------------------------------------------------------------- segments */

typedef struct bs_segment_spec {
    uint32_t dim;              /* vector dimension d */
    uint32_t num_bits;         /* 1..9 */
    bs_metric metric;
    bs_rotation_kind rotation_kind;
    uint64_t rotation_seed;
    const float *centroids;    /* num_partitions * dim */
    uint32_t num_partitions;
    const char *column;        /* UTF-8, NUL-terminated, <= 1024 bytes */
    const uint8_t *uuid;       /* 16 bytes */
    /* The fragments this segment covers: ids, and physical row counts (the
     * row ids of a fragment are (id << 32) | offset, offset < rows). */
    const uint64_t *fragment_ids;
    const uint64_t *fragment_rows;
    uint32_t num_fragments;
} bs_segment_spec;

typedef struct bs_segment_builder bs_segment_builder;

/* Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out or spec NULL, or a spec field
 * out of range, naming it and its value: dim, num_bits, metric,
 * rotation_kind, num_partitions, a centroid value that is not accepted,
 * column, uuid, fragments); BS_ERR_NO_MEMORY. */
BS_API bs_status bs_builder_create(const bs_segment_spec *spec,
                                   bs_segment_builder **out, bs_error *err);
/* Encodes n vectors (n * dim floats) of the fragment at position
 * fragment_index of spec->fragment_ids, at the given physical offsets.
 * A value that is not accepted gives BS_ERR_INVALID_DATA naming the row.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (b, x or offsets NULL,
 * fragment_index out of range, an offset out of range or already added);
 * BS_ERR_INVALID_DATA (a value that is not accepted, or a row whose rotated
 * residual overflows float); BS_ERR_NO_MEMORY; and bs_simd_select's errors. */
BS_API bs_status bs_builder_add(bs_segment_builder *b, const float *x,
                                size_t n, uint32_t fragment_index,
                                const uint32_t *offsets, bs_error *err);
/* Threads each later bs_builder_add uses (default 1; clamped to 1..256).
 * The segment is the same, byte for byte, for every count; with more than
 * one, each thread calls the BLAS itself, which should then run
 * single-threaded (see bs_kmeans_train_mt). */
BS_API void bs_builder_set_threads(bs_segment_builder *b, uint32_t num_threads);
/* Records a 16-byte identity fingerprint for the fragment fragment_id in
 * the segment's fragment table (default all zero: not recorded). The
 * library stores and copies it (merge concatenates the tables) and never
 * interprets it.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (b or fp NULL, fragment_id not
 * one of the spec's fragments). */
BS_API bs_status bs_builder_set_fragment_identity(bs_segment_builder *b,
                                                  uint64_t fragment_id,
                                                  const uint8_t fp[16],
                                                  bs_error *err);
/* Writes the segment to path (via path.tmp + rename).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (b or path NULL);
 * BS_ERR_NO_MEMORY; BS_ERR_IO (open, write, close, sync or rename
 * failed); BS_ERR_INTERNAL. */
BS_API bs_status bs_builder_write(bs_segment_builder *b, const char *path,
                                  bs_error *err);

/* Write option of bs_builder_set_write_flags, bs_segment_merge_flags and
 * bs_segment_remap_flags: leave the centroids out of the file (header
 * flags bit 0, an empty artifacts section; docs/format.md, "External
 * centroids"). The segments of one index then share one copy, kept by the
 * caller and matched by the IVF fingerprint, which the header still holds:
 * open such a file with bs_segment_open_with_centroids. Without it a
 * writer stores the centroids (a self-contained file), whatever its inputs
 * did. */
#define BS_WRITE_EXTERNAL_CENTROIDS 1u

/* Write options (BS_WRITE_*) of later bs_builder_write calls; default 0.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (b NULL, an unknown bit). */
BS_API bs_status bs_builder_set_write_flags(bs_segment_builder *b,
                                            uint32_t flags, bs_error *err);
BS_API void bs_builder_free(bs_segment_builder *b);

typedef struct bs_segment bs_segment;

/* Opens a segment and keeps pointers into data: data must stay alive and
 * unchanged until bs_segment_free. Never trusts a length or offset from
 * the bytes. A format 3 file: validates the header, artifacts, fragment
 * table and directory (structure, bounds, their checksums), not the
 * partitions, which are checked the first time a search touches them
 * (docs/format.md, "Validation"); bs_segment_verify checks everything. A
 * format 2 file: validates the whole buffer and converts it to the format
 * 3 layout in memory (format_version still reports 2).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out or data NULL, data not
 * 64-byte aligned); BS_ERR_CORRUPT (anything wrong in the bytes, naming the
 * section, reserved flag bits set); BS_ERR_UNSUPPORTED_VERSION (a read
 * version newer than this library's, or a format older than 2);
 * BS_ERR_NO_MEMORY. */
BS_API bs_status bs_segment_open(const void *data, size_t len,
                                 bs_segment **out, bs_error *err);
/* bs_segment_open with the index's centroids (num_floats = num_partitions
 * * dim floats, row-major), which must stay alive and unchanged until
 * bs_segment_free: a file written with BS_WRITE_EXTERNAL_CENTROIDS takes
 * them as its own (the segment keeps the pointer; many segments may share
 * one array). Their IVF fingerprint (over the header's k, dim and metric)
 * must equal the header's, for any file: centroids that do not match are
 * refused even when the file stores its own. centroids NULL is
 * bs_segment_open. bs_segment_open of a file with external centroids is
 * BS_ERR_INVALID_ARGUMENT naming the fingerprint it needs.
 * Returns: as bs_segment_open, and BS_ERR_ARTIFACT_MISMATCH (the
 * centroids' count or fingerprint differs from the header's, naming both
 * fingerprints); BS_ERR_INVALID_ARGUMENT (external centroids not given). */
BS_API bs_status bs_segment_open_with_centroids(const void *data, size_t len,
                                                const float *centroids,
                                                size_t num_floats,
                                                bs_segment **out,
                                                bs_error *err);
BS_API void bs_segment_free(bs_segment *seg);
/* Checks what bs_segment_open leaves to first use: every partition (its
 * two region checksums, ordinals, factors, padding) and that no ordinal is
 * in two partitions. Used before a merge, by `bitshard verify` and the
 * reader's fuzz target.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (seg NULL); BS_ERR_CORRUPT
 * naming the partition and what is wrong; BS_ERR_NO_MEMORY. */
BS_API bs_status bs_segment_verify(const bs_segment *seg, bs_error *err);
/* Declares that seg's buffer is a read-only shared mapping of its file
 * (mmap MAP_SHARED, starting on a page boundary), so that bs_segment_verify
 * and bs_segment_merge drop each partition's pages from the process once
 * they have read it (madvise MADV_DONTNEED: the kernel's page cache keeps
 * them, a later read faults them back in). Without it, verifying or merging
 * a mapped file leaves all of it resident in the process; with it, a few
 * pages per input. Never declare memory the caller allocated: dropping its
 * pages would lose their contents. Has no effect on a version 2 file (read
 * into memory of the library's own) or where madvise is not available.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (seg NULL, a prefix open, or a
 * buffer not on a page boundary, naming its address). */
BS_API bs_status bs_segment_set_mapped(bs_segment *seg, bs_error *err);

/* Opening a segment from its prefix, for object stores (docs/format.md,
 * "Opening from a prefix"): the header, artifacts, fragment table and
 * directory are one contiguous range from offset 0; each partition's
 * bytes are one range after it, fetched and attached when a search needs
 * them.
 *
 * Given the first len bytes of a segment file, sets *out to the bytes to
 * read from offset 0: the whole prefix once len covers the header (whose
 * checksum is then checked), else the header's size (or the smallest
 * header): read that much and ask again. A format 2 file's prefix is the
 * whole file (it is converted whole at open).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out NULL); BS_ERR_CORRUPT (bad
 * magic, header size or checksum, a directory past the file's end);
 * BS_ERR_UNSUPPORTED_VERSION (a newer read version). */
BS_API bs_status bs_segment_prefix_size(const void *data, size_t len, uint64_t *out,
                                        bs_error *err);
/* Opens a segment of file_size bytes from its first len bytes (at least
 * the prefix bs_segment_prefix_size names; 64-byte aligned, kept until
 * bs_segment_free), validated as bs_segment_open validates them. Every
 * partition starts absent: a search that probes it fails with
 * BS_ERR_INVALID_ARGUMENT "segment <uuid>: partition <p> is not
 * attached ..."; bs_segment_verify fails the same way until every
 * partition is attached. bs_segment_partition_range names a partition's
 * bytes and bs_segment_attach hands them over, one partition at a time,
 * so a reader can hold any subset. len == file_size is a whole open.
 * Returns: as bs_segment_open; BS_ERR_INVALID_ARGUMENT also for len >
 * file_size; BS_ERR_CORRUPT for a prefix that is too short or a format 2
 * file given in part. */
BS_API bs_status bs_segment_open_prefix(const void *data, size_t len, uint64_t file_size,
                                        bs_segment **out, bs_error *err);
/* bs_segment_open_prefix with the index's centroids, as
 * bs_segment_open_with_centroids (a file with external centroids needs
 * them; the prefix then holds no centroids).
 * Returns: as bs_segment_open_prefix and bs_segment_open_with_centroids. */
BS_API bs_status bs_segment_open_prefix_with_centroids(const void *data, size_t len,
                                                       uint64_t file_size,
                                                       const float *centroids,
                                                       size_t num_floats,
                                                       bs_segment **out, bs_error *err);
/* The byte range [*offset, *offset + *size) of partition p in the file (a
 * multiple of 64 at a multiple of 64; partition p + 1 starts where p ends;
 * size 0 for an empty partition).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (NULL argument, p out of range). */
BS_API bs_status bs_segment_partition_range(const bs_segment *seg, uint32_t p,
                                            uint64_t *offset, uint64_t *size,
                                            bs_error *err);
/* 1 when partition p's bytes can be read (always, for a whole open). */
BS_API int bs_segment_partition_attached(const bs_segment *seg, uint32_t p);
/* Attaches the len bytes of partition p of a prefix-opened segment (the
 * file's bytes of its range; 64-byte aligned; kept until detached or
 * bs_segment_free), after checking them as a search's first touch does:
 * both region checksums, ordinals, factors and padding. Thread-safe
 * against searches of other partitions and against other attaches; a
 * partition is attached at most once at a time.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (NULL argument, a segment opened
 * whole, p out of range, len not the partition's size, unaligned bytes,
 * already attached); BS_ERR_CORRUPT "segment <uuid>: partition <p> ..."
 * (the partition stays absent). */
BS_API bs_status bs_segment_attach(bs_segment *seg, uint32_t p, const void *data,
                                   size_t len, bs_error *err);
/* Makes partition p of a prefix-opened segment absent again, so that the
 * caller may free its bytes. The caller guarantees that no search is using
 * the partition (bitshard's Python side pins the partitions of a running
 * search).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (NULL, opened whole, p out of
 * range, not attached). */
BS_API bs_status bs_segment_detach(bs_segment *seg, uint32_t p, bs_error *err);

typedef struct bs_segment_info {
    uint32_t format_version;
    uint32_t dim;
    uint32_t padded_dim;
    uint32_t num_bits;
    bs_metric metric;
    bs_rotation_kind rotation_kind;
    uint64_t rotation_seed;
    uint32_t num_partitions;
    uint32_t num_fragments;
    uint64_t num_rows;
    uint8_t uuid[16];
    bs_fingerprint rotation_fingerprint;
    bs_fingerprint ivf_fingerprint;
    const char *column;        /* NUL-terminated copy owned by the segment */
    /* 1: the file does not store its centroids (header flags bit 0); they
     * were given to bs_segment_open_with_centroids. */
    uint32_t external_centroids;
} bs_segment_info;

BS_API void bs_segment_get_info(const bs_segment *seg, bs_segment_info *out);
/* num_partitions * dim floats, owned by the segment (or, for a file with
 * external centroids, the caller's array given at open). */
BS_API const float *bs_segment_centroids(const bs_segment *seg);
BS_API void bs_segment_fragment(const bs_segment *seg, uint32_t i,
                                uint64_t *id, uint64_t *rows);
/* The 16-byte identity fingerprint of fragment table entry i (all zero:
 * not recorded, and for every entry of a format 2 file). */
BS_API void bs_segment_fragment_identity(const bs_segment *seg, uint32_t i,
                                         uint8_t out[16]);

/* The sum over the segment's rows of |r|, the norm of the residual each
 * code encodes (sqrt of the stored norm2: the distance from the row,
 * normalised for cosine, to its centroid), in double, in storage order.
 * Divided by num_rows it is the rows' mean residual norm, which bitshard
 * reports to show how far new rows drift from the trained centroids.
 * seg NULL gives 0; a segment opened from its prefix with a partition not
 * attached gives NaN (its rows cannot be read). */
BS_API double bs_segment_residual_sum(const bs_segment *seg);

/* BS_OK when a and b share dim, bits, metric, rotation, centroids and
 * column; otherwise BS_ERR_ARTIFACT_MISMATCH naming the first artifact that
 * differs and both values.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (a or b NULL);
 * BS_ERR_ARTIFACT_MISMATCH. */
BS_API bs_status bs_segment_check_compatible(const bs_segment *a,
                                             const bs_segment *b,
                                             bs_error *err);

/* Streams n compatible segments with disjoint fragments into one new
 * segment at path: partition p of the output is partition p of every input
 * in input order, repacked. Memory is bounded by one partition.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (no inputs, a NULL argument, a
 * fragment in two inputs, more than 2^32 - 1 fragments or rows);
 * BS_ERR_ARTIFACT_MISMATCH (inputs from different code spaces);
 * BS_ERR_NO_MEMORY; BS_ERR_IO; BS_ERR_INTERNAL. */
BS_API bs_status bs_segment_merge(const bs_segment *const *inputs, size_t n,
                                  const uint8_t uuid[16], const char *path,
                                  bs_error *err);
/* bs_segment_merge with write options (BS_WRITE_*): 0 writes the centroids
 * into the output (a merge of one input with external centroids exports a
 * self-contained copy), BS_WRITE_EXTERNAL_CENTROIDS leaves them out.
 * Returns: as bs_segment_merge; BS_ERR_INVALID_ARGUMENT (an unknown bit). */
BS_API bs_status bs_segment_merge_flags(const bs_segment *const *inputs,
                                        size_t n, const uint8_t uuid[16],
                                        const char *path, uint32_t flags,
                                        bs_error *err);

/* A row map entry: the row is left out of the remapped segment. */
#define BS_REMAP_DROP UINT64_MAX

/* One input of bs_segment_remap: a segment and, for each of its ordinals
 * (the physical rows of its fragments in table order, map_len of them),
 * the row id (new_fragment << 32) | new_offset the row takes in the output,
 * or BS_REMAP_DROP. Entries of ordinals the segment did not encode are
 * checked like the others and otherwise unused. */
typedef struct bs_remap_input {
    const bs_segment *segment;
    const uint64_t *row_map;
    uint64_t map_len;
} bs_remap_input;

/* Writes a new segment at path holding the encoded rows of n compatible
 * inputs under new row ids, without re-encoding: codes and factors are
 * copied, each partition's rows put in the order of their new ordinals and
 * the FastScan blocks repacked. The output's fragment table is
 * (fragment_ids, fragment_rows); every mapped row id must name a fragment of
 * it and an offset below its rows, and no two entries (of any input) may
 * map to the same row id. Because every row is encoded on its own, the
 * output is byte for byte the segment a builder with the same artifacts,
 * uuid, fragment table and identities writes for the same rows.
 * fragment_identities is num_fragments * 16 bytes, entry i the identity
 * fingerprint of output fragment i (as bs_builder_set_fragment_identity
 * records), or NULL for all zero: the inputs' identities describe the old
 * fragments, so none is carried over. Memory: one partition
 * block plus 4 bytes per input ordinal and one bit per output row.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (no inputs, a NULL argument, a
 * map whose length is not the input's ordinal count, a row id outside the
 * table, two entries mapped to one row id, a bad fragment table, naming
 * the input, ordinal and value); BS_ERR_ARTIFACT_MISMATCH (inputs from
 * different code spaces); BS_ERR_NO_MEMORY; BS_ERR_IO; BS_ERR_INTERNAL. */
BS_API bs_status bs_segment_remap(const bs_remap_input *inputs, size_t n,
                                  const uint64_t *fragment_ids,
                                  const uint64_t *fragment_rows,
                                  uint32_t num_fragments,
                                  const uint8_t *fragment_identities,
                                  const uint8_t uuid[16], const char *path,
                                  bs_error *err);
/* bs_segment_remap with write options (BS_WRITE_*), as bs_segment_merge_flags.
 * Returns: as bs_segment_remap; BS_ERR_INVALID_ARGUMENT (an unknown bit). */
BS_API bs_status bs_segment_remap_flags(const bs_remap_input *inputs, size_t n,
                                        const uint64_t *fragment_ids,
                                        const uint64_t *fragment_rows,
                                        uint32_t num_fragments,
                                        const uint8_t *fragment_identities,
                                        const uint8_t uuid[16],
                                        const char *path, uint32_t flags,
                                        bs_error *err);

/* ---------------------------------------------------------------- search */

typedef struct bs_searcher bs_searcher;

/* Prepares a search over n compatible segments (checked): the rotation and
 * the rotated centroids are computed once here. The segments must outlive
 * the searcher. n may be 0 only if spec-like artifacts are unavailable: it
 * is an error.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (out NULL, n 0, a NULL segment);
 * BS_ERR_ARTIFACT_MISMATCH (segments from different code spaces, naming
 * the segment and the artifact); BS_ERR_NO_MEMORY; and bs_simd_select's
 * errors. */
BS_API bs_status bs_searcher_create(const bs_segment *const *segs, size_t n,
                                    bs_searcher **out, bs_error *err);
BS_API void bs_searcher_free(bs_searcher *s);

typedef struct bs_search_params {
    uint32_t k;              /* >= 1 */
    uint32_t nprobes;        /* >= 1; capped at num_partitions */
    float eps0;              /* bound width in standard deviations; 1.9 */
    /* 0: keep every candidate whose lower bound can still enter the top k
     * (the gated default). r > 0: keep the k * r best by estimate. */
    uint32_t refine_factor;
    /* n flags, one per segment of the searcher; NULL searches all. */
    const uint8_t *segment_mask;
    /* Optional allow-list: sorted, unique row ids; NULL allows every row. */
    const uint64_t *allowed_rowids;
    size_t num_allowed;
    /* Optional allow-list of fragments: sorted, unique fragment ids (a row
     * id's high 32 bits); NULL allows every fragment. */
    const uint64_t *allowed_fragments;
    size_t num_allowed_fragments;
    /* Optional deny-list: sorted, unique row ids never returned (rows
     * deleted from the source after their segment was built). */
    const uint64_t *denied_rowids;
    size_t num_denied;
    /* A partition share (one actor of a distributed search, docs/serve.md):
     * num_partitions flags; NULL scans every probed partition. The probes
     * are still chosen among all partitions; only those flagged are read. */
    const uint8_t *partition_mask;
    /* Nonzero: answer as one share of a search whose shares together cover
     * every probed partition. c then holds every code of the share whose
     * lower bound is within the share's k-th smallest upper bound (a
     * superset of the codes the whole search keeps), with row ids, lower
     * bounds and estimates (the full code's for B > 1), in no particular
     * order and with no repeat removed; bs_candidates_upper_bounds gives
     * the share's k smallest upper bounds. The caller keeps the candidates
     * within the k-th smallest upper bound over all shares and ranks them as
     * bs_search would. */
    int share;
} bs_search_params;

typedef struct bs_search_stats {
    uint64_t partitions_probed; /* summed over segments */
    uint64_t codes_scanned;     /* stage 1 */
    uint64_t codes_stage2;      /* reached the extra bits' estimate */
    uint64_t candidates;        /* returned for reranking / final */
} bs_search_stats;

/* A growable candidate list owned by the caller (reuse it across queries). */
typedef struct bs_candidates bs_candidates;
BS_API bs_candidates *bs_candidates_new(void);
BS_API void bs_candidates_free(bs_candidates *c);
BS_API size_t bs_candidates_size(const bs_candidates *c);
/* Row ids, estimated distances and lower bounds, sorted by (estimate, row
 * id), except for the gated rerank of 1-bit codes (refine_factor == 0),
 * sorted by (lower bound, row id): the caller computes exact distances in
 * that order and stops at the first candidate whose lower bound exceeds the
 * k-th best exact distance so far. Valid until the next search into c. */
BS_API const uint64_t *bs_candidates_rowids(const bs_candidates *c);
BS_API const float *bs_candidates_estimates(const bs_candidates *c);
BS_API const float *bs_candidates_lower_bounds(const bs_candidates *c);
/* After a search with share set: the share's smallest upper bounds over its
 * scanned codes that the filters allow, ascending, min(k, such codes) of
 * them, into *ubs (valid until the next search into c); returns their
 * count. 0 after any other search. */
BS_API size_t bs_candidates_upper_bounds(const bs_candidates *c, const float **ubs);

/* One query q (dim floats). Fills c with the candidates that need exact
 * distances (1-bit or refine_factor > 0) or the final top k (multi-bit,
 * refine_factor == 0, distances are the extra bits' estimates). The result
 * depends only on the set of rows searched, never on how they are split
 * into segments or ordered (ties break by row id).
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (a NULL argument, k or nprobes 0,
 * k x refine_factor too large, eps0 negative, not finite or above
 * BS_MAX_EPS0); BS_ERR_INVALID_DATA (a value of q that is not accepted,
 * naming the dimension); BS_ERR_NO_MEMORY. */
BS_API bs_status bs_search(const bs_searcher *s, const float *q,
                           const bs_search_params *params, bs_candidates *c,
                           bs_search_stats *stats, bs_error *err);

/* The partitions bs_search would probe for q with this nprobes (capped at
 * num_partitions), in scan order, written to out (at least min(nprobes,
 * num_partitions) entries); *n_out receives their number. The same for
 * every segment of the searcher (they share the centroids): a two-phase
 * search fetches and attaches these partitions (bs_segment_attach), then
 * calls bs_search. q is checked as bs_search checks it.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (a NULL argument, nprobes 0);
 * BS_ERR_INVALID_DATA (a value of q that is not accepted); BS_ERR_NO_MEMORY. */
BS_API bs_status bs_search_probes(const bs_searcher *s, const float *q, uint32_t nprobes,
                                  bs_candidates *c, uint32_t *out, uint32_t *n_out,
                                  bs_error *err);

/* One step of the gated rerank. Candidates come in (lower bound, row id)
 * order with their exact distances d; heap holds the k best exact distances
 * so far (a max-heap of *heap_n <= k entries, updated in place). Returns
 * the index of the first candidate whose lower bound exceeds the k-th best
 * distance (that candidate and the rest are not part of the answer), or n
 * if every candidate was taken in. */
BS_API size_t bs_rerank_gate(const float *lb, const float *d, size_t n,
                             uint32_t k, float *heap, uint32_t *heap_n);

/* Exact distances under metric between q (dim) and n rows x (n * dim), in
 * a fixed summation order so that every caller gets the same bits.
 * Returns: BS_OK; BS_ERR_INVALID_ARGUMENT (a NULL array with n > 0, dim 0,
 * unknown metric). */
BS_API bs_status bs_exact_distances(bs_metric metric, const float *q,
                                    const float *x, size_t n, uint32_t dim,
                                    float *out, bs_error *err);

#ifdef __cplusplus
}
#endif

#endif /* BITSHARD_H */
