// Finite-value checks for tensors read from files (weights, optimizer moments) and about to be written: a NaN
// or an infinity in a checkpoint is refused on load and never written, so one bad value cannot spread into every
// later run that resumes from it.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/errors.h"

namespace dsv3 {

// Index of the first NaN or infinity of v[0, n), or -1 when all are finite.
inline int64_t first_non_finite(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return i;
  return -1;
}

// UserError "<what> holds a non-finite value (nan) at element i" unless every value is finite.
inline void require_finite(const std::vector<float>& v, const std::string& what) {
  const int64_t i = first_non_finite(v.data(), int64_t(v.size()));
  require(i < 0, "{} holds a non-finite value ({}) at element {}", what, v[size_t(i < 0 ? 0 : i)], i);
}

}  // namespace dsv3
