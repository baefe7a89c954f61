// gqa-uptrain — recover a converted (pooled) Llama-family checkpoint by layer-wise distillation of its attention
// projections against the original model (examples/uptrain/uptrain.hpp has the method, distill.hpp the math).
//
//   gqa-uptrain ORIGINAL_DIR CONVERTED_DIR OUTPUT_DIR --calibration IDS_FILE [--steps N] [--batch B] [--window S]
//               [--lr LR] [--seed N] [--train kv|qkvo] [--inputs converted|original] [--target output|residual]
//               [--threads N] [--force] [--quiet]
//
// CONVERTED_DIR is gqa-convert's output of ORIGINAL_DIR (e.g. --groups 1); OUTPUT_DIR gets a checkpoint in the same
// format with every layer's k_proj / v_proj (and with --train qkvo, the default, q_proj / o_proj) trained. Prints one line per layer (loss before and after, relative to
// the target's mean square, and the time) and a summary. Exit status: 0 done, 1 failed (nothing written), 2 bad
// command line. On SIGINT or SIGTERM it stops, removes its temporary output and dies of the signal.
#include "uptrain/uptrain.hpp"
#include "cli/tool_cli.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr const char* usage =
    "usage: gqa-uptrain ORIGINAL_DIR CONVERTED_DIR OUTPUT_DIR --calibration IDS_FILE [--steps N] [--batch B]\n"
    "                   [--window S] [--lr LR] [--seed N] [--train kv|qkvo] [--inputs converted|original]\n"
    "                   [--target output|residual] [--threads N] [--force] [--quiet]\n"
    "\n"
    "Trains the attention projections of CONVERTED_DIR (gqa-convert's output of ORIGINAL_DIR) so that each\n"
    "attention layer's output after o_proj matches the original's on the calibration ids (MSE, Adam, seeded),\n"
    "and writes the result to OUTPUT_DIR in gqa-convert's format.\n"
    "\n"
    "  --calibration F   whitespace-separated token ids (not the evaluation text), at least one window\n"
    "  --steps N         Adam steps per layer (default 300)\n"
    "  --batch B         windows per step (default 4)\n"
    "  --window S        tokens per calibration window, positions 0..S-1 (default 512)\n"
    "  --lr LR           peak learning rate, cosine decay to 0 (default 2e-3)\n"
    "  --seed N          mini-batch order seed (default 0)\n"
    "  --train T         qkvo (default): q_proj, k_proj, v_proj and o_proj (and biases); kv: k_proj, v_proj only\n"
    "  --inputs I        converted (default): each layer's inputs come from the already-uptrained converted\n"
    "                    layers below it; original: from the original model\n"
    "  --target T        output (default): the original layer's attention output; residual: that plus the\n"
    "                    residual stream's drift (original - converted) at the layer's input, so each layer also\n"
    "                    undoes the error of the layers below it (needs --inputs converted)\n"
    "  --threads N       OpenMP threads, at most 1024 (default: OMP_NUM_THREADS, else the cores); the output does\n"
    "                    not depend on it\n"
    "  --force           replace OUTPUT_DIR if it is empty or an output of gqa-uptrain or gqa-convert (which hold\n"
    "                    a .gqa-output marker file); never a checkpoint they did not write\n"
    "  --quiet           print only errors\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "gqa-uptrain: " << tool_cli::printable(message) << "\n\n" << usage;
  std::exit(2);
}

struct Command {
  std::vector<std::string> positional;
  std::string calibration;
  uptrain::Options options;
  bool quiet = false;
};

Command parse_command_line(int argc, char** argv) {
  Command c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    auto integer = [&](long long min) {
      const std::string text = value();
      const auto v = tool_cli::parse_integer(text);
      if (!v || *v < min) usage_error(arg + " needs an integer >= " + std::to_string(min) + ", not '" + text + "'");
      return *v;
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << usage;
      std::exit(0);
    } else if (arg == "--calibration") {
      c.calibration = value();
    } else if (arg == "--steps") {
      c.options.steps = gqa::Index(integer(1));
    } else if (arg == "--batch") {
      c.options.batch = gqa::Index(integer(1));
    } else if (arg == "--window") {
      c.options.window = gqa::Index(integer(2));
    } else if (arg == "--seed") {
      c.options.seed = std::uint64_t(integer(0));
    } else if (arg == "--threads") {
      try {
        c.options.threads = tool_cli::parse_threads(arg, value(), 0);
      } catch (const tool_cli::usage_error& e) {
        usage_error(e.what());
      }
    } else if (arg == "--lr") {
      const std::string text = value();
      std::size_t used = 0;
      double lr = 0;
      try {
        lr = std::stod(text, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != text.size() || !(lr > 0) || !std::isfinite(lr)) usage_error("--lr needs a positive number, not '" + text + "'");
      c.options.lr = lr;
    } else if (arg == "--inputs") {
      const std::string v = value();
      if (v == "converted") c.options.inputs = uptrain::Inputs::converted;
      else if (v == "original") c.options.inputs = uptrain::Inputs::original;
      else usage_error("--inputs must be converted or original, not '" + v + "'");
    } else if (arg == "--train") {
      const std::string v = value();
      if (v == "kv") c.options.train = uptrain::Train::kv;
      else if (v == "qkvo") c.options.train = uptrain::Train::qkvo;
      else usage_error("--train must be kv or qkvo, not '" + v + "'");
    } else if (arg == "--target") {
      const std::string v = value();
      if (v == "output") c.options.target = uptrain::Target::output;
      else if (v == "residual") c.options.target = uptrain::Target::residual;
      else usage_error("--target must be output or residual, not '" + v + "'");
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
  if (c.positional.size() != 3) usage_error("expected ORIGINAL_DIR, CONVERTED_DIR and OUTPUT_DIR");
  if (c.calibration.empty()) usage_error("--calibration IDS_FILE is required");
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  Command c = parse_command_line(argc, argv);
  if (c.options.threads > 0) omp_set_num_threads(c.options.threads);  // for the work outside the window loops too
  if (!c.quiet)
    c.options.on_layer = [](const uptrain::LayerReport& r) {
      std::printf("layer %td/%td: loss %.6g -> %.6g (relative %.4g -> %.4g)%s, %.1f s\n", r.layer + 1, r.layers,
                  r.loss_before, r.loss_after, r.loss_before / r.target_power, r.loss_after / r.target_power,
                  r.exact ? " exact already, not trained" : r.kept ? " no improvement, converted weights kept" : "",
                  r.seconds);
      std::fflush(stdout);
    };
  tool_cli::cancel_on_signals();
  c.options.cancel = &tool_cli::received_signal;
  const auto wall0 = std::chrono::steady_clock::now();
  const std::clock_t cpu0 = std::clock();
  try {
    const auto reports = uptrain::uptrain_checkpoint(c.positional[0], c.positional[1], c.positional[2],
                                                     c.calibration, c.options);
    if (!c.quiet) {
      double before = 0, after = 0;
      for (const auto& r : reports) {
        before += r.loss_before / r.target_power;
        after += r.loss_after / r.target_power;
      }
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
      std::printf("done: %s -> %s, %zu layers, mean relative loss %.4g -> %.4g; wall %.1f s, CPU %.1f s\n",
                  c.positional[1].c_str(), c.positional[2].c_str(), reports.size(), before / double(reports.size()),
                  after / double(reports.size()), wall, double(std::clock() - cpu0) / CLOCKS_PER_SEC);
    }
    return 0;
  } catch (const std::exception& e) {
    tool_cli::die_if_cancelled("gqa-uptrain");
    std::cerr << "gqa-uptrain: error: " << tool_cli::printable(e.what()) << "\n";
    return 1;
  }
}
