// gqa/kv_cache.hpp — a per-layer key/value cache for decoding, and attention against it.
//
// Storage is head-major [B, G, capacity, D] for K and for V, so one KV head of one sequence is a contiguous
// capacity x D block that the decode kernel streams once for all H/G query heads of its group. Each sequence b
// holds lengths()[b] tokens (ragged batches are fine). New tokens are appended once per KV head (G heads), never
// per query head. Element type T: float, double, gqa::bfloat16 or gqa::half; arithmetic is always in float
// (double for double).
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
#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gqa {

template <typename T = float>
class KVCache {
  static_assert(is_storage_type_v<T>, "gqa::KVCache: T must be float, double, bfloat16 or half");

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
    keys_.setZero();
    values_.setZero();
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

  /// Bytes of K and V storage allocated (2 * B * G * capacity * D * sizeof(T)).
  std::size_t bytes() const noexcept { return 2 * std::size_t(keys_.size()) * sizeof(T); }
  /// Bytes one token of one sequence adds: 2 * G * D * sizeof(T) (this layer only).
  std::size_t bytes_per_token() const noexcept { return 2 * std::size_t(kv_heads() * head_dim()) * sizeof(T); }
  /// Bytes of K and V that a decode step reads: the filled part of every sequence.
  std::size_t bytes_in_use() const noexcept {
    std::size_t tokens = 0;
    for (auto l : lengths_) tokens += std::size_t(l);
    return tokens * bytes_per_token();
  }

  /// Appends the same number of new tokens S_new to every sequence. k_new, v_new: [B, S_new, G, D] (Tensor4,
  /// TensorMap or TensorRef; any element type, converted to T). Throws before writing anything if a shape
  /// disagrees or a sequence would exceed the capacity.
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
    const Index G = kv_heads(), D = head_dim();
    for (Index b = 0; b < batch(); ++b) {
      const Index start = lengths_[size_t(b)];
      for (Index g = 0; g < G; ++g)
        for (Index s = 0; s < counts[b]; ++s) {
          store(&keys_(b, g, start + s, 0), &kr(b, s, g, 0), D);
          store(&values_(b, g, start + s, 0), &vr(b, s, g, 0), D);
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

 private:
  template <typename Src>
  static void store(T* dst, const Src* src, Index n) {
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(dst, n) =
        Eigen::Map<const Eigen::Matrix<std::remove_const_t<Src>, 1, Eigen::Dynamic>>(src, n).template cast<T>();
  }

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

  Tensor4<T> keys_, values_;          // [B, G, capacity, D]
  std::vector<std::int32_t> lengths_; // [B]
};

/// Attention of the new queries q [B, Sq, H, D] against everything in `cache` (the decode / chunked-prefill
/// step; append the new tokens' K/V first). Key lengths come from the cache; options.key_lengths must be empty.
template <int GroupSize = Dynamic, typename T, typename Q, typename O,
          typename = std::enable_if_t<!std::is_same_v<std::decay_t<O>, AttentionOptions>>>
void attention(const Q& q, const KVCache<T>& cache, O&& out, AttentionOptions options = {}) {
  detail::require(options.key_lengths.empty(), "option",
                  "options.key_lengths must be empty when attending to a KVCache (its lengths are used)");
  options.key_lengths = cache.lengths();
  attention<GroupSize>(q, cache.keys(), cache.values(), std::forward<O>(out), options);
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
