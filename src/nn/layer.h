// Layers of the trainer: forward and backward on NCHW fp32 tensors.
//
// Contract of every layer:
//   forward(x, y, train)      y is resized by the layer; train selects batch statistics (BN) and
//                             caches what backward needs.
//   backward(x, y, dy, dx)    x and y are the tensors of the last forward; dx is resized by the
//                             layer (skipped when dx == nullptr: the model's first layer);
//                             parameter gradients are ACCUMULATED (+=) into Param::grad, so the
//                             trainer zeroes the gradient arena once per step.
//   params()                  the layer's parameters, in a fixed order (the arena order).
// Layers own their caches but not their inputs/outputs: the model keeps the activations.
//
// Threads: layers run their per-sample work with parallel_for (kernels/common/parallel.h) over the
// batch's fixed parts (BatchParts), never over a split that depends on the thread count. Every
// reduction over the batch (dW, BatchNorm sums, quantizer statistics) is either computed in one
// fixed order by one thread (e.g. per channel) or kept as one partial per part and summed in part
// order, so outputs and gradients are bit-identical for every train.threads.
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/math/conv3x3.h"
#include "src/core/tensor.h"

namespace int4ddp::nn {

// The fixed partition of a batch of n samples into parts of kSamples samples (the last one
// shorter): the work items of the layers' parallel loops and the unit of their partial sums.
struct BatchParts {
  static constexpr int64_t kSamples = 8;
  int64_t n;
  int64_t count() const { return (n + kSamples - 1) / kSamples; }
  int64_t begin(int64_t p) const { return p * kSamples; }
  int64_t end(int64_t p) const { return std::min(n, (p + 1) * kSamples); }
};

// v's storage for at least n elements: grows, never shrinks, so reused scratch is not refilled.
template <typename T>
T* grow_scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}
// A float scratch vector's storage for at least n elements of T (float, or int8_t / uint8_t codes,
// which may alias any storage): byte code buffers reuse the same per-thread scratch.
template <typename T>
T* grow_scratch_as(std::vector<float>& v, int64_t n) {
  static_assert(std::is_same_v<T, float> || sizeof(T) == 1, "float or byte elements only");
  const int64_t floats =
      (n * int64_t{sizeof(T)} + int64_t{sizeof(float)} - 1) / int64_t{sizeof(float)};
  return reinterpret_cast<T*>(grow_scratch(v, floats));
}

// parts[j] = ((parts[j] + parts[size + j]) + parts[2 * size + j]) + ...: count partials of size
// floats, summed in part order into the first one (elements in parallel).
void sum_parts(float* parts, int64_t count, int64_t size);

// body(s0, s1) for every part [s0, s1) of a batch of n samples (BatchParts), in parallel.
void for_parts(int64_t n, const std::function<void(int64_t, int64_t)>& body);

// body(j0, j1) for the fixed blocks [j0, j1) of a GEMM's feature dimension dim (a function of dim
// only), in parallel: the work items of Linear and QLinear.
void for_feature_blocks(int64_t dim, const std::function<void(int64_t, int64_t)>& body);

// A parameter of the given shape, value and gradient zero (Param::decay: weight decay applies).
Param make_param(const std::string& name, Shape shape, bool decay);

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string name() const = 0;
  virtual void forward(const Tensor& x, Tensor& y, bool train) = 0;
  virtual void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) = 0;
  virtual std::vector<Param*> params() { return {}; }
  // Non-trainable state that belongs to the model (BatchNorm running statistics), in a fixed order.
  virtual std::vector<std::vector<float>*> buffers() { return {}; }
  // A CUDA layer's device copies of buffers(), in the same order and sizes: the state it computes
  // with. The model copies them to and from the host vectors where those are read or written
  // (checkpoints, rank averaging). Empty for host layers.
  virtual std::vector<float*> device_buffers() { return {}; }

  // Called by backward as soon as this layer's parameter gradients are final, which may be before
  // it computes dx (Linear does so between its weight and its input gradient), so that the gradient
  // buckets can start all-reducing them while dx is computed. Set by Sequential for its backward
  // hook; a layer that never calls it is signalled after its backward instead. Calling it twice is
  // harmless.
  void set_params_ready(std::function<void()> f) { params_ready_ = std::move(f); }

 protected:
  void params_ready() const {
    if (params_ready_) params_ready_();
  }

 private:
  std::function<void()> params_ready_;
};

// y = x W^T + b; x (n, in) or any (n, ...) flattened to in features; W (out, in).
class Linear : public Layer {
 public:
  Linear(std::string name, int64_t in, int64_t out, bool bias = true);
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;
  Param& weight() { return weight_; }
  Param& bias() { return bias_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

 protected:
  std::string name_;
  int64_t in_, out_;
  bool has_bias_;
  Param weight_, bias_;
};

// 2-D convolution, square kernel, im2col + GEMM over groups of samples (see conv2d.cpp).
// W (out, in, k, k), optional bias.
class Conv2d : public Layer {
 public:
  Conv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
         bool bias = false);
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;
  Param& weight() { return weight_; }
  int64_t out_size(int64_t in_size) const { return (in_size + 2 * pad_ - kernel_) / stride_ + 1; }
  // Bytes of im2col columns per group of samples (default 512 KiB); results do not depend on it
  // beyond float rounding. Tests set it small to cover several groups and a partial last one.
  void set_column_bytes(int64_t bytes);
  // The direct 3x3 convolution (kernels/math/conv3x3.h) for kernel 3, stride 1, pad 1 where a
  // vector path of it runs (fp32: AVX2 or AVX-512; the quantized layers: AVX-512 only) (on by
  // default; tests turn it off to cover the im2col + GEMM path).
  void set_direct_conv(bool on) { direct_conv_ = on; }

 protected:
  bool direct3x3_fp32() const;  // fp32 Conv2d: the direct path with AVX2 or AVX-512
  bool direct3x3() const;       // QConv2d: the direct path with AVX-512
  // The im2col + GEMM path of backward over groups of samples, shared by Conv2d and QConv2d
  // (defined in conv2d_groups.h, which documents Products). x (n, in, h, w), dy (n, out, ho, wo)
  // and weights (out, in, k, k) are fp32 values or integer codes (int8_t / uint8_t, each operand
  // its own type); dx (n, in, h, w) is written when not null. Products computes the GEMMs and sums
  // each batch part's dW. Returns true when dW came with its taps flipped (the transposed form,
  // dx_by_transposed_conv(): dWt (in, out*k*k), see flipped_index), false for dW (out, in*k*k).
  template <typename Products, typename TX, typename TD, typename TW>
  bool backward_by_groups(int64_t n, int64_t h, int64_t w, const TX* x, const TD* dy,
                          const TW* weights, float* dx, Products& products);
  // weight grad += the sum, in part order, of the first `count` (out, in*k*k) partials of
  // dw_parts_ (the dW of each batch part).
  void add_dw_parts(int64_t count);
  // Samples per group for a (rows, cols)-per-sample column matrix: the group's columns fit the
  // column-buffer budget; at least 1, at most n.
  int64_t group_size(int64_t n, int64_t rows, int64_t cols) const;
  // col (in*k*k, g*ho*wo) of samples s0..s0+g-1 of images (n, in, h, w), sample s at column offset
  // s*ho*wo; and its adjoint, accumulated (+=) into images. The templates here take float values
  // or int8_t / uint8_t codes (instantiated in conv2d.cpp).
  template <typename T>
  void im2col(const T* images, int64_t s0, int64_t g, int64_t h, int64_t w, T* col) const;
  void col2im(const float* col, int64_t s0, int64_t g, int64_t h, int64_t w, float* images) const;
  // dx can be computed as a convolution of dy (stride 1 and pad <= k - 1): then dx_g (in, g*h*w)
  // = flip_weight(W) (in, out*k*k) dy_im2col(dy) (out*k*k, g*h*w), and dW from the same columns:
  // dWt (in, out*k*k) = x_g (in, g*h*w) dy_im2col(dy)^T, taps flipped. h, w are the INPUT's size.
  bool dx_by_transposed_conv() const;
  template <typename T>
  void dy_im2col(const T* dy, int64_t s0, int64_t g, int64_t h, int64_t w, T* col) const;
  // wt (in, out, k, k)[c, o, k-1-ky, k-1-kx] = w (out, in, k, k)[o, c, ky, kx]; flipped_index is
  // the flat index into wt of w's element (o, c, ky, kx).
  template <typename T>
  void flip_weight(const T* w, T* wt) const;
  int64_t flipped_index(int64_t o, int64_t c, int ky, int kx) const {
    return ((c * out_ + o) * kernel_ + (kernel_ - 1 - ky)) * kernel_ + (kernel_ - 1 - kx);
  }
  // Between a group's (rows, g*hw) matrix and samples s0..s0+g-1 of an (n, rows, hw) tensor.
  template <typename T>
  static void gather_group(const T* src, int64_t s0, int64_t g, int64_t rows, int64_t hw, T* dst);
  static void scatter_group(const float* src, int64_t s0, int64_t g, int64_t rows, int64_t hw,
                            float* dst);

  // Per-thread scratch of one group (the column matrices and gathered group operands), shared by
  // every convolution of the thread and kept across calls: a fresh buffer per step page-faults,
  // and one set for all layers stays in cache. Only grows. The quantized layers keep byte codes in
  // the same storage (grow_scratch_as).
  struct GroupScratch {
    std::vector<float> col;   // (in*k*k, g*ho*wo) im2col of x
    std::vector<float> dcol;  // (in*k*k, g*ho*wo) W^T dy, or (out*k*k, g*h*w) im2col of dy
    std::vector<float> out;   // (out, g*ho*wo) a group's y or dy
    std::vector<float> in;    // (in, g*h*w) a group's dx
    std::vector<float> x;     // (in, g*h*w) a group's x
    std::vector<float> dw;    // (weight size) a group's dW codes product (quantized layers)
  };
  static GroupScratch& group_scratch();
  // Samples per group within a part of the batch (group_size capped at the part size).
  int64_t part_group_size(int64_t n, int64_t rows, int64_t cols) const;

  std::string name_;
  int64_t in_, out_;
  int kernel_, stride_, pad_;
  bool has_bias_;
  int64_t column_bytes_;
  Param weight_, bias_;
  std::vector<float> dw_parts_;  // (parts, weight size) dW (or dW with flipped taps) of each part
  std::vector<float> wt_;        // (in, out*k*k) flipped weights (storage of float or byte codes)
  bool direct_conv_ = true;
  math::Conv3x3Weights w3_;                  // direct path: the weights (or codes) packed
  std::vector<math::Conv3x3WeightGrad> g3_;  // direct path: dW sum of each batch part
};

// Batch normalisation over (n, h, w) per channel c of an (n, c, h, w) or (n, c) tensor.
class BatchNorm : public Layer {
 public:
  BatchNorm(std::string name, int64_t channels, float momentum = 0.1f, float eps = 1e-5f);
  // BatchNorm followed by ReLU as one layer, y = max(0, BN(x)): bit-identical to the two layers,
  // without the ReLU's pass over the activations (and its tensor) in forward and backward.
  static std::unique_ptr<BatchNorm> with_relu(std::string name, int64_t channels);
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;
  std::vector<float>& running_mean() { return running_mean_; }
  std::vector<float>& running_var() { return running_var_; }
  std::vector<std::vector<float>*> buffers() override { return {&running_mean_, &running_var_}; }

 private:
  std::string name_;
  int64_t channels_;
  float momentum_, eps_;
  bool relu_ = false;  // fused ReLU (with_relu)
  Param gamma_, beta_;
  std::vector<float> running_mean_, running_var_;
  // (channels) each, of the last forward: its statistics (batch or running), and its scale and
  // shift, y = x * scale + shift (then max(0, .) with the fused ReLU).
  std::vector<float> mean_, invstd_, scale_, shift_;
};

class ReLU : public Layer {
 public:
  explicit ReLU(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;

 private:
  std::string name_;
};

// Max pooling, square window: output size (h + 2 pad - window) / stride + 1 (floor, as PyTorch's
// default ceil_mode = false); padding never wins (it counts as -inf) and a NaN in a window is its
// maximum (propagated, not dropped). The first maximum of each window wins ties; its index is
// cached for backward, which adds dy to it (overlapping windows, stride < window, add in a fixed
// order).
class MaxPool2d : public Layer {
 public:
  // stride = window, no padding.
  MaxPool2d(std::string name, int window) : MaxPool2d(std::move(name), window, window, 0) {}
  // pad <= window / 2 (so every window holds an input element), stride >= 1.
  MaxPool2d(std::string name, int window, int stride, int pad);
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  int64_t out_size(int64_t in_size) const { return (in_size + 2 * pad_ - window_) / stride_ + 1; }
  // forward through the plain scan for every geometry: the reference of forward's fast path for
  // window 2, stride 2, no padding (the same y, and the same argmax for backward).
  void forward_reference(const Tensor& x, Tensor& y);

 private:
  void size_outputs(const Tensor& x, Tensor& y);    // checks x; sizes y and argmax_
  void scan_reference(const Tensor& x, Tensor& y);  // the plain scan, any geometry
  void forward_2x2(const Tensor& x, Tensor& y);     // window 2, stride 2, no padding
  std::string name_;
  int window_, stride_, pad_;
  // (n, c, ho, wo): the index of each output's maximum in its (h, w) input plane.
  std::vector<int32_t> argmax_;
};

// (n, c, h, w) -> (n, c): mean over h, w.
class GlobalAvgPool : public Layer {
 public:
  explicit GlobalAvgPool(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;

 private:
  std::string name_;
};

// Runs layers in order, keeping every intermediate activation for backward.
class Sequential : public Layer {
 public:
  explicit Sequential(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  Layer& add(std::unique_ptr<Layer> layer);
  void forward(const Tensor& x, Tensor& y, bool train) override;
  // forward without copying the result out: the last layer's output, valid until the next forward.
  // (backward does not read its y argument, so this output can be passed back as y.)
  const Tensor& forward_output(const Tensor& x, bool train);
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  std::vector<Param*> params() override;
  std::vector<std::vector<float>*> buffers() override;
  std::vector<float*> device_buffers() override;
  const std::vector<std::unique_ptr<Layer>>& layers() const { return layers_; }
  // Called when layers_[i]'s parameter gradients are final (i descending: from the layer's
  // params_ready() where it signals one, and again after its backward, so a repeat must be a
  // no-op), so every gradient of layers i.. is then final; empty = none.
  void set_backward_hook(std::function<void(size_t)> hook) { hook_ = std::move(hook); }

 private:
  std::function<void(size_t)> hook_;
  std::string name_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<Tensor> acts_;   // acts_[i] = output of layers_[i] (the last one is copied to y)
  std::vector<Tensor> grads_;  // scratch gradients
};

// ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)). Without a projection
// the shortcut is option A (CIFAR ResNet): the identity, or for stride 2 / more channels: subsample
// by 2 and zero-pad the extra channels (no parameters). With a projection (option B, torchvision's
// downsample) the shortcut is bn_s(projection(x)), projection a 1x1 convolution with the block's
// stride from in_channels to out_channels; its BatchNorm is made here (name.shortcut.bn).
class ResidualBlock : public Layer {
 public:
  ResidualBlock(std::string name, std::unique_ptr<Layer> conv1, int64_t mid_channels,
                std::unique_ptr<Layer> conv2, int64_t in_channels, int64_t out_channels, int stride,
                std::unique_ptr<Layer> projection = nullptr);
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool train) override;
  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override;
  // The body's, then the projection shortcut's (if any).
  std::vector<Param*> params() override;
  std::vector<std::vector<float>*> buffers() override;
  bool has_projection() const { return !shortcut_.layers().empty(); }

 private:
  std::string name_;
  Sequential body_;
  Sequential shortcut_;  // empty: option A
  int64_t in_channels_, out_channels_;
  int stride_;
  // The body's and the projection shortcut's outputs of the last forward (their Sequentials' last
  // activations, not copies).
  const Tensor* body_out_ = nullptr;
  const Tensor* shortcut_out_ = nullptr;
  Tensor dsum_;       // dL/d(body + shortcut), reused across steps
  Tensor dshortcut_;  // projection shortcut: its dx
};

// Mean softmax cross-entropy over the batch; logits (n, classes), labels in 0..classes-1.
// Returns the loss and writes dlogits (already divided by n) and the number of correct argmaxes.
float softmax_cross_entropy(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                            int64_t* correct);

// Where a step's time goes, by layer type (bench_train --profile). While enabled, Sequential times
// each of its layers' forward and backward under the layer's type ("BatchNorm fwd"), the quantized
// layers time their quantizer passes under their own keys ("quant: grad codes"), and callers may
// add scopes of their own ("optimizer"). Times are wall-clock and exclusive: a scope nested in
// another is not counted again in the outer one (a ResidualBlock's own time is its add, ReLU and
// shortcut). Scopes must open and close on the thread that runs the step (a parallel loop inside a
// scope is counted whole). Off by default, when a scope costs one branch.
namespace profile {
void enable(bool on);
bool enabled();
void reset();  // forget the times so far
struct Entry {
  std::string key;
  double seconds;  // exclusive wall-clock time
  int64_t calls;
};
std::vector<Entry> entries();  // largest time first
class Scope {
 public:
  explicit Scope(const char* key);          // a fixed key
  Scope(const Layer& layer, bool forward);  // "<layer type> fwd" / "<layer type> bwd"
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void open(std::string key);
  bool active_ = false;
};
}  // namespace profile

}  // namespace int4ddp::nn
