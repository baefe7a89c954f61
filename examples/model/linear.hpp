// examples/model/linear.hpp — the decoder's nn.Linear products with weights kept in their own width (float,
// bfloat16 or IEEE half), widened to float in registers: the matrix-vector product of decode and the
// matrix-matrix product of prefill. Used by examples/model/llama.hpp (Model::forward) and examples/uptrain.
//
// Offers (namespace llama):
//   WeightType              f32, bf16, f16: the element type a Linear's weight is stored in
//   Linear                  weight [rows, cols] = [out, in] of that type, optional float bias [rows]; non-owning
//   detail::linear(X, {...}) Y [S, rows] = X [S, cols] W^T + bias for a group of products sharing X
//   detail::gemv_rows()     y[r] = W[r] . x for rows [r0, r1) of one weight (one thread)
//   detail::widen_rows()    rows of a weight as float (prefill's panels, the embedding lookup)
//
// Arithmetic is float throughout: a 16-bit weight is widened exactly (every bf16 and half is a float), so a bf16
// checkpoint multiplied here gives the products of the same weights widened to float at load, up to summation
// order. The kernels are written three times: AVX-512 (16 floats a vector; bf16 by zero-extension and a shift,
// half by vcvtph2ps), AVX2 with FMA and F16C (8 a vector), and a portable scalar loop; the ISA is the compiler's
// target (-march), nothing is dispatched at run time.
//
// Determinism: every output element is one dot product whose order of operations depends only on cols, and
// prefill panels are fixed by the shapes; the threads only pick up whole rows or panels. So results are bitwise
// identical for any thread count.
#pragma once

#include "config.hpp"

#include <gqa/types.hpp>

#include <Eigen/Core>
#include <omp.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace llama {

using gqa::Index;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The element type of a Linear's weight.
enum class WeightType { f32, bf16, f16 };

inline const char* weight_type_name(WeightType t) {
  return t == WeightType::f32 ? "f32" : t == WeightType::bf16 ? "bf16" : "f16";
}
inline std::uint64_t weight_type_bytes(WeightType t) { return t == WeightType::f32 ? 4 : 2; }

/// One nn.Linear: weight [rows, cols] = [out, in] (row-major, of `type`: float, gqa::bfloat16 or gqa::half),
/// optional float bias [rows]. Non-owning.
struct Linear {
  const void* weight = nullptr;
  const float* bias = nullptr;
  Index rows = 0, cols = 0;
  WeightType type = WeightType::f32;

  /// The weight as a float matrix: only for float weights (tools that train them, examples/uptrain, load them so).
  Eigen::Map<const Matrix> w() const {
    check(type == WeightType::f32, "weights", "a float view of a ", weight_type_name(type),
          " weight [", rows, ", ", cols, "]: load the model with WeightType::f32");
    return {static_cast<const float*>(weight), rows, cols};
  }
  template <typename T>
  const T* as() const { return static_cast<const T*>(weight); }
  std::uint64_t bytes() const {
    return std::uint64_t(rows) * std::uint64_t(cols) * weight_type_bytes(type) + (bias ? 4 * std::uint64_t(rows) : 0);
  }
};

namespace detail {

// ------------------------------------------------------------------------------------- vectors of float
// One vector of float and loads that widen float, bf16 and half into it. kWidth 1 is the portable fallback.
#if defined(__AVX512F__)
inline constexpr Index kWidth = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const gqa::bfloat16* p) {  // a bf16 is the top half of a float
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline Vec vload(const gqa::half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(Vec v) {  // a fixed tree: 16 -> 8 -> 4 -> 2 -> 1
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline constexpr Index kWidth = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const gqa::bfloat16* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
inline Vec vload(const gqa::half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(Vec v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#else
inline constexpr Index kWidth = 1;
using Vec = float;
inline Vec vzero() { return 0.0f; }
template <typename T>
inline Vec vload(const T* p) { return float(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline void vstore(float* p, Vec v) { *p = v; }
inline float vsum(Vec v) { return v; }
#endif

/// dst[0, n) = src[0, n) as float.
template <typename T>
void widen(const T* src, Index n, float* dst) {
  Index i = 0;
  if (kWidth > 1)
    for (; i + kWidth <= n; i += kWidth) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = float(src[i]);
}

/// W[r] . x for each row of w [rows, cols], one row after the other: two accumulator chains over blocks of
/// 2 * kWidth columns, one more block of kWidth, then the scalar tail. Rows are not interleaved: on the Zen 4 of
/// bench/README.md (1 thread, a 49152 x 576 bf16 weight, 57 MB) reading 2, 4 or 8 rows at once ran at 8-9 GB/s
/// against 19 GB/s for one row at a time (the rows are one contiguous stream then, which the prefetchers follow),
/// the rate of a plain sum over the same bytes.
template <typename T>
void gemv_rows_typed(const T* w, Index cols, const float* x, Index rows, float* y) {
  for (Index r = 0; r < rows; ++r, w += cols) {
    Vec a0 = vzero(), a1 = vzero();
    Index c = 0;
    for (; c + 2 * kWidth <= cols; c += 2 * kWidth) {
      a0 = vfma(vload(w + c), vload(x + c), a0);
      a1 = vfma(vload(w + c + kWidth), vload(x + c + kWidth), a1);
    }
    if (c + kWidth <= cols) {
      a0 = vfma(vload(w + c), vload(x + c), a0);
      c += kWidth;
    }
    float sum = vsum(a0) + vsum(a1);
    for (; c < cols; ++c) sum += float(w[c]) * x[c];
    y[r] = sum;
  }
}

/// y[0, r1 - r0) = rows [r0, r1) of L's weight times x [cols] (no bias), on the calling thread.
inline void gemv_rows(const Linear& L, const float* x, Index r0, Index r1, float* y) {
  assert(0 <= r0 && r0 <= r1 && r1 <= L.rows);
  switch (L.type) {
    case WeightType::f32: return gemv_rows_typed(L.as<float>() + r0 * L.cols, L.cols, x, r1 - r0, y);
    case WeightType::bf16: return gemv_rows_typed(L.as<gqa::bfloat16>() + r0 * L.cols, L.cols, x, r1 - r0, y);
    case WeightType::f16: return gemv_rows_typed(L.as<gqa::half>() + r0 * L.cols, L.cols, x, r1 - r0, y);
  }
}

/// Rows [r0, r1) of L's weight as float into out [(r1 - r0) * cols].
inline void widen_rows(const Linear& L, Index r0, Index r1, float* out) {
  const Index n = (r1 - r0) * L.cols, first = r0 * L.cols;
  switch (L.type) {
    case WeightType::f32: std::memcpy(out, L.as<float>() + first, sizeof(float) * size_t(n)); return;
    case WeightType::bf16: return widen(L.as<gqa::bfloat16>() + first, n, out);
    case WeightType::f16: return widen(L.as<gqa::half>() + first, n, out);
  }
}

/// One product Y [S, rows] = X [S, cols] W^T + bias of a group that shares X.
struct Product {
  const Linear& L;
  Matrix& Y;
};

/// Rows of a prefill panel: ~1/16 of the group's rows (so 2, 4 or 8 threads get even shares of whole panels), in
/// multiples of 16, between 32 and 256 (a 256-row panel of a 1536-column weight is 1.5 MB as float, an L2's worth
/// on the Zen 4 of bench/README.md). A function of the shapes only: the panels, and so the bits, do not depend on
/// the thread count.
inline Index panel_rows(Index total_rows) { return std::clamp<Index>((total_rows / 16 + 15) / 16 * 16, 32, 256); }

/// Decode (one row of X): the group's rows, concatenated, split evenly across the threads; each streams its own
/// share of the weights once (the product is memory-bound). One parallel region per group rather than per matrix:
/// each region ends in a barrier, which costs far more than its microseconds when the cores are shared and a
/// thread is descheduled. Below 64K weights (L2-resident) the fork-join costs more than it saves.
inline void linear_decode(const Matrix& X, std::initializer_list<Product> group, Index total, Index weights) {
#pragma omp parallel if (weights >= (Index(1) << 16))
  {
    const Index threads = omp_get_num_threads(), t = omp_get_thread_num();
    const Index per = ((total + threads - 1) / threads + 15) / 16 * 16;  // whole cache lines of y per thread
    const Index begin = std::min(total, t * per), end = std::min(total, begin + per);
    Index offset = 0;  // of the current matrix in the concatenated rows
    for (const Product& p : group) {
      const Index r0 = std::max<Index>(begin - offset, 0), r1 = std::min(end - offset, p.L.rows);
      if (r1 > r0) gemv_rows(p.L, X.data(), r0, r1, p.Y.data() + r0);
      offset += p.L.rows;
    }
  }
}

/// Prefill (S > 1 rows of X): the group's rows in panels (panel_rows), the panels shared out across the threads;
/// each thread widens its panel of a 16-bit weight into a float block it reuses (float weights are read in place)
/// and runs Eigen's single-threaded GEMM (Eigen does not thread inside a parallel region) on X and that block. A
/// weight is so widened once per chunk of S tokens, 1 conversion per 2 * S flops.
inline void linear_prefill(const Matrix& X, std::initializer_list<Product> group, Index total) {
  const Index P = panel_rows(total), cols = X.cols();
  std::vector<std::pair<const Product*, Index>> panels;  // (product, first row)
  for (const Product& p : group)
    for (Index r = 0; r < p.L.rows; r += P) panels.emplace_back(&p, r);
#pragma omp parallel
  {
    std::vector<float> block;
#pragma omp for schedule(static)
    for (Index i = 0; i < Index(panels.size()); ++i) {
      const Product& p = *panels[size_t(i)].first;
      const Index r0 = panels[size_t(i)].second, n = std::min(P, p.L.rows - r0);
      const float* w = nullptr;
      if (p.L.type == WeightType::f32) {
        w = p.L.as<float>() + r0 * cols;
      } else {
        block.resize(size_t(P * cols));
        widen_rows(p.L, r0, r0 + n, block.data());
        w = block.data();
      }
      p.Y.middleCols(r0, n).noalias() = X * Eigen::Map<const Matrix>(w, n, cols).transpose();
    }
  }
}

/// Y = X W^T + bias for each product of the group (all with cols = X.cols()).
inline void linear(const Matrix& X, std::initializer_list<Product> group) {
  Index total = 0, weights = 0;
  for (const Product& p : group) {
    assert(p.L.cols == X.cols());
    p.Y.resize(X.rows(), p.L.rows);
    total += p.L.rows;
    weights += p.L.rows * p.L.cols;
  }
  if (X.rows() == 1) linear_decode(X, group, total, weights);
  else linear_prefill(X, group, total);
  for (const Product& p : group)
    if (p.L.bias) p.Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(p.L.bias, p.L.rows);
}

}  // namespace detail
}  // namespace llama
