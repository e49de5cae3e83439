// Expert parallelism (moe_expert_parallel.h) emulated on the host: R ranks as R threads of a host group
// (common/comm.h), each routing its own tokens through the MoE layer with its share of the experts, against the
// whole layer in one process on all the tokens (cpu::moe_forward / moe_backward without expert parallelism).
#include <gtest/gtest.h>

#include <cmath>

#include "03_moe/moe.h"
#include "03_moe/moe_expert_parallel.h"
#include "common/comm.h"
#include "common/errors.h"
#include "common/rng.h"

using namespace dsv3;

namespace {

std::vector<float> normal(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = float(rng.normal());
  return v;
}

double max_rel(const float* a, const float* b, size_t n) {
  double worst = 0;
  for (size_t i = 0; i < n; ++i)
    worst = std::max(worst, std::abs(double(a[i]) - b[i]) / std::max(1.0, std::abs(double(b[i]))));
  return worst;
}

}  // namespace

TEST(ExpertParallel, ShardsSplitTheExpertsEvenly) {
  EXPECT_EQ(expert_shard(16, 4, 2).first, 8);
  EXPECT_EQ(expert_shard(16, 4, 2).count, 4);
  EXPECT_THROW(expert_shard(16, 3, 0), UserError);
}

// Outputs and input gradients of each rank's tokens, the router's and shared experts' gradients summed over ranks,
// and each expert's gradient on its owner (zeros elsewhere) equal the one-process layer's on all the tokens.
TEST(ExpertParallel, RanksWithAShareOfTheExpertsEqualTheWholeLayer) {
  MoeConfig c;  // dim 64, 16 experts in 4 groups (2 kept), 4 per token, one shared expert, sigmoid
  const MoeParams<float> p = moe_init_params<float>(c, 3);
  const int D = c.dim, N = 6;  // tokens per rank
  for (const int R : {1, 2, 4}) {
    const std::vector<float> x = normal(size_t(R) * N * D, 10 + R), dout = normal(size_t(R) * N * D, 20 + R);
    // the reference: every token, every expert, one process
    std::vector<float> out_ref(x.size()), dinp_ref(x.size());
    MoeParams<float> g_ref = moe_zero_params<float>(c);
    MoeHostSaved<float> saved_ref(c, R * N);
    cpu::moe_forward(out_ref.data(), saved_ref.saved, x.data(), p.weights(), c, R * N);
    cpu::moe_backward(g_ref.grads(), dinp_ref.data(), dout.data(), nullptr, saved_ref.saved, x.data(), p.weights(),
                      c, R * N);
    // R ranks, N tokens each
    std::vector<float> out(x.size()), dinp(x.size());
    std::vector<MoeParams<float>> g(size_t(R), moe_zero_params<float>(c));
    std::vector<int> routed_elsewhere(size_t(R), 0);
    run_host_group(R, [&](int r, Communicator& comm) {
      ExpertParallel ep(comm);
      MoeConfig cr = c;
      cr.expert_parallel = &ep;
      MoeHostSaved<float> saved(cr, N);
      const size_t at = size_t(r) * N * D;
      cpu::moe_forward(out.data() + at, saved.saved, x.data() + at, p.weights(), cr, N);
      cpu::moe_backward(g[size_t(r)].grads(), dinp.data() + at, dout.data() + at, nullptr, saved.saved,
                        x.data() + at, p.weights(), cr, N);
      const ExpertShard mine = ep.shard(c.n_routed_experts);
      for (int i = 0; i < N * c.n_activated_experts; ++i)
        routed_elsewhere[size_t(r)] += saved.saved.indices[i] < mine.first ||
                                       saved.saved.indices[i] >= mine.first + mine.count;
    });
    EXPECT_LT(max_rel(out.data(), out_ref.data(), out.size()), 1e-5) << R << " ranks: outputs";
    EXPECT_LT(max_rel(dinp.data(), dinp_ref.data(), dinp.size()), 1e-5) << R << " ranks: input gradients";
    if (R > 1) {
      for (int r = 0; r < R; ++r) EXPECT_GT(routed_elsewhere[size_t(r)], 0) << "rank " << r << " sent no row away";
    }
    // parameter gradients: the sum over ranks; an expert's only on its owner
    MoeParams<float> sum = moe_zero_params<float>(c);
    auto st = sum.tensors();
    for (int r = 0; r < R; ++r) {
      auto gt = g[size_t(r)].tensors();
      for (size_t t = 0; t < st.size(); ++t)
        for (size_t i = 0; i < st[t].second->size(); ++i) (*st[t].second)[i] += (*gt[t].second)[i];
      const ExpertShard mine = expert_shard(c.n_routed_experts, R, r);
      const size_t per = size_t(c.moe_inter_dim) * D;
      const auto& w1 = g[size_t(r)].w1;
      for (int e = 0; e < c.n_routed_experts; ++e) {
        if (e >= mine.first && e < mine.first + mine.count) continue;
        EXPECT_TRUE(std::all_of(w1.begin() + e * per, w1.begin() + (e + 1) * per, [](float v) { return v == 0.f; }))
            << R << " ranks: rank " << r << " touched expert " << e << " of another rank";
      }
    }
    auto rt = g_ref.tensors();
    for (size_t t = 0; t < st.size(); ++t)
      EXPECT_LT(max_rel(st[t].second->data(), rt[t].second->data(), rt[t].second->size()), 1e-5)
          << R << " ranks: gradient of " << st[t].first;
  }
}

TEST(ExpertParallel, ExpertsThatDoNotSplitEvenlyAreAUserError) {
  MoeConfig c;
  const MoeParams<float> p = moe_init_params<float>(c, 3);
  EXPECT_THROW(run_host_group(3, [&](int, Communicator& comm) {
    ExpertParallel ep(comm);
    MoeConfig cr = c;
    cr.expert_parallel = &ep;
    MoeHostSaved<float> saved(cr, 2);
    std::vector<float> x(2 * size_t(c.dim), 0.5f), out(x.size());
    cpu::moe_forward(out.data(), saved.saved, x.data(), p.weights(), cr, 2);
  }), UserError);
}
