#include "common/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "common/checked.h"
#include "common/errors.h"

namespace dsv3 {

namespace {

struct DTypeRow {
  DType d;
  const char* name;
  size_t size;
};
constexpr DTypeRow kDTypes[] = {{DType::F32, "F32", 4}, {DType::BF16, "BF16", 2}, {DType::F16, "F16", 2},
                                {DType::F64, "F64", 8}, {DType::I32, "I32", 4},   {DType::I64, "I64", 8},
                                {DType::U8, "U8", 1}};

bool parse_dtype(const std::string& s, DType* out) {
  for (const auto& r : kDTypes)
    if (s == r.name) {
      *out = r.d;
      return true;
    }
  return false;
}

// A JSON value for an error message: scalars as written, containers by type only (dumping a hostile header's
// nesting would recurse as deep as the file is long).
std::string describe(const nlohmann::json& v) {
  if (v.is_structured()) return std::string("a JSON ") + v.type_name();
  return v.dump();
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0)
    v = std::ldexp(float(mant), -24);
  else if (exp == 31)
    v = mant ? NAN : INFINITY;
  else
    v = std::ldexp(float(mant | 0x400), int(exp) - 25);
  return sign ? -v : v;
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& r : kDTypes)
    if (r.d == d) return r.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& r : kDTypes)
    if (r.d == d) return r.size;
  return 0;
}

namespace {

// Elements of a shape; UserError when a dimension is negative or the product overflows 64 bits (a header can ask
// for 2^61 rows).
int64_t shape_numel(const std::vector<int64_t>& shape, const std::string& what) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    require(s >= 0, "{}: negative dimension {}", what, s);
    n = checked_mul(n, s, what + ": number of elements");
  }
  return n;
}

// Bytes of numel elements of dtype d, or UserError when that overflows 64 bits.
uint64_t byte_size(int64_t numel, DType d, const std::string& what) {
  return static_cast<uint64_t>(checked_mul(numel, static_cast<int64_t>(dtype_size(d)), what + ": size in bytes"));
}

}  // namespace

int64_t TensorInfo::numel() const { return shape_numel(shape, "tensor '" + name + "'"); }

uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- files ------------------------------------------------------------------------------------------


// ---- writing ----------------------------------------------------------------------------------------

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data,
                            size_t bytes) {
  require(!name.empty() && name != "__metadata__", "invalid tensor name '{}'", name);
  for (const auto& e : entries_) require(e.info.name != name, "tensor '{}' added twice", name);
  TensorInfo info{name, dtype, shape, 0, 0};
  const int64_t n = info.numel();
  require(byte_size(n, dtype, "tensor '" + name + "'") == bytes, "tensor '{}': {} bytes for {} elements of {}", name,
          bytes, n, dtype_name(dtype));
  const auto* p = static_cast<const uint8_t*>(data);
  entries_.push_back({info, std::vector<uint8_t>(p, p + bytes)});
}

void SafetensorsWriter::add_f32(const std::string& name, const std::vector<int64_t>& shape, const float* data,
                                DType stored) {
  const int64_t n = shape_numel(shape, "tensor '" + name + "'");
  if (stored == DType::F32) return add(name, stored, shape, data, byte_size(n, DType::F32, "tensor '" + name + "'"));
  require(stored == DType::BF16, "tensor '{}': fp32 values can be stored as F32 or BF16, not {}", name,
          dtype_name(stored));
  std::vector<uint16_t> b(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) b[i] = float_to_bf16(data[i]);
  add(name, stored, shape, b.data(), b.size() * 2);
}

void SafetensorsWriter::write(const std::string& path) const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& e : entries_) {
    header[e.info.name] = {{"dtype", dtype_name(e.info.dtype)},
                           {"shape", e.info.shape},
                           {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // pad so the data buffer starts 8-byte aligned
  std::string out(8, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += h;
  out.reserve(out.size() + offset);
  for (const auto& e : entries_) out.append(reinterpret_cast<const char*>(e.bytes.data()), e.bytes.size());
  write_file_atomic(path, out);
}

// ---- reading ----------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  // Only a regular file has a size to check the header against: a folder, a FIFO or /dev/zero would hang or
  // ask for an absurd allocation.
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  require(!ec && std::filesystem::exists(status), "checkpoint file '{}' does not exist", path);
  require(std::filesystem::is_regular_file(status), "checkpoint file '{}' is not a regular file", path);
  std::ifstream f(path, std::ios::binary);
  require(f.good(), "cannot open checkpoint file '{}'", path);
  f.seekg(0, std::ios::end);
  const std::streamoff end = f.tellg();
  require(f.good() && end >= 0, "cannot read checkpoint file '{}' (cannot find its size)", path);
  const uint64_t size = static_cast<uint64_t>(end);
  f.seekg(0);
  require(size >= 8, "'{}' is not a safetensors file: {} bytes, shorter than the 8-byte header length", path, size);
  uint8_t len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(len_bytes[i]) << (8 * i);
  require(n <= size - 8, "'{}': header length {} runs past the end of the file ({} bytes)", path, n, size);
  std::string h(n, '\0');
  f.read(h.data(), static_cast<std::streamsize>(n));
  require(f.good(), "'{}': cannot read the header", path);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(h);
  } catch (const std::exception& e) {
    throw UserError(fmt::format("'{}': the header is not valid JSON ({})", path, e.what()));
  }
  require(header.is_object(), "'{}': the header is not a JSON object", path);
  const uint64_t data_size = size - 8 - n;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      require(v.is_object(), "'{}': __metadata__ must be an object", path);
      for (auto m = v.begin(); m != v.end(); ++m) {
        require(m.value().is_string(), "'{}': metadata '{}' must be a string", path, m.key());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    require(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
            "'{}': tensor '{}' needs dtype, shape and data_offsets", path, name);
    TensorInfo t;
    t.name = name;
    require(v.at("dtype").is_string() && parse_dtype(v.at("dtype").get<std::string>(), &t.dtype),
            "'{}': tensor '{}' has unknown dtype {}", path, name, describe(v.at("dtype")));
    require(v.at("shape").is_array(), "'{}': tensor '{}': shape must be an array", path, name);
    for (const auto& s : v.at("shape")) {
      // non-negative JSON integers parse as unsigned; one above 2^63 - 1 does not fit a dimension
      require(s.is_number_unsigned() && s.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max()),
              "'{}': tensor '{}' has a bad dimension {}", path, name, describe(s));
      t.shape.push_back(s.get<int64_t>());
    }
    const auto& off = v.at("data_offsets");
    require(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
            "'{}': tensor '{}': data_offsets must be two non-negative integers", path, name);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    require(t.begin <= t.end && t.end <= data_size, "'{}': tensor '{}' bytes [{}, {}) lie outside the data ({} bytes)",
            path, name, t.begin, t.end, data_size);
    // checked: a shape whose byte size overflows 64 bits is an error, not a wrapped number that happens to match
    const std::string what = fmt::format("'{}': tensor '{}' of shape {}", path, name, v.at("shape").dump());
    const uint64_t bytes = byte_size(shape_numel(t.shape, what), t.dtype, what);
    require(bytes == t.end - t.begin, "'{}': tensor '{}' of shape {} and dtype {} needs {} bytes, its offsets give {}",
            path, name, v.at("shape").dump(), dtype_name(t.dtype), bytes, t.end - t.begin);
    tensors_.push_back(std::move(t));
  }
  // The data buffer must be exactly covered: sorted by offset, each tensor starts where the previous ended.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  uint64_t expect = 0;
  for (const auto* t : by_offset) {
    require(t->begin >= expect, "'{}': tensor '{}' overlaps the previous tensor's bytes", path, t->name);
    require(t->begin == expect, "'{}': a hole of {} bytes before tensor '{}'", path, t->begin - expect, t->name);
    expect = t->end;
  }
  require(expect == data_size, "'{}': {} bytes after the last tensor are not indexed (truncated or padded file?)",
          path, data_size - expect);
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  data_.resize(data_size);
  f.read(reinterpret_cast<char*>(data_.data()), static_cast<std::streamsize>(data_size));
  require(f.good() || data_size == 0, "'{}': cannot read the data buffer", path);
}

bool SafetensorsFile::has(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = index_.find(name);
  require(it != index_.end(), "'{}' has no tensor '{}'", path_, name);
  return tensors_[it->second];
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const { return data_.data() + info(name).begin; }

std::vector<float> SafetensorsFile::read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const TensorInfo& t = info(name);
  if (!expected_shape.empty())
    require(t.shape == expected_shape, "'{}': tensor '{}' has shape {}, expected {}", path_, name,
            nlohmann::json(t.shape).dump(), nlohmann::json(expected_shape).dump());
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  const uint8_t* p = data_.data() + t.begin;
  switch (t.dtype) {
    case DType::F32:
      if (n) std::memcpy(out.data(), p, n * 4);  // an empty tensor of an empty file has no data pointer
      break;
    case DType::BF16:
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        out[i] = t.dtype == DType::BF16 ? bf16_to_float(b) : half_to_float(b);
      }
      break;
    default:
      throw UserError(fmt::format("'{}': tensor '{}' has dtype {}, expected a floating-point type", path_, name,
                                  dtype_name(t.dtype)));
  }
  return out;
}

}  // namespace dsv3
