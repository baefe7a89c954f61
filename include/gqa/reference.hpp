// gqa/reference.hpp — the naive attention, written the way the seeds and Hugging Face do it, in double.
//
// reference_attention() repeats K/V into H heads (`repeat_kv`, repeat_interleave order), materialises the full
// Sq x Sk score matrix of every head, applies scale, soft-cap, bias and masks in the order of gqa/options.hpp,
// and takes a max-subtracted softmax, all in double. ALiBi adds slope * (j - pos) after the bias; a sink joins the
// row's max and sum as one more logit without a value. A key masked by key lengths, causal, window or a -inf bias
// entry is skipped, so NaN in its K or V is never read; a NaN or +inf logit at a visible key makes the row NaN (the
// max-subtracted exp is NaN there), the rule gqa/options.hpp states for the kernels. It shares no code with the fast kernels (only the public
// option types), so the tests use it as the oracle and the benchmarks as the baseline. It is O(B*H*Sq*Sk) in
// memory and slow on purpose; never use it in a model.
//
// Shapes as gqa::attention: Q [B, Sq, H, D], K/V [B, Sk, G, D] (or via TensorRef strides), out [B, Sq, H, D].
#pragma once

#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace gqa {

/// Naive double-precision attention; returns out [B, Sq, H, D] in double. Validates only what it needs to index
/// safely (H % G, matching B and D, k/v shapes equal).
template <typename T, typename KVT>
Tensor4<double> reference_attention(TensorRef<const T> q, TensorRef<const KVT> k, TensorRef<const KVT> v,
                                    const AttentionOptions& opt = {}) {
  const Index B = q.dims[0], Sq = q.dims[1], H = q.dims[2], D = q.dims[3];
  const Index Sk = k.dims[1], G = k.dims[2];
  detail::require<shape_error>(G > 0 && H % G == 0, "shape", "reference: k dim 2 (G) = ", G,
                               " must divide q dim 2 (H) = ", H);
  detail::require<shape_error>(k.dims[0] == B && k.dims[3] == D && v.dims == k.dims, "shape",
                               "reference: k/v shapes disagree with q");
  detail::require<shape_error>(opt.sinks.empty() || opt.sinks.size() == H, "shape", "reference: options.sinks: size = ",
                               opt.sinks.size(), " but H = ", H);
  detail::require<shape_error>(opt.alibi_slopes.empty() || opt.alibi_slopes.size() == H, "shape",
                               "reference: options.alibi_slopes: size = ", opt.alibi_slopes.size(), " but H = ", H);
  const Index group_size = H / G;
  const double scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D));
  const double neg_inf = -std::numeric_limits<double>::infinity();

  // repeat_kv: [B, Sk, G, D] -> [B, Sk, H, D], head h taking KV head h / group_size.
  Tensor4<double> k_rep(B, Sk, H, D), v_rep(B, Sk, H, D);
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < Sk; ++s)
      for (Index h = 0; h < H; ++h)
        for (Index d = 0; d < D; ++d) {
          k_rep(b, s, h, d) = double(k(b, s, h / group_size, d));
          v_rep(b, s, h, d) = double(v(b, s, h / group_size, d));
        }

  Tensor4<double> out(B, Sq, H, D);
  out.setZero();
  std::vector<double> scores(size_t(Sq * Sk));
  for (Index b = 0; b < B; ++b) {
    const Index len = opt.key_lengths.empty() ? Sk : Index(opt.key_lengths[b]);
    for (Index h = 0; h < H; ++h) {
      for (Index i = 0; i < Sq; ++i) {
        const Index pos = i + (len - Sq);  // bottom-right aligned absolute position of query i
        for (Index j = 0; j < Sk; ++j) {
          double s = 0;
          for (Index d = 0; d < D; ++d) s += double(q(b, i, h, d)) * k_rep(b, j, h, d);
          s *= scale;
          if (opt.softcap > 0) s = opt.softcap * std::tanh(s / opt.softcap);
          bool visible = j < len;
          if (!opt.bias.empty()) {
            const double bias = opt.bias(b, h, i, j);
            s += bias;
            visible = visible && bias != neg_inf;
          }
          if (!opt.alibi_slopes.empty()) s += double(opt.alibi_slopes[h]) * double(j - pos);
          if (opt.causal || opt.window > 0) visible = visible && j <= pos;
          if (opt.window > 0) visible = visible && j >= pos - opt.window + 1;
          scores[size_t(i * Sk + j)] = visible ? s : neg_inf;
        }
      }
      for (Index i = 0; i < Sq; ++i) {
        double* row = &scores[size_t(i * Sk)];
        double m = neg_inf;
        bool nan = false;  // a NaN logit at a visible key: the row is NaN (max_element would skip it)
        for (Index j = 0; j < Sk; ++j) nan = nan || std::isnan(row[j]), m = std::max(m, row[j]);
        if (nan) {
          for (Index d = 0; d < D; ++d) out(b, i, h, d) = std::numeric_limits<double>::quiet_NaN();
          if (!opt.lse.empty()) opt.lse[(b * H + h) * Sq + i] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        // A sink is one more logit of the row with no value (gpt-oss): it joins the max and the sum, not the output.
        const double sink = opt.sinks.empty() ? neg_inf : double(opt.sinks[h]);
        if (m == neg_inf) {
          if (!opt.lse.empty()) opt.lse[(b * H + h) * Sq + i] = float(sink);
          continue;  // no visible key: zeros (the sink, if any, takes all the weight)
        }
        m = std::max(m, sink);
        double sum = std::exp(sink - m);
        for (Index j = 0; j < Sk; ++j) sum += (row[j] = std::exp(row[j] - m));
        for (Index j = 0; j < Sk; ++j) {
          if (row[j] == 0) continue;  // masked (or underflowed): its value, even NaN padding, is never read
          for (Index d = 0; d < D; ++d) out(b, i, h, d) += row[j] / sum * v_rep(b, j, h, d);
        }
        if (!opt.lse.empty()) opt.lse[(b * H + h) * Sq + i] = float(m + std::log(sum));
      }
    }
  }
  return out;
}

/// Overload for any mix of Eigen tensors (token-major) and TensorRefs (e.g. gqa::head_major(k)), as gqa::attention.
template <typename Q, typename K, typename V,
          typename = std::enable_if_t<!detail::is_tensor_ref<Q>::value || !detail::is_tensor_ref<K>::value ||
                                      !detail::is_tensor_ref<V>::value>>
Tensor4<double> reference_attention(const Q& q, const K& k, const V& v, const AttentionOptions& opt = {}) {
  using T = detail::ref_elem_t<decltype(detail::as_ref(q))>;
  using KVT = detail::ref_elem_t<decltype(detail::as_ref(k))>;
  return reference_attention<T, KVT>(detail::as_ref(q), detail::as_ref(k), detail::as_ref(v), opt);
}

}  // namespace gqa
