// Tensor: a shape and a pointer to fp32 data, either owned or a view into an arena (the flat
// parameter and gradient arenas of a model, so that a gradient bucket is one contiguous span).
// Layout is row-major NCHW: a (n, c, h, w) tensor is n*c*h*w floats with w fastest; a matrix is
// (rows, cols). Shapes use int64_t element counts throughout; bytes never appear here.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/common/error.h"

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

  // A non-owning view of `data` with this shape.
  static Tensor view(float* data, Shape shape) {
    Tensor t;
    t.shape_ = std::move(shape);
    t.data_ = data;
    return t;
  }

  // Owned storage with this shape (contents unspecified after growth; zero on first allocation).
  void resize(Shape shape) {
    INT4DDP_CHECK(owned_ || data_ == nullptr, "tensor: cannot resize a view");
    for (int64_t d : shape)
      INT4DDP_CHECK(d >= 0, "tensor: negative dimension in ", shape_str(shape));
    shape_ = std::move(shape);
    storage_.resize(static_cast<size_t>(shape_numel(shape_)));
    data_ = storage_.data();
    owned_ = true;
  }
  void zero();

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
  std::vector<float> storage_;
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
};

}  // namespace int4ddp
