// Stage 06: the complete DeepSeek-V3 model assembled from stages 01-05, on the CPU reference.
//
//   h_0 = Emb(t_0..t_{T-1})
//   h_{l+1} = Block_l(h_l)           pre-norm MLA + (dense SwiGLU for l < first_k_dense_replace, else DeepSeekMoE)
//   z     = norm(h_L);  L_CE = CE(head(z), t_1..t_T)
//   L_MTP = (lambda / depth) sum_k CE_k          MTP modules on z, sharing Emb, norm and head (stage 05)
//   L_Bal = sum over MoE layers (the MTP modules' included) of the sequence-wise balance loss (alpha; stage 04)
//   L     = L_CE + L_MTP + L_Bal;  after each optimizer step every MoE layer's bias (MTP's too) moves by gamma.
//
// Layers are numbered as in the checkpoint: 0 .. L-1 the main blocks, L + k the block of MTP module k.
//
// Parameters convert to and from the Hugging Face tensor names of checkpoint.h. The same model on the GPU:
// model_device.h.
// Shape legend: B batch, T time (positions per sequence; `seq_` in code, where T is the scalar type), N = B*T,
// D hidden_size, V vocab_size.
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

// The stage configs of layer l (0 .. L-1 the main blocks; MTP modules use block_config(c, L), DeepSeek's
// numbering of its MTP layer) and of the MTP chain.
BlockConfig block_config(const ModelConfig& c, int layer);
MtpConfig mtp_config(const ModelConfig& c);

// The model's parameters over a tensor storage X (common/param_list.h): Model holds its values and its
// gradients as two of these on the host, DeviceModel two on the device.
template <typename X>
struct ModelTensors {
  X embed;                               // (V, D)
  std::vector<BlockTensors<X>> layers;   // L blocks
  X norm;                                // (D) the final norm
  X head;                                // (V, D)
  std::vector<MtpModuleTensors<X>> mtp;  // num_nextn_predict_layers modules
};

// The one list of the model: its own tensors and each layer's list, with model.py names (embed,
// layers.3.attn.wq_a, norm, head, mtp.0.eh_proj) and the checkpoint's Hugging Face names
// (model.embed_tokens.weight, model.layers.3.self_attn.q_a_proj.weight, ..., model.layers.(L+k).eh_proj.weight).
// Every s must hold c's number of layers and modules.
template <typename F, typename... S>
void for_each_param(const ModelConfig& c, F&& f, S&&... s) {
  const int64_t V = c.vocab_size, D = c.hidden_size;
  const int L = c.num_hidden_layers;
  f(ParamInfo{"embed", "model.embed_tokens.weight", {V, D}, ParamKind::Embedding, ""}, s.embed...);
  for (int l = 0; l < L; ++l) {
    const std::string n = std::to_string(l);
    for_each_param(block_config(c, l), prefixed("layers." + n + ".", "model.layers." + n + ".", f),
                   s.layers[size_t(l)]...);
  }
  f(ParamInfo{"norm", "model.norm.weight", {D}, ParamKind::Norm, ""}, s.norm...);
  f(ParamInfo{"head", "lm_head.weight", {V, D}, ParamKind::Matrix, ""}, s.head...);
  for (int k = 0; k < c.num_nextn_predict_layers; ++k)
    for_each_param(mtp_config(c),
                   prefixed("mtp." + std::to_string(k) + ".", "model.layers." + std::to_string(L + k) + ".", f),
                   s.mtp[size_t(k)]...);
}

// How the CUDA model (model_device.h) computes: the precision of every matrix product (the MoE routers' stay
// fp32) and the path of the routed experts (03_moe/moe.h). The defaults are the path checked against the CPU.
struct DeviceOptions {
  Matmul matmul = Matmul::FP32;
  MoeExperts experts = MoeExperts::Grouped;
  ExpertParallel* expert_parallel = nullptr;  // MoeConfig::expert_parallel of every MoE layer (Grouped experts only)
  MlaConfig::Attention attention = MlaConfig::Attention::Auto;  // the attention layers' kernels (02_mla/mla.h)
};

struct ModelLosses {
  double ce = 0, mtp = 0, balance = 0;
  double total() const { return ce + mtp + balance; }
};

template <typename T>
class Model {
 public:
  // Initial values from seed: with c.initializer_range set, every weight matrix N(0, r^2) (Hugging Face's and
  // DeepSeek-V3's rule); otherwise the stages' fan-in scheme: embedding N(0, 1), head N(0, 1/D), projections and
  // experts N(0, 1/fan_in). Norm weights 1, routing biases 0.
  Model(const ModelConfig& c, uint64_t seed);

  // Forward on tokens (B, T+1) (stage 05's window: inputs t_0..t_{T-1}, targets t_1..t_T). Returns the total
  // loss; its parts in losses(), the main logits (N, V) in logits().
  T forward(const std::vector<int>& tokens, int B, int Tn);
  // Gradients of the last forward's total loss (zeroed first).
  void backward();
  // gamma * sign(mean load - load) on every MoE layer's bias (the MTP modules' blocks included), from the last
  // forward's loads. ranks: the data-parallel group's size, when expert_counts_data() holds the group's summed
  // counts (the mean load is then over ranks * B * T tokens); 1 alone.
  void update_bias(int ranks = 1);

  const ModelLosses& losses() const { return losses_; }
  const std::vector<T>& logits() const { return logits_; }
  // Cross-entropy of each MTP depth in the last forward (losses().mtp = lambda * their mean).
  const std::vector<T>& mtp_losses() const { return mtp_ce_; }
  // The residual stream h_0 .. h_L (each (N, D)) of the last forward.
  const std::vector<std::vector<T>>& hidden() const { return h_; }
  // z = norm(h_L) (N, D) of the last forward: what the head and MTP module 1 read.
  const std::vector<T>& normed_hidden() const { return z_; }
  const ModelConfig& config() const { return cfg_; }
  // Read-only parameter views for inference code (stage 07's sampler) and diagnostics.
  const std::vector<T>& embed() const { return p_.embed; }
  const std::vector<T>& final_norm() const { return p_.norm; }
  const std::vector<T>& head() const { return p_.head; }
  const BlockParams<T>& layer(int l) const { return p_.layers.at(size_t(l)); }
  const MtpModuleParams<T>& mtp_module(int k) const { return p_.mtp.at(size_t(k)); }
  const RopeTables<T>& rope() const { return rope_; }
  // Tokens routed to each expert (E) by MoE layer l in the last forward (empty for a dense layer); l in
  // [0, L + depth): L + k is MTP module k's block.
  std::vector<int> expert_counts(int l) const;
  // The same counts in place (E ints; nullptr for a dense layer or before a forward): data parallelism sums them
  // over ranks before update_bias(ranks).
  int* expert_counts_data(int l);

  struct Tensor {
    std::string name;  // model.py-style name (embed, layers.3.attn.wq_a, mtp.0.eh_proj, ...)
    std::vector<T>* value;
    std::vector<T>* grad;
    ParamKind kind;    // Matrix and Embedding take AdamW's weight decay, Norm does not
  };
  // Every trained parameter with its gradient, in the model's list order (the MoE biases excluded: they have
  // none).
  std::vector<Tensor> tensors();
  // Hugging Face names -> fp32 values, and back (UserError naming a missing or mis-sized tensor).
  TensorMap to_tensor_map() const;
  void load_tensor_map(const TensorMap& m);
  // The last backward's gradients under the same names (the MoE biases, which have none, absent).
  TensorMap gradient_tensor_map() const;
  // Hash of every MoE layer's chosen experts in the last forward (gradcheck's decision signature).
  uint64_t routing_signature() const;

 private:
  friend class DeviceModel;  // model_device.h: the same model on the GPU, built from (and checked against) this one
 public:
  BlockConfig block_config(int layer) const {
    BlockConfig b = dsv3::block_config(cfg_, layer);
    b.moe.expert_parallel = ep_;
    return b;
  }
  MtpConfig mtp_config() const {
    MtpConfig m = dsv3::mtp_config(cfg_);
    m.block.moe.expert_parallel = ep_;
    return m;
  }
  // Expert parallel (03_moe/moe_expert_parallel.h): every MoE layer's routed experts split across ep's group (a
  // host group: this is the CPU model); nullptr: all here (the default).
  void set_expert_parallel(ExpertParallel* ep) { ep_ = ep; }

 private:
  // (HF name, tensor, offset, count) of every parameter, bias included (the model's list; a tensor stacked
  // over experts gives one view per expert).
  struct View {
    std::string name;
    const std::vector<T>* tensor;
    size_t offset, count;
    bool has_grad;  // false for the MoE biases
  };
  std::vector<View> views() const { return views(p_); }
  std::vector<View> views(const ModelTensors<std::vector<T>>& s) const;
  // The MoE parameters and saved routing of layer l in [0, L + depth) (L + k: MTP module k's block).
  const MoeParams<T>& moe_params(int layer) const;
  MoeParams<T>& moe_params(int layer);
  const MoeSaved<T>& moe_saved(int layer) const;
  bool has_balance_loss(int layer) const;
  T balance_forward(int layer, const MoeSaved<T>& moe);
  void balance_backward(T* dscores, int layer, const MoeSaved<T>& moe) const;

  ModelConfig cfg_;
  RopeTables<T> rope_;
  ModelTensors<std::vector<T>> p_, g_;  // values, gradients
  // saved by forward
  int B_ = 0, seq_ = 0;
  std::vector<int> window_, inputs_, targets_;
  std::vector<std::vector<T>> h_;
  std::vector<BlockHostSaved<T>> saved_;
  std::optional<MtpHostSaved<T>> mtp_saved_;
  std::vector<std::vector<T>> bal_f_, bal_ssum_;  // per layer in [0, L + depth); empty without a balance loss
  std::vector<T> z_, zrstd_, probs_, logits_;
  std::vector<T> mtp_ce_;
  ModelLosses losses_;
  ExpertParallel* ep_ = nullptr;
};

}  // namespace dsv3
