// tests/support/random.hpp — reproducible random inputs for the attention tests.
//
// Offers:
//   gqa_test::Shape                 B, Sq, Sk, H, G, D of one attention call, printable as "B:2/Sq:3/..."
//   gqa_test::Rng                   splitmix64: the same stream on every platform and standard library
//                                   (std::uniform_real_distribution is implementation-defined, so it is avoided)
//   gqa_test::fill_uniform/normal   seeded fills of a Tensor4<T> or a TensorRef<T> (any element type)
//   gqa_test::random_inputs<T,KVT>  Q [B,Sq,H,D], K/V [B,Sk,G,D] for a Shape and a seed
//   gqa_test::ragged_lengths        key lengths in [min, Sk] with one sequence at the maximum Sk
#pragma once

#include "gqa/types.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace gqa_test {

using gqa::Index;

/// The sizes of one attention call (the GQA paper's symbols).
struct Shape {
  Index B = 1, Sq = 1, Sk = 1, H = 1, G = 1, D = 1;

  std::string str() const {
    std::ostringstream os;
    os << "B:" << B << "/H:" << H << "/G:" << G << "/D:" << D << "/Sq:" << Sq << "/Sk:" << Sk;
    return os.str();
  }
};

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and with a fully specified output sequence.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1), 53 random bits.
  double uniform01() { return double(next() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform01(); }
  /// Standard normal by Box-Muller (one value per call; simplicity over speed).
  double normal(double mean = 0.0, double stddev = 1.0) {
    const double u1 = 1.0 - uniform01();  // (0, 1]: log(u1) is finite
    const double u2 = uniform01();
    return mean + stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  /// Uniform integer in [lo, hi].
  Index integer(Index lo, Index hi) { return lo + Index(next() % std::uint64_t(hi - lo + 1)); }

 private:
  std::uint64_t state_;
};

template <typename T>
void fill_uniform(gqa::Tensor4<T>& t, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Rng rng(seed);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = T(rng.uniform(lo, hi));
}

template <typename T>
void fill_normal(gqa::Tensor4<T>& t, std::uint64_t seed, double mean = 0.0, double stddev = 1.0) {
  Rng rng(seed);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = T(rng.normal(mean, stddev));
}

/// Fills the logical elements of a strided view (and nothing else: spare capacity keeps its contents).
template <typename T>
void fill_normal(const gqa::TensorRef<T>& t, std::uint64_t seed, double mean = 0.0, double stddev = 1.0) {
  Rng rng(seed);
  for (Index b = 0; b < t.dims[0]; ++b)
    for (Index s = 0; s < t.dims[1]; ++s)
      for (Index h = 0; h < t.dims[2]; ++h)
        for (Index d = 0; d < t.dims[3]; ++d) t(b, s, h, d) = T(rng.normal(mean, stddev));
}

/// Q, K, V of one call: normal(0, 1) entries, so logits q.k/sqrt(D) are O(1) and the softmax is neither flat
/// nor one-hot (both would hide errors).
template <typename T, typename KVT = T>
struct Inputs {
  gqa::Tensor4<T> q;    // [B, Sq, H, D]
  gqa::Tensor4<KVT> k;  // [B, Sk, G, D]
  gqa::Tensor4<KVT> v;  // [B, Sk, G, D]
};

template <typename T, typename KVT = T>
Inputs<T, KVT> random_inputs(const Shape& s, std::uint64_t seed) {
  Inputs<T, KVT> in{gqa::Tensor4<T>(s.B, s.Sq, s.H, s.D), gqa::Tensor4<KVT>(s.B, s.Sk, s.G, s.D),
                    gqa::Tensor4<KVT>(s.B, s.Sk, s.G, s.D)};
  fill_normal(in.q, seed * 3 + 0);
  fill_normal(in.k, seed * 3 + 1);
  fill_normal(in.v, seed * 3 + 2);
  return in;
}

/// Key lengths for a ragged batch: each in [min_len, Sk], the last sequence exactly Sk (the maximum).
inline std::vector<std::int32_t> ragged_lengths(Index batch, Index k_len, std::uint64_t seed, Index min_len = 0) {
  Rng rng(seed);
  std::vector<std::int32_t> len(static_cast<size_t>(batch));
  for (auto& l : len) l = std::int32_t(rng.integer(std::min(min_len, k_len), k_len));
  if (batch > 0) len.back() = std::int32_t(k_len);
  return len;
}

}  // namespace gqa_test
