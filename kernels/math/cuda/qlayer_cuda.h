// Element-wise kernels of the quantized layers on the GPU (src/nn/quant_layers_cuda.h): the weight
// and activation quantizers to one-byte codes, their straight-through backward with the learnable
// steps' gradients, and the layout helpers of the convolution's integer GEMMs. Every pointer is
// device memory; every call enqueues on `stream` and returns at once; bad arguments throw
// int4ddp::Error before anything is enqueued.
//
// Definitions (nn::quantize_weight_codes, quantize_act_codes, weight_quant_backward and
// act_quant_backward_ref of src/nn/quant_layers.h, operation for operation in fp32 with IEEE
// division and no FMA, so codes, dw and dx equal the CPU's bit for bit):
//   weight code   q = clamp(rint(w / s * L), -L, L)                       (s: the effective step)
//   act code      q = rint(clamp(x / u, lo, 1) * Q)     lo = 0 (unsigned, Q = 2^b - 1; uint8 codes)
//                                                       or -1 (signed, Q = L; int8 codes)
// Step gradients: each element's term is the CPU's (in double), and the terms are summed in an
// order fixed by the count alone (per thread strided, a fixed tree per block, the blocks in order
// by one thread): deterministic on every run, equal to the CPU's sum up to summation order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/math/cuda/nn_cuda.h"

namespace int4ddp::math::cuda {

// Doubles of device scratch the step-gradient reductions need (for any count).
int64_t step_grad_scratch_count();

// codes[i] = clamp(rint(w[i] / s * L), -L, L), L = 2^(bits-1) - 1.
void weight_codes_async(const float* w, int64_t n, float s, int bits, int8_t* codes,
                        cudaStream_t stream);

// Activation codes: uint8 0..2^b-1 (is_signed false) or int8 -L..L (true), one byte each. A NaN
// input gets code 0 and is counted into *nans (device; may be null), as the CPU counts it.
void act_codes_async(const float* x, int64_t n, float u, int bits, bool is_signed, void* codes,
                     unsigned long long* nans, cudaStream_t stream);

// dw[i] += dwhat[i] where |w / s * L| <= L; *ds (device) = d loss / d s, the sum of
// dwhat * (rint(v) - v) / L inside the range and sign(v) * dwhat outside (v = w / s * L).
// scratch: step_grad_scratch_count() doubles.
void weight_quant_backward_async(const float* w, int64_t n, float s, int bits, const float* dwhat,
                                 float* dw, double* ds, double* scratch, cudaStream_t stream);

// dx[i] = dxhat[i] inside the clip range, 0 outside (dx may be null: only du); *du (device) =
// d loss / d u = (sum inside of dxhat * (rint(v Q) - v Q)) / Q + (sum outside of dxhat * (+1 above,
// -1 below on the signed grid, 0 below on the unsigned one)), v = x / u. scratch as above.
void act_quant_backward_async(const float* x, int64_t n, float u, int bits, bool is_signed,
                              const float* dxhat, float* dx, double* du, double* scratch,
                              cudaStream_t stream);

// bias_grad[j] += codes[i * cols + j] * step for i = 0..rows-1 in order (fp32, as QLinear's CPU
// loop: one product and one add per row).
void bias_grad_codes_async(const int8_t* codes, int64_t rows, int64_t cols, float step,
                           float* bias_grad, cudaStream_t stream);

// dst (c, g * hw) = src (g, c, hw) for int8 codes: samples' planes side by side per channel, the
// K-contiguous operand of the convolution's weight-gradient GEMM over a group of samples.
void planes_by_channel_async(const int8_t* src, int64_t g, int64_t c, int64_t hw, int8_t* dst,
                             cudaStream_t stream);

// dst (g, c, hw) = src (c, g * hw) for floats: the inverse layout, a group's GEMM output (channels
// by columns) back to NCHW samples.
void planes_by_sample_async(const float* src, int64_t g, int64_t c, int64_t hw, float* dst,
                            cudaStream_t stream);

// images (samples s0..s0+g-1, overwritten) = scale * float(T), T the exact int32 sum of the
// column entries each image element receives (col (rows, g*ho*wo) as im2col_async's non-transposed
// layout): the transposed-convolution form of dx, one rescale per element.
void col2im_i32_scaled_async(const int32_t* col, int64_t s0, int64_t g, const ConvGeometry& geo,
                             float scale, float* images, cudaStream_t stream);

// acc[i] = (first ? 0 : acc[i]) + part[i], exactly in int64.
void accumulate_i64_async(const int32_t* part, int64_t n, bool first, int64_t* acc,
                          cudaStream_t stream);

// out[i] = scale * float(acc[i]) (acc rounded to float once, then one product).
void scale_i64_async(const int64_t* acc, int64_t n, float scale, float* out, cudaStream_t stream);

// *grad += float(*value) (one device scalar).
void add_double_to_float_async(const double* value, float* grad, cudaStream_t stream);

}  // namespace int4ddp::math::cuda
