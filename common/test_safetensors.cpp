// safetensors: round trips, bf16 rounding, and every kind of tampered file rejected with a clear error.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/errors.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

// A file in a folder of its own per test (ctest runs tests in parallel).
std::string temp_path(const std::string& name) {
  const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
  const auto dir = std::filesystem::temp_directory_path() / "dsv3_test_safetensors" / test->name();
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
}

// A file made of a hand-written header and `data_bytes` bytes of data.
std::string handmade(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\x01');
}

// Expects loading `bytes` to throw a UserError whose message contains `fragment`.
void expect_rejected(const std::string& bytes, const std::string& fragment) {
  const std::string path = temp_path("bad.safetensors");
  spit(path, bytes);
  try {
    SafetensorsFile f(path);
    ADD_FAILURE() << "accepted a bad file; expected an error containing '" << fragment << "'";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Safetensors, RoundTripF32AndBf16WithMetadata) {
  Rng rng(1);
  const auto a = rng.normal_vec<float>(3 * 5), b = rng.normal_vec<float>(7);
  SafetensorsWriter w;
  w.add_f32("model.layers.0.self_attn.wq_a.weight", {3, 5}, a.data());
  w.add_f32("lm_head.weight", {7}, b.data(), DType::BF16);
  w.set_metadata("format", "pt");
  const std::string path = temp_path("rt.safetensors");
  w.write(path);
  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.read_f32("model.layers.0.self_attn.wq_a.weight", {3, 5}), a);
  const auto bb = f.read_f32("lm_head.weight");
  for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(bb[i], b[i], std::abs(b[i]) * (1.0 / 256));  // 8 mantissa bits
  EXPECT_EQ(f.info("lm_head.weight").dtype, DType::BF16);
  EXPECT_THROW(f.read_f32("missing"), UserError);
  EXPECT_THROW(f.read_f32("lm_head.weight", {8}), UserError);  // wrong expected shape
}

TEST(Safetensors, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // halfway, odd below: up
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

TEST(Safetensors, RejectsTamperedFiles) {
  const std::string good = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_rejected("abc", "shorter than the 8-byte header length");
  expect_rejected(handmade(good, 4), "lie outside the data");                          // truncated data
  expect_rejected(handmade(good, 12), "not indexed");                                  // trailing bytes
  expect_rejected(handmade(good, 8).substr(0, 20), "runs past the end");               // header length past the end
  expect_rejected(handmade(R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype");
  expect_rejected(handmade(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes");
  expect_rejected(handmade(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                  "overlaps");
  expect_rejected(handmade(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "hole");
  expect_rejected(handmade(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "outside the data");
  expect_rejected(handmade(R"({"a": [1, 2)", 8), "not valid JSON");
  expect_rejected(handmade(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "bad dimension");
  expect_rejected(handmade(R"({"a":{"dtype":"F32"}})", 0), "needs dtype, shape and data_offsets");
}

TEST(Safetensors, WriterRejectsBadTensors) {
  SafetensorsWriter w;
  const float x[4] = {1, 2, 3, 4};
  EXPECT_THROW(w.add("a", DType::F32, {3}, x, sizeof(x)), UserError);  // 3 elements, 16 bytes
  w.add("a", DType::F32, {4}, x, sizeof(x));
  EXPECT_THROW(w.add("a", DType::F32, {4}, x, sizeof(x)), UserError);  // duplicate
}

TEST(Safetensors, FailedWriteLeavesThePreviousFileIntact) {
  const std::string path = temp_path("keep.safetensors");
  const float x[2] = {1, 2};
  SafetensorsWriter w;
  w.add("a", DType::F32, {2}, x, sizeof(x));
  w.write(path);
  const std::string before = slurp(path);
  // Writing into a folder that does not exist fails before anything touches `path`'s folder.
  EXPECT_THROW(w.write(temp_path("no-such-dir/x.safetensors")), UserError);
  EXPECT_THROW(write_file_atomic("/proc/version", "x"), UserError);  // cannot create the temporary file
  EXPECT_EQ(slurp(path), before);
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << "temporary file left behind";
}
