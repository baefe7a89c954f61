// gqa-convert — convert a Hugging Face safetensors checkpoint to fewer (or more) key/value heads.
//
//   gqa-convert INPUT_DIR OUTPUT_DIR --groups G [--method mean|first|random] [--seed N]
//               [--assignment g0,g1,...] [--force] [--quiet]
//
// A thin command line around gqa::convert_checkpoint (gqa/checkpoint.hpp, which documents what changes, what is
// copied and what is refused). Prints one line per converted layer and a summary. Exit status: 0 done, 1 the
// conversion failed (nothing was written), 2 bad command line.
#include "gqa/checkpoint.hpp"

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr const char* usage =
    "usage: gqa-convert INPUT_DIR OUTPUT_DIR --groups G [--method mean|first|random] [--seed N]\n"
    "                   [--assignment g0,g1,...] [--force] [--quiet]\n"
    "\n"
    "Pools the K/V projection heads of a Llama/Mistral/Qwen2-style safetensors checkpoint into G groups of\n"
    "adjacent heads (num_key_value_heads = G; G = 1 is multi-query attention), or expands them exactly when G is\n"
    "larger than the checkpoint's num_key_value_heads. Every other tensor and file is copied unchanged.\n"
    "\n"
    "  --groups G        new num_key_value_heads (divides num_attention_heads)\n"
    "  --method M        mean (default, the GQA paper's), first (first head of each group), random (seeded)\n"
    "  --seed N          seed of --method random (default 0)\n"
    "  --assignment L    group of each current K/V head, comma-separated (default: adjacent heads); query\n"
    "                    heads and o_proj columns are reordered to match\n"
    "  --force           replace OUTPUT_DIR if it exists\n"
    "  --quiet           print only errors\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "gqa-convert: " << message << "\n\n" << usage;
  std::exit(2);
}

std::optional<long long> parse_integer(const std::string& s) {
  if (s.empty()) return std::nullopt;
  std::size_t used = 0;
  try {
    const long long v = std::stoll(s, &used, 10);
    if (used != s.size()) return std::nullopt;
    return v;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string shape_pair(const gqa::ConvertedTensor& t) {
  return gqa::safetensors::shape_string(t.before) + " -> " + gqa::safetensors::shape_string(t.after);
}

std::string short_name(const std::string& name) {
  const auto pos = name.find(".self_attn.");
  return pos == std::string::npos ? name : name.substr(pos + 11);
}

std::string bytes(std::uint64_t n) {
  std::ostringstream os;
  os << n << " B";
  if (n >= (1ull << 20)) os << " (" << static_cast<double>(n) / (1ull << 20) << " MiB)";
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  gqa::CheckpointOptions options;
  bool have_groups = false, quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << usage;
      return 0;
    } else if (arg == "--groups") {
      const auto g = parse_integer(value());
      if (!g || *g <= 0) usage_error("--groups needs a positive integer");
      options.groups = static_cast<gqa::Index>(*g);
      have_groups = true;
    } else if (arg == "--method") {
      const std::string m = value();
      const auto method = gqa::parse_pool_method(m);
      if (!method) usage_error("--method must be mean, first or random, not '" + m + "'");
      options.convert.method = *method;
    } else if (arg == "--seed") {
      const auto s = parse_integer(value());
      if (!s || *s < 0) usage_error("--seed needs a non-negative integer");
      options.convert.seed = static_cast<std::uint64_t>(*s);
    } else if (arg == "--assignment") {
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) {
        const auto g = parse_integer(item);
        if (!g) usage_error("--assignment needs comma-separated integers, not '" + item + "'");
        options.convert.assignment.push_back(static_cast<gqa::Index>(*g));
      }
    } else if (arg == "--force") {
      options.force = true;
    } else if (arg == "--quiet") {
      quiet = true;
    } else if (arg.size() > 1 && arg[0] == '-') {
      usage_error("unknown option '" + arg + "'");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) usage_error("expected INPUT_DIR and OUTPUT_DIR");
  if (!have_groups) usage_error("--groups G is required");

  if (!quiet)
    options.on_layer = [](const gqa::LayerProgress& p) {
      std::cout << "layer " << p.layer + 1 << "/" << p.num_layers << " ("
                << gqa::safetensors::dtype_name(p.dtype) << "):";
      for (std::size_t i = 0; i < p.tensors.size(); ++i)
        std::cout << (i ? ", " : " ") << short_name(p.tensors[i].name) << " " << shape_pair(p.tensors[i]);
      std::cout << std::endl;
    };

  try {
    const gqa::CheckpointSummary s = gqa::convert_checkpoint(positional[0], positional[1], options);
    if (quiet) return 0;
    const char* what = s.groups_after < s.groups_before   ? "pooled"
                       : s.groups_after > s.groups_before ? "expanded"
                                                          : "unchanged";
    std::cout << "done: " << positional[0] << " -> " << positional[1] << "\n"
              << "  key/value heads: " << s.groups_before << " -> " << s.groups_after << " (" << what;
    if (s.groups_after < s.groups_before) std::cout << ", method " << gqa::to_string(options.convert.method);
    std::cout << "), query heads " << s.config.heads << ", head_dim " << s.config.head_dim << ", " << s.layers
              << (s.layers == 1 ? " layer\n" : " layers\n")
              << "  tensors: " << s.tensors_total << " (" << s.tensors_converted << " converted, "
              << s.tensors_copied << " copied byte for byte)" << (s.sharded ? ", sharded" : "") << "\n"
              << "  tensor bytes: " << bytes(s.tensor_bytes_before) << " -> " << bytes(s.tensor_bytes_after) << "\n"
              << "  KV cache per token (" << gqa::safetensors::dtype_name(s.kv_dtype)
              << "): " << bytes(s.kv_cache_bytes_per_token_before) << " -> " << bytes(s.kv_cache_bytes_per_token_after)
              << "\n";
    if (!s.files_copied.empty()) {
      std::cout << "  copied:";
      for (const auto& f : s.files_copied) std::cout << " " << f;
      std::cout << "\n";
    }
    if (!s.skipped.empty()) {
      std::cout << "  not copied (subdirectories and other weight files):";
      for (const auto& f : s.skipped) std::cout << " " << f;
      std::cout << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "gqa-convert: error: " << e.what() << "\n";
    return 1;
  }
}
