// Several GPUs (README "Several GPUs"): the data-parallel arithmetic emulated on the CPU, N ranks as N threads of a
// host group (common/comm.h) each with its own CPU backend, against one rank on the whole batch; and, on a GPU, the
// NCCL path with one rank against no communicator at all. Two GPUs are exercised by tests/multi_gpu.sh.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <fstream>
#include <sstream>

#include "06_full_model/checkpoint.h"
#include "07_train_gpu/backend.h"
#include "07_train_gpu/run_checkpoint.h"
#include "07_train_gpu/test_support.h"
#include "07_train_gpu/train.h"
#include "common/comm.h"
#include "common/device.h"
#include "common/errors.h"
#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"
#endif

using namespace dsv3;
using dsv3::test::TempDir;
namespace fs = std::filesystem;

namespace {

const data::Prepared& test_data() { return test::synthetic_data(); }
ModelConfig tiny() { return run_model_config("tiny", test::kSyntheticVocab, 16); }

// |a - b| <= tol * max(1, |a|, |b|) for every pair; the worst pair in the message.
::testing::AssertionResult close_all(const std::vector<float>& a, const std::vector<float>& b, double tol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - b[i]) / std::max({1.0, std::abs(double(a[i])), std::abs(double(b[i]))});
    if (!(d <= worst)) worst = d, at = i;
  }
  if (worst <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "worst at " << at << ": " << a[at] << " vs " << b[at] << " (" << worst << ")";
}

// ||a - b|| / ||b|| (bf16 runs: a few elements may differ more where Adam normalises a gradient near zero).
double norm_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    n += double(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(d / std::max(n, 1e-30)) : INFINITY;
}

Backend::StepPlan plan(int64_t update) {
  Backend::StepPlan p;
  p.opt.lr = 1e-2f;
  p.opt.weight_decay = 0.1f;
  p.grad_clip = 0.5;  // clips most steps: the norm must be the whole batch's
  p.update = update;
  return p;
}

// Steps of a run: the batches (B windows of T+1 random tokens, fixed seeds) and what each step reported.
constexpr int kB = 4, kT = 16, kSteps = 6;
std::vector<int> batch(int step) { return test::random_tokens(kB * (kT + 1), test::kSyntheticVocab, 100 + step); }
struct Report {
  std::vector<ModelLosses> losses;
  std::vector<double> norms;
  std::vector<std::vector<std::vector<int>>> counts;
  TensorMap weights;
};

// kSteps training steps of b on rank `rank` of `ranks`'s share of every batch (1 rank: the whole batch): what each
// step reported, and the weights at the end.
Report run_steps(Backend& b, int rank = 0, int ranks = 1) {
  Report rep;
  const int rows = kB / ranks;
  for (int s = 1; s <= kSteps; ++s) {
    const std::vector<int> all = batch(s);
    const std::vector<int> mine(all.begin() + rank * rows * (kT + 1), all.begin() + (rank + 1) * rows * (kT + 1));
    const Backend::StepResult r = b.train_step(mine, rows, kT, plan(s));
    rep.losses.push_back(r.losses);
    rep.norms.push_back(r.grad_norm);
    rep.counts.push_back(b.expert_counts());
  }
  rep.weights = b.weights();
  return rep;
}

}  // namespace

// ---- the host group itself ------------------------------------------------------------------------------------

TEST(HostGroup, ReducesInRankOrderAndExchangesRowsByCount) {
  const int n = 3;
  std::vector<std::vector<float>> means(n);
  std::vector<std::vector<float>> received(n);
  run_host_group(n, [&](int r, Communicator& c) {
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.size(), n);
    EXPECT_FALSE(c.on_device());
    std::vector<float> v = {float(r), 1.f + r, 0.1f * r};
    c.all_reduce_mean(v.data(), v.size());
    means[size_t(r)] = v;
    std::vector<int> k = {r, 10};
    c.all_reduce_sum(k.data(), k.size());
    EXPECT_EQ(k, (std::vector<int>{0 + 1 + 2, 30}));
    double h[1] = {0.5 * r};
    c.all_reduce_host(h, 1);
    EXPECT_EQ(h[0], 1.5);
    // rank r sends p + r rows to peer p, row values 100 r + p; width 2
    std::vector<int64_t> send_counts(n), recv_counts(n), expected(n);
    std::vector<float> send;
    for (int p = 0; p < n; ++p) {
      send_counts[size_t(p)] = p + r;
      expected[size_t(p)] = r + p;  // what p sends to r
      for (int i = 0; i < (p + r) * 2; ++i) send.push_back(float(100 * r + p));
    }
    c.all_to_all_counts(send_counts.data(), recv_counts.data());
    EXPECT_EQ(recv_counts, expected);
    int64_t total = 0;
    for (int64_t x : recv_counts) total += x;
    received[size_t(r)].resize(size_t(total * 2));
    c.all_to_all(send.data(), send_counts.data(), received[size_t(r)].data(), recv_counts.data(), 2);
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(means[size_t(r)], means[0]) << "every rank holds the same bits";
    std::vector<float> want;
    for (int p = 0; p < n; ++p)
      for (int i = 0; i < (r + p) * 2; ++i) want.push_back(float(100 * p + r));
    EXPECT_EQ(received[size_t(r)], want) << "rank " << r;
  }
  EXPECT_FLOAT_EQ(means[0][0], 1.f);
  EXPECT_FLOAT_EQ(means[0][1], 2.f);
}

TEST(HostGroup, AFailingRankEndsTheGroupInsteadOfLeavingTheOthersWaiting) {
  try {
    run_host_group(3, [](int r, Communicator& c) {
      if (r == 1) throw UserError("rank 1 fails");
      double x = 1;
      c.all_reduce_host(&x, 1);  // ranks 0 and 2 would wait for rank 1 forever
    });
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_STREQ(e.what(), "rank 1 fails");  // the rank's own error, not the others' "aborted"
  }
}

// ---- data parallel: the backend's step ------------------------------------------------------------------------

// N ranks on equal shards of each batch step as one rank on the whole batch: the same loss parts, gradient norm
// (and so clipping), expert counts (and so bias update) and weights, up to the fp32 rounding of a mean of shard
// means against one mean; and every rank ends with the same bits. Plain data parallel, and with the experts split
// across the ranks (expert parallel: each rank runs E/N experts on every rank's tokens routed to them).
TEST(DataParallel, RanksOnShardsStepAsOneRankOnTheWholeBatch) {
  const Report one = run_steps(*make_cpu_backend(tiny(), 11));
  for (const auto& [n, ep] : std::vector<std::pair<int, bool>>{{2, false}, {4, false}, {2, true}, {4, true}}) {
    std::vector<Report> ranks(static_cast<size_t>(n));
    run_host_group(n, [&, n = n, ep = ep](int r, Communicator& c) {
      auto b = make_cpu_backend(tiny(), 11);
      b->set_communicator(&c, ep);
      ranks[size_t(r)] = run_steps(*b, r, n);
    });
    for (int s = 0; s < kSteps; ++s) {
      const ModelLosses& a = one.losses[size_t(s)];
      const ModelLosses& g = ranks[0].losses[size_t(s)];
      const std::string what = fmt::format("{} ranks{}, step {}", n, ep ? " (expert parallel)" : "", s + 1);
      EXPECT_NEAR(g.ce, a.ce, 1e-5 * a.ce) << what;
      EXPECT_NEAR(g.mtp, a.mtp, 1e-5 * a.mtp) << what;
      EXPECT_NEAR(g.balance, a.balance, 1e-5 * std::abs(a.balance) + 1e-9) << what;
      EXPECT_NEAR(ranks[0].norms[size_t(s)], one.norms[size_t(s)], 1e-4 * one.norms[size_t(s)]) << what;
      EXPECT_EQ(ranks[0].counts[size_t(s)], one.counts[size_t(s)]) << what << ": the group's summed loads";
    }
    for (const auto& [name, w] : one.weights)
      EXPECT_TRUE(close_all(ranks[0].weights.at(name), w, 2e-5)) << n << " ranks, ep " << ep << ": " << name;
    for (int r = 1; r < n; ++r)
      EXPECT_EQ(ranks[size_t(r)].weights, ranks[0].weights) << "rank " << r << " of " << n << ", ep " << ep;
  }
}

// ---- data parallel: the trainer -------------------------------------------------------------------------------

namespace {

// The trainer tests' run (test_support.h), validating every 3 steps so that a stop at 4 falls between two.
TrainConfig dp_run(int64_t steps) {
  TrainConfig c = test::small_run(steps);
  c.eval_every = 3;
  c.patience = 0;
  return c;
}

// Raises its stop flag after its `at`-th update (a stop request on this rank only).
class StopAfter final : public test::ForwardingBackend {
 public:
  StopAfter(int at, std::atomic<bool>* flag) : ForwardingBackend(make_cpu_backend(tiny(), 8)), at_(at), flag_(flag) {}
  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override {
    in_->step(opt, grad_scale, step);
    if (++updates_ == at_) *flag_ = true;
  }

 private:
  int at_, updates_ = 0;
  std::atomic<bool>* flag_;
};

// train() on n ranks of a host group (the model seed 8 on each); rank 0's result, every rank's in *all. stop_rank,
// stop_at: that rank alone asks to stop after that many updates of this call.
TrainResult train_on_ranks(int n, const TrainConfig& cfg, const std::string& dir, bool resume, std::ostream& out,
                           std::vector<TrainResult>* all = nullptr, int stop_rank = -1, int stop_at = 0,
                           bool expert_parallel = false) {
  std::vector<TrainResult> res(static_cast<size_t>(n));
  std::vector<std::ostringstream> outs(static_cast<size_t>(n));
  std::vector<std::atomic<bool>> stop(static_cast<size_t>(n));
  run_host_group(n, [&](int r, Communicator& c) {
    stop[size_t(r)] = false;
    std::unique_ptr<Backend> b = r == stop_rank ? std::make_unique<StopAfter>(stop_at, &stop[size_t(r)])
                                                : make_cpu_backend(tiny(), 8);
    TrainHooks hooks;
    hooks.comm = &c;
    hooks.expert_parallel = expert_parallel;
    hooks.stop = &stop[size_t(r)];
    res[size_t(r)] = train(*b, test_data(), cfg, dir, resume, outs[size_t(r)], hooks);
  });
  out << outs[0].str();
  for (int r = 1; r < n; ++r) EXPECT_EQ(outs[size_t(r)].str(), "") << "rank " << r << " prints nothing";
  if (all) *all = res;
  return res[0];
}

// The same steps (losses and norms close: a mean of shard means against one mean), validation and best step.
void expect_same_steps(const std::vector<StepRecord>& got, const std::vector<StepRecord>& want,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].step, want[i].step) << what;
    EXPECT_NEAR(got[i].losses.ce, want[i].losses.ce, 2e-5 * want[i].losses.ce) << what << ", step " << got[i].step;
    EXPECT_NEAR(got[i].grad_norm, want[i].grad_norm, 2e-4 * want[i].grad_norm) << what << ", step " << got[i].step;
  }
}

int count_lines(const std::string& path) {
  std::ifstream f(path);
  int n = 0;
  for (std::string l; std::getline(f, l);) ++n;
  return n;
}

}  // namespace

// The whole trainer on 2 ranks: the same steps, validation and best checkpoint as one rank; rank 0 alone prints and
// writes (each CSV row once).
TEST(DataParallel, TrainerOnTwoRanksIsTheOneRankRun) {
  TempDir one_dir, two_dir;
  std::ostringstream log;
  const TrainConfig cfg = dp_run(8);
  auto single = make_cpu_backend(tiny(), 8);
  const TrainResult one = train(*single, test_data(), cfg, one_dir.path, false, log);

  std::vector<TrainResult> both;
  const TrainResult two = train_on_ranks(2, cfg, two_dir.path, false, log, &both);
  expect_same_steps(two.history, one.history, "2 ranks vs 1");
  expect_same_steps(both[1].history, both[0].history, "rank 1 vs rank 0");
  EXPECT_NEAR(two.best_val_ce, one.best_val_ce, 2e-5 * one.best_val_ce);
  EXPECT_EQ(two.best_step, one.best_step);
  for (const char* csv : {"train.csv", "val.csv", "expert_load.csv"})
    EXPECT_EQ(count_lines(two_dir.sub(csv)), count_lines(one_dir.sub(csv))) << csv << ": each row once";
  const TensorMap w1 = load_checkpoint(checkpoint_dir(one_dir.path, "best")).tensors;
  const TensorMap w2 = load_checkpoint(checkpoint_dir(two_dir.path, "best")).tensors;
  for (const auto& [name, w] : w1) EXPECT_TRUE(close_all(w2.at(name), w, 5e-5)) << name;

  // with the experts split across the two ranks: the same run again
  TempDir ep_dir;
  const TrainResult ep = train_on_ranks(2, cfg, ep_dir.path, false, log, nullptr, -1, 0, /*expert_parallel=*/true);
  expect_same_steps(ep.history, one.history, "2 ranks, expert parallel, vs 1");
  EXPECT_EQ(ep.best_step, one.best_step);
}

// A stop asked on rank 1 alone (a signal that reached one process) stops both ranks after the same step, and rank
// 0 saves; the run then resumes on 1 rank, or on 4, and ends as the uninterrupted one-rank run.
TEST(DataParallel, AStopOnOneRankStopsAllAndTheRunResumesOnAnyCount) {
  TempDir one_dir;
  std::ostringstream log;
  const TrainConfig cfg = dp_run(8);
  auto single = make_cpu_backend(tiny(), 8);
  const TrainResult one = train(*single, test_data(), cfg, one_dir.path, false, log);

  for (const int resume_on : {1, 4}) {
    TempDir dir;
    std::vector<TrainResult> halves;
    train_on_ranks(2, cfg, dir.path, false, log, &halves, /*stop_rank=*/1, /*stop_at=*/4);
    for (const TrainResult& h : halves) {
      EXPECT_EQ(h.stop_reason, "stopped");
      EXPECT_EQ(h.steps_done, 4);
    }
    TrainResult rest;
    if (resume_on == 1) {
      auto b = make_cpu_backend(tiny(), 99);  // another init: everything comes from the checkpoint
      rest = train(*b, test_data(), cfg, dir.path, true, log);
    } else {
      rest = train_on_ranks(resume_on, cfg, dir.path, true, log);
    }
    EXPECT_EQ(rest.steps_done, 8);
    std::vector<StepRecord> joined = halves[0].history;
    joined.insert(joined.end(), rest.history.begin(), rest.history.end());
    expect_same_steps(joined, one.history, "2 ranks, stopped at 4, resumed on " + std::to_string(resume_on));
    EXPECT_EQ(count_lines(dir.sub("train.csv")), count_lines(one_dir.sub("train.csv")));
  }
}

TEST(DataParallel, ABatchNotAMultipleOfTheRanksIsAUserError) {
  TempDir dir;
  std::ostringstream log;
  TrainConfig cfg = dp_run(2);
  cfg.batch = 3;
  try {
    train_on_ranks(2, cfg, dir.path, false, log);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("not a multiple"), std::string::npos) << e.what();
  }
}

// ---- N ranks emulated on one GPU -------------------------------------------------------------------------------

#ifdef DSV3_HAVE_CUDA
namespace {

// A host-group member whose buffer calls take device pointers: each copies the buffer to the host, runs the host
// group's collective and copies the result back (synchronously, on the calling thread's stream). N threads, each
// with its own CUDA backend on the one GPU, so emulate N GPUs; the captured step cannot hold these copies, so the
// backends run their steps as plain calls.
class DeviceViaHost final : public Communicator {
 public:
  explicit DeviceViaHost(Communicator& host) : h_(host) {}
  int rank() const override { return h_.rank(); }
  int size() const override { return h_.size(); }
  std::string describe() const override { return "device via " + h_.describe(); }
  bool on_device() const override { return true; }
  void all_reduce_mean(float* d, size_t n) override { via_host(d, n, [&](float* h) { h_.all_reduce_mean(h, n); }); }
  void all_reduce_sum(int* d, size_t n) override { via_host(d, n, [&](int* h) { h_.all_reduce_sum(h, n); }); }
  void all_reduce_host(double* data, size_t n) override { h_.all_reduce_host(data, n); }
  void all_to_all(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                  int64_t width) override {
    int64_t ns = 0, nr = 0;
    for (int p = 0; p < size(); ++p) ns += send_counts[p], nr += recv_counts[p];
    std::vector<float> hs(size_t(ns * width)), hr(size_t(nr * width));
    if (!hs.empty()) CUDA_CHECK(cudaMemcpy(hs.data(), send, hs.size() * sizeof(float), cudaMemcpyDeviceToHost));
    h_.all_to_all(hs.data(), send_counts, hr.data(), recv_counts, width);
    if (!hr.empty()) CUDA_CHECK(cudaMemcpy(recv, hr.data(), hr.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  void all_to_all_counts(const int64_t* send, int64_t* recv, int64_t width) override {
    h_.all_to_all_counts(send, recv, width);
  }

 private:
  template <typename T, typename F>
  void via_host(T* d, size_t n, F f) {
    std::vector<T> h(n);
    if (n) CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    f(h.data());
    if (n) CUDA_CHECK(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  Communicator& h_;
};

}  // namespace
#endif

// The emulation on the device: 2 ranks on one GPU (threads, each with its CUDA backend in bf16 and its half
// of every batch) against one rank on the whole batch, plain data parallel and expert parallel (the grouped path's
// exchange with real two-way plans). Step 1, from equal weights, checks the arithmetic tightly: the loss parts, the
// gradient norm and the expert loads (the rounding of products over 32 rows against 64 is all that differs). Later
// steps are held to bf16's tolerance: AdamW's first updates are nearly lr * sign(gradient), so an element whose
// gradient is near zero can move the other way and the runs drift apart a little (measured: weights within 1-3 %,
// the routing biases, which move by +-gamma on a load crossing its mean, more). The ranks stay bit-identical.
TEST(CudaDataParallel, TwoRanksOnOneGpuStepAsOneRankOnTheWholeBatch) {
  if (!gpu_available()) GTEST_SKIP() << gpu_description();
#ifdef DSV3_HAVE_CUDA
  const ModelConfig c = tiny();
  for (const bool ep : {false, true}) {
    DeviceOptions o = device_options(Precision::BF16, c);
    if (ep) o.experts = MoeExperts::Grouped;
    Report one;
    {
      auto b = make_cuda_backend(c, 4, o);
      b->set_cuda_graph(false);
      one = run_steps(*b);
    }
    const int n = 2;
    std::vector<Report> ranks(static_cast<size_t>(n));
    run_host_group(n, [&](int r, Communicator& host) {
      DeviceViaHost comm(host);
      auto b = make_cuda_backend(c, 4, o);
      b->set_cuda_graph(false);
      b->set_communicator(&comm, ep);
      ranks[size_t(r)] = run_steps(*b, r, n);
      b->set_communicator(nullptr);
    });
    const char* mode = ep ? "expert parallel" : "data parallel";
    const ModelLosses &a1 = one.losses[0], &g1 = ranks[0].losses[0];
    EXPECT_NEAR(g1.ce, a1.ce, 1e-4 * a1.ce) << mode << ", step 1";
    EXPECT_NEAR(g1.mtp, a1.mtp, 1e-4 * a1.mtp) << mode << ", step 1";
    EXPECT_NEAR(g1.balance, a1.balance, 1e-4 * std::abs(a1.balance) + 1e-9) << mode << ", step 1";
    EXPECT_NEAR(ranks[0].norms[0], one.norms[0], 1e-3 * one.norms[0]) << mode << ", step 1";
    EXPECT_EQ(ranks[0].counts[0], one.counts[0]) << mode << ", step 1: the group's loads";
    for (int s = 1; s < kSteps; ++s) {
      const std::string what = fmt::format("{}, step {}", mode, s + 1);
      EXPECT_NEAR(ranks[0].losses[size_t(s)].ce, one.losses[size_t(s)].ce, 1e-2 * one.losses[size_t(s)].ce) << what;
      EXPECT_NEAR(ranks[0].norms[size_t(s)], one.norms[size_t(s)], 5e-2 * one.norms[size_t(s)]) << what;
    }
    for (int s = 0; s < kSteps; ++s)
      EXPECT_EQ(ranks[1].losses[size_t(s)].ce, ranks[0].losses[size_t(s)].ce) << mode << ": the ranks agree";
    for (const auto& [name, w] : one.weights) {
      if (name.find("e_score_correction_bias") != std::string::npos) continue;  // moves in steps of gamma
      EXPECT_LT(norm_rel(ranks[0].weights.at(name), w), 5e-2) << mode << ": " << name;
    }
    EXPECT_EQ(ranks[1].weights, ranks[0].weights) << mode;
  }
#endif
}

// ---- NCCL on one GPU ------------------------------------------------------------------------------------------

// The NCCL path with one rank (the all-reduces inside the captured step, ncclAvg over one rank) takes exactly the
// steps of no communicator at all, captured or not; and a host group is refused by the CUDA backend.
TEST(CudaDataParallel, OneRankNcclStepsExactlyAsNoCommunicator) {
  if (!gpu_available()) GTEST_SKIP() << gpu_description();
  if (!nccl_built()) GTEST_SKIP() << "built without NCCL";
  const ModelConfig c = tiny();
  auto comm = make_nccl_communicator(0, 1, nccl_new_id());
  EXPECT_TRUE(comm->on_device());
  for (const bool graph : {true, false}) {
    auto plain = make_cuda_backend(c, 4, Precision::BF16);
    auto ranked = make_cuda_backend(c, 4, Precision::BF16);
    plain->set_cuda_graph(graph);
    ranked->set_cuda_graph(graph);
    ranked->set_communicator(comm.get());
    for (int s = 1; s <= kSteps; ++s) {
      const Backend::StepResult a = plain->train_step(batch(s), kB, kT, plan(s));
      const Backend::StepResult b = ranked->train_step(batch(s), kB, kT, plan(s));
      EXPECT_EQ(b.losses.ce, a.losses.ce) << "graph " << graph << ", step " << s;
      EXPECT_EQ(b.losses.balance, a.losses.balance) << "graph " << graph << ", step " << s;
      EXPECT_EQ(b.grad_norm, a.grad_norm) << "graph " << graph << ", step " << s;
      EXPECT_EQ(ranked->expert_counts(), plain->expert_counts()) << "graph " << graph << ", step " << s;
    }
    EXPECT_EQ(ranked->graph_captures(), plain->graph_captures());
    EXPECT_EQ(ranked->weights(), plain->weights()) << "graph " << graph;
    ranked->set_communicator(nullptr);
  }
  auto group = make_host_group(1);
  auto b = make_cuda_backend(c, 4, Precision::BF16);
  EXPECT_THROW(b->set_communicator(group[0].get()), UserError);
}

// Expert parallel through NCCL with one rank (every expert local; the rows go to this rank and back through
// ncclSend/ncclRecv) takes exactly the steps of the grouped expert path it runs on, without a communicator.
TEST(CudaDataParallel, OneRankExpertParallelStepsExactlyAsTheGroupedPath) {
  if (!gpu_available()) GTEST_SKIP() << gpu_description();
  if (!nccl_built()) GTEST_SKIP() << "built without NCCL";
  const ModelConfig c = tiny();
  auto comm = make_nccl_communicator(0, 1, nccl_new_id());
  DeviceOptions o = device_options(Precision::BF16, c);
  o.experts = MoeExperts::Grouped;
  auto plain = make_cuda_backend(c, 4, o);
  auto ranked = make_cuda_backend(c, 4, o);
  ranked->set_communicator(comm.get(), /*expert_parallel=*/true);
  for (int s = 1; s <= kSteps; ++s) {
    const Backend::StepResult a = plain->train_step(batch(s), kB, kT, plan(s));
    const Backend::StepResult b = ranked->train_step(batch(s), kB, kT, plan(s));
    EXPECT_EQ(b.losses.ce, a.losses.ce) << "step " << s;
    EXPECT_EQ(b.losses.balance, a.losses.balance) << "step " << s;
    EXPECT_EQ(b.grad_norm, a.grad_norm) << "step " << s;
  }
  EXPECT_EQ(ranked->weights(), plain->weights());
  ranked->set_communicator(nullptr);
  // the other expert paths cannot exchange rows: refused by name
  auto hopper = make_cuda_backend(c, 4, device_options(Precision::BF16, c));
  if (device_options(Precision::BF16, c).experts != MoeExperts::Grouped) {
    EXPECT_THROW(hopper->set_communicator(comm.get(), true), UserError);
  }
}
