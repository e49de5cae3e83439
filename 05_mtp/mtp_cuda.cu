// Stage 05, CUDA: the MTP chain (mtp.h) from the CUDA entry points of stages 01-04 and block_cuda.cu, plus
// the token-alignment kernel (and common/cuda_kernels.cuh's residual add). Kernels, then launchers, then the public
// entry points. Activations fp32, products at the config's matmul precision. Shapes: see mtp.h.
#include <algorithm>
#include <vector>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "05_mtp/mtp.h"
#include "05_mtp/mtp_align.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;

// ---- kernels ------------------------------------------------------------------------------------

// One thread per row n: token t_{i+k} and target t_{i+k+1} of module k (mtp_align.h, same code as the CPU).
__global__ void align_kernel(int* token, int* target, const int* window, int N, int T, int k) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < N) mtp_align::align(token + n, target + n, window, n, T, k, kIgnoreTarget);
}

// ---- launchers ----------------------------------------------------------------------------------

void launch_align(int* token, int* target, const int* window, int N, int T, int k) {
  align_kernel<<<blocks_for(N, kThreads), kThreads>>>(token, target, window, N, T, k);
  CUDA_CHECK_LAST();
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void mtp_forward(float* mean_ce, int* bad, const MtpSaved<float>* saved, const float* h0, const int* tokens,
                 const MtpShared<float>& sh, const MtpModuleWeights<float>* modules, const MtpConfig& c, int B, int seq,
                 const MlaRope<float>& rope) {
  validate_mtp_call(c, B, seq, rope.positions);
  const int N = B * seq, D = c.dim(), V = c.vocab;
  ScratchBuffer<float> logits(static_cast<size_t>(N) * V);
  const float* h_prev = h0;  // module k reads the previous depth's normalised output: h0, then z^{k-1}
  for (int k = 1; k <= c.depth; ++k) {
    const MtpSaved<float>& s = saved[k - 1];
    const MtpModuleWeights<float>& m = modules[k - 1];
    // 1) align: token t_{i+k} in, target t_{i+k+1} out
    launch_align(s.tokens, s.targets, tokens, N, seq, k);
    // 2) the two normalised inputs
    embedding_forward(s.e, s.tokens, sh.embed, N, D, V, bad);
    rmsnorm_forward(s.en, s.en_rstd, s.e, m.enorm, N, D, c.norm_eps);
    rmsnorm_forward(s.hn, s.hn_rstd, h_prev, m.hnorm, N, D, c.norm_eps);
    // 3) h' = [en ; hn] eh_proj^T over the two column blocks of eh_proj (D, 2D)
    gemm(Op::N, Op::T, N, D, D, 1.f, s.en, D, m.eh_proj, 2 * D, 0.f, s.hp, D, c.matmul);
    gemm(Op::N, Op::T, N, D, D, 1.f, s.hn, D, m.eh_proj + D, 2 * D, 1.f, s.hp, D, c.matmul);
    // 4) the module's transformer block
    block_forward(s.hk, s.block, s.hp, m.block, c.block, B, seq, 0, rope);
    // 5) shared final norm and head, cross-entropy against t_{i+k+1} (its mean; eq. 24's 1/T is the caller's)
    rmsnorm_forward(s.z, s.z_rstd, s.hk, sh.norm, N, D, c.norm_eps);
    gemm(Op::N, Op::T, N, V, D, 1.f, s.z, sh.head, 0.f, logits.get(), c.matmul);
    cross_entropy_forward(mean_ce + (k - 1), s.probs, logits.get(), s.targets, N, V, bad);
    h_prev = s.z;
  }
}

float mtp_loss(float* ce, const float* mean_ce, const MtpConfig& c, int seq) {
  return mtp_align::loss_from_means(ce, mean_ce, c.depth, seq, c.mtp_lambda);
}

float mtp_forward(float* ce, const MtpSaved<float>* saved, const float* h0, const int* tokens,
                  const MtpShared<float>& sh, const MtpModuleWeights<float>* modules, const MtpConfig& c, int B,
                  int seq, const MlaRope<float>& rope) {
  DeviceBuffer<int> bad(1);
  bad.zero();
  DeviceBuffer<float> mean_ce(size_t(std::max(c.depth, 0)));
  mtp_forward(mean_ce.get(), bad.get(), saved, h0, tokens, sh, modules, c, B, seq, rope);
  require(bad.download()[0] == 0, "a token id is outside the vocabulary [0, {})", c.vocab);
  return mtp_loss(ce, mean_ce.download().data(), c, seq);
}

void mtp_backward(const MtpModuleGrads<float>* mg, const MtpSharedGrads<float>& sg, float* dh0, float dloss,
                  const float* const* dscores_extra, const MtpSaved<float>* saved, const float* h0, const int* tokens,
                  const MtpShared<float>& sh, const MtpModuleWeights<float>* modules, const MtpConfig& c, int B,
                  int seq, const MlaRope<float>& rope) {
  validate_mtp_call(c, B, seq, rope.positions);
  (void)tokens;  // the aligned tokens were saved by the forward
  const int N = B * seq, D = c.dim(), V = c.vocab;
  const size_t ND = static_cast<size_t>(N) * D;
  // dh0 carries d L / d z^k through module k+1, which reads z^k (zero for the last module), then is overwritten.
  CUDA_CHECK(cudaMemsetAsync(dh0, 0, ND * sizeof(float)));
  if (c.depth == 0) return;
  const float dce = dloss * c.mtp_lambda / static_cast<float>(c.depth);
  ScratchBuffer<float> dlogits(static_cast<size_t>(N) * V), dz(ND), dhk(ND), dhp(ND), den(ND), dhn(ND), de(ND);
  for (int k = c.depth; k >= 1; --k) {
    const MtpSaved<float>& s = saved[k - 1];
    const MtpModuleWeights<float>& m = modules[k - 1];
    const MtpModuleGrads<float>& g = mg[k - 1];
    const float* h_prev = k == 1 ? h0 : saved[k - 2].z;
    // 5) cross-entropy (eq. 24's 1/T), shared head; the gradient from module k+1 (in dh0) joins at z^k; final norm
    cross_entropy_backward(dlogits.get(), dce * float(mtp_align::ce_scale(seq, k)), s.probs, s.targets, N, V);
    gemm(Op::T, Op::N, V, D, N, 1.f, dlogits.get(), s.z, 1.f, sg.head, c.matmul);
    gemm(Op::N, Op::N, N, D, V, 1.f, dlogits.get(), sh.head, 0.f, dz.get(), c.matmul);
    if (k < c.depth) add_inplace(dz.get(), dh0, ND);
    rmsnorm_backward(sg.norm, dhk.get(), dz.get(), s.z_rstd, s.hk, sh.norm, N, D);
    // 4) block (with the balance-loss gradient on its router's scores, when the caller gives one)
    block_backward(g.block, dhp.get(), dhk.get(), dscores_extra ? dscores_extra[k - 1] : nullptr, s.block, s.hp,
                   m.block, c.block, B, seq, 0, rope);
    // 3) eh_proj
    gemm(Op::N, Op::N, N, D, D, 1.f, dhp.get(), D, m.eh_proj, 2 * D, 0.f, den.get(), D, c.matmul);
    gemm(Op::N, Op::N, N, D, D, 1.f, dhp.get(), D, m.eh_proj + D, 2 * D, 0.f, dhn.get(), D, c.matmul);
    gemm(Op::T, Op::N, D, D, N, 1.f, dhp.get(), D, s.en, D, 1.f, g.eh_proj, 2 * D, c.matmul);
    gemm(Op::T, Op::N, D, D, N, 1.f, dhp.get(), D, s.hn, D, 1.f, g.eh_proj + D, 2 * D, c.matmul);
    // 2) enorm -> shared embedding; hnorm -> the previous depth's normalised output (overwrites dh0)
    rmsnorm_backward(g.enorm, de.get(), den.get(), s.en_rstd, s.e, m.enorm, N, D);
    embedding_backward(sg.embed, de.get(), s.tokens, N, D, V);
    rmsnorm_backward(g.hnorm, dh0, dhn.get(), s.hn_rstd, h_prev, m.hnorm, N, D);
  }
}

}  // namespace dsv3::cuda
