// tests/support/reference_backward.hpp — the naive attention backward, in double: the oracle of
// tests/test_attention_backward.cpp.
//
// Written the way autograd would see a repeat_kv model, sharing no code with the kernel: K/V are repeated into H
// heads, every head's full Sq x Sk matrices are built (S, the soft-capped and biased logits Z, P = softmax(Z),
// dP = dO V^T), Delta_i = sum_j P_ij dP_ij is taken from P and dP themselves (not from the forward's output), and
// every query head adds its dK/dV into the KV head it reads (the sum over the group).
//
//   reference_backward(q, k, v, d_out, options) -> {d_q [B,Sq,H,D], d_k, d_v [B,Sk,G,D], d_bias [B,H,Sq,Sk],
//                                                    d_sinks [H]}
//
// ALiBi (a constant bias slope * (j - pos)) and sinks (a logit per head with no value, in the softmax) as
// gqa/options.hpp defines them; d_sinks[h] = sum over rows of dL/d(sink logit) = P_sink * (0 - Delta).
//
// d_bias is dL/dZ of every (b, h, i, j) (0 where masked); a broadcast bias's gradient is its sum over the
// broadcast dims, which callers can form from it.
//
// Non-finite inputs follow the forward's rule (gqa/options.hpp): a masked pair (padding, causal, window, a -inf
// bias entry) is absent from every sum, so NaN or inf in a masked key, or in a row that cannot see it, changes
// nothing; among visible pairs the formulas run as written, so NaN reaches exactly what they make depend on it.
#pragma once

#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace gqa_test {

struct ReferenceGradients {
  gqa::Tensor4<double> d_q;     // [B, Sq, H, D]
  gqa::Tensor4<double> d_k;     // [B, Sk, G, D]
  gqa::Tensor4<double> d_v;     // [B, Sk, G, D]
  gqa::Tensor4<double> d_bias;  // [B, H, Sq, Sk]
  std::vector<double> d_sinks;  // [H]: zeros without options.sinks
};

template <typename T, typename KVT>
ReferenceGradients reference_backward(gqa::TensorRef<const T> q, gqa::TensorRef<const KVT> k,
                                      gqa::TensorRef<const KVT> v, gqa::TensorRef<const T> d_out,
                                      const gqa::AttentionOptions& opt = {}) {
  using gqa::Index;
  const Index B = q.dims[0], Sq = q.dims[1], H = q.dims[2], D = q.dims[3], Sk = k.dims[1], G = k.dims[2];
  const Index rep = H / G;
  const double scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D));
  const double cap = opt.softcap;
  auto at = [](const std::vector<double>& m, Index cols, Index r, Index c) { return m[size_t(r * cols + c)]; };

  ReferenceGradients g{gqa::Tensor4<double>(B, Sq, H, D), gqa::Tensor4<double>(B, Sk, G, D),
                       gqa::Tensor4<double>(B, Sk, G, D), gqa::Tensor4<double>(B, H, Sq, Sk),
                       std::vector<double>(size_t(H), 0.0)};
  g.d_q.setZero();
  g.d_k.setZero();
  g.d_v.setZero();
  g.d_bias.setZero();
  std::vector<double> s(size_t(Sq * Sk)), p(s.size()), dp(s.size());
  std::vector<char> seen(s.size());  // (i, j) visible
  std::vector<double> kh(size_t(Sk * D)), vh(kh.size()), qh(size_t(Sq * D)), doh(qh.size());
  for (Index b = 0; b < B; ++b) {
    const Index len = opt.key_lengths.empty() ? Sk : Index(opt.key_lengths[b]);
    for (Index h = 0; h < H; ++h) {
      // repeat_kv: head h reads KV head h / rep. Padding (j >= len) is never read: it may hold NaN.
      for (Index j = 0; j < Sk; ++j)
        for (Index d = 0; d < D; ++d) {
          kh[size_t(j * D + d)] = j < len ? double(k(b, j, h / rep, d)) : 0.0;
          vh[size_t(j * D + d)] = j < len ? double(v(b, j, h / rep, d)) : 0.0;
        }
      for (Index i = 0; i < Sq; ++i)
        for (Index d = 0; d < D; ++d) {
          qh[size_t(i * D + d)] = double(q(b, i, h, d));
          doh[size_t(i * D + d)] = double(d_out(b, i, h, d));
        }
      for (Index i = 0; i < Sq; ++i) {
        // Masked pairs (padding, causal, window, a -inf bias entry) take no part at all, whatever K/V hold there
        // (the forward's rule, gqa/options.hpp); visible pairs are plain IEEE arithmetic, so a NaN or inf goes
        // wherever the formulas carry it. The running max propagates NaN (std::max would drop it).
        const Index pos = i + (len - Sq);
        constexpr double kNegInf = -std::numeric_limits<double>::infinity();
        double m = kNegInf;
        for (Index j = 0; j < Sk; ++j) {
          double x = 0, y = 0;
          for (Index d = 0; d < D; ++d) {
            x += at(qh, D, i, d) * at(kh, D, j, d);
            y += at(doh, D, i, d) * at(vh, D, j, d);
          }
          x *= scale;
          s[size_t(i * Sk + j)] = x;  // before the cap: its derivative needs it
          if (cap > 0) x = cap * std::tanh(x / cap);
          bool visible = j < len;
          if (opt.causal || opt.window > 0) visible = visible && j <= pos;
          if (opt.window > 0) visible = visible && j >= pos - opt.window + 1;
          if (!opt.bias.empty()) {
            const double bias = opt.bias(b, h, i, j);
            visible = visible && bias != kNegInf;
            x += bias;
          }
          if (!opt.alibi_slopes.empty()) x += double(opt.alibi_slopes[h]) * double(j - pos);
          seen[size_t(i * Sk + j)] = visible;
          p[size_t(i * Sk + j)] = x;
          dp[size_t(i * Sk + j)] = y;
          if (visible && !std::isnan(m) && (std::isnan(x) || x > m)) m = x;
        }
        if (m == kNegInf) continue;  // no visible key, or only -inf logits: the forward's zero row, no gradient
        // The sink: one more logit in the max and the sum, with no value (so no dP), whose weight is dropped.
        const double sink = opt.sinks.empty() ? kNegInf : double(opt.sinks[h]);
        if (!std::isnan(m)) m = std::max(m, sink);
        double sum = std::exp(sink - m);
        for (Index j = 0; j < Sk; ++j)
          if (seen[size_t(i * Sk + j)]) sum += std::exp(p[size_t(i * Sk + j)] - m);
        double delta = 0;
        for (Index j = 0; j < Sk; ++j) {
          double& e = p[size_t(i * Sk + j)];
          e = seen[size_t(i * Sk + j)] ? std::exp(e - m) / sum : 0.0;
          if (seen[size_t(i * Sk + j)]) delta += e * dp[size_t(i * Sk + j)];
        }
        if (sink != kNegInf) g.d_sinks[size_t(h)] += std::exp(sink - m) / sum * (0.0 - delta);
        for (Index j = 0; j < Sk; ++j) {
          if (!seen[size_t(i * Sk + j)]) continue;
          const double pij = p[size_t(i * Sk + j)];
          const double dz = pij * (dp[size_t(i * Sk + j)] - delta);
          g.d_bias(b, h, i, j) = dz;
          double ds = dz;
          if (cap > 0) {
            const double th = std::tanh(s[size_t(i * Sk + j)] / cap);
            ds *= 1 - th * th;
          }
          for (Index d = 0; d < D; ++d) {
            g.d_q(b, i, h, d) += scale * ds * at(kh, D, j, d);
            g.d_k(b, j, h / rep, d) += scale * ds * at(qh, D, i, d);
            g.d_v(b, j, h / rep, d) += pij * at(doh, D, i, d);
          }
        }
      }
    }
  }
  return g;
}

}  // namespace gqa_test
