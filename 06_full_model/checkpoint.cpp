// Stage 06 checkpoints (checkpoint.h).
#include "06_full_model/checkpoint.h"

#include <filesystem>
#include <set>

#include "common/errors.h"

namespace dsv3 {

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

namespace {

void add_block(std::vector<TensorSpec>& out, const ModelConfig& c, const std::string& p, bool moe) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  const int64_t Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  out.push_back({p + "input_layernorm.weight", {D}, ""});
  if (Dq > 0) {
    out.push_back({p + "self_attn.q_a_proj.weight", {Dq, D}, ""});             // wq_a
    out.push_back({p + "self_attn.q_a_layernorm.weight", {Dq}, ""});           // q_norm
    out.push_back({p + "self_attn.q_b_proj.weight", {H * (Dn + Dr), Dq}, ""});  // wq_b
  } else {
    out.push_back({p + "self_attn.q_proj.weight", {H * (Dn + Dr), D}, ""});  // wq
  }
  out.push_back({p + "self_attn.kv_a_proj_with_mqa.weight", {Dc + Dr, D}, ""});  // wkv_a
  out.push_back({p + "self_attn.kv_a_layernorm.weight", {Dc}, ""});              // kv_norm
  out.push_back({p + "self_attn.kv_b_proj.weight", {H * (Dn + Dv), Dc}, ""});    // wkv_b
  out.push_back({p + "self_attn.o_proj.weight", {D, H * Dv}, ""});               // wo
  out.push_back({p + "post_attention_layernorm.weight", {D}, ""});
  auto mlp = [&](const std::string& q, int64_t F) {  // SwiGLU: w1 = gate_proj, w3 = up_proj, w2 = down_proj
    out.push_back({q + "gate_proj.weight", {F, D}, ""});
    out.push_back({q + "up_proj.weight", {F, D}, ""});
    out.push_back({q + "down_proj.weight", {D, F}, ""});
  };
  if (!moe) {
    mlp(p + "mlp.", c.intermediate_size);
    return;
  }
  const int64_t E = c.n_routed_experts;
  out.push_back({p + "mlp.gate.weight", {E, D}, ""});
  out.push_back({p + "mlp.gate.e_score_correction_bias", {E}, ""});  // the balancing bias (stage 04)
  for (int64_t j = 0; j < E; ++j) mlp(p + "mlp.experts." + std::to_string(j) + ".", c.moe_intermediate_size);
  if (c.n_shared_experts > 0)
    mlp(p + "mlp.shared_experts.", int64_t(c.n_shared_experts) * c.moe_intermediate_size);
}

}  // namespace

std::vector<TensorSpec> checkpoint_specs(const ModelConfig& c) {
  c.validate();
  const int64_t D = c.hidden_size, V = c.vocab_size;
  std::vector<TensorSpec> s;
  s.push_back({"model.embed_tokens.weight", {V, D}, ""});
  for (int l = 0; l < c.num_hidden_layers; ++l)
    add_block(s, c, "model.layers." + std::to_string(l) + ".", c.is_moe_layer(l));
  s.push_back({"model.norm.weight", {D}, ""});
  s.push_back({"lm_head.weight", {V, D}, ""});
  for (int k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int l = c.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "enorm.weight", {D}, ""});
    s.push_back({p + "hnorm.weight", {D}, ""});
    s.push_back({p + "eh_proj.weight", {D, 2 * D}, ""});
    add_block(s, c, p, c.is_moe_layer(l));
    // DeepSeek's release stores copies of the shared tensors with each module; ours are shared.
    s.push_back({p + "embed_tokens.weight", {V, D}, "model.embed_tokens.weight"});
    s.push_back({p + "shared_head.norm.weight", {D}, "model.norm.weight"});
    s.push_back({p + "shared_head.head.weight", {V, D}, "lm_head.weight"});
  }
  return s;
}

void save_checkpoint(const std::string& dir, const ModelConfig& c, const TensorMap& tensors, DType stored) {
  const auto specs = checkpoint_specs(c);
  std::set<std::string> expected;
  for (const auto& sp : specs) {
    if (!sp.mirror_of.empty()) continue;
    expected.insert(sp.name);
    const auto it = tensors.find(sp.name);
    require(it != tensors.end(), "save_checkpoint: tensor '{}' is missing", sp.name);
    require(int64_t(it->second.size()) == sp.numel(), "save_checkpoint: tensor '{}' has {} values, expected {}",
            sp.name, it->second.size(), sp.numel());
  }
  for (const auto& [name, v] : tensors)
    require(expected.count(name), "save_checkpoint: tensor '{}' is not part of this model", name);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require(!ec, "cannot create checkpoint folder '{}': {}", dir, ec.message());
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& sp : specs) {
    const auto& v = tensors.at(sp.mirror_of.empty() ? sp.name : sp.mirror_of);
    w.add_f32(sp.name, sp.shape, v.data(), stored);
  }
  // The weights first: a config.json next to a missing or stale model.safetensors would be worse.
  w.write(dir + "/model.safetensors");
  save_config(c, dir + "/config.json");
}

Checkpoint load_checkpoint(const std::string& dir) {
  require(std::filesystem::is_directory(dir), "checkpoint folder '{}' does not exist", dir);
  Checkpoint ck;
  ck.config = load_config(dir + "/config.json", &ck.warnings);
  const SafetensorsFile f(dir + "/model.safetensors");
  const auto specs = checkpoint_specs(ck.config);
  std::set<std::string> known;
  for (const auto& sp : specs) {
    known.insert(sp.name);
    require(f.has(sp.name), "{}/model.safetensors: tensor '{}' is missing", dir, sp.name);
    const TensorInfo& t = f.info(sp.name);
    require(t.dtype == DType::F32 || t.dtype == DType::BF16, "{}/model.safetensors: tensor '{}' has dtype {}, "
            "expected F32 or BF16", dir, sp.name, dtype_name(t.dtype));
    require(t.shape == sp.shape, "{}/model.safetensors: tensor '{}' has the wrong shape for this config", dir,
            sp.name);
  }
  for (const auto& t : f.tensors())
    require(known.count(t.name), "{}/model.safetensors: unexpected tensor '{}' for this config", dir, t.name);
  for (const auto& sp : specs) {
    if (sp.mirror_of.empty()) {
      ck.tensors[sp.name] = f.read_f32(sp.name, sp.shape);
      continue;
    }
    require(f.read_f32(sp.name) == f.read_f32(sp.mirror_of),
            "{}/model.safetensors: '{}' differs from '{}'; this model shares them", dir, sp.name, sp.mirror_of);
  }
  return ck;
}

}  // namespace dsv3
