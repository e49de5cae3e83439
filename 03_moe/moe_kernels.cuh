// Stage 03, CUDA: the kernels that both expert paths use (moe_cuda.cu: grouped cuBLAS; moe_experts_bf16.cu:
// segmented bf16): SwiGLU forward and backward, the combine's backward. Outputs that feed only bf16 products
// are stored as bf16 (T = __nv_bfloat16), others fp32. Include only from stage 03's .cu files.
// Shapes: see the legend in moe.h.
#pragma once

#include <cstddef>

#include <cuda_bf16.h>

#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Outputs that feed only the segmented bf16 products are stored as bf16 (T = __nv_bfloat16), else fp32.
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// a = silu(h1) * h3
template <typename T>
__global__ void swiglu_kernel(T* a, const float* h1, const float* h3, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  put(a + i, h1[i] * sigmoidf(h1[i]) * h3[i]);
}

// dh1 = da * h3 * silu'(h1), dh3 = da * silu(h1);  silu'(x) = sig (1 + x (1 - sig))
template <typename T>
__global__ void swiglu_backward_kernel(T* dh1, T* dh3, const float* da, const float* h1, const float* h3,
                                       size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = h1[i], sg = sigmoidf(x);
  put(dh1 + i, da[i] * h3[i] * sg * (1.f + x * (1.f - sg)));
  put(dh3 + i, da[i] * x * sg);
}

// One warp per slot i = n*K+k, r = slot_row[i]: dw[i] = dout_n . eo_r;  deo_r = w[i] * dout_n.
template <typename T>
__global__ void combine_backward_kernel(float* dw, T* deo, const float* dout, const float* eo,
                                        const float* weights, const int* slot_row, int NK, int K, int D) {
  const int i = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= NK) return;
  const size_t r = slot_row[i];
  const float* dy = dout + static_cast<size_t>(i / K) * D;
  const float wi = weights[i];
  float acc = 0.f;
  for (int d = lane; d < D; d += kWarpSize) {
    acc += dy[d] * eo[r * D + d];
    put(deo + r * D + d, wi * dy[d]);
  }
  acc = warp_sum(acc);
  if (lane == 0) dw[i] = acc;
}

template <typename T>
void launch_swiglu(T* a, const float* h1, const float* h3, size_t n) {
  if (n == 0) return;
  swiglu_kernel<<<blocks_for(n, kThreads), kThreads>>>(a, h1, h3, n);
  CUDA_CHECK_LAST();
}

}  // namespace
}  // namespace dsv3::cuda
