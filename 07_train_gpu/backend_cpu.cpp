// Stage 07's CPU backend (backend.h): stage 06's Model<float>, the reference the CUDA backend is checked against.
// AdamW is cpu::adamw_step (stage 04) once per tensor of Model::tensors(), with its own two moment buffers; the
// gradients are multiplied by grad_scale (the clipping factor) on a scratch copy, so the model's gradients keep
// their meaning. Also here: Backend::train_step's composition of those calls, the precision names and options,
// and the make_cuda_backend of a build without CUDA.
#include <fmt/format.h>

#include <cmath>
#include <optional>

#include "07_train_gpu/backend.h"
#include "common/errors.h"

namespace dsv3 {

float clip_scale(double grad_clip, double grad_norm) {
  return grad_clip > 0 && grad_norm > grad_clip ? float(grad_clip / grad_norm) : 1.f;
}

Backend::StepResult Backend::train_step(const std::vector<int>& tokens, int B, int T, const StepPlan& plan) {
  StepResult r;
  r.losses = forward_backward(tokens, B, T);
  if (comm_) r.losses = all_reduce(*comm_);
  r.grad_norm = grad_norm();
  r.skipped = !(std::isfinite(r.losses.total()) && std::isfinite(r.grad_norm));
  if (!r.skipped) step(plan.opt, clip_scale(plan.grad_clip, r.grad_norm), plan.update);
  return r;
}

std::string precision_name(Precision p) { return p == Precision::BF16 ? "bf16" : "fp32"; }

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "bf16") return Precision::BF16;
  throw UserError(fmt::format("unknown precision '{}': use fp32 or bf16", s));
}

DeviceOptions device_options(Precision p, const ModelConfig& c) {
  DeviceOptions o;
  if (p == Precision::FP32) return o;
  o.matmul = Matmul::BF16;
  MoeConfig m = c.moe();
  m.matmul = o.matmul;
  o.experts = !segmented_experts_fit(m) ? MoeExperts::Grouped
              : hopper_experts_available() ? MoeExperts::Hopper
                                           : MoeExperts::Segmented;
  return o;
}

std::string moe_experts_name(MoeExperts e) {
  return e == MoeExperts::Hopper ? "hopper" : e == MoeExperts::Segmented ? "segmented" : "grouped";
}

MoeExperts parse_moe_experts(const std::string& s) {
  if (s == "grouped") return MoeExperts::Grouped;
  if (s == "segmented") return MoeExperts::Segmented;
  if (s == "hopper") return MoeExperts::Hopper;
  throw UserError(fmt::format("unknown expert path '{}': use grouped, segmented or hopper", s));
}

std::unique_ptr<Backend> make_cuda_backend(const ModelConfig& c, uint64_t seed, Precision p) {
  return make_cuda_backend(c, seed, device_options(p, c));
}

namespace {

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& c, uint64_t seed) : model_(c, seed) {
    for (const auto& t : model_.tensors()) {
      names_.push_back(t.name);
      exp_avg_.emplace_back(t.value->size(), 0.f);
      exp_avg_sq_.emplace_back(t.value->size(), 0.f);
    }
  }

  std::string describe() const override { return "cpu fp32"; }
  void set_communicator(Communicator* c, bool expert_parallel) override {
    require(!c || !c->on_device(), "the CPU backend's buffers are on the host: {} reduces device buffers",
            c ? c->describe() : "");
    Backend::set_communicator(c, expert_parallel);
    model_.set_expert_parallel(nullptr);
    ep_.reset();
    if (!expert_parallel) return;
    ep_ = std::make_unique<ExpertParallel>(*c);
    model_.set_expert_parallel(ep_.get());
  }
  const ModelConfig& config() const override { return model_.config(); }

  ModelLosses forward_backward(const std::vector<int>& tokens, int B, int T) override {
    model_.forward(tokens, B, T);
    model_.backward();
    group_.reset();
    return model_.losses();
  }
  ModelLosses evaluate(const std::vector<int>& tokens, int B, int T) override {
    model_.forward(tokens, B, T);
    group_.reset();
    return model_.losses();
  }
  std::vector<double> mtp_losses() const override {
    if (group_) return group_->mtp;
    const auto& ce = model_.mtp_losses();
    return std::vector<double>(ce.begin(), ce.end());
  }

  // The gradients as the host group's mean (a sum in rank order, times 1/size), the counts summed, the loss parts
  // and MTP losses averaged in double.
  ModelLosses all_reduce(Communicator& c) override {
    require(!c.on_device(), "the CPU backend's buffers are on the host: {} reduces device buffers", c.describe());
    for (const auto& t : model_.tensors()) c.all_reduce_mean(t.grad->data(), t.grad->size());
    const ModelConfig& mc = model_.config();
    for (int l = 0; l < mc.num_hidden_layers + mc.num_nextn_predict_layers; ++l)
      if (int* counts = model_.expert_counts_data(l)) c.all_reduce_sum(counts, size_t(mc.n_routed_experts));
    const ModelLosses& own = model_.losses();
    std::vector<double> v = {own.ce, own.mtp, own.balance};
    for (float x : model_.mtp_losses()) v.push_back(x);
    c.all_reduce_host(v.data(), v.size());
    for (double& x : v) x /= c.size();
    Group g;
    g.losses.ce = v[0];
    g.losses.mtp = v[1];
    g.losses.balance = v[2];
    g.mtp.assign(v.begin() + 3, v.end());
    g.ranks = c.size();
    group_ = g;
    return g.losses;
  }
  std::vector<std::vector<int>> expert_counts() const override {
    const ModelConfig& c = model_.config();
    std::vector<std::vector<int>> out;
    for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l) out.push_back(model_.expert_counts(l));
    return out;
  }

  double grad_norm() override {
    double sum = 0;
    for (const auto& t : model_.tensors())
      for (float g : *t.grad) sum += double(g) * double(g);
    return std::sqrt(sum);
  }

  void step(const AdamWConfig& opt, float grad_scale, int64_t step) override {
    auto tensors = model_.tensors();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const std::vector<float>& grad = *tensors[i].grad;
      const float* g = grad.data();
      if (grad_scale != 1.f) {  // the clipped gradient, on a copy (g * scale, as the CUDA kernel computes it)
        scaled_.resize(grad.size());
        for (size_t j = 0; j < grad.size(); ++j) scaled_[j] = grad[j] * grad_scale;
        g = scaled_.data();
      }
      cpu::adamw_step(tensors[i].value->data(), g, exp_avg_[i].data(), exp_avg_sq_[i].data(), grad.size(), step, opt,
                      decays(tensors[i].kind));
    }
    model_.update_bias(group_ ? group_->ranks : 1);
  }

  TensorMap weights() const override { return model_.to_tensor_map(); }
  TensorMap gradients() const override { return model_.gradient_tensor_map(); }
  void load_weights(const TensorMap& m) override { model_.load_tensor_map(m); }

  TensorMap optimizer_state() const override {
    TensorMap out;
    for (size_t i = 0; i < names_.size(); ++i) {
      out[names_[i] + ".exp_avg"] = exp_avg_[i];
      out[names_[i] + ".exp_avg_sq"] = exp_avg_sq_[i];
    }
    return out;
  }
  // Checks every tensor before replacing any, so a bad map leaves the moments as they were.
  void load_optimizer_state(const TensorMap& m) override {
    const auto tensors = model_.tensors();
    std::vector<const std::vector<float>*> src;
    for (const auto& t : tensors)
      for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
        const std::string name = t.name + suffix;
        const auto it = m.find(name);
        if (it == m.end()) throw UserError(fmt::format("optimizer state: tensor {} is missing", name));
        if (it->second.size() != t.value->size())
          throw UserError(fmt::format("optimizer state: tensor {} has {} values, the model needs {}", name,
                                      it->second.size(), t.value->size()));
        src.push_back(&it->second);
      }
    for (size_t i = 0; i < tensors.size(); ++i) {
      exp_avg_[i] = *src[2 * i];
      exp_avg_sq_[i] = *src[2 * i + 1];
    }
  }

 private:
  Model<float> model_;
  std::vector<std::string> names_;                         // Model::tensors() names, in its order
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;  // per tensor of Model::tensors(), same order
  std::vector<float> scaled_;                             // scratch: gradient * grad_scale
  struct Group {  // the last all_reduce's results (until the next forward)
    ModelLosses losses;
    std::vector<double> mtp;
    int ranks = 1;
  };
  std::optional<Group> group_;
  std::unique_ptr<ExpertParallel> ep_;  // set_communicator(c, true)
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& c, uint64_t seed) {
  return std::make_unique<CpuBackend>(c, seed);
}

#ifndef DSV3_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(const ModelConfig&, uint64_t, const DeviceOptions&) {
  throw UserError("this build has no CUDA (nvcc was not found at configure time, or DSV3_CUDA=OFF): "
                  "train with the cpu backend, or rebuild on a machine with the CUDA toolkit");
}
#endif

}  // namespace dsv3
