// gqa/detail/tile_gemm.hpp — register-blocked tile products for prefill (many query rows per KV head), no packing
// of K or V.
//
// Prefill multiplies, per key tile of n keys and an item's R = q_tile * H/G query rows, S^T [n, R] = K Q^T (scores)
// and then O [R, D] += P [R, n] V (add_product, which also serves the backward's dV, dK and dQ). A general GEMM packs both operands of every such call; at the tile shapes of prefill
// (n = R = D = 128) that packing took a quarter of the time (perf, causal S = 4096, H = 32, G = 8, 1 thread, the
// 2-core Xeon of bench/README.md: Eigen's gebp kernel 62%, gemm_pack_lhs/rhs 24%). Here only Q is packed, once per
// item (pack_qt_panels), because it is reused by every key tile; K and V rows are read in place, as the tile
// already sits in L2, and the probabilities are read as the softmax leaves them (S^T, key-major).
//
// Both products are outer-product register blocks: the scores broadcast one K element against packets of Q^T, the
// output broadcasts one probability against packets of a V row. The block sizes fill the vector register file
// (EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS: 24 accumulators with AVX-512's 32 registers, 12 with AVX2's 16); the
// inner loops compile to loads, broadcasts and FMAs only (pinning the operand packets in registers with an empty asm
// made GCC spill the accumulators instead: 115 -> 60 GFLOP/s). Preconditions (plan_tiles in flash_fwd.hpp): Acc is
// float or double, K and V are rows of Acc (16-bit and int8 tiles are widened first), D is a multiple of the packet
// size.
#pragma once

#include "gqa/detail/internal_header_check.hpp"
#include "gqa/detail/warnings.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/detail/microkernels.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>

GQA_DETAIL_WARNINGS_OFF
namespace gqa {
namespace detail {
namespace tile {

using mk::Packet;
using mk::kLanes;

/// Vector registers of the target, as Eigen counts them.
inline constexpr int kRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
/// Score blocks: kScoreKeys keys x kScorePackets packets of Q^T rows; output blocks: kProductRows rows x kProductPackets
/// packets of D. 6 x 4 is 24 accumulators, 4 operand packets and a broadcast in AVX-512's 32 registers; 6 x 2 is
/// 12 + 2 + 1 of AVX2's 16. (AVX2 code on the Xeon, 1 thread, causal S = 4096, G = 8: 4 x 3 and 4 x 2 blocks
/// 53-56 GFLOP/s, 6 x 2 61, Eigen's GEMM 61.)
inline constexpr int kScorePackets = kRegisters >= 32 ? 4 : 2;
inline constexpr int kScoreKeys = 6;
inline constexpr int kProductRows = 6;
inline constexpr int kProductPackets = kRegisters >= 32 ? 4 : 2;

/// Whether flash_fwd's prefill uses these products for accumulators of type Acc: where they measured faster than
/// Eigen's GEMM. AVX-512 (the Xeon of bench/README.md, causal S = 4096, H = 32, G = 8, 1 thread): 97 -> 115-117
/// GFLOP/s. With 16 registers they only matched Eigen (above), so Eigen's GEMM stays there.
template <typename Acc>
inline constexpr bool kUsed = kRegisters >= 32 && (std::is_same_v<Acc, float> || std::is_same_v<Acc, double>);
/// Whether flash_fwd and flash_bwd multiply their tiles here for head_dim D: kUsed, and D whole packets.
template <typename Acc>
constexpr bool used_for(Index head_dim) {
  return kUsed<Acc> && head_dim % kLanes<Acc> == 0;
}

/// Width of one Q^T panel, in rows.
template <typename Acc>
inline constexpr Index kPanelRows = kScorePackets * kLanes<Acc>;

/// Elements of the buffer pack_qt_panels fills for up to `rows` rows.
template <typename Acc>
constexpr Index qt_panels_size(Index rows, Index D) {
  return (rows + kPanelRows<Acc> - 1) / kPanelRows<Acc> * kPanelRows<Acc> * D;
}

/// Writes q [rows, D] (row stride D) as panels of Q^T: panel p holds rows [p * W, p * W + W) (W = kPanelRows,
/// zero-padded) as [D][W], so a score block reads one panel front to back. `out` is aligned as Eigen aligns heap
/// storage (the kernel loads panels aligned).
template <typename Acc>
void pack_qt_panels(const Acc* q, Index rows, Index D, Acc* out) {
  constexpr Index W = kPanelRows<Acc>;
  for (Index p0 = 0; p0 < rows; p0 += W) {
    Acc* panel = out + p0 * D;
    const Index width = std::min(W, rows - p0);
    for (Index d = 0; d < D; ++d) {
      for (Index r = 0; r < width; ++r) panel[d * W + r] = q[(p0 + r) * D + d];
      for (Index r = width; r < W; ++r) panel[d * W + r] = Acc(0);
    }
  }
}

/// st(j, r) = sum_d k(j, d) * panel(d, r) for KB keys from `k` (row stride ks) and the W rows of one panel; writes
/// the first `width` columns of each key's row of S^T (row stride ld).
template <int KB, typename Acc>
EIGEN_ALWAYS_INLINE void score_block(const Acc* panel, const Acc* k, Index ks, Index D, Acc* st, Index ld,
                                     Index width) {
  constexpr int NB = kScorePackets, L = kLanes<Acc>;
  using P = Packet<Acc>;
  P acc[KB][NB];
  for (int a = 0; a < KB; ++a)
    for (int c = 0; c < NB; ++c) acc[a][c] = mk::pset1<P>(Acc(0));
  for (Index d = 0; d < D; ++d) {
    P q[NB];
    for (int c = 0; c < NB; ++c) {
      q[c] = mk::pload<P>(panel + d * NB * L + c * L);
    }
    for (int a = 0; a < KB; ++a) {
      const P b = mk::pset1<P>(k[a * ks + d]);
      for (int c = 0; c < NB; ++c) acc[a][c] = mk::pmadd(b, q[c], acc[a][c]);
    }
  }
  if (width == NB * L) {
    for (int a = 0; a < KB; ++a)
      for (int c = 0; c < NB; ++c) mk::pstoreu(st + a * ld + c * L, acc[a][c]);
  } else {
    EIGEN_ALIGN_MAX Acc tmp[NB * L];
    for (int a = 0; a < KB; ++a) {
      for (int c = 0; c < NB; ++c) mk::pstoreu(tmp + c * L, acc[a][c]);
      std::copy_n(tmp, width, st + a * ld);
    }
  }
}

/// S^T [n, rows] (row stride rows) = K Q^T: K rows [n, D] at k (row stride ks), Q packed by pack_qt_panels.
template <typename Acc>
void scores(const Acc* qt_panels, Index rows, const Acc* k, Index ks, Index n, Index D, Acc* st) {
  constexpr Index W = kPanelRows<Acc>;
  for (Index p0 = 0; p0 < rows; p0 += W) {
    const Acc* panel = qt_panels + p0 * D;
    const Index width = std::min(W, rows - p0);
    Index j = 0;
    for (; j + kScoreKeys <= n; j += kScoreKeys)
      score_block<kScoreKeys>(panel, k + j * ks, ks, D, st + j * rows + p0, rows, width);
    mk::with_block_size<kScoreKeys - 1>(n - j, [&](auto kb) {
      score_block<decltype(kb)::value>(panel, k + j * ks, ks, D, st + j * rows + p0, rows, width);
    });
  }
}

/// A matrix A [rows, inner] that add_product reads one element at a time (each is broadcast): A(r, j) at
/// data[j * ld + r] (ColMajor: the forward's probabilities S^T, key-major) or data[r * ld + j] (RowMajor).
template <typename Acc>
struct ColMajor {
  const Acc* data;
  Index ld;
  EIGEN_ALWAYS_INLINE Acc operator()(Index r, Index j) const { return data[j * ld + r]; }
  ColMajor rows_from(Index r0) const { return {data + r0, ld}; }
};
template <typename Acc>
struct RowMajor {
  const Acc* data;
  Index ld;
  EIGEN_ALWAYS_INLINE Acc operator()(Index r, Index j) const { return data[r * ld + j]; }
  RowMajor rows_from(Index r0) const { return {data + r0 * ld, ld}; }
};

/// out(r, x) += sum_j a(r, j) * b(j, x) for RB rows and NV packets of columns, over `inner` values of j: b rows at
/// b (row stride ldb), out row stride ld_out.
template <int RB, int NV, typename Acc, typename A>
EIGEN_ALWAYS_INLINE void product_block(const A& a, const Acc* b, Index ldb, Index inner, Acc* out, Index ld_out) {
  constexpr int L = kLanes<Acc>;
  using P = Packet<Acc>;
  P acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = mk::pset1<P>(Acc(0));
  for (Index j = 0; j < inner; ++j) {
    P x[NV];
    for (int c = 0; c < NV; ++c) x[c] = mk::ploadu<P>(b + j * ldb + c * L);
    for (int r = 0; r < RB; ++r) {
      const P w = mk::pset1<P>(a(r, j));
      for (int c = 0; c < NV; ++c) acc[r][c] = mk::pmadd(w, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) {
      Acc* dst = out + r * ld_out + c * L;
      mk::pstoreu(dst, mk::padd(mk::ploadu<P>(dst), acc[r][c]));
    }
}

/// Calls f(integral_constant<int, NV>, d0) over the column blocks of D: kProductPackets packets at a time, then the rest
/// one packet at a time.
template <typename Acc, typename F>
EIGEN_ALWAYS_INLINE void for_each_column_block(Index D, F&& f) {
  constexpr Index L = kLanes<Acc>;
  Index d0 = 0;
  for (; d0 + kProductPackets * L <= D; d0 += kProductPackets * L) f(std::integral_constant<int, kProductPackets>{}, d0);
  for (; d0 < D; d0 += L) f(std::integral_constant<int, 1>{}, d0);
}

/// out [rows, D] (row stride ld_out) += A B: A [rows, inner] read through `a` (ColMajor or RowMajor), B rows
/// [inner, D] at b (row stride ldb). The forward's O += P V is a = ColMajor{S^T, rows}, B = the V tile; the backward's
/// dV += P^T dO and dK += dS^T Q read its row-major P and dS as ColMajor, and dQ += dS K reads dS as RowMajor.
template <typename Acc, typename A>
void add_product(const A& a, Index rows, const Acc* b, Index ldb, Index inner, Index D, Acc* out, Index ld_out) {
  for_each_column_block<Acc>(D, [&](auto nv, Index d0) {
    constexpr int NV = decltype(nv)::value;
    Index r0 = 0;
    for (; r0 + kProductRows <= rows; r0 += kProductRows)
      product_block<kProductRows, NV>(a.rows_from(r0), b + d0, ldb, inner, out + r0 * ld_out + d0, ld_out);
    mk::with_block_size<kProductRows - 1>(rows - r0, [&](auto rb) {
      product_block<decltype(rb)::value, NV>(a.rows_from(r0), b + d0, ldb, inner, out + r0 * ld_out + d0, ld_out);
    });
  });
}

}  // namespace tile
}  // namespace detail
}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
