// Stage 05, CUDA: the block's decode form (block.h, cuda::block_decode), the GPU twin of cpu::block_decode, for B
// sequences at the same positions read from device memory. Shapes: see the legend in block.h; R = B*n rows.
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

}  // namespace dsv3::cuda
