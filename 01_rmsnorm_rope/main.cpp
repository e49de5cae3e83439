// Demo 01_rmsnorm_rope: CPU vs CUDA errors and timings, and three plots:
//   wavelength.png          wavelength of each rotation pair, plain RoPE vs YaRN (V3's settings)
//   score_vs_distance.png   <R_m q, R_n k> for fixed q = k = 1 as |m - n| grows (and averaged over the distances
//                           |m - n|/2 .. 3|m - n|/2), plain vs YaRN
//   rms.png                 RMS of each token before and after RMSNorm
// --check runs the self-checks only (no plots) and exits 1 if any fails.
#include <fmt/format.h>

#include <cmath>
#include <iostream>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/cli.h"
#include "common/compare.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/gradcheck.h"
#include "common/rng.h"
#include "common/timer.h"
#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

namespace {

struct Sizes {
  int B = 4, T = 1024, H = 16, D = 1024;  // rows N = B*T for RMSNorm; rope on q-like heads (Dn 128 | Dr 64)
  int Dn = 128, Dr = 64;
};

using Row = CpuCudaRow;

// Runs one op on the CPU and, when a GPU is present, on CUDA; returns errors and median times.
std::vector<Row> compare_cpu_cuda(const Sizes& s, uint64_t seed, bool time_it) {
  std::vector<Row> rows;
  Rng rng(seed);
  const int N = s.B * s.T, D = s.D;
  auto x = rng.normal_vec<float>(size_t(N) * D, 3.0), w = rng.normal_vec<float>(D, 0.2, 1.0);
  auto dy = rng.normal_vec<float>(x.size());
  std::vector<float> y(x.size()), rstd(N), dx(x.size()), dw(D, 0.f);
  const int reps = time_it ? 10 : 1;
  auto cpu_ms = [&](auto&& fn) { return median_time_ms(fn, [] {}, time_it ? 1 : 0, reps); };

  Row fwd{"rmsnorm_forward", fmt::format("N={} D={}", N, D)}, bwd{"rmsnorm_backward", fwd.shape};
  fwd.cpu_ms = cpu_ms([&] { cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f); });
  std::fill(dw.begin(), dw.end(), 0.f);
  cpu::rmsnorm_backward(dw.data(), dx.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D);
  auto dw_once = dw;
  bwd.cpu_ms = cpu_ms([&] { cpu::rmsnorm_backward(dw.data(), dx.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D); });

  RopeConfig rc;  // V3 YaRN settings
  rc.qk_rope_head_dim = s.Dr;
  const auto tab = rope_tables<float>(rc);
  const int S = s.Dn + s.Dr;
  const RopeDims rd{s.B, s.T, s.H, S, s.Dn, s.Dr, 0};
  auto q = rng.normal_vec<float>(size_t(s.B) * s.T * s.H * S), dq = rng.normal_vec<float>(q.size());
  std::vector<float> qr = q, dqr = dq;
  Row rf{"rope_forward", fmt::format("B={} T={} H={} S={} Dr={}", s.B, s.T, s.H, S, s.Dr)}, rb{"rope_backward", rf.shape};
  rf.cpu_ms = cpu_ms([&] { cpu::rope_forward(qr.data(), q.data(), tab.cos.data(), tab.sin.data(), rd, tab.positions); });
  rb.cpu_ms = cpu_ms([&] { cpu::rope_backward(dqr.data(), dq.data(), tab.cos.data(), tab.sin.data(), rd, tab.positions); });

#ifdef DSV3_HAVE_CUDA
  if (gpu_available()) {
    DeviceBuffer<float> gx(x), gw(w), gdy(dy), gy(x.size()), grstd(N), gdx(x.size()), gdw(D);
    gdw.zero();
    cuda::rmsnorm_forward(gy.get(), grstd.get(), gx.get(), gw.get(), N, D, 1e-6f);
    cuda::rmsnorm_backward(gdw.get(), gdx.get(), gdy.get(), grstd.get(), gx.get(), gw.get(), N, D);
    fwd.err = compare(gy.download(), y, kReductionTol);
    const auto gdw_h = gdw.download();
    auto e_dx = compare(gdx.download(), dx, kReductionTol);
    auto e_dw = compare(gdw_h, dw_once, {1e-5 * std::sqrt(double(N)), 1e-4});
    bwd.err = e_dx.max_rel >= e_dw.max_rel ? e_dx : e_dw;
    bwd.err.n_bad = e_dx.n_bad + e_dw.n_bad;
    fwd.gpu_ms = median_device_ms([&] { cuda::rmsnorm_forward(gy.get(), grstd.get(), gx.get(), gw.get(), N, D, 1e-6f); });
    bwd.gpu_ms = median_device_ms(
        [&] { cuda::rmsnorm_backward(gdw.get(), gdx.get(), gdy.get(), grstd.get(), gx.get(), gw.get(), N, D); });

    DeviceBuffer<float> gcos(tab.cos), gsin(tab.sin), gq(q), gqr(q), gdq(dq), gdqr(dq);
    cuda::rope_forward(gqr.get(), gq.get(), gcos.get(), gsin.get(), rd, tab.positions);
    cuda::rope_backward(gdqr.get(), gdq.get(), gcos.get(), gsin.get(), rd, tab.positions);
    rf.err = compare(gqr.download(), qr, kElementwiseTol);
    rb.err = compare(gdqr.download(), dqr, kElementwiseTol);
    rf.gpu_ms = median_device_ms([&] { cuda::rope_forward(gqr.get(), gq.get(), gcos.get(), gsin.get(), rd, tab.positions); });
    rb.gpu_ms = median_device_ms([&] { cuda::rope_backward(gdqr.get(), gdq.get(), gcos.get(), gsin.get(), rd, tab.positions); });
  }
#endif
  return {fwd, bwd, rf, rb};
}

// Properties a reader can verify on the printed numbers; returns the number of failures.
int self_checks() {
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  };
  const RopeConfig v3;
  const auto r = yarn_correction_range(v3);
  check(r.low == 10 && r.high == 23, fmt::format("YaRN correction range at V3 settings = [{}, {}] (expect [10, 23])", r.low, r.high));
  check(std::abs(yarn_softmax_scale_factor(v3) - 1.8738542) < 1e-6,
        fmt::format("YaRN softmax scale factor = {:.7f} (expect 1.8738542)", yarn_softmax_scale_factor(v3)));
  // Gradcheck of RMSNorm on a small odd shape.
  Rng rng(9);
  const int N = 5, D = 7;
  auto x = rng.normal_vec<double>(N * D), w = rng.normal_vec<double>(D), R = rng.normal_vec<double>(N * D);
  std::vector<double> y(N * D), rstd(N), dx(N * D), dw(D, 0.0);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
  cpu::rmsnorm_backward(dw.data(), dx.data(), R.data(), rstd.data(), x.data(), w.data(), N, D);
  const auto g = gradcheck([&] { cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f); return weighted_sum(y, R); },
                           {{"inp", &x, &dx}, {"weight", &w, &dw}});
  check(g.ok(), fmt::format("RMSNorm gradcheck, {} coordinates", g.checked));
  return failures;
}

void write_wavelengths(const std::string& dir) {
  RopeConfig yarn;  // V3: Dr 64, original 4096, factor 40
  RopeConfig plain = yarn;
  plain.max_seq_len = plain.original_seq_len;
  const auto fy = rope_frequencies(yarn), fp = rope_frequencies(plain);
  const YarnRange r = yarn_correction_range(yarn);
  CsvWriter csv(dir + "/wavelength.csv", {"pair", "plain", "yarn", "original_seq_len", "low", "high"});
  for (size_t i = 0; i < fp.size(); ++i)
    csv.row({double(i), 2 * M_PI / fp[i], 2 * M_PI / fy[i], double(yarn.original_seq_len), double(r.low), double(r.high)});
}

// Mean over the integer distances x in [a, b] of (1/P) sum_i cos(x f_i), in closed form:
// sum_{x=a..b} cos(x f) = sin((b - a + 1) f / 2) cos((a + b) f / 2) / sin(f / 2).
double mean_cos_sum(const std::vector<double>& f, double a, double b) {
  const double n = b - a + 1;
  double s = 0;
  for (double fi : f) s += std::sin(n * fi / 2) * std::cos((a + b) * fi / 2) / std::sin(fi / 2);
  return s / (n * f.size());
}

// The same, averaged over distances around d with triangular weights from d/2 to 3d/2 (peak at d): the mean of
// 16 centred boxcars whose half-widths grow to d/2. A plain boxcar's sharp edges would leave ripples.
double smoothed_cos_sum(const std::vector<double>& f, double d) {
  const int K = 16;
  double s = 0;
  for (int k = 1; k <= K; ++k) {
    const double h = 0.5 * d * k / K;
    s += mean_cos_sum(f, std::max(0.0, std::round(d - h)), std::round(d + h));
  }
  return s / K;
}

void write_scores(const std::string& dir) {
  RopeConfig yarn;
  yarn.max_seq_len = 4096 * 40;  // V3's max_position_embeddings 163840
  RopeConfig plain = yarn;
  plain.original_seq_len = plain.max_seq_len;  // no YaRN
  const auto fy = rope_frequencies(yarn), fp = rope_frequencies(plain);
  // q = k = all ones: <R_m q, R_n k> = sum_i 2 cos((n - m) f_i); normalised by its value at 0. (Random q = k with
  // i.i.d. entries has the same expectation: the cross terms average out.) The sum of 32 cosines oscillates from
  // one distance to the next, so the *_smoothed columns average it over the distances d/2 .. 3d/2 (triangular
  // weights): the trend that the plot shows.
  CsvWriter csv(dir + "/score_vs_distance.csv", {"distance", "plain", "yarn", "plain_smoothed", "yarn_smoothed"});
  for (double dist = 0; dist <= 163840; dist = dist < 64 ? dist + 1 : std::ceil(dist * 1.02)) {
    double sp = 0, sy = 0;
    for (size_t i = 0; i < fp.size(); ++i) {
      sp += std::cos(dist * fp[i]);
      sy += std::cos(dist * fy[i]);
    }
    csv.row({dist, sp / fp.size(), sy / fy.size(), smoothed_cos_sum(fp, dist), smoothed_cos_sum(fy, dist)});
  }
}

void write_rms(const std::string& dir, uint64_t seed) {
  const int N = 64, D = 512;
  Rng rng(seed);
  std::vector<float> x(size_t(N) * D), w(D, 1.f), y(x.size()), rstd(N);
  for (int n = 0; n < N; ++n) {
    const double scale = std::pow(10.0, rng.uniform(-2, 2));  // tokens of wildly different magnitude
    for (int j = 0; j < D; ++j) x[size_t(n) * D + j] = float(scale * rng.normal());
  }
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
  CsvWriter csv(dir + "/rms.csv", {"token", "rms_before", "rms_after"});
  for (int n = 0; n < N; ++n) {
    double a = 0, b = 0;
    for (int j = 0; j < D; ++j) {
      a += double(x[size_t(n) * D + j]) * x[size_t(n) * D + j];
      b += double(y[size_t(n) * D + j]) * y[size_t(n) * D + j];
    }
    csv.row({double(n), std::sqrt(a / D), std::sqrt(b / D)});
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 01: RMSNorm and RoPE/YaRN, CPU reference vs CUDA", "01_rmsnorm_rope"};
  DemoOptions opt;
  Sizes s;
  add_demo_options(app, opt, "out/01_rmsnorm_rope");
  app.add_option("--batch", s.B, "batch size for the timing table")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seq", s.T, "sequence length for the timing table")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--dim", s.D, "RMSNorm width for the timing table")->check(CLI::PositiveNumber)->capture_default_str();
  return run_main(app, argc, argv, [&] {
    std::cout << fmt::format("{}\nseed {}; device: {}\n", command_line(argc, argv), opt.seed, gpu_description());
    int failures = self_checks();
    if (opt.check) s = Sizes{2, 33, 3, 77, 16, 8};  // small odd shapes: fast and indexing-hostile
    const auto rows = compare_cpu_cuda(s, opt.seed, !opt.check);
    failures += print_cpu_cuda_table(rows);
    if (opt.check) {
      std::cout << (failures ? fmt::format("{} check(s) FAILED\n", failures) : "all checks passed\n");
      return failures ? 1 : 0;
    }
    ensure_dir(opt.out);
    write_wavelengths(opt.out);
    write_scores(opt.out);
    write_rms(opt.out, opt.seed);
    render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return failures ? 1 : 0;
  });
}
