/* Replays every file of fuzz/corpus/segment_open through the fuzz target's
 * own function, without libFuzzer, so plain ctest keeps the corpus as a
 * regression suite. Files named valid_* must open; trunc_* and flip_* must
 * be refused. The corpus is located through BS_SOURCE_DIR (set by CMake). */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testing.h"

#include "../../fuzz/fuzz_segment_open.c"

static int starts(const char *s, const char *p) {
    return strncmp(s, p, strlen(p)) == 0;
}

int main(void) {
#ifndef BS_SOURCE_DIR
    printf("test_fuzz_corpus: skipped: BS_SOURCE_DIR is not defined\n");
    return 77;
#else
    const char *dir = BS_SOURCE_DIR "/fuzz/corpus/segment_open";
    DIR *d = opendir(dir);
    CHECK_MSG(d != NULL, "cannot open %s", dir);
    if (d == NULL) TEST_MAIN_END();
    int files = 0, valid = 0, refused = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "rb");
        if (f == NULL) continue;
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *data = malloc(n > 0 ? (size_t)n : 1);
        size_t got = data ? fread(data, 1, (size_t)n, f) : 0;
        fclose(f);
        CHECK(data != NULL && got == (size_t)n);
        if (data == NULL) continue;
        files++;
        LLVMFuzzerTestOneInput(data, got);

        void *buf = NULL;
        if (posix_memalign(&buf, 64, got ? got : 1) == 0) {
            memcpy(buf, data, got);
            bs_segment *seg = NULL;
            bs_error err;
            bs_status st = bs_segment_open(buf, got, &seg, &err);
            if (starts(e->d_name, "valid_")) {
                CHECK_MSG(st == BS_OK, "%s: %s", e->d_name, err.message);
                valid++;
            } else if (starts(e->d_name, "trunc_") || starts(e->d_name, "flip_")) {
                CHECK_MSG(st == BS_ERR_CORRUPT || st == BS_ERR_UNSUPPORTED_VERSION,
                          "%s opened with %s", e->d_name, bs_status_name(st));
                refused++;
            }
            bs_segment_free(seg);
            free(buf);
        }
        free(data);
    }
    closedir(d);
    CHECK_MSG(valid > 0 && refused > 0, "corpus has %d valid and %d refused files",
              valid, refused);
    printf("test_fuzz_corpus: %d files (%d valid, %d refused, the rest fuzzer "
           "finds)\n",
           files, valid, refused);
    TEST_MAIN_END();
#endif
}
