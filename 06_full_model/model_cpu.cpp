// The complete model (model.h) on the CPU reference.
#include "06_full_model/model.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"
#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"

namespace dsv3 {

BlockConfig block_config(const ModelConfig& c, int layer) {
  BlockConfig b;
  b.attn = c.mla();
  b.ffn = c.is_moe_layer(layer) ? FfnKind::Moe : FfnKind::Dense;
  b.mlp = {c.hidden_size, c.intermediate_size > 0 ? c.intermediate_size : 1};
  b.moe = c.moe();
  b.norm_eps = static_cast<float>(c.rms_norm_eps);
  return b;
}

MtpConfig mtp_config(const ModelConfig& c) {
  MtpConfig m;
  m.depth = c.num_nextn_predict_layers;
  m.vocab = c.vocab_size;
  m.block = block_config(c, c.num_hidden_layers);  // DeepSeek's MTP layer is numbered after the main layers
  m.mtp_lambda = static_cast<float>(c.training.mtp_lambda);
  m.norm_eps = static_cast<float>(c.rms_norm_eps);
  return m;
}

template <typename T>
Model<T>::Model(const ModelConfig& c, uint64_t seed) : cfg_(c) {
  c.validate();
  const int D = c.hidden_size, V = c.vocab_size;
  rope_ = rope_tables<T>(c.rope());
  // 1) values: the model's own draws, then each block and module from a seed of its own
  Rng rng(seed);
  p_.embed = rng.normal_vec<T>(size_t(V) * D, 1.0);
  p_.head = rng.normal_vec<T>(size_t(V) * D, 1.0 / std::sqrt(double(D)));
  p_.norm.assign(D, T(1));
  for (int l = 0; l < c.num_hidden_layers; ++l)
    p_.layers.push_back(block_init_params<T>(block_config(l), rng.next_u64()));
  for (int k = 0; k < c.num_nextn_predict_layers; ++k)
    p_.mtp.push_back(mtp_init_params<T>(mtp_config(), rng.next_u64()));
  if (c.initializer_range) {  // one std for every weight matrix (the draws above only fixed the shapes)
    Rng r(rng.next_u64());
    for_each_param(c, [&](const ParamInfo& i, std::vector<T>& v) {
      if (i.kind == ParamKind::Matrix || i.kind == ParamKind::Embedding)
        for (auto& x : v) x = static_cast<T>(r.normal() * *c.initializer_range);
    }, p_);
  }
  // 2) gradients: zeros of the same shapes
  g_.layers.resize(p_.layers.size());
  g_.mtp.resize(p_.mtp.size());
  for_each_param(c, [](const ParamInfo&, std::vector<T>& g, const std::vector<T>& v) { g.assign(v.size(), T(0)); },
                 g_, p_);
}

template <typename T>
std::vector<typename Model<T>::Tensor> Model<T>::tensors() {
  std::vector<Tensor> t;
  for_each_param(cfg_, [&t](const ParamInfo& i, std::vector<T>& v, std::vector<T>& g) {
    if (i.has_grad() && !v.empty()) t.push_back({i.name, &v, &g, i.kind});
  }, p_, g_);
  return t;
}

template <typename T>
bool Model<T>::has_balance_loss(int layer) const {
  return cfg_.is_moe_layer(layer) && cfg_.training.aux_alpha > 0;
}

// Layer `layer`'s sequence-wise balance loss (stage 04) from its router's saved scores and choices; keeps f and
// the score sums for the backward.
template <typename T>
T Model<T>::balance_forward(int layer, const MoeSaved<T>& moe) {
  const int E = cfg_.n_routed_experts, N = B_ * seq_;
  bal_f_[size_t(layer)].resize(size_t(B_) * E);
  bal_ssum_[size_t(layer)].resize(N);
  T bal = 0;
  cpu::seq_balance_loss_forward(&bal, bal_f_[size_t(layer)].data(), bal_ssum_[size_t(layer)].data(), moe.scores,
                                moe.indices, B_, seq_, E, cfg_.num_experts_per_tok, float(cfg_.training.aux_alpha));
  return bal;
}

template <typename T>
void Model<T>::balance_backward(T* dscores, int layer, const MoeSaved<T>& moe) const {
  cpu::seq_balance_loss_backward(dscores, T(1), bal_f_[size_t(layer)].data(), bal_ssum_[size_t(layer)].data(),
                                 moe.scores, B_, seq_, cfg_.n_routed_experts, float(cfg_.training.aux_alpha));
}

template <typename T>
T Model<T>::forward(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "model: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B * Tn;
  B_ = B;
  seq_ = Tn;
  window_ = tokens;
  split_windows(tokens, B, Tn, inputs_, targets_);
  const MlaRope<T> rope = mla_rope(rope_);
  losses_ = ModelLosses{};
  // 1) embedding and blocks; the balance loss of every MoE layer from its router's scores
  const int L = cfg_.num_hidden_layers;
  h_.assign(p_.layers.size() + 1, std::vector<T>(size_t(N) * D));
  cpu::embedding_forward(h_[0].data(), inputs_.data(), p_.embed.data(), N, D, V);
  saved_.clear();
  bal_f_.assign(size_t(L) + p_.mtp.size(), {});
  bal_ssum_.assign(bal_f_.size(), {});
  for (int l = 0; l < L; ++l) {
    const BlockConfig bc = block_config(l);
    saved_.emplace_back(bc, B, Tn);
    cpu::block_forward(h_[l + 1].data(), saved_[l].saved, h_[l].data(), p_.layers[l].weights(), bc, B, Tn, 0, rope);
    if (has_balance_loss(l)) losses_.balance += double(balance_forward(l, saved_[l].saved.moe));
  }
  // 2) final norm, head, cross-entropy
  z_.resize(size_t(N) * D);
  zrstd_.resize(N);
  logits_.resize(size_t(N) * V);
  probs_.resize(logits_.size());
  losses_.ce = double(cpu::lm_head_forward(logits_.data(), probs_.data(), z_.data(), zrstd_.data(), h_.back().data(),
                                           p_.norm.data(), p_.head.data(), targets_.data(), N, D, V,
                                           float(cfg_.rms_norm_eps)));
  // 3) MTP on the normalised final hidden state z = final_norm(h_L) (what the head reads); the balance loss of
  //    each module's MoE block, as of the main layers'
  if (!p_.mtp.empty()) {
    const MtpConfig mc = mtp_config();
    mtp_saved_.emplace(mc, B, Tn);
    mtp_ce_.assign(mc.depth, T(0));
    std::vector<MtpModuleWeights<T>> mw;
    for (auto& m : p_.mtp) mw.push_back(m.weights());
    losses_.mtp =
        double(cpu::mtp_forward(mtp_ce_.data(), mtp_saved_->saved.data(), z_.data(), window_.data(),
                                {p_.embed.data(), p_.norm.data(), p_.head.data()}, mw.data(), mc, B, Tn, rope));
    for (int k = 0; k < mc.depth; ++k)
      if (has_balance_loss(L + k))
        losses_.balance += double(balance_forward(L + k, mtp_saved_->saved[size_t(k)].block.moe));
  }
  return T(losses_.ce) + T(losses_.mtp) + T(losses_.balance);
}

template <typename T>
void Model<T>::backward() {
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * seq_, E = cfg_.n_routed_experts;
  const int L = cfg_.num_hidden_layers;
  const MlaRope<T> rope = mla_rope(rope_);
  for (auto& t : tensors()) std::fill(t.grad->begin(), t.grad->end(), T(0));
  std::vector<T> dz_mtp(size_t(N) * D, T(0)), dh(size_t(N) * D), tmp(size_t(N) * D);
  // 3) MTP (with its blocks' balance-loss gradients): gradient into z and the shared embedding, norm, head
  if (!p_.mtp.empty()) {
    std::vector<MtpModuleWeights<T>> mw;
    std::vector<MtpModuleGrads<T>> mg;
    std::vector<std::vector<T>> dscores(p_.mtp.size());
    std::vector<const T*> extra(p_.mtp.size(), nullptr);
    for (size_t k = 0; k < p_.mtp.size(); ++k) {
      mw.push_back(p_.mtp[k].weights());
      mg.push_back(g_.mtp[k].grads());
      if (!has_balance_loss(L + int(k))) continue;
      dscores[k].resize(size_t(N) * E);
      balance_backward(dscores[k].data(), L + int(k), mtp_saved_->saved[k].block.moe);
      extra[k] = dscores[k].data();
    }
    cpu::mtp_backward(mg.data(), {g_.embed.data(), g_.norm.data(), g_.head.data()}, dz_mtp.data(), T(1), extra.data(),
                      mtp_saved_->saved.data(), z_.data(), window_.data(),
                      {p_.embed.data(), p_.norm.data(), p_.head.data()}, mw.data(), mtp_config(), B_, seq_, rope);
  }
  // 2) cross-entropy, head; the MTP gradient joins at z; final norm
  cpu::lm_head_backward(g_.norm.data(), g_.head.data(), dh.data(), T(1), dz_mtp.data(), probs_.data(), z_.data(),
                        zrstd_.data(), h_.back().data(), p_.norm.data(), p_.head.data(), targets_.data(), N, D, V);
  // 1) blocks in reverse (with each MoE layer's balance-loss gradient on its scores), then the embedding
  std::vector<T> dscores(size_t(N) * E);
  for (int l = L - 1; l >= 0; --l) {
    const T* extra = nullptr;
    if (has_balance_loss(l)) {
      balance_backward(dscores.data(), l, saved_[l].saved.moe);
      extra = dscores.data();
    }
    cpu::block_backward(g_.layers[l].grads(), tmp.data(), dh.data(), extra, saved_[l].saved, h_[l].data(),
                        p_.layers[l].weights(), block_config(l), B_, seq_, 0, rope);
    dh.swap(tmp);
  }
  cpu::embedding_backward(g_.embed.data(), dh.data(), inputs_.data(), N, D, V);
}

template <typename T>
void Model<T>::update_bias(int ranks) {
  const float gamma = float(cfg_.training.bias_update_speed);
  if (gamma <= 0) return;
  // every MoE layer, the MTP modules' blocks included (paper §2.1.2: the bias of every routed expert)
  for (int l = 0; l < cfg_.num_hidden_layers + int(p_.mtp.size()); ++l)
    if (cfg_.is_moe_layer(l))
      cpu::bias_update(moe_params(l).gate_bias.data(), moe_saved(l).counts, cfg_.n_routed_experts,
                       B_ * seq_ * ranks, cfg_.num_experts_per_tok, gamma);
}

template <typename T>
const MoeParams<T>& Model<T>::moe_params(int layer) const {
  const int L = cfg_.num_hidden_layers;
  return layer < L ? p_.layers.at(size_t(layer)).moe : p_.mtp.at(size_t(layer - L)).block.moe;
}

template <typename T>
MoeParams<T>& Model<T>::moe_params(int layer) {
  return const_cast<MoeParams<T>&>(std::as_const(*this).moe_params(layer));
}

template <typename T>
const MoeSaved<T>& Model<T>::moe_saved(int layer) const {
  const int L = cfg_.num_hidden_layers;
  require(B_ > 0, "model: no forward has run yet");
  return layer < L ? saved_.at(size_t(layer)).saved.moe : mtp_saved_->saved.at(size_t(layer - L)).block.moe;
}

template <typename T>
uint64_t Model<T>::routing_signature() const {
  const int NK = B_ * seq_ * cfg_.num_experts_per_tok;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t l = 0; l < saved_.size(); ++l)
    if (block_config(int(l)).ffn == FfnKind::Moe)
      for (int i = 0; i < NK; ++i) h = (h ^ uint64_t(saved_[l].saved.moe.indices[i] + 1)) * 1099511628211ull;
  if (mtp_saved_ && mtp_config().block.ffn == FfnKind::Moe)
    for (const auto& s : mtp_saved_->saved)
      for (int i = 0; i < NK; ++i) h = (h ^ uint64_t(s.block.moe.indices[i] + 1)) * 1099511628211ull;
  return h;
}

// ---- Hugging Face names -------------------------------------------------------------------------------

template <typename T>
std::vector<int> Model<T>::expert_counts(int l) const {
  if (l < 0 || l >= cfg_.num_hidden_layers + int(p_.mtp.size()) || !cfg_.is_moe_layer(l) || B_ == 0) return {};
  const int* c = moe_saved(l).counts;
  return std::vector<int>(c, c + cfg_.n_routed_experts);
}

template <typename T>
int* Model<T>::expert_counts_data(int l) {
  if (l < 0 || l >= cfg_.num_hidden_layers + int(p_.mtp.size()) || !cfg_.is_moe_layer(l) || B_ == 0) return nullptr;
  return moe_saved(l).counts;
}

template <typename T>
std::vector<typename Model<T>::View> Model<T>::views(const ModelTensors<std::vector<T>>& s) const {
  std::vector<View> out;
  for_each_param(cfg_, [&out](const ParamInfo& i, const std::vector<T>& t) {
    if (t.empty()) return;
    const size_t at = i.hf.find("{e}");
    if (at == std::string::npos) {
      out.push_back({i.hf, &t, 0, t.size(), i.has_grad()});
      return;
    }
    const size_t E = size_t(i.shape.front()), per = t.size() / E;  // stacked (E, ...): one slice per expert
    for (size_t e = 0; e < E; ++e)
      out.push_back({i.hf.substr(0, at) + std::to_string(e) + i.hf.substr(at + 3), &t, e * per, per, i.has_grad()});
  }, s);
  return out;
}

template <typename T>
TensorMap Model<T>::to_tensor_map() const {
  TensorMap m;
  for (const auto& v : views())
    m[v.name] = std::vector<float>(v.tensor->begin() + v.offset, v.tensor->begin() + v.offset + v.count);
  return m;
}

template <typename T>
TensorMap Model<T>::gradient_tensor_map() const {
  TensorMap m;
  for (const auto& v : views(g_)) {
    if (!v.has_grad) continue;  // the MoE biases: set by update_bias
    m[v.name] = std::vector<float>(v.tensor->begin() + v.offset, v.tensor->begin() + v.offset + v.count);
  }
  return m;
}

template <typename T>
void Model<T>::load_tensor_map(const TensorMap& m) {
  for (const auto& v : views()) {
    const auto it = m.find(v.name);
    require(it != m.end(), "model: tensor '{}' is missing", v.name);
    require(it->second.size() == v.count, "model: tensor '{}' has {} values, expected {}", v.name, it->second.size(),
            v.count);
    auto& dst = const_cast<std::vector<T>&>(*v.tensor);  // views() is const so both directions share it
    std::copy(it->second.begin(), it->second.end(), dst.begin() + v.offset);
  }
}

template class Model<float>;
template class Model<double>;

}  // namespace dsv3
