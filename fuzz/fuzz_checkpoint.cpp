// Fuzz target: a stage-06 checkpoint folder (06_full_model/checkpoint.h, load_checkpoint): config.json and
// model.safetensors read and checked against each other.
// Input: config.json <separator> model.safetensors (fuzz_support.h, kSeparator).
#include <cstdint>
#include <string>

#include "06_full_model/checkpoint.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = dsv3::fuzz::scratch().path();
  const auto parts = dsv3::fuzz::split_parts(data, size, 2);
  dsv3::fuzz::write_bytes(dir + "/config.json", parts[0]);
  dsv3::fuzz::write_bytes(dir + "/model.safetensors", parts[1]);
  try {
    const dsv3::Checkpoint ck = dsv3::load_checkpoint(dir);
    for (const auto& sp : dsv3::checkpoint_specs(ck.config))
      if (sp.mirror_of.empty() && (!ck.tensors.count(sp.name) || int64_t(ck.tensors.at(sp.name).size()) != sp.numel()))
        dsv3::fuzz::fail("load_checkpoint returned without tensor '" + sp.name + "' at its size");
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
