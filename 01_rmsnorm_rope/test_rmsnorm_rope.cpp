// Stage 01 tests: gradchecks, properties of RoPE/YaRN, hand-worked YaRN values, CPU vs CUDA.
#include <cmath>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"
#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

namespace {

// A small RoPE config whose tables cover `positions` positions, plain RoPE (YaRN off).
RopeConfig small_rope(int dr, int positions) {
  RopeConfig c;
  c.qk_rope_head_dim = dr;
  c.max_seq_len = positions;
  c.original_seq_len = positions;
  return c;
}

double dot(const double* a, const double* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// ---- RMSNorm ----------------------------------------------------------------------------------

class RmsNormGrad : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(RmsNormGrad, GradcheckInputAndWeight) {
  const auto [N, D] = GetParam();
  Rng rng(1);
  auto x = rng.normal_vec<double>(N * D), w = rng.normal_vec<double>(D, 0.5, 1.0), R = rng.normal_vec<double>(N * D);
  std::vector<double> y(N * D), rstd(N), dx(N * D), dw(D, 0.0);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
  cpu::rmsnorm_backward(dw.data(), dx.data(), R.data(), rstd.data(), x.data(), w.data(), N, D);
  auto loss = [&] {
    cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
    return weighted_sum(y, R);
  };
  EXPECT_GRADCHECK(gradcheck(loss, {{"inp", &x, &dx}, {"weight", &w, &dw}}));
}
INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormGrad,
                         ::testing::Values(std::pair{10, 12}, std::pair{1, 7}, std::pair{3, 1}, std::pair{5, 33}));

TEST(RmsNorm, ForwardMatchesDefinition) {
  const std::vector<double> x = {3.0, -4.0}, w = {2.0, 0.5};
  std::vector<double> y(2), rstd(1);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), 1, 2, 0.f);
  // mean(x^2) = 12.5, rstd = 1/sqrt(12.5)
  EXPECT_NEAR(rstd[0], 1.0 / std::sqrt(12.5), 1e-15);
  EXPECT_NEAR(y[0], 3.0 / std::sqrt(12.5) * 2.0, 1e-15);
  EXPECT_NEAR(y[1], -4.0 / std::sqrt(12.5) * 0.5, 1e-15);
}

TEST(RmsNorm, EpsIsUsed) {
  const std::vector<double> x = {0.0, 0.0, 0.0}, w = {1.0, 1.0, 1.0};
  std::vector<double> y(3), rstd(1);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), 1, 3, 0.25f);
  EXPECT_DOUBLE_EQ(rstd[0], 2.0);  // 1/sqrt(0 + 0.25)
}

TEST(RmsNorm, WeightGradientAccumulatesInputGradientOverwrites) {
  const int N = 3, D = 5;
  Rng rng(2);
  auto x = rng.normal_vec<double>(N * D), w = rng.normal_vec<double>(D), dy = rng.normal_vec<double>(N * D);
  std::vector<double> y(N * D), rstd(N), dx1(N * D, 7.0), dw1(D, 0.0), dx2(N * D, -3.0), dw2(D, 0.0);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
  cpu::rmsnorm_backward(dw1.data(), dx1.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D);
  cpu::rmsnorm_backward(dw2.data(), dx2.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D);
  cpu::rmsnorm_backward(dw2.data(), dx2.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D);
  expect_accumulates_and_overwrites<double>({{"dweight", &dw1}}, {{"dweight", &dw2}}, dx1, dx2);
}

// ---- RoPE ---------------------------------------------------------------------------------------

TEST(Rope, RotatesAdjacentPairsByPositionTimesFrequency) {
  // One head of stride 6 with the rope slice at offset 2 (like q = [q_nope; q_pe] with Dn=2, Dr=4).
  const RopeConfig c = small_rope(4, 8);
  const auto tab = rope_tables<double>(c);
  const auto f = rope_frequencies(c);
  std::vector<double> x = {9, 9, 1, 0, 0, 1}, y(6, -1.0);
  const RopeDims d{1, 1, 1, 6, 2, 4, 3};  // position 3
  cpu::rope_forward(y.data(), x.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);
  EXPECT_EQ(y[0], -1.0);  // outside the slice: untouched
  EXPECT_EQ(y[1], -1.0);
  EXPECT_NEAR(y[2], std::cos(3 * f[0]), 1e-15);  // pair 0 = (1, 0): rotates to (cos, sin)
  EXPECT_NEAR(y[3], std::sin(3 * f[0]), 1e-15);
  EXPECT_NEAR(y[4], -std::sin(3 * f[1]), 1e-15);  // pair 1 = (0, 1): rotates to (-sin, cos)
  EXPECT_NEAR(y[5], std::cos(3 * f[1]), 1e-15);
  EXPECT_DOUBLE_EQ(f[1], std::pow(10000.0, -0.5));  // theta^(-2i/Dr), i=1, Dr=4
}

struct RopeCase {
  int B, T, H, S, offset, Dr, pos0;
};

class RopeGrad : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeGrad, GradcheckInput) {
  const RopeCase k = GetParam();
  const RopeDims d{k.B, k.T, k.H, k.S, k.offset, k.Dr, k.pos0};
  const auto tab = rope_tables<double>(small_rope(k.Dr, k.pos0 + k.T + 3));
  Rng rng(3);
  const size_t n = static_cast<size_t>(k.B) * k.T * k.H * k.S;
  auto x = rng.normal_vec<double>(n), R = rng.normal_vec<double>(n);
  std::vector<double> y(n), dx(n);
  // The layer as used: out = inp outside the slice, rotated inside; its gradient likewise.
  auto forward = [&] {
    y = x;
    cpu::rope_forward(y.data(), y.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);
  };
  dx = R;
  cpu::rope_backward(dx.data(), dx.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);
  EXPECT_GRADCHECK(gradcheck([&] { forward(); return weighted_sum(y, R); }, {{"inp", &x, &dx}}));
}
INSTANTIATE_TEST_SUITE_P(Shapes, RopeGrad,
                         ::testing::Values(RopeCase{2, 5, 3, 12, 8, 4, 0},   // q-like: [nope 8 | rope 4]
                                           RopeCase{2, 5, 1, 10, 6, 4, 2},   // k_pe-like: H=1 after c_kv
                                           RopeCase{1, 1, 1, 6, 0, 6, 7}));  // T=1 decode step at pos 7

TEST(Rope, PreservesNorms) {
  const RopeConfig c = small_rope(16, 64);
  const auto tab = rope_tables<double>(c);
  Rng rng(4);
  const RopeDims d{2, 17, 3, 16, 0, 16, 5};
  auto x = rng.normal_vec<double>(2 * 17 * 3 * 16);
  std::vector<double> y(x.size());
  cpu::rope_forward(y.data(), x.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);
  for (size_t r = 0; r < x.size() / 16; ++r)
    EXPECT_NEAR(dot(&y[r * 16], &y[r * 16], 16), dot(&x[r * 16], &x[r * 16], 16), 1e-12);
}

TEST(Rope, ScoreDependsOnlyOnRelativeDistance) {
  // <R_m q, R_n k> = <q, R_(n-m) k>: shifting both positions by s leaves the score unchanged.
  for (bool yarn : {false, true}) {
    RopeConfig c = small_rope(32, 400);
    if (yarn) c.original_seq_len = 100;  // YaRN active, factor 40
    const auto tab = rope_tables<double>(c);
    Rng rng(5);
    const auto q = rng.normal_vec<double>(32), k = rng.normal_vec<double>(32);
    auto score = [&](int m, int n) {
      std::vector<double> qm(32), kn(32);
      cpu::rope_forward(qm.data(), q.data(), tab.cos.data(), tab.sin.data(), RopeDims{1, 1, 1, 32, 0, 32, m}, 400);
      cpu::rope_forward(kn.data(), k.data(), tab.cos.data(), tab.sin.data(), RopeDims{1, 1, 1, 32, 0, 32, n}, 400);
      return dot(qm.data(), kn.data(), 32);
    };
    for (int m : {0, 3, 50})
      for (int n : {0, 11, 99})
        for (int s : {1, 17, 250}) EXPECT_NEAR(score(m, n), score(m + s, n + s), 1e-10) << m << " " << n << " " << s;
    EXPECT_GT(std::abs(score(0, 0) - score(0, 11)), 1e-3);  // and it does depend on the distance
  }
}

TEST(Rope, RejectsBadShapesAndPositions) {
  const auto tab = rope_tables<float>(small_rope(4, 8));
  std::vector<float> x(64);
  auto run = [&](RopeDims d) { cpu::rope_forward(x.data(), x.data(), tab.cos.data(), tab.sin.data(), d, 8); };
  EXPECT_NO_THROW(run({1, 8, 1, 8, 4, 4, 0}));
  EXPECT_THROW(run({1, 8, 1, 8, 4, 4, 1}), UserError);   // position 8 is past the table
  EXPECT_THROW(run({1, 2, 1, 8, 5, 4, 0}), UserError);   // slice [5, 9) overruns the head
  EXPECT_THROW(run({1, 2, 1, 8, 0, 3, 0}), UserError);   // odd rope dim
  RopeConfig c = small_rope(5, 8);
  EXPECT_THROW(c.validate(), UserError);
  c = small_rope(4, 8);
  c.beta_fast = 0.5;
  EXPECT_THROW(c.validate(), UserError);
}

// ---- YaRN ---------------------------------------------------------------------------------------

TEST(Yarn, InactiveWithinOriginalContext) {
  RopeConfig c;  // V3 values
  c.max_seq_len = c.original_seq_len;
  const auto f = rope_frequencies(c);
  for (int i = 0; i < 32; ++i) EXPECT_DOUBLE_EQ(f[i], std::pow(10000.0, -2.0 * i / 64));
  EXPECT_EQ(yarn_softmax_scale_factor(c), 1.0);
}

TEST(Yarn, FactorOneEqualsPlainRope) {
  RopeConfig yarn;  // V3: max_seq_len 16384 > original 4096
  yarn.rope_factor = 1.0;
  RopeConfig plain = yarn;
  plain.max_seq_len = plain.original_seq_len;
  const auto a = rope_frequencies(yarn), b = rope_frequencies(plain);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-15 * b[i]);
  EXPECT_DOUBLE_EQ(yarn_softmax_scale_factor(yarn), 1.0);  // ln(1) = 0
}

TEST(Yarn, FrequenciesEqualHandWorkedValues) {
  // DeepSeek-V3: Dr=64, theta=1e4, original 4096, factor 40, beta_fast 32, beta_slow 1 (README, "YaRN by hand").
  //   low  = floor(64 ln(4096/(2 pi 32)) / (2 ln 1e4)) = floor(10.47) = 10
  //   high = ceil (64 ln(4096/(2 pi  1)) / (2 ln 1e4)) = ceil (22.51) = 23
  const RopeConfig c;
  const YarnRange r = yarn_correction_range(c);
  EXPECT_EQ(r.low, 10);
  EXPECT_EQ(r.high, 23);
  const auto f = rope_frequencies(c);
  EXPECT_DOUBLE_EQ(f[0], 1.0);                                    // i <= 10: untouched
  EXPECT_NEAR(f[10], std::pow(10000.0, -20.0 / 64), 1e-17);       // ramp 0 at i = low
  EXPECT_NEAR(f[23], std::pow(10000.0, -46.0 / 64) / 40, 1e-17);  // ramp 1 at i = high: divided by 40
  EXPECT_NEAR(f[31], std::pow(10000.0, -62.0 / 64) / 40, 1e-17);
  // i = 16: ramp = 6/13, f = f0 * (6/13 / 40 + 7/13)
  EXPECT_NEAR(f[16], std::pow(10000.0, -0.5) * (6.0 / 13 / 40 + 7.0 / 13), 1e-16);
  EXPECT_NEAR(f[16], 0.0055, 1e-15);  // = 0.01 * 0.55
  // softmax scale factor: (0.1 ln 40 + 1)^2 = 1.3688879^2
  EXPECT_NEAR(yarn_softmax_scale_factor(c), 1.8738542, 1e-7);
}

TEST(Yarn, LongWavelengthsStretchByFactor) {
  const RopeConfig c;
  RopeConfig plain = c;
  plain.max_seq_len = plain.original_seq_len;
  const auto y = rope_frequencies(c), p = rope_frequencies(plain);
  for (int i = 0; i < 32; ++i) {
    const double ratio = p[i] / y[i];  // wavelength ratio
    EXPECT_GE(ratio, 1.0 - 1e-12);
    EXPECT_LE(ratio, 40.0 + 1e-9);
    if (i > 0) {
      EXPECT_GE(ratio + 1e-12, p[i - 1] / y[i - 1]);  // monotone: slow pairs stretch more
    }
  }
}

// ---- CUDA vs CPU --------------------------------------------------------------------------------

#ifdef DSV3_HAVE_CUDA
class CudaRmsNorm : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(CudaRmsNorm, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  const auto [N, D] = GetParam();
  Rng rng(10);
  auto x = rng.normal_vec<float>(size_t(N) * D, 2.0), w = rng.normal_vec<float>(D, 0.3, 1.0);
  auto dy = rng.normal_vec<float>(size_t(N) * D), dw0 = rng.normal_vec<float>(D);
  std::vector<float> y(x.size()), rstd(N), dx(x.size()), dw = dw0;
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
  cpu::rmsnorm_backward(dw.data(), dx.data(), dy.data(), rstd.data(), x.data(), w.data(), N, D);

  DeviceBuffer<float> gx(x), gw(w), gdy(dy), gy(x.size()), grstd(N), gdx(x.size()), gdw(dw0);
  gy.poison();
  gdx.poison();
  cuda::rmsnorm_forward(gy.get(), grstd.get(), gx.get(), gw.get(), N, D, 1e-6f);
  cuda::rmsnorm_backward(gdw.get(), gdx.get(), gdy.get(), grstd.get(), gx.get(), gw.get(), N, D);
  EXPECT_CLOSE(compare(gy.download(), y, kReductionTol), "out");
  EXPECT_CLOSE(compare(grstd.download(), rstd, kReductionTol), "rstd");
  EXPECT_CLOSE(compare(gdx.download(), dx, kReductionTol), "dinp");
  // dweight sums N rows in another order: tolerance grows with the reduction length.
  EXPECT_CLOSE(compare(gdw.download(), dw, {1e-5 * std::sqrt(double(N)), 1e-4}), "dweight (+=)");
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaRmsNorm,
                         ::testing::Values(std::pair{1, 1}, std::pair{1, 7}, std::pair{10, 12}, std::pair{37, 513},
                                           std::pair{4099, 512}, std::pair{65, 7168}));

class CudaRope : public ::testing::TestWithParam<RopeCase> {};

TEST_P(CudaRope, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  const RopeCase k = GetParam();
  const RopeDims d{k.B, k.T, k.H, k.S, k.offset, k.Dr, k.pos0};
  RopeConfig c;  // V3's YaRN settings, with tables long enough
  c.qk_rope_head_dim = k.Dr;
  c.max_seq_len = std::max(k.pos0 + k.T, 4097);
  const auto tab = rope_tables<float>(c);
  Rng rng(11);
  const size_t n = size_t(k.B) * k.T * k.H * k.S;
  auto x = rng.normal_vec<float>(n), dy = rng.normal_vec<float>(n);
  std::vector<float> y = x, dx = dy;
  cpu::rope_forward(y.data(), x.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);
  cpu::rope_backward(dx.data(), dy.data(), tab.cos.data(), tab.sin.data(), d, tab.positions);

  DeviceBuffer<float> gcos(tab.cos), gsin(tab.sin), gx(x), gy(x), gdy(dy), gdx(dy);
  cuda::rope_forward(gy.get(), gx.get(), gcos.get(), gsin.get(), d, tab.positions);
  cuda::rope_backward(gdx.get(), gdy.get(), gcos.get(), gsin.get(), d, tab.positions);
  EXPECT_CLOSE(compare(gy.download(), y, kElementwiseTol), "rope forward");
  EXPECT_CLOSE(compare(gdx.download(), dx, kElementwiseTol), "rope backward");
  cuda::rope_forward(gx.get(), gx.get(), gcos.get(), gsin.get(), d, tab.positions);  // in place
  EXPECT_CLOSE(compare(gx.download(), y, kElementwiseTol), "rope in place");
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaRope,
                         ::testing::Values(RopeCase{1, 1, 1, 64, 0, 64, 0}, RopeCase{2, 5, 3, 12, 8, 4, 0},
                                           RopeCase{3, 7, 1, 37, 5, 32, 11},        // k_pe after an odd c_kv
                                           RopeCase{1, 1, 16, 192, 128, 64, 4096},  // decode step past original
                                           RopeCase{2, 4096, 4, 96, 64, 32, 0}));   // large T

TEST(CudaRopeErrors, RejectsPositionsPastTable) {
  DSV3_REQUIRE_GPU();
  const auto tab = rope_tables<float>(small_rope(4, 8));
  DeviceBuffer<float> gcos(tab.cos), gsin(tab.sin), gx(64);
  EXPECT_THROW(cuda::rope_forward(gx.get(), gx.get(), gcos.get(), gsin.get(), RopeDims{1, 8, 1, 8, 4, 4, 1}, 8),
               UserError);
}
#else
TEST(CudaRmsNorm, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
