// The gqa::checkpoint consumer (both packaging modes): pools a projection's K heads (gqa::gqa's conversion math),
// writes it as a safetensors file and reads it back (gqa::checkpoint's I/O). Exit status 0 only if the bytes
// read back are the pooled values, each the mean of its group's heads.
#include <gqa/checkpoint.hpp>
#include <gqa/convert.hpp>
#include <gqa/safetensors.hpp>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <vector>

int main(int argc, char** argv) {
  try {
    const gqa::Index H = 4, G = 2, D = 3, hidden = 5;  // [H*D, hidden] -> [G*D, hidden]
    std::vector<float> in(std::size_t(H * D * hidden)), out(std::size_t(G * D * hidden));
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7) - 3.0f;
    gqa::pool_heads<float>(in, {gqa::WeightLayout::linear, H, D, hidden}, G, out);

    const std::filesystem::path path =
        std::filesystem::path(argc > 1 ? argv[1] : ".") / "gqa_packaging_consumer.safetensors";
    const auto* bytes = reinterpret_cast<const std::byte*>(out.data());
    gqa::safetensors::TensorView t;
    t.name = "k_proj.weight";
    t.dtype = gqa::safetensors::Dtype::F32;
    t.shape = {G * D, hidden};
    t.bytes = {bytes, static_cast<gqa::Index>(out.size() * sizeof(float))};
    gqa::safetensors::save(path, {t});
    const auto file = gqa::safetensors::File::open(path);
    const auto back = file.at("k_proj.weight").to_vector<float>();
    std::filesystem::remove(path);

    // Row r of group g is the mean of row r of heads 2g and 2g+1 (linear layout: head h is rows h*D .. h*D+D-1).
    double max_diff = back.size() == out.size() ? 0.0 : 1.0;
    for (gqa::Index g = 0; g < G && back.size() == out.size(); ++g)
      for (gqa::Index e = 0; e < D * hidden; ++e) {
        const double mean = 0.5 * (double(in[std::size_t((2 * g) * D * hidden + e)]) +
                                   double(in[std::size_t((2 * g + 1) * D * hidden + e)]));
        max_diff = std::fmax(max_diff, std::fabs(double(back[std::size_t(g * D * hidden + e)]) - mean));
      }
    std::printf("gqa::checkpoint consumer: %zu values written and read back, max |read - mean| = %.3g\n",
                back.size(), max_diff);
    return max_diff < 1e-6 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "exception: %s\n", e.what());
    return 2;
  }
}
