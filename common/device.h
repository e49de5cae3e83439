// Is there a usable CUDA device? Compiles in every build; without CUDA the answer is always no.
#pragma once

#include <cstdint>
#include <string>

namespace dsv3 {

// True when the project was built with CUDA.
bool cuda_built();
// True when built with CUDA and a device can be used right now.
bool gpu_available();
// How many CUDA devices this process sees (0 without CUDA or a driver).
int gpu_count();
// Makes device `index` the calling thread's (cudaSetDevice); std::runtime_error when it cannot.
void use_gpu(int index);
// Why gpu_available() is false ("built without CUDA", "no CUDA device: ..."), or the device's name.
std::string gpu_description();
// Memory a new allocation can use on this machine: MemAvailable of /proc/meminfo, capped by the address-space
// limit (ulimit -v) when one is set; 0 when unknown.
uint64_t available_host_bytes();

}  // namespace dsv3
