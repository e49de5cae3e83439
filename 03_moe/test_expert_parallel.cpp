// Expert parallelism (moe_expert_parallel.h) emulated on the host: R ranks as R threads of a host group
// (common/comm.h), each with its own tokens and its share of the experts, against every expert run in one process
// on all the tokens: the same outputs, input and routing-weight gradients, and expert weight gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>

#include "03_moe/moe_expert_parallel.h"
#include "common/comm.h"
#include "common/errors.h"
#include "common/rng.h"

using namespace dsv3;

namespace {

std::vector<float> normal(size_t n, uint64_t seed, float scale) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * float(rng.normal());
  return v;
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    worst = std::max(worst, std::abs(double(a[i]) - b[i]) / std::max(1.0, std::abs(double(b[i]))));
  return worst;
}

}  // namespace

TEST(ExpertParallel, ShardsSplitTheExpertsEvenly) {
  EXPECT_EQ(expert_shard(16, 4, 2).first, 8);
  EXPECT_EQ(expert_shard(16, 4, 2).count, 4);
  EXPECT_THROW(expert_shard(16, 3, 0), UserError);
}

// Uneven routing on purpose: rank r's tokens prefer the experts of rank (r + 1) mod R, some experts get no token.
TEST(ExpertParallel, DispatchExpertsCombineEqualsEveryExpertInOneProcess) {
  MoeConfig c;
  c.dim = 12;
  c.moe_inter_dim = 8;
  c.n_routed_experts = 8;
  c.n_activated_experts = 3;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim;
  const std::vector<float> w1 = normal(size_t(E) * F * D, 1, 0.3f), w2 = normal(size_t(E) * D * F, 2, 0.3f),
                           w3 = normal(size_t(E) * F * D, 3, 0.3f);
  MlpConfig mc;
  mc.dim = D;
  mc.inter_dim = F;
  for (const int R : {1, 2, 4}) {
    const int N = 5;  // tokens per rank
    // every rank's tokens, routing and output gradient
    std::vector<std::vector<float>> x(R), wts(R), dout(R);
    std::vector<std::vector<int>> idx(R);
    for (int r = 0; r < R; ++r) {
      x[r] = normal(size_t(N) * D, 10 + r, 1.f);
      dout[r] = normal(size_t(N) * D, 20 + r, 1.f);
      Rng rng(30 + r);
      for (int n = 0; n < N; ++n) {
        std::vector<int> chosen;
        while (int(chosen.size()) < K) {
          int e = rng.uniform() < 0.7 ? ((r + 1) % R) * (E / R) + int(rng.below(uint64_t(E / R))) : int(rng.below(E));
          if (e == E - 1) e = 0;  // the last expert never gets a token
          if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
        }
        for (int k = 0; k < K; ++k) {
          idx[r].push_back(chosen[size_t(k)]);
          wts[r].push_back(0.2f + 0.3f * float(rng.uniform()));
        }
      }
    }
    // the reference: one process, every expert, slot by slot
    std::vector<std::vector<float>> out_ref(R), dx_ref(R), dwt_ref(R);
    std::vector<float> dw1_ref(w1.size(), 0.f), dw2_ref(w2.size(), 0.f), dw3_ref(w3.size(), 0.f);
    for (int r = 0; r < R; ++r) {
      out_ref[r].assign(size_t(N) * D, 0.f);
      dx_ref[r].assign(size_t(N) * D, 0.f);
      dwt_ref[r].assign(size_t(N) * K, 0.f);
      for (int n = 0; n < N; ++n)
        for (int k = 0; k < K; ++k) {
          const int e = idx[r][size_t(n * K + k)];
          const float w = wts[r][size_t(n * K + k)];
          const MlpWeights<float> we{w1.data() + size_t(e) * F * D, w2.data() + size_t(e) * D * F,
                                     w3.data() + size_t(e) * F * D};
          const MlpGrads<float> ge{dw1_ref.data() + size_t(e) * F * D, dw2_ref.data() + size_t(e) * D * F,
                                   dw3_ref.data() + size_t(e) * F * D};
          std::vector<float> y(D), h1(F), h3(F), dy(D), dxs(D);
          cpu::mlp_forward(y.data(), h1.data(), h3.data(), x[r].data() + n * D, we, mc, 1);
          float dot = 0;
          for (int d = 0; d < D; ++d) {
            out_ref[r][size_t(n * D + d)] += w * y[d];
            dot += dout[r][size_t(n * D + d)] * y[d];
            dy[d] = w * dout[r][size_t(n * D + d)];
          }
          dwt_ref[r][size_t(n * K + k)] = dot;
          cpu::mlp_backward(ge, dxs.data(), dy.data(), h1.data(), h3.data(), x[r].data() + n * D, we, mc, 1);
          for (int d = 0; d < D; ++d) dx_ref[r][size_t(n * D + d)] += dxs[d];
        }
    }
    // R ranks, each with its tokens and its experts
    std::vector<std::vector<float>> out(R), dx(R), dwt(R), dw1(R), dw2(R), dw3(R);
    run_host_group(R, [&](int r, Communicator& comm) {
      const ExpertShard sh = expert_shard(E, R, r);
      const size_t a = size_t(sh.first) * F * D, n = size_t(sh.count) * F * D;
      const std::vector<float> my1(w1.begin() + a, w1.begin() + a + n), my2(w2.begin() + a, w2.begin() + a + n),
          my3(w3.begin() + a, w3.begin() + a + n);
      EpSaved<float> saved;
      out[r].assign(size_t(N) * D, 0.f);
      ep_routed_forward(out[r].data(), saved, x[r].data(), idx[r].data(), wts[r].data(), my1.data(), my2.data(),
                        my3.data(), c, N, comm);
      dx[r].assign(size_t(N) * D, 0.f);
      dwt[r].assign(size_t(N) * K, 0.f);
      dw1[r].assign(n, 0.f);
      dw2[r].assign(n, 0.f);
      dw3[r].assign(n, 0.f);
      ep_routed_backward(dx[r].data(), dwt[r].data(), dw1[r].data(), dw2[r].data(), dw3[r].data(), dout[r].data(),
                         saved, idx[r].data(), wts[r].data(), my1.data(), my2.data(), my3.data(), c, N, comm);
    });
    for (int r = 0; r < R; ++r) {
      EXPECT_LT(max_rel(out[r], out_ref[r]), 1e-5) << R << " ranks, rank " << r << ": output";
      EXPECT_LT(max_rel(dx[r], dx_ref[r]), 1e-5) << R << " ranks, rank " << r << ": input gradient";
      EXPECT_LT(max_rel(dwt[r], dwt_ref[r]), 1e-5) << R << " ranks, rank " << r << ": routing weights' gradient";
      const ExpertShard sh = expert_shard(E, R, r);
      const size_t a = size_t(sh.first) * F * D, n = size_t(sh.count) * F * D;
      EXPECT_LT(max_rel(dw1[r], std::vector<float>(dw1_ref.begin() + a, dw1_ref.begin() + a + n)), 1e-5) << R << "/" << r;
      EXPECT_LT(max_rel(dw2[r], std::vector<float>(dw2_ref.begin() + a, dw2_ref.begin() + a + n)), 1e-5) << R << "/" << r;
      EXPECT_LT(max_rel(dw3[r], std::vector<float>(dw3_ref.begin() + a, dw3_ref.begin() + a + n)), 1e-5) << R << "/" << r;
    }
  }
}
