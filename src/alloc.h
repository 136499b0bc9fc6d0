/* The library's one allocation rule. Every heap block in src/ comes from
 * these helpers; nothing calls malloc, calloc or realloc directly.
 *
 *  - A size is a count times an element size, multiplied with an overflow
 *    check. A product that does not fit size_t is an allocation failure
 *    (NULL), never a wrapped, too small block.
 *  - A size of zero is one byte. So a successful call always returns a
 *    pointer the caller owns, and NULL always means failure. In particular
 *    realloc is never called with 0: glibc's realloc(p, 0) frees p and
 *    returns NULL, which callers read as "out of memory, p unchanged" and
 *    then freed p again (issue 11: a search with no candidate, run twice).
 *  - A failed resize leaves the old block where it was, still owned by the
 *    caller: assign the result only when it is not NULL.
 *  - Each block has one owner that frees it once. Pointers that outlive
 *    the free (struct members, variables an error path may reach again)
 *    are freed with BS_FREE, which sets them to NULL; free(NULL) is a
 *    no-op, so a second cleanup frees nothing. */
#ifndef BS_ALLOC_H
#define BS_ALLOC_H

#include <stdlib.h>

#include "error.h"

/* n * size bytes (at least 1), uninitialised; NULL on overflow or when out
 * of memory. */
static inline void *bs_alloc(size_t n, size_t size) {
    size_t bytes;
    if (!bs_mul_ok(n, size, &bytes)) return NULL;
    return malloc(bytes ? bytes : 1);
}

/* a * b * size bytes (at least 1), uninitialised: matrices. */
static inline void *bs_alloc2(size_t a, size_t b, size_t size) {
    size_t n;
    if (!bs_mul_ok(a, b, &n)) return NULL;
    return bs_alloc(n, size);
}

/* n * size bytes (at least 1), zeroed. */
static inline void *bs_zalloc(size_t n, size_t size) {
    size_t bytes;
    if (!bs_mul_ok(n, size, &bytes)) return NULL;
    return calloc(1, bytes ? bytes : 1);
}

/* a * b * size bytes (at least 1), zeroed. */
static inline void *bs_zalloc2(size_t a, size_t b, size_t size) {
    size_t n;
    if (!bs_mul_ok(a, b, &n)) return NULL;
    return bs_zalloc(n, size);
}

/* p resized to n * size bytes (at least 1); p may be NULL. On failure
 * returns NULL and p is untouched (still valid, still the caller's). */
static inline void *bs_realloc(void *p, size_t n, size_t size) {
    size_t bytes;
    if (!bs_mul_ok(n, size, &bytes)) return NULL;
    return realloc(p, bytes ? bytes : 1);
}

/* Frees p and sets it to NULL, so a later free of the same variable is a
 * no-op instead of a double free. */
#define BS_FREE(p)   \
    do {             \
        free(p);     \
        (p) = NULL;  \
    } while (0)

#endif
