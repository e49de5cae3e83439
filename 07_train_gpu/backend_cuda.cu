// Stage 07's CUDA backend (backend.h): stage 06's DeviceModel, with every parameter, gradient and AdamW moment
// on the GPU. The optimizer is two launches per step over all tensors at once (a table of tensors on the device):
// one for the squared gradient norm, one for the clipped AdamW update. The precision of the model's products and
// its expert path are the DeviceOptions it is built with (device_options() in backend_cpu.cpp for a Precision).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "04_aux_loss/adamw.h"
#include "07_train_gpu/backend.h"
#include "06_full_model/model_device.h"
#include "common/cuda_kernels.cuh"
#include "common/device.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3 {
namespace {

struct SlotDesc {  // one tensor of the optimizer's table
  float* p;
  float* g;
  float* m;
  float* v;
  unsigned long long n;
  float decay;  // 1: AdamW's weight decay applies (matrices); 0: it does not (norms)
};

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerTensor = 240;

// Sum of squared gradients of every tensor into *acc (double). grid (blocks, tensors).
__global__ void sumsq_kernel(double* acc, const SlotDesc* slots) {
  const SlotDesc s = slots[blockIdx.y];
  double local = 0;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += gridDim.x * blockDim.x) {
    const double g = s.g[i];
    local += g * g;
  }
  __shared__ double part[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) local += __shfl_down_sync(0xffffffffu, local, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < kThreads / 32; ++w) t += part[w];
    atomicAdd(acc, t);
  }
}

// AdamW (adamw.h's rule, as cpu::adamw_step) on gradient * scale, every tensor of the table; sc holds the
// decaying tensors' scalars. grid (blocks, tensors).
__global__ void adamw_multi_kernel(const SlotDesc* slots, float scale, AdamWScalars<float> sc) {
  const SlotDesc s = slots[blockIdx.y];
  sc.lr_wd *= s.decay;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += gridDim.x * blockDim.x)
    s.p[i] = adamw_update(s.p[i], s.g[i] * scale, s.m[i], s.v[i], sc);
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& c, uint64_t seed, const DeviceOptions& opt)
      : host_(c, seed), dev_(host_, opt), slots_(dev_.slots()) {
    // Keep freed scratch memory in the stream-ordered pool across steps instead of returning it at every
    // synchronisation (the default), so the per-step scratch allocations cost nothing after the first step.
    cudaMemPool_t pool;
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, 0));
    uint64_t keep = std::numeric_limits<uint64_t>::max();
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    std::vector<SlotDesc> table;
    for (const auto& s : slots_) {
      moments_.emplace_back(s.n);
      moments_.back().zero();
      moments_.emplace_back(s.n);
      moments_.back().zero();
      table.push_back({s.value, s.grad, moments_[moments_.size() - 2].get(), moments_.back().get(), s.n,
                       s.decays ? 1.f : 0.f});
      max_n_ = std::max<unsigned long long>(max_n_, s.n);
    }
    std::vector<char> bytes(table.size() * sizeof(SlotDesc));
    std::memcpy(bytes.data(), table.data(), bytes.size());
    table_ = DeviceBuffer<char>(bytes);
  }

  std::string describe() const override {
    const DeviceOptions& o = dev_.options();
    return fmt::format("cuda {}, experts {} ({})", matmul_name(o.matmul), moe_experts_name(o.experts),
                       gpu_description());
  }
  const ModelConfig& config() const override { return host_.config(); }

  ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) override {
    dev_.forward(tokens, B, T);
    dev_.backward();
    return dev_.losses();
  }
  ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) override {
    dev_.forward(tokens, B, T);
    return dev_.losses();
  }
  std::vector<double> mtp_losses() const override {
    const auto& ce = dev_.mtp_losses();
    return std::vector<double>(ce.begin(), ce.end());
  }
  std::vector<std::vector<int>> expert_counts() const override {
    const ModelConfig& c = host_.config();
    std::vector<std::vector<int>> out;
    for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l) out.push_back(dev_.expert_counts(l));
    return out;
  }

  double grad_norm() override {
    DeviceBuffer<double> acc(1);
    acc.zero();
    sumsq_kernel<<<dim3(blocks(), unsigned(slots_.size())), kThreads>>>(acc.get(), table());
    CUDA_CHECK_LAST();
    return std::sqrt(acc.download()[0]);
  }

  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override {
    require(step >= 1, "AdamW step counts from 1, got {}", step);
    adamw_multi_kernel<<<dim3(blocks(), unsigned(slots_.size())), kThreads>>>(
        table(), grad_scale, adamw_scalars<float>(opt, step, true));
    CUDA_CHECK_LAST();
    dev_.update_bias();
  }

  void set_phase_timing(bool on) override { dev_.set_phase_timing(on); }
  std::vector<std::pair<std::string, float>> phase_times() const override { return dev_.phase_times(); }
  void synchronize() override { CUDA_CHECK(cudaDeviceSynchronize()); }
  MemoryUse memory() const override {
    size_t free = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &total));
    cudaMemPool_t pool;
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, 0));
    uint64_t reserved = 0, high = 0;
    CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved));
    CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &high));
    const size_t used = total - free;
    return {used, used - std::min<size_t>(used, reserved) + high, total};
  }

  TensorMap weights() const override {
    dev_.download(host_, true);
    return host_.to_tensor_map();
  }
  TensorMap gradients() const override {
    dev_.download(host_, false);
    return host_.gradient_tensor_map();
  }
  void load_weights(const TensorMap& m) override {
    host_.load_tensor_map(m);
    dev_.upload(host_);
  }
  TensorMap optimizer_state() const override {
    TensorMap out;
    for (size_t i = 0; i < slots_.size(); ++i) {
      out[slots_[i].name + ".exp_avg"] = moments_[2 * i].download();
      out[slots_[i].name + ".exp_avg_sq"] = moments_[2 * i + 1].download();
    }
    return out;
  }
  void load_optimizer_state(const TensorMap& m) override {
    for (size_t i = 0; i < slots_.size(); ++i)
      for (int k = 0; k < 2; ++k) {
        const std::string name = slots_[i].name + (k ? ".exp_avg_sq" : ".exp_avg");
        const auto it = m.find(name);
        if (it == m.end()) throw UserError(fmt::format("optimizer state: tensor {} is missing", name));
        if (it->second.size() != slots_[i].n)
          throw UserError(fmt::format("optimizer state: tensor {} has {} values, the model needs {}", name,
                                      it->second.size(), slots_[i].n));
        moments_[2 * i + k].upload(it->second);
      }
  }

 private:
  unsigned blocks() const {
    return unsigned(std::min<unsigned long long>(kMaxBlocksPerTensor, (max_n_ + kThreads - 1) / kThreads));
  }
  const SlotDesc* table() { return reinterpret_cast<const SlotDesc*>(table_.get()); }

  mutable Model<float> host_;  // the host twin: initial values, and the staging area of weights()
  mutable DeviceModel dev_;
  std::vector<DeviceModel::Slot> slots_;
  std::vector<DeviceBuffer<float>> moments_;  // exp_avg, exp_avg_sq of slot i at 2i, 2i+1
  DeviceBuffer<char> table_;
  unsigned long long max_n_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const ModelConfig& c, uint64_t seed, const DeviceOptions& opt) {
  if (!gpu_available()) throw UserError(fmt::format("no usable GPU: {}", gpu_description()));
  return std::make_unique<CudaBackend>(c, seed, opt);
}

}  // namespace dsv3
