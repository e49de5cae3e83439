// The per-token routing of model.py's Gate, written once for the CPU reference (T = float or double) and
// the CUDA routing kernel (T = float), so both break ties identically: among equal values the lower index
// wins, for groups and for experts. Plain loops, no Eigen: included by moe_cpu.cpp and moe_cuda.cu.
// Shapes: see the legend in moe.h.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define DSV3_HD __host__ __device__
#else
#define DSV3_HD
#endif

namespace dsv3::moe_route {

// True when (va, ia) ranks before (vb, ib): larger value first, lower index on ties; a NaN ranks after every
// number (NaNs among themselves by index). A strict total order, so routing is defined for any scores: a model
// whose activations went NaN still picks K distinct experts in range (its loss is NaN and the trainer skips the
// step), never an index of -1.
template <typename T>
DSV3_HD inline bool ranks_before(T va, int ia, T vb, int ib) {
  const bool a_nan = va != va, b_nan = vb != vb;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return va > vb || (va == vb && ia < ib);
}

// Index in [0, n) of the best element of v[i*stride] that ranks strictly after (prev_v, prev_i); prev_i < 0
// means "no previous pick". Repeated calls enumerate a top-k in rank order without extra storage.
template <typename T>
DSV3_HD inline int next_best(const T* v, int n, int stride, T prev_v, int prev_i) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    const T x = v[i * stride];
    if (prev_i >= 0 && !ranks_before(prev_v, prev_i, x, i)) continue;
    if (best < 0 || ranks_before(x, i, v[best * stride], best)) best = i;
  }
  return best;
}

// The sigmoid score of one logit (scores_from_logits' expression; the GPU's warp router takes it per lane).
template <typename T>
DSV3_HD inline T sigmoid_score(T logit) {
  return T(1) / (T(1) + exp(-logit));
}

// s (E) = sigmoid(logits) or softmax(logits) over the E experts.
template <typename T>
DSV3_HD inline void scores_from_logits(T* s, const T* logits, int E, bool softmax) {
  if (!softmax) {
    for (int e = 0; e < E; ++e) s[e] = sigmoid_score(logits[e]);
    return;
  }
  T m = logits[0];
  for (int e = 1; e < E; ++e) m = logits[e] > m ? logits[e] : m;
  T z = 0;
  for (int e = 0; e < E; ++e) z += (s[e] = exp(logits[e] - m));
  for (int e = 0; e < E; ++e) s[e] /= z;
}

// One token: from its scores s (E) and the bias b (E, or null) fills
//   sel (E)      s + b, with the experts of dropped groups set to -inf,
//   idx (K)      the top-K experts of sel in rank order,
//   w   (K)      s[idx], divided by their sum when `normalise` (sigmoid), times route_scale.
// Group score (G > 1): the sum of the top-2 biased scores of the group's E/G experts (model.py with bias).
template <typename T>
DSV3_HD inline void route_token(T* sel, int* idx, T* w, const T* s, const T* b, int E, int K, int G, int Lg,
                                T route_scale, bool normalise) {
  for (int e = 0; e < E; ++e) sel[e] = s[e] + (b ? b[e] : T(0));
  if (G > 1) {
    const int Eg = E / G;
    T gscore[64];  // kMaxExpertGroups (moe.h); MoeConfig::validate enforces G <= 64
    for (int g = 0; g < G; ++g) {
      const int a = next_best(sel + g * Eg, Eg, 1, T(0), -1);
      const int c = next_best(sel + g * Eg, Eg, 1, sel[g * Eg + a], a);
      gscore[g] = sel[g * Eg + a] + sel[g * Eg + c];
    }
    bool keep[64];
    for (int g = 0; g < G; ++g) keep[g] = false;
    int prev = -1;
    for (int l = 0; l < Lg; ++l) {
      const int g = next_best(gscore, G, 1, prev >= 0 ? gscore[prev] : T(0), prev);
      keep[g] = true;
      prev = g;
    }
    for (int e = 0; e < E; ++e)
      if (!keep[e / Eg]) sel[e] = -INFINITY;
  }
  int prev = -1;
  T sum = 0;
  for (int k = 0; k < K; ++k) {
    const int e = next_best(sel, E, 1, prev >= 0 ? sel[prev] : T(0), prev);
    idx[k] = e;
    w[k] = s[e];
    sum += s[e];
    prev = e;
  }
  const T f = normalise ? route_scale / sum : route_scale;
  for (int k = 0; k < K; ++k) w[k] *= f;
}

// d loss / d s (E) of one token from d loss / d w (K): overwrites ds, zero for unchosen experts.
//   normalised: w_k = c s_k / S, S = sum_j s_{idx_j}  ->  ds_{idx_k} = (c dw_k - sum_j dw_j w_j) / S
//   plain:      w_k = c s_k                          ->  ds_{idx_k} = c dw_k
template <typename T>
DSV3_HD inline void route_token_backward(T* ds, const T* dw, const int* idx, const T* w, const T* s, int E, int K,
                                         T route_scale, bool normalise) {
  for (int e = 0; e < E; ++e) ds[e] = 0;
  if (!normalise) {
    for (int k = 0; k < K; ++k) ds[idx[k]] = route_scale * dw[k];
    return;
  }
  T S = 0, g = 0;
  for (int k = 0; k < K; ++k) {
    S += s[idx[k]];
    g += dw[k] * w[k];
  }
  for (int k = 0; k < K; ++k) ds[idx[k]] = (route_scale * dw[k] - g) / S;
}

// d loss / d logits (E) from d loss / d s (E), in place: sigmoid s(1-s); softmax s (ds - sum_j ds_j s_j).
template <typename T>
DSV3_HD inline void scores_backward(T* ds, const T* s, int E, bool softmax) {
  if (!softmax) {
    for (int e = 0; e < E; ++e) ds[e] *= s[e] * (T(1) - s[e]);
    return;
  }
  T dot = 0;
  for (int e = 0; e < E; ++e) dot += ds[e] * s[e];
  for (int e = 0; e < E; ++e) ds[e] = s[e] * (ds[e] - dot);
}

}  // namespace dsv3::moe_route
