// Stage 02 tests: gradchecks of every parameter and the input (with and without q compression), an
// independent loop-by-loop reference of the forward, the oracles (absorbed decode == naive decode,
// cached step-by-step decoding == full forward, causality), edge shapes, config errors, CPU vs CUDA.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "02_mla/mla.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"
#ifdef DSV3_HAVE_CUDA
#include "02_mla/mla_device.h"
#endif

using namespace dsv3;

namespace {

// Small odd sizes (indexing bugs cannot hide behind powers of two). YaRN on: the tables cover more
// positions than original_seq_len, so the softmax scale carries mscale^2 and the frequencies are corrected.
MlaConfig small_config(int q_lora_rank, int H = 3, bool yarn = true) {
  MlaConfig c;
  c.dim = 12;
  c.n_heads = H;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 6;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 5;
  c.rope.qk_rope_head_dim = 4;
  c.rope.max_seq_len = 32;
  c.rope.original_seq_len = yarn ? 8 : 32;
  c.rope.rope_factor = 4.0;
  return c;
}

// Everything one MLA call needs on the host, in scalar type T.
template <typename T>
struct Problem {
  MlaConfig c;
  int B, seq, pos0;
  MlaParams<T> p;
  RopeTables<T> tab;
  std::vector<T> x, out, saved_buf;
  MlaSaved<T> saved;

  Problem(const MlaConfig& cfg, int B_, int Tn, uint64_t seed, int pos0_ = 0)
      : c(cfg), B(B_), seq(Tn), pos0(pos0_), p(mla_init_params<T>(cfg, seed, true)), tab(rope_tables<T>(cfg.rope)) {
    Rng rng(seed + 1);
    x = rng.normal_vec<T>(size_t(B) * seq * c.dim);
    out.assign(x.size(), T(0));
    saved_buf.assign(mla_saved_size(c, B, seq), T(0));
    saved = mla_saved_layout(saved_buf.data(), c, B, seq);
  }
  MlaRope<T> rope() const { return mla_rope(tab); }
  void forward() { cpu::mla_forward(out.data(), saved, x.data(), p.weights(), c, B, seq, pos0, rope()); }
  // Backward of loss = sum(R * out): parameter gradients into g (+=), input gradient returned.
  std::vector<T> backward(MlaParams<T>& g, const std::vector<T>& R) {
    std::vector<T> dx(x.size());
    cpu::mla_backward(g.grads(), dx.data(), R.data(), saved, x.data(), p.weights(), c, B, seq, pos0, rope());
    return dx;
  }
};

// Independent reference: the formulas of mla.h written as plain loops, one head and one pair of tokens at
// a time (model.py's naive form), sharing no code with mla_cpu.cpp beyond stage 01's RMSNorm and RoPE.
std::vector<double> loop_reference(Problem<double>& pb) {
  const MlaConfig& c = pb.c;
  const int B = pb.B, T = pb.seq, D = c.dim, H = c.n_heads, Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim;
  const int Dv = c.v_head_dim, Dc = c.kv_lora_rank, Dq = c.q_lora_rank, S = Dn + Dr, KS = Dn + Dv, N = B * T;
  auto lin = [](const std::vector<double>& in, const std::vector<double>& W, int rows, int nin, int nout) {
    std::vector<double> y(size_t(rows) * nout, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < nout; ++o)
        for (int i = 0; i < nin; ++i) y[size_t(r) * nout + o] += in[size_t(r) * nin + i] * W[size_t(o) * nin + i];
    return y;
  };
  auto norm = [&](const std::vector<double>& in, const std::vector<double>& w, int d) {
    std::vector<double> y(in.size()), r(in.size() / d);
    cpu::rmsnorm_forward(y.data(), r.data(), in.data(), w.data(), int(in.size() / d), d, c.norm_eps);
    return y;
  };
  std::vector<double> q = Dq > 0 ? lin(norm(lin(pb.x, pb.p.wq_a, N, D, Dq), pb.p.q_norm, Dq), pb.p.wq_b, N, Dq, H * S)
                                 : lin(pb.x, pb.p.wq, N, D, H * S);
  const std::vector<double> kva = lin(pb.x, pb.p.wkv_a, N, D, Dc + Dr);  // [c_kv | k_pe] per token
  std::vector<double> ckv(size_t(N) * Dc), kpe(size_t(N) * Dr);
  for (int n = 0; n < N; ++n) {
    for (int j = 0; j < Dc; ++j) ckv[size_t(n) * Dc + j] = kva[size_t(n) * (Dc + Dr) + j];
    for (int j = 0; j < Dr; ++j) kpe[size_t(n) * Dr + j] = kva[size_t(n) * (Dc + Dr) + Dc + j];
  }
  const auto rp = pb.rope();
  cpu::rope_forward(q.data(), q.data(), rp.cos, rp.sin, RopeDims{B, T, H, S, Dn, Dr, pb.pos0}, rp.positions);
  cpu::rope_forward(kpe.data(), kpe.data(), rp.cos, rp.sin, RopeDims{B, T, 1, Dr, 0, Dr, pb.pos0}, rp.positions);
  const std::vector<double> kv = lin(norm(ckv, pb.p.kv_norm, Dc), pb.p.wkv_b, N, Dc, H * KS);
  const double scale = std::pow(double(S), -0.5) * yarn_softmax_scale_factor(c.rope);
  std::vector<double> y(size_t(N) * H * Dv, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t) {
        std::vector<double> sc(t + 1);
        double m = -1e300, z = 0;
        for (int s = 0; s <= t; ++s) {
          double a = 0;
          const size_t qi = (size_t(b * T + t) * H + h) * S, ki = (size_t(b * T + s) * H + h) * KS;
          for (int j = 0; j < Dn; ++j) a += q[qi + j] * kv[ki + j];
          for (int j = 0; j < Dr; ++j) a += q[qi + Dn + j] * kpe[size_t(b * T + s) * Dr + j];
          sc[s] = a * scale;
          m = std::max(m, sc[s]);
        }
        for (auto& v : sc) z += (v = std::exp(v - m));
        for (int s = 0; s <= t; ++s)
          for (int j = 0; j < Dv; ++j)
            y[(size_t(b * T + t) * H + h) * Dv + j] += sc[s] / z * kv[(size_t(b * T + s) * H + h) * KS + Dn + j];
      }
  return lin(y, pb.p.wo, N, H * Dv, D);
}

// Decodes the tokens of pb.x one position at a time through a fresh latent cache; returns (B, T, D).
template <typename T, typename Step>
std::vector<T> decode_all(Problem<T>& pb, Step step) {
  const MlaConfig& c = pb.c;
  const int L = pb.pos0 + pb.seq;
  std::vector<T> ckv(size_t(pb.B) * L * c.kv_lora_rank), kpe(size_t(pb.B) * L * c.qk_rope_head_dim);
  const MlaCache<T> cache{ckv.data(), kpe.data(), L};
  std::vector<T> out(pb.x.size()), xt(size_t(pb.B) * c.dim), ot(xt.size());
  for (int t = 0; t < pb.seq; ++t) {
    for (int b = 0; b < pb.B; ++b)
      std::copy_n(&pb.x[(size_t(b) * pb.seq + t) * c.dim], c.dim, &xt[size_t(b) * c.dim]);
    step(ot.data(), cache, xt.data(), pb.pos0 + t);
    for (int b = 0; b < pb.B; ++b)
      std::copy_n(&ot[size_t(b) * c.dim], c.dim, &out[(size_t(b) * pb.seq + t) * c.dim]);
  }
  return out;
}


// Bitwise equality of two float tensors (the decode forms' chunk invariance).
bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

// ---- gradchecks ---------------------------------------------------------------------------------

struct GradCase {
  const char* name;
  int q_lora_rank, H, B, T, pos0;
  bool yarn;
};
void PrintTo(const GradCase& g, std::ostream* os) { *os << g.name; }

class MlaGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(MlaGrad, EveryParameterAndInput) {
  const GradCase k = GetParam();
  Problem<double> pb(small_config(k.q_lora_rank, k.H, k.yarn), k.B, k.T, 7, k.pos0);
  Rng rng(8);
  const auto R = rng.normal_vec<double>(pb.out.size());
  pb.forward();
  MlaParams<double> g = mla_zero_params<double>(pb.c);
  const auto dx = pb.backward(g, R);
  std::vector<GradTensor> tensors = {{"inp", &pb.x, &dx}};
  auto params = pb.p.tensors();
  auto grads = g.tensors();
  for (size_t i = 0; i < params.size(); ++i) tensors.push_back({params[i].first, params[i].second, grads[i].second});
  GradCheckOptions opt;
  opt.max_coords = 0;  // every coordinate: the shapes are small enough
  const auto r = gradcheck([&] { pb.forward(); return weighted_sum(pb.out, R); }, tensors, opt);
  EXPECT_GRADCHECK(r);
  EXPECT_EQ(r.tensors.size(), k.q_lora_rank > 0 ? 8u : 6u);  // inp + 7 params, or inp + wq + 4
}
INSTANTIATE_TEST_SUITE_P(
    Shapes, MlaGrad,
    ::testing::Values(GradCase{"q_compressed", 10, 3, 2, 5, 0, true},   //
                      GradCase{"no_q_compression_wq", 0, 3, 2, 5, 0, true},  //
                      GradCase{"plain_rope_offset_positions", 7, 2, 2, 5, 3, false},
                      GradCase{"one_head", 10, 1, 2, 5, 0, true},  //
                      GradCase{"one_token", 10, 3, 3, 1, 4, true}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Mla, ParameterGradientsAccumulateInputGradientOverwrites) {
  Problem<double> pb(small_config(10), 2, 4, 3);
  const auto R = Rng(4).normal_vec<double>(pb.out.size());
  pb.forward();
  MlaParams<double> g1 = mla_zero_params<double>(pb.c), g2 = g1;
  const auto dx1 = pb.backward(g1, R);
  pb.backward(g2, R);
  const auto dx2 = pb.backward(g2, R);
  expect_accumulates_and_overwrites(read_only(g1.tensors()), read_only(g2.tensors()), dx1, dx2);
}

// ---- the forward against an independent reference ----------------------------------------------

// ---- the absorbed decode of a chunk -------------------------------------------------------------------

// Oracles: the training-form forward (the whole sequence at once) and the naive decode (K and V expanded from
// the latent). Chunk invariance, bitwise: chunks 4 + 1 + 4 give the bits of single-token calls (stage 07's
// speculative decoding rests on it). Tolerance kElementwiseTol (rel 1e-5): fp32 with sums of at most
// max(D, Dc) = 19 terms in a different order.
TEST(Mla, ChunkedAbsorbedDecodeMatchesTheOtherFormsAndIsChunkInvariant) {
  MlaConfig c;
  c.dim = 19;
  c.n_heads = 3;
  c.q_lora_rank = 11;
  c.kv_lora_rank = 9;
  c.qk_nope_head_dim = 5;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 7;
  c.rope.qk_rope_head_dim = 4;
  c.rope.max_seq_len = 16;
  c.rope.original_seq_len = 16;
  const MlaParams<float> p = mla_init_params<float>(c, 5, true);
  const RopeTables<float> tables = rope_tables<float>(c.rope);
  const MlaRope<float> rope = mla_rope(tables);
  const int T = 9, D = c.dim, Lmax = 12;
  Rng rng(6);
  const std::vector<float> x = rng.normal_vec<float>(size_t(T) * D);
  // training form
  std::vector<float> ref(size_t(T) * D), saved(mla_saved_size(c, 1, T));
  cpu::mla_forward(ref.data(), mla_saved_layout(saved.data(), c, 1, T), x.data(), p.weights(), c, 1, T, 0, rope);
  // the naive decode, and the absorbed one: one by one, and in chunks 4 + 1 + 4
  auto new_cache = [&](std::vector<float>& ckv, std::vector<float>& kpe) {
    ckv.assign(size_t(Lmax) * c.kv_lora_rank, 0.0f);
    kpe.assign(size_t(Lmax) * c.qk_rope_head_dim, 0.0f);
    return MlaCache<float>{ckv.data(), kpe.data(), Lmax};
  };
  std::vector<float> c1, k1, c2, k2, c3, k3;
  const MlaCache<float> naive = new_cache(c1, k1), single = new_cache(c2, k2), chunked = new_cache(c3, k3);
  std::vector<float> outn(size_t(T) * D), out1(outn.size()), outc(outn.size());
  for (int t = 0; t < T; ++t) {
    cpu::mla_decode_step_naive(outn.data() + t * D, naive, x.data() + t * D, p.weights(), c, 1, t, rope);
    cpu::mla_decode_chunk_absorbed(out1.data() + t * D, single, x.data() + t * D, p.weights(), c, 1, t, rope);
  }
  int at = 0;
  for (int n : {4, 1, 4}) {
    cpu::mla_decode_chunk_absorbed(outc.data() + at * D, chunked, x.data() + at * D, p.weights(), c, n, at, rope);
    at += n;
  }
  EXPECT_CLOSE(compare(out1, ref, kElementwiseTol), "absorbed chunk decode vs mla_forward");
  EXPECT_CLOSE(compare(out1, outn, kElementwiseTol), "absorbed chunk decode vs the naive decode");
  EXPECT_TRUE(bitwise_equal(outc, out1)) << "chunks 4+1+4 differ from single-token calls";
  EXPECT_TRUE(bitwise_equal(c3, c2) && bitwise_equal(k3, k2)) << "the latent caches differ";
  EXPECT_THROW(cpu::mla_decode_chunk_absorbed(outc.data(), chunked, x.data(), p.weights(), c, 4, 9, rope),
               UserError);  // positions 9..12 do not fit max_len 12
}

TEST(Mla, ForwardEqualsLoopReference) {
  for (int dq : {10, 0}) {
    Problem<double> pb(small_config(dq), 2, 6, 11, 2);
    pb.forward();
    EXPECT_CLOSE(compare(pb.out, loop_reference(pb), {1e-13, 1e-11}), dq ? "with q compression" : "with wq");
  }
}

TEST(Mla, SoftmaxScaleIsDeepSeeks) {
  MlaConfig v3;  // V3: Dn 128, Dr 64, YaRN factor 40 active
  v3.qk_nope_head_dim = 128;
  v3.qk_rope_head_dim = 64;
  v3.rope.qk_rope_head_dim = 64;
  // 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.0721688 * 1.8738542
  EXPECT_NEAR(v3.softmax_scale(), 0.07216878 * 1.8738542, 1e-7);
  v3.rope.max_seq_len = v3.rope.original_seq_len;  // no context extension: no mscale
  EXPECT_NEAR(v3.softmax_scale(), 1.0 / std::sqrt(192.0), 1e-15);
}

TEST(Mla, RowsOfAttentionAreCausalDistributions) {
  Problem<double> pb(small_config(10), 2, 7, 5);
  pb.forward();
  const int T = pb.seq;
  for (int bh = 0; bh < pb.B * pb.c.n_heads; ++bh)
    for (int t = 0; t < T; ++t) {
      double sum = 0;
      for (int s = 0; s < T; ++s) {
        const double p = pb.saved.att[(size_t(bh) * T + t) * T + s];
        if (s > t) {
          EXPECT_EQ(p, 0.0);
        }
        sum += p;
      }
      EXPECT_NEAR(sum, 1.0, 1e-14);
    }
}

// ---- oracles ------------------------------------------------------------------------------------

TEST(Mla, CausalityLaterTokensDoNotChangeEarlierOutputs) {
  Problem<double> pb(small_config(10), 2, 6, 21);
  pb.forward();
  const auto before = pb.out;
  const int D = pb.c.dim, t_changed = 3;
  for (int b = 0; b < pb.B; ++b)
    for (int t = t_changed; t < pb.seq; ++t)
      for (int j = 0; j < D; ++j) pb.x[(size_t(b) * pb.seq + t) * D + j] += 0.5 + j;
  pb.forward();
  for (int b = 0; b < pb.B; ++b)
    for (int t = 0; t < pb.seq; ++t) {
      double diff = 0;
      for (int j = 0; j < D; ++j) diff = std::max(diff, std::abs(pb.out[(size_t(b) * pb.seq + t) * D + j] -
                                                                before[(size_t(b) * pb.seq + t) * D + j]));
      if (t < t_changed)
        EXPECT_EQ(diff, 0.0) << "b=" << b << " t=" << t;
      else
        EXPECT_GT(diff, 1e-6) << "b=" << b << " t=" << t;  // the change does reach later outputs
    }
}

class MlaDecode : public ::testing::TestWithParam<int> {};  // q_lora_rank

TEST_P(MlaDecode, CachedStepsEqualFullForwardNaiveAndAbsorbed) {
  Problem<double> pb(small_config(GetParam()), 2, 7, 31);
  pb.forward();
  const auto w = pb.p.weights();
  const auto rope = pb.rope();
  const auto naive = decode_all(pb, [&](double* o, const MlaCache<double>& cache, const double* x, int pos) {
    cpu::mla_decode_step_naive(o, cache, x, w, pb.c, pb.B, pos, rope);
  });
  const auto absorbed = decode_all(pb, [&](double* o, const MlaCache<double>& cache, const double* x, int pos) {
    cpu::mla_decode_step_absorbed(o, cache, x, w, pb.c, pb.B, pos, rope);
  });
  EXPECT_CLOSE(compare(naive, pb.out, {1e-13, 1e-11}), "naive decode vs full forward");
  EXPECT_CLOSE(compare(absorbed, pb.out, {1e-13, 1e-11}), "absorbed decode vs full forward");
  EXPECT_CLOSE(compare(absorbed, naive, {1e-13, 1e-11}), "absorbed vs naive");
}
INSTANTIATE_TEST_SUITE_P(QRank, MlaDecode, ::testing::Values(10, 0));

TEST(Mla, AbsorbedEqualsNaiveInFloat) {
  // fp32, a larger cache: absorption reorders the sums (Dn-products vs Dc-products), so agreement is to
  // reduction tolerance, not bit-exact.
  MlaConfig c = small_config(16, 4);
  c.dim = 40;
  c.kv_lora_rank = 24;
  c.qk_nope_head_dim = 12;
  c.qk_rope_head_dim = c.rope.qk_rope_head_dim = 8;
  c.v_head_dim = 10;
  Problem<float> pb(c, 3, 29, 41);
  pb.forward();
  const auto w = pb.p.weights();
  const auto rope = pb.rope();
  const auto naive = decode_all(pb, [&](float* o, const MlaCache<float>& cache, const float* x, int pos) {
    cpu::mla_decode_step_naive(o, cache, x, w, c, pb.B, pos, rope);
  });
  const auto absorbed = decode_all(pb, [&](float* o, const MlaCache<float>& cache, const float* x, int pos) {
    cpu::mla_decode_step_absorbed(o, cache, x, w, c, pb.B, pos, rope);
  });
  EXPECT_CLOSE(compare(absorbed, naive, kReductionTol), "absorbed vs naive (fp32)");
  EXPECT_CLOSE(compare(naive, pb.out, kReductionTol), "naive decode vs forward (fp32)");
}

TEST(Mla, CacheHoldsOnlyNormalisedLatentAndRotatedRopeKey) {
  Problem<double> pb(small_config(10), 2, 5, 51);
  pb.forward();
  const auto rope = pb.rope();
  const auto w = pb.p.weights();
  const int Dc = pb.c.kv_lora_rank, Dr = pb.c.qk_rope_head_dim;
  std::vector<double> ckv(size_t(pb.B) * pb.seq * Dc), kpe(size_t(pb.B) * pb.seq * Dr);
  decode_all(pb, [&](double* o, const MlaCache<double>& cc, const double* x, int pos) {
    cpu::mla_decode_step_absorbed(o, cc, x, w, pb.c, pb.B, pos, rope);
    for (size_t i = 0; i < ckv.size(); ++i) ckv[i] = cc.c_kv[i];
    for (size_t i = 0; i < kpe.size(); ++i) kpe[i] = cc.k_pe[i];
  });
  // Same (B, T, .) layout as the forward's saved c_kv and k_pe when max_len == T.
  EXPECT_CLOSE(compare(ckv, std::vector<double>(pb.saved.c_kv, pb.saved.c_kv + ckv.size()), {1e-14, 1e-12}), "c_kv");
  EXPECT_CLOSE(compare(kpe, std::vector<double>(pb.saved.k_pe, pb.saved.k_pe + kpe.size()), {1e-14, 1e-12}), "k_pe");
}

// ---- edge shapes and errors ---------------------------------------------------------------------

TEST(Mla, OddDimsForwardMatchesReference) {
  MlaConfig c = small_config(3, 1);
  c.dim = 5;
  c.kv_lora_rank = 3;
  c.qk_nope_head_dim = 1;
  c.qk_rope_head_dim = c.rope.qk_rope_head_dim = 2;
  c.v_head_dim = 7;
  Problem<double> pb(c, 1, 3, 61);
  pb.forward();
  EXPECT_CLOSE(compare(pb.out, loop_reference(pb), {1e-13, 1e-11}), "odd dims");
}

TEST(Mla, RejectsBadConfigsAndCalls) {
  MlaConfig c = small_config(10);
  c.qk_rope_head_dim = 0;
  c.rope.qk_rope_head_dim = 0;
  EXPECT_THROW(c.validate(), UserError);  // Dr = 0: no decoupled rope key
  try {
    c.validate();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("qk_rope_head_dim"), std::string::npos) << e.what();
  }
  c = small_config(10);
  c.rope.qk_rope_head_dim = 6;  // tables for another rope dim
  EXPECT_THROW(c.validate(), UserError);
  c = small_config(10);
  c.q_lora_rank = -1;
  EXPECT_THROW(c.validate(), UserError);
  c = small_config(10);
  c.kv_lora_rank = 0;
  EXPECT_THROW(c.validate(), UserError);

  Problem<float> pb(small_config(10), 1, 4, 1);
  const auto rope = pb.rope();
  EXPECT_THROW(cpu::mla_forward(pb.out.data(), pb.saved, pb.x.data(), pb.p.weights(), pb.c, 1, 4, 29, rope),
               UserError);  // positions 29..32 past the 32-position tables
  std::vector<float> ckv(4 * 8), kpe(4 * 4), o(12);
  const MlaCache<float> cache{ckv.data(), kpe.data(), 4};
  EXPECT_THROW(cpu::mla_decode_step_naive(o.data(), cache, pb.x.data(), pb.p.weights(), pb.c, 1, 4, rope),
               UserError);  // position 4 does not fit a cache of 4
  EXPECT_NO_THROW(cpu::mla_decode_step_naive(o.data(), cache, pb.x.data(), pb.p.weights(), pb.c, 1, 0, rope));
}

// ---- CUDA vs CPU --------------------------------------------------------------------------------

#ifdef DSV3_HAVE_CUDA
namespace {

struct CudaCase {
  const char* name;
  int q_lora_rank, H, B, T, pos0;
};
void PrintTo(const CudaCase& g, std::ostream* os) { *os << g.name; }

MlaConfig cuda_config(const CudaCase& k) {
  MlaConfig c = small_config(k.q_lora_rank, k.H);
  c.dim = 37;
  c.kv_lora_rank = 19;
  c.qk_nope_head_dim = 11;
  c.qk_rope_head_dim = c.rope.qk_rope_head_dim = 6;
  c.v_head_dim = 9;
  c.rope.max_seq_len = 128;
  c.rope.original_seq_len = 32;
  return c;
}

}  // namespace

class CudaMla : public ::testing::TestWithParam<CudaCase> {};

TEST_P(CudaMla, ForwardBackwardMatchCpu) {
  DSV3_REQUIRE_GPU();
  const CudaCase k = GetParam();
  Problem<float> pb(cuda_config(k), k.B, k.T, 101, k.pos0);
  pb.forward();
  const auto R = Rng(102).normal_vec<float>(pb.out.size());
  MlaParams<float> g = mla_init_params<float>(pb.c, 103);  // nonzero start: checks += on the device too
  const MlaParams<float> g0 = g;
  const auto dx = pb.backward(g, R);

  MlaDeviceParams dw(pb.p), dg(g0);
  const MlaDeviceRope rope(pb.tab);
  DeviceBuffer<float> x(pb.x), out(pb.out.size()), saved(pb.saved_buf.size()), dout(R), dinp(pb.x.size());
  out.poison();
  saved.poison();
  dinp.poison();
  const MlaSaved<float> ds = mla_saved_layout(saved.get(), pb.c, k.B, k.T);
  cuda::mla_forward(out.get(), ds, x.get(), dw.weights(), pb.c, k.B, k.T, k.pos0, rope.view());
  cuda::mla_backward(dg.grads(), dinp.get(), dout.get(), ds, x.get(), dw.weights(), pb.c, k.B, k.T, k.pos0,
                     rope.view());
  EXPECT_CLOSE(compare(out.download(), pb.out, kReductionTol), "out");
  EXPECT_CLOSE(compare(saved.download(), pb.saved_buf, kReductionTol), "saved activations");
  EXPECT_CLOSE(compare(dinp.download(), dx, kReductionTol), "dinp");
  // Parameter gradients sum over N = B*T rows in another order: atol grows ~ sqrt(N) (as stage 01's dweight).
  const Tolerance param_tol{1e-5 * std::sqrt(double(k.B * k.T)), 1e-4};
  MlaParams<float> got = g0;
  dg.download(got);
  auto want = g.tensors(), have = got.tensors();
  ASSERT_EQ(want.size(), have.size());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_CLOSE(compare(*have[i].second, *want[i].second, param_tol), "d" + want[i].first + " (+=)");
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaMla,
                         ::testing::Values(CudaCase{"q_compressed", 13, 3, 2, 7, 0},
                                           CudaCase{"no_q_compression", 0, 3, 2, 7, 5},
                                           CudaCase{"one_token_one_head", 13, 1, 3, 1, 0},
                                           CudaCase{"longer", 13, 5, 2, 67, 3}),
                         [](const auto& info) { return std::string(info.param.name); });

class CudaMlaDecode : public ::testing::TestWithParam<int> {};  // q_lora_rank

TEST_P(CudaMlaDecode, NaiveAndAbsorbedMatchCpuAndForward) {
  DSV3_REQUIRE_GPU();
  const CudaCase k{"decode", GetParam(), 4, 3, 23, 0};
  Problem<float> pb(cuda_config(k), k.B, k.T, 201);
  pb.forward();
  const auto rope = pb.rope();
  const auto w = pb.p.weights();
  const auto cpu_naive = decode_all(pb, [&](float* o, const MlaCache<float>& cache, const float* x, int pos) {
    cpu::mla_decode_step_naive(o, cache, x, w, pb.c, pb.B, pos, rope);
  });
  MlaDeviceParams dw(pb.p);
  const MlaDeviceRope drope(pb.tab);
  const int Lmax = k.T + 2, Dc = pb.c.kv_lora_rank, Dr = pb.c.qk_rope_head_dim, D = pb.c.dim;
  for (bool absorbed : {false, true}) {
    DeviceBuffer<float> ckv(size_t(k.B) * Lmax * Dc), kpe(size_t(k.B) * Lmax * Dr), xt(size_t(k.B) * D),
        ot(size_t(k.B) * D);
    ckv.poison();  // positions not yet written must never be read
    kpe.poison();
    const MlaCache<float> cache{ckv.get(), kpe.get(), Lmax};
    std::vector<float> got(pb.out.size()), xh(size_t(k.B) * D);
    for (int t = 0; t < k.T; ++t) {
      for (int b = 0; b < k.B; ++b) std::copy_n(&pb.x[(size_t(b) * k.T + t) * D], D, &xh[size_t(b) * D]);
      xt.upload(xh);
      ot.poison();
      if (absorbed)
        cuda::mla_decode_step_absorbed(ot.get(), cache, xt.get(), dw.weights(), pb.c, k.B, t, drope.view());
      else
        cuda::mla_decode_step_naive(ot.get(), cache, xt.get(), dw.weights(), pb.c, k.B, t, drope.view());
      const auto oh = ot.download();
      for (int b = 0; b < k.B; ++b) std::copy_n(&oh[size_t(b) * D], D, &got[(size_t(b) * k.T + t) * D]);
    }
    const std::string what = absorbed ? "cuda absorbed" : "cuda naive";
    EXPECT_CLOSE(compare(got, cpu_naive, kReductionTol), what + " vs cpu naive decode");
    EXPECT_CLOSE(compare(got, pb.out, kReductionTol), what + " vs cpu full forward");
    const auto c_h = ckv.download();
    for (int b = 0; b < k.B; ++b)  // the cache holds the forward's normalised latent at every position
      EXPECT_CLOSE(compare(std::vector<float>(c_h.begin() + size_t(b) * Lmax * Dc,
                                              c_h.begin() + (size_t(b) * Lmax + k.T) * Dc),
                           std::vector<float>(pb.saved.c_kv + size_t(b) * k.T * Dc,
                                              pb.saved.c_kv + size_t(b + 1) * k.T * Dc),
                           kReductionTol),
                   what + " cache c_kv");
  }
}
INSTANTIATE_TEST_SUITE_P(QRank, CudaMlaDecode, ::testing::Values(13, 0));

// The GPU chunk decode (B sequences, device position) against cpu::mla_decode_chunk_absorbed per sequence, and its
// two bitwise invariances: chunks of any size equal single steps, and a batch equals each sequence decoded alone.
TEST_P(CudaMlaDecode, ChunkAbsorbedMatchesCpuAndIsChunkAndBatchInvariant) {
  DSV3_REQUIRE_GPU();
  const CudaCase k{"chunk", GetParam(), 4, 3, 23, 0};
  Problem<float> pb(cuda_config(k), k.B, k.T, 211);
  const auto rope = pb.rope();
  const int Lmax = k.T + 2, Dc = pb.c.kv_lora_rank, Dr = pb.c.qk_rope_head_dim, D = pb.c.dim;
  const std::vector<int> chunks = {1, 2, 3, 1, 5, 2, 2, 7};  // sums to T = 23
  // CPU reference: each sequence alone, with the same chunk schedule
  std::vector<float> want(pb.x.size());
  for (int b = 0; b < k.B; ++b) {
    std::vector<float> ckv(size_t(Lmax) * Dc), kpe(size_t(Lmax) * Dr);
    const MlaCache<float> cache{ckv.data(), kpe.data(), Lmax};
    for (int at = 0, i = 0; at < k.T; at += chunks[i++]) {
      const size_t off = (size_t(b) * k.T + at) * D;
      cpu::mla_decode_chunk_absorbed(want.data() + off, cache, pb.x.data() + off, pb.p.weights(), pb.c, chunks[i],
                                     at, rope);
    }
  }
  MlaDeviceParams dw(pb.p);
  const MlaDeviceRope drope(pb.tab);
  // Decodes sequences [b0, b0+nb) with the chunk schedule `sizes` on the GPU; returns out (nb, T, D).
  auto gpu = [&](int b0, int nb, const std::vector<int>& sizes) {
    DeviceBuffer<float> ckv(size_t(nb) * Lmax * Dc), kpe(size_t(nb) * Lmax * Dr);
    DeviceBuffer<int> pos(1);
    ckv.poison();  // positions not yet written must never be read
    kpe.poison();
    const MlaCache<float> cache{ckv.get(), kpe.get(), Lmax};
    std::vector<float> got(size_t(nb) * k.T * D);
    for (int at = 0, i = 0; at < k.T; at += sizes[i++]) {
      const int n = sizes[i];
      std::vector<float> xh(size_t(nb) * n * D);
      for (int b = 0; b < nb; ++b)
        std::copy_n(&pb.x[(size_t(b0 + b) * k.T + at) * D], size_t(n) * D, &xh[size_t(b) * n * D]);
      DeviceBuffer<float> xt(xh), ot(xh.size());
      ot.poison();
      pos.upload({at});
      cuda::mla_decode_chunk_absorbed(ot.get(), cache, xt.get(), dw.weights(), pb.c, nb, n, pos.get(), drope.view());
      const auto oh = ot.download();
      for (int b = 0; b < nb; ++b)
        std::copy_n(&oh[size_t(b) * n * D], size_t(n) * D, &got[(size_t(b) * k.T + at) * D]);
    }
    return got;
  };
  const auto chunked = gpu(0, k.B, chunks);
  EXPECT_CLOSE(compare(chunked, want, kReductionTol), "cuda chunk decode vs cpu chunk decode");
  const auto single = gpu(0, k.B, std::vector<int>(k.T, 1));
  EXPECT_TRUE(chunked == single) << "a chunk must give bitwise the values of single steps";
  const auto alone = gpu(1, 1, chunks);
  EXPECT_TRUE(std::equal(alone.begin(), alone.end(), chunked.begin() + size_t(k.T) * D))
      << "sequence 1 of a batch must be bitwise sequence 1 decoded alone";
}

// Version 2 (cuda::mla_decode_chunk_absorbed_fused): x += MLA(rmsnorm(x) g) against the CPU chunk decode of the
// normalised rows plus x, with version 1's bitwise chunk and batch invariance. The cache rows it appends (computed in
// the attention's shared memory) are read back by every later chunk, so a wrong append shows in the outputs. Its
// bitwise equality with version 1 is checked end to end by stage 07 (CudaSamplerPaths).
TEST_P(CudaMlaDecode, FusedMatchesCpuAndIsChunkAndBatchInvariant) {
  DSV3_REQUIRE_GPU();
  const CudaCase k{"fused", GetParam(), 4, 3, 23, 0};
  Problem<float> pb(cuda_config(k), k.B, k.T, 221);
  const auto rope = pb.rope();
  const int Lmax = k.T + 2, Dc = pb.c.kv_lora_rank, Dr = pb.c.qk_rope_head_dim, D = pb.c.dim;
  const float eps = 1e-6f;
  const std::vector<int> chunks = {1, 2, 3, 1, 5, 2, 2, 7};  // sums to T = 23
  Rng rng(222);
  const std::vector<float> g = rng.normal_vec<float>(size_t(D));
  // CPU reference: x + MLA(x * rstd * g), each sequence alone with the same chunk schedule
  std::vector<float> xn(pb.x.size()), want(pb.x.size());
  for (size_t r = 0; r < size_t(k.B) * k.T; ++r) {
    double ss = 0;
    for (int j = 0; j < D; ++j) ss += double(pb.x[r * D + j]) * pb.x[r * D + j];
    const double rstd = 1 / std::sqrt(ss / D + eps);
    for (int j = 0; j < D; ++j) xn[r * D + j] = float(pb.x[r * D + j] * rstd * g[j]);
  }
  for (int b = 0; b < k.B; ++b) {
    std::vector<float> ckv(size_t(Lmax) * Dc), kpe(size_t(Lmax) * Dr);
    const MlaCache<float> cache{ckv.data(), kpe.data(), Lmax};
    for (int at = 0, i = 0; at < k.T; at += chunks[i++]) {
      const size_t off = (size_t(b) * k.T + at) * D;
      cpu::mla_decode_chunk_absorbed(want.data() + off, cache, xn.data() + off, pb.p.weights(), pb.c, chunks[i], at,
                                     rope);
    }
  }
  for (size_t i = 0; i < want.size(); ++i) want[i] += pb.x[i];
  MlaDeviceParams dw(pb.p);
  const MlaDeviceRope drope(pb.tab);
  const DeviceBuffer<float> dg(g);
  auto gpu = [&](int b0, int nb, const std::vector<int>& sizes) {
    DeviceBuffer<float> ckv(size_t(nb) * Lmax * Dc), kpe(size_t(nb) * Lmax * Dr);
    DeviceBuffer<float> ws(cuda::mla_decode_workspace_floats(pb.c, nb * *std::max_element(sizes.begin(), sizes.end())));
    DeviceBuffer<int> pos(1);
    ckv.poison();  // positions not yet written must never be read
    kpe.poison();
    const MlaCache<float> cache{ckv.get(), kpe.get(), Lmax};
    std::vector<float> got(size_t(nb) * k.T * D);
    for (int at = 0, i = 0; at < k.T; at += sizes[i++]) {
      const int n = sizes[i];
      std::vector<float> xh(size_t(nb) * n * D);
      for (int b = 0; b < nb; ++b)
        std::copy_n(&pb.x[(size_t(b0 + b) * k.T + at) * D], size_t(n) * D, &xh[size_t(b) * n * D]);
      DeviceBuffer<float> xt(xh);
      ws.poison();
      pos.upload({at});
      cuda::mla_decode_chunk_absorbed_fused(xt.get(), cache, dg.get(), eps, dw.weights(), pb.c, nb, n, pos.get(),
                                            drope.view(), ws.get());
      const auto oh = xt.download();
      for (int b = 0; b < nb; ++b)
        std::copy_n(&oh[size_t(b) * n * D], size_t(n) * D, &got[(size_t(b) * k.T + at) * D]);
    }
    return got;
  };
  const auto chunked = gpu(0, k.B, chunks);
  EXPECT_CLOSE(compare(chunked, want, kReductionTol), "cuda fused chunk decode vs cpu chunk decode");
  const auto single = gpu(0, k.B, std::vector<int>(k.T, 1));
  EXPECT_TRUE(chunked == single) << "a chunk must give bitwise the values of single steps";
  const auto alone = gpu(1, 1, chunks);
  EXPECT_TRUE(std::equal(alone.begin(), alone.end(), chunked.begin() + size_t(k.T) * D))
      << "sequence 1 of a batch must be bitwise sequence 1 decoded alone";
}

TEST(CudaMlaErrors, RejectsPositionPastCache) {
  DSV3_REQUIRE_GPU();
  const CudaCase k{"err", 13, 2, 1, 1, 0};
  Problem<float> pb(cuda_config(k), 1, 1, 301);
  MlaDeviceParams dw(pb.p);
  const MlaDeviceRope rope(pb.tab);
  DeviceBuffer<float> x(pb.x), ckv(2 * 19), kpe(2 * 6), o(37);
  const MlaCache<float> cache{ckv.get(), kpe.get(), 2};
  EXPECT_THROW(cuda::mla_decode_step_absorbed(o.get(), cache, x.get(), dw.weights(), pb.c, 1, 2, rope.view()),
               UserError);
}

// ---- fused attention (attention_fused.cu) -------------------------------------------------------------
//
// Tolerance from the error analysis: the fused kernels round q, k, v, dy and the probabilities to bf16 (relative
// error <= 2^-9 each) and accumulate in fp32. A score q.k over S terms then carries an absolute error of about
// 2^-8 sqrt(S) |q_i k_i| (rounding errors of random sign), ~0.02 for S = 96 and unit entries, which moves a
// probability by the same relative amount; outputs and gradients, sums of such terms over the keys, are off by
// ~1e-2 of their typical size. So: normalised error (||got - ref|| / ||ref||) <= 2e-2, and every element within
// 3e-2 of the reference plus 5e-2 of its own size (kFusedTol). A wrong index or mask gives errors of order 1.
namespace {

constexpr Tolerance kFusedTol{3e-2, 5e-2};
constexpr double kFusedNorm = 2e-2;

struct FusedCase {
  const char* name;
  int B, T, H, Dn, Dr, Dv;
};
void PrintTo(const FusedCase& k, std::ostream* os) { *os << k.name; }

MlaConfig fused_config(const FusedCase& k) {
  MlaConfig c = small_config(0, k.H);
  c.qk_nope_head_dim = k.Dn;
  c.qk_rope_head_dim = c.rope.qk_rope_head_dim = k.Dr;
  c.v_head_dim = k.Dv;
  c.matmul = Matmul::BF16;
  c.attention = MlaConfig::Attention::Fused;
  return c;
}

// The attention of the training form in double, loop by loop (the CPU reference's formulas, mla_cpu.cpp):
// y = softmax(scale q k^T, causal) v per (sequence, head); the backward from dy gives dq, dkv = [dk_nope | dv] and
// dk_pe summed over the heads.
struct AttentionRef {
  std::vector<double> y, dq, dkv, dk_pe;
};
AttentionRef attention_reference(const FusedCase& k, double scale, const std::vector<float>& q,
                                 const std::vector<float>& kv, const std::vector<float>& k_pe,
                                 const std::vector<float>& dy) {
  const int B = k.B, T = k.T, H = k.H, Dn = k.Dn, Dr = k.Dr, Dv = k.Dv, S = Dn + Dr, KS = Dn + Dv;
  AttentionRef r;
  const size_t N = size_t(B) * T;
  r.y.assign(N * H * Dv, 0.0);
  r.dq.assign(N * H * S, 0.0);
  r.dkv.assign(N * H * KS, 0.0);
  r.dk_pe.assign(N * Dr, 0.0);
  auto key = [&](int b, int h, int s, int d) -> double {
    return d < Dn ? kv[((size_t(b) * T + s) * H + h) * KS + d] : k_pe[(size_t(b) * T + s) * Dr + d - Dn];
  };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t) {
        const float* qr = &q[((size_t(b) * T + t) * H + h) * S];
        const float* dyr = &dy[((size_t(b) * T + t) * H + h) * Dv];
        std::vector<double> p(t + 1), dp(t + 1);
        double mx = -1e300, sum = 0;
        for (int s = 0; s <= t; ++s) {
          double acc = 0;
          for (int d = 0; d < S; ++d) acc += double(qr[d]) * key(b, h, s, d);
          p[s] = scale * acc;
          mx = std::max(mx, p[s]);
        }
        for (int s = 0; s <= t; ++s) sum += (p[s] = std::exp(p[s] - mx));
        double dsum = 0;
        for (int s = 0; s <= t; ++s) {
          p[s] /= sum;
          const float* vr = &kv[((size_t(b) * T + s) * H + h) * KS + Dn];
          double dot = 0;
          for (int j = 0; j < Dv; ++j) {
            r.y[((size_t(b) * T + t) * H + h) * Dv + j] += p[s] * vr[j];
            dot += double(dyr[j]) * vr[j];
          }
          dp[s] = dot;
          dsum += p[s] * dot;
        }
        for (int s = 0; s <= t; ++s) {
          const double ds = p[s] * (dp[s] - dsum) * scale;
          double* dkvr = &r.dkv[((size_t(b) * T + s) * H + h) * KS];
          for (int d = 0; d < S; ++d) {
            r.dq[((size_t(b) * T + t) * H + h) * S + d] += ds * key(b, h, s, d);
            if (d < Dn)
              dkvr[d] += ds * qr[d];
            else
              r.dk_pe[(size_t(b) * T + s) * Dr + d - Dn] += ds * qr[d];
          }
          for (int j = 0; j < Dv; ++j) dkvr[Dn + j] += p[s] * dyr[j];
        }
      }
  return r;
}

void expect_fused_close(const std::vector<float>& got, const std::vector<double>& ref, const std::string& what) {
  const CompareResult r = compare(got, ref, kFusedTol);
  EXPECT_CLOSE(r, what);
  EXPECT_LE(r.norm_err, kFusedNorm) << what << ": " << r.summary();
}

}  // namespace

class CudaFusedAttention : public ::testing::TestWithParam<FusedCase> {};

// The kernels alone against the double reference, then determinism (no atomics: two runs are bitwise equal)
// and causality (changing the last token's q, k and v leaves every earlier output and every gradient of an
// earlier query unchanged, bit for bit).
TEST_P(CudaFusedAttention, MatchesTheReferenceDeterministicAndCausal) {
  DSV3_REQUIRE_GPU();
  const FusedCase k = GetParam();
  const MlaConfig c = fused_config(k);
  const int S = k.Dn + k.Dr, KS = k.Dn + k.Dv;
  const size_t N = size_t(k.B) * k.T;
  Rng rng(401);
  auto q = rng.normal_vec<float>(N * k.H * S), kv = rng.normal_vec<float>(N * k.H * KS),
       k_pe = rng.normal_vec<float>(N * k.Dr), dy = rng.normal_vec<float>(N * k.H * k.Dv);
  const AttentionRef ref = attention_reference(k, c.softmax_scale(), q, kv, k_pe, dy);
  DeviceBuffer<float> dq_(q), dkv_(kv), dkpe_(k_pe), ddy(dy), y(N * k.H * k.Dv), lse(N * k.H), gq(q.size()),
      gkv(kv.size()), gkpe(k_pe.size());
  auto run = [&] {
    y.poison();
    gq.poison();
    gkv.poison();
    gkpe.poison();
    cuda::fused_attention_forward(y.get(), lse.get(), dq_.get(), dkv_.get(), dkpe_.get(), c, k.B, k.T);
    cuda::fused_attention_backward(gq.get(), gkv.get(), gkpe.get(), ddy.get(), y.get(), lse.get(), dq_.get(),
                                   dkv_.get(), dkpe_.get(), c, k.B, k.T);
    return std::vector<std::vector<float>>{y.download(), gq.download(), gkv.download(), gkpe.download()};
  };
  const auto first = run();
  expect_fused_close(first[0], ref.y, "y");
  expect_fused_close(first[1], ref.dq, "dq");
  expect_fused_close(first[2], ref.dkv, "dkv = [dk_nope | dv]");
  expect_fused_close(first[3], ref.dk_pe, "dk_pe (summed over heads)");
  const auto second = run();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(first[i], second[i]) << "run-to-run, output " << i;
  // causality: perturb token T-1 of every sequence (its q, its keys and values); rows before it keep their y and
  // dq bit for bit (dy of token T-1 unchanged, so its own rows change only through the perturbation)
  for (int b = 0; b < k.B; ++b) {
    const size_t row = size_t(b) * k.T + k.T - 1;
    for (int i = 0; i < k.H * S; ++i) q[row * k.H * S + i] += 1.f;
    for (int i = 0; i < k.H * KS; ++i) kv[row * k.H * KS + i] -= 1.f;
    for (int i = 0; i < k.Dr; ++i) k_pe[row * k.Dr + i] += 0.5f;
  }
  dq_.upload(q);
  dkv_.upload(kv);
  dkpe_.upload(k_pe);
  const auto moved = run();
  for (int b = 0; b < k.B; ++b)
    for (int t = 0; t + 1 < k.T; ++t) {
      const size_t r = size_t(b) * k.T + t;
      for (int i = 0; i < k.H * k.Dv; ++i) ASSERT_EQ(moved[0][r * k.H * k.Dv + i], first[0][r * k.H * k.Dv + i]);
      for (int i = 0; i < k.H * S; ++i) ASSERT_EQ(moved[1][r * k.H * S + i], first[1][r * k.H * S + i]);
    }
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaFusedAttention,
                         ::testing::Values(FusedCase{"odd_dims_two_tiles", 2, 67, 3, 11, 6, 9},
                                           FusedCase{"one_token_one_head", 1, 1, 1, 11, 6, 9},
                                           FusedCase{"lyrics_dims", 2, 130, 2, 48, 16, 48},
                                           FusedCase{"bench_dims", 1, 200, 2, 64, 32, 64}),
                         [](const auto& info) { return std::string(info.param.name); });

// The whole MLA layer with attention = Fused under bf16 products, against the CPU's fp32 layer; and the saved
// layout: no T x T probabilities, a log-sum-exp per row instead.
TEST(CudaFusedAttention, MlaLayerMatchesCpu) {
  DSV3_REQUIRE_GPU();
  MlaConfig c = cuda_config({"fused", 13, 3, 2, 70, 0});
  c.matmul = Matmul::BF16;
  c.attention = MlaConfig::Attention::Fused;
  MlaConfig cpu_c = c;
  cpu_c.matmul = Matmul::FP32;
  cpu_c.attention = MlaConfig::Attention::Materialized;
  const int B = 2, T = 70;
  Problem<float> pb(cpu_c, B, T, 501);
  pb.forward();
  const auto R = Rng(502).normal_vec<float>(pb.out.size());
  MlaParams<float> g = mla_zero_params<float>(pb.c);
  const auto dx = pb.backward(g, R);
  EXPECT_EQ(mla_saved_size(cpu_c, B, T) - mla_saved_size(c, B, T), size_t(B) * 3 * T * T - size_t(B) * 3 * T);
  MlaDeviceParams dw(pb.p), dg(mla_zero_params<float>(c));
  const MlaDeviceRope rope(pb.tab);
  DeviceBuffer<float> x(pb.x), out(pb.out.size()), saved(mla_saved_size(c, B, T)), dout(R), dinp(pb.x.size());
  const MlaSaved<float> ds = mla_saved_layout(saved.get(), c, B, T);
  cuda::mla_forward(out.get(), ds, x.get(), dw.weights(), c, B, T, 0, rope.view());
  cuda::mla_backward(dg.grads(), dinp.get(), dout.get(), ds, x.get(), dw.weights(), c, B, T, 0, rope.view());
  const auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  expect_fused_close(out.download(), as_double(pb.out), "out");
  expect_fused_close(dinp.download(), as_double(dx), "dinp");
  // Parameter gradients sum N = B*T rows, each off by ~1e-2 of its unit-sized term with a random sign: elements
  // within 2e-2 sqrt(N) (as the fp32 test's atol grows with sqrt(N)), the whole tensor within kFusedNorm.
  MlaParams<float> got = mla_zero_params<float>(c);
  dg.download(got);
  auto want = g.tensors(), have = got.tensors();
  const Tolerance param_tol{2e-2 * std::sqrt(double(B * T)), kFusedTol.rtol};
  for (size_t i = 0; i < want.size(); ++i) {
    const CompareResult r = compare(*have[i].second, as_double(*want[i].second), param_tol);
    EXPECT_CLOSE(r, "d" + want[i].first);
    EXPECT_LE(r.norm_err, kFusedNorm) << "d" << want[i].first << ": " << r.summary();
  }
  // the CPU reference refuses a layout carved for the fused attention
  EXPECT_THROW(cpu::mla_forward(pb.out.data(), mla_saved_layout(pb.saved_buf.data(), c, B, T), pb.x.data(),
                                pb.p.weights(), c, B, T, 0, pb.rope()),
               UserError);
}
#else
TEST(CudaMla, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
