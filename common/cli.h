// Command-line handling shared by the demos: named flags through CLI11, and one place that turns a
// UserError into a single line on stderr with exit code 2.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <string>

namespace dsv3 {

// Flags every demo has.
struct DemoOptions {
  std::string out;        // output folder for CSV/PNG diagnostics
  bool check = false;     // run the self-checks only; exit non-zero if any fails
  uint64_t seed = 1234;   // printed at start so a run can be reproduced
};

void add_demo_options(CLI::App& app, DemoOptions& opt, const std::string& default_out);

// For unsigned flags (seeds): CLI11 would wrap "-1" to 2^64 - 1; this refuses any leading minus sign.
inline CLI::Validator unsigned_integer() {
  return CLI::Validator(
      [](const std::string& s) { return s.find('-') == std::string::npos ? std::string() : "must be >= 0, got " + s; },
      "UINT");
}

// Parses argv into app and runs body(). Returns the process exit code:
//   body()'s code; 0 for --help; 2 for a bad flag, a UserError, a path that cannot be used
//   (std::filesystem::filesystem_error) or an allocation the machine cannot hold (std::bad_alloc), one line on
//   stderr; 1 for any other exception (CUDA failure, bug), also one line on stderr.
int run_main(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

// The command line as typed, for the log line that makes a run reproducible.
std::string command_line(int argc, char** argv);

}  // namespace dsv3
