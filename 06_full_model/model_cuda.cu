// The complete model on CUDA (model_device.h): orchestration of the stages' CUDA entry points.
#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"
#include "05_mtp/residual_add.cuh"
#include "06_full_model/model_device.h"
#include "common/cuda_kernels.cuh"
#include "common/gemm.h"

namespace dsv3 {
namespace {

template <typename P, typename Z>
std::vector<P> upload_all(const std::vector<Z>& host) {
  std::vector<P> out;
  out.reserve(host.size());
  for (const auto& h : host) out.emplace_back(h);
  return out;
}

}  // namespace

DeviceModel::DeviceModel(const Model<float>& host)
    : host_(host), cfg_(host.cfg_), rope_(host.rope_), embed_(host.embed_), norm_(host.norm_), head_(host.head_),
      dembed_(host.embed_.size()), dnorm_(host.norm_.size()), dhead_(host.head_.size()),
      layers_(upload_all<BlockDeviceParams>(host.layers_)), mtp_(upload_all<MtpDeviceParams>(host.mtp_)) {
  std::vector<BlockParams<float>> zl;
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) zl.push_back(block_zero_params<float>(host.block_config(l)));
  dlayers_ = upload_all<BlockDeviceParams>(zl);
  std::vector<MtpModuleParams<float>> zm(mtp_.size(), mtp_zero_params<float>(host.mtp_config()));
  dmtp_ = upload_all<MtpDeviceParams>(zm);
}

float DeviceModel::forward(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "model: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B * Tn;
  const int E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  B_ = B;
  T_ = Tn;
  std::vector<int> in, tg;
  split_windows(tokens, B, Tn, in, tg);
  window_ = DeviceBuffer<int>(tokens);
  inputs_ = DeviceBuffer<int>(in);
  targets_ = DeviceBuffer<int>(tg);
  const MlaRope<float> rope = rope_.view();
  losses_ = ModelLosses{};
  // 1) embedding and blocks; balance loss per MoE layer
  h_.clear();
  for (int l = 0; l <= cfg_.num_hidden_layers; ++l) h_.emplace_back(size_t(N) * D);
  cuda::embedding_forward(h_[0].get(), inputs_.get(), embed_.get(), N, D, V);
  saved_.clear();
  bal_f_.clear();
  bal_ssum_.clear();
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    const BlockConfig bc = host_.block_config(l);
    saved_.emplace_back(bc, B, Tn);
    cuda::block_forward(h_[l + 1].get(), saved_[l].saved, h_[l].get(), layers_[l].weights(), bc, B, Tn, 0, rope);
    const bool bal = bc.ffn == FfnKind::Moe && cfg_.training.aux_alpha > 0;
    bal_f_.emplace_back(bal ? size_t(B) * E : 0);
    bal_ssum_.emplace_back(bal ? size_t(N) : 0);
    if (bal) {
      DeviceBuffer<float> loss(1);
      cuda::seq_balance_loss_forward(loss.get(), bal_f_[l].get(), bal_ssum_[l].get(), saved_[l].saved.moe.scores,
                                     saved_[l].saved.moe.indices, B, Tn, E, K, float(cfg_.training.aux_alpha));
      losses_.balance += loss.download()[0];
    }
  }
  // 2) final norm, head, cross-entropy
  z_ = DeviceBuffer<float>(size_t(N) * D);
  zrstd_ = DeviceBuffer<float>(N);
  logits_ = DeviceBuffer<float>(size_t(N) * V);
  probs_ = DeviceBuffer<float>(size_t(N) * V);
  cuda::rmsnorm_forward(z_.get(), zrstd_.get(), h_.back().get(), norm_.get(), N, D, float(cfg_.rms_norm_eps));
  cuda::gemm(Op::N, Op::T, N, V, D, 1.f, z_.get(), head_.get(), 0.f, logits_.get());
  losses_.ce = cuda::cross_entropy_forward(probs_.get(), logits_.get(), targets_.get(), N, V);
  // 3) MTP on the final hidden state
  if (!mtp_.empty()) {
    const MtpConfig mc = host_.mtp_config();
    mtp_saved_.emplace(mc, B, Tn);
    std::vector<float> ce(mc.depth);
    std::vector<MtpModuleWeights<float>> mw;
    for (auto& m : mtp_) mw.push_back(m.weights());
    losses_.mtp = cuda::mtp_forward(ce.data(), mtp_saved_->saved.data(), h_.back().get(), window_.get(),
                                    {embed_.get(), norm_.get(), head_.get()}, mw.data(), mc, B, Tn, rope);
  }
  return float(losses_.total());
}

void DeviceModel::backward() {
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * T_, E = cfg_.n_routed_experts;
  const MlaRope<float> rope = rope_.view();
  // zero every gradient
  dembed_.zero();
  dnorm_.zero();
  dhead_.zero();
  std::vector<BlockParams<float>> zl;
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) zl.push_back(block_zero_params<float>(host_.block_config(l)));
  dlayers_ = upload_all<BlockDeviceParams>(zl);
  std::vector<MtpModuleParams<float>> zm(mtp_.size(), mtp_zero_params<float>(host_.mtp_config()));
  dmtp_ = upload_all<MtpDeviceParams>(zm);
  DeviceBuffer<float> dh(size_t(N) * D), dz(size_t(N) * D), tmp(size_t(N) * D), dlogits(size_t(N) * V);
  dh.zero();
  // 3) MTP
  if (!mtp_.empty()) {
    std::vector<MtpModuleWeights<float>> mw;
    std::vector<MtpModuleGrads<float>> mg;
    for (size_t k = 0; k < mtp_.size(); ++k) {
      mw.push_back(mtp_[k].weights());
      mg.push_back(dmtp_[k].grads());
    }
    cuda::mtp_backward(mg.data(), {dembed_.get(), dnorm_.get(), dhead_.get()}, dh.get(), 1.f,
                       mtp_saved_->saved.data(), h_.back().get(), window_.get(),
                       {embed_.get(), norm_.get(), head_.get()}, mw.data(), host_.mtp_config(), B_, T_, rope);
  }
  // 2) cross-entropy, head, final norm
  cuda::cross_entropy_backward(dlogits.get(), 1.f, probs_.get(), targets_.get(), N, V);
  cuda::gemm(Op::T, Op::N, V, D, N, 1.f, dlogits.get(), z_.get(), 1.f, dhead_.get());
  cuda::gemm(Op::N, Op::N, N, D, V, 1.f, dlogits.get(), head_.get(), 0.f, dz.get());
  cuda::rmsnorm_backward(dnorm_.get(), tmp.get(), dz.get(), zrstd_.get(), h_.back().get(), norm_.get(), N, D);
  cuda::add_inplace(dh.get(), tmp.get(), dh.size());  // 05_mtp/residual_add.cuh
  // 1) blocks in reverse, then the embedding
  DeviceBuffer<float> dscores(size_t(N) * E);
  for (int l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
    const BlockConfig bc = host_.block_config(l);
    const float* extra = nullptr;
    if (bal_f_[l].size()) {
      cuda::seq_balance_loss_backward(dscores.get(), 1.f, bal_f_[l].get(), bal_ssum_[l].get(),
                                      saved_[l].saved.moe.scores, B_, T_, E, float(cfg_.training.aux_alpha));
      extra = dscores.get();
    }
    cuda::block_backward(dlayers_[l].grads(), tmp.get(), dh.get(), extra, saved_[l].saved, h_[l].get(),
                         layers_[l].weights(), bc, B_, T_, 0, rope);
    std::swap(dh, tmp);
  }
  cuda::embedding_backward(dembed_.get(), dh.get(), inputs_.get(), N, D, V);
}

void DeviceModel::update_bias() {
  const float gamma = float(cfg_.training.bias_update_speed);
  if (gamma <= 0) return;
  for (int l = 0; l < cfg_.num_hidden_layers; ++l)
    if (host_.block_config(l).ffn == FfnKind::Moe)
      cuda::bias_update(layers_[l].moe.ptr(1), saved_[l].saved.moe.counts, cfg_.n_routed_experts, B_ * T_,
                        cfg_.num_experts_per_tok, gamma);
}

void DeviceModel::download(Model<float>& host, bool values) const {
  if (values) {
    host.embed_ = embed_.download();
    host.norm_ = norm_.download();
    host.head_ = head_.download();
    for (size_t l = 0; l < layers_.size(); ++l) layers_[l].download(host.layers_[l]);
    for (size_t k = 0; k < mtp_.size(); ++k) mtp_[k].download(host.mtp_[k]);
    return;
  }
  host.tensors();  // sizes the host's gradient tensors
  host.dembed_ = dembed_.download();
  host.dnorm_ = dnorm_.download();
  host.dhead_ = dhead_.download();
  for (size_t l = 0; l < dlayers_.size(); ++l) {
    const std::vector<float> bias = host.dlayers_[l].moe.gate_bias;  // no gradient: keep the host's
    dlayers_[l].download(host.dlayers_[l]);
    host.dlayers_[l].moe.gate_bias = bias;
  }
  for (size_t k = 0; k < dmtp_.size(); ++k) dmtp_[k].download(host.dmtp_[k]);
}

std::vector<int> DeviceModel::routing(int layer) const {
  const auto ints = saved_[layer].i.download();
  const int NK = B_ * T_ * cfg_.num_experts_per_tok;
  const size_t off = size_t(saved_[layer].saved.moe.indices - saved_[layer].i.get());  // its place in the layout
  return std::vector<int>(ints.begin() + off, ints.begin() + off + NK);
}

}  // namespace dsv3
