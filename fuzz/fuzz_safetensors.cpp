// Fuzz target: the safetensors reader (common/safetensors.h, SafetensorsFile).
// Input: the bytes of a .safetensors file. A file that loads must then read every tensor (read_f32 for the
// floating-point dtypes, raw for all) and survive a round trip through SafetensorsWriter unchanged.
#include <cstdint>
#include <cstring>

#include "common/safetensors.h"
#include "fuzz/fuzz_support.h"

namespace {

void check_round_trip(const dsv3::SafetensorsFile& f, const std::string& copy_path) {
  dsv3::SafetensorsWriter w;
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  for (const auto& t : f.tensors()) w.add(t.name, t.dtype, t.shape, f.raw(t.name), t.end - t.begin);
  w.write(copy_path);
  const dsv3::SafetensorsFile g(copy_path);
  if (g.tensors().size() != f.tensors().size() || g.metadata() != f.metadata()) dsv3::fuzz::fail("round trip: count");
  for (const auto& t : f.tensors()) {
    const dsv3::TensorInfo& u = g.info(t.name);
    if (u.dtype != t.dtype || u.shape != t.shape || u.end - u.begin != t.end - t.begin ||
        std::memcmp(g.raw(t.name), f.raw(t.name), t.end - t.begin) != 0)
      dsv3::fuzz::fail("round trip changed tensor '" + t.name + "'");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = dsv3::fuzz::scratch().path();
  const std::string path = dir + "/model.safetensors";
  dsv3::fuzz::write_bytes(path, data, size);
  try {
    const dsv3::SafetensorsFile f(path);
    for (const auto& t : f.tensors()) {
      (void)f.raw(t.name);
      if (t.dtype == dsv3::DType::F32 || t.dtype == dsv3::DType::BF16 || t.dtype == dsv3::DType::F16) {
        const std::vector<float> v = f.read_f32(t.name, t.shape);
        if (int64_t(v.size()) != t.numel()) dsv3::fuzz::fail("read_f32 size differs from numel");
      }
    }
    check_round_trip(f, dir + "/copy.safetensors");
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
