// AdamW's update rule, written once for the CPU reference (lm_parts_cpu.cpp), its CUDA twin (lm_parts_cuda.cu)
// and stage 07's multi-tensor optimizer (backend_cuda.cu). Plain code, no Eigen: host and device.
//
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
//   p = p - lr wd p - lr m^ / (sqrt(v^) + eps)                                  (decoupled weight decay)
#pragma once

#include <cmath>
#include <cstdint>

#include "04_aux_loss/lm_parts.h"

#ifdef __CUDACC__
#define DSV3_ADAMW_HD __host__ __device__
#else
#define DSV3_ADAMW_HD
#endif

namespace dsv3 {

// The step's scalars, computed once on the host (the bias corrections in double, then rounded to T).
template <typename T>
struct AdamWScalars {
  T lr, lr_wd;                    // lr_wd = lr * weight_decay, or 0 for a tensor that does not decay
  T b1, one_minus_b1, b2, one_minus_b2, eps;
  T bc1, bc2;                     // 1 - beta1^step, 1 - beta2^step
};
template <typename T>
AdamWScalars<T> adamw_scalars(const AdamWConfig& c, int64_t step, bool decay) {
  return {T(c.lr),
          decay ? T(c.lr * c.weight_decay) : T(0),
          T(c.beta1),
          T(1 - c.beta1),
          T(c.beta2),
          T(1 - c.beta2),
          T(c.eps),
          T(1.0 - std::pow(double(c.beta1), double(step))),
          T(1.0 - std::pow(double(c.beta2), double(step)))};
}

// One element: m and v updated in place, p returned. The moments' roundings are pinned: on the GPU the product
// with the old moment is fused into one rounding (fmaf) and the others are rounded as written (__fmul_rn); the
// CPU rounds every product. Left to the compiler, contraction follows the shape of the code around it, and a
// change elsewhere would move a trained run's numbers.
template <typename T>
DSV3_ADAMW_HD inline T adamw_update(T p, T g, T& m, T& v, const AdamWScalars<T>& s) {
#ifdef __CUDA_ARCH__
  m = fmaf(s.b1, m, __fmul_rn(s.one_minus_b1, g));
  v = fmaf(s.b2, v, __fmul_rn(__fmul_rn(s.one_minus_b2, g), g));
  const T mhat = m / s.bc1, vhat = v / s.bc2;
  const T root = sqrt(vhat);
#else
  m = s.b1 * m + s.one_minus_b1 * g;
  v = s.b2 * v + s.one_minus_b2 * g * g;
  const T mhat = m / s.bc1, vhat = v / s.bc2;
  const T root = std::sqrt(vhat);
#endif
  p -= s.lr_wd * p;
  p -= s.lr * mhat / (root + s.eps);
  return p;
}

}  // namespace dsv3
