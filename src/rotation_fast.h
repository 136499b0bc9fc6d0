/* The FAST rotation's per-row transform (rotation.c), at two instruction
 * sets: the SSE2 baseline (the reference) and AVX2. Both compute the same
 * operations on every element in the same order (products, then the
 * Walsh-Hadamard levels' adds and subtracts; no FMA), so they give the
 * same bits; tests/c/test_rotation.c checks it on adversarial rows. */
#ifndef BS_ROTATION_FAST_H
#define BS_ROTATION_FAST_H

#include <stdint.h>

/* One row x of D floats in place: rounds of (sign diagonal, normalised
 * Walsh-Hadamard transform of size W) as rotation.c's fast_build laid the
 * diagonals out (num_passes = D == W ? rounds : 2 * rounds, D floats
 * each). */
typedef void (*bs_fast_row_fn)(const float *diag, uint32_t D, uint32_t W, int rounds, float *x);
void bs_fast_row_sse2(const float *diag, uint32_t D, uint32_t W, int rounds, float *x);
void bs_fast_row_avx2(const float *diag, uint32_t D, uint32_t W, int rounds, float *x);

#endif
