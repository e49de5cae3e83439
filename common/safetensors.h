// safetensors files (the format Hugging Face checkpoints use): read with full validation, write atomically.
//
// Layout: 8 bytes little-endian header length n | n bytes of JSON header | data buffer.
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
// the data buffer), plus an optional "__metadata__" object of string values.
// Loading validates everything before any tensor byte is used: header length within the file, JSON well
// formed, known dtypes, shape x element size == byte length, offsets inside the data buffer, no overlaps and
// no holes (the format requires the buffer to be fully indexed). A bad file is a UserError naming the problem.
// Writes go through common/files.h (atomic: temporary file, fsync, rename).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/files.h"

namespace dsv3 {

enum class DType { F32, BF16, F16, F64, I32, I64, U8 };

const char* dtype_name(DType d);  // "F32", "BF16", ...
size_t dtype_size(DType d);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range within the data buffer
  int64_t numel() const;
};

// float <-> bfloat16 (round to nearest even; NaN stays NaN).
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t b);

class SafetensorsWriter {
 public:
  // Copies the bytes. Rejects a duplicate name or a byte count that does not match dtype x shape.
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data, size_t bytes);
  // Convenience: fp32 values stored as F32 or converted to BF16.
  void add_f32(const std::string& name, const std::vector<int64_t>& shape, const float* data, DType stored = DType::F32);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Writes path atomically: a temporary file in the same folder, fsync, rename over path, fsync the folder.
  // On any failure the previous file at path is untouched.
  void write(const std::string& path) const;

 private:
  struct Entry {
    TensorInfo info;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsFile {
 public:
  // Reads and validates the whole file; UserError (naming the file and the problem) if anything is wrong.
  explicit SafetensorsFile(const std::string& path);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // UserError if missing
  // The tensor as fp32 (F32 copied, BF16/F16 converted). UserError if missing, of another dtype, or if
  // expected_shape is given and differs.
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& expected_shape = {}) const;
  const uint8_t* raw(const std::string& name) const;

 private:
  std::string path_;
  std::vector<uint8_t> data_;  // the data buffer
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dsv3
