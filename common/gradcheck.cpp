#include "common/gradcheck.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/errors.h"
#include "common/rng.h"

namespace dsv3 {

static std::vector<size_t> coords_to_check(size_t n, size_t max_coords, Rng& rng) {
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), size_t{0});
  if (max_coords == 0 || max_coords >= n) return idx;
  for (size_t i = 0; i < max_coords; ++i) std::swap(idx[i], idx[i + rng.below(n - i)]);  // partial shuffle
  idx.resize(max_coords);
  std::sort(idx.begin(), idx.end());
  return idx;
}

GradCheckResult gradcheck(const std::function<double()>& loss, const std::vector<GradTensor>& tensors,
                          const GradCheckOptions& opt) {
  GradCheckResult res;
  Rng rng(opt.seed);
  const uint64_t base_sig = opt.decision_signature ? opt.decision_signature() : 0;
  if (opt.decision_signature) loss();  // signature is read after a forward: run one on the base point
  for (const auto& t : tensors) {
    require(t.value && t.analytic && t.value->size() == t.analytic->size(),
            "gradcheck: tensor '{}' has {} values but {} gradients", t.name, t.value ? t.value->size() : 0,
            t.analytic ? t.analytic->size() : 0);
    GradCheckTensorResult tr;
    tr.name = t.name;
    for (size_t i : coords_to_check(t.value->size(), opt.max_coords, rng)) {
      double& x = (*t.value)[i];
      const double x0 = x;
      x = x0 + opt.h;
      const double lp = loss();
      const bool flip_p = opt.decision_signature && opt.decision_signature() != base_sig;
      x = x0 - opt.h;
      const double lm = loss();
      const bool flip_m = opt.decision_signature && opt.decision_signature() != base_sig;
      x = x0;
      if (flip_p || flip_m) {
        ++tr.skipped;
        continue;
      }
      const double num = (lp - lm) / (2 * opt.h);
      const double ana = (*t.analytic)[i];
      const double err = std::abs(num - ana);
      const double scale = std::max(std::abs(num), std::abs(ana));
      ++tr.checked;
      tr.max_abs_err = std::max(tr.max_abs_err, err);
      tr.max_rel_err = std::max(tr.max_rel_err, err / (scale + opt.atol));
      if (!(err <= opt.atol + opt.rtol * scale)) {
        ++tr.bad;
        if (tr.first_bad.size() < 5)
          tr.first_bad.push_back(fmt::format("{}[{}]: numeric {:.10g} analytic {:.10g}", t.name, i, num, ana));
      }
    }
    res.checked += tr.checked;
    res.skipped += tr.skipped;
    res.bad += tr.bad;
    res.tensors.push_back(std::move(tr));
  }
  if (opt.decision_signature) loss();  // leave the layer's saved state at the base point
  const size_t total = res.checked + res.skipped;
  res.too_many_skipped = total > 0 && static_cast<double>(res.skipped) > opt.max_skip_fraction * total;
  return res;
}

std::string GradCheckResult::report() const {
  std::string s = fmt::format("gradcheck: {} coordinates checked, {} skipped (routing flips), {} wrong{}",
                              checked, skipped, bad, too_many_skipped ? " -- TOO MANY SKIPPED" : "");
  for (const auto& t : tensors) {
    s += fmt::format("\n  {:<16} checked {:>5} skipped {:>3} bad {:>3}  max abs err {:.2e}  max rel err {:.2e}",
                     t.name, t.checked, t.skipped, t.bad, t.max_abs_err, t.max_rel_err);
    for (const auto& b : t.first_bad) s += "\n    " + b;
  }
  return s;
}

double weighted_sum(const std::vector<double>& out, const std::vector<double>& R) {
  require(out.size() == R.size(), "weighted_sum: {} outputs but {} weights", out.size(), R.size());
  double s = 0.0;
  for (size_t i = 0; i < out.size(); ++i) s += R[i] * out[i];
  return s;
}

}  // namespace dsv3
