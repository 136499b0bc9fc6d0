/* Short vectors of the GCC/clang vector extension, for loops that must
 * vectorise the same way on every compiler: element-wise +, - and * round
 * exactly like the scalar operations, so using them changes no bit. Loads
 * and stores go through memcpy (unaligned access defined, no aliasing
 * questions). GCC and clang lower them to SSE2 on x86-64 and to scalar code
 * where there is no vector unit. Internal. */
#ifndef BS_VEC_H
#define BS_VEC_H

#include <stdint.h>
#include <string.h>

typedef float bs_v4f __attribute__((vector_size(16)));
typedef int32_t bs_v4i __attribute__((vector_size(16)));
typedef float bs_v2f __attribute__((vector_size(8)));
typedef double bs_v2d __attribute__((vector_size(16)));

static inline bs_v4f bs_v4f_load(const float *p) {
    bs_v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void bs_v4f_store(float *p, bs_v4f v) { memcpy(p, &v, sizeof v); }

static inline bs_v2d bs_v2d_load(const double *p) {
    bs_v2d v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void bs_v2d_store(double *p, bs_v2d v) { memcpy(p, &v, sizeof v); }

#endif
