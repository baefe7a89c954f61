// One GQA call through the installed package, checked against the double-precision reference.
// Exit status 0 only if the kernel and the reference agree.
#include <gqa/gqa.hpp>

#ifdef NLOHMANN_JSON_VERSION_MAJOR
#error "gqa/gqa.hpp (gqa::gqa) pulled in nlohmann_json, which only gqa::checkpoint needs"
#endif

#include <cmath>
#include <cstdio>
#include <exception>

int main() {
  try {
    const gqa::Index B = 2, S = 7, H = 4, G = 2, D = 16;
    gqa::Tensor4<float> q(B, S, H, D), k(B, S, G, D), v(B, S, G, D);
    q.setRandom();
    k.setRandom();
    v.setRandom();

    gqa::AttentionOptions opt;
    opt.causal = true;
    const gqa::Tensor4<float> out = gqa::attention(q, k, v, opt);
    const gqa::Tensor4<double> ref = gqa::reference_attention(q, k, v, opt);

    double max_diff = 0;
    for (gqa::Index i = 0; i < out.size(); ++i) max_diff = std::fmax(max_diff, std::fabs(out.data()[i] - ref.data()[i]));
    std::printf("gqa %d.%d.%d find_package consumer: max |out - ref| = %.3g\n", GQA_VERSION_MAJOR, GQA_VERSION_MINOR,
                GQA_VERSION_PATCH, max_diff);
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
