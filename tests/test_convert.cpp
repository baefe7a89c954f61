// Tests of gqa/convert.hpp: pooling K/V projection heads (mean / first / random), exact expansion, explicit
// groupings, both weight layouts, biases, argument errors, and the GQA paper's equivalence with MHA whose K/V
// heads were replaced by their group means (through gqa::attention).
#include "gqa/attention.hpp"
#include "gqa/convert.hpp"
#include "gqa/reference.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
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
std::vector<T> pool(const std::vector<T>& in, const ProjectionShape& s, Index kv_heads, const gqa::ConvertOptions& o = {}) {
  std::vector<T> out(static_cast<std::size_t>(s.with_heads(kv_heads).size()));
  gqa::pool_heads<T>(in, s, kv_heads, out, o);
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
                         return m.find("kv_heads G = 3") != std::string::npos &&
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

// ---- pool_attention: whole layers, and the function-aware method `fit` ------------------------------------------

namespace {

using gqa::AttentionShape;
using gqa::RotaryPairs;

/// One layer's weights in double (nn.Linear layout, as gqa::AttentionView), with its sizes.
struct Layer {
  AttentionShape shape;
  std::vector<double> wq, bq, wk, bk, wv, bv, wo, bo, norm_w, norm_b;
};

template <typename T>
std::vector<T> cast_to(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<gqa::compute_t<T>>(v[i]));
  return out;
}

template <typename T>
std::vector<double> cast_from(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<gqa::compute_t<T>>(v[i]));
  return out;
}

/// The layer after pool_attention<T>, in double, with kv_heads = the result's.
template <typename T>
Layer pooled(const Layer& l, Index kv_heads, const gqa::ConvertOptions& o) {
  const auto wq = cast_to<T>(l.wq), bq = cast_to<T>(l.bq), wk = cast_to<T>(l.wk), bk = cast_to<T>(l.bk),
             wv = cast_to<T>(l.wv), bv = cast_to<T>(l.bv), wo = cast_to<T>(l.wo), bo = cast_to<T>(l.bo),
             nw = cast_to<T>(l.norm_w), nb = cast_to<T>(l.norm_b);
  const auto r = gqa::pool_attention<T>({wq, bq, wk, bk, wv, bv, wo, bo, nw, nb}, l.shape, kv_heads, o);
  Layer out{l.shape, cast_from(r.wq), cast_from(r.bq), cast_from(r.wk), cast_from(r.bk), cast_from(r.wv),
            cast_from(r.bv), cast_from(r.wo), cast_from(r.bo), l.norm_w, l.norm_b};
  out.shape.kv_heads = kv_heads;
  return out;
}

/// Naive double attention layer on tokens x [S, hidden]: y = O(concat_h softmax(q_h k^T / sqrt(D)) v) + bo, with
/// the rotary embedding (theta 10000) at positions 0 .. S-1 when the shape has one, no mask. Returns [S, hidden].
std::vector<double> run_layer(const Layer& l, const std::vector<double>& x, Index S) {
  const auto& s = l.shape;
  const Index d = s.hidden, D = s.head_dim, H = s.query_heads, G = s.kv_heads, r = H / G;
  auto project = [&](const std::vector<double>& w, const std::vector<double>& b, Index rows) {
    std::vector<double> y(static_cast<std::size_t>(S * rows));
    for (Index t = 0; t < S; ++t)
      for (Index j = 0; j < rows; ++j) {
        double acc = b.empty() ? 0.0 : b[std::size_t(j)];
        for (Index i = 0; i < d; ++i) acc += w[std::size_t(j * d + i)] * x[std::size_t(t * d + i)];
        y[std::size_t(t * rows + j)] = acc;
      }
    return y;
  };
  auto q = project(l.wq, l.bq, H * D), k = project(l.wk, l.bk, G * D), v = project(l.wv, l.bv, G * D);
  auto rotate = [&](std::vector<double>& y, Index heads) {
    if (s.rotary == RotaryPairs::none) return;
    for (Index t = 0; t < S; ++t)
      for (Index h = 0; h < heads; ++h)
        for (Index p = 0; p < D / 2; ++p) {
          const Index a = s.rotary == RotaryPairs::half_split ? p : 2 * p;
          const Index b = s.rotary == RotaryPairs::half_split ? p + D / 2 : 2 * p + 1;
          const double angle = double(t) * std::pow(10000.0, -2.0 * double(p) / double(D));
          double& re = y[std::size_t((t * heads + h) * D + a)];
          double& im = y[std::size_t((t * heads + h) * D + b)];
          const double nr = re * std::cos(angle) - im * std::sin(angle), ni = re * std::sin(angle) + im * std::cos(angle);
          re = nr;
          im = ni;
        }
  };
  rotate(q, H);
  rotate(k, G);
  std::vector<double> heads_out(std::size_t(S * H * D), 0.0);
  std::vector<double> p(static_cast<std::size_t>(S));
  for (Index h = 0; h < H; ++h)
    for (Index i = 0; i < S; ++i) {
      double mx = -1e300, sum = 0;
      for (Index j = 0; j < S; ++j) {
        double dot = 0;
        for (Index e = 0; e < D; ++e) dot += q[std::size_t((i * H + h) * D + e)] * k[std::size_t((j * G + h / r) * D + e)];
        p[std::size_t(j)] = dot / std::sqrt(double(D));
        mx = std::max(mx, p[std::size_t(j)]);
      }
      for (auto& e : p) sum += (e = std::exp(e - mx));
      for (Index j = 0; j < S; ++j)
        for (Index e = 0; e < D; ++e)
          heads_out[std::size_t((i * H + h) * D + e)] += p[std::size_t(j)] / sum * v[std::size_t((j * G + h / r) * D + e)];
    }
  std::vector<double> y(std::size_t(S * d));
  for (Index t = 0; t < S; ++t)
    for (Index i = 0; i < d; ++i) {
      double acc = l.bo.empty() ? 0.0 : l.bo[std::size_t(i)];
      for (Index j = 0; j < H * D; ++j) acc += l.wo[std::size_t(i * H * D + j)] * heads_out[std::size_t(t * H * D + j)];
      y[std::size_t(t * d + i)] = acc;
    }
  return y;
}

/// max |a - b| / max |b|.
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / den;
}

std::vector<double> gaussian(Index n, std::mt19937& rng, double sigma = 1.0) {
  std::normal_distribution<double> nd(0.0, sigma);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = nd(rng);
  return v;
}

/// Rows [first, first + n) of a row-major matrix with `cols` columns replaced by T * those rows (T n x n).
void transform_rows(std::vector<double>& w, Index first, Index n, Index cols, const std::vector<double>& t) {
  std::vector<double> old(w.begin() + first * cols, w.begin() + (first + n) * cols);
  for (Index i = 0; i < n; ++i)
    for (Index c = 0; c < cols; ++c) {
      double acc = 0;
      for (Index j = 0; j < n; ++j) acc += t[std::size_t(i * n + j)] * old[std::size_t(j * cols + c)];
      w[std::size_t((first + i) * cols + c)] = acc;
    }
}

/// A random layer; `biases` adds all six biases and a LayerNorm-style norm_weight/norm_bias.
Layer random_layer(AttentionShape s, bool biases, std::mt19937& rng) {
  const Index d = s.hidden, hq = s.query_heads * s.head_dim, hk = s.kv_heads * s.head_dim;
  Layer l{s, gaussian(hq * d, rng, 0.4), {}, gaussian(hk * d, rng, 0.4), {}, gaussian(hk * d, rng), {},
          gaussian(d * hq, rng), {}, {}, {}};
  if (biases) {
    l.bq = gaussian(hq, rng, 0.3);
    l.bk = gaussian(hk, rng, 0.3);
    l.bv = gaussian(hk, rng, 0.3);
    l.bo = gaussian(d, rng, 0.3);
    l.norm_w = gaussian(d, rng, 0.3);
    for (auto& e : l.norm_w) e += 1.0;
    l.norm_b = gaussian(d, rng, 0.2);
  }
  return l;
}

/// Inputs as the layer sees them: norm_weight * n + norm_bias with n standard normal (or plain n without a norm).
std::vector<double> layer_inputs(const Layer& l, Index S, std::mt19937& rng) {
  auto x = gaussian(S * l.shape.hidden, rng);
  if (!l.norm_w.empty())
    for (Index t = 0; t < S; ++t)
      for (Index i = 0; i < l.shape.hidden; ++i) {
        auto& e = x[std::size_t(t * l.shape.hidden + i)];
        e = e * l.norm_w[std::size_t(i)] + l.norm_b[std::size_t(i)];
      }
  return x;
}

/// Makes every KV head of each adjacent group of `group` heads a function-preserving transform of the group's
/// first head: K by a random invertible D x D matrix (without rotary embedding) or a scale and rotation per
/// rotary pair (with one), V by a random invertible D x D matrix. The model's function changes, but within a group
/// the heads now differ only by what the function ignores, once the queries and outputs are refitted.
void make_heads_equivalent(Layer& l, Index group, std::mt19937& rng) {
  const auto& s = l.shape;
  const Index D = s.head_dim, d = s.hidden;
  auto invertible = [&] {
    auto t = gaussian(D * D, rng, 0.5 / std::sqrt(double(D)));
    for (Index i = 0; i < D; ++i) t[std::size_t(i * D + i)] += 1.0;  // near the identity: well conditioned
    return t;
  };
  for (Index k = 0; k < s.kv_heads; ++k) {
    if (k % group == 0) continue;
    const Index first = k - k % group;
    // A head's bias is its weights' extra column: copied and transformed with them.
    auto copy_head = [&](std::vector<double>& w, std::vector<double>& b) {
      std::copy(w.begin() + first * D * d, w.begin() + (first + 1) * D * d, w.begin() + k * D * d);
      if (!b.empty()) std::copy(b.begin() + first * D, b.begin() + (first + 1) * D, b.begin() + k * D);
    };
    auto transform_head = [&](std::vector<double>& w, std::vector<double>& b, const std::vector<double>& t) {
      transform_rows(w, k * D, D, d, t);
      if (!b.empty()) transform_rows(b, k * D, D, 1, t);
    };
    copy_head(l.wk, l.bk);
    copy_head(l.wv, l.bv);
    transform_head(l.wv, l.bv, invertible());
    if (s.rotary == RotaryPairs::none) {
      transform_head(l.wk, l.bk, invertible());
      continue;
    }
    std::vector<double> t(std::size_t(D * D), 0.0);  // block rotation-scale per pair, in the pair layout
    for (Index p = 0; p < D / 2; ++p) {
      const Index a = s.rotary == RotaryPairs::half_split ? p : 2 * p;
      const Index b = s.rotary == RotaryPairs::half_split ? p + D / 2 : 2 * p + 1;
      std::uniform_real_distribution<double> ang(0, 6.283185307179586), mag(0.5, 2.0);
      const double phi = ang(rng), m = mag(rng);
      t[std::size_t(a * D + a)] = m * std::cos(phi);
      t[std::size_t(a * D + b)] = -m * std::sin(phi);
      t[std::size_t(b * D + a)] = m * std::sin(phi);
      t[std::size_t(b * D + b)] = m * std::cos(phi);
    }
    transform_head(l.wk, l.bk, t);
  }
}

gqa::ConvertOptions with_method(gqa::PoolMethod m) {
  gqa::ConvertOptions o;
  o.method = m;
  return o;
}

}  // namespace

TEST_CASE("pool_attention fit: heads that differ only by what the function ignores pool exactly; mean does not",
          "[convert][fit]") {
  // Exact in double up to the eigensolver's rounding (relative 1e-9 is ~1e6 ulps of margin for 24-feature layers);
  // mean pooling of the same heads loses the function (relative error of order 1).
  std::mt19937 rng(21);
  struct Case {
    AttentionShape shape;
    Index kv_heads;
    bool biases;
  };
  const Case cases[] = {
      {{24, 6, 6, 4, RotaryPairs::none}, 2, true},         // BERT-like MHA, groups of 3, biases and a LayerNorm
      {{24, 6, 6, 4, RotaryPairs::none}, 1, false},        // MQA
      {{20, 6, 3, 8, RotaryPairs::half_split}, 1, false},  // Llama-like GQA 3 -> 1, Hugging Face rotary pairs
      {{20, 8, 4, 6, RotaryPairs::interleaved}, 2, true},  // interleaved pairs, with biases (k bias rotates)
  };
  for (const auto& c : cases) {
    CAPTURE(c.shape.query_heads, c.shape.kv_heads, c.shape.head_dim, c.kv_heads, int(c.shape.rotary), c.biases);
    Layer l = random_layer(c.shape, c.biases, rng);
    make_heads_equivalent(l, c.shape.kv_heads / c.kv_heads, rng);
    const Index S = 9;
    const auto x = layer_inputs(l, S, rng);
    const auto want = run_layer(l, x, S);
    CHECK(relative_error(run_layer(pooled<double>(l, c.kv_heads, with_method(gqa::PoolMethod::fit)), x, S), want) < 1e-9);
    CHECK(relative_error(run_layer(pooled<double>(l, c.kv_heads, with_method(gqa::PoolMethod::mean)), x, S), want) > 0.05);
    // float storage: one rounding of weights of size ~1 -> relative error ~1e-6 through one layer
    CHECK(relative_error(run_layer(pooled<float>(l, c.kv_heads, with_method(gqa::PoolMethod::fit)), x, S), want) < 1e-4);
  }
}

TEMPLATE_TEST_CASE("pool_attention: G = kv_heads is the identity and an expanded layer pools back, bit for bit",
                   "[convert][fit]", float, double, gqa::bfloat16, gqa::half) {
  std::mt19937 rng(22);
  for (auto rotary : {RotaryPairs::none, RotaryPairs::half_split}) {
    for (bool biases : {false, true}) {
      // A GQA layer with 2 KV heads, stored in TestType (the double values rounded once).
      Layer l = random_layer({12, 4, 2, 4, rotary}, biases, rng);
      for (auto* v : {&l.wq, &l.bq, &l.wk, &l.bk, &l.wv, &l.bv, &l.wo, &l.bo, &l.norm_w, &l.norm_b})
        *v = cast_from(cast_to<TestType>(*v));
      for (auto m : {gqa::PoolMethod::fit, gqa::PoolMethod::mean, gqa::PoolMethod::first, gqa::PoolMethod::automatic}) {
        CAPTURE(int(rotary), biases, gqa::to_string(m));
        const Layer same = pooled<TestType>(l, 2, with_method(m));
        CHECK((same.wq == l.wq && same.bq == l.bq && same.wk == l.wk && same.bk == l.bk && same.wv == l.wv &&
               same.bv == l.bv && same.wo == l.wo && same.bo == l.bo));
        // Expanded to MHA (4 KV heads, each repeated), then pooled back to 2.
        Layer wide = l;
        wide.shape.kv_heads = 4;
        const ProjectionShape ks{WeightLayout::linear, 2, 4, 12}, kb = ProjectionShape::bias(2, 4);
        wide.wk = expand(l.wk, ks, 4);
        wide.wv = expand(l.wv, ks, 4);
        if (biases) {
          wide.bk = expand(l.bk, kb, 4);
          wide.bv = expand(l.bv, kb, 4);
        }
        const Layer back = pooled<TestType>(wide, 2, with_method(m));
        CHECK((back.wq == l.wq && back.bq == l.bq && back.wk == l.wk && back.bk == l.bk && back.wv == l.wv &&
               back.bv == l.bv && back.wo == l.wo && back.bo == l.bo));
      }
    }
  }
}

TEST_CASE("pool_attention: mean, first and random pool K/V as pool_heads does and keep Q/O", "[convert][fit]") {
  std::mt19937 rng(23);
  const Layer l = random_layer({10, 6, 6, 4, RotaryPairs::none}, true, rng);
  const ProjectionShape ks{WeightLayout::linear, 6, 4, 10}, kb = ProjectionShape::bias(6, 4);
  const auto wk = cast_to<float>(l.wk), bk = cast_to<float>(l.bk), wv = cast_to<float>(l.wv), bv = cast_to<float>(l.bv);
  for (auto m : {gqa::PoolMethod::mean, gqa::PoolMethod::first, gqa::PoolMethod::random}) {
    gqa::ConvertOptions o = with_method(m);
    o.seed = 5;
    const auto wq = cast_to<float>(l.wq), bq = cast_to<float>(l.bq), wo = cast_to<float>(l.wo), bo = cast_to<float>(l.bo);
    const auto r = gqa::pool_attention<float>({wq, bq, wk, bk, wv, bv, wo, bo, {}, {}}, l.shape, 3, o);
    CHECK(bitwise_equal(r.wk, pool(wk, ks, 3, o)));
    CHECK(bitwise_equal(r.bk, pool(bk, kb, 3, o)));
    CHECK(bitwise_equal(r.wv, pool(wv, ks, 3, o)));
    CHECK(bitwise_equal(r.bv, pool(bv, kb, 3, o)));
    CHECK((bitwise_equal(r.wq, wq) && bitwise_equal(r.bq, bq) && bitwise_equal(r.wo, wo) && bitwise_equal(r.bo, bo)));
  }
}

TEST_CASE("pool_attention: a non-adjacent assignment reorders the query heads and keeps the function",
          "[convert][fit]") {
  // Heads 0, 2, 4 and 1, 3, 5 are made equivalent (the groups of an interleaved assignment): fit with that
  // assignment is exact once the result's query heads follow query_head_order; mean with it equals pooling the
  // reordered layer adjacently.
  std::mt19937 rng(24);
  Layer l = random_layer({16, 6, 6, 4, RotaryPairs::none}, true, rng);
  Layer adjacent = l;  // heads reordered 0 2 4 1 3 5, then made equivalent in adjacent groups of 3
  const std::vector<Index> assignment{0, 1, 0, 1, 0, 1}, order{0, 2, 4, 1, 3, 5};
  const ProjectionShape qs{WeightLayout::linear, 6, 4, 16}, os{WeightLayout::hidden_first, 6, 4, 16},
      bs = ProjectionShape::bias(6, 4);
  auto reorder = [&](std::vector<double>& v, const ProjectionShape& s) {
    std::vector<double> p(v.size());
    gqa::permute_heads<double>(v, s, order, p);
    v = p;
  };
  for (auto* v : {&adjacent.wq, &adjacent.wk, &adjacent.wv}) reorder(*v, qs);
  for (auto* v : {&adjacent.bq, &adjacent.bk, &adjacent.bv}) reorder(*v, bs);
  reorder(adjacent.wo, os);
  make_heads_equivalent(adjacent, 3, rng);
  // Undo the reordering on the equivalent heads: the original layer, with equivalent heads 0 2 4 and 1 3 5.
  const std::vector<Index> inverse{0, 3, 1, 4, 2, 5};
  auto undo = [&](const std::vector<double>& v, const ProjectionShape& s) {
    std::vector<double> p(v.size());
    gqa::permute_heads<double>(v, s, inverse, p);
    return p;
  };
  l = adjacent;
  l.wq = undo(adjacent.wq, qs), l.wk = undo(adjacent.wk, qs), l.wv = undo(adjacent.wv, qs);
  l.bq = undo(adjacent.bq, bs), l.bk = undo(adjacent.bk, bs), l.bv = undo(adjacent.bv, bs);
  l.wo = undo(adjacent.wo, os);
  const Index S = 7;
  const auto x = layer_inputs(l, S, rng);
  const auto want = run_layer(l, x, S);
  REQUIRE(relative_error(run_layer(adjacent, x, S), want) < 1e-12);  // the reordering keeps the function
  gqa::ConvertOptions o = with_method(gqa::PoolMethod::fit);
  o.assignment = assignment;
  CHECK(relative_error(run_layer(pooled<double>(l, 2, o), x, S), want) < 1e-9);
  CHECK(relative_error(run_layer(pooled<double>(l, 2, with_method(gqa::PoolMethod::fit)), x, S), want) > 0.05);
  o.method = gqa::PoolMethod::mean;
  const Layer a = pooled<double>(l, 2, o), b = pooled<double>(adjacent, 2, with_method(gqa::PoolMethod::mean));
  CHECK((a.wq == b.wq && a.bq == b.bq && a.wk == b.wk && a.bk == b.bk && a.wv == b.wv && a.bv == b.bv &&
         a.wo == b.wo && a.bo == b.bo));
}

TEST_CASE("pool_attention fit keeps more of random heads' function than mean pooling (no rotary embedding)",
          "[convert][fit]") {
  // Random heads share nothing a fit could recover exactly; fit still keeps the best D-dimensional K and V of each
  // group, so its error is below mean pooling's (fixed seeds; observed ratios 0.81 at G = 2, 0.90 at G = 1).
  // Rotary embedding is left out: there fit is not reliably better (see the header's KNOWN SHORTFALL).
  std::mt19937 rng(25);
  const Layer l = random_layer({32, 8, 8, 8, RotaryPairs::none}, true, rng);
  const Index S = 16;
  const auto x = layer_inputs(l, S, rng);
  const auto want = run_layer(l, x, S);
  auto rms_error = [&](const Layer& p) {
    const auto y = run_layer(p, x, S);
    double e = 0;
    for (std::size_t i = 0; i < y.size(); ++i) e += (y[i] - want[i]) * (y[i] - want[i]);
    return std::sqrt(e / double(y.size()));
  };
  for (Index g : {Index(4), Index(2), Index(1)}) {
    CAPTURE(g);
    const double fit = rms_error(pooled<double>(l, g, with_method(gqa::PoolMethod::fit)));
    const double mean = rms_error(pooled<double>(l, g, with_method(gqa::PoolMethod::mean)));
    CHECK(fit < 0.95 * mean);
  }
}

TEST_CASE("pool_attention: bad arguments throw, naming the argument and the values", "[convert][fit][errors]") {
  using Catch::Matchers::Contains;
  std::mt19937 rng(26);
  const Layer l = random_layer({10, 4, 2, 4, RotaryPairs::none}, true, rng);
  auto f = [](const std::vector<double>& v) { return cast_to<float>(v); };
  auto wq = f(l.wq), bq = f(l.bq), wk = f(l.wk), bk = f(l.bk), wv = f(l.wv), bv = f(l.bv), wo = f(l.wo), bo = f(l.bo);
  const gqa::ConvertOptions fit = with_method(gqa::PoolMethod::fit);
  auto call = [&](AttentionShape s, Index g, const gqa::ConvertOptions& o) {
    return gqa::pool_attention<float>({wq, bq, wk, bk, wv, bv, wo, bo, {}, {}}, s, g, o);
  };
  CHECK_NOTHROW(call(l.shape, 1, fit));
  CHECK_THROWS_MATCHES(call({10, 4, 3, 4}, 1, fit), gqa::shape_error, Catch::Matchers::Message(
      "[gqa.shape] pool_attention: kv_heads = 3 does not divide query_heads = 4"));
  CHECK_THROWS_WITH(call(l.shape, 3, fit), Contains("G = 3") && Contains("H = 2"));
  CHECK_THROWS_WITH(call({10, 4, 2, 3, RotaryPairs::half_split}, 1, fit), Contains("even head_dim, got 3"));
  CHECK_THROWS_WITH(call({11, 4, 2, 4}, 1, fit), Contains("wq [query_heads*head_dim, hidden].size() = 160") &&
                                                     Contains("needs 176"));
  bk.pop_back();
  CHECK_THROWS_AS(call(l.shape, 1, fit), gqa::shape_error);
  CHECK_THROWS_WITH(call(l.shape, 1, fit), Contains("bk [kv_heads*head_dim].size() = 7") && Contains("(or 0: none)"));
  bk = f(l.bk);
  wv[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(call(l.shape, 1, fit), gqa::invalid_argument);
  CHECK_THROWS_WITH(call(l.shape, 1, fit), Contains("[gqa.convert.nonfinite]") && Contains("wv[5] = nan"));
  CHECK_NOTHROW(call(l.shape, 1, with_method(gqa::PoolMethod::mean)));  // mean pools whatever it is given
  gqa::ConvertOptions bad = fit;
  bad.assignment = {0, 0};
  CHECK_THROWS_WITH(call(l.shape, 2, bad), Contains("group 0 has 2 heads"));
  // pool_heads cannot do fit: it sees one tensor.
  std::vector<float> out(static_cast<std::size_t>(4 * 10));
  CHECK_THROWS_WITH(gqa::pool_heads<float>(wk, {WeightLayout::linear, 2, 4, 10}, 1, out, fit),
                    Contains("[gqa.convert.method]") && Contains("pool_attention()"));
  CHECK_THROWS_WITH(gqa::pool_heads<float>(wk, {WeightLayout::linear, 2, 4, 10}, 1, out,
                                            with_method(gqa::PoolMethod::automatic)),
                    Contains("options.method = auto") && Contains("pool_attention()"));
  CHECK(gqa::parse_pool_method("auto") == gqa::PoolMethod::automatic);
  CHECK(gqa::parse_pool_method("fit") == gqa::PoolMethod::fit);
  CHECK_FALSE(gqa::parse_pool_method("best").has_value());
  CHECK(std::string(gqa::to_string(gqa::PoolMethod::fit)) == "fit");
  CHECK(std::string(gqa::to_string(gqa::PoolMethod::automatic)) == "auto");
}

TEST_CASE("pool_attention: automatic is fit without rotary embedding and mean with it, bit for bit", "[convert][fit]") {
  std::mt19937 rng(27);
  CHECK(gqa::best_data_free_method(RotaryPairs::none) == gqa::PoolMethod::fit);
  CHECK(gqa::best_data_free_method(RotaryPairs::half_split) == gqa::PoolMethod::mean);
  CHECK(gqa::best_data_free_method(RotaryPairs::interleaved) == gqa::PoolMethod::mean);
  for (auto rotary : {RotaryPairs::none, RotaryPairs::half_split, RotaryPairs::interleaved}) {
    CAPTURE(int(rotary));
    const Layer l = random_layer({12, 6, 3, 4, rotary}, true, rng);
    const Layer a = pooled<float>(l, 1, with_method(gqa::PoolMethod::automatic));
    const Layer b = pooled<float>(l, 1, with_method(gqa::best_data_free_method(rotary)));
    CHECK((a.wq == b.wq && a.bq == b.bq && a.wk == b.wk && a.bk == b.bk && a.wv == b.wv && a.bv == b.bv &&
           a.wo == b.wo && a.bo == b.bo));
    CHECK((rotary == RotaryPairs::none) == (a.wq != cast_from(cast_to<float>(l.wq))));  // only fit rewrites q
  }
}
