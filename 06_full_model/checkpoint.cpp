// Stage 06 checkpoints (checkpoint.h).
#include "06_full_model/checkpoint.h"

#include <cstdint>
#include <filesystem>
#include <set>

#include "06_full_model/model.h"
#include "common/errors.h"
#include "common/finite.h"

namespace dsv3 {

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

std::vector<TensorSpec> checkpoint_specs(const ModelConfig& c) {
  c.validate();
  std::vector<TensorSpec> s;
  // 1) the model's one list (model.h), with a tensor stacked over experts stored as one tensor per expert
  for_each_param(c, [&s](const ParamInfo& i) {
    if (!i.used()) return;
    const size_t at = i.hf.find("{e}");
    if (at == std::string::npos) {
      s.push_back({i.hf, i.shape, ""});
      return;
    }
    const std::vector<int64_t> one(i.shape.begin() + 1, i.shape.end());
    for (int64_t e = 0; e < i.shape.front(); ++e)
      s.push_back({i.hf.substr(0, at) + std::to_string(e) + i.hf.substr(at + 3), one, ""});
  });
  // 2) DeepSeek's release stores copies of the shared tensors with each MTP module; ours are shared
  const int64_t D = c.hidden_size, V = c.vocab_size;
  for (int k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
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
    require_finite(it->second, fmt::format("save_checkpoint: tensor '{}'", sp.name));
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
  ck.config = load_config(dir + "/config.json");
  const SafetensorsFile f(dir + "/model.safetensors");
  // before listing the config's tensors (millions of names for a hostile config): the file must be able to hold
  // them, at 2 bytes a value at least
  uint64_t stored = 0;
  for (const auto& t : f.tensors()) stored += t.end - t.begin;
  const ParamBreakdown pb = count_params(ck.config);
  const uint64_t need = 2 * uint64_t(pb.main_total + pb.mtp_total);
  require(stored >= need, "{}/model.safetensors holds {} bytes of tensors; the model of its config.json ({} "
          "parameters) needs at least {}: the config does not belong to these weights", dir, stored,
          pb.main_total + pb.mtp_total, need);
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
    std::vector<float> v = f.read_f32(sp.name, sp.shape);
    require_finite(v, fmt::format("{}/model.safetensors: tensor '{}'", dir, sp.name));
    if (sp.mirror_of.empty()) {
      ck.tensors[sp.name] = std::move(v);
      continue;
    }
    require(v == f.read_f32(sp.mirror_of),
            "{}/model.safetensors: '{}' differs from '{}'; this model shares them", dir, sp.name, sp.mirror_of);
  }
  return ck;
}

}  // namespace dsv3
