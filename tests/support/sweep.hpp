// tests/support/sweep.hpp — the attention calls that the forward and backward tests both sweep.
//
// Offers:
//   gqa_test::MaskCase         one call's shape, masks (causal, window, ragged key lengths) and seed
//   gqa_test::case_lengths     the key lengths of a case: ragged in [min_len, Sk] with one at Sk, else all Sk
//   gqa_test::head_sweep       every (H, G) against every D on small (Sq, Sk): big heads, small sequences
//   gqa_test::sequence_sweep   long (Sq, Sk) with few heads and small D, so the O(Sq*Sk) references stay fast
//   gqa_test::edge_cases       S = 1, MHA, MQA, D = 1, odd D, a group larger than a 128-row tile, tile boundaries
//   gqa_test::poison_padding   NaN in the K/V rows past each key length: a kernel must never read padding
//   gqa_test::with_sinks_and_alibi  the cases again with attention sinks, ALiBi slopes or both (in turn)
//   gqa_test::HeadValues       a case's sinks and slopes (storage for AttentionOptions::sinks / alibi_slopes)
//   gqa_test::row_sees_no_key  whether query i of sequence b has no visible key under the case's masks
#pragma once

#include "support/random.hpp"

#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gqa_test {

/// One attention call of the sweep: shape, masks and a seed.
struct MaskCase {
  Shape s;
  bool causal = false;
  Index window = 0;
  bool ragged = false;  // random key lengths in [min_len, Sk], the last sequence at Sk
  std::uint64_t seed = 1;
  Index min_len = 0;
  bool sinks = false;  // options.sinks: a logit per head (head 0 -inf = no sink when H > 1)
  bool alibi = false;  // options.alibi_slopes = gqa::alibi_slopes(H)

  /// The shape and masks, without the seed.
  std::string mask_name() const {
    std::ostringstream os;
    os << s.str() << (causal ? "/causal" : "") << (window ? "/window:" + std::to_string(window) : "")
       << (ragged ? "/ragged" + (min_len ? ">=" + std::to_string(min_len) : std::string()) : "")
       << (sinks ? "/sinks" : "") << (alibi ? "/alibi" : "");
    return os.str();
  }
  std::string name() const { return mask_name() + "/seed:" + std::to_string(seed); }
};

inline std::vector<std::int32_t> case_lengths(const MaskCase& c) {
  return c.ragged ? ragged_lengths(c.s.B, c.s.Sk, c.seed + 1000, c.min_len)
                  : std::vector<std::int32_t>(size_t(c.s.B), std::int32_t(c.s.Sk));
}

inline std::vector<MaskCase> head_sweep() {
  const std::pair<Index, Index> hg[] = {{6, 6}, {6, 3}, {9, 3}, {16, 4}, {27, 1}, {65, 5}, {32, 8}};
  const Index dims[] = {8, 59, 64, 111, 128};
  const std::pair<Index, Index> seq[] = {{1, 1}, {3, 17}, {13, 29}, {1, 130}, {33, 20}};
  std::vector<MaskCase> cases;
  std::uint64_t seed = 1;
  for (size_t i = 0; i < std::size(hg); ++i)
    for (size_t j = 0; j < std::size(dims); ++j) {
      const auto [sq, sk] = seq[(i + j) % std::size(seq)];
      MaskCase c;
      c.s = Shape{Index(1 + j % 2), sq, sk, hg[i].first, hg[i].second, dims[j]};
      c.causal = (i + j) % 2 == 1;
      c.ragged = c.s.B > 1 && (i % 3 == 0);
      c.seed = seed++;
      cases.push_back(c);
    }
  return cases;
}

inline std::vector<MaskCase> sequence_sweep() {
  std::vector<MaskCase> cases;
  auto add = [&](Shape s, bool causal, Index window, bool ragged, Index min_len = 0) {
    cases.push_back(MaskCase{s, causal, window, ragged, std::uint64_t(100 + cases.size()), min_len});
  };
  //    B  Sq    Sk    H  G  D
  add({1, 1, 1, 2, 1, 8}, false, 0, false);
  add({1, 1, 4096, 4, 2, 64}, false, 0, false);
  add({2, 1, 4096, 8, 2, 59}, true, 0, true);
  add({1, 113, 203, 6, 3, 59}, false, 0, false);
  add({3, 113, 203, 6, 3, 64}, true, 0, true);
  add({3, 113, 203, 6, 3, 64}, true, 0, true, 113);  // ragged and causal, every row sees a key
  add({2, 113, 203, 9, 3, 111}, true, 50, false);
  add({1, 1023, 1024, 2, 1, 8}, false, 0, false);
  add({1, 1023, 1024, 2, 1, 8}, true, 0, false);
  add({1, 1024, 1023, 2, 2, 8}, false, 0, false);
  add({1, 1024, 1023, 2, 2, 8}, true, 0, false);  // Sq > Sk: query 0 sees no key
  add({2, 1024, 1023, 3, 1, 9}, true, 129, true);
  add({1, 512, 256, 4, 1, 16}, true, 0, false);   // half the rows fully masked
  add({2, 512, 256, 4, 2, 17}, false, 0, true);
  return cases;
}

/// D is not a multiple of the AVX2 width (8 floats) nor of 4; keys span a tile boundary by one.
inline std::vector<MaskCase> edge_cases() {
  return {
      {{1, 1, 1, 1, 1, 1}, false, 0, false, 200},   {{2, 1, 1, 8, 1, 3}, true, 0, false, 201},
      {{1, 5, 7, 4, 4, 7}, false, 0, false, 202},   {{1, 7, 7, 4, 4, 9}, true, 0, false, 203},
      {{3, 1, 33, 12, 1, 17}, false, 0, true, 204}, {{1, 2, 129, 2, 2, 15}, true, 0, false, 205},
      {{1, 3, 257, 130, 1, 5}, false, 0, false, 206},  // a group larger than a tile's 128 rows
      {{2, 129, 129, 2, 1, 31}, true, 0, true, 207},
      {{2, 129, 300, 2, 1, 31}, true, 0, true, 209, 129}, {{1, 4, 12, 4, 2, 1}, true, 0, false, 208},
  };
}

/// The cases again, each with sinks, ALiBi or both in turn (seeds moved so the inputs differ from the plain run).
inline std::vector<MaskCase> with_sinks_and_alibi(const std::vector<MaskCase>& cases) {
  std::vector<MaskCase> r;
  for (size_t n = 0; n < cases.size(); ++n) {
    MaskCase c = cases[n];
    c.sinks = n % 3 != 1;
    c.alibi = n % 3 != 0;
    c.seed += 5000;
    r.push_back(c);
  }
  return r;
}

/// A case's per-head option values; empty when the case does not use them.
struct HeadValues {
  std::vector<float> sinks, alibi;

  explicit HeadValues(const MaskCase& c) {
    if (c.sinks) {
      Rng rng(c.seed + 3000);
      for (Index h = 0; h < c.s.H; ++h) sinks.push_back(float(rng.normal(0.0, 2.0)));
      if (c.s.H > 1) sinks[0] = -std::numeric_limits<float>::infinity();
    }
    if (c.alibi) alibi = gqa::alibi_slopes(c.s.H);
  }
  void set(gqa::AttentionOptions& opt) const {
    if (!sinks.empty()) opt.sinks = sinks;
    if (!alibi.empty()) opt.alibi_slopes = alibi;
  }
  /// Largest |ALiBi bias| of the case, slope * |j - p| with |j - p| < Sk + Sq: float logits of that size carry an
  /// absolute rounding error of ~bound * 2^-24, which the float kernels' tolerances must allow (0 without ALiBi).
  double alibi_bound(const MaskCase& c) const {
    double m = 0;
    for (float a : alibi) m = std::max(m, double(a));
    return m * double(c.s.Sk + c.s.Sq);
  }
};

/// Whether query i of sequence b (with len keys) sees no key under the case's causal / window masks.
inline bool row_sees_no_key(const MaskCase& c, Index len, Index i) {
  const Index pos = i + len - c.s.Sq;
  const bool causal = c.causal || c.window > 0;
  const Index hi = causal ? std::min(pos + 1, len) : len;
  const Index lo = c.window > 0 ? std::max<Index>(pos - c.window + 1, 0) : 0;
  return hi <= lo;
}

template <typename T>
void poison_padding(gqa::Tensor4<T>& t, const std::vector<std::int32_t>& len) {
  const T nan = T(std::numeric_limits<float>::quiet_NaN());
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index j = len[size_t(b)]; j < t.dimension(1); ++j)
      for (Index g = 0; g < t.dimension(2); ++g)
        for (Index d = 0; d < t.dimension(3); ++d) t(b, j, g, d) = nan;
}

}  // namespace gqa_test
