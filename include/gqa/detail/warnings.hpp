// gqa/detail/warnings.hpp — GQA_DETAIL_WARNINGS_OFF / GQA_DETAIL_WARNINGS_ON around the kernel headers' code.
//
// GCC 12 (Debian 12's compiler) writes its x86 intrinsics' "undefined" operands as self-initialised variables
// (`__m256d __Y = __Y;` in _mm256_undefined_pd), so every AVX-512 extract, unpack or reduction that Eigen's packet
// math inlines into gqa's kernels warns -Wmaybe-uninitialized / -Wuninitialized under -Wall -O2 (GCC PR 105593,
// fixed in GCC 12.3; Debian 12 ships 12.2): thousands of lines for one build of the tests, and for any user
// compiling with -Wall. The pragmas hold wherever the kernels are inlined; they change nothing else and nothing for
// other compilers. The guard covers every GCC before 13, the last ones with the pattern.
#include "gqa/detail/internal_header_check.hpp"

#ifndef GQA_DETAIL_WARNINGS_OFF
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#define GQA_DETAIL_WARNINGS_OFF                                \
  _Pragma("GCC diagnostic push")                               \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define GQA_DETAIL_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define GQA_DETAIL_WARNINGS_OFF
#define GQA_DETAIL_WARNINGS_ON
#endif
#endif
