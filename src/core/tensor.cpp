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

void Tensor::zero() { std::fill(data_, data_ + numel(), 0.0f); }

}  // namespace int4ddp
