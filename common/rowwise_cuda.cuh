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

// 1 / sqrt(mean(x^2) + eps) of a row of D, as rmsnorm_rows_kernel computes it.
__device__ __forceinline__ float row_rstd(const float* xr, int D, float eps, int lane) {
  return 1.f / sqrtf(warp_dot(xr, xr, D, lane) / static_cast<float>(D) + eps);
}

// ---- version 2's forms: the same additions in the same order (bitwise the values above), written so that a lane
// issues a batch of kIlp loads (predicated, fully unrolled) before the first product needs one. A decode step is
// bound by the latency of its loads (weights from memory, a few per lane per row), not by their bytes: a loop that
// waits for each load in turn pays a memory round trip per 32 elements. (A `#pragma unroll` on the strided loop
// does not do it: its trip count is a runtime value, and the few iterations of a decode row all fall to the
// remainder loop.)
inline constexpr int kIlp = 16;
__device__ __forceinline__ float lane_dot_ilp(const float* a, const float* b, int n, int lane) {
  float acc = 0.f;
  for (int j0 = lane; j0 < n; j0 += kIlp * kWarpSize) {
    float va[kIlp], vb[kIlp];
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int j = j0 + i * kWarpSize;
      va[i] = j < n ? a[j] : 0.f;
      vb[i] = j < n ? b[j] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kIlp; ++i)
      if (j0 + i * kWarpSize < n) acc = fmaf(va[i], vb[i], acc);
  }
  return acc;
}
__device__ __forceinline__ float row_rstd_ilp(const float* xr, int D, float eps, int lane) {
  return 1.f / sqrtf(warp_sum(lane_dot_ilp(xr, xr, D, lane)) / static_cast<float>(D) + eps);
}
// lane_dot of w with the normalised row x * rstd * g (rmsnorm_rows' value of every element, not stored): the fused
// kernels of version 2 normalise on the fly with bitwise row_rstd's factor.
__device__ __forceinline__ float lane_dot_normed(const float* w, const float* x, const float* g, float rstd, int n,
                                                 int lane) {
  float acc = 0.f;
  for (int j0 = lane; j0 < n; j0 += kIlp * kWarpSize) {
    float vw[kIlp], vx[kIlp], vg[kIlp];
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int j = j0 + i * kWarpSize;
      vw[i] = j < n ? w[j] : 0.f;
      vx[i] = j < n ? x[j] : 0.f;
      vg[i] = j < n ? g[j] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kIlp; ++i)
      if (j0 + i * kWarpSize < n) acc = fmaf(vw[i], vx[i] * rstd * vg[i], acc);
  }
  return acc;
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
  const float rstd = row_rstd(xr, D, eps, lane);
  float* y = out + static_cast<size_t>(row) * ld;
  for (int j = lane; j < D; j += kWarpSize) y[j] = xr[j] * rstd * weight[j];
}

// Version 2 of linear_rows_kernel, the GPU sampler's fused form (stage 07): y (n, out) = or += norm(x) [W0 ; W1]^T.
//   g != null   row r of x enters as rmsnorm(x_r) * g, computed on the fly with rmsnorm_rows_kernel's factor (no
//               normalised copy in memory, no launch for it)
//   out0 < out  output features o < out0 come from W0 (out0, in), the others from W1 (out - out0, in): two
//               projections of one input in one launch
//   accumulate  y += the product (a residual add, fused)
// Each output is the value rmsnorm_rows, linear_rows and an add give, bitwise: the same factor, the same products
// in the same order. A warp computes feature o of kR rows, its loads in batches of kB elements per lane (all rows'
// x, the weights and gains of a batch issued before its products); kR = 1 with kB = 16 (one batch for rows up to 512
// wide) serves the one-row launches of a plain step, kR = kRows with kB = 4 the others. A row's value does not
// depend on kR or kB: each row keeps its own accumulator and order.
template <int kR, int kB>
__global__ void linear_rows_v2_kernel(float* y, int ldy, const float* x, int ldx, const float* g, float eps,
                                      const float* W0, int out0, const float* W1, int n, int in, int out,
                                      bool accumulate) {
  const int o = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int r0 = blockIdx.y * kR;
  if (o >= out) return;
  const int nr = min(kR, n - r0);
  const float* w = o < out0 ? W0 + static_cast<size_t>(o) * in : W1 + static_cast<size_t>(o - out0) * in;
  const float* xr = x + static_cast<size_t>(r0) * ldx;
  float rstd[kR], acc[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    rstd[r] = g && r < nr ? row_rstd_ilp(xr + static_cast<size_t>(r) * ldx, in, eps, lane) : 1.f;
    acc[r] = 0.f;
  }
  for (int j0 = lane; j0 < in; j0 += kB * kWarpSize) {
    float wv[kB], gv[kB], xv[kB][kR];
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int j = j0 + i * kWarpSize;
      const bool in_row = j < in;
      wv[i] = in_row ? w[j] : 0.f;
      gv[i] = in_row && g ? g[j] : 1.f;
#pragma unroll
      for (int r = 0; r < kR; ++r) xv[i][r] = in_row && r < nr ? xr[static_cast<size_t>(r) * ldx + j] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      if (j0 + i * kWarpSize >= in) break;
#pragma unroll
      for (int r = 0; r < kR; ++r)
        if (r < nr) {
          float xe = xv[i][r];
          if (g) xe = xe * rstd[r] * gv[i];
          acc[r] = fmaf(wv[i], xe, acc[r]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const float v = warp_sum(acc[r]);
    if (r < nr && lane == 0) {
      float* dst = y + static_cast<size_t>(r0 + r) * ldy + o;
      *dst = accumulate ? *dst + v : v;
    }
  }
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

// Version 2 (linear_rows_v2_kernel): y (n, out) = or += (rmsnorm(x) * g) [W0 ; W1]^T. g null: no norm (eps unused);
// W1 null: out0 = out, one weight. Rows of stride ldx / ldy (0: in / out). y must not overlap x.
struct LinearRowsV2 {
  const float* g = nullptr;
  float eps = 0.f;
  const float* W1 = nullptr;
  int out0 = 0;  // with W1: the features from W0
  bool accumulate = false;
  int ldx = 0, ldy = 0;
};
inline void linear_rows_v2(float* y, const float* x, const float* W0, int n, int in, int out,
                           const LinearRowsV2& o = {}) {
  if (n <= 0 || out <= 0) return;
  const int ldy = o.ldy ? o.ldy : out, ldx = o.ldx ? o.ldx : in, out0 = o.W1 ? o.out0 : out;
  const int threads = rowwise::kWarpsPerBlock * kWarpSize, bx = blocks_for(out, rowwise::kWarpsPerBlock);
  if (n == 1)
    rowwise::linear_rows_v2_kernel<1, 16><<<dim3(bx, 1), threads>>>(y, ldy, x, ldx, o.g, o.eps, W0, out0, o.W1, n,
                                                                      in, out, o.accumulate);
  else
    rowwise::linear_rows_v2_kernel<rowwise::kRows, 4><<<dim3(bx, blocks_for(n, rowwise::kRows)), threads>>>(
        y, ldy, x, ldx, o.g, o.eps, W0, out0, o.W1, n, in, out, o.accumulate);
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
