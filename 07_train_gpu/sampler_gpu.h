// Stage 07: sampling on the GPU. The decoder of sampler.h (the same latent cache, absorbed decode, MTP draft and
// window rule, through the same decoding loop decode_samples) with everything on the device:
//
//   weights      a copy of the host Model<float> (fp32), uploaded by the model's one list of parameters
//   caches       per layer (and for MTP module 1) c_kv (B, Lmax, Dc) and k_pe (B, Lmax, Dr) in device memory
//   a step       embedding -> every block through stage 05's cuda::block_decode_fused (stage 02's
//                cuda::mla_decode_chunk_absorbed_fused, stage 03's cuda::mlp_rows_fused / moe_rows_fused; path V1:
//                version 1, cuda::block_decode) -> final norm -> head -> the logits the loop samples from (each
//                sequence's last one or two) copied to pinned host memory, or (path Full, greedy) their argmax. The position and the tokens live in device memory, written
//                by one small async copy before the step, so each decode shape (n = 1 and n = 2 tokens per
//                sequence; the MTP draft over m = 1 and m = 2 positions) is captured ONCE as a CUDA graph and
//                replayed at every position. Other chunk sizes (the prompt, a re-fill) run as plain launches, in
//                pieces of at most kPrefillPiece tokens (bitwise the same, by chunk invariance).
//   sampling     on the host: sample_token() on the logits copied back (one copy of B*n*V floats per step), so
//                the GPU and CPU paths share one sampling rule and one RNG stream per sample; greedy on path Full:
//                an argmax launch with sample_token's rule, B*n ids copied back (greedy_on_device).
//
// Exactness. Every per-token map is a fixed-order row-wise kernel (common/rowwise_cuda.cuh), never cuBLAS, so on
// the GPU too a chunk of n tokens gives logits BITWISE equal to n single steps, and sample b of a batch bitwise
// equal to the same sample decoded alone. Speculative decoding on the GPU is therefore identical to plain GPU
// decoding (sampler.h's argument), and --num-samples N in one batch to N single runs. GPU and CPU agree to fp32
// rounding (reductions in another order), not bitwise: a sampled token can differ where two candidates' logits are
// within rounding of each other.
//
// Shape legend: B batch (samples decoded in lockstep), n tokens per sequence in a chunk, D hidden_size,
// V vocab_size, Lmax = max_position_embeddings (the caches always hold the whole window, so one decoder and its
// graphs serve every prompt).
// Needs CUDA: the class exists only when DSV3_HAVE_CUDA (the header itself has no CUDA types).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "06_full_model/model.h"
#include "07_train_gpu/sampler.h"

namespace dsv3 {

// The largest chunk the GPU decoder runs as one set of launches (longer ones are fed in pieces).
inline constexpr int kPrefillPiece = 64;

// The GPU decoder's paths, oldest first; each adds to the one before, and all give the same tokens (tests). `sample
// --gpu-decode` picks one; the README's speed table compares them.
//   V1     the first version: stage 05's cuda::block_decode (13 launches a MoE block, 11 dense, with stream-ordered
//          scratch: allocation nodes inside the graphs), the final norm and the hidden store, the head, the logits
//          copied to the host, tokens chosen there; the MTP draft in its own graph (gather, two norms, eh_proj, the
//          block, norm, head, argmax)
//   Fused  version 2 of the kernels: cuda::block_decode_fused (7 launches, 6 dense; one preallocated workspace),
//          the final norm with the hidden store, the MTP input in one launch and its norm in the head's; tokens
//          still chosen on the host
//   Full   Fused, and greedy tokens chosen on the device (greedy_on_device: an argmax launch, B*n ints copied back
//          instead of B*n*V logits); greedy speculative decoding folds the next MTP draft into the verify's graph
//          (for both outcomes, accepted or not: one launch and one synchronisation per speculative step)
enum class GpuDecodePath { V1, Fused, Full };
// "v1", "fused", "full"; UserError for another name.
GpuDecodePath parse_gpu_decode_path(const std::string& name);
const char* gpu_decode_path_name(GpuDecodePath p);

class GpuDecoder : public TokenDecoder {
 public:
  // The model must outlive the decoder (its values are copied at construction). batch >= 1 sequences; graphs:
  // capture the decode shapes as CUDA graphs (false: plain launches every step, for tests and comparisons).
  GpuDecoder(const Model<float>& model, int batch, bool graphs = true, GpuDecodePath path = GpuDecodePath::Full);
  ~GpuDecoder() override;
  GpuDecoder(const GpuDecoder&) = delete;
  GpuDecoder& operator=(const GpuDecoder&) = delete;

  int batch() const override;
  int pos() const override;
  int max_len() const override;
  void reset() override;
  const float* feed(const std::vector<int>& tokens, int n, int last) override;
  void truncate(int new_pos) override;
  int draft(int next) override;
  // Path Full only (else false): the greedy choices on the device, feed() then returns nullptr (TokenDecoder).
  bool greedy_on_device(bool on) override;
  const int* greedy_tokens() const override;
  GpuDecodePath path() const;

  // MTP module 1's logits (V) of the last draft() (tests compare them with the CPU Decoder's).
  std::vector<float> draft_logits() const;
  // Host-timed calls (each up to its synchronisation): feeds of one token per sequence (plain steps), of two
  // (verifies of a draft) and drafts, with their milliseconds; what a speculative step costs next to a plain one.
  // folded: drafts answered from a verify's graph (path Full, greedy), which cost no call of their own (their time
  // is in verify_ms).
  struct Timing {
    int steps = 0, verifies = 0, drafts = 0, folded = 0;
    double step_ms = 0, verify_ms = 0, draft_ms = 0;
  };
  Timing timing() const;
  void reset_timing();
  // CUDA graphs captured so far, at most seven: feed n = 1, 2 (the last one or two rows' logits, or their greedy
  // tokens, or (n = 2) their greedy tokens with the folded draft); draft m = 1, 2.
  int graph_captures() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
