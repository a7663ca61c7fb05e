// Helpers of the cuda-labelled tests: copies of a tensor to the other device.
#pragma once

#include "src/core/device.h"
#include "src/core/tensor.h"

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
