// gqa/detail/safetensors_io.hpp — POSIX file machinery behind gqa/safetensors.hpp and gqa/checkpoint.hpp:
// a read-only memory mapping, and files that appear under their final name only once complete (temp + fsync +
// rename). Not part of the public API; include gqa/safetensors.hpp instead.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/errors.hpp"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace gqa::detail {

/// "<what> '<path>': <strerror(err)>".
inline std::string os_error(int err, const char* what, const std::filesystem::path& path) {
  return concat(what, " '", path.string(), "': ", std::strerror(err));
}

/// Throws io_error [gqa.io] naming errno. Call it straight after the failing call, as
/// `if (::fsync(fd) != 0) throw_errno("cannot fsync", path);`: errno is read before anything else runs. (Passing
/// an errno-reading message to require() is wrong, because function arguments are evaluated in an unspecified
/// order: the message may be built before the call it describes.)
[[noreturn]] inline void throw_errno(const char* what, const std::filesystem::path& path) {
  const int err = errno;
  throw io_error(concat("[gqa.io] ", os_error(err, what, path)));
}

/// Counts fsync calls, so tests can see that every file written or copied is synced before it is renamed into place
/// (nothing else observes an fsync short of pulling the power).
inline std::atomic<std::uint64_t>& fsync_count() noexcept {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

/// fsync that throws io_error on failure.
inline void fsync_checked(int fd, const std::filesystem::path& path) {
  if (::fsync(fd) != 0) throw_errno("cannot fsync", path);
  fsync_count().fetch_add(1, std::memory_order_relaxed);
}

/// Owns a file descriptor; closes it on destruction.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) noexcept : fd_(fd) {}
  FileDescriptor(FileDescriptor&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }

  int get() const noexcept { return fd_; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  /// Closes and reports the error close() gives (on NFS, delayed write errors surface here).
  void close_checked(const std::filesystem::path& path) {
    const int fd = std::exchange(fd_, -1);
    if (fd >= 0 && ::close(fd) != 0) throw_errno("close", path);
  }

 private:
  int fd_ = -1;
};

/// Opens an existing regular file read-only. O_NONBLOCK makes opening a FIFO return at once instead of waiting for
/// a writer, so a FIFO or device put in place of a checkpoint file is refused rather than hanging.
inline FileDescriptor open_regular_file(const std::filesystem::path& path, struct stat& st) {
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (fd.get() < 0) throw_errno("cannot open", path);
  if (::fstat(fd.get(), &st) != 0) throw_errno("cannot stat", path);
  require<io_error>(S_ISREG(st.st_mode), "io", "'", path.string(), "' is not a regular file (",
                    S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISDIR(st.st_mode) ? "a directory" : "a special file", ")");
  // Regular files ignore O_NONBLOCK for reads, but clear it anyway so that later reads are plain blocking reads.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) throw_errno("cannot fcntl", path);
  return fd;
}

/// A whole file mapped read-only (MAP_PRIVATE). An empty file maps to no memory. The mapping lives as long as this
/// object; moving it keeps the address, so views into it stay valid. If another process truncates the file while it
/// is mapped, reading the lost pages raises SIGBUS: that is the price of zero copy, as for every mmap reader.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path) {
    struct stat st {};
    const FileDescriptor fd = open_regular_file(path, st);
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ == 0) return;
    void* addr = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (addr == MAP_FAILED) throw_errno("cannot mmap", path);
    data_ = static_cast<const std::byte*>(addr);
  }
  MappedFile(MappedFile&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { unmap(); }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  void unmap() noexcept {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// fsync a directory, so a rename inside it survives a crash. Best effort: some file systems refuse it.
inline void fsync_directory(const std::filesystem::path& dir) noexcept {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
}

/// 12 random hex digits for temporary names (not security-relevant: creation uses O_EXCL / mkdir, which fail
/// rather than reuse an existing name).
inline std::string random_suffix() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (std::uint64_t{rd()} << 32) ^ rd() ^ static_cast<std::uint64_t>(::getpid()) ^
           static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }());
  static constexpr char hex[] = "0123456789abcdef";
  std::string s(12, '0');
  std::uint64_t x = rng();
  for (auto& c : s) {
    c = hex[x & 15];
    x >>= 4;
  }
  return s;
}

/// Creates a new directory `<parent>/<prefix><random>` with the default permissions (0777 minus the umask, as
/// mkdir gives; mkdtemp would give 0700) and returns its path.
inline std::filesystem::path make_unique_directory(const std::filesystem::path& parent, const std::string& prefix) {
  for (int attempt = 0;; ++attempt) {
    std::filesystem::path p = parent / (prefix + random_suffix());
    if (::mkdir(p.c_str(), 0777) == 0) return p;
    if (errno != EEXIST || attempt >= 100) throw_errno("cannot create a directory in", parent);
  }
}

/// A file written under a unique temporary name next to its destination, renamed into place by commit() once it is
/// complete and fsync'ed. Destroyed without commit() (an exception, a failed write), it removes the temporary file,
/// so readers never see a half-written file under the destination's name.
class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path destination) : destination_(std::move(destination)) {
    const std::filesystem::path dir = destination_.parent_path();
    for (int attempt = 0;; ++attempt) {
      std::filesystem::path p = dir / ("." + destination_.filename().string() + ".tmp-" + random_suffix());
      // 0666 minus the umask, the permissions of an ordinary new file (mkstemp would give 0600).
      const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd >= 0) {
        fd_ = FileDescriptor(fd);
        temp_ = std::move(p);
        return;
      }
      if (errno != EEXIST || attempt >= 100)
        throw_errno("cannot create a temporary file in", dir.empty() ? std::filesystem::path(".") : dir);
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    fd_.reset();
    if (!temp_.empty()) ::unlink(temp_.c_str());
  }

  /// Appends all of `bytes`. Small pieces are gathered in a buffer, so a file of many small tensors (norm weights,
  /// a 100k-entry test) costs few system calls.
  void write(const void* bytes, std::size_t size) {
    if (buffer_.size() + size <= buffer_capacity) {
      const char* p = static_cast<const char*>(bytes);
      buffer_.insert(buffer_.end(), p, p + size);
      return;
    }
    flush();
    if (size < buffer_capacity) return write(bytes, size);
    write_all(bytes, size);
  }
  void write(std::string_view s) { write(s.data(), s.size()); }

  /// fsync, close, rename onto the destination (replacing it), fsync the directory.
  void commit() {
    flush();
    fsync_checked(fd_.get(), temp_);
    fd_.close_checked(temp_);
    if (::rename(temp_.c_str(), destination_.c_str()) != 0)
      throw_errno("cannot rename the temporary file onto", destination_);
    temp_.clear();
    fsync_directory(destination_.parent_path());
  }

 private:
  static constexpr std::size_t buffer_capacity = std::size_t{1} << 20;

  void flush() {
    write_all(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

  /// Writes all of `bytes` to the file (retrying short writes and EINTR).
  void write_all(const void* bytes, std::size_t size) {
    const char* p = static_cast<const char*>(bytes);
    while (size > 0) {
      const std::size_t chunk = size < (std::size_t{1} << 30) ? size : (std::size_t{1} << 30);
      const ssize_t n = ::write(fd_.get(), p, chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw_errno("cannot write", temp_);
      require<io_error>(n > 0, "io", "cannot write '", temp_.string(), "': write returned 0");
      p += n;
      size -= static_cast<std::size_t>(n);
    }
  }
  std::filesystem::path destination_;
  std::filesystem::path temp_;
  FileDescriptor fd_;
  std::vector<char> buffer_;
};

/// Writes `content` to `path` through an AtomicFile.
inline void write_file_atomically(const std::filesystem::path& path, std::string_view content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

}  // namespace gqa::detail
