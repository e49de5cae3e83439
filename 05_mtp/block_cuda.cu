// Stage 05, CUDA: the transformer block (block.h) from the CUDA entry points of stages 01-03 and the
// residual add of common/cuda_kernels.cuh. Shapes: see block.h.
#include "05_mtp/block.h"
#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"

namespace dsv3::cuda {

// ---- entry points -------------------------------------------------------------------------------

void block_forward(float* out, const BlockSaved<float>& s, const float* inp, const BlockWeights<float>& w,
                   const BlockConfig& c, int B, int seq, int pos0, const MlaRope<float>& rope) {
  validate_block_call(c, B, seq, pos0, rope.positions);
  const int N = B * seq, D = c.dim();
  const size_t ND = static_cast<size_t>(N) * D;
  // 1) h = x + MLA(attn_norm(x))
  rmsnorm_forward(s.xa, s.xa_rstd, inp, w.attn_norm, N, D, c.norm_eps);
  mla_forward(s.h, s.attn, s.xa, w.attn, c.attn, B, seq, pos0, rope);
  add_inplace(s.h, inp, ND);
  // 2) out = h + FFN(ffn_norm(h))
  rmsnorm_forward(s.hf, s.hf_rstd, s.h, w.ffn_norm, N, D, c.norm_eps);
  if (c.ffn == FfnKind::Dense)
    mlp_forward(out, s.mlp_h1, s.mlp_h3, s.hf, w.mlp, c.mlp, N);
  else
    moe_forward(out, s.moe, s.hf, w.moe, c.moe, N);
  add_inplace(out, s.h, ND);
}

void block_backward(const BlockGrads<float>& g, float* dinp, const float* dout, const float* dscores_extra,
                    const BlockSaved<float>& s, const float* inp, const BlockWeights<float>& w, const BlockConfig& c,
                    int B, int seq, int pos0, const MlaRope<float>& rope) {
  validate_block_call(c, B, seq, pos0, rope.positions);
  const int N = B * seq, D = c.dim();
  const size_t ND = static_cast<size_t>(N) * D;
  ScratchBuffer<float> dbranch(ND), dh(ND);
  // 2) FFN branch: dh = dout + ffn_norm^T FFN^T dout
  if (c.ffn == FfnKind::Dense)
    mlp_backward(g.mlp, dbranch.get(), dout, s.mlp_h1, s.mlp_h3, s.hf, w.mlp, c.mlp, N);
  else
    moe_backward(g.moe, dbranch.get(), dout, dscores_extra, s.moe, s.hf, w.moe, c.moe, N);
  rmsnorm_backward(g.ffn_norm, dh.get(), dbranch.get(), s.hf_rstd, s.h, w.ffn_norm, N, D);
  add_inplace(dh.get(), dout, ND);
  // 1) attention branch: dinp = dh + attn_norm^T MLA^T dh
  mla_backward(g.attn, dbranch.get(), dh.get(), s.attn, s.xa, w.attn, c.attn, B, seq, pos0, rope);
  rmsnorm_backward(g.attn_norm, dinp, dbranch.get(), s.xa_rstd, inp, w.attn_norm, N, D);
  add_inplace(dinp, dh.get(), ND);
}

}  // namespace dsv3::cuda
