// INT4DDP_CUBLAS_CHECK: the check of every cuBLAS and cuBLASLt call, on the message generator of
// the CUDA check (kernels/quant/cuda/cuda_check.h): it throws int4ddp::Error naming the call,
// file:line, the rank and cuBLAS's status string.
#pragma once

#include <cublas_api.h>

#include <string>

#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::cuda_detail {

[[noreturn]] inline void cublas_fail(cublasStatus_t rc, const char* call, const char* file,
                                     int line) {
  fail_call("cuBLAS", call, file, line,
            std::string(cublasGetStatusName(rc)) + " (" + cublasGetStatusString(rc) + ")");
}

}  // namespace int4ddp::cuda_detail

#define INT4DDP_CUBLAS_CHECK(call)                                         \
  do {                                                                     \
    const cublasStatus_t rc_ = (call);                                     \
    if (rc_ != CUBLAS_STATUS_SUCCESS)                                      \
      ::int4ddp::cuda_detail::cublas_fail(rc_, #call, __FILE__, __LINE__); \
  } while (0)
