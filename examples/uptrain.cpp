// gqa-uptrain — recover a converted (pooled) Llama-family checkpoint by layer-wise distillation of its attention
// projections against the original model (examples/uptrain/uptrain.hpp has the method, distill.hpp the math).
//
//   gqa-uptrain ORIGINAL_DIR CONVERTED_DIR OUTPUT_DIR --calibration IDS_FILE [--steps N] [--batch B] [--window S]
//               [--lr LR] [--seed N] [--train kv|qkvo] [--inputs converted|original] [--target output|residual]
//               [--threads N] [--resume] [--progress SECONDS] [--force] [--quiet]
//
// CONVERTED_DIR is gqa-convert's output of ORIGINAL_DIR (e.g. --groups 1); OUTPUT_DIR gets a checkpoint in the same
// format with every layer's k_proj / v_proj (and with --train qkvo, the default, q_proj / o_proj) trained. Prints a
// progress line with the ETA every --progress seconds, one line per layer (loss before and after, relative to the
// target's mean square, and the time) and a summary table. Each finished layer is saved beside OUTPUT_DIR
// (uptrain/progress.hpp), so a stopped run continues with --resume and ends with bitwise the same output.
// Exit status: 0 done, 1 failed (no OUTPUT_DIR written), 2 bad command line. On SIGINT or SIGTERM it stops, removes
// its temporary output, keeps the finished layers and dies of the signal.
#include "uptrain/uptrain.hpp"
#include "cli/tool_cli.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
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
    "                   [--target output|residual] [--threads N] [--resume] [--progress SECONDS] [--force]\n"
    "                   [--quiet]\n"
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
    "  --resume          continue a stopped run: each finished layer is saved in .OUTPUT_DIR.gqa-progress beside\n"
    "                    OUTPUT_DIR; the inputs and the options above (but --threads) must be the ones it was\n"
    "                    started with (what differs is named). With nothing saved it starts at layer 1\n"
    "  --progress S      a progress line (step, loss, elapsed, ETA of the layer and of the run) at most every S\n"
    "                    seconds (default 10; 0: none)\n"
    "  --force           discard saved progress (without --resume); replace OUTPUT_DIR if it is empty or an output of gqa-uptrain or gqa-convert (which hold\n"
    "                    a .gqa-output marker file); never a checkpoint they did not write\n"
    "  --quiet           print only errors\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "gqa-uptrain: " << tool_cli::printable(message) << "\n\n" << usage;
  std::exit(2);
}

/// A finite decimal number that is the whole of `s`, or nothing.
std::optional<double> parse_number(const std::string& s) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (used != s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

struct Command {
  std::vector<std::string> positional;
  std::string calibration;
  uptrain::Options options;
  bool quiet = false;
  double progress_seconds = 10;
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
      const auto lr = parse_number(text);
      if (!lr || !(*lr > 0)) usage_error("--lr needs a positive number, not '" + text + "'");
      c.options.lr = *lr;
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
    } else if (arg == "--resume") {
      c.options.resume = true;
    } else if (arg == "--progress") {
      const std::string text = value();
      const auto v = parse_number(text);
      if (!v || !(*v >= 0)) usage_error("--progress needs a number >= 0, not '" + text + "'");
      c.progress_seconds = *v;
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

/// Progress lines: the ETA of a layer from its steps so far, of the run from the layers trained in this process
/// (or, before the first one ends, from this layer's estimate).
class ProgressPrinter {
 public:
  explicit ProgressPrinter(double every) : every_(every) {}

  void step(const uptrain::StepReport& s) {
    const auto now = std::chrono::steady_clock::now();
    if (every_ <= 0 || std::chrono::duration<double>(now - last_).count() < every_) return;
    last_ = now;
    const double per_step = s.seconds / double(s.step + 1);
    const double layer_eta = per_step * double(s.steps - s.step - 1);
    const double layer_total = s.seconds + layer_eta;
    const double per_layer = trained_ ? trained_seconds_ / double(trained_) : layer_total;
    const double run_eta = layer_eta + per_layer * double(s.layers - s.layer - 1);
    std::printf("layer %td/%td step %td/%td: batch loss %.6g (relative %.4g), %.0f s, ETA layer %.0f s, run %.0f s\n",
                s.layer + 1, s.layers, s.step + 1, s.steps, s.batch_loss, s.batch_loss / s.target_power, s.seconds,
                layer_eta, run_eta);
    std::fflush(stdout);
  }

  void layer(const uptrain::LayerReport& r) {
    if (!r.resumed && !r.exact) {
      ++trained_;
      trained_seconds_ += r.seconds;
    }
    std::printf("layer %td/%td: loss %.6g -> %.6g (relative %.4g -> %.4g)%s%s, %.1f s\n", r.layer + 1, r.layers,
                r.loss_before, r.loss_after, r.loss_before / r.target_power, r.loss_after / r.target_power,
                *note(r) ? " " : "", note(r), r.seconds);
    std::fflush(stdout);
  }

  static const char* note(const uptrain::LayerReport& r) {
    return r.resumed ? "resumed" : r.exact ? "exact already, not trained" : r.kept ? "no improvement, converted weights kept" : "";
  }

 private:
  double every_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  gqa::Index trained_ = 0;
  double trained_seconds_ = 0;
};

/// The summary table: one row per layer, then the means and the total time.
void print_summary(const std::vector<uptrain::LayerReport>& reports) {
  std::printf("\n%5s  %12s  %12s  %10s  %10s  %9s  %s\n", "layer", "loss before", "loss after", "rel before",
              "rel after", "seconds", "note");
  double before = 0, after = 0, seconds = 0;
  for (const auto& r : reports) {
    std::printf("%5td  %12.6g  %12.6g  %10.4g  %10.4g  %9.1f  %s\n", r.layer + 1, r.loss_before, r.loss_after,
                r.loss_before / r.target_power, r.loss_after / r.target_power, r.seconds,
                ProgressPrinter::note(r));
    before += r.loss_before / r.target_power;
    after += r.loss_after / r.target_power;
    seconds += r.seconds;
  }
  const double n = double(std::max<std::size_t>(reports.size(), 1));
  std::printf("%5s  %12s  %12s  %10.4g  %10.4g  %9.1f  (layer seconds, resumed ones from the earlier run)\n",
              "mean", "", "", before / n, after / n, seconds);
}

}  // namespace

int main(int argc, char** argv) {
  Command c = parse_command_line(argc, argv);
  if (c.options.threads > 0) omp_set_num_threads(c.options.threads);  // for the work outside the window loops too
  ProgressPrinter printer(c.progress_seconds);
  if (!c.quiet) {
    c.options.on_layer = [&](const uptrain::LayerReport& r) { printer.layer(r); };
    c.options.on_step = [&](const uptrain::StepReport& s) { printer.step(s); };
    c.options.on_message = [](const std::string& m) {
      std::printf("%s\n", tool_cli::printable(m).c_str());
      std::fflush(stdout);
    };
  }
  tool_cli::cancel_on_signals();
  c.options.cancel = &tool_cli::received_signal;
  const auto wall0 = std::chrono::steady_clock::now();
  const std::clock_t cpu0 = std::clock();
  try {
    const auto reports = uptrain::uptrain_checkpoint(c.positional[0], c.positional[1], c.positional[2],
                                                     c.calibration, c.options);
    if (!c.quiet) {
      print_summary(reports);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
      std::printf("done: %s -> %s, %zu layers; this run: wall %.1f s, CPU %.1f s\n", c.positional[1].c_str(),
                  c.positional[2].c_str(), reports.size(), wall, double(std::clock() - cpu0) / CLOCKS_PER_SEC);
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "gqa-uptrain: error: " << tool_cli::printable(e.what()) << "\n";
    if (const int sig = tool_cli::received_signal.load()) {  // die of the signal, as tool_cli::die_if_cancelled
      std::signal(sig, SIG_DFL);
      std::raise(sig);
    }
    return 1;
  }
}
