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
#include <tuple>

#include "03_moe/moe.h"
#include "common/cli.h"
#include "common/compare.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/gradcheck.h"
#include "common/rng.h"
#include "common/timer.h"
#ifdef DSV3_HAVE_CUDA
#include "03_moe/moe_device.h"
#include "03_moe/moe_experts_bf16.h"
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


// The MoE layer alone at stage 07's bench shape ("small" preset: 32 x 512 tokens, D 512, F 256, E 32, K 4, one
// shared expert, 4 groups keep 2; bf16 products): forward and backward of every routed-expert path, then the
// rows products alone (version 1 WMMA against version 2 wgmma, each tile). Writes moe_bench.csv.
void write_moe_bench(const std::string& dir, uint64_t seed, bool once) {
#ifdef DSV3_HAVE_CUDA
  MoeConfig c;
  c.dim = 512;
  c.moe_inter_dim = 256;
  c.n_routed_experts = 32;
  c.n_shared_experts = 1;
  c.n_activated_experts = 4;
  c.n_expert_groups = 4;
  c.n_limited_groups = 2;
  c.route_scale = 1.f;
  c.matmul = Matmul::BF16;
  const int N = 32 * 512, D = c.dim, F = c.moe_inter_dim, E = c.n_routed_experts, K = c.n_activated_experts,
            NK = N * K, Fs = c.shared_inter_dim();
  keep_freed_scratch();  // as the trainer does
  auto p = demo_params<float>(c, seed);
  Rng rng(seed + 3);
  const auto x = rng.normal_vec<float>(size_t(N) * D), dy = rng.normal_vec<float>(size_t(N) * D);
  MoeDeviceParams dp(p), dg(moe_zero_params<float>(c));
  MoeDeviceSaved ds(c, N);
  DeviceBuffer<float> gx(x), gdy(dy), gy(x.size()), gdx(x.size());
  // useful FLOPs: routed 3 products of NK x F x D, shared 3 of N x Fs x D, the router N x E x D; backward 2x
  const double fwd_flops = 2.0 * (3.0 * NK * F * D + 3.0 * double(N) * Fs * D + double(N) * E * D);
  CsvWriter csv(dir + "/moe_bench.csv", {"what", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops"});
  Table t({"MoE layer, N=16384 D=512 F=256 E=32 K=4 +1 shared, bf16", "fwd ms", "bwd ms", "fwd TFLOP/s",
           "bwd TFLOP/s"});
  const auto tf = [](double flops, double ms) { return flops / (ms * 1e-3) * 1e-12; };
  if (once) {  // two untimed forward + backward calls of the fastest path here, e.g. under a profiler
    c.experts = hopper_experts_available() ? MoeExperts::Hopper : MoeExperts::Segmented;
    for (int i = 0; i < 2; ++i) {
      cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N);
      cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), nullptr, ds.saved, gx.get(), dp.weights(), c, N);
    }
    device_sync();
    return;
  }
  struct Variant {
    std::string name;
    MoeExperts experts;
    cuda::WgmmaTile tile;
    cuda::HopperMoeOptions options;
  };
  const cuda::WgmmaTile default_tile = cuda::wgmma_tile();
  const cuda::HopperMoeOptions default_options = cuda::hopper_moe_options();
  std::vector<Variant> variants{{"grouped (cuBLAS, TF32)", MoeExperts::Grouped, default_tile, default_options},
                                {"segmented v1 (WMMA)", MoeExperts::Segmented, default_tile, default_options}};
  if (hopper_experts_available()) {
    for (auto [n, tl] : {std::pair{"hopper N256S4", cuda::WgmmaTile::N256S4}, {"hopper N256S3", cuda::WgmmaTile::N256S3},
                         {"hopper N128S4", cuda::WgmmaTile::N128S4}, {"hopper N128S3", cuda::WgmmaTile::N128S3}})
      variants.push_back({n, MoeExperts::Hopper, tl, default_options});
    // the tokens read through perm (in products) or from a gathered copy, forward / backward; the shared experts
    for (auto [fwd, bwd, shared] : {std::tuple{true, false, true}, {true, true, true}, {false, false, true},
                                    {true, false, false}, {false, false, false}})
      variants.push_back({fmt::format("hopper, gather fwd {} bwd {}, shared {}", fwd ? "in products" : "copy",
                                      bwd ? "in products" : "copy", shared ? "wgmma" : "cuBLAS"),
                          MoeExperts::Hopper, default_tile, {fwd, bwd, shared}});
  }
  for (const Variant& v : variants) {
    c.experts = v.experts;
    cuda::set_wgmma_tile(v.tile);
    cuda::set_hopper_moe_options(v.options);
    const double f = median_device_ms([&] { cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N); });
    const double b = median_device_ms(
        [&] { cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), nullptr, ds.saved, gx.get(), dp.weights(), c, N); });
    csv.row_cells({v.name, fmt_num(f, 4), fmt_num(b, 4), fmt_num(tf(fwd_flops, f), 4), fmt_num(tf(2 * fwd_flops, b), 4)});
    t.add_row({v.name, fmt_num(f), fmt_num(b), fmt::format("{:.0f}", tf(fwd_flops, f)),
               fmt::format("{:.0f}", tf(2 * fwd_flops, b))});
  }
  cuda::set_wgmma_tile(default_tile);
  cuda::set_hopper_moe_options(default_options);
  std::cout << fmt::format("\nThe MoE layer alone ({}), median of 20:\n", gpu_description());
  t.print();

  // The rows products alone, balanced segments (NK / E rows an expert), random bf16 operands.
  std::vector<int> off(E + 1);
  for (int e = 0; e <= E; ++e) off[e] = static_cast<int>(int64_t(NK) * e / E);
  DeviceBuffer<int> goff(off);
  std::vector<uint16_t> hx(size_t(NK) * D), hw(size_t(E) * F * D);
  for (auto& v : hx) v = static_cast<uint16_t>(0x3c00 + rng.next_u64() % 256);  // bf16 in [0.0078, 0.0156)
  for (auto& v : hw) v = static_cast<uint16_t>(0x3c00 + rng.next_u64() % 256);
  DeviceBuffer<uint16_t> gxb(hx), gw1(hw), gw3(hw), gab(std::vector<uint16_t>(hx.begin(), hx.begin() + size_t(NK) * F));
  DeviceBuffer<float> h1(size_t(NK) * F), h3(size_t(NK) * F), eo(size_t(NK) * D);
  const int64_t FD = int64_t(F) * D;
  const std::vector<cuda::SegmentGemm> up{{0, F, D, gxb.get(), D, gw1.get(), D, h1.get(), F, FD, 0},
                                          {0, F, D, gxb.get(), D, gw3.get(), D, h3.get(), F, FD, 0}};
  const std::vector<cuda::SegmentGemm> down{{0, D, F, gab.get(), F, gw1.get(), F, eo.get(), D, FD, 0}};
  const double up_flops = 2.0 * 2 * NK * F * D, down_flops = 2.0 * NK * F * D;
  // the weight gradients (tn): dW1 and dW3 (F x D) from dh1, dh3 and x, one call; dW2 (D x F) from dy and a
  DeviceBuffer<float> gw(3 * size_t(E) * F * D);
  const std::vector<cuda::SegmentGemm> wg13{{F, D, 0, gab.get(), F, gxb.get(), D, gw.get(), D, 0, FD},
                                            {F, D, 0, gab.get(), F, gxb.get(), D, gw.get() + E * FD, D, 0, FD}};
  const std::vector<cuda::SegmentGemm> wg2{{D, F, 0, gxb.get(), D, gab.get(), F, gw.get() + 2 * E * FD, F, 0, FD}};
  Table g({"segmented products", "up: x [W1|W3]^T ms", "TFLOP/s", "down: a W2^T ms", "TFLOP/s", "dW1, dW3 ms",
           "TFLOP/s", "dW2 ms", "TFLOP/s"});
  const auto row = [&](const std::string& name, auto&& rows, auto&& tn) {
    const double u = median_device_ms([&] { rows(up); }), d = median_device_ms([&] { rows(down); });
    const double w13 = median_device_ms([&] { tn(wg13); }), w2 = median_device_ms([&] { tn(wg2); });
    g.add_row({name, fmt_num(u), fmt::format("{:.0f}", tf(up_flops, u)), fmt_num(d),
               fmt::format("{:.0f}", tf(down_flops, d)), fmt_num(w13), fmt::format("{:.0f}", tf(up_flops, w13)),
               fmt_num(w2), fmt::format("{:.0f}", tf(down_flops, w2))});
    csv.row_cells({"gemm rows " + name, fmt_num(u, 4), fmt_num(d, 4), fmt_num(tf(up_flops, u), 4),
                   fmt_num(tf(down_flops, d), 4)});
    csv.row_cells({"gemm tn " + name, fmt_num(w13, 4), fmt_num(w2, 4), fmt_num(tf(up_flops, w13), 4),
                   fmt_num(tf(down_flops, w2), 4)});
  };
  row("v1 WMMA", [&](const auto& pr) { cuda::segmented_gemm_rows(Op::T, 1.f, 0.f, pr, goff.get(), E, NK); },
      [&](const auto& pr) { cuda::segmented_gemm_tn(1.f, 1.f, pr, goff.get(), E); });
  const cuda::WgmmaTile keep = cuda::wgmma_tile();
  if (cuda::segmented_gemm_wgmma_available())
    for (auto [n, tl] : {std::pair{"v2 wgmma N256S4", cuda::WgmmaTile::N256S4}, {"v2 wgmma N256S3", cuda::WgmmaTile::N256S3},
                         {"v2 wgmma N128S4", cuda::WgmmaTile::N128S4}, {"v2 wgmma N128S3", cuda::WgmmaTile::N128S3}}) {
      cuda::set_wgmma_tile(tl);
      row(n, [&](const auto& pr) { cuda::segmented_gemm_rows_wgmma(1.f, 0.f, pr, goff.get(), E, NK); },
          [&](const auto& pr) { cuda::segmented_gemm_tn_wgmma(1.f, 1.f, pr, goff.get(), E); });
    }
  cuda::set_wgmma_tile(keep);
  std::cout << "\n";
  g.print();
#else
  (void)dir;
  (void)seed;
  (void)once;
#endif
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
  bool moe_bench = false, moe_once = false;
  app.add_flag("--moe-bench", moe_bench, "time the MoE layer alone at stage 07's bench shape (every expert path; a "
               "GPU needed), and its segmented products (version 1 against 2), write moe_bench.csv and stop");
  app.add_flag("--moe-once", moe_once, "with --moe-bench: only two untimed forward + backward calls of the fastest "
               "path (e.g. under a profiler)");
  return run_main(app, argc, argv, [&] {
    std::cout << fmt::format("{}\nseed {}; device: {}\n", command_line(argc, argv), opt.seed, gpu_description());
    if (moe_bench) {
      require(gpu_available(), "--moe-bench needs a GPU: {}", gpu_description());
      ensure_dir(opt.out);
      write_moe_bench(opt.out, opt.seed, moe_once);
      return 0;
    }
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
