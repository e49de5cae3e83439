// Fuzz target: the model config parser (06_full_model/model_config.h, config_from_json_text).
// Input: config.json text. A config that parses must count its parameters and survive a round trip through
// config_to_json_text unchanged.
#include <cstdint>
#include <string>

#include "06_full_model/model_config.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const dsv3::ModelConfig c = dsv3::config_from_json_text(text);
    const dsv3::ParamBreakdown b = dsv3::count_params(c);
    for (const auto& row : b.rows)
      if (row.total < 0 || row.active < 0 || row.active > row.total)
        dsv3::fuzz::fail("count_params: row '" + row.component + "' total/active out of order");
    const std::string once = dsv3::config_to_json_text(c);
    const std::string twice = dsv3::config_to_json_text(dsv3::config_from_json_text(once));
    if (once != twice) dsv3::fuzz::fail("config_to_json_text round trip differs:\n" + once + "\n" + twice);
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
