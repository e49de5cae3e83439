// Stage 01, CUDA: kernels, then launchers, then the public entry points (rmsnorm_rope.h).
// Shapes: see the legend in rmsnorm_rope.h. fp32 throughout.
#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarp = kWarpSize;
constexpr int kRowsPerBlock = 8;  // one warp per row, 8 warps per block

// ---- kernels ------------------------------------------------------------------------------------

// One warp per row: sum of squares by lane-strided loads (coalesced), then scale.
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* weight, int N,
                                       int D, float eps) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const float* x = inp + static_cast<size_t>(row) * D;
  float ss = 0.f;
  for (int j = lane; j < D; j += kWarp) ss += x[j] * x[j];
  const float r = rsqrtf(warp_sum(ss) / D + eps);
  float* y = out + static_cast<size_t>(row) * D;
  for (int j = lane; j < D; j += kWarp) y[j] = x[j] * r * weight[j];
  if (lane == 0) rstd[row] = r;
}

// One warp per row: dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w.
__global__ void rmsnorm_backward_dinp_kernel(float* dinp, const float* dout, const float* rstd, const float* inp,
                                             const float* weight, int N, int D) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const size_t base = static_cast<size_t>(row) * D;
  const float r = rstd[row];
  float dot = 0.f;
  for (int j = lane; j < D; j += kWarp) dot += dout[base + j] * weight[j] * inp[base + j] * r;
  const float m = warp_sum(dot) / D;
  for (int j = lane; j < D; j += kWarp) {
    const float xhat = inp[base + j] * r;
    dinp[base + j] = r * (dout[base + j] * weight[j] - xhat * m);
  }
}

// dweight partial sums, deterministic: block (cx, cy) sums column j over row chunk cy into
// partial[cy, j]. Threads of a warp read consecutive columns of one row: coalesced.
__global__ void rmsnorm_backward_dweight_partial_kernel(float* partial, const float* dout, const float* rstd,
                                                        const float* inp, int N, int D, int rows_per_chunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int r0 = blockIdx.y * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
  float s = 0.f;
  for (int n = r0; n < r1; ++n) {
    const size_t i = static_cast<size_t>(n) * D + j;
    s += dout[i] * inp[i] * rstd[n];
  }
  partial[static_cast<size_t>(blockIdx.y) * D + j] = s;
}

// dweight[j] += sum over chunks of partial[c, j], in a fixed order.
__global__ void sum_chunks_accumulate_kernel(float* dweight, const float* partial, int chunks, int D) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= D) return;
  float s = 0.f;
  for (int c = 0; c < chunks; ++c) s += partial[static_cast<size_t>(c) * D + j];
  dweight[j] += s;
}

// One thread per (b, t, h, pair): (x0 + i x1) * (cos + i sign*sin).
__global__ void rope_rotate_kernel(float* out, const float* inp, const float* cos, const float* sin, RopeDims d,
                                   float sign) {
  const int half = d.Dr / 2;
  const size_t total = static_cast<size_t>(d.B) * d.T * d.H * half;
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  const size_t bth = idx / half;  // ((b*T + t)*H + h)
  const int t = static_cast<int>((bth / d.H) % d.T);
  const size_t p = static_cast<size_t>(d.pos0 + t) * half + i;
  const float c = cos[p], s = sign * sin[p];
  const size_t e = bth * d.S + d.offset + 2 * i;
  const float x0 = inp[e], x1 = inp[e + 1];
  out[e] = x0 * c - x1 * s;
  out[e + 1] = x0 * s + x1 * c;
}

// ---- launchers ----------------------------------------------------------------------------------

void launch_rope(float* out, const float* inp, const float* cos, const float* sin, const RopeDims& d, float sign) {
  const size_t total = static_cast<size_t>(d.B) * d.T * d.H * (d.Dr / 2);
  if (total == 0) return;
  rope_rotate_kernel<<<blocks_for(total, 256), 256>>>(out, inp, cos, sin, d, sign);
  CUDA_CHECK_LAST();
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int D, float eps) {
  require(N >= 0 && D > 0, "rmsnorm: bad shape N={} D={}", N, D);
  if (N == 0) return;
  rmsnorm_forward_kernel<<<blocks_for(N, kRowsPerBlock), kRowsPerBlock * kWarp>>>(out, rstd, inp, weight, N, D,
                                                                                  eps);
  CUDA_CHECK_LAST();
}

void rmsnorm_backward(float* dweight, float* dinp, const float* dout, const float* rstd, const float* inp,
                      const float* weight, int N, int D) {
  require(N >= 0 && D > 0, "rmsnorm: bad shape N={} D={}", N, D);
  if (N == 0) return;
  rmsnorm_backward_dinp_kernel<<<blocks_for(N, kRowsPerBlock), kRowsPerBlock * kWarp>>>(dinp, dout, rstd, inp,
                                                                                        weight, N, D);
  CUDA_CHECK_LAST();
  const int rows_per_chunk = 64;
  const int chunks = blocks_for(N, rows_per_chunk);
  ScratchBuffer<float> partial(static_cast<size_t>(chunks) * D);
  const dim3 grid(blocks_for(D, 128), chunks);
  rmsnorm_backward_dweight_partial_kernel<<<grid, 128>>>(partial.get(), dout, rstd, inp, N, D, rows_per_chunk);
  CUDA_CHECK_LAST();
  sum_chunks_accumulate_kernel<<<blocks_for(D, 128), 128>>>(dweight, partial.get(), chunks, D);
  CUDA_CHECK_LAST();
}

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, const RopeDims& d,
                  int table_positions) {
  validate_rope_dims(d, table_positions);
  launch_rope(out, inp, cos, sin, d, 1.f);
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, const RopeDims& d,
                   int table_positions) {
  validate_rope_dims(d, table_positions);
  launch_rope(dinp, dout, cos, sin, d, -1.f);
}

}  // namespace dsv3::cuda
