// Stage 03, the reference: the readable specification of DeepSeekMoE's forward and backward.
// Shapes: see the legend in moe.h. Matrix products through cpu::gemm (Eigen, row-major).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>

#include "03_moe/moe.h"
#include "03_moe/moe_expert_parallel.h"
#include "03_moe/moe_route.h"
#include "common/errors.h"
#include "common/gemm_cpu.h"
#include "common/rowwise.h"
#include "common/rng.h"

namespace dsv3 {

void MoeConfig::validate() const {
  require(dim > 0, "dim must be positive, got {}", dim);
  require(moe_inter_dim > 0, "moe_inter_dim must be positive, got {}", moe_inter_dim);
  require(n_routed_experts > 0, "n_routed_experts must be positive, got {}", n_routed_experts);
  require(n_shared_experts >= 0, "n_shared_experts must be >= 0, got {}", n_shared_experts);
  require(n_activated_experts > 0 && n_activated_experts <= n_routed_experts,
          "n_activated_experts must be in [1, n_routed_experts = {}], got {}", n_routed_experts,
          n_activated_experts);
  require(n_expert_groups > 0 && n_expert_groups <= kMaxExpertGroups,
          "n_expert_groups must be in [1, {}], got {}", kMaxExpertGroups, n_expert_groups);
  require(n_routed_experts % n_expert_groups == 0,
          "n_expert_groups = {} must divide n_routed_experts = {}", n_expert_groups, n_routed_experts);
  require(n_expert_groups == 1 || group_size() >= 2,
          "each expert group needs >= 2 experts (a group scores by its top-2), got n_routed_experts/n_expert_groups = {}",
          group_size());
  require(n_limited_groups > 0 && n_limited_groups <= n_expert_groups,
          "n_limited_groups must be in [1, n_expert_groups = {}], got {}", n_expert_groups, n_limited_groups);
  require(n_expert_groups == 1 || n_activated_experts <= group_size() * n_limited_groups,
          "n_activated_experts = {} exceeds the {} experts of the n_limited_groups = {} kept groups",
          n_activated_experts, group_size() * n_limited_groups, n_limited_groups);
  require(route_scale > 0.f && std::isfinite(route_scale), "route_scale must be positive, got {}", route_scale);
  if (experts == MoeExperts::Segmented || experts == MoeExperts::Hopper) {
    const char* name = experts == MoeExperts::Hopper ? "Hopper" : "Segmented";
    require(matmul == Matmul::BF16, "experts = {} runs bf16 products only: it needs matmul = BF16, got {} "
            "(use MoeExperts::Grouped)", name, matmul_name(matmul));
    require(dim % 8 == 0 && moe_inter_dim % 8 == 0, "experts = {} needs dim and moe_inter_dim multiples of "
            "8 (its tiles load 8 bf16 at a time), got {} and {} (use MoeExperts::Grouped)", name, dim, moe_inter_dim);
  }
}

void validate_mlp_call(const MlpConfig& c, int N) {
  c.validate();
  require(N >= 0, "mlp: number of tokens N must be >= 0, got {}", N);
}

bool segmented_experts_fit(const MoeConfig& c) {
  return c.matmul == Matmul::BF16 && c.dim % 8 == 0 && c.moe_inter_dim % 8 == 0;
}

bool hopper_experts_available() {
#ifdef DSV3_HAVE_CUDA
  return cuda::segmented_gemm_wgmma_available();
#else
  return false;
#endif
}

void validate_moe_call(const MoeConfig& c, int N) {
  c.validate();
  require(N >= 0, "moe: number of tokens N must be >= 0, got {}", N);
}

void MlpConfig::validate() const {
  require(dim > 0, "MlpConfig.dim must be positive, got {}", dim);
  require(inter_dim > 0, "MlpConfig.inter_dim must be positive, got {}", inter_dim);
}

size_t moe_saved_size(const MoeConfig& c, int N) {
  const size_t n = N, E = c.n_routed_experts, K = c.n_activated_experts, F = c.moe_inter_dim, D = c.dim,
               Fs = c.shared_inter_dim();
  return 2 * saved_field_count(n * E) + saved_field_count(n * K) + 2 * saved_field_count(n * K * F) +
         saved_field_count(n * K * D) + 2 * saved_field_count(n * Fs);
}
size_t moe_saved_int_size(const MoeConfig& c, int N) {
  const size_t n = N, E = c.n_routed_experts, K = c.n_activated_experts;
  return 3 * n * K + 2 * E + 1;
}

template <typename T>
MoeSaved<T> moe_saved_layout(T* base, int* ibase, const MoeConfig& c, int N) {
  const size_t n = N, E = c.n_routed_experts, K = c.n_activated_experts, F = c.moe_inter_dim, D = c.dim,
               Fs = c.shared_inter_dim();
  MoeSaved<T> s;
  auto take = [&](size_t count) { T* p = base; base += saved_field_count(count); return p; };
  auto take_i = [&](size_t count) { int* p = ibase; ibase += count; return p; };
  s.scores = take(n * E);
  s.sel = take(n * E);
  s.weights = take(n * K);
  s.h1 = take(n * K * F);
  s.h3 = take(n * K * F);
  s.eo = take(n * K * D);
  s.sh1 = take(n * Fs);
  s.sh3 = take(n * Fs);
  s.indices = take_i(n * K);
  s.counts = take_i(E);
  s.offsets = take_i(E + 1);
  s.perm = take_i(n * K);
  s.slot_row = take_i(n * K);
  return s;
}

namespace cpu {
namespace {

template <typename T>
T silu(T x) { return x / (T(1) + std::exp(-x)); }
template <typename T>
T dsilu(T x) {  // d/dx x*sigmoid(x) = sig * (1 + x (1 - sig))
  const T sg = T(1) / (T(1) + std::exp(-x));
  return sg * (T(1) + x * (T(1) - sg));
}

// a (rows, F) = silu(h1) * h3
template <typename T>
std::vector<T> swiglu(const T* h1, const T* h3, size_t n) {
  std::vector<T> a(n);
  for (size_t i = 0; i < n; ++i) a[i] = silu(h1[i]) * h3[i];
  return a;
}

// One SwiGLU FFN on `rows` rows: h1 = x W1^T, h3 = x W3^T, y = (silu(h1) * h3) W2^T.
template <typename T>
void ffn_forward(T* y, T* h1, T* h3, const T* x, const T* W1, const T* W2, const T* W3, int rows, int D, int F) {
  if (rows == 0) return;
  gemm(Op::N, Op::T, rows, F, D, T(1), x, W1, T(0), h1);
  gemm(Op::N, Op::T, rows, F, D, T(1), x, W3, T(0), h3);
  const auto a = swiglu(h1, h3, size_t(rows) * F);
  gemm(Op::N, Op::T, rows, D, F, T(1), a.data(), W2, T(0), y);
}

// Its backward: dW1/dW2/dW3 += ..., dx (rows, D) = dh1 W1 + dh3 W3.
template <typename T>
void ffn_backward(T* dW1, T* dW2, T* dW3, T* dx, const T* dy, const T* h1, const T* h3, const T* x, const T* W1,
                  const T* W2, const T* W3, int rows, int D, int F) {
  if (rows == 0) return;
  const size_t n = size_t(rows) * F;
  const auto a = swiglu(h1, h3, n);
  std::vector<T> da(n), dh1(n), dh3(n);
  gemm(Op::N, Op::N, rows, F, D, T(1), dy, W2, T(0), da.data());  // da = dy W2
  gemm(Op::T, Op::N, D, F, rows, T(1), dy, a.data(), T(1), dW2);  // dW2 += dy^T a
  for (size_t i = 0; i < n; ++i) {
    dh1[i] = da[i] * h3[i] * dsilu(h1[i]);
    dh3[i] = da[i] * silu(h1[i]);
  }
  gemm(Op::T, Op::N, F, D, rows, T(1), dh1.data(), x, T(1), dW1);
  gemm(Op::T, Op::N, F, D, rows, T(1), dh3.data(), x, T(1), dW3);
  gemm(Op::N, Op::N, rows, D, F, T(1), dh1.data(), W1, T(0), dx);
  gemm(Op::N, Op::N, rows, D, F, T(1), dh3.data(), W3, T(1), dx);
}

// Router for all tokens: scores, sel, indices, weights (moe_route.h does one token).
template <typename T>
void route(const MoeSaved<T>& s, const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N) {
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim;
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  std::vector<T> logits(size_t(N) * E);
  gemm(Op::N, Op::T, N, E, D, T(1), inp, w.gate_weight, T(0), logits.data());
  for (int n = 0; n < N; ++n) {
    const size_t r = size_t(n) * E, q = size_t(n) * K;
    moe_route::scores_from_logits(s.scores + r, logits.data() + r, E, softmax);
    moe_route::route_token(s.sel + r, s.indices + q, s.weights + q, s.scores + r, w.gate_bias, E, K,
                           c.n_expert_groups, c.n_limited_groups, T(c.route_scale), !softmax);
  }
}

// ---- expert parallel (moe_expert_parallel.h) on host buffers -----------------------------------------------

// What a layer's forward exchange keeps for its backward.
struct HostEpState {
  ExpertParallel::Plan plan;
  std::vector<float> xg, h1, h3;  // the received token rows grouped by local expert, the experts' hiddens
};

// Rows of D floats in `order` (row i of out = row order[i] of in), or back (row order[i] of out = row i of in).
void gather_rows(float* out, const float* in, const std::vector<int>& order, int64_t D) {
  for (size_t i = 0; i < order.size(); ++i) std::copy_n(in + order[i] * D, D, out + int64_t(i) * D);
}
void scatter_rows(float* out, const float* in, const std::vector<int>& order, int64_t D) {
  for (size_t i = 0; i < order.size(); ++i) std::copy_n(in + int64_t(i) * D, D, out + order[i] * D);
}

void require_host_group(const MoeConfig& c) {
  require(!c.expert_parallel->comm().on_device(), "moe (CPU): expert parallel over {} needs a host group",
          c.expert_parallel->comm().describe());
}

// eo (NK, D, dispatch order) = each slot's expert on xp's row, the experts run by their owner ranks.
void ep_experts_forward(float* eo, const float* xp, const MoeSaved<float>& s, const MoeWeights<float>& w,
                        const MoeConfig& c) {
  require_host_group(c);
  ExpertParallel& ep = *c.expert_parallel;
  Communicator& comm = ep.comm();
  const int64_t D = c.dim, F = c.moe_inter_dim, FD = F * D;
  const ExpertShard mine = ep.shard(c.n_routed_experts);
  HostEpState& st = ep.state<HostEpState>(w.gate_weight);
  st.plan = ep.plan(s.offsets, c.n_routed_experts);
  const auto& p = st.plan;
  const int64_t recv = std::accumulate(p.recv_rows.begin(), p.recv_rows.end(), int64_t(0));
  std::vector<float> xr(size_t(recv * D));
  comm.all_to_all(xp, p.send_rows.data(), xr.data(), p.recv_rows.data(), D);
  st.xg.assign(size_t(recv * D), 0.f);
  gather_rows(st.xg.data(), xr.data(), p.local_order, D);
  st.h1.assign(size_t(recv * F), 0.f);
  st.h3.assign(size_t(recv * F), 0.f);
  std::vector<float> yg(size_t(recv * D), 0.f);
  for (int j = 0; j < mine.count; ++j) {
    const int64_t o = p.local_offsets[size_t(j)], e = mine.first + j;
    ffn_forward(yg.data() + o * D, st.h1.data() + o * F, st.h3.data() + o * F, st.xg.data() + o * D, w.w1 + e * FD,
                w.w2 + e * FD, w.w3 + e * FD, p.local_offsets[size_t(j) + 1] - int(o), int(D), int(F));
  }
  scatter_rows(xr.data(), yg.data(), p.local_order, D);  // back in received order
  comm.all_to_all(xr.data(), p.recv_rows.data(), eo, p.send_rows.data(), D);
}

// dxp (NK, D, dispatch order) from deo (the same order): the owners' experts' backward; their weight gradients +=.
void ep_experts_backward(const MoeGrads<float>& g, float* dxp, const float* deo, const MoeWeights<float>& w,
                         const MoeConfig& c) {
  ExpertParallel& ep = *c.expert_parallel;
  Communicator& comm = ep.comm();
  const int64_t D = c.dim, F = c.moe_inter_dim, FD = F * D;
  const ExpertShard mine = ep.shard(c.n_routed_experts);
  const HostEpState& st = ep.state<HostEpState>(w.gate_weight);
  const auto& p = st.plan;
  const int64_t recv = int64_t(p.local_order.size());
  std::vector<float> dr(size_t(recv * D)), dyg(size_t(recv * D)), dxg(size_t(recv * D), 0.f);
  comm.all_to_all(deo, p.send_rows.data(), dr.data(), p.recv_rows.data(), D);
  gather_rows(dyg.data(), dr.data(), p.local_order, D);
  for (int j = 0; j < mine.count; ++j) {
    const int64_t o = p.local_offsets[size_t(j)], e = mine.first + j;
    ffn_backward(g.w1 + e * FD, g.w2 + e * FD, g.w3 + e * FD, dxg.data() + o * D, dyg.data() + o * D,
                 st.h1.data() + o * F, st.h3.data() + o * F, st.xg.data() + o * D, w.w1 + e * FD, w.w2 + e * FD,
                 w.w3 + e * FD, p.local_offsets[size_t(j) + 1] - int(o), int(D), int(F));
  }
  scatter_rows(dr.data(), dxg.data(), p.local_order, D);
  comm.all_to_all(dr.data(), p.recv_rows.data(), dxp, p.send_rows.data(), D);
}

}  // namespace

template <typename T>
void moe_forward(T* out, const MoeSaved<T>& s, const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N) {
  validate_moe_call(c, N);
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim(), NK = N * K;
  // 1) route every token
  route(s, inp, w, c, N);
  // 2) dispatch: stable counting sort of the slots by expert -> counts, offsets, perm, slot_row
  for (int e = 0; e < E; ++e) s.counts[e] = 0;
  for (int i = 0; i < NK; ++i) ++s.counts[s.indices[i]];
  s.offsets[0] = 0;
  for (int e = 0; e < E; ++e) s.offsets[e + 1] = s.offsets[e] + s.counts[e];
  std::vector<int> fill(s.offsets, s.offsets + E);
  for (int i = 0; i < NK; ++i) {
    const int r = fill[s.indices[i]]++;
    s.perm[r] = i;
    s.slot_row[i] = r;
  }
  // 3) each routed expert on its slice of gathered tokens
  std::vector<T> xp(size_t(NK) * D);
  for (int r = 0; r < NK; ++r)
    std::copy_n(inp + size_t(s.perm[r] / K) * D, D, xp.data() + size_t(r) * D);
  if (c.expert_parallel) {  // every slot's expert on its owner rank (moe_expert_parallel.h); the group exchanges floats
    require(std::is_same<T, float>::value, "moe: expert parallel runs in fp32 (the host group exchanges floats)");
    if constexpr (std::is_same<T, float>::value) ep_experts_forward(s.eo, xp.data(), s, w, c);
  } else {
    for (int e = 0; e < E; ++e) {
      const size_t o = s.offsets[e];
      ffn_forward(s.eo + o * D, s.h1 + o * F, s.h3 + o * F, xp.data() + o * D, w.w1 + size_t(e) * F * D,
                  w.w2 + size_t(e) * D * F, w.w3 + size_t(e) * F * D, s.counts[e], D, F);
    }
  }
  // 4) out = shared(x) + sum_k w_k eo_k, in k order
  if (Fs > 0)
    ffn_forward(out, s.sh1, s.sh3, inp, w.shared_w1, w.shared_w2, w.shared_w3, N, D, Fs);
  else
    std::fill_n(out, size_t(N) * D, T(0));
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      const T wk = s.weights[size_t(n) * K + k];
      const T* y = s.eo + size_t(s.slot_row[n * K + k]) * D;
      for (int d = 0; d < D; ++d) out[size_t(n) * D + d] += wk * y[d];
    }
}

template <typename T>
void moe_backward(const MoeGrads<T>& g, T* dinp, const T* dout, const NoDeduce<T>* dscores_extra, const MoeSaved<T>& s,
                  const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N) {
  validate_moe_call(c, N);
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim(), NK = N * K;
  const bool softmax = c.score_func == ScoreFunc::Softmax;
  // 1) shared experts: dinp = their input gradient (overwrite)
  if (Fs > 0)
    ffn_backward(g.shared_w1, g.shared_w2, g.shared_w3, dinp, dout, s.sh1, s.sh3, inp, w.shared_w1, w.shared_w2,
                 w.shared_w3, N, D, Fs);
  else
    std::fill_n(dinp, size_t(N) * D, T(0));
  // 2) combine: dw[n,k] = dout_n . eo_slot;  deo_slot = w[n,k] dout_n   (dispatch order)
  std::vector<T> dw(static_cast<size_t>(NK)), deo(size_t(NK) * D), xp(size_t(NK) * D), dxp(size_t(NK) * D);
  for (int i = 0; i < NK; ++i) {
    const int r = s.slot_row[i], n = i / K;
    const T* dy = dout + size_t(n) * D;
    const T* y = s.eo + size_t(r) * D;
    T acc = 0;
    for (int d = 0; d < D; ++d) {
      acc += dy[d] * y[d];
      deo[size_t(r) * D + d] = s.weights[i] * dy[d];
    }
    dw[i] = acc;
    std::copy_n(inp + size_t(n) * D, D, xp.data() + size_t(r) * D);
  }
  // 3) each routed expert on its slice (expert parallel: on its owner rank)
  if (c.expert_parallel) {
    require(std::is_same<T, float>::value, "moe: expert parallel runs in fp32 (the host group exchanges floats)");
    if constexpr (std::is_same<T, float>::value) ep_experts_backward(g, dxp.data(), deo.data(), w, c);
  } else {
    for (int e = 0; e < E; ++e) {
      const size_t o = s.offsets[e];
      ffn_backward(g.w1 + size_t(e) * F * D, g.w2 + size_t(e) * D * F, g.w3 + size_t(e) * F * D, dxp.data() + o * D,
                   deo.data() + o * D, s.h1 + o * F, s.h3 + o * F, xp.data() + o * D, w.w1 + size_t(e) * F * D,
                   w.w2 + size_t(e) * D * F, w.w3 + size_t(e) * F * D, s.counts[e], D, F);
    }
  }
  // 4) router: dw -> d scores (through the normalisation) -> d logits (through sigmoid/softmax)
  std::vector<T> dlogits(size_t(N) * E);
  for (int n = 0; n < N; ++n) {
    T* dl = dlogits.data() + size_t(n) * E;
    const size_t q = size_t(n) * K;
    moe_route::route_token_backward(dl, dw.data() + q, s.indices + q, s.weights + q, s.scores + size_t(n) * E, E,
                                    K, T(c.route_scale), !softmax);
    if (dscores_extra)
      for (int e = 0; e < E; ++e) dl[e] += dscores_extra[size_t(n) * E + e];
    moe_route::scores_backward(dl, s.scores + size_t(n) * E, E, softmax);
  }
  gemm(Op::T, Op::N, E, D, N, T(1), dlogits.data(), inp, T(1), g.gate_weight);  // dWg += dlogits^T x
  gemm(Op::N, Op::N, N, D, E, T(1), dlogits.data(), w.gate_weight, T(1), dinp);  // dx += dlogits Wg
  // 5) the experts' input gradients back to their tokens, in k order
  for (int i = 0; i < NK; ++i) {
    const T* src = dxp.data() + size_t(s.slot_row[i]) * D;
    T* dst = dinp + size_t(i / K) * D;
    for (int d = 0; d < D; ++d) dst[d] += src[d];
  }
}

template <typename T>
void moe_forward_dense(T* out, const T* inp, const MoeWeights<T>& w, const MoeConfig& c, int N) {
  validate_moe_call(c, N);
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim,
            Fs = c.shared_inter_dim();
  // 1) the routing decision as a dense (N, E) weight matrix, zero where an expert was not chosen
  std::vector<T> sbuf(moe_saved_size(c, N));
  std::vector<int> ibuf(moe_saved_int_size(c, N));
  const MoeSaved<T> s = moe_saved_layout(sbuf.data(), ibuf.data(), c, N);
  route(s, inp, w, c, N);
  std::vector<T> mask(size_t(N) * E, T(0));
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) mask[size_t(n) * E + s.indices[size_t(n) * K + k]] = s.weights[size_t(n) * K + k];
  // 2) shared part, then every expert on every token, masked
  std::vector<T> h1(size_t(N) * std::max(F, Fs)), h3(h1.size()), y(size_t(N) * D);
  if (Fs > 0)
    ffn_forward(out, h1.data(), h3.data(), inp, w.shared_w1, w.shared_w2, w.shared_w3, N, D, Fs);
  else
    std::fill_n(out, size_t(N) * D, T(0));
  for (int e = 0; e < E; ++e) {
    ffn_forward(y.data(), h1.data(), h3.data(), inp, w.w1 + size_t(e) * F * D, w.w2 + size_t(e) * D * F,
                w.w3 + size_t(e) * F * D, N, D, F);
    for (int n = 0; n < N; ++n)
      for (int d = 0; d < D; ++d) out[size_t(n) * D + d] += mask[size_t(n) * E + e] * y[size_t(n) * D + d];
  }
}

template <typename T>
void mlp_forward(T* out, T* h1, T* h3, const T* inp, const MlpWeights<T>& w, const MlpConfig& c, int N) {
  validate_mlp_call(c, N);
  ffn_forward(out, h1, h3, inp, w.w1, w.w2, w.w3, N, c.dim, c.inter_dim);
}

template <typename T>
void mlp_backward(const MlpGrads<T>& g, T* dinp, const T* dout, const T* h1, const T* h3, const T* inp,
                  const MlpWeights<T>& w, const MlpConfig& c, int N) {
  validate_mlp_call(c, N);
  ffn_backward(g.w1, g.w2, g.w3, dinp, dout, h1, h3, inp, w.w1, w.w2, w.w3, N, c.dim, c.inter_dim);
}

// ---- the decode forms -----------------------------------------------------------------------------------

// y (rows, D) = (silu(x W1^T) * (x W3^T)) W2^T, row by row in a fixed order: the MLP and each routed expert.
template <typename T>
static void swiglu_rows(T* y, const T* x, const T* W1, const T* W2, const T* W3, int rows, int D, int F,
                        FfnRowsScratch<T>& s) {
  T* h1 = grow(s.h1, size_t(rows) * F);
  T* h3 = grow(s.h3, size_t(rows) * F);
  linear_rows(h1, x, W1, rows, D, F);
  linear_rows(h3, x, W3, rows, D, F);
  for (size_t i = 0; i < size_t(rows) * F; ++i) h1[i] = h1[i] / (T(1) + std::exp(-h1[i])) * h3[i];
  linear_rows(y, h1, W2, rows, F, D);
}

template <typename T>
void mlp_rows(T* out, const T* x, const MlpWeights<T>& w, const MlpConfig& c, int n, FfnRowsScratch<T>& s) {
  validate_mlp_call(c, n);
  swiglu_rows(out, x, w.w1, w.w2, w.w3, n, c.dim, c.inter_dim, s);
}

template <typename T>
void moe_rows(T* out, const T* x, const MoeWeights<T>& w, const MoeConfig& c, int n, FfnRowsScratch<T>& s) {
  validate_moe_call(c, n);
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim;
  const int Fs = c.shared_inter_dim();
  const bool softmax_scores = c.score_func == ScoreFunc::Softmax;
  // 1) route every token on its own, with the training router's rule (moe_route.h; ties to the lower index)
  T* logits = grow(s.logits, size_t(n) * E);
  T* score = grow(s.score, E);
  T* sel = grow(s.sel, E);
  T* rw = grow(s.route_w, size_t(n) * K);
  s.idx.resize(size_t(n) * K);
  linear_rows(logits, x, w.gate_weight, n, D, E);
  for (int t = 0; t < n; ++t) {
    moe_route::scores_from_logits(score, logits + size_t(t) * E, E, softmax_scores);
    moe_route::route_token(sel, s.idx.data() + size_t(t) * K, rw + size_t(t) * K, score, w.gate_bias, E, K,
                           c.n_expert_groups, c.n_limited_groups, T(c.route_scale), !softmax_scores);
  }
  // 2) the shared experts on every token
  if (Fs > 0)
    swiglu_rows(out, x, w.shared_w1, w.shared_w2, w.shared_w3, n, D, Fs, s);
  else
    std::fill_n(out, size_t(n) * D, T(0));
  // 3) each routed expert on the tokens that chose it (its weights read once per chunk); slot t*K+k keeps the
  //    output of token t's k-th expert
  T* slot_y = grow(s.slot_y, size_t(n) * K * D);
  for (int e = 0; e < E; ++e) {
    s.rows.clear();
    for (int i = 0; i < n * K; ++i)
      if (s.idx[i] == e) s.rows.push_back(i);
    const int m = int(s.rows.size());
    if (m == 0) continue;
    T* xg = grow(s.xg, size_t(m) * D);
    T* yg = grow(s.yg, size_t(m) * D);
    for (int r = 0; r < m; ++r) std::copy_n(x + size_t(s.rows[r] / K) * D, D, xg + size_t(r) * D);
    swiglu_rows(yg, xg, w.w1 + size_t(e) * F * D, w.w2 + size_t(e) * D * F, w.w3 + size_t(e) * F * D, m, D, F, s);
    for (int r = 0; r < m; ++r) std::copy_n(yg + size_t(r) * D, D, slot_y + size_t(s.rows[r]) * D);
  }
  // 4) out += w_k y_k in k order (as moe_forward)
  for (int t = 0; t < n; ++t)
    for (int k = 0; k < K; ++k) {
      const T wk = rw[size_t(t) * K + k];
      const T* y = slot_y + (size_t(t) * K + k) * D;
      T* o = out + size_t(t) * D;
      for (int d = 0; d < D; ++d) o[d] += wk * y[d];
    }
}

#define DSV3_INSTANTIATE(T)                                                                                   \
  template void moe_forward<T>(T*, const MoeSaved<T>&, const T*, const MoeWeights<T>&, const MoeConfig&, int); \
  template void moe_backward<T>(const MoeGrads<T>&, T*, const T*, const T*, const MoeSaved<T>&, const T*,     \
                                const MoeWeights<T>&, const MoeConfig&, int);                                 \
  template void moe_forward_dense<T>(T*, const T*, const MoeWeights<T>&, const MoeConfig&, int); \
  template void mlp_forward<T>(T*, T*, T*, const T*, const MlpWeights<T>&, const MlpConfig&, int);          \
  template void mlp_rows<T>(T*, const T*, const MlpWeights<T>&, const MlpConfig&, int, FfnRowsScratch<T>&);    \
  template void moe_rows<T>(T*, const T*, const MoeWeights<T>&, const MoeConfig&, int, FfnRowsScratch<T>&);    \
  template void mlp_backward<T>(const MlpGrads<T>&, T*, const T*, const T*, const T*, const T*,               \
                                const MlpWeights<T>&, const MlpConfig&, int);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu

template MoeSaved<float> moe_saved_layout<float>(float*, int*, const MoeConfig&, int);
template MoeSaved<double> moe_saved_layout<double>(double*, int*, const MoeConfig&, int);

}  // namespace dsv3
