// Stage 06 whole-model tests on the CPU reference: gradcheck of every parameter tensor of the tiny preset
// (dense and MoE layers, MTP, balance loss; routing flips skipped and counted), save -> load -> identical
// logits, the loss decomposition, and the bias update.
#include <algorithm>
#include <cmath>
#include <filesystem>

#include "06_full_model/checkpoint.h"
#include "06_full_model/model.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

std::vector<int> random_window(const ModelConfig& c, int B, int T, uint64_t seed) {
  Rng rng(seed);
  std::vector<int> t(size_t(B) * (T + 1));
  for (auto& x : t) x = int(rng.below(c.vocab_size));
  return t;
}

}  // namespace

TEST(Model, WholeModelGradcheckTinyPreset) {
  ModelConfig c = config_preset("tiny");  // layer 0 dense, layer 1 MoE, one MTP module (MoE)
  c.training.aux_alpha = 0.1;           // balance loss on, so its gradient is checked too
  Model<double> m(c, 3);
  const int B = 2, T = 5;
  const auto tokens = random_window(c, B, T, 4);
  auto loss = [&] { return m.forward(tokens, B, T); };
  loss();
  m.backward();
  std::vector<std::vector<double>> grads;  // copies: the gradcheck's forwards must not see new gradients
  for (auto& t : m.tensors()) grads.push_back(*t.grad);
  std::vector<GradTensor> ts;
  size_t i = 0;
  for (auto& t : m.tensors()) ts.push_back({t.name, t.value, &grads[i++]});
  GradCheckOptions opt;
  opt.max_coords = 5;
  opt.decision_signature = [&] { return m.routing_signature(); };
  const auto r = gradcheck(loss, ts, opt);
  EXPECT_GRADCHECK(r);
  EXPECT_GT(ts.size(), 40u);
  EXPECT_GT(r.checked, 150u) << r.report();
}

TEST(Model, LossIsCePlusMtpPlusBalance) {
  ModelConfig c = config_preset("tiny");
  c.training.aux_alpha = 0.01;
  Model<double> m(c, 5);
  const auto tokens = random_window(c, 2, 7, 6);
  const double total = m.forward(tokens, 2, 7);
  const ModelLosses& l = m.losses();
  EXPECT_GT(l.ce, 0);
  EXPECT_GT(l.mtp, 0);
  EXPECT_GT(l.balance, 0);
  EXPECT_NEAR(total, l.ce + l.mtp + l.balance, 1e-12);
  c.training.aux_alpha = 0;
  c.num_nextn_predict_layers = 0;
  Model<double> plain(c, 5);
  plain.forward(tokens, 2, 7);
  EXPECT_EQ(plain.losses().mtp, 0.0);
  EXPECT_EQ(plain.losses().balance, 0.0);
  EXPECT_EQ(plain.losses().ce, l.ce);  // same seed, same main model: the extra losses do not touch it
}

TEST(Model, SaveLoadGivesIdenticalLogits) {
  ModelConfig c = config_preset("tiny");
  Model<float> a(c, 7);
  const auto tokens = random_window(c, 2, 9, 8);
  a.forward(tokens, 2, 9);
  a.backward();
  a.update_bias();  // a nonzero routing bias must survive the round trip too
  a.forward(tokens, 2, 9);
  const std::vector<float> logits = a.logits();
  const auto dir = (std::filesystem::temp_directory_path() / "dsv3_test_model_ckpt").string();
  std::filesystem::remove_all(dir);
  save_checkpoint(dir, c, a.to_tensor_map());
  const Checkpoint ck = load_checkpoint(dir);
  Model<float> b(ck.config, 99);  // other random weights, then replaced by the checkpoint's
  b.load_tensor_map(ck.tensors);
  b.forward(tokens, 2, 9);
  EXPECT_EQ(b.logits(), logits);
  EXPECT_EQ(b.losses().total(), a.losses().total());
  TensorMap partial = ck.tensors;
  partial.erase("model.layers.1.mlp.experts.3.up_proj.weight");
  EXPECT_THROW(b.load_tensor_map(partial), UserError);
}

// Paper §2.1.2: the bias of every routed expert moves, the MTP module's MoE block (layer L = 2 of tiny) as well
// as the main MoE layer (1): by gamma * sign(mean load - load) from that block's own loads; nothing else moves.
TEST(Model, BiasUpdateMovesEveryMoeBiasTheMtpModulesToo) {
  ModelConfig c = config_preset("tiny");
  c.training.bias_update_speed = 0.05;
  Model<double> m(c, 9);
  const int B = 4, T = 8;
  m.forward(random_window(c, B, T, 10), B, T);
  const TensorMap before = m.to_tensor_map();
  m.update_bias();
  const TensorMap after = m.to_tensor_map();
  int moved_layers = 0;
  for (const auto& [name, v] : before) {
    if (name.find("e_score_correction_bias") == std::string::npos) {
      EXPECT_EQ(after.at(name), v) << name;
      continue;
    }
    const int layer = std::stoi(name.substr(std::string("model.layers.").size()));
    const std::vector<int> load = m.expert_counts(layer);
    ASSERT_EQ(load.size(), v.size()) << name;
    const double mean = double(B * T * c.num_experts_per_tok) / c.n_routed_experts;
    for (size_t e = 0; e < v.size(); ++e) {
      const double expect = load[e] < mean ? 0.05 : load[e] > mean ? -0.05 : 0.0;
      EXPECT_NEAR(after.at(name)[e] - v[e], expect, 1e-6) << name << " expert " << e << " load " << load[e];
    }
    moved_layers += after.at(name) != v;
  }
  EXPECT_EQ(moved_layers, 2) << "the main MoE layer and the MTP module's block";
  EXPECT_FALSE(m.expert_counts(2).empty()) << "layer L = 2 is the MTP module's MoE block";
  EXPECT_TRUE(m.expert_counts(0).empty()) << "layer 0 is dense";
}

// initializer_range set: every weight matrix is N(0, r^2) (sample std within 10 % for tensors of 200+ values,
// mean within 4 standard errors of 0), every norm weight 1; unset: the fan-in scheme (embedding std 1).
TEST(Model, InitializerRangeDrawsEveryWeightMatrixWithThatStd) {
  ModelConfig c = config_preset("tiny");
  c.initializer_range = 0.02;
  Model<double> m(c, 31);
  int checked = 0;
  for (const auto& t : m.tensors()) {
    const std::vector<double>& v = *t.value;
    if (t.kind == ParamKind::Norm) {
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](double x) { return x == 1.0; })) << t.name;
      continue;
    }
    if (v.size() < 200) continue;
    double mean = 0, sq = 0;
    for (double x : v) mean += x / double(v.size());
    for (double x : v) sq += (x - mean) * (x - mean) / double(v.size());
    EXPECT_NEAR(std::sqrt(sq), 0.02, 0.002) << t.name;
    EXPECT_NEAR(mean, 0.0, 4 * 0.02 / std::sqrt(double(v.size()))) << t.name;
    ++checked;
  }
  EXPECT_GT(checked, 10);
  Model<double> fan_in(config_preset("tiny"), 31);
  const std::vector<double>& e = *fan_in.tensors().front().value;  // embed: N(0, 1)
  double sq = 0;
  for (double x : e) sq += x * x / double(e.size());
  EXPECT_NEAR(std::sqrt(sq), 1.0, 0.1);
}

#ifdef DSV3_HAVE_CUDA
#include "06_full_model/model_device.h"

TEST(CudaModel, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  ModelConfig c = config_preset("tiny");
  c.training.aux_alpha = 0.1;
  Model<float> host(c, 11);
  // Well-separated biases: fp32 sums in another order cannot flip a top-K choice between CPU and GPU.
  TensorMap t = host.to_tensor_map();
  for (auto& [name, v] : t)
    if (name.find("e_score_correction_bias") != std::string::npos)
      for (size_t e = 0; e < v.size(); ++e) v[e] = -0.5f * float(e);
  host.load_tensor_map(t);
  DeviceModel dev(host, DeviceOptions{});
  const int B = 3, T = 11, N = B * T;
  const auto tokens = random_window(c, B, T, 12);
  const float lc = host.forward(tokens, B, T);
  host.backward();
  const std::vector<float> logits_cpu = host.logits();
  std::vector<std::pair<std::string, std::vector<float>>> cpu_grads;
  for (auto& tn : host.tensors()) cpu_grads.push_back({tn.name, *tn.grad});

  const float lg = dev.forward(tokens, B, T);
  dev.backward();
  EXPECT_NEAR(lg, lc, 1e-4 * (1 + std::abs(lc)));
  EXPECT_NEAR(dev.losses().ce, host.losses().ce, 1e-4);
  EXPECT_NEAR(dev.losses().mtp, host.losses().mtp, 1e-4);
  EXPECT_NEAR(dev.losses().balance, host.losses().balance, 1e-6);
  EXPECT_CLOSE(compare(dev.logits(), logits_cpu, kReductionTol), "logits");
  dev.download(host, false);  // the device's gradients into the host model's gradient tensors
  size_t i = 0;
  for (auto& tn : host.tensors()) {
    ASSERT_EQ(tn.name, cpu_grads[i].first);
    EXPECT_CLOSE(compare(*tn.grad, cpu_grads[i].second, Tolerance{1e-5 * std::sqrt(double(N)), 1e-4}), tn.name);
    ++i;
  }
  EXPECT_GT(i, 40u);
}
#else
TEST(CudaModel, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
