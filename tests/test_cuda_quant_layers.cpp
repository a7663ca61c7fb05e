// The quantized layers on the GPU (src/nn/quant_layers_cuda.h) against the CPU layers
// (quant_layers.h) on the same inputs, parameters and quantizer state, and their kernels
// (kernels/math/cuda/qlayer_cuda.h) against the CPU definitions. Tests skip without a GPU.
//
// What must be equal, and why:
//   bit for bit   weight and activation codes (the same fp32 expressions); y (exact int32 sums,
//                 one rescale scale * float(T), then the same bias add); the gradient quantizer's
//                 codes and stats, clip count included (the CUDA codec's contract); dW^ and so
//                 W's gradient (exact integer sums rescaled once as on the CPU); dX^ and so dx
//                 (Conv2d: the CPU's form: one exact sum rescaled once for stride 1, pad <= k - 1,
//                 the rescaled columns summed in the CPU's col2im order otherwise); the bias
//                 gradient (the CPU's sequential fp32 sum); u_A, s_W after the first-batch
//                 initialisation and the lbt gamma after calibration (the CPU's own code on the
//                 same values).
//   close         the step gradients d loss / d s_W and d loss / d u_A: both sides sum the same
//                 double terms in different fixed orders. The double sums agree within
//                 n 2^-53 sum|t|, far below a float ulp for these sizes (n < 2^20, and random
//                 data keep |sum| above 2^-10 sum|t|), so the float results differ by at most the
//                 final rounding: kStepTol = 2^-21 relative (4 ulps).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_test.h"
#include "kernels/common/error.h"
#include "kernels/math/cuda/qlayer_cuda.h"
#include "kernels/quant/cuda/codec_cuda.h"
#include "kernels/quant/cuda/cuda_check.h"
#include "src/core/device.h"
#include "src/core/device_cuda.h"
#include "src/core/tensor.h"
#include "src/nn/layers_cuda.h"
#include "src/nn/model.h"
#include "src/nn/quant_layers.h"
#include "src/nn/quant_layers_cuda.h"

namespace int4ddp::nn {
namespace {

constexpr double kStepTol = 1.0 / (1 << 21);

Tensor random_tensor(Shape shape, uint64_t seed, float scale = 1.0f, float mean = 0.0f) {
  Tensor t(std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(mean, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = d(rng);
  return t;
}

using test::to_device;
using test::to_host;

// Bytes from the device after the compute stream's work (the layers' kernels run there).
void device_to_host(void* dst, const void* src, int64_t bytes) {
  copy_bytes(dst, Device::kCpu, src, Device::kCuda, bytes);
}

void expect_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < got.numel(); ++i)
    if (std::memcmp(&got.data()[i], &want.data()[i], sizeof(float)) != 0) {
      if (first < 0) first = i;
      ++wrong;
    }
  EXPECT_EQ(wrong, 0) << what << ": " << wrong << " of " << got.numel() << " differ, first at "
                      << first << " (" << (first >= 0 ? got[first] : 0) << " vs "
                      << (first >= 0 ? want[first] : 0) << ")";
}

void expect_step_close(float got, float want, const std::string& what) {
  EXPECT_LE(std::fabs(static_cast<double>(got) - want), kStepTol * std::fabs(want) + 1e-30)
      << what << ": " << got << " vs " << want;
}

// The GPU layer gets the CPU layer's parameter values (host and device) and zero device gradients.
void share_params(Layer& cpu, Layer& gpu) {
  const std::vector<Param*> pc = cpu.params(), pg = gpu.params();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    ASSERT_EQ(pc[i]->name, pg[i]->name);
    ASSERT_EQ(pc[i]->shape, pg[i]->shape);
    pg[i]->value.copy_from(pc[i]->value);
    pg[i]->device_value = to_device(pc[i]->value);
    pg[i]->device_grad = Tensor(pg[i]->shape, Device::kCuda);
    pg[i]->device_grad.zero();
  }
}

void zero_grads(Layer& cpu, Layer& gpu) {
  for (Param* p : cpu.params()) p->grad.zero();
  for (Param* p : gpu.params()) p->device_grad.zero();
}

struct Case {
  int wb, ab, gb;
  bool signed_input;
};

std::string case_name(const Case& c) {
  return std::to_string(c.wb) + "/" + std::to_string(c.ab) + "/" + std::to_string(c.gb) +
         (c.signed_input ? " signed" : " unsigned");
}

QuantSpec spec_of(const Case& c) {
  QuantSpec s;
  s.weight_bits = c.wb;
  s.act_bits = c.ab;
  s.grad_bits = c.gb;
  s.signed_input = c.signed_input;
  s.grad_policy.kind = quant::PolicyKind::kLbt;
  return s;
}

// Two training steps of the CPU layer and the GPU layer on the same data: the first initialises the
// steps and is the lbt calibration batch, the second quantizes with the calibrated gamma. Compares
// y, every gradient, the gradient quantizer's stats and gamma after each step.
void compare_two_steps(Layer& cpu, QuantizedOp& cop, QuantContext& cctx, Layer& gpu,
                       QuantizedOp& gop, QuantContext& gctx, const Shape& x_shape,
                       const std::string& what) {
  share_params(cpu, gpu);
  for (uint32_t step = 0; step < 2; ++step) {
    const std::string at = what + " step " + std::to_string(step);
    cctx.step = gctx.step = step + 5;
    zero_grads(cpu, gpu);
    // Inputs: a ReLU-like (mostly positive) or signed activation, spread so some clip.
    Tensor x = random_tensor(x_shape, 100 + step, 1.0f, 0.3f);
    if (!cop.signed_input())
      for (int64_t i = 0; i < x.numel(); ++i) x[i] = std::max(0.0f, x[i]);
    Tensor xd = to_device(x);
    Tensor y_cpu, y_gpu;
    cpu.forward(x, y_cpu, true);
    gpu.forward(xd, y_gpu, true);
    // The steps: the same initialisation on the first batch (device copy included).
    ASSERT_EQ(cop.weight_step().value[0], gop.weight_step().value[0]) << at;
    ASSERT_EQ(cop.act_step().value[0], gop.act_step().value[0]) << at;
    EXPECT_EQ(to_host(gop.act_step().device_value)[0], cop.act_step().value[0]) << at;
    EXPECT_EQ(to_host(gop.weight_step().device_value)[0], cop.weight_step().value[0]) << at;
    expect_bits(to_host(y_gpu), y_cpu, at + " y");

    const Tensor dy = random_tensor(y_cpu.shape(), 200 + step, 0.01f);
    Tensor dx_cpu, dx_gpu;
    cpu.backward(x, y_cpu, dy, &dx_cpu);
    gpu.backward(xd, y_gpu, to_device(dy), &dx_gpu);
    const auto& cs = cop.grad_state();
    const auto& gs = gop.grad_state();
    EXPECT_EQ(gs.pending.clipped, cs.pending.clipped) << at << " lbt clip count";
    EXPECT_EQ(gs.pending.count, cs.pending.count) << at;
    EXPECT_EQ(gs.pending.nonfinite, cs.pending.nonfinite) << at;
    EXPECT_EQ(gs.pending.absmax, cs.pending.absmax) << at;
    EXPECT_EQ(gs.last_gamma, cs.last_gamma) << at;
    EXPECT_EQ(gs.policy->gamma(), cs.policy->gamma()) << at << " gamma after calibration";
    expect_bits(to_host(dx_gpu), dx_cpu, at + " dx");
    const std::vector<Param*> pc = cpu.params(), pg = gpu.params();
    for (size_t i = 0; i < pc.size(); ++i) {
      const Tensor g = to_host(pg[i]->device_grad);
      if (pc[i] == &cop.weight_step() || pc[i] == &cop.act_step())
        expect_step_close(g[0], pc[i]->grad[0], at + " " + pc[i]->name + " grad");
      else
        expect_bits(g, pc[i]->grad, at + " " + pc[i]->name + " grad");
    }
    cop.commit_step(step > 0);
    gop.commit_step(step > 0);
  }
}

const Case kCases[] = {{4, 4, 4, false}, {4, 4, 4, true}, {8, 8, 8, false}, {2, 3, 5, true}};

TEST(CudaQuantLayers, LinearMatchesCpu) {
  REQUIRE_GPU();
  for (const Case& c : kCases) {
    QuantContext cctx, gctx;
    cctx.seed = gctx.seed = 11;
    cctx.stream = gctx.stream = 1;
    QLinear cpu("fc", 96, 40, true, spec_of(c), 3, &cctx);
    for (Param* p : cpu.params())
      if (p->shape.size() > 1 || p->name.find("bias") != std::string::npos)
        p->value.copy_from(random_tensor(p->shape, 7, 0.1f));
    CudaQuantLayer g = make_cuda_qlinear("fc", 96, 40, spec_of(c), 3, &gctx);
    compare_two_steps(cpu, cpu, cctx, *g.layer, *g.op, gctx, {33, 96}, "qlinear " + case_name(c));
  }
}

TEST(CudaQuantLayers, Conv2dMatchesCpu) {
  REQUIRE_GPU();
  struct Geometry {
    int64_t in, out;
    int k, stride, pad;
    int64_t h, batch;
  };
  // 3x3 stride 1 (the transposed-convolution form of dx), 3x3 stride 2 and 1x1 stride 2 (col2im).
  // A batch of one takes the GEMM's output in place (no regrouping).
  const Geometry geos[] = {
      {6, 8, 3, 1, 1, 9, 5}, {5, 7, 3, 2, 1, 10, 5}, {8, 12, 1, 2, 0, 8, 5}, {4, 6, 3, 1, 1, 7, 1}};
  for (const Geometry& ge : geos)
    for (const Case& c : kCases) {
      QuantContext cctx, gctx;
      cctx.seed = gctx.seed = 3;
      QConv2d cpu("conv", ge.in, ge.out, ge.k, ge.stride, ge.pad, spec_of(c), 2, &cctx);
      cpu.weight().value.copy_from(random_tensor(cpu.weight().shape, 9, 0.2f));
      CudaQuantLayer g =
          make_cuda_qconv2d("conv", ge.in, ge.out, ge.k, ge.stride, ge.pad, spec_of(c), 2, &gctx);
      compare_two_steps(
          cpu, cpu, cctx, *g.layer, *g.op, gctx, {ge.batch, ge.in, ge.h, ge.h},
          "qconv k" + std::to_string(ge.k) + " s" + std::to_string(ge.stride) + " " + case_name(c));
    }
}

// The kernels against the CPU definitions on values that hit every branch: clipping on both sides,
// ties of rint, zero and tiny steps.
TEST(CudaQuantKernels, CodesAndStraightThroughMatchCpu) {
  REQUIRE_GPU();
  const int64_t n = 70001;
  Tensor v = random_tensor({n}, 5, 1.0f);
  for (int64_t i = 0; i < n; i += 97) v[i] = 0.25f * static_cast<float>(i % 9);  // ties
  const Tensor dv = random_tensor({n}, 6, 1.0f);
  cudaStream_t s = compute_stream();
  Tensor vd = to_device(v), dvd = to_device(dv);
  Tensor scratch({2 * (math::cuda::step_grad_scratch_count() + 2)}, Device::kCuda);
  auto* red = reinterpret_cast<double*>(scratch.data());
  double* result = red + math::cuda::step_grad_scratch_count();
  Tensor codes_dev({n}, Device::kCuda);
  for (int bits : {2, 4, 8})
    for (float step : {0.7f, 1.9f, 1e-12f}) {
      const std::string at = "bits " + std::to_string(bits) + " step " + std::to_string(step);
      // Weights.
      std::vector<float> want(static_cast<size_t>(n));
      quantize_weight_codes(v.data(), n, step, bits, want.data());
      auto* c8 = reinterpret_cast<int8_t*>(codes_dev.data());
      math::cuda::weight_codes_async(vd.data(), n, step, bits, c8, s);
      std::vector<int8_t> got(static_cast<size_t>(n));
      device_to_host(got.data(), c8, n);
      int64_t wrong = 0;
      for (int64_t i = 0; i < n; ++i) wrong += static_cast<float>(got[i]) != want[i];
      EXPECT_EQ(wrong, 0) << at << " weight codes";
      Tensor dw_cpu({n}), dw_gpu({n}, Device::kCuda);
      dw_cpu.zero();
      dw_gpu.zero();
      const double ds = weight_quant_backward(v.data(), n, step, bits, dv.data(), dw_cpu.data());
      math::cuda::weight_quant_backward_async(vd.data(), n, step, bits, dvd.data(), dw_gpu.data(),
                                              result, red, s);
      double ds_gpu = 0;
      device_to_host(&ds_gpu, result, sizeof(double));
      expect_bits(to_host(dw_gpu), dw_cpu, at + " dw");
      EXPECT_NEAR(ds_gpu, ds, 1e-9 * (std::fabs(ds) + n)) << at << " ds";
      // Activations, both grids.
      for (bool is_signed : {false, true}) {
        quantize_act_codes(v.data(), n, step, bits, is_signed, want.data());
        math::cuda::act_codes_async(vd.data(), n, step, bits, is_signed, codes_dev.data(), nullptr,
                                    s);
        std::vector<uint8_t> bytes(static_cast<size_t>(n));
        device_to_host(bytes.data(), codes_dev.data(), n);
        wrong = 0;
        for (int64_t i = 0; i < n; ++i) {
          const int code = is_signed ? static_cast<int>(static_cast<int8_t>(bytes[i])) : bytes[i];
          wrong += static_cast<float>(code) != want[i];
        }
        EXPECT_EQ(wrong, 0) << at << " act codes signed " << is_signed;
        Tensor dx_cpu({n}), dx_gpu({n}, Device::kCuda);
        const double du =
            act_quant_backward_ref(v.data(), n, step, bits, is_signed, dv.data(), dx_cpu.data());
        math::cuda::act_quant_backward_async(vd.data(), n, step, bits, is_signed, dvd.data(),
                                             dx_gpu.data(), result + 1, red, s);
        double du_gpu = 0;
        device_to_host(&du_gpu, result + 1, sizeof(double));
        expect_bits(to_host(dx_gpu), dx_cpu, at + " dx");
        EXPECT_NEAR(du_gpu, du, 1e-9 * (std::fabs(du) + n)) << at << " du";
      }
    }
}

// A NaN activation has no code: code 0 and counted (the trainer skips the step), as on the CPU.
TEST(CudaQuantKernels, NanActivationsAreCounted) {
  REQUIRE_GPU();
  const int64_t n = 1000;
  Tensor x({n});
  for (int64_t i = 0; i < n; ++i) x[i] = 0.01f * static_cast<float>(i % 97);
  for (int64_t i : {3, 500, 999}) x[i] = std::numeric_limits<float>::quiet_NaN();
  x[7] = std::numeric_limits<float>::infinity();  // saturates, is not counted
  Tensor xd = to_device(x);
  Tensor counter({2}, Device::kCuda);
  counter.zero();
  auto* nans = reinterpret_cast<unsigned long long*>(counter.data());
  Tensor codes({n}, Device::kCuda);
  math::cuda::act_codes_async(xd.data(), n, 0.5f, 4, false, codes.data(), nans, compute_stream());
  unsigned long long got = 0;
  device_to_host(&got, nans, sizeof(got));
  EXPECT_EQ(got, 3u);
  std::vector<uint8_t> bytes(static_cast<size_t>(n));
  device_to_host(bytes.data(), codes.data(), n);
  for (int64_t i : {3, 500, 999}) EXPECT_EQ(bytes[static_cast<size_t>(i)], 0) << i;
  EXPECT_EQ(bytes[7], 15);
}

TEST(CudaQuantKernels, StepGradientsAreDeterministic) {
  REQUIRE_GPU();
  const int64_t n = 1 << 20;
  const Tensor v = random_tensor({n}, 8), dv = random_tensor({n}, 9);
  Tensor vd = to_device(v), dvd = to_device(dv), dx({n}, Device::kCuda);
  Tensor scratch({2 * (math::cuda::step_grad_scratch_count() + 2)}, Device::kCuda);
  auto* red = reinterpret_cast<double*>(scratch.data());
  double* result = red + math::cuda::step_grad_scratch_count();
  double first = 0;
  for (int rep = 0; rep < 3; ++rep) {
    math::cuda::act_quant_backward_async(vd.data(), n, 0.9f, 4, true, dvd.data(), dx.data(), result,
                                         red, compute_stream());
    double du = 0;
    device_to_host(&du, result, sizeof(double));
    if (rep == 0) first = du;
    EXPECT_EQ(std::memcmp(&du, &first, sizeof(double)), 0) << "rerun " << rep;
  }
}

TEST(CudaQuantModels, QuantizedModelsBuildOnTheGpu) {
  REQUIRE_GPU();
  for (const char* name : {"mlp", "cnn", "resnet20", "resnet18"}) {
    ModelSpec spec;
    spec.name = name;
    if (std::string(name) == "resnet18") {
      spec.channels = 3;
      spec.height = spec.width = 32;
    }
    ModelSpec cpu_spec = spec;
    spec.device = Device::kCuda;
    Model gpu(spec, 1), cpu(cpu_spec, 1);
    EXPECT_EQ(gpu.quantized_ops().size(), cpu.quantized_ops().size()) << name;
    EXPECT_FALSE(gpu.quantized_ops().empty()) << name;
    ASSERT_EQ(gpu.num_params(), cpu.num_params()) << name;
  }
}

// Two training steps of the quantized cnn on both devices from the same initialisation and batch:
// the fp32 layers (the first convolution, BatchNorm) differ in the last bits between devices, which
// can move a few activation codes, so the losses agree closely rather than exactly; s_W initialises
// from the same weights and so bit for bit; every gradient is finite.
TEST(CudaQuantModels, CnnStepsOnTheGpuFollowTheCpu) {
  REQUIRE_GPU();
  ModelSpec spec;
  spec.name = "cnn";
  ModelSpec gpu_spec = spec;
  gpu_spec.device = Device::kCuda;
  Model cpu(spec, 3), gpu(gpu_spec, 3);
  const Tensor x = random_tensor({16, 1, 28, 28}, 1);
  std::vector<int32_t> labels(16);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>(i % 10);
  for (int step = 0; step < 2; ++step) {
    const std::string at = "step " + std::to_string(step);
    cpu.zero_grad();
    gpu.zero_grad();
    Tensor lc, lg, dc, dg;
    cpu.forward(x, lc, true);
    gpu.forward(x, lg, true);
    const float loss_c = softmax_cross_entropy_any(lc, labels.data(), &dc, nullptr);
    const float loss_g = softmax_cross_entropy_any(lg, labels.data(), &dg, nullptr);
    EXPECT_NEAR(loss_g, loss_c, 0.02 * std::fabs(loss_c)) << at;
    cpu.backward(dc, {});
    gpu.backward(dg, {});
    gpu.grads_to_host();  // the gradients are device-resident
    int64_t bad = 0;
    for (int64_t i = 0; i < gpu.num_params(); ++i) bad += !std::isfinite(gpu.grads()[i]);
    EXPECT_EQ(bad, 0) << at;
    ASSERT_EQ(gpu.quantized_ops().size(), cpu.quantized_ops().size());
    for (size_t i = 0; i < cpu.quantized_ops().size(); ++i) {
      QuantizedOp& c = *cpu.quantized_ops()[i];
      QuantizedOp& g = *gpu.quantized_ops()[i];
      EXPECT_TRUE(g.initialized()) << at;
      EXPECT_EQ(g.weight_step().value[0], c.weight_step().value[0]) << at << " s_W " << i;
      EXPECT_NEAR(g.act_step().value[0], c.act_step().value[0],
                  1e-3 * std::fabs(c.act_step().value[0]))
          << at << " u_A " << i;
      EXPECT_NE(g.act_step().grad[0], 0.0f) << at << " u_A gradient " << i;
    }
    cpu.commit_quant_step(step > 0);
    gpu.commit_quant_step(step > 0);
  }
}

}  // namespace
}  // namespace int4ddp::nn
