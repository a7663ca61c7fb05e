// INT4DDP_CUBLAS_CHECK: the check of every cuBLAS and cuBLASLt call, on the error generator of
// kernels/common/error.h (as INT4DDP_CUDA_CHECK): it throws int4ddp::Error naming the call,
// the caller's file:line, the rank and cuBLAS's status string.
#pragma once

#include <cublas_api.h>

#include <string>

#include "kernels/common/error.h"

namespace int4ddp::detail {
inline std::string cublas_error_text(cublasStatus_t rc) {
  return std::string(cublasGetStatusName(rc)) + " (" + cublasGetStatusString(rc) + ")";
}
}  // namespace int4ddp::detail

#define INT4DDP_CUBLAS_CHECK(call)                                    \
  INT4DDP_LIBRARY_CHECK("cuBLAS", call, #call, CUBLAS_STATUS_SUCCESS, \
                        ::int4ddp::detail::cublas_error_text)
