// bench/bench_prefill.cpp — prefill (Sq = Sk = S) attention, next to the machine's GEMM rate and the naive
// reference, for the G comparison of bench/compare_g.sh.
//
// Benchmarks (names are `key:value` fields; see bench/README.md and bench_common.hpp):
//   prefill/H:32/G:<g>/D:128/S:<s>/kv:<f32|bf16|f16>/threads:<1|2>/causal:<0|1>
//       gqa::attention(q [1, S, 32, 128] float, k, v [1, S, G, 128] of kv, out, causal, num_threads = t).
//       G in {32, 16, 8, 4, 2, 1}, S in {512, 1024, 2048, 4096}.
//   prefill/H:32/G:8/D:128/S:32768/kv:f32/threads:<1|2>/causal:1
//   prefill-sinks-alibi/H:32/G:8/D:128/S:2048/kv:f32/threads:<1|2>/causal:1
//       with options.sinks (all 0.5) and options.alibi_slopes = gqa::alibi_slopes(32): what they cost.
//       the memory run: one iteration of ~9 TFLOP (minutes); peak_rss_mb shows that nothing S x S is allocated
//       (qkvo_mb is the size of Q, K, V and O; sxs_mb the size one S x S float score matrix would have).
//       Run it alone (peak_rss_mb is the process's high-water mark).
//   prefill/H:4/G:1/D:128/S:2048/kv:f32/threads:<1|2>/causal:<0|1>
//       our kernel at the reduced shape of the reference below.
//   reference/prefill/H:4/G:1/D:128/S:2048/kv:f32/threads:1/causal:<0|1>
//   reference/prefill/H:32/G:<g>/D:128/S:512/kv:f32/threads:1/causal:1
//       gqa::reference_attention (double, repeat_kv, full score matrix, one thread): seconds per iteration, so
//       Google Benchmark runs one iteration (no Iterations(1), which would change the name).
//   baseline/sgemm/M:<m>/N:<n>/K:<k>/threads:<t>
//       t independent Eigen SGEMMs: the machine's float compute rate at t threads; M:128/N:128/K:128 is the
//       kernel's tile (128 stacked query rows x 128 keys x D).
// Counters: GFLOPs (useful flops: 4*S*S*D*H, or 2*S*S*D*H when causal), tokens_per_s (S / time), kv_bytes
// (2*S*G*D*sizeof(kv): the K/V a prefill produces and reads), GBps (kv_bytes / time), peak_rss_mb, qkvo_mb,
// sxs_mb.
//
// Every benchmark is registered; pick with --benchmark_filter (a regex), e.g.
//   bench_prefill --benchmark_filter='^prefill/H:32/G:8/D:128/S:4096/kv:f32/threads:2/causal:1$'
// The whole grid takes a long time; bench/compare_g.sh runs the subset of the G comparison.
#include "bench_common.hpp"

#include <unsupported/Eigen/CXX11/Tensor>

namespace gqa_bench {
namespace {

/// Q, K, V (token-major, as a projection produces them) and O of one prefill, reused across threads/causal.
template <typename T>
struct PrefillSetup : Reusable {
  gqa::Tensor4<float> q, out;  // [B, S, H, D]
  gqa::Tensor4<T> k, v;        // [B, S, G, D]

  explicit PrefillSetup(const Shape& s)
      : q(s.B, s.S, s.H, s.D), out(s.B, s.S, s.H, s.D), k(s.B, s.S, s.G, s.D), v(s.B, s.S, s.G, s.D) {
    fill_uniform(q.data(), std::size_t(q.size()), 11);
    fill_uniform(k.data(), std::size_t(k.size()), 12);
    fill_uniform(v.data(), std::size_t(v.size()), 13);
    out.setZero();  // touched now, so page faults stay out of the timed loop
  }
  double qkvo_bytes() const {
    return double(q.size() + out.size()) * sizeof(float) + double(k.size() + v.size()) * sizeof(T);
  }
};

template <typename T>
PrefillSetup<T>& prefill_setup(const Shape& s) {
  return reuse<PrefillSetup<T>>(attn_name("prefill-setup", s, kv_name<T>(), 0),
                                [&] { return std::make_unique<PrefillSetup<T>>(s); });
}

template <typename T>
Work prefill_work(const Shape& s, bool causal) {
  const double ss = double(s.S) * double(s.S);
  return Work{2.0 * double(s.B * s.S * s.G * s.D) * sizeof(T), (causal ? 2.0 : 4.0) * double(s.B) * ss * s.D * s.H,
              double(s.B * s.S)};
}

template <typename T>
void set_memory_counters(benchmark::State& state, const Shape& s, const PrefillSetup<T>& setup) {
  constexpr double kMiB = 1024.0 * 1024.0;
  state.counters["peak_rss_mb"] = peak_rss_mb();
  state.counters["qkvo_mb"] = setup.qkvo_bytes() / kMiB;
  state.counters["sxs_mb"] = double(s.S) * double(s.S) * sizeof(float) / kMiB;
}

template <typename T>
void bm_prefill(benchmark::State& state, Shape s, int threads, bool causal, bool sinks_and_alibi = false) {
  auto& setup = prefill_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.causal = causal;
  opt.num_threads = threads;
  const std::vector<float> sinks(std::size_t(s.H), 0.5f), slopes = gqa::alibi_slopes(s.H);
  if (sinks_and_alibi) opt.sinks = sinks, opt.alibi_slopes = slopes;
  WallClock clock;  // no warm-up call: one call is seconds at S = 4096 and minutes at S = 32768
  for (auto _ : state) {
    gqa::attention(setup.q, setup.k, setup.v, setup.out, opt);
    benchmark::ClobberMemory();
  }
  set_counters(state, prefill_work<T>(s, causal), clock.seconds());
  set_memory_counters(state, s, setup);
}

void bm_reference_prefill(benchmark::State& state, Shape s, bool causal) {
  auto& setup = prefill_setup<float>(s);
  gqa::AttentionOptions opt;
  opt.causal = causal;
  WallClock clock;
  for (auto _ : state) {
    auto out = gqa::reference_attention(setup.q, setup.k, setup.v, opt);
    benchmark::DoNotOptimize(out.data());
  }
  set_counters(state, prefill_work<float>(s, causal), clock.seconds());
  set_memory_counters(state, s, setup);
}

template <typename T>
void register_prefill(const Shape& s, const std::vector<int>& causal_values = {1, 0}) {
  for (int c : causal_values)
    for (int t : kThreads)
      register_once(attn_name("prefill", s, kv_name<T>(), t, c),
                    [s, t, c](benchmark::State& st) { bm_prefill<T>(st, s, t, c != 0); });
}

void register_reference(const Shape& s, int causal) {
  register_once(attn_name("reference/prefill", s, "f32", 1, causal),
                [s, causal](benchmark::State& st) { bm_reference_prefill(st, s, causal != 0); });
}

void register_all() {
  register_sgemm_baselines();
  for (Index S : {512, 1024, 2048, 4096})
    for (Index G : kGroups) {
      const Shape s{1, kHeads, G, kHeadDim, S};
      register_prefill<float>(s);
      register_prefill<gqa::bfloat16>(s);
      register_prefill<gqa::half>(s);
      if (S == 2048 && G == 8)
        for (int t : kThreads)
          register_once(attn_name("prefill-sinks-alibi", s, kv_name<float>(), t, 1),
                        [s, t](benchmark::State& st) { bm_prefill<float>(st, s, t, true, true); });
    }
  // The reference at a reduced head count (it is O(S^2) in memory and seconds per call), right after our kernel
  // at the same shape so that they share the set-up.
  for (int c : {1, 0}) {
    const Shape small{1, 4, 1, kHeadDim, 2048};
    register_prefill<float>(small, {c});
    register_reference(small, c);
  }
  for (Index G : kGroups) register_reference(Shape{1, kHeads, G, kHeadDim, 512}, 1);
  // The memory run: S = 32768 with no S x S buffer anywhere.
  register_prefill<float>(Shape{1, kHeads, 8, kHeadDim, 32768}, {1});
}

}  // namespace
}  // namespace gqa_bench

int main(int argc, char** argv) { return gqa_bench::run_main(argc, argv, gqa_bench::register_all); }
