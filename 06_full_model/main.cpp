// Demo 06_full_model: (1) the parameter breakdown of every preset and of DeepSeek-V3's own config, total vs
// active per token, per component (params_<preset>.csv, params.png; --config FILE adds a config.json of your
// own); (2) one training step of the "small" preset at initialisation on the CPU reference: the loss
// decomposition (CE, MTP, balance) and the RMS of activations and of parameter gradients per layer
// (init_rms.csv, init_rms.png). --check verifies V3's published totals (671 B / 37 B) and runs the step on
// the tiny preset.
#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <iostream>

#include "06_full_model/model.h"
#include "06_full_model/model_config.h"
#include "common/cli.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/timer.h"

using namespace dsv3;

namespace {

double rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return v.empty() ? 0.0 : std::sqrt(s / v.size());
}

// One forward + backward at initialisation on random tokens: the loss parts and per-layer RMS.
void init_step(const std::string& preset, int B, int T, uint64_t seed, const std::string& out_dir) {
  const ModelConfig c = config_preset(preset);
  Model<float> m(c, seed);
  Rng rng(seed + 1);
  std::vector<int> tokens(size_t(B) * (T + 1));
  for (auto& t : tokens) t = int(rng.below(c.vocab_size));
  CpuTimer timer;
  const float total = m.forward(tokens, B, T);
  m.backward();
  const ModelLosses& l = m.losses();
  std::cout << fmt::format("\none training step of '{}' at init, B={} T={}, random tokens ({:.1f} s on the CPU):\n",
                           preset, B, T, timer.elapsed_ms() / 1000);
  Table t({"loss part", "value"});
  t.add_row({"CE (main)", fmt_num(l.ce)});
  t.add_row({"ln V (uniform guess)", fmt_num(std::log(double(c.vocab_size)))});
  t.add_row({"MTP (lambda/D sum CE_k)", fmt_num(l.mtp)});
  t.add_row({"balance (sum over MoE layers)", fmt_num(l.balance)});
  t.add_row({"total", fmt_num(total)});
  t.print();
  // gradient RMS per layer: every tensor named layers.<l>.*
  std::vector<double> g2(c.num_hidden_layers, 0.0);
  std::vector<size_t> gn(c.num_hidden_layers, 0);
  for (auto& tn : m.tensors()) {
    if (tn.name.rfind("layers.", 0) != 0) continue;
    const int l = std::stoi(tn.name.substr(7));
    for (float g : *tn.grad) g2[l] += double(g) * g;
    gn[l] += tn.grad->size();
  }
  Table r({"layer", "kind", "activation RMS (out)", "gradient RMS"});
  std::unique_ptr<CsvWriter> csv;
  if (!out_dir.empty())
    csv = std::make_unique<CsvWriter>(out_dir + "/init_rms.csv", std::vector<std::string>{"layer", "act_rms", "grad_rms"});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const double a = rms(m.hidden()[i + 1]), g = std::sqrt(g2[i] / std::max<size_t>(gn[i], 1));
    r.add_row({std::to_string(i), c.is_moe_layer(i) ? "MoE" : "dense", fmt_num(a), fmt_num(g)});
    if (csv) csv->row({double(i), a, g});
  }
  std::cout << fmt::format("embedding output RMS {}\n", fmt_num(rms(m.hidden()[0])));
  r.print();
}

// Writes a randomly initialised model of `preset` (routing biases set too) as a checkpoint, plus tokens and the
// CPU reference's logits, for check_transformers.py to compare with transformers' DeepseekV3ForCausalLM.
// yarn: rope_scaling on (V3's betas and mscale, factor 4 = max_position_embeddings / original context), and
// sequences 2.5x the original context, so positions beyond it are compared too.
void export_for_transformers(const std::string& dir, const std::string& preset, bool yarn, uint64_t seed) {
  ModelConfig c = config_preset(preset);
  int T = std::min(16, c.max_position_embeddings);
  if (yarn) {
    RopeScaling y;  // beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1: DeepSeek-V3's
    y.factor = 4;
    y.original_max_position_embeddings = c.max_position_embeddings / 4;
    c.rope_scaling = y;
    c.validate();
    T = y.original_max_position_embeddings * 5 / 2;
  }
  Model<float> m(c, seed);
  TensorMap t = m.to_tensor_map();
  Rng rng(seed + 2);
  for (auto& [name, v] : t)  // small positive biases: exercised, and every biased score stays > 0 (README)
    if (name.find("e_score_correction_bias") != std::string::npos)
      for (auto& x : v) x = float(rng.uniform(0.0, 0.05));
  m.load_tensor_map(t);
  const int B = 2;
  std::vector<int> tokens(size_t(B) * (T + 1));
  for (auto& x : tokens) x = int(rng.below(c.vocab_size));
  m.forward(tokens, B, T);
  ensure_dir(dir);
  save_checkpoint(dir + "/checkpoint", c, m.to_tensor_map());
  std::ofstream tf(dir + "/tokens.txt");  // B lines of T input tokens
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < T; ++i) tf << (i ? " " : "") << tokens[size_t(b) * (T + 1) + i];
    tf << "\n";
  }
  std::ofstream lf(dir + "/logits.f32", std::ios::binary);  // (B, T, V) float32, little-endian
  lf.write(reinterpret_cast<const char*>(m.logits().data()), std::streamsize(m.logits().size() * sizeof(float)));
  require(tf.good() && lf.good(), "writing the export into '{}' failed", dir);
  std::cout << fmt::format("exported '{}'{} (B={}, T={}) to {}\n", preset, yarn ? " with YaRN" : "", B, T, dir);
}

// A parameter count in the unit that fits it: 812, 203.5 K, 12.35 M, 671.03 B.
std::string count_str(int64_t n) {
  if (n < 1000) return std::to_string(n);
  if (n < 1000000) return fmt::format("{:.1f} K", n / 1e3);
  if (n < 1000000000) return fmt::format("{:.2f} M", n / 1e6);
  return fmt::format("{:.2f} B", n / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 06: the complete model: parameter counts, one step at init, export for transformers", "06_full_model"};
  DemoOptions opt;
  std::string config_path;
  add_demo_options(app, opt, "out/06_full_model");
  app.add_option("--config", config_path, "a config.json (Hugging Face DeepseekV3 fields) to count as well");
  std::string export_dir, export_preset = "tiny";
  app.add_option("--export", export_dir, "write a random model, tokens and our logits there for check_transformers.py");
  app.add_option("--export-preset", export_preset, "preset for --export")->capture_default_str();
  bool export_yarn = false;
  app.add_flag("--export-yarn", export_yarn, "--export with YaRN on (factor 4) and sequences past the original context");
  return run_main(app, argc, argv, [&] {
    std::cout << command_line(argc, argv) << "\n";
    if (!export_dir.empty()) {
      export_for_transformers(export_dir, export_preset, export_yarn, opt.seed);
      return 0;
    }
    std::vector<std::pair<std::string, ModelConfig>> configs;
    for (const auto& n : config_preset_names()) configs.emplace_back(n, config_preset(n));
    if (!config_path.empty()) configs.emplace_back(config_path, load_config(config_path));
    if (!opt.check) ensure_dir(opt.out);
    int failures = 0;
    for (size_t i = 0; i < configs.size(); ++i) {
      const auto& [name, c] = configs[i];
      const ParamBreakdown b = count_params(c);
      std::unique_ptr<CsvWriter> csv;  // params_<preset>.csv; a --config file is params_custom.csv
      if (!opt.check)
        csv = std::make_unique<CsvWriter>(opt.out + "/params_" + (i < config_preset_names().size() ? name : "custom") +
                                              ".csv",
                                          std::vector<std::string>{"component", "total", "active"});
      std::cout << fmt::format("\n{}: {} layers ({} dense), D = {}, {} routed experts, top-{}, MTP depth {}\n", name,
                               c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size, c.n_routed_experts,
                               c.num_experts_per_tok, c.num_nextn_predict_layers);
      Table t({"component", "total", "active / token"});
      for (const auto& r : b.rows) {
        t.add_row({r.component, count_str(r.total), count_str(r.active)});
        if (csv) csv->row_cells({r.component, std::to_string(r.total), std::to_string(r.active)});
      }
      t.add_row({"main model (no MTP)", count_str(b.main_total), count_str(b.main_active)});
      t.print();
      if (name == "deepseek-v3") {
        const bool ok = std::abs(b.main_total / 1e9 - 671) < 1 && std::abs(b.main_active / 1e9 - 37.5) < 1;
        std::cout << fmt::format("  [{}] DeepSeek-V3: {:.1f} B total, {:.1f} B active (paper: 671 B, 37 B)\n",
                                 ok ? "ok" : "FAIL", b.main_total / 1e9, b.main_active / 1e9);
        failures += !ok;
      }
    }
    init_step(opt.check ? "tiny" : "small", 2, opt.check ? 9 : 64, opt.seed, opt.check ? "" : opt.out);
    if (!opt.check) render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return failures ? 1 : 0;
  });
}
