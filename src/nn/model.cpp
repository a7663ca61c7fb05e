// Model construction, the parameter arena and initialisation (see model.h).
#include "src/nn/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/common/parallel.h"
#include "src/core/rng.h"
#include "src/nn/layers_cuda.h"
#include "src/nn/quant_layers_cuda.h"

#ifdef INT4DDP_HAVE_CUDA
#include "kernels/math/cuda/nn_cuda.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp::nn {

Model::Model(const ModelSpec& spec, uint64_t seed) : spec_(spec) {
  INT4DDP_CHECK(spec.channels > 0 && spec.height > 0 && spec.width > 0 && spec.num_classes > 1,
                "model: bad input geometry or class count");
  if (spec.name == "mlp")
    build_mlp();
  else if (spec.name == "cnn")
    build_cnn();
  else if (spec.name == "resnet20")
    build_resnet20();
  else if (spec.name == "resnet18")
    build_resnet18();
  else
    INT4DDP_FAIL("model.name = '", spec.name, "' is not one of mlp, cnn, resnet20, resnet18");
  INT4DDP_CHECK(!spec.quantized || !qops_.empty(), "model ", spec.name,
                ": quantization is requested but no layer qualifies (the first and the last "
                "layer stay fp32: fp32_first = ",
                spec.fp32_first, ", fp32_last = ", spec.fp32_last, ")");
  bind_arena(seed);
}

QuantSpec Model::quant_spec(bool signed_input) const {
  QuantSpec q = spec_.quant;
  q.signed_input = signed_input;
  return q;
}

std::unique_ptr<Layer> Model::conv(const std::string& name, int64_t in, int64_t out, int k,
                                   int stride, int pad, bool keep_fp32, bool signed_input) {
  const bool cuda = spec_.device == Device::kCuda;
  if (!spec_.quantized || keep_fp32)
    return cuda ? make_cuda_conv2d(name, in, out, k, stride, pad)
                : std::make_unique<Conv2d>(name, in, out, k, stride, pad, false);
  if (cuda) {
    CudaQuantLayer q = make_cuda_qconv2d(name, in, out, k, stride, pad, quant_spec(signed_input),
                                         next_layer_id_++, &ctx_);
    qops_.push_back(q.op);
    return std::move(q.layer);
  }
  auto q = std::make_unique<QConv2d>(name, in, out, k, stride, pad, quant_spec(signed_input),
                                     next_layer_id_++, &ctx_);
  qops_.push_back(q.get());
  return q;
}

std::unique_ptr<Layer> Model::linear(const std::string& name, int64_t in, int64_t out,
                                     bool keep_fp32, bool signed_input) {
  const bool cuda = spec_.device == Device::kCuda;
  if (!spec_.quantized || keep_fp32)
    return cuda ? make_cuda_linear(name, in, out, true)
                : std::make_unique<Linear>(name, in, out, true);
  if (cuda) {
    CudaQuantLayer q =
        make_cuda_qlinear(name, in, out, quant_spec(signed_input), next_layer_id_++, &ctx_);
    qops_.push_back(q.op);
    return std::move(q.layer);
  }
  auto q = std::make_unique<QLinear>(name, in, out, true, quant_spec(signed_input),
                                     next_layer_id_++, &ctx_);
  qops_.push_back(q.get());
  return q;
}

std::unique_ptr<Layer> Model::relu(const std::string& name) const {
  if (spec_.device == Device::kCuda) return make_cuda_relu(name);
  return std::make_unique<ReLU>(name);
}

std::unique_ptr<Layer> Model::batchnorm(const std::string& name, int64_t channels,
                                        bool relu) const {
  if (spec_.device == Device::kCuda) return make_cuda_batchnorm(name, channels, relu);
  if (relu) return BatchNorm::with_relu(name, channels);
  return std::make_unique<BatchNorm>(name, channels);
}

std::unique_ptr<Layer> Model::maxpool(const std::string& name, int window, int stride,
                                      int pad) const {
  if (stride == 0) stride = window;
  if (spec_.device == Device::kCuda) return make_cuda_maxpool(name, window, stride, pad);
  return std::make_unique<MaxPool2d>(name, window, stride, pad);
}

std::unique_ptr<Layer> Model::global_avgpool(const std::string& name) const {
  if (spec_.device == Device::kCuda) return make_cuda_global_avgpool(name);
  return std::make_unique<GlobalAvgPool>(name);
}

std::unique_ptr<Layer> Model::residual_block(const std::string& name, std::unique_ptr<Layer> conv1,
                                             int64_t mid_channels, std::unique_ptr<Layer> conv2,
                                             int64_t in_channels, int64_t out_channels, int stride,
                                             std::unique_ptr<Layer> projection) const {
  if (spec_.device == Device::kCuda)
    return make_cuda_residual_block(name, std::move(conv1), mid_channels, std::move(conv2),
                                    in_channels, out_channels, stride, std::move(projection));
  return std::make_unique<ResidualBlock>(name, std::move(conv1), mid_channels, std::move(conv2),
                                         in_channels, out_channels, stride, std::move(projection));
}

void Model::build_mlp() {
  INT4DDP_CHECK(!spec_.mlp_hidden.empty(), "model.mlp_hidden: needs at least one hidden layer");
  int64_t in = spec_.channels * spec_.height * spec_.width;
  for (size_t i = 0; i < spec_.mlp_hidden.size(); ++i) {
    const int64_t h = spec_.mlp_hidden[i];
    INT4DDP_CHECK(h > 0, "model.mlp_hidden[", i, "] = ", h, " must be positive");
    net_.add(linear("fc" + std::to_string(i + 1), in, h, i == 0 && spec_.fp32_first,
                    i == 0 && spec_.signed_input));
    net_.add(relu("relu" + std::to_string(i + 1)));
    in = h;
  }
  net_.add(linear("fc_out", in, spec_.num_classes, spec_.fp32_last));
}

void Model::build_cnn() {
  INT4DDP_CHECK(spec_.height % 4 == 0 && spec_.width % 4 == 0,
                "model cnn: input height and width must be multiples of 4");
  net_.add(conv("conv1", spec_.channels, 32, 3, 1, 1, spec_.fp32_first, spec_.signed_input));
  net_.add(batchnorm("bn1", 32, true));  // + relu1
  net_.add(maxpool("pool1", 2));
  net_.add(conv("conv2", 32, 64, 3, 1, 1, false));
  net_.add(batchnorm("bn2", 64, true));  // + relu2
  net_.add(maxpool("pool2", 2));
  net_.add(linear("fc1", 64 * (spec_.height / 4) * (spec_.width / 4), 256, false));
  net_.add(relu("relu3"));
  net_.add(linear("fc2", 256, spec_.num_classes, spec_.fp32_last));
}

void Model::build_resnet20() {
  net_.add(conv("conv1", spec_.channels, 16, 3, 1, 1, spec_.fp32_first, spec_.signed_input));
  net_.add(batchnorm("bn1", 16, true));  // + relu1
  int64_t in = 16;
  for (int stage = 0; stage < 3; ++stage) {
    const int64_t out = 16 << stage;
    for (int b = 0; b < 3; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      const std::string name = "layer" + std::to_string(stage + 1) + "." + std::to_string(b);
      net_.add(residual_block(name, conv(name + ".conv1", in, out, 3, stride, 1, false), out,
                              conv(name + ".conv2", out, out, 3, 1, 1, false), in, out, stride));
      in = out;
    }
  }
  net_.add(global_avgpool("pool"));
  net_.add(batchnorm("bn_final", 64, false));
  net_.add(linear("fc", 64, spec_.num_classes, spec_.fp32_last, /*signed_input=*/true));
}

void Model::build_resnet18() {
  // Every layer's input follows a ReLU (or a max pool of one) except the stem conv's (the data):
  // the quantized layers use the unsigned grid, and the classifier too (a mean of ReLU outputs).
  if (std::max(spec_.height, spec_.width) <= kResNet18CifarStemMaxSide) {
    net_.add(conv("conv1", spec_.channels, 64, 3, 1, 1, spec_.fp32_first, spec_.signed_input));
    net_.add(batchnorm("bn1", 64, true));  // + relu
  } else {
    net_.add(conv("conv1", spec_.channels, 64, 7, 2, 3, spec_.fp32_first, spec_.signed_input));
    net_.add(batchnorm("bn1", 64, true));  // + relu
    net_.add(maxpool("maxpool", 3, 2, 1));
  }
  int64_t in = 64;
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t out = int64_t{64} << stage;
    for (int b = 0; b < 2; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      const std::string name = "layer" + std::to_string(stage + 1) + "." + std::to_string(b);
      auto conv1 = conv(name + ".conv1", in, out, 3, stride, 1, false);
      auto conv2 = conv(name + ".conv2", out, out, 3, 1, 1, false);
      // Option B: a 1x1 projection (+ BN, made by the block) wherever the shape changes.
      auto projection = (stride != 1 || in != out)
                            ? conv(name + ".shortcut.conv", in, out, 1, stride, 0, false)
                            : nullptr;
      net_.add(residual_block(name, std::move(conv1), out, std::move(conv2), in, out, stride,
                              std::move(projection)));
      in = out;
    }
  }
  net_.add(global_avgpool("avgpool"));
  net_.add(linear("fc", 512, spec_.num_classes, spec_.fp32_last));
}

void Model::bind_arena(uint64_t seed) {
  params_ = net_.params();
  int64_t total = 0;
  for (Param* p : params_) total += p->value.numel();
  values_.assign(static_cast<size_t>(total), 0.0f);
  grads_.assign(static_cast<size_t>(total), 0.0f);
  Rng rng(seed);
  int64_t off = 0;
  for (Param* p : params_) {
    const int64_t n = p->value.numel();
    float* v = values_.data() + off;
    std::memcpy(v, p->value.data(), sizeof(float) * static_cast<size_t>(n));
    // Kaiming normal for conv and linear weights (rank >= 2): std = sqrt(2 / fan_in).
    if (p->group == ParamGroup::kWeights && p->shape.size() >= 2) {
      const double fan_in = static_cast<double>(n / p->shape[0]);
      const double std = std::sqrt(2.0 / fan_in);
      for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(std * rng.normal());
    }
    p->value = Tensor::view(v, p->shape);
    p->grad = Tensor::view(grads_.data() + off, p->shape);
    off += n;
  }
  // Ready offsets for backward hooks: after top-level layer i's backward, every gradient of layers
  // i.. (the arena is in forward order) is final.
  const auto& layers = net_.layers();
  ready_offset_.assign(layers.size(), total);
  int64_t lowest = total;
  for (size_t i = layers.size(); i-- > 0;) {
    for (Param* p : layers[i]->params())
      lowest = std::min<int64_t>(lowest, p->grad.data() - grads_.data());
    ready_offset_[i] = lowest;
  }
  if (spec_.device == Device::kCuda) bind_device_arena();
}

void Model::bind_device_arena() {
  const int64_t total = num_params();
  device_values_.resize({total}, Device::kCuda);
  device_grads_.resize({total}, Device::kCuda);
  for (Param* p : params_) {
    const int64_t off = p->value.data() - values_.data();
    p->device_value = Tensor::view(device_values_.data() + off, p->shape, Device::kCuda);
    p->device_grad = Tensor::view(device_grads_.data() + off, p->shape, Device::kCuda);
  }
  to_device();
}

std::vector<std::pair<std::vector<float>*, float*>> Model::buffer_pairs() {
  const std::vector<std::vector<float>*> host = net_.buffers();
  const std::vector<float*> device = net_.device_buffers();
  INT4DDP_CHECK(host.size() == device.size(), "model ", spec_.name, ": ", device.size(),
                " device buffers for ", host.size(), " host buffers");
  std::vector<std::pair<std::vector<float>*, float*>> out;
  for (size_t i = 0; i < host.size(); ++i) out.emplace_back(host[i], device[i]);
  return out;
}

void Model::to_host() {
  if (spec_.device != Device::kCuda) return;
  copy_floats(values_.data(), Device::kCpu, device_values_.data(), Device::kCuda, num_params());
  buffers_to_host();
}

void Model::to_device() {
  if (spec_.device != Device::kCuda) return;
  copy_floats(device_values_.data(), Device::kCuda, values_.data(), Device::kCpu, num_params());
  buffers_to_device();
}

void Model::buffers_to_host() {
  if (spec_.device != Device::kCuda) return;
  for (auto& [host, device] : buffer_pairs())
    copy_floats(host->data(), Device::kCpu, device, Device::kCuda,
                static_cast<int64_t>(host->size()));
}

void Model::buffers_to_device() {
  if (spec_.device != Device::kCuda) return;
  for (auto& [host, device] : buffer_pairs())
    copy_floats(device, Device::kCuda, host->data(), Device::kCpu,
                static_cast<int64_t>(host->size()));
}

void Model::grads_to_host() {
  if (spec_.device != Device::kCuda) return;
  copy_floats(grads_.data(), Device::kCpu, device_grads_.data(), Device::kCuda, num_params());
}

void Model::grads_to_device() {
  if (spec_.device != Device::kCuda) return;
  copy_floats(device_grads_.data(), Device::kCuda, grads_.data(), Device::kCpu, num_params());
}

bool Model::grads_finite() {
  if (spec_.device != Device::kCuda) {
    const float* g = grads_.data();
    for (int64_t i = 0, n = num_params(); i < n; ++i)
      if (!std::isfinite(g[i])) return false;
    return true;
  }
#ifdef INT4DDP_HAVE_CUDA
  nonfinite_flag_.resize({1}, Device::kCuda);
  int32_t* flag = reinterpret_cast<int32_t*>(nonfinite_flag_.data());
  zero_floats(nonfinite_flag_.data(), Device::kCuda, 1);
  math::cuda::flag_nonfinite_async(device_grads_.data(), num_params(), flag, compute_stream());
  int32_t found = 0;
  copy_bytes(&found, Device::kCpu, flag, Device::kCuda, sizeof found);
  return found == 0;
#else
  INT4DDP_FAIL("model ", spec_.name, ": a model on the GPU needs a CUDA build");
#endif
}

void Model::save_buffers() {
  if (spec_.device != Device::kCuda) {
    saved_buffers_.clear();
    for (std::vector<float>* b : net_.buffers()) saved_buffers_.push_back(*b);
    return;
  }
  const auto pairs = buffer_pairs();
  int64_t total = 0;
  for (const auto& pr : pairs) total += static_cast<int64_t>(pr.first->size());
  device_saved_buffers_.resize({total}, Device::kCuda);
  int64_t off = 0;
  for (const auto& [host, device] : pairs) {
    const auto n = static_cast<int64_t>(host->size());
    copy_floats(device_saved_buffers_.data() + off, Device::kCuda, device, Device::kCuda, n);
    off += n;
  }
}

void Model::restore_buffers() {
  if (spec_.device != Device::kCuda) {
    const auto buffers = net_.buffers();
    INT4DDP_CHECK(saved_buffers_.size() == buffers.size(),
                  "model: restore_buffers() without save_buffers()");
    for (size_t i = 0; i < buffers.size(); ++i) *buffers[i] = saved_buffers_[i];
    return;
  }
  int64_t off = 0;
  for (const auto& [host, device] : buffer_pairs()) {
    const auto n = static_cast<int64_t>(host->size());
    INT4DDP_CHECK(off + n <= device_saved_buffers_.numel(),
                  "model: restore_buffers() without save_buffers()");
    copy_floats(device, Device::kCuda, device_saved_buffers_.data() + off, Device::kCuda, n);
    off += n;
  }
}

std::vector<std::pair<int64_t, int64_t>> Model::param_segments() const {
  std::vector<std::pair<int64_t, int64_t>> segs;
  for (const Param* p : params_) segs.emplace_back(p->grad.data() - grads_.data(), p->grad.numel());
  return segs;
}

void Model::forward(const Tensor& x, Tensor& logits, bool train) {
  if (spec_.device == Device::kCuda) {
    // The parameters are already on the device (device-resident): only the input goes over.
    if (input_.device() != Device::kCuda) input_ = Tensor({0}, Device::kCuda);
    input_.copy_from(x);
    net_.forward(input_, logits, train);
    return;
  }
  input_.resize(x.shape());
  std::memcpy(input_.data(), x.data(), sizeof(float) * static_cast<size_t>(x.numel()));
  net_.forward(input_, logits, train);
}

void Model::backward(const Tensor& dlogits, const std::function<void(int64_t)>& ready) {
  const Tensor unused;  // Sequential::backward reads activations it kept, not y
  if (ready) net_.set_backward_hook([&](size_t i) { ready(ready_offset_[i]); });
  net_.backward(input_, unused, dlogits, nullptr);
  net_.set_backward_hook({});
}

void Model::zero_grad() {
  if (spec_.device == Device::kCuda) {
    device_grads_.zero();
    return;
  }
  constexpr int64_t kBlock = 65536;
  const int64_t n = static_cast<int64_t>(grads_.size());
  parallel_for((n + kBlock - 1) / kBlock, [&](int64_t b) {
    std::fill(grads_.data() + b * kBlock, grads_.data() + std::min(n, (b + 1) * kBlock), 0.0f);
  });
}

void Model::commit_quant_step(bool apply) {
  for (QuantizedOp* q : qops_) q->commit_step(apply);
}

bool Model::needs_calibration() const {
  for (QuantizedOp* q : qops_)
    if (q->grad_state().policy->needs_calibration()) return true;
  return false;
}

}  // namespace int4ddp::nn
