// gqa/detail/output_directory.hpp — a directory that appears under its final name only once complete, as
// AtomicFile does for files: built in a hidden sibling (staging) directory, moved into place by commit(), removed if
// destroyed without commit(). Not part of the public API; include gqa/checkpoint.hpp.
//
// NAMES. The staging directory of OUTPUT is ".<OUTPUT>.gqa-tmp-<host>-<pid>-<random>" beside it (<host>: 8 hex
// digits of a hash of the host name, <pid>: the owning process). Creating one first removes stale ones of that naming
// in the same parent: this host's, whose process is gone (a kill -9, a power cut, SIGBUS from a mapped input file
// truncated by another process). Nothing else ever deletes them, so a kill -9 leaves a staging directory of up to the
// output's size until the next run in the same parent directory.
//
// REPLACING (commit with replace): renameat2(RENAME_EXCHANGE) swaps the complete new directory and the old one in one
// step, so OUTPUT always exists; the old one, now under the staging name, is then removed (if that is interrupted,
// the next run removes it as stale). Where the file system cannot exchange (EINVAL, ENOSYS), the old directory is
// first renamed to ".<OUTPUT>.gqa-old-<host>-<pid>-<random>" and the new one renamed onto OUTPUT; a crash between
// the two leaves no OUTPUT, and the next run renames that .gqa-old directory back before anything else.
//
// THE MARKER. commit() writes ".gqa-output" (output_marker_name, through temp + fsync + rename like every file) into
// the directory before it moves into place, so every output of gqa-convert and gqa-uptrain carries it. It is how
// --force tells a directory this tool wrote (which it may replace) from anything else, an ordinary checkpoint or a
// model download above all, which it never replaces: is_marked_output() checks it, and the writers never copy an
// input's marker (a fresh one is written).
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/safetensors_io.hpp"
#include "gqa/errors.hpp"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

namespace gqa::detail {

/// 8 hex digits of a hash of the host name: staging directories on a shared file system are only judged stale by
/// runs on the host that made them, which can tell whether their process still lives.
inline std::string host_tag() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) name[0] = '\0';
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char* p = name; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ULL;
  static constexpr char hex[] = "0123456789abcdef";
  std::string s(8, '0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = hex[(h >> (4 * i)) & 15];
  return s;
}

/// A staging (".gqa-tmp-") or set-aside (".gqa-old-") directory name, taken apart.
struct ScratchName {
  std::string output;  ///< the OUTPUT it belongs to (a file name in the same parent)
  bool old = false;    ///< a set-aside previous output rather than a staging directory
  std::string host;
  long pid = 0;
};

inline std::string scratch_name(const std::string& output, bool old, long pid, const std::string& random) {
  return "." + output + (old ? ".gqa-old-" : ".gqa-tmp-") + host_tag() + "-" + std::to_string(pid) + "-" + random;
}

/// Parses ".<output>.gqa-{tmp,old}-<8 hex>-<pid>-<12 hex>", or nullopt for any other name.
inline std::optional<ScratchName> parse_scratch_name(std::string_view name) {
  auto hex_run = [](std::string_view s) {
    for (char c : s)
      if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    return true;
  };
  if (name.size() < 2 || name[0] != '.') return std::nullopt;
  const auto dash = name.rfind('-');
  if (dash == std::string_view::npos || name.size() - dash - 1 != 12 || !hex_run(name.substr(dash + 1)))
    return std::nullopt;
  const auto pid_dash = name.rfind('-', dash - 1);
  if (pid_dash == std::string_view::npos || pid_dash + 1 == dash || dash - pid_dash - 1 > 9) return std::nullopt;
  long pid = 0;
  for (char c : name.substr(pid_dash + 1, dash - pid_dash - 1)) {
    if (c < '0' || c > '9') return std::nullopt;
    pid = pid * 10 + (c - '0');
  }
  if (pid_dash < 9 || name[pid_dash - 9] != '-' || !hex_run(name.substr(pid_dash - 8, 8))) return std::nullopt;
  const std::string_view head = name.substr(0, pid_dash - 9);  // ".<output>.gqa-tmp"
  ScratchName s;
  if (head.size() > 9 && head.substr(head.size() - 8) == ".gqa-tmp") s.old = false;
  else if (head.size() > 9 && head.substr(head.size() - 8) == ".gqa-old") s.old = true;
  else return std::nullopt;
  s.output = std::string(head.substr(1, head.size() - 9));
  s.host = std::string(name.substr(pid_dash - 8, 8));
  s.pid = pid;
  return s;
}

/// True unless the process is known to be gone (kill(pid, 0) says ESRCH).
inline bool process_may_live(long pid) {
  if (pid <= 0) return true;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
}

/// Removes this host's staging directories in `parent` whose process is gone, and puts a set-aside previous output
/// back under its name if that name is free (the two-rename fallback was interrupted). Returns what it did, one line
/// each. Best effort: an entry that cannot be removed is left for a later run.
inline std::vector<std::string> clean_stale_scratch(const std::filesystem::path& parent) {
  namespace fs = std::filesystem;
  std::vector<std::string> done;
  std::error_code ec;
  const std::string host = host_tag();
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto s = parse_scratch_name(name);
    if (!s || s->host != host || process_may_live(s->pid)) continue;
    std::error_code e2;
    if (s->old && !fs::exists(fs::symlink_status(parent / s->output, e2)) &&
        ::rename((parent / name).c_str(), (parent / s->output).c_str()) == 0) {
      done.push_back("restored " + s->output + " from " + name);
      continue;
    }
    if (fs::remove_all(parent / name, e2) != static_cast<std::uintmax_t>(-1) && !e2)
      done.push_back("removed stale " + name);
  }
  return done;
}

/// renameat2 with `flags`; -1 with errno ENOSYS where the C library lacks it.
inline int rename_with_flags(const char* from, const char* to, unsigned flags) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  return ::renameat2(AT_FDCWD, from, AT_FDCWD, to, flags);
#else
  (void)from, (void)to, (void)flags;
  errno = ENOSYS;
  return -1;
#endif
}

#if !defined(RENAME_EXCHANGE)
inline constexpr unsigned rename_exchange = 2, rename_noreplace = 1;
#else
inline constexpr unsigned rename_exchange = RENAME_EXCHANGE, rename_noreplace = RENAME_NOREPLACE;
#endif

/// The marker file every committed output holds (see the header comment), and its content: a first line that
/// is_marked_output() checks, then a line for people.
inline constexpr std::string_view output_marker_name = ".gqa-output";
inline constexpr std::string_view output_marker_text =
    "gqa-output 1\n"
    "Written by gqa (gqa-convert / gqa-uptrain); their --force may replace this directory.\n";

/// Whether `dir` holds gqa's marker: a regular file (not a link) named output_marker_name whose first line is the
/// marker's.
inline bool is_marked_output(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path marker = dir / std::string(output_marker_name);
  std::error_code ec;
  if (!fs::is_regular_file(fs::symlink_status(marker, ec))) return false;
  std::FILE* f = std::fopen(marker.c_str(), "rb");
  if (!f) return false;
  const std::string_view first = output_marker_text.substr(0, output_marker_text.find('\n') + 1);
  std::string head(first.size(), '\0');
  const std::size_t got = std::fread(head.data(), 1, head.size(), f);
  std::fclose(f);
  return got == first.size() && head == first;
}

/// A directory built under a staging name beside `destination` and moved onto it by commit() (see the header comment).
class OutputDirectory {
 public:
  /// Cleans stale scratch directories in the destination's parent, then creates the staging directory. With
  /// `replace`, commit() replaces an existing destination; without, it refuses to.
  OutputDirectory(std::filesystem::path destination, bool replace)
      : destination_(std::move(destination)), replace_(replace) {
    parent_ = destination_.parent_path();
    cleaned_ = clean_stale_scratch(parent_);
    const std::string name = destination_.filename().string();
    for (int attempt = 0;; ++attempt) {
      std::filesystem::path p = parent_ / scratch_name(name, false, static_cast<long>(::getpid()), random_suffix());
      if (::mkdir(p.c_str(), 0777) == 0) {
        staging_ = std::move(p);
        return;
      }
      if (errno != EEXIST || attempt >= 100) throw_errno("cannot create a directory in", parent_);
    }
  }
  OutputDirectory(const OutputDirectory&) = delete;
  OutputDirectory& operator=(const OutputDirectory&) = delete;
  ~OutputDirectory() { remove(staging_); }

  /// Where to write the contents.
  const std::filesystem::path& path() const noexcept { return staging_; }
  /// What the constructor's clean-up did (one line per directory removed or restored).
  const std::vector<std::string>& cleaned() const noexcept { return cleaned_; }

  /// How commit() replaces an existing destination: `exchange` falls back to `two_renames` on a file system that
  /// cannot exchange; `two_renames` is that fallback, always (for its tests).
  enum class Replace { exchange, two_renames };

  /// Writes the marker, syncs the staging directory and moves it onto the destination; on failure the destination is
  /// as it was.
  void commit(Replace how = Replace::exchange) {
    write_file_atomically(staging_ / std::string(output_marker_name), output_marker_text);
    fsync_directory(staging_);
    if (!replace_) {
      int rc = rename_with_flags(staging_.c_str(), destination_.c_str(), rename_noreplace);
      if (rc != 0 && (errno == EINVAL || errno == ENOSYS)) rc = ::rename(staging_.c_str(), destination_.c_str());
      if (rc != 0) throw_errno("cannot rename the new output onto", destination_);
    } else if (how == Replace::exchange &&
               rename_with_flags(staging_.c_str(), destination_.c_str(), rename_exchange) == 0) {
      // staging_ now names the previous output.
    } else if (how == Replace::two_renames || errno == EINVAL || errno == ENOSYS) {
      replace_in_two_steps();
    } else {
      throw_errno("cannot exchange the new output with", destination_);
    }
    std::filesystem::path previous = std::move(staging_);
    staging_.clear();
    fsync_directory(parent_);
    remove(previous);
  }

 private:
  void replace_in_two_steps() {
    const std::filesystem::path old =
        parent_ / scratch_name(destination_.filename().string(), true, static_cast<long>(::getpid()), random_suffix());
    if (::rename(destination_.c_str(), old.c_str()) != 0) throw_errno("cannot move the existing output aside:",
                                                                      destination_);
    if (::rename(staging_.c_str(), destination_.c_str()) != 0) {
      const int err = errno;
      (void)::rename(old.c_str(), destination_.c_str());
      throw io_error(concat("[gqa.io] ", os_error(err, "cannot rename the new output onto", destination_)));
    }
    std::filesystem::path discard = old;
    staging_.swap(discard);  // the caller removes what staging_ names: the previous output
  }

  static void remove(const std::filesystem::path& p) noexcept {
    if (p.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(p, ec);
  }

  std::filesystem::path destination_, parent_, staging_;
  bool replace_;
  std::vector<std::string> cleaned_;
};

}  // namespace gqa::detail
