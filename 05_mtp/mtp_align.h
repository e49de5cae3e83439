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

}  // namespace dsv3::mtp_align
