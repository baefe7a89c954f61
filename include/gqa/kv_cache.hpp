// gqa/kv_cache.hpp — a per-layer key/value cache for decoding, and attention against it.
//
// Storage is head-major [B, G, capacity, D] for K and for V, so one KV head of one sequence is a contiguous
// capacity x D block that the decode kernel streams once for all H/G query heads of its group. Each sequence b
// holds lengths()[b] tokens (ragged batches are fine). New tokens are appended once per KV head (G heads), never
// per query head. Element type T: float, double, gqa::bfloat16 or gqa::half; arithmetic is always in float
// (double for double).
//
// T = std::int8_t is a quantised cache, a quarter of f32's bytes (plus 4 bytes per row): every (token, KV head) row
// of D values is stored as int8 q[d] with one float scale, symmetric, quantised once at append:
//   scale = max_d |x[d]| / 127,  q[d] = x[d] / scale rounded to nearest (ties to even), in [-127, 127];
//   an all-zero row has scale 0 and q = 0.
// The scales sit beside the data, head-major [B, G, capacity] for K and for V (key_scales(), value_scales()). The
// kernels widen the int8 rows in registers and apply the K scale to the score, the V scale to the probability;
// every option works as on the other caches. Error of a stored value: at most half a step, scale / 2 = max|x| / 254
// of its row.
//
// What append refuses (before anything is written, naming the argument, [b, s, g, d], the cache position and the
// value), so that a cache never holds something other than the value given, rounded to T:
//   * a finite value beyond T's range, which would be stored as inf (gqa.kv_cache_range): above 65504 in a half
//     cache (from 65520, where rounding reaches inf), beyond ~3.39e38 in a bfloat16 one, a double beyond float range
//     in a float or int8 cache;
//   * NaN and inf in an int8, half or bfloat16 cache (gqa.kv_cache_nonfinite): int8 has no scale for them, and the
//     16-bit caches refuse them alike, so `--kv f16` and `--kv i8` fail the same way on the same input. float and
//     double caches keep NaN and inf as given, as any float tensor does, and attention propagates them by its rule
//     (gqa/options.hpp).
// Saturating instead (65504 for 1e5) would be a silent wrong answer. The check is one compare per appended value;
// appends are once per token, far from the decode loop, which reads the cache.
// Attention's output narrows to q's type: each output row is a convex combination of V rows, so it stays within
// the largest |V|, which a half or bfloat16 output holds whenever V is of that type (every KVCache<half> decode
// with half queries). A 16-bit output of wider V (float queries are the usual case; half queries against a float
// cache are not) could overflow to inf and is not checked inside the kernels; keep the output at least as wide as
// the cache. The gradients of gqa/attention_backward.hpp are sums and may overflow a 16-bit type to inf, as in
// PyTorch, where loss scaling relies on seeing that inf.
//
//   gqa::KVCache<gqa::bfloat16> cache(B, G, capacity, D);
//   cache.append(k_new, v_new);                          // [B, S_new, G, D] each, any element type
//   gqa::AttentionOptions opt; opt.causal = true;
//   gqa::attention(q, cache, out, opt);                  // q [B, S_new, H, D] -> out [B, S_new, H, D]
//
// Decoding with attention(q, cache, ...) uses the cache's lengths as key lengths, so query i of sequence b sits at
// position i + lengths[b] - Sq (the new tokens are the last ones appended), and padding past lengths[b] is never
// read into the result.
#pragma once

#include "gqa/attention.hpp"
#define GQA_DETAIL_ALLOWED  // the detail header below checks it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/kv_rows.hpp"
#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace gqa {

template <typename T = float>
class KVCache {
  static_assert(is_kv_storage_type_v<T>, "gqa::KVCache: T must be float, double, bfloat16, half or std::int8_t");
  static constexpr bool kQuantized = std::is_same_v<T, std::int8_t>;

 public:
  using Scalar = T;

  KVCache() = default;
  /// An empty cache for `batch` sequences of up to `capacity` tokens, `kv_heads` (G) heads of `head_dim` (D).
  KVCache(Index batch, Index kv_heads, Index capacity, Index head_dim) {
    detail::require<shape_error>(batch > 0, "kv_cache", "KVCache: batch = ", batch, " must be positive");
    detail::require<shape_error>(kv_heads > 0, "kv_cache", "KVCache: kv_heads = ", kv_heads, " must be positive");
    detail::require<shape_error>(capacity > 0, "kv_cache", "KVCache: capacity = ", capacity, " must be positive");
    detail::require<shape_error>(head_dim > 0, "kv_cache", "KVCache: head_dim = ", head_dim, " must be positive");
    keys_ = Tensor4<T>(batch, kv_heads, capacity, head_dim);
    values_ = Tensor4<T>(batch, kv_heads, capacity, head_dim);
    detail::advise_huge_pages(keys_.data(), std::size_t(keys_.size()) * sizeof(T));  // before the first touch
    detail::advise_huge_pages(values_.data(), std::size_t(values_.size()) * sizeof(T));
    keys_.setZero();
    values_.setZero();
    if constexpr (kQuantized) {
      key_scales_ = Scales(batch, kv_heads, capacity);
      value_scales_ = Scales(batch, kv_heads, capacity);
      key_scales_.setZero();
      value_scales_.setZero();
    }
    lengths_.assign(size_t(batch), 0);
  }

  Index batch() const noexcept { return keys_.dimension(0); }
  Index kv_heads() const noexcept { return keys_.dimension(1); }
  Index capacity() const noexcept { return keys_.dimension(2); }
  Index head_dim() const noexcept { return keys_.dimension(3); }
  /// Tokens held by each sequence, [B].
  span<const std::int32_t> lengths() const noexcept { return lengths_; }
  Index length(Index b) const { return lengths_.at(size_t(b)); }
  /// The longest sequence.
  Index max_length() const noexcept {
    return lengths_.empty() ? 0 : *std::max_element(lengths_.begin(), lengths_.end());
  }

  /// Bytes of K and V storage allocated: 2 * B * G * capacity * D * sizeof(T), plus the scales of an int8 cache
  /// (2 * B * G * capacity * sizeof(float)).
  std::size_t bytes() const noexcept {
    return 2 * (std::size_t(keys_.size()) * sizeof(T) + std::size_t(key_scales_.size()) * sizeof(float));
  }
  /// Bytes one token of one sequence adds: 2 * G * D * sizeof(T), plus 2 * G * sizeof(float) for an int8 cache's
  /// scales (this layer only).
  std::size_t bytes_per_token() const noexcept {
    return 2 * std::size_t(kv_heads()) * (std::size_t(head_dim()) * sizeof(T) + (kQuantized ? sizeof(float) : 0));
  }
  /// Bytes of K and V that a decode step reads: the filled part of every sequence.
  std::size_t bytes_in_use() const noexcept {
    std::size_t tokens = 0;
    for (auto l : lengths_) tokens += std::size_t(l);
    return tokens * bytes_per_token();
  }

  /// Appends the same number of new tokens S_new to every sequence. k_new, v_new: [B, S_new, G, D] (Tensor4,
  /// TensorMap or TensorRef; any element type, converted to T). Throws before writing anything if a shape
  /// disagrees, a sequence would exceed the capacity, or an appended value cannot be stored as given (see the
  /// header comment: beyond T's range; NaN or inf in an int8, half or bfloat16 cache).
  template <typename K, typename V>
  void append(const K& k_new, const V& v_new) {
    const auto kr = detail::as_ref(k_new);
    std::vector<std::int32_t> counts(size_t(batch()), std::int32_t(kr.dims[1]));
    append(k_new, v_new, counts);
  }

  /// Ragged append: sequence b receives the first counts[b] tokens of k_new[b], v_new[b] ([B, S_new, G, D],
  /// counts[b] <= S_new).
  template <typename K, typename V>
  void append(const K& k_new, const V& v_new, span<const std::int32_t> counts) {
    const auto kr = detail::as_ref(k_new);
    const auto vr = detail::as_ref(v_new);
    check_new_tokens("k_new", kr.dims, kr.strides);
    check_new_tokens("v_new", vr.dims, vr.strides);
    for (int i = 0; i < 4; ++i)
      detail::require<shape_error>(vr.dims[i] == kr.dims[i], "kv_cache", "KVCache::append: v_new dim ", i, " = ",
                                   vr.dims[i], " but k_new dim ", i, " = ", kr.dims[i]);
    detail::require<shape_error>(counts.size() == batch(), "kv_cache", "KVCache::append: counts size = ",
                                 counts.size(), " but B = ", batch());
    for (Index b = 0; b < batch(); ++b) {
      detail::require(counts[b] >= 0 && counts[b] <= kr.dims[1], "kv_cache", "KVCache::append: counts[", b, "] = ",
                      counts[b], " must be in [0, S_new = ", kr.dims[1], "]");
      detail::require(lengths_[size_t(b)] + Index(counts[b]) <= capacity(), "kv_cache_overflow",
                      "KVCache::append: sequence ", b, " holds ", lengths_[size_t(b)], " tokens; appending ",
                      counts[b], " exceeds capacity ", capacity());
    }
    const std::string caller = detail::concat("KVCache<", Codec::type_name(), ">::append");
    auto position = [&](Index b) { return lengths_[size_t(b)]; };
    Codec::check_storable(caller, "k_new", kr, counts, position);
    Codec::check_storable(caller, "v_new", vr, counts, position);
    const Index G = kv_heads(), D = head_dim();
    for (Index b = 0; b < batch(); ++b) {
      const Index start = lengths_[size_t(b)];
      for (Index g = 0; g < G; ++g)
        for (Index s = 0; s < counts[b]; ++s) {
          const float ks = Codec::write_row(&keys_(b, g, start + s, 0), &kr(b, s, g, 0), D);
          const float vs = Codec::write_row(&values_(b, g, start + s, 0), &vr(b, s, g, 0), D);
          if constexpr (kQuantized) key_scales_(b, g, start + s) = ks, value_scales_(b, g, start + s) = vs;
        }
      lengths_[size_t(b)] = std::int32_t(start + counts[b]);
    }
  }

  /// Forgets every token (storage is kept).
  void clear() noexcept { std::fill(lengths_.begin(), lengths_.end(), 0); }
  /// Keeps the first `length` tokens of sequence b (e.g. to roll back rejected speculative tokens).
  void truncate(Index b, Index length) {
    detail::require(b >= 0 && b < batch(), "kv_cache", "KVCache::truncate: sequence ", b, " not in [0, B = ",
                    batch(), ")");
    detail::require(length >= 0 && length <= lengths_[size_t(b)], "kv_cache", "KVCache::truncate: length ", length,
                    " not in [0, current length ", lengths_[size_t(b)], "]");
    lengths_[size_t(b)] = std::int32_t(length);
  }

  /// Strided views of the cached keys / values with logical dims [B, max_length(), G, D] (head-major memory;
  /// positions past lengths()[b] are padding).
  TensorRef<const T> keys() const noexcept { return view(keys_); }
  TensorRef<const T> values() const noexcept { return view(values_); }
  /// The whole storage, [B, G, capacity, D].
  const Tensor4<T>& key_storage() const noexcept { return keys_; }
  const Tensor4<T>& value_storage() const noexcept { return values_; }

  /// int8 cache: the per-row scales, [B, G, capacity] (row (b, s, g) of K is key_storage()(b, g, s, :) *
  /// key_scales()(b, g, s)); empty tensors for the other element types.
  using Scales = Eigen::Tensor<float, 3, Eigen::RowMajor, Eigen::DenseIndex>;
  const Scales& key_scales() const noexcept { return key_scales_; }
  const Scales& value_scales() const noexcept { return value_scales_; }
  /// int8 cache: the scales as the kernels take them.
  detail::KVScales scales() const noexcept {
    const Index G = kv_heads(), C = capacity();
    return {key_scales_.data(), value_scales_.data(), batch(), G, C, G * C, C};
  }

 private:
  using Codec = detail::KVRowCodec<T>;

  void check_new_tokens(const char* name, const std::array<Index, 4>& dims, const std::array<Index, 4>& strides) const {
    detail::require<shape_error>(dims[0] == batch(), "kv_cache", "KVCache::append: ", name, " dim 0 (batch B) = ",
                                 dims[0], " but the cache has B = ", batch());
    detail::require<shape_error>(dims[2] == kv_heads(), "kv_cache", "KVCache::append: ", name,
                                 " dim 2 (kv_heads G) = ", dims[2], " but the cache has G = ", kv_heads());
    detail::require<shape_error>(dims[3] == head_dim(), "kv_cache", "KVCache::append: ", name,
                                 " dim 3 (head_dim D) = ", dims[3], " but the cache has D = ", head_dim());
    detail::require<shape_error>(strides[3] == 1, "stride", "KVCache::append: ", name, " head_dim stride = ",
                                 strides[3], " must be 1");
  }

  TensorRef<const T> view(const Tensor4<T>& storage) const noexcept {
    const Index G = kv_heads(), C = capacity(), D = head_dim();
    return {storage.data(), {batch(), max_length(), G, D}, {G * C * D, D, C * D, 1}};
  }

  Tensor4<T> keys_, values_;           // [B, G, capacity, D]
  Scales key_scales_, value_scales_;   // [B, G, capacity], int8 only
  std::vector<std::int32_t> lengths_;  // [B]
};

/// Attention of the new queries q [B, Sq, H, D] against everything in `cache` (the decode / chunked-prefill
/// step; append the new tokens' K/V first). Key lengths come from the cache; options.key_lengths must be empty.
template <int GroupSize = Dynamic, typename T, typename Q, typename O,
          typename = std::enable_if_t<!std::is_same_v<std::decay_t<O>, AttentionOptions>>>
void attention(const Q& q, const KVCache<T>& cache, O&& out, AttentionOptions options = {}) {
  detail::require(options.key_lengths.empty(), "option",
                  "options.key_lengths must be empty when attending to a KVCache (its lengths are used)");
  options.key_lengths = cache.lengths();
  if constexpr (std::is_same_v<T, std::int8_t>) {
    auto qr = detail::as_ref(q);
    auto orf = detail::as_ref(out);
    using QT = detail::ref_elem_t<decltype(qr)>;
    static_assert(std::is_same_v<QT, detail::ref_elem_t<decltype(orf)>>, "gqa: out must have q's element type");
    static_assert(!std::is_const_v<std::remove_pointer_t<decltype(orf.data)>>, "gqa: out must be writable");
    const detail::KVScales scales = cache.scales();
    detail::attention_impl<GroupSize, QT, std::int8_t>(TensorRef<const QT>(qr), cache.keys(), cache.values(), orf,
                                                       options, &scales);
  } else {
    attention<GroupSize>(q, cache.keys(), cache.values(), std::forward<O>(out), options);
  }
}

/// Returning form: out [B, Sq, H, D] of q's element type.
template <int GroupSize = Dynamic, typename T, typename Q>
auto attention(const Q& q, const KVCache<T>& cache, const AttentionOptions& options = {}) {
  auto qr = detail::as_ref(q);
  Tensor4<detail::ref_elem_t<decltype(qr)>> out(qr.dims[0], qr.dims[1], qr.dims[2], qr.dims[3]);
  attention<GroupSize>(q, cache, out, options);
  return out;
}

}  // namespace gqa
