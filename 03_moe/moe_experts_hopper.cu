// Stage 03, CUDA: the experts on Hopper (MoeExperts::Hopper, moe.h), the fast twin of the segmented bf16 path
// (moe_experts_bf16.cu, version 1, which it follows step by step). Every product of the routed and the shared
// experts runs on version 2 of the segmented product, wgmma on 128-byte swizzled tiles
// (common/segment_gemm_hopper.cu): the rows form (tokens the rows) reads both operands K-major, so the backward
// multiplies by transposed bf16 copies of the weights (written by one pass that also rounds them); the weight
// gradients (tokens the inner dimension) run on its tn form. The tokens are rounded to bf16 once (N x D); the
// forward's up-projections read them through the dispatch permutation (no gathered N K x D copy), the backward's
// weight gradients from a gathered copy (faster there: their rows change every tile). The shared experts are the
// same products over one segment of N rows, their weight gradients over 16 row slices. Each of these choices was
// measured (03 README, "Speed on Hopper"); HopperMoeOptions switches them for the micro-benchmark. Oracle:
// CudaMoeExpertsHopper in test_moe.cpp, against the fp32 grouped path and version 1 (to the order of the sums).
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

HopperMoeOptions g_options;

// off = the S + 1 bounds of n rows cut into S near-equal segments (written on the device: no host memory in a
// graph). S = 1: the shared experts' products over all N rows; S = kSharedSplit: their weight gradients, the rows
// (their inner dimension) split so that the one small output fills the GPU.
__global__ void even_segments_kernel(int* off, int n, int S) {
  for (int s = threadIdx.x; s <= S; s += blockDim.x) off[s] = static_cast<int>(static_cast<int64_t>(n) * s / S);
}
constexpr int kSharedSplit = 16;

void even_segments(int* off, int n, int S) {
  even_segments_kernel<<<1, 32>>>(off, n, S);
  CUDA_CHECK_LAST();
}

// dst[i] += sum over s = 0 .. S-1 of part[s n + i], in that order (deterministic), n4 = n / 4 float4s.
__global__ void sum_partials_kernel(float4* dst, const float4* part, int S, size_t n4) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  float4 acc = dst[i];
  for (int s = 0; s < S; ++s) {
    const float4 v = part[static_cast<size_t>(s) * n4 + i];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  dst[i] = acc;
}

void require_hopper() {
  require(segmented_gemm_wgmma_available(), "moe (CUDA): experts = Hopper needs a compute capability 9.0 GPU and "
          "a build for sm_90a (use MoeExperts::Segmented)");
}

// The shared experts (one SwiGLU MLP of width Fs) on the same products, one segment of N rows: out = their
// output (overwritten); sh1, sh3 saved (fp32). xin: inp in bf16.
void shared_forward(float* out, float* sh1, float* sh3, const bf16* xin, const MoeWeights<float>& w, int N, int D,
                    int Fs) {
  const size_t n = static_cast<size_t>(Fs) * D;
  ScratchBuffer<bf16> wb(3 * n), ab(static_cast<size_t>(N) * Fs);
  ScratchBuffer<int> off(2);
  even_segments(off.get(), N, 1);
  to_bf16(bits(wb.get()), w.shared_w1, n);
  to_bf16(bits(wb.get() + n), w.shared_w3, n);
  to_bf16(bits(wb.get() + 2 * n), w.shared_w2, n);
  const uint16_t *x = reinterpret_cast<const uint16_t*>(xin), *w1 = bits(wb.get()), *w3 = w1 + n, *w2 = w1 + 2 * n;
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, Fs, D, x, D, w1, D, sh1, Fs, 0, 0}, {0, Fs, D, x, D, w3, D, sh3, Fs, 0, 0}},
                            off.get(), 1, N);
  launch_swiglu(ab.get(), sh1, sh3, static_cast<size_t>(N) * Fs);
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, Fs, bits(ab.get()), Fs, w2, Fs, out, D, 0, 0}}, off.get(), 1, N);
}

// Its backward: dinp overwritten with the shared experts' input gradient, their weight gradients accumulated.
void shared_backward(const MoeGrads<float>& g, float* dinp, const float* dout, const float* sh1, const float* sh3,
                     const bf16* xin, const MoeWeights<float>& w, int N, int D, int Fs) {
  const size_t n = static_cast<size_t>(Fs) * D, nf = static_cast<size_t>(N) * Fs;
  ScratchBuffer<bf16> wt(3 * n), db(static_cast<size_t>(N) * D), ab(nf), dh1(nf), dh3(nf);
  ScratchBuffer<float> da(nf), part(static_cast<size_t>(kSharedSplit) * 3 * n);
  ScratchBuffer<int> off(2), split(kSharedSplit + 1);
  even_segments(off.get(), N, 1);
  even_segments(split.get(), N, kSharedSplit);
  bf16 *w2t = wt.get(), *w1t = w2t + n, *w3t = w2t + 2 * n;  // W2^T (Fs, D), W1^T and W3^T (D, Fs)
  transpose_bf16(w2t, w.shared_w2, 1, D, Fs);
  transpose_bf16(w1t, w.shared_w1, 1, Fs, D);
  transpose_bf16(w3t, w.shared_w3, 1, Fs, D);
  to_bf16(bits(db.get()), dout, static_cast<size_t>(N) * D);
  launch_swiglu(ab.get(), sh1, sh3, nf);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xin);
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, Fs, D, bits(db.get()), D, bits(w2t), D, da.get(), Fs, 0, 0}}, off.get(), 1,
                            N);  // da = dy W2
  launch_swiglu_backward(dh1.get(), dh3.get(), da.get(), sh1, sh3, nf);
  // weight gradients: partial sums over kSharedSplit row slices (product j's slice s at part + (j S + s) n),
  // then added to the gradients in slice order
  const int64_t sn = static_cast<int64_t>(n);
  float* pw = part.get();
  segmented_gemm_tn_wgmma(1.f, 0.f,
                          {{D, Fs, 0, bits(db.get()), D, bits(ab.get()), Fs, pw, Fs, 0, sn},                // dy^T a
                           {Fs, D, 0, bits(dh1.get()), Fs, x, D, pw + kSharedSplit * sn, D, 0, sn},         // dh1^T x
                           {Fs, D, 0, bits(dh3.get()), Fs, x, D, pw + 2 * kSharedSplit * sn, D, 0, sn}},    // dh3^T x
                          split.get(), kSharedSplit);
  for (auto [j, dst] : {std::pair{0, g.shared_w2}, {1, g.shared_w1}, {2, g.shared_w3}}) {
    sum_partials_kernel<<<blocks_for(n / 4, kThreads), kThreads>>>(
        reinterpret_cast<float4*>(dst), reinterpret_cast<const float4*>(pw + j * kSharedSplit * sn), kSharedSplit,
        n / 4);
    CUDA_CHECK_LAST();
  }
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, Fs, bits(dh1.get()), Fs, bits(w1t), Fs, dinp, D, 0, 0}}, off.get(), 1, N);
  segmented_gemm_rows_wgmma(1.f, 1.f, {{0, D, Fs, bits(dh3.get()), Fs, bits(w3t), Fs, dinp, D, 0, 0}}, off.get(), 1, N);
}

}  // namespace

void set_hopper_moe_options(const HopperMoeOptions& o) { g_options = o; }
HopperMoeOptions hopper_moe_options() { return g_options; }

void moe_experts_forward_hopper(float* out, const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                const MoeConfig& c, int N) {
  require_hopper();
  require_aligned({inp, out, s.h1, s.h3, s.eo, s.sh1, s.sh3});
  const int E = c.n_routed_experts, K = c.n_activated_experts, NK = N * K, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim();
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  const HopperMoeOptions o = g_options;
  ScratchBuffer<bf16> xin(static_cast<size_t>(N) * D), wb(3 * n), ab(static_cast<size_t>(NK) * F),
      xb(o.forward_gathers ? 0 : static_cast<size_t>(NK) * D);
  to_bf16(bits(xin.get()), inp, static_cast<size_t>(N) * D);
  expert_weights_bf16(wb.get(), w, E, D, F);
  const uint16_t *w1 = bits(wb.get()), *w3 = w1 + n, *w2 = w1 + 2 * n;
  // the up-projections read each token's row through the dispatch permutation (token = perm[row] / K), or a
  // gathered copy (the option's other way)
  const uint16_t* x = bits(xin.get());
  if (!o.forward_gathers) {
    gather_bf16(xb.get(), inp, s.perm, NK, K, D);
    x = bits(xb.get());
  }
  SegmentGemm up1{0, F, D, x, D, w1, D, s.h1, F, FD, 0}, up3{0, F, D, x, D, w3, D, s.h3, F, FD, 0};
  if (o.forward_gathers) {
    up1.a_rows = up3.a_rows = s.perm;
    up1.rows_div = up3.rows_div = K;
  }
  segmented_gemm_rows_wgmma(1.f, 0.f, {up1, up3}, s.offsets, E, NK);
  launch_swiglu(ab.get(), s.h1, s.h3, static_cast<size_t>(NK) * F);
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, F, bits(ab.get()), F, w2, F, s.eo, D, FD, 0}}, s.offsets, E, NK);
  if (!o.shared_on_wgmma) return;  // the caller runs the shared experts
  if (Fs > 0)
    shared_forward(out, s.sh1, s.sh3, xin.get(), w, N, D, Fs);
  else
    CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(N) * D * sizeof(float)));
}

void moe_experts_backward_hopper(const MoeGrads<float>& g, float* dinp, float* dw, float* dxp, const float* dout,
                                 const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                 const MoeConfig& c, int N) {
  require_hopper();
  require_aligned({inp, dinp, dout, g.w1, g.w2, g.w3, g.shared_w1, g.shared_w2, g.shared_w3, s.h1, s.h3, s.eo,
                   s.sh1, s.sh3});
  const int E = c.n_routed_experts, K = c.n_activated_experts, NK = N * K, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim();
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  const size_t nd = static_cast<size_t>(NK) * D, nf = static_cast<size_t>(NK) * F;
  const HopperMoeOptions o = g_options;
  ScratchBuffer<bf16> xin(static_cast<size_t>(N) * D), deo(nd), ab(nf), dh1(nf), dh3(nf), wt(3 * n),
      xb(o.backward_gathers ? 0 : nd);
  ScratchBuffer<float> da(nf);
  to_bf16(bits(xin.get()), inp, static_cast<size_t>(N) * D);
  if (o.shared_on_wgmma && Fs > 0)
    shared_backward(g, dinp, dout, s.sh1, s.sh3, xin.get(), w, N, D, Fs);
  else if (o.shared_on_wgmma)
    CUDA_CHECK(cudaMemsetAsync(dinp, 0, static_cast<size_t>(N) * D * sizeof(float)));
  combine_backward_kernel<<<blocks_for(NK, kWarpsPerBlock), kThreads>>>(dw, deo.get(), dout, s.eo, s.weights,
                                                                        s.slot_row, NK, K, D);
  CUDA_CHECK_LAST();
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
  // the weight gradients; x read through the dispatch permutation (or the gathered copy)
  const uint16_t* x = bits(xin.get());
  if (!o.backward_gathers) {
    gather_bf16(xb.get(), inp, s.perm, NK, K, D);
    x = bits(xb.get());
  }
  SegmentGemm dw1{F, D, 0, bits(dh1.get()), F, x, D, g.w1, D, 0, FD}, dw3{F, D, 0, bits(dh3.get()), F, x, D, g.w3, D, 0, FD};
  if (o.backward_gathers) {
    dw1.b_rows = dw3.b_rows = s.perm;
    dw1.rows_div = dw3.rows_div = K;
  }
  segmented_gemm_tn_wgmma(1.f, 1.f, {{D, F, 0, bits(deo.get()), D, bits(ab.get()), F, g.w2, F, 0, FD}, dw1, dw3}, off,
                          E);  // dW2 += dy^T a, dW1 += dh1^T x, dW3 += dh3^T x
  segmented_gemm_rows_wgmma(1.f, 0.f, {{0, D, F, bits(dh1.get()), F, bits(w1t), F, dxp, D, FD, 0}}, off, E, NK);
  segmented_gemm_rows_wgmma(1.f, 1.f, {{0, D, F, bits(dh3.get()), F, bits(w3t), F, dxp, D, FD, 0}}, off, E, NK);
}

}  // namespace dsv3::cuda
