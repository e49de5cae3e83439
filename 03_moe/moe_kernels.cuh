// Stage 03, CUDA: the kernels that both expert paths use (moe_cuda.cu: grouped cuBLAS; moe_experts_bf16.cu:
// segmented bf16): SwiGLU forward and backward, the combine's backward. Outputs that feed only bf16 products
// are stored as bf16 (T = __nv_bfloat16), others fp32. Include only from stage 03's .cu files.
// Shapes: see the legend in moe.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include <initializer_list>

#include "03_moe/moe.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Outputs that feed only the segmented bf16 products are stored as bf16 (T = __nv_bfloat16), else fp32.
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// a = silu(h1) * h3. Version 1: one element a thread; it also takes the tail and unaligned buffers of the
// four-a-thread kernels below (16-byte loads and stores: the element kernels ran at ~2.2 TB/s on an H200, 76 us
// for the bench model's 65536 x 256 routed slots; the arithmetic per element is identical, so are the results).
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

// Four consecutive elements: a float4, or four bf16 in 8 bytes.
__device__ __forceinline__ void put4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void put4(__nv_bfloat16* p, float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  *reinterpret_cast<uint2*>(p) = make_uint2(*reinterpret_cast<const unsigned*>(&lo),
                                            *reinterpret_cast<const unsigned*>(&hi));
}
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

template <typename T>
__global__ void swiglu4_kernel(T* a, const float* h1, const float* h3, size_t n4) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 x = load4(h1 + 4 * i), y = load4(h3 + 4 * i);
  put4(a + 4 * i, make_float4(x.x * sigmoidf(x.x) * y.x, x.y * sigmoidf(x.y) * y.y, x.z * sigmoidf(x.z) * y.z,
                              x.w * sigmoidf(x.w) * y.w));
}

template <typename T>
__global__ void swiglu_backward4_kernel(T* dh1, T* dh3, const float* da, const float* h1, const float* h3,
                                        size_t n4) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 g = load4(da + 4 * i), x = load4(h1 + 4 * i), y = load4(h3 + 4 * i);
  float d1[4], d3[4];
  const float gv[4] = {g.x, g.y, g.z, g.w}, xv[4] = {x.x, x.y, x.z, x.w}, yv[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float sg = sigmoidf(xv[j]);
    d1[j] = gv[j] * yv[j] * sg * (1.f + xv[j] * (1.f - sg));
    d3[j] = gv[j] * xv[j] * sg;
  }
  put4(dh1 + 4 * i, make_float4(d1[0], d1[1], d1[2], d1[3]));
  put4(dh3 + 4 * i, make_float4(d3[0], d3[1], d3[2], d3[3]));
}

// The vector kernels take elements [0, 4 n4) where every buffer is 16-byte aligned (8 for bf16 outputs), the
// element kernels the rest.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
template <typename T>
bool vector_ok(const T* out) {
  return reinterpret_cast<uintptr_t>(out) % (4 * sizeof(T)) == 0;
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
  size_t done = 0;
  if (vector_ok(a) && aligned16(h1) && aligned16(h3) && n >= 4) {
    done = n / 4 * 4;
    swiglu4_kernel<<<blocks_for(n / 4, kThreads), kThreads>>>(a, h1, h3, n / 4);
    CUDA_CHECK_LAST();
  }
  if (done < n) {
    swiglu_kernel<<<blocks_for(n - done, kThreads), kThreads>>>(a + done, h1 + done, h3 + done, n - done);
    CUDA_CHECK_LAST();
  }
}

template <typename T>
void launch_swiglu_backward(T* dh1, T* dh3, const float* da, const float* h1, const float* h3, size_t n) {
  if (n == 0) return;
  size_t done = 0;
  if (vector_ok(dh1) && vector_ok(dh3) && aligned16(da) && aligned16(h1) && aligned16(h3) && n >= 4) {
    done = n / 4 * 4;
    swiglu_backward4_kernel<<<blocks_for(n / 4, kThreads), kThreads>>>(dh1, dh3, da, h1, h3, n / 4);
    CUDA_CHECK_LAST();
  }
  if (done < n) {
    swiglu_backward_kernel<<<blocks_for(n - done, kThreads), kThreads>>>(dh1 + done, dh3 + done, da + done,
                                                                         h1 + done, h3 + done, n - done);
    CUDA_CHECK_LAST();
  }
}

// ---- the bf16 expert paths' operands (moe_experts_bf16.cu, moe_experts_hopper.cu) ----

// xp (NK, D) in bf16 from fp32 inp: as gather_kernel, four elements (16 bytes in, 8 out) per thread; D4 = D / 4.
__global__ void gather_bf16_kernel(uint2* xp, const float4* inp, const int* perm, int NK, int K, int D4) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(NK) * D4) return;
  const size_t r = idx / D4, d = idx % D4;
  const float4 v = inp[static_cast<size_t>(perm[r] / K) * D4 + d];
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  xp[idx] = make_uint2(*reinterpret_cast<const unsigned*>(&lo), *reinterpret_cast<const unsigned*>(&hi));
}

using bf16 = __nv_bfloat16;
inline uint16_t* bits(bf16* p) { return reinterpret_cast<uint16_t*>(p); }

// The fp32 buffers these paths read as float4 or write as rows of 16-byte aligned tiles must be 16-byte aligned.
inline void require_aligned(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    require(reinterpret_cast<uintptr_t>(p) % 16 == 0, "moe (CUDA, bf16 experts): a buffer is not 16-byte aligned "
            "(moe_saved_layout aligns its own; a caller's input or gradient must be too)");
}

// bf16 copies of an MoE's routed weights into wb (3 E F D): w1 at 0, w3 at E F D, w2 at 2 E F D.
inline void expert_weights_bf16(bf16* wb, const MoeWeights<float>& w, int E, int D, int F) {
  const size_t n = static_cast<size_t>(E) * F * D;
  to_bf16(bits(wb), w.w1, n);
  to_bf16(bits(wb + n), w.w3, n);
  to_bf16(bits(wb + 2 * n), w.w2, n);
}

inline void gather_bf16(bf16* xp, const float* inp, const int* perm, int NK, int K, int D) {
  const size_t n = static_cast<size_t>(NK) * (D / 4);
  gather_bf16_kernel<<<blocks_for(n, kThreads), kThreads>>>(reinterpret_cast<uint2*>(xp),
                                                            reinterpret_cast<const float4*>(inp), perm, NK, K, D / 4);
  CUDA_CHECK_LAST();
}

}  // namespace
}  // namespace dsv3::cuda
