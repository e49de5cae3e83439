// Row-major GEMM over column-major cuBLAS.
//
// A row-major (R x C) matrix is, read by cuBLAS, the column-major (C x R) matrix: its transpose. So
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the ops,
// swap M and N. The leading dimensions stay the row strides.
#include "common/cuda_utils.h"
#include "common/gemm.h"

namespace dsv3::cuda {

static cublasOperation_t to_cublas(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
static cublasComputeType_t compute_type(GemmMath m) {
  return m == GemmMath::TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
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

}  // namespace dsv3::cuda
