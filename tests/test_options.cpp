// Tests of the semantics in gqa/options.hpp: causal (bottom-right), sliding window, soft-cap, additive bias and its
// broadcasting, custom scale, key lengths (alone and with causal/window), rows with no visible key, huge logits,
// log-sum-exp. Small cases are worked out by hand and checked through both the kernel and the reference; larger
// random cases check the kernel against the reference.
#include "gqa/attention.hpp"
#include "gqa/reference.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using gqa::Index;
using gqa::Tensor4;
using gqa_test::Shape;
using gqa_test::Tolerance;

// Hand cases: a few O(1..10) float terms. The kernel's float arithmetic errs by a few ulps (ulp(8) = 9.5e-7);
// 2e-6 + 2e-6*|x| allows ~10 ulps. The reference runs in double on the same float inputs: 1e-12.
constexpr Tolerance kHandKernelTol{2e-6, 2e-6};
constexpr Tolerance kHandRefTol{1e-12, 1e-12};
// Random cases, float kernel vs double reference: see tests/test_attention.cpp (largest error measured ~2e-6).
constexpr Tolerance kFloatTol{2e-5, 2e-5};
constexpr Tolerance kLseTol{1e-5, 1e-5};
const float kNegInfF = -std::numeric_limits<float>::infinity();

/// A float tensor [d0, d1, d2, d3] with the given row-major values.
Tensor4<float> tensor(Index d0, Index d1, Index d2, Index d3, const std::vector<double>& values) {
  Tensor4<float> t(d0, d1, d2, d3);
  REQUIRE(Index(values.size()) == t.size());
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = float(values[size_t(i)]);
  return t;
}

Tensor4<float> zeros(Index d0, Index d1, Index d2, Index d3) {
  Tensor4<float> t(d0, d1, d2, d3);
  t.setZero();
  return t;
}

/// The kernel's and the reference's answer to the same call, with log-sum-exp.
struct Both {
  Tensor4<float> kernel;
  Tensor4<double> ref;
  std::vector<float> lse, lse_ref;
};

Both run_both(const Tensor4<float>& q, const Tensor4<float>& k, const Tensor4<float>& v, gqa::AttentionOptions opt) {
  Both r;
  const Index rows = q.dimension(0) * q.dimension(2) * q.dimension(1);
  r.lse.assign(size_t(rows), 12345.0f);
  r.lse_ref.assign(size_t(rows), 12345.0f);
  r.kernel = Tensor4<float>(q.dimensions());
  r.kernel.setConstant(std::numeric_limits<float>::quiet_NaN());  // every element must be written
  opt.lse = r.lse;
  gqa::attention(q, k, v, r.kernel, opt);
  opt.lse = r.lse_ref;
  r.ref = gqa::reference_attention(q, k, v, opt);
  return r;
}

/// Both answers at (b, i, h, d) equal the hand-computed value.
void expect_value(const Both& r, Index b, Index i, Index h, Index d, double expected) {
  INFO("at [" << b << ", " << i << ", " << h << ", " << d << "], expected " << expected);
  CHECK_THAT(double(r.kernel(b, i, h, d)),
             Catch::Matchers::WithinAbs(expected, kHandKernelTol.atol + kHandKernelTol.rtol * std::abs(expected)));
  CHECK_THAT(r.ref(b, i, h, d),
             Catch::Matchers::WithinAbs(expected, kHandRefTol.atol + kHandRefTol.rtol * std::abs(expected)));
}

/// Row (b, i, h) has no visible key: exact zeros (not NaN) and log-sum-exp -inf, in both.
void expect_empty_row(const Both& r, Index b, Index i, Index h) {
  const Index H = r.kernel.dimension(2), Sq = r.kernel.dimension(1);
  INFO("row b=" << b << " i=" << i << " h=" << h);
  for (Index d = 0; d < r.kernel.dimension(3); ++d) {
    CHECK(r.kernel(b, i, h, d) == 0.0f);
    CHECK(r.ref(b, i, h, d) == 0.0);
  }
  CHECK(r.lse[size_t((b * H + h) * Sq + i)] == kNegInfF);
  CHECK(r.lse_ref[size_t((b * H + h) * Sq + i)] == kNegInfF);
}

/// q = 0 gives every visible key the same weight, so each output is the plain mean of the visible v's: the mask
/// cases below are then checked with means of {1, 2, 4, 8, 16}, which identify exactly which keys were visible.
Tensor4<float> v_powers(Index B, Index Sk) {
  Tensor4<float> v(B, Sk, 1, 1);
  for (Index b = 0; b < B; ++b)
    for (Index j = 0; j < Sk; ++j) v(b, j, 0, 0) = float(1 << j);
  return v;
}

double mean_pow2(Index lo, Index hi) {  // mean of 2^lo .. 2^hi inclusive
  double s = 0;
  for (Index j = lo; j <= hi; ++j) s += double(Index(1) << j);
  return s / double(hi - lo + 1);
}

/// Kernel vs reference on random inputs with the given options (bias, lengths... point into the caller's data).
void check_random(const Shape& s, gqa::AttentionOptions opt, std::uint64_t seed, double q_scale = 1.0) {
  auto in = gqa_test::random_inputs<float>(s, seed);
  if (q_scale != 1.0) in.q = in.q * float(q_scale);
  std::vector<float> lse(size_t(s.B * s.H * s.Sq)), lse_ref(lse.size());
  gqa::AttentionOptions ref_opt = opt;
  ref_opt.lse = lse_ref;
  opt.lse = lse;
  Tensor4<float> out(s.B, s.Sq, s.H, s.D);
  gqa::attention(in.q, in.k, in.v, out, opt);
  gqa_test::check_close(out, gqa::reference_attention(in.q, in.k, in.v, ref_opt), kFloatTol);
  gqa_test::check_lse_close(lse, lse_ref, kLseTol);
  // Rows with no visible key (reference lse = -inf) must be exact zeros, not merely small.
  Index nonzero = 0;
  for (Index b = 0; b < s.B; ++b)
    for (Index h = 0; h < s.H; ++h)
      for (Index i = 0; i < s.Sq; ++i)
        if (lse_ref[size_t((b * s.H + h) * s.Sq + i)] == kNegInfF)
          for (Index d = 0; d < s.D; ++d) nonzero += !(out(b, i, h, d) == 0.0f);
  CHECK(nonzero == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Hand-computed cases (kernel and reference)
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("causal is bottom-right aligned (hand-computed)", "[options][causal]") {
  gqa::AttentionOptions opt;
  opt.causal = true;
  SECTION("Sq = 2 < Sk = 4: query i at position i + 2") {
    const auto r = run_both(zeros(1, 2, 1, 1), zeros(1, 4, 1, 1), v_powers(1, 4), opt);
    expect_value(r, 0, 0, 0, 0, mean_pow2(0, 2));  // keys 0..2 (top-left alignment would give key 0 only)
    expect_value(r, 0, 1, 0, 0, mean_pow2(0, 3));
  }
  SECTION("Sq = Sk = 3: lower triangle") {
    const auto r = run_both(zeros(1, 3, 1, 1), zeros(1, 3, 1, 1), v_powers(1, 3), opt);
    for (Index i = 0; i < 3; ++i) expect_value(r, 0, i, 0, 0, mean_pow2(0, i));
  }
  SECTION("Sq = 1: the query sees the whole cache") {
    const auto r = run_both(zeros(1, 1, 1, 1), zeros(1, 5, 1, 1), v_powers(1, 5), opt);
    expect_value(r, 0, 0, 0, 0, mean_pow2(0, 4));
  }
  SECTION("without causal every query sees every key") {
    opt.causal = false;
    const auto r = run_both(zeros(1, 2, 1, 1), zeros(1, 4, 1, 1), v_powers(1, 4), opt);
    expect_value(r, 0, 0, 0, 0, mean_pow2(0, 3));
    expect_value(r, 0, 1, 0, 0, mean_pow2(0, 3));
  }
}

TEST_CASE("sliding window: W keys ending at the query's position (hand-computed)", "[options][window]") {
  gqa::AttentionOptions opt;
  SECTION("W = 1: only the current key") {
    opt.window = 1;
    const auto r = run_both(zeros(1, 4, 1, 1), zeros(1, 4, 1, 1), v_powers(1, 4), opt);
    for (Index i = 0; i < 4; ++i) expect_value(r, 0, i, 0, 0, double(1 << i));
  }
  SECTION("W = 2") {
    opt.window = 2;
    const auto r = run_both(zeros(1, 4, 1, 1), zeros(1, 4, 1, 1), v_powers(1, 4), opt);
    for (Index i = 0; i < 4; ++i) expect_value(r, 0, i, 0, 0, mean_pow2(std::max<Index>(0, i - 1), i));
  }
  SECTION("W = 3 with Sq = 2 < Sk = 5 (bottom-right: positions 3 and 4)") {
    opt.window = 3;
    const auto r = run_both(zeros(1, 2, 1, 1), zeros(1, 5, 1, 1), v_powers(1, 5), opt);
    expect_value(r, 0, 0, 0, 0, mean_pow2(1, 3));
    expect_value(r, 0, 1, 0, 0, mean_pow2(2, 4));
  }
  SECTION("W >= Sk is plain causal, with or without options.causal") {
    opt.window = GENERATE(4, 5, 1000);
    opt.causal = GENERATE(false, true);
    const auto r = run_both(zeros(1, 4, 1, 1), zeros(1, 4, 1, 1), v_powers(1, 4), opt);
    for (Index i = 0; i < 4; ++i) expect_value(r, 0, i, 0, 0, mean_pow2(0, i));
  }
}

TEST_CASE("key lengths, alone and with causal / window (hand-computed)", "[options][key_lengths]") {
  gqa::AttentionOptions opt;
  SECTION("lengths {1, 3}: padding keys ignored") {
    const std::vector<std::int32_t> len{1, 3};
    opt.key_lengths = len;
    const auto r = run_both(zeros(2, 1, 1, 1), zeros(2, 4, 1, 1), v_powers(2, 4), opt);
    expect_value(r, 0, 0, 0, 0, 1.0);
    expect_value(r, 1, 0, 0, 0, mean_pow2(0, 2));
  }
  SECTION("length 0: zeros and lse -inf, the other sequence unaffected") {
    const std::vector<std::int32_t> len{0, 2};
    opt.key_lengths = len;
    const auto r = run_both(zeros(2, 2, 2, 1), zeros(2, 3, 1, 1), v_powers(2, 3), opt);
    for (Index i = 0; i < 2; ++i)
      for (Index h = 0; h < 2; ++h) {
        expect_empty_row(r, 0, i, h);
        expect_value(r, 1, i, h, 0, 1.5);
      }
  }
  SECTION("causal positions are relative to len[b]") {
    // Sq = 2, Sk = 4, lengths {2, 3}: sequence 0's queries sit at positions 0, 1; sequence 1's at 1, 2.
    const std::vector<std::int32_t> len{2, 3};
    opt.key_lengths = len;
    opt.causal = true;
    const auto r = run_both(zeros(2, 2, 1, 1), zeros(2, 4, 1, 1), v_powers(2, 4), opt);
    expect_value(r, 0, 0, 0, 0, 1.0);
    expect_value(r, 0, 1, 0, 0, mean_pow2(0, 1));
    expect_value(r, 1, 0, 0, 0, mean_pow2(0, 1));
    expect_value(r, 1, 1, 0, 0, mean_pow2(0, 2));
  }
  SECTION("window W = 2 relative to len[b]") {
    const std::vector<std::int32_t> len{3, 5};
    opt.key_lengths = len;
    opt.window = 2;
    const auto r = run_both(zeros(2, 2, 1, 1), zeros(2, 5, 1, 1), v_powers(2, 5), opt);
    expect_value(r, 0, 0, 0, 0, mean_pow2(0, 1));
    expect_value(r, 0, 1, 0, 0, mean_pow2(1, 2));
    expect_value(r, 1, 0, 0, 0, mean_pow2(2, 3));
    expect_value(r, 1, 1, 0, 0, mean_pow2(3, 4));
  }
}

TEST_CASE("soft-cap, custom scale and bias order (hand-computed)", "[options][softcap][scale]") {
  const auto v = tensor(1, 2, 1, 1, {4, 8});
  auto mix = [](double logit0, double logit1) {  // softmax({logit0, logit1}) . {4, 8}
    const double m = std::max(logit0, logit1), e0 = std::exp(logit0 - m), e1 = std::exp(logit1 - m);
    return (4 * e0 + 8 * e1) / (e0 + e1);
  };
  gqa::AttentionOptions opt;
  SECTION("soft-cap c = 2: logits {0, 10} -> {0, 2 tanh 5}") {
    opt.scale = 1.0;
    opt.softcap = 2.0;
    const auto r = run_both(tensor(1, 1, 1, 1, {1}), tensor(1, 2, 1, 1, {0, 10}), v, opt);
    expect_value(r, 0, 0, 0, 0, mix(0, 2 * std::tanh(5.0)));
  }
  SECTION("soft-cap before the bias, bias before the mask") {
    // logits {0, 10, 10}, cap 1 -> {0, tanh 10, tanh 10}; bias {0, 2, 0}; key 2 masked by key_lengths = 2.
    // Biasing before capping would give {0, tanh 12, ...}.
    Tensor4<float> bias(1, 1, 1, 3);
    bias.setValues({{{{0.0f, 2.0f, 0.0f}}}});
    const std::vector<std::int32_t> len{2};
    opt.scale = 1.0;
    opt.softcap = 1.0;
    opt.bias = bias;
    opt.key_lengths = len;
    const auto r = run_both(tensor(1, 1, 1, 1, {1}), tensor(1, 3, 1, 1, {0, 10, 10}), tensor(1, 3, 1, 1, {4, 8, 100}),
                            opt);
    expect_value(r, 0, 0, 0, 0, mix(0, std::tanh(10.0) + 2));
  }
  SECTION("custom scale replaces 1/sqrt(D)") {
    // D = 4, q = (1, 1, 1, 1), k1 = (1, 1, 1, 1): q.k = 4; default scale 1/2 -> logit 2, scale 0.25 -> logit 1.
    const auto q = tensor(1, 1, 1, 4, {1, 1, 1, 1});
    const auto k = tensor(1, 2, 1, 4, {0, 0, 0, 0, 1, 1, 1, 1});
    const auto v4 = tensor(1, 2, 1, 4, {4, 4, 4, 4, 8, 8, 8, 8});
    const auto r_default = run_both(q, k, v4, opt);
    expect_value(r_default, 0, 0, 0, 3, mix(0, 2));
    opt.scale = 0.25;
    const auto r = run_both(q, k, v4, opt);
    expect_value(r, 0, 0, 0, 3, mix(0, 1));
    opt.scale = -0.25;  // a negative scale is allowed (finite) and flips the logits
    expect_value(run_both(q, k, v4, opt), 0, 0, 0, 0, mix(0, -1));
  }
}

TEST_CASE("bias broadcasts over batch and heads (hand-computed)", "[options][bias]") {
  // B = 2, H = 4 (G = 2), Sq = 2, Sk = 2, q = 0: row (b, h, i) gets weights from its bias row {0, c}.
  const Index B = 2, H = 4, Sq = 2;
  const auto bdim = GENERATE(std::make_pair(Index(1), Index(1)), std::make_pair(Index(2), Index(1)),
                             std::make_pair(Index(1), Index(4)), std::make_pair(Index(2), Index(4)));
  DYNAMIC_SECTION("bias [" << bdim.first << ", " << bdim.second << ", Sq, Sk]") {
    Tensor4<float> bias(bdim.first, bdim.second, Sq, 2);
    for (Index bb = 0; bb < bdim.first; ++bb)
      for (Index hb = 0; hb < bdim.second; ++hb)
        for (Index i = 0; i < Sq; ++i) {
          bias(bb, hb, i, 0) = 0.0f;
          bias(bb, hb, i, 1) = float(0.5 * double(1 + bb + 2 * hb + 8 * i) - 2.0);
        }
    gqa::AttentionOptions opt;
    opt.bias = bias;
    const auto r = run_both(zeros(B, Sq, H, 1), zeros(B, 2, 2, 1), tensor(B, 2, 2, 1, {4, 4, 8, 8, 4, 4, 8, 8}), opt);
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        for (Index i = 0; i < Sq; ++i) {
          const double c = bias(bdim.first == 1 ? 0 : b, bdim.second == 1 ? 0 : h, i, 1);
          expect_value(r, b, i, h, 0, (4 + 8 * std::exp(c)) / (1 + std::exp(c)));
        }
  }
}

TEST_CASE("rows with no visible key give zeros and lse -inf, never NaN (hand-computed)", "[options][empty]") {
  // Rows that see no key while other rows of their key tile do. Regression: up to c28d742 Eigen's vectorised
  // exp(-inf) (~3e-39, not 0) gave such rows a tiny nonzero sum, so they returned the mean of masked values, or
  // inf/NaN. Key length 0 (no key tile at all) is tested above.
  gqa::AttentionOptions opt;
  SECTION("causal, Sq = 4 > Sk = 2: the first two queries see no key") {
    opt.causal = true;
    const auto r = run_both(zeros(1, 4, 1, 1), zeros(1, 2, 1, 1), v_powers(1, 2), opt);
    expect_empty_row(r, 0, 0, 0);
    expect_empty_row(r, 0, 1, 0);
    expect_value(r, 0, 2, 0, 0, 1.0);
    expect_value(r, 0, 3, 0, 0, 1.5);
    CHECK(r.lse[2] == 0.0f);  // one key of logit 0
    CHECK_THAT(r.lse[3], Catch::Matchers::WithinAbs(std::log(2.0), 1e-6));
  }
  SECTION("causal with Sq > len[b]: the early queries see nothing") {
    opt.causal = true;
    const std::vector<std::int32_t> len{1, 4};
    opt.key_lengths = len;
    const auto r = run_both(zeros(2, 3, 1, 1), zeros(2, 4, 1, 1), v_powers(2, 4), opt);
    expect_empty_row(r, 0, 0, 0);  // position -2
    expect_empty_row(r, 0, 1, 0);  // position -1
    expect_value(r, 0, 2, 0, 0, 1.0);
    for (Index i = 0; i < 3; ++i) expect_value(r, 1, i, 0, 0, mean_pow2(0, i + 1));
  }
  SECTION("a bias row of all -inf") {
    // B = 1, H = 2, Sq = 3, Sk = 3: row (h = 1, i = 1) fully -inf, row (h = 0, i = 2) -inf on keys 0, 2.
    Tensor4<float> bias(1, 2, 3, 3);
    bias.setZero();
    for (Index j = 0; j < 3; ++j) bias(0, 1, 1, j) = kNegInfF;
    bias(0, 0, 2, 0) = kNegInfF;
    bias(0, 0, 2, 2) = kNegInfF;
    opt.bias = bias;
    const auto r = run_both(zeros(1, 3, 2, 1), zeros(1, 3, 1, 1), v_powers(1, 3), opt);
    expect_empty_row(r, 0, 1, 1);
    expect_value(r, 0, 2, 0, 0, 2.0);  // key 1 only
    expect_value(r, 0, 1, 0, 0, mean_pow2(0, 2));
    CHECK(r.lse[size_t((0 * 2 + 0) * 3 + 2)] == 0.0f);  // row (h = 0, i = 2): one key of logit 0
  }
  SECTION("causal, Sq = 40 > Sk = 20, heads H = 4, G = 2: many rows of one key tile see nothing") {
    // v_j = j: query i sits at position i - 20 and sees keys 0 .. i - 20, whose mean is (i - 20) / 2.
    opt.causal = true;
    Tensor4<float> v(1, 20, 2, 1);
    for (Index j = 0; j < 20; ++j) v(0, j, 0, 0) = v(0, j, 1, 0) = float(j);
    const auto r = run_both(zeros(1, 40, 4, 1), zeros(1, 20, 2, 1), v, opt);
    for (Index h = 0; h < 4; ++h) {
      for (Index i = 0; i < 20; ++i) expect_empty_row(r, 0, i, h);
      for (Index i = 20; i < 40; ++i) expect_value(r, 0, i, h, 0, double(i - 20) / 2);
    }
  }
}

TEST_CASE("logits of magnitude 1e4 neither overflow nor underflow (hand-computed)", "[options][huge]") {
  // scale 1, D = 1: q = +-100, k = {100, 100, 99} -> logits {1e4, 1e4, 9900} or {-1e4, -1e4, -9900}, exact in
  // float. exp(1e4) = inf and exp(-1e4) = 0 in float and double: only the max-subtracted softmax gets these right.
  const auto k = tensor(1, 3, 1, 1, {100, 100, 99});
  const auto v = tensor(1, 3, 1, 1, {2, 4, 1000});
  gqa::AttentionOptions opt;
  opt.scale = 1.0;
  const auto pos = run_both(tensor(1, 1, 1, 1, {100}), k, v, opt);
  expect_value(pos, 0, 0, 0, 0, 3.0);  // {1/2, 1/2, e^-100/2}: 1000 e^-100 / 2 ~ 2e-41
  CHECK_THAT(pos.lse[0], Catch::Matchers::WithinRel(float(1e4 + std::log(2.0)), 1e-6f));
  const auto neg = run_both(tensor(1, 1, 1, 1, {-100}), k, v, opt);
  expect_value(neg, 0, 0, 0, 0, 1000.0);  // key 2 dominates by e^100
  CHECK_THAT(neg.lse[0], Catch::Matchers::WithinRel(-9900.0f, 1e-6f));
}

TEST_CASE("log-sum-exp output (hand-computed)", "[options][lse]") {
  // H = 2, q = (1) and (2), k = {0, ln 3} (float), scale 1: lse = log(1 + e^{q ln 3}) -> log 4 and log 10.
  const float ln3 = float(std::log(3.0));
  const auto r = run_both(tensor(1, 1, 2, 1, {1, 2}), tensor(1, 2, 1, 1, {0, ln3}), tensor(1, 2, 1, 1, {4, 8}),
                          [] {
                            gqa::AttentionOptions o;
                            o.scale = 1.0;
                            return o;
                          }());
  CHECK_THAT(r.lse[0], Catch::Matchers::WithinAbs(std::log(1 + std::exp(double(ln3))), 1e-6));
  CHECK_THAT(r.lse[1], Catch::Matchers::WithinAbs(std::log(1 + std::exp(2 * double(ln3))), 1e-6));
  CHECK_THAT(r.lse_ref[0], Catch::Matchers::WithinAbs(std::log(1 + std::exp(double(ln3))), 1e-6));
}

// ---------------------------------------------------------------------------------------------------------------
// Random cases against the reference
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("bias broadcast shapes vs the reference, with -inf entries", "[options][bias]") {
  const Shape s{3, 37, 150, 6, 2, 24};
  const auto bdim = GENERATE(std::make_pair(Index(1), Index(1)), std::make_pair(Index(3), Index(1)),
                             std::make_pair(Index(1), Index(6)), std::make_pair(Index(3), Index(6)));
  const bool causal = GENERATE(false, true);
  DYNAMIC_SECTION("bias [" << bdim.first << ", " << bdim.second << ", Sq, Sk]" << (causal ? " causal" : "")) {
    Tensor4<float> bias(bdim.first, bdim.second, s.Sq, s.Sk);
    gqa_test::fill_normal(bias, 900, 0.0, 2.0);
    gqa_test::Rng rng(901);
    for (Index n = 0; n < bias.size(); ++n)
      if (rng.uniform01() < 0.1) bias.data()[n] = kNegInfF;  // scattered masked keys
    gqa::AttentionOptions opt;
    opt.bias = bias;
    opt.causal = causal;
    check_random(s, opt, 902);
  }
}

TEST_CASE("a whole tile of keys masked in the middle of a row", "[options][bias][tile]") {
  // Keys are processed in tiles (64-128 keys); bias = -inf on [a, b) removes whole tiles in the middle of each
  // row. The result must match the reference and attention over K/V with those keys deleted.
  const Shape s{2, 5, 520, 4, 2, 16};
  const auto range = GENERATE(std::make_pair(Index(128), Index(256)), std::make_pair(Index(64), Index(192)),
                              std::make_pair(Index(100), Index(420)), std::make_pair(Index(0), Index(512)));
  DYNAMIC_SECTION("keys [" << range.first << ", " << range.second << ") masked") {
    Tensor4<float> bias(1, 1, s.Sq, s.Sk);
    bias.setZero();
    for (Index i = 0; i < s.Sq; ++i)
      for (Index j = range.first; j < range.second; ++j) bias(0, 0, i, j) = kNegInfF;
    gqa::AttentionOptions opt;
    opt.bias = bias;
    check_random(s, opt, 910);

    auto in = gqa_test::random_inputs<float>(s, 910);
    const auto out = gqa::attention(in.q, in.k, in.v, opt);
    const Index kept = s.Sk - (range.second - range.first);
    Tensor4<float> k2(s.B, kept, s.G, s.D), v2(s.B, kept, s.G, s.D);
    for (Index b = 0; b < s.B; ++b)
      for (Index j = 0, j2 = 0; j < s.Sk; ++j) {
        if (j >= range.first && j < range.second) continue;
        for (Index g = 0; g < s.G; ++g)
          for (Index d = 0; d < s.D; ++d) {
            k2(b, j2, g, d) = in.k(b, j, g, d);
            v2(b, j2, g, d) = in.v(b, j, g, d);
          }
        ++j2;
      }
    gqa_test::check_close(out, gqa_test::to_double(gqa::attention(in.q, k2, v2)), kFloatTol);
  }
}

TEST_CASE("soft-cap and custom scale vs the reference", "[options][softcap][scale]") {
  const Shape s{2, 20, 300, 8, 4, 32};
  const double cap = GENERATE(0.5, 5.0, 50.0);
  const double scale = GENERATE(0.05, 0.5);
  DYNAMIC_SECTION("softcap " << cap << " scale " << scale) {
    gqa::AttentionOptions opt;
    opt.softcap = cap;
    opt.scale = scale;
    opt.causal = true;
    check_random(s, opt, 920, 2.0);  // q * 2: logits up to ~20, where the cap matters
  }
}

TEST_CASE("sliding window vs the reference, across tile boundaries", "[options][window]") {
  const Index W = GENERATE(1, 2, 63, 64, 65, 127, 128, 129, 299, 300, 301, 5000);
  const bool ragged = GENERATE(false, true);
  DYNAMIC_SECTION("W = " << W << (ragged ? " ragged" : "")) {
    const Shape s{2, 40, 300, 4, 2, 8};
    // len[b] >= Sq: every query sees at least its own key (masked-out rows are tested separately below).
    const auto len = gqa_test::ragged_lengths(s.B, s.Sk, 930 + std::uint64_t(W), s.Sq);
    gqa::AttentionOptions opt;
    opt.window = W;
    if (ragged) opt.key_lengths = len;
    check_random(s, opt, 931);
  }
}

TEST_CASE("causal with Sq != Sk and ragged lengths vs the reference", "[options][causal]") {
  // Sq <= len[b] <= Sk, plus one empty sequence (len 0): every other row sees a key (masked-out rows below).
  const auto sq_sk = GENERATE(std::make_pair(Index(7), Index(300)), std::make_pair(Index(129), Index(300)),
                              std::make_pair(Index(128), Index(129)), std::make_pair(Index(1), Index(129)));
  const bool ragged = GENERATE(false, true);
  DYNAMIC_SECTION("Sq " << sq_sk.first << " Sk " << sq_sk.second << (ragged ? " ragged" : "")) {
    const Shape s{3, sq_sk.first, sq_sk.second, 6, 3, 12};
    auto len = gqa_test::ragged_lengths(s.B, s.Sk, 940, s.Sq);
    len[0] = 0;
    gqa::AttentionOptions opt;
    opt.causal = true;
    if (ragged) opt.key_lengths = len;
    check_random(s, opt, 941);
  }
}

TEST_CASE("rows with no visible key vs the reference: Sq > Sk, Sq > len[b], -inf bias rows", "[options][empty]") {
  // Rows that see no key while other rows of their key tile do (see the hand-computed test above).
  SECTION("causal with Sq > Sk") {
    const auto sq_sk = GENERATE(std::make_pair(Index(300), Index(7)), std::make_pair(Index(200), Index(129)),
                                std::make_pair(Index(129), Index(128)));
    DYNAMIC_SECTION("Sq " << sq_sk.first << " Sk " << sq_sk.second) {
      gqa::AttentionOptions opt;
      opt.causal = true;
      check_random({3, sq_sk.first, sq_sk.second, 6, 3, 12}, opt, 960);
    }
  }
  SECTION("causal or window with ragged lengths < Sq") {
    const Index W = GENERATE(0, 1, 50);
    DYNAMIC_SECTION("window " << W) {
      const Shape s{4, 60, 300, 4, 2, 8};
      const std::vector<std::int32_t> len{1, 30, 59, 300};
      gqa::AttentionOptions opt;
      opt.causal = true;
      opt.window = W;
      opt.key_lengths = len;
      check_random(s, opt, 961);
    }
  }
  SECTION("bias rows of all -inf, broadcast over batch and heads") {
    const Shape s{3, 37, 150, 6, 2, 24};
    const auto bdim = GENERATE(std::make_pair(Index(1), Index(1)), std::make_pair(Index(3), Index(6)));
    DYNAMIC_SECTION("bias [" << bdim.first << ", " << bdim.second << ", Sq, Sk]") {
      Tensor4<float> bias(bdim.first, bdim.second, s.Sq, s.Sk);
      gqa_test::fill_normal(bias, 962, 0.0, 2.0);
      for (Index i : {0, 5, 36})
        for (Index j = 0; j < s.Sk; ++j) bias(0, 0, i, j) = kNegInfF;
      gqa::AttentionOptions opt;
      opt.bias = bias;
      check_random(s, opt, 963);
    }
  }
}

TEST_CASE("logits of magnitude 1e4 vs the reference (exact integer logits)", "[options][huge]") {
  // Integer q, k in [-40, 40] with D = 8 and scale 1: every logit is an integer of magnitude up to ~1e4, exact in
  // float (< 2^24), so the float kernel sees the reference's logits and only the softmax's rounding remains.
  const Shape s{2, 9, 200, 4, 2, 8};
  auto in = gqa_test::random_inputs<float>(s, 950);
  gqa_test::Rng rng(951);
  for (Index n = 0; n < in.q.size(); ++n) in.q.data()[n] = float(rng.integer(-40, 40));
  for (Index n = 0; n < in.k.size(); ++n) in.k.data()[n] = float(rng.integer(-40, 40));
  gqa::AttentionOptions opt;
  opt.scale = 1.0;
  opt.causal = GENERATE(false, true);
  std::vector<float> lse(size_t(s.B * s.H * s.Sq)), lse_ref(lse.size());
  opt.lse = lse;
  const auto out = gqa::attention(in.q, in.k, in.v, opt);
  opt.lse = lse_ref;
  const auto ref = gqa::reference_attention(in.q, in.k, in.v, opt);
  float max_abs_lse = 0;
  for (float x : lse_ref) max_abs_lse = std::max(max_abs_lse, std::abs(x));
  CHECK(max_abs_lse > 5000.0f);  // the case really has huge logits
  gqa_test::check_close(out, ref, kFloatTol);
  gqa_test::check_lse_close(lse, lse_ref, kLseTol);
}

// ---------------------------------------------------------------------------------------------------------------
// The option types: no dangling views, int64 key lengths, double and strided biases (issue 11, item 16)
// ---------------------------------------------------------------------------------------------------------------

// Binding a temporary to a view would leave it dangling after the statement: those assignments must not compile.
static_assert(!std::is_assignable_v<gqa::BiasView&, Tensor4<float>>, "opt.bias = Tensor4<float>(...) must not compile");
static_assert(!std::is_assignable_v<gqa::BiasView&, Tensor4<double>>, "opt.bias = Tensor4<double>(...)");
static_assert(!std::is_assignable_v<gqa::KeyLengths&, std::vector<std::int32_t>>,
              "opt.key_lengths = std::vector<int32_t>{...} must not compile");
static_assert(!std::is_assignable_v<gqa::KeyLengths&, std::vector<std::int64_t>>, "int64 temporaries too");
// ... while lvalues, maps and spans (views themselves) still bind.
static_assert(std::is_assignable_v<gqa::BiasView&, Tensor4<float>&>, "");
static_assert(std::is_assignable_v<gqa::BiasView&, const Tensor4<double>&>, "");
static_assert(std::is_assignable_v<gqa::BiasView&, gqa::Tensor4Map<const float>>, "");
static_assert(std::is_assignable_v<gqa::KeyLengths&, std::vector<std::int32_t>&>, "");
static_assert(std::is_assignable_v<gqa::KeyLengths&, const std::vector<std::int64_t>&>, "");
static_assert(std::is_assignable_v<gqa::KeyLengths&, gqa::span<const std::int32_t>>, "");

TEST_CASE("int64 key lengths give the same result as int32", "[options][key_lengths]") {
  const Shape s{3, 4, 300, 8, 2, 32};
  auto in = gqa_test::random_inputs<float>(s, 1100);
  const std::vector<std::int32_t> len32{300, 17, 0};
  const std::vector<std::int64_t> len64{300, 17, 0};
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.key_lengths = len32;
  const auto ref = gqa::reference_attention(in.q, in.k, in.v, opt);
  const auto out32 = gqa::attention(in.q, in.k, in.v, opt);
  opt.key_lengths = len64;
  const auto out64 = gqa::attention(in.q, in.k, in.v, opt);
  gqa_test::check_identical(out64, out32);
  gqa_test::check_close(out64, gqa::reference_attention(in.q, in.k, in.v, opt), kFloatTol);
  gqa_test::check_close(out32, ref, kFloatTol);
  const std::vector<std::int64_t> too_long{300, 17, std::int64_t(1) << 40};
  opt.key_lengths = too_long;
  CHECK_THROWS_WITH(gqa::attention(in.q, in.k, in.v, opt), Catch::Matchers::Contains("options.key_lengths[2] = 1099511627776"));
}

TEST_CASE("a double bias gives the same result as the same float bias", "[options][bias]") {
  const Shape s{2, 70, 90, 6, 3, 16};
  Tensor4<float> bias(2, 1, s.Sq, s.Sk);
  gqa_test::fill_normal(bias, 1110, 0.0, 2.0);
  bias(1, 0, 5, 7) = kNegInfF;
  const Tensor4<double> bias_d = bias.cast<double>();  // the same values, exactly
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.bias = bias;
  auto in = gqa_test::random_inputs<float>(s, 1111);
  const auto out_f = gqa::attention(in.q, in.k, in.v, opt);
  opt.bias = bias_d;
  gqa_test::check_identical(gqa::attention(in.q, in.k, in.v, opt), out_f);
  check_random(s, opt, 1111);
}

TEST_CASE("a strided bias: a Hugging Face [B, 1, Sq, max_len] mask sliced to Sk keys", "[options][bias]") {
  const Shape s = GENERATE(Shape{2, 5, 40, 8, 2, 16}, Shape{2, 1, 300, 8, 2, 16}, Shape{1, 130, 130, 4, 2, 32});
  DYNAMIC_SECTION(s.str()) {
    const Index max_len = s.Sk + 37;
    Tensor4<float> mask(s.B, 1, s.Sq, max_len);  // padding columns past Sk hold NaN: never read
    mask.setConstant(std::numeric_limits<float>::quiet_NaN());
    Tensor4<float> dense(s.B, 1, s.Sq, s.Sk);
    gqa_test::Rng rng(1120);
    for (Index b = 0; b < s.B; ++b)
      for (Index i = 0; i < s.Sq; ++i)
        for (Index j = 0; j < s.Sk; ++j)
          mask(b, 0, i, j) = dense(b, 0, i, j) = rng.uniform01() < 0.2 ? kNegInfF : float(rng.normal());
    gqa::AttentionOptions opt;
    opt.bias = gqa::BiasView(mask.data(), {s.B, 1, s.Sq, s.Sk}, {s.Sq * max_len, s.Sq * max_len, max_len, 1});
    auto in = gqa_test::random_inputs<float>(s, 1121);
    const auto strided = gqa::attention(in.q, in.k, in.v, opt);
    gqa::AttentionOptions dense_opt;
    dense_opt.bias = dense;
    gqa_test::check_identical(strided, gqa::attention(in.q, in.k, in.v, dense_opt));
    check_random(s, opt, 1121);
  }
}
