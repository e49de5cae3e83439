// Stage 03, CUDA: the routed experts on the segmented bf16 path (MoeExperts::Segmented, moe.h), the fast twin
// of moe_cuda.cu's grouped cuBLAS path. The experts' products run as segmented GEMMs (common/gemm.h) that
// read the dispatch offsets on the device: no copy of them to the host, so the host never waits in a layer,
// and all experts' weight gradients are one launch. Their operands are bf16: the gathered tokens, the SwiGLU
// activations and the gradients that feed only these products are written as bf16 by the kernels that make
// them, and the experts' weights are rounded to bf16 copies at each call (the fp32 weights stay the masters);
// accumulation and the saved activations (h1, h3, eo) stay fp32. Oracle: CudaMoeExpertsBf16 in test_moe.cpp,
// against the fp32 grouped path. Kernels, then the two entry points of moe_experts_bf16.h.
// Shapes: see the legend in moe.h.
#include "03_moe/moe_experts_bf16.h"

#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>

#include "03_moe/moe_kernels.cuh"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

// routed_ffn_forward on the segmented path: eo, h1, h3 (fp32, saved) from inp gathered by perm.
void routed_ffn_forward_segmented(float* eo, float* h1, float* h3, const float* inp, const int* perm,
                                  const MoeWeights<float>& w, const int* off, int E, int K, int NK, int D, int F) {
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  ScratchBuffer<bf16> wb(3 * n), xb(static_cast<size_t>(NK) * D), ab(static_cast<size_t>(NK) * F);
  expert_weights_bf16(wb.get(), w, E, D, F);
  gather_bf16(xb.get(), inp, perm, NK, K, D);
  const uint16_t *x = bits(xb.get()), *w1 = bits(wb.get()), *w3 = w1 + n, *w2 = w1 + 2 * n;
  segmented_gemm_rows(Op::T, 1.f, 0.f, {{0, F, D, x, D, w1, D, h1, F, FD, 0}, {0, F, D, x, D, w3, D, h3, F, FD, 0}},
                      off, E, NK);
  launch_swiglu(ab.get(), h1, h3, static_cast<size_t>(NK) * F);
  segmented_gemm_rows(Op::T, 1.f, 0.f, {{0, D, F, bits(ab.get()), F, w2, F, eo, D, FD, 0}}, off, E, NK);
}

// routed_ffn_backward on the segmented path, from dout itself: dw (NK) and dxp (NK, D) overwritten, the
// experts' weight gradients accumulated (+=).
void routed_ffn_backward_segmented(const MoeGrads<float>& grads, float* dw, float* dxp, const float* dout,
                                   const MoeSaved<float>& sv, const float* inp, const MoeWeights<float>& w, int E,
                                   int K, int NK, int D, int F) {
  const int64_t FD = static_cast<int64_t>(F) * D, n = static_cast<int64_t>(E) * FD;
  const size_t nd = static_cast<size_t>(NK) * D, nf = static_cast<size_t>(NK) * F;
  ScratchBuffer<bf16> deo(nd), xb(nd), ab(nf), dh1(nf), dh3(nf), wb(3 * n);
  ScratchBuffer<float> da(nf);
  combine_backward_kernel<<<blocks_for(NK, kWarpsPerBlock), kThreads>>>(dw, deo.get(), dout, sv.eo, sv.weights,
                                                                        sv.slot_row, NK, K, D);
  CUDA_CHECK_LAST();
  gather_bf16(xb.get(), inp, sv.perm, NK, K, D);
  expert_weights_bf16(wb.get(), w, E, D, F);
  const uint16_t *w1 = bits(wb.get()), *w3 = w1 + n, *w2 = w1 + 2 * n;
  launch_swiglu(ab.get(), sv.h1, sv.h3, nf);
  const int* off = sv.offsets;
  segmented_gemm_rows(Op::N, 1.f, 0.f, {{0, F, D, bits(deo.get()), D, w2, F, da.get(), F, FD, 0}}, off, E, NK);
  launch_swiglu_backward(dh1.get(), dh3.get(), da.get(), sv.h1, sv.h3, nf);
  segmented_gemm_tn(1.f, 1.f,
                    {{D, F, 0, bits(deo.get()), D, bits(ab.get()), F, grads.w2, F, 0, FD},   // dW2 += dy^T a
                     {F, D, 0, bits(dh1.get()), F, bits(xb.get()), D, grads.w1, D, 0, FD},   // dW1 += dh1^T x
                     {F, D, 0, bits(dh3.get()), F, bits(xb.get()), D, grads.w3, D, 0, FD}},  // dW3 += dh3^T x
                    off, E);
  segmented_gemm_rows(Op::N, 1.f, 0.f, {{0, D, F, bits(dh1.get()), F, w1, D, dxp, D, FD, 0}}, off, E, NK);
  segmented_gemm_rows(Op::N, 1.f, 1.f, {{0, D, F, bits(dh3.get()), F, w3, D, dxp, D, FD, 0}}, off, E, NK);
}

}  // namespace

void routed_experts_forward_bf16(const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                 const MoeConfig& c, int N) {
  require_aligned({inp, s.h1, s.h3, s.eo});
  routed_ffn_forward_segmented(s.eo, s.h1, s.h3, inp, s.perm, w, s.offsets, c.n_routed_experts,
                               c.n_activated_experts, N * c.n_activated_experts, c.dim, c.moe_inter_dim);
}

void routed_experts_backward_bf16(const MoeGrads<float>& g, float* dw, float* dxp, const float* dout,
                                  const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                  const MoeConfig& c, int N) {
  require_aligned({inp, dout, g.w1, g.w2, g.w3, s.h1, s.h3, s.eo});
  routed_ffn_backward_segmented(g, dw, dxp, dout, s, inp, w, c.n_routed_experts, c.n_activated_experts,
                                N * c.n_activated_experts, c.dim, c.moe_inter_dim);
}

}  // namespace dsv3::cuda
