// gqa/detail/checkpoint_rules.hpp — what the checkpoint converter knows about each architecture family: which
// tensor names are attention projections (and of which layer, role and parameter), which names it must refuse, which
// config.json fields hold the geometry, and how the converted config is written. Everything else (shape checks,
// planning, writing) is shared and lives in gqa/checkpoint_plan.hpp and gqa/checkpoint.hpp. Not part of the public
// API; include gqa/checkpoint.hpp.
//
// ADDING AN ARCHITECTURE means adding one ArchitectureRules value to architectures(): a recogniser (from config.json's
// "architectures" / "model_type"), a name classifier, a refusal check, the config field names, whether the output
// keeps the K/V head count in its config (Llama: num_key_value_heads) or, for runtimes without one (BERT), is
// written expanded back to H heads, the rotary layout of q/k rows, and which normalisation feeds each layer's
// attention (read by the function-aware methods, gqa/convert.hpp). The shape rules are those of nn.Linear and need
// no per-family code:
//   query  weight [H*D, hidden]  bias [H*D]
//   key    weight [G*D, hidden]  bias [G*D]      (value the same)
//   output weight [hidden, H*D]  bias [hidden]   (the bias is not per head and is copied)
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/convert.hpp"
#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gqa::detail {

/// The part an attention tensor plays in its layer.
enum class TensorRole { query, key, value, output };
/// weight or bias.
enum class TensorParam { weight, bias };

inline constexpr std::size_t tensor_roles = 4;

inline const char* role_name(TensorRole r) noexcept {
  switch (r) {
    case TensorRole::query: return "query";
    case TensorRole::key: return "key";
    case TensorRole::value: return "value";
    case TensorRole::output: return "output";
  }
  return "?";
}

/// An attention tensor recognised by name.
struct AttentionTensor {
  Index layer = 0;
  TensorRole role = TensorRole::query;
  TensorParam param = TensorParam::weight;
};

/// The config.json fields that hold the attention geometry; nullptr where the family has no such field.
struct ConfigFields {
  const char* heads;     ///< H
  /// G; absent or null means H. nullptr: the family's runtimes have no K/V head count (BERT), so pooled K/V are
  /// written expanded back to H heads and config.json is copied unchanged: the pooled model's function in MHA layout.
  const char* kv_heads;
  const char* hidden;
  const char* head_dim;  ///< D; absent or null means hidden / H
  const char* layers;    ///< optional; checked against the layers found
};

/// One architecture family. Plain function pointers: the rules are data, chosen once per checkpoint.
struct ArchitectureRules {
  const char* family;  ///< for messages, e.g. "Llama/Mistral/Qwen2"
  /// True if config.json names this family. The first family in architectures() that recognises a config is used;
  /// the last entry recognises everything, so unknown configs get its refusals and messages.
  bool (*recognises)(const nlohmann::ordered_json& config);
  /// The role of an attention tensor, or nullopt for any other tensor (copied byte for byte).
  std::optional<AttentionTensor> (*classify)(std::string_view name);
  /// Why a tensor name shows a layout the converter cannot convert honestly, or nullopt.
  std::optional<std::string> (*refusal)(const std::string& name);
  /// Why config.json describes something the converter cannot convert honestly, or nullopt.
  std::optional<std::string> (*config_refusal)(const nlohmann::ordered_json& config);
  ConfigFields fields;
  /// What a checkpoint of this family must contain, for the message when it has no attention tensors.
  const char* expected_names;
  /// How q/k rows pair up for the rotary embedding (none: the family has none). PoolMethod::automatic and fit read it.
  RotaryPairs rotary;
  /// For a normalisation whose output is a layer's attention input: that layer and the parameter (fit's input
  /// metric, AttentionView::norm_weight / norm_bias); nullopt for any other tensor.
  std::optional<std::pair<Index, TensorParam>> (*input_norm)(std::string_view name);
};

/// "<prefix><digits><rest>" -> (layer, rest), for names like "model.layers.12.self_attn.k_proj.weight". Refuses
/// leading zeros and more than 9 digits, so that every layer has one spelling and fits an Index.
inline std::optional<std::pair<Index, std::string_view>> split_layer(std::string_view name, std::string_view prefix) {
  if (name.substr(0, prefix.size()) != prefix) return std::nullopt;
  name.remove_prefix(prefix.size());
  std::size_t digits = 0;
  while (digits < name.size() && name[digits] >= '0' && name[digits] <= '9') ++digits;
  if (digits == 0 || digits > 9 || (digits > 1 && name[0] == '0')) return std::nullopt;
  Index layer = 0;
  for (std::size_t i = 0; i < digits; ++i) layer = layer * 10 + (name[i] - '0');
  return std::make_pair(layer, name.substr(digits));
}

/// The dot-separated components of a name.
inline std::vector<std::string_view> name_parts(std::string_view name) {
  std::vector<std::string_view> parts;
  for (std::size_t b = 0, e; b <= name.size(); b = e + 1) {
    e = name.find('.', b);
    if (e == std::string_view::npos) e = name.size();
    parts.push_back(name.substr(b, e - b));
  }
  return parts;
}

inline bool any_part_in(const std::vector<std::string_view>& parts, std::initializer_list<std::string_view> set) {
  for (auto p : parts)
    for (auto s : set)
      if (p == s) return true;
  return false;
}

// ---- Llama / Mistral / Qwen2 ------------------------------------------------------------------------------------

/// "model.layers.<i>.self_attn.{q,k,v,o}_proj.{weight,bias}", or nullopt.
inline std::optional<AttentionTensor> classify_llama(std::string_view name) {
  const auto split = split_layer(name, "model.layers.");
  if (!split) return std::nullopt;
  std::string_view rest = split->second;
  constexpr std::string_view mid = ".self_attn.";
  if (rest.substr(0, mid.size()) != mid) return std::nullopt;
  rest.remove_prefix(mid.size());
  const auto dot = rest.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  const std::string_view proj = rest.substr(0, dot), param = rest.substr(dot + 1);
  AttentionTensor t;
  t.layer = split->first;
  if (proj == "q_proj") t.role = TensorRole::query;
  else if (proj == "k_proj") t.role = TensorRole::key;
  else if (proj == "v_proj") t.role = TensorRole::value;
  else if (proj == "o_proj") t.role = TensorRole::output;
  else return std::nullopt;
  if (param == "weight") t.param = TensorParam::weight;
  else if (param == "bias") t.param = TensorParam::bias;
  else return std::nullopt;
  return t;
}

/// Why a tensor name shows a layout no family's rules can convert honestly (fused QKV, per-head q/k norms), or
/// nullopt. Compares whole dot-separated components, so "block_norm" is not mistaken for "k_norm".
inline std::optional<std::string> common_refusal(const std::vector<std::string_view>& parts, const std::string& name) {
  if (any_part_in(parts, {"c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj_weight",
                          "in_proj_bias"}))
    return concat("tensor '", name, "' is a fused QKV projection (as GPT-2's c_attn); its K and V rows cannot be "
                                    "told apart without architecture knowledge gqa does not have");
  if (any_part_in(parts, {"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"}))
    return concat("tensor '", name, "' is a per-head query/key norm; the norm of a pooled head is not the pool "
                                    "of the normed heads, so K cannot be pooled honestly");
  return std::nullopt;
}

/// Why a tensor name shows an architecture the converter cannot handle honestly, or nullopt (Llama family).
inline std::optional<std::string> unsupported_reason(const std::string& name) {
  const auto parts = name_parts(name);
  if (auto why = common_refusal(parts, name)) return why;
  if (any_part_in(parts, {"k_proj", "v_proj"}) && !classify_llama(name))
    return concat("tensor '", name, "' looks like a K/V projection but is not model.layers.<i>.self_attn."
                                    "{k_proj,v_proj}.{weight,bias} (quantised, adapter or other layout)");
  return std::nullopt;
}

/// "model.layers.<i>.input_layernorm.weight": the RMSNorm in front of layer i's attention.
inline std::optional<std::pair<Index, TensorParam>> llama_input_norm(std::string_view name) {
  const auto split = split_layer(name, "model.layers.");
  if (!split || split->second != ".input_layernorm.weight") return std::nullopt;
  return std::make_pair(split->first, TensorParam::weight);
}

inline std::optional<std::string> llama_config_refusal(const nlohmann::ordered_json& config) {
  for (const char* flag : {"qk_norm", "use_qk_norm", "qk_layernorm", "use_qk_layernorm"})
    if (config.contains(flag) && config[flag].is_boolean() && config[flag].get<bool>())
      return concat("config.json sets \"", flag, "\": per-head query/key norms cannot be pooled honestly");
  return std::nullopt;
}

/// Why config.json says the rotary embedding does not cover every dimension of every layer, naming the field and
/// its value, or nullopt when it does (or says nothing about it). PoolMethod::fit assumes full rotary; pooling whole
/// heads (mean, first, random) commutes with any rotary layout and needs no such check. Read as transformers 5 reads
/// them: partial_rotary_factor at the top level or inside rope_parameters / rope_scaling (also per layer type,
/// {"full_attention": {...}, ...}), full when int(head_dim * factor) = head_dim; GPT-J-style rotary_dim and
/// GPT-NeoX-style rotary_pct; no_rope_layers (SmolLM3, Llama 4: 1 = the layer uses rotary, 0 = it has none), and,
/// where that list is absent or null, no_rope_layer_interval (every interval-th layer has none; SmolLM3 and Llama 4
/// default to 4). A value of a form this does not understand is reported too, never taken as full rotary.
inline std::optional<std::string> partial_rotary(const nlohmann::ordered_json& config, Index head_dim, Index layers) {
  using json = nlohmann::ordered_json;
  auto shown = [](const json& v) { return v.dump(); };
  auto factor_reason = [&](const std::string& field, const json& v) -> std::optional<std::string> {
    if (v.is_null()) return std::nullopt;
    if (!v.is_number())
      return concat("\"", field, "\" = ", shown(v), " (not a number: the rotary share of each head is unknown)");
    const double f = v.get<double>();
    const double dims = std::floor(double(head_dim) * f);
    if (dims == double(head_dim)) return std::nullopt;
    return concat("\"", field, "\" = ", shown(v), " (rotary on ", dims, " of each head's ", head_dim,
                  " dimensions)");
  };
  for (const char* name : {"partial_rotary_factor", "rotary_pct"})
    if (config.contains(name))
      if (auto why = factor_reason(name, config[name])) return why;
  if (config.contains("rotary_dim") && !config["rotary_dim"].is_null()) {
    const json& v = config["rotary_dim"];
    if (!v.is_number_integer() || v.get<std::int64_t>() != head_dim)
      return concat("\"rotary_dim\" = ", shown(v), " (head_dim is ", head_dim, ")");
  }
  for (const char* block : {"rope_parameters", "rope_scaling"}) {
    if (!config.contains(block) || !config[block].is_object()) continue;
    const json& rp = config[block];
    if (rp.contains("partial_rotary_factor"))
      if (auto why = factor_reason(std::string(block) + ".partial_rotary_factor", rp["partial_rotary_factor"]))
        return why;
    for (const auto& [key, nested] : rp.items())  // per layer type, as transformers 5 nests them
      if (nested.is_object() && nested.contains("partial_rotary_factor"))
        if (auto why = factor_reason(std::string(block) + "." + key + ".partial_rotary_factor",
                                     nested["partial_rotary_factor"]))
          return why;
  }
  if (config.contains("no_rope_layers") && !config["no_rope_layers"].is_null()) {
    const json& v = config["no_rope_layers"];
    if (!v.is_array()) return concat("\"no_rope_layers\" = ", shown(v), " (not a list of 0 / 1 per layer)");
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (v[i].is_number_integer() && v[i].get<std::int64_t>() == 1) continue;
      if (v[i].is_number_integer() && v[i].get<std::int64_t>() == 0)
        return concat("\"no_rope_layers\"[", i, "] = 0 (layer ", i, " has no rotary embedding)");
      return concat("\"no_rope_layers\"[", i, "] = ", shown(v[i]), " (not 0 or 1)");
    }
    return std::nullopt;
  }
  const std::string type = config.contains("model_type") && config["model_type"].is_string()
                               ? config["model_type"].get<std::string>() : "";
  const bool nope_by_default = type == "smollm3" || type == "llama4" || type == "llama4_text";
  const bool has_interval = config.contains("no_rope_layer_interval") && !config["no_rope_layer_interval"].is_null();
  if (!has_interval && !nope_by_default) return std::nullopt;
  const json interval = has_interval ? config["no_rope_layer_interval"] : json(4);
  const std::string field = has_interval ? "\"no_rope_layer_interval\" = " + shown(interval)
                                         : "\"model_type\" = \"" + type + "\" without \"no_rope_layers\"";
  if (!interval.is_number_integer() || interval.get<std::int64_t>() < 1)
    return concat(field, " (not a positive layer count)");
  if (layers > 0 && interval.get<std::int64_t>() > layers) return std::nullopt;  // no layer is the interval-th
  return concat(field, " (layer i has no rotary embedding where i + 1 is a multiple of ", interval.get<std::int64_t>(),
                ")");
}

// ---- BERT (BertModel, BertFor*; sentence-transformers exports) ---------------------------------------------------

/// `name` without BertFor*'s "bert." prefix (BertModel and sentence-transformers checkpoints have none).
inline std::string_view bert_unprefixed(std::string_view name) {
  constexpr std::string_view prefix = "bert.";
  return name.substr(0, prefix.size()) == prefix ? name.substr(prefix.size()) : name;
}

/// "[bert.]encoder.layer.<i>.attention.self.{query,key,value}.{weight,bias}" and
/// "[bert.]encoder.layer.<i>.attention.output.dense.{weight,bias}", or nullopt.
inline std::optional<AttentionTensor> classify_bert(std::string_view name) {
  const auto split = split_layer(bert_unprefixed(name), "encoder.layer.");
  if (!split) return std::nullopt;
  static const std::pair<std::string_view, std::pair<TensorRole, TensorParam>> names[] = {
      {".attention.self.query.weight", {TensorRole::query, TensorParam::weight}},
      {".attention.self.query.bias", {TensorRole::query, TensorParam::bias}},
      {".attention.self.key.weight", {TensorRole::key, TensorParam::weight}},
      {".attention.self.key.bias", {TensorRole::key, TensorParam::bias}},
      {".attention.self.value.weight", {TensorRole::value, TensorParam::weight}},
      {".attention.self.value.bias", {TensorRole::value, TensorParam::bias}},
      {".attention.output.dense.weight", {TensorRole::output, TensorParam::weight}},
      {".attention.output.dense.bias", {TensorRole::output, TensorParam::bias}},
  };
  for (const auto& [rest, role] : names)
    if (split->second == rest) return AttentionTensor{split->first, role.first, role.second};
  return std::nullopt;
}

/// The LayerNorm whose output is layer i's attention input: embeddings.LayerNorm for layer 0, layer i-1's
/// output.LayerNorm (after its feed-forward block) for the others.
inline std::optional<std::pair<Index, TensorParam>> bert_input_norm(std::string_view name) {
  name = bert_unprefixed(name);
  Index layer = 0;
  std::string_view rest;
  if (name.substr(0, 21) == "embeddings.LayerNorm.") {
    rest = name.substr(21);
  } else if (const auto split = split_layer(name, "encoder.layer.");
             split && split->second.substr(0, 18) == ".output.LayerNorm.") {
    layer = split->first + 1;
    rest = split->second.substr(18);
  } else {
    return std::nullopt;
  }
  if (rest == "weight") return std::make_pair(layer, TensorParam::weight);
  if (rest == "bias") return std::make_pair(layer, TensorParam::bias);
  return std::nullopt;
}

inline std::optional<std::string> bert_refusal(const std::string& name) {
  const auto parts = name_parts(name);
  if (auto why = common_refusal(parts, name)) return why;
  if (any_part_in(parts, {"crossattention"}))
    return concat("tensor '", name, "' belongs to a cross-attention block (a BERT decoder); gqa converts "
                                    "self-attention only");
  const auto split = split_layer(bert_unprefixed(name), "encoder.layer.");
  if (split && split->second.substr(0, 16) == ".attention.self." && !classify_bert(name))
    return concat("tensor '", name, "' is part of a BERT self-attention block but not its query/key/value "
                                    "weight or bias (relative position embeddings, quantised or adapter tensors)");
  return std::nullopt;
}

inline std::optional<std::string> bert_config_refusal(const nlohmann::ordered_json& config) {
  if (config.contains("position_embedding_type") && config["position_embedding_type"].is_string() &&
      config["position_embedding_type"].get<std::string>() != "absolute")
    return concat("config.json sets \"position_embedding_type\": ", config["position_embedding_type"].dump(),
                  "; relative position scores read the per-head key rows in a way pooling does not model");
  return std::nullopt;
}

/// config.json's "model_type" is "bert", or an "architectures" entry starts with "Bert".
inline bool recognises_bert(const nlohmann::ordered_json& config) {
  if (!config.is_object()) return false;
  if (config.contains("model_type") && config["model_type"] == "bert") return true;
  if (config.contains("architectures") && config["architectures"].is_array())
    for (const auto& a : config["architectures"])
      if (a.is_string() && a.get<std::string>().rfind("Bert", 0) == 0) return true;
  return false;
}

/// The families gqa converts, in the order they are tried. Llama-style names are the fallback (last): GPT-2 and
/// other unknown checkpoints are refused by its refusals ("fused QKV") or for lacking its names. BERT runtimes have
/// no K/V head count (fields.kv_heads = nullptr), so BERT outputs are written expanded back to H heads.
inline const std::vector<ArchitectureRules>& architectures() {
  static const std::vector<ArchitectureRules> rules{
      {"BERT", recognises_bert, classify_bert, bert_refusal, bert_config_refusal,
       {"num_attention_heads", nullptr, "hidden_size", nullptr, "num_hidden_layers"},
       "encoder.layer.<i>.attention.self.key.weight", RotaryPairs::none, bert_input_norm},
      {"Llama/Mistral/Qwen2", [](const nlohmann::ordered_json&) { return true; }, classify_llama,
       unsupported_reason, llama_config_refusal,
       {"num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_hidden_layers"},
       "model.layers.<i>.self_attn.k_proj.weight", RotaryPairs::half_split, llama_input_norm},
  };
  return rules;
}

/// The rules for a checkpoint's config.json.
inline const ArchitectureRules& rules_for(const nlohmann::ordered_json& config) {
  for (const auto& family : architectures())
    if (family.recognises(config)) return family;
  return architectures().back();
}

}  // namespace gqa::detail
