// The quantized layers on the GPU (see quant_layers_cuda.h): QuantizedOp's host state and scalar
// steps, kernels/math/cuda for the element-wise work and the integer GEMMs, the CUDA codec for the
// gradient quantizer. Compiled in every build; without CUDA only the throwing factories remain.
#include "src/nn/quant_layers_cuda.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/common/error.h"

#ifdef INT4DDP_HAVE_CUDA
#include "kernels/math/cuda/gemm_cuda.h"
#include "kernels/math/cuda/nn_cuda.h"
#include "kernels/math/cuda/qlayer_cuda.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "src/core/device.h"
#include "src/core/device_cuda.h"
#endif

namespace int4ddp::nn {

#ifdef INT4DDP_HAVE_CUDA
namespace {

namespace mc = math::cuda;
using math::Trans;

// Bytes of im2col code columns (or their int32 / fp32 gradients) per group of samples.
constexpr int64_t kColumnBytes = int64_t{128} << 20;

// count elements of T in the device storage of t (grows, never shrinks; cudaMalloc aligns it).
template <typename T>
T* device_buffer(Tensor& t, int64_t count) {
  const int64_t floats =
      (count * static_cast<int64_t>(sizeof(T)) + static_cast<int64_t>(sizeof(float)) - 1) /
      static_cast<int64_t>(sizeof(float));
  t.resize({std::max<int64_t>(1, floats)}, Device::kCuda);
  return reinterpret_cast<T*>(t.data());
}

void require_device(const Tensor& t, const std::string& layer, const char* what) {
  INT4DDP_CHECK(t.device() == Device::kCuda && t.data() != nullptr, layer, ": ", what,
                " is not in device memory (a CUDA layer needs device tensors and a model on the "
                "GPU)");
}

float* device_value_of(Param& p) {
  require_device(p.device_value, p.name, "the parameter's device copy");
  return p.device_value.data();
}
float* device_grad_of(Param& p) {
  require_device(p.device_grad, p.name, "the parameter's device gradient");
  return p.device_grad.data();
}

// Copies on the compute stream (device.h's copy_bytes; waits for the stream when dst is host).
void to_host_bytes(void* dst, const void* src, size_t bytes) {
  copy_bytes(dst, Device::kCpu, src, Device::kCuda, static_cast<int64_t>(bytes));
}
void to_device_bytes(void* dst, const void* src, size_t bytes) {
  copy_bytes(dst, Device::kCuda, src, Device::kCpu, static_cast<int64_t>(bytes));
}

Tensor host_copy(const Tensor& d) {
  Tensor h(d.shape());
  h.copy_from(d);
  return h;
}

// The device half of QuantizedOp: codes of the operands and of dL/dY in device buffers, the
// straight-through backward and the step gradients on the device.
class CudaQuantOp : public QuantizedOp {
 public:
  using QuantizedOp::QuantizedOp;

 protected:
  // Operands of the activation grid (uint8 codes, or int8 on the signed grid).
  mc::IntOperand act_operand(const void* data, int64_t ld, Trans t) const {
    return {data, ld, t, signed_input() ? mc::CodeType::kS8 : mc::CodeType::kU8, grid_.qa};
  }
  mc::IntOperand weight_operand(int64_t ld, Trans t) const {
    return {wc_, ld, t, mc::CodeType::kS8, grid_.qw};
  }
  mc::IntOperand grad_operand(const int8_t* data, int64_t ld, Trans t) const {
    return {data, ld, t, mc::CodeType::kS8, grid_.qg};
  }

  // x and W to codes (xc_, wc_), initialising s_W and u_A on the first training forward (on host
  // copies of x and W, the CPU's init_steps). Returns the output scale sa * sw.
  float quantize_operands_device(const Tensor& x, Param& w, bool train) {
    require_device(x, op_name_, "the input");
    // The steps' values as the device holds them (the model's device arena), for the host math.
    to_host_bytes(s_w_.value.data(), device_value_of(s_w_), sizeof(float));
    to_host_bytes(u_a_.value.data(), device_value_of(u_a_), sizeof(float));
    if (!initialized() && train) {
      Param wh;
      wh.value = host_copy(w.device_value);
      init_steps(host_copy(x), wh);
      to_device_bytes(device_value_of(s_w_), s_w_.value.data(), sizeof(float));
      to_device_bytes(device_value_of(u_a_), u_a_.value.data(), sizeof(float));
    }
    grid_ = grid();
    sw_ = effective_quant_step(s_w_.value[0]);
    ua_ = effective_quant_step(u_a_.value[0]);
    cudaStream_t s = compute_stream();
    const int64_t nw = shape_numel(w.shape);
    wc_ = device_buffer<int8_t>(wcodes_, nw);
    mc::weight_codes_async(device_value_of(w), nw, sw_, spec_.weight_bits, wc_, s);
    xc_ = device_buffer<uint8_t>(xcodes_, x.numel());
    // NaN inputs are counted on the device and read with the gradient's stats (one sync).
    xnans_ = device_buffer<unsigned long long>(xnan_, 1);
    INT4DDP_CUDA_CHECK(cudaMemsetAsync(xnans_, 0, sizeof(unsigned long long), s));
    mc::act_codes_async(x.data(), x.numel(), ua_, spec_.act_bits, signed_input(), xc_, xnans_, s);
    return grid_.sa * grid_.sw;
  }

  // dL/dY to int8 codes (gc_) through the CUDA codec with the CPU's parameters and keys; the
  // policy's scalar steps are QuantizedOp's. Returns the step d_G.
  float quantize_grad_device(const Tensor& dy) {
    require_device(dy, op_name_, "the output gradient");
    const int64_t n = dy.numel();
    cudaStream_t s = compute_stream();
    std::vector<float> host;  // dL/dY on the host, only where the policy or diagnostics read it
    if (grad_needs_values() || ctx_->diagnostics) {
      host.resize(static_cast<size_t>(n));
      to_host_bytes(host.data(), dy.data(), sizeof(float) * static_cast<size_t>(n));
    }
    const quant::QuantParams p = grad_quant_params(host.empty() ? nullptr : host.data(), n);
    uint8_t* packed = device_buffer<uint8_t>(gpacked_, quant::packed_bytes(p.bits, n));
    float* scale = device_buffer<float>(gscale_, 1);
    auto* stats = device_buffer<quant::QuantStats>(gstats_, 1);
    quant::cuda::quantize_async(dy.data(), n, p, packed, scale, stats, s);
    if (p.bits == 4) {
      gc_ = device_buffer<int8_t>(gcodes_, n);
      mc::unpack_int4_async(packed, n, gc_, s);
    } else {
      gc_ = reinterpret_cast<int8_t*>(packed);  // one int8 code per element already
    }
    quant::QuantStats st;
    to_host_bytes(&st, stats, sizeof(st));
    unsigned long long nans = 0;  // the forward's NaN inputs: the step is non-finite, as on the CPU
    if (xnans_ != nullptr) to_host_bytes(&nans, xnans_, sizeof(nans));
    ctx_->nonfinite += static_cast<int64_t>(nans);
    const float step = finish_grad_quant(st, p.gamma);
    if (ctx_->diagnostics && st.nonfinite == 0) {
      float* deq = device_buffer<float>(gdeq_, n);
      quant::cuda::dequantize_async(packed, scale, n, p.bits, 0, deq, s);
      std::vector<float> deq_host(static_cast<size_t>(n));
      to_host_bytes(deq_host.data(), deq, sizeof(float) * static_cast<size_t>(n));
      diagnose_grad(host.data(), deq_host.data(), n);
    }
    return step;
  }

  // From dL/dW^ (device, w's shape): w's device gradient += the straight-through dW, s_W's += its
  // gradient.
  void weight_backward_device(Param& w, const float* dwhat) {
    cudaStream_t s = compute_stream();
    double* scratch = device_buffer<double>(reduce_, mc::step_grad_scratch_count() + 2);
    double* ds = scratch + mc::step_grad_scratch_count();
    mc::weight_quant_backward_async(device_value_of(w), shape_numel(w.shape), sw_,
                                    spec_.weight_bits, dwhat, device_grad_of(w), ds, scratch, s);
    mc::add_double_to_float_async(ds, device_grad_of(s_w_), s);
  }

  // From dL/dX^ (device, x's shape): dx (when wanted) and u_A's gradient.
  void act_backward_device(const Tensor& x, const float* dxhat, Tensor* dx) {
    cudaStream_t s = compute_stream();
    double* scratch = device_buffer<double>(reduce_, mc::step_grad_scratch_count() + 2);
    double* du = scratch + mc::step_grad_scratch_count() + 1;
    float* out = nullptr;
    if (dx) {
      dx->resize(x.shape(), Device::kCuda);
      out = dx->data();
    }
    mc::act_quant_backward_async(x.data(), x.numel(), ua_, spec_.act_bits, signed_input(), dxhat,
                                 out, du, scratch, s);
    mc::add_double_to_float_async(du, device_grad_of(u_a_), s);
  }

  Grid grid_{};
  float sw_ = 1.0f, ua_ = 1.0f;  // effective steps of the last forward (the backward's too)
  int8_t* wc_ = nullptr;         // weight codes (device)
  uint8_t* xc_ = nullptr;        // activation codes (device; int8 bytes on the signed grid)
  int8_t* gc_ = nullptr;         // gradient codes (device)
  Tensor wcodes_, xcodes_, xnan_, gcodes_, gpacked_, gscale_, gstats_, gdeq_, reduce_;
  unsigned long long* xnans_ = nullptr;  // in xnan_: the last forward's NaN inputs
};

// ---- QLinear ------------------------------------------------------------------------------------

class CudaQLinear : public Layer, public CudaQuantOp {
 public:
  CudaQLinear(std::string name, int64_t in, int64_t out, const QuantSpec& spec, uint32_t layer_id,
              QuantContext* ctx)
      : CudaQuantOp(name, spec, layer_id, ctx), name_(std::move(name)), in_(in), out_(out) {
    INT4DDP_CHECK(in > 0 && out > 0, name_, ": features must be positive");
    weight_ = make_param(name_ + ".weight", {out, in}, true);
    bias_ = make_param(name_ + ".bias", {out}, false);
  }
  std::string name() const override { return name_; }
  std::vector<Param*> params() override { return {&weight_, &bias_, &s_w_, &u_a_}; }

  void forward(const Tensor& x, Tensor& y, bool train) override {
    const int64_t n = x.dim(0);
    INT4DDP_CHECK(x.numel() == n * in_, name_, ": input ", shape_str(x.shape()), " does not have ",
                  in_, " features");
    const float scale = quantize_operands_device(x, weight_, train);
    y.resize({n, out_}, Device::kCuda);
    cudaStream_t s = compute_stream();
    // y (n, out) = X^ (n, in) W^T.
    mc::int_gemm(gemm_context(), n, out_, in_, act_operand(xc_, in_, Trans::kNo),
                 weight_operand(in_, Trans::kYes), scale, false, y.data(), out_, s);
    mc::bias_add_rows_async(y.data(), device_value_of(bias_), n, out_, s);
  }

  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    const int64_t n = x.dim(0);
    const float dg = quantize_grad_device(dy);
    cudaStream_t s = compute_stream();
    // dW^ (out, in) = G^T (out, n) X^ (n, in).
    float* dwhat = device_buffer<float>(dwhat_, out_ * in_);
    mc::int_gemm(gemm_context(), out_, in_, n, grad_operand(gc_, out_, Trans::kYes),
                 act_operand(xc_, in_, Trans::kNo), dg * grid_.sa, false, dwhat, in_, s);
    weight_backward_device(weight_, dwhat);
    mc::bias_grad_codes_async(gc_, n, out_, dg, device_grad_of(bias_), s);
    // dX^ (n, in) = G (n, out) W^ (out, in); u_A's gradient needs it even without dx.
    float* dxhat = device_buffer<float>(dxhat_, n * in_);
    mc::int_gemm(gemm_context(), n, in_, out_, grad_operand(gc_, out_, Trans::kNo),
                 weight_operand(in_, Trans::kNo), dg * grid_.sw, false, dxhat, in_, s);
    act_backward_device(x, dxhat, dx);
  }

 private:
  std::string name_;
  int64_t in_, out_;
  Param weight_, bias_;
  Tensor dwhat_, dxhat_;
};

// ---- QConv2d ------------------------------------------------------------------------------------

class CudaQConv2d : public Layer, public CudaQuantOp {
 public:
  CudaQConv2d(std::string name, int64_t in, int64_t out, int kernel, int stride, int pad,
              const QuantSpec& spec, uint32_t layer_id, QuantContext* ctx)
      : CudaQuantOp(name, spec, layer_id, ctx), name_(std::move(name)), in_(in), out_(out) {
    INT4DDP_CHECK(in > 0 && out > 0 && kernel > 0 && stride > 0 && pad >= 0, name_,
                  ": bad convolution geometry");
    geo_.channels = in;
    geo_.kernel = kernel;
    geo_.stride = stride;
    geo_.pad = pad;
    weight_ = make_param(name_ + ".weight", {out, in, kernel, kernel}, true);
  }
  std::string name() const override { return name_; }
  std::vector<Param*> params() override { return {&weight_, &s_w_, &u_a_}; }

  void forward(const Tensor& x, Tensor& y, bool train) override {
    const int64_t n = set_geometry(x);
    const int64_t ho = geo_.out_h(), wo = geo_.out_w(), hw = ho * wo, rows = geo_.rows();
    const float scale = quantize_operands_device(x, weight_, train);
    y.resize({n, out_, ho, wo}, Device::kCuda);
    cudaStream_t s = compute_stream();
    // Columns (1 byte) and the group's output (4 bytes) per sample.
    const int64_t group = group_size(n, (rows + 4 * out_) * hw);
    for (int64_t s0 = 0; s0 < n; s0 += group) {
      const int64_t g = std::min(group, n - s0), cols = g * hw;
      // col^T (g*hw, rows), K contiguous; zero padding is code 0 on both grids.
      uint8_t* col = device_buffer<uint8_t>(col_, rows * cols);
      im2col_codes(s0, g, true, col);
      // y_g (out, g*hw) = W^ (out, rows) col (rows, g*hw): each output one exact sum rescaled
      // once, whatever the grouping; one sample is already in y's layout.
      float* yg = g == 1 ? y.data() + s0 * out_ * hw : device_buffer<float>(ygroup_, out_ * cols);
      mc::int_gemm(gemm_context(), out_, cols, rows, weight_operand(rows, Trans::kNo),
                   act_operand(col, rows, Trans::kYes), scale, false, yg, cols, s);
      if (g > 1) mc::planes_by_sample_async(yg, g, out_, hw, y.data() + s0 * out_ * hw, s);
    }
  }

  void backward(const Tensor& x, const Tensor&, const Tensor& dy, Tensor* dx) override {
    const int64_t n = set_geometry(x);
    const int64_t hw = geo_.out_h() * geo_.out_w(), rows = geo_.rows(), wsize = out_ * rows;
    const float dg = quantize_grad_device(dy);
    cudaStream_t s = compute_stream();
    // The CPU's dX^ form (Conv2d::dx_by_transposed_conv): one exact sum over (out, ky, kx) per
    // element rescaled once, or the rescaled columns summed by col2im.
    const bool exact_dx = geo_.stride == 1 && geo_.pad <= geo_.kernel - 1 &&
                          out_ * geo_.kernel * geo_.kernel <= mc::int32_max_k(grid_.qw, grid_.qg);
    const int64_t kmax = mc::int32_max_k(grid_.qa, grid_.qg);
    INT4DDP_CHECK(hw <= kmax, name_, ": ", hw, " output positions per sample exceed the int32 ",
                  "guard of the weight-gradient GEMM (", kmax, " at these bit-widths)");
    const int64_t group = std::min(group_size(n, rows * hw * 4), kmax / hw);
    int64_t* acc = device_buffer<int64_t>(dw_acc_, wsize);
    int32_t* dw32 = device_buffer<int32_t>(dw32_, wsize);
    float* dxhat = device_buffer<float>(dxhat_, x.numel());
    if (!exact_dx)
      INT4DDP_CUDA_CHECK(cudaMemsetAsync(dxhat, 0, sizeof(float) * x.numel(), s));  // col2im adds
    // An empty batch sums nothing (the loop below would leave last step's sums in acc).
    if (n == 0) INT4DDP_CUDA_CHECK(cudaMemsetAsync(acc, 0, sizeof(int64_t) * wsize, s));
    for (int64_t s0 = 0; s0 < n; s0 += group) {
      const int64_t g = std::min(group, n - s0), cols = g * hw;
      // G_g (out, g*hw): the group's gradient codes, samples side by side per channel.
      int8_t* gt = device_buffer<int8_t>(gt_, out_ * cols);
      mc::planes_by_channel_async(gc_ + s0 * out_ * hw, g, out_, hw, gt, s);
      uint8_t* col = device_buffer<uint8_t>(col_, rows * cols);  // (rows, g*hw)
      im2col_codes(s0, g, false, col);
      // dW^ sums (out, rows) += G_g col^T, exact: int32 per group, int64 over groups.
      mc::int_gemm_i32(gemm_context(), out_, rows, cols, grad_operand(gt, cols, Trans::kNo),
                       act_operand(col, cols, Trans::kYes), dw32, rows, s);
      mc::accumulate_i64_async(dw32, wsize, s0 == 0, acc, s);
      // dcol (rows, g*hw) = W^T (rows, out) G_g.
      const mc::IntOperand wt = weight_operand(rows, Trans::kYes);
      const mc::IntOperand gg = grad_operand(gt, cols, Trans::kNo);
      if (exact_dx) {
        int32_t* dcol = device_buffer<int32_t>(dcol_, rows * cols);
        mc::int_gemm_i32(gemm_context(), rows, cols, out_, wt, gg, dcol, cols, s);
        mc::col2im_i32_scaled_async(dcol, s0, g, geo_, dg * grid_.sw, dxhat, s);
      } else {
        float* dcol = device_buffer<float>(dcol_, rows * cols);
        mc::int_gemm(gemm_context(), rows, cols, out_, wt, gg, dg * grid_.sw, false, dcol, cols, s);
        mc::col2im_async(dcol, s0, g, geo_, false, dxhat, s);
      }
    }
    float* dwhat = device_buffer<float>(dwhat_, wsize);
    mc::scale_i64_async(acc, wsize, dg * grid_.sa, dwhat, s);
    weight_backward_device(weight_, dwhat);
    act_backward_device(x, dxhat, dx);
  }

 private:
  // Takes x's spatial size and returns its batch size.
  int64_t set_geometry(const Tensor& x) {
    require_device(x, name_, "the input");
    INT4DDP_CHECK(x.rank() == 4 && x.dim(1) == in_, name_, ": input ", shape_str(x.shape()),
                  " is not (n, ", in_, ", h, w)");
    geo_.h = x.dim(2);
    geo_.w = x.dim(3);
    INT4DDP_CHECK(geo_.out_h() > 0 && geo_.out_w() > 0, name_, ": input ", shape_str(x.shape()),
                  " is too small");
    return x.dim(0);
  }
  // Samples per group whose columns (bytes_per_sample each) fit kColumnBytes: 1..n.
  static int64_t group_size(int64_t n, int64_t bytes_per_sample) {
    return std::max<int64_t>(1, std::min<int64_t>(n, kColumnBytes / bytes_per_sample));
  }
  void im2col_codes(int64_t s0, int64_t g, bool transposed, uint8_t* col) const {
    cudaStream_t s = compute_stream();
    if (signed_input())
      mc::im2col_async(reinterpret_cast<const int8_t*>(xc_), s0, g, geo_, transposed,
                       reinterpret_cast<int8_t*>(col), s);
    else
      mc::im2col_async(xc_, s0, g, geo_, transposed, col, s);
  }

  std::string name_;
  int64_t in_, out_;
  mc::ConvGeometry geo_;
  Param weight_;
  Tensor col_, ygroup_, gt_, dcol_, dw32_, dw_acc_, dwhat_, dxhat_;
};

}  // namespace

CudaQuantLayer make_cuda_qlinear(std::string name, int64_t in, int64_t out, const QuantSpec& spec,
                                 uint32_t layer_id, QuantContext* ctx) {
  auto layer = std::make_unique<CudaQLinear>(std::move(name), in, out, spec, layer_id, ctx);
  QuantizedOp* op = layer.get();
  return {std::move(layer), op};
}

CudaQuantLayer make_cuda_qconv2d(std::string name, int64_t in, int64_t out, int kernel, int stride,
                                 int pad, const QuantSpec& spec, uint32_t layer_id,
                                 QuantContext* ctx) {
  auto layer = std::make_unique<CudaQConv2d>(std::move(name), in, out, kernel, stride, pad, spec,
                                             layer_id, ctx);
  QuantizedOp* op = layer.get();
  return {std::move(layer), op};
}

#else  // !INT4DDP_HAVE_CUDA

namespace {
[[noreturn]] void no_cuda(const std::string& name) {
  INT4DDP_FAIL(name,
               ": quantized CUDA layer requested, but this int4ddp was built without CUDA "
               "(use train.device = cpu)");
}
}  // namespace

CudaQuantLayer make_cuda_qlinear(std::string name, int64_t, int64_t, const QuantSpec&, uint32_t,
                                 QuantContext*) {
  no_cuda(name);
}

CudaQuantLayer make_cuda_qconv2d(std::string name, int64_t, int64_t, int, int, int,
                                 const QuantSpec&, uint32_t, QuantContext*) {
  no_cuda(name);
}

#endif

}  // namespace int4ddp::nn
