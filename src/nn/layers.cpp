// fp32 layers (see layer.h for the contract). Parameters are accumulated (+=) in backward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/math/gemm.h"
#include "src/nn/layer.h"

namespace int4ddp::nn {

using math::sgemm;
using math::Trans;

namespace {

Param make_param(const std::string& name, Shape shape, bool decay) {
  Param p;
  p.name = name;
  p.shape = shape;
  p.decay = decay;
  p.value = Tensor(shape);
  p.grad = Tensor(shape);
  return p;
}

int64_t features_of(const Tensor& x) { return x.rank() == 0 ? 0 : x.numel() / x.dim(0); }

// Reductions for BatchNorm and pooling: 8 independent double accumulators in a fixed order, so the
// sum is deterministic yet not one latency-bound chain (a single double accumulator cannot be
// vectorised without reassociation, and was 20% of a cnn training step).
constexpr int kLanes = 8;

struct Sums {
  double a[kLanes] = {};
  double total() const { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }
};

// s += x[j] and s2 += (x[j] - mean)^2 in double (mean_known: only s2).
void accumulate_moments(const float* x, int64_t n, float mean, Sums* s, Sums* s2) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      if (s) s->a[l] += x[j + l];
      if (s2) {
        const double d = static_cast<double>(x[j + l] - mean);
        s2->a[l] += d * d;
      }
    }
  for (int l = 0; j < n; ++j, ++l) {
    if (s) s->a[l] += x[j];
    if (s2) {
      const double d = static_cast<double>(x[j] - mean);
      s2->a[l] += d * d;
    }
  }
}

}  // namespace

// ---- Linear ---------------------------------------------------------------------------------

Linear::Linear(std::string name, int64_t in, int64_t out, bool bias)
    : name_(std::move(name)), in_(in), out_(out), has_bias_(bias) {
  INT4DDP_CHECK(in > 0 && out > 0, name_, ": features must be positive");
  weight_ = make_param(name_ + ".weight", {out, in}, true);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {out}, false);
}

std::vector<Param*> Linear::params() {
  if (has_bias_) return {&weight_, &bias_};
  return {&weight_};
}

void Linear::forward(const Tensor& x, Tensor& y, bool) {
  const int64_t n = x.dim(0);
  INT4DDP_CHECK(features_of(x) == in_, name_, ": input ", shape_str(x.shape()), " has ",
                features_of(x), " features, expected ", in_);
  y.resize({n, out_});
  sgemm(Trans::kNo, Trans::kYes, n, out_, in_, 1.0f, x.data(), in_, weight_.value.data(), in_, 0.0f,
        y.data(), out_);
  if (has_bias_)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out_; ++j) y[i * out_ + j] += bias_.value[j];
}

void Linear::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0);
  // dW (out, in) += dy^T (out, n) x (n, in)
  sgemm(Trans::kYes, Trans::kNo, out_, in_, n, 1.0f, dy.data(), out_, x.data(), in_, 1.0f,
        weight_.grad.data(), in_);
  if (has_bias_)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out_; ++j) bias_.grad[j] += dy[i * out_ + j];
  if (dx) {
    dx->resize(x.shape());
    sgemm(Trans::kNo, Trans::kNo, n, in_, out_, 1.0f, dy.data(), out_, weight_.value.data(), in_,
          0.0f, dx->data(), in_);
  }
}

// ---- Conv2d ---------------------------------------------------------------------------------

Conv2d::Conv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
               bool bias)
    : name_(std::move(name)),
      in_(in),
      out_(out),
      kernel_(kernel),
      stride_(stride),
      pad_(pad),
      has_bias_(bias) {
  INT4DDP_CHECK(in > 0 && out > 0 && kernel > 0 && stride > 0 && pad >= 0, name_,
                ": bad convolution geometry");
  weight_ = make_param(name_ + ".weight", {out, in, kernel, kernel}, true);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {out}, false);
}

std::vector<Param*> Conv2d::params() {
  if (has_bias_) return {&weight_, &bias_};
  return {&weight_};
}

void Conv2d::im2col(const float* image, int64_t h, int64_t w, float* col) const {
  const int64_t ho = out_size(h), wo = out_size(w);
  for (int64_t c = 0; c < in_; ++c)
    for (int ky = 0; ky < kernel_; ++ky)
      for (int kx = 0; kx < kernel_; ++kx) {
        float* row = col + ((c * kernel_ + ky) * kernel_ + kx) * ho * wo;
        for (int64_t oy = 0; oy < ho; ++oy) {
          const int64_t iy = oy * stride_ - pad_ + ky;
          for (int64_t ox = 0; ox < wo; ++ox) {
            const int64_t ix = ox * stride_ - pad_ + kx;
            row[oy * wo + ox] =
                (iy >= 0 && iy < h && ix >= 0 && ix < w) ? image[(c * h + iy) * w + ix] : 0.0f;
          }
        }
      }
}

void Conv2d::col2im(const float* col, int64_t h, int64_t w, float* image) const {
  const int64_t ho = out_size(h), wo = out_size(w);
  for (int64_t c = 0; c < in_; ++c)
    for (int ky = 0; ky < kernel_; ++ky)
      for (int kx = 0; kx < kernel_; ++kx) {
        const float* row = col + ((c * kernel_ + ky) * kernel_ + kx) * ho * wo;
        for (int64_t oy = 0; oy < ho; ++oy) {
          const int64_t iy = oy * stride_ - pad_ + ky;
          if (iy < 0 || iy >= h) continue;
          for (int64_t ox = 0; ox < wo; ++ox) {
            const int64_t ix = ox * stride_ - pad_ + kx;
            if (ix >= 0 && ix < w) image[(c * h + iy) * w + ix] += row[oy * wo + ox];
          }
        }
      }
}

void Conv2d::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == in_, name_, ": input ", shape_str(x.shape()),
                " is not (n, ", in_, ", h, w)");
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = out_size(h), wo = out_size(w), ckk = in_ * kernel_ * kernel_;
  INT4DDP_CHECK(ho > 0 && wo > 0, name_, ": input ", shape_str(x.shape()), " is too small");
  y.resize({n, out_, ho, wo});
  col_.resize(static_cast<size_t>(ckk * ho * wo));
  for (int64_t s = 0; s < n; ++s) {
    im2col(x.data() + s * in_ * h * w, h, w, col_.data());
    float* ys = y.data() + s * out_ * ho * wo;
    sgemm(Trans::kNo, Trans::kNo, out_, ho * wo, ckk, 1.0f, weight_.value.data(), ckk, col_.data(),
          ho * wo, 0.0f, ys, ho * wo);
    if (has_bias_)
      for (int64_t o = 0; o < out_; ++o)
        for (int64_t p = 0; p < ho * wo; ++p) ys[o * ho * wo + p] += bias_.value[o];
  }
}

void Conv2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = y.dim(2), wo = y.dim(3), ckk = in_ * kernel_ * kernel_;
  col_.resize(static_cast<size_t>(ckk * ho * wo));
  dcol_.resize(col_.size());
  if (dx) {
    dx->resize(x.shape());
    dx->zero();
  }
  for (int64_t s = 0; s < n; ++s) {
    const float* dys = dy.data() + s * out_ * ho * wo;
    im2col(x.data() + s * in_ * h * w, h, w, col_.data());
    // dW (out, ckk) += dy_s (out, hw) col^T (hw, ckk)
    sgemm(Trans::kNo, Trans::kYes, out_, ckk, ho * wo, 1.0f, dys, ho * wo, col_.data(), ho * wo,
          1.0f, weight_.grad.data(), ckk);
    if (has_bias_)
      for (int64_t o = 0; o < out_; ++o)
        for (int64_t p = 0; p < ho * wo; ++p) bias_.grad[o] += dys[o * ho * wo + p];
    if (dx) {
      // dcol (ckk, hw) = W^T (ckk, out) dy_s (out, hw)
      sgemm(Trans::kYes, Trans::kNo, ckk, ho * wo, out_, 1.0f, weight_.value.data(), ckk, dys,
            ho * wo, 0.0f, dcol_.data(), ho * wo);
      col2im(dcol_.data(), h, w, dx->data() + s * in_ * h * w);
    }
  }
}

// ---- BatchNorm ------------------------------------------------------------------------------

BatchNorm::BatchNorm(std::string name, int64_t channels, float momentum, float eps)
    : name_(std::move(name)), channels_(channels), momentum_(momentum), eps_(eps) {
  gamma_ = make_param(name_ + ".gamma", {channels}, false);
  beta_ = make_param(name_ + ".beta", {channels}, false);
  std::fill(gamma_.value.data(), gamma_.value.data() + channels, 1.0f);
  running_mean_.assign(static_cast<size_t>(channels), 0.0f);
  running_var_.assign(static_cast<size_t>(channels), 1.0f);
}

std::vector<Param*> BatchNorm::params() { return {&gamma_, &beta_}; }

void BatchNorm::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(x.rank() >= 2 && x.dim(1) == channels_, name_, ": input ", shape_str(x.shape()),
                " does not have ", channels_, " channels");
  const int64_t n = x.dim(0), c = channels_, hw = x.numel() / (n * c);
  y.resize(x.shape());
  mean_.assign(static_cast<size_t>(c), 0.0f);
  invstd_.assign(static_cast<size_t>(c), 0.0f);
  const double count = static_cast<double>(n * hw);
  for (int64_t ch = 0; ch < c; ++ch) {
    float mean, var;
    if (train) {
      Sums sum, sum2;
      for (int64_t i = 0; i < n; ++i)
        accumulate_moments(x.data() + (i * c + ch) * hw, hw, 0.0f, &sum, nullptr);
      const double s = sum.total();
      mean = static_cast<float>(s / count);
      for (int64_t i = 0; i < n; ++i)
        accumulate_moments(x.data() + (i * c + ch) * hw, hw, mean, nullptr, &sum2);
      const double s2 = sum2.total();
      var = static_cast<float>(s2 / count);
      const float unbiased = count > 1 ? static_cast<float>(s2 / (count - 1)) : var;
      running_mean_[ch] = (1 - momentum_) * running_mean_[ch] + momentum_ * mean;
      running_var_[ch] = (1 - momentum_) * running_var_[ch] + momentum_ * unbiased;
    } else {
      mean = running_mean_[ch];
      var = running_var_[ch];
    }
    const float invstd = 1.0f / std::sqrt(var + eps_);
    mean_[ch] = mean;
    invstd_[ch] = invstd;
    const float g = gamma_.value[ch] * invstd, b = beta_.value[ch] - mean * g;
    for (int64_t i = 0; i < n; ++i) {
      const float* p = x.data() + (i * c + ch) * hw;
      float* q = y.data() + (i * c + ch) * hw;
      for (int64_t j = 0; j < hw; ++j) q[j] = p[j] * g + b;
    }
  }
}

void BatchNorm::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), c = channels_, hw = x.numel() / (n * c);
  const double count = static_cast<double>(n * hw);
  if (dx) dx->resize(x.shape());
  for (int64_t ch = 0; ch < c; ++ch) {
    const float mean = mean_[ch], invstd = invstd_[ch];
    Sums a, b;
    for (int64_t i = 0; i < n; ++i) {
      const float* p = x.data() + (i * c + ch) * hw;
      const float* d = dy.data() + (i * c + ch) * hw;
      int64_t j = 0;
      for (; j + kLanes <= hw; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          a.a[l] += d[j + l];
          b.a[l] += d[j + l] * static_cast<double>((p[j + l] - mean) * invstd);
        }
      for (int l = 0; j < hw; ++j, ++l) {
        a.a[l] += d[j];
        b.a[l] += d[j] * static_cast<double>((p[j] - mean) * invstd);
      }
    }
    const double sdy = a.total(), sdy_xhat = b.total();
    gamma_.grad[ch] += static_cast<float>(sdy_xhat);
    beta_.grad[ch] += static_cast<float>(sdy);
    if (!dx) continue;
    // Training-mode gradient: dx = g * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    const float g = gamma_.value[ch] * invstd;
    const float mdy = static_cast<float>(sdy / count), mdyx = static_cast<float>(sdy_xhat / count);
    for (int64_t i = 0; i < n; ++i) {
      const float* p = x.data() + (i * c + ch) * hw;
      const float* d = dy.data() + (i * c + ch) * hw;
      float* q = dx->data() + (i * c + ch) * hw;
      for (int64_t j = 0; j < hw; ++j) q[j] = g * (d[j] - mdy - (p[j] - mean) * invstd * mdyx);
    }
  }
}

// ---- ReLU, pooling --------------------------------------------------------------------------

void ReLU::forward(const Tensor& x, Tensor& y, bool) {
  y.resize(x.shape());
  const float* __restrict in = x.data();
  float* __restrict out = y.data();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
}

void ReLU::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  dx->resize(x.shape());
  const float* __restrict in = x.data();
  const float* __restrict g = dy.data();
  float* __restrict out = dx->data();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] > 0.0f ? g[i] : 0.0f;
}

void MaxPool2d::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not NCHW");
  const int64_t nc = x.dim(0) * x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t ho = h / window_, wo = w / window_;
  INT4DDP_CHECK(ho > 0 && wo > 0, name_, ": input ", shape_str(x.shape()), " is too small");
  y.resize({x.dim(0), x.dim(1), ho, wo});
  argmax_.resize(static_cast<size_t>(nc * ho * wo));
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t oy = 0; oy < ho; ++oy)
      for (int64_t ox = 0; ox < wo; ++ox) {
        float best = -std::numeric_limits<float>::infinity();
        int32_t arg = static_cast<int32_t>((oy * window_) * w + ox * window_);
        for (int dy = 0; dy < window_; ++dy)
          for (int dx = 0; dx < window_; ++dx) {
            const int32_t idx = static_cast<int32_t>((oy * window_ + dy) * w + ox * window_ + dx);
            const float v = x[p * h * w + idx];
            if (v > best) best = v, arg = idx;
          }
        y[(p * ho + oy) * wo + ox] = best;
        argmax_[static_cast<size_t>((p * ho + oy) * wo + ox)] = arg;
      }
}

void MaxPool2d::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  const int64_t nc = x.dim(0) * x.dim(1), hw = x.dim(2) * x.dim(3);
  const int64_t howo = y.dim(2) * y.dim(3);
  dx->resize(x.shape());
  dx->zero();
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t o = 0; o < howo; ++o)
      (*dx)[p * hw + argmax_[static_cast<size_t>(p * howo + o)]] += dy[p * howo + o];
}

void GlobalAvgPool::forward(const Tensor& x, Tensor& y, bool) {
  INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not NCHW");
  const int64_t nc = x.dim(0) * x.dim(1), hw = x.dim(2) * x.dim(3);
  y.resize({x.dim(0), x.dim(1)});
  for (int64_t p = 0; p < nc; ++p) {
    double s = 0.0;
    for (int64_t j = 0; j < hw; ++j) s += x[p * hw + j];
    y[p] = static_cast<float>(s / static_cast<double>(hw));
  }
}

void GlobalAvgPool::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  if (!dx) return;
  const int64_t nc = x.dim(0) * x.dim(1), hw = x.dim(2) * x.dim(3);
  dx->resize(x.shape());
  const float inv = 1.0f / static_cast<float>(hw);
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t j = 0; j < hw; ++j) (*dx)[p * hw + j] = dy[p] * inv;
}

// ---- Sequential -----------------------------------------------------------------------------

Layer& Sequential::add(std::unique_ptr<Layer> layer) {
  layers_.push_back(std::move(layer));
  return *layers_.back();
}

std::vector<Param*> Sequential::params() {
  std::vector<Param*> out;
  for (auto& l : layers_)
    for (Param* p : l->params()) out.push_back(p);
  return out;
}

std::vector<std::vector<float>*> Sequential::buffers() {
  std::vector<std::vector<float>*> out;
  for (auto& l : layers_)
    for (std::vector<float>* b : l->buffers()) out.push_back(b);
  return out;
}

void Sequential::forward(const Tensor& x, Tensor& y, bool train) {
  INT4DDP_CHECK(!layers_.empty(), name_, ": no layers");
  acts_.resize(layers_.size());
  const Tensor* in = &x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->forward(*in, acts_[i], train);
    in = &acts_[i];
  }
  y.resize(acts_.back().shape());
  std::memcpy(y.data(), acts_.back().data(), sizeof(float) * static_cast<size_t>(y.numel()));
}

void Sequential::backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) {
  grads_.resize(2);
  const Tensor* upstream = &dy;
  for (size_t i = layers_.size(); i-- > 0;) {
    const Tensor& in = i == 0 ? x : acts_[i - 1];
    Tensor* out = i == 0 ? dx : &grads_[i % 2];
    layers_[i]->backward(in, acts_[i], *upstream, out);
    upstream = out;
    if (hook_) hook_(i);
  }
}

// ---- ResidualBlock --------------------------------------------------------------------------

ResidualBlock::ResidualBlock(std::string name, std::unique_ptr<Layer> conv1, int64_t mid_channels,
                             std::unique_ptr<Layer> conv2, int64_t in_channels,
                             int64_t out_channels, int stride)
    : name_(name),
      body_(name + ".body"),
      in_channels_(in_channels),
      out_channels_(out_channels),
      stride_(stride) {
  INT4DDP_CHECK(stride == 1 || stride == 2, name_, ": stride must be 1 or 2");
  INT4DDP_CHECK(out_channels >= in_channels, name_, ": option-A shortcut cannot drop channels");
  body_.add(std::move(conv1));
  body_.add(std::make_unique<BatchNorm>(name + ".bn1", mid_channels));
  body_.add(std::make_unique<ReLU>(name + ".relu1"));
  body_.add(std::move(conv2));
  body_.add(std::make_unique<BatchNorm>(name + ".bn2", out_channels));
}

std::vector<Param*> ResidualBlock::params() { return body_.params(); }

void ResidualBlock::forward(const Tensor& x, Tensor& y, bool train) {
  body_.forward(x, body_out_, train);
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = body_out_.dim(2), wo = body_out_.dim(3);
  INT4DDP_CHECK(body_out_.dim(1) == out_channels_ && (h + stride_ - 1) / stride_ == ho &&
                    (w + stride_ - 1) / stride_ == wo,
                name_, ": body output ", shape_str(body_out_.shape()), " does not match stride ",
                stride_, " of input ", shape_str(x.shape()));
  y.resize(body_out_.shape());
  // Shortcut: channel c < in_channels takes x[c] subsampled by stride; the rest are zero.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < out_channels_; ++c)
      for (int64_t oy = 0; oy < ho; ++oy)
        for (int64_t ox = 0; ox < wo; ++ox) {
          const int64_t o = ((i * out_channels_ + c) * ho + oy) * wo + ox;
          const float sc = c < in_channels_
                               ? x[((i * in_channels_ + c) * h + oy * stride_) * w + ox * stride_]
                               : 0.0f;
          const float v = body_out_[o] + sc;
          y[o] = v > 0.0f ? v : 0.0f;
        }
}

void ResidualBlock::backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) {
  const int64_t n = x.dim(0), h = x.dim(2), w = x.dim(3);
  const int64_t ho = y.dim(2), wo = y.dim(3);
  Tensor& dsum = dsum_;  // reused: a fresh buffer per step page-faults
  dsum.resize(y.shape());
  const int64_t total = y.numel();
  const float* __restrict yp = y.data();
  const float* __restrict gp = dy.data();
  float* __restrict sp = dsum.data();
  for (int64_t i = 0; i < total; ++i) sp[i] = yp[i] > 0.0f ? gp[i] : 0.0f;
  body_.backward(x, body_out_, dsum, dx ? &dbody_in_ : nullptr);
  if (!dx) return;
  dx->resize(x.shape());
  std::memcpy(dx->data(), dbody_in_.data(), sizeof(float) * static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < in_channels_; ++c)
      for (int64_t oy = 0; oy < ho; ++oy)
        for (int64_t ox = 0; ox < wo; ++ox)
          (*dx)[((i * in_channels_ + c) * h + oy * stride_) * w + ox * stride_] +=
              dsum[((i * out_channels_ + c) * ho + oy) * wo + ox];
}

// ---- loss -----------------------------------------------------------------------------------

float softmax_cross_entropy(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                            int64_t* correct) {
  INT4DDP_CHECK(logits.rank() == 2, "cross-entropy: logits ", shape_str(logits.shape()),
                " are not (n, classes)");
  const int64_t n = logits.dim(0), k = logits.dim(1);
  if (dlogits) dlogits->resize(logits.shape());
  double loss = 0.0;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.data() + i * k;
    const int32_t label = labels[i];
    INT4DDP_CHECK(label >= 0 && label < k, "cross-entropy: label ", label, " of sample ", i,
                  " is outside 0..", k - 1);
    const int64_t arg = std::max_element(z, z + k) - z;
    hits += arg == label;
    const float zmax = z[arg];
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(z[j] - zmax));
    loss += std::log(s) - (z[label] - zmax);
    if (dlogits)
      for (int64_t j = 0; j < k; ++j) {
        const double p = std::exp(static_cast<double>(z[j] - zmax)) / s;
        (*dlogits)[i * k + j] = static_cast<float>((p - (j == label)) / static_cast<double>(n));
      }
  }
  if (correct) *correct = hits;
  return static_cast<float>(loss / static_cast<double>(n));
}

}  // namespace int4ddp::nn
