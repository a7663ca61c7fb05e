// The CUDA layers (see layers_cuda.h): thin wrappers that check shapes and devices on the host and
// enqueue kernels/math/cuda on the compute stream. Compiled in every build; without CUDA only the
// throwing factories remain.
#include "src/nn/layers_cuda.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/common/error.h"

#ifdef INT4DDP_HAVE_CUDA
#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/math/cuda/nn_cuda.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp::nn {

#ifdef INT4DDP_HAVE_CUDA
namespace {

namespace mc = math::cuda;
using math::Trans;

void check_on_gpu(const Tensor& t, const std::string& layer, const char* what) {
  INT4DDP_CHECK(t.device() == Device::kCuda, layer, ": ", what, " ", shape_str(t.shape()),
                " is in host memory; a CUDA layer needs a device tensor");
}

// The device view of a parameter, bound by the model (Model::bind_arena) or a test.
float* dev_value(const Param& p) {
  INT4DDP_CHECK(p.device_value.device() == Device::kCuda && p.device_value.data() != nullptr,
                p.name, ": no device copy (the layer's model is not on the GPU)");
  return const_cast<float*>(p.device_value.data());
}
float* dev_grad(const Param& p) {
  INT4DDP_CHECK(p.device_grad.device() == Device::kCuda && p.device_grad.data() != nullptr, p.name,
                ": no device gradient (the layer's model is not on the GPU)");
  return const_cast<float*>(p.device_grad.data());
}

// count doubles of device workspace inside a float tensor (cudaMalloc aligns to 256 bytes).
double* doubles(Tensor& t, int64_t count) {
  t.resize({std::max<int64_t>(1, 2 * count)}, Device::kCuda);
  return reinterpret_cast<double*>(t.data());
}

int64_t features_of(const Tensor& x) { return x.numel() / std::max<int64_t>(1, x.dim(0)); }

// ---- Linear -------------------------------------------------------------------------------------

class CudaLinear : public Layer {
 public:
  CudaLinear(std::string name, int64_t in, int64_t out, bool bias)
      : name_(std::move(name)), in_(in), out_(out), has_bias_(bias) {
    INT4DDP_CHECK(in > 0 && out > 0, name_, ": features must be positive");
    weight_ = make_param(name_ + ".weight", {out, in}, true);
    if (has_bias_) bias_ = make_param(name_ + ".bias", {out}, false);
  }
  std::string name() const override { return name_; }
  std::vector<Param*> params() override {
    if (has_bias_) return {&weight_, &bias_};
    return {&weight_};
  }

  void forward(const Tensor& x, Tensor& y, bool) override {
    check_on_gpu(x, name_, "input");
    const int64_t n = x.dim(0);
    INT4DDP_CHECK(features_of(x) == in_, name_, ": input ", shape_str(x.shape()), " has ",
                  features_of(x), " features, expected ", in_);
    y.resize({n, out_}, Device::kCuda);
    cudaStream_t s = compute_stream();
    mc::sgemm(gemm_context(), Trans::kNo, Trans::kYes, n, out_, in_, 1.0f, x.data(), in_,
              dev_value(weight_), in_, 0.0f, y.data(), out_, s);
    if (has_bias_) mc::bias_add_rows_async(y.data(), dev_value(bias_), n, out_, s);
  }

  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    check_on_gpu(dy, name_, "output gradient");
    const int64_t n = x.dim(0);
    cudaStream_t s = compute_stream();
    // dW (out, in) += dy^T x; db += column sums of dy; dx = dy W.
    mc::sgemm(gemm_context(), Trans::kYes, Trans::kNo, out_, in_, n, 1.0f, dy.data(), out_,
              x.data(), in_, 1.0f, dev_grad(weight_), in_, s);
    if (has_bias_) mc::bias_grad_rows_async(dy.data(), n, out_, dev_grad(bias_), s);
    if (dx) {
      dx->resize(x.shape(), Device::kCuda);
      mc::sgemm(gemm_context(), Trans::kNo, Trans::kNo, n, in_, out_, 1.0f, dy.data(), out_,
                dev_value(weight_), in_, 0.0f, dx->data(), in_, s);
    }
  }

 private:
  std::string name_;
  int64_t in_, out_;
  bool has_bias_;
  Param weight_, bias_;
};

// ---- Conv2d -------------------------------------------------------------------------------------

// im2col over a group of samples at once, then one GEMM per sample reading its columns in place
// (ld = the group's column count), so y and dx come out in NCHW without a transpose.
class CudaConv2d : public Layer {
 public:
  // Bytes of im2col columns per group of samples.
  static constexpr int64_t kColumnBytes = int64_t{256} << 20;

  CudaConv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad)
      : name_(std::move(name)), in_(in), out_(out) {
    INT4DDP_CHECK(in > 0 && out > 0 && kernel > 0 && stride > 0 && pad >= 0, name_,
                  ": bad convolution geometry");
    geo_.channels = in;
    geo_.kernel = kernel;
    geo_.stride = stride;
    geo_.pad = pad;
    weight_ = make_param(name_ + ".weight", {out, in, kernel, kernel}, true);
  }
  std::string name() const override { return name_; }
  std::vector<Param*> params() override { return {&weight_}; }

  void forward(const Tensor& x, Tensor& y, bool) override {
    check_on_gpu(x, name_, "input");
    const int64_t n = set_geometry(x);
    const int64_t ho = geo_.out_h(), wo = geo_.out_w(), hw = ho * wo, rows = geo_.rows();
    y.resize({n, out_, ho, wo}, Device::kCuda);
    cudaStream_t s = compute_stream();
    const float* w = dev_value(weight_);
    for (int64_t s0 = 0; s0 < n; s0 += group_) {
      const int64_t g = std::min(group_, n - s0), ld = g * hw;
      col_.resize({rows * ld}, Device::kCuda);
      mc::im2col_async(x.data(), s0, g, geo_, false, col_.data(), s);
      for (int64_t i = 0; i < g; ++i)  // y_s (out, hw) = W (out, rows) col_s (rows, hw)
        mc::sgemm(gemm_context(), Trans::kNo, Trans::kNo, out_, hw, rows, 1.0f, w, rows,
                  col_.data() + i * hw, ld, 0.0f, y.data() + (s0 + i) * out_ * hw, hw, s);
    }
  }

  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    check_on_gpu(dy, name_, "output gradient");
    const int64_t n = set_geometry(x);
    const int64_t hw = geo_.out_h() * geo_.out_w(), rows = geo_.rows();
    cudaStream_t s = compute_stream();
    const float* w = dev_value(weight_);
    float* dw = dev_grad(weight_);
    if (dx) {
      dx->resize(x.shape(), Device::kCuda);
      dx->zero();  // col2im accumulates
    }
    for (int64_t s0 = 0; s0 < n; s0 += group_) {
      const int64_t g = std::min(group_, n - s0), ld = g * hw;
      col_.resize({rows * ld}, Device::kCuda);
      mc::im2col_async(x.data(), s0, g, geo_, false, col_.data(), s);
      if (dx) dcol_.resize({rows * ld}, Device::kCuda);
      for (int64_t i = 0; i < g; ++i) {
        const float* dy_s = dy.data() + (s0 + i) * out_ * hw;
        // dW (out, rows) += dy_s (out, hw) col_s^T (hw, rows), in sample order.
        mc::sgemm(gemm_context(), Trans::kNo, Trans::kYes, out_, rows, hw, 1.0f, dy_s, hw,
                  col_.data() + i * hw, ld, 1.0f, dw, rows, s);
        // dcol_s (rows, hw) = W^T (rows, out) dy_s (out, hw).
        if (dx)
          mc::sgemm(gemm_context(), Trans::kYes, Trans::kNo, rows, hw, out_, 1.0f, w, rows, dy_s,
                    hw, 0.0f, dcol_.data() + i * hw, ld, s);
      }
      if (dx) mc::col2im_async(dcol_.data(), s0, g, geo_, false, dx->data(), s);
    }
  }

 private:
  // Takes x's spatial size and returns its batch size; sets the samples per column group.
  int64_t set_geometry(const Tensor& x) {
    INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == in_, name_, ": input ", shape_str(x.shape()),
                  " is not (n, ", in_, ", h, w)");
    geo_.h = x.dim(2);
    geo_.w = x.dim(3);
    INT4DDP_CHECK(geo_.out_h() > 0 && geo_.out_w() > 0, name_, ": input ", shape_str(x.shape()),
                  " is smaller than the kernel");
    const int64_t per_sample =
        geo_.rows() * geo_.out_h() * geo_.out_w() * static_cast<int64_t>(sizeof(float));
    group_ = std::max<int64_t>(1, std::min<int64_t>(x.dim(0), kColumnBytes / per_sample));
    return x.dim(0);
  }

  std::string name_;
  int64_t in_, out_;
  mc::ConvGeometry geo_;
  int64_t group_ = 1;
  Param weight_;
  Tensor col_, dcol_;  // (rows, group * ho * wo) device: the group's columns and their gradient
};

// ---- ReLU, pooling ------------------------------------------------------------------------------

class CudaReLU : public Layer {
 public:
  explicit CudaReLU(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool) override {
    check_on_gpu(x, name_, "input");
    y.resize(x.shape(), Device::kCuda);
    mc::relu_forward_async(x.data(), y.data(), x.numel(), compute_stream());
  }
  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    if (!dx) return;
    check_on_gpu(dy, name_, "output gradient");
    dx->resize(x.shape(), Device::kCuda);
    mc::relu_backward_async(x.data(), dy.data(), dx->data(), x.numel(), compute_stream());
  }

 private:
  std::string name_;
};

class CudaMaxPool2d : public Layer {
 public:
  CudaMaxPool2d(std::string name, int window, int stride, int pad) : name_(std::move(name)) {
    INT4DDP_CHECK(window >= 1 && stride >= 1 && pad >= 0 && 2 * pad <= window, name_,
                  ": bad pooling geometry (window ", window, ", stride ", stride, ", pad ", pad,
                  "): needs window >= 1, stride >= 1 and 0 <= pad <= window / 2");
    geo_.window = window;
    geo_.stride = stride;
    geo_.pad = pad;
  }
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool) override {
    check_on_gpu(x, name_, "input");
    INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not (n, c, h, w)");
    const int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
    INT4DDP_CHECK(h + 2 * geo_.pad >= geo_.window && w + 2 * geo_.pad >= geo_.window, name_,
                  ": input ", shape_str(x.shape()), " is too small for a window of ", geo_.window);
    y.resize({n, c, geo_.out_size(h), geo_.out_size(w)}, Device::kCuda);
    argmax_.resize({y.numel()}, Device::kCuda);  // int32 indices in float-sized slots
    mc::maxpool_forward_async(x.data(), n, c, h, w, geo_, y.data(),
                              reinterpret_cast<int32_t*>(argmax_.data()), compute_stream());
  }
  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    if (!dx) return;
    check_on_gpu(dy, name_, "output gradient");
    dx->resize(x.shape(), Device::kCuda);
    mc::maxpool_backward_async(dy.data(), reinterpret_cast<const int32_t*>(argmax_.data()),
                               x.dim(0), x.dim(1), x.dim(2), x.dim(3), geo_, dx->data(),
                               compute_stream());
  }

 private:
  std::string name_;
  mc::PoolGeometry geo_;
  Tensor argmax_;  // (n*c*ho*wo) int32 device
};

class CudaGlobalAvgPool : public Layer {
 public:
  explicit CudaGlobalAvgPool(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void forward(const Tensor& x, Tensor& y, bool) override {
    check_on_gpu(x, name_, "input");
    INT4DDP_CHECK(x.rank() == 4, name_, ": input ", shape_str(x.shape()), " is not (n, c, h, w)");
    y.resize({x.dim(0), x.dim(1)}, Device::kCuda);
    mc::global_avgpool_forward_async(x.data(), x.dim(0), x.dim(1), x.dim(2) * x.dim(3), y.data(),
                                     compute_stream());
  }
  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    if (!dx) return;
    check_on_gpu(dy, name_, "output gradient");
    dx->resize(x.shape(), Device::kCuda);
    mc::global_avgpool_backward_async(dy.data(), x.dim(0), x.dim(1), x.dim(2) * x.dim(3),
                                      dx->data(), compute_stream());
  }

 private:
  std::string name_;
};

// ---- BatchNorm ----------------------------------------------------------------------------------

class CudaBatchNorm : public Layer {
 public:
  CudaBatchNorm(std::string name, int64_t channels, bool relu)
      : name_(std::move(name)), channels_(channels), relu_(relu) {
    INT4DDP_CHECK(channels > 0, name_, ": channels must be positive");
    // The CPU layer's parameters, names and initial values (BatchNorm's constructor).
    gamma_ = make_param(name_ + ".gamma", {channels}, false);
    beta_ = make_param(name_ + ".beta", {channels}, false);
    std::fill(gamma_.value.data(), gamma_.value.data() + channels, 1.0f);
    running_mean_.assign(static_cast<size_t>(channels), 0.0f);
    running_var_.assign(static_cast<size_t>(channels), 1.0f);
    state_.resize({6 * channels}, Device::kCuda);
    copy_floats(state_.data(), Device::kCuda, running_mean_.data(), Device::kCpu, channels);
    copy_floats(state_.data() + channels, Device::kCuda, running_var_.data(), Device::kCpu,
                channels);
  }
  std::string name() const override { return name_; }
  std::vector<Param*> params() override { return {&gamma_, &beta_}; }
  std::vector<std::vector<float>*> buffers() override { return {&running_mean_, &running_var_}; }
  std::vector<float*> device_buffers() override {
    return {state_.data(), state_.data() + channels_};
  }

  void forward(const Tensor& x, Tensor& y, bool train) override {
    check_on_gpu(x, name_, "input");
    const mc::BatchNormShape s = shape_of(x);
    y.resize(x.shape(), Device::kCuda);
    mc::batchnorm_forward_async(s, x.data(), y.data(), train, params_of(),
                                doubles(workspace_, mc::batchnorm_workspace_count(s)),
                                compute_stream());
  }

  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    check_on_gpu(dy, name_, "output gradient");
    const mc::BatchNormShape s = shape_of(x);
    if (dx) dx->resize(x.shape(), Device::kCuda);
    mc::batchnorm_backward_async(
        s, x.data(), dy.data(), dx ? dx->data() : nullptr, dev_grad(gamma_), dev_grad(beta_),
        params_of(), doubles(workspace_, mc::batchnorm_workspace_count(s)), compute_stream());
  }

 private:
  mc::BatchNormShape shape_of(const Tensor& x) const {
    INT4DDP_CHECK((x.rank() == 4 || x.rank() == 2) && x.dim(1) == channels_, name_, ": input ",
                  shape_str(x.shape()), " is not (n, ", channels_, "[, h, w])");
    mc::BatchNormShape s;
    s.n = x.dim(0);
    s.channels = channels_;
    s.hw = x.rank() == 4 ? x.dim(2) * x.dim(3) : 1;
    return s;
  }
  mc::BatchNormParams params_of() {
    mc::BatchNormParams p;
    p.gamma = dev_value(gamma_);
    p.beta = dev_value(beta_);
    float* st = state_.data();  // running mean, running var, then the forward's saved four
    p.running_mean = st;
    p.running_var = st + channels_;
    p.save_mean = st + 2 * channels_;
    p.save_invstd = st + 3 * channels_;
    p.save_scale = st + 4 * channels_;
    p.save_shift = st + 5 * channels_;
    p.momentum = momentum_;
    p.eps = eps_;
    p.relu = relu_;
    return p;
  }

  std::string name_;
  int64_t channels_;
  bool relu_;
  float momentum_ = 0.1f, eps_ = 1e-5f;  // BatchNorm's defaults
  Param gamma_, beta_;
  // The running statistics: state_'s first 2 * channels floats are the layer's own (forward reads
  // and updates them on the device); the host vectors are their copies for checkpoints, rank
  // averaging and a skipped step's restore, synced by the model (Model::buffers_to_host,
  // buffers_to_device).
  std::vector<float> running_mean_, running_var_;  // (channels) host
  Tensor state_;                                   // (6 * channels) device, see params_of
  Tensor workspace_;                               // device doubles of the BN reductions
};

// ---- the residual block ------------------------------------------------------------------------

// The shortcut is option A (shortcut_*_async: x subsampled, extra channels zero) or, with a
// projection, bn_s(projection(x)) as ResidualBlock's option B; its sum with the body and the sum
// of the two input gradients then reuse the same kernels with an identity shortcut shape.
class CudaResidualBlock : public Layer {
 public:
  CudaResidualBlock(std::string name, std::unique_ptr<Layer> conv1, int64_t mid_channels,
                    std::unique_ptr<Layer> conv2, int64_t in_channels, int64_t out_channels,
                    int stride, std::unique_ptr<Layer> projection)
      : name_(name), body_(name + ".body"), shortcut_(name + ".shortcut") {
    INT4DDP_CHECK(stride == 1 || stride == 2, name_, ": stride must be 1 or 2");
    if (projection) {
      shortcut_.add(std::move(projection));
      shortcut_.add(make_cuda_batchnorm(name + ".shortcut.bn", out_channels, false));
    } else {
      INT4DDP_CHECK(out_channels >= in_channels, name_, ": option-A shortcut cannot drop channels");
    }
    shape_.in_channels = in_channels;
    shape_.out_channels = out_channels;
    shape_.stride = stride;
    body_.add(std::move(conv1));
    body_.add(make_cuda_batchnorm(name + ".bn1", mid_channels, true));  // + relu1
    body_.add(std::move(conv2));
    body_.add(make_cuda_batchnorm(name + ".bn2", out_channels, false));
  }
  std::string name() const override { return name_; }
  // The body's, then the projection shortcut's (if any), as ResidualBlock.
  std::vector<Param*> params() override {
    std::vector<Param*> out = body_.params();
    for (Param* p : shortcut_.params()) out.push_back(p);
    return out;
  }
  std::vector<std::vector<float>*> buffers() override {
    std::vector<std::vector<float>*> out = body_.buffers();
    for (std::vector<float>* b : shortcut_.buffers()) out.push_back(b);
    return out;
  }
  std::vector<float*> device_buffers() override {
    std::vector<float*> out = body_.device_buffers();
    for (float* b : shortcut_.device_buffers()) out.push_back(b);
    return out;
  }

  void forward(const Tensor& x, Tensor& y, bool train) override {
    check_on_gpu(x, name_, "input");
    body_.forward(x, body_out_, train);
    set_shape(x);
    const int64_t ho = body_out_.dim(2), wo = body_out_.dim(3), s = shape_.stride;
    INT4DDP_CHECK(body_out_.dim(1) == shape_.out_channels && (shape_.h + s - 1) / s == ho &&
                      (shape_.w + s - 1) / s == wo,
                  name_, ": body output ", shape_str(body_out_.shape()), " does not match stride ",
                  s, " of input ", shape_str(x.shape()));
    y.resize(body_out_.shape(), Device::kCuda);
    if (!has_projection()) {
      mc::residual_forward_async(shape_, body_out_.data(), x.data(), y.data(), compute_stream());
      return;
    }
    shortcut_.forward(x, shortcut_out_, train);
    INT4DDP_CHECK(shortcut_out_.shape() == body_out_.shape(), name_, ": projection output ",
                  shape_str(shortcut_out_.shape()), " does not match the body output ",
                  shape_str(body_out_.shape()));
    mc::residual_forward_async(identity(shape_.out_channels, ho, wo), body_out_.data(),
                               shortcut_out_.data(), y.data(), compute_stream());
  }

  void backward(const Tensor& x, const Tensor& y, const Tensor& dy, Tensor* dx) override {
    check_on_gpu(dy, name_, "output gradient");
    set_shape(x);
    dsum_.resize(y.shape(), Device::kCuda);
    // The projection may drop channels (out < in), which option A's shape refuses.
    const mc::ShortcutShape sum_shape =
        has_projection() ? identity(shape_.out_channels, y.dim(2), y.dim(3)) : shape_;
    mc::residual_backward_async(sum_shape, y.data(), dy.data(), dsum_.data(), compute_stream());
    body_.backward(x, body_out_, dsum_, dx);  // dx = the body's dx, plus the shortcut's gradient
    if (!has_projection()) {
      if (dx) mc::shortcut_backward_add_async(shape_, dsum_.data(), dx->data(), compute_stream());
      return;
    }
    shortcut_.backward(x, shortcut_out_, dsum_, dx ? &dshortcut_ : nullptr);
    if (dx)
      mc::shortcut_backward_add_async(identity(shape_.in_channels, shape_.h, shape_.w),
                                      dshortcut_.data(), dx->data(), compute_stream());
  }

 private:
  bool has_projection() const { return !shortcut_.layers().empty(); }
  void set_shape(const Tensor& x) {
    INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == shape_.in_channels, name_, ": input ",
                  shape_str(x.shape()), " is not (n, ", shape_.in_channels, ", h, w)");
    shape_.n = x.dim(0);
    shape_.h = x.dim(2);
    shape_.w = x.dim(3);
  }
  // A stride-1 shortcut of `channels` channels onto themselves: residual_forward_async adds two
  // same-shaped tensors (then the ReLU), shortcut_backward_add_async adds one into the other.
  mc::ShortcutShape identity(int64_t channels, int64_t h, int64_t w) const {
    mc::ShortcutShape s;
    s.n = shape_.n;
    s.in_channels = s.out_channels = channels;
    s.h = h;
    s.w = w;
    s.stride = 1;
    return s;
  }

  std::string name_;
  Sequential body_;
  Sequential shortcut_;  // empty: option A
  mc::ShortcutShape shape_;
  Tensor body_out_, dsum_;           // device: the body's output, and dL/d(body + shortcut)
  Tensor shortcut_out_, dshortcut_;  // device, projection shortcut: its output, and its dx
};

}  // namespace

std::unique_ptr<Layer> make_cuda_residual_block(std::string name, std::unique_ptr<Layer> conv1,
                                                int64_t mid_channels, std::unique_ptr<Layer> conv2,
                                                int64_t in_channels, int64_t out_channels,
                                                int stride, std::unique_ptr<Layer> projection) {
  return std::make_unique<CudaResidualBlock>(std::move(name), std::move(conv1), mid_channels,
                                             std::move(conv2), in_channels, out_channels, stride,
                                             std::move(projection));
}

std::unique_ptr<Layer> make_cuda_linear(std::string name, int64_t in, int64_t out, bool bias) {
  return std::make_unique<CudaLinear>(std::move(name), in, out, bias);
}
std::unique_ptr<Layer> make_cuda_conv2d(std::string name, int64_t in, int64_t out, int kernel,
                                        int stride, int pad) {
  return std::make_unique<CudaConv2d>(std::move(name), in, out, kernel, stride, pad);
}
std::unique_ptr<Layer> make_cuda_relu(std::string name) {
  return std::make_unique<CudaReLU>(std::move(name));
}
std::unique_ptr<Layer> make_cuda_batchnorm(std::string name, int64_t channels, bool relu) {
  return std::make_unique<CudaBatchNorm>(std::move(name), channels, relu);
}
std::unique_ptr<Layer> make_cuda_maxpool(std::string name, int window, int stride, int pad) {
  return std::make_unique<CudaMaxPool2d>(std::move(name), window, stride, pad);
}
std::unique_ptr<Layer> make_cuda_global_avgpool(std::string name) {
  return std::make_unique<CudaGlobalAvgPool>(std::move(name));
}

float softmax_cross_entropy_any(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                                int64_t* correct) {
  if (logits.device() == Device::kCpu)
    return softmax_cross_entropy(logits, labels, dlogits, correct);
  INT4DDP_CHECK(logits.rank() == 2, "cross-entropy: logits ", shape_str(logits.shape()),
                " are not (n, classes)");
  const int64_t n = logits.dim(0), k = logits.dim(1);
  thread_local Tensor device_labels;  // (n) int32 in float-sized slots
  device_labels.resize({n}, Device::kCuda);
  copy_bytes(device_labels.data(), Device::kCuda, labels, Device::kCpu,
             n * static_cast<int64_t>(sizeof(int32_t)));
  if (dlogits) dlogits->resize(logits.shape(), Device::kCuda);
  const mc::CrossEntropyResult r = mc::softmax_cross_entropy(
      logits.data(), reinterpret_cast<const int32_t*>(device_labels.data()), n, k,
      dlogits ? dlogits->data() : nullptr, compute_stream());
  if (correct) *correct = r.correct;
  return r.loss;
}

#else  // no CUDA: the factories refuse

namespace {
[[noreturn]] void no_cuda(const std::string& layer) {
  INT4DDP_FAIL(layer, ": CUDA layers need a CUDA build (train.device = cuda)");
}
}  // namespace

std::unique_ptr<Layer> make_cuda_linear(std::string name, int64_t, int64_t, bool) { no_cuda(name); }
std::unique_ptr<Layer> make_cuda_conv2d(std::string name, int64_t, int64_t, int, int, int) {
  no_cuda(name);
}
std::unique_ptr<Layer> make_cuda_relu(std::string name) { no_cuda(name); }
std::unique_ptr<Layer> make_cuda_batchnorm(std::string name, int64_t, bool) { no_cuda(name); }
std::unique_ptr<Layer> make_cuda_maxpool(std::string name, int, int, int) { no_cuda(name); }
std::unique_ptr<Layer> make_cuda_global_avgpool(std::string name) { no_cuda(name); }
std::unique_ptr<Layer> make_cuda_residual_block(std::string name, std::unique_ptr<Layer>, int64_t,
                                                std::unique_ptr<Layer>, int64_t, int64_t, int,
                                                std::unique_ptr<Layer>) {
  no_cuda(name);
}

float softmax_cross_entropy_any(const Tensor& logits, const int32_t* labels, Tensor* dlogits,
                                int64_t* correct) {
  INT4DDP_CHECK(logits.device() == Device::kCpu, "cross-entropy: device logits need CUDA");
  return softmax_cross_entropy(logits, labels, dlogits, correct);
}

#endif

}  // namespace int4ddp::nn
