// Stage 04, the reference: balance loss, bias update, MaxVio. Shapes: see aux_loss.h.
#include <Eigen/Core>

#include <algorithm>
#include <cmath>

#include "04_aux_loss/aux_loss.h"
#include "common/errors.h"

namespace dsv3 {

void BalanceConfig::validate() const {
  require(std::isfinite(aux_alpha) && aux_alpha >= 0.f, "aux_alpha must be a finite number >= 0, got {}", aux_alpha);
  require(std::isfinite(bias_update_speed) && bias_update_speed >= 0.f,
          "bias_update_speed must be a finite number >= 0, got {}", bias_update_speed);
}

double max_violation(const int* load, int E) {
  double total = 0, mx = 0;
  for (int i = 0; i < E; ++i) {
    total += load[i];
    mx = std::max(mx, double(load[i]));
  }
  if (total == 0) return 0.0;
  const double mean = total / E;
  return (mx - mean) / mean;
}

double max_violation_per_sequence(const int* topk, int B, int T, int K, int E) {
  if (B == 0) return 0.0;
  std::vector<int> c(E);
  double s = 0;
  for (int b = 0; b < B; ++b) {
    cpu::expert_counts(c.data(), topk + static_cast<size_t>(b) * T * K, T, K, E);
    s += max_violation(c.data(), E);
  }
  return s / B;
}

namespace cpu {

static void check_dims(int B, int Tn, int E, int K) {
  require(B >= 0 && Tn > 0 && E > 0 && K > 0 && K <= E, "balance loss: bad shape B={} T={} E={} K={}", B, Tn, E, K);
}

void expert_counts(int* counts, const int* topk, int N, int K, int E) {
  std::fill(counts, counts + E, 0);
  for (size_t i = 0; i < static_cast<size_t>(N) * K; ++i) {
    require(topk[i] >= 0 && topk[i] < E, "expert index {} out of range [0, {})", topk[i], E);
    ++counts[topk[i]];
  }
}

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename T>
void seq_balance_loss_forward(T* loss, T* f, T* ssum, const T* scores, const int* topk, int B, int Tn, int E, int K,
                              float alpha) {
  check_dims(B, Tn, E, K);
  const int N = B * Tn;
  Eigen::Map<const RowMat<T>> s(scores, N, E);
  Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> S(ssum, N);
  Eigen::Map<RowMat<T>> F(f, B, E);
  // 1) the normaliser of each token's scores: s'_{i,t} = s_{i,t} / S_t
  S = s.rowwise().sum();
  T total = 0;
  std::vector<int> c(E);
  for (int b = 0; b < B; ++b) {
    // 2) f_{b,i} = E / (K T) * (tokens of sequence b routed to i)
    expert_counts(c.data(), topk + static_cast<size_t>(b) * Tn * K, Tn, K, E);
    for (int i = 0; i < E; ++i) F(b, i) = T(E) / (T(K) * Tn) * c[i];
    // 3) P_{b,i} = mean over the sequence of s'_{i,t}
    const auto sb = s.middleRows(b * Tn, Tn);
    const Eigen::Matrix<T, 1, Eigen::Dynamic> P =
        (sb.array().colwise() / S.segment(b * Tn, Tn).array()).colwise().sum() / T(Tn);
    // 4) L_b = alpha * sum_i f_i P_i
    total += T(alpha) * F.row(b).dot(P);
  }
  *loss = B ? total / B : T(0);  // averaged over the batch's sequences
}

template <typename T>
void seq_balance_loss_backward(T* dscores, T dloss, const T* f, const T* ssum, const T* scores, int B, int Tn, int E,
                               float alpha) {
  check_dims(B, Tn, E, 1);
  const int N = B * Tn;
  Eigen::Map<const RowMat<T>> s(scores, N, E), F(f, B, E);
  Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>> S(ssum, N);
  Eigen::Map<RowMat<T>> ds(dscores, N, E);
  for (int t = 0; t < N; ++t) {
    // dL/ds'_{i,t} = dloss/B * alpha * f_i / T =: g_i; with s' = s/S,
    // dL/ds_{j,t} = sum_i g_i (delta_ij / S - s_i / S^2) = (g_j - sum_i g_i s'_i) / S.
    const Eigen::Matrix<T, 1, Eigen::Dynamic> g = F.row(t / Tn) * (dloss / T(B) * T(alpha) / T(Tn));
    const T gs = g.dot(s.row(t)) / S(t);
    ds.row(t) = (g.array() - gs) / S(t);
  }
}

template <typename T>
void bias_update(T* bias, const int* counts, int E, int N, int K, float gamma) {
  const double mean = double(N) * K / E;
  for (int i = 0; i < E; ++i) {
    const double err = mean - counts[i];
    bias[i] += T(gamma) * T((err > 0) - (err < 0));
  }
}

#define DSV3_INSTANTIATE(T)                                                                              \
  template void seq_balance_loss_forward<T>(T*, T*, T*, const T*, const int*, int, int, int, int, float); \
  template void seq_balance_loss_backward<T>(T*, T, const T*, const T*, const T*, int, int, int, float);  \
  template void bias_update<T>(T*, const int*, int, int, int, float);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu
}  // namespace dsv3
