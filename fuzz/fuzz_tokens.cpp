// Fuzz target: the token-file reader of stage 07 (07_train_gpu/data.h, read_tokens), with the count and the
// vocabulary size a data.json would give.
// Input: 8 bytes expected_tokens (int64, little-endian) | 4 bytes vocab_size (int32, little-endian) | the file.
#include <cstdint>
#include <string>

#include "07_train_gpu/data.h"
#include "fuzz/fuzz_support.h"

namespace {
template <typename T>
T read_le(const uint8_t* p) {
  uint64_t u = 0;
  for (size_t i = 0; i < sizeof(T); ++i) u |= uint64_t(p[i]) << (8 * i);
  return T(u);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 12) return 0;
  const int64_t expected = read_le<int64_t>(data);
  const int32_t vocab = read_le<int32_t>(data + 8);
  const std::string path = dsv3::fuzz::scratch().path() + "/train.bin";
  dsv3::fuzz::write_bytes(path, data + 12, size - 12);
  try {
    const std::vector<uint16_t> t = dsv3::data::read_tokens(path, expected, vocab);
    if (int64_t(t.size()) != expected) dsv3::fuzz::fail("read_tokens returned a count other than expected");
    for (const uint16_t id : t)
      if (id >= vocab) dsv3::fuzz::fail("read_tokens returned an id >= vocab_size");
  } catch (const dsv3::UserError&) {
  }
  return 0;
}
