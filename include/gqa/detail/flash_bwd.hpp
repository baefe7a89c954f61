// gqa/detail/flash_bwd.hpp — the flash-style backward kernel behind gqa::attention_backward, and its params.
//
// Gradients of out = softmax(Z) V with Z = cap(scale * Q K^T) + bias (masked entries -inf), per query row i:
//   P = exp(Z - lse_i)                    recomputed tile by tile from the row's log-sum-exp, never stored whole
//   dP = dO V^T,  Delta_i = dO_i . O_i,   dZ = P o (dP - Delta)   (= d_bias),   dS = dZ o cap'(S)
//   dV = P^T dO,  dK = dS^T (scale Q),  dQ = scale * dS K
// ALiBi is a constant term of Z (tile_logits adds it as the forward does); a sink is one more logit of Z with no
// value: lse includes it (recompute_lse folds it in), Delta = dO . O is unchanged, and d_sink = -sum_i P_sink Delta_i.
// Work items are (b, g, query chunk): an item stacks the H/G query heads of KV head g as the rows of its tiles, as
// the forward does, so every product sums over the group at once and dK/dV come out per KV head. Keys are streamed
// in tiles; per (query tile, key tile) block the five products run on L2-resident tiles, so memory is O(tile) plus
// the gradients themselves, never Sq x Sk: S and dP as Eigen GEMMs, dV, dK and dQ as tile_gemm.hpp's add_product
// where the forward uses it (tile::kUsed), which packs nothing (else Eigen GEMMs too).
//
// Determinism without atomics: an item owns dQ of its query rows outright. dK/dV of head (b, g) are accumulated by
// the item that owns the whole query range (chunks = 1: straight into d_k/d_v when they are Acc, else into a
// per-thread Acc buffer), or, when B*G is too small to keep the threads busy, by `chunks` items into partial
// buffers (chunks x 2 x Sk x D per head, capped at kBwdMaxPartialBytes) that are summed afterwards in chunk order.
// The chunk count depends on the shapes only, so every thread count gives bitwise identical results.
//
// Non-finite values (the forward's rule, gqa/options.hpp): masked pairs take no part. P and dS are exact zeros
// outside each row's visible range, under a -inf bias entry (even where lse, Delta or dP is NaN) and in rows with lse
// -inf; with finite K, Q and dO the tile products then add exact zeros for them, and a block holding NaN or inf in
// one of those (all_finite, a vectorised check per block: ~0.1% of its work) takes add_visible_products instead,
// which visits visible pairs only. Measured: bench_backward H = 32, G = 8, D = 128, S = 512, causal, 1 thread,
// before and after interleaved, 16 runs each on the shared 2-core AMD EPYC (load 4-10): CPU-time median 41.31 ms
// before, 41.42 ms after (minimum 37.6 / 38.6 ms), no difference beyond the noise. A NaN lse (a row that a NaN or +inf logit reached, from the forward or recomputed)
// is not "no visible key": its P and dS are NaN, so NaN reaches that row's dQ and the dK/dV of every key it sees, as
// autograd of the naive formula puts it.
//
// Measured (Xeon of bench/README.md, AVX-512), causal S = 2048, H = 32, G = 8, D = 128, 2 threads, 7 runs of
// bench_backward: 2.4-2.7x the forward's time with add_product for dV, dK and dQ (2.5-3.0x with five Eigen GEMMs,
// since the forward's own products got faster), 196-233 GFLOP/s of useful flops (5 products). Earlier, with Eigen
// only: 256-row and 256-key tiles and contiguous (not in-place) dK/dV accumulators measured the same within the
// shared machine's noise.
#pragma once

#include "gqa/detail/internal_header_check.hpp"
#include "gqa/detail/warnings.hpp"

#include "gqa/detail/flash_fwd.hpp"
#include "gqa/detail/masks.hpp"
#include "gqa/detail/params.hpp"
#include "gqa/detail/tile_gemm.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

GQA_DETAIL_WARNINGS_OFF
namespace gqa {
namespace detail {

/// The forward's params (q, k, v, out read only, shapes, options) plus the gradient tensors.
template <typename T, typename KVT>
struct BackwardParams {
  using Fwd = AttentionParams<T, KVT>;
  using Scalar = typename Fwd::Scalar;
  using KVScalar = typename Fwd::KVScalar;
  using Acc = typename Fwd::Acc;

  Fwd fwd;                       // fwd.o is `out`, only read; fwd.lse the forward's lse, or null
  const Scalar* d_o = nullptr;   // [B, Sq, H, D]
  Scalar* d_q = nullptr;         // [B, Sq, H, D]
  KVScalar* d_k = nullptr;       // [B, Sk, G, D] via strides
  KVScalar* d_v = nullptr;       // [B, Sk, G, D] via strides
  float* d_bias = nullptr;       // [B, H, Sq, Sk] contiguous, or null
  float* d_sinks = nullptr;      // [H], or null (needs fwd.sinks)
  Index d_o_stride_b = 0, d_o_stride_s = 0, d_o_stride_h = 0;
  Index d_q_stride_b = 0, d_q_stride_s = 0, d_q_stride_h = 0;
  Index d_k_stride_b = 0, d_k_stride_s = 0, d_k_stride_h = 0;
  Index d_v_stride_b = 0, d_v_stride_s = 0, d_v_stride_h = 0;
  bool use_lse = false;  // read fwd.lse; false: recompute it (always for double, whose P a float lse would limit)
};

/// Validates a backward call: the forward's checks (make_params, with `out` in the role of the output), then the
/// gradient tensors and d_bias. Throws the forward's typed, named errors.
template <typename T, typename KVT>
BackwardParams<T, KVT> make_backward_params(TensorRef<const T> q, TensorRef<const KVT> k, TensorRef<const KVT> v,
                                            TensorRef<const T> out, TensorRef<const T> d_out, TensorRef<T> d_q,
                                            TensorRef<KVT> d_k, TensorRef<KVT> d_v, const AttentionOptions& opt,
                                            span<float> d_bias, span<float> d_sinks = {}) {
  BackwardParams<T, KVT> p;
  // The forward never writes through fwd.o here: it only names `out` in the shape checks.
  p.fwd = make_params<T, KVT>(q, k, v, TensorRef<T>{const_cast<T*>(out.data), out.dims, out.strides}, opt);
  check_ref_basics("d_out", d_out.dims, d_out.strides, d_out.data);
  check_ref_basics("d_q", d_q.dims, d_q.strides, d_q.data);
  check_ref_basics("d_k", d_k.dims, d_k.strides, d_k.data);
  check_ref_basics("d_v", d_v.dims, d_v.strides, d_v.data);
  auto same = [](const char* name, const std::array<Index, 4>& dims, const char* like,
                 const std::array<Index, 4>& want, const char* shape) {
    for (int i = 0; i < 4; ++i)
      require<shape_error>(dims[i] == want[i], "shape", name, ": dim ", i, " = ", dims[i], " but ", like, " dim ", i,
                           " = ", want[i], " (", name, " must have ", like, "'s shape ", shape, ")");
  };
  same("d_out", d_out.dims, "q", q.dims, "[B, Sq, H, D]");
  same("d_q", d_q.dims, "q", q.dims, "[B, Sq, H, D]");
  same("d_k", d_k.dims, "k", k.dims, "[B, Sk, G, D]");
  same("d_v", d_v.dims, "v", v.dims, "[B, Sk, G, D]");

  const Index B = q.dims[0], Sq = q.dims[1], H = q.dims[2], Sk = k.dims[1];
  if (!d_bias.empty() || d_bias.data() != nullptr) {
    require<shape_error>(d_bias.size() == B * H * Sq * Sk, "shape", "d_bias: size = ", d_bias.size(),
                         " but B*H*Sq*Sk = ", B * H * Sq * Sk, " (d_bias is [B, H, Sq, Sk])");
    const auto& bd = opt.bias.dims();
    require(opt.bias.empty() || (bd[0] == B && bd[1] == H), "option", "d_bias: options.bias is broadcast (dims [",
            bd[0], ", ", bd[1], ", ", bd[2], ", ", bd[3], "]) but d_bias needs a bias of [B, H, Sq, Sk] = [", B, ", ",
            H, ", ", Sq, ", ", Sk, "] (or none)");
    p.d_bias = d_bias.data();
  }
  if (!d_sinks.empty() || d_sinks.data() != nullptr) {
    require(p.fwd.sinks != nullptr, "option", "d_sinks: options.sinks is empty, so there is no sink to differentiate");
    require<shape_error>(d_sinks.size() == H, "shape", "d_sinks: size = ", d_sinks.size(), " but H = ", H,
                         " (d_sinks is [H], like options.sinks)");
    p.d_sinks = d_sinks.data();
  }
  p.d_o = d_out.data;
  p.d_q = d_q.data;
  p.d_k = d_k.data;
  p.d_v = d_v.data;
  p.d_o_stride_b = d_out.strides[0], p.d_o_stride_s = d_out.strides[1], p.d_o_stride_h = d_out.strides[2];
  p.d_q_stride_b = d_q.strides[0], p.d_q_stride_s = d_q.strides[1], p.d_q_stride_h = d_q.strides[2];
  p.d_k_stride_b = d_k.strides[0], p.d_k_stride_s = d_k.strides[1], p.d_k_stride_h = d_k.strides[2];
  p.d_v_stride_b = d_v.strides[0], p.d_v_stride_s = d_v.strides[1], p.d_v_stride_h = d_v.strides[2];
  p.use_lse = p.fwd.lse != nullptr && std::is_same_v<typename BackwardParams<T, KVT>::Acc, float>;
  return p;
}

/// Tiles and chunks of one backward call; shapes and cache sizes only, never the thread count.
struct BwdPlan {
  Index q_tile = 1;    // queries per tile (q_tile * H/G stacked rows)
  Index k_tile = 128;  // keys per tile
  Index q_tiles = 1;   // ceil(Sq / q_tile)
  Index rows_max = 1;  // q_tile * H/G
  Index chunks = 1;    // query chunks per (b, g): > 1 only when B*G is small; dK/dV then go through partials
};

/// (b, g) pairs below which the query range is split into chunks, so that a few KV heads still feed the threads.
inline constexpr Index kBwdMinHeads = 8;
/// Cap on the dK/dV partial buffers that chunking needs (2 * chunks * B*G * Sk * D Acc values).
inline constexpr double kBwdMaxPartialBytes = 256.0 * 1024 * 1024;

template <typename P>
BwdPlan plan_backward(const P& p) {
  using Acc = typename P::Acc;
  const auto& f = p.fwd;
  BwdPlan t;
  // Working set of one block: Q, dO, dQ [T, D], K, V, dK, dV rows [T, D], S/P, dP/dS and the soft-cap factor
  // [T, T]: at most 3/4 of L2 (T = 128 at D = 128 is 640 KiB), so the five products of a block run from L2.
  const Index budget = Index(Eigen::l2CacheSize()) * 3 / 4;
  Index tile = 128;
  while (tile > 16 && Index(sizeof(Acc)) * (7 * tile * f.head_dim + 3 * tile * tile) > budget) tile /= 2;
  t.q_tile = std::max<Index>(1, std::min<Index>(f.q_len, tile / f.group_size));
  t.k_tile = tile;
  t.q_tiles = f.q_len == 0 ? 0 : (f.q_len + t.q_tile - 1) / t.q_tile;
  t.rows_max = t.q_tile * f.group_size;
  const Index heads = f.batch * f.kv_heads;
  if (heads > 0 && heads < kBwdMinHeads) {
    t.chunks = std::min<Index>((kBwdMinHeads + heads - 1) / heads, std::max<Index>(1, t.q_tiles));
    const double per_chunk = 2.0 * double(heads) * double(f.k_len) * double(f.head_dim) * sizeof(Acc);
    while (t.chunks > 1 && t.chunks * per_chunk > kBwdMaxPartialBytes) --t.chunks;
  }
  return t;
}

/// Per-thread buffers, allocated once per call.
template <typename Acc>
struct BwdWorkspace {
  RowMatrix<Acc> qs, dos, dq;  // [rows_max, D]: the tile's queries times scale, its dO, its dQ / scale
  RowMatrix<Acc> s, dp, cap;   // [rows_max, k_tile]: S then P; dP then dS; the soft-cap factor 1 - tanh^2
  RowMatrix<Acc> k_buf, v_buf;  // [k_tile, D]: widened 16-bit / mixed-precision K, V tiles
  RowMatrix<Acc> dk, dv;       // [Sk, D]: dK, dV of one head when they cannot accumulate in place
  Eigen::Array<Acc, Eigen::Dynamic, 1> lse, delta;  // [rows_max]
  std::vector<Index> lo, hi;   // [q_tile]: visible key range of each query of the tile
  bool rows_finite = true;     // the tile's queries and dO rows hold no NaN or inf

  BwdWorkspace(const BwdPlan& t, Index k_len, Index head_dim, bool widen, bool private_acc, bool softcap)
      : qs(t.rows_max, head_dim), dos(t.rows_max, head_dim), dq(t.rows_max, head_dim), s(t.rows_max, t.k_tile),
        dp(t.rows_max, t.k_tile), lse(t.rows_max), delta(t.rows_max), lo(size_t(t.q_tile)), hi(size_t(t.q_tile)) {
    if (softcap) cap.resize(t.rows_max, t.k_tile);
    if (widen) {
      k_buf.resize(t.k_tile, head_dim);
      v_buf.resize(t.k_tile, head_dim);
    }
    if (private_acc) {
      dk.resize(k_len, head_dim);
      dv.resize(k_len, head_dim);
    }
  }
};

/// Where one item accumulates dK and dV of its head: rows [0, Sk) of two [Sk, D] matrices, row strides ld_k, ld_v.
template <typename Acc>
struct HeadGrads {
  Acc* dk;
  Index ld_k;
  Acc* dv;
  Index ld_v;
};

/// Calls f with bias row (b, h, i), keys [j0, j0 + n), as an Eigen array of the bias's element type.
template <typename P, typename F>
void visit_bias_row(const P& p, Index b, Index h, Index i, Index j0, Index n, F&& f) {
  const auto& fw = p.fwd;
  const Index at = b * fw.bias_stride_b + h * fw.bias_stride_h + i * fw.bias_stride_q + j0;
  if (fw.bias_float)
    f(Eigen::Map<const Eigen::Array<float, 1, Eigen::Dynamic>>(fw.bias_float + at, n));
  else
    f(Eigen::Map<const Eigen::Array<double, 1, Eigen::Dynamic>>(fw.bias_double + at, n));
}

/// Whether every element is finite: 0 x (NaN or inf) is NaN. A vectorised sum, unlike Eigen's allFinite.
template <typename M>
bool all_finite(const M& m) {
  using Acc = typename M::Scalar;
  return (m.array() * Acc(0)).sum() == Acc(0);
}

/// Logits of block rows [0, rows) x keys [0, n) (S in ws.s, keys kb ..) -> Z: soft-cap (keeping 1 - tanh^2 in
/// ws.cap when `keep_cap`) and bias, on each query's visible keys [lo, hi) only (tile coordinates).
template <typename P, typename Acc>
void tile_logits(const P& p, Index b, Index g, Index q0, Index rows, Index kb, BwdWorkspace<Acc>& ws, bool keep_cap) {
  const auto& f = p.fwd;
  const Index gs = f.group_size;
  for (Index r = 0; r < rows; ++r) {
    const Index qi = r / gs, a = ws.lo[size_t(qi)], e = ws.hi[size_t(qi)];
    if (e <= a) continue;
    auto z = ws.s.row(r).segment(a, e - a).array();
    if (f.softcap > 0) {
      const Acc cap = Acc(f.softcap);
      z = (z * (Acc(1) / cap)).tanh();
      if (keep_cap) ws.cap.row(r).segment(a, e - a).array() = Acc(1) - z.square();
      z *= cap;
    }
    if (f.has_bias())  // a -inf entry masks its key even where the score is NaN (gqa/options.hpp)
      visit_bias_row(p, b, g * gs + r % gs, q0 + qi, kb + a, e - a, [&](const auto& bias) {
        const auto add = bias.template cast<Acc>();
        z = (add == -std::numeric_limits<Acc>::infinity()).select(add, z + add);
      });
    if (f.alibi) {  // the forward's rounding: slope * (exact distance), one add
      const Acc slope = Acc(f.alibi[g * gs + r % gs]);
      const Index first = kb + a - f.position_of(b, q0 + qi);
      for (Index j = 0; j < e - a; ++j) z[j] += slope * (Acc(first) + Acc(j));
    }
  }
}

/// K or V rows [n, D] at `data` (row stride `stride`) in the form the forward's load_tile takes.
template <typename KVScalar>
mk::KVRows<KVScalar> kv_rows(const KVScalar* data, Index stride, Index n, Index D) noexcept {
  return {data, stride, n, D, n};
}

/// Visible key range of each query of the tile, clipped to keys [kb, kb + n) and made tile-relative.
template <typename P, typename Acc>
void clip_ranges(const P& p, Index q0, Index nq, Index len, Index kb, Index n, BwdWorkspace<Acc>& ws) {
  for (Index qi = 0; qi < nq; ++qi) {
    const KeyRange keys = visible_keys(p.fwd, q0 + qi, len);
    const Index lo = keys.lo, hi = keys.hi;
    ws.lo[size_t(qi)] = std::clamp<Index>(lo - kb, 0, n);
    ws.hi[size_t(qi)] = std::clamp<Index>(hi - kb, ws.lo[size_t(qi)], n);
  }
}

/// Log-sum-exp of every row of the tile, recomputed in Acc over keys [k_begin, k_end) (online max and sum).
template <typename P, typename Acc>
void recompute_lse(const P& p, const BwdPlan& t, Index b, Index g, Index q0, Index nq, Index len, Index k_begin,
                   Index k_end, BwdWorkspace<Acc>& ws) {
  const auto& f = p.fwd;
  const Index rows = nq * f.group_size, D = f.head_dim;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Eigen::Array<Acc, Eigen::Dynamic, 1> sum = Eigen::Array<Acc, Eigen::Dynamic, 1>::Zero(rows);
  auto m = ws.lse.head(rows);
  m.setConstant(kNegInf);
  const auto* k_head = f.k + b * f.k_stride_b + g * f.k_stride_h;
  for (Index kb = k_begin; kb < k_end; kb += t.k_tile) {
    const Index n = std::min(t.k_tile, k_end - kb);
    auto k_tile = load_tile<Acc>(kv_rows(k_head + kb * f.k_stride_s, f.k_stride_s, n, D), ws.k_buf);
    ws.s.topLeftCorner(rows, n).noalias() = ws.qs.topRows(rows) * k_tile.transpose();
    clip_ranges(p, q0, nq, len, kb, n, ws);
    tile_logits(p, b, g, q0, rows, kb, ws, false);
    for (Index r = 0; r < rows; ++r) {
      const Index a = ws.lo[size_t(r / f.group_size)], e = ws.hi[size_t(r / f.group_size)];
      if (e <= a) continue;
      auto z = ws.s.row(r).segment(a, e - a).array();
      // NaN (or +inf, through inf - inf) makes the sum NaN for good; a tile of -inf logits adds nothing (its
      // exp(-inf - -inf) would be NaN).
      const Acc z_max = z.template maxCoeff<Eigen::PropagateNaN>();
      if (z_max == kNegInf) continue;
      const Acc m_new = std::isnan(z_max) ? z_max : std::max(m[r], z_max);
      sum[r] = sum[r] * std::exp(m[r] - m_new) + (z - m_new).exp().sum();
      m[r] = m_new;
    }
  }
  for (Index r = 0; r < rows; ++r) m[r] = sum[r] == Acc(0) ? kNegInf : m[r] + std::log(sum[r]);  // NaN stays NaN
  if (f.sinks)  // the forward's lse includes the head's sink
    for (Index r = 0; r < rows; ++r) {
      const Acc sink = Acc(f.sinks[g * f.group_size + r % f.group_size]);
      if (m[r] == kNegInf || sink == kNegInf) {
        m[r] = std::max(m[r], sink);
      } else {
        const Acc top = std::max(m[r], sink);  // NaN (first) stays NaN
        m[r] = top + std::log(std::exp(m[r] - top) + std::exp(sink - top));
      }
    }
}

/// Gathers the tile's stacked rows r = (i - q0) * H/G + hh: Q times scale, dO, Delta = dO . O and the lse.
template <typename P, typename Acc>
void gather_rows(const P& p, Index b, Index g, Index q0, Index rows, BwdWorkspace<Acc>& ws) {
  using Scalar = typename P::Scalar;
  using RowMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;
  const auto& f = p.fwd;
  const Index gs = f.group_size, D = f.head_dim;
  const Acc scale = Acc(f.scale);
  for (Index r = 0; r < rows; ++r) {
    const Index i = q0 + r / gs, h = g * gs + r % gs;
    ws.qs.row(r) = RowMap(f.q + b * f.q_stride_b + i * f.q_stride_s + h * f.q_stride_h, D).template cast<Acc>() * scale;
    ws.dos.row(r) = RowMap(p.d_o + b * p.d_o_stride_b + i * p.d_o_stride_s + h * p.d_o_stride_h, D).template cast<Acc>();
    ws.delta[r] = ws.dos.row(r).dot(
        RowMap(f.o + b * f.o_stride_b + i * f.o_stride_s + h * f.o_stride_h, D).template cast<Acc>());
    if (p.use_lse) ws.lse[r] = Acc(f.lse[(b * f.heads + h) * f.q_len + i]);
  }
  ws.rows_finite = all_finite(ws.qs.topRows(rows)) && all_finite(ws.dos.topRows(rows));
}

/// The three accumulating products of a block over visible pairs only, for blocks with NaN or inf in K, Q or dO:
/// there a masked pair's 0 x NaN would reach a row or key the math keeps it from. Scalar speed (one D-long axpy per
/// pair), for rare blocks.
template <typename P, typename Acc, typename KTile>
void add_visible_products(const P& p, Index b, Index g, Index q0, Index nq, Index kb, const KTile& k_tile,
                          BwdWorkspace<Acc>& ws, const HeadGrads<Acc>& acc) {
  const auto& f = p.fwd;
  const Index gs = f.group_size, D = f.head_dim;
  using Row = Eigen::Map<RowVector<Acc>>;
  for (Index r = 0; r < nq * gs; ++r) {
    const Index qi = r / gs, a = ws.lo[size_t(qi)], e = ws.hi[size_t(qi)];
    if (e <= a || ws.lse[r] == -std::numeric_limits<Acc>::infinity()) continue;
    auto pair = [&](Index j) {
      Row(acc.dv + (kb + j) * acc.ld_v, D) += ws.s(r, j) * ws.dos.row(r);
      Row(acc.dk + (kb + j) * acc.ld_k, D) += ws.dp(r, j) * ws.qs.row(r);
      ws.dq.row(r) += ws.dp(r, j) * k_tile.row(j);
    };
    if (!f.has_bias()) {
      for (Index j = a; j < e; ++j) pair(j);
    } else {
      visit_bias_row(p, b, g * gs + r % gs, q0 + qi, kb + a, e - a, [&](const auto& bias) {
        for (Index j = a; j < e; ++j)
          if (!(bias[j - a] == -std::numeric_limits<double>::infinity())) pair(j);
      });
    }
  }
}

/// One (query tile, key tile) block: P and dS from the recomputed logits, then dV, dK (into `acc`) and dQ (into
/// ws.dq). ws.qs, ws.dos, ws.delta, ws.lse hold the query tile; keys kb .. kb+n-1.
template <typename P, typename Acc>
void backward_block(const P& p, Index b, Index g, Index q0, Index nq, Index len, Index kb, Index n,
                    BwdWorkspace<Acc>& ws, const HeadGrads<Acc>& acc) {
  const auto& f = p.fwd;
  const Index gs = f.group_size, rows = nq * gs, D = f.head_dim;
  using OutMap = Eigen::Map<RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;
  const auto* k_rows = f.k + b * f.k_stride_b + g * f.k_stride_h + kb * f.k_stride_s;
  const auto* v_rows = f.v + b * f.v_stride_b + g * f.v_stride_h + kb * f.v_stride_s;
  auto k_tile = load_tile<Acc>(kv_rows(k_rows, f.k_stride_s, n, D), ws.k_buf);
  auto v_tile = load_tile<Acc>(kv_rows(v_rows, f.v_stride_s, n, D), ws.v_buf);
  auto s = ws.s.topLeftCorner(rows, n);
  auto dp = ws.dp.topLeftCorner(rows, n);
  auto qs = ws.qs.topRows(rows);
  auto dos = ws.dos.topRows(rows);

  s.noalias() = qs * k_tile.transpose();
  dp.noalias() = dos * v_tile.transpose();
  clip_ranges(p, q0, nq, len, kb, n, ws);
  tile_logits(p, b, g, q0, rows, kb, ws, true);
  for (Index r = 0; r < rows; ++r) {
    const Index qi = r / gs, a = ws.lo[size_t(qi)], e = ws.hi[size_t(qi)];
    auto p_row = s.row(r).array();
    auto ds_row = dp.row(r).array();
    const Acc lse = ws.lse[r];  // NaN for a row that a NaN or +inf logit reached: P and dS are NaN then
    if (e <= a || lse == -std::numeric_limits<Acc>::infinity()) {  // no visible key here: P = dS = 0
      p_row.setZero();
      ds_row.setZero();
    } else {
      p_row.head(a).setZero();
      p_row.tail(n - e).setZero();
      ds_row.head(a).setZero();
      ds_row.tail(n - e).setZero();
      auto pv = p_row.segment(a, e - a);
      pv = (pv - lse).exp();
      ds_row.segment(a, e - a) = pv * (ds_row.segment(a, e - a) - ws.delta[r]);
      if (f.has_bias())  // keys under a -inf entry: exact zeros even where lse, Delta or dP is NaN
        visit_bias_row(p, b, g * gs + r % gs, q0 + qi, kb + a, e - a, [&](const auto& bias) {
          using B = typename std::decay_t<decltype(bias)>::Scalar;
          const auto masked = bias == -std::numeric_limits<B>::infinity();
          pv = masked.select(Acc(0), pv);
          ds_row.segment(a, e - a) = masked.select(Acc(0), ds_row.segment(a, e - a));
        });
    }
    if (p.d_bias) {
      const Index h = g * gs + r % gs, i = q0 + qi;
      float* db = p.d_bias + ((b * f.heads + h) * f.q_len + i) * f.k_len + kb;
      Eigen::Map<Eigen::Array<float, 1, Eigen::Dynamic>>(db, n) = ds_row.template cast<float>();
    }
    if (f.softcap > 0 && e > a) ds_row.segment(a, e - a) *= ws.cap.row(r).segment(a, e - a).array();
  }
  // With finite K, Q and dO a masked pair's zero P and dS add exact zeros; otherwise only visible pairs may add.
  if (!ws.rows_finite || !all_finite(k_tile)) return add_visible_products(p, b, g, q0, nq, kb, k_tile, ws, acc);
  if (tile::used_for<Acc>(D)) {  // the forward's prefill products (tile_gemm.hpp)
    const Index ld = ws.s.cols();
    tile::add_product(tile::ColMajor<Acc>{ws.s.data(), ld}, n, ws.dos.data(), D, rows, D, acc.dv + kb * acc.ld_v,
                      acc.ld_v);
    tile::add_product(tile::ColMajor<Acc>{ws.dp.data(), ld}, n, ws.qs.data(), D, rows, D, acc.dk + kb * acc.ld_k,
                      acc.ld_k);
    tile::add_product(tile::RowMajor<Acc>{ws.dp.data(), ld}, rows, k_tile.data(), k_tile.outerStride(), n, D,
                      ws.dq.data(), D);
    return;
  }
  OutMap(acc.dv + kb * acc.ld_v, n, D, Eigen::OuterStride<>(acc.ld_v)).noalias() += s.transpose() * dos;
  OutMap(acc.dk + kb * acc.ld_k, n, D, Eigen::OuterStride<>(acc.ld_k)).noalias() += dp.transpose() * qs;
  ws.dq.topRows(rows).noalias() += dp * k_tile;
}

/// Each row's term of d_sinks: the sink's weight is P_sink = e^(sink - lse) and its dP is 0 (it has no value), so
/// dZ_sink = P_sink (0 - Delta). A row with no visible key (out = 0 whatever the sink) or a -inf sink adds 0.
/// Stored per row ([B, H, Sq]) and summed in a fixed order afterwards, so every thread count gives the same bits.
template <typename P, typename Acc>
void store_sink_terms(const P& p, Index b, Index g, Index q0, Index rows, Index len, const BwdWorkspace<Acc>& ws,
                      Acc* sink_terms) {
  const auto& f = p.fwd;
  for (Index r = 0; r < rows; ++r) {
    const Index i = q0 + r / f.group_size, h = g * f.group_size + r % f.group_size;
    const Acc sink = Acc(f.sinks[h]);
    const bool none = visible_keys(f, i, len).empty() || sink == -std::numeric_limits<Acc>::infinity();
    sink_terms[(b * f.heads + h) * f.q_len + i] = none ? Acc(0) : -std::exp(sink - ws.lse[r]) * ws.delta[r];
  }
}

/// Runs item (b, g, chunk c): the query tiles of the chunk against every key they see; dQ stored per tile, dK/dV
/// accumulated into `acc` (zeroed here over all Sk rows: keys no query sees get exact zeros).
template <typename P, typename Acc>
void backward_item(const P& p, const BwdPlan& t, Index b, Index g, Index c, BwdWorkspace<Acc>& ws,
                   const HeadGrads<Acc>& acc, Acc* sink_terms) {
  using Scalar = typename P::Scalar;
  const auto& f = p.fwd;
  const Index gs = f.group_size, D = f.head_dim, len = f.keys_of(b);
  for (Index j = 0; j < f.k_len; ++j) {
    std::fill_n(acc.dk + j * acc.ld_k, D, Acc(0));
    std::fill_n(acc.dv + j * acc.ld_v, D, Acc(0));
  }
  const Index qt_begin = c * t.q_tiles / t.chunks, qt_end = (c + 1) * t.q_tiles / t.chunks;
  if (p.d_bias) {  // this item's rows of d_bias; visited blocks overwrite their part
    const Index i0 = qt_begin * t.q_tile, i1 = std::min(f.q_len, qt_end * t.q_tile);
    for (Index h = g * gs; h < (g + 1) * gs; ++h)
      std::fill(p.d_bias + ((b * f.heads + h) * f.q_len + i0) * f.k_len,
                p.d_bias + ((b * f.heads + h) * f.q_len + i1) * f.k_len, 0.0f);
  }
  for (Index qt = qt_begin; qt < qt_end; ++qt) {
    const Index q0 = qt * t.q_tile, nq = std::min(t.q_tile, f.q_len - q0), rows = nq * gs;
    const KeyRange tile_keys = tile_keys_any(f, q0, nq, len);
    const Index k_begin = tile_keys.lo, k_end = tile_keys.hi;
    gather_rows(p, b, g, q0, rows, ws);
    if (!p.use_lse) recompute_lse(p, t, b, g, q0, nq, len, k_begin, k_end, ws);
    if (sink_terms) store_sink_terms(p, b, g, q0, rows, len, ws, sink_terms);
    ws.dq.topRows(rows).setZero();
    for (Index kb = k_begin; kb < k_end; kb += t.k_tile)
      backward_block(p, b, g, q0, nq, len, kb, std::min(t.k_tile, k_end - kb), ws, acc);
    const Acc scale = Acc(f.scale);
    for (Index r = 0; r < rows; ++r) {
      const Index i = q0 + r / gs, h = g * gs + r % gs;
      Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(
          p.d_q + b * p.d_q_stride_b + i * p.d_q_stride_s + h * p.d_q_stride_h, D) =
          (ws.dq.row(r) * scale).template cast<Scalar>();
    }
  }
}

/// Writes Acc rows [j0, j1) of a head's dK or dV (row stride ld) to the strided KV-typed gradient.
template <typename KVScalar, typename Acc>
void store_kv_rows(const Acc* src, Index ld, KVScalar* dst, Index dst_stride, Index j0, Index j1, Index D) {
  for (Index j = j0; j < j1; ++j)
    Eigen::Map<Eigen::Matrix<KVScalar, 1, Eigen::Dynamic>>(dst + j * dst_stride, D) =
        Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>>(src + j * ld, D).template cast<KVScalar>();
}

/// Runs the backward for validated params. Threads: OpenMP over (b, g, chunk) items, dynamic schedule with the
/// latest (for causal masks the most expensive) chunks first; then, with chunks > 1, the fixed-order sum of the
/// dK/dV partials.
template <typename P>
void flash_attention_backward(const P& p) {
  using Acc = typename P::Acc;
  using KVScalar = typename P::KVScalar;
  const auto& f = p.fwd;
  if (p.d_sinks) std::fill_n(p.d_sinks, f.heads, 0.0f);
  if (f.batch == 0) return;
  const BwdPlan t = plan_backward(p);
  const Index heads = f.batch * f.kv_heads, items = heads * t.chunks, D = f.head_dim, Sk = f.k_len;
  constexpr bool kv_is_acc = std::is_same_v<KVScalar, Acc>;
  const bool partial = t.chunks > 1, private_acc = !partial && !kv_is_acc;
  std::vector<Acc> parts;
  if (partial) parts.resize(size_t(2 * items * Sk * D));
  std::vector<Acc> sink_terms(p.d_sinks ? size_t(f.batch * f.heads * f.q_len) : 0);
  Acc* sink_rows = p.d_sinks ? sink_terms.data() : nullptr;
  const int threads = int(std::min<Index>(resolve_threads(f.num_threads), std::max<Index>(items, 1)));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef _OPENMP
    omp_set_num_threads(1);  // Eigen's GEMM inside an item must not start threads of its own
#endif
    BwdWorkspace<Acc> ws(t, Sk, D, !kv_is_acc, private_acc, f.softcap > 0);
#pragma omp for schedule(dynamic, 1)
    for (Index item = 0; item < items; ++item) {
      const Index c = t.chunks - 1 - item / heads, bg = item % heads, b = bg / f.kv_heads, g = bg % f.kv_heads;
      HeadGrads<Acc> acc{};
      if (partial) {
        Acc* base = parts.data() + size_t(2 * (bg * t.chunks + c) * Sk * D);
        acc = {base, D, base + Sk * D, D};
      } else if (private_acc) {
        acc = {ws.dk.data(), D, ws.dv.data(), D};
      } else if constexpr (kv_is_acc) {  // the item owns d_k/d_v of (b, g): accumulate in place
        acc = {p.d_k + b * p.d_k_stride_b + g * p.d_k_stride_h, p.d_k_stride_s,
               p.d_v + b * p.d_v_stride_b + g * p.d_v_stride_h, p.d_v_stride_s};
      }
      backward_item(p, t, b, g, c, ws, acc, sink_rows);
      if (private_acc) {
        store_kv_rows(ws.dk.data(), D, p.d_k + b * p.d_k_stride_b + g * p.d_k_stride_h, p.d_k_stride_s, 0, Sk, D);
        store_kv_rows(ws.dv.data(), D, p.d_v + b * p.d_v_stride_b + g * p.d_v_stride_h, p.d_v_stride_s, 0, Sk, D);
      }
    }
    if (partial) {
      RowVector<Acc> sum(D);
#pragma omp for schedule(static)
      for (Index j = 0; j < 2 * heads * Sk; ++j) {
        const Index which = j / (heads * Sk), bg = (j / Sk) % heads, row = j % Sk;
        sum.setZero();
        for (Index c = 0; c < t.chunks; ++c)
          sum += Eigen::Map<const RowVector<Acc>>(parts.data() + size_t((2 * (bg * t.chunks + c) + which) * Sk * D +
                                                                        row * D), D);
        const Index b = bg / f.kv_heads, g = bg % f.kv_heads;
        KVScalar* dst = which == 0 ? p.d_k + b * p.d_k_stride_b + g * p.d_k_stride_h + row * p.d_k_stride_s
                                   : p.d_v + b * p.d_v_stride_b + g * p.d_v_stride_h + row * p.d_v_stride_s;
        Eigen::Map<Eigen::Matrix<KVScalar, 1, Eigen::Dynamic>>(dst, D) = sum.template cast<KVScalar>();
      }
    }
  }
  if (p.d_sinks)
    for (Index h = 0; h < f.heads; ++h) {
      Acc sum = 0;
      for (Index b = 0; b < f.batch; ++b)
        for (Index i = 0; i < f.q_len; ++i) sum += sink_terms[size_t((b * f.heads + h) * f.q_len + i)];
      p.d_sinks[h] = float(sum);
    }
}

}  // namespace detail
}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
