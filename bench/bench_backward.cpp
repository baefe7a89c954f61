// bench/bench_backward.cpp — gqa::attention_backward next to the forward on the same shape and the machine's
// GEMM rate, all in one run.
//
// Benchmarks (names are `key:value` fields; see bench/README.md and bench_common.hpp):
//   backward/H:32/G:<g>/D:128/S:<s>/kv:f32/threads:<1|2>/causal:<0|1>
//       gqa::attention_backward(q [1, S, 32, 128] float, k, v [1, S, G, 128], out, d_out -> d_q, d_k, d_v), with
//       options.lse from the forward (so no lse pass). G in {32, 8, 1}, S in {512, 2048}.
//   forward/H:32/G:<g>/D:128/S:<s>/kv:f32/threads:<t>/causal:<c>
//       gqa::attention on the same tensors (writing the lse the backward reads): the time the backward is
//       compared with.
//   baseline/sgemm/M:<m>/N:<n>/K:<k>/threads:<t>      as in bench_prefill (bench_common.hpp).
// Counters:
//   GFLOPs        useful flops / time: backward 5 products of 2*S*S*D*H each (half of that when causal), forward
//                 2 such products; the recomputation of S and the element-wise work are not counted
//   vs_forward    (backward only) backward time / forward time, the forward timed in the same benchmark right
//                 before the backward's timed loop (same tensors, threads and warm caches)
//   vs_sgemm      GFLOPs / the same-run SGEMM rate at the kernel's tile shape (M = N = K = 128) and thread count
//   tokens_per_s  S / time
//
// Example: bench_backward --benchmark_filter='^(backward|forward)/H:32/G:8/D:128/S:2048/kv:f32/threads:2/causal:1$'
#include "bench_common.hpp"

#include <gqa/attention_backward.hpp>

#include <map>

namespace gqa_bench {
namespace {

/// Q, K, V, O, dO and the gradients of one shape, with the forward's lse.
struct BackwardSetup : Reusable {
  gqa::Tensor4<float> q, out, d_out, d_q;  // [1, S, H, D]
  gqa::Tensor4<float> k, v, d_k, d_v;      // [1, S, G, D]
  std::vector<float> lse;                  // [H, S]

  explicit BackwardSetup(const Shape& s)
      : q(s.B, s.S, s.H, s.D), out(s.B, s.S, s.H, s.D), d_out(s.B, s.S, s.H, s.D), d_q(s.B, s.S, s.H, s.D),
        k(s.B, s.S, s.G, s.D), v(s.B, s.S, s.G, s.D), d_k(s.B, s.S, s.G, s.D), d_v(s.B, s.S, s.G, s.D),
        lse(size_t(s.B * s.H * s.S)) {
    fill_uniform(q.data(), std::size_t(q.size()), 21);
    fill_uniform(k.data(), std::size_t(k.size()), 22);
    fill_uniform(v.data(), std::size_t(v.size()), 23);
    fill_uniform(d_out.data(), std::size_t(d_out.size()), 24);
    out.setZero();  // touched now, so page faults stay out of the timed loops
    d_q.setZero();
    d_k.setZero();
    d_v.setZero();
  }
};

BackwardSetup& backward_setup(const Shape& s) {
  return reuse<BackwardSetup>(attn_name("backward-setup", s, "f32", 0),
                              [&] { return std::make_unique<BackwardSetup>(s); });
}

/// 2*S*S*D*H per attention-sized product, half of it when causal.
double product_flops(const Shape& s, bool causal) {
  return (causal ? 1.0 : 2.0) * double(s.B) * double(s.S) * double(s.S) * double(s.D) * double(s.H);
}

/// The same-run SGEMM rate (GFLOP/s) at the tile shape 128^3 and `threads` threads, measured once per thread count
/// for ~0.5 s with bm_sgemm's loop.
double sgemm_gflops(int threads) {
  static std::map<int, double> rate;
  auto it = rate.find(threads);
  if (it != rate.end()) return it->second;
  const Index n = 128;
  const auto nt = std::size_t(threads);
  std::vector<Eigen::MatrixXf> a(nt), b(nt), c(nt);
  for (int t = 0; t < threads; ++t) {
    a[size_t(t)] = Eigen::MatrixXf::Random(n, n);
    b[size_t(t)] = Eigen::MatrixXf::Random(n, n);
    c[size_t(t)] = Eigen::MatrixXf::Zero(n, n);
  }
  const Index reps = 256;
  auto run = [&] {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      int t = 0;
#ifdef _OPENMP
      omp_set_num_threads(1);
      t = omp_get_thread_num();
#endif
      for (Index r = 0; r < reps; ++r) {
        c[size_t(t)].noalias() = a[size_t(t)] * b[size_t(t)];
        benchmark::DoNotOptimize(c[size_t(t)].data());
      }
    }
  };
  run();
  WallClock clock;
  Index runs = 0;
  while (clock.seconds() < 0.5) {
    run();
    ++runs;
  }
  const double flops = 2.0 * double(n * n * n) * double(reps) * threads * double(runs);
  return rate[threads] = flops / clock.seconds() / 1e9;
}

gqa::AttentionOptions options_for(BackwardSetup& setup, int threads, bool causal) {
  gqa::AttentionOptions opt;
  opt.causal = causal;
  opt.num_threads = threads;
  opt.lse = setup.lse;
  return opt;
}

/// Seconds per forward call, over at least `min_seconds` (the forward also refreshes out and lse).
double time_forward(BackwardSetup& setup, const gqa::AttentionOptions& opt, double min_seconds) {
  gqa::attention(setup.q, setup.k, setup.v, setup.out, opt);  // warm
  WallClock clock;
  int calls = 0;
  do {
    gqa::attention(setup.q, setup.k, setup.v, setup.out, opt);
    ++calls;
  } while (clock.seconds() < min_seconds);
  return clock.seconds() / calls;
}

void bm_forward(benchmark::State& state, Shape s, int threads, bool causal) {
  auto& setup = backward_setup(s);
  const auto opt = options_for(setup, threads, causal);
  gqa::attention(setup.q, setup.k, setup.v, setup.out, opt);
  WallClock clock;
  for (auto _ : state) {
    gqa::attention(setup.q, setup.k, setup.v, setup.out, opt);
    benchmark::ClobberMemory();
  }
  const double seconds = clock.seconds();
  const Work w{0, 2.0 * product_flops(s, causal), double(s.B * s.S)};
  set_counters(state, w, seconds);
  state.counters["vs_sgemm"] = w.flops * double(state.iterations()) / seconds / 1e9 / sgemm_gflops(threads);
}

void bm_backward(benchmark::State& state, Shape s, int threads, bool causal) {
  auto& setup = backward_setup(s);
  const auto opt = options_for(setup, threads, causal);
  const double forward_s = time_forward(setup, opt, 0.5);  // also leaves the matching out and lse
  gqa::attention_backward(setup.q, setup.k, setup.v, setup.out, setup.d_out, setup.d_q, setup.d_k, setup.d_v, opt);
  WallClock clock;
  for (auto _ : state) {
    gqa::attention_backward(setup.q, setup.k, setup.v, setup.out, setup.d_out, setup.d_q, setup.d_k, setup.d_v,
                            opt);
    benchmark::ClobberMemory();
  }
  const double seconds = clock.seconds();
  const Work w{0, 5.0 * product_flops(s, causal), double(s.B * s.S)};
  set_counters(state, w, seconds);
  state.counters["vs_forward"] = seconds / double(state.iterations()) / forward_s;
  state.counters["vs_sgemm"] = w.flops * double(state.iterations()) / seconds / 1e9 / sgemm_gflops(threads);
}

void register_all() {
  register_sgemm_baselines();
  for (Index S : {2048, 512})
    for (Index G : {8, 32, 1})
      for (int c : {1, 0})
        for (int t : kThreads) {
          const Shape s{1, kHeads, G, kHeadDim, S};
          register_once(attn_name("forward", s, "f32", t, c),
                        [=](benchmark::State& st) { bm_forward(st, s, t, c != 0); });
          register_once(attn_name("backward", s, "f32", t, c),
                        [=](benchmark::State& st) { bm_backward(st, s, t, c != 0); });
        }
}

}  // namespace
}  // namespace gqa_bench

int main(int argc, char** argv) { return gqa_bench::run_main(argc, argv, gqa_bench::register_all); }
