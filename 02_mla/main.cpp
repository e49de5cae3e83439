// Demo 02_mla: Multi-head Latent Attention. Prints the KV-cache arithmetic, CPU vs CUDA errors and timings,
// and writes four plots:
//   attention_maps.png   causal attention of four heads on a byte-tokenised sentence (random init, "small")
//   kv_cache.png         KV-cache size of one sequence vs context length: MHA, GQA, MQA, MLA (V3 and "small")
//   rope_share.png       share of |score| from the rope part (q_pe.k_pe) vs the nope part, per head
//   decode_time.png      time per decoded token, naive vs absorbed, CPU (and GPU when present), vs context
// --check runs the self-checks only (small shapes, CPU and, with a GPU, CUDA) and exits 1 if any fails.
#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include "02_mla/mla.h"
#include "common/cli.h"
#include "common/compare.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/gradcheck.h"
#include "common/rng.h"
#include "common/timer.h"
#ifdef DSV3_HAVE_CUDA
#include "02_mla/mla_device.h"
#endif

using namespace dsv3;

namespace {

// Our "small" preset (the model stage 07 trains): D=512, H=8, Dq=256, Dc=128, Dn=64, Dr=32, Dv=64.
MlaConfig small_preset() {
  MlaConfig c;  // the MlaConfig defaults are this preset
  c.rope.qk_rope_head_dim = c.qk_rope_head_dim;
  c.rope.max_seq_len = 4096;
  c.rope.original_seq_len = 4096;  // plain RoPE: no context extension
  return c;
}

// A tiny odd config for the self-checks.
MlaConfig tiny_config(int q_lora_rank) {
  MlaConfig c;
  c.dim = 13;
  c.n_heads = 3;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 7;
  c.qk_nope_head_dim = 5;
  c.qk_rope_head_dim = c.rope.qk_rope_head_dim = 4;
  c.v_head_dim = 6;
  c.rope.max_seq_len = 64;
  c.rope.original_seq_len = 16;  // YaRN on: the mscale^2 path is exercised
  c.rope.rope_factor = 4;
  return c;
}

// One forward on the host: parameters, tables, input, saved activations.
template <typename T>
struct HostRun {
  MlaConfig c;
  int B, seq;
  MlaParams<T> p;
  RopeTables<T> tab;
  std::vector<T> x, out, saved_buf;
  MlaSaved<T> saved;
  HostRun(const MlaConfig& cfg, int B_, int Tn, uint64_t seed, std::vector<T> inp = {})
      : c(cfg), B(B_), seq(Tn), p(mla_init_params<T>(cfg, seed, true)), tab(rope_tables<T>(cfg.rope)) {
    x = inp.empty() ? Rng(seed + 1).normal_vec<T>(size_t(B) * seq * c.dim) : std::move(inp);
    out.assign(x.size(), T(0));
    saved_buf.assign(mla_saved_size(c, B, seq), T(0));
    saved = mla_saved_layout(saved_buf.data(), c, B, seq);
  }
  void forward() { cpu::mla_forward(out.data(), saved, x.data(), p.weights(), c, B, seq, 0, mla_rope(tab)); }
};

// Decodes every token of run.x one step at a time through a latent cache (naive or absorbed).
template <typename T>
std::vector<T> decode_host(HostRun<T>& r, bool absorbed) {
  const int D = r.c.dim;
  std::vector<T> ckv(size_t(r.B) * r.seq * r.c.kv_lora_rank), kpe(size_t(r.B) * r.seq * r.c.qk_rope_head_dim);
  const MlaCache<T> cache{ckv.data(), kpe.data(), r.seq};
  std::vector<T> out(r.x.size()), xt(size_t(r.B) * D), ot(xt.size());
  for (int t = 0; t < r.seq; ++t) {
    for (int b = 0; b < r.B; ++b) std::copy_n(&r.x[(size_t(b) * r.seq + t) * D], D, &xt[size_t(b) * D]);
    if (absorbed)
      cpu::mla_decode_step_absorbed(ot.data(), cache, xt.data(), r.p.weights(), r.c, r.B, t, mla_rope(r.tab));
    else
      cpu::mla_decode_step_naive(ot.data(), cache, xt.data(), r.p.weights(), r.c, r.B, t, mla_rope(r.tab));
    for (int b = 0; b < r.B; ++b) std::copy_n(&ot[size_t(b) * D], D, &out[(size_t(b) * r.seq + t) * D]);
  }
  return out;
}

struct Checker {
  int failures = 0;
  void operator()(bool ok, const std::string& what) {
    std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  }
};

// CPU self-checks: gradcheck of every parameter and the input, decode oracles.
void self_checks(Checker& check) {
  for (int dq : {6, 0}) {
    HostRun<double> r(tiny_config(dq), 2, 5, 3);
    const auto R = Rng(4).normal_vec<double>(r.out.size());
    r.forward();
    MlaParams<double> g = mla_zero_params<double>(r.c);
    std::vector<double> dx(r.x.size());
    cpu::mla_backward(g.grads(), dx.data(), R.data(), r.saved, r.x.data(), r.p.weights(), r.c, r.B, r.seq, 0,
                      mla_rope(r.tab));
    std::vector<GradTensor> ts = {{"inp", &r.x, &dx}};
    auto ps = r.p.tensors(), gs = g.tensors();
    for (size_t i = 0; i < ps.size(); ++i) ts.push_back({ps[i].first, ps[i].second, gs[i].second});
    const auto res = gradcheck([&] { r.forward(); return weighted_sum(r.out, R); }, ts);
    check(res.ok(), fmt::format("gradcheck, q_lora_rank={}: input + {} parameters, {} coordinates", dq, ps.size(),
                                res.checked));
    if (!res.ok()) std::cout << res.report() << "\n";
    r.forward();
    const auto naive = decode_host(r, false), absorbed = decode_host(r, true);
    const auto e1 = compare(naive, r.out, {1e-13, 1e-11}), e2 = compare(absorbed, naive, {1e-13, 1e-11});
    check(e1.ok(), "cached step-by-step decode == full forward (double): " + e1.summary());
    check(e2.ok(), "absorbed decode == naive decode (double): " + e2.summary());
  }
}

// CPU vs CUDA on the same inputs: forward, backward and both decode forms. Returns rows for the table.
struct ErrRow {
  std::string what;
  CompareResult err;
};
std::vector<ErrRow> compare_cpu_cuda(const MlaConfig& c, int B, int T, uint64_t seed) {
  std::vector<ErrRow> rows;
#ifdef DSV3_HAVE_CUDA
  if (!gpu_available()) return rows;
  HostRun<float> r(c, B, T, seed);
  r.forward();
  const auto R = Rng(seed + 2).normal_vec<float>(r.out.size());
  MlaParams<float> g = mla_zero_params<float>(c);
  std::vector<float> dx(r.x.size());
  cpu::mla_backward(g.grads(), dx.data(), R.data(), r.saved, r.x.data(), r.p.weights(), c, B, T, 0, mla_rope(r.tab));
  const auto naive = decode_host(r, false);

  MlaDeviceParams dw(r.p), dg(mla_zero_params<float>(c));
  const MlaDeviceRope rope(r.tab);
  DeviceBuffer<float> x(r.x), out(r.out.size()), saved(r.saved_buf.size()), dout(R), dinp(r.x.size());
  out.poison();
  dinp.poison();
  const MlaSaved<float> ds = mla_saved_layout(saved.get(), c, B, T);
  cuda::mla_forward(out.get(), ds, x.get(), dw.weights(), c, B, T, 0, rope.view());
  cuda::mla_backward(dg.grads(), dinp.get(), dout.get(), ds, x.get(), dw.weights(), c, B, T, 0, rope.view());
  rows.push_back({"forward out", compare(out.download(), r.out, kReductionTol)});
  rows.push_back({"backward dinp", compare(dinp.download(), dx, kReductionTol)});
  MlaParams<float> got = mla_zero_params<float>(c);
  dg.download(got);
  auto want = g.tensors(), have = got.tensors();
  const Tolerance param_tol{1e-5 * std::sqrt(double(B * T)), 1e-4};  // sums over B*T rows (see test_mla.cpp)
  for (size_t i = 0; i < want.size(); ++i)
    rows.push_back({"backward d" + want[i].first, compare(*have[i].second, *want[i].second, param_tol)});
  for (bool absorbed : {false, true}) {
    DeviceBuffer<float> ckv(size_t(B) * T * c.kv_lora_rank), kpe(size_t(B) * T * c.qk_rope_head_dim),
        xt(size_t(B) * c.dim), ot(size_t(B) * c.dim);
    const MlaCache<float> cache{ckv.get(), kpe.get(), T};
    std::vector<float> got_out(r.out.size()), xh(size_t(B) * c.dim);
    for (int t = 0; t < T; ++t) {
      for (int b = 0; b < B; ++b) std::copy_n(&r.x[(size_t(b) * T + t) * c.dim], c.dim, &xh[size_t(b) * c.dim]);
      xt.upload(xh);
      ot.poison();
      if (absorbed)
        cuda::mla_decode_step_absorbed(ot.get(), cache, xt.get(), dw.weights(), c, B, t, rope.view());
      else
        cuda::mla_decode_step_naive(ot.get(), cache, xt.get(), dw.weights(), c, B, t, rope.view());
      const auto oh = ot.download();
      for (int b = 0; b < B; ++b) std::copy_n(&oh[size_t(b) * c.dim], c.dim, &got_out[(size_t(b) * T + t) * c.dim]);
    }
    rows.push_back({absorbed ? "decode absorbed" : "decode naive", compare(got_out, naive, kReductionTol)});
  }
#else
  (void)c, (void)B, (void)T, (void)seed;
#endif
  return rows;
}

// ---- KV-cache arithmetic --------------------------------------------------------------------------

struct CacheModel {
  std::string name;
  int layers, H, Dn, Dr, Dv, Dc, gqa_groups;
  // Numbers cached per token per layer. MHA: K (H*(Dn+Dr)) and V (H*Dv) of every head; GQA with g groups:
  // g K/V heads; MQA: one; MLA: the latent c_kv and the shared rope key (Dc + Dr).
  long mha() const { return long(H) * (Dn + Dr + Dv); }
  long gqa() const { return long(gqa_groups) * (Dn + Dr + Dv); }
  long mqa() const { return Dn + Dr + Dv; }
  long mla() const { return Dc + Dr; }
};
// GQA groups: 8 for V3's 128 heads (16 heads per group, as in LLaMA-style models), 2 for our 8 heads.
// The "small" preset's depth is chosen in stage 06: its numbers are for one layer.
const CacheModel kV3{"DeepSeek-V3", 61, 128, 128, 64, 128, 512, 8};
const CacheModel kSmall{"small (1 layer)", 1, 8, 64, 32, 64, 128, 2};
constexpr int kBf16Bytes = 2;

void print_cache_table(const std::string& dir) {
  Table t({"model", "layers", "scheme", "numbers/token/layer", "bytes/token, all layers", "vs MHA",
           "one 32K sequence"});
  CsvWriter csv(dir + "/kv_cache.csv",
                {"context", "v3_mha", "v3_gqa8", "v3_mqa", "v3_mla", "small_mha", "small_gqa2", "small_mqa", "small_mla"});
  for (const CacheModel* m : {&kV3, &kSmall}) {
    const std::vector<std::pair<std::string, long>> rows = {{"MHA", m->mha()},
                                                            {fmt::format("GQA g={}", m->gqa_groups), m->gqa()},
                                                            {"MQA", m->mqa()},
                                                            {"MLA", m->mla()}};
    for (const auto& [name, n] : rows) {
      const double bytes = double(n) * m->layers * kBf16Bytes;
      t.add_row({m->name, std::to_string(m->layers), name, std::to_string(n), fmt::format("{:.0f}", bytes), fmt::format("{:.4f}", double(n) / m->mha()),
                 fmt::format("{:.3f} GiB", bytes * 32768 / (1 << 30))});
    }
  }
  t.print();
  std::cout << fmt::format("  MLA caches {} numbers per token per layer in V3 = {:.2f} x d_h (d_h = {}); a GQA with "
                           "the same cache would have {:.2f} groups of K (Dn+Dr) and V (Dv).\n",
                           kV3.mla(), double(kV3.mla()) / kV3.Dn, kV3.Dn, double(kV3.mla()) / (kV3.Dn + kV3.Dr + kV3.Dv));
  for (double ctx = 128; ctx <= 131072 * 1.001; ctx *= 2) {
    std::vector<double> row = {ctx};
    for (const CacheModel* m : {&kV3, &kSmall})
      for (long n : {m->mha(), m->gqa(), m->mqa(), m->mla()})
        row.push_back(double(n) * m->layers * kBf16Bytes * ctx / (1 << 30));
    csv.row(row);
  }
}

// ---- attention maps and the rope share ------------------------------------------------------------

// Bytes of a sentence -> rows of a fixed random embedding (a stand-in for a trained one).
std::vector<float> embed_bytes(const std::string& s, int D, uint64_t seed) {
  const auto table = Rng(seed).normal_vec<float>(size_t(256) * D);
  std::vector<float> x(s.size() * D);
  for (size_t t = 0; t < s.size(); ++t)
    std::copy_n(&table[size_t(static_cast<unsigned char>(s[t])) * D], D, &x[t * D]);
  return x;
}

void write_attention(const std::string& dir, uint64_t seed) {
  const std::string sentence = "the quick brown fox jumps over the lazy dog";
  const MlaConfig c = small_preset();
  const int T = int(sentence.size()), H = c.n_heads, S = c.qk_head_dim(), KS = c.kv_head_dim();
  const int Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim;
  HostRun<float> r(c, 1, T, seed, embed_bytes(sentence, c.dim, seed + 7));
  r.forward();
  // attention_h<k>.csv: gnuplot "matrix" format, row t = query, column s = key
  for (int h : {0, 1, 2, 3}) {
    std::ofstream f(fmt::format("{}/attention_h{}.csv", dir, h));
    for (int t = 0; t < T; ++t)
      for (int s = 0; s < T; ++s) f << r.saved.att[(size_t(h) * T + t) * T + s] << (s + 1 < T ? "," : "\n");
  }
  CsvWriter lab(dir + "/attention_tokens.csv", {"index", "byte"});
  for (int t = 0; t < T; ++t) lab.row_cells({std::to_string(t), sentence[t] == ' ' ? "_" : std::string(1, sentence[t])});
  // Share of |score| from the rope part, per head, over all causal pairs: |q_pe.k_pe| / (|q_nope.k_nope| + |q_pe.k_pe|)
  Table t({"head", "mean |nope score|", "mean |rope score|", "rope share"});
  CsvWriter csv(dir + "/rope_share.csv", {"head", "rope_share", "nope_share"});
  for (int h = 0; h < H; ++h) {
    double sn = 0, sr = 0;
    for (int q = 0; q < T; ++q)
      for (int k = 0; k <= q; ++k) {
        const float* qh = r.saved.q + (size_t(q) * H + h) * S;
        const float* kh = r.saved.kv + (size_t(k) * H + h) * KS;
        const float* kpe = r.saved.k_pe + size_t(k) * Dr;
        double a = 0, b = 0;
        for (int j = 0; j < Dn; ++j) a += double(qh[j]) * kh[j];
        for (int j = 0; j < Dr; ++j) b += double(qh[Dn + j]) * kpe[j];
        sn += std::abs(a);
        sr += std::abs(b);
      }
    const double pairs = T * (T + 1) / 2.0;
    t.add_row({std::to_string(h), fmt_num(sn / pairs), fmt_num(sr / pairs), fmt::format("{:.3f}", sr / (sn + sr))});
    csv.row({double(h), sr / (sn + sr), sn / (sn + sr)});
  }
  std::cout << fmt::format("\nScore parts per head (random init, \"{}\", T={}):\n", sentence, T);
  t.print();
}

// ---- decode timing --------------------------------------------------------------------------------

void write_decode_times(const std::string& dir, uint64_t seed, int max_ctx) {
  const MlaConfig c = small_preset();
  const MlaParams<float> p = mla_init_params<float>(c, seed);
  const auto tab = rope_tables<float>(c.rope);
  const int B = 1, Lmax = std::min(max_ctx, tab.positions);
  Rng rng(seed + 3);
  // The cache content does not change the cost: fill it with random latents once.
  auto ckv = rng.normal_vec<float>(size_t(B) * Lmax * c.kv_lora_rank), kpe = rng.normal_vec<float>(size_t(B) * Lmax * c.qk_rope_head_dim);
  const auto x = rng.normal_vec<float>(size_t(B) * c.dim);
  std::vector<float> out(x.size());
  const MlaCache<float> cache{ckv.data(), kpe.data(), Lmax};
  CsvWriter csv(dir + "/decode_time.csv", {"context", "cpu_naive_ms", "cpu_absorbed_ms", "gpu_naive_ms", "gpu_absorbed_ms"});
  Table t({"context", "cpu naive ms", "cpu absorbed ms", "speed-up", "gpu naive ms", "gpu absorbed ms"});
#ifdef DSV3_HAVE_CUDA
  std::unique_ptr<MlaDeviceParams> dw;
  std::unique_ptr<MlaDeviceRope> drope;
  std::unique_ptr<DeviceBuffer<float>> dckv, dkpe, dx, dout;
  if (gpu_available()) {
    dw = std::make_unique<MlaDeviceParams>(p);
    drope = std::make_unique<MlaDeviceRope>(tab);
    dckv = std::make_unique<DeviceBuffer<float>>(ckv);
    dkpe = std::make_unique<DeviceBuffer<float>>(kpe);
    dx = std::make_unique<DeviceBuffer<float>>(x);
    dout = std::make_unique<DeviceBuffer<float>>(out.size());
  }
#endif
  for (int L = 16; L <= Lmax; L *= 2) {
    const int pos = L - 1, reps = L >= 1024 ? 5 : 15;
    const double naive = median_time_ms(
        [&] { cpu::mla_decode_step_naive(out.data(), cache, x.data(), p.weights(), c, B, pos, mla_rope(tab)); }, [] {}, 1, reps);
    const double absorbed = median_time_ms(
        [&] { cpu::mla_decode_step_absorbed(out.data(), cache, x.data(), p.weights(), c, B, pos, mla_rope(tab)); }, [] {}, 1,
        reps);
    double gn = NAN, ga = NAN;
#ifdef DSV3_HAVE_CUDA
    if (dw) {
      const MlaCache<float> dcache{dckv->get(), dkpe->get(), Lmax};
      auto w = dw->weights();
      gn = median_device_ms([&] { cuda::mla_decode_step_naive(dout->get(), dcache, dx->get(), w, c, B, pos, drope->view()); });
      ga = median_device_ms([&] { cuda::mla_decode_step_absorbed(dout->get(), dcache, dx->get(), w, c, B, pos, drope->view()); });
    }
#endif
    csv.row({double(L), naive, absorbed, gn, ga});
    t.add_row({std::to_string(L), fmt_num(naive), fmt_num(absorbed), fmt::format("{:.1f}x", naive / absorbed),
               std::isnan(gn) ? "-" : fmt_num(gn), std::isnan(ga) ? "-" : fmt_num(ga)});
  }
  std::cout << fmt::format("\nDecode time per token, \"small\" preset, B={} (cache pre-filled to the context):\n", B);
  t.print();
}

// The training form's attention on its own: materialised (version 1) against fused, forward and backward, at the
// "small" preset's heads (H = 8, S = 96, Dv = 64) and B*T = 16384 tokens for T = 128 .. 2048, bf16 products.
// Useful work counts the causal half: forward 2 B H T(T+1)/2 (S + Dv) FLOPs (the two products), backward 2.5 times
// that (five products; the recomputed scores are not counted). Writes attention_time.csv; needs a GPU.
void write_attention_times(const std::string& dir, uint64_t seed, int only_T) {
#ifdef DSV3_HAVE_CUDA
  if (!gpu_available()) return;
  MlaConfig c = small_preset();
  c.matmul = Matmul::BF16;
  const int H = c.n_heads, S = c.qk_head_dim(), KS = c.kv_head_dim(), Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  CsvWriter csv(dir + "/attention_time.csv", {"T", "B", "materialized_fwd_ms", "materialized_bwd_ms", "fused_fwd_ms",
                                              "fused_bwd_ms", "materialized_tflops", "fused_tflops"});
  Table t({"T", "B", "materialised fwd ms", "bwd ms", "TFLOP/s", "fused fwd ms", "bwd ms", "TFLOP/s", "speed-up"});
  keep_freed_scratch();  // as the trainer does: otherwise every call maps its scratch (the packs) again
  Rng rng(seed);
  for (int T = 128; T <= 2048; T *= 2) {
    if (only_T > 0 && T != only_T) continue;
    const int B = 16384 / T;
    const size_t N = size_t(B) * T;
    DeviceBuffer<float> q(rng.normal_vec<float>(N * H * S)), kv(rng.normal_vec<float>(N * H * KS)),
        k_pe(rng.normal_vec<float>(N * Dr)), dy(rng.normal_vec<float>(N * H * Dv)), y(N * H * Dv),
        att(size_t(B) * H * T * T), lse(N * H), dq(N * H * S), dkv(N * H * KS), dk_pe(N * Dr);
    const double mf = median_device_ms([&] {
      cuda::materialized_attention_forward(y.get(), att.get(), q.get(), kv.get(), k_pe.get(), c, B, T);
    });
    const double mb = median_device_ms([&] {
      cuda::materialized_attention_backward(dq.get(), dkv.get(), dk_pe.get(), dy.get(), att.get(), q.get(), kv.get(),
                                            k_pe.get(), c, B, T);
    });
    const double ff = median_device_ms(
        [&] { cuda::fused_attention_forward(y.get(), lse.get(), q.get(), kv.get(), k_pe.get(), c, B, T); });
    const double fb = median_device_ms([&] {
      cuda::fused_attention_backward(dq.get(), dkv.get(), dk_pe.get(), dy.get(), y.get(), lse.get(), q.get(),
                                     kv.get(), k_pe.get(), c, B, T);
    });
    const double fwd_flops = 2.0 * B * H * (double(T) * (T + 1) / 2) * (S + Dv), flops = 3.5 * fwd_flops;
    const double mt = flops / ((mf + mb) * 1e-3) * 1e-12, ft = flops / ((ff + fb) * 1e-3) * 1e-12;
    csv.row({double(T), double(B), mf, mb, ff, fb, mt, ft});
    t.add_row({std::to_string(T), std::to_string(B), fmt_num(mf), fmt_num(mb), fmt::format("{:.0f}", mt), fmt_num(ff),
               fmt_num(fb), fmt::format("{:.0f}", ft), fmt::format("{:.2f}x", (mf + mb) / (ff + fb))});
  }
  std::cout << fmt::format("\nAttention of the training form, forward + backward, \"small\" heads (H={}, S={}, Dv={}), "
                           "B*T = 16384, bf16 ({}):\n", H, S, Dv, gpu_description());
  t.print();
#else
  (void)dir;
  (void)seed;
  (void)only_T;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 02: Multi-head Latent Attention (training form, latent KV cache, absorbed decode)", "02_mla"};
  DemoOptions opt;
  int max_ctx = 4096;
  add_demo_options(app, opt, "out/02_mla");
  app.add_option("--max-context", max_ctx, "longest context of the decode timing")->check(CLI::Range(16, 4096))->capture_default_str();
  bool attention_only = false;
  app.add_flag("--attention-bench", attention_only, "time the attention alone (materialised vs fused, a GPU needed), "
               "write attention_time.csv and stop");
  int attention_seq = 0;
  app.add_option("--attention-seq", attention_seq, "with --attention-bench: time only this sequence length (128, 256, "
                 "512, 1024 or 2048; e.g. under a profiler)")->check(CLI::IsMember({128, 256, 512, 1024, 2048}));
  return run_main(app, argc, argv, [&] {
    std::cout << fmt::format("{}\nseed {}; device: {}\n", command_line(argc, argv), opt.seed, gpu_description());
    if (attention_only) {
      require(gpu_available(), "--attention-bench needs a GPU: {}", gpu_description());
      ensure_dir(opt.out);
      write_attention_times(opt.out, opt.seed, attention_seq);
      return 0;
    }
    Checker check;
    self_checks(check);
    // CPU vs CUDA: odd shapes in --check, the "small" preset otherwise.
    const auto rows = opt.check ? compare_cpu_cuda(tiny_config(6), 3, 11, opt.seed)
                                : compare_cpu_cuda(small_preset(), 2, 129, opt.seed);
    if (!rows.empty()) {
      Table t({"CUDA vs CPU", "max abs err", "max rel err", "norm err"});
      for (const auto& r : rows) {
        t.add_row({r.what, fmt_num(r.err.max_abs), fmt_num(r.err.max_rel), fmt_num(r.err.norm_err)});
        check(r.err.ok(), "CUDA " + r.what);
      }
      t.print();
    } else {
      std::cout << "CUDA comparisons skipped: " << gpu_description() << "\n";
    }
    if (opt.check) {
      std::cout << (check.failures ? fmt::format("{} check(s) FAILED\n", check.failures) : "all checks passed\n");
      return check.failures ? 1 : 0;
    }
    ensure_dir(opt.out);
    std::cout << "\nKV cache per token (bf16):\n";
    print_cache_table(opt.out);
    write_attention(opt.out, opt.seed);
    write_decode_times(opt.out, opt.seed, max_ctx);
    write_attention_times(opt.out, opt.seed, 0);
    render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return check.failures ? 1 : 0;
  });
}
