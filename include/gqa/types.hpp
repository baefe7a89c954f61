// gqa/types.hpp — the vocabulary types every gqa header shares.
//
// Offers:
//   gqa::Index, gqa::Dynamic          sizes, and the run-time counterpart of a compile-time size (as in Eigen)
//   gqa::Tensor4<T>, gqa::Tensor4Map<T>  row-major rank-4 Eigen tensors, the layout gqa expects
//   gqa::span<T>                       a non-owning (pointer, size) view; C++17 has no std::span
//   gqa::TensorRef<T>                  a non-owning strided rank-4 view with logical dims [B, S, heads, D]
//   gqa::make_ref(t), token_major(...) views of token-major memory [B, S, heads, D]
//   gqa::head_major(t), head_major(...) views of head-major memory [B, heads, S, D] (a KV cache): the layout is part
//                                      of the argument, so it cannot disagree with the data
//   gqa::bfloat16, gqa::half           Eigen's 16-bit storage types (arithmetic is always done in float)
//   std::int8_t                        a quantised KV cache only (gqa::KVCache<std::int8_t>: one float scale per
//                                      (token, head) row of D values, kept by the cache beside the data)
//
// Symbols (the GQA paper's): B batch, Sq/Sk query/key length, H query heads, G key/value heads, D head dim.
// All tensors are row-major (last index fastest), the memory order of PyTorch tensors and safetensors data.
#pragma once

#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/warnings.hpp"

// Eigen's own packet code warns the same way (gqa/detail/warnings.hpp); this covers it where gqa includes Eigen first.
GQA_DETAIL_WARNINGS_OFF
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>
GQA_DETAIL_WARNINGS_ON

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gqa/version.hpp"  // GQA_VERSION_MAJOR/MINOR/PATCH, which users have always got from here

namespace gqa {

using Index = std::ptrdiff_t;

/// Run-time size marker, like Eigen::Dynamic: `attention<Dynamic>` means "group size chosen at run time".
inline constexpr int Dynamic = -1;

using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

/// Row-major rank-4 tensor, e.g. Q `[B, Sq, H, D]`.
template <typename T>
using Tensor4 = Eigen::Tensor<T, 4, Eigen::RowMajor, Eigen::DenseIndex>;
/// Zero-copy view of a user's row-major rank-4 buffer.
template <typename T>
using Tensor4Map = Eigen::TensorMap<Eigen::Tensor<T, 4, Eigen::RowMajor, Eigen::DenseIndex>>;

/// True for the element types gqa stores: float, double, bfloat16 and half.
template <typename T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double> ||
    std::is_same_v<std::remove_const_t<T>, bfloat16> || std::is_same_v<std::remove_const_t<T>, half>;

/// True for the element types a KVCache stores: the storage types, and std::int8_t (quantised, with per-row scales;
/// attention reads int8 K/V only through the cache, which supplies the scales).
template <typename T>
inline constexpr bool is_kv_storage_type_v =
    is_storage_type_v<T> || std::is_same_v<std::remove_const_t<T>, std::int8_t>;

/// Arithmetic type for a storage type: double for double, float for everything else.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

/// A non-owning contiguous view (pointer, size). Converts implicitly from std::vector and std::array.
template <typename T>
class span {
 public:
  constexpr span() noexcept = default;
  constexpr span(T* data, Index size) noexcept : data_(data), size_(size) {}
  template <typename U, typename A,
            typename = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
  span(std::vector<U, A>& v) noexcept : data_(v.data()), size_(static_cast<Index>(v.size())) {}
  template <typename U, typename A,
            typename = std::enable_if_t<std::is_convertible_v<const U (*)[], T (*)[]>>>
  span(const std::vector<U, A>& v) noexcept : data_(v.data()), size_(static_cast<Index>(v.size())) {}
  template <typename U, std::size_t N, typename = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
  constexpr span(std::array<U, N>& a) noexcept : data_(a.data()), size_(static_cast<Index>(N)) {}
  template <typename U, std::size_t N,
            typename = std::enable_if_t<std::is_convertible_v<const U (*)[], T (*)[]>>>
  constexpr span(const std::array<U, N>& a) noexcept : data_(a.data()), size_(static_cast<Index>(N)) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr Index size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr T& operator[](Index i) const noexcept { return data_[i]; }
  constexpr T* begin() const noexcept { return data_; }
  constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
};

/// A non-owning strided rank-4 view. Logical dims are always [B, S, heads, D]; strides are in elements,
/// one per logical dim, and the last (D) stride must be 1. Token-major and head-major buffers, and slices of
/// larger buffers (a KV cache with spare capacity), are all described by choosing the strides.
template <typename T>
struct TensorRef {
  T* data = nullptr;
  std::array<Index, 4> dims{};     ///< [B, S, heads, D]
  std::array<Index, 4> strides{};  ///< elements to step one index along each logical dim

  Index batch() const noexcept { return dims[0]; }
  Index seq_len() const noexcept { return dims[1]; }
  Index heads() const noexcept { return dims[2]; }
  Index head_dim() const noexcept { return dims[3]; }

  /// Element (b, s, h, d).
  T& operator()(Index b, Index s, Index h, Index d) const noexcept {
    return data[b * strides[0] + s * strides[1] + h * strides[2] + d * strides[3]];
  }
  /// A const view of the same memory.
  operator TensorRef<const T>() const noexcept { return {data, dims, strides}; }
};

/// View of a contiguous row-major buffer laid out [B, S, heads, D].
template <typename T>
TensorRef<T> token_major(T* data, Index batch, Index seq_len, Index heads, Index head_dim) noexcept {
  return {data, {batch, seq_len, heads, head_dim}, {seq_len * heads * head_dim, heads * head_dim, head_dim, 1}};
}

/// View of a contiguous row-major buffer laid out [B, heads, S, D] (head-major); logical dims stay [B, S, heads, D].
template <typename T>
TensorRef<T> head_major(T* data, Index batch, Index heads, Index seq_len, Index head_dim) noexcept {
  return {data, {batch, seq_len, heads, head_dim}, {heads * seq_len * head_dim, head_dim, seq_len * head_dim, 1}};
}

namespace detail {
template <typename Derived>
using eigen_elem_t = std::remove_reference_t<decltype(*std::declval<Derived&>().data())>;

template <typename Derived>
void check_eigen_argument() {
  static_assert(Derived::NumDimensions == 4, "gqa: attention tensors must have rank 4");
  static_assert(static_cast<int>(Derived::Layout) == static_cast<int>(Eigen::RowMajor),
                "gqa: tensors must be row-major (Eigen::Tensor<T, 4, Eigen::RowMajor>, see gqa::Tensor4)");
  static_assert(is_storage_type_v<eigen_elem_t<Derived>>, "gqa: element type must be float, double, bfloat16 or half");
}
}  // namespace detail

/// View of a row-major Eigen tensor (Tensor or TensorMap, rank 4) whose dims are [B, S, heads, D]. This is how
/// every Eigen argument of gqa is read; head-major memory is passed through head_major() instead.
template <typename Derived>
TensorRef<detail::eigen_elem_t<Derived>> make_ref(Derived& t) {
  detail::check_eigen_argument<Derived>();
  const auto& d = t.dimensions();
  return token_major<detail::eigen_elem_t<Derived>>(t.data(), d[0], d[1], d[2], d[3]);
}

/// View of a row-major Eigen tensor whose dims are [B, heads, S, D] (head-major K/V, a KV cache's memory), with
/// logical dims [B, S, heads, D]: `gqa::attention(q, gqa::head_major(k), gqa::head_major(v), out)`. Temporaries
/// are refused (the view would dangle).
template <typename Derived, typename = std::enable_if_t<Derived::NumDimensions == 4>>
TensorRef<detail::eigen_elem_t<Derived>> head_major(Derived& t) {
  detail::check_eigen_argument<Derived>();
  const auto& d = t.dimensions();
  return head_major<detail::eigen_elem_t<Derived>>(t.data(), d[0], d[1], d[2], d[3]);
}
template <typename Derived, typename = std::enable_if_t<Derived::NumDimensions == 4>>
void head_major(const Derived&& t) = delete;

namespace detail {

template <typename T>
struct is_tensor_ref : std::false_type {};
template <typename T>
struct is_tensor_ref<TensorRef<T>> : std::true_type {};

/// A TensorRef for any accepted argument: TensorRefs (strides chosen by the caller, e.g. head_major()) pass
/// through; Eigen tensors are token-major views.
template <typename X>
auto as_ref(X& x) {
  if constexpr (is_tensor_ref<std::remove_const_t<X>>::value) {
    return TensorRef<std::remove_pointer_t<decltype(x.data)>>(x);
  } else {
    return make_ref(x);
  }
}

template <typename R>
using ref_elem_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<R>().data)>>;

}  // namespace detail

}  // namespace gqa
