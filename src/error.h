/* Internal error helpers: set a message and return a status in one step. */
#ifndef BS_ERROR_H
#define BS_ERROR_H

#include "bitshard.h"

#if defined(__GNUC__)
#define BS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define BS_PRINTF(a, b)
#endif

/* Fills err (if not NULL) and returns status. */
bs_status bs_fail(bs_error *err, bs_status status, const char *fmt, ...)
    BS_PRINTF(3, 4);

/* Clears err to BS_OK. */
void bs_error_clear(bs_error *err);

/* Returns status if it is not BS_OK. */
#define BS_TRY(expr)                                                           \
    do {                                                                       \
        bs_status bs_try_status_ = (expr);                                     \
        if (bs_try_status_ != BS_OK) return bs_try_status_;                    \
    } while (0)

/* Overflow-checked size arithmetic: 0 on overflow. */
static inline int bs_mul_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline int bs_add_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

#endif
