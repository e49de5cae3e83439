// Stage 06 checkpoint tests: names and shapes cover exactly the parameters count_params counts, a save/load
// round trip is exact (F32) or bf16-rounded, and a tampered checkpoint is rejected with a clear error.
#include <filesystem>
#include <fstream>
#include <set>

#include "06_full_model/checkpoint.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

TensorMap random_tensors(const ModelConfig& c, uint64_t seed) {
  Rng rng(seed);
  TensorMap m;
  for (const auto& sp : checkpoint_specs(c))
    if (sp.mirror_of.empty()) m[sp.name] = rng.normal_vec<float>(size_t(sp.numel()));
  return m;
}

std::string fresh_dir(const std::string& name) {
  const auto d = std::filesystem::temp_directory_path() / "dsv3_test_checkpoint" / name;
  std::filesystem::remove_all(d);
  return d.string();
}

void expect_load_error(const std::string& dir, const std::string& fragment) {
  try {
    load_checkpoint(dir);
    ADD_FAILURE() << "loaded; expected an error containing '" << fragment << "'";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Checkpoint, SpecsCoverExactlyTheCountedParameters) {
  for (const auto& name : config_preset_names()) {
    if (name == "deepseek-v3") continue;  // 1.6e5 specs: fine, but the sizes below are what matter
    const ModelConfig c = config_preset(name);
    int64_t total = 0;
    std::set<std::string> names;
    for (const auto& sp : checkpoint_specs(c)) {
      EXPECT_TRUE(names.insert(sp.name).second) << "duplicate " << sp.name;
      if (sp.mirror_of.empty()) total += sp.numel();
    }
    const ParamBreakdown b = count_params(c);
    EXPECT_EQ(total, b.main_total + b.mtp_total) << name;
  }
  const auto specs = checkpoint_specs(config_preset("deepseek-v3"));
  EXPECT_EQ(specs.front().name, "model.embed_tokens.weight");
  bool mtp_found = false;
  for (const auto& sp : specs) mtp_found |= sp.name == "model.layers.61.eh_proj.weight";
  EXPECT_TRUE(mtp_found);
}

TEST(Checkpoint, RoundTripF32ExactAndBf16Rounded) {
  const ModelConfig c = config_preset("tiny");
  const TensorMap t = random_tensors(c, 1);
  const std::string dir = fresh_dir("roundtrip");
  save_checkpoint(dir, c, t);
  const Checkpoint ck = load_checkpoint(dir);
  EXPECT_EQ(ck.tensors, t);
  EXPECT_EQ(config_to_json_text(ck.config), config_to_json_text(c));
  save_checkpoint(dir, c, t, DType::BF16);
  const Checkpoint b = load_checkpoint(dir);
  for (const auto& [name, v] : t)
    for (size_t i = 0; i < v.size(); ++i) ASSERT_NEAR(b.tensors.at(name)[i], v[i], std::abs(v[i]) / 128) << name;
}

TEST(Checkpoint, SaveRejectsMissingOrForeignTensors) {
  const ModelConfig c = config_preset("tiny");
  TensorMap t = random_tensors(c, 2);
  const std::string dir = fresh_dir("save_errors");
  auto missing = t;
  missing.erase("lm_head.weight");
  EXPECT_THROW(save_checkpoint(dir, c, missing), UserError);
  auto foreign = t;
  foreign["model.layers.9.mlp.gate.weight"] = {1.f};
  EXPECT_THROW(save_checkpoint(dir, c, foreign), UserError);
  t["model.norm.weight"].push_back(1.f);
  EXPECT_THROW(save_checkpoint(dir, c, t), UserError);
  EXPECT_FALSE(std::filesystem::exists(dir + "/model.safetensors"));
}

TEST(Checkpoint, LoadRejectsTamperedCheckpoints) {
  const ModelConfig c = config_preset("tiny");
  const TensorMap t = random_tensors(c, 3);
  const std::string dir = fresh_dir("tampered");
  save_checkpoint(dir, c, t);
  const std::string st = dir + "/model.safetensors";
  // 1) weights of another config: the shapes no longer match
  ModelConfig other = c;
  other.hidden_size = 28;
  save_config(other, dir + "/config.json");
  expect_load_error(dir, "wrong shape");
  // 2) a tensor renamed away: missing
  save_config(c, dir + "/config.json");
  {
    TensorMap renamed = t;
    SafetensorsWriter w;
    for (const auto& sp : checkpoint_specs(c)) {
      const auto& v = renamed.at(sp.mirror_of.empty() ? sp.name : sp.mirror_of);
      w.add_f32(sp.name == "model.norm.weight" ? "model.final_norm.weight" : sp.name, sp.shape, v.data());
    }
    w.write(st);
  }
  expect_load_error(dir, "'model.norm.weight' is missing");
  // 3) truncated file
  save_checkpoint(dir, c, t);
  std::filesystem::resize_file(st, std::filesystem::file_size(st) - 100);
  expect_load_error(dir, "lie outside the data");
  // 4) a mirror that differs from its source
  {
    SafetensorsWriter w;
    for (const auto& sp : checkpoint_specs(c)) {
      auto v = t.at(sp.mirror_of.empty() ? sp.name : sp.mirror_of);
      if (sp.name.find("shared_head.head") != std::string::npos) v[0] += 1.f;
      w.add_f32(sp.name, sp.shape, v.data());
    }
    w.write(st);
  }
  expect_load_error(dir, "differs from 'lm_head.weight'");
  // 5) a tensor stored as integers (same bytes, wrong dtype)
  {
    SafetensorsWriter w;
    for (const auto& sp : checkpoint_specs(c)) {
      const auto& v = t.at(sp.mirror_of.empty() ? sp.name : sp.mirror_of);
      if (sp.name == "model.norm.weight")
        w.add(sp.name, DType::I32, sp.shape, v.data(), v.size() * sizeof(float));
      else
        w.add_f32(sp.name, sp.shape, v.data());
    }
    w.write(st);
  }
  expect_load_error(dir, "'model.norm.weight' has dtype I32");
  // 6) no such folder
  expect_load_error(fresh_dir("nothing-here"), "does not exist");
}
