// Wall-clock timing on the host. For device work use EventTimer (cuda_utils.h).
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace dsv3 {

class CpuTimer {
 public:
  CpuTimer() : t0_(std::chrono::steady_clock::now()) {}
  void reset() { t0_ = std::chrono::steady_clock::now(); }
  double elapsed_ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  std::chrono::steady_clock::time_point t0_;
};

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median wall time in ms of `reps` calls of fn after `warmup` calls. sync() is called after each call
// (pass a device synchronise for GPU work timed from the host).
template <typename Fn, typename Sync>
double median_time_ms(Fn&& fn, Sync&& sync, int warmup = 3, int reps = 20) {
  for (int i = 0; i < warmup; ++i) fn();
  sync();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CpuTimer timer;
    fn();
    sync();
    t.push_back(timer.elapsed_ms());
  }
  return median(t);
}

}  // namespace dsv3
