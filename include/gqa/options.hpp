// gqa/options.hpp — what an attention call can be asked to do, and the semantics of each option.
//
// Shapes: Q [B, Sq, H, D], K and V [B, Sk, G, D] (head-major memory [B, G, Sk, D] through gqa::head_major(k)),
// output [B, Sq, H, D]. Query head j uses KV head j / (H/G) (PyTorch repeat_interleave / Hugging Face repeat_kv
// order, not tiling).
//
// Order of operations for the logit of query i, key j, head h:
//   s = (q . k) * scale;  s = softcap * tanh(s / softcap) if softcap > 0;  s += bias[b, h, i, j];
//   s += alibi_slopes[h] * (j - p) (ALiBi, p the query's absolute position below);
//   then the masks below set s = -inf;  then softmax over j and the head's sink;  out = sum_j p_j v_j.
//
// Masks (all bottom-right aligned, so prefill, chunked prefill and decode share one rule):
//   * key lengths: sequence b has len[b] <= Sk valid keys 0 .. len[b]-1 (right padding); default len[b] = Sk.
//   * causal: query i (0-based within Sq) has absolute position p = i + (len[b] - Sq) and sees keys j <= p.
//     With Sq == Sk this is the usual lower triangle; with Sq == 1 the query sees the whole cache.
//     NOTE: PyTorch's scaled_dot_product_attention(is_causal=True) aligns top-left (j <= i) when Sq != Sk.
//   * sliding window W >= 1: query at position p sees keys p-W+1 .. p (W keys, the current one included, as in
//     Hugging Face's Mistral and Gemma 2). A window implies the causal bound j <= p. W >= Sk changes nothing
//     beyond causal masking. W = 0 means no window.
//   * bias: an entry of -inf masks its key for that row, like the masks above (even if q . k is NaN there).
//   * A query row with no visible key returns zeros (never NaN); its log-sum-exp is -inf (the sink with sinks).
//
// Attention sinks (gpt-oss): sinks[h] is one more logit of every row of head h, with no value. The softmax runs over
// [s_0 .. s_(Sk-1), sinks[h]] (the sink joins the max, as Hugging Face's gpt-oss eager attention concatenates it to
// the logits before the max-subtracted softmax), and the sink's probability is dropped: out = sum_j p_j v_j with
// p_j = exp(s_j) / (sum_k exp(s_k) + exp(sinks[h])), so the weights sum to less than 1. A row with no visible key
// gives out = 0 (the sink takes all the weight) and lse = sinks[h]. options.lse holds the log-sum-exp including the
// sink: exp(s_j - lse) are the row's weights, which the backward relies on. Two partial attentions over disjoint
// keys must therefore not both carry the sink when merged by their lse (the sink would count twice): merge partials
// computed without sinks, then add the sink once (lse = logaddexp(lse, sink), out *= exp(lse_old - lse)). A sink
// of -inf is no sink (bitwise the same results); sinks of 0 are not: exp(0) = 1 joins every denominator.
// ALiBi (Press et al.; BLOOM, MPT, Falcon): alibi_slopes[h] * (j - p) with p = i + (len[b] - Sq), the absolute
// position of the masks above, so a visible key at distance p - j gets -slope * distance. Softmax does not change
// if a row's bias moves by a constant, so this gives the weights of BLOOM's slope * j and of MPT's slope * (j - Sk + 1);
// it also gives the log-sum-exp of the true bias -slope * (p - j) (llama.cpp's -slope * |p - j|) on causal rows.
// Without a causal mask, keys after p get +slope * (j - p) (BLOOM's and MPT's linear bias, not ggml's symmetric
// -slope * |j - p|). alibi_slopes(H) gives the standard slopes.
//
// Non-finite inputs:
//   * A masked key is never read into a result: NaN or inf in its K or V (padding, the causal future, outside the
//     window, under a -inf bias) changes nothing.
//   * A visible key is: a NaN logit, or a +inf one (which has no finite softmax), makes the row's output and
//     log-sum-exp NaN, as the naive reference (gqa/reference.hpp) does; a -inf logit gives that key weight 0.
//     Logits are computed in float unless Q or K/V is double, so a float q . k beyond ~3.4e38 is +inf (a NaN row,
//     never a silent zero). NaN or inf in the V of a visible key reaches its row (even if its weight underflows).
//
// Memory: out must not overlap k, v, the bias or lse (gqa::invalid_argument otherwise). It may be q itself (the
// same data and strides): each query row is read before its output is written. Any other overlap with q is refused.
//
// Adding a mask: it must give every query one contiguous range of visible keys, with both ends non-decreasing in
// the query index (the contract of gqa/detail/masks.hpp, which the kernels rely on to skip and to mask whole tiles).
// Add it to visible_keys() there and to gqa/reference.hpp, validate its option in make_params
// (gqa/detail/params.hpp), and test it by hand and against the reference in tests/test_options.cpp. A mask with
// holes or another shape is an additive bias of -inf.
#pragma once

#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace gqa {

/// An additive bias (or mask of 0 / -inf) [Bb, Hb, Sq, Sk], float or double, with Bb in {1, B} and Hb in {1, H}:
/// size-1 dims broadcast. Any strides with the key dim contiguous, so a slice of a larger mask is a view, e.g. a
/// Hugging Face mask [B, 1, Sq, max_len] cut to Sk keys:
///   gqa::BiasView(mask.data(), {B, 1, Sq, Sk}, {Sq * max_len, Sq * max_len, max_len, 1})
/// Non-owning: binding it to a temporary tensor does not compile (it would dangle).
class BiasView {
 public:
  using Dims = std::array<Index, 4>;

  BiasView() = default;
  /// A contiguous row-major buffer [batch, heads, q_len, k_len].
  BiasView(const float* bias, Index batch, Index heads, Index q_len, Index k_len) noexcept
      : BiasView(bias, nullptr, {batch, heads, q_len, k_len}) {}
  BiasView(const double* bias, Index batch, Index heads, Index q_len, Index k_len) noexcept
      : BiasView(nullptr, bias, {batch, heads, q_len, k_len}) {}
  /// A strided view: element (b, h, i, j) at bias[b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]].
  BiasView(const float* bias, const Dims& dims, const Dims& strides) noexcept
      : f_(bias), dims_(dims), strides_(strides) {}
  BiasView(const double* bias, const Dims& dims, const Dims& strides) noexcept
      : d_(bias), dims_(dims), strides_(strides) {}
  BiasView(const Tensor4<float>& t) noexcept : BiasView(t.data(), nullptr, dims_of(t)) {}
  BiasView(const Tensor4<double>& t) noexcept : BiasView(nullptr, t.data(), dims_of(t)) {}
  BiasView(const Tensor4Map<float>& t) noexcept : BiasView(t.data(), nullptr, dims_of(t)) {}
  BiasView(const Tensor4Map<const float>& t) noexcept : BiasView(t.data(), nullptr, dims_of(t)) {}
  BiasView(const Tensor4Map<double>& t) noexcept : BiasView(nullptr, t.data(), dims_of(t)) {}
  BiasView(const Tensor4Map<const double>& t) noexcept : BiasView(nullptr, t.data(), dims_of(t)) {}
  BiasView(Tensor4<float>&&) = delete;   // a temporary tensor: the view would dangle
  BiasView(Tensor4<double>&&) = delete;  // a temporary tensor: the view would dangle

  bool empty() const noexcept { return f_ == nullptr && d_ == nullptr; }
  const float* float_data() const noexcept { return f_; }    ///< null unless the bias is float
  const double* double_data() const noexcept { return d_; }  ///< null unless the bias is double
  const Dims& dims() const noexcept { return dims_; }        ///< [Bb, Hb, Sq, Sk]
  const Dims& strides() const noexcept { return strides_; }  ///< elements, one per dim
  /// The bias of (b, h, i, j) with b < B, h < H: size-1 dims broadcast.
  double operator()(Index b, Index h, Index i, Index j) const noexcept {
    const Index at = (dims_[0] == 1 ? 0 : b) * strides_[0] + (dims_[1] == 1 ? 0 : h) * strides_[1] +
                     i * strides_[2] + j * strides_[3];
    return f_ ? double(f_[at]) : d_[at];
  }

 private:
  BiasView(const float* f, const double* d, const Dims& dims) noexcept
      : f_(f), d_(d), dims_(dims), strides_{dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1} {}
  template <typename T>
  static Dims dims_of(const T& t) noexcept {
    return {t.dimension(0), t.dimension(1), t.dimension(2), t.dimension(3)};
  }

  const float* f_ = nullptr;
  const double* d_ = nullptr;
  Dims dims_{}, strides_{};
};

/// Per-sequence key lengths [B], int32 or int64 (PyTorch's default integer), non-owning. Binding it to a
/// temporary vector does not compile (it would dangle).
class KeyLengths {
 public:
  KeyLengths() = default;
  KeyLengths(const std::int32_t* lengths, Index size) noexcept : p32_(lengths), size_(size) {}
  KeyLengths(const std::int64_t* lengths, Index size) noexcept : p64_(lengths), size_(size) {}
  KeyLengths(span<const std::int32_t> s) noexcept : KeyLengths(s.data(), s.size()) {}
  KeyLengths(span<const std::int64_t> s) noexcept : KeyLengths(s.data(), s.size()) {}
  template <typename A>
  KeyLengths(const std::vector<std::int32_t, A>& v) noexcept : KeyLengths(v.data(), Index(v.size())) {}
  template <typename A>
  KeyLengths(const std::vector<std::int64_t, A>& v) noexcept : KeyLengths(v.data(), Index(v.size())) {}
  template <typename A>
  KeyLengths(std::vector<std::int32_t, A>&&) = delete;  // a temporary vector: the view would dangle
  template <typename A>
  KeyLengths(std::vector<std::int64_t, A>&&) = delete;  // a temporary vector: the view would dangle

  Index size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  /// Whether lengths were given (a zero-length array for B = 0 counts).
  bool given() const noexcept { return p32_ != nullptr || p64_ != nullptr || size_ != 0; }
  std::int64_t operator[](Index b) const noexcept { return p32_ ? std::int64_t(p32_[b]) : p64_[b]; }
  const std::int32_t* int32_data() const noexcept { return p32_; }  ///< null unless the lengths are int32
  const std::int64_t* int64_data() const noexcept { return p64_; }  ///< null unless the lengths are int64

 private:
  const std::int32_t* p32_ = nullptr;
  const std::int64_t* p64_ = nullptr;
  Index size_ = 0;
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
  /// Optional additive bias/mask, broadcast over batch and heads; -inf entries mask their key.
  BiasView bias;
  /// Optional per-sequence key lengths [B], each in [0, Sk] (right-padded ragged batch).
  KeyLengths key_lengths;
  /// OpenMP threads; 0 = omp_get_max_threads(). Results do not depend on it (see attention.hpp).
  int num_threads = 0;
  /// Optional output: log-sum-exp of each row's logits, [B, H, Sq] contiguous (-inf for rows with no key); with
  /// sinks, of the logits and the sink (see the header comment).
  span<float> lse;
  /// Optional attention sinks, one logit per query head [H] (gpt-oss); empty = none. Each not NaN nor +inf; -inf is
  /// no sink for that head. attention_backward can return their gradient (d_sinks).
  span<const float> sinks;
  /// Optional ALiBi slopes, one per query head [H]: adds slope[h] * (j - p) to the logits; empty = none. Finite.
  /// gqa::alibi_slopes(H) gives the standard ones. Constants: the backward gives them no gradient.
  span<const float> alibi_slopes;
};

/// The standard ALiBi slopes of H heads (Press et al., as BLOOM and MPT build them): with n the largest power of
/// two <= H, slope h = 2^(-8 (h + 1) / n) for h < n, and the remaining H - n heads take the odd-numbered slopes of
/// the 2n-head series, 2^(-4 (2 k + 1) / n) for k = 0 .. H - n - 1. H must be >= 1.
inline std::vector<float> alibi_slopes(Index heads) {
  detail::require(heads >= 1, "option", "alibi_slopes: heads = ", heads, " must be >= 1");
  Index n = 1;
  while (n * 2 <= heads) n *= 2;
  std::vector<float> slopes(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h) {
    const double exponent = h < n ? 8.0 * double(h + 1) / double(n) : 4.0 * double(2 * (h - n) + 1) / double(n);
    slopes[size_t(h)] = float(std::exp2(-exponent));
  }
  return slopes;
}

}  // namespace gqa
