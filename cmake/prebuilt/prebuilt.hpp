// cmake/prebuilt/prebuilt.hpp — the template instantiations that dominate the compile time of gqa's own tests,
// examples and tools, compiled once for all of them (build time only: nothing here is part of the library or its
// install).
//
// Instantiating the forward and backward attention kernels for an element-type pair, or the fit conversion (its
// Eigen products and eigensolvers), is most of a TU's compile time (test_kv_cache.cpp: 34 s of CPU in Release, 8 s
// without the kernels; example_decoder: 47 s, 26 s; measured on the 2-core Xeon of bench/README.md). The targets
// that call gqa_use_prebuilt() (CMakeLists.txt) get this header force-included: its explicit instantiation
// declarations tell each TU to call these functions, not to compile them, and forward.cpp, backward.cpp and
// convert.cpp compile them once, with the same flags (gqa_dev_flags and the build type's), into the gqa_prebuilt
// library. The sources do not know about it: a user who copies an example compiles what it uses as usual.
// A type missing here is still compiled implicitly where it is used, so the lists only affect build time.
#pragma once

#include "gqa/attention.hpp"
#include "gqa/attention_backward.hpp"
#include "gqa/convert.hpp"

#include <cstdint>
#include <vector>

// Q/out element type, K/V element type: forward and backward; then int8 K/V (a KVCache<std::int8_t>), forward only.
#define GQA_PREBUILT_KERNEL_TYPES(X)                                                                            \
  X(float, float) X(float, gqa::bfloat16) X(float, gqa::half) X(double, double) X(double, float)               \
  X(gqa::bfloat16, gqa::bfloat16) X(gqa::bfloat16, float) X(gqa::half, gqa::half) X(gqa::half, float)
#define GQA_PREBUILT_INT8_KERNEL_TYPES(X) X(float, std::int8_t) X(double, std::int8_t)
// Checkpoint element types (gqa::convert_checkpoint dispatches to all four).
#define GQA_PREBUILT_CONVERT_TYPES(X) X(float) X(double) X(gqa::bfloat16) X(gqa::half)

#define GQA_PREBUILT_FORWARD(DECLARE, T, KVT)                                                                   \
  DECLARE template void gqa::detail::flash_fwd<gqa::detail::AttentionParams<T, KVT>>(                           \
      const gqa::detail::AttentionParams<T, KVT>&);
#define GQA_PREBUILT_BACKWARD(DECLARE, T, KVT)                                                                  \
  DECLARE template void gqa::detail::flash_attention_backward<gqa::detail::BackwardParams<T, KVT>>(             \
      const gqa::detail::BackwardParams<T, KVT>&);
#define GQA_PREBUILT_KERNELS(DECLARE, T, KVT) GQA_PREBUILT_FORWARD(DECLARE, T, KVT) GQA_PREBUILT_BACKWARD(DECLARE, T, KVT)
#define GQA_PREBUILT_FIT(DECLARE, T)                                                                            \
  DECLARE template gqa::AttentionWeights<T> gqa::detail::pool_attention_fit<T>(                                 \
      const gqa::AttentionView<T>&, const gqa::AttentionShape&, const std::vector<std::vector<gqa::Index>>&);

#ifndef GQA_PREBUILT_DEFINE
#define GQA_PREBUILT_EXTERN_KERNELS(T, KVT) GQA_PREBUILT_KERNELS(extern, T, KVT)
#define GQA_PREBUILT_EXTERN_FORWARD(T, KVT) GQA_PREBUILT_FORWARD(extern, T, KVT)
#define GQA_PREBUILT_EXTERN_FIT(T) GQA_PREBUILT_FIT(extern, T)
GQA_PREBUILT_KERNEL_TYPES(GQA_PREBUILT_EXTERN_KERNELS)
GQA_PREBUILT_INT8_KERNEL_TYPES(GQA_PREBUILT_EXTERN_FORWARD)
GQA_PREBUILT_CONVERT_TYPES(GQA_PREBUILT_EXTERN_FIT)
#undef GQA_PREBUILT_EXTERN_KERNELS
#undef GQA_PREBUILT_EXTERN_FORWARD
#undef GQA_PREBUILT_EXTERN_FIT
#endif
