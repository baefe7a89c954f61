// gqa/detail/internal_header_check.hpp — keeps the detail headers out of users' includes (Eigen's
// InternalHeaderCheck idea). The headers in gqa/detail/ are machinery whose names and contents change without
// notice; users include the public headers (gqa/attention.hpp, gqa/safetensors.hpp, ..., or gqa/gqa.hpp).
//
// The pattern, for every header in gqa/detail/ (the first line after #pragma once):
//
//   #include "gqa/detail/internal_header_check.hpp"
//
// and in every public header, before its first detail include:
//
//   #define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
//   #include "gqa/detail/flash_fwd.hpp"
//
// A test that exercises a detail header directly includes the public header that uses it first. ctest's
// detail_header_guard.* tests preprocess each detail header alone and expect the error below, so a new detail
// header without the line fails them.
//
// No #pragma once: every inclusion checks.
#ifndef GQA_DETAIL_ALLOWED
#error "gqa/detail/ headers are internal: include the public gqa/ header that offers the feature, or gqa/gqa.hpp"
#endif
