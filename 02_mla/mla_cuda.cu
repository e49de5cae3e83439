// Stage 02, CUDA: kernels, then launchers, then the public entry points (mla.h). Activations fp32; every matrix
// product at the config's matmul precision (common/gemm.h). Shapes: see the legend in mla.h. Projections go
// through cuBLAS (dsv3::cuda::gemm); attention uses one pointer-array batched GEMM over all (sequence, head)
// pairs per product (gemm_bh) and simple kernels for the causal softmax, its backward and the decode attention.
#include "02_mla/mla.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarp = kWarpSize;
constexpr int kRowsPerBlock = 8;  // softmax kernels: one warp per row, 8 warps per block

// Row r of `rows` rows of length L attends to its first `valid` entries:
// valid = (r % Tq) + 1 + (L - Tq): causal training (Tq = L: query t sees 0..t) and decode (Tq = 1: all L).
__device__ int valid_length(int r, int L, int Tq) { return min(L, r % Tq + 1 + (L - Tq)); }

// ---- kernels ------------------------------------------------------------------------------------

// In place: scores (already scaled) -> probabilities on [0, valid), 0 after.
__global__ void softmax_forward_kernel(float* P, int rows, int L, int Tq) {
  const int r = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  float* x = P + static_cast<size_t>(r) * L;
  const int valid = valid_length(r, L, Tq);
  float m = -INFINITY;
  for (int s = lane; s < valid; s += kWarp) m = fmaxf(m, x[s]);
  m = warp_max(m);
  float sum = 0.f;
  for (int s = lane; s < valid; s += kWarp) sum += expf(x[s] - m);
  const float inv = 1.f / warp_sum(sum);
  for (int s = lane; s < L; s += kWarp) x[s] = s < valid ? expf(x[s] - m) * inv : 0.f;
}

// In place: dP -> dscore = scale * P * (dP - sum_s P dP) on [0, valid), 0 after.
__global__ void softmax_backward_kernel(float* dP, const float* P, int rows, int L, int Tq, float scale) {
  const int r = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  float* d = dP + static_cast<size_t>(r) * L;
  const float* p = P + static_cast<size_t>(r) * L;
  const int valid = valid_length(r, L, Tq);
  float dot = 0.f;
  for (int s = lane; s < valid; s += kWarp) dot += p[s] * d[s];
  dot = warp_sum(dot);
  for (int s = lane; s < L; s += kWarp) d[s] = s < valid ? scale * p[s] * (d[s] - dot) : 0.f;
}

// Where the operands of one decode attention live: element j of query (b, h) is q[(b*H + h)*q_stride + j];
// element j of key/value s of (b, h) is k[b*k_b + s*k_s + h*k_h + j] (k_h = 0: shared by all heads).
struct DecodeOperand {
  const float* p;
  size_t b_stride, s_stride, h_stride;
};

// scores[b, h, s] = scale * (q1 . k1[s] + q2 . k2[s]), s < L. One warp per (b, h, s).
__global__ void decode_scores_kernel(float* scores, const float* q1, int q1_stride, DecodeOperand k1, int n1,
                                     const float* q2, int q2_stride, DecodeOperand k2, int n2, int B, int H, int L,
                                     float scale) {
  const size_t w = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= static_cast<size_t>(B) * H * L) return;
  const int s = static_cast<int>(w % L);
  const int bh = static_cast<int>(w / L), h = bh % H, b = bh / H;
  const float* a1 = q1 + static_cast<size_t>(bh) * q1_stride;
  const float* c1 = k1.p + b * k1.b_stride + s * k1.s_stride + h * k1.h_stride;
  const float* a2 = q2 + static_cast<size_t>(bh) * q2_stride;
  const float* c2 = k2.p + b * k2.b_stride + s * k2.s_stride + h * k2.h_stride;
  float acc = 0.f;
  for (int j = lane; j < n1; j += kWarp) acc += a1[j] * c1[j];
  for (int j = lane; j < n2; j += kWarp) acc += a2[j] * c2[j];
  acc = warp_sum(acc);
  if (lane == 0) scores[w] = scale * acc;
}

// o[(b*H + h)*n + j] = sum_{s < L} P[b, h, s] * v[s] (j < n). One thread per (b, h, j); consecutive j coalesce.
__global__ void decode_weighted_sum_kernel(float* o, const float* P, DecodeOperand v, int n, int B, int H, int L) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(B) * H * n) return;
  const int j = static_cast<int>(idx % n);
  const int bh = static_cast<int>(idx / n), h = bh % H, b = bh / H;
  const float* p = P + static_cast<size_t>(bh) * L;
  const float* base = v.p + b * v.b_stride + h * v.h_stride + j;
  float acc = 0.f;
  for (int s = 0; s < L; ++s) acc += p[s] * base[s * v.s_stride];
  o[idx] = acc;
}

// ---- launchers ----------------------------------------------------------------------------------

int blocks_for(size_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

void launch_softmax_forward(float* P, int rows, int L, int Tq) {
  softmax_forward_kernel<<<blocks_for(rows, kRowsPerBlock), kRowsPerBlock * kWarp>>>(P, rows, L, Tq);
  CUDA_CHECK_LAST();
}
void launch_softmax_backward(float* dP, const float* P, int rows, int L, int Tq, float scale) {
  softmax_backward_kernel<<<blocks_for(rows, kRowsPerBlock), kRowsPerBlock * kWarp>>>(dP, P, rows, L, Tq, scale);
  CUDA_CHECK_LAST();
}

// Attention products, one per (sequence b, head h): operand X of pair (b, h) starts at X + b*xb + h*xh.
// All B*H in one pointer-array batched call (gemm_batched_2d).
struct BH {
  int64_t b, h;  // strides of the sequence and the head index
};
void gemm_bh(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, BH a, const float* Bm,
             int ldb, BH bm, float beta, float* C, int ldc, BH c, int B, int H, Matmul math) {
  gemm_batched_2d(opA, opB, M, N, K, alpha, A, lda, a.b, a.h, Bm, ldb, bm.b, bm.h, beta, C, ldc, c.b, c.h, B, H,
                  math);
}

// y (rows, out) = x (rows, in) W^T.
void linear(float* y, const float* x, const float* W, int rows, int in, int out, Matmul math) {
  gemm(Op::N, Op::T, rows, out, in, 1.f, x, in, W, in, 0.f, y, out, math);
}
// dx (rows, in) = dy W (beta 0) or += (beta 1); dW (out, in) += dy^T x.
void linear_backward(float* dW, float* dx, const float* dy, const float* x, const float* W, int rows, int in,
                     int out, float beta_dx, Matmul math) {
  gemm(Op::N, Op::N, rows, in, out, 1.f, dy, out, W, in, beta_dx, dx, in, math);
  gemm(Op::T, Op::N, out, in, rows, 1.f, dy, out, x, in, 1.f, dW, in, math);
}

// 1) q = wq_b(q_norm(wq_a x)) or wq x;  2) [kv_lat | k_pe] = wkv_a x, c_kv = kv_norm(kv_lat)  (as the CPU).
void project_q(float* q, float* q_lat, float* q_rstd, float* q_lat_n, const float* x, const MlaWeights<float>& w,
               const MlaConfig& c, int N) {
  const int D = c.dim, Dq = c.q_lora_rank, HS = c.n_heads * c.qk_head_dim();
  if (Dq > 0) {
    linear(q_lat, x, w.wq_a, N, D, Dq, c.matmul);
    rmsnorm_forward(q_lat_n, q_rstd, q_lat, w.q_norm, N, Dq, c.norm_eps);
    linear(q, q_lat_n, w.wq_b, N, Dq, HS, c.matmul);
  } else {
    linear(q, x, w.wq, N, D, HS, c.matmul);
  }
}
void project_kv(float* kv_lat, float* kv_rstd, float* c_kv, float* k_pe, const float* x, const MlaWeights<float>& w,
                const MlaConfig& c, int N) {
  const int D = c.dim, Dc = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
  linear(kv_lat, x, w.wkv_a, N, D, Dc, c.matmul);
  linear(k_pe, x, w.wkv_a + static_cast<size_t>(Dc) * D, N, D, Dr, c.matmul);
  rmsnorm_forward(c_kv, kv_rstd, kv_lat, w.kv_norm, N, Dc, c.norm_eps);
}
void rope_q_kpe(float* q, float* k_pe, const MlaConfig& c, int B, int T, int pos0, const MlaRope<float>& r,
                bool backward) {
  const RopeDims dq{B, T, c.n_heads, c.qk_head_dim(), c.qk_nope_head_dim, c.qk_rope_head_dim, pos0};
  const RopeDims dk{B, T, 1, c.qk_rope_head_dim, 0, c.qk_rope_head_dim, pos0};
  if (backward) {
    rope_backward(q, q, r.cos, r.sin, dq, r.positions);
    rope_backward(k_pe, k_pe, r.cos, r.sin, dk, r.positions);
  } else {
    rope_forward(q, q, r.cos, r.sin, dq, r.positions);
    rope_forward(k_pe, k_pe, r.cos, r.sin, dk, r.positions);
  }
}

// Copies B rows of n floats (src, contiguous) to dst + b*pitch (the cache slot of position pos).
void copy_rows(float* dst, size_t pitch, const float* src, int n, int B) {
  CUDA_CHECK(cudaMemcpy2DAsync(dst, pitch * sizeof(float), src, n * sizeof(float), n * sizeof(float), B,
                               cudaMemcpyDeviceToDevice, nullptr));
}

// Both decode forms: project the new token, rope it, append it to the cache. q (B, H, S) is scratch.
void decode_prologue(float* q, const MlaCache<float>& cache, const float* inp, const MlaWeights<float>& w,
                     const MlaConfig& c, int B, int pos, const MlaRope<float>& rope) {
  validate_mla_decode(c, B, pos, cache.max_len, rope.positions);
  const int Dq = c.q_lora_rank, Dc = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
  ScratchBuffer<float> q_lat(size_t(B) * Dq), q_rstd(Dq > 0 ? B : 0), q_lat_n(size_t(B) * Dq),
      kv_lat(size_t(B) * Dc), kv_rstd(B), c_kv(size_t(B) * Dc), k_pe(size_t(B) * Dr);
  project_q(q, q_lat.get(), q_rstd.get(), q_lat_n.get(), inp, w, c, B);
  project_kv(kv_lat.get(), kv_rstd.get(), c_kv.get(), k_pe.get(), inp, w, c, B);
  rope_q_kpe(q, k_pe.get(), c, B, 1, pos, rope, false);
  copy_rows(cache.c_kv + size_t(pos) * Dc, size_t(cache.max_len) * Dc, c_kv.get(), Dc, B);
  copy_rows(cache.k_pe + size_t(pos) * Dr, size_t(cache.max_len) * Dr, k_pe.get(), Dr, B);
}

// scores (B, H, L) -> softmax -> o (B, H, n) = sum_s P v[s].
void decode_attend(float* o, const float* q1, int q1_stride, DecodeOperand k1, int n1, const float* q2,
                   int q2_stride, DecodeOperand k2, int n2, DecodeOperand v, int n, int B, int H, int L, float scale) {
  ScratchBuffer<float> P(size_t(B) * H * L);
  const size_t warps = size_t(B) * H * L;
  decode_scores_kernel<<<blocks_for(warps * kWarp, 256), 256>>>(P.get(), q1, q1_stride, k1, n1, q2, q2_stride, k2,
                                                                 n2, B, H, L, scale);
  CUDA_CHECK_LAST();
  launch_softmax_forward(P.get(), B * H, L, 1);
  const size_t outs = size_t(B) * H * n;
  decode_weighted_sum_kernel<<<blocks_for(outs, 256), 256>>>(o, P.get(), v, n, B, H, L);
  CUDA_CHECK_LAST();
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

// ---- the attention of the training form: materialised (version 1); the fused one is attention_fused.cu ----

void materialized_attention_forward(float* y, float* att, const float* q, const float* kv, const float* k_pe,
                                    const MlaConfig& c, int B, int T) {
  require(B > 0 && T > 0, "materialized attention: B and T must be positive, got B={} T={}", B, T);
  const int H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int S = c.qk_head_dim(), KS = c.kv_head_dim();
  const float scale = static_cast<float>(c.softmax_scale());
  const int64_t TT = int64_t(T) * T;
  // per (b, h): q (T, S) rows of stride H*S; kv (T, KS) rows of stride H*KS; P (T, T); k_pe (T, Dr) shared by heads
  const BH q_bh{int64_t(T) * H * S, S}, kv_bh{int64_t(T) * H * KS, KS}, p_bh{H * TT, TT}, kpe_bh{int64_t(T) * Dr, 0},
      y_bh{int64_t(T) * H * Dv, Dv};
  gemm_bh(Op::N, Op::T, T, T, Dn, scale, q, H * S, q_bh, kv, H * KS, kv_bh, 0.f, att, T, p_bh, B, H, c.matmul);
  gemm_bh(Op::N, Op::T, T, T, Dr, scale, q + Dn, H * S, q_bh, k_pe, Dr, kpe_bh, 1.f, att, T, p_bh, B, H, c.matmul);
  launch_softmax_forward(att, B * H * T, T, T);
  gemm_bh(Op::N, Op::N, T, Dv, T, 1.f, att, T, p_bh, kv + Dn, H * KS, kv_bh, 0.f, y, H * Dv, y_bh, B, H, c.matmul);
}

void materialized_attention_backward(float* dq, float* dkv, float* dk_pe, const float* dy, const float* att,
                                     const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int B,
                                     int T) {
  require(B > 0 && T > 0, "materialized attention: B and T must be positive, got B={} T={}", B, T);
  const int H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int S = c.qk_head_dim(), KS = c.kv_head_dim();
  const float scale = static_cast<float>(c.softmax_scale());
  const int64_t TT = int64_t(T) * T;
  ScratchBuffer<float> dP_buf(size_t(B) * H * TT);
  float* dP = dP_buf.get();
  const BH q_bh{int64_t(T) * H * S, S}, kv_bh{int64_t(T) * H * KS, KS}, p_bh{H * TT, TT}, kpe_bh{int64_t(T) * Dr, 0},
      y_bh{int64_t(T) * H * Dv, Dv};
  // dP = dy_h v_h^T;  dv_h = P^T dy_h
  gemm_bh(Op::N, Op::T, T, T, Dv, 1.f, dy, H * Dv, y_bh, kv + Dn, H * KS, kv_bh, 0.f, dP, T, p_bh, B, H, c.matmul);
  gemm_bh(Op::T, Op::N, T, Dv, T, 1.f, att, T, p_bh, dy, H * Dv, y_bh, 0.f, dkv + Dn, H * KS, kv_bh, B, H,
          c.matmul);
  launch_softmax_backward(dP, att, B * H * T, T, T, scale);
  // dq_nope = dS k_nope, dq_pe = dS k_pe;  dk_nope = dS^T q_nope;  dk_pe = sum_h dS^T q_pe
  gemm_bh(Op::N, Op::N, T, Dn, T, 1.f, dP, T, p_bh, kv, H * KS, kv_bh, 0.f, dq, H * S, q_bh, B, H, c.matmul);
  gemm_bh(Op::N, Op::N, T, Dr, T, 1.f, dP, T, p_bh, k_pe, Dr, kpe_bh, 0.f, dq + Dn, H * S, q_bh, B, H, c.matmul);
  gemm_bh(Op::T, Op::N, T, Dn, T, 1.f, dP, T, p_bh, q, H * S, q_bh, 0.f, dkv, H * KS, kv_bh, B, H, c.matmul);
  // the one rope key is shared by all heads: dk_pe_b = sum_h dS_bh^T q_pe_bh, heads accumulated in order
  for (int h = 0; h < H; ++h)
    gemm_strided_batched(Op::T, Op::N, T, Dr, T, 1.f, dP + h * TT, T, H * TT, q + h * S + Dn, H * S,
                         int64_t(T) * H * S, h ? 1.f : 0.f, dk_pe, Dr, int64_t(T) * Dr, B, c.matmul);
}

void mla_forward(float* out, const MlaSaved<float>& s, const float* inp, const MlaWeights<float>& w,
                 const MlaConfig& c, int B, int T, int pos0, const MlaRope<float>& rope) {
  validate_mla_call(c, B, T, pos0, rope.positions);
  const int N = B * T, H = c.n_heads, Dv = c.v_head_dim, Dc = c.kv_lora_rank, KS = c.kv_head_dim();
  project_q(s.q, s.q_lat, s.q_rstd, s.q_lat_n, inp, w, c, N);
  project_kv(s.kv_lat, s.kv_rstd, s.c_kv, s.k_pe, inp, w, c, N);
  rope_q_kpe(s.q, s.k_pe, c, B, T, pos0, rope, false);
  linear(s.kv, s.c_kv, w.wkv_b, N, Dc, H * KS, c.matmul);
  if (c.fused_attention())
    fused_attention_forward(s.y, s.lse, s.q, s.kv, s.k_pe, c, B, T);
  else
    materialized_attention_forward(s.y, s.att, s.q, s.kv, s.k_pe, c, B, T);
  linear(out, s.y, w.wo, N, H * Dv, c.dim, c.matmul);
}

void mla_backward(const MlaGrads<float>& g, float* dinp, const float* dout, const MlaSaved<float>& s,
                  const float* inp, const MlaWeights<float>& w, const MlaConfig& c, int B, int T, int pos0,
                  const MlaRope<float>& rope) {
  validate_mla_call(c, B, T, pos0, rope.positions);
  const int N = B * T, D = c.dim, H = c.n_heads, Dr = c.qk_rope_head_dim;
  const int Dv = c.v_head_dim, Dc = c.kv_lora_rank, Dq = c.q_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim();
  ScratchBuffer<float> dy(size_t(N) * H * Dv), dq(size_t(N) * H * S), dkv(size_t(N) * H * KS),
      dk_pe(size_t(N) * Dr), dc_kv(size_t(N) * Dc), dkv_lat(size_t(N) * Dc);
  linear_backward(g.wo, dy.get(), dout, s.y, w.wo, N, H * Dv, D, 0.f, c.matmul);
  if (c.fused_attention())
    fused_attention_backward(dq.get(), dkv.get(), dk_pe.get(), dy.get(), s.y, s.lse, s.q, s.kv, s.k_pe, c, B, T);
  else
    materialized_attention_backward(dq.get(), dkv.get(), dk_pe.get(), dy.get(), s.att, s.q, s.kv, s.k_pe, c, B, T);
  rope_q_kpe(dq.get(), dk_pe.get(), c, B, T, pos0, rope, true);
  linear_backward(g.wkv_b, dc_kv.get(), dkv.get(), s.c_kv, w.wkv_b, N, Dc, H * KS, 0.f, c.matmul);
  rmsnorm_backward(g.kv_norm, dkv_lat.get(), dc_kv.get(), s.kv_rstd, s.kv_lat, w.kv_norm, N, Dc);
  linear_backward(g.wkv_a, dinp, dkv_lat.get(), inp, w.wkv_a, N, D, Dc, 0.f, c.matmul);
  linear_backward(g.wkv_a + size_t(Dc) * D, dinp, dk_pe.get(), inp, w.wkv_a + size_t(Dc) * D, N, D, Dr, 1.f, c.matmul);
  if (Dq > 0) {
    ScratchBuffer<float> dq_lat_n(size_t(N) * Dq), dq_lat(size_t(N) * Dq);
    linear_backward(g.wq_b, dq_lat_n.get(), dq.get(), s.q_lat_n, w.wq_b, N, Dq, H * S, 0.f, c.matmul);
    rmsnorm_backward(g.q_norm, dq_lat.get(), dq_lat_n.get(), s.q_rstd, s.q_lat, w.q_norm, N, Dq);
    linear_backward(g.wq_a, dinp, dq_lat.get(), inp, w.wq_a, N, D, Dq, 1.f, c.matmul);
  } else {
    linear_backward(g.wq, dinp, dq.get(), inp, w.wq, N, D, H * S, 1.f, c.matmul);
  }
}

void mla_decode_step_naive(float* out, const MlaCache<float>& cache, const float* inp, const MlaWeights<float>& w,
                           const MlaConfig& c, int B, int pos, const MlaRope<float>& rope) {
  const int H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int Dc = c.kv_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim(), L = pos + 1;
  ScratchBuffer<float> q(size_t(B) * H * S), kv(size_t(B) * L * H * KS), o(size_t(B) * H * Dv);
  decode_prologue(q.get(), cache, inp, w, c, B, pos, rope);
  // expand every cached latent: kv (B, L, H, KS) = c_kv wkv_b^T (wkv_b shared: batch stride 0)
  const size_t lmax = cache.max_len;
  gemm_strided_batched(Op::N, Op::T, L, H * KS, Dc, 1.f, cache.c_kv, Dc, int64_t(lmax * Dc), w.wkv_b, Dc, 0, 0.f,
                       kv.get(), H * KS, int64_t(L) * H * KS, B, c.matmul);
  const DecodeOperand k_nope{kv.get(), size_t(L) * H * KS, size_t(H) * KS, size_t(KS)};
  const DecodeOperand k_pe{cache.k_pe, lmax * Dr, size_t(Dr), 0};
  const DecodeOperand v{kv.get() + Dn, size_t(L) * H * KS, size_t(H) * KS, size_t(KS)};
  decode_attend(o.get(), q.get(), S, k_nope, Dn, q.get() + Dn, S, k_pe, Dr, v, Dv, B, H, L,
                static_cast<float>(c.softmax_scale()));
  linear(out, o.get(), w.wo, B, H * Dv, c.dim, c.matmul);
}

void mla_decode_step_absorbed(float* out, const MlaCache<float>& cache, const float* inp,
                              const MlaWeights<float>& w, const MlaConfig& c, int B, int pos,
                              const MlaRope<float>& rope) {
  const int H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int Dc = c.kv_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim(), L = pos + 1;
  ScratchBuffer<float> q(size_t(B) * H * S), q_abs(size_t(B) * H * Dc), o_lat(size_t(B) * H * Dc),
      o(size_t(B) * H * Dv);
  decode_prologue(q.get(), cache, inp, w, c, B, pos, rope);
  // 1) q_abs_h (B, Dc) = q_nope_h W_uk_h, W_uk_h = wkv_b[h, :Dn, :] (Dn, Dc); batched over heads
  gemm_strided_batched(Op::N, Op::N, B, Dc, Dn, 1.f, q.get(), H * S, S, w.wkv_b, Dc, int64_t(KS) * Dc, 0.f,
                       q_abs.get(), H * Dc, Dc, H, c.matmul);
  // 2) attend in latent space: keys c_kv and k_pe, values c_kv, all shared by the heads (h stride 0)
  const size_t lmax = cache.max_len;
  const DecodeOperand ckv{cache.c_kv, lmax * Dc, size_t(Dc), 0};
  const DecodeOperand k_pe{cache.k_pe, lmax * Dr, size_t(Dr), 0};
  decode_attend(o_lat.get(), q_abs.get(), Dc, ckv, Dc, q.get() + Dn, S, k_pe, Dr, ckv, Dc, B, H, L,
                static_cast<float>(c.softmax_scale()));
  // 3) o_h (B, Dv) = o_lat_h W_uv_h^T, W_uv_h = wkv_b[h, Dn:, :] (Dv, Dc); batched over heads
  gemm_strided_batched(Op::N, Op::T, B, Dv, Dc, 1.f, o_lat.get(), H * Dc, Dc, w.wkv_b + size_t(Dn) * Dc, Dc,
                       int64_t(KS) * Dc, 0.f, o.get(), H * Dv, Dv, H, c.matmul);
  linear(out, o.get(), w.wo, B, H * Dv, c.dim, c.matmul);
}

}  // namespace dsv3::cuda
