// Pieces shared by the GPU benchmarks (bench_gpu, bench_gpu_math): an owning device allocation.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>

#include "kernels/quant/cuda/cuda_check.h"

namespace int4ddp::bench {

// `bytes` of device memory (at least 1), freed on destruction.
struct DeviceMem {
  void* p = nullptr;
  explicit DeviceMem(size_t bytes) {
    INT4DDP_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
  }
  ~DeviceMem() { cudaFree(p); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <typename T>
  T* as() {
    return static_cast<T*>(p);
  }
};

}  // namespace int4ddp::bench
