// Tests of the example tokenizer (examples/model/encoder.hpp: text -> ids; examples/model/tokenizer.hpp: ids ->
// text):
//   * ids identical to Hugging Face `tokenizers` on the cases of tests/data/tokenizer_expected.json, for a byte-level
//     BPE tokenizer.json in Llama 3's form, a SentencePiece-style one in both of its forms (Prepend + Replace
//     normalizer; Metaspace pre-tokenizer, with and without its split) and one with every Split behavior. The files
//     and the ids were written once by bench/tokenizer_cases.py with the tokenizers package, so this test needs no
//     Python;
//   * merges in the older "a b" string form give the same ids as the [a, b] form;
//   * refusals, by name, of what the encoder does not implement or the file gets wrong;
//   * memory bounded by the file's content (issue 24 row 13: a 104-byte tokenizer.json holding id 2^24 made the
//     Detokenizer allocate 534 MB), counted through this binary's operator new.
// When tests/CMakeLists.txt passes GQA_DECODER_EXE, example_decoder's text modes (tokenize, generate --prompt,
// perplexity --text) are run end to end against their ids forms.
#include "../examples/model/encoder.hpp"
#include "../examples/model/tokenizer.hpp"

#include "support/checkpoint_fixtures.hpp"
#include "support/command.hpp"
#include "support/llama_fixture.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include <sys/wait.h>

// Bytes requested through operator new while `counting` is set: the allocation bound of row 13. Every
// non-aligned form is replaced, so that no allocation of one runtime (a sanitizer's, say) meets a release of the
// other; the aligned forms stay the runtime's, in pairs.
namespace {
std::atomic<bool> counting{false};
std::atomic<std::size_t> requested{0};
void* counted_malloc(std::size_t n) noexcept {
  if (counting) requested += n;
  return std::malloc(n ? n : 1);
}
}  // namespace
void* operator new(std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
// GCC (12) sees the replaced pairs' malloc/free through inlining and warns of a mismatch that is not one.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using gqa_test::TempDir;
using Json = nlohmann::json;

Json read_json(const std::string& name) {
  std::ifstream in(fs::path(GQA_TEST_DATA_DIR) / name, std::ios::binary);
  REQUIRE(in);
  return Json::parse(in);
}

// The files of bench/tokenizer_cases.py; all but the last have a BOS template.
const char* const tokenizer_files[] = {"tokenizer_byte_level.json", "tokenizer_sentencepiece.json",
                                       "tokenizer_metaspace.json", "tokenizer_metaspace_split.json",
                                       "tokenizer_splits.json"};
const auto templated_files = gqa::span<const char* const>(tokenizer_files, 4);

/// The message of the gqa::format_error that parsing `j` throws ("" if none).
std::string refusal(const Json& j) {
  try {
    llama::Encoder::parse(j);
  } catch (const gqa::format_error& e) {
    return e.what();
  }
  return "";
}

/// A minimal byte-level tokenizer.json: the 256 byte characters and the merge "a b" -> "ab".
Json tiny_byte_level() {
  Json vocab = Json::object();
  const auto& chars = llama::encoder_detail::byte_level_chars();
  for (int b = 0; b < 256; ++b) vocab[chars[size_t(b)]] = b;
  vocab["ab"] = 256;
  return Json{{"version", "1.0"},
              {"added_tokens", Json::array()},
              {"normalizer", nullptr},
              {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"post_processor", nullptr},
              {"decoder", nullptr},
              {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", Json::array({Json::array({"a", "b"})})}}}};
}

}  // namespace

TEST_CASE("encoder ids equal tokenizers' on the stored cases", "[tokenizer]") {
  const Json expected = read_json("tokenizer_expected.json");
  const auto& cases = expected.at("cases");
  REQUIRE(cases.size() >= 20);
  for (const char* file : tokenizer_files) {
    DYNAMIC_SECTION(file) {
      const llama::Encoder e = llama::Encoder::parse(read_json(file), file);
      const auto& ids = expected.at(file);
      REQUIRE(ids.size() == cases.size());
      for (std::size_t i = 0; i < cases.size(); ++i) {
        INFO("case " << i << ": \"" << cases[i].get<std::string>() << "\"");
        CHECK(e.encode(cases[i].get<std::string>()) == ids[i].get<std::vector<std::int32_t>>());
      }
    }
  }
}

TEST_CASE("encoder without special tokens leaves out the template's BOS", "[tokenizer]") {
  const Json expected = read_json("tokenizer_expected.json");
  for (const char* file : templated_files) {
    DYNAMIC_SECTION(file) {
      const llama::Encoder e = llama::Encoder::parse(read_json(file), file);
      const std::string text = expected["cases"][2];
      const auto with = expected[file][2].get<std::vector<std::int32_t>>();
      REQUIRE(with.size() > 1);
      CHECK(e.encode(text, false) == std::vector<std::int32_t>(with.begin() + 1, with.end()));
    }
  }
}

TEST_CASE("merges in the \"a b\" string form give the ids of the [a, b] form", "[tokenizer]") {
  const Json expected = read_json("tokenizer_expected.json");
  for (const char* file : tokenizer_files) {
    DYNAMIC_SECTION(file) {
      Json j = read_json(file);
      Json strings = Json::array();
      for (const auto& m : j["model"]["merges"])
        strings.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      strings.insert(strings.begin(), "#version: 0.2");  // skipped, as tokenizers skips it
      j["model"]["merges"] = strings;
      const llama::Encoder e = llama::Encoder::parse(j, file);
      for (std::size_t i = 0; i < expected["cases"].size(); ++i)
        CHECK(e.encode(expected["cases"][i].get<std::string>()) == expected[file][i].get<std::vector<std::int32_t>>());
    }
  }
}

TEST_CASE("encoder: byte-level BPE merges, ignore_merges and the GPT-2 split", "[tokenizer]") {
  Json j = tiny_byte_level();
  j["model"]["vocab"]["abc"] = 257;  // in the vocab, but no merge makes it
  const llama::Encoder merged = llama::Encoder::parse(j);
  CHECK(merged.encode("ab ab") == std::vector<std::int32_t>{256, 32, 256});  // "ab", " ab": the space is byte 32
  CHECK(merged.encode("aab") == std::vector<std::int32_t>{97, 256});
  CHECK(merged.encode("abc") == std::vector<std::int32_t>{256, 99});
  j["model"]["ignore_merges"] = true;  // a word found whole in the vocab is that one id
  CHECK(llama::Encoder::parse(j).encode("abc") == std::vector<std::int32_t>{257});
}

TEST_CASE("encoder refuses what it does not implement, by name", "[tokenizer]") {
  const Json sp = read_json("tokenizer_sentencepiece.json");
  const Json bl = read_json("tokenizer_byte_level.json");
  struct Case {
    const char* what;
    Json file;
    const char* named;
  };
  std::vector<Case> cases;
  const auto with = [](Json j, const Json::json_pointer& at, const Json& v) {
    j[at] = v;
    return j;
  };
  cases.push_back({"Unigram", with(sp, "/model/type"_json_pointer, "Unigram"), "\"Unigram\""});
  cases.push_back({"WordPiece", with(sp, "/model/type"_json_pointer, "WordPiece"), "\"WordPiece\""});
  cases.push_back({"NFC normalizer", with(sp, "/normalizer"_json_pointer, {{"type", "NFC"}}), "\"NFC\""});
  cases.push_back({"Lowercase in a Sequence",
                   with(sp, "/normalizer/normalizers/1"_json_pointer, {{"type", "Lowercase"}}),
                   "normalizers[1]"});
  cases.push_back({"Whitespace pre-tokenizer", with(sp, "/pre_tokenizer"_json_pointer, {{"type", "Whitespace"}}),
                   "\"Whitespace\""});
  cases.push_back({"RobertaProcessing", with(sp, "/post_processor"_json_pointer, {{"type", "RobertaProcessing"}}),
                   "\"RobertaProcessing\""});
  cases.push_back({"an unknown ByteLevel option",
                   with(bl, "/pre_tokenizer/pretokenizers/1/lowercase"_json_pointer, true),
                   "\"lowercase\""});
  cases.push_back({"an unknown Split behavior",
                   with(bl, "/pre_tokenizer/pretokenizers/0/behavior"_json_pointer, "Fused"),
                   "\"Fused\""});
  cases.push_back({"a Split pattern that does not compile",
                   with(bl, "/pre_tokenizer/pretokenizers/0/pattern"_json_pointer, {{"Regex", "(\\p{L"}}), "(\\p{L"});
  cases.push_back({"BPE dropout", with(sp, "/model/dropout"_json_pointer, 0.1), "\"dropout\""});
  cases.push_back({"continuing_subword_prefix", with(sp, "/model/continuing_subword_prefix"_json_pointer, "##"),
                   "continuing_subword_prefix"});
  cases.push_back({"truncation", with(sp, "/truncation"_json_pointer, {{"max_length", 8}}), "\"truncation\""});
  cases.push_back({"padding", with(sp, "/padding"_json_pointer, {{"pad_id", 0}}), "\"padding\""});
  cases.push_back({"an unknown top-level key", with(sp, "/foo"_json_pointer, 1), "\"foo\""});
  cases.push_back({"version 2.0", with(sp, "/version"_json_pointer, "2.0"), "\"2.0\""});
  cases.push_back({"an added token whose id tokenizers assigns differently",
                   with(bl, "/added_tokens/2/id"_json_pointer, 700), "[mask]"});
  cases.push_back({"an added token without its lstrip flag",
                   [&] {
                     Json j = bl;
                     j["added_tokens"][1].erase("lstrip");
                     return j;
                   }(),
                   "added_tokens[1]: no boolean \"lstrip\""});
  cases.push_back({"a merge of pieces not in the vocab",
                   with(sp, "/model/merges/0"_json_pointer, Json::array({"zz", "qq"})), "\"zz\""});
  cases.push_back({"a merge string of three pieces", with(sp, "/model/merges/0"_json_pointer, "a b c"), "\"a b c\""});
  cases.push_back({"a vocab id of 2^31", with(sp, "/model/vocab/<s>"_json_pointer, 2147483648LL), "2147483648"});
  cases.push_back({"a negative vocab id", with(sp, "/model/vocab/<s>"_json_pointer, -1), "-1"});
  cases.push_back({"a template reading sequence B",
                   with(sp, "/post_processor/single/1/Sequence/id"_json_pointer, "B"), "single[1]"});
  cases.push_back({"Metaspace prepend_scheme",
                   with(read_json("tokenizer_metaspace.json"), "/pre_tokenizer/prepend_scheme"_json_pointer,
                        "sometimes"),
                   "\"sometimes\""});
  for (const Case& c : cases) {
    INFO(c.what);
    CHECK_THAT(refusal(c.file), Contains(c.named) && Contains("[gqa.decoder.tokenizer]"));
  }
}

TEST_CASE("encoder refuses text that is not UTF-8, naming the byte", "[tokenizer]") {
  const llama::Encoder e = llama::Encoder::parse(read_json("tokenizer_byte_level.json"));
  CHECK_THROWS_WITH(e.encode("ok \xC3\x28 no"), Contains("not valid UTF-8 at byte 3"));
  CHECK_THROWS_AS(e.encode(std::string("\xED\xA0\x80", 3)), gqa::invalid_argument);  // a surrogate
}

TEST_CASE("tokenizer memory is bounded by the file's content (row 13)", "[tokenizer]") {
  TempDir dir;
  // The repro: 104 bytes, one piece with id 2^24; before the fix the Detokenizer allocated 534 MB for it.
  const std::string file =
      R"({"model":{"vocab":{"a":16777216}},"added_tokens":[],"decoder":{"type":"ByteLevel"},"normalizer":null})";
  gqa_test::write_text(dir / "tokenizer.json", file);
  // The encoder reads the same id with the fields it needs besides (the model type, the merges).
  TempDir enc;
  gqa_test::write_text(enc / "tokenizer.json", R"({"model":{"type":"BPE","vocab":{"a":16777216},"merges":[]}})");
  requested = 0;
  counting = true;
  std::optional<llama::Detokenizer> d = llama::Detokenizer::open(dir.path());
  std::optional<llama::Encoder> e = llama::Encoder::open(enc.path());
  counting = false;
  INFO("bytes requested: " << requested.load());
  CHECK(requested.load() < (std::size_t(1) << 20));
  REQUIRE(d.has_value());
  const std::int32_t id = 1 << 24;
  CHECK(d->decode(gqa::span<const std::int32_t>(&id, 1)) == "a");
  REQUIRE(e.has_value());
  CHECK(e->encode("a", false) == std::vector<std::int32_t>{id});
}

TEST_CASE("detokenizer refuses ids outside [0, 2^31), naming the piece", "[tokenizer]") {
  TempDir dir;
  for (const char* id : {"-1", "2147483648", "\"7\"", "1.5"}) {
    gqa_test::write_text(dir / "tokenizer.json", std::string(R"({"model":{"vocab":{"piece":)") + id + "}}}");
    CHECK_THROWS_WITH(llama::Detokenizer::open(dir.path()), Contains("\"piece\"") && Contains(id));
  }
  gqa_test::write_text(dir / "tokenizer.json",
                       R"({"model":{"vocab":{"a":0}},"added_tokens":[{"id":-5,"content":"<x>"}]})");
  CHECK_THROWS_WITH(llama::Detokenizer::open(dir.path()), Contains("\"<x>\"") && Contains("-5"));
}

#ifdef GQA_DECODER_EXE
namespace {
using Run = gqa_test::CommandRun;
Run run_decoder(const std::string& args) {
  return gqa_test::run_command(std::string("'") + GQA_DECODER_EXE + "' " + args + " 2>/dev/null");
}
std::string line_with(const std::string& out, const std::string& start) {
  const auto at = out.find(start);
  return at == std::string::npos ? "" : out.substr(at, out.find('\n', at) - at);
}
}  // namespace

TEST_CASE("example_decoder: tokenize, generate --prompt and perplexity --text encode with tokenizer.json",
          "[tokenizer][cli]") {
  TempDir dir;
  gqa_test::LlamaFixture f;
  f.vocab = 700;  // the SentencePiece-style vocabulary has 679 ids
  f.write(dir.path());
  gqa_test::write_text(dir / "tokenizer.json", read_json("tokenizer_sentencepiece.json").dump());
  const std::string text = "The kettle clicked off just as the phone started ringing.";
  gqa_test::write_text(dir / "text.txt", text);
  const llama::Encoder e = *llama::Encoder::open(dir.path());
  const std::vector<std::int32_t> ids = e.encode(text);
  std::string ids_text;
  for (const auto id : ids) ids_text += std::to_string(id) + " ";
  gqa_test::write_text(dir / "ids.txt", ids_text);
  const std::string model = "'" + dir.path().string() + "' ";

  const Run tok = run_decoder(model + "tokenize --text '" + (dir / "text.txt").string() + "'");
  REQUIRE(tok.status == 0);
  std::vector<std::int32_t> printed;
  std::istringstream words(tok.output);
  for (std::int32_t id; words >> id;) printed.push_back(id);
  CHECK(printed == ids);

  const Run by_text = run_decoder(model + "generate --max-new 3 --prompt '" + text + "'");
  const Run by_ids = run_decoder(model + "generate --max-new 3 --prompt-ids '" + (dir / "ids.txt").string() + "'");
  REQUIRE(by_text.status == 0);
  REQUIRE(by_ids.status == 0);
  CHECK(line_with(by_text.output, "generated ids:") == line_with(by_ids.output, "generated ids:"));
  CHECK(line_with(by_text.output, "generated ids:") != "");

  const Run ppl_text = run_decoder(model + "perplexity --text '" + (dir / "text.txt").string() + "'");
  const Run ppl_ids = run_decoder(model + "perplexity --ids '" + (dir / "ids.txt").string() + "'");
  REQUIRE(ppl_text.status == 0);
  CHECK(line_with(ppl_text.output, "perplexity ") == line_with(ppl_ids.output, "perplexity "));
  CHECK(line_with(ppl_text.output, "perplexity ") != "");

  CHECK(run_decoder(model + "generate --prompt x --prompt-ids '" + (dir / "ids.txt").string() + "'").status == 2);
  CHECK(run_decoder(model + "perplexity --text '" + (dir / "nowhere.txt").string() + "'").status == 1);
  fs::remove(dir / "tokenizer.json");
  CHECK(run_decoder(model + "generate --prompt hello").status == 1);
}
#endif
