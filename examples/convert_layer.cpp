// Converts one multi-head attention layer to GQA / MQA in memory (gqa/convert.hpp) and shows how far its output
// moves from the MHA layer's, for each number of groups G and each pooling method of the GQA paper's ablation.
//
// The weights are synthetic: every K/V head is a component shared by all heads plus its own noise of the same
// size, so pooling has something to keep. (With fully independent random heads there is nothing to keep and every
// method is equally bad; trained checkpoints lie in between, which is why the paper uptrains after pooling.)
//
//   example_convert_layer              print the table
//   example_convert_layer --save DIR   also save the layer as a one-layer Llama-style checkpoint (config.json and
//                                      model.safetensors, float32) in DIR, to try gqa-convert on
#include "gqa/attention.hpp"
#include "gqa/convert.hpp"
#include "gqa/safetensors.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace {

using Weight = gqa::RowMajorTensor<float, 2>;  // nn.Linear layout [heads*D, hidden]

constexpr gqa::Index B = 1, S = 32, hidden = 64, H = 8, D = 16;

/// x [B*S, hidden] times w^T -> [B, S, heads, D] (what nn.Linear and .view(B, S, heads, D) do).
gqa::Tensor4<float> project(const Weight& x, const Weight& w) {
  const gqa::Index heads = w.dimension(0) / D;
  gqa::Tensor4<float> y(B, S, heads, D);
  for (gqa::Index t = 0; t < B * S; ++t)
    for (gqa::Index r = 0; r < heads * D; ++r) {
      float acc = 0.f;
      for (gqa::Index i = 0; i < hidden; ++i) acc += x(t, i) * w(r, i);
      y(t / S, t % S, r / D, r % D) = acc;
    }
  return y;
}

/// Synthetic projection: a shared head plus per-head noise of the same scale, in [H*D, hidden].
Weight correlated_heads(std::mt19937& rng, float noise) {
  std::normal_distribution<float> n(0.f, 1.f / std::sqrt(float(hidden)));
  Weight shared(D, hidden), w(H * D, hidden);
  for (gqa::Index i = 0; i < shared.size(); ++i) shared.data()[i] = n(rng);
  for (gqa::Index r = 0; r < H * D; ++r)
    for (gqa::Index i = 0; i < hidden; ++i) w(r, i) = shared(r % D, i) + noise * n(rng);
  return w;
}

/// Writes the layer (plus embedding, norms and head, so the checkpoint looks like a real one) in Hugging Face's
/// Llama layout. The weights are views into the caller's tensors; Writer::write copies them into the file.
void save_checkpoint(const std::filesystem::path& dir, const Weight& wq, const Weight& wk, const Weight& wv,
                     const Weight& wo) {
  namespace st = gqa::safetensors;
  constexpr gqa::Index vocab = 32;
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"model_type\": \"llama\",\n"
                                     << "  \"hidden_size\": " << hidden << ",\n  \"num_attention_heads\": " << H
                                     << ",\n  \"num_key_value_heads\": " << H << ",\n  \"head_dim\": " << D
                                     << ",\n  \"num_hidden_layers\": 1,\n  \"vocab_size\": " << vocab
                                     << ",\n  \"torch_dtype\": \"float32\"\n}\n";
  std::ofstream(dir / "tokenizer_config.json") << "{}\n";
  std::mt19937 rng(1);
  std::normal_distribution<float> n(0.f, 0.02f);
  std::vector<float> embed(vocab * hidden), head(vocab * hidden), ones(hidden, 1.f);
  for (auto& x : embed) x = n(rng);
  for (auto& x : head) x = n(rng);
  auto view = [](const Weight& w) { return gqa::span<const float>(w.data(), w.size()); };
  st::Writer writer;  // __metadata__ {"format": "pt"}
  writer.add<float>("model.embed_tokens.weight", {vocab, hidden}, embed);
  writer.add<float>("model.layers.0.input_layernorm.weight", {hidden}, ones);
  writer.add<float>("model.layers.0.self_attn.q_proj.weight", {H * D, hidden}, view(wq));
  writer.add<float>("model.layers.0.self_attn.k_proj.weight", {H * D, hidden}, view(wk));
  writer.add<float>("model.layers.0.self_attn.v_proj.weight", {H * D, hidden}, view(wv));
  writer.add<float>("model.layers.0.self_attn.o_proj.weight", {hidden, H * D}, view(wo));
  writer.add<float>("model.norm.weight", {hidden}, ones);
  writer.add<float>("lm_head.weight", {vocab, hidden}, head);
  writer.write(dir / "model.safetensors");
}

double relative_difference(const gqa::Tensor4<float>& a, const gqa::Tensor4<float>& b) {
  double num = 0, den = 0;
  for (gqa::Index i = 0; i < a.size(); ++i) {
    const double d = double(a.data()[i]) - double(b.data()[i]);
    num += d * d;
    den += double(b.data()[i]) * double(b.data()[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  if (!(argc == 1 || (argc == 3 && std::strcmp(argv[1], "--save") == 0))) {
    std::fprintf(stderr, "usage: %s [--save DIR]\n", argv[0]);
    return 2;
  }
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.f, 1.f);
  Weight x(B * S, hidden);
  for (gqa::Index i = 0; i < x.size(); ++i) x.data()[i] = n(rng);
  const Weight wq = correlated_heads(rng, 1.f), wk = correlated_heads(rng, 1.f), wv = correlated_heads(rng, 1.f);

  gqa::AttentionOptions causal;
  causal.causal = true;
  const auto q = project(x, wq);
  const gqa::Tensor4<float> mha = gqa::attention(q, project(x, wk), project(x, wv), causal);

  std::printf("one attention layer: H = %ld query heads, D = %ld, hidden = %ld, %ld tokens, causal\n", long(H),
              long(D), long(hidden), long(S));
  std::printf("relative L2 difference of the output from MHA's, ||out_G - out_MHA|| / ||out_MHA||\n\n");
  std::printf("%4s %10s %12s %12s %12s\n", "G", "kind", "mean", "first", "random");
  for (gqa::Index g : {H, H / 2, H / 4, gqa::Index(1)}) {
    std::printf("%4ld %10s", long(g), g == H ? "MHA" : g == 1 ? "MQA" : "GQA");
    for (gqa::PoolMethod m : {gqa::PoolMethod::mean, gqa::PoolMethod::first, gqa::PoolMethod::random}) {
      gqa::ConvertOptions opt;
      opt.method = m;
      opt.seed = 7;
      const Weight k = gqa::pool_heads(wk, H, g, opt);  // [g*D, hidden]
      opt.seed = 8;
      const Weight v = gqa::pool_heads(wv, H, g, opt);
      const gqa::Tensor4<float> out = gqa::attention(q, project(x, k), project(x, v), causal);
      std::printf(" %12.4f", relative_difference(out, mha));
    }
    std::printf("\n");
  }

  // The reverse is exact: expanding the G = 2 layer back to H heads and pooling again gives the same weights.
  const Weight k2 = gqa::pool_heads(wk, H, 2);
  const Weight round_trip = gqa::pool_heads(gqa::expand_heads(k2, 2, H), H, 2);
  bool same = true;
  for (gqa::Index i = 0; i < k2.size(); ++i) same = same && k2.data()[i] == round_trip.data()[i];
  std::printf("(random draws new K/V heads with the original weights' standard deviation, even at G = H)\n");
  std::printf("\nexpand G = 2 -> %ld heads -> pool back to 2: %s\n", long(H), same ? "bit-identical" : "DIFFERENT");

  if (argc == 3) {
    // The MHA layer as a checkpoint; o_proj [hidden, H*D] is synthetic like the rest.
    Weight wo(hidden, H * D);
    std::normal_distribution<float> small(0.f, 1.f / std::sqrt(float(H * D)));
    for (gqa::Index i = 0; i < wo.size(); ++i) wo.data()[i] = small(rng);
    save_checkpoint(argv[2], wq, wk, wv, wo);
    std::printf("saved the MHA layer as a one-layer Llama-style checkpoint in %s\n", argv[2]);
  }
  return same ? 0 : 1;
}
