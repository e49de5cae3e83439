// One list of parameters per layer, and everything that follows from it.
//
// A layer's tensors are the named members of ONE struct template over the storage of a tensor, X:
//
//   MlaTensors<std::vector<T>>        MlaParams<T>       the host owner (values, or gradient buffers)
//   MlaTensors<DeviceBuffer<float>>   MlaDeviceParams    the device owner (mla_device.h)
//   MlaTensors<const T*>              MlaWeights<T>      what a kernel reads
//   MlaTensors<T*>                    MlaGrads<T>        what a backward accumulates into (+=)
//
// and ONE function lists them, next to the struct:
//
//   for_each_param(const MlaConfig& c, f, s...)   calls f(info, s.member...) for every member, in order,
//                                                  for any number of such structs s walked in lockstep,
//
// with the member's ParamInfo under c: its model.py name, its Hugging Face checkpoint name, its shape and its
// kind (a matrix, a norm weight, or the router's selection bias, which has no gradient). A layer made of
// layers (the block, the MTP module) lists its own tensors and calls its parts' lists with a name prefix.
//
// Everything else is written once, in this file, over that list: zero and random initialisation, the views a
// kernel takes (weights(), grads()), the (name, tensor) list that tests, checkpoints and optimizers walk, and
// (cuda_utils.h's twins) upload to and download from the device. A member added to the struct but not to the
// list, or listed in another order in one place than in another, cannot happen: there is no second list.
//
// Views need no shapes, only the order of the members: they walk the list under a default-constructed config.
#pragma once

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/rng.h"

namespace dsv3 {

// Matrix: a weight matrix, N(0, 1/fan_in) at initialisation, decayed by AdamW.
// Embedding: the token embedding, N(0, 1), decayed.
// Norm: an RMSNorm weight, 1 at initialisation, never decayed.
// Bias: the router's selection bias (stage 04), 0 at initialisation, no gradient, moved by the bias update.
enum class ParamKind { Matrix, Embedding, Norm, Bias };
// Does AdamW's (decoupled) weight decay apply to a tensor of this kind? Matrices and the embedding, not norms.
inline bool decays(ParamKind kind) { return kind == ParamKind::Matrix || kind == ParamKind::Embedding; }

struct ParamInfo {
  std::string name;   // model.py name, prefixed by the enclosing layers ("attn.wq_a", "block.ffn.experts.w1")
  std::string hf;     // Hugging Face name under the layer's prefix ("self_attn.q_a_proj.weight"); "{e}" stands
                      // for the expert index of a tensor stacked over experts (split in the checkpoint)
  std::vector<int64_t> shape;  // PyTorch Linear layout (out, in); a zero dimension: unused under this config
  ParamKind kind = ParamKind::Matrix;
  std::string part;   // the name prefix of the layer that owns it ("" for the outermost): its random stream

  int64_t numel() const {
    int64_t n = shape.empty() ? 0 : 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  bool used() const { return numel() > 0; }
  int64_t fan_in() const { return shape.empty() ? 1 : std::max<int64_t>(shape.back(), 1); }
  bool has_grad() const { return kind != ParamKind::Bias; }
  bool decays() const { return dsv3::decays(kind); }
};

// f, called with the ParamInfo of a part's members renamed into the enclosing layer: "attn." + name, and
// hf_prefix + hf. The part's own random stream is named by the prefix.
template <typename F>
auto prefixed(const std::string& name_prefix, const std::string& hf_prefix, F& f) {
  return [&f, name_prefix, hf_prefix](const ParamInfo& in, auto&&... members) {
    ParamInfo out = in;
    out.name = name_prefix + in.name;
    out.hf = hf_prefix + in.hf;
    out.part = name_prefix + in.part;
    f(out, std::forward<decltype(members)>(members)...);
  };
}

// The data pointer of a host tensor; null when it is empty (a member unused by the config).
template <typename T>
T* tensor_data(std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}
template <typename T>
const T* tensor_data(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}
// The scalar type of a storage (std::vector<T> or DeviceBuffer<T>: T).
template <typename X>
using tensor_elem_t = std::remove_const_t<std::remove_pointer_t<decltype(tensor_data(std::declval<X&>()))>>;

namespace param_list {

// The views of an owner (host vectors or device buffers) that kernels take.
template <template <class> class Tensors, typename X>
Tensors<const tensor_elem_t<X>*> weights(const Tensors<X>& p) {
  Tensors<const tensor_elem_t<X>*> w{};
  for_each_param(typename Tensors<X>::Config{}, [](const ParamInfo&, auto& dst, const auto& src) {
    dst = tensor_data(src);
  }, w, p);
  return w;
}
template <template <class> class Tensors, typename X>
Tensors<tensor_elem_t<X>*> grads(Tensors<X>& p) {
  Tensors<tensor_elem_t<X>*> g{};
  for_each_param(typename Tensors<X>::Config{}, [](const ParamInfo& i, auto& dst, auto& src) {
    dst = i.has_grad() ? tensor_data(src) : nullptr;
  }, g, p);
  return g;
}

// (name, tensor) of every used member that has a gradient, in list order.
template <template <class> class Tensors, typename T>
std::vector<std::pair<std::string, std::vector<T>*>> named(Tensors<std::vector<T>>& p) {
  std::vector<std::pair<std::string, std::vector<T>*>> out;
  for_each_param(typename Tensors<std::vector<T>>::Config{}, [&out](const ParamInfo& i, std::vector<T>& v) {
    if (i.has_grad() && !v.empty()) out.emplace_back(i.name, &v);
  }, p);
  return out;
}

// Every member sized for config c and zero-filled (gradient buffers; the bias too).
template <template <class> class Tensors, typename T>
void zero(Tensors<std::vector<T>>& p, const typename Tensors<std::vector<T>>::Config& c) {
  c.validate();
  for_each_param(c, [](const ParamInfo& i, std::vector<T>& v) { v.assign(size_t(i.numel()), T(0)); }, p);
}

// Random initial values: matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1 (or 1 + 0.2 N(0, 1) with
// jitter_norms: tests, so that a gradient that ignored a norm weight cannot pass by accident), biases 0.
// Random streams: the outermost layer draws from Rng(seed), in list order; each part (a nested layer) draws
// from its own Rng, seeded by its parent's stream when its first used member comes up.
template <template <class> class Tensors, typename T>
void init(Tensors<std::vector<T>>& p, const typename Tensors<std::vector<T>>::Config& c, uint64_t seed,
          bool jitter_norms) {
  zero(p, c);
  std::map<std::string, Rng> streams;
  streams.emplace("", Rng(seed));
  // The stream of part "block.attn." is seeded from the stream of "block.", that of "attn." from "".
  std::function<Rng&(const std::string&)> stream = [&](const std::string& part) -> Rng& {
    const auto it = streams.find(part);
    if (it != streams.end()) return it->second;
    const std::string up = part.substr(0, part.size() - 1);
    const size_t dot = up.rfind('.');
    const uint64_t part_seed = stream(dot == std::string::npos ? "" : up.substr(0, dot + 1)).next_u64();
    return streams.emplace(part, Rng(part_seed)).first->second;
  };
  for_each_param(c, [&](const ParamInfo& i, std::vector<T>& v) {
    if (v.empty() || i.kind == ParamKind::Bias) return;
    if (i.kind == ParamKind::Norm && !jitter_norms) {
      std::fill(v.begin(), v.end(), T(1));
      return;
    }
    Rng& rng = stream(i.part);
    for (auto& x : v)
      x = static_cast<T>(i.kind == ParamKind::Matrix      ? rng.normal() / std::sqrt(double(i.fan_in()))
                         : i.kind == ParamKind::Embedding ? rng.normal()
                                                          : 1 + 0.2 * rng.normal());
  }, p);
}

// A host owner of config c's shapes, zero-filled, or with init()'s random values.
template <template <class> class Tensors, typename T>
Tensors<std::vector<T>> zeroed(const typename Tensors<std::vector<T>>::Config& c) {
  Tensors<std::vector<T>> p;
  zero(p, c);
  return p;
}
template <template <class> class Tensors, typename T>
Tensors<std::vector<T>> initialised(const typename Tensors<std::vector<T>>::Config& c, uint64_t seed,
                                    bool jitter_norms) {
  Tensors<std::vector<T>> p;
  init(p, c, seed, jitter_norms);
  return p;
}

}  // namespace param_list
}  // namespace dsv3
