// Tests of stage 07's trainer and CPU backend on a tiny model and synthetic data (no Debian package needed): the
// schedule, the batcher's coverage and state, validation's averaging and bits per byte, AdamW's decay rule and
// agreement with stage 04's adamw_step, a falling loss, resume == uninterrupted bitwise, the best checkpoint,
// damaged or foreign checkpoints, the .old recovery, non-finite steps and divergence, the model config of a run.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "07_train_gpu/run_checkpoint.h"
#include "07_train_gpu/test_support.h"
#include "07_train_gpu/train.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/testing.h"

using namespace dsv3;
namespace fs = std::filesystem;

namespace {

using test::ForwardingBackend;
using test::TempDir;
constexpr int kVocab = test::kSyntheticVocab;
const data::Prepared& test_data() { return test::synthetic_data(); }

ModelConfig tiny() { return run_model_config("tiny", kVocab, 16); }

using test::small_run;

// Delegates to a CPU backend; can report non-finite losses or norms, and calls a hook after every update.
class WrapBackend final : public ForwardingBackend {
 public:
  explicit WrapBackend(uint64_t seed = 11) : ForwardingBackend(make_cpu_backend(tiny(), seed)) {}
  std::set<int> nan_loss_at, inf_norm_at;  // forward_backward call numbers (1-based)
  int nan_loss_from = 0;                   // > 0: NaN loss from this call on
  double fixed_val_ce = NAN;               // finite: evaluate() reports this ce (a validation that never improves)
  std::function<void(int)> after_step;     // called with the number of updates so far
  int fb_calls = 0, step_calls = 0;
  std::vector<int64_t> adam_steps;

  std::string describe() const override { return "wrapped " + in_->describe(); }
  ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) override {
    ModelLosses l = in_->forward_backward(tokens, B, T);
    ++fb_calls;
    if (nan_loss_at.count(fb_calls) || (nan_loss_from > 0 && fb_calls >= nan_loss_from)) l.ce = NAN;
    return l;
  }
  ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) override {
    ModelLosses l = in_->evaluate(tokens, B, T);
    if (std::isfinite(fixed_val_ce)) l.ce = fixed_val_ce;
    return l;
  }
  double grad_norm() override { return inf_norm_at.count(fb_calls) ? INFINITY : in_->grad_norm(); }
  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override {
    in_->step(opt, grad_scale, step);
    adam_steps.push_back(step);
    ++step_calls;
    if (after_step) after_step(step_calls);
  }
};

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l);
  return lines;
}

// The first column of every data row of a CSV.
std::vector<int64_t> csv_steps(const std::string& path) {
  std::vector<int64_t> steps;
  const auto lines = read_lines(path);
  for (size_t i = 1; i < lines.size(); ++i) steps.push_back(std::stoll(lines[i]));
  return steps;
}


}  // namespace

// ---- schedule and config ------------------------------------------------------------------------------------

TEST(TrainSchedule, WarmupThenCosineToTheFloor) {
  TrainConfig c;
  c.lr = 1e-3;
  c.min_lr_ratio = 0.1;
  c.warmup_steps = 10;
  c.max_steps = 110;
  EXPECT_DOUBLE_EQ(lr_at(c, 1), 1e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 5), 5e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 10), 1e-3);
  EXPECT_DOUBLE_EQ(lr_at(c, 35), 1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI / 4)));  // a quarter of the cosine
  EXPECT_DOUBLE_EQ(lr_at(c, 60), 1e-4 + 9e-4 * 0.5);                             // half way
  EXPECT_DOUBLE_EQ(lr_at(c, 110), 1e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 500), 1e-4);
  for (int64_t s = 11; s <= 110; ++s) EXPECT_LT(lr_at(c, s), lr_at(c, s - 1)) << s;
  c.warmup_steps = 0;  // no warm-up: the cosine starts at step 1, just below the peak
  EXPECT_DOUBLE_EQ(lr_at(c, 1), 1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI / 110)));
}

TEST(TrainConfig, ValidateNamesTheBadField) {
  EXPECT_NO_THROW(TrainConfig().validate());
  const std::vector<std::pair<std::function<void(TrainConfig&)>, std::string>> cases = {
      {[](TrainConfig& c) { c.batch = 0; }, "batch"},
      {[](TrainConfig& c) { c.seq_len = -1; }, "seq_len"},
      {[](TrainConfig& c) { c.lr = 0; }, "lr"},
      {[](TrainConfig& c) { c.lr = NAN; }, "lr"},
      {[](TrainConfig& c) { c.min_lr_ratio = 1.5; }, "min_lr_ratio"},
      {[](TrainConfig& c) { c.warmup_steps = c.max_steps + 1; }, "warmup_steps"},
      {[](TrainConfig& c) { c.beta2 = 1; }, "beta2"},
      {[](TrainConfig& c) { c.grad_clip = -1; }, "grad_clip"},
      {[](TrainConfig& c) { c.eval_every = 0; }, "eval_every"},
      {[](TrainConfig& c) { c.patience = -2; }, "patience"},
      {[](TrainConfig& c) { c.max_minutes = -1; }, "max_minutes"},
  };
  for (const auto& [bad, field] : cases) {
    TrainConfig c;
    bad(c);
    expect_user_error([&] { c.validate(); }, field);
  }
}

// ---- batches ------------------------------------------------------------------------------------------------

TEST(Batcher, EachEpochTargetsEveryTokenOnceAfterItsOffset) {
  const int T = 8, n = 203;
  std::vector<uint16_t> tokens(n);
  for (int i = 0; i < n; ++i) tokens[size_t(i)] = uint16_t(i % 61);
  const Batcher b(tokens, 3, T, 77);
  std::set<std::vector<int64_t>> orders;
  std::set<int64_t> offsets;
  for (int64_t e = 0; e < 6; ++e) {
    const auto starts = b.epoch_starts(e);
    orders.insert(starts);
    auto sorted = starts;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_NE(sorted, starts) << "epoch " << e << " is not shuffled";
    const int64_t o = sorted.front();
    offsets.insert(o);
    EXPECT_LT(o, T);
    std::vector<int> targeted(n, 0);
    for (size_t i = 0; i < sorted.size(); ++i) {
      EXPECT_EQ(sorted[i], o + int64_t(i) * T);
      for (int64_t p = sorted[i] + 1; p <= sorted[i] + T; ++p) ++targeted[size_t(p)];
    }
    EXPECT_LE(sorted.back() + T, n - 1);      // the last window fits
    EXPECT_GT(sorted.back() + 2 * T, n - 1);  // and no further one would
    for (int p = 0; p < n; ++p) EXPECT_EQ(targeted[size_t(p)], p > o && p <= sorted.back() + T ? 1 : 0) << p;
  }
  EXPECT_EQ(orders.size(), 6u);
  EXPECT_GT(offsets.size(), 1u);
}

TEST(Batcher, BatchesFollowTheEpochOrdersAcrossEpochsAndStateRoundTrips) {
  const int T = 8, B = 3, n = 203;
  std::vector<uint16_t> tokens(n);
  for (int i = 0; i < n; ++i) tokens[size_t(i)] = uint16_t((i * 7) % 61);
  Batcher b(tokens, B, T, 9);
  std::vector<int64_t> expected;  // epochs back to back (about 25 windows each: 40 batches of 3 reach epoch 4)
  for (int64_t e = 0; e < 8; ++e) {
    const auto s = b.epoch_starts(e);
    expected.insert(expected.end(), s.begin(), s.end());
  }
  size_t w = 0;
  for (int i = 0; i < 40; ++i) {
    const auto batch = b.next();
    ASSERT_EQ(batch.size(), size_t(B) * (T + 1));
    for (int r = 0; r < B; ++r, ++w)
      for (int t = 0; t <= T; ++t) ASSERT_EQ(batch[size_t(r) * (T + 1) + t], tokens[size_t(expected[w] + t)]);
  }
  EXPECT_GE(b.state().epoch, 4);
  // the state alone continues the stream
  Batcher a(tokens, B, T, 9), c(tokens, B, T, 9);
  for (int i = 0; i < 11; ++i) a.next();
  c.set_state(a.state());
  for (int i = 0; i < 20; ++i) ASSERT_EQ(a.next(), c.next()) << i;
  // errors
  expect_user_error([&] { Batcher(std::vector<uint16_t>(T), B, T, 1); }, "fewer than one window");
  expect_user_error([&] { c.set_state({0, 1000}); }, "cursor");
}

// ---- validation ---------------------------------------------------------------------------------------------

TEST(Evaluate, AveragesEveryTargetOnceAndConvertsToBitsPerByte) {
  const int T = 16;
  auto backend = make_cpu_backend(tiny(), 3);
  std::vector<uint16_t> val(test_data().val.begin(), test_data().val.begin() + 5 * T + 3);
  data::DataInfo info;
  info.val.tokens = 1000;
  info.val.bytes = 2345;
  const ValResult r = evaluate(*backend, val, 2, T, info);  // windows 0..4 in batches of 2, 2, 1
  EXPECT_EQ(r.tokens, 5 * T);
  double ce = 0, mtp = 0;
  for (int j = 0; j < 5; ++j) {
    const std::vector<int> w(val.begin() + j * T, val.begin() + j * T + T + 1);
    ce += backend->evaluate(w, 1, T).ce / 5;
    mtp += backend->mtp_losses().at(0) / 5;
  }
  // the batches' float sums differ from one window at a time in rounding only
  EXPECT_NEAR(r.ce, ce, 1e-5 * ce);
  ASSERT_EQ(r.mtp.size(), 1u);
  EXPECT_NEAR(r.mtp[0], mtp, 1e-5 * mtp);
  EXPECT_DOUBLE_EQ(r.bits_per_byte, r.ce / std::log(2.0) * 1000.0 / 2345.0);
  // deterministic, and the tail that fills no window (tokens 5T+1, 5T+2) is not used
  EXPECT_EQ(evaluate(*backend, val, 2, T, info).ce, r.ce);
  val[5 * T + 1] = val[5 * T + 2] = 7;
  EXPECT_EQ(evaluate(*backend, val, 2, T, info).ce, r.ce);
  expect_user_error([&] { evaluate(*backend, std::vector<uint16_t>(T), 2, T, info); }, "validation split");
}

// ---- the CPU backend's optimizer ----------------------------------------------------------------------------

TEST(CpuBackend, WeightDecayOnlyOnMatrices) {
  // the model's list marks exactly the norm weights (names ending in "norm") as not decayed
  Model<float> ref(tiny(), 4);
  std::set<std::string> undecayed;
  for (const auto& t : ref.tensors()) {
    const bool named_norm = t.name.size() >= 4 && t.name.compare(t.name.size() - 4, 4, "norm") == 0;
    EXPECT_EQ(decays(t.kind), !named_norm) << t.name;
    if (!decays(t.kind)) undecayed.insert(t.name);
  }
  for (const char* name : {"norm", "layers.0.attn_norm", "layers.0.ffn_norm", "layers.0.attn.q_norm",
                           "layers.0.attn.kv_norm", "mtp.0.enorm", "mtp.0.hnorm", "mtp.0.block.attn_norm"})
    EXPECT_EQ(undecayed.count(name), 1u) << name;
  // A zero gradient (grad_scale 0) leaves only the decay: matrices shrink by lr*wd exactly, norms stay.
  auto backend = make_cpu_backend(tiny(), 4);
  const auto& d = test_data().train;
  backend->forward_backward(std::vector<int>(d.begin(), d.begin() + 2 * 17), 2, 16);
  const TensorMap w0 = backend->weights();
  AdamWConfig opt;
  opt.lr = 0.05f;
  opt.weight_decay = 0.1f;
  backend->step(opt, 0.f, 1);
  const TensorMap w1 = backend->weights();
  int norms = 0, matrices = 0;
  for (const auto& [name, v] : w0) {
    if (name.find("e_score_correction_bias") != std::string::npos) continue;  // moved by the bias update
    if (name.find("norm") != std::string::npos) {
      EXPECT_EQ(w1.at(name), v) << name;
      ++norms;
    } else {
      for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(w1.at(name)[i], v[i] - opt.lr * opt.weight_decay * v[i]) << name;
      ++matrices;
    }
  }
  EXPECT_GE(norms, 8);
  EXPECT_GE(matrices, 20);
}

TEST(CpuBackend, StepIsStage04AdamWOnTheClippedGradientThenTheBiasUpdate) {
  const ModelConfig c = tiny();
  auto backend = make_cpu_backend(c, 5);
  Model<float> ref(c, 5);
  const auto& d = test_data().train;
  const std::vector<int> tokens(d.begin() + 100, d.begin() + 100 + 3 * 17);
  AdamWConfig opt;
  opt.lr = 0.01f;
  std::vector<std::vector<float>> m, v;
  for (int64_t step = 1; step <= 3; ++step) {
    const ModelLosses L = backend->forward_backward(tokens, 3, 16);
    ref.forward(tokens, 3, 16);
    ref.backward();
    EXPECT_EQ(L.total(), ref.losses().total());
    double sum = 0;
    for (const auto& t : ref.tensors())
      for (float g : *t.grad) sum += double(g) * double(g);
    EXPECT_EQ(backend->grad_norm(), std::sqrt(sum));
    const float scale = 0.5f;
    backend->step(opt, scale, step);
    auto tensors = ref.tensors();
    m.resize(tensors.size());
    v.resize(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      std::vector<float> g(*tensors[i].grad);
      for (auto& x : g) x *= scale;
      m[i].resize(g.size());
      v[i].resize(g.size());
      cpu::adamw_step(tensors[i].value->data(), g.data(), m[i].data(), v[i].data(), g.size(), step, opt,
                      decays(tensors[i].kind));
    }
    ref.update_bias();
    ASSERT_EQ(backend->weights(), ref.to_tensor_map()) << "step " << step;
  }
  const TensorMap state = backend->optimizer_state();
  const auto tensors = ref.tensors();
  ASSERT_EQ(state.size(), 2 * tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(state.at(tensors[i].name + ".exp_avg"), m[i]);
    EXPECT_EQ(state.at(tensors[i].name + ".exp_avg_sq"), v[i]);
  }
  // a bad moment map is refused whole
  TensorMap bad = state;
  bad.erase("head.exp_avg");
  expect_user_error([&] { backend->load_optimizer_state(bad); }, "head.exp_avg");
  bad = state;
  bad["embed.exp_avg_sq"].pop_back();
  expect_user_error([&] { backend->load_optimizer_state(bad); }, "embed.exp_avg_sq");
  EXPECT_EQ(backend->optimizer_state(), state);
}

TEST(CpuBackend, PrecisionNamesAndNoCudaIsAUserError) {
  for (Precision p : {Precision::FP32, Precision::BF16}) EXPECT_EQ(parse_precision(precision_name(p)), p);
  expect_user_error([] { parse_precision("fp16"); }, "fp16");
  for (MoeExperts e : {MoeExperts::Grouped, MoeExperts::Segmented, MoeExperts::Hopper})
    EXPECT_EQ(parse_moe_experts(moe_experts_name(e)), e);
  expect_user_error([] { parse_moe_experts("wgmma"); }, "wgmma");
  // bf16 picks Hopper only where this process can run it (a 9.0 GPU and sm_90a code), else Segmented (tiny's
  // dims are multiples of 8, so one of the two)
  const MoeExperts chosen = device_options(Precision::BF16, tiny()).experts;
  EXPECT_EQ(chosen == MoeExperts::Hopper, hopper_experts_available()) << moe_experts_name(chosen);
  EXPECT_EQ(device_options(Precision::FP32, tiny()).experts, MoeExperts::Grouped);
  EXPECT_EQ(make_cpu_backend(tiny(), 1)->describe(), "cpu fp32");
  if (gpu_available()) GTEST_SKIP() << "a GPU is present: make_cuda_backend succeeds here";
  EXPECT_THROW(make_cuda_backend(tiny(), 1, Precision::FP32), UserError);  // no CUDA built in, or no GPU
}

// ---- training runs ------------------------------------------------------------------------------------------

TEST(Train, LossFallsAndTheDiagnosticsAreWritten) {
  TempDir dir;
  TrainConfig cfg = small_run(40);
  cfg.eval_every = 20;
  auto backend = make_cpu_backend(tiny(), 6);
  std::ostringstream out;
  const TrainResult r = train(*backend, test_data(), cfg, dir.path, false, out);
  ASSERT_EQ(r.history.size(), 40u);
  const double first = r.history.front().losses.ce;
  double last5 = 0;
  for (size_t i = 35; i < 40; ++i) last5 += r.history[i].losses.ce / 5;
  EXPECT_LT(last5, first - 1.0) << "first " << first << ", mean of the last 5 " << last5;
  EXPECT_EQ(r.steps_done, 40);
  EXPECT_EQ(r.stop_reason, "max_steps");
  EXPECT_LT(r.best_val_ce, first - 0.5);
  EXPECT_EQ(r.skipped_steps, 0);
  EXPECT_GT(r.tokens_per_s, 0);
  // diagnostics: one row per step / evaluation / (evaluation, MoE layer, expert); loads sum to 1
  const auto train_lines = read_lines(dir.sub("train.csv"));
  ASSERT_EQ(train_lines.size(), 41u);
  EXPECT_EQ(train_lines[0], "step,lr,loss,ce,mtp,mtp_d1,balance,grad_norm,maxvio,maxvio_mtp,tokens_per_s,elapsed_s");
  EXPECT_EQ(read_lines(dir.sub("val.csv"))[0], "step,val_ce,val_bpb,val_mtp_d1,train_ce,best");
  EXPECT_EQ(csv_steps(dir.sub("val.csv")), (std::vector<int64_t>{20, 40}));
  const auto load = read_lines(dir.sub("expert_load.csv"));
  ASSERT_EQ(load.size(), 1u + 2 * 2 * 8);  // tiny: one main MoE layer (1) and the MTP module's (2), 8 experts each
  double sum[2] = {0, 0};
  for (size_t i = 1; i <= 16; ++i) {
    int64_t step, layer, expert;
    double share;
    ASSERT_EQ(std::sscanf(load[i].c_str(), "%ld,%ld,%ld,%lf", &step, &layer, &expert, &share), 4);
    EXPECT_EQ(step, 20);
    EXPECT_EQ(layer, i <= 8 ? 1 : 2);
    EXPECT_EQ(expert, int64_t((i - 1) % 8));
    sum[i > 8] += share;
  }
  EXPECT_NEAR(sum[0], 1.0, 1e-6);
  EXPECT_NEAR(sum[1], 1.0, 1e-6);
  // the bias update balanced the MTP module's router too (paper §2.1.2): its bias left 0 during training
  const TensorMap w = backend->weights();
  for (const char* layer : {"1", "2"}) {
    const std::vector<float>& bias = w.at(std::string("model.layers.") + layer + ".mlp.gate.e_score_correction_bias");
    EXPECT_TRUE(std::any_of(bias.begin(), bias.end(), [](float b) { return b != 0.f; })) << "layer " << layer;
  }
  // progress: not a terminal, so lines (every eval_every/5 = 4 steps) and the evaluations on their own
  const std::string log = out.str();
  EXPECT_NE(log.find("step 40/40 | ce "), std::string::npos) << log;
  EXPECT_NE(log.find("eval step 20 | val ce "), std::string::npos) << log;
  EXPECT_EQ(log.find('\r'), std::string::npos);
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}) {
    EXPECT_TRUE(fs::exists(checkpoint_dir(dir.path, "last") + "/" + f)) << f;
    EXPECT_TRUE(fs::exists(checkpoint_dir(dir.path, "best") + "/" + f)) << f;
  }
}

TEST(Train, ResumeGivesExactlyTheUninterruptedRun) {
  TempDir straight, parts;
  TrainConfig cfg = small_run(8);
  cfg.eval_every = 3;  // evaluations at 3, 6, 8; the interruption at 4 is not one of them
  std::ostringstream out;
  auto a = make_cpu_backend(tiny(), 7);
  const TrainResult ra = train(*a, test_data(), cfg, straight.path, false, out);

  std::atomic<bool> stop{false};
  WrapBackend first(7);
  first.after_step = [&](int updates) { stop = updates == 4; };
  TrainHooks hooks;
  hooks.stop = &stop;
  const TrainResult r1 = train(first, test_data(), cfg, parts.path, false, out, hooks);
  EXPECT_EQ(r1.stop_reason, "stopped");
  EXPECT_EQ(r1.steps_done, 4);
  auto fresh = make_cpu_backend(tiny(), 99);  // another init: everything must come from the checkpoint
  const TrainResult r2 = train(*fresh, test_data(), cfg, parts.path, true, out);
  EXPECT_EQ(r2.steps_done, 8);

  std::vector<StepRecord> joined = r1.history;
  joined.insert(joined.end(), r2.history.begin(), r2.history.end());
  ASSERT_EQ(joined.size(), ra.history.size());
  for (size_t i = 0; i < joined.size(); ++i) {
    EXPECT_EQ(joined[i].step, ra.history[i].step);
    EXPECT_EQ(joined[i].losses.ce, ra.history[i].losses.ce) << "step " << i + 1;
    EXPECT_EQ(joined[i].losses.mtp, ra.history[i].losses.mtp) << "step " << i + 1;
    EXPECT_EQ(joined[i].losses.balance, ra.history[i].losses.balance) << "step " << i + 1;
    EXPECT_EQ(joined[i].grad_norm, ra.history[i].grad_norm) << "step " << i + 1;
  }
  EXPECT_EQ(fresh->weights(), a->weights());
  EXPECT_EQ(fresh->optimizer_state(), a->optimizer_state());
  EXPECT_EQ(r2.best_val_ce, ra.best_val_ce);
  // the diagnostics hold every step once
  EXPECT_EQ(csv_steps(parts.sub("train.csv")), csv_steps(straight.sub("train.csv")));
  EXPECT_EQ(csv_steps(parts.sub("val.csv")), (std::vector<int64_t>{3, 4, 6, 8}));  // 4: the interrupted run's end
  // resuming changes no batch-order field
  TrainConfig other = cfg;
  other.batch = 5;
  other.max_steps = 10;
  auto again = make_cpu_backend(tiny(), 7);
  expect_user_error([&] { train(*again, test_data(), other, parts.path, true, out); }, "batch");
  // and a new run does not overwrite a checkpoint
  expect_user_error([&] { train(*again, test_data(), cfg, parts.path, false, out); }, "already holds a checkpoint");
}

TEST(Train, BestCheckpointHoldsTheBestStepsWeights) {
  TempDir dir;
  TrainConfig cfg = small_run(12);
  cfg.eval_every = 2;
  cfg.lr = 3e-2;
  WrapBackend backend(8);
  std::map<int, TensorMap> after;  // weights after each update
  backend.after_step = [&](int updates) { after[updates] = backend.weights(); };
  std::ostringstream out;
  const TrainResult r = train(backend, test_data(), cfg, dir.path, false, out);
  const std::string best = checkpoint_dir(dir.path, "best");
  const TrainerState st = read_trainer_state(best);
  ASSERT_GE(r.best_step, 2);
  EXPECT_EQ(st.step, r.best_step);
  EXPECT_EQ(st.best_step, r.best_step);
  EXPECT_EQ(st.best_val_ce, r.best_val_ce);  // bitwise through the JSON
  EXPECT_EQ(load_checkpoint(best).tensors, after.at(int(r.best_step)));
  // val.csv: the best row is the minimum
  double min_ce = INFINITY;
  int64_t min_step = -1;
  const auto lines = read_lines(dir.sub("val.csv"));
  for (size_t i = 1; i < lines.size(); ++i) {
    int64_t step;
    double ce;
    ASSERT_EQ(std::sscanf(lines[i].c_str(), "%ld,%lf", &step, &ce), 2);
    if (ce < min_ce) min_ce = ce, min_step = step;
  }
  EXPECT_EQ(min_step, r.best_step);
  // loaded into a fresh backend it gives the recorded val ce exactly
  auto fresh = make_cpu_backend(tiny(), 1);
  load_run_checkpoint(best, *fresh, test_data().info);
  EXPECT_EQ(evaluate(*fresh, test_data().val, cfg.batch, cfg.seq_len, test_data().info).ce, r.best_val_ce);
}

TEST(RunCheckpoint, DamagedMissingOrForeignIsAUserErrorNamingTheFile) {
  TempDir dir;
  auto backend = make_cpu_backend(tiny(), 9);
  std::ostringstream out;
  train(*backend, test_data(), small_run(2), dir.path, false, out);
  const std::string last = checkpoint_dir(dir.path, "last");
  int n = 0;
  // A copy of the checkpoint, damaged by `damage`, must be refused with `fragment` in the message, the fresh
  // backend's weights left as they were.
  auto check = [&](const std::function<void(const std::string&)>& damage, const std::string& fragment,
                   const data::DataInfo& info = test_data().info, const ModelConfig& mc = tiny()) {
    const std::string copy = dir.sub(fmt::format("copy{}", n++));
    fs::copy(last, copy, fs::copy_options::recursive);
    damage(copy);
    auto target = make_cpu_backend(mc, 10);
    const TensorMap before = target->weights();
    expect_user_error([&] { load_run_checkpoint(copy, *target, info); }, fragment);
    EXPECT_EQ(target->weights(), before) << fragment;
  };
  auto write = [](const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary) << bytes;
  };
  check([](const std::string& d) {
    const std::string f = d + "/model.safetensors";
    fs::resize_file(f, fs::file_size(f) / 2);
  }, "model.safetensors");
  check([&](const std::string& d) { write(d + "/trainer_state.json", "{ \"step\": "); }, "trainer_state.json");
  check([&](const std::string& d) {
    std::string s = data::read_file(d + "/trainer_state.json", "state");
    s.replace(s.find("\"updates\""), 9, "\"updatez\"");
    write(d + "/trainer_state.json", s);
  }, "'updates' is missing");
  check([](const std::string& d) { fs::remove(d + "/optimizer.safetensors"); }, "optimizer.safetensors");
  check([](const std::string& d) { fs::remove(d + "/config.json"); }, "config.json");
  // one value of a tensor of a safetensors file changed in place (the file rewritten whole)
  auto poke = [](const std::string& path, const std::string& tensor, float value) {
    int found = 0;
    const SafetensorsFile f(path);
    SafetensorsWriter w;
    std::vector<std::vector<float>> keep;
    for (const auto& t : f.tensors()) {
      keep.push_back(f.read_f32(t.name));
      if (t.name == tensor) keep.back()[0] = value, ++found;
      w.add_f32(t.name, t.shape, keep.back().data());
    }
    ASSERT_EQ(found, 1) << tensor;
    w.write(path);
  };
  check([&](const std::string& d) { poke(d + "/optimizer.safetensors", "embed.exp_avg", NAN); },
        "'embed.exp_avg' holds a non-finite value");
  check([&](const std::string& d) {
    poke(d + "/optimizer.safetensors", "norm.exp_avg_sq", -1e-3f);
  }, "negative second moment");
  check([&](const std::string& d) {
    poke(d + "/model.safetensors", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", INFINITY);
  }, "'model.layers.0.self_attn.kv_a_proj_with_mqa.weight' holds a non-finite value (inf) at element 0");
  data::DataInfo other = test_data().info;
  other.train.tokens += 1;
  check([](const std::string&) {}, "other data", other);
  ModelConfig other_model = tiny();
  other_model.training.mtp_lambda = 0.5;
  check([](const std::string&) {}, "mtp_lambda", test_data().info, other_model);
  auto target = make_cpu_backend(tiny(), 10);
  expect_user_error([&] { load_run_checkpoint(dir.sub("nowhere"), *target, test_data().info); }, "no checkpoint");
  expect_user_error([&] { train(*target, test_data(), small_run(4), dir.sub("empty"), true, out); }, "no checkpoint");
}

TEST(RunCheckpoint, AnInterruptedSwapFallsBackToOld) {
  TempDir dir;
  auto backend = make_cpu_backend(tiny(), 12);
  std::ostringstream out;
  train(*backend, test_data(), small_run(4), dir.path, false, out);
  const std::string last = checkpoint_dir(dir.path, "last");
  const TensorMap saved = load_checkpoint(last).tensors;
  // as a crash between the two renames leaves it: <last>.old complete, <last>.tmp half written, no <last>
  fs::rename(last, last + ".old");
  fs::create_directories(last + ".tmp");
  std::ofstream(last + ".tmp/model.safetensors") << "half";
  EXPECT_EQ(resolve_checkpoint(last), last + ".old");
  auto fresh = make_cpu_backend(tiny(), 13);
  EXPECT_EQ(load_run_checkpoint(last, *fresh, test_data().info).step, 4);
  EXPECT_EQ(fresh->weights(), saved);
  // resuming from it and saving again leaves one clean <last>
  TrainConfig more = small_run(6);
  train(*fresh, test_data(), more, dir.path, true, out);
  EXPECT_TRUE(fs::is_directory(last));
  EXPECT_FALSE(fs::exists(last + ".old"));
  EXPECT_FALSE(fs::exists(last + ".tmp"));
  EXPECT_EQ(read_trainer_state(last).step, 6);
}

TEST(RunCheckpoint, EveryPointOfTheSwapResumesFromTheNewestCompleteCheckpoint) {
  TempDir dir;
  std::ostringstream out;
  // one run of 6 steps with a last checkpoint every 2, copied at steps 2 and 4 (during the updates after them)
  const std::string last = checkpoint_dir(dir.sub("run"), "last");
  const std::string at2 = dir.sub("at2"), at4 = dir.sub("at4"), at6 = dir.sub("at6");
  WrapBackend straight(15);
  straight.after_step = [&](int updates) {
    if (updates == 3) fs::copy(last, at2, fs::copy_options::recursive);
    if (updates == 5) fs::copy(last, at4, fs::copy_options::recursive);
  };
  TrainConfig cfg = small_run(6);
  cfg.ckpt_every = 2;
  train(straight, test_data(), cfg, dir.sub("run"), false, out);
  ASSERT_EQ(read_trainer_state(at2).step, 2);
  ASSERT_EQ(read_trainer_state(at4).step, 4);
  fs::copy(last, at6, fs::copy_options::recursive);  // the run's final checkpoint
  // The folders a crash leaves at each point of save_run_checkpoint (the .tmp being written, then the renames),
  // also in the run's last save (no step is left after the resume to save again: the resume finishes the swap).
  struct Case {
    const char* when;
    std::vector<std::pair<std::string, std::string>> folders;  // (copy of, as) ; "partial" = .tmp without state
    std::string expect;                                        // the suffix resolved, "" = last
    int64_t step;
  };
  const std::vector<Case> cases = {
      {"first save, before its rename", {{at4, ".tmp"}}, ".tmp", 4},
      {"writing the .tmp", {{at2, ""}, {"partial", ".tmp"}}, "", 2},
      {"the .tmp complete, before the first rename", {{at2, ""}, {at4, ".tmp"}}, ".tmp", 4},
      {"between the renames", {{at2, ".old"}, {at4, ".tmp"}}, ".tmp", 4},
      {"before removing .old", {{at4, ""}, {at2, ".old"}}, "", 4},
      {"last save: the .tmp complete, before the first rename", {{at4, ""}, {at6, ".tmp"}}, ".tmp", 6},
      {"last save: between the renames", {{at4, ".old"}, {at6, ".tmp"}}, ".tmp", 6},
      {"last save: before removing .old", {{at6, ""}, {at4, ".old"}}, "", 6},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.when);
    const std::string run = dir.sub(fmt::format("case{}", &c - cases.data()));
    const std::string l = checkpoint_dir(run, "last");
    fs::create_directories(fs::path(l).parent_path());
    fs::copy_file(dir.sub("run") + "/train.csv", run + "/train.csv");
    fs::copy_file(dir.sub("run") + "/val.csv", run + "/val.csv");
    for (const auto& [from, suffix] : c.folders) {
      fs::copy(from == "partial" ? at4 : from, l + suffix, fs::copy_options::recursive);
      if (from == "partial") fs::remove(l + suffix + "/trainer_state.json");
    }
    EXPECT_EQ(resolve_checkpoint(l), l + c.expect);
    EXPECT_EQ(read_trainer_state(l).step, c.step);
    // a fresh start is refused (the run must be resumed); resuming continues the run exactly
    auto fresh = make_cpu_backend(tiny(), 16);
    expect_user_error([&] { train(*fresh, test_data(), cfg, run, false, out); }, "add --resume to continue it");
    train(*fresh, test_data(), cfg, run, true, out);
    EXPECT_TRUE(fresh->weights() == straight.weights());
    EXPECT_EQ(read_trainer_state(l).step, 6);
    EXPECT_FALSE(fs::exists(l + ".old"));
    EXPECT_FALSE(fs::exists(l + ".tmp"));
  }
}

TEST(RunCheckpoint, ANonFiniteModelIsNeverWritten) {
  TempDir dir;
  auto backend = make_cpu_backend(tiny(), 17);
  TensorMap w = backend->weights();
  w.at("model.norm.weight")[1] = NAN;
  backend->load_weights(w);
  TrainerState st;
  st.config = small_run(2);
  const std::string ck = checkpoint_dir(dir.path, "last");
  EXPECT_FALSE(save_run_checkpoint(ck, *backend, st));
  EXPECT_FALSE(fs::exists(ck));
  EXPECT_FALSE(fs::exists(ck + ".tmp"));
  expect_user_error([&] { save_checkpoint(dir.sub("plain"), tiny(), w, DType::F32); }, "non-finite");
}

// A learning rate that blows the model up (issue: NaN reached the router and wrote out of bounds): training ends
// cleanly, and every checkpoint on disk loads (so holds finite values only).
TEST(Train, AnExplodingLearningRateEndsCleanlyWithFiniteCheckpoints) {
  for (const double lr : {1e3, 1e300}) {
    TempDir dir;
    auto backend = make_cpu_backend(tiny(), 18);
    TrainConfig cfg = small_run(12);
    cfg.lr = lr;
    cfg.eval_every = 2;
    std::ostringstream out;
    try {  // it either finishes, having skipped the non-finite steps, or stops as diverged (exit code 2)
      const TrainResult r = train(*backend, test_data(), cfg, dir.path, false, out);
      EXPECT_GT(r.skipped_steps, 0) << out.str();
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("training diverged"), std::string::npos) << e.what();
    }
    for (const char* name : {"last", "best"}) {
      const std::string ck = checkpoint_dir(dir.path, name);
      if (fs::exists(ck)) {
        EXPECT_NO_THROW(load_checkpoint(ck)) << name;
      }
    }
  }
}

TEST(Train, NonFiniteStepsAreSkipped) {
  TempDir dir;
  WrapBackend backend(14);
  backend.nan_loss_at = {3};
  backend.inf_norm_at = {5};
  std::ostringstream out;
  TrainHooks hooks;
  hooks.tty = 1;  // the progress line is rewritten in place; warnings end it and stand on their own line
  const TrainResult r = train(backend, test_data(), small_run(6), dir.path, false, out, hooks);
  EXPECT_NE(out.str().find("\rstep 2/6 | ce "), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("\nstep 3: non-finite loss"), std::string::npos) << out.str();
  EXPECT_EQ(r.steps_done, 6);
  EXPECT_EQ(r.skipped_steps, 2);
  EXPECT_EQ(backend.step_calls, 4);
  EXPECT_EQ(backend.adam_steps, (std::vector<int64_t>{1, 2, 3, 4}));  // AdamW counts updates, not steps
  ASSERT_EQ(r.history.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(r.history[i].skipped, i == 2 || i == 4) << i;
  EXPECT_NE(out.str().find("step 3: non-finite loss"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("step 5: non-finite loss"), std::string::npos) << out.str();
  EXPECT_EQ(read_trainer_state(checkpoint_dir(dir.path, "last")).skipped_steps, 2);
}

TEST(Train, FiveNonFiniteStepsInARowStopWithTheLastGoodCheckpointKept) {
  TempDir dir;
  WrapBackend backend(15);
  backend.nan_loss_from = 5;  // steps 1-4 fine (checkpoint at the evaluation of step 4), then NaN
  std::map<int, TensorMap> after;
  backend.after_step = [&](int updates) { after[updates] = backend.weights(); };
  TrainConfig cfg = small_run(20);
  std::ostringstream out;
  expect_user_error([&] { train(backend, test_data(), cfg, dir.path, false, out); }, "training diverged");
  EXPECT_EQ(backend.fb_calls, 9);  // steps 5..9 failed
  EXPECT_EQ(backend.step_calls, 4);
  const std::string last = checkpoint_dir(dir.path, "last");
  EXPECT_EQ(read_trainer_state(last).step, 4);  // the evaluation at step 8 saved nothing
  EXPECT_EQ(load_checkpoint(last).tensors, after.at(4));
  EXPECT_NE(out.str().find("last checkpoint not updated"), std::string::npos) << out.str();
}

TEST(Train, StopsOnPatienceAndOnTheTimeLimitSaving) {
  TempDir dir;
  WrapBackend flat(17);
  flat.fixed_val_ce = 3.0;  // best at the first evaluation, never better after it
  TrainConfig cfg = small_run(20);
  cfg.eval_every = 2;
  cfg.patience = 2;
  std::ostringstream out;
  const TrainResult r = train(flat, test_data(), cfg, dir.sub("patience"), false, out);
  EXPECT_EQ(r.stop_reason, "patience");
  EXPECT_EQ(r.steps_done, 6);  // evaluations at 2 (best), 4, 6
  EXPECT_EQ(r.best_step, 2);
  EXPECT_EQ(read_trainer_state(checkpoint_dir(dir.sub("patience"), "last")).step, 6);
  auto backend = make_cpu_backend(tiny(), 18);
  cfg.patience = 0;
  cfg.max_minutes = 1e-9;
  const TrainResult t = train(*backend, test_data(), cfg, dir.sub("minutes"), false, out);
  EXPECT_EQ(t.stop_reason, "max_minutes");
  EXPECT_EQ(t.steps_done, 1);
  EXPECT_EQ(csv_steps(dir.sub("minutes/val.csv")), std::vector<int64_t>{1});  // the end is evaluated
  EXPECT_EQ(read_trainer_state(checkpoint_dir(dir.sub("minutes"), "last")).step, 1);
}

// ---- the model of a run -------------------------------------------------------------------------------------

TEST(RunModelConfig, PresetOrConfigJsonWithTheDataVocab) {
  const ModelConfig p = run_model_config("tiny", 77, 100);
  EXPECT_EQ(p.vocab_size, 77);
  EXPECT_EQ(p.max_position_embeddings, 100);                       // raised to seq_len
  EXPECT_EQ(run_model_config("tiny", 77, 10).max_position_embeddings, 64);  // never lowered
  TempDir dir;
  save_config(tiny(), dir.sub("config.json"));
  EXPECT_EQ(run_model_config(dir.sub("config.json"), kVocab, 16).hidden_size, tiny().hidden_size);
  EXPECT_EQ(run_model_config(dir.path, kVocab, 16).vocab_size, kVocab);  // a folder holding config.json
  expect_user_error([&] { run_model_config(dir.sub("config.json"), 62, 16); }, "vocab_size");
  expect_user_error([&] { run_model_config("no-such-preset", kVocab, 16); }, "neither a preset");
  auto backend = make_cpu_backend(run_model_config("tiny", 62, 16), 1);
  std::ostringstream out;
  expect_user_error([&] { train(*backend, test_data(), small_run(2), dir.sub("run"), false, out); }, "vocab");
}

TEST(Train, PlotsRenderWithGnuplot) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) GTEST_SKIP() << "needs gnuplot (scripts/setup.sh)";
  TempDir dir;
  auto backend = make_cpu_backend(tiny(), 16);
  TrainHooks hooks;
  hooks.plots_script = (fs::path(__FILE__).parent_path() / "plots.gp").string();
  TrainConfig cfg = small_run(6);
  cfg.eval_every = 2;
  std::ostringstream out;
  train(*backend, test_data(), cfg, dir.path, false, out, hooks);
  for (const char* png : {"loss.png", "lr.png", "grad_norm.png", "maxvio.png", "expert_load.png"}) {
    ASSERT_TRUE(fs::exists(dir.sub(png))) << png;
    EXPECT_GT(fs::file_size(dir.sub(png)), 1000u) << png;
  }
}
