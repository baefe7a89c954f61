// Second ODR translation unit: the same computation as odr_a.cpp, but over zero-copy TensorMaps with the
// TensorRef reference overload, so both TUs instantiate overlapping and distinct parts of the headers.
#include <gqa/gqa.hpp>

#include "odr/odr.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace odr_test {

Result run_b() {
  std::vector<float> qb(kB * kS * kH * kD), kb(kB * kS * kG * kD), vb(kB * kS * kG * kD);
  for (std::size_t i = 0; i < qb.size(); ++i) qb[i] = float(std::sin(0.3 * double(i)));
  for (std::size_t i = 0; i < kb.size(); ++i) kb[i] = float(std::cos(0.7 * double(i)));
  for (std::size_t i = 0; i < vb.size(); ++i) vb[i] = float(std::sin(0.1 * double(i) + 2.0));
  gqa::Tensor4Map<float> q(qb.data(), kB, kS, kH, kD), k(kb.data(), kB, kS, kG, kD), v(vb.data(), kB, kS, kG, kD);

  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.num_threads = 1;
  const gqa::Tensor4<float> out = gqa::attention(q, k, v, opt);
  const gqa::Tensor4<double> ref = gqa::reference_attention<float, float>(
      gqa::make_ref(q), gqa::make_ref(k), gqa::make_ref(v), opt);

  Result r;
  r.out.assign(out.data(), out.data() + out.size());
  r.max_diff = 0;
  for (gqa::Index i = 0; i < out.size(); ++i)
    r.max_diff = std::max(r.max_diff, std::fabs(double(out.data()[i]) - ref.data()[i]));
  r.attention = &gqa::attention<gqa::Dynamic>;
  r.reference = &gqa::reference_attention<float, float>;
  r.dynamic = &gqa::Dynamic;
  return r;
}

void bad_shape_b() {
  gqa::Tensor4<float> q(1, 2, 6, 8), k(1, 2, 4, 8), v(1, 2, 4, 8), out(1, 2, 6, 8);
  q.setZero();
  k.setZero();
  v.setZero();
  gqa::attention(q, k, v, out);  // G = 4 does not divide H = 6
}

}  // namespace odr_test
