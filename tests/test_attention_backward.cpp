// Tests of gqa/attention_backward.hpp: the flash backward against the naive double reference backward
// (tests/support/reference_backward.hpp) over the forward tests' sweep of shapes and every option, central finite
// differences, the GQA/MHA properties, bitwise identity across thread counts, and one test per validation error.
//
// Tolerances (float arithmetic, normal(0, 1) inputs and d_out): a gradient element is a sum of many terms of mixed
// sign, so a fixed relative tolerance per element is meaningless near zero; errors are compared with the tensor's
// magnitude instead: |err_e| <= tol * (max_e |ref_e| + 1). Each block's products are float GEMMs of length
// D <= 128 or a tile of <= 128 keys / rows, summed over at most Sk / 128 key tiles (dQ) or Sq * H/G / 128 row
// tiles (dK, dV), and P comes from a float lse (relative error ~1e-7 of a value <= ~15, so P is off by ~1e-6
// relative); the largest error measured on this sweep is ~6e-7 of (magnitude + 1). 2e-5 leaves a 30x margin and is
// still far below what one mis-weighted key or a dropped group member would cause (>= 1e-3 of the magnitude).
#include "gqa/attention_backward.hpp"
#include "gqa/attention.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"
#include "support/reference_backward.hpp"
#include "support/sweep.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace {

using gqa::Index;
using gqa::Tensor4;
using gqa_test::Shape;

/// Allowed error relative to the magnitude of the tensor (see the file comment).
constexpr double kFloatTol = 2e-5;
// Double arithmetic (lse recomputed in double): the same analysis with eps = 1.1e-16; 1e-12 keeps a 100x margin.
constexpr double kDoubleTol = 1e-12;
// bfloat16 Q/out/d_out/d_q: out is stored rounded to 8 bits, so Delta = dO . O is off by up to ~2^-8 of |dO||O|,
// and d_q is rounded to 8 bits at the end (2^-9 relative); 2^-6 of the magnitude bounds both with a 2x margin.
constexpr double kBf16Tol = 0x1.0p-6;

enum class Bias { none, full, per_head, per_batch };

/// One backward call: shape, masks, options and a seed.
struct Case : gqa_test::MaskCase {
  double softcap = 0;
  Bias bias = Bias::none;
  bool lse_given = true;  // pass the forward's lse (else the backward recomputes it)
  bool head_major = false;
  double scale = 0;  // 0: default 1/sqrt(D)

  std::string name() const {
    std::ostringstream os;
    os << mask_name() << (softcap > 0 ? "/softcap:" + std::to_string(softcap) : "")
       << (bias == Bias::full ? "/bias:full" : bias == Bias::per_head ? "/bias:[1,H]" : bias == Bias::per_batch ? "/bias:[B,1]" : "")
       << (lse_given ? "" : "/lse:recomputed") << (head_major ? "/head-major" : "")
       << (scale != 0 ? "/scale:" + std::to_string(scale) : "") << "/seed:" << seed;
    return os.str();
  }
};

/// |out - ref| <= tol * (max |ref| + 1) everywhere, and every element finite (one readable assertion per tensor).
template <typename T>
void check_grad(const char* what, const Tensor4<T>& out, const Tensor4<double>& ref, double tol) {
  double magnitude = 0;
  for (Index i = 0; i < ref.size(); ++i) magnitude = std::max(magnitude, std::abs(ref.data()[i]));
  INFO(what << " (magnitude " << magnitude << ")");
  gqa_test::check_close(out, ref, gqa_test::Tolerance{tol * (magnitude + 1), 0});
}

using gqa_test::poison_padding;

/// [B, S, G, D] -> [B, G, S, D].
template <typename T>
Tensor4<T> to_head_major(const Tensor4<T>& t) {
  Tensor4<T> r(t.dimension(0), t.dimension(2), t.dimension(1), t.dimension(3));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index s = 0; s < t.dimension(1); ++s)
      for (Index g = 0; g < t.dimension(2); ++g)
        for (Index d = 0; d < t.dimension(3); ++d) r(b, g, s, d) = t(b, s, g, d);
  return r;
}

template <typename T>
Tensor4<T> from_head_major(const Tensor4<T>& t) {
  return to_head_major(t);  // the same transposition of dims 1 and 2
}

/// K/V [B, S, G, D] -> [B, S, H, D], head h a copy of KV head h / (H/G) (repeat_kv).
template <typename T>
Tensor4<T> repeat_kv(const Tensor4<T>& t, Index heads) {
  const Index rep = heads / t.dimension(2);
  Tensor4<T> r(t.dimension(0), t.dimension(1), heads, t.dimension(3));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index s = 0; s < t.dimension(1); ++s)
      for (Index h = 0; h < heads; ++h)
        for (Index d = 0; d < t.dimension(3); ++d) r(b, s, h, d) = t(b, s, h / rep, d);
  return r;
}

/// Everything one case needs: inputs, d_out, options (with their storage) and the forward's output.
template <typename T, typename KVT>
struct Problem {
  gqa_test::Inputs<T, KVT> in;
  Tensor4<T> d_out, out;
  std::vector<float> bias, lse;
  std::vector<std::int32_t> len;
  gqa_test::HeadValues extras;  // sinks and ALiBi slopes of the case
  gqa::AttentionOptions opt;

  Problem(const Case& c) : in(gqa_test::random_inputs<T, KVT>(c.s, c.seed)), extras(c) {
    const Shape& s = c.s;
    d_out = Tensor4<T>(s.B, s.Sq, s.H, s.D);
    gqa_test::fill_normal(d_out, c.seed * 7 + 5);
    extras.set(opt);
    opt.causal = c.causal;
    opt.window = c.window;
    opt.softcap = c.softcap;
    if (c.scale != 0) opt.scale = c.scale;
    if (c.ragged) {
      len = gqa_test::case_lengths(c);
      opt.key_lengths = len;
    }
    if (c.bias != Bias::none) {
      const Index bb = c.bias == Bias::per_head ? 1 : s.B, bh = c.bias == Bias::per_batch ? 1 : s.H;
      bias.resize(size_t(bb * bh * s.Sq * s.Sk));
      gqa_test::Rng rng(c.seed + 77);
      for (auto& x : bias) x = float(rng.normal(0.0, 1.0));
      opt.bias = gqa::BiasView(bias.data(), bb, bh, s.Sq, s.Sk);
    }
    lse.resize(size_t(s.B * s.H * s.Sq));
    gqa::AttentionOptions fwd = opt;
    fwd.lse = lse;
    out = gqa::attention(in.q, in.k, in.v, fwd);
    if (c.lse_given) opt.lse = lse;
  }
};

/// Runs one case through attention_backward and the reference; checks d_q, d_k, d_v (and d_bias for a full or
/// absent bias), exact zeros for padded keys and for query rows that see no key.
template <typename T, typename KVT = T>
void check_case(const Case& c, double tol) {
  const Shape& s = c.s;
  Problem<T, KVT> pr(c);
  // ALiBi: float logits of size B carry ~B * 2^-24 rounding, which moves P by as much relative; 8x covers it.
  if (std::is_same_v<typename gqa::detail::AttentionParams<T, KVT>::Acc, float>)
    tol += 8 * pr.extras.alibi_bound(c) * 0x1.0p-24;
  const auto ref = gqa_test::reference_backward<T, KVT>(gqa::make_ref(pr.in.q), gqa::make_ref(pr.in.k),
                                                        gqa::make_ref(pr.in.v), gqa::make_ref(pr.d_out), pr.opt);
  if (c.ragged) {  // the kernel must never read padding
    poison_padding(pr.in.k, pr.len);
    poison_padding(pr.in.v, pr.len);
  }
  const bool want_d_bias = c.bias == Bias::full || c.bias == Bias::none;
  std::vector<float> d_bias(want_d_bias ? size_t(s.B * s.H * s.Sq * s.Sk) : 0, 123.0f);
  Tensor4<T> d_q(s.B, s.Sq, s.H, s.D);
  Tensor4<KVT> d_k(s.B, s.Sk, s.G, s.D), d_v(s.B, s.Sk, s.G, s.D);
  d_q.setConstant(T(9.f));
  d_k.setConstant(KVT(9.f));
  d_v.setConstant(KVT(9.f));
  std::vector<float> d_sinks(c.sinks ? size_t(s.H) : 0, 123.0f);
  if (c.head_major) {
    Tensor4<KVT> k = to_head_major(pr.in.k), v = to_head_major(pr.in.v), dk = to_head_major(d_k), dv = dk;
    gqa::attention_backward(pr.in.q, gqa::head_major(k), gqa::head_major(v), pr.out, pr.d_out, d_q,
                            gqa::head_major(dk), gqa::head_major(dv), pr.opt, d_bias, d_sinks);
    d_k = from_head_major(dk);
    d_v = from_head_major(dv);
  } else {
    gqa::attention_backward(pr.in.q, pr.in.k, pr.in.v, pr.out, pr.d_out, d_q, d_k, d_v, pr.opt, d_bias, d_sinks);
  }
  check_grad("d_q", d_q, ref.d_q, tol);
  check_grad("d_k", d_k, ref.d_k, tol);
  check_grad("d_v", d_v, ref.d_v, tol);
  if (c.sinks) {  // a sum over B * Sq rows of terms like d_bias's: the same allowance against its magnitude
    Tensor4<float> ds(1, 1, 1, s.H);
    Tensor4<double> ds_ref(1, 1, 1, s.H);
    for (Index h = 0; h < s.H; ++h) ds(0, 0, 0, h) = d_sinks[size_t(h)], ds_ref(0, 0, 0, h) = ref.d_sinks[size_t(h)];
    check_grad("d_sinks", ds, ds_ref, std::max(tol, 1e-7));
    CHECK(d_sinks[0] == (s.H > 1 ? 0.0f : d_sinks[0]));  // head 0's sink is -inf (no sink): exactly 0
  }
  if (want_d_bias) {
    Tensor4<float> db(s.B, s.H, s.Sq, s.Sk);
    std::copy(d_bias.begin(), d_bias.end(), db.data());
    check_grad("d_bias", db, ref.d_bias, std::max(tol, 1e-7));  // d_bias is float: 2^-24 relative rounding
  }
  // Exact zeros: d_k/d_v rows of padded keys, d_q rows (and d_bias rows) of queries that see no key.
  Index nonzero = 0, empty_rows = 0;
  for (Index b = 0; b < s.B; ++b) {
    const Index len = c.ragged ? pr.len[size_t(b)] : s.Sk;
    for (Index j = len; j < s.Sk; ++j)
      for (Index g = 0; g < s.G; ++g)
        for (Index d = 0; d < s.D; ++d)
          nonzero += gqa_test::to_double(d_k(b, j, g, d)) != 0.0 || gqa_test::to_double(d_v(b, j, g, d)) != 0.0;
    for (Index h = 0; h < s.H; ++h)
      for (Index i = 0; i < s.Sq; ++i) {
        if (!(len == 0 || gqa_test::row_sees_no_key(c, len, i))) continue;
        ++empty_rows;
        for (Index d = 0; d < s.D; ++d) nonzero += gqa_test::to_double(d_q(b, i, h, d)) != 0.0;
        if (want_d_bias)
          for (Index j = 0; j < s.Sk; ++j) nonzero += d_bias[size_t(((b * s.H + h) * s.Sq + i) * s.Sk + j)] != 0.0f;
      }
  }
  INFO(empty_rows << " query rows see no key; " << nonzero << " elements that must be exactly 0 are not");
  CHECK(nonzero == 0);
}

// ------------------------------------------------------------------------------------------------ the sweep
// The shapes of tests/test_attention.cpp (tests/support/sweep.hpp), each with the masks it has there.

std::vector<Case> with_default_options(const std::vector<gqa_test::MaskCase>& masks) {
  std::vector<Case> cases;
  for (const auto& m : masks) {
    Case c;
    static_cast<gqa_test::MaskCase&>(c) = m;
    cases.push_back(c);
  }
  return cases;
}

std::vector<Case> head_sweep() { return with_default_options(gqa_test::head_sweep()); }
std::vector<Case> sequence_sweep() { return with_default_options(gqa_test::sequence_sweep()); }

std::vector<Case> edge_cases() {
  auto cases = with_default_options(gqa_test::edge_cases());
  Case no_keys, no_queries;
  no_keys.s = {3, 40, 0, 4, 2, 8}, no_keys.seed = 210;       // Sk = 0: no key anywhere
  no_queries.s = {2, 0, 9, 4, 2, 8}, no_queries.seed = 211;  // Sq = 0: d_k, d_v are zeros
  cases.push_back(no_keys);
  cases.push_back(no_queries);
  return cases;
}

/// Every option on a few shapes: soft-cap, each bias kind, scale, window, recomputed lse, head-major K/V.
std::vector<Case> option_cases() {
  std::vector<Case> cases;
  const Shape shapes[] = {{2, 37, 150, 8, 2, 24}, {1, 130, 140, 6, 3, 64}, {2, 9, 300, 4, 1, 16}};
  std::uint64_t seed = 400;
  for (const Shape& s : shapes) {
    auto add = [&](auto&& edit) {
      Case c;
      c.s = s;
      c.seed = seed++;
      edit(c);
      cases.push_back(c);
    };
    add([](Case& c) { c.softcap = 2.5; });
    add([](Case& c) { c.softcap = 0.7, c.causal = true, c.ragged = true; });
    add([](Case& c) { c.bias = Bias::full; });
    add([](Case& c) { c.bias = Bias::full, c.causal = true, c.softcap = 3.0; });
    add([](Case& c) { c.bias = Bias::per_head, c.causal = true; });
    add([](Case& c) { c.bias = Bias::per_batch, c.window = 17; });
    add([](Case& c) { c.scale = 0.37; });
    add([](Case& c) { c.scale = -0.2, c.causal = true; });
    add([](Case& c) { c.window = 5, c.ragged = true; });
    add([](Case& c) { c.lse_given = false; });
    add([](Case& c) { c.lse_given = false, c.causal = true, c.softcap = 1.0, c.bias = Bias::full, c.ragged = true; });
    add([](Case& c) { c.head_major = true, c.causal = true; });
    add([](Case& c) { c.head_major = true, c.ragged = true, c.bias = Bias::full; });
  }
  return cases;
}

}  // namespace

TEST_CASE("backward matches the reference: (H, G) x D sweep", "[backward][sweep]") {
  const Case c = GENERATE(from_range(head_sweep()));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("backward matches the reference: (Sq, Sk) sweep", "[backward][sweep]") {
  const Case c = GENERATE(from_range(sequence_sweep()));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("backward matches the reference: edge shapes", "[backward][sweep]") {
  const Case c = GENERATE(from_range(edge_cases()));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("backward matches the reference: every option", "[backward][options]") {
  const Case c = GENERATE(from_range(option_cases()));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

// ------------------------------------------------------------------------------------- sinks and ALiBi
// The same sweep with sinks, ALiBi or both (tests/support/sweep.hpp's with_sinks_and_alibi), d_sinks against the
// reference's, plus the options that change the backward's own path (recomputed lse, soft-cap, bias, head-major,
// double).

namespace {

std::vector<Case> with_extras(std::vector<Case> cases) {
  std::vector<gqa_test::MaskCase> masks(cases.begin(), cases.end());
  const auto extra = gqa_test::with_sinks_and_alibi(masks);
  for (size_t n = 0; n < cases.size(); ++n) static_cast<gqa_test::MaskCase&>(cases[n]) = extra[n];
  return cases;
}

}  // namespace

TEST_CASE("backward with sinks and ALiBi matches the reference over the shared sweep", "[backward][sinks][alibi]") {
  std::vector<Case> all;
  for (const auto& list : {head_sweep(), sequence_sweep(), edge_cases(), option_cases()})
    for (const auto& c : with_extras(list)) all.push_back(c);
  const Case c = GENERATE_COPY(from_range(all));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("backward with sinks and ALiBi: double, 16-bit K/V", "[backward][sinks][alibi]") {
  const Case c = GENERATE(from_range(with_extras(option_cases())));
  DYNAMIC_SECTION(c.name()) {
    SECTION("double") { check_case<double>(c, kDoubleTol); }
    // d_k, d_v rounded to bfloat16 (2^-9 relative): the dtype test's allowance.
    SECTION("bfloat16 K/V") { check_case<float, gqa::bfloat16>(c, 0x1.0p-8); }
  }
}

TEST_CASE("backward element types: double, 16-bit K/V, bfloat16 everywhere", "[backward][dtype]") {
  Case c;
  c.s = GENERATE(Shape{2, 5, 37, 8, 2, 59}, Shape{1, 130, 140, 6, 3, 24}, Shape{2, 33, 90, 4, 1, 32});
  c.causal = true;
  c.ragged = true;
  c.softcap = 5.0;
  c.bias = Bias::full;
  c.seed = 500 + std::uint64_t(c.s.Sq);
  DYNAMIC_SECTION(c.name()) {
    SECTION("double (lse recomputed in double)") { check_case<double>(c, kDoubleTol); }
    SECTION("float") { check_case<float>(c, kFloatTol); }
    // 16-bit K/V with float Q: the reference reads the same 16-bit values; d_k, d_v are rounded to 16 bits (at
    // most 2^-9 (bf16) or 2^-12 (half) relative), so their tolerance is widened by that.
    SECTION("float Q, bfloat16 K/V") { check_case<float, gqa::bfloat16>(c, 0x1.0p-8); }
    SECTION("float Q, half K/V") { check_case<float, gqa::half>(c, 0x1.0p-11); }
    // Double arithmetic, d_k and d_v rounded to float at the end (2^-24 relative).
    SECTION("mixed: double Q, float K/V") { check_case<double, float>(c, 2e-7); }
    SECTION("bfloat16 Q/K/V/out/d_out") { check_case<gqa::bfloat16>(c, kBf16Tol); }
  }
}

// ------------------------------------------------------------------------------------------ finite differences

namespace {

/// L(q, k, v, bias) = sum(d_out o attention(q, k, v)) in double; its gradient is what attention_backward returns.
double loss(const Problem<double, double>& pr) {
  const auto out = gqa::attention(pr.in.q, pr.in.k, pr.in.v, pr.opt);
  double l = 0;
  for (Index i = 0; i < out.size(); ++i) l += out.data()[i] * pr.d_out.data()[i];
  return l;
}

/// Central differences of loss over every element of `x` (h = 1e-5: truncation ~h^2 = 1e-10, rounding ~1e-16/h).
/// The quotient uses the steps actually taken, which a float x rounds.
template <typename X>
std::vector<double> numeric_grad(Problem<double, double>& pr, X* x, Index n) {
  std::vector<double> g(static_cast<size_t>(n));
  const double h = 1e-5;
  for (Index i = 0; i < n; ++i) {
    const X keep = x[i], up_x = X(double(keep) + h), down_x = X(double(keep) - h);
    x[i] = up_x;
    const double up = loss(pr);
    x[i] = down_x;
    const double down = loss(pr);
    x[i] = keep;
    g[size_t(i)] = (up - down) / (double(up_x) - double(down_x));
  }
  return g;
}

void check_numeric(const char* what, const double* analytic, const std::vector<double>& numeric) {
  double worst = 0;
  Index at = -1;
  for (size_t i = 0; i < numeric.size(); ++i) {
    const double err = std::abs(analytic[i] - numeric[i]) / (1e-6 + 1e-5 * std::abs(numeric[i]));
    if (!(err <= worst)) worst = err, at = Index(i);
  }
  INFO(what << ": worst element " << at << " at " << worst << " x the allowance 1e-6 + 1e-5 |numeric|");
  CHECK(worst <= 1.0);
}

}  // namespace

TEST_CASE("backward agrees with central finite differences of the double forward", "[backward][numeric]") {
  Case c;
  c.s = Shape{2, 5, 7, 4, 2, 3};
  c.seed = 900;
  c.bias = Bias::full;
  SECTION("plain") {}
  SECTION("causal, ragged, soft-cap") { c.causal = true, c.ragged = true, c.softcap = 1.3, c.min_len = 1; }
  SECTION("window, MQA, Sq > Sk") { c.window = 3, c.s = Shape{1, 6, 4, 3, 1, 2}; }
  SECTION("sinks and ALiBi, causal, ragged") { c.sinks = c.alibi = true, c.causal = true, c.ragged = true; }
  SECTION("sinks, Sq > Sk (rows with no key)") { c.sinks = true, c.causal = true, c.s = Shape{1, 6, 4, 3, 1, 2}; }
  Problem<double, double> pr(c);
  const Shape& s = c.s;
  Tensor4<double> d_q(s.B, s.Sq, s.H, s.D), d_k(s.B, s.Sk, s.G, s.D), d_v(s.B, s.Sk, s.G, s.D);
  std::vector<float> d_bias(pr.bias.size()), d_sinks(pr.extras.sinks.size());
  gqa::attention_backward(pr.in.q, pr.in.k, pr.in.v, pr.out, pr.d_out, d_q, d_k, d_v, pr.opt, d_bias, d_sinks);
  pr.opt.lse = {};
  check_numeric("d_q", d_q.data(), numeric_grad(pr, pr.in.q.data(), pr.in.q.size()));
  check_numeric("d_k", d_k.data(), numeric_grad(pr, pr.in.k.data(), pr.in.k.size()));
  check_numeric("d_v", d_v.data(), numeric_grad(pr, pr.in.v.data(), pr.in.v.size()));
  // The bias is float: a step of 1e-5 on values ~1 is exact to ~1e-12 in float, so the quotient keeps ~1e-7;
  // d_bias itself is stored as float (1e-7 relative).
  const auto nb = numeric_grad(pr, pr.bias.data(), Index(pr.bias.size()));
  std::vector<double> db(d_bias.begin(), d_bias.end());
  double worst = 0;
  for (size_t i = 0; i < nb.size(); ++i) worst = std::max(worst, std::abs(db[i] - nb[i]));
  INFO("d_bias: max abs error " << worst);
  CHECK(worst < 1e-5);
  if (c.sinks) {  // float sinks and a float d_sinks, as the bias (head 0's -inf sink is left alone)
    const auto ns = numeric_grad(pr, pr.extras.sinks.data() + 1, s.H - 1);
    double worst_sink = 0;
    for (Index h = 1; h < s.H; ++h) worst_sink = std::max(worst_sink, std::abs(d_sinks[size_t(h)] - ns[size_t(h - 1)]));
    INFO("d_sinks: max abs error " << worst_sink << " (d_sinks[1] = " << d_sinks[1] << ")");
    CHECK(worst_sink < 1e-5);
    CHECK(d_sinks[0] == 0.0f);
  }
}

// ----------------------------------------------------------------------------------------------- properties

TEST_CASE("GQA d_k/d_v are the group sums of MHA d_k/d_v on repeated K/V; d_q is the same", "[backward][property]") {
  const Shape s = GENERATE(Shape{2, 7, 45, 8, 2, 16}, Shape{1, 40, 40, 6, 1, 8}, Shape{1, 150, 160, 12, 3, 32});
  const bool causal = GENERATE(false, true);
  DYNAMIC_SECTION(s.str() << (causal ? "/causal" : "")) {
    auto in = gqa_test::random_inputs<double>(s, 610);
    Tensor4<double> d_out(s.B, s.Sq, s.H, s.D);
    gqa_test::fill_normal(d_out, 611);
    gqa::AttentionOptions opt;
    opt.causal = causal;
    const auto out = gqa::attention(in.q, in.k, in.v, opt);
    const auto gqa_grad = gqa::attention_backward(in.q, in.k, in.v, out, d_out, opt);
    const auto k_rep = repeat_kv(in.k, s.H), v_rep = repeat_kv(in.v, s.H);
    const auto mha_grad = gqa::attention_backward(in.q, k_rep, v_rep, out, d_out, opt);
    Tensor4<double> dk_sum(s.B, s.Sk, s.G, s.D), dv_sum(s.B, s.Sk, s.G, s.D);
    dk_sum.setZero();
    dv_sum.setZero();
    const Index rep = s.H / s.G;
    for (Index b = 0; b < s.B; ++b)
      for (Index j = 0; j < s.Sk; ++j)
        for (Index h = 0; h < s.H; ++h)
          for (Index d = 0; d < s.D; ++d) {
            dk_sum(b, j, h / rep, d) += mha_grad.d_k(b, j, h, d);
            dv_sum(b, j, h / rep, d) += mha_grad.d_v(b, j, h, d);
          }
    check_grad("d_q", gqa_grad.d_q, mha_grad.d_q, kDoubleTol);
    check_grad("d_k", gqa_grad.d_k, dk_sum, kDoubleTol);
    check_grad("d_v", gqa_grad.d_v, dv_sum, kDoubleTol);
  }
}

TEST_CASE("G = H is MHA: each head's gradients are those of a single-head call", "[backward][property]") {
  const Shape s{2, 9, 21, 4, 4, 24};
  auto in = gqa_test::random_inputs<double>(s, 620);
  Tensor4<double> d_out(s.B, s.Sq, s.H, s.D);
  gqa_test::fill_normal(d_out, 621);
  gqa::AttentionOptions opt;
  opt.causal = GENERATE(false, true);
  Tensor4<double> out = gqa::attention(in.q, in.k, in.v, opt);
  const auto whole = gqa::attention_backward(in.q, in.k, in.v, out, d_out, opt);
  Tensor4<double> d_q(s.B, s.Sq, s.H, s.D), d_k(s.B, s.Sk, s.H, s.D), d_v(s.B, s.Sk, s.H, s.D);
  for (Index h = 0; h < s.H; ++h) {
    auto view = [&](auto& t, Index S) {  // strided H = G = 1 view of head h
      using E = std::remove_reference_t<decltype(*t.data())>;
      return gqa::TensorRef<E>{t.data() + h * s.D, {s.B, S, 1, s.D}, {S * s.H * s.D, s.H * s.D, s.D, 1}};
    };
    gqa::attention_backward(gqa::TensorRef<const double>(view(in.q, s.Sq)),
                            gqa::TensorRef<const double>(view(in.k, s.Sk)),
                            gqa::TensorRef<const double>(view(in.v, s.Sk)), gqa::TensorRef<const double>(view(out, s.Sq)),
                            gqa::TensorRef<const double>(view(d_out, s.Sq)), view(d_q, s.Sq), view(d_k, s.Sk),
                            view(d_v, s.Sk), opt);
  }
  check_grad("d_q", d_q, gqa_test::to_double(whole.d_q), kDoubleTol);
  check_grad("d_k", d_k, gqa_test::to_double(whole.d_k), kDoubleTol);
  check_grad("d_v", d_v, gqa_test::to_double(whole.d_v), kDoubleTol);
}

TEST_CASE("the same gradients through Tensor, TensorMap, strided TensorRef and both K/V layouts",
          "[backward][property]") {
  // Only the addressing changes, so the results are bitwise equal.
  const Shape s{2, 5, 150, 6, 2, 20};
  auto in = gqa_test::random_inputs<float>(s, 630);
  Tensor4<float> d_out(s.B, s.Sq, s.H, s.D);
  gqa_test::fill_normal(d_out, 631);
  gqa::AttentionOptions opt;
  opt.causal = true;
  const auto out = gqa::attention(in.q, in.k, in.v, opt);
  const auto base = gqa::attention_backward(in.q, in.k, in.v, out, d_out, opt);

  SECTION("TensorMap gradients over user buffers") {
    std::vector<float> bq(size_t(base.d_q.size())), bk(size_t(base.d_k.size())), bv(bk.size());
    gqa::Tensor4Map<float> d_q(bq.data(), s.B, s.Sq, s.H, s.D), d_k(bk.data(), s.B, s.Sk, s.G, s.D),
        d_v(bv.data(), s.B, s.Sk, s.G, s.D);
    gqa::attention_backward(in.q, in.k, in.v, out, d_out, d_q, d_k, d_v, opt);
    gqa_test::check_identical(Tensor4<float>(d_q), base.d_q);
    gqa_test::check_identical(Tensor4<float>(d_k), base.d_k);
    gqa_test::check_identical(Tensor4<float>(d_v), base.d_v);
  }
  SECTION("head-major K/V and gradients via gqa::head_major views") {
    auto k = to_head_major(in.k), v = to_head_major(in.v);
    Tensor4<float> d_q(s.B, s.Sq, s.H, s.D), d_k(s.B, s.G, s.Sk, s.D), d_v(s.B, s.G, s.Sk, s.D);
    gqa::attention_backward(in.q, gqa::head_major(k), gqa::head_major(v), out, d_out, d_q, gqa::head_major(d_k),
                            gqa::head_major(d_v), opt);
    gqa_test::check_identical(d_q, base.d_q);
    gqa_test::check_identical(from_head_major(d_k), base.d_k);
    gqa_test::check_identical(from_head_major(d_v), base.d_v);
  }
  SECTION("gradients inside wider buffers: nothing outside the views is written") {
    const Index capacity = 170;
    Tensor4<float> dk_cache(s.B, s.G, capacity, s.D), dv_cache(s.B, s.G, capacity, s.D), wide(s.B, s.Sq, s.H + 1, s.D + 3);
    dk_cache.setConstant(-7.0f);
    dv_cache.setConstant(-7.0f);
    wide.setConstant(-7.0f);
    const gqa::TensorRef<float> d_k{dk_cache.data(), {s.B, s.Sk, s.G, s.D}, {s.G * capacity * s.D, s.D, capacity * s.D, 1}};
    const gqa::TensorRef<float> d_v{dv_cache.data(), {s.B, s.Sk, s.G, s.D}, {s.G * capacity * s.D, s.D, capacity * s.D, 1}};
    const gqa::TensorRef<float> d_q{wide.data(), {s.B, s.Sq, s.H, s.D},
                                    {s.Sq * (s.H + 1) * (s.D + 3), (s.H + 1) * (s.D + 3), s.D + 3, 1}};
    gqa::attention_backward(in.q, in.k, in.v, out, d_out, d_q, d_k, d_v, opt);
    Tensor4<float> gq(s.B, s.Sq, s.H, s.D), gk(s.B, s.Sk, s.G, s.D), gv(s.B, s.Sk, s.G, s.D);
    Index touched = 0;
    for (Index b = 0; b < s.B; ++b) {
      for (Index i = 0; i < s.Sq; ++i)
        for (Index h = 0; h < s.H + 1; ++h)
          for (Index d = 0; d < s.D + 3; ++d) {
            if (h < s.H && d < s.D) gq(b, i, h, d) = wide(b, i, h, d);
            else touched += wide(b, i, h, d) != -7.0f;
          }
      for (Index g = 0; g < s.G; ++g)
        for (Index j = 0; j < capacity; ++j)
          for (Index d = 0; d < s.D; ++d) {
            if (j < s.Sk) gk(b, j, g, d) = dk_cache(b, g, j, d), gv(b, j, g, d) = dv_cache(b, g, j, d);
            else touched += (dk_cache(b, g, j, d) != -7.0f) + (dv_cache(b, g, j, d) != -7.0f);
          }
    }
    CHECK(touched == 0);
    gqa_test::check_identical(gq, base.d_q);
    gqa_test::check_identical(gk, base.d_k);
    gqa_test::check_identical(gv, base.d_v);
  }
}

TEST_CASE("the forward's lse and a recomputed one give the same gradients to float accuracy", "[backward][lse]") {
  Case c;
  c.s = Shape{2, 70, 200, 8, 2, 32};
  c.causal = true;
  c.softcap = 4;
  c.seed = 640;
  Problem<float, float> pr(c);
  const auto given = gqa::attention_backward(pr.in.q, pr.in.k, pr.in.v, pr.out, pr.d_out, pr.opt);
  pr.opt.lse = {};
  const auto again = gqa::attention_backward(pr.in.q, pr.in.k, pr.in.v, pr.out, pr.d_out, pr.opt);
  check_grad("d_q", given.d_q, gqa_test::to_double(again.d_q), kFloatTol);
  check_grad("d_k", given.d_k, gqa_test::to_double(again.d_k), kFloatTol);
  check_grad("d_v", given.d_v, gqa_test::to_double(again.d_v), kFloatTol);
}

// ------------------------------------------------------------------------------------------- non-finite inputs
// The forward's rule (gqa/options.hpp): a masked key is never read into a result, and a visible NaN or inf goes
// wherever the formulas carry it. The reference (tests/support/reference_backward.hpp) leaves masked pairs out of
// every sum and runs the formulas as written on the others, so each gradient element must be non-finite exactly
// where the reference's is, and within the sweep's tolerance everywhere else.

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

/// Non-finite exactly where `ref` is; the finite elements within tol * (max finite |ref| + 1). Returns how many
/// elements are non-finite in the reference.
template <typename T>
Index check_grad_like_reference(const char* what, const Tensor4<T>& out, const Tensor4<double>& ref, double tol) {
  double magnitude = 0;
  for (Index i = 0; i < ref.size(); ++i)
    if (std::isfinite(ref.data()[i])) magnitude = std::max(magnitude, std::abs(ref.data()[i]));
  Index non_finite = 0, wrong_class = 0, bad = 0;
  for (Index i = 0; i < ref.size(); ++i) {
    const double o = gqa_test::to_double(out.data()[i]), e = ref.data()[i];
    non_finite += !std::isfinite(e);
    if (std::isfinite(o) != std::isfinite(e))
      ++wrong_class;
    else if (std::isfinite(e))
      bad += !(std::abs(o - e) <= tol * (magnitude + 1));
  }
  INFO(what << ": " << non_finite << " of " << ref.size() << " elements non-finite in the reference, " << wrong_class
            << " differ from it in finiteness, " << bad << " finite ones out of tolerance (magnitude " << magnitude
            << ")");
  CHECK(wrong_class == 0);
  CHECK(bad == 0);
  return non_finite;
}

/// K and V of key j of sequence b set to `value` in every KV head and element.
template <typename KVT>
void poison_key(Tensor4<KVT>& k, Tensor4<KVT>& v, Index b, Index j, float value) {
  for (Index g = 0; g < k.dimension(2); ++g)
    for (Index d = 0; d < k.dimension(3); ++d) k(b, j, g, d) = v(b, j, g, d) = KVT(value);
}

/// The inputs of one non-finite case; edit them, then run() compares the backward (forward's lse given, or
/// recomputed) with the reference and returns the reference.
struct NonFiniteProblem {
  Case c;
  gqa_test::Inputs<float, float> in;
  Tensor4<float> d_out;
  std::vector<float> bias;  // [B, H, Sq, Sk] when not empty
  gqa::AttentionOptions opt;
  std::vector<float> lse;

  explicit NonFiniteProblem(const Case& cs) : c(cs), in(gqa_test::random_inputs<float>(cs.s, cs.seed)) {
    d_out = Tensor4<float>(c.s.B, c.s.Sq, c.s.H, c.s.D);
    gqa_test::fill_normal(d_out, c.seed * 7 + 5);
    opt.causal = c.causal;
    opt.window = c.window;
  }
  float& bias_at(Index b, Index h, Index i, Index j) {
    const Shape& s = c.s;
    if (bias.empty()) bias.assign(size_t(s.B * s.H * s.Sq * s.Sk), 0.0f);
    return bias[size_t(((b * s.H + h) * s.Sq + i) * s.Sk + j)];
  }

  struct Result {
    gqa_test::ReferenceGradients ref;
    gqa::AttentionGradients<float, float> got;
    Index non_finite_dq, non_finite_dk, non_finite_dv;
  };
  Result run(bool lse_given) {
    const Shape& s = c.s;
    if (!bias.empty()) opt.bias = gqa::BiasView(bias.data(), s.B, s.H, s.Sq, s.Sk);
    lse.assign(size_t(s.B * s.H * s.Sq), 0.0f);
    gqa::AttentionOptions fwd = opt;
    fwd.lse = lse;
    const Tensor4<float> out = gqa::attention(in.q, in.k, in.v, fwd);
    gqa::AttentionOptions bwd = opt;
    if (lse_given) bwd.lse = lse;
    Result r{gqa_test::reference_backward<float, float>(gqa::make_ref(in.q), gqa::make_ref(in.k), gqa::make_ref(in.v),
                                                        gqa::make_ref(d_out), opt),
             gqa::attention_backward(in.q, in.k, in.v, out, d_out, bwd), 0, 0, 0};
    r.non_finite_dq = check_grad_like_reference("d_q", r.got.d_q, r.ref.d_q, kFloatTol);
    r.non_finite_dk = check_grad_like_reference("d_k", r.got.d_k, r.ref.d_k, kFloatTol);
    r.non_finite_dv = check_grad_like_reference("d_v", r.got.d_v, r.ref.d_v, kFloatTol);
    return r;
  }
};

/// Elements of d_k and d_v at key j of sequence b that are not exactly 0.
Index nonzero_at_key(const gqa::AttentionGradients<float, float>& g, Index b, Index j) {
  Index n = 0;
  for (Index h = 0; h < g.d_k.dimension(2); ++h)
    for (Index d = 0; d < g.d_k.dimension(3); ++d) n += g.d_k(b, j, h, d) != 0.0f || g.d_v(b, j, h, d) != 0.0f;
  return n;
}

/// A prefill with several query tiles, few queries per item (B*G >= 8: no query chunks), MQA with a window.
std::vector<Case> nonfinite_cases() {
  std::vector<Case> cases(3);
  cases[0].s = {1, 300, 300, 8, 2, 32}, cases[0].causal = true, cases[0].seed = 900;
  cases[1].s = {4, 3, 200, 8, 2, 16}, cases[1].causal = true, cases[1].seed = 901;
  cases[2].s = {1, 120, 150, 4, 1, 32}, cases[2].causal = true, cases[2].window = 40, cases[2].seed = 903;
  return cases;
}

}  // namespace

TEST_CASE("backward: NaN in a key masked for every row changes nothing; its d_k, d_v are exact zeros",
          "[backward][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  const bool lse_given = GENERATE(true, false);
  const float bad = GENERATE(kNaN, kInf);
  DYNAMIC_SECTION(c.name() << (lse_given ? "" : "/lse:recomputed") << "/value:" << bad) {
    NonFiniteProblem pr(c);
    const Index j = c.s.Sk - 1 - c.s.Sq / 2;  // visible to the later rows, but masked for all by the bias
    poison_key(pr.in.k, pr.in.v, 0, j, bad);
    for (Index h = 0; h < c.s.H; ++h)
      for (Index i = 0; i < c.s.Sq; ++i) pr.bias_at(0, h, i, j) = -kInf;
    const auto r = pr.run(lse_given);
    CHECK(r.non_finite_dq + r.non_finite_dk + r.non_finite_dv == 0);
    CHECK(nonzero_at_key(r.got, 0, j) == 0);
  }
}

TEST_CASE("backward: NaN or inf in K/V of a key some rows cannot see reaches only the rows that see it",
          "[backward][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  const bool lse_given = GENERATE(true, false);
  DYNAMIC_SECTION(c.name() << (lse_given ? "" : "/lse:recomputed")) {
    NonFiniteProblem pr(c);
    SECTION("NaN K/V of the last key (the causal future of every row but the last)") {
      poison_key(pr.in.k, pr.in.v, 0, c.s.Sk - 1, kNaN);
      const auto r = pr.run(lse_given);
      CHECK(r.non_finite_dq > 0);
      CHECK(r.non_finite_dq < c.s.B * c.s.Sq * c.s.H * c.s.D);  // the rows that do not see it stay finite
      CHECK(r.non_finite_dk > 0);  // the keys that the last row sees get its NaN
    }
    SECTION("NaN in one element of a visible K") {
      pr.in.k(0, c.s.Sk - 1 - c.s.Sq / 2, 0, 1) = kNaN;
      const auto r = pr.run(lse_given);
      CHECK(r.non_finite_dk > 0);
      CHECK(r.non_finite_dv > 0);
    }
    SECTION("+inf in one element of a visible K") {
      pr.in.k(0, c.s.Sk - 1, c.s.G - 1, 2) = kInf;
      pr.run(lse_given);
    }
    SECTION("NaN in the V of the middle query's key") {
      pr.in.v(0, c.s.Sk - c.s.Sq + c.s.Sq / 2, 0, 3) = kNaN;
      const auto r = pr.run(lse_given);
      CHECK(r.non_finite_dq > 0);
      CHECK(r.non_finite_dq < c.s.B * c.s.Sq * c.s.H * c.s.D);
    }
  }
}

TEST_CASE("backward: NaN in one query or d_out row reaches that row's d_q and the keys it sees, nothing else",
          "[backward][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  DYNAMIC_SECTION(c.name()) {
    NonFiniteProblem pr(c);
    SECTION("q") { pr.in.q(0, c.s.Sq / 2, 1, 3) = kNaN; }
    SECTION("d_out") { pr.d_out(0, c.s.Sq / 2, 1, 3) = kNaN; }
    const auto r = pr.run(true);
    CHECK(r.non_finite_dq > 0);
    CHECK(r.non_finite_dq < c.s.B * c.s.Sq * c.s.H * c.s.D);
    CHECK(r.non_finite_dk > 0);
    CHECK(r.non_finite_dk < c.s.B * c.s.Sk * c.s.G * c.s.D);  // keys the row cannot see stay finite
  }
}

TEST_CASE("backward: a -inf bias over a whole key tile before a visible one (recomputed lse)", "[backward][nonfinite]") {
  // The recomputed lse once met a tile whose logits were all -inf with max -inf: exp(-inf - -inf) = NaN in the
  // running sum, and the row was then taken as one with no visible key (zero gradients).
  Case c;
  c.s = {1, 4, 300, 4, 2, 16};
  c.seed = 905;
  NonFiniteProblem pr(c);
  for (Index h = 0; h < c.s.H; ++h)
    for (Index i = 0; i < c.s.Sq; ++i)
      for (Index j = 0; j < 200; ++j) pr.bias_at(0, h, i, j) = -kInf;
  const auto r = pr.run(false);
  CHECK(r.non_finite_dq + r.non_finite_dk + r.non_finite_dv == 0);
  double norm = 0;
  for (Index i = 0; i < r.got.d_q.size(); ++i) norm += std::abs(r.got.d_q.data()[i]);
  CHECK(norm > 0);
}

// ------------------------------------------------------------------------------------------------- threads

TEST_CASE("backward results are bitwise identical for every num_threads", "[backward][threads]") {
  // B*G >= 8 (one item per KV head, in-place d_k/d_v), B*G < 8 (query chunks and partial sums), 16-bit K/V
  // (per-thread accumulators), d_bias.
  Case c;
  c.s = GENERATE(Shape{2, 200, 300, 8, 4, 40}, Shape{1, 300, 300, 8, 1, 24}, Shape{2, 130, 260, 6, 2, 16});
  c.causal = true;
  c.ragged = true;
  c.bias = Bias::full;
  c.seed = 800;
  const bool bf16_kv = GENERATE(false, true);
  c.sinks = c.alibi = GENERATE(false, true);  // with sinks (d_sinks compared too) and ALiBi
  DYNAMIC_SECTION(c.name() << (bf16_kv ? "/kv:bf16" : "")) {
    auto run_all = [&](auto kv_tag) {
      using KVT = decltype(kv_tag);
      Problem<float, KVT> pr(c);
      const Shape& s = c.s;
      auto run = [&](int threads, std::vector<float>& d_bias, std::vector<float>& d_sinks) {
        gqa::AttentionOptions o = pr.opt;
        o.num_threads = threads;
        gqa::AttentionGradients<float, KVT> g{Tensor4<float>(s.B, s.Sq, s.H, s.D), Tensor4<KVT>(s.B, s.Sk, s.G, s.D),
                                              Tensor4<KVT>(s.B, s.Sk, s.G, s.D)};
        gqa::attention_backward(pr.in.q, pr.in.k, pr.in.v, pr.out, pr.d_out, g.d_q, g.d_k, g.d_v, o, d_bias, d_sinks);
        return g;
      };
      std::vector<float> db1(pr.bias.size()), db_n(pr.bias.size());
      std::vector<float> ds1(pr.extras.sinks.size()), ds_n(ds1.size());
      const auto one = run(1, db1, ds1);
      for (int threads : {2, 3, 0}) {
        INFO("num_threads = " << threads);
        const auto many = run(threads, db_n, ds_n);
        gqa_test::check_identical(many.d_q, one.d_q);
        gqa_test::check_identical(many.d_k, one.d_k);
        gqa_test::check_identical(many.d_v, one.d_v);
        CHECK(std::memcmp(db_n.data(), db1.data(), db1.size() * sizeof(float)) == 0);
        CHECK(ds_n == ds1);
      }
    };
    if (bf16_kv) run_all(gqa::bfloat16{});
    else run_all(float{});
  }
}

// ---------------------------------------------------------------------------------------------- validation
// One test per error: the exact exception type, the message naming argument, dimension and values, and nothing
// written to any gradient before the throw.

namespace {

using Dims = std::array<Index, 4>;
// All sizes different, so a message's values identify their dimension: B = 2, Sq = 3, H = 12, D = 5, Sk = 11, G = 4.
constexpr Dims kQ{2, 3, 12, 5};
constexpr Dims kKV{2, 11, 4, 5};
constexpr float kSentinel = 42.0f;

struct Call {
  Dims q = kQ, k = kKV, v = kKV, out = kQ, d_out = kQ, d_q = kQ, d_k = kKV, d_v = kKV;
  gqa::AttentionOptions opt;
  Index d_bias_size = -1;  // -1: no d_bias
};

Tensor4<float> make(const Dims& d, float value) {
  Tensor4<float> t(d[0], d[1], d[2], d[3]);
  t.setConstant(value);
  return t;
}

template <typename E>
void expect_error(const Call& c, const std::vector<std::string>& fragments) {
  auto q = make(c.q, 0.5f), k = make(c.k, 0.5f), v = make(c.v, 0.5f), out = make(c.out, 0.5f),
       d_out = make(c.d_out, 0.5f);
  auto d_q = make(c.d_q, kSentinel), d_k = make(c.d_k, kSentinel), d_v = make(c.d_v, kSentinel);
  std::vector<float> d_bias(size_t(std::max<Index>(c.d_bias_size, 0)), kSentinel);
  gqa::span<float> db = c.d_bias_size >= 0 ? gqa::span<float>(d_bias.data(), c.d_bias_size) : gqa::span<float>();
  bool thrown = false;
  try {
    gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, c.opt, db);
  } catch (const std::exception& e) {
    thrown = true;
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(typeid(e) == typeid(E));
    for (const auto& fragment : fragments) CHECK_THAT(msg, Catch::Matchers::Contains(fragment));
  }
  CHECK(thrown);
  Index written = 0;
  for (const auto* t : {&d_q, &d_k, &d_v})
    for (Index i = 0; i < t->size(); ++i) written += t->data()[i] != kSentinel;
  for (float x : d_bias) written += x != kSentinel;
  CHECK(written == 0);
}

}  // namespace

TEST_CASE("backward validation: a valid call with every option does not throw", "[backward][params]") {
  // Without this, each expect_error below could pass on an error other than the one it provokes.
  auto q = make(kQ, 0.5f), k = make(kKV, 0.5f), v = make(kKV, 0.5f), out = make(kQ, 0.5f), d_out = make(kQ, 0.5f);
  auto d_q = make(kQ, 0), d_k = make(kKV, 0), d_v = make(kKV, 0);
  std::vector<float> bias(size_t(2 * 12 * 3 * 11)), d_bias(bias.size()), lse(size_t(2 * 12 * 3));
  const std::vector<std::int32_t> len{0, 11};
  gqa::AttentionOptions opt;
  opt.bias = gqa::BiasView(bias.data(), 2, 12, 3, 11);
  opt.key_lengths = len;
  opt.lse = lse;
  opt.window = 3;
  opt.softcap = 30;
  opt.num_threads = 2;
  CHECK_NOTHROW(gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, opt, d_bias));
}

TEST_CASE("backward validation: the forward's checks (H % G, out shape, options.lse size)", "[backward][params]") {
  SECTION("H % G != 0") {
    Call c;
    c.k = c.v = c.d_k = c.d_v = {2, 11, 5, 5};
    expect_error<gqa::shape_error>(c, {"[gqa.shape]", "k:", "dim 2", "= 5", "= 12"});
  }
  SECTION("out shape") {
    Call c;
    c.out = {2, 3, 12, 6};
    expect_error<gqa::shape_error>(c, {"[gqa.shape]", "out:", "dim 3", "= 6", "= 5"});
  }
  SECTION("options.lse size") {
    Call c;
    std::vector<float> lse(10);
    c.opt.lse = lse;
    expect_error<gqa::shape_error>(c, {"[gqa.shape]", "options.lse", "= 10", "= 72"});
  }
  SECTION("options.softcap negative") {
    Call c;
    c.opt.softcap = -1;
    expect_error<gqa::invalid_argument>(c, {"[gqa.option]", "options.softcap", "-1"});
  }
}

TEST_CASE("backward validation: d_out shape differs from q", "[backward][params]") {
  Call c;
  c.d_out = {2, 4, 12, 5};
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "d_out:", "dim 1", "= 4", "= 3"});
}

TEST_CASE("backward validation: d_q shape differs from q", "[backward][params]") {
  Call c;
  c.d_q = {2, 3, 6, 5};
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "d_q:", "dim 2", "= 6", "= 12"});
}

TEST_CASE("backward validation: d_k shape differs from k", "[backward][params]") {
  Call c;
  c.d_k = {2, 10, 4, 5};
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "d_k:", "dim 1", "= 10", "= 11"});
}

TEST_CASE("backward validation: d_v shape differs from v", "[backward][params]") {
  Call c;
  c.d_v = {1, 11, 4, 5};
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "d_v:", "dim 0", "= 1", "= 2"});
}

TEST_CASE("backward validation: a gradient view whose D stride is not 1", "[backward][params]") {
  auto q = make(kQ, 0.5f), k = make(kKV, 0.5f), v = make(kKV, 0.5f), out = make(kQ, 0.5f), d_out = make(kQ, 0.5f);
  auto d_q = make(kQ, kSentinel), d_v = make(kKV, kSentinel);
  std::vector<float> buf(size_t(2 * 11 * 4 * 5 * 2), kSentinel);
  const gqa::TensorRef<float> d_k{buf.data(), {2, 11, 4, 5}, {11 * 4 * 10, 4 * 10, 10, 2}};
  try {
    gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v);
    FAIL("no exception");
  } catch (const gqa::shape_error& e) {
    CHECK_THAT(std::string(e.what()), Catch::Matchers::Contains("[gqa.stride] d_k: head_dim stride = 2"));
  }
  Index written = 0;
  for (float x : buf) written += x != kSentinel;
  CHECK(written == 0);
}

TEST_CASE("backward validation: a null gradient pointer", "[backward][params]") {
  auto q = make(kQ, 0.5f), k = make(kKV, 0.5f), v = make(kKV, 0.5f), out = make(kQ, 0.5f), d_out = make(kQ, 0.5f);
  auto d_q = make(kQ, kSentinel), d_k = make(kKV, kSentinel);
  const gqa::TensorRef<float> d_v{nullptr, {2, 11, 4, 5}, {11 * 4 * 5, 4 * 5, 5, 1}};
  try {
    gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v);
    FAIL("no exception");
  } catch (const gqa::invalid_argument& e) {
    CHECK(typeid(e) == typeid(gqa::invalid_argument));
    CHECK_THAT(std::string(e.what()), Catch::Matchers::Contains("[gqa.null] d_v: data pointer is null"));
  }
}

TEST_CASE("backward validation: d_sinks without options.sinks, or of a size other than H", "[backward][params]") {
  auto q = make(kQ, 0.5f), k = make(kKV, 0.5f), v = make(kKV, 0.5f), out = make(kQ, 0.5f), d_out = make(kQ, 0.5f);
  auto d_q = make(kQ, kSentinel), d_k = make(kKV, kSentinel), d_v = make(kKV, kSentinel);
  std::vector<float> d_sinks(12, kSentinel), short_d_sinks(11, kSentinel);
  const std::vector<float> sinks(12, 0.25f);
  gqa::AttentionOptions none, with;
  with.sinks = sinks;
  auto message = [&](const gqa::AttentionOptions& o, std::vector<float>& ds) -> std::string {
    try {
      gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, o, {}, ds);
    } catch (const gqa::invalid_argument& e) {
      return e.what();
    }
    return "no error";
  };
  CHECK_THAT(message(none, d_sinks), Catch::Matchers::Contains("d_sinks: options.sinks is empty"));
  const std::string size_msg = message(with, short_d_sinks);
  CHECK_THAT(size_msg, Catch::Matchers::Contains("d_sinks: size = 11 but H = 12"));
  CHECK_THAT(size_msg, Catch::Matchers::Contains("[gqa.shape]"));
  for (const auto* t : {&d_q, &d_k, &d_v})
    for (Index i = 0; i < t->size(); ++i) REQUIRE(t->data()[i] == kSentinel);
  CHECK(d_sinks == std::vector<float>(12, kSentinel));
  CHECK_NOTHROW(gqa::attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, with, {}, d_sinks));
}

TEST_CASE("backward validation: d_bias size differs from B*H*Sq*Sk", "[backward][params]") {
  Call c;
  c.d_bias_size = 100;
  expect_error<gqa::shape_error>(c, {"[gqa.shape]", "d_bias: size = 100", "B*H*Sq*Sk = 792"});
}

TEST_CASE("backward validation: d_bias with a broadcast bias", "[backward][params]") {
  Call c;
  std::vector<float> bias(size_t(3 * 11));
  c.opt.bias = gqa::BiasView(bias.data(), 1, 1, 3, 11);
  c.d_bias_size = 2 * 12 * 3 * 11;
  expect_error<gqa::invalid_argument>(c, {"[gqa.option]", "d_bias:", "broadcast", "[1, 1, 3, 11]", "[2, 12, 3, 11]"});
}
