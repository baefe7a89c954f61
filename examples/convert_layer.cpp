// Converts one multi-head attention layer to GQA / MQA in memory (gqa/convert.hpp) and shows how far its output
// moves from the MHA layer's, for each number of groups G and each pooling method of the GQA paper's ablation.
//
// The weights are synthetic: every K/V head is a component shared by all heads plus its own noise of the same
// size, so pooling has something to keep. (With fully independent random heads there is nothing to keep and every
// method is equally bad; trained checkpoints lie in between, which is why the paper uptrains after pooling.)
//
//   example_convert_layer
#include "gqa/attention.hpp"
#include "gqa/convert.hpp"

#include <cmath>
#include <cstdio>
#include <random>

namespace {

using Weight = gqa::RowMajorTensor<float, 2>;  // nn.Linear layout [heads*D, hidden]

constexpr gqa::Index B = 1, S = 32, hidden = 64, H = 8, D = 16;

/// x [B*S, hidden] times w^T -> [B, S, heads, D] (what nn.Linear and .view(B, S, heads, D) do).
gqa::Tensor4<float> project(const Weight& x, const Weight& w) {
  const gqa::Index heads = w.dimension(0) / D;
  gqa::Tensor4<float> y(B, S, heads, D);
  for (gqa::Index t = 0; t < B * S; ++t)
    for (gqa::Index r = 0; r < heads * D; ++r) {
      float acc = 0.f;
      for (gqa::Index i = 0; i < hidden; ++i) acc += x(t, i) * w(r, i);
      y(t / S, t % S, r / D, r % D) = acc;
    }
  return y;
}

/// Synthetic projection: a shared head plus per-head noise of the same scale, in [H*D, hidden].
Weight correlated_heads(std::mt19937& rng, float noise) {
  std::normal_distribution<float> n(0.f, 1.f / std::sqrt(float(hidden)));
  Weight shared(D, hidden), w(H * D, hidden);
  for (gqa::Index i = 0; i < shared.size(); ++i) shared.data()[i] = n(rng);
  for (gqa::Index r = 0; r < H * D; ++r)
    for (gqa::Index i = 0; i < hidden; ++i) w(r, i) = shared(r % D, i) + noise * n(rng);
  return w;
}

double relative_difference(const gqa::Tensor4<float>& a, const gqa::Tensor4<float>& b) {
  double num = 0, den = 0;
  for (gqa::Index i = 0; i < a.size(); ++i) {
    const double d = double(a.data()[i]) - double(b.data()[i]);
    num += d * d;
    den += double(b.data()[i]) * double(b.data()[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main() {
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.f, 1.f);
  Weight x(B * S, hidden);
  for (gqa::Index i = 0; i < x.size(); ++i) x.data()[i] = n(rng);
  const Weight wq = correlated_heads(rng, 1.f), wk = correlated_heads(rng, 1.f), wv = correlated_heads(rng, 1.f);

  gqa::AttentionOptions causal;
  causal.causal = true;
  const auto q = project(x, wq);
  const gqa::Tensor4<float> mha = gqa::attention(q, project(x, wk), project(x, wv), causal);

  std::printf("one attention layer: H = %ld query heads, D = %ld, hidden = %ld, %ld tokens, causal\n", long(H),
              long(D), long(hidden), long(S));
  std::printf("relative L2 difference of the output from MHA's, ||out_G - out_MHA|| / ||out_MHA||\n\n");
  std::printf("%4s %10s %12s %12s %12s\n", "G", "kind", "mean", "first", "random");
  for (gqa::Index g : {H, H / 2, H / 4, gqa::Index(1)}) {
    std::printf("%4ld %10s", long(g), g == H ? "MHA" : g == 1 ? "MQA" : "GQA");
    for (gqa::PoolMethod m : {gqa::PoolMethod::mean, gqa::PoolMethod::first, gqa::PoolMethod::random}) {
      gqa::ConvertOptions opt;
      opt.method = m;
      opt.seed = 7;
      const Weight k = gqa::pool_heads(wk, H, g, opt);  // [g*D, hidden]
      opt.seed = 8;
      const Weight v = gqa::pool_heads(wv, H, g, opt);
      const gqa::Tensor4<float> out = gqa::attention(q, project(x, k), project(x, v), causal);
      std::printf(" %12.4f", relative_difference(out, mha));
    }
    std::printf("\n");
  }

  // The reverse is exact: expanding the G = 2 layer back to H heads and pooling again gives the same weights.
  const Weight k2 = gqa::pool_heads(wk, H, 2);
  const Weight round_trip = gqa::pool_heads(gqa::expand_heads(k2, 2, H), H, 2);
  bool same = true;
  for (gqa::Index i = 0; i < k2.size(); ++i) same = same && k2.data()[i] == round_trip.data()[i];
  std::printf("\nexpand G = 2 -> %ld heads -> pool back to 2: %s\n", long(H), same ? "bit-identical" : "DIFFERENT");
  return same ? 0 : 1;
}
