// Small device-side building blocks shared by the stages' kernels. Include only from .cu files.
#pragma once

#include <cstddef>

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

// Blocks of `threads` needed to cover n items.
inline int blocks_for(size_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

}  // namespace dsv3::cuda
