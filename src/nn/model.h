// Models (DESIGN.md section 3): mlp, cnn (2 conv + 2 fc), CIFAR ResNet-20 (option-A shortcuts,
// BatchNorm1d before the classifier), for 1x28x28 inputs by default, and ResNet-18 (torchvision's:
// BasicBlocks [2, 2, 2, 2] of widths 64-128-256-512, option-B projection shortcuts, global average
// pool, fc) whose stem follows the input: CIFAR-style (3x3 conv, stride 1, no max pool) up to
// 64x64 (3x32x32, 1x28x28), ImageNet-style (7x7 conv stride 2 + BN + ReLU + 3x3 max pool stride 2)
// above (3x224x224). Every Conv2d and Linear is quantized except the first conv / first linear and
// the last linear, which stay fp32 unless the spec says otherwise; BN, ReLU, pooling and residual
// adds stay fp32. A quantized layer whose input follows a ReLU quantizes it on the unsigned grid;
// one whose input can be negative (the normalised data, resnet20's bn_final output) on the signed
// grid.
//
// All parameters live in two flat arenas (values, gradients), in forward layer order, with per-
// parameter views; a gradient bucket is therefore a contiguous span (reverse order = from the end).
//
// A model on the GPU (train.device = cuda) is device-resident: its CUDA layers compute with device
// arenas of the same layout (device_values(), device_grads()) and keep the BatchNorm running
// statistics on the device, the optimizer steps the device arenas, and nothing moves between host
// and device per step. The host arenas and buffers() are copies, refreshed only where the host
// reads or writes them: to_host() before a checkpoint or a broadcast, to_device() after
// initialisation, a loaded checkpoint or a broadcast, buffers_to_host/device around the ranks'
// averaging. On the CPU every sync is a no-op.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/nn/layer.h"
#include "src/nn/quant_layers.h"

namespace int4ddp::nn {

struct ModelSpec {
  std::string name = "cnn";  // mlp | cnn | resnet20 | resnet18
  int64_t channels = 1, height = 28, width = 28;
  int64_t num_classes = 10;
  std::vector<int64_t> mlp_hidden = {512, 512};
  bool quantized = true;         // false: every layer fp32
  bool fp32_first = true;        // keep the first conv / linear fp32
  bool fp32_last = true;         // keep the classifier fp32
  bool signed_input = true;      // the input can be negative (normalised data): a quantized first
                                 // layer quantizes it on the signed grid
  QuantSpec quant;               // every quantized layer's (signed_input is set per layer)
  Device device = Device::kCpu;  // kCuda: the CUDA layers (layers_cuda.h, quant_layers_cuda.h)
};

class Model {
 public:
  // Builds the network and initialises it deterministically from seed (Kaiming normal weights).
  Model(const ModelSpec& spec, uint64_t seed);

  const ModelSpec& spec() const { return spec_; }
  // x may be a host tensor on either device (a model on the GPU copies it over on its stream; a
  // pinned x makes that copy asynchronous); logits are on the model's device.
  void forward(const Tensor& x, Tensor& logits, bool train);
  // Backward from dL/dlogits of the last forward; parameter gradients accumulate in the arena (on
  // the GPU: the device arena).
  // ready(offset), if given, is called during backward whenever every gradient at arena offset
  // >= offset is final (offsets descend; the last call has offset 0 or the first parameter's).
  // On the GPU the gradients are final on the compute stream when ready() is called: a consumer
  // on another stream waits for an event recorded there (comm/device_buckets.h).
  void backward(const Tensor& dlogits, const std::function<void(int64_t)>& ready = {});
  // Gradient tensors as (arena offset, count), in forward order.
  std::vector<std::pair<int64_t, int64_t>> param_segments() const;

  std::vector<Param*>& params() { return params_; }
  int64_t num_params() const { return static_cast<int64_t>(values_.size()); }
  float* values() { return values_.data(); }  // (num_params) fp32, all parameters, host
  float* grads() { return grads_.data(); }    // (num_params) fp32, all gradients, host
  // The device arenas of a model on the GPU, same layout as values() and grads(); null on the CPU.
  float* device_values() { return device_values_.numel() > 0 ? device_values_.data() : nullptr; }
  float* device_grads() { return device_grads_.numel() > 0 ? device_grads_.data() : nullptr; }
  // Zeroes the gradients where the model computes them (the device arena on the GPU).
  void zero_grad();

  // Host <-> device syncs of a model on the GPU (see the top of this file); no-ops on the CPU.
  void to_host();            // parameter values and BN statistics, device -> host
  void to_device();          // parameter values and BN statistics, host -> device
  void buffers_to_host();    // BN statistics only
  void buffers_to_device();  // BN statistics only
  void grads_to_host();      // the whole gradient arena, device -> host
  void grads_to_device();    // the whole gradient arena, host -> device
  // True when no gradient is NaN or +-Inf (on the GPU checked there; one flag is read back).
  bool grads_finite();
  // A copy of the BN statistics (on the model's device), and its restore: a skipped step must not
  // keep the statistics its training forward changed.
  void save_buffers();
  void restore_buffers();

  QuantContext& quant_context() { return ctx_; }
  const std::vector<QuantizedOp*>& quantized_ops() const { return qops_; }
  void commit_quant_step(bool apply = true);  // every layer's deferred interval-policy update
  bool needs_calibration() const;
  // BN running statistics, part of the model state (checkpoints) but not trainable.
  std::vector<std::vector<float>*> buffers() { return net_.buffers(); }
  // The top-level layers in forward order (tests walk them to check intermediate shapes).
  const Sequential& network() const { return net_; }
  // Largest input side (height or width) that resnet18 builds with the CIFAR-style stem.
  static constexpr int64_t kResNet18CifarStemMaxSide = 64;
  Device device() const { return spec_.device; }

 private:
  // A layer, quantized unless the spec says fp32 or keep_fp32; signed_input: its input can be
  // negative (the data, or a BatchNorm output without ReLU).
  std::unique_ptr<Layer> conv(const std::string& name, int64_t in, int64_t out, int k, int stride,
                              int pad, bool keep_fp32, bool signed_input = false);
  std::unique_ptr<Layer> linear(const std::string& name, int64_t in, int64_t out, bool keep_fp32,
                                bool signed_input = false);
  QuantSpec quant_spec(bool signed_input) const;
  void build_mlp();
  void build_cnn();
  void build_resnet20();
  void build_resnet18();
  void bind_arena(uint64_t seed);
  // The builder's hook for layers without parameters of their own kind: the CPU layer, or its CUDA
  // implementation for a model on the GPU.
  std::unique_ptr<Layer> relu(const std::string& name) const;
  std::unique_ptr<Layer> batchnorm(const std::string& name, int64_t channels, bool relu) const;
  // stride 0: the window (non-overlapping, the only max pool the CUDA layer has).
  std::unique_ptr<Layer> maxpool(const std::string& name, int window, int stride = 0,
                                 int pad = 0) const;
  std::unique_ptr<Layer> global_avgpool(const std::string& name) const;
  std::unique_ptr<Layer> residual_block(const std::string& name, std::unique_ptr<Layer> conv1,
                                        int64_t mid_channels, std::unique_ptr<Layer> conv2,
                                        int64_t in_channels, int64_t out_channels, int stride,
                                        std::unique_ptr<Layer> projection = nullptr) const;
  // A model on the GPU: device arenas of values_'s and grads_'s layout, the values uploaded.
  void bind_device_arena();
  // Every BN statistic as (host vector, device copy), in buffers() order.
  std::vector<std::pair<std::vector<float>*, float*>> buffer_pairs();

  ModelSpec spec_;
  QuantContext ctx_;
  Sequential net_{"model"};
  std::vector<Param*> params_;
  std::vector<float> values_, grads_;
  Tensor device_values_, device_grads_;            // (num_params) fp32, device; empty on the CPU
  std::vector<std::vector<float>> saved_buffers_;  // save_buffers()'s copy, CPU
  Tensor device_saved_buffers_;                    // save_buffers()'s copy, GPU (all, back to back)
  Tensor nonfinite_flag_;                          // grads_finite()'s int32 flag, GPU
  std::vector<QuantizedOp*> qops_;
  uint32_t next_layer_id_ = 0;
  Tensor input_;  // copy of the last forward's input (the first layer's backward reads it)
  std::vector<int64_t> ready_offset_;  // per top-level layer: lowest arena offset of it and after
};

}  // namespace int4ddp::nn
