// gqa/detail/checkpoint_rules.hpp — what the checkpoint converter knows about each architecture family: which
// tensor names are attention projections (and of which layer, role and parameter), which names it must refuse, which
// config.json fields hold the geometry, and how the converted config is written. Everything else (shape checks,
// planning, writing) is shared and lives in gqa/checkpoint_plan.hpp and gqa/checkpoint.hpp. Not part of the public
// API; include gqa/checkpoint.hpp.
//
// ADDING AN ARCHITECTURE means adding one ArchitectureRules value to architectures(): a recogniser (from config.json's
// "architectures" / "model_type"), a name classifier, a refusal check, the config field names, and whether the
// output keeps the K/V head count in its config (Llama: num_key_value_heads) or, for runtimes without one (BERT), is
// written expanded back to H heads. The shape rules are those of nn.Linear and need no per-family code:
//   query  weight [H*D, hidden]  bias [H*D]
//   key    weight [G*D, hidden]  bias [G*D]      (value the same)
//   output weight [hidden, H*D]  bias [hidden]   (the bias is not per head and is copied)
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
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

/// Why a tensor name shows an architecture the converter cannot handle honestly, or nullopt. Compares whole
/// dot-separated components, so "block_norm" is not mistaken for "k_norm".
inline std::optional<std::string> unsupported_reason(const std::string& name) {
  const auto parts = name_parts(name);
  if (any_part_in(parts, {"c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj_weight",
                          "in_proj_bias"}))
    return concat("tensor '", name, "' is a fused QKV projection (as GPT-2's c_attn); its K and V rows cannot be "
                                    "told apart without architecture knowledge gqa does not have");
  if (any_part_in(parts, {"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm"}))
    return concat("tensor '", name, "' is a per-head query/key norm; the norm of a pooled head is not the pool "
                                    "of the normed heads, so K cannot be pooled honestly");
  if (any_part_in(parts, {"k_proj", "v_proj"}) && !classify_llama(name))
    return concat("tensor '", name, "' looks like a K/V projection but is not model.layers.<i>.self_attn."
                                    "{k_proj,v_proj}.{weight,bias} (quantised, adapter or other layout)");
  return std::nullopt;
}

inline std::optional<std::string> llama_config_refusal(const nlohmann::ordered_json& config) {
  for (const char* flag : {"qk_norm", "use_qk_norm", "qk_layernorm", "use_qk_layernorm"})
    if (config.contains(flag) && config[flag].is_boolean() && config[flag].get<bool>())
      return concat("config.json sets \"", flag, "\": per-head query/key norms cannot be pooled honestly");
  return std::nullopt;
}

/// The families gqa converts, in the order they are tried. Llama-style names are the fallback: GPT-2 and other
/// unknown checkpoints are refused by its refusals ("fused QKV") or for lacking its names.
inline const std::vector<ArchitectureRules>& architectures() {
  static const std::vector<ArchitectureRules> rules{
      {"Llama/Mistral/Qwen2", [](const nlohmann::ordered_json&) { return true; }, classify_llama,
       unsupported_reason, llama_config_refusal,
       {"num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_hidden_layers"},
       "model.layers.<i>.self_attn.k_proj.weight"},
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
