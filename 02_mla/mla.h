// Stage 02: Multi-head Latent Attention (DeepSeek-V3 paper §2.1.1, inference/model.py class MLA).
// Training form (forward + backward), a latent KV cache, and the two decode forms: naive (expand K and V
// from the latent) and absorbed (fold wkv_b into the query and the output, attend in latent space).
//
// Shape legend
//   B batch, T time (positions per sequence; `seq` in code, where T is the scalar type), N = B*T rows,
//   D model width (dim), H heads (n_heads)
//   Dq q rank (q_lora_rank; 0 = no q compression), Dc kv rank (kv_lora_rank)
//   Dn nope dim (qk_nope_head_dim), Dr rope dim (qk_rope_head_dim), Dv value dim (v_head_dim)
//   S  = Dn + Dr   (one head of q, and of k)
//   KS = Dn + Dv   (one head of wkv_b's output: [k_nope | v])
//   L  cached positions attended by a decode step (pos + 1), Lmax the cache capacity (max_len)
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients
// overwrite (=); dsv3::cpu and dsv3::cuda functions have identical signatures (CUDA: device pointers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/gemm.h"
#include "common/param_list.h"

namespace dsv3 {

// Named as DeepSeek-V3's ModelArgs. rope.qk_rope_head_dim must equal qk_rope_head_dim.
struct MlaConfig {
  int dim = 512;
  int n_heads = 8;
  int q_lora_rank = 256;  // 0: a single wq (D -> H*S), as V3-Lite
  int kv_lora_rank = 128;
  int qk_nope_head_dim = 64;
  int qk_rope_head_dim = 32;
  int v_head_dim = 64;
  float norm_eps = 1e-6f;
  RopeConfig rope;
  Matmul matmul = Matmul::FP32;  // the CUDA path's products (common/gemm.h); the CPU reference ignores it
  // The CUDA path's causal attention in the training form (the decode forms and the CPU reference have their own):
  //   Auto          Fused when matmul = BF16 and the head dims fit fused_attention_fits(), else Materialized.
  //   Materialized  version 1: the T x T scores of every (sequence, head) in memory, cuBLAS products at `matmul`,
  //                 a softmax pass; the probabilities are saved for the backward. The fp32 path, checked
  //                 against the CPU.
  //   Fused         flash-style kernels (attention_fused.cu): bf16 operands, fp32 accumulation, an online
  //                 softmax over key tiles; only each row's log-sum-exp is saved and the backward recomputes the
  //                 probabilities. UserError when the head dims do not fit fused_attention_fits().
  enum class Attention { Auto, Materialized, Fused };
  Attention attention = Attention::Auto;

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }  // S
  int kv_head_dim() const { return qk_nope_head_dim + v_head_dim; }        // KS
  // The fused kernels are compiled for S <= 96 with Dv <= 64, and S, Dv <= 32 (attention_fused.cu).
  bool fused_attention_fits() const;
  // Whether the CUDA training form runs the fused attention (resolves Auto; UserError for Fused that does not fit).
  bool fused_attention() const;
  // (Dn+Dr)^-1/2, times mscale^2 when YaRN extends the context (model.py MLA.__init__).
  double softmax_scale() const;
  void validate() const;  // UserError naming the bad field (qk_rope_head_dim = 0 included)
};

// MLA's parameters, PyTorch Linear layout (out_features, in_features), over a tensor storage X
// (common/param_list.h): MlaParams<T> owns them on the host, MlaDeviceParams on the device, MlaWeights<T> and
// MlaGrads<T> are what the entry points take. Unused members are empty (null views): wq when q_lora_rank > 0;
// wq_a, q_norm, wq_b when q_lora_rank == 0.
template <typename X>
struct MlaTensors {
  using Config = MlaConfig;
  X wq_a;     // (Dq, D)
  X q_norm;   // (Dq)
  X wq_b;     // (H*S, Dq)
  X wq;       // (H*S, D)      only when Dq == 0
  X wkv_a;    // (Dc+Dr, D)    rows [0, Dc): c_kv, rows [Dc, Dc+Dr): the shared k_pe
  X kv_norm;  // (Dc)
  X wkv_b;    // (H*KS, Dc)    per head: rows [0, Dn) give k_nope, rows [Dn, KS) give v
  X wo;       // (D, H*Dv)

  auto weights() const { return param_list::weights(*this); }
  auto grads() { return param_list::grads(*this); }
  auto tensors() { return param_list::named(*this); }  // (name, tensor) of the used members
};
template <typename T>
using MlaParams = MlaTensors<std::vector<T>>;
template <typename T>
using MlaWeights = MlaTensors<const T*>;
template <typename T>
using MlaGrads = MlaTensors<T*>;  // accumulated (+=)

// The one list of MLA's parameters (common/param_list.h): model.py names, Hugging Face names, shapes under c.
template <typename F, typename... S>
void for_each_param(const MlaConfig& c, F&& f, S&&... s) {
  const int64_t D = c.dim, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
  const int64_t S_ = c.qk_head_dim(), KS = c.kv_head_dim(), Dv = c.v_head_dim;
  const ParamKind M = ParamKind::Matrix, N = ParamKind::Norm;
  f(ParamInfo{"wq_a", "self_attn.q_a_proj.weight", {Dq, D}, M, ""}, s.wq_a...);
  f(ParamInfo{"q_norm", "self_attn.q_a_layernorm.weight", {Dq}, N, ""}, s.q_norm...);
  f(ParamInfo{"wq_b", "self_attn.q_b_proj.weight", {Dq > 0 ? H * S_ : 0, Dq}, M, ""}, s.wq_b...);
  f(ParamInfo{"wq", "self_attn.q_proj.weight", {Dq == 0 ? H * S_ : 0, D}, M, ""}, s.wq...);
  f(ParamInfo{"wkv_a", "self_attn.kv_a_proj_with_mqa.weight", {Dc + Dr, D}, M, ""}, s.wkv_a...);
  f(ParamInfo{"kv_norm", "self_attn.kv_a_layernorm.weight", {Dc}, N, ""}, s.kv_norm...);
  f(ParamInfo{"wkv_b", "self_attn.kv_b_proj.weight", {H * KS, Dc}, M, ""}, s.wkv_b...);
  f(ParamInfo{"wo", "self_attn.o_proj.weight", {D, H * Dv}, M, ""}, s.wo...);
}

// Zero-filled parameters of the right sizes (e.g. gradient buffers).
template <typename T>
MlaParams<T> mla_zero_params(const MlaConfig& c) { return param_list::zeroed<MlaTensors, T>(c); }
// Linear weights ~ N(0, 1/fan_in); norm weights 1 (model.py), or 1 + 0.2 N(0, 1) with jitter_norms (tests:
// a gradient that ignored the norm weight must not pass by accident).
template <typename T>
MlaParams<T> mla_init_params(const MlaConfig& c, uint64_t seed, bool jitter_norms = false) {
  return param_list::initialised<MlaTensors, T>(c, seed, jitter_norms);
}

// Activations the forward saves for the backward: pointers into one buffer of mla_saved_size() elements
// (host for cpu::, device for cuda::), carved by mla_saved_layout().
template <typename T>
struct MlaSaved {
  T* q_lat;    // (N, Dq)     wq_a x                       (Dq > 0)
  T* q_rstd;   // (N)         q_norm's 1/rms               (Dq > 0)
  T* q_lat_n;  // (N, Dq)     q_norm(q_lat)                (Dq > 0)
  T* q;        // (N, H, S)   [q_nope | q_pe], RoPE applied to q_pe
  T* kv_lat;   // (N, Dc)     c_kv before kv_norm
  T* kv_rstd;  // (N)         kv_norm's 1/rms
  T* c_kv;     // (N, Dc)     kv_norm(kv_lat): what the cache stores
  T* k_pe;     // (N, Dr)     RoPE applied: what the cache stores; one per token, shared by all heads
  T* kv;       // (N, H, KS)  wkv_b c_kv = per-head [k_nope | v]
  T* att;      // (B, H, T, T) softmax probabilities, 0 above the diagonal          (materialised attention)
  T* y;        // (N, H, Dv)  attention output per head, before wo
  T* lse;      // (B, H, T)   log2 of each row's sum of 2^(scaled score * log2 e)  (fused attention, CUDA only)
};
// Sizes follow c.fused_attention(): att for the materialised attention, lse for the fused one.
size_t mla_saved_size(const MlaConfig& c, int B, int seq);
template <typename T>
MlaSaved<T> mla_saved_layout(T* base, const MlaConfig& c, int B, int seq);

// The latent KV cache: per token only c_kv (after kv_norm) and k_pe (after RoPE), Dc + Dr numbers.
template <typename T>
struct MlaCache {
  T* c_kv;  // (B, Lmax, Dc)
  T* k_pe;  // (B, Lmax, Dr)
  int max_len;
};

// The RoPE tables (rope_tables() of cfg.rope), host or device as the entry point needs.
template <typename T>
struct MlaRope {
  const T* cos;  // (P, Dr/2)
  const T* sin;  // (P, Dr/2)
  int positions;  // P
};
// Views host tables (rope_tables()) or, with device pointers, their uploaded copies.
template <typename T>
MlaRope<T> mla_rope(const RopeTables<T>& t) {
  return {t.cos.data(), t.sin.data(), t.positions};
}

// Scratch of cpu::mla_decode_chunk_absorbed: grown on demand and reused across calls (common/rowwise.h).
template <typename T>
struct MlaDecodeScratch {
  std::vector<T> q_lat, q, kv, q_abs, att, o_lat, o;
};

namespace cpu {

// out (B, T, D) = MLA(inp (B, T, D)), causal, tokens at positions pos0 .. pos0+T-1. Fills saved.
template <typename T>
void mla_forward(T* out, const MlaSaved<T>& saved, const T* inp, const MlaWeights<T>& w, const MlaConfig& c,
                 int B, int seq, int pos0, const MlaRope<T>& rope);
// grads += d loss / d params;  dinp (B, T, D) = d loss / d inp. dout (B, T, D).
template <typename T>
void mla_backward(const MlaGrads<T>& grads, T* dinp, const T* dout, const MlaSaved<T>& saved, const T* inp,
                  const MlaWeights<T>& w, const MlaConfig& c, int B, int seq, int pos0, const MlaRope<T>& rope);

// One decode step: token inp (B, D) at position pos of every sequence. Appends its c_kv, k_pe to the cache
// at pos and attends over cached positions 0..pos; out (B, D).
// naive: expands k_nope and v of all L positions from the cached latent with wkv_b, then attends per head.
template <typename T>
void mla_decode_step_naive(T* out, const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w,
                           const MlaConfig& c, int B, int pos, const MlaRope<T>& rope);
// absorbed: q_nope' = q_nope W_uk (Dn -> Dc), scores against c_kv, o_latent = sum p c_kv, o = o_latent W_uv^T;
// on the CPU, mla_decode_chunk_absorbed with one token per sequence.
template <typename T>
void mla_decode_step_absorbed(T* out, const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w,
                              const MlaConfig& c, int B, int pos, const MlaRope<T>& rope);

// The absorbed decode of a chunk of n tokens of one sequence (the cache's B = 1): inp (n, D) at positions
// pos0 .. pos0+n-1 appends each token's c_kv, k_pe to the cache, and token t attends over positions 0 .. pos0+t
// (causal within the chunk); out (n, D). Every product is common/rowwise.h's fixed-order dot, so the result is
// bitwise that of n calls with n = 1: stage 07's speculative decoding rests on it. scratch: null for a local one.
// The CUDA twin below takes B sequences and a device position.
template <typename T>
void mla_decode_chunk_absorbed(T* out, const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w,
                               const MlaConfig& c, int n, int pos0, const MlaRope<T>& rope,
                               MlaDecodeScratch<T>* scratch = nullptr);

}  // namespace cpu

namespace cuda {

void mla_forward(float* out, const MlaSaved<float>& saved, const float* inp, const MlaWeights<float>& w,
                 const MlaConfig& c, int B, int seq, int pos0, const MlaRope<float>& rope);
void mla_backward(const MlaGrads<float>& grads, float* dinp, const float* dout, const MlaSaved<float>& saved,
                  const float* inp, const MlaWeights<float>& w, const MlaConfig& c, int B, int seq, int pos0,
                  const MlaRope<float>& rope);
void mla_decode_step_naive(float* out, const MlaCache<float>& cache, const float* inp, const MlaWeights<float>& w,
                           const MlaConfig& c, int B, int pos, const MlaRope<float>& rope);
void mla_decode_step_absorbed(float* out, const MlaCache<float>& cache, const float* inp,
                              const MlaWeights<float>& w, const MlaConfig& c, int B, int pos,
                              const MlaRope<float>& rope);
// The absorbed chunk decode for B sequences at the same positions (mla_decode_cuda.cu): inp (B, n, D) holds token t
// of sequence b in row b*n + t, at position *pos0 + t, where pos0 is a DEVICE int (so a captured CUDA graph replays
// at every position; the host never reads it). Appends each token's c_kv, k_pe to sequence b's cache (B, Lmax, ..)
// and attends causally as the CPU form; out (B, n, D). Every product is a fixed-order row-wise one
// (common/rowwise_cuda.cuh, no cuBLAS): a row's result is bitwise independent of n and of B, so a chunk of two
// equals two single steps on the GPU too (stage 07's speculative decoding). The caller keeps *pos0 + n <= max_len
// (rows past the cache are skipped, never written out of bounds); max_len must not exceed the RoPE table.
void mla_decode_chunk_absorbed(float* out, const MlaCache<float>& cache, const float* inp, const MlaWeights<float>& w,
                               const MlaConfig& c, int B, int n, const int* pos0, const MlaRope<float>& rope);
// Version 2, the GPU sampler's fused step: x (B, n, D) += MLA(rmsnorm(x) * in_norm), i.e. the block's attention norm
// (eps in_eps) and residual add taken in, in four launches ([wq_a | wkv_a] with the norm; q_norm with wq_b; the
// attention with kv_norm, RoPE and the cache append; wo with the add) and no allocation: `workspace` holds
// mla_decode_workspace_floats(c, B*n) device floats. Bitwise what rmsnorm_rows, version 1 and the add give, so all
// of version 1's properties (chunk and batch invariance, the device position) hold. The chunk's rows live in the
// attention's shared memory: n (Dc + Dr) floats beside version 1's (UserError when the device cannot give them).
size_t mla_decode_workspace_floats(const MlaConfig& c, int rows);
void mla_decode_chunk_absorbed_fused(float* x, const MlaCache<float>& cache, const float* in_norm, float in_eps,
                                     const MlaWeights<float>& w, const MlaConfig& c, int B, int n, const int* pos0,
                                     const MlaRope<float>& rope, float* workspace);

// The causal attention of the training form on its own, both versions (mla_forward / mla_backward run the fused
// one when c.fused_attention(), else the materialised one; the micro-benchmark times them side by side).
//   materialized (version 1, mla_cuda.cu): att (B, H, T, T) = the probabilities, then y = att v; the backward reads
//   att. Products at c.matmul.
// The fused (attention_fused.cu) saves lse (B, H, T) instead and recomputes the probabilities. Operands as MlaSaved holds them: q (N, H, S) with RoPE applied, kv (N, H, KS) per head
// [k_nope | v], k_pe (N, Dr) shared by the heads; scale = c.softmax_scale(). Needs c.fused_attention_fits().
//   forward:  y (N, H, Dv) = softmax(scale q k^T, causal) v;  lse (B, H, T) as MlaSaved::lse.
//   backward: from dy (N, H, Dv), the forward's y and lse: dq (N, H, S), dkv (N, H, KS) and dk_pe (N, Dr) (the
//             heads' rope-key gradients summed in head order), all overwritten. No atomics: deterministic.
void materialized_attention_forward(float* y, float* att, const float* q, const float* kv, const float* k_pe,
                                    const MlaConfig& c, int B, int seq);
void materialized_attention_backward(float* dq, float* dkv, float* dk_pe, const float* dy, const float* att,
                                     const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int B,
                                     int seq);
void fused_attention_forward(float* y, float* lse, const float* q, const float* kv, const float* k_pe,
                             const MlaConfig& c, int B, int seq);
void fused_attention_backward(float* dq, float* dkv, float* dk_pe, const float* dy, const float* y, const float* lse,
                              const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int B, int seq);

}  // namespace cuda

// Shape checks shared by the CPU and CUDA entry points (UserError naming the field).
void validate_mla_call(const MlaConfig& c, int B, int seq, int pos0, int table_positions);
void validate_mla_decode(const MlaConfig& c, int B, int pos, int max_len, int table_positions);

}  // namespace dsv3
