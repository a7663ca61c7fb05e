// The CUDA implementations of the trainer's layers (train.device = cuda), side by side with the
// CPU layers of layer.h and behind the same Layer interface: the model builder (model.cpp) picks
// one or the other. Every tensor a CUDA layer reads or writes is a device tensor; its parameters
// compute with Param::device_value / device_grad (views into the model's device arenas), and
// gradients are ACCUMULATED (+=) as on the CPU. The math is kernels/math/cuda (nn_cuda.h,
// gemm_cuda.h) on the process's compute stream (src/core/device_cuda.h).
//
// Determinism: every kernel sums in an order fixed by the shape (nn_cuda.h), the fp32 GEMMs are
// cuBLAS with TF32 off and atomics disallowed, and the per-sample GEMMs of Conv2d accumulate dW in
// sample order on one stream: a rerun on the same GPU gives the same bits. Equality with the CPU
// layer is bit for bit for ReLU, max pooling and global average pooling, and within a derived fp32
// tolerance for the GEMM layers and BatchNorm (another summation order;
// tests/test_cuda_layers.cpp).
//
// This header is free of CUDA types; in a build without CUDA every factory throws int4ddp::Error.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "src/nn/layer.h"

namespace int4ddp::nn {

// Linear (y = x W^T + b, x flattened to in features), as nn::Linear.
std::unique_ptr<Layer> make_cuda_linear(std::string name, int64_t in, int64_t out, bool bias);
// Conv2d without bias (square kernel), im2col + cuBLAS per sample, as nn::Conv2d.
std::unique_ptr<Layer> make_cuda_conv2d(std::string name, int64_t in, int64_t out, int kernel,
                                        int stride, int pad);
std::unique_ptr<Layer> make_cuda_relu(std::string name);
// BatchNorm over (n, h, w) per channel, with the fused ReLU when relu (BatchNorm::with_relu). The
// running statistics live on the device (device_buffers(): forward reads and updates them there);
// buffers() are host copies that the model syncs where they are read or written (checkpoints,
// rank averaging), never per step.
std::unique_ptr<Layer> make_cuda_batchnorm(std::string name, int64_t channels, bool relu);
// Max pooling as nn::MaxPool2d (window, stride, pad; padding never wins).
std::unique_ptr<Layer> make_cuda_maxpool(std::string name, int window, int stride, int pad);
std::unique_ptr<Layer> make_cuda_global_avgpool(std::string name);
// The ResNet basic block (nn::ResidualBlock): conv1 and conv2 are CUDA convolutions; the block
// adds its BatchNorms (bn1 with the fused ReLU, bn2) as the CPU does. Without a projection the
// shortcut is option A; with one (a CUDA 1x1 convolution with the block's stride) it is option B,
// bn_s(projection(x)), its BatchNorm made here (name.shortcut.bn).
std::unique_ptr<Layer> make_cuda_residual_block(std::string name, std::unique_ptr<Layer> conv1,
                                                int64_t mid_channels, std::unique_ptr<Layer> conv2,
                                                int64_t in_channels, int64_t out_channels,
                                                int stride,
                                                std::unique_ptr<Layer> projection = nullptr);

// nn::softmax_cross_entropy on logits of either device: host logits take the CPU function as it
// is; device logits take the CUDA kernel (labels are host memory, copied over), and dlogits is
// then a device tensor. Returns the mean loss (read back from the GPU).
float softmax_cross_entropy_any(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                                int64_t* correct);

}  // namespace int4ddp::nn
