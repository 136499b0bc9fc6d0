/* madvise is not in C11 or POSIX.1-2008's base: glibc declares it with
 * _DEFAULT_SOURCE (posix_madvise's POSIX_MADV_DONTNEED is a no-op on
 * Linux, so it would not do). */
#define _DEFAULT_SOURCE 1

#include "pages.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

size_t bs_page_size(void) {
#if defined(_SC_PAGESIZE)
    long n = sysconf(_SC_PAGESIZE);
    if (n > 0) return (size_t)n;
#endif
    return 4096;
}

void bs_pages_release(const uint8_t *base, uint64_t lo, uint64_t hi) {
#if defined(MADV_DONTNEED)
    uint64_t page = bs_page_size();
    lo -= lo % page;
    hi -= hi % page;
    if (hi <= lo) return;
    /* The mapping is read-only to us; madvise takes a non-const pointer
     * but changes no byte of a shared file mapping. */
    (void)madvise((void *)(uintptr_t)(base + lo), (size_t)(hi - lo), MADV_DONTNEED);
#else
    (void)base;
    (void)lo;
    (void)hi;
#endif
}

void bs_pages_prefetch(const uint8_t *base, uint64_t lo, uint64_t hi) {
#if defined(MADV_WILLNEED)
    uint64_t page = bs_page_size();
    lo -= lo % page;
    /* The mapping covers the file's last page whole, so hi may round up. */
    if (hi % page != 0) hi += page - hi % page;
    if (hi <= lo) return;
    (void)madvise((void *)(uintptr_t)(base + lo), (size_t)(hi - lo), MADV_WILLNEED);
#else
    (void)base;
    (void)lo;
    (void)hi;
#endif
}
