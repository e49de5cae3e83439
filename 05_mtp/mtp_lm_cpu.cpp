// The small MTP language model (mtp_lm.h), on the CPU reference.
#include "05_mtp/mtp_lm.h"

#include <algorithm>
#include <cmath>

#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"

namespace dsv3 {

void MtpLmConfig::validate() const {
  require(n_layers >= 0, "MtpLmConfig.n_layers must be >= 0, got {}", n_layers);
  mtp.validate();
}

template <typename T>
MtpLm<T>::MtpLm(const MtpLmConfig& c, uint64_t seed) : cfg_(c) {
  c.validate();
  const int D = c.mtp.dim(), V = c.mtp.vocab;
  rope_ = rope_tables<T>(c.mtp.block.attn.rope);
  Rng rng(seed);
  embed_ = rng.normal_vec<T>(size_t(V) * D, 1.0);
  head_ = rng.normal_vec<T>(size_t(V) * D, 1.0 / std::sqrt(double(D)));
  norm_.assign(D, T(1));
  for (int l = 0; l < c.n_layers; ++l) layers_.push_back(block_init_params<T>(c.mtp.block, rng.next_u64()));
  for (int k = 0; k < c.mtp.depth; ++k) mtp_.push_back(mtp_init_params<T>(c.mtp, rng.next_u64()));
  for (auto& t : tensors()) {
    m_.emplace_back(t.value->size(), T(0));
    v_.emplace_back(t.value->size(), T(0));
  }
}

template <typename T>
std::vector<typename MtpLm<T>::Tensor> MtpLm<T>::tensors() {
  dembed_.resize(embed_.size());
  dnorm_.resize(norm_.size());
  dhead_.resize(head_.size());
  if (dlayers_.size() != layers_.size())
    dlayers_.assign(layers_.size(), block_zero_params<T>(cfg_.mtp.block));
  if (dmtp_.size() != mtp_.size()) dmtp_.assign(mtp_.size(), mtp_zero_params<T>(cfg_.mtp));
  std::vector<Tensor> t = {{"embed", &embed_, &dembed_, true}};
  auto add = [&t](const std::string& pre, auto& p, auto& g) {
    auto pv = p.tensors(), gv = g.tensors();
    for (size_t i = 0; i < pv.size(); ++i) {
      const bool is_norm = pv[i].first.find("norm") != std::string::npos;  // no decay on norm weights
      t.push_back({pre + pv[i].first, pv[i].second, gv[i].second, !is_norm});
    }
  };
  for (size_t l = 0; l < layers_.size(); ++l) add("layers." + std::to_string(l) + ".", layers_[l], dlayers_[l]);
  t.push_back({"norm", &norm_, &dnorm_, false});
  t.push_back({"head", &head_, &dhead_, true});
  for (size_t k = 0; k < mtp_.size(); ++k) add("mtp." + std::to_string(k) + ".", mtp_[k], dmtp_[k]);
  return t;
}

template <typename T>
T MtpLm<T>::forward(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "mtp lm: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const MtpConfig& mc = cfg_.mtp;
  const int D = mc.dim(), V = mc.vocab, N = B * Tn;
  B_ = B;
  seq_ = Tn;
  window_ = tokens;
  split_windows(tokens, B, Tn, inputs_, targets_);
  const MlaRope<T> rope = mla_rope(rope_);
  // 1) main model: embedding, blocks
  h_.assign(layers_.size() + 1, std::vector<T>(size_t(N) * D));
  cpu::embedding_forward(h_[0].data(), inputs_.data(), embed_.data(), N, D, V);
  block_saved_.clear();
  for (size_t l = 0; l < layers_.size(); ++l) {
    block_saved_.emplace_back(mc.block, B, Tn);
    cpu::block_forward(h_[l + 1].data(), block_saved_[l].saved, h_[l].data(), layers_[l].weights(), mc.block, B, Tn,
                       0, rope);
  }
  // 2) main head and loss
  z_.resize(size_t(N) * D);
  zrstd_.resize(N);
  std::vector<T> logits(size_t(N) * V);
  probs_.resize(logits.size());
  main_ce_ = cpu::lm_head_forward(logits.data(), probs_.data(), z_.data(), zrstd_.data(), h_.back().data(),
                                  norm_.data(), head_.data(), targets_.data(), N, D, V, mc.norm_eps);
  // 3) the MTP chain on the main model's normalised final hidden state z = final_norm(h_L)
  mtp_saved_.emplace(mc, B, Tn);
  mtp_ce_.assign(mc.depth, T(0));
  std::vector<MtpModuleWeights<T>> mw;
  for (auto& m : mtp_) mw.push_back(m.weights());
  const T l_mtp = cpu::mtp_forward(mtp_ce_.data(), mtp_saved_->saved.data(), z_.data(), window_.data(),
                                   {embed_.data(), norm_.data(), head_.data()}, mw.data(), mc, B, Tn, rope);
  return main_ce_ + l_mtp;
}

template <typename T>
void MtpLm<T>::backward() {
  const MtpConfig& mc = cfg_.mtp;
  const int D = mc.dim(), V = mc.vocab, N = B_ * seq_;
  const MlaRope<T> rope = mla_rope(rope_);
  for (auto& t : tensors()) std::fill(t.grad->begin(), t.grad->end(), T(0));
  // 3) the MTP chain: its gradient into z, the shared embedding, norm and head
  std::vector<T> dz_mtp(size_t(N) * D), dh(size_t(N) * D), tmp(size_t(N) * D);
  std::vector<MtpModuleWeights<T>> mw;
  std::vector<MtpModuleGrads<T>> mg;
  for (size_t k = 0; k < mtp_.size(); ++k) {
    mw.push_back(mtp_[k].weights());
    mg.push_back(dmtp_[k].grads());
  }
  const MtpSharedGrads<T> sg{dembed_.data(), dnorm_.data(), dhead_.data()};
  cpu::mtp_backward(mg.data(), sg, dz_mtp.data(), T(1), nullptr, mtp_saved_->saved.data(), z_.data(), window_.data(),
                    {embed_.data(), norm_.data(), head_.data()}, mw.data(), mc, B_, seq_, rope);
  // 2) main loss, head; both gradients into z add up before the final norm's backward
  cpu::lm_head_backward(dnorm_.data(), dhead_.data(), dh.data(), T(1), dz_mtp.data(), probs_.data(), z_.data(),
                        zrstd_.data(), h_.back().data(), norm_.data(), head_.data(), targets_.data(), N, D, V);
  // 1) blocks in reverse, then the embedding
  for (int l = int(layers_.size()) - 1; l >= 0; --l) {
    cpu::block_backward(dlayers_[l].grads(), tmp.data(), dh.data(), nullptr, block_saved_[l].saved, h_[l].data(),
                        layers_[l].weights(), mc.block, B_, seq_, 0, rope);
    dh.swap(tmp);
  }
  cpu::embedding_backward(dembed_.data(), dh.data(), inputs_.data(), N, D, V);
}

template <typename T>
void MtpLm<T>::optimizer_step(const AdamWConfig& opt, int64_t step) {
  auto ts = tensors();
  for (size_t i = 0; i < ts.size(); ++i)
    cpu::adamw_step(ts[i].value->data(), ts[i].grad->data(), m_[i].data(), v_[i].data(), ts[i].value->size(), step,
                    opt, ts[i].decay);
}

template class MtpLm<float>;
template class MtpLm<double>;

}  // namespace dsv3
