// Helpers shared by the libFuzzer targets (fuzz/README.md).
//
// The contract every target checks: a hostile input may only end in dsv3::UserError (the project's "bad input"
// error, common/errors.h). Any other exception escapes LLVMFuzzerTestOneInput, std::terminate aborts, and
// libFuzzer reports it as a crash, as it does a sanitizer report, a timeout or going over -rss_limit_mb.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "common/errors.h"

namespace dsv3::fuzz {

// One scratch folder per fuzzing process (APIs that take paths read files from it), removed at exit.
class ScratchDir {
 public:
  ScratchDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/dsv3-fuzz-XXXXXX";
    if (!::mkdtemp(tmpl.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline const ScratchDir& scratch() {
  static const ScratchDir dir;
  return dir;
}

// Writes bytes to path with plain stdio (the fuzz harness must not depend on the code under test to set up).
inline void write_bytes(const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (size && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
}
inline void write_bytes(const std::string& path, const std::string& bytes) {
  write_bytes(path, bytes.data(), bytes.size());
}

// Inputs that hold several files are the files joined by this separator line (fuzz/README.md); the dictionaries
// in fuzz/dicts/ hold it, so mutations can add or remove a part.
constexpr char kSeparator[] = "\n--8<-- next file --8<--\n";

// The first n parts of data split at kSeparator; missing parts are empty, the last part keeps any further
// separators.
inline std::vector<std::string> split_parts(const uint8_t* data, size_t size, size_t n) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  const std::string sep(kSeparator);
  std::vector<std::string> parts;
  size_t pos = 0;
  while (parts.size() + 1 < n) {
    const size_t at = all.find(sep, pos);
    if (at == std::string::npos) break;
    parts.push_back(all.substr(pos, at - pos));
    pos = at + sep.size();
  }
  parts.push_back(all.substr(std::min(pos, all.size())));
  parts.resize(n);
  return parts;
}

inline std::string join_parts(const std::vector<std::string>& parts) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? std::string(kSeparator) : std::string()) + parts[i];
  return out;
}

// A broken invariant that is not a sanitizer report (e.g. a round trip that changes the value): print and abort,
// so libFuzzer saves the input as a crash.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what.c_str());
  std::abort();
}

}  // namespace dsv3::fuzz
