// gqa/checkpoint_plan.hpp — the checkpoint converter's decisions, made without touching the disk: from a checkpoint's
// inventory (config.json, the tensors' names, dtypes and shapes, the directory's entries) and the options,
// plan_checkpoint() validates everything and says what happens to every tensor and file, and what the summary will
// report. gqa::convert_checkpoint (gqa/checkpoint.hpp) builds the inventory from a directory and executes the plan;
// tests and dry runs can build one in memory.
//
// SHAPES (nn.Linear; H query heads, G = the input's K/V heads, G' = CheckpointOptions::kv_heads, D = head_dim):
//   query  weight [H*D, hidden], bias [H*D]   copied; rows permuted for a non-adjacent assignment
//   key    weight [G*D, hidden], bias [G*D]   -> [G'*D, ...]: pooled (G' < G) or expanded (G' > G); value the same
//   output weight [hidden, H*D], bias [hidden] copied; columns permuted for a non-adjacent assignment
// PoolMethod::fit on a rotary family assumes the rotary embedding covers every dimension of every layer; a config that
// says otherwise (partial_rotary_factor below 1, no_rope_layers, ...: detail::partial_rotary) is refused for fit by
// field and value ([gqa.checkpoint.unsupported]); mean, first and random are unaffected.
// A method that reads the whole layer (PoolMethod::fit, and automatic where it means fit) rewrites query and output
// weights and biases too: every such tensor is one output of the layer's gqa::pool_attention (TensorAction::
// from_layer), whose inputs the plan lists per layer (CheckpointPlan::layers, with the normalisation in front of the
// attention, the family's input_norm). Those tensors must then all have the K/V projections' dtype.
// Every config dimension is checked against these shapes with overflow-checked arithmetic, so config.json cannot
// claim sizes the tensors do not have ([gqa.checkpoint.config], [gqa.checkpoint.shape]).
//
// The architecture rules (which names play which role, what is refused) are in gqa/detail/checkpoint_rules.hpp.
#pragma once

#include "gqa/convert.hpp"
#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/checkpoint_rules.hpp"
#include "gqa/errors.hpp"
#include "gqa/safetensors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace gqa {

/// The attention geometry of a Hugging Face config.json.
struct ModelConfig {
  Index heads = 0;     ///< num_attention_heads (H)
  Index kv_heads = 0;  ///< num_key_value_heads (G); H if absent or null
  Index hidden = 0;    ///< hidden_size
  Index head_dim = 0;  ///< head_dim (D); hidden_size / H if absent or null
  Index layers = 0;    ///< num_hidden_layers; 0 if absent
};

namespace detail {

/// a * b, or format_error [gqa.checkpoint.config] naming both factors when the product overflows an Index.
inline Index checked_product(Index a, const char* a_name, Index b, const char* b_name, const std::string& where) {
  Index p = 0;
  require<format_error>(!__builtin_mul_overflow(a, b, &p), "checkpoint.config", where, ": ", a_name, " ", a, " * ",
                        b_name, " ", b, " overflows");
  return p;
}

}  // namespace detail

/// Parses the geometry from a config.json object, reading the fields a family names (format_error
/// [gqa.checkpoint.config] on bad or missing fields, or dimensions whose products overflow).
inline ModelConfig parse_model_config(const nlohmann::ordered_json& j, const std::string& where,
                                      const detail::ConfigFields& fields) {
  using detail::require;
  require<format_error>(j.is_object(), "checkpoint.config", where, ": not a JSON object");
  auto field = [&](const char* name, bool required) -> std::optional<Index> {
    if (name == nullptr || !j.contains(name) || j[name].is_null()) {
      require<format_error>(!required, "checkpoint.config", where, ": missing \"", name ? name : "?",
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
  c.heads = *field(fields.heads, true);
  c.hidden = *field(fields.hidden, true);
  c.kv_heads = field(fields.kv_heads, false).value_or(c.heads);
  const auto head_dim = field(fields.head_dim, false);
  if (!head_dim)
    require<format_error>(c.hidden % c.heads == 0, "checkpoint.config", where, ": no \"head_dim\" and hidden_size ",
                          c.hidden, " is not a multiple of num_attention_heads ", c.heads);
  c.head_dim = head_dim.value_or(c.hidden / c.heads);
  c.layers = field(fields.layers, false).value_or(0);
  require<format_error>(c.heads % c.kv_heads == 0, "checkpoint.config", where, ": num_key_value_heads ", c.kv_heads,
                        " does not divide num_attention_heads ", c.heads);
  // The projections' sizes must be representable; the plan then checks them against the tensors' real shapes.
  const Index rows = detail::checked_product(c.heads, "num_attention_heads", c.head_dim, "* head_dim", where);
  detail::checked_product(rows, "num_attention_heads * head_dim =", c.hidden, "* hidden_size", where);
  return c;
}

/// Parses a Llama-style config.json (num_attention_heads, num_key_value_heads, hidden_size, head_dim).
inline ModelConfig parse_model_config(const nlohmann::ordered_json& j, const std::string& where = "config.json") {
  return parse_model_config(j, where, detail::architectures().back().fields);
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
  /// The new num_key_value_heads (gqa-convert --groups): divides H and either divides the current G (pooling) or
  /// is a multiple of it (exact expansion).
  Index kv_heads = 0;
  /// method, seed (see gqa/checkpoint.hpp) and an optional assignment of the current G heads to kv_heads groups.
  ConvertOptions convert;
  /// Replace an existing output directory, if it is empty or gqa wrote it (its .gqa-output marker; gqa/checkpoint.hpp).
  bool force = false;
  /// Called once per converted layer (from the calling thread). What it throws aborts the conversion cleanly.
  std::function<void(const LayerProgress&)> on_layer;
  /// If set, checked between tensors: once nonzero (e.g. set by a SIGINT handler), the conversion removes its
  /// temporary files and throws gqa::io_error [gqa.checkpoint.interrupted].
  const std::atomic<int>* cancel = nullptr;
};

struct CheckpointSummary {
  ModelConfig config;  ///< of the input
  Index kv_heads_before = 0, kv_heads_after = 0;
  /// True if K/V were pooled (kv_heads_after < kv_heads_before): the only case where options.convert.method (and,
  /// for random, its seed) matter.
  bool pooled = false;
  /// The method used when pooled: options.convert.method, with automatic resolved for the family
  /// (gqa::best_data_free_method of its rotary layout).
  PoolMethod method = PoolMethod::mean;
  /// True if pooled K/V were written expanded back to H heads, config unchanged (families whose config has no K/V
  /// head count, see gqa/detail/checkpoint_rules.hpp): the pooled model's function in MHA layout, no memory saved.
  bool written_expanded = false;
  /// Query head order of a non-adjacent assignment (new head j is old head query_order[j]); empty if adjacent.
  std::vector<Index> query_order;
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

/// What plan_checkpoint() reads: everything about a checkpoint but its tensor data.
struct CheckpointInventory {
  struct Tensor {
    std::string name;
    safetensors::Dtype dtype = safetensors::Dtype::F32;
    safetensors::Shape shape;
    std::size_t file = 0;  ///< index into files
  };
  struct Entry {
    std::string name;   ///< a top-level entry of the directory
    bool regular = true;  ///< a regular file (else a directory, link target aside, or special file)
  };
  nlohmann::ordered_json config;
  std::string config_name = "config.json";  ///< for messages
  std::vector<std::string> files;           ///< the safetensors files (shards), relative to the directory
  bool sharded = false;                     ///< files come with model.safetensors.index.json
  std::vector<Tensor> tensors;
  std::vector<Entry> entries;
};

/// What happens to one tensor.
struct TensorAction {
  /// refit: a query or output tensor rewritten by a method that reads the whole layer (from_layer).
  enum Kind { copy, pool, expand, permute_rows, permute_columns, refit } kind = copy;
  ProjectionShape shape;      ///< input projection shape (pool/expand/permute)
  safetensors::Shape shape_after;
  Index layer = -1;           ///< for attention tensors
  Index kv_heads = 0;         ///< pool/expand: the heads produced
  /// pool: expand the pooled heads back to shape.heads (families without a K/V head count in their config)
  bool expand_back = false;
  std::uint64_t seed = 0;     ///< PoolMethod::random's seed for this tensor
  /// The tensor is one output of its layer's gqa::pool_attention (summary.method reads the whole layer): pooled K/V
  /// and refitted Q/O of a layer are computed together, from the tensors CheckpointPlan::layers lists.
  bool from_layer = false;
};

/// The attention tensors of one layer, by role and parameter: index into CheckpointInventory::tensors, or none.
/// A pooling method that reads the layer's query and output projections finds them here.
struct LayerTensors {
  static constexpr std::size_t none = static_cast<std::size_t>(-1);
  std::array<std::array<std::size_t, 2>, detail::tensor_roles> index{{{none, none}, {none, none}, {none, none},
                                                                       {none, none}}};
  /// The normalisation in front of the attention (weight, bias), where the family names one (rules.input_norm).
  std::array<std::size_t, 2> norm{{none, none}};
  std::size_t& at(detail::TensorRole role, detail::TensorParam param) {
    return index[static_cast<std::size_t>(role)][static_cast<std::size_t>(param)];
  }
  std::size_t at(detail::TensorRole role, detail::TensorParam param) const {
    return index[static_cast<std::size_t>(role)][static_cast<std::size_t>(param)];
  }
};

struct CheckpointPlan {
  const detail::ArchitectureRules* rules = nullptr;
  std::vector<TensorAction> actions;  ///< parallel to CheckpointInventory::tensors
  std::vector<LayerTensors> layers;   ///< indexed by layer
  /// Per file, its tensors' indices in the order they are written (natural name order: layer 2 before layer 10).
  std::vector<std::vector<std::size_t>> file_order;
  nlohmann::ordered_json config_after;  ///< config.json as written
  /// Everything but nothing-written facts is filled in: files_written lists what execution will write.
  CheckpointSummary summary;
};

namespace detail {

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

inline bool is_weight_file(std::string_view name) {
  const auto dot = name.rfind('.');
  if (dot == std::string_view::npos) return false;
  const std::string_view ext = name.substr(dot);
  for (std::string_view e : {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                             ".npz"})
    if (ext == e) return true;
  return false;
}

/// "1, 2, 4, 8": the values of 1 .. H that satisfy `valid`.
template <typename Valid>
std::string list_values(Index heads, Valid valid) {
  if (heads > 4096) return "a divisor of H";  // real models have at most a few hundred heads
  std::string s;
  for (Index v = 1; v <= heads; ++v)
    if (valid(v)) s += (s.empty() ? "" : ", ") + std::to_string(v);
  return s;
}

/// Checks options.kv_heads and the assignment against the config; messages name gqa-convert's flags too.
inline void check_kv_heads(const ModelConfig& cfg, const CheckpointOptions& options) {
  const Index H = cfg.heads, G = cfg.kv_heads, target = options.kv_heads;
  auto valid = [&](Index v) { return H % v == 0 && (G % v == 0 || v % G == 0); };
  require(target > 0 && H % target == 0, "checkpoint.groups", "--groups = ", target,
          " (CheckpointOptions::kv_heads) must be a divisor of num_attention_heads H = ", H, ": one of ",
          list_values(H, [&](Index v) { return H % v == 0; }));
  require(G % target == 0 || target % G == 0, "checkpoint.groups", "--groups = ", target,
          " neither divides nor is a multiple of the checkpoint's num_key_value_heads G = ", G, ": use one of ",
          list_values(H, valid));
  const auto& assignment = options.convert.assignment;
  require(assignment.empty() || target < G, "checkpoint.groups", "--assignment applies to pooling only (--groups = ",
          target, " < num_key_value_heads = ", G, ")");
  if (target < G) {
    try {
      group_members(G, target, assignment);
    } catch (const invalid_argument& e) {
      throw invalid_argument(concat(e.what(), " (gqa-convert --assignment, ConvertOptions::assignment)"));
    }
  }
}

/// The expected shape of an attention tensor, or nullopt for one that is not per head (the output bias).
inline std::optional<safetensors::Shape> expected_shape(const AttentionTensor& a, const ModelConfig& c) {
  const bool weight = a.param == TensorParam::weight;
  switch (a.role) {
    case TensorRole::query:
      return weight ? safetensors::Shape{c.heads * c.head_dim, c.hidden} : safetensors::Shape{c.heads * c.head_dim};
    case TensorRole::key:
    case TensorRole::value:
      return weight ? safetensors::Shape{c.kv_heads * c.head_dim, c.hidden}
                    : safetensors::Shape{c.kv_heads * c.head_dim};
    case TensorRole::output:
      if (weight) return safetensors::Shape{c.hidden, c.heads * c.head_dim};
      return std::nullopt;
  }
  return std::nullopt;
}

/// Checks an attention tensor's shape and dtype against the config. Returns false for one that is not per head (the
/// output bias), which is copied.
inline bool check_attention_tensor(const CheckpointInventory::Tensor& t, const AttentionTensor& a, const ModelConfig& c,
                                   std::optional<safetensors::Dtype>& kv_dtype) {
  namespace st = safetensors;
  const auto expected = expected_shape(a, c);
  if (!expected) return false;
  require<format_error>(t.shape == *expected, "checkpoint.shape", "tensor '", t.name, "' has shape ",
                        st::shape_string(t.shape), " but config.json (H ", c.heads, ", G ", c.kv_heads, ", D ",
                        c.head_dim, ", hidden ", c.hidden, ") implies ", st::shape_string(*expected));
  if (a.role == TensorRole::key || a.role == TensorRole::value) {
    require(is_float_dtype(t.dtype), "checkpoint.unsupported", "tensor '", t.name, "' has dtype ",
            st::dtype_name(t.dtype), "; only F32, F16, BF16 and F64 projections can be pooled");
    if (a.param == TensorParam::weight && a.role == TensorRole::key) {
      require(!kv_dtype || *kv_dtype == t.dtype, "checkpoint.unsupported", "K/V projections of mixed dtypes (",
              st::dtype_name(kv_dtype.value_or(t.dtype)), ", ", st::dtype_name(t.dtype), ")");
      kv_dtype = t.dtype;
    }
  }
  return true;
}

/// The action for a checked attention tensor: pool or expand K/V to `kv_heads`, permute Q rows and O columns.
inline TensorAction attention_action(const CheckpointInventory::Tensor& t, const AttentionTensor& a,
                                     const ModelConfig& c, const CheckpointOptions& options, bool permute) {
  namespace st = safetensors;
  const Index kv_heads = options.kv_heads;
  TensorAction act;
  act.layer = a.layer;
  act.shape_after = t.shape;
  const bool weight = a.param == TensorParam::weight;
  if (a.role == TensorRole::key || a.role == TensorRole::value) {
    act.shape = weight ? ProjectionShape{WeightLayout::linear, c.kv_heads, c.head_dim, c.hidden}
                       : ProjectionShape::bias(c.kv_heads, c.head_dim);
    act.kv_heads = kv_heads;
    if (kv_heads != c.kv_heads) {
      act.kind = kv_heads < c.kv_heads ? TensorAction::pool : TensorAction::expand;
      act.shape_after[0] = kv_heads * c.head_dim;
    }
    act.seed = splitmix64(options.convert.seed ^ fnv1a64(t.name));
  } else if (a.role == TensorRole::query) {
    act.shape = weight ? ProjectionShape{WeightLayout::linear, c.heads, c.head_dim, c.hidden}
                       : ProjectionShape::bias(c.heads, c.head_dim);
    if (permute) act.kind = TensorAction::permute_rows;
  } else {  // o_proj.weight [hidden, H*D]: its input features are heads
    act.shape = ProjectionShape{WeightLayout::hidden_first, c.heads, c.head_dim, c.hidden};
    if (permute) act.kind = TensorAction::permute_columns;
  }
  if (act.kind == TensorAction::permute_rows || act.kind == TensorAction::permute_columns)
    require(is_float_dtype(t.dtype), "checkpoint.unsupported", "tensor '", t.name, "' has dtype ",
            st::dtype_name(t.dtype), "; only F32, F16, BF16 and F64 projections can be reordered");
  return act;
}

/// Checks that the layers found are 0 .. L-1, each with the tensors a conversion needs.
inline void check_layers(const CheckpointPlan& plan, const ModelConfig& c, bool permute, const char* expected_names,
                         const std::string& input) {
  require(!plan.layers.empty(), "checkpoint.unsupported", "'", input, "' has no ", expected_names,
          ": not a checkpoint of a family gqa understands (", plan.rules->family, ")");
  const Index L = static_cast<Index>(plan.layers.size());
  require<format_error>(c.layers == 0 || c.layers == L, "checkpoint.config", "num_hidden_layers = ", c.layers,
                        " but the checkpoint has attention tensors for ", L, " layers");
  using R = TensorRole;
  using P = TensorParam;
  for (Index layer = 0; layer < L; ++layer) {
    const LayerTensors& lt = plan.layers[static_cast<std::size_t>(layer)];
    // q_proj carries H * D in its shape: without it nothing would check num_attention_heads against a real size.
    for (auto [role, name] : {std::pair{R::key, "key (k_proj)"}, {R::value, "value (v_proj)"},
                              {R::query, "query (q_proj)"}})
      require<format_error>(lt.at(role, P::weight) != LayerTensors::none, "checkpoint.shape", "layer ", layer,
                            " has no ", name, " weight");
    require<format_error>((lt.at(R::key, P::bias) == LayerTensors::none) ==
                              (lt.at(R::value, P::bias) == LayerTensors::none),
                          "checkpoint.shape", "layer ", layer, " has a bias on only one of key and value");
    if (permute)
      require(lt.at(R::output, P::weight) != LayerTensors::none, "checkpoint.unsupported",
              "a non-adjacent --assignment reorders query heads, but layer ", layer, " has no output projection");
  }
}

/// Records the normalisation in front of each layer's attention (rules.input_norm) in plan.layers; a norm for a layer
/// without attention tensors (BERT's last output.LayerNorm feeds no attention) is ignored.
inline void attach_input_norms(CheckpointPlan& plan, const CheckpointInventory& inv) {
  for (std::size_t i = 0; i < inv.tensors.size(); ++i) {
    const auto norm = plan.rules->input_norm(inv.tensors[i].name);
    if (!norm || norm->first >= static_cast<Index>(plan.layers.size())) continue;
    std::size_t& slot = plan.layers[static_cast<std::size_t>(norm->first)].norm[static_cast<std::size_t>(norm->second)];
    require<format_error>(slot == LayerTensors::none, "checkpoint.shape", "layer ", norm->first,
                          " has two normalisation tensors in front of its attention: '", inv.tensors[i].name, "'");
    slot = i;
  }
}

/// Walks the tensors: roles, shapes against the config, and the per-layer index. Returns the role of each tensor
/// that is converted when its layer is (nullopt: copied whatever happens).
inline std::vector<std::optional<AttentionTensor>> classify_tensors(CheckpointPlan& plan,
                                                                     const CheckpointInventory& inv,
                                                                     const ModelConfig& c,
                                                                     std::optional<safetensors::Dtype>& kv_dtype) {
  const auto& tensors = inv.tensors;
  std::vector<std::optional<AttentionTensor>> roles(tensors.size());
  std::map<Index, LayerTensors> layers;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto a = plan.rules->classify(tensors[i].name);
    if (!a) continue;
    std::size_t& slot = layers[a->layer].at(a->role, a->param);
    require<format_error>(slot == LayerTensors::none, "checkpoint.shape", "layer ", a->layer, " has two ",
                          role_name(a->role), " tensors of the same kind: '", tensors[i].name, "'");
    slot = i;
    if (check_attention_tensor(tensors[i], *a, c, kv_dtype)) roles[i] = a;
  }
  if (!layers.empty())
    require<format_error>(layers.rbegin()->first == static_cast<Index>(layers.size()) - 1, "checkpoint.shape",
                          "attention layers are not numbered 0 .. ", static_cast<Index>(layers.size()) - 1,
                          " (highest is ", layers.rbegin()->first, ")");
  for (auto& [layer, lt] : layers) plan.layers.push_back(lt);
  attach_input_norms(plan, inv);
  return roles;
}

/// With a method that reads the whole layer: checks what gqa::pool_attention will trust (an output projection, the
/// output bias and the norms [hidden], one dtype for the layer) and marks the layer's K/V, query and output tensors
/// as outputs of that one call. Query and output tensors become refit (rows permuted inside pool_attention).
inline void plan_layer_method(CheckpointPlan& plan, const CheckpointInventory& inv, const ModelConfig& c,
                              safetensors::Dtype dtype, PoolMethod method) {
  namespace st = safetensors;
  using R = TensorRole;
  using P = TensorParam;
  for (std::size_t l = 0; l < plan.layers.size(); ++l) {
    const LayerTensors& lt = plan.layers[l];
    require(lt.at(R::output, P::weight) != LayerTensors::none, "checkpoint.unsupported", "--method ",
            to_string(method), " reads each layer's output projection, but layer ", l, " has none");
    auto check = [&](std::size_t i, const char* what, bool vector_of_hidden) {
      if (i == LayerTensors::none) return;
      const auto& t = inv.tensors[i];
      require<format_error>(!vector_of_hidden || t.shape == st::Shape{c.hidden}, "checkpoint.shape", "tensor '",
                            t.name, "' (", what, ") has shape ", st::shape_string(t.shape), " but hidden_size ",
                            c.hidden, " implies [", c.hidden, "]");
      require(t.dtype == dtype, "checkpoint.unsupported", "tensor '", t.name, "' has dtype ", st::dtype_name(t.dtype),
              " but the K/V projections are ", st::dtype_name(dtype), "; --method ", to_string(method),
              " computes each layer in one dtype");
    };
    check(lt.at(R::output, P::bias), "output bias", true);
    check(lt.norm[0], "the norm in front of the attention", true);
    check(lt.norm[1], "the norm in front of the attention", true);
    for (R role : {R::query, R::key, R::value, R::output})
      for (P param : {P::weight, P::bias}) {
        const std::size_t i = lt.at(role, param);
        if (i == LayerTensors::none) continue;
        if (!(role == R::output && param == P::bias)) check(i, role_name(role), false);
        TensorAction& act = plan.actions[i];
        act.from_layer = true;
        act.layer = static_cast<Index>(l);
        if (role == R::query || role == R::output) act.kind = TensorAction::refit;
      }
  }
}

/// Files: the order tensors are written in, what is copied, what is skipped, what is written.
inline void plan_files(CheckpointPlan& plan, const CheckpointInventory& inv) {
  plan.file_order.assign(inv.files.size(), {});
  for (std::size_t i = 0; i < inv.tensors.size(); ++i) {
    require<format_error>(inv.tensors[i].file < inv.files.size(), "checkpoint.shape", "tensor '",
                          inv.tensors[i].name, "' names file ", inv.tensors[i].file, " of ", inv.files.size());
    plan.file_order[inv.tensors[i].file].push_back(i);
  }
  for (auto& order : plan.file_order)
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return natural_less(inv.tensors[a].name, inv.tensors[b].name); });
  CheckpointSummary& sum = plan.summary;
  std::set<std::string> rewritten{inv.config_name};
  for (const auto& f : inv.files) rewritten.insert(f), sum.files_written.push_back(f);
  if (inv.sharded) rewritten.insert(safetensors::index_file_name), sum.files_written.push_back(safetensors::index_file_name);
  sum.files_written.push_back(inv.config_name);
  for (const auto& e : inv.entries) {
    if (rewritten.count(e.name)) continue;
    if (e.regular && !is_weight_file(e.name)) sum.files_copied.push_back(e.name);
    else sum.skipped.push_back(e.name);
  }
  std::sort(sum.files_copied.begin(), sum.files_copied.end());
  std::sort(sum.skipped.begin(), sum.skipped.end());
}

/// Counts and byte sizes, from the shapes alone.
inline void plan_summary(CheckpointPlan& plan, const CheckpointInventory& inv, const ModelConfig& c) {
  CheckpointSummary& sum = plan.summary;
  sum.config = c;
  sum.layers = static_cast<Index>(plan.layers.size());
  sum.sharded = inv.sharded;
  sum.tensors_total = inv.tensors.size();
  for (std::size_t i = 0; i < inv.tensors.size(); ++i) {
    const auto& t = inv.tensors[i];
    const TensorAction& act = plan.actions[i];
    const std::uint64_t elem = safetensors::dtype_size(t.dtype);
    sum.tensor_bytes_before += static_cast<std::uint64_t>(safetensors::numel(t.shape)) * elem;
    sum.tensor_bytes_after += static_cast<std::uint64_t>(safetensors::numel(act.shape_after)) * elem;
    (act.kind == TensorAction::copy ? sum.tensors_copied : sum.tensors_converted) += 1;
  }
  const std::uint64_t per_head = 2 * static_cast<std::uint64_t>(sum.layers * c.head_dim) *
                                 safetensors::dtype_size(sum.kv_dtype);
  sum.kv_cache_bytes_per_token_before = per_head * static_cast<std::uint64_t>(c.kv_heads);
  sum.kv_cache_bytes_per_token_after =
      per_head * static_cast<std::uint64_t>(sum.written_expanded ? c.kv_heads : sum.kv_heads_after);
}

}  // namespace detail

/// Validates a checkpoint's inventory against `rules` and the options and plans its conversion; reads and writes
/// nothing. Throws what convert_checkpoint documents (gqa/checkpoint.hpp), before anything would be written.
inline CheckpointPlan plan_checkpoint(const CheckpointInventory& inv, const CheckpointOptions& options,
                                      const detail::ArchitectureRules& rules, const std::string& input = "input") {
  using detail::require;
  CheckpointPlan plan;
  plan.rules = &rules;
  // Names first, so that e.g. GPT-2 (whose config has n_head, not num_attention_heads) is refused for what it is, a
  // fused QKV projection, rather than for a missing config field.
  for (const auto& t : inv.tensors)
    if (const auto why = rules.refusal(t.name)) require(false, "checkpoint.unsupported", *why);
  const ModelConfig c = parse_model_config(inv.config, inv.config_name, rules.fields);
  if (const auto why = rules.config_refusal(inv.config)) require(false, "checkpoint.unsupported", *why);
  std::optional<safetensors::Dtype> kv_dtype;
  const auto roles = detail::classify_tensors(plan, inv, c, kv_dtype);
  // The options after the shapes: H and G are now known to be real sizes, not values a hostile config made up.
  detail::check_kv_heads(c, options);
  const Index target = options.kv_heads;
  const bool permute = !is_adjacent(options.convert.assignment, target);
  detail::check_layers(plan, c, permute, rules.expected_names, input);
  plan.actions.resize(inv.tensors.size());
  for (std::size_t i = 0; i < inv.tensors.size(); ++i) {
    if (roles[i]) plan.actions[i] = detail::attention_action(inv.tensors[i], *roles[i], c, options, permute);
    else plan.actions[i].shape_after = inv.tensors[i].shape;
  }

  CheckpointSummary& sum = plan.summary;
  sum.kv_heads_before = c.kv_heads;
  sum.kv_heads_after = target;
  sum.pooled = target < c.kv_heads;
  sum.kv_dtype = *kv_dtype;
  sum.method = options.convert.method == PoolMethod::automatic ? best_data_free_method(rules.rotary)
                                                               : options.convert.method;
  if (sum.pooled && sum.method == PoolMethod::fit && rules.rotary != RotaryPairs::none)
    if (const auto why = detail::partial_rotary(inv.config, c.head_dim, c.layers))
      require(false, "checkpoint.unsupported", "--method fit (PoolMethod::fit) assumes the rotary embedding covers "
              "every dimension of every layer, but ", inv.config_name, " sets ", *why,
              "; --method mean, first or random pool whole heads, which is right under any rotary layout");
  if (sum.pooled && reads_layer(sum.method)) detail::plan_layer_method(plan, inv, c, *kv_dtype, sum.method);
  if (permute) sum.query_order = query_head_order(c.heads, target, options.convert.assignment);
  plan.config_after = inv.config;
  if (rules.fields.kv_heads != nullptr) {
    plan.config_after[rules.fields.kv_heads] = target;
  } else {  // no K/V head count to write: pooled heads go out expanded back to H, the config unchanged
    for (auto& act : plan.actions)
      if (act.kind == TensorAction::pool || act.kind == TensorAction::expand) {
        act.expand_back = act.kind == TensorAction::pool;
        act.kind = act.expand_back ? TensorAction::pool : TensorAction::copy;
        act.shape_after[0] = act.shape.heads * act.shape.head_dim;
      }
    sum.written_expanded = true;
  }
  detail::plan_files(plan, inv);
  detail::plan_summary(plan, inv, c);
  return plan;
}

/// plan_checkpoint with the rules of the family config.json names.
inline CheckpointPlan plan_checkpoint(const CheckpointInventory& inv, const CheckpointOptions& options,
                                      const std::string& input = "input") {
  return plan_checkpoint(inv, options, detail::rules_for(inv.config), input);
}

}  // namespace gqa
