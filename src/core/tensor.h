// Tensor: a shape and a pointer to fp32 data, either owned or a view into an arena (the flat
// parameter and gradient arenas of a model, so that a gradient bucket is one contiguous span).
// A tensor knows where its data lives (device(): host memory, or GPU memory for train.device =
// cuda); data() is then a device pointer, for CUDA code only. Host tensors keep their std::vector
// storage; device (and pinned host) storage comes from allocate_floats (src/core/device.h) and is
// shared, not copied, when a Tensor is copied.
// Layout is row-major NCHW: a (n, c, h, w) tensor is n*c*h*w floats with w fastest; a matrix is
// (rows, cols). Shapes use int64_t element counts throughout; bytes never appear here.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/error.h"
#include "src/core/device.h"

namespace int4ddp {

using Shape = std::vector<int64_t>;

inline int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape) { resize(std::move(shape)); }
  Tensor(std::initializer_list<int64_t> shape) : Tensor(Shape(shape)) {}
  Tensor(Shape shape, Device device) { resize(std::move(shape), device); }

  // A non-owning view of `data` (on `device`) with this shape.
  static Tensor view(float* data, Shape shape, Device device = Device::kCpu) {
    Tensor t;
    t.shape_ = std::move(shape);
    t.data_ = data;
    t.device_ = device;
    return t;
  }

  // Owned storage with this shape where the tensor lives (host for a fresh tensor; contents
  // unspecified after growth; zero on first allocation). Host storage never shrinks, so a tensor
  // that alternates between sizes (Sequential's gradient buffers) is not zero-filled again.
  void resize(Shape shape) {
    if (buffer_ || device_ != Device::kCpu) {
      resize(std::move(shape), device_);
      return;
    }
    INT4DDP_CHECK(owned_ || data_ == nullptr, "tensor: cannot resize a view");
    for (int64_t d : shape)
      INT4DDP_CHECK(d >= 0, "tensor: negative dimension in ", shape_str(shape));
    shape_ = std::move(shape);
    const size_t n = static_cast<size_t>(shape_numel(shape_));
    if (storage_.size() < n) storage_.resize(n);
    data_ = storage_.data();
    owned_ = true;
  }
  // Owned storage on `device` (moving there drops the contents). Device storage grows, never
  // shrinks, like the host vector's capacity.
  void resize(Shape shape, Device device);
  // Owned host storage in page-locked memory (CUDA builds), for asynchronous copies to the GPU.
  void resize_pinned(Shape shape);
  void zero();
  // Resizes to src's shape (staying on this tensor's device; a fresh tensor takes src's) and
  // copies src's data, across devices where they differ.
  void copy_from(const Tensor& src);
  Device device() const { return device_; }

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(static_cast<size_t>(i)); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  float* data() { return data_; }
  const float* data() const { return data_; }
  float& operator[](int64_t i) { return data_[i]; }
  float operator[](int64_t i) const { return data_[i]; }

 private:
  Shape shape_;
  float* data_ = nullptr;
  std::vector<float> storage_;     // host storage (the default)
  std::shared_ptr<float> buffer_;  // device or pinned host storage (capacity_ floats)
  int64_t capacity_ = 0;
  Device device_ = Device::kCpu;
  bool pinned_ = false;
  bool owned_ = false;
};

// A trainable parameter: value and gradient views into the model's arenas. `group` picks the
// optimizer: network weights go to SGD (momentum, weight decay when `decay`), quantizer step sizes
// (s_W, u_A) to Adam without decay (DESIGN.md section 3).
enum class ParamGroup : uint8_t { kWeights = 0, kQuantizer = 1 };

struct Param {
  std::string name;  // e.g. "conv2.weight"
  Shape shape;
  ParamGroup group = ParamGroup::kWeights;
  bool decay = true;  // weight decay applies (weights yes; biases, BN affine, quantizer steps no)
  Tensor value;       // view into the value arena once bound
  Tensor grad;        // view into the gradient arena once bound; accumulated with +=
  // A model on the GPU (train.device = cuda): views into its device arenas, the state its CUDA
  // layers and the optimizer work on (value and grad above are then host copies, synced by the
  // Model where the host reads or writes them: checkpoints, broadcasts, host buckets). Empty on
  // the CPU.
  Tensor device_value, device_grad;
};

}  // namespace int4ddp
