/* Replays every file of fuzz/corpus/query_values through the fuzz target's
 * own function, without libFuzzer, so plain ctest (ASan + UBSan) keeps the
 * corpus as a regression suite: a failed requirement aborts the test with
 * the target's message. The corpus is located through BS_SOURCE_DIR. */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testing.h"

#include "../../fuzz/fuzz_query_values.c"

static void replay(const char *name, const uint8_t *data, size_t len, void *ctx) {
    (void)ctx;
    /* The seeds stay small (the generator writes a few hundred bytes each). */
    CHECK_MSG(len <= (1u << 16), "%s is larger than %u bytes", name, 1u << 16);
    LLVMFuzzerTestOneInput(data, len);
}

int main(void) {
#ifndef BS_SOURCE_DIR
    printf("test_fuzz_query: skipped: BS_SOURCE_DIR is not defined\n");
    return 77;
#else
    const char *dir = BS_SOURCE_DIR "/fuzz/corpus/query_values";
    int files = test_replay_dir(dir, replay, NULL);
    if (files < 0) TEST_MAIN_END();
    CHECK_MSG(files >= 20, "only %d corpus files in %s", files, dir);
    printf("test_fuzz_query: %d files replayed\n", files);
    TEST_MAIN_END();
#endif
}
