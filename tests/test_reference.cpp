// Tests of gqa/reference.hpp, the double-precision oracle every kernel test compares against: small cases whose
// softmax is worked out by hand, so that the oracle itself is trusted and not just self-consistent.
#include "gqa/reference.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using gqa::Index;
using gqa::Tensor4;
using Catch::Matchers::WithinAbs;

// The reference sums a handful of doubles here: 1e-14 leaves room for a few ulps of exp/log/tanh and nothing
// more, so a wrong weight (an off-by-one mask, a wrong scale) is caught by a margin of 10 orders of magnitude.
constexpr double kHandTol = 1e-14;
const double kInf = std::numeric_limits<double>::infinity();
const double kLn3 = std::log(3.0);

/// A [d0, d1, d2, d3] double tensor with the given values in row-major order.
Tensor4<double> tensor(Index d0, Index d1, Index d2, Index d3, const std::vector<double>& values) {
  Tensor4<double> t(d0, d1, d2, d3);
  REQUIRE(Index(values.size()) == t.size());
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = values[size_t(i)];
  return t;
}

}  // namespace

TEST_CASE("reference: softmax of two keys by hand (Sq=1, Sk=2, D=1)", "[reference]") {
  // Default scale 1/sqrt(1) = 1, logits {0, ln 3} -> weights {1/4, 3/4}; v = {4, 8} -> 1 + 6 = 7.
  // log-sum-exp = log(e^0 + e^ln3) = log 4.
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const auto k = tensor(1, 2, 1, 1, {0.0, kLn3});
  const auto v = tensor(1, 2, 1, 1, {4.0, 8.0});
  std::vector<float> lse(1);
  gqa::AttentionOptions opt;
  opt.lse = lse;
  const auto out = gqa::reference_attention(q, k, v, opt);
  CHECK_THAT(out(0, 0, 0, 0), WithinAbs(7.0, kHandTol));
  CHECK_THAT(lse[0], WithinAbs(std::log(4.0), 1e-6));  // lse is stored as float
}

TEST_CASE("reference: default scale is 1/sqrt(D)", "[reference]") {
  // D = 4: scale 1/2, q = (2, 0, 0, 0), k1 = (ln 3, 5, 5, 5) -> logits {0, ln 3} as above.
  const auto q = tensor(1, 1, 1, 4, {2, 0, 0, 0});
  const auto k = tensor(1, 2, 1, 4, {0, 7, -7, 1, kLn3, 5, 5, 5});
  const auto v = tensor(1, 2, 1, 4, {4, 0, 1, -1, 8, 4, 1, 3});
  const auto out = gqa::reference_attention(q, k, v);
  // out = 1/4 v0 + 3/4 v1.
  const double expect[4] = {7.0, 3.0, 1.0, 2.0};
  for (Index d = 0; d < 4; ++d) CHECK_THAT(out(0, 0, 0, d), WithinAbs(expect[d], kHandTol));
}

TEST_CASE("reference: custom scale replaces 1/sqrt(D)", "[reference]") {
  // scale 0.5, q = 2, k = {0, ln 3} -> logits {0, ln 3} (the default 1 would give {0, 2 ln 3}: weights 1/10, 9/10).
  const auto q = tensor(1, 1, 1, 1, {2.0});
  const auto k = tensor(1, 2, 1, 1, {0.0, kLn3});
  const auto v = tensor(1, 2, 1, 1, {4.0, 8.0});
  gqa::AttentionOptions opt;
  opt.scale = 0.5;
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs(7.0, kHandTol));
  CHECK_THAT(gqa::reference_attention(q, k, v)(0, 0, 0, 0), WithinAbs(0.4 + 7.2, kHandTol));
}

TEST_CASE("reference: query head j uses KV head j / (H/G) (repeat_interleave, not tiling)", "[reference]") {
  // H = 4, G = 2, q = 0: every weight is 1/2, so each head returns the mean of its KV head's two values.
  // KV head 0 has v {1, 3} (mean 2), KV head 1 has v {10, 30} (mean 20): heads 0, 1 -> 2 and heads 2, 3 -> 20.
  // The tiling order (j % G) would give 2, 20, 2, 20.
  Tensor4<double> q(1, 1, 4, 1);
  q.setZero();
  const auto k = tensor(1, 2, 2, 1, {0, 0, 0, 0});
  const auto v = tensor(1, 2, 2, 1, {1, 10, 3, 30});  // [s][g]
  const auto out = gqa::reference_attention(q, k, v);
  CHECK_THAT(out(0, 0, 0, 0), WithinAbs(2.0, kHandTol));
  CHECK_THAT(out(0, 0, 1, 0), WithinAbs(2.0, kHandTol));
  CHECK_THAT(out(0, 0, 2, 0), WithinAbs(20.0, kHandTol));
  CHECK_THAT(out(0, 0, 3, 0), WithinAbs(20.0, kHandTol));
}

TEST_CASE("reference: causal mask is bottom-right aligned", "[reference]") {
  // Sq = 2, Sk = 3, q = 0 (equal weights over visible keys), v = {1, 2, 4}.
  // Query 0 sits at position 0 + (3 - 2) = 1: keys 0, 1 -> 1.5. Query 1 at position 2: all keys -> 7/3.
  // (Top-left alignment would give 1 and 1.5.)
  Tensor4<double> q(1, 2, 1, 1);
  q.setZero();
  const auto k = tensor(1, 3, 1, 1, {0, 0, 0});
  const auto v = tensor(1, 3, 1, 1, {1, 2, 4});
  gqa::AttentionOptions opt;
  opt.causal = true;
  const auto out = gqa::reference_attention(q, k, v, opt);
  CHECK_THAT(out(0, 0, 0, 0), WithinAbs(1.5, kHandTol));
  CHECK_THAT(out(0, 1, 0, 0), WithinAbs(7.0 / 3.0, kHandTol));
}

TEST_CASE("reference: rows with no visible key are zero with log-sum-exp -inf", "[reference]") {
  // Causal, Sq = 3 > Sk = 1: query i sits at position i - 2, so queries 0 and 1 see nothing; query 2 sees key 0
  // with logit 0 (q = 0), so its lse is log(e^0) = 0 and its output is v0.
  Tensor4<double> q(1, 3, 1, 2);
  q.setZero();
  const auto k = tensor(1, 1, 1, 2, {1, 1});
  const auto v = tensor(1, 1, 1, 2, {5, -3});
  std::vector<float> lse(3, 123.0f);
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.lse = lse;
  const auto out = gqa::reference_attention(q, k, v, opt);
  for (Index i = 0; i < 2; ++i)
    for (Index d = 0; d < 2; ++d) CHECK(out(0, i, 0, d) == 0.0);
  CHECK_THAT(out(0, 2, 0, 0), WithinAbs(5.0, kHandTol));
  CHECK_THAT(out(0, 2, 0, 1), WithinAbs(-3.0, kHandTol));
  CHECK(lse[0] == -std::numeric_limits<float>::infinity());
  CHECK(lse[1] == -std::numeric_limits<float>::infinity());
  CHECK(lse[2] == 0.0f);
}

TEST_CASE("reference: soft-cap is applied before the bias", "[reference]") {
  // scale 1, cap c = 1, q = 1, k = {0, 10}: capped logits {0, tanh 10}; bias {0, 2} -> {0, tanh 10 + 2}.
  // Biasing first would give {tanh 0, tanh 12} = {0, ~1}: a visibly different weight.
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const auto k = tensor(1, 2, 1, 1, {0.0, 10.0});
  const auto v = tensor(1, 2, 1, 1, {4.0, 8.0});
  Tensor4<float> bias(1, 1, 1, 2);
  bias.setValues({{{{0.0f, 2.0f}}}});
  gqa::AttentionOptions opt;
  opt.scale = 1.0;
  opt.softcap = 1.0;
  opt.bias = bias;
  const double e = std::exp(std::tanh(10.0) + 2.0);
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs((4.0 + 8.0 * e) / (1.0 + e), kHandTol));
}

TEST_CASE("reference: sliding window, key lengths and bias by hand", "[reference]") {
  // q = 0 throughout: equal weights over the visible keys, so each output is a plain mean of v.
  SECTION("window W = 2 sees the current key and the one before") {
    Tensor4<double> q(1, 4, 1, 1);
    q.setZero();
    const auto k = tensor(1, 4, 1, 1, {0, 0, 0, 0});
    const auto v = tensor(1, 4, 1, 1, {1, 2, 4, 8});
    gqa::AttentionOptions opt;
    opt.window = 2;
    const auto out = gqa::reference_attention(q, k, v, opt);
    const double expect[4] = {1, 1.5, 3, 6};
    for (Index i = 0; i < 4; ++i) CHECK_THAT(out(0, i, 0, 0), WithinAbs(expect[i], kHandTol));
  }
  SECTION("key lengths {1, 3}: padding keys are ignored") {
    Tensor4<double> q(2, 1, 1, 1);
    q.setZero();
    Tensor4<double> k(2, 3, 1, 1);
    k.setZero();
    const auto v = tensor(2, 3, 1, 1, {1, 2, 4, 1, 2, 4});
    const std::vector<std::int32_t> len{1, 3};
    gqa::AttentionOptions opt;
    opt.key_lengths = len;
    const auto out = gqa::reference_attention(q, k, v, opt);
    CHECK_THAT(out(0, 0, 0, 0), WithinAbs(1.0, kHandTol));
    CHECK_THAT(out(1, 0, 0, 0), WithinAbs(7.0 / 3.0, kHandTol));
  }
  SECTION("bias [B, 1, 1, Sk] differs per batch and broadcasts over heads") {
    Tensor4<double> q(2, 1, 2, 1);
    q.setZero();
    Tensor4<double> k(2, 2, 1, 1);
    k.setZero();
    const auto v = tensor(2, 2, 1, 1, {4, 8, 4, 8});
    Tensor4<float> bias(2, 1, 1, 2);
    bias.setValues({{{{0.0f, float(kLn3)}}}, {{{float(kLn3), 0.0f}}}});
    gqa::AttentionOptions opt;
    opt.bias = bias;
    const auto out = gqa::reference_attention(q, k, v, opt);
    // float(ln 3) is not ln 3: the weights are 1/(1+x) and x/(1+x) with x = exp(float(ln 3)).
    const double x = std::exp(double(float(kLn3)));
    for (Index h = 0; h < 2; ++h) {
      CHECK_THAT(out(0, 0, h, 0), WithinAbs((4 + 8 * x) / (1 + x), kHandTol));
      CHECK_THAT(out(1, 0, h, 0), WithinAbs((4 * x + 8) / (1 + x), kHandTol));
    }
  }
}

TEST_CASE("reference: huge logits neither overflow nor underflow", "[reference]") {
  // Logits {1e4, 1e4, 1e4 - 100} and {-1e4, -1e4, -1e4 + 100}: exp(1e4) overflows and exp(-1e4) underflows
  // in double, so only a max-subtracted softmax gets {1/2, 1/2, ~e^-100} and {~0, ~0, 1}.
  const auto k = tensor(1, 3, 1, 1, {100, 100, 99});
  const auto v = tensor(1, 3, 1, 1, {2, 4, 1000});
  gqa::AttentionOptions opt;
  opt.scale = 1.0;
  SECTION("+1e4") {
    const auto out = gqa::reference_attention(tensor(1, 1, 1, 1, {100}), k, v, opt);
    CHECK_THAT(out(0, 0, 0, 0), WithinAbs(3.0, 1e-12));  // 1000 * e^-100 / 2 ~ 2e-41
  }
  SECTION("-1e4") {
    // q = -100: logits {-1e4, -1e4, -9900}: key 2 dominates by e^100.
    const auto out = gqa::reference_attention(tensor(1, 1, 1, 1, {-100}), k, v, opt);
    CHECK_THAT(out(0, 0, 0, 0), WithinAbs(1000.0, 1e-12));
  }
}

TEST_CASE("reference: the TensorRef overload reads strides (head-major K/V)", "[reference]") {
  // The same K/V stored token-major and head-major give the same result up to rounding: the reference only reads
  // elements, but GCC contracts a*b+c into FMAs (-ffp-contract=fast is its GNU-mode default) differently in each
  // inlined copy, so two call sites may differ in the last bit. 1e-14 is a few double ulps of these O(1) values.
  const gqa_test::Shape s{2, 3, 5, 4, 2, 3};
  auto in = gqa_test::random_inputs<double>(s, 11);
  Tensor4<double> k_hm(s.B, s.G, s.Sk, s.D), v_hm(s.B, s.G, s.Sk, s.D);
  for (Index b = 0; b < s.B; ++b)
    for (Index j = 0; j < s.Sk; ++j)
      for (Index g = 0; g < s.G; ++g)
        for (Index d = 0; d < s.D; ++d) {
          k_hm(b, g, j, d) = in.k(b, j, g, d);
          v_hm(b, g, j, d) = in.v(b, j, g, d);
        }
  const auto token = gqa::reference_attention(in.q, in.k, in.v);
  const auto head = gqa::reference_attention(in.q, gqa::head_major(k_hm), gqa::head_major(v_hm));
  gqa_test::check_close(head, token, {1e-14, 1e-14});
  const auto via_ref = gqa::reference_attention<double, double>(
      gqa::token_major<const double>(in.q.data(), s.B, s.Sq, s.H, s.D),
      gqa::head_major<const double>(k_hm.data(), s.B, s.G, s.Sk, s.D),
      gqa::head_major<const double>(v_hm.data(), s.B, s.G, s.Sk, s.D));
  gqa_test::check_close(via_ref, token, {1e-14, 1e-14});
}

TEST_CASE("reference: padding past key_lengths is never read into the result",
          "[reference][key_lengths]") {
  // gqa/options.hpp and CONVENTIONS.md: keys len[b] .. Sk-1 are padding and "never read into the result". A KV
  // buffer's unused tail can hold anything (NaN from uninitialised or recycled memory), so the oracle must give
  // the same answer whatever the padding holds.
  // (Regression: up to c28d742 the reference accumulated 0 * v for masked keys, and 0 * NaN = NaN.)
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto k = tensor(1, 3, 1, 1, {0.0, kLn3, nan});
  const auto v = tensor(1, 3, 1, 1, {4.0, 8.0, nan});
  const std::vector<std::int32_t> len{2};
  gqa::AttentionOptions opt;
  opt.key_lengths = len;
  const auto out = gqa::reference_attention(q, k, v, opt);
  CHECK_THAT(out(0, 0, 0, 0), WithinAbs(7.0, kHandTol));
}

TEST_CASE("reference: a -inf bias masks its key, so NaN in its K or V is never read", "[reference][bias]") {
  // gqa/options.hpp: a -inf bias entry masks its key like the structural masks. Keys {0, ln 3, NaN}, v {4, 8, NaN}
  // with bias {0, 0, -inf}: the weights are 1/4, 3/4 and the answer 7, whatever key 2 holds.
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto k = tensor(1, 3, 1, 1, {0.0, kLn3, nan});
  const auto v = tensor(1, 3, 1, 1, {4.0, 8.0, nan});
  const std::vector<double> bias{0.0, 0.0, -kInf};
  gqa::AttentionOptions opt;
  opt.scale = 1.0;
  opt.bias = gqa::BiasView(bias.data(), 1, 1, 1, 3);
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs(7.0, kHandTol));
}

TEST_CASE("reference: a NaN or +inf logit at a visible key makes the row NaN, output and lse", "[reference]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto v = tensor(1, 2, 1, 1, {4.0, 8.0});
  for (const double bad : {nan, kInf}) {
    INFO("k[1] = " << bad);
    const auto q = tensor(1, 1, 1, 1, {1.0});
    const auto k = tensor(1, 2, 1, 1, {0.0, bad});
    std::vector<float> lse(1);
    gqa::AttentionOptions opt;
    opt.lse = lse;
    CHECK(std::isnan(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0)));
    CHECK(std::isnan(lse[0]));
  }
  // A -inf logit is weight 0: the row is the other key's value.
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const auto k = tensor(1, 2, 1, 1, {0.0, -kInf});
  CHECK(gqa::reference_attention(q, k, v)(0, 0, 0, 0) == 4.0);
}

TEST_CASE("reference: a sink is one more logit with no value, in the max and the sum (gpt-oss)", "[reference][sinks]") {
  // Logits {0, ln 3}, sink ln 4: softmax over {0, ln 3, ln 4} = {1, 3, 4} / 8, the sink's 4/8 dropped; v = {4, 8}
  // -> (4 + 24) / 8 = 3.5; lse = log 8. A sink of 10 dominates the max: the same weights, computed around it.
  const auto q = tensor(1, 1, 1, 1, {1.0});
  const auto k = tensor(1, 2, 1, 1, {0.0, kLn3});
  const auto v = tensor(1, 2, 1, 1, {4.0, 8.0});
  std::vector<float> lse(1);
  const std::vector<float> sink{float(std::log(4.0))};
  gqa::AttentionOptions opt;
  opt.lse = lse;
  opt.sinks = sink;
  const double s4 = double(sink[0]);  // ln 4 rounded to float
  const double total = 1.0 + 3.0 + std::exp(s4);
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs((4.0 + 24.0) / total, kHandTol));
  CHECK_THAT(lse[0], WithinAbs(std::log(8.0), 1e-6));
  const std::vector<float> big{10.0f};
  opt.sinks = big;
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0),
             WithinAbs(28.0 / (4.0 + std::exp(10.0)), kHandTol));
  CHECK_THAT(lse[0], WithinAbs(std::log(4.0 + std::exp(10.0)), 1e-5));
}

TEST_CASE("reference: with a sink, a row with no visible key is zeros and its lse is the sink", "[reference][sinks]") {
  Tensor4<double> q(1, 2, 2, 1), k(1, 1, 1, 1), v(1, 1, 1, 1);
  q.setConstant(1.0), k.setConstant(1.0), v.setConstant(5.0);
  std::vector<float> lse(4);
  const std::vector<float> sinks{1.5f, -std::numeric_limits<float>::infinity()};
  gqa::AttentionOptions opt;
  opt.causal = true;  // Sq = 2 > Sk = 1: query 0 sits at position -1 and sees nothing
  opt.lse = lse;
  opt.sinks = sinks;
  const auto out = gqa::reference_attention(q, k, v, opt);
  CHECK(out(0, 0, 0, 0) == 0.0);
  CHECK(out(0, 0, 1, 0) == 0.0);
  CHECK(lse[0] == 1.5f);                                       // head 0, query 0
  CHECK(lse[2] == -std::numeric_limits<float>::infinity());    // head 1 (no sink), query 0
  // Query 1 sees the key: logit 1, head 0's sink 1.5 -> weight e / (e + e^1.5); head 1 (sink -inf) weight 1.
  CHECK_THAT(out(0, 1, 0, 0), WithinAbs(5.0 * std::exp(1.0) / (std::exp(1.0) + std::exp(1.5)), kHandTol));
  CHECK_THAT(out(0, 1, 1, 0), WithinAbs(5.0, kHandTol));
}

TEST_CASE("reference: ALiBi adds slope * (j - p) after the bias, with p bottom-right aligned", "[reference][alibi]") {
  // q = 0: the logits are the ALiBi bias alone. Sq = 1, Sk = 3, key length 3: p = 2, slope 0.5 -> biases
  // {-1, -0.5, 0}; v = {1, 2, 4}. Non-causal keys after p would get +slope * (j - p): checked with Sq = 2 below.
  Tensor4<double> q(1, 1, 1, 1);
  q.setZero();
  Tensor4<double> k(1, 3, 1, 1);
  k.setZero();
  const auto v = tensor(1, 3, 1, 1, {1, 2, 4});
  const std::vector<float> slope{0.5f};
  std::vector<float> lse(1);
  gqa::AttentionOptions opt;
  opt.alibi_slopes = slope;
  opt.lse = lse;
  const double w[3] = {std::exp(-1.0), std::exp(-0.5), 1.0};
  const double sum = w[0] + w[1] + w[2];
  CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs((w[0] + 2 * w[1] + 4 * w[2]) / sum, kHandTol));
  CHECK_THAT(lse[0], WithinAbs(std::log(sum), 1e-6));  // the true bias's lse, not that of slope * j
  SECTION("Sq = 2, not causal: query 0 (p = 1) gets +0.5 on key 2") {
    Tensor4<double> q2(1, 2, 1, 1);
    q2.setZero();
    gqa::AttentionOptions o2;
    o2.alibi_slopes = slope;
    const double u[3] = {std::exp(-0.5), 1.0, std::exp(0.5)};
    CHECK_THAT(gqa::reference_attention(q2, k, v, o2)(0, 0, 0, 0),
               WithinAbs((u[0] + 2 * u[1] + 4 * u[2]) / (u[0] + u[1] + u[2]), kHandTol));
  }
  SECTION("key lengths move p: len 2 -> p = 1, biases {-0.5, 0}") {
    const std::vector<std::int32_t> len{2};
    opt.key_lengths = len;
    const double a = std::exp(-0.5);
    CHECK_THAT(gqa::reference_attention(q, k, v, opt)(0, 0, 0, 0), WithinAbs((a + 2.0) / (a + 1.0), kHandTol));
  }
}

TEST_CASE("alibi_slopes: the standard slopes for powers of two and the interleaved extras otherwise",
          "[reference][alibi]") {
  // H = 8: 2^-1 .. 2^-8. H = 12: the 8-head slopes, then the odd slopes of the 16-head series 2^-0.5, 2^-1.5,
  // 2^-2.5, 2^-3.5 (BLOOM's _get_alibi_slopes; MPT's interleaving of the 16-head series gives the same set).
  const auto s8 = gqa::alibi_slopes(8);
  REQUIRE(s8.size() == 8);
  for (int h = 0; h < 8; ++h) CHECK(s8[size_t(h)] == float(std::ldexp(1.0, -(h + 1))));
  const auto s12 = gqa::alibi_slopes(12);
  REQUIRE(s12.size() == 12);
  for (int h = 0; h < 8; ++h) CHECK(s12[size_t(h)] == s8[size_t(h)]);
  for (int k = 0; k < 4; ++k) CHECK(s12[size_t(8 + k)] == float(std::exp2(-0.5 - k)));
  const auto s1 = gqa::alibi_slopes(1);
  CHECK(s1 == std::vector<float>{0.00390625f});  // 2^-8
  const auto s3 = gqa::alibi_slopes(3);  // n = 2: 2^-4, 2^-8, then 2^-2
  CHECK(s3 == std::vector<float>{0.0625f, 0.00390625f, 0.25f});
  CHECK_THROWS_AS(gqa::alibi_slopes(0), gqa::invalid_argument);
}
