/* Replays every file of fuzz/corpus/query_values through the fuzz target's
 * own function, without libFuzzer, so plain ctest (ASan + UBSan) keeps the
 * corpus as a regression suite: a failed requirement aborts the test with
 * the target's message. The corpus is located through BS_SOURCE_DIR. */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testing.h"

#include "../../fuzz/fuzz_query_values.c"

int main(void) {
#ifndef BS_SOURCE_DIR
    printf("test_fuzz_query: skipped: BS_SOURCE_DIR is not defined\n");
    return 77;
#else
    const char *dir = BS_SOURCE_DIR "/fuzz/corpus/query_values";
    DIR *d = opendir(dir);
    CHECK_MSG(d != NULL, "cannot open %s", dir);
    if (d == NULL) TEST_MAIN_END();
    int files = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "rb");
        if (f == NULL) continue;
        uint8_t buf[1 << 16];
        size_t got = fread(buf, 1, sizeof buf, f);
        CHECK_MSG(feof(f), "%s is larger than %zu bytes", e->d_name, sizeof buf);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, got);
        files++;
    }
    closedir(d);
    CHECK_MSG(files >= 20, "only %d corpus files in %s", files, dir);
    printf("test_fuzz_query: %d files replayed\n", files);
    TEST_MAIN_END();
#endif
}
