// tests/support/int8_queries.hpp — the queries as the int8 decode kernels multiply them, for references on an int8
// cache (gqa/detail/int8_scores.hpp: the rows of a KV head quantised to int8 where int8_dot_rows allows).
#pragma once

#include "gqa/attention.hpp"  // the public header first: it includes the detail headers used below
#include "gqa/types.hpp"

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace gqa_test {

/// Whether attention on an int8 K with Sq queries and `group` query heads per KV head takes the integer score
/// kernels: decode, whose items hold all Sq * group rows of a KV head (flash_fwd.hpp's plan_tiles), in a count
/// int8_dot_rows accepts.
inline bool int8_scores_apply(gqa::Index Sq, gqa::Index group, gqa::Index D) {
  namespace mk = gqa::detail::mk;
  const gqa::Index rows = Sq * group;
  return D % mk::kLanes<float> == 0 && rows <= mk::kMaxRows<float> && mk::int8_dot_rows(rows, D);
}

/// q [B, Sq, H, D] as the kernels multiply it against K of type KV with G KV heads: for an int8 K where the integer
/// kernels apply, each row of q * softmax_scale quantised (quantize_query_row) and widened back, then divided by the
/// softmax scale, which the reference applies again; else q itself.
template <typename KV>
gqa::Tensor4<float> kernel_queries(const gqa::Tensor4<float>& q, gqa::Index G, double softmax_scale = 0) {
  const gqa::Index B = q.dimension(0), Sq = q.dimension(1), H = q.dimension(2), D = q.dimension(3);
  if (!std::is_same_v<KV, std::int8_t> || !int8_scores_apply(Sq, H / G, D)) return q;
  const float scale = float(softmax_scale > 0 ? softmax_scale : 1.0 / std::sqrt(double(D)));
  gqa::Tensor4<float> out(B, Sq, H, D);
  std::vector<float> row(static_cast<size_t>(D));
  std::vector<std::int8_t> q8(static_cast<size_t>(D));
  for (gqa::Index b = 0; b < B; ++b)
    for (gqa::Index s = 0; s < Sq; ++s)
      for (gqa::Index h = 0; h < H; ++h) {
        for (gqa::Index d = 0; d < D; ++d) row[size_t(d)] = q(b, s, h, d) * scale;
        const float qs = gqa::detail::mk::quantize_query_row(row.data(), D, q8.data());
        for (gqa::Index d = 0; d < D; ++d) out(b, s, h, d) = float(q8[size_t(d)]) * qs / scale;
      }
  return out;
}

}  // namespace gqa_test
