// Version 2 of the segmented products (gemm.h) for Hopper GPUs (compute capability 9.0, built for sm_90a): the
// same products, over segments whose offsets are read on the device, on the warpgroup tensor-core instructions
// (wgmma) instead of version 1's WMMA fragments (segment_gemm.cu, kept as the oracle and for other GPUs). Two of
// version 1's three layouts:
//
//   rows, opB = T   C[s] = A[s] B_s^T   A: rows x K, B_s: N x K, both K contiguous ("K-major": wgmma reads them
//                                      as they are; a caller with B stored K x N transposes it once, as the
//                                      MoE does in its bf16 copy of the weights)
//   tn              C_s  = A[s]^T B[s]  A: rows x M, B: rows x N, the segment's rows the inner dimension; both
//                                      "MN-major" (M or N contiguous): wgmma's transpose flags read them so
//
// A block computes a 128 x BN tile of one product with two warpgroups (256 threads), each 64 rows x BN columns:
// one wgmma m64nBNk16 per 16 of the inner dimension, the accumulators in registers (BN / 2 floats a thread).
// Operand tiles of 64 inner elements stream global -> shared memory by cp.async (16 bytes a copy, zero-filled
// past the segment's rows, M, N or K: in the tn layout the zeros past a segment's end keep the next segment's
// rows out of the sum), kStages deep, in the 128-byte swizzle that wgmma's descriptors name. K-major: a tile row
// is one operand row's 64 inner elements (128 bytes), and its 16-byte chunk c sits at chunk c ^ (row % 8).
// MN-major: a tile row is one inner index's 64 M (or N) elements, in "atoms" of 64 rows x 64 elements (8 KB), and
// the same chunk rule. Either way the eight rows of a core matrix fall in different banks. wgmma reads shared
// memory through the async proxy, so each thread fences (fence.proxy.async) after its copies land and before the
// barrier. The epilogue writes fp32 pairs from the accumulators straight to C, rows past the segment's end (rows
// mode) or past M skipped.
//
// Gathered rows (SegmentGemm::a_rows / b_rows): an operand's row at sorted position g is read from row
// map[g] / rows_div; each thread works out its rows before its copies (once per block in the rows form, whose rows
// are the same for every tile; one tile ahead in the tn form), so no lookup is waited for among the copies.
//
// Pipeline (kPending wgmma groups left in flight): loads run kAhead = kStages - 1 - kPending tiles ahead; tile
// kt + kAhead goes to the stage of tile kt - 1 - kPending, whose products every warpgroup has waited for before
// the barrier of iteration kt.
#include "common/cuda_kernels.cuh"
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dsv3::cuda {

namespace {

constexpr int kBM = 128, kBK = 64, kThreads = 256, kMaxProducts = 3;
constexpr int kRowBytes = kBK * 2;  // one operand row of a tile: 64 bf16
using bf16 = __nv_bfloat16;

struct Product {
  const bf16* A;
  const bf16* B;
  float* C;
  int lda, ldb, ldc;
  int M, N, K;  // rows mode: N, K (M = the segment's rows); tn mode: M, N (K = the segment's rows)
  int64_t strideB, strideC;
  const int* a_rows;  // gathered rows (gemm.h), or null
  const int* b_rows;
  int rows_div;
};
struct Args {
  Product p[kMaxProducts];
  const int* off;
  int segments;
  float alpha, beta;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV3_WGMMA_DEVICE 1
#endif

#ifdef DSV3_WGMMA_DEVICE
// D (64 x N, fp32, N / 2 registers a thread) += A (64 x 16) B^T (B: N x 16), both read through shared-memory
// descriptors: K-major operands (kTrans = 0), or both MN-major (kTrans = 1, wgmma's transpose flags).
template <int kTrans>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, %67, %67;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(1), "n"(kTrans));
}

template <int kTrans>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, %131, %131;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "r"(1), "n"(kTrans));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads of the accumulators above a wgmma_wait (it does not know that the
// asynchronous products write them).
template <int R>
__device__ __forceinline__ void fence_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif


// The row of an operand that stands at sorted row g: map[g] / div when the operand's rows are gathered, else g.
__device__ __forceinline__ int source_row(const int* map, int div, int g) { return map ? map[g] / div : g; }

// The loaders below take each thread's tile rows as source rows worked out beforehand (-1: past the operand's
// extent, zero-filled), so that a gathered operand's lookups (map loads) are never waited for in the middle of a
// tile's copies: in the rows layout a block's rows are the same for every tile, looked up once; in the tn layout
// each tile has new rows (the inner index), looked up one iteration ahead of their copies.

// K-major, R rows: thread i-th chunk's row is (threadIdx.x + i kThreads) / 8; row[i] its source row.
template <int R>
__device__ __forceinline__ void k_major_rows(int (&row)[R * 8 / kThreads], int row0, int rows, const int* map,
                                             int div) {
#pragma unroll
  for (int i = 0; i < R * 8 / kThreads; ++i) {
    const int r = (threadIdx.x + i * kThreads) / 8;
    row[i] = row0 + r < rows ? source_row(map, div, row0 + r) : -1;
  }
}

// R rows x 64 inner elements of a K-major operand into a swizzled tile at shared address s: element (r, k) is
// base[row[r] * ld + k0 + k], zero where the row is -1 or k0 + k >= K (K % 8 == 0).
template <int R>
__device__ __forceinline__ void load_k_major(uint32_t s, const bf16* base, int ld, const int (&row)[R * 8 / kThreads],
                                             int k0, int K) {
  constexpr int kPer = R * 8 / kThreads;
  static_assert(R * 8 % kThreads == 0, "tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int idx = threadIdx.x + i * kThreads, r = idx / 8, c = idx % 8;
    const bool in = row[i] >= 0 && k0 + 8 * c < K;
    const bf16* src = in ? base + static_cast<int64_t>(row[i]) * ld + k0 + 8 * c : base;
    const uint32_t dst = s + r * kRowBytes + ((c ^ (r % 8)) << 4);
    cp_async16(dst, src, in);
  }
}

// MN-major, C elements a tile row: thread i-th chunk's inner index is k0 + (threadIdx.x + i kThreads) / (C / 8).
constexpr int kAtomBytes = kBK * kRowBytes;
template <int C>
__device__ __forceinline__ void mn_major_rows(int (&row)[kBK * C / 8 / kThreads], int k0, int K, const int* map,
                                              int div) {
#pragma unroll
  for (int i = 0; i < kBK * C / 8 / kThreads; ++i) {
    const int k = (threadIdx.x + i * kThreads) / (C / 8);
    row[i] = k0 + k < K ? source_row(map, div, k0 + k) : -1;
  }
}

// 64 inner indices x C elements of an MN-major operand into swizzled atoms at shared address s: element (k, j) is
// base[row[k] * ld + j0 + j], zero where the row is -1 or j0 + j >= J (J % 8 == 0). Atom a (elements 64 a ..
// 64 a + 63) starts at s + a * kAtomBytes.
template <int C>
__device__ __forceinline__ void load_mn_major(uint32_t s, const bf16* base, int ld,
                                              const int (&row)[kBK * C / 8 / kThreads], int j0, int J) {
  constexpr int kRowChunks = C / 8, kPer = kBK * kRowChunks / kThreads;
  static_assert(kBK * kRowChunks % kThreads == 0, "tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int idx = threadIdx.x + i * kThreads, k = idx / kRowChunks, cj = idx % kRowChunks;
    const int atom = cj / 8, c = cj % 8;
    const bool in = row[i] >= 0 && j0 + 8 * cj < J;
    const bf16* src = in ? base + static_cast<int64_t>(row[i]) * ld + j0 + 8 * cj : base;
    const uint32_t dst = s + atom * kAtomBytes + k * kRowBytes + ((c ^ (k % 8)) << 4);
    cp_async16(dst, src, in);
  }
}

// wgmma's shared-memory matrix descriptor of a tile in the 128-byte swizzle: start address (>> 4), leading byte
// offset (K-major: unused, 16; MN-major: from one 64-element atom to the next, kAtomBytes), stride byte offset 1024
// (from one group of 8 tile rows to the next), swizzle mode 1 = 128 bytes. Moving 16 along K adds 32 bytes to
// the start (K-major) or 16 rows of 128 bytes (MN-major).
__device__ __forceinline__ uint64_t tile_descriptor(uint32_t s, uint32_t lbo) {
  return static_cast<uint64_t>((s & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

template <int kBN, int kStages>
struct Config {
  static constexpr int kABytes = kBM * kRowBytes, kBBytes = kBN * kRowBytes, kStageBytes = kABytes + kBBytes;
  static constexpr size_t kSmem = static_cast<size_t>(kStages) * kStageBytes + 1024;  // + alignment slack
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzled tiles stay 1024-byte aligned");
};

// kTn: the tn layout (blockIdx.x = the M x N tile, blockIdx.y = the segment) else rows (blockIdx.x = the column
// tile, blockIdx.y = the row tile counted over the segments in order); blockIdx.z = the product.
template <bool kTn, int kBN, int kStages, int kPending, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) segment_gemm_wgmma_kernel(const __grid_constant__ Args args) {
#ifdef DSV3_WGMMA_DEVICE
  using Cfg = Config<kBN, kStages>;
  constexpr int kAhead = kStages - 1 - kPending, kRegs = kBN / 2;
  static_assert(kAhead >= 1, "at least one tile in flight");
  const Product& p = args.p[blockIdx.z];
  const bf16 *A, *B;
  const int *a_map = nullptr, *b_map = nullptr;  // gathered rows of this segment, or null
  float* C;
  int M, K, m0, n0;
  if (kTn) {
    const int n_tiles = (p.N + kBN - 1) / kBN, s = blockIdx.y;
    m0 = blockIdx.x / n_tiles * kBM;
    n0 = blockIdx.x % n_tiles * kBN;
    if (m0 >= p.M) return;
    const int64_t beg = args.off[s];
    A = p.a_rows ? p.A : p.A + beg * p.lda;
    B = p.b_rows ? p.B : p.B + beg * p.ldb;
    a_map = p.a_rows ? p.a_rows + beg : nullptr;
    b_map = p.b_rows ? p.b_rows + beg : nullptr;
    C = p.C + s * p.strideC;
    M = p.M;
    K = args.off[s + 1] - args.off[s];
  } else {
    n0 = blockIdx.x * kBN;
    if (n0 >= p.N) return;
    int s = 0, first = 0, rows = 0;
    for (; s < args.segments; ++s) {
      rows = args.off[s + 1] - args.off[s];
      const int tiles = (rows + kBM - 1) / kBM;
      if (static_cast<int>(blockIdx.y) < first + tiles) break;
      first += tiles;
    }
    if (s == args.segments) return;
    const int64_t beg = args.off[s];
    A = p.a_rows ? p.A : p.A + beg * p.lda;
    a_map = p.a_rows ? p.a_rows + beg : nullptr;
    B = p.B + s * p.strideB;
    C = p.C + beg * p.ldc;
    M = rows;
    K = p.K;
    m0 = (blockIdx.y - first) * kBM;
  }

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const auto a_stage = [&](int st) { return base + st * Cfg::kStageBytes; };
  const auto b_stage = [&](int st) { return base + st * Cfg::kStageBytes + Cfg::kABytes; };
  // each thread's source rows of the tiles it copies (see the loaders): rows layout, fixed; tn, per tile
  constexpr int kPerA = kBM * 8 / kThreads, kPerB = kBN * 8 / kThreads;
  static_assert(kBK * kBM / 8 == kBM * 8 && kBK * kBN / 8 == kBN * 8, "both layouts split a tile alike");
  int a_row[kPerA], b_row[kPerB];
  const auto tn_rows = [&](int k0) {
    mn_major_rows<kBM>(a_row, k0, K, a_map, p.rows_div);
    mn_major_rows<kBN>(b_row, k0, K, b_map, p.rows_div);
  };
  if (!kTn) {
    k_major_rows<kBM>(a_row, m0, M, a_map, p.rows_div);
    k_major_rows<kBN>(b_row, n0, p.N, nullptr, 1);
  }
  const auto load = [&](int st, int k0) {
    if (kTn) {
      load_mn_major<kBM>(a_stage(st), A, p.lda, a_row, m0, M);
      load_mn_major<kBN>(b_stage(st), B, p.ldb, b_row, n0, p.N);
    } else {
      load_k_major<kBM>(a_stage(st), A, p.lda, a_row, k0, K);
      load_k_major<kBN>(b_stage(st), B, p.ldb, b_row, k0, K);
    }
  };

  const int wg = threadIdx.x / 128;  // this warpgroup's 64 rows of the tile
  float acc[kRegs];
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = 0.f;

  const int k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int t = 0; t < kAhead; ++t) {
    if (t < k_tiles) {
      if (kTn) tn_rows(t * kBK);
      load(t, t * kBK);
    }
    cp_async_commit();
  }
  if (kTn) tn_rows(kAhead * kBK);  // the rows of the first tile the loop copies
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kAhead - 1>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // this thread's copies, to the async proxy
    __syncthreads();  // tile kt is in; products of tile kt - 1 - kPending are done in every warpgroup
    const int next = kt + kAhead;
    if (next < k_tiles) load(next % kStages, next * kBK);
    cp_async_commit();
    if (kTn && next + 1 < k_tiles) tn_rows((next + 1) * kBK);  // looked up while this tile's products run
    const int st = kt % kStages;
    // this warpgroup's 64 rows: K-major, rows 64 wg.. of the A tile; MN-major, A's atom wg
    const uint64_t da = tile_descriptor(a_stage(st) + wg * (kTn ? kAtomBytes : 64 * kRowBytes), kTn ? kAtomBytes : 16),
                   db = tile_descriptor(b_stage(st), kTn ? kAtomBytes : 16);
    constexpr uint64_t kStep = (kTn ? 16 * kRowBytes : 32) >> 4;  // 16 along K, in the descriptor's units
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kBK / 16; ++k) {
      if constexpr (kBN == 256)
        wgmma_m64n256k16<kTn>(acc, da + k * kStep, db + k * kStep);
      else
        wgmma_m64n128k16<kTn>(acc, da + k * kStep, db + k * kStep);
    }
    wgmma_commit();
    wgmma_wait<kPending>();
    fence_registers(acc);
  }
  wgmma_wait<0>();
  fence_registers(acc);
  cp_async_wait<0>();

  // epilogue: C = alpha acc + beta C (C not read when beta = 0). In a warpgroup's 64 x BN accumulator, warp w
  // holds rows 16 w + lane / 4 (+ 8), and for each 8 columns j the pair 8 j + 2 (lane % 4) (+ 1).
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int r0 = m0 + wg * 64 + warp * 16 + lane / 4, c0 = n0 + 2 * (lane % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int gm = r0 + 8 * h;
    if (gm >= M) continue;
    float* row = C + static_cast<int64_t>(gm) * p.ldc;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const int gn = c0 + 8 * j;
      if (gn >= p.N) continue;
      float2 v = make_float2(args.alpha * acc[4 * j + 2 * h], args.alpha * acc[4 * j + 2 * h + 1]);
      float2* dst = reinterpret_cast<float2*>(row + gn);
      if (args.beta != 0.f) {
        const float2 o = *dst;
        v.x += args.beta * o.x;
        v.y += args.beta * o.y;
      }
      *dst = v;
    }
  }
#else
  (void)args;
  __trap();  // never launched: segmented_gemm_wgmma_available() is false without sm_90a code
#endif
}

template <bool kTn, int kBN, int kStages, int kPending, int kMinBlocks>
void launch(dim3 grid, const Args& a) {
  using Cfg = Config<kBN, kStages>;
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(segment_gemm_wgmma_kernel<kTn, kBN, kStages, kPending, kMinBlocks>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg::kSmem)));
    return true;
  }();
  (void)configured;
  segment_gemm_wgmma_kernel<kTn, kBN, kStages, kPending, kMinBlocks><<<grid, kThreads, Cfg::kSmem>>>(a);
  CUDA_CHECK_LAST();
}

WgmmaTile g_tile = WgmmaTile::N128S3;  // the fastest on the bench model's products (moe_bench.csv)

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

}  // namespace

bool segmented_gemm_wgmma_available() {
#ifdef DSV3_WGMMA
  static const bool ok = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return major == 9 && minor == 0;
  }();
  return ok;
#else
  return false;
#endif
}

void set_wgmma_tile(WgmmaTile t) { g_tile = t; }
WgmmaTile wgmma_tile() { return g_tile; }

namespace {

int tile_columns(WgmmaTile t) { return t == WgmmaTile::N128S4 || t == WgmmaTile::N128S3 ? 128 : 256; }

template <bool kTn>
void launch_tile(WgmmaTile t, dim3 grid, const Args& a) {
  switch (t) {
    case WgmmaTile::N256S4: launch<kTn, 256, 4, 1, 1>(grid, a); break;
    case WgmmaTile::N256S3: launch<kTn, 256, 3, 0, 1>(grid, a); break;
    case WgmmaTile::N128S4: launch<kTn, 128, 4, 1, 1>(grid, a); break;
    case WgmmaTile::N128S3: launch<kTn, 128, 3, 0, 2>(grid, a); break;
  }
}

Args make_args(const char* who, bool tn, float alpha, float beta, const std::vector<SegmentGemm>& products,
               const int* offsets, int segments) {
  require(segmented_gemm_wgmma_available(), "{}: needs a compute capability 9.0 GPU and a build for sm_90a "
          "(CMAKE_CUDA_ARCHITECTURES=90a)", who);
  require(!products.empty() && products.size() <= static_cast<size_t>(kMaxProducts),
          "{}: 1 to {} products per call, got {}", who, kMaxProducts, products.size());
  for (const SegmentGemm& q : products)
    require(aligned16(q.A) && aligned16(q.B) && aligned16(q.C) && q.lda % 8 == 0 && q.ldb % 8 == 0 &&
                q.ldc % 2 == 0 && q.N % 8 == 0 && (tn ? q.M % 8 == 0 && q.strideC % 2 == 0
                                                      : q.K % 8 == 0 && q.strideB % 8 == 0),
            "{}: operands off 16 bytes, or a size or leading dimension off 8 (gemm.h)", who);
  Args a{};
  for (size_t i = 0; i < products.size(); ++i) {
    const SegmentGemm& q = products[i];
    require(tn || !q.b_rows, "{}: gathered rows of B only in the tn form (B is the segment's own matrix here)", who);
    require(q.rows_div >= 1, "{}: rows_div must be >= 1, got {}", who, q.rows_div);
    a.p[i] = {reinterpret_cast<const bf16*>(q.A), reinterpret_cast<const bf16*>(q.B), q.C, q.lda, q.ldb, q.ldc,
              q.M, q.N, q.K, q.strideB, q.strideC, q.a_rows, q.b_rows, q.rows_div};
  }
  a.off = offsets;
  a.segments = segments;
  a.alpha = alpha;
  a.beta = beta;
  return a;
}

}  // namespace

void segmented_gemm_rows_wgmma(float alpha, float beta, const std::vector<SegmentGemm>& products,
                               const int* offsets, int segments, int total_rows) {
  const Args a = make_args("segmented_gemm_rows_wgmma", false, alpha, beta, products, offsets, segments);
  if (segments == 0 || total_rows == 0) return;
  int max_n = 0;
  for (const SegmentGemm& q : products) max_n = std::max(max_n, q.N);
  if (max_n == 0) return;
  const int bn = tile_columns(g_tile);
  const int64_t row_tiles = (static_cast<int64_t>(total_rows) + kBM - 1) / kBM + segments;
  require(row_tiles <= 65535, "segmented_gemm_rows_wgmma: {} rows in {} segments need {} row tiles, over 65535",
          total_rows, segments, row_tiles);
  launch_tile<false>(g_tile, dim3((max_n + bn - 1) / bn, static_cast<unsigned>(row_tiles),
                                  static_cast<unsigned>(products.size())), a);
}

void segmented_gemm_tn_wgmma(float alpha, float beta, const std::vector<SegmentGemm>& products, const int* offsets,
                             int segments) {
  const Args a = make_args("segmented_gemm_tn_wgmma", true, alpha, beta, products, offsets, segments);
  if (segments == 0) return;
  const int bn = tile_columns(g_tile);
  int tiles = 0;
  for (const SegmentGemm& q : products) tiles = std::max(tiles, ((q.M + kBM - 1) / kBM) * ((q.N + bn - 1) / bn));
  if (tiles == 0) return;
  require(segments <= 65535, "segmented_gemm_tn_wgmma: {} segments, over the grid's 65535", segments);
  launch_tile<true>(g_tile, dim3(tiles, segments, static_cast<unsigned>(products.size())), a);
}

}  // namespace dsv3::cuda
