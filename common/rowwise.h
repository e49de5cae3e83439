// Row-wise products in a summation order fixed by the source: each output row depends on its own input row only,
// through the same sequence of additions whatever the number of rows, a BLAS kernel's blocking or a pointer's
// alignment. The decode paths are built on them (stage 01's rmsnorm_rows, stage 02's absorbed decode, stage 03's
// MLP and MoE rows, stage 05's block decode), so that feeding a chunk of n tokens gives bitwise the result of n
// single tokens: what speculative decoding's exactness rests on (stage 07). The training paths use cpu::gemm.
//
// Shapes: n rows, in / out features; W in PyTorch Linear layout (out, in).
#pragma once

#include <cstddef>
#include <vector>

namespace dsv3 {

// a . b: 16 interleaved partial sums (lane j takes elements j, j+16, j+32, ...), then a fixed pairwise combine.
// The compiler maps the lanes onto SIMD registers; the order of every addition is the source's.
template <typename T>
T dot(const T* a, const T* b, int n) {
  constexpr int W = 16;
  T acc[W] = {};
  int i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  for (int w = W / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// y (n, out) = x (n, in) W^T: each row of W is read once for the whole chunk.
template <typename T>
void linear_rows(T* y, const T* x, const T* W, int n, int in, int out) {
  for (int o = 0; o < out; ++o) {
    const T* w = W + size_t(o) * in;
    for (int t = 0; t < n; ++t) y[size_t(t) * out + o] = dot(w, x + size_t(t) * in, in);
  }
}

// Scratch storage of the decode paths: grown on demand, never shrunk, so that after the first few calls
// decoding allocates nothing.
template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace dsv3
