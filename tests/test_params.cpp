// Tests of the validation in gqa/detail/params.hpp (and the GroupSize / mha / mqa checks of gqa/attention.hpp):
// one test per error. Each checks the exception type exactly (gqa::shape_error for shapes, gqa::invalid_argument
// for values), that the message names the argument, the dimension and the values involved, and that nothing was
// written to the output before the throw.
#include "gqa/attention.hpp"
#include "gqa/errors.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

namespace {

using gqa::Index;
using gqa::Tensor4;
using Catch::Matchers::Contains;
using Dims = std::array<Index, 4>;

// A valid call whose sizes are all different numbers, so a message's values identify the dimension they belong to:
// B = 2, Sq = 3, H = 12, D = 5, Sk = 11, G = 4.
constexpr Dims kQ{2, 3, 12, 5};
constexpr Dims kKV{2, 11, 4, 5};
constexpr float kSentinel = 42.0f;

Tensor4<float> make(const Dims& d, float value = 0.5f) {
  Tensor4<float> t(d[0], d[1], d[2], d[3]);
  t.setConstant(value);
  return t;
}

/// One call: tensors of the given dims (out pre-filled with a sentinel) and options.
struct Call {
  Dims q = kQ, k = kKV, v = kKV, out = kQ;
  gqa::AttentionOptions opt;
};

/// Runs `f(q, k, v, out, opt)` and checks that it throws exactly E with every fragment in its message, and
/// that the output still holds the sentinel (validation happens before anything is written).
template <typename E, typename F>
void expect_error(const Call& c, const std::vector<std::string>& fragments, F&& f) {
  auto q = make(c.q), k = make(c.k), v = make(c.v), out = make(c.out, kSentinel);
  bool thrown = false;
  try {
    f(q, k, v, out, c.opt);
  } catch (const std::exception& e) {
    thrown = true;
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(typeid(e) == typeid(E));
    CHECK(dynamic_cast<const gqa::invalid_argument*>(&e) != nullptr);  // every gqa argument error is one
    for (const auto& fragment : fragments) CHECK_THAT(msg, Contains(fragment));
  }
  CHECK(thrown);
  Index written = 0;
  for (Index i = 0; i < out.size(); ++i) written += out.data()[i] != kSentinel;
  CHECK(written == 0);
}

template <typename E>
void expect_error(const Call& c, const std::vector<std::string>& fragments) {
  expect_error<E>(c, fragments, [](auto& q, auto& k, auto& v, auto& out, const auto& opt) {
    gqa::attention(q, k, v, out, opt);
  });
}

}  // namespace

TEST_CASE("a valid call does not throw (the fixture of this file is valid)", "[params]") {
  // Without this, every expect_error below could pass on an error other than the one it provokes.
  auto q = make(kQ), k = make(kKV), v = make(kKV), out = make(kQ);
  std::vector<float> bias_data(size_t(2 * 12 * 3 * 11), 0.0f), lse(size_t(2 * 12 * 3));
  const std::vector<std::int32_t> len{0, 11};
  gqa::AttentionOptions opt;
  opt.bias = gqa::BiasView(bias_data.data(), 2, 12, 3, 11);
  opt.key_lengths = len;
  opt.lse = lse;
  opt.window = 3;
  opt.softcap = 30;
  opt.scale = -0.5;
  opt.num_threads = 2;
  const std::vector<float> sinks(12, 0.5f), slopes = gqa::alibi_slopes(12);
  opt.sinks = sinks;
  opt.alibi_slopes = slopes;
  CHECK_NOTHROW(gqa::attention(q, k, v, out, opt));
  CHECK_NOTHROW(gqa::attention<3>(q, k, v, out, opt));
}

TEST_CASE("H % G != 0", "[params][shape]") {
  Call c;
  c.k = c.v = {2, 11, 5, 5};
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "k:", "dim 2", "= 5", "= 12"});
}

TEST_CASE("K batch differs from Q batch", "[params][shape]") {
  Call c;
  c.k = c.v = {3, 11, 4, 5};
  expect_error<gqa::shape_error>(c, {"k:", "dim 0", "= 3", "= 2"});
}

TEST_CASE("K head_dim differs from Q head_dim", "[params][shape]") {
  Call c;
  c.k = c.v = {2, 11, 4, 6};
  expect_error<gqa::shape_error>(c, {"k:", "dim 3", "= 6", "= 5"});
}

TEST_CASE("V shape differs from K shape", "[params][shape]") {
  const int dim = GENERATE(0, 1, 2, 3);
  const Index bad[4] = {3, 9, 2, 6};
  DYNAMIC_SECTION("v dim " << dim) {
    Call c;
    c.v[size_t(dim)] = bad[dim];
    expect_error<gqa::shape_error>(
        c, {"v:", "dim " + std::to_string(dim), "= " + std::to_string(bad[dim]), "= " + std::to_string(kKV[size_t(dim)])});
  }
}

TEST_CASE("output shape differs from Q shape", "[params][shape]") {
  const int dim = GENERATE(0, 1, 2, 3);
  const Index bad[4] = {1, 7, 13, 4};
  DYNAMIC_SECTION("out dim " << dim) {
    Call c;
    c.out[size_t(dim)] = bad[dim];
    expect_error<gqa::shape_error>(
        c, {"out:", "dim " + std::to_string(dim), "= " + std::to_string(bad[dim]), "= " + std::to_string(kQ[size_t(dim)])});
  }
}

TEST_CASE("bias of the wrong shape", "[params][shape][bias]") {
  // Valid: [1 or B, 1 or H, Sq, Sk] = [1|2, 1|12, 3, 11].
  const int dim = GENERATE(0, 1, 2, 3);
  DYNAMIC_SECTION("bias dim " << dim) {
    Dims bd{2, 12, 3, 11};
    const Index bad[4] = {3, 6, 4, 10};
    const std::string expected_value[4] = {"B = 2", "H = 12", "Sq = 3", "Sk = 11"};
    bd[size_t(dim)] = bad[dim];
    std::vector<float> bias(size_t(bd[0] * bd[1] * bd[2] * bd[3]), 0.0f);
    Call c;
    c.opt.bias = gqa::BiasView(bias.data(), bd[0], bd[1], bd[2], bd[3]);
    expect_error<gqa::shape_error>(
        c, {"options.bias", "dim " + std::to_string(dim), "= " + std::to_string(bad[dim]), expected_value[dim]});
  }
}

TEST_CASE("key_lengths array of the wrong size", "[params][shape][key_lengths]") {
  const std::vector<std::int32_t> len{1, 2, 3};
  Call c;
  c.opt.key_lengths = len;
  expect_error<gqa::shape_error>(c, {"options.key_lengths", "size = 3", "B = 2"});
}

TEST_CASE("a key length > Sk", "[params][key_lengths]") {
  const std::vector<std::int32_t> len{11, 12};
  Call c;
  c.opt.key_lengths = len;
  expect_error<gqa::invalid_argument>(c, {"options.key_lengths[1]", "= 12", "Sk = 11"});
}

TEST_CASE("a negative key length", "[params][key_lengths]") {
  const std::vector<std::int32_t> len{-1, 5};
  Call c;
  c.opt.key_lengths = len;
  expect_error<gqa::invalid_argument>(c, {"options.key_lengths[0]", "= -1", "Sk = 11"});
}

TEST_CASE("a negative window", "[params][window]") {
  Call c;
  c.opt.window = -3;
  expect_error<gqa::invalid_argument>(c, {"options.window", "= -3", ">= 0"});
}

TEST_CASE("a negative or non-finite soft-cap", "[params][softcap]") {
  const double cap = GENERATE(-1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity());
  DYNAMIC_SECTION("softcap " << cap) {
    Call c;
    c.opt.softcap = cap;
    expect_error<gqa::invalid_argument>(c, {"options.softcap", ">= 0"});
  }
}

TEST_CASE("a non-finite scale", "[params][scale]") {
  const double scale = GENERATE(std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity());
  DYNAMIC_SECTION("scale " << scale) {
    Call c;
    c.opt.scale = scale;
    expect_error<gqa::invalid_argument>(c, {"options.scale", "finite"});
  }
}

TEST_CASE("a negative num_threads", "[params][threads]") {
  Call c;
  c.opt.num_threads = -2;
  expect_error<gqa::invalid_argument>(c, {"options.num_threads", "= -2"});
}

TEST_CASE("an lse array of the wrong size", "[params][shape][lse]") {
  std::vector<float> lse(71);  // B * H * Sq = 72
  Call c;
  c.opt.lse = lse;
  expect_error<gqa::shape_error>(c, {"options.lse", "size = 71", "= 72"});
}

TEST_CASE("sinks or ALiBi slopes of a size other than H", "[params][shape][sinks][alibi]") {
  const std::vector<float> eleven(11, 0.0f), thirteen(13, 0.0f);  // H = 12
  Call c;
  c.opt.sinks = eleven;
  expect_error<gqa::shape_error>(c, {"options.sinks", "size = 11", "H = 12"});
  Call d;
  d.opt.alibi_slopes = thirteen;
  expect_error<gqa::shape_error>(d, {"options.alibi_slopes", "size = 13", "H = 12"});
  Call e;  // a zero-length span with a data pointer is given, and of the wrong size
  e.opt.sinks = gqa::span<const float>(eleven.data(), 0);
  expect_error<gqa::shape_error>(e, {"options.sinks", "size = 0", "H = 12"});
}

TEST_CASE("a NaN or +inf sink, a non-finite ALiBi slope", "[params][sinks][alibi]") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (float bad : {nan, inf}) {
    std::vector<float> sinks(12, 0.0f);
    sinks[7] = bad;
    Call c;
    c.opt.sinks = sinks;
    expect_error<gqa::invalid_argument>(c, {"options.sinks[7] = ", "finite or -inf"});
  }
  for (float bad : {nan, inf, -inf}) {
    std::vector<float> slopes(12, 0.25f);
    slopes[4] = bad;
    Call c;
    c.opt.alibi_slopes = slopes;
    expect_error<gqa::invalid_argument>(c, {"options.alibi_slopes[4] = ", "must be finite"});
  }
  std::vector<float> no_sinks(12, -inf);  // -inf: no sink, valid
  auto q = make(kQ), k = make(kKV), v = make(kKV), out = make(kQ);
  gqa::AttentionOptions opt;
  opt.sinks = no_sinks;
  CHECK_NOTHROW(gqa::attention(q, k, v, out, opt));
}

TEST_CASE("options.lse overlapping options.sinks is refused (rows' lse are written while sinks are read)",
          "[params][alias][sinks]") {
  std::vector<float> shared(size_t(2 * 12 * 3), 0.5f);  // lse [B * H * Sq] = 72 floats; sinks inside it
  Call c;
  c.opt.lse = shared;
  c.opt.sinks = gqa::span<const float>(shared.data() + 30, 12);
  expect_error<gqa::invalid_argument>(c, {"[gqa.alias]", "options.lse overlaps options.sinks"});
}

TEST_CASE("zero query heads", "[params][shape][zero]") {
  Call c;
  c.q = c.out = {2, 3, 0, 5};
  expect_error<gqa::shape_error>(c, {"q:", "dim 2", "= 0"});
}

TEST_CASE("zero head_dim", "[params][shape][zero]") {
  Call c;
  c.q = c.out = {2, 3, 12, 0};
  c.k = c.v = {2, 11, 4, 0};
  expect_error<gqa::shape_error>(c, {"q:", "dim 3", "= 0"});
}

TEST_CASE("zero KV heads", "[params][shape][zero]") {
  Call c;
  c.k = c.v = {2, 11, 0, 5};
  expect_error<gqa::shape_error>(c, {"k:", "dim 2", "= 0"});
}

TEST_CASE("zero batch, query length or key length are valid", "[params][zero]") {
  // Where a zero size makes sense: an empty batch or no queries do nothing; no keys (an empty cache) gives zero
  // rows with log-sum-exp -inf.
  SECTION("B = 0") {
    auto q = make({0, 3, 12, 5}), k = make({0, 11, 4, 5}), v = make({0, 11, 4, 5}), out = make({0, 3, 12, 5});
    CHECK_NOTHROW(gqa::attention(q, k, v, out));
  }
  SECTION("Sq = 0") {
    auto q = make({2, 0, 12, 5}), k = make(kKV), v = make(kKV), out = make({2, 0, 12, 5});
    CHECK_NOTHROW(gqa::attention(q, k, v, out));
  }
  SECTION("Sk = 0") {
    auto q = make(kQ), k = make({2, 0, 4, 5}), v = make({2, 0, 4, 5}), out = make(kQ, kSentinel);
    std::vector<float> lse(72, 0.0f);
    gqa::AttentionOptions opt;
    opt.lse = lse;
    CHECK_NOTHROW(gqa::attention(q, k, v, out, opt));
    Index nonzero = 0, finite_lse = 0;
    for (Index i = 0; i < out.size(); ++i) nonzero += out.data()[i] != 0.0f;
    for (float x : lse) finite_lse += x != -std::numeric_limits<float>::infinity();
    CHECK(nonzero == 0);
    CHECK(finite_lse == 0);
  }
}

TEST_CASE("a negative dimension in a TensorRef", "[params][shape][ref]") {
  auto q = make(kQ), k = make(kKV), v = make(kKV), out = make(kQ, kSentinel);
  auto kr = gqa::make_ref(k);
  kr.dims[1] = -4;
  try {
    gqa::attention(gqa::make_ref(q), kr, gqa::make_ref(v), out);
    FAIL("no exception");
  } catch (const gqa::shape_error& e) {
    CHECK_THAT(std::string(e.what()), Contains("k:") && Contains("dim 1") && Contains("= -4") && Contains("negative"));
  }
}

TEST_CASE("a head_dim stride other than 1", "[params][shape][ref]") {
  auto q = make(kQ), k = make({2, 11, 4, 10}), v = make(kKV), out = make(kQ, kSentinel);
  // Every other element of a [2, 11, 4, 10] buffer: logical D = 5 with stride 2.
  const gqa::TensorRef<const float> kr{k.data(), {2, 11, 4, 5}, {11 * 4 * 10, 4 * 10, 10, 2}};
  try {
    gqa::attention(gqa::make_ref(q), kr, gqa::make_ref(v), out);
    FAIL("no exception");
  } catch (const gqa::shape_error& e) {
    CHECK_THAT(std::string(e.what()), Contains("[gqa.stride]") && Contains("k:") && Contains("stride = 2"));
  }
  Index written = 0;
  for (Index i = 0; i < out.size(); ++i) written += out.data()[i] != kSentinel;
  CHECK(written == 0);
}

TEST_CASE("a null data pointer for a non-empty tensor", "[params][ref]") {
  auto q = make(kQ), k = make(kKV), out = make(kQ, kSentinel);
  const gqa::TensorRef<const float> vr{nullptr, kKV, gqa::make_ref(k).strides};
  try {
    gqa::attention(gqa::make_ref(q), gqa::make_ref(k), vr, out);
    FAIL("no exception");
  } catch (const gqa::invalid_argument& e) {
    CHECK(typeid(e) == typeid(gqa::invalid_argument));
    CHECK_THAT(std::string(e.what()), Contains("v:") && Contains("null"));
  }
}

TEST_CASE("attention<GroupSize> with a group size other than H/G", "[params][groupsize]") {
  // H/G = 12/4 = 3; attention<3> is fine (see the fixture test), attention<2> must throw.
  expect_error<gqa::shape_error>(Call{}, {"attention<2>", "12/4", "= 3"},
                                 [](auto& q, auto& k, auto& v, auto& out, const auto& opt) {
                                   gqa::attention<2>(q, k, v, out, opt);
                                 });
}

TEST_CASE("mha with G != H", "[params][groupsize]") {
  expect_error<gqa::shape_error>(Call{}, {"mha", "k dim 2", "= 4", "H) = 12"},
                                 [](auto& q, auto& k, auto& v, auto& out, const auto& opt) {
                                   gqa::mha(q, k, v, out, opt);
                                 });
}

TEST_CASE("mqa with G != 1", "[params][groupsize]") {
  expect_error<gqa::shape_error>(Call{}, {"mqa", "k dim 2", "= 4", "G = 1"},
                                 [](auto& q, auto& k, auto& v, auto& out, const auto& opt) {
                                   gqa::mqa(q, k, v, out, opt);
                                 });
}

TEST_CASE("errors are catchable as the standard exception they derive from", "[params]") {
  Call c;
  c.k = c.v = {2, 11, 5, 5};
  auto q = make(c.q), k = make(c.k), v = make(c.v), out = make(c.out);
  CHECK_THROWS_AS(gqa::attention(q, k, v, out), gqa::shape_error);
  CHECK_THROWS_AS(gqa::attention(q, k, v, out), gqa::invalid_argument);
  CHECK_THROWS_AS(gqa::attention(q, k, v, out), std::invalid_argument);
  gqa::AttentionOptions opt;
  opt.window = -1;
  auto k2 = make(kKV), v2 = make(kKV);
  CHECK_THROWS_AS(gqa::attention(q, k2, v2, out, opt), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// Aliasing (issue 11, item 14): out over k, v, the bias, lse or part of q is refused; out == q is allowed
// ---------------------------------------------------------------------------------------------------------------

namespace {

/// One buffer holding a [B, S, heads, D] tensor at element offset `at`, viewed token-major.
gqa::TensorRef<float> view_in(std::vector<float>& buf, Index at, const Dims& d) {
  return gqa::token_major(buf.data() + at, d[0], d[1], d[2], d[3]);
}

void expect_alias_error(const std::function<void()>& call, const std::string& what) {
  try {
    call();
    FAIL("no exception for out overlapping " << what);
  } catch (const gqa::invalid_argument& e) {
    CHECK_THAT(std::string(e.what()), Contains("[gqa.alias] out overlaps " + what));
  }
}

}  // namespace

TEST_CASE("out overlapping k, v, the bias or lse is refused before anything is written", "[params][alias]") {
  // MHA shapes (G = H) so that out can sit exactly on k or v.
  const Dims qd{2, 3, 4, 5}, kd{2, 3, 4, 5};
  const Index n = 2 * 3 * 4 * 5;
  std::vector<float> buf(size_t(4 * n), 0.25f);
  const auto q = view_in(buf, 0, qd), k = view_in(buf, n, kd), v = view_in(buf, 2 * n, kd);
  auto run = [&](gqa::TensorRef<float> out, const gqa::AttentionOptions& opt = {}) {
    return [=] { gqa::attention(gqa::TensorRef<const float>(q), gqa::TensorRef<const float>(k),
                                gqa::TensorRef<const float>(v), out, opt); };
  };
  const std::vector<float> before = buf;
  expect_alias_error(run(view_in(buf, n, qd)), "k");           // out == k
  expect_alias_error(run(view_in(buf, 2 * n + 7, qd)), "v");   // out overlaps the start of v
  expect_alias_error(run(view_in(buf, 2 * n - 3, qd)), "k");   // the end of k
  // q's memory with other strides (heads and positions swapped): the same bytes, other elements.
  expect_alias_error(run(gqa::TensorRef<float>{buf.data(), qd, {60, 5, 15, 1}}), "q");
  gqa::AttentionOptions opt;
  opt.bias = gqa::BiasView(buf.data() + 3 * n + 10, 2, 1, 3, 3);
  expect_alias_error(run(view_in(buf, 3 * n, qd), opt), "options.bias");
  gqa::AttentionOptions lse_opt;
  lse_opt.lse = gqa::span<float>(buf.data() + 3 * n + 4, 2 * 4 * 3);
  expect_alias_error(run(view_in(buf, 3 * n, qd), lse_opt), "options.lse");
  gqa::AttentionOptions sink_opt;
  sink_opt.sinks = gqa::span<const float>(buf.data() + 3 * n + 2, 4);
  expect_alias_error(run(view_in(buf, 3 * n, qd), sink_opt), "options.sinks");
  gqa::AttentionOptions alibi_opt;
  alibi_opt.alibi_slopes = gqa::span<const float>(buf.data() + 4 * n - 4, 4);
  expect_alias_error(run(view_in(buf, 3 * n, qd), alibi_opt), "options.alibi_slopes");
  CHECK(buf == before);  // nothing written
  // A separate out in the same buffer, after q, k and v, is fine.
  CHECK_NOTHROW(run(view_in(buf, 3 * n, qd))());
}

TEST_CASE("out == q (the same data and strides) computes in place, equal to a separate out", "[params][alias]") {
  // Every query row is read by the one work item that writes its output, before it writes it; prefill (GEMM) and
  // decode (micro-kernels, split keys) shapes.
  const gqa_test::Shape s = GENERATE(gqa_test::Shape{2, 70, 90, 8, 2, 16}, gqa_test::Shape{1, 1, 3000, 8, 2, 32},
                                     gqa_test::Shape{2, 3, 50, 6, 3, 16});
  DYNAMIC_SECTION(s.str()) {
    auto in = gqa_test::random_inputs<float>(s, 1200);
    gqa::AttentionOptions opt;
    opt.causal = true;
    const Tensor4<float> separate = gqa::attention(in.q, in.k, in.v, opt);
    Tensor4<float> q = in.q;
    gqa::attention(q, in.k, in.v, q, opt);
    gqa_test::check_identical(q, separate);
  }
}

TEST_CASE("a bias whose keys are not contiguous", "[params][bias]") {
  Call c;
  std::vector<float> bias(size_t(2 * 3 * 11 * 2), 0.0f);
  c.opt.bias = gqa::BiasView(bias.data(), {1, 1, 3, 11}, {66, 66, 22, 2});
  expect_error<gqa::shape_error>(c, {"options.bias", "dim 3 (key) stride = 2", "contiguous"});
}
