// Stage 07, the CPU sampler (sampler.h): KV-cached absorbed-MLA decoding of the whole model, the MTP draft,
// token sampling and speculative decoding. Shapes: see the legend in sampler.h.
//
// Everything a token goes through is computed row by row with dot() below, whose summation order is fixed by
// the source (not by the chunk size, a BLAS kernel's blocking or a pointer's alignment): that is the whole
// reason this file does not call cpu::gemm, and it is what makes a chunked feed bitwise equal to single feeds.
#include "07_train_gpu/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "03_moe/moe_route.h"
#include "07_train_gpu/data.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/timer.h"

namespace dsv3 {

// Grown on demand, never shrunk: after the first few calls decoding allocates nothing.
struct DecodeScratch {
  std::vector<float> x, xa, branch;                        // block: residual, normed input, branch output (n, D)
  std::vector<float> q_lat, q, kv, q_abs, att, o_lat, o;   // MLA
  std::vector<float> h1, h3;                               // SwiGLU hidden (rows, F)
  std::vector<float> gate, score, sel, route_w, xg, yg, slot_y;  // MoE
  std::vector<int> idx, rows;
  std::vector<float> z, cat;                               // final norm (n, D); MTP input [en ; hn] (n, 2D)
};

namespace {

float* grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---- row-independent kernels ----------------------------------------------------------------------------

// a . b: 16 interleaved partial sums (lane j takes elements j, j+16, j+32, ...), then a fixed pairwise combine.
// The compiler maps the lanes onto SIMD registers; the order of every addition is the source's.
float dot(const float* a, const float* b, int n) {
  constexpr int W = 16;
  float acc[W] = {};
  int i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  for (int w = W / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// y (n, out) = x (n, in) W^T, W (out, in): each row of W is read once for the whole chunk.
void linear(float* y, const float* x, const float* W, int n, int in, int out) {
  for (int o = 0; o < out; ++o) {
    const float* w = W + size_t(o) * in;
    for (int t = 0; t < n; ++t) y[size_t(t) * out + o] = dot(w, x + size_t(t) * in, in);
  }
}

// out (n, D) = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), per row. out may equal x.
void rmsnorm_rows(float* out, const float* x, const float* w, int n, int D, float eps) {
  for (int t = 0; t < n; ++t) {
    const float* r = x + size_t(t) * D;
    float* y = out + size_t(t) * D;
    const float rstd = 1.0f / std::sqrt(dot(r, r, D) / float(D) + eps);
    for (int d = 0; d < D; ++d) y[d] = r[d] * rstd * w[d];
  }
}

// In place over p[0, L): softmax.
void softmax(float* p, int L) {
  const float m = *std::max_element(p, p + L);
  float sum = 0;
  for (int l = 0; l < L; ++l) sum += (p[l] = std::exp(p[l] - m));
  for (int l = 0; l < L; ++l) p[l] /= sum;
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

// y (rows, D) = (silu(x W1^T) * (x W3^T)) W2^T: stage 03's dense MLP and each of its experts.
void swiglu(float* y, const float* x, const float* W1, const float* W2, const float* W3, int rows, int D, int F,
            DecodeScratch& s) {
  float* h1 = grow(s.h1, size_t(rows) * F);
  float* h3 = grow(s.h3, size_t(rows) * F);
  linear(h1, x, W1, rows, D, F);
  linear(h3, x, W3, rows, D, F);
  for (size_t i = 0; i < size_t(rows) * F; ++i) h1[i] = silu(h1[i]) * h3[i];
  linear(y, h1, W2, rows, F, D);
}

// out (n, D) = DeepSeekMoE(x): stage 03's layer, token by token.
void moe_rows(float* out, const float* x, const MoeWeights<float>& w, const MoeConfig& c, int n, DecodeScratch& s) {
  const int E = c.n_routed_experts, K = c.n_activated_experts, D = c.dim, F = c.moe_inter_dim;
  const int Fs = c.shared_inter_dim();
  const bool softmax_scores = c.score_func == ScoreFunc::Softmax;
  // 1) route every token on its own, with the training router's rule (moe_route.h; ties to the lower index)
  float* logits = grow(s.gate, size_t(n) * E);
  float* score = grow(s.score, E);
  float* sel = grow(s.sel, E);
  float* rw = grow(s.route_w, size_t(n) * K);
  s.idx.resize(size_t(n) * K);
  linear(logits, x, w.gate_weight, n, D, E);
  for (int t = 0; t < n; ++t) {
    moe_route::scores_from_logits(score, logits + size_t(t) * E, E, softmax_scores);
    moe_route::route_token(sel, s.idx.data() + size_t(t) * K, rw + size_t(t) * K, score, w.gate_bias, E, K,
                           c.n_expert_groups, c.n_limited_groups, c.route_scale, !softmax_scores);
  }
  // 2) the shared experts on every token
  if (Fs > 0)
    swiglu(out, x, w.shared_w1, w.shared_w2, w.shared_w3, n, D, Fs, s);
  else
    std::fill_n(out, size_t(n) * D, 0.0f);
  // 3) each routed expert on the tokens that chose it (its weights read once per chunk); slot t*K+k keeps the
  //    output of token t's k-th expert
  float* slot_y = grow(s.slot_y, size_t(n) * K * D);
  for (int e = 0; e < E; ++e) {
    s.rows.clear();
    for (int i = 0; i < n * K; ++i)
      if (s.idx[i] == e) s.rows.push_back(i);
    const int m = int(s.rows.size());
    if (m == 0) continue;
    float* xg = grow(s.xg, size_t(m) * D);
    float* yg = grow(s.yg, size_t(m) * D);
    for (int r = 0; r < m; ++r) std::copy_n(x + size_t(s.rows[r] / K) * D, D, xg + size_t(r) * D);
    swiglu(yg, xg, w.w1 + size_t(e) * F * D, w.w2 + size_t(e) * D * F, w.w3 + size_t(e) * F * D, m, D, F, s);
    for (int r = 0; r < m; ++r) std::copy_n(yg + size_t(r) * D, D, slot_y + size_t(s.rows[r]) * D);
  }
  // 4) out += w_k y_k in k order (as stage 03)
  for (int t = 0; t < n; ++t)
    for (int k = 0; k < K; ++k) {
      const float wk = rw[size_t(t) * K + k];
      const float* y = slot_y + (size_t(t) * K + k) * D;
      float* o = out + size_t(t) * D;
      for (int d = 0; d < D; ++d) o[d] += wk * y[d];
    }
}

// The absorbed MLA decode of n tokens at positions pos0.. (cpu::mla_decode_chunk_absorbed, with scratch).
void mla_rows(float* out, const MlaCache<float>& cache, const float* x, const MlaWeights<float>& w,
              const MlaConfig& c, int n, int pos0, const MlaRope<float>& rope, DecodeScratch& s) {
  const int D = c.dim, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank, Dn = c.qk_nope_head_dim;
  const int Dr = c.qk_rope_head_dim, Dv = c.v_head_dim, S = c.qk_head_dim(), KS = c.kv_head_dim();
  const float scale = static_cast<float>(c.softmax_scale());
  // 1) queries q (n, H, S) = wq_b q_norm(wq_a x), or wq x without q compression
  float* q = grow(s.q, size_t(n) * H * S);
  if (Dq > 0) {
    float* q_lat = grow(s.q_lat, size_t(n) * Dq);
    linear(q_lat, x, w.wq_a, n, D, Dq);
    rmsnorm_rows(q_lat, q_lat, w.q_norm, n, Dq, c.norm_eps);
    linear(q, q_lat, w.wq_b, n, Dq, H * S);
  } else {
    linear(q, x, w.wq, n, D, H * S);
  }
  // 2) [c_kv | k_pe] (n, Dc+Dr) = wkv_a x, c_kv = kv_norm(c_kv)
  float* kv = grow(s.kv, size_t(n) * (Dc + Dr));
  linear(kv, x, w.wkv_a, n, D, Dc + Dr);
  for (int t = 0; t < n; ++t) {
    float* row = kv + size_t(t) * (Dc + Dr);
    rmsnorm_rows(row, row, w.kv_norm, 1, Dc, c.norm_eps);
  }
  // 3) RoPE on every head's q_pe and on k_pe, at positions pos0 + t
  cpu::rope_forward(q, q, rope.cos, rope.sin, RopeDims{1, n, H, S, Dn, Dr, pos0}, rope.positions);
  cpu::rope_forward(kv, kv, rope.cos, rope.sin, RopeDims{1, n, 1, Dc + Dr, Dc, Dr, pos0}, rope.positions);
  // 4) append the chunk's latents to the cache (before attending: a token sees the earlier ones of its chunk)
  for (int t = 0; t < n; ++t) {
    std::copy_n(kv + size_t(t) * (Dc + Dr), Dc, cache.c_kv + size_t(pos0 + t) * Dc);
    std::copy_n(kv + size_t(t) * (Dc + Dr) + Dc, Dr, cache.k_pe + size_t(pos0 + t) * Dr);
  }
  // 5) per token and head, in latent space: wkv_b's head h is (KS, Dc), rows [0, Dn) W_uk, rows [Dn, KS) W_uv
  float* q_abs = grow(s.q_abs, Dc);
  float* p = grow(s.att, size_t(pos0) + n);
  float* o_lat = grow(s.o_lat, Dc);
  float* o = grow(s.o, size_t(n) * H * Dv);
  for (int t = 0; t < n; ++t) {
    const int L = pos0 + t + 1;
    for (int h = 0; h < H; ++h) {
      const float* qh = q + (size_t(t) * H + h) * S;
      const float* wkv_b = w.wkv_b + size_t(h) * KS * Dc;
      // 5a) q_abs (Dc) = q_nope W_uk
      std::fill_n(q_abs, Dc, 0.0f);
      for (int i = 0; i < Dn; ++i) {
        const float qi = qh[i];
        const float* row = wkv_b + size_t(i) * Dc;
        for (int j = 0; j < Dc; ++j) q_abs[j] += qi * row[j];
      }
      // 5b) scores against the cached c_kv and k_pe of positions 0..L-1, softmax
      for (int l = 0; l < L; ++l)
        p[l] = scale * (dot(q_abs, cache.c_kv + size_t(l) * Dc, Dc) + dot(qh + Dn, cache.k_pe + size_t(l) * Dr, Dr));
      softmax(p, L);
      // 5c) o_lat (Dc) = sum_l p_l c_kv_l;  o_h (Dv) = W_uv o_lat
      std::fill_n(o_lat, Dc, 0.0f);
      for (int l = 0; l < L; ++l) {
        const float pl = p[l];
        const float* ck = cache.c_kv + size_t(l) * Dc;
        for (int j = 0; j < Dc; ++j) o_lat[j] += pl * ck[j];
      }
      float* oh = o + (size_t(t) * H + h) * Dv;
      for (int v = 0; v < Dv; ++v) oh[v] = dot(wkv_b + size_t(Dn + v) * Dc, o_lat, Dc);
    }
  }
  // 6) out = wo o
  linear(out, o, w.wo, n, H * Dv, D);
}

// x (n, D) <- Block(x) for tokens at positions pos0..: h = x + MLA(attn_norm(x)); x = h + FFN(ffn_norm(h)).
void block_rows(float* x, Decoder::LatentCache& lc, const BlockWeights<float>& w, int max_len, int n, int pos0,
                const MlaRope<float>& rope, DecodeScratch& s) {
  const BlockConfig& c = lc.cfg;
  const int D = c.dim();
  const size_t nD = size_t(n) * D;
  float* xa = grow(s.xa, nD);
  float* br = grow(s.branch, nD);
  rmsnorm_rows(xa, x, w.attn_norm, n, D, c.norm_eps);
  mla_rows(br, MlaCache<float>{lc.c_kv.data(), lc.k_pe.data(), max_len}, xa, w.attn, c.attn, n, pos0, rope, s);
  for (size_t i = 0; i < nD; ++i) x[i] += br[i];
  rmsnorm_rows(xa, x, w.ffn_norm, n, D, c.norm_eps);
  if (c.ffn == FfnKind::Dense)
    swiglu(br, xa, w.mlp.w1, w.mlp.w2, w.mlp.w3, n, D, c.mlp.inter_dim, s);
  else
    moe_rows(br, xa, w.moe, c.moe, n, s);
  for (size_t i = 0; i < nD; ++i) x[i] += br[i];
}

int argmax(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

}  // namespace

namespace cpu {

void mla_decode_chunk_absorbed(float* out, const MlaCache<float>& cache, const float* inp,
                               const MlaWeights<float>& w, const MlaConfig& c, int n, int pos0,
                               const MlaRope<float>& rope) {
  validate_mla_call(c, 1, n, pos0, rope.positions);
  require(pos0 + n <= cache.max_len, "mla decode: positions {}..{} do not fit a cache of max_len {}", pos0,
          pos0 + n - 1, cache.max_len);
  DecodeScratch s;
  mla_rows(out, cache, inp, w, c, n, pos0, rope, s);
}

}  // namespace cpu

// ---- Decoder ----------------------------------------------------------------------------------------------

Decoder::Decoder(const Model<float>& model, int max_len)
    : model_(model), max_len_(max_len), scratch_(std::make_unique<DecodeScratch>()) {
  const ModelConfig& c = model.config();
  require(max_len >= 1, "decoder: max_len must be >= 1, got {}", max_len);
  require(max_len <= c.max_position_embeddings && max_len <= model.rope().positions,
          "decoder: max_len {} exceeds the model's max_position_embeddings {} (its RoPE table has {} positions)",
          max_len, c.max_position_embeddings, model.rope().positions);
  auto cache = [&](const BlockConfig& bc) {
    return LatentCache{bc, std::vector<float>(size_t(max_len) * bc.attn.kv_lora_rank),
                       std::vector<float>(size_t(max_len) * bc.attn.qk_rope_head_dim)};
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) layers_.push_back(cache(model.block_config(l)));
  if (c.num_nextn_predict_layers > 0) mtp_.push_back(cache(model.mtp_config().block));
  tokens_.assign(max_len, 0);
  mtp_tokens_.assign(max_len, 0);
  hidden_.assign(size_t(max_len) * c.hidden_size, 0.0f);
}

Decoder::~Decoder() = default;

void Decoder::reset() {
  pos_ = 0;
  mtp_pos_ = 0;
}

void Decoder::truncate(int new_pos) {
  require(new_pos >= 0 && new_pos <= pos_, "decoder: truncate to {} positions, but {} are fed", new_pos, pos_);
  pos_ = new_pos;
  mtp_pos_ = std::min(mtp_pos_, new_pos);  // MTP position new_pos-1 read t_{new_pos}: draft() re-checks it
}

const float* Decoder::normed_hidden(int p) const {
  require(p >= 0 && p < pos_, "decoder: position {} is not fed (pos() = {})", p, pos_);
  return hidden_.data() + size_t(p) * model_.config().hidden_size;
}

const std::vector<float>& Decoder::feed(const std::vector<int>& tokens) {
  const ModelConfig& c = model_.config();
  const int n = int(tokens.size()), D = c.hidden_size, V = c.vocab_size;
  require(n > 0, "decoder: feed needs at least one token");
  require(pos_ + n <= max_len_, "decoder: {} tokens at position {} do not fit max_len {}", n, pos_, max_len_);
  for (int t : tokens) require(t >= 0 && t < V, "decoder: token id {} is outside the vocabulary [0, {})", t, V);
  DecodeScratch& s = *scratch_;
  const MlaRope<float> rope = mla_rope(model_.rope());
  // 1) embedding, 2) every block over its own cache
  float* x = grow(s.x, size_t(n) * D);
  for (int t = 0; t < n; ++t) std::copy_n(model_.embed().data() + size_t(tokens[t]) * D, D, x + size_t(t) * D);
  for (size_t l = 0; l < layers_.size(); ++l)
    block_rows(x, layers_[l], model_.layer(int(l)).weights(), max_len_, n, pos_, rope, s);
  // 3) final norm (its output z is kept for the MTP module) and head
  float* z = grow(s.z, size_t(n) * D);
  rmsnorm_rows(z, x, model_.final_norm().data(), n, D, float(c.rms_norm_eps));
  std::copy_n(z, size_t(n) * D, hidden_.data() + size_t(pos_) * D);
  logits_.resize(size_t(n) * V);
  linear(logits_.data(), z, model_.head().data(), n, D, V);
  std::copy(tokens.begin(), tokens.end(), tokens_.begin() + pos_);
  pos_ += n;
  return logits_;
}

const std::vector<float>& Decoder::draft(int next) {
  const ModelConfig& c = model_.config();
  const int D = c.hidden_size, V = c.vocab_size;
  require(!mtp_.empty(), "decoder: the model has no MTP module (num_nextn_predict_layers = 0) to draft with");
  require(pos_ > 0, "decoder: draft needs a fed token first (the MTP module reads its normalised final hidden state)");
  require(next >= 0 && next < V, "decoder: token id {} is outside the vocabulary [0, {})", next, V);
  // 1) MTP position j embeds t_{j+1}: keep the computed prefix whose tokens still match (and always recompute
  //    the last position, whose output is what we return)
  auto input_token = [&](int j) { return j + 1 < pos_ ? tokens_[j + 1] : next; };
  int keep = 0;
  while (keep < std::min(mtp_pos_, pos_ - 1) && mtp_tokens_[keep] == input_token(keep)) ++keep;
  mtp_pos_ = keep;
  // 2) MTP positions j0..pos-1 as one chunk: h'_j = eh_proj [enorm(Emb(t_{j+1})) ; hnorm(z_j)] -> block
  const int j0 = mtp_pos_, m = pos_ - j0;
  const MtpConfig mc = model_.mtp_config();
  const MtpModuleWeights<float> mw = model_.mtp_module(0).weights();
  DecodeScratch& s = *scratch_;
  float* cat = grow(s.cat, size_t(m) * 2 * D);
  float* x = grow(s.x, size_t(m) * D);
  for (int r = 0; r < m; ++r) {
    const int j = j0 + r, tok = input_token(j);
    mtp_tokens_[j] = tok;
    rmsnorm_rows(cat + size_t(r) * 2 * D, model_.embed().data() + size_t(tok) * D, mw.enorm, 1, D, mc.norm_eps);
    rmsnorm_rows(cat + size_t(r) * 2 * D + D, hidden_.data() + size_t(j) * D, mw.hnorm, 1, D, mc.norm_eps);
  }
  linear(x, cat, mw.eh_proj, m, 2 * D, D);
  block_rows(x, mtp_[0], mw.block, max_len_, m, j0, mla_rope(model_.rope()), s);
  mtp_pos_ = pos_;
  // 3) the shared final norm and head, on the last position only
  float* z = grow(s.z, D);
  rmsnorm_rows(z, x + size_t(m - 1) * D, model_.final_norm().data(), 1, D, mc.norm_eps);
  draft_logits_.resize(V);
  linear(draft_logits_.data(), z, model_.head().data(), 1, D, V);
  return draft_logits_;
}

// ---- sampling ---------------------------------------------------------------------------------------------

void validate_sample_options(const SampleOptions& o) {
  require(std::isfinite(o.temperature) && o.temperature >= 0,
          "sample: temperature must be >= 0 (0 = greedy), got {}", o.temperature);
  require(o.top_k >= 0, "sample: top_k must be >= 0 (0 = off), got {}", o.top_k);
  require(o.top_p > 0 && o.top_p <= 1, "sample: top_p must be in (0, 1] (1 = off), got {}", o.top_p);
  require(o.max_new_tokens >= 1, "sample: max_new_tokens must be >= 1, got {}", o.max_new_tokens);
}

int sample_token(const float* logits, int V, const SampleOptions& opt, Rng& rng) {
  for (int i = 0; i < V; ++i)
    require(std::isfinite(logits[i]), "sample: the model produced a non-finite logit ({}) for token {}", logits[i], i);
  if (opt.temperature == 0) return argmax(logits, V);
  // 1) candidates by logit, ties to the lower id; cut to top_k
  std::vector<int> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  const int k = opt.top_k > 0 && opt.top_k < V ? opt.top_k : V;
  auto before = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (k < V)
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
  else
    std::sort(ids.begin(), ids.end(), before);
  // 2) softmax of logit / temperature over the k (unnormalised weights, in double)
  std::vector<double> p(k);
  double z = 0;
  for (int i = 0; i < k; ++i) z += (p[i] = std::exp((double(logits[ids[i]]) - logits[ids[0]]) / opt.temperature));
  // 3) nucleus: the shortest prefix whose probability reaches top_p, the top token always kept
  int keep = k;
  if (opt.top_p < 1) {
    double cum = 0;
    for (int i = 0; i < k; ++i) {
      cum += p[i] / z;
      if (cum >= opt.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // 4) one uniform draw, inverted through the cumulative weights of the kept tokens
  double zk = 0;
  for (int i = 0; i < keep; ++i) zk += p[i];
  const double u = rng.uniform() * zk;
  double cum = 0;
  for (int i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return ids[i];
  }
  return ids[keep - 1];
}

SampleResult generate_ids(const Model<float>& model, const std::vector<int>& prompt_ids, const SampleOptions& opt,
                          int eos_id, bool speculative) {
  validate_sample_options(opt);
  const ModelConfig& c = model.config();
  const int P = int(prompt_ids.size()), V = c.vocab_size;
  require(P > 0, "sample: the prompt is empty: it must hold at least one token");
  for (int t : prompt_ids)
    require(t >= 0 && t < V, "sample: prompt token id {} is outside the vocabulary [0, {})", t, V);
  require(P + opt.max_new_tokens <= c.max_position_embeddings,
          "sample: the prompt ({} tokens) + max_new_tokens ({}) exceed the model's max_position_embeddings ({}): "
          "shorten the prompt or ask for fewer tokens",
          P, opt.max_new_tokens, c.max_position_embeddings);
  require(!speculative || c.num_nextn_predict_layers > 0,
          "sample: speculative decoding drafts with the MTP module, and this model has none "
          "(num_nextn_predict_layers = 0)");
  CpuTimer timer;
  Decoder dec(model, P + opt.max_new_tokens);
  Rng rng(opt.seed);
  SampleResult r;
  r.prompt_tokens = P;
  // Appends a token; true when generation is over.
  auto emit = [&](int t) {
    r.tokens.push_back(t);
    return int(r.tokens.size()) == opt.max_new_tokens || (opt.stop_at_eos && eos_id >= 0 && t == eos_id);
  };
  int next = sample_token(dec.feed(prompt_ids).data() + size_t(P - 1) * V, V, opt, rng);
  bool done = emit(next);
  while (!done) {
    const int remaining = opt.max_new_tokens - int(r.tokens.size());
    if (!speculative || remaining < 2) {  // plain step (a draft cannot pay off for the last token)
      next = sample_token(dec.feed({next}).data(), V, opt, rng);
      done = emit(next);
      continue;
    }
    // speculative step: draft the token after next, let the main model check both in one feed
    const std::vector<float>& dl = dec.draft(next);
    const int d = argmax(dl.data(), V);
    ++r.drafted;
    const std::vector<float>& two = dec.feed({next, d});  // (2, V): after next, after d
    const int x = sample_token(two.data(), V, opt, rng);
    done = emit(x);
    if (x == d) {
      ++r.accepted;
      if (!done) {
        next = sample_token(two.data() + V, V, opt, rng);
        done = emit(next);
      }
    } else {
      dec.truncate(dec.pos() - 1);  // d's position is not part of the text
      next = x;
    }
  }
  r.seconds = timer.elapsed_ms() / 1e3;
  r.tokens_per_s = r.seconds > 0 ? double(r.tokens.size()) / r.seconds : 0;
  return r;
}

SampleResult generate(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt,
                      bool speculative) {
  validate_sample_options(opt);
  require(tok.vocab_size() == model.config().vocab_size,
          "sample: the tokenizer has {} tokens but the model's vocabulary is {}: use the tokenizer the model was "
          "trained with",
          tok.vocab_size(), model.config().vocab_size);
  const std::vector<int> ids = tok.encode(opt.prompt);
  require(!ids.empty(), "sample: the prompt \"{}\" tokenises to nothing: give at least one character", opt.prompt);
  SampleResult r = generate_ids(model, ids, opt, tok.eos_id(), speculative);
  r.text = tok.decode(r.tokens);
  return r;
}

SampleComparison generate_both(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt) {
  SampleComparison c;
  c.plain = generate(model, tok, opt, false);
  c.speculative = generate(model, tok, opt, true);
  c.speedup = c.speculative.seconds > 0 ? c.plain.seconds / c.speculative.seconds : 0;
  c.identical = c.plain.tokens == c.speculative.tokens;
  return c;
}

}  // namespace dsv3
