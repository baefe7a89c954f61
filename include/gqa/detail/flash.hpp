// gqa/detail/flash.hpp — the flash-style attention kernel behind gqa::attention.
//
// Work is split into items (b, g, query tile, key split). One item owns the H/G query heads of KV head g for a
// tile of queries: they are stacked as the rows of one matrix Qg [rows = q_tile * H/G, D], so every K/V tile of
// head g is read once and used by all rows of the group (never repeated per query head). Keys are streamed in
// tiles of k_tile rows with the online softmax (running max m, running sum l, unnormalised output O), so memory
// is O(tile), never Sq x Sk. Tile products go through Eigen's GEMM on maps of the caller's memory (float K/V are
// read in place; 16-bit and mixed-precision K/V are widened one tile at a time into a small buffer).
//
// When there are few (b, g, query tile) items (decode: B * G small), the key range is also split
// (flash-decoding): each split keeps its partial (m, l, O), and the splits are merged with log-sum-exp weights.
// The split count depends on the shapes only, never on the thread count, so results are bitwise identical for
// any num_threads.
#pragma once

#include "gqa/detail/assert.hpp"
#include "gqa/detail/params.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gqa {
namespace detail {

/// Tile sizes for one call. Rows per item ~128 and keys per tile 128 keep Qg, O, the score block and one K/V tile
/// (4 x 64 KiB at D = 128, float) inside a 512 KiB-1 MiB L2, while each GEMM is large enough for Eigen's kernel.
struct TilePlan {
  Index q_tile = 1;   // queries per item
  Index k_tile = 128; // keys per inner step
  Index splits = 1;   // key-range splits per (b, g, query tile)
  Index q_tiles = 1;  // ceil(Sq / q_tile)
  Index rows_max = 1; // q_tile * group_size
};

/// Number of (b, g, query-tile[, split]) work items below which the key range is split (flash-decoding). Fixed,
/// not derived from the thread count, so that the reduction order (and the result) never depends on threads.
inline constexpr Index kMinWorkItems = 16;
/// Keys per split are at least this many, so merging partials stays negligible next to streaming K/V.
inline constexpr Index kMinKeysPerSplit = 512;

template <typename P>
TilePlan plan_tiles(const P& p) {
  TilePlan t;
  constexpr Index target_rows = 128;
  t.q_tile = std::max<Index>(1, std::min<Index>(p.q_len, target_rows / p.group_size));
  t.q_tiles = p.q_len == 0 ? 0 : (p.q_len + t.q_tile - 1) / t.q_tile;
  t.rows_max = t.q_tile * p.group_size;
  t.k_tile = 128;
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

/// Per-thread buffers, allocated once per call and reused by every item the thread runs.
template <typename Acc>
struct Workspace {
  RowMatrix<Acc> qg;      // [rows_max, D]   the group's queries, pre-multiplied by scale
  RowMatrix<Acc> out;     // [rows_max, D]   unnormalised output
  RowMatrix<Acc> scores;  // [rows_max, k_tile]
  RowMatrix<Acc> k_buf;   // [k_tile, D]     widened K tile (16-bit or mixed-precision K only)
  RowMatrix<Acc> v_buf;   // [k_tile, D]
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> row_max, row_sum;  // [rows_max]

  Workspace(const TilePlan& t, Index head_dim, bool widen)
      : qg(t.rows_max, head_dim), out(t.rows_max, head_dim), scores(t.rows_max, t.k_tile),
        row_max(t.rows_max), row_sum(t.rows_max) {
    if (widen) {
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

/// Runs one work item: queries [q0, q0+nq) of heads g*gs .. g*gs+gs-1 of sequence b, against keys of split `split`.
template <typename P, typename Acc>
void run_item(const P& p, const TilePlan& t, Index b, Index g, Index qt, Index split, Workspace<Acc>& ws,
              SplitPartials<Acc>* partials, Index item_id) {
  const Index gs = p.group_size, D = p.head_dim;
  const Index q0 = qt * t.q_tile, nq = std::min(t.q_tile, p.q_len - q0), rows = nq * gs;
  const Index len = p.keys_of(b);
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

  // Keys any row of the tile can see, and the sub-range every row sees (no per-element mask there).
  Index lo_first, hi_first, lo_last, hi_last;
  visible_keys(p, q0, len, lo_first, hi_first);
  visible_keys(p, q0 + nq - 1, len, lo_last, hi_last);
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
    const Index i = q0 + r / gs, h = g * gs + r % gs;
    const auto* src = p.q + b * p.q_stride_b + i * p.q_stride_s + h * p.q_stride_h;
    ws.qg.row(r) =
        Eigen::Map<const Eigen::Matrix<typename P::Scalar, 1, Eigen::Dynamic>>(src, D).template cast<Acc>() * scale;
  }
  auto qg = ws.qg.topRows(rows);
  auto out = ws.out.topRows(rows);
  out.setZero();
  ws.row_max.head(rows).setConstant(kNegInf);
  ws.row_sum.head(rows).setZero();

  const auto* k_head = p.k + b * p.k_stride_b + g * p.k_stride_h;
  const auto* v_head = p.v + b * p.v_stride_b + g * p.v_stride_h;
  const Acc cap = Acc(p.softcap), inv_cap = p.softcap > 0 ? Acc(1) / cap : Acc(0);

  for (Index kb = k_begin; kb < k_end; kb += t.k_tile) {
    const Index n = std::min(t.k_tile, k_end - kb);
    auto k_tile = load_tile<Acc>(k_head + kb * p.k_stride_s, p.k_stride_s, n, D, ws.k_buf);
    auto s = ws.scores.topLeftCorner(rows, n);
    s.noalias() = qg * k_tile.transpose();

    const bool masked = kb < unmasked_lo || kb + n > unmasked_hi;
    for (Index r = 0; r < rows; ++r) {
      auto row = s.row(r).array();
      const Index i = q0 + r / gs, h = g * gs + r % gs;
      if (p.softcap > 0) row = cap * (row * inv_cap).tanh();
      if (p.bias) {
        const float* bias = p.bias + b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_q + kb;
        row += Eigen::Map<const Eigen::Array<float, 1, Eigen::Dynamic>>(bias, n).template cast<Acc>();
      }
      Index lo = 0, hi = n;  // visible columns of this row within the tile
      if (masked) {
        Index klo, khi;
        visible_keys(p, i, len, klo, khi);
        lo = std::clamp<Index>(klo - kb, 0, n);
        hi = std::clamp<Index>(khi - kb, lo, n);
      }
      const Acc tile_max = hi > lo ? row.segment(lo, hi - lo).maxCoeff() : kNegInf;
      if (!(tile_max > kNegInf)) {  // nothing visible in this tile (or the bias masks it all)
        row.setZero();
        continue;
      }
      const Acc m_old = ws.row_max[r], m_new = std::max(m_old, tile_max);
      const Acc correction = std::exp(m_old - m_new);  // 0 when m_old = -inf
      auto visible = row.segment(lo, hi - lo);
      visible = (visible - m_new).exp();
      if (p.bias) visible = (visible > Acc(0)).select(visible, Acc(0));  // exact zeros for -inf bias entries
      row.head(lo).setZero();
      row.tail(n - hi).setZero();
      ws.row_sum[r] = ws.row_sum[r] * correction + visible.sum();
      ws.row_max[r] = m_new;
      if (correction != Acc(1)) out.row(r) *= correction;
    }
    auto v_tile = load_tile<Acc>(v_head + kb * p.v_stride_s, p.v_stride_s, n, D, ws.v_buf);
    out.noalias() += s * v_tile;
  }

  if (partials) {
    Acc* po = partials->out.data() + item_id * t.rows_max * D;
    Eigen::Map<RowMatrix<Acc>>(po, rows, D) = out;
    std::copy_n(ws.row_max.data(), rows, partials->max.data() + item_id * t.rows_max);
    std::copy_n(ws.row_sum.data(), rows, partials->sum.data() + item_id * t.rows_max);
    return;
  }
  for (Index r = 0; r < rows; ++r)
    store_row(p, b, q0 + r / gs, g * gs + r % gs, ws.row_max[r], ws.row_sum[r], out.row(r));
}

/// Merges the key splits of item group (b, g, qt) with log-sum-exp weights and writes the output.
template <typename P, typename Acc>
void merge_splits(const P& p, const TilePlan& t, Index b, Index g, Index qt, const SplitPartials<Acc>& parts,
                  Eigen::Matrix<Acc, 1, Eigen::Dynamic>& acc) {
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
      Eigen::Matrix<Acc, 1, Eigen::Dynamic> acc(p.head_dim);
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
