// Tests of common/: the tools every stage's tests rely on must themselves be able to fail.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "common/cli.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/gemm.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"
#include "common/safetensors.h"
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
      cuda::gemm(oa, ob, M, N, K, 0.5f, dA.get(), lda, dB.get(), ldb, 2.0f, dC.get(), ldc, Matmul::FP32);
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
  cuda::gemm(Op::N, Op::N, M, N, K, 1.f, dA.get(), dB.get(), 0.f, dC.get(), Matmul::FP32);
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
                             dC.get(), N, M * N, batch, Matmul::FP32);
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
                          N * inner * K, K, 0.5f, dC.get(), inner * N, M * inner * N, N, outer, inner, Matmul::FP32);
    EXPECT_CLOSE(compare(dC.download(), ref, kReductionTol), fmt::format("2-d batched gemm, K = {}", K));
  }
}

// Oracle of the bf16 products (gemm.h: Bf16Gemm). Bf16Copies multiplies bf16 copies of the operands with fp32
// accumulation, so it equals the fp32 product of the operands rounded to bf16 (nearest even) up to the order of
// the sums; Fast16bf rounds inside cuBLAS and stays within bf16's error of the exact product. Every entry point
// and layout: the four op pairs with padded rows, strided batches, and the 2-d batch on both of its paths.
std::vector<float> rounded_to_bf16(std::vector<float> v) {
  for (float& x : v) x = bf16_to_float(float_to_bf16(x));
  return v;
}
struct Bf16PathGuard {  // restores the default path whatever a test does
  ~Bf16PathGuard() { cuda::set_bf16_gemm(cuda::Bf16Gemm::Fast16bf); }
};
constexpr Tolerance kBf16Tol{3e-2, 3e-2};  // operands rounded to 8 bits of mantissa, K <= 53 products

TEST(CudaGemm, Bf16CopiesEqualTheProductOfRoundedOperands) {
  DSV3_REQUIRE_GPU();
  Bf16PathGuard guard;
  const int M = 37, N = 19, K = 53, pad = 3;
  Rng rng(31);
  for (Op oa : {Op::N, Op::T})
    for (Op ob : {Op::N, Op::T}) {
      const int lda = (oa == Op::N ? K : M) + pad, ldb = (ob == Op::N ? N : K) + pad, ldc = N + pad;
      const auto A = rng.normal_vec<float>((oa == Op::N ? M : K) * lda);
      const auto B = rng.normal_vec<float>((ob == Op::N ? K : N) * ldb);
      const auto C = rng.normal_vec<float>(M * ldc);
      auto exact = C, rounded = C;
      cpu::gemm(oa, ob, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.0f, exact.data(), ldc);
      const auto A16 = rounded_to_bf16(A), B16 = rounded_to_bf16(B);
      cpu::gemm(oa, ob, M, N, K, 0.5f, A16.data(), lda, B16.data(), ldb, 2.0f, rounded.data(), ldc);
      for (auto path : {cuda::Bf16Gemm::Fast16bf, cuda::Bf16Gemm::Bf16Copies}) {
        cuda::set_bf16_gemm(path);
        DeviceBuffer<float> dA(A), dB(B), dC(C);
        cuda::gemm(oa, ob, M, N, K, 0.5f, dA.get(), lda, dB.get(), ldb, 2.0f, dC.get(), ldc, Matmul::BF16);
        const auto got = dC.download();
        EXPECT_CLOSE(compare(got, exact, kBf16Tol), "bf16 gemm against the exact product");
        if (path == cuda::Bf16Gemm::Bf16Copies) {
          EXPECT_CLOSE(compare(got, rounded, kReductionTol), "bf16 copies against the rounded operands' product");
        }
      }
    }
  // strided batches, and the 2-d batch: widths of 8 floats take the pointer table, 7 the strided fallback
  for (const int Kb : {7, 8}) {
    const int Mb = 9, Nb = Kb + 4, outer = 3, inner = 4;
    const auto A = rng.normal_vec<float>(outer * Mb * inner * Kb), B = rng.normal_vec<float>(outer * Nb * inner * Kb);
    const auto A16 = rounded_to_bf16(A), B16 = rounded_to_bf16(B);
    std::vector<float> ref(outer * Mb * inner * Nb, 0.f), ref_s(outer * inner * Mb * Nb, 0.f);
    for (int o = 0; o < outer; ++o)
      for (int n = 0; n < inner; ++n)
        cpu::gemm(Op::N, Op::T, Mb, Nb, Kb, 1.5f, A16.data() + (o * Mb * inner + n) * Kb, inner * Kb,
                  B16.data() + (o * Nb * inner + n) * Kb, inner * Kb, 0.f, ref.data() + (o * Mb * inner + n) * Nb,
                  inner * Nb);
    for (int b = 0; b < outer * inner; ++b)
      cpu::gemm(Op::N, Op::T, Mb, Nb, Kb, 1.f, A16.data() + b * Mb * Kb, B16.data() + b * Nb * Kb, 0.f,
                ref_s.data() + b * Mb * Nb);
    DeviceBuffer<float> dA(A), dB(B), dC(ref.size()), dS(ref_s.size());
    dC.poison();
    cuda::gemm_batched_2d(Op::N, Op::T, Mb, Nb, Kb, 1.5f, dA.get(), inner * Kb, Mb * inner * Kb, Kb, dB.get(),
                          inner * Kb, Nb * inner * Kb, Kb, 0.f, dC.get(), inner * Nb, Mb * inner * Nb, Nb, outer,
                          inner, Matmul::BF16);
    EXPECT_CLOSE(compare(dC.download(), ref, kReductionTol), fmt::format("bf16 2-d batched gemm, K = {}", Kb));
    cuda::gemm_strided_batched(Op::N, Op::T, Mb, Nb, Kb, 1.f, dA.get(), Kb, Mb * Kb, dB.get(), Kb, Nb * Kb, 0.f,
                               dS.get(), Nb, Mb * Nb, outer * inner, Matmul::BF16);
    EXPECT_CLOSE(compare(dS.download(), ref_s, kReductionTol), fmt::format("bf16 strided batched gemm, K = {}", Kb));
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
  {
    cuda::ConcurrentGemms side;
    side.run(Op::N, Op::T, 1.f, 1.f, ps, Matmul::FP32);
  }  // joined here
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_CLOSE(compare(dC[i].download(), ref[i], kReductionTol), fmt::format("product {}", i));
}

// Segmented products against the CPU on the same bf16 operands (so only the summation order differs).
// Segments: empty ones (first, middle, last), one row, one past a tile (129 rows) and one over two tiles; output
// shapes that are not tile multiples.
namespace {
struct Bf16Operand {  // bf16 bits for the GPU, the same values as floats for the CPU
  std::vector<uint16_t> bits;
  std::vector<float> values;
};
Bf16Operand bf16_operand(const std::vector<float>& v) {
  Bf16Operand o;
  for (float x : v) {
    o.bits.push_back(float_to_bf16(x));
    o.values.push_back(bf16_to_float(o.bits.back()));
  }
  return o;
}
const std::vector<int> kSegOffsets = {0, 0, 5, 6, 6, 135, 400, 417, 417};

// A rows-form case over kSegOffsets: A (rows x lda) and S matrices B1, B2 (stride sb; N x K for opB = T, K x N
// for opB = N) in bf16, and the CPU's results on the same values: ref1 = 1.5 A B1 and ref2 = -A B1 + 0.5 (1.5 A B2).
// expect_matches(run) makes the GPU compute them the same way: run(alpha, beta, products) with two products at
// beta = 0 over poisoned C, then product 2's C again with B1, alpha -1 and beta 0.5.
struct RowsCase {
  Op ob;
  int N, K, lda, ldb, ldc;
  int64_t sb;
  int S = static_cast<int>(kSegOffsets.size()) - 1, rows = kSegOffsets.back();
  Bf16Operand A, B1, B2;
  std::vector<float> ref1, ref2;

  RowsCase(Rng& rng, Op ob_, int N_, int K_, int lda_, int ldb_, int ldc_, int64_t sb_)
      : ob(ob_), N(N_), K(K_), lda(lda_), ldb(ldb_), ldc(ldc_), sb(sb_) {
    A = bf16_operand(rng.normal_vec<float>(static_cast<size_t>(rows) * lda));
    B1 = bf16_operand(rng.normal_vec<float>(S * sb));
    B2 = bf16_operand(rng.normal_vec<float>(S * sb));
    ref1.assign(static_cast<size_t>(rows) * ldc, 0.f);
    ref2 = ref1;
    for (int s = 0; s < S; ++s) {
      const int r0 = kSegOffsets[s], n = kSegOffsets[s + 1] - r0;
      if (n == 0) continue;
      const float* a = A.values.data() + r0 * lda;
      cpu::gemm(Op::N, ob, n, N, K, 1.5f, a, lda, B1.values.data() + s * sb, ldb, 0.f, ref1.data() + r0 * ldc, ldc);
      cpu::gemm(Op::N, ob, n, N, K, 1.5f, a, lda, B2.values.data() + s * sb, ldb, 0.f, ref2.data() + r0 * ldc, ldc);
      cpu::gemm(Op::N, ob, n, N, K, -1.f, a, lda, B1.values.data() + s * sb, ldb, 0.5f, ref2.data() + r0 * ldc, ldc);
    }
  }
  // the N columns of each row: the padding columns of C are never written
  std::vector<float> strip(const std::vector<float>& c) const {
    std::vector<float> out;
    for (int r = 0; r < rows; ++r) out.insert(out.end(), c.begin() + r * ldc, c.begin() + r * ldc + N);
    return out;
  }
  template <typename Run>
  void expect_matches(Run&& run, const Tolerance& tol, const std::string& name) const {
    DeviceBuffer<uint16_t> dA(A.bits), dB1(B1.bits), dB2(B2.bits);
    DeviceBuffer<float> dC1(ref1.size()), dC2(ref2.size());
    dC1.poison();
    dC2.poison();
    cuda::SegmentGemm p1{0, N, K, dA.get(), lda, dB1.get(), ldb, dC1.get(), ldc, sb, 0};
    cuda::SegmentGemm p2{0, N, K, dA.get(), lda, dB2.get(), ldb, dC2.get(), ldc, sb, 0};
    run(1.5f, 0.f, std::vector<cuda::SegmentGemm>{p1, p2});
    p2.B = dB1.get();
    run(-1.f, 0.5f, std::vector<cuda::SegmentGemm>{p2});
    EXPECT_CLOSE(compare(strip(dC1.download()), strip(ref1), tol), name + ", beta 0");
    EXPECT_CLOSE(compare(strip(dC2.download()), strip(ref2), tol), name + ", beta 0.5");
  }
};
}  // namespace

// to_bf16 (eight elements a thread where both pointers are 16-byte aligned, one a thread for the tail and for
// unaligned pointers) rounds every element as the host's float_to_bf16 does, bit for bit: ties to even, infinities
// and NaN kept, each length and offset covering the vector body, the tail and the fallback.
TEST(CudaSegmentGemm, ToBf16RoundsAsTheHostBitForBit) {
  DSV3_REQUIRE_GPU();
  Rng rng(11);
  std::vector<float> x = rng.normal_vec<float>(1000);
  for (size_t i = 0; i < x.size(); i += 7) x[i] = 1.0f + std::ldexp(1.0f, -8) * float(i % 4);  // halfway cases
  x[3] = INFINITY;
  x[5] = -INFINITY;
  x[9] = NAN;
  x[12] = 0.0f;
  x[13] = -0.0f;
  const DeviceBuffer<float> src(x);
  for (size_t offset : {size_t{0}, size_t{1}, size_t{4}, size_t{8}})
    for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{64}, size_t{991}}) {
      DeviceBuffer<uint16_t> dst(n);
      cuda::to_bf16(dst.get(), src.get() + offset, n);
      const std::vector<uint16_t> got = dst.download();
      for (size_t i = 0; i < n; ++i) {
        const uint16_t want = float_to_bf16(x[offset + i]);
        if (std::isnan(x[offset + i]))
          EXPECT_TRUE(std::isnan(bf16_to_float(got[i]))) << "offset " << offset << " n " << n << " i " << i;
        else
          ASSERT_EQ(got[i], want) << "offset " << offset << " n " << n << " i " << i << " x " << x[offset + i];
      }
    }
}

TEST(CudaSegmentGemm, RowsMatchCpuForBothLayouts) {
  DSV3_REQUIRE_GPU();
  const int N = 136, K = 40, lda = K + 8, ldc = N + 4;
  Rng rng(21);
  DeviceBuffer<int> doff(kSegOffsets);
  for (Op ob : {Op::T, Op::N}) {
    const RowsCase t(rng, ob, N, K, lda, ob == Op::T ? K : N, ldc, static_cast<int64_t>(N) * K);
    t.expect_matches([&](float alpha, float beta, const std::vector<cuda::SegmentGemm>& products) {
      cuda::segmented_gemm_rows(ob, alpha, beta, products, doff.get(), t.S, t.rows);
    }, kReductionTol, fmt::format("rows, {}", ob == Op::T ? "opB = T" : "opB = N"));
  }
}

// Version 2 of the rows products (wgmma, segment_gemm_hopper.cu) against the CPU on the same bf16 operands, for
// every tile: the segments of kSegOffsets (empty, one row, past a tile), N = 136 (a partial column tile for 128
// and 256), K = 72 (a partial 64-wide inner tile) and K = 520 (more inner tiles than pipeline stages), padded
// leading dimensions, two products in one call, beta = 0 over poisoned C and beta = 0.5. Tolerance: the two sum
// the same K exact products in different orders; each of the K additions rounds (2^-24 relative) a partial sum
// of magnitude up to ~|terms| sqrt(K) (~1 here), so atol grows with K: 2e-6 K (1.4e-4 at K = 72, 1e-3 at 520; a
// run measured 1.5e-4 at 520).
TEST(CudaSegmentGemm, WgmmaRowsMatchCpuForEveryTile) {
  DSV3_REQUIRE_GPU();
  if (!cuda::segmented_gemm_wgmma_available())
    GTEST_SKIP() << "no wgmma here (needs a compute capability 9.0 GPU and a build for sm_90a)";
  const int N = 136;
  DeviceBuffer<int> doff(kSegOffsets);
  Rng rng(23);
  for (int K : {72, 520}) {
    const int ldb = K + 16;
    const RowsCase t(rng, Op::T, N, K, K + 8, ldb, N + 4, static_cast<int64_t>(N) * ldb);
    for (cuda::WgmmaTile tile : {cuda::WgmmaTile::N256S4, cuda::WgmmaTile::N256S3, cuda::WgmmaTile::N128S4,
                                 cuda::WgmmaTile::N128S3}) {
      cuda::set_wgmma_tile(tile);
      t.expect_matches([&](float alpha, float beta, const std::vector<cuda::SegmentGemm>& products) {
        cuda::segmented_gemm_rows_wgmma(alpha, beta, products, doff.get(), t.S, t.rows);
      }, Tolerance{2e-6 * K, 1e-4}, fmt::format("K {} tile {}", K, static_cast<int>(tile)));
    }
  }
  cuda::set_wgmma_tile(cuda::WgmmaTile::N128S3);
}

TEST(CudaSegmentGemm, TnMatchesCpu) {
  DSV3_REQUIRE_GPU();
  const int S = static_cast<int>(kSegOffsets.size()) - 1, rows = kSegOffsets.back();
  // two products of transposed shapes (an expert's dW2 and dW1), one not a tile multiple either way
  const int Ma = 136, Na = 72, Mb = 72, Nb = 136;
  const int64_t sca = Ma * Na, scb = Mb * Nb;
  Rng rng(22);
  const auto X = bf16_operand(rng.normal_vec<float>(static_cast<size_t>(rows) * Ma));  // rows x 136
  const auto Y = bf16_operand(rng.normal_vec<float>(static_cast<size_t>(rows) * Na));  // rows x 72
  const auto C0 = rng.normal_vec<float>(S * sca);
  auto refa = C0, refb = C0;
  for (int s = 0; s < S; ++s) {
    const int r0 = kSegOffsets[s], n = kSegOffsets[s + 1] - r0;
    // K = 0 (an empty segment): C = beta C, as a GEMM with no inner dimension
    if (n == 0) {
      for (int64_t i = 0; i < sca; ++i) refa[s * sca + i] *= 0.5f, refb[s * scb + i] *= 0.5f;
      continue;
    }
    cpu::gemm(Op::T, Op::N, Ma, Na, n, 2.f, X.values.data() + r0 * Ma, Ma, Y.values.data() + r0 * Na, Na, 0.5f,
              refa.data() + s * sca, Na);
    cpu::gemm(Op::T, Op::N, Mb, Nb, n, 2.f, Y.values.data() + r0 * Na, Na, X.values.data() + r0 * Ma, Ma, 0.5f,
              refb.data() + s * scb, Nb);
  }
  DeviceBuffer<uint16_t> dX(X.bits), dY(Y.bits);
  DeviceBuffer<float> dCa(C0), dCb(C0);
  DeviceBuffer<int> off(kSegOffsets);
  cuda::segmented_gemm_tn(2.f, 0.5f,
                          {{Ma, Na, 0, dX.get(), Ma, dY.get(), Na, dCa.get(), Na, 0, sca},
                           {Mb, Nb, 0, dY.get(), Na, dX.get(), Ma, dCb.get(), Nb, 0, scb}},
                          off.get(), S);
  EXPECT_CLOSE(compare(dCa.download(), refa, kReductionTol), "tn, 136 x 72");
  EXPECT_CLOSE(compare(dCb.download(), refb, kReductionTol), "tn, 72 x 136");
}

// Version 2 of the tn products (wgmma, MN-major operands) against the CPU, for every tile: three products in one
// call (136 x 72, 72 x 136 and 136 x 136: partial and whole tiles of 128 rows and 128/256 columns), segments
// empty (C = beta C), of one row, and of 683 rows (11 inner tiles, more than the pipeline's stages), beta = 0.5
// over a nonzero C. Tolerance as above, with K the longest segment.
TEST(CudaSegmentGemm, WgmmaTnMatchesCpuForEveryTile) {
  DSV3_REQUIRE_GPU();
  if (!cuda::segmented_gemm_wgmma_available())
    GTEST_SKIP() << "no wgmma here (needs a compute capability 9.0 GPU and a build for sm_90a)";
  std::vector<int> offsets = kSegOffsets;
  offsets.push_back(1100);
  const int S = static_cast<int>(offsets.size()) - 1, rows = offsets.back();
  const int Ma = 136, Na = 72;
  const int64_t sc = Ma * Ma;  // every product's C_s takes the largest size's stride
  Rng rng(24);
  const auto X = bf16_operand(rng.normal_vec<float>(static_cast<size_t>(rows) * Ma));  // rows x 136
  const auto Y = bf16_operand(rng.normal_vec<float>(static_cast<size_t>(rows) * Na));  // rows x 72
  const auto C0 = rng.normal_vec<float>(S * sc);
  struct P {
    int M, N;
    const Bf16Operand *a, *b;
    int lda, ldb;
  };
  const std::vector<P> ps{{Ma, Na, &X, &Y, Ma, Na}, {Na, Ma, &Y, &X, Na, Ma}, {Ma, Ma, &X, &X, Ma, Ma}};
  std::vector<std::vector<float>> ref(ps.size(), C0);
  for (size_t i = 0; i < ps.size(); ++i)
    for (int s = 0; s < S; ++s) {
      const int r0 = offsets[s], n = offsets[s + 1] - r0;
      const P& q = ps[i];
      if (n == 0) {
        for (int64_t j = 0; j < int64_t(q.M) * q.N; ++j) ref[i][s * sc + j] *= 0.5f;
        continue;
      }
      cpu::gemm(Op::T, Op::N, q.M, q.N, n, 2.f, q.a->values.data() + int64_t(r0) * q.lda, q.lda,
                q.b->values.data() + int64_t(r0) * q.ldb, q.ldb, 0.5f, ref[i].data() + s * sc, q.N);
    }
  DeviceBuffer<uint16_t> dX(X.bits), dY(Y.bits);
  DeviceBuffer<int> off(offsets);
  for (cuda::WgmmaTile tile : {cuda::WgmmaTile::N256S4, cuda::WgmmaTile::N256S3, cuda::WgmmaTile::N128S4,
                               cuda::WgmmaTile::N128S3}) {
    cuda::set_wgmma_tile(tile);
    std::vector<DeviceBuffer<float>> dC;
    for (size_t i = 0; i < ps.size(); ++i) dC.emplace_back(C0);
    std::vector<cuda::SegmentGemm> prods;
    for (size_t i = 0; i < ps.size(); ++i) {
      const P& q = ps[i];
      prods.push_back({q.M, q.N, 0, q.a == &X ? dX.get() : dY.get(), q.lda, q.b == &X ? dX.get() : dY.get(), q.ldb,
                       dC[i].get(), q.N, 0, sc});
    }
    cuda::segmented_gemm_tn_wgmma(2.f, 0.5f, prods, off.get(), S);
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_CLOSE(compare(dC[i].download(), ref[i], Tolerance{2e-6 * 683, 1e-4}),
                   fmt::format("tn {} x {}, tile {}", ps[i].M, ps[i].N, static_cast<int>(tile)));
  }
  cuda::set_wgmma_tile(cuda::WgmmaTile::N128S3);
}

TEST(CudaSegmentGemm, ToBf16RoundsToNearestEven) {
  DSV3_REQUIRE_GPU();
  Rng rng(23);
  auto v = rng.normal_vec<float>(1000);
  v.push_back(1.f + 1.f / 256);  // halfway between two bf16 values: rounds to the even one, 1.0
  DeviceBuffer<float> d(v);
  DeviceBuffer<uint16_t> b(v.size());
  cuda::to_bf16(b.get(), d.get(), v.size());
  std::vector<uint16_t> want;
  for (float x : v) want.push_back(float_to_bf16(x));
  EXPECT_EQ(b.download(), want);
  EXPECT_EQ(want.back(), float_to_bf16(1.f));
}

TEST(CudaSegmentGemm, RefusesUnalignedOperands) {
  DSV3_REQUIRE_GPU();
  DeviceBuffer<uint16_t> a(64), b(64);
  DeviceBuffer<float> c(64);
  DeviceBuffer<int> off(std::vector<int>{0, 2});
  const cuda::SegmentGemm ok{0, 8, 8, a.get(), 8, b.get(), 8, c.get(), 8, 64, 0};
  EXPECT_TRUE(cuda::segmented_gemm_supported({ok}, false));
  auto odd = ok;
  odd.A = a.get() + 4;  // 8 bytes off
  EXPECT_FALSE(cuda::segmented_gemm_supported({odd}, false));
  odd = ok;
  odd.N = 12;
  EXPECT_FALSE(cuda::segmented_gemm_supported({odd}, false));
  EXPECT_THROW(cuda::segmented_gemm_rows(Op::T, 1.f, 0.f, {odd}, off.get(), 1, 2), UserError);
}
#else
TEST(CudaBuffer, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif

// ---- safetensors: sizes from a hostile header (issue #21; fuzz/fuzz_safetensors.cpp keeps it so) -------------
namespace {
// Loads a file of header `h` followed by `data_bytes` zero bytes; returns the UserError's message ("" if it loads).
std::string safetensors_error(const std::string& h, size_t data_bytes, const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "dsv3_test_common_safetensors";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / name).string();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((uint64_t(h.size()) >> (8 * i)) & 0xff);
  std::ofstream(path, std::ios::binary) << bytes << h << std::string(data_bytes, '\0');
  try {
    SafetensorsFile f(path);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(SafetensorsSizes, OverflowingShapesAreRejectedNotWrapped) {
  // 2^61 x 8 elements wrap to 0 in 64 bits, which would match empty offsets
  EXPECT_NE(safetensors_error(R"({"a":{"dtype":"F32","shape":[2305843009213693952,8],"data_offsets":[0,0]}})", 0,
                              "rows.safetensors").find("overflows 64 bits"), std::string::npos);
  // 2^62 elements fit, their 2^64 bytes do not
  EXPECT_NE(safetensors_error(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0,
                              "bytes.safetensors").find("overflows 64 bits"), std::string::npos);
  EXPECT_NE(safetensors_error(R"({"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})", 0,
                              "dim.safetensors").find("bad dimension"), std::string::npos);
  EXPECT_NE(safetensors_error(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,18446744073709551615]}})", 2,
                              "offset.safetensors").find("outside the data"), std::string::npos);
  EXPECT_EQ(safetensors_error(R"({"a":{"dtype":"U8","shape":[0,4611686018427387904],"data_offsets":[0,0]}})", 0,
                              "empty.safetensors"), "");  // zero elements, however long the other side
  SafetensorsWriter w;
  EXPECT_THROW(w.add("a", DType::F32, {int64_t(1) << 61, 8}, nullptr, 0), UserError);
}

TEST(SafetensorsSizes, DeepNestingAndNonRegularFilesAreUserErrors) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_NE(safetensors_error(R"({"a":{"dtype":"U8","shape":[)" + deep + R"(],"data_offsets":[0,0]}})", 0,
                              "deep.safetensors").find("bad dimension a JSON array"), std::string::npos);
  EXPECT_THROW(SafetensorsFile(std::filesystem::temp_directory_path().string()), UserError);  // a folder
  if (std::filesystem::exists("/dev/zero")) {
    EXPECT_THROW(SafetensorsFile("/dev/zero"), UserError);  // a character device: would read forever
  }
}
