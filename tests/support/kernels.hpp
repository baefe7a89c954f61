// tests/support/kernels.hpp — the attention kernels the tests call, instantiated once for all of them.
//
// Instantiating the forward and backward kernels for an element-type pair is most of a test TU's compile time
// (test_kv_cache.cpp: 34 s of CPU in Release, 8 s without it; measured on the 2-core Xeon of bench/README.md).
// The tests listed in tests/CMakeLists.txt (GQA_TESTS_SHARING_KERNELS) get this header force-included: its
// explicit instantiation declarations tell each TU to call the kernels, not to compile them, and
// tests/support/kernels.cpp and kernels_backward.cpp compile them once, with the same flags, into the
// gqa_test_kernels library.
// A pair missing here is still compiled implicitly where it is used, so the list only affects build time.
#pragma once

#include "gqa/attention.hpp"
#include "gqa/attention_backward.hpp"

#include <cstdint>

// Q/out element type, K/V element type: forward and backward; then int8 K/V (a KVCache<std::int8_t>), forward only.
#define GQA_TEST_KERNEL_TYPES(X)                                                                                \
  X(float, float) X(float, gqa::bfloat16) X(float, gqa::half) X(double, double) X(double, float)               \
  X(gqa::bfloat16, gqa::bfloat16) X(gqa::bfloat16, float) X(gqa::half, gqa::half) X(gqa::half, float)
#define GQA_TEST_INT8_KERNEL_TYPES(X) X(float, std::int8_t) X(double, std::int8_t)

#define GQA_TEST_FORWARD(DECLARE, T, KVT)                                                                       \
  DECLARE template void gqa::detail::flash_fwd<gqa::detail::AttentionParams<T, KVT>>(                           \
      const gqa::detail::AttentionParams<T, KVT>&);
#define GQA_TEST_BACKWARD(DECLARE, T, KVT)                                                                      \
  DECLARE template void gqa::detail::flash_attention_backward<gqa::detail::BackwardParams<T, KVT>>(             \
      const gqa::detail::BackwardParams<T, KVT>&);
#define GQA_TEST_KERNELS(DECLARE, T, KVT) GQA_TEST_FORWARD(DECLARE, T, KVT) GQA_TEST_BACKWARD(DECLARE, T, KVT)

#ifndef GQA_TEST_KERNELS_DEFINE
#define GQA_TEST_EXTERN_KERNELS(T, KVT) GQA_TEST_KERNELS(extern, T, KVT)
#define GQA_TEST_EXTERN_FORWARD(T, KVT) GQA_TEST_FORWARD(extern, T, KVT)
GQA_TEST_KERNEL_TYPES(GQA_TEST_EXTERN_KERNELS)
GQA_TEST_INT8_KERNEL_TYPES(GQA_TEST_EXTERN_FORWARD)
#undef GQA_TEST_EXTERN_KERNELS
#undef GQA_TEST_EXTERN_FORWARD
#endif
