// gqa/options.hpp — what an attention call can be asked to do, and the semantics of each option.
//
// Shapes: Q [B, Sq, H, D], K and V [B, Sk, G, D] (or head-major [B, G, Sk, D]), output [B, Sq, H, D].
// Query head j uses KV head j / (H/G) (PyTorch repeat_interleave / Hugging Face repeat_kv order, not tiling).
//
// Order of operations for the logit of query i, key j, head h:
//   s = (q . k) * scale;  s = softcap * tanh(s / softcap) if softcap > 0;  s += bias[b, h, i, j];
//   then the masks below set s = -inf;  then softmax over j;  out = sum_j p_j v_j.
//
// Masks (all bottom-right aligned, so prefill, chunked prefill and decode share one rule):
//   * key lengths: sequence b has len[b] <= Sk valid keys 0 .. len[b]-1 (right padding); default len[b] = Sk.
//   * causal: query i (0-based within Sq) has absolute position p = i + (len[b] - Sq) and sees keys j <= p.
//     With Sq == Sk this is the usual lower triangle; with Sq == 1 the query sees the whole cache.
//     NOTE: PyTorch's scaled_dot_product_attention(is_causal=True) aligns top-left (j <= i) when Sq != Sk.
//   * sliding window W >= 1: query at position p sees keys p-W+1 .. p (W keys, the current one included, as in
//     Hugging Face's Mistral and Gemma 2). A window implies the causal bound j <= p. W >= Sk changes nothing
//     beyond causal masking. W = 0 means no window.
//   * A query row with no visible key returns zeros (never NaN); its log-sum-exp is -inf.
#pragma once

#include "gqa/types.hpp"

#include <cstdint>
#include <optional>

namespace gqa {

/// An additive float bias (or mask of 0 / -inf), row-major [Bb, Hb, Sq, Sk] with Bb in {1, B} and Hb in {1, H}:
/// size-1 dims broadcast. Non-owning.
struct BiasView {
  const float* data = nullptr;
  std::array<Index, 4> dims{};  ///< [Bb, Hb, Sq, Sk]

  BiasView() = default;
  BiasView(const float* bias, Index batch, Index heads, Index q_len, Index k_len) noexcept
      : data(bias), dims{batch, heads, q_len, k_len} {}
  BiasView(const Tensor4<float>& t) noexcept : data(t.data()), dims(dims_of(t)) {}
  BiasView(const Tensor4Map<float>& t) noexcept : data(t.data()), dims(dims_of(t)) {}
  BiasView(const Tensor4Map<const float>& t) noexcept : data(t.data()), dims(dims_of(t)) {}

  bool empty() const noexcept { return data == nullptr; }

 private:
  template <typename T>
  static std::array<Index, 4> dims_of(const T& t) noexcept {
    return {t.dimension(0), t.dimension(1), t.dimension(2), t.dimension(3)};
  }
};

/// Options for one attention call. The defaults give plain softmax(Q K^T / sqrt(D)) V.
struct AttentionOptions {
  /// Multiplies q . k; default 1 / sqrt(D).
  std::optional<double> scale;
  /// Bottom-right aligned causal mask (see the header comment).
  bool causal = false;
  /// Sliding window W (keys p-W+1 .. p); 0 = no window. Must be >= 0.
  Index window = 0;
  /// Logit soft-cap c (Gemma 2): s -> c * tanh(s / c). 0 = off. Must be >= 0.
  double softcap = 0.0;
  /// Optional additive bias/mask, broadcast over batch and heads.
  BiasView bias;
  /// Optional per-sequence key lengths [B], each in [0, Sk] (right-padded ragged batch).
  span<const std::int32_t> key_lengths;
  /// Memory order of K and V when they are passed as Eigen tensors (TensorRef overloads carry strides instead).
  KVLayout kv_layout = KVLayout::TokenMajor;
  /// OpenMP threads; 0 = omp_get_max_threads(). Results do not depend on it (see attention.hpp).
  int num_threads = 0;
  /// Optional output: log-sum-exp of each row's logits, [B, H, Sq] contiguous (-inf for rows with no key).
  span<float> lse;
};

}  // namespace gqa
