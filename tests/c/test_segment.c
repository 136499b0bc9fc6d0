/* Segment files: build, write, open, validate, merge. The strongest check is
 * that merging segments gives byte for byte the file a single builder
 * writes for the union of their rows. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "format.h"
#include "hash.h"
#include "ivf_internal.h"
#include "rabitq.h"
#include "segment.h"
#include "testing.h"

static char g_dir[256];

#define tpath(name) test_path(g_dir, name)

/* ------------------------------------------------------------ helpers */


/* Clustered data: k centres spread out, rows = centre + unit noise. The
 * true centres serve as the IVF centroids. */
typedef struct dataset {
    uint32_t d, k, n;
    float *centroids; /* k * d */
    float *x;         /* n * d */
} dataset;

static dataset make_data(uint32_t d, uint32_t k, uint32_t n, uint64_t seed) {
    dataset ds = {d, k, n, malloc((size_t)k * d * 4), malloc((size_t)n * d * 4 + 4)};
    uint64_t st = seed;
    for (size_t i = 0; i < (size_t)k * d; i++)
        ds.centroids[i] = (float)(3.0 * test_rand_normal(&st));
    for (uint32_t i = 0; i < n; i++) {
        uint32_t c = (uint32_t)(test_rand_u64(&st) % k);
        for (uint32_t j = 0; j < d; j++)
            ds.x[(size_t)i * d + j] = ds.centroids[(size_t)c * d + j] +
                                      (float)test_rand_normal(&st);
    }
    return ds;
}

static void free_data(dataset *ds) {
    free(ds->centroids);
    free(ds->x);
}

static const uint8_t UUID_A[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static const uint8_t UUID_B[16] = {0xaa, 0xbb, 0xcc, 0xdd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9};

static bs_segment_spec base_spec(const dataset *ds, uint32_t bits,
                                 bs_metric metric, bs_rotation_kind kind,
                                 const uint64_t *ids, const uint64_t *rows,
                                 uint32_t nf) {
    bs_segment_spec s = test_segment_spec(ds->d, bits, metric, 12345, ds->centroids, ds->k,
                                          UUID_A, ids, rows, nf);
    s.rotation_kind = kind;
    return s;
}

/* Row r of the dataset belongs to fragment table position f at offset o,
 * where fragments take consecutive dataset rows (first_row[f] onwards). */
static bs_status add_fragment(bs_segment_builder *b, const dataset *ds,
                              uint32_t fpos, uint64_t first_row,
                              uint64_t rows, size_t batch, int reverse,
                              bs_error *err) {
    uint32_t *offs = malloc((batch ? batch : 1) * sizeof *offs);
    float *x = malloc((batch ? batch : 1) * ds->d * sizeof(float));
    bs_status st = BS_OK;
    for (uint64_t s = 0; s < rows && st == BS_OK; s += batch) {
        size_t m = rows - s < batch ? (size_t)(rows - s) : batch;
        for (size_t i = 0; i < m; i++) {
            uint64_t o = reverse ? rows - 1 - (s + i) : s + i;
            offs[i] = (uint32_t)o;
            memcpy(x + i * ds->d, ds->x + (first_row + o) * ds->d,
                   ds->d * sizeof(float));
        }
        st = bs_builder_add(b, x, m, fpos, offs, err);
    }
    free(offs);
    free(x);
    return st;
}

/* Builds a segment over fragment table positions [f0, f1) of a layout
 * where fragment f holds rows[f] consecutive dataset rows. */
/* The identity fingerprint the tests record for fragment id. */
static void ident_of(uint64_t id, uint8_t fp[16]) {
    for (int i = 0; i < 16; i++) fp[i] = (uint8_t)(id * 7 + (uint64_t)i * 13 + 1);
}

static bs_status build_range(const dataset *ds, uint32_t bits,
                             bs_metric metric, bs_rotation_kind kind,
                             const uint64_t *ids, const uint64_t *rows,
                             uint32_t f0, uint32_t f1, size_t batch,
                             int reverse, const uint8_t *uuid,
                             const char *path, bs_error *err) {
    bs_segment_spec s =
        base_spec(ds, bits, metric, kind, ids + f0, rows + f0, f1 - f0);
    s.uuid = uuid;
    bs_segment_builder *b = NULL;
    bs_status st = bs_builder_create(&s, &b, err);
    if (st != BS_OK) return st;
    /* 1 to 3 threads by batch size: the merge tests compare files built
     * with different counts byte for byte. */
    bs_builder_set_threads(b, (uint32_t)(batch % 3) + 1);
    for (uint32_t f = f0; f < f1 && st == BS_OK; f++) {
        uint8_t fp[16];
        ident_of(ids[f], fp);
        st = bs_builder_set_fragment_identity(b, ids[f], fp, err);
    }
    uint64_t first = 0;
    for (uint32_t f = 0; f < f0; f++) first += rows[f];
    /* Adding later fragments first checks the file ignores add order. */
    for (uint32_t f = f1; f-- > f0 && st == BS_OK;) {
        uint64_t fr = first;
        for (uint32_t g = f0; g < f; g++) fr += rows[g];
        st = add_fragment(b, ds, f - f0, fr, rows[f], batch, reverse, err);
    }
    if (st == BS_OK) st = bs_builder_write(b, path, err);
    bs_builder_free(b);
    return st;
}

static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* ------------------------------------------------ round trip + views */

/* Every row present once with its row id, views consistent with encoding
 * the row directly. */
static void check_contents(const bs_segment *seg, const dataset *ds,
                           const uint64_t *ids, const uint64_t *rows,
                           uint32_t nf, uint32_t bits, bs_metric metric,
                           bs_rotation_kind kind) {
    bs_segment_info info;
    bs_segment_get_info(seg, &info);
    uint32_t D = info.padded_dim;
    uint64_t total = 0;
    for (uint32_t f = 0; f < nf; f++) total += rows[f];
    uint8_t *seen = calloc(total + 1, 1);
    bs_rotation *rot = NULL;
    CHECK(bs_rotation_create(kind, ds->d, 12345, &rot, NULL) == BS_OK);
    float *xr = malloc(ds->d * 4), *po = malloc(D * 4), *pc = malloc(D * 4);
    float *r = malloc(D * 4), *scratch = malloc(D * 2 * 4);
    uint8_t *code = malloc(D / 8), *code2 = malloc(D / 8);
    uint8_t *ext = malloc(bs_ext_bytes(D, bits) + 1);
    uint64_t found = 0;
    int mismatches = 0;
    for (uint32_t p = 0; p < info.num_partitions; p++) {
        bs_partition_view v;
        bs_segment_partition(seg, p, &v);
        CHECK(bs_segment_check_partition(seg, p, NULL) == BS_OK);
        CHECK(((uintptr_t)bs_pv_norm2_block(&v, 0) & 63) == 0 &&
              ((uintptr_t)v.ordinals & 3) == 0);
        CHECK(((uintptr_t)v.blocks & 63) == 0 && v.stride % 64 == 0);
        CHECK((bits == 1) == (v.ext == NULL));
        if (bits == 1) CHECK(v.s_full == NULL);
        /* corr of every row: from its stored code and the artifacts only
         * (docs/format.md, "The factors"). */
        float *pm = malloc(D * 4), *pcp = malloc(D * 4), *dirv = malloc(D * 4);
        CHECK(bs_centroid_mean_rotated(rot, ds->centroids, ds->k, ds->d, pm, NULL) == BS_OK);
        bs_rotation_apply(rot, ds->centroids + (size_t)p * ds->d, 1, ds->d, pcp, NULL);
        bs_corr_direction(metric, pm, pcp, D, dirv);
        for (uint32_t i = 0; i < v.count; i++) {
            uint32_t o = v.ordinals[i];
            CHECK(o < total);
            if (o >= total) continue;
            CHECK(!seen[o]);
            seen[o] = 1;
            found++;
            uint64_t rowid = bs_segment_rowid(seg, o);
            /* Find the fragment by walking the table. */
            uint64_t acc = 0;
            uint32_t f = 0;
            while (f < nf && o >= acc + rows[f]) acc += rows[f++];
            CHECK(f < nf);
            CHECK(rowid == ((ids[f] << 32) | (o - acc)));
            const float *x = ds->x + (size_t)o * ds->d; /* fragments are consecutive */
            if (metric == BS_METRIC_COSINE)
                bs_normalize_row(x, ds->d, xr);
            else
                memcpy(xr, x, ds->d * 4);
            uint32_t a = 0;
            CHECK(bs_ivf_assign(ds->centroids, ds->k, ds->d, metric, x, 1, &a,
                                NULL, NULL) == BS_OK);
            CHECK(a == p);
            bs_rotation_apply(rot, xr, 1, ds->d, po, NULL);
            bs_rotation_apply(rot, ds->centroids + (size_t)p * ds->d, 1, ds->d,
                              pc, NULL);
            for (uint32_t j = 0; j < D; j++) r[j] = po[j] - pc[j];
            bs_factors fac;
            bs_rabitq_encode(r, D, bits, code, bits > 1 ? ext : NULL, &fac,
                             scratch);
            bs_fastscan_unpack_one(bs_pv_block(&v, i / 32), i % 32, D, code2);
            int same = memcmp(code, code2, D / 8) == 0 &&
                       fac.norm2 == bs_pv_norm2(&v, i) && fac.s1 == bs_pv_s1(&v, i) &&
                       fac.s_full == bs_pv_s_full(&v, i) &&
                       bs_corr_from_code(code2, dirv, D) == bs_pv_corr(&v, i);
            if (bits > 1)
                same = same && memcmp(ext, v.ext + (size_t)i *
                                                       bs_ext_bytes(D, bits),
                                      bs_ext_bytes(D, bits)) == 0;
            if (!same) mismatches++;
        }
        /* FastScan padding past count is zero. */
        if (v.count % 32) {
            for (uint32_t i = v.count; i < (v.count + 31) / 32 * 32; i++) {
                bs_fastscan_unpack_one(bs_pv_block(&v, i / 32), i % 32, D, code2);
                for (uint32_t j = 0; j < D / 8; j++) CHECK(code2[j] == 0);
                CHECK(bs_pv_norm2(&v, i) == 0 && bs_pv_s1(&v, i) == 0 && bs_pv_corr(&v, i) == 0);
            }
        }
        free(pm);
        free(pcp);
        free(dirv);
    }
    CHECK_MSG(mismatches == 0, "%d rows differ from direct encoding", mismatches);
    CHECK(found == info.num_rows);
    bs_rotation_free(rot);
    free(seen);
    free(xr);
    free(po);
    free(pc);
    free(r);
    free(scratch);
    free(code);
    free(code2);
    free(ext);
}

static void test_roundtrip(uint32_t d, uint32_t bits, bs_metric metric,
                           bs_rotation_kind kind) {
    dataset ds = make_data(d, 8, 700, 1000 + d + bits);
    /* Unsorted ids, and an empty fragment in the middle. */
    uint64_t ids[4] = {7, 3, 1000, 42};
    uint64_t rows[4] = {250, 0, 300, 150};
    bs_error err;
    const char *path = tpath("rt.bsseg");
    bs_status st = build_range(&ds, bits, metric, kind, ids, rows, 0, 4, 97, 0,
                               UUID_A, path, &err);
    CHECK_MSG(st == BS_OK, "%s", err.message);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0);

    test_loaded l;
    st = test_load(path, &l, &err);
    CHECK_MSG(st == BS_OK, "open: %s", err.message);
    if (st == BS_OK) {
        bs_segment_info info;
        bs_segment_get_info(l.seg, &info);
        CHECK(info.format_version == 3);
        CHECK(info.dim == d);
        CHECK(info.padded_dim == bs_padded_dim(d));
        CHECK(info.num_bits == bits);
        CHECK(info.metric == metric);
        CHECK(info.rotation_kind == kind);
        CHECK(info.rotation_seed == 12345);
        CHECK(info.num_partitions == 8);
        CHECK(info.num_fragments == 4);
        CHECK(info.num_rows == 700);
        CHECK(memcmp(info.uuid, UUID_A, 16) == 0);
        CHECK(strcmp(info.column, "vec") == 0);
        bs_fingerprint ivf = bs_ivf_fingerprint(ds.centroids, 8, d, metric);
        CHECK(memcmp(&ivf, &info.ivf_fingerprint, 16) == 0);
        bs_rotation *rot = NULL;
        bs_rotation_create(kind, d, 12345, &rot, NULL);
        bs_fingerprint rfp = bs_rotation_fingerprint(rot);
        CHECK(memcmp(&rfp, &info.rotation_fingerprint, 16) == 0);
        bs_rotation_free(rot);
        CHECK(memcmp(bs_segment_centroids(l.seg), ds.centroids,
                     (size_t)8 * d * 4) == 0);
        for (uint32_t f = 0; f < 4; f++) {
            uint64_t id = 0, r = 0;
            bs_segment_fragment(l.seg, f, &id, &r);
            CHECK(id == ids[f] && r == rows[f]);
        }
        uint64_t id = 1, r = 1;
        bs_segment_fragment(l.seg, 4, &id, &r);
        CHECK(id == 0 && r == 0);
        /* The first ordinal after the empty fragment maps to fragment 1000. */
        CHECK(bs_segment_rowid(l.seg, 250) == (1000ull << 32));
        CHECK(bs_segment_rowid(l.seg, 249) == ((7ull << 32) | 249));
        CHECK(bs_segment_rowid(l.seg, 699) == ((42ull << 32) | 149));
        CHECK(bs_segment_rowid(l.seg, 700) == UINT64_MAX);
        check_contents(l.seg, &ds, ids, rows, 4, bits, metric, kind);
    }
    test_unload(&l);

    /* Add order and batch sizes do not change a byte. */
    const char *path2 = tpath("rt2.bsseg");
    st = build_range(&ds, bits, metric, kind, ids, rows, 0, 4, 1, 1, UUID_A,
                     path2, &err);
    CHECK_MSG(st == BS_OK, "%s", err.message);
    CHECK_MSG(test_files_equal(path, path2), "d=%u bits=%u metric=%d kind=%d", d,
              bits, (int)metric, (int)kind);
    free_data(&ds);
}

/* ------------------------------------------------------- corruption */

/* Recomputes every checksum from the stored layout, so that a test can
 * change a field and see the semantic check (not the checksum) refuse it. */
static void reseal(uint8_t *b, size_t len) {
    uint32_t hs = bs_load_u32(b + BS_HDR_HEADER_SIZE);
    uint32_t k = bs_load_u32(b + BS_HDR_NUM_PARTITIONS);
    uint64_t dir = bs_load_u64(b + BS_HDR_DIRECTORY);
    for (uint32_t p = 0; p < k; p++) {
        uint8_t *e = b + dir + (size_t)p * BS_SEG_DIR_ENTRY;
        uint64_t off = bs_load_u64(e), size = bs_load_u64(e + 8);
        uint64_t s1 = bs_load_u64(e + BS_DIR_STAGE1_SIZE);
        if (off + size <= len && s1 <= size) {
            bs_store_u64(e + BS_DIR_STAGE1_CHECKSUM, bs_hash64(b + off, s1, 0));
            bs_store_u64(e + BS_DIR_EXTRA_CHECKSUM, bs_hash64(b + off + s1, size - s1, 0));
        }
    }
    for (unsigned field = BS_HDR_ARTIFACTS; field <= BS_HDR_DIRECTORY;
         field += 24) {
        uint64_t off = bs_load_u64(b + field), size = bs_load_u64(b + field + 8);
        if (off + size <= len)
            bs_store_u64(b + field + 16, bs_hash64(b + off, size, 0));
    }
    bs_store_u64(b + hs - 8, bs_hash64(b, hs - 8, 0));
}

static bs_status open_bytes(const uint8_t *b, size_t len, bs_error *err) {
    uint8_t *c = test_aligned_copy(b, len);
    bs_segment *s = NULL;
    bs_status st = bs_segment_open(c, len, &s, err);
    /* What the open leaves to first use (the partitions, no ordinal in two
     * of them) is checked here too: these tests are about the rules, not
     * about when they run (test_lazy_partitions is). */
    if (st == BS_OK) st = bs_segment_verify(s, err);
    if (st == BS_OK) {
        /* A segment that opens must be fully usable. */
        bs_segment_info info;
        bs_segment_get_info(s, &info);
        for (uint32_t p = 0; p < info.num_partitions; p++) {
            bs_partition_view v;
            bs_segment_partition(s, p, &v);
            for (uint32_t i = 0; i < v.count; i++)
                (void)bs_segment_rowid(s, v.ordinals[i]);
        }
    }
    bs_segment_free(s);
    free(c);
    return st;
}

/* Applies edit to a copy, reseals, and expects the status and message. */
typedef void (*edit_fn)(uint8_t *b, size_t len);

static void expect_edit(const uint8_t *orig, size_t len, size_t newlen,
                        edit_fn edit, bs_status want, const char *msg_part) {
    uint8_t *b = calloc(1, newlen > len ? newlen : len);
    memcpy(b, orig, len);
    edit(b, newlen);
    reseal(b, newlen);
    bs_error err;
    bs_status st = open_bytes(b, newlen, &err);
    CHECK_MSG(st == want, "want %s got %s (%s), expecting '%s'",
              bs_status_name(want), bs_status_name(st),
              st == BS_OK ? "" : err.message, msg_part);
    if (st != BS_OK)
        CHECK_MSG(strstr(err.message, msg_part) != NULL, "message '%s' lacks '%s'",
                  err.message, msg_part);
    free(b);
}

static uint8_t *dir_entry(uint8_t *b, uint32_t p) {
    return b + bs_load_u64(b + BS_HDR_DIRECTORY) + (size_t)p * BS_SEG_DIR_ENTRY;
}
/* The first partition with at least two rows. */
static uint32_t busy_partition(uint8_t *b) {
    uint32_t k = bs_load_u32(b + BS_HDR_NUM_PARTITIONS);
    for (uint32_t p = 0; p < k; p++)
        if (bs_load_u32(dir_entry(b, p) + 16) >= 2) return p;
    return 0;
}
static void part_layout(uint8_t *b, uint32_t p, uint8_t **base,
                        bs_part_layout *L) {
    uint8_t *e = dir_entry(b, p);
    *base = b + bs_load_u64(e);
    bs_part_layout_compute(bs_load_u32(e + 16), bs_load_u32(b + BS_HDR_PADDED_DIM),
                           bs_load_u32(b + BS_HDR_NUM_BITS), L);
}

static void e_flags(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_FLAGS, 4); }
static void e_metric(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_METRIC, 3); }
static void e_bits(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_NUM_BITS, 10); }
static void e_kind(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_ROTATION_KIND, 2); }
static void e_read_version(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_READ_VERSION, 4); }
/* What a format-1 writer left: both versions 1. */
static void e_v1_writer(uint8_t *b, size_t n) {
    bs_store_u32(b + BS_HDR_READ_VERSION, 1);
    bs_store_u32(b + BS_HDR_WRITE_VERSION, 1);
}
static void e_seed(uint8_t *b, size_t n) {
    bs_store_u64(b + BS_HDR_ROTATION_SEED, 99);
}
static void e_padded(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_PADDED_DIM, 192); }
static void e_centroid(uint8_t *b, size_t n) {
    uint64_t off = bs_load_u64(b + BS_HDR_ARTIFACTS);
    float f = bs_load_f32(b + off) + 1.0f;
    memcpy(b + off, &f, 4);
}
static void e_centroid_nan(uint8_t *b, size_t n) {
    uint64_t off = bs_load_u64(b + BS_HDR_ARTIFACTS);
    float f = NAN;
    memcpy(b + off + 8, &f, 4);
}
static void e_dup_fragment(uint8_t *b, size_t n) {
    uint64_t off = bs_load_u64(b + BS_HDR_FRAGMENTS);
    memcpy(b + off + BS_SEG_FRAGMENT_ENTRY, b + off, 8);
}
static void e_big_fragment_id(uint8_t *b, size_t n) {
    uint64_t off = bs_load_u64(b + BS_HDR_FRAGMENTS);
    bs_store_u64(b + off, 1ull << 32);
}
static void e_fragment_rows_overflow(uint8_t *b, size_t n) {
    uint64_t off = bs_load_u64(b + BS_HDR_FRAGMENTS);
    bs_store_u64(b + off + 8, 0xFFFFFFFFull);
}
static void e_ordinal_range(uint8_t *b, size_t n) {
    uint8_t *base;
    bs_part_layout L;
    uint32_t p = busy_partition(b);
    part_layout(b, p, &base, &L);
    uint32_t cnt = bs_load_u32(dir_entry(b, p) + 16);
    bs_store_u32(base + L.ordinals + (cnt - 1) * 4, 100000);
}
static void e_ordinal_order(uint8_t *b, size_t n) {
    uint8_t *base;
    bs_part_layout L;
    part_layout(b, busy_partition(b), &base, &L);
    uint32_t o0 = bs_load_u32(base + L.ordinals), o1 = bs_load_u32(base + L.ordinals + 4);
    bs_store_u32(base + L.ordinals, o1);
    bs_store_u32(base + L.ordinals + 4, o0);
}
static void e_ordinal_dup_across(uint8_t *b, size_t n) {
    /* Some partition q's last ordinal becomes one of partition p's, keeping
     * q's ordinals increasing, so only the cross-partition check fires. */
    uint32_t k = bs_load_u32(b + BS_HDR_NUM_PARTITIONS);
    uint32_t p = busy_partition(b);
    uint8_t *bp;
    bs_part_layout Lp;
    part_layout(b, p, &bp, &Lp);
    uint32_t np = bs_load_u32(dir_entry(b, p) + 16);
    for (uint32_t q = 0; q < k; q++) {
        uint32_t nq = bs_load_u32(dir_entry(b, q) + 16);
        if (q == p || nq == 0) continue;
        uint8_t *bq;
        bs_part_layout Lq;
        part_layout(b, q, &bq, &Lq);
        uint32_t prev = nq >= 2 ? bs_load_u32(bq + Lq.ordinals + (nq - 2) * 4) : 0;
        for (uint32_t i = 0; i < np; i++) {
            uint32_t o = bs_load_u32(bp + Lp.ordinals + i * 4);
            if (nq == 1 || o > prev) {
                bs_store_u32(bq + Lq.ordinals + (nq - 1) * 4, o);
                return;
            }
        }
    }
}
/* Offset of row i's norm2 (s1: + 128, corr: + 256) in a block. */
static size_t norm2_at(const uint8_t *b, const bs_part_layout *L, size_t i) {
    return (i / 32) * L->stride + 4 * (size_t)bs_load_u32(b + BS_HDR_PADDED_DIM) + 4 * (i % 32);
}
/* Writes f over row i's factor at byte delta from its norm2 (0 norm2, 128
 * s1, 256 corr) in the busiest partition. */
static void set_factor(uint8_t *b, size_t i, size_t delta, float f) {
    uint8_t *base;
    bs_part_layout L;
    part_layout(b, busy_partition(b), &base, &L);
    memcpy(base + norm2_at(b, &L, i) + delta, &f, 4);
}
static void e_factor_nan(uint8_t *b, size_t n) { set_factor(b, 1, 128, NAN); }
static void e_corr_inf(uint8_t *b, size_t n) { set_factor(b, 1, 256, INFINITY); }
static void e_norm_negative(uint8_t *b, size_t n) { set_factor(b, 0, 0, -1.0f); }
/* The first partition whose last block is partly filled: its bytes and
 * layout, and its row count (0, base and L unset, when every partition
 * fills its blocks). */
static uint32_t partial_partition(uint8_t *b, uint8_t **base, bs_part_layout *L) {
    uint32_t k = bs_load_u32(b + BS_HDR_NUM_PARTITIONS);
    for (uint32_t p = 0; p < k; p++) {
        uint32_t cnt = bs_load_u32(dir_entry(b, p) + 16);
        if (cnt % 32 == 0) continue;
        part_layout(b, p, base, L);
        return cnt;
    }
    return 0;
}
/* A factor slot past the last row of a partially filled block. */
static void e_factor_padding(uint8_t *b, size_t n) {
    uint8_t *base;
    bs_part_layout L;
    uint32_t cnt = partial_partition(b, &base, &L);
    if (cnt == 0) return;
    float f = 1.0f;
    memcpy(base + norm2_at(b, &L, cnt) + 256, &f, 4);
}
static void e_stage1_size(uint8_t *b, size_t n) {
    uint8_t *e = dir_entry(b, busy_partition(b));
    bs_store_u64(e + BS_DIR_STAGE1_SIZE, bs_load_u64(e + BS_DIR_STAGE1_SIZE) + 64);
}
static void e_dir_reserved2(uint8_t *b, size_t n) { dir_entry(b, 0)[BS_DIR_RESERVED2 + 3] = 1; }
static void e_count_plus(uint8_t *b, size_t n) {
    uint8_t *e = dir_entry(b, busy_partition(b));
    bs_store_u32(e + 16, bs_load_u32(e + 16) + 1);
}
static void e_block_padding(uint8_t *b, size_t n) {
    /* The last slot (31) of the last block of a partition that does not
     * fill it: high nibble of byte 15 of group 0. */
    uint8_t *base;
    bs_part_layout L;
    uint32_t cnt = partial_partition(b, &base, &L);
    if (cnt == 0) return;
    base[(size_t)(cnt / 32) * L.stride + 15] |= 0x80;
}
static void e_num_rows(uint8_t *b, size_t n) {
    bs_store_u64(b + BS_HDR_NUM_ROWS, bs_load_u64(b + BS_HDR_NUM_ROWS) + 1);
}
static void e_count_and_rows(uint8_t *b, size_t n) {
    e_count_plus(b, n);
    e_num_rows(b, n);
}
static void e_dir_reserved(uint8_t *b, size_t n) { bs_store_u32(dir_entry(b, 0) + 20, 1); }
static void e_part_offset(uint8_t *b, size_t n) {
    uint8_t *e = dir_entry(b, 1);
    bs_store_u64(e, bs_load_u64(e) + 64);
}
static void e_artifacts_offset(uint8_t *b, size_t n) {
    bs_store_u64(b + BS_HDR_ARTIFACTS, bs_load_u64(b + BS_HDR_ARTIFACTS) + 64);
}
static void e_fragments_size(uint8_t *b, size_t n) {
    bs_store_u64(b + BS_HDR_FRAGMENTS + 8, 1ull << 62);
}
static void e_column_nul(uint8_t *b, size_t n) { b[BS_HDR_COLUMN + 1] = 0; }
static void e_column_utf8(uint8_t *b, size_t n) { b[BS_HDR_COLUMN] = 0xC0; }
static void e_column_len(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_COLUMN_LEN, 2000); }
static void e_header_pad(uint8_t *b, size_t n) { b[BS_HDR_COLUMN + 10] = 1; }
static void e_header_size(uint8_t *b, size_t n) {
    /* Keep the old checksum position valid, announce a bigger header. */
    bs_store_u32(b + BS_HDR_HEADER_SIZE, 320);
}
static void e_dim_zero(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_DIM, 0); }
static void e_k_zero(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_NUM_PARTITIONS, 0); }
static void e_write_older(uint8_t *b, size_t n) { bs_store_u32(b + BS_HDR_WRITE_VERSION, 0); }
/* newlen = len + 64: trailing bytes announced by file_size. */
static void e_trailing_known(uint8_t *b, size_t n) { bs_store_u64(b + BS_HDR_FILE_SIZE, n); }
static void e_trailing_newer(uint8_t *b, size_t n) {
    bs_store_u64(b + BS_HDR_FILE_SIZE, n);
    bs_store_u32(b + BS_HDR_WRITE_VERSION, 4);
    memset(b + n - 64, 0x5a, 64);
}
static void e_nothing(uint8_t *b, size_t n) {}

static void test_corruption(void) {
    /* Small, with ext codes and several blocks. */
    dataset ds = make_data(64, 4, 90, 77);
    uint64_t ids[2] = {5, 9};
    uint64_t rows[2] = {60, 30};
    bs_error err;
    const char *path = tpath("small.bsseg");
    CHECK(build_range(&ds, 3, BS_METRIC_L2, BS_ROTATION_FAST, ids, rows, 0, 2,
                      16, 0, UUID_A, path, &err) == BS_OK);
    size_t len = 0;
    uint8_t *orig = test_read_file(path, &len);
    CHECK(orig != NULL && len > 0);
    if (orig == NULL) return;
    CHECK(open_bytes(orig, len, &err) == BS_OK);

    /* The worked examples of docs/format.md (format 3, and format 2's). */
    bs_part_layout ex;
    CHECK(bs_part_layout_compute(40, 128, 3, &ex));
    CHECK(ex.nblocks == 2 && ex.stride == 896 && ex.ordinals == 1792 &&
          ex.stage1_size == 1984 && ex.ext == 1984 && ex.s_full == 3264 && ex.size == 3456);
    CHECK(bs_part_layout_compute(40, 128, 1, &ex) && ex.size == 1984 && ex.stage1_size == 1984);
    CHECK(bs_part_layout_compute(0, 64, 1, &ex) && ex.size == 0);
    CHECK(!bs_part_layout_compute(UINT64_MAX / 8, 8192, 9, &ex));
    bs_part_layout_v2 ex2;
    CHECK(bs_part_layout_v2_compute(40, 128, 3, &ex2));
    CHECK(ex2.blocks == 0 && ex2.norm2 == 1024 && ex2.s1 == 1216 && ex2.ordinals == 1408 &&
          ex2.ext == 1600 && ex2.s_full == 2880 && ex2.size == 3072);
    CHECK(bs_part_layout_v2_compute(0, 64, 1, &ex2) && ex2.size == 0);
    CHECK(!bs_part_layout_v2_compute(UINT64_MAX / 8, 8192, 9, &ex2));
    CHECK(bs_seg_header_size(1) == 256 && bs_seg_header_size(1024) == 1280);

    /* Every truncation. */
    int bad = 0;
    for (size_t n = 0; n < len; n++) {
        bs_status st = open_bytes(orig, n, &err);
        if (st != BS_ERR_CORRUPT) {
            if (bad++ < 5)
                fprintf(stderr, "truncated to %zu: %s\n", n, bs_status_name(st));
        }
        if (n == len - 1 || n == 100)
            CHECK_MSG(strstr(err.message, "file truncated") != NULL, "%s",
                      err.message);
    }
    CHECK(bad == 0);

    /* Every single-byte change, two ways. */
    bad = 0;
    uint8_t *b = malloc(len);
    for (size_t i = 0; i < len; i++) {
        for (int m = 0; m < 2; m++) {
            memcpy(b, orig, len);
            b[i] ^= m ? 0xFF : 0x01;
            bs_status st = open_bytes(b, len, &err);
            int version_field = i >= BS_HDR_READ_VERSION && i < BS_HDR_READ_VERSION + 4;
            if (!(st == BS_ERR_CORRUPT ||
                  (version_field && st == BS_ERR_UNSUPPORTED_VERSION))) {
                if (bad++ < 5)
                    fprintf(stderr, "flip at %zu: %s\n", i, bs_status_name(st));
            }
        }
    }
    CHECK(bad == 0);
    free(b);

    /* Consistent checksums, broken meaning. */
    expect_edit(orig, len, len, e_nothing, BS_OK, "");
    expect_edit(orig, len, len, e_flags, BS_ERR_CORRUPT, "reserved flag bits 0x4");
    expect_edit(orig, len, len, e_metric, BS_ERR_CORRUPT, "metric 3");
    expect_edit(orig, len, len, e_bits, BS_ERR_CORRUPT, "num_bits 10");
    expect_edit(orig, len, len, e_kind, BS_ERR_CORRUPT, "rotation kind 2");
    expect_edit(orig, len, len, e_read_version, BS_ERR_UNSUPPORTED_VERSION,
                "format version 4");
    /* Format 3 moved the factors into the stage-1 blocks: every file needs
     * a format-3 reader, and a format-1 file is refused with what to do. */
    CHECK(bs_load_u32(orig + BS_HDR_READ_VERSION) == 3);
    CHECK(bs_load_u32(orig + BS_HDR_WRITE_VERSION) == 3);
    expect_edit(orig, len, len, e_v1_writer, BS_ERR_UNSUPPORTED_VERSION,
                "format version 1");
    {
        const char *p9 = tpath("small9.bsseg");
        CHECK(build_range(&ds, 9, BS_METRIC_L2, BS_ROTATION_FAST, ids, rows, 0, 2, 16, 0,
                          UUID_A, p9, &err) == BS_OK);
        size_t len9 = 0;
        uint8_t *orig9 = test_read_file(p9, &len9);
        CHECK(orig9 != NULL);
        if (orig9 != NULL) {
            CHECK(bs_load_u32(orig9 + BS_HDR_READ_VERSION) == 3);
            expect_edit(orig9, len9, len9, e_nothing, BS_OK, "");
            expect_edit(orig9, len9, len9, e_v1_writer, BS_ERR_UNSUPPORTED_VERSION,
                        "rebuild the index");
            free(orig9);
        }
    }
    expect_edit(orig, len, len, e_write_older, BS_ERR_CORRUPT,
                "older than read version");
    expect_edit(orig, len, len, e_seed, BS_ERR_CORRUPT, "rotation fingerprint");
    expect_edit(orig, len, len, e_padded, BS_ERR_CORRUPT, "padded dimension 192");
    expect_edit(orig, len, len, e_dim_zero, BS_ERR_CORRUPT, "dimension is 0");
    expect_edit(orig, len, len, e_k_zero, BS_ERR_CORRUPT, "num_partitions is 0");
    expect_edit(orig, len, len, e_centroid, BS_ERR_CORRUPT, "IVF fingerprint");
    expect_edit(orig, len, len, e_centroid_nan, BS_ERR_CORRUPT,
                "centroid 0 has a non-finite value at dimension 2");
    expect_edit(orig, len, len, e_dup_fragment, BS_ERR_CORRUPT,
                "fragment 5 appears twice");
    expect_edit(orig, len, len, e_big_fragment_id, BS_ERR_CORRUPT,
                "does not fit in 32 bits");
    expect_edit(orig, len, len, e_fragment_rows_overflow, BS_ERR_CORRUPT,
                "exceed 2^32 - 1");
    expect_edit(orig, len, len, e_ordinal_range, BS_ERR_CORRUPT,
                "ordinal 100000 is past the 90 rows");
    expect_edit(orig, len, len, e_ordinal_order, BS_ERR_CORRUPT,
                "not strictly increasing");
    expect_edit(orig, len, len, e_ordinal_dup_across, BS_ERR_CORRUPT,
                "appears in more than one partition");
    expect_edit(orig, len, len, e_factor_nan, BS_ERR_CORRUPT, "invalid factors");
    expect_edit(orig, len, len, e_norm_negative, BS_ERR_CORRUPT, "invalid factors");
    expect_edit(orig, len, len, e_corr_inf, BS_ERR_CORRUPT, "invalid factors");
    expect_edit(orig, len, len, e_factor_padding, BS_ERR_CORRUPT, "factor slots past row");
    expect_edit(orig, len, len, e_stage1_size, BS_ERR_CORRUPT, "stage-1 region is");
    expect_edit(orig, len, len, e_dir_reserved2, BS_ERR_CORRUPT, "reserved directory byte 51");
    expect_edit(orig, len, len, e_count_plus, BS_ERR_CORRUPT, "partition ");
    expect_edit(orig, len, len, e_count_and_rows, BS_ERR_CORRUPT, "partition");
    expect_edit(orig, len, len, e_block_padding, BS_ERR_CORRUPT,
                "FastScan padding past row");
    expect_edit(orig, len, len, e_num_rows, BS_ERR_CORRUPT, "the header says");
    expect_edit(orig, len, len, e_dir_reserved, BS_ERR_CORRUPT, "reserved directory");
    expect_edit(orig, len, len, e_part_offset, BS_ERR_CORRUPT, "partition 1 at offset");
    expect_edit(orig, len, len, e_artifacts_offset, BS_ERR_CORRUPT,
                "artifacts section at offset");
    expect_edit(orig, len, len, e_fragments_size, BS_ERR_CORRUPT,
                "fragment table section is");
    expect_edit(orig, len, len, e_column_nul, BS_ERR_CORRUPT, "UTF-8");
    expect_edit(orig, len, len, e_column_utf8, BS_ERR_CORRUPT, "UTF-8");
    expect_edit(orig, len, len, e_column_len, BS_ERR_CORRUPT, "column name length 2000");
    expect_edit(orig, len, len, e_header_pad, BS_ERR_CORRUPT, "header padding");
    expect_edit(orig, len, len, e_header_size, BS_ERR_CORRUPT, "header");
    expect_edit(orig, len, len + 64, e_trailing_known, BS_ERR_CORRUPT,
                "partitions end at offset");
    /* A newer writer's extension after the last partition is ignored. */
    expect_edit(orig, len, len + 64, e_trailing_newer, BS_OK, "");

    /* Extra bytes the header does not announce. */
    uint8_t *longer = calloc(1, len + 64);
    memcpy(longer, orig, len);
    CHECK(open_bytes(longer, len + 64, &err) == BS_ERR_CORRUPT);
    CHECK(strstr(err.message, "unexpected bytes") != NULL);
    free(longer);

    /* Header checksum named; partition checksum named. */
    b = malloc(len);
    memcpy(b, orig, len);
    b[BS_HDR_DIM] ^= 1;
    CHECK(open_bytes(b, len, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, "header checksum mismatch"), "%s", err.message);
    memcpy(b, orig, len);
    b[len - 1] ^= 1;
    CHECK(open_bytes(b, len, &err) == BS_ERR_CORRUPT);
    CHECK_MSG(starts_with(err.message, "partition 3 checksum mismatch"), "%s",
              err.message);
    memcpy(b, orig, len);
    b[0] = 'X';
    CHECK(open_bytes(b, len, &err) == BS_ERR_CORRUPT);
    CHECK(strstr(err.message, "bad magic") != NULL);
    free(b);

    /* Alignment and NULL. */
    uint8_t *mis = NULL;
    CHECK(posix_memalign((void **)&mis, 64, len + 64) == 0);
    memcpy(mis + 8, orig, len);
    bs_segment *s = (bs_segment *)1;
    CHECK(bs_segment_open(mis + 8, len, &s, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "segment buffer must be 64-byte aligned") == 0);
    CHECK(s == NULL);
    free(mis);
    CHECK(bs_segment_open(NULL, 0, &s, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_segment_open(orig, len, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    bs_segment_free(NULL);

    free(orig);
    free_data(&ds);
}

/* ------------------------------------------------------------ merge */

static void test_merge(uint32_t d, uint32_t bits, bs_metric metric,
                       bs_rotation_kind kind) {
    dataset ds = make_data(d, 6, 900, 555 + d * 3 + bits);
    uint64_t ids[7] = {11, 4, 99, 12, 13, 0, 5};
    uint64_t rows[7] = {130, 170, 0, 200, 150, 100, 150};
    bs_error err;
    /* a: fragments 0-1, b: 2-3 (one empty), c: 4-6; single builds of a+b
     * and a+b+c. */
    const char *pa = tpath("ma.bsseg"), *pb = tpath("mb.bsseg"),
               *pc = tpath("mc.bsseg");
    const char *pab = tpath("mab.bsseg"), *pabc = tpath("mabc.bsseg");
    CHECK(build_range(&ds, bits, metric, kind, ids, rows, 0, 2, 64, 0, UUID_B,
                      pa, &err) == BS_OK);
    CHECK(build_range(&ds, bits, metric, kind, ids, rows, 2, 4, 33, 1, UUID_B,
                      pb, &err) == BS_OK);
    CHECK(build_range(&ds, bits, metric, kind, ids, rows, 4, 7, 1000, 0,
                      UUID_B, pc, &err) == BS_OK);
    CHECK(build_range(&ds, bits, metric, kind, ids, rows, 0, 4, 50, 1, UUID_A,
                      pab, &err) == BS_OK);
    CHECK(build_range(&ds, bits, metric, kind, ids, rows, 0, 7, 128, 0, UUID_A,
                      pabc, &err) == BS_OK);

    test_loaded a, b, c;
    CHECK(test_load(pa, &a, &err) == BS_OK);
    CHECK(test_load(pb, &b, &err) == BS_OK);
    CHECK(test_load(pc, &c, &err) == BS_OK);
    if (!a.seg || !b.seg || !c.seg) return;

    const char *m2 = tpath("m2.bsseg"), *m3 = tpath("m3.bsseg");
    const bs_segment *in2[2] = {a.seg, b.seg};
    CHECK_MSG(bs_segment_merge(in2, 2, UUID_A, m2, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(test_files_equal(m2, pab), "merge(a,b) != build(a+b) d=%u bits=%u", d, bits);
    const bs_segment *in3[3] = {a.seg, b.seg, c.seg};
    CHECK_MSG(bs_segment_merge(in3, 3, UUID_A, m3, &err) == BS_OK, "%s", err.message);
    CHECK_MSG(test_files_equal(m3, pabc), "merge(a,b,c) != build(a+b+c) d=%u bits=%u", d,
              bits);

    /* Associativity both ways. */
    test_loaded ab, bc;
    CHECK(test_load(m2, &ab, &err) == BS_OK);
    const char *mbc = tpath("mbc.bsseg");
    CHECK(bs_segment_merge((const bs_segment *const[]){b.seg, c.seg}, 2, UUID_B,
                           mbc, &err) == BS_OK);
    CHECK(test_load(mbc, &bc, &err) == BS_OK);
    const char *l3 = tpath("left3.bsseg"), *r3 = tpath("right3.bsseg");
    CHECK(bs_segment_merge((const bs_segment *const[]){ab.seg, c.seg}, 2,
                           UUID_A, l3, &err) == BS_OK);
    CHECK(bs_segment_merge((const bs_segment *const[]){a.seg, bc.seg}, 2,
                           UUID_A, r3, &err) == BS_OK);
    CHECK(test_files_equal(l3, m3));
    CHECK(test_files_equal(r3, m3));

    /* A merged segment reads back with every row. */
    test_loaded all;
    CHECK(test_load(m3, &all, &err) == BS_OK);
    if (all.seg) {
        bs_segment_info info;
        bs_segment_get_info(all.seg, &info);
        CHECK(info.num_rows == 900);
        CHECK(info.num_fragments == 7);
        /* The identities travel with their fragments through the merges. */
        for (uint32_t f = 0; f < 7; f++) {
            uint8_t got[16], want[16];
            bs_segment_fragment_identity(all.seg, f, got);
            ident_of(ids[f], want);
            CHECK_MSG(memcmp(got, want, 16) == 0, "fragment %u identity", f);
        }
        uint8_t none[16], zero[16] = {0};
        bs_segment_fragment_identity(all.seg, 7, none);
        CHECK(memcmp(none, zero, 16) == 0);
        check_contents(all.seg, &ds, ids, rows, 7, bits, metric, kind);
    }

    /* Merging one segment rewrites it under a new uuid. */
    const char *m1 = tpath("m1.bsseg");
    CHECK(bs_segment_merge((const bs_segment *const[]){all.seg}, 1, UUID_A, m1,
                           &err) == BS_OK);
    CHECK(test_files_equal(m1, pabc));

    /* Overlapping fragments. */
    CHECK(bs_segment_merge((const bs_segment *const[]){a.seg, b.seg, a.seg}, 3,
                           UUID_A, m1, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "fragment 4 is in segments 0 and 2") == 0, "%s",
              err.message);
    CHECK(bs_segment_merge((const bs_segment *const[]){b.seg, ab.seg}, 2, UUID_A,
                           m1, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "fragment 12 is in segments 0 and 1") == 0, "%s",
              err.message);
    /* Output file untouched by the refused merges. */
    CHECK(test_files_equal(m1, pabc));

    CHECK(bs_segment_merge(in2, 2, UUID_A, "/nonexistent-dir/m.bsseg", &err) ==
          BS_ERR_IO);
    CHECK_MSG(strstr(err.message, "/nonexistent-dir/m.bsseg.tmp") != NULL, "%s",
              err.message);
    CHECK(bs_segment_merge(NULL, 0, UUID_A, m1, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_segment_merge(in2, 2, NULL, m1, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_segment_merge(in2, 2, UUID_A, NULL, &err) == BS_ERR_INVALID_ARGUMENT);

    test_unload(&a);
    test_unload(&b);
    test_unload(&c);
    test_unload(&ab);
    test_unload(&bc);
    test_unload(&all);
    free_data(&ds);
}

/* ------------------------------------------------------- mismatch */

static bs_status build_small(const dataset *ds, const bs_segment_spec *s,
                             const char *path, bs_error *err) {
    bs_segment_builder *b = NULL;
    bs_status st = bs_builder_create(s, &b, err);
    if (st != BS_OK) return st;
    uint32_t offs[10];
    for (uint32_t i = 0; i < 10; i++) offs[i] = i;
    st = bs_builder_add(b, ds->x, 10, 0, offs, err);
    if (st == BS_OK) st = bs_builder_write(b, path, err);
    bs_builder_free(b);
    return st;
}

static void expect_mismatch(const dataset *ds, const bs_segment_spec *sa,
                            const bs_segment_spec *sb, const dataset *dsb,
                            const char *want) {
    bs_error err;
    const char *pa = tpath("mm_a.bsseg"), *pb = tpath("mm_b.bsseg");
    CHECK(build_small(ds, sa, pa, &err) == BS_OK);
    CHECK_MSG(build_small(dsb, sb, pb, &err) == BS_OK, "%s", err.message);
    test_loaded a, b;
    CHECK(test_load(pa, &a, &err) == BS_OK);
    CHECK(test_load(pb, &b, &err) == BS_OK);
    if (a.seg && b.seg) {
        CHECK(bs_segment_check_compatible(a.seg, b.seg, &err) ==
              BS_ERR_ARTIFACT_MISMATCH);
        CHECK_MSG(starts_with(err.message, want), "'%s' does not start with '%s'",
                  err.message, want);
        const bs_segment *in[3] = {a.seg, a.seg, b.seg};
        CHECK(bs_segment_merge(in, 3, UUID_A, tpath("mm_out.bsseg"), &err) ==
              BS_ERR_ARTIFACT_MISMATCH);
        char full[600];
        snprintf(full, sizeof full, "cannot merge segment 2: %s", want);
        CHECK_MSG(starts_with(err.message, full), "'%s' does not start with '%s'",
                  err.message, full);
    }
    test_unload(&a);
    test_unload(&b);
}

static void test_mismatch(void) {
    dataset ds = make_data(64, 4, 10, 3);
    dataset ds100 = make_data(100, 4, 10, 3);
    uint64_t ida[1] = {1}, idb[1] = {2}, rows[1] = {10};
    bs_segment_spec a = base_spec(&ds, 1, BS_METRIC_L2, BS_ROTATION_FAST, ida, rows, 1);
    bs_segment_spec b = base_spec(&ds, 1, BS_METRIC_L2, BS_ROTATION_FAST, idb, rows, 1);
    bs_error err;
    const char *pa = tpath("mm_a.bsseg"), *pb = tpath("mm_b.bsseg");

    /* Compatible: no error. */
    CHECK(build_small(&ds, &a, pa, &err) == BS_OK);
    CHECK(build_small(&ds, &b, pb, &err) == BS_OK);
    test_loaded la, lb;
    CHECK(test_load(pa, &la, &err) == BS_OK);
    CHECK(test_load(pb, &lb, &err) == BS_OK);
    CHECK(bs_segment_check_compatible(la.seg, lb.seg, &err) == BS_OK);
    bs_segment_info ia;
    bs_segment_get_info(la.seg, &ia);
    char rfa[33], ifa[33];
    bs_seg_fingerprint_hex(&ia.rotation_fingerprint, rfa);
    bs_seg_fingerprint_hex(&ia.ivf_fingerprint, ifa);
    test_unload(&la);
    test_unload(&lb);

    bs_segment_spec s = b;
    s.dim = 100;
    s.centroids = ds100.centroids;
    expect_mismatch(&ds, &a, &s, &ds100, "dimension differs: 64 vs 100");
    s = b;
    s.column = "emb";
    expect_mismatch(&ds, &a, &s, &ds, "column differs: \"vec\" vs \"emb\"");
    s = b;
    s.metric = BS_METRIC_COSINE;
    expect_mismatch(&ds, &a, &s, &ds, "metric differs: l2 vs cosine");
    s = b;
    s.metric = BS_METRIC_DOT;
    expect_mismatch(&ds, &a, &s, &ds, "metric differs: l2 vs dot");
    s = b;
    s.num_bits = 3;
    expect_mismatch(&ds, &a, &s, &ds, "num_bits differs: 1 vs 3");

    s = b;
    s.rotation_seed = 999;
    bs_rotation *rot = NULL;
    bs_rotation_create(BS_ROTATION_FAST, 64, 999, &rot, NULL);
    bs_fingerprint fp = bs_rotation_fingerprint(rot);
    bs_rotation_free(rot);
    char hex[33], want[200];
    bs_seg_fingerprint_hex(&fp, hex);
    snprintf(want, sizeof want, "rotation differs: %s vs %s", rfa, hex);
    CHECK(strlen(want) == strlen("rotation differs:  vs ") + 64);
    expect_mismatch(&ds, &a, &s, &ds, want);
    s = b;
    s.rotation_kind = BS_ROTATION_MATRIX;
    expect_mismatch(&ds, &a, &s, &ds, "rotation differs: ");

    float *c2 = malloc(4 * 64 * 4);
    memcpy(c2, ds.centroids, 4 * 64 * 4);
    c2[5] += 0.5f;
    s = b;
    s.centroids = c2;
    fp = bs_ivf_fingerprint(c2, 4, 64, BS_METRIC_L2);
    bs_seg_fingerprint_hex(&fp, hex);
    snprintf(want, sizeof want, "centroids differs: %s vs %s", ifa, hex);
    expect_mismatch(&ds, &a, &s, &ds, want);
    s = b;
    s.num_partitions = 3;
    expect_mismatch(&ds, &a, &s, &ds, "centroids differs: ");
    free(c2);

    /* Order: dimension is reported before column. */
    s = b;
    s.dim = 100;
    s.centroids = ds100.centroids;
    s.column = "other";
    expect_mismatch(&ds, &a, &s, &ds100, "dimension differs");
    free_data(&ds);
    free_data(&ds100);
}

/* ------------------------------------------------- builder arguments */

static void expect_create(const bs_segment_spec *s, bs_status want,
                          const char *msg_part) {
    bs_error err;
    bs_segment_builder *b = (bs_segment_builder *)1;
    bs_status st = bs_builder_create(s, &b, &err);
    CHECK_MSG(st == want, "want %s got %s (%s)", bs_status_name(want),
              bs_status_name(st), err.message);
    if (st != BS_OK) {
        CHECK(b == NULL);
        CHECK_MSG(strstr(err.message, msg_part) != NULL, "'%s' lacks '%s'",
                  err.message, msg_part);
    }
    bs_builder_free(st == BS_OK ? b : NULL);
}

static void test_builder_args(void) {
    dataset ds = make_data(16, 3, 40, 9);
    uint64_t ids[3] = {1, 2, 3}, rows[3] = {20, 20, 0};
    bs_segment_spec s0 = base_spec(&ds, 2, BS_METRIC_L2, BS_ROTATION_FAST, ids, rows, 3);
    bs_segment_spec s;
    bs_error err;
    expect_create(&s0, BS_OK, "");
    s = s0; s.dim = 0; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "dim must be >= 1, got 0");
    s = s0; s.num_bits = 0; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "num_bits must be in 1..9, got 0");
    s = s0; s.num_bits = 12; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "got 12");
    s = s0; s.metric = (bs_metric)7; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "metric");
    s = s0; s.rotation_kind = (bs_rotation_kind)5; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "rotation_kind");
    s = s0; s.num_partitions = 0; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "num_partitions must be >= 1");
    s = s0; s.centroids = NULL; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "centroids is NULL");
    float *c = malloc(3 * 16 * 4);
    memcpy(c, ds.centroids, 3 * 16 * 4);
    c[20] = INFINITY;
    s = s0; s.centroids = c; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "partition 1, dimension 4");
    c[20] = -5e20f;
    s = s0; s.centroids = c;
    expect_create(&s, BS_ERR_INVALID_ARGUMENT,
                  "centroids has a value too large (-5e+20) at partition 1, dimension 4 "
                  "(accepted: finite, |value| <= 2**40 = 1099511627776.0)");
    c[20] = (float)-BS_MAX_ABS_VALUE;
    s = s0; s.centroids = c; expect_create(&s, BS_OK, "");
    free(c);
    s = s0; s.column = NULL; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "column is NULL");
    s = s0; s.column = ""; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "column must not be empty");
    char big[1100];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    s = s0; s.column = big; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "1099 bytes");
    big[1024] = 0;
    s = s0; s.column = big; expect_create(&s, BS_OK, "");
    s = s0; s.column = "\xff"; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "UTF-8");
    s = s0; s.column = "v\xc3\xa9" "c"; expect_create(&s, BS_OK, "");
    s = s0; s.uuid = NULL; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "uuid is NULL");
    s = s0; s.fragment_ids = NULL; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "NULL");
    uint64_t dup[3] = {1, 2, 1};
    s = s0; s.fragment_ids = dup; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "fragment id 1 appears more than once");
    uint64_t bigid[3] = {1, 2, 1ull << 32};
    s = s0; s.fragment_ids = bigid; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "does not fit in 32 bits");
    uint64_t many[3] = {0x80000000ull, 0x80000000ull, 0};
    s = s0; s.fragment_rows = many; expect_create(&s, BS_ERR_INVALID_ARGUMENT, "2^32 - 1 rows");
    expect_create(NULL, BS_ERR_INVALID_ARGUMENT, "spec is NULL");
    CHECK(bs_builder_create(&s0, NULL, &err) == BS_ERR_INVALID_ARGUMENT);

    /* add() errors leave the builder unchanged. */
    bs_segment_builder *b = NULL;
    CHECK(bs_builder_create(&s0, &b, &err) == BS_OK);
    uint32_t offs[4] = {0, 1, 2, 3};
    float x[4 * 16];
    memcpy(x, ds.x, sizeof x);
    x[2 * 16 + 3] = NAN;
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strcmp(err.message, "row 2 (fragment 2, offset 2) has a non-finite "
                                  "value at dimension 3") == 0,
              "%s", err.message);
    x[2 * 16 + 3] = -INFINITY;
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_ERR_INVALID_DATA);
    /* The accepted-values rule: finite and |v| <= 2^40, the bound itself
     * included; the next float up is refused, naming row, dimension and
     * value (a finite value whose square overflows float, 3e19, too). */
    memcpy(x, ds.x, sizeof x);
    x[1 * 16 + 5] = nextafterf((float)BS_MAX_ABS_VALUE, INFINITY);
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strcmp(err.message, "row 1 (fragment 2, offset 1) is too large: value "
                                  "1.09951e+12 at dimension 5 (accepted: finite, |value| "
                                  "<= 2**40 = 1099511627776.0)") == 0,
              "%s", err.message);
    x[1 * 16 + 5] = 3e19f;
    x[3 * 16 + 0] = NAN;
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strstr(err.message, "row 1 (fragment 2, offset 1) is too large: value 3e+19 at "
                                  "dimension 5") != NULL, "%s", err.message);
    x[1 * 16 + 5] = -3e19f;
    x[3 * 16 + 0] = 0.0f;
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_ERR_INVALID_DATA);
    CHECK_MSG(strstr(err.message, "value -3e+19 at dimension 5") != NULL, "%s", err.message);
    memcpy(x, ds.x, sizeof x);
    uint32_t bad_off[2] = {3, 20};
    CHECK(bs_builder_add(b, x, 2, 0, bad_off, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "offset 20 is out of range for fragment 1 with 20 rows"),
              "%s", err.message);
    CHECK(bs_builder_add(b, x, 1, 3, offs, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "fragment_index 3") != NULL);
    CHECK(bs_builder_add(b, x, 1, 2, offs, &err) == BS_ERR_INVALID_ARGUMENT); /* 0 rows */
    uint32_t dup_off[3] = {5, 6, 5};
    CHECK(bs_builder_add(b, x, 3, 0, dup_off, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "offset 5 was already added"), "%s", err.message);
    /* The refused calls added nothing: these succeed now. */
    CHECK(bs_builder_add(b, x, 4, 1, offs, &err) == BS_OK);
    CHECK(bs_builder_add(b, x, 2, 0, dup_off, &err) == BS_OK);
    CHECK(bs_builder_add(b, x, 1, 1, offs + 3, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "already added") != NULL);
    CHECK(bs_builder_add(b, x, 0, 1, NULL, &err) == BS_OK);
    CHECK(bs_builder_add(NULL, x, 1, 1, offs, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_builder_add(b, NULL, 1, 1, offs, &err) == BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_builder_add(b, x, 1, 1, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    /* A huge finite value cannot be encoded. */
    float hugev[16];
    for (int j = 0; j < 16; j++) hugev[j] = 3e38f;
    uint32_t o10 = 10;
    bs_status st = bs_builder_add(b, hugev, 1, 0, &o10, &err);
    CHECK(st == BS_ERR_INVALID_DATA);
    CHECK_MSG(strstr(err.message, "row 0 (fragment 1, offset 10) is too large") != NULL,
              "%s", err.message);
    /* That failure came after the offset was marked: it was unmarked. */
    CHECK(bs_builder_add(b, ds.x, 1, 0, &o10, &err) == BS_OK);

    {
        uint8_t fp[16] = {1};
        CHECK(bs_builder_set_fragment_identity(b, 77, fp, &err) == BS_ERR_INVALID_ARGUMENT);
        CHECK_MSG(strcmp(err.message, "fragment_id 77 is not one of the segment's 3 "
                                      "fragments") == 0,
                  "%s", err.message);
        CHECK(bs_builder_set_fragment_identity(b, 1, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
        CHECK(bs_builder_set_fragment_identity(NULL, 1, fp, &err) == BS_ERR_INVALID_ARGUMENT);
    }
    CHECK(bs_builder_write(b, "/nonexistent-dir/x/seg.bsseg", &err) == BS_ERR_IO);
    CHECK_MSG(strstr(err.message, "/nonexistent-dir/x/seg.bsseg.tmp") != NULL, "%s",
              err.message);
    CHECK(bs_builder_write(b, NULL, &err) == BS_ERR_INVALID_ARGUMENT);
    const char *p1 = tpath("args1.bsseg"), *p2 = tpath("args2.bsseg");
    CHECK(bs_builder_write(b, p1, &err) == BS_OK);
    /* Writing twice gives the same file. */
    CHECK(bs_builder_write(b, p2, &err) == BS_OK);
    CHECK(test_files_equal(p1, p2));
    test_loaded l;
    CHECK(test_load(p1, &l, &err) == BS_OK);
    if (l.seg) {
        bs_segment_info info;
        bs_segment_get_info(l.seg, &info);
        CHECK(info.num_rows == 7);
    }
    test_unload(&l);
    bs_builder_free(b);
    bs_builder_free(NULL);
    free_data(&ds);
}

/* ------------------------------------------------- degenerate inputs */

static void test_degenerate(void) {
    bs_error err;
    dataset ds = make_data(64, 4, 64, 21);
    /* Empty segments: no fragments; fragments of zero rows; rows not
     * added. */
    uint64_t ids[2] = {3, 4}, zero[2] = {0, 0}, some[2] = {10, 20};
    for (int variant = 0; variant < 3; variant++) {
        bs_segment_spec s = base_spec(&ds, variant + 1, BS_METRIC_L2,
                                      BS_ROTATION_FAST, ids,
                                      variant == 2 ? some : zero,
                                      variant == 0 ? 0 : 2);
        bs_segment_builder *b = NULL;
        CHECK(bs_builder_create(&s, &b, &err) == BS_OK);
        const char *p = tpath("empty.bsseg");
        CHECK(bs_builder_write(b, p, &err) == BS_OK);
        bs_builder_free(b);
        test_loaded l;
        CHECK_MSG(test_load(p, &l, &err) == BS_OK, "%s", err.message);
        if (l.seg) {
            bs_segment_info info;
            bs_segment_get_info(l.seg, &info);
            CHECK(info.num_rows == 0);
            CHECK(info.num_fragments == (variant == 0 ? 0u : 2u));
            for (uint32_t q = 0; q < 4; q++) {
                bs_partition_view v;
                bs_segment_partition(l.seg, q, &v);
                CHECK(v.count == 0);
            }
            CHECK(bs_segment_rowid(l.seg, 0) == (variant == 2 ? 3ull << 32 : UINT64_MAX));
            /* Merging empty segments with others works. */
            const bs_segment *in[2] = {l.seg, l.seg};
            if (variant == 0)
                CHECK(bs_segment_merge(in, 2, UUID_A, tpath("e2.bsseg"), &err) == BS_OK);
            /* Searching an empty segment finds nothing, again and again, with
             * every partition probed and k far above the row count. */
            bs_searcher *srch = NULL;
            CHECK(bs_searcher_create(in, 1, &srch, &err) == BS_OK);
            bs_candidates *c = bs_candidates_new();
            bs_search_params sp = test_search_params(1000, 4);
            for (int rep = 0; rep < 6 && srch; rep++) {
                sp.refine_factor = (uint32_t)(rep % 3);
                CHECK(bs_search(srch, ds.x, &sp, c, NULL, &err) == BS_OK);
                CHECK(bs_candidates_size(c) == 0 && bs_candidates_rowids(c) != NULL);
            }
            bs_candidates_free(c);
            bs_searcher_free(srch);
        }
        test_unload(&l);
    }

    /* One row in one partition; all-zero vectors; a row equal to its
     * centroid (r = 0: every factor 0). Centroid 0 is the origin. */
    float cent[4 * 64];
    memcpy(cent, ds.centroids, sizeof cent);
    for (int j = 0; j < 64; j++) cent[j] = 0.0f;
    for (int kind = 0; kind < 2; kind++) {
        for (uint32_t bits = 1; bits <= 9; bits += 4) {
            uint64_t fid[1] = {8}, frows[1] = {5};
            dataset d2 = ds;
            d2.centroids = cent;
            bs_segment_spec s = base_spec(&d2, bits, BS_METRIC_L2,
                                          (bs_rotation_kind)kind, fid, frows, 1);
            bs_segment_builder *b = NULL;
            CHECK(bs_builder_create(&s, &b, &err) == BS_OK);
            float x[5 * 64];
            memset(x, 0, sizeof x);                 /* rows 0, 1: zero */
            memcpy(x + 2 * 64, cent + 2 * 64, 256); /* row 2: centroid 2 */
            memcpy(x + 3 * 64, cent + 3 * 64, 256); /* row 3: near centroid 3 */
            x[3 * 64] += 0.25f;
            memcpy(x + 4 * 64, cent + 2 * 64, 256); /* row 4: centroid 2 too */
            uint32_t offs[5] = {0, 1, 2, 3, 4};
            CHECK(bs_builder_add(b, x, 5, 0, offs, &err) == BS_OK);
            const char *p = tpath("degen.bsseg");
            CHECK(bs_builder_write(b, p, &err) == BS_OK);
            bs_builder_free(b);
            test_loaded l;
            CHECK(test_load(p, &l, &err) == BS_OK);
            if (!l.seg) continue;
            bs_partition_view v0, v1, v2, v3;
            bs_segment_partition(l.seg, 0, &v0);
            bs_segment_partition(l.seg, 1, &v1);
            bs_segment_partition(l.seg, 2, &v2);
            bs_segment_partition(l.seg, 3, &v3);
            CHECK(v0.count == 2 && v1.count == 0 && v2.count == 2 && v3.count == 1);
            CHECK(v3.ordinals[0] == 3);
            CHECK(bs_segment_rowid(l.seg, v3.ordinals[0]) == ((8ull << 32) | 3));
            /* Zero rows at the zero centroid and rows equal to their
             * centroid: r = Po - Pc = 0 exactly, since a row is rotated
             * the same way as its centroid, and every factor is 0. */
            for (uint32_t i = 0; i < 2; i++) {
                const bs_partition_view *v = i ? &v2 : &v0;
                for (uint32_t j = 0; j < v->count; j++)
                    CHECK_MSG(bs_pv_norm2(v, j) == 0.0f && bs_pv_s1(v, j) == 0.0f &&
                                  bs_pv_s_full(v, j) == 0.0f,
                              "kind %d bits %u partition %u row %u", kind,
                              bits, i ? 2 : 0, j);
            }
            CHECK(v0.ordinals[0] == 0 && v0.ordinals[1] == 1);
            CHECK(v2.ordinals[0] == 2 && v2.ordinals[1] == 4);
            test_unload(&l);
        }
    }

    /* Cosine: zero rows stay zero (a zero residual against a zero
     * centroid would need one; just check they encode and open). */
    {
        uint64_t fid[1] = {1}, frows[1] = {3};
        bs_segment_spec s = base_spec(&ds, 2, BS_METRIC_COSINE,
                                      BS_ROTATION_FAST, fid, frows, 1);
        bs_segment_builder *b = NULL;
        CHECK(bs_builder_create(&s, &b, &err) == BS_OK);
        float x[3 * 64];
        memset(x, 0, sizeof x);
        for (int j = 0; j < 64; j++) x[64 + j] = (float)(j + 1) * 1000.0f;
        for (int j = 0; j < 64; j++) x[128 + j] = (float)(j + 1) * 0.001f;
        uint32_t offs[3] = {0, 1, 2};
        CHECK(bs_builder_add(b, x, 3, 0, offs, &err) == BS_OK);
        const char *p = tpath("cos.bsseg");
        CHECK(bs_builder_write(b, p, &err) == BS_OK);
        bs_builder_free(b);
        test_loaded l;
        CHECK(test_load(p, &l, &err) == BS_OK);
        if (l.seg) {
            /* Rows 1 and 2 point the same way: after normalisation they
             * are the same vector, so same partition, same code. */
            uint32_t part[3] = {9, 9, 9}, idx[3] = {0, 0, 0};
            for (uint32_t q = 0; q < 4; q++) {
                bs_partition_view v;
                bs_segment_partition(l.seg, q, &v);
                for (uint32_t i = 0; i < v.count; i++) {
                    part[v.ordinals[i]] = q;
                    idx[v.ordinals[i]] = i;
                }
            }
            CHECK(part[1] == part[2]);
            bs_partition_view v;
            bs_segment_partition(l.seg, part[1], &v);
            CHECK(fabsf(bs_pv_norm2(&v, idx[1]) - bs_pv_norm2(&v, idx[2])) <=
                  1e-5f * bs_pv_norm2(&v, idx[1]));
            /* The zero row is encoded against its centroid: |r| = |c|. */
            bs_segment_partition(l.seg, part[0], &v);
            double c2 = 0;
            for (int j = 0; j < 64; j++) {
                double cj = ds.centroids[(size_t)part[0] * 64 + j];
                c2 += cj * cj;
            }
            CHECK(fabs(bs_pv_norm2(&v, idx[0]) - c2) <= 1e-4 * c2);
        }
        test_unload(&l);
    }
    free_data(&ds);
}

/* Threads change no byte of the segment, and a failing add() on several
 * threads names the row one thread would name (the first bad one, here in
 * the second of four workers' shares, with another bad row in the last)
 * and leaves the builder as it was. */
static void test_builder_threads(void) {
    const uint32_t d = 32, n = 600;
    dataset ds = make_data(d, 6, n, 31337);
    uint64_t ids[1] = {7}, rows[1] = {n};
    const char *p1 = tpath("t1.bsseg"), *p4 = tpath("t4.bsseg");
    float *bad = malloc((size_t)n * d * sizeof(float));
    uint32_t *offs = malloc(n * sizeof(uint32_t));
    for (uint32_t i = 0; i < n; i++) offs[i] = i;
    for (uint32_t bits = 1; bits <= 9; bits += 4) {
        bs_segment_spec s = base_spec(&ds, bits, BS_METRIC_L2, BS_ROTATION_FAST, ids, rows, 1);
        for (int t = 0; t < 2; t++) {
            bs_segment_builder *b = NULL;
            bs_error err;
            CHECK(bs_builder_create(&s, &b, &err) == BS_OK);
            if (!b) continue;
            bs_builder_set_threads(b, t ? 4 : 1);
            memcpy(bad, ds.x, (size_t)n * d * sizeof(float));
            for (uint32_t j = 0; j < d; j++) bad[250 * d + j] = bad[500 * d + j] = 3e38f;
            CHECK(bs_builder_add(b, bad, n, 0, offs, &err) == BS_ERR_INVALID_DATA);
            CHECK_MSG(strstr(err.message, "row 250 (fragment 7, offset 250) is too large") !=
                          NULL,
                      "%u threads: %s", t ? 4u : 1u, err.message);
            CHECK(bs_builder_add(b, ds.x, n, 0, offs, &err) == BS_OK);
            CHECK(bs_builder_write(b, t ? p4 : p1, &err) == BS_OK);
            bs_builder_free(b);
        }
        CHECK_MSG(test_files_equal(p1, p4), "4 threads changed the segment (bits %u)", bits);
    }
    free(bad);
    free(offs);
    free_data(&ds);
}

/* ----------------------------------------------- lazy partition checks */

/* A format 3 segment opens without reading its partitions; a damaged
 * partition is refused when a search first touches it, naming the
 * segment and the partition, while searches that do not touch it go on;
 * bs_segment_verify finds it, and the whole-file rule (no ordinal in two
 * partitions) is verify's. */
static void test_lazy_partitions(void) {
    dataset ds = make_data(64, 4, 300, 4242);
    uint64_t ids[1] = {3}, rows[1] = {300};
    bs_error err;
    const char *path = tpath("lazy.bsseg");
    CHECK(build_range(&ds, 3, BS_METRIC_L2, BS_ROTATION_FAST, ids, rows, 0, 1, 64, 0,
                      UUID_A, path, &err) == BS_OK);
    size_t len = 0;
    uint8_t *orig = test_read_file(path, &len);
    if (orig == NULL) return;
    for (int region = 0; region < 2; region++) {
        uint8_t *b = test_aligned_copy(orig, len);
        uint32_t p = busy_partition(b);
        uint8_t *e = dir_entry(b, p);
        uint64_t off = bs_load_u64(e), s1 = bs_load_u64(e + BS_DIR_STAGE1_SIZE);
        b[off + (region ? s1 + 3 : 5)] ^= 0x40; /* a code byte, an extra-code byte */
        bs_segment *seg = NULL;
        CHECK_MSG(bs_segment_open(b, len, &seg, &err) == BS_OK, "%s", err.message);
        if (seg == NULL) {
            free(b);
            continue;
        }
        bs_searcher *srch = NULL;
        CHECK(bs_searcher_create((const bs_segment *const[]){seg}, 1, &srch, &err) == BS_OK);
        bs_candidates *c = bs_candidates_new();
        bs_search_params sp = test_search_params(5, 0);
        /* Probing only another partition's centroid: fine. */
        uint32_t other = p == 0 ? 1 : 0;
        sp.nprobes = 1;
        CHECK_MSG(bs_search(srch, ds.centroids + (size_t)other * 64, &sp, c, NULL, &err) ==
                      BS_OK,
                  "%s", err.message);
        /* Probing every partition touches p. */
        sp.nprobes = 4;
        char want[160];
        snprintf(want, sizeof want,
                 "segment 0102030405060708090a0b0c0d0e0f10: partition %u checksum mismatch "
                 "(%s region: stored",
                 p, region ? "extra" : "stage-1");
        for (int again = 0; again < 2; again++) {
            CHECK(bs_search(srch, ds.x, &sp, c, NULL, &err) == BS_ERR_CORRUPT);
            CHECK_MSG(starts_with(err.message, want), "%s", err.message);
        }
        CHECK(bs_segment_verify(seg, &err) == BS_ERR_CORRUPT);
        CHECK_MSG(starts_with(err.message, want + 42), "%s", err.message);
        bs_candidates_free(c);
        bs_searcher_free(srch);
        bs_segment_free(seg);
        free(b);
    }
    /* The same ordinal in two partitions, each partition valid on its own
     * (resealed): searches work, verify refuses the file, and merge (which
     * verifies its inputs) too. */
    {
        uint8_t *b = test_aligned_copy(orig, len);
        e_ordinal_dup_across(b, len);
        reseal(b, len);
        bs_segment *seg = NULL;
        CHECK_MSG(bs_segment_open(b, len, &seg, &err) == BS_OK, "%s", err.message);
        if (seg != NULL) {
            bs_segment_info info;
            bs_segment_get_info(seg, &info);
            for (uint32_t p = 0; p < info.num_partitions; p++)
                CHECK(bs_segment_check_partition(seg, p, &err) == BS_OK);
            bs_searcher *srch = NULL;
            CHECK(bs_searcher_create((const bs_segment *const[]){seg}, 1, &srch, &err) ==
                  BS_OK);
            bs_candidates *c = bs_candidates_new();
            bs_search_params sp = test_search_params(300, 4);
            CHECK(bs_search(srch, ds.x, &sp, c, NULL, &err) == BS_OK);
            /* Each row id once: 300 rows, one ordinal stored twice. */
            size_t n = bs_candidates_size(c);
            const uint64_t *r = bs_candidates_rowids(c);
            int repeats = 0;
            for (size_t i = 0; i < n; i++)
                for (size_t j = 0; j < i; j++) repeats += r[i] == r[j];
            CHECK_MSG(repeats == 0 && n == 299, "%zu rows, %d repeated", n, repeats);
            CHECK(bs_segment_verify(seg, &err) == BS_ERR_CORRUPT);
            CHECK_MSG(strstr(err.message, "appears in more than one partition") != NULL, "%s",
                      err.message);
            CHECK(bs_segment_merge((const bs_segment *const[]){seg}, 1, UUID_A,
                                   tpath("lazy_merged.bsseg"), &err) == BS_ERR_CORRUPT);
            CHECK_MSG(starts_with(err.message, "cannot merge segment 0: ordinal "), "%s",
                      err.message);
            bs_candidates_free(c);
            bs_searcher_free(srch);
        }
        bs_segment_free(seg);
        free(b);
    }
    free(orig);
    free_data(&ds);
}

int main(void) {
    if (test_make_dir(g_dir, sizeof g_dir, "segment") != 0) return 2;

    test_builder_args();
    test_builder_threads();
    test_degenerate();
    test_corruption();
    test_lazy_partitions();
    test_mismatch();
    test_roundtrip(100, 1, BS_METRIC_L2, BS_ROTATION_FAST);
    test_roundtrip(100, 4, BS_METRIC_COSINE, BS_ROTATION_FAST);
    test_roundtrip(64, 9, BS_METRIC_DOT, BS_ROTATION_MATRIX);
    test_roundtrip(64, 2, BS_METRIC_L2, BS_ROTATION_MATRIX);
    test_merge(100, 1, BS_METRIC_L2, BS_ROTATION_FAST);
    test_merge(100, 3, BS_METRIC_COSINE, BS_ROTATION_FAST);
    test_merge(64, 5, BS_METRIC_DOT, BS_ROTATION_MATRIX);

    if (test_remove_dir(g_dir) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    if (!bs_test_failures) printf("test_segment: all checks passed\n");
    TEST_MAIN_END();
}
