// Stage 06 config tests: presets round-trip through config.json, bad fields are named, unknown ones warned,
// parameter counts match DeepSeek-V3's published 671 B total / 37 B active.
#include <nlohmann/json.hpp>

#include <filesystem>

#include "06_full_model/model_config.h"
#include "common/errors.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

// The JSON text of a preset with one field replaced (or removed when value is "REMOVE").
std::string edited(const std::string& preset, const std::string& key, const std::string& value) {
  auto j = nlohmann::json::parse(config_to_json_text(config_preset(preset)));
  if (value == "REMOVE")
    j.erase(key);
  else
    j[key] = nlohmann::json::parse(value);
  return j.dump();
}

void expect_error(const std::string& text, const std::string& fragment) {
  try {
    config_from_json_text(text);
    ADD_FAILURE() << "accepted; expected an error containing '" << fragment << "'";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(ModelConfig, PresetsRoundTripThroughJson) {
  for (const auto& name : config_preset_names()) {
    const ModelConfig c = config_preset(name);
    const ModelConfig d = config_from_json_text(config_to_json_text(c));
    EXPECT_EQ(config_to_json_text(d), config_to_json_text(c)) << name;
  }
}

TEST(ModelConfig, SaveAndLoadFile) {
  const auto path = (std::filesystem::temp_directory_path() / "dsv3_config_test.json").string();
  save_config(config_preset("small"), path);
  EXPECT_EQ(config_to_json_text(load_config(path)), config_to_json_text(config_preset("small")));
  EXPECT_THROW(load_config("/nonexistent/config.json"), UserError);
}

TEST(ModelConfig, SmallPresetIsTheBenchmarkConfig) {
  const ModelConfig c = config_preset("small");
  EXPECT_EQ(c.vocab_size, 8192);
  EXPECT_EQ(c.hidden_size, 512);
  EXPECT_EQ(c.num_hidden_layers, 8);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.intermediate_size, 1408);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.q_lora_rank, 256);
  EXPECT_EQ(c.kv_lora_rank, 128);
  EXPECT_EQ(c.qk_nope_head_dim, 64);
  EXPECT_EQ(c.qk_rope_head_dim, 32);
  EXPECT_EQ(c.v_head_dim, 64);
  EXPECT_EQ(c.n_routed_experts, 32);
  EXPECT_EQ(c.moe_intermediate_size, 256);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.max_position_embeddings, 512);
}

TEST(ModelConfig, MissingMistypedAndInconsistentFieldsAreNamed) {
  expect_error(edited("tiny", "hidden_size", "REMOVE"), "missing field 'hidden_size'");
  expect_error(edited("tiny", "hidden_size", "\"24\""), "'hidden_size' must be an integer");
  expect_error(edited("tiny", "hidden_size", "24.5"), "'hidden_size' must be an integer");
  expect_error(edited("tiny", "norm_topk_prob", "1"), "'norm_topk_prob' must be true or false");
  expect_error(edited("tiny", "scoring_func", "\"relu\""), "scoring_func");
  expect_error(edited("tiny", "n_group", "3"), "n_group = 3 must divide");       // 8 experts
  expect_error(edited("tiny", "num_experts_per_tok", "9"), "num_experts_per_tok");  // K > E
  expect_error(edited("tiny", "topk_group", "5"), "topk_group");
  expect_error(edited("tiny", "qk_rope_head_dim", "0"), "qk_rope_head_dim");
  expect_error(edited("tiny", "first_k_dense_replace", "3"), "first_k_dense_replace");
  expect_error(edited("tiny", "tie_word_embeddings", "true"), "tie_word_embeddings");
  expect_error(edited("tiny", "norm_topk_prob", "false"), "norm_topk_prob must be true");
  expect_error(edited("tiny", "rope_scaling", R"({"type": "linear", "factor": 2})"), "\"yarn\"");
  expect_error(edited("tiny", "nano_dsv3", R"({"aux_alpha": -1, "bias_update_speed": 0, "mtp_lambda": 0})"),
               "aux_alpha");
  expect_error("{not json", "not valid JSON");
  expect_error("[1, 2]", "JSON object");
  EXPECT_THROW(config_preset("huge"), UserError);
}

TEST(ModelConfig, UnknownFieldsAreErrorsAndTransformersKeysAreAccepted) {
  auto j = nlohmann::json::parse(config_to_json_text(config_preset("tiny")));
  j["torch_dtype"] = "float32";
  j["transformers_version"] = "5.17.0";
  EXPECT_NO_THROW(config_from_json_text(j.dump()));
  auto typo = j;
  typo["hidden_sise"] = 24;
  expect_error(typo.dump(), "unknown field 'hidden_sise'");
  auto knob = j;
  knob["nano_dsv3"]["lr"] = 0.1;
  expect_error(knob.dump(), "config.nano_dsv3: unknown field 'lr'");
  // integers are read through 64 bits: 2^32 + 24 is not 24
  auto wide = j;
  wide["hidden_size"] = 4294967320LL;
  expect_error(wide.dump(), "'hidden_size' = 4294967320 is out of range");
  auto huge = j;
  huge["max_position_embeddings"] = 2147483647;
  expect_error(huge.dump(), "max_position_embeddings = 2147483647 is larger than this implementation supports");
}

TEST(ModelConfig, ReadsTransformers5RopeParameters) {
  auto j = nlohmann::json::parse(config_to_json_text(config_preset("deepseek-v3")));
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "yarn"},   {"rope_theta", 10000.0}, {"factor", 40.0},
                          {"original_max_position_embeddings", 4096}, {"beta_fast", 32.0},
                          {"beta_slow", 1.0},      {"mscale", 1.0},         {"mscale_all_dim", 1.0}};
  const ModelConfig c = config_from_json_text(j.dump());
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->factor, 40.0);
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5000.0}};
  const ModelConfig d = config_from_json_text(j.dump());
  EXPECT_FALSE(d.rope_scaling.has_value());
  EXPECT_EQ(d.rope_theta, 5000.0);
}

TEST(ModelConfig, StageConfigsFollowTheFields) {
  const ModelConfig c = config_preset("deepseek-v3");
  EXPECT_TRUE(c.rope().yarn_active());
  EXPECT_NEAR(c.mla().softmax_scale(), std::pow(192.0, -0.5) * 1.8738542, 1e-7);
  EXPECT_EQ(c.moe().n_limited_groups, 4);
  EXPECT_EQ(c.moe().route_scale, 2.5f);
  EXPECT_FALSE(config_preset("small").rope().yarn_active());
}

TEST(ParamCount, DeepSeekV3Is671BTotal37BActive) {
  const ParamBreakdown b = count_params(config_preset("deepseek-v3"));
  // Paper (arXiv 2412.19437): 671 B total, 37 B activated per token; the released checkpoint adds the MTP
  // module (685 B with its copies of the embedding and head).
  EXPECT_NEAR(double(b.main_total) / 1e9, 671.0, 1.0);
  EXPECT_NEAR(double(b.main_active) / 1e9, 37.5, 1.0);
  EXPECT_NEAR(double(b.main_total + b.mtp_total + 2 * 129280LL * 7168) / 1e9, 685.0, 1.0);
}

TEST(ParamCount, TinyPresetByHand) {
  const ModelConfig c = config_preset("tiny");
  const ParamBreakdown b = count_params(c);
  // attention: wq_a 24*12 + q_norm 12 + wq_b 12*2*10 + wkv_a 24*14 + kv_norm 10 + wkv_b 10*2*11 + wo 2*5*24
  const int64_t attn = 288 + 12 + 240 + 336 + 10 + 220 + 240;
  EXPECT_EQ(b.rows[1].total, 2 * attn);
  EXPECT_EQ(b.rows[2].total, 3 * 24 * 40);           // one dense layer
  EXPECT_EQ(b.rows[4].total, 8 * 3 * 24 * 8);        // 8 routed experts in one MoE layer
  EXPECT_EQ(b.rows[4].active, 2 * 3 * 24 * 8);       // 2 of them per token
}

// Hugging Face's initializer_range: read and written when set (the deepseek-v3 preset: 0.006, paper §4.2),
// absent from our small presets' files, rejected when not a positive number.
TEST(ModelConfig, InitializerRangeIsReadWrittenAndChecked) {
  EXPECT_EQ(config_preset("deepseek-v3").initializer_range, 0.006);
  EXPECT_FALSE(config_preset("tiny").initializer_range.has_value());
  EXPECT_EQ(config_from_json_text(edited("tiny", "initializer_range", "0.02")).initializer_range, 0.02);
  EXPECT_FALSE(nlohmann::json::parse(config_to_json_text(config_preset("tiny"))).contains("initializer_range"));
  expect_error(edited("tiny", "initializer_range", "0"), "initializer_range must be in (0, 10)");
  expect_error(edited("tiny", "initializer_range", "\"0.02\""), "field 'initializer_range' must be a number");
}
