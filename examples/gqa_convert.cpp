// gqa-convert — convert a Hugging Face safetensors checkpoint to fewer (or more) key/value heads.
//
//   gqa-convert INPUT_DIR OUTPUT_DIR --groups G [--method mean|first|random|fit|auto] [--seed N]
//               [--assignment g0,g1,...] [--force] [--quiet]
//
// A thin command line around gqa::convert_checkpoint (gqa/checkpoint.hpp, which documents what changes, what is
// copied and what is refused). Prints one line per converted layer and a summary. Exit status: 0 done, 1 the
// conversion failed (nothing was written), 2 bad command line. On SIGINT or SIGTERM it removes its temporary
// directory and then dies of the signal (exit status 128 + signal in a shell).
#include "gqa/checkpoint.hpp"
#include "cli/tool_cli.hpp"

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
    "usage: gqa-convert INPUT_DIR OUTPUT_DIR --groups G [--method mean|first|random|fit|auto] [--seed N]\n"
    "                   [--assignment g0,g1,...] [--force] [--quiet]\n"
    "\n"
    "Pools the K/V projection heads of a Llama/Mistral/Qwen2-style safetensors checkpoint into G groups of\n"
    "adjacent heads (num_key_value_heads = G; G = 1 is multi-query attention), or expands them exactly when G is\n"
    "larger than the checkpoint's num_key_value_heads. BERT checkpoints (no K/V head count in their config) are\n"
    "written expanded back to num_attention_heads: the pooled model's function in MHA layout, no memory saved.\n"
    "Every other tensor and file is copied unchanged (q/o projections too, except with --method fit).\n"
    "\n"
    "  --groups G        new num_key_value_heads (divides num_attention_heads)\n"
    "  --method M        mean (default, the GQA paper's), first (first head of each group), random (seeded),\n"
    "                    fit (function-aware: also refits the layer's q and o projections), auto (the best\n"
    "                    data-free method for the family: fit without rotary embedding (BERT), mean with it);\n"
    "                    used only when pooling (G smaller than the checkpoint's num_key_value_heads)\n"
    "  --seed N          seed of --method random, 0 .. 2^64-1 (default 0); refused with other methods\n"
    "  --assignment L    group of each current K/V head, comma-separated (default: adjacent heads); query\n"
    "                    heads and o_proj columns are reordered to match\n"
    "  --force           replace OUTPUT_DIR if it is empty or an output of gqa-convert or gqa-uptrain (which hold a\n"
    "                    .gqa-output marker file); never a checkpoint they did not write\n"
    "  --quiet           print only errors and warnings\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "gqa-convert: " << tool_cli::printable(message) << "\n\n" << usage;
  std::exit(2);
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

struct Command {
  std::vector<std::string> positional;
  gqa::CheckpointOptions options;
  bool have_groups = false, have_method = false, have_seed = false, quiet = false;
};

Command parse_command_line(int argc, char** argv) {
  Command c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << usage;
      std::exit(0);
    } else if (arg == "--groups") {
      const auto g = tool_cli::parse_integer(value());
      if (!g || *g <= 0) usage_error("--groups needs a positive integer");
      c.options.kv_heads = static_cast<gqa::Index>(*g);
      c.have_groups = true;
    } else if (arg == "--method") {
      const std::string m = value();
      const auto method = gqa::parse_pool_method(m);
      if (!method) usage_error("--method must be mean, first, random, fit or auto, not '" + m + "'");
      c.options.convert.method = *method;
      c.have_method = true;
    } else if (arg == "--seed") {
      const std::string text = value();
      const auto s = tool_cli::parse_uint64(text);
      if (!s) usage_error("--seed needs an integer in 0 .. 18446744073709551615, not '" + text + "'");
      c.options.convert.seed = *s;
      c.have_seed = true;
    } else if (arg == "--assignment") {
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) {
        const auto g = tool_cli::parse_integer(item);
        if (!g) usage_error("--assignment needs comma-separated integers, not '" + item + "'");
        c.options.convert.assignment.push_back(static_cast<gqa::Index>(*g));
      }
    } else if (arg == "--force") {
      c.options.force = true;
    } else if (arg == "--quiet") {
      c.quiet = true;
    } else if (arg.size() > 1 && arg[0] == '-') {
      usage_error("unknown option '" + arg + "'");
    } else {
      c.positional.push_back(arg);
    }
  }
  if (c.positional.size() != 2) usage_error("expected INPUT_DIR and OUTPUT_DIR");
  if (!c.have_groups) usage_error("--groups G is required");
  if (c.have_seed && c.options.convert.method != gqa::PoolMethod::random)
    usage_error("--seed only applies to --method random (this run uses --method " +
                std::string(gqa::to_string(c.options.convert.method)) + ")");
  return c;
}

void print_summary(const Command& c, const gqa::CheckpointSummary& s) {
  const char* what = s.kv_heads_after < s.kv_heads_before   ? "pooled"
                     : s.kv_heads_after > s.kv_heads_before ? "expanded"
                                                            : "unchanged";
  std::cout << "done: " << c.positional[0] << " -> " << c.positional[1] << "\n"
            << "  key/value heads: " << s.kv_heads_before << " -> " << s.kv_heads_after << " (" << what;
  if (s.pooled) {
    std::cout << ", method " << gqa::to_string(c.options.convert.method);
    if (c.options.convert.method != s.method) std::cout << " = " << gqa::to_string(s.method);
  }
  if (s.pooled && c.options.convert.method == gqa::PoolMethod::random) std::cout << ", seed " << c.options.convert.seed;
  std::cout << "), query heads " << s.config.heads << ", head_dim " << s.config.head_dim << ", " << s.layers
            << (s.layers == 1 ? " layer\n" : " layers\n");
  if (s.written_expanded && s.pooled)
    std::cout << "  written expanded back to " << s.config.heads << " key/value heads, config.json unchanged (the "
              << "family's config has no K/V head count): the " << s.kv_heads_after << "-head model's function in "
              << "MHA layout, for measurement and MHA-only runtimes; no memory is saved\n";
  if (!s.query_order.empty()) {
    std::cout << "  query heads reordered for --assignment (new head j is old head):";
    for (std::size_t j = 0; j < s.query_order.size(); ++j) std::cout << (j ? "," : " ") << s.query_order[j];
    std::cout << "\n";
  }
  std::cout << "  tensors: " << s.tensors_total << " (" << s.tensors_converted << " converted, " << s.tensors_copied
            << " copied byte for byte)" << (s.sharded ? ", sharded" : "") << "\n"
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
}

}  // namespace

int main(int argc, char** argv) {
  Command c = parse_command_line(argc, argv);
  if (!c.quiet)
    c.options.on_layer = [](const gqa::LayerProgress& p) {
      std::cout << "layer " << p.layer + 1 << "/" << p.num_layers << " ("
                << gqa::safetensors::dtype_name(p.dtype) << "):";
      for (std::size_t i = 0; i < p.tensors.size(); ++i)
        std::cout << (i ? ", " : " ") << short_name(p.tensors[i].name) << " " << shape_pair(p.tensors[i]);
      std::cout << std::endl;
    };
  tool_cli::cancel_on_signals();
  c.options.cancel = &tool_cli::received_signal;
  try {
    const gqa::CheckpointSummary s = gqa::convert_checkpoint(c.positional[0], c.positional[1], c.options);
    if (c.have_method && !s.pooled)
      std::cerr << "gqa-convert: warning: --method " << gqa::to_string(c.options.convert.method)
                << " was not used: --groups " << s.kv_heads_after << (s.kv_heads_after > s.kv_heads_before
                ? " expands the checkpoint's " : " keeps the checkpoint's ") << s.kv_heads_before
                << " key/value heads exactly\n";
    if (!c.quiet) print_summary(c, s);
    return 0;
  } catch (const std::exception& e) {
    tool_cli::die_if_cancelled("gqa-convert");
    std::cerr << "gqa-convert: error: " << tool_cli::printable(e.what()) << "\n";
    return 1;
  }
}
