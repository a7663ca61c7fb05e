# CUDA kernels and the NCCL backend (issue: GPU path). INT4DDP_CUDA = AUTO enables CUDA when a CUDA
# compiler is found; INT4DDP_NCCL = AUTO enables NCCL with CUDA when nccl.h and libnccl are found.
include(CheckLanguage)
set(INT4DDP_HAVE_CUDA OFF)
if(NOT INT4DDP_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(INT4DDP_HAVE_CUDA ON)
  elseif(INT4DDP_CUDA STREQUAL "ON")
    message(FATAL_ERROR "INT4DDP_CUDA=ON but no CUDA compiler was found (set CUDACXX or PATH to nvcc)")
  endif()
endif()
message(STATUS "int4ddp: CUDA ${INT4DDP_HAVE_CUDA} (compiler: ${CMAKE_CUDA_COMPILER}), MPI ${INT4DDP_MPI}")
