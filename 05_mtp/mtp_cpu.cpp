// Stage 05, CPU reference of the MTP chain (mtp.h): the specification. Shapes: see mtp.h.
#include "05_mtp/mtp.h"

#include <algorithm>
#include <cmath>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "05_mtp/mtp_align.h"
#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"

namespace dsv3 {

void MtpConfig::validate() const {
  require(depth >= 0, "MtpConfig.depth must be >= 0, got {}", depth);
  require(vocab > 0, "MtpConfig.vocab must be positive, got {}", vocab);
  require(mtp_lambda >= 0, "MtpConfig.mtp_lambda must be >= 0, got {}", mtp_lambda);
  require(norm_eps > 0, "MtpConfig.norm_eps must be positive, got {}", norm_eps);
  block.validate();
}

void validate_mtp_call(const MtpConfig& c, int B, int seq, int table_positions) {
  c.validate();
  require(B > 0 && seq > 0, "mtp: B and T must be positive, got B={} T={}", B, seq);
  if (c.depth > 0) validate_block_call(c.block, B, seq, 0, table_positions);
}

// Per module: e, en, hn, hp, hk, z (N, D each), three rstd (N), probs (N, V), the block's saved.
static size_t module_saved_size(const MtpConfig& c, int B, int seq) {
  const size_t N = size_t(B) * seq, D = c.dim();
  const auto f = saved_field_count;  // 16-byte aligned fields (moe.h)
  return 6 * f(N * D) + 3 * f(N) + f(N * c.vocab) + f(block_saved_size(c.block, B, seq));
}
static size_t module_saved_int_size(const MtpConfig& c, int B, int seq) {
  return 2 * size_t(B) * seq + block_saved_int_size(c.block, B, seq);
}
size_t mtp_saved_size(const MtpConfig& c, int B, int seq) { return c.depth * module_saved_size(c, B, seq); }
size_t mtp_saved_int_size(const MtpConfig& c, int B, int seq) { return c.depth * module_saved_int_size(c, B, seq); }

template <typename T>
std::vector<MtpSaved<T>> mtp_saved_layout(T* base, int* ibase, const MtpConfig& c, int B, int seq) {
  const size_t N = size_t(B) * seq, D = c.dim();
  std::vector<MtpSaved<T>> out(c.depth);
  T* p = base;
  int* q = ibase;
  auto take = [&p](size_t n) {
    T* r = p;
    p += saved_field_count(n);
    return r;
  };
  auto take_int = [&q](size_t n) {
    int* r = q;
    q += n;
    return r;
  };
  for (auto& s : out) {
    s.tokens = take_int(N);
    s.targets = take_int(N);
    s.e = take(N * D);
    s.en = take(N * D);
    s.en_rstd = take(N);
    s.hn = take(N * D);
    s.hn_rstd = take(N);
    s.hp = take(N * D);
    s.block = block_saved_layout(take(block_saved_size(c.block, B, seq)),
                                 take_int(block_saved_int_size(c.block, B, seq)), c.block, B, seq);
    s.hk = take(N * D);
    s.z = take(N * D);
    s.z_rstd = take(N);
    s.probs = take(N * c.vocab);
  }
  return out;
}

namespace cpu {

template <typename T>
T mtp_forward(T* ce, const MtpSaved<T>* saved, const T* h0, const int* tokens, const MtpShared<T>& sh,
              const MtpModuleWeights<T>* modules, const MtpConfig& c, int B, int seq, const MlaRope<T>& rope) {
  validate_mtp_call(c, B, seq, rope.positions);
  const int N = B * seq, D = c.dim(), V = c.vocab;
  std::vector<T> logits(size_t(N) * V);
  T sum = 0;
  const T* h_prev = h0;  // module k reads the previous depth's normalised output: h0 = final_norm(h_L), then z^{k-1}
  for (int k = 1; k <= c.depth; ++k) {
    const MtpSaved<T>& s = saved[k - 1];
    const MtpModuleWeights<T>& m = modules[k - 1];
    // 1) align: token t_{i+k} in, target t_{i+k+1} out
    for (int n = 0; n < N; ++n) mtp_align::align(s.tokens + n, s.targets + n, tokens, n, seq, k, kIgnoreTarget);
    // 2) the two normalised inputs
    embedding_forward(s.e, s.tokens, sh.embed, N, D, V);
    rmsnorm_forward(s.en, s.en_rstd, s.e, m.enorm, N, D, c.norm_eps);
    rmsnorm_forward(s.hn, s.hn_rstd, h_prev, m.hnorm, N, D, c.norm_eps);
    // 3) h' = [en ; hn] eh_proj^T, as two products over the column blocks of eh_proj (D, 2D)
    gemm(Op::N, Op::T, N, D, D, T(1), s.en, D, m.eh_proj, 2 * D, T(0), s.hp, D);
    gemm(Op::N, Op::T, N, D, D, T(1), s.hn, D, m.eh_proj + D, 2 * D, T(1), s.hp, D);
    // 4) the module's transformer block
    block_forward(s.hk, s.block, s.hp, m.block, c.block, B, seq, 0, rope);
    // 5) the shared final norm and head, cross-entropy against t_{i+k+1}: eq. 24's sum over the T-k targets / T
    rmsnorm_forward(s.z, s.z_rstd, s.hk, sh.norm, N, D, c.norm_eps);
    gemm(Op::N, Op::T, N, V, D, T(1), s.z, sh.head, T(0), logits.data());
    ce[k - 1] = T(mtp_align::ce_scale(seq, k)) * cross_entropy_forward(s.probs, logits.data(), s.targets, N, V);
    sum += ce[k - 1];
    h_prev = s.z;
  }
  return c.depth > 0 ? T(c.mtp_lambda) / T(c.depth) * sum : T(0);
}

template <typename T>
void mtp_backward(const MtpModuleGrads<T>* mg, const MtpSharedGrads<T>& sg, T* dh0, NoDeduce<T> dloss,
                  const NoDeduce<T>* const* dscores_extra, const MtpSaved<T>* saved, const T* h0, const int* tokens,
                  const MtpShared<T>& sh, const MtpModuleWeights<T>* modules, const MtpConfig& c, int B, int seq,
                  const MlaRope<T>& rope) {
  validate_mtp_call(c, B, seq, rope.positions);
  (void)tokens;  // the aligned tokens were saved by the forward
  const int N = B * seq, D = c.dim(), V = c.vocab;
  const size_t ND = size_t(N) * D;
  std::fill_n(dh0, ND, T(0));
  if (c.depth == 0) return;
  const T dce = dloss * T(c.mtp_lambda) / T(c.depth);  // d L / d CE_k, the same for every depth
  std::vector<T> dlogits(size_t(N) * V), dz(ND), dhk(ND), dhp(ND), den(ND), dhn(ND), de(ND);
  // dz_next: d L / d z^k through module k+1, which reads z^k (zero for the last module); ends as dh0.
  std::vector<T> dz_next(ND, T(0));
  for (int k = c.depth; k >= 1; --k) {
    const MtpSaved<T>& s = saved[k - 1];
    const MtpModuleWeights<T>& m = modules[k - 1];
    const MtpModuleGrads<T>& g = mg[k - 1];
    const T* h_prev = k == 1 ? h0 : saved[k - 2].z;
    // 5) cross-entropy (eq. 24's 1/T), shared head; the gradient from module k+1 joins at z^k; final norm
    cross_entropy_backward(dlogits.data(), dce * T(mtp_align::ce_scale(seq, k)), s.probs, s.targets, N, V);
    gemm(Op::T, Op::N, V, D, N, T(1), dlogits.data(), s.z, T(1), sg.head);  // dhead += dlogits^T z
    gemm(Op::N, Op::N, N, D, V, T(1), dlogits.data(), sh.head, T(0), dz.data());
    for (size_t i = 0; i < ND; ++i) dz[i] += dz_next[i];
    rmsnorm_backward(sg.norm, dhk.data(), dz.data(), s.z_rstd, s.hk, sh.norm, N, D);
    // 4) block (with the balance-loss gradient on its router's scores, when the caller gives one)
    block_backward(g.block, dhp.data(), dhk.data(), dscores_extra ? dscores_extra[k - 1] : nullptr, s.block, s.hp,
                   m.block, c.block, B, seq, 0, rope);
    // 3) eh_proj: den = dhp W[:, :D], dhn = dhp W[:, D:], dW[:, :D] += dhp^T en, dW[:, D:] += dhp^T hn
    gemm(Op::N, Op::N, N, D, D, T(1), dhp.data(), D, m.eh_proj, 2 * D, T(0), den.data(), D);
    gemm(Op::N, Op::N, N, D, D, T(1), dhp.data(), D, m.eh_proj + D, 2 * D, T(0), dhn.data(), D);
    gemm(Op::T, Op::N, D, D, N, T(1), dhp.data(), D, s.en, D, T(1), g.eh_proj, 2 * D);
    gemm(Op::T, Op::N, D, D, N, T(1), dhp.data(), D, s.hn, D, T(1), g.eh_proj + D, 2 * D);
    // 2) enorm -> shared embedding; hnorm -> the previous depth's normalised output
    rmsnorm_backward(g.enorm, de.data(), den.data(), s.en_rstd, s.e, m.enorm, N, D);
    embedding_backward(sg.embed, de.data(), s.tokens, N, D, V);
    rmsnorm_backward(g.hnorm, dz_next.data(), dhn.data(), s.hn_rstd, h_prev, m.hnorm, N, D);
  }
  std::copy(dz_next.begin(), dz_next.end(), dh0);
}

#define DSV3_INSTANTIATE(T)                                                                                        \
  template T mtp_forward<T>(T*, const MtpSaved<T>*, const T*, const int*, const MtpShared<T>&,                     \
                            const MtpModuleWeights<T>*, const MtpConfig&, int, int, const MlaRope<T>&);            \
  template void mtp_backward<T>(const MtpModuleGrads<T>*, const MtpSharedGrads<T>&, T*, T, const T* const*,       \
                                const MtpSaved<T>*, const T*, const int*, const MtpShared<T>&,                     \
                                const MtpModuleWeights<T>*, const MtpConfig&, int, int, const MlaRope<T>&);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu

template std::vector<MtpSaved<float>> mtp_saved_layout<float>(float*, int*, const MtpConfig&, int, int);
template std::vector<MtpSaved<double>> mtp_saved_layout<double>(double*, int*, const MtpConfig&, int, int);

}  // namespace dsv3
