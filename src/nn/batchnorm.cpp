// BatchNorm (see layer.h), with an optional fused ReLU. Each channel's sums run on one thread in
// the fixed order of kernels/math/batchnorm.h (double lanes, samples in order), so results do not
// depend on the thread count or the instruction set. Forward: one pass for both moments, one for
// y; backward: one pass for both sums, one for dx.
#include "kernels/math/batchnorm.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/parallel.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

using math::ChannelRows;

// ---- BatchNorm ------------------------------------------------------------------------------

BatchNorm::BatchNorm(std::string name, int64_t channels, float momentum, float eps)
    : name_(std::move(name)), channels_(channels), momentum_(momentum), eps_(eps) {
  gamma_ = make_param(name_ + ".gamma", {channels}, false);
  beta_ = make_param(name_ + ".beta", {channels}, false);
  std::fill(gamma_.value.data(), gamma_.value.data() + channels, 1.0f);
  running_mean_.assign(static_cast<size_t>(channels), 0.0f);
  running_var_.assign(static_cast<size_t>(channels), 1.0f);
}

std::unique_ptr<BatchNorm> BatchNorm::with_relu(std::string name, int64_t channels) {
  auto bn = std::make_unique<BatchNorm>(std::move(name), channels);
  bn->relu_ = true;
  return bn;
}

std::vector<Param*> BatchNorm::params() { return {&gamma_, &beta_}; }

void BatchNorm::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(x.rank() >= 2 && x.dim(1) == channels_, name_, ": input ", shape_str(x.shape()),
                " does not have ", channels_, " channels");
  const int64_t n = x.dim(0), c = channels_, hw = n * c > 0 ? x.numel() / (n * c) : 0;
  y.resize(x.shape());
  mean_.resize(static_cast<size_t>(c));
  invstd_.resize(static_cast<size_t>(c));
  scale_.resize(static_cast<size_t>(c));
  shift_.resize(static_cast<size_t>(c));
  const double count = static_cast<double>(n * hw);
  const ChannelRows rows{n, hw, c * hw};
  // Channels in parallel: each channel's sums run on one thread in sample order (thread-count
  // independent, and the same as a one-thread loop).
  parallel_for(c, [&](int64_t ch) {
    const float* xc = x.data() + ch * hw;
    float mean, var;
    if (train) {
      // One pass for both moments, shifted by the channel's first value (see bn_moments).
      const double origin = n * hw > 0 ? static_cast<double>(xc[0]) : 0.0;
      const math::ChannelSums sums = math::bn_moments(xc, rows, origin);
      const double s = sums.first, s2 = sums.second;
      const double m = s / count;                   // mean - origin
      const double ss = std::max(0.0, s2 - s * m);  // sum of (x - mean)^2
      mean = static_cast<float>(origin + m);
      var = static_cast<float>(ss / count);
      const float unbiased = count > 1 ? static_cast<float>(ss / (count - 1)) : var;
      running_mean_[ch] = (1 - momentum_) * running_mean_[ch] + momentum_ * mean;
      running_var_[ch] = (1 - momentum_) * running_var_[ch] + momentum_ * unbiased;
    } else {
      mean = running_mean_[ch];
      var = running_var_[ch];
    }
    const float invstd = 1.0f / std::sqrt(var + eps_);
    const float g = gamma_.value[ch] * invstd, b = beta_.value[ch] - mean * g;
    mean_[ch] = mean;
    invstd_[ch] = invstd;
    scale_[ch] = g;
    shift_[ch] = b;
    math::bn_affine(xc, y.data() + ch * hw, rows, g, b, relu_);
  });
}

void BatchNorm::backward(const Tensor& x, const Tensor& /*y*/, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), c = channels_, hw = n * c > 0 ? x.numel() / (n * c) : 0;
  const double count = static_cast<double>(n * hw);
  const ChannelRows rows{n, hw, c * hw};
  if (dx) dx->resize(x.shape());
  parallel_for(c, [&](int64_t ch) {
    const float mean = mean_[ch], invstd = invstd_[ch];
    // With the fused ReLU the gradient reaching BN is dy where y > 0, else 0 (as the ReLU layer
    // would pass it); y > 0 exactly where x * scale + shift > 0 (the forward's float expression,
    // no contraction), so x and dy are the only streams read.
    const math::ReluMask relu{relu_, scale_[ch], shift_[ch]};
    const float* xc = x.data() + ch * hw;
    const float* dyc = dy.data() + ch * hw;
    const math::ChannelSums sums = math::bn_grad_moments(dyc, xc, rows, mean, relu);
    const double sdy = sums.first, sdy_xhat = invstd * sums.second;
    gamma_.grad[ch] += static_cast<float>(sdy_xhat);
    beta_.grad[ch] += static_cast<float>(sdy);
    if (!dx) return;
    // Training-mode gradient: dx = g * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
    // = g * dy - (x - mean) * k - g * mean(dy) with k = g * invstd * mean(dy * xhat).
    const float g = gamma_.value[ch] * invstd;
    const float gmdy = static_cast<float>(g * (sdy / count));
    const float k = static_cast<float>(g * invstd * (sdy_xhat / count));
    math::bn_input_grad(xc, dyc, dx->data() + ch * hw, rows, {g, mean, k, gmdy, relu});
  });
}

}  // namespace int4ddp::nn
