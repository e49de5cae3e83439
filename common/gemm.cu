// Row-major GEMM over column-major cuBLAS.
//
// A row-major (R x C) matrix is, read by cuBLAS, the column-major (C x R) matrix: its transpose. So
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the ops,
// swap M and N. The leading dimensions stay the row strides.
#include "common/cuda_utils.h"
#include "common/errors.h"
#include "common/gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace dsv3 {

namespace cuda {

static cublasOperation_t to_cublas(Op op) { return op == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }
static cublasComputeType_t compute_type(Matmul m) {
  switch (m) {
    case Matmul::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case Matmul::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
  }
}

static void gemm_on(cublasHandle_t h, Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc, Matmul math) {
  if (M == 0 || N == 0) return;
  CUBLAS_CHECK(cublasGemmEx(h, to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F,
                            lda, &beta, C, CUDA_R_32F, ldc, compute_type(math), CUBLAS_GEMM_DEFAULT));
}

// ---- bf16 copies of the operands (Bf16Gemm::Bf16Copies, gemm.h) ----

static std::atomic<Bf16Gemm> g_bf16_gemm{Bf16Gemm::Fast16bf};
void set_bf16_gemm(Bf16Gemm path) { g_bf16_gemm.store(path); }
Bf16Gemm bf16_gemm() { return g_bf16_gemm.load(); }
static bool bf16_copies(Matmul math) { return math == Matmul::BF16 && bf16_gemm() == Bf16Gemm::Bf16Copies; }

// Elements from the first to the last one of a matrix op(X) (rows x cols, row stride ld as stored) that a product
// reads: op N stores rows x cols, op T cols x rows.
static size_t span_of(Op op, int rows, int cols, int ld) {
  const int64_t stored_rows = op == Op::N ? rows : cols, stored_cols = op == Op::N ? cols : rows;
  return static_cast<size_t>((stored_rows - 1) * int64_t(ld) + stored_cols);
}

// A bf16 copy (nearest even) of the n elements from src, in stream-ordered scratch memory: the copy of an element
// sits at the same offset from get() as the element from src, so strides and leading dimensions carry over.
class Bf16Copy {
 public:
  Bf16Copy(const float* src, size_t n) : buf_(n) { to_bf16(buf_.get(), src, n); }
  const void* get() { return buf_.get(); }

 private:
  ScratchBuffer<uint16_t> buf_;
};

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, Matmul math) {
  if (M == 0 || N == 0) return;
  if (!bf16_copies(math) || K == 0) {
    gemm_on(blas_handle(), opA, opB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, math);
    return;
  }
  Bf16Copy a(A, span_of(opA, M, K, lda)), b(B, span_of(opB, K, N, ldb));
  CUBLAS_CHECK(cublasGemmEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, b.get(), CUDA_R_16BF,
                            ldb, a.get(), CUDA_R_16BF, lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

void gemm(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, const float* B, float beta,
          float* C, Matmul math) {
  gemm(opA, opB, M, N, K, alpha, A, opA == Op::N ? K : M, B, opB == Op::N ? N : K, beta, C, N, math);
}

void gemm_strided_batched(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda,
                          int64_t strideA, const float* B, int ldb, int64_t strideB, float beta, float* C,
                          int ldc, int64_t strideC, int batch, Matmul math) {
  if (M == 0 || N == 0 || batch == 0) return;
  if (bf16_copies(math) && K > 0) {
    require(strideA >= 0 && strideB >= 0, "gemm_strided_batched: negative strides are not supported");
    Bf16Copy a(A, span_of(opA, M, K, lda) + size_t(batch - 1) * strideA),
        b(B, span_of(opB, K, N, ldb) + size_t(batch - 1) * strideB);
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha,
                                            b.get(), CUDA_R_16BF, ldb, strideB, a.get(), CUDA_R_16BF, lda, strideA,
                                            &beta, C, CUDA_R_32F, ldc, strideC, batch, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
    return;
  }
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, B,
                                          CUDA_R_32F, ldb, strideB, A, CUDA_R_32F, lda, strideA, &beta, C,
                                          CUDA_R_32F, ldc, strideC, batch, compute_type(math),
                                          CUBLAS_GEMM_DEFAULT));
}

namespace {
// Pointer tables of gemm_batched_2d: entry i = outer i / inner, inner i % inner. Operands A and B of `in_bytes`
// bytes an element (fp32, or their bf16 copies), C fp32.
struct Strides2d {
  int64_t outer, inner;
};
__global__ void pointer_table_kernel(uintptr_t* a, uintptr_t* b, uintptr_t* c, const char* A, Strides2d sa,
                                     const char* B, Strides2d sb, float* C, Strides2d sc, int outer, int inner,
                                     int in_bytes) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= outer * inner) return;
  const int o = i / inner, n = i % inner;
  a[i] = reinterpret_cast<uintptr_t>(A + (o * sa.outer + n * sa.inner) * in_bytes);
  b[i] = reinterpret_cast<uintptr_t>(B + (o * sb.outer + n * sb.inner) * in_bytes);
  c[i] = reinterpret_cast<uintptr_t>(C + o * sc.outer + n * sc.inner);
}

// The operands of a product as cuBLAS reads them: fp32 at the caller's precision, or bf16 copies multiplied with
// fp32 accumulation.
struct Operands {
  const char* A;
  const char* B;
  cudaDataType_t type;
  int bytes;
  cublasComputeType_t compute;
};
}  // namespace

void gemm_batched_2d(Op opA, Op opB, int M, int N, int K, float alpha, const float* A, int lda, int64_t sa_outer,
                     int64_t sa_inner, const float* B, int ldb, int64_t sb_outer, int64_t sb_inner, float beta,
                     float* C, int ldc, int64_t sc_outer, int64_t sc_inner, int outer, int inner, Matmul math) {
  const int batch = outer * inner;
  if (M == 0 || N == 0 || batch == 0) return;
  std::unique_ptr<Bf16Copy> a16, b16;
  Operands op{reinterpret_cast<const char*>(A), reinterpret_cast<const char*>(B), CUDA_R_32F, 4, compute_type(math)};
  if (bf16_copies(math) && K > 0) {
    require(sa_outer >= 0 && sa_inner >= 0 && sb_outer >= 0 && sb_inner >= 0,
            "gemm_batched_2d: negative strides are not supported");
    a16 = std::make_unique<Bf16Copy>(A, span_of(opA, M, K, lda) + size_t(outer - 1) * sa_outer +
                                            size_t(inner - 1) * sa_inner);
    b16 = std::make_unique<Bf16Copy>(B, span_of(opB, K, N, ldb) + size_t(outer - 1) * sb_outer +
                                            size_t(inner - 1) * sb_inner);
    op = {static_cast<const char*>(a16->get()), static_cast<const char*>(b16->get()), CUDA_R_16BF, 2,
          CUBLAS_COMPUTE_32F};
  }
  // cuBLAS cannot see the alignment of pointers in a device table, and its tensor-core kernels fault on
  // pointers off 16 bytes: unless every pointer and row is 16-byte aligned, one strided call per value of the
  // smaller index instead.
  const int in_al = 16 / op.bytes;  // elements in 16 bytes
  const auto ali = [&](int64_t v) { return v % in_al == 0; };
  const auto alc = [](int64_t v) { return v % 4 == 0; };
  const auto ap = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!(ap(op.A) && ap(op.B) && ap(C) && ali(lda) && ali(ldb) && alc(ldc) && ali(sa_outer) && ali(sa_inner) &&
        ali(sb_outer) && ali(sb_inner) && alc(sc_outer) && alc(sc_inner))) {
    const bool by_inner = outer >= inner;  // one call per inner index, batched over outer (or the other way)
    const int calls = by_inner ? inner : outer, count = by_inner ? outer : inner;
    for (int i = 0; i < calls; ++i) {
      const int64_t ao = by_inner ? i * sa_inner : i * sa_outer, bo = by_inner ? i * sb_inner : i * sb_outer,
                    co = by_inner ? i * sc_inner : i * sc_outer;
      CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha, op.B + bo * op.bytes, op.type, ldb,
          by_inner ? sb_outer : sb_inner, op.A + ao * op.bytes, op.type, lda, by_inner ? sa_outer : sa_inner, &beta,
          C + co, CUDA_R_32F, ldc, by_inner ? sc_outer : sc_inner, count, op.compute, CUBLAS_GEMM_DEFAULT));
    }
    return;
  }
  ScratchBuffer<uintptr_t> table(3 * static_cast<size_t>(batch));
  uintptr_t* t = table.get();
  const int threads = 256;
  pointer_table_kernel<<<(batch + threads - 1) / threads, threads>>>(t, t + batch, t + 2 * batch, op.A, {sa_outer, sa_inner}, op.B, {sb_outer, sb_inner}, C,
      {sc_outer, sc_inner}, outer, inner, op.bytes);
  CUDA_CHECK_LAST();
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets (B, A), N x M
  CUBLAS_CHECK(cublasGemmBatchedEx(blas_handle(), to_cublas(opB), to_cublas(opA), N, M, K, &alpha,
                                   reinterpret_cast<const void* const*>(t + batch), op.type, ldb,
                                   reinterpret_cast<const void* const*>(t), op.type, lda, &beta,
                                   reinterpret_cast<void* const*>(t + 2 * batch), CUDA_R_32F, ldc, batch, op.compute,
                                   CUBLAS_GEMM_DEFAULT));
}

namespace {
// The side streams of gemm_concurrent, each with its own cuBLAS handle (and so its own workspace), and the
// events that fork them from and join them back to the default stream. One set per host thread, kept.
constexpr int kSideStreams = 4;
struct SideStreams {
  Stream streams[kSideStreams];
  CublasHandle handles[kSideStreams];
  cudaEvent_t fork{}, join[kSideStreams]{};
  SideStreams() {
    CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int i = 0; i < kSideStreams; ++i) {
      CUBLAS_CHECK(cublasSetStream(handles[i].get(), streams[i].get()));
      CUDA_CHECK(cudaEventCreateWithFlags(&join[i], cudaEventDisableTiming));
    }
  }
  ~SideStreams() {
    cudaEventDestroy(fork);
    for (auto& e : join) cudaEventDestroy(e);
  }
};

SideStreams& side_streams() {
  thread_local SideStreams side;
  return side;
}
}  // namespace

void ConcurrentGemms::run(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems,
                          Matmul math) {
  std::vector<const GemmProblem*> live;
  for (const auto& p : problems)
    if (p.M > 0 && p.N > 0 && (p.K > 0 || beta != 1.f)) live.push_back(&p);
  if (!live.empty()) {
    SideStreams& side = side_streams();
    const int lanes = static_cast<int>(std::min<size_t>(kSideStreams, live.size()));
    CUDA_CHECK(cudaEventRecord(side.fork, nullptr));
    for (int i = 0; i < lanes; ++i) CUDA_CHECK(cudaStreamWaitEvent(side.streams[i].get(), side.fork, 0));
    for (size_t j = 0; j < live.size(); ++j) {
      const GemmProblem& p = *live[j];
      gemm_on(side.handles[j % lanes].get(), opA, opB, p.M, p.N, p.K, alpha, p.A, p.lda, p.B, p.ldb, beta, p.C,
              p.ldc, math);
    }
    lanes_ = std::max(lanes_, lanes);
  }
}

void ConcurrentGemms::join() {
  if (lanes_ == 0) return;
  SideStreams& side = side_streams();
  for (int i = 0; i < lanes_; ++i) {
    CUDA_CHECK(cudaEventRecord(side.join[i], side.streams[i].get()));
    CUDA_CHECK(cudaStreamWaitEvent(nullptr, side.join[i], 0));
  }
  lanes_ = 0;
}

ConcurrentGemms::~ConcurrentGemms() {
  try {
    join();
  } catch (const std::exception&) {
    // a destructor must not throw: the failed CUDA call shows again at the next checked call
  }
}

// cuBLAS's grouped GEMM has no bf16-compute mode for fp32 operands (CUBLAS_COMPUTE_32F_FAST_16BF is refused):
// under BF16 the grouped products run on the tensor cores in TF32 (operands rounded to 10 mantissa bits, not 7).
static cublasComputeType_t grouped_compute_type(Matmul m) {
  return compute_type(m == Matmul::BF16 ? Matmul::TF32 : m);
}

int GroupedGemms::add(Op opA, Op opB, float alpha, float beta, const std::vector<GemmProblem>& problems) {
  require(dev_ == nullptr, "GroupedGemms::add after upload()");
  Product pr{opA, opB, alpha, beta, {}, {}, {}, {}, {}, {}, 0};
  std::vector<const void*> a, b, c;
  for (const auto& p : problems) {
    if (p.M == 0 || p.N == 0) continue;
    if (p.K == 0) {
      require(beta == 1.f, "GroupedGemms: a problem with K = 0 needs beta = 1");
      continue;
    }
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets (B, A), N x M
    pr.m.push_back(p.N);
    pr.n.push_back(p.M);
    pr.k.push_back(p.K);
    a.push_back(p.B);
    pr.lda.push_back(p.ldb);
    b.push_back(p.A);
    pr.ldb.push_back(p.lda);
    c.push_back(p.C);
    pr.ldc.push_back(p.ldc);
  }
  pr.first = table_.size();
  table_.insert(table_.end(), a.begin(), a.end());
  table_.insert(table_.end(), b.begin(), b.end());
  table_.insert(table_.end(), c.begin(), c.end());
  products_.push_back(std::move(pr));
  return static_cast<int>(products_.size()) - 1;
}

void GroupedGemms::upload() {
  if (table_.empty()) return;
  void* p = nullptr;
  CUDA_CHECK(cudaMallocAsync(&p, table_.size() * sizeof(void*), nullptr));
  owner_ = std::shared_ptr<void>(p, [](void* q) { cudaFreeAsync(q, nullptr); });
  dev_ = static_cast<const void**>(p);
  // from pageable memory: returns once table_ is staged, so table_ may change afterwards
  CUDA_CHECK(cudaMemcpyAsync(p, table_.data(), table_.size() * sizeof(void*), cudaMemcpyHostToDevice, nullptr));
}

void GroupedGemms::run(int i, Matmul math) {
  const Product& pr = products_.at(static_cast<size_t>(i));
  const int groups = static_cast<int>(pr.m.size());
  if (groups == 0) return;
  require(dev_ != nullptr, "GroupedGemms::run before upload()");
  const std::vector<cublasOperation_t> ta(groups, to_cublas(pr.opB)), tb(groups, to_cublas(pr.opA));
  const std::vector<float> alphas(groups, pr.alpha), betas(groups, pr.beta);
  const std::vector<int> sizes(groups, 1);
  const void* const* a = dev_ + pr.first;
  CUBLAS_CHECK(cublasGemmGroupedBatchedEx(blas_handle(), ta.data(), tb.data(), pr.m.data(), pr.n.data(),
                                          pr.k.data(), alphas.data(), a, CUDA_R_32F, pr.lda.data(), a + groups,
                                          CUDA_R_32F, pr.ldb.data(), betas.data(),
                                          const_cast<void* const*>(a + 2 * groups), CUDA_R_32F, pr.ldc.data(),
                                          groups, sizes.data(), grouped_compute_type(math)));
}

}  // namespace cuda
}  // namespace dsv3
