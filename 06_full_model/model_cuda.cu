// The complete model on CUDA (model_device.h): orchestration of the stages' CUDA entry points.
#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "04_aux_loss/aux_loss.h"
#include "04_aux_loss/lm_parts.h"
#include "06_full_model/model_device.h"

#include <fmt/format.h>

#include <map>
#include "common/cuda_kernels.cuh"
#include "common/gemm.h"

namespace dsv3 {
DeviceModel::DeviceModel(const Model<float>& host, const DeviceOptions& opt)
    : host_(host), cfg_(host.cfg_), opt_(opt), rope_(host.rope_) {
  // a config this model cannot run fails here, naming the field, not in the first forward
  for (int l = 0; l <= cfg_.num_hidden_layers; ++l) block_config(l).validate();
  p_.layers.resize(host.p_.layers.size());
  p_.mtp.resize(host.p_.mtp.size());
  g_.layers.resize(host.p_.layers.size());
  g_.mtp.resize(host.p_.mtp.size());
  // values uploaded from the host model, gradients zero buffers of the same sizes, by the model's one list
  for_each_param(cfg_, [](const ParamInfo&, const std::vector<float>& h, DeviceBuffer<float>& v,
                          DeviceBuffer<float>& g) {
    v = DeviceBuffer<float>(h);
    g = DeviceBuffer<float>(h.size());
    g.zero();
  }, host.p_, p_, g_);
  // the views the entry points take, made once: the buffers never move
  for (size_t l = 0; l < p_.layers.size(); ++l) {
    layer_w_.push_back(p_.layers[l].weights());
    layer_g_.push_back(g_.layers[l].grads());
  }
  for (size_t k = 0; k < p_.mtp.size(); ++k) {
    mtp_w_.push_back(p_.mtp[k].weights());
    mtp_g_.push_back(g_.mtp[k].grads());
  }
  bad_ = DeviceBuffer<int>(1);
  ce_ = DeviceBuffer<float>(1 + p_.mtp.size());
}

void DeviceModel::set_expert_parallel(ExpertParallel* ep) {
  require(!ep || opt_.experts == MoeExperts::Grouped, "expert parallel runs on the grouped expert path (this model "
          "runs its experts on another: build it with DeviceOptions::experts = Grouped)");
  opt_.expert_parallel = ep;
}

BlockConfig DeviceModel::block_config(int layer) const {
  BlockConfig b = host_.block_config(layer);
  set_matmul(b, opt_.matmul, opt_.experts);
  b.attn.attention = opt_.attention;
  b.moe.expert_parallel = opt_.expert_parallel;
  return b;
}

MtpConfig DeviceModel::mtp_config() const {
  MtpConfig m = host_.mtp_config();
  m.matmul = opt_.matmul;
  set_matmul(m.block, opt_.matmul, opt_.experts);
  m.block.attn.attention = opt_.attention;
  m.block.moe.expert_parallel = opt_.expert_parallel;
  return m;
}

float DeviceModel::forward(const std::vector<int>& tokens, int B, int Tn) {
  stage(tokens, B, Tn);
  forward_on_device();
  return read_losses();
}

void DeviceModel::stage(const std::vector<int>& tokens, int B, int Tn) {
  require(B > 0 && Tn > 0 && tokens.size() == size_t(B) * (Tn + 1), "model: need B*(T+1) = {} tokens, got {}",
          size_t(B) * (Tn + 1), tokens.size());
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B * Tn;
  const int E = cfg_.n_routed_experts;
  // checked here, on the host, so that the device never has to report it in the middle of a step (the kernels
  // still flag a bad id into bad_, read with the losses)
  for (size_t i = 0; i < tokens.size(); ++i)
    require(tokens[i] >= 0 && tokens[i] < V, "token {} at position {} is outside the vocabulary [0, {})", tokens[i],
            i, V);
  std::vector<int> in, tg;
  split_windows(tokens, B, Tn, in, tg);
  const int L = cfg_.num_hidden_layers;
  if (B != B_ || Tn != seq_) {  // (re)allocate what the forward saves; reused while the shape stays
    B_ = B;
    seq_ = Tn;
    ++layout_;
    window_ = DeviceBuffer<int>(tokens.size());
    inputs_ = DeviceBuffer<int>(in.size());
    targets_ = DeviceBuffer<int>(tg.size());
    h_.clear();
    saved_.clear();
    bal_f_.clear();
    bal_ssum_.clear();
    mtp_saved_.reset();
    for (int l = 0; l <= L; ++l) h_.emplace_back(size_t(N) * D);
    for (int l = 0; l < L; ++l) saved_.emplace_back(block_config(l), B, Tn);
    for (int l = 0; l < L + int(p_.mtp.size()); ++l) {  // L + k: MTP module k's block
      const bool bal = host_.has_balance_loss(l);
      bal_f_.emplace_back(bal ? size_t(B) * E : 0);
      bal_ssum_.emplace_back(bal ? size_t(N) : 0);
    }
    bal_loss_ = DeviceBuffer<float>(bal_f_.size());
    z_ = DeviceBuffer<float>(size_t(N) * D);
    zrstd_ = DeviceBuffer<float>(N);
    logits_ = DeviceBuffer<float>(size_t(N) * V);
    probs_ = DeviceBuffer<float>(size_t(N) * V);
    if (!p_.mtp.empty()) mtp_saved_.emplace(mtp_config(), B, Tn);
  }
  window_.upload(tokens);
  inputs_.upload(in);
  targets_.upload(tg);
}

void DeviceModel::forward_on_device() {
  require(B_ > 0, "model: forward_on_device before stage");
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * seq_;
  const int L = cfg_.num_hidden_layers;
  const MlaRope<float> rope = rope_.view();
  // 1) embedding and blocks; balance loss per MoE layer into bal_loss_
  if (timing_) marks_.clear();
  mark("start");
  CUDA_CHECK(cudaMemsetAsync(bad_.get(), 0, bad_.bytes()));
  CUDA_CHECK(cudaMemsetAsync(bal_loss_.get(), 0, bal_loss_.bytes()));
  cuda::embedding_forward(h_[0].get(), inputs_.get(), p_.embed.get(), N, D, V, bad_.get());
  mark("embedding fwd");
  for (int l = 0; l < L; ++l) {
    const BlockConfig bc = block_config(l);
    cuda::block_forward(h_[l + 1].get(), saved_[l].saved, h_[l].get(), layer_w_[l], bc, B_, seq_, 0, rope);
    balance_forward(l, saved_[l].saved.moe);
    mark(fmt::format("layer {} ({}) fwd", l, bc.ffn == FfnKind::Moe ? "moe" : "dense"));
  }
  // 2) final norm, head, cross-entropy (its mean into ce_[0])
  cuda::rmsnorm_forward(z_.get(), zrstd_.get(), h_.back().get(), p_.norm.get(), N, D, float(cfg_.rms_norm_eps));
  cuda::gemm(Op::N, Op::T, N, V, D, 1.f, z_.get(), p_.head.get(), 0.f, logits_.get(), opt_.matmul);
  cuda::cross_entropy_forward(ce_.get(), probs_.get(), logits_.get(), targets_.get(), N, V, bad_.get());
  mark("head + CE fwd");
  // 3) MTP on z = norm(h_L), what the head reads (each depth's mean CE into ce_[k]); each module's balance loss
  if (!p_.mtp.empty()) {
    const MtpConfig mc = mtp_config();
    cuda::mtp_forward(ce_.get() + 1, bad_.get(), mtp_saved_->saved.data(), z_.get(), window_.get(),
                      {p_.embed.get(), p_.norm.get(), p_.head.get()}, mtp_w_.data(), mc, B_, seq_, rope);
    for (int k = 0; k < mc.depth; ++k) balance_forward(L + k, mtp_saved_->saved[k].block.moe);
    mark("MTP fwd");
  }
}

float DeviceModel::read_losses() {
  require(B_ > 0, "model: no forward has run yet");
  require(bad_.download()[0] == 0, "a token id is outside the vocabulary [0, {})", cfg_.vocab_size);
  const std::vector<float> ce = ce_.download();
  losses_ = ModelLosses{};
  losses_.ce = ce[0];
  if (!p_.mtp.empty()) {
    const MtpConfig mc = mtp_config();
    std::vector<float> depths(mc.depth);
    losses_.mtp = cuda::mtp_loss(depths.data(), ce.data() + 1, mc, seq_);
    mtp_ce_ = depths;
  }
  for (float b : bal_loss_.download()) losses_.balance += b;
  return float(losses_.total());
}

void DeviceModel::backward() {
  const int D = cfg_.hidden_size, V = cfg_.vocab_size, N = B_ * seq_, E = cfg_.n_routed_experts;
  const int L = cfg_.num_hidden_layers;
  const MlaRope<float> rope = rope_.view();
  // zero every gradient in place (stream-ordered: no host synchronisation)
  for_each_param(cfg_, [](const ParamInfo&, DeviceBuffer<float>& g) {
    CUDA_CHECK(cudaMemsetAsync(g.get(), 0, g.bytes()));
  }, g_);
  mark("zero grads");
  ScratchBuffer<float> dh_buf(size_t(N) * D), tmp_buf(size_t(N) * D), dz_buf(size_t(N) * D),
      dz_mtp_buf(size_t(N) * D), dlogits_buf(size_t(N) * V);
  float *dh = dh_buf.get(), *tmp = tmp_buf.get(), *dz = dz_buf.get(), *dlogits = dlogits_buf.get();
  // 3) MTP (with its blocks' balance-loss gradients): gradient into z and the shared embedding, norm, head
  if (!p_.mtp.empty()) {
    ScratchBuffer<float> dscores(size_t(N) * E * p_.mtp.size());
    std::vector<const float*> extra(p_.mtp.size(), nullptr);
    for (size_t k = 0; k < p_.mtp.size(); ++k) {
      float* ds = dscores.get() + k * size_t(N) * E;
      if (balance_backward(ds, L + int(k), mtp_saved_->saved[k].block.moe)) extra[k] = ds;
    }
    cuda::mtp_backward(mtp_g_.data(), {g_.embed.get(), g_.norm.get(), g_.head.get()}, dz_mtp_buf.get(), 1.f,
                       extra.data(), mtp_saved_->saved.data(), z_.get(), window_.get(),
                       {p_.embed.get(), p_.norm.get(), p_.head.get()}, mtp_w_.data(), mtp_config(), B_, seq_, rope);
    mark("MTP bwd");
  }
  // 2) cross-entropy, head; the MTP gradient joins at z; final norm
  cuda::cross_entropy_backward(dlogits, 1.f, probs_.get(), targets_.get(), N, V);
  cuda::gemm(Op::T, Op::N, V, D, N, 1.f, dlogits, z_.get(), 1.f, g_.head.get(), opt_.matmul);
  cuda::gemm(Op::N, Op::N, N, D, V, 1.f, dlogits, p_.head.get(), 0.f, dz, opt_.matmul);
  if (!p_.mtp.empty()) cuda::add_inplace(dz, dz_mtp_buf.get(), size_t(N) * D);  // common/cuda_kernels.cuh
  cuda::rmsnorm_backward(g_.norm.get(), dh, dz, zrstd_.get(), h_.back().get(), p_.norm.get(), N, D);
  mark("head + CE bwd");
  // 1) blocks in reverse, then the embedding
  ScratchBuffer<float> dscores(size_t(N) * E);
  for (int l = L - 1; l >= 0; --l) {
    const BlockConfig bc = block_config(l);
    const float* extra = balance_backward(dscores.get(), l, saved_[l].saved.moe) ? dscores.get() : nullptr;
    cuda::block_backward(layer_g_[l], tmp, dh, extra, saved_[l].saved, h_[l].get(), layer_w_[l], bc, B_, seq_, 0,
                         rope);
    std::swap(dh, tmp);
    mark(fmt::format("layer {} ({}) bwd", l, bc.ffn == FfnKind::Moe ? "moe" : "dense"));
  }
  cuda::embedding_backward(g_.embed.get(), dh, inputs_.get(), N, D, V);
  mark("embedding bwd");
}

void DeviceModel::balance_forward(int layer, const MoeSaved<float>& moe) {
  if (!bal_f_[size_t(layer)].size()) return;
  cuda::seq_balance_loss_forward(bal_loss_.get() + layer, bal_f_[size_t(layer)].get(), bal_ssum_[size_t(layer)].get(),
                                 moe.scores, moe.indices, B_, seq_, cfg_.n_routed_experts, cfg_.num_experts_per_tok,
                                 float(cfg_.training.aux_alpha));
}

bool DeviceModel::balance_backward(float* dscores, int layer, const MoeSaved<float>& moe) const {
  if (!bal_f_[size_t(layer)].size()) return false;
  cuda::seq_balance_loss_backward(dscores, 1.f, bal_f_[size_t(layer)].get(), bal_ssum_[size_t(layer)].get(),
                                  moe.scores, B_, seq_, cfg_.n_routed_experts, float(cfg_.training.aux_alpha));
  return true;
}

void DeviceModel::update_bias(const int* skip, int ranks) {
  const float gamma = float(cfg_.training.bias_update_speed);
  if (gamma <= 0) return;
  // every MoE layer, the MTP modules' blocks included (paper §2.1.2: the bias of every routed expert)
  const int L = cfg_.num_hidden_layers;
  for (int l = 0; l < L + int(p_.mtp.size()); ++l) {
    if (!cfg_.is_moe_layer(l)) continue;
    auto& moe = l < L ? p_.layers[size_t(l)].moe : p_.mtp[size_t(l - L)].block.moe;
    cuda::bias_update(moe.gate_bias.get(), moe_saved(l).counts, cfg_.n_routed_experts, B_ * seq_ * ranks,
                      cfg_.num_experts_per_tok, gamma, skip);
  }
}

const MoeSaved<float>& DeviceModel::moe_saved(int layer) const {
  const int L = cfg_.num_hidden_layers;
  require(B_ > 0, "model: no forward has run yet");
  return layer < L ? saved_.at(size_t(layer)).saved.moe : mtp_saved_->saved.at(size_t(layer - L)).block.moe;
}

void DeviceModel::download(Model<float>& host, bool values) const {
  for_each_param(cfg_, [](const ParamInfo&, std::vector<float>& h, const DeviceBuffer<float>& d) { h = d.download(); },
                 values ? host.p_ : host.g_, values ? p_ : g_);
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

std::vector<DeviceModel::Slot> DeviceModel::slots() {
  std::vector<Slot> out;  // the order of Model::tensors()
  for_each_param(cfg_, [&out](const ParamInfo& i, DeviceBuffer<float>& v, DeviceBuffer<float>& g) {
    if (i.has_grad() && v.size()) out.push_back({i.name, v.get(), g.get(), v.size(), i.decays()});
  }, p_, g_);
  return out;
}

void DeviceModel::upload(const Model<float>& host) {
  require(&host == &host_, "DeviceModel::upload: not the host model this one was built from");
  for_each_param(cfg_, [](const ParamInfo&, DeviceBuffer<float>& v, const std::vector<float>& h) { v.upload(h); },
                 p_, host.p_);
}

std::vector<int> DeviceModel::expert_counts(int layer) const {
  if (layer < 0 || layer >= cfg_.num_hidden_layers + int(p_.mtp.size()) || !cfg_.is_moe_layer(layer) || B_ == 0)
    return {};
  std::vector<int> counts(cfg_.n_routed_experts);  // only the E counts, not the layer's whole int buffer
  CUDA_CHECK(cudaMemcpy(counts.data(), moe_saved(layer).counts, counts.size() * sizeof(int), cudaMemcpyDeviceToHost));
  return counts;
}

int* DeviceModel::expert_counts_data(int layer) {
  if (layer < 0 || layer >= cfg_.num_hidden_layers + int(p_.mtp.size()) || !cfg_.is_moe_layer(layer) || B_ == 0)
    return nullptr;
  return moe_saved(layer).counts;
}

std::vector<int> DeviceModel::routing(int layer) const {
  const auto ints = saved_[layer].i.download();
  const int NK = B_ * seq_ * cfg_.num_experts_per_tok;
  const size_t off = size_t(saved_[layer].saved.moe.indices - saved_[layer].i.get());  // its place in the layout
  return std::vector<int>(ints.begin() + off, ints.begin() + off + NK);
}

}  // namespace dsv3
