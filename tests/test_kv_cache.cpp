// Tests for gqa/kv_cache.hpp: storage layout, ragged appends, errors, and decoding against the cache compared
// with the double reference and with one causal prefill over the whole sequence.
#include "gqa/kv_cache.hpp"
#include "gqa/reference.hpp"
#include "support/compare.hpp"
#include "support/int8_queries.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

using gqa::Index;
using gqa::KVCache;
using gqa::Tensor4;
using Catch::Matchers::Contains;

namespace {

// Float kernel against the double reference on the same stored values: only float rounding of dot products and
// the online softmax separates them, a few ulp relative to |V| <= 1 over at most a few thousand keys.
constexpr gqa_test::Tolerance kFloatTol{2e-5, 2e-5};

template <typename T>
Tensor4<float> slice_tokens(const Tensor4<T>& x, Index begin, Index count) {
  Tensor4<float> out(x.dimension(0), count, x.dimension(2), x.dimension(3));
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index s = 0; s < count; ++s)
      for (Index h = 0; h < x.dimension(2); ++h)
        for (Index d = 0; d < x.dimension(3); ++d) out(b, s, h, d) = float(x(b, begin + s, h, d));
  return out;
}

}  // namespace

TEST_CASE("KVCache stores head-major [B, G, capacity, D] and reports bytes", "[kv_cache]") {
  const Index B = 2, G = 3, C = 10, D = 4;
  KVCache<float> cache(B, G, C, D);
  CHECK(cache.batch() == B);
  CHECK(cache.kv_heads() == G);
  CHECK(cache.capacity() == C);
  CHECK(cache.head_dim() == D);
  CHECK(cache.bytes() == 2u * B * G * C * D * sizeof(float));
  CHECK(cache.bytes_per_token() == 2u * G * D * sizeof(float));
  CHECK(cache.max_length() == 0);

  Tensor4<float> k(B, 3, G, D), v(B, 3, G, D);
  gqa_test::fill_uniform(k, 1);
  gqa_test::fill_uniform(v, 2);
  std::vector<std::int32_t> counts{3, 1};
  cache.append(k, v, counts);
  CHECK(cache.length(0) == 3);
  CHECK(cache.length(1) == 1);
  CHECK(cache.bytes_in_use() == 4u * cache.bytes_per_token());

  // Token s of sequence b, head g sits at storage (b, g, s, :); the view has logical dims [B, max_len, G, D].
  const auto keys = cache.keys();
  CHECK(keys.dims == std::array<Index, 4>{B, 3, G, D});
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < counts[size_t(b)]; ++s)
      for (Index g = 0; g < G; ++g)
        for (Index d = 0; d < D; ++d) {
          CHECK(cache.key_storage()(b, g, s, d) == k(b, s, g, d));
          CHECK(cache.value_storage()(b, g, s, d) == v(b, s, g, d));
          CHECK(keys(b, s, g, d) == k(b, s, g, d));
        }
}

TEST_CASE("KVCache of bfloat16 and half rounds appended floats once", "[kv_cache]") {
  Tensor4<float> k(1, 2, 1, 8), v(1, 2, 1, 8);
  gqa_test::fill_uniform(k, 3);
  gqa_test::fill_uniform(v, 4);
  KVCache<gqa::bfloat16> bf(1, 1, 4, 8);
  KVCache<gqa::half> hf(1, 1, 4, 8);
  bf.append(k, v);
  hf.append(k, v);
  for (Index s = 0; s < 2; ++s)
    for (Index d = 0; d < 8; ++d) {
      CHECK(bf.key_storage()(0, 0, s, d) == gqa::bfloat16(k(0, s, 0, d)));
      CHECK(hf.value_storage()(0, 0, s, d) == gqa::half(v(0, s, 0, d)));
    }
  CHECK(bf.bytes_per_token() == 2u * 8 * 2);
}

TEST_CASE("KVCache errors name the argument and values, and leave the cache unchanged", "[kv_cache]") {
  KVCache<float> cache(2, 2, 5, 4);
  Tensor4<float> ok(2, 3, 2, 4);
  ok.setZero();
  cache.append(ok, ok);

  SECTION("overflow") {
    Tensor4<float> more(2, 3, 2, 4);
    more.setZero();
    CHECK_THROWS_AS(cache.append(more, more), gqa::invalid_argument);
    CHECK_THROWS_WITH(cache.append(more, more), Contains("capacity 5") && Contains("holds 3"));
    CHECK(cache.length(0) == 3);  // nothing was appended
    CHECK(cache.length(1) == 3);
  }
  SECTION("shape mismatches") {
    Tensor4<float> wrong_b(1, 1, 2, 4), wrong_g(2, 1, 3, 4), wrong_d(2, 1, 2, 5), other_s(2, 2, 2, 4);
    CHECK_THROWS_AS(cache.append(wrong_b, wrong_b), gqa::shape_error);
    CHECK_THROWS_WITH(cache.append(wrong_b, wrong_b), Contains("dim 0 (batch B) = 1") && Contains("B = 2"));
    CHECK_THROWS_WITH(cache.append(wrong_g, wrong_g), Contains("dim 2 (kv_heads G) = 3") && Contains("G = 2"));
    CHECK_THROWS_WITH(cache.append(wrong_d, wrong_d), Contains("dim 3 (head_dim D) = 5") && Contains("D = 4"));
    Tensor4<float> one(2, 1, 2, 4);
    CHECK_THROWS_WITH(cache.append(one, other_s), Contains("v_new dim 1 = 2") && Contains("k_new dim 1 = 1"));
    CHECK(cache.length(0) == 3);
  }
  SECTION("ragged counts") {
    Tensor4<float> one(2, 1, 2, 4);
    one.setZero();
    std::vector<std::int32_t> too_many{2, 0}, wrong_size{1};
    CHECK_THROWS_WITH(cache.append(one, one, too_many), Contains("counts[0] = 2") && Contains("S_new = 1"));
    CHECK_THROWS_WITH(cache.append(one, one, wrong_size), Contains("counts size = 1") && Contains("B = 2"));
  }
  SECTION("constructor") {
    CHECK_THROWS_WITH(KVCache<float>(0, 1, 1, 1), Contains("batch = 0"));
    CHECK_THROWS_WITH(KVCache<float>(1, 1, 0, 1), Contains("capacity = 0"));
  }
  SECTION("key lengths come from the cache") {
    Tensor4<float> q(2, 1, 4, 4), out(2, 1, 4, 4);
    q.setZero();
    std::vector<std::int32_t> lens{1, 1};
    gqa::AttentionOptions opt;
    opt.key_lengths = lens;
    CHECK_THROWS_WITH(gqa::attention(q, cache, out, opt), Contains("key_lengths must be empty"));
  }
  SECTION("truncate and clear") {
    cache.truncate(1, 1);
    CHECK(cache.length(1) == 1);
    CHECK_THROWS_WITH(cache.truncate(1, 2), Contains("length 2") && Contains("current length 1"));
    CHECK_THROWS_WITH(cache.truncate(2, 0), Contains("sequence 2"));
    cache.clear();
    CHECK(cache.max_length() == 0);
  }
}

TEMPLATE_TEST_CASE("Decode against a ragged KVCache matches the reference", "[kv_cache]", float, gqa::bfloat16,
                   gqa::half) {
  // (H, G): MHA, GQA with 4, 8 and 9 heads per group, MQA; D = 64 takes the micro-kernels, D = 59 the GEMM path.
  const auto hg = GENERATE(std::pair<Index, Index>{4, 4}, std::pair<Index, Index>{8, 2},
                           std::pair<Index, Index>{16, 2}, std::pair<Index, Index>{9, 1},
                           std::pair<Index, Index>{32, 1});
  const Index D = GENERATE(Index(64), Index(59));
  const Index B = 3, C = 1500, H = hg.first, G = hg.second;
  DYNAMIC_SECTION("H=" << H << " G=" << G << " D=" << D) {
    KVCache<TestType> cache(B, G, C, D);
    Tensor4<float> k(B, 1400, G, D), v(B, 1400, G, D);
    gqa_test::fill_uniform(k, 11);
    gqa_test::fill_uniform(v, 12);
    std::vector<std::int32_t> counts{1400, 700, 0};  // one at the maximum, one half, one empty
    cache.append(k, v, counts);

    Tensor4<float> q(B, 2, H, D), out(B, 2, H, D);
    gqa_test::fill_uniform(q, 13, -2.0, 2.0);
    gqa::AttentionOptions opt;
    opt.causal = true;
    gqa::attention(q, cache, out, opt);

    gqa::AttentionOptions ref_opt = opt;
    ref_opt.key_lengths = cache.lengths();
    const auto ref = gqa::reference_attention<float, TestType>(gqa::make_ref(q), cache.keys(), cache.values(),
                                                               ref_opt);
    gqa_test::check_close(out, ref, kFloatTol);
    // The empty sequence has no visible key: zeros, not NaN.
    for (Index i = 0; i < 2; ++i)
      for (Index h = 0; h < H; ++h) CHECK(out(2, i, h, 0) == 0.0f);
  }
}

TEST_CASE("Token-by-token decode through the cache equals one causal prefill", "[kv_cache]") {
  // The paper's inference loop: append each token's K/V, attend with that token's queries. Step t must equal row t
  // of a causal prefill over the whole sequence (bottom-right alignment makes Sq = 1 see the whole cache).
  const Index B = 2, S = 70, H = 8, G = 2, D = 32;
  Tensor4<float> q(B, S, H, D), k(B, S, G, D), v(B, S, G, D);
  gqa_test::fill_uniform(q, 21, -2.0, 2.0);
  gqa_test::fill_uniform(k, 22);
  gqa_test::fill_uniform(v, 23);
  gqa::AttentionOptions causal;
  causal.causal = true;
  const Tensor4<float> prefill = gqa::attention(q, k, v, causal);

  KVCache<float> cache(B, G, S, D);
  const Index chunk = GENERATE(Index(1), Index(7));  // one token per step, and chunked prefill
  Tensor4<float> stepwise(B, S, H, D);
  for (Index t = 0; t < S; t += chunk) {
    const Index n = std::min(chunk, S - t);
    cache.append(slice_tokens(k, t, n), slice_tokens(v, t, n));
    const Tensor4<float> o = gqa::attention(slice_tokens(q, t, n), cache, causal);
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < n; ++s)
        for (Index h = 0; h < H; ++h)
          for (Index d = 0; d < D; ++d) stepwise(b, t + s, h, d) = o(b, s, h, d);
  }
  // Both are float kernels over the same keys; they differ only in tile boundaries, so a few ulp.
  gqa_test::check_close(stepwise, gqa_test::to_double(prefill), {1e-6, 1e-5});
}

TEST_CASE("A GQA cache is H/G times smaller than an MHA cache", "[kv_cache]") {
  const Index H = 32, D = 128;
  const KVCache<float> mha(1, H, 16, D);
  for (Index G : {16, 8, 4, 2, 1}) {
    const KVCache<float> gqa_cache(1, G, 16, D);
    CHECK(mha.bytes_per_token() == gqa_cache.bytes_per_token() * std::size_t(H / G));
  }
  CHECK(KVCache<gqa::bfloat16>(1, 8, 16, D).bytes() * 2 == KVCache<float>(1, 8, 16, D).bytes());
}

// ------------------------------------------------------------------------------------------------ int8 cache

namespace {

/// The values an int8 cache stands for, q * scale, in float (what its kernels multiply), [B, G, capacity, D] each.
struct Dequantized {
  Tensor4<float> k, v;

  explicit Dequantized(const KVCache<std::int8_t>& c)
      : k(c.batch(), c.kv_heads(), c.capacity(), c.head_dim()), v(k.dimensions()) {
    for (Index b = 0; b < c.batch(); ++b)
      for (Index g = 0; g < c.kv_heads(); ++g)
        for (Index s = 0; s < c.capacity(); ++s)
          for (Index d = 0; d < c.head_dim(); ++d) {
            k(b, g, s, d) = float(c.key_storage()(b, g, s, d)) * c.key_scales()(b, g, s);
            v(b, g, s, d) = float(c.value_storage()(b, g, s, d)) * c.value_scales()(b, g, s);
          }
  }
  /// Views with the cache's logical dims [B, max_length, G, D] (the same strides as cache.keys()).
  gqa::TensorRef<const float> keys(const KVCache<std::int8_t>& c) const { return view(k, c); }
  gqa::TensorRef<const float> values(const KVCache<std::int8_t>& c) const { return view(v, c); }

 private:
  static gqa::TensorRef<const float> view(const Tensor4<float>& t, const KVCache<std::int8_t>& c) {
    const auto r = c.keys();
    return {t.data(), r.dims, r.strides};
  }
};

}  // namespace

TEST_CASE("KVCache<int8_t> quantises each (token, head) row once, within half a step per element", "[kv_cache][int8]") {
  const Index B = 2, G = 3, C = 9, D = 40, S = 5;
  KVCache<std::int8_t> cache(B, G, C, D);
  CHECK(cache.bytes() == 2u * B * G * C * (D + sizeof(float)));  // the scales count
  CHECK(cache.bytes_per_token() == 2u * G * (D + sizeof(float)));

  Tensor4<float> k(B, S, G, D), v(B, S, G, D);
  gqa_test::Rng rng(5);
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < S; ++s)
      for (Index g = 0; g < G; ++g) {
        const double magnitude = std::pow(10.0, double(s) - 2.0);  // 0.01 .. 100: the scale is per row
        for (Index d = 0; d < D; ++d) {
          k(b, s, g, d) = float(magnitude * rng.normal());
          v(b, s, g, d) = float(magnitude * rng.uniform(-1, 1));
        }
      }
  for (Index d = 0; d < D; ++d) k(1, 2, 1, d) = 0.0f;  // an all-zero row: scale 0, zeros
  std::vector<std::int32_t> counts{5, 3};
  cache.append(k, v, counts);

  Index bad_step = 0, bad_scale = 0, bad_range = 0, rows = 0;
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < counts[size_t(b)]; ++s)
      for (Index g = 0; g < G; ++g) {
        for (int kv = 0; kv < 2; ++kv) {
          const Tensor4<float>& x = kv == 0 ? k : v;
          const auto& q = kv == 0 ? cache.key_storage() : cache.value_storage();
          const float scale = kv == 0 ? cache.key_scales()(b, g, s) : cache.value_scales()(b, g, s);
          float max_abs = 0;
          for (Index d = 0; d < D; ++d) max_abs = std::max(max_abs, std::abs(x(b, s, g, d)));
          bad_scale += scale != max_abs / 127.0f;
          bool has_127 = max_abs == 0;
          for (Index d = 0; d < D; ++d) {
            const int qi = q(b, g, s, d);
            bad_range += qi < -127 || qi > 127;
            has_127 = has_127 || std::abs(qi) == 127;
            // Half a step, with room for the float rounding of the scale and of x / scale (a few ulp of |x|).
            const double err = std::abs(double(x(b, s, g, d)) - double(qi) * double(scale));
            bad_step += !(err <= 0.5 * double(scale) + 4e-7 * double(max_abs));
          }
          bad_range += !has_127;  // the largest |x| of a row maps to +-127
          ++rows;
        }
      }
  INFO(rows << " rows");
  CHECK(bad_step == 0);
  CHECK(bad_scale == 0);
  CHECK(bad_range == 0);
  CHECK(cache.key_scales()(1, 1, 2) == 0.0f);
  for (Index d = 0; d < D; ++d) CHECK(cache.key_storage()(1, 1, 2, d) == 0);
  CHECK(cache.bytes_in_use() == 8u * cache.bytes_per_token());
}

TEST_CASE("KVCache<int8_t> refuses non-finite values, naming the argument and row, and appends nothing",
          "[kv_cache][int8]") {
  KVCache<std::int8_t> cache(2, 2, 6, 8);
  Tensor4<float> k(2, 3, 2, 8), v(2, 3, 2, 8);
  gqa_test::fill_uniform(k, 7);
  gqa_test::fill_uniform(v, 8);
  cache.append(k, v);
  const auto key_before = cache.key_storage(), value_before = cache.value_storage();

  Tensor4<float> bad_k = k, bad_v = v;
  bad_k(1, 2, 0, 5) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(cache.append(bad_k, v), gqa::invalid_argument);
  CHECK_THROWS_WITH(cache.append(bad_k, v), Contains("[gqa.kv_cache_nonfinite]") && Contains("k_new[1, 2, 0, 5]") &&
                                                Contains("sequence 1, new token 2, KV head 0") && Contains("inf"));
  bad_v(0, 0, 1, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(cache.append(k, bad_v), Contains("v_new[0, 0, 1, 3]") && Contains("nan"));
  // A double beyond float range has no float scale either.
  Tensor4<double> huge(2, 1, 2, 8);
  huge.setZero();
  huge(0, 0, 0, 0) = 1e300;
  CHECK_THROWS_WITH(cache.append(huge, huge), Contains("k_new[0, 0, 0, 0]"));
  // Padding past counts[b] is never read, so it may hold anything.
  std::vector<std::int32_t> counts{3, 2};
  Tensor4<float> padded = k;
  padded(1, 2, 1, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK(cache.length(0) == 3);  // nothing was appended by the failed calls
  CHECK(cache.length(1) == 3);
  for (Index i = 0; i < cache.key_storage().size(); ++i) {
    CHECK(cache.key_storage().data()[i] == key_before.data()[i]);
    CHECK(cache.value_storage().data()[i] == value_before.data()[i]);
  }
  cache.append(padded, v, counts);
  CHECK(cache.length(1) == 5);
  // The other cache errors are the same as for every element type.
  CHECK_THROWS_WITH(cache.append(k, v), Contains("capacity 6"));
  CHECK_THROWS_WITH(KVCache<std::int8_t>(1, 0, 1, 1), Contains("kv_heads = 0"));
  Tensor4<float> wrong_d(2, 1, 2, 5);
  CHECK_THROWS_WITH(cache.append(wrong_d, wrong_d), Contains("dim 3 (head_dim D) = 5"));
}

namespace {

/// Whether append(k, v) throws gqa::invalid_argument whose message holds every fragment, leaving the cache's
/// storage and lengths as they were.
template <typename T, typename K>
void expect_refused(KVCache<T>& cache, const K& k, const K& v, const std::vector<std::string>& fragments) {
  const auto key_before = cache.key_storage(), value_before = cache.value_storage();
  const std::vector<std::int32_t> lengths_before(cache.lengths().begin(), cache.lengths().end());
  bool thrown = false;
  try {
    cache.append(k, v);
  } catch (const gqa::invalid_argument& e) {
    thrown = true;
    INFO("message: " << e.what());
    for (const auto& f : fragments) CHECK_THAT(std::string(e.what()), Contains(f));
  }
  CHECK(thrown);
  CHECK(std::vector<std::int32_t>(cache.lengths().begin(), cache.lengths().end()) == lengths_before);
  Index changed = 0;
  for (Index i = 0; i < cache.key_storage().size(); ++i)
    changed += std::memcmp(&cache.key_storage().data()[i], &key_before.data()[i], sizeof(T)) != 0 ||
               std::memcmp(&cache.value_storage().data()[i], &value_before.data()[i], sizeof(T)) != 0;
  CHECK(changed == 0);
}

}  // namespace

TEST_CASE("KVCache<half> refuses a value beyond 65504 and NaN/inf, naming the position, and appends nothing",
          "[kv_cache][range]") {
  KVCache<gqa::half> cache(2, 2, 6, 8);
  Tensor4<float> k(2, 2, 2, 8), v(2, 2, 2, 8);
  gqa_test::fill_uniform(k, 21);
  gqa_test::fill_uniform(v, 22);
  cache.append(k, v);
  SECTION("1e5 in a key: out of range (it was stored as inf, and attention gave NaN)") {
    Tensor4<float> bad = k;
    bad(1, 1, 0, 5) = 1e5f;
    expect_refused(cache, bad, v,
                   {"[gqa.kv_cache_range]", "KVCache<half>::append: k_new[1, 1, 0, 5]",
                    "sequence 1, new token 1, KV head 0, cache position 3", "100000", "65504", "nothing was appended"});
  }
  SECTION("the largest value that rounds to 65504 is stored; the first that rounds to inf is refused") {
    Tensor4<float> edge = v;
    edge(0, 0, 1, 2) = 65519.99f;
    cache.append(k, edge);
    CHECK(float(cache.value_storage()(0, 1, 2, 2)) == 65504.0f);
    edge(0, 0, 1, 2) = -65520.0f;
    expect_refused(cache, k, edge, {"[gqa.kv_cache_range]", "v_new[0, 0, 1, 2]", "-65520"});
  }
  SECTION("NaN and inf, as the int8 cache refuses them") {
    Tensor4<float> bad = v;
    bad(0, 1, 1, 7) = std::numeric_limits<float>::quiet_NaN();
    expect_refused(cache, k, bad, {"[gqa.kv_cache_nonfinite]", "v_new[0, 1, 1, 7]", "nan", "finite values only"});
    bad(0, 1, 1, 7) = -std::numeric_limits<float>::infinity();
    expect_refused(cache, bad, bad, {"[gqa.kv_cache_nonfinite]", "k_new[0, 1, 1, 7]", "-inf"});
  }
  SECTION("double and bfloat16 inputs are checked through the same conversion") {
    Tensor4<double> kd = k.cast<double>(), vd = v.cast<double>();
    vd(1, 0, 1, 0) = 70000.0;
    expect_refused(cache, kd, vd, {"[gqa.kv_cache_range]", "v_new[1, 0, 1, 0]", "70000"});
    Tensor4<gqa::bfloat16> kb = k.cast<gqa::bfloat16>(), vb = v.cast<gqa::bfloat16>();
    kb(0, 0, 0, 0) = gqa::bfloat16(1e30f);
    expect_refused(cache, kb, vb, {"[gqa.kv_cache_range]", "k_new[0, 0, 0, 0]"});
  }
  SECTION("padding past counts[b] is not appended, so it is not checked") {
    Tensor4<float> padded = k;
    padded(1, 1, 1, 1) = 1e9f;
    std::vector<std::int32_t> counts{2, 1};
    cache.append(padded, v, counts);
    CHECK(cache.length(1) == 3);
  }
}

TEST_CASE("KVCache<bfloat16> refuses NaN/inf and values that round to inf; KVCache<float> keeps NaN but refuses a "
          "double beyond float range", "[kv_cache][range]") {
  Tensor4<float> k(1, 1, 1, 4), v(1, 1, 1, 4);
  gqa_test::fill_uniform(k, 23);
  gqa_test::fill_uniform(v, 24);
  KVCache<gqa::bfloat16> bf(1, 1, 4, 4);
  Tensor4<float> bad = k;
  bad(0, 0, 0, 3) = std::numeric_limits<float>::max();  // rounds up to 2^128 in bfloat16
  expect_refused(bf, bad, v, {"[gqa.kv_cache_range]", "KVCache<bfloat16>::append: k_new[0, 0, 0, 3]"});
  bad(0, 0, 0, 3) = std::numeric_limits<float>::quiet_NaN();
  expect_refused(bf, bad, v, {"[gqa.kv_cache_nonfinite]", "k_new[0, 0, 0, 3]"});
  bad(0, 0, 0, 3) = 3e38f;  // below the rounding limit: stored as the largest bfloat16 ... or near it, finite
  bf.append(bad, v);
  CHECK(std::isfinite(float(bf.key_storage()(0, 0, 0, 3))));

  KVCache<float> f32(1, 1, 4, 4);
  Tensor4<double> huge = k.cast<double>();
  huge(0, 0, 0, 1) = 1e300;
  expect_refused(f32, huge, huge, {"[gqa.kv_cache_range]", "KVCache<float>::append: k_new[0, 0, 0, 1]", "1e+300"});
  bad(0, 0, 0, 3) = std::numeric_limits<float>::quiet_NaN();
  f32.append(bad, v);  // a float cache stores what a float tensor holds; attention propagates it by its rule
  CHECK(std::isnan(f32.key_storage()(0, 0, 0, 3)));
}

TEST_CASE("Attention on an int8 cache: the reference on its dequantised values (tight) and the f32 cache (loose)",
          "[kv_cache][int8]") {
  // (H, G): MHA, GQA with 2, 4, 8 and 9 heads per group, MQA; D = 64 takes the micro-kernels, D = 59 the GEMM
  // path; Sq = 1 and 2 are decode (1, 2, 4, 8, 16, 18, 32 and 64 rows per KV head: every way the scales are applied
  // to a tile), Sq = 37 a chunked prefill (the GEMM tiles, or 37 rows of micro-kernels for MHA).
  const auto hg = GENERATE(std::pair<Index, Index>{4, 4}, std::pair<Index, Index>{4, 2},
                           std::pair<Index, Index>{8, 2}, std::pair<Index, Index>{16, 2},
                           std::pair<Index, Index>{9, 1}, std::pair<Index, Index>{32, 1});
  const Index D = GENERATE(Index(64), Index(59));
  const Index Sq = GENERATE(Index(1), Index(2), Index(37));
  const int option = GENERATE(0, 1, 2, 3);  // causal; window + softcap; bias; no mask
  const Index B = 3, C = 400, H = hg.first, G = hg.second;
  // The chunked prefill at 16 and 32 query heads would be three quarters of this test's reference work (51 s of the
  // sanitizer stage) and takes no path that H = 9, G = 1 (333 rows per KV head: several GEMM tiles) does not.
  if (Sq == 37 && H >= 16) return;
  DYNAMIC_SECTION("H=" << H << " G=" << G << " D=" << D << " Sq=" << Sq << " option " << option) {
    Tensor4<float> k(B, 350, G, D), v(B, 350, G, D);
    gqa_test::fill_uniform(k, 11);
    gqa_test::fill_uniform(v, 12);
    std::vector<std::int32_t> counts{350, 300, 40};  // ragged; 300 > 256 keys: two decode tiles
    KVCache<std::int8_t> cache(B, G, C, D);
    KVCache<float> f32(B, G, C, D);
    cache.append(k, v, counts);
    f32.append(k, v, counts);
    // Roll back and re-append part of one sequence (speculative decoding): truncate keeps the scales in step.
    cache.truncate(0, 250);
    f32.truncate(0, 250);
    std::vector<std::int32_t> more{100, 0, 0};
    cache.append(k, v, more);
    f32.append(k, v, more);

    Tensor4<float> q(B, Sq, H, D), out(B, Sq, H, D), out_f32(B, Sq, H, D);
    gqa_test::fill_uniform(q, 13, -2.0, 2.0);
    std::vector<float> lse(size_t(B * H * Sq)), lse_f32(lse.size());
    Tensor4<float> bias(1, H, Sq, 350);
    gqa::AttentionOptions opt;
    opt.lse = lse;
    if (option == 0) opt.causal = true;
    if (option == 1) opt.window = 90, opt.softcap = 5.0;
    if (option == 2) {
      gqa_test::fill_uniform(bias, 14, -1.0, 1.0);
      for (Index h = 0; h < H; ++h) bias(0, h, 0, 5 + h) = -std::numeric_limits<float>::infinity();
      opt.bias = bias;
    }
    gqa::attention(q, cache, out, opt);

    const Dequantized deq(cache);
    gqa::AttentionOptions ref_opt = opt;
    ref_opt.lse = {};
    ref_opt.key_lengths = cache.lengths();
    // Decode with 1, 2, 4, 8 or 16 rows per KV head quantises the queries too (int8_scores.hpp): the reference
    // takes them as the kernels multiply them.
    const Tensor4<float> q_kernel = gqa_test::kernel_queries<std::int8_t>(q, G);
    const auto ref = gqa::reference_attention<float, float>(gqa::make_ref(q_kernel), deq.keys(cache),
                                                            deq.values(cache), ref_opt);
    // Same float kernel tolerance as the other caches: the int8 kernel multiplies q . k_int by the scale after the
    // dot product, the reference multiplies dequantised floats, so a few float roundings more than the f32 cache.
    gqa_test::check_close(out, ref, kFloatTol);
    if (gqa_test::int8_scores_apply(Sq, H / G, D)) {  // the quantised queries matter: the float ones are off
      const auto ref_float_q = gqa::reference_attention<float, float>(gqa::make_ref(q), deq.keys(cache),
                                                                      deq.values(cache), ref_opt);
      double max_diff = 0;
      for (Index i = 0; i < out.size(); ++i)
        max_diff = std::max(max_diff, std::abs(double(out.data()[i]) - ref_float_q.data()[i]));
      CHECK(max_diff > 1e-4);
    }

    // Against the unquantised keys and values: each stored value errs by up to max|x| / 254 of its row (uniform
    // [-1, 1) here, so <= 0.004); the output, a convex combination of V rows, errs by about that much from V, and
    // the scores by |q| |dk| / sqrt(D) <= ~0.03, a relative change of the weights of that size: 0.02 absolute.
    opt.lse = lse_f32;
    gqa::attention(q, f32, out_f32, opt);
    gqa_test::check_close(out, gqa_test::to_double(out_f32), {2e-2, 0});
    // The bound is not loose by orders of magnitude: the int8 cache does differ from the f32 one.
    double max_diff = 0;
    for (Index i = 0; i < out.size(); ++i)
      max_diff = std::max(max_diff, double(std::abs(out.data()[i] - out_f32.data()[i])));
    CHECK(max_diff > 1e-4);
    for (size_t i = 0; i < lse.size(); ++i) CHECK(std::abs(lse[i] - lse_f32[i]) <= 0.05f);
  }
}

TEST_CASE("int8 decode with split keys is bitwise identical for 1 and 2 threads", "[kv_cache][int8]") {
  const Index B = 1, G = 2, H = 16, D = 64, S = 4000;
  Tensor4<float> k(B, S, G, D), v(B, S, G, D), q(B, 1, H, D);
  gqa_test::fill_uniform(k, 31);
  gqa_test::fill_uniform(v, 32);
  gqa_test::fill_uniform(q, 33);
  KVCache<std::int8_t> cache(B, G, S, D);
  cache.append(k, v);
  gqa::AttentionOptions one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  const Tensor4<float> out = gqa::attention(q, cache, one);
  gqa_test::check_identical(out, gqa::attention(q, cache, two));
  // B * G = 2 items: the keys are split (flash-decoding) and merged; still the reference on the stored values (and
  // the queries as the kernels quantise them: 8 rows per KV head).
  const Dequantized deq(cache);
  gqa::AttentionOptions ref_opt;
  ref_opt.key_lengths = cache.lengths();
  const Tensor4<float> q_kernel = gqa_test::kernel_queries<std::int8_t>(q, G);
  gqa_test::check_close(out, gqa::reference_attention<float, float>(gqa::make_ref(q_kernel), deq.keys(cache),
                                                                    deq.values(cache), ref_opt), kFloatTol);
}

TEST_CASE("An int8 cache serves double and bfloat16 queries", "[kv_cache][int8]") {
  // Double queries take the double kernels (scalar widening of int8, double accumulation); bfloat16 queries the
  // float ones. Both against the double reference on the dequantised cache.
  const Index B = 2, G = 2, H = 6, D = 32, S = 300;
  Tensor4<float> k(B, S, G, D), v(B, S, G, D);
  gqa_test::fill_uniform(k, 41);
  gqa_test::fill_uniform(v, 42);
  KVCache<std::int8_t> cache(B, G, S, D);
  cache.append(k, v);
  const Dequantized deq(cache);
  gqa::AttentionOptions opt;
  opt.causal = true;
  gqa::AttentionOptions ref_opt = opt;
  ref_opt.key_lengths = cache.lengths();

  Tensor4<double> qd(B, 3, H, D);
  gqa_test::fill_uniform(qd, 43, -2.0, 2.0);
  const auto ref_d = gqa::reference_attention<double, float>(gqa::make_ref(qd), deq.keys(cache), deq.values(cache),
                                                             ref_opt);
  // Double arithmetic on the same stored values: only the float rounding of each dequantised value in the
  // reference separates them (relative 2^-24 of |V| <= 1).
  gqa_test::check_close(gqa::attention(qd, cache, opt), ref_d, {1e-6, 1e-6});

  Tensor4<gqa::bfloat16> qb(B, 3, H, D);
  gqa_test::fill_uniform(qb, 44, -2.0, 2.0);
  const auto ref_b = gqa::reference_attention<gqa::bfloat16, float>(gqa::make_ref(qb), deq.keys(cache),
                                                                    deq.values(cache), ref_opt);
  // The output is rounded to bfloat16 (8 bits): half an ulp of |out| <= 1 is 2^-9.
  gqa_test::check_close(gqa::attention(qb, cache, opt), ref_b, {2e-3, 4e-3});
}

// ------------------------------------------------------------------------------------ sinks and ALiBi on a cache

namespace {

/// Reference on what a cache stores: its own K/V, or for int8 the dequantised values (and the queries as its decode
/// kernels quantise them).
template <typename T>
Tensor4<double> reference_on(const Tensor4<float>& q, const KVCache<T>& cache, gqa::AttentionOptions opt) {
  opt.key_lengths = cache.lengths();
  if constexpr (std::is_same_v<T, std::int8_t>) {
    const Dequantized deq(cache);
    const Tensor4<float> q_kernel = gqa_test::kernel_queries<std::int8_t>(q, cache.kv_heads());
    return gqa::reference_attention<float, float>(gqa::make_ref(q_kernel), deq.keys(cache), deq.values(cache), opt);
  } else {
    return gqa::reference_attention<float, T>(gqa::make_ref(q), cache.keys(), cache.values(), opt);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("Sinks and ALiBi on every cache type: decode, split-K and chunked prefill match the reference",
                   "[kv_cache][sinks][alibi]", float, gqa::bfloat16, gqa::half, std::int8_t) {
  // (H, G) = (8, 2): B * G = 6 items, so Sq = 1 splits the 1400 keys; (16, 8) does not. D = 64: micro-kernels,
  // D = 59: the GEMM path. Sq = 1, 2 decode, Sq = 37 a chunked prefill. Lengths {1400, 700, 0}: the empty sequence
  // gives zeros and lse = the sink.
  const auto hg = GENERATE(std::pair<Index, Index>{8, 2}, std::pair<Index, Index>{16, 8});
  const Index D = GENERATE(Index(64), Index(59));
  const Index Sq = GENERATE(Index(1), Index(2), Index(37));
  const Index B = 3, C = 1500, H = hg.first, G = hg.second;
  DYNAMIC_SECTION("H=" << H << " G=" << G << " D=" << D << " Sq=" << Sq) {
    KVCache<TestType> cache(B, G, C, D);
    Tensor4<float> k(B, 1400, G, D), v(B, 1400, G, D);
    gqa_test::fill_uniform(k, 41);
    gqa_test::fill_uniform(v, 42);
    std::vector<std::int32_t> counts{1400, 700, 0};
    cache.append(k, v, counts);
    Tensor4<float> q(B, Sq, H, D), out(B, Sq, H, D);
    gqa_test::fill_uniform(q, 43, -2.0, 2.0);
    std::vector<float> sinks(static_cast<size_t>(H)), lse(static_cast<size_t>(B * H * Sq)), lse_ref(lse.size());
    for (Index h = 0; h < H; ++h) sinks[size_t(h)] = float(h % 5) - 1.5f;
    const auto slopes = gqa::alibi_slopes(H);
    gqa::AttentionOptions opt;
    opt.causal = true;
    opt.sinks = sinks;
    opt.alibi_slopes = slopes;
    gqa::AttentionOptions ref_opt = opt;
    ref_opt.lse = lse_ref;
    opt.lse = lse;
    gqa::attention(q, cache, out, opt);
    const auto ref = reference_on(q, cache, ref_opt);
    // Causal: the ALiBi bias of a visible key is <= 0 and the weights that matter sit near the query, whose logits
    // are O(1); far keys' logits are large and negative (~-0.25 * 1400 at most) with float rounding ~2e-5 each, on
    // weights below e^-30. kFloatTol holds.
    gqa_test::check_close(out, ref, kFloatTol);
    gqa_test::check_lse_close(lse, lse_ref, {1e-5, 1e-5});
    for (Index i = 0; i < Sq; ++i)
      for (Index h = 0; h < H; ++h) {
        CHECK(out(2, i, h, 0) == 0.0f);
        CHECK(lse[size_t((2 * H + h) * Sq + i)] == sinks[size_t(h)]);
      }
  }
}

TEMPLATE_TEST_CASE("Sinks of -inf and ALiBi slopes of 0 change no bit on every cache type (the no-op check)",
                   "[kv_cache][sinks][alibi]", float, gqa::bfloat16, gqa::half, std::int8_t) {
  // What a model run with sinks "off" must give: -inf sinks and 0 slopes are bitwise the plain call, in decode
  // (split and unsplit), in chunked prefill, with lse.
  const Index B = 2, G = 2, H = 8, D = 64, C = 1200;
  KVCache<TestType> cache(B, G, C, D);
  Tensor4<float> k(B, 1100, G, D), v(B, 1100, G, D);
  gqa_test::fill_uniform(k, 51);
  gqa_test::fill_uniform(v, 52);
  std::vector<std::int32_t> counts{1100, 333};
  cache.append(k, v, counts);
  const Index Sq = GENERATE(Index(1), Index(40));
  Tensor4<float> q(B, Sq, H, D);
  gqa_test::fill_uniform(q, 53, -2.0, 2.0);
  const std::vector<float> no_sinks(size_t(H), -std::numeric_limits<float>::infinity()), zero(size_t(H), 0.0f);
  std::vector<float> lse_plain(size_t(B * H * Sq)), lse_off(lse_plain.size());
  gqa::AttentionOptions plain, off;
  plain.causal = off.causal = true;
  plain.lse = lse_plain;
  off.lse = lse_off;
  off.sinks = no_sinks;
  off.alibi_slopes = zero;
  gqa_test::check_identical(gqa::attention(q, cache, off), gqa::attention(q, cache, plain));
  CHECK(std::memcmp(lse_off.data(), lse_plain.data(), lse_plain.size() * sizeof(float)) == 0);
}

TEST_CASE("Token-by-token decode with ALiBi and sinks equals one causal prefill with them", "[kv_cache][alibi]") {
  // ALiBi's p is the query's absolute position (bottom-right aligned): a token decoded alone at step t must see the
  // same biases as row t of the prefill. An off-by-one p would shift every logit of a decode row by the slope (the
  // weights survive, the lse does not), so the lse is compared too.
  const Index B = 2, S = 70, H = 8, G = 2, D = 32;
  Tensor4<float> q(B, S, H, D), k(B, S, G, D), v(B, S, G, D);
  gqa_test::fill_uniform(q, 61, -2.0, 2.0);
  gqa_test::fill_uniform(k, 62);
  gqa_test::fill_uniform(v, 63);
  const std::vector<float> sinks{0.5f, -1.f, 2.f, 0.f, 1.f, -0.5f, 3.f, 0.25f}, slopes = gqa::alibi_slopes(H);
  std::vector<float> lse_prefill(size_t(B * H * S)), lse_step(size_t(B * H));
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.sinks = sinks;
  opt.alibi_slopes = slopes;
  gqa::AttentionOptions with_lse = opt;
  with_lse.lse = lse_prefill;
  const Tensor4<float> prefill = gqa::attention(q, k, v, with_lse);
  KVCache<float> cache(B, G, S, D);
  with_lse.lse = lse_step;
  for (Index t = 0; t < S; ++t) {
    cache.append(slice_tokens(k, t, 1), slice_tokens(v, t, 1));
    const Tensor4<float> o = gqa::attention(slice_tokens(q, t, 1), cache, with_lse);
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        for (Index d = 0; d < D; ++d) CHECK(std::abs(o(b, 0, h, d) - prefill(b, t, h, d)) <= 1e-5f);
        CHECK(std::abs(lse_step[size_t(b * H + h)] - lse_prefill[size_t((b * H + h) * S + t)]) <= 1e-5f);
      }
  }
}
