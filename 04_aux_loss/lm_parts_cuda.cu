// CUDA versions of the LM training parts (lm_parts.h): kernels, launchers, entry points.
// Token ids live on the device: the kernels flag an out-of-range id in a device word and the entry point
// turns it into a UserError (one 4-byte copy back). The forms that take that word (and leave the loss on the
// device) never synchronise with the host, so a CUDA graph can hold them (stage 07's captured training step).
#include <cmath>

#include "04_aux_loss/adamw.h"
#include "04_aux_loss/lm_parts.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"

namespace dsv3::cuda {
namespace {

// ---- kernels ------------------------------------------------------------------------------------

// One block per token row: out[n] = wte[tokens[n]].
__global__ void embedding_forward_kernel(float* out, int* bad, const int* tokens, const float* wte, int D, int V) {
  const int n = blockIdx.x;
  const int tok = tokens[n];
  if (tok < 0 || tok >= V) {
    if (threadIdx.x == 0) atomicExch(bad, 1);
    return;
  }
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    out[static_cast<size_t>(n) * D + j] = wte[static_cast<size_t>(tok) * D + j];
}

// Deterministic scatter-add without float atomics: one warp per (vocabulary row v, chunk of kEmbCols columns).
// The warp scans the tokens 32 at a time, finds those equal to v with a ballot, and sums their gradient rows in
// token order in registers; then adds the sum to row v. Repeated runs give identical gradients, and the scan
// (V warps x N/32 coalesced loads of a small, cached token array) costs far less than the rows it adds. The scan is
// repeated for every chunk, so a chunk is wide: 16 columns a lane covers D = 512 in one (measured on an H200 at the
// bench shape, V = 8192, N = 16384, D = 512: 8 columns a lane, two chunks, took 311 us a call).
constexpr int kEmbPerLane = 16;
constexpr int kEmbCols = 32 * kEmbPerLane;
__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int* tokens, int N, int D, int V) {
  const int v = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int col0 = blockIdx.y * kEmbCols + lane;
  if (v >= V) return;
  float acc[kEmbPerLane] = {};
  for (int n0 = 0; n0 < N; n0 += 32) {
    const int n = n0 + lane;
    unsigned mask = __ballot_sync(0xffffffffu, n < N && tokens[n] == v);
    while (mask) {
      const int row = n0 + __ffs(mask) - 1;
      mask &= mask - 1;
      const float* src = dout + static_cast<size_t>(row) * D;
#pragma unroll
      for (int i = 0; i < kEmbPerLane; ++i) {
        const int d = col0 + 32 * i;
        if (d < D) acc[i] += src[d];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kEmbPerLane; ++i) {
    const int d = col0 + 32 * i;
    if (d < D) dwte[static_cast<size_t>(v) * D + d] += acc[i];
  }
}

// Cross entropy: one block of kXentThreads per row. Block reductions combine the warps in a fixed order
// (deterministic). red: kXentThreads / 32 floats of shared memory.
constexpr int kXentThreads = 256;
constexpr int kXentWarps = kXentThreads / kWarpSize;
constexpr size_t kXentCacheBytes = 32 * 1024;  // rows up to 8192 floats are read once, kept in shared memory

template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  const int w = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[w] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < kXentWarps; ++i) r = kMax ? fmaxf(r, red[i]) : r + red[i];
  __syncthreads();  // red is reused by the next reduction
  return r;
}

// probs = softmax(logits row); loss_row = logsumexp - logit[target] (0 when ignored). kCache: the row is read
// from global memory once into shared memory (V floats); otherwise it is read three times.
template <bool kCache>
__global__ void softmax_xent_kernel(float* probs, float* loss_row, int* bad, const float* logits, const int* targets,
                                    int N, int V) {
  extern __shared__ float cache[];
  __shared__ float red[kXentWarps];
  const int n = blockIdx.x;
  const float* z = logits + static_cast<size_t>(n) * V;
  const float* zr = kCache ? cache : z;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += kXentThreads) {
    const float x = z[v];
    if (kCache) cache[v] = x;
    mx = fmaxf(mx, x);
  }
  mx = block_reduce<true>(mx, red);  // its barrier also publishes the cache
  float sum = 0.f;
  for (int v = threadIdx.x; v < V; v += kXentThreads) sum += expf(zr[v] - mx);
  sum = block_reduce<false>(sum, red);
  float* p = probs + static_cast<size_t>(n) * V;
  const float inv = 1.f / sum;
  for (int v = threadIdx.x; v < V; v += kXentThreads) p[v] = expf(zr[v] - mx) * inv;
  if (threadIdx.x == 0) {
    const int t = targets[n];
    if (t != kIgnoreTarget && (t < 0 || t >= V)) atomicExch(bad, 1);
    loss_row[n] = (t == kIgnoreTarget || t < 0 || t >= V) ? 0.f : logf(sum) + mx - z[t];
  }
}

// One block of kReduceThreads: the sum of the row losses (when loss_row is given), its mean over the rows with a
// target (when mean is given; 0 without one) and the number of those rows. Each thread sums a fixed strided subset
// in double, then a fixed-order tree: bit-reproducible.
constexpr int kReduceThreads = 1024;
__global__ void reduce_loss_kernel(float* out, float* mean, int* count, const float* loss_row, const int* targets,
                                   int N) {
  __shared__ double s[kReduceThreads];
  __shared__ int c[kReduceThreads];
  double acc = 0.0;
  int cnt = 0;
  for (int n = threadIdx.x; n < N; n += kReduceThreads) {
    if (loss_row) acc += loss_row[n];
    cnt += targets[n] != kIgnoreTarget;
  }
  s[threadIdx.x] = acc;
  c[threadIdx.x] = cnt;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      s[threadIdx.x] += s[threadIdx.x + w];
      c[threadIdx.x] += c[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float total = static_cast<float>(s[0]);
    if (out) *out = total;
    if (mean) *mean = c[0] ? total / c[0] : 0.f;
    *count = c[0];
  }
}

// One block per row: dlogits = scale * (probs - onehot(target)), 0 for an ignored row; scale = dloss / (rows with a
// target), read from the device (*count, reduce_loss_kernel's).
__global__ void xent_backward_kernel(float* dlogits, const float* probs, const int* targets, float dloss,
                                     const int* count, int V) {
  const size_t row = static_cast<size_t>(blockIdx.x) * V;
  const int c = *count;
  const float scale = c ? dloss / c : 0.f;
  const int t = targets[blockIdx.x];
  for (int v = threadIdx.x; v < V; v += blockDim.x)
    dlogits[row + v] = t == kIgnoreTarget ? 0.f : scale * (probs[row + v] - (v == t ? 1.f : 0.f));
}

// One thread per element: adamw.h's rule.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, size_t n, AdamWScalars<float> s) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = adamw_update(p[i], g[i], m[i], v[i], s);
}

// ---- launchers ----------------------------------------------------------------------------------

int read_flag(const DeviceBuffer<int>& flag) { return flag.download()[0]; }

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void embedding_forward(float* out, const int* tokens, const float* wte, int N, int D, int V, int* bad) {
  if (N == 0) return;
  embedding_forward_kernel<<<N, 128>>>(out, bad, tokens, wte, D, V);
  CUDA_CHECK_LAST();
}

void embedding_forward(float* out, const int* tokens, const float* wte, int N, int D, int V) {
  if (N == 0) return;
  DeviceBuffer<int> bad(1);
  bad.zero();
  embedding_forward(out, tokens, wte, N, D, V, bad.get());
  require(read_flag(bad) == 0, "a token id is outside the vocabulary [0, {})", V);
}

void embedding_backward(float* dwte, const float* dout, const int* tokens, int N, int D, int V) {
  if (N == 0) return;
  constexpr int kWarpsPerBlock = 8;
  const dim3 grid(blocks_for(V, kWarpsPerBlock), (D + kEmbCols - 1) / kEmbCols);
  embedding_backward_kernel<<<grid, kWarpsPerBlock * 32>>>(dwte, dout, tokens, N, D, V);
  CUDA_CHECK_LAST();
}

void cross_entropy_forward(float* loss, float* probs, const float* logits, const int* targets, int N, int V, int* bad) {
  if (N == 0) {
    CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float)));
    return;
  }
  ScratchBuffer<float> loss_row(N);
  ScratchBuffer<int> count(1);
  const size_t row_bytes = static_cast<size_t>(V) * sizeof(float);
  if (row_bytes <= kXentCacheBytes)
    softmax_xent_kernel<true><<<N, kXentThreads, row_bytes>>>(probs, loss_row.get(), bad, logits, targets, N, V);
  else
    softmax_xent_kernel<false><<<N, kXentThreads>>>(probs, loss_row.get(), bad, logits, targets, N, V);
  CUDA_CHECK_LAST();
  reduce_loss_kernel<<<1, kReduceThreads>>>(nullptr, loss, count.get(), loss_row.get(), targets, N);
  CUDA_CHECK_LAST();
}

float cross_entropy_forward(float* probs, const float* logits, const int* targets, int N, int V) {
  if (N == 0) return 0.f;
  DeviceBuffer<int> bad(1);
  DeviceBuffer<float> loss(1);
  bad.zero();
  cross_entropy_forward(loss.get(), probs, logits, targets, N, V, bad.get());
  require(read_flag(bad) == 0, "a target id is outside the vocabulary [0, {})", V);
  return loss.download()[0];
}

void cross_entropy_backward(float* dlogits, float dloss, const float* probs, const int* targets, int N, int V) {
  if (N == 0) return;
  ScratchBuffer<int> count(1);
  reduce_loss_kernel<<<1, kReduceThreads>>>(nullptr, nullptr, count.get(), nullptr, targets, N);
  CUDA_CHECK_LAST();
  xent_backward_kernel<<<N, 256>>>(dlogits, probs, targets, dloss, count.get(), V);
  CUDA_CHECK_LAST();
}

void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, int64_t step, const AdamWConfig& c,
                bool decay) {
  require(step >= 1, "AdamW step counts from 1, got {}", step);
  if (n == 0) return;
  adamw_kernel<<<blocks_for(n, 256), 256>>>(param, grad, m, v, n, adamw_scalars<float>(c, step, decay));
  CUDA_CHECK_LAST();
}

}  // namespace dsv3::cuda
