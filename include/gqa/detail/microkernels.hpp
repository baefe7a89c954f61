// gqa/detail/microkernels.hpp — register-blocked products for small row counts (decode), on Eigen's packet layer.
//
// Decode has few query rows per KV head (M = (H/G) * Sq, often 1..32), too few for a packed GEMM to pay for
// packing each K/V tile. These kernels read K and V rows in place from the cache (widening bf16/half/int8 to float
// in registers; int8 scales are applied by the caller, see KVRows), keep every accumulator in registers, and write
// scores transposed, S^T [n keys x M rows], so the softmax that follows vectorises across the group's rows.
// Everything is written with Eigen::internal packets, so it compiles to AVX2, AVX-512, SSE or NEON, whatever Eigen
// targets; the number of rows M is a template parameter (one instantiation per row count, picked by
// with_score_form), which is what lets the accumulators live in registers. The score kernels take a LinePrefetcher for the K rows ahead of the tile and issue a share of its
// lines with every block of keys; accumulate_pv prefetches V the same way (see LinePrefetcher). Preconditions
// (checked by the caller): D is a multiple of the packet size.
//
// Cycle and millisecond figures in the comments below were measured on the development machine where the kernels
// were tuned: AMD EPYC (Zen 3), AVX2/FMA, 2.4 GHz, 512 KiB L2 per core, GCC 12 with -O3 -march=native (see the
// README's performance section). "L2-resident" means K/V tiles small enough to stay in L2.
#pragma once

#include "gqa/detail/internal_header_check.hpp"
#include "gqa/detail/warnings.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/types.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#endif

GQA_DETAIL_WARNINGS_OFF
namespace gqa {
namespace detail {
namespace mk {

using Eigen::internal::padd;
using Eigen::internal::pload;
using Eigen::internal::ploadu;
using Eigen::internal::pmadd;
using Eigen::internal::predux;
using Eigen::internal::pset1;
using Eigen::internal::pstoreu;

template <typename Acc>
using Packet = typename Eigen::internal::packet_traits<Acc>::type;
template <typename Acc>
inline constexpr int kLanes = Eigen::internal::unpacket_traits<Packet<Acc>>::size;
/// Accumulator registers a kernel may use (16 vector registers on AVX2, two left for operands and broadcasts).
inline constexpr int kAccRegisters = 12;

/// Where the rows of one KV head of a paged K or V (gqa::PagedKVCache) lie: key j is row j % block_size of block
/// table[j / block_size], rows `row_stride` elements apart inside a block, blocks `block_stride` apart. The kernels
/// read a run of consecutive blocks' rows at a time (KVRows); their prefetches follow the table into the next runs.
template <typename Src>
struct PageMap {
  const Src* head = nullptr;            // row 0 of this KV head in block 0 of the pool
  const std::int32_t* table = nullptr;  // the sequence's blocks
  Index block_size = 0, block_stride = 0, row_stride = 0;
  int shift = -1;  // log2(block_size) when it is a power of two: a shift and a mask instead of a division

  PageMap() = default;
  PageMap(const Src* head_, const std::int32_t* table_, Index block_size_, Index block_stride_, Index row_stride_)
      : head(head_), table(table_), block_size(block_size_), block_stride(block_stride_), row_stride(row_stride_) {
    if ((block_size & (block_size - 1)) == 0)
      while ((Index(1) << (shift + 1)) <= block_size) ++shift;
  }
  /// The index of key j's block in the table, and its row in the block.
  Index block_of(Index j) const noexcept { return shift >= 0 ? j >> shift : j / block_size; }
  Index row_in_block(Index j) const noexcept { return shift >= 0 ? j & (block_size - 1) : j % block_size; }
  const Src* row(Index j) const noexcept {
    return head + Index(table[block_of(j)]) * block_stride + row_in_block(j) * row_stride;
  }
  /// Rows from key j on (up to `left`, all of which exist) that lie in one run of memory: to the end of j's block
  /// and through the blocks after it while the table lists consecutive ids (rows D apart in a block, blocks
  /// block_size rows apart in the pool, as PagedKVCache lays them out).
  Index run_rows(Index j, Index left) const noexcept {
    Index index = block_of(j), m = std::min(left, block_size - row_in_block(j));
    while (m < left && table[index + 1] == table[index] + 1) m = std::min(left, m + block_size), ++index;
    return m;
  }
};

/// `count` rows of K or V, read in place: row j at data + j * stride, `cols` (D) elements each. `avail` >= count rows
/// from `data` may be read, so prefetches may reach that far (the end of the work item's keys): in memory after
/// `data`, or, where `pages` is set (a paged K/V, the rows inside one block), at the keys first + count .. of the
/// page map. Quantised (int8) K/V carry their per-row scales: row j stands for data[j] * scale[j]. The micro-kernels
/// multiply the raw rows; the caller applies the scales to the scores (K) and the probabilities (V), n multiplies
/// per row instead of n * D.
template <typename Src>
struct KVRows {
  const Src* data = nullptr;
  Index stride = 0;
  Index count = 0;
  Index cols = 0;
  Index avail = 0;
  const float* scale = nullptr;  // [count], int8 rows only
  const PageMap<Src>* pages = nullptr;
  Index first = 0;  // paged: the key index of row 0

  const Src* row(Index j) const noexcept { return data + j * stride; }
  /// Rows [j, j + n).
  KVRows rows(Index j, Index n) const noexcept {
    return {row(j), stride, n, cols, avail - j, scale ? scale + j : nullptr, pages, first + j};
  }
};

/// A row-major matrix of Acc in memory: element (i, c) at data[i * ld + c].
template <typename Acc>
struct Strided {
  Acc* data = nullptr;
  Index ld = 0;

  Acc* row(Index i) const noexcept { return data + i * ld; }
};

// ------------------------------------------------------------------------------ widening and narrowing
//
// IEEE half <-> float. Eigen 3.4 uses F16C only when it detects Clang (its test `!defined(EIGEN_COMP_CLANG) ||
// EIGEN_COMP_CLANG >= 380` is false under GCC, where EIGEN_COMP_CLANG is defined as 0), so under GCC every half it
// converts goes through a scalar bit-twiddling routine, element by element even in "vectorised" casts: f16 decode
// measured 4-5x slower than bf16. gqa therefore converts half itself: F16C / AVX-512 instructions when the target
// has them (vcvtph2ps, vcvtps2ph with round-to-nearest-even), else the portable routines below, which give the same
// bits (NaN payloads included; tests/test_microkernels.cpp compares them over every half and ~10^6 floats).

/// The float value of half bits, exactly (every half is a float); NaN stays NaN with its payload and is made quiet,
/// as vcvtph2ps does.
inline float half_bits_to_float_portable(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant != 0 ? 0x400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: mant * 2^-24, normalised into a float
    exp = 113;
    while (!(mant & 0x400u)) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// The half nearest to f (ties to even), in integer arithmetic only (no dependence on the FPU's rounding mode or
/// flush-to-zero); overflow gives inf, NaN a quiet NaN with the top bits of its payload, as vcvtps2ph does.
inline std::uint16_t float_to_half_bits_portable(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const auto sign = std::uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return std::uint16_t(sign | 0x7e00u | ((x >> 13) & 0x3ffu));  // NaN
  if (x >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520 (and inf): rounds to inf
  if (x >= 0x38800000u) {                                       // a normal half (>= 2^-14)
    const std::uint32_t odd = (x >> 13) & 1u;
    return std::uint16_t(sign | ((x + 0xc8000fffu + odd) >> 13));  // rebias the exponent, round to nearest even
  }
  if (x <= 0x33000000u) return sign;  // <= 2^-25, half the smallest subnormal: rounds to (even) zero
  const std::uint32_t mant = (x & 0x7fffffu) | 0x800000u;
  const int shift = 126 - int(x >> 23);  // 14 .. 24: the subnormal's unit 2^-24 over the float's
  std::uint32_t q = mant >> shift;
  const std::uint32_t rest = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  q += rest > halfway || (rest == halfway && (q & 1u));
  return std::uint16_t(sign | q);
}

inline std::uint16_t half_bits(half h) noexcept { return h.x; }
inline half half_from_bits(std::uint16_t b) noexcept { return Eigen::half_impl::raw_uint16_to_half(b); }

/// Widens one stored value to Acc: half through F16C where the target has it.
template <typename Acc, typename Src>
EIGEN_STRONG_INLINE Acc widen(Src x) noexcept {
  if constexpr (std::is_same_v<Src, half>) {
#ifdef __F16C__
    return Acc(_cvtsh_ss(half_bits(x)));
#else
    return Acc(half_bits_to_float_portable(half_bits(x)));
#endif
  } else {
    return Acc(x);
  }
}

/// The half nearest to f (ties to even): vcvtps2ph where the target has F16C, else float_to_half_bits_portable.
inline half narrow_to_half(float f) noexcept {
#ifdef __F16C__
  return half_from_bits(std::uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#else
  return half_from_bits(float_to_half_bits_portable(f));
#endif
}

/// dst[i] = the half nearest to src[i] (ties to even), 16 or 8 at a time where the target has AVX-512 or F16C.
inline void narrow_to_half(const float* src, half* dst, Index n) noexcept {
  Index i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = narrow_to_half(src[i]);
}

/// One packet of Acc from `kLanes<Acc>` consecutive Src values, widened in registers: half with F16C / AVX-512
/// (Eigen's half packets convert element by element under GCC, see above), int8 with sign extension, bf16 through
/// Eigen's packet cast (a shift); a scalar loop where the target has none of these.
template <typename Acc, typename Src>
EIGEN_STRONG_INLINE Packet<Acc> load(const Src* p) {
  if constexpr (std::is_same_v<Src, Acc>) {
    return ploadu<Packet<Acc>>(p);
  } else if constexpr (std::is_same_v<Src, half> || std::is_same_v<Src, std::int8_t>) {
    constexpr bool is_half = std::is_same_v<Src, half>;
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same_v<Acc, float>) {
      if constexpr (is_half)
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      else
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
#elif defined(EIGEN_VECTORIZE_AVX2) || (defined(EIGEN_VECTORIZE_AVX) && defined(__F16C__))
    if constexpr (std::is_same_v<Acc, float> && is_half) {
#ifdef __F16C__
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
    } else if constexpr (std::is_same_v<Acc, float>) {
#ifdef EIGEN_VECTORIZE_AVX2
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
    }
#endif
    EIGEN_ALIGN_MAX Acc tmp[kLanes<Acc>];
    for (int i = 0; i < kLanes<Acc>; ++i) tmp[i] = widen<Acc>(p[i]);
    return pload<Packet<Acc>>(tmp);
  } else {
    using SrcPacket = typename Eigen::internal::packet_traits<Src>::type;
    if constexpr (Eigen::internal::type_casting_traits<Src, Acc>::VectorizedCast &&
                  Eigen::internal::packet_traits<Src>::size == kLanes<Acc>) {
      return Eigen::internal::pcast<SrcPacket, Packet<Acc>>(ploadu<SrcPacket>(p));
    } else {
      EIGEN_ALIGN_MAX Acc tmp[kLanes<Acc>];
      for (int i = 0; i < kLanes<Acc>; ++i) tmp[i] = Acc(p[i]);
      return pload<Packet<Acc>>(tmp);
    }
  }
}

/// dst[0, n) = src[0, n) widened to Acc, a packet at a time (load) and the tail element by element.
template <typename Acc, typename Src>
void widen_row(const Src* src, Acc* dst, Index n) {
  constexpr Index L = kLanes<Acc>;
  Index i = 0;
  for (; i + L <= n; i += L) pstoreu(dst + i, load<Acc>(src + i));
  for (; i < n; ++i) dst[i] = widen<Acc>(src[i]);
}

// ------------------------------------------------------------------------- bf16 pairs, split even / odd
//
// A bf16 is the top half of a float, so on AVX-512 one 64-byte load of 32 bf16 values gives two float packets with
// one shift and one mask: the even columns (each 32-bit word shifted left by 16) and the odd ones (the low halves
// cleared). That is 4 vector operations per 32 values instead of 6 (two zero-extending loads, each a load and a
// shuffle on port 5, and two shifts). The decode kernels take such pairs with their columns split (kept in that
// order in the dot products, whose queries pack_rows packs split the same way, and interleaved back once per block
// of output in pv_block). Measured on the 2-core Xeon of bench/README.md (AVX-512), bf16, H = 32, D = 128,
// S = 16384, 1 thread, CPU time per token, split off/on interleaved in one process, medians of 7 (load ~7, so
// noisy): G = 32 43.1 -> 40.5 ms (huge pages: 28.9 -> 26.7), G = 8 14.0 -> 12.6 (8.0 -> 7.6), G = 1 5.3 -> 4.1.

/// Whether the decode kernels read rows of Src as split pairs of packets (bf16 into float on AVX-512).
template <typename Acc, typename Src>
inline constexpr bool kSplitPairs =
#if defined(EIGEN_VECTORIZE_AVX512)
    std::is_same_v<Acc, float> && std::is_same_v<Src, bfloat16>;
#else
    false;
#endif

/// Whether rows of D columns are read as split pairs: kSplitPairs, and D a whole number of packet pairs.
template <typename Acc, typename Src>
constexpr bool split_pairs(Index D) {
  return kSplitPairs<Acc, Src> && D % (2 * kLanes<Acc>) == 0;
}

#if defined(EIGEN_VECTORIZE_AVX512)
/// The 32 bf16 values at p as two float packets: even = p[0, 2, .., 30], odd = p[1, 3, .., 31].
EIGEN_STRONG_INLINE void load_split_pair(const bfloat16* p, __m512& even, __m512& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))));
}

/// The inverse of the split: dst[0, 32) += the columns of (even, odd) in their natural order.
EIGEN_STRONG_INLINE void add_interleaved(float* dst, __m512 even, __m512 odd) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_permutex2var_ps(even, lo, odd)));
  _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16), _mm512_permutex2var_ps(even, hi, odd)));
}
#endif

/// Loads the split pair at p (kSplitPairs only; elsewhere never called).
template <typename Acc, typename Src>
EIGEN_STRONG_INLINE void load_pair(const Src* p, Packet<Acc>& even, Packet<Acc>& odd) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (kSplitPairs<Acc, Src>) return load_split_pair(p, even, odd);
#endif
  even = load<Acc>(p), odd = load<Acc>(p + kLanes<Acc>);  // unreachable: callers test kSplitPairs
}

// ------------------------------------------------------------------- rows widened once per chunk, into L1
//
// A kernel that reads each K or V value more than once (several register blocks of rows over the same V packet,
// or the outer form, which broadcasts single K elements) would widen it each time: a vcvtph2ps or an int8 sign
// extension and conversion (2 uops each) per packet per block, or a scalar conversion per element broadcast. Such
// kernels widen a chunk of rows once into an L1 buffer (WidenedChunk) and read float rows from it, while their
// prefetches still run ahead on the stored rows, so the stream from memory overlaps the products. bf16 read as
// split pairs costs a shift per packet and stays in place where packets are loaded (reads_in_place). This replaced
// widening each 256-key tile into buffers before the products (which then waited on the stored rows: a quarter
// of f16 GQA-2 decode, perf): medians of 3 interleaved rounds, 2-core Xeon of bench/README.md, H = 32, D = 128,
// S = 16384, 1 thread, ms per token: f16 G = 2 3.54 -> 2.81, G = 4 6.47 -> 4.50; int8 G = 2 3.52 -> 2.81, G = 4
// 6.08 -> 4.62; bf16 G = 4 (outer form, which broadcast widened scalars) 8.28 -> 4.38.

/// Whether kernels that load whole packets of Src rows read them in place at no more than a shift per packet: rows
/// of Acc itself, or bf16 read as split pairs.
template <typename Acc, typename Src>
constexpr bool reads_in_place(Index D) {
  return std::is_same_v<Src, Acc> || split_pairs<Acc, Src>(D);
}

/// An L1 buffer for a chunk of rows widened to Acc. 16 KiB: a third of the Xeon's 48 KiB L1, half of Zen's 32 KiB,
/// leaving room for the queries or probabilities and the output the kernels read beside it.
template <typename Acc>
struct WidenedChunk {
  static constexpr Index kBytes = 16 * 1024;
  EIGEN_ALIGN_MAX Acc data[kBytes / sizeof(Acc)];

  /// Rows of D values that fit, up to `keys`: 0 when one row does not.
  static constexpr Index keys_that_fit(Index keys, Index D) { return std::min(keys, kBytes / (D * Index(sizeof(Acc)))); }
  /// Widens `rows` (that fit) into the buffer and returns them as Acc rows (no rows past them to prefetch: the
  /// caller prefetches the stored rows).
  template <typename Src>
  KVRows<Acc> widen(const KVRows<Src>& rows) {
    GQA_ASSERT(rows.count * rows.cols * Index(sizeof(Acc)) <= kBytes);
    for (Index j = 0; j < rows.count; ++j) widen_row(rows.row(j), data + j * rows.cols, rows.cols);
    return {data, rows.cols, rows.count, rows.cols, rows.count};
  }
};

/// Calls f(keys, read) for a kernel that walks stored rows of D values in chunks of `keys`: read(chunk) gives the
/// rows the kernel multiplies. Where `widen` (and the rows are not Acc already, and a row fits), each chunk is
/// widened into a WidenedChunk and keys is cut to what fits; otherwise read returns the stored rows themselves.
template <typename Acc, typename Src, typename F>
void with_chunk_rows(bool widen, Index keys, Index D, F&& f) {
  if constexpr (!std::is_same_v<Src, Acc>) {
    if (const Index fit = WidenedChunk<Acc>::keys_that_fit(keys, D); widen && fit > 0) {
      WidenedChunk<Acc> buf;
      return f(fit, [&buf](const KVRows<Src>& rows) { return buf.widen(rows); });
    }
  }
  f(keys, [](const KVRows<Src>& rows) { return rows; });
}

/// Rows ahead of the one being read that the kernels prefetch. The kernels walk several K rows at once, or V rows
/// a column block at a time, orders the hardware prefetchers follow poorly from DRAM; fetching rows this far ahead
/// (8 KiB at D = 128, f32) keeps the stream going. Measured at H=32, D=128, S=16384, 2 threads, against a tile-wide
/// prefetch of the next tile: GQA-8 8.2 -> 6.5 ms, GQA-4 5.3 -> 4.5 ms, GQA-2 3.4 -> 2.8 ms per token; 8 and
/// 24-64 rows ahead were no better, and 16-bit caches gain too (bf16 MHA 14.6 -> 10.4 ms).
inline constexpr Index kPrefetchRows = 16;
/// The prefetch distance for rows of Src: kPrefetchRows, but 64 rows for int8, the same 8 KiB ahead as f32 at
/// D = 128 (measured on the 2-core Xeon of bench/README.md, loaded, CPU time per token at H=32, S=16384, 1 thread:
/// MHA 22.7 -> 20.3 ms and 17.3 -> 16.0 ms in two interleaved rounds; GQA-8 unchanged within noise).
template <typename Src>
inline constexpr Index prefetch_rows = std::is_same_v<Src, std::int8_t> ? 64 : kPrefetchRows;

/// The prefetch distance for rows of Src in a paged K/V whose blocks ahead are not one run: at least 12 KiB of rows
/// (48 bf16 rows at D = 128, three times prefetch_rows). A pool handed out in random order reads slower than one
/// run of memory (the hardware prefetchers stop at every block; bench_paged's stream baseline of the same blocks), and prefetching further
/// ahead wins part of that back: AMD EPYC Zen 5, bench_paged, blocks of 32 in random order, G = 32 / 8, 1 thread,
/// paged / contiguous throughput, medians of 3 interleaved rounds, 16 -> 32 -> 48 rows: bf16 0.615 -> 0.676 ->
/// 0.696 / 0.732 -> 0.854 -> 0.859, f16 0.588 -> 0.656 -> 0.665 / 0.725 -> 0.877 -> 0.883.
template <typename Src>
constexpr Index paged_prefetch_rows(Index D) {
  return std::max(prefetch_rows<Src>, (12 * 1024 / Index(sizeof(Src)) + D - 1) / D);
}

/// Software prefetch of a run of K/V rows, a given number of cache lines at a time. A kernel that passes over a
/// block of rows several times (one column block or one packet of query rows per pass) spreads the next block's
/// lines evenly over all of its passes: issued all in the first pass, they exceed the core's outstanding-miss
/// slots, the excess is lost, and DRAM idles during the later passes (measured at H=32, D=128, S=16384, 2 threads:
/// GQA-4 3.7 -> 2.7 ms, GQA-8 6.3 -> 5.4 ms per token). Rows are `stride` elements apart; a contiguous run (the
/// head-major KV cache) is prefetched as one range, and the rows of a paged K/V as one range per run of
/// consecutive blocks (up to kMorePages runs past the first: a 256-key tile of 32-key blocks in random order).
/// Building that range walk per chunk of keys, once per block even where the blocks were consecutive and only 4
/// blocks far, cost a paged serving step 18% against the contiguous cache holding the same tokens (64 sequences,
/// G = 8, bf16, block 32, AMD EPYC Zen 5, bench_paged's serving-paired: paged / contiguous throughput 0.82 / 0.83
/// at 1 / 2 threads; with a range per run of consecutive blocks, 1.01 / 1.03).
template <typename Src>
class LinePrefetcher {
 public:
  static constexpr int kMorePages = 8;

  /// `rows` rows of D elements starting at `first`, `stride` elements apart (none when rows <= 0).
  LinePrefetcher(const Src* first, Index stride, Index rows, Index D)
      : next_(reinterpret_cast<const char*>(first)), stride_bytes_(stride * Index(sizeof(Src))),
        row_bytes_(D * Index(sizeof(Src))) {
    if (rows <= 0) {
      end_ = next_;
    } else if (stride_bytes_ == row_bytes_) {  // contiguous rows (the KV cache): one run
      end_ = next_ + rows * row_bytes_;
    } else {
      end_ = next_ + row_bytes_;
      rows_after_ = rows - 1;
    }
    lines_ = rows <= 0 ? 0 : rows * ((row_bytes_ + 63) / 64);
  }
  /// The rows [distance, distance + n) of `k` that lie within its first `avail` rows: after k.data in memory, or
  /// where its page map puts them (at least paged_prefetch_rows ahead when they are not one run of blocks).
  static LinePrefetcher ahead(const KVRows<Src>& k, Index n, Index distance = prefetch_rows<Src>) {
    Index rows = std::min(n, k.avail - distance);
    if (!k.pages || rows <= 0 || distance + rows <= k.count)  // in memory after k.data
      return LinePrefetcher(k.data + distance * k.stride, k.stride, rows, k.cols);
    const PageMap<Src>& pages = *k.pages;
    Index j = k.first + distance, left = rows;
    if (pages.run_rows(j, left) == left)  // one run of blocks: as in a contiguous cache
      return LinePrefetcher(pages.row(j), pages.row_stride, rows, k.cols);
    // The blocks ahead are elsewhere in the pool: further ahead, a range per run.
    distance = std::max(distance, paged_prefetch_rows<Src>(k.cols));
    rows = std::min(n, k.avail - distance);
    j = k.first + distance, left = rows;
    if (rows <= 0) return LinePrefetcher(k.data, k.stride, 0, k.cols);
    Index m = pages.run_rows(j, left);
    LinePrefetcher lp(pages.row(j), pages.row_stride, m, k.cols);
    for (j += m, left -= m; left > 0 && lp.more_ < kMorePages; ++lp.more_) {
      m = pages.run_rows(j, left);
      const char* lo = reinterpret_cast<const char*>(pages.row(j));
      lp.more_lo_[lp.more_] = lo;
      lp.more_hi_[lp.more_] = lo + m * lp.row_bytes_;
      j += m, left -= m;
    }
    lp.lines_ = (rows - left) * ((lp.row_bytes_ + 63) / 64);
    return lp;
  }
  /// Lines per step that spread all of them evenly over `steps` steps.
  Index per_step(Index steps) const { return steps > 0 ? (lines_ + steps - 1) / steps : 0; }
  /// Prefetches the next `count` lines (fewer at the end).
  EIGEN_STRONG_INLINE void issue(Index count) {
    while (count > 0) {
      if (next_ >= end_ && !next_run()) return;
      const Index n = std::min<Index>(count, (end_ - next_ + 63) / 64);
      for (Index i = 0; i < n; ++i) Eigen::internal::prefetch(next_ + 64 * i);
      next_ += 64 * n;
      count -= n;
    }
  }

 private:
  /// Moves to the next row of a strided run, or the next page; false when there is none.
  bool next_run() {
    if (rows_after_ > 0) {
      next_ = end_ - row_bytes_ + stride_bytes_;
      end_ = next_ + row_bytes_;
      --rows_after_;
      return true;
    }
    if (page_ == more_) return false;
    next_ = more_lo_[page_], end_ = more_hi_[page_];
    ++page_;
    return true;
  }

  const char* next_;  // next line to prefetch, in the current run [.., end_)
  const char* end_;
  Index stride_bytes_, row_bytes_, rows_after_ = 0, lines_ = 0;
  int more_ = 0, page_ = 0;  // pages after the first, and the next of them to prefetch
  const char* more_lo_[kMorePages];
  const char* more_hi_[kMorePages];
};

/// A LinePrefetcher and the lines to issue per key read, so that its lines are spread evenly over the reads.
template <typename Src>
struct PrefetchShare {
  LinePrefetcher<Src> lines;
  Index per_key = 0;

  /// Prefetches the rows [distance, distance + n) ahead of `k` (within k.avail), spread over `steps` key reads.
  static PrefetchShare ahead(const KVRows<Src>& k, Index n, Index steps, Index distance = prefetch_rows<Src>) {
    auto lines = LinePrefetcher<Src>::ahead(k, n, distance);
    const Index per_key = lines.per_step(steps);
    return {lines, per_key};
  }
  EIGEN_STRONG_INLINE void issue(Index keys) { lines.issue(keys * per_key); }
};

/// Calls f(std::integral_constant<int, i>) for 1 <= i <= N (nothing otherwise): a run-time count of keys left over
/// by a register-blocked loop, as a compile-time block size.
template <int N, typename F>
EIGEN_STRONG_INLINE void with_block_size(Index i, F&& f) {
  if constexpr (N >= 1) {
    if (i == N) return f(std::integral_constant<int, N>{});
    with_block_size<N - 1>(i, f);
  }
}

/// Query rows in the layout the dot kernels read: q [rows, D] (row stride D) in groups of `group` rows (the last
/// may be smaller), each group [D / lanes][group][lanes], so the packets of one column block of all the group's rows
/// sit at fixed offsets from one pointer. D is a multiple of the packet size. `split`: each pair of column blocks
/// holds the pair's even columns, then its odd ones (the order of load_pair; D a multiple of two packets).
template <typename Acc>
void pack_rows(const Acc* q, Index rows, Index D, Index group, Acc* out, bool split = false) {
  constexpr Index L = kLanes<Acc>;
  for (Index g0 = 0; g0 < rows; g0 += group) {
    const Index size = std::min(group, rows - g0);
    for (Index d = 0; d < D; d += L)
      for (Index r = 0; r < size; ++r) {
        const Acc* src = q + (g0 + r) * D;
        Acc* dst = out + g0 * D + d * size + r * L;
        if (!split) {
          std::copy_n(src + d, L, dst);
        } else {  // block d of a pair starting at d0 holds columns d0 + 2i (+ 1 for the pair's second block)
          const Index d0 = d / (2 * L) * (2 * L), odd = (d - d0) / L;
          for (Index i = 0; i < L; ++i) dst[i] = src[d0 + 2 * i + odd];
        }
      }
  }
}

/// Dot-product form for M < lanes rows: st(j, r) = sum_d q[r][d] * k_rows.row(j)[d], q packed by pack_rows (one
/// group of M rows). KB keys are processed together so each q packet load feeds KB FMAs.
template <int M, typename Acc, typename Src>
void scores_dot(const Acc* qp, const KVRows<Src>& k_rows, Strided<Acc> st_m, PrefetchShare<Src>& pf) {
  constexpr int L = kLanes<Acc>;
  const Src* k = k_rows.data;
  const Index k_stride = k_rows.stride, n = k_rows.count, D = k_rows.cols, ld_st = st_m.ld;
  Acc* st = st_m.data;
  // Enough independent accumulators (KB * M, up to 12) to cover the FMA latency, without spilling registers.
  constexpr int KB = std::max(1, std::min(8, kAccRegisters / M));
  const bool split = split_pairs<Acc, Src>(D);
  Index j = 0;
  auto block = [&](auto kb_const) {
    constexpr int kb = decltype(kb_const)::value;
    pf.issue(kb);
    Packet<Acc> acc[kb][M];
    for (int a = 0; a < kb; ++a)
      for (int r = 0; r < M; ++r) acc[a][r] = pset1<Packet<Acc>>(Acc(0));
    if (split) {
      for (Index d = 0; d < D; d += 2 * L) {
        Packet<Acc> ke[kb], ko[kb];
        for (int a = 0; a < kb; ++a) load_pair<Acc>(k + (j + a) * k_stride + d, ke[a], ko[a]);
        for (int r = 0; r < M; ++r) {
          const Packet<Acc> qe = ploadu<Packet<Acc>>(qp + d * M + r * L);
          const Packet<Acc> qo = ploadu<Packet<Acc>>(qp + (d + L) * M + r * L);
          for (int a = 0; a < kb; ++a) acc[a][r] = pmadd(ko[a], qo, pmadd(ke[a], qe, acc[a][r]));
        }
      }
    } else {
      for (Index d = 0; d < D; d += L) {
        Packet<Acc> kv[kb];
        for (int a = 0; a < kb; ++a) kv[a] = load<Acc>(k + (j + a) * k_stride + d);
        for (int r = 0; r < M; ++r) {
          const Packet<Acc> qv = ploadu<Packet<Acc>>(qp + d * M + r * L);
          for (int a = 0; a < kb; ++a) acc[a][r] = pmadd(kv[a], qv, acc[a][r]);
        }
      }
    }
    for (int a = 0; a < kb; ++a)
      for (int r = 0; r < M; ++r) st[(j + a) * ld_st + r] = predux(acc[a][r]);
  };
  for (; j + KB <= n; j += KB) block(std::integral_constant<int, KB>{});
  with_block_size<KB - 1>(n - j, block);  // the rest in one block: enough accumulator chains for the FMA latency
}

#if defined(EIGEN_VECTORIZE_AVX512)
/// predux_transposed for 16 float packets as a tree: each level adds the halves of two vectors at once, 30 shuffles
/// and 15 adds where a 16x16 transpose and its 15 adds take ~80 shuffles, all on the one shuffle port of Intel's
/// cores. The tree leaves sum(in[4t + k]) at lane 4k + t, so it is fed acc[4k + t] as in[4t + k].
EIGEN_STRONG_INLINE __m512 predux_transposed_tree(const __m512* acc) {
  auto in = [acc](int j) { return acc[(j % 4) * 4 + j / 4]; };
  __m512 l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i)  // in[2i], in[2i+1] -> their 256-bit halves added: 8 sums of 8 lanes each
    l1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0x44),
                          _mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0xEE));
  for (int i = 0; i < 4; ++i)  // -> 128-bit lane k of l2[i] sums to in[4i + k]
    l2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * i], l1[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(l1[2 * i], l1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // -> within lane k: 2 floats of in[8i + k], 2 of in[8i + 4 + k]
    l3[i] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * i], l2[2 * i + 1], 0x44),
                          _mm512_shuffle_ps(l2[2 * i], l2[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88), _mm512_shuffle_ps(l3[0], l3[1], 0xDD));
}
#endif

/// Sums of the lanes of each of L = lanes packets, as one packet: out[i] = predux(acc[i]) (a transposed reduction).
template <typename PacketT>
EIGEN_STRONG_INLINE PacketT predux_transposed(const PacketT* acc) {
  constexpr int L = Eigen::internal::unpacket_traits<PacketT>::size;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<typename Eigen::internal::unpacket_traits<PacketT>::type, float> && L == 16) {
    return predux_transposed_tree(acc);
  } else
#endif
  {
    Eigen::internal::PacketBlock<PacketT, L> block;
    for (int i = 0; i < L; ++i) block.packet[i] = acc[i];
    Eigen::internal::ptranspose(block);
    PacketT sum = block.packet[0];
    for (int i = 1; i < L; ++i) sum = padd(sum, block.packet[i]);
    return sum;
  }
}

/// Dot-product form for M rows where M divides the packet size, KB = lanes / M keys at a time:
/// st(j, r) = sum_d q[r][d] * k_rows.row(j)[d], q packed by pack_rows (one group of M rows). The KB * M = lanes
/// accumulators are reduced together into one packet, stored at st.row(j): KB consecutive rows of S^T when
/// st.ld == M, or (M = lanes) one packet of the rows of a wider S^T.
template <int M, typename Acc, typename Src>
void scores_dot_packed(const Acc* qp, const KVRows<Src>& k_rows, Strided<Acc> st_m, PrefetchShare<Src>& pf) {
  constexpr int L = kLanes<Acc>;
  const Src* k = k_rows.data;
  const Index k_stride = k_rows.stride, n = k_rows.count, D = k_rows.cols, ld_st = st_m.ld;
  Acc* st = st_m.data;
  constexpr int KB = L / M;
  static_assert(KB * M == L, "M must divide the packet size");
  const bool split = split_pairs<Acc, Src>(D);
  Index j = 0;
  for (; j + KB <= n; j += KB) {
    pf.issue(KB);
    Packet<Acc> acc[KB * M];
    for (int i = 0; i < KB * M; ++i) acc[i] = pset1<Packet<Acc>>(Acc(0));
    const Src* rows = k + j * k_stride;
    if (split) {
      for (Index d = 0; d < D; d += 2 * L) {
        Packet<Acc> qe[M], qo[M];
        for (int r = 0; r < M; ++r) {
          qe[r] = ploadu<Packet<Acc>>(qp + d * M + r * L);
          qo[r] = ploadu<Packet<Acc>>(qp + (d + L) * M + r * L);
        }
        for (int a = 0; a < KB; ++a) {
          Packet<Acc> ke, ko;
          load_pair<Acc>(rows + a * k_stride + d, ke, ko);
          for (int r = 0; r < M; ++r) acc[a * M + r] = pmadd(ko, qo[r], pmadd(ke, qe[r], acc[a * M + r]));
        }
      }
    } else {
      for (Index d = 0; d < D; d += L) {
        Packet<Acc> qv[M];
        for (int r = 0; r < M; ++r) qv[r] = ploadu<Packet<Acc>>(qp + d * M + r * L);
        for (int a = 0; a < KB; ++a) {
          const Packet<Acc> kv = load<Acc>(rows + a * k_stride + d);
          for (int r = 0; r < M; ++r) acc[a * M + r] = pmadd(kv, qv[r], acc[a * M + r]);
        }
      }
    }
    pstoreu(st + j * ld_st, predux_transposed(acc));
  }
  if (j < n) scores_dot<M>(qp, k_rows.rows(j, n - j), Strided<Acc>{st + j * ld_st, ld_st}, pf);
}

/// Outer-product form for NB packets of rows (M <= NB * lanes): qt is Q^T, [D, >= NB * lanes] (columns past M
/// zero). st(j, r) = sum_d k_rows.row(j)[d] * qt(d, r): each K element is broadcast once and multiplies a whole
/// packet of rows. `pf` (a PrefetchShare, of rows of any type) issues a share per key.
template <int NB, typename Acc, typename Src, typename Pf>
void scores_outer(Strided<const Acc> qt_m, const KVRows<Src>& k_rows, Strided<Acc> st_m, Pf& pf) {
  constexpr int L = kLanes<Acc>;
  const Acc* qt = qt_m.data;
  const Src* k = k_rows.data;
  const Index ldq = qt_m.ld, k_stride = k_rows.stride, n = k_rows.count, D = k_rows.cols, ld_st = st_m.ld;
  Acc* st = st_m.data;
  constexpr int KB = std::max(1, std::min(8, kAccRegisters / NB));
  Index j = 0;
  auto block = [&](auto kb_const) {
    constexpr int kb = decltype(kb_const)::value;
    pf.issue(kb);
    Packet<Acc> acc[kb][NB];
    for (int a = 0; a < kb; ++a)
      for (int c = 0; c < NB; ++c) acc[a][c] = pset1<Packet<Acc>>(Acc(0));
    const Src* key[kb];
    for (int a = 0; a < kb; ++a) key[a] = k + (j + a) * k_stride;
    for (Index d = 0; d < D; ++d) {
      Packet<Acc> qv[NB];
      for (int c = 0; c < NB; ++c) qv[c] = pload<Packet<Acc>>(qt + d * ldq + c * L);
      for (int a = 0; a < kb; ++a) {
        const Packet<Acc> kv = pset1<Packet<Acc>>(widen<Acc>(key[a][d]));
        for (int c = 0; c < NB; ++c) acc[a][c] = pmadd(kv, qv[c], acc[a][c]);
      }
    }
    for (int a = 0; a < kb; ++a)
      for (int c = 0; c < NB; ++c) pstoreu(st + (j + a) * ld_st + c * L, acc[a][c]);
  };
  for (; j + KB <= n; j += KB) block(std::integral_constant<int, KB>{});
  with_block_size<KB - 1>(n - j, block);
}

/// out(r, d) += sum_j pt(j, r) * v_rows.row(j)[d] for r < R, d in [d0, d0 + NV * lanes), first issuing the
/// prefetches of all v_rows' keys (at once: issued key by key, they measured no better, at a higher instruction cost).
/// Always inlined: GCC kept some instantiations out of line (which ones changed with unrelated code), and those ran
/// slower: G = 8 (4 rows), 2-core Xeon of bench/README.md, S = 16384, medians of 3 interleaved rounds,
/// 1 / 2 threads, bf16 4.27 / 2.28 -> 3.58 / 1.83, f16 4.49 / 2.22 -> 3.74 / 1.92, int8 4.46 / 2.35 -> 3.72 / 1.88
/// ms per token; other G unchanged.
template <int R, int NV, typename Acc, typename Src, typename Pf>
EIGEN_ALWAYS_INLINE void pv_block(Strided<const Acc> pt_m, const KVRows<Src>& v_rows, Strided<Acc> out_m, Index d0,
                                  Pf& pf) {
  constexpr int L = kLanes<Acc>;
  const Acc* pt = pt_m.data;
  const Src* v = v_rows.data;
  const Index ld_pt = pt_m.ld, v_stride = v_rows.stride, n = v_rows.count, ld_out = out_m.ld;
  Acc* out = out_m.data;
  Packet<Acc> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = pset1<Packet<Acc>>(Acc(0));
  pf.issue(n);
  // Split pairs (packets c and c + 1 of the block, c even, hold the even and odd columns of 2 * lanes) where the
  // block is whole pairs of a row read as pairs.
  const bool split = NV % 2 == 0 && d0 % (2 * L) == 0 && split_pairs<Acc, Src>(v_rows.cols);
  if (split) {
    for (Index j = 0; j < n; ++j) {
      Packet<Acc> vv[NV];
      for (int c = 0; c < NV; c += 2) load_pair<Acc>(v + j * v_stride + d0 + c * L, vv[c], vv[c + 1]);
      for (int r = 0; r < R; ++r) {
        const Packet<Acc> prob = pset1<Packet<Acc>>(pt[j * ld_pt + r]);
        for (int c = 0; c < NV; ++c) acc[r][c] = pmadd(prob, vv[c], acc[r][c]);
      }
    }
  } else {
    for (Index j = 0; j < n; ++j) {
      Packet<Acc> vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = load<Acc>(v + j * v_stride + d0 + c * L);
      for (int r = 0; r < R; ++r) {
        const Packet<Acc> prob = pset1<Packet<Acc>>(pt[j * ld_pt + r]);
        for (int c = 0; c < NV; ++c) acc[r][c] = pmadd(prob, vv[c], acc[r][c]);
      }
    }
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (kSplitPairs<Acc, Src> && NV % 2 == 0) {
    if (split) {
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; c += 2) add_interleaved(out + r * ld_out + d0 + c * L, acc[r][c], acc[r][c + 1]);
      return;
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) {
      Acc* dst = out + r * ld_out + d0 + c * L;
      pstoreu(dst, padd(ploadu<Packet<Acc>>(dst), acc[r][c]));
    }
}

/// Rows per register block in the bulk of accumulate_pv, and the packets of columns per block of R rows. 6 x 2
/// holds 12 accumulators, 2 V packets and 1 broadcast in 15 of AVX2's 16 vector registers, so each V packet is
/// loaded once for 6 rows: 8 loads per 12 FMAs. A 3 x 4 block needs 17 registers, and GCC then reloads V as a
/// memory operand of every FMA (15 loads per 12 FMAs). Against 3 x 4, L2-resident: 22.4 -> 20.6 cycles per (key,
/// row) at 8 rows, 19.9 -> 18.4 at 32. (In isolation, on 32-byte-aligned V, both blocks reach 1.8-2 FMAs per cycle;
/// split-line loads of unaligned V would hurt the folded form more.) Leftover rows: see for_each_pv_row_block.
inline constexpr int kPvRows = 6;
constexpr int pv_columns(int R) { return R == 1 ? 8 : R == 2 ? 6 : R == 3 ? 4 : R == 4 ? 3 : 2; }

/// Calls f(std::integral_constant<int, R>{}, r0) for the register blocks of rows accumulate_pv uses for M rows:
/// blocks of kPvRows, then the rest in one block where that keeps V in registers (5 rows; 4 rows when V is
/// widened from 16 bits, which cannot be a memory operand), else in blocks of 3, 2 and 1 rows (so an f32 V packet
/// feeds 3 FMAs from memory rather than 4). One block per V packet saves widening it twice; L2-resident, cycles per
/// (key, row): bf16 4 rows 28.0 -> 25.9, 5 rows 26.5 -> 23.4, 16 rows 21.4 -> 20.0; f32 5 rows 25.6 -> 24.3.
template <typename Acc, typename Src, typename F>
EIGEN_STRONG_INLINE void for_each_pv_row_block(Index M, F&& f) {
  Index r0 = 0;
  for (; r0 + kPvRows <= M; r0 += kPvRows) f(std::integral_constant<int, kPvRows>{}, r0);
  if (M - r0 == 5) return f(std::integral_constant<int, 5>{}, r0);
  if (!std::is_same_v<Src, Acc> && M - r0 == 4) return f(std::integral_constant<int, 4>{}, r0);
  for (; r0 + 3 <= M; r0 += 3) f(std::integral_constant<int, 3>{}, r0);
  if (M - r0 == 2) f(std::integral_constant<int, 2>{}, r0);
  if (M - r0 == 1) f(std::integral_constant<int, 1>{}, r0);
}

/// Bytes of V per chunk in accumulate_pv: a chunk's rows are re-read by every register block, so they must stay in
/// L1 next to the probabilities and the output (rows D * 4 bytes apart also share few L1 sets).
inline constexpr Index kPvChunkBytes = 16 * 1024;

/// Calls f(std::integral_constant<int, NB>{}, d0) for the column blocks of accumulate_pv: NV packets of columns at
/// a time, then tails of 4, 2 and 1 packets. Always inlined: left to GCC, the register blocks were not inlined
/// into it (2 rows: 36 -> 41 cycles per (key, row)).
template <typename Acc, int NV, typename F>
EIGEN_ALWAYS_INLINE void for_each_pv_column_block(Index D, F&& f) {
  constexpr Index L = kLanes<Acc>;
  Index d0 = 0;
  for (; d0 + NV * L <= D; d0 += NV * L) f(std::integral_constant<int, NV>{}, d0);
  if constexpr (NV > 4)
    for (; d0 + 4 * L <= D; d0 += 4 * L) f(std::integral_constant<int, 4>{}, d0);
  if constexpr (NV > 2)
    for (; d0 + 2 * L <= D; d0 += 2 * L) f(std::integral_constant<int, 2>{}, d0);
  for (; d0 < D; d0 += L) f(std::integral_constant<int, 1>{}, d0);
}

/// accumulate_pv's loop over chunks of `chunk` keys, the register blocks reading the rows `read(stored chunk)`
/// returns (the stored rows, or the chunk widened: with_chunk_rows).
template <typename Acc, typename Src, typename ReadRows>
void accumulate_pv_chunks(Strided<const Acc> pt, Index M, const KVRows<Src>& v_rows, Strided<Acc> out, Index chunk,
                          ReadRows&& read) {
  using Read = std::remove_const_t<std::remove_pointer_t<decltype(read(v_rows).data)>>;
  const Index n = v_rows.count, D = v_rows.cols;
  Index blocks = 0;  // register blocks per chunk, to spread the prefetches over
  for_each_pv_row_block<Acc, Read>(M, [&](auto r_const, Index) {
    for_each_pv_column_block<Acc, pv_columns(decltype(r_const)::value)>(D, [&](auto, Index) { ++blocks; });
  });
  for (Index j0 = 0; j0 < n; j0 += chunk) {
    const Index nn = std::min(chunk, n - j0);
    const KVRows<Src> vj = v_rows.rows(j0, nn);
    auto pf = PrefetchShare<Src>::ahead(vj, nn, blocks * nn, std::max(prefetch_rows<Src>, chunk));
    const KVRows<Read> rows = read(vj);
    for_each_pv_row_block<Acc, Read>(M, [&](auto r_const, Index r0) {
      constexpr int R = decltype(r_const)::value;
      constexpr int NV = pv_columns(R);
      const Strided<const Acc> ptj{pt.row(j0) + r0, pt.ld};
      const Strided<Acc> o{out.row(r0), out.ld};
      for_each_pv_column_block<Acc, NV>(D, [&](auto nv_const, Index d0) {
        pv_block<R, decltype(nv_const)::value>(ptj, rows, o, d0, pf);
      });
    });
  }
}

/// O += probabilities x V for M rows: out [M, D] += pt^T [M, n] * v_rows [n, D], pt [n, M] the probabilities
/// transposed. V is taken in chunks of keys; within a chunk, blocks of R rows x NV packets keep R * NV accumulators
/// (8-12) in registers while the chunk's V rows come from L1 (row blocks: for_each_pv_row_block; columns:
/// pv_columns, so even one row has enough independent FMA chains). Where several row blocks would each widen the
/// chunk's V packets again (more than kPvRows rows, V not read in place), the chunk is widened once (WidenedChunk).
/// While one chunk is multiplied, the stored rows max(kPrefetchRows, chunk) ahead are prefetched, spread evenly over
/// the chunk's register blocks.
template <typename Acc, typename Src>
void accumulate_pv(Strided<const Acc> pt, Index M, const KVRows<Src>& v_rows, Strided<Acc> out) {
  const Index D = v_rows.cols;
  // Chunks of 2M keys (at least 8, at most kPvChunkBytes of V): long enough to amortise loading and storing the
  // accumulators, short enough that the rows are read from DRAM nearly in order and stay in L1. From 4 rows, a
  // V that is widened (16-bit, int8) takes at least 32 keys: interleaved A/B, AMD EPYC Zen 5, S = 16384, 8 -> 32
  // keys, time ratio at 1 / 2 threads: G = 8 bf16 1.11 / 1.05, int8 1.18 / 1.19; G = 4 bf16 1.08 / 1.03, int8
  // 1.07 / 1.13; while f32 V (0.88-0.99) and one row (G = 32: bf16 0.93 / 0.86) were slower with 32.
  const Index cap = std::max<Index>(8, kPvChunkBytes / (D * Index(sizeof(Src))));
  const Index least = M >= 4 && !std::is_same_v<Src, Acc> ? 32 : 8;
  const Index chunk = std::clamp<Index>(2 * M, std::min(least, cap), cap);
  with_chunk_rows<Acc, Src>(M > kPvRows && !reads_in_place<Acc, Src>(D), chunk, D, [&](Index keys, auto&& read) {
    accumulate_pv_chunks(pt, M, v_rows, out, keys, read);
  });
}

/// exp(v) lane by lane for v <= 0 (the softmax's s - max), exactly 0 where v is -inf; NaN stays NaN. A masked score
/// must contribute an exact zero (a row with no visible key returns zeros, and masked values, even NaN padding,
/// never reach the output); Eigen's pexp returns ~3e-39 for -inf. For float packets this is Eigen's Cephes
/// polynomial with a cheaper range: v is clamped at -87, where exp(v) is still a normal float, so 2^m is built from
/// exponent bits (Eigen's pldexp splits it four ways to survive any exponent), and v < -87 gives 0 (an absolute error
/// below 1.7e-38, against a row sum >= 1). 18 operations per packet instead of about 33; L2-resident, cycles per
/// (key, row): 8 rows 20.4 -> 19.4, 16 rows 18.3 -> 17.5, 32 rows 18.4 -> 17.7. Positive v is outside the contract.
template <typename PacketT>
EIGEN_STRONG_INLINE PacketT pexp_nonpositive(const PacketT& v) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<PacketT>::type;
  if constexpr (std::is_same_v<Scalar, float> && unpacket_traits<PacketT>::size > 1) {
    using PI = typename unpacket_traits<PacketT>::integer_packet;
    const PacketT lowest = pset1<PacketT>(-87.0f);
    const PacketT x = pmax(v, lowest);  // NaN in v stays NaN (Eigen's pmax returns its first argument then)
    const PacketT m = pfloor(pmadd(x, pset1<PacketT>(1.44269504088896341f), pset1<PacketT>(0.5f)));  // in [-126, 0]
    PacketT r = pmadd(m, pset1<PacketT>(-0.693359375f), x);
    r = pmadd(m, pset1<PacketT>(2.12194440e-4f), r);  // x - m ln 2 in [-ln 2 / 2, ln 2 / 2]
    const PacketT r2 = pmul(r, r), r3 = pmul(r2, r);
    PacketT y = pmadd(pset1<PacketT>(1.9875691500E-4f), r, pset1<PacketT>(1.3981999507E-3f));
    PacketT y1 = pmadd(pset1<PacketT>(4.1665795894E-2f), r, pset1<PacketT>(1.6666665459E-1f));
    const PacketT y2 = padd(r, pset1<PacketT>(1.0f));
    y = pmadd(y, r, pset1<PacketT>(8.3334519073E-3f));
    y1 = pmadd(y1, r, pset1<PacketT>(5.0000001201E-1f));
    y = pmadd(y, r3, y1);
    y = pmadd(y, r2, y2);  // exp(r)
    const PacketT scale = preinterpret<PacketT>(plogical_shift_left<23>(padd(pcast<PacketT, PI>(m), pset1<PI>(127))));  // 2^m
    return pselect(pcmp_lt(v, lowest), pset1<PacketT>(0.0f), pmul(y, scale));
  } else {
    const PacketT neg_inf = pset1<PacketT>(-std::numeric_limits<Scalar>::infinity());
    return pselect(pcmp_eq(v, neg_inf), pset1<PacketT>(Scalar(0)), pexp(v));
  }
}

/// x[i] = exp(x[i]) for x[i] <= 0, exactly 0 for -inf (see pexp_nonpositive).
template <typename Acc>
void exp_nonpositive(Acc* x, Index n) {
  constexpr int L = kLanes<Acc>;
  Index i = 0;
  for (; i + L <= n; i += L) pstoreu(x + i, pexp_nonpositive(ploadu<Packet<Acc>>(x + i)));
  for (; i < n; ++i) x[i] = x[i] == -std::numeric_limits<Acc>::infinity() ? Acc(0) : std::exp(x[i]);
}

/// Column maxima of x viewed as [len / period, period] (row-major): colmax[i] = max_k x[k * period + i]. period is a
/// multiple of the packet size and divides len > 0.
template <typename Acc>
void periodic_max(const Acc* x, Index len, Index period, Acc* colmax) {
  using Eigen::internal::pmax;
  constexpr int L = kLanes<Acc>;
  GQA_ASSERT(period % L == 0 && len % period == 0 && len > 0);
  if (period == L) {  // the group divides the packet: reduce in registers, four chains
    Packet<Acc> m[4];
    for (int a = 0; a < 4; ++a) m[a] = ploadu<Packet<Acc>>(x);
    Index i = L;
    for (; i + 4 * L <= len; i += 4 * L)
      for (int a = 0; a < 4; ++a) m[a] = pmax(m[a], ploadu<Packet<Acc>>(x + i + a * L));
    for (; i < len; i += L) m[0] = pmax(m[0], ploadu<Packet<Acc>>(x + i));
    pstoreu(colmax, pmax(pmax(m[0], m[1]), pmax(m[2], m[3])));
    return;
  }
  std::copy_n(x, period, colmax);
  for (Index k = period; k < len; k += period)
    for (Index i = 0; i < period; i += L)
      pstoreu(colmax + i, pmax(ploadu<Packet<Acc>>(colmax + i), ploadu<Packet<Acc>>(x + k + i)));
}

/// x[i] = exp(x[i] - shift[i % period]), exactly 0 where that difference is -inf (see pexp_nonpositive; the shift is
/// at least every x of its column), and colsum the column sums of the result viewed as [len / period, period].
/// period is a multiple of the packet size and divides len.
template <typename Acc>
void periodic_exp_sum(Acc* x, Index len, const Acc* shift, Index period, Acc* colsum) {
  constexpr int L = kLanes<Acc>;
  GQA_ASSERT(period % L == 0 && len % period == 0);
  const Packet<Acc> zero = pset1<Packet<Acc>>(Acc(0));
  auto step = [](Acc* p, const Packet<Acc>& s) {
    const Packet<Acc> e = pexp_nonpositive(Eigen::internal::psub(ploadu<Packet<Acc>>(p), s));
    pstoreu(p, e);
    return e;
  };
  if (period == L) {
    const Packet<Acc> s = ploadu<Packet<Acc>>(shift);
    Packet<Acc> sum[2] = {zero, zero};
    Index i = 0;
    for (; i + 2 * L <= len; i += 2 * L)
      for (int a = 0; a < 2; ++a) sum[a] = padd(sum[a], step(x + i + a * L, s));
    for (; i < len; i += L) sum[0] = padd(sum[0], step(x + i, s));
    pstoreu(colsum, padd(sum[0], sum[1]));
    return;
  }
  std::fill_n(colsum, period, Acc(0));
  for (Index k = 0; k < len; k += period)
    for (Index i = 0; i < period; i += L)
      pstoreu(colsum + i, padd(ploadu<Packet<Acc>>(colsum + i), step(x + k + i, ploadu<Packet<Acc>>(shift + i))));
}

/// Largest row count the small-M kernels handle: 4 packets of rows (32 floats on AVX2, 64 on AVX-512).
template <typename Acc>
inline constexpr Index kMaxRows = 4 * kLanes<Acc>;

/// Whether `rows` go to the outer-product form (which multiplies by Q^T, broadcasting single K elements) rather than
/// the dot forms: from 8 rows up, all but the divisors of the packet (one whole packet; 8 rows of AVX-512's 16
/// lanes). There the dot form loads (1 + lanes) / lanes packets per FMA and the outer form (NB + KB) / (NB * KB), KB
/// keys x NB packets of rows: 8 / 12 at 2 packets. Measured L2-resident, f32, 16 rows (AVX2): 20.2 -> 18.5 cycles
/// per (key, row); 24 and 32 rows the same either way. With 16-bit or int8 K, whose chunks the outer form widens
/// once (WidenedChunk), 32 rows on the Xeon of bench/README.md (S = 16384, medians of 3 interleaved rounds, 1 / 2
/// threads, ms per token): bf16 2.62 / 1.35 -> 2.49 / 1.32, f16 2.82 / 1.47 -> 2.68 / 1.27, int8 2.78 / 1.40 ->
/// 2.39 / 1.23. A divisor of the packet stays in the dot form, whose lanes are all rows: one whole packet (the
/// outer form there: bf16 and f32 GQA-2 7-14% slower), and 8 rows on AVX-512, where the outer form left half of
/// every packet zero (GQA-4, the same machine and method, f32 4.96 / 2.61 -> 3.26 / 1.68, bf16 4.43 / 2.37 ->
/// 2.89 / 1.47, f16 4.51 / 2.41 -> 3.24 / 1.65, int8 4.51 / 2.49 -> 3.28 / 1.67).
template <typename Acc>
constexpr bool uses_outer_form(Index rows) {
  constexpr Index L = kLanes<Acc>;
  return rows >= std::min<Index>(8, L) && L % rows != 0;
}

/// The forms of the score product, as tags (the row count is a template parameter so accumulators live in registers):
///   DotRows<M>       M < min(8, lanes) rows, or M from 8 up that divides the packet (8 on AVX-512, one whole
///                    packet), one dot product per (key, row) (scores_dot / scores_dot_packed)
///   OuterPackets<NB> up to NB packets of rows, outer products with Q^T (scores_outer)
template <int M>
struct DotRows {};
template <int NB>
struct OuterPackets {};

/// Calls f with the tag of the form that score_tile uses for `rows` (1 <= rows <= kMaxRows<Acc>), any type of K.
template <typename Acc, typename F>
void with_score_form(Index rows, F&& f) {
  constexpr int L = kLanes<Acc>;
  GQA_ASSERT(rows >= 1 && rows <= kMaxRows<Acc>);
  if (rows < std::min(8, L)) {
    switch (rows) {
      case 1: return f(DotRows<1>{});
      case 2: if constexpr (L > 2) return f(DotRows<2>{}); break;
      case 3: if constexpr (L > 3) return f(DotRows<3>{}); break;
      case 4: if constexpr (L > 4) return f(DotRows<4>{}); break;
      case 5: if constexpr (L > 5) return f(DotRows<5>{}); break;
      case 6: if constexpr (L > 6) return f(DotRows<6>{}); break;
      case 7: if constexpr (L > 7) return f(DotRows<7>{}); break;
      default: break;
    }
  }
  if (!uses_outer_form<Acc>(rows)) {  // a divisor of the packet from 8 rows up: 8 (of 16 lanes) or one packet
    if constexpr (L > 8 && L % 8 == 0)
      if (rows == 8) return f(DotRows<8>{});
    return f(DotRows<L>{});
  }
  switch ((rows + L - 1) / L) {
    case 1: return f(OuterPackets<1>{});
    case 2: return f(OuterPackets<2>{});
    case 3: return f(OuterPackets<3>{});
    default: return f(OuterPackets<4>{});
  }
}

/// Elements of the buffer pack_queries fills: [D, kMaxRows] (Q^T, zero-padded, for the outer form).
template <typename Acc>
constexpr Index packed_queries_size(Index D) {
  return D * kMaxRows<Acc>;
}

/// Writes q [rows, D] (row stride D) into `buf` (packed_queries_size elements, aligned as Eigen aligns its heap
/// storage: the outer form reads it with aligned loads) in the layout score_tile's form for `rows` reads: packed by
/// pack_rows for the dot forms, Q^T [D, kMaxRows] zero-padded for the outer form.
template <typename Acc, typename Src>
void pack_queries(const Acc* q, Index rows, Index D, Acc* buf) {
  constexpr Index L = kLanes<Acc>;
  GQA_ASSERT(reinterpret_cast<std::uintptr_t>(buf) % EIGEN_MAX_ALIGN_BYTES == 0);
  if (uses_outer_form<Acc>(rows)) {
    using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<Matrix> qt(buf, D, kMaxRows<Acc>);
    qt.setZero();
    qt.leftCols(rows) = Eigen::Map<const Matrix>(q, rows, D).transpose();
  } else {
    pack_rows(q, rows, D, std::min<Index>(rows, L), buf, split_pairs<Acc, Src>(D));
  }
}

/// Scores of DotRows: one pass over the keys, M rows at a time, prefetching the rows kPrefetchRows ahead.
template <int M, typename Acc, typename Src>
void scores(DotRows<M>, const Acc* qpack, Index /*rows*/, const KVRows<Src>& k, Acc* st) {
  auto pf = PrefetchShare<Src>::ahead(k, k.count, k.count);
  if constexpr (kLanes<Acc> % M == 0)
    scores_dot_packed<M>(qpack, k, Strided<Acc>{st, M}, pf);
  else
    scores_dot<M>(qpack, k, Strided<Acc>{st, M}, pf);
}

/// Scores of OuterPackets: all packets of rows at once, keys in chunks that are whole register blocks (KB = 3, 4, 6
/// or 8 keys), written straight into S^T when the rows are whole packets, else into a padded row stride and
/// compacted. K that is not Acc is widened a chunk at a time (WidenedChunk) rather than element by element as it is
/// broadcast. Prefetches the stored rows kPrefetchRows ahead of the tile, a share per key.
template <int NB, typename Acc, typename Src>
void scores(OuterPackets<NB>, const Acc* qpack, Index rows, const KVRows<Src>& k, Acc* st) {
  constexpr Index ld = NB * kLanes<Acc>, kChunk = 24;
  auto pf = PrefetchShare<Src>::ahead(k, k.count, k.count);
  EIGEN_ALIGN_MAX Acc tmp[kChunk * kMaxRows<Acc>];
  with_chunk_rows<Acc, Src>(true, kChunk, k.cols, [&](Index chunk, auto&& read) {
    for (Index j0 = 0; j0 < k.count; j0 += chunk) {
      const Index nn = std::min(chunk, k.count - j0);
      Acc* dst = ld == rows ? st + j0 * ld : tmp;
      scores_outer<NB>(Strided<const Acc>{qpack, kMaxRows<Acc>}, read(k.rows(j0, nn)), Strided<Acc>{dst, ld}, pf);
      if (ld != rows)
        for (Index j = 0; j < nn; ++j) std::copy_n(tmp + j * ld, rows, st + (j0 + j) * rows);
    }
  });
}

/// S^T [k.count, rows] (row stride rows) = K Q^T for `rows` queries packed by pack_queries<Acc, Src>, in the form
/// with_score_form picks for the row count.
template <typename Acc, typename Src>
void score_tile(const Acc* qpack, Index rows, const KVRows<Src>& k, Acc* st) {
  with_score_form<Acc>(rows, [&](auto form) { scores(form, qpack, rows, k, st); });
}

}  // namespace mk
}  // namespace detail
}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
