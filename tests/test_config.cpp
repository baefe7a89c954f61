// Tests of the model code's config reader (examples/model/config.hpp) and of what llama::Model does with it:
//   * conformance: tiny random checkpoints (tests/support/llama_fixture.hpp, 2 layers, H = 8, G = 2, D = 16) in
//     each config form transformers 5 reads for llama, mistral and qwen2 (rope_parameters with every rope_type,
//     the older rope_theta + rope_scaling, partial_rotary_factor, layer_types, sliding_window per model type, a
//     config.json exactly as transformers' save_pretrained writes it), whose logits, in one prefill and token by
//     token, are compared with transformers' on the same files, stored in tests/data/config_conformance.json by
//     bench/config_conformance.py (which gets the files from this binary: see "conformance fixture writer");
//   * refusals by name: model_type not a string, eos ids outside [0, 2^31), conflicting rotary fields, layer types
//     transformers fails on, rope types not implemented; control bytes escaped in the messages.
#include "../examples/model/llama.hpp"

#include "support/llama_fixture.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using gqa::Index;
using gqa_test::LlamaFixture;
using gqa_test::TempDir;
using Json = nlohmann::ordered_json;

const fs::path data_dir = fs::path(GQA_SOURCE_DIR) / "tests" / "data";

Json read_json(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE(in);
  return Json::parse(in);
}

/// One config form. `overrides` replace or add config.json fields; `removed` drops generated ones.
struct Form {
  const char* name;
  const char* model_type;
  const char* overrides;  // JSON object text
  std::vector<std::string> removed;
  bool saved_by_transformers = false;  // config.json: tests/data/llama_config_transformers5.json as is
};

const char* const rope_v5 = "rope_theta";  // transformers 5 writes no top-level rope_theta

const Form forms[] = {
    {"rope_parameters default", "llama", R"({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})",
     {rope_v5}},
    {"rope_parameters linear", "llama", R"({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear",
      "factor": 2.0}})", {rope_v5}},
    {"rope_parameters dynamic", "llama", R"({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "dynamic",
      "factor": 4.0}})", {rope_v5}},
    {"rope_parameters yarn", "llama", R"({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn",
      "factor": 4.0, "original_max_position_embeddings": 16}})", {rope_v5}},
    {"rope_parameters yarn, every parameter", "llama", R"({"rope_parameters": {"rope_theta": 50000.0,
      "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
      "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": false}})", {rope_v5}},
    {"rope_parameters llama3", "llama", R"({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})",
     {rope_v5}},
    {"rope_parameters longrope", "llama", R"({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "longrope",
      "factor": 2.0, "original_max_position_embeddings": 32,
      "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
      "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}})", {rope_v5}},
    {"rope_scaling linear (older form)", "llama",
     R"({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})", {}},
    {"rope_scaling yarn (older form)", "qwen2", R"({"rope_theta": 20000.0, "rope_scaling": {"rope_type": "yarn",
      "factor": 4.0, "original_max_position_embeddings": 16}})", {}},
    {"partial_rotary_factor with default (transformers ignores it)", "llama",
     R"({"partial_rotary_factor": 0.5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
      "partial_rotary_factor": 0.5}})", {rope_v5}},
    {"llama sliding_window (ignored)", "llama", R"({"sliding_window": 8})", {}},
    {"llama layer_types + sliding_window (ignored)", "llama",
     R"({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]})", {}},
    {"qwen2 layer_types", "qwen2", R"({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 0,
      "layer_types": ["sliding_attention", "full_attention"]})", {}},
    {"qwen2 max_window_layers", "qwen2",
     R"({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1})", {}},
    {"qwen2 sliding_window without use_sliding_window", "qwen2", R"({"sliding_window": 8})", {}},
    {"mistral sliding_window", "mistral", R"({"sliding_window": 8})", {}},
    {"config.json as transformers 5 saves it", "llama", "{}", {}, true},
};

constexpr Index tokens = 40;  // past longrope's and yarn's original_max_position_embeddings (32, 16)

std::vector<std::int32_t> conformance_ids(Index vocab) {
  std::vector<std::int32_t> ids;
  for (Index i = 0; i < tokens; ++i) ids.push_back(std::int32_t((i * 37 + 11) % vocab));
  return ids;
}

LlamaFixture fixture(const Form& form) {
  LlamaFixture f;
  f.model_type = form.model_type;
  f.biases = f.model_type == "qwen2";  // Qwen2's q/k/v projections always have biases
  f.config_overrides = Json::parse(form.overrides);
  f.config_removals = form.removed;
  if (form.saved_by_transformers) f.config_file = read_json(data_dir / "llama_config_transformers5.json");
  return f;
}

enum class Mode { prefill, chunked, decode };

/// [tokens, vocab] logits: one prefill; a prefill in chunks of 16 told the whole length (Model::forward's
/// call_length, as llama::perplexity does), which must equal the one prefill; or token by token (one forward call
/// per token, as transformers with a cache in generate()).
llama::Matrix run(const llama::Model& m, const std::vector<std::int32_t>& ids, Mode mode) {
  llama::State<float> state(m.config(), tokens);
  llama::Matrix all(tokens, m.config().vocab), step;
  if (mode == Mode::prefill) {
    m.forward(gqa::span<const std::int32_t>(ids.data(), tokens), state, &all, true);
    return all;
  }
  if (mode == Mode::chunked) {
    for (Index s = 0; s < tokens; s += 16) {
      const Index n = std::min<Index>(16, tokens - s);
      m.forward(gqa::span<const std::int32_t>(ids.data() + s, n), state, &step, true, tokens);
      all.middleRows(s, n) = step;
    }
    return all;
  }
  for (Index s = 0; s < tokens; ++s) {
    m.forward(gqa::span<const std::int32_t>(ids.data() + s, 1), state, &step);
    all.row(s) = step.row(0);
  }
  return all;
}

double logsumexp(const llama::Matrix& x, Index row) {
  const double mx = x.row(row).maxCoeff();
  double sum = 0;
  for (Index i = 0; i < x.cols(); ++i) sum += std::exp(double(x(row, i)) - mx);
  return mx + std::log(sum);
}

struct Agreement {
  double max_abs = 0, max_rel = 0, worst_ratio = 0;  // ratio: |a - b| / (atol + rtol |b|); <= 1 passes
};

/// The stored positions' first columns and log-sum-exp over the whole vocabulary, against `expected`.
Agreement compare(const llama::Matrix& got, const Json& expected, const Json& positions, double atol, double rtol) {
  Agreement a;
  const auto one = [&](double g, double e) {
    const double d = std::abs(g - e);
    a.max_abs = std::max(a.max_abs, d);
    a.max_rel = std::max(a.max_rel, d / std::max(std::abs(e), 1e-30));
    a.worst_ratio = std::max(a.worst_ratio, d / (atol + rtol * std::abs(e)));
  };
  for (size_t k = 0; k < positions.size(); ++k) {
    const Index p = positions[k].get<Index>();
    const Json& row = expected["logits"][k];
    for (size_t c = 0; c < row.size(); ++c) one(got(p, Index(c)), row[c].get<double>());
    one(logsumexp(got, p), expected["logsumexp"][k].get<double>());
  }
  return a;
}

Json logits_json(const llama::Matrix& m) {
  Json rows = Json::array();
  for (Index r = 0; r < m.rows(); ++r) rows.push_back(std::vector<float>(m.row(r).data(), m.row(r).data() + m.cols()));
  return rows;
}

}  // namespace

// Float32 C++ against float32 transformers (eager attention) through 2 layers: measured max abs difference
// <= 1e-5 on logits of magnitude ~1 (bench/config_conformance.py prints it per case). atol = rtol = 1e-4 leaves
// a 10x margin, while each wrong reading it guards moves logits by 1e-2 or more (theta 10000 instead of 100000,
// a window applied to a Llama or to every Qwen2 layer, a missing yarn attention factor, short factors instead of
// long: checked below by comparing forms with each other).
TEST_CASE("config forms give transformers' logits", "[config][conformance]") {
  const Json expected = read_json(data_dir / "config_conformance.json");
  for (const Form& form : forms) {
    DYNAMIC_SECTION(form.name) {
      TempDir dir;
      LlamaFixture f = fixture(form);
      f.write(dir.path());
      const auto ids = conformance_ids(f.vocab);
      REQUIRE(expected["ids"] == Json(ids));
      REQUIRE(expected["cases"].contains(form.name));
      const Json& want = expected["cases"][form.name];
      const llama::Model m = llama::Model::load(dir.path());
      for (const auto& [mode, stored] : {std::pair{Mode::prefill, "prefill"}, std::pair{Mode::chunked, "prefill"},
                                         std::pair{Mode::decode, "decode"}}) {
        const Agreement a = compare(run(m, ids, mode), want[stored], expected["positions"], 1e-4, 1e-4);
        INFO(int(mode) << " (0 prefill, 1 chunked, 2 decode): max abs " << a.max_abs << ", max rel " << a.max_rel);
        CHECK(a.worst_ratio <= 1);
      }
    }
  }
}

// The stored values tell the forms apart: a reader that ignored a form's field would land on another form's (or
// the plain default's) numbers, far outside the tolerance. Each pair differs in one reading.
TEST_CASE("the conformance cases can fail", "[config][conformance]") {
  const Json expected = read_json(data_dir / "config_conformance.json");
  const auto distance = [&](const char* a, const char* mode_a, const char* b, const char* mode_b) {
    const Json& x = expected["cases"][a][mode_a]["logits"];
    const Json& y = expected["cases"][b][mode_b]["logits"];
    double d = 0;
    for (size_t k = 0; k < x.size(); ++k)
      for (size_t c = 0; c < x[k].size(); ++c) d = std::max(d, std::abs(x[k][c].get<double>() - y[k][c].get<double>()));
    return d;
  };
  const auto far = [&](const char* a, const char* b, const char* mode_b = "prefill") {
    const double d = distance(a, "prefill", b, mode_b);
    INFO(a << " vs " << b << " (" << mode_b << "): max abs " << d);
    CHECK(d > 1e-2);
  };
  const char* plain = "llama sliding_window (ignored)";  // theta 10000, no window: the old reader's answer
  far("rope_parameters default", plain);                 // theta 1e5 read from rope_parameters
  far("rope_parameters linear", plain);
  far("rope_parameters yarn", "rope_parameters linear");
  far("rope_parameters yarn, every parameter", "rope_parameters yarn");
  far("rope_parameters llama3", plain);
  far("rope_parameters longrope", "rope_parameters llama3");
  far("rope_parameters longrope", "rope_parameters longrope", "decode");  // long factors vs short ones first
  far("rope_scaling linear (older form)", "rope_parameters linear");      // theta 5e5
  far("mistral sliding_window", plain);                                    // the window Llama ignores
  far("qwen2 layer_types", "qwen2 sliding_window without use_sliding_window");
  far("qwen2 max_window_layers", "qwen2 sliding_window without use_sliding_window");
  // And transformers' own equalities: dynamic equals default below max_position_embeddings; Llama ignores its
  // window and a partial_rotary_factor under "default".
  CHECK(distance("rope_parameters dynamic", "prefill", plain, "prefill") < 1e-4);
  CHECK(distance("partial_rotary_factor with default (transformers ignores it)", "prefill", plain, "prefill") < 1e-4);
  CHECK(distance("llama layer_types + sliding_window (ignored)", "prefill", plain, "prefill") < 1e-4);
}

// What bench/config_conformance.py reads: with GQA_CONFORMANCE_OUT=DIR, writes each form's checkpoint into
// DIR/<n>/ (n: its index in `forms`), with name.txt, ids.txt and this code's logits (cpp.json, [tokens, vocab],
// prefill and decode). Hidden (run it by name: test_config "[.conformance-writer]").
TEST_CASE("conformance fixture writer", "[.conformance-writer]") {
  const char* out = std::getenv("GQA_CONFORMANCE_OUT");
  REQUIRE(out != nullptr);
  for (size_t n = 0; n < std::size(forms); ++n) {
    const fs::path dir = fs::path(out) / std::to_string(n);
    LlamaFixture f = fixture(forms[n]);
    f.write(dir);
    const auto ids = conformance_ids(f.vocab);
    gqa_test::write_text(dir / "name.txt", std::string(forms[n].name) + "\n");
    gqa_test::write_text(dir / "ids.txt", Json(ids).dump() + "\n");
    const llama::Model m = llama::Model::load(dir);
    const Json cpp = {{"prefill", logits_json(run(m, ids, Mode::prefill))},
                      {"decode", logits_json(run(m, ids, Mode::decode))}};
    gqa_test::write_text(dir / "cpp.json", cpp.dump() + "\n");
  }
}

namespace {

llama::Config parse(Json overrides, std::vector<std::string> removed = {}, const char* model_type = "llama") {
  LlamaFixture f;
  f.model_type = model_type;
  f.config_overrides = std::move(overrides);
  f.config_removals = std::move(removed);
  return llama::parse_config(f.config());
}

}  // namespace

TEST_CASE("rotary fields are read in both forms", "[config]") {
  CHECK(parse({{"rope_parameters", {{"rope_theta", 1e5}, {"rope_type", "default"}}}}, {"rope_theta"}).rope.theta == 1e5);
  CHECK(parse(Json::object(), {"rope_theta"}).rope.theta == 10000);  // transformers' default_theta
  // the top-level rope_theta fills a rope_parameters without one
  const llama::Config c = parse({{"rope_theta", 3e4}, {"rope_parameters", {{"rope_type", "linear"}, {"factor", 2}}}});
  CHECK(c.rope.theta == 3e4);
  CHECK(c.rope.type == "linear");
  CHECK(c.rope.factor == 2);
  // llama3 / yarn / longrope without original_max_position_embeddings: max_position_embeddings (64)
  CHECK(parse({{"rope_parameters", {{"rope_type", "yarn"}, {"factor", 4}}}}).rope.original_max_positions == 64);
  // yarn's attention factor 0.1 ln(factor) + 1, and cos/sin scaled by it
  const llama::Config y = parse({{"rope_parameters", {{"rope_type", "yarn"}, {"factor", 4}}}});
  CHECK(llama::detail::rotary_scaling(y) == Approx(0.1 * std::log(4.0) + 1).epsilon(1e-15));
}

TEST_CASE("windows per layer as transformers applies them per model type", "[config]") {
  using W = std::vector<Index>;
  CHECK(parse({{"sliding_window", 8}}).windows == W{0, 0});  // Llama ignores it
  CHECK(parse({{"sliding_window", 8}}, {}, "mistral").windows == W{8, 8});
  CHECK(parse(Json::object(), {}, "mistral").windows == W{4096, 4096});  // MistralConfig's default
  CHECK(parse({{"sliding_window", nullptr}}, {}, "mistral").windows == W{0, 0});
  CHECK(parse({{"sliding_window", 8}}, {}, "qwen2").windows == W{0, 0});  // no use_sliding_window
  CHECK(parse({{"sliding_window", 8}, {"use_sliding_window", true}}, {}, "qwen2").windows == W{0, 0});  // < 28
  CHECK(parse({{"sliding_window", 8}, {"use_sliding_window", true}, {"max_window_layers", 1}}, {}, "qwen2").windows ==
        W{0, 8});
  CHECK(parse({{"sliding_window", 8}, {"use_sliding_window", true},
               {"layer_types", {"sliding_attention", "full_attention"}}}, {}, "qwen2").windows == W{8, 0});
}

TEST_CASE("config fields the code cannot read faithfully are refused by name", "[config]") {
  struct Case {
    const char* what;
    Json overrides;
    const char* model_type;
    const char* expected;
  };
  const Json longrope = {{"rope_type", "longrope"}, {"short_factor", {1, 2}}, {"long_factor", {1, 2}}};
  const Case cases[] = {
      {"model_type not a string", {{"model_type", 7}}, "llama", "model_type = 7"},
      {"eos_token_id past 2^31", {{"eos_token_id", 4294967362ull}}, "llama", "eos_token_id\" = 4294967362"},
      {"eos_token_id negative in a list", {{"eos_token_id", {2, -1}}}, "llama", "eos_token_id\" entry = -1"},
      {"eos_token_id not an integer", {{"eos_token_id", "2"}}, "llama", "eos_token_id\" = \"2\""},
      {"sliding_window past 2^63", {{"sliding_window", 18446744073709551615ull}}, "mistral", "18446744073709551615"},
      {"rope_theta twice", {{"rope_theta", 1e4}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1e5}}}},
       "llama", "\"rope_theta\" = 10000"},
      {"rope_scaling and rope_parameters differ",
       {{"rope_scaling", {{"type", "linear"}, {"factor", 2}}}, {"rope_parameters", {{"rope_type", "default"}}}},
       "llama", "disagree"},
      {"rope_type unknown", {{"rope_parameters", {{"rope_type", "proportional"}}}}, "llama",
       "rope_type = \"proportional\""},
      {"partial rotary with linear", {{"rope_parameters", {{"rope_type", "linear"}, {"factor", 2}}},
                                      {"partial_rotary_factor", 0.5}}, "llama", "partial_rotary_factor = 0.5"},
      {"partial rotary past any integer", {{"rope_parameters", {{"rope_type", "linear"}, {"factor", 2},
                                                                {"partial_rotary_factor", 1e300}}}}, "llama",
       "partial_rotary_factor = 1e+300"},
      {"yarn beta_fast negative", {{"rope_parameters", {{"rope_type", "yarn"}, {"factor", 2}, {"beta_fast", -1}}}},
       "llama", "\"beta_fast\" = -1"},
      {"linear without factor", {{"rope_parameters", {{"rope_type", "linear"}}}}, "llama", "missing \"factor\""},
      {"longrope factors of the wrong length", {{"rope_parameters", longrope}}, "llama", "short_factor"},
      {"per-layer-type rope_parameters", {{"rope_parameters", {{"full_attention", {{"rope_type", "default"}}}}}},
       "llama", "full_attention"},
      {"mistral layer_types", {{"layer_types", {"full_attention", "full_attention"}}}, "mistral", "layer_types"},
      {"qwen2 sliding layer without use_sliding_window",
       {{"sliding_window", 8}, {"layer_types", {"sliding_attention", "full_attention"}}}, "qwen2",
       "use_sliding_window"},
      {"llama sliding layer without sliding_window", {{"layer_types", {"sliding_attention", "full_attention"}}},
       "llama", "sliding_window"},
      {"layer_types of the wrong length", {{"use_sliding_window", true}, {"layer_types", {"full_attention"}}}, "qwen2",
       "layer_types"},
      {"layer_types unknown", {{"use_sliding_window", true}, {"layer_types", {"full_attention", "chunked"}}}, "qwen2",
       "\"chunked\""},
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.what) {
      LlamaFixture f;
      f.model_type = c.model_type;
      f.config_overrides = c.overrides;
      bool typed = false;  // a format error or an unsupported value, nothing else
      try {
        llama::parse_config(f.config());
      } catch (const gqa::invalid_argument&) {
        typed = true;
      } catch (const gqa::format_error&) {
        typed = true;
      }
      CHECK(typed);
      CHECK_THROWS_WITH(llama::parse_config(f.config()), Contains("[gqa.decoder.") && Contains(c.expected));
    }
  }
}

// A NUL, a control byte and a non-ASCII letter in a config string come back escaped (ASCII only), never raw.
TEST_CASE("config values in messages are escaped", "[config]") {
  LlamaFixture f;
  f.config_overrides["model_type"] = std::string("ll\0a\x01ma\xC3\xA9", 9);
  try {
    llama::parse_config(f.config());
    FAIL("not refused");
  } catch (const gqa::invalid_argument& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Contains(R"("ll\u0000a\u0001ma\u00e9")"));
    CHECK(std::none_of(what.begin(), what.end(), [](char ch) { return (unsigned char)ch < 0x20 || (unsigned char)ch > 0x7E; }));
  }
}

// The same for bytes of a config.json that is not JSON at all: the parser's message quotes them.
TEST_CASE("a config.json that is not JSON is refused with its bytes escaped", "[config]") {
  TempDir dir;
  LlamaFixture f;
  f.write(dir.path());
  gqa_test::write_text(dir / "config.json", std::string("{\"vocab_size\": \xFF\x01\x00\xC3\xA9}", 21));
  try {
    (void)llama::Model::load(dir.path());
    FAIL("not refused");
  } catch (const gqa::format_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Contains("[gqa.decoder.config]") && Contains("not valid JSON"));
    CHECK(std::none_of(what.begin(), what.end(), [](char ch) { return (unsigned char)ch < 0x20 || (unsigned char)ch > 0x7E; }));
  }
}
