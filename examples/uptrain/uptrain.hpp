// examples/uptrain/uptrain.hpp — gqa-uptrain's driver: layer-wise distillation of a converted (pooled) Llama-family
// checkpoint against the original, written as a checkpoint in gqa-convert's format.
//
// Offers (namespace uptrain):
//   Options, Train, Inputs, Target  what to train and how (the command line's flags, examples/uptrain.cpp)
//   uptrain_checkpoint  the whole run: load, check, distill layer by layer (resuming saved layers), write; returns
//                       one LayerReport per layer
//   result_options      the options that change the result, as --resume compares them
//   check_compatible    the original and converted configs describe the same model but for num_key_value_heads
//
// The run, with N calibration windows of S tokens (each at positions 0 .. S-1, as example_decoder's perplexity):
//   h_orig [N*S, hidden]: the original model's residual stream, advanced one layer at a time.
//   For layer l: X = input_layernorm(h), target Y = the original layer's attention output after o_proj (without
//   o_proj's bias, which cancels). The converted layer's W_k, W_v (and biases), and with Train::qkvo also W_q (and
//   its bias) and W_o, are trained with Adam on mini-batches of windows to minimise mean((A W_o^T - Y)^2)
//   (uptrain/distill.hpp), with a cosine decay of the learning rate to 0 over the steps. Train::kv keeps the
//   queries Q = rope(X W_q^T + b_q) and W_o fixed. Inputs::original takes X from h_orig (every layer learns from
//   the original's inputs, independently); Inputs::converted takes it from the converted model's own stream
//   h_conv, advanced through the already-uptrained layers, so each layer sees the error of the earlier ones.
//   Target::residual then asks for Y + (h_orig - h_conv) at the layer's input: the attention output that makes the
//   converted stream after attention equal to the original's, so the layer also undoes the drift from below.
//   A layer whose loss before training is at float rounding level (relative 1e-10: an exact expansion) is left
//   as it is; a layer whose loss over all windows did not go down keeps its converted weights.
//
// Determinism: windows are threaded, each on one thread, and reduced in a fixed order (distill.hpp), so the output is
// bitwise identical for every --threads.
//
// Progress and resume (progress.hpp): after each layer its trained tensors and a manifest are saved atomically in
// ".<OUTPUT>.gqa-progress" beside the output; with Options::resume the run restores the saved layers, advances both
// streams through them with the same per-window passes, and trains from the first unsaved layer. Each layer's
// training is self-contained (a fresh Adam, an RNG seeded from the seed and the layer), so the result is bitwise that
// of an uninterrupted run. The progress is removed once the output is committed; on a cancel or a failure the
// finished layers stay (none finished: the directory is removed). Options::on_step reports every Adam step.
//
// Output: the converted checkpoint with every layer's trained tensors (k_proj/v_proj weight and bias; with qkvo also
// q_proj weight and bias and o_proj weight) replaced, in the converted tensor's dtype: the same safetensors files,
// tensor order, metadata and index, config.json and the other top-level files copied. Written as gqa-convert writes (gqa/checkpoint.hpp: the output path rules, a staging directory moved
// into place only when complete, removed on any failure or on cancel). Uses gqa::detail's output-directory helpers,
// which gqa/checkpoint.hpp includes.
//
// Errors: gqa::invalid_argument [gqa.uptrain.*] for options out of range, architectures that differ, too few
// calibration ids; [gqa.uptrain.resume] for --resume with other inputs or options (each one named);
// [gqa.uptrain.progress] for progress a fresh run would overwrite (without --force); gqa::format_error
// [gqa.uptrain.progress] for a damaged manifest or layer file; gqa::io_error [gqa.uptrain.busy] while another run
// holds the progress directory's lock; llama::Model::load's and llama::read_ids's errors ([gqa.decoder.*], e.g. an
// id outside the vocabulary) and gqa::convert_checkpoint's path rules ([gqa.checkpoint.*]) as they are.
#pragma once

#include "../model/llama.hpp"
#include "distill.hpp"
#include "progress.hpp"

#include <gqa/checkpoint.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace uptrain {

using llama::Matrix;

enum class Inputs { original, converted };
/// What each layer trains: K/V projections (and biases) only, or Q, K, V and O (the paper uptrains everything; with
/// one K/V head the queries must also adapt to the shared key).
enum class Train { kv, qkvo };
/// The layer's target: the original layer's attention output, or that plus the residual drift h_orig - h_conv at the
/// layer's input, so that the converted residual stream after attention equals the original's.
enum class Target { output, residual };

struct Options {
  Index steps = 300;        ///< Adam steps per layer
  Index batch = 4;          ///< windows per step
  Index window = 512;       ///< S, tokens per calibration window
  double lr = 2e-3;         ///< peak learning rate (cosine decay to 0); see README "Uptraining after conversion"
  std::uint64_t seed = 0;   ///< mini-batch order
  int threads = 0;          ///< OpenMP threads (0: omp_get_max_threads())
  bool force = false;       ///< replace OUTPUT_DIR (gqa-convert's --force rules)
  Inputs inputs = Inputs::converted;
  Train train = Train::qkvo;
  Target target = Target::output;
  bool resume = false;      ///< continue from the progress directory (progress.hpp) if there is one
  std::function<void(const struct LayerReport&)> on_layer;  ///< progress, once per layer
  std::function<void(const struct StepReport&)> on_step;    ///< progress, after every Adam step
  std::function<void(const std::string&)> on_message;       ///< notes: where the progress is kept, what was resumed
  const std::atomic<int>* cancel = nullptr;                 ///< nonzero: stop (a signal handler sets it)
};

/// One Adam step of one layer, for a progress line: the step's mini-batch loss and the time since training began.
struct StepReport {
  Index layer = 0, layers = 0, step = 0, steps = 0;
  double batch_loss = 0, target_power = 0, seconds = 0;
};

struct LayerReport {
  Index layer = 0, layers = 0;
  double loss_before = 0, loss_after = 0;  ///< mean squared error over all calibration windows
  double target_power = 0;                 ///< mean(Y^2): loss / target_power is the relative error
  bool exact = false;                      ///< loss at rounding level before training: not trained
  bool kept = false;                       ///< training did not lower the loss: converted weights kept
  bool resumed = false;                    ///< restored from the progress directory (seconds: the earlier run's)
  double seconds = 0;
};

template <typename... Args>
[[noreturn]] void fail(const char* id, Args&&... parts) {
  std::ostringstream os;
  os << "[gqa.uptrain." << id << "] ";
  (os << ... << std::forward<Args>(parts));
  throw gqa::invalid_argument(os.str());
}

template <typename... Args>
void check(bool ok, const char* id, Args&&... parts) {
  if (!ok) fail(id, std::forward<Args>(parts)...);
}

/// The one window of every layer; per-layer windows (Qwen2's max_window_layers, layer_types) are refused.
inline Index uniform_window(const llama::Config& c) {
  for (const Index w : c.windows)
    check(w == c.windows.front(), "unsupported", "sliding windows that differ between layers (", c.windows.front(),
          " and ", w, ") are not supported by gqa-uptrain");
  return c.windows.front();
}

/// The configs must describe the same model but for num_key_value_heads.
inline void check_compatible(const llama::Config& a, const llama::Config& b) {
  const auto same = [](const char* field, auto x, auto y) {
    check(x == y, "mismatch", "ORIGINAL_DIR and CONVERTED_DIR differ in ", field, ": ", x, " vs ", y,
          " (the converted checkpoint must be gqa-convert's output of the original)");
  };
  same("num_hidden_layers", a.layers, b.layers);
  same("hidden_size", a.hidden, b.hidden);
  same("intermediate_size", a.intermediate, b.intermediate);
  same("num_attention_heads", a.heads, b.heads);
  same("head_dim", a.head_dim, b.head_dim);
  same("vocab_size", a.vocab, b.vocab);
  same("rope_theta", a.rope.theta, b.rope.theta);
  same("rms_norm_eps", a.rms_norm_eps, b.rms_norm_eps);
  same("rope_type", a.rope.type, b.rope.type);
  same("the rotary frequencies", llama::detail::rotary_frequencies(a, a.max_positions) ==
                                     llama::detail::rotary_frequencies(b, b.max_positions), true);
  same("sliding_window", uniform_window(a), uniform_window(b));
  // Rope (distill.hpp) rotates by frequencies only; transformers' yarn and longrope also scale cos and sin.
  check(llama::detail::rotary_scaling(a) == 1.0, "unsupported", "ORIGINAL_DIR: rope_type \"", a.rope.type,
        "\" scales cos and sin by ", llama::detail::rotary_scaling(a), ", which gqa-uptrain does not implement");
  same("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
  check(b.kv_heads >= 1 && a.heads % b.kv_heads == 0, "mismatch", "CONVERTED_DIR: num_key_value_heads ", b.kv_heads,
        " does not divide num_attention_heads ", a.heads);
}

inline void check_options(const Options& o, const llama::Config& c) {
  check(o.steps >= 1, "options", "--steps ", o.steps, " must be >= 1");
  check(o.batch >= 1, "options", "--batch ", o.batch, " must be >= 1");
  check(o.window >= 2 && o.window <= c.max_positions, "options", "--window ", o.window,
        " is not in [2, max_position_embeddings = ", c.max_positions, "]");
  check(std::isfinite(o.lr) && o.lr > 0, "options", "--lr ", o.lr, " must be a positive number");
  check(o.threads >= 0, "options", "--threads ", o.threads, " must be >= 0");
  check(o.target == Target::output || o.inputs == Inputs::converted, "options",
        "--target residual needs --inputs converted (with the original's inputs there is no drift to undo)");
}

/// The options that change the result, as the command line spells them (what --resume compares; not --threads).
inline progress::Inputs result_options(const Options& o) {
  char lr[40];
  std::snprintf(lr, sizeof lr, "%.17g", o.lr);
  return {{"--steps", std::to_string(o.steps)},
          {"--batch", std::to_string(o.batch)},
          {"--window", std::to_string(o.window)},
          {"--lr", lr},
          {"--seed", std::to_string(o.seed)},
          {"--train", o.train == Train::kv ? "kv" : "qkvo"},
          {"--inputs", o.inputs == Inputs::converted ? "converted" : "original"},
          {"--target", o.target == Target::output ? "output" : "residual"}};
}

namespace detail {

/// What one window of a layer's forward pass can hand back besides the updated residual stream.
struct LayerOutputs {
  Matrix* x_norm = nullptr;  ///< [S, hidden] input_layernorm(h)
  Matrix* q = nullptr;       ///< [S, H*D] rotated queries
  Matrix* attn = nullptr;    ///< [S, hidden] attention output after o_proj, without its bias
};

/// Runs one window (h: [S, hidden], positions 0 .. S-1) through layer L in place, on the calling thread.
inline void run_layer(const llama::Layer& L, const llama::Config& c, const Rope<float>& rope, Matrix& h,
                      const LayerOutputs& want) {
  const Index S = h.rows(), H = c.heads, G = c.kv_heads, D = c.head_dim;
  Matrix x, q, k, v, a(S, H * D), y, gate, up;
  llama::detail::rms_norm(h, L.input_norm, c.rms_norm_eps, x);
  llama::detail::linear(x, {{L.q, q}, {L.k, k}, {L.v, v}});
  Mat<float> qm = std::move(q), km = std::move(k);
  rope.apply(qm, H);
  rope.apply(km, G);
  gqa::attention(gqa::token_major<const float>(qm.data(), 1, S, H, D), gqa::token_major<const float>(km.data(), 1, S, G, D),
                 gqa::token_major<const float>(v.data(), 1, S, G, D), gqa::token_major(a.data(), 1, S, H, D),
                 layer_attention_options(uniform_window(c)));
  y.noalias() = a * L.o.w().transpose();
  if (want.x_norm) *want.x_norm = x;
  if (want.q) *want.q = qm;
  if (want.attn) *want.attn = y;
  h += y;
  if (L.o.bias) h.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(L.o.bias, L.o.rows);
  llama::detail::rms_norm(h, L.post_norm, c.rms_norm_eps, x);
  llama::detail::linear(x, {{L.gate, gate}, {L.up, up}});
  gate = gate.array() / (1.0f + (-gate.array()).exp()) * up.array();  // SwiGLU, as llama::Model::forward
  llama::detail::linear(gate, {{L.down, y}});
  h += y;
}

/// Runs every window of `stream` ([N*S, hidden]) through layer L, windows threaded; fills the wanted outputs as
/// [N*S, ...] matrices.
inline void run_layer_all(const llama::Layer& L, const llama::Config& c, const Rope<float>& rope, Index S,
                          Matrix& stream, Matrix* x_norm, Matrix* q, Matrix* attn, int threads) {
  const Index N = stream.rows() / S;
  if (x_norm) x_norm->resize(N * S, c.hidden);
  if (q) q->resize(N * S, c.heads * c.head_dim);
  if (attn) attn->resize(N * S, c.hidden);
  for_each_window(N, threads, [&](Index w) {
    Matrix h = stream.middleRows(w * S, S), xn, qw, yw;
    run_layer(L, c, rope, h, {x_norm ? &xn : nullptr, q ? &qw : nullptr, attn ? &yw : nullptr});
    stream.middleRows(w * S, S) = h;
    if (x_norm) x_norm->middleRows(w * S, S) = xn;
    if (q) q->middleRows(w * S, S) = qw;
    if (attn) attn->middleRows(w * S, S) = yw;
  });
}

inline LayerWeights<float> initial_weights(const llama::Layer& L, Train train) {
  LayerWeights<float> p;
  p.wk = L.k.w();
  p.wv = L.v.w();
  if (L.k.bias) p.bk = Eigen::Map<const RowVec<float>>(L.k.bias, L.k.rows);
  if (L.v.bias) p.bv = Eigen::Map<const RowVec<float>>(L.v.bias, L.v.rows);
  if (train == Train::qkvo) {
    p.wq = L.q.w();
    p.wo = L.o.w();
    if (L.q.bias) p.bq = Eigen::Map<const RowVec<float>>(L.q.bias, L.q.rows);
  }
  return p;
}

/// The layer with its trained tensors in place of the converted ones (pointers into p).
inline llama::Layer with_weights(const llama::Layer& converted, const LayerWeights<float>& p) {
  llama::Layer L = converted;
  L.k.weight = p.wk.data();
  L.v.weight = p.wv.data();
  L.k.bias = p.has_bias() ? p.bk.data() : nullptr;
  L.v.bias = p.has_bias() ? p.bv.data() : nullptr;
  if (p.trains_qo()) {
    L.q.weight = p.wq.data();
    L.q.bias = p.bq.size() ? p.bq.data() : nullptr;
    L.o.weight = p.wo.data();
  }
  return L;
}

/// Adds layer l's trained tensors, by checkpoint name, to `replaced`.
inline void record_weights(Index l, const LayerWeights<float>& p, std::map<std::string, std::vector<float>>& replaced) {
  const std::string name = "model.layers." + std::to_string(l) + ".self_attn.";
  progress::for_each_tensor(p, [&](const char* tensor, const auto& m) {
    if (m.size()) replaced[name + tensor].assign(m.data(), m.data() + m.size());
  });
}

inline void check_cancel(const Options& o) {
  if (o.cancel && o.cancel->load() != 0)
    throw gqa::io_error("[gqa.checkpoint.interrupted] interrupted (signal " + std::to_string(o.cancel->load()) +
                        ")");
}

/// Trains p on `prob` (see the header comment); fills the report's losses and flags.
inline void train_layer(const LayerProblem<float>& prob, LayerWeights<float>& p, const Options& o, Index layer,
                        LayerReport& r) {
  const Index N = prob.windows();
  std::vector<Index> all(static_cast<size_t>(N));
  for (Index w = 0; w < N; ++w) all[size_t(w)] = w;
  r.target_power = prob.y.cast<double>().squaredNorm() / double(prob.y.size());
  r.loss_before = batch_loss(prob, p, all, nullptr, o.threads);
  if (r.loss_before <= 1e-10 * r.target_power) {
    r.exact = true;
    r.loss_after = r.loss_before;
    return;
  }
  const LayerWeights<float> start = p;
  Adam<float> adam(p);
  std::mt19937_64 rng(o.seed ^ (0x9e3779b97f4a7c15ULL * std::uint64_t(layer + 1)));
  std::vector<Index> order = all;
  size_t next = order.size();  // reshuffle on first use
  const Index B = std::min(o.batch, N);
  LayerWeights<float> g;
  const auto t0 = std::chrono::steady_clock::now();
  for (Index step = 0; step < o.steps; ++step) {
    check_cancel(o);
    std::vector<Index> batch;
    while (Index(batch.size()) < B) {
      if (next == order.size()) {  // Fisher-Yates by hand: std::shuffle's draws are implementation-defined
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[size_t(rng() % i)]);
        next = 0;
      }
      batch.push_back(order[next++]);
    }
    const double loss = batch_loss(prob, p, batch, &g, o.threads);
    const double lr = o.lr * 0.5 * (1 + std::cos(M_PI * double(step) / double(o.steps)));
    adam.step(p, g, lr);
    if (o.on_step)
      o.on_step({layer, r.layers, step, o.steps, loss, r.target_power,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()});
  }
  r.loss_after = batch_loss(prob, p, all, nullptr, o.threads);
  if (!(r.loss_after < r.loss_before)) {
    p = start;
    r.kept = true;
    r.loss_after = r.loss_before;
  }
}

/// Writes float values into a tensor of `dtype` (the float dtypes the decoder loads).
inline void encode(const std::vector<float>& v, gqa::safetensors::Dtype dtype, gqa::span<std::byte> dst) {
  namespace st = gqa::safetensors;
  const auto put = [&](auto tag) {
    using E = decltype(tag);
    for (size_t i = 0; i < v.size(); ++i) {
      const E e(v[i]);
      std::memcpy(dst.data() + i * sizeof(E), &e, sizeof(E));
    }
  };
  switch (dtype) {
    case st::Dtype::F32: put(float{}); break;
    case st::Dtype::F64: put(double{}); break;
    case st::Dtype::BF16: put(gqa::bfloat16{}); break;
    case st::Dtype::F16: put(gqa::half{}); break;
    default: fail("dtype", "cannot write a K/V tensor of dtype ", st::dtype_name(dtype));
  }
}

/// The converted checkpoint with the tensors named in `replaced` (float values) written in their stored dtype; see
/// the header comment for the format and the atomicity.
inline void write_checkpoint(const std::filesystem::path& converted, const gqa::detail::CheckpointPaths& paths,
                             const std::map<std::string, std::vector<float>>& replaced, const Options& o) {
  namespace st = gqa::safetensors;
  const st::Directory dir = st::Directory::open(paths.in);
  gqa::detail::OutputDirectory out(paths.out, paths.out_exists);
  for (size_t f = 0; f < dir.files().size(); ++f) {
    const st::File& file = dir.files()[f];
    st::Metadata metadata = file.metadata();
    metadata.emplace("format", "pt");
    st::Writer writer(metadata);
    for (const st::TensorView& t : file.tensors()) {
      const auto it = replaced.find(t.name);
      if (it == replaced.end()) {
        writer.add(t.name, t.dtype, t.shape, t.bytes);
        continue;
      }
      check(std::int64_t(it->second.size()) == st::numel(t.shape), "internal", "tensor '", t.name, "' has ",
            st::numel(t.shape), " values in ", converted.string(), " but training produced ", it->second.size());
      writer.add(t.name, t.dtype, t.shape, [&v = it->second, dtype = t.dtype](gqa::span<std::byte> dst) {
        encode(v, dtype, dst);
      });
    }
    writer.write(out.path() / dir.file_names()[f], o.cancel);
  }
  if (dir.sharded()) st::write_index(out.path() / st::index_file_name, *dir.index());
  for (const auto& e : gqa::detail::list_entries(paths.in, true)) {
    const bool weights = e.name == st::index_file_name ||
                         (e.name.size() > 12 && e.name.compare(e.name.size() - 12, 12, ".safetensors") == 0);
    // An input's marker is not copied: commit() writes the output's own.
    if (!e.regular || weights || gqa::detail::is_weight_file(e.name) || e.name == gqa::detail::output_marker_name)
      continue;
    check_cancel(o);
    gqa::detail::copy_regular_file(paths.in / e.name, out.path() / e.name);
  }
  check_cancel(o);
  out.commit();
}

}  // namespace detail

namespace detail {

/// Everything a layer's training reads besides its weights: the models, the windows' rotary tables, the residual
/// streams at the current layer's input (h_orig always; h_conv with Inputs::converted).
struct Run {
  const llama::Model& orig;
  const llama::Model& conv;
  Index S = 0;
  int threads = 0;
  Rope<float> rope, rope_conv;
  Matrix h_orig, h_conv;
};

/// Layer l's problem from the streams at its input; advances h_orig past layer l.
inline LayerProblem<float> layer_problem(Run& run, Index l, const Options& o) {
  const llama::Config &c = run.orig.config(), &cc = run.conv.config();
  const llama::Layer& Lc = run.conv.layer(l);
  LayerProblem<float> prob;
  prob.window = run.S;
  prob.heads = cc.heads;
  prob.kv_heads = cc.kv_heads;
  prob.head_dim = cc.head_dim;
  prob.sliding_window = uniform_window(cc);
  prob.rope = &run.rope_conv;
  if (o.train == Train::kv) prob.wo = Lc.o.w();
  Matrix* q_wanted = o.train == Train::kv ? &prob.q : nullptr;  // fixed queries only when W_q is not trained
  Matrix drift;
  if (o.target == Target::residual) drift = run.h_orig - run.h_conv;  // at the layer's input, before h_orig advances
  run_layer_all(run.orig.layer(l), c, run.rope, run.S, run.h_orig, o.inputs == Inputs::original ? &prob.x : nullptr,
                o.inputs == Inputs::original ? q_wanted : nullptr, &prob.y, run.threads);
  if (o.inputs == Inputs::converted) {  // the converted model's own inputs: X (and Q) of h_conv
    Matrix scratch = run.h_conv;
    run_layer_all(Lc, cc, run.rope_conv, run.S, scratch, &prob.x, q_wanted, nullptr, run.threads);
  }
  if (o.target == Target::residual) prob.y += drift;
  return prob;
}

/// Advances h_conv past layer l with its trained weights p (Inputs::converted only).
inline void advance_converted(Run& run, Index l, const LayerWeights<float>& p, const Options& o) {
  if (o.inputs == Inputs::converted)
    run_layer_all(with_weights(run.conv.layer(l), p), run.conv.config(), run.rope_conv, run.S, run.h_conv, nullptr,
                  nullptr, nullptr, run.threads);
}

/// Layer l restored from the progress directory: its weights, its report, and both streams advanced past it by
/// the same passes an uninterrupted run made (progress.hpp: why that is bitwise the same state).
inline LayerReport restore_layer(Run& run, Index l, const progress::Progress& saved, const Options& o,
                                 LayerWeights<float>& p) {
  p = initial_weights(run.conv.layer(l), o.train);
  saved.load_weights(l, p);
  run_layer_all(run.orig.layer(l), run.orig.config(), run.rope, run.S, run.h_orig, nullptr, nullptr, nullptr,
                run.threads);
  advance_converted(run, l, p, o);
  const progress::SavedLayer& s = saved.layer(l);
  LayerReport r;
  r.layer = l;
  r.layers = run.orig.config().layers;
  r.loss_before = s.loss_before;
  r.loss_after = s.loss_after;
  r.target_power = s.target_power;
  r.exact = s.exact;
  r.kept = s.kept;
  r.seconds = s.seconds;
  r.resumed = true;
  return r;
}

/// Trains layer l from the streams at its input and advances them past it.
inline LayerReport train_next_layer(Run& run, Index l, const Options& o, LayerWeights<float>& p) {
  const auto t0 = std::chrono::steady_clock::now();
  check_cancel(o);
  const llama::Layer& Lc = run.conv.layer(l);
  check((Lc.k.bias == nullptr) == (Lc.v.bias == nullptr), "unsupported", "CONVERTED_DIR: layer ", l,
        " has a bias on only one of k_proj and v_proj (both or neither are trained)");
  const LayerProblem<float> prob = layer_problem(run, l, o);
  p = initial_weights(Lc, o.train);
  LayerReport r;
  r.layer = l;
  r.layers = run.orig.config().layers;
  train_layer(prob, p, o, l, r);
  advance_converted(run, l, p, o);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace detail

/// Uptrains `converted` against `original` on the calibration ids and writes `output` (see the header comment).
inline std::vector<LayerReport> uptrain_checkpoint(const std::filesystem::path& original,
                                                   const std::filesystem::path& converted,
                                                   const std::filesystem::path& output,
                                                   const std::filesystem::path& calibration, const Options& o) {
  // Output rules first, so that a bad OUTPUT_DIR fails before the training: never the original or the converted
  // checkpoint, nor inside either; an existing one only with --force and if gqa wrote it (its .gqa-output marker).
  const char* force_flag = "gqa-uptrain --force (uptrain::Options::force)";
  (void)gqa::detail::check_paths(original, output, o.force, force_flag);
  const gqa::detail::CheckpointPaths paths = gqa::detail::check_paths(converted, output, o.force, force_flag);
  // Float weights: the trained ones replace them in place (with_weights) and the fits read them as matrices.
  const llama::Model orig = llama::Model::load(original, {}, llama::WeightType::f32),
                     conv = llama::Model::load(converted, {}, llama::WeightType::f32);
  const llama::Config& c = orig.config();
  check_compatible(c, conv.config());
  check_options(o, c);
  const std::vector<std::int32_t> ids = llama::read_ids(calibration, c.vocab);
  const Index S = o.window, N = Index(ids.size()) / S;
  check(N >= 1, "calibration", calibration.string(), ": ", ids.size(), " ids are too few for one window of --window ",
        S, " tokens");
  std::string note;
  progress::Progress saved(paths.out, progress::inputs_of(original, converted, calibration, ids, result_options(o)),
                           o.resume, o.force, note);
  if (o.on_message) {
    if (!note.empty()) o.on_message(note);
    o.on_message("each finished layer is saved in " + saved.directory().string() + " (--resume continues from it)");
  }
  detail::Run run{orig, conv, S, o.threads > 0 ? o.threads : omp_get_max_threads(),
                  Rope<float>(llama::detail::rotary_frequencies(c, S), S),  // one window per call
                  Rope<float>(llama::detail::rotary_frequencies(conv.config(), S), S), Matrix(N * S, c.hidden),
                  Matrix()};
  for (Index i = 0; i < N * S; ++i)
    orig.embed(ids[size_t(i)], run.h_orig.row(i).data());
  if (o.inputs == Inputs::converted) run.h_conv = run.h_orig;

  std::map<std::string, std::vector<float>> replaced;
  std::vector<LayerReport> reports;
  try {
    for (Index l = 0; l < c.layers; ++l) {
      LayerWeights<float> p;
      const bool restored = l < saved.done();
      const LayerReport r = restored ? detail::restore_layer(run, l, saved, o, p) : detail::train_next_layer(run, l, o, p);
      if (!restored) saved.save_layer(l, p, {r.loss_before, r.loss_after, r.target_power, r.seconds, r.exact, r.kept});
      detail::record_weights(l, p, replaced);
      if (o.on_layer) o.on_layer(r);
      reports.push_back(r);
    }
    detail::write_checkpoint(converted, paths, replaced, o);
  } catch (const std::exception& e) {
    if (saved.done() == 0) saved.remove();  // nothing worth keeping
    if (!o.cancel || o.cancel->load() == 0 || !dynamic_cast<const gqa::io_error*>(&e)) throw;
    throw gqa::io_error(std::string(e.what()) + "; " + output.string() + " was not written; " +
                        (saved.done() == 0 ? std::string("no layer was finished")
                                           : "the " + std::to_string(saved.done()) + " finished layer(s) are kept in " +
                                                 saved.directory().string() + " (gqa-uptrain --resume continues)"));
  }
  saved.remove();
  return reports;
}

}  // namespace uptrain
