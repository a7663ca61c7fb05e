// The process's compute stream (CUDA builds only; see device.h): created on the selected GPU on
// first use, never destroyed (it lives as long as the process's CUDA context).
#pragma once

#include <cuda_runtime_api.h>

namespace int4ddp {

cudaStream_t compute_stream();

}  // namespace int4ddp
