# dsv3_add_stage(<NN_name> [DEPS <targets...>])
#
# Turns the current stage folder into:
#   <NN_name>_lib   every .cpp except main.cpp/test_*.cpp, plus every .cu when CUDA is on
#   <NN_name>       the demo (main.cpp)
#   <NN_name>_test  the GoogleTest suite (test_*.cpp)
# and registers with ctest:
#   <NN_name>.<Suite>.<Test>   labels "cpu;NN", or "gpu;NN" for suites whose name starts with Cuda
#   <NN_name>.demo_check       the demo's --check run, labels "cpu;demo;NN"
# GPU tests skip themselves (GTEST_SKIP) without a device; ctest reports them as skipped.
function(dsv3_add_stage name)
  cmake_parse_arguments(S "" "" "DEPS" ${ARGN})
  string(SUBSTRING "${name}" 0 2 num)
  set(dir ${CMAKE_CURRENT_SOURCE_DIR})

  file(GLOB lib_srcs CONFIGURE_DEPENDS ${dir}/*.cpp)
  list(FILTER lib_srcs EXCLUDE REGEX "/(main|test_[^/]*)\\.cpp$")
  if(DSV3_CUDA)
    file(GLOB cu_srcs CONFIGURE_DEPENDS ${dir}/*.cu)
    list(APPEND lib_srcs ${cu_srcs})
  endif()
  add_library(${name}_lib STATIC ${lib_srcs})
  target_link_libraries(${name}_lib PUBLIC dsv3_common ${S_DEPS})

  add_executable(${name} ${dir}/main.cpp)
  target_link_libraries(${name} PRIVATE ${name}_lib)
  target_compile_definitions(${name} PRIVATE DSV3_STAGE_DIR="${dir}")

  file(GLOB test_srcs CONFIGURE_DEPENDS ${dir}/test_*.cpp)
  add_executable(${name}_test ${test_srcs})
  target_link_libraries(${name}_test PRIVATE ${name}_lib dsv3_common_testing)
  dsv3_register_gtests(${name}_test ${name} ${num})

  add_test(NAME ${name}.demo_check
           COMMAND ${name} --check --out ${CMAKE_BINARY_DIR}/out/${name})
  set_tests_properties(${name}.demo_check PROPERTIES LABELS "cpu;demo;${num}")
endfunction()

# Register one GoogleTest executable. At ctest time (cmake/gtest_ctest.cmake) its tests are listed and
# each becomes <prefix>.<Suite>.<Test>: suites named Cuda* get labels "gpu;<num>", the rest "cpu;<num>".
# (gtest_discover_tests cannot give a test two labels through its PROPERTIES argument.)
function(dsv3_register_gtests target prefix num)
  set(wrapper ${CMAKE_CURRENT_BINARY_DIR}/${target}_ctest.cmake)
  file(GENERATE OUTPUT ${wrapper} CONTENT
"set(DSV3_TEST_EXE [==[$<TARGET_FILE:${target}>]==])
set(DSV3_TEST_PREFIX [==[${prefix}]==])
set(DSV3_TEST_NUM [==[${num}]==])
include([==[${PROJECT_SOURCE_DIR}/cmake/gtest_ctest.cmake]==])
")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${wrapper})
endfunction()
