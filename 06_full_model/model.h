// Stage 06: the complete DeepSeek-V3 model assembled from stages 01-05, on the CPU reference.
//
//   h_0 = Emb(t_0..t_{T-1})
//   h_{l+1} = Block_l(h_l)           pre-norm MLA + (dense SwiGLU for l < first_k_dense_replace, else DeepSeekMoE)
//   L_CE  = CE(head(norm(h_L)), t_1..t_T)
//   L_MTP = (lambda / depth) sum_k CE_k          MTP modules on h_L, sharing Emb, norm and head (stage 05)
//   L_Bal = sum over MoE layers of the sequence-wise balance loss (alpha; stage 04)
//   L     = L_CE + L_MTP + L_Bal;  after each optimizer step every MoE layer's bias moves by gamma.
//
// Parameters convert to and from the Hugging Face tensor names of checkpoint.h. The same model on the GPU:
// model_device.h.
// Shape legend: B batch, T time, N = B*T, D hidden_size, V vocab_size.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "05_mtp/block.h"
#include "05_mtp/mtp.h"
#include "06_full_model/checkpoint.h"
#include "06_full_model/model_config.h"

namespace dsv3 {

struct ModelLosses {
  double ce = 0, mtp = 0, balance = 0;
  double total() const { return ce + mtp + balance; }
};

template <typename T>
class Model {
 public:
  Model(const ModelConfig& c, uint64_t seed);

  // Forward on tokens (B, T+1) (stage 05's window: inputs t_0..t_{T-1}, targets t_1..t_T). Returns the total
  // loss; its parts in losses(), the main logits (N, V) in logits().
  T forward(const std::vector<int>& tokens, int B, int Tn);
  // Gradients of the last forward's total loss (zeroed first).
  void backward();
  // gamma * sign(mean load - load) on every MoE layer's bias, from the last forward's loads.
  void update_bias();

  const ModelLosses& losses() const { return losses_; }
  const std::vector<T>& logits() const { return logits_; }
  // Cross-entropy of each MTP depth in the last forward (losses().mtp = lambda * their mean).
  const std::vector<T>& mtp_losses() const { return mtp_ce_; }
  // The residual stream h_0 .. h_L (each (N, D)) of the last forward.
  const std::vector<std::vector<T>>& hidden() const { return h_; }
  const ModelConfig& config() const { return cfg_; }
  // Read-only parameter views for inference code (stage 07's sampler) and diagnostics.
  const std::vector<T>& embed() const { return embed_; }
  const std::vector<T>& final_norm() const { return norm_; }
  const std::vector<T>& head() const { return head_; }
  const BlockParams<T>& layer(int l) const { return layers_.at(size_t(l)); }
  const MtpModuleParams<T>& mtp_module(int k) const { return mtp_.at(size_t(k)); }
  const RopeTables<T>& rope() const { return rope_; }
  // Tokens routed to each expert (E) by MoE layer l in the last forward (empty for a dense layer).
  std::vector<int> expert_counts(int l) const;

  struct Tensor {
    std::string name;  // model.py-style name (embed, layers.3.attn.wq_a, mtp.0.eh_proj, ...)
    std::vector<T>* value;
    std::vector<T>* grad;
  };
  // Every trained parameter with its gradient (the MoE biases excluded: they have none).
  std::vector<Tensor> tensors();
  // Hugging Face names -> fp32 values, and back (UserError naming a missing or mis-sized tensor).
  TensorMap to_tensor_map() const;
  void load_tensor_map(const TensorMap& m);
  // Hash of every MoE layer's chosen experts in the last forward (gradcheck's decision signature).
  uint64_t routing_signature() const;

 private:
  friend class DeviceModel;  // model_device.h: the same model on the GPU, built from (and checked against) this one
 public:
  BlockConfig block_config(int layer) const;
  MtpConfig mtp_config() const;

 private:
  // (HF name, tensor, offset, count) of every parameter, bias included: the one place that names them.
  struct View {
    std::string name;
    const std::vector<T>* tensor;
    size_t offset, count;
  };
  std::vector<View> views() const;

  ModelConfig cfg_;
  RopeTables<T> rope_;
  std::vector<T> embed_, dembed_, norm_, dnorm_, head_, dhead_;
  std::vector<BlockParams<T>> layers_, dlayers_;
  std::vector<MtpModuleParams<T>> mtp_, dmtp_;
  // saved by forward
  int B_ = 0, T_ = 0;
  std::vector<int> window_, inputs_, targets_;
  std::vector<std::vector<T>> h_;
  std::vector<BlockHostSaved<T>> saved_;
  std::optional<MtpHostSaved<T>> mtp_saved_;
  std::vector<std::vector<T>> bal_f_, bal_ssum_;
  std::vector<T> z_, zrstd_, probs_, logits_;
  std::vector<T> mtp_ce_;
  ModelLosses losses_;
};

}  // namespace dsv3
