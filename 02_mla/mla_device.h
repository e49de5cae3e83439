// Device copies of MLA parameters (host MlaParams -> DeviceBuffers) for the CUDA entry points.
// Only for CUDA builds (tests and demos include it inside #ifdef DSV3_HAVE_CUDA).
#pragma once

#include <vector>

#include "02_mla/mla.h"
#include "common/cuda_utils.h"

namespace dsv3 {

// One DeviceBuffer per parameter in MlaWeights order; unused parameters are empty buffers (null pointers).
struct MlaDeviceParams {
  std::vector<DeviceBuffer<float>> bufs;

  explicit MlaDeviceParams(const MlaParams<float>& p) {
    for (const auto* h : {&p.wq_a, &p.q_norm, &p.wq_b, &p.wq, &p.wkv_a, &p.kv_norm, &p.wkv_b, &p.wo})
      bufs.emplace_back(*h);
  }
  float* ptr(int i) { return bufs[i].size() ? bufs[i].get() : nullptr; }
  MlaWeights<float> weights() { return {ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), ptr(6), ptr(7)}; }
  MlaGrads<float> grads() { return {ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), ptr(6), ptr(7)}; }
  // Downloads into the host parameters of the same config (e.g. gradients to compare).
  void download(MlaParams<float>& p) const {
    std::vector<float>* h[] = {&p.wq_a, &p.q_norm, &p.wq_b, &p.wq, &p.wkv_a, &p.kv_norm, &p.wkv_b, &p.wo};
    for (int i = 0; i < 8; ++i) *h[i] = bufs[i].download();
  }
};

// The RoPE tables on the device.
struct MlaDeviceRope {
  DeviceBuffer<float> cos, sin;
  int positions;
  explicit MlaDeviceRope(const RopeTables<float>& t) : cos(t.cos), sin(t.sin), positions(t.positions) {}
  MlaRope<float> view() const { return {cos.get(), sin.get(), positions}; }
};

}  // namespace dsv3
