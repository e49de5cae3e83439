// Stage 07, the GPU sampler (sampler_gpu.h): the model's decode step on the device, captured as CUDA graphs.
// Kernels, then the decoder. Shapes: see the legend in sampler_gpu.h; R = B*n rows, row r = b*n + t.
#include "07_train_gpu/sampler_gpu.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
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
  // step inputs: main_in = [pos, tokens (B, n)], mtp_in = [j0, tokens (m)]; device copies and pinned staging
  DeviceBuffer<int> main_in, mtp_in;
  PinnedBuffer<int> main_in_h, mtp_in_h;
  DeviceBuffer<float> x, z, logits, cat, draft_logits;
  DeviceBuffer<int> draft_tok;
  PinnedBuffer<float> logits_h;  // (B, last, V), last <= kPrefillPiece
  PinnedBuffer<int> draft_h;
  GraphExec feed_graph[3], draft_graph[3];  // index n (feed, all n rows' logits) or m (draft), 1 and 2
  int captures = 0;
  Timing timing;
  // host state (as the CPU Decoder's)
  int pos = 0, mtp_pos = 0;
  std::vector<int> tokens, mtp_tokens;  // (Lmax) sequence 0's fed tokens; the token each MTP position embedded

  Impl(const Model<float>& m, int batch, bool use_graphs)
      : cfg(m.config()), B(batch), Lmax(m.config().max_position_embeddings), V(m.config().vocab_size),
        D(m.config().hidden_size), graphs(use_graphs), rope(m.rope()), embed(m.embed()), norm(m.final_norm()),
        head(m.head()), mc(m.mtp_config()), hidden(size_t(batch) * Lmax * D), main_in(1 + size_t(batch) * kPrefillPiece),
        mtp_in(1 + size_t(Lmax)), main_in_h(1 + size_t(batch) * kPrefillPiece), mtp_in_h(1 + size_t(Lmax)),
        x(size_t(batch) * kPrefillPiece * D), z(size_t(batch) * kPrefillPiece * D),
        logits(size_t(batch) * kPrefillPiece * V), cat(size_t(Lmax) * 2 * D), draft_logits(size_t(V)), draft_tok(1),
        logits_h(size_t(batch) * kPrefillPiece * V), draft_h(1), tokens(size_t(Lmax)), mtp_tokens(size_t(Lmax)) {
    require(batch >= 1, "gpu decoder: batch must be >= 1, got {}", batch);
    require(Lmax >= 1 && Lmax <= m.rope().positions, "gpu decoder: max_position_embeddings {} exceeds the RoPE table "
            "({} positions)", Lmax, m.rope().positions);
    for (int l = 0; l < cfg.num_hidden_layers; ++l) {
      layers.push_back(param_list::upload(m.layer(l)));
      lc.push_back(m.block_config(l));
      const BlockConfig& bc = lc.back();
      ckv.emplace_back(size_t(B) * Lmax * bc.attn.kv_lora_rank);
      kpe.emplace_back(size_t(B) * Lmax * bc.attn.qk_rope_head_dim);
    }
    for (auto& l : layers) lw.push_back(l.weights());
    if (cfg.num_nextn_predict_layers > 0) {
      mtp.push_back(param_list::upload(m.mtp_module(0)));
      mtp_ckv = DeviceBuffer<float>(size_t(Lmax) * mc.block.attn.kv_lora_rank);
      mtp_kpe = DeviceBuffer<float>(size_t(Lmax) * mc.block.attn.qk_rope_head_dim);
    }
    // lc's block configs run at fp32 whatever the checkpoint trained with: the decode kernels are fp32 only
  }

  MlaCache<float> cache(int l) { return {ckv[l].get(), kpe[l].get(), Lmax}; }

  // 1) embedding, 2) the blocks, 3) final norm (z kept for MTP) and head, 4) the logits of each sequence's last
  // `last` tokens to the host (B, last, V): n tokens of each sequence, at the device position main_in[0].
  void forward(int n, int last) {
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
    const size_t row = size_t(V) * sizeof(float);
    CUDA_CHECK(cudaMemcpy2DAsync(logits_h.get(), last * row, logits.get() + size_t(n - last) * V, n * row, last * row,
                                 B, cudaMemcpyDeviceToHost, cudaStreamPerThread));
  }

  // MTP module 1 over positions j0 .. j0+m-1 (mtp_in = [j0, their input tokens]): h' = eh_proj [enorm(Emb) ;
  // hnorm(z)] -> block; the shared final norm and head on the last position; the draft = argmax, to the host.
  void draft_forward(int m) {
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
};

GpuDecoder::GpuDecoder(const Model<float>& model, int batch, bool graphs)
    : impl_(std::make_unique<Impl>(model, batch, graphs)) {
  // The decode kernels are fp32 (they ignore the configs' matmul precision): the checkpoint's values, as trained.
}
GpuDecoder::~GpuDecoder() = default;

int GpuDecoder::batch() const { return impl_->B; }
int GpuDecoder::pos() const { return impl_->pos; }
int GpuDecoder::max_len() const { return impl_->Lmax; }
int GpuDecoder::graph_captures() const { return impl_->captures; }

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
  for (int t0 = 0; t0 < n;) {
    const int piece = std::min(kPrefillPiece, n - t0), rows = t0 + piece == n ? last : 0;
    int* in = s.main_in_h.get();
    in[0] = s.pos + t0;
    for (int b = 0; b < s.B; ++b) std::copy_n(toks.begin() + size_t(b) * n + t0, piece, in + 1 + size_t(b) * piece);
    s.upload(s.main_in, s.main_in_h, 1 + size_t(s.B) * piece);
    if (piece == n && n == last && n <= 2)
      s.run(s.feed_graph[n], [&] { s.forward(n, n); });
    else
      s.forward(piece, rows);
    CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));  // the staging buffer is reused by the next piece
    t0 += piece;
  }
  std::copy_n(toks.begin(), n, s.tokens.begin() + s.pos);  // sequence 0's, for the MTP draft
  s.pos += n;
  if (n <= 2) {
    (n == 1 ? s.timing.steps : s.timing.verifies) += 1;
    (n == 1 ? s.timing.step_ms : s.timing.verify_ms) += timer.elapsed_ms();
  }
  return s.logits_h.get();
}

int GpuDecoder::draft(int next) {
  Impl& s = *impl_;
  require(!s.mtp.empty(), "decoder: the model has no MTP module (num_nextn_predict_layers = 0) to draft with");
  require(s.B == 1, "decoder: the MTP draft runs on one sequence (batch 1), not {}", s.B);
  require(s.pos > 0, "decoder: draft needs a fed token first (the MTP module reads its normalised final hidden state)");
  require(next >= 0 && next < s.V, "decoder: token id {} is outside the vocabulary [0, {})", next, s.V);
  CpuTimer timer;
  // 1) as Decoder::draft: keep the computed MTP prefix whose input tokens still match, recompute the rest
  auto input_token = [&](int j) { return j + 1 < s.pos ? s.tokens[j + 1] : next; };
  int keep = 0;
  while (keep < std::min(s.mtp_pos, s.pos - 1) && s.mtp_tokens[keep] == input_token(keep)) ++keep;
  const int j0 = keep, m = s.pos - j0;
  int* in = s.mtp_in_h.get();
  in[0] = j0;
  for (int r = 0; r < m; ++r) in[1 + r] = s.mtp_tokens[j0 + r] = input_token(j0 + r);
  s.upload(s.mtp_in, s.mtp_in_h, 1 + size_t(m));
  // 2) the module over positions j0 .. pos-1 (m = 1, 2: replayed from its graph)
  if (m <= 2)
    s.run(s.draft_graph[m], [&] { s.draft_forward(m); });
  else
    s.draft_forward(m);
  CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  s.mtp_pos = s.pos;
  ++s.timing.drafts;
  s.timing.draft_ms += timer.elapsed_ms();
  return *s.draft_h.get();
}

std::vector<float> GpuDecoder::draft_logits() const { return impl_->draft_logits.download(); }

}  // namespace dsv3
