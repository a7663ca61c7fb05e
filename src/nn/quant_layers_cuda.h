// The quantized Linear and Conv2d on the GPU (train.device = cuda with quant.*_bits below 32): the
// layers of quant_layers.h with their quantizers and their three integer GEMMs on the device.
//
// Each layer is a QuantizedOp (quant_layers.h): the learnable steps s_W and u_A, their first-batch
// initialisation (init_steps on the batch's x and W, brought to the host once), the gradient
// quantizer's policy state (lbt calibration on the host copy of the calibration batch's dL/dY,
// gamma, the deferred interval update of commit_step) are the CPU layer's own code. What runs on
// the device:
//   forward   W and x to one-byte codes (kernels/math/cuda/qlayer_cuda.h: the CPU's definitions,
//             bit for bit), y = sa * sw * (X^ W^T) through math::cuda::int_gemm (int8 tensor
//             cores, exact int32 sums, one rescale per output: bit for bit the CPU's y; Conv2d
//             through im2col of the codes, one GEMM per group of samples).
//   backward  dL/dY through the CUDA codec (quant::cuda::quantize_async: per-tensor scale,
//             stochastic rounding keyed (seed, rank, step, layer id) as on the CPU, the clip count
//             in the same pass: the CPU's codes and stats bit for bit); dW^ and dX^ by int_gemm on
//             the codes, exact integer sums rescaled once as the CPU does (Conv2d: dW^ summed over
//             sample groups in int64; dX^ by an int32 col2im rescaled once where the CPU uses the
//             transposed convolution (stride 1, pad <= k - 1), else the fp32 col2im of the rescaled
//             columns, the CPU's order); then the straight-through dW, dx and the step gradients.
// Step gradients are summed in double in a fixed order (deterministic on every run), equal to the
// CPU's up to summation order. Host syncs per step and layer: the two step values at forward, the
// 32-byte stats after the gradient quantizer (its scale sets the GEMMs' rescale); the lbt
// calibration batch and the mse / dsgc policies also download dL/dY.
//
// Parameters are those of the CPU layers, in the same order and with the same names
// (weight[, bias], s_w, u_a): checkpoints move between devices. They compute with
// Param::device_value / device_grad; gradients are accumulated (+=).
//
// This header is free of CUDA types; in a build without CUDA the factories throw int4ddp::Error.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "src/nn/layer.h"
#include "src/nn/quant_layers.h"

namespace int4ddp::nn {

// A layer and its QuantizedOp (the model keeps both: the op for commit_step and checkpoints).
struct CudaQuantLayer {
  std::unique_ptr<Layer> layer;
  QuantizedOp* op = nullptr;
};

// QLinear on the GPU (with bias), as QLinear(name, in, out, true, spec, layer_id, ctx).
CudaQuantLayer make_cuda_qlinear(std::string name, int64_t in, int64_t out, const QuantSpec& spec,
                                 uint32_t layer_id, QuantContext* ctx);
// QConv2d on the GPU (no bias), as QConv2d(name, in, out, kernel, stride, pad, spec, ...).
CudaQuantLayer make_cuda_qconv2d(std::string name, int64_t in, int64_t out, int kernel, int stride,
                                 int pad, const QuantSpec& spec, uint32_t layer_id,
                                 QuantContext* ctx);

}  // namespace int4ddp::nn
