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

namespace int4ddp::detail {
inline std::string cuda_error_text(cudaError_t rc) {
  return std::string(cudaGetErrorName(rc)) + " (" + cudaGetErrorString(rc) + ")";
}
}  // namespace int4ddp::detail

#define INT4DDP_CUDA_CHECK(call) \
  INT4DDP_LIBRARY_CHECK("CUDA", call, #call, cudaSuccess, ::int4ddp::detail::cuda_error_text)
