// examples/cli/tool_cli.hpp — what the tools (example_decoder, gqa-convert, gqa-uptrain) share on their command
// lines: strict integer parsing, the --threads range, bytes of an argument made printable for a message, and
// SIGINT / SIGTERM turned into a cancel flag that the library checks between tensors, so that an interrupted
// run removes its temporary directory, says so, and then dies of the signal (exit status 128 + signal in a shell).
#pragma once

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdint>
#include <exception>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>

#include <omp.h>
#include <signal.h>  // sigaction

#include "printable.hpp"

namespace tool_cli {

/// A decimal integer that is the whole of `s`, or nothing.
inline std::optional<long long> parse_integer(const std::string& s) {
  if (s.empty()) return std::nullopt;
  std::size_t used = 0;
  try {
    const long long v = std::stoll(s, &used, 10);
    if (used != s.size()) return std::nullopt;
    return v;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

/// 0 .. 2^64-1 in decimal; std::stoull alone would accept "-1" as 2^64-1.
inline std::optional<std::uint64_t> parse_uint64(const std::string& s) {
  if (s.empty() || s[0] < '0' || s[0] > '9') return std::nullopt;
  std::size_t used = 0;
  try {
    const unsigned long long v = std::stoull(s, &used, 10);
    if (used != s.size()) return std::nullopt;
    return static_cast<std::uint64_t>(v);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

/// A command line the tool cannot run: the tool prints the message and its usage and exits with status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The most threads --threads accepts: OMP_THREAD_LIMIT if set lower, else 1024. libgomp starts every thread a
/// region asks for and dies when it cannot (a team of 100000 crashed in libgomp: each thread maps a stack and a
/// guard page, and the kernel's vm.max_map_count of 65530 mappings ends that near 32000 threads), so the count is
/// bounded well below that; 1024 is far above the cores of any machine these tools run on.
inline long long max_threads() { return std::min<long long>(1024, omp_get_thread_limit()); }

/// The value of `flag` (e.g. "--threads") as a thread count in [min, max_threads()]; throws usage_error naming the
/// flag, the value and the range otherwise. min = 0 lets 0 stand for OpenMP's default.
inline int parse_threads(const std::string& flag, const std::string& text, long long min = 1) {
  const auto v = parse_integer(text);
  const long long max = max_threads();
  if (!v || *v < min || *v > max)
    throw usage_error(flag + " " + printable(text) + ": expected an integer in " + std::to_string(min) + " .. " +
                      std::to_string(max) + " (the upper bound is min(1024, omp_get_thread_limit()))");
  return static_cast<int>(*v);
}

/// Set by SIGINT / SIGTERM once cancel_on_signals() ran; hand its address to the library's `cancel` option.
inline std::atomic<int> received_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free to be set in a handler");

extern "C" inline void tool_cli_on_signal(int sig) { received_signal.store(sig); }

inline void cancel_on_signals() {
  struct sigaction sa {};
  sa.sa_handler = tool_cli_on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocked read or write returns EINTR, and the writer's loop checks the flag
  for (int sig : {SIGINT, SIGTERM}) ::sigaction(sig, &sa, nullptr);
}

/// After the library gave up on a cancelled run: says so, then dies of the signal that cancelled it. Returns if
/// no signal was received (the failure was something else).
inline void die_if_cancelled(const char* tool) {
  if (const int sig = received_signal.load()) {
    std::cerr << tool << ": interrupted by signal " << sig << "; nothing was written\n";
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}

}  // namespace tool_cli
