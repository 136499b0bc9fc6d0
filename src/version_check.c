/* The on-disk format and the kernels assume a little-endian host with
 * IEEE-754 floats; refuse to build anywhere else rather than misread. */
#include <float.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bitshard requires a little-endian host"
#endif
#if FLT_MANT_DIG != 24
#error "bitshard requires IEEE-754 binary32 floats"
#endif

/* ISO C forbids an empty translation unit. */
typedef int bs_version_check_unit;
