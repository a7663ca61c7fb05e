// Internal: the per-ISA kernels behind kernels/math/batchnorm.h. batchnorm.cpp fills the portable
// table (the reference loops) and batchnorm_avx2.cpp the AVX2 one; the public functions dispatch.
// The sum kernels add into lanes[16] (the eight lanes of the first sum, then those of the second;
// zero on entry) in the order batchnorm.h defines.
#pragma once

#include "kernels/math/batchnorm.h"

namespace int4ddp::math::detail {

constexpr int kBnLanes = 8;

struct BatchNormKernels {
  void (*moments)(const float* x, const ChannelRows& rows, double shift, double* lanes);
  void (*grad_moments)(const float* dy, const float* x, const ChannelRows& rows, double mean,
                       const ReluMask& relu, double* lanes);
  void (*affine)(const float* x, float* y, const ChannelRows& rows, float scale, float shift,
                 bool relu);
  void (*input_grad)(const float* x, const float* dy, float* dx, const ChannelRows& rows,
                     const BnInputGrad& p);
};

extern const BatchNormKernels kBatchNormPortable;
#if defined(INT4DDP_HAVE_AVX2)
extern const BatchNormKernels kBatchNormAvx2;
#endif

}  // namespace int4ddp::math::detail
