// tests/support/llama_fixture.hpp — a small random Llama-style checkpoint for the decoder tests, written with gqa's
// own safetensors writer, together with the exact values written (after rounding to the stored dtype) so that a
// reference can be computed without going through the decoder's loader.
//
//   gqa_test::LlamaFixture f;              // sizes, biases (Qwen2), tied lm_head, dtype, config forms: see fields
//   f.write(dir);                           // config.json, model.safetensors, tokenizer.json (byte-level)
//   f.values.at("model.norm.weight")        // std::vector<double>, row-major as stored
//
// Weights are N(0, 1/fan_in) (norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)), so activations and logits stay
// O(1) through the layers and the softmax is neither flat nor one-hot. Values come from gqa_test::Rng seeded by the
// tensor name and the fixture's seed: the same checkpoint on every platform.
#pragma once

#include "gqa/safetensors.hpp"
#include "support/checkpoint_fixtures.hpp"
#include "support/random.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gqa_test {

struct LlamaFixture {
  std::int64_t layers = 2, heads = 8, kv_heads = 2, hidden = 128, intermediate = 80, vocab = 300;
  std::int64_t head_dim = 0;  ///< 0: no "head_dim" in config.json (D = hidden / heads)
  bool biases = false;        ///< q/k/v biases, as Qwen2
  bool tied = false;          ///< no lm_head.weight; tie_word_embeddings = true
  bool llama3_scaling = false;
  double rope_theta = 10000;
  std::int64_t max_positions = 64;
  std::string model_type = "llama";
  st::Dtype dtype = st::Dtype::F32;
  std::uint64_t seed = 1;
  /// transformers 5's form: "rope_parameters" (this object) and no top-level "rope_theta"; unset: the older form
  /// (top-level rope_theta, and rope_scaling with llama3_scaling).
  std::optional<nlohmann::ordered_json> rope_parameters;
  /// Extra fields for config.json (overwrite the generated ones), for the refusal and conformance tests.
  nlohmann::ordered_json config_overrides = nlohmann::ordered_json::object();
  /// Generated fields left out of config.json.
  std::vector<std::string> config_removals;
  /// A whole config.json used as is instead of the generated one (e.g. one written by transformers'
  /// save_pretrained); it must describe this fixture's sizes.
  std::optional<nlohmann::ordered_json> config_file;

  /// Filled by write(): every tensor's values as stored.
  std::map<std::string, std::vector<double>> values;

  std::int64_t d() const { return head_dim ? head_dim : hidden / heads; }

  nlohmann::ordered_json config() const {
    if (config_file) return *config_file;
    nlohmann::ordered_json c;
    c["architectures"] = {model_type == "qwen2"     ? "Qwen2ForCausalLM"
                          : model_type == "mistral" ? "MistralForCausalLM"
                                                    : "LlamaForCausalLM"};
    c["model_type"] = model_type;
    c["hidden_size"] = hidden;
    c["intermediate_size"] = intermediate;
    c["num_attention_heads"] = heads;
    c["num_key_value_heads"] = kv_heads;
    if (head_dim) c["head_dim"] = head_dim;
    c["num_hidden_layers"] = layers;
    c["hidden_act"] = "silu";
    c["max_position_embeddings"] = max_positions;
    c["rms_norm_eps"] = 1e-05;
    if (rope_parameters)
      c["rope_parameters"] = *rope_parameters;
    else
      c["rope_theta"] = rope_theta;
    if (llama3_scaling)
      // original_max_position_embeddings small enough that, with D = 16, some wavelengths fall in each of the
      // three llama3 bands (kept, blended, divided by factor).
      c["rope_scaling"] = {{"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                           {"original_max_position_embeddings", 32}, {"rope_type", "llama3"}};
    c["tie_word_embeddings"] = tied;
    c["vocab_size"] = vocab;
    c["eos_token_id"] = vocab - 1;
    for (const auto& [k, v] : config_overrides.items()) c[k] = v;
    for (const auto& k : config_removals) c.erase(k);
    return c;
  }

  std::vector<std::pair<std::string, st::Shape>> tensors() const {
    std::vector<std::pair<std::string, st::Shape>> t;
    const std::int64_t D = d();
    t.push_back({"model.embed_tokens.weight", {vocab, hidden}});
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      t.push_back({p + "input_layernorm.weight", {hidden}});
      t.push_back({p + "self_attn.q_proj.weight", {heads * D, hidden}});
      t.push_back({p + "self_attn.k_proj.weight", {kv_heads * D, hidden}});
      t.push_back({p + "self_attn.v_proj.weight", {kv_heads * D, hidden}});
      if (biases) {
        t.push_back({p + "self_attn.q_proj.bias", {heads * D}});
        t.push_back({p + "self_attn.k_proj.bias", {kv_heads * D}});
        t.push_back({p + "self_attn.v_proj.bias", {kv_heads * D}});
      }
      t.push_back({p + "self_attn.o_proj.weight", {hidden, heads * D}});
      t.push_back({p + "post_attention_layernorm.weight", {hidden}});
      t.push_back({p + "mlp.gate_proj.weight", {intermediate, hidden}});
      t.push_back({p + "mlp.up_proj.weight", {intermediate, hidden}});
      t.push_back({p + "mlp.down_proj.weight", {hidden, intermediate}});
    }
    t.push_back({"model.norm.weight", {hidden}});
    if (!tied) t.push_back({"lm_head.weight", {vocab, hidden}});
    return t;
  }

  /// Writes config.json, model.safetensors and a byte-level tokenizer.json into `dir` (created).
  void write(const fs::path& dir) {
    fs::create_directories(dir);
    write_text(dir / "config.json", config().dump(2) + "\n");
    write_text(dir / "tokenizer.json", tokenizer_json(vocab).dump() + "\n");
    values.clear();
    std::vector<std::vector<std::byte>> storage;
    const auto all = tensors();
    storage.reserve(all.size());
    st::Writer w;
    for (const auto& [name, shape] : all) {
      std::vector<double>& v = values[name];
      v = draw(name, shape);
      storage.push_back(encode(v));
      w.add(name, dtype, shape, gqa::span<const std::byte>(storage.back().data(), gqa::Index(storage.back().size())));
    }
    w.write(dir / "model.safetensors");
  }

  /// GPT-2 byte-level pieces for ids 0..255 (id b is the byte b), and "<|end|>" as an added token at vocab - 1.
  static nlohmann::json tokenizer_json(std::int64_t vocab_size = 300) {
    nlohmann::json vocab = nlohmann::json::object();
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const unsigned cp = printable ? unsigned(b) : unsigned(next++);
      std::string utf8;
      if (cp < 0x80) {
        utf8 += char(cp);
      } else {
        utf8 += char(0xC0 | (cp >> 6));
        utf8 += char(0x80 | (cp & 0x3F));
      }
      vocab[utf8] = b;
    }
    return {{"version", "1.0"},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
            {"added_tokens", {{{"id", vocab_size - 1}, {"content", "<|end|>"}, {"special", true}}}}};
  }

 private:
  std::vector<double> draw(const std::string& name, const st::Shape& shape) const {
    std::uint64_t h = 1469598103934665603ull ^ seed;
    for (const char ch : name) h = (h ^ std::uint8_t(ch)) * 1099511628211ull;
    Rng rng(h);
    const bool norm = name.find("norm") != std::string::npos, bias = name.find(".bias") != std::string::npos;
    const double stddev = norm || bias ? 0.1 : 1.0 / std::sqrt(double(shape.back()));
    std::vector<double> v(static_cast<size_t>(st::numel(shape)));
    for (double& x : v) x = round_to_dtype((norm ? 1.0 : 0.0) + rng.normal(0.0, stddev));
    return v;
  }

  double round_to_dtype(double x) const {
    switch (dtype) {
      case st::Dtype::BF16: return double(float(gqa::bfloat16(float(x))));
      case st::Dtype::F16: return double(float(gqa::half(float(x))));
      default: return double(float(x));
    }
  }

  std::vector<std::byte> encode(const std::vector<double>& v) const {
    std::vector<std::byte> out(v.size() * st::dtype_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
      std::byte* p = out.data() + i * st::dtype_size(dtype);
      const float f = float(v[i]);
      switch (dtype) {
        case st::Dtype::BF16: { const gqa::bfloat16 x(f); std::memcpy(p, &x, 2); break; }
        case st::Dtype::F16: { const gqa::half x(f); std::memcpy(p, &x, 2); break; }
        default: std::memcpy(p, &f, 4); break;
      }
    }
    return out;
  }
};

}  // namespace gqa_test
