// INT4DDP_CUBLAS_CHECK: the check of every cuBLAS and cuBLASLt call, on the error generator of
// kernels/common/error.h (as INT4DDP_CUDA_CHECK): it throws int4ddp::Error naming the call,
// the caller's file:line, the rank and cuBLAS's status string.
#pragma once

#include <cublas_api.h>

#include <string>

#include "kernels/common/error.h"

#define INT4DDP_CUBLAS_CHECK(call)                                                          \
  do {                                                                                      \
    const cublasStatus_t rc_ = (call);                                                      \
    if (rc_ != CUBLAS_STATUS_SUCCESS)                                                       \
      ::int4ddp::detail::fail_call(                                                         \
          "cuBLAS", #call, __FILE__, __LINE__,                                              \
          std::string(cublasGetStatusName(rc_)) + " (" + cublasGetStatusString(rc_) + ")"); \
  } while (0)
