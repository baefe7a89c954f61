// Tests of gqa-uptrain (examples/uptrain/distill.hpp, examples/uptrain/uptrain.hpp) on tiny random Llama
// checkpoints (tests/support/llama_fixture.hpp: 2 layers, H = 8, G = 2, D = 16):
//   * the gradient of every trained tensor (W_k, W_v and their biases; with --train qkvo also W_q, b_q and W_o;
//     through o_proj, attention_backward and the RoPE transpose) against central finite differences of the layer
//     loss, in double (tolerance 1e-6 of the largest gradient); the RoPE transpose against the adjoint identity
//     <rope(a), b> = <a, rope^T(b)>;
//   * pooling G = 2 -> 1 then uptraining (each --train, --inputs and --target) lowers every layer's loss (by at
//     least 30%), and the uptrained model's logits are closer to the original's than the pooled model's; the output
//     loads in the decoder; --train kv leaves q_proj/o_proj as converted, qkvo replaces them;
//   * an exact expansion (G = 2 -> 8) is detected as exact: no layer trained, weights written back bit for bit;
//   * the output is bitwise identical for 1, 2 and 3 threads (both --train sets);
//   * refusals (typed, naming the argument), with nothing left in the output's parent directory;
//   * resume (examples/uptrain/progress.hpp): a run stopped after its first layer, then resumed, writes bitwise the
//     uninterrupted run's output; --resume refuses progress made with another option or calibration file, naming
//     it; a fresh run refuses to overwrite progress without --force; --resume with nothing saved starts at layer 1;
//     the real gqa-uptrain killed (SIGKILL, SIGTERM) at seeded random moments, then --resume, writes the
//     uninterrupted run's bytes, and no OUTPUT_DIR exists before the resume.
// When tests/cmake/uptrain.cmake passes GQA_UPTRAIN_EXE, the gqa-uptrain command line is run end to end too.
#include "../examples/uptrain/uptrain.hpp"

#include "gqa/checkpoint.hpp"
#include "support/llama_fixture.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using gqa::Index;
using gqa_test::LlamaFixture;
using gqa_test::TempDir;
using uptrain::Mat;

template <typename T>
void fill(Mat<T>& m, Index rows, Index cols, gqa_test::Rng& rng, double stddev) {
  m.resize(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(rng.normal(0, stddev));
}

struct GradCase {
  const char* name;
  Index S, hidden, H, G, D, windows, sliding;
  bool bias;
  bool qo;  ///< W_q, b_q and W_o trained too (--train qkvo)
};

/// A random double-precision layer problem with its rotary tables.
struct RandomProblem {
  uptrain::Rope<double> rope;
  uptrain::LayerProblem<double> prob;
  uptrain::LayerWeights<double> p;

  explicit RandomProblem(const GradCase& c, std::uint64_t seed = 7) {
    gqa_test::Rng rng(seed);
    std::vector<double> inv_freq(size_t(c.D / 2));
    for (Index i = 0; i < c.D / 2; ++i) inv_freq[size_t(i)] = std::pow(10000.0, -double(2 * i) / double(c.D));
    rope = uptrain::Rope<double>(inv_freq, c.S);
    prob.window = c.S;
    prob.heads = c.H;
    prob.kv_heads = c.G;
    prob.head_dim = c.D;
    prob.sliding_window = c.sliding;
    prob.rope = &rope;
    fill(prob.x, c.windows * c.S, c.hidden, rng, 1.0);
    fill(prob.y, c.windows * c.S, c.hidden, rng, 0.3);
    // Queries of unit scale either way: fixed (--train kv), or from W_q of fan-in scale (qkvo).
    fill(c.qo ? p.wo : prob.wo, c.hidden, c.H * c.D, rng, 1.0 / std::sqrt(double(c.H * c.D)));
    if (c.qo)
      fill(p.wq, c.H * c.D, c.hidden, rng, 1.0 / std::sqrt(double(c.hidden)));
    else
      fill(prob.q, c.windows * c.S, c.H * c.D, rng, 1.0);
    fill(p.wk, c.G * c.D, c.hidden, rng, 1.0 / std::sqrt(double(c.hidden)));
    fill(p.wv, c.G * c.D, c.hidden, rng, 1.0 / std::sqrt(double(c.hidden)));
    if (c.bias) {
      Mat<double> b;
      fill(b, 3, c.H * c.D, rng, 0.1);
      p.bk = b.row(0).head(c.G * c.D);
      p.bv = b.row(1).head(c.G * c.D);
      if (c.qo) p.bq = b.row(2);
    }
  }
};

TEST_CASE("the RoPE transpose is the adjoint of the rotation", "[uptrain]") {
  gqa_test::Rng rng(3);
  const std::vector<double> inv_freq = {1.0, 0.3, 0.05};
  const uptrain::Rope<double> rope(inv_freq, 9);
  Mat<double> a, b;
  fill(a, 9, 12, rng, 1.0);  // 2 heads of D = 6
  fill(b, 9, 12, rng, 1.0);
  Mat<double> ra = a, rtb = b;
  rope.apply(ra, 2);
  rope.apply(rtb, 2, true);
  CHECK(std::abs((ra.array() * b.array()).sum() - (a.array() * rtb.array()).sum()) < 1e-12);
  rope.apply(ra, 2, true);  // the transpose undoes the rotation
  CHECK((ra - a).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("the gradient of every trained tensor matches central finite differences", "[uptrain]") {
  const GradCase cases[] = {
      {"kv/H:4/G:2/D:8/bias", 11, 24, 4, 2, 8, 2, 0, true, false},
      {"kv/H:4/G:1/D:8 (MQA)", 9, 20, 4, 1, 8, 3, 0, false, false},
      {"kv/H:2/G:2/D:6/window:4", 10, 16, 2, 2, 6, 1, 4, true, false},
      {"qkvo/H:4/G:2/D:8/bias", 11, 24, 4, 2, 8, 2, 0, true, true},
      {"qkvo/H:4/G:1/D:8 (MQA)", 9, 20, 4, 1, 8, 3, 0, false, true},
      {"qkvo/H:2/G:2/D:6/window:4/bias", 10, 16, 2, 2, 6, 1, 4, true, true},
  };
  for (const GradCase& c : cases) {
    SECTION(c.name) {
      RandomProblem r(c);
      std::vector<Index> windows;
      for (Index w = 0; w < c.windows; ++w) windows.push_back(w);
      uptrain::LayerWeights<double> g;
      uptrain::batch_loss(r.prob, r.p, windows, &g, 2);
      // Every trained tensor has a gradient of its own shape, and no other tensor has one.
      const auto same_shape = [](const auto& a, const auto& b) { return a.rows() == b.rows() && a.cols() == b.cols(); };
      CHECK(same_shape(g.wq, r.p.wq));
      CHECK(same_shape(g.wk, r.p.wk));
      CHECK(same_shape(g.wv, r.p.wv));
      CHECK(same_shape(g.wo, r.p.wo));
      CHECK(same_shape(g.bq, r.p.bq));
      CHECK(same_shape(g.bk, r.p.bk));
      CHECK(same_shape(g.bv, r.p.bv));
      CHECK(r.p.trains_qo() == c.qo);
      const double h = 1e-5;
      const auto check_tensor = [&](const char* name, auto& param, const auto& analytic) {
        if (param.size() == 0) return;
        const double gmax = analytic.cwiseAbs().maxCoeff();
        double worst = 0;
        for (Index i = 0; i < param.size(); ++i) {
          double& x = param.data()[i];
          const double saved = x;
          x = saved + h;
          const double up = uptrain::batch_loss(r.prob, r.p, windows, nullptr, 1);
          x = saved - h;
          const double down = uptrain::batch_loss(r.prob, r.p, windows, nullptr, 1);
          x = saved;
          worst = std::max(worst, std::abs((up - down) / (2 * h) - analytic.data()[i]));
        }
        INFO(name << ": largest |finite difference - analytic| " << worst << ", largest gradient " << gmax);
        CHECK(gmax > 1e-4);  // a gradient that is not all zero, so the comparison means something
        CHECK(worst <= 1e-6 * gmax);
      };
      check_tensor("W_q", r.p.wq, g.wq);
      check_tensor("W_k", r.p.wk, g.wk);
      check_tensor("W_v", r.p.wv, g.wv);
      check_tensor("W_o", r.p.wo, g.wo);
      check_tensor("b_q", r.p.bq, g.bq);
      check_tensor("b_k", r.p.bk, g.bk);
      check_tensor("b_v", r.p.bv, g.bv);
    }
  }
}

/// Tiny original (G = 2) and a pooled or expanded conversion of it, plus calibration ids.
struct Checkpoints {
  TempDir dir;
  LlamaFixture f;
  fs::path original, converted, output, ids;

  explicit Checkpoints(Index kv_heads, bool biases = false, gqa::PoolMethod method = gqa::PoolMethod::mean,
                       Index n_ids = 64) {
    f.biases = biases;
    original = dir / "original";
    converted = dir / "converted";
    output = dir / "output";
    ids = dir / "calibration.ids";
    f.write(original);
    gqa::CheckpointOptions opt;
    opt.kv_heads = kv_heads;
    opt.convert.method = method;
    gqa::convert_checkpoint(original, converted, opt);
    gqa_test::Rng rng(11);
    std::ofstream out(ids);
    for (Index i = 0; i < n_ids; ++i) out << rng.integer(0, f.vocab - 2) << (i % 16 == 15 ? "\n" : " ");
  }

  uptrain::Options options(int threads = 2) const {
    uptrain::Options o;
    o.window = 16;
    o.batch = 2;
    o.steps = 60;
    o.lr = 1e-2;
    o.threads = threads;
    return o;
  }

  std::vector<uptrain::LayerReport> run(const uptrain::Options& o, const fs::path& out) const {
    return uptrain::uptrain_checkpoint(original, converted, out, ids, o);
  }
};

/// Logits of every position of `ids` through a model directory.
llama::Matrix logits_of(const fs::path& dir, const std::vector<std::int32_t>& ids) {
  const llama::Model m = llama::Model::load(dir);
  llama::State<float> state(m.config(), Index(ids.size()));
  llama::Matrix logits;
  m.forward(gqa::span<const std::int32_t>(ids.data(), Index(ids.size())), state, &logits, true);
  return logits;
}

/// True when layer l's tensor `name` (e.g. "q_proj") has the same weights in both model directories.
bool same_weights(const fs::path& a, const fs::path& b, Index l, const char* name) {
  const llama::Model ma = llama::Model::load(a, {}, llama::WeightType::f32),
                     mb = llama::Model::load(b, {}, llama::WeightType::f32);
  const auto pick = [name](const llama::Layer& L) -> const llama::Linear& {
    return std::string(name) == "q_proj" ? L.q : std::string(name) == "k_proj" ? L.k : L.o;
  };
  return pick(ma.layer(l)).w() == pick(mb.layer(l)).w();
}

TEST_CASE("pooling to G = 1 then uptraining lowers the loss of every layer", "[uptrain]") {
  struct Setting {
    const char* name;
    uptrain::Train train;
    uptrain::Inputs inputs;
    uptrain::Target target;
  };
  using uptrain::Inputs;
  using uptrain::Target;
  using uptrain::Train;
  const Setting settings[] = {
      {"kv, converted inputs", Train::kv, Inputs::converted, Target::output},
      {"kv, original inputs", Train::kv, Inputs::original, Target::output},
      {"qkvo, converted inputs", Train::qkvo, Inputs::converted, Target::output},
      {"qkvo, original inputs", Train::qkvo, Inputs::original, Target::output},
      {"qkvo, converted inputs, residual target", Train::qkvo, Inputs::converted, Target::residual},
  };
  for (const bool bias : {false, true}) {
    for (const Setting& setting : settings) {
      DYNAMIC_SECTION((bias ? "q/k/v biases (Qwen2), " : "no biases, ") << setting.name) {
        Checkpoints c(1, bias);
        uptrain::Options o = c.options();
        o.train = setting.train;
        o.inputs = setting.inputs;
        o.target = setting.target;
        const auto reports = c.run(o, c.output);
        REQUIRE(reports.size() == 2);
        for (const auto& r : reports) {
          INFO("layer " << r.layer << ": " << r.loss_before << " -> " << r.loss_after);
          CHECK(!r.exact);
          CHECK(!r.kept);
          CHECK(r.loss_after < 0.7 * r.loss_before);
        }
        // The output is a G = 1 checkpoint the decoder loads, with the tokenizer copied, and its logits are closer
        // to the original's than the pooled model's are.
        const llama::Model m = llama::Model::load(c.output);
        CHECK(m.config().kv_heads == 1);
        CHECK(fs::exists(c.output / "tokenizer.json"));
        std::vector<std::int32_t> ids = llama::read_ids(c.ids, c.f.vocab);
        ids.resize(32);
        const llama::Matrix base = logits_of(c.original, ids);
        const double pooled = (logits_of(c.converted, ids) - base).squaredNorm();
        const double uptrained = (logits_of(c.output, ids) - base).squaredNorm();
        INFO("squared logit error: pooled " << pooled << ", uptrained " << uptrained);
        CHECK(uptrained < 0.9 * pooled);  // measured: 0.73 to 0.87 of the pooled error with --train kv
        // K/V are always trained; Q and O only with qkvo.
        for (Index l = 0; l < 2; ++l) {
          CHECK(!same_weights(c.output, c.converted, l, "k_proj"));
          CHECK(same_weights(c.output, c.converted, l, "q_proj") == (setting.train == Train::kv));
          CHECK(same_weights(c.output, c.converted, l, "o_proj") == (setting.train == Train::kv));
        }
      }
    }
  }
}

TEST_CASE("an exact expansion (G = H) is left exact", "[uptrain]") {
  for (const bool bias : {false, true}) {
    SECTION(bias ? "biases" : "no biases") {
      Checkpoints c(8, bias);
      const auto reports = c.run(c.options(), c.output);
      for (const auto& r : reports) {
        INFO("layer " << r.layer << ": relative loss " << r.loss_before / r.target_power);
        CHECK(r.exact);
        CHECK(r.loss_before <= 1e-10 * r.target_power);
      }
      // Untrained weights go back as they were read: the safetensors file is the converted one, byte for byte.
      CHECK(gqa_test::read_bytes(c.output / "model.safetensors") == gqa_test::read_bytes(c.converted / "model.safetensors"));
      CHECK(gqa_test::read_text(c.output / "config.json") == gqa_test::read_text(c.converted / "config.json"));
    }
  }
}

TEST_CASE("the output is bitwise identical for every thread count", "[uptrain]") {
  Checkpoints c(1, true);
  uptrain::Options o = c.options(1);
  o.steps = 20;
  o.train = GENERATE(uptrain::Train::kv, uptrain::Train::qkvo);
  o.target = GENERATE(uptrain::Target::output, uptrain::Target::residual);
  c.run(o, c.dir / "t1");
  const auto reference = gqa_test::read_bytes(c.dir / "t1" / "model.safetensors");
  for (const int threads : {2, 3}) {
    o.threads = threads;
    const fs::path out = c.dir / ("t" + std::to_string(threads));
    c.run(o, out);
    INFO(threads << " threads");
    CHECK(gqa_test::read_bytes(out / "model.safetensors") == reference);
  }
  // A different seed draws other mini-batches: a different result (so the comparison above can fail).
  o.seed = 1;
  c.run(o, c.dir / "seed1");
  CHECK(gqa_test::read_bytes(c.dir / "seed1" / "model.safetensors") != reference);
}

/// The entries of a directory (to check that a failed run left nothing behind).
std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

template <typename E>
void require_refused(const Checkpoints& c, const uptrain::Options& o, const fs::path& ids_file, const char* text,
                     const fs::path& converted = {}) {
  const auto before = entries(c.dir.path());
  try {
    uptrain::uptrain_checkpoint(c.original, converted.empty() ? c.converted : converted, c.output, ids_file, o);
    FAIL("not refused: " << text);
  } catch (const E& e) {
    CHECK_THAT(e.what(), Contains(text));
  }
  CHECK(entries(c.dir.path()) == before);  // no output, no staging directory
}

TEST_CASE("bad input is refused with a typed error naming it, and nothing is written", "[uptrain]") {
  Checkpoints c(1);
  const uptrain::Options o = c.options();
  SECTION("calibration ids outside the vocabulary") {
    gqa_test::write_text(c.dir / "bad.ids", "1 2 3 300 4\n");
    require_refused<gqa::invalid_argument>(c, o, c.dir / "bad.ids", "token id 300");
  }
  SECTION("too few calibration ids for one window") {
    gqa_test::write_text(c.dir / "short.ids", "1 2 3 4 5\n");
    require_refused<gqa::invalid_argument>(c, o, c.dir / "short.ids", "[gqa.uptrain.calibration]");
  }
  SECTION("options out of range") {
    uptrain::Options bad = o;
    bad.steps = 0;
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--steps 0");
    bad = o;
    bad.window = 65;
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--window 65");
    bad = o;
    bad.lr = -1;
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--lr -1");
    bad = o;
    bad.target = uptrain::Target::residual;
    bad.inputs = uptrain::Inputs::original;
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--target residual needs --inputs converted");
  }
  SECTION("architectures that differ") {
    LlamaFixture other;
    other.intermediate = 96;
    other.kv_heads = 1;
    other.write(c.dir / "other");
    require_refused<gqa::invalid_argument>(c, o, c.ids, "intermediate_size: 80 vs 96", c.dir / "other");
  }
  SECTION("converted num_key_value_heads that does not divide H") {
    LlamaFixture other;
    other.kv_heads = 3;
    other.write(c.dir / "g3");
    require_refused<gqa::format_error>(c, o, c.ids, "num_key_value_heads 3", c.dir / "g3");
  }
  SECTION("the output is an input, or exists without --force") {
    try {
      uptrain::uptrain_checkpoint(c.original, c.converted, c.converted, c.ids, o);
      FAIL("output == converted accepted");
    } catch (const gqa::invalid_argument& e) {
      CHECK_THAT(e.what(), Contains("[gqa.checkpoint.output_exists]"));
    }
    try {
      uptrain::uptrain_checkpoint(c.original, c.converted, c.original, c.ids, o);
      FAIL("output == original accepted");
    } catch (const gqa::invalid_argument& e) {
      CHECK_THAT(e.what(), Contains("[gqa.checkpoint.output_exists]"));
    }
    fs::create_directories(c.output);
    gqa_test::write_text(c.output / "notes.txt", "mine\n");
    uptrain::Options forced = o;
    forced.force = true;
    require_refused<gqa::invalid_argument>(c, forced, c.ids, "neither empty nor a converted checkpoint");
    CHECK(gqa_test::read_text(c.output / "notes.txt") == "mine\n");
  }
}

/// Runs `o` on `out` and stops it (as a signal would, through Options::cancel) once its first layer is finished;
/// returns the message of the interruption.
std::string stop_after_first_layer(const Checkpoints& c, uptrain::Options o, const fs::path& out) {
  std::atomic<int> stop{0};
  o.cancel = &stop;
  o.on_layer = [&](const uptrain::LayerReport&) { stop = SIGTERM; };
  try {
    c.run(o, out);
  } catch (const gqa::io_error& e) {
    return e.what();
  }
  FAIL("the run was not stopped");
  return {};
}

fs::path progress_dir(const fs::path& out) { return uptrain::progress::directory_of(out); }

TEST_CASE("a run stopped after a layer, then resumed, writes bitwise the uninterrupted run's output",
          "[uptrain][resume]") {
  Checkpoints c(1, true);
  uptrain::Options o = c.options();
  o.steps = 20;
  // Residual targets and converted inputs read both streams at each layer's input: the resume must rebuild them.
  o.target = GENERATE(uptrain::Target::output, uptrain::Target::residual);
  o.train = GENERATE(uptrain::Train::kv, uptrain::Train::qkvo);
  const auto reference = c.run(o, c.dir / "reference");
  const auto expected = gqa_test::read_bytes(c.dir / "reference" / "model.safetensors");
  CHECK(!fs::exists(progress_dir(c.dir / "reference")));  // removed once the output is committed

  const std::string stopped = stop_after_first_layer(c, o, c.output);
  CHECK_THAT(stopped, Contains("[gqa.checkpoint.interrupted]") && Contains("the 1 finished layer(s) are kept in") &&
                          Contains("--resume continues"));
  CHECK(!fs::exists(c.output));
  CHECK(fs::exists(progress_dir(c.output) / "layer-0.safetensors"));
  CHECK(!fs::exists(progress_dir(c.output) / "layer-1.safetensors"));

  uptrain::Options resumed = o;
  resumed.resume = true;
  resumed.threads = 3;  // the result does not depend on it, so neither does the resume
  std::vector<std::string> notes;
  resumed.on_message = [&](const std::string& m) { notes.push_back(m); };
  const auto reports = c.run(resumed, c.output);
  REQUIRE(reports.size() == 2);
  CHECK(reports[0].resumed);
  CHECK(!reports[1].resumed);
  CHECK(reports[0].loss_after == reference[0].loss_after);  // the saved report, exactly
  CHECK(reports[1].loss_after == reference[1].loss_after);
  REQUIRE(!notes.empty());
  CHECK_THAT(notes[0], Contains("1 finished layer(s)"));
  CHECK(gqa_test::read_bytes(c.output / "model.safetensors") == expected);
  CHECK(gqa::detail::is_marked_output(c.output));
  CHECK(!fs::exists(progress_dir(c.output)));
}

TEST_CASE("resuming refuses progress made with other inputs or options, naming what differs", "[uptrain][resume]") {
  Checkpoints c(1);
  uptrain::Options o = c.options();
  o.steps = 10;
  stop_after_first_layer(c, o, c.output);
  const auto listing = entries(progress_dir(c.output));
  uptrain::Options bad = o;
  bad.resume = true;
  SECTION("another option") {
    bad.lr = 0.02;
    bad.seed = 5;
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--lr: '0.01' then, '0.02' now");
    require_refused<gqa::invalid_argument>(c, bad, c.ids, "--seed: '0' then, '5' now");
  }
  SECTION("another calibration file") {
    gqa_test::write_text(c.dir / "other.ids", gqa_test::read_text(c.ids) + " 7\n");
    require_refused<gqa::invalid_argument>(c, bad, c.dir / "other.ids", "calibration ids: '64 ids");
    require_refused<gqa::invalid_argument>(c, bad, c.dir / "other.ids", "--calibration: '");
  }
  SECTION("without --resume, unless --force") {
    uptrain::Options fresh = o;
    require_refused<gqa::invalid_argument>(c, fresh, c.ids, "pass --resume to continue it, or --force to discard it");
    fresh.force = true;  // discards the progress and starts over
    const auto reports = c.run(fresh, c.output);
    CHECK(!reports[0].resumed);
    CHECK(!fs::exists(progress_dir(c.output)));
    return;
  }
  CHECK(entries(progress_dir(c.output)) == listing);  // the refusals left the progress as it was
  CHECK(!fs::exists(c.output));
}

TEST_CASE("resuming with nothing saved starts at layer 1 and says so", "[uptrain][resume]") {
  Checkpoints c(1);
  uptrain::Options o = c.options();
  o.steps = 10;
  c.run(o, c.dir / "reference");
  o.resume = true;
  std::vector<std::string> notes;
  o.on_message = [&](const std::string& m) { notes.push_back(m); };
  const auto reports = c.run(o, c.output);
  CHECK(!reports[0].resumed);
  REQUIRE(!notes.empty());
  CHECK_THAT(notes[0], Contains("nothing to resume in") && Contains("starting at layer 1"));
  CHECK(gqa_test::read_bytes(c.output / "model.safetensors") ==
        gqa_test::read_bytes(c.dir / "reference" / "model.safetensors"));
}

#ifdef GQA_UPTRAIN_EXE
int run_command(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_CASE("gqa-uptrain command line", "[uptrain][cli]") {
  Checkpoints c(1);
  const std::string exe = GQA_UPTRAIN_EXE;
  const std::string log = (c.dir / "log.txt").string();
  const std::string args = " " + c.original.string() + " " + c.converted.string() + " " + c.output.string() +
                           " --calibration " + c.ids.string() + " --window 16 --batch 2 --steps 10 --lr 0.01";
  REQUIRE(run_command(exe + args + " > " + log + " 2>&1") == 0);
  const std::string out = gqa_test::read_text(log);
  CHECK_THAT(out, Contains("layer 1/2: loss"));
  CHECK_THAT(out, Contains("done:"));
  CHECK(llama::Model::load(c.output).config().kv_heads == 1);
  CHECK(run_command(exe + args + " > " + log + " 2>&1") == 1);  // exists, no --force
  CHECK_THAT(gqa_test::read_text(log), Contains("[gqa.checkpoint.output_exists]") &&
                                           Contains("use gqa-uptrain --force (uptrain::Options::force)"));
  CHECK(run_command(exe + args + " --force --quiet > " + log + " 2>&1") == 0);
  CHECK(gqa_test::read_text(log).empty());
  CHECK(run_command(exe + args + " --steps 0 > " + log + " 2>&1") == 2);
  CHECK(run_command(exe + args + " --inputs sideways > " + log + " 2>&1") == 2);
  CHECK(run_command(exe + args + " --train qk > " + log + " 2>&1") == 2);
  CHECK_THAT(gqa_test::read_text(log), Contains("--train must be kv or qkvo, not 'qk'"));
  CHECK(run_command(exe + args + " --target drift > " + log + " 2>&1") == 2);
  CHECK_THAT(gqa_test::read_text(log), Contains("--target must be output or residual, not 'drift'"));
  CHECK(run_command(exe + args + " --inputs original --target residual --force > " + log + " 2>&1") == 1);
  CHECK_THAT(gqa_test::read_text(log), Contains("[gqa.uptrain.options] --target residual needs --inputs converted"));
  // --train kv leaves q_proj as converted; the default (qkvo) trains it; --target residual is accepted.
  REQUIRE(run_command(exe + args + " --train kv --force --quiet > " + log + " 2>&1") == 0);
  CHECK(same_weights(c.output, c.converted, 0, "q_proj"));
  REQUIRE(run_command(exe + args + " --target residual --force --quiet > " + log + " 2>&1") == 0);
  CHECK(!same_weights(c.output, c.converted, 0, "q_proj"));
  CHECK(run_command(exe + " a b c > " + log + " 2>&1") == 2);  // no --calibration
  // --threads: 100000 crashed in libgomp, 2^31 was ignored, 2^32 + 1 ran with 1 thread.
  for (const char* n : {"100000", "1025", "2147483648", "4294967297", "-1"}) {
    INFO("--threads " << n);
    CHECK(run_command(exe + args + " --force --threads " + n + " > " + log + " 2>&1") == 2);
    CHECK_THAT(gqa_test::read_text(log), Contains(std::string("--threads ") + n + ": expected an integer in 0 .. 1024"));
  }
  // Bytes of an argument that are control characters or not UTF-8 are escaped in the message.
  CHECK(run_command(exe + args + " --train \"$(printf 'q\\001\\377')\" > " + log + " 2>&1") == 2);
  CHECK_THAT(gqa_test::read_text(log), Contains("--train must be kv or qkvo, not 'q\\x01\\xff'"));
}

TEST_CASE("gqa-uptrain --threads 1 runs on one thread: nothing inside a window forks a team", "[uptrain][cli]") {
  // A team of one did not count as a parallel region for Eigen, which forked omp_get_max_threads() threads inside
  // every product of every window, new threads each time: --threads 1 was 10-300x slower than --threads 2.
  // libgomp's OMP_DISPLAY_AFFINITY prints a line for every thread a team starts (level = nesting, size = team).
  Checkpoints c(1);
  const std::string log = (c.dir / "log.txt").string();
  const std::string run = "OMP_NUM_THREADS=3 OMP_DISPLAY_AFFINITY=TRUE OMP_AFFINITY_FORMAT='gqa-team level=%L size=%N' " +
                          std::string(GQA_UPTRAIN_EXE) + " " + c.original.string() + " " + c.converted.string() + " " +
                          c.output.string() + " --calibration " + c.ids.string() +
                          " --window 16 --batch 2 --steps 3 --force --quiet";
  const auto teams = [&](const std::string& threads) {
    REQUIRE(run_command(run + " --threads " + threads + " > " + log + " 2>&1") == 0);
    std::map<std::string, int> count;  // "level=L size=N" -> threads started
    std::istringstream in(gqa_test::read_text(log));
    for (std::string line; std::getline(in, line);)
      if (line.rfind("gqa-team ", 0) == 0) ++count[line.substr(9)];
    return count;
  };
  CHECK(teams("1").empty());  // no team of more than one thread, at any level
  // The probe sees teams: --threads 2 starts one team of two windows, and nothing nested in it.
  const auto two = teams("2");
  CHECK(two.count("level=1 size=2") == 1);
  CHECK(two.size() == 1);
}
/// Lines in a text file so far (0 if it does not exist yet).
std::size_t line_count(const fs::path& path) {
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return std::size_t(std::count(text.begin(), text.end(), '\n'));
}

/// Starts `command` (through sh -c "exec ...", so the pid is the tool's own) with its output in `log`, sends `sig`
/// once `log` holds `lines` lines, and returns the wait status.
int run_and_signal(const std::string& command, const fs::path& log, std::size_t lines, int sig) {
  const std::string line = "exec " + command + " > " + log.string() + " 2>&1";
  fs::remove(log);  // the signal waits for the tool's own lines: it never reaches the child before its exec
  const pid_t pid = ::fork();
  if (pid == 0) {  // only async-signal-safe calls until the exec (the parent has other threads)
    ::execl("/bin/sh", "sh", "-c", line.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  REQUIRE(pid > 0);
  int status = 0;
  for (auto t0 = std::chrono::steady_clock::now(); std::chrono::steady_clock::now() - t0 < std::chrono::minutes(2);) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;  // ended before the signal
    if (line_count(log) >= lines) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(pid, sig);
  ::waitpid(pid, &status, 0);
  return status;
}

TEST_CASE("gqa-uptrain killed at a random moment, then --resume, writes bitwise the uninterrupted run's output",
          "[uptrain][cli][resume]") {
  Checkpoints c(1, true);
  const std::string exe = GQA_UPTRAIN_EXE;
  const fs::path log = c.dir / "log.txt";
  // A progress line every step: the moment of each signal is drawn as a line of the run's output (a step of either
  // layer, or the last layer's report, after which the checkpoint is written), so that it lands inside the run.
  const auto command = [&](const fs::path& out) {
    return exe + " " + c.original.string() + " " + c.converted.string() + " " + out.string() + " --calibration " +
           c.ids.string() + " --window 16 --batch 2 --steps 100 --lr 0.01 --target residual --threads 2" +
           " --progress 0.000001";
  };
  REQUIRE(run_command(command(c.dir / "reference") + " > " + log.string() + " 2>&1") == 0);
  const auto expected = gqa_test::read_bytes(c.dir / "reference" / "model.safetensors");
  const std::string reference_log = gqa_test::read_text(log);
  const auto last = reference_log.find("layer 2/2: loss");
  REQUIRE(last != std::string::npos);
  const std::size_t lines = std::size_t(std::count(reference_log.begin(), reference_log.begin() + Index(last), '\n')) + 1;
  gqa_test::Rng rng(2026);
  for (const int sig : {SIGKILL, SIGKILL, SIGKILL, SIGKILL, SIGTERM}) {
    // 1 .. lines - 1: after the last layer's report the tiny checkpoint is written in a few milliseconds, a race the
    // 1 ms poll could lose (that a killed write leaves no OUTPUT_DIR is test_output_directory's).
    const std::size_t at = 1 + std::size_t(rng.uniform01() * double(lines - 1));
    INFO("signal " << sig << " after line " << at << " of " << lines);
    const int status = run_and_signal(command(c.output), log, at, sig);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == sig);
    CHECK(!fs::exists(c.output));  // nothing that looks complete: no OUTPUT_DIR at all
    if (sig == SIGTERM) CHECK_THAT(gqa_test::read_text(log), Contains("was not written"));
    REQUIRE(run_command(command(c.output) + " --resume > " + log.string() + " 2>&1") == 0);
    CHECK_THAT(gqa_test::read_text(log), Contains("done:"));
    CHECK(gqa_test::read_bytes(c.output / "model.safetensors") == expected);
    CHECK(!fs::exists(progress_dir(c.output)));
    fs::remove_all(c.output);
  }
}

TEST_CASE("gqa-uptrain prints progress lines with an ETA and a summary table", "[uptrain][cli]") {
  Checkpoints c(1);
  const std::string log = (c.dir / "log.txt").string();
  const std::string run = std::string(GQA_UPTRAIN_EXE) + " " + c.original.string() + " " + c.converted.string() +
                          " " + c.output.string() + " --calibration " + c.ids.string() +
                          " --window 16 --batch 2 --steps 50 --lr 0.01 --force";
  REQUIRE(run_command(run + " --progress 0 > " + log + " 2>&1") == 0);
  std::string out = gqa_test::read_text(log);
  CHECK_THAT(out, Contains("layer 1/2: loss") && Contains("loss before") && Contains("rel after") &&
                      Contains("each finished layer is saved in") && Contains("mean"));
  CHECK_THAT(out, !Contains("ETA"));  // --progress 0: none
  REQUIRE(run_command(run + " --progress 0.000001 > " + log + " 2>&1") == 0);
  out = gqa_test::read_text(log);
  CHECK_THAT(out, Contains("layer 2/2 step 50/50: batch loss") && Contains("ETA layer 0 s, run 0 s"));
  CHECK_THAT(out, Contains("layer 1/2 step 1/50: batch loss"));
  CHECK(run_command(run + " --progress -1 > " + log + " 2>&1") == 2);
  CHECK_THAT(gqa_test::read_text(log), Contains("--progress needs a number >= 0, not '-1'"));
}
#endif

}  // namespace
