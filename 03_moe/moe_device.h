// Device copies of MoE parameters and saved buffers for the CUDA entry points.
// Only for CUDA builds (tests and demos include it inside #ifdef DSV3_HAVE_CUDA).
#pragma once

#include <cmath>
#include <vector>

#include "03_moe/moe.h"
#include "common/cuda_utils.h"

namespace dsv3 {

// One DeviceBuffer per parameter: gate_weight, gate_bias, w1, w2, w3, shared_w1, shared_w2, shared_w3.
struct MoeDeviceParams {
  std::vector<DeviceBuffer<float>> bufs;

  explicit MoeDeviceParams(const MoeParams<float>& p) {
    for (const auto* h : {&p.gate_weight, &p.gate_bias, &p.w1, &p.w2, &p.w3, &p.shared_w1, &p.shared_w2,
                          &p.shared_w3})
      bufs.emplace_back(*h);
  }
  float* ptr(int i) { return bufs[i].size() ? bufs[i].get() : nullptr; }
  MoeWeights<float> weights() { return {ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), ptr(6), ptr(7)}; }
  MoeGrads<float> grads() { return {ptr(0), ptr(2), ptr(3), ptr(4), ptr(5), ptr(6), ptr(7)}; }
  // Downloads every tensor (gradients to compare, or trained values) into host parameters of the same config.
  void download(MoeParams<float>& p) const {
    std::vector<float>* h[] = {&p.gate_weight, &p.gate_bias, &p.w1,        &p.w2,
                               &p.w3,          &p.shared_w1, &p.shared_w2, &p.shared_w3};
    for (int i = 0; i < 8; ++i) *h[i] = bufs[i].download();
  }
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
