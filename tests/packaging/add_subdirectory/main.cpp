// One MQA call on zero-copy TensorMaps through gqa vendored with add_subdirectory, checked against the
// double-precision reference. Exit status 0 only if they agree.
#include <gqa/gqa.hpp>

#ifdef NLOHMANN_JSON_VERSION_MAJOR
#error "gqa/gqa.hpp (gqa::gqa) pulled in nlohmann_json, which only gqa::checkpoint needs"
#endif

#include <cmath>
#include <cstdio>
#include <exception>
#include <vector>

int main() {
  try {
    const gqa::Index B = 1, Sq = 3, Sk = 9, H = 4, G = 1, D = 8;
    std::vector<float> qb(B * Sq * H * D), kb(B * Sk * G * D), vb(B * Sk * G * D), ob(B * Sq * H * D);
    for (std::size_t i = 0; i < qb.size(); ++i) qb[i] = float(std::sin(0.37 * double(i)));
    for (std::size_t i = 0; i < kb.size(); ++i) kb[i] = float(std::cos(0.11 * double(i)));
    for (std::size_t i = 0; i < vb.size(); ++i) vb[i] = float(std::sin(0.05 * double(i) + 1.0));
    gqa::Tensor4Map<float> q(qb.data(), B, Sq, H, D), k(kb.data(), B, Sk, G, D), v(vb.data(), B, Sk, G, D),
        out(ob.data(), B, Sq, H, D);

    gqa::AttentionOptions opt;
    opt.causal = true;  // bottom-right aligned: query i sees keys j <= i + (Sk - Sq)
    gqa::mqa(q, k, v, out, opt);
    const gqa::Tensor4<double> ref = gqa::reference_attention(q, k, v, opt);

    double max_diff = 0;
    for (std::size_t i = 0; i < ob.size(); ++i) max_diff = std::fmax(max_diff, std::fabs(ob[i] - ref.data()[i]));
    std::printf("gqa add_subdirectory consumer: max |out - ref| = %.3g\n", max_diff);
    if (!(max_diff < 1e-4)) {
      std::fprintf(stderr, "mismatch against gqa::reference_attention\n");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "exception: %s\n", e.what());
    return 2;
  }
}
