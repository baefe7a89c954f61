// examples/cli/printable.hpp — tool_cli::printable(): bytes of a command-line argument or of a file, made safe to
// quote in a message. A leaf header (the standard library only), so that the model code (examples/model/), which
// quotes words of the files it reads, uses the same escaping as the tools.
#pragma once

#include <cstddef>
#include <string>

namespace tool_cli {

/// `s` as it may appear in a message: control bytes, DEL and bytes that are not part of valid UTF-8 become \xNN,
/// so that an argument (or a file's content) cannot put raw binary or terminal escapes on stderr. Valid UTF-8
/// passes through; a backslash is kept as it is (a message escaped once is not escaped again). Text from a file is
/// escaped where the message is built: what() is a C string, so a NUL would cut the message short there.
inline std::string printable(const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  const auto escape = [&](unsigned char b) { out += {'\\', 'x', hex[b >> 4], hex[b & 15]}; };
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char b = byte(i);
    if (b < 0x80) {
      if (b < 0x20 || b == 0x7f) escape(b); else out += char(b);
      ++i;
      continue;
    }
    // The length of a UTF-8 sequence and the range of its second byte (no overlongs, no surrogates, <= U+10FFFF).
    std::size_t n = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) n = 2;
    else if (b >= 0xe0 && b <= 0xef) n = 3, lo = b == 0xe0 ? 0xa0 : 0x80, hi = b == 0xed ? 0x9f : 0xbf;
    else if (b >= 0xf0 && b <= 0xf4) n = 4, lo = b == 0xf0 ? 0x90 : 0x80, hi = b == 0xf4 ? 0x8f : 0xbf;
    bool valid = n != 0 && i + n <= s.size() && byte(i + 1) >= lo && byte(i + 1) <= hi;
    for (std::size_t k = 2; valid && k < n; ++k) valid = byte(i + k) >= 0x80 && byte(i + k) <= 0xbf;
    if (!valid) {
      escape(b);
      ++i;
      continue;
    }
    out.append(s, i, n);
    i += n;
  }
  return out;
}

}  // namespace tool_cli
