// gqa/detail/int8_scores.hpp — decode scores against an int8 K as integer dot products: the query rows quantised
// to int8 (one scale per row), each key row read as stored, one byte per element, straight into the multiply.
//
// The float path (microkernels.hpp) widens every int8 K element to float before its FMA: a sign extension and a
// conversion per 16 elements on AVX-512, so int8 K costs more instructions per byte than bf16 and decode is no
// longer bound by memory. Here q . k is an exact int32 sum of int8 products, converted to float exactly while the
// sum the instructions form is below 2^24 (VNNI: at most 255 * 127 * D, so D <= 512), times the row's query scale; the caller applies the keys'
// scales to the scores as before (scale_tile_rows). The only new rounding is the query's: q_r ~= q8_r * qscale_r with
// qscale_r = max_d |q_r[d]| / 127 and q8 = round-to-nearest-even(q / qscale) (quantize_query_row, which the tests
// use to build their reference). A row that is not finite gets qscale NaN: its scores are NaN, as float's would be.
//
// Instructions: AVX-512 VNNI vpdpbusd (u8 x s8, 64 bytes a step; K is made unsigned by flipping its sign bit, and
// 128 * sum(q8_r) is taken back); else AVX2 vpmaddubsw + vpmaddwd (32 bytes; |k| times q8 with k's sign, so the
// 16-bit pair sums cannot saturate: 2 * 128 * 127 < 2^15). Query rows of a KV head: up to one packet of sums (16
// with VNNI, 8 under AVX2), padded with zero rows to a count M that divides it (3 -> 4, 5..7 -> 8, 9..15 -> 16):
// KB = lanes / M keys at a time, their lanes sums reduced together into one packet (the transposed tree of the
// float kernels). More rows, and D not a multiple of the step, keep the float path (int8_dot_rows).
#pragma once

#include "gqa/detail/internal_header_check.hpp"
#include "gqa/detail/warnings.hpp"

#include "gqa/detail/microkernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

GQA_DETAIL_WARNINGS_OFF
namespace gqa {
namespace detail {
namespace mk {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(EIGEN_VECTORIZE_AVX512)
#define GQA_DETAIL_I8_VNNI 1
inline constexpr int kI8Lanes = 16, kI8Step = 64;  // int32 sums per packet, key bytes per step
inline constexpr bool kI8UnsignedKeys = true;      // K's sign bit flipped; offset = 128 * sum(q8)
#elif defined(__AVX2__)
inline constexpr int kI8Lanes = 8, kI8Step = 32;
inline constexpr bool kI8UnsignedKeys = false;
#else
inline constexpr int kI8Lanes = 0, kI8Step = 0;  // no integer path
inline constexpr bool kI8UnsignedKeys = false;
#endif

/// Whether decode scores of `rows` query rows against int8 keys of D columns take the integer path.
constexpr bool int8_dot_rows(Index rows, Index D) {
  return kI8Lanes > 0 && rows >= 1 && rows <= kI8Lanes && D % kI8Step == 0;
}

/// The row count the kernels run for `rows` (int8_dot_rows): the least divisor of the packet of sums >= rows.
constexpr Index int8_padded_rows(Index rows) {
  Index m = 1;
  while (m < rows) m *= 2;
  return m;
}

/// q8[0, D) = q[0, D) / scale rounded to nearest even, scale = max |q| / 127 (returned; 0 for a zero row, NaN for
/// a row that is not finite, whose q8 are then 0).
inline float quantize_query_row(const float* q, Index D, std::int8_t* q8) {
  float max = 0;
  bool finite = true;
  for (Index d = 0; d < D; ++d) {
    finite = finite && std::isfinite(q[d]);
    max = std::max(max, std::fabs(q[d]));
  }
  if (!finite || max == 0) {
    std::fill_n(q8, D, std::int8_t(0));
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = 127.0f / max;
  for (Index d = 0; d < D; ++d) q8[d] = std::int8_t(std::nearbyint(std::min(127.0f, std::fabs(q[d]) * inv)) *
                                                    (q[d] < 0 ? -1 : 1));
  return max / 127.0f;
}

/// Queries as the integer kernels read them: `rows` rows of D int8 values, their scales, and (VNNI) 128 times
/// each row's sum, the term the unsigned keys add.
struct QuantizedQueries {
  const std::int8_t* q8 = nullptr;  // [rows, D]
  const float* scale = nullptr;     // [rows]
  const float* offset = nullptr;    // [rows]: 128 * sum_d q8[r][d] (VNNI), else 0
};

/// Quantises q [rows, D] (row stride D) into q8 [rows, D], scale and offset [rows], and zero rows after them up to
/// int8_padded_rows(rows) (q8, scale and offset that long).
inline void quantize_queries(const float* q, Index rows, Index D, std::int8_t* q8, float* scale, float* offset) {
  const Index padded = int8_padded_rows(rows);
  std::fill(q8 + rows * D, q8 + padded * D, std::int8_t(0));
  std::fill(scale + rows, scale + padded, 0.0f);
  std::fill(offset + rows, offset + padded, 0.0f);
  for (Index r = 0; r < rows; ++r) {
    scale[r] = quantize_query_row(q + r * D, D, q8 + r * D);
    std::int32_t sum = 0;
    for (Index d = 0; d < D; ++d) sum += q8[r * D + d];
    offset[r] = kI8UnsignedKeys ? 128.0f * float(sum) : 0.0f;
  }
}

#if defined(GQA_DETAIL_I8_VNNI)
using I8Sums = __m512i;
/// sums += the 16 four-byte dot products of the key bytes (sign bit flipped: unsigned) and the query bytes.
EIGEN_STRONG_INLINE I8Sums i8_step(I8Sums sums, const std::int8_t* k, const std::int8_t* q) {
  const __m512i ku = _mm512_xor_si512(_mm512_loadu_si512(k), _mm512_set1_epi8(char(0x80)));
  return _mm512_dpbusd_epi32(sums, ku, _mm512_loadu_si512(q));
}
EIGEN_STRONG_INLINE I8Sums i8_zero() { return _mm512_setzero_si512(); }
EIGEN_STRONG_INLINE Packet<float> i8_to_float(I8Sums s) { return _mm512_cvtepi32_ps(s); }
#elif defined(__AVX2__)
using I8Sums = __m256i;
/// sums += the 8 four-byte dot products of the key and query bytes: |k| (unsigned) times q with k's sign, pairs
/// summed in 16 bits (at most 2 * 128 * 127, no saturation), then in 32.
EIGEN_STRONG_INLINE I8Sums i8_step(I8Sums sums, const std::int8_t* k, const std::int8_t* q) {
  const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k));
  const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(kv), _mm256_sign_epi8(qv, kv));
  return _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
EIGEN_STRONG_INLINE I8Sums i8_zero() { return _mm256_setzero_si256(); }
EIGEN_STRONG_INLINE __m256 i8_to_float(I8Sums s) { return _mm256_cvtepi32_ps(s); }
#endif

#if defined(__AVX2__)
/// The float packet of kI8Lanes lanes (the float kernels' packet on AVX-512; 8 lanes under AVX2).
using I8Floats = decltype(i8_to_float(i8_zero()));

/// st [k.count, M] = (q8 . k_row) * scale - offset pattern for the M quantised rows: KB = lanes / M keys at a time.
template <int M>
void scores_i8(const QuantizedQueries& q, const KVRows<std::int8_t>& k, float* st, PrefetchShare<std::int8_t>& pf) {
  constexpr int L = kI8Lanes, KB = L / M;
  static_assert(KB * M == L, "M must divide the packet of sums");
  const Index D = k.cols, n = k.count;
  alignas(64) float scale[L], offset[L];
  for (int i = 0; i < L; ++i) scale[i] = q.scale[i % M], offset[i] = q.offset[i % M];
  const I8Floats scale_v = Eigen::internal::ploadu<I8Floats>(scale), offset_v = Eigen::internal::ploadu<I8Floats>(offset);
  Index j = 0;
  for (; j + KB <= n; j += KB) {
    pf.issue(KB);
    I8Sums acc[L];
    for (int i = 0; i < L; ++i) acc[i] = i8_zero();
    for (Index d = 0; d < D; d += kI8Step)
      for (int a = 0; a < KB; ++a) {
        const std::int8_t* row = k.row(j + a) + d;
        for (int r = 0; r < M; ++r) acc[a * M + r] = i8_step(acc[a * M + r], row, q.q8 + r * D + d);
      }
    I8Floats sums[L];
    for (int i = 0; i < L; ++i) sums[i] = i8_to_float(acc[i]);
    const I8Floats t = predux_transposed(sums);  // lane a * M + r: key j + a, row r
    Eigen::internal::pstoreu(st + j * M, Eigen::internal::pmul(Eigen::internal::psub(t, offset_v), scale_v));
  }
  for (; j < n; ++j)  // the last keys, one at a time
    for (int r = 0; r < M; ++r) {
      I8Sums acc = i8_zero();
      for (Index d = 0; d < D; d += kI8Step) acc = i8_step(acc, k.row(j) + d, q.q8 + r * D + d);
      alignas(64) std::int32_t lanes[L];
      std::memcpy(lanes, &acc, sizeof acc);
      std::int32_t sum = 0;
      for (int i = 0; i < L; ++i) sum += lanes[i];
      st[j * M + r] = (float(sum) - q.offset[r]) * q.scale[r];
    }
}
#endif

/// S^T [k.count, rows] = the scores of `rows` quantised queries (int8_dot_rows(rows, D); q padded by
/// quantize_queries) against int8 keys, before the keys' scales; prefetches the stored rows ahead as the float
/// kernels do. Padded row counts run into a buffer and are compacted, in chunks of keys.
inline void score_tile_i8(const QuantizedQueries& q, Index rows, const KVRows<std::int8_t>& k, float* st) {
#if defined(__AVX2__)
  GQA_ASSERT(int8_dot_rows(rows, k.cols));
  auto pf = PrefetchShare<std::int8_t>::ahead(k, k.count, k.count);
  with_block_size<kI8Lanes>(int8_padded_rows(rows), [&](auto m) {
    constexpr int M = decltype(m)::value;
    if constexpr (kI8Lanes % M == 0) {
      if (M == rows) return scores_i8<M>(q, k, st, pf);
      constexpr Index kChunk = 64;
      alignas(64) float tmp[kChunk * M];
      for (Index j0 = 0; j0 < k.count; j0 += kChunk) {
        const Index n = std::min(kChunk, k.count - j0);
        scores_i8<M>(q, k.rows(j0, n), tmp, pf);
        for (Index j = 0; j < n; ++j) std::copy_n(tmp + j * M, rows, st + (j0 + j) * rows);
      }
    }
  });
#else
  (void)q, (void)rows, (void)k, (void)st;
  GQA_ASSERT(false);
#endif
}

}  // namespace mk
}  // namespace detail
}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
