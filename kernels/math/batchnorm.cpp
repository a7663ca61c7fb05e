// BatchNorm's per-channel kernels: the portable table (plain loops: the reference every other
// instruction set is tested against, bit for bit) and the dispatch (see batchnorm.h).
#include "kernels/math/batchnorm.h"

#include "kernels/common/error.h"
#include "kernels/math/batchnorm_kernels.h"
#include "kernels/quant/codec.h"

namespace int4ddp::math {
namespace detail {
namespace {

void moments_ref(const float* x, const ChannelRows& r, double shift, double* lanes) {
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    for (int64_t j = 0; j < r.hw; ++j) {
      const double d = static_cast<double>(p[j]) - shift;
      lanes[j % kBnLanes] += d;
      lanes[kBnLanes + j % kBnLanes] += d * d;
    }
  }
}

inline float masked(float d, float x, const ReluMask& relu) {
  return !relu.on || x * relu.scale + relu.shift > 0.0f ? d : 0.0f;
}

void grad_moments_ref(const float* dy, const float* x, const ChannelRows& r, double mean,
                      const ReluMask& relu, double* lanes) {
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    const float* d = dy + i * r.stride;
    for (int64_t j = 0; j < r.hw; ++j) {
      const double dj = masked(d[j], p[j], relu);
      lanes[j % kBnLanes] += dj;
      lanes[kBnLanes + j % kBnLanes] += dj * (static_cast<double>(p[j]) - mean);
    }
  }
}

void affine_ref(const float* x, float* y, const ChannelRows& r, float scale, float shift,
                bool relu) {
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    float* q = y + i * r.stride;
    for (int64_t j = 0; j < r.hw; ++j) {
      const float v = p[j] * scale + shift;
      q[j] = !relu || v > 0.0f ? v : 0.0f;
    }
  }
}

void input_grad_ref(const float* x, const float* dy, float* dx, const ChannelRows& r,
                    const BnInputGrad& g) {
  for (int64_t i = 0; i < r.n; ++i) {
    const float* p = x + i * r.stride;
    const float* d = dy + i * r.stride;
    float* q = dx + i * r.stride;
    for (int64_t j = 0; j < r.hw; ++j)
      q[j] = (g.g * masked(d[j], p[j], g.relu) - (p[j] - g.mean) * g.k) - g.gmdy;
  }
}

}  // namespace

const BatchNormKernels kBatchNormPortable = {moments_ref, grad_moments_ref, affine_ref,
                                             input_grad_ref};

}  // namespace detail

namespace {

const detail::BatchNormKernels& kernels_for(BnIsa isa) {
#if defined(INT4DDP_HAVE_AVX2)
  if (bn_resolve(isa) == BnIsa::kAvx2) return detail::kBatchNormAvx2;
#else
  bn_resolve(isa);
#endif
  return detail::kBatchNormPortable;
}

// Lanes into the fixed total ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
double lane_total(const double* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

ChannelSums totals(const double* lanes) {
  return {lane_total(lanes), lane_total(lanes + detail::kBnLanes)};
}

}  // namespace

const char* bn_isa_name(BnIsa isa) {
  switch (isa) {
    case BnIsa::kAuto:
      return "auto";
    case BnIsa::kPortable:
      return "portable";
    case BnIsa::kAvx2:
      return "avx2";
  }
  return "unknown";
}

bool bn_isa_available(BnIsa isa) {
  switch (isa) {
    case BnIsa::kAuto:
    case BnIsa::kPortable:
      return true;
    case BnIsa::kAvx2:
#if defined(INT4DDP_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
  }
  return false;
}

BnIsa bn_resolve(BnIsa isa) {
  if (isa == BnIsa::kAuto) {
    // INT4DDP_ISA=portable (the codec's override, parsed once by the codec) rules AVX2 out here
    // too, so one variable turns every vector kernel off.
    static const BnIsa best = quant::isa_allows(quant::Isa::kAvx2) && bn_isa_available(BnIsa::kAvx2)
                                  ? BnIsa::kAvx2
                                  : BnIsa::kPortable;
    return best;
  }
  INT4DDP_CHECK(bn_isa_available(isa), "batchnorm: instruction set ", bn_isa_name(isa),
                " is not available on this CPU or build");
  return isa;
}

ChannelSums bn_moments(const float* x, const ChannelRows& rows, double shift, BnIsa isa) {
  double lanes[2 * detail::kBnLanes] = {};
  kernels_for(isa).moments(x, rows, shift, lanes);
  return totals(lanes);
}

ChannelSums bn_grad_moments(const float* dy, const float* x, const ChannelRows& rows, double mean,
                            const ReluMask& relu, BnIsa isa) {
  double lanes[2 * detail::kBnLanes] = {};
  kernels_for(isa).grad_moments(dy, x, rows, mean, relu, lanes);
  return totals(lanes);
}

void bn_affine(const float* x, float* y, const ChannelRows& rows, float scale, float shift,
               bool relu, BnIsa isa) {
  kernels_for(isa).affine(x, y, rows, scale, shift, relu);
}

void bn_input_grad(const float* x, const float* dy, float* dx, const ChannelRows& rows,
                   const BnInputGrad& p, BnIsa isa) {
  kernels_for(isa).input_grad(x, dy, dx, rows, p);
}

}  // namespace int4ddp::math
