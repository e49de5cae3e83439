// Stage 06 model configuration: presets, validation, config.json in Hugging Face DeepseekV3 names,
// parameter counts. Shapes: see model_config.h.
#include "06_full_model/model_config.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <utility>

#include "common/errors.h"
#include "common/files.h"
#include "common/safetensors.h"

namespace dsv3 {

using json = nlohmann::json;

void ModelConfig::validate() const {
  auto positive = [](int v, const char* name) { require(v > 0, "config: {} must be positive, got {}", name, v); };
  // Upper bounds: far above DeepSeek-V3 (vocab 129280, hidden 7168, 61 layers, 256 experts, 163840 positions),
  // low enough that every size computed from them fits 64 bits and every weight matrix fits int indexing.
  auto at_most = [](int v, int hi, const char* name) {
    require(v <= hi, "config: {} = {} is larger than this implementation supports (at most {})", name, v, hi);
  };
  constexpr int kDim = 1 << 16, kWide = 1 << 20;
  at_most(vocab_size, 1 << 24, "vocab_size");
  at_most(hidden_size, kDim, "hidden_size");
  at_most(num_hidden_layers, 1024, "num_hidden_layers");
  at_most(num_attention_heads, 1024, "num_attention_heads");
  for (const auto& [v, name] : {std::pair{q_lora_rank, "q_lora_rank"}, {kv_lora_rank, "kv_lora_rank"},
                                {qk_nope_head_dim, "qk_nope_head_dim"}, {qk_rope_head_dim, "qk_rope_head_dim"},
                                {v_head_dim, "v_head_dim"}})
    at_most(v, kDim, name);
  at_most(intermediate_size, kWide, "intermediate_size");
  at_most(moe_intermediate_size, kWide, "moe_intermediate_size");
  at_most(n_routed_experts, 4096, "n_routed_experts");
  at_most(n_shared_experts, 64, "n_shared_experts");
  at_most(num_nextn_predict_layers, 64, "num_nextn_predict_layers");
  // the RoPE tables are built for every position at load time: a cap keeps a hostile config from allocating for
  // minutes
  at_most(max_position_embeddings, kMaxPositions, "max_position_embeddings");
  {
    const int64_t D = hidden_size, H = num_attention_heads, qk = int64_t(qk_nope_head_dim) + qk_rope_head_dim;
    const int64_t largest[] = {int64_t(vocab_size) * D, D * std::max(intermediate_size, moe_intermediate_size),
                               H * qk * std::max<int64_t>(q_lora_rank, D), int64_t(kv_lora_rank) * H *
                               (int64_t(qk_nope_head_dim) + v_head_dim), H * v_head_dim * D,
                               int64_t(n_routed_experts) * D};
    for (const int64_t n : largest)
      require(n < (int64_t(1) << 31), "config: a weight matrix of this model would hold {} elements; at most 2^31 - 1 "
              "are supported (reduce vocab_size, hidden_size or the head and FFN widths)", n);
  }
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(v_head_dim, "v_head_dim");
  positive(max_position_embeddings, "max_position_embeddings");
  require(q_lora_rank >= 0, "config: q_lora_rank must be >= 0 (0 = no q compression), got {}", q_lora_rank);
  require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
          "config: qk_rope_head_dim must be a positive even number (MLA's decoupled RoPE key), got {}",
          qk_rope_head_dim);
  require(first_k_dense_replace >= 0 && first_k_dense_replace <= num_hidden_layers,
          "config: first_k_dense_replace must be in [0, num_hidden_layers = {}], got {}", num_hidden_layers,
          first_k_dense_replace);
  if (first_k_dense_replace > 0) positive(intermediate_size, "intermediate_size");
  require(num_nextn_predict_layers >= 0, "config: num_nextn_predict_layers must be >= 0, got {}",
          num_nextn_predict_layers);
  require(rms_norm_eps > 0 && rms_norm_eps < 1, "config: rms_norm_eps must be in (0, 1), got {}", rms_norm_eps);
  require(scoring_func == "sigmoid" || scoring_func == "softmax",
          "config: scoring_func must be \"sigmoid\" or \"softmax\", got \"{}\"", scoring_func);
  // model.py normalises the chosen weights for sigmoid and never for softmax; transformers follows
  // norm_topk_prob. Only the combinations where the two agree are accepted.
  require(norm_topk_prob == (scoring_func == "sigmoid"),
          "config: norm_topk_prob must be {} with scoring_func \"{}\" (DeepSeek's model.py normalises sigmoid "
          "weights and never softmax weights)",
          scoring_func == "sigmoid", scoring_func);
  require(!tie_word_embeddings, "config: tie_word_embeddings = true is not supported (DeepSeek-V3 does not tie)");
  if (rope_scaling) {
    const RopeScaling& r = *rope_scaling;
    require(r.factor >= 1, "config: rope_scaling.factor must be >= 1, got {}", r.factor);
    positive(r.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings");
    require(r.mscale == r.mscale_all_dim,
            "config: rope_scaling.mscale ({}) must equal mscale_all_dim ({}): DeepSeek's model.py has one mscale",
            r.mscale, r.mscale_all_dim);
  }
  if (first_k_dense_replace < num_hidden_layers || num_nextn_predict_layers > 0) {
    // the MoE fields, checked under their config.json names before stage 03 sees them
    positive(n_routed_experts, "n_routed_experts");
    positive(moe_intermediate_size, "moe_intermediate_size");
    positive(n_group, "n_group");
    require(num_experts_per_tok > 0 && num_experts_per_tok <= n_routed_experts,
            "config: num_experts_per_tok must be in [1, n_routed_experts = {}], got {}", n_routed_experts,
            num_experts_per_tok);
    require(n_routed_experts % n_group == 0, "config: n_group = {} must divide n_routed_experts = {}", n_group,
            n_routed_experts);
    require(topk_group > 0 && topk_group <= n_group, "config: topk_group must be in [1, n_group = {}], got {}",
            n_group, topk_group);
    require(n_group == 1 || num_experts_per_tok <= n_routed_experts / n_group * topk_group,
            "config: num_experts_per_tok = {} exceeds the {} experts in the topk_group = {} kept groups",
            num_experts_per_tok, n_routed_experts / n_group * topk_group, topk_group);
  }
  rope().validate();
  mla().validate();
  if (first_k_dense_replace < num_hidden_layers || num_nextn_predict_layers > 0) moe().validate();
  if (initializer_range)
    require(*initializer_range > 0 && *initializer_range < 10, "config: initializer_range must be in (0, 10), got {}",
            *initializer_range);
  require(training.aux_alpha >= 0, "config: nano_dsv3.aux_alpha must be >= 0, got {}", training.aux_alpha);
  require(training.bias_update_speed >= 0, "config: nano_dsv3.bias_update_speed must be >= 0, got {}",
          training.bias_update_speed);
  require(training.mtp_lambda >= 0, "config: nano_dsv3.mtp_lambda must be >= 0, got {}", training.mtp_lambda);
}

RopeConfig ModelConfig::rope() const {
  RopeConfig r;
  r.qk_rope_head_dim = qk_rope_head_dim;
  r.max_seq_len = max_position_embeddings;
  r.rope_theta = rope_theta;
  if (rope_scaling) {
    r.original_seq_len = rope_scaling->original_max_position_embeddings;
    r.rope_factor = rope_scaling->factor;
    r.beta_fast = rope_scaling->beta_fast;
    r.beta_slow = rope_scaling->beta_slow;
    r.mscale = rope_scaling->mscale_all_dim;
  } else {
    r.original_seq_len = max_position_embeddings;  // no YaRN: the tables cover the trained context
    r.rope_factor = 1.0;
  }
  return r;
}

MlaConfig ModelConfig::mla() const {
  MlaConfig m;
  m.dim = hidden_size;
  m.n_heads = num_attention_heads;
  m.q_lora_rank = q_lora_rank;
  m.kv_lora_rank = kv_lora_rank;
  m.qk_nope_head_dim = qk_nope_head_dim;
  m.qk_rope_head_dim = qk_rope_head_dim;
  m.v_head_dim = v_head_dim;
  m.norm_eps = static_cast<float>(rms_norm_eps);
  m.rope = rope();
  return m;
}

MoeConfig ModelConfig::moe() const {
  MoeConfig m;
  m.dim = hidden_size;
  m.moe_inter_dim = moe_intermediate_size;
  m.n_routed_experts = n_routed_experts;
  m.n_shared_experts = n_shared_experts;
  m.n_activated_experts = num_experts_per_tok;
  m.n_expert_groups = n_group;
  m.n_limited_groups = topk_group;
  m.route_scale = static_cast<float>(routed_scaling_factor);
  m.score_func = scoring_func == "softmax" ? ScoreFunc::Softmax : ScoreFunc::Sigmoid;
  return m;
}

// ---- presets ------------------------------------------------------------------------------------------

namespace {

// The presets: one table, from which config_preset() and config_preset_names() both read.
struct Preset {
  const char* name;
  void (*fill)(ModelConfig& c);
};
const Preset kPresets[] = {
    {"tiny", [](ModelConfig& c) {  // odd sizes for whole-model gradchecks
       c.vocab_size = 61;
       c.hidden_size = 24;
       c.intermediate_size = 40;
       c.moe_intermediate_size = 8;
       c.num_hidden_layers = 2;
       c.first_k_dense_replace = 1;
       c.num_attention_heads = 2;
       c.q_lora_rank = 12;
       c.kv_lora_rank = 10;
       c.qk_nope_head_dim = 6;
       c.qk_rope_head_dim = 4;
       c.v_head_dim = 5;
       c.n_routed_experts = 8;
       c.n_shared_experts = 1;
       c.num_experts_per_tok = 2;
       c.n_group = 4;
       c.topk_group = 2;
       c.num_nextn_predict_layers = 1;
       c.max_position_embeddings = 64;
     }},
    {"lyrics", [](ModelConfig& c) {  // the default run of stage 07 (its README compares the runs that chose it)
       c.vocab_size = 4096;
       c.hidden_size = 384;
       c.intermediate_size = 1024;
       c.moe_intermediate_size = 192;
       c.num_hidden_layers = 6;
       c.first_k_dense_replace = 1;
       c.num_attention_heads = 6;
       c.q_lora_rank = 192;
       c.kv_lora_rank = 96;
       c.qk_nope_head_dim = 48;
       c.qk_rope_head_dim = 16;
       c.v_head_dim = 48;
       c.n_routed_experts = 16;
       c.n_shared_experts = 1;
       c.num_experts_per_tok = 4;
       c.n_group = 4;
       c.topk_group = 2;
       c.num_nextn_predict_layers = 1;
       c.max_position_embeddings = 256;
     }},
    {"cpu", [](ModelConfig& c) {  // stage 07's main job without a GPU: about 10 minutes on 2 cores (07 README)
       c.vocab_size = 4096;
       c.hidden_size = 128;
       c.intermediate_size = 384;
       c.moe_intermediate_size = 96;
       c.num_hidden_layers = 4;
       c.first_k_dense_replace = 1;
       c.num_attention_heads = 4;
       c.q_lora_rank = 96;
       c.kv_lora_rank = 64;
       c.qk_nope_head_dim = 32;
       c.qk_rope_head_dim = 16;
       c.v_head_dim = 32;
       c.n_routed_experts = 8;
       c.n_shared_experts = 1;
       c.num_experts_per_tok = 2;
       c.n_group = 4;
       c.topk_group = 2;
       c.num_nextn_predict_layers = 1;
       c.max_position_embeddings = 128;
     }},
    {"small", [](ModelConfig& c) {  // the benchmark configuration
       c.vocab_size = 8192;
       c.hidden_size = 512;
       c.intermediate_size = 1408;
       c.moe_intermediate_size = 256;
       c.num_hidden_layers = 8;
       c.first_k_dense_replace = 1;
       c.num_attention_heads = 8;
       c.q_lora_rank = 256;
       c.kv_lora_rank = 128;
       c.qk_nope_head_dim = 64;
       c.qk_rope_head_dim = 32;
       c.v_head_dim = 64;
       c.n_routed_experts = 32;
       c.n_shared_experts = 1;
       c.num_experts_per_tok = 4;
       c.n_group = 4;
       c.topk_group = 2;
       c.num_nextn_predict_layers = 1;
       c.max_position_embeddings = 512;
     }},
    {"deepseek-v3", [](ModelConfig& c) {  // the released config.json of deepseek-ai/DeepSeek-V3
       c.vocab_size = 129280;
       c.hidden_size = 7168;
       c.intermediate_size = 18432;
       c.moe_intermediate_size = 2048;
       c.num_hidden_layers = 61;
       c.first_k_dense_replace = 3;
       c.num_attention_heads = 128;
       c.q_lora_rank = 1536;
       c.kv_lora_rank = 512;
       c.qk_nope_head_dim = 128;
       c.qk_rope_head_dim = 64;
       c.v_head_dim = 128;
       c.n_routed_experts = 256;
       c.n_shared_experts = 1;
       c.num_experts_per_tok = 8;
       c.n_group = 8;
       c.topk_group = 4;
       c.num_nextn_predict_layers = 1;
       c.max_position_embeddings = 163840;
       c.rope_scaling = RopeScaling{};  // yarn, factor 40, original 4096, beta 32/1, mscale 1/1
       c.initializer_range = 0.006;     // paper §4.2
     }},
};

}  // namespace

std::vector<std::string> config_preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.push_back(p.name);
  return names;
}

ModelConfig config_preset(const std::string& name) {
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    ModelConfig c;
    c.routed_scaling_factor = 2.5;
    p.fill(c);
    c.validate();
    return c;
  }
  std::string names;
  for (const auto& n : config_preset_names()) names += (names.empty() ? "" : ", ") + n;
  throw UserError(fmt::format("unknown config preset '{}' (presets: {})", name, names));
}

// ---- JSON ---------------------------------------------------------------------------------------------

namespace {

// Keys transformers writes that we accept without using them (some are checked below).
const std::set<std::string> kBookkeeping = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "hidden_act", "use_cache", "attention_bias",
    "attention_dropout", "num_key_value_heads", "topk_method", "auto_map", "ep_size", "moe_layer_freq",
    "pretraining_tp", "rope_interleave", "quantization_config", "head_dim", "qk_head_dim", "output_router_logits",
    "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "n_experts",
    "rope_theta", "rope_scaling"};  // the last two: superseded when rope_parameters is present

const char* type_name(const json& v) { return v.type_name(); }

class Reader {
 public:
  Reader(const json& j, std::string where) : j_(j), where_(std::move(where)) {}
  const json* find(const std::string& key) const {
    seen_.insert(key);
    const auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  const json& need(const std::string& key) const {
    const json* v = find(key);
    require(v != nullptr, "config{}: missing field '{}'", where_, key);
    return *v;
  }
  // Read through 64 bits and range-checked: 4294967320 must be an error, not 24.
  void read(const std::string& key, int& out) const {
    const json& v = need(key);
    require(v.is_number_integer(), "config{}: field '{}' must be an integer, got {} {}", where_, key, type_name(v),
            v.dump());
    require(v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(std::numeric_limits<int>::max())
                                   : v.get<int64_t>() >= std::numeric_limits<int>::min(),
            "config{}: field '{}' = {} is out of range", where_, key, v.dump());
    out = int(v.get<int64_t>());
  }
  void read(const std::string& key, double& out) const {
    const json& v = need(key);
    require(v.is_number(), "config{}: field '{}' must be a number, got {} {}", where_, key, type_name(v), v.dump());
    out = v.get<double>();
    require(std::isfinite(out), "config{}: field '{}' must be finite, got {}", where_, key, v.dump());
  }
  void read(const std::string& key, bool& out) const {
    const json& v = need(key);
    require(v.is_boolean(), "config{}: field '{}' must be true or false, got {} {}", where_, key, type_name(v),
            v.dump());
    out = v.get<bool>();
  }
  void read(const std::string& key, std::string& out) const {
    const json& v = need(key);
    require(v.is_string(), "config{}: field '{}' must be a string, got {} {}", where_, key, type_name(v), v.dump());
    out = v.get<std::string>();
  }
  // q_lora_rank is null in V3-Lite's config: null means 0.
  void read_nullable(const std::string& key, int& out) const {
    const json& v = need(key);
    if (v.is_null()) {
      out = 0;
      return;
    }
    read(key, out);
  }
  // DESIGN.md §6: an unknown field is an error naming it (a typo such as "hidden_sise" must not pass silently).
  void unknown_keys(const std::set<std::string>& also_known) const {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      require(seen_.count(it.key()) || also_known.count(it.key()), "config{}: unknown field '{}' (not a DeepseekV3 "
              "field this project reads, nor one of transformers' bookkeeping keys): remove or correct it", where_,
              it.key());
  }

 private:
  const json& j_;
  std::string where_;
  mutable std::set<std::string> seen_;
};

// rope_scaling (or transformers 5's rope_parameters): "yarn" with DeepSeek's fields, or (rope_parameters only)
// "default" for plain RoPE. Returns the YaRN settings or nothing.
std::optional<RopeScaling> read_rope(const json& j, const std::string& where, const std::string& type_key,
                                     bool has_theta, double* theta) {
  const Reader s(j, where);
  std::string type;
  s.read(type_key, type);
  if (has_theta) s.read("rope_theta", *theta);
  if (type == "default" && has_theta) {
    s.unknown_keys({});
    return std::nullopt;
  }
  require(type == "yarn", "config{}: {} must be \"yarn\" (DeepSeek-V3){}, got \"{}\"", where, type_key,
          has_theta ? " or \"default\"" : "", type);
  RopeScaling y;
  s.read("factor", y.factor);
  s.read("original_max_position_embeddings", y.original_max_position_embeddings);
  s.read("beta_fast", y.beta_fast);
  s.read("beta_slow", y.beta_slow);
  s.read("mscale", y.mscale);
  s.read("mscale_all_dim", y.mscale_all_dim);
  s.unknown_keys({"type", "rope_type"});
  return y;
}

}  // namespace

ModelConfig config_from_json_text(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    throw UserError(fmt::format("config: not valid JSON ({})", e.what()));
  }
  require(j.is_object(), "config: the top level must be a JSON object");
  const Reader r(j, "");
  ModelConfig c;
  r.read("vocab_size", c.vocab_size);
  r.read("hidden_size", c.hidden_size);
  r.read("intermediate_size", c.intermediate_size);
  r.read("moe_intermediate_size", c.moe_intermediate_size);
  r.read("num_hidden_layers", c.num_hidden_layers);
  r.read("num_attention_heads", c.num_attention_heads);
  r.read_nullable("q_lora_rank", c.q_lora_rank);
  r.read("kv_lora_rank", c.kv_lora_rank);
  r.read("qk_nope_head_dim", c.qk_nope_head_dim);
  r.read("qk_rope_head_dim", c.qk_rope_head_dim);
  r.read("v_head_dim", c.v_head_dim);
  r.read("n_routed_experts", c.n_routed_experts);
  r.read("n_shared_experts", c.n_shared_experts);
  r.read("num_experts_per_tok", c.num_experts_per_tok);
  r.read("n_group", c.n_group);
  r.read("topk_group", c.topk_group);
  r.read("routed_scaling_factor", c.routed_scaling_factor);
  r.read("norm_topk_prob", c.norm_topk_prob);
  r.read("scoring_func", c.scoring_func);
  r.read("first_k_dense_replace", c.first_k_dense_replace);
  r.read("num_nextn_predict_layers", c.num_nextn_predict_layers);
  r.read("rms_norm_eps", c.rms_norm_eps);
  r.read("max_position_embeddings", c.max_position_embeddings);
  r.read("tie_word_embeddings", c.tie_word_embeddings);
  if (const json* ir = r.find("initializer_range")) {
    require(ir->is_number(), "config: field 'initializer_range' must be a number, got {} {}", type_name(*ir),
            ir->dump());
    c.initializer_range = ir->get<double>();
  }
  if (const json* rp = r.find("rope_parameters")) {
    // transformers 5 writes RoPE settings as one "rope_parameters" object
    require(rp->is_object(), "config: field 'rope_parameters' must be an object, got {}", rp->dump());
    c.rope_scaling = read_rope(*rp, ".rope_parameters", "rope_type", true, &c.rope_theta);
  } else {
    r.read("rope_theta", c.rope_theta);
    const json& rs = r.need("rope_scaling");
    if (!rs.is_null()) {
      require(rs.is_object(), "config: field 'rope_scaling' must be an object or null, got {}", rs.dump());
      c.rope_scaling = read_rope(rs, ".rope_scaling", rs.contains("type") ? "type" : "rope_type", false, nullptr);
    }
  }
  if (const json* h = r.find("hidden_act"))
    require(h->is_string() && h->get<std::string>() == "silu", "config: hidden_act must be \"silu\" (SwiGLU), got {}",
            h->dump());
  if (const json* kv = r.find("num_key_value_heads"))
    require(kv->is_number_integer() && kv->get<int>() == c.num_attention_heads,
            "config: num_key_value_heads must equal num_attention_heads in MLA, got {}", kv->dump());
  if (const json* t = r.find("nano_dsv3")) {
    require(t->is_object(), "config: field 'nano_dsv3' must be an object");
    const Reader s(*t, ".nano_dsv3");
    s.read("aux_alpha", c.training.aux_alpha);
    s.read("bias_update_speed", c.training.bias_update_speed);
    s.read("mtp_lambda", c.training.mtp_lambda);
    s.unknown_keys({});
  }
  r.unknown_keys(kBookkeeping);
  c.validate();
  return c;
}

std::string config_to_json_text(const ModelConfig& c) {
  c.validate();
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_attention_heads;
  if (c.q_lora_rank > 0)
    j["q_lora_rank"] = c.q_lora_rank;
  else
    j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["scoring_func"] = c.scoring_func;
  j["topk_method"] = "noaux_tc";
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling) {
    const RopeScaling& y = *c.rope_scaling;
    j["rope_scaling"] = {{"type", "yarn"},
                         {"factor", y.factor},
                         {"original_max_position_embeddings", y.original_max_position_embeddings},
                         {"beta_fast", y.beta_fast},
                         {"beta_slow", y.beta_slow},
                         {"mscale", y.mscale},
                         {"mscale_all_dim", y.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_interleave"] = true;  // DeepSeek's RoPE rotates adjacent pairs (stage 01)
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.initializer_range) j["initializer_range"] = *c.initializer_range;
  j["attention_bias"] = false;
  j["nano_dsv3"] = {{"aux_alpha", c.training.aux_alpha},
                    {"bias_update_speed", c.training.bias_update_speed},
                    {"mtp_lambda", c.training.mtp_lambda}};
  return j.dump(2) + "\n";
}

ModelConfig load_config(const std::string& path) {
  const std::string text = read_file(path, "config file", kMaxJsonBytes);
  try {
    return config_from_json_text(text);
  } catch (const UserError& e) {
    throw UserError(fmt::format("{}: {}", path, e.what()));
  }
}

void save_config(const ModelConfig& c, const std::string& path) { write_file_atomic(path, config_to_json_text(c)); }

// ---- parameter counts ---------------------------------------------------------------------------------

ParamBreakdown count_params(const ModelConfig& c) {
  c.validate();
  const int64_t D = c.hidden_size, V = c.vocab_size, H = c.num_attention_heads, Dq = c.q_lora_rank;
  const int64_t Dc = c.kv_lora_rank, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int64_t E = c.n_routed_experts, Es = c.n_shared_experts, K = c.num_experts_per_tok;
  const int64_t F = c.moe_intermediate_size, Fd = c.intermediate_size;
  const int64_t L = c.num_hidden_layers, Ldense = c.first_k_dense_replace, Lmoe = L - Ldense;
  // one MLA: wq_a, q_norm, wq_b (or wq), wkv_a, kv_norm, wkv_b, wo
  const int64_t attn = (Dq > 0 ? D * Dq + Dq + Dq * H * (Dn + Dr) : D * H * (Dn + Dr)) + D * (Dc + Dr) + Dc +
                       Dc * H * (Dn + Dv) + H * Dv * D;
  const int64_t expert = 3 * D * F, router = E * D + E;  // the bias (E) is state, counted with the router
  ParamBreakdown b;
  b.rows = {{"embedding", V * D, V * D},
            {"attention (MLA)", L * attn, L * attn},
            {"dense FFN", Ldense * 3 * D * Fd, Ldense * 3 * D * Fd},
            {"shared experts", Lmoe * Es * expert, Lmoe * Es * expert},
            {"routed experts", Lmoe * E * expert, Lmoe * K * expert},
            {"router", Lmoe * router, Lmoe * router},
            {"norms", L * 2 * D + D, L * 2 * D + D},
            {"output head", V * D, V * D}};
  for (const auto& r : b.rows) {
    b.main_total += r.total;
    b.main_active += r.active;
  }
  // An MTP module: enorm, hnorm, eh_proj (D, 2D) and one block, MoE like the last layers (DeepSeek's layer 61).
  const bool moe_block = c.is_moe_layer(c.num_hidden_layers);
  const int64_t ffn_total = moe_block ? Es * expert + E * expert + router : 3 * D * Fd;
  const int64_t ffn_active = moe_block ? Es * expert + K * expert + router : 3 * D * Fd;
  const int64_t mtp_own = 2 * D + 2 * D * D + attn + 2 * D;
  b.mtp_total = c.num_nextn_predict_layers * (mtp_own + ffn_total);
  b.rows.push_back({"MTP modules (own)", b.mtp_total, c.num_nextn_predict_layers * (mtp_own + ffn_active)});
  return b;
}

}  // namespace dsv3
