// The complete model (model.h) on the CPU reference.
#include "06_full_model/model.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"
#include "common/errors.h"
#include "common/gemm.h"
#include "common/rng.h"

namespace dsv3 {

template <typename T>
BlockConfig Model<T>::block_config(int layer) const {
  BlockConfig b;
  b.attn = cfg_.mla();
  b.ffn = cfg_.is_moe_layer(layer) ? FfnKind::Moe : FfnKind::Dense;
  b.inter_dim = cfg_.intermediate_size > 0 ? cfg_.intermediate_size : 1;
  b.moe = cfg_.moe();
  b.norm_eps = static_cast<float>(cfg_.rms_norm_eps);
  return b;
}

template <typename T>
MtpConfig Model<T>::mtp_config() const {
  MtpConfig m;
  m.depth = cfg_.num_nextn_predict_layers;
  m.vocab = cfg_.vocab_size;
  m.block = block_config(cfg_.num_hidden_layers);  // DeepSeek's MTP layer is numbered after the main layers
  m.mtp_lambda = static_cast<float>(cfg_.training.mtp_lambda);
  m.norm_eps = static_cast<float>(cfg_.rms_norm_eps);
  return m;
}

template <typename T>
Model<T>::Model(const ModelConfig& c, uint64_t seed) : cfg_(c) {
  c.validate();
  const int D = c.hidden_size, V = c.vocab_size;
  rope_ = rope_tables<T>(c.rope());
  Rng rng(seed);
  embed_ = rng.normal_vec<T>(size_t(V) * D, 1.0);
  head_ = rng.normal_vec<T>(size_t(V) * D, 1.0 / std::sqrt(double(D)));
  norm_.assign(D, T(1));
  for (int l = 0; l < c.num_hidden_layers; ++l) layers_.push_back(block_init_params<T>(block_config(l), rng.next_u64()));
  for (int k = 0; k < c.num_nextn_predict_layers; ++k) mtp_.push_back(mtp_init_params<T>(mtp_config(), rng.next_u64()));
  if (c.initializer_range) {  // one std for every weight matrix (the draws above only fixed the shapes)
    Rng r(rng.next_u64());
    for (auto& t : tensors())
      if (!is_norm_weight(t.name))
        for (auto& x : *t.value) x = static_cast<T>(r.normal() * *c.initializer_range);
  }
}

template <typename T>
bool Model<T>::is_norm_weight(const std::string& name) {
  const size_t dot = name.rfind('.');
  const std::string last = dot == std::string::npos ? name : name.substr(dot + 1);
  return last.size() >= 4 && last.compare(last.size() - 4, 4, "norm") == 0;
}

template <typename T>
std::vector<typename Model<T>::Tensor> Model<T>::tensors() {
  dembed_.resize(embed_.size());
  dnorm_.resize(norm_.size());
  dhead_.resize(head_.size());
  if (dlayers_.size() != layers_.size())
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) dlayers_.push_back(block_zero_params<T>(block_config(l)));
  if (dmtp_.size() != mtp_.size()) dmtp_.assign(mtp_.size(), mtp_zero_params<T>(mtp_config()));
  std::vector<Tensor> t = {{"embed", &embed_, &dembed_}};
  auto add = [&t](const std::string& pre, auto& p, auto& g) {
    auto pv = p.tensors(), gv = g.tensors();
    for (size_t i = 0; i < pv.size(); ++i) t.push_back({pre + pv[i].first, pv[i].second, gv[i].second});
  };
  for (size_t l = 0; l < layers_.size(); ++l) add("layers." + std::to_string(l) + ".", layers_[l], dlayers_[l]);
  t.push_back({"norm", &norm_, &dnorm_});
  t.push_back({"head", &head_, &dhead_});
  for (size_t k = 0; k < mtp_.size(); ++k) add("mtp." + std::to_string(k) + ".", mtp_[k], dmtp_[k]);
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
  const int E = cfg_.n_routed_experts, N = B_ * T_;
  bal_f_[size_t(layer)].resize(size_t(B_) * E);
  bal_ssum_[size_t(layer)].resize(N);
  T bal = 0;
  cpu::seq_balance_loss_forward(&bal, bal_f_[size_t(layer)].data(), bal_ssum_[size_t(layer)].data(), moe.scores,
                                moe.indices, B_, T_, E, cfg_.num_experts_per_tok, float(cfg_.training.aux_alpha));
  return bal;
}

template <typename T>
void Model<T>::balance_backward(T* dscores, int layer, const MoeSaved<T>& moe) const {
  cpu::seq_balance_loss_backward(dscores, T(1), bal_f_[size_t(layer)].data(), bal_ssum_[size_t(layer)].data(),
                                 moe.scores, B_, T_, cfg_.n_routed_experts, float(cfg_.training.aux_alpha));
}

template <typename T>
T Model<T>::forward(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "model: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B * Tn;
  B_ = B;
  T_ = Tn;
  window_ = tokens;
  split_windows(tokens, B, Tn, inputs_, targets_);
  const MlaRope<T> rope = mla_rope(rope_);
  losses_ = ModelLosses{};
  // 1) embedding and blocks; the balance loss of every MoE layer from its router's scores
  const int L = cfg_.num_hidden_layers;
  h_.assign(layers_.size() + 1, std::vector<T>(size_t(N) * D));
  cpu::embedding_forward(h_[0].data(), inputs_.data(), embed_.data(), N, D, V);
  saved_.clear();
  bal_f_.assign(size_t(L) + mtp_.size(), {});
  bal_ssum_.assign(bal_f_.size(), {});
  for (int l = 0; l < L; ++l) {
    const BlockConfig bc = block_config(l);
    saved_.emplace_back(bc, B, Tn);
    cpu::block_forward(h_[l + 1].data(), saved_[l].saved, h_[l].data(), layers_[l].weights(), bc, B, Tn, 0, rope);
    if (has_balance_loss(l)) losses_.balance += double(balance_forward(l, saved_[l].saved.moe));
  }
  // 2) final norm, head, cross-entropy
  z_.resize(size_t(N) * D);
  zrstd_.resize(N);
  logits_.resize(size_t(N) * V);
  probs_.resize(logits_.size());
  losses_.ce = double(cpu::lm_head_forward(logits_.data(), probs_.data(), z_.data(), zrstd_.data(), h_.back().data(),
                                           norm_.data(), head_.data(), targets_.data(), N, D, V,
                                           float(cfg_.rms_norm_eps)));
  // 3) MTP on the normalised final hidden state z = final_norm(h_L) (what the head reads); the balance loss of
  //    each module's MoE block, as of the main layers'
  if (!mtp_.empty()) {
    const MtpConfig mc = mtp_config();
    mtp_saved_.emplace(mc, B, Tn);
    mtp_ce_.assign(mc.depth, T(0));
    std::vector<MtpModuleWeights<T>> mw;
    for (auto& m : mtp_) mw.push_back(m.weights());
    losses_.mtp = double(cpu::mtp_forward(mtp_ce_.data(), mtp_saved_->saved.data(), z_.data(), window_.data(),
                                          {embed_.data(), norm_.data(), head_.data()}, mw.data(), mc, B, Tn, rope));
    for (int k = 0; k < mc.depth; ++k)
      if (has_balance_loss(L + k))
        losses_.balance += double(balance_forward(L + k, mtp_saved_->saved[size_t(k)].block.moe));
  }
  return T(losses_.ce) + T(losses_.mtp) + T(losses_.balance);
}

template <typename T>
void Model<T>::backward() {
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * T_, E = cfg_.n_routed_experts;
  const int L = cfg_.num_hidden_layers;
  const MlaRope<T> rope = mla_rope(rope_);
  for (auto& t : tensors()) std::fill(t.grad->begin(), t.grad->end(), T(0));
  std::vector<T> dz_mtp(size_t(N) * D, T(0)), dh(size_t(N) * D), tmp(size_t(N) * D);
  // 3) MTP (with its blocks' balance-loss gradients): gradient into z and the shared embedding, norm, head
  if (!mtp_.empty()) {
    std::vector<MtpModuleWeights<T>> mw;
    std::vector<MtpModuleGrads<T>> mg;
    std::vector<std::vector<T>> dscores(mtp_.size());
    std::vector<const T*> extra(mtp_.size(), nullptr);
    for (size_t k = 0; k < mtp_.size(); ++k) {
      mw.push_back(mtp_[k].weights());
      mg.push_back(dmtp_[k].grads());
      if (!has_balance_loss(L + int(k))) continue;
      dscores[k].resize(size_t(N) * E);
      balance_backward(dscores[k].data(), L + int(k), mtp_saved_->saved[k].block.moe);
      extra[k] = dscores[k].data();
    }
    cpu::mtp_backward(mg.data(), {dembed_.data(), dnorm_.data(), dhead_.data()}, dz_mtp.data(), T(1), extra.data(),
                      mtp_saved_->saved.data(), z_.data(), window_.data(), {embed_.data(), norm_.data(), head_.data()},
                      mw.data(), mtp_config(), B_, T_, rope);
  }
  // 2) cross-entropy, head; the MTP gradient joins at z; final norm
  cpu::lm_head_backward(dnorm_.data(), dhead_.data(), dh.data(), T(1), dz_mtp.data(), probs_.data(), z_.data(),
                        zrstd_.data(), h_.back().data(), norm_.data(), head_.data(), targets_.data(), N, D, V);
  // 1) blocks in reverse (with each MoE layer's balance-loss gradient on its scores), then the embedding
  std::vector<T> dscores(size_t(N) * E);
  for (int l = L - 1; l >= 0; --l) {
    const T* extra = nullptr;
    if (has_balance_loss(l)) {
      balance_backward(dscores.data(), l, saved_[l].saved.moe);
      extra = dscores.data();
    }
    cpu::block_backward(dlayers_[l].grads(), tmp.data(), dh.data(), extra, saved_[l].saved, h_[l].data(),
                        layers_[l].weights(), block_config(l), B_, T_, 0, rope);
    dh.swap(tmp);
  }
  cpu::embedding_backward(dembed_.data(), dh.data(), inputs_.data(), N, D, V);
}

template <typename T>
void Model<T>::update_bias() {
  const float gamma = float(cfg_.training.bias_update_speed);
  if (gamma <= 0) return;
  // every MoE layer, the MTP modules' blocks included (paper §2.1.2: the bias of every routed expert)
  for (int l = 0; l < cfg_.num_hidden_layers + int(mtp_.size()); ++l)
    if (cfg_.is_moe_layer(l))
      cpu::bias_update(moe_params(l).gate_bias.data(), moe_saved(l).counts, cfg_.n_routed_experts, B_ * T_,
                       cfg_.num_experts_per_tok, gamma);
}

template <typename T>
const MoeParams<T>& Model<T>::moe_params(int layer) const {
  const int L = cfg_.num_hidden_layers;
  return layer < L ? layers_.at(size_t(layer)).moe : mtp_.at(size_t(layer - L)).block.moe;
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
  const int NK = B_ * T_ * cfg_.num_experts_per_tok;
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
  if (l < 0 || l >= cfg_.num_hidden_layers + int(mtp_.size()) || !cfg_.is_moe_layer(l) || B_ == 0) return {};
  const int* c = moe_saved(l).counts;
  return std::vector<int>(c, c + cfg_.n_routed_experts);
}

template <typename T>
std::vector<typename Model<T>::View> Model<T>::views() const {
  std::vector<View> v;
  auto whole = [&v](const std::string& name, const std::vector<T>& t) { v.push_back({name, &t, 0, t.size()}); };
  auto block = [&](const std::string& p, const BlockParams<T>& b, const BlockConfig& bc) {
    whole(p + "input_layernorm.weight", b.attn_norm);
    if (cfg_.q_lora_rank > 0) {
      whole(p + "self_attn.q_a_proj.weight", b.attn.wq_a);
      whole(p + "self_attn.q_a_layernorm.weight", b.attn.q_norm);
      whole(p + "self_attn.q_b_proj.weight", b.attn.wq_b);
    } else {
      whole(p + "self_attn.q_proj.weight", b.attn.wq);
    }
    whole(p + "self_attn.kv_a_proj_with_mqa.weight", b.attn.wkv_a);
    whole(p + "self_attn.kv_a_layernorm.weight", b.attn.kv_norm);
    whole(p + "self_attn.kv_b_proj.weight", b.attn.wkv_b);
    whole(p + "self_attn.o_proj.weight", b.attn.wo);
    whole(p + "post_attention_layernorm.weight", b.ffn_norm);
    if (bc.ffn == FfnKind::Dense) {
      whole(p + "mlp.gate_proj.weight", b.mlp.w1);
      whole(p + "mlp.up_proj.weight", b.mlp.w3);
      whole(p + "mlp.down_proj.weight", b.mlp.w2);
      return;
    }
    whole(p + "mlp.gate.weight", b.moe.gate_weight);
    whole(p + "mlp.gate.e_score_correction_bias", b.moe.gate_bias);
    const size_t per = size_t(cfg_.moe_intermediate_size) * cfg_.hidden_size;  // one expert's matrix
    for (int j = 0; j < cfg_.n_routed_experts; ++j) {  // our experts are stacked (E, ...): one slice each
      const std::string q = p + "mlp.experts." + std::to_string(j) + ".";
      v.push_back({q + "gate_proj.weight", &b.moe.w1, j * per, per});
      v.push_back({q + "up_proj.weight", &b.moe.w3, j * per, per});
      v.push_back({q + "down_proj.weight", &b.moe.w2, j * per, per});
    }
    if (cfg_.n_shared_experts > 0) {
      whole(p + "mlp.shared_experts.gate_proj.weight", b.moe.shared_w1);
      whole(p + "mlp.shared_experts.up_proj.weight", b.moe.shared_w3);
      whole(p + "mlp.shared_experts.down_proj.weight", b.moe.shared_w2);
    }
  };
  whole("model.embed_tokens.weight", embed_);
  for (size_t l = 0; l < layers_.size(); ++l)
    block("model.layers." + std::to_string(l) + ".", layers_[l], block_config(int(l)));
  whole("model.norm.weight", norm_);
  whole("lm_head.weight", head_);
  for (size_t k = 0; k < mtp_.size(); ++k) {
    const std::string p = "model.layers." + std::to_string(cfg_.num_hidden_layers + k) + ".";
    whole(p + "enorm.weight", mtp_[k].enorm);
    whole(p + "hnorm.weight", mtp_[k].hnorm);
    whole(p + "eh_proj.weight", mtp_[k].eh_proj);
    block(p, mtp_[k].block, mtp_config().block);
  }
  return v;
}

template <typename T>
TensorMap Model<T>::to_tensor_map() const {
  TensorMap m;
  for (const auto& v : views())
    m[v.name] = std::vector<float>(v.tensor->begin() + v.offset, v.tensor->begin() + v.offset + v.count);
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
