// Stage 07: what the trainer needs from a model, whichever device holds it. Two implementations:
//   cpu  (backend_cpu.cpp): stage 06's Model<float>, the reference; AdamW and clipping on the host.
//   cuda (backend_cuda.cu): stage 06's DeviceModel; parameters, gradients and AdamW moments stay on the GPU;
//        Precision::BF16 runs the matrix products on bf16 tensor cores (see Precision).
// The trainer (train.h) owns the schedule, the data, validation, checkpoints and diagnostics; a backend owns
// the parameters, their gradients and the optimizer moments.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "04_aux_loss/lm_parts.h"
#include "06_full_model/model.h"
#include "03_moe/moe_expert_parallel.h"
#include "common/comm.h"
#include "common/errors.h"

namespace dsv3 {

// FP32: every product in fp32 (the path checked against the CPU reference).
// BF16: mixed precision with fp32 master weights and fp32 AdamW moments: the operands of the matrix products
//       (projections, attention scores and values, experts, head) are rounded to bf16 and multiplied on tensor
//       cores with fp32 accumulation; the router (gate logits, scores, bias), the norms, softmax, the loss and
//       the optimizer stay fp32. The routed experts run on the Hopper products on a 9.0 GPU (sm_90a build), else
//       on the segmented bf16 path when the model's shapes
//       allow it (moe_inter_dim and hidden_size multiples of 8), else on the grouped cuBLAS path.
enum class Precision { FP32, BF16 };
std::string precision_name(Precision p);
Precision parse_precision(const std::string& s);  // "fp32" | "bf16"; UserError otherwise
// The CUDA model's options for a precision and model (the choice of expert path above).
DeviceOptions device_options(Precision p, const ModelConfig& c);
// "grouped" | "segmented" | "hopper"; UserError otherwise.
MoeExperts parse_moe_experts(const std::string& s);
std::string moe_experts_name(MoeExperts e);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string describe() const = 0;  // e.g. "cpu fp32", "cuda bf16 (NVIDIA H100 80GB HBM3)"
  virtual const ModelConfig& config() const = 0;

  // Forward and backward on tokens (B, T+1) (stage 05's windows); gradients of the total loss are ready after.
  virtual ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) = 0;
  // Forward only (validation). Leaves the gradients alone.
  virtual ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) = 0;
  // MTP cross-entropy of each depth in the last forward (size = num_nextn_predict_layers).
  virtual std::vector<double> mtp_losses() const = 0;
  // Tokens routed to each expert by every layer in the last forward, indexed by layer in [0, L + depth) (L + k:
  // MTP module k's block, the checkpoint's numbering): E counts for an MoE layer, empty for a dense one.
  virtual std::vector<std::vector<int>> expert_counts() const = 0;

  // Global L2 norm of every gradient (the MoE biases have none).
  virtual double grad_norm() = 0;
  // One AdamW step (step counts from 1) on every parameter with gradient * grad_scale (clipping); weight decay
  // on matrices only (not norms), then the bias update (gamma) of every MoE layer from the last forward.
  virtual void step(const AdamWConfig& opt, float grad_scale, int64_t step) = 0;

  // One training step as train() makes it: forward + backward on tokens (with a communicator: all_reduce over its
  // group), the global gradient norm, then, when the
  // total loss and the norm are finite, AdamW (plan.opt, Adam's count plan.update) on the gradient scaled to at
  // most plan.grad_clip in norm (0: no clipping) and the bias update; a non-finite step changes no parameter.
  // This implementation composes the calls above; the CUDA backend replays the whole step as one CUDA graph.
  struct StepPlan {
    AdamWConfig opt;
    double grad_clip = 0;
    int64_t update = 1;
  };
  struct StepResult {
    ModelLosses losses;
    double grad_norm = 0;
    bool skipped = false;  // the loss or the norm was not finite: nothing was updated
  };
  virtual StepResult train_step(const std::vector<int>& tokens, int B, int T, const StepPlan& plan);

  // Data parallel (README "Several GPUs"): with a communicator set, train_step averages the loss parts and every
  // gradient over the group's ranks and sums the expert counts, after the backward and before the norm and the
  // update; the bias update then uses the group's counts and token count. Ranks that start from the same weights
  // and train on equal shards of a batch so take, each, the step one rank takes on the whole batch, and stay equal.
  // nullptr (the default): this rank alone, nothing reduced. The communicator must outlive its use here, and its
  // buffers must live where the backend's do (Communicator::on_device(): NCCL for CUDA, a host group for the CPU).
  // expert_parallel: also split every MoE layer's routed experts across the group (03_moe/moe_expert_parallel.h);
  // CUDA: only a backend whose experts run on the grouped path (UserError otherwise).
  virtual void set_communicator(Communicator* c, bool expert_parallel = false) {
    require(c || !expert_parallel, "expert parallel needs a group");
    comm_ = c;
  }
  Communicator* communicator() const { return comm_; }
  // train_step's reduction, exposed for tests: after forward_backward, the group's mean gradients and loss parts
  // and summed expert counts in place of this rank's. Returns the group's loss parts; mtp_losses() and
  // expert_counts() give the group's values after it, and the next step()'s bias update counts the group's tokens.
  virtual ModelLosses all_reduce(Communicator& c) = 0;

  // Whether train_step may capture and replay CUDA graphs (CUDA only; on by default; `bench --no-graph` turns it
  // off to measure what the graph saves), and how many captures it has made so far.
  virtual void set_cuda_graph(bool) {}
  virtual int graph_captures() const { return 0; }

  // Per-phase timing of forward and backward (the benchmark's breakdown; CUDA only, empty elsewhere).
  virtual void set_phase_timing(bool) {}
  virtual std::vector<std::pair<std::string, float>> phase_times() const { return {}; }
  // Expert parallel's timing (03_moe/moe_expert_parallel.h ExpertParallel::Times): on with set_exchange_timing;
  // zeros when the backend is not expert parallel.
  virtual void set_exchange_timing(bool) {}
  virtual ExpertParallel::Times exchange_times() const { return {}; }
  // Waits for queued device work (timing); no-op on the CPU.
  virtual void synchronize() {}
  // Device memory (bytes): in use now, peak (persistent buffers + the scratch pool's high-water mark), total;
  // zeros on the CPU.
  struct MemoryUse {
    size_t used = 0, peak = 0, total = 0;
  };
  virtual MemoryUse memory() const { return {}; }

  // Parameters by Hugging Face name (biases included), fp32 on the host, and back.
  virtual TensorMap weights() const = 0;
  virtual void load_weights(const TensorMap& m) = 0;
  // The last forward_backward's gradients of the total loss by Hugging Face name, fp32 on the host (the MoE
  // biases have none; the PyTorch oracle, torch_reference.py, compares them with autograd's).
  virtual TensorMap gradients() const = 0;
  // AdamW moments: "<model.py name>.exp_avg" / ".exp_avg_sq" for every tensor of Model::tensors().
  virtual TensorMap optimizer_state() const = 0;
  virtual void load_optimizer_state(const TensorMap& m) = 0;  // UserError naming a missing or mis-sized tensor

 protected:
  Communicator* comm_ = nullptr;
};


// The factor train_step applies to the gradient: grad_clip / norm when clipping is on and the norm exceeds it.
float clip_scale(double grad_clip, double grad_norm);

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& c, uint64_t seed);
// UserError when CUDA is not built in or no GPU is present, or when the options do not fit the model.
std::unique_ptr<Backend> make_cuda_backend(const ModelConfig& c, uint64_t seed, const DeviceOptions& opt);
// The same with device_options(p, c).
std::unique_ptr<Backend> make_cuda_backend(const ModelConfig& c, uint64_t seed, Precision p);

}  // namespace dsv3
