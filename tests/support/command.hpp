// tests/support/command.hpp — runs a shell command line (popen's /bin/sh) for the tests that drive the tools and
// examples end to end: its exit status and what it printed on stdout (add " 2>&1" to the line for stderr too).
#pragma once

#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include <sys/wait.h>

namespace gqa_test {

struct CommandRun {
  int status = -1;     ///< the exit status; -1 if the command did not exit normally (a signal)
  std::string output;  ///< what it wrote to the pipe
};

inline CommandRun run_command(const std::string& command_line) {
  CommandRun r;
  FILE* p = ::popen(command_line.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace gqa_test
