// Tests of gqa/attention.hpp: the flash kernel against the double reference over a sweep of shapes, element
// types, tensor kinds and layouts, split-K decode, threading, and the GQA/MHA/MQA properties.
//
// Tolerances (float arithmetic, O(1) inputs): Q, K, V are normal(0, 1), so logits q.k/sqrt(D) are O(1) and each
// output is a convex combination of V values (|v| < ~5). A float dot product of length D <= 128 and a softmax
// sum over Sk <= 4096 keys (blocked by tiles of 128, so the sums are short) err by well under 1e-6 on such
// values; 2e-5 absolute + 2e-5 relative leaves a margin of 10-20x over the largest error measured on this sweep
// (~1e-6), and is still 1000x below what one mis-weighted key (weight ~1/Sk ~ 2e-4 at Sk = 4096) would cause.
#include "gqa/attention.hpp"
#include "gqa/reference.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"
#include "support/sweep.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using gqa::Index;
using gqa::Tensor4;
using gqa_test::Shape;
using gqa_test::Tolerance;

constexpr Tolerance kFloatTol{2e-5, 2e-5};  // see the file comment
// Double arithmetic: the same error analysis with eps = 1.1e-16 gives ~1e-14; 1e-12 keeps a 100x margin.
constexpr Tolerance kDoubleTol{1e-12, 1e-12};
// bfloat16 output: round-to-nearest into 8 significant bits errs by at most 2^-8 relative (half an ulp, ulp <=
// 2^-7 |x|), on top of the float result's own error (kFloatTol).
constexpr Tolerance kBf16OutTol{2e-5, 0x1.0p-8 + 2e-5};
// log-sum-exp rows are O(log Sk + max logit) <= ~15, computed in float: 1e-5 relative is ~100 float ulps.
constexpr Tolerance kLseTol{1e-5, 1e-5};

using Case = gqa_test::MaskCase;
using gqa_test::case_lengths;
using gqa_test::edge_cases;
using gqa_test::head_sweep;
using gqa_test::poison_padding;
using gqa_test::sequence_sweep;

/// Runs one case through gqa::attention and the reference and checks output and log-sum-exp.
/// With ALiBi, float logits as large as the case's bias bound B carry rounding errors of ~B * 2^-24 each, which move
/// the weights near the row's max by as much relative (their differences are taken in float); outputs are convex
/// combinations of |v| < ~5, so 8 * 5 * B * 2^-24 absolute bounds the effect with a 4x margin (0 without ALiBi).
Tolerance with_alibi(Tolerance tol, const gqa_test::HeadValues& x, const Case& c) {
  const double extra = 40.0 * x.alibi_bound(c) * 0x1.0p-24;
  return {tol.atol + extra, tol.rtol};
}

template <typename T, typename KVT = T>
void check_case(const Case& c, Tolerance tol) {
  auto in = gqa_test::random_inputs<T, KVT>(c.s, c.seed);
  gqa::AttentionOptions opt;
  opt.causal = c.causal;
  opt.window = c.window;
  const gqa_test::HeadValues extras(c);
  extras.set(opt);
  tol = with_alibi(tol, extras, c);
  std::vector<std::int32_t> len;
  if (c.ragged) {
    len = case_lengths(c);
    opt.key_lengths = len;
  }
  std::vector<float> lse(size_t(c.s.B * c.s.H * c.s.Sq)), lse_ref(lse.size());

  gqa::AttentionOptions ref_opt = opt;
  ref_opt.lse = lse_ref;
  const auto ref = gqa::reference_attention(in.q, in.k, in.v, ref_opt);

  if (c.ragged) {  // after the reference ran: it multiplies padding by weight 0, so it needs finite values there
    poison_padding(in.k, len);
    poison_padding(in.v, len);
  }
  opt.lse = lse;
  Tensor4<T> out(c.s.B, c.s.Sq, c.s.H, c.s.D);
  gqa::attention(in.q, in.k, in.v, out, opt);
  gqa_test::check_close(out, ref, tol);
  gqa_test::check_lse_close(lse, lse_ref, kLseTol);
  // Rows with no visible key are documented to be exact zeros, not just small, with lse -inf (the sink's logit
  // with sinks, exactly).
  Index empty_rows = 0, nonzero = 0, wrong_lse = 0;
  for (Index b = 0; b < c.s.B; ++b)
    for (Index h = 0; h < c.s.H; ++h)
      for (Index i = 0; i < c.s.Sq; ++i) {
        const Index len_b = c.ragged ? Index(len[size_t(b)]) : c.s.Sk;
        if (!(len_b == 0 || gqa_test::row_sees_no_key(c, len_b, i))) continue;
        ++empty_rows;
        for (Index d = 0; d < c.s.D; ++d) nonzero += !(gqa_test::to_double(out(b, i, h, d)) == 0.0);
        const float want = extras.sinks.empty() ? -std::numeric_limits<float>::infinity() : extras.sinks[size_t(h)];
        wrong_lse += !(lse[size_t((b * c.s.H + h) * c.s.Sq + i)] == want);
      }
  INFO(empty_rows << " rows see no key; " << nonzero << " of their elements are not exactly 0, " << wrong_lse
                  << " of their lse differ from the sink (or -inf)");
  CHECK(nonzero == 0);
  CHECK(wrong_lse == 0);
}

/// True when some query row sees no key while other rows of its sequence do (causal or window with
/// 0 < len[b] < Sq: the first queries sit at negative positions). Such rows share key tiles with rows that see
/// keys, which is where the kernel's fully-masked-row handling is exercised.
bool has_masked_out_rows(const Case& c) {
  if (!c.causal && c.window == 0) return false;
  for (const auto l : case_lengths(c))
    if (l > 0 && l < c.s.Sq) return true;
  return false;
}

/// The cases of `all` with (or without) masked-out rows.
std::vector<Case> filter_cases(const std::vector<Case>& all, bool masked_out_rows) {
  std::vector<Case> r;
  for (const auto& c : all)
    if (has_masked_out_rows(c) == masked_out_rows) r.push_back(c);
  return r;
}

/// Decode shapes that split the key range: plan_tiles splits when B * G * query-tiles < 16 and Sk >= 2 * 512.
std::vector<Case> split_cases() {
  return {
      {{1, 1, 1024, 8, 8, 64}, false, 0, false, 300},  // 8 items, cap Sk/512 = 2 splits
      {{1, 1, 1024, 32, 8, 128}, false, 0, false, 301},
      {{2, 1, 4096, 8, 1, 64}, true, 0, true, 302},    // ragged + causal, 8 splits
      {{3, 4, 1500, 4, 2, 40}, true, 0, true, 303},    // several queries, causal, ragged
      {{2, 3, 3000, 6, 2, 24}, true, 700, true, 304},  // window inside the split range
      {{1, 2, 1100, 4, 1, 8}, true, 0, false, 305},
      {{2, 3, 1100, 32, 2, 64}, true, 0, true, 306},   // a few queries of a big group
      {{3, 3, 1100, 4, 1, 16}, true, 0, true, 307},
  };
}

/// A work item stacks Sq * H/G rows. Small row counts (decode) may take register-blocked paths specialised per row
/// count (one to four SIMD packets of rows, or fewer rows than lanes) when D is a multiple of the SIMD width: row
/// counts 1..99 around every packet boundary (8 floats, 4 doubles on AVX2), D from one packet to eight, keys
/// across several tiles (Sk = 200), ragged lengths, causal.
std::vector<Case> decode_cases() {
  std::vector<Case> cases;
  for (Index group_size : {1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 31, 32, 33})
    for (Index sq : {1, 2, 3})
      cases.push_back(
          {{2, sq, 200, 2 * group_size, 2, 8 * (1 + (group_size + sq) % 8)}, true, 0, true,
           std::uint64_t(1000 + 7 * group_size + sq)});
  return cases;
}

/// Every case above that has masked-out rows.
std::vector<Case> masked_out_row_cases() {
  std::vector<Case> r;
  for (const auto& list : {head_sweep(), sequence_sweep(), edge_cases(), split_cases(), decode_cases()})
    for (const auto& c : filter_cases(list, true)) r.push_back(c);
  return r;
}

/// Number of key splits the kernel plans for these tensors (to assert a test really covers split-K).
template <typename T, typename KVT>
Index planned_splits(const Tensor4<T>& q, const Tensor4<KVT>& k, const Tensor4<KVT>& v, Tensor4<T>& out,
                     const gqa::AttentionOptions& opt) {
  const auto p = gqa::detail::make_params<T, KVT>(gqa::make_ref(q), gqa::make_ref(k), gqa::make_ref(v),
                                                  gqa::make_ref(out), opt);
  return gqa::detail::plan_tiles(p).splits;
}

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

/// K/V [B, S, G, D] -> [B, S, H, D] with head h a copy of KV head h / (H/G) (Hugging Face repeat_kv).
template <typename T>
Tensor4<T> repeat_kv(const Tensor4<T>& t, Index heads) {
  const Index G = t.dimension(2), rep = heads / G;
  Tensor4<T> r(t.dimension(0), t.dimension(1), heads, t.dimension(3));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index s = 0; s < t.dimension(1); ++s)
      for (Index h = 0; h < heads; ++h)
        for (Index d = 0; d < t.dimension(3); ++d) r(b, s, h, d) = t(b, s, h / rep, d);
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Sweeps against the reference
// ---------------------------------------------------------------------------------------------------------------

// Cases with masked-out rows (some queries of a sequence see no key) run in their own test case, below, so that a
// failure of the empty-row rule is reported on its own.

TEST_CASE("attention matches the reference: (H, G) x D sweep", "[attention][sweep]") {
  const Case c = GENERATE(from_range(filter_cases(head_sweep(), false)));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("attention matches the reference: (Sq, Sk) sweep", "[attention][sweep]") {
  const Case c = GENERATE(from_range(filter_cases(sequence_sweep(), false)));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("attention matches the reference: edge shapes", "[attention][sweep]") {
  const Case c = GENERATE(from_range(filter_cases(edge_cases(), false)));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("attention matches the reference: split-K decode (few work items, Sk >= 1024)", "[attention][split]") {
  // Each case asserts that it really is split, so a change of heuristics cannot silently remove the coverage.
  const Case c = GENERATE(from_range(filter_cases(split_cases(), false)));
  DYNAMIC_SECTION(c.name()) {
    auto in = gqa_test::random_inputs<float>(c.s, c.seed);
    Tensor4<float> out(c.s.B, c.s.Sq, c.s.H, c.s.D);
    CHECK(planned_splits(in.q, in.k, in.v, out, {}) > 1);
    check_case<float>(c, kFloatTol);
  }
}

TEST_CASE("decode and short-query shapes: every row count of a group", "[attention][decode]") {
  const Case c = GENERATE(from_range(filter_cases(decode_cases(), false)));
  DYNAMIC_SECTION(c.name()) {
    check_case<float>(c, kFloatTol);
    if (c.s.Sq == 1) {
      SECTION("double") { check_case<double>(c, kDoubleTol); }
      SECTION("float Q, bfloat16 K/V") { check_case<float, gqa::bfloat16>(c, kFloatTol); }
      SECTION("float Q, half K/V") { check_case<float, gqa::half>(c, kFloatTol); }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention sinks and ALiBi (gqa/options.hpp)
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("sinks and ALiBi match the reference over the shared sweep (every list, masked-out rows included)",
          "[attention][sinks][alibi]") {
  std::vector<Case> all;
  for (const auto& list : {head_sweep(), sequence_sweep(), edge_cases(), split_cases(), decode_cases()})
    for (const auto& c : gqa_test::with_sinks_and_alibi(list)) all.push_back(c);
  const Case c = GENERATE_COPY(from_range(all));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("sinks and ALiBi in every element type and the decode micro-kernels' row counts", "[attention][sinks][alibi]") {
  const Case c = GENERATE(from_range(gqa_test::with_sinks_and_alibi(decode_cases())));
  DYNAMIC_SECTION(c.name()) {
    if (c.s.Sq == 1) {
      SECTION("double") { check_case<double>(c, kDoubleTol); }
      SECTION("float Q, bfloat16 K/V") { check_case<float, gqa::bfloat16>(c, kFloatTol); }
      SECTION("float Q, half K/V") { check_case<float, gqa::half>(c, kFloatTol); }
      SECTION("bfloat16 Q/out") { check_case<gqa::bfloat16>(c, kBf16OutTol); }
    }
  }
}

/// attention with `opt` and with `opt` plus the no-op extras, for the bitwise comparisons below.
template <typename KVT>
void check_no_op(const Case& c, const std::vector<float>& sinks, const std::vector<float>& slopes) {
  auto in = gqa_test::random_inputs<float, KVT>(c.s, c.seed);
  gqa::AttentionOptions opt;
  opt.causal = c.causal;
  opt.window = c.window;
  const auto len = case_lengths(c);
  if (c.ragged) opt.key_lengths = len;
  std::vector<float> lse_plain(size_t(c.s.B * c.s.H * c.s.Sq)), lse_extra(lse_plain.size());
  gqa::AttentionOptions plain = opt, extra = opt;
  plain.lse = lse_plain;
  extra.lse = lse_extra;
  extra.sinks = sinks;
  extra.alibi_slopes = slopes;
  gqa_test::check_identical(gqa::attention(in.q, in.k, in.v, extra), gqa::attention(in.q, in.k, in.v, plain));
  CHECK(std::memcmp(lse_extra.data(), lse_plain.data(), lse_plain.size() * sizeof(float)) == 0);
}

TEST_CASE("sinks of -inf and ALiBi slopes of 0 change no bit of the output or lse, in every path",
          "[attention][sinks][alibi]") {
  // Decode (micro-kernels), split-K decode (the merge), prefill (tile products), a group wider than a tile, ragged
  // and causal with masked-out rows.
  const Case c = GENERATE(values<Case>({
      {{2, 1, 700, 8, 2, 64}, false, 0, true, 820},
      {{1, 1, 4096, 8, 2, 64}, true, 0, false, 821},
      {{2, 150, 300, 8, 2, 40}, true, 0, true, 822},
      {{1, 3, 257, 130, 1, 5}, false, 0, false, 823},
      {{3, 20, 15, 4, 2, 16}, true, 5, true, 824},
  }));
  const std::vector<float> none_sinks(size_t(c.s.H), -std::numeric_limits<float>::infinity());
  const std::vector<float> zero_slopes(size_t(c.s.H), 0.0f);
  DYNAMIC_SECTION(c.name()) {
    SECTION("sinks -inf") { check_no_op<float>(c, none_sinks, {}); }
    SECTION("slopes 0") { check_no_op<float>(c, {}, zero_slopes); }
    SECTION("both, bfloat16 K/V") { check_no_op<gqa::bfloat16>(c, none_sinks, zero_slopes); }
    SECTION("both, half K/V") { check_no_op<gqa::half>(c, none_sinks, zero_slopes); }
  }
}

TEST_CASE("a sink takes weight: zero sinks are not a no-op, and a row with no key gives 0 and lse = sink",
          "[attention][sinks]") {
  // Sq = 1, Sk = 1, one head, D = 1, v = 3: the softmax over [s, sink] with s = q.k = 0 and sink = 0 gives the key
  // weight 1/2, so out = 1.5 and lse = log 2; with key length 0 the row is 0 and lse = the sink.
  Tensor4<float> q(1, 1, 1, 1), k(1, 1, 1, 1), v(1, 1, 1, 1);
  q.setConstant(0.f), k.setConstant(1.f), v.setConstant(3.f);
  const std::vector<float> sinks{0.0f};
  std::vector<float> lse(1);
  gqa::AttentionOptions opt;
  opt.sinks = sinks;
  opt.lse = lse;
  CHECK(gqa::attention(q, k, v, opt)(0, 0, 0, 0) == Approx(1.5).epsilon(1e-6));
  CHECK(lse[0] == Approx(std::log(2.0)).epsilon(1e-6));
  const std::vector<float> sink_2{2.5f};
  const std::vector<std::int32_t> no_keys{0};
  opt.sinks = sink_2;
  opt.key_lengths = no_keys;
  CHECK(gqa::attention(q, k, v, opt)(0, 0, 0, 0) == 0.0f);
  CHECK(lse[0] == 2.5f);
}

TEST_CASE("attention: masked-out rows are exact zeros with lse -inf (sweep cases with Sq > len[b] > 0)",
          "[attention][empty]") {
  // Causal / window cases from every list above in which the first queries of a sequence sit at negative
  // positions and see no key, while later rows of the same work item do. (Regression: up to c28d742 such rows got
  // Eigen's vectorised exp(-inf) ~ 3e-39 per masked key, a nonzero sum, and returned a mean of masked values.)
  const Case c = GENERATE(from_range(masked_out_row_cases()));
  DYNAMIC_SECTION(c.name()) { check_case<float>(c, kFloatTol); }
}

TEST_CASE("split-K decode with a sequence shorter than one split or empty", "[attention][split]") {
  // Sk = 3000, B = 2, G = 1: 2 items -> 5 splits of 768 keys (600 rounded up to whole 256-key decode tiles; the
  // last split is empty). Sequence 0 holds a few keys (all in split 0, the other splits are empty), none at all,
  // or ends at a split boundary; sequence 1 holds all 3000. Padding is NaN.
  const std::int32_t short_len = GENERATE(0, 1, 5, 767, 768, 769);
  DYNAMIC_SECTION("len[0] = " << short_len) {
    const Shape s{2, 1, 3000, 4, 1, 16};
    auto in = gqa_test::random_inputs<float>(s, 400 + std::uint64_t(short_len));
    const std::vector<std::int32_t> len{short_len, 3000};
    gqa::AttentionOptions opt;
    opt.key_lengths = len;
    opt.causal = true;
    std::vector<float> lse(size_t(s.B * s.H * s.Sq)), lse_ref(lse.size());
    gqa::AttentionOptions ref_opt = opt;
    ref_opt.lse = lse_ref;
    const auto ref = gqa::reference_attention(in.q, in.k, in.v, ref_opt);
    poison_padding(in.k, len);
    poison_padding(in.v, len);
    Tensor4<float> out(s.B, s.Sq, s.H, s.D);
    CHECK(planned_splits(in.q, in.k, in.v, out, opt) > 1);
    opt.lse = lse;
    gqa::attention(in.q, in.k, in.v, out, opt);
    gqa_test::check_close(out, ref, kFloatTol);
    gqa_test::check_lse_close(lse, lse_ref, kLseTol);
    if (short_len == 0)
      for (Index h = 0; h < s.H; ++h) CHECK(lse[size_t(h)] == -std::numeric_limits<float>::infinity());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("element types: double, float, 16-bit K/V, bf16 Q/out", "[attention][dtype]") {
  const Case c = GENERATE(values<Case>({
      {{2, 5, 37, 8, 2, 59}, true, 0, true, 500},
      {{1, 1, 1100, 4, 1, 64}, false, 0, false, 501},  // split-K
      {{1, 130, 140, 6, 3, 24}, true, 0, false, 502},
  }));
  DYNAMIC_SECTION(c.name()) {
    REQUIRE_FALSE(has_masked_out_rows(c));  // covered by their own test case
    // Double Q/K/V: arithmetic in double.
    SECTION("double") { check_case<double>(c, kDoubleTol); }
    SECTION("float") { check_case<float>(c, kFloatTol); }
    // 16-bit K/V with float Q: the reference reads the same 16-bit values, so only float arithmetic remains.
    SECTION("float Q, bfloat16 K/V") { check_case<float, gqa::bfloat16>(c, kFloatTol); }
    SECTION("float Q, half K/V") { check_case<float, gqa::half>(c, kFloatTol); }
    // bf16 everywhere: the output is rounded to bf16 at the end.
    SECTION("bfloat16 Q/K/V/out") { check_case<gqa::bfloat16>(c, kBf16OutTol); }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("G = H is MHA: each head is an independent single-head attention", "[attention][property]") {
  const Shape s{2, 9, 21, 4, 4, 24};
  auto in = gqa_test::random_inputs<double>(s, 600);
  gqa::AttentionOptions opt;
  opt.causal = GENERATE(false, true);
  Tensor4<double> out(s.B, s.Sq, s.H, s.D), out_mha(s.B, s.Sq, s.H, s.D);
  gqa::attention(in.q, in.k, in.v, out, opt);
  gqa::mha(in.q, in.k, in.v, out_mha, opt);
  gqa_test::check_identical(out, out_mha);
  // Head h alone: strided H = G = 1 views of head h of q, k, v and out (no copies).
  Tensor4<double> per_head(s.B, s.Sq, s.H, s.D);
  for (Index h = 0; h < s.H; ++h) {
    auto view = [&](auto& t, Index S) {
      using E = std::remove_reference_t<decltype(*t.data())>;
      return gqa::TensorRef<E>{t.data() + h * s.D, {s.B, S, 1, s.D}, {S * s.H * s.D, s.H * s.D, s.D, 1}};
    };
    gqa::attention(view(in.q, s.Sq), view(in.k, s.Sk), view(in.v, s.Sk), view(per_head, s.Sq), opt);
  }
  gqa_test::check_close(per_head, gqa_test::to_double(out), kDoubleTol);
}

TEST_CASE("GQA equals MHA on K/V whose heads are copies of their group's head", "[attention][property]") {
  const Shape s = GENERATE(Shape{2, 7, 45, 8, 2, 16}, Shape{1, 1, 1500, 12, 3, 32}, Shape{1, 40, 40, 6, 1, 8});
  const bool causal = GENERATE(false, true);
  DYNAMIC_SECTION(s.str() << (causal ? "/causal" : "")) {
    gqa::AttentionOptions opt;
    opt.causal = causal;
    SECTION("double") {
      auto in = gqa_test::random_inputs<double>(s, 610);
      const auto gqa_out = gqa::attention(in.q, in.k, in.v, opt);
      const auto mha_out = gqa::attention(in.q, repeat_kv(in.k, s.H), repeat_kv(in.v, s.H), opt);
      gqa_test::check_close(gqa_out, gqa_test::to_double(mha_out), kDoubleTol);
    }
    SECTION("float") {
      auto in = gqa_test::random_inputs<float>(s, 611);
      const auto gqa_out = gqa::attention(in.q, in.k, in.v, opt);
      const auto mha_out = gqa::attention(in.q, repeat_kv(in.k, s.H), repeat_kv(in.v, s.H), opt);
      gqa_test::check_close(gqa_out, gqa_test::to_double(mha_out), kFloatTol);
    }
  }
}

TEST_CASE("the same result through Tensor, TensorMap, TensorRef and both K/V layouts", "[attention][property]") {
  // One kernel, one work split: only how the bytes are addressed changes, so the results are bitwise equal.
  const Shape s{2, 5, 150, 6, 2, 20};
  auto in = gqa_test::random_inputs<float>(s, 620);
  gqa::AttentionOptions opt;
  opt.causal = true;
  const auto ref = gqa::reference_attention(in.q, in.k, in.v, opt);
  Tensor4<float> base(s.B, s.Sq, s.H, s.D);
  gqa::attention(in.q, in.k, in.v, base, opt);
  gqa_test::check_close(base, ref, kFloatTol);

  SECTION("TensorMap inputs and output (user buffers)") {
    std::vector<float> out_buf(size_t(base.size()));
    gqa::Tensor4Map<const float> q(in.q.data(), s.B, s.Sq, s.H, s.D);
    gqa::Tensor4Map<const float> k(in.k.data(), s.B, s.Sk, s.G, s.D), v(in.v.data(), s.B, s.Sk, s.G, s.D);
    gqa::Tensor4Map<float> out(out_buf.data(), s.B, s.Sq, s.H, s.D);
    gqa::attention(q, k, v, out, opt);
    Tensor4<float> copy = out;
    gqa_test::check_identical(copy, base);
  }
  SECTION("head-major K/V tensors via gqa::head_major(k)") {
    const auto k = to_head_major(in.k), v = to_head_major(in.v);
    Tensor4<float> out(s.B, s.Sq, s.H, s.D);
    gqa::attention(in.q, gqa::head_major(k), gqa::head_major(v), out, opt);
    gqa_test::check_identical(out, base);
    // and the reference agrees it is the same problem
    gqa_test::check_close(out, gqa::reference_attention(in.q, gqa::head_major(k), gqa::head_major(v), opt), kFloatTol);
  }
  SECTION("head-major K/V through gqa::head_major TensorRefs") {
    auto k = to_head_major(in.k), v = to_head_major(in.v);
    Tensor4<float> out(s.B, s.Sq, s.H, s.D);
    gqa::attention(gqa::token_major<const float>(in.q.data(), s.B, s.Sq, s.H, s.D),
                   gqa::head_major<const float>(k.data(), s.B, s.G, s.Sk, s.D),
                   gqa::head_major<const float>(v.data(), s.B, s.G, s.Sk, s.D),
                   gqa::token_major(out.data(), s.B, s.Sq, s.H, s.D), opt);
    gqa_test::check_identical(out, base);
  }
  SECTION("the returning overload") {
    const Tensor4<float> out = gqa::attention(in.q, in.k, in.v, opt);
    gqa_test::check_identical(out, base);
  }
}

TEST_CASE("strided TensorRef views: a KV buffer with spare capacity, fused QKV, a wider output",
          "[attention][property]") {
  const Shape s{2, 3, 70, 8, 2, 12};
  const Index capacity = 97;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // K/V cache buffers [B, G, capacity, D], NaN everywhere past Sk: the kernel must read only the view.
  Tensor4<float> k_cache(s.B, s.G, capacity, s.D), v_cache(s.B, s.G, capacity, s.D);
  k_cache.setConstant(nan);
  v_cache.setConstant(nan);
  const gqa::TensorRef<float> k{k_cache.data(), {s.B, s.Sk, s.G, s.D}, {s.G * capacity * s.D, s.D, capacity * s.D, 1}};
  const gqa::TensorRef<float> v{v_cache.data(), {s.B, s.Sk, s.G, s.D}, {s.G * capacity * s.D, s.D, capacity * s.D, 1}};
  gqa_test::fill_normal(k, 630);
  gqa_test::fill_normal(v, 631);
  // Q inside a fused projection output [B, Sq, H + 2G, D] (q heads first), output inside [B, Sq, H + 1, D + 3].
  const Index fused = s.H + 2 * s.G;
  Tensor4<float> qkv(s.B, s.Sq, fused, s.D);
  gqa_test::fill_normal(qkv, 632);
  const gqa::TensorRef<const float> q{qkv.data(), {s.B, s.Sq, s.H, s.D}, {s.Sq * fused * s.D, fused * s.D, s.D, 1}};
  Tensor4<float> wide(s.B, s.Sq, s.H + 1, s.D + 3);
  wide.setConstant(-7.0f);
  const gqa::TensorRef<float> out{wide.data(), {s.B, s.Sq, s.H, s.D},
                                  {s.Sq * (s.H + 1) * (s.D + 3), (s.H + 1) * (s.D + 3), s.D + 3, 1}};
  gqa::AttentionOptions opt;
  opt.causal = true;
  gqa::attention(q, gqa::TensorRef<const float>(k), gqa::TensorRef<const float>(v), out, opt);

  const auto ref = gqa::reference_attention<float, float>(q, k, v, opt);
  Tensor4<float> got(s.B, s.Sq, s.H, s.D);
  Index touched = 0;
  for (Index b = 0; b < s.B; ++b)
    for (Index i = 0; i < s.Sq; ++i)
      for (Index h = 0; h < s.H + 1; ++h)
        for (Index d = 0; d < s.D + 3; ++d) {
          if (h < s.H && d < s.D)
            got(b, i, h, d) = wide(b, i, h, d);
          else
            touched += wide(b, i, h, d) != -7.0f;
        }
  gqa_test::check_close(got, ref, kFloatTol);
  CHECK(touched == 0);  // nothing outside the output view was written
}

// ---------------------------------------------------------------------------------------------------------------
// Compile-time group size, mha, mqa
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("attention<GroupSize>, mha and mqa compute the same as the dynamic kernel", "[attention][groupsize]") {
  gqa::AttentionOptions opt;
  opt.causal = true;
  SECTION("attention<4> with H/G = 8/2") {
    auto in = gqa_test::random_inputs<float>({2, 6, 33, 8, 2, 16}, 700);
    const auto dyn = gqa::attention(in.q, in.k, in.v, opt);
    Tensor4<float> fixed(dyn.dimensions());
    gqa::attention<4>(in.q, in.k, in.v, fixed, opt);
    gqa_test::check_identical(fixed, dyn);
    gqa_test::check_close(fixed, gqa::reference_attention(in.q, in.k, in.v, opt), kFloatTol);
  }
  SECTION("mha with G = H") {
    auto in = gqa_test::random_inputs<float>({2, 6, 33, 5, 5, 16}, 701);
    Tensor4<float> out(2, 6, 5, 16);
    gqa::mha(in.q, in.k, in.v, out, opt);
    gqa_test::check_identical(out, gqa::attention(in.q, in.k, in.v, opt));
    gqa_test::check_close(out, gqa::reference_attention(in.q, in.k, in.v, opt), kFloatTol);
  }
  SECTION("mqa with G = 1") {
    auto in = gqa_test::random_inputs<float>({2, 6, 33, 7, 1, 16}, 702);
    Tensor4<float> out(2, 6, 7, 16);
    gqa::mqa(in.q, in.k, in.v, out, opt);
    gqa_test::check_identical(out, gqa::attention(in.q, in.k, in.v, opt));
    gqa_test::check_close(out, gqa::reference_attention(in.q, in.k, in.v, opt), kFloatTol);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("results are bitwise identical for every num_threads", "[attention][threads]") {
  // Prefill (many items, dynamic schedule), split-K decode (partials merged), ragged + causal, 16-bit K/V.
  const Case c = GENERATE(values<Case>({
      {{2, 200, 300, 8, 2, 40}, true, 0, true, 800},
      {{1, 1, 4096, 8, 2, 64}, false, 0, false, 801},
      {{3, 2, 2000, 4, 1, 24}, true, 0, true, 802},
  }));
  const bool sinks_and_alibi = GENERATE(false, true);
  Case cx = c;
  cx.sinks = cx.alibi = sinks_and_alibi;
  DYNAMIC_SECTION(cx.name()) {
    auto in = gqa_test::random_inputs<float>(c.s, c.seed);
    // len[b] >= Sq: every row sees a key (masked-out rows are covered by their own test case).
    const auto len = gqa_test::ragged_lengths(c.s.B, c.s.Sk, c.seed, c.s.Sq);
    gqa::AttentionOptions opt;
    opt.causal = c.causal;
    const gqa_test::HeadValues extras(cx);
    extras.set(opt);
    if (c.ragged) opt.key_lengths = len;
    auto run = [&](int threads, std::vector<float>& lse) {
      gqa::AttentionOptions o = opt;
      o.num_threads = threads;
      o.lse = lse;
      return gqa::attention(in.q, in.k, in.v, o);
    };
    std::vector<float> lse1(size_t(c.s.B * c.s.H * c.s.Sq)), lse_n(lse1.size());
    const auto one = run(1, lse1);
    gqa_test::check_close(one, gqa::reference_attention(in.q, in.k, in.v, opt), with_alibi(kFloatTol, extras, cx));
    for (int threads : {2, 3, 0}) {
      INFO("num_threads = " << threads);
      const auto many = run(threads, lse_n);
      gqa_test::check_identical(many, one);
      CHECK(std::memcmp(lse_n.data(), lse1.data(), lse1.size() * sizeof(float)) == 0);
    }
  }
}

#ifdef _OPENMP
TEST_CASE("called inside an OpenMP parallel region: runs, correct, identical, no ICV leak", "[attention][threads]") {
  const Shape s{2, 2, 1500, 8, 2, 32};  // split-K decode shape
  auto in = gqa_test::random_inputs<float>(s, 810);
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.num_threads = 1;
  const auto serial = gqa::attention(in.q, in.k, in.v, opt);
  gqa_test::check_close(serial, gqa::reference_attention(in.q, in.k, in.v, opt), kFloatTol);

  const int max_before = omp_get_max_threads();
  std::vector<Tensor4<float>> outs(2, Tensor4<float>(s.B, s.Sq, s.H, s.D));
  std::vector<int> max_inside(2, -1), max_after_call(2, -1);
  int team = 0;
  opt.num_threads = 0;  // would be omp_get_max_threads() outside a region
#pragma omp parallel num_threads(2)
  {
    const int t = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
    max_inside[size_t(t)] = omp_get_max_threads();
    gqa::attention(in.q, in.k, in.v, outs[size_t(t)], opt);
    max_after_call[size_t(t)] = omp_get_max_threads();
  }
  INFO("team of " << team);
  for (int t = 0; t < team; ++t) {
    gqa_test::check_identical(outs[size_t(t)], serial);
    CHECK(max_after_call[size_t(t)] == max_inside[size_t(t)]);  // the caller's thread ICV is left alone
  }
  CHECK(omp_get_max_threads() == max_before);
  // And after a top-level call too: the kernel's omp_set_num_threads(1) stays inside its own region.
  opt.num_threads = 2;
  (void)gqa::attention(in.q, in.k, in.v, opt);
  CHECK(omp_get_max_threads() == max_before);
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Non-finite inputs and head-major arguments (issue 11, items 12, 13 and 15)
// ---------------------------------------------------------------------------------------------------------------

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

/// Checks the kernel against the reference on inputs holding NaN or inf: a row is NaN (output and lse) exactly
/// where the reference's row is, and every other row is finite and within `tol`. Returns the number of NaN rows.
template <typename T, typename KVT, typename K, typename V>
Index check_rows_like_reference(const Tensor4<T>& q, const K& k, const V& v, gqa::AttentionOptions opt,
                                Tolerance tol) {
  const Index B = q.dimension(0), Sq = q.dimension(1), H = q.dimension(2), D = q.dimension(3);
  std::vector<float> lse(size_t(B * H * Sq)), lse_ref(lse.size());
  gqa::AttentionOptions ref_opt = opt;
  ref_opt.lse = lse_ref;
  const auto ref = gqa::reference_attention(q, k, v, ref_opt);
  opt.lse = lse;
  Tensor4<T> out(B, Sq, H, D);
  gqa::attention(q, k, v, out, opt);
  Index nan_rows = 0, wrong_nan = 0, bad = 0;
  for (Index b = 0; b < B; ++b)
    for (Index i = 0; i < Sq; ++i)
      for (Index h = 0; h < H; ++h) {
        const size_t row = size_t((b * H + h) * Sq + i);
        const bool ref_nan = std::isnan(ref(b, i, h, 0));
        nan_rows += ref_nan;
        wrong_nan += ref_nan != std::isnan(lse[row]) || ref_nan != std::isnan(lse_ref[row]);
        for (Index d = 0; d < D; ++d) {
          const double o = gqa_test::to_double(out(b, i, h, d)), e = ref(b, i, h, d);
          if (ref_nan)
            wrong_nan += !std::isnan(o);
          else
            bad += !(std::abs(o - e) <= tol.atol + tol.rtol * std::abs(e));  // false for NaN or inf o
        }
      }
  INFO(nan_rows << " rows are NaN in the reference");
  CHECK(wrong_nan == 0);
  CHECK(bad == 0);
  return nan_rows;
}

/// K and V of key j of sequence b set to `value` in every head (and every element).
template <typename KVT>
void poison_key(Tensor4<KVT>& k, Tensor4<KVT>& v, Index b, Index j, float value) {
  for (Index g = 0; g < k.dimension(2); ++g)
    for (Index d = 0; d < k.dimension(3); ++d) k(b, j, g, d) = v(b, j, g, d) = KVT(value);
}

/// A prefill (Eigen GEMM), a decode with several queries per item (micro-kernels), a split decode, and a 16-bit one.
std::vector<Case> nonfinite_cases() {
  return {
      {{1, 300, 300, 8, 2, 32}, true, 0, false, 900},   // prefill, GEMM path
      {{2, 3, 200, 8, 2, 16}, true, 0, false, 901},     // 3 queries x 4 heads per item: micro-kernels
      {{1, 2, 3000, 8, 2, 16}, true, 0, false, 902},    // split decode
      {{1, 120, 150, 4, 1, 32}, true, 40, false, 903},  // sliding window
  };
}

}  // namespace

TEST_CASE("NaN or inf in a visible q or k makes exactly the rows that see it NaN, as the reference",
          "[attention][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  DYNAMIC_SECTION(c.name()) {
    auto in = gqa_test::random_inputs<float>(c.s, c.seed);
    gqa::AttentionOptions opt;
    opt.causal = c.causal;
    opt.window = c.window;
    SECTION("NaN in one query row") {
      in.q(0, c.s.Sq - 1, 1, 3) = kNaN;
      CHECK(check_rows_like_reference<float, float>(in.q, in.k, in.v, opt, kFloatTol) == 1);
    }
    SECTION("NaN in the K of the last visible key of the last query") {
      in.k(0, c.s.Sk - 1, 0, 0) = kNaN;
      // group 0's heads at the last query (and, without a window, every query that sees the last key)
      CHECK(check_rows_like_reference<float, float>(in.q, in.k, in.v, opt, kFloatTol) >= c.s.H / c.s.G);
    }
    SECTION("+inf in a K element") {
      in.k(0, c.s.Sk - 1, c.s.G - 1, 2) = std::numeric_limits<float>::infinity();  // the last KV head: G may be 1
      check_rows_like_reference<float, float>(in.q, in.k, in.v, opt, kFloatTol);
    }
  }
}

TEST_CASE("q = k = 1e30: a NaN row in float (q.k overflows), the right answer in double, never a silent zero",
          "[attention][nonfinite]") {
  // One key, v = 1: the softmax weight is 1 and the answer is 1. In float q.k = 1e60 overflows to +inf, which has
  // no finite softmax: the row is NaN (it was zeros with lse -inf, as if fully masked). Double holds 1e60.
  const Shape s{1, 1, 1, 2, 1, 8};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    Tensor4<T> q(s.B, s.Sq, s.H, s.D), k(s.B, s.Sk, s.G, s.D), v(s.B, s.Sk, s.G, s.D);
    q.setConstant(T(1e30));
    k.setConstant(T(1e30));
    v.setConstant(T(1));
    std::vector<float> lse(2);
    gqa::AttentionOptions opt;
    opt.lse = lse;
    const Tensor4<T> out = gqa::attention(q, k, v, opt);
    return std::make_pair(gqa_test::to_double(out(0, 0, 0, 0)), double(lse[0]));
  };
  const auto [f_out, f_lse] = run(0.0f);
  CHECK(std::isnan(f_out));
  CHECK(std::isnan(f_lse));
  const auto [d_out, d_lse] = run(0.0);
  CHECK(d_out == 1.0);
  CHECK(std::isinf(d_lse));  // 1e60 * 8 / sqrt(8) overflows the float lse, as its definition says
}

TEST_CASE("NaN or inf in masked K/V never reaches a row that cannot see it, in every path",
          "[attention][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  DYNAMIC_SECTION(c.name()) {
    gqa::AttentionOptions opt;
    opt.causal = c.causal;
    opt.window = c.window;
    const float bad = GENERATE(std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity());
    SECTION("float K/V") {
      auto in = gqa_test::random_inputs<float>(c.s, c.seed);
      // The last key (only the last query sees it) and the key of the middle query's position (the causal future
      // of earlier rows, outside the window of later ones).
      poison_key(in.k, in.v, 0, c.s.Sk - 1, bad);
      poison_key(in.k, in.v, 0, c.s.Sk - c.s.Sq + c.s.Sq / 2, bad);
      const Index nan_rows = check_rows_like_reference<float, float>(in.q, in.k, in.v, opt, kFloatTol);
      CHECK(nan_rows > 0);
      CHECK(nan_rows < c.s.B * c.s.Sq * c.s.H);  // some rows see neither key, and must be finite
    }
    SECTION("bfloat16 K/V") {
      auto in = gqa_test::random_inputs<float, gqa::bfloat16>(c.s, c.seed);
      poison_key(in.k, in.v, 0, c.s.Sk - 1, bad);
      const Index nan_rows = check_rows_like_reference<float, gqa::bfloat16>(in.q, in.k, in.v, opt, kFloatTol);
      CHECK(nan_rows < c.s.B * c.s.Sq * c.s.H);
    }
  }
}

TEST_CASE("NaN in K/V under a -inf bias entry never reaches that row; other heads see it", "[attention][nonfinite]") {
  const Case c = GENERATE(from_range(nonfinite_cases()));
  DYNAMIC_SECTION(c.name()) {
    auto in = gqa_test::random_inputs<float>(c.s, c.seed);
    const Index j = c.s.Sk - 1 - c.s.Sq / 2;
    poison_key(in.k, in.v, 0, j, kNaN);
    // Bias [B, H, Sq, Sk]: head 0 masks key j for every query; the other heads add 0.
    Tensor4<float> bias(c.s.B, c.s.H, c.s.Sq, c.s.Sk);
    bias.setZero();
    for (Index b = 0; b < c.s.B; ++b)
      for (Index i = 0; i < c.s.Sq; ++i) bias(b, 0, i, j) = -std::numeric_limits<float>::infinity();
    gqa::AttentionOptions opt;
    opt.causal = c.causal;
    opt.window = c.window;
    opt.bias = bias;
    const Index nan_rows = check_rows_like_reference<float, float>(in.q, in.k, in.v, opt, kFloatTol);
    CHECK(nan_rows > 0);  // heads 1.. of the rows that see key j
  }
}

namespace {
template <typename T, typename = void>
struct has_kv_layout : std::false_type {};
template <typename T>
struct has_kv_layout<T, std::void_t<decltype(std::declval<T&>().kv_layout)>> : std::true_type {};
template <typename T, typename = void>
struct head_major_accepts : std::false_type {};
template <typename T>
struct head_major_accepts<T, std::void_t<decltype(gqa::head_major(std::declval<T>()))>> : std::true_type {};
}  // namespace

TEST_CASE("head-major K/V is part of the argument: no layout option, temporaries refused", "[attention][layout]") {
  // An option could disagree with the data (a head-major tensor passed without it was read token-major); the
  // layout now travels with the argument, gqa::head_major(k), and a plain Eigen tensor is always token-major.
  static_assert(!has_kv_layout<gqa::AttentionOptions>::value, "the layout must not be an option");
  static_assert(head_major_accepts<const Tensor4<float>&>::value, "");
  static_assert(!head_major_accepts<Tensor4<float>>::value, "a view of a temporary would dangle");
  const Shape s{2, 3, 40, 4, 2, 16};
  auto in = gqa_test::random_inputs<float>(s, 950);
  const auto k = to_head_major(in.k), v = to_head_major(in.v);
  const auto view = gqa::head_major(k);
  CHECK(view.dims == std::array<Index, 4>{s.B, s.Sk, s.G, s.D});
  CHECK(&view(1, 7, 1, 3) == &k(1, 1, 7, 3));
  gqa::AttentionOptions opt;
  opt.causal = true;
  gqa_test::check_identical(gqa::attention(in.q, gqa::head_major(k), gqa::head_major(v), opt),
                            gqa::attention(in.q, in.k, in.v, opt));
}
