/* Segment layout arithmetic and the sequential segment writer shared by the
 * builder and merge. The format itself is specified in docs/format.md. */
#define _POSIX_C_SOURCE 200809L

#include "format.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "rabitq.h"

/* ------------------------------------------------------------- layout */

/* Appends an array of n elements of `elem` bytes at the next 64-byte
 * boundary after *pos. */
static int place_array(uint64_t *pos, uint64_t n, uint64_t elem,
                       uint64_t *offset) {
    uint64_t start, bytes;
    if (!bs_align64_ok(*pos, &start)) return 0;
    if (__builtin_mul_overflow(n, elem, &bytes)) return 0;
    if (__builtin_add_overflow(start, bytes, pos)) return 0;
    *offset = start;
    return 1;
}

int bs_part_layout_compute(uint64_t count, uint32_t D, uint32_t B,
                           bs_part_layout *out) {
    memset(out, 0, sizeof *out);
    uint64_t pos = 0;
    out->nblocks = count / 32 + (count % 32 != 0);
    out->stride = bs_fastscan_block_bytes(D) + BS_SEG_BLOCK_FACTORS;
    uint64_t blocks;
    if (!place_array(&pos, out->nblocks, out->stride, &blocks)) return 0;
    if (!place_array(&pos, count, 4, &out->ordinals)) return 0;
    if (!bs_align64_ok(pos, &out->stage1_size)) return 0;
    pos = out->stage1_size;
    if (B > 1) {
        if (!place_array(&pos, count, bs_ext_bytes(D, B), &out->ext)) return 0;
        if (!place_array(&pos, count, 4, &out->s_full)) return 0;
    }
    return bs_align64_ok(pos, &out->size);
}

int bs_part_layout_v2_compute(uint64_t count, uint32_t D, uint32_t B,
                              bs_part_layout_v2 *out) {
    memset(out, 0, sizeof *out);
    uint64_t pos = 0;
    uint64_t nblocks = count / 32 + (count % 32 != 0);
    if (!place_array(&pos, nblocks, bs_fastscan_block_bytes(D), &out->blocks))
        return 0;
    if (!place_array(&pos, count, 4, &out->norm2)) return 0;
    if (!place_array(&pos, count, 4, &out->s1)) return 0;
    if (!place_array(&pos, count, 4, &out->ordinals)) return 0;
    if (B > 1) {
        if (!place_array(&pos, count, bs_ext_bytes(D, B), &out->ext)) return 0;
        if (!place_array(&pos, count, 4, &out->s_full)) return 0;
    }
    return bs_align64_ok(pos, &out->size);
}

void bs_part_fill(uint8_t *buf, const bs_part_layout *L, uint32_t count,
                  uint32_t D, uint32_t B, const bs_part_rows *r) {
    memset(buf, 0, (size_t)L->size);
    const size_t cb = bs_code_bytes(D), code_block = bs_fastscan_block_bytes(D);
    for (uint64_t j = 0; j < L->nblocks; j++) {
        uint8_t *blk = buf + j * L->stride;
        size_t first = (size_t)j * 32;
        size_t n = count - first < 32 ? count - first : 32;
        bs_fastscan_pack(r->codes + first * cb, n, D, blk);
        memcpy(blk + code_block, r->norm2 + first, n * 4);
        memcpy(blk + code_block + 128, r->s1 + first, n * 4);
        memcpy(blk + code_block + 256, r->corr + first, n * 4);
    }
    memcpy(buf + L->ordinals, r->ordinals, (size_t)count * 4);
    if (B > 1) {
        memcpy(buf + L->ext, r->ext, (size_t)count * bs_ext_bytes(D, B));
        memcpy(buf + L->s_full, r->s_full, (size_t)count * 4);
    }
}

float bs_corr_from_code(const uint8_t *code, const float *dir, uint32_t D) {
    double acc = 0.0;
    for (uint32_t i = 0; i < D; i++) {
        double y = ((code[i >> 3] >> (i & 7)) & 1) ? 0.5 : -0.5;
        acc += y * (double)dir[i];
    }
    return (float)acc;
}

void bs_corr_direction(bs_metric metric, const float *pm, const float *pc,
                       uint32_t D, float *dir) {
    if (metric == BS_METRIC_L2) {
        for (uint32_t i = 0; i < D; i++) dir[i] = pm[i] - pc[i];
    } else {
        memcpy(dir, pm, (size_t)D * sizeof(float));
    }
}

bs_status bs_centroid_mean_rotated(const bs_rotation *rot,
                                   const float *centroids, uint32_t k,
                                   uint32_t dim, float *out, bs_error *err) {
    float *m = bs_alloc(dim, sizeof(float));
    if (m == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    for (uint32_t j = 0; j < dim; j++) {
        double acc = 0.0;
        for (uint32_t p = 0; p < k; p++)
            acc += (double)centroids[(size_t)p * dim + j];
        m[j] = (float)(acc / (double)k);
    }
    bs_status st = bs_rotation_apply(rot, m, 1, dim, out, err);
    free(m);
    return st;
}

/* ------------------------------------------------------------ helpers */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

bs_status bs_seg_check_fragment_table(const uint64_t *ids, const uint64_t *rows,
                                      uint32_t n, bs_error *err) {
    if (n > 0 && (ids == NULL || rows == NULL))
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "fragment_ids or fragment_rows is NULL with "
                       "num_fragments = %u",
                       n);
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] > BS_SEG_MAX_FRAGMENT_ID)
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                           "fragment id %llu does not fit in 32 bits (row "
                           "ids are id << 32 | offset)",
                           (unsigned long long)ids[i]);
        if (rows[i] > BS_SEG_MAX_ROWS - total)
            return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                           "the fragments hold more than 2^32 - 1 rows "
                           "(at fragment %llu); split them across segments",
                           (unsigned long long)ids[i]);
        total += rows[i];
    }
    if (n < 2) return BS_OK;
    uint64_t *sorted = bs_alloc(n, sizeof *sorted);
    if (sorted == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    memcpy(sorted, ids, (size_t)n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_u64);
    bs_status st = BS_OK;
    for (uint32_t i = 1; i < n; i++) {
        if (sorted[i] == sorted[i - 1]) {
            st = bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                         "fragment id %llu appears more than once in "
                         "fragment_ids",
                         (unsigned long long)sorted[i]);
            break;
        }
    }
    free(sorted);
    return st;
}

int bs_seg_utf8_valid(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c == 0) return 0;
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (n > len - i - 1) return 0;
        for (size_t j = 1; j <= n; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        /* Overlong forms, surrogates and values past U+10FFFF. */
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return 0;
        i += n + 1;
    }
    return 1;
}

const char *bs_seg_metric_name(bs_metric m) {
    switch (m) {
    case BS_METRIC_L2: return "l2";
    case BS_METRIC_COSINE: return "cosine";
    case BS_METRIC_DOT: return "dot";
    }
    return "?";
}

void bs_seg_fingerprint_hex(const bs_fingerprint *fp, char out[33]) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[fp->bytes[i] >> 4];
        out[2 * i + 1] = hex[fp->bytes[i] & 15];
    }
    out[32] = '\0';
}

/* ------------------------------------------------------------- writer */

static bs_status io_fail(bs_error *err, const char *what, const char *path,
                         int errnum) {
    char buf[128];
    if (strerror_r(errnum, buf, sizeof buf) != 0)
        snprintf(buf, sizeof buf, "error %d", errnum);
    return bs_fail(err, BS_ERR_IO, "%s %s: %s", what, path, buf);
}

static bs_status write_bytes(bs_seg_writer *w, const void *p, uint64_t n,
                             bs_error *err) {
    if (n == 0) return BS_OK;
    if (w->mem != NULL) {
        if (n > w->mem_cap - w->pos)
            return bs_fail(err, BS_ERR_INTERNAL,
                           "segment writer: %llu bytes past the %llu planned",
                           (unsigned long long)(w->pos + n - w->mem_cap),
                           (unsigned long long)w->mem_cap);
        memcpy(w->mem + w->pos, p, (size_t)n);
        w->pos += n;
        return BS_OK;
    }
    if (fwrite(p, 1, (size_t)n, w->f) != (size_t)n)
        return io_fail(err, "cannot write", w->tmp_path, errno ? errno : EIO);
    w->pos += n;
    return BS_OK;
}

/* Writes `raw` bytes of data padded with zeros to `size` and returns the
 * checksum of the padded section. */
static bs_status write_section(bs_seg_writer *w, const void *data,
                               uint64_t raw, uint64_t size, uint64_t *checksum,
                               bs_error *err) {
    if (raw == size) {
        *checksum = bs_hash64(data, (size_t)size, BS_SEG_CHECKSUM_SEED);
        return write_bytes(w, data, size, err);
    }
    uint8_t *buf = bs_zalloc((size_t)size, 1);
    if (buf == NULL)
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory (%llu bytes)",
                       (unsigned long long)size);
    if (raw) memcpy(buf, data, (size_t)raw);
    *checksum = bs_hash64(buf, (size_t)size, BS_SEG_CHECKSUM_SEED);
    bs_status st = write_bytes(w, buf, size, err);
    free(buf);
    return st;
}

static char *str_concat(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *s = bs_alloc(la + lb + 1, 1);
    if (s == NULL) return NULL;
    memcpy(s, a, la);
    memcpy(s + la, b, lb + 1);
    return s;
}

static bs_status writer_open(bs_seg_writer *w, const char *path,
                             const bs_seg_params *p, bs_error *err);

void bs_seg_writer_abort(bs_seg_writer *w) {
    if (w->f != NULL) {
        fclose(w->f);
        w->f = NULL;
        if (w->tmp_path) remove(w->tmp_path);
    }
    BS_FREE(w->path);
    BS_FREE(w->tmp_path);
    BS_FREE(w->header);
    BS_FREE(w->directory);
    BS_FREE(w->mem);
    memset(w, 0, sizeof *w);
}

bs_status bs_seg_writer_open(bs_seg_writer *w, const char *path,
                             const bs_seg_params *p, bs_error *err) {
    memset(w, 0, sizeof *w);
    return writer_open(w, path, p, err);
}

bs_status bs_seg_writer_open_memory(bs_seg_writer *w, uint64_t capacity,
                                    const bs_seg_params *p, bs_error *err) {
    memset(w, 0, sizeof *w);
    void *mem = NULL;
    if (capacity > SIZE_MAX ||
        posix_memalign(&mem, BS_SEG_ALIGN, capacity ? (size_t)capacity : 1) != 0)
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory (%llu bytes)",
                       (unsigned long long)capacity);
    w->mem = mem;
    w->mem_cap = capacity;
    return writer_open(w, NULL, p, err);
}

/* path NULL: memory mode, into w->mem (already allocated by the caller). */
static bs_status writer_open(bs_seg_writer *w, const char *path,
                             const bs_seg_params *p, bs_error *err) {
    bs_status st;
    uint64_t cent_raw, art_size, frag_raw, frag_size, dir_raw;
    if (__builtin_mul_overflow((uint64_t)p->num_partitions, (uint64_t)p->dim,
                               &cent_raw) ||
        __builtin_mul_overflow(cent_raw, 4, &cent_raw) ||
        !bs_align64_ok(cent_raw, &art_size) || cent_raw > SIZE_MAX)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "centroids too large: %u x %u", p->num_partitions,
                       p->dim);
    if (p->flags & ~BS_SEG_FLAGS_KNOWN)
        return bs_fail(err, BS_ERR_INTERNAL, "segment writer: unknown flags 0x%x",
                       p->flags & ~BS_SEG_FLAGS_KNOWN);
    /* External centroids: an empty artifacts section (its checksum is
     * XXH64 of no bytes); the header's IVF fingerprint names them. */
    if (p->flags & BS_SEG_FLAG_EXTERNAL_CENTROIDS) cent_raw = art_size = 0;
    frag_raw = (uint64_t)p->num_fragments * BS_SEG_FRAGMENT_ENTRY;
    bs_align64_ok(frag_raw, &frag_size);
    dir_raw = (uint64_t)p->num_partitions * BS_SEG_DIR_ENTRY;
    w->num_partitions = p->num_partitions;
    w->header_size = bs_seg_header_size(p->column_len);
    bs_align64_ok(dir_raw, &w->directory_size);

    w->path = str_concat(path ? path : "", "");
    w->tmp_path = str_concat(path ? path : "", ".tmp");
    w->header = bs_zalloc((size_t)w->header_size, 1);
    w->directory = bs_zalloc((size_t)w->directory_size, 1);
    uint8_t *frags = bs_zalloc((size_t)frag_size, 1);
    if (!w->path || !w->tmp_path || !w->header || !w->directory || !frags) {
        free(frags);
        bs_seg_writer_abort(w);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }

    uint8_t *h = w->header;
    memcpy(h + BS_HDR_MAGIC, BS_SEG_MAGIC, BS_SEG_MAGIC_LEN);
    /* Version 3 moved the factors into the stage-1 blocks: every file
     * needs a version 3 reader. */
    bs_store_u32(h + BS_HDR_READ_VERSION, BS_SEG_VERSION);
    bs_store_u32(h + BS_HDR_WRITE_VERSION, BS_SEG_VERSION);
    bs_store_u32(h + BS_HDR_HEADER_SIZE, (uint32_t)w->header_size);
    bs_store_u32(h + BS_HDR_FLAGS, p->flags);
    bs_store_u32(h + BS_HDR_DIM, p->dim);
    bs_store_u32(h + BS_HDR_PADDED_DIM, p->padded_dim);
    bs_store_u32(h + BS_HDR_NUM_BITS, p->num_bits);
    bs_store_u32(h + BS_HDR_METRIC, (uint32_t)p->metric);
    bs_store_u32(h + BS_HDR_ROTATION_KIND, (uint32_t)p->rotation_kind);
    bs_store_u32(h + BS_HDR_NUM_PARTITIONS, p->num_partitions);
    bs_store_u64(h + BS_HDR_ROTATION_SEED, p->rotation_seed);
    bs_store_u32(h + BS_HDR_NUM_FRAGMENTS, p->num_fragments);
    bs_store_u32(h + BS_HDR_COLUMN_LEN, p->column_len);
    memcpy(h + BS_HDR_UUID, p->uuid, 16);
    memcpy(h + BS_HDR_ROTATION_FP, p->rotation_fp.bytes, 16);
    memcpy(h + BS_HDR_IVF_FP, p->ivf_fp.bytes, 16);
    memcpy(h + BS_HDR_COLUMN, p->column, p->column_len);

    for (uint32_t i = 0; i < p->num_fragments; i++) {
        uint8_t *e = frags + (size_t)i * BS_SEG_FRAGMENT_ENTRY;
        bs_store_u64(e + BS_FRAG_ID, p->fragment_ids[i]);
        bs_store_u64(e + BS_FRAG_ROWS, p->fragment_rows[i]);
        if (p->fragment_identity)
            memcpy(e + BS_FRAG_IDENTITY, p->fragment_identity + (size_t)i * 16, 16);
    }

    if (path != NULL) {
        w->f = fopen(w->tmp_path, "wb");
        if (w->f == NULL) {
            int e = errno;
            free(frags);
            st = io_fail(err, "cannot open for writing", w->tmp_path, e);
            bs_seg_writer_abort(w);
            return st;
        }
    }

    uint64_t art_sum = 0, frag_sum = 0;
    st = write_bytes(w, w->header, w->header_size, err);
    uint64_t art_off = w->pos;
    if (st == BS_OK)
        st = write_section(w, p->centroids, cent_raw, art_size, &art_sum, err);
    uint64_t frag_off = w->pos;
    if (st == BS_OK)
        st = write_section(w, frags, frag_raw, frag_size, &frag_sum, err);
    free(frags);
    w->directory_offset = w->pos;
    if (st == BS_OK)
        st = write_bytes(w, w->directory, w->directory_size, err);
    if (st != BS_OK) {
        bs_seg_writer_abort(w);
        return st;
    }
    bs_store_u64(h + BS_HDR_ARTIFACTS, art_off);
    bs_store_u64(h + BS_HDR_ARTIFACTS + 8, art_size);
    bs_store_u64(h + BS_HDR_ARTIFACTS + 16, art_sum);
    bs_store_u64(h + BS_HDR_FRAGMENTS, frag_off);
    bs_store_u64(h + BS_HDR_FRAGMENTS + 8, frag_size);
    bs_store_u64(h + BS_HDR_FRAGMENTS + 16, frag_sum);
    bs_store_u64(h + BS_HDR_DIRECTORY, w->directory_offset);
    bs_store_u64(h + BS_HDR_DIRECTORY + 8, w->directory_size);
    return BS_OK;
}

bs_status bs_seg_writer_partition(bs_seg_writer *w, uint32_t count,
                                  const uint8_t *block,
                                  const bs_part_layout *L, bs_error *err) {
    const uint64_t size = L->size, s1 = L->stage1_size;
    if ((w->f == NULL && w->mem == NULL) || w->next_partition >= w->num_partitions)
        return bs_fail(err, BS_ERR_INTERNAL,
                       "segment writer: partition %u out of sequence",
                       w->next_partition);
    uint8_t *e = w->directory + (size_t)w->next_partition * BS_SEG_DIR_ENTRY;
    bs_store_u64(e + BS_DIR_OFFSET, w->pos);
    bs_store_u64(e + BS_DIR_SIZE, size);
    bs_store_u32(e + BS_DIR_COUNT, count);
    bs_store_u32(e + BS_DIR_RESERVED, 0);
    bs_store_u64(e + BS_DIR_STAGE1_SIZE, s1);
    bs_store_u64(e + BS_DIR_STAGE1_CHECKSUM,
                 bs_hash64(block, (size_t)s1, BS_SEG_CHECKSUM_SEED));
    bs_store_u64(e + BS_DIR_EXTRA_CHECKSUM,
                 bs_hash64(block + s1, (size_t)(size - s1), BS_SEG_CHECKSUM_SEED));
    BS_TRY(write_bytes(w, block, size, err));
    w->next_partition++;
    w->num_rows += count;
    return BS_OK;
}

/* Makes the rename durable: the directory entry must reach the disk too. */
static bs_status sync_parent_dir(const char *path, bs_error *err) {
    const char *slash = strrchr(path, '/');
    char *dir;
    if (slash == NULL) {
        dir = str_concat(".", "");
    } else if (slash == path) {
        dir = str_concat("/", "");
    } else {
        size_t n = (size_t)(slash - path);
        dir = bs_alloc(n + 1, 1);
        if (dir) {
            memcpy(dir, path, n);
            dir[n] = '\0';
        }
    }
    if (dir == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    bs_status st = BS_OK;
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) {
        /* Some file systems cannot fsync a directory; that is not a
         * failure of the write. */
        if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS)
            st = io_fail(err, "cannot sync directory", dir, errno);
        close(fd);
    }
    free(dir);
    return st;
}

/* The header's last fields and checksums, once every partition is in. */
static void complete_header(bs_seg_writer *w) {
    uint8_t *h = w->header;
    bs_store_u64(h + BS_HDR_NUM_ROWS, w->num_rows);
    bs_store_u64(h + BS_HDR_FILE_SIZE, w->pos);
    bs_store_u64(h + BS_HDR_DIRECTORY + 16,
                 bs_hash64(w->directory, (size_t)w->directory_size,
                           BS_SEG_CHECKSUM_SEED));
    bs_store_u64(h + w->header_size - 8,
                 bs_hash64(h, (size_t)w->header_size - 8,
                           BS_SEG_CHECKSUM_SEED));
}

bs_status bs_seg_writer_finish_memory(bs_seg_writer *w, uint8_t **out,
                                      uint64_t *len, bs_error *err) {
    bs_status st = BS_OK;
    if (w->mem == NULL || w->next_partition != w->num_partitions ||
        w->pos != w->mem_cap) {
        st = bs_fail(err, BS_ERR_INTERNAL,
                     "segment writer: %u of %u partitions, %llu of %llu bytes",
                     w->next_partition, w->num_partitions,
                     (unsigned long long)w->pos, (unsigned long long)w->mem_cap);
        bs_seg_writer_abort(w);
        return st;
    }
    complete_header(w);
    memcpy(w->mem, w->header, (size_t)w->header_size);
    memcpy(w->mem + w->directory_offset, w->directory, (size_t)w->directory_size);
    *out = w->mem;
    *len = w->pos;
    w->mem = NULL;
    bs_seg_writer_abort(w);
    return BS_OK;
}

bs_status bs_seg_writer_finish(bs_seg_writer *w, bs_error *err) {
    bs_status st = BS_OK;
    if (w->f == NULL || w->next_partition != w->num_partitions) {
        st = bs_fail(err, BS_ERR_INTERNAL,
                     "segment writer: %u of %u partitions written",
                     w->next_partition, w->num_partitions);
        bs_seg_writer_abort(w);
        return st;
    }
    complete_header(w);
    uint8_t *h = w->header;
    if (fseek(w->f, 0, SEEK_SET) != 0 ||
        fwrite(h, 1, (size_t)w->header_size, w->f) != w->header_size ||
        fseek(w->f, (long)w->directory_offset, SEEK_SET) != 0 ||
        fwrite(w->directory, 1, (size_t)w->directory_size, w->f) !=
            w->directory_size ||
        fflush(w->f) != 0 || fsync(fileno(w->f)) != 0) {
        st = io_fail(err, "cannot write", w->tmp_path, errno ? errno : EIO);
        bs_seg_writer_abort(w);
        return st;
    }
    FILE *f = w->f;
    w->f = NULL;
    if (fclose(f) != 0) {
        st = io_fail(err, "cannot close", w->tmp_path, errno);
        remove(w->tmp_path);
        bs_seg_writer_abort(w);
        return st;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        int e = errno;
        char buf[128];
        if (strerror_r(e, buf, sizeof buf) != 0)
            snprintf(buf, sizeof buf, "error %d", e);
        st = bs_fail(err, BS_ERR_IO, "cannot rename %s to %s: %s",
                     w->tmp_path, w->path, buf);
        remove(w->tmp_path);
        bs_seg_writer_abort(w);
        return st;
    }
    st = sync_parent_dir(w->path, err);
    bs_seg_writer_abort(w);
    return st;
}

bs_status bs_check_write_flags(uint32_t flags, bs_error *err) {
    if (flags & ~(uint32_t)BS_WRITE_EXTERNAL_CENTROIDS)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT,
                       "write flags 0x%x has unknown bits 0x%x", flags,
                       flags & ~(uint32_t)BS_WRITE_EXTERNAL_CENTROIDS);
    return BS_OK;
}
