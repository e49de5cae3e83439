// Files (files.h).
#include "common/files.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <system_error>

#include "common/errors.h"

namespace dsv3 {

std::string read_file(const std::string& path, const std::string& what, uint64_t max_bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);  // follows symlinks: a link to /dev/zero is a device
  require(fs::exists(st), "{} '{}' does not exist{}", what, path, ec && ec != std::errc::no_such_file_or_directory
          ? fmt::format(" or cannot be reached ({})", ec.message()) : "");
  require(!fs::is_directory(st), "{} '{}' is a directory, not a file", what, path);
  require(fs::is_regular_file(st), "{} '{}' is not a regular file (a device, FIFO or socket): only files are read",
          what, path);
  const uint64_t size = fs::file_size(path, ec);
  require(!ec, "{} '{}' cannot be read: {}", what, path, ec.message());
  require(size <= max_bytes, "{} '{}' is {} bytes, more than the {} this file can hold", what, path, size, max_bytes);
  std::ifstream f(path, std::ios::binary);
  require(f.good(), "{} '{}' cannot be read (permissions?)", what, path);
  std::string bytes(size, '\0');
  f.read(bytes.data(), std::streamsize(size));
  require(!f.bad() && uint64_t(f.gcount()) == size, "{} '{}': read error (the file changed while being read?)", what,
          path);
  return bytes;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string tmp = (dir / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()))).string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  require(fd >= 0, "cannot create '{}': {}", tmp, std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w <= 0) {
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw UserError(fmt::format("writing '{}' failed: {}", tmp, std::strerror(e)));
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw UserError(fmt::format("flushing '{}' failed: {}", tmp, std::strerror(e)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw UserError(fmt::format("cannot replace '{}': {}", path, std::strerror(e)));
  }
  fsync_path(dir.string());  // make the rename itself durable
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void rename_or_throw(const std::string& from, const std::string& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  require(!ec, "cannot rename '{}' to '{}': {}", from, to, ec.message());
}

void remove_or_throw(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  require(!ec, "cannot remove '{}': {}", path, ec.message());
}

void ensure_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require(!ec && std::filesystem::is_directory(dir), "cannot create output folder '{}': {}", dir, ec.message());
}

}  // namespace dsv3
