// Row-major matrix products on the GPU (cuBLAS, and the segmented products of segment_gemm.cu); the CPU twin
// (Eigen) is common/gemm_cpu.h, with the same arguments:
//
//   C(M,N) = alpha * op(A)(M,K) @ op(B)(K,N) + beta * C(M,N)
//
// op(X) is X (Op::N) or its transpose (Op::T). lda/ldb/ldc are row strides of the matrices as stored
// (so a head's slice of a wider row is a matrix with ld = the row width). The packed overloads take
// ld = the stored row length. beta = 0 overwrites C (its old contents are never read, NaN included).
// No Eigen here: this header is what the .cu files include.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

enum class Op { N, T };

// The precision of a product on the GPU. Every CUDA product names its own: a layer takes it from its
// config's `matmul` field, which the trainer sets from --precision (stage 07), and the few products that must
// stay fp32 whatever the layer's precision (the MoE router) say FP32 in the code.
//   FP32: exact fp32 (the path tested against the CPU reference).
//   TF32: tensor cores, operands rounded to 10 mantissa bits, ~1e-3 relative error.
//   BF16: operands rounded to bf16 (nearest even), multiplied on the tensor cores with fp32 accumulation, fp32
//         storage, ~4e-3 relative error: stage 07's mixed-precision training. How: Bf16Gemm below.
// The CPU reference always computes in its scalar type and ignores it.
enum class Matmul { FP32, TF32, BF16 };
inline std::string matmul_name(Matmul m) { return m == Matmul::BF16 ? "bf16" : m == Matmul::TF32 ? "tf32" : "fp32"; }

namespace cuda {

// How gemm, gemm_strided_batched and gemm_batched_2d run a Matmul::BF16 product (ConcurrentGemms and
// GroupedGemms always run the first way; the segmented products below take bf16 operands themselves):
//   Fast16bf (the default): cuBLAS reads the fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF.
//   Bf16Copies (an experiment, kept with its measurement): each operand is first rounded into a bf16 copy
//     (to_bf16, one pass over the span of memory the product reads, in stream-ordered scratch memory), and cuBLAS
//     multiplies the copies (bf16 inputs, CUBLAS_COMPUTE_32F, fp32 C). The products alone run about twice as fast
//     as Fast16bf's, but the copies cost more than that: the bench step went from 46.7 to 99.9 ms on an H200
//     (common/README.md, "gemm_bench"). bf16 operands pay only when the kernel that produces an operand writes it
//     in bf16 itself.
// Both round the operands to bf16 and accumulate in fp32; they differ in the order of the sums, so results agree
// to rounding, not bit for bit. Process-wide; set it before a step is captured in a CUDA graph.
enum class Bf16Gemm { Fast16bf, Bf16Copies };
void set_bf16_gemm(Bf16Gemm path);
Bf16Gemm bf16_gemm();

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, Matmul math);
void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, const float* B, float beta,
          float* C, Matmul math);
// batch independent products; matrix i starts at A + i*strideA (likewise B, C).
void gemm_strided_batched(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                          int64_t strideA, const float* B, int ldb, int64_t strideB, float beta, float* C,
                          int ldc, int64_t strideC, int batch, Matmul math);
// outer x inner products of one shape whose operands sit on a two-level grid: product (o, n) reads A at
// A + o*sa_outer + n*sa_inner (B and C alike). One cuBLAS pointer-array batched call (the table is built on the
// device), where strided batching would need one call per value of o or n (attention: sequences x heads).
// Pointers, leading dimensions or strides off 16 bytes: one strided-batched call per value of the smaller index.
void gemm_batched_2d(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, int64_t sa_outer,
                     int64_t sa_inner, const float* B, int ldb, int64_t sb_outer, int64_t sb_inner, float beta,
                     float* C, int ldc, int64_t sc_outer, int64_t sc_inner, int outer, int inner,
                     Matmul math);

// One problem of a grouped product: row-major C (M x N) = alpha op(A) op(B) + beta C, inner dimension K.
struct GemmProblem {
  int M, N, K;
  const float* A;
  int lda;
  const float* B;
  int ldb;
  float* C;
  int ldc;
};
// Independent products (no two write the same C) with the same ops, alpha and beta, spread round-robin over a
// few side streams (each with its own cuBLAS handle) so that small ones run side by side. Each C is written by
// one product, so results do not depend on the overlap. Problems with M or N = 0 are skipped, as are K = 0
// problems when beta = 1. The default stream goes on alongside them until join(), which the destructor calls:
// keep the object alive (its scope) while the default stream must not yet touch their outputs, write their
// inputs or free either; at the end of the scope the default stream waits for every product run().
class ConcurrentGemms {
 public:
  ConcurrentGemms() = default;
  ~ConcurrentGemms();  // join()
  ConcurrentGemms(const ConcurrentGemms&) = delete;
  ConcurrentGemms& operator=(const ConcurrentGemms&) = delete;
  void run(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems, Matmul math);
  void join();

 private:
  int lanes_ = 0;  // side streams with work the default stream has not joined yet
};

// Products of different shapes (the MoE experts, each with its own token count), each one cuBLAS grouped call
// (cublasGemmGroupedBatchedEx). Queue them all with add(), upload() their pointer tables in one copy (it waits
// for the host arrays to be staged), then run(i) each in turn, free to interleave other kernels. Problems with
// M or N = 0 are dropped, as are K = 0 problems when beta = 1 (C unchanged); K = 0 with beta != 1 is an error.
// Precision: as gemm, except that BF16 runs as TF32 (cuBLAS's grouped GEMM refuses bf16 compute on fp32
// operands).
class GroupedGemms {
 public:
  int add(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems);
  void upload();
  void run(int i, Matmul math);

 private:
  struct Product {
    Op opA, opB;
    float alpha, beta;
    std::vector<int> m, n, k, lda, ldb, ldc;
    size_t first = 0;  // index of its first A pointer in the table (then its Bs, then its Cs)
  };
  std::vector<Product> products_;
  std::vector<const void*> table_;
  const void** dev_ = nullptr;
  std::shared_ptr<void> owner_;  // the device table (stream-ordered free)
};

// Segmented products: the rows of a token-sorted matrix split into segments (the MoE experts) at offsets
// off[0] = 0 <= off[1] <= ... <= off[segments], held on the device and read there, so that the host never
// waits for them. bf16 operands (A and B hold bf16 bit patterns, as written by to_bf16 or a kernel that stores
// bf16), fp32 accumulation on the tensor cores, fp32 C. Up to 3 independent products of one layout per call
// (one launch); none may write another's C. C = alpha P + beta C, and beta = 0 never reads C.
//   segmented_gemm_rows: for each segment s, C[off[s]:off[s+1]] (rows x N) = A[off[s]:off[s+1]] (rows x K)
//     op(B_s) with B_s = B + s * strideB: N x K for opB = T, K x N for opB = N. M and strideC unused.
//     total_rows = off[segments] (sizes the grid).
//   segmented_gemm_tn: for each segment s, C_s (M x N) = A[off[s]:off[s+1]]^T B[off[s]:off[s+1]] with
//     C_s = C + s * strideC: the segment's rows are the inner dimension (a weight gradient). K and strideB unused.
// Needs A, B, C 16-byte aligned, lda, ldb, strideB and M, N, K (those used) multiples of 8, ldc and strideC
// multiples of 4: segmented_gemm_supported says; the calls refuse others with a UserError.
// Gathered rows (version 2 only, segment_gemm_hopper.cu): with a_rows set, the row of A that stands at sorted row
// g (rows: the output row; tn: the inner index) is A's row a_rows[g] / rows_div, not g (the MoE's tokens read
// through its dispatch permutation, without a gathered copy); b_rows likewise for B (tn only).
struct SegmentGemm {
  int M, N, K;
  const uint16_t* A;
  int lda;
  const uint16_t* B;
  int ldb;
  float* C;
  int ldc;
  int64_t strideB, strideC;
  const int* a_rows = nullptr;
  const int* b_rows = nullptr;
  int rows_div = 1;
};
bool segmented_gemm_supported(const std::vector<SegmentGemm>& products, bool tn);
void segmented_gemm_rows(Op opB, float alpha, float beta, const std::vector<SegmentGemm>& products,
                         const int* offsets, int segments, int total_rows);
void segmented_gemm_tn(float alpha, float beta, const std::vector<SegmentGemm>& products, const int* offsets,
                       int segments);
// Version 2 of segmented_gemm_rows (opB = T only) and segmented_gemm_tn on Hopper (segment_gemm_hopper.cu:
// wgmma, 128-byte swizzled tiles): the same products and arguments (up to 3 a call, offsets on the device).
// Needs a compute capability 9.0 GPU and a build with sm_90a code (CMAKE_CUDA_ARCHITECTURES=90a, the default for
// an H100/H200 or no GPU at configure time): segmented_gemm_wgmma_available() says; the calls refuse otherwise
// (UserError). Needs A, B, C 16-byte aligned, lda, ldb and N multiples of 8, ldc even; rows: K and strideB
// multiples of 8; tn: M a multiple of 8, strideC even. Results equal version 1's up to the order of the fp32 sums.
bool segmented_gemm_wgmma_available();
void segmented_gemm_rows_wgmma(float alpha, float beta, const std::vector<SegmentGemm>& products,
                               const int* offsets, int segments, int total_rows);
void segmented_gemm_tn_wgmma(float alpha, float beta, const std::vector<SegmentGemm>& products, const int* offsets,
                             int segments);
// The tile of a block (128 rows x 256 or 128 columns) and the pipeline's shared-memory stages: S4, four stages,
// two tiles loading ahead while one wgmma group stays in flight (one block an SM); S3, three stages, two tiles
// ahead, each group waited for (N128S3: two blocks an SM, registers capped at 128). Process-wide, for the
// micro-benchmark (default N128S3, the fastest there); set it before a step is captured in a CUDA graph.
enum class WgmmaTile { N256S4, N256S3, N128S4, N128S3 };
void set_wgmma_tile(WgmmaTile t);
WgmmaTile wgmma_tile();
// dst[i] = src[i] rounded to bf16 (nearest even), n elements.
void to_bf16(uint16_t* dst, const float* src, size_t n);

}  // namespace cuda
}  // namespace dsv3
