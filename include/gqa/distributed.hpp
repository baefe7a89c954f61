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

/// Gathers every rank's partial (part, part_lse: shape s) with one MPI_Allgather of `count` bytes per rank,
/// [out | lse], and merges them in rank order into acc, acc_lse (the same result on every rank). part and
/// part_lse are overwritten.
template <typename T>
void allgather_merge(MPI_Comm comm, const PartialShape& s, std::vector<T>& part, std::vector<float>& part_lse,
                     int count, int threads, DistributedStats* stats, std::vector<T>& acc,
                     std::vector<float>& acc_lse) {
  const std::size_t out_bytes = part.size() * sizeof(T), bytes = std::size_t(count);
  const int ranks = comm_size(comm);
  std::vector<unsigned char> mine(bytes), all(bytes * std::size_t(ranks));
  std::memcpy(mine.data(), part.data(), out_bytes);
  std::memcpy(mine.data() + out_bytes, part_lse.data(), part_lse.size() * sizeof(float));
  check_mpi(MPI_Allgather(mine.data(), count, MPI_BYTE, all.data(), count, MPI_BYTE, comm), "MPI_Allgather");
  if (stats) {
    stats->bytes_sent += bytes;
    stats->bytes_received += bytes * std::size_t(ranks - 1);
    stats->messages += 1;
  }
  clear_partial(s, acc.data(), acc_lse.data());
  for (int r = 0; r < ranks; ++r) {
    const unsigned char* from = all.data() + bytes * std::size_t(r);
    std::memcpy(part.data(), from, out_bytes);
    std::memcpy(part_lse.data(), from + out_bytes, part_lse.size() * sizeof(float));
    merge_partial(s, acc.data(), acc_lse.data(), part.data(), part_lse.data(), threads);
  }
}

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
  std::vector<QT> acc(part.size());
  std::vector<float> acc_lse(part_lse.size());
  detail::allgather_merge(comm, s, part, part_lse, count, detail::resolve_threads(options.num_threads), stats, acc,
                          acc_lse);
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

/// The ring of one call: every rank's layout, this rank's neighbours, and the byte count.
struct Ring {
  MPI_Comm comm = MPI_COMM_NULL;
  int ranks = 1, rank = 0;
  std::vector<RingLayout> layouts;  // [P]
  Index max_local = 0;              // the longest local length: the block buffers' rows
  DistributedStats* stats = nullptr;

  const RingLayout& me() const { return layouts[std::size_t(rank)]; }
  /// The layout of the rank whose block this rank holds at `step` (0: its own; blocks move right one rank a step).
  const RingLayout& source(int step) const {
    return layouts[std::size_t(((rank - step) % ranks + ranks) % ranks)];
  }
  /// Posts the receive of `in_bytes` into `into` from the rank on the left and the send of `out_bytes` of `from`
  /// to the rank on the right: r[0], r[1].
  void pass(void* into, std::size_t in_bytes, const void* from, std::size_t out_bytes, int tag,
            MPI_Request* r) const {
    const int right = (rank + 1) % ranks, left = (rank + ranks - 1) % ranks;
    check_mpi(MPI_Irecv(into, int(in_bytes), MPI_BYTE, left, tag, comm, &r[0]), "MPI_Irecv");
    check_mpi(MPI_Isend(from, int(out_bytes), MPI_BYTE, right, tag, comm, &r[1]), "MPI_Isend");
    if (!stats) return;
    stats->bytes_sent += out_bytes;
    stats->bytes_received += in_bytes;
    stats->messages += 1;
  }
};

/// Checks a ring call on every rank (check_on_every_rank): q [B, L, H, D] and k [B, L_k, G, D] hold the rows that
/// ring_layout gives this rank, the options are positionless, and `local_checks` (the single-process checks of
/// the tensors) pass. Returns the ring. `block_elem_bytes`: bytes per element of the largest block sent.
template <typename Checks>
Ring make_ring(MPI_Comm comm, const char* call, const std::array<Index, 4>& q_dims, const std::array<Index, 4>& k_dims,
               std::size_t block_elem_bytes, const AttentionOptions& options, DistributedStats* stats,
               Checks&& local_checks) {
  Ring ring;
  ring.comm = comm, ring.stats = stats;
  ring.ranks = comm_size(comm), ring.rank = comm_rank(comm);
  const Index B = q_dims[0], L = q_dims[1], H = q_dims[2], D = q_dims[3], G = k_dims[2];
  const Index S = Index(sum_over_ranks(comm, L));
  check_on_every_rank(
      comm, call, {{"q dim 0 (B)", B}, {"q dim 2 (H)", H}, {"k dim 2 (G)", G}, {"q dim 3 (D)", D},
                   {"options.causal", options.causal}, {"bytes of a block element", Index(block_elem_bytes)}},
      [&] {
        require_positionless(options, call);
        local_checks();
        require<shape_error>(k_dims[1] == L, "distributed.shape", call, ": k dim 1 = ", k_dims[1], " but q dim 1 = ",
                             L, " (a rank holds the same rows of q, k, v)");
        const RingLayout me = ring_layout(S, ring.ranks, ring.rank);
        require<shape_error>(L == me.local_length(), "distributed.shape", call, ": rank ", ring.rank, " holds ", L,
                             " rows but ring_layout(S = ", S, ", P = ", ring.ranks, ", ", ring.rank,
                             ") gives it chunks ", me.chunk[0], " and ", me.chunk[1], " of ", me.local_length(),
                             " rows");
        for (int r = 0; r < ring.ranks; ++r) {
          ring.layouts.push_back(ring_layout(S, ring.ranks, r));
          ring.max_local = std::max(ring.max_local, ring.layouts.back().local_length());
        }
        byte_count(std::size_t(2 * B * ring.max_local * G * D) * block_elem_bytes, call);
      });
  return ring;
}

/// First local row of chunk c (0 or 1).
inline Index chunk_row(const RingLayout& l, int c) noexcept { return c == 0 ? 0 : l.chunk_length[0]; }

/// Calls f(qc, kc, diagonal) for each pair of this rank's query chunk qc and the held block's key chunk kc whose
/// keys its queries see: every non-empty pair without causal; with causal, the key chunks not in the queries'
/// future, the diagonal one (the same chunk) seen as the lower triangle, an earlier one whole.
template <typename F>
void for_each_visible_pair(const RingLayout& me, const RingLayout& src, bool causal, F&& f) {
  for (int qc = 0; qc < 2; ++qc)
    for (int kc = 0; kc < 2; ++kc) {
      if (me.chunk_length[qc] == 0 || src.chunk_length[kc] == 0) continue;
      if (causal && src.chunk[kc] > me.chunk[qc]) continue;
      f(qc, kc, causal && src.chunk[kc] == me.chunk[qc]);
    }
}

/// Lets pending transfers progress between pieces of work (Open MPI moves data inside MPI calls).
inline void progress(MPI_Request* pending, int n) {
  if (n == 0) return;
  int done = 0;
  check_mpi(MPI_Testall(n, pending, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
}

/// Views of the K and V rows of a block (k then v, token-major [B, L, G, D] each, contiguous at `block`).
template <typename KVT>
std::array<TensorRef<const KVT>, 2> block_views(const KVT* block, Index B, Index L, Index G, Index D) noexcept {
  return {token_major(block, B, L, G, D), token_major(block + B * L * G * D, B, L, G, D)};
}

/// Packs k then v ([B, L, G, D] views, any strides) into one contiguous block.
template <typename KVT>
void pack_block(TensorRef<const KVT> k, TensorRef<const KVT> v, KVT* block) {
  const Index B = k.dims[0], L = k.dims[1], G = k.dims[2], D = k.dims[3];
  for (const TensorRef<const KVT>& x : {k, v})
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < L; ++s)
        for (Index g = 0; g < G; ++g, block += D) std::memcpy(block, &x(b, s, g, 0), std::size_t(D) * sizeof(KVT));
}

/// One rank's forward state: its queries, and the accumulated output and lse of its two chunks.
template <typename T, typename KVT>
struct RingForward {
  TensorRef<const T> q;
  RingLayout me;
  Index batch, heads, kv_heads, head_dim;
  AttentionOptions options;                   // the caller's, without lse (set per block call)
  std::array<std::vector<T>, 2> acc;          // [B, chunk_length, H, D] per chunk
  std::array<std::vector<float>, 2> acc_lse;  // [B, H, chunk_length]
  std::array<bool, 2> seen{};                 // whether acc[c] holds a block's result yet
  std::vector<T> part;
  std::vector<float> part_lse;

  RingForward(TensorRef<const T> q_, const RingLayout& me_, Index G, const AttentionOptions& o)
      : q(q_), me(me_), batch(q_.dims[0]), heads(q_.dims[2]), kv_heads(G), head_dim(q_.dims[3]), options(o) {
    options.lse = {};
    for (int c = 0; c < 2; ++c) {
      acc[c].resize(std::size_t(chunk_shape(c).out_size()));
      acc_lse[c].resize(std::size_t(chunk_shape(c).lse_size()));
    }
    const Index rows = std::max(me.chunk_length[0], me.chunk_length[1]);
    part.resize(std::size_t(batch * rows * heads * head_dim));
    part_lse.resize(std::size_t(batch * heads * rows));
  }

  PartialShape chunk_shape(int c) const { return {batch, me.chunk_length[c], heads, head_dim}; }

  /// Attends this rank's chunks to the held block of rank `src` and merges what each chunk sees. A chunk's first
  /// block goes straight into its accumulator (what merging it into an empty one gives, exactly).
  void attend_block(const KVT* block, const RingLayout& src, MPI_Request* pending, int n_pending) {
    const auto kv = block_views(block, batch, src.local_length(), kv_heads, head_dim);
    for_each_visible_pair(me, src, options.causal, [&](int qc, int kc, bool diagonal) {
      const PartialShape s = chunk_shape(qc);
      const Index k_row = chunk_row(src, kc), lk = src.chunk_length[kc];
      const bool first = !seen[qc];
      seen[qc] = true;
      AttentionOptions o = options;
      o.causal = diagonal;
      o.lse = span<float>(first ? acc_lse[qc].data() : part_lse.data(), s.lse_size());
      gqa::attention(slice_rows(q, chunk_row(me, qc), s.rows), slice_rows(kv[0], k_row, lk),
                     slice_rows(kv[1], k_row, lk), token_major_of(first ? acc[qc].data() : part.data(), s), o);
      if (!first)
        merge_partial(s, acc[qc].data(), acc_lse[qc].data(), part.data(), part_lse.data(),
                      resolve_threads(options.num_threads));
      progress(pending, n_pending);
    });
  }

  /// Writes the merged rows into out [B, L, H, D] and, if given, lse [B, H, L].
  void write(TensorRef<T> out, span<float> lse) {
    const Index L = me.local_length();
    for (int c = 0; c < 2; ++c) {
      const PartialShape s = chunk_shape(c);
      if (!seen[c]) clear_partial(s, acc[c].data(), acc_lse[c].data());  // rows that saw no key
      copy_out(s, acc[c].data(), slice_rows(out, chunk_row(me, c), s.rows));
      if (lse.empty()) continue;
      for (Index b = 0; b < batch; ++b)
        for (Index h = 0; h < heads; ++h)
          std::memcpy(lse.data() + (b * heads + h) * L + chunk_row(me, c), acc_lse[c].data() + (b * heads + h) * s.rows,
                      std::size_t(s.rows) * sizeof(float));
    }
  }
};

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
  const auto single_process_checks = [&] { detail::make_params<T, KVT>(in.q, in.k, in.v, orf, options); };
  const detail::Ring ring = detail::make_ring(comm, "ring_attention", in.q.dims, in.k.dims, sizeof(KVT), options,
                                              stats, single_process_checks);
  detail::RingForward<T, KVT> work(in.q, ring.me(), in.k.dims[2], options);

  // Double buffering: while this rank attends to the block it holds (`cur`, first its own), the block of the
  // rank before it arrives in `next` and `cur` goes on to the rank after it.
  const Index B = in.q.dims[0], G = in.k.dims[2], D = in.q.dims[3];
  const auto bytes = [&](const RingLayout& l) { return std::size_t(2 * B * l.local_length() * G * D) * sizeof(KVT); };
  std::vector<KVT> cur(std::size_t(2 * B * ring.max_local * G * D)), next(cur.size());
  detail::pack_block(in.k, in.v, cur.data());
  for (int step = 0; step < ring.ranks; ++step) {
    MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    const bool more = step + 1 < ring.ranks;
    if (more) ring.pass(next.data(), bytes(ring.source(step + 1)), cur.data(), bytes(ring.source(step)), kRingTag,
                        requests);
    work.attend_block(cur.data(), ring.source(step), requests, more ? 2 : 0);
    if (more) detail::check_mpi(MPI_Waitall(2, requests, MPI_STATUSES_IGNORE), "MPI_Waitall");
    std::swap(cur, next);
  }
  work.write(orf, options.lse);
}

// ------------------------------------------------------------------------------------------ ring prefill backward

namespace detail {

/// Adds n floats of `from` into `to`.
inline void add_into(float* to, const float* from, Index n) {
  for (Index i = 0; i < n; ++i) to[i] += from[i];
}

/// One rank's backward state: its q, out, d_out and forward lse rows, and the d_q sums of its two chunks.
struct RingBackward {
  TensorRef<const float> q, out, d_out;
  RingLayout me;
  Index batch, heads, kv_heads, head_dim;
  AttentionOptions options;
  std::array<std::vector<float>, 2> lse_rows, d_q_acc;  // per chunk: [B, H, rows], [B, rows, H, D]
  std::vector<float> d_q_part, d_k_part, d_v_part;

  RingBackward(TensorRef<const float> q_, TensorRef<const float> out_, TensorRef<const float> d_out_,
               const RingLayout& me_, Index G, Index max_local, const AttentionOptions& o)
      : q(q_), out(out_), d_out(d_out_), me(me_), batch(q_.dims[0]), heads(q_.dims[2]), kv_heads(G),
        head_dim(q_.dims[3]), options(o) {
    const Index B = batch, H = heads, D = head_dim, L = me.local_length();
    for (int c = 0; c < 2; ++c) {  // each chunk's lse rows, contiguous as a block call reads them
      const Index rows = me.chunk_length[c];
      lse_rows[c].resize(std::size_t(B * H * rows));
      for (Index b = 0; b < B; ++b)
        for (Index h = 0; h < H; ++h)
          std::memcpy(lse_rows[c].data() + (b * H + h) * rows, o.lse.data() + (b * H + h) * L + chunk_row(me, c),
                      std::size_t(rows) * sizeof(float));
      d_q_acc[c].assign(std::size_t(B * rows * H * D), 0.0f);
    }
    d_q_part.resize(std::size_t(B * std::max(me.chunk_length[0], me.chunk_length[1]) * H * D));
    d_k_part.resize(std::size_t(B * max_local * G * D));
    d_v_part.resize(d_k_part.size());
  }

  /// The gradients of this rank's chunks against the held block of rank `src`: d_q into the chunks' sums, d_k and
  /// d_v into `grad` (the block's gradient, laid out as the block: d_k rows then d_v rows).
  void attend_block(const float* block, float* grad, const RingLayout& src, MPI_Request* pending, int n_pending) {
    const Index l_src = src.local_length(), GD = kv_heads * head_dim;
    const auto kv = block_views(block, batch, l_src, kv_heads, head_dim);
    for_each_visible_pair(me, src, options.causal, [&](int qc, int kc, bool diagonal) {
      const Index lq = me.chunk_length[qc], lk = src.chunk_length[kc];
      const Index q_row = chunk_row(me, qc), k_row = chunk_row(src, kc);
      AttentionOptions o = options;
      o.causal = diagonal;
      o.lse = span<float>(lse_rows[qc].data(), batch * heads * lq);  // the whole row's: P = exp(s - lse)
      attention_backward(slice_rows(q, q_row, lq), slice_rows(kv[0], k_row, lk), slice_rows(kv[1], k_row, lk),
                         slice_rows(out, q_row, lq), slice_rows(d_out, q_row, lq),
                         token_major(d_q_part.data(), batch, lq, heads, head_dim),
                         token_major(d_k_part.data(), batch, lk, kv_heads, head_dim),
                         token_major(d_v_part.data(), batch, lk, kv_heads, head_dim), o);
      add_into(d_q_acc[qc].data(), d_q_part.data(), batch * lq * heads * head_dim);
      for (Index b = 0; b < batch; ++b) {  // rows k_row .. k_row + lk of each sequence of the block
        const Index at = (b * l_src + k_row) * GD;
        add_into(grad + at, d_k_part.data() + b * lk * GD, lk * GD);
        add_into(grad + batch * l_src * GD + at, d_v_part.data() + b * lk * GD, lk * GD);
      }
      progress(pending, n_pending);
    });
  }

  void write(TensorRef<float> d_q) const {
    for (int c = 0; c < 2; ++c) {
      const PartialShape s{batch, me.chunk_length[c], heads, head_dim};
      copy_out(s, d_q_acc[c].data(), slice_rows(d_q, chunk_row(me, c), s.rows));
    }
  }
};

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
  static_assert(std::is_same_v<detail::ref_elem_t<decltype(in.q)>, float> &&
                    std::is_same_v<detail::ref_elem_t<decltype(in.k)>, float>,
                "gqa::ring_attention_backward: q, k, v and their gradients must be float");
  const auto out_r = detail::input_ref<float>(out), d_out_r = detail::input_ref<float>(d_out);
  const auto d_q_r = detail::output_ref<float>(d_q), d_k_r = detail::output_ref<float>(d_k);
  const auto d_v_r = detail::output_ref<float>(d_v);
  const Index B = in.q.dims[0], L = in.q.dims[1], H = in.q.dims[2], G = in.k.dims[2], D = in.q.dims[3];
  const auto single_process_checks = [&] {
    detail::require(options.lse.data() != nullptr || B * H * L == 0, "distributed.option",
                    "ring_attention_backward: options.lse must hold the forward's log-sum-exp [B, H, L]");
    detail::make_backward_params<float, float>(in.q, in.k, in.v, out_r, d_out_r, d_q_r, d_k_r, d_v_r, options, {});
  };
  const detail::Ring ring = detail::make_ring(comm, "ring_attention_backward", in.q.dims, in.k.dims, sizeof(float),
                                              options, stats, single_process_checks);
  detail::RingBackward work(in.q, out_r, d_out_r, ring.me(), G, ring.max_local, options);

  // As the forward's double buffering, and the held block's gradient (`grad`, zeros for the own block) goes on
  // to the right after this rank's work on it; after the last step each gradient arrives home.
  const auto bytes = [&](const RingLayout& l) { return std::size_t(2 * B * l.local_length() * G * D) * 4; };
  const std::size_t size = std::size_t(2 * B * ring.max_local * G * D);
  std::vector<float> cur(size), next(size), grad(size, 0.0f), grad_next(size);
  detail::pack_block(in.k, in.v, cur.data());
  for (int step = 0; step < ring.ranks; ++step) {
    MPI_Request kv[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL}, g[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    const bool more = step + 1 < ring.ranks;
    if (more) ring.pass(next.data(), bytes(ring.source(step + 1)), cur.data(), bytes(ring.source(step)), kRingTag, kv);
    work.attend_block(cur.data(), grad.data(), ring.source(step), kv, more ? 2 : 0);
    ring.pass(grad_next.data(), bytes(ring.source(step + 1)), grad.data(), bytes(ring.source(step)), kRingTag + 1, g);
    detail::check_mpi(MPI_Waitall(2, kv, MPI_STATUSES_IGNORE), "MPI_Waitall");
    detail::check_mpi(MPI_Waitall(2, g, MPI_STATUSES_IGNORE), "MPI_Waitall");
    std::swap(cur, next);
    std::swap(grad, grad_next);
  }
  work.write(d_q_r);
  const detail::PartialShape kv_shape{B, L, G, D};
  detail::copy_out(kv_shape, grad.data(), d_k_r);
  detail::copy_out(kv_shape, grad.data() + B * L * G * D, d_v_r);
}

}  // namespace gqa
