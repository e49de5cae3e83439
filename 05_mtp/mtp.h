// Stage 05: Multi-Token Prediction (DeepSeek-V3 paper §2.2, eqs. 21-25), chained as DeepSeek's released
// weights lay it out (per module: enorm, hnorm, eh_proj, one transformer block; embedding, final norm and
// head shared with the main model).
//
// Token alignment. A training window of one sequence holds T+1 tokens t_0 .. t_T: the main model reads
// t_0 .. t_{T-1} and predicts t_{i+1} at position i (its targets are t_1 .. t_T). Module k (1..depth) at
// position i reads the previous depth's normalised output z^{k-1}_i (for k = 1 the main model's
// z^0 = final_norm(h_L), what its head reads: the engines that serve the released weights feed that, see the
// README) and the embedding of t_{i+k}, and predicts t_{i+k+1}:
//
//   h'^k_i  = eh_proj [ enorm(Emb(t_{i+k})) ; hnorm(z^{k-1}_i) ]      (embedding FIRST: released weights)
//   h^k     = Block_k(h'^k)                                           (causal over positions 0..T-1)
//   z^k     = final_norm(h^k);  P^k_i = softmax(head(z^k_i))           (the main model's norm and head)
//   CE_k    = -(1/T) sum over i in [0, T-k) of log P^k_i[t_{i+k+1}]    (T-k targets divided by T: paper eq. 24)
//   L_MTP   = (mtp_lambda / depth) * sum_k CE_k                        (eq. 25)
//
// Positions i >= T-k have no target (kIgnoreTarget); their embedding token is t_T for i+k > T (a pad: by
// causality nothing that reaches a loss depends on those positions, and their gradients are exactly 0).
//
// Shape legend
//   B batch, T time (positions per sequence; `seq` in code, where T is the scalar type), N = B*T rows,
//   D model width, V vocabulary,
//   Dm = depth (number of MTP modules, Hugging Face num_nextn_predict_layers).
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients
// overwrite (=); dsv3::cpu and dsv3::cuda functions have identical signatures (CUDA: device pointers,
// except the ce array and the per-module structs, which live on the host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "04_aux_loss/lm_parts.h"
#include "05_mtp/block.h"

namespace dsv3 {

struct MtpConfig {
  int depth = 1;             // Dm; 0 = no MTP (L_MTP = 0)
  int vocab = 64;            // V
  BlockConfig block;         // every module's block; block.dim() is D
  float mtp_lambda = 0.3f;   // paper: 0.3 for the first 10T training tokens, then 0.1
  float norm_eps = 1e-6f;    // enorm, hnorm and the shared final norm
  Matmul matmul = Matmul::FP32;  // the CUDA path's own products (eh_proj, head); the block has its own config

  int dim() const { return block.dim(); }
  void validate() const;     // UserError naming the bad field
};

// The main model's tensors that MTP shares (read; their gradients accumulate into MtpSharedGrads).
template <typename T>
struct MtpShared {
  const T* embed;  // (V, D) token embedding
  const T* norm;   // (D)    final norm
  const T* head;   // (V, D) output head
};
template <typename T>
struct MtpSharedGrads {
  T *embed, *norm, *head;
};

// One module's own parameters over a tensor storage X (common/param_list.h).
template <typename X>
struct MtpModuleTensors {
  using Config = MtpConfig;
  X enorm;    // (D)
  X hnorm;    // (D)
  X eh_proj;  // (D, 2D)  columns [0, D) act on enorm(Emb), [D, 2D) on hnorm(h)
  BlockTensors<X> block;

  auto weights() const { return param_list::weights(*this); }
  auto grads() { return param_list::grads(*this); }
  // (name, tensor), names as the released checkpoint's module: enorm, hnorm, eh_proj, block.attn.wq_a, ...
  auto tensors() { return param_list::named(*this); }
};
template <typename T>
using MtpModuleParams = MtpModuleTensors<std::vector<T>>;
template <typename T>
using MtpModuleWeights = MtpModuleTensors<const T*>;
template <typename T>
using MtpModuleGrads = MtpModuleTensors<T*>;  // accumulated (+=)

// The one list of a module's parameters; Hugging Face names under "model.layers.(L+k)." (the block's
// tensors sit directly under that prefix, beside enorm, hnorm and eh_proj).
template <typename F, typename... S>
void for_each_param(const MtpConfig& c, F&& f, S&&... s) {
  const int64_t D = c.dim();
  f(ParamInfo{"enorm", "enorm.weight", {D}, ParamKind::Norm, ""}, s.enorm...);
  f(ParamInfo{"hnorm", "hnorm.weight", {D}, ParamKind::Norm, ""}, s.hnorm...);
  f(ParamInfo{"eh_proj", "eh_proj.weight", {D, 2 * D}, ParamKind::Matrix, ""}, s.eh_proj...);
  for_each_param(c.block, prefixed("block.", "", f), s.block...);
}

template <typename T>
MtpModuleParams<T> mtp_zero_params(const MtpConfig& c) { return param_list::zeroed<MtpModuleTensors, T>(c); }
// eh_proj ~ N(0, 1/(2D)), norms 1 (or jittered, tests), the block as block_init_params.
template <typename T>
MtpModuleParams<T> mtp_init_params(const MtpConfig& c, uint64_t seed, bool jitter_norms = false) {
  return param_list::initialised<MtpModuleTensors, T>(c, seed, jitter_norms);
}

// What the forward saves for one module: pointers into one scalar and one int buffer (host for cpu::,
// device for cuda::) of mtp_saved_size() / mtp_saved_int_size() elements for ALL modules, carved by
// mtp_saved_layout() into depth of these.
template <typename T>
struct MtpSaved {
  int* tokens;   // (N)     t_{i+k} (pad t_T where i+k > T)
  int* targets;  // (N)     t_{i+k+1}, or kIgnoreTarget where i+k+1 > T
  T* e;          // (N, D)  Emb(t_{i+k})
  T* en;         // (N, D)  enorm(e)
  T* en_rstd;    // (N)
  T* hn;         // (N, D)  hnorm(h^{k-1})
  T* hn_rstd;    // (N)
  T* hp;         // (N, D)  h' = eh_proj [en ; hn]: the block's input
  BlockSaved<T> block;
  T* hk;         // (N, D)  h^k: the block's output, the next module's input
  T* z;          // (N, D)  z^k = final_norm(h^k): the head's input and the next module's
  T* z_rstd;     // (N)
  T* probs;      // (N, V)  softmax of the logits
};
size_t mtp_saved_size(const MtpConfig& c, int B, int seq);
size_t mtp_saved_int_size(const MtpConfig& c, int B, int seq);
template <typename T>
std::vector<MtpSaved<T>> mtp_saved_layout(T* base, int* ibase, const MtpConfig& c, int B, int seq);

template <typename T>
struct MtpHostSaved {
  std::vector<T> f;
  std::vector<int> i;
  std::vector<MtpSaved<T>> saved;
  MtpHostSaved(const MtpConfig& c, int B, int seq)
      : f(mtp_saved_size(c, B, seq)), i(mtp_saved_int_size(c, B, seq)),
        saved(mtp_saved_layout(f.data(), i.data(), c, B, seq)) {}
  MtpHostSaved(const MtpHostSaved&) = delete;
  MtpHostSaved& operator=(const MtpHostSaved&) = delete;
  MtpHostSaved(MtpHostSaved&&) = default;
};

// Shape/config checks shared by the CPU and CUDA entry points.
void validate_mtp_call(const MtpConfig& c, int B, int seq, int table_positions);

namespace cpu {

// Runs the chain of c.depth modules on the main model's normalised final hidden state h0 = final_norm(h_L)
// (B, T, D) and the window tokens (B, T+1). ce (depth, HOST) = CE_k of each module (eq. 24). Returns
// L_MTP = mtp_lambda/depth * sum_k CE_k (0 when depth = 0). modules: depth structs (host array). Fills saved
// (depth entries).
template <typename T>
T mtp_forward(T* ce, const MtpSaved<T>* saved, const T* h0, const int* tokens, const MtpShared<T>& shared,
              const MtpModuleWeights<T>* modules, const MtpConfig& c, int B, int seq, const MlaRope<T>& rope);
// Gradients of dloss * L_MTP: module and shared parameter gradients += ..., dh0 (B, T, D) = d / d h0.
// dscores_extra: nullptr, or depth pointers (each nullptr or (N, E)): a gradient on module k's router scores
// that its MoE block adds (stage 04's sequence-wise balance loss, as block_backward takes it).
template <typename T>
void mtp_backward(const MtpModuleGrads<T>* module_grads, const MtpSharedGrads<T>& shared_grads, T* dh0,
                  NoDeduce<T> dloss, const NoDeduce<T>* const* dscores_extra, const MtpSaved<T>* saved, const T* h0,
                  const int* tokens, const MtpShared<T>& shared, const MtpModuleWeights<T>* modules,
                  const MtpConfig& c, int B, int seq, const MlaRope<T>& rope);

}  // namespace cpu

namespace cuda {

float mtp_forward(float* ce, const MtpSaved<float>* saved, const float* h0, const int* tokens,
                  const MtpShared<float>& shared, const MtpModuleWeights<float>* modules, const MtpConfig& c, int B,
                  int seq, const MlaRope<float>& rope);
// The same without a host synchronisation (a CUDA graph can capture it): mean_ce (depth floats, device) = each
// depth's mean cross-entropy over its targets, before eq. 24's (T-k)/T; an id outside the vocabulary sets *bad (a
// device int the caller zeroed). mtp_loss turns the means, read back, into ce and L_MTP as the form above returns.
void mtp_forward(float* mean_ce, int* bad, const MtpSaved<float>* saved, const float* h0, const int* tokens,
                 const MtpShared<float>& shared, const MtpModuleWeights<float>* modules, const MtpConfig& c, int B,
                 int seq, const MlaRope<float>& rope);
float mtp_loss(float* ce, const float* mean_ce, const MtpConfig& c, int seq);
void mtp_backward(const MtpModuleGrads<float>* module_grads, const MtpSharedGrads<float>& shared_grads, float* dh0,
                  float dloss, const float* const* dscores_extra, const MtpSaved<float>* saved, const float* h0,
                  const int* tokens, const MtpShared<float>& shared, const MtpModuleWeights<float>* modules,
                  const MtpConfig& c, int B, int seq, const MlaRope<float>& rope);

}  // namespace cuda
}  // namespace dsv3
