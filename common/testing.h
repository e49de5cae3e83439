// GoogleTest helpers shared by every stage's suite.
#pragma once

#include <gtest/gtest.h>

#include "common/compare.h"
#include "common/device.h"
#include "common/errors.h"
#include "common/gradcheck.h"

// First statement of every GPU test: skips visibly (ctest counts it as skipped) without a device.
#define DSV3_REQUIRE_GPU()                                                               \
  do {                                                                                   \
    if (!::dsv3::gpu_available()) GTEST_SKIP() << "needs a GPU: " << ::dsv3::gpu_description(); \
  } while (0)

// EXPECT that a CompareResult passed, printing the error report when it did not.
#define EXPECT_CLOSE(result, what) EXPECT_TRUE((result).ok()) << (result).report(what)
#define EXPECT_GRADCHECK(result) EXPECT_TRUE((result).ok()) << (result).report()

namespace dsv3 {

// The convention of common/conventions.h, checked the same way in every stage: parameter gradients accumulate
// (+=), activation gradients overwrite (=). once: the parameter gradients after one backward from zero; twice:
// after two backwards into the same buffers; dx_once, dx_twice: the activation gradient after the first and the
// last backward, each written over a buffer filled with garbage. Expects dx_twice == dx_once exactly and every
// twice == 2 * once (up to rounding: 2x is exact, the second sum is not).
template <typename T>
void expect_accumulates_and_overwrites(const std::vector<std::pair<std::string, const std::vector<T>*>>& once,
                                       const std::vector<std::pair<std::string, const std::vector<T>*>>& twice,
                                       const std::vector<T>& dx_once, const std::vector<T>& dx_twice,
                                       const std::string& dx_name = "dinp") {
  EXPECT_CLOSE(compare(dx_twice, dx_once, {0, 0}), dx_name + " overwrites");
  ASSERT_EQ(once.size(), twice.size());
  for (size_t i = 0; i < once.size(); ++i) {
    std::vector<T> doubled = *once[i].second;
    for (auto& v : doubled) v *= 2;
    EXPECT_CLOSE(compare(*twice[i].second, doubled, {1e-14, 1e-12}), once[i].first + " accumulates");
  }
}

// The (name, tensor) list of a layer's gradients (XxxParams::tensors()), read-only.
template <typename T>
std::vector<std::pair<std::string, const std::vector<T>*>> read_only(
    const std::vector<std::pair<std::string, std::vector<T>*>>& tensors) {
  return {tensors.begin(), tensors.end()};
}

// f() must throw a UserError (a bad input: exit code 2) whose message contains fragment.
template <typename F>
void expect_user_error(F&& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace dsv3
