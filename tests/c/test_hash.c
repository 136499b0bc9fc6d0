/* bs_hash64 (XXH64), its streaming form, bs_padded_dim, and the artifact
 * fingerprints. The XXH64 values below are the reference implementation's
 * (libxxhash 0.8), so they pin the algorithm, not this code's own output. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bitshard.h"
#include "hash.h"
#include "testing.h"

static void fill_bytes(uint8_t *p, size_t n, uint64_t *state) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)test_rand_u64(state);
}

static void test_known_answers(void) {
    CHECK(bs_hash64("", 0, 0) == 0xEF46DB3751D8E999ull);
    CHECK(bs_hash64(NULL, 0, 0) == 0xEF46DB3751D8E999ull);
    CHECK(bs_hash64("a", 1, 0) == 0xD24EC4F1A98C6E5Bull);
    CHECK(bs_hash64("abc", 3, 0) == 0x44BC2CF5AD770999ull);
    CHECK(bs_hash64("abc", 3, 1) == 0xBEA9CA8199328908ull);
    const char *fox = "The quick brown fox jumps over the lazy dog";
    CHECK(bs_hash64(fox, strlen(fox), 0) == 0x0B242D361FDA71BCull);

    uint8_t seq[100];
    for (int i = 0; i < 100; i++) seq[i] = (uint8_t)i;
    CHECK(bs_hash64(seq, 100, 0) == 0x6AC1E58032166597ull);
    CHECK(bs_hash64(seq, 100, 1) == 0x3D19A3A2098A7023ull);

    uint8_t big[1024];
    for (int i = 0; i < 1024; i++) big[i] = (uint8_t)i;
    CHECK(bs_hash64(big, 1024, 0x123456789ABCDEF0ull) == 0x5A76414B89668527ull);
}

static void test_streaming_equals_one_shot(void) {
    uint64_t st = 11;
    uint8_t data[300];
    fill_bytes(data, sizeof data, &st);
    for (size_t len = 0; len <= 130; len++) {
        uint64_t want = bs_hash64(data, len, 7);
        for (size_t cut = 0; cut <= len; cut++) {
            bs_hash64_state s;
            bs_hash64_init(&s, 7);
            bs_hash64_update(&s, data, cut);
            bs_hash64_update(&s, data + cut, len - cut);
            CHECK_MSG(bs_hash64_digest(&s) == want, "len %zu cut %zu", len,
                      cut);
        }
    }
    /* Byte at a time, and a digest in the middle does not disturb it. */
    bs_hash64_state s;
    bs_hash64_init(&s, 99);
    for (size_t i = 0; i < sizeof data; i++) {
        bs_hash64_update(&s, data + i, 1);
        if (i == 40) CHECK(bs_hash64_digest(&s) == bs_hash64(data, 41, 99));
    }
    CHECK(bs_hash64_digest(&s) == bs_hash64(data, sizeof data, 99));
}

static void test_alignment_and_seed(void) {
    uint64_t st = 5;
    uint8_t buf[512 + 8], copy[512];
    fill_bytes(buf, sizeof buf, &st);
    for (size_t off = 0; off < 8; off++) {
        memcpy(copy, buf + off, 512);
        CHECK(bs_hash64(buf + off, 512, 3) == bs_hash64(copy, 512, 3));
        CHECK(bs_hash64(buf + off, 37, 3) == bs_hash64(copy, 37, 3));
    }
    CHECK(bs_hash64(buf, 64, 0) != bs_hash64(buf, 64, 1));
    CHECK(bs_hash64(buf, 64, 0) != bs_hash64(buf, 63, 0));
    /* One flipped bit anywhere changes the hash. */
    uint64_t h = bs_hash64(buf, 200, 0);
    for (size_t i = 0; i < 200; i += 13) {
        buf[i] ^= 0x10;
        CHECK(bs_hash64(buf, 200, 0) != h);
        buf[i] ^= 0x10;
    }
}

static void test_padded_dim(void) {
    CHECK(bs_padded_dim(0) == 0);
    CHECK(bs_padded_dim(1) == 64);
    CHECK(bs_padded_dim(63) == 64);
    CHECK(bs_padded_dim(64) == 64);
    CHECK(bs_padded_dim(65) == 128);
    CHECK(bs_padded_dim(768) == 768);
    CHECK(bs_padded_dim(784) == 832);
    CHECK(bs_padded_dim(1000) == 1024);
    CHECK(bs_padded_dim(65536) == 65536);
    CHECK(bs_padded_dim(0xFFFFFFC0u) == 0xFFFFFFC0u);
    CHECK(bs_padded_dim(0xFFFFFFC1u) == 0);
    CHECK(bs_padded_dim(UINT32_MAX) == 0);
}

static void put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* The documented construction, rebuilt here from the bytes up. */
static int fingerprint_matches(bs_fingerprint fp, const uint8_t *canon,
                               size_t len) {
    return get_le64(fp.bytes) == bs_hash64(canon, len, BS_FINGERPRINT_SEED_LO) &&
           get_le64(fp.bytes + 8) ==
               bs_hash64(canon, len, BS_FINGERPRINT_SEED_HI);
}

static int fp_equal(bs_fingerprint a, bs_fingerprint b) {
    return memcmp(a.bytes, b.bytes, 16) == 0;
}

static void test_rotation_fingerprint(void) {
    uint8_t canon[34];
    memcpy(canon, "bs-rotation-v1", 14);
    put_le(canon + 14, 1, 4);          /* kind: matrix */
    put_le(canon + 18, 1000, 4);       /* dim */
    put_le(canon + 22, 1024, 4);       /* padded dim */
    put_le(canon + 26, 0x0123456789ABCDEFull, 8);
    bs_fingerprint fp = bs_rotation_fingerprint_params(
        BS_ROTATION_MATRIX, 1000, 1024, 0x0123456789ABCDEFull);
    CHECK(fingerprint_matches(fp, canon, sizeof canon));

    /* Pinned once: a change here changes every stored segment header. */
    static const uint8_t want[16] = {0xb7, 0x11, 0x81, 0xf4, 0x38, 0x73,
                                     0x10, 0xbd, 0x1f, 0xb1, 0x4e, 0x21,
                                     0xac, 0xbe, 0x21, 0x1b};
    bs_fingerprint fast768 =
        bs_rotation_fingerprint_params(BS_ROTATION_FAST, 768, 768, 42);
    CHECK(memcmp(fast768.bytes, want, 16) == 0);

    CHECK(!fp_equal(fast768, bs_rotation_fingerprint_params(
                                 BS_ROTATION_FAST, 768, 768, 43)));
    CHECK(!fp_equal(fast768, bs_rotation_fingerprint_params(
                                 BS_ROTATION_MATRIX, 768, 768, 42)));
    CHECK(!fp_equal(fast768, bs_rotation_fingerprint_params(
                                 BS_ROTATION_FAST, 767, 768, 42)));
    CHECK(!fp_equal(fast768, bs_rotation_fingerprint_params(
                                 BS_ROTATION_FAST, 768, 832, 42)));
    /* The two halves are independent hashes, not one repeated. */
    CHECK(memcmp(fast768.bytes, fast768.bytes + 8, 8) != 0);
}

static void test_ivf_fingerprint(void) {
    enum { K = 5, D = 7 };
    float c[K * D];
    uint64_t st = 3;
    for (int i = 0; i < K * D; i++) c[i] = (float)test_rand_normal(&st);

    uint8_t canon[9 + 12 + K * D * 4];
    memcpy(canon, "bs-ivf-v1", 9);
    put_le(canon + 9, K, 4);
    put_le(canon + 13, D, 4);
    put_le(canon + 17, BS_METRIC_COSINE, 4);
    for (int i = 0; i < K * D; i++) {
        uint32_t bits;
        memcpy(&bits, &c[i], 4);
        put_le(canon + 21 + 4 * i, bits, 4);
    }
    bs_fingerprint fp = bs_ivf_fingerprint(c, K, D, BS_METRIC_COSINE);
    CHECK(fingerprint_matches(fp, canon, sizeof canon));

    /* Pinned on exact float inputs. */
    float small[6] = {0.0f, 1.0f, -2.5f, 3.25f, 1e-3f, -0.0f};
    static const uint8_t want[16] = {0x92, 0x9f, 0x87, 0x6c, 0xf3, 0xd4,
                                     0xd7, 0x7a, 0xeb, 0x5a, 0xc7, 0x62,
                                     0x95, 0xa0, 0x51, 0x0a};
    bs_fingerprint fs = bs_ivf_fingerprint(small, 2, 3, BS_METRIC_L2);
    CHECK(memcmp(fs.bytes, want, 16) == 0);

    CHECK(!fp_equal(fs, bs_ivf_fingerprint(small, 3, 2, BS_METRIC_L2)));
    CHECK(!fp_equal(fs, bs_ivf_fingerprint(small, 2, 3, BS_METRIC_DOT)));
    small[5] = 0.0f; /* -0.0 -> 0.0 is a different model's bytes */
    CHECK(!fp_equal(fs, bs_ivf_fingerprint(small, 2, 3, BS_METRIC_L2)));
    small[5] = -0.0f;
    CHECK(fp_equal(fs, bs_ivf_fingerprint(small, 2, 3, BS_METRIC_L2)));
    /* One ulp in one centroid is a different model. */
    uint32_t bits;
    memcpy(&bits, &c[17], 4);
    bits ^= 1u;
    memcpy(&c[17], &bits, 4);
    CHECK(!fp_equal(fp, bs_ivf_fingerprint(c, K, D, BS_METRIC_COSINE)));

    /* No centroids: the header alone; NULL with k*d > 0: all zeros. */
    bs_fingerprint empty = bs_ivf_fingerprint(NULL, 0, 16, BS_METRIC_L2);
    uint8_t head[21];
    memcpy(head, "bs-ivf-v1", 9);
    put_le(head + 9, 0, 4);
    put_le(head + 13, 16, 4);
    put_le(head + 17, BS_METRIC_L2, 4);
    CHECK(fingerprint_matches(empty, head, sizeof head));
    bs_fingerprint null_fp = bs_ivf_fingerprint(NULL, 2, 3, BS_METRIC_L2);
    static const uint8_t zeros[16] = {0};
    CHECK(memcmp(null_fp.bytes, zeros, 16) == 0);
}

int main(void) {
    test_known_answers();
    test_streaming_equals_one_shot();
    test_alignment_and_seed();
    test_padded_dim();
    test_rotation_fingerprint();
    test_ivf_fingerprint();
    TEST_MAIN_END();
}
