// examples/model/regex.hpp — a Unicode regular expression over UTF-8 text (PCRE2, libpcre2-8), for the tokenizer's
// pre-tokenizer and normalizer patterns (examples/model/encoder.hpp). A dependency of the examples only: the gqa
// library itself never includes this.
//
// Offers (namespace llama):
//   Regex(pattern, Regex::pattern | Regex::literal)   compiled with PCRE2_UTF | PCRE2_UCP, so \p{L}, \s, \w are
//                                                       Unicode classes (as in the Oniguruma and Rust regex engines
//                                                       that Hugging Face `tokenizers` uses); JIT-compiled when the
//                                                       platform has PCRE2's JIT
//   Regex::matches(text)                               the non-overlapping leftmost matches, as byte ranges
//   Regex::matches_at(text, offset)                    whether a match starts exactly at `offset`
//   invalid_utf8_at(text)                              the byte offset of the first malformed sequence, or npos
//
// Empty matches: after an empty match the search moves on by one code point (Rust's and Oniguruma's iteration),
// so an empty match is never reported twice at one position. Texts must be valid UTF-8 (checked once by the
// caller with invalid_utf8_at; matching skips PCRE2's own check).
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <gqa/errors.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llama {

struct ByteRange {
  std::size_t begin = 0, end = 0;
};

class Regex {
 public:
  enum Kind { pattern, literal };

  /// Throws gqa::format_error naming `where` and the pattern when PCRE2 cannot compile it.
  Regex(const std::string& expression, Kind kind, const std::string& where) {
    int error = 0;
    PCRE2_SIZE at = 0;
    // A literal takes no PCRE2_UCP (PCRE2 refuses the pair); it has no classes to widen anyway.
    const std::uint32_t options = PCRE2_UTF | (kind == literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(expression.data()), expression.size(), options,
                                     &error, &at, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      throw gqa::format_error("[gqa.decoder.tokenizer] " + where + ": the pattern \"" + expression +
                              "\" does not compile (PCRE2, at byte " +
                              std::to_string(at) + "): " + reinterpret_cast<const char*>(message));
    }
    code_.reset(code);
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // may fail (no JIT on this platform): the interpreter runs then
    data_.reset(pcre2_match_data_create_from_pattern(code, nullptr));
    if (!data_) throw std::bad_alloc();
  }

  std::vector<ByteRange> matches(std::string_view text) const {
    std::vector<ByteRange> out;
    std::size_t from = 0;
    while (from <= text.size()) {
      const auto m = match(text, from, 0);
      if (!m) break;
      out.push_back(*m);
      // An empty match: the next search starts one code point later.
      from = m->end > m->begin ? m->end : m->end + code_point_length(text, m->end);
    }
    return out;
  }

  bool matches_at(std::string_view text, std::size_t offset) const {
    const auto m = match(text, offset, PCRE2_ANCHORED);
    return m && m->end > m->begin;
  }

 private:
  struct CodeFree {
    void operator()(pcre2_code* c) const { pcre2_code_free(c); }
  };
  struct DataFree {
    void operator()(pcre2_match_data* d) const { pcre2_match_data_free(d); }
  };

  static std::size_t code_point_length(std::string_view text, std::size_t at) {
    std::size_t n = 1;
    while (at + n < text.size() && (static_cast<unsigned char>(text[at + n]) & 0xC0) == 0x80) ++n;
    return n;
  }

  /// The first match at or after `from`, or none. PCRE2 errors other than "no match" are thrown (a match limit on a
  /// pathological pattern), never read as "no match".
  std::optional<ByteRange> match(std::string_view text, std::size_t from, std::uint32_t options) const {
    const auto subject = reinterpret_cast<PCRE2_SPTR>(text.empty() ? "" : text.data());
    const std::uint32_t flags = options | PCRE2_NO_UTF_CHECK;
    // pcre2_match runs the JIT code itself when the options allow it (not with PCRE2_ANCHORED).
    const int rc = pcre2_match(code_.get(), subject, text.size(), from, flags, data_.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return std::nullopt;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof message);
      throw gqa::invalid_argument(std::string("[gqa.decoder.tokenizer] regular expression match failed at byte ") +
                                  std::to_string(from) + ": " + reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* v = pcre2_get_ovector_pointer(data_.get());
    return ByteRange{v[0], v[1]};
  }

  std::unique_ptr<pcre2_code, CodeFree> code_;
  std::unique_ptr<pcre2_match_data, DataFree> data_;  // one per Regex: a Regex is not shared between threads
};

/// The byte offset of the first malformed UTF-8 sequence in `text` (overlong forms, surrogates and code points
/// above U+10FFFF included), or std::string::npos when it is all valid.
inline std::size_t invalid_utf8_at(std::string_view text) {
  int error = 0;
  PCRE2_SIZE at = 0;
  // Compiling the empty pattern is cheap; pcre2_match on it with UTF checks the whole subject first.
  static const std::unique_ptr<pcre2_code, void (*)(pcre2_code*)> empty(
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(""), 0, PCRE2_UTF, &error, &at, nullptr), pcre2_code_free);
  std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> data(
      pcre2_match_data_create(1, nullptr), pcre2_match_data_free);
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.empty() ? "" : text.data());
  const int rc = pcre2_match(empty.get(), subject, text.size(), 0, 0, data.get(), nullptr);
  if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH) return std::string::npos;
  return pcre2_get_startchar(data.get());
}

}  // namespace llama
