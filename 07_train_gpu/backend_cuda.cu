// Stage 07's CUDA backend (backend.h): stage 06's DeviceModel, with every parameter, gradient and AdamW moment
// on the GPU. The optimizer is two launches per step over all tensors at once (a table of tensors on the device):
// one for the squared gradient norm, one for the clipped AdamW update. The precision of the model's products and
// its expert path are the DeviceOptions it is built with (device_options() in backend_cpu.cpp for a Precision).
//
// train_step() runs the whole step (forward, backward, norm, the finite check, clipping, AdamW, bias update) as one
// CUDA graph, captured on the second step of a shape and replayed after: nothing in it waits for the host. What
// the host used to decide between the calls is decided on the device by step_control_kernel with the host's
// rule (the same float and double operations), and the host reads the loss parts and the norm once, after the
// replay, and checks that its decision agrees. The learning rate and Adam's count travel in a small device
// struct written before each replay. Not captured (run as the plain calls instead): the grouped cuBLAS expert
// path (it reads the expert counts on the host to size its products), and a step with phase timing on.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "05_mtp/mtp_align.h"

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

// Sum of squared gradients of every tensor, in two fixed-order passes (no atomics: the norm, and so the clipping
// factor, is the same bit for bit on every run). Pass 1, grid (blocks, tensors): each block's sum in double into
// part[tensor * gridDim.x + block]. Pass 2, one block: the parts in a fixed tree into *acc.
__global__ void sumsq_parts_kernel(double* part, const SlotDesc* slots) {
  const SlotDesc s = slots[blockIdx.y];
  double local = 0;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += gridDim.x * blockDim.x) {
    const double g = s.g[i];
    local += g * g;
  }
  __shared__ double warp_part[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) local += __shfl_down_sync(0xffffffffu, local, o);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < kThreads / 32; ++w) t += warp_part[w];
    part[size_t(blockIdx.y) * gridDim.x + blockIdx.x] = t;
  }
}

constexpr int kSumThreads = 1024;
__global__ void sum_parts_kernel(double* acc, const double* part, size_t n) {
  __shared__ double t[kSumThreads];
  double local = 0;
  for (size_t i = threadIdx.x; i < n; i += kSumThreads) local += part[i];
  t[threadIdx.x] = local;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) t[threadIdx.x] += t[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *acc = t[0];
}

// AdamW (adamw.h's rule, as cpu::adamw_step) on gradient * scale, every tensor of the table; sc holds the
// decaying tensors' scalars. grid (blocks, tensors).
__global__ void adamw_multi_kernel(const SlotDesc* slots, float scale, AdamWScalars<float> sc) {
  const SlotDesc s = slots[blockIdx.y];
  sc.lr_wd *= s.decay;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < s.n; i += gridDim.x * blockDim.x)
    s.p[i] = adamw_update(s.p[i], s.g[i] * scale, s.m[i], s.v[i], sc);
}

// The captured step's device state. In: written by the host before each replay. Out: read after it.
struct StepIn {
  AdamWScalars<float> sc;  // the decaying tensors' scalars at this step's learning rate and Adam count
  double grad_clip;        // 0: no clipping
};
struct StepOut {
  double sumsq;  // sum of squared gradients (enqueue_sumsq)
  float scale;   // clipping factor (clip_scale's rule)
  int skip;      // the loss or the norm was not finite: AdamW and the bias update leave everything as it was
};

// Loss parts as the host forms them (DeviceModel::read_losses: ce, mtp_align::loss_from_means, the balance
// losses summed in double), the norm as grad_norm() forms it, and the host's skip rule and clip factor on them.
struct LossShape {
  int depth, seq, balance_layers;
  float mtp_lambda;
};
__global__ void step_control_kernel(StepOut* out, const StepIn* in, const float* ce, const float* balance,
                                    LossShape ls) {
  double total = ce[0];
  total += mtp_align::loss_from_means(nullptr, ce + 1, ls.depth, ls.seq, ls.mtp_lambda);
  double bal = 0;
  for (int l = 0; l < ls.balance_layers; ++l) bal += balance[l];
  total += bal;
  const double norm = sqrt(out->sumsq);
  out->skip = !(isfinite(total) && isfinite(norm));
  out->scale = in->grad_clip > 0 && norm > in->grad_clip ? float(in->grad_clip / norm) : 1.f;
}

// adamw_multi_kernel with the scalars, the factor and the skip flag read from the device (the captured step).
__global__ void adamw_multi_step_kernel(const SlotDesc* slots, const StepIn* in, const StepOut* out) {
  if (out->skip) return;
  const SlotDesc s = slots[blockIdx.y];
  AdamWScalars<float> sc = in->sc;
  const float scale = out->scale;
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
    keep_freed_scratch();
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
    parts_ = DeviceBuffer<double>(size_t(blocks()) * slots_.size());
  }

  std::string describe() const override {
    const DeviceOptions& o = dev_.options();
    return fmt::format("cuda {}, experts {} ({})", matmul_name(o.matmul), moe_experts_name(o.experts),
                       gpu_description());
  }
  const ModelConfig& config() const override { return host_.config(); }

  ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) override {
    reduced_ranks_ = 1;
    dev_.forward(tokens, B, T);
    dev_.backward();
    return dev_.losses();
  }
  ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) override {
    reduced_ranks_ = 1;
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
    enqueue_sumsq(&step_out_.get()->sumsq);
    StepOut out{};
    CUDA_CHECK(cudaMemcpy(&out, step_out_.get(), sizeof out, cudaMemcpyDeviceToHost));
    return std::sqrt(out.sumsq);
  }

  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override {
    require(step >= 1, "AdamW step counts from 1, got {}", step);
    adamw_multi_kernel<<<dim3(blocks(), unsigned(slots_.size())), kThreads>>>(
        table(), grad_scale, adamw_scalars<float>(opt, step, true));
    CUDA_CHECK_LAST();
    dev_.update_bias(nullptr, reduced_ranks_);
  }

  // Every gradient, the loss parts' device copies and the expert counts in one NCCL group (one launch), queued on
  // the model's stream; then the losses read back.
  ModelLosses all_reduce(Communicator& c) override {
    enqueue_all_reduce(c);
    dev_.read_losses();
    return dev_.losses();
  }
  void set_communicator(Communicator* c, bool expert_parallel) override {
    require(!c || c->on_device(), "the CUDA backend's buffers are on the device: {} reduces host buffers",
            c ? c->describe() : "");
    Backend::set_communicator(c, expert_parallel);
    dev_.set_expert_parallel(nullptr);
    ep_.reset();
    if (expert_parallel) {
      ep_ = std::make_unique<ExpertParallel>(*c);
      dev_.set_expert_parallel(ep_.get());
    }
    graph_.reset();  // a captured step holds the old group's calls (or none)
    warm_layout_ = -1;
  }

  StepResult train_step(const std::vector<int>& tokens, int B, int T, const StepPlan& plan) override {
    if (!graph_enabled_ || timing_ || dev_.options().experts == MoeExperts::Grouped)
      return Backend::train_step(tokens, B, T, plan);
    require(plan.update >= 1, "AdamW step counts from 1, got {}", plan.update);
    dev_.stage(tokens, B, T);
    StepIn in{adamw_scalars<float>(plan.opt, plan.update, true), plan.grad_clip};
    CUDA_CHECK(cudaMemcpyAsync(step_in_.get(), &in, sizeof in, cudaMemcpyHostToDevice, cudaStreamPerThread));
    if (graph_ && graph_layout_ == dev_.layout()) {
      CUDA_CHECK(cudaGraphLaunch(graph_.get(), cudaStreamPerThread));
    } else if (warm_layout_ != dev_.layout()) {
      enqueue_step();  // the first step of a shape runs uncaptured: lazy loading and workspaces happen here
      warm_layout_ = dev_.layout();
    } else {
      capture();
      CUDA_CHECK(cudaGraphLaunch(graph_.get(), cudaStreamPerThread));
    }
    StepResult r;
    StepOut out{};
    CUDA_CHECK(cudaMemcpy(&out, step_out_.get(), sizeof out, cudaMemcpyDeviceToHost));
    dev_.read_losses();
    r.losses = dev_.losses();
    r.grad_norm = std::sqrt(out.sumsq);
    r.skipped = !(std::isfinite(r.losses.total()) && std::isfinite(r.grad_norm));
    require(r.skipped == (out.skip != 0), "internal: the device's skip decision ({}) differs from the host's ({})",
            out.skip != 0, r.skipped);
    return r;
  }
  void set_cuda_graph(bool on) override {
    graph_enabled_ = on;
    graph_.reset();
  }
  int graph_captures() const override { return captures_; }

  void set_phase_timing(bool on) override {
    timing_ = on;
    dev_.set_phase_timing(on);
  }
  std::vector<std::pair<std::string, float>> phase_times() const override { return dev_.phase_times(); }
  void set_exchange_timing(bool on) override {
    if (!ep_) return;
    ep_->timing = on;
    ep_->times = {};
  }
  ExpertParallel::Times exchange_times() const override { return ep_ ? ep_->times : ExpertParallel::Times{}; }
  void synchronize() override { CUDA_CHECK(cudaDeviceSynchronize()); }
  // Peak: the largest of (memory in use - the pool's reserve + the pool's high-water mark) seen at each capture and
  // now. The first capture moves the step's scratch memory from the default pool into the graph's own: the pool is
  // trimmed and its high-water mark restarted then, so the two are not counted together.
  MemoryUse memory() const override {
    size_t free = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &total));
    const size_t used = total - free;
    return {used, std::max(peak_before_, used_with_pool_high(used)), total};
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

  void enqueue_sumsq(double* acc) {
    sumsq_parts_kernel<<<dim3(blocks(), unsigned(slots_.size())), kThreads, 0, cudaStreamPerThread>>>(parts_.get(),
                                                                                                     table());
    CUDA_CHECK_LAST();
    sum_parts_kernel<<<1, kSumThreads, 0, cudaStreamPerThread>>>(acc, parts_.get(), parts_.size());
    CUDA_CHECK_LAST();
  }

  // The captured step: every launch of train_step, none of which waits for the host.
  void enqueue_step() {
    StepOut* out = step_out_.get();
    dev_.forward_on_device();
    dev_.backward();
    if (comm_) enqueue_all_reduce(*comm_);
    enqueue_sumsq(&out->sumsq);
    const LossShape ls{host_.config().num_nextn_predict_layers, dev_.seq(), int(dev_.balance_layers()),
                       dev_.mtp_lambda()};
    step_control_kernel<<<1, 1, 0, cudaStreamPerThread>>>(out, step_in_.get(), dev_.ce_device(),
                                                          dev_.balance_device(), ls);
    CUDA_CHECK_LAST();
    adamw_multi_step_kernel<<<dim3(blocks(), unsigned(slots_.size())), kThreads, 0, cudaStreamPerThread>>>(
        table(), step_in_.get(), out);
    CUDA_CHECK_LAST();
    dev_.update_bias(&out->skip, reduced_ranks_);
  }

  void enqueue_all_reduce(Communicator& c) {
    const ModelConfig& mc = host_.config();
    c.group_begin();
    for (const auto& s : slots_) c.all_reduce_mean(s.grad, s.n);
    c.all_reduce_mean(dev_.ce_device(), size_t(1 + mc.num_nextn_predict_layers));
    if (dev_.balance_layers()) c.all_reduce_mean(dev_.balance_device(), dev_.balance_layers());
    for (int l = 0; l < mc.num_hidden_layers + mc.num_nextn_predict_layers; ++l)
      if (int* counts = dev_.expert_counts_data(l)) c.all_reduce_sum(counts, size_t(mc.n_routed_experts));
    c.group_end();
    reduced_ranks_ = c.size();
  }

  static size_t used_with_pool_high(size_t used) {
    cudaMemPool_t pool;
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, current_device()));
    uint64_t reserved = 0, high = 0;
    CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved));
    CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &high));
    return used - std::min<size_t>(used, reserved) + high;
  }

  void capture() {
    peak_before_ = memory().peak;
    graph_.reset();
    cudaGraph_t g = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal));
    try {
      enqueue_step();
    } catch (...) {
      cudaStreamEndCapture(cudaStreamPerThread, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(cudaStreamPerThread, &g));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    CUDA_CHECK(e);
    graph_.reset(exec);
    graph_layout_ = dev_.layout();
    ++captures_;
    CUDA_CHECK(cudaGraphUpload(graph_.get(), cudaStreamPerThread));  // reserves the graph's memory now
    // The first capture hands back what the uncaptured steps left in the pool (their scratch is the graph's now).
    // Later ones (after a validation batch of another shape) do not: the pool would only grow again at the next
    // validation (with a trim at every capture the lyrics run trained in 90 s on an H200, without one in 72 s).
    if (captures_ > 1) return;
    CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
    cudaMemPool_t pool;
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, current_device()));
    CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
    uint64_t zero = 0;
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
  }
  struct GraphExecDeleter {
    void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
  };

  mutable Model<float> host_;  // the host twin: initial values, and the staging area of weights()
  mutable DeviceModel dev_;
  std::vector<DeviceModel::Slot> slots_;
  std::vector<DeviceBuffer<float>> moments_;  // exp_avg, exp_avg_sq of slot i at 2i, 2i+1
  DeviceBuffer<char> table_;
  unsigned long long max_n_ = 0;
  DeviceBuffer<StepIn> step_in_{1};
  DeviceBuffer<StepOut> step_out_{1};
  DeviceBuffer<double> parts_;  // sumsq_parts_kernel's partial sums: blocks() per tensor
  std::unique_ptr<CUgraphExec_st, GraphExecDeleter> graph_;
  int64_t graph_layout_ = -1, warm_layout_ = -1;  // DeviceModel::layout() the graph was captured on / warmed up on
  bool graph_enabled_ = true, timing_ = false;
  int captures_ = 0;
  int reduced_ranks_ = 1;  // the group size of the last all-reduce since the last forward (the bias update's)
  std::unique_ptr<ExpertParallel> ep_;  // set_communicator(c, true)
  size_t peak_before_ = 0;  // memory().peak when the last capture began
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const ModelConfig& c, uint64_t seed, const DeviceOptions& opt) {
  if (!gpu_available()) throw UserError(fmt::format("no usable GPU: {}", gpu_description()));
  return std::make_unique<CudaBackend>(c, seed, opt);
}

}  // namespace dsv3
