// Small device-side building blocks shared by the stages' kernels, and y += x (the residual adds of the block,
// the MTP chain and the model). Include only from .cu files.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.h"

namespace dsv3::cuda {

inline constexpr int kWarpSize = 32;

// Sum of v over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Asynchronous global -> shared copies (cp.async, sm_80+): 16 bytes from src to the shared address dst, or 16 zero
// bytes when !valid (src is then not read); copies issued since the last commit form a group; wait until at most N
// groups are still in flight. The tiled kernels (stage 02's fused attention, the segmented products) stream their
// operand tiles with these.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Blocks of `threads` needed to cover n items.
inline int blocks_for(size_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

namespace {

__global__ void add_inplace_kernel(float* y, const float* x, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

// y (n) += x (n) on the device.
inline void add_inplace(float* y, const float* x, size_t n) {
  constexpr int kThreads = 256;
  if (n == 0) return;
  add_inplace_kernel<<<blocks_for(n, kThreads), kThreads>>>(y, x, n);
  CUDA_CHECK_LAST();
}

}  // namespace

}  // namespace dsv3::cuda
