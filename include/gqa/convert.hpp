// gqa/convert.hpp — converting multi-head K/V projections to grouped-query (GQA) or multi-query (MQA) ones, as in
// the GQA paper (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
// Checkpoints", section 2.1), and the exact way back. Independent of the attention kernels.
//
// WHAT IS POOLED. A K (or V) projection with H heads of dimension D is turned into one with G heads: the heads are
// split into G groups of H/G and each group's heads are replaced by one head. Group g holds the adjacent heads
// g*(H/G) .. (g+1)*(H/G)-1, so query head j, which used KV head j, now uses KV head j / (H/G): exactly the grouping
// rule of gqa::attention and of Hugging Face's repeat_kv. Methods (PoolMethod), the paper's ablation:
//   mean    the element-wise mean of the group's heads (the paper's method, the default)
//   first   the group's first (lowest-numbered) head
//   random  fresh weights drawn from N(0, sigma^2), sigma = the population standard deviation of the whole input
//           tensor (all heads); std::mt19937_64 seeded with options.seed feeds a Box-Muller transform, output
//           elements in row-major order. Deterministic: the same seed gives the same weights (bitwise on the same
//           platform; across platforms up to the last bit of libm's log/cos/sin).
//   fit     function-aware and data-free: reads the whole layer (q, k, v, o) and also rewrites q and o; only through
//           pool_attention() (see "WHAT FIT KEEPS" below).
//   auto    (PoolMethod::automatic) the best data-free method for the layer: fit without rotary embedding (BERT
//           family), mean with it (Llama family), as measured on real checkpoints (best_data_free_method()).
// Pooling also takes a G1-head GQA projection to G2 heads (G2 divides G1; G2 = 1 is MQA), and biases [H*D] the
// same way as weights. expand_heads() is the reverse: each of G heads repeated H/G times (repeat_interleave order),
// which is exact, so pool(expand(w)) == w bit for bit, and a GQA checkpoint runs on an MHA-only runtime.
//
// LAYOUTS (WeightLayout). A head is a block of D consecutive output features:
//   linear        [H*D, hidden]  nn.Linear weight (out_features, in_features): head h is rows h*D .. h*D+D-1.
//                                Hugging Face's q/k/v_proj. A bias [H*D] is this layout with hidden = 1.
//   hidden_first  [hidden, H, D] y[h, d] = sum_i x[i] W[i, h, d] (einsum "bsm,mhd->bshd"), the layout of gqa's
//                                seeds; also nn.Linear's o_proj weight [hidden, H*D], whose input features are heads.
// Hugging Face permutes q/k rows inside each head for its rotary embedding; pooling whole heads commutes with that
// permutation, so checkpoints are pooled as stored.
//
// EXPLICIT GROUPING. ConvertOptions::assignment gives the group of every input head (size H, values 0 .. G-1, each
// group exactly H/G heads). If it is not the adjacent grouping, the pooled KV head g serves the query heads of the
// heads assigned to g; for a model to keep computing the same function with the standard grouping rule, its query
// heads must be reordered so that those heads become adjacent. query_head_order() gives that order and
// permute_heads() applies it: to the Q projection's rows (and bias), layout linear, and to the O projection's input
// columns, layout hidden_first for nn.Linear's o_proj [hidden, H*D]. The result computes exactly what the original
// model with the same (non-adjacent) head-to-group assignment computes.
//
// NUMERICS. Element types float, double, gqa::bfloat16, gqa::half; arithmetic in float (double for double), the
// result rounded once to the element type. The mean is taken as x0 + sum_k (x_k - x0) / n (x0 the group's first
// head), so a group of identical heads — G = H, or an expanded projection — pools back to its input bit for bit.
//
// ERRORS: gqa::shape_error for sizes that disagree (H % G != 0, a buffer that is not heads*head_dim*hidden), and
// gqa::invalid_argument for a bad assignment or order; each message names the argument and the values.
#pragma once

#include "gqa/errors.hpp"
#include "gqa/types.hpp"
#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/warnings.hpp"

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

GQA_DETAIL_WARNINGS_OFF
namespace gqa {

/// How a group of heads becomes one head (see the header comment). `fit` reads the whole layer, so it works only
/// through pool_attention(); mean, first and random pool one tensor at a time (pool_heads) or a layer. `automatic`
/// ("auto") is the best data-free method for the layer: best_data_free_method() says which, and why.
enum class PoolMethod { mean, first, random, fit, automatic };

/// "mean", "first", "random", "fit", "auto".
inline const char* to_string(PoolMethod m) noexcept {
  switch (m) {
    case PoolMethod::mean: return "mean";
    case PoolMethod::first: return "first";
    case PoolMethod::random: return "random";
    case PoolMethod::fit: return "fit";
    case PoolMethod::automatic: return "auto";
  }
  return "?";
}

/// The method called `name` ("auto" is PoolMethod::automatic), or nullopt.
inline std::optional<PoolMethod> parse_pool_method(std::string_view name) noexcept {
  if (name == "mean") return PoolMethod::mean;
  if (name == "first") return PoolMethod::first;
  if (name == "random") return PoolMethod::random;
  if (name == "fit") return PoolMethod::fit;
  if (name == "auto") return PoolMethod::automatic;
  return std::nullopt;
}

/// True for the methods that read the whole layer (q, k, v, o and their biases) and rewrite q and o too, so they
/// need pool_attention() (or a checkpoint plan that hands them the layer).
inline bool reads_layer(PoolMethod m) noexcept { return m == PoolMethod::fit || m == PoolMethod::automatic; }

/// Where the heads are in a projection weight (see the header comment).
enum class WeightLayout {
  linear,        ///< [heads*D, hidden]: nn.Linear q/k/v_proj weight; a bias [heads*D] with hidden = 1
  hidden_first,  ///< [hidden, heads, D]: gqa's seed layout; nn.Linear o_proj weight [hidden, heads*D]
};

/// The shape of one projection weight (or bias) as heads x head_dim x hidden in a layout.
struct ProjectionShape {
  WeightLayout layout = WeightLayout::linear;
  Index heads = 0;     ///< heads in this tensor: H for an MHA projection, G for a GQA one
  Index head_dim = 0;  ///< D
  Index hidden = 1;    ///< the other dimension (model width); 1 for a bias

  /// Elements: heads * head_dim * hidden.
  Index size() const noexcept { return heads * head_dim * hidden; }
  /// The same projection with `n` heads.
  ProjectionShape with_heads(Index n) const noexcept { return {layout, n, head_dim, hidden}; }
  /// A bias [heads*D].
  static ProjectionShape bias(Index heads, Index head_dim) noexcept {
    return {WeightLayout::linear, heads, head_dim, 1};
  }
};

/// Options of pool_heads().
struct ConvertOptions {
  PoolMethod method = PoolMethod::mean;
  /// Seed of PoolMethod::random (ignored otherwise).
  std::uint64_t seed = 0;
  /// Group of each input head (size = input heads, values 0 .. G-1, H/G heads per group); empty = adjacent groups.
  std::vector<Index> assignment;
};

namespace detail {

/// A projection seen as [outer, heads, inner]: linear is [1, heads, D*hidden], hidden_first [hidden, heads, D].
struct HeadBlocks {
  Index outer, heads, inner;
};

inline HeadBlocks head_blocks(const ProjectionShape& s) noexcept {
  if (s.layout == WeightLayout::linear) return {1, s.heads, s.head_dim * s.hidden};
  return {s.hidden, s.heads, s.head_dim};
}

inline const char* layout_name(WeightLayout l) noexcept {
  return l == WeightLayout::linear ? "linear [heads*D, hidden]" : "hidden_first [hidden, heads, D]";
}

inline void check_shape(const ProjectionShape& s, const char* fn, const char* arg) {
  require<shape_error>(s.heads > 0 && s.head_dim > 0 && s.hidden > 0, "shape", fn, ": ", arg, " (heads ", s.heads,
                       ", head_dim ", s.head_dim, ", hidden ", s.hidden, ") must all be positive");
}

inline void check_size(Index size, const ProjectionShape& s, const char* fn, const char* arg) {
  require<shape_error>(size == s.size(), "shape", fn, ": ", arg, ".size() = ", size, " but ", layout_name(s.layout),
                       " with heads ", s.heads, ", head_dim D ", s.head_dim, ", hidden ", s.hidden, " needs ",
                       s.size());
}

/// Standard normal numbers from a mt19937_64 (Box-Muller), the same on every standard library.
class NormalStream {
 public:
  explicit NormalStream(std::uint64_t seed) : engine_(seed) {}
  double next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double two_pi = 6.283185307179586476925286766559;
    const double u1 = (static_cast<double>(engine_() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]: log is finite
    const double u2 = static_cast<double>(engine_() >> 11) * 0x1.0p-53;          // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(two_pi * u2);
    has_spare_ = true;
    return r * std::cos(two_pi * u2);
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

/// Population standard deviation of `in`, in double (two passes).
template <typename T>
double standard_deviation(const T* in, Index n) {
  if (n == 0) return 0.0;
  double mean = 0.0;
  for (Index i = 0; i < n; ++i) mean += static_cast<double>(in[i]);
  mean /= static_cast<double>(n);
  double ss = 0.0;
  for (Index i = 0; i < n; ++i) {
    const double d = static_cast<double>(in[i]) - mean;
    ss += d * d;
  }
  return std::sqrt(ss / static_cast<double>(n));
}

}  // namespace detail

/// The heads of each of the `kv_heads` (G) groups, ascending: validated from `assignment` (group of each head), or
/// the adjacent grouping if it is empty. Throws shape_error if kv_heads does not divide heads, invalid_argument if the
/// assignment is not a partition of the heads into kv_heads groups of group_size = heads / kv_heads.
inline std::vector<std::vector<Index>> group_members(Index heads, Index kv_heads, span<const Index> assignment = {}) {
  using detail::require;
  require<shape_error>(heads > 0 && kv_heads > 0, "shape", "groups: heads H = ", heads, " and kv_heads G = ",
                       kv_heads, " must be positive");
  require<shape_error>(heads % kv_heads == 0, "shape", "groups: kv_heads G = ", kv_heads,
                       " does not divide heads H = ", heads, " (H % G = ", heads % kv_heads, ")");
  const Index group_size = heads / kv_heads;
  std::vector<std::vector<Index>> members(static_cast<std::size_t>(kv_heads));
  if (assignment.empty()) {
    for (Index h = 0; h < heads; ++h) members[static_cast<std::size_t>(h / group_size)].push_back(h);
    return members;
  }
  require(assignment.size() == heads, "convert.assignment", "options.assignment: size = ", assignment.size(),
          " but there are H = ", heads, " heads (one group per head)");
  for (Index h = 0; h < heads; ++h) {
    const Index g = assignment[h];
    require(g >= 0 && g < kv_heads, "convert.assignment", "options.assignment[", h, "] = ", g,
            " is not a group in 0 .. G-1 = ", kv_heads - 1);
    members[static_cast<std::size_t>(g)].push_back(h);
  }
  for (Index g = 0; g < kv_heads; ++g)
    require(static_cast<Index>(members[static_cast<std::size_t>(g)].size()) == group_size, "convert.assignment",
            "options.assignment: group ", g, " has ", members[static_cast<std::size_t>(g)].size(),
            " heads but a partition into G = ", kv_heads, " equal groups needs H/G = ", group_size);
  return members;
}

/// True if `assignment` is empty or the adjacent grouping of its heads into `kv_heads` groups (head h in group
/// h / group_size).
inline bool is_adjacent(span<const Index> assignment, Index kv_heads) {
  if (assignment.empty()) return true;
  if (kv_heads <= 0 || assignment.size() % kv_heads != 0) return false;
  const Index group_size = assignment.size() / kv_heads;
  for (Index h = 0; h < assignment.size(); ++h)
    if (assignment[h] != h / group_size) return false;
  return true;
}

/// The query-head order that makes an assignment of `assignment.size()` KV heads to `kv_heads` groups adjacent:
/// new query head j is old query head order[j]. query_heads must be a multiple of the KV heads (r = query_heads /
/// assignment.size() query heads per input KV head, which move together). For an MHA input (r = 1) this lists the
/// heads of group 0, then group 1, ... Apply it with permute_heads() to the Q rows and O columns.
inline std::vector<Index> query_head_order(Index query_heads, Index kv_heads, span<const Index> assignment) {
  const Index kv = assignment.size();
  detail::require<shape_error>(kv > 0 && query_heads > 0 && query_heads % kv == 0, "shape",
                               "query_head_order: query heads H = ", query_heads,
                               " is not a positive multiple of assignment.size() = ", kv);
  const auto members = group_members(kv, kv_heads, assignment);
  const Index r = query_heads / kv;
  std::vector<Index> order;
  order.reserve(static_cast<std::size_t>(query_heads));
  for (const auto& group : members)
    for (Index k : group)
      for (Index t = 0; t < r; ++t) order.push_back(k * r + t);
  return order;
}

/// Pools the `in_shape.heads` heads of `in` into `kv_heads` (G) heads, written to `out`
/// (in_shape.with_heads(kv_heads)).
template <typename T>
void pool_heads(span<const T> in, const ProjectionShape& in_shape, Index kv_heads, span<T> out,
                const ConvertOptions& options = {}) {
  static_assert(is_storage_type_v<T>, "gqa: element type must be float, double, bfloat16 or half");
  detail::check_shape(in_shape, "pool_heads", "in_shape");
  const auto members = group_members(in_shape.heads, kv_heads, options.assignment);
  detail::check_size(in.size(), in_shape, "pool_heads", "in");
  detail::check_size(out.size(), in_shape.with_heads(kv_heads), "pool_heads", "out");
  const auto b = detail::head_blocks(in_shape);
  const T* src = in.data();
  T* dst = out.data();
  switch (options.method) {
    case PoolMethod::mean: {
      using A = compute_t<T>;
      std::vector<A> acc(static_cast<std::size_t>(b.inner));
      for (Index o = 0; o < b.outer; ++o) {
        for (Index g = 0; g < kv_heads; ++g) {
          const auto& heads = members[static_cast<std::size_t>(g)];
          const T* x0 = src + (o * b.heads + heads[0]) * b.inner;
          std::fill(acc.begin(), acc.end(), A(0));
          for (std::size_t m = 1; m < heads.size(); ++m) {
            const T* x = src + (o * b.heads + heads[m]) * b.inner;
            for (Index i = 0; i < b.inner; ++i) acc[i] += static_cast<A>(x[i]) - static_cast<A>(x0[i]);
          }
          const A n = static_cast<A>(heads.size());
          T* y = dst + (o * kv_heads + g) * b.inner;
          for (Index i = 0; i < b.inner; ++i) y[i] = static_cast<T>(static_cast<A>(x0[i]) + acc[i] / n);
        }
      }
      break;
    }
    case PoolMethod::first:
      for (Index o = 0; o < b.outer; ++o)
        for (Index g = 0; g < kv_heads; ++g) {
          const T* x0 = src + (o * b.heads + members[static_cast<std::size_t>(g)][0]) * b.inner;
          std::copy(x0, x0 + b.inner, dst + (o * kv_heads + g) * b.inner);
        }
      break;
    case PoolMethod::random: {
      const double sigma = detail::standard_deviation(src, in.size());
      detail::NormalStream normal(options.seed);
      for (Index i = 0; i < out.size(); ++i) dst[i] = static_cast<T>(static_cast<compute_t<T>>(sigma * normal.next()));
      break;
    }
    case PoolMethod::fit:
    case PoolMethod::automatic:
      detail::require(false, "convert.method", "pool_heads: options.method = ", to_string(options.method),
                      " reads the layer's q and o projections too; call pool_attention() with the whole layer");
      break;
    default:
      detail::require(false, "convert.method", "options.method = ", static_cast<int>(options.method),
                      " is not a PoolMethod");
  }
}

/// Expands `in` (in_shape.heads = G heads) to `heads` heads by repeating each head heads/G times (repeat_interleave:
/// output head j is input head j / (heads/G)), written to `out` (in_shape.with_heads(heads)). Exact.
template <typename T>
void expand_heads(span<const T> in, const ProjectionShape& in_shape, Index heads, span<T> out) {
  detail::check_shape(in_shape, "expand_heads", "in_shape");
  detail::require<shape_error>(heads > 0 && heads % in_shape.heads == 0, "shape", "expand_heads: heads H = ", heads,
                               " is not a positive multiple of in_shape.heads G = ", in_shape.heads);
  detail::check_size(in.size(), in_shape, "expand_heads", "in");
  detail::check_size(out.size(), in_shape.with_heads(heads), "expand_heads", "out");
  const auto b = detail::head_blocks(in_shape);
  const Index r = heads / in_shape.heads;
  for (Index o = 0; o < b.outer; ++o)
    for (Index j = 0; j < heads; ++j) {
      const T* x = in.data() + (o * b.heads + j / r) * b.inner;
      std::copy(x, x + b.inner, out.data() + (o * heads + j) * b.inner);
    }
}

/// Reorders heads: output head j is input head order[j]. `order` must be a permutation of 0 .. shape.heads-1.
template <typename T>
void permute_heads(span<const T> in, const ProjectionShape& shape, span<const Index> order, span<T> out) {
  detail::check_shape(shape, "permute_heads", "shape");
  detail::check_size(in.size(), shape, "permute_heads", "in");
  detail::check_size(out.size(), shape, "permute_heads", "out");
  detail::require(order.size() == shape.heads, "convert.order", "permute_heads: order.size() = ", order.size(),
                  " but shape.heads = ", shape.heads);
  std::vector<char> seen(static_cast<std::size_t>(shape.heads), 0);
  for (Index j = 0; j < order.size(); ++j) {
    detail::require(order[j] >= 0 && order[j] < shape.heads && !seen[static_cast<std::size_t>(order[j])],
                    "convert.order", "permute_heads: order[", j, "] = ", order[j],
                    " repeats a head or is outside 0 .. ", shape.heads - 1, " (order must be a permutation)");
    seen[static_cast<std::size_t>(order[j])] = 1;
  }
  const auto b = detail::head_blocks(shape);
  for (Index o = 0; o < b.outer; ++o)
    for (Index j = 0; j < b.heads; ++j) {
      const T* x = in.data() + (o * b.heads + order[j]) * b.inner;
      std::copy(x, x + b.inner, out.data() + (o * b.heads + j) * b.inner);
    }
}

// ---- Eigen tensor overloads -----------------------------------------------------------------------------------
// Rank 1 (bias [H*D]) and rank 2 ([H*D, hidden] linear, or [hidden, H*D] with WeightLayout::hidden_first) need the
// head count; rank 3 ([hidden, H, D]) carries it. Tensors must be row-major; Tensor and TensorMap both work. The
// result is a new row-major Eigen::Tensor of the same rank.

/// Row-major Eigen tensor of any rank (gqa::Tensor4<T> is RowMajorTensor<T, 4>).
template <typename T, int Rank>
using RowMajorTensor = Eigen::Tensor<T, Rank, Eigen::RowMajor, Eigen::DenseIndex>;

namespace detail {

template <typename X, typename = void>
struct is_eigen_tensor : std::false_type {};
template <typename X>
struct is_eigen_tensor<X, std::void_t<decltype(X::NumDimensions), decltype(std::declval<const X&>().data())>>
    : std::true_type {};

template <typename X, int... Ranks>
inline constexpr bool is_tensor_of_rank_v = [] {
  if constexpr (is_eigen_tensor<X>::value) return ((X::NumDimensions == Ranks) || ...);
  else return false;
}();

template <typename Derived>
using tensor_elem_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<const Derived&>().data())>>;

template <typename Derived>
constexpr void check_tensor() {
  static_assert(static_cast<int>(Derived::Layout) == static_cast<int>(Eigen::RowMajor),
                "gqa: tensors must be row-major (gqa::RowMajorTensor<T, Rank>)");
  static_assert(is_storage_type_v<tensor_elem_t<Derived>>, "gqa: element type must be float, double, bfloat16 or half");
}

/// The ProjectionShape of a rank-1/2 tensor with `heads` heads; throws if its dims are not a multiple of heads.
template <typename Derived>
ProjectionShape shape_of(const Derived& w, Index heads, WeightLayout layout, const char* fn) {
  constexpr int rank = Derived::NumDimensions;
  require<shape_error>(heads > 0, "shape", fn, ": heads = ", heads, " must be positive");
  if constexpr (rank == 1) {
    const Index n = w.dimension(0);
    require<shape_error>(n > 0 && n % heads == 0, "shape", fn, ": bias dim 0 (heads*D) = ", n,
                         " is not a positive multiple of heads = ", heads);
    return ProjectionShape::bias(heads, n / heads);
  } else {
    const int head_axis = layout == WeightLayout::linear ? 0 : 1;
    const Index n = w.dimension(head_axis), hidden = w.dimension(1 - head_axis);
    require<shape_error>(n > 0 && n % heads == 0, "shape", fn, ": w dim ", head_axis, " (heads*D) = ", n,
                         " is not a positive multiple of heads = ", heads);
    return {layout, heads, n / heads, hidden};
  }
}

template <typename T, int Rank>
RowMajorTensor<T, Rank> make_like(const ProjectionShape& s) {
  if constexpr (Rank == 1) return RowMajorTensor<T, 1>(s.heads * s.head_dim);
  else if constexpr (Rank == 2) {
    if (s.layout == WeightLayout::linear) return RowMajorTensor<T, 2>(s.heads * s.head_dim, s.hidden);
    return RowMajorTensor<T, 2>(s.hidden, s.heads * s.head_dim);
  } else {
    return RowMajorTensor<T, 3>(s.hidden, s.heads, s.head_dim);
  }
}

template <typename Derived>
span<const tensor_elem_t<Derived>> flat(const Derived& w) {
  return {w.data(), static_cast<Index>(w.size())};
}
template <typename T, int Rank>
span<T> flat(RowMajorTensor<T, Rank>& w) {
  return {w.data(), static_cast<Index>(w.size())};
}

}  // namespace detail

/// Pools a bias [H*D] (rank 1) or a weight (rank 2: [H*D, hidden] linear, or [hidden, H*D] hidden_first) with
/// `heads` = H heads into `kv_heads` = G heads.
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 1, 2>>>
auto pool_heads(const Derived& w, Index heads, Index kv_heads, const ConvertOptions& options = {},
                WeightLayout layout = WeightLayout::linear) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const auto s = detail::shape_of(w, heads, layout, "pool_heads");
  group_members(heads, kv_heads);  // the H % G check first, so its message is the one users see
  auto out = detail::make_like<T, Derived::NumDimensions>(s.with_heads(kv_heads));
  pool_heads<T>(detail::flat(w), s, kv_heads, detail::flat(out), options);
  return out;
}

/// Pools a [hidden, H, D] weight into [hidden, kv_heads, D].
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 3>>>
auto pool_heads(const Derived& w, Index kv_heads, const ConvertOptions& options = {}) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const ProjectionShape s{WeightLayout::hidden_first, w.dimension(1), w.dimension(2), w.dimension(0)};
  detail::check_shape(s, "pool_heads", "w");
  group_members(s.heads, kv_heads);  // the H % G check before anything is allocated
  auto out = detail::make_like<T, 3>(s.with_heads(kv_heads));
  pool_heads<T>(detail::flat(w), s, kv_heads, detail::flat(out), options);
  return out;
}

/// Expands a rank-1/2 projection with `kv_heads` = G heads to `heads` heads (repeat_interleave order). Exact.
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 1, 2>>>
auto expand_heads(const Derived& w, Index kv_heads, Index heads, WeightLayout layout = WeightLayout::linear) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const auto s = detail::shape_of(w, kv_heads, layout, "expand_heads");
  detail::require<shape_error>(heads > 0 && heads % kv_heads == 0, "shape", "expand_heads: heads H = ", heads,
                               " is not a positive multiple of kv_heads G = ", kv_heads);
  auto out = detail::make_like<T, Derived::NumDimensions>(s.with_heads(heads));
  expand_heads<T>(detail::flat(w), s, heads, detail::flat(out));
  return out;
}

/// Expands a [hidden, G, D] weight to [hidden, heads, D]. Exact.
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 3>>>
auto expand_heads(const Derived& w, Index heads) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const ProjectionShape s{WeightLayout::hidden_first, w.dimension(1), w.dimension(2), w.dimension(0)};
  detail::check_shape(s, "expand_heads", "w");
  detail::require<shape_error>(heads > 0 && heads % s.heads == 0, "shape", "expand_heads: heads H = ", heads,
                               " is not a positive multiple of w dim 1 (G) = ", s.heads);
  auto out = detail::make_like<T, 3>(s.with_heads(heads));
  expand_heads<T>(detail::flat(w), s, heads, detail::flat(out));
  return out;
}

/// Reorders the heads of a rank-1/2 projection with `heads` heads: output head j is input head order[j]. Use
/// WeightLayout::linear for q_proj / its bias, WeightLayout::hidden_first for nn.Linear's o_proj [hidden, H*D].
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 1, 2>>>
auto permute_heads(const Derived& w, Index heads, span<const Index> order,
                   WeightLayout layout = WeightLayout::linear) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const auto s = detail::shape_of(w, heads, layout, "permute_heads");
  auto out = detail::make_like<T, Derived::NumDimensions>(s);
  permute_heads<T>(detail::flat(w), s, order, detail::flat(out));
  return out;
}

/// Reorders the heads of a [hidden, H, D] weight: output head j is input head order[j].
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 3>>>
auto permute_heads(const Derived& w, span<const Index> order) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const ProjectionShape s{WeightLayout::hidden_first, w.dimension(1), w.dimension(2), w.dimension(0)};
  detail::check_shape(s, "permute_heads", "w");
  auto out = detail::make_like<T, 3>(s);
  permute_heads<T>(detail::flat(w), s, order, detail::flat(out));
  return out;
}

// ---- Whole attention layers: the function-aware method (PoolMethod::fit) --------------------------------------
//
// WHAT FIT KEEPS. Query head h scores key x' against query x as x~^T Wq~_h^T Wk_h x' (Wq~ = [Wq, bq], x~ = [x; 1])
// and adds Wo_h (Wv_h z_h + bv_h) to the output, z_h the attention-weighted mean of the inputs. Query rows and
// output columns belong to one query head each, so once a group shares K and V they can be rewritten freely: for a
// shared K the best query rows are a least-squares fit, and what is lost is the part of the heads' score forms
// outside the shared key rows' span. fit therefore picks, per group, the D key rows (combinations of the group's
// key rows) that keep most of sum_h ||Wq~_h^T Wk_h||^2 (the top eigenvectors of the group's key Gram matrix
// weighted by the energy of the queries that read each head) and refits every query head's rows to them; the same
// for V, weighted by the output columns' energy, refitting the output columns. Whatever a head's function ignores
// (an invertible transform of its K rows undone in its Q rows, of its V rows in its O columns) costs nothing, so
// heads that differ only that way pool exactly, where mean pooling does not. The least-squares refit keeps only a
// projection of each score form, which would flatten the attention, so (without rotary embedding) each query head
// is then scaled back to its original score energy: all-MiniLM-L6-v2, G = 1, mean cosine 0.698 -> 0.706.
// Rotary embeddings (AttentionShape::rotary) rotate each frequency pair of q and k by an angle that depends on the
// position, so the transforms that cost nothing are a scale and rotation per pair: with rotary pairs the shared
// key pair is the best complex combination of the group's key pairs (one complex number per input feature),
// weighted by the energy of the query pairs that read them, and each query pair is refitted to it. V has no
// rotation and is fitted as above.
// KNOWN SHORTFALL (rotary): the per-pair fit is the least-squares optimum of its objective and exact where it
// should be, but that objective does not predict the function with rotary embedding: SmolLM2-135M pooled 3 -> 1,
// perplexity of the 4,088 scored held-out tokens (context 512, example_decoder; native 46.28): fit 81,649 against
// mean 32,407, although on random heads with white inputs it keeps a little more than mean (output error 0.82x
// mean's at 8 -> 4 KV heads, 0.98x at 8 -> 1). Both sides lose, measured with the Python copy
// (bench/kv_pooling.py): mean K with fitted V 186,739 against mean's 33,602 (first 1,022 tokens), fitted K with
// mean V 45,180 against mean's 34,615 (first 2,044 tokens).
// A likely cause, not yet verified: Llama-family residual streams carry a few huge activations (attention-sink
// tokens) that the data-free metric (norm weight squared) does not know, so the fit spends its D directions on
// the wrong ones. A calibrated input metric (second moments of real activations) is the next thing to try. Until
// then best_data_free_method() (PoolMethod::automatic) picks mean for rotary layers and fit for the others, where
// on all-MiniLM-L6-v2 it keeps mean cosine 0.859 at G = 6 and 0.706 at G = 1 (mean pooling 0.711, 0.546).
// Biases: without rotary embedding a key bias adds the same amount to every score of a query, which softmax
// ignores, so the key fit looks at the weights only. A value bias reaches the output as sum_h Wo_h bv_h whatever
// the attention weights; with an output bias bo, fit moves the difference into bo exactly and fits V on the
// weights; without one the bias is fitted with the weights, as an input feature of constant value 1.
// The input metric: "energy" weighs input features by what the layer's input looks like. Data-free, fit reads it
// from the normalisation in front of the attention (AttentionView::norm_weight, norm_bias): x = norm_weight * n +
// norm_bias with n normalised, taken as white noise of unit variance, so the metric is E[x x^T] = diag(w^2) + b b^T
// (and the constant feature 1). Without them every feature weighs the same.
//
// EXACTNESS. A group of one KV head (G = kv_heads) and a group whose K (or V) heads are bitwise identical (an
// expanded checkpoint) keep that head and the group's query rows (or output columns) bit for bit; if no V group is
// fitted, bo is kept bit for bit too. fit computes in double and rounds once to T.
//
// QUERY ORDER. With a non-adjacent options.assignment the result's query heads (wq, bq rows; wo columns) are in
// query_head_order() order, so the standard grouping rule applies to the result; for every method.

/// How q/k rows of a head pair up for the rotary embedding.
enum class RotaryPairs {
  none,         ///< no rotary embedding (BERT, GPT-2)
  half_split,   ///< Hugging Face's rotate_half: feature i pairs with i + D/2 (Llama, Mistral, Qwen2 checkpoints)
  interleaved,  ///< features 2i and 2i+1 (Meta's original Llama, GPT-J)
};

/// What PoolMethod::automatic ("auto", gqa-convert --method auto) uses: the data-free method that kept the most of
/// the real checkpoints measured (bench/conversion_quality.py; no training, no calibration data):
///   no rotary embedding (BERT family): fit. all-MiniLM-L6-v2, mean cosine of sentence embeddings to the original's,
///     fit against mean: G = 6 0.859 / 0.711, G = 1 0.706 / 0.546; above mean at every G measured (6, 4, 3, 2, 1).
///   rotary embedding (Llama family): mean. SmolLM2-135M pooled 3 -> 1 keeps far more with mean than with fit
///     (perplexity of the held-out ids, see "KNOWN SHORTFALL" below), so auto stays with the paper's method there.
inline PoolMethod best_data_free_method(RotaryPairs rotary) noexcept {
  return rotary == RotaryPairs::none ? PoolMethod::fit : PoolMethod::mean;
}

/// The sizes of one attention layer. H = query_heads, Hkv = kv_heads (H for MHA), D = head_dim, d = hidden.
struct AttentionShape {
  Index hidden = 0;
  Index query_heads = 0;
  Index kv_heads = 0;
  Index head_dim = 0;
  RotaryPairs rotary = RotaryPairs::none;
};

/// Read-only views of one layer's projections in nn.Linear layout; an empty bias means none.
template <typename T>
struct AttentionView {
  span<const T> wq, bq;  ///< [H*D, d], [H*D]
  span<const T> wk, bk;  ///< [Hkv*D, d], [Hkv*D]
  span<const T> wv, bv;  ///< [Hkv*D, d], [Hkv*D]
  span<const T> wo, bo;  ///< [d, H*D] (o_proj, BERT's attention.output.dense), [d]
  /// The normalisation whose output is the attention's input, [d] each, optional (fit's input metric): Llama's
  /// input_layernorm.weight (RMSNorm: no bias); BERT's previous LayerNorm (embeddings.LayerNorm for layer 0,
  /// else layer l-1's output.LayerNorm) weight and bias.
  span<const T> norm_weight, norm_bias;
};

/// One layer's projections after pooling, same layout, with G key/value heads; biases empty where the input had none.
template <typename T>
struct AttentionWeights {
  std::vector<T> wq, bq, wk, bk, wv, bv, wo, bo;
};

namespace detail {

// The fit machinery below is templated on its scalar (always double) so that none of Eigen's products and
// eigensolvers is instantiated in a translation unit that does not pool with fit: as inline non-template functions
// they cost every TU that includes gqa/gqa.hpp ~7 s of compile time.
template <typename Real>
using Mat = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Real>
using Vec = Eigen::Matrix<Real, Eigen::Dynamic, 1>;
using MatD = Mat<double>;

template <typename T>
double to_double(T x) {
  return static_cast<double>(static_cast<compute_t<T>>(x));
}

/// rows x cols from `v`, or zeros if `v` is empty (an absent bias).
template <typename T>
MatD to_matrix(span<const T> v, Index rows, Index cols) {
  MatD m = MatD::Zero(rows, cols);
  for (Index i = 0; i < v.size(); ++i) m.data()[i] = to_double(v[i]);
  return m;
}

template <typename Derived>
std::vector<double> to_values(const Eigen::MatrixBase<Derived>& m) {
  std::vector<double> v;
  v.reserve(static_cast<std::size_t>(m.size()));
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) v.push_back(m(i, j));
  return v;
}

template <typename T>
std::vector<T> rounded(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<compute_t<T>>(v[i]));
  return out;
}

/// The input metric S = [[diag(w^2) + b b^T, b], [b^T, 1]] over [x; 1] (see "The input metric"), applied as
/// R S R^H = (R_x W)(R_x W)^H + (R [b; 1])(R [b; 1])^H; with_bias = false drops the constant feature (the bias
/// column's row and column of S), for sides where a bias cannot matter or is handled exactly elsewhere.
struct InputMetric {
  Eigen::VectorXd weight, shift;  // [d]

  template <typename Mat>
  Mat gram(const Mat& rows, bool with_bias) const {
    const Index d = weight.size();
    using S = typename Mat::Scalar;
    const Mat scaled = rows.leftCols(d) * weight.cast<S>().asDiagonal();
    Mat mean = rows.leftCols(d) * shift.cast<S>();
    if (with_bias) mean += rows.col(d);
    return scaled * scaled.adjoint() + mean * mean.adjoint();
  }
};

/// The combinations Y (N x n_out) of N input rows whose rows Y^T R keep most weighted energy: maximises
/// tr(Y^H gram W gram Y) subject to Y^H gram Y = I, gram = R S R^H (the rows' Gram matrix in the input metric) and
/// W (N x N, Hermitian PSD) the energy of the queries (or outputs) that read each input row. Solved on gram's range
/// (eigenvalues above 1e-12 of the largest), so rows that repeat or vanish are harmless; missing columns are zero.
template <typename Mat>
Mat top_combinations(const Mat& gram, const Mat& weight, Index n_out) {
  Eigen::SelfAdjointEigenSolver<Mat> g(gram);
  const auto& lam = g.eigenvalues();
  const Index n = gram.rows();
  const double top = n > 0 ? std::max(lam(n - 1), 0.0) : 0.0;
  Index first = 0;
  while (first < n && !(lam(first) > 1e-12 * top)) ++first;
  const Index k = n - first;
  Mat y = Mat::Zero(n, n_out);
  if (k == 0) return y;
  const Mat v = g.eigenvectors().rightCols(k);
  const Eigen::VectorXd s = lam.tail(k).cwiseSqrt();
  const Mat m = s.asDiagonal() * (v.adjoint() * weight * v) * s.asDiagonal();
  Eigen::SelfAdjointEigenSolver<Mat> e(m);
  // Eigenvalues ascend: the last min(k, n_out) vectors, largest first.
  for (Index j = 0; j < std::min(k, n_out); ++j)
    y.col(j) = v * (e.eigenvectors().col(k - 1 - j).array() / s.array()).matrix();
  return y;
}

/// sqrt(target / current); 1 if either is zero.
inline double balance(double target, double current) {
  return (target > 0 && current > 0) ? std::sqrt(target / current) : 1.0;
}

/// The layer in double: [W, b] per projection (a zero bias column where there is none), the output projection.
template <typename Real>
struct LayerMatrices {
  Mat<Real> q, k, v, o;      // [H*D, d+1], [Hkv*D, d+1] (G*D in the result), same, [d, H*D]
  Vec<Real> bo;         // [d]
};

/// The context every group's fit reads.
template <typename Real>
struct FitContext {
  const LayerMatrices<Real>& in;
  LayerMatrices<Real>& out;
  const InputMetric& metric;
  Index r, D;  // query heads per input KV head, head_dim
};

template <typename Real>
bool group_is_copy(const Mat<Real>& m, const std::vector<Index>& heads, Index D) {
  for (Index k : heads)
    if (m.middleRows(heads[0] * D, D) != m.middleRows(k * D, D)) return false;
  return true;
}

/// A group's shared head and, per input KV head i, the D x D map carrying the shared head back to head i's
/// readers: a query head's refitted rows are coupling[i]^T Q~_h, an output head's refitted columns O_h coupling[i].
template <typename Real>
struct SharedHead {
  Mat<Real> head;
  std::vector<Mat<Real>> coupling;
};

/// The shared head of `rows` (the group's heads stacked, [n*D, d+1]) given its Gram matrix and the per-head reader
/// energies (D x D each), scaled to the group's mean weight energy (the function does not care; people comparing
/// weights across methods do).
template <typename Real>
SharedHead<Real> fit_shared_rows(const Mat<Real>& rows, const Mat<Real>& gram, const std::vector<Mat<Real>>& readers, Index D) {
  const Index n = static_cast<Index>(readers.size()), d = rows.cols() - 1;
  Mat<Real> weight = Mat<Real>::Zero(n * D, n * D);
  for (Index i = 0; i < n; ++i) weight.block(i * D, i * D, D, D) = readers[static_cast<std::size_t>(i)];
  const Mat<Real> y = top_combinations<Mat<Real>>(gram, weight, D);
  SharedHead<Real> out;
  out.head = y.transpose() * rows;
  const double scale = balance(rows.leftCols(d).squaredNorm() / double(n), out.head.leftCols(d).squaredNorm());
  out.head *= scale;
  const Mat<Real> back = gram * y / scale;
  for (Index i = 0; i < n; ++i) out.coupling.push_back(back.middleRows(i * D, D));
  return out;
}

}  // namespace detail

namespace detail {

/// V of group g (input KV heads `heads`) into out.v rows g*D.., refitting its query heads' output columns.
template <typename Real>
void fit_values(const FitContext<Real>& c, const std::vector<Index>& heads, Index g, bool bias_in_fit) {
  const Index D = c.D;
  if (group_is_copy(c.in.v, heads, D)) {
    c.out.v.middleRows(g * D, D) = c.in.v.middleRows(heads[0] * D, D);
    return;  // output columns stay as they are
  }
  Mat<Real> rows(static_cast<Index>(heads.size()) * D, c.in.v.cols());
  std::vector<Mat<Real>> readers;
  for (std::size_t i = 0; i < heads.size(); ++i) {
    rows.middleRows(Index(i) * D, D) = c.in.v.middleRows(heads[i] * D, D);
    Mat<Real> e = Mat<Real>::Zero(D, D);
    for (Index t = 0; t < c.r; ++t) {
      const auto oh = c.in.o.middleCols((heads[i] * c.r + t) * D, D);
      e += oh.transpose() * oh;
    }
    readers.push_back(e);
  }
  const SharedHead<Real> sh = fit_shared_rows(rows, c.metric.template gram<Mat<Real>>(rows, bias_in_fit), readers, D);
  c.out.v.middleRows(g * D, D) = sh.head;
  for (std::size_t i = 0; i < heads.size(); ++i)
    for (Index t = 0; t < c.r; ++t) {
      const Index h = heads[i] * c.r + t;
      c.out.o.middleCols(h * D, D) = c.in.o.middleCols(h * D, D) * sh.coupling[i];
    }
}

/// Query energy Q~_h S Q~_h^T (D x D) of the query heads reading input KV head k.
template <typename Real>
Mat<Real> query_energy(const FitContext<Real>& c, Index k) {
  Mat<Real> e = Mat<Real>::Zero(c.D, c.D);
  for (Index t = 0; t < c.r; ++t) e += c.metric.template gram<Mat<Real>>(c.in.q.middleRows((k * c.r + t) * c.D, c.D), true);
  return e;
}

/// K of group g without rotary embedding, refitting its query heads' rows (a key bias cannot matter: left out).
template <typename Real>
void fit_keys(const FitContext<Real>& c, const std::vector<Index>& heads, Index g) {
  const Index D = c.D;
  Mat<Real> rows(static_cast<Index>(heads.size()) * D, c.in.k.cols());
  std::vector<Mat<Real>> readers;
  for (std::size_t i = 0; i < heads.size(); ++i) {
    rows.middleRows(Index(i) * D, D) = c.in.k.middleRows(heads[i] * D, D);
    readers.push_back(query_energy(c, heads[i]));
  }
  const SharedHead<Real> sh = fit_shared_rows(rows, c.metric.template gram<Mat<Real>>(rows, false), readers, D);
  c.out.k.middleRows(g * D, D) = sh.head;
  for (std::size_t i = 0; i < heads.size(); ++i)
    for (Index t = 0; t < c.r; ++t) {
      const Index h = heads[i] * c.r + t;
      c.out.q.middleRows(h * D, D) = sh.coupling[i].transpose() * c.in.q.middleRows(h * D, D);
    }
}

/// Row indices (real, imaginary part) of rotary pair p in a head of dimension D.
inline std::pair<Index, Index> rotary_rows(RotaryPairs pairs, Index p, Index D) {
  return pairs == RotaryPairs::half_split ? std::pair<Index, Index>{p, p + D / 2}
                                          : std::pair<Index, Index>{2 * p, 2 * p + 1};
}

/// Rotary pair p of the head starting at row `first` of m: its two rows [2, d+1], the real and imaginary parts of
/// one complex row.
template <typename Real>
Mat<Real> pair_rows(const Mat<Real>& m, Index first, Index p, Index D, RotaryPairs pairs) {
  const auto [re, im] = rotary_rows(pairs, p, D);
  Mat<Real> z(2, m.cols());
  z.row(0) = m.row(first + re);
  z.row(1) = m.row(first + im);
  return z;
}

/// K of group g with rotary embedding: per frequency pair, the shared key pair is the best complex combination of
/// the heads' pairs (a scale and rotation per head commute with RoPE), and each query pair is refitted to it. The
/// key bias rotates too, so it counts like any feature. The n x n Hermitian problem (gram = A + iB) is solved in its
/// real form [[A, -B], [B, A]] on [Re u; Im u], where products of Hermitian matrices stay products.
template <typename Real>
void fit_rotary_keys(const FitContext<Real>& c, const std::vector<Index>& heads, Index g, RotaryPairs pairs) {
  const Index n = static_cast<Index>(heads.size()), D = c.D, d = c.in.k.cols() - 1;
  for (Index p = 0; p < D / 2; ++p) {
    Mat<Real> rows(2 * n, d + 1);  // real parts of the n heads' pairs, then imaginary parts
    Mat<Real> weight = Mat<Real>::Zero(2 * n, 2 * n);
    double target = 0;
    for (Index i = 0; i < n; ++i) {
      const Index k = heads[static_cast<std::size_t>(i)];
      const Mat<Real> z = pair_rows(c.in.k, k * D, p, D, pairs);
      rows.row(i) = z.row(0);
      rows.row(n + i) = z.row(1);
      target += z.leftCols(d).squaredNorm() / double(n);
      for (Index t = 0; t < c.r; ++t) weight(i, i) += c.metric.template gram<Mat<Real>>(pair_rows(c.in.q, (k * c.r + t) * D, p, D, pairs), true).trace();
      weight(n + i, n + i) = weight(i, i);
    }
    const Mat<Real> g2 = c.metric.template gram<Mat<Real>>(rows, true);  // [[P, Q], [Q^T, T]]: A = P + T, B = Q^T - Q
    const Mat<Real> a = g2.topLeftCorner(n, n) + g2.bottomRightCorner(n, n);
    const Mat<Real> b = g2.bottomLeftCorner(n, n) - g2.topRightCorner(n, n);
    Mat<Real> gram(2 * n, 2 * n);
    gram << a, -b, b, a;
    const Mat<Real> u = top_combinations<Mat<Real>>(gram, weight, 1);  // [x; y], u = x + iy
    const auto x = u.topRows(n), y = u.bottomRows(n);
    // shared = u^H rows = (x^T Re + y^T Im) + i (x^T Im - y^T Re)
    Mat<Real> shared(2, d + 1);
    shared.row(0) = x.transpose() * rows.topRows(n) + y.transpose() * rows.bottomRows(n);
    shared.row(1) = x.transpose() * rows.bottomRows(n) - y.transpose() * rows.topRows(n);
    const double scale = balance(target, shared.leftCols(d).squaredNorm());
    shared *= scale;
    const Mat<Real> coupling = gram * u / scale;  // [Re; Im] of gram u
    const auto [re, im] = rotary_rows(pairs, p, D);
    c.out.k.row(g * D + re) = shared.row(0);
    c.out.k.row(g * D + im) = shared.row(1);
    for (Index i = 0; i < n; ++i)
      for (Index t = 0; t < c.r; ++t) {
        const Index h = heads[static_cast<std::size_t>(i)] * c.r + t;
        // a * conj(coupling_i)
        const Mat<Real> q = pair_rows(c.in.q, h * D, p, D, pairs);
        const double cr = coupling(i, 0), ci = coupling(n + i, 0);
        c.out.q.row(h * D + re) = q.row(0) * cr + q.row(1) * ci;
        c.out.q.row(h * D + im) = q.row(1) * cr - q.row(0) * ci;
      }
  }
}

/// Energy of query head h's score form against key head `kh` of `keys`: ||S^1/2 Q~_h^T K_x S_x^1/2||^2, per rotary
/// pair (a pair's form is rank one: the product of the two pairs' energies) with rotary embedding.
template <typename Real>
double score_energy(const FitContext<Real>& c, const Mat<Real>& q, Index h, const Mat<Real>& keys, Index kh,
                           RotaryPairs pairs) {
  const Index D = c.D;
  if (pairs == RotaryPairs::none) {
    const Mat<Real> eq = c.metric.template gram<Mat<Real>>(q.middleRows(h * D, D), true);
    const Mat<Real> ek = c.metric.template gram<Mat<Real>>(keys.middleRows(kh * D, D), false);
    return (eq.cwiseProduct(ek)).sum();  // tr(eq ek), both symmetric
  }
  double e = 0;
  for (Index p = 0; p < D / 2; ++p)
    e += c.metric.template gram<Mat<Real>>(pair_rows(q, h * D, p, D, pairs), true).trace() *
         c.metric.template gram<Mat<Real>>(pair_rows(keys, kh * D, p, D, pairs), true).trace();
  return e;
}

/// Scales every query head of fitted group g back to its original score energy (see "WHAT FIT KEEPS").
template <typename Real>
void restore_score_energy(const FitContext<Real>& c, const std::vector<Index>& heads, Index g, RotaryPairs pairs) {
  for (Index k : heads)
    for (Index t = 0; t < c.r; ++t) {
      const Index h = k * c.r + t;
      const double before = score_energy(c, c.in.q, h, c.in.k, k, pairs);
      const double after = score_energy(c, c.out.q, h, c.out.k, g, pairs);
      c.out.q.middleRows(h * c.D, c.D) *= balance(before, after);
    }
}

}  // namespace detail

namespace detail {

template <typename T>
void check_attention(const AttentionView<T>& w, const AttentionShape& s, Index kv_heads) {
  require<shape_error>(s.hidden > 0 && s.query_heads > 0 && s.kv_heads > 0 && s.head_dim > 0, "shape",
                       "pool_attention: shape (hidden ", s.hidden, ", query_heads ", s.query_heads, ", kv_heads ",
                       s.kv_heads, ", head_dim ", s.head_dim, ") must all be positive");
  require<shape_error>(s.query_heads % s.kv_heads == 0, "shape", "pool_attention: kv_heads = ", s.kv_heads,
                       " does not divide query_heads = ", s.query_heads);
  require<shape_error>(s.rotary == RotaryPairs::none || s.head_dim % 2 == 0, "shape",
                       "pool_attention: rotary pairs need an even head_dim, got ", s.head_dim);
  group_members(s.kv_heads, kv_heads);  // s.kv_heads % kv_heads, before the sizes
  const Index hq = s.query_heads * s.head_dim, hk = s.kv_heads * s.head_dim;
  auto size = [](Index got, Index want, const char* arg, bool optional) {
    require<shape_error>(got == want || (optional && got == 0), "shape", "pool_attention: ", arg, ".size() = ", got,
                         " but the shape needs ", want, optional ? " (or 0: none)" : "");
  };
  size(w.wq.size(), hq * s.hidden, "wq [query_heads*head_dim, hidden]", false);
  size(w.bq.size(), hq, "bq [query_heads*head_dim]", true);
  size(w.wk.size(), hk * s.hidden, "wk [kv_heads*head_dim, hidden]", false);
  size(w.bk.size(), hk, "bk [kv_heads*head_dim]", true);
  size(w.wv.size(), hk * s.hidden, "wv [kv_heads*head_dim, hidden]", false);
  size(w.bv.size(), hk, "bv [kv_heads*head_dim]", true);
  size(w.wo.size(), s.hidden * hq, "wo [hidden, query_heads*head_dim]", false);
  size(w.bo.size(), s.hidden, "bo [hidden]", true);
  size(w.norm_weight.size(), s.hidden, "norm_weight [hidden]", true);
  size(w.norm_bias.size(), s.hidden, "norm_bias [hidden]", true);
}

template <typename T>
void require_finite(span<const T> v, const char* arg) {
  for (Index i = 0; i < v.size(); ++i)
    require(std::isfinite(to_double(v[i])), "convert.nonfinite", "pool_attention: ", arg, "[", i, "] = ",
            to_double(v[i]), " is not finite; method fit cannot pool it");
}

/// [W, b] as one matrix, the bias (or zeros) as the last column.
template <typename T>
MatD with_bias(span<const T> w, span<const T> b, Index rows, Index hidden) {
  MatD m(rows, hidden + 1);
  m.leftCols(hidden) = to_matrix(w, rows, hidden);
  m.col(hidden) = to_matrix(b, rows, 1);
  return m;
}

/// Carries the value bias into bo: attention weights sum to one, so query head h adds Wo_h bv_h to every output;
/// the difference between the input's and the result's sums goes into bo, exactly. (The input's constant part
/// norm_bias could be carried the same way, Wo_h Wv_h b; measured on all-MiniLM-L6-v2 that keeps less than leaving
/// it in the metric: 0.702 against 0.706 mean cosine at G = 1.) Fitted V groups only, so a layer with none keeps
/// bo bit for bit.
template <typename Real>
void carry_value_bias(const FitContext<Real>& c, const std::vector<std::vector<Index>>& members,
                             const std::vector<char>& fitted) {
  const Index D = c.D, d = c.in.v.cols() - 1;
  for (std::size_t g = 0; g < members.size(); ++g) {
    if (!fitted[g]) continue;
    const Vec<Real> after = c.out.v.block(Index(g) * D, d, D, 1);
    for (Index k : members[g]) {
      const Vec<Real> before = c.in.v.block(k * D, d, D, 1);
      for (Index t = 0; t < c.r; ++t) {
        const Index h = k * c.r + t;
        c.out.bo += c.in.o.middleCols(h * D, D) * before - c.out.o.middleCols(h * D, D) * after;
      }
    }
  }
}

template <typename T>
AttentionWeights<T> pool_attention_fit(const AttentionView<T>& w, const AttentionShape& s,
                                       const std::vector<std::vector<Index>>& members) {
  const char* names[] = {"wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "norm_weight", "norm_bias"};
  const span<const T> all[] = {w.wq, w.bq, w.wk, w.bk, w.wv, w.bv, w.wo, w.bo, w.norm_weight, w.norm_bias};
  for (int i = 0; i < 10; ++i) require_finite(all[i], names[i]);
  const Index D = s.head_dim, d = s.hidden, G = static_cast<Index>(members.size());
  InputMetric metric{w.norm_weight.empty() ? Eigen::VectorXd::Ones(d) : to_matrix(w.norm_weight, d, 1).col(0).eval(),
                     to_matrix(w.norm_bias, d, 1).col(0)};
  const LayerMatrices<double> in{with_bias(w.wq, w.bq, s.query_heads * D, d), with_bias(w.wk, w.bk, s.kv_heads * D, d),
                         with_bias(w.wv, w.bv, s.kv_heads * D, d), to_matrix(w.wo, d, s.query_heads * D),
                         to_matrix(w.bo, d, 1).col(0)};
  LayerMatrices<double> out{in.q, MatD::Zero(G * D, d + 1), MatD::Zero(G * D, d + 1), in.o, in.bo};
  const FitContext<double> c{in, out, metric, s.query_heads / s.kv_heads, D};
  // With an output bias the value bias is carried exactly through bo, so V is fitted on the weights alone;
  // without one the bias column is fitted too.
  const bool bias_into_bo = !w.bo.empty() && !w.bv.empty();
  std::vector<char> v_fitted(static_cast<std::size_t>(G), 0);
  for (Index g = 0; g < G; ++g) {
    const auto& heads = members[static_cast<std::size_t>(g)];
    v_fitted[static_cast<std::size_t>(g)] = !group_is_copy(in.v, heads, D);
    fit_values(c, heads, g, !bias_into_bo);
    if (group_is_copy(in.k, heads, D)) {
      out.k.middleRows(g * D, D) = in.k.middleRows(heads[0] * D, D);
      continue;  // query rows stay as they are
    }
    if (s.rotary == RotaryPairs::none) {
      fit_keys(c, heads, g);
      restore_score_energy(c, heads, g, s.rotary);
    } else {
      // No energy restoring with rotary pairs: measured, it hurts there (random heads, G = 1: output error 0.98x
      // mean's without, 1.05x with).
      fit_rotary_keys(c, heads, g, s.rotary);
    }
  }
  if (bias_into_bo) carry_value_bias(c, members, v_fitted);
  AttentionWeights<T> res;
  res.wq = rounded<T>(to_values(out.q.leftCols(d)));
  if (!w.bq.empty()) res.bq = rounded<T>(to_values(out.q.col(d)));
  res.wk = rounded<T>(to_values(out.k.leftCols(d)));
  if (!w.bk.empty()) res.bk = rounded<T>(to_values(out.k.col(d)));
  res.wv = rounded<T>(to_values(out.v.leftCols(d)));
  if (!w.bv.empty()) res.bv = rounded<T>(to_values(out.v.col(d)));
  res.wo = rounded<T>(to_values(out.o));
  if (!w.bo.empty()) res.bo = rounded<T>(to_values(out.bo));
  return res;
}

}  // namespace detail

/// Pools one attention layer's K/V heads (shape.kv_heads of them) into `kv_heads` (G) heads with options.method
/// (options.assignment: which input KV heads share a group, as for pool_heads). mean, first and random pool
/// wk/bk/wv/bv exactly as pool_heads does and copy the rest (norm_weight/norm_bias unused); fit also rewrites
/// wq/bq/wo/bo (see "WHAT FIT KEEPS" above); automatic is best_data_free_method(shape.rotary). With a non-adjacent
/// assignment the result's query heads are in query_head_order() order. Throws shape_error for sizes that disagree
/// with `shape`, invalid_argument for a bad assignment or (fit) a non-finite input.
template <typename T>
AttentionWeights<T> pool_attention(const AttentionView<T>& w, const AttentionShape& shape, Index kv_heads,
                                   const ConvertOptions& options = {}) {
  static_assert(is_storage_type_v<T>, "gqa: element type must be float, double, bfloat16 or half");
  detail::check_attention(w, shape, kv_heads);
  const auto members = group_members(shape.kv_heads, kv_heads, options.assignment);
  const Index H = shape.query_heads, D = shape.head_dim;
  ConvertOptions resolved = options;
  if (resolved.method == PoolMethod::automatic) resolved.method = best_data_free_method(shape.rotary);
  AttentionWeights<T> res;
  if (resolved.method == PoolMethod::fit) {
    res = detail::pool_attention_fit(w, shape, members);
  } else {
    auto pool = [&](span<const T> in, const ProjectionShape& ps) {
      std::vector<T> out(static_cast<std::size_t>(ps.with_heads(kv_heads).size()));
      pool_heads<T>(in, ps, kv_heads, out, resolved);
      return out;
    };
    const ProjectionShape ws{WeightLayout::linear, shape.kv_heads, D, shape.hidden};
    res.wk = pool(w.wk, ws);
    res.wv = pool(w.wv, ws);
    if (!w.bk.empty()) res.bk = pool(w.bk, ProjectionShape::bias(shape.kv_heads, D));
    if (!w.bv.empty()) res.bv = pool(w.bv, ProjectionShape::bias(shape.kv_heads, D));
    res.wq.assign(w.wq.begin(), w.wq.end());
    res.bq.assign(w.bq.begin(), w.bq.end());
    res.wo.assign(w.wo.begin(), w.wo.end());
    res.bo.assign(w.bo.begin(), w.bo.end());
  }
  if (!is_adjacent(options.assignment, kv_heads)) {
    const auto order = query_head_order(H, kv_heads, options.assignment);
    auto permute = [&](std::vector<T>& v, const ProjectionShape& ps) {
      std::vector<T> p(v.size());
      permute_heads<T>(v, ps, order, p);
      v.swap(p);
    };
    permute(res.wq, {WeightLayout::linear, H, D, shape.hidden});
    if (!res.bq.empty()) permute(res.bq, ProjectionShape::bias(H, D));
    permute(res.wo, {WeightLayout::hidden_first, H, D, shape.hidden});
  }
  return res;
}

}  // namespace gqa
GQA_DETAIL_WARNINGS_ON
