# Default CUDA architecture: the GPU present at configure time, else sm_90a (H100/H200). A compute capability
# 9.0 GPU gets "90a", the architecture-specific target whose code may use wgmma (common/segment_gemm_hopper.cu);
# such code runs on 9.0 devices only, which is what a 9.0 build is for. An explicit -DCMAKE_CUDA_ARCHITECTURES=...
# always wins (with plain 90, the wgmma kernels are compiled out and version 1 runs).
function(dsv3_default_cuda_arch)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    return()
  endif()
  set(_arch 90a)
  find_program(_nvsmi nvidia-smi)
  if(_nvsmi)
    execute_process(COMMAND ${_nvsmi} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _cap RESULT_VARIABLE _rc ERROR_QUIET
                    OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 20)
    if(_rc EQUAL 0 AND _cap MATCHES "^([0-9]+)\\.([0-9]+)")
      set(_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
      if(_arch STREQUAL "90")
        set(_arch 90a)
      endif()
    endif()
  endif()
  set(CMAKE_CUDA_ARCHITECTURES ${_arch} CACHE STRING "CUDA architectures" FORCE)
endfunction()
