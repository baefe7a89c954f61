// decoder.cpp — example_decoder: a Llama-family model (Llama, Mistral, Qwen2) from a Hugging Face directory,
// decoding with gqa's KV cache and attention. The model code is examples/model/llama.hpp; this file is the
// command line.
//
//   example_decoder MODEL_DIR generate (--prompt TEXT | --prompt-ids FILE) [--max-new N] [--kv f32|bf16|f16|i8]
//                                     [--temperature T [--top-k K] [--seed S]] [--threads N] [--weights W]
//                                     [--sinks LOGIT]
//   example_decoder MODEL_DIR perplexity (--text FILE | --ids FILE) [--context N] [--chunk C]
//                                       [--kv f32|bf16|f16|i8] [--threads N] [--weights W] [--sinks LOGIT]
//   example_decoder MODEL_DIR bench --context N [--tokens T] [--prefill P [--chunk C]] [--kv f32|bf16|f16|i8]
//                                  [--threads N] [--weights W] [--sinks LOGIT]
//   example_decoder MODEL_DIR tokenize --text FILE
//   mpirun -np P example_decoder MODEL_DIR (generate | perplexity | bench) ... --tensor-parallel
//
// MODEL_DIR holds config.json and model.safetensors (or model.safetensors.index.json and its shards), and
// optionally tokenizer.json: it shows ids as text, and encodes --prompt TEXT and --text FILE (UTF-8) into ids as
// Hugging Face `tokenizers` does, special tokens of its post_processor (a BOS, say) included
// (examples/model/encoder.hpp). Ids files hold whitespace-separated integers (bench/text_ids.py writes them).
// --kv is the KV cache's element type (default f32; i8 is the int8 cache with per-row scales); --threads defaults
// to OpenMP's (OMP_NUM_THREADS, else the cores), at most 1024. --weights f32|bf16|f16 is the type the weight
// matrices are kept and multiplied in (default: as stored in the checkpoint; f32 -> bf16 / f16 rounds at load).
// --sinks LOGIT (generate, perplexity, bench) gives every query head an attention sink of that logit
// (gqa::AttentionOptions::sinks; llama::Model::set_attention_sinks), for experiments: -inf is no sink (the same
// numbers, bitwise), a finite logit adds exp(LOGIT) to every softmax denominator.
//
// generate   prefills the prompt in chunks, then decodes up to --max-new tokens (default 32; stops at the
//            config's eos_token_id): greedy, or sampled with --temperature (> 0), --top-k (0 = all) and --seed
//            (--top-k and --seed without --temperature > 0 are a usage error: greedy decoding would ignore them).
//            Prints the ids, the text, and prefill and decode tokens/s.
// perplexity evaluates the ids in consecutive windows of --context tokens (default min(2048,
//            max_position_embeddings)), each from an empty cache, fed in chunks of --chunk tokens (default
//            llama::kPrefillChunk; 1 runs every token as a decode step, the kernels decode uses); last line:
//            "perplexity <value> over <n> tokens".
// bench      fills every layer's cache with --context synthetic tokens, then times --tokens (default 32) decode
//            steps; prints ms per token, the bytes one token reads (weights + KV cache) and the floor those bytes
//            set at the stream rate measured by parallel reads of that many bytes between the steps (medians of
//            both), and the fraction of it reached (floor / time). --prefill P first times the prefill of P
//            tokens into an empty cache in chunks of --chunk (default llama::kPrefillChunk), logits of the last
//            position only, median of 3 (tokens/s). Last line is key=value pairs.
//            On cores shared with other work, run with OMP_WAIT_POLICY=passive (see README.md).
// --tensor-parallel (generate, perplexity, bench; a flag without a value) splits the model by heads across the P
//            ranks of mpirun (examples/model/tensor_parallel.hpp: each rank loads only its rows and columns of
//            each layer and holds only its heads' KV cache; a deterministic all-reduce after o_proj and after
//            down_proj): the same greedy tokens as one process. Only rank 0 prints. A P that cannot split the heads
//            (gqa::head_shard's rule) or intermediate_size is refused. Needs a build that found MPI (else a usage
//            error). An error on any rank before the first forward pass ends every rank with status 1 and one
//            message; one during the forward pass ends the job through MPI_Abort.
// tokenize   prints the ids of --text FILE (20 to a line, an ids file) and, on stderr, their count and the encode
//            time; needs only MODEL_DIR/tokenizer.json.
//
// Exit status: 0 (also for --help, which prints the usage to stdout), 1 on an error (message on stderr,
// "[gqa.<id>] ..."), 2 on a usage error. Bytes of an argument that are not printable UTF-8 appear as \xNN.
#include "cli/tool_cli.hpp"
#include "model/encoder.hpp"
#include "model/llama.hpp"
#include "model/tokenizer.hpp"
#ifdef GQA_DECODER_MPI  // examples/CMakeLists.txt: defined when CMake found MPI (example_decoder links gqa::mpi)
#include "model/tensor_parallel.hpp"
#endif

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

using gqa::Index;
using Clock = std::chrono::steady_clock;

const char* const usage_text =
    "usage:\n"
    "  example_decoder MODEL_DIR generate (--prompt TEXT | --prompt-ids FILE) [--max-new N]\n"
    "                                    [--kv f32|bf16|f16|i8] [--temperature T [--top-k K] [--seed S]]\n"
    "                                    [--threads N] [--weights f32|bf16|f16] [--sinks LOGIT]\n"
    "  example_decoder MODEL_DIR perplexity (--text FILE | --ids FILE) [--context N] [--chunk C]\n"
    "                                      [--kv f32|bf16|f16|i8] [--threads N] [--weights f32|bf16|f16]\n"
    "                                      [--sinks LOGIT]\n"
    "  example_decoder MODEL_DIR bench --context N [--tokens T] [--prefill P [--chunk C]]\n"
    "                                 [--kv f32|bf16|f16|i8] [--threads N] [--weights f32|bf16|f16]\n"
    "                                 [--sinks LOGIT]\n"
    "  example_decoder MODEL_DIR tokenize --text FILE\n"
    "  mpirun -np P example_decoder MODEL_DIR (generate | perplexity | bench) ... --tensor-parallel\n"
    "  example_decoder --help\n";

using tool_cli::printable;
using tool_cli::usage_error;

/// The command line: MODEL_DIR MODE then --flag value pairs, each flag from the mode's list; or -h / --help.
struct Args {
  std::string dir, mode;
  std::map<std::string, std::string> flags;
  bool help = false;
  bool tensor_parallel = false;  ///< --tensor-parallel, the one flag without a value

  bool has(const std::string& f) const { return flags.count(f) != 0; }
  std::string text(const std::string& f, const std::string& fallback = "") const {
    return has(f) ? flags.at(f) : fallback;
  }
  long long integer(const std::string& f, long long fallback, long long min) const {
    if (!has(f)) return fallback;
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(flags.at(f), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != flags.at(f).size() || v < min)
      throw usage_error(f + " " + flags.at(f) + ": expected an integer >= " + std::to_string(min));
    return v;
  }
  double number(const std::string& f, double fallback) const {
    if (!has(f)) return fallback;
    std::size_t used = 0;
    double v = 0;
    try {
      v = std::stod(flags.at(f), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != flags.at(f).size() || !(v >= 0)) throw usage_error(f + " " + flags.at(f) + ": expected a number >= 0");
    return v;
  }
};

/// --sinks as a float: a finite number or -inf.
float sink_logit(const Args& a) {
  const std::string& text = a.text("--sinks");
  std::size_t used = 0;
  float v = 0;
  try {
    v = std::stof(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || std::isnan(v) || v == std::numeric_limits<float>::infinity())
    throw usage_error("--sinks " + text + ": expected a finite number or -inf (no sink)");
  return v;
}

Args parse(int argc, char** argv) {
  // -h / --help in place of MODEL_DIR, the mode or a flag (not as a flag's value, which may be any file name).
  for (int i = 1; i < argc; i += i < 3 || std::string(argv[i]) == "--tensor-parallel" ? 1 : 2)
    if (std::string(argv[i]) == "-h" || std::string(argv[i]) == "--help") {
      Args help;
      help.help = true;
      return help;
    }
  if (argc < 3) throw usage_error("missing MODEL_DIR or mode");
  Args a{argv[1], argv[2], {}};
  const std::map<std::string, std::vector<std::string>> allowed = {
      {"generate",
       {"--prompt-ids", "--prompt", "--max-new", "--kv", "--temperature", "--top-k", "--seed", "--threads",
        "--weights", "--sinks"}},
      {"perplexity", {"--ids", "--text", "--context", "--chunk", "--kv", "--threads", "--weights", "--sinks"}},
      {"bench", {"--context", "--tokens", "--prefill", "--chunk", "--kv", "--threads", "--weights", "--sinks"}},
      {"tokenize", {"--text"}}};
  const auto mode = allowed.find(a.mode);
  if (mode == allowed.end()) throw usage_error("unknown mode '" + a.mode + "'");
  for (int i = 3; i < argc; i += 2) {
    const std::string f = argv[i];
    if (f == "--tensor-parallel") {
      if (a.mode == "tokenize") throw usage_error("--tensor-parallel is for generate, perplexity and bench");
      if (a.tensor_parallel) throw usage_error(f + " given twice");
      a.tensor_parallel = true;
      --i;  // no value
      continue;
    }
    if (std::find(mode->second.begin(), mode->second.end(), f) == mode->second.end())
      throw usage_error("unknown option '" + f + "' for " + a.mode);
    if (i + 1 >= argc) throw usage_error(f + " needs a value");
    if (!a.flags.emplace(f, argv[i + 1]).second) throw usage_error(f + " given twice");
  }
  // The input: ids, or text for the checkpoint's tokenizer; exactly one of the two where a mode takes both.
  const std::map<std::string, std::vector<std::string>> inputs = {{"generate", {"--prompt-ids", "--prompt"}},
                                                                  {"perplexity", {"--ids", "--text"}},
                                                                  {"bench", {"--context"}},
                                                                  {"tokenize", {"--text"}}};
  const std::vector<std::string>& input = inputs.at(a.mode);
  const auto given = std::count_if(input.begin(), input.end(), [&](const std::string& f) { return a.has(f); });
  if (given != 1) {
    const std::string either = input.size() == 1 ? input[0] : input[0] + " or " + input[1];
    throw usage_error(a.mode + (given == 0 ? " needs " : " takes one of ") + either);
  }
  if (a.has("--kv") && a.text("--kv") != "f32" && a.text("--kv") != "bf16" && a.text("--kv") != "f16" &&
      a.text("--kv") != "i8")
    throw usage_error("--kv " + a.text("--kv") + ": expected f32, bf16, f16 or i8");
  if (a.has("--weights") && a.text("--weights") != "f32" && a.text("--weights") != "bf16" &&
      a.text("--weights") != "f16")
    throw usage_error("--weights " + a.text("--weights") + ": expected f32, bf16 or f16");
  if (a.mode == "bench" && a.has("--chunk") && !a.has("--prefill"))
    throw usage_error("--chunk needs --prefill (the prefill it chunks)");
  if (a.has("--sinks")) (void)sink_logit(a);
  for (const char* f : {"--top-k", "--seed"})
    if (a.has(f) && !(a.number("--temperature", 0) > 0))
      throw usage_error(std::string(f) + " needs --temperature > 0: greedy decoding (the default) would ignore it");
  return a;
}

/// --weights as a WeightType; nothing (as stored) without it.
std::optional<llama::WeightType> weight_type(const Args& a) {
  if (!a.has("--weights")) return std::nullopt;
  const std::string w = a.text("--weights");
  return w == "f32" ? llama::WeightType::f32 : w == "bf16" ? llama::WeightType::bf16 : llama::WeightType::f16;
}

/// The model of MODEL_DIR (this rank's shard of it), with --sinks applied.
llama::Model load_model(const Args& a, llama::Shard shard) {
  llama::Model model = llama::Model::load(a.dir, shard, weight_type(a));
  if (a.has("--sinks")) model.set_attention_sinks(sink_logit(a));
  return model;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// The whole of a text file, as bytes (the encoder checks that they are UTF-8).
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  llama::check<gqa::io_error>(bool(in), "io", "cannot open text file ", path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  llama::check<gqa::io_error>(!in.bad(), "io", "cannot read text file ", path);
  return text;
}

llama::Encoder open_encoder(const std::string& dir, const std::string& flag) {
  std::optional<llama::Encoder> e = llama::Encoder::open(dir);
  llama::check(e.has_value(), "tokenizer", flag, " needs MODEL_DIR/tokenizer.json, and ", dir, " has none");
  return std::move(*e);
}

/// The ids of --ids-style `ids_flag` (a file of ids) or `text_flag` (text for the tokenizer), checked against the
/// vocabulary.
std::vector<std::int32_t> input_ids(const Args& a, const char* ids_flag, const char* text_flag,
                                    const std::string& text, gqa::Index vocab) {
  if (a.has(ids_flag)) return llama::read_ids(a.text(ids_flag), vocab);
  const std::vector<std::int32_t> ids = open_encoder(a.dir, text_flag).encode(text);
  llama::check_ids(ids, vocab, std::string(text_flag) + " (encoded with tokenizer.json)");
  return ids;
}

std::string join(const std::vector<std::int32_t>& ids) {
  std::string s;
  for (const auto id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return s;
}

template <typename KV>
void generate(const llama::Model& model, const Args& a) {
  const llama::Config& c = model.config();
  const std::vector<std::int32_t> prompt = input_ids(a, "--prompt-ids", "--prompt", a.text("--prompt"), c.vocab);
  llama::check(!prompt.empty() || !a.has("--prompt"), "token", "--prompt \"", a.text("--prompt"),
               "\" encodes to no token");
  const Index max_new = a.integer("--max-new", 32, 1);
  // Compared before adding: --max-new may be any long long.
  llama::check(max_new <= c.max_positions - Index(prompt.size()), "context", "the prompt's ", prompt.size(),
               " ids + --max-new ", max_new, " exceed max_position_embeddings = ", c.max_positions);
  const Index total = Index(prompt.size()) + max_new;
  llama::Sampler sampler(a.number("--temperature", 0), a.integer("--top-k", 0, 0), a.integer("--seed", 0, 0));
  llama::State<KV> state(model, total);
  llama::Matrix logits;

  const Index chunk = llama::kPrefillChunk;
  const auto t0 = Clock::now();
  for (Index s = 0; s < Index(prompt.size()); s += chunk) {
    const Index n = std::min(chunk, Index(prompt.size()) - s);
    const bool last = s + n == Index(prompt.size());
    // The prompt's whole length as the call's (longrope: transformers' generate() runs the prompt in one call).
    model.forward(gqa::span<const std::int32_t>(prompt.data() + s, n), state, last ? &logits : nullptr, false,
                  Index(prompt.size()));
  }
  const double prefill_s = seconds_since(t0);

  std::vector<std::int32_t> out{sampler.next(logits.data(), c.vocab)};
  const auto is_eos = [&](std::int32_t t) { return std::count(c.eos_ids.begin(), c.eos_ids.end(), t) > 0; };
  const auto t1 = Clock::now();
  while (Index(out.size()) < max_new && !is_eos(out.back())) {
    model.forward(gqa::span<const std::int32_t>(&out.back(), 1), state, &logits);
    out.push_back(sampler.next(logits.data(), c.vocab));
  }
  const double decode_s = seconds_since(t1);
  const Index decoded = Index(out.size()) - 1;  // the first new token comes from the prefill's logits

  std::printf("generated ids: %s\n", join(out).c_str());
  if (const auto tok = llama::Detokenizer::open(a.dir)) {
    std::printf("prompt text: %s\n", tok->decode(prompt).c_str());
    std::printf("generated text: %s\n", tok->decode(out).c_str());
  } else {
    std::printf("(no tokenizer.json in %s: ids only)\n", a.dir.c_str());
  }
  std::printf("prefill: %zu tokens in %.3f s = %.1f tokens/s\n", prompt.size(), prefill_s,
              double(prompt.size()) / prefill_s);
  if (decoded > 0)
    std::printf("decode: %td tokens in %.3f s = %.2f tokens/s (%.2f ms/token)\n", decoded, decode_s,
                double(decoded) / decode_s, 1e3 * decode_s / double(decoded));
  else
    std::printf("decode: 0 tokens (stopped after the first)\n");
}

template <typename KV>
void perplexity(const llama::Model& model, const Args& a) {
  const llama::Config& c = model.config();
  const std::vector<std::int32_t> ids =
      input_ids(a, "--ids", "--text", a.has("--text") ? read_file(a.text("--text")) : std::string(), c.vocab);
  const Index context = a.integer("--context", std::min<Index>(2048, c.max_positions), 0);
  const auto t0 = Clock::now();
  const llama::PerplexityResult r =
      llama::perplexity<KV>(model, ids, context, a.integer("--chunk", llama::kPrefillChunk, 1));
  const double s = seconds_since(t0);
  std::printf("%zu ids in windows of %td: mean negative log-likelihood %.6f nats, %.1f s (%.1f tokens/s)\n",
              ids.size(), context, r.nll / double(r.tokens), s, double(ids.size()) / s);
  std::printf("perplexity %.4f over %td tokens\n", r.value(), r.tokens);
}

/// A STREAM-style parallel read of a buffer the size of what one decode step reads, with the decode's threads.
/// Passes are taken between decode steps, so that both see the same load from whatever else runs on the cores.
class StreamRead {
 public:
  explicit StreamRead(std::uint64_t bytes) : buffer_(static_cast<size_t>(bytes / sizeof(float))) {
    const Index n = Index(buffer_.size());
#pragma omp parallel
    {
      const Index threads = omp_get_num_threads(), t = omp_get_thread_num();
      std::fill(buffer_.begin() + n * t / threads, buffer_.begin() + n * (t + 1) / threads, 1.0f);  // first touch
    }
  }
  /// One pass; returns bytes per second.
  double pass() {
    const Index n = Index(buffer_.size());
    double total = 0;
    const auto t0 = Clock::now();
#pragma omp parallel reduction(+ : total)
    {
      const Index threads = omp_get_num_threads(), t = omp_get_thread_num();
      const Index begin = n * t / threads, end = n * (t + 1) / threads;
      total += double(Eigen::Map<const Eigen::ArrayXf>(buffer_.data() + begin, end - begin).sum());
    }
    const double s = seconds_since(t0);
    sink_ += total;
    return double(n) * sizeof(float) / s;
  }
  double sink() const { return sink_; }

 private:
  std::vector<float> buffer_;
  double sink_ = 0;
};

/// Seconds of prefilling `tokens` synthetic ids into an empty cache in chunks of `chunk` (logits of the last
/// position only, as generate does): the median of 3 runs after one warm-up.
template <typename KV>
double prefill_seconds(const llama::Model& model, Index tokens, Index chunk) {
  const llama::Config& c = model.config();
  std::vector<std::int32_t> ids(static_cast<size_t>(tokens));
  for (Index i = 0; i < tokens; ++i) ids[size_t(i)] = std::int32_t((i * 7919 + 13) % c.vocab);
  llama::State<KV> state(model, tokens);
  llama::Matrix logits;
  std::vector<double> runs;
  for (int r = 0; r < 4; ++r) {
    state.clear();
    const auto t0 = Clock::now();
    for (Index s = 0; s < tokens; s += chunk) {
      const Index n = std::min(chunk, tokens - s);
      model.forward(gqa::span<const std::int32_t>(ids.data() + s, n), state, s + n == tokens ? &logits : nullptr,
                    false, tokens);
    }
    if (r > 0) runs.push_back(seconds_since(t0));
  }
  std::sort(runs.begin(), runs.end());
  return runs[1];
}

template <typename KV>
void bench(const llama::Model& model, const Args& a, const char* kv_name) {
  const llama::Config& c = model.config();
  const Index context = a.integer("--context", 0, 1), tokens = a.integer("--tokens", 32, 1);
  // Compared before adding: both may be any long long.
  llama::check(context <= c.max_positions && tokens <= c.max_positions - context, "context", "--context ", context,
               " + --tokens ", tokens, " exceed max_position_embeddings = ", c.max_positions);
  const Index prefill = a.integer("--prefill", 0, 1), chunk = a.integer("--chunk", llama::kPrefillChunk, 1);
  llama::check(prefill <= c.max_positions, "context", "--prefill ", prefill, " exceeds max_position_embeddings = ",
               c.max_positions);
  const double prefill_s = prefill > 0 ? prefill_seconds<KV>(model, prefill, chunk) : 0.0;
  const Index warmup = std::min<Index>(2, context);
  llama::State<KV> state(model, context + tokens);
  // Synthetic K/V for the first context - warmup positions: decode time does not depend on the values.
  const Index fill = context - warmup, G = model.shard().num_kv_heads, D = c.head_dim;
  std::vector<float> kv(size_t(std::min<Index>(fill, 512) * G * D));
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = float(std::sin(0.1 * double(i)));
  for (Index l = 0; l < c.layers; ++l)
    for (Index s = 0; s < fill; s += 512) {
      const Index n = std::min<Index>(512, fill - s);
      const auto ref = gqa::token_major<const float>(kv.data(), 1, n, G, D);
      state.cache(l).append(ref, ref);
    }
  llama::Matrix logits;
  std::vector<double> ms, stream_rates;
  const double weight_bytes = double(model.decode_weight_bytes());
  double kv_bytes = 0;
  // The mean bytes of the timed steps: cache lengths context + 1 .. context + tokens.
  StreamRead stream_read(std::uint64_t(weight_bytes + double(state.cache(0).bytes_per_token() * c.layers) *
                                                          (double(context) + 0.5 * double(tokens + 1))));
  for (Index i = 0; i < warmup + tokens; ++i) {
    const std::int32_t id = std::int32_t((i * 7919 + 13) % c.vocab);
    const auto t0 = Clock::now();
    model.forward(gqa::span<const std::int32_t>(&id, 1), state, &logits);
    if (i < warmup) continue;  // page faults of a fresh mapping, first-touch of buffers
    ms.push_back(1e3 * seconds_since(t0));
    kv_bytes += double(state.kv_bytes_in_use()) / double(tokens);
    stream_rates.push_back(stream_read.pass());
  }
  if (stream_read.sink() < 0) std::printf("%g\n", stream_read.sink());  // keeps the reads
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2], mean = [&] {
    double s = 0;
    for (double x : ms) s += x;
    return s / double(ms.size());
  }();
  const double bytes = weight_bytes + kv_bytes;
  const int threads = omp_get_max_threads();
  // libgomp's default lets a waiting thread spin: on cores shared with other work a spinning thread burns the
  // time slice its descheduled partner needs, and every barrier of the decode can then cost milliseconds.
  const char* wait_env = std::getenv("OMP_WAIT_POLICY");
  const std::string wait_policy = wait_env && *wait_env ? wait_env : "default";
  std::sort(stream_rates.begin(), stream_rates.end());
  const double stream = stream_rates[stream_rates.size() / 2];  // median, like the decode time
  const double roofline_ms = 1e3 * bytes / stream;
  const char* weights_name = llama::weight_type_name(model.layer(0).q.type);
  std::printf("model: %td layers, H %td, G %td, D %td, hidden %td, intermediate %td, vocab %td; weights %s, kv %s\n",
              c.layers, c.heads, c.kv_heads, c.head_dim, c.hidden, c.intermediate, c.vocab, weights_name, kv_name);
  if (prefill > 0)
    std::printf("prefill of %td tokens in chunks of %td: %.3f s median of 3 = %.1f tokens/s, %d threads\n", prefill,
                chunk, prefill_s, double(prefill) / prefill_s, threads);
  std::printf("decode at context %td: %.3f ms/token median (mean %.3f, min %.3f) over %td tokens, %d threads\n",
              context, median, mean, sorted.front(), tokens, threads);
  std::printf("bytes read per token: weights %.1f MB (%s) + KV cache %.1f MB = %.1f MB -> %.2f GB/s\n",
              weight_bytes / 1e6, weights_name, kv_bytes / 1e6, bytes / 1e6, bytes / median / 1e6);
  std::printf("stream read of %.1f MB between the steps, %d threads: %.2f GB/s median (best %.2f) -> floor "
              "%.3f ms/token; floor / median = %.3f of the stream rate reached (median / floor = %.3f)\n", bytes / 1e6,
              threads, stream / 1e9, stream_rates.back() / 1e9, roofline_ms, roofline_ms / median, median / roofline_ms);
  std::printf("bench context=%td tokens=%td kv=%s threads=%d wait_policy=%s ms_per_token=%.4f weight_bytes=%.0f "
              "kv_bytes=%.0f bytes_per_token=%.0f stream_GBps=%.3f roofline_ms=%.4f ratio=%.4f weights=%s "
              "floor_fraction=%.4f prefill_tokens=%td prefill_chunk=%td prefill_tokens_per_s=%.2f\n", context, tokens,
              kv_name, threads, wait_policy.c_str(), median, weight_bytes, kv_bytes, bytes, stream / 1e9, roofline_ms,
              median / roofline_ms, weights_name, roofline_ms / median, prefill, prefill > 0 ? chunk : 0,
              prefill > 0 ? double(prefill) / prefill_s : 0.0);
}

/// tokenize: the ids of --text FILE on stdout as an ids file, the count and the encode time on stderr.
void tokenize(const Args& a) {
  const llama::Encoder encoder = open_encoder(a.dir, "--text");
  const std::string text = read_file(a.text("--text"));
  const auto t0 = Clock::now();
  const std::vector<std::int32_t> ids = encoder.encode(text);
  const double s = seconds_since(t0);
  for (std::size_t i = 0; i < ids.size(); ++i)
    std::printf("%d%c", ids[i], i % 20 == 19 || i + 1 == ids.size() ? '\n' : ' ');
  std::fprintf(stderr, "tokenize: %zu tokens from %zu bytes in %.4f s (%.2f MB/s)\n", ids.size(), text.size(), s,
               double(text.size()) / 1e6 / s);
}

template <typename KV>
void run(const llama::Model& model, const Args& a, const char* kv_name) {
  if (a.mode == "generate") generate<KV>(model, a);
  if (a.mode == "perplexity") perplexity<KV>(model, a);
  if (a.mode == "bench") bench<KV>(model, a, kv_name);
}

/// The mode of `a` with the KV cache type of --kv.
void run_model(const llama::Model& model, const Args& a) {
  if (a.text("--kv", "f32") == "bf16")
    run<gqa::bfloat16>(model, a, "bf16");
  else if (a.text("--kv") == "f16")
    run<gqa::half>(model, a, "f16");
  else if (a.text("--kv") == "i8")
    run<std::int8_t>(model, a, "i8");
  else
    run<float>(model, a, "f32");
}

#ifdef GQA_DECODER_MPI
/// Whether the command line has --tensor-parallel in a flag's place (as parse() reads it): decided before parsing,
/// so that MPI is initialised first and a usage error is printed by one rank.
bool wants_tensor_parallel(int argc, char** argv) {
  for (int i = 3; i < argc; i += std::string(argv[i]) == "--tensor-parallel" ? 1 : 2)
    if (std::string(argv[i]) == "--tensor-parallel") return true;
  return false;
}

/// One rank's run of a --tensor-parallel command (see the header comment and examples/model/tensor_parallel.hpp
/// for how the ranks end together on an error); returns the exit status.
int run_tensor_parallel(llama::TensorParallel& group, int argc, char** argv) {
  std::string what;  // the error's message
  int status = 1;
  try {
    const Args a = parse(argc, argv);
    if (a.help) {  // every rank takes this branch (the same argv); only rank 0's stdout is kept
      std::fputs(usage_text, stdout);
      return 0;
    }
    if (a.has("--threads")) omp_set_num_threads(tool_cli::parse_threads("--threads", a.text("--threads")));
    const llama::Config config = llama::read_config(a.dir);
    const llama::Model model = load_model(a, group.shard(config));
    run_model(model, a);
    if (!group.agreed() && group.agree(true) < group.size()) return 1;  // no forward pass ran: agree here
    const gqa::DistributedStats& st = group.stats();
    std::printf("tensor parallel: %d ranks; rank 0 sent %.1f KB and received %.1f KB in %llu all-reduces\n",
                group.size(), double(st.bytes_sent) / 1e3, double(st.bytes_received) / 1e3,
                static_cast<unsigned long long>(st.messages));
    return 0;
  } catch (const llama::PeerFailed&) {
    return 1;  // the rank that failed prints why
  } catch (const usage_error& e) {
    what = printable(e.what());
    status = 2;
  } catch (const std::exception& e) {
    what = printable(e.what());
  }
  if (group.agreed()) {  // during the forward passes: the other ranks may be waiting in an all-reduce
    std::fprintf(stderr, "example_decoder: rank %d of %d: %s\n", group.rank(), group.size(), what.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, status);
  }
  if (group.agree(false) == group.rank())  // the lowest rank that failed says why
    std::fprintf(stderr, "example_decoder: %s\n%s", what.c_str(), status == 2 ? usage_text : "");
  return status;
}

int main_tensor_parallel(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    llama::TensorParallel group(MPI_COMM_WORLD);
    // Only rank 0 prints results: the others' stdout goes nowhere (their errors still reach stderr).
    if (group.rank() != 0 && !std::freopen("/dev/null", "w", stdout)) std::fclose(stdout);
    status = run_tensor_parallel(group, argc, argv);
  }
  MPI_Finalize();
  return status;
}
#endif

}  // namespace

int main(int argc, char** argv) {
#ifdef GQA_DECODER_MPI
  if (wants_tensor_parallel(argc, argv)) return main_tensor_parallel(argc, argv);
#endif
  try {
    const Args a = parse(argc, argv);
    if (a.help) {
      std::fputs(usage_text, stdout);
      return 0;
    }
    if (a.tensor_parallel)
      throw usage_error("--tensor-parallel: this example_decoder was built without MPI (CMake found none; install "
                        "Open MPI, Debian: libopenmpi-dev openmpi-bin, and configure again)");
    if (a.mode == "tokenize") {  // the tokenizer alone: no model is loaded
      tokenize(a);
      return 0;
    }
    if (a.has("--threads")) omp_set_num_threads(tool_cli::parse_threads("--threads", a.text("--threads")));
    const llama::Model model = load_model(a, {});
    run_model(model, a);
    return 0;
  } catch (const usage_error& e) {
    std::fprintf(stderr, "example_decoder: %s\n%s", printable(e.what()).c_str(), usage_text);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "example_decoder: %s\n", printable(e.what()).c_str());
    return 1;
  }
}
