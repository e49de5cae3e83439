// gemm_bench: the micro-benchmark of common/gemm.cu's two ways of running a bf16 product (gemm.h: Bf16Gemm; the
// oracle test is common_test's CudaGemm.Bf16CopiesEqualTheProductOfRoundedOperands).
//
// For each product of stage 07's "small" benchmark model (32 x 512 tokens; forward, input gradient and weight
// gradient of every projection, and the attention's per-(sequence, head) products), times on the GPU:
//   tf32      fp32 operands, Matmul::TF32
//   v1        Matmul::BF16, Bf16Gemm::Fast16bf (the default): cuBLAS reads the fp32 operands
//   v2        Matmul::BF16, Bf16Gemm::Bf16Copies: bf16 copies of both operands first, then bf16 inputs
//   v2-gemm   v2's cuBLAS call alone on copies made beforehand: what kernels writing their outputs in bf16
//             would buy
// Median of --reps timed calls after warm-up, in microseconds, and the product's rate in TFLOP/s; one table line
// per product, a total line at the end. Needs a GPU (exit 2 without one).
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3 {
namespace {

struct Product {
  std::string name;
  Op opA, opB;
  int M, N, K;
  int lda, ldb, ldc;
  // batched over (outer, inner) with these element strides (outer = 0: a plain product)
  int outer = 0, inner = 0;
  int64_t sa_o = 0, sa_i = 0, sb_o = 0, sb_i = 0, sc_o = 0, sc_i = 0;
};

size_t span(Op op, int rows, int cols, int ld) {
  return op == Op::N ? size_t(rows - 1) * ld + cols : size_t(cols - 1) * ld + rows;
}
size_t a_elems(const Product& p) {
  return span(p.opA, p.M, p.K, p.lda) + (p.outer ? size_t(p.outer - 1) * p.sa_o + size_t(p.inner - 1) * p.sa_i : 0);
}
size_t b_elems(const Product& p) {
  return span(p.opB, p.K, p.N, p.ldb) + (p.outer ? size_t(p.outer - 1) * p.sb_o + size_t(p.inner - 1) * p.sb_i : 0);
}
size_t c_elems(const Product& p) {
  return size_t(p.M - 1) * p.ldc + p.N + (p.outer ? size_t(p.outer - 1) * p.sc_o + size_t(p.inner - 1) * p.sc_i : 0);
}
double flops(const Product& p) { return 2.0 * p.M * p.N * p.K * (p.outer ? double(p.outer) * p.inner : 1.0); }

// The three products of a linear layer y (rows, out) = x (rows, in) W^T, as stage 02's linear/linear_backward
// issue them.
void add_linear(std::vector<Product>& ps, const std::string& name, int rows, int in, int out) {
  ps.push_back({name + " fwd", Op::N, Op::T, rows, out, in, in, in, out});
  ps.push_back({name + " dx", Op::N, Op::N, rows, in, out, out, in, in});
  ps.push_back({name + " dW", Op::T, Op::N, out, in, rows, out, in, in});
}

std::vector<Product> small_model_products(int B, int T) {
  // the "small" preset (06_full_model/model_config.cpp)
  const int D = 512, Dq = 256, H = 8, Dn = 64, Dr = 32, Dv = 64, Dc = 128, F = 1408, Fe = 256, V = 8192;
  const int N = B * T, qk = Dn + Dr;
  std::vector<Product> ps;
  add_linear(ps, "wq_a", N, D, Dq);
  add_linear(ps, "wq_b", N, Dq, H * qk);
  add_linear(ps, "wkv_a", N, D, Dc + Dr);
  add_linear(ps, "wkv_b", N, Dc, H * (Dn + Dv));
  add_linear(ps, "wo", N, H * Dv, D);
  add_linear(ps, "ffn w1", N, D, F);
  add_linear(ps, "ffn w2", N, F, D);
  add_linear(ps, "shared w1", N, D, Fe);
  add_linear(ps, "shared w2", N, Fe, D);
  add_linear(ps, "head", N, D, V);
  // attention per (sequence b, head h): q, k (N, H, qk), v (N, H, Dv), scores/probabilities (B, H, T, T)
  const int64_t tt = int64_t(T) * T;
  auto att = [&](std::string name, Op oa, Op ob, int M, int Nn, int K, int lda, int64_t sab, int64_t sah, int ldb,
                 int64_t sbb, int64_t sbh, int ldc, int64_t scb, int64_t sch) {
    Product p{name, oa, ob, M, Nn, K, lda, ldb, ldc, B, H, sab, sah, sbb, sbh, scb, sch};
    ps.push_back(p);
  };
  const int64_t qs = int64_t(T) * H * qk, vs = int64_t(T) * H * Dv;
  att("att S=QK^T", Op::N, Op::T, T, T, qk, H * qk, qs, qk, H * qk, qs, qk, T, H * tt, tt);
  att("att O=PV", Op::N, Op::N, T, Dv, T, T, H * tt, tt, H * Dv, vs, Dv, H * Dv, vs, Dv);
  att("att dP=dO V^T", Op::N, Op::T, T, T, Dv, H * Dv, vs, Dv, H * Dv, vs, Dv, T, H * tt, tt);
  att("att dV=P^T dO", Op::T, Op::N, T, Dv, T, T, H * tt, tt, H * Dv, vs, Dv, H * Dv, vs, Dv);
  att("att dQ=dS K", Op::N, Op::N, T, qk, T, T, H * tt, tt, H * qk, qs, qk, H * qk, qs, qk);
  att("att dK=dS^T Q", Op::T, Op::N, T, qk, T, T, H * tt, tt, H * qk, qs, qk, H * qk, qs, qk);
  return ps;
}

void run(const Product& p, const float* A, const float* Bm, float* C, Matmul m) {
  if (!p.outer)
    cuda::gemm(p.opA, p.opB, p.M, p.N, p.K, 1.f, A, p.lda, Bm, p.ldb, 0.f, C, p.ldc, m);
  else
    cuda::gemm_batched_2d(p.opA, p.opB, p.M, p.N, p.K, 1.f, A, p.lda, p.sa_o, p.sa_i, Bm, p.ldb, p.sb_o, p.sb_i, 0.f,
                          C, p.ldc, p.sc_o, p.sc_i, p.outer, p.inner, m);
}

// v2's cuBLAS call alone, on bf16 operands made beforehand (the plain products; the batched ones through a
// strided call per sequence would not be the same call, so they are left out).
void run_bf16_only(const Product& p, const uint16_t* A, const uint16_t* Bm, float* C) {
  const float one = 1.f, zero = 0.f;
  const auto op = [](Op o) { return o == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; };
  CUBLAS_CHECK(cublasGemmEx(cuda::blas_handle(), op(p.opB), op(p.opA), p.N, p.M, p.K, &one, Bm, CUDA_R_16BF, p.ldb,
                            A, CUDA_R_16BF, p.lda, &zero, C, CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

float median_us(const std::function<void()>& f, int reps) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> t;
  EventTimer timer;
  for (int i = 0; i < reps; ++i) {
    timer.start();
    f();
    timer.stop();
    t.push_back(timer.elapsed_ms() * 1000.f);
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

__global__ void fill_kernel(float* x, size_t n, uint32_t seed) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  x[i] = (static_cast<float>(h & 0xffffff) / 16777216.f - 0.5f) * 0.2f;
}

int bench_main(int argc, char** argv) {
  CLI::App app{"gemm_bench: bf16 products of the small benchmark model, version 1 against version 2", "gemm_bench"};
  int batch = 32, seq = 512, reps = 20;
  app.add_option("--batch", batch, "sequences")->check(CLI::Range(1, 1024));
  app.add_option("--seq-len", seq, "tokens per sequence")->check(CLI::Range(8, 4096));
  app.add_option("--reps", reps, "timed calls per variant")->check(CLI::Range(1, 10000));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    fmt::print(stderr, "gemm_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::vector<Product> ps = small_model_products(batch, seq);
  fmt::print("gemm_bench on {} (batch {} x seq {}, median of {} calls, microseconds and TFLOP/s)\n", prop.name, batch,
             seq, reps);
  fmt::print("{:<16} {:>5} {:>5} {:>6} {:>10} {:>10} {:>10} {:>10}  {:>6} {:>6} {:>6}\n", "product", "M", "N", "K",
             "tf32", "v1", "v2", "v2-gemm", "TF v1", "TF v2", "v1/v2");
  double tot[4] = {0, 0, 0, 0};
  for (const Product& p : ps) {
    const size_t na = a_elems(p), nb = b_elems(p), nc = c_elems(p);
    DeviceBuffer<float> A(na), Bm(nb), C(nc);
    fill_kernel<<<static_cast<int>((na + 255) / 256), 256>>>(A.get(), na, 1u);
    fill_kernel<<<static_cast<int>((nb + 255) / 256), 256>>>(Bm.get(), nb, 2u);
    CUDA_CHECK_LAST();
    float t[4] = {0, 0, 0, 0};
    t[0] = median_us([&] { run(p, A.get(), Bm.get(), C.get(), Matmul::TF32); }, reps);
    cuda::set_bf16_gemm(cuda::Bf16Gemm::Fast16bf);
    t[1] = median_us([&] { run(p, A.get(), Bm.get(), C.get(), Matmul::BF16); }, reps);
    cuda::set_bf16_gemm(cuda::Bf16Gemm::Bf16Copies);
    t[2] = median_us([&] { run(p, A.get(), Bm.get(), C.get(), Matmul::BF16); }, reps);
    if (!p.outer) {
      DeviceBuffer<uint16_t> A16(na), B16(nb);
      cuda::to_bf16(A16.get(), A.get(), na);
      cuda::to_bf16(B16.get(), Bm.get(), nb);
      t[3] = median_us([&] { run_bf16_only(p, A16.get(), B16.get(), C.get()); }, reps);
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < 4; ++i) tot[i] += t[i];
    const double f = flops(p);
    fmt::print("{:<16} {:>5} {:>5} {:>6} {:>10.1f} {:>10.1f} {:>10.1f} {:>10}  {:>6.0f} {:>6.0f} {:>6.2f}\n", p.name,
               p.M, p.N, p.K, t[0], t[1], t[2], p.outer ? std::string("-") : fmt::format("{:.1f}", t[3]),
               f / t[1] * 1e-6, f / t[2] * 1e-6, t[1] / t[2]);
  }
  fmt::print("{:<30} {:>10.1f} {:>10.1f} {:>10.1f} {:>10.1f}  (us, all products once; v2-gemm: plain ones)\n",
             "total", tot[0], tot[1], tot[2], tot[3]);
  return 0;
}

}  // namespace
}  // namespace dsv3

int main(int argc, char** argv) {
  try {
    return dsv3::bench_main(argc, argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "gemm_bench: {}\n", e.what());
    return 2;
  }
}
