// INT4DDP_CUDA_CHECK: the CUDA check of every int4ddp CUDA call (kernels, comm), on the error
// generator of kernels/common/error.h.
//
// A failed call never yields a silent wrong result: it throws int4ddp::Error naming the call as
// written, file:line, the process's rank and the library's error string. After every kernel launch
// the launch status is checked with INT4DDP_CUDA_CHECK(cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "kernels/common/error.h"

#define INT4DDP_CUDA_CHECK(call)                                                      \
  do {                                                                                \
    const cudaError_t rc_ = (call);                                                   \
    if (rc_ != cudaSuccess)                                                           \
      ::int4ddp::detail::fail_call(                                                   \
          "CUDA", #call, __FILE__, __LINE__,                                          \
          std::string(cudaGetErrorName(rc_)) + " (" + cudaGetErrorString(rc_) + ")"); \
  } while (0)
