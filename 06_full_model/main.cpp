// Demo 06_full_model (in progress): the parameter breakdown of every preset and of DeepSeek-V3's own
// config, total vs active per token, per component; writes params_<preset>.csv and params.png; --config FILE adds a
// config.json of your own. --check verifies V3's published totals (671 B / 37 B).
#include <fmt/format.h>

#include <iostream>

#include "06_full_model/model_config.h"
#include "common/cli.h"
#include "common/diag.h"

using namespace dsv3;

namespace {

std::string billions(int64_t n) { return n >= 1e9 ? fmt::format("{:.2f} B", n / 1e9) : fmt::format("{:.2f} M", n / 1e6); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 06: the complete model (in progress): configs and parameter counts", "06_full_model"};
  DemoOptions opt;
  std::string config_path;
  add_demo_options(app, opt, "out/06_full_model");
  app.add_option("--config", config_path, "a config.json (Hugging Face DeepseekV3 fields) to count as well");
  return run_main(app, argc, argv, [&] {
    std::cout << command_line(argc, argv) << "\n";
    std::vector<std::pair<std::string, ModelConfig>> configs;
    for (const auto& n : config_preset_names()) configs.emplace_back(n, config_preset(n));
    if (!config_path.empty()) {
      std::vector<std::string> warnings;
      configs.emplace_back(config_path, load_config(config_path, &warnings));
      for (const auto& w : warnings) std::cout << "warning: " << w << "\n";
    }
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
        t.add_row({r.component, billions(r.total), billions(r.active)});
        if (csv) csv->row_cells({r.component, std::to_string(r.total), std::to_string(r.active)});
      }
      t.add_row({"main model (no MTP)", billions(b.main_total), billions(b.main_active)});
      t.print();
      if (name == "deepseek-v3") {
        const bool ok = std::abs(b.main_total / 1e9 - 671) < 1 && std::abs(b.main_active / 1e9 - 37.5) < 1;
        std::cout << fmt::format("  [{}] DeepSeek-V3: {:.1f} B total, {:.1f} B active (paper: 671 B, 37 B)\n",
                                 ok ? "ok" : "FAIL", b.main_total / 1e9, b.main_active / 1e9);
        failures += !ok;
      }
    }
    if (!opt.check) render_plots(DSV3_STAGE_DIR "/plots.gp", opt.out);
    return failures ? 1 : 0;
  });
}
