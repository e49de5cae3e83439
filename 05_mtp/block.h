// Stage 05: the pre-norm transformer block (inference/model.py class Block), built from stages 01-03:
//
//   h   = x + MLA(attn_norm(x))
//   out = h + FFN(ffn_norm(h))        FFN = the dense SwiGLU MLP or the MoE (BlockConfig::ffn)
//
// The MTP modules use one block each; the full model (stage 06) stacks them (dense for its first
// first_k_dense_replace layers, MoE after).
//
// Shape legend
//   B batch, T time (`seq` in code, where T is the scalar type), N = B*T rows, D model width (dim), F dense MLP
//   width (mlp.inter_dim); the MLA and MoE shapes are those of 02_mla/mla.h and 03_moe/moe.h.
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients
// overwrite (=); dsv3::cpu and dsv3::cuda functions have identical signatures (CUDA: device pointers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "02_mla/mla.h"
#include "03_moe/moe.h"

namespace dsv3 {

enum class FfnKind { Dense, Moe };

struct BlockConfig {
  MlaConfig attn;                 // attn.dim is the model width D
  FfnKind ffn = FfnKind::Dense;
  MlpConfig mlp{64, 64};          // used for Dense (inter_dim: ModelArgs inter_dim); mlp.dim must equal attn.dim
  MoeConfig moe;                  // used for Moe; moe.dim must equal attn.dim
  float norm_eps = 1e-6f;         // attn_norm and ffn_norm

  int dim() const { return attn.dim; }
  void validate() const;  // UserError naming the bad field
};

// Sets the precision of every CUDA product of the block (attention, dense MLP, experts; the router stays fp32)
// and how its routed experts run (MoeConfig::experts).
void set_matmul(BlockConfig& c, Matmul m, MoeExperts experts);

// The block's parameters (model.py names: attn_norm, attn, ffn_norm, ffn) over a tensor storage X
// (common/param_list.h). Only the FFN of the configured kind is used; the other one's members are empty.
template <typename X>
struct BlockTensors {
  using Config = BlockConfig;
  X attn_norm;           // (D)
  MlaTensors<X> attn;
  X ffn_norm;            // (D)
  MlpTensors<X> mlp;     // FfnKind::Dense
  MoeTensors<X> moe;     // FfnKind::Moe

  auto weights() const { return param_list::weights(*this); }
  auto grads() { return param_list::grads(*this); }
  // (name, tensor) of every used parameter with a gradient, model.py names ("attn.wq_a", "ffn.w1", ...).
  auto tensors() { return param_list::named(*this); }
};
template <typename T>
using BlockParams = BlockTensors<std::vector<T>>;
template <typename T>
using BlockWeights = BlockTensors<const T*>;
template <typename T>
using BlockGrads = BlockTensors<T*>;  // accumulated (+=)

// The one list of the block's parameters: its two norms and its parts' lists (the FFN of the other kind
// lists empty members). Hugging Face names under "model.layers.N.".
template <typename F, typename... S>
void for_each_param(const BlockConfig& c, F&& f, S&&... s) {
  const int64_t D = c.dim();
  const bool dense = c.ffn == FfnKind::Dense;
  f(ParamInfo{"attn_norm", "input_layernorm.weight", {D}, ParamKind::Norm, ""}, s.attn_norm...);
  for_each_param(c.attn, prefixed("attn.", "", f), s.attn...);
  f(ParamInfo{"ffn_norm", "post_attention_layernorm.weight", {D}, ParamKind::Norm, ""}, s.ffn_norm...);
  for_each_param(dense ? c.mlp : MlpConfig{}, prefixed("ffn.", "", f), s.mlp...);
  MoeConfig moe = c.moe;
  if (dense) moe.n_routed_experts = moe.n_shared_experts = 0;  // every MoE member empty
  for_each_param(moe, prefixed("ffn.", "", f), s.moe...);
}

template <typename T>
BlockParams<T> block_zero_params(const BlockConfig& c) { return param_list::zeroed<BlockTensors, T>(c); }
// Linear weights ~ N(0, 1/fan_in); norms 1, or 1 + 0.2 N(0,1) with jitter_norms (tests).
template <typename T>
BlockParams<T> block_init_params(const BlockConfig& c, uint64_t seed, bool jitter_norms = false) {
  return param_list::initialised<BlockTensors, T>(c, seed, jitter_norms);
}

// What the forward saves: pointers into one scalar buffer of block_saved_size() and one int buffer of
// block_saved_int_size() elements (host for cpu::, device for cuda::), carved by block_saved_layout().
template <typename T>
struct BlockSaved {
  T* xa;         // (N, D)  attn_norm(x)
  T* xa_rstd;    // (N)
  MlaSaved<T> attn;
  T* h;          // (N, D)  x + MLA(...)
  T* hf;         // (N, D)  ffn_norm(h)
  T* hf_rstd;    // (N)
  T* mlp_h1;     // (N, F)  Dense only (else null)
  T* mlp_h3;     // (N, F)
  MoeSaved<T> moe;  // Moe only (router scores: the hook for a balance loss, see block_backward)
};
size_t block_saved_size(const BlockConfig& c, int B, int seq);
size_t block_saved_int_size(const BlockConfig& c, int B, int seq);
template <typename T>
BlockSaved<T> block_saved_layout(T* base, int* ibase, const BlockConfig& c, int B, int seq);

// Host owner of the saved buffers (for cpu::). Move-safe.
template <typename T>
struct BlockHostSaved {
  std::vector<T> f;
  std::vector<int> i;
  BlockSaved<T> saved;
  BlockHostSaved(const BlockConfig& c, int B, int seq)
      : f(block_saved_size(c, B, seq)), i(block_saved_int_size(c, B, seq)),
        saved(block_saved_layout(f.data(), i.data(), c, B, seq)) {}
  BlockHostSaved(const BlockHostSaved&) = delete;
  BlockHostSaved& operator=(const BlockHostSaved&) = delete;
  BlockHostSaved(BlockHostSaved&&) = default;
};

void validate_block_call(const BlockConfig& c, int B, int seq, int pos0, int table_positions);

// Scratch of cpu::block_decode (grown on demand, reused across calls).
template <typename T>
struct BlockDecodeScratch {
  std::vector<T> xa, branch;  // (n, D) normed input, branch output
  MlaDecodeScratch<T> attn;
  FfnRowsScratch<T> ffn;
};

namespace cpu {

// out (B, T, D) = Block(inp (B, T, D)), causal, positions pos0.. (RoPE). Fills saved.
template <typename T>
void block_forward(T* out, const BlockSaved<T>& saved, const T* inp, const BlockWeights<T>& w, const BlockConfig& c,
                   int B, int seq, int pos0, const MlaRope<T>& rope);
// grads += d loss / d params; dinp (B, T, D) = d loss / d inp. dout (B, T, D). dscores_extra (N, E): an extra
// gradient on saved.moe.scores (a balance loss, stage 04); null for none, ignored for a dense block.
template <typename T>
void block_backward(const BlockGrads<T>& grads, T* dinp, const T* dout, const NoDeduce<T>* dscores_extra,
                    const BlockSaved<T>& saved, const T* inp, const BlockWeights<T>& w, const BlockConfig& c, int B,
                    int seq, int pos0, const MlaRope<T>& rope);

// The decode form: x (n, D) <- Block(x) for n tokens of one sequence at positions pos0 .. pos0+n-1, attending
// through the latent cache (stage 02's absorbed chunk decode, which appends to it) and the FFN's row form
// (stage 03): no saved activations, and every row bitwise independent of the chunk size (common/rowwise.h).
template <typename T>
void block_decode(T* x, const MlaCache<T>& cache, const BlockWeights<T>& w, const BlockConfig& c, int n, int pos0,
                  const MlaRope<T>& rope, BlockDecodeScratch<T>& s);

}  // namespace cpu

namespace cuda {

void block_forward(float* out, const BlockSaved<float>& saved, const float* inp, const BlockWeights<float>& w,
                   const BlockConfig& c, int B, int seq, int pos0, const MlaRope<float>& rope);
void block_backward(const BlockGrads<float>& grads, float* dinp, const float* dout, const float* dscores_extra,
                    const BlockSaved<float>& saved, const float* inp, const BlockWeights<float>& w,
                    const BlockConfig& c, int B, int seq, int pos0, const MlaRope<float>& rope);
// The decode form on the GPU (block_decode_cuda.cu): x (B, n, D) <- Block(x) for n tokens of each of B sequences at
// positions *pos0 .. *pos0+n-1 (pos0 a DEVICE int: one captured CUDA graph replays at every position), through
// cuda::mla_decode_chunk_absorbed and cuda::mlp_rows / moe_rows. Every row bitwise independent of n and B; fp32.
void block_decode(float* x, const MlaCache<float>& cache, const BlockWeights<float>& w, const BlockConfig& c, int B,
                  int n, const int* pos0, const MlaRope<float>& rope);
// Version 2, the GPU sampler's fused step (block_decode_cuda.cu): the same block through stage 02's and stage 03's
// fused forms, 7 launches for a MoE block (6 dense) instead of 13 (11), and no allocation: workspace / iworkspace hold
// block_decode_workspace_size(c, B*n) device floats / ints (one workspace serves every layer in turn). Bitwise
// version 1's values (test: stage 07's CudaSamplerPaths, through the whole model against version 1).
struct BlockDecodeWorkspaceSize {
  size_t floats = 0, ints = 0;
};
BlockDecodeWorkspaceSize block_decode_workspace_size(const BlockConfig& c, int rows);
void block_decode_fused(float* x, const MlaCache<float>& cache, const BlockWeights<float>& w, const BlockConfig& c,
                        int B, int n, const int* pos0, const MlaRope<float>& rope, float* workspace, int* iworkspace);

}  // namespace cuda
}  // namespace dsv3
