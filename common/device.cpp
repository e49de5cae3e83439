#include "common/device.h"

#ifdef DSV3_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <fstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
bool cuda_built() { return true; }

static cudaError_t probe(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

bool gpu_available() {
  int n = 0;
  const cudaError_t e = probe(&n);
  if (e != cudaSuccess) cudaGetLastError();  // clear the sticky "no device" error
  return e == cudaSuccess && n > 0;
}

int gpu_count() {
  int n = 0;
  const cudaError_t e = probe(&n);
  if (e != cudaSuccess) cudaGetLastError();
  return e == cudaSuccess ? n : 0;
}

void use_gpu(int index) {
  const cudaError_t e = cudaSetDevice(index);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(fmt::format("cannot use GPU {}: {}", index, cudaGetErrorString(e)));
  }
}

std::string gpu_description() {
  int n = 0;
  const cudaError_t e = probe(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // Without an NVIDIA driver the runtime reports "driver version is insufficient", which reads as "update your
    // driver": the kernel module's file tells the two cases apart.
    const bool driver = std::ifstream("/proc/driver/nvidia/version").good();
    if (!driver && (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)) return "no NVIDIA GPU or driver found";
    if (e == cudaErrorNoDevice) return "no NVIDIA GPU found";
    return fmt::format("no usable NVIDIA GPU ({})", cudaGetErrorString(e));
  }
  if (n == 0) return "no NVIDIA GPU found";
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, dev);
  return fmt::format("{} (sm_{}{}, {:.0f} GiB)", p.name, p.major, p.minor,
                     static_cast<double>(p.totalGlobalMem) / (1 << 30));
}
#else
bool cuda_built() { return false; }
bool gpu_available() { return false; }
int gpu_count() { return 0; }
void use_gpu(int index) { throw std::runtime_error(fmt::format("cannot use GPU {}: built without CUDA", index)); }
std::string gpu_description() { return "no GPU support (built without CUDA)"; }
#endif

uint64_t available_host_bytes() {
  uint64_t bytes = 0;
  std::ifstream f("/proc/meminfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("MemAvailable:", 0) == 0) {
      bytes = std::stoull(line.substr(13)) * 1024;  // "MemAvailable:   123456 kB"
      break;
    }
  rlimit lim{};
  if (getrlimit(RLIMIT_AS, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY)
    bytes = bytes == 0 ? uint64_t(lim.rlim_cur) : std::min<uint64_t>(bytes, lim.rlim_cur);
  return bytes;
}

}  // namespace dsv3
