// Stage 02, the Eigen reference: the readable specification of MLA (training form and both decode forms).
// Shapes: see the legend in mla.h. Matrix products go through cpu::gemm (common/gemm.h): row-major, with
// leading dimensions, so a head's slice of a wider row is addressed in place (ld = the row width).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "02_mla/mla.h"
#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rng.h"
#include "common/rowwise.h"

namespace dsv3 {

// ---- config, sizes, layout (shared with the CUDA entry points) -----------------------------------

double MlaConfig::softmax_scale() const {
  return 1.0 / std::sqrt(static_cast<double>(qk_head_dim())) * yarn_softmax_scale_factor(rope);
}

void MlaConfig::validate() const {
  require(dim > 0, "MlaConfig.dim must be positive, got {}", dim);
  require(n_heads > 0, "MlaConfig.n_heads must be positive, got {}", n_heads);
  require(q_lora_rank >= 0, "MlaConfig.q_lora_rank must be >= 0 (0 = no q compression), got {}", q_lora_rank);
  require(kv_lora_rank > 0, "MlaConfig.kv_lora_rank must be positive (the latent c_kv), got {}", kv_lora_rank);
  require(qk_nope_head_dim > 0, "MlaConfig.qk_nope_head_dim must be positive, got {}", qk_nope_head_dim);
  require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
          "MlaConfig.qk_rope_head_dim must be a positive even number, got {}: MLA's decoupled rope key k_pe "
          "carries all position information (c_kv stays position-free so wkv_b can be absorbed)",
          qk_rope_head_dim);
  require(v_head_dim > 0, "MlaConfig.v_head_dim must be positive, got {}", v_head_dim);
  require(norm_eps > 0.f, "MlaConfig.norm_eps must be positive, got {}", norm_eps);
  require(rope.qk_rope_head_dim == qk_rope_head_dim,
          "MlaConfig.rope.qk_rope_head_dim ({}) must equal MlaConfig.qk_rope_head_dim ({})", rope.qk_rope_head_dim,
          qk_rope_head_dim);
  rope.validate();
}

bool MlaConfig::fused_attention_fits() const {
  const int S = qk_head_dim(), Dv = v_head_dim;
  return (S <= 96 && Dv <= 64) || (S <= 32 && Dv <= 32);
}

bool MlaConfig::fused_attention() const {
  if (attention == Attention::Materialized) return false;
  if (attention == Attention::Fused) {
    require(fused_attention_fits(), "MlaConfig.attention = Fused: the fused kernels take qk head dims up to 96 with "
            "v_head_dim up to 64, got {} and {}", qk_head_dim(), v_head_dim);
    return true;
  }
  return matmul == Matmul::BF16 && fused_attention_fits();
}

void validate_mla_call(const MlaConfig& c, int B, int seq, int pos0, int table_positions) {
  c.validate();
  require(B > 0 && seq > 0, "mla: B and T must be positive, got B={} T={}", B, seq);
  require(pos0 >= 0 && pos0 + seq <= table_positions,
          "mla: positions {}..{} exceed the {} positions of the rope tables (raise rope.max_seq_len)", pos0,
          pos0 + seq - 1, table_positions);
}

void validate_mla_decode(const MlaConfig& c, int B, int pos, int max_len, int table_positions) {
  validate_mla_call(c, B, 1, pos, table_positions);
  require(pos < max_len, "mla decode: position {} does not fit a cache of max_len {}", pos, max_len);
}

namespace {
// Element counts of the MlaSaved fields, in declaration order.
std::vector<size_t> saved_counts(const MlaConfig& c, int B, int seq) {
  const size_t N = size_t(B) * seq, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  const size_t qr = Dq > 0 ? N : 0;
  const bool fused = c.fused_attention();
  return {N * Dq, qr, N * Dq, N * H * c.qk_head_dim(), N * Dc, N, N * Dc, N * c.qk_rope_head_dim,
          N * H * c.kv_head_dim(), fused ? 0 : size_t(B) * H * seq * seq, N * H * c.v_head_dim, fused ? N * H : 0};
}
}  // namespace

size_t mla_saved_size(const MlaConfig& c, int B, int seq) {
  size_t n = 0;
  for (size_t k : saved_counts(c, B, seq)) n += k;
  return n;
}

template <typename T>
MlaSaved<T> mla_saved_layout(T* base, const MlaConfig& c, int B, int seq) {
  const auto n = saved_counts(c, B, seq);
  T* p = base;
  auto take = [&](size_t i) {
    T* r = p;
    p += n[i];
    return r;
  };
  MlaSaved<T> s;
  s.q_lat = take(0);
  s.q_rstd = take(1);
  s.q_lat_n = take(2);
  s.q = take(3);
  s.kv_lat = take(4);
  s.kv_rstd = take(5);
  s.c_kv = take(6);
  s.k_pe = take(7);
  s.kv = take(8);
  s.att = take(9);
  s.y = take(10);
  s.lse = take(11);
  return s;
}
template MlaSaved<float> mla_saved_layout(float*, const MlaConfig&, int, int);
template MlaSaved<double> mla_saved_layout(double*, const MlaConfig&, int, int);

namespace cpu {
namespace {

// y (rows, out) = x (rows, in) W^T, W (out, in): a PyTorch Linear without bias.
template <typename T>
void linear(T* y, const T* x, const T* W, int rows, int in, int out) {
  gemm(Op::N, Op::T, rows, out, in, T(1), x, in, W, in, T(0), y, out);
}
// dx (rows, in) = dy W (beta 0) or += (beta 1); dW (out, in) += dy^T x.
template <typename T>
void linear_backward(T* dW, T* dx, const T* dy, const T* x, const T* W, int rows, int in, int out, T beta_dx) {
  gemm(Op::N, Op::N, rows, in, out, T(1), dy, out, W, in, beta_dx, dx, in);
  gemm(Op::T, Op::N, out, in, rows, T(1), dy, out, x, in, T(1), dW, in);
}

// 1) q (N, H*S) = wq_b(q_norm(wq_a x)), or wq x without q compression. RoPE is applied by the caller.
template <typename T>
void project_q(T* q, T* q_lat, T* q_rstd, T* q_lat_n, const T* x, const MlaWeights<T>& w, const MlaConfig& c, int N) {
  const int D = c.dim, Dq = c.q_lora_rank, HS = c.n_heads * c.qk_head_dim();
  if (Dq > 0) {
    linear(q_lat, x, w.wq_a, N, D, Dq);
    rmsnorm_forward(q_lat_n, q_rstd, q_lat, w.q_norm, N, Dq, c.norm_eps);
    linear(q, q_lat_n, w.wq_b, N, Dq, HS);
  } else {
    linear(q, x, w.wq, N, D, HS);
  }
}

// 2) [kv_lat | k_pe] = wkv_a x, split by rows of wkv_a; c_kv = kv_norm(kv_lat). RoPE on k_pe by the caller.
template <typename T>
void project_kv(T* kv_lat, T* kv_rstd, T* c_kv, T* k_pe, const T* x, const MlaWeights<T>& w, const MlaConfig& c,
                int N) {
  const int D = c.dim, Dc = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
  linear(kv_lat, x, w.wkv_a, N, D, Dc);
  linear(k_pe, x, w.wkv_a + size_t(Dc) * D, N, D, Dr);
  rmsnorm_forward(c_kv, kv_rstd, kv_lat, w.kv_norm, N, Dc, c.norm_eps);
}

// RoPE on the q_pe slice of every head of q (B, T, H, S) and on the single k_pe (B, T, Dr).
template <typename T>
void rope_q_kpe(T* q, T* k_pe, const MlaConfig& c, int B, int seq, int pos0, const MlaRope<T>& r, bool backward) {
  const RopeDims dq{B, seq, c.n_heads, c.qk_head_dim(), c.qk_nope_head_dim, c.qk_rope_head_dim, pos0};
  const RopeDims dk{B, seq, 1, c.qk_rope_head_dim, 0, c.qk_rope_head_dim, pos0};
  if (backward) {
    rope_backward(q, q, r.cos, r.sin, dq, r.positions);
    rope_backward(k_pe, k_pe, r.cos, r.sin, dk, r.positions);
  } else {
    rope_forward(q, q, r.cos, r.sin, dq, r.positions);
    rope_forward(k_pe, k_pe, r.cos, r.sin, dk, r.positions);
  }
}

// In place: row[0, valid) <- softmax(row[0, valid)), row[valid, L) <- 0 (masked positions).
template <typename T>
void softmax_row(T* row, int L, int valid) {
  const T m = *std::max_element(row, row + valid);
  T sum = 0;
  for (int s = 0; s < valid; ++s) sum += (row[s] = std::exp(row[s] - m));
  for (int s = 0; s < valid; ++s) row[s] /= sum;
  std::fill(row + valid, row + L, T(0));
}

// Writes the new token's latent (B, Dc) and rope key (B, Dr) at position pos of every sequence.
template <typename T>
void append_to_cache(const MlaCache<T>& cache, const T* c_kv, const T* k_pe, const MlaConfig& c, int B, int pos) {
  const int Dc = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
  for (int b = 0; b < B; ++b) {
    std::copy_n(c_kv + size_t(b) * Dc, Dc, cache.c_kv + (size_t(b) * cache.max_len + pos) * Dc);
    std::copy_n(k_pe + size_t(b) * Dr, Dr, cache.k_pe + (size_t(b) * cache.max_len + pos) * Dr);
  }
}

// The part both decode forms share: project the new token, rope it, append its latent to the cache.
// Returns q (B, H, S) with RoPE applied.
template <typename T>
std::vector<T> decode_prologue(const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w, const MlaConfig& c,
                               int B, int pos, const MlaRope<T>& rope) {
  validate_mla_decode(c, B, pos, cache.max_len, rope.positions);
  const int Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  std::vector<T> q(size_t(B) * c.n_heads * c.qk_head_dim()), q_lat(size_t(B) * Dq), q_rstd(Dq > 0 ? B : 0),
      q_lat_n(q_lat.size()), kv_lat(size_t(B) * Dc), kv_rstd(B), c_kv(kv_lat.size()),
      k_pe(size_t(B) * c.qk_rope_head_dim);
  project_q(q.data(), q_lat.data(), q_rstd.data(), q_lat_n.data(), inp, w, c, B);
  project_kv(kv_lat.data(), kv_rstd.data(), c_kv.data(), k_pe.data(), inp, w, c, B);
  rope_q_kpe(q.data(), k_pe.data(), c, B, 1, pos, rope, false);
  append_to_cache(cache, c_kv.data(), k_pe.data(), c, B, pos);
  return q;
}

}  // namespace

// ---- training form ------------------------------------------------------------------------------

template <typename T>
void mla_forward(T* out, const MlaSaved<T>& s, const T* inp, const MlaWeights<T>& w, const MlaConfig& c, int B,
                 int seq, int pos0, const MlaRope<T>& rope) {
  validate_mla_call(c, B, seq, pos0, rope.positions);
  require(!c.fused_attention(), "cpu::mla_forward materialises the probabilities: its config must not select the "
          "fused attention (attention = Fused, or Auto with matmul = BF16), whose saved layout has no room for them");
  const int N = B * seq, H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int Dc = c.kv_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim();
  const T scale = static_cast<T>(c.softmax_scale());
  // 1) queries, 2) latent and rope key, 3) RoPE on q_pe and k_pe only
  project_q(s.q, s.q_lat, s.q_rstd, s.q_lat_n, inp, w, c, N);
  project_kv(s.kv_lat, s.kv_rstd, s.c_kv, s.k_pe, inp, w, c, N);
  rope_q_kpe(s.q, s.k_pe, c, B, seq, pos0, rope, false);
  // 4) per-head k_nope and v from the latent: kv (N, H, KS) = c_kv wkv_b^T
  linear(s.kv, s.c_kv, w.wkv_b, N, Dc, H * KS);
  // 5) per (b, h): scores = scale (q_nope k_nope^T + q_pe k_pe^T), causal softmax, y_h = P v_h
  for (int b = 0; b < B; ++b) {
    const T* k_pe = s.k_pe + size_t(b) * seq * Dr;  // (T, Dr), shared by all heads
    for (int h = 0; h < H; ++h) {
      const T* qh = s.q + size_t(b) * seq * H * S + size_t(h) * S;      // (T, S), ld H*S
      const T* kh = s.kv + size_t(b) * seq * H * KS + size_t(h) * KS;   // (T, KS), ld H*KS: [k_nope | v]
      T* P = s.att + (size_t(b) * H + h) * seq * seq;                    // (T, T)
      gemm(Op::N, Op::T, seq, seq, Dn, scale, qh, H * S, kh, H * KS, T(0), P, seq);
      gemm(Op::N, Op::T, seq, seq, Dr, scale, qh + Dn, H * S, k_pe, Dr, T(1), P, seq);
      for (int t = 0; t < seq; ++t) softmax_row(P + size_t(t) * seq, seq, t + 1);
      gemm(Op::N, Op::N, seq, Dv, seq, T(1), P, seq, kh + Dn, H * KS, T(0), s.y + size_t(b) * seq * H * Dv + h * Dv,
           H * Dv);
    }
  }
  // 6) out = wo y
  linear(out, s.y, w.wo, N, H * Dv, c.dim);
}

template <typename T>
void mla_backward(const MlaGrads<T>& g, T* dinp, const T* dout, const MlaSaved<T>& s, const T* inp,
                  const MlaWeights<T>& w, const MlaConfig& c, int B, int seq, int pos0, const MlaRope<T>& rope) {
  validate_mla_call(c, B, seq, pos0, rope.positions);
  require(!c.fused_attention(), "cpu::mla_backward reads the materialised probabilities: its config must not select "
          "the fused attention");
  const int N = B * seq, D = c.dim, H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim;
  const int Dv = c.v_head_dim, Dc = c.kv_lora_rank, Dq = c.q_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim();
  const T scale = static_cast<T>(c.softmax_scale());
  std::vector<T> dy(size_t(N) * H * Dv), dq(size_t(N) * H * S), dkv(size_t(N) * H * KS), dk_pe(size_t(N) * Dr, T(0)),
      dP(size_t(seq) * seq), dc_kv(size_t(N) * Dc), dkv_lat(size_t(N) * Dc);
  // 6) out = wo y
  linear_backward(g.wo, dy.data(), dout, s.y, w.wo, N, H * Dv, D, T(0));
  // 5) attention, per (b, h)
  for (int b = 0; b < B; ++b) {
    const T* k_pe = s.k_pe + size_t(b) * seq * Dr;
    T* dkpe_b = dk_pe.data() + size_t(b) * seq * Dr;
    for (int h = 0; h < H; ++h) {
      const size_t qo = size_t(b) * seq * H * S + size_t(h) * S, ko = size_t(b) * seq * H * KS + size_t(h) * KS;
      const T* qh = s.q + qo;
      const T* kh = s.kv + ko;
      const T* P = s.att + (size_t(b) * H + h) * seq * seq;
      const T* dyh = dy.data() + size_t(b) * seq * H * Dv + h * Dv;
      // dP = dy_h v_h^T;  dv_h = P^T dy_h
      gemm(Op::N, Op::T, seq, seq, Dv, T(1), dyh, H * Dv, kh + Dn, H * KS, T(0), dP.data(), seq);
      gemm(Op::T, Op::N, seq, Dv, seq, T(1), P, seq, dyh, H * Dv, T(0), dkv.data() + ko + Dn, H * KS);
      // softmax backward: dscore = scale * P * (dP - rowsum(P * dP)); zero where P is masked
      for (int t = 0; t < seq; ++t) {
        T* r = dP.data() + size_t(t) * seq;
        const T* p = P + size_t(t) * seq;
        T dot = 0;
        for (int u = 0; u <= t; ++u) dot += p[u] * r[u];
        for (int u = 0; u < seq; ++u) r[u] = u <= t ? scale * p[u] * (r[u] - dot) : T(0);
      }
      // dq_nope = dS k_nope, dq_pe = dS k_pe;  dk_nope = dS^T q_nope;  dk_pe += dS^T q_pe (summed over heads)
      gemm(Op::N, Op::N, seq, Dn, seq, T(1), dP.data(), seq, kh, H * KS, T(0), dq.data() + qo, H * S);
      gemm(Op::N, Op::N, seq, Dr, seq, T(1), dP.data(), seq, k_pe, Dr, T(0), dq.data() + qo + Dn, H * S);
      gemm(Op::T, Op::N, seq, Dn, seq, T(1), dP.data(), seq, qh, H * S, T(0), dkv.data() + ko, H * KS);
      gemm(Op::T, Op::N, seq, Dr, seq, T(1), dP.data(), seq, qh + Dn, H * S, T(1), dkpe_b, Dr);
    }
  }
  // 3) RoPE is a rotation: its backward rotates the gradients back
  rope_q_kpe(dq.data(), dk_pe.data(), c, B, seq, pos0, rope, true);
  // 4) kv = wkv_b c_kv; c_kv = kv_norm(kv_lat)
  linear_backward(g.wkv_b, dc_kv.data(), dkv.data(), s.c_kv, w.wkv_b, N, Dc, H * KS, T(0));
  rmsnorm_backward(g.kv_norm, dkv_lat.data(), dc_kv.data(), s.kv_rstd, s.kv_lat, w.kv_norm, N, Dc);
  // 2) [kv_lat | k_pe] = wkv_a x: the two row blocks of wkv_a
  linear_backward(g.wkv_a, dinp, dkv_lat.data(), inp, w.wkv_a, N, D, Dc, T(0));
  linear_backward(g.wkv_a + size_t(Dc) * D, dinp, dk_pe.data(), inp, w.wkv_a + size_t(Dc) * D, N, D, Dr, T(1));
  // 1) queries
  if (Dq > 0) {
    std::vector<T> dq_lat_n(size_t(N) * Dq), dq_lat(size_t(N) * Dq);
    linear_backward(g.wq_b, dq_lat_n.data(), dq.data(), s.q_lat_n, w.wq_b, N, Dq, H * S, T(0));
    rmsnorm_backward(g.q_norm, dq_lat.data(), dq_lat_n.data(), s.q_rstd, s.q_lat, w.q_norm, N, Dq);
    linear_backward(g.wq_a, dinp, dq_lat.data(), inp, w.wq_a, N, D, Dq, T(1));
  } else {
    linear_backward(g.wq, dinp, dq.data(), inp, w.wq, N, D, H * S, T(1));
  }
}

// ---- decode -------------------------------------------------------------------------------------

template <typename T>
void mla_decode_step_naive(T* out, const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w,
                           const MlaConfig& c, int B, int pos, const MlaRope<T>& rope) {
  const std::vector<T> q = decode_prologue(cache, inp, w, c, B, pos, rope);
  const int H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const int Dc = c.kv_lora_rank, S = c.qk_head_dim(), KS = c.kv_head_dim(), L = pos + 1;
  const T scale = static_cast<T>(c.softmax_scale());
  std::vector<T> kv(size_t(L) * H * KS), p(L), o(size_t(B) * H * Dv);
  for (int b = 0; b < B; ++b) {
    // expand every cached latent to per-head [k_nope | v]: kv (L, H, KS) = c_kv wkv_b^T
    linear(kv.data(), cache.c_kv + size_t(b) * cache.max_len * Dc, w.wkv_b, L, Dc, H * KS);
    const T* k_pe = cache.k_pe + size_t(b) * cache.max_len * Dr;  // (L, Dr)
    for (int h = 0; h < H; ++h) {
      const T* qh = q.data() + (size_t(b) * H + h) * S;
      gemm(Op::N, Op::T, 1, L, Dn, scale, qh, S, kv.data() + h * KS, H * KS, T(0), p.data(), L);
      gemm(Op::N, Op::T, 1, L, Dr, scale, qh + Dn, S, k_pe, Dr, T(1), p.data(), L);
      softmax_row(p.data(), L, L);
      gemm(Op::N, Op::N, 1, Dv, L, T(1), p.data(), L, kv.data() + h * KS + Dn, H * KS, T(0),
           o.data() + (size_t(b) * H + h) * Dv, Dv);
    }
  }
  linear(out, o.data(), w.wo, B, H * Dv, c.dim);
}

template <typename T>
void mla_decode_chunk_absorbed(T* out, const MlaCache<T>& cache, const T* x, const MlaWeights<T>& w,
                               const MlaConfig& c, int n, int pos0, const MlaRope<T>& rope,
                               MlaDecodeScratch<T>* scratch) {
  validate_mla_call(c, 1, n, pos0, rope.positions);
  require(pos0 + n <= cache.max_len, "mla decode: positions {}..{} do not fit a cache of max_len {}", pos0,
          pos0 + n - 1, cache.max_len);
  MlaDecodeScratch<T> local;
  MlaDecodeScratch<T>& s = scratch ? *scratch : local;
  const int D = c.dim, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank, Dn = c.qk_nope_head_dim;
  const int Dr = c.qk_rope_head_dim, Dv = c.v_head_dim, S = c.qk_head_dim(), KS = c.kv_head_dim();
  const T scale = static_cast<T>(c.softmax_scale());
  // 1) queries q (n, H, S) = wq_b q_norm(wq_a x), or wq x without q compression
  T* q = grow(s.q, size_t(n) * H * S);
  if (Dq > 0) {
    T* q_lat = grow(s.q_lat, size_t(n) * Dq);
    linear_rows(q_lat, x, w.wq_a, n, D, Dq);
    rmsnorm_rows(q_lat, q_lat, w.q_norm, n, Dq, c.norm_eps);
    linear_rows(q, q_lat, w.wq_b, n, Dq, H * S);
  } else {
    linear_rows(q, x, w.wq, n, D, H * S);
  }
  // 2) [c_kv | k_pe] (n, Dc+Dr) = wkv_a x, c_kv = kv_norm(c_kv)
  T* kv = grow(s.kv, size_t(n) * (Dc + Dr));
  linear_rows(kv, x, w.wkv_a, n, D, Dc + Dr);
  for (int t = 0; t < n; ++t) {
    T* row = kv + size_t(t) * (Dc + Dr);
    rmsnorm_rows(row, row, w.kv_norm, 1, Dc, c.norm_eps);
  }
  // 3) RoPE on every head's q_pe and on k_pe, at positions pos0 + t
  rope_forward(q, q, rope.cos, rope.sin, RopeDims{1, n, H, S, Dn, Dr, pos0}, rope.positions);
  rope_forward(kv, kv, rope.cos, rope.sin, RopeDims{1, n, 1, Dc + Dr, Dc, Dr, pos0}, rope.positions);
  // 4) append the chunk's latents to the cache (before attending: a token sees the earlier ones of its chunk)
  for (int t = 0; t < n; ++t) {
    std::copy_n(kv + size_t(t) * (Dc + Dr), Dc, cache.c_kv + size_t(pos0 + t) * Dc);
    std::copy_n(kv + size_t(t) * (Dc + Dr) + Dc, Dr, cache.k_pe + size_t(pos0 + t) * Dr);
  }
  // 5) per token, all heads at once, in latent space: wkv_b's head h is (KS, Dc), rows [0, Dn) W_uk, rows
  //    [Dn, KS) W_uv. Positions are the outer loop of 5b and 5c so that each cached c_kv row is read once for all
  //    heads; every (head, element) still sums over the positions in ascending order.
  T* q_abs = grow(s.q_abs, size_t(H) * Dc);
  T* p = grow(s.att, size_t(H) * (pos0 + n));
  T* o_lat = grow(s.o_lat, size_t(H) * Dc);
  T* o = grow(s.o, size_t(n) * H * Dv);
  for (int t = 0; t < n; ++t) {
    const int L = pos0 + t + 1;
    const T* qt = q + size_t(t) * H * S;
    // 5a) q_abs_h (Dc) = q_nope_h W_uk_h
    std::fill_n(q_abs, size_t(H) * Dc, T(0));
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Dn; ++i) {
        const T qi = qt[size_t(h) * S + i];
        const T* row = w.wkv_b + (size_t(h) * KS + i) * Dc;
        T* qa = q_abs + size_t(h) * Dc;
        for (int j = 0; j < Dc; ++j) qa[j] += qi * row[j];
      }
    // 5b) scores against the cached c_kv and k_pe of positions 0..L-1, then softmax per head
    for (int l = 0; l < L; ++l) {
      const T* ck = cache.c_kv + size_t(l) * Dc;
      const T* kp = cache.k_pe + size_t(l) * Dr;
      for (int h = 0; h < H; ++h)
        p[size_t(h) * L + l] = scale * (dot(q_abs + size_t(h) * Dc, ck, Dc) + dot(qt + size_t(h) * S + Dn, kp, Dr));
    }
    for (int h = 0; h < H; ++h) softmax_row(p + size_t(h) * L, L, L);
    // 5c) o_lat_h (Dc) = sum_l p_hl c_kv_l;  o_h (Dv) = W_uv_h o_lat_h
    std::fill_n(o_lat, size_t(H) * Dc, T(0));
    for (int l = 0; l < L; ++l) {
      const T* ck = cache.c_kv + size_t(l) * Dc;
      for (int h = 0; h < H; ++h) {
        const T pl = p[size_t(h) * L + l];
        T* ol = o_lat + size_t(h) * Dc;
        for (int j = 0; j < Dc; ++j) ol[j] += pl * ck[j];
      }
    }
    for (int h = 0; h < H; ++h) {
      T* oh = o + (size_t(t) * H + h) * Dv;
      const T* wkv_b = w.wkv_b + size_t(h) * KS * Dc;
      for (int v = 0; v < Dv; ++v) oh[v] = dot(wkv_b + size_t(Dn + v) * Dc, o_lat + size_t(h) * Dc, Dc);
    }
  }
  // 6) out = wo o
  linear_rows(out, o, w.wo, n, H * Dv, D);
}

template <typename T>
void mla_decode_step_absorbed(T* out, const MlaCache<T>& cache, const T* inp, const MlaWeights<T>& w,
                              const MlaConfig& c, int B, int pos, const MlaRope<T>& rope) {
  validate_mla_decode(c, B, pos, cache.max_len, rope.positions);
  const size_t D = c.dim, Lmax = cache.max_len;
  MlaDecodeScratch<T> s;
  for (int b = 0; b < B; ++b) {  // one sequence's cache: (Lmax, Dc) and (Lmax, Dr) at its offset
    const MlaCache<T> one{cache.c_kv + b * Lmax * c.kv_lora_rank, cache.k_pe + b * Lmax * c.qk_rope_head_dim,
                          cache.max_len};
    mla_decode_chunk_absorbed(out + b * D, one, inp + b * D, w, c, 1, pos, rope, &s);
  }
}

#define DSV3_INSTANTIATE(T)                                                                                      \
  template void mla_forward<T>(T*, const MlaSaved<T>&, const T*, const MlaWeights<T>&, const MlaConfig&, int,    \
                               int, int, const MlaRope<T>&);                                                     \
  template void mla_backward<T>(const MlaGrads<T>&, T*, const T*, const MlaSaved<T>&, const T*,                  \
                                const MlaWeights<T>&, const MlaConfig&, int, int, int, const MlaRope<T>&);       \
  template void mla_decode_step_naive<T>(T*, const MlaCache<T>&, const T*, const MlaWeights<T>&,                 \
                                         const MlaConfig&, int, int, const MlaRope<T>&);                         \
  template void mla_decode_step_absorbed<T>(T*, const MlaCache<T>&, const T*, const MlaWeights<T>&,              \
                                            const MlaConfig&, int, int, const MlaRope<T>&);                      \
  template void mla_decode_chunk_absorbed<T>(T*, const MlaCache<T>&, const T*, const MlaWeights<T>&,             \
                                             const MlaConfig&, int, int, const MlaRope<T>&, MlaDecodeScratch<T>*);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu
}  // namespace dsv3
