// Stage 05, CUDA: the block's decode form (block.h, cuda::block_decode), the GPU twin of cpu::block_decode, for B
// sequences at the same positions read from device memory. Shapes: see the legend in block.h; R = B*n rows.
#include <algorithm>

#include "05_mtp/block.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/rowwise_cuda.cuh"

namespace dsv3::cuda {

void block_decode(float* x, const MlaCache<float>& cache, const BlockWeights<float>& w, const BlockConfig& c, int B,
                  int n, const int* pos0, const MlaRope<float>& rope) {
  validate_block_call(c, B, n, 0, rope.positions);
  const int R = B * n, D = c.dim();
  ScratchBuffer<float> xa(size_t(R) * D), br(size_t(R) * D);
  // 1) h = x + MLA(attn_norm(x)) through the latent cache
  rmsnorm_rows(xa.get(), x, w.attn_norm, R, D, c.norm_eps);
  mla_decode_chunk_absorbed(br.get(), cache, xa.get(), w.attn, c.attn, B, n, pos0, rope);
  // 2) out = h + FFN(ffn_norm(h)); both residual adds fused (into the norm, into the FFN's last kernel)
  add_rmsnorm_rows(xa.get(), x, br.get(), w.ffn_norm, R, D, c.norm_eps);
  if (c.ffn == FfnKind::Dense)
    mlp_rows(x, xa.get(), w.mlp, c.mlp, R, true);
  else
    moe_rows(x, xa.get(), w.moe, c.moe, R, true);
}

// Version 2, the GPU sampler's fused step: the same block in 7 launches (a dense block: 6) instead of 13 (11), no
// allocation. The norms and both residual adds are taken into stage 02's and stage 03's fused forms.
BlockDecodeWorkspaceSize block_decode_workspace_size(const BlockConfig& c, int rows) {
  const size_t ffn = c.ffn == FfnKind::Dense ? mlp_rows_workspace_floats(c.mlp, rows)
                                             : moe_rows_workspace_floats(c.moe, rows);
  return {std::max(mla_decode_workspace_floats(c.attn, rows), ffn),
          c.ffn == FfnKind::Dense ? size_t(0) : size_t(rows) * c.moe.n_activated_experts};
}

void block_decode_fused(float* x, const MlaCache<float>& cache, const BlockWeights<float>& w, const BlockConfig& c,
                        int B, int n, const int* pos0, const MlaRope<float>& rope, float* workspace,
                        int* iworkspace) {
  validate_block_call(c, B, n, 0, rope.positions);
  const int R = B * n;
  // 1) x += MLA(attn_norm(x)) through the latent cache
  mla_decode_chunk_absorbed_fused(x, cache, w.attn_norm, c.norm_eps, w.attn, c.attn, B, n, pos0, rope, workspace);
  // 2) x += FFN(ffn_norm(x))
  if (c.ffn == FfnKind::Dense)
    mlp_rows_fused(x, w.ffn_norm, c.norm_eps, w.mlp, c.mlp, R, workspace);
  else
    moe_rows_fused(x, w.ffn_norm, c.norm_eps, w.moe, c.moe, R, workspace, iworkspace);
}

}  // namespace dsv3::cuda
