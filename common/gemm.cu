// Row-major GEMM over column-major cuBLAS.
//
// A row-major (R x C) matrix is, read by cuBLAS, the column-major (C x R) matrix: its transpose. So
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the ops,
// swap M and N. The leading dimensions stay the row strides.
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

#include <vector>

namespace dsv3::cuda {

namespace {
// The math of GemmMath::Scoped products on this thread (a ScopedGemmMath changes it for its lifetime).
thread_local GemmMath scoped_math = GemmMath::FP32;
}  // namespace

ScopedGemmMath::ScopedGemmMath(GemmMath m) : previous_(scoped_math) {
  if (m != GemmMath::Scoped) scoped_math = m;
}
ScopedGemmMath::~ScopedGemmMath() { scoped_math = previous_; }

static cublasOperation_t to_cublas(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
static cublasComputeType_t compute_type(GemmMath m) {
  if (m == GemmMath::Scoped) m = scoped_math;
  switch (m) {
    case GemmMath::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case GemmMath::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
  }
}

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, GemmMath math) {
  if (M == 0 || N == 0) return;
  CUBLAS_CHECK(cublasGemmEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B, CUDA_R_32F,
                            ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F, ldc, compute_type(math),
                            CUBLAS_GEMM_DEFAULT));
}

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, const float* B, float beta,
          float* C, GemmMath math) {
  gemm(opA, opB, M, N, K, alpha, A, opA == Op::N ? K : M, B, opB == Op::N ? N : K, beta, C, N, math);
}

void gemm_strided_batched(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                          int64_t strideA, const float* B, int ldb, int64_t strideB, float beta, float* C,
                          int ldc, int64_t strideC, int batch, GemmMath math) {
  if (M == 0 || N == 0 || batch == 0) return;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B,
                                          CUDA_R_32F, ldb, strideB, A, CUDA_R_32F, lda, strideA, &beta, C,
                                          CUDA_R_32F, ldc, strideC, batch, compute_type(math),
                                          CUBLAS_GEMM_DEFAULT));
}

// cuBLAS's grouped GEMM has no bf16-compute mode for fp32 operands (CUBLAS_COMPUTE_32F_FAST_16BF is refused):
// under BF16 the grouped products run on the tensor cores in TF32 (operands rounded to 10 mantissa bits, not 7).
static cublasComputeType_t grouped_compute_type(GemmMath m) {
  if (m == GemmMath::Scoped) m = scoped_math;
  return compute_type(m == GemmMath::BF16 ? GemmMath::TF32 : m);
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

void GroupedGemms::run(int i, GemmMath math) {
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

}  // namespace dsv3::cuda
