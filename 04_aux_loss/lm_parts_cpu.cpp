// Reference implementations of the LM training parts. Shapes: see lm_parts.h.
#include <Eigen/Core>

#include <cmath>

#include "04_aux_loss/adamw.h"
#include "04_aux_loss/lm_parts.h"

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "common/gemm_cpu.h"
#include "common/errors.h"

namespace dsv3 {

void split_windows(const std::vector<int>& tokens, int B, int T, std::vector<int>& inputs, std::vector<int>& targets) {
  require(B > 0 && T > 0 && tokens.size() == size_t(B) * (T + 1), "need B*(T+1) = {} tokens (B={}, T={}), got {}",
          size_t(std::max(B, 0)) * (std::max(T, 0) + 1), B, T, tokens.size());
  inputs.resize(size_t(B) * T);
  targets.resize(size_t(B) * T);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      inputs[size_t(b) * T + t] = tokens[size_t(b) * (T + 1) + t];
      targets[size_t(b) * T + t] = tokens[size_t(b) * (T + 1) + t + 1];
    }
}

namespace cpu {

template <typename T>
T lm_head_forward(T* logits, T* probs, T* z, T* zrstd, const T* h, const T* norm, const T* head, const int* targets,
                  int N, int D, int V, float eps) {
  rmsnorm_forward(z, zrstd, h, norm, N, D, eps);
  gemm(Op::N, Op::T, N, V, D, T(1), z, head, T(0), logits);  // logits = z head^T
  return cross_entropy_forward(probs, logits, targets, N, V);
}

template <typename T>
void lm_head_backward(T* dnorm, T* dhead, T* dh, T dloss, const T* dz_extra, const T* probs, const T* z,
                      const T* zrstd, const T* h, const T* norm, const T* head, const int* targets, int N, int D,
                      int V) {
  std::vector<T> dlogits(size_t(N) * V), dz(size_t(N) * D);
  cross_entropy_backward(dlogits.data(), dloss, probs, targets, N, V);
  gemm(Op::T, Op::N, V, D, N, T(1), dlogits.data(), z, T(1), dhead);       // dhead += dlogits^T z
  gemm(Op::N, Op::N, N, D, V, T(1), dlogits.data(), head, T(0), dz.data());  // dz = dlogits head
  if (dz_extra)
    for (size_t i = 0; i < dz.size(); ++i) dz[i] += dz_extra[i];
  rmsnorm_backward(dnorm, dh, dz.data(), zrstd, h, norm, N, D);
}

template <typename T>
void embedding_forward(T* out, const int* tokens, const T* wte, int N, int D, int V) {
  for (int n = 0; n < N; ++n) {
    require(tokens[n] >= 0 && tokens[n] < V, "token {} at position {} is outside the vocabulary [0, {})", tokens[n],
            n, V);
    std::copy(wte + static_cast<size_t>(tokens[n]) * D, wte + static_cast<size_t>(tokens[n] + 1) * D,
              out + static_cast<size_t>(n) * D);
  }
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int* tokens, int N, int D, int V) {
  for (int n = 0; n < N; ++n) {
    require(tokens[n] >= 0 && tokens[n] < V, "token {} is outside the vocabulary [0, {})", tokens[n], V);
    for (int j = 0; j < D; ++j) dwte[static_cast<size_t>(tokens[n]) * D + j] += dout[static_cast<size_t>(n) * D + j];
  }
}

static int count_targets(const int* targets, int N, int V) {
  int n = 0;
  for (int i = 0; i < N; ++i) {
    require(targets[i] == kIgnoreTarget || (targets[i] >= 0 && targets[i] < V),
            "target {} at position {} is outside the vocabulary [0, {})", targets[i], i, V);
    n += targets[i] != kIgnoreTarget;
  }
  return n;
}

template <typename T>
T cross_entropy_forward(T* probs, const T* logits, const int* targets, int N, int V) {
  using Row = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  const int count = count_targets(targets, N, V);
  T loss = 0;
  for (int n = 0; n < N; ++n) {
    Eigen::Map<const Row> z(logits + static_cast<size_t>(n) * V, V);
    Eigen::Map<Row> p(probs + static_cast<size_t>(n) * V, V);
    // softmax with the max subtracted; -log p_target = logsumexp(z) - z_target
    const T mx = z.maxCoeff();
    p = (z.array() - mx).exp();
    const T sum = p.sum();
    p /= sum;
    if (targets[n] != kIgnoreTarget) loss += std::log(sum) + mx - z(targets[n]);
  }
  return count ? loss / count : T(0);
}

template <typename T>
void cross_entropy_backward(T* dlogits, T dloss, const T* probs, const int* targets, int N, int V) {
  const int count = count_targets(targets, N, V);
  for (int n = 0; n < N; ++n) {
    T* d = dlogits + static_cast<size_t>(n) * V;
    const T* p = probs + static_cast<size_t>(n) * V;
    if (targets[n] == kIgnoreTarget) {
      std::fill(d, d + V, T(0));
      continue;
    }
    const T s = dloss / count;
    for (int v = 0; v < V; ++v) d[v] = s * p[v];
    d[targets[n]] -= s;
  }
}

template <typename T>
void adamw_step(T* param, const T* grad, T* m, T* v, size_t n, int64_t step, const AdamWConfig& c, bool decay) {
  require(step >= 1, "AdamW step counts from 1, got {}", step);
  const AdamWScalars<T> s = adamw_scalars<T>(c, step, decay);
  for (size_t i = 0; i < n; ++i) param[i] = adamw_update(param[i], grad[i], m[i], v[i], s);
}

#define DSV3_INSTANTIATE(T)                                                                   \
  template T lm_head_forward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const int*, int, int, int, float); \
  template void lm_head_backward<T>(T*, T*, T*, T, const T*, const T*, const T*, const T*, const T*, \
                                    const T*, const T*, const int*, int, int, int);           \
  template void embedding_forward<T>(T*, const int*, const T*, int, int, int);                \
  template void embedding_backward<T>(T*, const T*, const int*, int, int, int);               \
  template T cross_entropy_forward<T>(T*, const T*, const int*, int, int);                    \
  template void cross_entropy_backward<T>(T*, T, const T*, const int*, int, int);             \
  template void adamw_step<T>(T*, const T*, T*, T*, size_t, int64_t, const AdamWConfig&, bool);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace cpu
}  // namespace dsv3
