// bench/bench_common.hpp — what bench_decode and bench_prefill share: benchmark names, counters, the two
// machine baselines (STREAM-style read, Eigen SGEMM), data fill, set-up reuse and peak RSS.
//
// Names are `/`-separated `key:value` fields, parsed by bench/report.py and bench/plot.py (see bench/README.md):
//   decode/H:32/G:8/D:128/S:16384/kv:f32/threads:2
//   prefill/H:32/G:8/D:128/S:4096/kv:f32/threads:2/causal:1
//   reference/decode/...  reference/prefill/...          (gqa::reference_attention, double, one thread)
//   baseline/stream_read/H:32/G:8/D:128/S:16384/kv:f32/threads:2   (reads the bytes of that decode's KV cache)
//   baseline/sgemm/M:<m>/N:<n>/K:<k>/threads:<t>
// Google Benchmark appends `/real_time`, `/iterations:N` or `/repeats:N` to a name when UseRealTime(),
// Iterations() or Repetitions() are set on it, so none of them is used: names stay exactly as above. Timing:
// Google Benchmark's "Time" (JSON `real_time`) is wall-clock; every counter below is computed here from our own
// wall clock around the timed loop. Its "CPU" column is the main thread's CPU time only, meaningless at threads:2.
//
// Counters (all per iteration, from wall-clock time):
//   kv_bytes     bytes of K+V read per step: 2 * B * S * G * D * sizeof(kv type), plus 2 * B * S * G * 4 for the
//                scales of an int8 (kv:i8) cache (stream_read: the same bytes)
//   GBps         kv_bytes / time / 1e9
//   GFLOPs       useful flops / time / 1e9 (decode 4*S*D*H; prefill 4*S*S*D*H, or 2*S*S*D*H when causal;
//                sgemm 2*M*N*K per product, summed over threads)
//   tokens_per_s generated (decode) or processed (prefill) tokens per second: B (decode), B*S (prefill)
//   peak_rss_mb  getrusage(RUSAGE_SELF).ru_maxrss in MiB: the process's high-water mark so far
#pragma once

#include <gqa/attention.hpp>
#include <gqa/kv_cache.hpp>
#include <gqa/reference.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

namespace gqa_bench {

using gqa::Index;

// The shapes of the issue: H = 32 query heads of D = 128, G in {32, 16, 8, 4, 2, 1} KV heads.
inline constexpr Index kHeads = 32;
inline constexpr Index kHeadDim = 128;
inline const std::vector<Index> kGroups = {32, 16, 8, 4, 2, 1};
inline const std::vector<int> kThreads = {1, 2};

// ---------------------------------------------------------------------------------------------------- names

template <typename T>
constexpr const char* kv_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, gqa::bfloat16>) return "bf16";
  else if constexpr (std::is_same_v<T, gqa::half>) return "f16";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "i8";
  else return "f64";
}

/// Bytes one token of one KV head adds to K+V: 2 * D * sizeof(T), plus an int8 cache's two float scales.
template <typename T>
constexpr double kv_row_pair_bytes(Index D) {
  return 2.0 * (double(D) * sizeof(T) + (std::is_same_v<T, std::int8_t> ? sizeof(float) : 0));
}

/// One attention problem: B sequences, H query heads, G KV heads, head dim D, length S (cache length at decode,
/// sequence length at prefill).
struct Shape {
  Index B = 1, H = kHeads, G = 8, D = kHeadDim, S = 1024;
};

/// `kind/H:../G:../D:../S:../kv:../threads:..[/causal:..]`; a `B:` field follows `kind` only when B != 1.
inline std::string attn_name(const std::string& kind, const Shape& s, const char* kv, int threads, int causal = -1) {
  std::ostringstream o;
  o << kind;
  if (s.B != 1) o << "/B:" << s.B;
  o << "/H:" << s.H << "/G:" << s.G << "/D:" << s.D << "/S:" << s.S << "/kv:" << kv << "/threads:" << threads;
  if (causal >= 0) o << "/causal:" << causal;
  return o.str();
}

/// Registers `fn` under `name` unless a benchmark of that name is already registered (baselines shared by
/// several shapes are registered once). Returns null when it was already there.
template <typename Fn>
benchmark::internal::Benchmark* register_once(const std::string& name, Fn&& fn) {
  static std::set<std::string> names;
  if (!names.insert(name).second) return nullptr;
  return benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn));
}

// ------------------------------------------------------------------------------------------------- counters

/// Wall clock around the timed loop; the counters are computed from it (see the header comment).
class WallClock {
 public:
  WallClock() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

inline double peak_rss_mb() {
#if defined(__APPLE__)
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / (1024.0 * 1024.0);  // bytes on macOS
#elif defined(__unix__)
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;  // KiB on Linux
#else
  return 0.0;
#endif
}

/// Per-iteration work of one benchmark, turned into the documented counters.
struct Work {
  double kv_bytes = 0;  // bytes of K+V read per iteration
  double flops = 0;     // useful flops per iteration
  double tokens = 0;    // tokens per iteration
};

inline void set_counters(benchmark::State& state, const Work& w, double seconds) {
  const double iters = double(state.iterations());
  const double per_s = seconds > 0 ? iters / seconds : 0.0;
  if (w.kv_bytes > 0) {
    state.counters["kv_bytes"] = w.kv_bytes;
    state.counters["GBps"] = w.kv_bytes * per_s / 1e9;
  }
  if (w.flops > 0) state.counters["GFLOPs"] = w.flops * per_s / 1e9;
  if (w.tokens > 0) state.counters["tokens_per_s"] = w.tokens * per_s;
}

// ----------------------------------------------------------------------------------------------------- data

/// Deterministic uniform values in [-1, 1), fast enough for GiB-sized caches (a 64-bit LCG, top bits).
template <typename T>
void fill_uniform(T* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = T(float(std::int32_t(x >> 32)) * (1.0f / 2147483648.0f));
  }
}

/// Set-ups (a filled KV cache, Q/K/V tensors) are expensive at GiB sizes, and Google Benchmark calls a benchmark
/// function once per trial iteration count and once per repetition. reuse keeps the last set-up under its key, so
/// consecutive benchmarks of one shape (the stream read of a cache and its decodes, threads 1 and 2, causal 0 and 1)
/// share it; the previous one is freed before the next is built, so at most one set-up is alive.
struct Reusable {
  virtual ~Reusable() = default;
};

/// The one set-up held, of whatever type (one slot for all of them, so set-ups of different types never coexist).
struct ReusableSlot {
  std::unique_ptr<Reusable> held;
  std::string held_key;
};
inline ReusableSlot& reusable_slot() {
  static ReusableSlot slot;
  return slot;
}

template <typename Setup, typename Make>
Setup& reuse(const std::string& key, Make&& make) {
  auto& [held, held_key] = reusable_slot();
  Setup* setup = held ? dynamic_cast<Setup*>(held.get()) : nullptr;
  if (!setup || held_key != key) {
    held.reset();  // free first: two GiB-sized set-ups never coexist
    held_key = key;
    std::unique_ptr<Setup> made = make();
    setup = made.get();
    held = std::move(made);
  }
  return *setup;
}

// --------------------------------------------------------------------------------- baseline: stream read

/// A run of bytes a stream_read reads.
struct ByteRange {
  const void* data = nullptr;
  std::size_t bytes = 0;
};

/// Reads every byte of `ranges` once with `threads` threads, each thread a contiguous part of every range in turn
/// (or, with `whole_ranges`, a contiguous share of the ranges, each read whole: many small ranges), as 32-bit words summed into 64 independent partial sums (eight 8-lane vectors under AVX2), so the loop runs at
/// the memory system's rate whatever the bytes hold (bf16 or half bit patterns too); GCC and Clang vectorise the
/// inner loop at -O3. Returns the sum, for DoNotOptimize.
inline std::uint32_t stream_read(const std::vector<ByteRange>& ranges, int threads, bool whole_ranges = false) {
  std::uint32_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total) if (threads > 1)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    constexpr std::size_t kLanes = 64;
    std::uint32_t acc[kLanes] = {};
    const std::size_t R = ranges.size();
    const std::size_t r_begin = whole_ranges ? R * std::size_t(t) / std::size_t(nt) : 0;
    const std::size_t r_end = whole_ranges ? R * std::size_t(t + 1) / std::size_t(nt) : R;
    for (std::size_t r = r_begin; r < r_end; ++r) {
      const auto* p = static_cast<const std::uint32_t*>(ranges[r].data);
      const std::size_t n = ranges[r].bytes / sizeof(std::uint32_t);
      const int parts = whole_ranges ? 1 : nt, part = whole_ranges ? 0 : t;
      const std::size_t per = (n / std::size_t(parts)) / kLanes * kLanes;
      const std::size_t begin = std::size_t(part) * per, end = part == parts - 1 ? n : begin + per;
      std::size_t i = begin;
      for (; i + kLanes <= end; i += kLanes)
        for (std::size_t j = 0; j < kLanes; ++j) acc[j] += p[i + j];
      for (; i < end; ++i) acc[0] += p[i];
    }
    std::uint32_t s = 0;
    for (std::size_t j = 0; j < kLanes; ++j) s += acc[j];
    total += s;
  }
  return total;
}

/// Times stream_read over `ranges` (kv_bytes: their total size).
inline void bm_stream_read(benchmark::State& state, const std::vector<ByteRange>& ranges, int threads,
                           bool whole_ranges = false) {
  std::size_t bytes = 0;
  for (const ByteRange& r : ranges) bytes += r.bytes;
  benchmark::DoNotOptimize(stream_read(ranges, threads, whole_ranges));  // warm: same state as the timed reads
  WallClock clock;
  for (auto _ : state) benchmark::DoNotOptimize(stream_read(ranges, threads, whole_ranges));
  set_counters(state, Work{double(bytes), 0, 0}, clock.seconds());
}

// ---------------------------------------------------------------------------------------- baseline: SGEMM

/// t independent C = A * B products (Eigen MatrixXf, noalias), one per thread on its own matrices, in one
/// OpenMP region: the machine's float GEMM rate at t threads, as the kernel uses it (each of its threads runs
/// single-threaded Eigen GEMMs on L2-resident tiles). Each thread repeats its product so that one iteration is
/// ~2^26 flops per thread and the fork/join cost is amortised.
inline void bm_sgemm(benchmark::State& state, Index M, Index N, Index K, int threads) {
  struct Mats {
    Eigen::MatrixXf a, b, c;
  };
  std::vector<Mats> mats(static_cast<std::size_t>(threads));
  const Index reps = std::max<Index>(1, (Index(1) << 25) / (M * N * K));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    Mats& m = mats[std::size_t(t)];  // allocated and touched by the thread that uses them
    m.a = Eigen::MatrixXf::Random(M, K);
    m.b = Eigen::MatrixXf::Random(K, N);
    m.c = Eigen::MatrixXf::Zero(M, N);
  }
  auto run = [&] {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      int t = 0;
#ifdef _OPENMP
      omp_set_num_threads(1);  // Eigen's GEMM must not start threads of its own (the kernel does the same)
      t = omp_get_thread_num();
#endif
      Mats& m = mats[std::size_t(t)];
      for (Index r = 0; r < reps; ++r) {
        m.c.noalias() = m.a * m.b;
        benchmark::DoNotOptimize(m.c.data());
      }
    }
  };
  run();
  WallClock clock;
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_counters(state, Work{0, 2.0 * double(M) * double(N) * double(K) * double(reps) * threads, 0},
               clock.seconds());
}

/// The SGEMM shapes: the kernel's prefill tile (plan_tiles in gqa/detail/flash_fwd.hpp: ~128 stacked query rows,
/// 128 keys per tile, D = 128 inner) and a large 512^3 product for reference; at 1 and 2 threads.
inline void register_sgemm_baselines() {
  const Index shapes[][3] = {{128, 128, kHeadDim}, {512, 512, 512}};
  for (const auto& sh : shapes)
    for (int t : kThreads) {
      const Index M = sh[0], N = sh[1], K = sh[2];
      register_once("baseline/sgemm/M:" + std::to_string(M) + "/N:" + std::to_string(N) + "/K:" +
                        std::to_string(K) + "/threads:" + std::to_string(t),
                    [=](benchmark::State& st) { bm_sgemm(st, M, N, K, t); });
    }
}

/// The body of each benchmark binary's main: registers its benchmarks (register_all), then runs Google Benchmark
/// with the command line.
inline int run_main(int argc, char** argv, void (*register_all)()) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace gqa_bench
