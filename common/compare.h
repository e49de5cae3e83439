// Compare a computed tensor with a reference: |got - ref| <= atol + rtol * |ref| elementwise.
// A failure report gives max abs error, max rel error, the normalised error ||got-ref|| / ||ref||
// and the first mismatches with their indices. NaN or Inf in `got` where ref is finite always fails.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace dsv3 {

struct Tolerance {
  double atol;
  double rtol;
};

// Tolerances used across the repository (DESIGN.md §3), derived from fp32 rounding:
//   elementwise fp32 work: a few ulps (2^-23 ~ 1.2e-7) per op over ~10 ops -> 1e-5.
//   fp32 reductions whose order differs between CPU and GPU: error grows ~ sqrt(n) ulps -> 1e-4.
inline constexpr Tolerance kElementwiseTol{1e-6, 1e-5};
inline constexpr Tolerance kReductionTol{1e-5, 1e-4};

struct CompareResult {
  size_t n = 0;
  size_t n_bad = 0;
  double max_abs = 0.0;
  // max |got-ref| / (|ref| + atol/rtol): relative to |ref| where |ref| is large, and to the tolerance's own
  // floor near zero, so the test passes exactly when max_rel <= rtol (up to the atol/rtol split).
  double max_rel = 0.0;
  double norm_err = 0.0;  // ||got - ref||_2 / ||ref||_2
  std::vector<std::string> first_bad;  // "[i] got=... ref=..." for up to 8 mismatches
  bool ok() const { return n_bad == 0; }
  std::string summary() const;  // one line: "max abs 1.2e-07, max rel 3.4e-06, norm 2.1e-07"
  std::string report(const std::string& what) const;  // summary plus the mismatches
};

template <typename A, typename B>
CompareResult compare(const A* got, const B* ref, size_t n, Tolerance tol);

template <typename A, typename B>
CompareResult compare(const std::vector<A>& got, const std::vector<B>& ref, Tolerance tol) {
  CompareResult r;
  if (got.size() != ref.size()) {
    r.n_bad = 1;
    r.first_bad.push_back("size mismatch: got " + std::to_string(got.size()) + ", ref " +
                          std::to_string(ref.size()));
    return r;
  }
  return compare(got.data(), ref.data(), got.size(), tol);
}

}  // namespace dsv3
