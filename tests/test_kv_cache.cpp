// Tests for gqa/kv_cache.hpp: storage layout, ragged appends, errors, and decoding against the cache compared
// with the double reference and with one causal prefill over the whole sequence.
#include "gqa/kv_cache.hpp"
#include "gqa/reference.hpp"
#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
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
