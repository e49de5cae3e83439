// A tiny MoE language model for the balancing experiment, built from stages 01-03 and lm_parts:
//
//   h_0 = wte[tokens]                                   embedding
//   h_{l+1} = h_l + MoE_l(RMSNorm_l(h_l))                pre-norm residual MoE layers (no attention:
//                                                        the experiment is about routing, not context)
//   logits = RMSNorm_f(h_L) head^T                      output head
//   loss = CE(logits, next tokens) + sum_l L_Bal,l      the balance loss of every MoE layer (alpha)
//
// After each step the routing bias of every layer moves by gamma (bias_update). Runs on the CPU reference.
// Shape legend: B batch, T time, N = B*T, D width, V vocabulary, E/K experts (see 03_moe/moe.h).
#pragma once

#include <cstdint>
#include <vector>

#include "03_moe/moe.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"

namespace dsv3 {

struct TinyMoeLmConfig {
  int vocab = 256;    // bytes
  int n_layers = 2;
  MoeConfig moe;      // moe.dim is the model width
  float norm_eps = 1e-6f;
  BalanceConfig balance;
  void validate() const;
};

// Per-step routing statistics, averaged over the layers unless per layer.
struct RoutingStats {
  double balance_loss = 0;       // sum over layers of L_Bal (0 when alpha = 0)
  double maxvio_batch = 0;       // mean over layers of MaxVio over the batch
  double maxvio_seq = 0;         // mean over layers of the mean per-sequence MaxVio
  std::vector<std::vector<int>> counts;  // (layers, E) tokens per expert
};

template <typename T>
class TinyMoeLm {
 public:
  TinyMoeLm(const TinyMoeLmConfig& c, uint64_t seed);

  // Forward on tokens (B, T+1): inputs are the first T of each row, targets the last T. Returns the
  // cross-entropy; the routing statistics land in stats(). Saves what backward needs.
  T forward(const std::vector<int>& tokens, int B, int Tn);
  // Gradients of CE + balance losses into grads() (zeroed first), from the last forward.
  void backward();
  // AdamW on every parameter (decay on matrices only), then the bias update with the last forward's loads.
  void optimizer_step(const AdamWConfig& opt, int64_t step);

  const RoutingStats& stats() const { return stats_; }
  const TinyMoeLmConfig& config() const { return cfg_; }
  // Every parameter with a gradient, and its gradient, by name (for gradchecks).
  struct Tensor {
    std::string name;
    std::vector<T>* value;
    std::vector<T>* grad;
    bool decay;
  };
  std::vector<Tensor> tensors();
  std::vector<T>& gate_bias(int layer) { return layers_[layer].p.gate_bias; }
  // The chosen experts of every layer in the last forward, for gradcheck's decision signature.
  uint64_t routing_signature();

 private:
  struct Layer {
    std::vector<T> norm, dnorm;  // (D)
    MoeParams<T> p, g;
    std::vector<T> a, rstd, m;   // saved: normed input (N, D), its rstd (N), MoE output (N, D)
    std::vector<T> saved;
    std::vector<int> saved_int;
    std::vector<T> bal_f, bal_ssum;
  };
  TinyMoeLmConfig cfg_;
  std::vector<T> wte_, dwte_, final_norm_, dfinal_norm_, head_, dhead_;
  std::vector<Layer> layers_;
  std::vector<std::vector<T>> m_, v_;  // AdamW moments, in tensors() order
  // saved by forward
  int B_ = 0, seq_ = 0;
  std::vector<int> inputs_, targets_;
  std::vector<std::vector<T>> h_;  // (L+1) residual streams (N, D)
  std::vector<T> z_, zrstd_, probs_;
  RoutingStats stats_;
};

}  // namespace dsv3
