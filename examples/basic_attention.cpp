// basic_attention.cpp — grouped-query, multi-head and multi-query attention with gqa, end to end.
//
//   Q   [B, S, H, D]  H query heads
//   K,V [B, S, G, D]  G key/value heads; query head j uses KV head j / (H/G)
//   out [B, S, H, D]
//
// Each call is compared with gqa::reference_attention (naive, double precision). The program prints a checksum
// of each output and the largest difference, and exits with status 1 if any difference exceeds 1e-4.
//
// Build: link gqa::gqa (see README.md), or from gqa's build tree run build/examples/example_basic_attention.
#include <gqa/gqa.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

namespace {

// Deterministic inputs in [-1, 1] (Tensor::setRandom would also do), so every run prints the same checksums.
void fill(float* data, gqa::Index n, double phase) {
  for (gqa::Index i = 0; i < n; ++i) data[i] = float(std::sin(0.37 * double(i) + phase));
}

template <typename Out>
double checksum(const Out& out) {
  double sum = 0;
  for (gqa::Index i = 0; i < out.size(); ++i) sum += double(out.data()[i]);
  return sum;
}

template <typename Out>
double max_abs_diff(const Out& out, const gqa::Tensor4<double>& ref) {
  double diff = 0;
  for (gqa::Index i = 0; i < out.size(); ++i) diff = std::max(diff, std::fabs(double(out.data()[i]) - ref.data()[i]));
  return diff;
}

bool report(const char* what, double sum, double diff) {
  const bool ok = diff < 1e-4;
  std::printf("%-34s checksum %12.6f   max |out - reference| %.2e  %s\n", what, sum, diff, ok ? "ok" : "MISMATCH");
  return ok;
}

}  // namespace

int main() {
  try {
    const gqa::Index B = 2, S = 64, H = 8, D = 64;
    bool ok = true;

    // 1. GQA, causal: H = 8 query heads share G = 2 KV heads (heads 0-3 use KV head 0, heads 4-7 KV head 1).
    {
      const gqa::Index G = 2;
      gqa::Tensor4<float> q(B, S, H, D), k(B, S, G, D), v(B, S, G, D);
      fill(q.data(), q.size(), 0.0);
      fill(k.data(), k.size(), 1.0);
      fill(v.data(), v.size(), 2.0);

      gqa::AttentionOptions opt;
      opt.causal = true;  // query i sees keys j <= i (bottom-right aligned when Sq != Sk)
      const gqa::Tensor4<float> out = gqa::attention(q, k, v, opt);  // [B, S, H, D]
      ok &= report("GQA  H=8 G=2 causal", checksum(out), max_abs_diff(out, gqa::reference_attention(q, k, v, opt)));
    }

    // 2. MHA: G = H, every query head has its own KV head. gqa::mha checks G == H and writes into `out`.
    {
      gqa::Tensor4<float> q(B, S, H, D), k(B, S, H, D), v(B, S, H, D), out(B, S, H, D);
      fill(q.data(), q.size(), 0.5);
      fill(k.data(), k.size(), 1.5);
      fill(v.data(), v.size(), 2.5);
      gqa::mha(q, k, v, out);
      ok &= report("MHA  H=8 G=8", checksum(out), max_abs_diff(out, gqa::reference_attention(q, k, v)));
    }

    // 3. MQA: G = 1, all query heads share one KV head. gqa::mqa checks G == 1.
    {
      gqa::Tensor4<float> q(B, S, H, D), k(B, S, 1, D), v(B, S, 1, D), out(B, S, H, D);
      fill(q.data(), q.size(), 0.25);
      fill(k.data(), k.size(), 1.25);
      fill(v.data(), v.size(), 2.25);
      gqa::AttentionOptions opt;
      opt.causal = true;
      gqa::mqa(q, k, v, out, opt);
      ok &= report("MQA  H=8 G=1 causal", checksum(out), max_abs_diff(out, gqa::reference_attention(q, k, v, opt)));
    }

    // 4. Zero copy: your own row-major buffers, viewed as Eigen::TensorMap (gqa::Tensor4Map<float> is
    //    Eigen::TensorMap<gqa::Tensor4<float>>). Nothing is copied; the result is written straight into o_buf.
    {
      const gqa::Index G = 4;
      std::vector<float> q_buf(B * S * H * D), k_buf(B * S * G * D), v_buf(B * S * G * D), o_buf(B * S * H * D);
      fill(q_buf.data(), gqa::Index(q_buf.size()), 3.0);
      fill(k_buf.data(), gqa::Index(k_buf.size()), 4.0);
      fill(v_buf.data(), gqa::Index(v_buf.size()), 5.0);
      Eigen::TensorMap<gqa::Tensor4<float>> q(q_buf.data(), B, S, H, D);
      Eigen::TensorMap<gqa::Tensor4<float>> k(k_buf.data(), B, S, G, D);
      Eigen::TensorMap<gqa::Tensor4<float>> v(v_buf.data(), B, S, G, D);
      Eigen::TensorMap<gqa::Tensor4<float>> out(o_buf.data(), B, S, H, D);

      gqa::AttentionOptions opt;
      opt.causal = true;
      gqa::attention(q, k, v, out, opt);
      ok &= report("GQA  H=8 G=4 causal, TensorMap", checksum(out),
                   max_abs_diff(out, gqa::reference_attention(q, k, v, opt)));
    }

    return ok ? 0 : 1;
  } catch (const gqa::invalid_argument& e) {  // bad shapes or options; e.what() starts with "[gqa.<id>]"
    std::fprintf(stderr, "gqa rejected the arguments: %s\n", e.what());
    return 2;
  }
}
