// The device twin of common/rowwise.h: row-wise products and norms whose every output row depends on its own
// input row only, through a sequence of additions fixed by the source and the row's length, whatever the number
// of rows of the launch. The GPU decode paths are built on them (stage 02's cuda::mla_decode_chunk_absorbed, stage
// 03's cuda::mlp_rows / moe_rows, stage 05's cuda::block_decode, stage 07's GPU sampler), so a chunk of n tokens
// gives logits BITWISE equal to n single tokens on the GPU too, and a batch of B sequences bitwise equal to B
// single-sequence runs. cuBLAS cannot promise that: it may choose a different algorithm (and summation order) for
// M = 1 and M = 2.
//
// The order: lane l of a warp accumulates elements l, l+32, l+64, ... of the row with fmaf (in ascending order),
// then warp_sum combines the 32 lane sums in its fixed butterfly. Loads are scalar, so the order does not depend
// on a pointer's alignment either. Include only from .cu files.
//
// Shapes: n rows, in / out features; W in PyTorch Linear layout (out, in), row-major throughout.
#pragma once

#include <cstddef>

#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace rowwise {
namespace {  // internal linkage: every .cu that includes this file has its own copy of the kernels

// The lane's partial sum of a . b (n elements): elements lane, lane+32, ... in ascending order.
__device__ __forceinline__ float lane_dot(const float* a, const float* b, int n, int lane) {
  float acc = 0.f;
  for (int j = lane; j < n; j += kWarpSize) acc = fmaf(a[j], b[j], acc);
  return acc;
}
// a . b over the warp (every lane gets it).
__device__ __forceinline__ float warp_dot(const float* a, const float* b, int n, int lane) {
  return warp_sum(lane_dot(a, b, n, lane));
}

// Rows per warp of linear_rows_kernel: each weight element is loaded once for this many rows.
inline constexpr int kRows = 8;
inline constexpr int kWarpsPerBlock = 8;

// y (n, out) = x (n, in) W^T. Warp (o, chunk) computes output feature o of rows chunk*kRows .. +kRows-1; every row
// has its own accumulator and the same instruction sequence, so a row's value does not depend on n.
// x rows have stride ldx, y rows stride ldy (>= in, >= out).
__global__ void linear_rows_kernel(float* y, int ldy, const float* x, int ldx, const float* W, int n, int in,
                                   int out) {
  const int o = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int r0 = blockIdx.y * kRows;
  if (o >= out) return;
  const int nr = min(kRows, n - r0);
  const float* w = W + static_cast<size_t>(o) * in;
  const float* xr = x + static_cast<size_t>(r0) * ldx;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int j = lane; j < in; j += kWarpSize) {
    const float wj = w[j];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < nr) acc[r] = fmaf(wj, xr[static_cast<size_t>(r) * ldx + j], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (r < nr && lane == 0) y[static_cast<size_t>(r0 + r) * ldy + o] = v;
  }
}

// out (n, D) = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) (cpu::rmsnorm_rows); one warp per row; rows of x
// and out have stride ld. With residual (rows of stride D): first x += residual, written back to x, then the norm of
// the sum (out may then not alias x).
__global__ void rmsnorm_rows_kernel(float* out, float* x, const float* residual, const float* weight, int n, int D,
                                    int ld, float eps) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n) return;
  float* xr = x + static_cast<size_t>(row) * ld;
  if (residual) {
    const float* rr = residual + static_cast<size_t>(row) * D;
    for (int j = lane; j < D; j += kWarpSize) xr[j] += rr[j];
    __syncwarp();
  }
  const float rstd = 1.f / sqrtf(warp_dot(xr, xr, D, lane) / static_cast<float>(D) + eps);
  float* y = out + static_cast<size_t>(row) * ld;
  for (int j = lane; j < D; j += kWarpSize) y[j] = xr[j] * rstd * weight[j];
}

}  // namespace
}  // namespace rowwise

namespace {

// y (n, out) = x (n, in) W^T, rows of stride ldx / ldy (0: in / out). On the per-thread default stream.
inline void linear_rows(float* y, const float* x, const float* W, int n, int in, int out, int ldx = 0, int ldy = 0) {
  if (n <= 0 || out <= 0) return;
  const dim3 grid(blocks_for(out, rowwise::kWarpsPerBlock), blocks_for(n, rowwise::kRows));
  rowwise::linear_rows_kernel<<<grid, rowwise::kWarpsPerBlock * kWarpSize>>>(y, ldy ? ldy : out, x, ldx ? ldx : in,
                                                                              W, n, in, out);
  CUDA_CHECK_LAST();
}

// out (n, D) = rmsnorm(x) * weight, row by row (cpu::rmsnorm_rows); rows of stride ld (0: D). out may equal x.
inline void rmsnorm_rows(float* out, float* x, const float* weight, int n, int D, float eps, int ld = 0) {
  if (n <= 0) return;
  rowwise::rmsnorm_rows_kernel<<<blocks_for(n, rowwise::kWarpsPerBlock), rowwise::kWarpsPerBlock * kWarpSize>>>(
      out, x, nullptr, weight, n, D, ld ? ld : D, eps);
  CUDA_CHECK_LAST();
}

// x += residual, then out = rmsnorm(x) * weight (a block's residual add fused with the next norm); out != x.
inline void add_rmsnorm_rows(float* out, float* x, const float* residual, const float* weight, int n, int D,
                             float eps) {
  if (n <= 0) return;
  rowwise::rmsnorm_rows_kernel<<<blocks_for(n, rowwise::kWarpsPerBlock), rowwise::kWarpsPerBlock * kWarpSize>>>(
      out, x, residual, weight, n, D, D, eps);
  CUDA_CHECK_LAST();
}

}  // namespace
}  // namespace dsv3::cuda
