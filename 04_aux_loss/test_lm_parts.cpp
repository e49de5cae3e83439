// Tests of the LM training parts: gradchecks of embedding and cross-entropy, ignored targets, AdamW by hand.
#include <cmath>

#include "04_aux_loss/lm_parts.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

TEST(Embedding, GradcheckWeightWithRepeatedTokens) {
  const int N = 7, D = 5, V = 4;
  Rng rng(1);
  const std::vector<int> tokens = {0, 3, 3, 1, 0, 2, 3};
  auto wte = rng.normal_vec<double>(V * D), R = rng.normal_vec<double>(N * D);
  std::vector<double> out(N * D), dwte(V * D, 0.0);
  cpu::embedding_backward(dwte.data(), R.data(), tokens.data(), N, D, V);
  auto loss = [&] {
    cpu::embedding_forward(out.data(), tokens.data(), wte.data(), N, D, V);
    return weighted_sum(out, R);
  };
  EXPECT_GRADCHECK(gradcheck(loss, {{"wte", &wte, &dwte}}));
}

TEST(Embedding, RejectsTokensOutsideVocabulary) {
  std::vector<float> wte(8), out(4);
  const std::vector<int> bad = {0, 4};
  EXPECT_THROW(cpu::embedding_forward(out.data(), bad.data(), wte.data(), 2, 2, 4), UserError);
}

TEST(CrossEntropy, GradcheckLogitsWithIgnoredTargets) {
  const int N = 5, V = 7;
  Rng rng(2);
  auto logits = rng.normal_vec<double>(N * V, 2.0);
  const std::vector<int> targets = {3, kIgnoreTarget, 0, 6, kIgnoreTarget};
  std::vector<double> probs(N * V), dlogits(N * V);
  cpu::cross_entropy_forward(probs.data(), logits.data(), targets.data(), N, V);
  const double dloss = 0.7;
  cpu::cross_entropy_backward(dlogits.data(), dloss, probs.data(), targets.data(), N, V);
  auto loss = [&] { return dloss * cpu::cross_entropy_forward(probs.data(), logits.data(), targets.data(), N, V); };
  EXPECT_GRADCHECK(gradcheck(loss, {{"logits", &logits, &dlogits}}));
  for (int v = 0; v < V; ++v) EXPECT_EQ(dlogits[1 * V + v], 0.0);  // ignored rows get no gradient
}

TEST(CrossEntropy, UniformLogitsGiveLogV) {
  const int N = 3, V = 11;
  std::vector<double> logits(N * V, 0.25), probs(N * V);
  const std::vector<int> targets = {1, 5, 10};
  EXPECT_NEAR(cpu::cross_entropy_forward(probs.data(), logits.data(), targets.data(), N, V), std::log(11.0), 1e-14);
  const std::vector<int> none = {kIgnoreTarget, kIgnoreTarget, kIgnoreTarget};
  EXPECT_EQ(cpu::cross_entropy_forward(probs.data(), logits.data(), none.data(), N, V), 0.0);
}

// The output end, with an MTP-like extra gradient at z: norm and head gradients accumulate, dh overwrites
// (common/conventions.h), and dz_extra reaches dh through the norm (it changes dh).
TEST(LmHead, ParameterGradientsAccumulateInputGradientOverwrites) {
  const int N = 4, D = 6, V = 9;
  Rng rng(3);
  auto h = rng.normal_vec<double>(N * D), norm = rng.normal_vec<double>(D, 0.2, 1.0);
  auto head = rng.normal_vec<double>(V * D), dz_extra = rng.normal_vec<double>(N * D);
  const std::vector<int> targets = {2, kIgnoreTarget, 8, 0};
  std::vector<double> logits(N * V), probs(N * V), z(N * D), zrstd(N);
  cpu::lm_head_forward(logits.data(), probs.data(), z.data(), zrstd.data(), h.data(), norm.data(), head.data(),
                       targets.data(), N, D, V, 1e-6f);
  std::vector<double> dn1(D, 0.0), dh1(V * D, 0.0), dx1(N * D, 5.0), dn2(D, 0.0), dh2(V * D, 0.0), dx2(N * D, -1.0);
  auto backward = [&](std::vector<double>& dn, std::vector<double>& dhd, std::vector<double>& dx,
                      const double* extra) {
    cpu::lm_head_backward(dn.data(), dhd.data(), dx.data(), 1.0, extra, probs.data(), z.data(), zrstd.data(),
                          h.data(), norm.data(), head.data(), targets.data(), N, D, V);
  };
  backward(dn1, dh1, dx1, dz_extra.data());
  backward(dn2, dh2, dx2, dz_extra.data());
  backward(dn2, dh2, dx2, dz_extra.data());
  expect_accumulates_and_overwrites<double>({{"dnorm", &dn1}, {"dhead", &dh1}}, {{"dnorm", &dn2}, {"dhead", &dh2}},
                                            dx1, dx2, "dh");
  std::vector<double> dn3(D, 0.0), dh3(V * D, 0.0), dx3(N * D);
  backward(dn3, dh3, dx3, nullptr);
  EXPECT_GT(compare(dx3, dx1, {1e-6, 1e-6}).n_bad, 0u) << "dz_extra did not reach dh";
}

TEST(AdamW, FirstStepByHand) {
  // Step 1: m = (1-b1) g, v = (1-b2) g^2, bias-corrected mhat = g, vhat = g^2: p -= lr*wd*p + lr*g/(|g|+eps).
  AdamWConfig c;
  c.lr = 0.1f;
  c.weight_decay = 0.5f;
  std::vector<double> p = {1.0, -2.0}, g = {0.3, -4.0}, m(2, 0.0), v(2, 0.0);
  cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), 2, 1, c, true);
  EXPECT_NEAR(p[0], 1.0 - 0.1 * 0.5 * 1.0 - 0.1 * 0.3 / (0.3 + 1e-8), 1e-7);
  EXPECT_NEAR(p[1], -2.0 + 0.1 * 0.5 * 2.0 + 0.1 * 4.0 / (4.0 + 1e-8), 1e-7);
  std::vector<double> q = {1.0}, gq = {0.3}, mq(1, 0.0), vq(1, 0.0);
  cpu::adamw_step(q.data(), gq.data(), mq.data(), vq.data(), 1, 1, c, false);  // no decay
  EXPECT_NEAR(q[0], 1.0 - 0.1, 1e-7);
}

#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"

TEST(CudaLmParts, EmbeddingCrossEntropyAdamWMatchCpu) {
  DSV3_REQUIRE_GPU();
  const int N = 37, D = 19, V = 301;
  Rng rng(5);
  std::vector<int> tokens(N), targets(N);
  for (int n = 0; n < N; ++n) {
    tokens[n] = static_cast<int>(rng.below(V));
    targets[n] = n % 7 == 3 ? kIgnoreTarget : static_cast<int>(rng.below(V));
  }
  tokens[5] = tokens[9] = tokens[20];  // repeated tokens accumulate
  auto wte = rng.normal_vec<float>(V * D), dout = rng.normal_vec<float>(N * D), logits = rng.normal_vec<float>(N * V, 3.0);
  std::vector<float> out(N * D), dwte(V * D, 0.5f), probs(N * V), dlogits(N * V);
  cpu::embedding_forward(out.data(), tokens.data(), wte.data(), N, D, V);
  cpu::embedding_backward(dwte.data(), dout.data(), tokens.data(), N, D, V);
  const float loss = cpu::cross_entropy_forward(probs.data(), logits.data(), targets.data(), N, V);
  cpu::cross_entropy_backward(dlogits.data(), 1.3f, probs.data(), targets.data(), N, V);

  DeviceBuffer<int> gtok(tokens), gtgt(targets);
  DeviceBuffer<float> gwte(wte), gdout(dout), glog(logits), gout(N * D), gdwte(std::vector<float>(V * D, 0.5f)),
      gprobs(N * V), gdlog(N * V);
  gout.poison();
  gdlog.poison();
  cuda::embedding_forward(gout.get(), gtok.get(), gwte.get(), N, D, V);
  cuda::embedding_backward(gdwte.get(), gdout.get(), gtok.get(), N, D, V);
  const float gloss = cuda::cross_entropy_forward(gprobs.get(), glog.get(), gtgt.get(), N, V);
  cuda::cross_entropy_backward(gdlog.get(), 1.3f, gprobs.get(), gtgt.get(), N, V);
  EXPECT_CLOSE(compare(gout.download(), out, {0, 0}), "embedding");
  EXPECT_CLOSE(compare(gdwte.download(), dwte, kReductionTol), "dwte (+=)");
  EXPECT_NEAR(gloss, loss, 1e-5 * loss);
  EXPECT_CLOSE(compare(gprobs.download(), probs, kReductionTol), "probs");
  EXPECT_CLOSE(compare(gdlog.download(), dlogits, kReductionTol), "dlogits");

  auto p = rng.normal_vec<float>(100), g = rng.normal_vec<float>(100);
  std::vector<float> m(100, 0.f), v(100, 0.f);
  DeviceBuffer<float> gp(p), gg(g), gm(m), gv(v);
  AdamWConfig c;
  for (int step = 1; step <= 3; ++step) {
    cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), 100, step, c, step != 2);
    cuda::adamw_step(gp.get(), gg.get(), gm.get(), gv.get(), 100, step, c, step != 2);
  }
  EXPECT_CLOSE(compare(gp.download(), p, kElementwiseTol), "adamw params");

  std::vector<int> bad = tokens;
  bad[3] = V;
  DeviceBuffer<int> gbad(bad);
  EXPECT_THROW(cuda::embedding_forward(gout.get(), gbad.get(), gwte.get(), N, D, V), UserError);
}
#else
TEST(CudaLmParts, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
