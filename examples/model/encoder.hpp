// examples/model/encoder.hpp — text to token ids with a checkpoint's tokenizer.json, giving the ids Hugging Face
// `tokenizers` gives (Tokenizer.from_file(...).encode(text).ids), so a person can try a model without Python.
//
// Offers (namespace llama):
//   Encoder::open(dir)      the encoder of dir/tokenizer.json, or nullopt when the file is absent
//   Encoder::parse(json)    the same from a parsed tokenizer.json
//   Encoder::encode(text)   the ids of UTF-8 `text`; add_special_tokens = true applies the post_processor's template
//                           (a BOS id, say), as tokenizers' encode() does by default
//
// The pipeline is tokenizers' own, stage by stage:
//   1. added_tokens with "normalized": false are cut out of the raw text (leftmost-longest match; their
//      single_word / lstrip / rstrip flags as tokenizers applies them), then each remaining piece is normalized
//      and the "normalized": true added tokens are cut out of the result;
//   2. normalizer: Sequence, Prepend, Replace (String or Regex pattern);
//   3. pre_tokenizer: Sequence, Split (String or Regex pattern, every behavior, invert), ByteLevel (GPT-2's regex
//      and byte-to-character table, add_prefix_space, use_regex), Digits, Metaspace (replacement, prepend_scheme
//      always / first / never, split);
//   4. model: BPE with its vocab and merges ("a b" strings or [a, b] pairs), ignore_merges, byte_fallback
//      (<0xNN> pieces), unk_token and fuse_unk; the merges of a word are applied lowest rank first through a
//      priority queue over a linked list of symbols, and words are cached;
//   5. post_processor: TemplateProcessing (the "single" template), ByteLevel (offsets only), Sequence of these.
// Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) and the SentencePiece form (Llama 2, Mistral: Prepend + Replace
// or Metaspace, byte_fallback) are both these stages with different settings.
//
// Anything else in the file that would change the ids (another model type such as Unigram or WordPiece, another
// normalizer / pre-tokenizer / post-processor type, an option of a known type not listed above, BPE dropout,
// truncation, padding, an added token whose id tokenizers would assign differently) is refused by name with
// gqa::format_error; it is never ignored. Regular expressions run with PCRE2 in UTF + UCP mode (regex.hpp), where
// tokenizers runs Oniguruma: both follow Unicode's classes, so \p{L}, \p{N} and \s agree up to the Unicode
// version the two libraries were built with.
//
// Memory: the vocabulary and merges (hash maps sized by the file's entries), the word cache (at most
// word_cache_limit words of < 256 bytes), and O(text) per call. encode() is not thread-safe (the cache and the
// regex match buffers are the encoder's own).
#pragma once

#include "regex.hpp"

#include <gqa/errors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace llama {

namespace encoder_detail {

using Json = nlohmann::json;

[[noreturn]] inline void refuse(const std::string& where, const std::string& what) {
  throw gqa::format_error("[gqa.decoder.tokenizer] " + where + ": " + what);
}

inline std::string shown(const Json& j) {
  const std::string s = j.dump(-1, ' ', true, Json::error_handler_t::replace);
  return s.size() > 200 ? s.substr(0, 200) + "..." : s;
}

/// Refuses keys of `j` outside `known`: an option this reader does not know could change the ids.
inline void only_keys(const Json& j, const std::string& where, std::initializer_list<const char*> known) {
  for (const auto& item : j.items())
    if (std::none_of(known.begin(), known.end(), [&](const char* k) { return item.key() == k; }))
      refuse(where, "the option \"" + item.key() + "\" (= " + shown(item.value()) + ") is not implemented");
}

inline const Json& field(const Json& j, const std::string& where, const char* key) {
  if (!j.is_object() || !j.contains(key)) refuse(where, std::string("no \"") + key + "\"");
  return j[key];
}

inline bool flag(const Json& j, const std::string& where, const char* key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) refuse(where, std::string("\"") + key + "\" = " + shown(j[key]) + " is not a boolean");
  return j[key].get<bool>();
}

inline std::string text(const Json& j, const std::string& where, const char* key) {
  const Json& v = field(j, where, key);
  if (!v.is_string()) refuse(where, std::string("\"") + key + "\" = " + shown(v) + " is not a string");
  return v.get<std::string>();
}

/// A {"String": s} or {"Regex": r} pattern (Split, Replace).
inline Regex pattern(const Json& j, const std::string& where) {
  const Json& p = field(j, where, "pattern");
  if (p.is_object() && p.size() == 1 && p.contains("String") && p["String"].is_string())
    return Regex(p["String"].get<std::string>(), Regex::literal, where);
  if (p.is_object() && p.size() == 1 && p.contains("Regex") && p["Regex"].is_string())
    return Regex(p["Regex"].get<std::string>(), Regex::pattern, where);
  refuse(where, "\"pattern\" = " + shown(p) + " is neither {\"String\": ...} nor {\"Regex\": ...}");
}

/// tokenizers' SplitDelimiterBehavior.
enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

struct Segment {
  ByteRange range;
  bool is_match = false;
};

/// `text` cut into consecutive segments at the matches of `re` (tokenizers' Pattern::find_matches).
inline std::vector<Segment> segments(const Regex& re, std::string_view text, bool invert) {
  std::vector<Segment> out;
  if (text.empty()) return {Segment{{0, 0}, invert}};
  std::size_t prev = 0;
  for (const ByteRange m : re.matches(text)) {
    if (prev != m.begin) out.push_back({{prev, m.begin}, invert});
    out.push_back({m, !invert});
    prev = m.end;
  }
  if (prev != text.size()) out.push_back({{prev, text.size()}, invert});
  return out;
}

/// The pieces (non-empty byte ranges) that `behavior` makes of the segments (NormalizedString::split).
inline std::vector<ByteRange> apply(Behavior behavior, const std::vector<Segment>& segs) {
  std::vector<ByteRange> out;
  bool previous_match = false;
  if (behavior == Behavior::merged_with_next) {
    for (auto s = segs.rbegin(); s != segs.rend(); ++s) {
      if (s->is_match && !previous_match && !out.empty())
        out.back().begin = s->range.begin;
      else
        out.push_back(s->range);
      previous_match = s->is_match;
    }
    std::reverse(out.begin(), out.end());
  } else {
    for (const Segment& s : segs) {
      if (behavior == Behavior::removed && s.is_match) continue;
      const bool extend = behavior == Behavior::contiguous             ? s.is_match == previous_match
                          : behavior == Behavior::merged_with_previous ? s.is_match && !previous_match
                                                                       : false;
      if (extend && !out.empty())
        out.back().end = s.range.end;
      else
        out.push_back(s.range);
      previous_match = s.is_match;
    }
  }
  out.erase(std::remove_if(out.begin(), out.end(), [](ByteRange r) { return r.begin == r.end; }), out.end());
  return out;
}

inline Behavior behavior(const Json& j, const std::string& where) {
  const std::string b = text(j, where, "behavior");
  if (b == "Removed") return Behavior::removed;
  if (b == "Isolated") return Behavior::isolated;
  if (b == "MergedWithPrevious") return Behavior::merged_with_previous;
  if (b == "MergedWithNext") return Behavior::merged_with_next;
  if (b == "Contiguous") return Behavior::contiguous;
  refuse(where, "\"behavior\" = \"" + b + "\" is not a split behavior tokenizers knows");
}

/// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes are code points
/// 256, 257, ... in byte order; each entry is the character's UTF-8.
inline const std::array<std::string, 256>& byte_level_chars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    std::uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const std::uint32_t cp = printable ? std::uint32_t(b) : next++;
      t[size_t(b)] = cp < 0x80 ? std::string(1, char(cp))
                               : std::string{char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
    }
    return t;
  }();
  return table;
}

inline std::size_t utf8_length(unsigned char lead) {
  return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : 4;
}

/// One text between added tokens, or a word of the pre-tokenizer. `at_origin`: it starts at byte 0 of the
/// original text (Metaspace's prepend_scheme "first").
struct Word {
  std::string text;
  bool at_origin = false;
};

/// The normalizer: a flat list of Prepend and Replace steps.
class Normalizer {
 public:
  Normalizer() = default;
  Normalizer(const Json& j, const std::string& where) {
    if (!j.is_null()) add(j, where);
  }

  std::string operator()(std::string s) const {
    for (const Step& step : steps_) {
      if (step.prepend) {
        if (!s.empty()) s = step.content + s;
        continue;
      }
      std::string out;
      std::size_t prev = 0;
      for (const ByteRange m : step.pattern->matches(s)) {
        out.append(s, prev, m.begin - prev);
        out += step.content;
        prev = m.end;
      }
      out.append(s, prev, std::string::npos);
      s = std::move(out);
    }
    return s;
  }

 private:
  struct Step {
    bool prepend = false;
    std::string content;
    std::shared_ptr<const Regex> pattern;
  };

  void add(const Json& j, const std::string& where) {
    const std::string type = text(j, where, "type");
    if (type == "Sequence") {
      only_keys(j, where, {"type", "normalizers"});
      const Json& list = field(j, where, "normalizers");
      if (!list.is_array()) refuse(where, "\"normalizers\" is not an array");
      for (std::size_t i = 0; i < list.size(); ++i) add(list[i], where + ".normalizers[" + std::to_string(i) + "]");
    } else if (type == "Prepend") {
      only_keys(j, where, {"type", "prepend"});
      steps_.push_back({true, text(j, where, "prepend"), nullptr});
    } else if (type == "Replace") {
      only_keys(j, where, {"type", "pattern", "content"});
      steps_.push_back({false, text(j, where, "content"), std::make_shared<const Regex>(pattern(j, where))});
    } else {
      refuse(where, "the normalizer type \"" + type + "\" is not implemented (Sequence, Prepend, Replace are)");
    }
  }

  std::vector<Step> steps_;
};

/// The pre-tokenizer: a flat list of steps, each applied to every word the previous ones produced.
class PreTokenizer {
 public:
  PreTokenizer() = default;
  PreTokenizer(const Json& j, const std::string& where) {
    if (!j.is_null()) add(j, where);
  }

  std::vector<Word> operator()(Word w) const {
    std::vector<Word> words{std::move(w)}, next;
    for (const Step& step : steps_) {
      next.clear();
      for (Word& word : words) apply(step, word, next);
      words.swap(next);
    }
    return words;
  }

 private:
  enum class Kind { split, byte_level, digits, metaspace };
  enum class Prepend { always, first, never };
  struct Step {
    Kind kind = Kind::split;
    std::shared_ptr<const Regex> regex;
    Behavior behavior = Behavior::isolated;
    bool invert = false, add_prefix_space = false, use_regex = true, split = true;
    std::string replacement;
    Prepend prepend = Prepend::always;
  };

  static void cut(const Step& step, const Word& w, Behavior behavior, bool invert, std::vector<Word>& out) {
    for (const ByteRange r : encoder_detail::apply(behavior, segments(*step.regex, w.text, invert)))
      out.push_back({w.text.substr(r.begin, r.end - r.begin), w.at_origin && r.begin == 0});
  }

  static void apply(const Step& step, Word& w, std::vector<Word>& out) {
    switch (step.kind) {
      case Kind::split:
      case Kind::digits:
        cut(step, w, step.behavior, step.invert, out);
        return;
      case Kind::byte_level: {
        if (step.add_prefix_space && (w.text.empty() || w.text[0] != ' ')) w.text.insert(0, " ");
        const std::size_t first = out.size();
        if (step.use_regex)
          cut(step, w, Behavior::isolated, false, out);
        else if (!w.text.empty())
          out.push_back(w);
        const auto& chars = byte_level_chars();
        for (std::size_t i = first; i < out.size(); ++i) {
          std::string mapped;
          for (const char c : out[i].text) mapped += chars[static_cast<unsigned char>(c)];
          out[i].text = std::move(mapped);
        }
        return;
      }
      case Kind::metaspace: {
        std::string s;
        for (const char c : w.text) c == ' ' ? s += step.replacement : s += c;
        const bool starts = s.compare(0, step.replacement.size(), step.replacement) == 0;
        if (!starts && (step.prepend == Prepend::always || (step.prepend == Prepend::first && w.at_origin)))
          s.insert(0, step.replacement);
        w.text = std::move(s);
        if (step.split)
          cut(step, w, Behavior::merged_with_next, false, out);
        else if (!w.text.empty())
          out.push_back(w);
        return;
      }
    }
  }

  void add(const Json& j, const std::string& where) {
    const std::string type = text(j, where, "type");
    Step s;
    if (type == "Sequence") {
      only_keys(j, where, {"type", "pretokenizers"});
      const Json& list = field(j, where, "pretokenizers");
      if (!list.is_array()) refuse(where, "\"pretokenizers\" is not an array");
      for (std::size_t i = 0; i < list.size(); ++i) add(list[i], where + ".pretokenizers[" + std::to_string(i) + "]");
      return;
    } else if (type == "Split") {
      only_keys(j, where, {"type", "pattern", "behavior", "invert"});
      s.regex = std::make_shared<const Regex>(pattern(j, where));
      s.behavior = behavior(j, where);
      s.invert = flag(j, where, "invert", false);
    } else if (type == "ByteLevel") {
      only_keys(j, where, {"type", "add_prefix_space", "trim_offsets", "use_regex"});  // trim_offsets: offsets only
      s.kind = Kind::byte_level;
      s.add_prefix_space = flag(j, where, "add_prefix_space", true);
      s.use_regex = flag(j, where, "use_regex", true);
      s.regex = gpt2_regex();
    } else if (type == "Digits") {
      only_keys(j, where, {"type", "individual_digits"});
      s.kind = Kind::digits;
      // char::is_numeric is Unicode's Nd, Nl and No: \p{N}. Each digit is one match; Contiguous joins neighbours.
      s.regex = std::make_shared<const Regex>("\\p{N}", Regex::pattern, where);
      s.behavior = flag(j, where, "individual_digits", false) ? Behavior::isolated : Behavior::contiguous;
    } else if (type == "Metaspace") {
      only_keys(j, where, {"type", "replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"});
      s.kind = Kind::metaspace;
      s.replacement = text(j, where, "replacement");
      if (s.replacement.empty() || utf8_length(static_cast<unsigned char>(s.replacement[0])) != s.replacement.size())
        refuse(where, "\"replacement\" = \"" + s.replacement + "\" is not one character");
      s.regex = std::make_shared<const Regex>(s.replacement, Regex::literal, where);
      const std::string scheme = j.contains("prepend_scheme") ? text(j, where, "prepend_scheme") : "always";
      if (scheme == "always") s.prepend = Prepend::always;
      else if (scheme == "first") s.prepend = Prepend::first;
      else if (scheme == "never") s.prepend = Prepend::never;
      else refuse(where, "\"prepend_scheme\" = \"" + scheme + "\" is not always, first or never");
      if (!flag(j, where, "add_prefix_space", true)) {  // the older form of "never"
        if (s.prepend != Prepend::never)
          refuse(where, "\"add_prefix_space\": false contradicts \"prepend_scheme\": \"" + scheme + "\"");
      }
      s.split = flag(j, where, "split", true);
    } else {
      refuse(where, "the pre_tokenizer type \"" + type +
                        "\" is not implemented (Sequence, Split, ByteLevel, Digits, Metaspace are)");
    }
    steps_.push_back(std::move(s));
  }

  static std::shared_ptr<const Regex> gpt2_regex() {
    return std::make_shared<const Regex>(
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", Regex::pattern,
        "ByteLevel");
  }

  std::vector<Step> steps_;
};

/// The BPE model: vocab, merges by rank, and the per-word merge.
class Bpe {
 public:
  Bpe() = default;
  Bpe(const Json& j, const std::string& where) {
    only_keys(j, where, {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                         "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"});
    const Json& type = field(j, where, "type");
    if (type != "BPE")
      refuse(where, "the model type " + shown(type) + " is not implemented (BPE is; Unigram, WordPiece, "
                    "WordLevel are not)");
    if (j.contains("dropout") && !j["dropout"].is_null() && !(j["dropout"].is_number() && j["dropout"] == 0))
      refuse(where, "\"dropout\" = " + shown(j["dropout"]) + ": BPE dropout makes encoding random; not implemented");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (j.contains(key) && !j[key].is_null() && j[key] != "")
        refuse(where, std::string("\"") + key + "\" = " + shown(j[key]) + " is not implemented");
    fuse_unk_ = flag(j, where, "fuse_unk", false);
    byte_fallback_ = flag(j, where, "byte_fallback", false);
    ignore_merges_ = flag(j, where, "ignore_merges", false);
    if (j.contains("unk_token") && !j["unk_token"].is_null()) unk_token_ = text(j, where, "unk_token");
    read_vocab(field(j, where, "vocab"), where + ".vocab");
    read_merges(field(j, where, "merges"), where + ".merges");
    bytes_.fill(-1);
    static const char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const auto it = vocab_.find(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">");
      if (it != vocab_.end()) bytes_[size_t(b)] = it->second;
    }
  }

  std::optional<std::int32_t> find(const std::string& piece) const {
    const auto it = vocab_.find(piece);
    return it == vocab_.end() ? std::nullopt : std::optional<std::int32_t>(it->second);
  }
  std::size_t size() const { return vocab_.size(); }

  /// The ids of one pre-tokenized word (BPE::tokenize_with_cache), appended to `out`.
  void encode(const std::string& word, std::vector<std::int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      if (const auto id = find(word)) return out.push_back(*id);
    }
    const auto hit = cache_.find(word);
    if (hit != cache_.end()) {
      out.insert(out.end(), hit->second.begin(), hit->second.end());
      return;
    }
    std::vector<std::int32_t> ids = merge_word(word);
    out.insert(out.end(), ids.begin(), ids.end());
    if (word.size() < 256 && cache_.size() < word_cache_limit) cache_.emplace(word, std::move(ids));
  }

  static constexpr std::size_t word_cache_limit = 100000;

 private:
  struct Symbol {
    std::int32_t id;
    std::int64_t prev, next;
    std::size_t len;  // bytes of the word it covers; 0 = merged into its left neighbour
  };
  struct Merge {
    std::uint32_t rank;
    std::size_t pos;
    std::int32_t id;
    bool operator<(const Merge& o) const {  // std::priority_queue pops the largest: invert for lowest rank, pos
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  static std::uint64_t key(std::int32_t a, std::int32_t b) {
    return std::uint64_t(std::uint32_t(a)) << 32 | std::uint32_t(b);
  }

  void read_vocab(const Json& v, const std::string& where) {
    if (!v.is_object()) refuse(where, "is not an object of piece -> id");
    vocab_.reserve(v.size());
    for (const auto& [piece, id] : v.items()) {
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX)
        refuse(where, "the id of \"" + piece + "\" is " + shown(id) + ", not an integer in [0, 2^31)");
      vocab_.emplace(piece, std::int32_t(id.get<std::int64_t>()));
    }
  }

  std::int32_t merge_part(const std::string& piece, const std::string& where) const {
    const auto id = find(piece);
    if (!id) refuse(where, "the merge part \"" + piece + "\" is not in the vocab");
    return *id;
  }

  void read_merges(const Json& m, const std::string& where) {
    if (!m.is_array()) refuse(where, "is not an array");
    merges_.reserve(m.size());
    std::uint32_t rank = 0;
    for (std::size_t i = 0; i < m.size(); ++i) {
      const std::string at = where + "[" + std::to_string(i) + "]";
      std::string a, b;
      if (m[i].is_string()) {  // the older "a b" form; tokenizers skips "#version" lines
        const std::string line = m[i].get<std::string>();
        if (line.compare(0, 8, "#version") == 0) continue;
        const auto space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
          refuse(at, "\"" + line + "\" is not two pieces separated by one space");
        a = line.substr(0, space), b = line.substr(space + 1);
      } else if (m[i].is_array() && m[i].size() == 2 && m[i][0].is_string() && m[i][1].is_string()) {
        a = m[i][0].get<std::string>(), b = m[i][1].get<std::string>();
      } else {
        refuse(at, shown(m[i]) + " is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const std::int32_t left = merge_part(a, at), right = merge_part(b, at), merged = merge_part(a + b, at);
      merges_[key(left, right)] = {rank++, merged};  // a later duplicate wins, as in tokenizers
    }
  }

  /// The word's characters as symbols (vocab pieces, <0xNN> bytes, or unk), merged by rank (BPE::merge_word and
  /// Word::merge_all).
  std::vector<std::int32_t> merge_word(const std::string& w) const {
    std::vector<Symbol> symbols;
    const auto add = [&](std::int32_t id, std::size_t len) {
      const auto n = std::int64_t(symbols.size());
      if (n > 0) symbols.back().next = n;
      symbols.push_back({id, n - 1, -1, len});
    };
    bool unk = false;  // an unk symbol pending, of unk_len bytes
    std::int32_t unk_id = 0;
    std::size_t unk_len = 0;
    for (std::size_t i = 0; i < w.size();) {
      const std::size_t len = std::min(utf8_length(static_cast<unsigned char>(w[i])), w.size() - i);
      const std::string c = w.substr(i, len);
      i += len;
      if (const auto id = find(c)) {
        if (unk) add(unk_id, unk_len), unk = false;
        add(*id, len);
        continue;
      }
      // tokenizers adds the bytes of a byte-fallback character without flushing a pending unk first: kept so.
      const auto has_byte = [&](char b) { return bytes_[static_cast<unsigned char>(b)] >= 0; };
      if (byte_fallback_ && std::all_of(c.begin(), c.end(), has_byte)) {
        for (const char b : c) add(bytes_[static_cast<unsigned char>(b)], 1);
        continue;
      }
      if (!unk_token_) continue;  // no unk_token: tokenizers drops the character
      if (unk && fuse_unk_) {
        unk_len += len;
        continue;
      }
      if (unk) add(unk_id, unk_len);
      const auto found = find(*unk_token_);
      if (!found)
        throw gqa::invalid_argument("[gqa.decoder.tokenizer] the character \"" + c + "\" needs the unk_token \"" +
                                    *unk_token_ + "\", which is not in the vocab");
      unk = true, unk_id = *found, unk_len = len;
    }
    if (unk) add(unk_id, unk_len);
    merge_all(symbols);
    std::vector<std::int32_t> ids;
    for (const Symbol& s : symbols)
      if (s.len != 0) ids.push_back(s.id);
    return ids;
  }

  void merge_all(std::vector<Symbol>& symbols) const {
    std::priority_queue<Merge> queue;
    const auto push = [&](std::size_t pos, std::int32_t a, std::int32_t b) {
      const auto it = merges_.find(key(a, b));
      if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
    };
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) push(i, symbols[i].id, symbols[i + 1].id);
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Symbol& left = symbols[top.pos];
      if (left.len == 0 || left.next == -1) continue;
      const std::size_t right_pos = std::size_t(left.next);
      const Symbol right = symbols[right_pos];
      // A stale entry: the pair at pos changed since it was queued. Like tokenizers, compare the merged ids only.
      const auto now = merges_.find(key(left.id, right.id));
      if (now == merges_.end() || now->second.second != top.id) continue;
      left.id = top.id;
      left.len += right.len;
      left.next = right.next;
      symbols[right_pos].len = 0;
      if (right.next >= 0) symbols[std::size_t(right.next)].prev = std::int64_t(top.pos);
      if (left.prev >= 0) push(std::size_t(left.prev), symbols[std::size_t(left.prev)].id, left.id);
      if (left.next >= 0) push(top.pos, left.id, symbols[std::size_t(left.next)].id);
    }
  }

  std::unordered_map<std::string, std::int32_t> vocab_;
  std::unordered_map<std::uint64_t, std::pair<std::uint32_t, std::int32_t>> merges_;  // (a, b) -> (rank, a+b)
  std::array<std::int32_t, 256> bytes_{};                                              // <0xNN> ids, -1 if none
  std::optional<std::string> unk_token_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache_;
};

}  // namespace encoder_detail

class Encoder {
 public:
  /// The encoder of dir/tokenizer.json, or nullopt when the file is absent. gqa::format_error for a malformed
  /// file or one with a part this encoder does not implement, naming it.
  static std::optional<Encoder> open(const std::filesystem::path& dir) {
    const auto path = dir / "tokenizer.json";
    if (!std::filesystem::exists(path)) return std::nullopt;
    std::ifstream in(path, std::ios::binary);
    if (!in) throw gqa::io_error("[gqa.decoder.tokenizer] cannot open " + path.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw gqa::format_error("[gqa.decoder.tokenizer] " + path.string() + ": not valid JSON: " + e.what());
    }
    return parse(j, path.string());
  }

  static Encoder parse(const nlohmann::json& j, const std::string& where = "tokenizer.json") {
    using namespace encoder_detail;
    if (!j.is_object()) refuse(where, "is not a JSON object");
    only_keys(j, where, {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "model",
                         "decoder", "post_processor"});
    if (j.contains("version") && j["version"] != "1.0")
      refuse(where, "\"version\" = " + shown(j["version"]) + " (tokenizers reads \"1.0\" only)");
    for (const char* key : {"truncation", "padding"})
      if (j.contains(key) && !j[key].is_null())
        refuse(where, std::string("\"") + key + "\" = " + shown(j[key]) + " is not implemented");
    Encoder e;
    e.bpe_ = Bpe(field(j, where, "model"), where + ": model");
    e.normalizer_ = Normalizer(j.value("normalizer", nlohmann::json()), where + ": normalizer");
    e.pre_tokenizer_ = PreTokenizer(j.value("pre_tokenizer", nlohmann::json()), where + ": pre_tokenizer");
    e.read_added_tokens(j.value("added_tokens", nlohmann::json::array()), where + ": added_tokens");
    e.read_post_processor(j.value("post_processor", nlohmann::json()), where + ": post_processor");
    return e;
  }

  /// The ids of `text` (UTF-8; gqa::invalid_argument naming the byte offset of a malformed sequence).
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = true) const {
    using namespace encoder_detail;
    const std::size_t bad = invalid_utf8_at(text);
    if (bad != std::string::npos)
      throw gqa::invalid_argument("[gqa.decoder.tokenizer] the text is not valid UTF-8 at byte " +
                                  std::to_string(bad));
    std::vector<std::int32_t> ids;
    for (const Piece& raw : cut_added(std::string(text), raw_trie_, true)) {
      if (raw.token >= 0) {
        ids.push_back(added_[size_t(raw.token)].id);
        continue;
      }
      for (const Piece& p : cut_added(normalizer_(raw.text), normalized_trie_, raw.at_origin)) {
        if (p.token >= 0) {
          ids.push_back(added_[size_t(p.token)].id);
          continue;
        }
        for (const Word& w : pre_tokenizer_(Word{p.text, p.at_origin})) bpe_.encode(w.text, ids);
      }
    }
    if (!add_special_tokens) return ids;
    for (const auto& template_items : templates_) {
      std::vector<std::int32_t> out;
      for (const auto& item : template_items) {
        if (item.sequence)
          out.insert(out.end(), ids.begin(), ids.end());
        else
          out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
      ids = std::move(out);
    }
    return ids;
  }

 private:
  struct AddedToken {
    std::string content;
    std::int32_t id = 0;
    bool single_word = false, lstrip = false, rstrip = false;
  };
  /// A byte trie of added-token contents, for tokenizers' leftmost-longest matching.
  struct Trie {
    struct Node {
      std::vector<std::pair<unsigned char, std::int32_t>> next;
      std::int32_t token = -1;
    };
    std::vector<Node> nodes{Node{}};
    void insert(const std::string& s, std::int32_t token) {
      std::int32_t n = 0;
      for (const char c : s) {
        const auto b = static_cast<unsigned char>(c);
        auto& next = nodes[size_t(n)].next;
        const auto it = std::find_if(next.begin(), next.end(), [&](const auto& e) { return e.first == b; });
        if (it != next.end()) {
          n = it->second;
        } else {
          next.emplace_back(b, std::int32_t(nodes.size()));
          n = std::int32_t(nodes.size());
          nodes.emplace_back();
        }
      }
      if (nodes[size_t(n)].token < 0) nodes[size_t(n)].token = token;  // the first of equal contents wins
    }
    /// The longest token starting at `at`: (token, end), or token -1.
    std::pair<std::int32_t, std::size_t> longest(const std::string& s, std::size_t at) const {
      std::pair<std::int32_t, std::size_t> best{-1, at};
      std::int32_t n = 0;
      for (std::size_t i = at; i < s.size(); ++i) {
        const auto& next = nodes[size_t(n)].next;
        const auto b = static_cast<unsigned char>(s[i]);
        const auto it = std::find_if(next.begin(), next.end(), [&](const auto& e) { return e.first == b; });
        if (it == next.end()) break;
        n = it->second;
        if (nodes[size_t(n)].token >= 0) best = {nodes[size_t(n)].token, i + 1};
      }
      return best;
    }
  };
  struct Piece {
    std::string text;
    std::int32_t token = -1;  // index into added_, or -1 for text
    bool at_origin = false;
  };
  struct TemplateItem {
    bool sequence = false;
    std::vector<std::int32_t> ids;
  };

  /// `s` cut at the added tokens of `trie` (AddedVocabulary::find_matches); empty text pieces are dropped.
  std::vector<Piece> cut_added(const std::string& s, const Trie& trie, bool at_origin) const {
    std::vector<Piece> out;
    const auto text = [&](std::size_t b, std::size_t e) {
      if (e > b) out.push_back({s.substr(b, e - b), -1, at_origin && b == 0});
    };
    std::size_t start_offset = 0;
    for (std::size_t i = 0; i < s.size();) {
      const auto [token, end] = trie.longest(s, i);
      if (token < 0) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = end;
      i = end;  // matches never overlap, whether this one is kept or not
      const AddedToken& t = added_[size_t(token)];
      if (t.single_word && ((start > 0 && word_char_before(s, start)) || (stop < s.size() && word_char_at(s, stop))))
        continue;
      if (t.lstrip) start = std::max(spaces_end_before(s, start), start_offset);
      if (t.rstrip) stop = spaces_end_after(s, stop);
      if (start_offset < start) text(start_offset, start);
      out.push_back({std::string(), token, false});
      start_offset = stop;
    }
    text(start_offset, s.size());
    return out;
  }

  static const Regex& word_regex() {
    static const Regex re("\\w", Regex::pattern, "added_tokens");
    return re;
  }
  static const Regex& space_regex() {
    static const Regex re("\\s", Regex::pattern, "added_tokens");
    return re;
  }
  static std::size_t previous_char(const std::string& s, std::size_t at) {
    do --at;
    while (at > 0 && (static_cast<unsigned char>(s[at]) & 0xC0) == 0x80);
    return at;
  }
  static bool word_char_at(const std::string& s, std::size_t at) { return word_regex().matches_at(s, at); }
  static bool word_char_before(const std::string& s, std::size_t at) {
    return word_regex().matches_at(s, previous_char(s, at));
  }
  static std::size_t spaces_end_before(const std::string& s, std::size_t at) {
    while (at > 0 && space_regex().matches_at(s, previous_char(s, at))) at = previous_char(s, at);
    return at;
  }
  static std::size_t spaces_end_after(const std::string& s, std::size_t at) {
    while (at < s.size() && space_regex().matches_at(s, at))
      at += encoder_detail::utf8_length(static_cast<unsigned char>(s[at]));
    return at;
  }

  void read_added_tokens(const nlohmann::json& list, const std::string& where) {
    using namespace encoder_detail;
    if (!list.is_array()) refuse(where, "is not an array");
    std::unordered_map<std::string, std::int32_t> assigned;
    std::int64_t max_assigned = -1;
    const auto vocab_size = std::int64_t(bpe_.size());
    for (std::size_t i = 0; i < list.size(); ++i) {
      const nlohmann::json& t = list[i];
      const std::string at = where + "[" + std::to_string(i) + "]";
      only_keys(t, at, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"});
      const std::string content = text(t, at, "content");
      const nlohmann::json& id = field(t, at, "id");
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX)
        refuse(at, "\"id\" = " + shown(id) + " is not an integer in [0, 2^31)");
      if (content.empty()) continue;  // tokenizers ignores an empty added token
      if (assigned.count(content)) refuse(at, "\"" + content + "\" is listed twice");
      // The id tokenizers gives it: its vocab id, else the next one past the vocab and the tokens before it.
      std::int64_t expected = 0;
      if (const auto v = bpe_.find(content))
        expected = *v;
      else if (max_assigned < 0)
        expected = vocab_size;
      else
        expected = max_assigned >= vocab_size || vocab_size == 0 ? max_assigned + 1 : vocab_size;
      if (expected != id.get<std::int64_t>())
        refuse(at, "\"" + content + "\" has id " + shown(id) + ", but tokenizers gives it id " +
                       std::to_string(expected));
      assigned.emplace(content, std::int32_t(expected));
      max_assigned = std::max(max_assigned, expected);
      // tokenizers requires every flag in the file (no defaults): so does this reader.
      for (const char* key : {"single_word", "lstrip", "rstrip", "normalized", "special"})
        if (!t.contains(key) || !t[key].is_boolean()) refuse(at, std::string("no boolean \"") + key + "\"");
      AddedToken a{content, std::int32_t(expected), flag(t, at, "single_word", false), flag(t, at, "lstrip", false),
                   flag(t, at, "rstrip", false)};
      const bool normalized = flag(t, at, "normalized", false);
      added_.push_back(a);
      if (normalized)
        normalized_trie_.insert(normalizer_(content), std::int32_t(added_.size() - 1));
      else
        raw_trie_.insert(content, std::int32_t(added_.size() - 1));
    }
  }

  void read_post_processor(const nlohmann::json& j, const std::string& where) {
    using namespace encoder_detail;
    if (j.is_null()) return;
    const std::string type = text(j, where, "type");
    if (type == "Sequence") {
      only_keys(j, where, {"type", "processors"});
      const nlohmann::json& list = field(j, where, "processors");
      if (!list.is_array()) refuse(where, "\"processors\" is not an array");
      for (std::size_t i = 0; i < list.size(); ++i)
        read_post_processor(list[i], where + ".processors[" + std::to_string(i) + "]");
    } else if (type == "ByteLevel") {  // changes offsets only, never ids
      only_keys(j, where, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
    } else if (type == "TemplateProcessing") {
      only_keys(j, where, {"type", "single", "pair", "special_tokens"});
      read_template(j, where);
    } else {
      refuse(where, "the post_processor type \"" + type +
                        "\" is not implemented (TemplateProcessing, ByteLevel, Sequence are)");
    }
  }

  void read_template(const nlohmann::json& j, const std::string& where) {
    using namespace encoder_detail;
    const nlohmann::json& single = field(j, where, "single");
    const nlohmann::json specials = j.value("special_tokens", nlohmann::json::object());
    if (!single.is_array()) refuse(where, "\"single\" is not an array");
    std::vector<TemplateItem> items;
    for (std::size_t i = 0; i < single.size(); ++i) {
      const nlohmann::json& item = single[i];
      const std::string at = where + ".single[" + std::to_string(i) + "]";
      if (item.is_object() && item.contains("Sequence")) {
        if (item["Sequence"].value("id", "") != "A") refuse(at, shown(item) + ": a single template reads sequence A");
        items.push_back({true, {}});
      } else if (item.is_object() && item.contains("SpecialToken") && item["SpecialToken"].contains("id")) {
        const nlohmann::json& name = item["SpecialToken"]["id"];
        if (!name.is_string() || !specials.contains(name.get<std::string>()))
          refuse(at, shown(name) + " is not in \"special_tokens\"");
        const nlohmann::json& ids = specials[name.get<std::string>()].value("ids", nlohmann::json());
        TemplateItem t;
        if (!ids.is_array()) refuse(at, "special_tokens " + shown(name) + " has no \"ids\" array");
        for (const auto& id : ids) {
          if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX)
            refuse(at, "special_tokens " + shown(name) + ": id " + shown(id) + " is not in [0, 2^31)");
          t.ids.push_back(std::int32_t(id.get<std::int64_t>()));
        }
        items.push_back(std::move(t));
      } else {
        refuse(at, shown(item) + " is neither {\"Sequence\": ...} nor {\"SpecialToken\": ...}");
      }
    }
    templates_.push_back(std::move(items));
  }

  encoder_detail::Bpe bpe_;
  encoder_detail::Normalizer normalizer_;
  encoder_detail::PreTokenizer pre_tokenizer_;
  std::vector<AddedToken> added_;
  Trie raw_trie_, normalized_trie_;
  std::vector<std::vector<TemplateItem>> templates_;  // applied in order (a Sequence may hold several)
};

}  // namespace llama
