// Tests of gqa/convert.hpp: pooling K/V projection heads (mean / first / random), exact expansion, explicit
// groupings, both weight layouts, biases, argument errors, and the GQA paper's equivalence with MHA whose K/V
// heads were replaced by their group means (through gqa::attention).
#include "gqa/attention.hpp"
#include "gqa/convert.hpp"
#include "gqa/reference.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using gqa::Index;
using gqa::ProjectionShape;
using gqa::WeightLayout;

template <typename T>
using W2 = gqa::RowMajorTensor<T, 2>;

/// Values in [-1, 1] that every element type represents exactly (multiples of 1/64), so the exact mean of a group is
/// known in double whatever T is.
template <typename T>
std::vector<T> exact_values(Index n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-64, 64);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(static_cast<float>(d(rng)) / 64.f);
  return v;
}

template <typename T>
std::vector<T> normal_values(Index n, unsigned seed, float sigma = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, sigma);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Element (head h, d, i) of a projection in either layout.
template <typename T>
double at(const std::vector<T>& w, const ProjectionShape& s, Index h, Index d, Index i) {
  const Index idx = s.layout == WeightLayout::linear ? (h * s.head_dim + d) * s.hidden + i
                                                     : (i * s.heads + h) * s.head_dim + d;
  return static_cast<double>(w[static_cast<std::size_t>(idx)]);
}

template <typename T>
std::vector<T> pool(const std::vector<T>& in, const ProjectionShape& s, Index groups, const gqa::ConvertOptions& o = {}) {
  std::vector<T> out(static_cast<std::size_t>(s.with_heads(groups).size()));
  gqa::pool_heads<T>(in, s, groups, out, o);
  return out;
}

template <typename T>
std::vector<T> expand(const std::vector<T>& in, const ProjectionShape& s, Index heads) {
  std::vector<T> out(static_cast<std::size_t>(s.with_heads(heads).size()));
  gqa::expand_heads<T>(in, s, heads, out);
  return out;
}

/// Relative precision of one rounding to T (half an ulp at 1).
template <typename T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, gqa::bfloat16>) return std::ldexp(1.0, -8);
  else if constexpr (std::is_same_v<T, gqa::half>) return std::ldexp(1.0, -11);
  else if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
  else return std::ldexp(1.0, -53);
}

const ProjectionShape shapes[] = {
    {WeightLayout::linear, 8, 4, 6},        // nn.Linear [H*D, hidden]
    {WeightLayout::hidden_first, 8, 4, 6},  // [hidden, H, D]
    ProjectionShape::bias(8, 4),            // bias [H*D]
};

}  // namespace

TEMPLATE_TEST_CASE("pool_heads: G = H is the identity, bit for bit", "[convert]", float, double, gqa::bfloat16,
                   gqa::half) {
  for (const auto& s : shapes) {
    const auto in = normal_values<TestType>(s.size(), 1);
    for (auto m : {gqa::PoolMethod::mean, gqa::PoolMethod::first}) {
      gqa::ConvertOptions o;
      o.method = m;
      CHECK(bitwise_equal(pool(in, s, s.heads, o), in));
    }
  }
}

TEMPLATE_TEST_CASE("pool_heads: mean of the groups' heads, G = 1 the mean of all", "[convert]", float, double,
                   gqa::bfloat16, gqa::half) {
  // Inputs are exact in every type, so the double mean below is exact and the result may differ from it only by
  // the one rounding to T (a relative unit roundoff) plus float summation error (inputs <= 1, at most 8 terms).
  const double sum_err = std::is_same_v<TestType, double> ? 1e-15 : 8 * std::ldexp(1.0, -24);
  for (const auto& s : shapes) {
    const auto in = exact_values<TestType>(s.size(), 2);
    for (Index g : {Index(1), Index(2), Index(4)}) {
      const auto out = pool(in, s, g);
      const auto os = s.with_heads(g);
      const Index n = s.heads / g;
      for (Index grp = 0; grp < g; ++grp)
        for (Index d = 0; d < s.head_dim; ++d)
          for (Index i = 0; i < s.hidden; ++i) {
            double mean = 0;
            for (Index h = grp * n; h < (grp + 1) * n; ++h) mean += at(in, s, h, d, i);
            mean /= double(n);
            CHECK_THAT(at(out, os, grp, d, i),
                       Catch::Matchers::WithinAbs(mean, unit_roundoff<TestType>() * std::abs(mean) + sum_err));
          }
    }
  }
}

TEMPLATE_TEST_CASE("expand_heads then pool_heads returns the projection exactly", "[convert]", float, double,
                   gqa::bfloat16, gqa::half) {
  // Group sizes 3 and 5 matter: a plain sum of three equal floats can round; the shifted mean cannot.
  struct Case {
    Index g, h;
  };
  for (Case c : {Case{2, 8}, Case{4, 12}, Case{1, 5}, Case{3, 3}, Case{1, 1}}) {
    for (auto layout : {WeightLayout::linear, WeightLayout::hidden_first}) {
      const ProjectionShape gs{layout, c.g, 3, 5};
      const auto w = normal_values<TestType>(gs.size(), 3, 0.7f);
      const auto expanded = expand(w, gs, c.h);
      // Expansion is repeat_interleave: head j of the result is head j / (H/G) of the input.
      const auto es = gs.with_heads(c.h);
      for (Index j = 0; j < c.h; ++j)
        for (Index d = 0; d < 3; ++d)
          for (Index i = 0; i < 5; ++i) REQUIRE(at(expanded, es, j, d, i) == at(w, gs, j / (c.h / c.g), d, i));
      for (auto m : {gqa::PoolMethod::mean, gqa::PoolMethod::first}) {
        gqa::ConvertOptions o;
        o.method = m;
        CHECK(bitwise_equal(pool(expanded, es, c.g, o), w));
      }
    }
  }
}

TEST_CASE("pool_heads first keeps the first head of each group", "[convert]") {
  for (const auto& s : shapes) {
    const auto in = normal_values<float>(s.size(), 4);
    gqa::ConvertOptions o;
    o.method = gqa::PoolMethod::first;
    const auto out = pool(in, s, 2, o);
    const auto os = s.with_heads(2);
    for (Index g = 0; g < 2; ++g)
      for (Index d = 0; d < s.head_dim; ++d)
        for (Index i = 0; i < s.hidden; ++i) REQUIRE(at(out, os, g, d, i) == at(in, s, g * 4, d, i));
  }
}

TEST_CASE("pool_heads random: seeded, deterministic, with the input's standard deviation", "[convert]") {
  const ProjectionShape s{WeightLayout::linear, 8, 16, 128};
  const auto in = normal_values<float>(s.size(), 5, 0.25f);
  gqa::ConvertOptions o;
  o.method = gqa::PoolMethod::random;
  o.seed = 11;
  const auto a = pool(in, s, 2, o), b = pool(in, s, 2, o);
  CHECK(bitwise_equal(a, b));
  o.seed = 12;
  CHECK_FALSE(bitwise_equal(a, pool(in, s, 2, o)));

  // N(0, sigma^2) with sigma the population standard deviation of all of `in`: 4096 draws estimate the standard
  // deviation within a few percent and the mean within a few sigma / 64.
  double mi = 0, vi = 0, mo = 0, vo = 0;
  for (float x : in) mi += x;
  mi /= double(in.size());
  for (float x : in) vi += (x - mi) * (x - mi);
  const double sigma = std::sqrt(vi / double(in.size()));
  for (float x : a) mo += x;
  mo /= double(a.size());
  for (float x : a) vo += (x - mo) * (x - mo);
  CHECK_THAT(std::sqrt(vo / double(a.size())), Catch::Matchers::WithinRel(sigma, 0.05));
  CHECK(std::abs(mo) < 5 * sigma / std::sqrt(double(a.size())));

  // Only sigma depends on the input: doubling every weight (exact in binary) doubles every draw exactly.
  std::vector<float> twice(in);
  for (auto& x : twice) x *= 2;
  o.seed = 11;
  const auto c = pool(twice, s, 2, o);
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(c[i] == 2 * a[i]);
}

TEST_CASE("both layouts pool to the same heads", "[convert]") {
  const Index H = 6, D = 5, hidden = 7, G = 3;
  const ProjectionShape lin{WeightLayout::linear, H, D, hidden}, hf{WeightLayout::hidden_first, H, D, hidden};
  const auto w = normal_values<float>(lin.size(), 6);
  std::vector<float> wt(w.size());  // the same weights as [hidden, H, D]
  for (Index h = 0; h < H; ++h)
    for (Index d = 0; d < D; ++d)
      for (Index i = 0; i < hidden; ++i) wt[std::size_t((i * H + h) * D + d)] = w[std::size_t((h * D + d) * hidden + i)];
  for (auto m : {gqa::PoolMethod::mean, gqa::PoolMethod::first}) {
    gqa::ConvertOptions o;
    o.method = m;
    const auto a = pool(w, lin, G, o), b = pool(wt, hf, G, o);
    for (Index g = 0; g < G; ++g)
      for (Index d = 0; d < D; ++d)
        for (Index i = 0; i < hidden; ++i) REQUIRE(at(a, lin.with_heads(G), g, d, i) == at(b, hf.with_heads(G), g, d, i));
  }
  // The Eigen overloads agree with the span ones: rank 2 linear, rank 2 hidden_first ([hidden, H*D], o_proj-like)
  // and rank 3 [hidden, H, D].
  const auto expected = pool(w, lin, G);
  const auto expected_t = pool(wt, hf, G);
  Eigen::TensorMap<const W2<float>> w2(w.data(), H * D, hidden);
  const W2<float> p2 = gqa::pool_heads(w2, H, G);
  REQUIRE(p2.dimension(0) == G * D);
  REQUIRE(p2.dimension(1) == hidden);
  CHECK(bitwise_equal(std::vector<float>(p2.data(), p2.data() + p2.size()), expected));
  Eigen::TensorMap<const W2<float>> wt2(wt.data(), hidden, H * D);
  const W2<float> pt2 = gqa::pool_heads(wt2, H, G, {}, WeightLayout::hidden_first);
  REQUIRE(pt2.dimension(0) == hidden);
  REQUIRE(pt2.dimension(1) == G * D);
  CHECK(bitwise_equal(std::vector<float>(pt2.data(), pt2.data() + pt2.size()), expected_t));
  Eigen::TensorMap<const gqa::RowMajorTensor<float, 3>> w3(wt.data(), hidden, H, D);
  const auto p3 = gqa::pool_heads(w3, G);
  REQUIRE(p3.dimension(1) == G);
  CHECK(bitwise_equal(std::vector<float>(p3.data(), p3.data() + p3.size()), expected_t));
  const auto e3 = gqa::expand_heads(p3, H);
  REQUIRE(e3.dimension(1) == H);
  const auto back3 = gqa::pool_heads(e3, G);
  CHECK(bitwise_equal(std::vector<float>(back3.data(), back3.data() + back3.size()), expected_t));
}

TEST_CASE("biases are pooled like the weights' rows", "[convert]") {
  // A bias acts like a weight column for a constant input 1: pool [W | b] and its last column is pool(b).
  const Index H = 8, D = 4, hidden = 5, G = 2;
  const auto w = normal_values<float>(H * D * hidden, 7);
  const auto b = normal_values<float>(H * D, 8);
  std::vector<float> wb(static_cast<std::size_t>(H * D * (hidden + 1)));
  for (Index r = 0; r < H * D; ++r) {
    for (Index i = 0; i < hidden; ++i) wb[std::size_t(r * (hidden + 1) + i)] = w[std::size_t(r * hidden + i)];
    wb[std::size_t(r * (hidden + 1) + hidden)] = b[std::size_t(r)];
  }
  for (auto m : {gqa::PoolMethod::mean, gqa::PoolMethod::first}) {
    gqa::ConvertOptions o;
    o.method = m;
    const auto pwb = pool(wb, {WeightLayout::linear, H, D, hidden + 1}, G, o);
    const auto pb = pool(b, ProjectionShape::bias(H, D), G, o);
    Eigen::TensorMap<const gqa::RowMajorTensor<float, 1>> bt(b.data(), H * D);
    const auto pbt = gqa::pool_heads(bt, H, G, o);
    for (Index r = 0; r < G * D; ++r) {
      REQUIRE(pb[std::size_t(r)] == pwb[std::size_t(r * (hidden + 1) + hidden)]);
      REQUIRE(pbt(r) == pb[std::size_t(r)]);
    }
  }
}

TEST_CASE("GQA to fewer groups: G1 -> G2 equals pooling H -> G2", "[convert]") {
  const ProjectionShape s{WeightLayout::linear, 8, 4, 6};
  const auto w = normal_values<double>(s.size(), 9);
  const auto direct = pool(w, s, 2);
  const auto via4 = pool(pool(w, s, 4), s.with_heads(4), 2);
  const auto mqa = pool(pool(w, s, 4), s.with_heads(4), 1);
  const auto direct_mqa = pool(w, s, 1);
  for (std::size_t i = 0; i < direct.size(); ++i)
    REQUIRE_THAT(via4[i], Catch::Matchers::WithinAbs(direct[i], 1e-14));  // mean of means; double rounding only
  for (std::size_t i = 0; i < mqa.size(); ++i) REQUIRE_THAT(mqa[i], Catch::Matchers::WithinAbs(direct_mqa[i], 1e-14));
  std::vector<double> out(static_cast<std::size_t>(s.with_heads(3).size()));
  CHECK_THROWS_AS(gqa::pool_heads<double>(pool(w, s, 4), s.with_heads(4), 3, out), gqa::shape_error);
}

TEST_CASE("explicit grouping: adjacent assignment is the default; others pool the assigned heads", "[convert]") {
  const ProjectionShape s{WeightLayout::linear, 8, 3, 4};
  const auto w = normal_values<float>(s.size(), 10);
  gqa::ConvertOptions adjacent;
  adjacent.assignment = {0, 0, 0, 0, 1, 1, 1, 1};
  CHECK(gqa::is_adjacent(adjacent.assignment, 2));
  CHECK(bitwise_equal(pool(w, s, 2, adjacent), pool(w, s, 2)));

  gqa::ConvertOptions strided;
  strided.assignment = {0, 1, 0, 1, 0, 1, 0, 1};  // heads 0,2,4,6 -> group 0; 1,3,5,7 -> group 1
  CHECK_FALSE(gqa::is_adjacent(strided.assignment, 2));
  const auto out = pool(w, s, 2, strided);
  std::vector<float> gathered(w.size());  // heads reordered 0,2,4,6,1,3,5,7 and pooled adjacently
  const auto order = gqa::query_head_order(8, 2, strided.assignment);
  CHECK(order == std::vector<Index>{0, 2, 4, 6, 1, 3, 5, 7});
  gqa::permute_heads<float>(w, s, order, gathered);
  CHECK(bitwise_equal(out, pool(gathered, s, 2)));

  // A GQA input (G1 = 4 KV heads, H = 8 query heads): query heads move in blocks of H/G1 = 2.
  CHECK(gqa::query_head_order(8, 2, std::vector<Index>{1, 0, 0, 1}) == std::vector<Index>{2, 3, 4, 5, 0, 1, 6, 7});
}

TEST_CASE("explicit grouping: permuted Q rows and O columns keep the model's function", "[convert]") {
  // y = O(attention(x Wq^T, x Wk^T, x Wv^T)) for an MHA layer whose K/V heads are replaced by the mean of their
  // group under a non-adjacent assignment, versus the converted GQA layer (pooled K/V, Q rows and O columns in
  // query_head_order). Same function; the two differ only by float rounding in different summation orders.
  const Index B = 1, S = 6, hidden = 12, H = 6, D = 4, G = 2;
  const std::vector<Index> assignment{1, 0, 1, 0, 0, 1};
  const auto x = normal_values<float>(B * S * hidden, 20);
  const auto wq = normal_values<float>(H * D * hidden, 21, 0.3f), wk = normal_values<float>(H * D * hidden, 22, 0.3f);
  const auto wv = normal_values<float>(H * D * hidden, 23, 0.3f), wo = normal_values<float>(hidden * H * D, 24, 0.3f);
  const ProjectionShape lin{WeightLayout::linear, H, D, hidden};
  auto project = [&](const std::vector<float>& w, Index heads) {
    gqa::Tensor4<float> y(B, S, heads, D);
    for (Index t = 0; t < S; ++t)
      for (Index r = 0; r < heads * D; ++r) {
        float acc = 0;
        for (Index i = 0; i < hidden; ++i) acc += x[std::size_t(t * hidden + i)] * w[std::size_t(r * hidden + i)];
        y(0, t, r / D, r % D) = acc;
      }
    return y;
  };
  auto output = [&](const gqa::Tensor4<float>& attn, const std::vector<float>& o) {  // o: [hidden, H*D]
    std::vector<double> y(static_cast<std::size_t>(S * hidden));
    for (Index t = 0; t < S; ++t)
      for (Index m = 0; m < hidden; ++m) {
        double acc = 0;
        for (Index c = 0; c < H * D; ++c) acc += double(attn(0, t, c / D, c % D)) * o[std::size_t(m * H * D + c)];
        y[std::size_t(t * hidden + m)] = acc;
      }
    return y;
  };
  gqa::ConvertOptions opt;
  opt.assignment = assignment;
  // Reference: MHA, each K/V head replaced by its group's mean.
  auto group_mean = [&](const std::vector<float>& w) {
    const auto pooled = pool(w, lin, G, opt);
    std::vector<float> r(w.size());
    for (Index h = 0; h < H; ++h)
      std::copy_n(pooled.begin() + assignment[std::size_t(h)] * D * hidden, D * hidden, r.begin() + h * D * hidden);
    return r;
  };
  const auto y_ref = output(gqa::attention(project(wq, H), project(group_mean(wk), H), project(group_mean(wv), H)), wo);
  // Converted: G KV heads, Q rows and O columns permuted.
  const auto order = gqa::query_head_order(H, G, assignment);
  std::vector<float> wq2(wq.size()), wo2(wo.size());
  gqa::permute_heads<float>(wq, lin, order, wq2);
  gqa::permute_heads<float>(wo, {WeightLayout::hidden_first, H, D, hidden}, order, wo2);
  const auto y = output(gqa::attention(project(wq2, H), project(pool(wk, lin, G, opt), G), project(pool(wv, lin, G, opt), G)), wo2);
  double scale = 0;
  for (double v : y_ref) scale = std::max(scale, std::abs(v));
  for (std::size_t i = 0; i < y.size(); ++i) REQUIRE_THAT(y[i], Catch::Matchers::WithinAbs(y_ref[i], 1e-5 * scale));
  // And the adjacent grouping would give a different function: the assignment is not a no-op.
  const auto y_adjacent = output(gqa::attention(project(wq, H), project(pool(wk, lin, G), G), project(pool(wv, lin, G), G)), wo);
  double diff = 0;
  for (std::size_t i = 0; i < y.size(); ++i) diff = std::max(diff, std::abs(y_adjacent[i] - y_ref[i]));
  CHECK(diff > 1e-2 * scale);
}

TEST_CASE("the GQA paper's equivalence: GQA with pooled K/V == MHA with group-mean K/V heads", "[convert]") {
  // Uptraining starts from this model: GQA whose KV head g is the mean of its group's heads computes exactly what
  // MHA computes when each K/V head is replaced by its group mean. K/V are projected with the same weights in the
  // same order, so the K/V values are bitwise equal; the fast kernel then reads them per group (GQA) or per head
  // (MHA), and the outputs may differ by float rounding only: we allow 1e-6 (inputs O(1), outputs |y| <= max|v|).
  // The double reference repeats K/V heads (repeat_kv) exactly as expansion does, so there the outputs are equal.
  const Index B = 2, S = 9, hidden = 16, H = 8, D = 8;
  for (Index G : {Index(8), Index(4), Index(2), Index(1)}) {
    const auto x = normal_values<float>(B * S * hidden, 30);
    const auto wq = normal_values<float>(H * D * hidden, 31, 0.25f), wk = normal_values<float>(H * D * hidden, 32, 0.25f);
    const auto wv = normal_values<float>(H * D * hidden, 33, 0.25f);
    auto project = [&](const std::vector<float>& w, Index heads) {
      gqa::Tensor4<float> y(B, S, heads, D);
      for (Index t = 0; t < B * S; ++t)
        for (Index r = 0; r < heads * D; ++r) {
          float acc = 0;
          for (Index i = 0; i < hidden; ++i) acc += x[std::size_t(t * hidden + i)] * w[std::size_t(r * hidden + i)];
          y(t / S, t % S, r / D, r % D) = acc;
        }
      return y;
    };
    const ProjectionShape lin{WeightLayout::linear, H, D, hidden};
    const auto k_pooled = pool(wk, lin, G), v_pooled = pool(wv, lin, G);
    const auto k_gqa = project(k_pooled, G), v_gqa = project(v_pooled, G);
    const auto k_mha = project(expand(k_pooled, lin.with_heads(G), H), H);  // every head = its group's mean
    const auto v_mha = project(expand(v_pooled, lin.with_heads(G), H), H);
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < S; ++s)
        for (Index h = 0; h < H; ++h)
          for (Index d = 0; d < D; ++d) REQUIRE(k_mha(b, s, h, d) == k_gqa(b, s, h / (H / G), d));
    const auto q = project(wq, H);
    for (bool causal : {false, true}) {
      gqa::AttentionOptions opt;
      opt.causal = causal;
      const gqa::Tensor4<float> out_gqa = gqa::attention(q, k_gqa, v_gqa, opt);
      const gqa::Tensor4<float> out_mha = gqa::attention(q, k_mha, v_mha, opt);
      for (Index i = 0; i < out_gqa.size(); ++i)
        REQUIRE_THAT(out_gqa.data()[i], Catch::Matchers::WithinAbs(out_mha.data()[i], 1e-6));
      const auto ref_gqa = gqa::reference_attention(q, k_gqa, v_gqa, opt);
      const auto ref_mha = gqa::reference_attention(q, k_mha, v_mha, opt);
      for (Index i = 0; i < ref_gqa.size(); ++i) REQUIRE(ref_gqa.data()[i] == ref_mha.data()[i]);
      for (Index i = 0; i < out_gqa.size(); ++i)
        REQUIRE_THAT(out_gqa.data()[i], Catch::Matchers::WithinAbs(ref_gqa.data()[i], 1e-5));
    }
  }
}

TEST_CASE("convert: bad arguments throw, naming the argument and the values", "[convert][errors]") {
  using Catch::Matchers::Contains;
  const ProjectionShape s{WeightLayout::linear, 8, 4, 6};
  const auto w = normal_values<float>(s.size(), 40);
  std::vector<float> out(static_cast<std::size_t>(s.with_heads(2).size()));
  std::vector<float> out3(static_cast<std::size_t>(s.with_heads(3).size()));

  CHECK_THROWS_MATCHES(gqa::pool_heads<float>(w, s, 3, out3), gqa::shape_error,
                       Catch::Matchers::Predicate<gqa::shape_error>([](const gqa::shape_error& e) {
                         const std::string m = e.what();
                         return m.find("groups G = 3") != std::string::npos &&
                                m.find("heads H = 8") != std::string::npos;
                       }));
  CHECK_THROWS_WITH(gqa::pool_heads<float>(w, s, 0, out), Contains("must be positive"));
  std::vector<float> short_in(w.begin(), w.end() - 1);
  CHECK_THROWS_AS(gqa::pool_heads<float>(short_in, s, 2, out), gqa::shape_error);
  CHECK_THROWS_WITH(gqa::pool_heads<float>(short_in, s, 2, out), Contains("in.size() = 191") && Contains("needs 192"));
  CHECK_THROWS_WITH(gqa::pool_heads<float>(w, s, 2, out3), Contains("out.size() = 72") && Contains("needs 48"));
  CHECK_THROWS_AS(gqa::pool_heads<float>(w, {WeightLayout::linear, 8, 0, 6}, 2, out), gqa::shape_error);

  gqa::ConvertOptions o;
  o.assignment = {0, 1, 0, 1};
  CHECK_THROWS_WITH(gqa::pool_heads<float>(w, s, 2, out, o), Contains("options.assignment: size = 4") && Contains("H = 8"));
  o.assignment = {0, 0, 0, 1, 1, 1, 1, 1};
  CHECK_THROWS_AS(gqa::pool_heads<float>(w, s, 2, out, o), gqa::invalid_argument);
  CHECK_THROWS_WITH(gqa::pool_heads<float>(w, s, 2, out, o), Contains("group 0 has 3 heads") && Contains("H/G = 4"));
  o.assignment = {0, 0, 0, 0, 1, 1, 1, 2};
  CHECK_THROWS_WITH(gqa::pool_heads<float>(w, s, 2, out, o), Contains("options.assignment[7] = 2"));

  std::vector<float> big(static_cast<std::size_t>(s.with_heads(12).size()));
  CHECK_THROWS_WITH(gqa::expand_heads<float>(w, s, 12, big), Contains("heads H = 12") && Contains("G = 8"));
  std::vector<float> same(w.size());
  CHECK_THROWS_WITH(gqa::permute_heads<float>(w, s, std::vector<Index>{0, 1, 2, 3, 4, 5, 6, 6}, same),
                    Contains("order[7] = 6"));
  CHECK_THROWS_WITH(gqa::permute_heads<float>(w, s, std::vector<Index>{0, 1}, same), Contains("order.size() = 2"));
  CHECK_THROWS_WITH(gqa::query_head_order(6, 2, std::vector<Index>{0, 1, 0, 1}), Contains("query heads H = 6"));

  // Eigen overloads check the tensor's dims against the head count.
  W2<float> odd(30, 6);
  odd.setZero();
  CHECK_THROWS_WITH(gqa::pool_heads(odd, 8, 2), Contains("w dim 0 (heads*D) = 30") && Contains("heads = 8"));
  gqa::RowMajorTensor<float, 3> w3(6, 8, 4);
  w3.setZero();
  CHECK_THROWS_AS(gqa::pool_heads(w3, 3), gqa::shape_error);
}
