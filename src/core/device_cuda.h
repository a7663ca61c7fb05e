// The process's compute stream and GEMM handles (CUDA builds only; see device.h): created on the
// selected GPU on first use, never destroyed (they live as long as the process's CUDA context).
#pragma once

#include <cuda_runtime_api.h>

namespace int4ddp {

namespace math::cuda {
class GemmContext;
}

cudaStream_t compute_stream();

// The cuBLAS / cuBLASLt handles and workspaces every CUDA layer's GEMMs use (fp32 and integer), one
// per process: calls are ordered by the compute stream they are enqueued on.
math::cuda::GemmContext& gemm_context();

}  // namespace int4ddp
