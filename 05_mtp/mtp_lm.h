// A small language model with MTP, on the CPU reference: what the demo trains and what the "depth 0 is the
// plain model" test compares against. Built from block.h, mtp.h and stage 04's lm_parts:
//
//   h_0 = Emb(t_0..t_{T-1});  h_{l+1} = Block_l(h_l)              main model, n_layers blocks
//   z = final_norm(h_L);  L_main = CE(head(z), t_1..t_T)
//   L = L_main + L_MTP(z)                                        mtp.h, sharing Emb, final_norm, head
//
// Shape legend: B batch, T time, N = B*T, D width, V vocabulary (see mtp.h).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "05_mtp/mtp.h"

namespace dsv3 {

struct MtpLmConfig {
  int n_layers = 1;  // main-model blocks, each as mtp.block
  MtpConfig mtp;     // vocab, width, the block, depth, lambda, norm eps
  void validate() const;
};

template <typename T>
class MtpLm {
 public:
  MtpLm(const MtpLmConfig& c, uint64_t seed);

  // Forward on tokens (B, T+1) (mtp.h's window). Returns L_main + L_MTP; the parts in main_ce(), mtp_ce().
  T forward(const std::vector<int>& tokens, int B, int Tn);
  // Gradients of the last forward's total loss into the grad tensors (zeroed first).
  void backward();
  void optimizer_step(const AdamWConfig& opt, int64_t step);

  T main_ce() const { return main_ce_; }
  const std::vector<T>& mtp_ce() const { return mtp_ce_; }
  // Softmax of the main model (N, V) and of module k = 1..depth (N, V), from the last forward.
  const T* main_probs() const { return probs_.data(); }
  const T* mtp_probs(int k) const { return mtp_saved_->saved[k - 1].probs; }
  const MtpLmConfig& config() const { return cfg_; }

  struct Tensor {
    std::string name;
    std::vector<T>* value;
    std::vector<T>* grad;
    bool decay;
  };
  // Every parameter and its gradient, names as the released checkpoint's (embed, layers.L.*, norm, head,
  // mtp.K.*).
  std::vector<Tensor> tensors();

 private:
  MtpLmConfig cfg_;
  RopeTables<T> rope_;
  std::vector<T> embed_, dembed_, norm_, dnorm_, head_, dhead_;
  std::vector<BlockParams<T>> layers_, dlayers_;
  std::vector<MtpModuleParams<T>> mtp_, dmtp_;
  std::vector<std::vector<T>> m_, v_;  // AdamW moments, in tensors() order
  // saved by forward
  int B_ = 0, seq_ = 0;
  std::vector<int> window_, inputs_, targets_;
  std::vector<std::vector<T>> h_;  // (L+1) residual streams (N, D)
  std::vector<BlockHostSaved<T>> block_saved_;
  std::optional<MtpHostSaved<T>> mtp_saved_;
  std::vector<T> z_, zrstd_, probs_;
  T main_ce_ = 0;
  std::vector<T> mtp_ce_;
};

}  // namespace dsv3
