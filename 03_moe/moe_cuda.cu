// Stage 03, CUDA: kernels, then launchers, then the public entry points (moe.h). fp32 throughout.
// Shapes: see the legend in moe.h.
//
// Dispatch on the device, no host loop over tokens:
//   gate GEMM -> route_kernel (one thread per token: scores, group limit, top-K, weights)
//   -> count_kernel (one warp per expert, ballot counts) -> scan_kernel (offsets)
//   -> place_kernel (one warp per expert: stable placement of its slots in (token, k) order = perm)
//   -> gather rows -> per expert three cuBLAS GEMMs on its contiguous slice (host loop over EXPERTS after
//   one copy of the E+1 offsets) -> combine_kernel (per token, fixed k order: deterministic).
#include <vector>

#include "03_moe/moe.h"
#include "03_moe/moe_route.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;

// ---- kernels ------------------------------------------------------------------------------------

// One thread per token: scores from logits, then the routing of moe_route.h (same code as the CPU).
__global__ void route_kernel(float* scores, float* sel, int* indices, float* weights, const float* logits,
                             const float* bias, int N, int E, int K, int G, int Lg, float route_scale,
                             bool softmax) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const size_t r = static_cast<size_t>(n) * E, q = static_cast<size_t>(n) * K;
  moe_route::scores_from_logits(scores + r, logits + r, E, softmax);
  moe_route::route_token(sel + r, indices + q, weights + q, scores + r, bias, E, K, G, Lg, route_scale, !softmax);
}

// One warp per expert: counts[e] = #slots routed to e (ballot + popc: exact, no atomics).
__global__ void count_kernel(int* counts, const int* indices, int NK, int E) {
  const int e = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (e >= E) return;
  int c = 0;
  for (int base = 0; base < NK; base += kWarpSize) {
    const int i = base + lane;
    c += __popc(__ballot_sync(0xffffffffu, i < NK && indices[i] == e));
  }
  if (lane == 0) counts[e] = c;
}

// offsets (E+1) = exclusive scan of counts; E is small (256 for V3): one thread.
__global__ void scan_kernel(int* offsets, const int* counts, int E) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int acc = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e] = acc;
    acc += counts[e];
  }
  offsets[E] = acc;
}

// One warp per expert: walks the slots in order and gives each hit the next row of the expert's slice,
// so rows within an expert follow (token, k) order: a stable counting sort, deterministic.
__global__ void place_kernel(int* perm, int* slot_row, const int* indices, const int* offsets, int NK, int E) {
  const int e = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (e >= E) return;
  int next = offsets[e];
  for (int base = 0; base < NK; base += kWarpSize) {
    const int i = base + lane;
    const bool hit = i < NK && indices[i] == e;
    const unsigned m = __ballot_sync(0xffffffffu, hit);
    if (hit) {
      const int r = next + __popc(m & ((1u << lane) - 1u));
      perm[r] = i;
      slot_row[i] = r;
    }
    next += __popc(m);
  }
}

// xp (NK, D): row r = inp row of token perm[r] / K.
__global__ void gather_kernel(float* xp, const float* inp, const int* perm, int NK, int K, int D) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(NK) * D) return;
  const size_t r = idx / D, d = idx % D;
  xp[idx] = inp[static_cast<size_t>(perm[r] / K) * D + d];
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// a = silu(h1) * h3
__global__ void swiglu_kernel(float* a, const float* h1, const float* h3, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  a[i] = h1[i] * sigmoidf(h1[i]) * h3[i];
}

// dh1 = da * h3 * silu'(h1), dh3 = da * silu(h1);  silu'(x) = sig (1 + x (1 - sig))
__global__ void swiglu_backward_kernel(float* dh1, float* dh3, const float* da, const float* h1, const float* h3,
                                       size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = h1[i], sg = sigmoidf(x);
  dh1[i] = da[i] * h3[i] * sg * (1.f + x * (1.f - sg));
  dh3[i] = da[i] * x * sg;
}

// out[n, d] += sum_k (w[n,k] *) rows[slot_row[n*K+k], d], k in order. weights null: plain sum.
__global__ void combine_kernel(float* out, const float* rows, const float* weights, const int* slot_row, int N,
                               int K, int D) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(N) * D) return;
  const size_t n = idx / D, d = idx % D;
  float acc = out[idx];
  for (int k = 0; k < K; ++k) {
    const size_t i = n * K + k;
    const float v = rows[static_cast<size_t>(slot_row[i]) * D + d];
    acc += weights ? weights[i] * v : v;
  }
  out[idx] = acc;
}

// One warp per slot i = n*K+k, r = slot_row[i]: dw[i] = dout_n . eo_r;  deo_r = w[i] * dout_n.
__global__ void combine_backward_kernel(float* dw, float* deo, const float* dout, const float* eo,
                                        const float* weights, const int* slot_row, int NK, int K, int D) {
  const int i = blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= NK) return;
  const size_t r = slot_row[i];
  const float* dy = dout + static_cast<size_t>(i / K) * D;
  const float wi = weights[i];
  float acc = 0.f;
  for (int d = lane; d < D; d += kWarpSize) {
    acc += dy[d] * eo[r * D + d];
    deo[r * D + d] = wi * dy[d];
  }
  acc = warp_sum(acc);
  if (lane == 0) dw[i] = acc;
}

// One thread per token: dlogits (N, E) from dw (N, K) through the normalisation and sigmoid/softmax.
__global__ void gate_backward_kernel(float* dlogits, const float* dw, const float* dscores_extra,
                                     const int* indices, const float* weights, const float* scores, int N, int E,
                                     int K, float route_scale, bool softmax) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const size_t r = static_cast<size_t>(n) * E, q = static_cast<size_t>(n) * K;
  float* dl = dlogits + r;
  moe_route::route_token_backward(dl, dw + q, indices + q, weights + q, scores + r, E, K, route_scale, !softmax);
  if (dscores_extra)
    for (int e = 0; e < E; ++e) dl[e] += dscores_extra[r + e];
  moe_route::scores_backward(dl, scores + r, E, softmax);
}

// ---- launchers ----------------------------------------------------------------------------------

void launch_swiglu(float* a, const float* h1, const float* h3, size_t n) {
  if (n == 0) return;
  swiglu_kernel<<<blocks_for(n, kThreads), kThreads>>>(a, h1, h3, n);
  CUDA_CHECK_LAST();
}

void launch_combine(float* out, const float* rows, const float* weights, const int* slot_row, int N, int K, int D) {
  const size_t n = static_cast<size_t>(N) * D;
  combine_kernel<<<blocks_for(n, kThreads), kThreads>>>(out, rows, weights, slot_row, N, K, D);
  CUDA_CHECK_LAST();
}

// One SwiGLU FFN on `rows` rows (a: (rows, F) scratch): h1 = x W1^T, h3 = x W3^T, y = (silu(h1) h3) W2^T.
void ffn_forward(float* y, float* h1, float* h3, float* a, const float* x, const float* W1, const float* W2,
                 const float* W3, int rows, int D, int F) {
  if (rows == 0) return;
  gemm(Op::N, Op::T, rows, F, D, 1.f, x, W1, 0.f, h1);
  gemm(Op::N, Op::T, rows, F, D, 1.f, x, W3, 0.f, h3);
  launch_swiglu(a, h1, h3, static_cast<size_t>(rows) * F);
  gemm(Op::N, Op::T, rows, D, F, 1.f, a, W2, 0.f, y);
}

// Scratch of one FFN backward, each (rows, F).
struct FfnScratch {
  float *a, *da, *dh1, *dh3;
};

// dW1/dW2/dW3 += ...;  dx (rows, D) = dh1 W1 + dh3 W3.
void ffn_backward(float* dW1, float* dW2, float* dW3, float* dx, const float* dy, const float* h1, const float* h3,
                  const float* x, const float* W1, const float* W2, const float* W3, int rows, int D, int F,
                  const FfnScratch& s) {
  if (rows == 0) return;
  const size_t n = static_cast<size_t>(rows) * F;
  launch_swiglu(s.a, h1, h3, n);
  gemm(Op::N, Op::N, rows, F, D, 1.f, dy, W2, 0.f, s.da);   // da = dy W2
  gemm(Op::T, Op::N, D, F, rows, 1.f, dy, s.a, 1.f, dW2);   // dW2 += dy^T a
  swiglu_backward_kernel<<<blocks_for(n, kThreads), kThreads>>>(s.dh1, s.dh3, s.da, h1, h3, n);
  CUDA_CHECK_LAST();
  gemm(Op::T, Op::N, F, D, rows, 1.f, s.dh1, x, 1.f, dW1);
  gemm(Op::T, Op::N, F, D, rows, 1.f, s.dh3, x, 1.f, dW3);
  gemm(Op::N, Op::N, rows, D, F, 1.f, s.dh1, W1, 0.f, dx);
  gemm(Op::N, Op::N, rows, D, F, 1.f, s.dh3, W3, 1.f, dx);
}

// The E+1 dispatch offsets on the host: the one device->host copy per layer call (synchronises).
std::vector<int> host_offsets(const int* offsets, int E) {
  std::vector<int> h(E + 1);
  CUDA_CHECK(cudaMemcpy(h.data(), offsets, h.size() * sizeof(int), cudaMemcpyDeviceToHost));
  return h;
}

// Every routed expert's SwiGLU FFN at once: expert e owns rows off[e]..off[e+1] of xp (gathered tokens, D wide),
// h1/h3/a (F wide) and eo (D wide). Each product is one grouped cuBLAS call over the experts.
void routed_ffn_forward(float* eo, float* h1, float* h3, float* a, const float* xp, const MoeWeights<float>& w,
                        const std::vector<int>& off, int D, int F) {
  const int E = static_cast<int>(off.size()) - 1;
  const size_t FD = static_cast<size_t>(F) * D;
  std::vector<GemmProblem> p1, p3, p2;
  for (int e = 0; e < E; ++e) {
    const int rows = off[e + 1] - off[e];
    const size_t o = off[e];
    p1.push_back({rows, F, D, xp + o * D, D, w.w1 + e * FD, D, h1 + o * F, F});
    p3.push_back({rows, F, D, xp + o * D, D, w.w3 + e * FD, D, h3 + o * F, F});
    p2.push_back({rows, D, F, a + o * F, F, w.w2 + e * FD, F, eo + o * D, D});
  }
  GroupedGemms g;
  const int i1 = g.add(Op::N, Op::T, 1.f, 0.f, p1), i3 = g.add(Op::N, Op::T, 1.f, 0.f, p3),
            i2 = g.add(Op::N, Op::T, 1.f, 0.f, p2);
  g.upload();
  g.run(i1);
  g.run(i3);
  launch_swiglu(a, h1, h3, static_cast<size_t>(off[E]) * F);
  g.run(i2);
}

// The backward of routed_ffn_forward for every expert: weight gradients accumulated (+=), dxp overwritten.
void routed_ffn_backward(const MoeGrads<float>& grads, float* dxp, const float* deo, const float* h1, const float* h3,
                         const float* xp, const MoeWeights<float>& w, const std::vector<int>& off, int D, int F,
                         const FfnScratch& s) {
  const int E = static_cast<int>(off.size()) - 1;
  const size_t FD = static_cast<size_t>(F) * D, n = static_cast<size_t>(off[E]) * F;
  std::vector<GemmProblem> da, dw2, dw1, dw3, dx1, dx3;
  for (int e = 0; e < E; ++e) {
    const int rows = off[e + 1] - off[e];
    const size_t o = off[e];
    da.push_back({rows, F, D, deo + o * D, D, w.w2 + e * FD, F, s.da + o * F, F});        // da = dy W2
    dw2.push_back({D, F, rows, deo + o * D, D, s.a + o * F, F, grads.w2 + e * FD, F});    // dW2 += dy^T a
    dw1.push_back({F, D, rows, s.dh1 + o * F, F, xp + o * D, D, grads.w1 + e * FD, D});   // dW1 += dh1^T x
    dw3.push_back({F, D, rows, s.dh3 + o * F, F, xp + o * D, D, grads.w3 + e * FD, D});   // dW3 += dh3^T x
    dx1.push_back({rows, D, F, s.dh1 + o * F, F, w.w1 + e * FD, D, dxp + o * D, D});      // dx = dh1 W1
    dx3.push_back({rows, D, F, s.dh3 + o * F, F, w.w3 + e * FD, D, dxp + o * D, D});      // dx += dh3 W3
  }
  // The weight gradients (small outputs, long inner dimension = the expert's token count) run as one cuBLAS
  // GEMM per expert: its heuristics pick split-K kernels for that shape, which the grouped call does not
  // (measured on an H100, small preset: 6.5 ms per layer grouped).
  auto per_expert = [](Op opA, Op opB, const std::vector<GemmProblem>& ps) {
    for (const auto& p : ps)
      if (p.K > 0) gemm(opA, opB, p.M, p.N, p.K, 1.f, p.A, p.lda, p.B, p.ldb, 1.f, p.C, p.ldc);
  };
  GroupedGemms g;
  const int ida = g.add(Op::N, Op::N, 1.f, 0.f, da), idx1 = g.add(Op::N, Op::N, 1.f, 0.f, dx1),
            idx3 = g.add(Op::N, Op::N, 1.f, 1.f, dx3);
  g.upload();
  launch_swiglu(s.a, h1, h3, n);
  g.run(ida);
  per_expert(Op::T, Op::N, dw2);
  swiglu_backward_kernel<<<blocks_for(n, kThreads), kThreads>>>(s.dh1, s.dh3, s.da, h1, h3, n);
  CUDA_CHECK_LAST();
  per_expert(Op::T, Op::N, dw1);
  per_expert(Op::T, Op::N, dw3);
  g.run(idx1);
  g.run(idx3);
}

void launch_gather(float* xp, const float* inp, const int* perm, int NK, int K, int D) {
  const size_t n = static_cast<size_t>(NK) * D;
  gather_kernel<<<blocks_for(n, kThreads), kThreads>>>(xp, inp, perm, NK, K, D);
  CUDA_CHECK_LAST();
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void moe_forward(float* out, const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                 const MoeConfig& c, int N) {
  validate_moe_call(c, N);
  if (N == 0) return;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim(), NK = N * K;
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  // 1) gate logits and per-token routing
  ScratchBuffer<float> logits(static_cast<size_t>(N) * E);
  gemm(Op::N, Op::T, N, E, D, 1.f, inp, w.gate_weight, 0.f, logits.get(), GemmMath::FP32);  // router: fp32
  route_kernel<<<blocks_for(N, kThreads), kThreads>>>(s.scores, s.sel, s.indices, s.weights, logits.get(),
                                                      w.gate_bias, N, E, K, c.n_expert_groups,
                                                      c.n_limited_groups, c.route_scale, softmax);
  CUDA_CHECK_LAST();
  // 2) counts, offsets, permutation
  count_kernel<<<blocks_for(E, kWarpsPerBlock), kThreads>>>(s.counts, s.indices, NK, E);
  CUDA_CHECK_LAST();
  scan_kernel<<<1, 1>>>(s.offsets, s.counts, E);
  CUDA_CHECK_LAST();
  place_kernel<<<blocks_for(E, kWarpsPerBlock), kThreads>>>(s.perm, s.slot_row, s.indices, s.offsets, NK, E);
  CUDA_CHECK_LAST();
  // 3) gathered tokens through each expert's FFN, one contiguous slice per expert
  ScratchBuffer<float> xp(static_cast<size_t>(NK) * D), a(static_cast<size_t>(NK) * std::max(F, Fs));
  launch_gather(xp.get(), inp, s.perm, NK, K, D);
  const std::vector<int> off = host_offsets(s.offsets, E);
  routed_ffn_forward(s.eo, s.h1, s.h3, a.get(), xp.get(), w, off, D, F);
  // 4) out = shared(x) + sum_k w_k eo_k
  if (Fs > 0)
    ffn_forward(out, s.sh1, s.sh3, a.get(), inp, w.shared_w1, w.shared_w2, w.shared_w3, N, D, Fs);
  else
    CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(N) * D * sizeof(float)));
  launch_combine(out, s.eo, s.weights, s.slot_row, N, K, D);
}

void moe_backward(const MoeGrads<float>& g, float* dinp, const float* dout, const float* dscores_extra,
                  const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w, const MoeConfig& c,
                  int N) {
  validate_moe_call(c, N);
  if (N == 0) return;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim(), NK = N * K;
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  const size_t scratch_rows = std::max(static_cast<size_t>(NK) * F, static_cast<size_t>(N) * Fs);
  ScratchBuffer<float> a(scratch_rows), da(scratch_rows), dh1(scratch_rows), dh3(scratch_rows);
  const FfnScratch fs{a.get(), da.get(), dh1.get(), dh3.get()};
  // 1) shared experts: dinp = their input gradient (overwrite)
  if (Fs > 0)
    ffn_backward(g.shared_w1, g.shared_w2, g.shared_w3, dinp, dout, s.sh1, s.sh3, inp, w.shared_w1, w.shared_w2,
                 w.shared_w3, N, D, Fs, fs);
  else
    CUDA_CHECK(cudaMemsetAsync(dinp, 0, static_cast<size_t>(N) * D * sizeof(float)));
  // 2) combine backward: dw (N, K), deo (NK, D) in dispatch order
  ScratchBuffer<float> dw(NK), deo(static_cast<size_t>(NK) * D), xp(static_cast<size_t>(NK) * D),
      dxp(static_cast<size_t>(NK) * D);
  combine_backward_kernel<<<blocks_for(NK, kWarpsPerBlock), kThreads>>>(dw.get(), deo.get(), dout, s.eo, s.weights,
                                                                        s.slot_row, NK, K, D);
  CUDA_CHECK_LAST();
  // 3) each routed expert on its slice
  launch_gather(xp.get(), inp, s.perm, NK, K, D);
  const std::vector<int> off = host_offsets(s.offsets, E);
  routed_ffn_backward(g, dxp.get(), deo.get(), s.h1, s.h3, xp.get(), w, off, D, F, fs);
  // 4) router: dlogits, then dWg += dlogits^T x and dinp += dlogits Wg
  ScratchBuffer<float> dlogits(static_cast<size_t>(N) * E);
  gate_backward_kernel<<<blocks_for(N, kThreads), kThreads>>>(dlogits.get(), dw.get(), dscores_extra, s.indices,
                                                              s.weights, s.scores, N, E, K, c.route_scale, softmax);
  CUDA_CHECK_LAST();
  gemm(Op::T, Op::N, E, D, N, 1.f, dlogits.get(), inp, 1.f, g.gate_weight, GemmMath::FP32);
  gemm(Op::N, Op::N, N, D, E, 1.f, dlogits.get(), w.gate_weight, 1.f, dinp, GemmMath::FP32);
  // 5) experts' input gradients back to their tokens, k in order
  launch_combine(dinp, dxp.get(), nullptr, s.slot_row, N, K, D);
}

void mlp_forward(float* out, float* h1, float* h3, const float* inp, const MlpWeights<float>& w, int D, int F,
                 int N) {
  require(D > 0 && F > 0 && N >= 0, "mlp: need dim > 0, inter_dim > 0, N >= 0 (got {}, {}, {})", D, F, N);
  ScratchBuffer<float> a(static_cast<size_t>(N) * F);
  ffn_forward(out, h1, h3, a.get(), inp, w.w1, w.w2, w.w3, N, D, F);
}

void mlp_backward(const MlpGrads<float>& g, float* dinp, const float* dout, const float* h1, const float* h3,
                  const float* inp, const MlpWeights<float>& w, int D, int F, int N) {
  require(D > 0 && F > 0 && N >= 0, "mlp: need dim > 0, inter_dim > 0, N >= 0 (got {}, {}, {})", D, F, N);
  const size_t n = static_cast<size_t>(N) * F;
  ScratchBuffer<float> s(4 * n);
  ffn_backward(g.w1, g.w2, g.w3, dinp, dout, h1, h3, inp, w.w1, w.w2, w.w3, N, D, F,
               {s.get(), s.get() + n, s.get() + 2 * n, s.get() + 3 * n});
}

}  // namespace dsv3::cuda
