// Stage 03, CUDA: kernels, then launchers, then the public entry points (moe.h): the router, the dispatch and
// the grouped cuBLAS expert path (MoeExperts::Grouped), at the config's matmul precision (the router's products
// in fp32 always). The segmented bf16 expert path (MoeExperts::Segmented) is moe_experts_bf16.cu; the kernels
// both use are moe_kernels.cuh. Shapes: see the legend in moe.h.
//
// Dispatch on the device, no host loop over tokens:
//   gate GEMM -> route_kernel (one thread per token: scores, group limit, top-K, weights)
//   -> block_count_kernel -> dispatch_scan_kernel -> place_kernel (a stable counting sort of the slots by
//   expert: rows within an expert in (token, k) order = perm)
//   -> gather rows -> grouped cuBLAS GEMMs over the experts' contiguous slices (after one copy of the E+1
//   offsets to the host) -> combine_kernel (per token, fixed k order: deterministic).
// MoeExperts::Segmented replaces the gather and the grouped GEMMs by segmented bf16 GEMMs that read the
// offsets on the device (no host copy): moe_experts_bf16.cu; MoeExperts::Hopper runs them on wgmma:
// moe_experts_hopper.cu. Expert parallel (MoeConfig::expert_parallel, moe_expert_parallel.h) runs on the grouped
// path: the gathered rows go to their experts' owners through NCCL and come back as eo (ep_experts_* below).
#include <chrono>
#include <cstdint>
#include <numeric>
#include <vector>

#include "03_moe/moe.h"
#include "03_moe/moe_expert_parallel.h"
#include "03_moe/moe_experts_bf16.h"
#include "03_moe/moe_kernels.cuh"
#include "03_moe/moe_route.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

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

// Dispatch = a stable counting sort of the NK slots by expert, in three small kernels over blocks of
// kThreads slots (w = warp of the block, lanes with equal expert found by __match_any_sync):
//   block_count_kernel:  block_counts[b, e] = #slots of block b routed to e
//   dispatch_scan_kernel: counts, offsets = exclusive scan of counts, block_base[b, e] = offsets[e] + #slots
//                         routed to e in blocks before b
//   place_kernel:        row of slot i = block_base[b, e] + #slots to e in earlier warps of b + earlier lanes
// so rows within an expert follow (token, k) order, as on the CPU: integer counts only, deterministic.

// Fills wcnt (kWarpsPerBlock x E, shared) with the per-warp counts of block b's slots; returns this lane's
// expert (-1 past NK) and the mask of lanes of its warp routed to the same expert.
__device__ int warp_counts(int* wcnt, unsigned* same, const int* indices, int NK, int E) {
  const int w = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int j = threadIdx.x; j < kWarpsPerBlock * E; j += blockDim.x) wcnt[j] = 0;
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int e = i < NK ? indices[i] : -1;
  const unsigned m = __match_any_sync(0xffffffffu, e);
  if (e >= 0 && lane == __ffs(m) - 1) wcnt[w * E + e] = __popc(m);
  __syncthreads();
  *same = m;
  return e;
}

__global__ void block_count_kernel(int* block_counts, const int* indices, int NK, int E) {
  extern __shared__ int wcnt[];
  unsigned same;
  warp_counts(wcnt, &same, indices, NK, E);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int c = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) c += wcnt[w * E + e];
    block_counts[static_cast<size_t>(blockIdx.x) * E + e] = c;
  }
}

// One block of kScanThreads: P threads per expert (P * E <= kScanThreads), each over a contiguous range of
// the NB blocks. Shared: part (E x P) range sums, then offsets (E + 1).
constexpr int kScanThreads = 1024;
__global__ void dispatch_scan_kernel(int* counts, int* offsets, int* block_base, const int* block_counts, int NB,
                                     int E, int P) {
  extern __shared__ int sh[];
  int* part = sh;            // E * P
  int* off = sh + E * P;     // E + 1
  const int t = threadIdx.x, e = t / P, p = t % P;
  const bool active = e < E;
  const int per = (NB + P - 1) / P, b0 = min(NB, p * per), b1 = min(NB, b0 + per);
  int acc = 0;
  if (active)
    for (int b = b0; b < b1; ++b) acc += block_counts[static_cast<size_t>(b) * E + e];
  if (active) part[e * P + p] = acc;
  __syncthreads();
  if (active && p == 0) {  // exclusive scan of this expert's P range sums
    int run = 0;
    for (int q = 0; q < P; ++q) {
      const int v = part[e * P + q];
      part[e * P + q] = run;
      run += v;
    }
    counts[e] = run;
    off[e] = run;
  }
  __syncthreads();
  if (t == 0) {  // offsets = exclusive scan of counts (E is small: 256 for V3)
    int run = 0;
    for (int j = 0; j < E; ++j) {
      const int v = off[j];
      off[j] = run;
      offsets[j] = run;
      run += v;
    }
    offsets[E] = run;
  }
  __syncthreads();
  if (!active) return;
  int run = off[e] + part[e * P + p];
  for (int b = b0; b < b1; ++b) {
    const size_t j = static_cast<size_t>(b) * E + e;
    const int v = block_counts[j];
    block_base[j] = run;
    run += v;
  }
}

__global__ void place_kernel(int* perm, int* slot_row, const int* indices, const int* block_base, int NK, int E) {
  extern __shared__ int wcnt[];
  unsigned same;
  const int e = warp_counts(wcnt, &same, indices, NK, E);
  if (e < 0) return;
  const int w = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  int r = block_base[static_cast<size_t>(blockIdx.x) * E + e] + __popc(same & ((1u << lane) - 1u));
  for (int v = 0; v < w; ++v) r += wcnt[v * E + e];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  perm[r] = i;
  slot_row[i] = r;
}

// xp (NK, D): row r = inp row of token perm[r] / K. V = float4 moves 16 bytes per thread (D counted in Vs).
template <typename V>
__global__ void gather_kernel(V* xp, const V* inp, const int* perm, int NK, int K, int D) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(NK) * D) return;
  const size_t r = idx / D, d = idx % D;
  xp[idx] = inp[static_cast<size_t>(perm[r] / K) * D + d];
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

void launch_combine(float* out, const float* rows, const float* weights, const int* slot_row, int N, int K, int D) {
  const size_t n = static_cast<size_t>(N) * D;
  combine_kernel<<<blocks_for(n, kThreads), kThreads>>>(out, rows, weights, slot_row, N, K, D);
  CUDA_CHECK_LAST();
}

// One SwiGLU FFN on `rows` rows (a: (rows, F) scratch): h1 = x W1^T, h3 = x W3^T, y = (silu(h1) h3) W2^T.
void ffn_forward(float* y, float* h1, float* h3, float* a, const float* x, const float* W1, const float* W2,
                 const float* W3, int rows, int D, int F, Matmul math) {
  if (rows == 0) return;
  gemm(Op::N, Op::T, rows, F, D, 1.f, x, W1, 0.f, h1, math);
  gemm(Op::N, Op::T, rows, F, D, 1.f, x, W3, 0.f, h3, math);
  launch_swiglu(a, h1, h3, static_cast<size_t>(rows) * F);
  gemm(Op::N, Op::T, rows, D, F, 1.f, a, W2, 0.f, y, math);
}

// Scratch of one FFN backward, each (rows, F).
struct FfnScratch {
  float *a, *da, *dh1, *dh3;
};

// dW1/dW2/dW3 += ...;  dx (rows, D) = dh1 W1 + dh3 W3.
void ffn_backward(float* dW1, float* dW2, float* dW3, float* dx, const float* dy, const float* h1, const float* h3,
                  const float* x, const float* W1, const float* W2, const float* W3, int rows, int D, int F,
                  const FfnScratch& s, Matmul math) {
  if (rows == 0) return;
  const size_t n = static_cast<size_t>(rows) * F;
  launch_swiglu(s.a, h1, h3, n);
  gemm(Op::N, Op::N, rows, F, D, 1.f, dy, W2, 0.f, s.da, math);   // da = dy W2
  gemm(Op::T, Op::N, D, F, rows, 1.f, dy, s.a, 1.f, dW2, math);   // dW2 += dy^T a
  launch_swiglu_backward(s.dh1, s.dh3, s.da, h1, h3, n);
  gemm(Op::T, Op::N, F, D, rows, 1.f, s.dh1, x, 1.f, dW1, math);
  gemm(Op::T, Op::N, F, D, rows, 1.f, s.dh3, x, 1.f, dW3, math);
  gemm(Op::N, Op::N, rows, D, F, 1.f, s.dh1, W1, 0.f, dx, math);
  gemm(Op::N, Op::N, rows, D, F, 1.f, s.dh3, W3, 1.f, dx, math);
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
                        const std::vector<int>& off, int D, int F, Matmul math) {
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
  g.run(i1, math);
  g.run(i3, math);
  launch_swiglu(a, h1, h3, static_cast<size_t>(off[E]) * F);
  g.run(i2, math);
}

// The backward of routed_ffn_forward for every expert: weight gradients accumulated (+=), dxp overwritten.
void routed_ffn_backward(const MoeGrads<float>& grads, float* dxp, const float* deo, const float* h1, const float* h3,
                         const float* xp, const MoeWeights<float>& w, const std::vector<int>& off, int D, int F,
                         const FfnScratch& s, Matmul math) {
  const int E = static_cast<int>(off.size()) - 1;
  const size_t FD = static_cast<size_t>(F) * D, n = static_cast<size_t>(off[E]) * F;
  std::vector<GemmProblem> da, dw, dx1, dx3;
  for (int e = 0; e < E; ++e) {
    const int rows = off[e + 1] - off[e];
    const size_t o = off[e];
    da.push_back({rows, F, D, deo + o * D, D, w.w2 + e * FD, F, s.da + o * F, F});       // da = dy W2
    dw.push_back({D, F, rows, deo + o * D, D, s.a + o * F, F, grads.w2 + e * FD, F});    // dW2 += dy^T a
    dw.push_back({F, D, rows, s.dh1 + o * F, F, xp + o * D, D, grads.w1 + e * FD, D});   // dW1 += dh1^T x
    dw.push_back({F, D, rows, s.dh3 + o * F, F, xp + o * D, D, grads.w3 + e * FD, D});   // dW3 += dh3^T x
    dx1.push_back({rows, D, F, s.dh1 + o * F, F, w.w1 + e * FD, D, dxp + o * D, D});     // dx = dh1 W1
    dx3.push_back({rows, D, F, s.dh3 + o * F, F, w.w3 + e * FD, D, dxp + o * D, D});     // dx += dh3 W3
  }
  GroupedGemms g;
  const int ida = g.add(Op::N, Op::N, 1.f, 0.f, da), idx1 = g.add(Op::N, Op::N, 1.f, 0.f, dx1),
            idx3 = g.add(Op::N, Op::N, 1.f, 1.f, dx3);
  g.upload();
  launch_swiglu(s.a, h1, h3, n);
  g.run(ida, math);
  launch_swiglu_backward(s.dh1, s.dh3, s.da, h1, h3, n);
  // The weight gradients (small outputs, long inner dimension = the expert's token count) run as one cuBLAS
  // GEMM per expert, four streams side by side, overlapping the input-gradient products below: cuBLAS picks
  // split-K kernels for that shape, which its grouped call does not (measured on an H100, small preset: 6.5 ms
  // per layer grouped). The default stream joins them when `side` goes out of scope, after the input gradients.
  ConcurrentGemms side;
  side.run(Op::T, Op::N, 1.f, 1.f, dw, math);
  g.run(idx1, math);
  g.run(idx3, math);
}

// counts, offsets, perm and slot_row of MoeSaved from its indices (the three kernels above).
void dispatch(const MoeSaved<float>& s, int NK, int E) {
  require(E <= kScanThreads, "moe (CUDA): at most {} routed experts, got {}", kScanThreads, E);
  const int NB = blocks_for(NK, kThreads);
  int P = 1;
  while (2 * P * E <= kScanThreads) P *= 2;
  ScratchBuffer<int> block_counts(static_cast<size_t>(NB) * E), block_base(static_cast<size_t>(NB) * E);
  const size_t wsh = static_cast<size_t>(kWarpsPerBlock) * E * sizeof(int);
  block_count_kernel<<<NB, kThreads, wsh>>>(block_counts.get(), s.indices, NK, E);
  CUDA_CHECK_LAST();
  dispatch_scan_kernel<<<1, kScanThreads, (static_cast<size_t>(E) * P + E + 1) * sizeof(int)>>>(
      s.counts, s.offsets, block_base.get(), block_counts.get(), NB, E, P);
  CUDA_CHECK_LAST();
  place_kernel<<<NB, kThreads, wsh>>>(s.perm, s.slot_row, s.indices, block_base.get(), NK, E);
  CUDA_CHECK_LAST();
}

void launch_gather(float* xp, const float* inp, const int* perm, int NK, int K, int D) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(float4) == 0; };
  if (D % 4 == 0 && aligned(xp) && aligned(inp)) {
    const size_t n = static_cast<size_t>(NK) * (D / 4);
    gather_kernel<<<blocks_for(n, kThreads), kThreads>>>(reinterpret_cast<float4*>(xp),
                                                         reinterpret_cast<const float4*>(inp), perm, NK, K, D / 4);
  } else {
    const size_t n = static_cast<size_t>(NK) * D;
    gather_kernel<<<blocks_for(n, kThreads), kThreads>>>(xp, inp, perm, NK, K, D);
  }
  CUDA_CHECK_LAST();
}

// ---- expert parallel (moe_expert_parallel.h) on device buffers ---------------------------------------------

// out row order[i] = in row i (D floats).
__global__ void scatter_rows_kernel(float* out, const float* in, const int* order, int rows, int D) {
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(rows) * D) return;
  const size_t r = idx / D, d = idx % D;
  out[static_cast<size_t>(order[r]) * D + d] = in[idx];
}

// ExpertParallel::timing: the device's time since the last lap, added to the exchange or the compute total.
class EpTimer {
 public:
  explicit EpTimer(ExpertParallel& ep) : ep_(ep) {
    if (!ep_.timing) return;
    CUDA_CHECK(cudaDeviceSynchronize());
    t_ = std::chrono::steady_clock::now();
  }
  void lap(bool exchange) {
    if (!ep_.timing) return;
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto now = std::chrono::steady_clock::now();
    (exchange ? ep_.times.exchange_ms : ep_.times.compute_ms) +=
        std::chrono::duration<double, std::milli>(now - t_).count();
    t_ = now;
  }

 private:
  ExpertParallel& ep_;
  std::chrono::steady_clock::time_point t_;
};

struct DeviceEpState {
  ExpertParallel::Plan plan;
  DeviceBuffer<int> order;         // plan.local_order
  DeviceBuffer<float> xg, h1, h3;  // the received rows grouped by local expert, the experts' hiddens
};

// b holds at least n elements: reallocated only to grow (a cudaFree waits for the device), so that after the first
// steps the exchange allocates nothing.
template <typename T>
void hold(DeviceBuffer<T>& b, size_t n) {
  if (b.size() < n) b = DeviceBuffer<T>(n + n / 4);
}

// This rank's experts as a MoeWeights / MoeGrads of count experts (the stacked tensors offset to the shard).
template <typename W>
W shard_of(W w, int first, size_t FD) {
  w.w1 += first * FD;
  w.w2 += first * FD;
  w.w3 += first * FD;
  return w;
}

// eo (NK, D, dispatch order) = each slot's expert on xp's row, run on the expert's owner rank.
void ep_experts_forward(float* eo, const float* xp, const MoeWeights<float>& w,
                        const MoeConfig& c, const std::vector<int>& off) {
  ExpertParallel& ep = *c.expert_parallel;
  Communicator& comm = ep.comm();
  require(comm.on_device(), "moe (CUDA): expert parallel over {} needs NCCL (device buffers)", comm.describe());
  const int D = c.dim, F = c.moe_inter_dim;
  const ExpertShard mine = ep.shard(c.n_routed_experts);
  DeviceEpState& st = ep.state<DeviceEpState>(w.gate_weight);
  st.plan = ep.plan(off.data(), c.n_routed_experts);
  const auto& p = st.plan;
  const int G = static_cast<int>(p.local_order.size());
  ScratchBuffer<float> xr(static_cast<size_t>(G) * D), yg(static_cast<size_t>(G) * D), a(static_cast<size_t>(G) * F);
  EpTimer timer(ep);
  comm.all_to_all(xp, p.send_rows.data(), xr.get(), p.recv_rows.data(), D);
  timer.lap(true);
  hold(st.order, p.local_order.size());
  hold(st.xg, static_cast<size_t>(G) * D);
  hold(st.h1, static_cast<size_t>(G) * F);
  hold(st.h3, static_cast<size_t>(G) * F);
  if (G > 0) {
    CUDA_CHECK(cudaMemcpyAsync(st.order.get(), p.local_order.data(), p.local_order.size() * sizeof(int),
                               cudaMemcpyHostToDevice, cudaStreamPerThread));
    launch_gather(st.xg.get(), xr.get(), st.order.get(), G, 1, D);
    routed_ffn_forward(yg.get(), st.h1.get(), st.h3.get(), a.get(), st.xg.get(),
                       shard_of(w, mine.first, static_cast<size_t>(F) * D), p.local_offsets, D, F, c.matmul);
    const size_t n = static_cast<size_t>(G) * D;
    scatter_rows_kernel<<<blocks_for(n, kThreads), kThreads>>>(xr.get(), yg.get(), st.order.get(), G, D);
    CUDA_CHECK_LAST();
  }
  timer.lap(false);
  comm.all_to_all(xr.get(), p.recv_rows.data(), eo, p.send_rows.data(), D);
  timer.lap(true);
  if (ep.timing) ++ep.times.forwards;
}

// dxp (NK, D, dispatch order) from deo (the same order) through the owners' experts; their gradients +=.
void ep_experts_backward(const MoeGrads<float>& g, float* dxp, const float* deo, const MoeWeights<float>& w,
                         const MoeConfig& c) {
  ExpertParallel& ep = *c.expert_parallel;
  Communicator& comm = ep.comm();
  const int D = c.dim, F = c.moe_inter_dim;
  const ExpertShard mine = ep.shard(c.n_routed_experts);
  const DeviceEpState& st = ep.state<DeviceEpState>(w.gate_weight);
  const auto& p = st.plan;
  const int G = static_cast<int>(p.local_order.size());
  const size_t gf = static_cast<size_t>(G) * F;
  ScratchBuffer<float> dr(static_cast<size_t>(G) * D), dyg(static_cast<size_t>(G) * D), dxg(static_cast<size_t>(G) * D),
      scratch(4 * gf);
  EpTimer timer(ep);
  comm.all_to_all(deo, p.send_rows.data(), dr.get(), p.recv_rows.data(), D);
  timer.lap(true);
  if (G > 0) {
    launch_gather(dyg.get(), dr.get(), st.order.get(), G, 1, D);
    const FfnScratch fs{scratch.get(), scratch.get() + gf, scratch.get() + 2 * gf, scratch.get() + 3 * gf};
    const size_t FD = static_cast<size_t>(F) * D;
    routed_ffn_backward(shard_of(g, mine.first, FD), dxg.get(), dyg.get(), st.h1.get(), st.h3.get(), st.xg.get(),
                        shard_of(w, mine.first, FD), p.local_offsets, D, F, fs, c.matmul);
    const size_t n = static_cast<size_t>(G) * D;
    scatter_rows_kernel<<<blocks_for(n, kThreads), kThreads>>>(dr.get(), dxg.get(), st.order.get(), G, D);
    CUDA_CHECK_LAST();
  }
  timer.lap(false);
  comm.all_to_all(dr.get(), p.recv_rows.data(), dxp, p.send_rows.data(), D);
  timer.lap(true);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void moe_forward(float* out, const MoeSaved<float>& s, const float* inp, const MoeWeights<float>& w,
                 const MoeConfig& c, int N) {
  validate_moe_call(c, N);
  require(!c.expert_parallel || c.experts == MoeExperts::Grouped, "moe (CUDA): expert parallel runs on the grouped "
          "expert path (MoeExperts::Grouped)");
  if (N == 0) return;
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim(), NK = N * K;
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  // 1) gate logits and per-token routing
  ScratchBuffer<float> logits(static_cast<size_t>(N) * E);
  gemm(Op::N, Op::T, N, E, D, 1.f, inp, w.gate_weight, 0.f, logits.get(), Matmul::FP32);  // router: fp32
  route_kernel<<<blocks_for(N, kThreads), kThreads>>>(s.scores, s.sel, s.indices, s.weights, logits.get(),
                                                      w.gate_bias, N, E, K, c.n_expert_groups,
                                                      c.n_limited_groups, c.route_scale, softmax);
  CUDA_CHECK_LAST();
  // 2) counts, offsets, permutation
  dispatch(s, NK, E);
  // 3) gathered tokens through each expert's FFN, one contiguous slice per expert
  const bool hopper = c.experts == MoeExperts::Hopper, hopper_shared = hopper && hopper_moe_options().shared_on_wgmma;
  if (hopper) moe_experts_forward_hopper(out, s, inp, w, c, N);  // routed, and shared experts: out = shared(x)
  if (hopper_shared) {
    launch_combine(out, s.eo, s.weights, s.slot_row, N, K, D);
    return;
  }
  const bool seg = c.experts != MoeExperts::Grouped;
  ScratchBuffer<float> xp(seg ? 0 : static_cast<size_t>(NK) * D),
      a(std::max(seg ? 0 : static_cast<size_t>(NK) * F, static_cast<size_t>(N) * Fs));
  if (seg && !hopper) {
    routed_experts_forward_bf16(s, inp, w, c, N);
  } else if (!seg && c.expert_parallel) {
    launch_gather(xp.get(), inp, s.perm, NK, K, D);
    ep_experts_forward(s.eo, xp.get(), w, c, host_offsets(s.offsets, E));
  } else if (!seg) {
    launch_gather(xp.get(), inp, s.perm, NK, K, D);
    routed_ffn_forward(s.eo, s.h1, s.h3, a.get(), xp.get(), w, host_offsets(s.offsets, E), D, F, c.matmul);
  }
  // 4) out = shared(x) + sum_k w_k eo_k
  if (Fs > 0)
    ffn_forward(out, s.sh1, s.sh3, a.get(), inp, w.shared_w1, w.shared_w2, w.shared_w3, N, D, Fs, c.matmul);
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
  const bool seg = c.experts != MoeExperts::Grouped, hopper = c.experts == MoeExperts::Hopper;
  const bool hopper_shared = hopper && hopper_moe_options().shared_on_wgmma;
  const size_t scratch_rows =
      hopper_shared ? 0 : std::max(seg ? 0 : static_cast<size_t>(NK) * F, static_cast<size_t>(N) * Fs);
  ScratchBuffer<float> a(scratch_rows), da(scratch_rows), dh1(scratch_rows), dh3(scratch_rows);
  const FfnScratch fs{a.get(), da.get(), dh1.get(), dh3.get()};
  // 1) shared experts: dinp = their input gradient (overwrite); on the Hopper path, inside step 2
  if (!hopper_shared && Fs > 0)
    ffn_backward(g.shared_w1, g.shared_w2, g.shared_w3, dinp, dout, s.sh1, s.sh3, inp, w.shared_w1, w.shared_w2,
                 w.shared_w3, N, D, Fs, fs, c.matmul);
  else if (!hopper_shared)
    CUDA_CHECK(cudaMemsetAsync(dinp, 0, static_cast<size_t>(N) * D * sizeof(float)));
  // 2) combine backward and each routed expert on its slice: dw (N, K), dxp (NK, D) in dispatch order
  ScratchBuffer<float> dw(NK), dxp(static_cast<size_t>(NK) * D);
  if (hopper) {
    moe_experts_backward_hopper(g, dinp, dw.get(), dxp.get(), dout, s, inp, w, c, N);
  } else if (seg) {
    routed_experts_backward_bf16(g, dw.get(), dxp.get(), dout, s, inp, w, c, N);
  } else {
    ScratchBuffer<float> deo(static_cast<size_t>(NK) * D), xp(static_cast<size_t>(NK) * D);
    combine_backward_kernel<<<blocks_for(NK, kWarpsPerBlock), kThreads>>>(dw.get(), deo.get(), dout, s.eo,
                                                                          s.weights, s.slot_row, NK, K, D);
    CUDA_CHECK_LAST();
    if (c.expert_parallel) {
      ep_experts_backward(g, dxp.get(), deo.get(), w, c);
    } else {
      launch_gather(xp.get(), inp, s.perm, NK, K, D);
      routed_ffn_backward(g, dxp.get(), deo.get(), s.h1, s.h3, xp.get(), w, host_offsets(s.offsets, E), D, F, fs,
                          c.matmul);  // joins its side streams before deo and xp are freed
    }
  }
  // 3) router: dlogits, then dWg += dlogits^T x and dinp += dlogits Wg
  ScratchBuffer<float> dlogits(static_cast<size_t>(N) * E);
  gate_backward_kernel<<<blocks_for(N, kThreads), kThreads>>>(dlogits.get(), dw.get(), dscores_extra, s.indices,
                                                              s.weights, s.scores, N, E, K, c.route_scale, softmax);
  CUDA_CHECK_LAST();
  gemm(Op::T, Op::N, E, D, N, 1.f, dlogits.get(), inp, 1.f, g.gate_weight, Matmul::FP32);
  gemm(Op::N, Op::N, N, D, E, 1.f, dlogits.get(), w.gate_weight, 1.f, dinp, Matmul::FP32);
  // 4) experts' input gradients back to their tokens, k in order
  launch_combine(dinp, dxp.get(), nullptr, s.slot_row, N, K, D);
}

void mlp_forward(float* out, float* h1, float* h3, const float* inp, const MlpWeights<float>& w, const MlpConfig& c,
                 int N) {
  validate_mlp_call(c, N);
  ScratchBuffer<float> a(static_cast<size_t>(N) * c.inter_dim);
  ffn_forward(out, h1, h3, a.get(), inp, w.w1, w.w2, w.w3, N, c.dim, c.inter_dim, c.matmul);
}

void mlp_backward(const MlpGrads<float>& g, float* dinp, const float* dout, const float* h1, const float* h3,
                  const float* inp, const MlpWeights<float>& w, const MlpConfig& c, int N) {
  validate_mlp_call(c, N);
  const size_t n = static_cast<size_t>(N) * c.inter_dim;
  ScratchBuffer<float> s(4 * n);
  ffn_backward(g.w1, g.w2, g.w3, dinp, dout, h1, h3, inp, w.w1, w.w2, w.w3, N, c.dim, c.inter_dim,
               {s.get(), s.get() + n, s.get() + 2 * n, s.get() + 3 * n}, c.matmul);
}

}  // namespace dsv3::cuda
