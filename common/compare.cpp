#include "common/compare.h"

#include <fmt/format.h>

#include <cmath>

namespace dsv3 {

template <typename A, typename B>
CompareResult compare(const A* got, const B* ref, size_t n, Tolerance tol) {
  CompareResult r;
  r.n = n;
  double diff2 = 0.0, ref2 = 0.0;
  const double rel_floor = tol.rtol > 0 ? tol.atol / tol.rtol : tol.atol;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), e = static_cast<double>(ref[i]);
    const double d = std::abs(g - e);
    const bool finite_mismatch = std::isfinite(e) && !std::isfinite(g);
    const bool bad = finite_mismatch || !(d <= tol.atol + tol.rtol * std::abs(e));
    if (std::isfinite(d)) {
      diff2 += d * d;
      r.max_abs = std::max(r.max_abs, d);
      r.max_rel = std::max(r.max_rel, d / (std::abs(e) + rel_floor));
    } else {
      r.max_abs = r.max_rel = INFINITY;
    }
    ref2 += e * e;
    if (bad) {
      if (r.first_bad.size() < 8) r.first_bad.push_back(fmt::format("[{}] got={:.9g} ref={:.9g}", i, g, e));
      ++r.n_bad;
    }
  }
  r.norm_err = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  if (r.max_abs == INFINITY) r.norm_err = INFINITY;
  return r;
}

std::string CompareResult::summary() const {
  return fmt::format("max abs {:.2e}, max rel {:.2e}, norm {:.2e} ({} of {} outside tolerance)", max_abs,
                     max_rel, norm_err, n_bad, n);
}

std::string CompareResult::report(const std::string& what) const {
  std::string s = fmt::format("{}: {}", what, summary());
  for (const auto& b : first_bad) s += "\n  " + b;
  return s;
}

template CompareResult compare(const float*, const float*, size_t, Tolerance);
template CompareResult compare(const float*, const double*, size_t, Tolerance);
template CompareResult compare(const double*, const double*, size_t, Tolerance);
template CompareResult compare(const double*, const float*, size_t, Tolerance);

}  // namespace dsv3
