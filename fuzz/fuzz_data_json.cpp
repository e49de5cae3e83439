// Fuzz target: the data.json reader of stage 07's prepared data (07_train_gpu/data.h, info_from_json), in memory.
// Input: data.json text. A description that parses must survive a round trip through info_to_json unchanged.
#include <cstdint>
#include <string>

#include "07_train_gpu/data.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const dsv3::data::DataInfo info = dsv3::data::info_from_json(text, "data.json");
    const std::string once = dsv3::data::info_to_json(info);
    const std::string twice = dsv3::data::info_to_json(dsv3::data::info_from_json(once, "round trip"));
    if (once != twice) dsv3::fuzz::fail("info_to_json round trip differs:\n" + once + "\n" + twice);
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
