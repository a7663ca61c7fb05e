// Helpers of the cuda-labelled tests: the skip without a GPU, copies of a tensor to the other
// device.
#pragma once

#include <gtest/gtest.h>

#include "kernels/quant/cuda/codec_cuda.h"
#include "src/core/device.h"
#include "src/core/tensor.h"

// Skips the test where no CUDA device is present (the GPU-less build and CI machines).
#define REQUIRE_GPU()                                                                  \
  do {                                                                                 \
    if (!::int4ddp::quant::cuda::device_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace int4ddp::test {

inline Tensor to_device(const Tensor& h) {
  Tensor d(h.shape(), Device::kCuda);
  d.copy_from(h);
  return d;
}

inline Tensor to_host(const Tensor& d) {
  Tensor h(d.shape());
  h.copy_from(d);
  return h;
}

}  // namespace int4ddp::test
