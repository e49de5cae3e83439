// Stage 07's test helpers, shared by its test files: a temporary folder, synthetic songs a small model can learn, and
// the sampler tests' model config and random tokens. Tests only (no library code includes this).
#pragma once

#include <fmt/format.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "07_train_gpu/backend.h"
#include "04_aux_loss/lm_parts.h"
#include "06_full_model/model.h"
#include "06_full_model/model_config.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/train.h"
#include "common/rng.h"

namespace dsv3::test {

// The sampler tests' model: the "tiny" preset with no q compression, softmax scores without normalisation, one
// expert group, every layer MoE, and YaRN active (original context 16 < 64 positions), so the softmax scale
// carries YaRN's mscale.
inline ModelConfig tiny_variant() {
  ModelConfig c = config_preset("tiny");
  c.q_lora_rank = 0;
  c.scoring_func = "softmax";
  c.norm_topk_prob = false;
  c.n_group = 1;
  c.topk_group = 1;
  c.first_k_dense_replace = 0;
  RopeScaling y;
  y.factor = 4;
  y.original_max_position_embeddings = 16;
  y.mscale = y.mscale_all_dim = 0.7;
  c.rope_scaling = y;
  c.validate();
  return c;
}

// The token cycle the sampler tests' trained model learns.
inline const std::vector<int> kCycle = {3, 17, 42, 8, 55, 23, 30};

// The tiny model after 150 AdamW steps on windows of a cyclic sequence (period 7, every phase): the main model
// and the MTP module both learn to continue the cycle, so MTP drafts are mostly right (the accept path of
// speculative decoding runs). Trained once per test binary (well under a second), shared by the CPU and GPU
// sampler tests.
inline const Model<float>& cyclic_model() {
  static const Model<float> model = [] {
    Model<float> m(config_preset("tiny"), 21);
    const int B = 7, T = 12;
    std::vector<int> window;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i <= T; ++i) window.push_back(kCycle[(b + i) % kCycle.size()]);
    auto tensors = m.tensors();
    std::vector<std::vector<float>> mom(tensors.size()), var(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      mom[i].assign(tensors[i].value->size(), 0.0f);
      var[i].assign(tensors[i].value->size(), 0.0f);
    }
    AdamWConfig opt;
    opt.lr = 1e-2f;
    for (int step = 1; step <= 150; ++step) {
      m.forward(window, B, T);
      m.backward();
      for (size_t i = 0; i < tensors.size(); ++i)
        cpu::adamw_step(tensors[i].value->data(), tensors[i].grad->data(), mom[i].data(), var[i].data(),
                        tensors[i].value->size(), step, opt, false);
    }
    return m;
  }();
  return model;
}

// Same length and the same bits.
inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// n token ids drawn uniformly from [0, V).
inline std::vector<int> random_tokens(int n, int V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int> t(n);
  for (auto& x : t) x = int(rng.below(V));
  return t;
}

// A Backend that hands every call to the one it wraps: tests derive from it and override only the calls they
// watch or falsify (a NaN loss, a stop request after N updates, ...).
class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> in) : in_(std::move(in)) {}
  std::string describe() const override { return in_->describe(); }
  const ModelConfig& config() const override { return in_->config(); }
  ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) override {
    return in_->forward_backward(tokens, B, T);
  }
  ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) override { return in_->evaluate(tokens, B, T); }
  std::vector<double> mtp_losses() const override { return in_->mtp_losses(); }
  std::vector<std::vector<int>> expert_counts() const override { return in_->expert_counts(); }
  double grad_norm() override { return in_->grad_norm(); }
  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override { in_->step(opt, grad_scale, step); }
  TensorMap weights() const override { return in_->weights(); }
  TensorMap gradients() const override { return in_->gradients(); }
  void load_weights(const TensorMap& m) override { in_->load_weights(m); }
  TensorMap optimizer_state() const override { return in_->optimizer_state(); }
  void load_optimizer_state(const TensorMap& m) override { in_->load_optimizer_state(m); }
  ModelLosses all_reduce(Communicator& c) override { return in_->all_reduce(c); }
  void set_communicator(Communicator* c, bool expert_parallel = false) override {
    Backend::set_communicator(c, expert_parallel);
    in_->set_communicator(c, expert_parallel);
  }

 protected:
  std::unique_ptr<Backend> in_;
};

// The trainer tests' run on synthetic_data(): 4 windows of 16 tokens, lr 1e-2 after 2 warm-up steps, validation
// every 4 steps.
inline TrainConfig small_run(int64_t steps) {
  TrainConfig c;
  c.batch = 4;
  c.seq_len = 16;
  c.max_steps = steps;
  c.lr = 1e-2;
  c.warmup_steps = 2;
  c.eval_every = 4;
  c.seed = 5;
  return c;
}

// A fresh folder under the system temp dir, removed at the end of the test.
struct TempDir {
  std::string path;
  TempDir() {
    static int counter = 0;  // inline function: one counter for the whole test binary
    path = (std::filesystem::temp_directory_path() / fmt::format("dsv3_07_{}_{}", ::getpid(), counter++)).string();
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string sub(const std::string& name) const { return path + "/" + name; }
  // Writes bytes to <path>/name and returns that path.
  std::string file(const std::string& name, const std::string& bytes) const {
    const std::string p = sub(name);
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
};

constexpr int kSyntheticVocab = 61, kSyntheticEos = 2;

// Songs of vocab 61: one of 4 fixed 12-token phrases sung 3 times with 10% of the tokens replaced by noise, then
// eos. A model can learn the phrases (the loss falls well below ln 61) but not the noise.
inline std::vector<uint16_t> synthetic_split(int songs, uint64_t seed) {
  Rng phrases(42);  // the same phrases in both splits
  std::vector<std::vector<uint16_t>> phrase(4);
  for (auto& p : phrase)
    for (int i = 0; i < 12; ++i) p.push_back(uint16_t(3 + phrases.below(kSyntheticVocab - 3)));
  Rng rng(seed);
  std::vector<uint16_t> out;
  for (int s = 0; s < songs; ++s) {
    const auto& p = phrase[rng.below(4)];
    for (int r = 0; r < 3; ++r)
      for (uint16_t t : p) out.push_back(rng.uniform() < 0.1 ? uint16_t(3 + rng.below(kSyntheticVocab - 3)) : t);
    out.push_back(kSyntheticEos);
  }
  return out;
}

// 60 train songs (2220 tokens), 12 validation songs (444 tokens); "bytes" count 3 per non-eos token.
inline const data::Prepared& synthetic_data() {
  static const data::Prepared d = [] {
    data::Prepared p;
    p.train = synthetic_split(60, 1);
    p.val = synthetic_split(12, 2);
    p.info.vocab_size = kSyntheticVocab;
    p.info.eos_id = kSyntheticEos;
    p.info.train = {"train.bin", 60, 180, 3 * int64_t(p.train.size() - 60), int64_t(p.train.size())};
    p.info.val = {"val.bin", 12, 36, 3 * int64_t(p.val.size() - 12), int64_t(p.val.size())};
    return p;
  }();
  return d;
}

}  // namespace dsv3::test
