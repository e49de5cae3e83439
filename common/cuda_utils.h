// CUDA plumbing: error macros and RAII owners for device memory, streams, events and cuBLAS handles.
// Included only by CUDA-enabled code (.cu files, and test/demo code inside #ifdef DSV3_HAVE_CUDA).
#pragma once

#ifndef DSV3_HAVE_CUDA
#error "common/cuda_utils.h needs a CUDA build (DSV3_HAVE_CUDA)"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/errors.h"

namespace dsv3::detail {
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* stmt, const char* file, int line) {
  throw CudaError(fmt::format("CUDA error '{}' ({}) in `{}` at {}:{}", cudaGetErrorString(e),
                              static_cast<int>(e), stmt, file, line));
}
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* stmt, const char* file, int line) {
  throw CudaError(fmt::format("cuBLAS error '{}' ({}) in `{}` at {}:{}", cublasGetStatusString(s),
                              static_cast<int>(s), stmt, file, line));
}
// An allocation the GPU cannot hold is the user's size choice (model, batch, sequence), not a bug: a UserError
// (exit code 2) saying how much was asked and how much is free.
inline void check_alloc(cudaError_t e, size_t bytes, const char* file, int line) {
  if (e == cudaSuccess) return;
  if (e != cudaErrorMemoryAllocation) throw_cuda(e, "cudaMalloc", file, line);
  (void)cudaGetLastError();  // clear the sticky-free error so later calls work
  size_t free = 0, total = 0;
  (void)cudaMemGetInfo(&free, &total);
  throw UserError(fmt::format("the GPU is out of memory: {:.3f} GiB more were needed, {:.3f} GiB of {:.3f} GiB are "
                              "free: reduce --batch or --seq-len, or use a smaller model",
                              double(bytes) / (1 << 30), double(free) / (1 << 30), double(total) / (1 << 30)));
}
}  // namespace dsv3::detail

#define CUDA_CHECK(stmt)                                                              \
  do {                                                                                \
    const cudaError_t dsv3_e_ = (stmt);                                               \
    if (dsv3_e_ != cudaSuccess) ::dsv3::detail::throw_cuda(dsv3_e_, #stmt, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(stmt)                                                              \
  do {                                                                                  \
    const cublasStatus_t dsv3_s_ = (stmt);                                              \
    if (dsv3_s_ != CUBLAS_STATUS_SUCCESS)                                               \
      ::dsv3::detail::throw_cublas(dsv3_s_, #stmt, __FILE__, __LINE__);                 \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define CUDA_CHECK_LAST() CUDA_CHECK(cudaGetLastError())

namespace dsv3 {

// Owns n elements of device memory. Move-only.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n_) detail::check_alloc(cudaMalloc(&p_, n_ * sizeof(T)), n_ * sizeof(T), __FILE__, __LINE__);
  }
  // Allocate and upload.
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  T* get() { return p_; }
  const T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  void upload(const std::vector<T>& host) {
    if (host.size() != n_)
      throw CudaError(fmt::format("upload of {} elements into a buffer of {}", host.size(), n_));
    if (n_) CUDA_CHECK(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) CUDA_CHECK(cudaMemcpy(host.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  void zero() {
    if (n_) CUDA_CHECK(cudaMemset(p_, 0, bytes()));
  }
  // Fill with a byte pattern (0xFF gives NaN for floats): tests poison outputs to catch unwritten ones.
  void poison() {
    if (n_) CUDA_CHECK(cudaMemset(p_, 0xFF, bytes()));
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// The calling thread's device (stage 07 runs one process per GPU: not always device 0).
inline int current_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// Stream-ordered scratch memory on the default stream (cudaMallocAsync): freeing it does not synchronise
// the device, so kernels can use temporary workspace without stalling the host. By default the pool hands its
// free memory back to the system at every synchronisation, and the next allocation maps it again (tens of us for
// tens of MB, on the stream's timeline); keep_freed_scratch() makes the pool keep it, as a trainer or a benchmark
// that allocates the same scratch every step wants.
inline void keep_freed_scratch() {
  cudaMemPool_t pool;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, current_device()));
  uint64_t keep = ~uint64_t{0};
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
}
template <typename T>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(size_t n) : n_(n) {
    if (n_)
      detail::check_alloc(cudaMallocAsync(reinterpret_cast<void**>(&p_), n_ * sizeof(T), nullptr), n_ * sizeof(T),
                          __FILE__, __LINE__);
  }
  ~ScratchBuffer() {
    if (p_) cudaFreeAsync(p_, nullptr);
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  T* get() { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_{};
};

// Times device work between start() and stop() with CUDA events.
class EventTimer {
 public:
  EventTimer() {
    CUDA_CHECK(cudaEventCreate(&a_));
    CUDA_CHECK(cudaEventCreate(&b_));
  }
  ~EventTimer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(cudaStream_t s = nullptr) { CUDA_CHECK(cudaEventRecord(a_, s)); }
  void stop(cudaStream_t s = nullptr) { CUDA_CHECK(cudaEventRecord(b_, s)); }
  // Milliseconds between start and stop; waits for stop.
  float elapsed_ms() {
    CUDA_CHECK(cudaEventSynchronize(b_));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return ms;
  }

 private:
  cudaEvent_t a_{}, b_{};
};

class CublasHandle {
 public:
  CublasHandle() { CUBLAS_CHECK(cublasCreate(&h_)); }
  ~CublasHandle() { cublasDestroy(h_); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_{};
};

namespace cuda {
// The cuBLAS handle used by the entry points of every stage (one per host thread; blas_handle.cu).
cublasHandle_t blas_handle();
}  // namespace cuda

inline void device_sync() { CUDA_CHECK(cudaDeviceSynchronize()); }

// Median milliseconds of fn() on the device (events around each call) after warm-up.
template <typename Fn>
double median_device_ms(Fn&& fn, int warmup = 3, int reps = 20) {
  for (int i = 0; i < warmup; ++i) fn();
  device_sync();
  EventTimer t;
  std::vector<double> v;
  for (int i = 0; i < reps; ++i) {
    t.start();
    fn();
    t.stop();
    v.push_back(t.elapsed_ms());
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace dsv3
