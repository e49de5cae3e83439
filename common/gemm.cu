// Row-major GEMM over column-major cuBLAS.
//
// A row-major (R x C) matrix is, read by cuBLAS, the column-major (C x R) matrix: its transpose. So
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the ops,
// swap M and N. The leading dimensions stay the row strides.
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dsv3 {

namespace cuda {

static cublasOperation_t to_cublas(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
static cublasComputeType_t compute_type(Matmul m) {
  switch (m) {
    case Matmul::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case Matmul::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
  }
}

static void gemm_on(cublasHandle_t h, Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc, Matmul math) {
  if (M == 0 || N == 0) return;
  CUBLAS_CHECK(cublasGemmEx(h, to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F,
                            lda, &beta, C, CUDA_R_32F, ldc, compute_type(math), CUBLAS_GEMM_DEFAULT));
}

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, Matmul math) {
  gemm_on(blas_handle(), opA, opB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, math);
}

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, const float* B, float beta,
          float* C, Matmul math) {
  gemm(opA, opB, M, N, K, alpha, A, opA == Op::N ? K : M, B, opB == Op::N ? N : K, beta, C, N, math);
}

void gemm_strided_batched(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                          int64_t strideA, const float* B, int ldb, int64_t strideB, float beta, float* C,
                          int ldc, int64_t strideC, int batch, Matmul math) {
  if (M == 0 || N == 0 || batch == 0) return;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B,
                                          CUDA_R_32F, ldb, strideB, A, CUDA_R_32F, lda, strideA, &beta, C,
                                          CUDA_R_32F, ldc, strideC, batch, compute_type(math),
                                          CUBLAS_GEMM_DEFAULT));
}

namespace {
// Pointer tables of gemm_batched_2d: entry i = outer i / inner, inner i % inner.
struct Strides2d {
  int64_t outer, inner;
};
__global__ void pointer_table_kernel(const float** a, const float** b, float** c, const float* A, Strides2d sa,
                                     const float* B, Strides2d sb, float* C, Strides2d sc, int outer, int inner) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= outer * inner) return;
  const int o = i / inner, n = i % inner;
  a[i] = A + o * sa.outer + n * sa.inner;
  b[i] = B + o * sb.outer + n * sb.inner;
  c[i] = C + o * sc.outer + n * sc.inner;
}
}  // namespace

void gemm_batched_2d(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, int64_t sa_outer,
                     int64_t sa_inner, const float* B, int ldb, int64_t sb_outer, int64_t sb_inner, float beta,
                     float* C, int ldc, int64_t sc_outer, int64_t sc_inner, int outer, int inner, Matmul math) {
  const int batch = outer * inner;
  if (M == 0 || N == 0 || batch == 0) return;
  // cuBLAS cannot see the alignment of pointers in a device table, and its tensor-core kernels fault on
  // pointers off 16 bytes: unless every pointer and row is 16-byte aligned, one strided call per value of the
  // smaller index instead.
  const auto al = [](int64_t v) { return v % 4 == 0; };
  const auto ap = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!(ap(A) && ap(B) && ap(C) && al(lda) && al(ldb) && al(ldc) && al(sa_outer) && al(sa_inner) && al(sb_outer) &&
        al(sb_inner) && al(sc_outer) && al(sc_inner))) {
    if (outer >= inner) {
      for (int n = 0; n < inner; ++n)
        gemm_strided_batched(opA, opB, M, N, K, alpha, A + n * sa_inner, lda, sa_outer, B + n * sb_inner, ldb,
                             sb_outer, beta, C + n * sc_inner, ldc, sc_outer, outer, math);
    } else {
      for (int o = 0; o < outer; ++o)
        gemm_strided_batched(opA, opB, M, N, K, alpha, A + o * sa_outer, lda, sa_inner, B + o * sb_outer, ldb,
                             sb_inner, beta, C + o * sc_outer, ldc, sc_inner, inner, math);
    }
    return;
  }
  ScratchBuffer<float*> table(3 * static_cast<size_t>(batch));
  float** t = table.get();
  const int threads = 256;
  pointer_table_kernel<<<(batch + threads - 1) / threads, threads>>>(
      const_cast<const float**>(t), const_cast<const float**>(t + batch), t + 2 * batch, A, {sa_outer, sa_inner}, B,
      {sb_outer, sb_inner}, C, {sc_outer, sc_inner}, outer, inner);
  CUDA_CHECK_LAST();
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets (B, A), N x M
  CUBLAS_CHECK(cublasGemmBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha,
                                   reinterpret_cast<const void* const*>(t + batch), CUDA_R_32F, ldb,
                                   reinterpret_cast<const void* const*>(t), CUDA_R_32F, lda, &beta,
                                   reinterpret_cast<void* const*>(t + 2 * batch), CUDA_R_32F, ldc, batch,
                                   compute_type(math), CUBLAS_GEMM_DEFAULT));
}

namespace {
// The side streams of gemm_concurrent, each with its own cuBLAS handle (and so its own workspace), and the
// events that fork them from and join them back to the default stream. One set per host thread, kept.
constexpr int kSideStreams = 4;
struct SideStreams {
  Stream streams[kSideStreams];
  CublasHandle handles[kSideStreams];
  cudaEvent_t fork{}, join[kSideStreams]{};
  SideStreams() {
    CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int i = 0; i < kSideStreams; ++i) {
      CUBLAS_CHECK(cublasSetStream(handles[i].get(), streams[i].get()));
      CUDA_CHECK(cudaEventCreateWithFlags(&join[i], cudaEventDisableTiming));
    }
  }
  ~SideStreams() {
    cudaEventDestroy(fork);
    for (auto& e : join) cudaEventDestroy(e);
  }
};

SideStreams& side_streams() {
  thread_local SideStreams side;
  return side;
}
}  // namespace

void ConcurrentGemms::run(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems,
                          Matmul math) {
  std::vector<const GemmProblem*> live;
  for (const auto& p : problems)
    if (p.M > 0 && p.N > 0 && (p.K > 0 || beta != 1.f)) live.push_back(&p);
  if (!live.empty()) {
    SideStreams& side = side_streams();
    const int lanes = static_cast<int>(std::min<size_t>(kSideStreams, live.size()));
    CUDA_CHECK(cudaEventRecord(side.fork, nullptr));
    for (int i = 0; i < lanes; ++i) CUDA_CHECK(cudaStreamWaitEvent(side.streams[i].get(), side.fork, 0));
    for (size_t j = 0; j < live.size(); ++j) {
      const GemmProblem& p = *live[j];
      gemm_on(side.handles[j % lanes].get(), opA, opB, p.M, p.N, p.K, alpha, p.A, p.lda, p.B, p.ldb, beta, p.C,
              p.ldc, math);
    }
    lanes_ = std::max(lanes_, lanes);
  }
}

void ConcurrentGemms::join() {
  if (lanes_ == 0) return;
  SideStreams& side = side_streams();
  for (int i = 0; i < lanes_; ++i) {
    CUDA_CHECK(cudaEventRecord(side.join[i], side.streams[i].get()));
    CUDA_CHECK(cudaStreamWaitEvent(nullptr, side.join[i], 0));
  }
  lanes_ = 0;
}

ConcurrentGemms::~ConcurrentGemms() {
  try {
    join();
  } catch (const std::exception&) {
    // a destructor must not throw: the failed CUDA call shows again at the next checked call
  }
}

// cuBLAS's grouped GEMM has no bf16-compute mode for fp32 operands (CUBLAS_COMPUTE_32F_FAST_16BF is refused):
// under BF16 the grouped products run on the tensor cores in TF32 (operands rounded to 10 mantissa bits, not 7).
static cublasComputeType_t grouped_compute_type(Matmul m) {
  return compute_type(m == Matmul::BF16 ? Matmul::TF32 : m);
}

int GroupedGemms::add(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems) {
  require(dev_ == nullptr, "GroupedGemms::add after upload()");
  Product pr{opA, opB, alpha, beta, {}, {}, {}, {}, {}, {}, 0};
  std::vector<const void*> a, b, c;
  for (const auto& p : problems) {
    if (p.M == 0 || p.N == 0) continue;
    if (p.K == 0) {
      require(beta == 1.f, "GroupedGemms: a problem with K = 0 needs beta = 1");
      continue;
    }
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets (B, A), N x M
    pr.m.push_back(p.N);
    pr.n.push_back(p.M);
    pr.k.push_back(p.K);
    a.push_back(p.B);
    pr.lda.push_back(p.ldb);
    b.push_back(p.A);
    pr.ldb.push_back(p.lda);
    c.push_back(p.C);
    pr.ldc.push_back(p.ldc);
  }
  pr.first = table_.size();
  table_.insert(table_.end(), a.begin(), a.end());
  table_.insert(table_.end(), b.begin(), b.end());
  table_.insert(table_.end(), c.begin(), c.end());
  products_.push_back(std::move(pr));
  return static_cast<int>(products_.size()) - 1;
}

void GroupedGemms::upload() {
  if (table_.empty()) return;
  void* p = nullptr;
  CUDA_CHECK(cudaMallocAsync(&p, table_.size() * sizeof(void*), nullptr));
  owner_ = std::shared_ptr<void>(p, [](void* q) { cudaFreeAsync(q, nullptr); });
  dev_ = static_cast<const void**>(p);
  // from pageable memory: returns once table_ is staged, so table_ may change afterwards
  CUDA_CHECK(cudaMemcpyAsync(p, table_.data(), table_.size() * sizeof(void*), cudaMemcpyHostToDevice, nullptr));
}

void GroupedGemms::run(int i, Matmul math) {
  const Product& pr = products_.at(static_cast<size_t>(i));
  const int groups = static_cast<int>(pr.m.size());
  if (groups == 0) return;
  require(dev_ != nullptr, "GroupedGemms::run before upload()");
  const std::vector<cublasOperation_t> ta(groups, to_cublas(pr.opB)), tb(groups, to_cublas(pr.opA));
  const std::vector<float> alphas(groups, pr.alpha), betas(groups, pr.beta);
  const std::vector<int> sizes(groups, 1);
  const void* const* a = dev_ + pr.first;
  CUBLAS_CHECK(cublasGemmGroupedBatchedEx(blas_handle(), ta.data(), tb.data(), pr.m.data(), pr.n.data(),
                                          pr.k.data(), alphas.data(), a, CUDA_R_32F, pr.lda.data(), a + groups,
                                          CUDA_R_32F, pr.ldb.data(), betas.data(),
                                          const_cast<void* const*>(a + 2 * groups), CUDA_R_32F, pr.ldc.data(),
                                          groups, sizes.data(), grouped_compute_type(math)));
}

}  // namespace cuda
}  // namespace dsv3
