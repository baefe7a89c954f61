// examples/model/llama.hpp — a minimal Llama-family decoder (Llama, Mistral, Qwen2) built on gqa: the model code
// behind example_decoder (examples/decoder.cpp) and tests/test_decoder.cpp. Copy it as the start of your own.
//
// Offers (namespace llama):
//   (Config and parse_config() are in config.hpp: the one config.json reader of the model code)
//   Model::load(dir)         config.json + model.safetensors (or a sharded index), memory-mapped; the weights
//                            as stored or as the WeightType asked for (see Weights below)
//   Model::load(dir, shard)  only one process's part of each layer (tensor parallel: Shard; the MPI side is
//                            tensor_parallel.hpp)
//   read_config(dir)         dir/config.json alone (to plan a Shard before loading)
//   State<KV>                one gqa::KVCache<KV> per layer (KV = float, bfloat16, half or int8), one sequence
//   Model::forward()         S new tokens through every layer: prefill (S > 1, in chunks) and decode (S = 1) alike
//   read_ids(), check_ids()  whitespace-separated token ids, validated against the vocabulary
//   perplexity()             mean negative log-likelihood over windows of `context` tokens
//   Sampler                  greedy, or temperature + top-k with a seed
//
// Shapes, one sequence, S tokens per forward call (all row-major, nn.Linear weights are [out, in]):
//   x            [S, hidden]                     residual stream
//   q            [S, H*D]  viewed as [1, S, H, D] (token-major) for gqa::attention
//   k, v         [S, G*D]  viewed as [1, S, G, D], appended to the layer's cache [1, G, capacity, D]
//   gate, up     [S, intermediate]
//   logits       [S, vocab] (or [1, vocab]: the last position only)
// A sharded model (Shard) keeps query heads [h0, h0 + Hs) and the KV heads they use [g0, g0 + Gs): q [S, Hs*D],
// k, v [S, Gs*D], caches [1, Gs, capacity, D]; q/k/v/gate/up keep their rows of the shard, o_proj and down_proj
// their columns, so o_proj's and down_proj's products are partial sums [S, hidden] that Shard::all_reduce
// completes. Embedding, norms and lm_head are whole on every process.
//
// Weights: the matrices (q/k/v/o, gate/up/down, the embedding and lm_head) are kept in a WeightType of
// linear.hpp: as stored (F32 as f32, BF16 as bf16, F16 as f16, F64 converted to f32), or converted at load to the
// type Model::load is asked for (f32 -> bf16 rounds to nearest even; to f16 too, and a weight beyond half's range
// is refused as not finite). Tensors kept as stored and aligned in the mapping are used in place (zero copy).
// Norms and biases are float. Decode thus streams 2 bytes per weight of a BF16 / F16 checkpoint, widened to float
// in registers (linear.hpp).
//
// Threads: OpenMP. The products split the weights' rows across threads (detail::linear in linear.hpp: decode by
// rows, prefill by panels of rows), q/k/v and gate/up each in one parallel region. gqa::attention threads itself.
//
// Errors: gqa::format_error for a malformed config.json, ids file or weight shape; gqa::invalid_argument for what
// is well-formed but unsupported (config.hpp: rope types other than transformers' six, partial rotary, hidden_act
// other than silu; per-head q/k norms, MLP biases), a token id outside the vocabulary, or a context longer
// than max_position_embeddings; gqa::io_error when a file cannot be read. Refused at load too (format_error): a
// tensor that nothing reads (a layer past num_hidden_layers: [gqa.decoder.weights]; old checkpoints'
// rotary_emb.inv_freq buffers are accepted, as transformers drops them) and a weight that is NaN or infinite
// ([gqa.decoder.nonfinite], naming the tensor). forward() throws [gqa.decoder.nonfinite] (invalid_argument) when the
// hidden state or the logits stop being finite (a float overflow), naming the layer; the state then holds part of
// that step's K/V: clear() it. A Shard that does not fit the config, or whose query heads do not use its KV heads,
// is refused at load ([gqa.decoder.shard], invalid_argument). Messages start "[gqa.decoder.<id>]" and name the
// field and the value.
#pragma once

#include "../cli/printable.hpp"
#include "config.hpp"
#include "linear.hpp"
#include <gqa/kv_cache.hpp>
#include <gqa/safetensors.hpp>

#include <Eigen/Core>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace llama {

using gqa::Index;
// The library's view of a checkpoint directory (index + shards, or model.safetensors), named here only.
using CheckpointFiles = gqa::safetensors::Directory;

/// The part of every layer one process keeps when the model is split across processes by heads (tensor
/// parallel): query heads [first_head, first_head + num_heads), the KV heads [first_kv_head, first_kv_head +
/// num_kv_heads) they use (query head j uses KV head j / (H/G)), and intermediate rows [first_intermediate,
/// first_intermediate + num_intermediate) of the MLP. o_proj's and down_proj's products over these columns are
/// partial: all_reduce sums them over the processes in place, and must give every process the same bits (the
/// residual stream stays identical everywhere). The default, every count 0, is the whole model.
struct Shard {
  Index first_head = 0, num_heads = 0;
  Index first_kv_head = 0, num_kv_heads = 0;
  Index first_intermediate = 0, num_intermediate = 0;
  /// Sums a partial product [S, hidden] over the processes; empty for the whole model.
  std::function<void(Matrix&)> all_reduce;
  /// Whether this process adds o_proj's bias (one process does, so that the sum holds it once).
  bool owns_bias = true;

  bool whole() const { return !all_reduce; }
};

struct Layer {
  const float* input_norm = nullptr;  // [hidden]
  const float* post_norm = nullptr;   // [hidden]
  Linear q, k, v, o, gate, up, down;
};

template <typename KV>
class State;

/// Tokens per forward call of a prefill (generate, perplexity, bench --prefill): chosen by measurement (see
/// bench/README.md, "prefill chunk").
inline constexpr Index kPrefillChunk = 512;

/// Which part of a tensor a (sharded) Model keeps: rows [begin, begin + count) (axis 0) or columns (axis 1);
/// count 0: all of it.
struct TensorPart {
  int axis = 0;
  Index begin = 0, count = 0;
};

class Model {
 public:
  /// Reads dir/config.json and the weights (see the header comment for what is refused). With a Shard, keeps (and
  /// converts and checks) only the shard's rows and columns of each layer. `weights`: the type the matrices are
  /// kept in; std::nullopt: each as stored.
  static Model load(const std::filesystem::path& dir, Shard shard = {},
                    std::optional<WeightType> weights = std::nullopt);

  Model(Model&&) = default;
  Model& operator=(Model&&) = default;
  Model(const Model&) = delete;  // the weights point into this object's mapping and buffers
  Model& operator=(const Model&) = delete;

  const Config& config() const noexcept { return cfg_; }
  /// The part of each layer this model holds (the whole model: every head, Shard::whole()).
  const Shard& shard() const noexcept { return shard_; }
  /// Layer l's weights and the embedding table [vocab, hidden], for tools that run or train one layer at a time
  /// (gqa-uptrain, examples/uptrain.cpp).
  const Layer& layer(Index l) const { return layers_[size_t(l)]; }
  const Linear& embedding() const noexcept { return embed_; }
  /// Row `id` of the embedding table as float, into out [hidden].
  void embed(std::int32_t id, float* out) const { detail::widen_rows(embed_, id, id + 1, out); }
  /// Bytes of weights one decode step reads: every layer's matrices (in their WeightType), biases and norms, the
  /// final norm and lm_head (the embedding row of the new token is left out: one row).
  std::uint64_t decode_weight_bytes() const;

  /// Gives every query head of every layer an attention sink (gqa::AttentionOptions::sinks) of this logit, for
  /// experiments on a model trained without them: -inf is no sink (the same numbers, bitwise), a finite logit adds
  /// exp(logit) to every softmax denominator. Refuses NaN and +inf, naming the value.
  void set_attention_sinks(float logit);

  /// Runs ids (S >= 1 new tokens at positions state.position() ..) through the model, appending their K/V to
  /// `state`. With `logits`, writes [S, vocab] (all_positions) or [1, vocab] (the last position).
  /// `call_length`: the sequence length transformers' rotary embedding would see for this call (rope_type longrope
  /// picks its factors by it); 0 means state.position() + S. A prefill split into chunks passes the whole
  /// prefill's length, so that it gets the numbers of transformers' one call over it.
  template <typename KV>
  void forward(gqa::span<const std::int32_t> ids, State<KV>& state, Matrix* logits = nullptr,
               bool all_positions = false, Index call_length = 0) const;

 private:
  Model() = default;
  using Part = TensorPart;
  const gqa::safetensors::TensorView* find(const std::string& name, const std::vector<std::int64_t>& shape,
                                           bool required);
  const float* tensor(const std::string& name, std::vector<std::int64_t> shape, bool required = true, Part part = {});
  Linear matrix(const std::string& name, Index rows, Index cols, Part part = {});
  template <typename T>
  const T* converted(const gqa::safetensors::TensorView& t, Index rows, Index cols, Part part);
  Linear linear(const std::string& prefix, Index rows, Index cols, bool bias_allowed, Part part = {});
  void check_shard();
  void load_lm_head();
  void check_all_used() const;
  void rope(Matrix& t, Index heads, Index pos0, const std::vector<double>& inv_freq) const;

  Config cfg_;
  Shard shard_;
  CheckpointFiles files_;                  // the mapping F32 weights point into
  std::optional<WeightType> weights_;      // the type asked for; nullopt: as stored
  std::deque<std::vector<float>> owned_;   // converted or unaligned float weights
  std::deque<std::vector<gqa::bfloat16>> owned_bf16_;  // converted or unaligned bf16 weights
  std::deque<std::vector<gqa::half>> owned_f16_;       // converted or unaligned half weights
  Linear embed_;                           // [vocab, hidden]
  const float* final_norm_ = nullptr;      // [hidden]
  Linear lm_head_;                         // [vocab, hidden]; the embedding when tied
  std::vector<Layer> layers_;
  std::set<std::string> used_;             // the tensors load() read, to refuse the ones nothing reads
  std::vector<float> sinks_;               // [shard heads]; empty: none (set_attention_sinks)
};

/// The decoding state of one sequence: a KV cache per layer, all of the same length.
template <typename KV>
class State {
 public:
  /// For the whole model.
  State(const Config& c, Index capacity) : State(c, capacity, c.kv_heads) {}
  /// For `model`'s KV heads (a sharded model's own heads only).
  State(const Model& model, Index capacity) : State(model.config(), capacity, model.shard().num_kv_heads) {}
  State(const Config& c, Index capacity, Index kv_heads) {
    check(capacity > 0 && capacity <= c.max_positions, "context", "a context of ", capacity,
          " tokens is not in [1, max_position_embeddings = ", c.max_positions, "]");
    caches_.reserve(size_t(c.layers));
    for (Index l = 0; l < c.layers; ++l) caches_.emplace_back(1, kv_heads, capacity, c.head_dim);
  }
  Index position() const { return caches_.front().length(0); }
  Index capacity() const { return caches_.front().capacity(); }
  void clear() {
    for (auto& c : caches_) c.clear();
  }
  /// K and V bytes a decode step reads now, all layers.
  std::uint64_t kv_bytes_in_use() const {
    std::uint64_t b = 0;
    for (const auto& c : caches_) b += c.bytes_in_use();
    return b;
  }
  gqa::KVCache<KV>& cache(Index layer) { return caches_[size_t(layer)]; }

 private:
  std::vector<gqa::KVCache<KV>> caches_;
};

namespace detail {

/// Whether n floats are all finite: x * 0 is 0 for finite x and NaN for NaN and inf, and Eigen's vectorised sum of
/// those reads the data once (2-3x faster than Eigen's allFinite(), which evaluates x - x and compares).
inline bool all_finite(const float* data, Index n) {
  return std::isfinite((Eigen::Map<const Eigen::ArrayXf>(data, n) * 0.0f).sum());
}

/// A NaN or infinite weight makes every logit NaN (perplexity nan, greedy decoding stuck on id 0): refused at load,
/// naming the tensor, its layer and the first bad element. One pass over the float weights: on SmolLM2-135M (F32,
/// 538 MB, page cache warm, 1 thread of the shared development machine) 0.15-0.24 s of a 0.19-0.37 s load. That is
/// most of a zero-copy F32 load (a mapping), but it reads the pages the first forward pass reads anyway, and one
/// prefill of 256 tokens takes 2.5 s. 16-bit weights are widened a block at a time for the check.
template <typename T>
void check_finite(const std::string& name, const std::vector<std::int64_t>& shape, const T* data, Index row0 = 0,
                  Index col0 = 0) {
  // shape: that of data, a block of the tensor starting at [row0, col0] (a shard's slice), for the position named.
  const Index n = std::accumulate(shape.begin(), shape.end(), Index(1), std::multiplies<>());
  constexpr Index block = Index(1) << 14;
  std::vector<float> widened(std::is_same<T, float>::value ? 0 : size_t(std::min(n, block)));
  for (Index first = 0; first < n; first += block) {
    const Index m = std::min(block, n - first);
    const float* f = nullptr;
    if constexpr (std::is_same<T, float>::value) {
      f = data + first;
    } else {
      widen(data + first, m, widened.data());
      f = widened.data();
    }
    if (all_finite(f, m)) continue;
    const Index i = first + Index(std::find_if(f, f + m, [](float x) { return !std::isfinite(x); }) - f);
    const Index cols = shape.size() == 2 ? Index(shape[1]) : n;
    const std::string layers = "model.layers.";
    const std::string layer =
        name.compare(0, layers.size(), layers) == 0
            ? " (layer " + name.substr(layers.size(), name.find('.', layers.size()) - layers.size()) + ")"
            : "";
    fail<gqa::format_error>("nonfinite", "tensor '", name, "'", layer, " holds ", float(data[i]),
                            shape.size() == 2 ? " at [" + std::to_string(row0 + i / cols) + ", " +
                                                    std::to_string(col0 + i % cols) + "]"
                                              : " at [" + std::to_string(row0 + i) + "]",
                            std::is_same<T, float>::value ? "" : " (as 16-bit)",
                            ": a weight that is not finite makes every output NaN");
  }
}

/// Elements [first, first + n) of t (any supported dtype, any alignment) as float, into out.
inline void widen_into(const gqa::safetensors::TensorView& t, Index first, Index n, float* out) {
  namespace st = gqa::safetensors;
  const auto copy = [&](auto typed) {
    using T = decltype(typed);
    const std::byte* src = t.bytes.data() + first * Index(sizeof(T));
    for (Index i = 0; i < n; ++i) {
      std::memcpy(&typed, src + i * Index(sizeof(T)), sizeof(T));
      out[i] = float(typed);
    }
  };
  if (t.dtype == st::Dtype::F32) copy(float());
  else if (t.dtype == st::Dtype::BF16) copy(gqa::bfloat16());
  else if (t.dtype == st::Dtype::F16) copy(gqa::half());
  else if (t.dtype == st::Dtype::F64) copy(double());  // beyond float range: inf, refused by check_finite
  else fail("unsupported", "tensor '", t.name, "' has dtype ", st::dtype_name(t.dtype), " (F32, BF16, F16, F64 only)");
}

/// The residual stream (or the logits) after a step of forward(): NaN or inf there means an overflow in float
/// (weights are finite, load checks them); said where it first appears rather than returned as NaN logits.
inline void check_finite_activations(const Matrix& x, const char* what, Index layer, Index pos0) {
  if (all_finite(x.data(), x.size())) return;
  Index row = 0;
  while (all_finite(x.row(row).data(), x.cols())) ++row;
  fail("nonfinite", what, layer >= 0 ? " after layer " + std::to_string(layer) : std::string(), " is not finite at ",
       "position ", pos0 + row, ": a float overflow in the forward pass");
}

/// RMSNorm as Hugging Face's LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * weight, in float.
inline void rms_norm(const Matrix& x, const float* weight, double eps, Matrix& out) {
  out.resize(x.rows(), x.cols());
  const Eigen::Map<const Eigen::RowVectorXf> w(weight, x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    const float inv = 1.0f / std::sqrt(x.row(r).squaredNorm() / float(x.cols()) + float(eps));
    out.row(r) = (x.row(r) * inv).cwiseProduct(w);
  }
}

}  // namespace detail

/// dir/config.json, parsed and checked (Model::load reads it the same way).
inline Config read_config(const std::filesystem::path& dir) {
  const auto config_path = dir / "config.json";
  std::ifstream in(config_path, std::ios::binary);
  check<gqa::io_error>(bool(in), "io", "cannot open ", config_path.string());
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail<gqa::format_error>("config", config_path.string(), ": not valid JSON: ", detail::escaped(e.what()));
  }
  return parse_config(j, config_path.string());
}

inline Model Model::load(const std::filesystem::path& dir, Shard shard, std::optional<WeightType> weights) {
  Model m;
  m.cfg_ = read_config(dir);
  m.weights_ = weights;
  m.shard_ = std::move(shard);
  m.check_shard();
  const Config& c = m.cfg_;
  m.files_ = CheckpointFiles::open(dir);
  for (const auto& file : m.files_.files())
    for (const auto& t : file.tensors()) {
      const auto ends = [&](const char* s) { return t.name.size() >= std::strlen(s) &&
                                                    t.name.compare(t.name.size() - std::strlen(s), std::string::npos, s) == 0; };
      check(!ends("self_attn.q_norm.weight") && !ends("self_attn.k_norm.weight"), "unsupported", dir.string(),
            ": tensor '", t.name, "' is a per-head q/k norm (Qwen3, OLMo 2), which this decoder does not implement");
      check(!(ends("mlp.gate_proj.bias") || ends("mlp.up_proj.bias") || ends("mlp.down_proj.bias")), "unsupported",
            dir.string(), ": tensor '", t.name, "' is an MLP bias, which this decoder does not implement");
    }
  const Index hidden = c.hidden, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim, D = c.head_dim;
  const Shard& sh = m.shard_;
  const Part heads_rows{0, sh.first_head * D, sh.num_heads * D}, heads_cols{1, sh.first_head * D, sh.num_heads * D},
      kv_rows{0, sh.first_kv_head * D, sh.num_kv_heads * D},
      mlp_rows{0, sh.first_intermediate, sh.num_intermediate}, mlp_cols{1, sh.first_intermediate, sh.num_intermediate};
  m.embed_ = m.matrix("model.embed_tokens.weight", c.vocab, hidden);
  m.final_norm_ = m.tensor("model.norm.weight", {hidden});
  for (Index l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer L;
    L.input_norm = m.tensor(p + "input_layernorm.weight", {hidden});
    L.post_norm = m.tensor(p + "post_attention_layernorm.weight", {hidden});
    L.q = m.linear(p + "self_attn.q_proj", qd, hidden, true, heads_rows);
    L.k = m.linear(p + "self_attn.k_proj", kvd, hidden, true, kv_rows);
    L.v = m.linear(p + "self_attn.v_proj", kvd, hidden, true, kv_rows);
    L.o = m.linear(p + "self_attn.o_proj", hidden, qd, true, heads_cols);
    L.gate = m.linear(p + "mlp.gate_proj", c.intermediate, hidden, false, mlp_rows);
    L.up = m.linear(p + "mlp.up_proj", c.intermediate, hidden, false, mlp_rows);
    L.down = m.linear(p + "mlp.down_proj", hidden, c.intermediate, false, mlp_cols);
    m.layers_.push_back(L);
  }
  m.load_lm_head();
  m.check_all_used();
  return m;
}

/// lm_head as transformers 5 ties it (PreTrainedModel.tie_weights): tie_word_embeddings false needs
/// lm_head.weight; true uses the embedding, unless the file also holds an lm_head.weight with other values, which
/// transformers then keeps untied (with a warning), so it is used here too.
inline void Model::load_lm_head() {
  const Config& c = cfg_;
  const gqa::safetensors::TensorView* head = files_.find("lm_head.weight");
  if (!c.tie_word_embeddings) {
    check<gqa::format_error>(head != nullptr, "config", files_.directory().string(),
                             ": no tensor 'lm_head.weight' and tie_word_embeddings is not true in config.json");
  } else if (head) {
    const gqa::safetensors::TensorView* embed = files_.find("model.embed_tokens.weight");
    const bool same = head->dtype == embed->dtype && head->shape == embed->shape &&
                      std::memcmp(head->bytes.data(), embed->bytes.data(), head->bytes.size()) == 0;
    if (same) used_.insert(head->name);  // the tie transformers makes: the embedding serves as lm_head
    head = same ? nullptr : head;
  }
  lm_head_ = head ? linear("lm_head", c.vocab, c.hidden, false) : embed_;
}

/// A Shard's counts of 0 mean the whole model; a partial one must fit the config, and its query heads must use its
/// KV heads in the whole model's order (local query head j on local KV head j / (num_heads / num_kv_heads)), which
/// gqa::head_shard's plans do. Refused as gqa::invalid_argument [gqa.decoder.shard], naming the field.
inline void Model::check_shard() {
  Shard& s = shard_;
  const Config& c = cfg_;
  if (s.num_heads == 0 && s.num_kv_heads == 0 && s.num_intermediate == 0) {
    check(s.first_head == 0 && s.first_kv_head == 0 && s.first_intermediate == 0, "shard",
          "Shard: counts 0 (the whole model) with a first head or row that is not 0");
    s.num_heads = c.heads, s.num_kv_heads = c.kv_heads, s.num_intermediate = c.intermediate;
  }
  const auto in = [](Index first, Index count, Index total) { return first >= 0 && count > 0 && first + count <= total; };
  check(in(s.first_head, s.num_heads, c.heads), "shard", "Shard: query heads [", s.first_head, ", ",
        s.first_head + s.num_heads, ") are not a non-empty part of num_attention_heads = ", c.heads);
  check(in(s.first_kv_head, s.num_kv_heads, c.kv_heads), "shard", "Shard: KV heads [", s.first_kv_head, ", ",
        s.first_kv_head + s.num_kv_heads, ") are not a non-empty part of num_key_value_heads = ", c.kv_heads);
  check(in(s.first_intermediate, s.num_intermediate, c.intermediate), "shard", "Shard: intermediate rows [",
        s.first_intermediate, ", ", s.first_intermediate + s.num_intermediate,
        ") are not a non-empty part of intermediate_size = ", c.intermediate);
  check(s.num_heads % s.num_kv_heads == 0, "shard", "Shard: num_heads = ", s.num_heads,
        " is not a multiple of num_kv_heads = ", s.num_kv_heads);
  const Index group = c.heads / c.kv_heads, local_group = s.num_heads / s.num_kv_heads;
  for (Index j = 0; j < s.num_heads; ++j)
    check((s.first_head + j) / group == s.first_kv_head + j / local_group, "shard", "Shard: query head ",
          s.first_head + j, " uses KV head ", (s.first_head + j) / group, ", which is not the shard's KV head ",
          s.first_kv_head + j / local_group, " (heads [", s.first_head, ", ", s.first_head + s.num_heads,
          "), KV heads [", s.first_kv_head, ", ", s.first_kv_head + s.num_kv_heads, "))");
  const bool whole = s.num_heads == c.heads && s.num_kv_heads == c.kv_heads && s.num_intermediate == c.intermediate;
  check(whole || s.all_reduce, "shard", "Shard: a part of the model (", s.num_heads, " of ", c.heads,
        " query heads, ", s.num_intermediate, " of ", c.intermediate,
        " intermediate rows) needs an all_reduce to complete o_proj's and down_proj's sums");
}

/// Every tensor of the checkpoint must be one that load() read: a tensor of a layer past num_hidden_layers (or of
/// a module this decoder does not have) would otherwise be left out silently. Accepted unread, by name, exactly as
/// transformers 5 drops them for Llama, Mistral and Qwen2 (_adjust_missing_and_unexpected_keys): the
/// rotary_emb.inv_freq buffers that old checkpoints saved (those models set no _keys_to_ignore_on_load_unexpected
/// and have no position_ids buffer).
inline void Model::check_all_used() const {
  std::vector<std::string> unused;
  for (const auto& file : files_.files())
    for (const auto& t : file.tensors())
      if (!used_.count(t.name) && t.name.find("rotary_emb.inv_freq") == std::string::npos) unused.push_back(t.name);
  if (unused.empty()) return;
  std::ostringstream names;
  for (size_t i = 0; i < std::min<size_t>(unused.size(), 3); ++i) names << (i ? ", '" : "'") << unused[i] << "'";
  if (unused.size() > 3) names << " and " << unused.size() - 3 << " more";
  fail<gqa::format_error>("weights", files_.directory().string(), ": ", unused.size() == 1 ? "tensor " : "tensors ",
                          names.str(), " belong to no layer of this model (num_hidden_layers = ", cfg_.layers,
                          ", tie_word_embeddings = ", cfg_.tie_word_embeddings ? "true" : "false",
                          "): config.json does not describe these weights");
}

/// Tensor `name`, checked against `shape` and marked used; nullptr when absent and not required.
inline const gqa::safetensors::TensorView* Model::find(const std::string& name, const std::vector<std::int64_t>& shape,
                                                        bool required) {
  namespace st = gqa::safetensors;
  const st::TensorView* t = files_.find(name);
  if (!t) {
    check<gqa::format_error>(!required, "weights", files_.directory().string(), ": no tensor named '", name, "'");
    return nullptr;
  }
  check<gqa::format_error>(t->shape == shape, "shape", "tensor '", name, "' has shape ", st::shape_string(t->shape),
                           " but config.json implies ", st::shape_string(shape));
  check(t->dtype == st::Dtype::F32 || t->dtype == st::Dtype::BF16 || t->dtype == st::Dtype::F16 ||
            t->dtype == st::Dtype::F64,
        "unsupported", "tensor '", name, "' has dtype ", st::dtype_name(t->dtype), " (F32, BF16, F16, F64 only)");
  used_.insert(name);
  return t;
}

/// `part` of t [rows, cols] (all of it: count 0) as T: in place when t holds T, the part is whole rows and the
/// bytes are aligned for T; else converted (through float: exact between the types, rounded to nearest even
/// from f32 to bf16 or f16) into a buffer this model owns. Checked finite after the conversion.
template <typename T>
const T* Model::converted(const gqa::safetensors::TensorView& t, Index rows, Index cols, Part part) {
  namespace st = gqa::safetensors;
  if (part.count == 0) part = Part{0, 0, rows};
  const st::Dtype same = std::is_same<T, float>::value ? st::Dtype::F32
                         : std::is_same<T, gqa::bfloat16>::value ? st::Dtype::BF16 : st::Dtype::F16;
  const Index row0 = part.axis == 0 ? part.begin : 0, col0 = part.axis == 1 ? part.begin : 0;
  const Index kept_rows = part.axis == 0 ? part.count : rows, kept_cols = part.axis == 1 ? part.count : cols;
  const T* data = nullptr;
  if (part.axis == 0 && t.dtype == same && reinterpret_cast<std::uintptr_t>(t.bytes.data()) % alignof(T) == 0) {
    data = reinterpret_cast<const T*>(t.bytes.data()) + row0 * cols;  // zero copy
  } else {
    auto& owned = [this]() -> auto& {
      if constexpr (std::is_same<T, float>::value) return owned_;
      else if constexpr (std::is_same<T, gqa::bfloat16>::value) return owned_bf16_;
      else return owned_f16_;
    }();
    owned.emplace_back(size_t(kept_rows * kept_cols));
    T* out = owned.back().data();
    std::vector<float> row(std::is_same<T, float>::value ? 0 : size_t(kept_cols));
    for (Index r = 0; r < kept_rows; ++r) {
      float* f = std::is_same<T, float>::value ? reinterpret_cast<float*>(out + r * kept_cols) : row.data();
      detail::widen_into(t, (row0 + r) * cols + col0, kept_cols, f);
      if constexpr (!std::is_same<T, float>::value)
        for (Index c = 0; c < kept_cols; ++c) out[r * kept_cols + c] = T(f[c]);
    }
    data = out;
  }
  std::vector<std::int64_t> kept{kept_rows};
  if (t.shape.size() == 2) kept.push_back(kept_cols);
  detail::check_finite(t.name, kept, data, row0, col0);
  return data;
}

/// A float view of tensor `name` (or of `part` of it: a shard's rows or columns), checked against `shape`; nullptr
/// when absent and not required. For norms and biases (always float).
inline const float* Model::tensor(const std::string& name, std::vector<std::int64_t> shape, bool required, Part part) {
  const gqa::safetensors::TensorView* t = find(name, shape, required);
  if (!t) return nullptr;
  return converted<float>(*t, Index(shape[0]), shape.size() == 2 ? Index(shape[1]) : 1, part);
}

/// Weight matrix `name` [rows, cols] (or `part` of it) in weights_' type, or as stored (F64 as f32).
inline Linear Model::matrix(const std::string& name, Index rows, Index cols, Part part) {
  namespace st = gqa::safetensors;
  const st::TensorView& t = *find(name, {rows, cols}, true);
  const WeightType stored = t.dtype == st::Dtype::BF16 ? WeightType::bf16
                            : t.dtype == st::Dtype::F16 ? WeightType::f16 : WeightType::f32;
  Linear L;
  L.type = weights_.value_or(stored);
  L.rows = part.count && part.axis == 0 ? part.count : rows;
  L.cols = part.count && part.axis == 1 ? part.count : cols;
  if (L.type == WeightType::f32) L.weight = converted<float>(t, rows, cols, part);
  else if (L.type == WeightType::bf16) L.weight = converted<gqa::bfloat16>(t, rows, cols, part);
  else L.weight = converted<gqa::half>(t, rows, cols, part);
  return L;
}

inline Linear Model::linear(const std::string& prefix, Index rows, Index cols, bool bias_allowed, Part part) {
  Linear L = matrix(prefix + ".weight", rows, cols, part);
  // A bias follows the rows kept; a column split's bias (o_proj) is added by one process (Shard::owns_bias).
  if (bias_allowed) L.bias = tensor(prefix + ".bias", {rows}, false, part.axis == 0 ? part : Part{});
  if (part.count && part.axis == 1 && !shard_.owns_bias) L.bias = nullptr;
  return L;
}

inline void Model::set_attention_sinks(float logit) {
  check(!std::isnan(logit) && logit != std::numeric_limits<float>::infinity(), "sinks", "attention sink logit ", logit,
        ": expected a finite number or -inf (no sink)");
  sinks_.assign(size_t(shard_.num_heads), logit);
}

inline std::uint64_t Model::decode_weight_bytes() const {
  std::uint64_t b = 4 * std::uint64_t(cfg_.hidden) + lm_head_.bytes();
  for (const auto& L : layers_) {
    b += 2 * 4 * std::uint64_t(cfg_.hidden);
    for (const Linear* p : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) b += p->bytes();
  }
  return b;
}

/// Hugging Face's rotary embedding (rotate_half layout): in each head, dimension i pairs with i + D/2; cos and sin
/// scaled by the rope type's attention factor (yarn, longrope), as transformers' rotary forward does.
inline void Model::rope(Matrix& t, Index heads, Index pos0, const std::vector<double>& inv_freq) const {
  const Index D = cfg_.head_dim, half = D / 2;
  const double scale = detail::rotary_scaling(cfg_);
  std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
  for (Index s = 0; s < t.rows(); ++s) {
    for (Index i = 0; i < half; ++i) {
      const double angle = double(pos0 + s) * inv_freq[size_t(i)];
      cs[size_t(i)] = float(std::cos(angle) * scale);
      sn[size_t(i)] = float(std::sin(angle) * scale);
    }
    for (Index h = 0; h < heads; ++h) {
      float* x = t.row(s).data() + h * D;
      for (Index i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cs[size_t(i)] - b * sn[size_t(i)];
        x[i + half] = b * cs[size_t(i)] + a * sn[size_t(i)];
      }
    }
  }
}

template <typename KV>
void Model::forward(gqa::span<const std::int32_t> ids, State<KV>& state, Matrix* logits, bool all_positions,
                    Index call_length) const {
  const Config& c = cfg_;
  // This model's heads: all of them, or a shard's (whose o_proj and down_proj sums all_reduce completes).
  const Index S = ids.size(), H = shard_.num_heads, G = shard_.num_kv_heads, D = c.head_dim, pos0 = state.position();
  check(state.cache(0).kv_heads() == G, "forward", "forward: the state holds ", state.cache(0).kv_heads(),
        " KV heads per layer but the model ", G, " (make it with State(model, capacity))");
  const auto complete = [&](Matrix& partial) {
    if (shard_.all_reduce) shard_.all_reduce(partial);
  };
  check(S > 0, "forward", "forward: no tokens");
  check(pos0 + S <= state.capacity(), "context", "forward: ", pos0, " cached + ", S, " new tokens exceed the context of ",
        state.capacity());
  Matrix x(S, c.hidden), h, q, k, v, attn(S, H * D), t, gate, up;
  for (Index s = 0; s < S; ++s) {
    check(ids[s] >= 0 && ids[s] < c.vocab, "token", "token id ", ids[s], " is outside the vocabulary [0, ", c.vocab, ")");
    embed(ids[s], x.row(s).data());
  }
  check(call_length == 0 || call_length >= pos0 + S, "forward", "forward: call_length ", call_length,
        " is shorter than the ", pos0 + S, " positions of the call");
  // Frequencies per forward call, as transformers computes them from the call's length (longrope's short or long
  // factors; see config.hpp).
  const std::vector<double> inv_freq = detail::rotary_frequencies(c, call_length ? call_length : pos0 + S);
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.sinks = sinks_;
  for (Index l = 0; l < c.layers; ++l) {
    const Layer& L = layers_[size_t(l)];
    opt.window = c.windows[size_t(l)];
    detail::rms_norm(x, L.input_norm, c.rms_norm_eps, h);
    detail::linear(h, {{L.q, q}, {L.k, k}, {L.v, v}});
    rope(q, H, pos0, inv_freq);
    rope(k, G, pos0, inv_freq);
    gqa::KVCache<KV>& cache = state.cache(l);
    cache.append(gqa::token_major<const float>(k.data(), 1, S, G, D), gqa::token_major<const float>(v.data(), 1, S, G, D));
    gqa::attention(gqa::token_major<const float>(q.data(), 1, S, H, D), cache, gqa::token_major(attn.data(), 1, S, H, D),
                   opt);
    detail::linear(attn, {{L.o, t}});
    complete(t);
    x += t;
    detail::rms_norm(x, L.post_norm, c.rms_norm_eps, h);
    detail::linear(h, {{L.gate, gate}, {L.up, up}});
    gate = gate.array() / (1.0f + (-gate.array()).exp()) * up.array();  // SwiGLU: silu(gate) * up
    detail::linear(gate, {{L.down, t}});
    complete(t);
    x += t;
    detail::check_finite_activations(x, "the hidden state", l, pos0);
  }
  if (!logits) return;
  const Matrix last = all_positions ? x : Matrix(x.bottomRows(1));
  detail::rms_norm(last, final_norm_, c.rms_norm_eps, h);
  detail::linear(h, {{lm_head_, *logits}});
  detail::check_finite_activations(*logits, "the logits", -1, all_positions ? pos0 : pos0 + S - 1);
}

/// Checks every id against the vocabulary; `where` names the source in the message.
inline void check_ids(gqa::span<const std::int32_t> ids, Index vocab, const std::string& where) {
  for (Index i = 0; i < ids.size(); ++i)
    check(ids[i] >= 0 && ids[i] < vocab, "token", where, ": token id ", ids[i], " (id number ", i + 1,
          ") is outside the vocabulary [0, vocab_size = ", vocab, ")");
}

/// Reads whitespace-separated integer token ids and checks them against the vocabulary.
inline std::vector<std::int32_t> read_ids(const std::filesystem::path& path, Index vocab) {
  std::ifstream in(path);
  check<gqa::io_error>(bool(in), "io", "cannot open ids file ", path.string());
  std::vector<std::int32_t> ids;
  std::string word;
  while (in >> word) {
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    check<gqa::format_error>(used == word.size() && v >= std::numeric_limits<std::int32_t>::min() &&
                                 v <= std::numeric_limits<std::int32_t>::max(),
                             "ids", path.string(), ": '", tool_cli::printable(word), "' (id number ", ids.size() + 1,
                             ") is not a 32-bit integer");
    ids.push_back(std::int32_t(v));
  }
  check<gqa::format_error>(!ids.empty(), "ids", path.string(), ": no token ids");
  check_ids(ids, vocab, path.string());
  return ids;
}

/// log p(target) under softmax(logits), in double.
inline double log_prob(const float* logits, Index vocab, std::int32_t target) {
  double mx = -std::numeric_limits<double>::infinity();
  for (Index i = 0; i < vocab; ++i) mx = std::max(mx, double(logits[i]));
  double sum = 0;
  for (Index i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  return double(logits[target]) - mx - std::log(sum);
}

struct PerplexityResult {
  double nll = 0;    ///< sum of -log p over the scored tokens
  Index tokens = 0;  ///< tokens scored
  double value() const { return std::exp(nll / double(tokens)); }
};

/// Perplexity over consecutive, non-overlapping windows of `context` ids; each window starts from an empty cache
/// and scores its tokens 2 .. n given the ones before them in the window (a last window shorter than 2 ids
/// scores nothing). Windows are prefilled in chunks of `chunk` tokens, each with the rotary frequencies of the whole
/// window (Model::forward's call_length), so that longrope's factors are those of transformers run on the window in
/// one call.
template <typename KV>
PerplexityResult perplexity(const Model& model, gqa::span<const std::int32_t> ids, Index context,
                            Index chunk = kPrefillChunk) {
  const Config& c = model.config();
  check(context >= 2 && context <= c.max_positions, "context", "--context ", context,
        " is not in [2, max_position_embeddings = ", c.max_positions, "]");
  check(chunk >= 1, "chunk", "chunk = ", chunk, " must be positive");
  check_ids(ids, c.vocab, "perplexity ids");
  check(ids.size() >= 2, "ids", "perplexity needs at least 2 ids, got ", ids.size());
  State<KV> state(model, context);
  PerplexityResult r;
  Matrix logits;
  for (Index w = 0; w + 1 < ids.size(); w += context) {
    const Index n = std::min(context, ids.size() - w);
    state.clear();
    for (Index s = 0; s < n; s += chunk) {
      const Index m = std::min(chunk, n - s);
      model.forward(gqa::span<const std::int32_t>(ids.data() + w + s, m), state, &logits, true, n);
      for (Index i = 0; i < m && s + i + 1 < n; ++i) {
        r.nll -= log_prob(logits.row(i).data(), c.vocab, ids[w + s + i + 1]);
        ++r.tokens;
      }
    }
  }
  return r;
}

/// Greedy (temperature 0) or temperature + top-k sampling (top_k 0: the whole vocabulary), reproducible from
/// the seed on every platform (std::*_distribution is implementation-defined, so the draw is done by hand).
class Sampler {
 public:
  Sampler(double temperature = 0, Index top_k = 0, std::uint64_t seed = 0)
      : temperature_(temperature), top_k_(top_k), rng_(seed) {
    check(temperature >= 0 && std::isfinite(temperature), "sampling", "--temperature ", temperature,
          " must be >= 0");
    check(top_k >= 0, "sampling", "--top-k ", top_k, " must be >= 0");
  }

  std::int32_t next(const float* logits, Index vocab) {
    if (temperature_ == 0) return std::int32_t(std::max_element(logits, logits + vocab) - logits);
    const Index k = top_k_ == 0 ? vocab : std::min(top_k_, vocab);
    std::vector<std::int32_t> order(static_cast<size_t>(vocab));
    for (Index i = 0; i < vocab; ++i) order[size_t(i)] = std::int32_t(i);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    std::vector<double> p(static_cast<size_t>(k));
    double sum = 0;
    for (Index i = 0; i < k; ++i)
      sum += p[size_t(i)] = std::exp((double(logits[order[size_t(i)]]) - double(logits[order[0]])) / temperature_);
    double u = double(rng_() >> 11) * 0x1.0p-53 * sum;
    for (Index i = 0; i < k; ++i)
      if ((u -= p[size_t(i)]) < 0) return order[size_t(i)];
    return order[size_t(k - 1)];
  }

 private:
  double temperature_;
  Index top_k_;
  std::mt19937_64 rng_;
};

}  // namespace llama
