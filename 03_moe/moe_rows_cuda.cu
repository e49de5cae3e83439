// Stage 03, CUDA: the decode forms of the dense MLP and the MoE (moe.h, cuda::mlp_rows / cuda::moe_rows), the GPU
// twins of cpu::mlp_rows / moe_rows. Kernels, then launchers, then the entry points. Shapes: see the legend in moe.h.
// Version 1: mlp_rows / moe_rows (route, up, down, combine; stream-ordered scratch). Version 2, the GPU sampler's
// fused step: mlp_rows_fused / moe_rows_fused (the input norm and the residual add taken in, the combine taken into
// the down projection, the caller's workspace), bitwise version 1's values (tests: CudaMoeRows against the CPU and
// for row invariance; stage 07's CudaSamplerPaths bitwise against version 1 through the whole model).
//
// Every token is routed on its own and every expert product is a fixed-order row-wise dot
// (common/rowwise_cuda.cuh), so a row's output is bitwise independent of how many rows share the launch: what the
// GPU sampler's chunk and batch invariance rest on (stage 07). No dispatch buffers and no host synchronisation: the
// work is laid out by "slots" whose count depends on the shapes only, so the launches can be captured in a graph.
//   routed slot s = t*K + k   (s < NK):  token t through its k-th chosen expert, width F
//   plain slot NK + t         (t < n):   token t through the shared experts (MoE, width Fs) or the MLP (width F)
#include <algorithm>

#include "03_moe/moe.h"
#include "03_moe/moe_route.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/rowwise_cuda.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kWarps = rowwise::kWarpsPerBlock;
constexpr int kThreads = kWarps * kWarpSize;

// The weights of every slot (see the top of the file).
struct Slots {
  const float *w1, *w2, *w3;  // routed experts, stacked: (E, F, D), (E, D, F), (E, F, D); null when NK = 0
  const int* idx;             // (n, K) chosen experts
  int NK, K, F;
  const float *p1, *p2, *p3;  // the plain slots' SwiGLU: (Fp, D), (D, Fp), (Fp, D); null when there are none
  int Fp;
};

// ---- kernels ------------------------------------------------------------------------------------

// One block per token: logits (E) = gate_weight x (a warp per expert), then moe_route.h's rule on one thread:
// idx (n, K) and the routing weights rw (n, K). Dynamic shared memory: 3 E floats.
__global__ void route_rows_kernel(int* idx, float* rw, const float* x, const float* gate_w, const float* gate_b,
                                  int D, int E, int K, int G, int Lg, float route_scale, bool softmax) {
  extern __shared__ float sm[];
  float* logits = sm;
  float* score = sm + E;
  float* sel = sm + 2 * E;
  const int t = blockIdx.x, lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const float* xr = x + static_cast<size_t>(t) * D;
  for (int e = warp; e < E; e += kWarps) {
    const float v = rowwise::warp_dot(gate_w + static_cast<size_t>(e) * D, xr, D, lane);
    if (lane == 0) logits[e] = v;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  moe_route::scores_from_logits(score, logits, E, softmax);
  moe_route::route_token(sel, idx + static_cast<size_t>(t) * K, rw + static_cast<size_t>(t) * K, score, gate_b, E,
                         K, G, Lg, route_scale, !softmax);
}

// a (slots, Fmax) = silu(x W1^T) * (x W3^T) per slot: one warp per (feature f, slot).
__global__ void swiglu_up_kernel(float* a, int Fmax, const float* x, int D, Slots s) {
  const int f = blockIdx.x * kWarps + threadIdx.x / kWarpSize, slot = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  const bool routed = slot < s.NK;
  const int width = routed ? s.F : s.Fp;
  if (f >= width) return;
  const int t = routed ? slot / s.K : slot - s.NK;
  const size_t e = routed ? static_cast<size_t>(s.idx[slot]) : 0;
  const float* w1 = routed ? s.w1 + e * s.F * D : s.p1;
  const float* w3 = routed ? s.w3 + e * s.F * D : s.p3;
  const float* xr = x + static_cast<size_t>(t) * D;
  const float h1 = rowwise::warp_dot(w1 + static_cast<size_t>(f) * D, xr, D, lane);
  const float h3 = rowwise::warp_dot(w3 + static_cast<size_t>(f) * D, xr, D, lane);
  if (lane == 0) a[static_cast<size_t>(slot) * Fmax + f] = h1 / (1.f + expf(-h1)) * h3;
}

// y (slots, D) = a W2^T per slot: one warp per (output d, slot). Row `slot` of y goes to y + slot*D, except that
// the plain slots go to plain_out (n, D) when it is given (the MLP writes its output directly; added to what is
// there with accumulate).
__global__ void swiglu_down_kernel(float* y, float* plain_out, bool accumulate, const float* a, int Fmax, int D,
                                   Slots s) {
  const int d = blockIdx.x * kWarps + threadIdx.x / kWarpSize, slot = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  if (d >= D) return;
  const bool routed = slot < s.NK;
  const int width = routed ? s.F : s.Fp;
  const float* w2 = routed ? s.w2 + static_cast<size_t>(s.idx[slot]) * D * s.F : s.p2;
  const float v = rowwise::warp_dot(w2 + static_cast<size_t>(d) * width, a + static_cast<size_t>(slot) * Fmax, width,
                                    lane);
  if (lane != 0) return;
  if (!routed && plain_out) {
    float* dst = plain_out + static_cast<size_t>(slot - s.NK) * D + d;
    *dst = accumulate ? *dst + v : v;
  } else {
    y[static_cast<size_t>(slot) * D + d] = v;
  }
}

// out (n, D) = y_shared[t] (0 without shared experts) + sum_k rw[t,k] y[t*K + k], in k order (cpu::moe_rows); with
// accumulate, out += that sum (the block's residual add, fused).
__global__ void combine_rows_kernel(float* out, bool accumulate, const float* y, const float* rw, int n, int K, int D,
                                    bool shared) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(n) * D) return;
  const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
  float acc = shared ? y[(static_cast<size_t>(n) * K + t) * D + d] : 0.f;
  for (int k = 0; k < K; ++k) acc = fmaf(rw[static_cast<size_t>(t) * K + k], y[(static_cast<size_t>(t) * K + k) * D + d], acc);
  out[i] = accumulate ? out[i] + acc : acc;
}

// ---- version 2: the fused kernels of the GPU sampler's step ------------------------------------------
// The input norm is taken in (every warp normalises its token on the fly with rmsnorm_rows' factor) and the
// combine is taken into the down projection: route, up, down + combine + residual add (a dense MLP: up, down).
// Each value is bitwise version 1's (the same products, sums and order).

// route_rows_kernel on rmsnorm(x) * g, with moe_route.h's rule spread over warp 0's lanes instead of run by one
// thread (route_token's loops, whose serial chain of shared-memory reads was a fifth of a decode step): the score
// and the biased score of each expert on its lane, each group's top-2 sum on its lane (next_best, as route_token),
// the kept groups on lane 0, then each of the K picks a warp reduction under ranks_before. ranks_before is a strict
// total order, so the warp's pick is the one the sequential scan makes, and the weights are summed on lane 0 in k
// order: idx and rw are bitwise route_token's. The softmax score function (sums in expert order) stays on lane 0.
// Dynamic shared memory: 3 E + G floats.
__global__ void route_rows_normed_kernel(int* idx, float* rw, const float* x, const float* g, float eps,
                                         const float* gate_w, const float* gate_b, int D, int E, int K, int G, int Lg,
                                         float route_scale, bool softmax) {
  extern __shared__ float sm[];
  __shared__ int kept[64];  // kMaxExpertGroups (moe.h)
  float* logits = sm;
  float* score = sm + E;
  float* sel = sm + 2 * E;
  float* gscore = sm + 3 * E;
  const int t = blockIdx.x, lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const float* xr = x + static_cast<size_t>(t) * D;
  const float rstd = rowwise::row_rstd_ilp(xr, D, eps, lane);
  for (int e = warp; e < E; e += kWarps) {
    const float v = warp_sum(rowwise::lane_dot_normed(gate_w + static_cast<size_t>(e) * D, xr, g, rstd, D, lane));
    if (lane == 0) logits[e] = v;
  }
  __syncthreads();
  if (warp != 0) return;
  // 1) scores, and the biased scores that choose
  if (softmax) {
    if (lane == 0) moe_route::scores_from_logits(score, logits, E, true);
    __syncwarp();
  } else {
    for (int e = lane; e < E; e += kWarpSize) score[e] = moe_route::sigmoid_score(logits[e]);
  }
  for (int e = lane; e < E; e += kWarpSize) sel[e] = score[e] + (gate_b ? gate_b[e] : 0.f);
  __syncwarp();
  // 2) group-limited: each group's score is its top-2 sum; the best Lg groups stay, the others' experts get -inf
  if (G > 1) {
    const int Eg = E / G;
    for (int gi = lane; gi < G; gi += kWarpSize) {
      const float* sg = sel + gi * Eg;
      const int a = moe_route::next_best(sg, Eg, 1, 0.f, -1);
      const int c = moe_route::next_best(sg, Eg, 1, sg[a], a);
      gscore[gi] = sg[a] + sg[c];
      kept[gi] = 0;
    }
    __syncwarp();
    if (lane == 0)
      for (int l = 0, prev = -1; l < Lg; ++l) {
        const int gi = moe_route::next_best(gscore, G, 1, prev >= 0 ? gscore[prev] : 0.f, prev);
        kept[gi] = 1;
        prev = gi;
      }
    __syncwarp();
    for (int e = lane; e < E; e += kWarpSize)
      if (!kept[e / Eg]) sel[e] = -INFINITY;
    __syncwarp();
  }
  // 3) the top K in rank order: pick k is the best expert ranking after pick k-1
  int* ti = idx + static_cast<size_t>(t) * K;
  float* tw = rw + static_cast<size_t>(t) * K;
  int prev = -1;
  float prev_v = 0.f;
  for (int k = 0; k < K; ++k) {
    int best = -1;
    float bv = 0.f;
    for (int e = lane; e < E; e += kWarpSize) {
      const float v = sel[e];
      if (prev >= 0 && !moe_route::ranks_before(prev_v, prev, v, e)) continue;
      if (best < 0 || moe_route::ranks_before(v, e, bv, best)) {
        best = e;
        bv = v;
      }
    }
    for (int o = kWarpSize / 2; o > 0; o /= 2) {
      const int ob = __shfl_xor_sync(0xffffffffu, best, o);
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      if (ob >= 0 && (best < 0 || moe_route::ranks_before(ov, ob, bv, best))) {
        best = ob;
        bv = ov;
      }
    }
    if (lane == 0) ti[k] = best;
    prev = best;
    prev_v = bv;
  }
  // 4) the weights: the unbiased scores of the picks, normalised (sigmoid) in k order, times route_scale
  if (lane != 0) return;
  float sum = 0.f;
  for (int k = 0; k < K; ++k) {
    tw[k] = score[ti[k]];
    sum += score[ti[k]];
  }
  const float f = softmax ? route_scale : route_scale / sum;
  for (int k = 0; k < K; ++k) tw[k] *= f;
}

// swiglu_up_kernel on rmsnorm(x) * g.
__global__ void swiglu_up_normed_kernel(float* a, int Fmax, const float* x, const float* g, float eps, int D,
                                        Slots s) {
  const int f = blockIdx.x * kWarps + threadIdx.x / kWarpSize, slot = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  const bool routed = slot < s.NK;
  const int width = routed ? s.F : s.Fp;
  if (f >= width) return;
  const int t = routed ? slot / s.K : slot - s.NK;
  const size_t e = routed ? static_cast<size_t>(s.idx[slot]) : 0;
  const float* w1 = routed ? s.w1 + e * s.F * D : s.p1;
  const float* w3 = routed ? s.w3 + e * s.F * D : s.p3;
  const float* xr = x + static_cast<size_t>(t) * D;
  const float rstd = rowwise::row_rstd_ilp(xr, D, eps, lane);
  const float h1 = warp_sum(rowwise::lane_dot_normed(w1 + static_cast<size_t>(f) * D, xr, g, rstd, D, lane));
  const float h3 = warp_sum(rowwise::lane_dot_normed(w3 + static_cast<size_t>(f) * D, xr, g, rstd, D, lane));
  if (lane == 0) a[static_cast<size_t>(slot) * Fmax + f] = h1 / (1.f + expf(-h1)) * h3;
}

// out (n, D) (=|+=) y_plain[t] + sum_k rw[t,k] y[t*K + k] with the y computed in place: one warp per (output d,
// token t) runs swiglu_down_kernel's dots of the token's slots (the lane sums first, so their loads are in flight
// together), then combine_rows_kernel's sum in k order. plain: the token has a plain slot (shared experts, or the
// dense MLP with no routed slots).
constexpr int kMaxFusedK = 16;
__global__ void swiglu_down_combine_kernel(float* out, bool accumulate, const float* a, int Fmax, const float* rw,
                                           int D, Slots s, bool plain) {
  const int d = blockIdx.x * kWarps + threadIdx.x / kWarpSize, t = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  if (d >= D) return;
  const float ps = plain ? rowwise::lane_dot_ilp(s.p2 + static_cast<size_t>(d) * s.Fp,
                                            a + static_cast<size_t>(s.NK + t) * Fmax, s.Fp, lane)
                         : 0.f;
  float part[kMaxFusedK];
#pragma unroll
  for (int k = 0; k < kMaxFusedK; ++k) {
    part[k] = 0.f;
    if (k < s.K && s.NK > 0) {
      const int slot = t * s.K + k;
      const float* w2 = s.w2 + static_cast<size_t>(s.idx[slot]) * D * s.F + static_cast<size_t>(d) * s.F;
      part[k] = rowwise::lane_dot_ilp(w2, a + static_cast<size_t>(slot) * Fmax, s.F, lane);
    }
  }
  float acc = plain ? warp_sum(ps) : 0.f;
#pragma unroll
  for (int k = 0; k < kMaxFusedK; ++k)
    if (k < s.K && s.NK > 0) acc = fmaf(rw[static_cast<size_t>(t) * s.K + k], warp_sum(part[k]), acc);
  if (lane != 0) return;
  float* dst = out + static_cast<size_t>(t) * D + d;
  *dst = accumulate ? *dst + acc : acc;
}

// ---- launchers ----------------------------------------------------------------------------------

// The SwiGLU of `slots` slots (s.NK routed, then `plain` plain ones); y (slots, D), or the plain rows into plain_out.
void swiglu_slots(float* y, float* plain_out, bool accumulate, const float* x, int D, const Slots& s, int plain) {
  const int slots = s.NK + plain, Fmax = max(s.NK ? s.F : 0, plain ? s.Fp : 0);
  if (slots == 0) return;
  ScratchBuffer<float> a(size_t(slots) * Fmax);
  swiglu_up_kernel<<<dim3(blocks_for(Fmax, kWarps), slots), kThreads>>>(a.get(), Fmax, x, D, s);
  CUDA_CHECK_LAST();
  swiglu_down_kernel<<<dim3(blocks_for(D, kWarps), slots), kThreads>>>(y, plain_out, accumulate, a.get(), Fmax, D,
                                                                       s);
  CUDA_CHECK_LAST();
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void mlp_rows(float* out, const float* x, const MlpWeights<float>& w, const MlpConfig& c, int n, bool accumulate) {
  validate_mlp_call(c, n);
  if (n == 0) return;
  const Slots s{nullptr, nullptr, nullptr, nullptr, 0, 1, 0, w.w1, w.w2, w.w3, c.inter_dim};
  swiglu_slots(nullptr, out, accumulate, x, c.dim, s, n);
}

void moe_rows(float* out, const float* x, const MoeWeights<float>& w, const MoeConfig& c, int n, bool accumulate) {
  validate_moe_call(c, n);
  require(c.n_routed_experts <= 4096, "moe decode: at most 4096 routed experts (shared memory of the router), got {}",
          c.n_routed_experts);
  if (n == 0) return;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, NK = n * K, Fs = c.shared_inter_dim();
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  ScratchBuffer<int> idx{size_t(NK)};
  ScratchBuffer<float> rw{size_t(NK)}, y(size_t(NK + (Fs > 0 ? n : 0)) * D);
  // 1) route every token on its own (moe_route.h: the training router's rule)
  route_rows_kernel<<<n, kThreads, 3 * sizeof(float) * E>>>(idx.get(), rw.get(), x, w.gate_weight, w.gate_bias, D, E,
                                                            K, c.n_expert_groups, c.n_limited_groups, c.route_scale,
                                                            softmax);
  CUDA_CHECK_LAST();
  // 2) every routed slot through its expert, and the shared experts on every token, in one pair of launches
  const Slots s{w.w1, w.w2, w.w3, idx.get(), NK, K, c.moe_inter_dim, w.shared_w1, w.shared_w2, w.shared_w3, Fs};
  swiglu_slots(y.get(), nullptr, false, x, D, s, Fs > 0 ? n : 0);
  // 3) out = shared + sum_k w_k y_k in k order
  combine_rows_kernel<<<blocks_for(size_t(n) * D, 256), 256>>>(out, accumulate, y.get(), rw.get(), n, K, D, Fs > 0);
  CUDA_CHECK_LAST();
}

// ---- version 2 entry points ---------------------------------------------------------------------------

size_t mlp_rows_workspace_floats(const MlpConfig& c, int n) { return size_t(n) * c.inter_dim; }

size_t moe_rows_workspace_floats(const MoeConfig& c, int n) {
  const int K = c.n_activated_experts, Fs = c.shared_inter_dim();
  const int Fmax = std::max(c.moe_inter_dim, Fs);
  return size_t(n) * K * Fmax + (Fs > 0 ? size_t(n) * Fmax : 0) + size_t(n) * K;
}

void mlp_rows_fused(float* x, const float* in_norm, float eps, const MlpWeights<float>& w, const MlpConfig& c, int n,
                    float* workspace) {
  validate_mlp_call(c, n);
  if (n == 0) return;
  const int D = c.dim, F = c.inter_dim;
  const Slots s{nullptr, nullptr, nullptr, nullptr, 0, 1, 0, w.w1, w.w2, w.w3, F};
  swiglu_up_normed_kernel<<<dim3(blocks_for(F, kWarps), n), kThreads>>>(workspace, F, x, in_norm, eps, D, s);
  CUDA_CHECK_LAST();
  swiglu_down_combine_kernel<<<dim3(blocks_for(D, kWarps), n), kThreads>>>(x, true, workspace, F, nullptr, D, s,
                                                                          true);
  CUDA_CHECK_LAST();
}

void moe_rows_fused(float* x, const float* in_norm, float eps, const MoeWeights<float>& w, const MoeConfig& c, int n,
                    float* workspace, int* iworkspace) {
  validate_moe_call(c, n);
  require(c.n_routed_experts <= 4096, "moe decode: at most 4096 routed experts (shared memory of the router), got {}",
          c.n_routed_experts);
  require(c.n_activated_experts <= kMaxFusedK, "moe decode: the fused form combines at most {} experts per token, "
          "got {}", kMaxFusedK, c.n_activated_experts);
  if (n == 0) return;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, NK = n * K, Fs = c.shared_inter_dim();
  const int Fmax = std::max(c.moe_inter_dim, Fs), slots = NK + (Fs > 0 ? n : 0);
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  float* a = workspace;                     // (slots, Fmax)
  float* rw = a + size_t(slots) * Fmax;     // (n, K)
  int* idx = iworkspace;                    // (n, K)
  // 1) route every token on its own, on its normalised row
  route_rows_normed_kernel<<<n, kThreads, sizeof(float) * (3 * E + c.n_expert_groups)>>>(idx, rw, x, in_norm, eps, w.gate_weight,
                                                                   w.gate_bias, D, E, K, c.n_expert_groups,
                                                                   c.n_limited_groups, c.route_scale, softmax);
  CUDA_CHECK_LAST();
  // 2) every slot's up projection; 3) the down projections, combined in k order and added to x
  const Slots s{w.w1, w.w2, w.w3, idx, NK, K, c.moe_inter_dim, w.shared_w1, w.shared_w2, w.shared_w3, Fs};
  swiglu_up_normed_kernel<<<dim3(blocks_for(Fmax, kWarps), slots), kThreads>>>(a, Fmax, x, in_norm, eps, D, s);
  CUDA_CHECK_LAST();
  swiglu_down_combine_kernel<<<dim3(blocks_for(D, kWarps), n), kThreads>>>(x, true, a, Fmax, rw, D, s, Fs > 0);
  CUDA_CHECK_LAST();
}

}  // namespace dsv3::cuda
