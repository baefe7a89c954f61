// First ODR translation unit: GQA on owning gqa::Tensor4 through the umbrella header.
#include <gqa/gqa.hpp>

#include "odr/odr.hpp"

#include <algorithm>
#include <cmath>

namespace odr_test {

Result run_a() {
  gqa::Tensor4<float> q(kB, kS, kH, kD), k(kB, kS, kG, kD), v(kB, kS, kG, kD), out(kB, kS, kH, kD);
  for (gqa::Index i = 0; i < q.size(); ++i) q.data()[i] = float(std::sin(0.3 * double(i)));
  for (gqa::Index i = 0; i < k.size(); ++i) k.data()[i] = float(std::cos(0.7 * double(i)));
  for (gqa::Index i = 0; i < v.size(); ++i) v.data()[i] = float(std::sin(0.1 * double(i) + 2.0));

  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.num_threads = 1;
  gqa::attention(q, k, v, out, opt);
  const gqa::Tensor4<double> ref = gqa::reference_attention(q, k, v, opt);

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

}  // namespace odr_test
