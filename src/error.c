#include "error.h"

#include <stdarg.h>
#include <stdio.h>

bs_status bs_fail(bs_error *err, bs_status status, const char *fmt, ...) {
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        err->code = status;
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

void bs_error_clear(bs_error *err) {
    if (err != NULL) {
        err->code = BS_OK;
        err->message[0] = '\0';
    }
}

const char *bs_status_name(bs_status status) {
    switch (status) {
    case BS_OK: return "BS_OK";
    case BS_ERR_INVALID_ARGUMENT: return "BS_ERR_INVALID_ARGUMENT";
    case BS_ERR_INVALID_DATA: return "BS_ERR_INVALID_DATA";
    case BS_ERR_NO_MEMORY: return "BS_ERR_NO_MEMORY";
    case BS_ERR_IO: return "BS_ERR_IO";
    case BS_ERR_CORRUPT: return "BS_ERR_CORRUPT";
    case BS_ERR_UNSUPPORTED_VERSION: return "BS_ERR_UNSUPPORTED_VERSION";
    case BS_ERR_ARTIFACT_MISMATCH: return "BS_ERR_ARTIFACT_MISMATCH";
    case BS_ERR_UNSUPPORTED_CPU: return "BS_ERR_UNSUPPORTED_CPU";
    case BS_ERR_INTERNAL: return "BS_ERR_INTERNAL";
    }
    return "BS_ERR_UNKNOWN";
}

unsigned bs_version_number(void) { return BS_VERSION_NUMBER; }
