/* Opening a segment (docs/format.md, "Validation"). A version 3 file is
 * opened from its header, artifacts, fragment table and directory alone;
 * each partition is checked the first time something asks for it
 * (bs_segment_check_partition), and bs_segment_verify checks everything,
 * including the rules that need the whole file. A version 2 file is
 * validated whole, as version 2 readers did, and converted to the version
 * 3 layout in memory: everything past the open sees version 3. */
#include "segment.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "format.h"
#include "hash.h"
#include "pages.h"
#include "repack.h"

/* One directory entry, checked for structure at open. base points at the
 * partition's own bytes: into the file's buffer for a whole-file open, or
 * at the bytes a caller attached (bs_segment_attach) for a segment opened
 * from its prefix; NULL while the partition is absent. */
typedef struct seg_part {
    const uint8_t *base;
    uint64_t offset, size, stage1_size;
    uint64_t stage1_sum, extra_sum;
    uint32_t count;
} seg_part;

/* Partition states: unchecked, checked and good, checked and corrupt;
 * and, for a segment opened from its prefix, absent (no bytes attached)
 * and being attached (one bs_segment_attach owns the entry). A search
 * reads base only after it saw GOOD with acquire order, and attach
 * publishes base with the release store of GOOD. */
enum { PART_UNCHECKED = 0, PART_GOOD = 1, PART_CORRUPT = 2, PART_ABSENT = 3,
       PART_ATTACHING = 4 };

/* A version 2 partition, validated whole at open, before conversion. */
typedef struct v2_view {
    uint32_t count;
    const uint8_t *blocks;
    const float *norm2, *s1, *s_full;
    const uint32_t *ordinals;
    const uint8_t *ext;
} v2_view;

struct bs_segment {
    const uint8_t *data;
    size_t len;   /* bytes of the file */
    size_t avail; /* bytes at data: len, or the prefix of a prefix open */
    int from_prefix; /* partitions come by bs_segment_attach */
    uint8_t *owned; /* the converted bytes of a version 2 file, or NULL */
    uint32_t layout; /* 2 or 3: the layout of data */
    bs_segment_info info;
    char *column;
    const float *centroids;
    /* The caller's centroids (bs_segment_open_with_centroids), or NULL. */
    const float *given;
    size_t given_floats;
    uint64_t *frag_ids;
    uint64_t *frag_rows;
    uint8_t *frag_identity; /* 16 bytes per fragment */
    /* prefix[i] = rows of fragments before i; prefix[num_fragments] is the
     * number of ordinals. */
    uint64_t *prefix;
    seg_part *parts;
    _Atomic unsigned char *state; /* per partition, PART_* */
    int unique_checked; /* no ordinal in two partitions: known */
    int mapped; /* data is a shared file mapping (bs_segment_set_mapped) */
    v2_view *v2; /* version 2 only, during open */
};

#define CORRUPT(...) bs_fail(err, BS_ERR_CORRUPT, __VA_ARGS__)
#define NOMEM() bs_fail(err, BS_ERR_NO_MEMORY, "out of memory")

typedef unsigned long long ull;

/* The n bytes at offset off lie inside the file. */
static bs_status need(const bs_segment *s, uint64_t off, uint64_t n,
                      const char *what, bs_error *err) {
    if (off > s->len || n > s->len - off)
        return CORRUPT("file truncated: %s needs %llu bytes at offset %llu, "
                       "file has %zu",
                       what, (ull)n, (ull)off, s->len);
    return BS_OK;
}

/* The n bytes at offset off are in the buffer, to be read: inside the file,
 * and for a prefix open inside the prefix the caller gave. */
static bs_status need_read(const bs_segment *s, uint64_t off, uint64_t n,
                           const char *what, bs_error *err) {
    BS_TRY(need(s, off, n, what, err));
    if (off > s->avail || n > s->avail - off)
        return CORRUPT("prefix too short: %s needs %llu bytes at offset %llu, "
                       "the prefix has %zu (bs_segment_prefix_size says how "
                       "many to read)",
                       what, (ull)n, (ull)off, s->avail);
    return BS_OK;
}

static bs_status verify_checksum(const bs_segment *s, uint64_t off,
                                 uint64_t n, uint64_t expected,
                                 const char *what, bs_error *err) {
    uint64_t got = bs_hash64(s->data + off, (size_t)n, BS_SEG_CHECKSUM_SEED);
    if (got != expected)
        return CORRUPT("%s checksum mismatch (stored %016llx, computed "
                       "%016llx)",
                       what, (ull)expected, (ull)got);
    return BS_OK;
}

/* Reads one (offset, size, checksum) triple of the header's section table,
 * requires the section where the layout puts it and with the size its
 * counts imply, and verifies its checksum. */
static bs_status check_section(const bs_segment *s, unsigned field,
                               uint64_t expect_off, uint64_t expect_size,
                               const char *what, bs_error *err) {
    const uint8_t *h = s->data;
    uint64_t off = bs_load_u64(h + field);
    uint64_t size = bs_load_u64(h + field + 8);
    uint64_t sum = bs_load_u64(h + field + 16);
    if (off != expect_off)
        return CORRUPT("%s section at offset %llu, expected %llu", what,
                       (ull)off, (ull)expect_off);
    if (size != expect_size)
        return CORRUPT("%s section is %llu bytes, expected %llu", what,
                       (ull)size, (ull)expect_size);
    BS_TRY(need_read(s, off, size, what, err));
    return verify_checksum(s, off, size, sum, what, err);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* A read version this reader knows (what a prefix open checks too). */
static bs_status check_read_version(uint32_t read_version, bs_error *err) {
    if (read_version > BS_SEG_VERSION)
        return bs_fail(err, BS_ERR_UNSUPPORTED_VERSION,
                       "segment needs a reader of format version %u; this "
                       "reader knows version %u",
                       read_version, BS_SEG_VERSION);
    return BS_OK;
}

/* The header size field: a multiple of 64 between the headers of the
 * shortest and the longest column name. */
static bs_status check_header_size(uint32_t header_size, bs_error *err) {
    const uint64_t min_header = bs_seg_header_size(1);
    const uint64_t max_header = bs_seg_header_size(BS_SEG_MAX_COLUMN);
    if (header_size < min_header || header_size > max_header ||
        header_size % BS_SEG_ALIGN != 0)
        return CORRUPT("header size %u is invalid (a multiple of 64 in "
                       "%llu..%llu)",
                       header_size, (ull)min_header, (ull)max_header);
    return BS_OK;
}

static bs_status parse_header(bs_segment *s, bs_error *err) {
    const uint8_t *h = s->data;
    bs_segment_info *info = &s->info;

    BS_TRY(need_read(s, 0, 16, "magic and versions", err));
    if (memcmp(h, BS_SEG_MAGIC, BS_SEG_MAGIC_LEN) != 0)
        return CORRUPT("bad magic at offset 0: not a bitshard segment");
    uint32_t read_version = bs_load_u32(h + BS_HDR_READ_VERSION);
    uint32_t write_version = bs_load_u32(h + BS_HDR_WRITE_VERSION);
    if (read_version == 0)
        return CORRUPT("read version 0 is invalid");
    BS_TRY(check_read_version(read_version, err));
    if (write_version < read_version)
        return CORRUPT("write version %u is older than read version %u",
                       write_version, read_version);
    info->format_version = write_version;
    /* A read version of 2 (or 1) promises version 2's layout whatever
     * wrote the file; 3 is this reader's own. */
    s->layout = read_version <= BS_SEG_VERSION_2 ? 2 : 3;

    BS_TRY(need_read(s, 0, bs_seg_header_size(1), "header", err));
    uint32_t header_size = bs_load_u32(h + BS_HDR_HEADER_SIZE);
    BS_TRY(check_header_size(header_size, err));
    BS_TRY(need_read(s, 0, header_size, "header", err));
    BS_TRY(verify_checksum(s, 0, header_size - 8,
                           bs_load_u64(h + header_size - 8), "header", err));

    /* From here on the header bytes are the writer's; what remains is
     * to refuse a writer that broke the rules. */
    uint64_t file_size = bs_load_u64(h + BS_HDR_FILE_SIZE);
    if (file_size > s->len)
        return CORRUPT("file truncated: segment is %llu bytes, file has %zu",
                       (ull)file_size, s->len);
    if (file_size < s->len)
        return CORRUPT("%llu unexpected bytes after the segment's end at "
                       "offset %llu",
                       (ull)(s->len - file_size), (ull)file_size);

    uint32_t flags = bs_load_u32(h + BS_HDR_FLAGS);
    if (flags & ~BS_SEG_FLAGS_KNOWN)
        return CORRUPT("reserved flag bits 0x%x are set",
                       flags & ~BS_SEG_FLAGS_KNOWN);
    /* Version 2 had no flags: its readers refused every bit. */
    if (flags != 0 && s->layout == 2)
        return CORRUPT("flag bits 0x%x are set in a version %u file", flags,
                       read_version);
    info->external_centroids = (flags & BS_SEG_FLAG_EXTERNAL_CENTROIDS) ? 1u : 0u;
    info->dim = bs_load_u32(h + BS_HDR_DIM);
    info->padded_dim = bs_load_u32(h + BS_HDR_PADDED_DIM);
    info->num_bits = bs_load_u32(h + BS_HDR_NUM_BITS);
    uint32_t metric = bs_load_u32(h + BS_HDR_METRIC);
    uint32_t kind = bs_load_u32(h + BS_HDR_ROTATION_KIND);
    info->num_partitions = bs_load_u32(h + BS_HDR_NUM_PARTITIONS);
    info->rotation_seed = bs_load_u64(h + BS_HDR_ROTATION_SEED);
    info->num_rows = bs_load_u64(h + BS_HDR_NUM_ROWS);
    info->num_fragments = bs_load_u32(h + BS_HDR_NUM_FRAGMENTS);
    uint32_t column_len = bs_load_u32(h + BS_HDR_COLUMN_LEN);
    memcpy(info->uuid, h + BS_HDR_UUID, 16);
    memcpy(info->rotation_fingerprint.bytes, h + BS_HDR_ROTATION_FP, 16);
    memcpy(info->ivf_fingerprint.bytes, h + BS_HDR_IVF_FP, 16);

    if (info->dim == 0) return CORRUPT("dimension is 0");
    if (info->padded_dim != bs_padded_dim(info->dim) ||
        info->padded_dim == 0)
        return CORRUPT("padded dimension %u does not match dimension %u "
                       "(expected %u)",
                       info->padded_dim, info->dim, bs_padded_dim(info->dim));
    if (info->num_bits < 1 || info->num_bits > 9)
        return CORRUPT("num_bits %u is out of range 1..9", info->num_bits);
    if (info->format_version < BS_SEG_VERSION_2)
        return bs_fail(err, BS_ERR_UNSUPPORTED_VERSION,
                       "segment written by format version %u; this reader reads "
                       "format 2 (no stored error factors, 9-bit codes as bytes): "
                       "rebuild the index",
                       info->format_version);
    if (metric > BS_METRIC_DOT)
        return CORRUPT("metric %u is unknown", metric);
    if (kind > BS_ROTATION_MATRIX)
        return CORRUPT("rotation kind %u is unknown", kind);
    info->metric = (bs_metric)metric;
    info->rotation_kind = (bs_rotation_kind)kind;
    if (info->num_partitions == 0) return CORRUPT("num_partitions is 0");
    if (info->num_rows > BS_SEG_MAX_ROWS)
        return CORRUPT("num_rows %llu exceeds 2^32 - 1",
                       (ull)info->num_rows);
    if (column_len < 1 || column_len > BS_SEG_MAX_COLUMN)
        return CORRUPT("column name length %u is out of range 1..%u",
                       column_len, BS_SEG_MAX_COLUMN);
    if (header_size != bs_seg_header_size(column_len))
        return CORRUPT("header size %u does not match a %u-byte column "
                       "name (expected %llu)",
                       header_size, column_len,
                       (ull)bs_seg_header_size(column_len));
    const uint8_t *col = h + BS_HDR_COLUMN;
    if (!bs_seg_utf8_valid(col, column_len))
        return CORRUPT("column name is not valid UTF-8");
    for (uint64_t i = BS_HDR_COLUMN + column_len; i < header_size - 8u; i++)
        if (h[i] != 0)
            return CORRUPT("header padding byte at offset %llu is not zero",
                           (ull)i);
    s->column = bs_alloc((size_t)column_len + 1, 1);
    if (s->column == NULL) return NOMEM();
    memcpy(s->column, col, column_len);
    s->column[column_len] = '\0';
    info->column = s->column;

    bs_fingerprint rfp = bs_rotation_fingerprint_params(
        info->rotation_kind, info->dim, info->padded_dim, info->rotation_seed);
    if (memcmp(rfp.bytes, info->rotation_fingerprint.bytes, 16) != 0)
        return CORRUPT("rotation fingerprint does not match the rotation "
                       "parameters (kind %u, dim %u, padded dim %u, seed "
                       "%llu)",
                       kind, info->dim, info->padded_dim,
                       (ull)info->rotation_seed);
    return BS_OK;
}

/* The caller's centroids against the header: their count, then their
 * fingerprint (over the header's k, dim and metric). Both are the caller's
 * mistake (the wrong index's centroids), not corruption. */
static bs_status check_given_centroids(const bs_segment *s, bs_error *err) {
    const bs_segment_info *info = &s->info;
    char want[33], got[33];
    bs_seg_fingerprint_hex(&info->ivf_fingerprint, want);
    size_t n = (size_t)info->num_partitions * info->dim;
    if (s->given_floats != n)
        return bs_fail(err, BS_ERR_ARTIFACT_MISMATCH,
                       "centroids given hold %zu floats, the segment's are %u x "
                       "%u (IVF fingerprint %s)",
                       s->given_floats, info->num_partitions, info->dim, want);
    bs_fingerprint fp = bs_ivf_fingerprint(s->given, info->num_partitions,
                                           info->dim, info->metric);
    if (memcmp(fp.bytes, info->ivf_fingerprint.bytes, 16) != 0) {
        bs_seg_fingerprint_hex(&fp, got);
        return bs_fail(err, BS_ERR_ARTIFACT_MISMATCH,
                       "centroids given do not match the segment's: IVF "
                       "fingerprint %s given, %s in the segment",
                       got, want);
    }
    return BS_OK;
}

static bs_status parse_artifacts(bs_segment *s, bs_error *err) {
    const bs_segment_info *info = &s->info;
    uint64_t raw, size;
    /* k and dim are u32, so the product fits; 4x that may not on paper. */
    if (__builtin_mul_overflow((uint64_t)info->num_partitions * info->dim, 4,
                               &raw) ||
        !bs_align64_ok(raw, &size))
        return CORRUPT("centroids of %u x %u floats overflow",
                       info->num_partitions, info->dim);
    uint32_t header_size = bs_load_u32(s->data + BS_HDR_HEADER_SIZE);
    if (info->external_centroids) {
        /* An empty section (its checksum that of no bytes); the centroids
         * are the caller's, checked against the header's fingerprint. */
        BS_TRY(check_section(s, BS_HDR_ARTIFACTS, header_size, 0, "artifacts",
                             err));
        if (s->given == NULL) {
            char want[33];
            bs_seg_fingerprint_hex(&info->ivf_fingerprint, want);
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                           "segment has external centroids (IVF fingerprint "
                           "%s): open it with its index's centroids "
                           "(bs_segment_open_with_centroids)",
                           want);
        }
        BS_TRY(check_given_centroids(s, err));
        s->centroids = s->given;
    } else {
        BS_TRY(check_section(s, BS_HDR_ARTIFACTS, header_size, size,
                             "artifacts", err));
        s->centroids = (const float *)(const void *)(s->data + header_size);
    }
    size_t n = (size_t)info->num_partitions * info->dim;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(s->centroids[i]))
            return CORRUPT("centroid %zu has a non-finite value at "
                           "dimension %zu",
                           i / info->dim, i % info->dim);
    if (info->external_centroids) return BS_OK; /* fingerprint checked */
    bs_fingerprint fp = bs_ivf_fingerprint(s->centroids, info->num_partitions,
                                           info->dim, info->metric);
    if (memcmp(fp.bytes, info->ivf_fingerprint.bytes, 16) != 0)
        return CORRUPT("IVF fingerprint does not match the stored centroids");
    /* Centroids given for a file that stores its own must be the same. */
    if (s->given != NULL) BS_TRY(check_given_centroids(s, err));
    return BS_OK;
}

static bs_status parse_fragments(bs_segment *s, bs_error *err) {
    const uint8_t *h = s->data;
    uint32_t nf = s->info.num_fragments;
    uint64_t off = bs_load_u64(h + BS_HDR_ARTIFACTS) +
                   bs_load_u64(h + BS_HDR_ARTIFACTS + 8);
    const uint32_t entry = s->layout == 2 ? BS_SEG_V2_FRAGMENT_ENTRY
                                          : BS_SEG_FRAGMENT_ENTRY;
    uint64_t size;
    bs_align64_ok((uint64_t)nf * entry, &size);
    BS_TRY(check_section(s, BS_HDR_FRAGMENTS, off, size, "fragment table",
                         err));

    s->frag_ids = bs_alloc((size_t)nf + 1, sizeof(uint64_t));
    s->frag_rows = bs_alloc((size_t)nf + 1, sizeof(uint64_t));
    s->prefix = bs_alloc((size_t)nf + 1, sizeof(uint64_t));
    s->frag_identity = bs_zalloc((size_t)nf + 1, 16);
    if (!s->frag_ids || !s->frag_rows || !s->prefix || !s->frag_identity)
        return NOMEM();
    s->prefix[0] = 0;
    for (uint32_t i = 0; i < nf; i++) {
        const uint8_t *e = h + off + (size_t)i * entry;
        uint64_t id = bs_load_u64(e + BS_FRAG_ID);
        uint64_t rows = bs_load_u64(e + BS_FRAG_ROWS);
        /* Any 16 bytes are a valid identity (zero: not recorded). */
        if (s->layout == 3)
            memcpy(s->frag_identity + (size_t)i * 16, e + BS_FRAG_IDENTITY, 16);
        if (id > BS_SEG_MAX_FRAGMENT_ID)
            return CORRUPT("fragment %u has id %llu, which does not fit in "
                           "32 bits",
                           i, (ull)id);
        if (rows > BS_SEG_MAX_ROWS - s->prefix[i])
            return CORRUPT("fragment table entry %u: rows of fragments "
                           "exceed 2^32 - 1",
                           i);
        s->frag_ids[i] = id;
        s->frag_rows[i] = rows;
        s->prefix[i + 1] = s->prefix[i] + rows;
    }
    if (nf > 1) {
        uint64_t *sorted = bs_alloc(nf, sizeof(uint64_t));
        if (sorted == NULL) return NOMEM();
        memcpy(sorted, s->frag_ids, (size_t)nf * sizeof(uint64_t));
        qsort(sorted, nf, sizeof(uint64_t), cmp_u64);
        for (uint32_t i = 1; i < nf; i++) {
            if (sorted[i] == sorted[i - 1]) {
                ull dup = sorted[i];
                free(sorted);
                return CORRUPT("fragment %llu appears twice in the fragment "
                               "table",
                               dup);
            }
        }
        free(sorted);
    }
    return BS_OK;
}

/* Partition p has bytes to read: not a prefix-opened segment's absent or
 * half-attached partition (acquire: pairs with attach's release). */
static int partition_present(const bs_segment *s, uint32_t p) {
    unsigned char st = atomic_load_explicit(&s->state[p], memory_order_acquire);
    return st != PART_ABSENT && st != PART_ATTACHING;
}

/* The view of partition p from its directory entry. */
static void part_view(const bs_segment *s, uint32_t p, bs_partition_view *v) {
    const seg_part *sp = &s->parts[p];
    const uint32_t D = s->info.padded_dim, B = s->info.num_bits;
    bs_part_layout L;
    bs_part_layout_compute(sp->count, D, B, &L); /* checked at open */
    v->count = sp->count;
    v->padded_dim = D;
    v->stride = (size_t)L.stride;
    v->blocks = sp->base;
    /* Every offset is a multiple of 64 from a 64-aligned buffer, so these
     * casts give aligned arrays. */
    v->ordinals = (const uint32_t *)(const void *)(sp->base + L.ordinals);
    if (B > 1) {
        v->ext = sp->base + L.ext;
        v->s_full = (const float *)(const void *)(sp->base + L.s_full);
    } else {
        v->ext = NULL;
        v->s_full = NULL;
    }
}

static int bits_zero(const float *f, size_t n) {
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &f[i], 4);
        acc |= b;
    }
    return acc == 0;
}

/* Per-vector values that a valid writer cannot have produced would turn
 * into wrong distances, so they are refused like a bad checksum. */
static bs_status check_partition_values(const bs_segment *s, uint32_t p,
                                        const bs_partition_view *v,
                                        bs_error *err) {
    uint64_t total = s->prefix[s->info.num_fragments];
    for (uint32_t i = 0; i < v->count; i++) {
        if (v->ordinals[i] >= total)
            return CORRUPT("partition %u row %u: ordinal %u is past the %llu "
                           "rows of the segment's fragments",
                           p, i, v->ordinals[i], (ull)total);
        if (i > 0 && v->ordinals[i] <= v->ordinals[i - 1])
            return CORRUPT("partition %u row %u: ordinals are not strictly "
                           "increasing",
                           p, i);
        float n2 = bs_pv_norm2(v, i);
        if (!isfinite(n2) || !(n2 >= 0) || !isfinite(bs_pv_s1(v, i)) ||
            !isfinite(bs_pv_corr(v, i)) || !isfinite(bs_pv_s_full(v, i)))
            return CORRUPT("partition %u row %u: invalid factors", p, i);
    }
    /* The factor slots past count in the last block are zero, like the
     * codes: a kernel computes bounds for them along with the real rows. */
    uint32_t used = v->count % 32;
    if (used != 0) {
        size_t last = v->count / 32;
        if (!bits_zero(bs_pv_norm2_block(v, last) + used, 32 - used) ||
            !bits_zero(bs_pv_s1_block(v, last) + used, 32 - used) ||
            !bits_zero(bs_pv_corr_block(v, last) + used, 32 - used))
            return CORRUPT("partition %u: factor slots past row %u are not "
                           "zero",
                           p, v->count);
    }
    return BS_OK;
}

/* The slots past count in the last FastScan block hold all-zero codes: a
 * kernel scans them along with the real rows, so they must be the same in
 * every file. */
static bs_status check_block_padding(const bs_segment *s, uint32_t p,
                                     uint32_t count, const uint8_t *last,
                                     bs_error *err) {
    if (count % 32 == 0) return BS_OK;
    const uint32_t D = s->info.padded_dim;
    const uint32_t used = count % 32;
    for (uint32_t g = 0; g < D / 4; g++) {
        for (uint32_t j = 0; j < 16; j++) {
            uint8_t byte = last[(size_t)g * 16 + j];
            /* Low nibble: slot j; high nibble: slot j + 16. */
            uint8_t mask = (uint8_t)((j >= used ? 0x0F : 0) |
                                     (j + 16 >= used ? 0xF0 : 0));
            if (byte & mask)
                return CORRUPT("partition %u: FastScan padding past row %u "
                               "is not zero",
                               p, count);
        }
    }
    return BS_OK;
}

/* Ordinals of partition p, whatever the layout of s. */
static const uint32_t *ordinals_of(const bs_segment *s, uint32_t p,
                                   uint32_t *count) {
    if (s->v2 != NULL) {
        *count = s->v2[p].count;
        return s->v2[p].ordinals;
    }
    bs_partition_view v;
    part_view(s, p, &v);
    *count = v.count;
    return v.ordinals;
}

/* Every ordinal in at most one partition: a bitmap when the fragments are
 * densely indexed, else a sorted copy, so memory stays within the size of
 * the ordinals themselves whatever the fragment table claims. Needs every
 * partition checked (ordinals in range). */
static bs_status check_unique_ordinals(const bs_segment *s, bs_error *err) {
    uint64_t total = s->prefix[s->info.num_fragments];
    uint64_t n = s->info.num_rows;
    if (n < 2) return BS_OK;
    uint64_t bitmap_bytes = total / 8 + 1;
    uint64_t done = 0; /* bs_segment_release_through */
    if (bitmap_bytes <= n * 4 + 4096) {
        uint8_t *seen = bs_zalloc((size_t)bitmap_bytes, 1);
        if (seen == NULL) return NOMEM();
        for (uint32_t p = 0; p < s->info.num_partitions; p++) {
            uint32_t cnt;
            const uint32_t *ord = ordinals_of(s, p, &cnt);
            for (uint32_t i = 0; i < cnt; i++) {
                uint32_t o = ord[i];
                if (seen[o >> 3] & (1u << (o & 7))) {
                    free(seen);
                    return CORRUPT("ordinal %u appears in more than one "
                                   "partition (again in partition %u)",
                                   o, p);
                }
                seen[o >> 3] |= (uint8_t)(1u << (o & 7));
            }
            bs_segment_release_through(s, p, &done);
        }
        free(seen);
        return BS_OK;
    }
    uint32_t *all = bs_alloc((size_t)n, sizeof(uint32_t));
    if (all == NULL) return NOMEM();
    size_t k = 0;
    for (uint32_t p = 0; p < s->info.num_partitions; p++) {
        uint32_t cnt;
        const uint32_t *ord = ordinals_of(s, p, &cnt);
        memcpy(all + k, ord, (size_t)cnt * sizeof(uint32_t));
        k += cnt;
        bs_segment_release_through(s, p, &done);
    }
    qsort(all, (size_t)n, sizeof(uint32_t), cmp_u32);
    for (size_t i = 1; i < (size_t)n; i++) {
        if (all[i] == all[i - 1]) {
            uint32_t o = all[i];
            free(all);
            return CORRUPT("ordinal %u appears in more than one partition", o);
        }
    }
    free(all);
    return BS_OK;
}

/* After the last partition: the row count, and the end of the file (only a
 * newer writer may leave bytes after the last partition, an extension an
 * older reader ignores). */
static bs_status check_partitions_end(const bs_segment *s, uint64_t rows,
                                      uint64_t pos, bs_error *err) {
    const bs_segment_info *info = &s->info;
    if (rows != info->num_rows)
        return CORRUPT("partitions hold %llu rows, the header says %llu",
                       (ull)rows, (ull)info->num_rows);
    if (pos != s->len && (info->format_version <= BS_SEG_VERSION ||
                          pos > s->len))
        return CORRUPT("partitions end at offset %llu, the file at %zu",
                       (ull)pos, s->len);
    return BS_OK;
}

/* The partition directory of entry_size-byte entries (the entry size is
 * what differs between versions 2 and 3): it starts where the fragment
 * table ends and holds one entry per partition, padded to 64 bytes;
 * check_section holds the header's directory field to that and verifies
 * the section's checksum. */
static bs_status locate_directory(const bs_segment *s, uint64_t entry_size,
                                  uint64_t *dir_off, uint64_t *dir_size,
                                  bs_error *err) {
    const uint8_t *h = s->data;
    *dir_off = bs_load_u64(h + BS_HDR_FRAGMENTS) + bs_load_u64(h + BS_HDR_FRAGMENTS + 8);
    bs_align64_ok((uint64_t)s->info.num_partitions * entry_size, dir_size);
    return check_section(s, BS_HDR_DIRECTORY, *dir_off, *dir_size, "partition directory", err);
}

/* One directory entry's fields that versions 2 and 3 share. */
typedef struct {
    uint64_t off, size;
    uint32_t count;
} dir_entry;

/* The checks at the start of every directory entry, in either version:
 * the reserved fields are zero (a version 3 entry has 16 more reserved
 * bytes), the partition starts at pos, where the previous one ended, and
 * the rows so far stay within the header's num_rows. */
static bs_status read_directory_entry(const bs_segment *s, const uint8_t *e,
                                      uint64_t entry_size, uint32_t p,
                                      uint64_t pos, uint64_t *rows,
                                      dir_entry *out, bs_error *err) {
    out->off = bs_load_u64(e + BS_DIR_OFFSET);
    out->size = bs_load_u64(e + BS_DIR_SIZE);
    out->count = bs_load_u32(e + BS_DIR_COUNT);
    uint32_t reserved = bs_load_u32(e + BS_DIR_RESERVED);
    if (reserved != 0)
        return CORRUPT("partition %u: reserved directory field is %u, "
                       "not 0",
                       p, reserved);
    if (entry_size == BS_SEG_DIR_ENTRY)
        for (unsigned i = 0; i < 16; i++)
            if (e[BS_DIR_RESERVED2 + i] != 0)
                return CORRUPT("partition %u: reserved directory byte %u is "
                               "not 0",
                               p, BS_DIR_RESERVED2 + i);
    if (out->off != pos)
        return CORRUPT("partition %u at offset %llu, expected %llu", p,
                       (ull)out->off, (ull)pos);
    *rows += out->count;
    if (*rows > s->info.num_rows)
        return CORRUPT("partition %u: partitions hold more rows than "
                       "the header's %llu",
                       p, (ull)s->info.num_rows);
    return BS_OK;
}

/* The directory's structure (version 3): entries contiguous, each of the
 * size its count gives, inside the file, counts summing to num_rows. The
 * partitions' bytes are not read. */
static bs_status parse_directory(bs_segment *s, bs_error *err) {
    const uint8_t *h = s->data;
    const bs_segment_info *info = &s->info;
    uint32_t k = info->num_partitions;
    uint32_t D = info->padded_dim, B = info->num_bits;
    uint64_t dir_off, dir_size;
    BS_TRY(locate_directory(s, BS_SEG_DIR_ENTRY, &dir_off, &dir_size, err));

    s->parts = bs_zalloc(k, sizeof *s->parts);
    s->state = bs_zalloc(k, sizeof *s->state);
    if (s->parts == NULL || s->state == NULL) return NOMEM();
    for (uint32_t p = 0; p < k; p++)
        atomic_init(&s->state[p], s->from_prefix ? PART_ABSENT : PART_UNCHECKED);
    uint64_t pos = dir_off + dir_size;
    uint64_t rows = 0;
    for (uint32_t p = 0; p < k; p++) {
        const uint8_t *e = h + dir_off + (size_t)p * BS_SEG_DIR_ENTRY;
        dir_entry de;
        BS_TRY(read_directory_entry(s, e, BS_SEG_DIR_ENTRY, p, pos, &rows, &de, err));
        uint64_t off = de.off, size = de.size;
        uint32_t count = de.count;
        uint64_t stage1 = bs_load_u64(e + BS_DIR_STAGE1_SIZE);
        bs_part_layout L;
        if (!bs_part_layout_compute(count, D, B, &L) || L.size != size)
            return CORRUPT("partition %u is %llu bytes, %u rows need %llu", p,
                           (ull)size, count, (ull)L.size);
        if (stage1 != L.stage1_size)
            return CORRUPT("partition %u: stage-1 region is %llu bytes, %u "
                           "rows need %llu",
                           p, (ull)stage1, count, (ull)L.stage1_size);
        char what[48];
        snprintf(what, sizeof what, "partition %u", p);
        BS_TRY(need(s, off, size, what, err));
        seg_part *sp = &s->parts[p];
        sp->base = s->from_prefix ? NULL : h + off;
        sp->offset = off;
        sp->size = size;
        sp->stage1_size = stage1;
        sp->stage1_sum = bs_load_u64(e + BS_DIR_STAGE1_CHECKSUM);
        sp->extra_sum = bs_load_u64(e + BS_DIR_EXTRA_CHECKSUM);
        sp->count = count;
        pos = off + size;
    }
    return check_partitions_end(s, rows, pos, err);
}

/* Both region checksums and the per-partition rules. */
static bs_status check_partition_bytes(const bs_segment *s, uint32_t p,
                                       bs_error *err) {
    const seg_part *sp = &s->parts[p];
    uint64_t got = bs_hash64(sp->base, (size_t)sp->stage1_size, BS_SEG_CHECKSUM_SEED);
    if (got != sp->stage1_sum)
        return CORRUPT("partition %u checksum mismatch (stage-1 region: "
                       "stored %016llx, computed %016llx)",
                       p, (ull)sp->stage1_sum, (ull)got);
    got = bs_hash64(sp->base + sp->stage1_size, (size_t)(sp->size - sp->stage1_size),
                    BS_SEG_CHECKSUM_SEED);
    if (got != sp->extra_sum)
        return CORRUPT("partition %u checksum mismatch (extra region: "
                       "stored %016llx, computed %016llx)",
                       p, (ull)sp->extra_sum, (ull)got);
    bs_partition_view v;
    part_view(s, p, &v);
    BS_TRY(check_partition_values(s, p, &v, err));
    if (v.count % 32 != 0)
        BS_TRY(check_block_padding(s, p, v.count, bs_pv_block(&v, v.count / 32), err));
    return BS_OK;
}

/* p names a partition of seg: checked by every call that takes one. */
static bs_status check_partition_index(const bs_segment *seg, uint32_t p, bs_error *err) {
    if (p >= seg->info.num_partitions)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "partition %u is out of range: the segment has %u", p,
                       seg->info.num_partitions);
    return BS_OK;
}

bs_status bs_segment_check_partition(const bs_segment *seg, uint32_t p,
                                     bs_error *err) {
    BS_TRY(check_partition_index(seg, p, err));
    unsigned char st = atomic_load_explicit(&seg->state[p], memory_order_acquire);
    if (st == PART_GOOD) return BS_OK;
    if (st == PART_ABSENT || st == PART_ATTACHING)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "partition %u is not attached (the segment was opened "
                       "from its prefix: attach the partition's bytes before "
                       "a search probes it)",
                       p);
    /* Unchecked, or known bad: (re)check, which also writes the message.
     * The check reads the whole partition: on a file mapping, ask for it
     * in one read first, since a search mapping is advised MADV_RANDOM and
     * would otherwise fault it in a page at a time (a cold 3 MB partition:
     * ~800 synchronous reads). */
    if (seg->mapped && seg->owned == NULL)
        bs_pages_prefetch(seg->data, seg->parts[p].offset,
                          seg->parts[p].offset + seg->parts[p].size);
    bs_status r = check_partition_bytes(seg, p, err);
    if (r == BS_OK)
        atomic_store_explicit(&seg->state[p], PART_GOOD, memory_order_release);
    else if (r == BS_ERR_CORRUPT)
        atomic_store_explicit(&seg->state[p], PART_CORRUPT, memory_order_release);
    return r;
}

bs_status bs_segment_verify(const bs_segment *seg, bs_error *err) {
    bs_error_clear(err);
    if (seg == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment is NULL");
    uint64_t done = 0;
    for (uint32_t p = 0; p < seg->info.num_partitions; p++) {
        BS_TRY(bs_segment_check_partition(seg, p, err));
        bs_segment_release_through(seg, p, &done);
    }
    if (seg->unique_checked) return BS_OK;
    return check_unique_ordinals(seg, err);
}

bs_status bs_segment_set_mapped(bs_segment *seg, bs_error *err) {
    bs_error_clear(err);
    if (seg == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment is NULL");
    if (seg->from_prefix)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "a prefix open holds no mapping of the file: its "
                       "partitions are the caller's attached buffers");
    /* A version 2 file is read through once at open and converted into
     * memory of the library's own: nothing of the mapping is read later. */
    if (seg->owned != NULL) return BS_OK;
    if ((uintptr_t)seg->data % bs_page_size() != 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "the segment's buffer at %p does not start on a page "
                       "boundary (%zu bytes): not a file mapping",
                       (const void *)seg->data, bs_page_size());
    seg->mapped = 1;
    return BS_OK;
}

void bs_segment_release_through(const bs_segment *seg, uint32_t p, uint64_t *done) {
    /* A version 2 file's bytes are the library's converted copy (owned),
     * never a mapping. */
    if (!seg->mapped || seg->owned != NULL || p >= seg->info.num_partitions) return;
    const seg_part *sp = &seg->parts[p];
    uint64_t end = sp->offset + sp->size;
    if (end < *done + BS_RELEASE_WINDOW && p + 1 < seg->info.num_partitions) return;
    bs_pages_release(seg->data, *done, end);
    *done = end;
}

/* ------------------------------------------------------------ version 2 */

/* A version 2 file's partitions, validated whole as a version 2 reader
 * did: every checksum and value, and no ordinal in two partitions. */
static bs_status parse_partitions_v2(bs_segment *s, bs_error *err) {
    const uint8_t *h = s->data;
    const bs_segment_info *info = &s->info;
    uint32_t k = info->num_partitions;
    uint32_t D = info->padded_dim, B = info->num_bits;
    uint64_t dir_off, dir_size;
    BS_TRY(locate_directory(s, BS_SEG_V2_DIR_ENTRY, &dir_off, &dir_size, err));

    s->v2 = bs_zalloc(k, sizeof *s->v2);
    if (s->v2 == NULL) return NOMEM();
    uint64_t pos = dir_off + dir_size;
    uint64_t rows = 0;
    uint64_t total = s->prefix[info->num_fragments];
    for (uint32_t p = 0; p < k; p++) {
        const uint8_t *e = h + dir_off + (size_t)p * BS_SEG_V2_DIR_ENTRY;
        dir_entry de;
        BS_TRY(read_directory_entry(s, e, BS_SEG_V2_DIR_ENTRY, p, pos, &rows, &de, err));
        uint64_t off = de.off, size = de.size;
        uint32_t count = de.count;
        bs_part_layout_v2 L;
        if (!bs_part_layout_v2_compute(count, D, B, &L) || L.size != size)
            return CORRUPT("partition %u is %llu bytes, %u rows need %llu", p,
                           (ull)size, count, (ull)L.size);
        char what[48];
        snprintf(what, sizeof what, "partition %u", p);
        BS_TRY(need_read(s, off, size, what, err));
        BS_TRY(verify_checksum(s, off, size, bs_load_u64(e + BS_DIR2_CHECKSUM),
                               what, err));
        const uint8_t *base = h + off;
        v2_view *v = &s->v2[p];
        v->count = count;
        v->blocks = base + L.blocks;
        v->norm2 = (const float *)(const void *)(base + L.norm2);
        v->s1 = (const float *)(const void *)(base + L.s1);
        v->ordinals = (const uint32_t *)(const void *)(base + L.ordinals);
        v->ext = B > 1 ? base + L.ext : NULL;
        v->s_full = B > 1 ? (const float *)(const void *)(base + L.s_full) : v->s1;
        for (uint32_t i = 0; i < count; i++) {
            if (v->ordinals[i] >= total)
                return CORRUPT("partition %u row %u: ordinal %u is past the "
                               "%llu rows of the segment's fragments",
                               p, i, v->ordinals[i], (ull)total);
            if (i > 0 && v->ordinals[i] <= v->ordinals[i - 1])
                return CORRUPT("partition %u row %u: ordinals are not "
                               "strictly increasing",
                               p, i);
            if (!isfinite(v->norm2[i]) || !(v->norm2[i] >= 0) ||
                !isfinite(v->s1[i]) || !isfinite(v->s_full[i]))
                return CORRUPT("partition %u row %u: invalid factors", p, i);
        }
        if (count % 32 != 0)
            BS_TRY(check_block_padding(
                s, p, count, v->blocks + (size_t)(count / 32) * bs_fastscan_block_bytes(D),
                err));
        pos = off + size;
    }
    BS_TRY(check_partitions_end(s, rows, pos, err));
    return check_unique_ordinals(s, err);
}

static bs_status open_parsed(const void *data, size_t len, size_t avail,
                             int from_prefix, const float *given,
                             size_t given_floats, bs_segment **out,
                             bs_error *err);

/* The version 3 bytes of a validated version 2 segment, in a 64-byte
 * aligned buffer: the same header fields, artifacts and fragments (with
 * no identity), each partition's rows laid out anew with corr computed
 * from the stored 1-bit codes. Byte for byte the file a version 3 builder
 * writes for the same rows (docs/format.md, "Versions"). */
static bs_status convert_v2(const bs_segment *s, uint8_t **out, uint64_t *out_len,
                            bs_error *err) {
    const bs_segment_info *info = &s->info;
    const uint32_t k = info->num_partitions, D = info->padded_dim, B = info->num_bits;
    const size_t cb = bs_code_bytes(D);
    uint64_t cap = bs_load_u32(s->data + BS_HDR_HEADER_SIZE), sz = 0;
    uint32_t max_count = 0;
    bs_align64_ok((uint64_t)k * info->dim * 4, &sz);
    cap += sz;
    bs_align64_ok((uint64_t)info->num_fragments * BS_SEG_FRAGMENT_ENTRY, &sz);
    cap += sz;
    bs_align64_ok((uint64_t)k * BS_SEG_DIR_ENTRY, &sz);
    cap += sz;
    for (uint32_t p = 0; p < k; p++) {
        bs_part_layout L;
        if (!bs_part_layout_compute(s->v2[p].count, D, B, &L) ||
            __builtin_add_overflow(cap, L.size, &cap))
            return NOMEM();
        if (s->v2[p].count > max_count) max_count = s->v2[p].count;
    }
    bs_part_layout Lmax;
    if (!bs_part_layout_compute(max_count, D, B, &Lmax) || Lmax.size > SIZE_MAX)
        return NOMEM();

    bs_rotation *rot = NULL;
    BS_TRY(bs_rotation_create(info->rotation_kind, info->dim, info->rotation_seed, &rot, err));
    float *pc = bs_alloc2(k, D, sizeof(float));
    float *pm = bs_alloc(D, sizeof(float));
    float *dir = bs_alloc(D, sizeof(float));
    float *corr = bs_alloc((size_t)max_count + 1, sizeof(float));
    uint8_t *codes = bs_alloc2((size_t)max_count + 1, cb, 1);
    uint8_t *buf = bs_alloc((size_t)Lmax.size, 1);
    bs_status st = BS_OK;
    if (!pc || !pm || !dir || !corr || !codes || !buf) st = NOMEM();
    if (st == BS_OK)
        st = bs_rotation_apply(rot, s->centroids, k, info->dim, pc, err);
    if (st == BS_OK)
        st = bs_centroid_mean_rotated(rot, s->centroids, k, info->dim, pm, err);
    bs_seg_writer w;
    memset(&w, 0, sizeof w);
    if (st == BS_OK) {
        /* The same code space, uuid and fragment table; no identities
         * (version 2 recorded none). */
        bs_seg_params prm;
        bs_repack_params(s, info->uuid, s->frag_ids, s->frag_rows, info->num_fragments, &prm);
        st = bs_seg_writer_open_memory(&w, cap, &prm, err);
    }
    for (uint32_t p = 0; p < k && st == BS_OK; p++) {
        const v2_view *v = &s->v2[p];
        bs_corr_direction(info->metric, pm, pc + (size_t)p * D, D, dir);
        for (uint32_t i = 0; i < v->count; i++) {
            bs_fastscan_unpack_one(v->blocks, i, D, codes + (size_t)i * cb);
            corr[i] = bs_corr_from_code(codes + (size_t)i * cb, dir, D);
        }
        bs_part_layout L;
        bs_part_layout_compute(v->count, D, B, &L);
        bs_part_rows rows = {codes, v->norm2, v->s1, corr, v->ordinals, v->ext,
                             B > 1 ? v->s_full : NULL};
        bs_part_fill(buf, &L, v->count, D, B, &rows);
        st = bs_seg_writer_partition(&w, v->count, buf, &L, err);
    }
    if (st == BS_OK)
        st = bs_seg_writer_finish_memory(&w, out, out_len, err);
    else
        bs_seg_writer_abort(&w);
    bs_rotation_free(rot);
    free(pc);
    free(pm);
    free(dir);
    free(corr);
    free(codes);
    free(buf);
    return st;
}

/* The arguments every open checks first: the error cleared, *out NULL
 * until an open succeeds, the bytes given and 64-byte aligned. */
static bs_status check_open_args(const void *data, bs_segment **out, bs_error *err) {
    bs_error_clear(err);
    if (out == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (data == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "data is NULL");
    if ((uintptr_t)data % BS_SEG_ALIGN != 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "segment buffer must be 64-byte aligned");
    return BS_OK;
}

bs_status bs_segment_open(const void *data, size_t len, bs_segment **out,
                          bs_error *err) {
    return bs_segment_open_with_centroids(data, len, NULL, 0, out, err);
}

bs_status bs_segment_open_with_centroids(const void *data, size_t len,
                                         const float *centroids,
                                         size_t num_floats, bs_segment **out,
                                         bs_error *err) {
    BS_TRY(check_open_args(data, out, err));
    return open_parsed(data, len, len, 0, centroids, num_floats, out, err);
}

/* ------------------------------------------------- opening from a prefix */

bs_status bs_segment_prefix_size(const void *data, size_t len, uint64_t *out,
                                 bs_error *err) {
    bs_error_clear(err);
    if (out == NULL || (data == NULL && len > 0))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "out or data is NULL");
    const uint8_t *h = data;
    const uint64_t min_header = bs_seg_header_size(1);
    if (len < min_header) {
        *out = min_header;
        return BS_OK;
    }
    if (memcmp(h, BS_SEG_MAGIC, BS_SEG_MAGIC_LEN) != 0)
        return CORRUPT("bad magic at offset 0: not a bitshard segment");
    uint32_t read_version = bs_load_u32(h + BS_HDR_READ_VERSION);
    BS_TRY(check_read_version(read_version, err));
    uint32_t header_size = bs_load_u32(h + BS_HDR_HEADER_SIZE);
    BS_TRY(check_header_size(header_size, err));
    if (len < header_size) {
        *out = header_size;
        return BS_OK;
    }
    /* The offsets below are the writer's only once the header checksum
     * holds; bs_segment_open_prefix checks them all against the layout. */
    uint64_t sum = bs_hash64(h, header_size - 8u, BS_SEG_CHECKSUM_SEED);
    if (sum != bs_load_u64(h + header_size - 8))
        return CORRUPT("header checksum mismatch (stored %016llx, computed "
                       "%016llx)",
                       (ull)bs_load_u64(h + header_size - 8), (ull)sum);
    uint64_t file_size = bs_load_u64(h + BS_HDR_FILE_SIZE);
    uint64_t end;
    if (read_version <= BS_SEG_VERSION_2) {
        /* A format 2 file is validated and converted whole. */
        end = file_size;
    } else if (__builtin_add_overflow(bs_load_u64(h + BS_HDR_DIRECTORY),
                                      bs_load_u64(h + BS_HDR_DIRECTORY + 8), &end) ||
               end > file_size) {
        return CORRUPT("directory ends past the segment's %llu bytes",
                       (ull)file_size);
    }
    *out = end < header_size ? header_size : end;
    return BS_OK;
}

bs_status bs_segment_open_prefix(const void *data, size_t len, uint64_t file_size,
                                 bs_segment **out, bs_error *err) {
    return bs_segment_open_prefix_with_centroids(data, len, file_size, NULL, 0, out,
                                                 err);
}

bs_status bs_segment_open_prefix_with_centroids(const void *data, size_t len,
                                                uint64_t file_size,
                                                const float *centroids,
                                                size_t num_floats, bs_segment **out,
                                                bs_error *err) {
    BS_TRY(check_open_args(data, out, err));
    if (file_size > SIZE_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "file size %llu does not fit in memory addresses",
                       (ull)file_size);
    if (len > file_size)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "prefix of %zu bytes is longer than the file's %llu", len,
                       (ull)file_size);
    return open_parsed(data, (size_t)file_size, len, 1, centroids, num_floats, out,
                       err);
}

bs_status bs_segment_partition_range(const bs_segment *seg, uint32_t p,
                                     uint64_t *offset, uint64_t *size,
                                     bs_error *err) {
    bs_error_clear(err);
    if (seg == NULL || offset == NULL || size == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment or output is NULL");
    BS_TRY(check_partition_index(seg, p, err));
    *offset = seg->parts[p].offset;
    *size = seg->parts[p].size;
    return BS_OK;
}

int bs_segment_partition_attached(const bs_segment *seg, uint32_t p) {
    return seg != NULL && p < seg->info.num_partitions && partition_present(seg, p);
}

/* "segment <uuid hex>: " before a message about one of its partitions. */
static bs_status fail_in_segment(const bs_segment *seg, bs_status st, const char *msg,
                                 bs_error *err) {
    bs_fingerprint u;
    memcpy(u.bytes, seg->info.uuid, 16);
    char hex[33];
    bs_seg_fingerprint_hex(&u, hex);
    return bs_fail(err, st, "segment %s: %s", hex, msg);
}

bs_status bs_segment_attach(bs_segment *seg, uint32_t p, const void *data, size_t len,
                            bs_error *err) {
    bs_error_clear(err);
    if (seg == NULL || (data == NULL && len > 0))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment or data is NULL");
    if (!seg->from_prefix)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "the segment was opened whole: its partitions are in "
                       "its buffer, nothing to attach");
    BS_TRY(check_partition_index(seg, p, err));
    seg_part *sp = &seg->parts[p];
    if (len != sp->size)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "partition %u is %llu bytes, %zu given", p, (ull)sp->size, len);
    /* Aligned like the file's buffer, so the arrays in it are too (a zero
     * length partition has no bytes to read; any pointer will do). */
    static const uint8_t empty[BS_SEG_ALIGN] __attribute__((aligned(BS_SEG_ALIGN)));
    if (len == 0) data = empty;
    if ((uintptr_t)data % BS_SEG_ALIGN != 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "partition %u: bytes must be 64-byte aligned", p);
    unsigned char expect = PART_ABSENT;
    if (!atomic_compare_exchange_strong(&seg->state[p], &expect, PART_ATTACHING))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "partition %u is already attached (or being attached)", p);
    sp->base = data;
    bs_error sub;
    bs_error_clear(&sub);
    bs_status st = check_partition_bytes(seg, p, &sub);
    if (st != BS_OK) {
        sp->base = NULL;
        atomic_store_explicit(&seg->state[p], PART_ABSENT, memory_order_release);
        return fail_in_segment(seg, st, sub.message, err);
    }
    atomic_store_explicit(&seg->state[p], PART_GOOD, memory_order_release);
    return BS_OK;
}

bs_status bs_segment_detach(bs_segment *seg, uint32_t p, bs_error *err) {
    bs_error_clear(err);
    if (seg == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment is NULL");
    if (!seg->from_prefix)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "the segment was opened whole: nothing to detach");
    BS_TRY(check_partition_index(seg, p, err));
    unsigned char expect = PART_GOOD;
    if (!atomic_compare_exchange_strong(&seg->state[p], &expect, PART_ATTACHING))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "partition %u is not attached", p);
    seg->parts[p].base = NULL;
    atomic_store_explicit(&seg->state[p], PART_ABSENT, memory_order_release);
    return BS_OK;
}

static bs_status open_parsed(const void *data, size_t len, size_t avail,
                             int from_prefix, const float *given,
                             size_t given_floats, bs_segment **out,
                             bs_error *err) {
    bs_segment *s = bs_zalloc(1, sizeof *s);
    if (s == NULL) return NOMEM();
    s->data = data;
    s->len = len;
    s->avail = avail;
    s->from_prefix = from_prefix;
    s->given = given;
    s->given_floats = given_floats;
    bs_status st = parse_header(s, err);
    if (st == BS_OK) st = parse_artifacts(s, err);
    if (st == BS_OK) st = parse_fragments(s, err);
    if (st == BS_OK && s->layout == 3) st = parse_directory(s, err);
    /* A format 2 file is converted whole: with all its bytes given, a
     * prefix open is a whole open. */
    if (st == BS_OK && s->layout == 2 && avail < len)
        st = bs_fail(err, BS_ERR_CORRUPT,
                     "a format 2 segment cannot be opened from a prefix (%zu of "
                     "its %zu bytes): read it whole",
                     avail, len);
    if (st == BS_OK && s->layout == 2) {
        uint8_t *image = NULL;
        uint64_t image_len = 0;
        st = parse_partitions_v2(s, err);
        if (st == BS_OK) st = convert_v2(s, &image, &image_len, err);
        bs_segment *s3 = NULL;
        if (st == BS_OK) {
            st = open_parsed(image, (size_t)image_len, (size_t)image_len, 0, given,
                             given_floats, &s3, err);
            if (st != BS_OK) {
                free(image);
            } else {
                s3->owned = image;
                s3->info.format_version = s->info.format_version;
                s3->unique_checked = 1;
            }
        }
        bs_segment_free(s);
        s = s3;
    }
    if (st != BS_OK) {
        bs_segment_free(s);
        return st;
    }
    *out = s;
    return BS_OK;
}

void bs_segment_free(bs_segment *seg) {
    if (seg == NULL) return;
    free(seg->column);
    free(seg->frag_ids);
    free(seg->frag_rows);
    free(seg->frag_identity);
    free(seg->prefix);
    free(seg->parts);
    free((void *)seg->state);
    free(seg->v2);
    free(seg->owned);
    free(seg);
}

void bs_segment_get_info(const bs_segment *seg, bs_segment_info *out) {
    *out = seg->info;
}

const float *bs_segment_centroids(const bs_segment *seg) {
    return seg->centroids;
}

void bs_segment_fragment(const bs_segment *seg, uint32_t i, uint64_t *id,
                         uint64_t *rows) {
    int ok = i < seg->info.num_fragments;
    if (id) *id = ok ? seg->frag_ids[i] : 0;
    if (rows) *rows = ok ? seg->frag_rows[i] : 0;
}

void bs_segment_fragment_identity(const bs_segment *seg, uint32_t i,
                                  uint8_t out[16]) {
    if (i < seg->info.num_fragments)
        memcpy(out, seg->frag_identity + (size_t)i * 16, 16);
    else
        memset(out, 0, 16);
}

void bs_segment_partition(const bs_segment *seg, uint32_t p,
                          bs_partition_view *out) {
    if (p >= seg->info.num_partitions || !partition_present(seg, p)) {
        memset(out, 0, sizeof *out);
        return;
    }
    part_view(seg, p, out);
}

uint64_t bs_segment_rowid(const bs_segment *seg, uint32_t ordinal) {
    uint32_t nf = seg->info.num_fragments;
    if (ordinal >= seg->prefix[nf]) return UINT64_MAX;
    /* The last fragment whose first ordinal is <= ordinal; empty fragments
     * share their successor's first ordinal and are skipped by taking the
     * last match. */
    uint32_t lo = 0, hi = nf; /* prefix[lo] <= ordinal < prefix[hi] */
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (seg->prefix[mid] <= ordinal)
            lo = mid;
        else
            hi = mid;
    }
    return (seg->frag_ids[lo] << 32) | (ordinal - seg->prefix[lo]);
}

double bs_segment_residual_sum(const bs_segment *seg) {
    if (seg == NULL) return 0.0;
    double sum = 0.0;
    /* Reads every partition's norm2 (within bounds whether or not the
     * partition was checked; a caller that needs checked values verifies
     * first, bs_segment_verify). */
    for (uint32_t p = 0; p < seg->info.num_partitions; p++) {
        if (!partition_present(seg, p)) return NAN;
        bs_partition_view v;
        part_view(seg, p, &v);
        for (uint32_t j = 0; j < v.count; j++) sum += sqrt((double)bs_pv_norm2(&v, j));
    }
    return sum;
}

bs_status bs_segment_check_compatible(const bs_segment *a,
                                      const bs_segment *b, bs_error *err) {
    bs_error_clear(err);
    if (a == NULL || b == NULL)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "segment is NULL");
    const bs_segment_info *x = &a->info, *y = &b->info;
    const bs_status mm = BS_ERR_ARTIFACT_MISMATCH;
    if (x->dim != y->dim)
        return bs_fail(err, mm, "dimension differs: %u vs %u", x->dim, y->dim);
    if (strcmp(x->column, y->column) != 0)
        return bs_fail(err, mm, "column differs: \"%s\" vs \"%s\"", x->column,
                       y->column);
    if (x->metric != y->metric)
        return bs_fail(err, mm, "metric differs: %s vs %s",
                       bs_seg_metric_name(x->metric),
                       bs_seg_metric_name(y->metric));
    if (x->num_bits != y->num_bits)
        return bs_fail(err, mm, "num_bits differs: %u vs %u", x->num_bits,
                       y->num_bits);
    char ha[33], hb[33];
    if (memcmp(&x->rotation_fingerprint, &y->rotation_fingerprint, 16) != 0) {
        bs_seg_fingerprint_hex(&x->rotation_fingerprint, ha);
        bs_seg_fingerprint_hex(&y->rotation_fingerprint, hb);
        return bs_fail(err, mm, "rotation differs: %s vs %s", ha, hb);
    }
    /* The IVF fingerprint covers k, so a different partition count shows
     * up here as different centroids. */
    if (x->num_partitions != y->num_partitions ||
        memcmp(&x->ivf_fingerprint, &y->ivf_fingerprint, 16) != 0) {
        bs_seg_fingerprint_hex(&x->ivf_fingerprint, ha);
        bs_seg_fingerprint_hex(&y->ivf_fingerprint, hb);
        return bs_fail(err, mm, "centroids differs: %s vs %s", ha, hb);
    }
    return BS_OK;
}
