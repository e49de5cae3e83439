// Device copies of MLA parameters (host MlaParams -> DeviceBuffers, by MLA's one list) for the CUDA entry
// points. Only for CUDA builds (tests and demos include it inside #ifdef DSV3_HAVE_CUDA).
#pragma once

#include <vector>

#include "02_mla/mla.h"
#include "common/param_list_device.h"

namespace dsv3 {

// MlaTensors over DeviceBuffers: weights() and grads() view them; unused members are empty (null views).
struct MlaDeviceParams : MlaTensors<DeviceBuffer<float>> {
  explicit MlaDeviceParams(const MlaParams<float>& p) : MlaTensors(param_list::upload(p)) {}
  // Downloads into host parameters of the same config (e.g. gradients to compare).
  void download(MlaParams<float>& p) const { param_list::download(*this, p); }
};

// The RoPE tables on the device.
struct MlaDeviceRope {
  DeviceBuffer<float> cos, sin;
  int positions;
  explicit MlaDeviceRope(const RopeTables<float>& t) : cos(t.cos), sin(t.sin), positions(t.positions) {}
  MlaRope<float> view() const { return {cos.get(), sin.get(), positions}; }
};

}  // namespace dsv3
