// Device-side owners for stage 05 (tests, demo, later stages): a block's and an MTP module's parameters
// uploaded from their host twins, and the saved buffers. Needs CUDA; include only when DSV3_HAVE_CUDA.
#pragma once

#include <vector>

#include "02_mla/mla_device.h"
#include "03_moe/moe_device.h"
#include "05_mtp/mtp.h"
#include "common/param_list_device.h"

namespace dsv3 {

// BlockTensors over DeviceBuffers (by the block's one list); weights() and grads() view them.
struct BlockDeviceParams : BlockTensors<DeviceBuffer<float>> {
  explicit BlockDeviceParams(const BlockParams<float>& p) : BlockTensors(param_list::upload(p)) {}
  void download(BlockParams<float>& p) const { param_list::download(*this, p); }
};

struct BlockDeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<int> i;
  BlockSaved<float> saved;
  BlockDeviceSaved(const BlockConfig& c, int B, int seq)
      : f(block_saved_size(c, B, seq)), i(block_saved_int_size(c, B, seq)),
        saved(block_saved_layout(f.get(), i.get(), c, B, seq)) {}
};

// MtpModuleTensors over DeviceBuffers (by the module's one list).
struct MtpDeviceParams : MtpModuleTensors<DeviceBuffer<float>> {
  explicit MtpDeviceParams(const MtpModuleParams<float>& p) : MtpModuleTensors(param_list::upload(p)) {}
  void download(MtpModuleParams<float>& p) const { param_list::download(*this, p); }
};

struct MtpDeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<int> i;
  std::vector<MtpSaved<float>> saved;
  MtpDeviceSaved(const MtpConfig& c, int B, int seq)
      : f(mtp_saved_size(c, B, seq)), i(mtp_saved_int_size(c, B, seq)),
        saved(mtp_saved_layout(f.get(), i.get(), c, B, seq)) {}
};

}  // namespace dsv3
