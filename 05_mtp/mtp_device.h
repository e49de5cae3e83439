// Device-side owners for stage 05 (tests, demo, later stages): a block's and an MTP module's parameters
// uploaded from their host twins, and the saved buffers. Needs CUDA; include only when DSV3_HAVE_CUDA.
#pragma once

#include <vector>

#include "02_mla/mla_device.h"
#include "03_moe/moe_device.h"
#include "05_mtp/mtp.h"
#include "common/cuda_utils.h"

namespace dsv3 {

struct BlockDeviceParams {
  DeviceBuffer<float> attn_norm, ffn_norm;
  MlaDeviceParams attn;
  DeviceBuffer<float> w1, w2, w3;  // dense MLP (empty for a MoE block)
  MoeDeviceParams moe;             // empty tensors for a dense block

  explicit BlockDeviceParams(const BlockParams<float>& p)
      : attn_norm(p.attn_norm), ffn_norm(p.ffn_norm), attn(p.attn), w1(p.mlp.w1), w2(p.mlp.w2), w3(p.mlp.w3),
        moe(p.moe) {}
  static float* ptr(DeviceBuffer<float>& b) { return b.size() ? b.get() : nullptr; }
  BlockWeights<float> weights() {
    return {attn_norm.get(), attn.weights(), ffn_norm.get(), {ptr(w1), ptr(w2), ptr(w3)}, moe.weights()};
  }
  BlockGrads<float> grads() {
    return {attn_norm.get(), attn.grads(), ffn_norm.get(), {ptr(w1), ptr(w2), ptr(w3)}, moe.grads()};
  }
  void download(BlockParams<float>& p) const {
    p.attn_norm = attn_norm.download();
    p.ffn_norm = ffn_norm.download();
    attn.download(p.attn);
    p.mlp.w1 = w1.download();
    p.mlp.w2 = w2.download();
    p.mlp.w3 = w3.download();
    moe.download(p.moe);
  }
};

struct BlockDeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<int> i;
  BlockSaved<float> saved;
  BlockDeviceSaved(const BlockConfig& c, int B, int T_)
      : f(block_saved_size(c, B, T_)), i(block_saved_int_size(c, B, T_)),
        saved(block_saved_layout(f.get(), i.get(), c, B, T_)) {}
};

struct MtpDeviceParams {
  DeviceBuffer<float> enorm, hnorm, eh_proj;
  BlockDeviceParams block;

  explicit MtpDeviceParams(const MtpModuleParams<float>& p)
      : enorm(p.enorm), hnorm(p.hnorm), eh_proj(p.eh_proj), block(p.block) {}
  MtpModuleWeights<float> weights() { return {enorm.get(), hnorm.get(), eh_proj.get(), block.weights()}; }
  MtpModuleGrads<float> grads() { return {enorm.get(), hnorm.get(), eh_proj.get(), block.grads()}; }
  void download(MtpModuleParams<float>& p) const {
    p.enorm = enorm.download();
    p.hnorm = hnorm.download();
    p.eh_proj = eh_proj.download();
    block.download(p.block);
  }
};

struct MtpDeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<int> i;
  std::vector<MtpSaved<float>> saved;
  MtpDeviceSaved(const MtpConfig& c, int B, int T_)
      : f(mtp_saved_size(c, B, T_)), i(mtp_saved_int_size(c, B, T_)),
        saved(mtp_saved_layout(f.get(), i.get(), c, B, T_)) {}
};

}  // namespace dsv3
