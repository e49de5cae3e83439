// Stage 07's benchmark: training steps of a preset on random tokens, timed, with the FLOP count per token that
// turns tokens/s into model FLOPs utilisation (MFU). The formula (README "Speed"):
//   FLOPs/token = 6 * P_active + 3 * (L + depth) * H * T * (Dn + Dr + Dv)
// P_active counts every weight a token is multiplied by in the forward: each layer's MLA projections, its dense
// FFN or (router + shared experts + K routed experts), the head, and per MTP module its eh_proj, block and the
// shared head again; not the embedding (a lookup) or the norms. 6 = 2 (multiply-add) x 3 (forward, the two
// backward products). The second term is causal attention: QK^T and PV cost 2*H*(i+1)*(Dqk + Dv) at position i,
// T/2 on average, times 3 for forward + backward.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "07_train_gpu/backend.h"

namespace dsv3 {

struct BenchOptions {
  std::string preset = "small";
  int batch = 32, seq_len = 512;
  int warmup = 5, steps = 20;  // steps timed after the warm-up; the median is reported
  uint64_t seed = 1234;
  double peak_tflops = 989.0;  // H100 SXM dense bf16
  bool phases = false;         // also time each phase of forward and backward (adds events; runs without the graph)
  bool exchange_timing = false;  // expert parallel: also time its row exchanges and expert products (waits on the
                                 // device around each: the step is slower while on)
  bool cuda_graph = true;      // let the backend replay the step as a CUDA graph (--no-graph: the plain calls)
  std::string write_config;    // when set: write the preset's config.json there and run nothing
  std::string attention = "auto";      // the attention kernels (02_mla/mla.h MlaConfig::Attention)
  std::string bf16_gemm = "fast16bf";  // how bf16 cuBLAS products run (common/gemm.h Bf16Gemm): fast16bf or copies
};

struct BenchResult {
  std::string device, precision, preset;
  int batch = 0, seq_len = 0, steps = 0;
  int gpus = 1;        // data parallel ranks (--gpus); batch is each GPU's, tokens_per_s the group's, mfu per GPU
  double step_ms = 0;  // median
  bool cuda_graph = false;  // the steps were replays of one captured CUDA graph
  std::string bf16_gemm;    // BenchOptions::bf16_gemm of the run
  std::string attention;    // the attention kernels the run used: materialized or fused
  double tokens_per_s = 0, flops_per_token = 0, mfu = 0;
  double peak_mem_gib = 0;
  double params_total = 0, params_active = 0;
  double loss_first = 0, loss_last = 0;
  std::vector<std::pair<std::string, double>> phase_ms;  // median per phase (with BenchOptions::phases)
  // expert parallel, with BenchOptions::exchange_timing: per MoE layer and step (forward + backward), the four
  // all-to-alls and the experts' products between them, milliseconds; 0 otherwise
  double ep_exchange_ms = 0, ep_compute_ms = 0;
  std::string json() const;  // one line
};

double flops_per_token(const ModelConfig& c, int seq_len);
double active_matmul_params(const ModelConfig& c);

// Trains `backend` (built for the preset's config) on random tokens; every step is Backend::train_step (forward,
// backward, clipping at norm 1, AdamW at lr 1e-3, bias update), timed from the host call to the losses read back.
// Prints nothing.
BenchResult run_bench(Backend& backend, const BenchOptions& o);

}  // namespace dsv3
