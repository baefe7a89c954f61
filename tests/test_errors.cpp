// Tests of gqa/errors.hpp: e.id() on every exception type, the ids that real API failures carry, and the id
// table gqa::error_ids against the source: every id that include/ can throw is listed, and every listed id is
// thrown somewhere. The source scan reads the headers from GQA_SOURCE_DIR (set by tests/CMakeLists.txt).
#include <catch2/catch.hpp>

#include "gqa/attention.hpp"
#include "gqa/convert.hpp"
#include "gqa/errors.hpp"
#include "gqa/kv_cache.hpp"
#include "gqa/safetensors.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

// ------------------------------------------------------------------------------------------- source scanning

/// The text with comments blanked out and string literals kept, so ids mentioned in comments do not count.
std::string strip_comments(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    if (s.compare(i, 2, "//") == 0) {
      while (i < s.size() && s[i] != '\n') ++i;
    } else if (s.compare(i, 2, "/*") == 0) {
      const std::size_t end = s.find("*/", i + 2);
      i = end == std::string::npos ? s.size() : end + 2;
    } else if (s[i] == '"' || s[i] == '\'') {
      const char quote = s[i];
      out += s[i++];
      while (i < s.size() && s[i] != quote) {
        if (s[i] == '\\' && i + 1 < s.size()) out += s[i++];
        out += s[i++];
      }
      if (i < s.size()) out += s[i++];
    } else {
      out += s[i++];
    }
  }
  return out;
}

/// The string literal starting at s[i] (a '"'), without its quotes; i moves past it.
std::string read_literal(const std::string& s, std::size_t& i) {
  std::string lit;
  for (++i; i < s.size() && s[i] != '"'; ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) ++i;
    lit += s[i];
  }
  ++i;
  return lit;
}

/// Position of the first top-level ',' or the closing ')' of the argument list opened just before `i`.
std::size_t end_of_first_argument(const std::string& s, std::size_t i) {
  int depth = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (c == '"') {
      read_literal(s, i);
      continue;
    }
    if (c == '\'') {
      i = s.find('\'', i + (s[i + 1] == '\\' ? 3 : 2)) + 1;
      continue;
    }
    if (c == '(' || c == '[' || c == '{') ++depth;
    if (c == ')' || c == ']' || c == '}') {
      if (depth == 0) return i;
      --depth;
    }
    if (c == ',' && depth == 0) return i;
    ++i;
  }
  return i;
}

bool is_dotted_id(const std::string& lit) {
  if (lit.empty() || lit.find('.') == std::string::npos || lit.front() == '.' || lit.back() == '.') return false;
  for (char c : lit)
    if (!((c >= 'a' && c <= 'z') || c == '_' || c == '.')) return false;
  return lit.find("..") == std::string::npos;
}

/// Ids ("gqa.shape") thrown by one file's code, from three forms: the id argument of detail::require
/// (`require<E>(cond, "shape", ...)`), a message literal starting "[gqa.<id>]", and a dotted literal in one of
/// the table's namespaces ("safetensors.header_json"), which is how ids reach helpers that throw on a caller's
/// behalf.
std::set<std::string> ids_in(const std::string& text, const std::set<std::string>& namespaces) {
  const std::string s = strip_comments(text);
  std::set<std::string> ids;
  for (std::size_t at = s.find("require"); at != std::string::npos; at = s.find("require", at + 1)) {
    const bool word_start = at == 0 || !(std::isalnum(static_cast<unsigned char>(s[at - 1])) || s[at - 1] == '_');
    std::size_t i = at + 7;
    if (!word_start || (i < s.size() && (std::isalnum(static_cast<unsigned char>(s[i])) || s[i] == '_'))) continue;
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    if (i < s.size() && s[i] == '<') i = s.find('>', i) + 1;
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    if (i >= s.size() || s[i] != '(') continue;
    i = end_of_first_argument(s, i + 1);
    if (i >= s.size() || s[i] != ',') continue;
    for (++i; i < s.size() && std::isspace(static_cast<unsigned char>(s[i])); ++i) {
    }
    if (i < s.size() && s[i] == '"') ids.insert("gqa." + read_literal(s, i));
  }
  for (std::size_t i = s.find('"'); i != std::string::npos; i = s.find('"', i)) {
    const std::string lit = read_literal(s, i);
    if (lit.rfind("[gqa.", 0) == 0 && lit.find(']') != std::string::npos) {
      ids.insert(lit.substr(1, lit.find(']') - 1));
    } else if (is_dotted_id(lit) && namespaces.count(lit.substr(0, lit.find('.')))) {
      ids.insert("gqa." + lit);
    }
  }
  return ids;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// id -> the files (relative to include/) whose code throws it, for every header under include/gqa.
std::map<std::string, std::set<std::string>> ids_in_headers() {
  std::set<std::string> namespaces;  // "safetensors", "checkpoint", ...: first parts of the table's dotted ids
  for (const gqa::ErrorId& e : gqa::error_ids) {
    const std::string id(e.id.substr(4));  // past "gqa."
    if (id.find('.') != std::string::npos) namespaces.insert(id.substr(0, id.find('.')));
  }
  const fs::path include = fs::path(GQA_SOURCE_DIR) / "include";
  std::map<std::string, std::set<std::string>> found;
  for (const auto& entry : fs::recursive_directory_iterator(include / "gqa")) {
    if (!entry.is_regular_file() || entry.path().extension() != ".hpp") continue;
    for (const std::string& id : ids_in(read_file(entry.path()), namespaces))
      found[id].insert(fs::relative(entry.path(), include).string());
  }
  return found;
}

template <typename E>
std::string id_of(void (*f)()) {
  try {
    f();
  } catch (const E& e) {
    return std::string(e.id());
  }
  return "(nothing thrown)";
}

}  // namespace

// ------------------------------------------------------------------------------------------------------- id()

TEST_CASE("id() is the bracketed prefix of what(), for every exception type", "[errors]") {
  CHECK(gqa::invalid_argument("[gqa.option] options.window = -1").id() == "gqa.option");
  CHECK(gqa::shape_error("[gqa.shape] k: dim 2").id() == "gqa.shape");
  CHECK(gqa::format_error("[gqa.safetensors.gap] x").id() == "gqa.safetensors.gap");
  CHECK(gqa::io_error("[gqa.io] open").id() == "gqa.io");
  // A message without the prefix has no id (rather than a guess).
  CHECK(gqa::invalid_argument("no id here").id().empty());
  CHECK(gqa::format_error("[gqa.unterminated").id().empty());
  CHECK(gqa::io_error("[other.id] x").id().empty());
  // detail::require builds the prefix from its id argument.
  try {
    gqa::detail::require<gqa::format_error>(false, "safetensors.dtype", "dtype 'X' unknown");
    FAIL("require(false) did not throw");
  } catch (const gqa::format_error& e) {
    CHECK(e.id() == "gqa.safetensors.dtype");
    CHECK(std::string(e.what()) == "[gqa.safetensors.dtype] dtype 'X' unknown");
  }
}

TEST_CASE("failures of the public API carry a listed id", "[errors]") {
  const std::string shape = id_of<gqa::shape_error>([] {
    gqa::Tensor4<float> q(1, 2, 6, 8), k(1, 2, 4, 8), v(1, 2, 4, 8), out(1, 2, 6, 8);
    gqa::attention(q, k, v, out);  // G = 4 does not divide H = 6
  });
  CHECK(shape == "gqa.shape");
  const std::string option = id_of<gqa::invalid_argument>([] {
    gqa::Tensor4<float> q(1, 2, 4, 8), k(1, 2, 2, 8), v(1, 2, 2, 8), out(1, 2, 4, 8);
    gqa::AttentionOptions opt;
    opt.window = -1;
    gqa::attention(q, k, v, out, opt);
  });
  CHECK(option == "gqa.option");
  const std::string overflow = id_of<gqa::invalid_argument>([] {
    gqa::KVCache<float> cache(1, 1, 2, 8);
    gqa::Tensor4<float> k(1, 3, 1, 8), v(1, 3, 1, 8);
    cache.append(k, v);  // 3 tokens into a capacity of 2
  });
  CHECK(overflow == "gqa.kv_cache_overflow");
  const std::string convert = id_of<gqa::invalid_argument>([] {
    std::vector<float> in(4 * 2 * 3), out(2 * 2 * 3);
    gqa::ConvertOptions opt;
    opt.assignment = {0, 0, 0, 1};  // groups of 3 and 1, not 2 and 2
    gqa::pool_heads<float>(in, {gqa::WeightLayout::linear, 4, 2, 3}, 2, out, opt);
  });
  CHECK(convert == "gqa.convert.assignment");
  const std::string io = id_of<gqa::io_error>(
      [] { gqa::safetensors::File::open(fs::path(GQA_SOURCE_DIR) / "no-such-dir" / "x.safetensors"); });
  CHECK(io == "gqa.io");
  const std::string truncated = id_of<gqa::format_error>([] {
    const fs::path p = fs::temp_directory_path() / "gqa_test_errors_truncated.safetensors";
    std::ofstream(p, std::ios::binary) << "abc";  // shorter than the 8-byte header length
    struct Remove {
      fs::path p;
      ~Remove() { fs::remove(p); }
    } remove{p};
    gqa::safetensors::File::open(p);
  });
  CHECK(truncated == "gqa.safetensors.truncated");
  for (const std::string& id : {shape, option, overflow, convert, io, truncated}) {
    INFO("id " << id);
    CHECK(gqa::find_error_id(id) != nullptr);
  }
}

// ------------------------------------------------------------------------------------------------ the table

TEST_CASE("gqa::error_ids: unique ids, known exception types, a meaning for each", "[errors]") {
  const std::set<std::string> types = {"invalid_argument", "shape_error", "format_error", "io_error"};
  std::set<std::string> seen;
  for (const gqa::ErrorId& e : gqa::error_ids) {
    const std::string id(e.id);
    INFO("id " << id);
    CHECK(id.rfind("gqa.", 0) == 0);
    CHECK(is_dotted_id(id));
    CHECK(seen.insert(id).second);
    CHECK(e.meaning.size() > 10);
    std::string list(e.thrown_as);
    for (std::size_t at = 0; at <= list.size();) {
      const std::size_t comma = std::min(list.find(", ", at), list.size());
      CHECK(types.count(list.substr(at, comma - at)) == 1);
      at = comma + 2;
    }
    CHECK(gqa::find_error_id(id) == &e);
  }
  CHECK(gqa::find_error_id("gqa.no_such_id") == nullptr);
}

TEST_CASE("the source scan finds ids in each of its three forms, and not in comments", "[errors]") {
  const std::set<std::string> ns = {"safetensors"};
  const auto ids = ids_in(
      "// require(x, \"commented\", ...)\n"
      "detail::require<shape_error>(f(a, b) == c[1], \"shape\", \"msg\");\n"
      "require(ok,\n  \"safetensors.name\", x);\n"
      "throw format_error(concat(\"[gqa.checkpoint.config] \", e.what()));\n"
      "parse(p, \"safetensors.header_json\", \"model.safetensors\");\n"
      "requirement(\"not_an_id\");\n",
      ns);
  CHECK(ids == std::set<std::string>{"gqa.shape", "gqa.safetensors.name", "gqa.checkpoint.config",
                                     "gqa.safetensors.header_json"});
}

TEST_CASE("every id include/ can throw is in gqa::error_ids, and every listed id is thrown", "[errors]") {
  const auto found = ids_in_headers();
  REQUIRE(found.count("gqa.shape") == 1);  // the scan works at all
  for (const auto& [id, files] : found) {
    std::string where;
    for (const auto& f : files) where += " " + f;
    INFO("id " << id << " is thrown in" << where << " but not listed in gqa::error_ids (gqa/errors.hpp)");
    CHECK(gqa::find_error_id(id) != nullptr);
  }
  for (const gqa::ErrorId& e : gqa::error_ids) {
    INFO("gqa::error_ids lists " << e.id << ", which no header under include/gqa throws");
    CHECK(found.count(std::string(e.id)) == 1);
  }
}
