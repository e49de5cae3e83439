// Stage 04 tests: the balance loss (gradcheck, uniform = alpha, collapse grows it, alpha = 0 no-op), the
// bias update (sign rule, balanced batch unchanged, gamma = 0 no-op), MaxVio, CPU vs CUDA.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "04_aux_loss/aux_loss.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"
#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

namespace {

// Router-like inputs: sigmoid scores in (0, 1) and K distinct random experts per token.
struct Routing {
  int B, T, E, K;
  std::vector<double> scores;  // (N, E)
  std::vector<int> topk;       // (N, K)
};

Routing random_routing(int B, int T, int E, int K, uint64_t seed) {
  Rng rng(seed);
  Routing r{B, T, E, K, {}, {}};
  for (int i = 0; i < B * T * E; ++i) r.scores.push_back(1.0 / (1.0 + std::exp(-rng.normal())));
  for (int t = 0; t < B * T; ++t) {
    std::vector<int> e(E);
    std::iota(e.begin(), e.end(), 0);
    for (int k = 0; k < K; ++k) {
      std::swap(e[k], e[k + rng.below(E - k)]);
      r.topk.push_back(e[k]);
    }
  }
  return r;
}

double loss_of(const Routing& r, float alpha, std::vector<double>* f = nullptr, std::vector<double>* ssum = nullptr) {
  std::vector<double> f_(r.B * r.E), s_(r.B * r.T);
  double loss = 0;
  cpu::seq_balance_loss_forward(&loss, f_.data(), s_.data(), r.scores.data(), r.topk.data(), r.B, r.T, r.E, r.K,
                                alpha);
  if (f) *f = f_;
  if (ssum) *ssum = s_;
  return loss;
}

}  // namespace

TEST(BalanceLoss, GradcheckScores) {
  Routing r = random_routing(2, 5, 7, 3, 1);
  std::vector<double> f, ssum, ds(r.scores.size());
  loss_of(r, 0.3f, &f, &ssum);
  const double dloss = 1.7;  // the incoming gradient, so a backward that ignores it fails
  cpu::seq_balance_loss_backward(ds.data(), dloss, f.data(), ssum.data(), r.scores.data(), r.B, r.T, r.E, 0.3f);
  EXPECT_GRADCHECK(gradcheck([&] { return dloss * loss_of(r, 0.3f); }, {{"scores", &r.scores, &ds}}));
}

TEST(BalanceLoss, UniformRoutingGivesAlpha) {
  // Every expert chosen by exactly K*T/E tokens of each sequence: f_i = 1 for all i, and sum_i P_i = 1
  // because each token's normalised scores sum to 1, so L = alpha * sum_i P_i = alpha, whatever the scores.
  const int B = 3, T = 8, E = 6, K = 3;
  Routing r = random_routing(B, T, E, K, 2);
  for (int t = 0; t < B * T; ++t)
    for (int k = 0; k < K; ++k) r.topk[t * K + k] = (t * K + k) % E;
  EXPECT_NEAR(loss_of(r, 0.25f), 0.25, 1e-12);
}

TEST(BalanceLoss, GrowsWhenRoutingCollapses) {
  const int B = 2, T = 10, E = 8, K = 2;
  Routing r = random_routing(B, T, E, K, 3);
  const double random_loss = loss_of(r, 1.f);
  for (int t = 0; t < B * T; ++t) {
    r.topk[t * K] = 0;
    r.topk[t * K + 1] = 1;
    for (int i = 0; i < E; ++i) r.scores[t * E + i] = i < 2 ? 0.99 : 0.01;
  }
  // f_0 = f_1 = E/K = 4, P_0 = P_1 = 0.99/2.04: L = 8 * 0.4853 = 3.88 = alpha * (almost E/K)
  const double collapsed = loss_of(r, 1.f);
  EXPECT_NEAR(collapsed, 8 * 0.99 / 2.04, 1e-12);
  EXPECT_GT(collapsed, 3 * random_loss);
}

TEST(BalanceLoss, AlphaZeroIsExactNoOp) {
  Routing r = random_routing(2, 5, 7, 3, 4);
  std::vector<double> f, ssum, ds(r.scores.size(), 5.0);
  EXPECT_EQ(loss_of(r, 0.f, &f, &ssum), 0.0);
  cpu::seq_balance_loss_backward(ds.data(), 1.0, f.data(), ssum.data(), r.scores.data(), r.B, r.T, r.E, 0.f);
  for (double v : ds) EXPECT_EQ(v, 0.0);
}

TEST(BalanceLoss, IsPerSequenceNotPerBatch) {
  // Two sequences, each collapsed onto a different expert: the batch is balanced, each sequence is not.
  const int B = 2, T = 4, E = 2, K = 1;
  Routing r = random_routing(B, T, E, K, 5);
  for (int t = 0; t < B * T; ++t) r.topk[t] = t < T ? 0 : 1;
  std::vector<int> c(E);
  cpu::expert_counts(c.data(), r.topk.data(), B * T, K, E);
  EXPECT_EQ(max_violation(c.data(), E), 0.0);
  EXPECT_EQ(max_violation_per_sequence(r.topk.data(), B, T, K, E), 1.0);  // (T - T/2) / (T/2)
  EXPECT_GT(loss_of(r, 1.f), 1.0);  // > alpha although the batch is balanced
}

TEST(BalanceLoss, RejectsBadShapes) {
  std::vector<double> x(4);
  std::vector<int> tk(4, 0);
  double loss;
  EXPECT_THROW(cpu::seq_balance_loss_forward(&loss, x.data(), x.data(), x.data(), tk.data(), 1, 2, 2, 3, 1.f),
               UserError);  // K > E
  tk[1] = 7;
  EXPECT_THROW(cpu::seq_balance_loss_forward(&loss, x.data(), x.data(), x.data(), tk.data(), 1, 2, 2, 1, 1.f),
               UserError);  // expert index out of range
  BalanceConfig bad;
  bad.aux_alpha = -1;
  EXPECT_THROW(bad.validate(), UserError);
}

TEST(MaxVio, MatchesDefinition) {
  const std::vector<int> load = {4, 2, 2, 0};  // mean 2, max 4
  EXPECT_DOUBLE_EQ(max_violation(load.data(), 4), 1.0);
  const std::vector<int> even = {3, 3, 3};
  EXPECT_DOUBLE_EQ(max_violation(even.data(), 3), 0.0);
  const std::vector<int> none = {0, 0};
  EXPECT_DOUBLE_EQ(max_violation(none.data(), 2), 0.0);
}

TEST(BiasUpdate, SignRule) {
  // N*K/E = 6*2/4 = 3 tokens per expert on average.
  const std::vector<int> counts = {6, 3, 1, 2};
  std::vector<double> bias = {0.5, 0.5, 0.5, 0.5};
  cpu::bias_update(bias.data(), counts.data(), 4, 6, 2, 0.1f);
  EXPECT_NEAR(bias[0], 0.4, 1e-7);  // overloaded: down by gamma
  EXPECT_EQ(bias[1], 0.5);          // at the mean: unchanged
  EXPECT_NEAR(bias[2], 0.6, 1e-7);  // underloaded: up by gamma
  EXPECT_NEAR(bias[3], 0.6, 1e-7);
}

TEST(BiasUpdate, BalancedBatchAndGammaZeroAreNoOps) {
  const std::vector<int> balanced = {3, 3, 3, 3}, skewed = {12, 0, 0, 0};
  std::vector<double> bias = {0.1, -0.2, 0.3, 0.0};
  const auto b0 = bias;
  cpu::bias_update(bias.data(), balanced.data(), 4, 6, 2, 0.5f);
  EXPECT_EQ(bias, b0);
  cpu::bias_update(bias.data(), skewed.data(), 4, 6, 2, 0.f);
  EXPECT_EQ(bias, b0);
}

#ifdef DSV3_HAVE_CUDA
TEST(CudaBalanceLoss, MatchesCpu) {
  DSV3_REQUIRE_GPU();
  for (auto [B, T, E, K] : {std::array{1, 1, 4, 1}, std::array{3, 17, 9, 3}, std::array{4, 512, 64, 6}}) {
    Routing r = random_routing(B, T, E, K, 7);
    const auto sf = cast_vec<float>(r.scores);
    std::vector<float> f(B * E), ssum(B * T), ds(sf.size());
    float loss = 0;
    cpu::seq_balance_loss_forward(&loss, f.data(), ssum.data(), sf.data(), r.topk.data(), B, T, E, K, 0.3f);
    cpu::seq_balance_loss_backward(ds.data(), 1.5f, f.data(), ssum.data(), sf.data(), B, T, E, 0.3f);

    DeviceBuffer<float> gs(sf), gf(f.size()), gss(ssum.size()), gds(ds.size()), gl(1);
    DeviceBuffer<int> gtk(r.topk);
    gds.poison();
    cuda::seq_balance_loss_forward(gl.get(), gf.get(), gss.get(), gs.get(), gtk.get(), B, T, E, K, 0.3f);
    cuda::seq_balance_loss_backward(gds.get(), 1.5f, gf.get(), gss.get(), gs.get(), B, T, E, 0.3f);
    EXPECT_CLOSE(compare(gl.download(), std::vector<float>{loss}, kReductionTol), "loss");
    EXPECT_CLOSE(compare(gf.download(), f, kElementwiseTol), "f");
    EXPECT_CLOSE(compare(gds.download(), ds, kReductionTol), "dscores");
  }
}

TEST(CudaBiasUpdate, CountsAndUpdateMatchCpu) {
  DSV3_REQUIRE_GPU();
  const int B = 5, T = 33, E = 13, K = 4;
  Routing r = random_routing(B, T, E, K, 8);
  std::vector<int> counts(E);
  cpu::expert_counts(counts.data(), r.topk.data(), B * T, K, E);
  Rng rng(9);
  auto bias = rng.normal_vec<float>(E);
  DeviceBuffer<int> gtk(r.topk), gc(E);
  DeviceBuffer<float> gb(bias);
  cuda::expert_counts(gc.get(), gtk.get(), B * T, K, E);
  cuda::bias_update(gb.get(), gc.get(), E, B * T, K, 0.01f);
  cpu::bias_update(bias.data(), counts.data(), E, B * T, K, 0.01f);
  EXPECT_EQ(gc.download(), counts);
  EXPECT_CLOSE(compare(gb.download(), bias, kElementwiseTol), "bias");
}
#else
TEST(CudaBalanceLoss, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
