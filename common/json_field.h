// Reading one field of a JSON object strictly, for every file a user can hand us (trainer_state.json,
// data.json): the field must exist and have the JSON type of T; an integer must fit T (no silent wrap of
// 4294967320 into 24); a floating-point value must be finite. Every failure is a UserError naming `where` and the
// field.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "common/errors.h"

namespace dsv3 {

template <typename T>
T json_field(const nlohmann::json& j, const std::string& key, const std::string& where) {
  require(j.is_object() && j.contains(key), "{}: field '{}' is missing", where, key);
  const nlohmann::json& v = j.at(key);
  if constexpr (std::is_same_v<T, bool>) {
    require(v.is_boolean(), "{}: field '{}' must be true or false, got {}", where, key, v.dump());
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    require(v.is_number_integer(), "{}: field '{}' must be an integer, got {}", where, key, v.dump());
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      require(u <= uint64_t(std::numeric_limits<T>::max()), "{}: field '{}' = {} is out of range (at most {})",
              where, key, u, std::numeric_limits<T>::max());
      return T(u);
    }
    const int64_t i = v.get<int64_t>();
    require(std::is_signed_v<T> && i >= int64_t(std::numeric_limits<T>::min()) &&
                i <= int64_t(std::numeric_limits<T>::max()),
            "{}: field '{}' = {} is out of range", where, key, i);
    return T(i);
  } else if constexpr (std::is_floating_point_v<T>) {
    require(v.is_number(), "{}: field '{}' must be a number, got {}", where, key, v.dump());
    const T x = v.get<T>();
    require(std::isfinite(x), "{}: field '{}' must be finite, got {}", where, key, v.dump());
    return x;
  } else if constexpr (std::is_same_v<T, std::string>) {
    require(v.is_string(), "{}: field '{}' must be a string, got {}", where, key, v.dump());
    return v.get<std::string>();
  } else {
    static_assert(std::is_same_v<T, nlohmann::json>, "json_field: bool, integers, floating point, string or json");
    require(v.is_object() || v.is_array(), "{}: field '{}' must be an object or an array, got {}", where, key,
            v.type_name());
    return v;
  }
}

}  // namespace dsv3
