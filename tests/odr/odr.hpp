// tests/odr/odr.hpp — what the two ODR translation units (odr_a.cpp, odr_b.cpp) export to tests/test_odr.cpp.
//
// Both TUs include the umbrella gqa/gqa.hpp and the checkpoint I/O headers it leaves out (gqa::checkpoint), and
// instantiate the same templates. A header that defines a non-inline function or variable makes the link fail
// (multiple definition); one that gives something internal linkage (static, an unnamed namespace) shows up as
// different addresses for the "same" entity in each TU.
#pragma once

#include <gqa/checkpoint.hpp>
#include <gqa/gqa.hpp>
#include <gqa/safetensors.hpp>

#include <vector>

namespace odr_test {

using AttentionFn = void (*)(const gqa::Tensor4<float>&, const gqa::Tensor4<float>&, const gqa::Tensor4<float>&,
                             gqa::Tensor4<float>&, const gqa::AttentionOptions&);
using ReferenceFn = gqa::Tensor4<double> (*)(gqa::TensorRef<const float>, gqa::TensorRef<const float>,
                                             gqa::TensorRef<const float>, const gqa::AttentionOptions&);

struct Result {
  std::vector<float> out;  ///< causal GQA output, [B, S, H, D] flattened
  double max_diff = -1;    ///< max |out - reference_attention|
  AttentionFn attention = nullptr;
  ReferenceFn reference = nullptr;
  const int* dynamic = nullptr;  ///< &gqa::Dynamic (an inline variable: one address per program)
};

/// Fixed, deterministic problem sizes shared by both TUs.
inline constexpr gqa::Index kB = 2, kS = 11, kH = 6, kG = 2, kD = 24;

Result run_a();
Result run_b();
/// Calls gqa::attention with G not dividing H, inside odr_b.cpp; gqa::shape_error propagates to the caller.
void bad_shape_b();

}  // namespace odr_test
