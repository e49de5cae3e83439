// Stage 02, CUDA: the absorbed decode of a chunk of n tokens for B sequences (mla.h, cuda::mla_decode_chunk_absorbed),
// the GPU twin of cpu::mla_decode_chunk_absorbed, in two versions. Kernels, then the entry points. Shapes: see the
// legend in mla.h; R = B*n rows, row r = b*n + t.
//   version 1  mla_decode_chunk_absorbed: seven launches (q_a, q_norm, q_b, kv_a, the prologue, the attention, wo)
//              with stream-ordered scratch
//   version 2  mla_decode_chunk_absorbed_fused (the GPU sampler's step): the block's norm and residual add taken in,
//              four launches, the caller's workspace; bitwise version 1's values (tests: CudaMlaDecode against the
//              CPU and for chunk and batch invariance; stage 07's CudaSamplerPaths bitwise against version 1)
//
// Two properties the GPU sampler (stage 07) rests on:
//   - the position is read from device memory (pos0), so one captured CUDA graph replays at every position;
//   - every product is a fixed-order row-wise one (common/rowwise_cuda.cuh) and attention of (b, t, h) reads only
//     its own query and sequence b's cache, so the outputs of a chunk are bitwise those of n single-token calls,
//     and those of a batch bitwise those of B single-sequence calls.
#include "02_mla/mla.h"
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/rowwise_cuda.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / kWarpSize;

// ---- kernels ------------------------------------------------------------------------------------

// RoPE of one pair (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), as cpu::rope_forward; rounded products and sums, no
// fused multiply-add, so every kernel that rotates (versions 1 and 2) gives bitwise the same values.
__device__ __forceinline__ void rope_pair(float* x, float c, float s) {
  const float x0 = x[0], x1 = x[1];
  x[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  x[1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}
__device__ __forceinline__ void rope_pair(float* out, const float* x, float c, float s) {
  out[0] = __fsub_rn(__fmul_rn(x[0], c), __fmul_rn(x[1], s));
  out[1] = __fadd_rn(__fmul_rn(x[0], s), __fmul_rn(x[1], c));
}

// One warp per row r = b*n + t at position p = *pos0 + t: c_kv = kv_norm(kv[r, :Dc]) and k_pe = RoPE(kv[r, Dc:])
// go to sequence b's cache slot p; every head's q_pe (q[r, h, Dn:]) is rotated in place. Rows past the cache
// (p >= max_len: a caller's bug) are left alone rather than written out of bounds.
__global__ void decode_prologue_kernel(float* q, const float* kv, float* c_kv, float* k_pe, const float* kv_norm,
                                       const float* cos, const float* sin, const int* pos0, int n, int R, int H,
                                       int S, int Dn, int Dc, int Dr, int max_len, float eps) {
  const int r = blockIdx.x;
  const int lane = threadIdx.x;
  if (r >= R) return;
  const int b = r / n, t = r % n, p = *pos0 + t;
  if (p >= max_len) return;
  const float* kr = kv + static_cast<size_t>(r) * (Dc + Dr);
  // 1) c_kv = kv_norm(c_kv) into the cache
  const float rstd = 1.f / sqrtf(rowwise::warp_dot(kr, kr, Dc, lane) / static_cast<float>(Dc) + eps);
  float* ck = c_kv + (static_cast<size_t>(b) * max_len + p) * Dc;
  for (int j = lane; j < Dc; j += kWarpSize) ck[j] = kr[j] * rstd * kv_norm[j];
  // 2) RoPE at p: pair i of a rope slice (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), as cpu::rope_forward
  const int half = Dr / 2;
  const float* cs = cos + static_cast<size_t>(p) * half;
  const float* sn = sin + static_cast<size_t>(p) * half;
  float* kp = k_pe + (static_cast<size_t>(b) * max_len + p) * Dr;
  for (int i = lane; i < half; i += kWarpSize) rope_pair(kp + 2 * i, kr + Dc + 2 * i, cs[i], sn[i]);
  float* qr = q + static_cast<size_t>(r) * H * S;
  for (int k = lane; k < H * half; k += kWarpSize) {
    const int h = k / half, i = k % half;
    rope_pair(qr + static_cast<size_t>(h) * S + Dn + 2 * i, cs[i], sn[i]);
  }
}

// Block-wide reduction of one value per thread (max or sum) in a fixed order: warps, then warp 0 over the warps.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float u = lane < kAttnWarps ? red[lane] : (kMax ? -INFINITY : 0.f);
    u = kMax ? warp_max(u) : warp_sum(u);
    if (lane == 0) red[kAttnWarps] = u;
  }
  __syncthreads();
  const float result = red[kAttnWarps];
  __syncthreads();
  return result;
}

// One block per (head h, token t, sequence b), attending over positions 0 .. L-1, L = *pos0 + t + 1, in latent
// space (cpu::mla_decode_chunk_absorbed, step 5). A decode step is bound by latency, not arithmetic: every loop
// below keeps its serial chain short (a position per thread, or a slice of positions per warp) so the loads of a
// chain are independent of its sums and can be in flight together.
//   5a) q_abs (Dc) = q_nope W_uk_h          thread j: the sum over i < Dn in ascending order
//   5b) p_l = scale (q_abs . c_kv_l + q_pe . k_pe_l)   thread l: the sum over j in ascending order, then over k
//       softmax over l                      block reductions in a fixed order
//   5c) o_lat (Dc) = sum_l p_l c_kv_l       warp w sums its positions l = w, w + W, ... in ascending order (lane: a
//                                           few j), then the W warp sums are added in warp order
//       o_h (Dv) = W_uv_h o_lat             one warp per output, rowwise dot
// Every order depends on L and the sizes only, never on n or B: a chunk equals single steps bitwise.
// Dynamic shared memory: Dn + Dr + Dc + W Dc + Dc + Lmax floats (decode_attention_smem).
//
// kFused = true is version 2 (the GPU sampler's fused step), decode_prologue_kernel taken in: the block computes
// the chunk's new rows of its sequence that it attends to (positions *pos0 .. *pos0 + t: kv_norm(c_kv) and RoPE(k_pe)
// from the raw kv (R, Dc + Dr, row stride ldkv), a warp per row, as the prologue) into shared memory and reads them
// from there, the older positions from the cache; block (h = 0, t, b) appends row t to the cache. The block rotates
// its head's q_pe itself. No block reads a cache row that this launch writes, so there is no race, and every value
// is bitwise version 1's. Extra dynamic shared memory: n (Dc + Dr) floats.
constexpr int kMaxLatChunks = 16;  // Dc <= 32 * 16 = 512 (DeepSeek-V3's kv_lora_rank)
template <bool kFused>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(
    float* o, const float* q, float* c_kv, float* k_pe, const float* wkv_b, const int* pos0, int n, int H, int Dn,
    int Dr, int Dc, int Dv, int max_len, float scale, int ldq, const float* kv, int ldkv, const float* kv_norm,
    const float* cos, const float* sin, float eps) {
  extern __shared__ float sm[];
  __shared__ float red[kAttnWarps + 1];
  const int h = blockIdx.x, t = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int S = Dn + Dr, KS = Dn + Dv, r = b * n + t;
  const int p0 = *pos0;
  const int L = min(p0 + t + 1, max_len);
  float* qn = sm;                       // (Dn)
  float* qp = qn + Dn;                  // (Dr)
  float* q_abs = qp + Dr;               // (Dc)
  float* part = q_abs + Dc;             // (W, Dc) the warps' partial o_lat
  float* o_lat = part + kAttnWarps * Dc;  // (Dc)
  float* p = o_lat + Dc;                // (Lmax)
  float* new_ck = p + max_len;          // kFused: (n, Dc) the chunk's rows p0 .. p0+t, normalised
  float* new_kp = new_ck + n * Dc;      // kFused: (n, Dr) the same, roped
  const float* qr = q + static_cast<size_t>(r) * ldq + static_cast<size_t>(h) * S;  // q rows of stride ldq
  for (int j = tid; j < S; j += kAttnThreads) qn[j] = qr[j];  // qn and qp are contiguous: [q_nope | q_pe]
  const int half = Dr / 2;
  if (kFused) {
    // 4) the prologue of rows u <= t of sequence b (decode_prologue_kernel's arithmetic), a warp per row
    for (int u = warp; u <= t; u += kAttnWarps) {
      const int pu = p0 + u;
      if (pu >= max_len) break;
      const float* kr = kv + static_cast<size_t>(b * n + u) * ldkv;
      const float rstd = 1.f / sqrtf(rowwise::warp_dot(kr, kr, Dc, lane) / static_cast<float>(Dc) + eps);
      const bool append = h == 0 && u == t;
      float* ck = c_kv + (static_cast<size_t>(b) * max_len + pu) * Dc;
      for (int j = lane; j < Dc; j += kWarpSize) {
        const float v = kr[j] * rstd * kv_norm[j];
        new_ck[u * Dc + j] = v;
        if (append) ck[j] = v;
      }
      const float* cs = cos + static_cast<size_t>(pu) * half;
      const float* sn = sin + static_cast<size_t>(pu) * half;
      float* kp = k_pe + (static_cast<size_t>(b) * max_len + pu) * Dr;
      for (int i = lane; i < half; i += kWarpSize) {
        rope_pair(new_kp + u * Dr + 2 * i, kr + Dc + 2 * i, cs[i], sn[i]);
        if (append) {
          kp[2 * i] = new_kp[u * Dr + 2 * i];
          kp[2 * i + 1] = new_kp[u * Dr + 2 * i + 1];
        }
      }
    }
    __syncthreads();
    if (p0 + t < max_len) {  // as the prologue, which leaves a row past the cache alone
      const float* cs = cos + static_cast<size_t>(p0 + t) * half;
      const float* sn = sin + static_cast<size_t>(p0 + t) * half;
      for (int i = tid; i < half; i += kAttnThreads) rope_pair(qp + 2 * i, cs[i], sn[i]);
    }
  }
  __syncthreads();
  // position l's cached rows: the chunk's own from shared memory (kFused), the older ones from the cache
  const float* ckb = c_kv + static_cast<size_t>(b) * max_len * Dc;
  const float* kpb = k_pe + static_cast<size_t>(b) * max_len * Dr;
  auto ck_row = [&](int l) {
    return kFused && l >= p0 ? new_ck + (l - p0) * Dc : ckb + static_cast<size_t>(l) * Dc;
  };
  auto kp_row = [&](int l) {
    return kFused && l >= p0 ? new_kp + (l - p0) * Dr : kpb + static_cast<size_t>(l) * Dr;
  };
  // 5a) W_uk_h = wkv_b[h*KS + i, :] for i < Dn
  const float* wk = wkv_b + static_cast<size_t>(h) * KS * Dc;
  for (int j = tid; j < Dc; j += kAttnThreads) {
    float acc = 0.f;
    if (kFused) {  // version 2: the same sum, its loads issued in batches (ILP, not a new order)
      for (int i0 = 0; i0 < Dn; i0 += rowwise::kIlp) {
        float wv[rowwise::kIlp];
#pragma unroll
        for (int u = 0; u < rowwise::kIlp; ++u)
          wv[u] = i0 + u < Dn ? wk[static_cast<size_t>(i0 + u) * Dc + j] : 0.f;
#pragma unroll
        for (int u = 0; u < rowwise::kIlp; ++u)
          if (i0 + u < Dn) acc = fmaf(qn[i0 + u], wv[u], acc);
      }
    } else {
#pragma unroll 8
      for (int i = 0; i < Dn; ++i) acc = fmaf(qn[i], wk[static_cast<size_t>(i) * Dc + j], acc);
    }
    q_abs[j] = acc;
  }
  __syncthreads();
  // 5b) scores, then the softmax
  for (int l = tid; l < L; l += kAttnThreads) {
    const float* ck = ck_row(l);
    const float* kp = kp_row(l);
    float a = 0.f, e = 0.f;
    if (kFused) {
      for (int j0 = 0; j0 < Dc; j0 += 2 * rowwise::kIlp) {
        float cv[2 * rowwise::kIlp];
#pragma unroll
        for (int u = 0; u < 2 * rowwise::kIlp; ++u) cv[u] = j0 + u < Dc ? ck[j0 + u] : 0.f;
#pragma unroll
        for (int u = 0; u < 2 * rowwise::kIlp; ++u)
          if (j0 + u < Dc) a = fmaf(q_abs[j0 + u], cv[u], a);
      }
      for (int k0 = 0; k0 < Dr; k0 += rowwise::kIlp) {
        float kv_[rowwise::kIlp];
#pragma unroll
        for (int u = 0; u < rowwise::kIlp; ++u) kv_[u] = k0 + u < Dr ? kp[k0 + u] : 0.f;
#pragma unroll
        for (int u = 0; u < rowwise::kIlp; ++u)
          if (k0 + u < Dr) e = fmaf(qp[k0 + u], kv_[u], e);
      }
    } else {
#pragma unroll 8
      for (int j = 0; j < Dc; ++j) a = fmaf(q_abs[j], ck[j], a);
#pragma unroll 8
      for (int k = 0; k < Dr; ++k) e = fmaf(qp[k], kp[k], e);
    }
    p[l] = scale * (a + e);
  }
  __syncthreads();
  float m = -INFINITY;
  for (int l = tid; l < L; l += kAttnThreads) m = fmaxf(m, p[l]);
  m = block_reduce<true>(m, red);
  float z = 0.f;
  for (int l = tid; l < L; l += kAttnThreads) z += (p[l] = expf(p[l] - m));
  const float inv = 1.f / block_reduce<false>(z, red);
  for (int l = tid; l < L; l += kAttnThreads) p[l] *= inv;
  __syncthreads();
  // 5c) o_lat: warp partial sums over its positions, then the warps in order
  float acc[kMaxLatChunks];
#pragma unroll
  for (int c = 0; c < kMaxLatChunks; ++c) acc[c] = 0.f;
  auto add_position = [&](int l) {
    const float pl = p[l];
    const float* ck = ck_row(l);
#pragma unroll
    for (int c = 0; c < kMaxLatChunks; ++c) {
      const int j = c * kWarpSize + lane;
      if (j < Dc) acc[c] = fmaf(pl, ck[j], acc[c]);
    }
  };
  if (kFused) {  // positions in batches of kPos per warp, their loads first; each acc[c] still adds them in order
    constexpr int kPos = 2;
    const int chunks = (Dc + kWarpSize - 1) / kWarpSize;
    for (int l0 = warp; l0 < L; l0 += kPos * kAttnWarps) {
      float pl[kPos], v[kPos][kMaxLatChunks];
#pragma unroll
      for (int u = 0; u < kPos; ++u) {
        const int l = l0 + u * kAttnWarps;
        pl[u] = l < L ? p[l] : 0.f;
        const float* ck = l < L ? ck_row(l) : nullptr;
#pragma unroll
        for (int c = 0; c < kMaxLatChunks; ++c) {
          const int j = c * kWarpSize + lane;
          v[u][c] = l < L && c < chunks && j < Dc ? ck[j] : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kPos; ++u)
        if (l0 + u * kAttnWarps < L) {
#pragma unroll
          for (int c = 0; c < kMaxLatChunks; ++c)
            if (c * kWarpSize + lane < Dc) acc[c] = fmaf(pl[u], v[u][c], acc[c]);
        }
    }
  } else {
#pragma unroll 2
    for (int l = warp; l < L; l += kAttnWarps) add_position(l);
  }
#pragma unroll
  for (int c = 0; c < kMaxLatChunks; ++c) {
    const int j = c * kWarpSize + lane;
    if (j < Dc) part[warp * Dc + j] = acc[c];
  }
  __syncthreads();
  for (int j = tid; j < Dc; j += kAttnThreads) {
    float sum = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) sum += part[w * Dc + j];
    o_lat[j] = sum;
  }
  __syncthreads();
  // o_h = W_uv_h o_lat, W_uv_h = wkv_b[h*KS + Dn + v, :]
  float* orow = o + (static_cast<size_t>(r) * H + h) * Dv;
  int v0 = 0;
  if (kFused) {  // version 2: the lane sums of a warp's first kOutsPerWarp outputs first (their loads in flight
                 // together), then the warp sums: the same values
    constexpr int kOutsPerWarp = 8;
    float part[kOutsPerWarp];
#pragma unroll
    for (int i = 0; i < kOutsPerWarp; ++i) {
      const int v = warp + i * kAttnWarps;
      part[i] = v < Dv ? rowwise::lane_dot_ilp(wk + static_cast<size_t>(Dn + v) * Dc, o_lat, Dc, lane) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kOutsPerWarp; ++i) {
      const int v = warp + i * kAttnWarps;
      const float s = warp_sum(part[i]);
      if (v < Dv && lane == 0) orow[v] = s;
    }
    v0 = kOutsPerWarp * kAttnWarps;
  }
  for (int v = v0 + warp; v < Dv; v += kAttnWarps) {
    const float s = rowwise::warp_dot(wk + static_cast<size_t>(Dn + v) * Dc, o_lat, Dc, lane);
    if (lane == 0) orow[v] = s;
  }
}

// Version 2's shared memory grows with the chunk (n rows of Dc + Dr): above the default 48 KiB per block the kernel
// must be allowed more, up to what the device offers (227 KiB on Hopper); UserError beyond that.
void allow_attention_smem(size_t smem) {
  if (smem <= 48 * 1024) return;
  int dev = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  require(smem <= size_t(optin), "mla decode: the fused attention needs {} bytes of shared memory per block (the "
          "cache's positions and the chunk's rows), more than the device's {}: feed shorter chunks", smem, optin);
  CUDA_CHECK(cudaFuncSetAttribute(decode_attention_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(smem)));
}

}  // namespace

// ---- entry point --------------------------------------------------------------------------------

void mla_decode_chunk_absorbed(float* out, const MlaCache<float>& cache, const float* inp, const MlaWeights<float>& w,
                               const MlaConfig& c, int B, int n, const int* pos0, const MlaRope<float>& rope) {
  validate_mla_call(c, B, n, 0, rope.positions);
  require(cache.max_len >= n && cache.max_len <= rope.positions,
          "mla decode: a cache of max_len {} must hold the chunk of {} tokens and fit the RoPE table of {} positions",
          cache.max_len, n, rope.positions);
  const int R = B * n, D = c.dim, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  const int Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim, S = c.qk_head_dim();
  ScratchBuffer<float> q(size_t(R) * H * S), q_lat(size_t(R) * Dq), kv(size_t(R) * (Dc + Dr)), o(size_t(R) * H * Dv);
  // 1) q (R, H, S) = wq_b q_norm(wq_a x), or wq x
  if (Dq > 0) {
    linear_rows(q_lat.get(), inp, w.wq_a, R, D, Dq);
    rmsnorm_rows(q_lat.get(), q_lat.get(), w.q_norm, R, Dq, c.norm_eps);
    linear_rows(q.get(), q_lat.get(), w.wq_b, R, Dq, H * S);
  } else {
    linear_rows(q.get(), inp, w.wq, R, D, H * S);
  }
  // 2) [c_kv | k_pe] (R, Dc+Dr) = wkv_a x;  3) + 4) kv_norm, RoPE and the append to the cache
  linear_rows(kv.get(), inp, w.wkv_a, R, D, Dc + Dr);
  decode_prologue_kernel<<<R, kWarpSize>>>(q.get(), kv.get(), cache.c_kv, cache.k_pe, w.kv_norm, rope.cos, rope.sin,
                                           pos0, n, R, H, S, Dn, Dc, Dr, cache.max_len, c.norm_eps);
  CUDA_CHECK_LAST();
  // 5) attention in latent space, one block per (head, token, sequence)
  require(Dc <= kMaxLatChunks * kWarpSize, "mla decode: kv_lora_rank {} is above the {} the GPU decode supports", Dc,
          kMaxLatChunks * kWarpSize);
  const size_t smem = sizeof(float) * (size_t(Dn) + Dr + (2 + kAttnWarps) * size_t(Dc) + cache.max_len);
  require(smem <= 48 * 1024, "mla decode: a cache of {} positions needs {} bytes of shared memory per block, more "
          "than 48 KiB", cache.max_len, smem);
  decode_attention_kernel<false><<<dim3(H, n, B), kAttnThreads, smem>>>(
      o.get(), q.get(), cache.c_kv, cache.k_pe, w.wkv_b, pos0, n, H, Dn, Dr, Dc, Dv, cache.max_len,
      static_cast<float>(c.softmax_scale()), H * S, nullptr, 0, nullptr, nullptr, nullptr, 0.f);
  CUDA_CHECK_LAST();
  // 6) out = wo o
  linear_rows(out, o.get(), w.wo, R, H * Dv, D);
}

// ---- version 2: the fused decode (the GPU sampler's step) -------------------------------------------

size_t mla_decode_workspace_floats(const MlaConfig& c, int rows) {
  const int Dq = c.q_lora_rank, A = (Dq > 0 ? Dq : c.n_heads * c.qk_head_dim()) + c.kv_lora_rank + c.qk_rope_head_dim;
  return size_t(rows) * (size_t(A) + size_t(c.n_heads) * c.qk_head_dim() + size_t(c.n_heads) * c.v_head_dim);
}

void mla_decode_chunk_absorbed_fused(float* x, const MlaCache<float>& cache, const float* in_norm, float in_eps,
                                     const MlaWeights<float>& w, const MlaConfig& c, int B, int n, const int* pos0,
                                     const MlaRope<float>& rope, float* workspace) {
  validate_mla_call(c, B, n, 0, rope.positions);
  require(cache.max_len >= n && cache.max_len <= rope.positions,
          "mla decode: a cache of max_len {} must hold the chunk of {} tokens and fit the RoPE table of {} positions",
          cache.max_len, n, rope.positions);
  require(c.kv_lora_rank <= kMaxLatChunks * kWarpSize,
          "mla decode: kv_lora_rank {} is above the {} the GPU decode supports", c.kv_lora_rank,
          kMaxLatChunks * kWarpSize);
  const int R = B * n, D = c.dim, H = c.n_heads, Dq = c.q_lora_rank, Dc = c.kv_lora_rank;
  const int Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim, S = c.qk_head_dim();
  const int Q = Dq > 0 ? Dq : H * S, A = Q + Dc + Dr;
  // workspace: a (R, A) = [q_lat or q | kv] of the first projection, q (R, H, S), o (R, H, Dv)
  float* a = workspace;
  float* q = a + size_t(R) * A;
  float* o = q + size_t(R) * H * S;
  // 1) + 2) a = rmsnorm(x) in_norm [wq_a | wkv_a]^T (or [wq | wkv_a]): the block's norm and both projections
  LinearRowsV2 first;
  first.g = in_norm;
  first.eps = in_eps;
  first.W1 = w.wkv_a;
  first.out0 = Q;
  linear_rows_v2(a, x, Dq > 0 ? w.wq_a : w.wq, R, D, A, first);
  //    q = q_norm(q_lat) wq_b^T
  const float* qh = a;  // (R, H, S) at row stride A without q compression
  int ldq = A;
  if (Dq > 0) {
    LinearRowsV2 second;
    second.g = w.q_norm;
    second.eps = c.norm_eps;
    second.ldx = A;
    linear_rows_v2(q, a, w.wq_b, R, Dq, H * S, second);
    qh = q;
    ldq = H * S;
  }
  // 3) - 5) the attention with kv_norm, RoPE and the cache append taken in
  const size_t smem =
      sizeof(float) * (size_t(Dn) + Dr + (2 + kAttnWarps) * size_t(Dc) + cache.max_len + size_t(n) * (Dc + Dr));
  allow_attention_smem(smem);
  decode_attention_kernel<true><<<dim3(H, n, B), kAttnThreads, smem>>>(
      o, qh, cache.c_kv, cache.k_pe, w.wkv_b, pos0, n, H, Dn, Dr, Dc, Dv, cache.max_len,
      static_cast<float>(c.softmax_scale()), ldq, a + Q, A, w.kv_norm, rope.cos, rope.sin, c.norm_eps);
  CUDA_CHECK_LAST();
  // 6) x += o wo^T: the block's residual add
  LinearRowsV2 last;
  last.accumulate = true;
  linear_rows_v2(x, o, w.wo, R, H * Dv, D, last);
}

}  // namespace dsv3::cuda
