// gqa/paged_kv_cache.hpp — a paged key/value cache for serving: fixed-size blocks from one pool, a block table per
// sequence, prefix sharing between sequences, and attention of a batch of sequences against it in one call.
//
// A gqa::KVCache reserves capacity tokens for every sequence up front. A server whose requests have unknown lengths
// either reserves the longest for each or cannot admit more. PagedKVCache (vLLM's PagedAttention; llama.cpp's
// unified cache) keeps K and V in a pool of `num_blocks` blocks of `block_size` tokens x G heads x D, head-major:
// the pool is [G, num_blocks, block_size, D], so one KV head's rows of a block are contiguous, and so are its rows of
// consecutive blocks, which the kernels read as one run, as they stream a KVCache's. The scales of an int8 pool sit
// beside it, [G, num_blocks, block_size] for K and for V. A sequence takes blocks as it grows (append) and gives
// them back (truncate, release); bytes_reserved() is the blocks taken, at most one partial block per sequence more
// than bytes_in_use(). The allocator keeps sequences in runs of consecutive blocks where it can: a growing sequence
// gets the block after its last one if that is free, else the start of the longest free run, or its middle when a
// live sequence ends just before that run (so that one can grow too). A pool read in random block order streams
// slower than one run of memory (the hardware prefetchers stop at each block; bench/README.md, "Paged KV cache").
//
// Sequences are named by the ids add_sequence() and fork() return (the lowest free id; release() frees it). fork()
// makes a sequence that shares all its parent's blocks (a common prompt prefix is stored once); a block shared by
// several sequences is never written: the first append into a shared partial block copies its filled rows into a
// block of the appending sequence's own first (copy on write). Element types and what append refuses are those of
// gqa::KVCache (gqa/kv_cache.hpp): float, double, bfloat16, half, or std::int8_t quantised per row; values that
// cannot be stored as given are refused before anything is written, and so is an append that needs more blocks
// than are free (gqa.paged_kv_cache_full, naming the blocks needed and free).
//
//   gqa::PagedKVCache<gqa::bfloat16> cache(G, D, /*block_size=*/32, /*num_blocks=*/4096);
//   const std::int32_t a = cache.add_sequence();
//   cache.append(a, k_prompt, v_prompt);                 // [1, S, G, D] each, any element type
//   const std::int32_t b = cache.fork(a);                // b shares a's prompt
//   std::vector<std::int32_t> batch = {a, b};
//   cache.append(batch, k_new, v_new);                   // [2, 1, G, D]: one token for each
//   gqa::attention(q, cache, batch, out, options);       // q, out [2, 1, H, D]: both decoded in one call
//
// attention(q, cache, sequences, out, options) is gqa::attention on a ragged batch: batch row b of q [B, Sq, H, D]
// belongs to sequences[b], whose cache length gives its key length (its Sq new tokens are the last appended, as for
// KVCache), with every option of gqa/options.hpp but key_lengths. The work is split over (sequence, KV head, key
// range), a long sequence among short ones into several key ranges (flash_fwd.hpp's plan_splits), so that every
// thread stays busy. Results are bitwise independent of the thread count, and bitwise equal to a KVCache holding
// the same tokens where the kernels split the keys the same way: for decode, where every block boundary is also a
// boundary of accumulate_pv's chunks of keys (2 keys per query row of a KV head, at least 8, or 32 for a 16-bit or
// int8 V from 4 rows, at most 16 KiB of V; e.g. any block_size that is a multiple of 32 for up to 16 rows), and
// always for chunked prefill, whose tiles are gathered from the blocks and multiplied as a contiguous cache's.
#pragma once

#include "gqa/attention.hpp"
#define GQA_DETAIL_ALLOWED  // the detail header below checks it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/free_blocks.hpp"
#include "gqa/detail/kv_rows.hpp"
#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace gqa {

template <typename T = float>
class PagedKVCache {
  static_assert(is_kv_storage_type_v<T>, "gqa::PagedKVCache: T must be float, double, bfloat16, half or std::int8_t");
  static constexpr bool kQuantized = std::is_same_v<T, std::int8_t>;
  using Codec = detail::KVRowCodec<T>;

 public:
  using Scalar = T;
  using Scales = Eigen::Tensor<float, 3, Eigen::RowMajor, Eigen::DenseIndex>;

  /// A pool of `num_blocks` blocks of `block_size` tokens for `kv_heads` (G) heads of `head_dim` (D), no sequences.
  /// The pool is allocated here and its pages are touched when blocks are first written.
  PagedKVCache(Index kv_heads, Index head_dim, Index block_size, Index num_blocks) {
    auto positive = [](Index x, const char* name) {
      detail::require<shape_error>(x > 0, "paged_kv_cache", "PagedKVCache: ", name, " = ", x, " must be positive");
    };
    positive(kv_heads, "kv_heads"), positive(head_dim, "head_dim"), positive(block_size, "block_size");
    positive(num_blocks, "num_blocks");
    detail::require<shape_error>(num_blocks <= Index(std::numeric_limits<std::int32_t>::max()), "paged_kv_cache",
                                 "PagedKVCache: num_blocks = ", num_blocks, " exceeds the int32 block ids");
    keys_ = Tensor4<T>(kv_heads, num_blocks, block_size, head_dim);
    values_ = Tensor4<T>(kv_heads, num_blocks, block_size, head_dim);
    detail::advise_huge_pages(keys_.data(), std::size_t(keys_.size()) * sizeof(T));
    detail::advise_huge_pages(values_.data(), std::size_t(values_.size()) * sizeof(T));
    if constexpr (kQuantized) {
      key_scales_ = Scales(kv_heads, num_blocks, block_size);
      value_scales_ = Scales(kv_heads, num_blocks, block_size);
    }
    references_.assign(size_t(num_blocks), 0);
    free_ = detail::FreeBlocks(std::int32_t(num_blocks));
  }

  Index kv_heads() const noexcept { return keys_.dimension(0); }
  Index head_dim() const noexcept { return keys_.dimension(3); }
  Index block_size() const noexcept { return keys_.dimension(2); }
  Index num_blocks() const noexcept { return keys_.dimension(1); }
  Index blocks_free() const noexcept { return Index(free_.size()); }
  Index blocks_used() const noexcept { return num_blocks() - blocks_free(); }

  /// Bytes of one block of K and V: 2 * G * block_size * D * sizeof(T), plus an int8 pool's scales.
  std::size_t bytes_per_block() const noexcept { return std::size_t(block_size()) * bytes_per_token(); }
  /// Bytes one token adds: 2 * G * D * sizeof(T), plus 2 * G * sizeof(float) for an int8 pool's scales.
  std::size_t bytes_per_token() const noexcept {
    return 2 * std::size_t(kv_heads()) * (std::size_t(head_dim()) * sizeof(T) + (kQuantized ? sizeof(float) : 0));
  }
  /// Bytes of the whole pool.
  std::size_t bytes() const noexcept { return std::size_t(num_blocks()) * bytes_per_block(); }
  /// Bytes of the blocks sequences hold (each shared block once).
  std::size_t bytes_reserved() const noexcept { return std::size_t(blocks_used()) * bytes_per_block(); }
  /// Bytes of the tokens stored: in each block held, the rows up to the furthest any sequence reaches (shared
  /// prefixes counted once). A decode step of every sequence reads each sequence's own tokens.
  std::size_t bytes_in_use() const {
    std::vector<Index> filled(size_t(num_blocks()), 0);
    for (const Sequence& s : sequences_)
      for (size_t i = 0; i < s.blocks.size(); ++i) {
        Index& f = filled[size_t(s.blocks[i])];
        f = std::max(f, std::min(block_size(), s.length - Index(i) * block_size()));
      }
    Index tokens = 0;
    for (Index f : filled) tokens += f;
    return std::size_t(tokens) * bytes_per_token();
  }

  /// A new empty sequence; returns its id (the lowest free one).
  std::int32_t add_sequence() {
    const std::int32_t id = free_id();
    sequences_[size_t(id)] = Sequence{true, 0, {}};
    return id;
  }
  /// A new sequence holding `parent`'s tokens, sharing all of its blocks; returns its id. Takes no block: the
  /// first append into a shared partial block copies it (see the header comment).
  std::int32_t fork(std::int32_t parent) {
    check_sequence("fork", parent);
    const std::int32_t id = free_id();
    Sequence child = sequences_[size_t(parent)];
    for (std::int32_t block : child.blocks) ++references_[size_t(block)];
    sequences_[size_t(id)] = std::move(child);
    return id;
  }
  /// Keeps the first `length` tokens of `sequence`, giving back the blocks past them (e.g. rejected speculative
  /// tokens).
  void truncate(std::int32_t sequence, Index length) {
    check_sequence("truncate", sequence);
    Sequence& s = sequences_[size_t(sequence)];
    detail::require(length >= 0 && length <= s.length, "paged_kv_cache", "PagedKVCache::truncate: length ", length,
                    " not in [0, current length ", s.length, "] of sequence ", sequence);
    const size_t keep = size_t((length + block_size() - 1) / block_size());
    for (size_t i = keep; i < s.blocks.size(); ++i) drop(s.blocks[i]);
    s.blocks.resize(keep);
    s.length = length;
  }
  /// Ends `sequence`: its blocks go back to the pool (those no other sequence shares) and its id is free again.
  void release(std::int32_t sequence) {
    truncate(sequence, 0);
    sequences_[size_t(sequence)].live = false;
  }

  /// Whether `sequence` is a live id.
  bool contains(std::int32_t sequence) const noexcept {
    return sequence >= 0 && size_t(sequence) < sequences_.size() && sequences_[size_t(sequence)].live;
  }
  /// The live ids, ascending.
  std::vector<std::int32_t> sequences() const {
    std::vector<std::int32_t> ids;
    for (size_t i = 0; i < sequences_.size(); ++i)
      if (sequences_[i].live) ids.push_back(std::int32_t(i));
    return ids;
  }
  Index length(std::int32_t sequence) const {
    check_sequence("length", sequence);
    return sequences_[size_t(sequence)].length;
  }
  /// The blocks of `sequence` in order: token j is row j % block_size of block_table(sequence)[j / block_size].
  span<const std::int32_t> block_table(std::int32_t sequence) const {
    check_sequence("block_table", sequence);
    return sequences_[size_t(sequence)].blocks;
  }

  /// The pools, [G, num_blocks, block_size, D]; the int8 scales, [G, num_blocks, block_size] (empty otherwise).
  const Tensor4<T>& key_storage() const noexcept { return keys_; }
  const Tensor4<T>& value_storage() const noexcept { return values_; }
  const Scales& key_scales() const noexcept { return key_scales_; }
  const Scales& value_scales() const noexcept { return value_scales_; }

  /// Appends k_new, v_new [1, S_new, G, D] (any element type, converted to T) to `sequence`.
  template <typename K, typename V>
  void append(std::int32_t sequence, const K& k_new, const V& v_new) {
    const std::int32_t one[1] = {sequence};
    append(span<const std::int32_t>(one, 1), k_new, v_new);
  }
  /// Appends row b of k_new, v_new [n, S_new, G, D] to sequences[b] (n distinct live ids).
  template <typename K, typename V>
  void append(span<const std::int32_t> sequences, const K& k_new, const V& v_new) {
    const auto kr = detail::as_ref(k_new);
    std::vector<std::int32_t> counts(size_t(sequences.size()), std::int32_t(kr.dims[1]));
    append(sequences, k_new, v_new, counts);
  }
  /// Ragged append: sequences[b] receives the first counts[b] tokens of row b of k_new, v_new [n, S_new, G, D].
  /// Throws before writing anything if a shape or id is wrong, a value cannot be stored as given, or the blocks
  /// needed exceed those free.
  template <typename K, typename V>
  void append(span<const std::int32_t> sequences, const K& k_new, const V& v_new, span<const std::int32_t> counts) {
    const auto kr = detail::as_ref(k_new);
    const auto vr = detail::as_ref(v_new);
    check_append(sequences, kr.dims, kr.strides, vr.dims, vr.strides, counts);
    const std::string caller = detail::concat("PagedKVCache<", Codec::type_name(), ">::append");
    auto position = [&](Index b) { return sequences_[size_t(sequences[b])].length; };
    Codec::check_storable(caller, "k_new", kr, counts, position);
    Codec::check_storable(caller, "v_new", vr, counts, position);
    reserve_blocks(sequences, counts);
    for (Index b = 0; b < sequences.size(); ++b) write_tokens(sequences_[size_t(sequences[b])], kr, vr, b, counts[b]);
  }

  /// The block tables and lengths of `sequences` as attention takes them: tables [n, stride], lengths [n].
  struct Batch {
    std::vector<std::int32_t> tables, lengths;
    Index stride = 0;
  };
  Batch batch(span<const std::int32_t> sequences) const {
    Batch r;
    for (Index b = 0; b < sequences.size(); ++b) {
      check_sequence("attention", sequences[b]);
      r.stride = std::max(r.stride, Index(sequences_[size_t(sequences[b])].blocks.size()));
    }
    r.stride = std::max<Index>(r.stride, 1);
    r.tables.assign(size_t(sequences.size() * r.stride), 0);
    for (Index b = 0; b < sequences.size(); ++b) {
      const Sequence& s = sequences_[size_t(sequences[b])];
      std::copy(s.blocks.begin(), s.blocks.end(), r.tables.begin() + b * r.stride);
      r.lengths.push_back(std::int32_t(s.length));
    }
    return r;
  }

 private:
  struct Sequence {
    bool live = false;
    Index length = 0;
    std::vector<std::int32_t> blocks;
  };

  std::int32_t free_id() {
    for (size_t i = 0; i < sequences_.size(); ++i)
      if (!sequences_[i].live) return std::int32_t(i);
    detail::require(sequences_.size() < size_t(std::numeric_limits<std::int32_t>::max()), "paged_kv_cache",
                    "PagedKVCache: too many sequences");
    sequences_.emplace_back();
    return std::int32_t(sequences_.size() - 1);
  }

  void check_sequence(const char* what, std::int32_t id) const {
    detail::require(contains(id), "paged_kv_cache", "PagedKVCache::", what, ": sequence ", id,
                    " is not a live sequence (ids come from add_sequence and fork; release ends them)");
  }

  void drop(std::int32_t block) {
    if (--references_[size_t(block)] == 0) free_.give_back(block);
  }
  /// Takes a free block to follow `prev` in a sequence (-1: its first): prev + 1 where that is free, so the
  /// sequence stays one run of memory; else the start of the longest free run, or its middle where the block before
  /// that run ends a live sequence (which would grow into it). Blocks must be free (reserve_blocks checked).
  std::int32_t take_after(std::int32_t prev) {
    std::int32_t block = prev + 1;
    if (prev < 0 || block >= std::int32_t(num_blocks()) || !free_.contains(block)) {
      const auto [start, length] = free_.longest();
      block = start > 0 && ends_a_sequence(start - 1) ? start + length / 2 : start;
    }
    free_.take(block);
    references_[size_t(block)] = 1;
    return block;
  }
  bool ends_a_sequence(std::int32_t block) const {
    for (const Sequence& s : sequences_)
      if (s.live && !s.blocks.empty() && s.blocks.back() == block) return true;
    return false;
  }

  void check_append(span<const std::int32_t> sequences, const std::array<Index, 4>& kd,
                    const std::array<Index, 4>& ks, const std::array<Index, 4>& vd, const std::array<Index, 4>& vs,
                    span<const std::int32_t> counts) const {
    const char* dims[4] = {"batch", "S_new", "kv_heads G", "head_dim D"};
    const Index want[4] = {sequences.size(), kd[1], kv_heads(), head_dim()};
    for (int i = 0; i < 4; ++i) {
      if (i == 1) continue;
      detail::require<shape_error>(kd[i] == want[i], "paged_kv_cache", "PagedKVCache::append: k_new dim ", i, " (",
                                   dims[i], ") = ", kd[i], " but ", i == 0 ? "sequences has " : "the cache has ",
                                   want[i]);
    }
    for (int i = 0; i < 4; ++i)
      detail::require<shape_error>(vd[i] == kd[i], "paged_kv_cache", "PagedKVCache::append: v_new dim ", i, " = ",
                                   vd[i], " but k_new dim ", i, " = ", kd[i]);
    detail::require<shape_error>(ks[3] == 1 && vs[3] == 1, "stride", "PagedKVCache::append: k_new and v_new need a "
                                 "head_dim stride of 1, not ", ks[3], " and ", vs[3]);
    detail::require<shape_error>(counts.size() == sequences.size(), "paged_kv_cache",
                                 "PagedKVCache::append: counts size = ", counts.size(), " but ", sequences.size(),
                                 " sequences");
    for (Index b = 0; b < sequences.size(); ++b) {
      check_sequence("append", sequences[b]);
      for (Index a = 0; a < b; ++a)
        detail::require(sequences[a] != sequences[b], "paged_kv_cache", "PagedKVCache::append: sequence ",
                        sequences[b], " appears twice (rows ", a, " and ", b, ")");
      detail::require(counts[b] >= 0 && counts[b] <= kd[1], "paged_kv_cache", "PagedKVCache::append: counts[", b,
                      "] = ", counts[b], " must be in [0, S_new = ", kd[1], "]");
    }
  }

  /// Throws unless the free blocks cover the append: new blocks past each sequence's last, and a copy of each
  /// shared partial last block written into (a block several of the appending sequences share is copied by all
  /// but the last to write, who then holds it alone).
  void reserve_blocks(span<const std::int32_t> sequences, span<const std::int32_t> counts) const {
    const Index size = block_size();
    Index need = 0;
    std::map<std::int32_t, Index> copies;  // shared block -> copies of it this append makes
    for (Index b = 0; b < sequences.size(); ++b) {
      const Sequence& s = sequences_[size_t(sequences[b])];
      if (counts[b] == 0) continue;
      need += (s.length + counts[b] + size - 1) / size - Index(s.blocks.size());
      if (s.length % size != 0) {
        const std::int32_t last = s.blocks.back();
        Index& made = copies[last];
        if (references_[size_t(last)] - made > 1) ++made, ++need;
      }
    }
    detail::require(need <= blocks_free(), "paged_kv_cache_full", "PagedKVCache::append: needs ", need,
                    " blocks but ", blocks_free(), " of ", num_blocks(), " are free (nothing was appended)");
  }

  /// Makes the partial last block of `s` its own before writing into it (copy on write).
  void own_last_block(Sequence& s) {
    const std::int32_t shared = s.blocks.back();
    if (references_[size_t(shared)] == 1) return;
    const std::int32_t own = take_after(s.blocks.size() >= 2 ? s.blocks[s.blocks.size() - 2] : -1);
    const Index rows = s.length % block_size(), G = kv_heads(), D = head_dim();
    for (Index g = 0; g < G; ++g) {
      std::copy_n(&keys_(g, shared, 0, 0), rows * D, &keys_(g, own, 0, 0));
      std::copy_n(&values_(g, shared, 0, 0), rows * D, &values_(g, own, 0, 0));
      if constexpr (kQuantized) {
        std::copy_n(&key_scales_(g, shared, 0), rows, &key_scales_(g, own, 0));
        std::copy_n(&value_scales_(g, shared, 0), rows, &value_scales_(g, own, 0));
      }
    }
    drop(shared);
    s.blocks.back() = own;
  }

  /// Writes the first `count` tokens of row b of the new K/V at the end of `s`, taking blocks as it fills them
  /// (reserve_blocks has checked that there are enough).
  template <typename KR, typename VR>
  void write_tokens(Sequence& s, const KR& kr, const VR& vr, Index b, Index count) {
    const Index size = block_size(), G = kv_heads(), D = head_dim();
    if (count > 0 && s.length % size != 0) own_last_block(s);
    for (Index i = 0; i < count; ++i, ++s.length) {
      const Index row = s.length % size;
      if (row == 0) s.blocks.push_back(take_after(s.blocks.empty() ? -1 : s.blocks.back()));
      const std::int32_t block = s.blocks.back();
      for (Index g = 0; g < G; ++g) {
        const float ks = Codec::write_row(&keys_(g, block, row, 0), &kr(b, i, g, 0), D);
        const float vs = Codec::write_row(&values_(g, block, row, 0), &vr(b, i, g, 0), D);
        if constexpr (kQuantized) key_scales_(g, block, row) = ks, value_scales_(g, block, row) = vs;
      }
    }
  }

  Tensor4<T> keys_, values_;           // [G, num_blocks, block_size, D]
  Scales key_scales_, value_scales_;   // [G, num_blocks, block_size], int8 only
  std::vector<std::int32_t> references_;  // [num_blocks]: sequences holding each block
  detail::FreeBlocks free_{0};            // free blocks, as runs of consecutive ids
  std::vector<Sequence> sequences_;       // by id
};

/// Attention of q [B, Sq, H, D] against the paged cache, batch row b against sequences[b] (B distinct live ids),
/// into out [B, Sq, H, D] of q's element type: every sequence's Sq new tokens, their K/V appended first (see the
/// header comment). options.key_lengths must be empty (the sequences' lengths are used). `sequences`: anything
/// gqa::span<const std::int32_t> takes (a std::vector, a std::array, a span).
template <int GroupSize = Dynamic, typename T, typename Q, typename Sequences, typename O,
          typename = std::enable_if_t<!std::is_same_v<std::decay_t<O>, AttentionOptions>>>
void attention(const Q& q, const PagedKVCache<T>& cache, const Sequences& sequence_ids, O&& out,
               AttentionOptions options = {}) {
  const span<const std::int32_t> sequences(sequence_ids);
  detail::require(!options.key_lengths.given(), "option",
                  "options.key_lengths must be empty when attending to a PagedKVCache (its lengths are used)");
  const auto qr = detail::as_ref(q);
  auto orf = detail::as_ref(out);
  using QT = detail::ref_elem_t<decltype(qr)>;
  static_assert(std::is_same_v<QT, detail::ref_elem_t<decltype(orf)>>, "gqa: out must have q's element type");
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(orf.data)>>, "gqa: out must be writable");
  const Index B = sequences.size(), G = cache.kv_heads(), D = cache.head_dim(), size = cache.block_size();
  detail::require<shape_error>(qr.dims[0] == B, "shape", "q: dim 0 (batch B) = ", qr.dims[0], " but ", B,
                               " sequences are given");
  const auto batch = cache.batch(sequences);
  options.key_lengths = batch.lengths;
  const Index keys = batch.lengths.empty() ? 0 : *std::max_element(batch.lengths.begin(), batch.lengths.end());
  // The pools as [B, Sk, G, D] views of one block's rows of each head, for make_params' shape checks; set_paged
  // adds the tables and checks out against the whole pools.
  const Index head_stride = cache.num_blocks() * size * D;
  const TensorRef<const T> k{cache.key_storage().data(), {B, keys, G, D}, {0, D, head_stride, 1}};
  const TensorRef<const T> v{cache.value_storage().data(), {B, keys, G, D}, {0, D, head_stride, 1}};
  const detail::PagedKV paged{batch.tables.data(), batch.stride, size, cache.num_blocks(), size * D, size};
  if constexpr (std::is_same_v<T, std::int8_t>) {
    const detail::KVScales scales{cache.key_scales().data(), cache.value_scales().data(), B, G, keys, 0,
                                  cache.num_blocks() * size};
    detail::attention_impl<GroupSize, QT, T>(TensorRef<const QT>(qr), k, v, orf, options, &scales, &paged);
  } else {
    detail::attention_impl<GroupSize, QT, T>(TensorRef<const QT>(qr), k, v, orf, options, nullptr, &paged);
  }
}

/// Returning form: out [B, Sq, H, D] of q's element type.
template <int GroupSize = Dynamic, typename T, typename Q, typename Sequences>
auto attention(const Q& q, const PagedKVCache<T>& cache, const Sequences& sequences,
               const AttentionOptions& options = {}) {
  auto qr = detail::as_ref(q);
  Tensor4<detail::ref_elem_t<decltype(qr)>> out(qr.dims[0], qr.dims[1], qr.dims[2], qr.dims[3]);
  attention<GroupSize>(q, cache, sequences, out, options);
  return out;
}

}  // namespace gqa
