// Stage 02, CUDA: the fused causal attention of MLA's training form (mla.h: cuda::fused_attention_forward /
// fused_attention_backward; the README's "Fused attention" derives it). Kernels, then launchers, then the entry
// points.
//
// First a packing pass rounds the operands to bf16, one (sequence, head) after another: q, k = [k_nope | k_pe]
// (the shared rope key copied into every head), v and, for the backward, dy, each row zero-padded to SP or DVP
// elements (the head dims rounded up to what the kernels were compiled for; zeros in the inner dimension leave
// every product unchanged). Then one block of 4 warps takes a tile of 64 rows (queries in the forward and in the
// dq kernel, keys in the dk/dv kernel); each warp owns 16 of them and multiplies with the tensor cores' mma.sync
// m16n8k16 (bf16 operands, fp32 accumulators). Tiles of the other operand (64 keys, or 64 queries) stream through
// shared memory by cp.async, two buffers deep: the next tile is in flight while the warps work on the current one;
// rows past the sequence's end are zero-filled by the copy itself.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4 g + t (g = lane / 4, t = lane % 4):
//   A (16 x 16, row major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 8+2t..), a[3] = (g+8, 8+2t..)
//   B (16 x 8, k x n):      b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 8+2t.., n = g)
//   C (16 x 8):             c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// So the accumulators of two adjacent n-tiles of a product are, packed to bf16, exactly the A fragment of the next
// product over those 16 columns (scores -> probabilities -> P V without a trip through shared memory). Every tile
// sits in shared memory as it sits in the packed tensor, row major ([row][dim]); every fragment comes from it by
// ldmatrix (four 8 x 8 matrices an instruction: an A fragment, or the B fragments of two n-tiles), .trans for the
// B operand of a product whose k runs along the tile's rows (P V: k = key). The operand that stays for the whole
// block (the forward's and the dq kernel's query rows) is loaded into registers once. Rows are padded by 8
// elements so that the 8 rows of a matrix fall in different banks. Only tiles that cross the diagonal (or T) are
// masked.
//
// Softmax in base 2: with s = scale q.k, the kernels work with s2 = s log2(e), so e^s = 2^s2 (ex2 is one
// instruction). lse (B, H, T) holds log2 sum_k 2^(s2_k) of each row; the backward's p = 2^(s2 - lse) needs no
// running maximum.
#include <cuda_bf16.h>

#include "02_mla/mla.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"

namespace dsv3::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;                 // rows of a block's tile and of every streamed tile
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kPad = 8;                   // elements added to every shared row (bank spread)
constexpr float kLog2e = 1.4426950408889634f;

// The fp32 operands of one call, as MlaSaved lays them out, and the packing of one row element.
struct Heads {
  const float* q;     // (N, H, S)
  const float* kv;    // (N, H, KS): [k_nope | v] per head
  const float* k_pe;  // (N, Dr): shared by the heads
  const float* dy;    // (N, H, Dv) or null
  int B, T, H, Dn, Dr, Dv;
  __device__ int S() const { return Dn + Dr; }
  __device__ int KS() const { return Dn + Dv; }
  // element d of row t of head h of sequence b of operand `which` (0 q, 1 k, 2 v), 0 past the head's dims
  __device__ float get(int which, int b, int h, int t, int d) const {
    const size_t row = size_t(b) * T + t;
    switch (which) {
      case 0: return d < S() ? q[(row * H + h) * S() + d] : 0.f;
      case 1:
        if (d < Dn) return kv[(row * H + h) * KS() + d];
        return d < S() ? k_pe[row * Dr + (d - Dn)] : 0.f;
      default: return d < Dv ? kv[(row * H + h) * KS() + Dn + d] : 0.f;
    }
  }
};

// What the attention kernels read: bf16 rows of W elements, row ((b H + h) T + t) for (b, h, t).
struct Packed {
  const bf16* q;   // rows of SP
  const bf16* k;   // rows of SP
  const bf16* v;   // rows of DVP
  const bf16* dy;  // rows of DVP (backward)
  int T, H, Dn, Dr, Dv;
  float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// dst row ((b H + h) T + t), elements 8c .. 8c+7 of operand `which`: one thread per 8 elements (16 bytes).
__global__ void pack_kernel(bf16* dst, const Heads a, int which, int W) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int chunks = W / 8;
  if (i >= size_t(a.B) * a.H * a.T * chunks) return;
  const int c = int(i % chunks);
  const size_t row = i / chunks;  // (b H + h) T + t
  const int t = int(row % a.T), bh = int(row / a.T), h = bh % a.H, b = bh / a.H;
  uint32_t w[4];
  for (int j = 0; j < 4; ++j)
    w[j] = pack_bf16(a.get(which, b, h, t, 8 * c + 2 * j), a.get(which, b, h, t, 8 * c + 2 * j + 1));
  *reinterpret_cast<uint4*>(dst + row * W + 8 * c) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- shared-memory staging and fragments ------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes from global to shared, or 16 zero bytes when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  cuda::cp_async16(smem_addr(dst), src, valid);
}

// Queues rows r0 .. r0+63 of one (sequence, head) of a packed operand (rows of W bf16) into a shared tile of row
// length W + kPad; rows >= T become zeros.
template <int W>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src_bh, int r0, int T) {
  constexpr int kChunks = W / 8;
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks, t = r0 + r;
    cp_async16(dst + r * (W + kPad) + 8 * c, src_bh + size_t(t < T ? t : 0) * W + 8 * c, t < T);
  }
}

// c += a b over one 16 x 8 x 16 step.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragments come from shared memory by ldmatrix: one instruction hands every lane its share of four 8 x 8 bf16
// matrices, the matrix i from the 8 row addresses of lanes 8i .. 8i+7. Without .trans a lane (g, t) receives
// (row g, columns 2t, 2t+1) of each matrix, which is the A or B fragment's layout when the tile's rows are the
// fragment's m or n; with .trans it receives (rows 2t, 2t+1, column g): the B fragment of a tile whose rows are k.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Byte offsets of this lane's row address inside a row-major shared tile of row length ld (elements):
//   a_lane: the A fragment (rows m0 + lane % 16, column k0 + 8 (lane / 16)) -> a[0..3];
//   bn_lane: B fragments of two n-tiles from a tile whose rows are n (rows n0 + lane % 8 + 8 (lane / 16), column
//            k0 + 8 ((lane / 8) % 2)) -> b0, b1 of n-tile n0, then of n0 + 8;
//   bk_lane: the same from a tile whose rows are k, by .trans (rows k0 + lane % 16, column n0 + 8 (lane / 16)).
__device__ __forceinline__ uint32_t a_lane(int ld) {
  const int lane = threadIdx.x % 32;
  return uint32_t(((lane % 16) * ld + (lane / 16) * 8) * 2);
}
__device__ __forceinline__ uint32_t bn_lane(int ld) {
  const int lane = threadIdx.x % 32;
  return uint32_t(((lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8) * 2);
}
__device__ __forceinline__ uint32_t bk_lane(int ld) { return a_lane(ld); }

// The A fragment over columns 16 kc .. 16 kc + 15 of a warp's 16 x 64 accumulator tile (8 n-tiles of 4).
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[8][4], int kc) {
  a[0] = pack_bf16(c[2 * kc][0], c[2 * kc][1]);
  a[1] = pack_bf16(c[2 * kc][2], c[2 * kc][3]);
  a[2] = pack_bf16(c[2 * kc + 1][0], c[2 * kc + 1][1]);
  a[3] = pack_bf16(c[2 * kc + 1][2], c[2 * kc + 1][3]);
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}
// The A fragments of a warp's 16 rows (from row m0) over K columns of a shared tile, loaded once and kept in
// registers (the operand that stays while the other streams).
template <int K>
__device__ __forceinline__ void load_a_rows(uint32_t (&a)[K / 16][4], const bf16* A, int ld, int m0) {
  const uint32_t base = smem_addr(A + m0 * ld) + a_lane(ld);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) ldsm_x4(a[kk], base + kk * 32);
}
// c (16 x 64) += A (16 x K, fragments in registers) times the 64-row tile B^T (B's rows the n index, ld_b).
template <int K>
__device__ __forceinline__ void mma_abt(float (&c)[8][4], const uint32_t (&a)[K / 16][4], const bf16* Bn, int ld_b) {
  const uint32_t base = smem_addr(Bn) + bn_lane(ld_b);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, base + (np * 16 * ld_b + kk * 16) * 2);
      mma(c[2 * np], a[kk], b[0], b[1]);
      mma(c[2 * np + 1], a[kk], b[2], b[3]);
    }
}
// The same with A's fragments read from shared memory (rows m0.. of a row-major tile, ld_a) as they are used.
template <int K>
__device__ __forceinline__ void mma_abt_s(float (&c)[8][4], const bf16* A, int ld_a, int m0, const bf16* Bn,
                                          int ld_b) {
  const uint32_t abase = smem_addr(A + m0 * ld_a) + a_lane(ld_a), base = smem_addr(Bn) + bn_lane(ld_b);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, abase + kk * 32);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, base + (np * 16 * ld_b + kk * 16) * 2);
      mma(c[2 * np], a, b[0], b[1]);
      mma(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}
// c (16 x NW) += P (16 x 64, accumulator layout) times the tile B (64 rows = k, NW columns), B row length ld_b.
template <int NW>
__device__ __forceinline__ void mma_pb(float (&c)[NW / 8][4], const float (&p)[8][4], const bf16* Bk, int ld_b) {
  const uint32_t base = smem_addr(Bk) + bk_lane(ld_b);
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    uint32_t fa[4];
    acc_to_a(fa, p, kc);
#pragma unroll
    for (int np = 0; np < NW / 16; ++np) {
      uint32_t b[4];
      ldsm_x4_trans(b, base + (kc * 16 * ld_b + np * 16) * 2);
      mma(c[2 * np], fa, b[0], b[1]);
      mma(c[2 * np + 1], fa, b[2], b[3]);
    }
  }
}
// 2^x by the special-function unit (ex2.approx, relative error ~2^-22, subnormal results flushed to 0; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- forward: one block per (query tile, head, sequence) -------------------------------------------
// SP, DVP: S and Dv rounded up to what the kernel was compiled for (multiples of 16).
template <int SP, int DVP>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(float* y, float* lse, const Packed a) {
  constexpr int LDQ = SP + kPad, LDV = DVP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [64][LDQ]
  bf16* const K0 = Qs + kTile * LDQ;      // two buffers [64][LDQ]: buffer i at K0 + i * kTile * LDQ
  bf16* const V0 = Qs + 3 * kTile * LDQ;  // two buffers [64][LDV]
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, q0 = qt * kTile, bh = b * a.H + h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const bf16* qb = a.q + size_t(bh) * a.T * SP;
  const bf16* kb = a.k + size_t(bh) * a.T * SP;
  const bf16* vb = a.v + size_t(bh) * a.T * DVP;
  load_tile<SP>(Qs, qb, q0, a.T);
  load_tile<SP>(K0, kb, 0, a.T);
  load_tile<DVP>(V0, vb, 0, a.T);
  cp_async_commit();
  const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // this thread's two rows
  const float sc = a.scale_log2;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // m: the running maximum of s2 = sc * (q . k)
  float o[DVP / 8][4];
  zero(o);
  uint32_t qf[SP / 16][4];  // this warp's 16 query rows as A fragments, loaded with the first tile
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile, cur = kt & 1;
    const bf16* Kc = K0 + cur * kTile * LDQ;
    const bf16* Vc = V0 + cur * kTile * LDV;
    if (kt < qt) {  // the next tile flies while this one is used
      load_tile<SP>(K0 + (cur ^ 1) * kTile * LDQ, kb, k0 + kTile, a.T);
      load_tile<DVP>(V0 + (cur ^ 1) * kTile * LDV, vb, k0 + kTile, a.T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (kt == 0) load_a_rows<SP>(qf, Qs, LDQ, warp * 16);
    float s[8][4];
    zero(s);
    mma_abt<SP>(s, qf, Kc, LDQ);
    // Only the diagonal tile holds keys after a row (and keys past T, which come after every row < T): mask it.
    if (kt == qt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + nt * 8 + 2 * t4 + (e & 1), row = e < 2 ? row0 : row1;
          if (key > row || key >= a.T) s[nt][e] = -INFINITY;
        }
    }
    // running maximum of each row (of the unscaled scores: sc > 0), then p = 2^(sc s - m) as one fma and ex2
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float alpha[2], neg_m[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m[i], mx[i] * sc);  // finite: key 0 is in every row's past, and tile 0 comes first
      alpha[i] = fast_exp2(m[i] - m_new);            // 0 on the first tile (m = -inf)
      m[i] = m_new;
      neg_m[i] = -m_new;
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(fmaf(s[nt][e], sc, neg_m[e / 2]));  // masked: 2^-inf = 0
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
    mma_pb<DVP>(o, s, Vc, LDV);
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
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
      if (rows[i] < a.T) lse[size_t(bh) * a.T + rows[i]] = m[i] + log2f(l[i]);
}

// ---- backward ---------------------------------------------------------------------------------------

// dy packed as bf16 rows of W like the other operands (row ((b H + h) T + t)), and Dsum (B, H, T) = sum_j dy y of
// each row (the softmax backward's row term) from the same read of dy. One warp per (b, t, h).
__global__ void pack_dy_kernel(bf16* dst, float* dsum, const float* dy, const float* y, int B, int T, int H, int Dv,
                               int W) {
  const size_t w = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= size_t(B) * T * H) return;
  const int h = int(w % H), bt = int(w / H), b = bt / T, t = bt % T;
  const float* p = dy + w * Dv;
  const float* q = y + w * Dv;
  bf16* out = dst + ((size_t(b) * H + h) * T + t) * W;
  float acc = 0.f;
  for (int j = 2 * lane; j < W; j += 64) {
    const float d0 = j < Dv ? p[j] : 0.f, d1 = j + 1 < Dv ? p[j + 1] : 0.f;
    if (j < Dv) acc = fmaf(d0, q[j], acc);
    if (j + 1 < Dv) acc = fmaf(d1, q[j + 1], acc);
    *reinterpret_cast<uint32_t*>(out + j) = pack_bf16(d0, d1);
  }
  acc = warp_sum(acc);
  if (lane == 0) dsum[(size_t(b) * H + h) * T + t] = acc;
}

// dk, dv: one block per (key tile, head, sequence); the query tiles from the diagonal on stream through.
// Per warp (16 keys x 64 queries): S^T = K Q^T, P^T = 2^(S2^T - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - Dsum), dK += dS^T Q. dk's rope part goes to dk_pe_h (B, T, H, Dr), summed over heads later.
template <int SP, int DVP>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(float* dkv, float* dk_pe_h, const float* lse,
                                                                  const float* dsum, const Packed a) {
  constexpr int LDQ = SP + kPad, LDV = DVP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // [64][LDQ]  A of S^T (m = key, k = dim)
  bf16* Vs = Ks + kTile * LDQ;                   // [64][LDV]  A of dP^T (m = key, k = vdim)
  bf16* const Q0 = Vs + kTile * LDV;         // two buffers [64][LDQ]: B of S^T (rows n) and of dK (rows k)
  bf16* const dO0 = Q0 + 2 * kTile * LDQ;    // two buffers [64][LDV]: B of dP^T (rows n) and of dV (rows k)
  float* lse_s = reinterpret_cast<float*>(dO0 + 2 * kTile * LDV);  // [2][64]
  float* dsum_s = lse_s + 2 * kTile;                               // [2][64]
  const int kt = blockIdx.x;  // the longest columns (first keys) first
  const int h = blockIdx.y, b = blockIdx.z, k0 = kt * kTile, bh = b * a.H + h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const bf16* qb = a.q + size_t(bh) * a.T * SP;
  const bf16* dyb = a.dy + size_t(bh) * a.T * DVP;
  const float* lse_b = lse + size_t(bh) * a.T;
  const float* dsum_b = dsum + size_t(bh) * a.T;
  const int n_tiles = (a.T + kTile - 1) / kTile;
  auto stage = [&](int qt, int buf) {
    const int q0 = qt * kTile;
    load_tile<SP>(Q0 + buf * kTile * LDQ, qb, q0, a.T);
    load_tile<DVP>(dO0 + buf * kTile * LDV, dyb, q0, a.T);
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const bool in = q0 + i < a.T;
      lse_s[buf * kTile + i] = in ? lse_b[q0 + i] : 0.f;
      dsum_s[buf * kTile + i] = in ? dsum_b[q0 + i] : 0.f;
    }
  };
  load_tile<SP>(Ks, a.k + size_t(bh) * a.T * SP, k0, a.T);
  load_tile<DVP>(Vs, a.v + size_t(bh) * a.T * DVP, k0, a.T);
  stage(kt, 0);
  cp_async_commit();
  const int key0 = k0 + warp * 16 + g, key1 = key0 + 8;
  float dk[SP / 8][4], dv[DVP / 8][4];
  zero(dk);
  zero(dv);
  for (int qt = kt; qt < n_tiles; ++qt) {
    const int q0 = qt * kTile, cur = (qt - kt) & 1;
    if (qt + 1 < n_tiles) {
      stage(qt + 1, cur ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float p[8][4], dp[8][4];
    zero(p);
    zero(dp);
    const bf16* Qc = Q0 + cur * kTile * LDQ;
    const bf16* dOc = dO0 + cur * kTile * LDV;
    mma_abt_s<SP>(p, Ks, LDQ, warp * 16, Qc, LDQ);
    mma_abt_s<DVP>(dp, Vs, LDV, warp * 16, dOc, LDV);
    // P^T = 2^(s2 - lse) where query >= key (and both < T), else 0;  dS^T = P^T (dP^T - Dsum). Masks are needed
    // on the diagonal tile and on a query tile that runs past T (its rows are zeros with lse = 0).
    const float* ls = lse_s + cur * kTile;
    const float* ds = dsum_s + cur * kTile;
    const bool edge = qt == kt || q0 + kTile > a.T;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * t4 + (e & 1), query = q0 + ql, key = e < 2 ? key0 : key1;
        float pv = fast_exp2(fmaf(p[nt][e], a.scale_log2, -ls[ql]));
        if (edge && !(query >= key && query < a.T && key < a.T)) pv = 0.f;
        p[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - ds[ql]);
      }
    mma_pb<DVP>(dv, p, dOc, LDV);
    mma_pb<SP>(dk, dp, Qc, LDQ);
    __syncthreads();
  }
  const float scale = a.scale_log2 / kLog2e;
  const int keys[2] = {key0, key1}, S = a.Dn + a.Dr, KS = a.Dn + a.Dv;
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
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(float* dq, const float* lse, const float* dsum,
                                                                const Packed a) {
  constexpr int LDQ = SP + kPad, LDV = DVP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);                      // [64][LDQ]  A of S
  bf16* dOs = Qs + kTile * LDQ;                                      // [64][LDV]  A of dP (k = vdim)
  bf16* const K0 = dOs + kTile * LDV;       // two buffers [64][LDQ]: B of S (rows n) and of dQ (rows k)
  bf16* const V0 = K0 + 2 * kTile * LDQ;    // two buffers [64][LDV]: B of dP (rows n = key)
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, q0 = qt * kTile, bh = b * a.H + h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const bf16* kb = a.k + size_t(bh) * a.T * SP;
  const bf16* vb = a.v + size_t(bh) * a.T * DVP;
  load_tile<SP>(Qs, a.q + size_t(bh) * a.T * SP, q0, a.T);
  load_tile<DVP>(dOs, a.dy + size_t(bh) * a.T * DVP, q0, a.T);
  load_tile<SP>(K0, kb, 0, a.T);
  load_tile<DVP>(V0, vb, 0, a.T);
  cp_async_commit();
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float row_lse[2], row_dsum[2];
  for (int i = 0; i < 2; ++i) {
    const bool in = rows[i] < a.T;
    row_lse[i] = in ? lse[size_t(bh) * a.T + rows[i]] : 0.f;
    row_dsum[i] = in ? dsum[size_t(bh) * a.T + rows[i]] : 0.f;
  }
  float acc[SP / 8][4];
  zero(acc);
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile, cur = kt & 1;
    const bf16* Kc = K0 + cur * kTile * LDQ;
    const bf16* Vc = V0 + cur * kTile * LDV;
    if (kt < qt) {
      load_tile<SP>(K0 + (cur ^ 1) * kTile * LDQ, kb, k0 + kTile, a.T);
      load_tile<DVP>(V0 + (cur ^ 1) * kTile * LDV, vb, k0 + kTile, a.T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float p[8][4], dp[8][4];
    zero(p);
    zero(dp);
    mma_abt_s<SP>(p, Qs, LDQ, warp * 16, Kc, LDQ);
    mma_abt_s<DVP>(dp, dOs, LDV, warp * 16, Vc, LDV);
    // Only the diagonal tile holds keys after a row (and keys past T); rows past T are not stored.
    const bool diag = kt == qt;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t4 + (e & 1), i = e / 2;
        float pv = fast_exp2(fmaf(p[nt][e], a.scale_log2, -row_lse[i]));
        if (diag && (key > rows[i] || key >= a.T)) pv = 0.f;
        dp[nt][e] = pv * (dp[nt][e] - row_dsum[i]);
      }
    mma_pb<SP>(acc, dp, Kc, LDQ);
    __syncthreads();
  }
  const float scale = a.scale_log2 / kLog2e;
  const int S = a.Dn + a.Dr;
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

Heads heads_of(const float* q, const float* kv, const float* k_pe, const float* dy, const MlaConfig& c, int B,
               int seq) {
  return {q, kv, k_pe, dy, B, seq, c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim};
}

// The bf16 packs of one call (stream-ordered scratch): q, k, v here; the backward's dy by pack_dy_kernel.
struct Packs {
  ScratchBuffer<bf16> q, k, v, dy;
  Packed view;
  Packs(const Heads& h, const MlaConfig& c, int SP, int DVP, bool backward)
      : q(size_t(h.B) * h.H * h.T * SP), k(q.size()), v(size_t(h.B) * h.H * h.T * DVP),
        dy(backward ? v.size() : 0) {
    bf16* dst[3] = {q.get(), k.get(), v.get()};
    const int width[3] = {SP, SP, DVP};
    for (int w = 0; w < 3; ++w) {
      const size_t n = size_t(h.B) * h.H * h.T * (width[w] / 8);
      pack_kernel<<<blocks_for(n, 256), 256>>>(dst[w], h, w, width[w]);
      CUDA_CHECK_LAST();
    }
    view = {q.get(), k.get(), v.get(), dy.get(), h.T, h.H, h.Dn, h.Dr, h.Dv,
            static_cast<float>(c.softmax_scale()) * kLog2e};
  }
};

template <int SP, int DVP>
constexpr size_t forward_smem() {
  return sizeof(bf16) * (3 * kTile * (SP + kPad) + 2 * kTile * (DVP + kPad));
}
template <int SP, int DVP>
constexpr size_t dkdv_smem() {
  return sizeof(bf16) * (3 * kTile * (SP + kPad) + 3 * kTile * (DVP + kPad)) + 4 * kTile * sizeof(float);
}
template <int SP, int DVP>
constexpr size_t dq_smem() {
  return sizeof(bf16) * (3 * kTile * (SP + kPad) + 3 * kTile * (DVP + kPad));
}

// Shared memory past the default 48 KiB needs the kernel's consent.
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int SP, int DVP>
void forward_t(float* y, float* lse, const Heads& h, const MlaConfig& c) {
  const Packs p(h, c, SP, DVP, false);
  const dim3 grid((h.T + kTile - 1) / kTile, h.H, h.B);
  allow_smem(attention_forward_kernel<SP, DVP>, forward_smem<SP, DVP>());
  attention_forward_kernel<SP, DVP><<<grid, kThreads, forward_smem<SP, DVP>()>>>(y, lse, p.view);
  CUDA_CHECK_LAST();
}

template <int SP, int DVP>
void backward_t(float* dq, float* dkv, float* dk_pe_h, const float* lse, float* dsum, const float* y, const Heads& h,
                const MlaConfig& c) {
  Packs p(h, c, SP, DVP, true);
  const size_t rows = size_t(h.B) * h.T * h.H;
  pack_dy_kernel<<<blocks_for(rows * 32, 256), 256>>>(p.dy.get(), dsum, h.dy, y, h.B, h.T, h.H, h.Dv, DVP);
  CUDA_CHECK_LAST();
  const dim3 grid((h.T + kTile - 1) / kTile, h.H, h.B);
  allow_smem(attention_dkdv_kernel<SP, DVP>, dkdv_smem<SP, DVP>());
  attention_dkdv_kernel<SP, DVP><<<grid, kThreads, dkdv_smem<SP, DVP>()>>>(dkv, dk_pe_h, lse, dsum, p.view);
  CUDA_CHECK_LAST();
  allow_smem(attention_dq_kernel<SP, DVP>, dq_smem<SP, DVP>());
  attention_dq_kernel<SP, DVP><<<grid, kThreads, dq_smem<SP, DVP>()>>>(dq, lse, dsum, p.view);
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
  const Heads h = heads_of(q, kv, k_pe, nullptr, c, B, seq);
  switch (dims_of(c)) {
    case Dims::D32: forward_t<32, 32>(y, lse, h, c); break;
    case Dims::D64: forward_t<64, 64>(y, lse, h, c); break;
    case Dims::D96: forward_t<96, 64>(y, lse, h, c); break;
  }
}

void fused_attention_backward(float* dq, float* dkv, float* dk_pe, const float* dy, const float* y, const float* lse,
                              const float* q, const float* kv, const float* k_pe, const MlaConfig& c, int B, int seq) {
  require(B > 0 && seq > 0, "fused attention: B and T must be positive, got B={} T={}", B, seq);
  const Heads h = heads_of(q, kv, k_pe, dy, c, B, seq);
  const int H = c.n_heads, Dr = c.qk_rope_head_dim;
  const size_t N = size_t(B) * seq;
  ScratchBuffer<float> dsum(N * H), dk_pe_h(N * H * Dr);
  switch (dims_of(c)) {
    case Dims::D32: backward_t<32, 32>(dq, dkv, dk_pe_h.get(), lse, dsum.get(), y, h, c); break;
    case Dims::D64: backward_t<64, 64>(dq, dkv, dk_pe_h.get(), lse, dsum.get(), y, h, c); break;
    case Dims::D96: backward_t<96, 64>(dq, dkv, dk_pe_h.get(), lse, dsum.get(), y, h, c); break;
  }
  sum_heads_kernel<<<blocks_for(N * Dr, 256), 256>>>(dk_pe, dk_pe_h.get(), N, H, Dr);
  CUDA_CHECK_LAST();
}

}  // namespace dsv3::cuda
