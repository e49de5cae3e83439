// The cuBLAS handle behind the stage entry points. Entry points keep the CPU signatures (no handle
// argument), so each host thread lazily creates one handle and keeps it: a resource cache, not state
// that changes any result.
#include "common/cuda_utils.h"

namespace dsv3::cuda {

cublasHandle_t blas_handle() {
  thread_local CublasHandle handle;
  // cuBLAS was not built with the per-thread default stream (CMakeLists.txt): name it, or its kernels would go to
  // the legacy stream 0 that a CUDA graph cannot capture
  thread_local const bool on_thread_stream = [] {
    CUBLAS_CHECK(cublasSetStream(handle.get(), cudaStreamPerThread));
    return true;
  }();
  (void)on_thread_stream;
  return handle.get();
}

}  // namespace dsv3::cuda
