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

// On Hopper (moe_experts_hopper.cu, MoeExperts::Hopper): the routed experts as above and the shared ones, every
// product on wgmma. Forward: out = the shared experts' output (overwritten; zeros without them), s.sh1/sh3 too.
// Backward: dinp = their input gradient (overwritten), and the routed experts' dw, dxp as above. With
// shared_on_wgmma off, neither touches out, dinp or the shared experts: the caller runs them (cuBLAS).
// The defaults are the fastest measured on an H200 at stage 07's bench shape (03 README, "On Hopper").
struct HopperMoeOptions {
  bool forward_gathers = true;    // the forward's up-projections read the tokens through perm, else a gathered copy
  bool backward_gathers = false;  // the same for the backward's dW1, dW3 (through perm: a lookup per inner index)
  bool shared_on_wgmma = true;    // the shared experts on wgmma here, else the caller's cuBLAS products
};
void set_hopper_moe_options(const HopperMoeOptions& o);  // process-wide, for the micro-benchmark
HopperMoeOptions hopper_moe_options();
void moe_experts_forward_hopper(float* out, const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                const MoeConfig& c, int N);
void moe_experts_backward_hopper(const MoeGrads<float>& g, float* dinp, float* dw, float* dxp, const float* dout,
                                 const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                                 const MoeConfig& c, int N);

}  // namespace dsv3::cuda
