// Tests of gqa/distributed.hpp, run by ctest under mpirun with P = 1, 2, 3, 4 ranks (tests/cmake/distributed.cmake;
// main: tests/support/mpi_main.cpp). Every rank builds the same inputs from the same seeds, does its share through
// the distributed calls, and compares with single-process gqa::attention over the whole problem. Which head-split
// case a shape exercises (P < G, P = G, P > G, P not valid) depends on the world's P; the shapes below cover each
// case for every P in {1, 2, 3, 4} together (see head_split_shapes).
//
// Tolerance: the merge of partial attentions by their log-sum-exp reorders the softmax sums and goes through the
// float lse, so results match the single-process call within float rounding, not bitwise: |out - ref| <= 1e-6 +
// 1e-5 |ref| (the 1e-5 relative; the 1e-6 floor covers outputs that cancel to near zero).
#include "gqa/attention_backward.hpp"
#include "gqa/distributed.hpp"

#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using gqa::Index;
using gqa::Tensor4;

const gqa_test::Tolerance kMerged{1e-6, 1e-5};

int world_size() {
  int p = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

Tensor4<float> normal(Index a, Index b, Index c, Index d, std::uint64_t seed) {
  Tensor4<float> t(a, b, c, d);
  gqa_test::fill_normal(t, seed);
  return t;
}

/// Every rank's `mine` (the same size on each), concatenated in rank order.
std::vector<float> gather_all(const float* mine, std::size_t n) {
  std::vector<float> all(n * std::size_t(world_size()));
  MPI_Allgather(mine, int(n), MPI_FLOAT, all.data(), int(n), MPI_FLOAT, MPI_COMM_WORLD);
  return all;
}

/// Whether `x` is bitwise the same on every rank (compared with rank 0's).
bool same_on_every_rank(const float* x, std::size_t n) {
  std::vector<float> first(x, x + n);
  MPI_Bcast(first.data(), int(n), MPI_FLOAT, 0, MPI_COMM_WORLD);
  const int mine = std::memcmp(first.data(), x, n * sizeof(float)) == 0, all = 0;
  int every = all;
  MPI_Allreduce(&mine, &every, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return every == 1;
}

template <typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(nothing thrown)";
}

// ------------------------------------------------------------------------------------------------ head sharding

TEST_CASE("head_shard: the head-split rule for P <= G, P > G, and refused P", "[distributed][head_shard]") {
  // P <= G: G/P KV heads and their H/P query heads per rank, disjoint.
  const gqa::HeadShard a = gqa::head_shard(32, 8, 4, 3);
  CHECK(a.first_head == 24);
  CHECK(a.num_heads == 8);
  CHECK(a.first_kv_head == 6);
  CHECK(a.num_kv_heads == 2);
  CHECK(a.kv_replicas == 1);
  // P > G: each KV head on P/G ranks; rank 5 of 8 (H = 32, G = 2) holds query heads 20..23, of KV head 1.
  const gqa::HeadShard b = gqa::head_shard(32, 2, 8, 5);
  CHECK(b.first_head == 20);
  CHECK(b.num_heads == 4);
  CHECK(b.first_kv_head == 1);
  CHECK(b.num_kv_heads == 1);
  CHECK(b.kv_replicas == 4);

  // Every (H, G, P) of a small sweep: each query head on exactly one rank, with its own KV head among the rank's,
  // and each KV head on exactly 1 (P <= G) or P/G (P > G) ranks.
  for (Index G : {1, 2, 3, 4, 6})
    for (Index H : {G, 2 * G, 3 * G, 4 * G})
      for (int P : gqa::valid_head_shard_ranks(H, G)) {
        INFO("H " << H << " G " << G << " P " << P);
        std::vector<int> query_owner(std::size_t(H), 0), kv_holders(std::size_t(G), 0);
        for (int r = 0; r < P; ++r) {
          const gqa::HeadShard s = gqa::head_shard(H, G, P, r);
          for (Index j = s.first_head; j < s.first_head + s.num_heads; ++j) {
            ++query_owner[std::size_t(j)];
            const Index kv = j / (H / G);
            CHECK((kv >= s.first_kv_head && kv < s.first_kv_head + s.num_kv_heads));
          }
          for (Index g = s.first_kv_head; g < s.first_kv_head + s.num_kv_heads; ++g) ++kv_holders[std::size_t(g)];
        }
        for (int n : query_owner) CHECK(n == 1);
        for (int n : kv_holders) CHECK(n == (P <= G ? 1 : P / int(G)));
      }

  // Any other P: invalid_argument naming H, G, P and listing the valid P.
  const std::string m = message_of([] { gqa::head_shard(8, 2, 3, 0); });
  CHECK(m == "[gqa.distributed.ranks] head_shard: P = 3 ranks cannot split H = 8 query heads and G = 2 KV heads "
             "(P must divide H, and P divide G or G divide P); valid P: 1, 2, 4, 8");
  CHECK_THROWS_AS(gqa::head_shard(12, 4, 3, 0), gqa::invalid_argument);  // 3 divides H but neither divides the other
  CHECK_THROWS_AS(gqa::head_shard(8, 2, 16, 0), gqa::invalid_argument);  // P > H
  CHECK_THROWS_AS(gqa::head_shard(8, 2, 2, 2), gqa::invalid_argument);   // rank out of range
  CHECK_THROWS_AS(gqa::head_shard(8, 3, 1, 0), gqa::shape_error);        // G does not divide H
}

/// (H, G) pairs that give, over the world sizes 1..4, every case: P < G, P = G, P > G and P not valid.
struct HeadSplitShape {
  Index H, G;
};
const HeadSplitShape head_split_shapes[] = {{12, 4}, {6, 3}, {8, 2}, {12, 1}};

TEST_CASE("head sharding: the shards' attention and KV caches, concatenated, equal one process's",
          "[distributed][head_shard]") {
  const int P = world_size();
  const Index B = 2, S = 9, D = 16;
  for (const HeadSplitShape& hs : head_split_shapes) {
    const Index H = hs.H, G = hs.G;
    INFO("H " << H << " G " << G << " P " << P);
    const auto valid = gqa::valid_head_shard_ranks(H, G);
    if (std::find(valid.begin(), valid.end(), P) == valid.end()) {
      const std::string m = message_of([&] { gqa::head_shard(H, G, MPI_COMM_WORLD); });
      CHECK(m.find("[gqa.distributed.ranks]") == 0);
      CHECK(m.find("H = " + std::to_string(H)) != std::string::npos);
      CHECK(m.find("G = " + std::to_string(G)) != std::string::npos);
      CHECK(m.find("P = " + std::to_string(P)) != std::string::npos);
      CHECK(m.find("valid P: 1, ") != std::string::npos);
      continue;
    }
    const gqa::HeadShard shard = gqa::head_shard(H, G, MPI_COMM_WORLD);
    const Tensor4<float> q = normal(B, S, H, D, 1), k = normal(B, S, G, D, 2), v = normal(B, S, G, D, 3);
    gqa::AttentionOptions opt;
    opt.causal = true;
    const Tensor4<float> whole = gqa::attention(q, k, v, opt);

    // Prefill on the shard: the single-process call on its heads.
    Tensor4<float> mine(B, S, shard.num_heads, D);
    gqa::attention(shard.queries(q), shard.kv(k), shard.kv(v), mine, opt);
    // Decode one more token against a KVCache of the shard's KV heads only.
    const Tensor4<float> q1 = normal(B, 1, H, D, 4), k1 = normal(B, 1, G, D, 5), v1 = normal(B, 1, G, D, 6);
    gqa::KVCache<float> cache(B, shard.num_kv_heads, S + 1, D), whole_cache(B, G, S + 1, D);
    cache.append(shard.kv(k), shard.kv(v));
    cache.append(shard.kv(k1), shard.kv(v1));
    whole_cache.append(k, v);
    whole_cache.append(k1, v1);
    CHECK(cache.bytes() * std::size_t(P) == whole_cache.bytes() * std::size_t(shard.kv_replicas));
    Tensor4<float> mine1(B, 1, shard.num_heads, D);
    gqa::attention(shard.queries(q1), cache, mine1);
    const Tensor4<float> whole1 = gqa::attention(q1, whole_cache);

    // Rank r's heads are [r * H/P, (r + 1) * H/P): gathering in rank order and interleaving by token rebuilds
    // [B, S, H, D].
    for (const auto& pair : {std::make_pair(&mine, &whole), std::make_pair(&mine1, &whole1)}) {
      const Tensor4<float>& part = *pair.first;
      const Index s_len = part.dimension(1), hp = shard.num_heads;
      const std::vector<float> all = gather_all(part.data(), std::size_t(part.size()));
      Tensor4<float> joined(B, s_len, H, D);
      for (int r = 0; r < P; ++r)
        for (Index b = 0; b < B; ++b)
          for (Index s = 0; s < s_len; ++s)
            for (Index h = 0; h < hp; ++h)
              for (Index d = 0; d < D; ++d)
                joined(b, s, r * hp + h, d) = all[std::size_t(r * part.size() + ((b * s_len + s) * hp + h) * D + d)];
      // The kernels see the same rows of each group (P <= G) or a group's rows split (P > G): within rounding.
      gqa_test::check_close(joined, gqa_test::to_double(*pair.second), kMerged);
      if (P <= G) gqa_test::check_identical(joined, *pair.second);  // the same tiles: bitwise
    }
  }
}

// ----------------------------------------------------------------------------------- sequence-sharded decode

/// Checks a sequence-sharded decode of `steps` tokens after a prompt of `prompt` tokens against a single-process
/// KVCache holding everything.
void check_sharded_decode(Index prompt, Index steps) {
  const int P = world_size();
  const Index B = 2, H = 8, G = 2, D = 16, capacity = prompt + steps;
  INFO("prompt " << prompt << " steps " << steps << " P " << P);
  gqa::SequenceShardedCache<float> cache(MPI_COMM_WORLD, B, G, capacity, D);
  gqa::KVCache<float> whole(B, G, capacity, D);
  const Tensor4<float> k0 = normal(B, prompt, G, D, 10), v0 = normal(B, prompt, G, D, 11);
  cache.append(k0, v0);
  whole.append(k0, v0);
  for (Index t = 0; t < steps; ++t) {
    const Tensor4<float> q = normal(B, 1, H, D, 100 + t), k = normal(B, 1, G, D, 200 + t),
                         v = normal(B, 1, G, D, 300 + t);
    cache.append(k, v);
    whole.append(k, v);
    CHECK(cache.length(0) == prompt + t + 1);
    gqa::AttentionOptions opt;
    opt.causal = true;  // Sq = 1: masks nothing
    std::vector<float> lse(std::size_t(B * H)), whole_lse(lse.size());
    opt.lse = lse;
    Tensor4<float> out(B, 1, H, D);
    gqa::DistributedStats stats;
    gqa::sequence_sharded_attention(q, cache, out, opt, &stats);
    opt.lse = whole_lse;
    const Tensor4<float> ref = [&] {
      Tensor4<float> r(B, 1, H, D);
      gqa::attention(q, whole, r, opt);
      return r;
    }();
    gqa_test::check_close(out, gqa_test::to_double(ref), kMerged);
    gqa_test::check_lse_close(lse, whole_lse, kMerged);
    CHECK(same_on_every_rank(out.data(), std::size_t(out.size())));
    // Bytes handed to MPI: this rank's partial, out [B, 1, H, D] and lse [B, H, 1] in float.
    CHECK(stats.bytes_sent == std::uint64_t(B * H * (D + 1) * 4));

    // Bitwise the same whatever the thread count (the local attention's guarantee, and a fixed merge order).
    Tensor4<float> out1(B, 1, H, D), out2(B, 1, H, D);
    gqa::AttentionOptions one, two;
    one.num_threads = 1;
    two.num_threads = 2;
    gqa::sequence_sharded_attention(q, cache, out1, one);
    gqa::sequence_sharded_attention(q, cache, out2, two);
    gqa_test::check_identical(out1, out2);
    gqa_test::check_identical(out1, out);
  }
  // Round robin: rank r holds the positions p with p % P == r.
  const int rank = world_rank();
  CHECK(cache.local().length(0) == (capacity + P - 1 - rank) / P);
}

TEST_CASE("sequence-sharded decode equals one process's KVCache decode", "[distributed][decode]") {
  check_sharded_decode(7, 4);
  // One token in all: with P > 1 every other rank holds no key (lse -inf) and must merge as nothing.
  check_sharded_decode(0, 1);
}

TEST_CASE("merge_partial: an empty side (lse -inf) is the other side exactly; two empty sides stay empty",
          "[distributed][decode]") {
  const gqa::detail::PartialShape s{1, 1, 2, 3};
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> acc{0, 0, 0, 0, 0, 0}, acc_lse{-inf, -inf};
  const std::vector<float> part{0.25f, -1.5f, 3.0f, 0, 0, 0}, part_lse{0.75f, -inf};
  gqa::detail::merge_partial(s, acc.data(), acc_lse.data(), part.data(), part_lse.data(), 1);
  CHECK(acc == std::vector<float>{0.25f, -1.5f, 3.0f, 0, 0, 0});
  CHECK(acc_lse[0] == 0.75f);
  CHECK(acc_lse[1] == -inf);
  // Two equal halves: the same output, lse + log 2.
  gqa::detail::merge_partial(s, acc.data(), acc_lse.data(), part.data(), part_lse.data(), 1);
  CHECK(acc[0] == Approx(0.25f));
  CHECK(acc_lse[0] == Approx(0.75 + std::log(2.0)));
}

TEST_CASE("sequence_sharded_attention: refused options throw on every rank", "[distributed][decode]") {
  gqa::SequenceShardedCache<float> cache(MPI_COMM_WORLD, 1, 1, 4, 8);
  cache.append(normal(1, 2, 1, 8, 1), normal(1, 2, 1, 8, 2));
  const Tensor4<float> q = normal(1, 2, 2, 8, 3);
  Tensor4<float> out(1, 2, 2, 8);
  gqa::AttentionOptions opt;
  opt.causal = true;  // Sq = 2 > 1
  const std::string m = message_of([&] { gqa::sequence_sharded_attention(q, cache, out, opt); });
  CHECK(m.find("[gqa.distributed.option] sequence_sharded_attention: options.causal with Sq = 2") == 0);
  opt.causal = false;
  opt.window = 2;
  CHECK_THROWS_WITH(gqa::sequence_sharded_attention(q, cache, out, opt),
                    Catch::StartsWith("[gqa.distributed.option] sequence_sharded_attention: options.window = 2"));
  // Without the refused option the same call works (and the checks above did not leave a collective pending).
  opt.window = 0;
  CHECK_NOTHROW(gqa::sequence_sharded_attention(q, cache, out, opt));
}

// ----------------------------------------------------------------------------------------------- ring prefill

/// Rows [layout's local rows] of a token-major tensor [B, S, heads, D].
Tensor4<float> local_rows(const Tensor4<float>& x, const gqa::RingLayout& l) {
  Tensor4<float> out(x.dimension(0), l.local_length(), x.dimension(2), x.dimension(3));
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index i = 0; i < l.local_length(); ++i)
      for (Index h = 0; h < x.dimension(2); ++h)
        for (Index d = 0; d < x.dimension(3); ++d) out(b, i, h, d) = x(b, l.position(i), h, d);
  return out;
}

/// The lse rows [B, H, S] of the layout's local rows, as [B, H, L].
std::vector<float> local_lse(const std::vector<float>& lse, Index B, Index H, Index S, const gqa::RingLayout& l) {
  std::vector<float> out;
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < l.local_length(); ++i) out.push_back(lse[std::size_t((b * H + h) * S + l.position(i))]);
  return out;
}

void check_ring(Index B, Index S, Index H, Index G, bool causal) {
  const int P = world_size(), rank = world_rank();
  const Index D = 16;
  INFO("B " << B << " S " << S << " H " << H << " G " << G << " causal " << causal << " P " << P);
  const Tensor4<float> q = normal(B, S, H, D, 21), k = normal(B, S, G, D, 22), v = normal(B, S, G, D, 23);
  gqa::AttentionOptions opt;
  opt.causal = causal;
  std::vector<float> whole_lse(std::size_t(B * H * S));
  opt.lse = whole_lse;
  Tensor4<float> whole(B, S, H, D);
  gqa::attention(q, k, v, whole, opt);

  const gqa::RingLayout layout = gqa::ring_layout(S, P, rank);
  const Index L = layout.local_length();
  const Tensor4<float> lq = local_rows(q, layout), lk = local_rows(k, layout), lv = local_rows(v, layout);
  Tensor4<float> out(B, L, H, D);
  std::vector<float> lse(std::size_t(B * H * L));
  opt.lse = lse;
  gqa::DistributedStats stats;
  gqa::ring_attention(lq, lk, lv, out, MPI_COMM_WORLD, opt, &stats);
  gqa_test::check_close(out, gqa_test::to_double(local_rows(whole, layout)), kMerged);
  gqa_test::check_lse_close(lse, local_lse(whole_lse, B, H, S, layout), kMerged);

  // Bytes on the wire: the K/V blocks of the P-1 ranks before this one, G heads each (never H).
  std::uint64_t expected = 0;
  for (int step = 0; step + 1 < P; ++step)
    expected += std::uint64_t(2 * B * gqa::ring_layout(S, P, (rank - step + P) % P).local_length() * G * D * 4);
  CHECK(stats.bytes_sent == expected);
  CHECK(stats.messages == std::uint64_t(P - 1));
  if (S % (2 * P) == 0)  // equal chunks: the formula (P-1)/P * 2 * S * G * D * sizeof(float) per rank and layer
    CHECK(stats.bytes_sent * std::uint64_t(P) == std::uint64_t((P - 1) * 2 * B * S * G * D * 4));

  // Bitwise the same whatever the thread count.
  gqa::AttentionOptions one = opt, two = opt;
  one.lse = {}, two.lse = {};
  one.num_threads = 1;
  two.num_threads = 2;
  Tensor4<float> out1(B, L, H, D), out2(B, L, H, D);
  gqa::ring_attention(lq, lk, lv, out1, MPI_COMM_WORLD, one);
  gqa::ring_attention(lq, lk, lv, out2, MPI_COMM_WORLD, two);
  gqa_test::check_identical(out1, out2);
  gqa_test::check_identical(out1, out);
}

TEST_CASE("ring prefill equals one process's attention (causal and not)", "[distributed][ring]") {
  check_ring(1, 48, 8, 2, true);   // S divisible by 2P for P = 1..4: equal chunks
  check_ring(2, 37, 6, 3, true);   // uneven chunks, a batch
  check_ring(1, 29, 4, 4, false);  // MHA, no mask: every block seen whole
  check_ring(1, 3, 4, 1, true);    // S < 2P: empty chunks for P >= 2
}

TEST_CASE("ring prefill with bfloat16 K/V: the blocks travel as bfloat16, half the bytes of f32",
          "[distributed][ring]") {
  const int P = world_size(), rank = world_rank();
  const Index B = 1, S = 32, H = 8, G = 2, D = 16;
  const Tensor4<float> q = normal(B, S, H, D, 41);
  const Tensor4<gqa::bfloat16> k = normal(B, S, G, D, 42).cast<gqa::bfloat16>(),
                               v = normal(B, S, G, D, 43).cast<gqa::bfloat16>();
  gqa::AttentionOptions opt;
  opt.causal = true;
  const Tensor4<float> whole = gqa::attention(q, k, v, opt);

  const gqa::RingLayout layout = gqa::ring_layout(S, P, rank);
  const Index L = layout.local_length();
  Tensor4<gqa::bfloat16> lk(B, L, G, D), lv(B, L, G, D);
  for (Index i = 0; i < L; ++i)
    for (Index g = 0; g < G; ++g)
      for (Index d = 0; d < D; ++d) {
        lk(0, i, g, d) = k(0, layout.position(i), g, d);
        lv(0, i, g, d) = v(0, layout.position(i), g, d);
      }
  Tensor4<float> out(B, L, H, D);
  gqa::DistributedStats stats;
  gqa::ring_attention(local_rows(q, layout), lk, lv, out, MPI_COMM_WORLD, opt, &stats);
  gqa_test::check_close(out, gqa_test::to_double(local_rows(whole, layout)), kMerged);
  std::uint64_t expected = 0;
  for (int step = 0; step + 1 < P; ++step)
    expected += std::uint64_t(2 * B * gqa::ring_layout(S, P, (rank - step + P) % P).local_length() * G * D * 2);
  CHECK(stats.bytes_sent == expected);
}

void check_ring_backward(Index B, Index S, Index H, Index G, bool causal) {
  const int P = world_size(), rank = world_rank();
  const Index D = 16;
  INFO("backward B " << B << " S " << S << " H " << H << " G " << G << " causal " << causal << " P " << P);
  const Tensor4<float> q = normal(B, S, H, D, 31), k = normal(B, S, G, D, 32), v = normal(B, S, G, D, 33),
                       d_out = normal(B, S, H, D, 34);
  gqa::AttentionOptions opt;
  opt.causal = causal;
  const Tensor4<float> whole = gqa::attention(q, k, v, opt);
  const auto grads = gqa::attention_backward(q, k, v, whole, d_out, opt);

  const gqa::RingLayout layout = gqa::ring_layout(S, P, rank);
  const Index L = layout.local_length();
  const Tensor4<float> lq = local_rows(q, layout), lk = local_rows(k, layout), lv = local_rows(v, layout),
                       ld_out = local_rows(d_out, layout);
  Tensor4<float> out(B, L, H, D), d_q(B, L, H, D), d_k(B, L, G, D), d_v(B, L, G, D);
  std::vector<float> lse(std::size_t(B * H * L));
  opt.lse = lse;
  gqa::ring_attention(lq, lk, lv, out, MPI_COMM_WORLD, opt);
  gqa::DistributedStats stats;
  gqa::ring_attention_backward(lq, lk, lv, out, ld_out, d_q, d_k, d_v, MPI_COMM_WORLD, opt, &stats);
  // Each gradient is a sum over the blocks (over the ranks, for d_k and d_v) in another order than one call's
  // tiles, in float: within 1e-4 relative (the 1e-5 floor for elements that cancel to near zero).
  const gqa_test::Tolerance grad_tol{1e-5, 1e-4};
  gqa_test::check_close(d_q, gqa_test::to_double(local_rows(grads.d_q, layout)), grad_tol);
  gqa_test::check_close(d_k, gqa_test::to_double(local_rows(grads.d_k, layout)), grad_tol);
  gqa_test::check_close(d_v, gqa_test::to_double(local_rows(grads.d_v, layout)), grad_tol);
  // Bytes: the K/V blocks of the P-1 ranks before this one (as the forward), and the gradient of every block this
  // rank worked on, passed on (the last one home): G heads each.
  std::uint64_t expected = 0;
  for (int step = 0; step < P; ++step) {
    const Index l_src = gqa::ring_layout(S, P, (rank - step + P) % P).local_length();
    const std::uint64_t block = std::uint64_t(2 * B * l_src * G * D * 4);
    expected += block * (step + 1 < P ? 2 : 1);
  }
  CHECK(stats.bytes_sent == expected);
}

TEST_CASE("ring prefill backward equals one process's attention_backward", "[distributed][ring][backward]") {
  check_ring_backward(1, 40, 8, 2, true);
  check_ring_backward(2, 23, 4, 4, true);  // uneven chunks, MHA, a batch
  check_ring_backward(1, 19, 6, 3, false);
  check_ring_backward(1, 3, 4, 1, true);   // empty chunks for P >= 2
}

TEST_CASE("ring_attention: a rank with the wrong rows, or a refused option, throws on every rank",
          "[distributed][ring]") {
  const int P = world_size(), rank = world_rank();
  const Index S = 16, H = 4, G = 2, D = 8;
  const gqa::RingLayout layout = gqa::ring_layout(S, P, rank);
  const Index L = layout.local_length();
  // The last rank's k and v hold one row more than its q.
  const Index Lk = L + (rank == P - 1 ? 1 : 0);
  const Tensor4<float> q = normal(1, L, H, D, 1), k = normal(1, Lk, G, D, 2), v = normal(1, Lk, G, D, 3);
  Tensor4<float> out(1, L, H, D);
  const std::string m = message_of([&] { gqa::ring_attention(q, k, v, out, MPI_COMM_WORLD); });
  if (rank == P - 1)
    CHECK(m.find("[gqa.distributed.shape] ring_attention: k dim 1 = " + std::to_string(Lk)) == 0);
  else
    CHECK(m.find("[gqa.distributed.peer] ring_attention: another rank") == 0);
  if (P > 1) {  // rank 0 gives a row to the last rank: S is right, their layouts are not
    const Index Lw = L + (rank == P - 1 ? 1 : 0) - (rank == 0 ? 1 : 0);
    const Tensor4<float> qw = normal(1, Lw, H, D, 1), kw = normal(1, Lw, G, D, 2);
    Tensor4<float> outw(1, Lw, H, D);
    const std::string mw = message_of([&] { gqa::ring_attention(qw, kw, kw, outw, MPI_COMM_WORLD); });
    if (rank == 0 || rank == P - 1)
      CHECK(mw.find("[gqa.distributed.shape] ring_attention: rank " + std::to_string(rank) + " holds " +
                    std::to_string(Lw) + " rows but ring_layout(S = 16") == 0);
    else
      CHECK(mw.find("[gqa.distributed.peer]") == 0);
  }

  const Tensor4<float> q2 = normal(1, layout.local_length(), H, D, 1), k2 = normal(1, layout.local_length(), G, D, 2);
  Tensor4<float> out2(1, layout.local_length(), H, D);
  gqa::AttentionOptions opt;
  opt.window = 3;
  CHECK_THROWS_WITH(gqa::ring_attention(q2, k2, k2, out2, MPI_COMM_WORLD, opt),
                    Catch::StartsWith("[gqa.distributed.option] ring_attention: options.window = 3"));
  // Ranks that disagree on a dimension: H differs on the last rank (when P > 1).
  const Index h_mine = rank == P - 1 && P > 1 ? 2 * H : H;
  const Tensor4<float> q3 = normal(1, layout.local_length(), h_mine, D, 1);
  Tensor4<float> out3(1, layout.local_length(), h_mine, D);
  if (P > 1)
    CHECK_THROWS_WITH(gqa::ring_attention(q3, k2, k2, out3, MPI_COMM_WORLD),
                      Catch::StartsWith("[gqa.distributed.shape] ring_attention: q dim 2 (H) differs between ranks"));
}

}  // namespace
