// gqa/distributed.hpp — attention across the ranks of an MPI communicator (target gqa::mpi; not part of
// gqa/gqa.hpp). Every call takes the user's MPI_Comm; gqa never calls MPI_Init or MPI_Finalize. Shapes and
// names as in gqa/attention.hpp: Q [B, S, H, D], K/V [B, S, G, D], query head j uses KV head j / (H/G).
//
// Head sharding (tensor parallel): gqa::head_shard(H, G, P, r) says which query heads and which KV heads rank r
// of P owns. P must divide H, and either
//   P <= G, P divides G: G/P KV heads and their H/P query heads per rank, no K/V head on two ranks;
//   P >  G, G divides P: H/P query heads of one group per rank, each KV head on exactly P/G ranks;
// any other P is refused (gqa::invalid_argument naming H, G, P and the valid P). A shard is plain single-process
// work: gqa::attention(shard.queries(q), shard.kv(k), shard.kv(v), shard.queries(out)) and a KVCache of
// shard.num_kv_heads heads; no call here communicates.
//
// Sequence-sharded decode: gqa::SequenceShardedCache keeps every P-th position of each sequence on each rank
// (position p on rank p % P); gqa::sequence_sharded_attention attends each rank's share locally and merges the
// partial outputs by their log-sum-exp across the ranks (one MPI_Allgather of H * (D * sizeof(T) + 4) bytes per
// rank, query and sequence; merged in rank order, so every rank gets the same result, bitwise the same for a
// given P whatever the thread count).
//
// Ring prefill (context parallel): gqa::ring_attention is attention over a sequence of S tokens split into 2P
// chunks, rank r holding chunks r and 2P-1-r (gqa::ring_layout), so causal work is balanced. The ranks' K/V
// blocks (G heads, never H: 2 * B * (S/P) * G * D * sizeof(KV) bytes) go round the ring with non-blocking sends
// while each rank attends its queries to the block it holds; partial results are merged by their log-sum-exp.
//
// Ring backward: gqa::ring_attention_backward gives d_q, d_k, d_v over the same split (float), from the forward's
// output and log-sum-exp; each K/V block's gradient (G heads) travels with the block and is sent home at the end.
//
// Collective calls (sequence_sharded_attention, ring_attention, ring_attention_backward, SequenceShardedCache's
// constructor) must be made by every rank of the communicator in the same order. Their arguments are checked on
// every rank first, and if any rank's are refused every rank throws (that rank its own error, the others
// gqa.distributed.peer), so no rank is left waiting. Point-to-point messages use tags gqa::kRingTag and
// kRingTag + 1 on the user's communicator.
//
// Element types: Q/out float or double; K/V float, double, bfloat16 or half (a SequenceShardedCache also int8).
#pragma once

#include "gqa/attention.hpp"
#include "gqa/attention_backward.hpp"
#include "gqa/errors.hpp"
#include "gqa/kv_cache.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/lse_merge.hpp"
#include "gqa/detail/mpi_support.hpp"

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace gqa {

/// Bytes this rank handed to MPI in the calls it was passed to (accumulated; clear it between measurements).
struct DistributedStats {
  std::uint64_t bytes_sent = 0;      ///< payload this rank sent (its share of an allgather, its ring sends)
  std::uint64_t bytes_received = 0;  ///< payload this rank received
  std::uint64_t messages = 0;        ///< sends and collectives that carried payload
};

/// Tag of gqa's point-to-point messages on the user's communicator.
inline constexpr int kRingTag = 0x6751;

// ------------------------------------------------------------------------------------------------ head sharding

/// Which heads rank `rank` of `ranks` owns (gqa::head_shard): query heads [first_head, first_head + num_heads)
/// and KV heads [first_kv_head, first_kv_head + num_kv_heads), the KV heads those query heads use.
struct HeadShard {
  Index heads = 0, kv_heads = 0;  ///< H, G of the whole layer
  int ranks = 1, rank = 0;        ///< P, r
  Index first_head = 0, num_heads = 0;
  Index first_kv_head = 0, num_kv_heads = 0;
  Index kv_replicas = 1;  ///< ranks that hold each of this rank's KV heads: 1 for P <= G, P / G for P > G

  /// This rank's query heads of a token-major tensor [B, S, H, D] (q, out): a view [B, S, num_heads, D].
  template <typename X>
  auto queries(X& x) const;
  /// This rank's KV heads of a token-major tensor [B, S, G, D] (k, v): a view [B, S, num_kv_heads, D].
  template <typename X>
  auto kv(X& x) const;
};

/// The rank counts P that split H query heads and G KV heads (P divides H, and P divides G or G divides P),
/// ascending.
inline std::vector<int> valid_head_shard_ranks(Index heads, Index kv_heads) {
  std::vector<int> valid;
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0) return valid;
  for (Index p = 1; p <= heads; ++p)
    if (heads % p == 0 && (kv_heads % p == 0 || p % kv_heads == 0)) valid.push_back(int(p));
  return valid;
}

/// The heads rank `rank` of `ranks` owns (see the header comment for the rule).
inline HeadShard head_shard(Index heads, Index kv_heads, int ranks, int rank) {
  detail::require<shape_error>(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "shape", "head_shard: heads H = ",
                               heads, " and kv_heads G = ", kv_heads, " must be positive with G dividing H");
  const std::vector<int> valid = valid_head_shard_ranks(heads, kv_heads);
  bool ok = false;
  std::string listed;
  for (int p : valid) {
    ok = ok || p == ranks;
    listed += (listed.empty() ? "" : ", ") + std::to_string(p);
  }
  detail::require(ok, "distributed.ranks", "head_shard: P = ", ranks, " ranks cannot split H = ", heads,
                  " query heads and G = ", kv_heads, " KV heads (P must divide H, and P divide G or G divide P); ",
                  "valid P: ", listed);
  detail::require(rank >= 0 && rank < ranks, "distributed.ranks", "head_shard: rank = ", rank,
                  " must be in [0, P = ", ranks, ")");
  HeadShard s;
  s.heads = heads, s.kv_heads = kv_heads, s.ranks = ranks, s.rank = rank;
  s.num_heads = heads / ranks;
  s.first_head = rank * s.num_heads;
  if (ranks <= kv_heads) {
    s.num_kv_heads = kv_heads / ranks;
    s.first_kv_head = rank * s.num_kv_heads;
  } else {  // the rank's query heads lie inside one group
    s.num_kv_heads = 1;
    s.first_kv_head = s.first_head / (heads / kv_heads);
    s.kv_replicas = ranks / kv_heads;
  }
  return s;
}

/// The heads this rank of `comm` owns.
inline HeadShard head_shard(Index heads, Index kv_heads, MPI_Comm comm) {
  return head_shard(heads, kv_heads, detail::comm_size(comm), detail::comm_rank(comm));
}

/// Heads [first, first + count) of a token-major tensor [B, S, heads, D] (Eigen tensor or TensorRef): a view
/// [B, S, count, D] of the same memory.
template <typename X>
auto slice_heads(X& x, Index first, Index count) {
  auto r = detail::as_ref(x);
  detail::require<shape_error>(first >= 0 && count > 0 && first + count <= r.dims[2], "distributed.shape",
                               "slice_heads: heads [", first, ", ", first + count, ") are not inside dim 2 (heads) = ",
                               r.dims[2]);
  r.data += first * r.strides[2];
  r.dims[2] = count;
  return r;
}

template <typename X>
auto HeadShard::queries(X& x) const {
  const auto r = detail::as_ref(x);
  detail::require<shape_error>(r.dims[2] == heads, "distributed.shape", "HeadShard::queries: dim 2 (heads) = ",
                               r.dims[2], " but the shard was planned for H = ", heads);
  return slice_heads(x, first_head, num_heads);
}

template <typename X>
auto HeadShard::kv(X& x) const {
  const auto r = detail::as_ref(x);
  detail::require<shape_error>(r.dims[2] == kv_heads, "distributed.shape", "HeadShard::kv: dim 2 (kv_heads) = ",
                               r.dims[2], " but the shard was planned for G = ", kv_heads);
  return slice_heads(x, first_kv_head, num_kv_heads);
}

namespace detail {

/// Rows [first, first + count) of dim 1 (the sequence) of a view.
template <typename T>
TensorRef<T> slice_rows(TensorRef<T> r, Index first, Index count) noexcept {
  r.data += first * r.strides[1];
  r.dims[1] = count;
  return r;
}

/// A contiguous partial out [B, S, H, D] as a view.
template <typename T>
TensorRef<T> token_major_of(T* data, const PartialShape& s) noexcept {
  return token_major(data, s.batch, s.rows, s.heads, s.head_dim);
}

/// Copies a contiguous partial out [B, S, H, D] into a strided view of the same shape.
template <typename T>
void copy_out(const PartialShape& s, const T* from, TensorRef<T> to) {
  for (Index b = 0; b < s.batch; ++b)
    for (Index i = 0; i < s.rows; ++i)
      for (Index h = 0; h < s.heads; ++h)
        std::memcpy(&to(b, i, h, 0), from + ((b * s.rows + i) * s.heads + h) * s.head_dim,
                    std::size_t(s.head_dim) * sizeof(T));
}

/// Refuses the options whose masks need global positions, which a rank's share of the keys does not have.
inline void require_positionless(const AttentionOptions& o, const char* call) {
  require(o.window == 0, "distributed.option", call, ": options.window = ", o.window,
          " is not supported (a sliding window needs every key's global position)");
  require(o.bias.empty(), "distributed.option", call, ": options.bias is not supported (it would be split by keys "
          "across ranks)");
  require(!o.key_lengths.given(), "distributed.option", call, ": options.key_lengths is not supported");
}

template <typename T>
inline constexpr bool is_merge_type_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace detail

// ----------------------------------------------------------------------------------- sequence-sharded decode

/// A KV cache whose positions are split across the ranks of a communicator: position p of every sequence lives
/// on rank p % P (round robin, so every rank holds ceil or floor of length / P positions). Each rank appends the
/// same new tokens and keeps its share; local() is a plain gqa::KVCache<T> of [B, G, ceil(capacity / P), D].
template <typename T = float>
class SequenceShardedCache {
 public:
  /// Collective: every rank of comm, with the same sizes. `capacity`: tokens per sequence over all ranks.
  SequenceShardedCache(MPI_Comm comm, Index batch, Index kv_heads, Index capacity, Index head_dim)
      : comm_(comm), ranks_(detail::comm_size(comm)), rank_(detail::comm_rank(comm)) {
    detail::check_on_every_rank(
        comm, "SequenceShardedCache",
        {{"batch", batch}, {"kv_heads", kv_heads}, {"capacity", capacity}, {"head_dim", head_dim}}, [&] {
          detail::require<shape_error>(capacity > 0, "kv_cache", "SequenceShardedCache: capacity = ", capacity,
                                       " must be positive");
          local_ = KVCache<T>(batch, kv_heads, (capacity + ranks_ - 1) / ranks_, head_dim);
        });
    capacity_ = capacity;
    lengths_.assign(std::size_t(batch), 0);
  }

  MPI_Comm comm() const noexcept { return comm_; }
  int ranks() const noexcept { return ranks_; }
  int rank() const noexcept { return rank_; }
  Index batch() const noexcept { return local_.batch(); }
  Index kv_heads() const noexcept { return local_.kv_heads(); }
  Index head_dim() const noexcept { return local_.head_dim(); }
  Index capacity() const noexcept { return capacity_; }
  /// Tokens of sequence b over all ranks.
  Index length(Index b) const { return lengths_.at(std::size_t(b)); }
  /// The rank that holds position `position`.
  int owner(Index position) const noexcept { return int(position % ranks_); }
  /// This rank's share: a plain single-process cache.
  const KVCache<T>& local() const noexcept { return local_; }

  /// Appends S_new tokens to every sequence; k_new, v_new [B, S_new, G, D], the same on every rank (not
  /// communicated). This rank keeps the tokens whose positions it owns. Throws before appending anything if a
  /// shape disagrees or a sequence would pass the capacity.
  template <typename K, typename V>
  void append(const K& k_new, const V& v_new) {
    const auto kr = detail::as_ref(k_new);
    const auto vr = detail::as_ref(v_new);
    const Index s_new = kr.dims[1];
    for (int i = 0; i < 4; ++i)
      detail::require<shape_error>(vr.dims[i] == kr.dims[i], "kv_cache", "SequenceShardedCache::append: v_new dim ",
                                   i, " = ", vr.dims[i], " but k_new dim ", i, " = ", kr.dims[i]);
    detail::require<shape_error>(kr.dims[0] == batch() && kr.dims[2] == kv_heads() && kr.dims[3] == head_dim(),
                                 "kv_cache", "SequenceShardedCache::append: k_new [", kr.dims[0], ", ", s_new, ", ",
                                 kr.dims[2], ", ", kr.dims[3], "] but the cache holds [B = ", batch(),
                                 ", S, G = ", kv_heads(), ", D = ", head_dim(), "]");
    for (Index b = 0; b < batch(); ++b)
      detail::require(lengths_[std::size_t(b)] + s_new <= capacity_, "kv_cache_overflow",
                      "SequenceShardedCache::append: sequence ", b, " holds ", lengths_[std::size_t(b)], " + ", s_new,
                      " new tokens > capacity = ", capacity_);
    std::vector<std::int32_t> keep(static_cast<std::size_t>(batch()));
    for (Index t = 0; t < s_new; ++t) {
      for (Index b = 0; b < batch(); ++b) keep[std::size_t(b)] = owner(lengths_[std::size_t(b)] + t) == rank_;
      local_.append(detail::slice_rows(kr, t, 1), detail::slice_rows(vr, t, 1), keep);
    }
    for (auto& l : lengths_) l += s_new;
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int ranks_ = 1, rank_ = 0;
  Index capacity_ = 0;
  KVCache<T> local_;
  std::vector<Index> lengths_;  // [B], over all ranks
};

/// Collective: attention of q [B, Sq, H, D] (the same on every rank) against every rank's share of `cache`, into
/// out [B, Sq, H, D] on every rank; options.lse, if given, receives the merged log-sum-exp [B, H, Sq]. Each rank
/// attends its share (a rank without keys contributes zeros and lse -inf), then the partials are gathered
/// (MPI_Allgather) and merged in rank order. The keys are a set, not a sequence, here: options.causal is accepted
/// for Sq = 1 only (where it masks nothing), window, bias and key_lengths are refused.
template <typename T, typename Q, typename O>
void sequence_sharded_attention(const Q& q, const SequenceShardedCache<T>& cache, O&& out,
                                const AttentionOptions& options = {}, DistributedStats* stats = nullptr) {
  const auto qr = detail::as_ref(q);
  const auto orf = detail::as_ref(out);
  using QT = detail::ref_elem_t<decltype(qr)>;
  static_assert(detail::is_merge_type_v<QT>, "gqa::sequence_sharded_attention: q and out must be float or double");
  static_assert(std::is_same_v<QT, detail::ref_elem_t<decltype(orf)>>, "gqa: out must have q's element type");
  const detail::PartialShape s{qr.dims[0], qr.dims[1], qr.dims[2], qr.dims[3]};
  std::vector<QT> part(std::size_t(s.out_size()));
  std::vector<float> part_lse(std::size_t(s.lse_size()));
  AttentionOptions local = options;
  local.causal = false;
  local.lse = span<float>(part_lse.data(), s.lse_size());
  const MPI_Comm comm = cache.comm();
  const std::size_t bytes = std::size_t(s.out_size()) * sizeof(QT) + std::size_t(s.lse_size()) * sizeof(float);
  int count = 0;
  detail::check_on_every_rank(
      comm, "sequence_sharded_attention", {{"q dim 0 (B)", s.batch}, {"q dim 1 (Sq)", s.rows},
                                           {"q dim 2 (H)", s.heads}, {"q dim 3 (D)", s.head_dim},
                                           {"sizeof(q element)", Index(sizeof(QT))}},
      [&] {
        detail::require_positionless(options, "sequence_sharded_attention");
        detail::require(!options.causal || s.rows == 1, "distributed.option",
                        "sequence_sharded_attention: options.causal with Sq = ", s.rows,
                        " > 1 needs global key positions; causal is accepted for Sq = 1 (it masks nothing there)");
        detail::require<shape_error>(options.lse.empty() || options.lse.size() == s.lse_size(), "shape",
                                     "options.lse: size = ", options.lse.size(), " but B*H*Sq = ", s.lse_size());
        detail::make_params<QT, T>(qr, cache.local().keys(), cache.local().values(), orf, local,
                                   nullptr);  // every single-process check, before anything moves
        count = detail::byte_count(bytes, "sequence_sharded_attention");
      });
  gqa::attention(q, cache.local(), detail::token_major_of(part.data(), s), local);
  // One message of [out | lse] per rank, merged in rank order on every rank.
  const int ranks = cache.ranks();
  std::vector<unsigned char> mine(bytes), all(bytes * std::size_t(ranks));
  std::memcpy(mine.data(), part.data(), part.size() * sizeof(QT));
  std::memcpy(mine.data() + part.size() * sizeof(QT), part_lse.data(), part_lse.size() * sizeof(float));
  detail::check_mpi(MPI_Allgather(mine.data(), count, MPI_BYTE, all.data(), count, MPI_BYTE, comm), "MPI_Allgather");
  if (stats) {
    stats->bytes_sent += bytes;
    stats->bytes_received += bytes * std::size_t(ranks - 1);
    stats->messages += 1;
  }
  std::vector<QT> acc(part.size());
  std::vector<float> acc_lse(part_lse.size());
  detail::clear_partial(s, acc.data(), acc_lse.data());
  const int threads = detail::resolve_threads(options.num_threads);
  for (int r = 0; r < ranks; ++r) {
    const unsigned char* from = all.data() + bytes * std::size_t(r);
    std::memcpy(part.data(), from, part.size() * sizeof(QT));
    std::memcpy(part_lse.data(), from + part.size() * sizeof(QT), part_lse.size() * sizeof(float));
    detail::merge_partial(s, acc.data(), acc_lse.data(), part.data(), part_lse.data(), threads);
  }
  detail::copy_out(s, acc.data(), orf);
  if (!options.lse.empty()) std::memcpy(options.lse.data(), acc_lse.data(), acc_lse.size() * sizeof(float));
}

// ----------------------------------------------------------------------------------------------- ring prefill

/// The ring's split of a sequence of `length` tokens over `ranks` ranks: 2P chunks, chunk c = positions
/// [c * S / (2P), (c + 1) * S / (2P)); rank r holds chunk r then chunk 2P-1-r, in that order, as its local rows.
struct RingLayout {
  Index length = 0;  ///< S, the whole sequence
  int ranks = 1, rank = 0;
  std::array<Index, 2> chunk{};        ///< chunk indices r and 2P-1-r
  std::array<Index, 2> chunk_begin{};  ///< their first positions
  std::array<Index, 2> chunk_length{};

  Index local_length() const noexcept { return chunk_length[0] + chunk_length[1]; }
  /// The global position of local row `row` (0 <= row < local_length()).
  Index position(Index row) const noexcept {
    return row < chunk_length[0] ? chunk_begin[0] + row : chunk_begin[1] + row - chunk_length[0];
  }
};

/// Rank `rank`'s chunks of a sequence of `length` tokens over `ranks` ranks.
inline RingLayout ring_layout(Index length, int ranks, int rank) {
  detail::require(length >= 0, "distributed.shape", "ring_layout: length = ", length, " must be >= 0");
  detail::require(ranks > 0 && rank >= 0 && rank < ranks, "distributed.ranks", "ring_layout: rank = ", rank,
                  " must be in [0, P = ", ranks, ")");
  RingLayout l;
  l.length = length, l.ranks = ranks, l.rank = rank;
  const Index chunks = 2 * Index(ranks);
  l.chunk = {Index(rank), chunks - 1 - rank};
  for (int i = 0; i < 2; ++i) {
    l.chunk_begin[i] = l.chunk[i] * length / chunks;
    l.chunk_length[i] = (l.chunk[i] + 1) * length / chunks - l.chunk_begin[i];
  }
  return l;
}

namespace detail {

/// One rank's state in ring_attention: its queries, the accumulators of its two chunks, and the block buffers.
template <typename T, typename KVT>
struct RingRank {
  TensorRef<const T> q;
  RingLayout me;
  Index batch = 0, heads = 0, kv_heads = 0, head_dim = 0;
  AttentionOptions options;                   // the caller's, without lse (per call below)
  std::array<std::vector<T>, 2> acc;          // [B, chunk_length, H, D] per chunk
  std::array<std::vector<float>, 2> acc_lse;  // [B, H, chunk_length]
  std::array<bool, 2> seen{};                 // whether acc[c] holds a block's result yet
  std::vector<T> part;
  std::vector<float> part_lse;

  PartialShape chunk_shape(int c) const { return {batch, me.chunk_length[c], heads, head_dim}; }

  /// Attends this rank's chunks to the block of rank `src` (k rows then v rows, token-major [B, L_src, G, D]
  /// each, contiguous at `block`) and merges what each chunk sees.
  void attend_block(const KVT* block, const RingLayout& src, MPI_Request* pending, int n_pending) {
    const Index l_src = src.local_length();
    const TensorRef<const KVT> k = token_major(block, batch, l_src, kv_heads, head_dim);
    const TensorRef<const KVT> v = token_major(block + batch * l_src * kv_heads * head_dim, batch, l_src, kv_heads,
                                               head_dim);
    for (int qc = 0; qc < 2; ++qc) {
      for (int kc = 0; kc < 2; ++kc) {
        const Index lq = me.chunk_length[qc], lk = src.chunk_length[kc];
        const bool future = src.chunk[kc] > me.chunk[qc], diagonal = src.chunk[kc] == me.chunk[qc];
        if (lq == 0 || lk == 0 || (options.causal && future)) continue;
        const PartialShape s = chunk_shape(qc);
        AttentionOptions o = options;
        o.causal = options.causal && diagonal;  // a past chunk is seen whole; the diagonal is the lower triangle
        // A chunk's first block goes straight into its accumulator (what merging it into an empty one gives,
        // exactly), the later ones through `part` and the merge.
        const bool first = !seen[qc];
        seen[qc] = true;
        o.lse = span<float>(first ? acc_lse[qc].data() : part_lse.data(), s.lse_size());
        const Index k_row = kc == 0 ? 0 : src.chunk_length[0], q_row = qc == 0 ? 0 : me.chunk_length[0];
        gqa::attention(slice_rows(q, q_row, lq), slice_rows(k, k_row, lk), slice_rows(v, k_row, lk),
                       token_major_of(first ? acc[qc].data() : part.data(), s), o);
        if (!first)
          merge_partial(s, acc[qc].data(), acc_lse[qc].data(), part.data(), part_lse.data(),
                        resolve_threads(options.num_threads));
        if (n_pending > 0) {  // lets the transfer progress between tiles of work
          int done = 0;
          check_mpi(MPI_Testall(n_pending, pending, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
        }
      }
    }
  }
};

/// Packs k then v ([B, L, G, D] views, any strides) into one contiguous block.
template <typename KVT>
void pack_block(TensorRef<const KVT> k, TensorRef<const KVT> v, KVT* block) {
  const Index B = k.dims[0], L = k.dims[1], G = k.dims[2], D = k.dims[3];
  for (const TensorRef<const KVT>& x : {k, v})
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < L; ++s)
        for (Index g = 0; g < G; ++g, block += D) std::memcpy(block, &x(b, s, g, 0), std::size_t(D) * sizeof(KVT));
}

}  // namespace detail

/// Collective: attention over a sequence split by ring_layout across the ranks of comm. On rank r, q [B, L_r, H, D],
/// k and v [B, L_r, G, D] and out [B, L_r, H, D] hold its local rows (chunk r, then chunk 2P-1-r; L_r =
/// ring_layout(S, P, r).local_length(), S = the sum of the L_r); options.lse, if given, receives the log-sum-exp
/// [B, H, L_r] of those rows. options.causal is the causal mask over the whole sequence (Sq = Sk = S); scale,
/// softcap and num_threads apply as in gqa::attention; window, bias and key_lengths are refused. out is written
/// after the last read of q, k and v (it may be q).
template <typename Q, typename K, typename V, typename O>
void ring_attention(const Q& q, const K& k, const V& v, O&& out, MPI_Comm comm, const AttentionOptions& options = {},
                    DistributedStats* stats = nullptr) {
  const auto in = detail::input_refs(q, k, v);
  using T = detail::ref_elem_t<decltype(in.q)>;
  using KVT = detail::ref_elem_t<decltype(in.k)>;
  static_assert(detail::is_merge_type_v<T>, "gqa::ring_attention: q and out must be float or double");
  const auto orf = detail::output_ref<T>(out);
  const int ranks = detail::comm_size(comm), rank = detail::comm_rank(comm);
  const Index B = in.q.dims[0], L = in.q.dims[1], H = in.q.dims[2], G = in.k.dims[2], D = in.q.dims[3];
  const Index S = Index(detail::sum_over_ranks(comm, L));

  detail::RingRank<T, KVT> ring;
  ring.q = in.q;
  ring.batch = B, ring.heads = H, ring.kv_heads = G, ring.head_dim = D;
  std::vector<RingLayout> layouts;
  Index max_local = 0;
  detail::check_on_every_rank(
      comm, "ring_attention", {{"q dim 0 (B)", B}, {"q dim 2 (H)", H}, {"k dim 2 (G)", G}, {"q dim 3 (D)", D},
                               {"options.causal", options.causal}, {"sizeof(k element)", Index(sizeof(KVT))}},
      [&] {
        detail::require_positionless(options, "ring_attention");
        detail::make_params<T, KVT>(in.q, in.k, in.v, orf, options);  // every single-process check, incl. lse size
        detail::require<shape_error>(in.k.dims[1] == L, "distributed.shape", "ring_attention: k dim 1 = ",
                                     in.k.dims[1], " but q dim 1 = ", L, " (a rank holds the same rows of q, k, v)");
        ring.me = ring_layout(S, ranks, rank);
        detail::require<shape_error>(L == ring.me.local_length(), "distributed.shape", "ring_attention: rank ", rank,
                                     " holds ", L, " rows but ring_layout(S = ", S, ", P = ", ranks, ", ", rank,
                                     ") gives it chunks ", ring.me.chunk[0], " and ", ring.me.chunk[1], " of ",
                                     ring.me.local_length(), " rows");
        for (int r = 0; r < ranks; ++r) {
          layouts.push_back(ring_layout(S, ranks, r));
          max_local = std::max(max_local, layouts.back().local_length());
        }
        detail::byte_count(std::size_t(2 * B * max_local * G * D) * sizeof(KVT), "ring_attention");
      });

  ring.options = options;
  ring.options.lse = {};
  for (int c = 0; c < 2; ++c) {
    const detail::PartialShape s = ring.chunk_shape(c);
    ring.acc[c].resize(std::size_t(s.out_size()));
    ring.acc_lse[c].resize(std::size_t(s.lse_size()));
  }
  const Index max_chunk = std::max(ring.me.chunk_length[0], ring.me.chunk_length[1]);
  ring.part.resize(std::size_t(B * max_chunk * H * D));
  ring.part_lse.resize(std::size_t(B * H * max_chunk));

  // Double buffering: while this rank attends to the block it holds (`cur`, first its own), the block of the
  // rank before it arrives in `next` and `cur` goes on to the rank after it.
  const auto block_elems = [&](const RingLayout& l) { return 2 * B * l.local_length() * G * D; };
  std::vector<KVT> cur(std::size_t(2 * B * max_local * G * D)), next(cur.size());
  detail::pack_block(in.k, in.v, cur.data());
  const int right = (rank + 1) % ranks, left = (rank + ranks - 1) % ranks;
  for (int step = 0; step < ranks; ++step) {
    const RingLayout& src = layouts[std::size_t((rank - step + ranks) % ranks)];
    MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    int n = 0;
    if (step + 1 < ranks) {
      const RingLayout& incoming = layouts[std::size_t((rank - step - 1 + 2 * ranks) % ranks)];
      const std::size_t in_bytes = std::size_t(block_elems(incoming)) * sizeof(KVT);
      const std::size_t out_bytes = std::size_t(block_elems(src)) * sizeof(KVT);
      detail::check_mpi(MPI_Irecv(next.data(), int(in_bytes), MPI_BYTE, left, kRingTag, comm, &requests[0]),
                        "MPI_Irecv");
      detail::check_mpi(MPI_Isend(cur.data(), int(out_bytes), MPI_BYTE, right, kRingTag, comm, &requests[1]),
                        "MPI_Isend");
      n = 2;
      if (stats) {
        stats->bytes_sent += out_bytes;
        stats->bytes_received += in_bytes;
        stats->messages += 1;
      }
    }
    ring.attend_block(cur.data(), src, requests, n);
    if (n > 0) detail::check_mpi(MPI_Waitall(n, requests, MPI_STATUSES_IGNORE), "MPI_Waitall");
    std::swap(cur, next);
  }

  for (int c = 0; c < 2; ++c) {
    const detail::PartialShape s = ring.chunk_shape(c);
    if (!ring.seen[c]) detail::clear_partial(s, ring.acc[c].data(), ring.acc_lse[c].data());  // rows saw no key
    const Index row = c == 0 ? 0 : ring.me.chunk_length[0];
    detail::copy_out(s, ring.acc[c].data(), detail::slice_rows(orf, row, s.rows));
    if (options.lse.empty()) continue;
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        std::memcpy(options.lse.data() + (b * H + h) * L + row, ring.acc_lse[c].data() + (b * H + h) * s.rows,
                    std::size_t(s.rows) * sizeof(float));
  }
}

// ------------------------------------------------------------------------------------------ ring prefill backward

namespace detail {

/// Adds n floats of `from` into `to`.
inline void add_into(float* to, const float* from, Index n) {
  for (Index i = 0; i < n; ++i) to[i] += from[i];
}

}  // namespace detail

/// Collective: the gradients of ring_attention, over the same split. On rank r: q, k, v, out (the forward's
/// output) and d_out hold its local rows as in ring_attention, options are the forward's with options.lse the
/// forward's log-sum-exp [B, H, L_r] (required: the blocks' probabilities are exp(s - lse) of the whole row);
/// writes d_q [B, L_r, H, D] and d_k, d_v [B, L_r, G, D]: each KV head's gradient summed over the H/G query heads
/// of its group and over every rank's queries. The K/V blocks go round the ring as in the forward (overlapped with
/// the block work); their d_k / d_v accumulators (G heads, f32) follow them after each block's work, and a last
/// send brings each home: P sends of 2 * B * L * G * D * 4 bytes per rank on top of the forward's traffic.
/// float only (q, k, v and the gradients): the backward of a double call recomputes its lse per call, which a
/// block cannot.
template <typename Q, typename K, typename V, typename O, typename DO, typename DQ, typename DK, typename DV>
void ring_attention_backward(const Q& q, const K& k, const V& v, const O& out, const DO& d_out, DQ&& d_q,
                             DK&& d_k, DV&& d_v, MPI_Comm comm, const AttentionOptions& options,
                             DistributedStats* stats = nullptr) {
  const auto in = detail::input_refs(q, k, v);
  using T = detail::ref_elem_t<decltype(in.q)>;
  using KVT = detail::ref_elem_t<decltype(in.k)>;
  static_assert(std::is_same_v<T, float> && std::is_same_v<KVT, float>,
                "gqa::ring_attention_backward: q, k, v and their gradients must be float");
  const auto out_r = detail::input_ref<T>(out), d_out_r = detail::input_ref<T>(d_out);
  const auto d_q_r = detail::output_ref<T>(d_q);
  const auto d_k_r = detail::output_ref<KVT>(d_k), d_v_r = detail::output_ref<KVT>(d_v);
  const int ranks = detail::comm_size(comm), rank = detail::comm_rank(comm);
  const Index B = in.q.dims[0], L = in.q.dims[1], H = in.q.dims[2], G = in.k.dims[2], D = in.q.dims[3];
  const Index S = Index(detail::sum_over_ranks(comm, L));

  RingLayout me;
  std::vector<RingLayout> layouts;
  Index max_local = 0;
  detail::check_on_every_rank(
      comm, "ring_attention_backward",
      {{"q dim 0 (B)", B}, {"q dim 2 (H)", H}, {"k dim 2 (G)", G}, {"q dim 3 (D)", D},
       {"options.causal", options.causal}},
      [&] {
        detail::require_positionless(options, "ring_attention_backward");
        detail::require(options.lse.data() != nullptr || B * H * L == 0, "distributed.option",
                        "ring_attention_backward: options.lse must hold the forward's log-sum-exp [B, H, L]");
        detail::make_backward_params<T, KVT>(in.q, in.k, in.v, out_r, d_out_r, d_q_r, d_k_r, d_v_r, options, {});
        detail::require<shape_error>(in.k.dims[1] == L, "distributed.shape", "ring_attention_backward: k dim 1 = ",
                                     in.k.dims[1], " but q dim 1 = ", L, " (a rank holds the same rows of q, k, v)");
        me = ring_layout(S, ranks, rank);
        detail::require<shape_error>(L == me.local_length(), "distributed.shape", "ring_attention_backward: rank ",
                                     rank, " holds ", L, " rows but ring_layout(S = ", S, ", P = ", ranks, ", ", rank,
                                     ") gives it ", me.local_length());
        for (int r = 0; r < ranks; ++r) {
          layouts.push_back(ring_layout(S, ranks, r));
          max_local = std::max(max_local, layouts.back().local_length());
        }
        detail::byte_count(std::size_t(2 * B * max_local * G * D) * sizeof(float), "ring_attention_backward");
      });

  // Per query chunk: its q, out, d_out rows and lse rows (contiguous, as a block call reads them) and d_q sum.
  std::array<std::vector<float>, 2> lse_rows, d_q_acc;
  for (int c = 0; c < 2; ++c) {
    const Index rows = me.chunk_length[c], row0 = c == 0 ? 0 : me.chunk_length[0];
    lse_rows[c].resize(std::size_t(B * H * rows));
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        std::memcpy(lse_rows[c].data() + (b * H + h) * rows, options.lse.data() + (b * H + h) * L + row0,
                    std::size_t(rows) * sizeof(float));
    d_q_acc[c].assign(std::size_t(B * rows * H * D), 0.0f);
  }
  const Index max_chunk = std::max(me.chunk_length[0], me.chunk_length[1]);
  std::vector<float> d_q_part(std::size_t(B * max_chunk * H * D));
  std::vector<float> d_k_part(std::size_t(B * max_local * G * D)), d_v_part(d_k_part.size());

  const std::size_t block_size = std::size_t(2 * B * max_local * G * D);
  std::vector<float> cur(block_size), next(block_size), grad(block_size), grad_next(block_size);
  detail::pack_block(in.k, in.v, cur.data());
  const auto block_bytes = [&](const RingLayout& l) { return std::size_t(2 * B * l.local_length() * G * D) * 4; };
  const int right = (rank + 1) % ranks, left = (rank + ranks - 1) % ranks;
  const auto count = [&](std::size_t sent, std::size_t received) {
    if (!stats) return;
    stats->bytes_sent += sent;
    stats->bytes_received += received;
    stats->messages += 1;
  };
  for (int step = 0; step < ranks; ++step) {
    const RingLayout& src = layouts[std::size_t((rank - step + ranks) % ranks)];
    const RingLayout& incoming = layouts[std::size_t((rank - step - 1 + 2 * ranks) % ranks)];
    MPI_Request kv[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    if (step + 1 < ranks) {
      detail::check_mpi(MPI_Irecv(next.data(), int(block_bytes(incoming)), MPI_BYTE, left, kRingTag, comm, &kv[0]),
                        "MPI_Irecv");
      detail::check_mpi(MPI_Isend(cur.data(), int(block_bytes(src)), MPI_BYTE, right, kRingTag, comm, &kv[1]),
                        "MPI_Isend");
      count(block_bytes(src), block_bytes(incoming));
    }
    if (step == 0) std::fill(grad.begin(), grad.end(), 0.0f);
    const Index l_src = src.local_length(), v_offset = B * l_src * G * D;
    const TensorRef<const float> kb = token_major<const float>(cur.data(), B, l_src, G, D);
    const TensorRef<const float> vb = token_major<const float>(cur.data() + v_offset, B, l_src, G, D);
    for (int qc = 0; qc < 2; ++qc) {
      for (int kc = 0; kc < 2; ++kc) {
        const Index lq = me.chunk_length[qc], lk = src.chunk_length[kc];
        const bool future = src.chunk[kc] > me.chunk[qc], diagonal = src.chunk[kc] == me.chunk[qc];
        if (lq == 0 || lk == 0 || (options.causal && future)) continue;
        const Index q_row = qc == 0 ? 0 : me.chunk_length[0], k_row = kc == 0 ? 0 : src.chunk_length[0];
        AttentionOptions o = options;
        o.causal = options.causal && diagonal;
        o.lse = span<float>(lse_rows[qc].data(), B * H * lq);
        const auto dq = token_major(d_q_part.data(), B, lq, H, D);
        const auto dk = token_major(d_k_part.data(), B, lk, G, D), dv = token_major(d_v_part.data(), B, lk, G, D);
        attention_backward(detail::slice_rows(in.q, q_row, lq), detail::slice_rows(kb, k_row, lk),
                           detail::slice_rows(vb, k_row, lk), detail::slice_rows(out_r, q_row, lq),
                           detail::slice_rows(d_out_r, q_row, lq), dq, dk, dv, o);
        detail::add_into(d_q_acc[qc].data(), d_q_part.data(), B * lq * H * D);
        for (Index b = 0; b < B; ++b) {  // rows k_row .. k_row + lk of the block's d_k and d_v, per batch
          const Index n = lk * G * D, at = (b * l_src + k_row) * G * D;
          detail::add_into(grad.data() + at, d_k_part.data() + b * n, n);
          detail::add_into(grad.data() + v_offset + at, d_v_part.data() + b * n, n);
        }
        int done = 0;
        if (step + 1 < ranks) detail::check_mpi(MPI_Testall(2, kv, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
      }
    }
    // The block's gradient goes on with it (after the last step: home to its owner, the rank to the right).
    MPI_Request g[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    const RingLayout& grad_in = step + 1 < ranks ? incoming : me;
    detail::check_mpi(MPI_Irecv(grad_next.data(), int(block_bytes(grad_in)), MPI_BYTE, left, kRingTag + 1, comm,
                                &g[0]), "MPI_Irecv");
    detail::check_mpi(MPI_Isend(grad.data(), int(block_bytes(src)), MPI_BYTE, right, kRingTag + 1, comm, &g[1]),
                      "MPI_Isend");
    count(block_bytes(src), block_bytes(grad_in));
    detail::check_mpi(MPI_Waitall(2, kv, MPI_STATUSES_IGNORE), "MPI_Waitall");
    detail::check_mpi(MPI_Waitall(2, g, MPI_STATUSES_IGNORE), "MPI_Waitall");
    std::swap(cur, next);
    std::swap(grad, grad_next);
  }

  for (int c = 0; c < 2; ++c) {
    const detail::PartialShape s{B, me.chunk_length[c], H, D};
    detail::copy_out(s, d_q_acc[c].data(), detail::slice_rows(d_q_r, c == 0 ? 0 : me.chunk_length[0], s.rows));
  }
  const detail::PartialShape kv_shape{B, L, G, D};
  detail::copy_out(kv_shape, grad.data(), d_k_r);
  detail::copy_out(kv_shape, grad.data() + B * L * G * D, d_v_r);
}

}  // namespace gqa
