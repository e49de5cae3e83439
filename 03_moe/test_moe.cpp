// Stage 03 tests: gradchecks (routing flips skipped and counted), oracles (sparse == dense, bias picks but
// never weighs, group limiting), hand-worked routing, edge cases, config errors, CPU vs CUDA.
#include <algorithm>
#include <cmath>
#include <set>

#include "03_moe/moe.h"
#include "03_moe/moe_route.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"
#ifdef DSV3_HAVE_CUDA
#include "03_moe/moe_device.h"
#include "03_moe/moe_experts_bf16.h"
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

namespace {

MoeConfig small_config(int E = 8, int K = 3, int G = 4, int Lg = 2, int Es = 1,
                       ScoreFunc f = ScoreFunc::Sigmoid, float scale = 2.5f) {
  MoeConfig c;
  c.dim = 7;
  c.moe_inter_dim = 5;
  c.n_routed_experts = E;
  c.n_shared_experts = Es;
  c.n_activated_experts = K;
  c.n_expert_groups = G;
  c.n_limited_groups = Lg;
  c.route_scale = scale;
  c.score_func = f;
  return c;
}

// Parameters with a random bias of the size the scores have, so the bias really changes choices.
template <typename T>
MoeParams<T> params_with_bias(const MoeConfig& c, uint64_t seed, double bias_std = 0.1) {
  MoeParams<T> p = moe_init_params<T>(c, seed);
  Rng rng(seed + 99);
  for (auto& b : p.gate_bias) b = static_cast<T>(bias_std * rng.normal());
  return p;
}

// FNV-1a of the chosen index sets: the decision signature of a routing.
uint64_t hash_indices(const int* idx, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint64_t>(idx[i] + 1)) * 1099511628211ull;
  return h;
}

template <typename T>
std::vector<T> run_forward(MoeHostSaved<T>& hs, const std::vector<T>& x, const MoeParams<T>& p, const MoeConfig& c,
                           int N) {
  std::vector<T> y(size_t(N) * c.dim);
  cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N);
  return y;
}

}  // namespace

// ---- routing is total -----------------------------------------------------------------------------

// NaN or infinite scores (a diverged model) still give K distinct experts in [0, E) from kept groups, in the same
// rank order on every call: the router never returns an index of -1 (which once wrote before a stack array).
TEST(MoeRoute, NanAndInfiniteScoresStillPickDistinctExpertsInRange) {
  const int E = 8, K = 3, G = 4, Lg = 2;
  const double nan = std::nan(""), inf = INFINITY;
  const std::vector<std::vector<double>> cases = {
      std::vector<double>(E, nan),                              // all NaN
      {nan, 0.3, nan, 0.1, 0.9, nan, nan, 0.2},                 // some NaN
      {inf, -inf, nan, inf, -inf, -inf, nan, 0.5},              // infinities and NaN
      std::vector<double>(E, -inf)};                            // all -inf
  for (size_t c = 0; c < cases.size(); ++c) {
    for (const bool with_bias : {false, true}) {
      const std::vector<double> bias = {0.1, nan, 0.0, -0.2, 0.0, 0.3, inf, 0.0};
      std::vector<double> sel(E), w(K);
      std::vector<int> idx(K, -7);
      moe_route::route_token(sel.data(), idx.data(), w.data(), cases[c].data(), with_bias ? bias.data() : nullptr,
                             E, K, G, Lg, 2.5, true);
      std::set<int> seen;
      for (int k = 0; k < K; ++k) {
        ASSERT_GE(idx[k], 0) << "case " << c;
        ASSERT_LT(idx[k], E) << "case " << c;
        seen.insert(idx[k]);
      }
      EXPECT_EQ(seen.size(), size_t(K)) << "case " << c << ": an expert chosen twice";
    }
  }
  // and the whole layer: NaN tokens run through without touching memory out of range (ASan build), output NaN
  const MoeConfig c = small_config();
  const int N = 5;
  auto p = moe_init_params<double>(c, 3);
  std::vector<double> x(size_t(N) * c.dim, nan), y(x.size());
  MoeHostSaved<double> hs(c, N);
  cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), c, N);
  for (int i = 0; i < N * c.n_activated_experts; ++i) {
    EXPECT_GE(hs.saved.indices[i], 0);
    EXPECT_LT(hs.saved.indices[i], c.n_routed_experts);
  }
  EXPECT_TRUE(std::isnan(y[0]));
}

// ---- config validation --------------------------------------------------------------------------

// Segmented needs bf16 products and multiples of 8; anything else is refused when the config is checked.
TEST(MoeConfig, SegmentedExpertsNeedBf16AndMultiplesOf8) {
  auto expect_moe_error = [](const MoeConfig& c, const std::string& what) {
    try {
      c.validate();
      ADD_FAILURE() << "no error: " << what;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  for (MoeExperts e : {MoeExperts::Segmented, MoeExperts::Hopper}) {  // the Hopper path has the same needs
    MoeConfig c = small_config(16, 4, 4, 2);
    c.dim = 64;
    c.moe_inter_dim = 48;
    c.experts = e;
    expect_moe_error(c, "matmul = BF16");
    c.matmul = Matmul::BF16;
    EXPECT_NO_THROW(c.validate());
    EXPECT_TRUE(segmented_experts_fit(c));
    c.moe_inter_dim = 44;
    expect_moe_error(c, "multiples of 8");
    EXPECT_FALSE(segmented_experts_fit(c));
  }
}

TEST(MoeConfig, RejectsInvalidConfigsNamingTheField) {
  auto expect_error = [](MoeConfig c, const std::string& field) {
    try {
      c.validate();
      ADD_FAILURE() << "no error for bad " << field;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  EXPECT_NO_THROW(small_config().validate());
  expect_error(small_config(8, 9, 1, 1), "n_activated_experts");   // K > E
  expect_error(small_config(8, 3, 3, 1), "n_expert_groups");       // 3 does not divide 8
  expect_error(small_config(8, 3, 4, 5), "n_limited_groups");      // more kept groups than groups
  expect_error(small_config(8, 5, 4, 2), "n_activated_experts");   // 5 > 2 groups * 2 experts
  expect_error(small_config(8, 1, 8, 1), "n_expert_groups");       // groups of one expert: no top-2
  MoeConfig c = small_config();
  c.dim = 0;
  expect_error(c, "dim");
  c = small_config();
  c.route_scale = 0.f;
  expect_error(c, "route_scale");
  c = small_config();
  c.n_shared_experts = -1;
  expect_error(c, "n_shared_experts");
  std::vector<float> x(7), y(7);
  MoeHostSaved<float> hs(small_config(), 1);
  auto p = moe_init_params<float>(small_config(), 1);
  EXPECT_THROW(cpu::moe_forward(y.data(), hs.saved, x.data(), p.weights(), small_config(8, 9, 1, 1), 1), UserError);
}

// ---- gradchecks ---------------------------------------------------------------------------------

struct GradCase {
  const char* name;
  MoeConfig c;
  int N;
  bool extra_scores_loss;  // also differentiate sum(Rs * scores) through dscores_extra (stage 04's path)
};

void PrintTo(const GradCase& g, std::ostream* os) { *os << g.name; }

class MoeGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(MoeGrad, GradcheckEveryParameterAndInput) {
  const GradCase& gc = GetParam();
  const MoeConfig& c = gc.c;
  const int N = gc.N, D = c.dim, E = c.n_routed_experts, K = c.n_activated_experts;
  Rng rng(7);
  auto p = params_with_bias<double>(c, 3);
  auto x = rng.normal_vec<double>(size_t(N) * D), R = rng.normal_vec<double>(size_t(N) * D);
  auto Rs = rng.normal_vec<double>(size_t(N) * E);
  MoeHostSaved<double> hs(c, N);
  auto loss = [&] {
    const auto y = run_forward(hs, x, p, c, N);
    double l = weighted_sum(y, R);
    if (gc.extra_scores_loss)
      for (size_t i = 0; i < Rs.size(); ++i) l += Rs[i] * hs.saved.scores[i];
    return l;
  };
  loss();
  auto g = moe_zero_params<double>(c);
  std::vector<double> dx(x.size());
  cpu::moe_backward(g.grads(), dx.data(), R.data(), gc.extra_scores_loss ? Rs.data() : nullptr, hs.saved, x.data(),
                    p.weights(), c, N);
  std::vector<GradTensor> tensors{{"inp", &x, &dx}};
  auto pt = p.tensors(), gt = g.tensors();
  for (size_t i = 0; i < pt.size(); ++i)
    if (!pt[i].second->empty()) tensors.push_back({pt[i].first, pt[i].second, gt[i].second});
  GradCheckOptions opt;
  opt.max_coords = 60;  // per tensor: keeps the test fast; the expert tensors have E*F*D entries
  opt.decision_signature = [&] { return hash_indices(hs.saved.indices, size_t(N) * K); };
  const auto r = gradcheck(loss, tensors, opt);
  EXPECT_GRADCHECK(r);
  EXPECT_LE(r.skipped, 5u) << "routing flips skipped: " << r.skipped;
}

INSTANTIATE_TEST_SUITE_P(
    Configs, MoeGrad,
    ::testing::Values(GradCase{"sigmoid_groups", small_config(8, 3, 4, 2), 10, false},
                      GradCase{"sigmoid_groups_extra_scores", small_config(8, 3, 4, 2), 10, true},
                      GradCase{"softmax", small_config(6, 2, 1, 1, 1, ScoreFunc::Softmax, 1.f), 10, true},
                      GradCase{"one_group", small_config(7, 3, 1, 1, 2), 10, false},
                      GradCase{"k_equals_e", small_config(4, 4, 2, 2), 10, false},
                      GradCase{"no_shared", small_config(6, 2, 3, 2, 0), 10, false},
                      GradCase{"one_token", small_config(8, 3, 4, 2), 1, false}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Moe, ParameterGradientsAccumulateInputGradientOverwrites) {
  const MoeConfig c = small_config();
  const int N = 6;
  Rng rng(8);
  auto p = params_with_bias<double>(c, 4);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim), dy = rng.normal_vec<double>(x.size());
  MoeHostSaved<double> hs(c, N);
  run_forward(hs, x, p, c, N);
  auto g1 = moe_zero_params<double>(c), g2 = moe_zero_params<double>(c);
  std::vector<double> dx1(x.size(), 5.0), dx2(x.size(), -2.0);
  cpu::moe_backward(g1.grads(), dx1.data(), dy.data(), nullptr, hs.saved, x.data(), p.weights(), c, N);
  for (int rep = 0; rep < 2; ++rep)
    cpu::moe_backward(g2.grads(), dx2.data(), dy.data(), nullptr, hs.saved, x.data(), p.weights(), c, N);
  expect_accumulates_and_overwrites(read_only(g1.tensors()), read_only(g2.tensors()), dx1, dx2);
}

// ---- oracles ------------------------------------------------------------------------------------

class MoeDense : public ::testing::TestWithParam<MoeConfig> {};

TEST_P(MoeDense, SparseEqualsDenseMaskedEvaluation) {
  const MoeConfig c = GetParam();
  const int N = 23;
  Rng rng(9);
  auto p = params_with_bias<double>(c, 5);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  MoeHostSaved<double> hs(c, N);
  const auto sparse = run_forward(hs, x, p, c, N);
  std::vector<double> dense(sparse.size());
  cpu::moe_forward_dense(dense.data(), x.data(), p.weights(), c, N);
  EXPECT_CLOSE(compare(sparse, dense, {1e-13, 1e-12}), "sparse vs dense");
}
INSTANTIATE_TEST_SUITE_P(Configs, MoeDense,
                         ::testing::Values(small_config(), small_config(6, 2, 1, 1, 1, ScoreFunc::Softmax, 1.f),
                                           small_config(4, 4, 2, 2), small_config(6, 2, 3, 2, 0),
                                           small_config(16, 4, 4, 2, 2)));

TEST(MoeRouting, BiasChangesTheChoiceButNeverTheWeights) {
  const MoeConfig c = small_config(16, 4, 4, 2);
  const int N = 40, K = c.n_activated_experts, E = c.n_routed_experts;
  Rng rng(10);
  auto p = moe_init_params<double>(c, 6);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  MoeHostSaved<double> plain(c, N), biased(c, N), shifted(c, N);
  run_forward(plain, x, p, c, N);
  for (int e = 0; e < E; ++e) p.gate_bias[e] = 0.3 * std::sin(1.7 * e);
  run_forward(biased, x, p, c, N);
  int changed = 0;
  for (int n = 0; n < N; ++n) {
    const int* idx = biased.saved.indices + size_t(n) * K;
    const double* s = biased.saved.scores + size_t(n) * E;
    changed += !std::equal(idx, idx + K, plain.saved.indices + size_t(n) * K);
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += s[idx[k]];
    for (int k = 0; k < K; ++k)  // the weights are the UNBIASED scores of the chosen experts, normalised
      EXPECT_NEAR(biased.saved.weights[size_t(n) * K + k], c.route_scale * s[idx[k]] / sum, 1e-15);
  }
  EXPECT_GT(changed, N / 4) << "the bias should change many choices";
  EXPECT_CLOSE(compare(biased.f.data(), plain.f.data(), size_t(N) * E, {0, 0}), "scores do not see the bias");
  // A bias equal for every expert shifts every selection score alike: same choice, bit-identical weights.
  std::fill(p.gate_bias.begin(), p.gate_bias.end(), 0.25);
  run_forward(shifted, x, p, c, N);
  EXPECT_EQ(std::vector<int>(shifted.saved.indices, shifted.saved.indices + N * K),
            std::vector<int>(plain.saved.indices, plain.saved.indices + N * K));
  EXPECT_CLOSE(compare(shifted.saved.weights, plain.saved.weights, size_t(N) * K, {0, 0}), "weights");
}

TEST(MoeRouting, GroupLimitingNeverPicksADroppedGroup) {
  const MoeConfig c = small_config(24, 5, 6, 2);
  const int N = 200, K = c.n_activated_experts, E = c.n_routed_experts, G = c.n_expert_groups,
            Eg = c.group_size();
  Rng rng(11);
  auto p = params_with_bias<double>(c, 7, 0.2);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  MoeHostSaved<double> hs(c, N);
  run_forward(hs, x, p, c, N);
  for (int n = 0; n < N; ++n) {
    // independent recomputation: group score = sum of its two largest biased scores; keep the best 2
    std::vector<std::pair<double, int>> gs;
    for (int g = 0; g < G; ++g) {
      std::vector<double> v;
      for (int j = 0; j < Eg; ++j) v.push_back(hs.saved.scores[size_t(n) * E + g * Eg + j] + p.gate_bias[g * Eg + j]);
      std::sort(v.rbegin(), v.rend());
      gs.push_back({-(v[0] + v[1]), g});
    }
    std::sort(gs.begin(), gs.end());
    const std::set<int> kept{gs[0].second, gs[1].second};
    for (int k = 0; k < K; ++k) {
      const int e = hs.saved.indices[size_t(n) * K + k];
      EXPECT_TRUE(kept.count(e / Eg)) << "token " << n << " expert " << e << " from a dropped group";
    }
    for (int e = 0; e < E; ++e)
      EXPECT_EQ(std::isinf(hs.saved.sel[size_t(n) * E + e]), !kept.count(e / Eg)) << "sel masks dropped groups";
  }
}

TEST(MoeRouting, HandWorkedExample) {
  // D = 1, x = 1: the logits are the gate weights. E = 4 in 2 groups {0,1}, {2,3}; keep 1 group; K = 2.
  MoeConfig c = small_config(4, 2, 2, 1, 0, ScoreFunc::Sigmoid, 2.0f);
  c.dim = 1;
  auto p = moe_init_params<double>(c, 1);
  p.gate_weight = {2.0, -1.0, 0.5, 0.4};  // s = sig(.): .881, .269, .622, .599
  p.gate_bias = {-1.0, 0.0, 0.0, 0.0};    // biased: -.119, .269, .622, .599
  // group scores (top-2 sums): g0 = .150, g1 = 1.221 -> keep g1 although expert 0 has the best score
  const std::vector<double> x{1.0};
  MoeHostSaved<double> hs(c, 1);
  run_forward(hs, x, p, c, 1);
  auto sig = [](double z) { return 1 / (1 + std::exp(-z)); };
  EXPECT_EQ(hs.saved.indices[0], 2);
  EXPECT_EQ(hs.saved.indices[1], 3);
  const double s2 = sig(0.5), s3 = sig(0.4);
  EXPECT_NEAR(hs.saved.weights[0], 2.0 * s2 / (s2 + s3), 1e-15);
  EXPECT_NEAR(hs.saved.weights[1], 2.0 * s3 / (s2 + s3), 1e-15);
  EXPECT_EQ(hs.saved.counts[0] + hs.saved.counts[1], 0);
  EXPECT_TRUE(std::isinf(hs.saved.sel[0]) && std::isinf(hs.saved.sel[1]));
}

TEST(MoeRouting, TiesGoToTheLowerIndex) {
  MoeConfig c = small_config(8, 3, 4, 2);
  auto p = moe_init_params<double>(c, 2);
  std::fill(p.gate_weight.begin(), p.gate_weight.end(), 0.0);  // every score 0.5: all tied
  const int N = 3;
  std::vector<double> x(size_t(N) * c.dim, 1.0);
  MoeHostSaved<double> hs(c, N);
  run_forward(hs, x, p, c, N);
  for (int n = 0; n < N; ++n)  // groups 0 and 1 kept, experts 0, 1, 2 chosen, weights 2.5/3 each
    for (int k = 0; k < 3; ++k) {
      EXPECT_EQ(hs.saved.indices[n * 3 + k], k);
      EXPECT_NEAR(hs.saved.weights[n * 3 + k], 2.5 / 3, 1e-15);
    }
}

TEST(MoeRouting, SoftmaxScoresAreNotRenormalised) {
  const MoeConfig c = small_config(6, 2, 1, 1, 1, ScoreFunc::Softmax, 1.5f);
  const int N = 9, K = 2, E = 6;
  Rng rng(12);
  auto p = moe_init_params<double>(c, 8);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  MoeHostSaved<double> hs(c, N);
  run_forward(hs, x, p, c, N);
  for (int n = 0; n < N; ++n) {
    double total = 0;
    for (int e = 0; e < E; ++e) total += hs.saved.scores[n * E + e];
    EXPECT_NEAR(total, 1.0, 1e-14);  // softmax over E
    double wsum = 0;
    for (int k = 0; k < K; ++k) {
      EXPECT_DOUBLE_EQ(hs.saved.weights[n * K + k], 1.5 * hs.saved.scores[n * E + hs.saved.indices[n * K + k]]);
      wsum += hs.saved.weights[n * K + k];
    }
    EXPECT_LT(wsum, 1.5 - 1e-6);  // a K-of-E share of the softmax mass, not renormalised to route_scale
  }
}

TEST(MoeDispatch, PermutationIsAStableSortByExpert) {
  const MoeConfig c = small_config(8, 3, 4, 2);
  const int N = 31, NK = N * 3, E = 8;
  Rng rng(13);
  auto p = params_with_bias<double>(c, 9);
  auto x = rng.normal_vec<double>(size_t(N) * c.dim);
  MoeHostSaved<double> hs(c, N);
  run_forward(hs, x, p, c, N);
  const auto& s = hs.saved;
  EXPECT_EQ(s.offsets[0], 0);
  EXPECT_EQ(s.offsets[E], NK);
  for (int e = 0; e < E; ++e) {
    EXPECT_EQ(s.offsets[e + 1] - s.offsets[e], s.counts[e]);
    for (int r = s.offsets[e]; r < s.offsets[e + 1]; ++r) {
      EXPECT_EQ(s.indices[s.perm[r]], e);
      if (r > s.offsets[e]) {
        EXPECT_LT(s.perm[r - 1], s.perm[r]);  // stable: slot order within an expert
      }
    }
  }
  for (int i = 0; i < NK; ++i) EXPECT_EQ(s.perm[s.slot_row[i]], i);
}

TEST(MoeEdge, ExpertWithNoTokenGetsNoGradient) {
  const MoeConfig c = small_config(8, 3, 4, 2);
  const int N = 12, D = c.dim, F = c.moe_inter_dim;
  Rng rng(14);
  auto p = moe_init_params<double>(c, 10);
  p.gate_bias[5] = -100.0;  // expert 5 is never chosen (its group can still be kept through expert 4)
  auto x = rng.normal_vec<double>(size_t(N) * D), dy = rng.normal_vec<double>(x.size());
  MoeHostSaved<double> hs(c, N);
  const auto y = run_forward(hs, x, p, c, N);
  EXPECT_EQ(hs.saved.counts[5], 0);
  std::vector<double> dense(y.size());
  cpu::moe_forward_dense(dense.data(), x.data(), p.weights(), c, N);
  EXPECT_CLOSE(compare(y, dense, {1e-13, 1e-12}), "sparse vs dense with an idle expert");
  auto g = moe_zero_params<double>(c);
  std::vector<double> dx(x.size());
  cpu::moe_backward(g.grads(), dx.data(), dy.data(), nullptr, hs.saved, x.data(), p.weights(), c, N);
  for (size_t i = 0; i < size_t(F) * D; ++i) {
    EXPECT_EQ(g.w1[5 * F * D + i], 0.0);
    EXPECT_EQ(g.w3[5 * F * D + i], 0.0);
    EXPECT_EQ(g.w2[5 * D * F + i], 0.0);
  }
  for (int d = 0; d < D; ++d) EXPECT_EQ(g.gate_weight[5 * D + d], 0.0);  // never chosen: no score gradient
}

TEST(MoeEdge, ZeroTokensIsANoOp) {
  const MoeConfig c = small_config();
  auto p = moe_init_params<double>(c, 1);
  MoeHostSaved<double> hs(c, 0);
  std::vector<double> none;
  EXPECT_NO_THROW(cpu::moe_forward(none.data(), hs.saved, none.data(), p.weights(), c, 0));
}

// ---- CUDA vs CPU --------------------------------------------------------------------------------

// ---- dense MLP (the public API the full model and MTP blocks use) -------------------------------------

TEST(Mlp, GradcheckWeightsAndInput) {
  const int D = 7, F = 5, N = 9;
  Rng rng(31);
  auto p = mlp_init_params<double>({D, F}, 32);
  auto x = rng.normal_vec<double>(size_t(N) * D), R = rng.normal_vec<double>(x.size());
  std::vector<double> y(x.size()), h1(size_t(N) * F), h3(h1.size());
  auto loss = [&] {
    cpu::mlp_forward(y.data(), h1.data(), h3.data(), x.data(), p.weights(), MlpConfig{D, F}, N);
    return weighted_sum(y, R);
  };
  loss();
  auto g = mlp_zero_params<double>({D, F});
  std::vector<double> dx(x.size(), 99.0);  // overwritten
  cpu::mlp_backward(g.grads(), dx.data(), R.data(), h1.data(), h3.data(), x.data(), p.weights(), MlpConfig{D, F}, N);
  std::vector<GradTensor> tensors{{"inp", &x, &dx}};
  auto pt = p.tensors(), gt = g.tensors();
  for (size_t i = 0; i < pt.size(); ++i) tensors.push_back({pt[i].first, pt[i].second, gt[i].second});
  EXPECT_GRADCHECK(gradcheck(loss, tensors));
}

TEST(Mlp, EqualsAMoeWithOnlyItsSharedExpert) {
  // A MoE's shared experts are one dense MLP of width Es*F: with zero routed weights the MoE is exactly it.
  MoeConfig c = small_config(4, 2, 2, 1, 2);
  const int N = 6, D = c.dim, Fs = c.shared_inter_dim();
  auto mp = moe_init_params<double>(c, 33);
  for (auto* v : {&mp.w1, &mp.w2, &mp.w3}) std::fill(v->begin(), v->end(), 0.0);
  Rng rng(34);
  auto x = rng.normal_vec<double>(size_t(N) * D);
  MoeHostSaved<double> hs(c, N);
  const auto ref = run_forward(hs, x, mp, c, N);
  std::vector<double> y(x.size()), h1(size_t(N) * Fs), h3(h1.size());
  cpu::mlp_forward(y.data(), h1.data(), h3.data(), x.data(), MlpWeights<double>{mp.shared_w1.data(),
                   mp.shared_w2.data(), mp.shared_w3.data()}, MlpConfig{D, Fs}, N);
  EXPECT_CLOSE(compare(y, ref, {1e-12, 1e-12}), "mlp vs shared-only moe");
}

TEST(Mlp, RejectsBadShapes) {
  MlpWeights<double> w{};
  EXPECT_THROW(cpu::mlp_forward<double>(nullptr, nullptr, nullptr, nullptr, w, MlpConfig{0, 4}, 1), UserError);
  EXPECT_THROW(cpu::mlp_forward<double>(nullptr, nullptr, nullptr, nullptr, w, MlpConfig{4, 0}, 1), UserError);
}

#ifdef DSV3_HAVE_CUDA
struct CudaCase {
  const char* name;
  MoeConfig c;
  int N;
  bool idle_expert;  // push expert 1's bias down so that it receives no token
};

MoeConfig cuda_config(int D, int F, int E, int K, int G, int Lg, int Es, ScoreFunc f = ScoreFunc::Sigmoid) {
  MoeConfig c = small_config(E, K, G, Lg, Es, f, 2.5f);
  c.dim = D;
  c.moe_inter_dim = F;
  return c;
}

void PrintTo(const CudaCase& g, std::ostream* os) { *os << g.name; }

class CudaMoe : public ::testing::TestWithParam<CudaCase> {};

TEST_P(CudaMoe, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  const CudaCase& cc = GetParam();
  const MoeConfig& c = cc.c;
  const int N = cc.N, D = c.dim, E = c.n_routed_experts, K = c.n_activated_experts;
  Rng rng(20);
  auto p = params_with_bias<float>(c, 21);
  if (cc.idle_expert) p.gate_bias[1] = -100.f;
  auto x = rng.normal_vec<float>(size_t(N) * D), dy = rng.normal_vec<float>(x.size());
  make_routing_exact(x, p);
  auto dse = rng.normal_vec<float>(size_t(N) * E, 0.1);
  auto g0 = params_with_bias<float>(c, 22);  // nonzero starting gradients: checks +=
  // CPU reference (fp32)
  MoeHostSaved<float> hs(c, N);
  const auto y = run_forward(hs, x, p, c, N);
  auto g = g0;
  std::vector<float> dx(x.size());
  cpu::moe_backward(g.grads(), dx.data(), dy.data(), dse.data(), hs.saved, x.data(), p.weights(), c, N);
  // CUDA
  MoeDeviceParams dp(p), dg(g0);
  MoeDeviceSaved ds(c, N);
  ds.f.poison();
  DeviceBuffer<float> gx(x), gdy(dy), gdse(dse), gy(x.size()), gdx(x.size());
  gy.poison();
  gdx.poison();
  cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N);
  cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), gdse.get(), ds.saved, gx.get(), dp.weights(), c, N);
  const std::vector<int> gi = ds.i.download();
  const std::vector<float> gf = ds.f.download();
  // routing and dispatch: bit-identical (same code, same tie rule)
  EXPECT_EQ(gi, hs.i) << "indices / counts / offsets / perm differ";
  EXPECT_CLOSE(compare(gf.data(), hs.saved.scores, size_t(N) * E, kReductionTol), "scores");
  const size_t weights_at = size_t(hs.saved.weights - hs.f.data());  // the field's place in the layout
  EXPECT_CLOSE(compare(gf.data() + weights_at, hs.saved.weights, size_t(N) * K, kReductionTol), "weights");
  EXPECT_CLOSE(compare(gy.download(), y, kReductionTol), "out");
  EXPECT_CLOSE(compare(gdx.download(), dx, kReductionTol), "dinp");
  // parameter gradients sum over up to N tokens in another order: atol grows like sqrt(N) (as in stage 01)
  MoeParams<float> got = g0;
  dg.download(got);
  auto tg = got.tensors(), tr = g.tensors();
  for (size_t i = 0; i < tg.size(); ++i)
    EXPECT_CLOSE(compare(*tg[i].second, *tr[i].second, {1e-5 * std::sqrt(double(N)), 1e-4}), tg[i].first);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoe,
    ::testing::Values(CudaCase{"small", cuda_config(7, 5, 8, 3, 4, 2, 1), 10, false},
                      CudaCase{"one_token", cuda_config(7, 5, 8, 3, 4, 2, 1), 1, false},
                      CudaCase{"idle_expert", cuda_config(33, 17, 8, 2, 2, 1, 1), 40, true},
                      CudaCase{"softmax_no_shared", cuda_config(33, 17, 6, 2, 1, 1, 0, ScoreFunc::Softmax), 37, false},
                      CudaCase{"k_equals_e", cuda_config(16, 8, 4, 4, 1, 1, 2), 29, false},
                      CudaCase{"v3_like_routing", cuda_config(128, 64, 64, 8, 8, 4, 1), 700, false}),
    [](const auto& info) { return std::string(info.param.name); });

// The GPU decode forms (cuda::moe_rows / mlp_rows) against the CPU ones, and bitwise row independence: all N rows
// in one call equal N calls of one row.
class CudaMoeRows : public ::testing::TestWithParam<CudaCase> {};

TEST_P(CudaMoeRows, MatchCpuRowsAndAreRowInvariant) {
  DSV3_REQUIRE_GPU();
  const CudaCase& cc = GetParam();
  const MoeConfig& c = cc.c;
  const int N = std::min(cc.N, 64), D = c.dim;
  Rng rng(30);
  auto p = params_with_bias<float>(c, 31);
  if (cc.idle_expert) p.gate_bias[1] = -100.f;
  auto x = rng.normal_vec<float>(size_t(N) * D);
  make_routing_exact(x, p);
  const MlpConfig mc{D, c.moe_inter_dim};
  const MlpParams<float> mp{p.w1, p.w2, p.w3};  // expert 0's first rows as an MLP of the same sizes
  const MlpWeights<float> mw{mp.w1.data(), mp.w2.data(), mp.w3.data()};
  FfnRowsScratch<float> scratch;
  std::vector<float> want(x.size()), want_mlp(x.size());
  cpu::moe_rows(want.data(), x.data(), p.weights(), c, N, scratch);
  cpu::mlp_rows(want_mlp.data(), x.data(), mw, mc, N, scratch);
  MoeDeviceParams dp(p);
  DeviceBuffer<float> d1(mp.w1), d2(mp.w2), d3(mp.w3), gx(x), all(x.size()), one{size_t(D)};
  const MlpWeights<float> dmw{d1.get(), d2.get(), d3.get()};
  for (bool moe : {true, false}) {
    auto run = [&](float* out, const float* in, int n) {
      if (moe)
        cuda::moe_rows(out, in, dp.weights(), c, n);
      else
        cuda::mlp_rows(out, in, dmw, mc, n);
    };
    all.poison();
    run(all.get(), gx.get(), N);
    const std::vector<float> got = all.download();
    EXPECT_CLOSE(compare(got, moe ? want : want_mlp, kReductionTol), moe ? "moe_rows" : "mlp_rows");
    std::vector<float> rows;
    for (int t = 0; t < N; ++t) {
      one.poison();
      run(one.get(), gx.get() + size_t(t) * D, 1);
      const auto r = one.download();
      rows.insert(rows.end(), r.begin(), r.end());
    }
    EXPECT_TRUE(rows == got) << (moe ? "moe_rows" : "mlp_rows") << ": N rows at once differ from N single rows";
  }
  // version 2 (moe_rows_fused / mlp_rows_fused): x += FFN(x * rstd * g) against the CPU rows of the normalised x,
  // and the same bitwise row invariance (bitwise version 1: stage 07's CudaSamplerPaths, end to end)
  const float eps = 1e-6f;
  const std::vector<float> g = rng.normal_vec<float>(size_t(D));
  std::vector<float> xn(x.size());
  for (int t = 0; t < N; ++t) {
    double ss = 0;
    for (int j = 0; j < D; ++j) ss += double(x[size_t(t) * D + j]) * x[size_t(t) * D + j];
    const double rstd = 1 / std::sqrt(ss / D + eps);
    for (int j = 0; j < D; ++j) xn[size_t(t) * D + j] = float(x[size_t(t) * D + j] * rstd * g[j]);
  }
  std::vector<float> want_f(x.size()), want_fm(x.size());
  cpu::moe_rows(want_f.data(), xn.data(), p.weights(), c, N, scratch);
  cpu::mlp_rows(want_fm.data(), xn.data(), mw, mc, N, scratch);
  for (size_t i = 0; i < x.size(); ++i) {
    want_f[i] += x[i];
    want_fm[i] += x[i];
  }
  const DeviceBuffer<float> dg(g);
  DeviceBuffer<float> ws(std::max(cuda::moe_rows_workspace_floats(c, N), cuda::mlp_rows_workspace_floats(mc, N)));
  DeviceBuffer<int> iws(size_t(N) * c.n_activated_experts);
  for (bool moe : {true, false}) {
    auto run = [&](DeviceBuffer<float>& xb, int n) {
      ws.poison();
      if (moe)
        cuda::moe_rows_fused(xb.get(), dg.get(), eps, dp.weights(), c, n, ws.get(), iws.get());
      else
        cuda::mlp_rows_fused(xb.get(), dg.get(), eps, dmw, mc, n, ws.get());
    };
    DeviceBuffer<float> xb(x);
    run(xb, N);
    const std::vector<float> got = xb.download();
    EXPECT_CLOSE(compare(got, moe ? want_f : want_fm, kReductionTol), moe ? "moe_rows_fused" : "mlp_rows_fused");
    std::vector<float> rows;
    for (int t = 0; t < N; ++t) {
      DeviceBuffer<float> xr(std::vector<float>(x.begin() + size_t(t) * D, x.begin() + size_t(t + 1) * D));
      run(xr, 1);
      const auto r = xr.download();
      rows.insert(rows.end(), r.begin(), r.end());
    }
    EXPECT_TRUE(rows == got) << (moe ? "moe_rows_fused" : "mlp_rows_fused") << ": N rows differ from N single rows";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoeRows,
    ::testing::Values(CudaCase{"small", cuda_config(7, 5, 8, 3, 4, 2, 1), 10, false},
                      CudaCase{"idle_expert", cuda_config(33, 17, 8, 2, 2, 1, 1), 40, true},
                      CudaCase{"softmax_no_shared", cuda_config(33, 17, 6, 2, 1, 1, 0, ScoreFunc::Softmax), 37, false},
                      CudaCase{"k_equals_e", cuda_config(16, 8, 4, 4, 1, 1, 2), 29, false},
                      CudaCase{"v3_like_routing", cuda_config(128, 64, 64, 8, 8, 4, 1), 700, false}),
    [](const auto& info) { return std::string(info.param.name); });

// The segmented bf16 expert path (moe_experts_bf16.cu) against the fp32 grouped path it replaces, on the same
// weights and tokens (routing made exact, so both choose the same experts: the router is fp32 in both). An odd
// token count and an idle expert give empty segments and unaligned segment starts. Tolerance: bf16 keeps 8
// significant bits, so each operand is off by up to 2^-9 ~ 2e-3 relative and a product of n terms by about that
// much on average (the errors are independent): a normalised error of a few 1e-3; we require 1e-2 (and find
// ~3e-3).
// Runs one forward and backward of the layer (routing made exact) for the expert-path tests below.
struct ExpertPathRun {
  std::vector<float> y, dx;
  std::vector<int> ints;
  MoeParams<float> g;
};
ExpertPathRun run_expert_path(const MoeConfig& c, const MoeParams<float>& p, const MoeParams<float>& g0,
                              const std::vector<float>& x, const std::vector<float>& dy, int N) {
  MoeDeviceParams dp(p), dg(g0);
  MoeDeviceSaved ds(c, N);
  ds.f.poison();
  DeviceBuffer<float> gx(x), gdy(dy), gy(x.size()), gdx(x.size());
  gy.poison();
  gdx.poison();
  cuda::moe_forward(gy.get(), ds.saved, gx.get(), dp.weights(), c, N);
  cuda::moe_backward(dg.grads(), gdx.get(), gdy.get(), nullptr, ds.saved, gx.get(), dp.weights(), c, N);
  ExpertPathRun r{gy.download(), gdx.download(), ds.i.download(), g0};
  dg.download(r.g);
  return r;
}

// Every output and gradient of two runs within a normalised error (the element bounds off); `loose` names the
// tensors held to loose_tol instead (empty: none).
void expect_runs_close(const ExpertPathRun& got, const ExpertPathRun& ref, double tol, const std::string& what,
                       const std::vector<std::string>& loose = {}, double loose_tol = 0) {
  EXPECT_EQ(got.ints, ref.ints) << what << ": routing or dispatch differs";
  auto close = [&](const std::vector<float>& a, const std::vector<float>& b, const std::string& name) {
    const CompareResult r = compare(a, b, {1e30, 1e30});
    const bool is_loose = std::find(loose.begin(), loose.end(), name) != loose.end();
    EXPECT_LT(r.norm_err, is_loose ? loose_tol : tol) << what << ", " << name << ": " << r.summary();
  };
  close(got.y, ref.y, "out");
  close(got.dx, ref.dx, "dinp");
  MoeParams<float> gg = got.g, gr = ref.g;
  auto tg = gg.tensors(), tr = gr.tensors();
  ASSERT_EQ(tg.size(), tr.size());
  for (size_t i = 0; i < tg.size(); ++i) close(*tg[i].second, *tr[i].second, tg[i].first);
}

// The layer of the two tests below: an odd token count and an idle expert (empty segments, unaligned starts).
struct ExpertPathCase {
  MoeConfig c32 = cuda_config(64, 48, 16, 4, 4, 2, 1);
  int N = 301;
  MoeParams<float> p, g0;
  std::vector<float> x, dy;
  ExpertPathCase() : p(params_with_bias<float>(c32, 41)), g0(params_with_bias<float>(c32, 42)) {
    Rng rng(40);
    p.gate_bias[3] = -100.f;  // expert 3 never chosen: an empty segment
    x = rng.normal_vec<float>(size_t(N) * c32.dim);
    dy = rng.normal_vec<float>(x.size());
    make_routing_exact(x, p);  // g0 nonzero: checks +=
  }
  MoeConfig bf16(MoeExperts e) const {
    MoeConfig c = c32;
    c.matmul = Matmul::BF16;
    c.experts = e;
    return c;
  }
  ExpertPathRun run(const MoeConfig& c) const { return run_expert_path(c, p, g0, x, dy, N); }
};

// The segmented bf16 expert path (moe_experts_bf16.cu) against the fp32 grouped path it replaces, on the same
// weights and tokens (routing made exact, so both choose the same experts: the router is fp32 in both).
// Tolerance: bf16 keeps 8 significant bits, so each operand is off by up to 2^-9 ~ 2e-3 relative and a product of
// n terms by about that much on average (the errors are independent): a normalised error of a few 1e-3; we
// require 1e-2 (and find ~3e-3).
TEST(CudaMoeExpertsBf16, MatchesTheFp32GroupedPath) {
  DSV3_REQUIRE_GPU();
  const ExpertPathCase t;
  expect_runs_close(t.run(t.bf16(MoeExperts::Segmented)), t.run(t.c32), 1e-2, "segmented vs fp32");
}

// The Hopper path (moe_experts_hopper.cu: every product on wgmma, transposed weight copies, tokens read through
// the dispatch permutation or from a gathered copy, the shared experts on wgmma or cuBLAS) against the fp32 grouped
// path (as above) and against the segmented path, version 1. The routed experts see the same bf16 operands in
// both, only the order of the fp32 sums differs: their weight gradients and the router's agree to ~1e-6 (we
// require 1e-5). The segmented path runs the shared experts on cuBLAS, whose bf16 setting (FAST_16BF) chose TF32
// kernels for these shapes (more mantissa than bf16): with the shared experts on wgmma (bf16), out, dinp and their
// gradients differ at bf16's level (~2e-3 measured), so they are held to 1e-2 there, to 1e-5 otherwise.
TEST(CudaMoeExpertsHopper, MatchesTheFp32GroupedPathAndVersion1) {
  DSV3_REQUIRE_GPU();
  if (!hopper_experts_available())
    GTEST_SKIP() << "no wgmma here (needs a compute capability 9.0 GPU and a build for sm_90a)";
  const ExpertPathCase t;
  const ExpertPathRun fp32 = t.run(t.c32), v1 = t.run(t.bf16(MoeExperts::Segmented));
  const cuda::HopperMoeOptions keep = cuda::hopper_moe_options();
  for (bool gather : {true, false})
    for (bool shared : {true, false}) {
      cuda::set_hopper_moe_options({gather, !gather, shared});
      const std::string what = fmt::format("hopper (forward gathers {}, backward gathers {}, shared on wgmma {})",
                                           gather, !gather, shared);
      const ExpertPathRun got = t.run(t.bf16(MoeExperts::Hopper));
      expect_runs_close(got, fp32, 1e-2, what + " vs fp32");
      const std::vector<std::string> bf16_level = {"out", "dinp", "shared.w1", "shared.w2", "shared.w3"};
      expect_runs_close(got, v1, 1e-5, what + " vs segmented", shared ? bf16_level : std::vector<std::string>{},
                        1e-2);
    }
  cuda::set_hopper_moe_options(keep);
}

TEST(CudaMoeErrors, RejectsBadConfig) {
  DSV3_REQUIRE_GPU();
  const MoeConfig bad = small_config(8, 9, 1, 1);
  MoeDeviceSaved ds(small_config(), 1);
  DeviceBuffer<float> x(7), y(7);
  MoeWeights<float> w{};
  EXPECT_THROW(cuda::moe_forward(y.get(), ds.saved, x.get(), w, bad, 1), UserError);
}

TEST(CudaMlp, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  const int D = 33, F = 17, N = 45;
  Rng rng(35);
  auto p = mlp_init_params<float>({D, F}, 36), g0 = mlp_init_params<float>({D, F}, 37);  // g0 != 0: checks +=
  auto x = rng.normal_vec<float>(size_t(N) * D), dy = rng.normal_vec<float>(x.size());
  std::vector<float> y(x.size()), h1(size_t(N) * F), h3(h1.size()), dx(x.size());
  cpu::mlp_forward(y.data(), h1.data(), h3.data(), x.data(), p.weights(), MlpConfig{D, F}, N);
  auto g = g0;
  cpu::mlp_backward(g.grads(), dx.data(), dy.data(), h1.data(), h3.data(), x.data(), p.weights(), MlpConfig{D, F}, N);
  DeviceBuffer<float> w1(p.w1), w2(p.w2), w3(p.w3), d1(g0.w1), d2(g0.w2), d3(g0.w3), gx(x), gdy(dy);
  DeviceBuffer<float> gy(y.size()), gh1(h1.size()), gh3(h3.size()), gdx(dx.size());
  for (auto* b : {&gy, &gh1, &gh3, &gdx}) b->poison();
  const MlpWeights<float> w{w1.get(), w2.get(), w3.get()};
  cuda::mlp_forward(gy.get(), gh1.get(), gh3.get(), gx.get(), w, MlpConfig{D, F}, N);
  cuda::mlp_backward({d1.get(), d2.get(), d3.get()}, gdx.get(), gdy.get(), gh1.get(), gh3.get(), gx.get(), w,
                     MlpConfig{D, F}, N);
  EXPECT_CLOSE(compare(gy.download(), y, kReductionTol), "out");
  EXPECT_CLOSE(compare(gh1.download(), h1, kReductionTol), "h1");
  EXPECT_CLOSE(compare(gdx.download(), dx, kReductionTol), "dinp");
  // weight gradients sum over N rows in another order: atol grows like sqrt(N) (as CudaMoe above)
  const Tolerance tw{1e-5 * std::sqrt(double(N)), 1e-4};
  EXPECT_CLOSE(compare(d1.download(), g.w1, tw), "w1");
  EXPECT_CLOSE(compare(d2.download(), g.w2, tw), "w2");
  EXPECT_CLOSE(compare(d3.download(), g.w3, tw), "w3");
}
#else
TEST(CudaMoe, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
