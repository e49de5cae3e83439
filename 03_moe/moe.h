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

namespace dsv3 {

enum class ScoreFunc { Sigmoid, Softmax };

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

  int shared_inter_dim() const { return n_shared_experts * moe_inter_dim; }  // Fs
  int group_size() const { return n_routed_experts / n_expert_groups; }
  void validate() const;  // UserError naming the bad field
};

// The most expert groups a token's routing keeps state for (a fixed array in the routing kernel).
inline constexpr int kMaxExpertGroups = 64;

// Parameters, PyTorch Linear layout (out_features, in_features). gate_bias may be null (= zeros).
template <typename T>
struct MoeWeights {
  const T* gate_weight;  // (E, D)
  const T* gate_bias;    // (E)      selection only: no gradient (stage 04 updates it)
  const T* w1;           // (E, F, D) routed experts, stacked
  const T* w2;           // (E, D, F)
  const T* w3;           // (E, F, D)
  const T* shared_w1;    // (Fs, D)  the shared experts as one SwiGLU MLP of width Es*F (model.py)
  const T* shared_w2;    // (D, Fs)
  const T* shared_w3;    // (Fs, D)
};
template <typename T>
struct MoeGrads {  // same shapes as MoeWeights, no bias; accumulated (+=)
  T *gate_weight, *w1, *w2, *w3, *shared_w1, *shared_w2, *shared_w3;
};

// Host-side owner of the parameters.
template <typename T>
struct MoeParams {
  std::vector<T> gate_weight, gate_bias, w1, w2, w3, shared_w1, shared_w2, shared_w3;  // shapes as MoeWeights
  MoeWeights<T> weights() const;
  MoeGrads<T> grads();
  // (name, tensor) of every parameter that has a gradient (gate_bias excluded), in MoeGrads order.
  std::vector<std::pair<std::string, std::vector<T>*>> tensors();
};
// Zero-filled parameters of the right sizes (gradient buffers); gate_bias zero.
template <typename T>
MoeParams<T> moe_zero_params(const MoeConfig& c);
// Linear weights ~ N(0, 1/fan_in), gate_bias 0.
template <typename T>
MoeParams<T> moe_init_params(const MoeConfig& c, uint64_t seed);

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
template <typename T>
struct MlpWeights {
  const T* w1;  // (F, D)
  const T* w2;  // (D, F)
  const T* w3;  // (F, D)
};
template <typename T>
struct MlpGrads {  // same shapes; accumulated (+=)
  T *w1, *w2, *w3;
};
template <typename T>
struct MlpParams {
  std::vector<T> w1, w2, w3;  // shapes as MlpWeights
  MlpWeights<T> weights() const { return {w1.data(), w2.data(), w3.data()}; }
  MlpGrads<T> grads() { return {w1.data(), w2.data(), w3.data()}; }
  std::vector<std::pair<std::string, std::vector<T>*>> tensors() { return {{"w1", &w1}, {"w2", &w2}, {"w3", &w3}}; }
};
template <typename T>
MlpParams<T> mlp_zero_params(int D, int F);
// Linear weights ~ N(0, 1/fan_in), as moe_init_params.
template <typename T>
MlpParams<T> mlp_init_params(int D, int F, uint64_t seed);

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

// Dense MLP on N rows: out (N, D); saves h1 = x w1^T and h3 = x w3^T, each (N, F).
template <typename T>
void mlp_forward(T* out, T* h1, T* h3, const T* inp, const MlpWeights<T>& w, int D, int F, int N);
// grads += d loss / d w;  dinp (N, D) = d loss / d inp.
template <typename T>
void mlp_backward(const MlpGrads<T>& grads, T* dinp, const T* dout, const T* h1, const T* h3, const T* inp,
                  const MlpWeights<T>& w, int D, int F, int N);

}  // namespace cpu

namespace cuda {

void moe_forward(float* out, const MoeSaved<float>& saved, const float* inp, const MoeWeights<float>& w,
                 const MoeConfig& c, int N);
void moe_backward(const MoeGrads<float>& grads, float* dinp, const float* dout, const float* dscores_extra,
                  const MoeSaved<float>& saved, const float* inp, const MoeWeights<float>& w, const MoeConfig& c,
                  int N);
void mlp_forward(float* out, float* h1, float* h3, const float* inp, const MlpWeights<float>& w, int D, int F, int N);
void mlp_backward(const MlpGrads<float>& grads, float* dinp, const float* dout, const float* h1, const float* h3,
                  const float* inp, const MlpWeights<float>& w, int D, int F, int N);

}  // namespace cuda
}  // namespace dsv3
