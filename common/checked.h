// Size arithmetic on numbers read from files and flags (shapes, counts, token totals): an overflow is a UserError
// naming the quantity, never a wrapped value that allocates or indexes wrongly later.
#pragma once

#include <cstdint>
#include <string>

#include "common/errors.h"

namespace dsv3 {

inline int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  require(!__builtin_mul_overflow(a, b, &r), "{}: {} x {} overflows 64 bits", what, a, b);
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  require(!__builtin_add_overflow(a, b, &r), "{}: {} + {} overflows 64 bits", what, a, b);
  return r;
}

}  // namespace dsv3
