// gqa/checkpoint.hpp — converting a Hugging Face safetensors checkpoint (Llama / Mistral / Qwen2 / Gemma style, or
// BERT) to fewer key/value heads: MHA -> GQA -> MQA by pooling K/V heads (gqa/convert.hpp), or back to more heads by
// exact expansion. This is what the gqa-convert tool runs; call it from C++ as
//
//   gqa::CheckpointOptions opt;
//   opt.kv_heads = 8;                                 // the new num_key_value_heads
//   gqa::CheckpointSummary s = gqa::convert_checkpoint("llama-mha", "llama-gqa8", opt);
//
// INPUT: a directory with config.json and either model.safetensors or model.safetensors.index.json and its shards.
// config.json gives H = num_attention_heads, G = num_key_value_heads (absent or null: H), hidden_size and
// D = head_dim (absent or null: hidden_size / H; Gemma-7B and Mistral-Nemo set another value).
//
// WHAT CHANGES:
//   model.layers.<i>.self_attn.{k_proj,v_proj}.weight  [G*D, hidden] -> [G'*D, hidden]   (in their own dtype:
//   model.layers.<i>.self_attn.{k_proj,v_proj}.bias    [G*D]         -> [G'*D]            F32/F16/BF16/F64)
//   (G' = options.kv_heads) config.json: num_key_value_heads = G'; every other field as it was (key order kept).
//   model.safetensors.index.json (sharded input): the same weight_map, metadata.total_size updated.
//   With a non-adjacent options.convert.assignment, also q_proj.weight/bias rows and o_proj.weight columns are
//   reordered (gqa::query_head_order, reported in CheckpointSummary::query_order), so the model computes the
//   function of that grouping.
// G' < G pools (options.convert.method: mean / first / random / fit / automatic); with fit (and automatic where it
// means fit) q_proj.weight/bias and o_proj.weight/bias are rewritten too, each layer by one gqa::pool_attention that
// also reads the norm in front of the attention (CheckpointSummary::method says which method ran). G' == G leaves
// K/V as they are; G' > G (a multiple of G dividing H) expands exactly, e.g. G' = H turns a GQA checkpoint into an
// MHA one. The method (and seed) only matter when pooling; CheckpointSummary::pooled says whether they did.
// PoolMethod::random seeds each tensor with splitmix64(seed ^ fnv1a64(tensor name)), so K and V (and every layer)
// get different, reproducible draws.
//
// BERT (config "model_type": "bert" or a Bert* architecture; [bert.]encoder.layer.<i>.attention.self.{query,key,
// value}.{weight,bias}, attention.output.dense.{weight,bias}; config num_attention_heads, hidden_size): BERT
// runtimes have no K/V head count, so pooled K/V are written expanded back to H heads (repeat_interleave) and
// config.json is copied unchanged: the pooled model's function in MHA layout, for measurement and MHA-only
// runtimes, saving no memory (CheckpointSummary::written_expanded). Relative position embeddings are refused.
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
// model.layers.<i>.self_attn.{q_proj,k_proj,v_proj}.weight. Malformed config.json (invalid JSON, duplicate keys,
// nesting deeper than 64 levels), dimensions whose products overflow, or shapes that disagree with it:
// gqa::format_error [gqa.checkpoint.config] / [gqa.checkpoint.shape]. Files that are not regular files (a FIFO in
// place of a shard): gqa::io_error. The architecture rules are in gqa/detail/checkpoint_rules.hpp; the
// decisions are made by plan_checkpoint() (gqa/checkpoint_plan.hpp) before anything is written.
//
// THE OUTPUT DIRECTORY ([gqa.checkpoint.output_exists], gqa::invalid_argument): never the input, inside it, or a
// directory containing it. An existing one is replaced only with options.force, and only if it is empty or an output
// gqa wrote: it holds gqa's marker file .gqa-output (which every output of convert_checkpoint and gqa-uptrain gets,
// see gqa/detail/output_directory.hpp), regular files only, no weight files gqa does not write. Anything else (a
// model download or any checkpoint gqa did not write, a working directory, a model with subdirectories) is refused,
// force or not, with the reason. Outputs written before the marker existed lack it: remove them by hand.
//
// ATOMICITY (gqa/detail/output_directory.hpp): everything is validated before anything is written; the output is built
// in a hidden sibling directory (.<name>.gqa-tmp-<host>-<pid>-<random>), each file through temp + fsync + rename
// (copied files too), and moved onto the output path only when complete, with renameat2(RENAME_EXCHANGE) when
// replacing. On any failure, and on options.cancel, the temporary directory is removed, so a failed run leaves no
// output directory (with force, the old one is kept). A kill -9 cannot clean up: it leaves the hidden directory, which
// the next run in the same parent directory removes (its owning process is gone). Every OS failure is a
// gqa::io_error [gqa.io] naming the call, the path and errno's message.
#pragma once

#include "gqa/checkpoint_plan.hpp"
#include "gqa/convert.hpp"
#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/output_directory.hpp"
#include "gqa/errors.hpp"
#include "gqa/safetensors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace gqa {
namespace detail {

/// config.json may nest (rope_scaling, quantization_config, text_config) but never this deep; the limit keeps a
/// hostile file from exhausting the stack when the JSON is copied or destroyed.
inline constexpr int max_config_depth = 64;

/// Reads config.json strictly (duplicate keys and deep nesting refused) in key order.
inline nlohmann::ordered_json read_config(const std::filesystem::path& path) {
  MappedFile m(path);
  const char* p = reinterpret_cast<const char*>(m.data());
  return safetensors::detail::parse_json_strict<nlohmann::ordered_json>(p, p + m.size(), path.string(),
                                                                        "checkpoint.config", "checkpoint.config",
                                                                        max_config_depth);
}

/// The top-level entries of a directory. With follow_links, a link to a regular file counts as one (a Hugging Face
/// cache snapshot is all links into its blob store).
inline std::vector<CheckpointInventory::Entry> list_entries(const std::filesystem::path& dir, bool follow_links) {
  namespace fs = std::filesystem;
  std::vector<CheckpointInventory::Entry> entries;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  for (const fs::directory_iterator end; !ec && it != end; it.increment(ec)) {
    std::error_code e2;
    const bool regular = fs::is_regular_file(follow_links ? it->status(e2) : it->symlink_status(e2));
    entries.push_back({it->path().filename().string(), regular && !e2});
  }
  require<io_error>(!ec, "io", "cannot list '", dir.string(), "': ", ec.message());
  return entries;
}

/// What plan_checkpoint() needs from an opened checkpoint directory.
inline CheckpointInventory make_inventory(const std::filesystem::path& in, const safetensors::Directory& dir) {
  CheckpointInventory inv;
  const std::filesystem::path config_path = in / "config.json";
  std::error_code ec;
  require<format_error>(std::filesystem::exists(std::filesystem::symlink_status(config_path, ec)),
                        "checkpoint.config", "'", in.string(), "' has no config.json");
  inv.config = read_config(config_path);
  inv.config_name = "config.json";
  inv.files = dir.file_names();
  inv.sharded = dir.sharded();
  for (std::size_t f = 0; f < dir.files().size(); ++f)
    for (const auto& t : dir.files()[f].tensors()) inv.tensors.push_back({t.name, t.dtype, t.shape, f});
  inv.entries = list_entries(in, true);
  // An input that gqa wrote carries its marker; the output gets a fresh one from OutputDirectory::commit.
  inv.entries.erase(std::remove_if(inv.entries.begin(), inv.entries.end(),
                                   [](const CheckpointInventory::Entry& e) { return e.name == output_marker_name; }),
                    inv.entries.end());
  return inv;
}

/// Why an existing `out` may not be replaced, or nullopt if it is empty or an output gqa wrote: one holding gqa's
/// marker (gqa/detail/output_directory.hpp), regular files only, and no weight file gqa does not write. A checkpoint
/// without the marker (a model download: config.json, model.safetensors, README.md, ...) is never replaced.
inline std::optional<std::string> not_replaceable(const std::filesystem::path& out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_symlink(fs::symlink_status(out, ec))) return std::string("it is a symbolic link");
  if (!fs::is_directory(fs::symlink_status(out, ec))) return std::string("it is not a directory");
  const auto entries = list_entries(out, false);
  if (entries.empty()) return std::nullopt;
  for (const auto& e : entries) {
    if (!e.regular) return concat("it holds '", e.name, "', which is not a regular file");
    const bool safetensors = e.name.size() > 12 && e.name.substr(e.name.size() - 12) == ".safetensors";
    if (!safetensors && is_weight_file(e.name))
      return concat("it holds '", e.name, "', a weight file gqa does not write");
  }
  if (!is_marked_output(out))
    return concat("it is neither empty nor a converted checkpoint: it has no ", output_marker_name,
                  " marker file, which gqa-convert and gqa-uptrain write into every output (a checkpoint they did "
                  "not write, such as a model download, is never replaced)");
  return std::nullopt;
}

/// Resolved input and output paths, checked: see "THE OUTPUT DIRECTORY" in the header comment.
struct CheckpointPaths {
  std::filesystem::path in, out;
  bool out_exists = false;
};

/// `force_flag` names the caller's way to replace an existing output in the message that asks for it.
inline CheckpointPaths check_paths(const std::filesystem::path& input_dir, const std::filesystem::path& output_dir,
                                   bool force, const char* force_flag = "gqa-convert --force (CheckpointOptions::force)") {
  namespace fs = std::filesystem;
  std::error_code ec;
  require(!input_dir.empty(), "checkpoint.path", "the input directory (INPUT_DIR) is an empty path");
  require(!output_dir.empty(), "checkpoint.path", "the output directory (OUTPUT_DIR) is an empty path");
  require<io_error>(fs::is_directory(input_dir, ec), "io", "input '", input_dir.string(), "' is not a directory");
  CheckpointPaths p;
  p.in = fs::weakly_canonical(fs::absolute(input_dir, ec), ec);
  require<io_error>(!ec, "io", "cannot resolve '", input_dir.string(), "': ", ec.message());
  fs::path out = fs::absolute(output_dir, ec).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  const fs::path parent = fs::weakly_canonical(out.parent_path(), ec);
  require<io_error>(!ec && fs::is_directory(parent, ec), "io", "the output's parent directory '",
                    out.parent_path().string(), "' does not exist");
  p.out = parent / out.filename();
  auto inside = [](const fs::path& a, const fs::path& b) {  // a is b or lies under it
    const fs::path rel = a.lexically_relative(b);
    return !rel.empty() && *rel.begin() != "..";
  };
  require(!inside(p.out, p.in), "checkpoint.output_exists", "output '", output_dir.string(),
          inside(p.in, p.out) ? "' is the input directory" : "' is inside the input directory, which is never written");
  require(!inside(p.in, p.out), "checkpoint.output_exists", "output '", output_dir.string(),
          "' contains the input directory; replacing it would delete the input");
  p.out_exists = fs::exists(fs::symlink_status(p.out, ec));
  if (p.out_exists) {
    require(force, "checkpoint.output_exists", "output '", output_dir.string(),
            "' exists; use ", force_flag, " to replace it");
    const auto why = not_replaceable(p.out);
    require(!why, "checkpoint.output_exists", "output '", output_dir.string(),
            "' exists and --force only replaces an empty directory or one that gqa-convert or gqa-uptrain wrote, but ",
            why.value_or(""));
  }
  return p;
}

/// A typed view of a tensor's data: zero copy when aligned, else a copy in `storage`.
template <typename T>
span<const T> typed_data(const safetensors::TensorView& t, std::vector<T>& storage) {
  if (reinterpret_cast<std::uintptr_t>(t.bytes.data()) % alignof(T) == 0) return t.as<T>();
  storage = t.to_vector<T>();
  return {storage.data(), static_cast<Index>(storage.size())};
}

/// Computes one converted tensor (not from_layer) into `dst`.
inline void convert_tensor(const TensorAction& act, const safetensors::TensorView& t,
                           const std::vector<Index>& query_order, const ConvertOptions& convert, span<std::byte> dst) {
  with_float_type(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> storage;
    const span<const T> src = typed_data<T>(t, storage);
    std::vector<T> result(static_cast<std::size_t>(dst.size()) / sizeof(T));
    const span<T> res(result.data(), static_cast<Index>(result.size()));
    switch (act.kind) {
      case TensorAction::pool: {
        ConvertOptions o = convert;
        o.seed = act.seed;
        if (!act.expand_back) {
          pool_heads<T>(src, act.shape, act.kv_heads, res, o);
        } else {
          std::vector<T> pooled(static_cast<std::size_t>(act.shape.with_heads(act.kv_heads).size()));
          pool_heads<T>(src, act.shape, act.kv_heads, span<T>(pooled.data(), static_cast<Index>(pooled.size())), o);
          expand_heads<T>(span<const T>(pooled.data(), static_cast<Index>(pooled.size())),
                          act.shape.with_heads(act.kv_heads), act.shape.heads, res);
        }
        break;
      }
      case TensorAction::expand: expand_heads<T>(src, act.shape, act.kv_heads, res); break;
      default: permute_heads<T>(src, act.shape, span<const Index>(query_order), res); break;
    }
    std::memcpy(dst.data(), result.data(), static_cast<std::size_t>(dst.size()));
  });
}

/// The outputs of whole-layer methods (TensorAction::from_layer): each layer is computed by one gqa::pool_attention
/// when its first such tensor is written, and each result is dropped once written, so at most the layers whose
/// tensors straddle shards are held.
class LayerResults {
 public:
  /// `views[i]` is inventory tensor i; `convert.method` is the resolved method (never automatic).
  LayerResults(const CheckpointPlan& plan, std::vector<const safetensors::TensorView*> views, ConvertOptions convert)
      : plan_(plan), views_(std::move(views)), convert_(std::move(convert)) {}

  /// Inventory tensor i's converted bytes, exactly dst.size() of them.
  void take(std::size_t i, span<std::byte> dst) {
    auto it = bytes_.find(i);
    if (it == bytes_.end()) {
      compute(plan_.actions[i].layer);
      it = bytes_.find(i);
    }
    require<format_error>(it != bytes_.end() && it->second.size() == static_cast<std::size_t>(dst.size()),
                          "checkpoint.shape", "tensor '", views_[i]->name, "': the layer's result has no tensor of ",
                          dst.size(), " bytes for it");
    std::memcpy(dst.data(), it->second.data(), it->second.size());
    bytes_.erase(it);
  }

 private:
  void compute(Index layer);

  const CheckpointPlan& plan_;
  std::vector<const safetensors::TensorView*> views_;
  ConvertOptions convert_;
  std::map<std::size_t, std::vector<std::byte>> bytes_;
};

inline void LayerResults::compute(Index layer) {
  using R = TensorRole;
  using P = TensorParam;
  const LayerTensors& lt = plan_.layers[static_cast<std::size_t>(layer)];
  const CheckpointSummary& sum = plan_.summary;
  const ModelConfig& c = sum.config;
  with_float_type(sum.kv_dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<std::vector<T>> storage;  // copies of unaligned tensors
    storage.reserve(12);
    auto data = [&](std::size_t i) -> span<const T> {
      if (i == LayerTensors::none) return {};
      storage.emplace_back();
      return typed_data<T>(*views_[i], storage.back());
    };
    AttentionView<T> w;
    w.wq = data(lt.at(R::query, P::weight)), w.bq = data(lt.at(R::query, P::bias));
    w.wk = data(lt.at(R::key, P::weight)), w.bk = data(lt.at(R::key, P::bias));
    w.wv = data(lt.at(R::value, P::weight)), w.bv = data(lt.at(R::value, P::bias));
    w.wo = data(lt.at(R::output, P::weight)), w.bo = data(lt.at(R::output, P::bias));
    w.norm_weight = data(lt.norm[0]), w.norm_bias = data(lt.norm[1]);
    const AttentionShape shape{c.hidden, c.heads, c.kv_heads, c.head_dim, plan_.rules->rotary};
    const AttentionWeights<T> res = pool_attention<T>(w, shape, sum.kv_heads_after, convert_);
    auto put = [&](R role, P param, const std::vector<T>& v) {
      const std::size_t i = lt.at(role, param);
      if (i == LayerTensors::none) return;
      const TensorAction& act = plan_.actions[i];
      std::vector<T> out = v;
      if (act.expand_back) {  // K/V back to H heads: the family's config has no K/V head count
        out.resize(static_cast<std::size_t>(act.shape.size()));
        expand_heads<T>(span<const T>(v.data(), static_cast<Index>(v.size())), act.shape.with_heads(act.kv_heads),
                        act.shape.heads, span<T>(out.data(), static_cast<Index>(out.size())));
      }
      std::vector<std::byte>& b = bytes_[i];
      b.resize(out.size() * sizeof(T));
      if (!out.empty()) std::memcpy(b.data(), out.data(), b.size());
    };
    put(R::query, P::weight, res.wq), put(R::query, P::bias, res.bq);
    put(R::key, P::weight, res.wk), put(R::key, P::bias, res.bk);
    put(R::value, P::weight, res.wv), put(R::value, P::bias, res.bv);
    put(R::output, P::weight, res.wo), put(R::output, P::bias, res.bo);
  });
}

/// Throws io_error [gqa.checkpoint.interrupted] once options.cancel is set.
inline void check_cancel(const CheckpointOptions& options) {
  require<io_error>(options.cancel == nullptr || options.cancel->load() == 0, "checkpoint.interrupted",
                    "interrupted (signal ", options.cancel ? options.cancel->load() : 0,
                    "); the temporary output was removed");
}

/// Writes the safetensors files of the plan into `staging`, reporting each layer once all its tensors are written.
inline void write_tensors(const CheckpointPlan& plan, const safetensors::Directory& dir,
                          const CheckpointOptions& options, const std::filesystem::path& staging) {
  namespace st = safetensors;
  const CheckpointSummary& sum = plan.summary;
  std::map<Index, std::size_t> pending;  // layer -> converted tensors still to write
  for (const auto& act : plan.actions)
    if (act.kind != TensorAction::copy) ++pending[act.layer];
  std::map<Index, LayerProgress> progress;
  std::vector<const st::TensorView*> views;  // inventory order: each file's tensors in turn
  for (const auto& file : dir.files())
    for (const auto& t : file.tensors()) views.push_back(&t);
  ConvertOptions convert = options.convert;
  convert.method = sum.method;  // automatic resolved for the family
  LayerResults layer_results(plan, views, convert);
  std::size_t first = 0;  // the inventory lists each file's tensors in turn: file f's start at `first`
  for (std::size_t f = 0; f < plan.file_order.size(); first += dir.files()[f].size(), ++f) {
    const st::File& file = dir.files()[f];
    st::Metadata metadata = file.metadata();
    metadata.emplace("format", "pt");
    st::Writer writer(metadata);
    for (std::size_t i : plan.file_order[f]) {
      const st::TensorView& t = file.tensors()[i - first];
      const TensorAction& act = plan.actions[i];
      if (act.kind == TensorAction::copy) {
        writer.add(t.name, t.dtype, t.shape, t.bytes);
        continue;
      }
      writer.add(t.name, t.dtype, act.shape_after, [&, i](span<std::byte> dst) {
        check_cancel(options);
        if (act.from_layer) layer_results.take(i, dst);
        else convert_tensor(act, t, sum.query_order, convert, dst);
        LayerProgress& lp = progress[act.layer];
        lp.layer = act.layer;
        lp.num_layers = sum.layers;
        lp.dtype = t.dtype;
        lp.tensors.push_back({t.name, t.shape, act.shape_after});
        if (--pending[act.layer] == 0 && options.on_layer) options.on_layer(lp);
      });
    }
    writer.write(staging / dir.file_names()[f], options.cancel);
  }
}

/// Copies a regular file through an AtomicFile (so it is fsync'ed before the directory is moved into place).
inline void copy_regular_file(const std::filesystem::path& from, const std::filesystem::path& to) {
  struct stat info {};
  const FileDescriptor src = open_regular_file(from, info);
  AtomicFile dst(to);
  std::vector<char> buffer(std::size_t{1} << 20);
  for (;;) {
    const ssize_t n = ::read(src.get(), buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot read", from);
    if (n == 0) break;
    dst.write(buffer.data(), static_cast<std::size_t>(n));
  }
  dst.commit();
}

}  // namespace detail

/// Converts the checkpoint in `input_dir` to options.kv_heads key/value heads, written to `output_dir` (see the
/// header comment for what changes, what is copied, what is refused and the atomicity guarantee).
inline CheckpointSummary convert_checkpoint(const std::filesystem::path& input_dir,
                                            const std::filesystem::path& output_dir,
                                            const CheckpointOptions& options) {
  namespace st = safetensors;
  try {
    const detail::CheckpointPaths paths = detail::check_paths(input_dir, output_dir, options.force);
    const st::Directory dir = st::Directory::open(paths.in);
    const CheckpointInventory inventory = detail::make_inventory(paths.in, dir);
    const CheckpointPlan plan = plan_checkpoint(inventory, options, input_dir.string());

    detail::check_cancel(options);
    detail::OutputDirectory out(paths.out, paths.out_exists);
    detail::write_tensors(plan, dir, options, out.path());
    if (dir.sharded()) {
      st::ShardIndex index = *dir.index();
      index.total_size = plan.summary.tensor_bytes_after;
      st::write_index(out.path() / st::index_file_name, index);
    }
    detail::write_file_atomically(out.path() / inventory.config_name, plan.config_after.dump(2) + "\n");
    for (const auto& name : plan.summary.files_copied) {
      detail::check_cancel(options);
      detail::copy_regular_file(paths.in / name, out.path() / name);
    }
    detail::check_cancel(options);
    out.commit();
    return plan.summary;
  } catch (const std::filesystem::filesystem_error& e) {
    throw io_error(detail::concat("[gqa.io] ", e.what()));
  }
}

}  // namespace gqa
