// The complete model on CUDA (model_device.h): orchestration of the stages' CUDA entry points.
#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"
#include "05_mtp/residual_add.cuh"
#include "06_full_model/model_device.h"

#include <fmt/format.h>

#include <map>
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
  std::vector<int> in, tg;
  split_windows(tokens, B, Tn, in, tg);
  const int L = cfg_.num_hidden_layers;
  if (B != B_ || Tn != T_) {  // (re)allocate what the forward saves; reused while the shape stays
    B_ = B;
    T_ = Tn;
    window_ = DeviceBuffer<int>(tokens.size());
    inputs_ = DeviceBuffer<int>(in.size());
    targets_ = DeviceBuffer<int>(tg.size());
    h_.clear();
    saved_.clear();
    bal_f_.clear();
    bal_ssum_.clear();
    mtp_saved_.reset();
    for (int l = 0; l <= L; ++l) h_.emplace_back(size_t(N) * D);
    for (int l = 0; l < L; ++l) saved_.emplace_back(host_.block_config(l), B, Tn);
    for (int l = 0; l < L + int(mtp_.size()); ++l) {  // L + k: MTP module k's block
      const bool bal = host_.has_balance_loss(l);
      bal_f_.emplace_back(bal ? size_t(B) * E : 0);
      bal_ssum_.emplace_back(bal ? size_t(N) : 0);
    }
    bal_loss_ = DeviceBuffer<float>(bal_f_.size());
    z_ = DeviceBuffer<float>(size_t(N) * D);
    zrstd_ = DeviceBuffer<float>(N);
    logits_ = DeviceBuffer<float>(size_t(N) * V);
    probs_ = DeviceBuffer<float>(size_t(N) * V);
    if (!mtp_.empty()) mtp_saved_.emplace(host_.mtp_config(), B, Tn);
  }
  window_.upload(tokens);
  inputs_.upload(in);
  targets_.upload(tg);
  const MlaRope<float> rope = rope_.view();
  losses_ = ModelLosses{};
  // 1) embedding and blocks; balance loss per MoE layer (summed on the host after one download)
  if (timing_) marks_.clear();
  mark("start");
  cuda::embedding_forward(h_[0].get(), inputs_.get(), embed_.get(), N, D, V);
  mark("embedding fwd");
  bal_loss_.zero();
  for (int l = 0; l < L; ++l) {
    const BlockConfig bc = host_.block_config(l);
    cuda::block_forward(h_[l + 1].get(), saved_[l].saved, h_[l].get(), layers_[l].weights(), bc, B, Tn, 0, rope);
    balance_forward(l, saved_[l].saved.moe);
    mark(fmt::format("layer {} ({}) fwd", l, bc.ffn == FfnKind::Moe ? "moe" : "dense"));
  }
  // 2) final norm, head, cross-entropy
  cuda::rmsnorm_forward(z_.get(), zrstd_.get(), h_.back().get(), norm_.get(), N, D, float(cfg_.rms_norm_eps));
  cuda::gemm(Op::N, Op::T, N, V, D, 1.f, z_.get(), head_.get(), 0.f, logits_.get());
  losses_.ce = cuda::cross_entropy_forward(probs_.get(), logits_.get(), targets_.get(), N, V);
  mark("head + CE fwd");
  // 3) MTP on z = norm(h_L), what the head reads; the balance loss of each module's MoE block
  if (!mtp_.empty()) {
    const MtpConfig mc = host_.mtp_config();
    std::vector<float> ce(mc.depth);
    std::vector<MtpModuleWeights<float>> mw;
    for (auto& m : mtp_) mw.push_back(m.weights());
    losses_.mtp = cuda::mtp_forward(ce.data(), mtp_saved_->saved.data(), z_.get(), window_.get(),
                                    {embed_.get(), norm_.get(), head_.get()}, mw.data(), mc, B, Tn, rope);
    for (int k = 0; k < mc.depth; ++k) balance_forward(L + k, mtp_saved_->saved[k].block.moe);
    mtp_ce_ = ce;
    mark("MTP fwd");
  }
  for (float b : bal_loss_.download()) losses_.balance += b;
  return float(losses_.total());
}

void DeviceModel::backward() {
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * T_, E = cfg_.n_routed_experts;
  const int L = cfg_.num_hidden_layers;
  const MlaRope<float> rope = rope_.view();
  // zero every gradient in place
  pair_tensors(host_, [](const std::vector<float>*, DeviceBuffer<float>*, DeviceBuffer<float>* g) { g->zero(); });
  mark("zero grads");
  ScratchBuffer<float> dh_buf(size_t(N) * D), tmp_buf(size_t(N) * D), dz_buf(size_t(N) * D),
      dz_mtp_buf(size_t(N) * D), dlogits_buf(size_t(N) * V);
  float *dh = dh_buf.get(), *tmp = tmp_buf.get(), *dz = dz_buf.get(), *dlogits = dlogits_buf.get();
  // 3) MTP (with its blocks' balance-loss gradients): gradient into z and the shared embedding, norm, head
  if (!mtp_.empty()) {
    std::vector<MtpModuleWeights<float>> mw;
    std::vector<MtpModuleGrads<float>> mg;
    ScratchBuffer<float> dscores(size_t(N) * E * mtp_.size());
    std::vector<const float*> extra(mtp_.size(), nullptr);
    for (size_t k = 0; k < mtp_.size(); ++k) {
      mw.push_back(mtp_[k].weights());
      mg.push_back(dmtp_[k].grads());
      float* ds = dscores.get() + k * size_t(N) * E;
      if (balance_backward(ds, L + int(k), mtp_saved_->saved[k].block.moe)) extra[k] = ds;
    }
    cuda::mtp_backward(mg.data(), {dembed_.get(), dnorm_.get(), dhead_.get()}, dz_mtp_buf.get(), 1.f, extra.data(),
                       mtp_saved_->saved.data(), z_.get(), window_.get(), {embed_.get(), norm_.get(), head_.get()},
                       mw.data(), host_.mtp_config(), B_, T_, rope);
    mark("MTP bwd");
  }
  // 2) cross-entropy, head; the MTP gradient joins at z; final norm
  cuda::cross_entropy_backward(dlogits, 1.f, probs_.get(), targets_.get(), N, V);
  cuda::gemm(Op::T, Op::N, V, D, N, 1.f, dlogits, z_.get(), 1.f, dhead_.get());
  cuda::gemm(Op::N, Op::N, N, D, V, 1.f, dlogits, head_.get(), 0.f, dz);
  if (!mtp_.empty()) cuda::add_inplace(dz, dz_mtp_buf.get(), size_t(N) * D);  // 05_mtp/residual_add.cuh
  cuda::rmsnorm_backward(dnorm_.get(), dh, dz, zrstd_.get(), h_.back().get(), norm_.get(), N, D);
  mark("head + CE bwd");
  // 1) blocks in reverse, then the embedding
  ScratchBuffer<float> dscores(size_t(N) * E);
  for (int l = L - 1; l >= 0; --l) {
    const BlockConfig bc = host_.block_config(l);
    const float* extra = balance_backward(dscores.get(), l, saved_[l].saved.moe) ? dscores.get() : nullptr;
    cuda::block_backward(dlayers_[l].grads(), tmp, dh, extra, saved_[l].saved, h_[l].get(),
                         layers_[l].weights(), bc, B_, T_, 0, rope);
    std::swap(dh, tmp);
    mark(fmt::format("layer {} ({}) bwd", l, bc.ffn == FfnKind::Moe ? "moe" : "dense"));
  }
  cuda::embedding_backward(dembed_.get(), dh, inputs_.get(), N, D, V);
  mark("embedding bwd");
}

void DeviceModel::balance_forward(int layer, const MoeSaved<float>& moe) {
  if (!bal_f_[size_t(layer)].size()) return;
  cuda::seq_balance_loss_forward(bal_loss_.get() + layer, bal_f_[size_t(layer)].get(), bal_ssum_[size_t(layer)].get(),
                                 moe.scores, moe.indices, B_, T_, cfg_.n_routed_experts, cfg_.num_experts_per_tok,
                                 float(cfg_.training.aux_alpha));
}

bool DeviceModel::balance_backward(float* dscores, int layer, const MoeSaved<float>& moe) const {
  if (!bal_f_[size_t(layer)].size()) return false;
  cuda::seq_balance_loss_backward(dscores, 1.f, bal_f_[size_t(layer)].get(), bal_ssum_[size_t(layer)].get(),
                                  moe.scores, B_, T_, cfg_.n_routed_experts, float(cfg_.training.aux_alpha));
  return true;
}

void DeviceModel::update_bias() {
  const float gamma = float(cfg_.training.bias_update_speed);
  if (gamma <= 0) return;
  // every MoE layer, the MTP modules' blocks included (paper §2.1.2: the bias of every routed expert)
  const int L = cfg_.num_hidden_layers;
  for (int l = 0; l < L + int(mtp_.size()); ++l) {
    if (!cfg_.is_moe_layer(l)) continue;
    MoeDeviceParams& p = l < L ? layers_[size_t(l)].moe : mtp_[size_t(l - L)].block.moe;
    cuda::bias_update(p.ptr(1), moe_saved(l).counts, cfg_.n_routed_experts, B_ * T_, cfg_.num_experts_per_tok,
                      gamma);
  }
}

const MoeSaved<float>& DeviceModel::moe_saved(int layer) const {
  const int L = cfg_.num_hidden_layers;
  require(B_ > 0, "model: no forward has run yet");
  return layer < L ? saved_.at(size_t(layer)).saved.moe : mtp_saved_->saved.at(size_t(layer - L)).block.moe;
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

void DeviceModel::mark(const std::string& phase) {
  if (!timing_) return;
  cudaEvent_t e;
  CUDA_CHECK(cudaEventCreate(&e));
  CUDA_CHECK(cudaEventRecord(e, nullptr));
  marks_.emplace_back(phase, std::shared_ptr<CUevent_st>(e, [](cudaEvent_t x) { cudaEventDestroy(x); }));
}

std::vector<std::pair<std::string, float>> DeviceModel::phase_times() const {
  std::vector<std::pair<std::string, float>> out;
  if (marks_.empty()) return out;
  CUDA_CHECK(cudaEventSynchronize(marks_.back().second.get()));
  for (size_t i = 1; i < marks_.size(); ++i) {
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, marks_[i - 1].second.get(), marks_[i].second.get()));
    out.emplace_back(marks_[i].first, ms);
  }
  return out;
}

template <typename F>
void DeviceModel::pair_tensors(const Model<float>& host, F&& f) {
  f(&host.embed_, &embed_, &dembed_);
  f(&host.norm_, &norm_, &dnorm_);
  f(&host.head_, &head_, &dhead_);
  auto block = [&f](const BlockParams<float>& h, BlockDeviceParams& v, BlockDeviceParams& g) {
    f(&h.attn_norm, &v.attn_norm, &g.attn_norm);
    f(&h.ffn_norm, &v.ffn_norm, &g.ffn_norm);
    const std::vector<float>* mla[] = {&h.attn.wq_a, &h.attn.q_norm, &h.attn.wq_b, &h.attn.wq,
                                       &h.attn.wkv_a, &h.attn.kv_norm, &h.attn.wkv_b, &h.attn.wo};  // MlaDeviceParams order
    for (int i = 0; i < 8; ++i) f(mla[i], &v.attn.bufs[i], &g.attn.bufs[i]);
    f(&h.mlp.w1, &v.w1, &g.w1);
    f(&h.mlp.w2, &v.w2, &g.w2);
    f(&h.mlp.w3, &v.w3, &g.w3);
    const std::vector<float>* moe[] = {&h.moe.gate_weight, &h.moe.gate_bias, &h.moe.w1,        &h.moe.w2,
                                       &h.moe.w3,          &h.moe.shared_w1, &h.moe.shared_w2, &h.moe.shared_w3};
    for (int i = 0; i < 8; ++i) f(moe[i], &v.moe.bufs[i], &g.moe.bufs[i]);  // MoeDeviceParams order
  };
  for (size_t l = 0; l < layers_.size(); ++l) block(host.layers_[l], layers_[l], dlayers_[l]);
  for (size_t k = 0; k < mtp_.size(); ++k) {
    f(&host.mtp_[k].enorm, &mtp_[k].enorm, &dmtp_[k].enorm);
    f(&host.mtp_[k].hnorm, &mtp_[k].hnorm, &dmtp_[k].hnorm);
    f(&host.mtp_[k].eh_proj, &mtp_[k].eh_proj, &dmtp_[k].eh_proj);
    block(host.mtp_[k].block, mtp_[k].block, dmtp_[k].block);
  }
}

std::vector<DeviceModel::Slot> DeviceModel::slots(Model<float>& host) {
  require(&host == &host_, "DeviceModel::slots: not the host model this one was built from");
  std::map<const std::vector<float>*, std::pair<DeviceBuffer<float>*, DeviceBuffer<float>*>> dev;
  pair_tensors(host_, [&dev](const std::vector<float>* h, DeviceBuffer<float>* v, DeviceBuffer<float>* g) {
    dev[h] = {v, g};
  });
  std::vector<Slot> out;
  for (const auto& t : host.tensors()) {
    const auto it = dev.find(t.value);
    require(it != dev.end() && it->second.first->size() == t.value->size(),
            "DeviceModel::slots: no device buffer for tensor {}", t.name);
    out.push_back({t.name, it->second.first->get(), it->second.second->get(), t.value->size()});
  }
  return out;
}

void DeviceModel::upload(const Model<float>& host) {
  require(&host == &host_, "DeviceModel::upload: not the host model this one was built from");
  pair_tensors(host_, [](const std::vector<float>* h, DeviceBuffer<float>* v, DeviceBuffer<float>*) {
    v->upload(*h);
  });
}

std::vector<int> DeviceModel::expert_counts(int layer) const {
  if (layer < 0 || layer >= cfg_.num_hidden_layers + int(mtp_.size()) || !cfg_.is_moe_layer(layer) || B_ == 0)
    return {};
  std::vector<int> counts(cfg_.n_routed_experts);  // only the E counts, not the layer's whole int buffer
  CUDA_CHECK(cudaMemcpy(counts.data(), moe_saved(layer).counts, counts.size() * sizeof(int), cudaMemcpyDeviceToHost));
  return counts;
}

std::vector<int> DeviceModel::routing(int layer) const {
  const auto ints = saved_[layer].i.download();
  const int NK = B_ * T_ * cfg_.num_experts_per_tok;
  const size_t off = size_t(saved_[layer].saved.moe.indices - saved_[layer].i.get());  // its place in the layout
  return std::vector<int>(ints.begin() + off, ints.begin() + off + NK);
}

}  // namespace dsv3
