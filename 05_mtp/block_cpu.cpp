// Stage 05, CPU reference of the transformer block (block.h): the specification. Shapes: see block.h.
#include "05_mtp/block.h"

#include <algorithm>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/errors.h"
#include "common/rowwise.h"
#include "common/rng.h"

namespace dsv3 {

void BlockConfig::validate() const {
  attn.validate();
  require(norm_eps > 0, "BlockConfig.norm_eps must be positive, got {}", norm_eps);
  if (ffn == FfnKind::Dense) {
    require(mlp.inter_dim > 0, "BlockConfig.mlp.inter_dim must be positive for a dense block, got {}", mlp.inter_dim);
    require(mlp.dim == attn.dim, "BlockConfig.mlp.dim ({}) must equal attn.dim ({})", mlp.dim, attn.dim);
  } else {
    moe.validate();
    require(moe.dim == attn.dim, "BlockConfig.moe.dim ({}) must equal attn.dim ({})", moe.dim, attn.dim);
  }
}

void set_matmul(BlockConfig& c, Matmul m, MoeExperts experts) {
  c.attn.matmul = c.mlp.matmul = c.moe.matmul = m;
  c.moe.experts = experts;
}

void validate_block_call(const BlockConfig& c, int B, int seq, int pos0, int table_positions) {
  c.validate();
  validate_mla_call(c.attn, B, seq, pos0, table_positions);
}

size_t block_saved_size(const BlockConfig& c, int B, int seq) {
  const size_t N = size_t(B) * seq, D = c.dim();
  const auto f = saved_field_count;  // 16-byte aligned fields (moe.h)
  size_t n = 3 * f(N * D) + 2 * f(N) + f(mla_saved_size(c.attn, B, seq));  // xa, h, hf; two rstd; attention
  n += c.ffn == FfnKind::Dense ? 2 * f(N * c.mlp.inter_dim) : f(moe_saved_size(c.moe, int(N)));
  return n;
}
size_t block_saved_int_size(const BlockConfig& c, int B, int seq) {
  return c.ffn == FfnKind::Dense ? 0 : moe_saved_int_size(c.moe, B * seq);
}

template <typename T>
BlockSaved<T> block_saved_layout(T* base, int* ibase, const BlockConfig& c, int B, int seq) {
  const size_t N = size_t(B) * seq, D = c.dim();
  BlockSaved<T> s{};
  T* p = base;
  auto take = [&p](size_t n) {
    T* r = p;
    p += saved_field_count(n);
    return r;
  };
  s.xa = take(N * D);
  s.xa_rstd = take(N);
  s.attn = mla_saved_layout(take(mla_saved_size(c.attn, B, seq)), c.attn, B, seq);
  s.h = take(N * D);
  s.hf = take(N * D);
  s.hf_rstd = take(N);
  if (c.ffn == FfnKind::Dense) {
    s.mlp_h1 = take(N * c.mlp.inter_dim);
    s.mlp_h3 = take(N * c.mlp.inter_dim);
  } else {
    s.moe = moe_saved_layout(take(moe_saved_size(c.moe, int(N))), ibase, c.moe, int(N));
  }
  return s;
}

namespace cpu {

template <typename T>
void block_forward(T* out, const BlockSaved<T>& s, const T* inp, const BlockWeights<T>& w, const BlockConfig& c,
                   int B, int seq, int pos0, const MlaRope<T>& rope) {
  validate_block_call(c, B, seq, pos0, rope.positions);
  const int N = B * seq, D = c.dim();
  const size_t ND = size_t(N) * D;
  // 1) h = x + MLA(attn_norm(x))
  rmsnorm_forward(s.xa, s.xa_rstd, inp, w.attn_norm, N, D, c.norm_eps);
  mla_forward(s.h, s.attn, s.xa, w.attn, c.attn, B, seq, pos0, rope);
  for (size_t i = 0; i < ND; ++i) s.h[i] += inp[i];
  // 2) out = h + FFN(ffn_norm(h))
  rmsnorm_forward(s.hf, s.hf_rstd, s.h, w.ffn_norm, N, D, c.norm_eps);
  if (c.ffn == FfnKind::Dense)
    mlp_forward(out, s.mlp_h1, s.mlp_h3, s.hf, w.mlp, c.mlp, N);
  else
    moe_forward(out, s.moe, s.hf, w.moe, c.moe, N);
  for (size_t i = 0; i < ND; ++i) out[i] += s.h[i];
}

template <typename T>
void block_backward(const BlockGrads<T>& g, T* dinp, const T* dout, const NoDeduce<T>* dscores_extra,
                    const BlockSaved<T>& s, const T* inp, const BlockWeights<T>& w, const BlockConfig& c, int B,
                    int seq, int pos0, const MlaRope<T>& rope) {
  validate_block_call(c, B, seq, pos0, rope.positions);
  const int N = B * seq, D = c.dim();
  const size_t ND = size_t(N) * D;
  std::vector<T> dbranch(ND), dh(ND);
  // 2) FFN branch: dh = dout + ffn_norm^T FFN^T dout
  if (c.ffn == FfnKind::Dense)
    mlp_backward(g.mlp, dbranch.data(), dout, s.mlp_h1, s.mlp_h3, s.hf, w.mlp, c.mlp, N);
  else
    moe_backward(g.moe, dbranch.data(), dout, dscores_extra, s.moe, s.hf, w.moe, c.moe, N);
  rmsnorm_backward(g.ffn_norm, dh.data(), dbranch.data(), s.hf_rstd, s.h, w.ffn_norm, N, D);
  for (size_t i = 0; i < ND; ++i) dh[i] += dout[i];
  // 1) attention branch: dinp = dh + attn_norm^T MLA^T dh
  mla_backward(g.attn, dbranch.data(), dh.data(), s.attn, s.xa, w.attn, c.attn, B, seq, pos0, rope);
  rmsnorm_backward(g.attn_norm, dinp, dbranch.data(), s.xa_rstd, inp, w.attn_norm, N, D);
  for (size_t i = 0; i < ND; ++i) dinp[i] += dh[i];
}

template <typename T>
void block_decode(T* x, const MlaCache<T>& cache, const BlockWeights<T>& w, const BlockConfig& c, int n, int pos0,
                  const MlaRope<T>& rope, BlockDecodeScratch<T>& s) {
  validate_block_call(c, 1, n, pos0, rope.positions);
  const int D = c.dim();
  const size_t nD = size_t(n) * D;
  T* xa = grow(s.xa, nD);
  T* br = grow(s.branch, nD);
  // 1) h = x + MLA(attn_norm(x)) through the latent cache
  rmsnorm_rows(xa, x, w.attn_norm, n, D, c.norm_eps);
  mla_decode_chunk_absorbed(br, cache, xa, w.attn, c.attn, n, pos0, rope, &s.attn);
  for (size_t i = 0; i < nD; ++i) x[i] += br[i];
  // 2) out = h + FFN(ffn_norm(h))
  rmsnorm_rows(xa, x, w.ffn_norm, n, D, c.norm_eps);
  if (c.ffn == FfnKind::Dense)
    mlp_rows(br, xa, w.mlp, c.mlp, n, s.ffn);
  else
    moe_rows(br, xa, w.moe, c.moe, n, s.ffn);
  for (size_t i = 0; i < nD; ++i) x[i] += br[i];
}

#define DSV3_INSTANTIATE(T)                                                                                    \
  template void block_forward<T>(T*, const BlockSaved<T>&, const T*, const BlockWeights<T>&, const BlockConfig&, \
                                 int, int, int, const MlaRope<T>&);                                            \
  template void block_backward<T>(const BlockGrads<T>&, T*, const T*, const T*, const BlockSaved<T>&, const T*,  \
                                  const BlockWeights<T>&, const BlockConfig&, int, int, int, const MlaRope<T>&); \
  template void block_decode<T>(T*, const MlaCache<T>&, const BlockWeights<T>&, const BlockConfig&, int, int,    \
                                const MlaRope<T>&, BlockDecodeScratch<T>&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu

template BlockSaved<float> block_saved_layout<float>(float*, int*, const BlockConfig&, int, int);
template BlockSaved<double> block_saved_layout<double>(double*, int*, const BlockConfig&, int, int);

}  // namespace dsv3
