// Test fixtures for the safetensors and checkpoint tests: a self-removing temporary directory, and tiny
// Hugging Face-style checkpoints (Llama / Qwen2 / GPT-2 / Qwen3 / BERT layouts) written with gqa's own safetensors writer,
// or described in memory as the inventory gqa::plan_checkpoint reads.
#pragma once

#include "gqa/checkpoint_plan.hpp"
#include "gqa/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace gqa_test {

namespace fs = std::filesystem;
namespace st = gqa::safetensors;

/// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = (fs::path(base && *base ? base : "/tmp") / "gqa-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

inline void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  if (!f) throw std::runtime_error("cannot write " + path.string());
}

inline std::string read_text(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline std::vector<std::byte> read_bytes(const fs::path& path) {
  const std::string s = read_text(path);
  std::vector<std::byte> b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// Deterministic N(0, 0.5^2) values of a tensor, seeded by its name, stored as `dtype` (F32, BF16, F16, F64).
inline std::vector<std::byte> tensor_bytes(const std::string& name, st::Dtype dtype, std::int64_t n) {
  std::seed_seq seq(name.begin(), name.end());
  std::mt19937 rng(seq);
  std::normal_distribution<float> d(0.f, 0.5f);
  std::vector<std::byte> out(static_cast<std::size_t>(n) * st::dtype_size(dtype));
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = d(rng);
    std::byte* p = out.data() + i * static_cast<std::int64_t>(st::dtype_size(dtype));
    switch (dtype) {
      case st::Dtype::F32: std::memcpy(p, &v, 4); break;
      case st::Dtype::F64: { const double x = v; std::memcpy(p, &x, 8); break; }
      case st::Dtype::BF16: { const gqa::bfloat16 x(v); std::memcpy(p, &x, 2); break; }
      case st::Dtype::F16: { const gqa::half x(v); std::memcpy(p, &x, 2); break; }
      default: throw std::runtime_error("tensor_bytes: not a float dtype");
    }
  }
  return out;
}

/// A tiny checkpoint in Hugging Face's layout: decoder-only, or a BertModel encoder (bert).
struct TinyModel {
  // qwen2: q/k/v biases; gpt2: fused c_attn; qwen3: q/k norms; bert: BertModel names, every projection with a bias,
  // LayerNorms with biases, config without num_key_value_heads (kv_heads only shapes K/V, to test a mismatch)
  enum class Arch { llama, qwen2, gpt2, qwen3, bert };
  Arch arch = Arch::llama;
  std::int64_t layers = 2, heads = 8, kv_heads = 8, hidden = 32, vocab = 16, intermediate = 48;
  std::int64_t head_dim = 0;    ///< 0: hidden / heads and no "head_dim" in config.json
  bool write_kv_heads = true;   ///< false: config.json has no num_key_value_heads (means H)
  st::Dtype dtype = st::Dtype::BF16;
  bool sharded = false;

  std::int64_t d() const { return head_dim ? head_dim : hidden / heads; }

  /// name -> shape of every tensor, in a natural order.
  std::vector<std::pair<std::string, st::Shape>> tensors() const {
    std::vector<std::pair<std::string, st::Shape>> t;
    const std::int64_t D = d();
    if (arch == Arch::bert) return bert_tensors();
    if (arch == Arch::gpt2) {
      t.push_back({"wte.weight", {vocab, hidden}});
      for (std::int64_t l = 0; l < layers; ++l) {
        const std::string p = "h." + std::to_string(l) + ".";
        t.push_back({p + "attn.c_attn.weight", {hidden, 3 * hidden}});
        t.push_back({p + "attn.c_attn.bias", {3 * hidden}});
        t.push_back({p + "attn.c_proj.weight", {hidden, hidden}});
      }
      return t;
    }
    t.push_back({"model.embed_tokens.weight", {vocab, hidden}});
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      t.push_back({p + "input_layernorm.weight", {hidden}});
      t.push_back({p + "self_attn.q_proj.weight", {heads * D, hidden}});
      t.push_back({p + "self_attn.k_proj.weight", {kv_heads * D, hidden}});
      t.push_back({p + "self_attn.v_proj.weight", {kv_heads * D, hidden}});
      if (arch == Arch::qwen2) {
        t.push_back({p + "self_attn.q_proj.bias", {heads * D}});
        t.push_back({p + "self_attn.k_proj.bias", {kv_heads * D}});
        t.push_back({p + "self_attn.v_proj.bias", {kv_heads * D}});
      }
      if (arch == Arch::qwen3) {
        t.push_back({p + "self_attn.q_norm.weight", {D}});
        t.push_back({p + "self_attn.k_norm.weight", {D}});
      }
      t.push_back({p + "self_attn.o_proj.weight", {hidden, heads * D}});
      t.push_back({p + "post_attention_layernorm.weight", {hidden}});
      t.push_back({p + "mlp.gate_proj.weight", {intermediate, hidden}});
      t.push_back({p + "mlp.up_proj.weight", {intermediate, hidden}});
      t.push_back({p + "mlp.down_proj.weight", {hidden, intermediate}});
    }
    t.push_back({"model.norm.weight", {hidden}});
    t.push_back({"lm_head.weight", {vocab, hidden}});
    return t;
  }

  std::vector<std::pair<std::string, st::Shape>> bert_tensors() const {
    std::vector<std::pair<std::string, st::Shape>> t;
    const std::int64_t D = d();
    t.push_back({"embeddings.LayerNorm.bias", {hidden}});
    t.push_back({"embeddings.LayerNorm.weight", {hidden}});
    t.push_back({"embeddings.position_embeddings.weight", {vocab, hidden}});
    t.push_back({"embeddings.word_embeddings.weight", {vocab, hidden}});
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::string p = "encoder.layer." + std::to_string(l) + ".";
      t.push_back({p + "attention.output.LayerNorm.bias", {hidden}});
      t.push_back({p + "attention.output.LayerNorm.weight", {hidden}});
      t.push_back({p + "attention.output.dense.bias", {hidden}});
      t.push_back({p + "attention.output.dense.weight", {hidden, heads * D}});
      t.push_back({p + "attention.self.key.bias", {kv_heads * D}});
      t.push_back({p + "attention.self.key.weight", {kv_heads * D, hidden}});
      t.push_back({p + "attention.self.query.bias", {heads * D}});
      t.push_back({p + "attention.self.query.weight", {heads * D, hidden}});
      t.push_back({p + "attention.self.value.bias", {kv_heads * D}});
      t.push_back({p + "attention.self.value.weight", {kv_heads * D, hidden}});
      t.push_back({p + "intermediate.dense.bias", {intermediate}});
      t.push_back({p + "intermediate.dense.weight", {intermediate, hidden}});
      t.push_back({p + "output.LayerNorm.bias", {hidden}});
      t.push_back({p + "output.LayerNorm.weight", {hidden}});
      t.push_back({p + "output.dense.bias", {hidden}});
      t.push_back({p + "output.dense.weight", {hidden, intermediate}});
    }
    t.push_back({"pooler.dense.bias", {hidden}});
    t.push_back({"pooler.dense.weight", {hidden, hidden}});
    return t;
  }

  nlohmann::ordered_json config() const {
    nlohmann::ordered_json c;
    if (arch == Arch::bert) {
      c["architectures"] = {"BertModel"};
      c["hidden_size"] = hidden;
      c["intermediate_size"] = intermediate;
      c["layer_norm_eps"] = 1e-12;
      c["model_type"] = "bert";
      c["num_attention_heads"] = heads;
      c["num_hidden_layers"] = layers;
      c["position_embedding_type"] = "absolute";
      c["vocab_size"] = vocab;
      return c;
    }
    if (arch == Arch::gpt2) {
      c["architectures"] = {"GPT2LMHeadModel"};
      c["model_type"] = "gpt2";
      c["n_embd"] = hidden;
      c["n_head"] = heads;
      c["n_layer"] = layers;
      c["vocab_size"] = vocab;
      return c;
    }
    const char* names[] = {"LlamaForCausalLM", "Qwen2ForCausalLM", "", "Qwen3ForCausalLM"};
    const char* types[] = {"llama", "qwen2", "", "qwen3"};
    c["architectures"] = {names[static_cast<int>(arch)]};
    c["model_type"] = types[static_cast<int>(arch)];
    c["hidden_size"] = hidden;
    c["intermediate_size"] = intermediate;
    c["num_attention_heads"] = heads;
    if (write_kv_heads) c["num_key_value_heads"] = kv_heads;
    if (head_dim) c["head_dim"] = head_dim;
    c["num_hidden_layers"] = layers;
    c["rms_norm_eps"] = 1e-05;
    c["rope_theta"] = 500000.0;
    c["tie_word_embeddings"] = false;
    c["torch_dtype"] = dtype == st::Dtype::BF16 ? "bfloat16" : "float32";
    c["vocab_size"] = vocab;
    return c;
  }

  std::vector<std::string> shard_files() const {
    return sharded ? std::vector<std::string>{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
                   : std::vector<std::string>{"model.safetensors"};
  }

  /// The shard of each tensor (parallel to tensors()). Shard 2 starts at the last layer's v_proj, so that layer's
  /// k_proj and v_proj straddle the two shards.
  std::vector<std::size_t> shards() const {
    const auto all = tensors();
    std::size_t split = all.size() / 2;
    for (std::size_t i = 0; i < all.size(); ++i)
      if (all[i].first == "model.layers." + std::to_string(layers - 1) + ".self_attn.v_proj.weight") split = i;
    std::vector<std::size_t> s(all.size());
    for (std::size_t i = 0; i < all.size(); ++i) s[i] = sharded && i >= split ? 1 : 0;
    return s;
  }

  /// What write() would put on disk, as the inventory gqa::plan_checkpoint reads (no file is touched): the tensors
  /// of each file in turn, and the directory's entries.
  gqa::CheckpointInventory inventory() const {
    gqa::CheckpointInventory inv;
    inv.config = config();
    inv.files = shard_files();
    inv.sharded = sharded;
    const auto all = tensors();
    const auto shard_of = shards();
    for (std::size_t f = 0; f < inv.files.size(); ++f)
      for (std::size_t i = 0; i < all.size(); ++i)
        if (shard_of[i] == f) inv.tensors.push_back({all[i].first, dtype, all[i].second, f});
    for (const char* name : {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                             "pytorch_model.bin"})
      inv.entries.push_back({name, true});
    inv.entries.push_back({"original", false});
    for (const auto& f : inv.files) inv.entries.push_back({f, true});
    if (sharded) inv.entries.push_back({st::index_file_name, true});
    return inv;
  }

  /// Writes config.json, the weights (model.safetensors, or two shards and the index), tokenizer files, and two
  /// entries the converter must not carry over: a pytorch_model.bin and an original/ directory.
  void write(const fs::path& dir) const {
    fs::create_directories(dir);
    write_text(dir / "config.json", config().dump(2) + "\n");
    write_text(dir / "tokenizer.json", R"({"version": "1.0", "model": {"type": "BPE"}})" "\n");
    write_text(dir / "tokenizer_config.json", R"({"bos_token": "<s>"})" "\n");
    write_text(dir / "generation_config.json", R"({"do_sample": true, "temperature": 0.6})" "\n");
    write_text(dir / "pytorch_model.bin", "not really a pickle");
    fs::create_directories(dir / "original");
    write_text(dir / "original" / "params.json", "{}");

    const auto all = tensors();
    std::vector<std::vector<std::byte>> storage;
    storage.reserve(all.size());
    st::ShardIndex index;
    const std::vector<std::string> shard_names = shard_files();
    const std::vector<std::size_t> shard_of = shards();
    std::vector<st::Writer> writers(shard_names.size());
    for (std::size_t i = 0; i < all.size(); ++i) {
      const auto& [name, shape] = all[i];
      const std::size_t shard = shard_of[i];
      storage.push_back(tensor_bytes(name, dtype, st::numel(shape)));
      writers[shard].add(name, dtype, shape,
                         gqa::span<const std::byte>(storage.back().data(), static_cast<gqa::Index>(storage.back().size())));
      index.weight_map[name] = shard_names[shard];
      index.total_size += storage.back().size();
    }
    for (std::size_t s = 0; s < writers.size(); ++s) writers[s].write(dir / shard_names[s]);
    if (sharded) st::write_index(dir / st::index_file_name, index);
  }
};

}  // namespace gqa_test
