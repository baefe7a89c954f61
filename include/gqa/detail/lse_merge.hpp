// gqa/detail/lse_merge.hpp — merging partial attentions of the same query rows over disjoint key sets, by their
// log-sum-exp: the one merge that the sequence-sharded decode and the ring prefill of gqa/distributed.hpp share.
//
// A partial is out [B, S, H, D] (token-major, contiguous) with its lse [B, H, S] (contiguous, as
// AttentionOptions::lse holds it). For one row with partials (o1, l1) and (o2, l2) over disjoint key sets:
//   m = max(l1, l2),  w1 = exp(l1 - m),  w2 = exp(l2 - m)
//   o = (w1 o1 + w2 o2) / (w1 + w2),  l = m + log(w1 + w2)
// which is the attention over the union. A side with no key (l = -inf) has weight 0: merging into an empty
// accumulator (zeros, -inf) gives the other side exactly, and two empty sides stay zeros and -inf (the
// convention for a row with no visible key). A NaN lse (a visible NaN logit) makes the row NaN. The weights are in
// double; each row is merged on its own, so the result does not depend on the thread count.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/types.hpp"

#include <cmath>
#include <limits>

namespace gqa {
namespace detail {

/// Shape of a partial: out [batch, rows, heads, head_dim], lse [batch, heads, rows].
struct PartialShape {
  Index batch = 0, rows = 0, heads = 0, head_dim = 0;
  Index out_size() const noexcept { return batch * rows * heads * head_dim; }
  Index lse_size() const noexcept { return batch * heads * rows; }
};

/// Merges the partial (part_out, part_lse) into the accumulator (acc_out, acc_lse), in place (header comment), on
/// up to `threads` OpenMP threads (the caller's options.num_threads, resolved).
template <typename T>
void merge_partial(const PartialShape& s, T* acc_out, float* acc_lse, const T* part_out, const float* part_lse,
                   int threads) {
  const Index rows = s.batch * s.rows * s.heads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * s.head_dim >= (1 << 15))
  for (Index row = 0; row < rows; ++row) {
    const Index b = row / (s.rows * s.heads), i = (row / s.heads) % s.rows, h = row % s.heads;
    float& l_acc = acc_lse[(b * s.heads + h) * s.rows + i];
    const double l1 = l_acc, l2 = part_lse[(b * s.heads + h) * s.rows + i];
    T* o = acc_out + row * s.head_dim;
    const T* p = part_out + row * s.head_dim;
    if (std::isnan(l1) || std::isnan(l2)) {
      for (Index d = 0; d < s.head_dim; ++d) o[d] = std::numeric_limits<T>::quiet_NaN();
      l_acc = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const double m = l1 > l2 ? l1 : l2;
    if (m == -std::numeric_limits<double>::infinity()) continue;  // both empty: zeros, -inf
    const double w1 = std::exp(l1 - m), w2 = std::exp(l2 - m), sum = w1 + w2;
    const double a = w1 / sum, c = w2 / sum;
    if (w1 == 0) {
      for (Index d = 0; d < s.head_dim; ++d) o[d] = p[d];  // exactly the other side (o1 may be anything)
    } else {
      for (Index d = 0; d < s.head_dim; ++d) o[d] = T(a * double(o[d]) + c * double(p[d]));
    }
    l_acc = float(m + std::log(sum));
  }
}

/// An empty accumulator: zeros and -inf (no key seen yet).
template <typename T>
void clear_partial(const PartialShape& s, T* out, float* lse) {
  for (Index i = 0; i < s.out_size(); ++i) out[i] = T(0);
  for (Index i = 0; i < s.lse_size(); ++i) lse[i] = -std::numeric_limits<float>::infinity();
}

}  // namespace detail
}  // namespace gqa
