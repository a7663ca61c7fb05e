// The CUDA check macro of every int4ddp CUDA call (kernels, comm), and the generator the NCCL check
// shares (comm/nccl_communicator.h).
//
// A failed call never yields a silent wrong result: it throws int4ddp::Error naming the call as
// written, file:line, the process's rank and the library's error string. After every kernel launch
// the launch status is checked with INT4DDP_CUDA_CHECK(cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

#include "kernels/common/error.h"

namespace int4ddp::cuda_detail {

// The rank for error messages, read from the launcher's environment (kernels/ knows no MPI); -1
// when the process was not started by mpirun/srun.
inline int error_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"})
    if (const char* v = std::getenv(var)) return std::atoi(v);
  return -1;
}

// Message generator shared by every library check: "<library> error in <call> at <file>:<line>
// on rank <r>: <what>".
[[noreturn]] inline void fail_call(const char* library, const char* call, const char* file,
                                   int line, const std::string& what) {
  INT4DDP_FAIL(library, " error in ", call, " at ", file, ":", line, " on rank ", error_rank(),
               ": ", what);
}

[[noreturn]] inline void cuda_fail(cudaError_t rc, const char* call, const char* file, int line) {
  fail_call("CUDA", call, file, line,
            std::string(cudaGetErrorName(rc)) + " (" + cudaGetErrorString(rc) + ")");
}

}  // namespace int4ddp::cuda_detail

#define INT4DDP_CUDA_CHECK(call)                                                               \
  do {                                                                                         \
    const cudaError_t rc_ = (call);                                                            \
    if (rc_ != cudaSuccess) ::int4ddp::cuda_detail::cuda_fail(rc_, #call, __FILE__, __LINE__); \
  } while (0)
