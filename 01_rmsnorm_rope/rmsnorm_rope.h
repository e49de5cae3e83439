// Stage 01: RMSNorm, and RoPE as DeepSeek-V3 applies it (interleaved pairs, a slice of each head,
// YaRN frequency correction and the attention mscale it implies).
//
// Shape legend
//   N   rows normalised by RMSNorm (B*T tokens, or any leading dims flattened)
//   D   width normalised by RMSNorm
//   B   batch, T time, H heads
//   S   head stride: floats from one head of a token to the next (e.g. Dn+Dr for q, Dc+Dr for wkv_a's output)
//   Dr  rope dim (qk_rope_head_dim), even; the rope slice of a head starts at `offset` within it
//   P   positions in the cos/sin tables (max_seq_len)
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients
// overwrite (=); dsv3::cpu and dsv3::cuda functions have identical signatures.
#pragma once

#include <vector>

namespace dsv3 {

// RoPE/YaRN settings, named as DeepSeek-V3's ModelArgs; defaults are V3's.
struct RopeConfig {
  int qk_rope_head_dim = 64;
  int max_seq_len = 4096 * 4;    // positions the tables cover; YaRN is active when > original_seq_len
  int original_seq_len = 4096;   // context the base model was pre-trained on
  double rope_theta = 10000.0;
  double rope_factor = 40.0;     // YaRN: context extension factor s
  double beta_fast = 32.0;       // YaRN: pairs rotating more than beta_fast times keep their frequency
  double beta_slow = 1.0;        // YaRN: pairs rotating less than beta_slow times are divided by factor
  double mscale = 1.0;           // YaRN: attention temperature coefficient

  bool yarn_active() const { return max_seq_len > original_seq_len; }
  void validate() const;         // UserError naming the bad field
};

// The pair range [low, high] over which YaRN blends interpolated and original frequencies
// (DeepSeek's find_correction_range with beta_fast, beta_slow).
struct YarnRange {
  int low, high;
};
YarnRange yarn_correction_range(const RopeConfig& c);

// Rotation frequency of each of the Dr/2 pairs, YaRN-corrected when active (precompute_freqs_cis):
//   f_i = theta^(-2i/Dr);  with YaRN: f_i' = f_i/factor * (1 - smooth_i) + f_i * smooth_i,
//   smooth_i = 1 - clamp((i - low) / (high - low), 0, 1).
std::vector<double> rope_frequencies(const RopeConfig& c);

// cos(p * f_i) and sin(p * f_i) for p in [0, P), i in [0, Dr/2): tables (P, Dr/2), computed in double.
template <typename T>
struct RopeTables {
  std::vector<T> cos, sin;  // (P, Dr/2)
  int positions = 0, half = 0;
};
template <typename T>
RopeTables<T> rope_tables(const RopeConfig& c);

// The factor YaRN multiplies the softmax scale by: mscale_att^2 with
// mscale_att = 0.1 * mscale * ln(rope_factor) + 1 when YaRN is active, else 1.
double yarn_softmax_scale_factor(const RopeConfig& c);

// Where the rope slice sits in a (B, T, H, S) tensor, and the position of token t = pos0 + t.
struct RopeDims {
  int B, T, H, S, offset, Dr, pos0;
};
// UserError unless the slice fits the head, Dr is even, and pos0 + T <= positions of the tables.
void validate_rope_dims(const RopeDims& d, int table_positions);

namespace cpu {

// out (N, D) = inp * rstd * weight;  rstd (N) = 1 / sqrt(mean(inp^2) + eps).
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int D, float eps);
// dweight (D) += sum_n dout * inp * rstd;  dinp (N, D) = rstd * (g - inp * rstd^2 * mean(g * inp)), g = dout*weight.
template <typename T>
void rmsnorm_backward(T* dweight, T* dinp, const T* dout, const T* rstd, const T* inp, const T* weight, int N,
                      int D);
// The decode form: out (n, D) = x * rstd * weight with rstd from common/rowwise.h's fixed-order dot, so a row's
// result never depends on how many rows come with it. out may equal x.
template <typename T>
void rmsnorm_rows(T* out, const T* x, const T* weight, int n, int D, float eps);

// Rotates the rope slice of every head: pair (x[2i], x[2i+1]) by angle p*f_i, as the complex product
// (x[2i] + i x[2i+1]) * (cos + i sin). Only the slice of out is written; out may equal inp (in place).
// cos, sin: tables (P, Dr/2) from rope_tables.
template <typename T>
void rope_forward(T* out, const T* inp, const T* cos, const T* sin, const RopeDims& d, int table_positions);
// The transpose rotation (by -p*f_i). Only the slice of dinp is written; dinp may equal dout.
template <typename T>
void rope_backward(T* dinp, const T* dout, const T* cos, const T* sin, const RopeDims& d, int table_positions);

}  // namespace cpu

namespace cuda {

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int D, float eps);
void rmsnorm_backward(float* dweight, float* dinp, const float* dout, const float* rstd, const float* inp,
                      const float* weight, int N, int D);
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, const RopeDims& d,
                  int table_positions);
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, const RopeDims& d,
                   int table_positions);

}  // namespace cuda
}  // namespace dsv3
