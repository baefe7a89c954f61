// gqa/detail/flash_fwd.hpp — the forward attention kernel behind gqa::attention (flash-style, online softmax).
//
// Work is split into items (b, g, query tile, key split). One item owns the H/G query heads of KV head g for a
// tile of queries: they are stacked as the rows of one matrix Qg [rows = q_tile * H/G, D], so every K/V tile of
// head g is read once and used by all rows of the group (never repeated per query head). Keys are streamed in
// tiles of k_tile rows with the online softmax (running max m, running sum l, unnormalised output O), so memory
// is O(tile), never Sq x Sk. Scores are kept transposed, S^T [keys, rows], so the softmax vectorises across rows.
// Tile products: with few rows (decode, up to 4 SIMD packets) the register-blocked micro-kernels of
// microkernels.hpp read K/V rows in place and widen 16-bit and int8 values in registers (or a chunk at a time into
// L1, where they would widen each value more than once); with many rows (prefill)
// the register-blocked products of tile_gemm.hpp (where tile::kUsed: AVX-512) or Eigen's GEMM run on the caller's
// K/V rows (16-bit, int8 and mixed-precision K/V widened one tile at a time), tile_gemm.hpp packing only the queries.
// int8 K/V (KVCache<std::int8_t>) multiply raw rows; each tile's scores are then scaled by the K rows' scales, and
// its probabilities (after the running sum took them) by the V rows' scales (scale_tile_rows). In decode, where the
// item's rows allow (mk::int8_dot_rows), the queries are quantised to int8 per row and the scores are integer dot
// products with the stored K bytes (int8_scores.hpp). Key tiles
// that no row of an item can see (causal, window, key lengths) are never visited (the mask contract of masks.hpp).
//
// When there are few (b, g, query tile) items (decode: B * G small), the key range is also split
// (flash-decoding): each split keeps its partial (m, l, O), and the splits are merged with log-sum-exp weights.
// The split count depends on the shapes only, never on the thread count, so results are bitwise identical for
// any num_threads.
//
// ALiBi (options.alibi_slopes) is one more additive term on each score tile (add_alibi, after the bias, before the
// masks); sinks (options.sinks) join each row once, when it is written (store_row, after the split merge), so the
// merge of partials stays the plain log-sum-exp merge and every path (micro-kernels, tile products, splits) shares
// both. With neither option the only cost is two null-pointer tests per tile and per row.
//
// Non-finite values (the rule of gqa/options.hpp): a NaN or +inf logit at a visible key makes the row's running
// sum NaN, which no later step can undo, and store_row writes O / l, NaN; a row with no visible key keeps m = -inf
// and l = 0 and is written as zeros. Masked keys never reach a row: their scores become -inf, and in a tile where a
// row may have masked keys its V rows (which other rows see) go through the dense product only if all are finite
// (0 x finite = 0); otherwise that tile's product skips zero weights (accumulate_pv_skipping_zeros).
//
// Figures quoted below were measured on the development machine of the README's performance section (AMD EPYC
// Zen 3, AVX2/FMA, 2.4 GHz, 512 KiB L2 per core, GCC 12, -O3 -march=native).
#pragma once

#include "gqa/detail/internal_header_check.hpp"
#include "gqa/detail/warnings.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/detail/int8_scores.hpp"
#include "gqa/detail/masks.hpp"
#include "gqa/detail/microkernels.hpp"
#include "gqa/detail/params.hpp"
#include "gqa/detail/tile_gemm.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

GQA_DETAIL_WARNINGS_OFF
namespace gqa {
namespace detail {

/// Tile sizes for one call.
///  * Prefill (many rows): T rows per item (T / (H/G) queries of the group) and T keys per tile, with the largest T
///    in {128, 64, 32} whose working set -- Qg and O [T, D], the score block [T, T], one K and one V tile [T, D] --
///    takes at most 3/4 of the L2 cache Eigen detects (512 KiB L2, D = 128: T = 128, 320 KiB), so the tile
///    products run from L2 while each GEMM is still large enough for Eigen's kernel to pay for packing. With
///    tile_gemm.hpp's products (nothing packed but the queries) larger tiles measured no better.
///  * Decode (rows <= 4 packets, D a multiple of the packet size): the micro-kernels read K/V in place, 256 keys
///    per tile (the score tile, at most 32 KiB, stays in L1/L2). The kernels walk a tile in chunks of keys small
///    enough for L1, so a longer tile only amortises the per-tile softmax and output rescaling: against 64 keys,
///    L2-resident, 55 -> 47 cycles per (key, row) at 1 row, 27.5 -> 25.9 at 4, 20.7 -> 20.1 at 8.
/// Tile sizes depend on the machine's cache sizes and the shapes, never on the thread count.
struct TilePlan {
  Index q_tile = 1;        // queries per item
  Index k_tile = 128;      // keys per inner step
  Index splits = 1;        // key-range splits per (b, g, query tile) of the sequence with the most
  std::vector<Index> seq_splits;  // [B]: key-range splits per (b, g, query tile) of sequence b
  std::vector<Index> first_item;  // [B + 1]: the items of sequence b are [first_item[b], first_item[b + 1])
  Index q_tiles = 1;       // ceil(Sq / q_tile)
  Index rows_max = 1;      // q_tile * group_size
  bool small = false;      // decode: the register-blocked micro-kernels instead of Eigen's GEMM
  bool tile_gemm = false;  // prefill: tile_gemm.hpp's products instead of Eigen's GEMM
};

/// Number of (b, g, query-tile[, split]) work items below which the key range is split (flash-decoding). Fixed,
/// not derived from the thread count, so that the reduction order (and the result) never depends on threads.
inline constexpr Index kMinWorkItems = 16;
/// Keys per split are at least this many, so merging partials stays negligible next to streaming K/V.
inline constexpr Index kMinKeysPerSplit = 512;

/// Key-range splits per sequence (flash-decoding), so that about kMinWorkItems items of similar size exist: sequence
/// b, holding len_b of all the batch's keys, gets ceil(kMinWorkItems * len_b / (G * q_tiles * sum of len)) splits,
/// at most len_b / kMinKeysPerSplit and at least 1. Equal lengths give ceil(kMinWorkItems / items) splits when the
/// B * G * q_tiles items are fewer than kMinWorkItems, else none; a long sequence among short ones (a serving batch)
/// is split even when the items are many, so that it does not leave one thread working alone at the end. Depends on
/// the shapes and key lengths only, never on the thread count.
template <typename P>
void plan_splits(const P& p, TilePlan& t) {
  Index total = 0;
  for (Index b = 0; b < p.batch; ++b) total += p.keys_of(b);
  t.seq_splits.assign(size_t(p.batch), 1);
  t.first_item.assign(size_t(p.batch) + 1, 0);
  t.splits = 1;
  const Index per_split = p.kv_heads * t.q_tiles;  // items per split of one sequence
  for (Index b = 0; b < p.batch; ++b) {
    const Index len = p.keys_of(b);
    Index splits = 1;
    if (total > 0 && per_split > 0) {
      const Index want = (kMinWorkItems * len + per_split * total - 1) / (per_split * total);
      splits = std::max<Index>(1, std::min(want, len / kMinKeysPerSplit));
    }
    t.seq_splits[size_t(b)] = splits;
    t.splits = std::max(t.splits, splits);
    t.first_item[size_t(b) + 1] = t.first_item[size_t(b)] + splits * per_split;
  }
}

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
    t.tile_gemm = tile::used_for<Acc>(p.head_dim);
  }
  t.q_tiles = p.q_len == 0 ? 0 : (p.q_len + t.q_tile - 1) / t.q_tile;
  t.rows_max = t.q_tile * p.group_size;
  plan_splits(p, t);
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

template <typename Acc>
using RowMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Acc>
using RowVector = Eigen::Matrix<Acc, 1, Eigen::Dynamic>;

/// Per-thread buffers, allocated once per call and reused by every item the thread runs.
template <typename Acc>
struct Workspace {
  RowMatrix<Acc> qg;        // [rows_max, D]       the group's queries, pre-multiplied by scale
  RowVector<Acc> q_small;   // [D * 4 packets]     qg as the micro-kernels read it (mk::pack_queries)
  RowVector<Acc> q_panels;  // [rows_max + pad, D] qg as tile_gemm.hpp reads it (tile::pack_qt_panels)
  RowMatrix<Acc> out;       // [rows_max, D]       unnormalised output
  RowMatrix<Acc> scores;    // [k_tile rounded up to 64, rows_max] S^T: a row per key, a column per query row
  RowMatrix<Acc> k_buf;     // [k_tile, D]         widened K tile (prefill with 16-bit, int8 or mixed K/V)
  RowMatrix<Acc> v_buf;     // [k_tile, D]
  RowVector<Acc> row_max, row_sum, tile_max, shift, correction;  // [rows_max]
  RowVector<Acc> pattern;   // [2 * rows_max * lanes] column reductions and shifts of the flat score view (2 periods)
  // int8 K, decode: qg quantised for the integer score kernels (int8_scores.hpp), where the item's rows allow it.
  std::vector<std::int8_t> q8;           // [rows_max, D]
  std::vector<float> q8_scale, q8_offset;  // [rows_max]
  bool int8_scores = false;               // this item's scores take the integer kernels

  Workspace(const TilePlan& t, Index head_dim, bool widen)
      : qg(t.rows_max, head_dim), out(t.rows_max, head_dim), scores((t.k_tile + 63) / 64 * 64, t.rows_max),
        row_max(t.rows_max), row_sum(t.rows_max), tile_max(t.rows_max), shift(t.rows_max), correction(t.rows_max),
        pattern(2 * t.rows_max * mk::kLanes<Acc>) {
    if (t.small) {
      q_small.resize(mk::packed_queries_size<Acc>(head_dim));
      const Index rows = t.rows_max + mk::kI8Lanes;  // padded rows: up to one packet of int32 sums more
      q8.resize(size_t(rows * head_dim)), q8_scale.resize(size_t(rows)), q8_offset.resize(size_t(rows));
    }
    if (t.tile_gemm) q_panels.resize(tile::qt_panels_size<Acc>(t.rows_max, head_dim));
    if (widen && !t.small) {
      k_buf.resize(t.k_tile, head_dim);
      v_buf.resize(t.k_tile, head_dim);
    }
  }
};

template <typename Acc>
using ConstTile = Eigen::Map<const RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <typename KVScalar>
using KVRowMap = Eigen::Map<const Eigen::Matrix<KVScalar, 1, Eigen::Dynamic>>;

/// K or V rows [n, D] as Acc: a map of the caller's memory when the storage type is Acc, else widened into `buf`.
template <typename Acc, typename KVScalar>
ConstTile<Acc> load_tile(const mk::KVRows<KVScalar>& kv, RowMatrix<Acc>& buf) {
  if constexpr (std::is_same_v<KVScalar, Acc>) {
    return ConstTile<Acc>(kv.data, kv.count, kv.cols, Eigen::OuterStride<>(kv.stride));
  } else {
    for (Index r = 0; r < kv.count; ++r) mk::widen_row(kv.row(r), buf.row(r).data(), kv.cols);
    return ConstTile<Acc>(buf.data(), kv.count, kv.cols, Eigen::OuterStride<>(buf.cols()));
  }
}

/// The rows of `kv` as rows of Acc (load_tile: the caller's rows, or widened into `buf`), for the kernels that read
/// Acc rows; no prefetch past them.
template <typename Acc, typename KVScalar>
mk::KVRows<Acc> acc_rows(const mk::KVRows<KVScalar>& kv, RowMatrix<Acc>& buf) {
  const ConstTile<Acc> tile = load_tile<Acc>(kv, buf);
  return {tile.data(), tile.outerStride(), kv.count, kv.cols, kv.count};
}

/// Partial results of key splits, merged after all items ran.
template <typename Acc>
struct SplitPartials {
  std::vector<Acc> out;  // [items, rows_max, D]
  std::vector<Acc> max;  // [items, rows_max]
  std::vector<Acc> sum;  // [items, rows_max]
};

/// Where one work item sits: sequence b (with len valid keys), KV head g, query tile qt (queries [q0, q0 + nq),
/// stacked as rows = nq * H/G rows r = (i - q0) * H/G + head within the group) and key split `split` of the
/// sequence's `splits`; `slot`: its partial results in SplitPartials (the splits of one (b, g, qt) are adjacent).
struct ItemCoords {
  Index b, g, qt, split, splits, slot, q0, nq, rows, len;
};

template <typename P>
ItemCoords item_coords(const P& p, const TilePlan& t, Index b, Index g, Index qt, Index split) {
  ItemCoords c;
  c.b = b, c.g = g, c.qt = qt, c.split = split;
  c.splits = t.seq_splits[size_t(b)];
  c.slot = t.first_item[size_t(b)] + (g * t.q_tiles + qt) * c.splits + split;
  c.q0 = qt * t.q_tile;
  c.nq = std::min(t.q_tile, p.q_len - c.q0);
  c.rows = c.nq * p.group_size;
  c.len = p.keys_of(b);
  return c;
}

/// The coordinates of work item `item` in the order flash_fwd hands them out: sequence by sequence, and within one
/// the query tiles of a (g, split) together, latest first.
template <typename P>
ItemCoords item_at(const P& p, const TilePlan& t, Index item) {
  const auto next = std::upper_bound(t.first_item.begin(), t.first_item.end(), item);
  const Index b = Index(next - t.first_item.begin()) - 1;
  const Index local = item - t.first_item[size_t(b)], splits = t.seq_splits[size_t(b)];
  const Index qt = t.q_tiles - 1 - local % t.q_tiles, rest = local / t.q_tiles;
  return item_coords(p, t, b, rest / splits, qt, rest % splits);
}

/// The keys of split `split` of `keys` (one of `splits`): whole decode tiles, so splits never share a tile.
inline KeyRange split_keys(const TilePlan& t, const KeyRange& keys, Index split, Index splits) {
  if (splits == 1) return keys;
  Index chunk = (keys.size() + splits - 1) / splits;
  chunk = (chunk + t.k_tile - 1) / t.k_tile * t.k_tile;
  const Index lo = std::min(keys.hi, keys.lo + split * chunk);
  return {lo, std::min(keys.hi, lo + chunk)};
}

/// Writes a finished row (m, l, O) to the output and the optional log-sum-exp: O / l, or zeros and -inf when the row
/// saw no key (l = 0). A NaN l (a NaN or +inf logit) gives a NaN row and a NaN log-sum-exp.
/// With sinks the head's sink joins here, once per row after any split merge: max m' = max(m, sink), sum
/// l' = l e^(m - m') + e^(sink - m'), out = O e^(m - m') / l'; a row with no key gives zeros and lse = sink. A sink
/// of -inf gives m' = m, e^0 = 1 and l' = l exactly: the bits of no sink.
template <typename P, typename Acc, typename RowExpr>
inline void store_row(const P& p, Index b, Index i, Index h, Acc m, Acc l, const RowExpr& o_row) {
  using Scalar = typename P::Scalar;
  Scalar* dst = p.o + b * p.o_stride_b + i * p.o_stride_s + h * p.o_stride_h;
  Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> out(dst, p.head_dim);
  const bool empty = l == Acc(0);
  Acc weight = Acc(1);  // e^(m - m'): 1 without a sink
  if (p.sinks && !empty) {
    const Acc sink = Acc(p.sinks[h]), m_new = std::max(m, sink);  // m is NaN only with l NaN, which stays NaN
    weight = std::exp(m - m_new);
    l = l * weight + std::exp(sink - m_new);
    m = m_new;
  }
  if (empty) {
    out.setZero();
  } else {
    out = (o_row * (weight / l)).template cast<Scalar>();
  }
  if (p.lse) {
    const float none = p.sinks ? p.sinks[h] : -std::numeric_limits<float>::infinity();
    p.lse[(b * p.heads + h) * p.q_len + i] = empty ? none : float(m + std::log(l));
  }
}

/// Stacks the item's queries as the rows of Qg, scaled once here instead of per logit, packs them for the
/// micro-kernels, and resets the running max, sum and output.
template <typename P, typename Acc>
void load_queries(const P& p, const TilePlan& t, const ItemCoords& c, Workspace<Acc>& ws) {
  using Scalar = typename P::Scalar;
  const Index group_size = p.group_size, D = p.head_dim;
  const Acc scale = Acc(p.scale);
  for (Index r = 0; r < c.rows; ++r) {
    const Index i = c.q0 + r / group_size, h = c.g * group_size + r % group_size;
    const Scalar* src = p.q + c.b * p.q_stride_b + i * p.q_stride_s + h * p.q_stride_h;
    ws.qg.row(r) = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(src, D).template cast<Acc>() * scale;
  }
  if (t.small)
    mk::pack_queries<Acc, typename P::KVScalar>(ws.qg.data(), c.rows, D, ws.q_small.data());
  if constexpr (std::is_same_v<typename P::KVScalar, std::int8_t> && std::is_same_v<Acc, float>) {
    ws.int8_scores = t.small && mk::int8_dot_rows(c.rows, D);
    if (ws.int8_scores)
      mk::quantize_queries(ws.qg.data(), c.rows, D, ws.q8.data(), ws.q8_scale.data(), ws.q8_offset.data());
  }
  if (t.tile_gemm) tile::pack_qt_panels(ws.qg.data(), c.rows, D, ws.q_panels.data());
  ws.out.topRows(c.rows).setZero();
  ws.row_max.head(c.rows).setConstant(-std::numeric_limits<Acc>::infinity());
  ws.row_sum.head(c.rows).setZero();
}

/// Multiplies row j of the tile [n, rows] at `tile` by scale[j]: the per-row scale of an int8 K (on the scores) or V
/// (on the probabilities). Packets of the flat tile times the scales each repeated `rows` times (ploaddup /
/// ploadquad) when rows is 1, 2 or 4, a broadcast per key when rows is whole packets, else scalar: a scalar loop
/// (and Eigen's colwise() product, worse) took 9-12% of an int8 GQA-8 decode (perf, H=32, S=16384, 1 thread).
template <typename Acc>
void scale_tile_rows(Acc* tile, Index n, Index rows, const float* scale) {
  using mk::Packet;
  using Eigen::internal::pmul;
  constexpr Index L = mk::kLanes<Acc>;
  Index j = 0;  // keys done
  if constexpr (std::is_same_v<Acc, float> && L >= 4) {
    auto flat = [&](Index per_packet, auto load_scales) {
      for (; j + per_packet <= n; j += per_packet)
        mk::pstoreu(tile + j * rows, pmul(mk::ploadu<Packet<Acc>>(tile + j * rows), load_scales(scale + j)));
    };
    if (rows == 1) flat(L, [](const float* s) { return mk::ploadu<Packet<Acc>>(s); });
    if (rows == 2) flat(L / 2, [](const float* s) { return Eigen::internal::ploaddup<Packet<Acc>>(s); });
    if (rows == 4) flat(L / 4, [](const float* s) { return Eigen::internal::ploadquad<Packet<Acc>>(s); });
    if (rows % L == 0)
      for (; j < n; ++j) {
        const Packet<Acc> s = mk::pset1<Packet<Acc>>(scale[j]);
        for (Index r = 0; r < rows; r += L)
          mk::pstoreu(tile + j * rows + r, pmul(mk::ploadu<Packet<Acc>>(tile + j * rows + r), s));
      }
  }
  for (; j < n; ++j) {
    const Acc s = Acc(scale[j]);
    for (Index r = 0; r < rows; ++r) tile[j * rows + r] *= s;
  }
}

/// S^T [n, rows] = K_tile Qg^T into ws.scores from its row `at` on (times the rows' scales for an int8 K). at > 0:
/// the later runs of a paged tile, decode only.
template <typename Acc, typename KVScalar>
void tile_scores(const TilePlan& t, const ItemCoords& c, const mk::KVRows<KVScalar>& k, Workspace<Acc>& ws,
                 Index at = 0) {
  Acc* st = ws.scores.data() + at * c.rows;
  GQA_ASSERT(at == 0 || t.small);
  if (t.small) {
    if constexpr (std::is_same_v<KVScalar, std::int8_t> && std::is_same_v<Acc, float>) {
      if (ws.int8_scores) {
        mk::score_tile_i8({ws.q8.data(), ws.q8_scale.data(), ws.q8_offset.data()}, c.rows, k, st);
        return scale_tile_rows(st, k.count, c.rows, k.scale);
      }
    }
    mk::score_tile(ws.q_small.data(), c.rows, k, st);
  } else if (t.tile_gemm) {
    const mk::KVRows<Acc> kt = acc_rows(k, ws.k_buf);
    tile::scores(ws.q_panels.data(), c.rows, kt.data, kt.stride, kt.count, kt.cols, ws.scores.data());
  } else {
    Eigen::Map<RowMatrix<Acc>> s(ws.scores.data(), k.count, c.rows);
    s.noalias() = load_tile<Acc>(k, ws.k_buf) * ws.qg.topRows(c.rows).transpose();
  }
  if constexpr (std::is_same_v<KVScalar, std::int8_t>) scale_tile_rows(st, k.count, c.rows, k.scale);
}

/// Adds the bias to the scores of keys kb .. kb+n-1; a -inf entry masks its key (even where the score is NaN).
template <typename P, typename Acc>
void add_bias(const P& p, const ItemCoords& c, Index kb, Eigen::Map<RowMatrix<Acc>>& s) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Index group_size = p.group_size;
  for (Index r = 0; r < c.rows; ++r) {
    const Index i = c.q0 + r / group_size, h = c.g * group_size + r % group_size;
    const Index at = c.b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_q + kb;
    auto add = [&](const auto* bias) {
      using B = std::remove_const_t<std::remove_pointer_t<decltype(bias)>>;
      const auto row_bias = Eigen::Map<const Eigen::Array<B, Eigen::Dynamic, 1>>(bias + at, s.rows()).template cast<Acc>();
      s.col(r).array() = (row_bias == kNegInf).select(kNegInf, s.col(r).array() + row_bias);
    };
    if (p.bias_float)
      add(p.bias_float);
    else
      add(p.bias_double);
  }
}

/// Adds the ALiBi bias slope[h] * (j - p) to the scores of keys j = kb .. kb+n-1 (p: each row's query position).
/// Exact integer distances times the slope, one rounding, so a slope of 0 adds (+-)0 and changes no bit. The flat
/// tile is walked in periods of lcm(rows, lanes) values (as softmax_tile's reductions): per period the bias is
/// slope_pattern * (distance_pattern + keys before it), whole packets whatever the group size (a loop over a group
/// of 4 rows per key ran scalar: +17% on an f32 GQA-8 decode, H = 32, S = 16384, 1 thread).
template <typename P, typename Acc>
void add_alibi(const P& p, const ItemCoords& c, Index kb, Eigen::Map<RowMatrix<Acc>>& s, Workspace<Acc>& ws) {
  using Pattern = Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>;
  const Index group_size = p.group_size, rows = c.rows, n = s.rows();
  const Index period = std::lcm(rows, mk::kLanes<Acc>), keys_per_period = period / rows;
  Pattern slope(ws.pattern.data(), period), distance(ws.pattern.data() + period, period);  // free until the max
  for (Index f = 0; f < period; ++f) {
    const Index r = f % rows;
    slope[f] = Acc(p.alibi[c.g * group_size + r % group_size]);
    distance[f] = Acc(kb + f / rows - p.position_of(c.b, c.q0 + r / group_size));  // j - p of key kb + f / rows
  }
  Acc* st = s.data();
  const Index full = n / keys_per_period;
  for (Index blk = 0; blk < full; ++blk)
    Pattern(st + blk * period, period) += slope * (distance + Acc(blk * keys_per_period));
  const Index done = full * period, rest = n * rows - done;
  if (rest > 0)
    Pattern(st + done, rest) += slope.head(rest) * (distance.head(rest) + Acc(full * keys_per_period));
}

/// Sets the scores of keys kb .. kb+n-1 that a row cannot see (visible_keys) to -inf, checking the mask contract in
/// debug builds: the item visits and skips tiles by it.
template <typename P, typename Acc>
void mask_scores(const P& p, const ItemCoords& c, Index kb, Eigen::Map<RowMatrix<Acc>>& s) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Index n = s.rows(), group_size = p.group_size;
  KeyRange prev = visible_keys(p, c.q0, c.len);
  for (Index qi = 0; qi < c.nq; ++qi) {
    const KeyRange r = visible_keys(p, c.q0 + qi, c.len);
    GQA_ASSERT(follows_mask_contract(prev, r));
    prev = r;
    const Index lo = std::clamp<Index>(r.lo - kb, 0, n), hi = std::clamp<Index>(r.hi - kb, lo, n);
    auto cols = s.middleCols(qi * group_size, group_size);
    cols.topRows(lo).setConstant(kNegInf);
    cols.bottomRows(n - hi).setConstant(kNegInf);
  }
}

/// Turns the score tile S^T [n, rows] (keys kb .. kb+n-1) into probabilities and updates the running max, sum and
/// output scale of every row: soft-cap, bias, masks, then the online softmax of gqa/options.hpp.
///
/// The reductions run on the flat buffer viewed as [n_pad * rows / period, period] with period = lcm(rows, lanes):
/// every view row holds whole groups of `rows` scores, so column maxima, the shift, exp and column sums are
/// contiguous packet loops whatever the group size (a [n, 2] block would otherwise be reduced 2 scalars at a time),
/// and exp and the sum share one pass. The tile is padded with -inf keys to n_pad, a multiple of 64; they
/// contribute exact zeros.
template <typename P, typename Acc>
void softmax_tile(const P& p, const ItemCoords& c, Index kb, Index n, bool masked, Workspace<Acc>& ws) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Index rows = c.rows;
  Eigen::Map<RowMatrix<Acc>> s(ws.scores.data(), n, rows);
  if (p.softcap > 0) {
    const Acc cap = Acc(p.softcap), inv_cap = Acc(1) / cap;
    auto flat = Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>(ws.scores.data(), n * rows);
    flat = cap * (flat * inv_cap).tanh();
  }
  if (p.has_bias()) add_bias(p, c, kb, s);
  if (p.alibi) add_alibi(p, c, kb, s, ws);
  if (masked) mask_scores(p, c, kb, s);

  constexpr Index L = mk::kLanes<Acc>;
  const Index period = std::lcm(rows, L);
  const Index len = (n + 63) / 64 * 64 * rows;
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

/// Whether every element of the rows is finite (int8 always is; half by its exponent bits, not through Eigen's
/// scalar conversion).
template <typename KVScalar>
bool rows_finite(const mk::KVRows<KVScalar>& kv) {
  if constexpr (std::is_same_v<KVScalar, std::int8_t>) {
    return true;
  } else if constexpr (std::is_same_v<KVScalar, half>) {
    for (Index j = 0; j < kv.count; ++j)
      for (Index d = 0; d < kv.cols; ++d)
        if ((mk::half_bits(kv.row(j)[d]) & 0x7c00u) == 0x7c00u) return false;
    return true;
  }
  for (Index j = 0; j < kv.count; ++j)
    if (!KVRowMap<KVScalar>(kv.row(j), kv.cols).array().template cast<compute_t<KVScalar>>().isFinite().all())
      return false;
  return true;
}

/// out.row(r) += sum over keys j of pt(j, r) * v.row(j), skipping zero weights: a masked key's V row, even NaN or
/// inf, never reaches a row that cannot see it. Scalar speed, for the rare tiles that need it (see tile_pv).
template <typename Acc, typename KVScalar>
void accumulate_pv_skipping_zeros(const Acc* pt, Index rows, const mk::KVRows<KVScalar>& v, RowMatrix<Acc>& out) {
  for (Index j = 0; j < v.count; ++j) {
    const auto v_row = KVRowMap<KVScalar>(v.row(j), v.cols).template cast<Acc>();
    for (Index r = 0; r < rows; ++r)
      if (pt[j * rows + r] != Acc(0)) out.row(r) += pt[j * rows + r] * v_row;
  }
}

/// O += probabilities x V_tile, the probabilities from row `at` of the tile on (at > 0: the later runs of a paged
/// tile, decode only). `may_mask`: some row may have a zero weight for a key others see (a masked tile, or a bias);
/// then 0 x NaN = NaN would leak a masked V into that row, so non-finite V takes the skipping product.
template <typename Acc, typename KVScalar>
void tile_pv(const TilePlan& t, const ItemCoords& c, const mk::KVRows<KVScalar>& v, bool may_mask,
             Workspace<Acc>& ws, Index at = 0) {
  const Index rows = c.rows;
  Acc* pt = ws.scores.data() + at * rows;
  GQA_ASSERT(at == 0 || t.small);
  if constexpr (std::is_same_v<KVScalar, std::int8_t>) scale_tile_rows(pt, v.count, rows, v.scale);
  if (may_mask && !rows_finite(v)) return accumulate_pv_skipping_zeros(pt, rows, v, ws.out);
  if (t.small)
    return mk::accumulate_pv(mk::Strided<const Acc>{pt, rows}, rows, v,
                             mk::Strided<Acc>{ws.out.data(), ws.out.cols()});
  if (t.tile_gemm) {
    const mk::KVRows<Acc> vt = acc_rows(v, ws.v_buf);
    return tile::add_product(tile::ColMajor<Acc>{ws.scores.data(), rows}, rows, vt.data, vt.stride, vt.count, vt.cols,
                             ws.out.data(), ws.out.cols());
  }
  Eigen::Map<const RowMatrix<Acc>> s(ws.scores.data(), v.count, rows);
  ws.out.topRows(rows).noalias() += s.transpose() * load_tile<Acc>(v, ws.v_buf);
}

/// Writes a finished item: its rows to the output, or its partial (m, l, O) when the keys are split.
template <typename P, typename Acc>
void finish_item(const P& p, const TilePlan& t, const ItemCoords& c, const Workspace<Acc>& ws,
                 SplitPartials<Acc>* partials) {
  const Index group_size = p.group_size, D = p.head_dim, rows = c.rows;
  if (c.splits > 1) {
    const Index slot = c.slot;
    Eigen::Map<RowMatrix<Acc>>(partials->out.data() + slot * t.rows_max * D, rows, D) = ws.out.topRows(rows);
    std::copy_n(ws.row_max.data(), rows, partials->max.data() + slot * t.rows_max);
    std::copy_n(ws.row_sum.data(), rows, partials->sum.data() + slot * t.rows_max);
    return;
  }
  for (Index r = 0; r < rows; ++r)
    store_row(p, c.b, c.q0 + r / group_size, c.g * group_size + r % group_size, ws.row_max[r], ws.row_sum[r],
              ws.out.row(r));
}

/// The K and V rows of one work item's KV head: strided in place from k_head / v_head, or, for a paged K/V, in its
/// sequence's blocks (the page maps; the int8 scales of key j at k_scale + block * scale_block_stride + j %
/// block_size).
template <typename KVScalar>
struct ItemKV {
  const KVScalar* k_head = nullptr;
  const KVScalar* v_head = nullptr;
  const float* k_scale = nullptr;  // int8 only
  const float* v_scale = nullptr;
  mk::PageMap<KVScalar> k_pages, v_pages;  // paged only
};

template <typename P>
ItemKV<typename P::KVScalar> item_kv(const P& p, const ItemCoords& c) {
  ItemKV<typename P::KVScalar> kv;
  kv.k_head = p.k + c.b * p.k_stride_b + c.g * p.k_stride_h;
  kv.v_head = p.v + c.b * p.v_stride_b + c.g * p.v_stride_h;
  const Index scale_at = c.b * p.scale_stride_b + c.g * p.scale_stride_h;
  kv.k_scale = p.k_scale ? p.k_scale + scale_at : nullptr;
  kv.v_scale = p.v_scale ? p.v_scale + scale_at : nullptr;
  if (p.is_paged()) {
    const std::int32_t* table = p.paged.table + c.b * p.paged.table_stride;
    kv.k_pages = {kv.k_head, table, p.paged.block_size, p.paged.block_stride, p.k_stride_s};
    kv.v_pages = {kv.v_head, table, p.paged.block_size, p.paged.block_stride, p.v_stride_s};
  }
  return kv;
}

/// Prefetches the int8 scales of K and V in `block`. The micro-kernels prefetch the rows they read next, across
/// blocks (LinePrefetcher), but the scales are read by the caller; in a contiguous cache the hardware prefetchers
/// stream them, but a block's scales in a pool handed out in random order were a demand miss every block: int8,
/// G = 8, block 32, 1 thread, paged / contiguous throughput 0.67 -> 0.90 (AMD EPYC Zen 5, bench_paged).
template <typename P>
void prefetch_scales(const P& p, const ItemKV<typename P::KVScalar>& kv, Index block) {
  const Index at = block * p.paged.scale_block_stride;
  for (Index i = 0; i < p.paged.block_size; i += 64 / Index(sizeof(float))) {
    Eigen::internal::prefetch(kv.k_scale + at + i);
    Eigen::internal::prefetch(kv.v_scale + at + i);
  }
}

/// Calls f(at, k, v) for the runs of keys [kb, kb + n) that lie contiguous in memory, `at` being a run's first key
/// within the tile: the whole tile for strided K/V, one run per block or per run of consecutive blocks for a paged
/// K/V (keys up to `hi` may be prefetched, across blocks by the page maps).
template <typename P, typename F>
void for_each_key_run(const P& p, const ItemKV<typename P::KVScalar>& kv, Index kb, Index n, Index hi, F&& f) {
  using Rows = mk::KVRows<typename P::KVScalar>;
  const Index D = p.head_dim;
  if (!p.is_paged()) {
    f(Index(0), Rows{kv.k_head + kb * p.k_stride_s, p.k_stride_s, n, D, hi - kb, kv.k_scale ? kv.k_scale + kb : nullptr},
      Rows{kv.v_head + kb * p.v_stride_s, p.v_stride_s, n, D, hi - kb, kv.v_scale ? kv.v_scale + kb : nullptr});
    return;
  }
  // A run: the keys of one block, and of the blocks after it while the table lists consecutive ids (whose rows
  // follow in the pool: a prompt appended at once), up to the tile's end.
  const Index end = kb + n;
  const mk::PageMap<typename P::KVScalar>& pages = kv.k_pages;
  for (Index j = kb; j < end;) {
    const Index m = pages.run_rows(j, end - j);
    const Index block = pages.table[pages.block_of(j)], r = pages.row_in_block(j);
    if (kv.k_scale && j + m < hi) {  // the next run's first block (of this item), if the run ends at a block's end
      const Index next = pages.block_of(j + m);
      if (next != pages.block_of(j + m - 1)) prefetch_scales(p, kv, pages.table[next]);
    }
    const Index scale_at = block * p.paged.scale_block_stride + r;
    f(j - kb,
      Rows{kv.k_pages.row(j), p.k_stride_s, m, D, hi - j, kv.k_scale ? kv.k_scale + scale_at : nullptr, &kv.k_pages, j},
      Rows{kv.v_pages.row(j), p.v_stride_s, m, D, hi - j, kv.v_scale ? kv.v_scale + scale_at : nullptr, &kv.v_pages, j});
    j += m;
  }
}

/// A key tile of a paged K/V gathered into contiguous rows of the stored type (and its int8 scales), for the tile
/// products of prefill, which take one K and one V matrix: copying n rows costs nothing next to multiplying them by
/// up to 128 query rows, and the products then run exactly as on a contiguous cache.
template <typename KVScalar>
struct GatheredTile {
  std::vector<KVScalar> k, v;    // [k_tile, D]
  std::vector<float> k_scale, v_scale;  // [k_tile], int8 only

  GatheredTile(Index k_tile, Index D) : k(size_t(k_tile * D)), v(size_t(k_tile * D)) {
    if constexpr (std::is_same_v<KVScalar, std::int8_t>) k_scale.resize(size_t(k_tile)), v_scale.resize(size_t(k_tile));
  }

  template <typename P>
  std::pair<mk::KVRows<KVScalar>, mk::KVRows<KVScalar>> gather(const P& p, const ItemKV<KVScalar>& kv, Index kb,
                                                               Index n) {
    const Index D = p.head_dim;
    for_each_key_run(p, kv, kb, n, kb + n, [&](Index at, const auto& kr, const auto& vr) {
      std::copy_n(kr.data, kr.count * D, k.data() + at * D);  // rows of a block are contiguous (stride D)
      std::copy_n(vr.data, vr.count * D, v.data() + at * D);
      if (kr.scale) std::copy_n(kr.scale, kr.count, k_scale.data() + at), std::copy_n(vr.scale, vr.count, v_scale.data() + at);
    });
    const bool scaled = !k_scale.empty();
    return {{k.data(), D, n, D, n, scaled ? k_scale.data() : nullptr}, {v.data(), D, n, D, n, scaled ? v_scale.data() : nullptr}};
  }
};

/// Runs one work item: the item's queries against the keys of its split, one key tile at a time. Tiles wholly
/// inside the keys every query sees (tile_keys_all) need no per-element mask. A paged K/V's tile is multiplied a
/// block at a time by the decode micro-kernels (which read rows in place), or gathered for the prefill products.
template <typename P, typename Acc>
void run_item(const P& p, const TilePlan& t, const ItemCoords& c, Workspace<Acc>& ws, SplitPartials<Acc>* partials,
              GatheredTile<typename P::KVScalar>* gathered) {
  const KeyRange seen_by_all = tile_keys_all(p, c.q0, c.nq, c.len);
  const KeyRange keys = split_keys(t, tile_keys_any(p, c.q0, c.nq, c.len), c.split, c.splits);
  load_queries(p, t, c, ws);
  const auto kv = item_kv(p, c);
  for (Index kb = keys.lo; kb < keys.hi; kb += t.k_tile) {
    const Index n = std::min(t.k_tile, keys.hi - kb);
    const bool masked = kb < seen_by_all.lo || kb + n > seen_by_all.hi, may_mask = masked || p.has_bias();
    if (gathered) {
      const auto [k, v] = gathered->gather(p, kv, kb, n);
      tile_scores(t, c, k, ws);
      softmax_tile(p, c, kb, n, masked, ws);
      tile_pv(t, c, v, may_mask, ws);
      continue;
    }
    for_each_key_run(p, kv, kb, n, keys.hi, [&](Index at, const auto& k, const auto&) { tile_scores(t, c, k, ws, at); });
    softmax_tile(p, c, kb, n, masked, ws);
    for_each_key_run(p, kv, kb, n, keys.hi, [&](Index at, const auto&, const auto& v) {
      tile_pv(t, c, v, may_mask, ws, at);
    });
  }
  finish_item(p, t, c, ws, partials);
}

/// Merges the key splits of item group (b, g, qt) with log-sum-exp weights and writes the output. A NaN partial (a
/// NaN or +inf logit in its keys) makes the row NaN, as one unsplit pass would.
template <typename P, typename Acc>
void merge_splits(const P& p, const TilePlan& t, const ItemCoords& first, const SplitPartials<Acc>& parts,
                  RowVector<Acc>& acc) {
  const Index group_size = p.group_size, D = p.head_dim;
  const Index slot0 = first.slot;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  for (Index r = 0; r < first.rows; ++r) {
    Acc m = kNegInf;
    bool nan = false;
    for (Index sp = 0; sp < first.splits; ++sp) {
      const Index at = (slot0 + sp) * t.rows_max + r;
      m = std::max(m, parts.max[size_t(at)]);
      nan = nan || std::isnan(parts.sum[size_t(at)]);
    }
    acc.setZero();
    Acc l = nan ? std::numeric_limits<Acc>::quiet_NaN() : Acc(0);
    for (Index sp = 0; sp < first.splits && !nan && m > kNegInf; ++sp) {
      const Index at = (slot0 + sp) * t.rows_max + r;
      const Acc ls = parts.sum[size_t(at)];
      if (!(ls > Acc(0))) continue;  // a split with no visible key
      const Acc w = std::exp(parts.max[size_t(at)] - m);
      l += w * ls;
      acc += w * Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>>(parts.out.data() + at * D, D);
    }
    store_row(p, first.b, first.q0 + r / group_size, first.g * group_size + r % group_size, m, l, acc);
  }
}

/// Runs attention for validated params. Threads: OpenMP over work items, dynamic schedule. The items of one (b, g,
/// split) are handed out together, latest query tile first: consecutive items read the same K/V rows while they are
/// still in cache, and the cheapest (earliest, for causal masks) items come last, which keeps the threads balanced.
/// Against handing out every head's latest tile first (Xeon of bench/README.md, causal S = 4096, H = 32, G = 8, 7
/// paired rounds): 1 thread 85 -> 102 GFLOP/s on average (6 of 7 rounds faster), 2 threads 184 -> 195.
template <typename P>
void flash_fwd(const P& p) {
  using Acc = typename P::Acc;
  if (p.batch == 0 || p.q_len == 0) return;
  const TilePlan t = plan_tiles(p);
  const Index items = t.first_item.back();
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
    std::optional<GatheredTile<typename P::KVScalar>> gathered;
    if (p.is_paged() && !t.small) gathered.emplace(t.k_tile, p.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (Index item = 0; item < items; ++item) run_item(p, t, item_at(p, t, item), ws, parts, gathered ? &*gathered : nullptr);
    if (parts) {
      RowVector<Acc> acc(p.head_dim);
#pragma omp for schedule(static)
      for (Index j = 0; j < p.batch * p.kv_heads * t.q_tiles; ++j) {
        const Index qt = j % t.q_tiles, bg = j / t.q_tiles, b = bg / p.kv_heads;
        if (t.seq_splits[size_t(b)] > 1)
          merge_splits(p, t, item_coords(p, t, b, bg % p.kv_heads, qt, 0), partials, acc);
      }
    }
  }
}

}  // namespace detail
}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
