/* Dropping pages of a file mapping that a pass has read through, and
 * reading ahead the ones a pass is about to read. */
#ifndef BS_PAGES_H
#define BS_PAGES_H

#include <stddef.h>
#include <stdint.h>

/* The system's page size in bytes (4096 where it cannot be asked). */
size_t bs_page_size(void);

/* Drops the whole pages of [base + lo, base + hi) from the process
 * (madvise MADV_DONTNEED), lo rounded down and hi rounded down to a page
 * boundary. base must start a shared, read-only file mapping: its pages
 * fault back in from the page cache when read again. Best effort: a
 * failure, or a system without madvise, leaves the pages resident. */
void bs_pages_release(const uint8_t *base, uint64_t lo, uint64_t hi);

/* Asks the system to read [base + lo, base + hi) of a file mapping ahead
 * of use (madvise MADV_WILLNEED), lo rounded down and hi up to a page
 * boundary: one large read instead of a fault per page where the mapping
 * is advised MADV_RANDOM. Best effort, like bs_pages_release. */
void bs_pages_prefetch(const uint8_t *base, uint64_t lo, uint64_t hi);

#endif
