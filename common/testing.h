// GoogleTest helpers shared by every stage's suite.
#pragma once

#include <gtest/gtest.h>

#include "common/compare.h"
#include "common/device.h"
#include "common/gradcheck.h"

// First statement of every GPU test: skips visibly (ctest counts it as skipped) without a device.
#define DSV3_REQUIRE_GPU()                                                               \
  do {                                                                                   \
    if (!::dsv3::gpu_available()) GTEST_SKIP() << "needs a GPU: " << ::dsv3::gpu_description(); \
  } while (0)

// EXPECT that a CompareResult passed, printing the error report when it did not.
#define EXPECT_CLOSE(result, what) EXPECT_TRUE((result).ok()) << (result).report(what)
#define EXPECT_GRADCHECK(result) EXPECT_TRUE((result).ok()) << (result).report()
