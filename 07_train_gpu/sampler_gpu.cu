// Stage 07, the GPU sampler (sampler_gpu.h): the model's decode step on the device, captured as CUDA graphs.
// Kernels, then the decoder. Shapes: see the legend in sampler_gpu.h; R = B*n rows, row r = b*n + t.
// Paths (GpuDecodePath): V1 = forward_v1 / draft_forward_v1 (kept as they were), Fused and Full = forward_v2 /
// draft_forward_v2 (version 2 of the blocks, fewer launches, no allocation inside a graph); Full adds the greedy
// choice on the device and the draft folded into the verify (fold_forward).
#include "07_train_gpu/sampler_gpu.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <functional>

#include "02_mla/mla_device.h"
#include "05_mtp/block.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/param_list_device.h"
#include "common/rowwise_cuda.cuh"
#include "common/timer.h"

namespace dsv3 {
namespace {

constexpr int kThreads = 256;

// ---- kernels ------------------------------------------------------------------------------------

// x (R, D) = embed[tokens[r]]. The ids were checked on the host.
__global__ void embed_rows_kernel(float* x, const float* embed, const int* tokens, int R, int D) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(R) * D) return;
  const int r = static_cast<int>(i / D), d = static_cast<int>(i % D);
  x[i] = embed[static_cast<size_t>(tokens[r]) * D + d];
}

// hidden (B, Lmax, D) at positions *pos0 + t <- z (R, D): what the MTP module reads later.
__global__ void store_hidden_kernel(float* hidden, const float* z, const int* pos0, int n, int R, int D, int Lmax) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(R) * D) return;
  const int r = static_cast<int>(i / D), d = static_cast<int>(i % D), b = r / n, p = *pos0 + r % n;
  if (p < Lmax) hidden[(static_cast<size_t>(b) * Lmax + p) * D + d] = z[i];
}

// The MTP input of positions j0 + r (r < m, batch 1): cat (m, 2D) = [Emb(tokens[r]) ; z_{j0 + r}], normalised after.
__global__ void mtp_gather_kernel(float* cat, const float* embed, const float* hidden, const int* j0,
                                  const int* tokens, int m, int D) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(m) * 2 * D) return;
  const int r = static_cast<int>(i / (2 * D)), k = static_cast<int>(i % (2 * D));
  cat[i] = k < D ? embed[static_cast<size_t>(tokens[r]) * D + k] : hidden[static_cast<size_t>(*j0 + r) * D + k - D];
}

// out = argmax of v (V), the lowest index on ties (the CPU's argmax); one block.
__global__ void argmax_kernel(int* out, const float* v, int V) {
  __shared__ float bv[kThreads];
  __shared__ int bi[kThreads];
  float best = -INFINITY;
  int at = -1;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    if (at < 0 || v[i] > best) {
      best = v[i];
      at = i;
    }
  bv[threadIdx.x] = best;
  bi[threadIdx.x] = at;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      const float ov = bv[threadIdx.x + s];
      const int oi = bi[threadIdx.x + s];
      if (oi >= 0 && (bi[threadIdx.x] < 0 || ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x]))) {
        bv[threadIdx.x] = ov;
        bi[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = bi[0] < 0 ? 0 : bi[0];
}

// ---- version 2 kernels (paths Fused and Full) ----

// z (R, D) = rmsnorm(x) * g (rmsnorm_rows' values) and, at positions *pos0 + t, hidden (B, Lmax, D) <- z: the final
// norm and store_hidden_kernel in one launch, a warp per row.
__global__ void final_norm_store_kernel(float* z, float* hidden, const float* x, const float* g, const int* pos0,
                                        int n, int R, int D, int Lmax, float eps) {
  const int row = blockIdx.x * cuda::rowwise::kWarpsPerBlock + threadIdx.x / cuda::kWarpSize;
  const int lane = threadIdx.x % cuda::kWarpSize;
  if (row >= R) return;
  const float* xr = x + static_cast<size_t>(row) * D;
  const float rstd = cuda::rowwise::row_rstd_ilp(xr, D, eps, lane);
  const int b = row / n, p = *pos0 + row % n;
  float* zr = z + static_cast<size_t>(row) * D;
  float* hr = p < Lmax ? hidden + (static_cast<size_t>(b) * Lmax + p) * D : nullptr;
  for (int j = lane; j < D; j += cuda::kWarpSize) {
    const float v = xr[j] * rstd * g[j];
    zr[j] = v;
    if (hr) hr[j] = v;
  }
}

// The MTP input of positions *j0 + r (r < m, batch 1), normalised: cat (m, 2D) = [enorm(Emb(tokens[r])) ;
// hnorm(z_{*j0 + r})] (mtp_gather_kernel and its two rmsnorm_rows, bitwise), a warp per row.
__global__ void mtp_input_kernel(float* cat, const float* embed, const float* hidden, const int* j0, const int* tokens,
                                 const float* enorm, const float* hnorm, int m, int D, float eps) {
  const int r = blockIdx.x * cuda::rowwise::kWarpsPerBlock + threadIdx.x / cuda::kWarpSize;
  const int lane = threadIdx.x % cuda::kWarpSize;
  if (r >= m) return;
  const float* e = embed + static_cast<size_t>(tokens[r]) * D;
  const float* h = hidden + static_cast<size_t>(*j0 + r) * D;
  const float re = cuda::rowwise::row_rstd_ilp(e, D, eps, lane), rh = cuda::rowwise::row_rstd_ilp(h, D, eps, lane);
  float* out = cat + static_cast<size_t>(r) * 2 * D;
  for (int k = lane; k < D; k += cuda::kWarpSize) {
    out[k] = e[k] * re * enorm[k];
    out[D + k] = h[k] * rh * hnorm[k];
  }
}

// The greedy choice of rows: i = b*last + i' picks row b*n + n - last + i' of logits (B*n, V): tok[i] = its argmax,
// the lowest id on ties (sample_token's greedy rule, over finite logits), bad[i] = the lowest id of a non-finite
// logit, or -1 (the host then reports it as sample_token does). One block per row.
__global__ void greedy_rows_kernel(int* tok, int* bad, const float* logits, int n, int last, int V) {
  __shared__ float bv[kThreads];
  __shared__ int bi[kThreads], bn[kThreads];
  const int i = blockIdx.x, b = i / last, t = n - last + i % last;
  const float* v = logits + (static_cast<size_t>(b) * n + t) * V;
  float best = -INFINITY;
  int at = -1, nonfinite = INT_MAX;
  for (int k = threadIdx.x; k < V; k += blockDim.x) {
    const float x = v[k];
    if (!isfinite(x)) {
      nonfinite = min(nonfinite, k);
    } else if (at < 0 || x > best) {
      best = x;
      at = k;
    }
  }
  bv[threadIdx.x] = best;
  bi[threadIdx.x] = at;
  bn[threadIdx.x] = nonfinite;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      const float ov = bv[threadIdx.x + s];
      const int oi = bi[threadIdx.x + s];
      if (oi >= 0 && (bi[threadIdx.x] < 0 || ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x]))) {
        bv[threadIdx.x] = ov;
        bi[threadIdx.x] = oi;
      }
      bn[threadIdx.x] = min(bn[threadIdx.x], bn[threadIdx.x + s]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    tok[i] = bi[0] < 0 ? 0 : bi[0];
    bad[i] = bn[0] == INT_MAX ? -1 : bn[0];
  }
}

// The folded draft's input (path Full, greedy speculative, batch 1): MTP positions pos and pos + 1 read the verify's
// greedy tokens x (after t) and y (after d): mtp_in = [pos, x, y].
__global__ void fold_input_kernel(int* mtp_in, const int* main_in, const int* greedy) {
  mtp_in[0] = main_in[0];
  mtp_in[1] = greedy[0];
  mtp_in[2] = greedy[1];
}

// Host memory the device copies into and out of asynchronously (and graph memcpy nodes can use).
template <typename T>
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t n) : n_(n) {
    if (n_) CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p_), n_ * sizeof(T)));
  }
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  T* get() { return p_; }
  const T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// An instantiated CUDA graph.
struct GraphExec {
  cudaGraphExec_t exec = nullptr;
  GraphExec() = default;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec() {
    if (exec) cudaGraphExecDestroy(exec);
  }
};

// Captures body() on the per-thread default stream (where every launch without a stream goes) into g.
void capture(GraphExec& g, const std::function<void()>& body) {
  const cudaStream_t s = cudaStreamPerThread;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    body();
  } catch (...) {
    (void)cudaStreamEndCapture(s, &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  const cudaError_t e = cudaGraphInstantiate(&g.exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_CHECK(e);
}

}  // namespace

// ---- the decoder --------------------------------------------------------------------------------

struct GpuDecoder::Impl {
  const ModelConfig cfg;
  const int B, Lmax, V, D;
  const bool graphs;
  const GpuDecodePath path;
  MlaDeviceRope rope;
  DeviceBuffer<float> embed, norm, head;
  std::vector<BlockTensors<DeviceBuffer<float>>> layers;
  std::vector<BlockWeights<float>> lw;
  std::vector<BlockConfig> lc;
  std::vector<MtpModuleTensors<DeviceBuffer<float>>> mtp;  // 0 or 1: MTP module 1
  MtpConfig mc;
  // the latent caches: per main layer, and MTP module 1's (batch 1)
  std::vector<DeviceBuffer<float>> ckv, kpe;
  DeviceBuffer<float> mtp_ckv, mtp_kpe;
  DeviceBuffer<float> hidden;  // (B, Lmax, D) z = final_norm(h_L) of every fed position
  // step inputs: main_in = [pos, tokens (B, n)], mtp_in = [j0, tokens (m)]; device copies and pinned staging;
  // piece_pos: the positions of a long MTP catch-up's pieces (version 2)
  DeviceBuffer<int> main_in, mtp_in, piece_pos;
  PinnedBuffer<int> main_in_h, mtp_in_h, piece_pos_h;
  DeviceBuffer<float> x, z, logits, cat, draft_logits;
  DeviceBuffer<int> draft_tok;
  PinnedBuffer<float> logits_h;  // (B, last, V), last <= kPrefillPiece
  PinnedBuffer<int> draft_h;
  // version 2: the blocks' workspace (one serves every layer in turn; rows for a piece of the batch or of the MTP)
  DeviceBuffer<float> ws;
  DeviceBuffer<int> iws;
  // path Full: ints = [greedy tokens (B, last) | their non-finite flags (B, last)], and at kDraftAt [draft tokens (2) |
  // flags (2)] of the draft and the folded draft; their pinned copy
  const int kDraftAt;
  DeviceBuffer<int> ints;
  PinnedBuffer<int> ints_h;
  bool device_greedy = false;
  // graphs: feed n (1, 2) x mode (0 logits, 1 greedy tokens, 2 greedy tokens + the folded draft); draft m (1, 2)
  GraphExec feed_graph[3][3], draft_graph[3];
  int captures = 0;
  Timing timing;
  // host state (as the CPU Decoder's)
  int pos = 0, mtp_pos = 0;
  std::vector<int> tokens, mtp_tokens;  // (Lmax) sequence 0's fed tokens; the token each MTP position embedded
  std::vector<int> draft_at;            // (Lmax) the draft MTP position j gave (its argmax), -1 when not known

  Impl(const Model<float>& m, int batch, bool use_graphs, GpuDecodePath p)
      : cfg(m.config()), B(batch), Lmax(m.config().max_position_embeddings), V(m.config().vocab_size),
        D(m.config().hidden_size), graphs(use_graphs), path(p), rope(m.rope()), embed(m.embed()),
        norm(m.final_norm()), head(m.head()), mc(m.mtp_config()), hidden(size_t(batch) * Lmax * D),
        main_in(1 + size_t(batch) * kPrefillPiece), mtp_in(1 + size_t(Lmax)), piece_pos(size_t(Lmax)),
        main_in_h(1 + size_t(batch) * kPrefillPiece), mtp_in_h(1 + size_t(Lmax)), piece_pos_h(size_t(Lmax)),
        x(size_t(batch) * kPrefillPiece * D), z(size_t(batch) * kPrefillPiece * D),
        logits(size_t(batch) * kPrefillPiece * V), cat(size_t(Lmax) * 2 * D), draft_logits(2 * size_t(V)),
        draft_tok(1), logits_h(size_t(batch) * kPrefillPiece * V), draft_h(1),
        kDraftAt(2 * batch * kPrefillPiece), ints(size_t(kDraftAt) + 4), ints_h(size_t(kDraftAt) + 4),
        tokens(size_t(Lmax)), mtp_tokens(size_t(Lmax)), draft_at(size_t(Lmax), -1) {
    require(batch >= 1, "gpu decoder: batch must be >= 1, got {}", batch);
    require(Lmax >= 1 && Lmax <= m.rope().positions, "gpu decoder: max_position_embeddings {} exceeds the RoPE table "
            "({} positions)", Lmax, m.rope().positions);
    cuda::BlockDecodeWorkspaceSize wsize;
    const int rows = std::max(batch, 1) * kPrefillPiece;  // the MTP runs in pieces of kPrefillPiece too
    auto grow = [&](const BlockConfig& bc) {
      const cuda::BlockDecodeWorkspaceSize s = cuda::block_decode_workspace_size(bc, rows);
      wsize.floats = std::max(wsize.floats, s.floats);
      wsize.ints = std::max(wsize.ints, s.ints);
    };
    for (int l = 0; l < cfg.num_hidden_layers; ++l) {
      layers.push_back(param_list::upload(m.layer(l)));
      lc.push_back(m.block_config(l));
      const BlockConfig& bc = lc.back();
      ckv.emplace_back(size_t(B) * Lmax * bc.attn.kv_lora_rank);
      kpe.emplace_back(size_t(B) * Lmax * bc.attn.qk_rope_head_dim);
      grow(bc);
    }
    for (auto& l : layers) lw.push_back(l.weights());
    if (cfg.num_nextn_predict_layers > 0) {
      mtp.push_back(param_list::upload(m.mtp_module(0)));
      mtp_ckv = DeviceBuffer<float>(size_t(Lmax) * mc.block.attn.kv_lora_rank);
      mtp_kpe = DeviceBuffer<float>(size_t(Lmax) * mc.block.attn.qk_rope_head_dim);
      grow(mc.block);
    }
    if (path != GpuDecodePath::V1) {
      ws = DeviceBuffer<float>(wsize.floats);
      iws = DeviceBuffer<int>(std::max<size_t>(wsize.ints, 1));
    }
    // lc's block configs run at fp32 whatever the checkpoint trained with: the decode kernels are fp32 only
  }

  MlaCache<float> cache(int l) { return {ckv[l].get(), kpe[l].get(), Lmax}; }

  // ---- path V1 (as issue 19's first version) ----

  // 1) embedding, 2) the blocks, 3) final norm (z kept for MTP) and head, 4) the logits of each sequence's last
  // `last` tokens to the host (B, last, V): n tokens of each sequence, at the device position main_in[0].
  void forward_v1(int n, int last) {
    const int R = B * n;
    const size_t RD = size_t(R) * D;
    const int* pos0 = main_in.get();
    embed_rows_kernel<<<cuda::blocks_for(RD, kThreads), kThreads>>>(x.get(), embed.get(), main_in.get() + 1, R, D);
    CUDA_CHECK_LAST();
    for (size_t l = 0; l < lw.size(); ++l)
      cuda::block_decode(x.get(), cache(int(l)), lw[l], lc[l], B, n, pos0, rope.view());
    cuda::rmsnorm_rows(z.get(), x.get(), norm.get(), R, D, float(cfg.rms_norm_eps));
    store_hidden_kernel<<<cuda::blocks_for(RD, kThreads), kThreads>>>(hidden.get(), z.get(), pos0, n, R, D, Lmax);
    CUDA_CHECK_LAST();
    if (last == 0) return;  // a piece before the chunk's last
    cuda::linear_rows(logits.get(), z.get(), head.get(), R, D, V);
    copy_logits(n, last);
  }

  void copy_logits(int n, int last) {
    const size_t row = size_t(V) * sizeof(float);
    CUDA_CHECK(cudaMemcpy2DAsync(logits_h.get(), last * row, logits.get() + size_t(n - last) * V, n * row, last * row,
                                 B, cudaMemcpyDeviceToHost, cudaStreamPerThread));
  }

  // MTP module 1 over positions j0 .. j0+m-1 (mtp_in = [j0, their input tokens]): h' = eh_proj [enorm(Emb) ;
  // hnorm(z)] -> block; the shared final norm and head on the last position; the draft = argmax, to the host.
  void draft_forward_v1(int m) {
    const MtpModuleWeights<float> w = mtp[0].weights();
    const size_t cells = size_t(m) * 2 * D;
    mtp_gather_kernel<<<cuda::blocks_for(cells, kThreads), kThreads>>>(cat.get(), embed.get(), hidden.get(),
                                                                       mtp_in.get(), mtp_in.get() + 1, m, D);
    CUDA_CHECK_LAST();
    cuda::rmsnorm_rows(cat.get(), cat.get(), w.enorm, m, D, mc.norm_eps, 2 * D);
    cuda::rmsnorm_rows(cat.get() + D, cat.get() + D, w.hnorm, m, D, mc.norm_eps, 2 * D);
    ScratchBuffer<float> h(size_t(m) * D), zl{size_t(D)};
    cuda::linear_rows(h.get(), cat.get(), w.eh_proj, m, 2 * D, D);
    cuda::block_decode(h.get(), {mtp_ckv.get(), mtp_kpe.get(), Lmax}, w.block, mc.block, 1, m, mtp_in.get(),
                       rope.view());
    cuda::rmsnorm_rows(zl.get(), h.get() + size_t(m - 1) * D, norm.get(), 1, D, mc.norm_eps);
    cuda::linear_rows(draft_logits.get(), zl.get(), head.get(), 1, D, V);
    argmax_kernel<<<1, kThreads>>>(draft_tok.get(), draft_logits.get(), V);
    CUDA_CHECK_LAST();
    CUDA_CHECK(cudaMemcpyAsync(draft_h.get(), draft_tok.get(), sizeof(int), cudaMemcpyDeviceToHost,
                               cudaStreamPerThread));
  }

  // ---- paths Fused and Full (version 2) ----

  // forward_v1's step through version 2 of the blocks; mode 0: the logits to the host, 1: their greedy tokens (and
  // flags) instead, 2 (n = 2, batch 1): 1 and the folded draft (fold_forward).
  void forward_v2(int n, int last, int mode) {
    const int R = B * n;
    const size_t RD = size_t(R) * D;
    const int* pos0 = main_in.get();
    embed_rows_kernel<<<cuda::blocks_for(RD, kThreads), kThreads>>>(x.get(), embed.get(), main_in.get() + 1, R, D);
    CUDA_CHECK_LAST();
    for (size_t l = 0; l < lw.size(); ++l)
      cuda::block_decode_fused(x.get(), cache(int(l)), lw[l], lc[l], B, n, pos0, rope.view(), ws.get(), iws.get());
    final_norm_store_kernel<<<cuda::blocks_for(R, cuda::rowwise::kWarpsPerBlock),
                              cuda::rowwise::kWarpsPerBlock * cuda::kWarpSize>>>(
        z.get(), hidden.get(), x.get(), norm.get(), pos0, n, R, D, Lmax, float(cfg.rms_norm_eps));
    CUDA_CHECK_LAST();
    if (last == 0) return;  // a piece before the chunk's last
    cuda::linear_rows_v2(logits.get(), z.get(), head.get(), R, D, V);
    if (mode == 0) return copy_logits(n, last);
    greedy_rows_kernel<<<B * last, kThreads>>>(ints.get(), ints.get() + B * last, logits.get(), n, last, V);
    CUDA_CHECK_LAST();
    size_t count = 2 * size_t(B) * last;
    if (mode == 2) {
      fold_forward();
      count = size_t(kDraftAt) + 4;
    }
    CUDA_CHECK(cudaMemcpyAsync(ints_h.get(), ints.get(), count * sizeof(int), cudaMemcpyDeviceToHost,
                               cudaStreamPerThread));
  }

  // The draft of the step after a verify of [t, d] at positions pos, pos + 1, for both outcomes: MTP positions pos
  // (input x, the greedy token after t: what the next draft reads when d is rejected) and pos + 1 (input y, the one
  // after d: when it is accepted), and the argmax at each. Batch 1, greedy.
  void fold_forward() {
    fold_input_kernel<<<1, 1>>>(mtp_in.get(), main_in.get(), ints.get());
    CUDA_CHECK_LAST();
    draft_forward_v2(2, 2);
  }

  // draft_forward_v1's module through version 2 (m <= kPrefillPiece in one piece, more in pieces: bitwise the same),
  // the norm and head and argmax on the last `heads` positions (1, or 2 for the fold): the drafts to ints[kDraftAt].
  void draft_forward_v2(int m, int heads) {
    const MtpModuleWeights<float> w = mtp[0].weights();
    float* h = z.get();  // (piece, D): z is free once the main step is done (the MTP reads hidden)
    for (int p0 = 0; p0 < m; p0 += kPrefillPiece) {
      const int piece = std::min(kPrefillPiece, m - p0);
      const int* j0 = m <= kPrefillPiece ? mtp_in.get() : piece_pos.get() + p0 / kPrefillPiece;
      mtp_input_kernel<<<cuda::blocks_for(piece, cuda::rowwise::kWarpsPerBlock),
                         cuda::rowwise::kWarpsPerBlock * cuda::kWarpSize>>>(
          cat.get(), embed.get(), hidden.get(), j0, mtp_in.get() + 1 + p0, w.enorm, w.hnorm, piece, D, mc.norm_eps);
      CUDA_CHECK_LAST();
      cuda::linear_rows_v2(h, cat.get(), w.eh_proj, piece, 2 * D, D);
      cuda::block_decode_fused(h, {mtp_ckv.get(), mtp_kpe.get(), Lmax}, w.block, mc.block, 1, piece, j0, rope.view(),
                               ws.get(), iws.get());
      if (p0 + piece < m) continue;
      cuda::LinearRowsV2 normed;
      normed.g = norm.get();
      normed.eps = mc.norm_eps;
      cuda::linear_rows_v2(draft_logits.get(), h + size_t(piece - heads) * D, head.get(), heads, D, V, normed);
      greedy_rows_kernel<<<heads, kThreads>>>(ints.get() + kDraftAt, ints.get() + kDraftAt + 2, draft_logits.get(),
                                              heads, heads, V);
      CUDA_CHECK_LAST();
    }
  }

  // Runs body directly, or through the graph g (captured on first use) when graphs are on.
  void run(GraphExec& g, const std::function<void()>& body) {
    if (!graphs) return body();
    if (!g.exec) {
      capture(g, body);
      ++captures;
    }
    CUDA_CHECK(cudaGraphLaunch(g.exec, cudaStreamPerThread));
  }

  void upload(DeviceBuffer<int>& dev, PinnedBuffer<int>& host, size_t count) {
    CUDA_CHECK(cudaMemcpyAsync(dev.get(), host.get(), count * sizeof(int), cudaMemcpyHostToDevice,
                               cudaStreamPerThread));
  }

  // A non-finite logit among the greedy rows of the last piece (n tokens a sequence; after the synchronisation):
  // sample_token's error.
  void check_greedy(int n, int last) {
    const int count = B * last;
    for (int i = 0; i < count; ++i) {
      const int bad = ints_h.get()[count + i];
      if (bad < 0) continue;
      const size_t row = size_t(i / last) * n + (n - last + i % last);
      float v = 0;
      CUDA_CHECK(cudaMemcpy(&v, logits.get() + row * V + bad, sizeof(float), cudaMemcpyDeviceToHost));
      throw UserError(fmt::format("sample: the model produced a non-finite logit ({}) for token {}", v, bad));
    }
  }
};

GpuDecodePath parse_gpu_decode_path(const std::string& name) {
  if (name == "v1") return GpuDecodePath::V1;
  if (name == "fused") return GpuDecodePath::Fused;
  if (name == "full") return GpuDecodePath::Full;
  throw UserError(fmt::format("--gpu-decode must be v1, fused or full, got '{}'", name));
}

const char* gpu_decode_path_name(GpuDecodePath p) {
  return p == GpuDecodePath::V1 ? "v1" : p == GpuDecodePath::Fused ? "fused" : "full";
}

GpuDecoder::GpuDecoder(const Model<float>& model, int batch, bool graphs, GpuDecodePath path)
    : impl_(std::make_unique<Impl>(model, batch, graphs, path)) {
  // The decode kernels are fp32 (they ignore the configs' matmul precision): the checkpoint's values, as trained.
}
GpuDecoder::~GpuDecoder() = default;

int GpuDecoder::batch() const { return impl_->B; }
int GpuDecoder::pos() const { return impl_->pos; }
int GpuDecoder::max_len() const { return impl_->Lmax; }
int GpuDecoder::graph_captures() const { return impl_->captures; }
GpuDecodePath GpuDecoder::path() const { return impl_->path; }

bool GpuDecoder::greedy_on_device(bool on) {
  impl_->device_greedy = on && impl_->path == GpuDecodePath::Full;
  return impl_->device_greedy;
}
const int* GpuDecoder::greedy_tokens() const { return impl_->device_greedy ? impl_->ints_h.get() : nullptr; }

void GpuDecoder::reset() {
  impl_->pos = 0;
  impl_->mtp_pos = 0;
}

void GpuDecoder::truncate(int new_pos) {
  Impl& s = *impl_;
  require(new_pos >= 0 && new_pos <= s.pos, "decoder: truncate to {} positions, but {} are fed", new_pos, s.pos);
  s.pos = new_pos;
  s.mtp_pos = std::min(s.mtp_pos, new_pos);  // MTP position new_pos-1 read t_{new_pos}: draft() re-checks it
}

GpuDecoder::Timing GpuDecoder::timing() const { return impl_->timing; }
void GpuDecoder::reset_timing() { impl_->timing = Timing{}; }

const float* GpuDecoder::feed(const std::vector<int>& toks, int n, int last) {
  Impl& s = *impl_;
  CpuTimer timer;
  require(n > 0, "decoder: feed needs at least one token");
  require(toks.size() == size_t(s.B) * n, "decoder: {} tokens given for {} sequences of {}", toks.size(), s.B, n);
  require(s.pos + n <= s.Lmax, "decoder: {} tokens at position {} do not fit max_len {}", n, s.pos, s.Lmax);
  for (int t : toks) require(t >= 0 && t < s.V, "decoder: token id {} is outside the vocabulary [0, {})", t, s.V);
  // pieces of at most kPrefillPiece tokens per sequence; the logits come from the last piece. [n = 1, last 1] and
  // [n = 2, last 2] (the plain step and the verify of a draft) are replayed from their graphs.
  require(last >= 1 && last <= (n - 1) % kPrefillPiece + 1, "decoder: the logits of the last {} of {} tokens are not "
          "kept (at most the last piece of {})", last, n, kPrefillPiece);
  const bool v1 = s.path == GpuDecodePath::V1;
  // the folded draft (Full, greedy, a verify of [next, d] right after draft(next)): the MTP stream holds positions
  // 0 .. pos-1, the last one read `next`, so positions pos and pos + 1 can follow in the verify's graph
  const bool fold = s.device_greedy && n == 2 && last == 2 && s.B == 1 && !s.mtp.empty() && s.pos > 0 &&
                    s.mtp_pos == s.pos && s.mtp_tokens[s.pos - 1] == toks[0] && s.pos + 2 <= s.Lmax;
  const int mode = !s.device_greedy ? 0 : fold ? 2 : 1;
  for (int t0 = 0; t0 < n;) {
    const int piece = std::min(kPrefillPiece, n - t0), rows = t0 + piece == n ? last : 0;
    int* in = s.main_in_h.get();
    in[0] = s.pos + t0;
    for (int b = 0; b < s.B; ++b) std::copy_n(toks.begin() + size_t(b) * n + t0, piece, in + 1 + size_t(b) * piece);
    s.upload(s.main_in, s.main_in_h, 1 + size_t(s.B) * piece);
    if (piece == n && n == last && n <= 2)
      s.run(s.feed_graph[n][mode], [&] { v1 ? s.forward_v1(n, n) : s.forward_v2(n, n, mode); });
    else
      v1 ? s.forward_v1(piece, rows) : s.forward_v2(piece, rows, mode == 2 ? 1 : mode);
    CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));  // the staging buffer is reused by the next piece
    t0 += piece;
  }
  std::copy_n(toks.begin(), n, s.tokens.begin() + s.pos);  // sequence 0's, for the MTP draft
  if (s.device_greedy) s.check_greedy((n - 1) % kPrefillPiece + 1, last);
  if (fold) {  // MTP positions pos (read x) and pos + 1 (read y) exist now, with their drafts
    const int* g = s.ints_h.get();
    for (int k = 0; k < 2; ++k) {
      s.mtp_tokens[s.pos + k] = g[k];
      s.draft_at[s.pos + k] = g[s.kDraftAt + k];
    }
    s.mtp_pos = s.pos + 2;
  }
  s.pos += n;
  if (n <= 2) {
    (n == 1 ? s.timing.steps : s.timing.verifies) += 1;
    (n == 1 ? s.timing.step_ms : s.timing.verify_ms) += timer.elapsed_ms();
  }
  return s.device_greedy ? nullptr : s.logits_h.get();
}

int GpuDecoder::draft(int next) {
  Impl& s = *impl_;
  require(!s.mtp.empty(), "decoder: the model has no MTP module (num_nextn_predict_layers = 0) to draft with");
  require(s.B == 1, "decoder: the MTP draft runs on one sequence (batch 1), not {}", s.B);
  require(s.pos > 0, "decoder: draft needs a fed token first (the MTP module reads its normalised final hidden state)");
  require(next >= 0 && next < s.V, "decoder: token id {} is outside the vocabulary [0, {})", next, s.V);
  CpuTimer timer;
  // 1) as Decoder::draft: keep the computed MTP prefix whose input tokens still match, recompute the rest; when
  // even the last position (input `next`) is computed and its draft known (a folded draft), that is the answer
  auto input_token = [&](int j) { return j + 1 < s.pos ? s.tokens[j + 1] : next; };
  int keep = 0;
  while (keep < std::min(s.mtp_pos, s.pos) && s.mtp_tokens[keep] == input_token(keep)) ++keep;
  if (keep == s.pos && s.draft_at[s.pos - 1] >= 0) {
    ++s.timing.folded;
    return s.draft_at[s.pos - 1];
  }
  keep = std::min(keep, s.pos - 1);
  const int j0 = keep, m = s.pos - j0;
  int* in = s.mtp_in_h.get();
  in[0] = j0;
  for (int r = 0; r < m; ++r) {
    in[1 + r] = s.mtp_tokens[j0 + r] = input_token(j0 + r);
    s.draft_at[j0 + r] = -1;
  }
  s.upload(s.mtp_in, s.mtp_in_h, 1 + size_t(m));
  const bool v1 = s.path == GpuDecodePath::V1;
  if (!v1 && m > kPrefillPiece) {
    for (int p = 0; p * kPrefillPiece < m; ++p) s.piece_pos_h.get()[p] = j0 + p * kPrefillPiece;
    s.upload(s.piece_pos, s.piece_pos_h, size_t((m + kPrefillPiece - 1) / kPrefillPiece));
  }
  // 2) the module over positions j0 .. pos-1 (m = 1, 2: replayed from its graph)
  auto body = [&] {
    if (v1) return s.draft_forward_v1(m);
    s.draft_forward_v2(m, 1);
    CUDA_CHECK(cudaMemcpyAsync(s.draft_h.get(), s.ints.get() + s.kDraftAt, sizeof(int), cudaMemcpyDeviceToHost,
                               cudaStreamPerThread));
  };
  if (m <= 2)
    s.run(s.draft_graph[m], body);
  else
    body();
  CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  s.mtp_pos = s.pos;
  const int d = *s.draft_h.get();
  s.draft_at[s.pos - 1] = d;
  ++s.timing.drafts;
  s.timing.draft_ms += timer.elapsed_ms();
  return d;
}

std::vector<float> GpuDecoder::draft_logits() const {
  std::vector<float> all = impl_->draft_logits.download();
  all.resize(size_t(impl_->V));
  return all;
}

}  // namespace dsv3
