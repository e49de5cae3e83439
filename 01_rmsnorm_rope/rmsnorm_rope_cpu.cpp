// Stage 01, the Eigen reference: the readable specification of RMSNorm and RoPE/YaRN.
// Shapes: see the legend in rmsnorm_rope.h.
#include <Eigen/Core>

#include <cmath>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/errors.h"
#include "common/rowwise.h"

namespace dsv3 {

void RopeConfig::validate() const {
  require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
          "qk_rope_head_dim must be a positive even number (RoPE rotates pairs), got {}", qk_rope_head_dim);
  require(max_seq_len > 0, "max_seq_len must be positive, got {}", max_seq_len);
  require(original_seq_len > 0, "original_seq_len must be positive, got {}", original_seq_len);
  require(rope_theta > 1.0, "rope_theta must be > 1, got {}", rope_theta);
  require(rope_factor >= 1.0, "rope_factor must be >= 1, got {}", rope_factor);
  require(beta_fast > beta_slow && beta_slow > 0.0,
          "YaRN needs beta_fast > beta_slow > 0, got beta_fast={} beta_slow={}", beta_fast, beta_slow);
  require(mscale >= 0.0, "mscale must be >= 0, got {}", mscale);
}

// Pair index i whose wavelength 2*pi*theta^(2i/Dr) fits `rotations` times into seq_len.
static double correction_dim(double rotations, int dim, double base, int seq_len) {
  return dim * std::log(seq_len / (rotations * 2 * M_PI)) / (2 * std::log(base));
}

YarnRange yarn_correction_range(const RopeConfig& c) {
  const int dim = c.qk_rope_head_dim;
  const int low = static_cast<int>(std::floor(correction_dim(c.beta_fast, dim, c.rope_theta, c.original_seq_len)));
  const int high = static_cast<int>(std::ceil(correction_dim(c.beta_slow, dim, c.rope_theta, c.original_seq_len)));
  // DeepSeek clamps to [0, dim-1] (dim, not dim/2: the ramp below is evaluated on dim/2 pairs only).
  return {std::max(low, 0), std::min(high, dim - 1)};
}

std::vector<double> rope_frequencies(const RopeConfig& c) {
  c.validate();
  const int dim = c.qk_rope_head_dim, half = dim / 2;
  std::vector<double> f(half);
  for (int i = 0; i < half; ++i) f[i] = 1.0 / std::pow(c.rope_theta, (2.0 * i) / dim);
  if (!c.yarn_active()) return f;
  const YarnRange r = yarn_correction_range(c);
  const double lo = r.low, hi = r.high == r.low ? r.high + 0.001 : r.high;
  for (int i = 0; i < half; ++i) {
    const double ramp = std::clamp((i - lo) / (hi - lo), 0.0, 1.0);
    const double smooth = 1.0 - ramp;  // 1: keep the original frequency; 0: interpolate (divide by factor)
    f[i] = f[i] / c.rope_factor * (1.0 - smooth) + f[i] * smooth;
  }
  return f;
}

template <typename T>
RopeTables<T> rope_tables(const RopeConfig& c) {
  const std::vector<double> f = rope_frequencies(c);
  RopeTables<T> t;
  t.positions = c.max_seq_len;
  t.half = static_cast<int>(f.size());
  t.cos.resize(static_cast<size_t>(t.positions) * t.half);
  t.sin.resize(t.cos.size());
  for (int p = 0; p < t.positions; ++p)
    for (int i = 0; i < t.half; ++i) {
      const double a = p * f[i];
      t.cos[static_cast<size_t>(p) * t.half + i] = static_cast<T>(std::cos(a));
      t.sin[static_cast<size_t>(p) * t.half + i] = static_cast<T>(std::sin(a));
    }
  return t;
}
template RopeTables<float> rope_tables(const RopeConfig&);
template RopeTables<double> rope_tables(const RopeConfig&);

double yarn_softmax_scale_factor(const RopeConfig& c) {
  if (!c.yarn_active()) return 1.0;
  const double m = 0.1 * c.mscale * std::log(c.rope_factor) + 1.0;
  return m * m;
}

void validate_rope_dims(const RopeDims& d, int table_positions) {
  require(d.B >= 0 && d.T >= 0 && d.H >= 0, "rope: negative shape B={} T={} H={}", d.B, d.T, d.H);
  require(d.Dr > 0 && d.Dr % 2 == 0, "rope: the rope dim must be positive and even, got {}", d.Dr);
  require(d.offset >= 0 && d.offset + d.Dr <= d.S, "rope: slice [{}, {}) does not fit a head of stride {}",
          d.offset, d.offset + d.Dr, d.S);
  require(d.pos0 >= 0 && d.pos0 + d.T <= table_positions,
          "rope: positions {}..{} exceed the {} positions of the tables (raise max_seq_len)", d.pos0,
          d.pos0 + d.T - 1, table_positions);
}

namespace cpu {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int D, float eps) {
  Eigen::Map<const RowMat<T>> x(inp, N, D);
  Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> w(weight, D);
  Eigen::Map<RowMat<T>> y(out, N, D);
  Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> r(rstd, N);
  // 1) rstd_n = 1 / sqrt(mean_j x_nj^2 + eps)
  r = ((x.array().square().rowwise().sum() / T(D)) + T(eps)).rsqrt().matrix();
  // 2) y_nj = x_nj * rstd_n * w_j
  y = (x.array().colwise() * r.array()).rowwise() * w.array();
}

template <typename T>
void rmsnorm_backward(T* dweight, T* dinp, const T* dout, const T* rstd, const T* inp, const T* weight, int N,
                      int D) {
  Eigen::Map<const RowMat<T>> x(inp, N, D), dy(dout, N, D);
  Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> w(weight, D);
  Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>> r(rstd, N);
  Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> dw(dweight, D);
  Eigen::Map<RowMat<T>> dx(dinp, N, D);
  const RowMat<T> xhat = x.array().colwise() * r.array();  // x * rstd
  // 1) dw_j += sum_n dy_nj * xhat_nj
  dw += (dy.array() * xhat.array()).colwise().sum().matrix();
  // 2) g = dy * w; dx = rstd * (g - xhat * mean_j(g * xhat))
  const RowMat<T> g = dy.array().rowwise() * w.array();
  const Eigen::Matrix<T, Eigen::Dynamic, 1> m = (g.array() * xhat.array()).rowwise().sum() / T(D);
  dx = ((g.array() - xhat.array().colwise() * m.array()).colwise() * r.array()).matrix();
}

// Applies the rotation by +angle (sign = +1) or -angle (sign = -1) to every pair of every rope slice.
template <typename T>
static void rotate(T* out, const T* inp, const T* cos, const T* sin, const RopeDims& d, T sign) {
  const int half = d.Dr / 2;
  for (int b = 0; b < d.B; ++b)
    for (int t = 0; t < d.T; ++t) {
      const size_t p = static_cast<size_t>(d.pos0 + t) * half;
      for (int h = 0; h < d.H; ++h) {
        const size_t base = ((static_cast<size_t>(b) * d.T + t) * d.H + h) * d.S + d.offset;
        for (int i = 0; i < half; ++i) {
          const T c = cos[p + i], s = sign * sin[p + i];
          const T x0 = inp[base + 2 * i], x1 = inp[base + 2 * i + 1];
          out[base + 2 * i] = x0 * c - x1 * s;
          out[base + 2 * i + 1] = x0 * s + x1 * c;
        }
      }
    }
}

template <typename T>
void rope_forward(T* out, const T* inp, const T* cos, const T* sin, const RopeDims& d, int table_positions) {
  validate_rope_dims(d, table_positions);
  rotate(out, inp, cos, sin, d, T(1));
}

template <typename T>
void rope_backward(T* dinp, const T* dout, const T* cos, const T* sin, const RopeDims& d, int table_positions) {
  validate_rope_dims(d, table_positions);
  rotate(dinp, dout, cos, sin, d, T(-1));  // a rotation's Jacobian is itself; its transpose rotates back
}

template <typename T>
void rmsnorm_rows(T* out, const T* x, const T* weight, int n, int D, float eps) {
  for (int t = 0; t < n; ++t) {
    const T* r = x + size_t(t) * D;
    T* y = out + size_t(t) * D;
    const T rstd = T(1) / std::sqrt(dot(r, r, D) / T(D) + T(eps));
    for (int d = 0; d < D; ++d) y[d] = r[d] * rstd * weight[d];
  }
}

#define DSV3_INSTANTIATE(T)                                                                              \
  template void rmsnorm_rows<T>(T*, const T*, const T*, int, int, float);                                \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int, int, float);                         \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int, int);           \
  template void rope_forward<T>(T*, const T*, const T*, const T*, const RopeDims&, int);                 \
  template void rope_backward<T>(T*, const T*, const T*, const T*, const RopeDims&, int);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu
}  // namespace dsv3
