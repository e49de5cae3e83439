// Stage 04 with stage 03 upstream: the balance loss's gradient through the real router, the bias update
// balancing the real router's load, and the tiny MoE LM of the experiment (whole-model gradcheck, no-ops).
#include <algorithm>
#include <cmath>

#include "03_moe/moe.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/tiny_moe_lm.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

MoeConfig small_moe() {
  MoeConfig c;
  c.dim = 6;
  c.moe_inter_dim = 3;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.n_activated_experts = 2;
  c.n_expert_groups = 4;
  c.n_limited_groups = 2;
  return c;
}

uint64_t hash_indices(const int* idx, int n) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < n; ++i) h = (h ^ uint64_t(idx[i] + 1)) * 1099511628211ull;
  return h;
}

}  // namespace

TEST(BalanceWithRouter, GradcheckInputAndGateWeight) {
  // L = L_Bal(router(x; Wg)): the gradient reaches x and Wg only through the scores' normalisation.
  const MoeConfig c = small_moe();
  const int B = 2, T = 5, N = B * T, E = c.n_routed_experts, K = c.n_activated_experts;
  const float alpha = 0.7f;
  auto p = moe_init_params<double>(c, 3);
  Rng rng(4);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  std::vector<double> out(size_t(N) * c.dim), saved(moe_saved_size(c, N)), f(B * E), ssum(N);
  std::vector<int> saved_int(moe_saved_int_size(c, N));
  const MoeSaved<double> s = moe_saved_layout(saved.data(), saved_int.data(), c, N);
  auto loss = [&] {
    cpu::moe_forward(out.data(), s, x.data(), p.weights(), c, N);
    double l = 0;
    cpu::seq_balance_loss_forward(&l, f.data(), ssum.data(), s.scores, s.indices, B, T, E, K, alpha);
    return l;
  };
  loss();
  std::vector<double> dscores(size_t(N) * E), dx(x.size()), zero_dout(out.size(), 0.0);
  cpu::seq_balance_loss_backward(dscores.data(), 1.0, f.data(), ssum.data(), s.scores, B, T, E, alpha);
  auto g = moe_zero_params<double>(c);
  cpu::moe_backward(g.grads(), dx.data(), zero_dout.data(), dscores.data(), s, x.data(), p.weights(), c, N);
  for (double v : g.w1) EXPECT_EQ(v, 0.0);  // the experts get nothing from the balance loss
  GradCheckOptions opt;
  opt.decision_signature = [&] { return hash_indices(s.indices, N * K); };
  const auto r = gradcheck(loss, {{"inp", &x, &dx}, {"gate_weight", &p.gate_weight, &g.gate_weight}}, opt);
  EXPECT_GRADCHECK(r);
  EXPECT_GT(r.checked, 90u) << r.report();
}

TEST(BiasWithRouter, UpdateMovesLoadTowardBalance) {
  // A skewed router: experts 0 and 1 start with a large bias, so nearly every token picks them.
  MoeConfig c = small_moe();
  c.n_expert_groups = 1;
  c.n_limited_groups = 1;
  const int N = 64, E = c.n_routed_experts, K = c.n_activated_experts;
  auto p = moe_init_params<double>(c, 5);
  p.gate_bias[0] = p.gate_bias[1] = 1.0;
  Rng rng(6);
  const auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  std::vector<double> out(size_t(N) * c.dim), saved(moe_saved_size(c, N));
  std::vector<int> saved_int(moe_saved_int_size(c, N));
  const MoeSaved<double> s = moe_saved_layout(saved.data(), saved_int.data(), c, N);
  auto route = [&] {
    cpu::moe_forward(out.data(), s, x.data(), p.weights(), c, N);
    return max_violation(s.counts, E);
  };
  const double before = route();
  EXPECT_GT(before, 2.0);  // experts 0 and 1 take about N of the N*K/E = 16 average: MaxVio near 3
  double after = before;
  for (int step = 0; step < 200; ++step) {
    cpu::bias_update(p.gate_bias.data(), s.counts, E, N, K, 0.02f);
    after = route();
  }
  EXPECT_LT(after, 0.5 * before);
  EXPECT_LT(p.gate_bias[0], 1.0);  // the overloaded experts were pushed down
}

TEST(TinyMoeLm, WholeModelGradcheckWithBalanceLoss) {
  TinyMoeLmConfig c;
  c.vocab = 11;
  c.n_layers = 2;
  c.moe = small_moe();
  c.balance.aux_alpha = 0.3f;
  TinyMoeLm<double> lm(c, 7);
  const int B = 2, T = 5;
  Rng rng(8);
  std::vector<int> tokens(B * (T + 1));
  for (auto& t : tokens) t = int(rng.below(c.vocab));
  auto loss = [&] { return lm.forward(tokens, B, T) + lm.stats().balance_loss; };
  loss();
  lm.backward();
  std::vector<GradTensor> ts;
  std::vector<std::vector<double>> grads;  // copies: gradcheck re-runs forward, not backward
  for (auto& t : lm.tensors()) grads.push_back(*t.grad);
  size_t i = 0;
  for (auto& t : lm.tensors()) ts.push_back({t.name, t.value, &grads[i++]});
  GradCheckOptions opt;
  opt.max_coords = 12;
  opt.decision_signature = [&] { return lm.routing_signature(); };
  const auto r = gradcheck(loss, ts, opt);
  EXPECT_GRADCHECK(r);
  EXPECT_GE(ts.size(), 18u);  // wte, 2 x (norm + 7 MoE tensors), final_norm, head
  EXPECT_GT(r.checked, 150u) << r.report();
}

TEST(TinyMoeLm, AlphaAndGammaZeroAreExactNoOps) {
  TinyMoeLmConfig off;
  off.vocab = 13;
  off.moe = small_moe();
  off.balance.aux_alpha = 0;
  off.balance.bias_update_speed = 0;
  TinyMoeLmConfig on = off;
  on.balance.aux_alpha = 0.5f;
  on.balance.bias_update_speed = 0.1f;
  TinyMoeLm<double> a(off, 9), b(on, 9);
  const int B = 2, T = 7;
  Rng rng(10);
  std::vector<int> tokens(B * (T + 1));
  for (auto& t : tokens) t = int(rng.below(off.vocab));
  EXPECT_EQ(a.forward(tokens, B, T), b.forward(tokens, B, T));  // the bias is still zero: same routing
  EXPECT_EQ(a.stats().balance_loss, 0.0);
  EXPECT_GT(b.stats().balance_loss, 0.0);
  a.backward();
  b.backward();
  auto ta = a.tensors(), tb = b.tensors();
  int unaffected = 0, router = 0;
  for (size_t i = 0; i < ta.size(); ++i) {
    const bool differs = *ta[i].grad != *tb[i].grad;
    // The balance loss reaches the last layer only through its router; earlier layers also through the
    // residual stream. The head and final norm never see it.
    if (ta[i].name == "head" || ta[i].name == "final_norm" || ta[i].name.rfind("layers.1.experts.", 0) == 0 ||
        ta[i].name.rfind("layers.1.shared.", 0) == 0) {
      ++unaffected;
      EXPECT_FALSE(differs) << ta[i].name;
    }
    if (ta[i].name == "layers.1.gate.weight") {
      EXPECT_TRUE(differs);
      ++router;
    }
  }
  EXPECT_EQ(unaffected, 8);  // head, final_norm, 3 expert and 3 shared matrices of the last layer
  EXPECT_EQ(router, 1);
  AdamWConfig opt;
  a.optimizer_step(opt, 1);
  b.optimizer_step(opt, 1);
  for (int l = 0; l < off.n_layers; ++l) {
    EXPECT_EQ(a.gate_bias(l), std::vector<double>(off.moe.n_routed_experts, 0.0));  // gamma = 0: untouched
    EXPECT_NE(b.gate_bias(l), std::vector<double>(off.moe.n_routed_experts, 0.0));
  }
}
