// gqa/detail/kv_rows.hpp — how a KV cache turns appended rows into stored ones, shared by gqa::KVCache and
// gqa::PagedKVCache: conversion to the element type (float, double, bfloat16, half) or symmetric int8 quantisation
// with one float scale per row, the check that a value can be stored as given (run before anything is written),
// the error naming the offending value, and the huge-page advice for the storage the decode kernels stream.
//
// The rules (what a cache refuses and why) are stated once, in gqa/kv_cache.hpp's header comment.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/microkernels.hpp"
#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gqa {
namespace detail {

/// Asks Linux for transparent huge pages (2 MiB) over the whole 2 MiB pages inside [p, p + bytes), before they are
/// first touched; elsewhere, or where THP is off ("never"), nothing. Decode streams the whole cache once per token,
/// and with 4 KiB pages that is a TLB miss (and a page walk) every 4 KiB. Measured on the 2-core Xeon of
/// bench/README.md, bf16, H = 32, G = 32, S = 16384, 1 thread, small and huge pages interleaved in one process,
/// medians of 5 at load ~1: decode 26.5 -> 24.8 ms per token, the stream read of the same cache 20.8 -> 18.5 ms; at
/// load ~7 (CPU time) G = 32 43 -> 29 ms, G = 8 14.0 -> 8.0 ms. With THP "always" the kernel does this anyway; with
/// "madvise" (that machine's setting) only memory advised so gets huge pages. A failed madvise only leaves the small
/// pages.
inline void advise_huge_pages(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  const std::uintptr_t lo = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t hi = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

/// Where an appended row goes, for the error that names it: batch row b of the new tokens, new token s, KV head g,
/// and the cache position the token would take.
struct AppendSite {
  Index b, s, g, position;
};

/// Rows of D values stored as T (std::int8_t: quantised, one float scale per row).
template <typename T>
struct KVRowCodec {
  static constexpr bool kQuantized = std::is_same_v<T, std::int8_t>;
  /// int8, half and bfloat16 caches store finite values only.
  static constexpr bool kFiniteOnly = kQuantized || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;
  /// Values are converted through float (store, quantize); a float of magnitude at or above this rounds to inf in
  /// T: halfway between T's largest finite value and the next power of two, which ties-to-even rounds up. int8's
  /// float scales take any finite float.
  static constexpr float kLimit = std::is_same_v<T, half>       ? 65520.0f     // 65504 = 0x1.ffcp15
                                  : std::is_same_v<T, bfloat16> ? 0x1.ffp127f  // 0x1.fep127
                                                                : std::numeric_limits<float>::infinity();

  static constexpr const char* type_name() noexcept {
    return kQuantized ? "int8" : std::is_same_v<T, half> ? "half" : std::is_same_v<T, bfloat16> ? "bfloat16"
                                                          : std::is_same_v<T, float> ? "float" : "double";
  }

  template <typename Src>
  static float to_float(Src x) noexcept {
    return mk::widen<float>(std::remove_const_t<Src>(x));
  }

  template <typename S>
  static double as_double(S x) noexcept {
    if constexpr (std::is_same_v<S, double>) return x;
    else return double(to_float(x));
  }

  /// n values of src into dst, rounded to T once (not for int8: quantize).
  template <typename Src>
  static void store(T* dst, const Src* src, Index n) {
    using S = std::remove_const_t<Src>;
    if constexpr (std::is_same_v<T, half> && std::is_same_v<S, float>) {
      mk::narrow_to_half(src, dst, n);  // F16C where available (Eigen's cast is scalar under GCC)
    } else if constexpr (std::is_same_v<T, half>) {
      for (Index i = 0; i < n; ++i) dst[i] = mk::narrow_to_half(float(src[i]));
    } else {
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(dst, n) =
          Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(src, n).template cast<T>();
    }
  }

  /// Quantises n values of src into dst and returns the scale: scale = max |x| / 127, q = x / scale rounded to
  /// nearest (ties to even), in [-127, 127]; an all-zero row has scale 0 and q = 0. The caller has checked that the
  /// values are finite.
  template <typename Src>
  static float quantize(std::int8_t* dst, const Src* src, Index n) {
    float max_abs = 0;
    for (Index i = 0; i < n; ++i) max_abs = std::max(max_abs, std::abs(to_float(src[i])));
    if (max_abs == 0) {
      std::fill_n(dst, n, std::int8_t(0));
      return 0.0f;
    }
    const float scale = max_abs / 127.0f, inv = 127.0f / max_abs;
    for (Index i = 0; i < n; ++i) {
      // Round to nearest, ties to even (the default rounding mode); |x| * inv <= 127 up to one rounding, clamped.
      const float r = std::nearbyint(to_float(src[i]) * inv);
      dst[i] = std::int8_t(std::clamp(r, -127.0f, 127.0f));
    }
    return scale;
  }

  /// Whether x is stored up to rounding: finite and within range in an int8, half or bfloat16 cache; in a float
  /// cache, anything but a finite double that overflows float (NaN and inf are kept as given, as in any float
  /// tensor); in a double cache, anything.
  template <typename S>
  static bool storable(S x) noexcept {
    if constexpr (std::is_same_v<T, double>) {
      return true;
    } else {
      const float f = to_float(x);
      if constexpr (kFiniteOnly)
        return std::abs(f) < kLimit;  // false for NaN
      else
        return std::isfinite(f) || !std::isfinite(as_double(x));
    }
  }

  /// storable() for all n values; float rows (the usual append) in a branch-free loop the compiler vectorises.
  template <typename S>
  static bool row_storable(const S* row, Index n) noexcept {
    if constexpr (std::is_same_v<S, float> && kFiniteOnly) {
      int bad = 0;
      for (Index d = 0; d < n; ++d) bad |= !(std::abs(row[d]) < kLimit);  // true for NaN
      return bad == 0;
    } else {
      for (Index d = 0; d < n; ++d)
        if (!storable(row[d])) return false;
      return true;
    }
  }

  /// Whether rows of element type S can fail storable() at all (float from float, half or bfloat16 cannot).
  template <typename S>
  static constexpr bool may_refuse() {
    return kFiniteOnly || (std::is_same_v<T, float> && std::is_same_v<S, double>);
  }

  /// Throws for value x at d of the row at `site` of `name` (e.g. "k_new"), appended by `caller` (e.g.
  /// "KVCache<half>::append"): kv_cache_nonfinite for NaN and inf, else kv_cache_range.
  static void refuse(const std::string& caller, const char* name, const AppendSite& site, Index d,
                                  double x) {
    using Limit = std::conditional_t<kQuantized, float, T>;  // int8 rows keep float scales
    const std::string where = concat(caller, ": ", name, "[", site.b, ", ", site.s, ", ", site.g, ", ", d,
                                     "] (sequence ", site.b, ", new token ", site.s, ", KV head ", site.g,
                                     ", cache position ", site.position, ") = ", x);
    require(std::isfinite(x), "kv_cache_nonfinite", where, "; ", kQuantized ? "an " : "a ", type_name(),
            " cache stores finite values only (nothing was appended)");
    require(false, "kv_cache_range", where, " is beyond the range of ", kQuantized ? "the float scales" : type_name(),
            " (largest finite value ", double(std::numeric_limits<Limit>::max()),
            "): it would be stored as inf (nothing was appended)");
  }

  /// Refuses, before anything is written, a value among the new tokens r [n, S_new, G, D] (row b contributes its
  /// first counts[b] tokens) that storable() rejects, naming it; position(b) is the cache position of row b's first
  /// new token.
  template <typename R, typename Position>
  static void check_storable(const std::string& caller, const char* name, const R& r, span<const std::int32_t> counts,
                             Position&& position) {
    using S = std::remove_const_t<ref_elem_t<R>>;
    if constexpr (may_refuse<S>()) {
      const Index G = r.dims[2], D = r.dims[3];
      for (Index b = 0; b < counts.size(); ++b)
        for (Index s = 0; s < counts[b]; ++s)
          for (Index g = 0; g < G; ++g) {
            const S* row = &r(b, s, g, 0);
            if (row_storable(row, D)) continue;
            for (Index d = 0; d < D; ++d)
              if (!storable(row[d])) refuse(caller, name, {b, s, g, Index(position(b)) + s}, d, as_double(row[d]));
          }
    } else {
      (void)caller, (void)name, (void)r, (void)counts, (void)position;
    }
  }

  /// Writes one row of D values: stored (or quantised, returning its scale; 0 for the other types).
  template <typename Src>
  static float write_row(T* dst, const Src* src, Index D) {
    if constexpr (kQuantized) {
      return quantize(dst, src, D);
    } else {
      store(dst, src, D);
      return 0.0f;
    }
  }
};

}  // namespace detail
}  // namespace gqa
