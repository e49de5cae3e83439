// Fuzz target: a prepared data folder of stage 07 (07_train_gpu/data.h, load_prepared): data.json, the two token
// files it names (read_tokens: size against data.json's count, every id below vocab_size) and the check of both
// against the tokenizer (songs and bytes per split).
// Input: data.json <separator> train.bin <separator> val.bin (fuzz_support.h, kSeparator). The files are written
// under those names next to a fixed tokenizer.model (fuzz_data_fixture.h); data.json may name other files (then
// they are missing, or are one of these).
#include <cstdint>
#include <filesystem>
#include <string>

#include "07_train_gpu/data.h"
#include "fuzz/fuzz_data_fixture.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::filesystem::copy_file(dsv3::fuzz::data_fixture_dir() + "/tokenizer.model",
                             dsv3::fuzz::scratch().path() + "/tokenizer.model",
                             std::filesystem::copy_options::overwrite_existing);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = dsv3::fuzz::scratch().path();
  const auto parts = dsv3::fuzz::split_parts(data, size, 3);
  dsv3::fuzz::write_bytes(dir + "/data.json", parts[0]);
  dsv3::fuzz::write_bytes(dir + "/train.bin", parts[1]);
  dsv3::fuzz::write_bytes(dir + "/val.bin", parts[2]);
  try {
    const dsv3::data::Prepared p = dsv3::data::load_prepared(dir);
    if (int64_t(p.train.size()) != p.info.train.tokens || int64_t(p.val.size()) != p.info.val.tokens)
      dsv3::fuzz::fail("load_prepared returned token counts that differ from data.json");
    for (const uint16_t t : p.train)
      if (t >= p.info.vocab_size) dsv3::fuzz::fail("load_prepared returned a token id >= vocab_size");
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
