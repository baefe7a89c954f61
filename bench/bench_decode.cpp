// bench/bench_decode.cpp — single-token decode against a gqa::KVCache, next to the machine's baselines and the
// naive reference, for the G comparison of bench/compare_g.sh.
//
// Benchmarks (names are `key:value` fields; see bench/README.md and bench_common.hpp):
//   decode/H:32/G:<g>/D:128/S:<s>/kv:<f32|bf16|f16|i8>/threads:<1|2>
//       gqa::attention(q [1, 1, 32, 128] float, KVCache<kv> filled to S tokens, out, num_threads = t); i8 is
//       KVCache<std::int8_t> (per-row float scales, counted in kv_bytes).
//       G in {32, 16, 8, 4, 2, 1}, S in {1024, 2048, 4096, 8192, 16384, 32768}.
//   baseline/stream_read/H:32/G:<g>/D:128/S:<s>/kv:<f32|bf16|f16|i8>/threads:<1|2>
//       OpenMP sum over the K and V storage of that decode's cache (2*S*G*D*sizeof(kv) bytes, and i8's scales):
//       the read bandwidth of exactly the bytes decode reads (DRAM when they exceed the caches, partly L3 when they
//       fit). A separate
//       buffer of the same size is not the same yardstick on a VM: four identical 512 MiB buffers read at 26.5 to
//       32.5 GB/s on the development machine, depending on where their pages landed.
//   baseline/sgemm/M:<m>/N:<n>/K:<k>/threads:<t>
//       t independent Eigen SGEMMs: the machine's float compute rate at t threads.
//   decode-sinks-alibi/H:32/G:8/D:128/S:16384/kv:<f32|bf16>/threads:<1|2>
//       decode with options.sinks (all 0.5) and options.alibi_slopes = gqa::alibi_slopes(32): what they cost.
//   reference/decode/H:32/G:<g>/D:128/S:1024/kv:f32/threads:1
//       gqa::reference_attention (double, repeat_kv, one thread) on the same cache.
// Counters: kv_bytes (2*S*G*D*sizeof(kv) read per token, + 2*S*G*4 for i8's scales), GBps, GFLOPs (4*S*D*H per
// token), tokens_per_s.
// Decode's floor: T_floor = max(kv_bytes / stream GBps, 4*S*D*H / sgemm GFLOPs), same run, same threads.
//
// Every benchmark is registered; pick with --benchmark_filter (a regex), e.g.
//   bench_decode --benchmark_filter='^decode/H:32/G:8/D:128/S:16384/kv:f32/threads:2$'
// The whole grid takes a long time; bench/compare_g.sh runs the subset of the G comparison.
#include "bench_common.hpp"

#include <unsupported/Eigen/CXX11/Tensor>

namespace gqa_bench {
namespace {

/// A cache filled to S tokens and one query token, reused while consecutive benchmarks share (shape, kv).
template <typename T>
struct DecodeSetup : Reusable {
  gqa::KVCache<T> cache;
  gqa::Tensor4<float> q, out;  // [B, 1, H, D]

  explicit DecodeSetup(const Shape& s) : cache(s.B, s.G, s.S, s.D), q(s.B, 1, s.H, s.D), out(s.B, 1, s.H, s.D) {
    fill_uniform(q.data(), std::size_t(q.size()), 1);
    out.setZero();
    // Appended in chunks, as a model would, so the float staging tensors stay small next to the cache.
    const Index chunk = std::min<Index>(s.S, 1024);
    gqa::Tensor4<float> k(s.B, chunk, s.G, s.D), v(s.B, chunk, s.G, s.D);
    for (Index done = 0; done < s.S; done += chunk) {
      fill_uniform(k.data(), std::size_t(k.size()), 1000 + std::uint64_t(done));
      fill_uniform(v.data(), std::size_t(v.size()), 2000 + std::uint64_t(done));
      cache.append(k, v);
    }
  }
};

template <typename T>
DecodeSetup<T>& decode_setup(const Shape& s) {
  return reuse<DecodeSetup<T>>(attn_name("decode-setup", s, kv_name<T>(), 0),
                               [&] { return std::make_unique<DecodeSetup<T>>(s); });
}

template <typename T>
Work decode_work(const Shape& s) {
  return Work{double(s.B * s.S * s.G) * kv_row_pair_bytes<T>(s.D), 4.0 * double(s.B * s.S * s.D * s.H), double(s.B)};
}

template <typename T>
void bm_decode(benchmark::State& state, Shape s, int threads, bool sinks_and_alibi = false) {
  auto& setup = decode_setup<T>(s);
  gqa::AttentionOptions opt;
  opt.num_threads = threads;
  const std::vector<float> sinks(std::size_t(s.H), 0.5f), slopes = gqa::alibi_slopes(s.H);
  if (sinks_and_alibi) opt.sinks = sinks, opt.alibi_slopes = slopes;
  gqa::attention(setup.q, setup.cache, setup.out, opt);  // warm-up: thread pool, caches, first-touch
  WallClock clock;
  for (auto _ : state) {
    gqa::attention(setup.q, setup.cache, setup.out, opt);
    benchmark::ClobberMemory();
  }
  set_counters(state, decode_work<T>(s), clock.seconds());
}

template <typename T>
void bm_stream_decode_cache(benchmark::State& state, Shape s, int threads) {
  auto& setup = decode_setup<T>(s);
  const auto& k = setup.cache.key_storage();  // [B, G, S, D]: capacity S, all of it filled
  const auto& v = setup.cache.value_storage();
  const std::size_t bytes = std::size_t(k.size()) * sizeof(T);
  std::vector<ByteRange> ranges{ByteRange{k.data(), bytes}, ByteRange{v.data(), bytes}};
  if constexpr (std::is_same_v<T, std::int8_t>) {  // the scales, [B, G, S] floats each
    const std::size_t scale_bytes = std::size_t(setup.cache.key_scales().size()) * sizeof(float);
    ranges.push_back(ByteRange{setup.cache.key_scales().data(), scale_bytes});
    ranges.push_back(ByteRange{setup.cache.value_scales().data(), scale_bytes});
  }
  bm_stream_read(state, ranges, threads);
}

void bm_reference_decode(benchmark::State& state, Shape s) {
  auto& setup = decode_setup<float>(s);
  const gqa::TensorRef<const float> q = gqa::make_ref(setup.q);
  WallClock clock;
  for (auto _ : state) {
    auto out = gqa::reference_attention<float, float>(q, setup.cache.keys(), setup.cache.values());
    benchmark::DoNotOptimize(out.data());
  }
  set_counters(state, decode_work<float>(s), clock.seconds());
}

template <typename T>
void register_decode(const Shape& s) {
  // The stream read of this cache goes right before the decodes that read it, so both are measured close together
  // in time on a busy machine (and share the set-up).
  for (int t : kThreads)
    register_once(attn_name("baseline/stream_read", s, kv_name<T>(), t),
                  [s, t](benchmark::State& st) { bm_stream_decode_cache<T>(st, s, t); });
  for (int t : kThreads)
    register_once(attn_name("decode", s, kv_name<T>(), t), [s, t](benchmark::State& st) { bm_decode<T>(st, s, t); });
  if (s.S == 16384 && s.G == 8 && (std::is_same_v<T, float> || std::is_same_v<T, gqa::bfloat16>))
    for (int t : kThreads)
      register_once(attn_name("decode-sinks-alibi", s, kv_name<T>(), t),
                    [s, t](benchmark::State& st) { bm_decode<T>(st, s, t, true); });
}

void register_all() {
  register_sgemm_baselines();
  for (Index S : {1024, 2048, 4096, 8192, 16384, 32768})
    for (Index G : kGroups) {
      const Shape s{1, kHeads, G, kHeadDim, S};
      register_decode<float>(s);
      register_decode<gqa::bfloat16>(s);
      register_decode<gqa::half>(s);
      register_decode<std::int8_t>(s);
    }
  // The naive reference is double and materialises repeat_kv(K, V): a modest S. Our kernel at the same shape
  // is decode/H:32/G:<g>/D:128/S:1024/kv:f32/threads:1 above.
  for (Index G : kGroups) {
    const Shape s{1, kHeads, G, kHeadDim, 1024};
    register_once(attn_name("reference/decode", s, "f32", 1),
                  [s](benchmark::State& st) { bm_reference_decode(st, s); });
  }
}

}  // namespace
}  // namespace gqa_bench

int main(int argc, char** argv) { return gqa_bench::run_main(argc, argv, gqa_bench::register_all); }
