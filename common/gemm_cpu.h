// Row-major matrix products on the CPU (Eigen), the twin of common/gemm.h's cuda::gemm with the same
// arguments (templated on the scalar type, so gradchecks run in double):
//
//   C(M,N) = alpha * op(A)(M,K) @ op(B)(K,N) + beta * C(M,N)
//
// lda/ldb/ldc are row strides; beta = 0 overwrites C (its old contents are never read, NaN included).
#pragma once

#include <Eigen/Core>

#include "common/gemm.h"

namespace dsv3 {

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

}  // namespace dsv3
