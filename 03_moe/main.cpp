// Demo 03_moe: DeepSeekMoE routing and dispatch, CPU reference vs CUDA, and four plots:
//   load.png            tokens per expert and how often each expert group is kept, for one batch
//   routing_heatmap.png routing weights of the first tokens (token x expert; 0 = not chosen)
//   bias_sweep.png      load of expert 0 as its selection bias is raised (weights never see the bias)
//   time_per_layer.png  forward + backward time of one layer against the number of tokens, CPU vs GPU
// --check runs the self-checks only (small shapes, no plots) and exits 1 if any fails.
#include <fmt/format.h>

#include <cmath>
#include <iostream>
#include <numeric>

#include "03_moe/moe.h"
#include "common/cli.h"
#include "common/compare.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/gradcheck.h"
#include "common/rng.h"
#include "common/timer.h"
#ifdef DSV3_HAVE_CUDA
#include "03_moe/moe_device.h"
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

namespace {

// V3's routing (E 256 -> 64 here, K 8, 8 groups keep 4, sigmoid, route_scale 2.5) at a small width.
MoeConfig demo_config() {
  MoeConfig c;
  c.dim = 128;
  c.moe_inter_dim = 64;
  c.n_routed_experts = 64;
  c.n_shared_experts = 1;
  c.n_activated_experts = 8;
  c.n_expert_groups = 8;
  c.n_limited_groups = 4;
  c.route_scale = 2.5f;
  return c;
}

// Odd small shapes for --check.
MoeConfig check_config(ScoreFunc f) {
  MoeConfig c;
  c.dim = 11;
  c.moe_inter_dim = 7;
  c.n_routed_experts = 12;
  c.n_shared_experts = 2;
  c.n_activated_experts = 3;
  c.n_expert_groups = 4;
  c.n_limited_groups = 2;
  c.route_scale = 2.5f;
  c.score_func = f;
  if (f == ScoreFunc::Softmax) c.n_expert_groups = c.n_limited_groups = 1;
  return c;
}

template <typename T>
MoeParams<T> demo_params(const MoeConfig& c, uint64_t seed) {
  MoeParams<T> p = moe_init_params<T>(c, seed);
  Rng rng(seed + 1);
  for (auto& b : p.gate_bias) b = static_cast<T>(0.05 * rng.normal());
  return p;
}

using Row = CpuCudaRow;

// Forward + backward of one layer on N tokens, on the CPU and (when present) the GPU: errors and times.
std::vector<Row> compare_cpu_cuda(const MoeConfig& c, int N, uint64_t seed, int reps) {
  Rng rng(seed);
  auto p = demo_params<float>(c, seed);
  auto x = rng.normal_vec<float>(size_t(N) * c.dim), dy = rng.normal_vec<float>(x.size());
#ifdef DSV3_HAVE_CUDA
  make_routing_exact(x, p);  // identical logits on CPU and GPU: routing can be compared exactly
#endif
  std::vector<float> y(x.size()), dx(x.size());
  MoeHostSaved<float> hs(c, N);
  auto g = moe_zero_params<float>(c);
  const std::string shape = fmt::format("N={} D={} E={} K={}", N, c.dim, c.n_routed_experts, c.n_activated_experts);
  Row fwd{"moe_forward", shape}, bwd{"moe_backward", shape};
  fwd.cpu_ms = median_time_ms([&] { cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N); }, [] {}, 0, reps);
  bwd.cpu_ms = median_time_ms(
      [&] { cpu::moe_backward(g.grads(), dx.data(), dy.data(), nullptr, hs.saved, x.data(), p.weights(), c, N); },
      [] {}, 0, reps);
#ifdef DSV3_HAVE_CUDA
  if (gpu_available()) {
    MoeDeviceParams dp(p), dg(moe_zero_params<float>(c));
    MoeDeviceSaved ds(c, N);
    DeviceBuffer<float> gx(x), gdy(dy), gy(x.size()), gdx(x.size());
    gy.poison();
    gdx.poison();
    cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N);
    cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), nullptr, ds.saved, gx.get(), dp.weights(), c, N);
    fwd.err = compare(gy.download(), y, kReductionTol);
    bwd.err = compare(gdx.download(), dx, kReductionTol);
    if (ds.i.download() != hs.i) {
      fwd.err.n_bad += 1;
      fwd.err.first_bad.push_back("routing indices / dispatch differ between CPU and CUDA");
    }
    fwd.gpu_ms = median_device_ms([&] { cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N); });
    bwd.gpu_ms = median_device_ms(
        [&] { cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), nullptr, ds.saved, gx.get(), dp.weights(), c, N); });
  }
#endif
  return {fwd, bwd};
}

// Gradcheck, dense oracle: returns the number of failures, printing one line per check.
int self_checks(uint64_t seed) {
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  };
  for (ScoreFunc f : {ScoreFunc::Sigmoid, ScoreFunc::Softmax}) {
    const MoeConfig c = check_config(f);
    const char* name = f == ScoreFunc::Sigmoid ? "sigmoid, groups" : "softmax";
    const int N = 9;
    Rng rng(seed);
    auto p = demo_params<double>(c, seed);
    auto x = rng.normal_vec<double>(size_t(N) * c.dim), R = rng.normal_vec<double>(x.size());
    MoeHostSaved<double> hs(c, N);
    std::vector<double> y(x.size()), dense(x.size()), dx(x.size());
    auto loss = [&] {
      cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N);
      return weighted_sum(y, R);
    };
    loss();
    cpu::moe_forward_dense(dense.data(), x.data(), p.weights(), c, N);
    const auto e = compare(y, dense, {1e-13, 1e-12});
    check(e.ok(), fmt::format("{}: sparse == dense oracle ({})", name, e.summary()));
    auto g = moe_zero_params<double>(c);
    cpu::moe_backward(g.grads(), dx.data(), R.data(), nullptr, hs.saved, x.data(), p.weights(), c, N);
    std::vector<GradTensor> t{{"inp", &x, &dx}};
    auto pt = p.tensors(), gt = g.tensors();
    for (size_t i = 0; i < pt.size(); ++i) t.push_back({pt[i].first, pt[i].second, gt[i].second});
    GradCheckOptions opt;
    opt.max_coords = 25;
    opt.decision_signature = [&] {
      uint64_t h = 1469598103934665603ull;
      for (size_t i = 0; i < size_t(N) * c.n_activated_experts; ++i) h = (h ^ uint64_t(hs.saved.indices[i] + 1)) * 1099511628211ull;
      return h;
    };
    const auto r = gradcheck(loss, t, opt);
    check(r.ok(), fmt::format("{}: gradcheck, {} coordinates, {} skipped (routing flips)", name, r.checked, r.skipped));
    if (!r.ok()) std::cout << r.report() << "\n";
  }
  return failures;
}

// One batch through the router: tokens per expert and how often each group is kept.
void write_load(const std::string& dir, const MoeConfig& c, const MoeParams<float>& p, const std::vector<float>& x,
                int N) {
  MoeHostSaved<float> hs(c, N);
  std::vector<float> y(x.size());
  cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N);
  const int E = c.n_routed_experts, G = c.n_expert_groups, Eg = c.group_size();
  CsvWriter csv(dir + "/load.csv", {"expert", "tokens", "group", "mean_load"});
  for (int e = 0; e < E; ++e)
    csv.row({double(e), double(hs.saved.counts[e]), double(e / Eg), double(N) * c.n_activated_experts / E});
  std::vector<int> kept(G, 0);
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) kept[g] += !std::isinf(hs.saved.sel[size_t(n) * E + g * Eg]);
  CsvWriter gcsv(dir + "/groups.csv", {"group", "kept_fraction", "uniform"});
  for (int g = 0; g < G; ++g) gcsv.row({double(g), double(kept[g]) / N, double(c.n_limited_groups) / G});
  // the first 48 tokens' routing weights, token x expert (0 = not chosen)
  CsvWriter h(dir + "/routing_heatmap.csv", {"token", "expert", "weight"});
  const int K = c.n_activated_experts;
  for (int n = 0; n < std::min(N, 48); ++n) {
    std::vector<double> row(E, 0.0);
    for (int k = 0; k < K; ++k) row[hs.saved.indices[n * K + k]] = hs.saved.weights[n * K + k];
    for (int e = 0; e < E; ++e) h.row({double(n), double(e), row[e]});
  }
}

// Raising the bias of expert 0 (selection only): its load grows, the other experts' weights do not change.
void write_bias_sweep(const std::string& dir, const MoeConfig& c, MoeParams<float> p, const std::vector<float>& x,
                      int N) {
  const int E = c.n_routed_experts;
  MoeHostSaved<float> hs(c, N);
  std::vector<float> y(x.size());
  CsvWriter csv(dir + "/bias_sweep.csv", {"bias0", "load0", "mean_load", "max_other"});
  for (double b = -0.3; b <= 0.6001; b += 0.025) {
    p.gate_bias[0] = static_cast<float>(b);
    cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N);
    const int mx = *std::max_element(hs.saved.counts + 1, hs.saved.counts + E);
    csv.row({b, double(hs.saved.counts[0]), double(N) * c.n_activated_experts / E, double(mx)});
  }
}

void write_timing(const std::string& dir, const MoeConfig& c, uint64_t seed) {
  CsvWriter csv(dir + "/time_per_layer.csv", {"tokens", "cpu_ms", "gpu_ms"});
  for (int N : {64, 256, 1024, 4096}) {
    const auto rows = compare_cpu_cuda(c, N, seed, N >= 4096 ? 1 : 3);
    csv.row({double(N), rows[0].cpu_ms + rows[1].cpu_ms, rows[0].gpu_ms + rows[1].gpu_ms});
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 03: DeepSeekMoE (sigmoid, group-limited routing), CPU reference vs CUDA", "03_moe"};
  DemoOptions opt;
  int tokens = 2048;
  add_demo_options(app, opt, "out/03_moe");
  app.add_option("--tokens", tokens, "tokens in the batch for the routing plots and the table")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return run_main(app, argc, argv, [&] {
    std::cout << fmt::format("{}\nseed {}; device: {}\n", command_line(argc, argv), opt.seed, gpu_description());
    int failures = self_checks(opt.seed);
    const MoeConfig c = opt.check ? check_config(ScoreFunc::Sigmoid) : demo_config();
    std::vector<Row> rows = compare_cpu_cuda(c, opt.check ? 37 : tokens, opt.seed, opt.check ? 1 : 3);
    if (opt.check) {
      const auto more = compare_cpu_cuda(check_config(ScoreFunc::Softmax), 1, opt.seed, 1);
      rows.insert(rows.end(), more.begin(), more.end());
    }
    failures += print_cpu_cuda_table(rows);
    if (opt.check) {
      std::cout << (failures ? fmt::format("{} check(s) FAILED\n", failures) : "all checks passed\n");
      return failures ? 1 : 0;
    }
    ensure_dir(opt.out);
    const auto p = demo_params<float>(c, opt.seed);
    Rng rng(opt.seed + 7);
    const auto x = rng.normal_vec<float>(size_t(tokens) * c.dim);
    write_load(opt.out, c, p, x, tokens);
    write_bias_sweep(opt.out, c, p, x, tokens);
    write_timing(opt.out, c, opt.seed);
    render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return failures ? 1 : 0;
  });
}
