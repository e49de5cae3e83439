// Fuzz target: the trainer_state.json reader of a stage-07 run checkpoint (07_train_gpu/run_checkpoint.h,
// read_trainer_state on a folder).
// Input: trainer_state.json text.
#include <cstdint>
#include <string>

#include "07_train_gpu/run_checkpoint.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = dsv3::fuzz::scratch().path() + "/last";
    std::filesystem::create_directories(d);
    return d;
  }();
  dsv3::fuzz::write_bytes(dir + "/trainer_state.json", data, size);
  try {
    const dsv3::TrainerState s = dsv3::read_trainer_state(dir);
    if (s.step < 0 || s.updates < 0 || s.updates > s.step) dsv3::fuzz::fail("read_trainer_state accepted bad counters");
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
