// The token alignment of MTP module k (mtp.h), written once for the CPU reference and the CUDA kernel.
// Plain code, no Eigen: included by mtp_cpu.cpp and mtp_cuda.cu.
#pragma once

#ifdef __CUDACC__
#define DSV3_MTP_HD __host__ __device__
#else
#define DSV3_MTP_HD
#endif

namespace dsv3::mtp_align {

// Row n = b*T + i of module k. window: (B, T+1) tokens t_0..t_T per sequence.
//   token  = t_{i+k}   (t_T, a pad, where i+k > T)
//   target = t_{i+k+1} (ignore, where i+k+1 > T)
DSV3_MTP_HD inline void align(int* token, int* target, const int* window, int n, int T, int k, int ignore) {
  const int b = n / T, i = n % T;
  const int* w = window + static_cast<long long>(b) * (T + 1);
  *token = w[i + k <= T ? i + k : T];
  *target = i + k + 1 <= T ? w[i + k + 1] : ignore;
}

// Paper eq. 24: CE_k = -(1/T) sum over the T-k positions that have a target. The cross-entropy helpers average
// over the rows with a target (B(T-k) of the N = BT rows), so CE_k is that mean times (T-k)/T (0 when k >= T).
DSV3_MTP_HD inline double ce_scale(int T, int k) { return T > k ? double(T - k) / double(T) : 0.0; }

// L_MTP = (lambda / depth) sum_k CE_k from each depth's mean over its targets, in float as the trainer reports it;
// ce (depth floats, or nullptr) receives the CE_k. One rule for the host and for stage 07's on-device step check.
DSV3_MTP_HD inline float loss_from_means(float* ce, const float* mean, int depth, int T, float lambda) {
  float sum = 0;
  for (int k = 1; k <= depth; ++k) {
    const float ce_k = float(ce_scale(T, k)) * mean[k - 1];
    if (ce) ce[k - 1] = ce_k;
    sum += ce_k;
  }
  return depth > 0 ? lambda / static_cast<float>(depth) * sum : 0.f;
}

}  // namespace dsv3::mtp_align
