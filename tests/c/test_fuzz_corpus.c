/* Replays every file of fuzz/corpus/segment_open through the fuzz target's
 * own function, without libFuzzer, so plain ctest keeps the corpus as a
 * regression suite. Files named valid_* must open; trunc_* and flip_* must
 * be refused. The corpus is located through BS_SOURCE_DIR (set by CMake). */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testing.h"

#include "../../fuzz/fuzz_segment_open.c"

static int starts(const char *s, const char *p) {
    return strncmp(s, p, strlen(p)) == 0;
}

typedef struct counts {
    int valid, refused;
} counts;

static void replay(const char *name, const uint8_t *data, size_t len, void *ctx) {
    counts *c = ctx;
    LLVMFuzzerTestOneInput(data, len);
    bs_segment *seg = NULL;
    bs_error err;
    bs_status st = bs_segment_open(data, len, &seg, &err);
    if (starts(name, "valid_")) {
        CHECK_MSG(st == BS_OK, "%s: %s", name, err.message);
        c->valid++;
    } else if (starts(name, "trunc_") || starts(name, "flip_")) {
        CHECK_MSG(st == BS_ERR_CORRUPT || st == BS_ERR_UNSUPPORTED_VERSION,
                  "%s opened with %s", name, bs_status_name(st));
        c->refused++;
    }
    bs_segment_free(seg);
}

int main(void) {
#ifndef BS_SOURCE_DIR
    printf("test_fuzz_corpus: skipped: BS_SOURCE_DIR is not defined\n");
    return 77;
#else
    counts c = {0, 0};
    int files = test_replay_dir(BS_SOURCE_DIR "/fuzz/corpus/segment_open", replay, &c);
    if (files < 0) TEST_MAIN_END();
    CHECK_MSG(c.valid > 0 && c.refused > 0, "corpus has %d valid and %d refused files",
              c.valid, c.refused);
    printf("test_fuzz_corpus: %d files (%d valid, %d refused, the rest fuzzer "
           "finds)\n",
           files, c.valid, c.refused);
    TEST_MAIN_END();
#endif
}
