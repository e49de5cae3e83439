// The device side of common/param_list.h: a layer's tensors in DeviceBuffers, uploaded from (and downloaded
// into) their host twins by walking the layer's one list. Needs CUDA: include only when DSV3_HAVE_CUDA.
#pragma once

#include <vector>

#include "common/cuda_utils.h"
#include "common/param_list.h"

namespace dsv3 {

// The data pointer of a device tensor; null when it is empty (a member unused by the config).
template <typename T>
T* tensor_data(DeviceBuffer<T>& b) {
  return b.size() ? b.get() : nullptr;
}
template <typename T>
const T* tensor_data(const DeviceBuffer<T>& b) {
  return b.size() ? b.get() : nullptr;
}

namespace param_list {

// Every member of a host owner copied into a DeviceBuffer of the same size.
template <template <class> class Tensors, typename T>
Tensors<DeviceBuffer<T>> upload(const Tensors<std::vector<T>>& host) {
  Tensors<DeviceBuffer<T>> dev;
  for_each_param(typename Tensors<std::vector<T>>::Config{}, [](const ParamInfo&, DeviceBuffer<T>& d,
                                                                const std::vector<T>& h) { d = DeviceBuffer<T>(h); },
                 dev, host);
  return dev;
}
// Every member of a device owner copied back into the host owner (values, or gradients to compare).
template <template <class> class Tensors, typename T>
void download(const Tensors<DeviceBuffer<T>>& dev, Tensors<std::vector<T>>& host) {
  for_each_param(typename Tensors<std::vector<T>>::Config{}, [](const ParamInfo&, const DeviceBuffer<T>& d,
                                                                std::vector<T>& h) { h = d.download(); },
                 dev, host);
}
// Every member of the host owner copied into the existing device buffers (sizes must match).
template <template <class> class Tensors, typename T>
void upload_into(Tensors<DeviceBuffer<T>>& dev, const Tensors<std::vector<T>>& host) {
  for_each_param(typename Tensors<std::vector<T>>::Config{}, [](const ParamInfo&, DeviceBuffer<T>& d,
                                                                const std::vector<T>& h) { d.upload(h); },
                 dev, host);
}

}  // namespace param_list
}  // namespace dsv3
