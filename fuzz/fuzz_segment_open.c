/* libFuzzer target for the segment reader: any bytes must either be refused
 * with a status or open into a segment whose every view can be read in
 * full, before and after bs_segment_verify (the partitions of a format 3
 * file are checked only by verify or a search: their bounds must hold
 * without it). Each input is tried twice: as given, and "resealed" with every
 * checksum and fingerprint recomputed, because random bytes almost never
 * pass a checksum and a crafted file can carry valid ones: memory safety
 * must rest on the structural checks behind them. Both are tried again with
 * centroids given by the caller (bs_segment_open_with_centroids, the
 * reader of files with external centroids, header flags bit 0): resealing
 * then writes the given centroids' fingerprint into a flagged header, so
 * that the open gets past the fingerprint check. Each opened input is also
 * opened from its prefix (bs_segment_prefix_size, bs_segment_open_prefix)
 * with every partition attached from its own buffer of exactly its range:
 * the prefix open must accept what the whole open accepts, and an attach
 * must refuse exactly the partitions the whole open's check refuses.
 * tests/c/test_fuzz_corpus.c
 * replays the saved corpus through this same function without libFuzzer. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"
#include "format.h"
#include "fuzz_given_centroids.h"
#include "hash.h"
#include "rabitq.h"
#include "segment.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reads every byte a caller of the views may read, so that ASan sees any
 * view that points outside the buffer. Returns a checksum-like sink. */
static uint64_t bs_fuzz_touch_segment(const bs_segment *seg, int all_present) {
    uint64_t sink = 0;
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    sink += strlen(info.column);
    const float *c = bs_segment_centroids(seg);
    for (size_t i = 0; i < (size_t)info.num_partitions * info.dim; i++)
        sink += (uint64_t)(c[i] != 0.0f);
    for (uint32_t f = 0; f < info.num_fragments; f++) {
        uint64_t id = 0, rows = 0;
        uint8_t ident[16];
        bs_segment_fragment(seg, f, &id, &rows);
        bs_segment_fragment_identity(seg, f, ident);
        sink += id ^ rows ^ ident[0] ^ ident[15];
    }
    const uint32_t D = info.padded_dim;
    const size_t eb = bs_ext_bytes(D, info.num_bits);
    uint8_t *code = malloc(bs_code_bytes(D));
    if (code == NULL) return sink;
    uint64_t rows_seen = 0;
    for (uint32_t p = 0; p < info.num_partitions; p++) {
        bs_partition_view v;
        bs_segment_partition(seg, p, &v);
        size_t block_bytes = bs_fastscan_num_blocks(v.count) * v.stride;
        for (size_t i = 0; i < block_bytes; i++) sink += v.blocks[i];
        for (uint32_t i = 0; i < v.count; i++) {
            sink += (uint64_t)(bs_pv_norm2(&v, i) + bs_pv_s1(&v, i) + bs_pv_corr(&v, i) +
                                   bs_pv_s_full(&v, i) >
                               0.0f);
            sink += bs_segment_rowid(seg, v.ordinals[i]);
            bs_fastscan_unpack_one(bs_pv_block(&v, i / 32), i % 32, D, code);
            sink += code[0];
            if (eb) sink += v.ext[(size_t)i * eb] + v.ext[(size_t)i * eb + eb - 1];
        }
        rows_seen += v.count;
    }
    free(code);
    /* An opened segment is internally consistent. */
    if (all_present && rows_seen != info.num_rows) abort();
    bs_error err;
    if (bs_segment_check_compatible(seg, seg, &err) != BS_OK) abort();
    return sink;
}

/* 1 when [off, off + len) lies inside n bytes. */
static int bs_fuzz_inside(uint64_t off, uint64_t len, size_t n) {
    return off <= n && len <= n - off;
}

static void bs_fuzz_put_sum(uint8_t *b, size_t n, size_t at, uint64_t off,
                            uint64_t len) {
    if (bs_fuzz_inside(off, len, n) && bs_fuzz_inside(at, 8, n))
        bs_store_u64(b + at, bs_hash64(b + off, (size_t)len,
                                       BS_SEG_CHECKSUM_SEED));
}

/* The caller's centroids for the header's k x dim (bs_fuzz_given_value),
 * or NULL when the header is too short or asks for more than
 * BS_FUZZ_MAX_GIVEN floats. */
static float *bs_fuzz_given(const uint8_t *b, size_t n, size_t *count) {
    *count = 0;
    if (n < BS_HDR_IVF_FP + 16) return NULL;
    uint64_t c = (uint64_t)bs_load_u32(b + BS_HDR_NUM_PARTITIONS) *
                 bs_load_u32(b + BS_HDR_DIM);
    if (c == 0 || c > BS_FUZZ_MAX_GIVEN) return NULL;
    float *g = malloc((size_t)c * sizeof *g);
    if (g == NULL) return NULL;
    for (size_t i = 0; i < (size_t)c; i++) g[i] = bs_fuzz_given_value(i);
    *count = (size_t)c;
    return g;
}

/* Rewrites every checksum and fingerprint the bytes imply, as far as their
 * offsets lie inside the buffer; the offsets themselves stay untrusted. A
 * header flagged for external centroids gets the fingerprint of `given`. */
static void bs_fuzz_reseal(uint8_t *b, size_t n, const float *given) {
    if (n < BS_SEG_HEADER_FIXED + 8) return;
    uint32_t k = bs_load_u32(b + BS_HDR_NUM_PARTITIONS);
    uint32_t dim = bs_load_u32(b + BS_HDR_DIM);
    uint64_t dir = bs_load_u64(b + BS_HDR_DIRECTORY);
    /* Format 2 (read version <= 2): one checksum per 32-byte entry;
     * format 3: the stage-1 and extra regions of a 64-byte entry. */
    const int v2 = bs_load_u32(b + BS_HDR_READ_VERSION) <= 2;
    const uint32_t entry = v2 ? BS_SEG_V2_DIR_ENTRY : BS_SEG_DIR_ENTRY;
    if (bs_fuzz_inside(dir, (uint64_t)k * entry, n)) {
        for (uint32_t p = 0; p < k; p++) {
            size_t e = (size_t)dir + (size_t)p * entry;
            uint64_t off = bs_load_u64(b + e + BS_DIR_OFFSET);
            uint64_t size = bs_load_u64(b + e + BS_DIR_SIZE);
            if (v2) {
                bs_fuzz_put_sum(b, n, e + BS_DIR2_CHECKSUM, off, size);
                continue;
            }
            uint64_t s1 = bs_load_u64(b + e + BS_DIR_STAGE1_SIZE);
            bs_fuzz_put_sum(b, n, e + BS_DIR_STAGE1_CHECKSUM, off, s1);
            if (s1 <= size && off <= UINT64_MAX - s1)
                bs_fuzz_put_sum(b, n, e + BS_DIR_EXTRA_CHECKSUM, off + s1, size - s1);
        }
    }
    uint64_t art = bs_load_u64(b + BS_HDR_ARTIFACTS);
    uint64_t cbytes = (uint64_t)k * dim * 4;
    if (k != 0 && dim != 0 && cbytes / 4 / dim == k &&
        bs_fuzz_inside(art, cbytes, n) && art % 4 == 0) {
        bs_fingerprint fp = bs_ivf_fingerprint(
            (const float *)(const void *)(b + art), k, dim,
            (bs_metric)bs_load_u32(b + BS_HDR_METRIC));
        memcpy(b + BS_HDR_IVF_FP, fp.bytes, 16);
    }
    if (given != NULL && (bs_load_u32(b + BS_HDR_FLAGS) & BS_SEG_FLAG_EXTERNAL_CENTROIDS)) {
        bs_fingerprint fp = bs_ivf_fingerprint(given, k, dim,
                                               (bs_metric)bs_load_u32(b + BS_HDR_METRIC));
        memcpy(b + BS_HDR_IVF_FP, fp.bytes, 16);
    }
    bs_fingerprint rfp = bs_rotation_fingerprint_params(
        (bs_rotation_kind)bs_load_u32(b + BS_HDR_ROTATION_KIND), dim,
        bs_load_u32(b + BS_HDR_PADDED_DIM),
        bs_load_u64(b + BS_HDR_ROTATION_SEED));
    memcpy(b + BS_HDR_ROTATION_FP, rfp.bytes, 16);
    for (unsigned f = BS_HDR_ARTIFACTS; f <= BS_HDR_DIRECTORY; f += 24)
        bs_fuzz_put_sum(b, n, f + 16, bs_load_u64(b + f),
                        bs_load_u64(b + f + 8));
    uint32_t hs = bs_load_u32(b + BS_HDR_HEADER_SIZE);
    if (hs >= BS_SEG_HEADER_FIXED + 8 && hs <= n)
        bs_fuzz_put_sum(b, n, hs - 8, 0, hs - 8);
}

static uint8_t *bs_fuzz_aligned_copy(const uint8_t *src, size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 1) != 0) return NULL;
    if (n) memcpy(p, src, n);
    return p;
}

/* The prefix open of the file's bytes with the same given centroids;
 * whole is the whole open of the same bytes, or NULL when it refused them. */
static void bs_fuzz_open_prefix(const uint8_t *file, size_t size, const bs_segment *whole,
                                const float *given, size_t ngiven) {
    bs_error err;
    uint64_t need = 0;
    size_t have = size < 256 ? size : 256;
    bs_status st = BS_OK;
    /* As a ranged reader does: the smallest header, the header, the prefix. */
    for (int i = 0; i < 3; i++) {
        st = bs_segment_prefix_size(file, have, &need, &err);
        if (st != BS_OK || need <= have || need > size) break;
        have = (size_t)need;
    }
    if (st != BS_OK) {
        if (err.code != st || err.message[0] == '\0' || whole != NULL) abort();
        return;
    }
    if (need > size) {
        if (whole != NULL) abort(); /* the whole open read past the end? */
        return;
    }
    uint8_t *pre = bs_fuzz_aligned_copy(file, (size_t)need);
    if (pre == NULL) return;
    bs_segment *seg = NULL;
    st = bs_segment_open_prefix_with_centroids(pre, (size_t)need, size, given, ngiven, &seg,
                                               &err);
    if ((st == BS_OK) != (whole != NULL)) abort();
    if (st != BS_OK) {
        if (seg != NULL || err.code != st || err.message[0] == '\0') abort();
        free(pre);
        return;
    }
    volatile uint64_t sink = bs_fuzz_touch_segment(seg, 0);
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    uint8_t **parts = calloc(info.num_partitions ? info.num_partitions : 1, sizeof *parts);
    int all = parts != NULL;
    for (uint32_t p = 0; parts != NULL && p < info.num_partitions; p++) {
        if (bs_segment_partition_attached(seg, p)) continue; /* format 2: whole */
        uint64_t off = 0, len = 0;
        if (bs_segment_partition_range(seg, p, &off, &len, &err) != BS_OK) abort();
        if (off > size || len > size - off || off % 64 != 0) abort();
        parts[p] = bs_fuzz_aligned_copy(file + off, (size_t)len);
        if (parts[p] == NULL) {
            all = 0;
            continue;
        }
        bs_error werr;
        st = bs_segment_attach(seg, p, parts[p], (size_t)len, &err);
        if (st != bs_segment_check_partition(whole, p, &werr)) abort();
        if (st != BS_OK) {
            if (err.code != st || err.message[0] == '\0') abort();
            free(parts[p]);
            parts[p] = NULL;
            all = 0;
        }
    }
    sink += bs_fuzz_touch_segment(seg, all);
    (void)sink;
    if (all) {
        bs_error werr;
        if (bs_segment_verify(seg, &err) != bs_segment_verify(whole, &werr)) abort();
    }
    bs_segment_free(seg);
    for (uint32_t p = 0; parts != NULL && p < info.num_partitions; p++) free(parts[p]);
    free(parts);
    free(pre);
}

static void bs_fuzz_open_one(const uint8_t *data, size_t size, int reseal,
                             int with_centroids) {
    /* Exactly `size` bytes at a 64-byte boundary: the reader requires the
     * alignment, and ASan then flags a read even one byte past the end. */
    void *buf = NULL;
    if (posix_memalign(&buf, 64, size ? size : 1) != 0) return;
    if (size) memcpy(buf, data, size);
    size_t ngiven = 0;
    float *given = with_centroids ? bs_fuzz_given(buf, size, &ngiven) : NULL;
    if (reseal) bs_fuzz_reseal(buf, size, given);
    bs_segment *seg = NULL;
    bs_error err;
    bs_status st = bs_segment_open_with_centroids(buf, size, given, ngiven, &seg, &err);
    if (st == BS_OK) {
        volatile uint64_t sink = bs_fuzz_touch_segment(seg, 1);
        bs_fuzz_open_prefix(buf, size, seg, given, ngiven);
        bs_status vst = bs_segment_verify(seg, &err);
        if (vst != BS_OK && (err.code != vst || err.message[0] == '\0')) abort();
        sink += bs_fuzz_touch_segment(seg, 1);
        (void)sink;
    } else if (seg != NULL || err.code != st || err.message[0] == '\0') {
        /* A refusal leaves no handle and always says why. */
        abort();
    } else {
        bs_fuzz_open_prefix(buf, size, NULL, given, ngiven);
    }
    bs_segment_free(seg);
    free(given);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int given = 0; given < 2; given++) {
        bs_fuzz_open_one(data, size, 0, given);
        bs_fuzz_open_one(data, size, 1, given);
    }
    return 0;
}
