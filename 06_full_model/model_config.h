// Stage 06: the model configuration, with Hugging Face DeepseekV3 field names so a config.json written here
// loads in transformers and one written by transformers loads here; our training-only fields live in their
// own section, "nano_dsv3". Presets: "tiny" (tests), "lyrics" (the stage-07 default), "small" (benchmarks),
// "deepseek-v3" (the released model's sizes, for parameter counts).
//
// Shape legend as everywhere: D hidden_size, H num_attention_heads, Dq q_lora_rank, Dc kv_lora_rank,
// Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, E n_routed_experts, Es n_shared_experts,
// K num_experts_per_tok, F moe_intermediate_size, V vocab_size.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "02_mla/mla.h"
#include "03_moe/moe.h"

namespace dsv3 {

// rope_scaling of the HF config (DeepSeek's YaRN settings).
struct RopeScaling {
  double factor = 40.0;
  int original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 1.0;
};

// Fields only our trainer reads (section "nano_dsv3" of config.json).
struct TrainingFields {
  double aux_alpha = 1e-4;          // sequence-wise balance loss weight (stage 04)
  double bias_update_speed = 1e-3;  // gamma of the bias update (stage 04)
  double mtp_lambda = 0.3;          // weight of the MTP loss (stage 05)
};

// The longest context a config may declare (max_position_embeddings; DeepSeek-V3: 163840). The RoPE tables are
// built for every position when a model is made, so a larger value is refused rather than allocated.
constexpr int kMaxPositions = 1 << 18;

struct ModelConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;       // dense FFN width (first_k_dense_replace layers)
  int moe_intermediate_size = 0;   // F
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int q_lora_rank = 0;             // 0: no q compression
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int num_experts_per_tok = 0;
  int n_group = 1;
  int topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";
  int first_k_dense_replace = 0;
  int num_nextn_predict_layers = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  int max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  // Hugging Face's initializer_range: when set, every weight matrix (embedding, projections, experts, router,
  // head) starts as N(0, initializer_range^2) and every norm weight at 1 (DeepSeek-V3, paper §4.2: 0.006).
  // Unset: the fan-in scheme of the stages (model.h).
  std::optional<double> initializer_range;
  TrainingFields training;

  // UserError naming the first field that is out of range or inconsistent with another.
  void validate() const;
  // The stage configs this model is built from.
  RopeConfig rope() const;
  MlaConfig mla() const;
  MoeConfig moe() const;
  bool is_moe_layer(int layer) const { return layer >= first_k_dense_replace; }
};

// The named presets; UserError listing the names for an unknown one.
ModelConfig config_preset(const std::string& name);
std::vector<std::string> config_preset_names();

// config.json text <-> config. Parsing: a missing, mistyped, out-of-range or unknown field is a UserError naming
// it (DESIGN.md §6); transformers' bookkeeping keys (architectures, torch_dtype, ...) are accepted and ignored.
ModelConfig config_from_json_text(const std::string& text);
std::string config_to_json_text(const ModelConfig& c);  // HF DeepseekV3 keys + "nano_dsv3"
ModelConfig load_config(const std::string& path);
void save_config(const ModelConfig& c, const std::string& path);  // atomic

// Parameter counts per component, total and active per token.
struct ParamCount {
  std::string component;
  int64_t total = 0;
  int64_t active = 0;
};
// embedding, attention, dense FFN, MoE shared experts, MoE routed experts, router, norms, output head, and the
// MTP modules (their own weights; they share the embedding and head). `main_total/active` exclude MTP.
struct ParamBreakdown {
  std::vector<ParamCount> rows;
  int64_t main_total = 0, main_active = 0, mtp_total = 0;
};
ParamBreakdown count_params(const ModelConfig& c);

}  // namespace dsv3
