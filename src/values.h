/* The accepted-values rule (docs/usage.md, "What values are accepted"):
 * every element of a data row, a centroid or a query is finite with
 * |v| <= BS_MAX_ABS_VALUE = 2^40. One test covers NaN, infinities and huge
 * finite values: for a float's bits with the sign cleared, |v| <= 2^40 is
 * bits <= 0x53800000 (exponent 127 + 40, mantissa 0), and NaN and Inf have
 * every exponent bit set, so they compare above it. Integer compares on a
 * row vectorise; the exact dimension is looked up only for a refused row. */
#ifndef BS_VALUES_H
#define BS_VALUES_H

#include <stdint.h>
#include <string.h>

#include "bitshard.h"

/* 2^40 as float32 bits. */
#define BS_MAX_ABS_BITS 0x53800000u

/* The rule as a message suffix, shared with the Python layer's messages. */
#define BS_ACCEPTED_VALUES "(accepted: finite, |value| <= 2**40 = 1099511627776.0)"

/* 1 when v is refused (NaN, infinite, or |v| > 2^40). */
static inline uint32_t bs_value_refused(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (uint32_t)((bits & 0x7fffffffu) > BS_MAX_ABS_BITS);
}

/* 1 when every element of x[0..n) is accepted. No early exit, so the loop
 * vectorises: the common accepted row costs one pass. */
static inline int bs_row_accepted(const float *x, uint32_t n) {
    uint32_t bad = 0;
    for (uint32_t j = 0; j < n; j++) bad |= bs_value_refused(x[j]);
    return bad == 0;
}

/* The first refused element of x[0..n), or n when there is none. */
static inline uint32_t bs_first_refused(const float *x, uint32_t n) {
    uint32_t j = 0;
    while (j < n && !bs_value_refused(x[j])) j++;
    return j;
}

#endif
