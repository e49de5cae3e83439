// y += x on the device: the residual adds of the block and of the MTP chain. Include only from .cu files.
#pragma once

#include <cstddef>

#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace {

__global__ void add_inplace_kernel(float* y, const float* x, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

void add_inplace(float* y, const float* x, size_t n) {
  constexpr int kThreads = 256;
  if (n == 0) return;
  add_inplace_kernel<<<blocks_for(n, kThreads), kThreads>>>(y, x, n);
  CUDA_CHECK_LAST();
}

}  // namespace
}  // namespace dsv3::cuda
