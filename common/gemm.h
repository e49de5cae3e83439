// Row-major matrix products, the same call on the CPU (Eigen) and on the GPU (cuBLAS).
//
//   C(M,N) = alpha * op(A)(M,K) @ op(B)(K,N) + beta * C(M,N)
//
// op(X) is X (Op::N) or its transpose (Op::T). lda/ldb/ldc are row strides of the matrices as stored
// (so a head's slice of a wider row is a matrix with ld = the row width). The packed overloads take
// ld = the stored row length. beta = 0 overwrites C (its old contents are never read, NaN included).
#pragma once

#include <cstdint>

#include <Eigen/Core>

namespace dsv3 {

enum class Op { N, T };

namespace cpu {

template <typename T>
void gemm(Op opA, Op opB, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
          T* C, int ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  using CMap = Eigen::Map<const Mat, 0, Stride>;
  Eigen::Map<Mat, 0, Stride> c(C, M, N, Stride(ldc));
  const int ar = opA == Op::N ? M : K, ac = opA == Op::N ? K : M;
  const int br = opB == Op::N ? K : N, bc = opB == Op::N ? N : K;
  CMap a(A, ar, ac, Stride(lda));
  CMap b(B, br, bc, Stride(ldb));
  Mat prod(M, N);
  if (opA == Op::N && opB == Op::N) prod.noalias() = a * b;
  if (opA == Op::N && opB == Op::T) prod.noalias() = a * b.transpose();
  if (opA == Op::T && opB == Op::N) prod.noalias() = a.transpose() * b;
  if (opA == Op::T && opB == Op::T) prod.noalias() = a.transpose() * b.transpose();
  if (beta == T(0))
    c = alpha * prod;
  else
    c = alpha * prod + beta * c;
}

template <typename T>
void gemm(Op opA, Op opB, int M, int N, int K, T alpha, const T* A, const T* B, T beta, T* C) {
  gemm(opA, opB, M, N, K, alpha, A, opA == Op::N ? K : M, B, opB == Op::N ? N : K, beta, C, N);
}

}  // namespace cpu

namespace cuda {

// FP32: exact fp32 products (the path tested against the CPU). TF32: tensor cores, ~1e-3 rel. error.
enum class GemmMath { FP32, TF32 };

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, GemmMath math = GemmMath::FP32);
void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, const float* B, float beta,
          float* C, GemmMath math = GemmMath::FP32);
// batch independent products; matrix i starts at A + i*strideA (likewise B, C).
void gemm_strided_batched(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                          int64_t strideA, const float* B, int ldb, int64_t strideB, float beta, float* C,
                          int ldc, int64_t strideC, int batch, GemmMath math = GemmMath::FP32);

}  // namespace cuda
}  // namespace dsv3
