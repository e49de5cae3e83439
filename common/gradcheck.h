// Gradient check by central differences, in double.
//
// The caller provides
//   loss()      runs the forward on the current values and returns sum(R * out) for a fixed random R
//               (a plain sum would hide a backward that ignores its incoming gradient), plus any
//               auxiliary losses of the layer;
//   tensors     every input and parameter: its values (perturbed in place, restored afterwards) and the
//               analytic gradient that the backward under test produced for the same loss.
// For each checked coordinate x_i:  num_i = (loss(x_i + h) - loss(x_i - h)) / 2h and the check is
//   |num_i - ana_i| <= atol + rtol * max(|num_i|, |ana_i|).
// Routing is piecewise smooth: `decision_signature` (optional) returns a hash of the discrete choices
// (top-k sets); a coordinate whose +h or -h perturbation changes it is skipped and counted, and the check
// fails when more than max_skip_fraction of the coordinates were skipped.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dsv3 {

struct GradTensor {
  std::string name;
  std::vector<double>* value;
  const std::vector<double>* analytic;
};

struct GradCheckOptions {
  double h = 1e-6;
  double atol = 1e-7;
  double rtol = 1e-5;
  size_t max_coords = 0;  // per tensor; 0 = every coordinate, else a seeded random sample
  uint64_t seed = 1234;
  std::function<uint64_t()> decision_signature;  // empty = the function is smooth everywhere
  double max_skip_fraction = 0.05;
};

struct GradCheckTensorResult {
  std::string name;
  size_t checked = 0, skipped = 0, bad = 0;
  double max_abs_err = 0.0, max_rel_err = 0.0;
  std::vector<std::string> first_bad;
};

struct GradCheckResult {
  std::vector<GradCheckTensorResult> tensors;
  size_t checked = 0, skipped = 0, bad = 0;
  bool too_many_skipped = false;
  bool ok() const { return bad == 0 && !too_many_skipped && checked > 0; }
  std::string report() const;
};

GradCheckResult gradcheck(const std::function<double()>& loss, const std::vector<GradTensor>& tensors,
                          const GradCheckOptions& opt = {});

// sum_i R_i * out_i: the scalar a gradcheck differentiates. Its gradient with respect to out is R.
double weighted_sum(const std::vector<double>& out, const std::vector<double>& R);

}  // namespace dsv3
