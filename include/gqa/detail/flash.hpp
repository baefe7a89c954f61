// gqa/detail/flash.hpp — the flash-style attention kernel behind gqa::attention.
//
// Work is split into items (b, g, query tile, key split). One item owns the H/G query heads of KV head g for a
// tile of queries: they are stacked as the rows of one matrix Qg [rows = q_tile * H/G, D], so every K/V tile of
// head g is read once and used by all rows of the group (never repeated per query head). Keys are streamed in
// tiles of k_tile rows with the online softmax (running max m, running sum l, unnormalised output O), so memory
// is O(tile), never Sq x Sk. Scores are kept transposed, S^T [keys, rows], so the softmax vectorises across rows.
// Tile products: with few rows (decode, up to 4 SIMD packets) the register-blocked micro-kernels of
// microkernels.hpp read K/V rows in place and widen 16-bit values in registers; with many rows (prefill) Eigen's
// GEMM runs on maps of the caller's memory (16-bit and mixed-precision K/V widened one tile at a time). Key tiles
// that no row of an item can see (causal, window, key lengths) are never visited.
//
// When there are few (b, g, query tile) items (decode: B * G small), the key range is also split
// (flash-decoding): each split keeps its partial (m, l, O), and the splits are merged with log-sum-exp weights.
// The split count depends on the shapes only, never on the thread count, so results are bitwise identical for
// any num_threads.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/detail/microkernels.hpp"
#include "gqa/detail/params.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gqa {
namespace detail {

/// Tile sizes for one call.
///  * Prefill (many rows): T rows per item (T / (H/G) queries of the group) and T keys per tile, with the largest T
///    in {128, 64, 32} whose working set -- Qg and O [T, D], the score block [T, T], one K and one V tile [T, D] --
///    takes at most 3/4 of the L2 cache Eigen detects (512 KiB L2, D = 128: T = 128, 320 KiB), so the tile
///    products run from L2 while each GEMM is still large enough for Eigen's kernel to pay for packing.
///  * Decode (rows <= 4 packets, D a multiple of the packet size): the micro-kernels read K/V in place, 256 keys
///    per tile (the score tile, at most 32 KiB, stays in L1/L2). The kernels walk a tile in chunks of keys small
///    enough for L1, so a longer tile only amortises the per-tile softmax and output rescaling: against 64 keys,
///    L2-resident, 55 -> 47 cycles per (key, row) at 1 row, 27.5 -> 25.9 at 4, 20.7 -> 20.1 at 8.
/// Tile sizes depend on the machine's cache sizes and the shapes, never on the thread count.
struct TilePlan {
  Index q_tile = 1;    // queries per item
  Index k_tile = 128;  // keys per inner step
  Index splits = 1;    // key-range splits per (b, g, query tile)
  Index q_tiles = 1;   // ceil(Sq / q_tile)
  Index rows_max = 1;  // q_tile * group_size
  bool small = false;  // register-blocked micro-kernels instead of Eigen GEMM
};

/// Number of (b, g, query-tile[, split]) work items below which the key range is split (flash-decoding). Fixed,
/// not derived from the thread count, so that the reduction order (and the result) never depends on threads.
inline constexpr Index kMinWorkItems = 16;
/// Keys per split are at least this many, so merging partials stays negligible next to streaming K/V.
inline constexpr Index kMinKeysPerSplit = 512;

template <typename P>
TilePlan plan_tiles(const P& p) {
  using Acc = typename P::Acc;
  TilePlan t;
  const bool vector_d = p.head_dim % mk::kLanes<Acc> == 0;
  if (vector_d && p.q_len * p.group_size <= mk::kMaxRows<Acc>) {
    t.small = true;
    t.q_tile = p.q_len;
    t.k_tile = 256;
  } else if (vector_d && p.group_size <= mk::kMaxRows<Acc> && p.q_len <= 4) {
    t.small = true;  // a few queries of a big group: one query per item
    t.q_tile = std::max<Index>(1, mk::kMaxRows<Acc> / p.group_size);
    t.k_tile = 256;
  } else {
    const Index budget = Index(Eigen::l2CacheSize()) * 3 / 4;
    Index tile = 128;
    while (tile > 32 && Index(sizeof(Acc)) * (4 * tile * p.head_dim + tile * tile) > budget) tile /= 2;
    t.q_tile = std::max<Index>(1, std::min<Index>(p.q_len, tile / p.group_size));
    t.k_tile = tile;
  }
  t.q_tiles = p.q_len == 0 ? 0 : (p.q_len + t.q_tile - 1) / t.q_tile;
  t.rows_max = t.q_tile * p.group_size;
  const Index items = p.batch * p.kv_heads * t.q_tiles;
  if (items > 0 && items < kMinWorkItems) {
    const Index want = (kMinWorkItems + items - 1) / items;
    const Index cap = std::max<Index>(1, p.k_len / kMinKeysPerSplit);
    t.splits = std::max<Index>(1, std::min(want, cap));
  }
  return t;
}

inline int resolve_threads(int requested) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;  // never nest inside the caller's parallel region
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

/// Visible key range [lo, hi) of query i of a sequence with `len` valid keys (the rules of gqa/options.hpp).
template <typename P>
inline void visible_keys(const P& p, Index i, Index len, Index& lo, Index& hi) {
  const Index pos = i + len - p.q_len;  // absolute position, bottom-right aligned
  hi = p.causal ? std::clamp<Index>(pos + 1, 0, len) : len;
  lo = p.window > 0 ? std::clamp<Index>(pos - p.window + 1, 0, len) : 0;
  if (lo > hi) lo = hi;
}

template <typename Acc>
using RowMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Acc>
using RowVector = Eigen::Matrix<Acc, 1, Eigen::Dynamic>;

/// Per-thread buffers, allocated once per call and reused by every item the thread runs.
template <typename Acc>
struct Workspace {
  RowMatrix<Acc> qg;       // [rows_max, D]       the group's queries, pre-multiplied by scale
  RowMatrix<Acc> q_small;  // [D, 4 packets]      qg as the micro-kernels read it: packed by mk::pack_rows, or
                           //                     transposed and zero-padded (outer form)
  RowMatrix<Acc> out;      // [rows_max, D]       unnormalised output
  RowMatrix<Acc> scores;   // [k_tile rounded up to 64, rows_max] S^T: a row per key, a column per query row
  RowMatrix<Acc> k_buf;    // [k_tile, D]         widened K tile (GEMM path with 16-bit or mixed K/V)
  RowMatrix<Acc> v_buf;    // [k_tile, D]
  RowVector<Acc> row_max, row_sum, tile_max, shift, correction;  // [rows_max]
  RowVector<Acc> pattern;  // [2 * rows_max * lanes >= 2 P] column reductions and shifts of the flat score view

  Workspace(const TilePlan& t, Index head_dim, bool widen)
      : qg(t.rows_max, head_dim), out(t.rows_max, head_dim), scores((t.k_tile + 63) / 64 * 64, t.rows_max), row_max(t.rows_max),
        row_sum(t.rows_max), tile_max(t.rows_max), shift(t.rows_max), correction(t.rows_max),
        pattern(2 * t.rows_max * mk::kLanes<Acc>) {
    if (t.small) q_small.resize(head_dim, mk::kMaxRows<Acc>);
    if (widen && !t.small) {
      k_buf.resize(t.k_tile, head_dim);
      v_buf.resize(t.k_tile, head_dim);
    }
  }
};

template <typename Acc>
using ConstTile = Eigen::Map<const RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// A [n, D] tile of K or V starting at `src` with row stride `stride`, as Acc: a map of the caller's memory when
/// the storage type is Acc, else widened into `buf`.
template <typename Acc, typename KVScalar>
ConstTile<Acc> load_tile(const KVScalar* src, Index stride, Index n, Index head_dim, RowMatrix<Acc>& buf) {
  if constexpr (std::is_same_v<KVScalar, Acc>) {
    return ConstTile<Acc>(src, n, head_dim, Eigen::OuterStride<>(stride));
  } else {
    for (Index r = 0; r < n; ++r)
      buf.row(r) = Eigen::Map<const Eigen::Matrix<KVScalar, 1, Eigen::Dynamic>>(src + r * stride, head_dim)
                       .template cast<Acc>();
    return ConstTile<Acc>(buf.data(), n, head_dim, Eigen::OuterStride<>(buf.cols()));
  }
}

/// Partial results of key splits, merged after all items ran.
template <typename Acc>
struct SplitPartials {
  std::vector<Acc> out;  // [items, rows_max, D]
  std::vector<Acc> max;  // [items, rows_max]
  std::vector<Acc> sum;  // [items, rows_max]
};

/// Writes row r of a finished (m, l, O) to the output tensor and the optional log-sum-exp.
template <typename P, typename Acc, typename RowExpr>
inline void store_row(const P& p, Index b, Index i, Index h, Acc m, Acc l, const RowExpr& o_row) {
  using Scalar = typename P::Scalar;
  Scalar* dst = p.o + b * p.o_stride_b + i * p.o_stride_s + h * p.o_stride_h;
  Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> out(dst, p.head_dim);
  if (l > Acc(0)) {
    out = (o_row * (Acc(1) / l)).template cast<Scalar>();
  } else {
    out.setZero();
  }
  if (p.lse)
    p.lse[(b * p.heads + h) * p.q_len + i] =
        l > Acc(0) ? float(m + std::log(l)) : -std::numeric_limits<float>::infinity();
}

/// Where one work item sits: sequence b, KV head g, queries [q0, q0 + nq), rows = nq * H/G.
struct ItemCoords {
  Index b, g, q0, nq, rows, len;
};

/// Turns the score tile S^T [n, rows] (keys kb .. kb+n-1) into probabilities and updates the running max, sum and
/// output scale of every row: soft-cap, bias, masks, then the online softmax of gqa/options.hpp.
///
/// The reductions run on the flat buffer viewed as [n_pad * rows / P, P] with P = lcm(rows, lanes): every view row
/// holds whole groups of `rows` scores, so column maxima, the shift, exp and column sums are contiguous packet loops
/// whatever the group size (a [n, 2] block would otherwise be reduced 2 scalars at a time), and exp and the sum
/// share one pass. The tile is padded with -inf keys to n_pad, a multiple of 64; they contribute exact zeros.
template <typename P, typename Acc>
void softmax_tile(const P& p, const ItemCoords& c, Index kb, Index n, bool masked, Workspace<Acc>& ws) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Index rows = c.rows, gs = p.group_size;
  Eigen::Map<RowMatrix<Acc>> s(ws.scores.data(), n, rows);

  if (p.softcap > 0) {
    const Acc cap = Acc(p.softcap), inv_cap = Acc(1) / cap;
    auto flat = Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>(ws.scores.data(), n * rows);
    flat = cap * (flat * inv_cap).tanh();
  }
  if (p.bias) {
    for (Index r = 0; r < rows; ++r) {
      const Index i = c.q0 + r / gs, h = c.g * gs + r % gs;
      const float* bias = p.bias + c.b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_q + kb;
      s.col(r) += Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, 1>>(bias, n).template cast<Acc>();
    }
  }
  if (masked) {
    for (Index qi = 0; qi < c.nq; ++qi) {
      Index klo, khi;
      visible_keys(p, c.q0 + qi, c.len, klo, khi);
      const Index lo = std::clamp<Index>(klo - kb, 0, n), hi = std::clamp<Index>(khi - kb, lo, n);
      auto cols = s.middleCols(qi * gs, gs);
      cols.topRows(lo).setConstant(kNegInf);
      cols.bottomRows(n - hi).setConstant(kNegInf);
    }
  }

  constexpr Index L = mk::kLanes<Acc>;
  const Index period = std::lcm(rows, L);
  const Index n_pad = (n + 63) / 64 * 64;
  const Index len = n_pad * rows;
  std::fill(ws.scores.data() + n * rows, ws.scores.data() + len, kNegInf);
  Acc* pattern = ws.pattern.data();
  auto m_old = ws.row_max.head(rows).array();
  auto m_new = ws.tile_max.head(rows).array();
  auto shift = ws.shift.head(rows).array();
  auto sum = ws.row_sum.head(rows).array();

  mk::periodic_max(ws.scores.data(), len, period, pattern);
  m_new = m_old;
  for (Index k = 0; k < period; k += rows)
    for (Index r = 0; r < rows; ++r) m_new[r] = std::max(m_new[r], pattern[k + r]);
  // Rows that have seen no visible key yet keep -inf and subtract 0, so exp gives exact zeros.
  shift = (m_new > kNegInf).select(m_new, Acc(0));
  ws.correction.head(rows).array() = m_old - shift;
  mk::exp_nonpositive(ws.correction.data(), rows);  // m_old <= m_new; exactly 0 when m_old = -inf
  Acc* shift_pattern = pattern + period;
  for (Index k = 0; k < period; k += rows) std::copy_n(ws.shift.data(), rows, shift_pattern + k);
  mk::periodic_exp_sum(ws.scores.data(), len, shift_pattern, period, pattern);
  sum *= ws.correction.head(rows).array();
  for (Index k = 0; k < period; k += rows)
    sum += Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>>(pattern + k, rows);
  m_old = m_new;
  auto out = ws.out.topRows(rows);
  for (Index r = 0; r < rows; ++r)
    if (ws.correction[r] != Acc(1)) out.row(r) *= ws.correction[r];
}

/// Runs one work item: queries [q0, q0+nq) of heads g*gs .. g*gs+gs-1 of sequence b, against keys of split `split`.
template <typename P, typename Acc>
void run_item(const P& p, const TilePlan& t, Index b, Index g, Index qt, Index split, Workspace<Acc>& ws,
              SplitPartials<Acc>* partials, Index item_id) {
  const Index gs = p.group_size, D = p.head_dim;
  ItemCoords c;
  c.b = b, c.g = g, c.q0 = qt * t.q_tile, c.nq = std::min(t.q_tile, p.q_len - c.q0), c.rows = c.nq * gs;
  c.len = p.keys_of(b);
  const Index rows = c.rows;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

  // Keys any row of the tile can see, and the sub-range every row sees (no per-element mask there).
  Index lo_first, hi_first, lo_last, hi_last;
  visible_keys(p, c.q0, c.len, lo_first, hi_first);
  visible_keys(p, c.q0 + c.nq - 1, c.len, lo_last, hi_last);
  const Index k_begin_all = lo_first, k_end_all = std::max(hi_last, k_begin_all);
  const Index unmasked_lo = lo_last, unmasked_hi = hi_first;

  Index k_begin = k_begin_all, k_end = k_end_all;
  if (t.splits > 1) {
    const Index span_len = k_end_all - k_begin_all;
    Index chunk = (span_len + t.splits - 1) / t.splits;
    chunk = (chunk + t.k_tile - 1) / t.k_tile * t.k_tile;
    k_begin = std::min(k_end_all, k_begin_all + split * chunk);
    k_end = std::min(k_end_all, k_begin + chunk);
  }

  // Stack the group's queries as rows r = (i - q0) * gs + hh, scaled once here instead of per logit.
  const Acc scale = Acc(p.scale);
  for (Index r = 0; r < rows; ++r) {
    const Index i = c.q0 + r / gs, h = g * gs + r % gs;
    const auto* src = p.q + b * p.q_stride_b + i * p.q_stride_s + h * p.q_stride_h;
    ws.qg.row(r) =
        Eigen::Map<const Eigen::Matrix<typename P::Scalar, 1, Eigen::Dynamic>>(src, D).template cast<Acc>() * scale;
  }
  if (t.small && mk::uses_outer_form<Acc, typename P::KVScalar>(rows)) {
    ws.q_small.setZero();
    ws.q_small.leftCols(rows) = ws.qg.topRows(rows).transpose();
  } else if (t.small) {
    mk::pack_rows(ws.qg.data(), rows, D, std::min<Index>(rows, mk::kLanes<Acc>), ws.q_small.data());
  }
  auto out = ws.out.topRows(rows);
  out.setZero();
  ws.row_max.head(rows).setConstant(kNegInf);
  ws.row_sum.head(rows).setZero();

  const auto* k_head = p.k + b * p.k_stride_b + g * p.k_stride_h;
  const auto* v_head = p.v + b * p.v_stride_b + g * p.v_stride_h;

  for (Index kb = k_begin; kb < k_end; kb += t.k_tile) {
    const Index n = std::min(t.k_tile, k_end - kb);
    const auto* k_rows = k_head + kb * p.k_stride_s;
    const auto* v_rows = v_head + kb * p.v_stride_s;
    const Index avail = k_end - kb;  // rows the micro-kernels may prefetch from k_rows / v_rows
    Eigen::Map<RowMatrix<Acc>> s(ws.scores.data(), n, rows);
    if (t.small) {
      // Single-pass forms prefetch the K rows kPrefetchRows ahead, a share per key.
      auto k_prefetch = mk::LinePrefetcher<typename P::KVScalar>::ahead(k_rows, p.k_stride_s, n, avail, D);
      const Index per_key = k_prefetch.per_step(n);
      mk::dispatch_rows<Acc>(rows, [&](auto m_const) {
        constexpr int M = decltype(m_const)::value;
        constexpr int L = mk::kLanes<Acc>;
        if constexpr (M > 0) {
          if constexpr (L % M == 0)
            mk::scores_dot_packed<M>(ws.q_small.data(), k_rows, p.k_stride_s, n, D, s.data(), M, k_prefetch,
                                     per_key);
          else
            mk::scores_dot<M>(ws.q_small.data(), k_rows, p.k_stride_s, n, D, s.data(), rows, k_prefetch, per_key);
        } else if (!mk::uses_outer_form<Acc, typename P::KVScalar>(rows)) {
          // Whole packets of rows in the dot form, one packet at a time, in chunks of keys that stay in L1 for all
          // the packets; each chunk prefetches the next over all of them (16 rows ahead over all the packets of a
          // tile fell behind the first packet's reads: 2 packets ~20% slower from DRAM).
          constexpr int NB = -M;
          constexpr Index ld = NB * L, kChunk = 16;
          for (Index j0 = 0; j0 < n; j0 += kChunk) {
            const Index nn = std::min(kChunk, n - j0);
            const auto* k_chunk = k_rows + j0 * p.k_stride_s;
            auto chunk_prefetch = mk::LinePrefetcher<typename P::KVScalar>::ahead(
                k_chunk, p.k_stride_s, nn, avail - j0, D, std::max(kChunk, mk::kPrefetchRows));
            const Index chunk_per_key = chunk_prefetch.per_step(NB * nn);
            for (int c = 0; c < NB; ++c)
              mk::scores_dot_packed<L>(ws.q_small.data() + c * L * D, k_chunk, p.k_stride_s, nn, D,
                                       s.data() + j0 * ld + c * L, ld, chunk_prefetch, chunk_per_key);
          }
        } else {
          // Outer form: NB packets of rows at once, keys in chunks that are whole register blocks (KB = 3, 4, 6
          // or 8 keys), written straight into S^T when the rows are whole packets, else into a padded row stride
          // and compacted.
          constexpr int NB = -M;
          constexpr Index ld = NB * L, kChunk = 24;
          EIGEN_ALIGN_MAX Acc tmp[kChunk * mk::kMaxRows<Acc>];
          for (Index j0 = 0; j0 < n; j0 += kChunk) {
            const Index nn = std::min(kChunk, n - j0);
            Acc* dst = ld == rows ? s.data() + j0 * ld : tmp;
            mk::scores_outer<NB>(ws.q_small.data(), ws.q_small.cols(), k_rows + j0 * p.k_stride_s, p.k_stride_s, nn,
                                 D, dst, ld, k_prefetch, per_key);
            if (ld != rows)
              for (Index j = 0; j < nn; ++j) std::copy_n(tmp + j * ld, rows, s.data() + (j0 + j) * rows);
          }
        }
      });
    } else {
      auto k_tile = load_tile<Acc>(k_rows, p.k_stride_s, n, D, ws.k_buf);
      s.noalias() = k_tile * ws.qg.topRows(rows).transpose();
    }

    const bool masked = kb < unmasked_lo || kb + n > unmasked_hi;
    softmax_tile(p, c, kb, n, masked, ws);

    if (t.small) {
      mk::accumulate_pv(s.data(), rows, v_rows, p.v_stride_s, n, rows, D, out.data(), D, avail);
    } else {
      auto v_tile = load_tile<Acc>(v_rows, p.v_stride_s, n, D, ws.v_buf);
      out.noalias() += s.transpose() * v_tile;
    }
  }

  if (partials) {
    Acc* po = partials->out.data() + item_id * t.rows_max * D;
    Eigen::Map<RowMatrix<Acc>>(po, rows, D) = out;
    std::copy_n(ws.row_max.data(), rows, partials->max.data() + item_id * t.rows_max);
    std::copy_n(ws.row_sum.data(), rows, partials->sum.data() + item_id * t.rows_max);
    return;
  }
  for (Index r = 0; r < rows; ++r)
    store_row(p, b, c.q0 + r / gs, g * gs + r % gs, ws.row_max[r], ws.row_sum[r], out.row(r));
}

/// Merges the key splits of item group (b, g, qt) with log-sum-exp weights and writes the output.
template <typename P, typename Acc>
void merge_splits(const P& p, const TilePlan& t, Index b, Index g, Index qt, const SplitPartials<Acc>& parts,
                  RowVector<Acc>& acc) {
  const Index gs = p.group_size, D = p.head_dim;
  const Index q0 = qt * t.q_tile, nq = std::min(t.q_tile, p.q_len - q0), rows = nq * gs;
  const Index first = ((b * p.kv_heads + g) * t.q_tiles + qt) * t.splits;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  for (Index r = 0; r < rows; ++r) {
    Acc m = kNegInf;
    for (Index s = 0; s < t.splits; ++s) m = std::max(m, parts.max[(first + s) * t.rows_max + r]);
    acc.setZero();
    Acc l = 0;
    if (m > kNegInf) {
      for (Index s = 0; s < t.splits; ++s) {
        const Index slot = (first + s) * t.rows_max + r;
        const Acc ls = parts.sum[slot];
        if (!(ls > Acc(0))) continue;
        const Acc w = std::exp(parts.max[slot] - m);
        l += w * ls;
        acc += w * Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>>(parts.out.data() + slot * D, D);
      }
    }
    store_row(p, b, q0 + r / gs, g * gs + r % gs, m, l, acc);
  }
}

/// Runs attention for validated params. Threads: OpenMP over work items, dynamic schedule with the most expensive
/// (latest, for causal masks) query tiles handed out first.
template <typename P>
void flash_attention(const P& p) {
  using Acc = typename P::Acc;
  if (p.batch == 0 || p.q_len == 0) return;
  const TilePlan t = plan_tiles(p);
  const Index per_qt = p.batch * p.kv_heads * t.splits;
  const Index items = per_qt * t.q_tiles;
  const bool widen = !std::is_same_v<typename P::KVScalar, Acc>;

  SplitPartials<Acc> partials;
  if (t.splits > 1) {
    partials.out.resize(size_t(items * t.rows_max * p.head_dim));
    partials.max.resize(size_t(items * t.rows_max));
    partials.sum.resize(size_t(items * t.rows_max));
  }
  SplitPartials<Acc>* parts = t.splits > 1 ? &partials : nullptr;
  const int threads = int(std::min<Index>(resolve_threads(p.num_threads), items));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef _OPENMP
    omp_set_num_threads(1);  // Eigen's GEMM inside an item must not start threads of its own
#endif
    Workspace<Acc> ws(t, p.head_dim, widen);
#pragma omp for schedule(dynamic, 1)
    for (Index item = 0; item < items; ++item) {
      const Index qt = t.q_tiles - 1 - item / per_qt;
      Index rest = item % per_qt;
      const Index split = rest % t.splits;
      rest /= t.splits;
      const Index g = rest % p.kv_heads, b = rest / p.kv_heads;
      const Index item_id = ((b * p.kv_heads + g) * t.q_tiles + qt) * t.splits + split;
      run_item(p, t, b, g, qt, split, ws, parts, item_id);
    }
    if (parts) {
      RowVector<Acc> acc(p.head_dim);
#pragma omp for schedule(static)
      for (Index j = 0; j < p.batch * p.kv_heads * t.q_tiles; ++j) {
        const Index qt = j % t.q_tiles, bg = j / t.q_tiles;
        merge_splits(p, t, bg / p.kv_heads, bg % p.kv_heads, qt, partials, acc);
      }
    }
  }
}

}  // namespace detail
}  // namespace gqa
