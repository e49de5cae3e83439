// Errors: the typed user error and the checks every stage uses on its inputs.
//
// Two kinds of failure exist in this repository:
//   UserError    something a user handed us is wrong (config, file, flag, shape); the message says what
//                and what to do. Demos catch it in run_main() and exit with code 2 and one line on stderr.
//   CudaError    a CUDA/cuBLAS call failed; CUDA_CHECK and friends (cuda_utils.h) throw it with the
//                statement, file and line.
// Nothing aborts on user input: no bare assert.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace dsv3 {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

// Throws UserError(fmt::format(...)) when cond is false.
template <typename... Args>
void require(bool cond, fmt::format_string<Args...> f, Args&&... args) {
  if (!cond) throw UserError(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace dsv3
