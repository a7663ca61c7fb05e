// BatchNorm's per-channel kernels on NCHW fp32 tensors (src/nn/batchnorm.cpp calls them, one
// channel per call; the layer threads over channels).
//
// A channel of an (n, C, h, w) tensor is n rows of hw = h * w floats, row i at i * stride floats
// from the channel's first element (stride = C * hw); ChannelRows says so.
//
// The sums define BatchNorm's rounding, so their order is fixed and part of the contract: eight
// double lanes, element j of every row goes to lane j % 8, each lane adds its terms in row order
// (rows in order), each term rounded to double before it is added, and the total is
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). Every instruction set gives the same bits
// (the AVX2 kernels add masked +0.0 terms in the tails, which change no lane: a lane that starts at
// +0.0 never becomes -0.0). The elementwise kernels are the same float expressions, mul then add,
// no FMA contraction, so they too are bit-identical across instruction sets.
//
// Instruction sets: a portable path (plain loops, the reference) and AVX2 (batchnorm_avx2.cpp,
// compiled with -mavx2 -mfma for that file only, used after a run-time CPU check). BnIsa::kAuto
// picks AVX2 where available unless the environment sets INT4DDP_ISA=portable (the codec's
// override).
#pragma once

#include <cstdint>

namespace int4ddp::math {

enum class BnIsa : uint8_t { kAuto = 0, kPortable = 1, kAvx2 = 2 };

const char* bn_isa_name(BnIsa isa);
bool bn_isa_available(BnIsa isa);
// kAuto -> the instruction set it stands for; others are checked available (Error if not).
BnIsa bn_resolve(BnIsa isa);

// One channel: n rows of hw floats, row i at i * stride floats from the first.
struct ChannelRows {
  int64_t n, hw, stride;
};

// Two sums over a channel in the fixed order above.
struct ChannelSums {
  double first, second;
};

// The fused ReLU's mask, recomputed from x: an element passes where x * scale + shift > 0 in float
// (the forward's own expression, so exactly where its output y > 0).
struct ReluMask {
  bool on;
  float scale, shift;
};

// first = sum of (double(x) - shift), second = sum of (double(x) - shift)^2: the batch moments,
// shifted by a value of the channel (shift) so that second - first^2 / count is well conditioned.
ChannelSums bn_moments(const float* x, const ChannelRows& rows, double shift,
                       BnIsa isa = BnIsa::kAuto);

// With d = dy (0 where relu.on and the mask fails): first = sum of d, second = sum of
// d * (double(x) - mean): the backward's two sums in one pass over dy and x.
ChannelSums bn_grad_moments(const float* dy, const float* x, const ChannelRows& rows, double mean,
                            const ReluMask& relu, BnIsa isa = BnIsa::kAuto);

// y = x * scale + shift, then max(0, .) when relu (a NaN gives 0, as y > 0 ? y : 0). x and y are
// laid out alike (rows).
void bn_affine(const float* x, float* y, const ChannelRows& rows, float scale, float shift,
               bool relu, BnIsa isa = BnIsa::kAuto);

// The training-mode input gradient dx = (g * d - (x - mean) * k) - gmdy (float, in that order),
// d as in bn_grad_moments. x, dy and dx are laid out alike (rows).
struct BnInputGrad {
  float g, mean, k, gmdy;
  ReluMask relu;
};
void bn_input_grad(const float* x, const float* dy, float* dx, const ChannelRows& rows,
                   const BnInputGrad& p, BnIsa isa = BnIsa::kAuto);

}  // namespace int4ddp::math
