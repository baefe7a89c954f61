// examples/model/config.hpp — the one reader of a Hugging Face config.json for the Llama-family model code
// (example_decoder, gqa-uptrain): every field that changes the math is read as transformers 5 reads it for the
// model_type (llama, mistral, qwen2), or refused by name.
//
// Offers (namespace llama):
//   Config, parse_config()            the fields this model code understands
//   Rotary                            the rotary embedding: rope_type and its parameters
//   detail::rotary_frequencies(c, n)  the per-pair frequencies of one forward call whose last position is n - 1
//   detail::rotary_scaling(c)         the factor transformers multiplies cos and sin by (yarn, longrope)
//   fail(), check()                   typed errors "[gqa.decoder.<id>] ..." shared by the model code
//
// How transformers 5.25 reads the rotary fields (configuration_utils.py, modeling_rope_utils.py), and so this code:
//   * the rotary dict is `rope_scaling` (the older form) or else `rope_parameters`; a config with both is read here
//     only when they are equal (transformers silently drops rope_parameters);
//   * rope_theta comes from the dict, else from the top-level key, else 10000; rope_type from "rope_type", else
//     "type", else "default"; a top-level partial_rotary_factor and original_max_position_embeddings likewise fill
//     the dict (two different values of one field are refused, whichever transformers would pick);
//   * "default" ignores partial_rotary_factor (LlamaRotaryEmbedding uses the whole head_dim); the other types
//     rotate int(head_dim * partial_rotary_factor) dimensions, which fails in transformers' apply_rotary_pos_emb
//     unless that is head_dim: refused unless it is;
//   * "dynamic" recomputes its frequencies only past max_position_embeddings, which a State never reaches, so it
//     equals "default" on every context this code runs; "longrope" picks long_factor when the forward call's
//     length exceeds original_max_position_embeddings (transformers' longrope_frequency_update, per call: a cached
//     key keeps the factors of the call that computed it; Model::forward's call_length gives a prefill in chunks
//     the length of the whole prefill, as transformers' one call over it);
//   * keys of the dict that transformers does not read for the type are ignored, as transformers ignores them
//     (it logs a warning); types other than these six (proportional, axial, ...) are refused.
// Windows (gqa::AttentionOptions::window per layer):
//   * llama: sliding_window and layer_types ignored (LlamaAttention passes no window), except a layer_types naming
//     sliding_attention with no sliding_window, on which transformers fails: refused;
//   * mistral: sliding_window (4096 when absent, none when null) on every layer; layer_types is refused
//     (MistralConfig with layer_types fails to build in transformers 5.25);
//   * qwen2: only with use_sliding_window = true (sliding_window 4096 when absent), on the layers layer_types marks
//     sliding_attention, or without layer_types on layers >= max_window_layers (28 when absent).
#pragma once

#include <gqa/checkpoint_plan.hpp>  // gqa::parse_model_config: the geometry exactly as gqa-convert reads it
#include <gqa/errors.hpp>
#include <gqa/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

/// The rotary embedding as transformers' ROPE_INIT_FUNCTIONS compute it (see the header comment).
struct Rotary {
  std::string type = "default";  ///< default, linear, dynamic, yarn, llama3, longrope
  double theta = 10000;          ///< rope_theta
  double factor = 1;             ///< linear, dynamic, yarn, llama3, longrope
  double original_max_positions = 0;              ///< yarn, llama3, longrope
  double low_freq_factor = 1, high_freq_factor = 4;  ///< llama3
  double beta_fast = 32, beta_slow = 1;           ///< yarn
  bool truncate = true;                           ///< yarn
  double attention_factor = 1;                    ///< yarn, longrope: multiplies cos and sin
  std::vector<double> short_factor, long_factor;  ///< longrope, [head_dim / 2] each
};

struct Config {
  std::string model_type = "llama";
  Index vocab = 0, hidden = 0, intermediate = 0, layers = 0;
  Index heads = 0, kv_heads = 0, head_dim = 0;  ///< H, G, D
  Index max_positions = 2048;                   ///< max_position_embeddings
  double rms_norm_eps = 1e-6;
  Rotary rope;
  bool tie_word_embeddings = false;
  std::vector<Index> windows;  ///< [layers] sliding window of each layer; 0: none (gqa::AttentionOptions::window)
  std::vector<std::int32_t> eos_ids;
};

namespace detail {

using Json = nlohmann::ordered_json;

/// A config value for a message: JSON, ASCII only (control and non-ASCII bytes escaped, invalid UTF-8 replaced),
/// at most 64 characters.
inline std::string dump(const Json& v) {
  std::string s = v.dump(-1, ' ', true, Json::error_handler_t::replace);
  return s.size() > 64 ? s.substr(0, 61) + "..." : s;
}

/// Text for a message with control and non-ASCII bytes escaped as JSON does (\u0000), invalid UTF-8 replaced.
inline std::string escaped(const std::string& text) {
  const std::string s = Json(text).dump(-1, ' ', true, Json::error_handler_t::replace);
  return s.substr(1, s.size() - 2);
}

inline bool has(const Json& j, const char* name) { return j.contains(name) && !j[name].is_null(); }

/// j[name] as a finite positive number (integers too).
inline double positive_number(const Json& j, const char* name, const std::string& where) {
  const Json& v = j[name];
  check<gqa::format_error>(v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() > 0, "config", where,
                           ": \"", name, "\" = ", dump(v), " is not a positive number");
  return v.get<double>();
}

inline double number(const Json& j, const char* name, double fallback, const std::string& where) {
  return has(j, name) ? positive_number(j, name, where) : fallback;
}

/// v as an integer in [lo, hi], checked on the JSON value before any narrowing (nlohmann keeps integers above
/// 2^63 - 1 as unsigned, which get<std::int64_t>() would wrap).
inline std::int64_t integer_in(const Json& v, std::int64_t lo, std::int64_t hi, const std::string& what) {
  const bool ok = v.is_number_integer() &&
                  (v.is_number_unsigned() ? v.get<std::uint64_t>() <= std::uint64_t(hi)
                                          : v.get<std::int64_t>() >= lo && v.get<std::int64_t>() <= hi) &&
                  v.get<std::int64_t>() >= lo;
  check<gqa::format_error>(ok, "config", what, " = ", dump(v), " is not an integer in [", lo, ", ", hi, "]");
  return v.get<std::int64_t>();
}

inline Index integer(const Json& j, const char* name, std::optional<Index> fallback, const std::string& where) {
  if (!has(j, name)) {
    check<gqa::format_error>(fallback.has_value(), "config", where, ": missing \"", name, "\"");
    return *fallback;
  }
  return Index(integer_in(j[name], 1, std::numeric_limits<std::int64_t>::max(), where + ": \"" + name + "\""));
}

inline bool boolean(const Json& j, const char* name, bool fallback, const std::string& where) {
  if (!has(j, name)) return fallback;
  check<gqa::format_error>(j[name].is_boolean(), "config", where, ": \"", name, "\" = ", dump(j[name]),
                           " is not a boolean");
  return j[name].get<bool>();
}

/// One field that transformers fills from the top level when the rotary dict lacks it: the value, if any; two
/// different values are refused.
inline std::optional<double> rope_field(const Json& top, const Json& r, const char* name, const std::string& where) {
  const std::optional<double> inner = has(r, name) ? std::optional<double>(positive_number(r, name, where + " rope"))
                                                   : std::nullopt;
  const std::optional<double> outer = has(top, name) ? std::optional<double>(positive_number(top, name, where))
                                                     : std::nullopt;
  if (inner && outer && *inner != *outer)
    fail("unsupported", where, ": \"", name, "\" = ", *outer, " at the top level and ", name, " = ", *inner,
         " in the rotary dict disagree");
  return inner ? inner : outer;
}

/// yarn_get_mscale of modeling_rope_utils.py.
inline double yarn_mscale(double scale, double mscale) { return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1; }

inline std::vector<double> factor_list(const Json& r, const char* name, Index half, const std::string& where) {
  check<gqa::format_error>(has(r, name) && r[name].is_array() && Index(r[name].size()) == half, "config", where,
                           ": longrope needs \"", name, "\", a list of head_dim / 2 = ", half, " numbers, got ",
                           has(r, name) ? dump(r[name]) : "none");
  std::vector<double> f;
  for (const auto& v : r[name]) {
    check<gqa::format_error>(v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() > 0, "config", where,
                             ": ", name, " holds ", dump(v), ", not a positive number");
    f.push_back(v.get<double>());
  }
  return f;
}

/// The type-specific parameters of r (rotary dict, rope type already known) into rope.
inline void parse_rope_type(const Json& top, const Json& r, const Config& c, Rotary& rope, const std::string& where) {
  const std::string w = where + " rope " + rope.type;
  const auto required = [&](const char* name) {
    check<gqa::format_error>(r.contains(name), "config", w, ": missing \"", name, "\"");
  };
  if (rope.type == "linear" || rope.type == "dynamic" || rope.type == "llama3") {
    required("factor");
    rope.factor = positive_number(r, "factor", w);
  }
  if (rope.type == "yarn" || rope.type == "llama3" || rope.type == "longrope")
    rope.original_max_positions =
        rope_field(top, r, "original_max_position_embeddings", where).value_or(double(c.max_positions));
  if (rope.type == "llama3") {
    required("low_freq_factor");
    required("high_freq_factor");
    rope.low_freq_factor = positive_number(r, "low_freq_factor", w);
    rope.high_freq_factor = positive_number(r, "high_freq_factor", w);
    check<gqa::format_error>(rope.high_freq_factor > rope.low_freq_factor, "config", w, ": high_freq_factor ",
                             rope.high_freq_factor, " must exceed low_freq_factor ", rope.low_freq_factor);
  }
  if (rope.type == "yarn" || rope.type == "longrope") {
    if (rope.type == "yarn") required("factor");  // longrope's is optional; both take null as the implicit ratio
    rope.factor = has(r, "factor") ? positive_number(r, "factor", w) : double(c.max_positions) / rope.original_max_positions;
  }
  if (rope.type == "yarn") {
    // transformers reads `get("beta_fast") or 32`: absent, null and 0 all mean the default.
    const auto or_default = [&](const char* name, double fallback) {
      if (!has(r, name)) return fallback;
      check<gqa::format_error>(r[name].is_number() && std::isfinite(r[name].get<double>()) && r[name].get<double>() >= 0,
                               "config", w, ": \"", name, "\" = ", dump(r[name]), " is not a number >= 0");
      return r[name].get<double>() == 0 ? fallback : r[name].get<double>();
    };
    rope.beta_fast = or_default("beta_fast", 32);
    rope.beta_slow = or_default("beta_slow", 1);
    // get("truncate", True): a null is Python's None, false.
    rope.truncate = r.contains("truncate") && r["truncate"].is_null() ? false : boolean(r, "truncate", true, w);
    const double mscale = or_default("mscale", 0), mscale_all_dim = or_default("mscale_all_dim", 0);
    rope.attention_factor = has(r, "attention_factor") ? positive_number(r, "attention_factor", w)
                            : mscale != 0 && mscale_all_dim != 0
                                ? yarn_mscale(rope.factor, mscale) / yarn_mscale(rope.factor, mscale_all_dim)
                                : yarn_mscale(rope.factor, 1);
  }
  if (rope.type == "longrope") {
    check<gqa::format_error>(rope.original_max_positions > 1 || has(r, "attention_factor"), "config", w,
                             ": original_max_position_embeddings = ", rope.original_max_positions,
                             " must exceed 1 (its log divides the attention factor)");
    rope.short_factor = factor_list(r, "short_factor", c.head_dim / 2, w);
    rope.long_factor = factor_list(r, "long_factor", c.head_dim / 2, w);
    rope.attention_factor =
        has(r, "attention_factor") ? positive_number(r, "attention_factor", w)
        : rope.factor <= 1 ? 1.0
                           : std::sqrt(1 + std::log(rope.factor) / std::log(rope.original_max_positions));
  }
}

inline Rotary parse_rotary(const Json& j, const Config& c, const std::string& where) {
  const bool scaling = has(j, "rope_scaling"), params = has(j, "rope_parameters");
  if (scaling && params && j["rope_scaling"] != j["rope_parameters"])
    fail("unsupported", where, ": \"rope_scaling\" = ", dump(j["rope_scaling"]), " and \"rope_parameters\" = ",
         dump(j["rope_parameters"]), " disagree");
  const char* key = scaling ? "rope_scaling" : "rope_parameters";
  const Json r = scaling || params ? j[key] : Json::object();
  check<gqa::format_error>(r.is_object(), "config", where, ": \"", key, "\" = ", dump(r), " is not an object");
  for (const char* layer_type : {"full_attention", "sliding_attention"})
    check(!r.contains(layer_type), "unsupported", where, ": \"", key, "\" holds per-layer-type parameters (\"",
          layer_type, "\"), which Llama, Mistral and Qwen2 do not have");
  Rotary rope;
  for (const char* name : {"rope_type", "type"})
    if (has(r, name))
      check<gqa::format_error>(r[name].is_string(), "config", where, ": ", key, " \"", name, "\" = ", dump(r[name]),
                               " is not a string");
  const std::string type = has(r, "rope_type") ? r["rope_type"].get<std::string>()
                           : has(r, "type")    ? r["type"].get<std::string>()
                                               : "default";
  if (has(r, "rope_type") && has(r, "type") && r["type"] != r["rope_type"])
    fail("unsupported", where, ": ", key, " rope_type = ", dump(r["rope_type"]), " and type = ", dump(r["type"]),
         " disagree");
  check(type == "default" || type == "linear" || type == "dynamic" || type == "yarn" || type == "llama3" ||
            type == "longrope",
        "unsupported", where, ": ", key, " rope_type = ", dump(type),
        " is not supported (default, linear, dynamic, yarn, llama3, longrope)");
  rope.type = type;
  rope.theta = rope_field(j, r, "rope_theta", where).value_or(10000.0);
  const double partial = rope_field(j, r, "partial_rotary_factor", where).value_or(1.0);
  const double rotated = std::floor(double(c.head_dim) * partial);  // int(head_dim * partial_rotary_factor)
  check(type == "default" || rotated == double(c.head_dim), "unsupported", where, ": partial_rotary_factor = ",
        partial, " with rope_type ", dump(type), " rotates ", rotated, " of head_dim = ", c.head_dim,
        " dimensions, which transformers' Llama, Mistral and Qwen2 cannot run (only \"default\" ignores it)");
  check(type != "dynamic" || c.head_dim > 2, "unsupported", where,
        ": rope_type \"dynamic\" with head_dim = 2 (its exponent dim / (dim - 2) divides by zero)");
  parse_rope_type(j, r, c, rope, where);
  return rope;
}

inline std::vector<std::string> layer_types(const Json& j, Index layers, const std::string& where) {
  std::vector<std::string> types;
  if (!has(j, "layer_types")) return types;
  const Json& t = j["layer_types"];
  check<gqa::format_error>(t.is_array() && Index(t.size()) == layers, "config", where, ": \"layer_types\" = ", dump(t),
                           " is not a list of num_hidden_layers = ", layers, " entries");
  for (const auto& v : t) {
    check(v == "full_attention" || v == "sliding_attention", "unsupported", where, ": layer_types holds ", dump(v),
          " (full_attention and sliding_attention only)");
    types.push_back(v.get<std::string>());
  }
  return types;
}

/// sliding_window as the model type reads it when the key is absent (`absent`) or null (none): 0 for none.
inline Index window_value(const Json& j, Index absent, const std::string& where) {
  if (!j.contains("sliding_window")) return absent;
  if (j["sliding_window"].is_null()) return 0;
  return integer(j, "sliding_window", std::nullopt, where);
}

/// Each layer's window, as transformers' modeling code for the model type applies it (see the header comment).
inline std::vector<Index> parse_windows(const Json& j, const Config& c, const std::string& where) {
  const std::vector<std::string> types = layer_types(j, c.layers, where);
  const auto sliding = [&](size_t l) { return !types.empty() && types[l] == "sliding_attention"; };
  const bool any_sliding = std::count(types.begin(), types.end(), "sliding_attention") > 0;
  std::vector<Index> w(size_t(c.layers), 0);
  if (c.model_type == "llama") {
    check(!any_sliding || has(j, "sliding_window"), "unsupported", where,
          ": layer_types names sliding_attention but there is no sliding_window (transformers' Llama fails on it)");
  } else if (c.model_type == "mistral") {
    if (j.contains("layer_types"))
      fail("unsupported", where, ": layer_types = ", dump(j["layer_types"]),
           " on model_type \"mistral\" (transformers 5's MistralConfig fails on it; Ministral reads it)");
    std::fill(w.begin(), w.end(), window_value(j, 4096, where));
  } else {  // qwen2
    const Index window = boolean(j, "use_sliding_window", false, where) ? window_value(j, 4096, where) : 0;
    const Index first = has(j, "max_window_layers") ? Index(detail::integer_in(j["max_window_layers"], 0,
                                                                               std::numeric_limits<std::int64_t>::max(),
                                                                               where + ": \"max_window_layers\""))
                                                    : 28;
    check(!any_sliding || window > 0, "unsupported", where,
          ": layer_types names sliding_attention but use_sliding_window is not true or sliding_window is null "
          "(transformers' Qwen2 fails on it)");
    for (size_t l = 0; l < w.size(); ++l) w[l] = (types.empty() ? Index(l) >= first : sliding(l)) ? window : 0;
  }
  return w;
}

inline std::vector<std::int32_t> parse_eos(const Json& j, const std::string& where) {
  std::vector<std::int32_t> ids;
  if (!has(j, "eos_token_id")) return ids;
  const Json& e = j["eos_token_id"];
  const std::int64_t top = std::numeric_limits<std::int32_t>::max();
  if (!e.is_array()) return {std::int32_t(integer_in(e, 0, top, where + ": \"eos_token_id\""))};
  for (const auto& v : e) ids.push_back(std::int32_t(integer_in(v, 0, top, where + ": an \"eos_token_id\" entry")));
  return ids;
}

}  // namespace detail

/// The fields of config.json this decoder uses; what it cannot run faithfully is refused, never ignored.
inline Config parse_config(const nlohmann::ordered_json& j, const std::string& where = "config.json") {
  using detail::dump;
  const gqa::ModelConfig geometry = gqa::parse_model_config(j, where);
  Config c;
  if (j.contains("model_type")) {
    check(j["model_type"].is_string(), "unsupported", where, ": model_type = ", dump(j["model_type"]),
          " is not a string (llama, mistral, qwen2)");
    c.model_type = j["model_type"].get<std::string>();
    check(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2", "unsupported", where,
          ": model_type = ", dump(j["model_type"]), " is not supported (llama, mistral, qwen2)");
  }
  c.heads = geometry.heads;
  c.kv_heads = geometry.kv_heads;
  c.hidden = geometry.hidden;
  c.head_dim = geometry.head_dim;
  c.layers = detail::integer(j, "num_hidden_layers", std::nullopt, where);
  c.vocab = detail::integer(j, "vocab_size", std::nullopt, where);
  c.intermediate = detail::integer(j, "intermediate_size", std::nullopt, where);
  // The config classes' defaults: LlamaConfig 2048, MistralConfig 4096 * 32, Qwen2Config 32768.
  const Index default_positions = c.model_type == "llama" ? 2048 : c.model_type == "mistral" ? 131072 : 32768;
  c.max_positions = detail::integer(j, "max_position_embeddings", default_positions, where);
  c.rms_norm_eps = detail::number(j, "rms_norm_eps", 1e-6, where);
  c.eos_ids = detail::parse_eos(j, where);
  if (j.contains("hidden_act"))
    check(j["hidden_act"] == "silu", "unsupported", where, ": hidden_act = ", dump(j["hidden_act"]),
          " is not supported (silu only: SwiGLU MLP)");
  if (j.contains("mlp_bias"))
    check(j["mlp_bias"] == false, "unsupported", where, ": mlp_bias = ", dump(j["mlp_bias"]),
          " is not supported");
  c.tie_word_embeddings = detail::boolean(j, "tie_word_embeddings", false, where);
  check(c.head_dim % 2 == 0, "unsupported", where, ": head_dim = ", c.head_dim,
        " is odd; rotary embeddings pair dimension i with i + head_dim/2");
  c.rope = detail::parse_rotary(j, c, where);
  c.windows = detail::parse_windows(j, c, where);
  return c;
}

namespace detail {

/// transformers' inv_freq for one forward call over positions .. seq_len - 1: theta^(-2i/D), rescaled as the rope
/// type says (modeling_rope_utils.py's _compute_*_parameters and dynamic_rope_update).
inline std::vector<double> rotary_frequencies(const Config& c, Index seq_len) {
  const Rotary& r = c.rope;
  const Index D = c.head_dim, half = D / 2;
  double theta = r.theta;
  if (r.type == "dynamic") {  // NTK: a larger base past max_position_embeddings only
    const double n = double(std::max(seq_len, c.max_positions)), m = double(c.max_positions);
    theta *= std::pow(r.factor * n / m - (r.factor - 1), double(D) / double(D - 2));
  }
  std::vector<double> f(static_cast<size_t>(half));
  for (Index i = 0; i < half; ++i) f[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(D));
  if (r.type == "linear") {
    for (double& x : f) x /= r.factor;
  } else if (r.type == "longrope") {
    const auto& ext = double(seq_len) > r.original_max_positions ? r.long_factor : r.short_factor;
    for (Index i = 0; i < half; ++i) f[size_t(i)] /= ext[size_t(i)];
  } else if (r.type == "llama3") {
    // Long wavelengths divided by factor, short ones kept, a smooth blend between.
    const double old_len = r.original_max_positions, low_wavelen = old_len / r.low_freq_factor,
                 high_wavelen = old_len / r.high_freq_factor;
    for (double& x : f) {
      const double wavelen = 2 * M_PI / x;
      if (wavelen > low_wavelen) {
        x /= r.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        x = (1 - smooth) * x / r.factor + smooth * x;
      }
    }
  } else if (r.type == "yarn") {
    // Dimensions that turn fewer than beta_slow times over the original context are interpolated (divided by
    // factor), more than beta_fast times extrapolated (kept), a linear ramp between.
    const auto correction_dim = [&](double rotations) {
      return double(D) * std::log(r.original_max_positions / (rotations * 2 * M_PI)) / (2 * std::log(r.theta));
    };
    double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, double(D - 1));
    if (low == high) high += 0.001;
    for (Index i = 0; i < half; ++i) {
      const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0), keep = 1 - ramp;
      f[size_t(i)] = f[size_t(i)] / r.factor * (1 - keep) + f[size_t(i)] * keep;
    }
  }
  return f;
}

/// The factor transformers multiplies cos and sin by (its attention_scaling): 1 but for yarn and longrope.
inline double rotary_scaling(const Config& c) {
  return c.rope.type == "yarn" || c.rope.type == "longrope" ? c.rope.attention_factor : 1.0;
}

}  // namespace detail

}  // namespace llama
