// Stage 04, CUDA: kernels, then launchers, then the entry points (aux_loss.h). Shapes: see aux_loss.h.
// Everything here is deterministic: integer atomics for counts, fixed-order float sums.
#include "04_aux_loss/aux_loss.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarp = kWarpSize;

// ---- kernels ------------------------------------------------------------------------------------

__global__ void count_kernel(int* counts, const int* topk, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&counts[topk[i]], 1);  // integer atomics: order does not matter
}

// One warp per token: ssum[t] = sum_j s_{j,t}.
__global__ void row_sum_kernel(float* ssum, const float* scores, int N, int E) {
  const int t = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= N) return;
  float s = 0.f;
  for (int j = lane; j < E; j += kWarp) s += scores[static_cast<size_t>(t) * E + j];
  s = warp_sum(s);
  if (lane == 0) ssum[t] = s;
}

// One block of kSeqThreads per sequence b: f_{b,i} from a shared histogram of its topk; P_{b,i} from per-warp
// partial sums (warp w takes tokens w, w + kSeqWarps, ...; lanes take experts: coalesced rows), added in warp
// order; then loss_b = alpha * sum_i f_i P_i by a fixed-order tree. Shared: E counts, kSeqWarps x E partials,
// kSeqThreads tree slots.
constexpr int kSeqThreads = 256;
constexpr int kSeqWarps = kSeqThreads / kWarp;
__global__ void seq_loss_kernel(float* loss_b, float* f, const float* scores, const float* ssum, const int* topk,
                                int Tn, int E, int K, float alpha) {
  extern __shared__ int sh[];
  int* cnt = sh;
  float* part = reinterpret_cast<float*>(sh + E);
  float* tree = part + kSeqWarps * E;
  const int b = blockIdx.x, w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = threadIdx.x; i < E; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  const int* tk = topk + static_cast<size_t>(b) * Tn * K;
  for (int i = threadIdx.x; i < Tn * K; i += blockDim.x) atomicAdd(&cnt[tk[i]], 1);
  for (int j0 = 0; j0 < E; j0 += kWarp) {
    const int j = j0 + lane;
    if (j >= E) break;
    float p = 0.f;
    for (int t = w; t < Tn; t += kSeqWarps) {
      const size_t row = static_cast<size_t>(b) * Tn + t;
      p += scores[row * E + j] / ssum[row];
    }
    part[w * E + j] = p;
  }
  __syncthreads();
  float acc = 0.f;
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const float fi = float(E) / (float(K) * Tn) * cnt[i];
    f[static_cast<size_t>(b) * E + i] = fi;
    float p = 0.f;
    for (int v = 0; v < kSeqWarps; ++v) p += part[v * E + i];
    acc += fi * p / Tn;
  }
  tree[threadIdx.x] = acc;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h /= 2) {  // fixed-order tree: deterministic
    if (threadIdx.x < h) tree[threadIdx.x] += tree[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss_b[b] = alpha * tree[0];
}

__global__ void mean_kernel(float* out, const float* v, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += v[i];
  *out = n ? s / n : 0.f;
}

// One warp per token: dscores_{j,t} = (g_j - sum_i g_i s_i / S) / S, g = dloss/B * alpha * f_b / T.
__global__ void seq_loss_backward_kernel(float* dscores, float scale, const float* f, const float* ssum,
                                         const float* scores, int N, int Tn, int E) {
  const int t = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= N) return;
  const float* fb = f + static_cast<size_t>(t / Tn) * E;
  const float* st = scores + static_cast<size_t>(t) * E;
  const float S = ssum[t];
  float gs = 0.f;
  for (int j = lane; j < E; j += kWarp) gs += scale * fb[j] * st[j];
  gs = warp_sum(gs) / S;
  for (int j = lane; j < E; j += kWarp) dscores[static_cast<size_t>(t) * E + j] = (scale * fb[j] - gs) / S;
}

__global__ void bias_update_kernel(float* bias, const int* counts, int E, float mean, float gamma, const int* skip) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= E || (skip && *skip)) return;
  const float err = mean - float(counts[i]);
  bias[i] += gamma * float((err > 0.f) - (err < 0.f));
}

// ---- launchers ----------------------------------------------------------------------------------

void check_dims(int B, int Tn, int E, int K) {
  require(B >= 0 && Tn > 0 && E > 0 && K > 0 && K <= E, "balance loss: bad shape B={} T={} E={} K={}", B, Tn, E, K);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void expert_counts(int* counts, const int* topk, int N, int K, int E) {
  CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int) * E));
  const size_t n = static_cast<size_t>(N) * K;
  if (n == 0) return;
  count_kernel<<<blocks_for(n, 256), 256>>>(counts, topk, static_cast<int>(n));
  CUDA_CHECK_LAST();
}

void seq_balance_loss_forward(float* loss, float* f, float* ssum, const float* scores, const int* topk, int B, int Tn,
                              int E, int K, float alpha) {
  check_dims(B, Tn, E, K);
  const int N = B * Tn;
  if (N > 0) {
    row_sum_kernel<<<blocks_for(N, 8), 8 * kWarp>>>(ssum, scores, N, E);
    CUDA_CHECK_LAST();
  }
  ScratchBuffer<float> loss_b(B);
  if (B > 0) {
    const size_t shmem = sizeof(int) * E + sizeof(float) * (size_t(kSeqWarps) * E + kSeqThreads);
    seq_loss_kernel<<<B, kSeqThreads, shmem>>>(loss_b.get(), f, scores, ssum, topk, Tn, E, K, alpha);
    CUDA_CHECK_LAST();
  }
  mean_kernel<<<1, 1>>>(loss, loss_b.get(), B);
  CUDA_CHECK_LAST();
}

void seq_balance_loss_backward(float* dscores, float dloss, const float* f, const float* ssum, const float* scores,
                               int B, int Tn, int E, float alpha) {
  check_dims(B, Tn, E, 1);
  const int N = B * Tn;
  if (N == 0) return;
  const float scale = dloss / B * alpha / Tn;
  seq_loss_backward_kernel<<<blocks_for(N, 8), 8 * kWarp>>>(dscores, scale, f, ssum, scores, N, Tn, E);
  CUDA_CHECK_LAST();
}

void bias_update(float* bias, const int* counts, int E, int N, int K, float gamma, const int* skip) {
  if (E == 0) return;
  bias_update_kernel<<<blocks_for(E, 128), 128>>>(bias, counts, E, float(double(N) * K / E), gamma, skip);
  CUDA_CHECK_LAST();
}

}  // namespace dsv3::cuda
