// Stage 03, CUDA, internal to the stage: the routed experts on the segmented bf16 path (moe_experts_bf16.cu),
// called by moe_cuda.cu's entry points when MoeConfig::experts is Segmented, and on its Hopper twin
// (moe_experts_hopper.cu) when it is Hopper. After routing and dispatch (the
// saved indices, counts, offsets, perm, slot_row are filled). Needs CUDA; device pointers.
#pragma once

#include "03_moe/moe.h"

namespace dsv3::cuda {

// s.h1, s.h3, s.eo (dispatch order, fp32) of every routed expert from inp gathered by s.perm.
void routed_experts_forward_bf16(const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                 const MoeConfig& c, int N);
// From dout: dw (NK) and dxp (NK, D, dispatch order) overwritten, the experts' weight gradients (+=).
void routed_experts_backward_bf16(const MoeGrads<float>& g, float* dw, float* dxp, const float* dout,
                                  const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                  const MoeConfig& c, int N);

// The same two on Hopper (moe_experts_hopper.cu, MoeExperts::Hopper): the rows products on wgmma.
void routed_experts_forward_hopper(const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                   const MoeConfig& c, int N);
void routed_experts_backward_hopper(const MoeGrads<float>& g, float* dw, float* dxp, const float* dout,
                                    const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                    const MoeConfig& c, int N);

}  // namespace dsv3::cuda
