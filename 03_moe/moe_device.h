// Device copies of MoE parameters and saved buffers for the CUDA entry points.
// Only for CUDA builds (tests and demos include it inside #ifdef DSV3_HAVE_CUDA).
#pragma once

#include <cmath>
#include <vector>

#include "03_moe/moe.h"
#include "common/param_list_device.h"

namespace dsv3 {

// MoeTensors over DeviceBuffers (by the MoE's one list); weights() and grads() view them.
struct MoeDeviceParams : MoeTensors<DeviceBuffer<float>> {
  explicit MoeDeviceParams(const MoeParams<float>& p) : MoeTensors(param_list::upload(p)) {}
  // Downloads every tensor (gradients to compare, or trained values) into host parameters of the same config.
  void download(MoeParams<float>& p) const { param_list::download(*this, p); }
};

// Rounds tokens to multiples of 1/2 and the gate weight and bias to multiples of 1/32 and 1/64, so that every
// logit x . Wg_e is a sum of multiples of 1/64: exact in fp32 in any summation order. The CPU reference and
// cuBLAS then see identical logits, and a CPU-vs-CUDA comparison cannot fail on a top-K near-tie that a
// different GEMM summation order broke the other way (the rest of the layer keeps its random weights).
inline void make_routing_exact(std::vector<float>& inp, MoeParams<float>& p) {
  auto round_to = [](std::vector<float>& v, float step) {
    for (auto& x : v) x = std::round(x / step) * step;
  };
  round_to(inp, 0.5f);
  round_to(p.gate_weight, 1.f / 32);
  round_to(p.gate_bias, 1.f / 64);
}

// The forward's saved buffers on the device, carved by moe_saved_layout.
struct MoeDeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<int> i;
  MoeSaved<float> saved;
  MoeDeviceSaved(const MoeConfig& c, int N)
      : f(moe_saved_size(c, N)), i(moe_saved_int_size(c, N)), saved(moe_saved_layout(f.get(), i.get(), c, N)) {}
};

}  // namespace dsv3
