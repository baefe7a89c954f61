// bench/bench_paged.cpp — decode on gqa::PagedKVCache against gqa::KVCache holding the same tokens, and a
// serving-shaped batch (issue "Serving": bars in bench/README.md; bench/paged_report.py turns a JSON run into the
// table).
//
// Benchmarks (names are `key:value` fields, as bench_common.hpp's):
//   contiguous-decode/H:32/G:<g>/D:128/S:16384/kv:<f32|bf16|f16|i8>/threads:<1|2>/block:0
//       gqa::attention(q [1, 1, 32, 128] float, KVCache<kv> of S tokens, out).
//   paged-decode/H:32/G:<g>/D:128/S:16384/kv:<..>/threads:<1|2>/block:<16|32|64|128>/pool:<random|fresh>
//       the same tokens in a PagedKVCache<kv> of that block size (the same bytes, plus < 1 block), one sequence:
//       random, its blocks a seeded random permutation of the pool (RandomOrderFill: no two consecutive, so every
//       block is a run of its own for the kernels), the worst case of fragmentation; fresh, appended to a fresh
//       pool (the allocator's order: one run of blocks).
//   paired-decode/H:32/G:<g>/D:128/S:16384/kv:<..>/threads:<1|2>/block:<..>/pool:<..>
//       the two above alternated step by step, each timed: paged_throughput = contiguous time / paged time, the
//       ratio the bar is about (bench/paged_report.py's decode table).
//   baseline/stream_read/decode/H:32/G:<g>/D:128/S:16384/kv:<..>/threads:<1|2>/block:<0|16|32|64|128>
//       the stream read of the bytes that decode reads, in its order: block 0 the contiguous cache's, else the
//       paged cache's blocks in table order (each thread whole heads): decode's floor on each layout.
//   serving/B:64/H:32/G:8/D:128/kv:<..>/threads:<1|2>/block:32
//       one batched decode step of 64 sequences whose lengths are drawn uniformly from [100, 8000] (seeded), q
//       [64, 1, 32, 128]: one call. The pool is filled as a server fills it (each prompt, half of a sequence, at
//       once, then decode steps of one token for every sequence), so its layout is the allocator's. Counters:
//       kv_bytes (the sequences' K/V read), tokens_per_s (64 per step), bytes_in_use, bytes_reserved (blocks
//       held), reserved_over_in_use, worst_case_bytes (a KVCache of B = 64 and capacity 8000, what a contiguous
//       cache must reserve for these requests), worst_case_over_reserved, blocks_per_run (blocks per run of
//       consecutive blocks in the tables: 1 = fully fragmented).
//   serving-contiguous/B:64/...
//       the same step on that KVCache (capacity 8000, ragged lengths): tokens/s for comparison.
//   serving-paired/B:64/...
//       the two alternated step by step, as paired-decode: paged_throughput.
//   serving-floor/B:64/...
//       the paged step and the stream read of its pool alternated, each timed: floor_over_time (kv_bytes at that
//       read's rate over the step's time, under the same load; the bar's figure).
//   baseline/stream_read/serving/B:64/...
//       the stream read of the serving pool (the sequences hold all but 1% of it): its floor is kv_bytes / this GBps.
//   baseline/sgemm/M:<m>/N:<n>/K:<k>/threads:<t>
//       the machine's float GEMM rate (bench_common.hpp): the compute floor, GFLOPs of a step / this.
// Every benchmark reads K/V the decode reads; G runs from 1 (small caches) up, so the smoke run (bench/smoke.cmake,
// the first S:16384 benchmark at one thread) builds a 16 MiB cache.
//   bench_paged --benchmark_filter='/kv:bf16/' --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
// holds every decode set-up of a cache type at once (a contiguous cache and 8 pools: 2.4 GiB at G = 32 for bf16,
// 4.7 for f32), so interleaving costs no rebuilds; run one cache type per process (bench/README.md).
#include "bench_common.hpp"

#include <gqa/paged_kv_cache.hpp>

#include <algorithm>
#include <map>
#include <random>

namespace gqa_bench {
namespace {

inline constexpr Index kDecodeKeys = 16384;
inline const std::vector<Index> kBlocks = {16, 32, 64, 128};

/// Block 0 (the contiguous cache) and kBlocks.
std::vector<Index> with_contiguous(std::vector<Index> blocks) {
  blocks.insert(blocks.begin(), 0);
  return blocks;
}

/// A sequence of a PagedKVCache filled as the worst case of fragmentation: the pool full of one-block sequences,
/// which end one at a time in a seeded random order, each freed block taken at once by the sequence being filled.
/// Its blocks are then a random permutation of the pool (no two consecutive: every block is a run of its own for
/// the kernels), whatever the allocator prefers.
template <typename T>
class RandomOrderFill {
 public:
  RandomOrderFill(gqa::PagedKVCache<T>& cache, std::uint64_t seed) : cache_(cache) {
    gqa::Tensor4<float> zero(1, cache.block_size(), cache.kv_heads(), cache.head_dim());
    zero.setZero();
    while (cache.blocks_free() > 0) {
      others_.push_back(cache.add_sequence());
      cache.append(others_.back(), zero, zero);
    }
    std::shuffle(others_.begin(), others_.end(), std::mt19937_64(seed));
    id_ = cache.add_sequence();
  }
  std::int32_t id() const { return id_; }
  /// Appends k, v [1, n, G, D] (n a multiple of the block size, or the last tokens), a block at a time.
  void append(const gqa::Tensor4<float>& k, const gqa::Tensor4<float>& v) {
    const Index n = k.dimension(1), G = k.dimension(2), D = k.dimension(3), size = cache_.block_size();
    for (Index t = 0; t < n; t += size) {
      const Index m = std::min(size, n - t);
      if (cache_.length(id_) % size == 0) cache_.release(others_[next_++]);
      const std::array<Index, 4> dims{1, m, G, D}, strides{m * G * D, G * D, D, 1};
      cache_.append(id_, gqa::TensorRef<const float>{k.data() + t * G * D, dims, strides},
                    gqa::TensorRef<const float>{v.data() + t * G * D, dims, strides});
    }
  }

 private:
  gqa::PagedKVCache<T>& cache_;
  std::vector<std::int32_t> others_;
  size_t next_ = 0;
  std::int32_t id_ = -1;
};

/// The same S tokens in a KVCache and in two PagedKVCaches of every block size: blocks in a random order
/// (RandomOrderFill) and a fresh pool (the allocator's order: one run), and one query token.
template <typename T>
struct PagedSetup {
  gqa::KVCache<T> contiguous;
  std::map<Index, gqa::PagedKVCache<T>> paged, fresh;  // by block size
  std::map<Index, std::vector<std::int32_t>> ids;      // by block size: the one sequence of `paged`
  const std::vector<std::int32_t> fresh_ids{0};
  gqa::Tensor4<float> q, out;

  explicit PagedSetup(const Shape& s) : contiguous(1, s.G, s.S, s.D), q(1, 1, s.H, s.D), out(1, 1, s.H, s.D) {
    fill_uniform(q.data(), std::size_t(q.size()), 1);
    out.setZero();
    std::vector<RandomOrderFill<T>> fills;
    for (Index block : kBlocks) {
      auto& cache = paged.emplace(block, gqa::PagedKVCache<T>(s.G, s.D, block, (s.S + block - 1) / block)).first->second;
      fills.emplace_back(cache, std::uint64_t(block));
      ids[block] = {fills.back().id()};
      fresh.emplace(block, gqa::PagedKVCache<T>(s.G, s.D, block, (s.S + block - 1) / block)).first->second.add_sequence();
    }
    const Index chunk = std::min<Index>(s.S, 1024);  // a multiple of every block size
    gqa::Tensor4<float> k(1, chunk, s.G, s.D), v(1, chunk, s.G, s.D);
    for (Index done = 0; done < s.S; done += chunk) {
      fill_uniform(k.data(), std::size_t(k.size()), 1000 + std::uint64_t(done));
      fill_uniform(v.data(), std::size_t(v.size()), 2000 + std::uint64_t(done));
      contiguous.append(k, v);
      for (auto& fill : fills) fill.append(k, v);
      for (auto& [block, cache] : fresh) cache.append(0, k, v);
    }
  }
};

/// Every decode set-up, built once and kept (random interleaving visits them in any order).
template <typename T>
PagedSetup<T>& paged_setup(const Shape& s) {
  static std::map<Index, std::unique_ptr<PagedSetup<T>>> held;  // by G
  auto& slot = held[s.G];
  if (!slot) slot = std::make_unique<PagedSetup<T>>(s);
  return *slot;
}

/// A pool of the set-up: "random" or "fresh".
template <typename T>
std::pair<const gqa::PagedKVCache<T>*, const std::vector<std::int32_t>*> pool(const PagedSetup<T>& setup, Index block,
                                                                             const std::string& order) {
  if (order == "fresh") return {&setup.fresh.at(block), &setup.fresh_ids};
  return {&setup.paged.at(block), &setup.ids.at(block)};
}

template <typename T>
void bm_decode(benchmark::State& state, Shape s, int threads, Index block, const std::string& order = "random") {
  auto& setup = paged_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  const auto [cache, ids] = block == 0 ? decltype(pool(setup, block, order)){} : pool(setup, block, order);
  auto step = [&, cache = cache, ids = ids] {
    if (block == 0)
      gqa::attention(setup.q, setup.contiguous, setup.out, opt);
    else
      gqa::attention(setup.q, *cache, *ids, setup.out, opt);
  };
  step();  // warm-up
  WallClock clock;
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  set_counters(state, Work{double(s.S * s.G) * kv_row_pair_bytes<T>(s.D), 4.0 * double(s.S * s.D * s.H), 1.0},
               clock.seconds());
}

/// Steps `contiguous` and `paged` alternated (the order swapped every step), each timed on its own: the ratio of
/// their times is measured under the same load, which a shared machine's drift would otherwise swamp. Counters:
/// contiguous_ms, paged_ms, paged_throughput (contiguous time / paged time).
template <typename C, typename P>
void time_paired(benchmark::State& state, C&& contiguous, P&& paged) {
  contiguous(), paged();
  double t_contiguous = 0, t_paged = 0;
  bool paged_first = false;
  auto timed = [](auto&& step) {
    const WallClock clock;
    step();
    return clock.seconds();
  };
  for (auto _ : state) {
    if (paged_first) t_paged += timed(paged);
    t_contiguous += timed(contiguous);
    if (!paged_first) t_paged += timed(paged);
    paged_first = !paged_first;
    benchmark::ClobberMemory();
  }
  const double n = double(state.iterations());
  state.counters["contiguous_ms"] = 1e3 * t_contiguous / n;
  state.counters["paged_ms"] = 1e3 * t_paged / n;
  state.counters["paged_throughput"] = t_contiguous / t_paged;
}

/// Contiguous and paged decode of the same tokens, alternated (time_paired).
template <typename T>
void bm_paired(benchmark::State& state, Shape s, int threads, Index block, const std::string& order) {
  auto& setup = paged_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  const auto [cache, ids] = pool(setup, block, order);
  time_paired(state, [&] { gqa::attention(setup.q, setup.contiguous, setup.out, opt); },
              [&, cache = cache, ids = ids] { gqa::attention(setup.q, *cache, *ids, setup.out, opt); });
}

/// The stream read of exactly what one decode step reads, in the order it reads it: block 0, the contiguous cache's
/// K and V of each head (S rows each); else for each head, for each block in table order, its K and V rows (and
/// int8 scales), each thread reading a contiguous share of that list (as decode gives each thread whole heads).
/// Divided into the decode's bytes it is the decode's floor on that layout: a pool in random order reads slower
/// than one run of memory, whatever the kernel does.
template <typename T>
void bm_decode_stream(benchmark::State& state, Shape s, int threads, Index block) {
  auto& setup = paged_setup<T>(s);
  constexpr bool quantized = std::is_same_v<T, std::int8_t>;
  std::vector<ByteRange> ranges;
  if (block == 0) {
    const auto& c = setup.contiguous;
    const std::size_t rows = std::size_t(s.S), row = std::size_t(s.D) * sizeof(T);
    for (Index g = 0; g < s.G; ++g) {
      ranges.push_back(ByteRange{c.key_storage().data() + std::size_t(g) * rows * std::size_t(s.D), rows * row});
      ranges.push_back(ByteRange{c.value_storage().data() + std::size_t(g) * rows * std::size_t(s.D), rows * row});
      if constexpr (quantized) {
        ranges.push_back(ByteRange{c.key_scales().data() + std::size_t(g) * rows, rows * sizeof(float)});
        ranges.push_back(ByteRange{c.value_scales().data() + std::size_t(g) * rows, rows * sizeof(float)});
      }
    }
  } else {
    const auto& c = setup.paged.at(block);
    const std::size_t rows = std::size_t(block), head = std::size_t(c.num_blocks()) * rows;
    const auto table = c.block_table(setup.ids.at(block)[0]);
    for (Index g = 0; g < s.G; ++g)
      for (std::size_t i = 0; i < std::size_t(table.size()); ++i) {
        const std::size_t n = std::min<std::size_t>(rows, std::size_t(s.S) - i * rows);  // the last block's rows
        const std::size_t at = std::size_t(g) * head + std::size_t(table[i]) * rows;
        ranges.push_back(ByteRange{c.key_storage().data() + at * std::size_t(s.D), n * std::size_t(s.D) * sizeof(T)});
        ranges.push_back(ByteRange{c.value_storage().data() + at * std::size_t(s.D), n * std::size_t(s.D) * sizeof(T)});
        if constexpr (quantized) {
          ranges.push_back(ByteRange{c.key_scales().data() + at, n * sizeof(float)});
          ranges.push_back(ByteRange{c.value_scales().data() + at, n * sizeof(float)});
        }
      }
  }
  bm_stream_read(state, ranges, threads, /*whole_ranges=*/true);
}

// ------------------------------------------------------------------------------------------------ serving

inline constexpr Index kServingBatch = 64, kShortest = 100, kLongest = 8000, kServingBlock = 32;

/// 64 sequences of seeded lengths in [100, 8000] in a PagedKVCache (pool: what they need, plus 1%) and in a
/// KVCache of capacity 8000. The paged cache is filled as a server fills it: each sequence's prompt (the first half
/// of its tokens) appended at once, in turn, then decode steps appending one token to every sequence not yet at
/// its length, in one call per step; so the allocator places sequences that grow side by side.
template <typename T>
struct ServingSetup : Reusable {
  std::vector<std::int32_t> lengths, ids;
  gqa::PagedKVCache<T> paged;
  gqa::KVCache<T> contiguous;
  gqa::Tensor4<float> q, out;

  explicit ServingSetup(const Shape& s)
      : lengths(draw_lengths()), paged(s.G, s.D, kServingBlock, pool_blocks(lengths)),
        contiguous(kServingBatch, s.G, kLongest, s.D), q(kServingBatch, 1, s.H, s.D), out(kServingBatch, 1, s.H, s.D) {
    fill_uniform(q.data(), std::size_t(q.size()), 3);
    gqa::Tensor4<float> k(1, kLongest, s.G, s.D), v(1, kLongest, s.G, s.D);
    for (Index b = 0; b < kServingBatch; ++b) {
      const Index len = lengths[size_t(b)], prompt = std::max<Index>(1, len / 2);
      fill_uniform(k.data(), std::size_t(len * s.G * s.D), 4000 + std::uint64_t(b));
      fill_uniform(v.data(), std::size_t(len * s.G * s.D), 5000 + std::uint64_t(b));
      const gqa::TensorRef<const float> kr{k.data(), {1, prompt, s.G, s.D}, {len * s.G * s.D, s.G * s.D, s.D, 1}};
      const gqa::TensorRef<const float> vr{v.data(), {1, prompt, s.G, s.D}, {len * s.G * s.D, s.G * s.D, s.D, 1}};
      ids.push_back(paged.add_sequence());
      paged.append(ids.back(), kr, vr);
      std::vector<std::int32_t> counts(size_t(kServingBatch), 0);
      counts[size_t(b)] = std::int32_t(len);
      // Row b of a [64, len, G, D] view whose other rows are never read (counts 0): stride 0 over the batch.
      const gqa::TensorRef<const float> kb_view{k.data(), {kServingBatch, len, s.G, s.D}, {0, s.G * s.D, s.D, 1}};
      const gqa::TensorRef<const float> vb_view{v.data(), {kServingBatch, len, s.G, s.D}, {0, s.G * s.D, s.D, 1}};
      contiguous.append(kb_view, vb_view, counts);
    }
    decode_steps(s);
  }

  /// Appends one token to every sequence shorter than its length, step after step, until all are full.
  void decode_steps(const Shape& s) {
    gqa::Tensor4<float> k(kServingBatch, 1, s.G, s.D), v(kServingBatch, 1, s.G, s.D);
    fill_uniform(k.data(), std::size_t(k.size()), 6000);
    fill_uniform(v.data(), std::size_t(v.size()), 7000);
    for (;;) {
      std::vector<std::int32_t> running;
      for (Index b = 0; b < kServingBatch; ++b)
        if (paged.length(ids[size_t(b)]) < lengths[size_t(b)]) running.push_back(ids[size_t(b)]);
      if (running.empty()) return;
      const Index n = Index(running.size());
      const std::array<Index, 4> dims{n, 1, s.G, s.D}, strides{s.G * s.D, s.G * s.D, s.D, 1};
      paged.append(running, gqa::TensorRef<const float>{k.data(), dims, strides},
                   gqa::TensorRef<const float>{v.data(), dims, strides});
    }
  }
  /// Blocks per run of consecutive blocks, over all sequences' tables: 1 when no two follow each other.
  double blocks_per_run() const {
    double blocks = 0, runs = 0;
    for (std::int32_t id : ids) {
      const auto table = paged.block_table(id);
      for (Index i = 0; i < table.size(); ++i) runs += i == 0 || table[i] != table[i - 1] + 1;
      blocks += double(table.size());
    }
    return blocks / runs;
  }

  static std::vector<std::int32_t> draw_lengths() {
    std::mt19937_64 rng(2026);
    std::uniform_int_distribution<std::int32_t> length{std::int32_t(kShortest), std::int32_t(kLongest)};
    std::vector<std::int32_t> r(static_cast<size_t>(kServingBatch));
    for (auto& l : r) l = length(rng);
    return r;
  }
  static Index pool_blocks(const std::vector<std::int32_t>& lengths) {
    Index n = 0;
    for (auto l : lengths) n += (l + kServingBlock - 1) / kServingBlock;
    return n + n / 100 + 1;
  }
  double kv_bytes() const { return double(paged.bytes_in_use()); }
};

template <typename T>
ServingSetup<T>& serving_setup(const Shape& s) {
  return reuse<ServingSetup<T>>(attn_name("serving-setup", s, kv_name<T>(), 0),
                                [&] { return std::make_unique<ServingSetup<T>>(s); });
}

template <typename T>
void bm_serving(benchmark::State& state, Shape s, int threads, bool paged) {
  auto& setup = serving_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  auto step = [&] {
    if (paged)
      gqa::attention(setup.q, setup.paged, setup.ids, setup.out, opt);
    else
      gqa::attention(setup.q, setup.contiguous, setup.out, opt);
  };
  step();
  WallClock clock;
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  double keys = 0;
  for (auto l : setup.lengths) keys += double(l);
  set_counters(state, Work{setup.kv_bytes(), 4.0 * keys * double(s.D * s.H), double(kServingBatch)}, clock.seconds());
  const double reserved = paged ? double(setup.paged.bytes_reserved()) : double(setup.contiguous.bytes());
  const double worst = double(setup.contiguous.bytes());
  state.counters["bytes_in_use"] = setup.kv_bytes();
  state.counters["bytes_reserved"] = reserved;
  state.counters["reserved_over_in_use"] = reserved / setup.kv_bytes();
  state.counters["worst_case_bytes"] = worst;
  state.counters["worst_case_over_reserved"] = worst / reserved;
  if (paged) state.counters["blocks_per_run"] = setup.blocks_per_run();
}

/// The serving step on the contiguous and on the paged cache, alternated (time_paired).
template <typename T>
void bm_serving_paired(benchmark::State& state, Shape s, int threads) {
  auto& setup = serving_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  time_paired(state, [&] { gqa::attention(setup.q, setup.contiguous, setup.out, opt); },
              [&] { gqa::attention(setup.q, setup.paged, setup.ids, setup.out, opt); });
}

/// The serving pool as stream_read ranges: every head's whole pool ([G, num_blocks, block_size, D]) and int8
/// scales, read in order. The sequences hold all but 1% of its blocks, so this reads at the machine's stream rate
/// over those bytes (the floor does not credit a layout that reads slower).
template <typename T>
std::vector<ByteRange> serving_pool_ranges(const ServingSetup<T>& setup, const Shape& s) {
  const std::size_t head = std::size_t(setup.paged.num_blocks()) * std::size_t(kServingBlock * s.D);
  std::vector<ByteRange> ranges;
  for (Index g = 0; g < s.G; ++g) {
    ranges.push_back(ByteRange{setup.paged.key_storage().data() + std::size_t(g) * head, head * sizeof(T)});
    ranges.push_back(ByteRange{setup.paged.value_storage().data() + std::size_t(g) * head, head * sizeof(T)});
    if constexpr (std::is_same_v<T, std::int8_t>) {
      const std::size_t scales = head / std::size_t(s.D);
      ranges.push_back(ByteRange{setup.paged.key_scales().data() + std::size_t(g) * scales, scales * sizeof(float)});
      ranges.push_back(ByteRange{setup.paged.value_scales().data() + std::size_t(g) * scales, scales * sizeof(float)});
    }
  }
  return ranges;
}

template <typename T>
void bm_serving_stream(benchmark::State& state, Shape s, int threads) {
  bm_stream_read(state, serving_pool_ranges(serving_setup<T>(s), s), threads);
}

/// The paged serving step and the stream read of its pool alternated, each timed (as time_paired): the floor,
/// kv_bytes at the rate of that read, over the step's time, under the same load. Counter floor_over_time.
template <typename T>
void bm_serving_floor(benchmark::State& state, Shape s, int threads) {
  auto& setup = serving_setup<T>(s);
  const auto ranges = serving_pool_ranges(setup, s);
  double pool_bytes = 0;
  for (const ByteRange& r : ranges) pool_bytes += double(r.bytes);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  std::uint32_t sink = 0;
  time_paired(state, [&] { sink += stream_read(ranges, threads); },
              [&] { gqa::attention(setup.q, setup.paged, setup.ids, setup.out, opt); });
  benchmark::DoNotOptimize(sink);
  // time_paired's "contiguous" step is the stream read here: its time over the step's, scaled to kv_bytes.
  state.counters["floor_over_time"] = state.counters["paged_throughput"] * setup.kv_bytes() / pool_bytes;
  state.counters["stream_ms"] = state.counters["contiguous_ms"];
  state.counters.erase("paged_throughput");
  state.counters.erase("contiguous_ms");
}

std::string with_block(const std::string& name, Index block) { return name + "/block:" + std::to_string(block); }

template <typename T>
void register_type() {
  for (Index G : {1, 8, 32}) {
    const Shape s{1, kHeads, G, kHeadDim, kDecodeKeys};
    for (int t : kThreads) {
      register_once(with_block(attn_name("contiguous-decode", s, kv_name<T>(), t), 0),
                    [s, t](benchmark::State& st) { bm_decode<T>(st, s, t, 0); });
      for (const std::string order : {"random", "fresh"})
        for (Index block : kBlocks) {
          register_once(with_block(attn_name("paged-decode", s, kv_name<T>(), t), block) + "/pool:" + order,
                        [s, t, block, order](benchmark::State& st) { bm_decode<T>(st, s, t, block, order); });
          register_once(with_block(attn_name("paired-decode", s, kv_name<T>(), t), block) + "/pool:" + order,
                        [s, t, block, order](benchmark::State& st) { bm_paired<T>(st, s, t, block, order); });
        }
      for (Index block : with_contiguous(kBlocks))
        register_once(with_block(attn_name("baseline/stream_read/decode", s, kv_name<T>(), t), block),
                      [s, t, block](benchmark::State& st) { bm_decode_stream<T>(st, s, t, block); });
    }
  }
}

template <typename T>
void register_serving() {
  Shape s{kServingBatch, kHeads, 8, kHeadDim, 0};
  auto name = [&](const char* kind, int t) {
    std::ostringstream o;
    o << kind << "/B:" << kServingBatch << "/H:" << s.H << "/G:" << s.G << "/D:" << s.D << "/kv:" << kv_name<T>()
      << "/threads:" << t << "/block:" << kServingBlock;
    return o.str();
  };
  for (int t : kThreads)
    register_once(name("baseline/stream_read/serving", t), [s, t](benchmark::State& st) { bm_serving_stream<T>(st, s, t); });
  for (int t : kThreads) {
    register_once(name("serving", t), [s, t](benchmark::State& st) { bm_serving<T>(st, s, t, true); });
    register_once(name("serving-contiguous", t), [s, t](benchmark::State& st) { bm_serving<T>(st, s, t, false); });
    register_once(name("serving-paired", t), [s, t](benchmark::State& st) { bm_serving_paired<T>(st, s, t); });
    register_once(name("serving-floor", t), [s, t](benchmark::State& st) { bm_serving_floor<T>(st, s, t); });
  }
}

void register_all() {
  register_type<float>();
  register_type<gqa::bfloat16>();
  register_type<gqa::half>();
  register_type<std::int8_t>();
  register_serving<gqa::bfloat16>();
  register_serving<gqa::half>();
  register_serving<float>();
  register_serving<std::int8_t>();
  register_sgemm_baselines();
}

}  // namespace
}  // namespace gqa_bench

int main(int argc, char** argv) { return gqa_bench::run_main(argc, argv, gqa_bench::register_all); }
