/* RaBitQ codes: encoding of rotated residuals, the FastScan block layout,
 * query lookup tables. The arithmetic is docs/rabitq.md's. Internal to the
 * library. */
#ifndef BS_RABITQ_H
#define BS_RABITQ_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"

/* Per-vector correction factors (docs/rabitq.md, "Codes"). The 1-bit stage uses
 * norm2, s1, f1; the full B-bit code uses s_full, f_full (equal to s1, f1
 * when B == 1). All are 0 for r == 0. */
typedef struct bs_factors {
    float norm2;  /* |r|^2 */
    float s1;     /* |r|^2 / <y1, r>, y1 = b - 1/2 */
    float f1;     /* |r| sqrt(1/cos1^2 - 1) / sqrt(D - 1) */
    float s_full; /* same with y = u - (2^B - 1)/2 */
    float f_full;
} bs_factors;

/* f1 from norm2 and s1: |y1|^2 = D/4 exactly, so cos1 = 2 |r| / (sqrt(D) s1)
 * and f1 = sqrt(D s1^2 / 4 - |r|^2) / sqrt(D - 1). Segments store norm2 and
 * s1 only; the search derives f1 (one sqrt per code) instead of reading 4
 * more bytes per vector. quarter_d = D / 4, inv_sqrt_dm1 = 1 / sqrt(D - 1);
 * the clamp covers rounding when r is parallel to y1. */
static inline float bs_f1_from(float norm2, float s1, float quarter_d,
                               float inv_sqrt_dm1) {
    float t = quarter_d * s1 * s1 - norm2;
    t = t > 0.0f ? t : 0.0f; /* a select, not a branch: the scan vectorises */
    return sqrtf(t) * inv_sqrt_dm1;
}

/* Bytes of a row-major 1-bit code: D / 8 (D a multiple of 64). Bit i of the
 * code is bit (i & 7) of byte (i >> 3): the sign of r_i (1 when r_i > 0). */
static inline size_t bs_code_bytes(uint32_t D) { return (size_t)D / 8; }
/* Bytes of the extra code for B bits. B <= 8: (B - 1) bit planes of D / 8
 * bytes; plane j holds bit j of e_i, laid out like the 1-bit code. B == 9:
 * e_i is byte i (eight planes take the same D bytes, and bytes let stage 2
 * use a plain SIMD dot product). */
static inline size_t bs_ext_bytes(uint32_t D, uint32_t B) {
    return (size_t)(B - 1) * (D / 8);
}

/* Encodes one rotated residual r[D] with B bits (1..9). bits: D/8 bytes
 * out; ext: bs_ext_bytes(D, B) bytes out (may be NULL when B == 1).
 * scratch: at least 2 * D floats. r must be finite. u_i = 2^(B-1) b_i + e_i
 * maximises cos(y, r) over a grid of scales (see rabitq.c). */
void bs_rabitq_encode(const float *r, uint32_t D, uint32_t B, uint8_t *bits,
                      uint8_t *ext, bs_factors *f, float *scratch);

/* <e, x> for the extra code of one vector against x[D] in float, summed in a
 * fixed order (deterministic). */
float bs_ext_dot(const uint8_t *ext, uint32_t D, uint32_t B, const float *x);
/* <b, x> for a 1-bit code in float, fixed order. */
float bs_bits_dot(const uint8_t *bits, uint32_t D, const float *x);

/* ------------------------------------------------------------- FastScan */

/* Vectors are grouped in blocks of 32; a block holds D/4 groups of 16
 * bytes. For group g (dims 4g..4g+3, dim 4g+j is bit j of the nibble) byte
 * j of the group is nib(vector j) | nib(vector j + 16) << 4. A block is
 * 16 * D/4 = 4 * D bytes. Vectors past n in the last block are zero. */
static inline size_t bs_fastscan_block_bytes(uint32_t D) {
    return (size_t)D * 4;
}
static inline size_t bs_fastscan_num_blocks(size_t n) { return (n + 31) / 32; }

/* Packs n row-major codes (n * D/8 bytes) into blocks (num_blocks * 4D
 * bytes, fully written, padding zeroed). */
void bs_fastscan_pack(const uint8_t *codes, size_t n, uint32_t D,
                      uint8_t *blocks);
/* Copies the code of vector i out of packed blocks (D/8 bytes). */
void bs_fastscan_unpack_one(const uint8_t *blocks, size_t i, uint32_t D,
                            uint8_t *code);

/* A query's lookup tables for one partition: D/4 tables of 16 uint8
 * entries. Entry m of table g approximates the sum of x_{4g+j} over the
 * bits j set in m: sum_x(g, m) ~ delta * lut[g][m] + lo_g, and
 * sum over groups of lo_g is `offset`. */
typedef struct bs_query_lut {
    uint8_t *tables;  /* D/4 * 16 bytes, caller-owned storage */
    float delta;
    float offset;
    /* Bound on |<b, x> - (delta * sum + offset)| over every code b. */
    float max_error;
} bs_query_lut;

/* Fills lut (tables must hold D/4 * 16 bytes) from x[D]. Deterministic:
 * every level gives the same bytes and the same delta, offset and
 * max_error (bs_query_lut_build is the baseline level, SSE2 on x86-64). */
void bs_query_lut_build(const float *x, uint32_t D, bs_query_lut *lut);
void bs_query_lut_build_simd(const float *x, uint32_t D, bs_simd_level level,
                             bs_query_lut *lut);
/* The table bytes of bs_query_lut_build for groups = D / 4 groups and
 * inv = 1 / delta: the reference, and the SSE2 (x86-64), AVX2 and AVX-512
 * versions (run only where bs_simd_supported says so) that must equal it
 * byte for byte for every inv, NaN and infinities included. */
void bs_lut_fill_ref(const float *x, uint32_t groups, float inv, uint8_t *tables);
void bs_lut_fill_sse2(const float *x, uint32_t groups, float inv, uint8_t *tables);
void bs_lut_fill_avx2(const float *x, uint32_t groups, float inv, uint8_t *tables);
void bs_lut_fill_avx512(const float *x, uint32_t groups, float inv, uint8_t *tables);
/* The first pass of bs_query_lut_build over groups groups of finite x,
 * added into acc (all zero for a whole x): the largest group range
 * (|x0| + |x1|) + (|x2| + |x3|), and, added in double one group at a time
 * in increasing group order, the groups' least entries lo_g (bs_lut_fill's
 * lo) and their ranges. The reference and the vector versions give the
 * same bits. */
typedef struct bs_lut_sums {
    float range_max;
    double offset, abs_total;
} bs_lut_sums;
void bs_lut_sums_ref(const float *x, uint32_t groups, bs_lut_sums *acc);
void bs_lut_sums_sse2(const float *x, uint32_t groups, bs_lut_sums *acc);
void bs_lut_sums_avx2(const float *x, uint32_t groups, bs_lut_sums *acc);

/* Kernel: for each of nblocks blocks, the 32 integer sums
 * sum_g lut[g][nib(v, g)] into out[32 * block + v]. Exact integers, so
 * every implementation gives identical output. */
typedef void (*bs_fastscan_fn)(const uint8_t *blocks, size_t nblocks,
                               const uint8_t *lut, uint32_t D, uint32_t *out);

void bs_fastscan_scalar(const uint8_t *blocks, size_t nblocks,
                        const uint8_t *lut, uint32_t D, uint32_t *out);
void bs_fastscan_avx2(const uint8_t *blocks, size_t nblocks,
                      const uint8_t *lut, uint32_t D, uint32_t *out);
void bs_fastscan_avx512(const uint8_t *blocks, size_t nblocks,
                        const uint8_t *lut, uint32_t D, uint32_t *out);

/* The kernel for a level (the scalar one for BS_SIMD_SCALAR). */
bs_fastscan_fn bs_fastscan_kernel(bs_simd_level level);

#endif
