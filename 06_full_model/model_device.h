// Stage 06 on CUDA: the complete model of model.h with its parameters on the GPU, forward and backward through
// the CUDA entry points of stages 01-05 (fp32; the path stage 07 speeds up). Built from a host Model<float>,
// whose values it uploads and into whose gradient tensors it can download, so tests compare the two.
// Needs CUDA: include only when DSV3_HAVE_CUDA.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "05_mtp/mtp_device.h"
#include "common/param_list_device.h"
#include "06_full_model/model.h"
#include "common/cuda_utils.h"

namespace dsv3 {

class DeviceModel {
 public:
  DeviceModel(const Model<float>& host, const DeviceOptions& opt);
  const DeviceOptions& options() const { return opt_; }
  // Expert parallel from now on (nullptr: off); UserError unless the experts run on the grouped path.
  void set_expert_parallel(ExpertParallel* ep);
  // As Model::forward / backward / update_bias, on the device. Tokens (B, T+1) on the host.
  float forward(const std::vector<int>& tokens, int B, int Tn);
  void backward();
  // skip: nullptr, or a device int that, when non-zero, leaves the update out (a step skipped on the device);
  // ranks: as Model::update_bias.
  void update_bias(const int* skip = nullptr, int ranks = 1);
  // forward() in three parts, for a caller that captures the device work in a CUDA graph (stage 07's step):
  // stage() checks the tokens on the host, (re)allocates the saved activations when (B, T) changes and uploads
  // the tokens; forward_on_device() queues the forward without a host synchronisation (losses stay on the
  // device); read_losses() reads them back (and checks the device's token flag), filling losses() and
  // mtp_losses(). backward() and update_bias() never synchronise.
  void stage(const std::vector<int>& tokens, int B, int Tn);
  void forward_on_device();
  float read_losses();
  // Changes whenever stage() reallocates the saved activations (a new (B, T)): a captured graph of an older
  // layout points at freed memory.
  int64_t layout() const { return layout_; }
  // The device copies of the loss parts that read_losses() reads: ce_device()[0] the main CE (mean), [k] MTP
  // depth k's mean CE; balance_device() the balance loss of each layer in [0, L + depth) (0 where none).
  const float* ce_device() const { return ce_.get(); }
  const float* balance_device() const { return bal_loss_.get(); }
  size_t balance_layers() const { return bal_loss_.size(); }
  int seq() const { return seq_; }
  float mtp_lambda() const { return mtp_config().mtp_lambda; }  // the float read_losses() weighs L_MTP with
  const ModelLosses& losses() const { return losses_; }
  const std::vector<float>& mtp_losses() const { return mtp_ce_; }  // CE of each MTP depth, last forward
  std::vector<float> logits() const { return logits_.download(); }
  // Writes this model's gradients (or, with values = true, its parameters) into the host model's tensors.
  void download(Model<float>& host, bool values) const;
  // The chosen experts of every main MoE layer in the last forward, as the host model's saved ints.
  std::vector<int> routing(int layer) const;
  // Tokens routed to each expert (E) by MoE layer l in the last forward (empty for a dense layer); l in
  // [0, L + depth): L + k is MTP module k's block (model.h's numbering).
  std::vector<int> expert_counts(int layer) const;
  // The same counts in place on the device (E ints; nullptr for a dense layer or before a forward), and the loss
  // parts' device copies, writable: data parallelism reduces them over ranks (stage 07's CUDA backend).
  int* expert_counts_data(int layer);
  float* ce_device() { return ce_.get(); }
  float* balance_device() { return bal_loss_.get(); }

  // Every trained parameter on the device with its gradient, named and ordered as Model::tensors() (the
  // model's one list); what an optimizer walks.
  struct Slot {
    std::string name;
    float* value;
    float* grad;
    size_t n;
    bool decays;  // AdamW's weight decay applies (matrices and the embedding, not norms)
  };
  std::vector<Slot> slots();
  // Optional timing of the phases of forward and backward with CUDA events (off by default; the benchmark's
  // breakdown). phase_times(): (phase, ms) of the last forward and backward, in order; empty when off.
  void set_phase_timing(bool on) { timing_ = on; }
  std::vector<std::pair<std::string, float>> phase_times() const;
  // Uploads the host model's parameter values (after a checkpoint load) into this model's buffers.
  void upload(const Model<float>& host);

 private:
  const Model<float>& host_;
  ModelConfig cfg_;
  DeviceOptions opt_;
  // The host model's stage configs with this model's precision and expert path.
  BlockConfig block_config(int layer) const;
  MtpConfig mtp_config() const;
  MlaDeviceRope rope_;
  ModelTensors<DeviceBuffer<float>> p_, g_;  // values, gradients
  std::vector<BlockWeights<float>> layer_w_;  // views of p_ and g_ (made once)
  std::vector<BlockGrads<float>> layer_g_;
  std::vector<MtpModuleWeights<float>> mtp_w_;
  std::vector<MtpModuleGrads<float>> mtp_g_;
  // saved by forward
  int B_ = 0, seq_ = 0;
  DeviceBuffer<int> window_, inputs_, targets_;
  std::vector<DeviceBuffer<float>> h_;
  std::vector<BlockDeviceSaved> saved_;
  std::optional<MtpDeviceSaved> mtp_saved_;
  std::vector<DeviceBuffer<float>> bal_f_, bal_ssum_;  // per layer in [0, L + depth); empty without a balance loss
  DeviceBuffer<float> z_, zrstd_, logits_, probs_, bal_loss_;
  const MoeSaved<float>& moe_saved(int layer) const;  // layer in [0, L + depth)
  // Layer l's sequence-wise balance loss into bal_loss_[l], and its gradient on the scores (false: none).
  void balance_forward(int layer, const MoeSaved<float>& moe);
  bool balance_backward(float* dscores, int layer, const MoeSaved<float>& moe) const;
  DeviceBuffer<int> bad_;   // set by a kernel that met a token id outside the vocabulary
  DeviceBuffer<float> ce_;  // 1 + depth mean cross-entropies (read_losses)
  int64_t layout_ = 0;
  ModelLosses losses_;
  std::vector<float> mtp_ce_;
  bool timing_ = false;
  std::vector<std::pair<std::string, std::shared_ptr<CUevent_st>>> marks_;
  void mark(const std::string& phase);
};

}  // namespace dsv3
