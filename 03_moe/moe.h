// Stage 03: DeepSeekMoE (DeepSeek-V3 paper §2.1.2, inference/model.py classes Gate, Expert, MoE).
// Shared experts applied to every token plus fine-grained routed experts; the router scores tokens with a
// sigmoid (softmax as in V2 for comparison), adds a per-expert bias ONLY to choose experts, limits each token
// to n_limited_groups expert groups, takes the top-K experts there and weights them by their UNBIASED
// scores, normalised to sum 1 (sigmoid) and times route_scale.
//
// Shape legend
//   N  tokens (B*T rows), D model width (dim), E routed experts (n_routed_experts),
//   K  experts per token (n_activated_experts), G expert groups (n_expert_groups), Lg kept groups
//   (n_limited_groups), F expert width (moe_inter_dim), Es shared experts, Fs = Es*F shared width,
//   NK = N*K token-expert pairs ("slots"; slot n*K+k is the k-th choice of token n).
// Dispatch order: the NK slots sorted by (expert, token), stable; expert e owns rows
//   [offsets[e], offsets[e+1]) of every per-slot activation, so its FFN is three GEMMs over one slice.
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients
// overwrite (=); dsv3::cpu and dsv3::cuda functions have identical signatures (CUDA: device pointers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/gemm.h"
#include "common/param_list.h"

namespace dsv3 {

enum class ScoreFunc { Sigmoid, Softmax };
class ExpertParallel;  // moe_expert_parallel.h

// How the CUDA path runs the routed experts' products (the CPU reference has one way):
//   Grouped:   cuBLAS grouped GEMMs over the experts' slices, any matmul precision; the host reads the
//              dispatch offsets back (one wait per layer and pass). The path checked against the CPU in fp32.
//   Segmented: the bf16 segmented GEMMs of common/gemm.h (moe_experts_bf16.cu), which read the offsets on the
//              device; needs matmul = BF16 and dim, moe_inter_dim multiples of 8 (MoeConfig::validate says so).
//   Hopper:    Segmented with the rows products on wgmma (moe_experts_hopper.cu, common/segment_gemm_hopper.cu);
//              the same needs, plus a compute capability 9.0 GPU and a build for sm_90a (hopper_experts_available).
enum class MoeExperts { Grouped, Segmented, Hopper };

// Named as DeepSeek-V3's ModelArgs; defaults are a small teaching size (V3: D 7168, F 2048, E 256, Es 1,
// K 8, G 8, Lg 4, route_scale 2.5, sigmoid).
struct MoeConfig {
  int dim = 64;
  int moe_inter_dim = 32;
  int n_routed_experts = 16;
  int n_shared_experts = 1;
  int n_activated_experts = 4;
  int n_expert_groups = 4;
  int n_limited_groups = 2;
  float route_scale = 1.0f;
  ScoreFunc score_func = ScoreFunc::Sigmoid;
  Matmul matmul = Matmul::FP32;             // the CUDA path's expert products (the router's stay fp32)
  MoeExperts experts = MoeExperts::Grouped;  // the CUDA path's routed-expert products (below)
  // Expert parallel (moe_expert_parallel.h): the group the routed experts are split across, and the layers' exchange
  // state; null: every expert runs here. CPU (fp32) and the CUDA Grouped path.
  ExpertParallel* expert_parallel = nullptr;

  int shared_inter_dim() const { return n_shared_experts * moe_inter_dim; }  // Fs
  int group_size() const { return n_routed_experts / n_expert_groups; }
  void validate() const;  // UserError naming the bad field
};

// Can this config run its routed experts as MoeExperts::Segmented (bf16, dim and moe_inter_dim multiples of 8)?
// Trainers choose the path with it when they build the config; validate() refuses Segmented otherwise.
bool segmented_experts_fit(const MoeConfig& c);
// Can this process run MoeExperts::Hopper (a CUDA build with sm_90a code, on a compute capability 9.0 GPU)?
bool hopper_experts_available();

// The most expert groups a token's routing keeps state for (a fixed array in the routing kernel).
inline constexpr int kMaxExpertGroups = 64;

// The MoE's parameters, PyTorch Linear layout (out_features, in_features), over a tensor storage X
// (common/param_list.h): MoeParams<T> on the host, MoeDeviceParams on the device, MoeWeights<T> / MoeGrads<T>
// for the entry points. A null gate_bias view means zeros. MoeGrads<T>::gate_bias is always null: the bias
// selects experts but has no gradient (stage 04 moves it).
template <typename X>
struct MoeTensors {
  using Config = MoeConfig;
  X gate_weight;  // (E, D)
  X gate_bias;    // (E)       selection only
  X w1;           // (E, F, D) routed experts, stacked
  X w2;           // (E, D, F)
  X w3;           // (E, F, D)
  X shared_w1;    // (Fs, D)   the shared experts as one SwiGLU MLP of width Es*F (model.py)
  X shared_w2;    // (D, Fs)
  X shared_w3;    // (Fs, D)

  auto weights() const { return param_list::weights(*this); }
  auto grads() { return param_list::grads(*this); }
  auto tensors() { return param_list::named(*this); }  // (name, tensor) of the used members with a gradient
};
template <typename T>
using MoeParams = MoeTensors<std::vector<T>>;
template <typename T>
using MoeWeights = MoeTensors<const T*>;
template <typename T>
using MoeGrads = MoeTensors<T*>;  // accumulated (+=)

// The one list of the MoE's parameters (common/param_list.h). Hugging Face stores one tensor per routed
// expert ("{e}"); ours are stacked over experts.
template <typename F, typename... S>
void for_each_param(const MoeConfig& c, F&& f, S&&... s) {
  const int64_t D = c.dim, F_ = c.moe_inter_dim, E = c.n_routed_experts, Fs = c.shared_inter_dim();
  const ParamKind M = ParamKind::Matrix;
  f(ParamInfo{"gate.weight", "mlp.gate.weight", {E, D}, M, ""}, s.gate_weight...);
  f(ParamInfo{"gate.bias", "mlp.gate.e_score_correction_bias", {E}, ParamKind::Bias, ""}, s.gate_bias...);
  f(ParamInfo{"experts.w1", "mlp.experts.{e}.gate_proj.weight", {E, F_, D}, M, ""}, s.w1...);
  f(ParamInfo{"experts.w2", "mlp.experts.{e}.down_proj.weight", {E, D, F_}, M, ""}, s.w2...);
  f(ParamInfo{"experts.w3", "mlp.experts.{e}.up_proj.weight", {E, F_, D}, M, ""}, s.w3...);
  f(ParamInfo{"shared.w1", "mlp.shared_experts.gate_proj.weight", {Fs, D}, M, ""}, s.shared_w1...);
  f(ParamInfo{"shared.w2", "mlp.shared_experts.down_proj.weight", {D, Fs}, M, ""}, s.shared_w2...);
  f(ParamInfo{"shared.w3", "mlp.shared_experts.up_proj.weight", {Fs, D}, M, ""}, s.shared_w3...);
}

// Zero-filled parameters of the right sizes (gradient buffers); gate_bias zero.
template <typename T>
MoeParams<T> moe_zero_params(const MoeConfig& c) { return param_list::zeroed<MoeTensors, T>(c); }
// Linear weights ~ N(0, 1/fan_in), gate_bias 0.
template <typename T>
MoeParams<T> moe_init_params(const MoeConfig& c, uint64_t seed) {
  return param_list::initialised<MoeTensors, T>(c, seed, false);
}

// What the forward saves: the router's outputs (stage 04 reads scores, indices, counts), the dispatch,
// and the activations the backward needs. Pointers into one scalar buffer of moe_saved_size() and one int
// buffer of moe_saved_int_size() elements (host for cpu::, device for cuda::), carved by moe_saved_layout().
template <typename T>
struct MoeSaved {
  T* scores;      // (N, E)   unbiased affinities s = sigmoid(x Wg^T) (or softmax)
  T* sel;         // (N, E)   biased selection scores s + b; experts of dropped groups set to -inf
  T* weights;     // (N, K)   routing weights of the chosen experts (unbiased s, normalised, * route_scale)
  T* h1;          // (NK, F)  w1 x per slot, dispatch order
  T* h3;          // (NK, F)  w3 x per slot, dispatch order
  T* eo;          // (NK, D)  expert output per slot, dispatch order (unweighted)
  T* sh1;         // (N, Fs)  shared_w1 x
  T* sh3;         // (N, Fs)  shared_w3 x
  int* indices;   // (N, K)   chosen experts, best biased score first (ties: lower index)
  int* counts;    // (E)      tokens routed to each expert
  int* offsets;   // (E + 1)  exclusive scan of counts
  int* perm;      // (NK)     dispatch row -> slot n*K+k
  int* slot_row;  // (NK)     slot -> dispatch row (inverse of perm)
};
size_t moe_saved_size(const MoeConfig& c, int N);
// Saved buffers are carved into fields that each start on a 16-byte boundary of the buffer (the segmented bf16
// expert path moves them in 16-byte vectors): a float field of n elements takes saved_field_count(n) (layouts
// that contain an MoE's, the block's and the MTP chain's, carve the same way).
inline size_t saved_field_count(size_t n) { return (n + 3) / 4 * 4; }
size_t moe_saved_int_size(const MoeConfig& c, int N);
template <typename T>
MoeSaved<T> moe_saved_layout(T* base, int* ibase, const MoeConfig& c, int N);

// Host owner of the saved buffers (for cpu::; the device twin is in moe_device.h). Move-safe: the
// vectors' heap storage does not move with them.
template <typename T>
struct MoeHostSaved {
  std::vector<T> f;
  std::vector<int> i;
  MoeSaved<T> saved;
  MoeHostSaved(const MoeConfig& c, int N)
      : f(moe_saved_size(c, N)), i(moe_saved_int_size(c, N)), saved(moe_saved_layout(f.data(), i.data(), c, N)) {}
  MoeHostSaved(const MoeHostSaved&) = delete;
  MoeHostSaved& operator=(const MoeHostSaved&) = delete;
  MoeHostSaved(MoeHostSaved&&) = default;
};

// Shape/config checks shared by the CPU and CUDA entry points.
void validate_moe_call(const MoeConfig& c, int N);

// T of a parameter that must not take part in template deduction (so nullptr can be passed for it).
template <typename T>
using NoDeduce = typename std::common_type<T>::type;

// A dense SwiGLU MLP (model.py class MLP): out = (silu(x w1^T) * (x w3^T)) w2^T. The full model's first
// first_k_dense_replace layers and dense MTP blocks use it; MoE's experts are the same function.
// F is the hidden width (ModelArgs inter_dim).
struct MlpConfig {
  int dim = 0;                   // D
  int inter_dim = 0;             // F
  Matmul matmul = Matmul::FP32;  // the CUDA path's products
  void validate() const;         // UserError naming the bad field
};
void validate_mlp_call(const MlpConfig& c, int N);
template <typename X>
struct MlpTensors {
  using Config = MlpConfig;
  X w1;  // (F, D)  gate
  X w2;  // (D, F)  down
  X w3;  // (F, D)  up

  auto weights() const { return param_list::weights(*this); }
  auto grads() { return param_list::grads(*this); }
  auto tensors() { return param_list::named(*this); }
};
template <typename T>
using MlpParams = MlpTensors<std::vector<T>>;
template <typename T>
using MlpWeights = MlpTensors<const T*>;
template <typename T>
using MlpGrads = MlpTensors<T*>;  // accumulated (+=)

// The one list of the MLP's parameters: gate, up, down (Hugging Face's order, and the order of their draws).
template <typename F, typename... S>
void for_each_param(const MlpConfig& c, F&& f, S&&... s) {
  const int64_t D = c.dim, F_ = c.inter_dim;
  f(ParamInfo{"w1", "mlp.gate_proj.weight", {F_, D}, ParamKind::Matrix, ""}, s.w1...);
  f(ParamInfo{"w3", "mlp.up_proj.weight", {F_, D}, ParamKind::Matrix, ""}, s.w3...);
  f(ParamInfo{"w2", "mlp.down_proj.weight", {D, F_}, ParamKind::Matrix, ""}, s.w2...);
}
template <typename T>
MlpParams<T> mlp_zero_params(const MlpConfig& c) { return param_list::zeroed<MlpTensors, T>(c); }
// Linear weights ~ N(0, 1/fan_in), as moe_init_params.
template <typename T>
MlpParams<T> mlp_init_params(const MlpConfig& c, uint64_t seed) {
  return param_list::initialised<MlpTensors, T>(c, seed, false);
}

// Scratch of the decode forms below (common/rowwise.h's grow: after the first calls they allocate nothing).
template <typename T>
struct FfnRowsScratch {
  std::vector<T> h1, h3;                                   // SwiGLU hidden (rows, F)
  std::vector<T> logits, score, sel, route_w, xg, yg, slot_y;  // MoE routing and the experts' rows
  std::vector<int> idx, rows;
};

namespace cpu {

// out (N, D) = shared(x) + sum_k weights[n,k] * Expert_{indices[n,k]}(x_n). Fills saved.
template <typename T>
void moe_forward(T* out, const MoeSaved<T>& saved, const T* inp, const MoeWeights<T>& w, const MoeConfig& c,
                 int N);
// grads += d loss / d params; dinp (N, D) = d loss / d inp. dout (N, D). dscores_extra (N, E) may be null:
// an extra gradient on saved.scores from a loss outside the layer (stage 04's balance loss).
template <typename T>
void moe_backward(const MoeGrads<T>& grads, T* dinp, const T* dout, const NoDeduce<T>* dscores_extra,
                  const MoeSaved<T>& saved, const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N);

// Oracle: the same layer evaluated densely: every expert on every token, unselected experts masked by a
// zero weight. Quadratically slower; equals moe_forward up to rounding.
template <typename T>
void moe_forward_dense(T* out, const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N);

// The decode forms (common/rowwise.h): the same layers on n rows, each row's result in a fixed summation order
// whatever n is (no dispatch buffers, nothing saved). moe_rows routes with moe_route.h like moe_forward, runs
// each routed expert once on the rows that chose it and combines in k order.
template <typename T>
void mlp_rows(T* out, const T* x, const MlpWeights<T>& w, const MlpConfig& c, int n, FfnRowsScratch<T>& s);
template <typename T>
void moe_rows(T* out, const T* x, const MoeWeights<T>& w, const MoeConfig& c, int n, FfnRowsScratch<T>& s);

// Dense MLP on N rows: out (N, D); saves h1 = x w1^T and h3 = x w3^T, each (N, F).
template <typename T>
void mlp_forward(T* out, T* h1, T* h3, const T* inp, const MlpWeights<T>& w, const MlpConfig& c, int N);
// grads += d loss / d w;  dinp (N, D) = d loss / d inp.
template <typename T>
void mlp_backward(const MlpGrads<T>& grads, T* dinp, const T* dout, const T* h1, const T* h3, const T* inp,
                  const MlpWeights<T>& w, const MlpConfig& c, int N);

}  // namespace cpu

namespace cuda {

void moe_forward(float* out, const MoeSaved<float>& saved, const float* inp, const MoeWeights<float>& w,
                 const MoeConfig& c, int N);
void moe_backward(const MoeGrads<float>& grads, float* dinp, const float* dout, const float* dscores_extra,
                  const MoeSaved<float>& saved, const float* inp, const MoeWeights<float>& w, const MoeConfig& c,
                  int N);
void mlp_forward(float* out, float* h1, float* h3, const float* inp, const MlpWeights<float>& w, const MlpConfig& c,
                 int N);
void mlp_backward(const MlpGrads<float>& grads, float* dinp, const float* dout, const float* h1, const float* h3,
                  const float* inp, const MlpWeights<float>& w, const MlpConfig& c, int N);
// The decode forms on the GPU (moe_rows_cuda.cu; the CPU ones without their scratch): every token routed on its
// own, every product a fixed-order row-wise dot (common/rowwise_cuda.cuh, no cuBLAS), so a row's output is bitwise
// independent of n; nothing read back to the host, so the launches can be captured in a CUDA graph. fp32 whatever
// c.matmul says. accumulate: out += FFN(x) (a block's residual add, fused; the same value as adding afterwards).
void mlp_rows(float* out, const float* x, const MlpWeights<float>& w, const MlpConfig& c, int n,
              bool accumulate = false);
void moe_rows(float* out, const float* x, const MoeWeights<float>& w, const MoeConfig& c, int n,
              bool accumulate = false);
// Version 2, the GPU sampler's fused step: x (n, D) += FFN(rmsnorm(x) * in_norm) (the block's FFN norm, eps, and
// residual add taken in): a dense MLP in two launches (up, down), the MoE in three (route, up, down with the combine);
// no allocation: workspace holds *_workspace_floats(c, n) device floats (the MoE also n K ints in iworkspace).
// Bitwise what rmsnorm_rows then version 1 with accumulate give.
size_t mlp_rows_workspace_floats(const MlpConfig& c, int n);
size_t moe_rows_workspace_floats(const MoeConfig& c, int n);
void mlp_rows_fused(float* x, const float* in_norm, float eps, const MlpWeights<float>& w, const MlpConfig& c, int n,
                    float* workspace);
void moe_rows_fused(float* x, const float* in_norm, float eps, const MoeWeights<float>& w, const MoeConfig& c, int n,
                    float* workspace, int* iworkspace);

}  // namespace cuda
}  // namespace dsv3
