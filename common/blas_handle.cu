// The cuBLAS handle behind the stage entry points. Entry points keep the CPU signatures (no handle
// argument), so each host thread lazily creates one handle and keeps it: a resource cache, not state
// that changes any result.
#include "common/cuda_utils.h"

namespace dsv3::cuda {

cublasHandle_t blas_handle() {
  thread_local CublasHandle handle;
  return handle.get();
}

}  // namespace dsv3::cuda
