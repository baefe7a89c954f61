// Tests for gqa/paged_kv_cache.hpp: block bookkeeping (append across blocks, fork with copy on write, truncate,
// release, bytes), errors that leave the cache unchanged, and attention on it: bitwise equal to a KVCache holding
// the same tokens where the key split is the same, the double reference where it is not, ragged batches with
// shared prefixes in one call, sinks and ALiBi, every element type, thread independence.
#include "gqa/kv_cache.hpp"
#include "gqa/paged_kv_cache.hpp"
#include "gqa/reference.hpp"
#include "support/compare.hpp"
#include "support/int8_queries.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using gqa::Index;
using gqa::KVCache;
using gqa::PagedKVCache;
using gqa::Tensor4;
using Catch::Matchers::Contains;

namespace {

// As in test_kv_cache.cpp: float kernels against the double reference on the same stored values.
constexpr gqa_test::Tolerance kFloatTol{2e-5, 2e-5};

/// Tokens [begin, begin + count) of row b of x [B, S, G, D], as [1, count, G, D].
Tensor4<float> tokens(const Tensor4<float>& x, Index b, Index begin, Index count) {
  Tensor4<float> out(1, count, x.dimension(2), x.dimension(3));
  for (Index s = 0; s < count; ++s)
    for (Index g = 0; g < x.dimension(2); ++g)
      for (Index d = 0; d < x.dimension(3); ++d) out(0, s, g, d) = x(b, begin + s, g, d);
  return out;
}

/// Row b of x [B, ...] as [1, ...].
Tensor4<float> row(const Tensor4<float>& x, Index b) { return tokens(x, b, 0, x.dimension(1)); }

/// Blocks that hold every sequence, plus one.
Index blocks_for(const std::vector<std::int32_t>& lengths, Index block) {
  Index n = 1;
  for (auto l : lengths) n += (l + block - 1) / block;
  return n;
}

/// Runs of consecutive block ids in a table: 1 for one run, table.size() when no two blocks follow each other.
Index runs(gqa::span<const std::int32_t> table) {
  Index n = 0;
  for (Index i = 0; i < table.size(); ++i) n += i == 0 || table[i] != table[i - 1] + 1;
  return n;
}

/// A paged cache and a contiguous one holding the same ragged tokens: sequence b the first lengths[b] tokens of
/// row b of k, v (appended in pieces of `piece`, so appends cross blocks).
template <typename T>
struct Twins {
  PagedKVCache<T> paged;
  KVCache<T> contiguous;
  std::vector<std::int32_t> ids;
  Index jumps = 0;  // over all tables, places where the next block does not follow in the pool

  Twins(const Tensor4<float>& k, const Tensor4<float>& v, const std::vector<std::int32_t>& lengths, Index block,
        Index piece = 37)
      : paged(k.dimension(2), k.dimension(3), block, blocks_for(lengths, block)),
        contiguous(Index(lengths.size()), k.dimension(2), k.dimension(1), k.dimension(3)) {
    for (size_t b = 0; b < lengths.size(); ++b) ids.push_back(paged.add_sequence());
    // Round robin, a piece at a time, in a pool with one block to spare: the sequences grow side by side until they
    // run into each other, so the tables hold runs of consecutive blocks and jumps between them (as a server's
    // decode steps leave them), and each piece ends inside a block.
    const Index longest = *std::max_element(lengths.begin(), lengths.end());
    for (Index s = 0; s < longest; s += piece)
      for (size_t b = 0; b < lengths.size(); ++b) {
        const Index n = std::min<Index>(piece, lengths[b] - s);
        if (n > 0) paged.append(ids[b], tokens(k, Index(b), s, n), tokens(v, Index(b), s, n));
      }
    contiguous.append(k, v, lengths);
    for (std::int32_t id : ids) jumps += runs(paged.block_table(id)) - 1;
  }
};

}  // namespace

TEST_CASE("PagedKVCache takes blocks as sequences grow and stores each token at its block row", "[paged]") {
  const Index G = 2, D = 8, size = 4;
  PagedKVCache<float> cache(G, D, size, 10);
  CHECK(cache.blocks_free() == 10);
  CHECK(cache.bytes_per_token() == 2 * G * D * 4);
  CHECK(cache.bytes_per_block() == size * 2 * G * D * 4);
  CHECK(cache.bytes() == 10 * cache.bytes_per_block());
  Tensor4<float> k(1, 10, G, D), v(1, 10, G, D);
  gqa_test::fill_uniform(k, 1);
  gqa_test::fill_uniform(v, 2);
  const std::int32_t a = cache.add_sequence(), b = cache.add_sequence();
  CHECK(a == 0);
  CHECK(b == 1);
  cache.append(a, tokens(k, 0, 0, 3), tokens(v, 0, 0, 3));
  cache.append(a, tokens(k, 0, 3, 7), tokens(v, 0, 3, 7));  // 10 tokens: 3 blocks, the last holding 2
  cache.append(b, tokens(k, 0, 0, 4), tokens(v, 0, 0, 4));  // exactly one block
  CHECK(cache.length(a) == 10);
  CHECK(cache.block_table(a).size() == 3);
  CHECK(cache.block_table(b).size() == 1);
  CHECK(cache.blocks_used() == 4);
  CHECK(cache.bytes_reserved() == 4 * cache.bytes_per_block());
  CHECK(cache.bytes_in_use() == 14 * cache.bytes_per_token());
  for (Index j = 0; j < 10; ++j)
    for (Index g = 0; g < G; ++g)
      for (Index d = 0; d < D; ++d) {
        const std::int32_t block = cache.block_table(a)[j / size];
        CHECK(cache.key_storage()(g, block, j % size, d) == k(0, j, g, d));
        CHECK(cache.value_storage()(g, block, j % size, d) == v(0, j, g, d));
      }
  cache.truncate(a, 5);  // keeps 2 blocks
  CHECK(cache.block_table(a).size() == 2);
  CHECK(cache.blocks_used() == 3);
  cache.release(b);
  CHECK_FALSE(cache.contains(b));
  CHECK(cache.blocks_used() == 2);
  CHECK(cache.sequences() == std::vector<std::int32_t>{a});
  CHECK(cache.add_sequence() == b);  // the freed id comes back
}

TEST_CASE("PagedKVCache keeps a growing sequence in consecutive blocks and spaces new ones apart", "[paged]") {
  const Index G = 1, D = 4, size = 4;
  PagedKVCache<float> cache(G, D, size, 16);
  Tensor4<float> k(1, 16, G, D);
  gqa_test::fill_uniform(k, 7);
  auto table = [&](std::int32_t id) {
    return std::vector<std::int32_t>(cache.block_table(id).begin(), cache.block_table(id).end());
  };
  const std::int32_t a = cache.add_sequence();
  cache.append(a, tokens(k, 0, 0, 10), tokens(k, 0, 0, 10));
  CHECK(table(a) == std::vector<std::int32_t>{0, 1, 2});  // a fresh pool: from block 0, in order
  // b starts in the middle of the free run after a's last block, leaving a room to grow: [3, 16) -> 3 + 13 / 2.
  const std::int32_t b = cache.add_sequence();
  cache.append(b, tokens(k, 0, 0, 1), tokens(k, 0, 0, 1));
  CHECK(table(b) == std::vector<std::int32_t>{9});
  cache.append(a, tokens(k, 0, 0, 3), tokens(k, 0, 0, 3));  // 13 tokens: a fourth block, right after a's third
  CHECK(table(a) == std::vector<std::int32_t>{0, 1, 2, 3});
  cache.append(b, tokens(k, 0, 0, 15), tokens(k, 0, 0, 15));
  CHECK(table(b) == std::vector<std::int32_t>{9, 10, 11, 12});
  // Free: [4, 9) and [13, 16); c takes the middle of the longest, which follows a's last block.
  const std::int32_t c = cache.add_sequence();
  cache.append(c, tokens(k, 0, 0, 5), tokens(k, 0, 0, 5));
  CHECK(table(c) == std::vector<std::int32_t>{6, 7});
  // c runs into b at block 9 and jumps to the longest free run, [13, 16), whose start follows b's last block.
  cache.append(c, tokens(k, 0, 0, 8), tokens(k, 0, 0, 8));
  CHECK(table(c) == std::vector<std::int32_t>{6, 7, 8, 14});
  // Released blocks merge back into runs: a's four and 4, 5 make [0, 6), where nothing ends before block 0.
  cache.release(a);
  const std::int32_t d = cache.add_sequence();
  cache.append(d, tokens(k, 0, 0, 16), tokens(k, 0, 0, 16));
  CHECK(table(d) == std::vector<std::int32_t>{0, 1, 2, 3});
}

TEST_CASE("FreeBlocks: take, give back and the longest run agree with a plain set of free ids", "[paged]") {
  const std::int32_t n = 200;
  gqa::detail::FreeBlocks free(n);
  std::vector<bool> model(size_t(n), true);
  std::mt19937_64 rng(11);
  for (int step = 0; step < 20000; ++step) {
    const auto block = std::int32_t(rng() % std::uint64_t(n));
    if (model[size_t(block)])
      free.take(block);
    else
      free.give_back(block);
    model[size_t(block)] = !model[size_t(block)];
    if (step % 97 != 0) continue;
    std::int32_t count = 0, best_start = -1, best_length = 0;
    for (std::int32_t i = 0; i < n;) {
      if (!model[size_t(i)]) {
        ++i;
        continue;
      }
      std::int32_t j = i;
      while (j < n && model[size_t(j)]) ++j;
      count += j - i;
      if (j - i > best_length) best_start = i, best_length = j - i;
      i = j;
    }
    REQUIRE(free.size() == count);
    for (std::int32_t i = 0; i < n; ++i) REQUIRE(free.contains(i) == model[size_t(i)]);
    if (count > 0) REQUIRE(free.longest() == std::pair<std::int32_t, std::int32_t>{best_start, best_length});
  }
}

TEST_CASE("PagedKVCache::fork shares the parent's blocks and copies a shared partial block on write", "[paged]") {
  const Index G = 2, D = 8, size = 4;
  PagedKVCache<gqa::half> cache(G, D, size, 8);
  Tensor4<float> k(1, 12, G, D), v(1, 12, G, D), k2(1, 12, G, D);
  gqa_test::fill_uniform(k, 3);
  gqa_test::fill_uniform(v, 4);
  gqa_test::fill_uniform(k2, 5);
  const std::int32_t parent = cache.add_sequence();
  cache.append(parent, tokens(k, 0, 0, 6), tokens(v, 0, 0, 6));  // one full block, one with 2 rows
  const std::int32_t child = cache.fork(parent);
  CHECK(cache.blocks_used() == 2);  // nothing taken
  CHECK(cache.length(child) == 6);
  CHECK(cache.bytes_in_use() == 6 * cache.bytes_per_token());  // the shared prefix counts once
  const std::vector<std::int32_t> before(cache.block_table(parent).begin(), cache.block_table(parent).end());

  cache.append(child, tokens(k2, 0, 0, 1), tokens(k2, 0, 0, 1));  // into the shared partial block: copied first
  CHECK(cache.blocks_used() == 3);
  CHECK(cache.block_table(child)[0] == before[0]);  // the full block stays shared
  CHECK(cache.block_table(child)[1] != before[1]);
  CHECK(std::vector<std::int32_t>(cache.block_table(parent).begin(), cache.block_table(parent).end()) == before);
  const auto& keys = cache.key_storage();
  for (Index g = 0; g < G; ++g)
    for (Index d = 0; d < D; ++d) {
      for (Index r = 0; r < 2; ++r)  // the copied rows
        CHECK(keys(g, cache.block_table(child)[1], r, d) == keys(g, before[1], r, d));
      CHECK(float(keys(g, cache.block_table(child)[1], 2, d)) == float(gqa::half(k2(0, 0, g, d))));
    }
  // The parent, now alone in its partial block, writes in place.
  cache.append(parent, tokens(k, 0, 6, 1), tokens(v, 0, 6, 1));
  CHECK(cache.block_table(parent)[1] == before[1]);
  CHECK(cache.blocks_used() == 3);
  for (Index g = 0; g < G; ++g)
    for (Index d = 0; d < D; ++d) CHECK(float(keys(g, before[1], 2, d)) == float(gqa::half(k(0, 6, g, d))));

  // Forked at a block boundary: the child's next token takes a new block and copies nothing.
  const std::int32_t twin = cache.fork(child);
  cache.truncate(twin, 4);
  cache.append(twin, tokens(k2, 0, 1, 1), tokens(k2, 0, 1, 1));
  CHECK(cache.block_table(twin)[0] == before[0]);
  CHECK(cache.blocks_used() == 4);

  // Both sharers of a partial block appending in one call: the first copies, the second then writes in place.
  const std::int32_t x = cache.fork(parent);
  const Index used = cache.blocks_used();
  const std::vector<std::int32_t> both{parent, x};
  Tensor4<float> one(2, 1, G, D);
  gqa_test::fill_uniform(one, 6);
  cache.append(both, one, one);
  CHECK(cache.blocks_used() == used + 1);
  cache.release(parent), cache.release(child), cache.release(twin), cache.release(x);
  CHECK(cache.blocks_used() == 0);
}

TEST_CASE("PagedKVCache errors name the argument and values, and leave the cache unchanged", "[paged]") {
  const Index G = 2, D = 8;
  PagedKVCache<gqa::half> cache(G, D, 4, 3);
  Tensor4<float> k(1, 20, G, D);
  gqa_test::fill_uniform(k, 7);
  const std::int32_t a = cache.add_sequence();
  cache.append(a, tokens(k, 0, 0, 5), tokens(k, 0, 0, 5));
  // 5 + 10 tokens need 4 blocks; 2 held, 1 free.
  const auto too_many = tokens(k, 0, 0, 10);
  CHECK_THROWS_AS(cache.append(a, too_many, too_many), gqa::invalid_argument);
  CHECK_THROWS_WITH(cache.append(a, too_many, too_many), Contains("paged_kv_cache_full") && Contains("needs 2 blocks") &&
                                                             Contains("1 of 3 are free"));
  CHECK(cache.length(a) == 5);
  CHECK(cache.blocks_free() == 1);

  Tensor4<float> bad = tokens(k, 0, 0, 2);
  bad(0, 1, 1, 3) = 1e5f;  // beyond half
  CHECK_THROWS_WITH(cache.append(a, bad, bad), Contains("kv_cache_range") && Contains("PagedKVCache<half>::append") &&
                                                   Contains("k_new[0, 1, 1, 3]") && Contains("cache position 6"));
  bad(0, 1, 1, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(cache.append(a, bad, bad), Contains("kv_cache_nonfinite"));
  CHECK(cache.length(a) == 5);

  Tensor4<float> wrong_g(1, 1, 3, D), wrong_d(1, 1, G, 7);
  CHECK_THROWS_AS(cache.append(a, wrong_g, wrong_g), gqa::shape_error);
  CHECK_THROWS_WITH(cache.append(a, wrong_g, wrong_g), Contains("dim 2 (kv_heads G) = 3") && Contains("has 2"));
  CHECK_THROWS_WITH(cache.append(a, wrong_d, wrong_d), Contains("dim 3 (head_dim D) = 7"));
  const std::vector<std::int32_t> twice{a, a};
  Tensor4<float> two(2, 1, G, D);
  two.setZero();
  CHECK_THROWS_WITH(cache.append(twice, two, two), Contains("sequence 0 appears twice"));
  CHECK_THROWS_WITH(cache.append(7, tokens(k, 0, 0, 1), tokens(k, 0, 0, 1)), Contains("sequence 7 is not a live sequence"));
  CHECK_THROWS_WITH(cache.truncate(a, 6), Contains("length 6 not in [0, current length 5]"));
  CHECK_THROWS_WITH(cache.fork(3), Contains("sequence 3 is not a live sequence"));
  CHECK_THROWS_AS(PagedKVCache<float>(G, D, 0, 3), gqa::shape_error);
  CHECK_THROWS_WITH(PagedKVCache<float>(G, D, 0, 3), Contains("block_size = 0 must be positive"));

  Tensor4<float> q(1, 1, 4, D), out(1, 1, 4, D), q2(2, 1, 4, D);
  q.setZero(), q2.setZero();
  const std::vector<std::int32_t> ids{a};
  gqa::AttentionOptions with_lengths;
  const std::vector<std::int32_t> lengths{5};
  with_lengths.key_lengths = lengths;
  CHECK_THROWS_WITH(gqa::attention(q, cache, ids, out, with_lengths), Contains("key_lengths must be empty"));
  CHECK_THROWS_WITH(gqa::attention(q2, cache, ids), Contains("q: dim 0 (batch B) = 2 but 1 sequences"));
  const std::vector<std::int32_t> dead{2};
  CHECK_THROWS_WITH(gqa::attention(q, cache, dead), Contains("sequence 2 is not a live sequence"));
}

TEMPLATE_TEST_CASE("Paged decode equals the contiguous cache bitwise where the key split is the same",
                   "[paged]", float, gqa::bfloat16, gqa::half, std::int8_t) {
  // Rows per KV head 1, 2, 4, 8, 16, 32 (H/G, Sq = 1): accumulate_pv's chunks of keys (2 per row, at least 8, or 32
  // for 16-bit and int8 V from 4 rows, at most 16 KiB of V: 64 keys at D = 64) end on every block boundary where the block is a multiple of the chunk,
  // so the products are the contiguous ones. Ragged lengths cross tiles (256 keys) and end inside blocks.
  const auto hg = GENERATE(std::pair<Index, Index>{4, 4}, std::pair<Index, Index>{8, 4},
                           std::pair<Index, Index>{16, 4}, std::pair<Index, Index>{16, 2},
                           std::pair<Index, Index>{16, 1}, std::pair<Index, Index>{32, 1});
  const Index block = GENERATE(Index(32), Index(64), Index(128));
  const Index H = hg.first, G = hg.second, D = 64, Sq = 1;
  if (H / G == 32 && block == 32) return;  // chunks of 64 keys
  DYNAMIC_SECTION("H=" << H << " G=" << G << " block " << block) {
    const std::vector<std::int32_t> lengths{1100, 333, 1};
    const Index B = Index(lengths.size());
    Tensor4<float> k(B, 1100, G, D), v(B, 1100, G, D), q(B, Sq, H, D);
    gqa_test::fill_uniform(k, 11);
    gqa_test::fill_uniform(v, 12);
    gqa_test::fill_uniform(q, 13, -2.0, 2.0);
    const Twins<TestType> twins(k, v, lengths, block);
    CHECK(twins.jumps > 0);  // the kernels meet block runs that end where the next block is elsewhere
    gqa::AttentionOptions opt;
    opt.causal = true;
    const Tensor4<float> paged = gqa::attention(q, twins.paged, twins.ids, opt);
    gqa_test::check_identical(paged, gqa::attention(q, twins.contiguous, opt));
    if constexpr (!std::is_same_v<TestType, std::int8_t>) {
      gqa::AttentionOptions ref_opt = opt;
      ref_opt.key_lengths = twins.contiguous.lengths();
      gqa_test::check_close(paged, gqa::reference_attention<float, TestType>(gqa::make_ref(q), twins.contiguous.keys(),
                                                                           twins.contiguous.values(), ref_opt),
                            kFloatTol);
    }
  }
}

TEMPLATE_TEST_CASE("Paged decode and chunked prefill with any block size match the reference, every option",
                   "[paged]", float, gqa::bfloat16, gqa::half) {
  // Block sizes that split tiles and chunks anywhere (1, 7, 16, 48, 300 > one tile); 3 and 9 rows per KV head;
  // D = 59 takes the GEMM path; Sq = 37 a chunked prefill, whose tiles are gathered from the blocks: bitwise the
  // contiguous result. Options: causal, window + softcap, sinks + ALiBi, a bias.
  const Index block = GENERATE(Index(1), Index(7), Index(16), Index(48), Index(300));
  const auto hg = GENERATE(std::pair<Index, Index>{6, 2}, std::pair<Index, Index>{9, 1});
  const Index D = GENERATE(Index(64), Index(59));
  const Index Sq = GENERATE(Index(1), Index(37));
  const int option = GENERATE(0, 1, 2, 3);
  const Index H = hg.first, G = hg.second;
  if (block == 1 && Sq == 37) return;  // 700 blocks per sequence: nothing the 7-row blocks do not cover
  DYNAMIC_SECTION("block " << block << " H=" << H << " G=" << G << " D=" << D << " Sq=" << Sq << " option " << option) {
    const std::vector<std::int32_t> lengths{700, 260, 37};
    const Index B = Index(lengths.size());
    Tensor4<float> k(B, 700, G, D), v(B, 700, G, D), q(B, Sq, H, D), bias(1, H, Sq, 700);
    gqa_test::fill_uniform(k, 21);
    gqa_test::fill_uniform(v, 22);
    gqa_test::fill_uniform(q, 23, -2.0, 2.0);
    gqa_test::fill_uniform(bias, 24, -1.0, 1.0);
    const Twins<TestType> twins(k, v, lengths, block);
    CHECK(twins.jumps > 0);  // the kernels meet block runs that end where the next block is elsewhere
    std::vector<float> sinks(static_cast<size_t>(H)), lse(static_cast<size_t>(B * H * Sq)), lse_ref(lse.size());
    for (Index h = 0; h < H; ++h) sinks[size_t(h)] = float(h % 3) - 1.0f;
    const auto slopes = gqa::alibi_slopes(H);
    gqa::AttentionOptions opt;
    opt.causal = option != 3;
    if (option == 1) opt.window = 90, opt.softcap = 5.0;
    if (option == 2) opt.sinks = sinks, opt.alibi_slopes = slopes;
    if (option == 3) opt.bias = bias;
    opt.lse = lse;
    const Tensor4<float> paged = gqa::attention(q, twins.paged, twins.ids, opt);
    gqa::AttentionOptions ref_opt = opt;
    ref_opt.lse = lse_ref;
    ref_opt.key_lengths = twins.contiguous.lengths();
    const Tensor4<float> q_kernel = gqa_test::kernel_queries<TestType>(q, G);  // int8: as the kernels quantise it
    gqa_test::check_close(paged, gqa::reference_attention<float, TestType>(gqa::make_ref(q_kernel),
                                                                         twins.contiguous.keys(),
                                                                         twins.contiguous.values(), ref_opt),
                          kFloatTol);
    gqa_test::check_lse_close(lse, lse_ref, {1e-5, 1e-5});
    if (Sq == 37) gqa_test::check_identical(paged, gqa::attention(q, twins.contiguous, opt));
  }
}

TEST_CASE("Batched decode of forked sequences in one call equals each decoded alone", "[paged]") {
  // A served batch: one prompt of 700 tokens, three forks that each go on with tokens of their own, and an
  // unrelated long sequence; one call decodes all five. Each row is that sequence alone in a contiguous cache
  // (whose split plan differs: to float rounding) and the reference.
  const Index H = 8, G = 2, D = 64, block = 32;
  PagedKVCache<gqa::bfloat16> cache(G, D, block, 400);
  Tensor4<float> prompt(1, 700, G, D), own(4, 3000, G, D), q(5, 1, H, D);
  gqa_test::fill_uniform(prompt, 31);
  gqa_test::fill_uniform(own, 32);
  gqa_test::fill_uniform(q, 33, -2.0, 2.0);
  const std::int32_t root = cache.add_sequence();
  cache.append(root, prompt, prompt);
  std::vector<std::int32_t> ids{root, cache.fork(root), cache.fork(root), cache.fork(root), cache.add_sequence()};
  const std::vector<Index> extra{0, 1, 90, 333, 3000};
  for (size_t i = 1; i < ids.size(); ++i) {
    const auto mine = tokens(own, Index(i) - 1, 0, extra[i]);
    cache.append(ids[i], mine, mine);
  }
  // The prompt's 21 full blocks are stored once; each fork copied the 28 rows of its partial last block.
  CHECK(cache.bytes_in_use() == size_t(700 + 3 * 28 + 1 + 90 + 333 + 3000) * cache.bytes_per_token());
  CHECK(cache.bytes_reserved() <= cache.bytes_in_use() + 5 * cache.bytes_per_block());
  // The prompt was appended at once: its blocks follow each other in the pool (runs of consecutive blocks).
  for (size_t i = 1; i < 21; ++i) CHECK(cache.block_table(root)[i] == cache.block_table(root)[i - 1] + 1);

  gqa::AttentionOptions one, two;
  one.num_threads = 1, two.num_threads = 2;
  const Tensor4<float> out = gqa::attention(q, cache, ids, one);
  gqa_test::check_identical(out, gqa::attention(q, cache, ids, two));
  for (size_t i = 0; i < ids.size(); ++i) {
    const Index len = cache.length(ids[i]);
    KVCache<gqa::bfloat16> alone(1, G, len, D);
    if (i < 4) alone.append(prompt, prompt);
    if (extra[i] > 0) alone.append(tokens(own, Index(i) - 1, 0, extra[i]), tokens(own, Index(i) - 1, 0, extra[i]));
    const Tensor4<float> qi = row(q, Index(i)), ref_out = gqa::attention(qi, alone);
    Tensor4<float> got = row(out, Index(i));
    gqa_test::check_close(got, gqa_test::to_double(ref_out), {1e-6, 1e-5});
    gqa::AttentionOptions ref_opt;
    ref_opt.key_lengths = alone.lengths();
    gqa_test::check_close(got, gqa::reference_attention<float, gqa::bfloat16>(gqa::make_ref(qi), alone.keys(),
                                                                            alone.values(), ref_opt),
                          kFloatTol);
  }
}

TEST_CASE("A long sequence among short ones is split over key ranges, bitwise the same for any thread count",
          "[paged]") {
  // B * G = 16 items would not split; the 8000-key sequence holds most keys and is split so both threads work.
  const Index H = 4, G = 1, D = 64;
  std::vector<std::int32_t> lengths(16, 100);
  lengths[3] = 8000;
  Tensor4<float> k(16, 8000, G, D), q(16, 1, H, D);
  gqa_test::fill_uniform(k, 41);
  gqa_test::fill_uniform(q, 42, -2.0, 2.0);
  const Twins<float> twins(k, k, lengths, 64, 1000);
  gqa::AttentionOptions opt;
  const std::vector<std::int32_t> key_lengths = lengths;
  opt.key_lengths = key_lengths;
  Tensor4<float> out_q(16, 1, H, D);
  const auto p = gqa::detail::make_params<float, float>(gqa::make_ref(q), gqa::make_ref(k), gqa::make_ref(k),
                                                        gqa::make_ref(out_q), opt);
  const auto plan = gqa::detail::plan_tiles(p);
  CHECK(plan.seq_splits[3] > 1);
  CHECK(plan.seq_splits[0] == 1);
  gqa::AttentionOptions one, two;
  one.num_threads = 1, two.num_threads = 2;
  const Tensor4<float> out = gqa::attention(q, twins.paged, twins.ids, one);
  gqa_test::check_identical(out, gqa::attention(q, twins.paged, twins.ids, two));
  gqa_test::check_identical(out, gqa::attention(q, twins.contiguous, one));
  gqa::AttentionOptions ref_opt;
  ref_opt.key_lengths = twins.contiguous.lengths();
  gqa_test::check_close(out, gqa::reference_attention<float, float>(gqa::make_ref(q), twins.contiguous.keys(),
                                                                    twins.contiguous.values(), ref_opt),
                        kFloatTol);
}
