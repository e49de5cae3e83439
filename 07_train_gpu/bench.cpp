// Stage 07's benchmark (bench.h).
#include "07_train_gpu/bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "common/errors.h"
#include "common/rng.h"

namespace dsv3 {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

double attn_params(const ModelConfig& c) {
  const double D = c.hidden_size, H = c.num_attention_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  const double Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const double q = Dq > 0 ? D * Dq + Dq * H * (Dn + Dr) : D * H * (Dn + Dr);
  return q + D * (Dc + Dr) + Dc * H * (Dn + Dv) + H * Dv * D;
}

double ffn_params(const ModelConfig& c, bool moe) {
  const double D = c.hidden_size;
  if (!moe) return 3 * D * c.intermediate_size;
  return double(c.n_routed_experts) * D + double(c.num_experts_per_tok + c.n_shared_experts) * 3 * D *
                                              c.moe_intermediate_size;
}

}  // namespace

double active_matmul_params(const ModelConfig& c) {
  const double D = c.hidden_size, V = c.vocab_size;
  double p = V * D;  // head
  for (int l = 0; l < c.num_hidden_layers; ++l) p += attn_params(c) + ffn_params(c, c.is_moe_layer(l));
  const bool mtp_moe = c.is_moe_layer(c.num_hidden_layers);  // the MTP block is layer index L
  p += c.num_nextn_predict_layers * (2 * D * D + attn_params(c) + ffn_params(c, mtp_moe) + V * D);
  return p;
}

double flops_per_token(const ModelConfig& c, int seq_len) {
  const double attn = 3.0 * (c.num_hidden_layers + c.num_nextn_predict_layers) * c.num_attention_heads *
                      double(seq_len) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim);
  return 6.0 * active_matmul_params(c) + attn;
}

std::string BenchResult::json() const {
  return fmt::format(
      "{{\"bench\": \"07_train_gpu\", \"device\": \"{}\", \"precision\": \"{}\", \"preset\": \"{}\", \"gpus\": {}, \"batch\": {}, "
      "\"seq_len\": {}, \"steps\": {}, \"cuda_graph\": {}, \"bf16_gemm\": \"{}\", \"attention\": \"{}\", \"tokens_per_s\": {:.0f}, "
      "\"step_ms\": {:.3f}, "
      "\"flops_per_token\": {:.4g}, \"mfu\": {:.4f}, \"peak_mem_gib\": {:.3f}, \"params_active\": {:.4g}, "
      "\"loss_first\": {:.4f}, \"loss_last\": {:.4f}, \"ep_exchange_ms\": {:.4f}, \"ep_compute_ms\": {:.4f}}}",
      device, precision, preset, gpus, batch, seq_len, steps, cuda_graph ? "true" : "false", bf16_gemm, attention, tokens_per_s, step_ms,
      flops_per_token, mfu, peak_mem_gib, params_active, loss_first, loss_last, ep_exchange_ms, ep_compute_ms);
}

BenchResult run_bench(Backend& backend, const BenchOptions& o) {
  require(o.batch > 0 && o.seq_len > 0 && o.steps > 0 && o.warmup >= 0, "bench: batch, seq_len, steps must be > 0");
  const ModelConfig& c = backend.config();
  require(o.seq_len <= c.max_position_embeddings, "bench: seq_len {} exceeds the model's {} positions", o.seq_len,
          c.max_position_embeddings);
  Rng rng(o.seed);
  Backend::StepPlan plan;
  plan.opt.lr = 1e-3f;
  plan.grad_clip = 1.0;
  std::vector<int> tokens(size_t(o.batch) * (o.seq_len + 1));
  std::vector<double> step_ms;
  std::vector<std::pair<std::string, std::vector<double>>> phases;
  backend.set_phase_timing(o.phases);
  backend.set_cuda_graph(o.cuda_graph && !o.phases);
  BenchResult r;
  using clock = std::chrono::steady_clock;
  for (int s = 1; s <= o.warmup + o.steps; ++s) {
    for (auto& t : tokens) t = int(rng.below(uint64_t(c.vocab_size)));
    plan.update = s;
    if (s == o.warmup + 1 && o.exchange_timing) backend.set_exchange_timing(true);  // starts the sums afresh
    backend.synchronize();
    const auto t0 = clock::now();
    const Backend::StepResult res = backend.train_step(tokens, o.batch, o.seq_len, plan);  // reads the losses back
    backend.synchronize();
    const auto t1 = clock::now();
    if (s == 1) r.loss_first = res.losses.total();
    r.loss_last = res.losses.total();
    if (s > o.warmup) {
      step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      const auto pt = backend.phase_times();
      if (phases.empty())
        for (const auto& p : pt) phases.push_back({p.first, {}});
      for (size_t i = 0; i < pt.size() && i < phases.size(); ++i) phases[i].second.push_back(pt[i].second);
    }
  }
  r.cuda_graph = backend.graph_captures() > 0;
  r.bf16_gemm = o.bf16_gemm;
  r.device = backend.describe();
  r.preset = o.preset;
  r.batch = o.batch;
  r.seq_len = o.seq_len;
  r.steps = o.steps;
  r.step_ms = median(step_ms);
  r.tokens_per_s = double(o.batch) * o.seq_len / (r.step_ms / 1e3);
  r.flops_per_token = flops_per_token(c, o.seq_len);
  r.mfu = r.flops_per_token * r.tokens_per_s / (o.peak_tflops * 1e12);
  r.peak_mem_gib = double(backend.memory().peak) / double(1ull << 30);
  r.params_active = active_matmul_params(c);
  for (const auto& p : phases) r.phase_ms.push_back({p.first, median(p.second)});
  if (o.exchange_timing) {
    const ExpertParallel::Times t = backend.exchange_times();
    if (t.forwards > 0) {
      r.ep_exchange_ms = t.exchange_ms / double(t.forwards);
      r.ep_compute_ms = t.compute_ms / double(t.forwards);
    }
    backend.set_exchange_timing(false);
  }
  backend.set_phase_timing(false);
  backend.set_cuda_graph(true);
  return r;
}

}  // namespace dsv3
