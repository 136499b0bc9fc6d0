/* bs_segment_remap: a compaction moves rows to new fragments, drops deleted
 * ones and mixes in rows never indexed; remapping the old segments (plus a
 * segment of only the new rows) must give byte for byte the segment a
 * fresh builder writes over the new layout with the same artifacts and
 * uuid. And every malformed map is refused with a message naming it. */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitshard.h"
#include "testing.h"

static char g_dir[256];

#define tpath(name) test_path(g_dir, name)


static const uint8_t UUID_OLD[16] = {7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7};
static const uint8_t UUID_NEW[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

/* The old layout: fragments 3, 5, 7 (segment A) and 9 (segment B) over
 * consecutive data rows; rows r % 7 == 3 of 3, 7, 9 are deleted, row 0
 * of 5 too. Compaction: the live rows of 3, 7, 9 in order fill fragment
 * 20 (150 rows) then 21, which also gets NEW_ROWS rows never indexed;
 * fragment 5 stays. */
enum { NOLD = 4, NEW_ROWS = 25 };
static const uint64_t OLD_IDS[NOLD] = {3, 5, 7, 9};
static const uint64_t OLD_ROWS[NOLD] = {120, 40, 90, 60};

typedef struct world {
    uint32_t d, k, bits;
    bs_metric metric;
    float *centroids;
    float *x;            /* old rows (310) then the new rows */
    uint64_t first[NOLD]; /* data row of each old fragment's offset 0 */
    uint64_t new_ids[3], new_rows[3];
    uint64_t *map[NOLD]; /* old ordinal (per fragment) -> new row id */
    uint32_t n20, n21_old;
} world;

static int deleted(uint32_t f, uint64_t off) {
    if (OLD_IDS[f] == 5) return off == 0;
    return off % 7 == 3;
}

static world make_world(uint32_t d, uint32_t bits, bs_metric metric, uint64_t seed) {
    world w;
    memset(&w, 0, sizeof w);
    w.d = d;
    w.k = 5;
    w.bits = bits;
    w.metric = metric;
    uint64_t st = seed, total = 0;
    for (int f = 0; f < NOLD; f++) {
        w.first[f] = total;
        total += OLD_ROWS[f];
    }
    w.centroids = malloc((size_t)w.k * d * 4);
    w.x = malloc((size_t)(total + NEW_ROWS) * d * 4);
    for (size_t i = 0; i < (size_t)w.k * d; i++)
        w.centroids[i] = (float)(3.0 * test_rand_normal(&st));
    for (uint64_t i = 0; i < total + NEW_ROWS; i++) {
        uint32_t c = (uint32_t)(test_rand_u64(&st) % w.k);
        for (uint32_t j = 0; j < d; j++)
            w.x[i * d + j] = w.centroids[(size_t)c * d + j] + (float)test_rand_normal(&st);
    }
    /* The compaction's row map, as bitshard rebuilds it from deletion
     * vectors: live rows keep their order. */
    uint64_t next = 0;
    for (int f = 0; f < NOLD; f++) {
        w.map[f] = malloc(OLD_ROWS[f] * sizeof(uint64_t));
        for (uint64_t o = 0; o < OLD_ROWS[f]; o++) {
            if (deleted((uint32_t)f, o)) {
                w.map[f][o] = BS_REMAP_DROP;
            } else if (OLD_IDS[f] == 5) {
                w.map[f][o] = (5ull << 32) | o;
            } else {
                uint64_t fid = next < 150 ? 20 : 21, off = next < 150 ? next : next - 150;
                w.map[f][o] = (fid << 32) | off;
                next++;
            }
        }
    }
    w.n20 = 150;
    w.n21_old = (uint32_t)(next - 150);
    w.new_ids[0] = 5;
    w.new_ids[1] = 20;
    w.new_ids[2] = 21;
    w.new_rows[0] = 40;
    w.new_rows[1] = 150;
    w.new_rows[2] = w.n21_old + NEW_ROWS;
    return w;
}

static void free_world(world *w) {
    free(w->centroids);
    free(w->x);
    for (int f = 0; f < NOLD; f++) free(w->map[f]);
}

static bs_segment_spec spec_of(const world *w, const uint8_t *uuid, const uint64_t *ids,
                               const uint64_t *rows, uint32_t nf) {
    return test_segment_spec(w->d, w->bits, w->metric, 99, w->centroids, w->k, uuid, ids,
                             rows, nf);
}

static bs_status add_row(bs_segment_builder *b, const world *w, uint32_t fpos,
                         uint64_t off, uint64_t data_row) {
    uint32_t o = (uint32_t)off;
    return bs_builder_add(b, w->x + data_row * w->d, 1, fpos, &o, NULL);
}

/* The old segment over old fragment indexes [f0, f1), live rows only. */
static void build_old(const world *w, int f0, int f1, const char *path) {
    bs_segment_spec s = spec_of(w, UUID_OLD, OLD_IDS + f0, OLD_ROWS + f0, (uint32_t)(f1 - f0));
    bs_segment_builder *b = NULL;
    CHECK(bs_builder_create(&s, &b, NULL) == BS_OK);
    for (int f = f0; f < f1; f++)
        for (uint64_t o = 0; o < OLD_ROWS[f]; o++)
            if (!deleted((uint32_t)f, o))
                CHECK(add_row(b, w, (uint32_t)(f - f0), o, w->first[f] + o) == BS_OK);
    bs_error err;
    CHECK_MSG(bs_builder_write(b, path, &err) == BS_OK, "%s", err.message);
    bs_builder_free(b);
}

/* Over the new table: the rows never indexed (new) and/or every live row
 * (fresh). */
static void build_new(const world *w, int with_old, const uint8_t *uuid, const char *path,
                      const uint8_t *ident) {
    bs_segment_spec s = spec_of(w, uuid, w->new_ids, w->new_rows, 3);
    bs_segment_builder *b = NULL;
    CHECK(bs_builder_create(&s, &b, NULL) == BS_OK);
    /* ident: 3 * 16 bytes, the new fragments' identities, or NULL. */
    for (int f = 0; ident && f < 3; f++)
        CHECK(bs_builder_set_fragment_identity(b, w->new_ids[f], ident + f * 16, NULL) == BS_OK);
    if (with_old)
        for (int f = 0; f < NOLD; f++)
            for (uint64_t o = 0; o < OLD_ROWS[f]; o++) {
                uint64_t v = w->map[f][o];
                if (v == BS_REMAP_DROP) continue;
                uint32_t pos = (v >> 32) == 5 ? 0 : (v >> 32) == 20 ? 1 : 2;
                CHECK(add_row(b, w, pos, v & 0xFFFFFFFFu, w->first[f] + o) == BS_OK);
            }
    for (uint64_t i = 0; i < NEW_ROWS; i++)
        CHECK(add_row(b, w, 2, w->n21_old + i, 310 + i) == BS_OK);
    bs_error err;
    CHECK_MSG(bs_builder_write(b, path, &err) == BS_OK, "%s", err.message);
    bs_builder_free(b);
}

static void test_equals_fresh_build(uint32_t d, uint32_t bits, bs_metric metric) {
    world w = make_world(d, bits, metric, 1000 + d + bits);
    const char *pa = tpath("a.bsseg"), *pb = tpath("b.bsseg"), *pc = tpath("c.bsseg");
    const char *fresh = tpath("fresh.bsseg"), *out = tpath("out.bsseg");
    build_old(&w, 0, 3, pa);
    build_old(&w, 3, 4, pb);
    build_new(&w, 0, UUID_OLD, pc, NULL);
    build_new(&w, 1, UUID_NEW, fresh, NULL);
    test_loaded a, b, c;
    CHECK(test_load(pa, &a, NULL) == BS_OK);
    CHECK(test_load(pb, &b, NULL) == BS_OK);
    CHECK(test_load(pc, &c, NULL) == BS_OK);
    if (!a.seg || !b.seg || !c.seg) return;
    /* A's ordinals: fragments 3, 5, 7 in table order. */
    uint64_t *map_a = malloc(250 * sizeof(uint64_t));
    memcpy(map_a, w.map[0], 120 * 8);
    memcpy(map_a + 120, w.map[1], 40 * 8);
    memcpy(map_a + 160, w.map[2], 90 * 8);
    uint64_t *map_c = malloc((w.new_rows[0] + w.new_rows[1] + w.new_rows[2]) * 8);
    uint64_t k = 0;
    /* C encoded only the new rows: the others are not its to claim. */
    for (int f = 0; f < 3; f++)
        for (uint64_t o = 0; o < w.new_rows[f]; o++)
            map_c[k++] = f == 2 && o >= w.n21_old ? (w.new_ids[f] << 32) | o : BS_REMAP_DROP;
    bs_remap_input in[3] = {{a.seg, map_a, 250}, {b.seg, w.map[3], 60}, {c.seg, map_c, k}};
    bs_error err;
    CHECK_MSG(bs_segment_remap(in, 3, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, out, &err) == BS_OK,
              "%s", err.message);
    CHECK_MSG(test_files_equal(out, fresh), "remap != fresh build (d=%u bits=%u metric=%d)", d,
              bits, (int)metric);
    /* Input order does not matter. */
    bs_remap_input rev[3] = {in[2], in[0], in[1]};
    CHECK(bs_segment_remap(rev, 3, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, out, &err) == BS_OK);
    CHECK(test_files_equal(out, fresh));

    /* The test can fail: two rows swapped give another file. */
    uint64_t t = map_a[1];
    map_a[1] = map_a[2];
    map_a[2] = t;
    CHECK(bs_segment_remap(in, 3, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, out, &err) == BS_OK);
    CHECK(!test_files_equal(out, fresh));
    map_a[2] = map_a[1];
    map_a[1] = t;

    /* ---- refusals: each names the input, ordinal and value */
    const char *bad = tpath("bad.bsseg");
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) == BS_OK);
    in[1].map_len = 59;
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "input 1: row_map has 59 entries, the segment has 60 "
                                  "ordinals (the rows of its fragments)") == 0,
              "%s", err.message);
    in[1].map_len = 60;
    uint64_t saved = map_a[1];
    map_a[1] = (8ull << 32) | 4;
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "input 0 ordinal 1 maps to row id 34359738372: fragment 8 "
                                  "is not in the output fragment table") == 0,
              "%s", err.message);
    map_a[1] = (20ull << 32) | 150;
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "input 0 ordinal 1 maps to row id 85899346070: offset 150 "
                                  "is out of range for fragment 20 (150 rows)") == 0,
              "%s", err.message);
    map_a[1] = saved;
    /* Two rows onto one: B's first row onto A's first. */
    uint64_t saved_b = w.map[3][0];
    w.map[3][0] = map_a[0];
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "input 0 ordinal 0 and input 1 ordinal 0 both map to row "
                                  "id 85899345920 (fragment 20 offset 0)") == 0,
              "%s", err.message);
    w.map[3][0] = saved_b;
    /* Two rows of one input onto one. */
    saved = map_a[2];
    map_a[2] = map_a[1];
    CHECK(bs_segment_remap(in, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "input 0 ordinal 1 and input 0 ordinal 2 both map to row "
                                  "id 85899345921 (fragment 20 offset 1)") == 0,
              "%s", err.message);
    map_a[2] = saved;
    uint64_t dup_ids[3] = {5, 20, 5};
    CHECK(bs_segment_remap(in, 2, dup_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "fragment id 5 appears more than once in fragment_ids") == 0,
              "%s", err.message);
    CHECK(bs_segment_remap(NULL, 0, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "remap needs at least one segment") == 0);
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, NULL, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(bs_segment_remap(in, 2, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, NULL, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    bs_remap_input nullmap[1] = {{a.seg, NULL, 250}};
    CHECK(bs_segment_remap(nullmap, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) ==
          BS_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(err.message, "input 0: row_map is NULL") == 0);
    /* Everything dropped: a valid segment of 0 rows. */
    uint64_t *drop = malloc(250 * sizeof(uint64_t));
    for (int i = 0; i < 250; i++) drop[i] = BS_REMAP_DROP;
    bs_remap_input none[1] = {{a.seg, drop, 250}};
    CHECK(bs_segment_remap(none, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, bad, &err) == BS_OK);
    test_loaded e;
    CHECK(test_load(bad, &e, NULL) == BS_OK);
    if (e.seg) {
        bs_segment_info info;
        bs_segment_get_info(e.seg, &info);
        CHECK(info.num_rows == 0 && info.num_fragments == 3);
    }
    test_unload(&e);
    free(drop);
    CHECK(access(tpath("bad.bsseg.tmp"), F_OK) != 0);
    free(map_a);
    free(map_c);
    test_unload(&a);
    test_unload(&b);
    test_unload(&c);
    free_world(&w);
}

/* Rows out of order within a partition (a map that reverses each
 * fragment's offsets) are sorted by the general path, rows in order by the
 * merge of sorted runs: reversing twice gives back the fresh build's
 * bytes, reversing once does not. */
static void test_reversed_order(void) {
    world w = make_world(64, 4, BS_METRIC_L2, 77);
    const char *fresh = tpath("rev_fresh.bsseg"), *once = tpath("rev_once.bsseg"),
               *twice = tpath("rev_twice.bsseg");
    build_new(&w, 1, UUID_NEW, fresh, NULL);
    uint64_t total = w.new_rows[0] + w.new_rows[1] + w.new_rows[2], k = 0;
    uint64_t *rev = malloc(total * sizeof *rev);
    for (int f = 0; f < 3; f++)
        for (uint64_t o = 0; o < w.new_rows[f]; o++)
            rev[k++] = (w.new_ids[f] << 32) | (w.new_rows[f] - 1 - o);
    test_loaded a, b;
    CHECK(test_load(fresh, &a, NULL) == BS_OK);
    bs_remap_input in = {a.seg, rev, total};
    bs_error err;
    CHECK_MSG(bs_segment_remap(&in, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, once, &err) ==
                  BS_OK, "%s", err.message);
    CHECK(!test_files_equal(once, fresh));
    CHECK(test_load(once, &b, NULL) == BS_OK);
    in.segment = b.seg;
    CHECK_MSG(bs_segment_remap(&in, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, twice, &err) ==
                  BS_OK, "%s", err.message);
    CHECK(test_files_equal(twice, fresh));
    test_unload(&a);
    test_unload(&b);
    free(rev);
    free_world(&w);
}

/* With identities for the new table, the remap equals a build that
 * recorded the same identities, and reports them; the inputs' identities
 * (of the old fragments) are not carried over. */
static void test_identities(void) {
    world w = make_world(64, 2, BS_METRIC_L2, 77);
    uint8_t ident[3 * 16], old_ident[16];
    for (int i = 0; i < 3 * 16; i++) ident[i] = (uint8_t)(0xA0 + i);
    memset(old_ident, 0x5C, sizeof old_ident);
    const char *pb = tpath("ib.bsseg"), *fresh = tpath("ifresh.bsseg");
    const char *plain = tpath("iplain.bsseg"), *out = tpath("iout.bsseg");
    /* The old segment over fragment 9 only, with an identity of its own. */
    {
        bs_segment_spec s = spec_of(&w, UUID_OLD, OLD_IDS + 3, OLD_ROWS + 3, 1);
        bs_segment_builder *b = NULL;
        CHECK(bs_builder_create(&s, &b, NULL) == BS_OK);
        CHECK(bs_builder_set_fragment_identity(b, OLD_IDS[3], old_ident, NULL) == BS_OK);
        for (uint64_t o = 0; o < OLD_ROWS[3]; o++)
            if (!deleted(3, o)) CHECK(add_row(b, &w, 0, o, w.first[3] + o) == BS_OK);
        CHECK(bs_builder_write(b, pb, NULL) == BS_OK);
        bs_builder_free(b);
    }
    /* The fresh builds hold fragment 9's moved rows only. */
    {
        bs_segment_spec s = spec_of(&w, UUID_NEW, w.new_ids, w.new_rows, 3);
        for (int with = 0; with < 2; with++) {
            bs_segment_builder *b = NULL;
            CHECK(bs_builder_create(&s, &b, NULL) == BS_OK);
            for (int f = 0; with && f < 3; f++)
                CHECK(bs_builder_set_fragment_identity(b, w.new_ids[f], ident + f * 16, NULL) ==
                      BS_OK);
            for (uint64_t o = 0; o < OLD_ROWS[3]; o++) {
                uint64_t v = w.map[3][o];
                if (v == BS_REMAP_DROP) continue;
                uint32_t pos = (v >> 32) == 5 ? 0 : (v >> 32) == 20 ? 1 : 2;
                CHECK(add_row(b, &w, pos, v & 0xFFFFFFFFu, w.first[3] + o) == BS_OK);
            }
            CHECK(bs_builder_write(b, with ? fresh : plain, NULL) == BS_OK);
            bs_builder_free(b);
        }
    }
    test_loaded b;
    CHECK(test_load(pb, &b, NULL) == BS_OK);
    if (!b.seg) return;
    bs_remap_input in[1] = {{b.seg, w.map[3], 60}};
    bs_error err;
    CHECK_MSG(bs_segment_remap(in, 1, w.new_ids, w.new_rows, 3, ident, UUID_NEW, out, &err) ==
                  BS_OK, "%s", err.message);
    CHECK(test_files_equal(out, fresh));
    CHECK(!test_files_equal(out, plain));
    test_loaded o;
    CHECK(test_load(out, &o, NULL) == BS_OK);
    for (uint32_t f = 0; o.seg && f < 3; f++) {
        uint8_t got[16];
        bs_segment_fragment_identity(o.seg, f, got);
        CHECK_MSG(memcmp(got, ident + f * 16, 16) == 0, "fragment entry %u identity", f);
    }
    if (o.seg) test_unload(&o);
    /* NULL: all zero, the old fragment's identity is not carried. */
    CHECK(bs_segment_remap(in, 1, w.new_ids, w.new_rows, 3, NULL, UUID_NEW, out, &err) == BS_OK);
    CHECK(test_files_equal(out, plain));
    test_unload(&b);
    free_world(&w);
}

/* Segments of different code spaces are refused, naming the artifact. */
static void test_mismatch(void) {
    world w1 = make_world(64, 2, BS_METRIC_L2, 5), w2 = make_world(64, 3, BS_METRIC_L2, 5);
    const char *p1 = tpath("m1.bsseg"), *p2 = tpath("m2.bsseg");
    build_old(&w1, 3, 4, p1);
    build_old(&w2, 3, 4, p2);
    test_loaded a, b;
    CHECK(test_load(p1, &a, NULL) == BS_OK);
    CHECK(test_load(p2, &b, NULL) == BS_OK);
    bs_remap_input in[2] = {{a.seg, w1.map[3], 60}, {b.seg, w2.map[3], 60}};
    bs_error err;
    CHECK(bs_segment_remap(in, 2, w1.new_ids, w1.new_rows, 3, NULL, UUID_NEW, tpath("m.bsseg"),
                           &err) == BS_ERR_ARTIFACT_MISMATCH);
    CHECK_MSG(strncmp(err.message, "cannot remap segment 1: ", 24) == 0, "%s", err.message);
    test_unload(&a);
    test_unload(&b);
    free_world(&w1);
    free_world(&w2);
}

int main(void) {
    if (test_make_dir(g_dir, sizeof g_dir, "remap") != 0) return 1;
    test_equals_fresh_build(100, 1, BS_METRIC_L2);
    test_equals_fresh_build(100, 3, BS_METRIC_COSINE);
    test_equals_fresh_build(64, 9, BS_METRIC_DOT);
    test_equals_fresh_build(130, 4, BS_METRIC_L2);
    test_mismatch();
    test_reversed_order();
    test_identities();
    if (test_remove_dir(g_dir) != 0) return 1;
    TEST_MAIN_END();
}
