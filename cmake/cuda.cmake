# CUDA kernels and the NCCL backend (issue: GPU path). Included from the top-level CMakeLists.txt
# after int4ddp_kernels, int4ddp_comm and int4ddp_core exist, before tests/ and experiments/.
#
#   INT4DDP_CUDA = AUTO  enables CUDA when a CUDA compiler is found (ON: required, OFF: never).
#   INT4DDP_NCCL = AUTO  enables the NCCL backend with CUDA when nccl.h and libnccl are found and
#                        MPI is on (the NCCL unique id travels by MPI_Bcast).
# With CUDA:  int4ddp_cuda_math (kernels/math/cuda: cuBLAS/cuBLASLt GEMMs, layer kernels) and
#             int4ddp_cuda (kernels/quant/cuda/*.cu), linked into int4ddp_comm, which gains the
#             device two-shot all-reduce and the pinned-host staging communicator; compile
#             definition INT4DDP_HAVE_CUDA (PUBLIC). Architectures default to 80;90 (A100, H100/H200)
#             unless CMAKE_CUDA_ARCHITECTURES is given.
# With NCCL:  comm/nccl_communicator.cpp in int4ddp_comm; INT4DDP_HAVE_NCCL (PUBLIC).
# Without either nothing here touches the CPU targets.
include(CheckLanguage)
set(INT4DDP_HAVE_CUDA OFF)
if(NOT INT4DDP_CUDA STREQUAL "OFF")
  # nvcc is often installed off PATH (/usr/local/cuda/bin): look there too before giving up.
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(INT4DDP_NVCC nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
                 PATHS /usr/local/cuda/bin)
    if(INT4DDP_NVCC)
      set(CMAKE_CUDA_COMPILER "${INT4DDP_NVCC}" CACHE FILEPATH "CUDA compiler")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(INT4DDP_HAVE_CUDA ON)
  elseif(INT4DDP_CUDA STREQUAL "ON")
    message(FATAL_ERROR "INT4DDP_CUDA=ON but no CUDA compiler was found (set CUDACXX or PATH to nvcc)")
  else()
    message(STATUS "int4ddp: no CUDA compiler found: CPU-only build (put nvcc on PATH for the GPU path)")
  endif()
endif()

set(INT4DDP_HAVE_NCCL OFF)
if(INT4DDP_NCCL STREQUAL "ON" AND NOT INT4DDP_HAVE_CUDA)
  message(FATAL_ERROR "INT4DDP_NCCL=ON needs CUDA (INT4DDP_CUDA is ${INT4DDP_CUDA} and no usable nvcc)")
endif()

if(INT4DDP_HAVE_CUDA)
  # Before enable_language: afterwards CMake would have filled in the compiler's default.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "80;90")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)  # CUDA::cudart for the C++ files that call the runtime
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)

  # ---- NCCL ------------------------------------------------------------------------------------
  if(NOT INT4DDP_NCCL STREQUAL "OFF")
    find_path(INT4DDP_NCCL_INCLUDE_DIR nccl.h
      HINTS ENV NCCL_HOME ENV NCCL_ROOT ${CUDAToolkit_INCLUDE_DIRS}
      PATHS /usr/local/cuda /usr/local/nccl /usr
      PATH_SUFFIXES include)
    find_library(INT4DDP_NCCL_LIBRARY NAMES nccl libnccl.so.2
      HINTS ENV NCCL_HOME ENV NCCL_ROOT ${CUDAToolkit_LIBRARY_DIR}
      PATHS /usr/local/cuda /usr/local/nccl /usr
      PATH_SUFFIXES lib64 lib lib/x86_64-linux-gnu lib/aarch64-linux-gnu)
    if(INT4DDP_NCCL_INCLUDE_DIR AND INT4DDP_NCCL_LIBRARY AND INT4DDP_MPI)
      set(INT4DDP_HAVE_NCCL ON)
    else()
      if(NOT INT4DDP_MPI)
        set(_why "MPI is off (the NCCL unique id is broadcast with MPI)")
      else()
        set(_why "nccl.h: ${INT4DDP_NCCL_INCLUDE_DIR}, libnccl: ${INT4DDP_NCCL_LIBRARY} (set NCCL_HOME)")
      endif()
      if(INT4DDP_NCCL STREQUAL "ON")
        message(FATAL_ERROR "INT4DDP_NCCL=ON but NCCL cannot be built: ${_why}")
      endif()
      message(STATUS "int4ddp: NCCL backend not built: ${_why}")
    endif()
  endif()
  if(INT4DDP_HAVE_NCCL)
    file(STRINGS "${INT4DDP_NCCL_INCLUDE_DIR}/nccl.h" _nccl_h REGEX "^#define NCCL_(MAJOR|MINOR) ")
    string(REGEX MATCH "NCCL_MAJOR ([0-9]+)" _m "${_nccl_h}")
    set(_nccl_ver "${CMAKE_MATCH_1}")
    string(REGEX MATCH "NCCL_MINOR ([0-9]+)" _m "${_nccl_h}")
    set(_nccl_ver "${_nccl_ver}.${CMAKE_MATCH_1} (${INT4DDP_NCCL_LIBRARY})")
    add_library(int4ddp_nccl INTERFACE)
    target_include_directories(int4ddp_nccl INTERFACE ${INT4DDP_NCCL_INCLUDE_DIR})
    target_link_libraries(int4ddp_nccl INTERFACE ${INT4DDP_NCCL_LIBRARY})
  endif()

  # A static library of CUDA kernels that promise the CPU build's bits (-ffp-contract=off there): no
  # FMA contraction, IEEE division and square root, denormals kept. --use_fast_math is refused by
  # an #error in the codec's source.
  function(int4ddp_bit_exact_cuda_library name)
    add_library(${name} STATIC ${ARGN})
    set_target_properties(${name} PROPERTIES
      CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON CUDA_RUNTIME_LIBRARY Shared
      POSITION_INDEPENDENT_CODE ON)
    target_compile_options(${name} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-fmad=false -prec-div=true -prec-sqrt=true -ftz=false
                                 -Xcompiler=-ffp-contract=off>)
  endfunction()

  # ---- int4ddp_cuda: the CUDA codec ------------------------------------------------------------
  int4ddp_bit_exact_cuda_library(int4ddp_cuda kernels/quant/cuda/codec_cuda.cu)
  target_link_libraries(int4ddp_cuda PUBLIC int4ddp_kernels CUDA::cudart PRIVATE int4ddp_warnings)
  target_compile_definitions(int4ddp_cuda PUBLIC INT4DDP_HAVE_CUDA)

  # ---- int4ddp_cuda_math: GPU GEMMs (cuBLAS, cuBLASLt IMMA) and layer kernels ------------------
  # kernels/math/cuda: the math the GPU engine calls (its integer GEMM and layer kernels promise the
  # CPU's bits where their headers say so).
  int4ddp_bit_exact_cuda_library(int4ddp_cuda_math kernels/math/cuda/gemm_cuda.cu
                                 kernels/math/cuda/nn_cuda.cu kernels/math/cuda/qlayer_cuda.cu)
  target_link_libraries(int4ddp_cuda_math PUBLIC int4ddp_kernels CUDA::cudart CUDA::cublas
                        CUDA::cublasLt PRIVATE int4ddp_warnings)

  # ---- src/: the CUDA layers of train.device = cuda (src/nn/layers_cuda.cpp, compiled in every
  # build, calls kernels/math/cuda when INT4DDP_HAVE_CUDA is defined).
  target_link_libraries(int4ddp_core PUBLIC int4ddp_cuda_math)

  # ---- comm/: device two-shot, staging over a host transport, NCCL -----------------------------
  target_sources(int4ddp_comm PRIVATE comm/two_shot_cuda.cpp comm/staged_communicator.cpp
                                      comm/device_buckets_cuda.cpp)
  target_link_libraries(int4ddp_comm PUBLIC int4ddp_cuda)
  if(INT4DDP_HAVE_NCCL)
    target_sources(int4ddp_comm PRIVATE comm/nccl_communicator.cpp)
    target_link_libraries(int4ddp_comm PUBLIC int4ddp_nccl)
    target_compile_definitions(int4ddp_comm PUBLIC INT4DDP_HAVE_NCCL)
  endif()

  # ---- experiments/bench_gpu, bench_gpu_math ---------------------------------------------------
  if(INT4DDP_BUILD_EXPERIMENTS)
    add_executable(bench_gpu experiments/bench_gpu.cpp)
    target_link_libraries(bench_gpu PRIVATE int4ddp_comm int4ddp_warnings)
    set_target_properties(bench_gpu PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/experiments)
    add_executable(bench_gpu_math experiments/bench_gpu_math.cpp)
    target_link_libraries(bench_gpu_math PRIVATE int4ddp_cuda_math int4ddp_cuda int4ddp_warnings)
    set_target_properties(bench_gpu_math PROPERTIES
      RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/experiments)
  endif()
endif()

message(STATUS "int4ddp: CUDA ${INT4DDP_HAVE_CUDA} (compiler: ${CMAKE_CUDA_COMPILER}, architectures: "
               "${CMAKE_CUDA_ARCHITECTURES}), NCCL ${INT4DDP_HAVE_NCCL} ${_nccl_ver}, MPI ${INT4DDP_MPI}")
