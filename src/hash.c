/* XXH64 (Yann Collet's xxHash, 64-bit variant), written from the algorithm
 * description, and the artifact fingerprints built on it.
 *
 * XXH64 is chosen for checksums and fingerprints because it is fast, has a
 * public specification with published test values, and gives the same
 * value on every machine: input words are read little-endian, whatever the
 * alignment of the buffer. */
#include "hash.h"

#include <string.h>

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

static inline uint64_t rotl64(uint64_t x, int r) {
    return (x << r) | (x >> (64 - r));
}

/* memcpy keeps unaligned reads defined; the byte swap only exists for a
 * big-endian host (version_check.c refuses those today, but the hash must
 * not silently change if that is ever relaxed). */
static inline uint64_t read_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t read_le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xxh_round(uint64_t acc, uint64_t lane) {
    acc += lane * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t xxh_merge(uint64_t h, uint64_t acc) {
    h ^= xxh_round(0, acc);
    return h * P1 + P4;
}

/* Consumes whole 32-byte stripes; returns the bytes consumed. */
static size_t xxh_stripes(uint64_t acc[4], const uint8_t *p, size_t len) {
    uint64_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    size_t done = 0;
    while (len - done >= 32) {
        a0 = xxh_round(a0, read_le64(p + done));
        a1 = xxh_round(a1, read_le64(p + done + 8));
        a2 = xxh_round(a2, read_le64(p + done + 16));
        a3 = xxh_round(a3, read_le64(p + done + 24));
        done += 32;
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
    return done;
}

void bs_hash64_init(bs_hash64_state *s, uint64_t seed) {
    memset(s, 0, sizeof *s);
    s->seed = seed;
    s->acc[0] = seed + P1 + P2;
    s->acc[1] = seed + P2;
    s->acc[2] = seed;
    s->acc[3] = seed - P1;
}

void bs_hash64_update(bs_hash64_state *s, const void *data, size_t len) {
    if (len == 0) return;
    const uint8_t *p = (const uint8_t *)data;
    s->total_len += (uint64_t)len;
    if (s->buf_len > 0) {
        size_t need = 32 - s->buf_len;
        if (len < need) {
            memcpy(s->buf + s->buf_len, p, len);
            s->buf_len += (uint32_t)len;
            return;
        }
        memcpy(s->buf + s->buf_len, p, need);
        xxh_stripes(s->acc, s->buf, 32);
        s->buf_len = 0;
        p += need;
        len -= need;
    }
    size_t done = xxh_stripes(s->acc, p, len);
    if (done < len) {
        memcpy(s->buf, p + done, len - done);
        s->buf_len = (uint32_t)(len - done);
    }
}

uint64_t bs_hash64_digest(const bs_hash64_state *s) {
    uint64_t h;
    if (s->total_len >= 32) {
        h = rotl64(s->acc[0], 1) + rotl64(s->acc[1], 7) +
            rotl64(s->acc[2], 12) + rotl64(s->acc[3], 18);
        for (int i = 0; i < 4; i++) h = xxh_merge(h, s->acc[i]);
    } else {
        h = s->seed + P5;
    }
    h += s->total_len;

    const uint8_t *p = s->buf;
    size_t left = s->buf_len;
    while (left >= 8) {
        h ^= xxh_round(0, read_le64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
        left -= 8;
    }
    if (left >= 4) {
        h ^= (uint64_t)read_le32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
        left -= 4;
    }
    while (left > 0) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
        left--;
    }

    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

uint64_t bs_hash64(const void *data, size_t len, uint64_t seed) {
    bs_hash64_state s;
    bs_hash64_init(&s, seed);
    /* NULL with len 0 is the empty input; never hand NULL to memcpy. */
    if (data != NULL) bs_hash64_update(&s, data, len);
    return bs_hash64_digest(&s);
}

uint32_t bs_padded_dim(uint32_t dim) {
    uint64_t d = ((uint64_t)dim + 63u) & ~(uint64_t)63u;
    /* No multiple of 64 above UINT32_MAX - 63 fits in 32 bits: 0 tells the
     * caller, which rejects such a dimension anyway. */
    return d > UINT32_MAX ? 0u : (uint32_t)d;
}

/* ------------------------------------------------------------ fingerprints
 *
 * A fingerprint is two XXH64 of one canonical byte string under the seeds
 * BS_FINGERPRINT_SEED_LO and BS_FINGERPRINT_SEED_HI; bytes [0, 8) hold the
 * first hash little-endian, [8, 16) the second. The canonical strings are
 *   rotation: "bs-rotation-v1" (14 ASCII bytes), u32 kind, u32 dim,
 *             u32 padded_dim, u64 seed                       (34 bytes)
 *   IVF:      "bs-ivf-v1" (9 ASCII bytes), u32 k, u32 d, u32 metric, then
 *             the k * d centroid values as IEEE-754 binary32, row-major
 * with every integer and float little-endian and nothing between fields.
 * The centroids are streamed into both hash states straight from the
 * caller's array (a little-endian host's floats are already canonical), so
 * no copy of k * d floats is made. Floats are hashed by their bits: 0.0 and
 * -0.0 give different fingerprints, as they give different files. */

typedef struct fp_pair {
    bs_hash64_state lo, hi;
} fp_pair;

static void fp_init(fp_pair *fp) {
    bs_hash64_init(&fp->lo, BS_FINGERPRINT_SEED_LO);
    bs_hash64_init(&fp->hi, BS_FINGERPRINT_SEED_HI);
}

static void fp_update(fp_pair *fp, const void *data, size_t len) {
    bs_hash64_update(&fp->lo, data, len);
    bs_hash64_update(&fp->hi, data, len);
}

static bs_fingerprint fp_final(const fp_pair *fp) {
    bs_fingerprint out;
    uint64_t h[2] = {bs_hash64_digest(&fp->lo), bs_hash64_digest(&fp->hi)};
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < 8; i++)
            out.bytes[8 * w + i] = (uint8_t)(h[w] >> (8 * i));
    return out;
}

static uint8_t *put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + 4;
}

static uint8_t *put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + 8;
}

bs_fingerprint bs_rotation_fingerprint_params(bs_rotation_kind kind,
                                              uint32_t dim,
                                              uint32_t padded_dim,
                                              uint64_t seed) {
    uint8_t bytes[sizeof BS_ROTATION_FP_TAG - 1 + 4 + 4 + 4 + 8];
    uint8_t *p = bytes;
    memcpy(p, BS_ROTATION_FP_TAG, sizeof BS_ROTATION_FP_TAG - 1);
    p += sizeof BS_ROTATION_FP_TAG - 1;
    p = put_u32(p, (uint32_t)kind);
    p = put_u32(p, dim);
    p = put_u32(p, padded_dim);
    p = put_u64(p, seed);

    fp_pair fp;
    fp_init(&fp);
    fp_update(&fp, bytes, (size_t)(p - bytes));
    return fp_final(&fp);
}

bs_fingerprint bs_ivf_fingerprint(const float *centroids, uint32_t k,
                                  uint32_t d, bs_metric metric) {
    if (centroids == NULL && k != 0 && d != 0) {
        /* No error channel here: an all-zero fingerprint matches no real
         * model (2^-128), so the mistake surfaces as a mismatch. */
        bs_fingerprint zero;
        memset(&zero, 0, sizeof zero);
        return zero;
    }
    uint8_t head[sizeof BS_IVF_FP_TAG - 1 + 4 + 4 + 4];
    uint8_t *p = head;
    memcpy(p, BS_IVF_FP_TAG, sizeof BS_IVF_FP_TAG - 1);
    p += sizeof BS_IVF_FP_TAG - 1;
    p = put_u32(p, k);
    p = put_u32(p, d);
    p = put_u32(p, (uint32_t)metric);

    fp_pair fp;
    fp_init(&fp);
    fp_update(&fp, head, (size_t)(p - head));
    if (k != 0 && d != 0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "bs_ivf_fingerprint hashes float bytes as stored: little-endian only"
#endif
        /* Row by row so that no k * d * 4 product can overflow size_t. */
        const size_t row_bytes = (size_t)d * sizeof(float);
        for (uint32_t i = 0; i < k; i++)
            fp_update(&fp, centroids + (size_t)i * d, row_bytes);
    }
    return fp_final(&fp);
}
