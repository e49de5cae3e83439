// Stage 02, CUDA: the fused causal attention of MLA's training form (mla.h: cuda::fused_attention_forward /
// fused_attention_backward; the README's "Fused attention" derives it). Kernels, then launchers, then the entry
// points.
//
// One block of 4 warps takes a tile of 64 rows (queries in the forward and in the dq kernel, keys in the dk/dv
// kernel); each warp owns 16 of them and multiplies with the tensor cores' mma.sync m16n8k16 (bf16 operands, fp32
// accumulators). Tiles of the other operand (64 keys, or 64 queries) stream through shared memory, rounded from
// fp32 to bf16 on the way in and zero-filled past the sequence's end and past the head dims (padding the inner
// dimension with zeros leaves every product unchanged).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4 g + t (g = lane / 4, t = lane % 4):
//   A (16 x 16, row major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 8+2t..), a[3] = (g+8, 8+2t..)
//   B (16 x 8, k x n):      b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 8+2t.., n = g)
//   C (16 x 8):             c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// So the accumulators of two adjacent n-tiles of a product are, packed to bf16, exactly the A fragment of the next
// product over those 16 columns (scores -> probabilities -> P V without a trip through shared memory). Shared
// tiles are stored so that every fragment is one 32-bit load of two neighbours along k: A operands row-major
// [m][k], B operands as [n][k] (a transposed copy where the product needs one); rows are padded by 8 elements so
// that the 8 rows a fragment load touches fall in different banks.
//
// Softmax in base 2: with s = scale q.k, the kernels work with s2 = s log2(e), so e^s = 2^s2 (exp2f is one
// instruction). lse (B, H, T) holds log2 sum_k 2^(s2_k) of each row; the backward's p = 2^(s2 - lse) needs no
// running maximum.
#include <cuda_bf16.h>

#include "02_mla/mla.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"

namespace dsv3::cuda {
namespace {

constexpr int kTile = 64;                 // rows of a block's tile and of every streamed tile
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kPad = 8;                   // elements added to every shared row (bank spread)
constexpr int kLdT = kTile + kPad;        // row length of a transposed tile ([dim][64 rows])
constexpr float kLog2e = 1.4426950408889634f;

// The operands of one (sequence, head): element addresses of q, k, v rows, as MlaSaved lays them out.
struct Heads {
  const float* q;     // (N, H, S)
  const float* kv;    // (N, H, KS): [k_nope | v] per head
  const float* k_pe;  // (N, Dr): shared by the heads
  int T, H, Dn, Dr, Dv;
  float scale_log2;   // scale * log2(e)
  __device__ int S() const { return Dn + Dr; }
  __device__ int KS() const { return Dn + Dv; }
  // element d of query / key / value row t of head h of sequence b (0 past the head's dims)
  __device__ float qv(int b, int h, int t, int d) const {
    return d < S() ? q[(size_t(b) * T + t) * H * S() + size_t(h) * S() + d] : 0.f;
  }
  __device__ float kvv(int b, int h, int t, int d) const {
    if (d < Dn) return kv[(size_t(b) * T + t) * H * KS() + size_t(h) * KS() + d];
    if (d < S()) return k_pe[(size_t(b) * T + t) * Dr + (d - Dn)];
    return 0.f;
  }
  __device__ float vv(int b, int h, int t, int j) const {
    return j < Dv ? kv[(size_t(b) * T + t) * H * KS() + size_t(h) * KS() + Dn + j] : 0.f;
  }
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a b over one 16 x 8 x 16 step.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment of rows m0.., columns k0.. of a row-major shared tile of row length ld.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const __nv_bfloat16* p = s + (m0 + g) * ld + k0 + 2 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * ld);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * ld + 8);
}
// B fragment (k0.., n0..) of a shared tile stored as [n][k] with row length ld.
__device__ __forceinline__ void load_b(uint32_t& b0, uint32_t& b1, const __nv_bfloat16* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const __nv_bfloat16* p = s + (n0 + g) * ld + k0 + 2 * t;
  b0 = ld32(p);
  b1 = ld32(p + 8);
}
// The A fragment over columns 16 kc .. 16 kc + 15 of a warp's 16 x 64 accumulator tile (8 n-tiles of 4).
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[8][4], int kc) {
  a[0] = pack_bf16(c[2 * kc][0], c[2 * kc][1]);
  a[1] = pack_bf16(c[2 * kc][2], c[2 * kc][3]);
  a[2] = pack_bf16(c[2 * kc + 1][0], c[2 * kc + 1][1]);
  a[3] = pack_bf16(c[2 * kc + 1][2], c[2 * kc + 1][3]);
}

// Tile loaders: rows r0 .. r0+63 of one (b, h), element (r, d) from get(b, h, t, d), bf16 into shared memory,
// 0 for t >= T. Row major: dst[r * ld + d], d < width; transposed: dst[d * kLdT + r].
template <int W, typename Get>
__device__ void load_rows(__nv_bfloat16* dst, int ld, int r0, int T, Get get) {
  for (int i = threadIdx.x; i < kTile * W; i += kThreads) {
    const int r = i / W, d = i % W, t = r0 + r;
    dst[r * ld + d] = __float2bfloat16_rn(t < T ? get(t, d) : 0.f);
  }
}
template <int W, typename Get>
__device__ void load_rows_t(__nv_bfloat16* dst, int r0, int T, Get get) {
  for (int i = threadIdx.x; i < kTile * W; i += kThreads) {
    const int r = i / W, d = i % W, t = r0 + r;
    dst[d * kLdT + r] = __float2bfloat16_rn(t < T ? get(t, d) : 0.f);
  }
}

// ---- forward: one block per (query tile, head, sequence) -------------------------------------------
// SP, DVP: S and Dv rounded up to what the kernel was compiled for (multiples of 16).
template <int SP, int DVP>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(float* y, float* lse, const Heads a) {
  constexpr int LDQ = SP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [64][LDQ]   A of S = Q K^T
  __nv_bfloat16* Ks = Qs + kTile * LDQ;                              // [64][LDQ]   B of S (n = key, k = dim)
  __nv_bfloat16* Vt = Ks + kTile * LDQ;                              // [DVP][kLdT] B of O = P V (n = dim, k = key)
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, q0 = qt * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  load_rows<SP>(Qs, LDQ, q0, a.T, [&](int t, int d) { return a.qv(b, h, t, d); });
  const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // this thread's two rows
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[DVP / 8][4];
  for (auto& x : o) x[0] = x[1] = x[2] = x[3] = 0.f;
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // the previous tile is read by every warp
    load_rows<SP>(Ks, LDQ, k0, a.T, [&](int t, int d) { return a.kvv(b, h, t, d); });
    load_rows_t<DVP>(Vt, k0, a.T, [&](int t, int j) { return a.vv(b, h, t, j); });
    __syncthreads();
    float s[8][4];
    for (auto& x : s) x[0] = x[1] = x[2] = x[3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < SP / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, Qs, LDQ, warp * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Ks, LDQ, nt * 8, kk * 16);
        mma(s[nt], fa, b0, b1);
      }
    }
    // scale to base 2, mask the future and the keys past T, running maximum of each row
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t4 + (e & 1), row = e < 2 ? row0 : row1;
        const float v = (key > row || key >= a.T) ? -INFINITY : s[nt][e] * a.scale_log2;
        s[nt][e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m[i], mx[i]);  // finite: key 0 is in every row's past, and tile 0 comes first
      alpha[i] = exp2f(m[i] - m_new);           // 0 on the first tile (m = -inf)
      m[i] = m_new;
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - m[e / 2]);
        s[nt][e] = p;
        l[e / 2] += p;  // this thread's share of the row sum; the quad's are added at the end
      }
#pragma unroll
    for (int nt = 0; nt < DVP / 8; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      uint32_t fa[4];
      acc_to_a(fa, s, kc);
#pragma unroll
      for (int nt = 0; nt < DVP / 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Vt, kLdT, nt * 8, kc * 16);
        mma(o[nt], fa, b0, b1);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  const int rows[2] = {row0, row1};
#pragma unroll
  for (int nt = 0; nt < DVP / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = rows[e / 2], j = nt * 8 + 2 * t4 + (e & 1);
      if (row < a.T && j < a.Dv) y[(size_t(b) * a.T + row) * a.H * a.Dv + size_t(h) * a.Dv + j] = o[nt][e] / l[e / 2];
    }
  if (t4 == 0)
    for (int i = 0; i < 2; ++i)
      if (rows[i] < a.T) lse[(size_t(b) * a.H + h) * a.T + rows[i]] = m[i] + log2f(l[i]);
}

// ---- backward ---------------------------------------------------------------------------------------

// Dsum (B, H, T): sum_j dy y of each row (the softmax backward's row term). One warp per (b, t, h).
__global__ void attention_row_dot_kernel(float* dsum, const float* dy, const float* y, int B, int T, int H, int Dv) {
  const size_t w = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= size_t(B) * T * H) return;
  const int h = int(w % H), bt = int(w / H), b = bt / T, t = bt % T;
  const float* p = dy + w * Dv;
  const float* q = y + w * Dv;
  float acc = 0.f;
  for (int j = lane; j < Dv; j += 32) acc += p[j] * q[j];
  acc = warp_sum(acc);
  if (lane == 0) dsum[(size_t(b) * H + h) * T + t] = acc;
}

// dk, dv: one block per (key tile, head, sequence); the query tiles from the diagonal on stream through.
// Per warp (16 keys x 64 queries): S^T = K Q^T, P^T = 2^(S2^T - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - Dsum), dK += dS^T Q. dk's rope part goes to dk_pe_h (B, T, H, Dr), summed over heads later.
template <int SP, int DVP>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(float* dkv, float* dk_pe_h, const float* dy,
                                                                  const float* lse, const float* dsum, const Heads a) {
  constexpr int LDQ = SP + kPad, LDV = DVP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [64][LDQ]  A of S^T (m = key, k = dim)
  __nv_bfloat16* Vs = Ks + kTile * LDQ;                             // [64][LDV]  A of dP^T (m = key, k = vdim)
  __nv_bfloat16* Qs = Vs + kTile * LDV;                             // [64][LDQ]  B of S^T (n = query, k = dim)
  __nv_bfloat16* Qt = Qs + kTile * LDQ;                             // [SP][kLdT] B of dK (n = dim, k = query)
  __nv_bfloat16* dOs = Qt + SP * kLdT;                              // [64][LDV]  B of dP^T (n = query, k = vdim)
  __nv_bfloat16* dOt = dOs + kTile * LDV;                           // [DVP][kLdT] B of dV (n = vdim, k = query)
  float* lse_s = reinterpret_cast<float*>(dOt + DVP * kLdT);        // [64]
  float* dsum_s = lse_s + kTile;                                    // [64]
  const int kt = blockIdx.x;  // the longest columns (first keys) first
  const int h = blockIdx.y, b = blockIdx.z, k0 = kt * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const auto dyv = [&](int t, int j) { return j < a.Dv ? dy[(size_t(b) * a.T + t) * a.H * a.Dv + size_t(h) * a.Dv + j] : 0.f; };
  load_rows<SP>(Ks, LDQ, k0, a.T, [&](int t, int d) { return a.kvv(b, h, t, d); });
  load_rows<DVP>(Vs, LDV, k0, a.T, [&](int t, int j) { return a.vv(b, h, t, j); });
  const int key0 = k0 + warp * 16 + g, key1 = key0 + 8;
  float dk[SP / 8][4], dv[DVP / 8][4];
  for (auto& x : dk) x[0] = x[1] = x[2] = x[3] = 0.f;
  for (auto& x : dv) x[0] = x[1] = x[2] = x[3] = 0.f;
  const int n_tiles = (a.T + kTile - 1) / kTile;
  for (int qt = kt; qt < n_tiles; ++qt) {
    const int q0 = qt * kTile;
    __syncthreads();
    load_rows<SP>(Qs, LDQ, q0, a.T, [&](int t, int d) { return a.qv(b, h, t, d); });
    load_rows_t<SP>(Qt, q0, a.T, [&](int t, int d) { return a.qv(b, h, t, d); });
    load_rows<DVP>(dOs, LDV, q0, a.T, dyv);
    load_rows_t<DVP>(dOt, q0, a.T, dyv);
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const bool in = q0 + i < a.T;
      lse_s[i] = in ? lse[(size_t(b) * a.H + h) * a.T + q0 + i] : 0.f;
      dsum_s[i] = in ? dsum[(size_t(b) * a.H + h) * a.T + q0 + i] : 0.f;
    }
    __syncthreads();
    float p[8][4], dp[8][4];
    for (auto& x : p) x[0] = x[1] = x[2] = x[3] = 0.f;
    for (auto& x : dp) x[0] = x[1] = x[2] = x[3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < SP / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, Ks, LDQ, warp * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Qs, LDQ, nt * 8, kk * 16);
        mma(p[nt], fa, b0, b1);
      }
    }
#pragma unroll
    for (int kk = 0; kk < DVP / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, Vs, LDV, warp * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, dOs, LDV, nt * 8, kk * 16);
        mma(dp[nt], fa, b0, b1);
      }
    }
    // P^T = 2^(s2 - lse) where query >= key (and both < T), else 0;  dS^T = P^T (dP^T - Dsum)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * t4 + (e & 1), query = q0 + ql, key = e < 2 ? key0 : key1;
        const bool live = query >= key && query < a.T && key < a.T;
        const float pv = live ? exp2f(p[nt][e] * a.scale_log2 - lse_s[ql]) : 0.f;
        p[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - dsum_s[ql]);
      }
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      uint32_t fp[4], fs[4];
      acc_to_a(fp, p, kc);
      acc_to_a(fs, dp, kc);
#pragma unroll
      for (int nt = 0; nt < DVP / 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, dOt, kLdT, nt * 8, kc * 16);
        mma(dv[nt], fp, b0, b1);
      }
#pragma unroll
      for (int nt = 0; nt < SP / 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Qt, kLdT, nt * 8, kc * 16);
        mma(dk[nt], fs, b0, b1);
      }
    }
  }
  const float scale = a.scale_log2 / kLog2e;
  const int keys[2] = {key0, key1}, S = a.S(), KS = a.KS();
#pragma unroll
  for (int nt = 0; nt < SP / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = keys[e / 2], d = nt * 8 + 2 * t4 + (e & 1);
      if (key >= a.T || d >= S) continue;
      if (d < a.Dn)
        dkv[(size_t(b) * a.T + key) * a.H * KS + size_t(h) * KS + d] = scale * dk[nt][e];
      else
        dk_pe_h[((size_t(b) * a.T + key) * a.H + h) * a.Dr + (d - a.Dn)] = scale * dk[nt][e];
    }
#pragma unroll
  for (int nt = 0; nt < DVP / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = keys[e / 2], j = nt * 8 + 2 * t4 + (e & 1);
      if (key < a.T && j < a.Dv) dkv[(size_t(b) * a.T + key) * a.H * KS + size_t(h) * KS + a.Dn + j] = dv[nt][e];
    }
}

// dq: one block per (query tile, head, sequence); the key tiles up to the diagonal stream through.
// Per warp (16 queries x 64 keys): S = Q K^T, P = 2^(S2 - lse), dP = dO V^T, dS = P (dP - Dsum), dQ += dS K.
template <int SP, int DVP>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(float* dq, const float* dy, const float* lse,
                                                                const float* dsum, const Heads a) {
  constexpr int LDQ = SP + kPad, LDV = DVP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [64][LDQ]  A of S
  __nv_bfloat16* dOs = Qs + kTile * LDQ;                            // [64][LDV]  A of dP (k = vdim)
  __nv_bfloat16* Ks = dOs + kTile * LDV;                            // [64][LDQ]  B of S (n = key, k = dim)
  __nv_bfloat16* Vs = Ks + kTile * LDQ;                             // [64][LDV]  B of dP (n = key, k = vdim)
  __nv_bfloat16* Kt = Vs + kTile * LDV;                             // [SP][kLdT] B of dQ (n = dim, k = key)
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, q0 = qt * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  load_rows<SP>(Qs, LDQ, q0, a.T, [&](int t, int d) { return a.qv(b, h, t, d); });
  load_rows<DVP>(dOs, LDV, q0, a.T, [&](int t, int j) {
    return j < a.Dv ? dy[(size_t(b) * a.T + t) * a.H * a.Dv + size_t(h) * a.Dv + j] : 0.f;
  });
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float row_lse[2], row_dsum[2];
  for (int i = 0; i < 2; ++i) {
    const bool in = rows[i] < a.T;
    row_lse[i] = in ? lse[(size_t(b) * a.H + h) * a.T + rows[i]] : 0.f;
    row_dsum[i] = in ? dsum[(size_t(b) * a.H + h) * a.T + rows[i]] : 0.f;
  }
  float acc[SP / 8][4];
  for (auto& x : acc) x[0] = x[1] = x[2] = x[3] = 0.f;
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();
    load_rows<SP>(Ks, LDQ, k0, a.T, [&](int t, int d) { return a.kvv(b, h, t, d); });
    load_rows<DVP>(Vs, LDV, k0, a.T, [&](int t, int j) { return a.vv(b, h, t, j); });
    load_rows_t<SP>(Kt, k0, a.T, [&](int t, int d) { return a.kvv(b, h, t, d); });
    __syncthreads();
    float p[8][4], dp[8][4];
    for (auto& x : p) x[0] = x[1] = x[2] = x[3] = 0.f;
    for (auto& x : dp) x[0] = x[1] = x[2] = x[3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < SP / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, Qs, LDQ, warp * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Ks, LDQ, nt * 8, kk * 16);
        mma(p[nt], fa, b0, b1);
      }
    }
#pragma unroll
    for (int kk = 0; kk < DVP / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, dOs, LDV, warp * 16, kk * 16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Vs, LDV, nt * 8, kk * 16);
        mma(dp[nt], fa, b0, b1);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t4 + (e & 1), i = e / 2;
        const bool live = key <= rows[i] && key < a.T && rows[i] < a.T;
        const float pv = live ? exp2f(p[nt][e] * a.scale_log2 - row_lse[i]) : 0.f;
        dp[nt][e] = pv * (dp[nt][e] - row_dsum[i]);
      }
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      uint32_t fs[4];
      acc_to_a(fs, dp, kc);
#pragma unroll
      for (int nt = 0; nt < SP / 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, Kt, kLdT, nt * 8, kc * 16);
        mma(acc[nt], fs, b0, b1);
      }
    }
  }
  const float scale = a.scale_log2 / kLog2e;
  const int S = a.S();
#pragma unroll
  for (int nt = 0; nt < SP / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = rows[e / 2], d = nt * 8 + 2 * t4 + (e & 1);
      if (row < a.T && d < S) dq[(size_t(b) * a.T + row) * a.H * S + size_t(h) * S + d] = scale * acc[nt][e];
    }
}

// dk_pe (B, T, Dr) = sum over heads, in head order, of dk_pe_h (B, T, H, Dr).
__global__ void sum_heads_kernel(float* dk_pe, const float* dk_pe_h, size_t rows, int H, int Dr) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * Dr) return;
  const size_t r = i / Dr;
  const int d = int(i % Dr);
  float acc = 0.f;
  for (int h = 0; h < H; ++h) acc += dk_pe_h[(r * H + h) * Dr + d];
  dk_pe[i] = acc;
}

// ---- launchers ----------------------------------------------------------------------------------

Heads heads_of(const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int seq) {
  return {q, kv, k_pe, seq, c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
          static_cast<float>(c.softmax_scale()) * kLog2e};
}

template <int SP, int DVP>
constexpr size_t forward_smem() { return sizeof(__nv_bfloat16) * (2 * kTile * (SP + kPad) + DVP * kLdT); }
template <int SP, int DVP>
constexpr size_t dkdv_smem() {
  return sizeof(__nv_bfloat16) * (2 * kTile * (SP + kPad) + 2 * kTile * (DVP + kPad) + (SP + DVP) * kLdT) +
         2 * kTile * sizeof(float);
}
template <int SP, int DVP>
constexpr size_t dq_smem() {
  return sizeof(__nv_bfloat16) * (2 * kTile * (SP + kPad) + 2 * kTile * (DVP + kPad) + SP * kLdT);
}

// Shared memory past the default 48 KiB needs the kernel's consent, once.
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int SP, int DVP>
void forward_t(float* y, float* lse, const Heads& a, int B) {
  const dim3 grid((a.T + kTile - 1) / kTile, a.H, B);
  allow_smem(attention_forward_kernel<SP, DVP>, forward_smem<SP, DVP>());
  attention_forward_kernel<SP, DVP><<<grid, kThreads, forward_smem<SP, DVP>()>>>(y, lse, a);
  CUDA_CHECK_LAST();
}

template <int SP, int DVP>
void backward_t(float* dq, float* dkv, float* dk_pe_h, const float* dy, const float* lse, const float* dsum,
                const Heads& a, int B) {
  const dim3 grid((a.T + kTile - 1) / kTile, a.H, B);
  allow_smem(attention_dkdv_kernel<SP, DVP>, dkdv_smem<SP, DVP>());
  attention_dkdv_kernel<SP, DVP><<<grid, kThreads, dkdv_smem<SP, DVP>()>>>(dkv, dk_pe_h, dy, lse, dsum, a);
  CUDA_CHECK_LAST();
  allow_smem(attention_dq_kernel<SP, DVP>, dq_smem<SP, DVP>());
  attention_dq_kernel<SP, DVP><<<grid, kThreads, dq_smem<SP, DVP>()>>>(dq, dy, lse, dsum, a);
  CUDA_CHECK_LAST();
}

// The compiled head-dim pairs (MlaConfig::fused_attention_fits): (32, 32) small heads and the tests' odd dims,
// (64, 64) the lyrics model (S = 64, Dv = 48), (96, 64) the bench model.
enum class Dims { D32, D64, D96 };
Dims dims_of(const MlaConfig& c) {
  require(c.fused_attention_fits(), "fused attention: head dims S = {}, Dv = {} are not compiled (S <= 96 with "
          "Dv <= 64)", c.qk_head_dim(), c.v_head_dim);
  const int S = c.qk_head_dim(), Dv = c.v_head_dim;
  if (S <= 32 && Dv <= 32) return Dims::D32;
  if (S <= 64 && Dv <= 64) return Dims::D64;
  return Dims::D96;
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void fused_attention_forward(float* y, float* lse, const float* q, const float* kv, const float* k_pe,
                             const MlaConfig& c, int B, int seq) {
  require(B > 0 && seq > 0, "fused attention: B and T must be positive, got B={} T={}", B, seq);
  const Heads a = heads_of(q, kv, k_pe, c, seq);
  switch (dims_of(c)) {
    case Dims::D32: forward_t<32, 32>(y, lse, a, B); break;
    case Dims::D64: forward_t<64, 64>(y, lse, a, B); break;
    case Dims::D96: forward_t<96, 64>(y, lse, a, B); break;
  }
}

void fused_attention_backward(float* dq, float* dkv, float* dk_pe, const float* dy, const float* y, const float* lse,
                              const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int B, int seq) {
  require(B > 0 && seq > 0, "fused attention: B and T must be positive, got B={} T={}", B, seq);
  const Heads a = heads_of(q, kv, k_pe, c, seq);
  const int H = c.n_heads, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  const size_t N = size_t(B) * seq;
  ScratchBuffer<float> dsum(N * H), dk_pe_h(N * H * Dr);
  attention_row_dot_kernel<<<blocks_for(N * H * 32, 256), 256>>>(dsum.get(), dy, y, B, seq, H, Dv);
  CUDA_CHECK_LAST();
  switch (dims_of(c)) {
    case Dims::D32: backward_t<32, 32>(dq, dkv, dk_pe_h.get(), dy, lse, dsum.get(), a, B); break;
    case Dims::D64: backward_t<64, 64>(dq, dkv, dk_pe_h.get(), dy, lse, dsum.get(), a, B); break;
    case Dims::D96: backward_t<96, 64>(dq, dkv, dk_pe_h.get(), dy, lse, dsum.get(), a, B); break;
  }
  sum_heads_kernel<<<blocks_for(N * Dr, 256), 256>>>(dk_pe, dk_pe_h.get(), N, H, Dr);
  CUDA_CHECK_LAST();
}

}  // namespace dsv3::cuda
