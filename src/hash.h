/* XXH64 as an incremental state, and the canonical fingerprints of the
 * shared artifacts. bs_hash64 (bitshard.h) is the one-shot form of the same
 * hash; the construction is specified in docs/algorithms.md ("Rotation",
 * "Hash and fingerprints"). Internal to the library. */
#ifndef BS_HASH_H
#define BS_HASH_H

#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

/* Streaming XXH64: init, any number of updates, digest. Feeding the bytes
 * in pieces gives the same value as bs_hash64 over their concatenation.
 * digest does not change the state, so more bytes may follow. */
typedef struct bs_hash64_state {
    uint64_t acc[4];
    uint64_t seed;
    uint64_t total_len;
    uint8_t buf[32];
    uint32_t buf_len;
} bs_hash64_state;

void bs_hash64_init(bs_hash64_state *s, uint64_t seed);
void bs_hash64_update(bs_hash64_state *s, const void *data, size_t len);
uint64_t bs_hash64_digest(const bs_hash64_state *s);

/* The fixed seeds of the two halves of every fingerprint: bytes [0, 8) of
 * the fingerprint are XXH64(canonical, SEED_LO) little-endian, bytes
 * [8, 16) XXH64(canonical, SEED_HI). */
#define BS_FINGERPRINT_SEED_LO 0x62732D66702D6C6Full /* "bs-fp-lo" */
#define BS_FINGERPRINT_SEED_HI 0x62732D66702D6869ull /* "bs-fp-hi" */

/* ASCII tags that open the canonical byte forms (no terminating NUL). */
#define BS_ROTATION_FP_TAG "bs-rotation-v1"
#define BS_IVF_FP_TAG "bs-ivf-v1"

/* The rotation fingerprint from its parameters alone, so that a reader can
 * check a stored fingerprint without building the (possibly dense)
 * rotation. bs_rotation_fingerprint(rot) equals this for rot's fields. */
bs_fingerprint bs_rotation_fingerprint_params(bs_rotation_kind kind,
                                              uint32_t dim,
                                              uint32_t padded_dim,
                                              uint64_t seed);

#endif
