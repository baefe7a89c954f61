// bench/ggml_peer.cpp — times ggml's ggml_flash_attn_ext on the CPU, for bench/peers.py (optional tooling: not
// built by CMake, never a test). peers.py compiles it against a ggml build the user names (--ggml DIR: a ggml
// source tree built with CMake into DIR/build) and runs it beside bench_decode / bench_prefill.
//
//   ggml_peer decode  H G D Sk  TYPE THREADS REPS   one query token against Sk cached tokens
//   ggml_peer prefill H G D S   TYPE THREADS REPS   causal self-attention of S tokens (an f16 -inf mask)
//
// TYPE is the K/V type: f32, f16 or q8_0 (ggml's int8 blocks: 32 values and one f16 scale). Q is f32, as
// llama.cpp passes it. K and V are head-major and contiguous, [D, Sk, G] in ggml's order (the layout of gqa's
// KVCache), filled with uniform [-1, 1) values. Prints one line: "ggml <mode> ... median_ms=<ms> min_ms=<ms>",
// the median and minimum of REPS timed graph computations after one warm-up, and max_err, the largest difference
// from a double-precision reference on two heads of the last query row; exits 1 if it exceeds 1e-2.
#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

void fill(ggml_tensor* t, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t n_per_row = t->ne[0], rows = ggml_nrows(t);
  std::vector<float> row(static_cast<size_t>(n_per_row));
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& x : row) x = u(rng);
    char* dst = static_cast<char*>(t->data) + r * t->nb[1];  // contiguous: row r of the flattened rows
    if (t->type == GGML_TYPE_F32) {
      std::memcpy(dst, row.data(), row.size() * sizeof(float));
    } else if (t->type == GGML_TYPE_F16) {
      ggml_fp32_to_fp16_row(row.data(), reinterpret_cast<ggml_fp16_t*>(dst), n_per_row);
    } else {
      ggml_quantize_chunk(t->type, row.data(), dst, 0, 1, n_per_row, nullptr);
    }
  }
}

ggml_type parse_type(const std::string& s) {
  if (s == "f32") return GGML_TYPE_F32;
  if (s == "f16") return GGML_TYPE_F16;
  if (s == "q8_0") return GGML_TYPE_Q8_0;
  std::fprintf(stderr, "ggml_peer: TYPE must be f32, f16 or q8_0, not '%s'\n", s.c_str());
  std::exit(2);
}

/// Row `row` of t (a [D, rows, heads] tensor, contiguous) as floats, dequantised as ggml stores it.
std::vector<float> row_values(const ggml_tensor* t, int64_t row) {
  std::vector<float> out(static_cast<size_t>(t->ne[0]));
  const char* src = static_cast<const char*>(t->data) + row * t->nb[1];
  if (t->type == GGML_TYPE_F32)
    std::memcpy(out.data(), src, out.size() * sizeof(float));
  else
    ggml_get_type_traits(t->type)->to_float(src, out.data(), t->ne[0]);
  return out;
}

/// max |out - reference| over head `h` of the last query row (which sees every key), in double from the values as
/// stored (f16 / q8_0 K/V dequantised): a misconfigured call (layout, mask, head mapping) shows here.
double check(const ggml_tensor* q, const ggml_tensor* k, const ggml_tensor* v, const ggml_tensor* out, int64_t h) {
  const int64_t D = q->ne[0], Sq = q->ne[1], H = q->ne[2], Sk = k->ne[1], G = k->ne[2], g = h / (H / G);
  const std::vector<float> qv = row_values(q, h * Sq + Sq - 1);
  std::vector<double> s(static_cast<size_t>(Sk)), acc(static_cast<size_t>(D), 0.0);
  double mx = -INFINITY, sum = 0;
  for (int64_t j = 0; j < Sk; ++j) {
    const std::vector<float> kv = row_values(k, g * Sk + j);
    double dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += double(qv[size_t(d)]) * kv[size_t(d)];
    s[size_t(j)] = dot / std::sqrt(double(D));
    mx = std::max(mx, s[size_t(j)]);
  }
  for (int64_t j = 0; j < Sk; ++j) {
    const double p = std::exp(s[size_t(j)] - mx);
    sum += p;
    const std::vector<float> vv = row_values(v, g * Sk + j);
    for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += p * vv[size_t(d)];
  }
  const float* o = static_cast<const float*>(out->data) + (Sq - 1) * H * D + h * D;  // res [D, H, Sq]
  double err = 0;
  for (int64_t d = 0; d < D; ++d) err = std::max(err, std::fabs(o[d] - acc[size_t(d)] / sum));
  return err;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9 || (std::string(argv[1]) != "decode" && std::string(argv[1]) != "prefill")) {
    std::fprintf(stderr, "usage: ggml_peer decode|prefill H G D S TYPE THREADS REPS\n");
    return 2;
  }
  const std::string mode = argv[1];
  const int64_t H = std::atol(argv[2]), G = std::atol(argv[3]), D = std::atol(argv[4]), S = std::atol(argv[5]);
  const ggml_type kv_type = parse_type(argv[6]);
  const int threads = std::atoi(argv[7]), reps = std::atoi(argv[8]);
  if (H <= 0 || G <= 0 || H % G != 0 || D <= 0 || S <= 0 || threads <= 0 || reps <= 0) {
    std::fprintf(stderr, "ggml_peer: need H, G, D, S, THREADS, REPS > 0 and G dividing H\n");
    return 2;
  }
  const bool decode = mode == "decode";
  const int64_t Sq = decode ? 1 : S, Sk = S;

  const size_t kv_bytes = ggml_row_size(kv_type, D) * size_t(Sk * G);
  const size_t mem = size_t(Sq * H * D) * 4 * 2 + 2 * kv_bytes + size_t(Sk * Sq) * 2 + (64u << 20);
  ggml_init_params params{mem, nullptr, false};
  ggml_context* ctx = ggml_init(params);
  if (!ctx) {
    std::fprintf(stderr, "ggml_peer: ggml_init of %zu bytes failed\n", mem);
    return 1;
  }
  ggml_tensor* q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, Sq, H);
  ggml_tensor* k = ggml_new_tensor_3d(ctx, kv_type, D, Sk, G);
  ggml_tensor* v = ggml_new_tensor_3d(ctx, kv_type, D, Sk, G);
  std::mt19937 rng(7);
  fill(q, rng);
  fill(k, rng);
  fill(v, rng);
  ggml_tensor* mask = nullptr;
  if (!decode) {  // causal: key j visible to query i iff j <= i
    mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, Sk, Sq);
    auto* m = static_cast<ggml_fp16_t*>(mask->data);
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t j = 0; j < Sk; ++j) m[i * Sk + j] = ggml_fp32_to_fp16(j <= i ? 0.0f : -INFINITY);
  }
  ggml_tensor* out = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f / std::sqrt(float(D)), 0.0f, 0.0f);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_build_forward_expand(graph, out);

  std::vector<double> ms;
  for (int r = 0; r <= reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (ggml_graph_compute_with_ctx(ctx, graph, threads) != GGML_STATUS_SUCCESS) {
      std::fprintf(stderr, "ggml_peer: graph compute failed\n");
      return 1;
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (r > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());  // r = 0: warm-up
  }
  const double err = std::max(check(q, k, v, out, 0), check(q, k, v, out, H - 1));
  std::sort(ms.begin(), ms.end());
  std::printf("ggml %s H=%lld G=%lld D=%lld S=%lld kv=%s threads=%d median_ms=%.4f min_ms=%.4f max_err=%.3g\n",
              mode.c_str(), (long long)H, (long long)G, (long long)D, (long long)S, argv[6], threads,
              ms[ms.size() / 2], ms.front(), err);
  ggml_free(ctx);
  return err < 1e-2 ? 0 : 1;  // ggml rounds Q to f16 for f16 K: ~1e-3 here
}
