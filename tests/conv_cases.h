// Convolution column cases shared by the tests of the GPU column kernels (test_cuda_math, on a GPU)
// and of their index math (test_cuda_conv_index, on the CPU): Conv2d's protected im2col / col2im
// reached by a subclass, and geometries with padding, strides, non-square images, 1x1, even and
// large kernels, and sample groups in the middle of the batch.
#pragma once

#include <cstdint>

#include "src/nn/layer.h"

namespace int4ddp::test {

struct ConvProbe : nn::Conv2d {
  using nn::Conv2d::col2im;
  using nn::Conv2d::Conv2d;
  using nn::Conv2d::im2col;
};

struct ColCase {
  int64_t n, c, h, w;
  int k, stride, pad;
  int64_t s0, g;  // the group: samples s0 .. s0 + g - 1
};

inline constexpr ColCase kColCases[] = {
    {1, 1, 1, 1, 1, 1, 0, 0, 1},  {2, 3, 5, 5, 3, 1, 1, 1, 1}, {4, 3, 7, 5, 3, 2, 1, 1, 3},
    {3, 5, 6, 6, 1, 2, 0, 0, 3},  {2, 2, 7, 9, 5, 1, 2, 0, 2}, {2, 3, 8, 8, 2, 2, 0, 1, 1},
    {5, 16, 8, 8, 3, 1, 1, 0, 5}, {1, 3, 4, 4, 3, 1, 2, 0, 1}, {3, 4, 9, 9, 7, 2, 3, 1, 2},
};

}  // namespace int4ddp::test
