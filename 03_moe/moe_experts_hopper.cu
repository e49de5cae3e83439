// Stage 03, CUDA: the routed experts on Hopper (MoeExperts::Hopper, moe.h), the fast twin of the segmented bf16
// path (moe_experts_bf16.cu, version 1, which it follows step by step). The products whose rows are the tokens
// (the up- and down-projections, and the backward's input gradients) run on version 2 of the segmented product,
// wgmma on 128-byte swizzled tiles (common/segment_gemm_hopper.cu). That kernel reads both operands K-major, so
// the backward multiplies by transposed bf16 copies of the weights (W2^T, W1^T, W3^T, written by one pass that
// also rounds them). The weight gradients (the segment's rows the inner dimension) run on its tn form. Oracle: CudaMoeExpertsHopper in
// test_moe.cpp, against the fp32 grouped path and bit-near version 1.
#include <cstdint>

#include <cuda_bf16.h>

#include "03_moe/moe_experts_bf16.h"
#include "03_moe/moe_kernels.cuh"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

constexpr int kTile = 32;  // the transposing copy's square tile; blocks of kTile x 8 threads

// dst (batch, C, R) bf16 = src (batch, R, C) fp32 transposed per matrix and rounded (nearest even).
__global__ void transpose_bf16_kernel(bf16* dst, const float* src, int R, int C) {
  __shared__ float t[kTile][kTile + 1];
  const size_t m = static_cast<size_t>(blockIdx.z) * R * C;
  const int c0 = blockIdx.x * kTile, r0 = blockIdx.y * kTile;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < R && c < C) t[i][threadIdx.x] = src[m + static_cast<size_t>(r) * C + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int c = c0 + i, r = r0 + threadIdx.x;
    if (r < R && c < C) dst[m + static_cast<size_t>(c) * R + r] = __float2bfloat16_rn(t[threadIdx.x][i]);
  }
}

void transpose_bf16(bf16* dst, const float* src, int batch, int R, int C) {
  const dim3 grid((C + kTile - 1) / kTile, (R + kTile - 1) / kTile, batch), block(kTile, 8);
  transpose_bf16_kernel<<<grid, block>>>(dst, src, R, C);
  CUDA_CHECK_LAST();
}

}  // namespace

void routed_experts_forward_hopper(const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                   const MoeConfig& c, int N) {
  require(segmented_gemm_wgmma_available(), "moe (CUDA): experts = Hopper needs a compute capability 9.0 GPU and "
          "a build for sm_90a (use MoeExperts::Segmented)");
  require_aligned({inp, s.h1, s.h3, s.eo});
  const int E = c.n_routed_experts, K = c.n_activated_experts, NK = N * K, D = c.dim, F = c.moe_inter_dim;
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  ScratchBuffer<bf16> wb(3 * n), xb(static_cast<size_t>(NK) * D), ab(static_cast<size_t>(NK) * F);
  expert_weights_bf16(wb.get(), w, E, D, F);
  gather_bf16(xb.get(), inp, s.perm, NK, K, D);
  const uint16_t *x = bits(xb.get()), *w1 = bits(wb.get()), *w3 = w1 + n, *w2 = w1 + 2 * n;
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, F, D, x, D, w1, D, s.h1, F, FD, 0}, {0, F, D, x, D, w3, D, s.h3, F, FD, 0}},
                            s.offsets, E, NK);
  launch_swiglu(ab.get(), s.h1, s.h3, static_cast<size_t>(NK) * F);
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, F, bits(ab.get()), F, w2, F, s.eo, D, FD, 0}}, s.offsets, E, NK);
}

void routed_experts_backward_hopper(const MoeGrads<float>& g, float* dw, float* dxp, const float* dout,
                                    const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                    const MoeConfig& c, int N) {
  require(segmented_gemm_wgmma_available(), "moe (CUDA): experts = Hopper needs a compute capability 9.0 GPU and "
          "a build for sm_90a (use MoeExperts::Segmented)");
  require_aligned({inp, dout, g.w1, g.w2, g.w3, s.h1, s.h3, s.eo});
  const int E = c.n_routed_experts, K = c.n_activated_experts, NK = N * K, D = c.dim, F = c.moe_inter_dim;
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  const size_t nd = static_cast<size_t>(NK) * D, nf = static_cast<size_t>(NK) * F;
  ScratchBuffer<bf16> deo(nd), xb(nd), ab(nf), dh1(nf), dh3(nf), wt(3 * n);
  ScratchBuffer<float> da(nf);
  combine_backward_kernel<<<blocks_for(NK, kWarpsPerBlock), kThreads>>>(dw, deo.get(), dout, s.eo, s.weights,
                                                                        s.slot_row, NK, K, D);
  CUDA_CHECK_LAST();
  gather_bf16(xb.get(), inp, s.perm, NK, K, D);
  // transposed copies, each K-major for its product: W2^T (E, F, D), W1^T and W3^T (E, D, F)
  bf16 *w2t = wt.get(), *w1t = w2t + n, *w3t = w2t + 2 * n;
  transpose_bf16(w2t, w.w2, E, D, F);
  transpose_bf16(w1t, w.w1, E, F, D);
  transpose_bf16(w3t, w.w3, E, F, D);
  launch_swiglu(ab.get(), s.h1, s.h3, nf);
  const int* off = s.offsets;
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, F, D, bits(deo.get()), D, bits(w2t), D, da.get(), F, FD, 0}}, off, E,
                            NK);  // da = dy W2
  launch_swiglu_backward(dh1.get(), dh3.get(), da.get(), s.h1, s.h3, nf);
  segmented_gemm_tn_wgmma(1.f, 1.f,
                          {{D, F, 0, bits(deo.get()), D, bits(ab.get()), F, g.w2, F, 0, FD},   // dW2 += dy^T a
                           {F, D, 0, bits(dh1.get()), F, bits(xb.get()), D, g.w1, D, 0, FD},   // dW1 += dh1^T x
                           {F, D, 0, bits(dh3.get()), F, bits(xb.get()), D, g.w3, D, 0, FD}},  // dW3 += dh3^T x
                          off, E);
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, F, bits(dh1.get()), F, bits(w1t), F, dxp, D, FD, 0}}, off, E, NK);
  segmented_gemm_rows_wgmma(1.f, 1.f, {{0, D, F, bits(dh3.get()), F, bits(w3t), F, dxp, D, FD, 0}}, off, E, NK);
}

}  // namespace dsv3::cuda
