// mixpeft/io/atomic_file.hpp — crash-safe file writes and whole-file reads (POSIX).
//
// write_file_atomically(path, writer) makes `path` hold either its previous contents or the complete
// new contents, never a torn mix, even if the process dies half-way:
//   1. open a fresh temporary "<dir>/.<name>.tmp.<pid>.<n>" in the target's directory (same file system),
//   2. let `writer` stream bytes into it through a ByteSink,
//   3. fsync the temporary, close it, rename(2) it over `path` (atomic on POSIX),
//   4. fsync the directory so that the rename itself is durable.
// If the writer throws, its exception propagates unchanged; if the system refuses a step, IoError is
// thrown naming the path and strerror(errno). Either way the temporary is removed and the previous
// file is untouched.
//
// read_file_bytes(path) reads a whole file into memory (IoError when it cannot be opened or read).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"

namespace mixpeft {

namespace detail::atomic_file {

inline std::string system_error(std::string_view what, const std::filesystem::path& path, int err) {
  return concat(what, " '", path.string(), "': ", std::strerror(err));
}

inline std::filesystem::path temp_path_for(const std::filesystem::path& target) {
  static std::atomic<unsigned long> counter{0};
  const auto name = concat('.', target.filename().string(), ".tmp.", ::getpid(), '.', counter++);
  return target.parent_path() / name;
}

// fsync of the directory holding `path`, so a completed rename survives a power loss.
inline void sync_directory(const std::filesystem::path& path) {
  const auto dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw IoError(system_error("cannot open directory", dir, errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory (EINVAL); the rename has still happened.
  if (rc != 0 && err != EINVAL) throw IoError(system_error("cannot fsync directory", dir, err));
}

}  // namespace detail::atomic_file

// The write end handed to a writer callback: unbuffered writes of whole byte ranges.
class ByteSink {
 public:
  ByteSink(int fd, std::filesystem::path target) : fd_(fd), target_(std::move(target)) {}

  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ::ssize_t written = ::write(fd_, p, n);
      if (written < 0) {
        if (errno == EINTR) continue;
        throw IoError(detail::atomic_file::system_error("cannot write", target_, errno));
      }
      p += written;
      n -= std::size_t(written);
      bytes_ += std::size_t(written);
    }
  }
  void write(std::string_view s) { write(s.data(), s.size()); }
  std::size_t bytes_written() const { return bytes_; }

 private:
  int fd_;
  std::filesystem::path target_;
  std::size_t bytes_ = 0;
};

inline void write_file_atomically(const std::filesystem::path& path, const std::function<void(ByteSink&)>& writer) {
  namespace af = detail::atomic_file;
  const auto tmp = af::temp_path_for(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw IoError(af::system_error("cannot create temporary file for", path, errno));
  bool fd_open = true;
  try {
    ByteSink sink(fd, path);
    writer(sink);
    if (::fsync(fd) != 0) throw IoError(af::system_error("cannot fsync", path, errno));
    fd_open = false;
    if (::close(fd) != 0) throw IoError(af::system_error("cannot close", path, errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw IoError(af::system_error("cannot rename temporary file onto", path, errno));
  } catch (...) {
    if (fd_open) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  af::sync_directory(path);
}

inline void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  write_file_atomically(path, [&](ByteSink& sink) { sink.write(contents); });
}

inline std::vector<char> read_file_bytes(const std::filesystem::path& path) {
  namespace af = detail::atomic_file;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(af::system_error("cannot open", path, errno));
  std::vector<char> bytes;
  char chunk[1 << 16];
  for (;;) {
    const ::ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw IoError(af::system_error("cannot read", path, err));
    }
    bytes.insert(bytes.end(), chunk, chunk + n);
  }
  ::close(fd);
  return bytes;
}

}  // namespace mixpeft
