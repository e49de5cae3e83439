// Is there a usable CUDA device? Compiles in every build; without CUDA the answer is always no.
#pragma once

#include <string>

namespace dsv3 {

// True when the project was built with CUDA.
bool cuda_built();
// True when built with CUDA and a device can be used right now.
bool gpu_available();
// Why gpu_available() is false ("built without CUDA", "no CUDA device: ..."), or the device's name.
std::string gpu_description();

}  // namespace dsv3
