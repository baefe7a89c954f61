// examples/model/config.hpp — the one reader of a Hugging Face config.json for the Llama-family model code
// (example_decoder, gqa-uptrain): every field that changes the math is read as transformers reads it for the
// model_type, or refused by name.
//
// Offers (namespace llama):
//   Config, parse_config()     the fields this model code understands
//   rotary_frequencies()       the per-pair rotary frequencies the config implies
//   fail(), check()            typed errors "[gqa.decoder.<id>] ..." shared by the model code
#pragma once

#include <gqa/checkpoint_plan.hpp>  // gqa::parse_model_config: the geometry exactly as gqa-convert reads it
#include <gqa/errors.hpp>
#include <gqa/types.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace llama {

using gqa::Index;

template <typename E = gqa::invalid_argument, typename... Args>
[[noreturn]] void fail(const char* id, Args&&... parts) {
  std::ostringstream os;
  os << "[gqa.decoder." << id << "] ";
  (os << ... << std::forward<Args>(parts));
  throw E(os.str());
}

template <typename E = gqa::invalid_argument, typename... Args>
void check(bool ok, const char* id, Args&&... parts) {
  if (!ok) fail<E>(id, std::forward<Args>(parts)...);
}

/// rope_scaling {"rope_type": "llama3", ...} (Llama 3.1 / 3.2).
struct Llama3Scaling {
  double factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 8192;
};

struct Config {
  Index vocab = 0, hidden = 0, intermediate = 0, layers = 0;
  Index heads = 0, kv_heads = 0, head_dim = 0;  ///< H, G, D
  Index max_positions = 2048;                   ///< max_position_embeddings
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000;
  std::optional<Llama3Scaling> llama3;
  bool tie_word_embeddings = false;
  Index sliding_window = 0;  ///< 0: none (gqa::AttentionOptions::window)
  std::vector<std::int32_t> eos_ids;
};

namespace detail {

inline std::string dump(const nlohmann::ordered_json& v) {
  std::string s = v.dump();
  return s.size() > 64 ? s.substr(0, 61) + "..." : s;
}

inline double number(const nlohmann::ordered_json& j, const char* name, double fallback, const std::string& where) {
  if (!j.contains(name) || j[name].is_null()) return fallback;
  check<gqa::format_error>(j[name].is_number() && j[name].get<double>() > 0, "config", where, ": \"", name,
                           "\" = ", dump(j[name]), " is not a positive number");
  return j[name].get<double>();
}

inline Index integer(const nlohmann::ordered_json& j, const char* name, std::optional<Index> fallback,
                     const std::string& where) {
  if (!j.contains(name) || j[name].is_null()) {
    check<gqa::format_error>(fallback.has_value(), "config", where, ": missing \"", name, "\"");
    return *fallback;
  }
  check<gqa::format_error>(j[name].is_number_integer() && j[name].get<std::int64_t>() > 0, "config", where, ": \"",
                           name, "\" = ", dump(j[name]), " is not a positive integer");
  return Index(j[name].get<std::int64_t>());
}

inline std::optional<Llama3Scaling> parse_rope_scaling(const nlohmann::ordered_json& j, const std::string& where) {
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return std::nullopt;
  const auto& r = j["rope_scaling"];
  check<gqa::format_error>(r.is_object(), "config", where, ": \"rope_scaling\" = ", dump(r), " is not an object");
  // Hugging Face writes "rope_type" (and older configs "type").
  const char* key = r.contains("rope_type") ? "rope_type" : "type";
  check<gqa::format_error>(r.contains(key) && r[key].is_string(), "config", where,
                           ": \"rope_scaling\" has no string \"rope_type\": ", dump(r));
  const std::string kind = r[key].get<std::string>();
  if (kind == "default") return std::nullopt;
  check(kind == "llama3", "unsupported", where, ": rope_scaling ", key, " = \"", kind,
        "\" is not supported (this decoder implements \"llama3\" and unscaled rotary embeddings only)");
  Llama3Scaling s;
  s.factor = number(r, "factor", std::nan(""), where + " rope_scaling");
  s.low_freq_factor = number(r, "low_freq_factor", std::nan(""), where + " rope_scaling");
  s.high_freq_factor = number(r, "high_freq_factor", std::nan(""), where + " rope_scaling");
  s.original_max_position_embeddings =
      double(integer(r, "original_max_position_embeddings", std::nullopt, where + " rope_scaling"));
  for (double v : {s.factor, s.low_freq_factor, s.high_freq_factor})
    check<gqa::format_error>(!std::isnan(v), "config", where,
                             ": rope_scaling llama3 needs factor, low_freq_factor and high_freq_factor: ", dump(r));
  check<gqa::format_error>(s.high_freq_factor > s.low_freq_factor, "config", where,
                           ": rope_scaling high_freq_factor ", s.high_freq_factor, " must exceed low_freq_factor ",
                           s.low_freq_factor);
  return s;
}

inline std::vector<std::int32_t> parse_eos(const nlohmann::ordered_json& j) {
  std::vector<std::int32_t> ids;
  if (!j.contains("eos_token_id")) return ids;
  const auto& e = j["eos_token_id"];
  if (e.is_number_integer()) ids.push_back(std::int32_t(e.get<std::int64_t>()));
  if (e.is_array())
    for (const auto& v : e)
      if (v.is_number_integer()) ids.push_back(std::int32_t(v.get<std::int64_t>()));
  return ids;
}

}  // namespace detail

/// The fields of config.json this decoder uses; what it cannot run faithfully is refused, never ignored.
inline Config parse_config(const nlohmann::ordered_json& j, const std::string& where = "config.json") {
  using detail::dump;
  const gqa::ModelConfig geometry = gqa::parse_model_config(j, where);
  Config c;
  c.heads = geometry.heads;
  c.kv_heads = geometry.kv_heads;
  c.hidden = geometry.hidden;
  c.head_dim = geometry.head_dim;
  c.layers = detail::integer(j, "num_hidden_layers", std::nullopt, where);
  c.vocab = detail::integer(j, "vocab_size", std::nullopt, where);
  c.intermediate = detail::integer(j, "intermediate_size", std::nullopt, where);
  c.max_positions = detail::integer(j, "max_position_embeddings", 2048, where);  // LlamaConfig's default
  c.rms_norm_eps = detail::number(j, "rms_norm_eps", 1e-6, where);
  c.rope_theta = detail::number(j, "rope_theta", 10000, where);
  c.llama3 = detail::parse_rope_scaling(j, where);
  c.eos_ids = detail::parse_eos(j);

  if (j.contains("model_type") && j["model_type"].is_string()) {
    const std::string t = j["model_type"].get<std::string>();
    check(t == "llama" || t == "mistral" || t == "qwen2", "unsupported", where, ": model_type = \"", t,
          "\" is not supported (llama, mistral, qwen2)");
  }
  if (j.contains("hidden_act"))
    check(j["hidden_act"] == "silu", "unsupported", where, ": hidden_act = ", dump(j["hidden_act"]),
          " is not supported (silu only: SwiGLU MLP)");
  if (j.contains("partial_rotary_factor") && !j["partial_rotary_factor"].is_null())
    check(j["partial_rotary_factor"] == 1 || j["partial_rotary_factor"] == 1.0, "unsupported", where,
          ": partial_rotary_factor = ", dump(j["partial_rotary_factor"]), " is not supported (1 only)");
  if (j.contains("mlp_bias"))
    check(j["mlp_bias"] == false, "unsupported", where, ": mlp_bias = ", dump(j["mlp_bias"]),
          " is not supported");
  if (j.contains("tie_word_embeddings")) {
    check<gqa::format_error>(j["tie_word_embeddings"].is_boolean(), "config", where, ": tie_word_embeddings = ",
                             dump(j["tie_word_embeddings"]), " is not a boolean");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  // Qwen2 keeps sliding_window in its config but applies it only with use_sliding_window, and then to some layers.
  const bool qwen_window = j.contains("use_sliding_window") && j["use_sliding_window"] == true;
  check(!qwen_window, "unsupported", where, ": use_sliding_window = true is not supported (Qwen2 applies the "
        "window to layers past max_window_layers only)");
  if (!j.contains("use_sliding_window") && j.contains("sliding_window") && !j["sliding_window"].is_null())
    c.sliding_window = detail::integer(j, "sliding_window", std::nullopt, where);
  check(c.head_dim % 2 == 0, "unsupported", where, ": head_dim = ", c.head_dim,
        " is odd; rotary embeddings pair dimension i with i + head_dim/2");
  return c;
}


namespace detail {

/// Hugging Face's rotary frequencies: theta^(-2i/D), then the llama3 rescaling (long wavelengths divided by
/// factor, short ones kept, a smooth blend between).
inline std::vector<double> rotary_frequencies(const Config& c) {
  const Index half = c.head_dim / 2;
  std::vector<double> f(static_cast<size_t>(half));
  for (Index i = 0; i < half; ++i) f[size_t(i)] = std::pow(c.rope_theta, -double(2 * i) / double(c.head_dim));
  if (!c.llama3) return f;
  const Llama3Scaling& s = *c.llama3;
  const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
  const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
  for (double& x : f) {
    const double wavelen = 2 * M_PI / x;
    if (wavelen > low_wavelen) {
      x /= s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth =
          (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      x = (1 - smooth) * x / s.factor + smooth * x;
    }
  }
  return f;
}

}  // namespace detail

}  // namespace llama
