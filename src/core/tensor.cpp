// Tensor helpers.
#include "src/core/tensor.h"

#include <algorithm>
#include <sstream>

namespace int4ddp {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ")";
  return os.str();
}

void Tensor::zero() {
  if (device_ == Device::kCpu)
    std::fill(data_, data_ + numel(), 0.0f);
  else
    zero_floats(data_, device_, numel());
}

void Tensor::resize(Shape shape, Device device) {
  if (device == Device::kCpu && !pinned_) {
    buffer_.reset();
    capacity_ = 0;
    device_ = Device::kCpu;
    resize(std::move(shape));
    return;
  }
  INT4DDP_CHECK(owned_ || data_ == nullptr, "tensor: cannot resize a view");
  for (int64_t d : shape) INT4DDP_CHECK(d >= 0, "tensor: negative dimension in ", shape_str(shape));
  const int64_t n = shape_numel(shape);
  if (!buffer_ || device != device_ || n > capacity_) {
    storage_ = std::vector<float>();
    buffer_ = allocate_floats(device, pinned_, n);
    capacity_ = n;
  }
  shape_ = std::move(shape);
  device_ = device;
  data_ = buffer_.get();
  owned_ = true;
}

void Tensor::resize_pinned(Shape shape) {
  if (!pinned_) {
    INT4DDP_CHECK(owned_ || data_ == nullptr, "tensor: cannot resize a view");
    buffer_.reset();
    pinned_ = true;
  }
  resize(std::move(shape), Device::kCpu);
}

void Tensor::copy_from(const Tensor& src) {
  if (data_ == nullptr && !owned_) device_ = src.device_;
  resize(src.shape());
  copy_floats(data_, device_, src.data(), src.device(), numel());
}

}  // namespace int4ddp
