// Tests of common/: the tools every stage's tests rely on must themselves be able to fail.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "common/cli.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/gemm.h"
#include "common/rng.h"
#include "common/testing.h"
#ifdef DSV3_HAVE_CUDA
#include "common/cuda_utils.h"
#endif

using namespace dsv3;

TEST(Rng, SameSeedSameNumbers) {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 100; ++i) {
    const double x = a.normal();
    EXPECT_EQ(x, b.normal());
    EXPECT_NE(x, c.normal());
  }
}

TEST(Rng, NormalHasUnitMoments) {
  Rng r(7);
  const auto v = r.normal_vec<double>(200001);
  double m = 0, s = 0;
  for (double x : v) m += x;
  m /= v.size();
  for (double x : v) s += (x - m) * (x - m);
  s /= v.size();
  EXPECT_NEAR(m, 0.0, 0.01);
  EXPECT_NEAR(s, 1.0, 0.01);
}

TEST(Rng, StateRoundTrips) {
  Rng a(5);
  a.normal();
  const auto st = a.state();
  const double x = a.normal(), y = a.normal();
  Rng b(999);
  b.set_state(st);
  EXPECT_EQ(b.normal(), x);
  EXPECT_EQ(b.normal(), y);
}

TEST(Compare, PassesWithinToleranceFailsOutside) {
  const std::vector<float> ref = {1.f, -2.f, 3.f, 0.f};
  std::vector<float> got = ref;
  got[1] += 1e-7f;
  EXPECT_TRUE(compare(got, ref, kElementwiseTol).ok());
  got[2] += 1e-3f;
  const auto r = compare(got, ref, kElementwiseTol);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.n_bad, 1u);
  EXPECT_NEAR(r.max_abs, 1e-3, 1e-6);
  EXPECT_NE(r.report("x").find("[2]"), std::string::npos);
}

TEST(Compare, NanAndSizeMismatchFail) {
  const std::vector<float> ref = {1.f, 2.f};
  EXPECT_FALSE(compare(std::vector<float>{1.f, NAN}, ref, {1.0, 1.0}).ok());
  EXPECT_FALSE(compare(std::vector<float>{1.f, INFINITY}, ref, {1.0, 1.0}).ok());
  EXPECT_FALSE(compare(std::vector<float>{1.f}, ref, {1.0, 1.0}).ok());
}

// A toy layer for the gradcheck tests: out_i = w * x_i^2, loss = sum(R * out).
struct ToyLayer {
  std::vector<double> x, w, R;
  std::vector<double> forward() const {
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = w[0] * x[i] * x[i];
    return out;
  }
  double loss() const { return weighted_sum(forward(), R); }
  // bug 0: correct; 1: wrong factor; 2: ignores the incoming gradient R
  void backward(std::vector<double>& dx, std::vector<double>& dw, int bug) const {
    dx.assign(x.size(), 0.0);
    dw.assign(1, 0.0);
    for (size_t i = 0; i < x.size(); ++i) {
      const double g = bug == 2 ? 1.0 : R[i];
      dx[i] = g * (bug == 1 ? 1.0 : 2.0) * w[0] * x[i];
      dw[0] += g * x[i] * x[i];
    }
  }
};

static ToyLayer make_toy() {
  Rng rng(3);
  return {rng.normal_vec<double>(7), {0.7}, rng.normal_vec<double>(7)};
}

TEST(GradCheck, PassesOnCorrectBackward) {
  ToyLayer t = make_toy();
  std::vector<double> dx, dw;
  t.backward(dx, dw, 0);
  const auto r = gradcheck([&] { return t.loss(); }, {{"x", &t.x, &dx}, {"w", &t.w, &dw}});
  EXPECT_GRADCHECK(r);
  EXPECT_EQ(r.checked, 8u);
}

TEST(GradCheck, FailsOnWrongBackward) {
  ToyLayer t = make_toy();
  std::vector<double> dx, dw;
  t.backward(dx, dw, 1);
  const auto r = gradcheck([&] { return t.loss(); }, {{"x", &t.x, &dx}, {"w", &t.w, &dw}});
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.tensors[0].bad, 7u);
  EXPECT_EQ(r.tensors[1].bad, 0u);
}

TEST(GradCheck, FailsOnBackwardThatIgnoresIncomingGradient) {
  ToyLayer t = make_toy();
  std::vector<double> dx, dw;
  t.backward(dx, dw, 2);
  const auto r = gradcheck([&] { return t.loss(); }, {{"x", &t.x, &dx}, {"w", &t.w, &dw}});
  EXPECT_FALSE(r.ok());
}

TEST(GradCheck, RestoresValuesAndSamplesCoordinates) {
  ToyLayer t = make_toy();
  const auto x0 = t.x;
  std::vector<double> dx, dw;
  t.backward(dx, dw, 0);
  GradCheckOptions opt;
  opt.max_coords = 3;
  const auto r = gradcheck([&] { return t.loss(); }, {{"x", &t.x, &dx}}, opt);
  EXPECT_EQ(r.checked, 3u);
  EXPECT_EQ(t.x, x0);
}

TEST(GradCheck, SkipsAndCountsDecisionFlips) {
  // out = x[argmax x]: piecewise linear; a near-tie flips the argmax under perturbation.
  std::vector<double> x = {1.0, 1.0 + 1e-7, -3.0, 0.5};
  auto argmax = [&] { return static_cast<uint64_t>(std::max_element(x.begin(), x.end()) - x.begin()); };
  std::vector<double> dx(4, 0.0);
  dx[argmax()] = 1.0;
  GradCheckOptions opt;
  opt.decision_signature = argmax;
  opt.max_skip_fraction = 0.5;
  auto r = gradcheck([&] { return x[argmax()]; }, {{"x", &x, &dx}}, opt);
  EXPECT_EQ(r.skipped, 2u);  // moving x0 up or x1 down swaps the winner
  EXPECT_EQ(r.checked, 2u);
  EXPECT_TRUE(r.ok()) << r.report();
  opt.max_skip_fraction = 0.25;
  r = gradcheck([&] { return x[argmax()]; }, {{"x", &x, &dx}}, opt);
  EXPECT_TRUE(r.too_many_skipped);
  EXPECT_FALSE(r.ok());
}

template <typename T>
static T naive_at(const std::vector<T>& X, Op op, int r, int c, int ld) {
  return op == Op::N ? X[r * ld + c] : X[c * ld + r];
}

TEST(Gemm, CpuMatchesNaiveLoopsForAllOpsAndStrides) {
  const int M = 5, N = 7, K = 3, pad = 2;
  Rng rng(11);
  for (Op oa : {Op::N, Op::T})
    for (Op ob : {Op::N, Op::T}) {
      const int lda = (oa == Op::N ? K : M) + pad, ldb = (ob == Op::N ? N : K) + pad, ldc = N + pad;
      auto A = rng.normal_vec<double>((oa == Op::N ? M : K) * lda);
      auto B = rng.normal_vec<double>((ob == Op::N ? K : N) * ldb);
      auto C = rng.normal_vec<double>(M * ldc);
      auto ref = C;
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
          double s = 0;
          for (int k = 0; k < K; ++k) s += naive_at(A, oa, i, k, lda) * naive_at(B, ob, k, j, ldb);
          ref[i * ldc + j] = 0.5 * s + 2.0 * C[i * ldc + j];
        }
      cpu::gemm(oa, ob, M, N, K, 0.5, A.data(), lda, B.data(), ldb, 2.0, C.data(), ldc);
      EXPECT_CLOSE(compare(C, ref, {1e-12, 1e-12}), "gemm");
    }
}

TEST(Diag, TableAlignsColumns) {
  Table t({"name", "value"});
  t.add_row({"a", "1.5"});
  t.add_row({"longer", "10"});
  const std::string s = t.str();
  EXPECT_NE(s.find("longer  "), std::string::npos);
  EXPECT_NE(s.find("   10\n"), std::string::npos);
}

TEST(Diag, CsvWritesHeaderAndRowsAndRejectsBadRows) {
  const auto dir = std::filesystem::temp_directory_path() / "dsv3_test_csv";
  ensure_dir(dir.string());
  const std::string path = (dir / "a.csv").string();
  {
    CsvWriter w(path, {"x", "y"});
    w.row({1.0, 0.25});
    EXPECT_THROW(w.row({1.0}), UserError);
  }
  std::ifstream f(path);
  std::string l1, l2;
  std::getline(f, l1);
  std::getline(f, l2);
  EXPECT_EQ(l1, "x,y");
  EXPECT_EQ(l2, "1,0.25");
  EXPECT_THROW(CsvWriter("/nonexistent-dir/x/y.csv", {"a"}), UserError);
}

static int run_cli(std::vector<std::string> args, const std::function<int()>& body) {
  CLI::App app("t", "t");
  DemoOptions opt;
  add_demo_options(app, opt, "out");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return run_main(app, static_cast<int>(argv.size()), argv.data(), body);
}

TEST(Cli, BadFlagAndUserErrorExitWithCode2) {
  EXPECT_EQ(run_cli({"t", "--check"}, [] { return 0; }), 0);
  EXPECT_EQ(run_cli({"t", "--no-such-flag"}, [] { return 0; }), 2);
  EXPECT_EQ(run_cli({"t", "--seed", "abc"}, [] { return 0; }), 2);
  EXPECT_EQ(run_cli({"t"}, []() -> int { throw UserError("bad config"); }), 2);
  EXPECT_EQ(run_cli({"t"}, []() -> int { throw std::runtime_error("bug"); }), 1);
}

TEST(Errors, RequireThrowsUserErrorWithMessage) {
  EXPECT_NO_THROW(require(true, "never {}", 1));
  try {
    require(false, "field '{}' must be positive, got {}", "hidden_size", -3);
    FAIL();
  } catch (const UserError& e) {
    EXPECT_STREQ(e.what(), "field 'hidden_size' must be positive, got -3");
  }
}

#ifdef DSV3_HAVE_CUDA
TEST(CudaBuffer, UploadDownloadRoundTrip) {
  DSV3_REQUIRE_GPU();
  Rng rng(1);
  const auto h = rng.normal_vec<float>(1001);
  DeviceBuffer<float> d(h);
  EXPECT_EQ(d.download(), h);
  d.zero();
  EXPECT_EQ(d.download(), std::vector<float>(1001, 0.f));
  DeviceBuffer<float> moved = std::move(d);
  EXPECT_EQ(moved.size(), 1001u);
  EXPECT_EQ(d.get(), nullptr);
}

TEST(CudaBuffer, ErrorsThrowWithLocation) {
  DSV3_REQUIRE_GPU();
  try {
    CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(16), 64, cudaMemcpyDeviceToHost));
    FAIL();
  } catch (const CudaError& e) {
    EXPECT_NE(std::string(e.what()).find("test_common.cpp"), std::string::npos) << e.what();
  }
  cudaGetLastError();
}

TEST(CudaGemm, MatchesCpuForAllOpsAndStrides) {
  DSV3_REQUIRE_GPU();
  const int M = 37, N = 19, K = 53, pad = 3;
  Rng rng(12);
  for (Op oa : {Op::N, Op::T})
    for (Op ob : {Op::N, Op::T}) {
      const int lda = (oa == Op::N ? K : M) + pad, ldb = (ob == Op::N ? N : K) + pad, ldc = N + pad;
      auto A = rng.normal_vec<float>((oa == Op::N ? M : K) * lda);
      auto B = rng.normal_vec<float>((ob == Op::N ? K : N) * ldb);
      auto C = rng.normal_vec<float>(M * ldc);
      DeviceBuffer<float> dA(A), dB(B), dC(C);
      cpu::gemm(oa, ob, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.0f, C.data(), ldc);
      cuda::gemm(oa, ob, M, N, K, 0.5f, dA.get(), lda, dB.get(), ldb, 2.0f, dC.get(), ldc);
      EXPECT_CLOSE(compare(dC.download(), C, kReductionTol), "gemm");
    }
}

TEST(CudaGemm, BetaZeroIgnoresGarbageInC) {
  DSV3_REQUIRE_GPU();
  const int M = 4, N = 6, K = 5;
  Rng rng(2);
  auto A = rng.normal_vec<float>(M * K), B = rng.normal_vec<float>(K * N);
  std::vector<float> C(M * N, 0.f);
  cpu::gemm(Op::N, Op::N, M, N, K, 1.f, A.data(), B.data(), 0.f, C.data());
  DeviceBuffer<float> dA(A), dB(B), dC(M * N);
  dC.poison();
  cuda::gemm(Op::N, Op::N, M, N, K, 1.f, dA.get(), dB.get(), 0.f, dC.get());
  EXPECT_CLOSE(compare(dC.download(), C, kReductionTol), "gemm beta=0");
}

TEST(CudaGemm, StridedBatchedMatchesCpu) {
  DSV3_REQUIRE_GPU();
  const int M = 9, N = 11, K = 7, batch = 3;
  Rng rng(13);
  auto A = rng.normal_vec<float>(batch * M * K), B = rng.normal_vec<float>(batch * N * K);
  std::vector<float> C(batch * M * N);
  for (int b = 0; b < batch; ++b)
    cpu::gemm(Op::N, Op::T, M, N, K, 1.f, A.data() + b * M * K, B.data() + b * N * K, 0.f,
              C.data() + b * M * N);
  DeviceBuffer<float> dA(A), dB(B), dC(C.size());
  cuda::gemm_strided_batched(Op::N, Op::T, M, N, K, 1.f, dA.get(), K, M * K, dB.get(), K, N * K, 0.f,
                             dC.get(), N, M * N, batch);
  EXPECT_CLOSE(compare(dC.download(), C, kReductionTol), "batched gemm");
}

// The attention layout: X (outer, rows, inner, width) row-major; product (o, n) uses rows of stride inner*width.
// Widths that are multiples of 4 floats take the pointer-table call, the others the strided fallback.
TEST(CudaGemm, Batched2dMatchesCpu) {
  DSV3_REQUIRE_GPU();
  for (const int K : {7, 8}) {
    const int M = 9, N = K + 4, outer = 3, inner = 4;
    Rng rng(14 + K);
    auto A = rng.normal_vec<float>(outer * M * inner * K), B = rng.normal_vec<float>(outer * N * inner * K);
    auto C = rng.normal_vec<float>(outer * M * inner * N);  // beta = 0.5: C is read
    auto ref = C;
    for (int o = 0; o < outer; ++o)
      for (int n = 0; n < inner; ++n)
        cpu::gemm(Op::N, Op::T, M, N, K, 1.5f, A.data() + (o * M * inner + n) * K, inner * K,
                  B.data() + (o * N * inner + n) * K, inner * K, 0.5f, ref.data() + (o * M * inner + n) * N,
                  inner * N);
    DeviceBuffer<float> dA(A), dB(B), dC(C);
    cuda::gemm_batched_2d(Op::N, Op::T, M, N, K, 1.5f, dA.get(), inner * K, M * inner * K, K, dB.get(), inner * K,
                          N * inner * K, K, 0.5f, dC.get(), inner * N, M * inner * N, N, outer, inner);
    EXPECT_CLOSE(compare(dC.download(), ref, kReductionTol), fmt::format("2-d batched gemm, K = {}", K));
  }
}

TEST(CudaGemm, ConcurrentMatchesCpu) {
  DSV3_REQUIRE_GPU();
  Rng rng(15);
  const int N = 6, K = 5;
  std::vector<int> rows = {3, 0, 8, 1, 13, 4};  // a problem with M = 0 is skipped
  std::vector<std::vector<float>> A, B, C, ref;
  std::vector<DeviceBuffer<float>> dA, dB, dC;
  std::vector<cuda::GemmProblem> ps;
  for (size_t i = 0; i < rows.size(); ++i) {
    A.push_back(rng.normal_vec<float>(rows[i] * K));
    B.push_back(rng.normal_vec<float>(N * K));
    C.push_back(rng.normal_vec<float>(rows[i] * N));
    ref.push_back(C.back());
    cpu::gemm(Op::N, Op::T, rows[i], N, K, 1.f, A[i].data(), B[i].data(), 1.f, ref[i].data());
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    dA.emplace_back(A[i]);
    dB.emplace_back(B[i]);
    dC.emplace_back(C[i]);
  }
  for (size_t i = 0; i < rows.size(); ++i) ps.push_back({rows[i], N, K, dA[i].get(), K, dB[i].get(), K, dC[i].get(), N});
  cuda::gemm_concurrent(Op::N, Op::T, 1.f, 1.f, ps);
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_CLOSE(compare(dC[i].download(), ref[i], kReductionTol), fmt::format("product {}", i));
}
#else
TEST(CudaBuffer, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
