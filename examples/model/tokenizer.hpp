// examples/model/tokenizer.hpp — token ids back to text, for display (the Detokenizer; the encoder, text to ids,
// is examples/model/encoder.hpp).
//
// Reads tokenizer.json's "model.vocab" (piece -> id) and "added_tokens" (id, content). Two piece spellings:
//   byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2; the "decoder" is ByteLevel): every byte of the text is one
//     printable character of GPT-2's bytes_to_unicode table ('Ġ' is the space byte), mapped back byte by byte;
//   SentencePiece-style (Llama 2, Mistral): '▁' is a space and "<0x0A>" a raw byte.
// Added tokens (<|endoftext|>, ...) are literal text either way. Unknown ids print as "<unk:ID>".
//
// Memory is bounded by the file's entries (a hash map from id to piece), whatever the ids' values: an id must be an
// integer in [0, 2^31), else gqa::format_error names the piece and the id. Text to ids: encoder.hpp.
#pragma once

#include <gqa/errors.hpp>
#include <gqa/types.hpp>

#include <nlohmann/json.hpp>

#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace llama {

class Detokenizer {
 public:
  /// The detokenizer of dir/tokenizer.json, or nullopt when the file is absent. Malformed: gqa::format_error.
  static std::optional<Detokenizer> open(const std::filesystem::path& dir) {
    const auto path = dir / "tokenizer.json";
    if (!std::filesystem::exists(path)) return std::nullopt;
    std::ifstream in(path, std::ios::binary);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw gqa::format_error("[gqa.decoder.tokenizer] " + path.string() + ": not valid JSON: " + e.what());
    }
    if (!j.contains("model") || !j["model"].is_object() || !j["model"].contains("vocab") ||
        !j["model"]["vocab"].is_object())
      throw gqa::format_error("[gqa.decoder.tokenizer] " + path.string() + ": no \"model.vocab\" object");
    Detokenizer d;
    d.byte_level_ = j.contains("decoder") && j["decoder"].dump().find("\"ByteLevel\"") != std::string::npos;
    for (const auto& [piece, id] : j["model"]["vocab"].items()) d.set(id, piece, false, path);
    if (j.contains("added_tokens") && j["added_tokens"].is_array())
      for (const auto& t : j["added_tokens"])
        if (t.contains("id") && t.contains("content") && t["content"].is_string())
          d.set(t["id"], t["content"].get<std::string>(), true, path);
    return d;
  }

  /// The text of `ids`, concatenated.
  std::string decode(gqa::span<const std::int32_t> ids) const {
    std::string out;
    for (const std::int32_t id : ids) {
      const auto it = pieces_.find(id);
      if (it == pieces_.end()) {
        out += "<unk:" + std::to_string(id) + ">";
      } else if (it->second.literal) {
        out += it->second.text;
      } else {
        out += byte_level_ ? from_byte_level(it->second.text) : from_sentencepiece(it->second.text);
      }
    }
    return out;
  }

 private:
  struct Piece {
    std::string text;
    bool literal = false;  // an added token: shown as written
  };

  void set(const nlohmann::json& id, const std::string& piece, bool literal, const std::filesystem::path& path) {
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX)
      throw gqa::format_error("[gqa.decoder.tokenizer] " + path.string() + ": the id of \"" + piece + "\" is " +
                              id.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                              ", not an integer in [0, 2^31)");
    pieces_[std::int32_t(id.get<std::int64_t>())] = Piece{piece, literal};
  }

  /// GPT-2's bytes_to_unicode, inverted: printable Latin-1 bytes stand for themselves, the other 68 bytes are
  /// code points 256, 257, ... in byte order.
  static int byte_of(std::uint32_t cp) {
    static const std::vector<int> table = [] {
      std::vector<int> t(512, -1);
      int next = 256;
      for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        t[size_t(printable ? b : next++)] = b;
      }
      return t;
    }();
    return cp < table.size() ? table[cp] : -1;
  }

  /// Splits UTF-8 into code points; a malformed byte stands for itself.
  static std::vector<std::uint32_t> code_points(const std::string& s) {
    std::vector<std::uint32_t> cps;
    for (size_t i = 0; i < s.size();) {
      const auto c = static_cast<unsigned char>(s[i]);
      const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
      if (n == 0 || i + size_t(n) > s.size()) {
        cps.push_back(c);
        ++i;
        continue;
      }
      std::uint32_t cp = n == 1 ? c : c & (0x7F >> n);
      for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + size_t(k)]) & 0x3F);
      cps.push_back(cp);
      i += size_t(n);
    }
    return cps;
  }

  static std::string from_byte_level(const std::string& piece) {
    std::string out;
    for (const std::uint32_t cp : code_points(piece)) {
      const int b = byte_of(cp);
      if (b < 0) return piece;  // not a byte-level piece after all: show it as written
      out += char(b);
    }
    return out;
  }

  static std::string from_sentencepiece(const std::string& piece) {
    if (piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>' && std::isxdigit(piece[3]) &&
        std::isxdigit(piece[4]))
      return std::string(1, char(std::stoi(piece.substr(3, 2), nullptr, 16)));
    std::string out;
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, 3, "\xE2\x96\x81") == 0) {  // U+2581 '▁'
        out += ' ';
        i += 3;
      } else {
        out += piece[i++];
      }
    }
    return out;
  }

  std::unordered_map<std::int32_t, Piece> pieces_;
  bool byte_level_ = false;
};

}  // namespace llama
