// gqa/checkpoint.hpp — converting a Hugging Face safetensors checkpoint (Llama / Mistral / Qwen2 / Gemma style) to
// fewer key/value heads: MHA -> GQA -> MQA by pooling K/V heads (gqa/convert.hpp), or back to more heads by exact
// expansion. This is what the gqa-convert tool runs; call it from C++ as
//
//   gqa::CheckpointOptions opt;
//   opt.groups = 8;                                   // the new num_key_value_heads
//   gqa::CheckpointSummary s = gqa::convert_checkpoint("llama-mha", "llama-gqa8", opt);
//
// INPUT: a directory with config.json and either model.safetensors or model.safetensors.index.json and its shards.
// config.json gives H = num_attention_heads, G = num_key_value_heads (absent or null: H), hidden_size and
// D = head_dim (absent or null: hidden_size / H; Gemma-7B and Mistral-Nemo set another value).
//
// WHAT CHANGES:
//   model.layers.<i>.self_attn.{k_proj,v_proj}.weight  [G*D, hidden] -> [groups*D, hidden]   (in their own dtype:
//   model.layers.<i>.self_attn.{k_proj,v_proj}.bias    [G*D]         -> [groups*D]            F32/F16/BF16/F64)
//   config.json: num_key_value_heads = groups; every other field as it was (key order kept).
//   model.safetensors.index.json (sharded input): the same weight_map, metadata.total_size updated.
//   With a non-adjacent options.convert.assignment, also q_proj.weight/bias rows and o_proj.weight columns are
//   reordered (gqa::query_head_order), so the model computes the function of that grouping.
// groups < G pools (options.convert.method: mean / first / random); groups == G leaves K/V as they are; groups > G
// (a multiple of G dividing H) expands exactly, e.g. groups = H turns a GQA checkpoint into an MHA one.
// PoolMethod::random seeds each tensor with splitmix64(seed ^ fnv1a64(tensor name)), so K and V (and every layer)
// get different, reproducible draws.
//
// WHAT IS COPIED: every other tensor byte for byte, in the same shard; each shard's __metadata__ (plus
// "format": "pt" if it had no "format"); every other regular file of the top directory (tokenizer.json,
// tokenizer_config.json, generation_config.json, ...). Not copied, and listed in CheckpointSummary::skipped:
// subdirectories (e.g. Llama's original/, with unconverted weights) and other weight files (*.bin, *.pt, *.pth,
// *.ckpt, *.h5, *.msgpack, *.gguf, *.onnx, *.npz, other *.safetensors), which would disagree with the new config.
//
// OUTPUT FILES follow the format's conventions (gqa/safetensors.hpp): header padded to a multiple of 8, contiguous
// data, largest dtype first and tensors in natural name order (layer 2 before layer 10).
//
// REFUSED (gqa::invalid_argument [gqa.checkpoint.unsupported], nothing written): fused QKV projections (GPT-2's
// c_attn, qkv_proj, query_key_value, Wqkv, in_proj_weight), per-head q/k norms (q_norm / k_norm as in Qwen3,
// OLMo 2, Gemma 3: the norm of a pooled head is not the pool of normed heads), K/V projections under other names or
// with extra parameters (quantised qweight/scales, LoRA), non-float K/V dtypes, and checkpoints without
// model.layers.<i>.self_attn.k_proj.weight. Malformed config or shapes that disagree with it:
// gqa::format_error [gqa.checkpoint.config] / [gqa.checkpoint.shape]. An existing output directory:
// gqa::invalid_argument [gqa.checkpoint.output_exists] unless options.force.
//
// ATOMICITY: everything is validated before anything is written; the output is built in a temporary sibling
// directory (.<name>.gqa-tmp-<random>), each file through temp + fsync + rename, and the directory is renamed to
// the output path only when complete. On any failure the temporary directory is removed, so a failed run leaves
// no output directory (and with force, the old one is kept).
#pragma once

#include "gqa/convert.hpp"
#include "gqa/errors.hpp"
#include "gqa/safetensors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <stdio.h>  // ::rename

namespace gqa {

/// The attention geometry of a Hugging Face config.json.
struct ModelConfig {
  Index heads = 0;     ///< num_attention_heads (H)
  Index kv_heads = 0;  ///< num_key_value_heads (G); H if absent or null
  Index hidden = 0;    ///< hidden_size
  Index head_dim = 0;  ///< head_dim (D); hidden_size / H if absent or null
  Index layers = 0;    ///< num_hidden_layers; 0 if absent
};

/// Parses the geometry from a config.json object (format_error [gqa.checkpoint.config] on bad or missing fields).
inline ModelConfig parse_model_config(const nlohmann::ordered_json& j, const std::string& where = "config.json") {
  using detail::require;
  require<format_error>(j.is_object(), "checkpoint.config", where, ": not a JSON object");
  auto field = [&](const char* name, bool required) -> std::optional<Index> {
    if (!j.contains(name) || j[name].is_null()) {
      require<format_error>(!required, "checkpoint.config", where, ": missing \"", name,
                            "\" (a config whose attention settings are nested, e.g. a multimodal text_config, is "
                            "not supported)");
      return std::nullopt;
    }
    const auto& v = j[name];
    require<format_error>(v.is_number_integer() && v.get<std::int64_t>() > 0, "checkpoint.config", where, ": \"",
                          name, "\" = ", v.dump(), " is not a positive integer");
    return static_cast<Index>(v.get<std::int64_t>());
  };
  ModelConfig c;
  c.heads = *field("num_attention_heads", true);
  c.hidden = *field("hidden_size", true);
  c.kv_heads = field("num_key_value_heads", false).value_or(c.heads);
  const auto head_dim = field("head_dim", false);
  if (!head_dim)
    require<format_error>(c.hidden % c.heads == 0, "checkpoint.config", where, ": no \"head_dim\" and hidden_size ",
                          c.hidden, " is not a multiple of num_attention_heads ", c.heads);
  c.head_dim = head_dim.value_or(c.hidden / c.heads);
  c.layers = field("num_hidden_layers", false).value_or(0);
  require<format_error>(c.heads % c.kv_heads == 0, "checkpoint.config", where, ": num_key_value_heads ", c.kv_heads,
                        " does not divide num_attention_heads ", c.heads);
  return c;
}

/// One converted tensor, for progress reports.
struct ConvertedTensor {
  std::string name;
  safetensors::Shape before, after;
};

/// Reported once per layer, when all of its converted tensors are written.
struct LayerProgress {
  Index layer = 0;
  Index num_layers = 0;
  safetensors::Dtype dtype = safetensors::Dtype::F32;
  std::vector<ConvertedTensor> tensors;
};

struct CheckpointOptions {
  /// The new num_key_value_heads: divides H and either divides the current G (pooling) or is a multiple of it.
  Index groups = 0;
  /// method, seed (see the header comment) and an optional assignment of the current G heads to `groups` groups.
  ConvertOptions convert;
  /// Replace an existing output directory.
  bool force = false;
  /// Called once per converted layer (from the calling thread). What it throws aborts the conversion cleanly.
  std::function<void(const LayerProgress&)> on_layer;
};

struct CheckpointSummary {
  ModelConfig config;  ///< of the input
  Index groups_before = 0, groups_after = 0;
  Index layers = 0;
  safetensors::Dtype kv_dtype = safetensors::Dtype::F32;  ///< dtype of the K/V projections
  bool sharded = false;
  std::size_t tensors_total = 0;      ///< tensors in the checkpoint
  std::size_t tensors_converted = 0;  ///< pooled, expanded or permuted
  std::size_t tensors_copied = 0;     ///< copied byte for byte
  std::uint64_t tensor_bytes_before = 0, tensor_bytes_after = 0;  ///< sum of tensor data sizes
  /// K and V of every layer for one token, in kv_dtype: 2 * layers * G * D * sizeof(dtype).
  std::uint64_t kv_cache_bytes_per_token_before = 0, kv_cache_bytes_per_token_after = 0;
  std::vector<std::string> files_written;  ///< safetensors, index and config files, relative to the output
  std::vector<std::string> files_copied;   ///< other files copied unchanged
  std::vector<std::string> skipped;        ///< entries of the input directory not carried over (see header comment)
};

namespace detail {

/// "model.layers.<i>.self_attn.<proj>.<param>" split up; nullopt for any other name.
struct AttentionTensorName {
  Index layer;
  std::string proj;   ///< q_proj, k_proj, v_proj, o_proj
  std::string param;  ///< weight, bias
};

inline std::optional<AttentionTensorName> parse_attention_name(std::string_view name) {
  constexpr std::string_view prefix = "model.layers.";
  if (name.substr(0, prefix.size()) != prefix) return std::nullopt;
  name.remove_prefix(prefix.size());
  std::size_t digits = 0;
  while (digits < name.size() && name[digits] >= '0' && name[digits] <= '9') ++digits;
  if (digits == 0 || digits > 9 || (digits > 1 && name[0] == '0')) return std::nullopt;
  const Index layer = std::stol(std::string(name.substr(0, digits)));
  name.remove_prefix(digits);
  constexpr std::string_view mid = ".self_attn.";
  if (name.substr(0, mid.size()) != mid) return std::nullopt;
  name.remove_prefix(mid.size());
  const auto dot = name.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  const std::string_view proj = name.substr(0, dot), param = name.substr(dot + 1);
  if (proj != "q_proj" && proj != "k_proj" && proj != "v_proj" && proj != "o_proj") return std::nullopt;
  if (param != "weight" && param != "bias") return std::nullopt;
  return AttentionTensorName{layer, std::string(proj), std::string(param)};
}

/// Why a tensor name shows an architecture the converter cannot handle honestly, or nullopt. Compares whole
/// dot-separated components, so "block_norm" is not mistaken for "k_norm".
inline std::optional<std::string> unsupported_reason(const std::string& name) {
  std::vector<std::string_view> parts;
  for (std::size_t b = 0, e; b <= name.size(); b = e + 1) {
    e = name.find('.', b);
    if (e == std::string::npos) e = name.size();
    parts.push_back(std::string_view(name).substr(b, e - b));
  }
  auto any = [&](std::initializer_list<std::string_view> set) {
    for (auto p : parts)
      for (auto s : set)
        if (p == s) return true;
    return false;
  };
  if (any({"c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj_weight", "in_proj_bias"}))
    return concat("tensor '", name, "' is a fused QKV projection (as GPT-2's c_attn); its K and V rows cannot be "
                                    "told apart without architecture knowledge gqa does not have");
  if (any({"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"}))
    return concat("tensor '", name, "' is a per-head query/key norm; the norm of a pooled head is not the pool "
                                    "of the normed heads, so K cannot be pooled honestly");
  if (any({"k_proj", "v_proj"}) && !parse_attention_name(name))
    return concat("tensor '", name, "' looks like a K/V projection but is not model.layers.<i>.self_attn."
                                    "{k_proj,v_proj}.{weight,bias} (quantised, adapter or other layout)");
  return std::nullopt;
}

/// Natural order: runs of digits compare as numbers ("layers.2" < "layers.10").
inline bool natural_less(const std::string& a, const std::string& b) {
  std::size_t i = 0, j = 0;
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      std::size_t i2 = i, j2 = j;
      while (i2 < a.size() && a[i2] == '0') ++i2;
      while (j2 < b.size() && b[j2] == '0') ++j2;
      std::size_t ie = i2, je = j2;
      while (ie < a.size() && digit(a[ie])) ++ie;
      while (je < b.size() && digit(b[je])) ++je;
      if (ie - i2 != je - j2) return ie - i2 < je - j2;
      const int c = a.compare(i2, ie - i2, b, j2, je - j2);
      if (c != 0) return c < 0;
      if (ie - i != je - j) return ie - i < je - j;  // more leading zeros last
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

inline std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline std::uint64_t fnv1a64(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return h;
}

inline bool is_float_dtype(safetensors::Dtype d) noexcept {
  using safetensors::Dtype;
  return d == Dtype::F32 || d == Dtype::F64 || d == Dtype::F16 || d == Dtype::BF16;
}

/// Calls f(T{}) with the C++ type of a floating dtype.
template <typename F>
void with_float_type(safetensors::Dtype d, F&& f) {
  switch (d) {
    case safetensors::Dtype::F32: f(float{}); return;
    case safetensors::Dtype::F64: f(double{}); return;
    case safetensors::Dtype::F16: f(half{}); return;
    case safetensors::Dtype::BF16: f(bfloat16{}); return;
    default: require(false, "checkpoint.unsupported", "dtype ", safetensors::dtype_name(d), " is not a float type");
  }
}

/// A typed view of a tensor's data: zero copy when aligned, else a copy in `storage`.
template <typename T>
span<const T> typed_data(const safetensors::TensorView& t, std::vector<T>& storage) {
  if (reinterpret_cast<std::uintptr_t>(t.bytes.data()) % alignof(T) == 0) return t.as<T>();
  storage = t.to_vector<T>();
  return {storage.data(), static_cast<Index>(storage.size())};
}

inline bool is_weight_file(const std::filesystem::path& p) {
  static const std::set<std::string> ext{".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                                         ".msgpack", ".gguf", ".onnx", ".npz"};
  return ext.count(p.extension().string()) > 0;
}

/// What happens to one tensor.
struct TensorPlan {
  enum Kind { copy, pool, expand, permute_rows, permute_columns } kind = copy;
  ProjectionShape shape;  ///< input projection shape (pool/expand/permute)
  Index layer = -1;
};

}  // namespace detail

/// Converts the checkpoint in `input_dir` to options.groups key/value heads, written to `output_dir` (see the
/// header comment for what changes, what is copied, what is refused and the atomicity guarantee).
inline CheckpointSummary convert_checkpoint(const std::filesystem::path& input_dir,
                                            const std::filesystem::path& output_dir,
                                            const CheckpointOptions& options) {
  namespace fs = std::filesystem;
  namespace st = safetensors;
  using detail::concat;
  using detail::require;

  // ---- paths ------------------------------------------------------------------------------------------------
  require<io_error>(fs::is_directory(input_dir), "io", "input '", input_dir.string(), "' is not a directory");
  fs::path out = fs::absolute(output_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  const fs::path in = fs::absolute(input_dir).lexically_normal();
  const fs::path parent = out.parent_path();
  require<io_error>(fs::is_directory(parent), "io", "the output's parent directory '", parent.string(),
                    "' does not exist");
  const bool out_exists = fs::exists(fs::symlink_status(out));
  if (out_exists) {
    require(!fs::equivalent(in, out), "checkpoint.output_exists", "output '", output_dir.string(),
            "' is the input directory");
    require(options.force, "checkpoint.output_exists", "output '", output_dir.string(),
            "' exists; set CheckpointOptions::force (gqa-convert --force) to replace it");
    const fs::path rel = fs::weakly_canonical(in).lexically_relative(fs::weakly_canonical(out));
    require(rel.empty() || *rel.begin() == "..", "checkpoint.output_exists", "output '", output_dir.string(),
            "' contains the input directory; replacing it would delete the input");
  }

  // ---- config and tensors: validate everything before writing anything -------------------------------------
  const fs::path config_path = in / "config.json";
  require<format_error>(fs::is_regular_file(config_path), "checkpoint.config", "'", input_dir.string(),
                        "' has no config.json");
  nlohmann::ordered_json config_json;
  {
    gqa::detail::MappedFile m(config_path);
    const char* p = reinterpret_cast<const char*>(m.data());
    try {
      config_json = nlohmann::ordered_json::parse(p, p + m.size());
    } catch (const nlohmann::json::exception& e) {
      throw format_error(concat("[gqa.checkpoint.config] ", config_path.string(), ": not valid JSON: ", e.what()));
    }
  }
  require<format_error>(config_json.is_object(), "checkpoint.config", config_path.string(), ": not a JSON object");

  // Architecture first, so that e.g. GPT-2 (whose config has n_head, not num_attention_heads) is refused for what
  // it is, a fused QKV projection, rather than for a missing config field.
  const st::Checkpoint ckpt = st::Checkpoint::open(in);
  for (const auto& file : ckpt.files())
    for (const auto& t : file.tensors())
      if (const auto why = detail::unsupported_reason(t.name)) require(false, "checkpoint.unsupported", *why);
  const ModelConfig cfg = parse_model_config(config_json, config_path.string());
  for (const char* flag : {"qk_norm", "use_qk_norm", "qk_layernorm", "use_qk_layernorm"})
    require(!(config_json.contains(flag) && config_json[flag].is_boolean() && config_json[flag].get<bool>()),
            "checkpoint.unsupported", "config.json sets \"", flag,
            "\": per-head query/key norms cannot be pooled honestly");

  const Index H = cfg.heads, G = cfg.kv_heads, D = cfg.head_dim, hidden = cfg.hidden, G2 = options.groups;
  require(G2 > 0 && H % G2 == 0, "checkpoint.groups", "groups = ", G2, " must be a positive divisor of ",
          "num_attention_heads H = ", H);
  require(G % G2 == 0 || G2 % G == 0, "checkpoint.groups", "groups = ", G2,
          " neither divides nor is a multiple of the checkpoint's num_key_value_heads G = ", G);
  const bool pooling = G2 < G, expanding = G2 > G;
  const auto& assignment = options.convert.assignment;
  require(assignment.empty() || pooling, "checkpoint.groups",
          "an assignment applies to pooling only (groups = ", G2, " < num_key_value_heads = ", G, ")");
  if (pooling) group_members(G, G2, assignment);  // validates the assignment
  const bool permute = !is_adjacent(assignment, G2);
  const std::vector<Index> q_order = permute ? query_head_order(H, G2, assignment) : std::vector<Index>{};

  std::map<std::string, detail::TensorPlan> plan;
  std::map<Index, std::set<std::string>> layer_kv;  // layer -> attention tensors seen
  std::optional<st::Dtype> kv_dtype;
  for (const auto& file : ckpt.files())
    for (const auto& t : file.tensors()) {
      detail::TensorPlan p;
      const auto a = detail::parse_attention_name(t.name);
      if (a) {
        layer_kv[a->layer].insert(a->proj + "." + a->param);
        p.layer = a->layer;
        const bool weight = a->param == "weight";
        const bool kv = a->proj == "k_proj" || a->proj == "v_proj";
        auto expect = [&](const st::Shape& s) {
          require<format_error>(t.shape == s, "checkpoint.shape", "tensor '", t.name, "' has shape ",
                                st::shape_string(t.shape), " but config.json (H ", H, ", G ", G, ", D ", D,
                                ", hidden ", hidden, ") implies ", st::shape_string(s));
        };
        if (kv) {
          expect(weight ? st::Shape{G * D, hidden} : st::Shape{G * D});
          require(detail::is_float_dtype(t.dtype), "checkpoint.unsupported", "tensor '", t.name, "' has dtype ", st::dtype_name(t.dtype),
                  "; only F32, F16, BF16 and F64 projections can be pooled");
          if (weight && a->proj == "k_proj") {
            require(!kv_dtype || *kv_dtype == t.dtype, "checkpoint.unsupported", "K/V projections of mixed dtypes (",
                    st::dtype_name(*kv_dtype), ", ", st::dtype_name(t.dtype), ")");
            kv_dtype = t.dtype;
          }
          p.shape = weight ? ProjectionShape{WeightLayout::linear, G, D, hidden} : ProjectionShape::bias(G, D);
          if (pooling) p.kind = detail::TensorPlan::pool;
          if (expanding) p.kind = detail::TensorPlan::expand;
        } else if (a->proj == "q_proj") {
          expect(weight ? st::Shape{H * D, hidden} : st::Shape{H * D});
          p.shape = weight ? ProjectionShape{WeightLayout::linear, H, D, hidden} : ProjectionShape::bias(H, D);
          if (permute) p.kind = detail::TensorPlan::permute_rows;
        } else if (weight) {  // o_proj.weight [hidden, H*D]; its bias [hidden] is not per head
          expect(st::Shape{hidden, H * D});
          p.shape = ProjectionShape{WeightLayout::hidden_first, H, D, hidden};
          if (permute) p.kind = detail::TensorPlan::permute_columns;
        }
        if (p.kind == detail::TensorPlan::permute_rows || p.kind == detail::TensorPlan::permute_columns)
          require(detail::is_float_dtype(t.dtype), "checkpoint.unsupported", "tensor '", t.name, "' has dtype ",
                  st::dtype_name(t.dtype), "; only F32, F16, BF16 and F64 projections can be reordered");
      }
      plan.emplace(t.name, p);
    }

  require(!layer_kv.empty(), "checkpoint.unsupported", "'", input_dir.string(),
          "' has no model.layers.<i>.self_attn.k_proj.weight: not a Llama/Mistral/Qwen2-style checkpoint gqa "
          "understands");
  const Index L = static_cast<Index>(layer_kv.size());
  require<format_error>(layer_kv.rbegin()->first == L - 1, "checkpoint.shape", "attention layers are not numbered ",
                        "0 .. ", L - 1, " (highest is ", layer_kv.rbegin()->first, ")");
  require<format_error>(cfg.layers == 0 || cfg.layers == L, "checkpoint.config", "num_hidden_layers = ", cfg.layers,
                        " but the checkpoint has attention tensors for ", L, " layers");
  for (const auto& [layer, names] : layer_kv) {
    for (const char* needed : {"k_proj.weight", "v_proj.weight"})
      require<format_error>(names.count(needed) == 1, "checkpoint.shape", "layer ", layer, " has no self_attn.",
                            needed);
    require<format_error>(names.count("k_proj.bias") == names.count("v_proj.bias"), "checkpoint.shape", "layer ",
                          layer, " has a bias on only one of k_proj and v_proj");
    if (permute)
      for (const char* needed : {"q_proj.weight", "o_proj.weight"})
        require(names.count(needed) == 1, "checkpoint.unsupported", "a non-adjacent assignment reorders query heads, "
                "but layer ", layer, " has no self_attn.", needed);
  }

  CheckpointSummary summary;
  summary.config = cfg;
  summary.groups_before = G;
  summary.groups_after = G2;
  summary.layers = L;
  summary.kv_dtype = *kv_dtype;
  summary.sharded = ckpt.sharded();
  summary.tensors_total = ckpt.size();
  const std::uint64_t kv_elem = st::dtype_size(*kv_dtype);
  summary.kv_cache_bytes_per_token_before = 2 * static_cast<std::uint64_t>(L * G * D) * kv_elem;
  summary.kv_cache_bytes_per_token_after = 2 * static_cast<std::uint64_t>(L * G2 * D) * kv_elem;

  // Files to carry over, decided before the temporary directory exists.
  std::set<std::string> rewritten{"config.json"};
  for (const auto& n : ckpt.file_names()) rewritten.insert(n);
  if (ckpt.sharded()) rewritten.insert(st::index_file_name);
  std::vector<std::string> to_copy;
  for (const auto& entry : fs::directory_iterator(in)) {
    const std::string name = entry.path().filename().string();
    if (rewritten.count(name)) continue;
    if (entry.is_regular_file() && !detail::is_weight_file(entry.path())) to_copy.push_back(name);
    else summary.skipped.push_back(name);
  }
  std::sort(to_copy.begin(), to_copy.end());
  std::sort(summary.skipped.begin(), summary.skipped.end());

  // ---- write into a temporary sibling directory ---------------------------------------------------------------
  const fs::path tmp = gqa::detail::make_unique_directory(parent, "." + out.filename().string() + ".gqa-tmp-");
  try {
    std::map<Index, std::size_t> pending;  // layer -> converted tensors still to write
    for (const auto& [name, p] : plan)
      if (p.kind != detail::TensorPlan::copy) ++pending[p.layer];
    std::map<Index, LayerProgress> progress;

    for (std::size_t f = 0; f < ckpt.files().size(); ++f) {
      const st::File& file = ckpt.files()[f];
      st::Metadata metadata = file.metadata();
      metadata.emplace("format", "pt");
      st::Writer writer(metadata);
      std::vector<const st::TensorView*> tensors;
      for (const auto& t : file.tensors()) tensors.push_back(&t);
      std::sort(tensors.begin(), tensors.end(),
                [](const st::TensorView* a, const st::TensorView* b) { return detail::natural_less(a->name, b->name); });
      for (const st::TensorView* t : tensors) {
        const detail::TensorPlan& p = plan.at(t->name);
        summary.tensor_bytes_before += static_cast<std::uint64_t>(t->bytes.size());
        if (p.kind == detail::TensorPlan::copy) {
          writer.add(t->name, t->dtype, t->shape, t->bytes);
          ++summary.tensors_copied;
          continue;
        }
        st::Shape shape = t->shape;  // permutations keep the shape; pooling/expansion change the head dim
        if (p.kind == detail::TensorPlan::pool || p.kind == detail::TensorPlan::expand) shape[0] = G2 * D;
        ++summary.tensors_converted;
        const std::uint64_t seed = detail::splitmix64(options.convert.seed ^ detail::fnv1a64(t->name));
        auto produce = [&, t, p, seed, shape](span<std::byte> dst) {
          detail::with_float_type(t->dtype, [&](auto tag) {
            using T = decltype(tag);
            std::vector<T> storage;
            const span<const T> src = detail::typed_data<T>(*t, storage);
            std::vector<T> result(static_cast<std::size_t>(dst.size()) / sizeof(T));
            const span<T> res(result.data(), static_cast<Index>(result.size()));
            switch (p.kind) {
              case detail::TensorPlan::pool: {
                ConvertOptions o = options.convert;
                o.seed = seed;
                pool_heads<T>(src, p.shape, G2, res, o);
                break;
              }
              case detail::TensorPlan::expand: expand_heads<T>(src, p.shape, G2, res); break;
              default: permute_heads<T>(src, p.shape, span<const Index>(q_order), res); break;
            }
            std::memcpy(dst.data(), result.data(), static_cast<std::size_t>(dst.size()));
          });
          LayerProgress& lp = progress[p.layer];
          lp.layer = p.layer;
          lp.num_layers = L;
          lp.dtype = t->dtype;
          lp.tensors.push_back({t->name, t->shape, shape});
          if (--pending[p.layer] == 0 && options.on_layer) options.on_layer(lp);
        };
        writer.add(t->name, t->dtype, shape, produce);
      }
      summary.tensor_bytes_after += writer.data_size();
      writer.write(tmp / ckpt.file_names()[f]);
      summary.files_written.push_back(ckpt.file_names()[f]);
    }

    if (ckpt.sharded()) {
      st::ShardIndex index = *ckpt.index();
      index.total_size = summary.tensor_bytes_after;
      st::write_index(tmp / st::index_file_name, index);
      summary.files_written.push_back(st::index_file_name);
    }
    nlohmann::ordered_json new_config = config_json;
    new_config["num_key_value_heads"] = G2;
    gqa::detail::write_file_atomically(tmp / "config.json", new_config.dump(2) + "\n");
    summary.files_written.push_back("config.json");
    for (const auto& name : to_copy) {
      fs::copy_file(in / name, tmp / name);
      summary.files_copied.push_back(name);
    }
    gqa::detail::fsync_directory(tmp);

    // ---- move into place --------------------------------------------------------------------------------------
    if (out_exists) {
      const fs::path old = tmp.string() + ".old";
      require<io_error>(::rename(out.c_str(), old.c_str()) == 0, "io",
                        gqa::detail::os_error("cannot move the existing output aside:", out));
      if (::rename(tmp.c_str(), out.c_str()) != 0) {
        const std::string err = gqa::detail::os_error("cannot rename the new output onto", out);
        (void)::rename(old.c_str(), out.c_str());
        throw io_error(concat("[gqa.io] ", err));
      }
      std::error_code ec;
      fs::remove_all(old, ec);
    } else {
      require<io_error>(::rename(tmp.c_str(), out.c_str()) == 0, "io",
                        gqa::detail::os_error("cannot rename the new output onto", out));
    }
    gqa::detail::fsync_directory(parent);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  return summary;
}

}  // namespace gqa
