// Demo 04_aux_loss: the balancing experiment. A tiny MoE language model (tiny_moe_lm.h) learns to predict
// the next byte of real English text in four settings with the same seed and the same batches:
//   none        alpha = 0, gamma = 0
//   seq_loss    the sequence-wise balance loss only (alpha)
//   bias        the auxiliary-loss-free bias update only (gamma)
//   bias+loss   the bias update and a small sequence-wise loss (alpha / 10)
// Writes per-step CSVs (loss, MaxVio over the batch and per sequence, expert loads, the loss difference of each
// setting to `none`) and plots them.
// --check runs a short version and checks that the bias brings MaxVio down and the loss still falls.
#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <iostream>
#include <iterator>

#include "04_aux_loss/tiny_moe_lm.h"
#include "common/cli.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/timer.h"

using namespace dsv3;

namespace {

struct Experiment {
  std::string text = "/usr/share/common-licenses/GPL-3";  // English text every Debian system has
  int steps = 300, batch = 16, seq = 64, eval_every = 25;
  float lr = 3e-3f, alpha = 0.01f, gamma = 0.01f;
};

// The bytes of a text file, validated: readable, not empty, not binary, long enough for a batch.
std::vector<int> load_text(const std::string& path, int min_len) {
  std::ifstream f(path, std::ios::binary);
  require(f.good(), "cannot read the text file '{}' (give another with --text)", path);
  std::string s((std::istreambuf_iterator<char>(f)), {});
  require(!s.empty(), "the text file '{}' is empty", path);
  require(s.find('\0') == std::string::npos, "'{}' looks binary (it contains NUL bytes): give a text file", path);
  require(int(s.size()) >= 10 * min_len, "'{}' has {} bytes; the experiment needs at least {}", path, s.size(),
          10 * min_len);
  return std::vector<int>(s.begin(), s.end());  // bytes as tokens: no tokenizer needed for a routing experiment
}

// B random windows of T+1 bytes from [lo, hi).
std::vector<int> sample_batch(const std::vector<int>& data, size_t lo, size_t hi, int B, int T, Rng& rng) {
  std::vector<int> out;
  out.reserve(size_t(B) * (T + 1));
  for (int b = 0; b < B; ++b) {
    const size_t start = lo + rng.below(hi - lo - T - 1);
    out.insert(out.end(), data.begin() + start, data.begin() + start + T + 1);
  }
  return out;
}

struct Setting {
  std::string name;
  float alpha, gamma;
};

struct Result {
  std::string name;
  double final_loss = 0, val_loss = 0, maxvio_batch = 0, maxvio_seq = 0, seconds = 0;
  std::vector<double> losses, val_losses;  // per step (val: NaN between evaluations)
};

TinyMoeLmConfig model_config(const Setting& s) {
  TinyMoeLmConfig c;
  c.moe.dim = 64;
  c.moe.moe_inter_dim = 32;
  c.moe.n_routed_experts = 16;
  c.moe.n_shared_experts = 1;
  c.moe.n_activated_experts = 4;
  c.moe.n_expert_groups = 4;
  c.moe.n_limited_groups = 2;
  c.n_layers = 2;
  c.balance.aux_alpha = s.alpha;
  c.balance.bias_update_speed = s.gamma;
  return c;
}

Result run_setting(const Setting& s, const Experiment& x, const std::vector<int>& data, uint64_t seed,
                   const std::string& out_dir) {
  TinyMoeLm<float> lm(model_config(s), seed);
  const int E = lm.config().moe.n_routed_experts;
  const size_t split = data.size() * 9 / 10;  // train on the first 90%, validate on the rest
  Rng batches(seed + 1), val_rng(seed + 2);
  const auto val = sample_batch(data, split, data.size(), x.batch, x.seq, val_rng);
  std::unique_ptr<CsvWriter> csv, load_csv;
  if (!out_dir.empty()) {
    csv = std::make_unique<CsvWriter>(out_dir + "/train_" + s.name + ".csv",
                                      std::vector<std::string>{"step", "loss", "balance_loss", "maxvio_batch",
                                                               "maxvio_seq", "val_loss"});
    load_csv = std::make_unique<CsvWriter>(out_dir + "/load_" + s.name + ".csv",
                                           std::vector<std::string>{"step", "expert", "load_share"});
  }
  Result r;
  r.name = s.name;
  AdamWConfig opt;
  opt.weight_decay = 0.0f;
  CpuTimer timer;
  double val_loss = NAN;
  for (int step = 1; step <= x.steps; ++step) {
    const auto batch = sample_batch(data, 0, split, x.batch, x.seq, batches);
    const float loss = lm.forward(batch, x.batch, x.seq);
    const RoutingStats st = lm.stats();
    lm.backward();
    opt.lr = x.lr * std::min(1.0f, step / 20.0f);  // short linear warm-up
    lm.optimizer_step(opt, step);
    const bool eval = step % x.eval_every == 0 || step == x.steps;
    if (eval) val_loss = lm.forward(val, x.batch, x.seq);
    r.losses.push_back(loss);
    r.val_losses.push_back(eval ? val_loss : NAN);
    if (csv) {
      csv->row({double(step), loss, st.balance_loss, st.maxvio_batch, st.maxvio_seq, eval ? val_loss : NAN});
      for (int e = 0; e < E; ++e)  // layer 0's load; share of the N*K routed slots
        load_csv->row({double(step), double(e), st.counts[0][e] / double(x.batch * x.seq * lm.config().moe.n_activated_experts)});
    }
    // The last quarter of the run gives the reported figures (single steps are noisy).
    if (step > x.steps * 3 / 4) {
      const double w = 1.0 / (x.steps - x.steps * 3 / 4);
      r.final_loss += w * loss;
      r.maxvio_batch += w * st.maxvio_batch;
      r.maxvio_seq += w * st.maxvio_seq;
    }
  }
  r.val_loss = val_loss;
  r.seconds = timer.elapsed_ms() / 1000;
  return r;
}

// Every setting sees the same initial weights and the same batches, so the loss difference to `none` at a step
// is the cost (or gain) of that setting's balancing, without most of the batch-to-batch noise the losses share.
void write_loss_vs_none(const std::string& dir, const std::vector<Setting>& settings, const std::vector<Result>& results) {
  std::vector<std::string> cols = {"step"};
  for (size_t i = 1; i < settings.size(); ++i) cols.push_back(settings[i].name);
  for (size_t i = 1; i < settings.size(); ++i) cols.push_back("val_" + settings[i].name);
  CsvWriter csv(dir + "/loss_vs_none.csv", cols);
  const auto& none = results[0];
  for (size_t t = 0; t < none.losses.size(); ++t) {
    std::vector<double> row = {double(t + 1)};
    for (size_t i = 1; i < results.size(); ++i) row.push_back(results[i].losses[t] - none.losses[t]);
    for (size_t i = 1; i < results.size(); ++i) row.push_back(results[i].val_losses[t] - none.val_losses[t]);
    csv.row(row);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 04: load balancing of DeepSeekMoE, four settings trained on real text", "04_aux_loss"};
  DemoOptions opt;
  Experiment x;
  add_demo_options(app, opt, "out/04_aux_loss");
  app.add_option("--text", x.text, "English text file to train on (bytes are the tokens)")->capture_default_str();
  app.add_option("--steps", x.steps, "training steps per setting")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--batch", x.batch, "sequences per batch")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--seq", x.seq, "tokens per sequence")->check(CLI::Range(2, 65536))->capture_default_str();
  app.add_option("--lr", x.lr, "AdamW learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--alpha", x.alpha, "balance loss weight of the seq_loss setting (bias+loss uses alpha/10)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--gamma", x.gamma, "bias update speed of the bias settings")->check(CLI::NonNegativeNumber)->capture_default_str();
  return run_main(app, argc, argv, [&] {
    std::cout << fmt::format("{}\nseed {}\n", command_line(argc, argv), opt.seed);
    if (opt.check) {
      x.steps = 60;
      x.batch = 8;
      x.seq = 32;
    }
    const auto data = load_text(x.text, x.seq + 1);
    std::cout << fmt::format("text: {} ({} bytes); {} steps of {} x {} tokens per setting\n", x.text, data.size(),
                             x.steps, x.batch, x.seq);
    const std::vector<Setting> settings = {{"none", 0.f, 0.f},
                                           {"seq_loss", x.alpha, 0.f},
                                           {"bias", 0.f, x.gamma},
                                           {"bias+loss", x.alpha / 10, x.gamma}};
    if (!opt.check) ensure_dir(opt.out);
    std::vector<Result> results;
    for (const auto& s : settings) {
      results.push_back(run_setting(s, x, data, opt.seed, opt.check ? "" : opt.out));
      std::cout << fmt::format("  {:<10} done in {:.1f} s\n", s.name, results.back().seconds) << std::flush;
    }
    Table t({"setting", "alpha", "gamma", "train loss", "val loss", "MaxVio batch", "MaxVio seq"});
    for (size_t i = 0; i < settings.size(); ++i)
      t.add_row({settings[i].name, fmt_num(settings[i].alpha), fmt_num(settings[i].gamma), fmt_num(results[i].final_loss),
                 fmt_num(results[i].val_loss), fmt_num(results[i].maxvio_batch), fmt_num(results[i].maxvio_seq)});
    std::cout << "(train loss and MaxVio: mean over the last quarter of the steps; val loss at the end)\n";
    t.print();
    if (opt.check) {
      // The claims the README makes, in their weakest form: the bias balances, training still learns.
      int failures = 0;
      auto check = [&](bool ok, const std::string& what) {
        std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
        failures += !ok;
      };
      check(results[2].maxvio_batch < results[0].maxvio_batch, "bias lowers batch MaxVio below no balancing");
      for (const auto& r : results) check(r.final_loss < std::log(256.0) - 0.5, r.name + ": loss fell below ln 256 - 0.5");
      return failures ? 1 : 0;
    }
    write_loss_vs_none(opt.out, settings, results);
    render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return 0;
  });
}
