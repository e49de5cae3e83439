// Segmented products on the bf16 tensor cores, the segment offsets read on the device (gemm.h says what they
// compute). One kernel, three operand layouts:
//
//   rows, opB = T   C[s] = A[s] B_s^T   A: rows x K (K contiguous), B_s: N x K   (an expert's up-projections)
//   rows, opB = N   C[s] = A[s] B_s     A: rows x K,                 B_s: K x N   (its input gradients)
//   tn              C_s  = A[s]^T B[s]  A: rows x M, B: rows x N, the segment's rows are the inner dimension
//                                                                                (its weight gradients)
//
// A block computes a 128 x 128 tile of one product's output with 4 warps (2 x 2, each 64 x 64 as 4 x 4 WMMA
// bf16 16x16x16 fragments, fp32 accumulators: about 250 registers a thread, two blocks per SM; measured on an
// H200 against 8 warps of 64 x 32, it cut the up-projection product from 246 to 215 us). The bf16 operand tiles
// (128 x 32 each) stream global -> shared memory by cp.async, four stages deep (three tiles in flight while the
// fourth multiplies; one barrier per tile). Operands are bf16 in memory because fp32 ones would double the bytes
// per product and the tiles are limited by what the L2 cache delivers (measured: a kernel reading fp32 and
// rounding on the way ran at about 100 TFLOP/s, below cuBLAS's TF32 grouped GEMM). The epilogue goes through a
// per-warp 16 x 16 staging tile, so that rows past a segment's end (they belong to the next segment) are never
// written.
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace dsv3::cuda {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kPad = 8, kMaxProducts = 3;
constexpr int kWM = 2, kWN = 2, kThreads = 32 * kWM * kWN;  // a 2 x 2 grid of warps, each 64 x 64 of the tile
using bf16 = __nv_bfloat16;

struct Product {
  const bf16* A;
  const bf16* B;
  float* C;
  int lda, ldb, ldc;
  int M, N, K;  // rows mode: N, K (M = the segment's rows); tn mode: M, N (K = the segment's rows)
  int64_t strideB, strideC;
};
struct Args {
  Product p[kMaxProducts];
  const int* off;
  int segments;
  float alpha, beta;
};

// A R x C bf16 tile (C contiguous in memory) copied global -> shared by cp.async, 16 bytes (8 elements) a
// copy, rows of C + kPad elements in shared memory. Element (r, c) is base[(row0 + r) * ld + col0 + c];
// zero-filled where row0 + r >= rows or col0 + c >= cols (cols % 8 == 0: a 16-byte chunk is all in or out).
template <int R, int C, int kT>
__device__ void copy_tile(bf16* s, const bf16* base, int ld, int row0, int rows, int col0, int cols) {
  constexpr int kC8 = C / 8, kVec = R * kC8 / kT;
  static_assert(R * kC8 % kT == 0, "tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int idx = threadIdx.x + i * kT, r = idx / kC8, c = (idx % kC8) * 8;
    const bool in = row0 + r < rows && col0 + c < cols;
    const bf16* src = in ? base + static_cast<int64_t>(row0 + r) * ld + col0 + c : base;
    cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(s + r * (C + kPad) + c)), src, in);
  }
}

// Shared-memory sizes of one pipeline stage. kAK: A's inner index is contiguous (rows mode) else its output-row
// index is (tn). kBKc: B is stored N x K (opB = T) else K x N.
template <bool kAK, bool kBKc>
struct Layout {
  static constexpr int kA = kAK ? kBM * (kBK + kPad) : kBK * (kBM + kPad);  // elements of one A stage
  static constexpr int kB = kBKc ? kBN * (kBK + kPad) : kBK * (kBN + kPad);
  static constexpr size_t kSmem = static_cast<size_t>(kStages) * (kA + kB) * sizeof(bf16);
  static_assert(kSmem >= kWM * kWN * 16 * 16 * sizeof(float), "epilogue staging reuses the stages");
  static_assert((kA * sizeof(bf16)) % 128 == 0 && (kB * sizeof(bf16)) % 128 == 0, "stages stay 128-byte aligned");
};

// kRows: the rows mode (segments split the output rows) else the tn mode (segments split the inner dimension);
// kAK, kBKc: the operand layouts, as in Layout.
template <bool kRows, bool kAK, bool kBKc>
__global__ void __launch_bounds__(kThreads, 2) segment_gemm_kernel(const __grid_constant__ Args args) {
  using namespace nvcuda;
  using L = Layout<kAK, kBKc>;
  constexpr int kT = kThreads, kFN = kBN / kWN / 16, kWTN = kBN / kWN;  // per warp: fragments and columns along N
  const Product& p = args.p[blockIdx.z];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / kWN, wn = warp % kWN;
  const int n_tiles = (p.N + kBN - 1) / kBN;

  // This block's operands: A, B and C as (base, valid extents), and its tile (m0, n0).
  const bf16 *A, *B;
  float* C;
  int M, N = p.N, K, m0, n0;
  if (kRows) {
    n0 = blockIdx.x * kBN;
    if (n0 >= N) return;
    // blockIdx.y counts the row tiles of segment 0, then those of segment 1, ...
    int s = 0, first = 0, rows = 0;
    for (; s < args.segments; ++s) {
      rows = args.off[s + 1] - args.off[s];
      const int tiles = (rows + kBM - 1) / kBM;
      if (static_cast<int>(blockIdx.y) < first + tiles) break;
      first += tiles;
    }
    if (s == args.segments) return;
    const int64_t beg = args.off[s];
    A = p.A + beg * p.lda;
    B = p.B + s * p.strideB;
    C = p.C + beg * p.ldc;
    M = rows;
    K = p.K;
    m0 = (blockIdx.y - first) * kBM;
  } else {
    const int t = blockIdx.x, s = blockIdx.y;
    m0 = t / n_tiles * kBM;
    n0 = t % n_tiles * kBN;
    if (m0 >= p.M) return;
    const int64_t beg = args.off[s];
    A = p.A + beg * p.lda;
    B = p.B + beg * p.ldb;
    C = p.C + s * p.strideC;
    M = p.M;
    K = args.off[s + 1] - args.off[s];
  }

  // dynamic shared memory: kStages x (A tile, B tile); after the main loop, each warp's 16 x 16 staging tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  const auto a_stage = [&](int st) { return smem + st * (L::kA + L::kB); };
  const auto b_stage = [&](int st) { return smem + st * (L::kA + L::kB) + L::kA; };
  const auto load = [&](int st, int k0) {
    if (kAK)
      copy_tile<kBM, kBK, kT>(a_stage(st), A, p.lda, m0, M, k0, K);
    else
      copy_tile<kBK, kBM, kT>(a_stage(st), A, p.lda, k0, K, m0, M);
    if (kBKc)
      copy_tile<kBN, kBK, kT>(b_stage(st), B, p.ldb, n0, N, k0, K);
    else
      copy_tile<kBK, kBN, kT>(b_stage(st), B, p.ldb, k0, K, n0, N);
  };

  using ALayout = typename std::conditional<kAK, wmma::row_major, wmma::col_major>::type;
  using BLayout = typename std::conditional<kBKc, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][kFN];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // kStages - 1 tiles in flight ahead of the one being multiplied; an empty commit group past the end keeps
  // the wait counts uniform
  const int k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < k_tiles) load(st, st * kBK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in; every warp is done with the stage it replaces
    const int next = kt + kStages - 1;
    if (next < k_tiles) load(next % kStages, next * kBK);
    cp_async_commit();
    const bf16* As = a_stage(kt % kStages);
    const bf16* Bs = b_stage(kt % kStages);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, BLayout> b[kFN];
#pragma unroll
      for (int j = 0; j < kFN; ++j) {
        const int n = wn * kWTN + j * 16;
        wmma::load_matrix_sync(b[j], kBKc ? Bs + n * (kBK + kPad) + kk : Bs + kk * (kBN + kPad) + n,
                               kBKc ? kBK + kPad : kBN + kPad);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm * 64 + i * 16;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, ALayout> a;
        wmma::load_matrix_sync(a, kAK ? As + m * (kBK + kPad) + kk : As + kk * (kBM + kPad) + m,
                               kAK ? kBK + kPad : kBM + kPad);
#pragma unroll
        for (int j = 0; j < kFN; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages become the staging tiles

  // epilogue: C = alpha acc + beta C (C not read when beta = 0), element-wise bounds; lane writes 8 of a
  // fragment's row (N % 8 == 0 and ldc % 4 == 0, so two aligned float4)
  float* st = reinterpret_cast<float*>(smem_raw) + warp * 16 * 16;
  const int r = lane / 2, c = lane % 2 * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
      wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int gm = m0 + wm * 64 + i * 16 + r, gn = n0 + wn * kWTN + j * 16 + c;
      if (gm < M && gn < N) {
        float4* dst = reinterpret_cast<float4*>(C + static_cast<int64_t>(gm) * p.ldc + gn);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float* v0 = st + r * 16 + c + 4 * h;
          float4 v = make_float4(args.alpha * v0[0], args.alpha * v0[1], args.alpha * v0[2], args.alpha * v0[3]);
          if (args.beta != 0.f) {
            const float4 o = dst[h];
            v.x += args.beta * o.x;
            v.y += args.beta * o.y;
            v.z += args.beta * o.z;
            v.w += args.beta * o.w;
          }
          dst[h] = v;
        }
      }
      __syncwarp();
    }
}

template <bool kRows, bool kAK, bool kBKc>
void launch(dim3 grid, const Args& a) {
  using L = Layout<kAK, kBKc>;
  static const bool configured = [] {  // above 48 KB of dynamic shared memory needs the opt-in, once
    CUDA_CHECK(cudaFuncSetAttribute(segment_gemm_kernel<kRows, kAK, kBKc>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L::kSmem)));
    return true;
  }();
  (void)configured;
  segment_gemm_kernel<kRows, kAK, kBKc><<<grid, kThreads, L::kSmem>>>(a);
  CUDA_CHECK_LAST();
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

Args make_args(const std::vector<SegmentGemm>& products, const int* offsets, int segments, float alpha, float beta) {
  require(!products.empty() && products.size() <= static_cast<size_t>(kMaxProducts),
          "segmented gemm: 1 to {} products per call, got {}", kMaxProducts, products.size());
  Args a{};
  for (size_t i = 0; i < products.size(); ++i) {
    const SegmentGemm& q = products[i];
    a.p[i] = {reinterpret_cast<const bf16*>(q.A), reinterpret_cast<const bf16*>(q.B), q.C, q.lda, q.ldb, q.ldc,
              q.M, q.N, q.K, q.strideB, q.strideC};
  }
  a.off = offsets;
  a.segments = segments;
  a.alpha = alpha;
  a.beta = beta;
  return a;
}

}  // namespace

bool segmented_gemm_supported(const std::vector<SegmentGemm>& products, bool tn) {
  for (const SegmentGemm& q : products) {
    if (q.a_rows || q.b_rows) return false;  // gathered rows: version 2 only
    if (!(aligned16(q.A) && aligned16(q.B) && aligned16(q.C))) return false;
    if (q.lda % 8 || q.ldb % 8 || q.ldc % 4 || q.strideB % 8 || q.strideC % 4 || q.N % 8) return false;
    // the contiguous extent of each operand tile: whole 16-byte chunks
    if (tn ? q.M % 8 : q.K % 8) return false;
  }
  return true;
}

void segmented_gemm_rows(Op opB, float alpha, float beta, const std::vector<SegmentGemm>& products,
                         const int* offsets, int segments, int total_rows) {
  require(segmented_gemm_supported(products, false),
          "segmented_gemm_rows: operands off 16 bytes, N or K not a multiple of 8, or gathered rows (version 2 only)");
  if (segments == 0 || total_rows == 0) return;
  const Args a = make_args(products, offsets, segments, alpha, beta);
  int n_tiles = 0;
  for (const SegmentGemm& q : products) n_tiles = std::max(n_tiles, (q.N + kBN - 1) / kBN);
  if (n_tiles == 0) return;
  // every segment adds at most one partial row tile
  const int64_t row_tiles = (static_cast<int64_t>(total_rows) + kBM - 1) / kBM + segments;
  require(row_tiles <= 65535, "segmented_gemm_rows: {} rows in {} segments need {} row tiles, over the grid's 65535",
          total_rows, segments, row_tiles);
  const dim3 grid(n_tiles, static_cast<unsigned>(row_tiles), static_cast<unsigned>(products.size()));
  if (opB == Op::T)
    launch<true, true, true>(grid, a);
  else
    launch<true, true, false>(grid, a);
}

void segmented_gemm_tn(float alpha, float beta, const std::vector<SegmentGemm>& products, const int* offsets,
                       int segments) {
  require(segmented_gemm_supported(products, true),
          "segmented_gemm_tn: operands off 16 bytes, M or N not a multiple of 8, or gathered rows (version 2 only)");
  if (segments == 0) return;
  const Args a = make_args(products, offsets, segments, alpha, beta);
  int tiles = 0;
  for (const SegmentGemm& q : products) tiles = std::max(tiles, ((q.M + kBM - 1) / kBM) * ((q.N + kBN - 1) / kBN));
  if (tiles == 0) return;
  require(segments <= 65535, "segmented_gemm_tn: {} segments, over the grid's 65535", segments);
  const dim3 grid(tiles, segments, static_cast<unsigned>(products.size()));
  launch<false, false, false>(grid, a);
}

namespace {
// Version 1: one element a thread (4 bytes in, 2 out: about 0.4-0.8 TB/s measured on an H200). Kept for the
// unaligned case and the tail.
__global__ void to_bf16_kernel(bf16* dst, const float* src, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}
// Eight elements a thread: two 16-byte loads, one 16-byte store (the same rounding, bit for bit).
__global__ void to_bf16_x8_kernel(uint4* dst, const float4* src, size_t n8) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  const float4 a = src[2 * i], b = src[2 * i + 1];
  const __nv_bfloat162 p0 = __floats2bfloat162_rn(a.x, a.y), p1 = __floats2bfloat162_rn(a.z, a.w),
                       p2 = __floats2bfloat162_rn(b.x, b.y), p3 = __floats2bfloat162_rn(b.z, b.w);
  dst[i] = make_uint4(*reinterpret_cast<const unsigned*>(&p0), *reinterpret_cast<const unsigned*>(&p1),
                      *reinterpret_cast<const unsigned*>(&p2), *reinterpret_cast<const unsigned*>(&p3));
}
}  // namespace

void to_bf16(uint16_t* dst, const float* src, size_t n) {
  if (n == 0) return;
  size_t done = 0;
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const size_t n8 = n / 8;
    if (n8) {
      to_bf16_x8_kernel<<<blocks_for(n8, kThreads), kThreads>>>(reinterpret_cast<uint4*>(dst),
                                                                 reinterpret_cast<const float4*>(src), n8);
      CUDA_CHECK_LAST();
    }
    done = 8 * n8;
  }
  if (done < n) {
    to_bf16_kernel<<<blocks_for(n - done, kThreads), kThreads>>>(reinterpret_cast<bf16*>(dst) + done, src + done,
                                                                  n - done);
    CUDA_CHECK_LAST();
  }
}

}  // namespace dsv3::cuda
