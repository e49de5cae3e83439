# Default CUDA architecture: the GPU present at configure time, else sm_90 (H100/H200).
# An explicit -DCMAKE_CUDA_ARCHITECTURES=... always wins.
function(dsv3_default_cuda_arch)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    return()
  endif()
  set(_arch 90)
  find_program(_nvsmi nvidia-smi)
  if(_nvsmi)
    execute_process(COMMAND ${_nvsmi} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _cap RESULT_VARIABLE _rc ERROR_QUIET
                    OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 20)
    if(_rc EQUAL 0 AND _cap MATCHES "^([0-9]+)\\.([0-9]+)")
      set(_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    endif()
  endif()
  set(CMAKE_CUDA_ARCHITECTURES ${_arch} CACHE STRING "CUDA architectures" FORCE)
endfunction()
