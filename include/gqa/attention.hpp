// gqa/attention.hpp — multi-head, grouped-query and multi-query attention (MHA / GQA / MQA) on Eigen tensors.
//
//   Q   [B, Sq, H, D]   queries, H query heads
//   K,V [B, Sk, G, D]   keys and values, G key/value heads (G divides H); head-major memory [B, G, Sk, D] (a KV
//                       cache) is passed as gqa::head_major(k), gqa::head_major(v)
//   out [B, Sq, H, D]   a separate buffer, or q itself (see gqa/options.hpp)
//
// Query head j attends with KV head j / (H/G). G = H is MHA, G = 1 is MQA; both are the same kernel. The H/G query
// heads of a group are computed together against their shared K/V head, which is read in place and once per
// group: K/V are never copied or repeated into H heads. Masks, window, soft-cap, bias and their order are defined
// in gqa/options.hpp.
//
// Accepted tensors: gqa::Tensor4<T> (Eigen::Tensor<T, 4, Eigen::RowMajor>) and Eigen::TensorMap over a user's buffer
// (zero copy), always read as token-major [B, S, heads, D]; or gqa::TensorRef<T> for any strides (gqa::head_major,
// slices, KV caches with spare capacity), whose strides are honoured as given. Element types:
// float, double, gqa::bfloat16, gqa::half for Q/out and independently for K/V; arithmetic is in float (double if
// Q or K/V is double).
//
// Threads: OpenMP, options.num_threads (0 = omp_get_max_threads()); called inside a parallel region it runs
// single-threaded instead of nesting. The work split depends only on the shapes, so results are bitwise
// identical for every thread count.
//
// GroupSize: attention<4>(...) states H/G at compile time, like an Eigen fixed size, and is checked against the
// tensors. It does not specialise the kernels: decode's micro-kernels are already instantiated per row count
// (Sq * H/G, chosen once per key tile), which a fixed H/G would only repeat, and prefill's GEMM tiles do not
// depend on it beyond the tile's row count.
//
// Errors: gqa::shape_error / gqa::invalid_argument (see gqa/errors.hpp), thrown before anything is written.
#pragma once

#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/flash_fwd.hpp"
#include "gqa/detail/params.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <cstdint>
#include <type_traits>
#include <utility>

namespace gqa {
namespace detail {

/// q, k, v as const views, with the element-type rules every attention entry point shares (forward and backward).
template <typename T, typename KVT>
struct InputRefs {
  TensorRef<const T> q;
  TensorRef<const KVT> k, v;
};

template <typename Q, typename K, typename V>
auto input_refs(const Q& q, const K& k, const V& v) {
  const auto qr = as_ref(q);
  const auto kr = as_ref(k);
  const auto vr = as_ref(v);
  using T = ref_elem_t<decltype(qr)>;
  using KVT = ref_elem_t<decltype(kr)>;
  static_assert(!std::is_same_v<KVT, std::int8_t>,
                "gqa: int8 k/v need their per-row scales: attend to the gqa::KVCache<std::int8_t> that holds them");
  static_assert(is_storage_type_v<T> && is_storage_type_v<KVT>,
                "gqa: element types must be float, double, bfloat16 or half");
  static_assert(std::is_same_v<KVT, ref_elem_t<decltype(vr)>>, "gqa: k and v must have the same element type");
  return InputRefs<T, KVT>{TensorRef<const T>(qr), TensorRef<const KVT>(kr), TensorRef<const KVT>(vr)};
}

/// `x` as a view that gqa writes into, of element type `T`.
template <typename T, typename X>
auto output_ref(X& x) {
  auto r = as_ref(x);
  static_assert(std::is_same_v<T, ref_elem_t<decltype(r)>>,
                "gqa: out and d_q must have q's element type, d_k and d_v k's");
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(r.data)>>, "gqa: outputs must be writable");
  return r;
}

/// `x` as a view that gqa only reads, of element type `T` (the backward's out and d_out).
template <typename T, typename X>
TensorRef<const T> input_ref(const X& x) {
  const auto r = as_ref(x);
  static_assert(std::is_same_v<T, ref_elem_t<decltype(r)>>, "gqa: out and d_out must have q's element type");
  return TensorRef<const T>(r);
}

/// `scales`: the per-row scales of int8 K/V (a KVCache<std::int8_t>); null for the other storage types. `paged`: the
/// block tables of a paged K/V (gqa::PagedKVCache), k and v then viewing its pools (set_paged); null otherwise.
template <int GroupSize, typename T, typename KVT>
void attention_impl(TensorRef<const T> q, TensorRef<const KVT> k, TensorRef<const KVT> v, TensorRef<T> out,
                    const AttentionOptions& options, const KVScales* scales = nullptr,
                    const PagedKV* paged = nullptr) {
  static_assert(is_storage_type_v<T> && is_kv_storage_type_v<KVT>,
                "gqa: element types must be float, double, bfloat16 or half (int8 K/V through a KVCache)");
  static_assert(GroupSize == Dynamic || GroupSize >= 1, "gqa: GroupSize must be Dynamic or >= 1");
  auto p = make_params<T, KVT>(q, k, v, out, options, scales);
  if (paged) set_paged(p, *paged, out);
  if constexpr (GroupSize != Dynamic)
    require<shape_error>(p.group_size == GroupSize, "shape", "attention<", GroupSize, ">: group size H/G = ",
                         p.heads, "/", p.kv_heads, " = ", p.group_size, " but the template asks for ", GroupSize);
  flash_fwd(p);
}

}  // namespace detail

/// Attention of q against k/v into `out` (all shapes in the header comment). `GroupSize` = H/G may be fixed at
/// compile time, like an Eigen fixed size; it is then checked against the tensors. MHA: GroupSize 1.
template <int GroupSize = Dynamic, typename Q, typename K, typename V, typename O,
          typename = std::enable_if_t<!std::is_same_v<std::decay_t<O>, AttentionOptions>>>
void attention(const Q& q, const K& k, const V& v, O&& out, const AttentionOptions& options = {}) {
  const auto in = detail::input_refs(q, k, v);
  using T = detail::ref_elem_t<decltype(in.q)>;
  using KVT = detail::ref_elem_t<decltype(in.k)>;
  detail::attention_impl<GroupSize, T, KVT>(in.q, in.k, in.v, detail::output_ref<T>(out), options);
}

/// Attention returning a new tensor [B, Sq, H, D] of q's element type.
template <int GroupSize = Dynamic, typename Q, typename K, typename V>
auto attention(const Q& q, const K& k, const V& v, const AttentionOptions& options = {}) {
  auto qr = detail::as_ref(q);
  using T = detail::ref_elem_t<decltype(qr)>;
  Tensor4<T> out(qr.dims[0], qr.dims[1], qr.dims[2], qr.dims[3]);
  attention<GroupSize>(q, k, v, out, options);
  return out;
}

/// Multi-head attention: requires G == H (every query head has its own K/V head).
template <typename Q, typename K, typename V, typename O>
void mha(const Q& q, const K& k, const V& v, O&& out, const AttentionOptions& options = {}) {
  const auto qr = detail::as_ref(q);
  const auto kr = detail::as_ref(k);
  detail::require<shape_error>(kr.dims[2] == qr.dims[2], "shape", "mha: k dim 2 (kv_heads G) = ", kr.dims[2],
                               " but MHA needs G = q dim 2 (heads H) = ", qr.dims[2]);
  attention<1>(q, k, v, std::forward<O>(out), options);
}

/// Multi-query attention: requires G == 1 (all query heads share one K/V head).
template <typename Q, typename K, typename V, typename O>
void mqa(const Q& q, const K& k, const V& v, O&& out, const AttentionOptions& options = {}) {
  const auto kr = detail::as_ref(k);
  detail::require<shape_error>(kr.dims[2] == 1, "shape", "mqa: k dim 2 (kv_heads G) = ", kr.dims[2], " but MQA needs G = 1");
  attention(q, k, v, std::forward<O>(out), options);
}

}  // namespace gqa
