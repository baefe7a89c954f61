// bench/bench_linear.cpp — the decoder's products (examples/model/linear.hpp) at SmolLM2-135M's shapes, with
// float, bf16 and half weights, against Eigen's own threaded GEMM on float weights (the decoder's prefill before
// 16-bit weights) and the machine's SGEMM (bench_common.hpp's baseline/sgemm).
//
// Names (bench/README.md):
//   linear/out:<rows>/in:<cols>/S:<tokens>/weights:<f32|bf16|f16>/threads:<t>   llama::detail::linear, Y = X W^T
//   baseline/eigen_gemm/M:<S>/N:<rows>/K:<cols>/threads:<t>                     Eigen Y = X W^T, Eigen-threaded
//   baseline/sgemm/M:512/N:512/K:512/threads:<t>
// Counters: GFLOPs (2 * S * rows * cols per product) for S > 1; for S = 1 (decode, memory-bound) kv_bytes is the
// weight's bytes and GBps their rate (the counter names are bench_common.hpp's).
#include "../examples/model/linear.hpp"

#include "bench_common.hpp"

#include <string>
#include <vector>

namespace {

using gqa::Index;
using gqa_bench::WallClock;

// q/k/v concatenated, gate/up concatenated (as one group each in the decoder), down, and lm_head (tied embedding).
const Index kShapes[][2] = {{960, 576}, {3072, 576}, {576, 1536}, {49152, 576}};
const Index kTokens[] = {1, 512};
const llama::WeightType kTypes[] = {llama::WeightType::f32, llama::WeightType::bf16, llama::WeightType::f16};

struct Weights {
  std::vector<float> f32;
  std::vector<gqa::bfloat16> bf16;
  std::vector<gqa::half> f16;
  llama::Linear L;
  Weights(Index rows, Index cols, llama::WeightType type) {
    f32.resize(size_t(rows * cols));
    gqa_bench::fill_uniform(f32.data(), f32.size(), 1);
    for (float& x : f32) x *= 0.05f;
    L.rows = rows, L.cols = cols, L.type = type, L.weight = f32.data();
    if (type == llama::WeightType::bf16) {
      for (float x : f32) bf16.emplace_back(x);
      L.weight = bf16.data();
      std::vector<float>().swap(f32);
    } else if (type == llama::WeightType::f16) {
      for (float x : f32) f16.emplace_back(x);
      L.weight = f16.data();
      std::vector<float>().swap(f32);
    }
  }
};

llama::Matrix input(Index S, Index cols) {
  llama::Matrix X(S, cols);
  gqa_bench::fill_uniform(X.data(), size_t(X.size()), 2);
  return X;
}

void bm_linear(benchmark::State& state, Index rows, Index cols, Index S, llama::WeightType type, int threads) {
  omp_set_num_threads(threads);
  const Weights w(rows, cols, type);
  const llama::Matrix X = input(S, cols);
  llama::Matrix Y;
  llama::detail::linear(X, {{w.L, Y}});  // warm: first touch of Y, pages of the weight
  WallClock clock;
  for (auto _ : state) {
    llama::detail::linear(X, {{w.L, Y}});
    benchmark::DoNotOptimize(Y.data());
  }
  const double flops = 2.0 * double(S) * double(rows) * double(cols);
  gqa_bench::set_counters(state, S == 1 ? gqa_bench::Work{double(w.L.bytes()), 0, 0} : gqa_bench::Work{0, flops, 0},
                          clock.seconds());
}

void bm_eigen_gemm(benchmark::State& state, Index rows, Index cols, Index S, int threads) {
  omp_set_num_threads(threads);  // Eigen threads its GEMM with OpenMP's count
  const Weights w(rows, cols, llama::WeightType::f32);
  const llama::Matrix X = input(S, cols);
  llama::Matrix Y(S, rows);
  Y.noalias() = X * w.L.w().transpose();
  WallClock clock;
  for (auto _ : state) {
    Y.noalias() = X * w.L.w().transpose();
    benchmark::DoNotOptimize(Y.data());
  }
  gqa_bench::set_counters(state, {0, 2.0 * double(S) * double(rows) * double(cols), 0}, clock.seconds());
}

void register_all() {
  for (const auto& sh : kShapes)
    for (const Index S : kTokens) {
      if (sh[0] == 49152 && S > 1) continue;  // lm_head runs on the last position only
      for (const int t : gqa_bench::kThreads) {
        const std::string shape = "out:" + std::to_string(sh[0]) + "/in:" + std::to_string(sh[1]) + "/S:" +
                                  std::to_string(S);
        for (const llama::WeightType type : kTypes)
          gqa_bench::register_once("linear/" + shape + "/weights:" + llama::weight_type_name(type) + "/threads:" +
                                       std::to_string(t),
                                   [=](benchmark::State& st) { bm_linear(st, sh[0], sh[1], S, type, t); });
        if (S > 1)
          gqa_bench::register_once("baseline/eigen_gemm/M:" + std::to_string(S) + "/N:" + std::to_string(sh[0]) +
                                       "/K:" + std::to_string(sh[1]) + "/threads:" + std::to_string(t),
                                   [=](benchmark::State& st) { bm_eigen_gemm(st, sh[0], sh[1], S, t); });
      }
    }
  gqa_bench::register_sgemm_baselines();
}

}  // namespace

int main(int argc, char** argv) { return gqa_bench::run_main(argc, argv, register_all); }
