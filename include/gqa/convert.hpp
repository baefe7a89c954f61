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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace gqa {

/// How a group of heads becomes one head (see the header comment).
enum class PoolMethod { mean, first, random };

/// "mean", "first", "random".
inline const char* to_string(PoolMethod m) noexcept {
  switch (m) {
    case PoolMethod::mean: return "mean";
    case PoolMethod::first: return "first";
    case PoolMethod::random: return "random";
  }
  return "?";
}

/// The method called `name`, or nullopt.
inline std::optional<PoolMethod> parse_pool_method(std::string_view name) noexcept {
  if (name == "mean") return PoolMethod::mean;
  if (name == "first") return PoolMethod::first;
  if (name == "random") return PoolMethod::random;
  return std::nullopt;
}

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

/// The heads of each group, ascending: validated from `assignment` (group of each head), or the adjacent grouping
/// if it is empty. Throws shape_error if groups does not divide heads, invalid_argument if the assignment is not a
/// partition of the heads into `groups` groups of heads/groups.
inline std::vector<std::vector<Index>> group_members(Index heads, Index groups, span<const Index> assignment = {}) {
  using detail::require;
  require<shape_error>(heads > 0 && groups > 0, "shape", "groups: heads H = ", heads, " and groups G = ", groups,
                       " must be positive");
  require<shape_error>(heads % groups == 0, "shape", "groups: groups G = ", groups, " does not divide heads H = ",
                       heads, " (H % G = ", heads % groups, ")");
  const Index size = heads / groups;
  std::vector<std::vector<Index>> members(static_cast<std::size_t>(groups));
  if (assignment.empty()) {
    for (Index h = 0; h < heads; ++h) members[static_cast<std::size_t>(h / size)].push_back(h);
    return members;
  }
  require(assignment.size() == heads, "convert.assignment", "options.assignment: size = ", assignment.size(),
          " but there are H = ", heads, " heads (one group per head)");
  for (Index h = 0; h < heads; ++h) {
    const Index g = assignment[h];
    require(g >= 0 && g < groups, "convert.assignment", "options.assignment[", h, "] = ", g,
            " is not a group in 0 .. G-1 = ", groups - 1);
    members[static_cast<std::size_t>(g)].push_back(h);
  }
  for (Index g = 0; g < groups; ++g)
    require(static_cast<Index>(members[static_cast<std::size_t>(g)].size()) == size, "convert.assignment",
            "options.assignment: group ", g, " has ", members[static_cast<std::size_t>(g)].size(),
            " heads but a partition into G = ", groups, " equal groups needs H/G = ", size);
  return members;
}

/// True if `assignment` is empty or the adjacent grouping (head h in group h / (heads/groups)).
inline bool is_adjacent(span<const Index> assignment, Index groups) {
  if (assignment.empty()) return true;
  if (groups <= 0 || assignment.size() % groups != 0) return false;
  const Index size = assignment.size() / groups;
  for (Index h = 0; h < assignment.size(); ++h)
    if (assignment[h] != h / size) return false;
  return true;
}

/// The query-head order that makes an assignment of `assignment.size()` KV heads to `groups` groups adjacent:
/// new query head j is old query head order[j]. query_heads must be a multiple of the KV heads (r = query_heads /
/// assignment.size() query heads per input KV head, which move together). For an MHA input (r = 1) this lists the
/// heads of group 0, then group 1, ... Apply it with permute_heads() to the Q rows and O columns.
inline std::vector<Index> query_head_order(Index query_heads, Index groups, span<const Index> assignment) {
  const Index kv = assignment.size();
  detail::require<shape_error>(kv > 0 && query_heads > 0 && query_heads % kv == 0, "shape",
                               "query_head_order: query heads H = ", query_heads,
                               " is not a positive multiple of assignment.size() = ", kv);
  const auto members = group_members(kv, groups, assignment);
  const Index r = query_heads / kv;
  std::vector<Index> order;
  order.reserve(static_cast<std::size_t>(query_heads));
  for (const auto& group : members)
    for (Index k : group)
      for (Index t = 0; t < r; ++t) order.push_back(k * r + t);
  return order;
}

/// Pools the `in_shape.heads` heads of `in` into `groups` heads, written to `out` (in_shape.with_heads(groups)).
template <typename T>
void pool_heads(span<const T> in, const ProjectionShape& in_shape, Index groups, span<T> out,
                const ConvertOptions& options = {}) {
  static_assert(is_storage_type_v<T>, "gqa: element type must be float, double, bfloat16 or half");
  detail::check_shape(in_shape, "pool_heads", "in_shape");
  const auto members = group_members(in_shape.heads, groups, options.assignment);
  detail::check_size(in.size(), in_shape, "pool_heads", "in");
  detail::check_size(out.size(), in_shape.with_heads(groups), "pool_heads", "out");
  const auto b = detail::head_blocks(in_shape);
  const T* src = in.data();
  T* dst = out.data();
  switch (options.method) {
    case PoolMethod::mean: {
      using A = compute_t<T>;
      std::vector<A> acc(static_cast<std::size_t>(b.inner));
      for (Index o = 0; o < b.outer; ++o) {
        for (Index g = 0; g < groups; ++g) {
          const auto& heads = members[static_cast<std::size_t>(g)];
          const T* x0 = src + (o * b.heads + heads[0]) * b.inner;
          std::fill(acc.begin(), acc.end(), A(0));
          for (std::size_t m = 1; m < heads.size(); ++m) {
            const T* x = src + (o * b.heads + heads[m]) * b.inner;
            for (Index i = 0; i < b.inner; ++i) acc[i] += static_cast<A>(x[i]) - static_cast<A>(x0[i]);
          }
          const A n = static_cast<A>(heads.size());
          T* y = dst + (o * groups + g) * b.inner;
          for (Index i = 0; i < b.inner; ++i) y[i] = static_cast<T>(static_cast<A>(x0[i]) + acc[i] / n);
        }
      }
      break;
    }
    case PoolMethod::first:
      for (Index o = 0; o < b.outer; ++o)
        for (Index g = 0; g < groups; ++g) {
          const T* x0 = src + (o * b.heads + members[static_cast<std::size_t>(g)][0]) * b.inner;
          std::copy(x0, x0 + b.inner, dst + (o * groups + g) * b.inner);
        }
      break;
    case PoolMethod::random: {
      const double sigma = detail::standard_deviation(src, in.size());
      detail::NormalStream normal(options.seed);
      for (Index i = 0; i < out.size(); ++i) dst[i] = static_cast<T>(static_cast<compute_t<T>>(sigma * normal.next()));
      break;
    }
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
/// `heads` = H heads into `groups` heads.
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 1, 2>>>
auto pool_heads(const Derived& w, Index heads, Index groups, const ConvertOptions& options = {},
                WeightLayout layout = WeightLayout::linear) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const auto s = detail::shape_of(w, heads, layout, "pool_heads");
  group_members(heads, groups);  // the H % G check first, so its message is the one users see
  auto out = detail::make_like<T, Derived::NumDimensions>(s.with_heads(groups));
  pool_heads<T>(detail::flat(w), s, groups, detail::flat(out), options);
  return out;
}

/// Pools a [hidden, H, D] weight into [hidden, groups, D].
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 3>>>
auto pool_heads(const Derived& w, Index groups, const ConvertOptions& options = {}) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const ProjectionShape s{WeightLayout::hidden_first, w.dimension(1), w.dimension(2), w.dimension(0)};
  detail::check_shape(s, "pool_heads", "w");
  group_members(s.heads, groups);  // the H % G check before anything is allocated
  auto out = detail::make_like<T, 3>(s.with_heads(groups));
  pool_heads<T>(detail::flat(w), s, groups, detail::flat(out), options);
  return out;
}

/// Expands a rank-1/2 projection with `groups` heads to `heads` heads (repeat_interleave order). Exact.
template <typename Derived, typename = std::enable_if_t<detail::is_tensor_of_rank_v<Derived, 1, 2>>>
auto expand_heads(const Derived& w, Index groups, Index heads, WeightLayout layout = WeightLayout::linear) {
  detail::check_tensor<Derived>();
  using T = detail::tensor_elem_t<Derived>;
  const auto s = detail::shape_of(w, groups, layout, "expand_heads");
  detail::require<shape_error>(heads > 0 && heads % groups == 0, "shape", "expand_heads: heads H = ", heads,
                               " is not a positive multiple of groups G = ", groups);
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

}  // namespace gqa
