// The tiny MoE language model of the balancing experiment (tiny_moe_lm.h), on the CPU reference.
#include "04_aux_loss/tiny_moe_lm.h"

#include <algorithm>
#include <cmath>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"

namespace dsv3 {

void TinyMoeLmConfig::validate() const {
  require(vocab > 0, "vocab must be positive, got {}", vocab);
  require(n_layers > 0, "n_layers must be positive, got {}", n_layers);
  moe.validate();
  balance.validate();
}

template <typename T>
TinyMoeLm<T>::TinyMoeLm(const TinyMoeLmConfig& c, uint64_t seed) : cfg_(c) {
  c.validate();
  const int D = c.moe.dim, V = c.vocab;
  Rng rng(seed);
  wte_ = rng.normal_vec<T>(size_t(V) * D, 1.0);
  head_ = rng.normal_vec<T>(size_t(V) * D, 1.0 / std::sqrt(double(D)));
  final_norm_.assign(D, T(1));
  for (int l = 0; l < c.n_layers; ++l) {
    Layer L;
    L.norm.assign(D, T(1));
    L.p = moe_init_params<T>(c.moe, rng.next_u64());
    layers_.push_back(std::move(L));
  }
  for (auto& t : tensors()) {
    m_.emplace_back(t.value->size(), T(0));
    v_.emplace_back(t.value->size(), T(0));
  }
}

template <typename T>
std::vector<typename TinyMoeLm<T>::Tensor> TinyMoeLm<T>::tensors() {
  const int D = cfg_.moe.dim, V = cfg_.vocab;
  dwte_.resize(size_t(V) * D);
  dhead_.resize(size_t(V) * D);
  dfinal_norm_.resize(D);
  std::vector<Tensor> t = {{"wte", &wte_, &dwte_, true}};
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    if (L.g.gate_weight.empty()) L.g = moe_zero_params<T>(cfg_.moe);
    L.dnorm.resize(D);
    const std::string pre = "layers." + std::to_string(l) + ".";
    t.push_back({pre + "norm", &L.norm, &L.dnorm, false});
    auto pv = L.p.tensors(), gv = L.g.tensors();
    for (size_t i = 0; i < pv.size(); ++i) t.push_back({pre + pv[i].first, pv[i].second, gv[i].second, true});
  }
  t.push_back({"final_norm", &final_norm_, &dfinal_norm_, false});
  t.push_back({"head", &head_, &dhead_, true});
  return t;
}

template <typename T>
T TinyMoeLm<T>::forward(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "tiny LM: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const MoeConfig& mc = cfg_.moe;
  const int D = mc.dim, V = cfg_.vocab, N = B * Tn, E = mc.n_routed_experts, K = mc.n_activated_experts;
  B_ = B;
  seq_ = Tn;
  split_windows(tokens, B, Tn, inputs_, targets_);
  // 1) embedding
  h_.assign(layers_.size() + 1, std::vector<T>(size_t(N) * D));
  cpu::embedding_forward(h_[0].data(), inputs_.data(), wte_.data(), N, D, V);
  stats_ = RoutingStats{};
  // 2) pre-norm residual MoE layers
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    L.a.resize(size_t(N) * D);
    L.rstd.resize(N);
    L.m.resize(size_t(N) * D);
    L.saved.resize(moe_saved_size(mc, N));
    L.saved_int.resize(moe_saved_int_size(mc, N));
    cpu::rmsnorm_forward(L.a.data(), L.rstd.data(), h_[l].data(), L.norm.data(), N, D, cfg_.norm_eps);
    const MoeSaved<T> s = moe_saved_layout(L.saved.data(), L.saved_int.data(), mc, N);
    cpu::moe_forward(L.m.data(), s, L.a.data(), L.p.weights(), mc, N);
    for (size_t i = 0; i < h_[l].size(); ++i) h_[l + 1][i] = h_[l][i] + L.m[i];
    // 3) balance loss and routing statistics of this layer
    L.bal_f.resize(size_t(B) * E);
    L.bal_ssum.resize(N);
    T bal = 0;
    cpu::seq_balance_loss_forward(&bal, L.bal_f.data(), L.bal_ssum.data(), s.scores, s.indices, B, Tn, E, K,
                                  cfg_.balance.aux_alpha);
    stats_.balance_loss += double(bal);
    stats_.counts.emplace_back(s.counts, s.counts + E);
    stats_.maxvio_batch += max_violation(s.counts, E) / layers_.size();
    stats_.maxvio_seq += max_violation_per_sequence(s.indices, B, Tn, K, E) / layers_.size();
  }
  // 4) final norm, head, cross-entropy
  z_.resize(size_t(N) * D);
  zrstd_.resize(N);
  std::vector<T> logits(size_t(N) * V);
  probs_.resize(logits.size());
  return cpu::lm_head_forward(logits.data(), probs_.data(), z_.data(), zrstd_.data(), h_.back().data(),
                              final_norm_.data(), head_.data(), targets_.data(), N, D, V, cfg_.norm_eps);
}

template <typename T>
void TinyMoeLm<T>::backward() {
  const MoeConfig& mc = cfg_.moe;
  const int D = mc.dim, V = cfg_.vocab, N = B_ * seq_, E = mc.n_routed_experts;
  for (auto& t : tensors()) std::fill(t.grad->begin(), t.grad->end(), T(0));
  // 4) cross-entropy, head, final norm
  std::vector<T> dh(size_t(N) * D), tmp(size_t(N) * D);
  cpu::lm_head_backward(dfinal_norm_.data(), dhead_.data(), dh.data(), T(1), static_cast<const T*>(nullptr),
                        probs_.data(), z_.data(), zrstd_.data(), h_.back().data(), final_norm_.data(), head_.data(),
                        targets_.data(), N, D, V);
  // 2-3) layers in reverse: the residual passes dh through; the branch adds its input gradient
  std::vector<T> dscores(size_t(N) * E);
  for (int l = int(layers_.size()) - 1; l >= 0; --l) {
    Layer& L = layers_[l];
    const MoeSaved<T> s = moe_saved_layout(L.saved.data(), L.saved_int.data(), mc, N);
    const T* extra = nullptr;
    if (cfg_.balance.aux_alpha > 0) {
      cpu::seq_balance_loss_backward(dscores.data(), T(1), L.bal_f.data(), L.bal_ssum.data(), s.scores, B_, seq_, E,
                                     cfg_.balance.aux_alpha);
      extra = dscores.data();
    }
    cpu::moe_backward(L.g.grads(), tmp.data(), dh.data(), extra, s, L.a.data(), L.p.weights(), mc, N);
    std::vector<T> da = tmp;
    cpu::rmsnorm_backward(L.dnorm.data(), tmp.data(), da.data(), L.rstd.data(), h_[l].data(), L.norm.data(), N, D);
    for (size_t i = 0; i < dh.size(); ++i) dh[i] += tmp[i];
  }
  // 1) embedding
  cpu::embedding_backward(dwte_.data(), dh.data(), inputs_.data(), N, D, V);
}

template <typename T>
void TinyMoeLm<T>::optimizer_step(const AdamWConfig& opt, int64_t step) {
  auto ts = tensors();
  for (size_t i = 0; i < ts.size(); ++i)
    cpu::adamw_step(ts[i].value->data(), ts[i].grad->data(), m_[i].data(), v_[i].data(), ts[i].value->size(), step,
                    opt, ts[i].decay);
  if (cfg_.balance.bias_update_speed > 0)
    for (size_t l = 0; l < layers_.size(); ++l)
      cpu::bias_update(layers_[l].p.gate_bias.data(), stats_.counts[l].data(), cfg_.moe.n_routed_experts, B_ * seq_,
                       cfg_.moe.n_activated_experts, cfg_.balance.bias_update_speed);
}

template <typename T>
uint64_t TinyMoeLm<T>::routing_signature() {
  const int N = B_ * seq_, K = cfg_.moe.n_activated_experts;
  uint64_t h = 1469598103934665603ull;  // FNV-1a over every layer's chosen experts
  for (auto& L : layers_) {
    const MoeSaved<T> s = moe_saved_layout(L.saved.data(), L.saved_int.data(), cfg_.moe, N);
    for (int i = 0; i < N * K; ++i) h = (h ^ uint64_t(s.indices[i] + 1)) * 1099511628211ull;
  }
  return h;
}

template class TinyMoeLm<float>;
template class TinyMoeLm<double>;

}  // namespace dsv3
