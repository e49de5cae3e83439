// Demo 05_mtp: a small language model with D_mtp MTP modules (mtp_lm.h) learns a toy "word" language:
// a lexicon of fixed words (token strings), sequences are words drawn at random one after another. Inside a
// word the next tokens are determined by the tokens so far; at a word boundary the next word is random. So
// the main model (t_{i+1}), module 1 (t_{i+2}) and module 2 (t_{i+3}) can all learn, each with a floor set
// by the boundaries it must guess across, deeper modules guessing more often.
// Writes the per-step losses of every depth and the acceptance rate that MTP speculative decoding would
// see: how often module 1's top-1 prediction at position i equals the main model's top-1 at position i+1.
// --check runs small self-checks (hand-built alignment, a short training run, CPU vs CUDA when a GPU exists).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <memory>

#include "05_mtp/mtp_align.h"
#include "05_mtp/mtp_lm.h"
#include "common/cli.h"
#include "common/compare.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/timer.h"
#ifdef DSV3_HAVE_CUDA
#include "05_mtp/mtp_device.h"
#endif

using namespace dsv3;

namespace {

struct Experiment {
  int steps = 600, batch = 16, seq = 48, eval_every = 20;
  int depth = 2, layers = 1, dim = 32, vocab = 64, words = 32, word_len = 5;
  float lr = 3e-3f, lambda = 0.3f;
  std::string ffn = "dense";
};

// The toy language: `words` words of `word_len` tokens; first tokens distinct so a word is known from its
// first token on.
struct Lexicon {
  std::vector<std::vector<int>> words;
  Lexicon(const Experiment& x, Rng& rng) {
    require(x.words <= x.vocab, "--words ({}) must not exceed --vocab ({})", x.words, x.vocab);
    std::vector<int> firsts(x.vocab);
    for (int v = 0; v < x.vocab; ++v) firsts[v] = v;
    for (int i = x.vocab - 1; i > 0; --i) std::swap(firsts[i], firsts[rng.below(i + 1)]);
    for (int w = 0; w < x.words; ++w) {
      std::vector<int> word{firsts[w]};
      for (int j = 1; j < x.word_len; ++j) word.push_back(int(rng.below(x.vocab)));
      words.push_back(word);
    }
  }
  // B windows of T+1 tokens: random words back to back, starting at a random offset of the first word.
  std::vector<int> batch(int B, int T, Rng& rng) const {
    std::vector<int> out;
    for (int b = 0; b < B; ++b) {
      std::vector<int> s;
      while (int(s.size()) < T + 1 + int(words[0].size())) {
        const auto& w = words[rng.below(words.size())];
        s.insert(s.end(), w.begin(), w.end());
      }
      const size_t off = rng.below(words[0].size());
      out.insert(out.end(), s.begin() + off, s.begin() + off + T + 1);
    }
    return out;
  }
};

MtpLmConfig model_config(const Experiment& x) {
  MtpLmConfig c;
  c.n_layers = x.layers;
  MtpConfig& m = c.mtp;
  m.depth = x.depth;
  m.vocab = x.vocab;
  m.mtp_lambda = x.lambda;
  BlockConfig& b = m.block;
  b.attn.dim = x.dim;
  b.attn.n_heads = 2;
  b.attn.q_lora_rank = x.dim / 2;
  b.attn.kv_lora_rank = x.dim / 2;
  b.attn.qk_nope_head_dim = 8;
  b.attn.qk_rope_head_dim = b.attn.rope.qk_rope_head_dim = 4;
  b.attn.v_head_dim = 8;
  b.attn.rope.max_seq_len = b.attn.rope.original_seq_len = std::max(64, x.seq);
  require(x.ffn == "dense" || x.ffn == "moe", "--ffn must be dense or moe, got '{}'", x.ffn);
  b.ffn = x.ffn == "dense" ? FfnKind::Dense : FfnKind::Moe;
  b.mlp = {x.dim, 2 * x.dim};
  b.moe.dim = x.dim;
  b.moe.moe_inter_dim = x.dim / 2;
  b.moe.n_routed_experts = 8;
  b.moe.n_activated_experts = 2;
  b.moe.n_expert_groups = 2;
  b.moe.n_limited_groups = 1;
  return c;
}

int argmax_row(const float* p, int V) { return int(std::max_element(p, p + V) - p); }

// How often module 1's top-1 at position i equals the main model's top-1 at position i+1 (both predict
// t_{i+2}), over the positions where both exist; and each one's top-1 accuracy there.
struct Agreement {
  double acceptance = 0, main_acc = 0, mtp1_acc = 0;
};
Agreement agreement(const MtpLm<float>& lm, const std::vector<int>& window, int B, int T) {
  const int V = lm.config().mtp.vocab;
  Agreement a;
  int n = 0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i + 1 < T; ++i) {
      const int r = b * T + i;
      const int draft = argmax_row(lm.mtp_probs(1) + size_t(r) * V, V);
      const int verify = argmax_row(lm.main_probs() + size_t(r + 1) * V, V);
      const int truth = window[size_t(b) * (T + 1) + i + 2];
      a.acceptance += draft == verify;
      a.main_acc += verify == truth;
      a.mtp1_acc += draft == truth;
      ++n;
    }
  a.acceptance /= n;
  a.main_acc /= n;
  a.mtp1_acc /= n;
  return a;
}

// Depth k's mean cross-entropy per target: eq. 24's CE_k (its T-k targets summed, divided by T) times T/(T-k),
// so every depth compares with the same floor.
std::vector<double> per_target(const std::vector<float>& mtp_ce, int T) {
  std::vector<double> out;
  for (size_t k = 1; k <= mtp_ce.size(); ++k)
    out.push_back(double(mtp_ce[k - 1]) / mtp_align::ce_scale(T, int(k)));
  return out;
}

struct Result {
  std::vector<double> eval_ce;  // main, depth 1, .., depth D on the held-out batch (per target)
  Agreement agree;
  double seconds = 0;
  double ce_floor = 0, acc_ceiling = 0;
};

Result train(const Experiment& x, uint64_t seed, const std::string& out) {
  Rng rng(seed);
  const Lexicon lex(x, rng);
  MtpLm<float> lm(model_config(x), rng.next_u64());
  const auto eval_window = lex.batch(x.batch * 4, x.seq, rng);
  AdamWConfig opt;
  opt.lr = x.lr;
  opt.weight_decay = 0.01f;
  std::vector<std::string> cols{"step", "main"};
  for (int k = 1; k <= x.depth; ++k) cols.push_back(fmt::format("mtp{}", k));
  cols.push_back("eval_main");
  for (int k = 1; k <= x.depth; ++k) cols.push_back(fmt::format("eval_mtp{}", k));
  cols.insert(cols.end(), {"acceptance", "main_acc", "mtp1_acc", "ce_floor", "acc_ceiling"});
  // One position in word_len starts a random word: the best CE is ln(words)/word_len, the best top-1
  // accuracy 1 - (1 - 1/words)/word_len, at every depth (module k sees t_0..t_{i+k}, see mtp.h).
  const double ce_floor = std::log(double(x.words)) / x.word_len;
  const double acc_ceiling = 1 - (1 - 1.0 / x.words) / x.word_len;
  std::unique_ptr<CsvWriter> csv;
  if (!out.empty()) {
    csv = std::make_unique<CsvWriter>(out + "/train.csv", cols);
    std::ofstream(out + "/meta.gp") << "depth = " << x.depth << "\n";  // plots.gp reads the column layout
  }
  Result r;
  CpuTimer timer;
  for (int step = 1; step <= x.steps; ++step) {
    const auto window = lex.batch(x.batch, x.seq, rng);
    lm.forward(window, x.batch, x.seq);
    lm.backward();
    lm.optimizer_step(opt, step);
    std::vector<double> row{double(step), double(lm.main_ce())};
    for (double ce : per_target(lm.mtp_ce(), x.seq)) row.push_back(ce);
    if (step % x.eval_every == 0 || step == x.steps) {
      lm.forward(eval_window, x.batch * 4, x.seq);
      r.eval_ce = {double(lm.main_ce())};
      for (double ce : per_target(lm.mtp_ce(), x.seq)) r.eval_ce.push_back(ce);
      r.agree = x.depth > 0 ? agreement(lm, eval_window, x.batch * 4, x.seq) : Agreement{};
      row.insert(row.end(), r.eval_ce.begin(), r.eval_ce.end());
      row.insert(row.end(), {r.agree.acceptance, r.agree.main_acc, r.agree.mtp1_acc});
    } else {
      row.insert(row.end(), size_t(x.depth + 4), NAN);
    }
    row.insert(row.end(), {ce_floor, acc_ceiling});
    if (csv) csv->row(row);
  }
  r.seconds = timer.elapsed_ms() / 1000;
  r.ce_floor = ce_floor;
  r.acc_ceiling = acc_ceiling;
  return r;
}

int self_checks(const Experiment& base, uint64_t seed) {
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    fmt::print("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  };
  // 1) depth 0 is the plain model: same main parameters, same loss, bit for bit
  {
    MtpLmConfig c0 = model_config(base), c2 = model_config(base);
    c0.mtp.depth = 0;
    MtpLm<double> plain(c0, seed), with_mtp(c2, seed);
    Rng rng(seed);
    std::vector<int> w(2 * 9);
    for (auto& t : w) t = int(rng.below(base.vocab));
    const double l0 = plain.forward(w, 2, 8);
    with_mtp.forward(w, 2, 8);
    check(l0 == with_mtp.main_ce(), fmt::format("depth 0 loss {:.6f} == main loss of the MTP model", l0));
  }
  // 2) a short training run: every depth's held-out loss falls well below uniform (ln V)
  Experiment x = base;
  x.steps = 120;
  x.eval_every = 120;
  const Result r = train(x, seed, "");
  for (size_t k = 0; k < r.eval_ce.size(); ++k)
    check(r.eval_ce[k] < std::log(double(x.vocab)) - 0.5,
          fmt::format("{} loss {:.3f} < ln V - 0.5 = {:.3f} after {} steps", k == 0 ? "main" : fmt::format("mtp{}", k),
                      r.eval_ce[k], std::log(double(x.vocab)) - 0.5, x.steps));
  check(r.agree.acceptance > 0.3, fmt::format("acceptance {:.2f} > 0.3", r.agree.acceptance));
  // 3) CPU vs CUDA on the chain, when a GPU is present
#ifdef DSV3_HAVE_CUDA
  if (gpu_available()) {
    MtpConfig c = model_config(base).mtp;
    const int B = 2, T = 9, N = B * T, D = c.dim(), V = c.vocab;
    Rng rng(seed);
    auto embed = rng.normal_vec<float>(size_t(V) * D), head = rng.normal_vec<float>(size_t(V) * D, 0.2);
    auto norm = std::vector<float>(D, 1.f), h0 = rng.normal_vec<float>(size_t(N) * D);
    std::vector<int> window(size_t(B) * (T + 1));
    for (auto& t : window) t = int(rng.below(V));
    std::vector<MtpModuleParams<float>> mods;
    std::vector<MtpModuleWeights<float>> w;
    for (int k = 0; k < c.depth; ++k) mods.push_back(mtp_init_params<float>(c, rng.next_u64()));
    for (auto& m : mods) w.push_back(m.weights());
    const auto tables = rope_tables<float>(c.block.attn.rope);
    MtpHostSaved<float> hs(c, B, T);
    std::vector<float> ce(c.depth), gce(c.depth);
    const float l = cpu::mtp_forward(ce.data(), hs.saved.data(), h0.data(), window.data(),
                                     {embed.data(), norm.data(), head.data()}, w.data(), c, B, T, mla_rope(tables));
    DeviceBuffer<float> de(embed), dn(norm), dh(head), dh0(h0);
    DeviceBuffer<int> dw(window);
    std::vector<MtpDeviceParams> dp;
    std::vector<MtpModuleWeights<float>> gw;
    dp.reserve(mods.size());
    for (auto& m : mods) dp.emplace_back(m);
    for (auto& m : dp) gw.push_back(m.weights());
    MtpDeviceSaved ds(c, B, T);
    MlaDeviceRope drope(tables);
    const float gl = cuda::mtp_forward(gce.data(), ds.saved.data(), dh0.get(), dw.get(), {de.get(), dn.get(), dh.get()},
                                       gw.data(), c, B, T, drope.view());
    check(compare(gce, ce, kReductionTol).ok() && std::abs(gl - l) <= 1e-4f * (1 + std::abs(l)),
          fmt::format("CUDA chain forward matches the CPU (L_MTP {:.6f} vs {:.6f})", gl, l));
  } else {
    fmt::print("  [skip] CPU vs CUDA: {}\n", gpu_description());
  }
#else
  fmt::print("  [skip] CPU vs CUDA: built without CUDA\n");
#endif
  fmt::print("{}\n", failures ? "self-check FAILED" : "self-check passed");
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 05: Multi-Token Prediction on a toy word language (main model + D_mtp modules)", "05_mtp"};
  DemoOptions opt;
  Experiment x;
  add_demo_options(app, opt, "out/05_mtp");
  app.add_option("--steps", x.steps, "training steps")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--batch", x.batch, "sequences per batch")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--seq", x.seq, "positions per sequence (T)")->check(CLI::Range(4, 4096))->capture_default_str();
  app.add_option("--depth", x.depth, "MTP modules (D_mtp)")->check(CLI::Range(1, 8))->capture_default_str();
  app.add_option("--layers", x.layers, "main-model blocks")->check(CLI::Range(0, 16))->capture_default_str();
  app.add_option("--dim", x.dim, "model width (even)")->check(CLI::Range(8, 1024))->capture_default_str();
  app.add_option("--vocab", x.vocab, "vocabulary size")->check(CLI::Range(2, 100000))->capture_default_str();
  app.add_option("--words", x.words, "words in the lexicon")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--word-len", x.word_len, "tokens per word")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--lr", x.lr, "AdamW learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--lambda", x.lambda, "MTP loss weight (paper: 0.3, later 0.1)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--ffn", x.ffn, "block FFN: dense or moe")->capture_default_str();
  return run_main(app, argc, argv, [&] {
    fmt::print("05_mtp: {}\nseed {}\n", command_line(argc, argv), opt.seed);
    if (opt.check) return self_checks(x, opt.seed);
    ensure_dir(opt.out);
    const Result r = train(x, opt.seed, opt.out);
    Table t({"depth", "predicts", "held-out CE per target", "best possible", "uniform ln V"});
    for (size_t k = 0; k < r.eval_ce.size(); ++k)
      t.add_row({k == 0 ? "main" : fmt::format("mtp {}", k), fmt::format("t_(i+{})", k + 1), fmt_num(r.eval_ce[k], 4),
                 fmt_num(r.ce_floor, 4), fmt_num(std::log(double(x.vocab)), 4)});
    t.print();
    fmt::print("acceptance (module 1 top-1 at i == main top-1 at i+1): {:.3f}\n", r.agree.acceptance);
    fmt::print("top-1 accuracy on t_(i+2): main at i+1 {:.3f}, module 1 at i {:.3f} (best possible {:.3f})\n",
               r.agree.main_acc, r.agree.mtp1_acc, r.acc_ceiling);
    fmt::print("{} steps in {:.1f} s; CSV in {}\n", x.steps, r.seconds, opt.out);
    render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return 0;
  });
}
