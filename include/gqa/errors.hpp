// gqa/errors.hpp — the exceptions gqa throws.
//
// Every check happens once, at the public API, and throws a typed exception whose message names the argument,
// the dimension or field, and the values involved, prefixed by a stable id, e.g.
//   "[gqa.shape] k: dim 2 (kv_heads G) = 5 does not divide q dim 2 (heads H) = 32"
// Hierarchy:
//   gqa::invalid_argument : std::invalid_argument    bad arguments (shapes, options, values)
//     gqa::shape_error                               tensor shapes that disagree
//   gqa::format_error : std::runtime_error           a malformed file (safetensors header, config.json)
//   gqa::io_error : std::runtime_error               the operating system refused (open, mmap, write, rename)
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace gqa {

class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class shape_error : public invalid_argument {
 public:
  using invalid_argument::invalid_argument;
};

class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class io_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws E("[gqa.<id>] " + message pieces) when `condition` is false.
template <typename E = invalid_argument, typename... Args>
void require(bool condition, const char* id, Args&&... message) {
  if (!condition) throw E(concat("[gqa.", id, "] ", std::forward<Args>(message)...));
}

}  // namespace detail
}  // namespace gqa
